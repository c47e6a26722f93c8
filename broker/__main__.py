"""`python -m broker` / `sluice-broker`: parse settings, run until SIGTERM/SIGINT. Signals live here only.

Prints one line `sluice ready grpc=HOST:PORT http=HOST:PORT` (then ` tsdb=HOST:PORT` with
--tsdb-port, ` metrics=HOST:PORT` with --metrics-port, ` tls=on` with --tls-cert, then ` auth=on` or
` auth=off`) on stdout once the doors
accept connections (tests and scripts wait for it instead of sleeping). With --auth-file, SIGHUP
re-reads the file: a file that cannot be used keeps the keys in force (the log says why, never
naming a secret); without one, SIGHUP is logged and changes nothing.

Exit status: 0 after a graceful stop; 2 for a bad flag or SLUICE_* value (settings.py); 1 when the
broker cannot start for a reason its operator can fix (startup.StartupError: a port in use, a data dir
held by another broker, not writable or full, an auth file that cannot be used) - each a single line
on stderr, never a traceback.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Callable

from broker import malloc
from broker.app import Running, load_auth, serve
from broker.auth import Auth
from broker.process import LoopErrors, raise_open_files_limit
from broker.settings import Settings, parse_settings
from broker.startup import StartupError


def _announce(settings: Settings, auth: Auth) -> Callable[[Running], None]:
    def ready(running: Running) -> None:
        tsdb = f" tsdb={settings.host}:{running.tsdb_port}" if running.tsdb_port is not None else ""
        if running.metrics_port is not None:
            tsdb += f" metrics={settings.host}:{running.metrics_port}"
        print(f"sluice ready grpc={settings.host}:{running.grpc_port} http={settings.host}:{running.http_port}"
              + tsdb + (" tls=on" if running.tls else "") + (" auth=on" if auth.enabled else " auth=off"),
              flush=True)
    return ready


def _nothing_to_reload() -> None:
    logging.getLogger("sluice").info("SIGHUP: no --auth-file to re-read; the broker goes on")


async def _main(settings: Settings) -> None:
    auth = load_auth(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrors())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Auth.reload logs what happened (counts or the file's problem, never a secret). Handled without
    # a file too: the signal's default would end the process at once (no drain), where a broker with
    # a file goes on - `systemctl reload`, or the terminal it was started from closing
    loop.add_signal_handler(signal.SIGHUP, auth.reload if auth.enabled else _nothing_to_reload)
    await serve(settings, stop, _announce(settings, auth), auth=auth)


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    malloc.limit_arenas(settings.malloc_arenas)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_files_limit()
    try:
        asyncio.run(_main(settings))
    except StartupError as exc:
        print(f"sluice-broker: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
