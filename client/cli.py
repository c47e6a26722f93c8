"""`sluice`: a small command line over `client.Client`. No wire code of its own.

Exit codes: 0 success, 1 the broker refused (or some records failed), 2 usage error,
3 broker unreachable, 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from client._wire import check_target, properties_json
from client.client import CURSOR_TYPES, Client
from client.errors import BrokerUnavailable, CursorInvalid, SluiceError, StreamNotFound, Throttled, is_retriable
from client.model import AppInfo, Record, SourceInfo

BATCH = 500                       # records per PutRecords call
BATCH_BYTES = 4 * 1024 * 1024     # payload per call: stays under the broker's 5 MiB request cap
PROGRESS_EVERY_S = 0.2            # how often the TTY progress line is redrawn
MALFORMED = "malformed input"     # the failure group of lines `put --jsonl` could not parse
TOO_MANY_REQUESTS = "TOO_MANY_REQUESTS"   # a per-client limit of the broker (tail: its subscriptions)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# The broker's limit on a partition key (broker/core/limits.py; DIS leaves it undocumented, Kinesis allows
# 256): a --key over it would fail every record, so it is a usage error up front.
PARTITION_KEY_MAX_CHARS = 256


def _partition_key(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (leave --key out to spread records over partitions)")
    if len(text) > PARTITION_KEY_MAX_CHARS:
        raise argparse.ArgumentTypeError(f"at most {PARTITION_KEY_MAX_CHARS} characters, got {len(text)}")
    return text


def _int_within(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer within what the wire can carry (the broker judges the rest)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be within {low}..{high}, got {value}")
        return value
    parse.__name__ = what
    return parse


_partition_count = _int_within(1, 2**32 - 1, "a partition count")   # 0 is never one: a usage error, as -1
_seq = _int_within(0, 2**63 - 1, "a sequence number")
_epoch_ms = _int_within(0, 2**63 - 1, "milliseconds since the epoch")


def _not_utf8(value: Any) -> str | None:
    """The first text in a parsed argument that cannot be sent as UTF-8 (bytes that are not UTF-8
    arrive as lone surrogates), else None. A walk with a stack of its own: a --properties value
    nested 900 deep (which json reads) overflowed Python's stack when this recursed."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack += reversed([*item.keys(), *item.values()])
        elif isinstance(item, (list, tuple)):
            stack += reversed(item)
    return None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _say(*parts: object) -> None:
    print("sluice:", *parts, file=sys.stderr, flush=True)


def _failure_group(reason: str, dis_code: str) -> str:
    """How `put` groups failed records: the broker's reason, with the DIS code when there is one."""
    return f"{reason} ({dis_code})" if dis_code else reason


def parse_partition_id(text: str) -> int | None:
    """'3' or 'shardId-0000000003' (the DIS spelling, accepted for convenience) -> 3; else None."""
    text = text.strip()
    prefix, dash, index = text.rpartition("-")
    if dash and prefix.lower() != "shardid":
        return None
    if not (index.isascii() and index.isdigit()) or int(index) >= 2**32:
        return None
    return int(index)


