"""What a newcomer meets when the broker cannot start: one clear line on stderr that says what to
change (the flag and its SLUICE_* variable), a non-zero exit, never a traceback.

Every case is a real `python -m broker` process meeting the real obstacle: a port held by a real
listening socket, a second broker (or another process holding RocksDB's lock) on the same data
dir, a data dir under a regular file, on a read-only mount or on a full one (tmpfs mounts inside a
private mount namespace via `unshare -m`, so nothing leaks onto the machine; skipped where the
sandbox does not allow mounts - root ignores chmod, so a mount is the honest way), bad flags and
bad SLUICE_* values. Exit status 2 is a usage error, 1 a startup error.
"""
from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from broker.launcher import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "sluice-broker: error: "


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(extra)
    return env


def broker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "broker", *args]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=clean_env(**env))


def error_line(out: subprocess.CompletedProcess[str], status: int, *needles: str, only_line: bool = True) -> str:
    """The broker failed with `status`, printed no traceback and never got ready; its error is one
    line holding every needle. `only_line=False` where a storage log line may come before it."""
    assert out.returncode == status, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert "sluice ready" not in out.stdout, out.stdout
    lines = out.stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    if only_line:
        assert len(lines) == 1, out.stderr
    line = lines[-1]
    assert line.startswith(PREFIX), out.stderr
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# -- a port in use -----------------------------------------------------------------------------

@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("door", ["http", "grpc", "tsdb", "metrics"])
@pytest.mark.parametrize("given_by", ["flag", "env"])
def test_a_port_in_use_names_the_flag_that_sets_it(busy_port: int, tmp_path: Path, door: str, given_by: str) -> None:
    args = ["--data-dir", str(tmp_path / "d")] + [arg for other in ("http", "grpc") if other != door
                                                  for arg in (f"--{other}-port", "0")]
    env: dict[str, str] = {}
    if given_by == "flag":
        args += [f"--{door}-port", str(busy_port)]
    else:
        env[f"SLUICE_{door.upper()}_PORT"] = str(busy_port)
    out = run(broker_cmd(*args), **env)
    error_line(out, 1, f"port {busy_port}", "already in use", f"--{door}-port", f"SLUICE_{door.upper()}_PORT")


def test_a_host_that_does_not_resolve_names_the_host_flag(tmp_path: Path) -> None:
    out = run(broker_cmd("--data-dir", str(tmp_path / "d"), "--host", "no-such-host.invalid",
                         "--grpc-port", "0", "--http-port", "0"))
    error_line(out, 1, "no-such-host.invalid", "--host", "SLUICE_HOST")


# -- a data dir held by another broker ---------------------------------------------------------

