"""The `sluice` console script, run as a real subprocess against a real broker."""
from __future__ import annotations

import base64
import functools
import json
import os
import pty
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc
import pytest

from client import Checkpoint, Client
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "sluice"
# The installed console script when there is one (the venv), else the module it points at.
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "client.cli"]


def sluice(*args: str, target: str | None = None, stdin: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*COMMAND, *(["--target", target] if target else []), *args]
    full_env = {k: v for k, v in os.environ.items() if k != "SLUICE_TARGET"}
    full_env.update(env or {})
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT, env=full_env)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cli(broker):  # type: ignore[no-untyped-def]
    def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
        return sluice(*args, target=broker.grpc_target, **kw)
    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout[-500:], result.stderr[-2000:])
    return result.stdout


def test_the_console_script_is_installed():
    assert _SCRIPT.exists(), f"{_SCRIPT} missing: `pip install -e .` installs the sluice console script"
    out = ok(sluice("--help"))
    for command in ("streams", "put", "get", "--target", "SLUICE_TARGET"):
        assert command in out


def test_streams_create_list_describe_delete(cli, stream_name):
    assert ok(cli("streams", "create", stream_name, "--partitions", "3")) == ""
    assert stream_name in ok(cli("streams", "list")).splitlines()

    lines = ok(cli("streams", "describe", stream_name)).splitlines()
    assert len(lines) == 3
    assert [line.split()[0] for line in lines] == ["0", "1", "2"]
    assert lines[0].split("hash [")[1].startswith("0 : ")
    assert "9223372036854775807]" in lines[2]
    assert all("seq [0 : -1]" in line for line in lines), lines  # empty partitions

    again = cli("streams", "create", stream_name)
    assert again.returncode == 1
    assert "DIS.4307" in again.stderr and "already exists" in again.stderr

    assert ok(cli("streams", "delete", stream_name)) == ""
    assert stream_name not in ok(cli("streams", "list")).splitlines()
    gone = cli("streams", "describe", stream_name)
    assert gone.returncode == 1
    assert "DIS.4301" in gone.stderr and stream_name in gone.stderr


def test_streams_scale_up_and_down(cli, stream_name):
    ok(cli("streams", "create", stream_name, "--partitions", "2"))
    assert ok(cli("streams", "scale", stream_name, "3")) == f"{stream_name}: 2 -> 3 writable partitions\n"
    lines = ok(cli("streams", "describe", stream_name)).splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2"]
    assert all("ACTIVE  from seq 0 after parents" in line for line in lines), lines
    assert lines[1].endswith("after parents 0<0") and lines[2].endswith("after parents 1<0")
    assert ok(cli("streams", "scale", stream_name, "1")) == f"{stream_name}: 3 -> 1 writable partitions\n"
    lines = ok(cli("streams", "describe", stream_name)).splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2"]
    assert "9223372036854775807]" in lines[0] and "ACTIVE" in lines[0]
    assert "DELETED" in lines[1] and "DELETED" in lines[2]
    refused = cli("put", stream_name, "-", "--jsonl", stdin='{"data": "x", "partition_id": 2}\n')
    assert refused.returncode == 1 and "PARTITION_NOT_WRITABLE (DIS.4319)" in refused.stderr
    bad = cli("streams", "scale", stream_name, "0")   # never a partition count: a usage error, as -1
    assert bad.returncode == 2 and "usage: sluice" in bad.stderr, bad.stderr


def test_put_a_file_and_get_it_back(cli, stream_name, tmp_path):
    ok(cli("streams", "create", stream_name, "--partitions", "1"))
    lines = [f"line {i} ✓ {'x' * (i % 7)}" for i in range(1234)]  # more than two client batches of 500
    source = tmp_path / "records.txt"
    source.write_text("\n".join(lines[:600]) + "\n\n" + "\n".join(lines[600:]) + "\n", encoding="utf-8")

    put = cli("put", stream_name, str(source))
    assert put.returncode == 0, put.stderr
    assert "sent 1234 records, 0 failed" in put.stderr  # the blank line is not a record

    assert ok(cli("get", stream_name, "0")).splitlines() == lines
    assert ok(cli("get", stream_name, "shardId-0000000000", "--max", "10")).splitlines() == lines[:10]
    assert ok(cli("get", stream_name, "0", "--cursor-type", "AT_SEQUENCE_NUMBER", "--sequence-number", "1200")) \
        .splitlines() == lines[1200:]
    assert ok(cli("get", stream_name, "0", "--cursor-type", "AFTER_SEQUENCE_NUMBER", "--sequence-number", "1230")) \
        .splitlines() == lines[1231:]
    assert ok(cli("get", stream_name, "0", "--cursor-type", "LATEST")) == ""
    # --starting-seq alone means AT_SEQUENCE_NUMBER (it was ignored: a read from TRIM_HORIZON)
    assert ok(cli("get", stream_name, "0", "--starting-seq", "1232")).splitlines() == lines[1232:]

    described = ok(cli("streams", "describe", stream_name))
    assert "seq [0 : 1233]" in described


def test_get_and_tail_write_each_record_as_its_bytes(broker, stream_name, tmp_path):
    """put reads lines as bytes, any bytes; get and tail printed each record decoded with
    replacement characters, so a line that is not UTF-8 came back as U+FFFD (put then get did not
    give the file back), and under a stdout that cannot encode a character (PYTHONIOENCODING=ascii,
    a Latin-1 locale) a record with one ended the command in a UnicodeEncodeError traceback."""
    ok(sluice("streams", "create", stream_name, "--partitions", "1", target=broker.grpc_target))
    lines = [b"caf\xc3\xa9 \xe2\x82\xac", b"\xff\xfe binary \x00", b"plain"]
    source = tmp_path / "records.bin"
    source.write_bytes(b"\n".join(lines) + b"\n")
    ok(sluice("put", stream_name, str(source), target=broker.grpc_target))
    env = {k: v for k, v in os.environ.items() if k != "SLUICE_TARGET"}
    env["PYTHONIOENCODING"] = "ascii"
    for args, want in ((("get", stream_name, "0"), lines),
                       (("tail", stream_name, "0", "--from", "TRIM_HORIZON", "--max", "3"),
                        [b"[0] " + line for line in lines])):
        got = subprocess.run([*COMMAND, "--target", broker.grpc_target, *args], capture_output=True, timeout=60,
                             cwd=ROOT, env=env)
        assert got.returncode == 0, got.stderr[-2000:]
        assert got.stdout.split(b"\n")[:-1] == want


