"""One frozen Settings dataclass. Command-line and environment parsing happen here and nowhere else.

Every option has an environment variable (SLUICE_<NAME>); a command-line flag wins over it.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import Sequence


@dataclass(frozen=True)
class Settings:
    data_dir: str = "./data"
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8080
    store: str = "rocksdb"
    fsync: bool = False
    memtable_mb: int = 32
    block_cache_mb: int = 64
    malloc_arenas: int = 2
    idle_timeout: float = 60.0
    body_timeout: float = 30.0
    shutdown_grace: float = 10.0
    retention_interval: float = 60.0
    log_level: str = "INFO"


_HELP = {
    "data_dir": "directory of the RocksDB store (created if missing)",
    "host": "address both servers bind to",
    "grpc_port": "gRPC port (0 = any free port; the chosen port is printed in the ready line)",
    "http_port": "HTTP port of the DIS REST API (0 = any free port)",
    "store": "storage engine: rocksdb (durable, default) or memory (nothing survives a restart)",
    "fsync": "fsync every group commit (survives power loss); by default an acknowledged batch is in "
             "the RocksDB write-ahead log, which survives a process crash",
    "memtable_mb": "RocksDB memtable size in MiB; at most two exist at once (one filling, one flushing)",
    "block_cache_mb": "RocksDB block cache in MiB, shared by all partitions (reads of flushed data)",
    "malloc_arenas": "glibc malloc arenas (0 = glibc default of 8 per core); few arenas keep RSS from "
                     "growing with thread count",
    "idle_timeout": "seconds before an idle or silent connection (HTTP keep-alive, gRPC) is closed",
    "body_timeout": "seconds a client may take to send a request body",
    "shutdown_grace": "seconds in-flight requests get to finish on SIGTERM",
    "retention_interval": "seconds between background trims of expired records",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def _env_name(name: str) -> str:
    return "SLUICE_" + name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def parse_settings(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(
        prog="sluice-broker", description="Sluice: a partitioned record-stream broker with gRPC and DIS REST APIs.",
        epilog="Every option can also be set by the environment variable shown; a flag wins over it.")
    defaults = Settings()
    for f in fields(Settings):
        env = _env_name(f.name)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = _parse_bool if f.type in (bool, "bool") else type(default)
        raw = environ.get(env)
        try:
            value = kind(raw) if raw is not None else default
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f"environment variable {env}={raw!r} is not a valid {type(default).__name__}")
        help_text = f"{_HELP[f.name]} [env {env}; default {default}]"
        if kind is _parse_bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=value, help=help_text)
    args = parser.parse_args(argv)
    if args.store not in ("rocksdb", "memory"):
        parser.error("--store must be rocksdb or memory")
    for name in ("grpc_port", "http_port"):
        if not 0 <= getattr(args, name) <= 65535:
            parser.error(f"--{name.replace('_', '-')} must be within 0..65535")
    for name in ("memtable_mb", "block_cache_mb"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.malloc_arenas < 0:
        parser.error("--malloc-arenas must be 0 (glibc default) or more")
    return Settings(**vars(args))
