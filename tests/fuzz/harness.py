"""What every fuzz suite shares (issue 11, point 5): a real broker process per module, raw HTTP with
full control of the bytes, the hypothesis budget, and the three checks made after each suite.

The checks, made when a module's broker is torn down (`guarded_broker`), whatever the suite sent:
- the broker is alive and answers a known-good request on each door it was fuzzed through;
- acknowledged data written before the fuzz (`Sentinel`: DIS PutRecords on two partitions) reads
  back exactly, same sequence numbers, same bytes;
- its log holds no unhandled exception: every 5xx the middleware or the gRPC wrapper makes is
  logged "unhandled error", aiohttp logs what escapes a handler, asyncio what escapes a task.
Every response of every example is also checked on the spot: an HTTP status < 500, or no
INTERNAL / UNKNOWN / DEADLINE_EXCEEDED on gRPC, and a socket timeout makes a hang a failure.

Budget: examples are derandomized (the same inputs on every CI run, as the stateful tests do) and
sized so tests/fuzz takes about a minute on two cores (well under the three minutes allowed).
`SLUICE_FUZZ_SCALE=10` multiplies every suite's examples, and `SLUICE_FUZZ_RANDOM=1` draws fresh
ones, for a longer hunt by hand.
Atheris is not used: it is not in the test dependencies, and its coverage guidance instruments the
fuzzing process, not a broker in another process; hypothesis drives every door here.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence
from urllib.parse import quote, urlencode

from hypothesis import HealthCheck, settings

from broker.launcher import BrokerProcess

# The helpers of tests/api (dis_http, the Timeplus error shape), imported under the names the whole
# suite gives them: pytest puts tests/api on sys.path when it collects that folder; this does the
# same when tests/fuzz runs alone.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))

from dis_http import Reply, assert_dis_error

TIMEOUT = 15.0   # seconds for any one exchange: a hang fails the example, never the suite
# Fuzz brokers: no write throttling (a fuzz is not a load test), short body and idle timeouts so a
# body shorter than its Content-Length costs a second, not thirty.
BROKER_ARGS = ("--partition-records-per-s", "0", "--partition-bytes-per-s", "0", "--body-timeout", "1",
               "--idle-timeout", "5", "--retention-interval", "3600")
# What a broker's log says when something escaped a handler (see the module docstring).
LOG_ALARMS = ("unhandled error", "Unhandled exception", "Error handling request", "Traceback (most recent call",
              "Task exception was never retrieved", "Exception in callback", "exception was never retrieved")


def budget(examples: int) -> settings:
    """Hypothesis settings of one fuzz test: `examples` (times SLUICE_FUZZ_SCALE), no deadline (a
    broker round trip is slow and varies), no example database, derandomized unless asked."""
    scale = float(os.environ.get("SLUICE_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(examples * scale)), deadline=None, database=None,
                    derandomize=os.environ.get("SLUICE_FUZZ_RANDOM", "") != "1",
                    suppress_health_check=list(HealthCheck))


# -- raw HTTP ---------------------------------------------------------------------------------------

Header = tuple[str, "str | bytes"]


def http_request(host: str, port: int, method: str, target: str, body: bytes = b"",
                 headers: Sequence[Header] = (), *, content_length: bool = True,
                 timeout: float = TIMEOUT) -> Reply | None:
    """One request on a fresh connection, built byte by byte: the headers exactly as given (values
    may be any bytes), plus `Host`, `Connection: close` and a true Content-Length (unless the
    caller sends its own or `content_length` is False). None when the broker closed the connection
    without an answer. A 200 `text/event-stream` answer is not read (it may never end)."""
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    names = {name.lower() for name, _ in headers}
    for name, value in headers:
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    if content_length and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):   # an early answer (413) is read below
            sock.sendall(raw)
        resp = http.client.HTTPResponse(sock, method=method)
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        if resp.status == 200 and resp.headers.get_content_type() == "text/event-stream":
            return Reply(resp.status, resp.headers, b"")
        try:
            data = resp.read()
        except (http.client.IncompleteRead, ConnectionResetError) as exc:
            raise AssertionError(f"{method} {target}: answer cut short after the status {resp.status}") from exc
        return Reply(resp.status, resp.headers, data)


def target(path: str, query: Mapping[str, str] | Sequence[tuple[str, str]] | None = None) -> str:
    return path + ("?" + urlencode(query, quote_via=quote) if query else "")


def no_5xx(reply: Reply | None, context: object) -> Reply | None:
    """The one assertion every fuzzed HTTP answer gets: below 500, with the broker's request id."""
    if reply is None:   # closed without an answer: allowed only where the caller says so
        return None
    assert reply.status < 500, (context, reply.status, reply.raw[:300])
    assert reply.headers.get("X-Request-Id"), (context, reply.status, dict(reply.headers))
    return reply