def test_json_lines_carry_any_bytes_back_to_put(broker, stream_name, tmp_path):
    """get --json wrote data that is not UTF-8 with replacement characters (U+FFFD): the bytes were
    lost, and put --jsonl of that output stored other records. Such data is `data_base64` now,
    UTF-8 data stays `data`, and put --jsonl takes either: get --json, then put --jsonl into
    another stream, stores the same bytes."""
    copy = stream_name + "-copy"
    for name in (stream_name, copy):
        ok(sluice("streams", "create", name, "--partitions", "1", target=broker.grpc_target))
    lines = [b"caf\xc3\xa9", b"\xff\xfe binary \x00\x80", b"plain"]
    source = tmp_path / "records.bin"
    source.write_bytes(b"\n".join(lines) + b"\n")
    ok(sluice("put", stream_name, str(source), target=broker.grpc_target))
    exported = ok(sluice("get", stream_name, "0", "--json", target=broker.grpc_target))
    rows = [json.loads(line) for line in exported.splitlines()]
    assert [set(r) & {"data", "data_base64"} for r in rows] == [{"data"}, {"data_base64"}, {"data"}]
    assert rows[0]["data"] == "café" and base64.b64decode(rows[1]["data_base64"]) == lines[1]
    tailed = ok(sluice("tail", stream_name, "0", "--from", "TRIM_HORIZON", "--max", "3", "--json",
                       target=broker.grpc_target))
    assert [json.loads(line).get("data_base64") for line in tailed.splitlines()] == [None, rows[1]["data_base64"],
                                                                                     None]
    ok(sluice("put", copy, "-", "--jsonl", stdin=exported, target=broker.grpc_target))
    got = subprocess.run([*COMMAND, "--target", broker.grpc_target, "get", copy, "0"], capture_output=True,
                         timeout=60, cwd=ROOT)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.split(b"\n")[:-1] == lines
    # what put --jsonl refuses of it, each line with its reason; the good line still goes in
    bad = [json.dumps({"data": "x", "data_base64": "eA=="}), json.dumps({"data_base64": "not base64!"}),
           json.dumps({"data_base64": 7}), json.dumps({"data_base64": "eQ=="})]
    put = sluice("put", copy, "-", "--jsonl", stdin="\n".join(bad) + "\n", target=broker.grpc_target)
    assert put.returncode == 1 and "sent 4 records, 3 failed" in put.stderr, put.stderr
    for line, why in ((1, "give 'data' or 'data_base64', not both"), (2, "'data_base64' is not valid base64"),
                      (3, "'data_base64' must be a string")):
        assert f"line {line}: {why}" in put.stderr, put.stderr
    assert ok(sluice("get", copy, "0", "--starting-seq", "3", target=broker.grpc_target)) == "y\n"


def test_put_retries_throttled_records_in_order(start_broker, tmp_path):
    """A partition's write limit (here 2,000 records/s) refuses records with THROTTLED, which
    client/errors.py marks retriable: the CLI counted them failed at once (48,270 of 80,000 lines
    at the default limit, the gRPC probe). They are sent again now, and every line lands in order."""
    broker = start_broker("--partition-records-per-s", "2000")
    ok(sluice("streams", "create", "throttled", "--partitions", "1", target=broker.grpc_target))
    lines = [f"line {i}" for i in range(6_000)]
    source = tmp_path / "lines.txt"
    source.write_text("\n".join(lines) + "\n")
    put = sluice("put", "throttled", str(source), target=broker.grpc_target)
    assert put.returncode == 0 and "sent 6000 records, 0 failed" in put.stderr, put.stderr
    assert ok(sluice("get", "throttled", "0", target=broker.grpc_target)).splitlines() == lines


def test_get_json(cli, stream_name, tmp_path):
    ok(cli("streams", "create", stream_name, "--partitions", "2"))
    put = cli("put", stream_name, "-", "--key", "same-key", stdin="alpha\nbeta\n{\"quoted\": 1}\n")
    assert put.returncode == 0 and "sent 3 records, 0 failed" in put.stderr
    found = []
    for p in ("0", "1"):
        found += [json.loads(line) for line in ok(cli("get", stream_name, p, "--json")).splitlines()]
    assert [r["data"] for r in found] == ["alpha", "beta", '{"quoted": 1}']  # one key: one partition, in order
    assert [r["seq"] for r in found] == [0, 1, 2]
    assert all(r["partition_key"] == "same-key" for r in found)
    assert all(isinstance(r["timestamp_ms"], int) and r["timestamp_ms"] > 1_600_000_000_000 for r in found)


def test_put_from_stdin_spreads_without_key(cli, stream_name):
    ok(cli("streams", "create", stream_name, "--partitions", "3"))
    put = cli("put", stream_name, stdin="".join(f"r{i}\n" for i in range(30)))
    assert put.returncode == 0 and "sent 30 records, 0 failed" in put.stderr
    got = []
    for p in range(3):
        part = ok(cli("get", stream_name, str(p))).splitlines()
        assert part, f"partition {p} got nothing: records without a key are spread"
        got += part
    assert sorted(got) == sorted(f"r{i}" for i in range(30))


def test_put_with_the_longest_key_the_broker_takes_keeps_one_partition(cli, stream_name):
    from broker.core.limits import Limits
    from client.cli import PARTITION_KEY_MAX_CHARS
    assert PARTITION_KEY_MAX_CHARS == Limits().max_partition_key_chars   # the CLI checks the broker's limit
    ok(cli("streams", "create", stream_name, "--partitions", "3"))
    put = cli("put", stream_name, "--key", "\u00e9" * PARTITION_KEY_MAX_CHARS,
              stdin="".join(f"r{i}\n" for i in range(20)))
    assert put.returncode == 0 and "sent 20 records, 0 failed" in put.stderr, put.stderr
    parts = [ok(cli("get", stream_name, str(p))).splitlines() for p in range(3)]
    assert sorted(map(len, parts)) == [0, 0, 20] and [f"r{i}" for i in range(20)] in parts