def _partition_arg(text: str) -> int:
    value = parse_partition_id(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not a partition id: {text!r} (use e.g. 3 or shardId-0000000003)")
    return value


def _all_partitions(client: Client, stream: str) -> list[int]:
    ids: list[int] = []
    while True:  # one DescribeStream page holds at most 100 partitions: follow has_more
        desc = client.describe_stream(stream, start_after_partition=ids[-1] if ids else None)
        ids += [p.partition_id for p in desc.partitions]
        if not desc.has_more or not desc.partitions:
            return ids


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _write_line(data: bytes) -> None:
    """One record's bytes and a newline on stdout as they are: `put` takes any bytes per line, so
    `get` gives the file back (decoded, a line that is not UTF-8 came out as U+FFFD), and no text
    encoding of stdout can refuse a character (a UnicodeEncodeError traceback under an ASCII one)."""
    sys.stdout.buffer.write(data + b"\n")


# -- put ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Item:
    data: bytes
    key: str | None
    partition: int | None


def _split_line(raw: bytes) -> bytes:
    if raw.endswith(b"\r\n"):
        return raw[:-2]
    return raw[:-1] if raw.endswith(b"\n") else raw


def _parse_jsonl(raw: bytes) -> tuple[bytes, str | None, int | None]:
    """data / partition_key / partition_id of one JSON line. Raises ValueError saying what is wrong."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:   # a line nested deeper than json reads: malformed like the rest
        raise ValueError("nested too deeply to be read as JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object with 'data' (a string) or 'data_base64'")
    data, key, pid = obj.get("data"), obj.get("partition_key"), obj.get("partition_id")
    encoded = obj.get("data_base64")
    if encoded is not None and data is not None:
        raise ValueError("give 'data' or 'data_base64', not both")
    if encoded is not None:
        if not isinstance(encoded, str):
            raise ValueError("'data_base64' must be a string")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("'data_base64' is not valid base64") from None
    elif not isinstance(data, str):
        raise ValueError("'data' (a string) or 'data_base64' is required")
    if key is not None and not isinstance(key, str):
        raise ValueError("'partition_key' must be a string")
    if key is not None and _not_utf8(key) is not None:
        raise ValueError("'partition_key' is not encodable as UTF-8")
    if pid is not None:
        number = None if isinstance(pid, bool) or not isinstance(pid, (str, int)) else parse_partition_id(str(pid))
        if number is None:
            raise ValueError("'partition_id' must be a partition id: 3, \"3\" or \"shardId-0000000003\"")
        pid = number
    if isinstance(data, str):
        try:
            payload = data.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \udxxx escape
            raise ValueError("'data' is not encodable as UTF-8") from None
    return payload, key, pid


class _Progress:
    """`N records sent (R rec/s)` redrawn in place on stderr; only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.drawn = float("-inf")  # the first update draws at once

    def update(self, sent: int, failed: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.drawn < PROGRESS_EVERY_S:
            return
        self.drawn = now
        rate = sent / max(now - self.started, 1e-6)
        failures = f", {failed} failed" if failed else ""
        sys.stderr.write(f"\r\033[K{sent} records sent{failures} ({rate:,.0f} rec/s)")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


class _PutStats:
    def __init__(self) -> None:
        self.sent = 0
        self.failed = 0
        self.by_code: Counter[str] = Counter()
        self.example: dict[str, str] = {}

    def fail(self, code: str, message: str, count: int = 1) -> None:
        code = code or "error"
        self.sent += count
        self.failed += count
        self.by_code[code] += count
        self.example.setdefault(code, message)

    def summary(self) -> None:
        print(f"sent {self.sent} records, {self.failed} failed", file=sys.stderr)
        for code, count in sorted(self.by_code.items()):
            example = self.example.get(code, "")
            print(f"  {code}: {count}" + (f" (e.g. {example})" if example else ""), file=sys.stderr)
        sys.stderr.flush()


# A record refused for a reason client/errors.py marks retriable (THROTTLED, a full disk, ...) is
# sent again after a pause, doubling from RETRY_FIRST_S to RETRY_MAX_S, for up to RETRY_FOR_S;
# only then is it counted failed. Before the next batch: a key's records keep their order.
RETRY_FIRST_S, RETRY_MAX_S, RETRY_FOR_S = 0.05, 2.0, 60.0


class _Interrupts:
    """Ctrl-C while a batch is in flight waits for its answer and counts it, then ends put: the
    count said is what the broker holds (the first N lines, in order: where to go on from). It
    raised at once, in the request or half way through counting its answer, and put said fewer
    than the broker held (sent 139 of 500 stored, in a test under load): going on from there
    stores the rest twice. A second Ctrl-C, or one while put waits for input, ends it at once."""

    def __init__(self) -> None:
        self.sending = False
        self.pending = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():   # in-process callers: as before
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.sending and not self.pending:
            self.pending = True
            _say("interrupted: waiting for the answer to the batch in flight (Ctrl-C again to stop now)")
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def sending_batch(self) -> Iterator[None]:
        self.sending = True
        try:
            yield
        finally:
            self.sending = False
        if self.pending:
            raise KeyboardInterrupt


def _send(client: Client, stream: str, batch: list[_Item], stats: _PutStats,
          interrupts: _Interrupts | None = None) -> None:
    """PutRecords for the batch, each record with its own route (key and/or partition); records
    refused for a retriable reason are sent again (see RETRY_FOR_S). The CLI counted a throttled
    record failed at once: 48,270 of 80,000 lines piped into one partition (the gRPC probe)."""
    deadline = time.monotonic() + RETRY_FOR_S
    pause = RETRY_FIRST_S
    while batch:
        routed = [(i.data, i.key, i.partition) for i in batch]
        try:
            results = client.put_routed(stream, routed)
        except (BrokerUnavailable, StreamNotFound):
            raise  # nothing further can succeed
        except SluiceError as exc:  # the whole request was refused: every record of it failed
            if not (exc.retriable and time.monotonic() + pause < deadline):
                stats.fail(_failure_group(exc.reason, exc.code), exc.message, len(batch))
                return
            again = batch
        else:
            again = []
            for item, r in zip(batch, results):
                if r.ok:
                    stats.sent += 1
                elif is_retriable(r.reason) and time.monotonic() + pause < deadline:
                    again.append(item)
                else:
                    stats.fail(_failure_group(r.reason, r.dis_code), r.message)
        if again and interrupts is not None and interrupts.pending:
            return   # interrupted: no more tries, the records not taken are neither sent nor failed
        if again:
            time.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)
        batch = again


def _put(client: Client, args: argparse.Namespace) -> int:
    source: BinaryIO = args.source
    name = "<stdin>" if source is sys.stdin.buffer else args.file
    stats, progress = _PutStats(), _Progress()
    batch: list[_Item] = []
    size = 0
    interrupts = _Interrupts()
    try:
        with source, interrupts.installed():
            for lineno, raw in enumerate(source, 1):
                line = _split_line(raw)
                if not (line.strip() if args.jsonl else line):
                    continue  # blank lines are not records
                key, partition = args.key, None
                if args.jsonl:
                    try:
                        line, own_key, partition = _parse_jsonl(line)
                    except ValueError as exc:
                        progress.clear()
                        _say(f"{name} line {lineno}: {exc}; skipped")
                        stats.fail(MALFORMED, "")
                        continue
                    if own_key is not None or partition is not None:
                        key = own_key
                if batch and (len(batch) == BATCH or size + len(line) > BATCH_BYTES):
                    with interrupts.sending_batch():
                        _send(client, args.stream, batch, stats, interrupts)
                    progress.update(stats.sent, stats.failed)
                    batch, size = [], 0
                batch.append(_Item(line, key, partition))
                size += len(line)
            if batch:
                with interrupts.sending_batch():
                    _send(client, args.stream, batch, stats, interrupts)
    except SluiceError:
        progress.clear()
        if stats.sent:
            stats.summary()  # what was acknowledged before the request that failed
        raise
    except KeyboardInterrupt:   # exit 130, saying how many lines (the first ones, in order) are in
        progress.clear()
        stats.summary()
        raise
    progress.clear()
    stats.summary()
    return EXIT_FAILED if stats.failed else EXIT_OK


# -- get and tail ------------------------------------------------------------------------------

def _record_json(r: Record, **extra: Any) -> str:
    """A record as one JSON line. Its data is `data`, text, when it is UTF-8, else `data_base64`:
    replacement characters would lose the bytes, and `put --jsonl` takes either back."""
    try:
        data = {"data": r.data.decode("utf-8")}
    except UnicodeDecodeError:
        data = {"data_base64": base64.b64encode(r.data).decode("ascii")}
    return json.dumps({**extra, "seq": r.seq, "timestamp_ms": r.timestamp_ms, "partition_key": r.partition_key,
                       **data})


def _cursor_type(args: argparse.Namespace) -> str:
    """--cursor-type, or the one --starting-seq / --timestamp imply; a usage error (exit 2) for an
    option the cursor type would ignore (it was read from TRIM_HORIZON silently)."""
    kind = args.cursor_type or ("AT_SEQUENCE_NUMBER" if args.starting_seq is not None else
                                "AT_TIMESTAMP" if args.timestamp is not None else "TRIM_HORIZON")
    if args.starting_seq is not None and not kind.endswith("_SEQUENCE_NUMBER"):
        args.parser.error(f"--starting-seq is for AT_SEQUENCE_NUMBER or AFTER_SEQUENCE_NUMBER, not {kind}")
    if args.timestamp is not None and kind != "AT_TIMESTAMP":
        args.parser.error(f"--timestamp is for AT_TIMESTAMP, not {kind}")
    return kind


def _get(client: Client, args: argparse.Namespace) -> int:
    cursor = client.get_cursor(args.stream, args.partition, _cursor_type(args), args.starting_seq, args.timestamp)
    shown = 0
    while args.max is None or shown < args.max:
        page = client.get_records(cursor, limit=1000 if args.max is None else min(1000, args.max - shown))
        for r in page.records:
            if args.json:
                print(_record_json(r))
            else:
                _write_line(r.data)
            shown += 1
        cursor = page.next_cursor
        if not page.records:
            break
    return EXIT_OK


TAIL_BACKOFF_S = (0.2, 5.0)   # the first and the longest wait before a tail subscribes again
TAIL_POLL_S = (0.1, 1.0)      # a polled partition: the first and the longest wait after an empty read


def _follow(client: Client, stream: str, partition: int, cursor: str, start: str, out: queue.Queue[tuple],
            stop: threading.Event) -> None:
    """One partition's push subscription, feeding `out`; ends when the channel is closed. Each
    layout (a page's `layout_ms`: the stream's latest scale event) it meets is reported before
    the records that came with it, so the tail of every partition can follow the ones it adds.

    A broker that goes away (a restart, a network cut) does not end it: it subscribes again, after
    the last record it showed (before any, at its first cursor, or at `start` once that cursor is
    no longer valid - a memory store's restart), waiting longer each time up to 5 s; `retrying`
    is reported once per outage.

    A partition the broker refuses a subscription for (TOO_MANY_REQUESTS: a client address holds
    at most --max-subscriptions-per-client, 64 by default, and a stream may have 256 partitions)
    is polled instead: GetRecords without a wait, which holds no slot between reads, waiting
    0.1 s after an empty read and up to 1 s while the partition stays quiet. A tail of a
    100-partition stream ended with exit 1 after the first 64 partitions' records."""
    def put(item: tuple) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)  # bounded: a slow terminal slows the subscription (flow control)
                return
            except queue.Full:
                continue

    layout: int | None = None
    last_seq: int | None = None
    backoff, down = TAIL_BACKOFF_S[0], False

    def show(page: Any) -> None:
        """A page read (pushed or polled): back after an outage, its layout, its records."""
        nonlocal layout, last_seq, backoff, down
        if down:
            put(("back", partition, None))
            backoff, down = TAIL_BACKOFF_S[0], False
        if page.layout_ms != layout:
            layout = page.layout_ms
            put(("layout", partition, layout))
        if page.records:
            last_seq = page.records[-1].seq
            put(("records", partition, page.records))

    polling, fresh, idle = False, False, TAIL_POLL_S[0]   # fresh: the cursor was made for this read
    while not stop.is_set():
        try:
            if polling:
                fresh = not cursor
                if fresh:
                    cursor = client.get_cursor(stream, partition, "AFTER_SEQUENCE_NUMBER", last_seq) \
                        if last_seq is not None else client.get_cursor(stream, partition, start)
                page = client.get_records(cursor, limit=1000)
                cursor = page.next_cursor
                show(page)
                if page.records:
                    idle = TAIL_POLL_S[0]
                else:
                    stop.wait(idle)
                    idle = min(idle * 2, TAIL_POLL_S[1])
                continue
            if last_seq is not None:
                pages = client.subscribe(stream, partition, "AFTER_SEQUENCE_NUMBER", starting_seq=last_seq)
            elif cursor:
                pages = client.subscribe(cursor=cursor)
            else:
                pages = client.subscribe(stream, partition, start)
            for page in pages:
                if stop.is_set():
                    return
                show(page)
            put(("end", partition, None))
            return
        except BrokerUnavailable as exc:
            if not down:
                put(("retrying", partition, exc))
                down = True
            stop.wait(backoff)
            backoff = min(backoff * 2, TAIL_BACKOFF_S[1])
        except Throttled as exc:
            if exc.reason != TOO_MANY_REQUESTS:
                put(("error", partition, exc))
                return
            if polling:   # a read refused by the per-client request limit: a little later
                stop.wait(idle)
                idle = min(idle * 2, TAIL_POLL_S[1])
            else:         # one subscription too many for the broker: this partition is polled
                polling = True
                if last_seq is not None:
                    cursor = ""   # after the last record shown
        except CursorInvalid:
            if polling and not fresh:   # a broker restart (a memory store's): a new cursor at the position
                cursor = ""
                continue
            if last_seq is not None or not cursor:
                put(("error", partition, sys.exc_info()[1]))
                return
            cursor = ""   # its secret changed with the broker's restart: from `start` again
        except Exception as exc:  # the main thread reports it: never a silent thread death
            put(("error", partition, exc))
            return


