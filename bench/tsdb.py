"""`bench/run.py tsdb`: the OpenTSDB door's benchmark (issue 10) - points/s through `POST /api/put`
and the latency of `/api/query` for one series, for Sluice and (`--peers`) VictoriaMetrics and
InfluxDB 1.x on the same workload in the same run.

    put  --points (default 1,000,000) points over 10,000 series: metric m0..m9 x tag host h0..h99 x
         tag dc dc0..dc9. One round is one point of every series at one timestamp (seconds, rounds
         10 s apart, the first a day ago), values floats with 2 decimals from a fixed seed; the points
         in that order in JSON bodies of 500 (compact orjson), every body built before the clock.
         4 producer threads released together, producer p sending bodies p, p+4, ..., each on one
         keep-alive connection: a request is one pre-built bytes object (request line, headers and
         body) written with one sendall, then the answer read (it must be 2xx) before the next.
         points/s, batch latency p50/p99, the client's and the server's CPU seconds; afterwards the
         stored count must equal the points sent.
    q1   one series of those 10,000 (m0{host=h0,dc=dc0}: 100 points at the default size) queried with
         the `sum` aggregator and a `1m-avg` downsample over the put's whole time range, once to warm
         up and then --q1-repeat times back to back on one keep-alive connection; p50/p99 of request to
         last byte. The store holds the put's points meanwhile (1M by default).
    q2   one series holding --q2-points (default 1,000,000) points, one a second, ending where the
         put's points begin (m0{host=dense,dc=dc0}, beside the 1,000 other m0 series), written by the
         same 4 producers in bodies of 500 (not timed: its rate goes to the JSON as fill_rate), then
         the same query over its whole range (16,667 one-minute buckets), --q2-repeat times.

Systems, each a fresh server on a temp dir on disk, one after the other:
- Sluice: `drivers.sluice_broker("wal")` with `--tsdb-workers 2` (`--tsdb-workers N` here; 0: every
  put checked in the broker process): RocksDB, default durability (WAL without fsync; /api/put
  answers once the points are appended); `--durability fsync` (or `wal,fsync`) adds a broker with
  `--fsync`, the like of InfluxDB's fsync per write. Points stored: the sequence ranges of the door's
  stream (`tsdb`, project `default`) through the DIS door: every point is one record.
- VictoriaMetrics (Debian `victoria-metrics`): its OpenTSDB HTTP listener
  (`-opentsdbHTTPListenAddr`, `/api/put`), `-retentionPeriod=100y`, `-search.disableCache` (a
  repeated query is not answered from its rollup result cache), `-search.latencyOffset=1s`. It
  answers a put once the rows are in its in-memory buffers (flushed to disk about every second).
  Stored: `/internal/force_flush`, then `sum(count_over_time({__name__=~"m[0-9]"}[400d]))`. It
  has no /api/query: the query is the MetricsQL equivalent, `/api/v1/query_range` of
  `sum(avg_over_time(m0{host="h0",dc="dc0"}[1m]))` with a 60 s step.
- InfluxDB 1.x (Debian `influxdb`, 1.6): its `[[opentsdb]]` service, which serves the telnet
  protocol and HTTP `/api/put` on one port (it looks at the first bytes of a connection); an HTTP
  put is written to the shard (WAL, fsync on every write: `wal-fsync-delay` 0s, its default) before
  its 204. The database is created first (the HTTP path does not create it). Stored: `SELECT
  count(value)` over the measurements. Query: InfluxQL `SELECT mean(value) ... GROUP BY time(1m)`.

Ratios: Sluice/peer points/s for the put (issue 10's targets: >= 0.3x VictoriaMetrics, >= 1.2x
InfluxDB); for the queries peer p50 / Sluice p50 (> 1: Sluice answered faster). JSON:
bench/results/tsdb-<UTC time>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(BENCH), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import drivers  # noqa: E402
import orjson  # noqa: E402
import workloads as wl  # noqa: E402

SEED = wl.SEED
METRICS, HOSTS, DCS = 10, 100, 10           # 10 x 100 x 10 = 10,000 series
SERIES = METRICS * HOSTS * DCS
BATCH = 500
PRODUCERS = 4
STEP_S = 10                                 # the put's rounds: one point of every series each 10 s
PUT_POINTS = 1_000_000
Q2_POINTS = 1_000_000
Q1_REPEAT = 200
Q2_REPEAT = 20
QUICK = {"points": 50_000, "q2_points": 50_000, "q1_repeat": 20, "q2_repeat": 5}
DOWNSAMPLE = "1m-avg"                       # with the `sum` aggregator
DOWNSAMPLE_S = 60
Q1_TAGS = {"host": "h0", "dc": "dc0"}
Q2_TAGS = {"host": "dense", "dc": "dc0"}
QUERY_METRIC = "m0"
TARGET_VM, TARGET_INFLUX = 0.3, 1.2         # issue 10: Sluice put >= 0.3x VictoriaMetrics, >= 1.2x InfluxDB
CALL_TIMEOUT = 120.0
PEER_NAMES = {"vm": "VictoriaMetrics", "influxdb": "InfluxDB"}
WORKLOADS = ("put", "q1", "q2")
TSDB_WORKERS = 2                            # the broker's --tsdb-workers (bench/run.py tsdb --tsdb-workers)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    """The points' times: the put's rounds from `t0` (a day ago, on the hour), q2's series one point
    a second from `d0` up to `t0`."""
    points: int
    q2_points: int
    t0: int
    d0: int

    @property
    def rounds(self) -> int:
        return -(-self.points // SERIES)

    @property
    def put_end(self) -> int:   # the query's end: one second past the last point
        return self.t0 + (self.rounds - 1) * STEP_S + 1

    @property
    def q2_end(self) -> int:
        return self.d0 + self.q2_points


def make_plan(points: int, q2_points: int, now: float | None = None) -> Plan:
    t0 = int((now or time.time()) - 86_400) // 3600 * 3600
    return Plan(points, q2_points, t0, t0 - q2_points)


def series_list() -> list[tuple[str, dict[str, str]]]:
    return [(f"m{m}", {"host": f"h{h}", "dc": f"dc{d}"}) for m in range(METRICS) for h in range(HOSTS)
            for d in range(DCS)]


def put_bodies(plan: Plan, seed: int = SEED) -> list[bytes]:
    """The put's JSON bodies of BATCH points: round r is one point of every series at t0 + r*STEP_S."""
    rng = random.Random(seed)
    series = series_list()
    bodies = []
    for lo in range(0, plan.points, BATCH):
        batch = []
        for i in range(lo, min(lo + BATCH, plan.points)):
            r, s = divmod(i, SERIES)
            metric, tags = series[s]
            batch.append({"metric": metric, "timestamp": plan.t0 + r * STEP_S,
                          "value": round(rng.random() * 100, 2), "tags": tags})
        bodies.append(orjson.dumps(batch))
    return bodies