def test_failed_records_exit_1(cli, stream_name, tmp_path):
    ok(cli("streams", "create", stream_name))
    source = tmp_path / "big.txt"
    source.write_text("small\n" + "b" * (1024 * 1024 + 10) + "\nalso small\n", encoding="utf-8")
    put = cli("put", stream_name, str(source))
    assert put.returncode == 1
    assert "sent 3 records, 1 failed" in put.stderr
    assert ok(cli("get", stream_name, "0")).splitlines() == ["small", "also small"]


def test_unknown_stream_exit_1(cli, stream_name, tmp_path):
    source = tmp_path / "one.txt"
    source.write_text("x\n")
    for args in (("get", stream_name, "0"), ("put", stream_name, str(source)), ("streams", "describe", stream_name),
                 ("streams", "delete", stream_name)):
        result = cli(*args)
        assert result.returncode == 1, (args, result.returncode, result.stderr)
        assert f"Stream [{stream_name}] does not exist" in result.stderr, result.stderr
        assert "DIS.4301" in result.stderr
        assert "Traceback" not in result.stderr


def test_refusals_exit_1_with_the_dis_code(cli, stream_name):
    ok(cli("streams", "create", stream_name, "--partitions", "2"))
    bad_partition = cli("get", stream_name, "7")
    assert bad_partition.returncode == 1 and "DIS.4302" in bad_partition.stderr
    bad_seq = cli("get", stream_name, "0", "--cursor-type", "AT_SEQUENCE_NUMBER", "--sequence-number", "5")
    assert bad_seq.returncode == 1 and "DIS.4224" in bad_seq.stderr
    bad_name = cli("streams", "create", "no spaces allowed")
    assert bad_name.returncode == 1 and "DIS.4200" in bad_name.stderr


@pytest.mark.parametrize("args", [
    ("streams", "list"),
    ("streams", "create", "anything"),
    ("get", "anything", "0"),
    ("put", "anything", "-"),
])
def test_unreachable_broker_exit_3(args):
    port = closed_port()
    result = sluice(*args, target=f"127.0.0.1:{port}", stdin="x\n")
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert f"cannot reach the broker at 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_target_port_out_of_range_is_a_usage_error(broker):
    # gRPC takes a port modulo 65536: "--target 127.0.0.1:<port + 65536>" talked to the broker on <port>
    port = int(broker.grpc_target.rsplit(":", 1)[1])
    for target in (f"127.0.0.1:{port + 65536}", "127.0.0.1:0", f"[::1]:{port + 65536}",
                   "127.0.0.1:" + "9" * 5000):   # more digits than int() takes: a traceback
        result = sluice("streams", "list", target=target)
        assert result.returncode == 2 and "port" in result.stderr and "1..65535" in result.stderr, \
            (target[:100], result.returncode, result.stderr[-500:])
        assert len(result.stderr) < 2000 and "Traceback" not in result.stderr
    ok(sluice("streams", "list", target=broker.grpc_target))


def test_target_from_environment(broker, stream_name):
    result = sluice("streams", "create", stream_name, env={"SLUICE_TARGET": broker.grpc_target})
    assert result.returncode == 0, result.stderr
    channel = grpc.insecure_channel(broker.grpc_target)
    try:
        stub = sluice_pb2_grpc.SluiceStub(channel)
        desc = stub.DescribeStream(pb.DescribeStreamRequest(stream_name=stream_name), timeout=10)
        assert desc.stream.partition_count == 1  # the default
    finally:
        channel.close()
    unreachable = sluice("streams", "list", env={"SLUICE_TARGET": f"127.0.0.1:{closed_port()}"})
    assert unreachable.returncode == 3


@pytest.mark.parametrize("args", [(), ("streams",), ("get", "only-stream"), ("get", "s", "0", "--cursor-type", "NOPE"),
                                  ("streams", "create", "s", "--partitions", "many"),
                                  # an option the cursor type would ignore
                                  ("get", "s", "0", "--cursor-type", "LATEST", "--starting-seq", "1"),
                                  ("get", "s", "0", "--starting-seq", "1", "--timestamp", "5")])
def test_usage_errors_exit_2(args):
    result = sluice(*args, target=f"127.0.0.1:{closed_port()}")
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "usage: sluice" in result.stderr


@pytest.mark.parametrize("args", [
    ("streams", "create", "s", "--partitions", "-1"),
    ("streams", "create", "s", "--partitions", "99999999999999999999"),
    ("streams", "scale", "s", "99999999999"),
    ("checkpoints", "commit", "a", "s", "0", "99999999999999999999"),
    ("get", "s", "0", "--cursor-type", "AT_SEQUENCE_NUMBER", "--starting-seq", "99999999999999999999999"),
    ("get", "s", "0", "--cursor-type", "AT_TIMESTAMP", "--timestamp", "-5"),
    ("get", "s", "0", "--max", "-1"),
    ("streams", "create", b"a\xff"),                       # bytes that are not UTF-8 (a lone surrogate)
    ("put", "s", "--key", b"\xff"),
    ("put", "s", "--key", "k" * 257),                      # past the broker's partition key limit: every
    ("put", "s", "--key", ""),                             # record would fail; empty is no key at all
    ("checkpoints", "commit", "a", "s", "0", "1", "--metadata", b"\xfe"),
    ("sources", "create", "n", "--type", "x", "--stream", "s", "--properties", '{"a": "\\udc00"}'),
    ("--target", "", "streams", "list"),
    ("--project", "\u00fc", "streams", "list"),             # not printable ASCII: no gRPC metadata
    ("--project", "a\nb", "streams", "list"),
])
def test_values_the_wire_cannot_carry_are_usage_errors(args):
    """Numbers past the proto field's range and text that is not UTF-8 (or not metadata-safe)
    are refused before any call: a usage error naming the argument, never a traceback."""
    result = sluice(*args, target=None if "--target" in args else f"127.0.0.1:{closed_port()}", stdin="x\n")
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_get_at_timestamp_reads_from_the_first_record_at_or_after_it(cli, stream_name):
    ok(cli("streams", "create", stream_name))
    before = str(int(time.time() * 1000) - 1000)   # within the retention window: older is TIMESTAMP_EXPIRED
    ok(cli("put", stream_name, "-", stdin="one\ntwo\n"))
    assert ok(cli("get", stream_name, "0", "--cursor-type", "AT_TIMESTAMP", "--timestamp", before)).split() == \
        ["one", "two"]
    future = str(int(time.time() * 1000) + 3_600_000)
    assert ok(cli("get", stream_name, "0", "--cursor-type", "AT_TIMESTAMP", "--timestamp", future)) == ""