def json_body(value: object) -> bytes:
    return json.dumps(value).encode()


# -- data written before a fuzz, read back after it ---------------------------------------------------

Signer = Callable[[str, str, bytes], list[Header]]   # (method, target, body) -> headers to add


def _unsigned(method: str, target: str, body: bytes) -> list[Header]:
    return [("Content-Type", "application/json")]


@dataclass
class Sentinel:
    """Records written through the DIS door before a fuzz and acknowledged: after it, the same
    records must read back at the same sequence numbers. `sign` adds credentials (auth suites)."""

    broker: BrokerProcess
    project: str
    sign: Signer = _unsigned
    partitions: int = 2

    def __post_init__(self) -> None:
        self.stream = f"sentinel-{uuid.uuid4().hex}"   # no fuzz strategy can name it
        self.written: dict[int, list[tuple[str, bytes]]] = {}

    def _call(self, method: str, path: str, body: bytes = b"", query: Mapping[str, str] | None = None) -> Reply:
        t = target(f"/v2/{self.project}{path}", query)
        reply = http_request(self.broker.host, self.broker.http_port, method, t, body, self.sign(method, t, body))
        assert reply is not None, (method, t)
        return reply

    def write(self) -> Sentinel:
        created = self._call("POST", "/streams", json_body({"stream_name": self.stream,
                                                            "partition_count": self.partitions}))
        assert created.status == 201, created.raw
        payloads = [b"", b"\x00\xff binary", "ünïcödé".encode(), os.urandom(512), b"{\"a\": 1}"] * 4
        records = [{"data": base64.b64encode(p).decode(), "partition_id": str(i % self.partitions)}
                   for i, p in enumerate(payloads)]
        reply = self._call("POST", "/records", json_body({"stream_name": self.stream, "records": records}))
        assert reply.status == 200 and reply.json["failed_record_count"] == 0, reply.raw[:300]
        for payload, result in zip(payloads, reply.json["records"]):
            partition = int(result["partition_id"].removeprefix("shardId-"))
            self.written.setdefault(partition, []).append((result["sequence_number"], payload))
        return self

    def check(self) -> None:
        for partition, expected in self.written.items():
            cursor = self._call("GET", "/cursors", query={"stream-name": self.stream, "partition-id": str(partition),
                                                          "cursor-type": "TRIM_HORIZON"})
            assert cursor.status == 200, cursor.raw
            page = self._call("GET", "/records", query={"partition-cursor": cursor.json["partition_cursor"]})
            assert page.status == 200, page.raw[:300]
            got = [(r["sequence_number"], base64.b64decode(r["data"])) for r in page.json["records"]]
            assert got == expected, f"partition {partition}: acknowledged records changed by the fuzz"


def log_alarms(broker: BrokerProcess) -> list[str]:
    """The log lines that say something escaped a handler, each with the 40 lines after it."""
    lines = broker.stderr_lines
    hits = [i for i, line in enumerate(lines) if any(alarm in line for alarm in LOG_ALARMS)]
    return ["".join(lines[i:i + 40]) for i in hits]


@contextlib.contextmanager
def guarded_broker(data_dir: Path, *args: str, project: str = "fuzz", sign: Signer = _unsigned,
                   alive: Callable[[BrokerProcess], None] | None = None) -> Iterator[BrokerProcess]:
    """A broker started with BROKER_ARGS + `args`, a Sentinel written in `project`, and after the
    `with` body: alive (`alive(broker)` if given, for the door's own known-good request), the
    sentinel intact, the log clean, a graceful stop."""
    proc = BrokerProcess(data_dir, *BROKER_ARGS, *args).start()
    try:
        sentinel = Sentinel(proc, project, sign).write()
        yield proc
        assert proc.proc is not None and proc.proc.poll() is None, "the broker died during the fuzz"
        sentinel.check()
        if alive is not None:
            alive(proc)
        alarms = log_alarms(proc)
        assert not alarms, "the broker logged unhandled errors during the fuzz:\n" + "\n".join(alarms[:3])
        assert proc.stop(30) == 0, "the broker did not stop cleanly after the fuzz"
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.stop(15)
        proc.kill()


__all__ = ["TIMEOUT", "BROKER_ARGS", "Reply", "assert_dis_error", "budget", "http_request", "target", "no_5xx",
           "json_body", "Sentinel", "guarded_broker", "log_alarms"]