def q2_bodies(plan: Plan, seed: int = SEED + 1) -> list[bytes]:
    """q2's series: q2_points points one a second from d0, BATCH a body."""
    rng = random.Random(seed)
    return [orjson.dumps([{"metric": QUERY_METRIC, "timestamp": plan.d0 + i, "value": round(rng.random() * 100, 2),
                           "tags": Q2_TAGS} for i in range(lo, min(lo + BATCH, plan.q2_points))])
            for lo in range(0, plan.q2_points, BATCH)]


@dataclass
class Query:
    """One series, `sum` of a DOWNSAMPLE over [start, end) seconds."""
    name: str
    tags: dict[str, str]
    start: int
    end: int
    points: int          # the series' points in range


# -- a lean HTTP/1.1 client for the puts -------------------------------------------------------

class RawHttp:
    """One keep-alive HTTP/1.1 connection: `exchange(request)` writes a pre-built request (request
    line, headers and body in one bytes object) with one sendall and reads the answer (a
    Content-Length body, a chunked one, or none); returns (status, body)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=CALL_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    @staticmethod
    def request(host: str, port: int, method: str, path: str, body: bytes,
                content_type: str = "application/json") -> bytes:
        return (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length, chunked = 0, False
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, self._take(length) if status not in (204, 304) else b""
        parts: list[bytes] = []
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():   # trailers, then the empty line
                    pass
                return status, b"".join(parts)
            parts.append(self._take(size))
            self._take(2)

    def close(self) -> None:
        self.sock.close()


# -- the systems ----------------------------------------------------------------------------------

class Target(Protocol):
    """One system's OpenTSDB-style door: where puts go, how to count what is stored, how to ask q1/q2."""
    system: str
    door: str
    durability: str
    version: str
    pid: int | None
    host: str
    put_port: int
    put_path: str
    query_port: int

    def stored(self) -> int: ...
    def query_request(self, q: Query) -> tuple[str, str, bytes | None]: ...
    def dps(self, answer: bytes) -> int: ...