def test_describe_shows_every_partition_not_just_one_page(cli, stream_name):
    """More partitions than one DescribeStream page (100) holds."""
    ok(cli("streams", "create", stream_name, "--partitions", "150"))
    lines = ok(cli("streams", "describe", stream_name)).splitlines()
    assert [line.split()[0] for line in lines] == [str(i) for i in range(150)]
    assert "9223372036854775807]" in lines[-1]


def test_list_shows_every_stream_not_just_one_page(start_broker):
    """More streams than one ListStreams page (100) holds: `streams list` must page through them."""
    own = start_broker()
    channel = grpc.insecure_channel(own.grpc_target)
    try:
        stub = sluice_pb2_grpc.SluiceStub(channel)
        names = [f"s{i:03d}" for i in range(123)]
        for name in names:
            stub.CreateStream(pb.CreateStreamRequest(stream_name=name, partition_count=1), timeout=10)
    finally:
        channel.close()
    assert ok(sluice("streams", "list", target=own.grpc_target)).splitlines() == names


# -- put --jsonl, tail, apps, checkpoints, lag ---------------------------------------------------

def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def tail_json(result: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in ok(result).splitlines()]


class Background:
    """A `sluice` command running while the test does other things. stdout goes to a file,
    stderr is read line by line so the test can wait for a line (bounded, never a sleep)."""

    def __init__(self, tmp_path: Path, target: str, *args: str) -> None:
        self.out_path = tmp_path / f"bg-{uuid.uuid4().hex[:6]}.out"
        self._out = open(self.out_path, "w", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k != "SLUICE_TARGET"}
        self.proc = subprocess.Popen([*COMMAND, "--target", target, *args], stdout=self._out,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.err: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr
        for line in self.proc.stderr:
            self.err.append(line)
            self._lines.put(line)

    def wait_for_stderr(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text in self._lines.get(timeout=max(deadline - time.monotonic(), 0.01)):
                    return
            except queue.Empty:
                break
        raise AssertionError(f"{text!r} not on stderr within {timeout}s: {''.join(self.err)!r}")

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.stop()
        return code, self.out_path.read_text(encoding="utf-8"), "".join(self.err)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)  # stderr fully read
        assert self.proc.stderr
        self.proc.stderr.close()
        self._out.close()


@pytest.fixture
def client(broker):  # type: ignore[no-untyped-def]
    """For setting things up and checking them quickly; the commands under test run as processes."""
    with Client(broker.grpc_target) as c:
        yield c


@pytest.fixture
def background(broker, tmp_path):  # type: ignore[no-untyped-def]
    started: list[Background] = []

    def start(*args: str) -> Background:
        bg = Background(tmp_path, broker.grpc_target, *args)
        started.append(bg)
        return bg
    yield start
    for bg in started:
        bg.stop()


def in_parallel(run, calls):  # type: ignore[no-untyped-def]
    """Independent invocations at once (each is a process start): results in the order of `calls`."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda args: run(*args), calls))


def test_help_everywhere():
    top = ok(sluice("--help"))
    for command in ("streams", "put", "get", "tail", "apps", "checkpoints", "lag", "exit codes"):
        assert command in top
    calls = [("put",), ("tail",), ("lag",), ("apps", "list"), ("checkpoints", "commit")]
    helps = dict(zip(calls, in_parallel(sluice, [(*args, "--help") for args in calls])))
    for args, result in helps.items():
        assert ok(result).startswith(f"usage: sluice {' '.join(args)}"), result.stdout[:200]
    assert "--jsonl" in helps[("put",)].stdout and "partition_key" in helps[("put",)].stdout
    for option in ("--from", "--max", "--timeout", "--json", "TRIM_HORIZON", "LATEST"):
        assert option in helps[("tail",)].stdout
    assert "--metadata" in helps[("checkpoints", "commit")].stdout


def test_put_jsonl_reports_malformed_lines_and_groups_failures(cli, stream_name, tmp_path):
    ok(cli("streams", "create", stream_name, "--partitions", "3"))
    source = _write_lines(tmp_path / "records.jsonl", [
        json.dumps({"data": "keyed ✓", "partition_key": "k1", "partition_id": "0"}),
        '{"data": "unterminated',                                    # line 2: not JSON
        json.dumps({"data": "to one", "partition_id": "1"}),
        json.dumps({"data": 42}),                                    # line 4: data is not a string
        "",                                                          # blank: skipped, not a record
        json.dumps({"data": "to two", "partition_id": 2}),
        json.dumps(["not", "an", "object"]),                         # line 7
        json.dumps({"data": "no such partition", "partition_id": "9"}),  # refused by the broker
        json.dumps({"data": "also one", "partition_id": "shardId-0000000001", "partition_key": "kk"}),
        '{"data": "lone surrogate key", "partition_key": "\\udc00"}',  # line 10: not UTF-8 encodable
        "[" * 5000,                                                  # line 11: deeper than json reads (it
    ])                                                               # was a RecursionError traceback)
    put = cli("put", stream_name, str(source), "--jsonl")
    assert put.returncode == 1, put.stderr
    err = put.stderr
    assert "sent 10 records, 6 failed" in err
    for line in (2, 4, 7, 10, 11):
        assert f"line {line}:" in err, err
    assert "line 10: 'partition_key' is not encodable as UTF-8" in err
    assert "line 1:" not in err and "line 3:" not in err and "line 8:" not in err
    assert "malformed input: 5" in err
    assert "PARTITION_NOT_FOUND (DIS.4302): 1" in err and "Partition [9] does not exist" in err
    assert "Traceback" not in err

    ones = tail_json(cli("tail", stream_name, "1", "--from", "TRIM_HORIZON", "--max", "2", "--json"))
    assert [(r["data"], r["partition_key"], r["seq"]) for r in ones] == \
        [("to one", None, 0), ("also one", "kk", 1)]
    assert all(r["partition_id"] == 1 and r["stream"] == stream_name for r in ones)
    everything = tail_json(cli("tail", stream_name, "--from", "TRIM_HORIZON", "--max", "4", "--json"))
    assert sorted(r["data"] for r in everything) == sorted(["keyed ✓", "to one", "to two", "also one"])
    assert {r["data"]: r["partition_id"] for r in everything}["to two"] == 2
    keyed = next(r for r in everything if r["data"] == "keyed ✓")
    assert keyed["partition_key"] == "k1"
    assert set(keyed) == {"stream", "partition_id", "seq", "timestamp_ms", "partition_key", "data"}
    assert isinstance(keyed["timestamp_ms"], int) and keyed["timestamp_ms"] > 1_600_000_000_000


def test_put_jsonl_all_good_exits_0(cli, stream_name):
    ok(cli("streams", "create", stream_name, "--partitions", "2"))
    lines = "".join(json.dumps({"data": f"v{i}", "partition_id": str(i % 2)}) + "\r\n" for i in range(700))
    put = cli("put", stream_name, "-", "--jsonl", stdin=lines)  # more than one batch of 500
    assert put.returncode == 0 and "sent 700 records, 0 failed" in put.stderr, put.stderr
    assert ok(cli("get", stream_name, "1")).splitlines() == [f"v{i}" for i in range(1, 700, 2)]


def test_put_batches_by_size_too(cli, stream_name, tmp_path):
    """Ten 900 KB records are 9 MB: more than one request may carry (5 MiB), fewer than 500."""
    ok(cli("streams", "create", stream_name))
    big = [f"{i}" + "x" * 900_000 for i in range(10)]
    put = cli("put", stream_name, str(_write_lines(tmp_path / "big.txt", big)))
    assert put.returncode == 0 and "sent 10 records, 0 failed" in put.stderr, put.stderr
    assert ok(cli("get", stream_name, "0")).splitlines() == big


def test_put_shows_progress_only_on_a_terminal(broker, stream_name):
    ok(sluice("streams", "create", stream_name, target=broker.grpc_target))
    lines = "".join(f"r{i}\n" for i in range(1500)).encode()
    main, child = pty.openpty()
    try:
        proc = subprocess.run([*COMMAND, "--target", broker.grpc_target, "put", stream_name], input=lines,
                              stdout=subprocess.PIPE, stderr=child, timeout=60, cwd=ROOT)
        os.close(child)
        child = -1
        seen = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child side is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if child >= 0:
            os.close(child)
        os.close(main)
    assert proc.returncode == 0
    text = seen.decode()
    assert "records sent" in text and "rec/s" in text, text  # the progress line
    assert "sent 1500 records, 0 failed" in text
    piped = sluice("put", stream_name, target=broker.grpc_target, stdin="one\n")
    assert piped.returncode == 0 and "rec/s" not in piped.stderr and "\r" not in piped.stderr


def test_tail_human_output_prefixes_the_partition(cli, stream_name):
    ok(cli("streams", "create", stream_name, "--partitions", "3"))
    ok(cli("put", stream_name, stdin="".join(f"line {i}\n" for i in range(12))))
    lines = ok(cli("tail", stream_name, "--from", "TRIM_HORIZON", "--max", "12")).splitlines()
    assert len(lines) == 12
    by_partition: dict[str, list[str]] = {}
    for line in lines:
        prefix, _, data = line.partition("] ")
        assert prefix in ("[0", "[1", "[2"), line
        by_partition.setdefault(prefix[1:], []).append(data)
    assert sorted(by_partition) == ["0", "1", "2"]
    for partition, data in by_partition.items():  # each partition in its own write order
        assert data == ok(cli("get", stream_name, partition)).splitlines()
    # the DIS spelling of a partition id is accepted on input
    one = ok(cli("tail", stream_name, "shardId-0000000002", "--from", "TRIM_HORIZON", "--max", "2")).splitlines()
    assert one == [f"[2] {d}" for d in by_partition["2"][:2]]


def test_tail_timeout_ends_after_silence(cli, client, stream_name):
    client.create_stream(stream_name, 2)
    client.put_records(stream_name, [(b"a", "k"), (b"b", "k")])
    began = time.monotonic()
    old, new = in_parallel(cli, [("tail", stream_name, "--from", "TRIM_HORIZON", "--timeout", "0.6", "--json"),
                                 ("tail", stream_name, "0", "--timeout", "0.6")])
    elapsed = time.monotonic() - began
    assert [r["data"] for r in tail_json(old)] == ["a", "b"]
    assert ok(new) == ""  # LATEST: nothing new came
    assert 0.55 <= elapsed < 8, elapsed


def test_tail_latest_sees_records_put_by_another_process(cli, background, stream_name):
    ok(cli("streams", "create", stream_name, "--partitions", "3"))
    ok(cli("put", stream_name, stdin="old 1\nold 2\nold 3\n"))      # before the tail: not shown
    tail = background("tail", stream_name, "--json", "--max", "4", "--timeout", "20")
    tail.wait_for_stderr("tailing")                                 # cursors are taken: LATEST is fixed
    ok(cli("put", stream_name, stdin="new 1\nnew 2\nnew 3\nnew 4\n"))
    code, out, err = tail.finish()
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["data"] for r in got) == ["new 1", "new 2", "new 3", "new 4"]
    assert {r["partition_id"] for r in got} <= {0, 1, 2}
    assert "Traceback" not in err


def test_tail_one_partition_latest(cli, background, stream_name):
    ok(cli("streams", "create", stream_name, "--partitions", "2"))
    tail = background("tail", stream_name, "1", "--json", "--max", "2", "--timeout", "20")
    tail.wait_for_stderr("tailing")
    ok(cli("put", stream_name, "--jsonl", stdin="".join(
        json.dumps({"data": f"p{i % 2}-{i}", "partition_id": str(i % 2)}) + "\n" for i in range(6))))
    code, out, err = tail.finish()
    assert code == 0, err
    assert [(r["partition_id"], r["data"], r["seq"]) for r in map(json.loads, out.splitlines())] == \
        [(1, "p1-1", 0), (1, "p1-3", 1)]


def test_tail_of_every_partition_follows_the_partitions_a_scale_up_adds(cli, background, stream_name):
    ok(cli("streams", "create", stream_name, "--partitions", "1"))
    tail = background("tail", stream_name, "--json", "--max", "3", "--timeout", "8")
    tail.wait_for_stderr("tailing")                                 # following partition 0 only
    ok(cli("streams", "scale", stream_name, "3"))
    # the new partitions' records first: they were written before the tail heard of the scale
    ok(cli("put", stream_name, "--jsonl", stdin="".join(
        json.dumps({"data": f"p{p}", "partition_id": str(p)}) + "\n" for p in (1, 2, 0))))
    code, out, err = tail.finish()
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert sorted((r["partition_id"], r["data"], r["seq"]) for r in got) == [(0, "p0", 0), (1, "p1", 0), (2, "p2", 0)]


def test_tail_of_more_partitions_than_the_brokers_subscriptions_per_client(start_broker, stream_name):
    """A tail of every partition opened one Subscribe per partition, and the broker takes at most
    --max-subscriptions-per-client (64 by default; a stream may have 256 partitions): a tail of a
    100-partition stream printed what the first 64 had and ended with exit 1, TOO_MANY_REQUESTS.
    Partitions past the limit are now read by polling."""
    broker = start_broker("--max-subscriptions-per-client", "2")
    run = functools.partial(sluice, target=broker.grpc_target)
    ok(run("streams", "create", stream_name, "--partitions", "5"))
    ok(run("put", stream_name, "--jsonl", stdin="".join(
        json.dumps({"data": f"p{p}-{i}", "partition_id": str(p)}) + "\n" for p in range(5) for i in range(3))))
    out = ok(run("tail", stream_name, "--from", "TRIM_HORIZON", "--max", "15", "--timeout", "20"))
    assert sorted(out.splitlines()) == sorted(f"[{p}] p{p}-{i}" for p in range(5) for i in range(3))


@pytest.mark.parametrize("kill", [False, True])
def test_tail_rides_out_a_broker_restart(start_broker, tmp_path, stream_name, kill):  # type: ignore[no-untyped-def]
    """The tail ended with exit 3 when its broker restarted (the consumer probe); the Python
    consumers reconnect. Now it subscribes again after the last record it showed: none twice."""
    data = tmp_path / "restarted"
    first = start_broker(data_dir=data)
    ok(sluice("streams", "create", stream_name, "--partitions", "2", target=first.grpc_target))
    ok(sluice("put", stream_name, "--jsonl", target=first.grpc_target, stdin="".join(
        json.dumps({"data": f"a{i}", "partition_id": str(i % 2)}) + "\n" for i in range(4))))
    tail = Background(tmp_path, first.grpc_target, "tail", stream_name, "--from", "TRIM_HORIZON", "--json",
                      "--max", "8", "--timeout", "60")
    try:
        tail.wait_for_stderr("tailing")
        if kill:
            first.proc.kill()
            first.proc.wait(10)
        else:
            first.stop(15)
        tail.wait_for_stderr("lost the broker")
        second = start_broker("--grpc-port", str(first.grpc_port), data_dir=data)
        ok(sluice("put", stream_name, "--jsonl", target=second.grpc_target, stdin="".join(
            json.dumps({"data": f"b{i}", "partition_id": str(i % 2)}) + "\n" for i in range(4))))
        code, out, err = tail.finish(timeout=60)
    finally:
        tail.stop()
    assert code == 0, err
    got = sorted((r["partition_id"], r["seq"], r["data"]) for r in map(json.loads, out.splitlines()))
    assert got == [(0, 0, "a0"), (0, 1, "a2"), (0, 2, "b0"), (0, 3, "b2"),
                   (1, 0, "a1"), (1, 1, "a3"), (1, 2, "b1"), (1, 3, "b3")], err
    assert "Traceback" not in err

def test_tail_ctrl_c_exits_130_quietly(background, stream_name, cli):
    ok(cli("streams", "create", stream_name, "--partitions", "2"))
    tail = background("tail", stream_name)
    tail.wait_for_stderr("tailing")
    began = time.monotonic()
    tail.proc.send_signal(signal.SIGINT)
    code, out, err = tail.finish(timeout=10)
    assert code == 130, err
    assert time.monotonic() - began < 5
    assert out == "" and "Traceback" not in err and "KeyboardInterrupt" not in err


def _put_interrupted(target: str, stream: str, client: Client, held: Callable[[int], bool]) -> tuple[int, bytes]:
    """`sluice put` of 501 lines (the 501st sends the first 500), Ctrl-C once the partition's
    next sequence number satisfies `held` (bounded by a count of looks, not by a time): its exit
    code and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "SLUICE_TARGET"}
    proc = subprocess.Popen([*COMMAND, "--target", target, "put", stream], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"".join(b"line %d\n" % i for i in range(501)))
        proc.stdin.flush()
        for _ in range(600):
            if held(client.describe_stream(stream).partitions[0].next_seq):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_put_ctrl_c_says_what_was_sent(broker, client, stream_name):
    """Ctrl-C ended put with exit 130 and not a word: how many lines the broker had acknowledged
    (the first N, in order: where to go on from) was not said, as it is when put stops on an
    error."""
    client.create_stream(stream_name, 1)
    code, err = _put_interrupted(broker.grpc_target, stream_name, client, lambda n: n == 500)
    assert code == 130, err
    assert b"sent 500 records, 0 failed" in err and b"Traceback" not in err, err


