"""The `sluice` console script, run as a real subprocess against a real broker."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

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
    assert [line.split()[0] for line in lines] == [f"shardId-{i:010d}" for i in range(3)]
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

    described = ok(cli("streams", "describe", stream_name))
    assert "seq [0 : 1233]" in described


def test_get_json(cli, stream_name, tmp_path):
    ok(cli("streams", "create", stream_name, "--partitions", "2"))
    put = cli("put", stream_name, "-", "--key", "same-key", stdin="alpha\nbeta\n{\"quoted\": 1}\n")
    assert put.returncode == 0 and "sent 3 records, 0 failed" in put.stderr
    found = []
    for p in ("0", "1"):
        found += [json.loads(line) for line in ok(cli("get", stream_name, p, "--json")).splitlines()]
    assert [r["data"] for r in found] == ["alpha", "beta", '{"quoted": 1}']  # one key: one partition, in order
    assert [r["sequence_number"] for r in found] == [0, 1, 2]
    assert all(r["partition_key"] == "same-key" for r in found)
    assert all(isinstance(r["timestamp"], int) and r["timestamp"] > 1_600_000_000_000 for r in found)


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
                                  ("streams", "create", "s", "--partitions", "many")])
def test_usage_errors_exit_2(args):
    result = sluice(*args, target=f"127.0.0.1:{closed_port()}")
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "usage: sluice" in result.stderr


def test_describe_shows_every_partition_not_just_one_page(cli, stream_name):
    """More partitions than one DescribeStream page (100) holds."""
    ok(cli("streams", "create", stream_name, "--partitions", "150"))
    lines = ok(cli("streams", "describe", stream_name)).splitlines()
    assert [line.split()[0] for line in lines] == [f"shardId-{i:010d}" for i in range(150)]
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