def _http(host: str, port: int, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=CALL_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _ok(host: str, port: int, method: str, path: str, body: bytes | None = None) -> bytes:
    status, raw = _http(host, port, method, path, body)
    if not 200 <= status < 300:
        raise RuntimeError(f"{method} {path[:120]}: HTTP {status} {raw[:300]!r}")
    return raw


class SluiceTsdb:
    """Sluice's OpenTSDB door on the broker's HTTP port."""
    system, door = "Sluice", "OpenTSDB HTTP"
    put_path = "/api/put"
    stream, project = "tsdb", "default"       # the door's defaults (--tsdb-stream, --tsdb-project)

    def __init__(self, host: str, port: int, pid: int | None, durability: str = "wal") -> None:
        self.host, self.put_port, self.query_port, self.pid = host, port, port, pid
        self.durability = durability
        self.version = _git_head()

    def stored(self) -> int:
        """Records in the door's stream, from the DIS door's sequence ranges (a point is a record)."""
        status, raw = _http(self.host, self.put_port, "GET",
                            f"/v2/{self.project}/streams/{self.stream}?limit_partitions=1000")
        if status == 404:
            return 0
        if status != 200:
            raise RuntimeError(f"describe {self.stream}: HTTP {status} {raw[:300]!r}")
        total = 0
        for p in orjson.loads(raw)["partitions"]:
            first, last = (int(x) for x in p["sequence_number_range"].strip("[]").split(":"))
            total += max(0, last - first + 1)
        return total

    def query_request(self, q: Query) -> tuple[str, str, bytes | None]:
        return "POST", "/api/query", orjson.dumps({"start": q.start, "end": q.end, "queries": [
            {"metric": QUERY_METRIC, "aggregator": "sum", "downsample": DOWNSAMPLE, "tags": q.tags}]})

    def dps(self, answer: bytes) -> int:
        return sum(len(o["dps"]) for o in orjson.loads(answer))


class VictoriaMetrics:
    system, door = "VictoriaMetrics", "OpenTSDB HTTP"
    durability = "memory buffer (~1 s to disk)"
    put_path = "/api/put"

    def __init__(self, http_port: int, put_port: int, pid: int, version: str) -> None:
        self.host, self.query_port, self.put_port = "127.0.0.1", http_port, put_port
        self.pid, self.version = pid, version

    def stored(self) -> int:
        _ok(self.host, self.query_port, "GET", "/internal/force_flush")
        query = 'sum(count_over_time({__name__=~"m[0-9]"}[400d]))'
        raw = _ok(self.host, self.query_port, "GET", "/api/v1/query?" + urlencode({"query": query,
                                                                                 "time": int(time.time())}))
        result = orjson.loads(raw)["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0

    def query_request(self, q: Query) -> tuple[str, str, bytes | None]:
        sel = ",".join(f'{k}="{v}"' for k, v in q.tags.items())
        query = f"sum(avg_over_time({QUERY_METRIC}{{{sel}}}[{DOWNSAMPLE_S}s]))"
        return "GET", "/api/v1/query_range?" + urlencode({"query": query, "start": q.start, "end": q.end,
                                                          "step": f"{DOWNSAMPLE_S}s"}), None

    def dps(self, answer: bytes) -> int:
        return sum(len(r["values"]) for r in orjson.loads(answer)["data"]["result"])


class InfluxDB:
    system, door = "InfluxDB", "OpenTSDB HTTP"
    durability = "WAL, fsync per write"
    put_path = "/api/put"
    database = "opentsdb"

    def __init__(self, http_port: int, put_port: int, pid: int, version: str) -> None:
        self.host, self.query_port, self.put_port = "127.0.0.1", http_port, put_port
        self.pid, self.version = pid, version

    def influxql(self, q: str) -> Any:
        raw = _ok(self.host, self.query_port, "POST", "/query?" + urlencode({"db": self.database, "q": q}))
        doc = orjson.loads(raw)
        for r in doc.get("results", []):
            if "error" in r:
                raise RuntimeError(f"{q}: {r['error']}")
        return doc

    def stored(self) -> int:
        doc = self.influxql("SELECT count(value) FROM /^m[0-9]$/")
        return sum(int(s["values"][0][1]) for r in doc["results"] for s in r.get("series", []))

    def query_request(self, q: Query) -> tuple[str, str, bytes | None]:
        where = " AND ".join(f"\"{k}\"='{v}'" for k, v in q.tags.items())
        sql = (f'SELECT mean("value") FROM "{QUERY_METRIC}" WHERE {where} AND time >= {q.start}s AND '
               f"time < {q.end}s GROUP BY time({DOWNSAMPLE_S}s) fill(none)")
        return "GET", "/query?" + urlencode({"db": self.database, "epoch": "s", "q": sql}), None

    def dps(self, answer: bytes) -> int:
        return sum(len(s["values"]) for r in orjson.loads(answer)["results"] for s in r.get("series", []))


def _git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip() or "?"
    except OSError:
        return "?"


def _deb_version(package: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip() or "?"
    except OSError:
        return "?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(cmd: list[str], ports: list[int], tmp: Path) -> Iterator[int]:
    """Starts cmd (its output to tmp/log), waits until every port accepts connections, yields its pid;
    stops it after and removes tmp."""
    log = open(tmp / "log", "wb")   # closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        for port in ports:
            while True:
                if proc.poll() is not None:
                    tail = (tmp / "log").read_bytes()[-800:].decode(errors="replace")
                    raise RuntimeError(f"{Path(cmd[0]).name} exited with {proc.returncode}: {tail}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{Path(cmd[0]).name}: nothing listening on {port} after 60 s") from None
                    time.sleep(0.05)
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def victoria_metrics_exe() -> str | None:
    return shutil.which("victoria-metrics")


def influxd_exe() -> str | None:
    return shutil.which("influxd") or shutil.which("influxd", path="/usr/sbin:/usr/local/sbin")


@contextlib.contextmanager
def sluice_server(durability: str = "wal") -> Iterator[SluiceTsdb]:
    """A fresh broker (`--fsync` for fsync, `--tsdb-workers` TSDB_WORKERS) on a temp dir."""
    with drivers.sluice_broker(durability, ("--tsdb-workers", str(TSDB_WORKERS))) as broker:
        assert broker.proc
        yield SluiceTsdb(broker.host, broker.http_port, broker.proc.pid, durability)


@contextlib.contextmanager
def victoria_metrics_server() -> Iterator[VictoriaMetrics]:
    """Debian's `victoria-metrics` as a plain process (not the system service) on a temp dir."""
    exe = victoria_metrics_exe()
    if not exe:
        raise RuntimeError("victoria-metrics not installed (make bench-peers installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-vm-"))
    http_port, put_port = _free_port(), _free_port()
    cmd = [exe, f"-storageDataPath={tmp / 'data'}", f"-httpListenAddr=127.0.0.1:{http_port}",
           f"-opentsdbHTTPListenAddr=127.0.0.1:{put_port}", "-retentionPeriod=100y", "-search.disableCache",
           "-search.latencyOffset=1s", "-loggerLevel=ERROR"]
    with _process(cmd, [http_port, put_port], tmp) as pid:
        for _ in range(100):
            try:
                _ok("127.0.0.1", http_port, "GET", "/health")
                break
            except (OSError, RuntimeError):
                time.sleep(0.1)
        yield VictoriaMetrics(http_port, put_port, pid, _deb_version("victoria-metrics"))


INFLUX_CONFIG = """reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{dir}/meta"
[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
[logging]
  level = "error"
[[opentsdb]]
  enabled = true
  bind-address = "127.0.0.1:{put_port}"
  database = "opentsdb"
  log-point-errors = false
"""


@contextlib.contextmanager
def influxdb_server() -> Iterator[InfluxDB]:
    """Debian's `influxd` (1.x) as a plain process on a generated config and a temp dir; the
    `opentsdb` database created before the first put."""
    exe = influxd_exe()
    if not exe:
        raise RuntimeError("influxd not installed (make bench-peers installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-influxdb-"))
    rpc_port, http_port, put_port = _free_port(), _free_port(), _free_port()
    (tmp / "influxdb.conf").write_text(INFLUX_CONFIG.format(dir=tmp, rpc_port=rpc_port, http_port=http_port,
                                                            put_port=put_port))
    with _process([exe, "-config", str(tmp / "influxdb.conf")], [http_port, put_port], tmp) as pid:
        version = "?"
        for _ in range(100):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
                conn.request("GET", "/ping")
                resp = conn.getresponse()
                resp.read()
                version = resp.getheader("X-Influxdb-Version") or "?"
                conn.close()
                if resp.status == 204:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        influx = InfluxDB(http_port, put_port, pid, version)
        influx.influxql(f"CREATE DATABASE {influx.database}")
        yield influx


SERVERS: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "sluice": sluice_server, "sluice-fsync": lambda: sluice_server("fsync"), "vm": victoria_metrics_server,
    "influxdb": influxdb_server}