def test_put_ctrl_c_while_a_batch_is_in_flight_says_what_the_broker_holds(start_broker):
    """Ctrl-C raised at once, in the request or half way through counting its answer: put said
    fewer records than the broker held (sent 139 of 500 stored, the test above under load), and
    going on from there stores the rest twice. Now it waits for the batch in flight, counts it and
    ends: here a throttled partition keeps the batch in its retries when Ctrl-C comes (the first
    try is in, the rest of the batch waits for tokens)."""
    broker = start_broker("--partition-records-per-s", "100")
    with Client(broker.grpc_target) as client:
        client.create_stream("slow", 1)
        code, err = _put_interrupted(broker.grpc_target, "slow", client, lambda n: n > 0)
        held = client.describe_stream("slow").partitions[0].next_seq
    assert code == 130, err
    assert b"waiting for the answer to the batch in flight" in err and b"Traceback" not in err, err
    assert 0 < held < 500 and f"sent {held} records, 0 failed".encode() in err, (held, err)


def test_tail_ends_with_exit_1_when_the_stream_is_deleted(background, stream_name, cli):
    ok(cli("streams", "create", stream_name, "--partitions", "2"))
    tail = background("tail", stream_name, "--timeout", "20")
    tail.wait_for_stderr("tailing")
    began = time.monotonic()
    ok(cli("streams", "delete", stream_name))
    code, _, err = tail.finish()
    assert code == 1, err
    assert time.monotonic() - began < 8  # the broker ends the subscriptions at once
    assert "DIS.4301" in err and "Traceback" not in err


