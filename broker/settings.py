"""One frozen Settings dataclass. Command-line and environment parsing happen here and nowhere else.

Every option has an environment variable (SLUICE_<NAME>); a command-line flag wins over it.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence


def without_passwords(urls: Iterable[str]) -> list[str]:
    """URLs as they may be logged or printed: a password in one (nats://user:pass@host) hidden, and
    a user without a password (nats://TOKEN@host: NATS's token form, which nats-py sends as the
    auth_token)."""
    return [re.sub(r"//[^:/@]+@", "//***@", re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)) for url in urls]


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
    subscribe_heartbeat: float = 15.0
    log_level: str = "INFO"
    tsdb_stream: str = "tsdb"
    tsdb_project: str = "default"
    tsdb_port: int | None = None
    tsdb_workers: int = 0
    metrics_port: int | None = None
    auth_file: str | None = None
    allowed_hosts: str = ""
    tls_cert: str | None = None
    tls_key: str | None = None
    partition_records_per_s: int = 20_000
    partition_bytes_per_s: int = 20 * 1024 * 1024
    max_connections_per_client: int = 256
    max_requests_per_client: int = 256
    max_subscriptions_per_client: int = 64
    nats_servers: str = ""
    nats_prefix: str = "sluice"
    replicas: int = 3
    nats_creds: str | None = None
    nats_tls_ca: str | None = None


_HELP = {
    "data_dir": "directory of the RocksDB store (created if missing)",
    "host": "address both servers bind to",
    "grpc_port": "gRPC port (0 = any free port; the chosen port is printed in the ready line)",
    "http_port": "HTTP port of every HTTP door: DIS REST, Timeplus, OpenTSDB, the SSE tail, the console, "
                 "/metrics (0 = any free port)",
    "store": "storage engine: rocksdb (durable, default), memory (nothing survives a restart) or jetstream "
             "(records and metadata on a NATS JetStream cluster, --nats-servers; nothing kept in --data-dir)",
    "fsync": "fsync every commit, one per batch of concurrent appends (survives power loss); by default an "
             "acknowledged batch is in the RocksDB write-ahead log, which survives a process crash",
    "memtable_mb": "RocksDB memtable size in MiB; at most two exist at once (one filling, one flushing)",
    "block_cache_mb": "RocksDB block cache in MiB, shared by all partitions (reads of flushed data)",
    "malloc_arenas": "glibc malloc arenas (0 = glibc default of 8 per core); few arenas keep RSS from "
                     "growing with thread count",
    "idle_timeout": "seconds before an idle or silent connection (HTTP keep-alive, gRPC) is closed",
    "body_timeout": "seconds a client may take to send a request body",
    "shutdown_grace": "seconds in-flight requests get to finish on SIGTERM",
    "retention_interval": "seconds between background trims of expired records",
    "subscribe_heartbeat": "seconds of silence after which a push subscription (gRPC Subscribe, the SSE tail) gets a "
                           "heartbeat, so a dead consumer is noticed and proxies keep the connection open; keep it "
                           "below the idle timeout of any proxy in between",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "tsdb_stream": "stream the OpenTSDB door (/api/put) writes points to; created on first put with 8 partitions",
    "tsdb_project": "project of --tsdb-stream",
    "auth_file": "TOML file of access keys (DIS AK/SK signing) and API keys (Timeplus X-Api-Key, gRPC bearer), "
                 "each bound to a project and a role; re-read on SIGHUP. Without it every door is open to anyone",
    "tls_cert": "PEM certificate (chain) to serve the HTTP doors over HTTPS and gRPC over TLS; needs --tls-key",
    "tls_key": "PEM private key of --tls-cert",
    "partition_records_per_s": "write limit per partition in records per second (DIS ADVANCED: 2,000); records "
                               "beyond it fail with the retriable throttling error (DIS.4303); 0 = no limit",
    "partition_bytes_per_s": "write limit per partition in payload bytes per second (DIS ADVANCED: 5 MB); 0 = no limit",
    "max_connections_per_client": "open HTTP connections one client address may hold on each HTTP port; more are "
                                  "answered TOO_MANY_REQUESTS and closed",
    "max_requests_per_client": "requests one client address may have in progress at once on each door; more get "
                               "TOO_MANY_REQUESTS (HTTP 429, 400 on the DIS door; gRPC RESOURCE_EXHAUSTED)",
    "max_subscriptions_per_client": "open push subscriptions, tails and streaming queries per client address",
    "metrics_port": "also serve /metrics (Prometheus, open even with --auth-file), /healthz and /readyz alone on "
                    "this port (0 = any free port); /metrics on --http-port takes an admin API key when "
                    "--auth-file is set",
    "allowed_hosts": "host names the HTTP ports answer to besides IP addresses, localhost and *.localhost, "
                     "comma-separated (.example.com: the domain and its subdomains; *: any); other Host headers "
                     "are refused (403), so a page cannot reach the broker through a name it made resolve to it "
                     "(DNS rebinding). Empty (the default): a broker bound to a loopback address answers only "
                     "those; one bound to another address answers any name",
    "tsdb_workers": "processes that parse, check and sort /api/put bodies of 16 KiB or more, so a put's per-point "
                    "work runs on more cores than the broker's one (it keeps the series types, the append and the "
                    "acknowledgement); 0 = all in the broker process",
    "tsdb_port": "also serve the OpenTSDB door alone on this port (HiTSDB's convention; 0 = any free port); "
                 "by default it is served on --http-port only",
    "nats_servers": "--store jetstream: the NATS servers, comma-separated (nats://host:port,...)",
    "nats_prefix": "--store jetstream: prefix of every JetStream stream, subject and KV bucket of this Sluice "
                   "deployment (several may share one NATS cluster)",
    "replicas": "--store jetstream: replicas of every JetStream stream and KV bucket (1 on a single node); an append "
                "is acknowledged once JetStream stored it on a majority of them",
    "nats_creds": "--store jetstream: NATS credentials file (JWT + nkey seed) for the connection",
    "nats_tls_ca": "--store jetstream: PEM CA certificate to verify the NATS servers over TLS (tls:// URLs)",
}

# Options without a default value: their type.
_OPTIONAL = {"tsdb_port": int, "metrics_port": int, "auth_file": str, "tls_cert": str, "tls_key": str,
             "nats_creds": str, "nats_tls_ca": str}


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _env_name(name: str) -> str:
    return "SLUICE_" + name.upper()


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_hint(name: str) -> str:
    """How an operator sets a setting, for error messages: `--http-port (env SLUICE_HTTP_PORT)`."""
    return f"{_flag_name(name)} (env {_env_name(name)})"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


_parse_float.__name__ = "number"   # argparse says "invalid number value: 'nan'"


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean (true/false, 1/0, yes/no, on/off)",
               str: "a string"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is in --help) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_HOST_NAME = re.compile(r"\*|\.?[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")

# name -> (check, what the value must be); checked whichever way the value was given
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data_dir": (lambda v: v.strip() != "", "a directory path, not empty"),
    "host": (lambda v: v.strip() != "", "an address or host name, not empty"),
    "store": (lambda v: v in ("rocksdb", "memory", "jetstream"), "rocksdb, memory or jetstream"),
    "grpc_port": (lambda v: 0 <= v <= 65535, "within 0..65535"),
    "http_port": (lambda v: 0 <= v <= 65535, "within 0..65535"),
    "memtable_mb": (lambda v: v >= 1, "at least 1"),
    "block_cache_mb": (lambda v: v >= 1, "at least 1"),
    "malloc_arenas": (lambda v: v >= 0, "0 (glibc default) or more"),
    "idle_timeout": (lambda v: v > 0, "more than 0 seconds"),
    "body_timeout": (lambda v: v > 0, "more than 0 seconds"),
    "shutdown_grace": (lambda v: v >= 0, "0 seconds or more"),
    "retention_interval": (lambda v: v > 0, "more than 0 seconds"),
    "subscribe_heartbeat": (lambda v: 0.1 <= v <= 3600, "within 0.1..3600 seconds"),
    "log_level": (lambda v: v.upper() in _LOG_LEVELS, "one of " + ", ".join(_LOG_LEVELS)),
    # the broker's stream and project name rules (core/limits.py), not imported: settings stand alone
    "tsdb_stream": (lambda v: re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v) is not None,
                    "1-64 characters of A-Z, a-z, 0-9, _ and -"),
    "tsdb_project": (lambda v: re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v) is not None,
                     "1-64 characters of A-Z, a-z, 0-9, _ and -"),
    "tsdb_port": (lambda v: v is None or 0 <= v <= 65535, "within 0..65535"),
    "tsdb_workers": (lambda v: 0 <= v <= 64, "within 0..64"),
    "metrics_port": (lambda v: v is None or 0 <= v <= 65535, "within 0..65535"),
    "auth_file": (lambda v: v is None or v.strip() != "", "a file path, not empty"),
    "allowed_hosts": (lambda v: all(_HOST_NAME.fullmatch(n.strip()) for n in v.split(",")) if v.strip() else True,
                      "host names, comma-separated (letters, digits, - and _ between dots; .name for a domain "
                      "and its subdomains; * for any), no ports"),
    "tls_cert": (lambda v: v is None or v.strip() != "", "a file path, not empty"),
    "tls_key": (lambda v: v is None or v.strip() != "", "a file path, not empty"),
    "partition_records_per_s": (lambda v: v >= 0, "0 (no limit) or more"),
    "partition_bytes_per_s": (lambda v: v >= 0, "0 (no limit) or more"),
    "max_connections_per_client": (lambda v: v >= 1, "at least 1"),
    "max_requests_per_client": (lambda v: v >= 1, "at least 1"),
    "max_subscriptions_per_client": (lambda v: v >= 1, "at least 1"),
    "nats_servers": (lambda v: all(re.fullmatch(r"(nats|tls)://[^\s,/]+", u.strip()) for u in v.split(",")
                                   if u.strip()), "nats://host:port or tls://host:port URLs, comma-separated"),
    "nats_prefix": (lambda v: re.fullmatch(r"[A-Za-z0-9_-]{1,32}", v) is not None,
                    "1-32 characters of A-Z, a-z, 0-9, _ and -"),
    "replicas": (lambda v: 1 <= v <= 5, "within 1..5 (JetStream's limit)"),
    "nats_creds": (lambda v: v is None or v.strip() != "", "a file path, not empty"),
    "nats_tls_ca": (lambda v: v is None or v.strip() != "", "a file path, not empty"),
}


def _given_on_command_line(flag: str, argv: Sequence[str]) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") or (flag.startswith("--") and arg == "--no-" + flag[2:])
               for arg in argv)


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the command line over the environment over the defaults.

    A bad value - a flag's or an environment variable's - is a usage error: one line on stderr that
    names the flag or the variable, and SystemExit(2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if environ is None else environ)
    parser = _Parser(
        prog="sluice-broker", description="Sluice: a partitioned record-stream broker with gRPC, DIS REST, Timeplus "
                                         "and OpenTSDB APIs.",
        epilog="Every option can also be set by the environment variable shown; a flag wins over it. "
               "SIGTERM or SIGINT stops the broker gracefully.")
    defaults = Settings()
    for f in fields(Settings):
        env = _env_name(f.name)
        flag = _flag_name(f.name)
        default = getattr(defaults, f.name)
        kind_of: type = _OPTIONAL.get(f.name) or type(default)
        parsers: dict[type, Callable[[str], Any]] = {bool: _parse_bool, float: _parse_float}
        kind: Callable[[str], Any] = parsers.get(kind_of, kind_of)
        raw = environ.get(env)
        if raw == "" and f.name in _OPTIONAL:   # an empty variable leaves an optional option unset
            raw = None
        try:
            value = kind(raw) if raw is not None else default
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f"environment variable {env}={raw!r} is not {_KIND_NAMES[kind_of]} "
                         f"(it sets {flag})")
        help_text = f"{_HELP[f.name]} [env {env}; default {'none' if default is None else default}]"
        if kind is _parse_bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=value, help=help_text)
    args = parser.parse_args(argv)
    for name, (check, must_be) in _CHECKS.items():
        value = getattr(args, name)
        if not check(value):
            flag, env = _flag_name(name), _env_name(name)
            source = flag if _given_on_command_line(flag, argv) or env not in environ else f"environment variable {env}"
            parser.error(f"{source} must be {must_be}, not {value!r}")
    ports = [(name, getattr(args, name)) for name in ("grpc_port", "http_port", "tsdb_port", "metrics_port")]
    for i, (a, port_a) in enumerate(ports):
        for b, port_b in ports[i + 1:]:
            if port_a == port_b and port_a:   # 0 and None never clash
                parser.error(f"{_flag_name(a)} and {_flag_name(b)} are both {port_a}: each door needs its own port")
    if args.store == "jetstream" and not args.nats_servers.strip():
        parser.error("--store jetstream needs --nats-servers (env SLUICE_NATS_SERVERS): nats://host:port,...")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together: give both or neither")
    args.log_level = args.log_level.upper()
    return Settings(**vars(args))
