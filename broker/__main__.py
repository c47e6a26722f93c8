"""`python -m broker` / `sluice-broker`: parse settings, run until SIGTERM/SIGINT. Signals live here only.

Prints one line `sluice ready grpc=HOST:PORT http=HOST:PORT` on stdout once both doors accept
connections (tests and scripts wait for it instead of sleeping).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

from broker.app import Running, serve
from broker.settings import Settings, parse_settings


def _announce(settings: Settings) -> "callable[[Running], None]":  # type: ignore[valid-type]
    def ready(running: Running) -> None:
        print(f"sluice ready grpc={settings.host}:{running.grpc_port} http={settings.host}:{running.http_port}",
              flush=True)
    return ready


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop, _announce(settings))


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
