"""Startup errors an operator can fix, explained in one line that names the flag to change.

`app.serve()` raises `StartupError` when a port is in use, the data dir is held by another broker
(or another process holding RocksDB's lock), cannot be created or written, or is full;
`__main__` prints the message as one line and exits 1. Each cause is recognised where it happens
(the bind, the store's open, the data dir's pid file), so the message can say which flag and
SLUICE_* variable to change. Anything else failing at startup is a bug and keeps its traceback.

Imports settings and errors only (the floor of app.py, which is its only user).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
import sys
from typing import Iterator

from broker.errors import BrokerError, ErrorCode
from broker.settings import Settings, option_hint, without_passwords
from broker.storage.base import IncompatibleStore


class StartupError(Exception):
    """The broker cannot start for a reason its operator can fix; the message is one line."""


PID_FILE = "broker.pid"


class DataDirClaim:
    """This broker's hold on its data dir: `broker.pid` in it, locked (flock) for the broker's
    lifetime and holding its pid, so a second broker on the same dir is refused before it touches
    the store - with the first one's pid - and a crashed broker leaves no stale lock behind (the
    kernel drops a flock with its process). Also the first write into the data dir, so a dir that
    cannot be created or written is reported as such. A memory store uses no data dir."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def take(cls, settings: Settings) -> DataDirClaim:
        if settings.store == "memory":
            return cls(None)
        where = settings.data_dir
        try:
            os.makedirs(where, exist_ok=True)
        except OSError as exc:
            raise _data_dir_error(settings, "cannot create it", exc) from exc
        try:
            fd = os.open(os.path.join(where, PID_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _data_dir_error(settings, "cannot write in it", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StartupError(f"data dir {where} is in use by another broker" + (f" (pid {pid})" if pid else "")
                               + f"; stop it, or choose another data dir with {option_hint('data_dir')}") from None
        except OSError as exc:
            os.close(fd)
            raise _data_dir_error(settings, "cannot lock broker.pid in it", exc) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise _data_dir_error(settings, "cannot write in it", exc) from exc
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # drops the lock; the file stays (a stale pid in it is harmless)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _data_dir_error(settings: Settings, what: str, exc: OSError) -> StartupError:
    reason = "it exists and is not a directory" if isinstance(exc, FileExistsError) else _reason(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StartupError(f"data dir {settings.data_dir} is full ({reason}); free some space, or choose another "
                            f"data dir with {option_hint('data_dir')}")
    return StartupError(f"data dir {settings.data_dir} is not usable: {what}: {reason}; choose another data dir "
                        f"with {option_hint('data_dir')}")


_ROCKSDB_LOCK = re.compile(r"lock file: (.+/LOCK):")


def _posix_lock_holder(path: str) -> int | None:
    """The pid holding a POSIX (fcntl) write lock on `path` - RocksDB locks its LOCK file so - as
    F_GETLK tells it (Linux's struct flock layout). None when unknown or not locked."""
    if not sys.platform.startswith("linux"):
        return None
    layout = "hhqqi4x"   # l_type, l_whence, l_start, l_len, l_pid (+ padding)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)   # F_GETLK needs no write access
    except OSError:
        return None
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        kind, _, _, _, pid = struct.unpack(layout, answer)
    except OSError:
        return None
    finally:
        os.close(fd)
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


@contextlib.contextmanager
def explain_store_failure(settings: Settings) -> Iterator[None]:
    """Opening the store (and the files beside it): failures an operator can fix become StartupError."""
    try:
        yield
    except IncompatibleStore as exc:
        raise StartupError(f"data dir {settings.data_dir}: {exc}") from exc
    except OSError as exc:
        raise _data_dir_error(settings, "cannot open the store in it", exc) from exc
    except BrokerError as exc:
        cause = f"{exc.__cause__}" if exc.__cause__ is not None else ""
        if settings.store == "jetstream":   # nothing of it is in the data dir
            servers = ",".join(without_passwords(settings.nats_servers.split(",")))
            raise StartupError(f"cannot open the JetStream store on {servers}: {exc.message}"
                               + (f" ({cause})" if cause and cause not in exc.message else "")) from exc
        if exc.code is ErrorCode.STORAGE_FULL or "No space left" in cause:
            raise StartupError(f"data dir {settings.data_dir} is full; free some space, or choose another data "
                               f"dir with {option_hint('data_dir')}") from exc
        locked = _ROCKSDB_LOCK.search(cause)
        if locked and "current process" not in cause:
            pid = _posix_lock_holder(locked.group(1))
            raise StartupError(f"data dir {settings.data_dir} is in use by another process"
                               + (f" (pid {pid})" if pid else "") + f" that holds {locked.group(1)}; stop it, or "
                               f"choose another data dir with {option_hint('data_dir')}") from exc
        raise StartupError(f"cannot open the store in data dir {settings.data_dir}: {exc}"
                           + (f" ({cause})" if cause else "")) from exc


_DOORS = {"http_port": "the DIS REST door", "grpc_port": "the gRPC door", "tsdb_port": "the OpenTSDB door",
          "metrics_port": "the metrics endpoint"}


@contextlib.contextmanager
def explain_bind_failure(settings: Settings, port_setting: str) -> Iterator[None]:
    """Binding a door's port: an OSError (aiohttp, `probe_port`) becomes StartupError naming the flag."""
    host, port, door = settings.host, getattr(settings, port_setting), _DOORS[port_setting]
    try:
        yield
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on host {host!r} for {door}: {exc.strerror}; check "
                           f"{option_hint('host')}") from exc
    except OSError as exc:
        reason = _reason(exc)
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} for {door} is already in use; choose another port with "
                               f"{option_hint(port_setting)}, or stop what holds it") from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"cannot listen on {host}:{port} for {door}: {reason}; check "
                               f"{option_hint('host')}") from exc
        if exc.errno == errno.EACCES:
            raise StartupError(f"not allowed to listen on {host}:{port} for {door} ({reason}); choose another port "
                               f"with {option_hint(port_setting)}") from exc
        raise StartupError(f"cannot listen on {host}:{port} for {door}: {reason}; check "
                           f"{option_hint(port_setting)} and {option_hint('host')}") from exc
    except RuntimeError as exc:   # grpc's add_insecure_port, when the probe passed and the bind did not
        raise StartupError(f"cannot listen on {host}:{port} for {door}; check {option_hint(port_setting)} and "
                           f"{option_hint('host')}") from exc


def probe_port(host: str, port: int) -> None:
    """Raise the OSError that binding host:port would meet. grpc's add_insecure_port only says
    "Failed to bind" (and logs the reason itself), so the gRPC door's port is tried here first."""
    if port == 0:
        return
    first: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as grpc does
            try:
                sock.bind(address)
                return   # grpc binds what it can of the addresses a name resolves to
            except OSError as exc:
                first = first or exc
    if first is not None:
        raise first