def _tail(client: Client, args: argparse.Namespace) -> int:
    partitions = [args.partition] if args.partition is not None else _all_partitions(client, args.stream)
    # Cursors first, so "LATEST" means "from when this command started" on every partition.
    cursors = [(p, client.get_cursor(args.stream, p, args.start)) for p in partitions]
    which = f"partition {partitions[0]}" if args.partition is not None else f"{len(partitions)} partition(s)"
    _say(f"tailing {args.stream} ({which}) from {args.start}; Ctrl-C to stop")
    out: queue.Queue[tuple] = queue.Queue(maxsize=max(8, 2 * len(cursors)))
    stop = threading.Event()

    def follow(partition: int, cursor: str, start: str) -> None:
        threading.Thread(target=_follow, args=(client, args.stream, partition, cursor, start, out, stop),
                         daemon=True, name=f"tail-{partition}").start()

    for partition, cursor in cursors:
        follow(partition, cursor, args.start)
    unreachable: set[int] = set()   # partitions whose subscription waits for the broker
    followed = set(partitions)
    layouts: set[int] = set()   # the layouts whose partitions are followed
    shown, live = 0, len(cursors)
    last = time.monotonic()
    try:
        while live:
            wait = 0.5 if args.timeout is None else min(0.5, max(last + args.timeout - time.monotonic(), 0))
            try:
                kind, partition, payload = out.get(timeout=wait)
            except queue.Empty:
                if args.timeout is not None and time.monotonic() - last >= args.timeout:
                    return EXIT_OK  # silence for --timeout seconds
                continue
            if kind == "error":
                if isinstance(payload, SluiceError):
                    raise payload
                _say(f"following {partition} failed: {payload!r}")
                return EXIT_FAILED
            if kind == "end":
                live -= 1
                continue
            if kind == "retrying":
                if not unreachable:
                    _say(f"lost the broker ({payload.reason}: {payload.message}); subscribing again when it is back")
                unreachable.add(partition)
                continue
            if kind == "back":
                unreachable.discard(partition)
                if not unreachable:
                    _say("the broker is back; following again")
                continue
            if kind == "layout":
                # A scale event (or one before the first page): the tail of every partition
                # follows the partitions it added too, from their start - none existed when the
                # tail began, so all their records are new (a partition it closed stays followed).
                if args.partition is None and payload not in layouts:
                    layouts.add(payload)
                    for p in _all_partitions(client, args.stream):
                        if p not in followed:
                            followed.add(p)
                            follow(p, client.get_cursor(args.stream, p, "TRIM_HORIZON"), "TRIM_HORIZON")
                            live += 1
                continue
            for r in payload:
                if args.json:
                    print(_record_json(r, stream=args.stream, partition_id=partition))
                else:
                    _write_line(b"[%d] %s" % (partition, r.data))
                shown += 1
                if args.max is not None and shown >= args.max:
                    sys.stdout.flush()
                    return EXIT_OK
            sys.stdout.flush()
            last = time.monotonic()
        return EXIT_OK
    finally:
        stop.set()  # the caller closes the client, which cancels the subscriptions