ROW_NAMES = {"sluice": (SluiceTsdb.system, SluiceTsdb.door, "wal"),
             "sluice-fsync": (SluiceTsdb.system, SluiceTsdb.door, "fsync"),
             "vm": (VictoriaMetrics.system, VictoriaMetrics.door, VictoriaMetrics.durability),
             "influxdb": (InfluxDB.system, InfluxDB.door, InfluxDB.durability)}


# -- the workloads --------------------------------------------------------------------------------

def _producer(t: Target, bodies: list[bytes]) -> drivers.Producer:
    """A put producer: its pre-built requests, its connection opened now (before the clock)."""
    requests = [RawHttp.request(t.host, t.put_port, "POST", t.put_path, b) for b in bodies]
    conn = RawHttp(t.host, t.put_port)

    def send(request: bytes) -> None:
        status, answer = conn.exchange(request)
        if not 200 <= status < 300:
            raise RuntimeError(f"POST {t.put_path}: HTTP {status} {answer[:300]!r}")

    return drivers.timed_producer(requests, send, conn.close, lambda: 0)


def write(t: Target, bodies: list[bytes]) -> tuple[wl.CpuMeter, list[float], list[str]]:
    """Every body POSTed by PRODUCERS threads released together (producer p: bodies p, p+P, ...)."""
    producers = [_producer(t, bodies[p::PRODUCERS]) for p in range(PRODUCERS)]
    meter = wl.CpuMeter(t.pid).start()
    errors = wl.run_threads([p.run for p in producers])
    meter.stop()
    return meter, [x for p in producers for x in p.latencies], errors