def test_apps_commands(cli, client, stream_name):
    app = f"app-{uuid.uuid4().hex[:10]}"
    assert ok(cli("apps", "create", app)) == ""
    again, listed, described, as_json = in_parallel(cli, [
        ("apps", "create", app), ("apps", "list"), ("apps", "describe", app), ("apps", "describe", app, "--json")])
    assert again.returncode == 1 and "DIS.4330" in again.stderr and app in again.stderr
    assert app in ok(listed).splitlines()
    assert app in ok(described) and "streams      -" in described.stdout
    info = json.loads(ok(as_json))
    assert info["app_name"] == app and info["app_id"] and info["checkpoint_stream_names"] == []
    assert abs(info["created_ms"] - time.time() * 1000) < 60_000

    client.create_stream(stream_name, 1)
    client.put_records(stream_name, [b"x"])
    client.commit_checkpoint(app, stream_name, 0, 0)
    as_json, names, listed = in_parallel(cli, [("apps", "describe", app, "--json"),
                                               ("apps", "list", "--stream", stream_name),
                                               ("apps", "list", "--stream", stream_name, "--json")])
    assert json.loads(ok(as_json))["checkpoint_stream_names"] == [stream_name]
    assert ok(names).splitlines() == [app]
    assert [(a["app_name"], a["app_id"]) for a in map(json.loads, ok(listed).splitlines())] == [(app, info["app_id"])]

    assert ok(cli("apps", "delete", app)) == ""
    listed, *refused = in_parallel(cli, [("apps", "list"), ("apps", "describe", app), ("apps", "delete", app),
                                         ("apps", "create", "no spaces")])
    assert app not in ok(listed).splitlines()
    for result, code in zip(refused, ("DIS.4332", "DIS.4332", "DIS.4200")):
        assert result.returncode == 1 and code in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_apps_list_pages_through_everything(start_broker):
    own = start_broker("--store", "memory")
    names = [f"app-{i:03d}" for i in range(105)]  # more than one page of 100
    with Client(own.grpc_target) as client:
        for name in reversed(names):
            client.create_app(name)
    assert ok(sluice("apps", "list", target=own.grpc_target)).splitlines() == names