# -- streams, apps, checkpoints, lag -----------------------------------------------------------

def _streams(client: Client, args: argparse.Namespace) -> int:
    if args.action == "create":
        client.create_stream(args.name, args.partitions)
    elif args.action == "delete":
        client.delete_stream(args.name)
    elif args.action == "scale":
        was, now = client.update_partition_count(args.name, args.partitions)
        print(f"{args.name}: {was} -> {now} writable partitions")
    elif args.action == "list":
        start = ""
        while True:  # one page holds at most 100 names: follow has_more to the end
            page = client.list_streams(start_after=start)
            for name in page.stream_names:
                print(name)
            if not page.has_more or not page.stream_names:
                break
            start = page.stream_names[-1]
    else:
        after: int | None = None
        while True:  # one page holds at most 100 partitions by default: follow has_more
            desc = client.describe_stream(args.name, start_after_partition=after)
            for p in desc.partitions:
                # a rescaled stream also shows each partition's status and its newest segment's parents
                extra = "" if p.status == "ACTIVE" and not p.segments else f"  {p.status}"
                if p.segments:
                    parents = ",".join(f"{q}<{end}" for q, end in p.segments[-1].parents) or "-"
                    extra += f"  from seq {p.segments[-1].start_seq} after parents {parents}"
                print(f"{p.partition_id}  hash [{p.hash_range_start} : {p.hash_range_end}]  "
                      f"seq [{p.first_seq} : {p.next_seq - 1}]{extra}")
            if not desc.has_more or not desc.partitions:
                break
            after = desc.partitions[-1].partition_id
    return EXIT_OK


def _app_dict(info: AppInfo) -> dict[str, Any]:
    return {"app_name": info.app_name, "app_id": info.app_id, "created_ms": info.created_ms,
            "checkpoint_stream_names": info.checkpoint_stream_names}