def put(t: Target, bodies: list[bytes], points: int, stored_before: int) -> wl.Row:
    row = wl.Row(t.system, t.door, t.durability, "put")
    meter, lat, errors = write(t, bodies)
    row.records = points if not errors else len(lat) * BATCH
    row.measure(meter)
    row.rate = row.records / meter.wall if meter.wall > 0 else 0.0
    row.p50_ms, row.p99_ms = wl.pct(lat, 0.5) * 1000, wl.pct(lat, 0.99) * 1000
    t0 = time.perf_counter()
    stored = None if errors else t.stored() - stored_before
    row.extra = {"requests": len(lat), "points_per_request": BATCH, "series": SERIES, "producers": PRODUCERS,
                 "body_bytes": sum(len(b) for b in bodies), "stored": stored,
                 "count_seconds": time.perf_counter() - t0, "version": t.version}
    if errors or stored != points:
        row.ok, row.note = False, errors[0] if errors else f"stored={stored}/{points}"
    return row


def query(t: Target, q: Query, repeat: int) -> wl.Row:
    """One warm-up query (its answer checked), then `repeat` more back to back on one keep-alive
    connection, each timed from the request to its last byte."""
    row = wl.Row(t.system, t.door, t.durability, q.name)
    method, path, body = t.query_request(q)
    headers = {"Content-Type": "application/json"} if body else {}
    conn = http.client.HTTPConnection(t.host, t.query_port, timeout=CALL_TIMEOUT)

    def ask() -> bytes:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path.split('?')[0]}: HTTP {resp.status} {raw[:300]!r}")
        return raw

    try:
        first = ask()
        dps = t.dps(first)
        lat = []
        meter = wl.CpuMeter(t.pid).start()
        clock = time.perf_counter
        for _ in range(repeat):
            t0 = clock()
            ask()
            lat.append(clock() - t0)
        meter.stop()
    finally:
        conn.close()
    row.records = q.points
    row.measure(meter)
    row.rate = 0.0
    row.p50_ms, row.p99_ms = wl.pct(lat, 0.5) * 1000, wl.pct(lat, 0.99) * 1000
    row.extra = {"repeat": repeat, "dps_returned": dps, "answer_bytes": len(first), "start": q.start, "end": q.end,
                 "tags": q.tags, "request": f"{method} {path}" + (f" {body.decode()}" if body else ""),
                 "min_ms": min(lat) * 1000, "max_ms": max(lat) * 1000, "version": t.version}
    if dps <= 0:
        row.ok, row.note = False, "the answer holds no data point"
    return row