def test_text_a_stdout_cannot_encode_is_escaped_not_a_traceback(cli, client, stream_name):
    """Free text the broker keeps (a checkpoint's metadata, a source's description) printed by
    the human formats ended the command in a UnicodeEncodeError traceback when stdout's encoding
    could not hold a character (PYTHONIOENCODING=ascii, a Latin-1 locale and a euro sign)."""
    app = f"app-{uuid.uuid4().hex[:10]}"
    client.create_app(app)
    client.create_stream(stream_name, 1)
    client.put_records(stream_name, [b"x"], partition_id=0)
    ok(cli("checkpoints", "commit", app, stream_name, "0", "0", "--metadata", "caf\u00e9 \u20ac"))
    source = f"s{uuid.uuid4().hex[:10]}"
    ok(cli("sources", "create", source, "--type", "stream_generator", "--stream", stream_name, "--prop",
           "template=iot", "--prop", "interval=1h", "--description", "Temp\u00e9rature"))
    try:
        for args, shown in ((("checkpoints", "get", app, stream_name, "0"), "metadata  caf\\xe9 \\u20ac"),
                            (("sources", "get", source), "Temp\\xe9rature")):
            out = ok(cli(*args, env={"PYTHONIOENCODING": "ascii"}))
            assert shown in out, out
    finally:
        ok(cli("sources", "delete", source))


def test_checkpoints_commands(cli, client, stream_name):
    app = f"app-{uuid.uuid4().hex[:10]}"
    client.create_app(app)
    client.create_stream(stream_name, 2)
    for p in (0, 1):
        client.put_records(stream_name, [b"%d" % i for i in range(5)], partition_id=p)  # 0..4 in each

    assert ok(cli("checkpoints", "commit", app, stream_name, "0", "3", "--metadata", "batch 7")) == ""
    human, as_json, none, none_json, *refused = in_parallel(cli, [
        ("checkpoints", "get", app, stream_name, "0"),
        ("checkpoints", "get", app, stream_name, "shardId-0000000000", "--json"),
        ("checkpoints", "get", app, stream_name, "1"),
        ("checkpoints", "get", app, stream_name, "1", "--json"),
        ("checkpoints", "commit", app, stream_name, "1", "5"),                       # 1 past the end
        ("checkpoints", "commit", app, stream_name, "1", "0", "--metadata", "m" * 1001),
        ("checkpoints", "get", "no-such-app", stream_name, "0"),
        ("checkpoints", "delete", app, stream_name + "x")])
    assert ok(human).split() == ["seq", "3", "metadata", "batch", "7"]
    assert json.loads(ok(as_json)) == {"app_name": app, "stream_name": stream_name, "partition_id": 0, "seq": 3,
                                       "metadata": "batch 7"}
    assert ok(none).strip() == "no checkpoint"
    assert json.loads(ok(none_json))["seq"] is None
    for result, code in zip(refused, ("DIS.4224", "DIS.4200", "DIS.4332", "DIS.4301")):
        assert result.returncode == 1 and code in result.stderr, (code, result.stderr)
        assert "Traceback" not in result.stderr
    assert client.get_checkpoint(app, stream_name, 1) is None  # nothing refused was stored

    client.commit_checkpoint(app, stream_name, 1, 4)
    assert ok(cli("checkpoints", "delete", app, stream_name, "0")) == ""
    assert client.get_checkpoint(app, stream_name, 0) is None
    assert client.get_checkpoint(app, stream_name, 1) == Checkpoint(4, "")
    assert ok(cli("checkpoints", "delete", app, stream_name)) == ""   # every partition
    assert client.get_checkpoint(app, stream_name, 1) is None