def test_a_second_broker_on_the_same_data_dir_is_refused_with_the_first_ones_pid(
        start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    first = start_broker(data_dir=data_dir)
    assert first.proc is not None
    out = run(broker_cmd("--data-dir", str(data_dir), "--grpc-port", "0", "--http-port", "0"))
    error_line(out, 1, f"data dir {data_dir} is in use by another broker", f"(pid {first.proc.pid})",
               "--data-dir", "SLUICE_DATA_DIR")
    # the first broker did not notice, and once it is gone - even by SIGKILL - the dir is free again
    assert first.proc.poll() is None
    first.kill()
    start_broker(data_dir=data_dir)


def test_another_process_holding_rocksdb_is_named_by_its_pid(
        start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    data_dir = tmp_path / "held"
    assert start_broker(data_dir=data_dir).stop() == 0    # a real data dir, then someone else opens its store
    holder = subprocess.Popen([sys.executable, "-c", "import rocksdict, sys\n"
                               f"db = rocksdict.Rdict({str(data_dir / 'rocksdb')!r})\n"
                               "print('open', flush=True)\nsys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        out = run(broker_cmd("--data-dir", str(data_dir), "--grpc-port", "0", "--http-port", "0"))
        # the store may log its own failure first; the last line is the explanation
        error_line(out, 1, "is in use by another process", f"(pid {holder.pid})", "--data-dir", only_line=False)
    finally:
        holder.communicate("", timeout=30)


def test_a_data_dir_of_an_older_layout_is_refused_and_left_alone(tmp_path: Path) -> None:
    data_dir = tmp_path / "old"
    subprocess.run([sys.executable, "-c", "import rocksdict\n"
                    f"db = rocksdict.Rdict({str(data_dir / 'rocksdb')!r}, rocksdict.Options(raw_mode=True))\n"
                    "db[b'Sorders'] = b'{}'\ndb.close()"], check=True, timeout=60)
    out = run(broker_cmd("--data-dir", str(data_dir), "--grpc-port", "0", "--http-port", "0"))
    error_line(out, 1, f"data dir {data_dir}", "format 1", "format 2", "move the data dir away")


# -- a data dir that cannot be written ---------------------------------------------------------

@pytest.mark.parametrize("below", ["file/data", "file"])
def test_a_data_dir_that_cannot_be_created_is_named(tmp_path: Path, below: str) -> None:
    (tmp_path / "file").write_text("a regular file, not a directory\n")
    data_dir = tmp_path / below
    out = run(broker_cmd("--data-dir", str(data_dir), "--grpc-port", "0", "--http-port", "0"))
    error_line(out, 1, f"data dir {data_dir}", "--data-dir", "SLUICE_DATA_DIR")


@functools.cache
def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.fixture
def mounts() -> None:
    if not _can_mount():
        pytest.skip("needs `unshare -m` and mount (root with CAP_SYS_ADMIN)")


def in_private_mount(setup: str, *broker_args: str) -> subprocess.CompletedProcess[str]:
    """Run `setup` (shell, mounts) and then the broker in a mount namespace of their own: the
    mounts vanish with the process, whatever happens to the test."""
    script = f"set -e; {setup}; exec \"$@\""
    return run(["unshare", "-m", "sh", "-c", script, "sh", *broker_cmd(*broker_args, "--grpc-port", "0",
                                                                      "--http-port", "0")])


def test_a_data_dir_on_a_read_only_mount_is_named(mounts: None, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    out = in_private_mount(f"mount -t tmpfs -o ro tmpfs {mnt}", "--data-dir", str(mnt / "data"))
    error_line(out, 1, f"data dir {mnt / 'data'}", "Read-only file system", "--data-dir", "SLUICE_DATA_DIR")


def test_an_existing_data_dir_remounted_read_only_is_named(
        mounts: None, start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    data_dir = tmp_path / "was-writable"
    assert start_broker(data_dir=data_dir).stop() == 0
    out = in_private_mount(f"mount --bind {data_dir} {data_dir}; mount -o remount,ro,bind {data_dir}",
                           "--data-dir", str(data_dir))
    error_line(out, 1, f"data dir {data_dir}", "Read-only file system", "--data-dir")


def test_a_full_data_dir_says_it_is_full(mounts: None, tmp_path: Path) -> None:
    mnt = tmp_path / "full"
    mnt.mkdir()
    out = in_private_mount(f"mount -t tmpfs -o size=64k tmpfs {mnt}; mkdir {mnt}/data; "
                           f"head -c 1M /dev/zero > {mnt}/filler 2>/dev/null || true", "--data-dir", str(mnt / "data"))
    error_line(out, 1, f"data dir {mnt / 'data'} is full", "--data-dir")


def test_a_data_dir_too_small_for_the_store_says_it_is_full(mounts: None, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    # room for the pid file, not for RocksDB's first files: the store's own open fails
    out = in_private_mount(f"mount -t tmpfs -o size=16k tmpfs {mnt}", "--data-dir", str(mnt / "data"))
    error_line(out, 1, f"data dir {mnt / 'data'} is full", "--data-dir", only_line=False)


# -- bad flags and environment values ----------------------------------------------------------

@pytest.mark.parametrize("args, env, needle", [
    (["--grpc-port", "70000"], {}, "--grpc-port"),
    (["--grpc-port", "abc"], {}, "--grpc-port"),
    (["--http-prot", "1"], {}, "--http-prot"),
    (["--store", "tape"], {}, "--store"),
    (["--log-level", "loud"], {}, "--log-level"),
    (["--idle-timeout", "nan"], {}, "--idle-timeout"),
    (["--memtable-mb", "0"], {}, "--memtable-mb"),
    (["--grpc-port", "9000", "--http-port", "9000"], {}, "--http-port"),
    ([], {"SLUICE_GRPC_PORT": "not-a-port"}, "SLUICE_GRPC_PORT"),
    ([], {"SLUICE_HTTP_PORT": "99999"}, "SLUICE_HTTP_PORT"),
    ([], {"SLUICE_FSYNC": "maybe"}, "SLUICE_FSYNC"),
    ([], {"SLUICE_LOG_LEVEL": "loud"}, "SLUICE_LOG_LEVEL"),
    ([], {"SLUICE_SHUTDOWN_GRACE": "-1"}, "SLUICE_SHUTDOWN_GRACE"),
    ([], {"SLUICE_IDLE_TIMEOUT": "inf"}, "SLUICE_IDLE_TIMEOUT"),
    ([], {"SLUICE_STORE": "tape"}, "SLUICE_STORE"),
    ([], {"SLUICE_DATA_DIR": ""}, "SLUICE_DATA_DIR"),
    (["--store", "tape"], {"SLUICE_STORE": "memory"}, "--store"),   # the flag was the bad one
])
def test_a_bad_flag_or_environment_value_is_one_line_naming_it(tmp_path: Path, args: list[str],
                                                               env: dict[str, str], needle: str) -> None:
    data_dir = [] if "SLUICE_DATA_DIR" in env else ["--data-dir", str(tmp_path / "d")]
    out = run(broker_cmd(*data_dir, *args), **env)
    error_line(out, 2, needle, "--help")
    assert not (tmp_path / "d").exists(), "a usage error must not touch the data dir"