def run_system(key: str, args: argparse.Namespace, plan: Plan, data: dict[str, list[bytes]]) -> list[wl.Row]:
    """The chosen workloads on one fresh server: put, q1 (over the put's points), q2 (fill, then query)."""
    rows: list[wl.Row] = []
    name = PEER_NAMES[key] if key in PEER_NAMES else "Sluice" + ("" if key == "sluice" else f" ({key[7:]})")
    try:
        with SERVERS[key]() as t:
            stored = 0
            if "put" in args.workloads:
                _say(f"{name}: put {plan.points:,} points over {SERIES:,} series, {BATCH} a request, "
                     f"{PRODUCERS} producers")
                rows.append(put(t, data["put"], plan.points, stored))
                stored += plan.points
                _say("  " + brief(rows[-1]))
            if "q1" in args.workloads and rows and rows[-1].ok:
                q1 = Query("q1 one of 10k series", Q1_TAGS, plan.t0, plan.put_end, plan.rounds)
                _say(f"{name}: q1 {args.q1_repeat} x sum:{DOWNSAMPLE} over {QUERY_METRIC}{Q1_TAGS}")
                rows.append(query(t, q1, args.q1_repeat))
                _say("  " + brief(rows[-1]))
            if "q2" in args.workloads:
                _say(f"{name}: q2 fill: {plan.q2_points:,} points of {QUERY_METRIC}{Q2_TAGS}")
                meter, _, errors = write(t, data["q2"])
                if errors:
                    raise RuntimeError(f"q2 fill: {errors[0]}")
                now_stored = t.stored()
                if now_stored - stored != plan.q2_points:
                    raise RuntimeError(f"q2 fill: stored {now_stored - stored}/{plan.q2_points}")
                q2 = Query("q2 one 1M-point series" if plan.q2_points == 1_000_000 else
                           f"q2 one {plan.q2_points:,}-point series", Q2_TAGS, plan.d0, plan.q2_end, plan.q2_points)
                _say(f"  filled in {meter.wall:.2f} s; q2 {args.q2_repeat} x sum:{DOWNSAMPLE}")
                rows.append(query(t, q2, args.q2_repeat))
                rows[-1].extra.update({"fill_seconds": meter.wall, "fill_rate": plan.q2_points / meter.wall,
                                       "fill_server_cpu_s": meter.server})
                _say("  " + brief(rows[-1]))
    except Exception as exc:   # not installed, would not start, failed: a FAIL row
        rows.append(wl.Row(*ROW_NAMES[key], "error", ok=False, note=f"{type(exc).__name__}: {exc}"[:300]))
        _say(f"{name}: error: {rows[-1].note}")
    return rows


# -- results ------------------------------------------------------------------------------------

def brief(r: wl.Row) -> str:
    if r.workload == "put":
        s = f"{r.rate:,.0f} points/s, batch p50 {r.p50_ms:.1f} ms p99 {r.p99_ms:.1f} ms"
    else:
        s = f"p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms ({r.extra.get('dps_returned')} dps)"
    return (f"{r.workload}: {s} (wall {r.seconds:.2f} s, client cpu {r.client_cpu_s:.2f} s, server cpu "
            f"{r.server_cpu_s:.2f} s)" + ("" if r.ok else f" FAIL {r.note}"))


COLUMNS = ("system", "door", "durability", "workload", "points", "points/s", "p50 ms", "p99 ms", "wall s",
           "client cpu s", "server cpu s", "ok")