def _apps(client: Client, args: argparse.Namespace) -> int:
    if args.action == "create":
        client.create_app(args.name)
    elif args.action == "delete":
        client.delete_app(args.name)
    elif args.action == "describe":
        info = _app_dict(client.describe_app(args.name))
        if args.json:
            print(json.dumps(info))
        else:
            print(f"app_name     {info['app_name']}\napp_id       {info['app_id']}\n"
                  f"created      {_iso(info['created_ms'])} ({info['created_ms']})\n"
                  f"streams      {', '.join(info['checkpoint_stream_names']) or '-'}")
    else:
        start = ""
        while True:  # pages of at most 100 apps: follow has_more_app
            page = client.list_apps(start_after=start, stream_name=args.stream or "")
            for app in page.apps:
                print(json.dumps(_app_dict(app)) if args.json else app.app_name)
            if not page.has_more or not page.apps:
                break
            start = page.apps[-1].app_name
    return EXIT_OK


def _checkpoints(client: Client, args: argparse.Namespace) -> int:
    if args.action == "commit":
        client.commit_checkpoint(args.app, args.stream, args.partition, args.seq, args.metadata)
    elif args.action == "delete":
        client.delete_checkpoint(args.app, args.stream, args.partition)
    else:
        found = client.get_checkpoint(args.app, args.stream, args.partition)
        if args.json:
            print(json.dumps({"app_name": args.app, "stream_name": args.stream, "partition_id": args.partition,
                              "seq": found.seq if found else None, "metadata": found.metadata if found else None}))
        elif found is None:
            print("no checkpoint")
        else:
            print(f"seq       {found.seq}\nmetadata  {found.metadata}")
    return EXIT_OK