def _lag_table(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    assert lines[0].split() == ["PARTITION", "CHECKPOINT", "EARLIEST", "LATEST", "LAG"], lines
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_lag_matches_what_was_committed(cli, client, stream_name):
    app, fresh = f"app-{uuid.uuid4().hex[:10]}", f"app-{uuid.uuid4().hex[:10]}"
    client.create_app(app)
    client.create_app(fresh)
    client.create_stream(stream_name, 3)
    client.put_records(stream_name, [b"r"] * 7, partition_id=0)
    client.put_records(stream_name, [b"r"] * 4, partition_id=1)   # partition 2 stays empty
    ok(cli("checkpoints", "commit", app, stream_name, "0", "2"))
    ok(cli("checkpoints", "commit", app, stream_name, "1", "3"))

    human, as_json = in_parallel(cli, [("lag", app, stream_name), ("lag", app, stream_name, "--json")])
    assert _lag_table(ok(human)) == {"0": ["2", "0", "6", "4"],
                                     "1": ["3", "0", "3", "0"],
                                     "2": ["-", "0", "-", "0"],
                                     "TOTAL": ["4"]}
    data = json.loads(ok(as_json))
    assert (data["app_name"], data["stream_name"], data["total_lag"]) == (app, stream_name, 4)
    assert [(p["partition_id"], p["checkpoint"], p["earliest"], p["latest"], p["lag"]) for p in data["partitions"]] \
        == [(0, 2, 0, 6, 4), (1, 3, 0, 3, 0), (2, None, 0, -1, 0)]

    # lag follows new writes; a partition without a checkpoint counts every record
    client.put_records(stream_name, [b"z"], partition_id=2)
    client.delete_checkpoint(app, stream_name, 0)
    human, never, *refused = in_parallel(cli, [
        ("lag", app, stream_name), ("lag", fresh, stream_name, "--json"),
        ("lag", "no-such-app", stream_name), ("lag", app, stream_name + "x")])
    table = _lag_table(ok(human))
    assert table["0"] == ["-", "0", "6", "7"]
    assert table["2"] == ["-", "0", "0", "1"]
    assert table["TOTAL"] == ["8"]
    # an app that never committed on the stream (APP_NO_CHECKPOINT, DIS.4375): everything retained is lag
    assert never.returncode == 0 and "has not committed" in never.stderr
    assert json.loads(never.stdout)["total_lag"] == 7 + 4 + 1
    for result, code in zip(refused, ("DIS.4332", "DIS.4301")):
        assert result.returncode == 1 and code in result.stderr and "Traceback" not in result.stderr


def test_unknown_stream_or_app_in_new_commands_exit_1(cli, client, stream_name):
    calls = [(("tail", stream_name), "DIS.4301"), (("tail", stream_name, "0"), "DIS.4301"),
             (("apps", "describe", "no-such-app-q"), "DIS.4332")]
    for (args, code), result in zip(calls, in_parallel(cli, [args for args, _ in calls])):
        assert result.returncode == 1, (args, result.returncode, result.stderr)
        assert code in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    client.create_stream(stream_name, 2)
    bad = cli("tail", stream_name, "5")
    assert bad.returncode == 1 and "DIS.4302" in bad.stderr


def test_unreachable_broker_exit_3_for_new_commands():
    port = closed_port()
    calls = [("tail", "anything"), ("tail", "anything", "0", "--from", "TRIM_HORIZON"), ("apps", "list"),
             ("checkpoints", "get", "a", "s", "0"), ("lag", "a", "s"), ("put", "anything", "-", "--jsonl")]
    began = time.monotonic()
    results = in_parallel(lambda *a: sluice(*a, target=f"127.0.0.1:{port}", stdin='{"data": "x"}\n'), calls)
    assert time.monotonic() - began < 20
    for args, result in zip(calls, results):
        assert result.returncode == 3, (args, result.returncode, result.stderr)
        assert f"cannot reach the broker at 127.0.0.1:{port}" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_usage_errors_of_new_commands_exit_2():
    calls = [("tail", "s", "--max", "0"), ("tail", "s", "--timeout", "-1"), ("tail", "s", "--from", "AT_TIMESTAMP"),
             ("apps",), ("checkpoints", "commit", "a", "s", "0", "not-a-number"), ("lag", "only-app"),
             ("put", "s", "/no/such/file"), ("get", "s", "shard-1"), ("tail", "s", "-1"),
             ("checkpoints", "get", "a", "s", "zz")]
    target = f"127.0.0.1:{closed_port()}"
    for args, result in zip(calls, in_parallel(lambda *a: sluice(*a, target=target), calls)):
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert "usage: sluice" in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_project_option_and_environment(cli, stream_name):
    one, two = f"pa-{stream_name}", f"pb-{stream_name}"
    ok(cli("--project", one, "streams", "create", stream_name, "--partitions", "2"))
    ok(cli("--project", one, "put", stream_name, stdin="in one\n"))
    # the same name in another project (from the environment) is another stream
    ok(cli("streams", "create", stream_name, "--partitions", "3", env={"SLUICE_PROJECT": two}))
    assert len(ok(cli("streams", "describe", stream_name, env={"SLUICE_PROJECT": two})).splitlines()) == 3
    assert ok(cli("--project", one, "streams", "list")).splitlines() == [stream_name]
    got = [ok(cli("--project", one, "get", stream_name, p)).splitlines() for p in ("0", "1")]
    assert sorted(got) == [[], ["in one"]]
    # the flag wins over the environment; the default project has no such stream
    assert ok(cli("--project", one, "streams", "list", env={"SLUICE_PROJECT": two})).splitlines() == [stream_name]
    assert len(ok(cli("--project", one, "streams", "describe", stream_name,
                      env={"SLUICE_PROJECT": two})).splitlines()) == 2
    missing = cli("streams", "describe", stream_name)
    assert missing.returncode == 1 and "DIS.4301" in missing.stderr
    bad = cli("--project", "no spaces", "streams", "list")
    assert bad.returncode == 1 and "DIS.4200" in bad.stderr and "Traceback" not in bad.stderr