def format_table(rows: list[wl.Row]) -> str:
    def num(v: float, fmt: str) -> str:
        return "-" if v != v else format(v, fmt)   # nan
    lines = [COLUMNS]
    for r in rows:
        lines.append((r.system, r.door, r.durability, r.workload, f"{r.records:,}",
                      f"{r.rate:,.0f}" if r.workload == "put" else "-", num(r.p50_ms, ".2f"), num(r.p99_ms, ".2f"),
                      f"{r.seconds:.2f}", num(r.client_cpu_s, ".2f"), num(r.server_cpu_s, ".2f"),
                      "ok" if r.ok else ("FAIL " + r.note)[:70]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = []
    for n, line in enumerate(lines):
        out.append(" | ".join(c.ljust(w) if i < 4 or i == len(COLUMNS) - 1 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def ratios(rows: list[wl.Row]) -> list[tuple[str, str, float, float, float]]:
    """(figure, peer, Sluice, peer, ratio): put points/s Sluice/peer; queries peer p50 / Sluice p50. The
    figure names Sluice's durability when it is not the default (wal). Rows of one pass only."""
    ok = [r for r in rows if r.ok]
    out = []
    for peer in ("VictoriaMetrics", "InfluxDB"):
        for s in (r for r in ok if r.system == "Sluice"):
            p = next((r for r in ok if r.system == peer and r.workload == s.workload), None)
            if not p:
                continue
            sluice = "Sluice" if s.durability == "wal" else f"Sluice {s.durability}"
            if s.workload == "put" and p.rate > 0:
                out.append((f"put points/s ({sluice}/peer)", peer, s.rate, p.rate, s.rate / p.rate))
            elif s.workload != "put" and s.p50_ms > 0:
                out.append((f"{s.workload} p50 ms (peer/{sluice})", peer, s.p50_ms, p.p50_ms, p.p50_ms / s.p50_ms))
    return out


def pass_ratios(rows: list[wl.Row]) -> list[list[tuple[str, str, float, float, float]]]:
    """ratios() of each pass (rows tagged extra["pass"]): each system's figure beside the peers' of
    the same pass, measured within a minute or two of each other."""
    passes = sorted({r.extra.get("pass", 1) for r in rows})
    return [ratios([r for r in rows if r.extra.get("pass", 1) == n]) for n in passes]


def median_ratios(per_pass: list[list[tuple[str, str, float, float, float]]]
                  ) -> list[tuple[str, str, float, float, float]]:
    """Per (figure, peer): the medians of Sluice's and the peer's figures and of the passes' ratios
    (the median of the ratios, not the ratio of the medians: each pass's pair shared its minutes)."""
    by: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for rs in per_pass:
        for figure, peer, s, p, ratio in rs:
            by.setdefault((figure, peer), []).append((s, p, ratio))
    return [(figure, peer, statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs),
             statistics.median(x[2] for x in xs)) for (figure, peer), xs in by.items()]


def format_ratios(rs: list[tuple[str, str, float, float, float]]) -> str:
    lines = ["| figure | peer | Sluice | peer | ratio |", "|---|---|---|---|---|"]
    for figure, peer, s, p, ratio in rs:
        fmt = ",.0f" if "points/s" in figure else ".2f"
        lines.append(f"| {figure} | {peer} | {format(s, fmt)} | {format(p, fmt)} | {ratio:.2f}x |")
    return "\n".join(lines)


def verdicts(rs: list[tuple[str, str, float, float, float]],
             per_pass: list[list[tuple[str, str, float, float, float]]] | None = None) -> list[tuple[str, str, str]]:
    """The targets, judged on `rs` (one pass's ratios, or median_ratios of several: then `per_pass`
    lists every pass's ratio beside the median)."""
    out = []
    for figure, peer, s, p, ratio in rs:
        if figure == "put points/s (Sluice/peer)":   # the default durability
            target = TARGET_VM if peer == "VictoriaMetrics" else TARGET_INFLUX
            measured = f"{s:,.0f} / {p:,.0f} points/s = {ratio:.2f}x"
            if per_pass and len(per_pass) > 1:
                each = [r for rs_ in per_pass for f, pe, _, _, r in rs_ if f == figure and pe == peer]
                met = sum(r >= target for r in each)
                measured = (f"median of {len(each)} passes {ratio:.2f}x (passes: "
                            f"{', '.join(f'{r:.2f}' for r in each)}; {met} of {len(each)} >= {target:g}x); "
                            f"medians {s:,.0f} / {p:,.0f} points/s")
            out.append((f"put >= {target:g}x {peer}", measured, "met" if ratio >= target else "NOT MET"))
    return out


# -- command line -------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py tsdb", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['points']:,} put points, q2 {QUICK['q2_points']:,} points, "
                        f"{QUICK['q1_repeat']}/{QUICK['q2_repeat']} queries")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: put, q1, q2 (default all; "
                                                                    "q1 queries what put wrote)")
    p.add_argument("--points", type=int, help=f"put points (default {PUT_POINTS:,})")
    p.add_argument("--q2-points", type=int, help=f"points of q2's series (default {Q2_POINTS:,})")
    p.add_argument("--q1-repeat", type=int, help=f"timed q1 queries (default {Q1_REPEAT})")
    p.add_argument("--q2-repeat", type=int, help=f"timed q2 queries (default {Q2_REPEAT})")
    p.add_argument("--peers", default="no",
                   help="no (default), yes (VictoriaMetrics and InfluxDB), or comma-separated: vm, influxdb")
    p.add_argument("--durability", default="wal",
                   help="Sluice's: comma-separated wal (the broker's default), fsync (--fsync); a fresh broker each "
                        "(default wal; the verdicts judge wal)")
    p.add_argument("--no-sluice", action="store_true", help="only the peers")
    p.add_argument("--passes", type=int, default=1,
                   help="run the workloads on every system this many times, the systems in turn (Sluice, the peers, "
                        "Sluice, ...), each time on a fresh server; ratios per pass, the verdicts on their medians "
                        "(default 1)")
    p.add_argument("--tsdb-workers", type=int, default=TSDB_WORKERS,
                   help=f"the broker's --tsdb-workers: processes that check and sort put bodies "
                        f"(default {TSDB_WORKERS})")
    p.add_argument("--results-dir", default=str(BENCH / "results"), help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    items = [x.strip().lower() for x in args.workloads.split(",") if x.strip()]
    if not items or set(items) - set(WORKLOADS):
        p.error(f"--workloads takes {', '.join(WORKLOADS)}")
    if "q1" in items and "put" not in items:
        p.error("q1 queries what put wrote: add put")
    args.workloads = items
    peers = args.peers.strip().lower()
    args.peers = [] if peers == "no" else list(PEER_NAMES) if peers == "yes" else \
        [x.strip() for x in peers.split(",") if x.strip()]
    if set(args.peers) - set(PEER_NAMES):
        p.error("--peers takes no, yes, or a list of vm, influxdb")
    args.durability = [x.strip().lower() for x in args.durability.split(",") if x.strip()]
    if not args.durability or set(args.durability) - {"wal", "fsync"}:
        p.error("--durability takes wal, fsync")
    if args.no_sluice and not args.peers:
        p.error("--no-sluice needs --peers")
    for name, default in (("points", PUT_POINTS), ("q2_points", Q2_POINTS), ("q1_repeat", Q1_REPEAT),
                          ("q2_repeat", Q2_REPEAT)):
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else default)
    if min(args.points, args.q2_points, args.q1_repeat, args.q2_repeat, args.passes) < 1:
        p.error("--points, --q2-points, --q1-repeat, --q2-repeat and --passes must be positive")
    if args.points > SERIES * 8000:
        p.error(f"--points: at most {SERIES * 8000:,} (the put's rounds must stay within its day)")
    return args


def main(argv: list[str] | None = None) -> int:
    global TSDB_WORKERS
    args = parse(sys.argv[1:] if argv is None else argv)
    TSDB_WORKERS = args.tsdb_workers
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    plan = make_plan(args.points, args.q2_points)
    _say(f"building the bodies: put {args.points:,} points, q2 {args.q2_points:,} points (seed {SEED})")
    data = {"put": put_bodies(plan) if "put" in args.workloads else [],
            "q2": q2_bodies(plan) if "q2" in args.workloads else []}
    rows: list[wl.Row] = []
    try:
        sluice = [] if args.no_sluice else ["sluice" if d == "wal" else f"sluice-{d}" for d in args.durability]
        for n in range(1, args.passes + 1):
            if args.passes > 1:
                _say(f"pass {n} of {args.passes}")
            for key in sluice + args.peers:
                for row in run_system(key, args, plan, data):
                    row.extra["pass"] = n
                    rows.append(row)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    load_after = os.getloadavg()
    per_pass = pass_ratios(rows)
    rs = per_pass[0] if len(per_pass) == 1 else median_ratios(per_pass)
    checks = verdicts(rs, per_pass)
    print(f"OpenTSDB /api/put: {args.points:,} points over {SERIES:,} series ({METRICS} metrics x {HOSTS} hosts x "
          f"{DCS} dcs), {BATCH} points a request, {PRODUCERS} producers; q1: sum:{DOWNSAMPLE} of one of those series "
          f"({plan.rounds} points) x {args.q1_repeat}; q2: sum:{DOWNSAMPLE} of one series of {args.q2_points:,} "
          f"points x {args.q2_repeat}; Sluice with --tsdb-workers {TSDB_WORKERS}"
          + (f"; {args.passes} passes, the systems in turn" if args.passes > 1 else ""))
    print(f"cpus: {os.cpu_count()}; load average before: {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}, after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
          f"started {started:%Y-%m-%d %H:%M:%S} UTC")
    print(format_table(rows))
    if len(per_pass) > 1:
        for n, pass_rs in enumerate(per_pass, 1):
            print(f"\npass {n}: Sluice / peer (queries: peer p50 / Sluice p50, > 1 = Sluice faster):")
            print(format_ratios(pass_rs))
    if rs:
        print("\nSluice / peer (queries: peer p50 / Sluice p50, > 1 = Sluice faster)"
              + (f", medians of {len(per_pass)} passes:" if len(per_pass) > 1 else ":"))
        print(format_ratios(rs))
    if checks:
        print()
        print(wl.format_verdicts(checks))
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"tsdb-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({
        "started_utc": started.isoformat(), "command": [sys.executable, *sys.argv], "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after, "broker_args": drivers.BROKER_ARGS,
        "config": {"points": args.points, "series": SERIES, "metrics": METRICS, "hosts": HOSTS, "dcs": DCS,
                   "batch": BATCH, "producers": PRODUCERS, "step_s": STEP_S, "seed": SEED, "t0": plan.t0,
                   "q2_points": args.q2_points, "d0": plan.d0, "q1_repeat": args.q1_repeat,
                   "q2_repeat": args.q2_repeat, "downsample": DOWNSAMPLE, "aggregator": "sum",
                   "workloads": args.workloads, "peers": args.peers, "sluice": not args.no_sluice,
                   "durability": [] if args.no_sluice else args.durability, "tsdb_workers": TSDB_WORKERS,
                   "passes": args.passes},
        "rows": [r.as_dict() for r in rows],
        "ratios": [{"figure": f, "peer": p, "sluice": s, "peer_value": v, "ratio": r} for f, p, s, v, r in rs],
        "pass_ratios": [[{"figure": f, "peer": p, "sluice": s, "peer_value": v, "ratio": r} for f, p, s, v, r in x]
                        for x in per_pass],
        "verdicts": [{"target": t, "measured": m, "verdict": v} for t, m, v in checks],
    }, indent=1))
    print(f"\nresults: {path}")
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
