"""`sluice`: a small command line over `client.Client`. No wire code of its own.

Exit codes: 0 success, 1 the broker refused (or some records failed), 2 usage error,
3 broker unreachable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, Sequence, TextIO

from client.client import CURSOR_TYPES, Client
from client.errors import BrokerUnavailable, SluiceError

BATCH = 500


def _lines(source: TextIO) -> Iterator[bytes]:
    for line in source:
        line = line.rstrip("\n")
        if line:
            yield line.encode()


def _put(client: Client, args: argparse.Namespace) -> int:
    source = sys.stdin if args.file in (None, "-") else open(args.file, encoding="utf-8")
    sent = failed = 0
    with source:
        batch: list[bytes | tuple[bytes, str]] = []
        for data in _lines(source):
            batch.append((data, args.key) if args.key else data)
            if len(batch) == BATCH:
                results = client.put_records(args.stream, batch)
                sent, failed, batch = sent + len(results), failed + sum(not r.ok for r in results), []
        if batch:
            results = client.put_records(args.stream, batch)
            sent, failed = sent + len(results), failed + sum(not r.ok for r in results)
    print(f"sent {sent} records, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _get(client: Client, args: argparse.Namespace) -> int:
    cursor = client.get_cursor(args.stream, args.partition, args.cursor_type, args.sequence_number)
    shown = 0
    while args.max is None or shown < args.max:
        page = client.get_records(cursor, limit=1000 if args.max is None else min(1000, args.max - shown))
        for r in page.records:
            if args.json:
                print(json.dumps({"sequence_number": r.sequence_number, "timestamp": r.timestamp,
                                  "partition_key": r.partition_key, "data": r.data.decode("utf-8", "replace")}))
            else:
                print(r.data.decode("utf-8", "replace"))
            shown += 1
        cursor = page.next_cursor
        if not page.records:
            break
    return 0


def _streams(client: Client, args: argparse.Namespace) -> int:
    if args.action == "create":
        client.create_stream(args.name, args.partitions)
    elif args.action == "delete":
        client.delete_stream(args.name)
    elif args.action == "list":
        start = ""
        while True:  # one page holds at most 100 names: follow has_more_streams to the end
            page = client.list_streams(start_after=start)
            for name in page.stream_names:
                print(name)
            if not page.has_more_streams or not page.stream_names:
                break
            start = page.stream_names[-1]
    else:
        after = ""
        while True:  # one page holds at most 100 partitions by default: follow has_more_partitions
            desc = client.describe_stream(args.name, start_after_partition=after)
            for p in desc.partitions:
                print(f"{p.partition_id}  hash [{p.hash_range_start} : {p.hash_range_end}]  "
                      f"seq [{p.first_sequence_number} : {p.next_sequence_number - 1}]")
            if not desc.has_more_partitions or not desc.partitions:
                break
            after = desc.partitions[-1].partition_id
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Command line client for a Sluice broker (gRPC).")
    parser.add_argument("--target", default=os.environ.get("SLUICE_TARGET", "127.0.0.1:50051"),
                        help="broker gRPC address [env SLUICE_TARGET; default 127.0.0.1:50051]")
    sub = parser.add_subparsers(dest="command", required=True)
    streams = sub.add_parser("streams", help="create, list, describe or delete streams")
    ssub = streams.add_subparsers(dest="action", required=True)
    create = ssub.add_parser("create", help="create a stream")
    create.add_argument("name")
    create.add_argument("--partitions", type=int, default=1)
    ssub.add_parser("list", help="list stream names")
    for action in ("describe", "delete"):
        ssub.add_parser(action, help=f"{action} a stream").add_argument("name")
    put = sub.add_parser("put", help="send records, one per line, from a file or stdin")
    put.add_argument("stream")
    put.add_argument("file", nargs="?", help="file to read (default: stdin)")
    put.add_argument("--key", help="partition key for every record (default: spread over partitions)")
    get = sub.add_parser("get", help="read a partition from a cursor to its current end")
    get.add_argument("stream")
    get.add_argument("partition", help="partition id, e.g. 0 or shardId-0000000000")
    get.add_argument("--cursor-type", default="TRIM_HORIZON", choices=CURSOR_TYPES)
    get.add_argument("--sequence-number", type=int, help="for AT_/AFTER_SEQUENCE_NUMBER")
    get.add_argument("--max", type=int, help="stop after this many records")
    get.add_argument("--json", action="store_true", help="one JSON object per record")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"streams": _streams, "put": _put, "get": _get}
    try:
        with Client(args.target) as client:
            return commands[args.command](client, args)
    except BrokerUnavailable as exc:
        print(f"sluice: cannot reach the broker at {args.target}: {exc.message}", file=sys.stderr)
        return 3
    except SluiceError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