def _lag(client: Client, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    try:
        for st in client.consumer_state(args.app, args.stream):
            rows.append({"partition_id": st.partition_id, "checkpoint": st.checkpoint_seq,
                         "earliest": st.first_seq, "latest": st.last_seq, "lag": st.lag})
    except SluiceError as exc:
        if exc.reason != "APP_NO_CHECKPOINT":
            raise
        # The app has committed nothing on this stream yet (the broker checked both exist):
        # every retained record is still to be read.
        _say(f"app {args.app} has not committed a checkpoint on stream {args.stream} yet; "
             f"lag counts every retained record")
        after: int | None = None
        while True:
            desc = client.describe_stream(args.stream, start_after_partition=after)
            for p in desc.partitions:
                first, latest = p.first_seq, p.next_seq - 1
                rows.append({"partition_id": p.partition_id, "checkpoint": None, "earliest": first,
                             "latest": latest, "lag": max(0, latest - first + 1)})
            if not desc.has_more or not desc.partitions:
                break
            after = desc.partitions[-1].partition_id
    total = sum(r["lag"] for r in rows)
    if args.json:
        print(json.dumps({"app_name": args.app, "stream_name": args.stream, "partitions": rows, "total_lag": total}))
        return EXIT_OK
    header = ("PARTITION", "CHECKPOINT", "EARLIEST", "LATEST", "LAG")
    table = [header] + [(str(r["partition_id"]), "-" if r["checkpoint"] is None else str(r["checkpoint"]),
                         str(r["earliest"]), "-" if r["latest"] < 0 else str(r["latest"]), str(r["lag"]))
                        for r in rows]
    table.append(("TOTAL", "", "", "", str(total)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip())
    return EXIT_OK


# -- sources -----------------------------------------------------------------------------------

def _prop_arg(text: str) -> tuple[str, Any]:
    """KEY=VALUE; the value as JSON when it parses as JSON (numbers, booleans, arrays, objects,
    quoted strings), else the text as it is: --prop interval=200ms, --prop max_ack_pending=1024."""
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:   # NaN / Infinity are not JSON: kept as text; so is JSON nested past what json reads
        return key, json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        return key, raw


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _finite(text: str) -> float:
    """1e400 is valid JSON but not a number JSON can carry back: kept as text (--prop), refused
    (--properties)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of a number's range")
    return value


def _properties_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("nested too deeply to be read as JSON") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"template\": \"iot\"}'")
    return value


def _merged(base: dict[str, Any] | None, props: list[tuple[str, Any]] | None) -> dict[str, Any]:
    out = dict(base or {})
    out.update(props or ())
    return out


def _source_dict(info: SourceInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def _when(ms: int) -> str:
    return f"{_iso(ms)} ({ms})" if ms else "-"


def _print_pairs(pairs: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in pairs) + 2
    for key, value in pairs:
        print(f"{key.ljust(width)}{'-' if value in ('', None) else value}")


def _source_pairs(s: SourceInfo) -> list[tuple[str, object]]:
    return [("id", s.source_id), ("name", s.source_name), ("type", s.source_type), ("stream", s.stream_name),
            ("status", s.status), ("message", s.message), ("description", s.description),
            ("properties", json.dumps(s.properties, ensure_ascii=False)), ("started", _when(s.started_ms)),
            ("created", _when(s.created_ms)), ("updated", _when(s.updated_ms))]


def _counter_pairs(s: SourceInfo) -> list[tuple[str, object]]:
    return [("messages_in", s.messages_in), ("rows_written", s.rows_written), ("errors", s.error_count),
            ("last_error", s.last_error), ("last_error_at", _when(s.last_error_ms)),
            ("last_event_at", _when(s.last_event_ms)), ("lag", s.lag)]


def _sendable(args: argparse.Namespace, properties: dict[str, Any]) -> dict[str, Any]:
    """The properties, or a usage error (exit 2) when the wire's JSON cannot carry them (nested
    deeper than json writes: a ValueError traceback)."""
    try:
        properties_json(properties)
    except ValueError as exc:
        args.parser.error(f"--properties / --prop: {exc}")
    return properties


def _sources(client: Client, args: argparse.Namespace) -> int:
    if args.action == "create":
        info = client.create_source(args.name, args.type, args.stream,
                                    _sendable(args, _merged(args.properties, args.prop)), description=args.description)
        print(json.dumps(_source_dict(info)) if args.json else info.source_id)
    elif args.action == "list":
        sources = client.list_sources()
        if args.json:
            for s in sources:
                print(json.dumps(_source_dict(s)))
        elif sources:
            table = [("NAME", "TYPE", "STREAM", "STATUS", "ROWS", "ERRORS", "ID")] + [
                (s.source_name, s.source_type, s.stream_name, s.status, str(s.rows_written), str(s.error_count),
                 s.source_id) for s in sources]
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            for row in table:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    elif args.action == "get":
        info = client.describe_source(args.ref)
        if args.json:
            print(json.dumps(_source_dict(info)))
        else:
            _print_pairs([*_source_pairs(info), *_counter_pairs(info)])
    elif args.action == "update":
        properties = None
        if args.properties is not None or args.prop:
            # --prop alone changes those keys of the stored properties; --properties replaces them
            base = args.properties if args.properties is not None else client.describe_source(args.ref).properties
            properties = _sendable(args, _merged(base, args.prop))
        info = client.update_source(args.ref, source_name=args.name, description=args.description,
                                    stream_name=args.stream, properties=properties)
        if args.json:
            print(json.dumps(_source_dict(info)))
    elif args.action == "delete":
        client.delete_source(args.ref)
    elif args.action == "start":
        client.start_source(args.ref)
    elif args.action == "stop":
        client.stop_source(args.ref)
    else:
        stats = client.source_stats(args.ref)
        if args.json:
            print(json.dumps(dataclasses.asdict(stats)))
            return EXIT_OK
        s = stats.source
        rows = sum(t.rows for t in stats.throughput)
        seconds = (stats.throughput[-1].time_ms - stats.throughput[0].time_ms) // 1000 + 1 if stats.throughput else 0
        rate = f"{rows} rows in {seconds} s ({rows / seconds:,.1f} rows/s)" if seconds else "-"
        _print_pairs([("name", s.source_name), ("status", s.status), ("message", s.message), *_counter_pairs(s),
                      ("throughput", rate)])
        if stats.recent_errors:
            print("recent errors:")
            for e in stats.recent_errors:
                print(f"  {_iso(e.time_ms)}  {e.message}")
    return EXIT_OK


# -- the parser --------------------------------------------------------------------------------

_EPILOG = """\
exit codes: 0 ok, 1 the broker refused the request (or some records failed),
            2 usage error, 3 broker unreachable, 130 interrupted

examples:
  sluice streams create orders --partitions 4
  sluice streams scale orders 8               # writable partitions 0..7 from now on
  sluice put orders lines.txt                 # one record per line
  sluice put orders events.jsonl --jsonl      # {"data": "...", "partition_key": "k"} per line
  sluice get orders 0 --json
  sluice tail orders --from TRIM_HORIZON --max 10
  sluice apps create billing
  sluice checkpoints commit billing orders 0 41
  sluice lag billing orders
  sluice sources create gen --type stream_generator --stream readings --prop template=iot --prop interval=1s
  sluice sources stats gen
"""


_REF_HELP = "the source's id or its name"
_PARTITION_HELP = "partition id, e.g. 0 (shardId-0000000000 is accepted too)"
_CHECKPOINT_ARGS = (("app", "consumer app name"), ("stream", "stream name"))


def _add(sub: Any, name: str, text: str, **kw: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, **kw)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="sluice", description="Command line client for a Sluice broker (gRPC).",
                                     epilog=_EPILOG, formatter_class=fmt)
    parser.add_argument("--target", default=os.environ.get("SLUICE_TARGET", "127.0.0.1:50051"),
                        help="broker gRPC address [env SLUICE_TARGET; default 127.0.0.1:50051]")
    parser.add_argument("--project", default=os.environ.get("SLUICE_PROJECT") or None,
                        help="project (namespace) of streams, apps and sources [env SLUICE_PROJECT; default "
                             "'default', or with --api-key the key's workspace]")
    parser.add_argument("--api-key", default=os.environ.get("SLUICE_API_KEY") or None, metavar="KEY",
                        help="API key for a broker with an auth file, sent as 'authorization: Bearer KEY' "
                             "[env SLUICE_API_KEY, which keeps the key out of the process list]")
    parser.add_argument("--tls-ca", default=os.environ.get("SLUICE_TLS_CA") or None, metavar="FILE",
                        help="connect with TLS, trusting the CA certificate(s) in this PEM file (for a broker "
                             "started with --tls-cert) [env SLUICE_TLS_CA]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    streams = _add(sub, "streams", "create, list, describe, scale or delete streams")
    ssub = streams.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = _add(ssub, "create", "create a stream")
    create.add_argument("name", help="stream name")
    create.add_argument("--partitions", type=_partition_count, default=1, help="number of partitions (default 1)")
    _add(ssub, "list", "list every stream name")
    _add(ssub, "describe", "show each partition's hash range and sequence range") \
        .add_argument("name", help="stream name")
    _add(ssub, "delete", "delete a stream and all its records").add_argument("name", help="stream name")
    scale = _add(ssub, "scale", "change the number of writable partitions (UpdatePartitionCount); a scale-down "
                                "leaves the highest ids DELETED: readable until retention, not writable")
    scale.add_argument("name", help="stream name")
    scale.add_argument("partitions", type=_partition_count, help="the new number of writable partitions")

    put = _add(sub, "put", "send records from a file or stdin, one record per line",
               epilog="Blank lines are skipped. Records go out in batches of 500. The summary "
                      "'sent N records, M failed' (N counts every input record, M those not stored, "
                      "grouped by reason and DIS error code) goes to stderr; exit 1 if any failed.")
    put.set_defaults(parser=put)
    put.add_argument("stream", help="stream name")
    put.add_argument("file", nargs="?", default="-", help="file to read, or - for stdin (the default)")
    put.add_argument("--jsonl", action="store_true",
                     help="each line is a JSON object: data (string, sent as UTF-8) or data_base64 (any bytes, as "
                          "get --json writes data that is not UTF-8) and optional partition_key and partition_id; "
                          "malformed lines are reported with their line number and skipped")
    put.add_argument("--key", type=_partition_key,
                     help="partition key (1-256 characters) for records that name no partition of their own "
                          "(default: spread over partitions)")

    get = _add(sub, "get", "read one partition from a cursor to its current end")
    get.add_argument("stream", help="stream name")
    get.add_argument("partition", type=_partition_arg, help=_PARTITION_HELP)
    get.set_defaults(parser=get)
    get.add_argument("--cursor-type", choices=CURSOR_TYPES,
                     help="where to start (default: TRIM_HORIZON; AT_SEQUENCE_NUMBER with --starting-seq, "
                          "AT_TIMESTAMP with --timestamp)")
    get.add_argument("--starting-seq", "--sequence-number", dest="starting_seq", type=_seq,
                     help="for AT_/AFTER_SEQUENCE_NUMBER")
    get.add_argument("--timestamp", type=_epoch_ms, metavar="MS",
                     help="for AT_TIMESTAMP: milliseconds since the epoch; reads from the first record "
                          "written at or after it")
    get.add_argument("--max", type=_positive_int, help="stop after this many records")
    get.add_argument("--json", action="store_true",
                     help="one JSON object per record: seq, timestamp_ms, partition_key and data (text), or "
                          "data_base64 for data that is not UTF-8")

    tail = _add(sub, "tail", "follow a partition, or every partition of a stream, printing records as they arrive",
                epilog="Human output prefixes each record with [partition id]; records of different "
                       "partitions interleave in arrival order. Without a partition id it follows every "
                       "partition, and those a scale-up adds while it runs, from their start. A broker "
                       "restart does not end it: it subscribes again after the last record shown. Runs until "
                       "Ctrl-C, --max or --timeout.")
    tail.add_argument("stream", help="stream name")
    tail.add_argument("partition", nargs="?", type=_partition_arg, help="one partition id (e.g. 0); default: all")
    tail.add_argument("--from", dest="start", default="LATEST", choices=("TRIM_HORIZON", "LATEST"),
                      help="LATEST (default): only records written from now on; TRIM_HORIZON: everything retained")
    tail.add_argument("--max", type=_positive_int, help="stop after this many records")
    tail.add_argument("--timeout", type=_positive_float, metavar="S", help="stop after S seconds without a record")
    tail.add_argument("--json", action="store_true",
                      help="one JSON object per record: stream, partition_id, seq, timestamp_ms, "
                           "partition_key, data (or data_base64 for data that is not UTF-8)")

    apps = _add(sub, "apps", "create, list, describe or delete consumer apps")
    asub = apps.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add(asub, "create", "create an app (1-200 characters of [A-Za-z0-9_-])").add_argument("name", help="app name")
    alist = _add(asub, "list", "list every app name")
    alist.add_argument("--stream", help="only apps with a checkpoint on this stream")
    alist.add_argument("--json", action="store_true", help="one JSON object per app")
    adesc = _add(asub, "describe", "show an app: id, creation time, streams it has checkpoints on")
    adesc.add_argument("name", help="app name")
    adesc.add_argument("--json", action="store_true", help="the app as one JSON object")
    _add(asub, "delete", "delete an app and all its checkpoints").add_argument("name", help="app name")

    cps = _add(sub, "checkpoints", "commit, get or delete an app's checkpoints (type LAST_READ)")
    csub = cps.add_subparsers(dest="action", required=True, metavar="ACTION")
    commit = _add(csub, "commit", "record that APP processed PARTITION up to and including SEQ")
    for name, text in _CHECKPOINT_ARGS:
        commit.add_argument(name, help=text)
    commit.add_argument("partition", type=_partition_arg, help=_PARTITION_HELP)
    commit.add_argument("seq", type=_seq, help="sequence number of the last record processed")
    commit.add_argument("--metadata", default="", help="free text stored with the checkpoint (<= 1000 chars)")
    cget = _add(csub, "get", "show the committed checkpoint of one partition")
    for name, text in _CHECKPOINT_ARGS:
        cget.add_argument(name, help=text)
    cget.add_argument("partition", type=_partition_arg, help=_PARTITION_HELP)
    cget.add_argument("--json", action="store_true", help="the checkpoint as one JSON object")
    cdel = _add(csub, "delete", "delete one partition's checkpoint, or every partition's")
    cdel.add_argument("app", help="app name")
    cdel.add_argument("stream", help="stream name")
    cdel.add_argument("partition", nargs="?", type=_partition_arg, help="default: every partition of the stream")

    lag = _add(sub, "lag", "per partition: the app's checkpoint, the retained range and the lag")
    lag.add_argument("app", help="app name")
    lag.add_argument("stream", help="stream name")
    lag.add_argument("--json", action="store_true",
                     help="one JSON object: the app, the stream, its partitions and the total lag")

    src = _add(sub, "sources", "create, list, show, update, delete, start or stop the broker's sources",
               epilog="A source is a job of the broker that reads from elsewhere (stream_generator, websocket, "
                      "nats, nats_jetstream) and appends rows to a stream. REF is a source's id or its name.")
    rsub = src.add_subparsers(dest="action", required=True, metavar="ACTION")
    prop_help = ("a property, KEY=VALUE (repeatable); VALUE is read as JSON when it is JSON (1024, true, "
                 "[\"nats://h:4222\"]), else taken as text (iot, 200ms)")
    rcreate = _add(rsub, "create", "create a source and start it; prints its id")
    rcreate.add_argument("name", help="1-64 letters, digits or _, starting with a letter")
    rcreate.add_argument("--type", required=True, help="source type, e.g. stream_generator")
    rcreate.add_argument("--stream", required=True, help="the stream to write to (must exist)")
    rcreate.add_argument("--prop", action="append", type=_prop_arg, metavar="KEY=VALUE", help=prop_help)
    rcreate.add_argument("--properties", type=_properties_arg, metavar="JSON",
                         help="every property as one JSON object (--prop entries are applied on top)")
    rcreate.add_argument("--description", default="")
    rcreate.add_argument("--json", action="store_true", help="print the whole source as JSON")
    rcreate.set_defaults(parser=rcreate)
    _add(rsub, "list", "list the project's sources: name, type, stream, status, rows, errors, id") \
        .add_argument("--json", action="store_true", help="one JSON object per source")
    rget = _add(rsub, "get", "show a source: its definition, status and counters")
    rget.add_argument("ref", metavar="REF", help=_REF_HELP)
    rget.add_argument("--json", action="store_true", help="the source as one JSON object")
    rupdate = _add(rsub, "update", "change a stopped source (stop it first)")
    rupdate.add_argument("ref", metavar="REF", help=_REF_HELP)
    rupdate.add_argument("--name", help="a new name")
    rupdate.add_argument("--description")
    rupdate.add_argument("--stream", help="another target stream")
    rupdate.add_argument("--prop", action="append", type=_prop_arg, metavar="KEY=VALUE",
                         help=prop_help + "; changes those keys of the stored properties")
    rupdate.add_argument("--properties", type=_properties_arg, metavar="JSON",
                         help="replace every property (--prop entries are applied on top)")
    rupdate.add_argument("--json", action="store_true", help="print the updated source as JSON")
    rupdate.set_defaults(parser=rupdate)
    _add(rsub, "delete", "stop and delete a source").add_argument("ref", metavar="REF", help=_REF_HELP)
    _add(rsub, "start", "start a stopped source").add_argument("ref", metavar="REF", help=_REF_HELP)
    _add(rsub, "stop", "stop a source").add_argument("ref", metavar="REF", help=_REF_HELP)
    rstats = _add(rsub, "stats", "a source's counters, throughput and recent errors")
    rstats.add_argument("ref", metavar="REF", help=_REF_HELP)
    rstats.add_argument("--json", action="store_true", help="the counters as one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Text stdout's encoding cannot hold (a Latin-1 locale and a euro sign in a checkpoint's
    # metadata or a source's description) is written as an escape, as Python does on stderr, not
    # a UnicodeEncodeError traceback; records are written as their bytes (_write_line).
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (e.g. `| head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = _not_utf8(list(vars(args).values()))
    if bad is not None:
        parser.error(f"not valid UTF-8 text: {bad!a}")
    if not args.target.strip():
        parser.error("--target is empty: give the broker's host:port")
    try:
        check_target(args.target)
    except ValueError as exc:
        parser.error(f"--target: {exc}")
    if args.command == "put":
        try:
            args.source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
        except OSError as exc:
            args.parser.error(f"cannot open {args.file}: {exc.strerror}")
    commands = {"streams": _streams, "put": _put, "get": _get, "tail": _tail, "apps": _apps,
                "checkpoints": _checkpoints, "lag": _lag, "sources": _sources}
    try:
        client = Client(args.target, project=args.project, api_key=args.api_key, tls_ca=args.tls_ca)
    except OSError as exc:
        parser.error(f"cannot read --tls-ca {args.tls_ca}: {exc.strerror or exc}")
    except ValueError as exc:   # names the option, never the key
        parser.error(str(exc).replace("api_key", "--api-key").replace("tls_ca", f"--tls-ca {args.tls_ca}")
                     .replace("project", "--project"))
    try:
        with client:
            return commands[args.command](client, args)
    except BrokerUnavailable as exc:
        _say(f"cannot reach the broker at {args.target}: {exc.message}{_tls_hint(exc.message, args.tls_ca)}")
        return EXIT_UNREACHABLE
    except SluiceError as exc:
        _say(exc)
        return EXIT_FAILED


def _tls_hint(message: str, tls_ca: str | None) -> str:
    """What a TLS mismatch's grpc message means, said in our options' words ("" for other failures)."""
    if tls_ca is None and "Socket closed" in message:
        return " (if the broker serves TLS, give --tls-ca FILE: the CA that signed its certificate)"
    if tls_ca is not None and "CERTIFICATE_VERIFY_FAILED" in message:
        return f" (--tls-ca {tls_ca} did not sign the broker's certificate, or it names another host)"
    if tls_ca is not None and ("ALPN" in message or "WRONG_VERSION_NUMBER" in message):
        return " (this port does not serve gRPC over TLS: it may be a plaintext broker, which needs no --tls-ca, " \
               "or the HTTP port)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
