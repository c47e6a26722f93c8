"""Composition root and lifecycle: open the store, build the Broker, start the front doors and the
retention task; on stop, shut down gracefully. The only module that knows every layer.

Graceful stop, in order: mark health NOT_SERVING; stop accepting on both doors and let in-flight
requests finish (up to `shutdown_grace`; the gRPC door first answers new calls UNAVAILABLE until the
running ones are done, see api/grpc_service.py); stop the retention task; drain the committer
so every accepted batch is committed; flush and close the store.

Startup errors an operator can fix - a port in use, a data dir held by another broker, not writable
or full, TLS files or an auth file that cannot be used - are raised as `startup.StartupError` with a
one-line message that names the flag to change; `__main__` prints it and exits 1. Everything else
that fails at startup is a bug and keeps its traceback.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from broker import malloc
from broker.api.grpc_service import (
    SERVICE_NAME,
    AuthGate,
    SluiceServicer,
    add_servicer,
    count_refused,
    grpc_max_message,
)
from broker.api.hosts import AllowedHosts
from broker.api.http import drop_waiting_writes
from broker.api.http_app import HttpRunner, build_http_app, build_tsdb_http_app
from broker.api.limits import CLIENT_LIMITS, ClientLimits, GrpcLimits, tls_accept
from broker.api.metrics import BrokerCollector, Exporter, Health, build_metrics_app
from broker.auth import Auth, CredentialsError
from broker.core.broker import Broker
from broker.core.limits import DEFAULT_LIMITS
from broker.errors import BrokerError
from broker.settings import Settings
from broker.sources.manager import Sources
from broker.startup import DataDirClaim, StartupError, explain_bind_failure, explain_store_failure, probe_port
from broker.storage import open_store
from broker.storage.base import StorageState
from broker.tls import HANDSHAKE_TIMEOUT_S, Site, Tls, load_tls
from broker.tsdb.series import TsdbStream
from broker.tsdb.workers import TsdbWorkers

log = logging.getLogger("sluice")

# On shutdown the gRPC door stops once no RPC ran for this long: long enough for the calls grpc core
# has already received to be taken and answered (on loopback: microseconds), short enough not to
# slow an idle broker's stop noticeably.
_DRAIN_QUIET_S = 0.1
_TRIM_EVERY_S = 30.0   # freed heap pages go back to the OS at most this late (malloc.py)
_STORAGE_HEALTH_EVERY_S = 0.5   # health follows the store's state at most this late
_SERIES_LAG_S = 1.0   # the monitoring series' minute is stored this long after it ends (late commits)


@dataclass
class Running:
    """What a started broker exposes to its caller (tests, the ready line)."""
    broker: Broker
    grpc_port: int
    http_port: int
    tsdb_port: int | None = None
    tls: bool = False   # the doors serve TLS (--tls-cert/--tls-key)
    metrics_port: int | None = None   # --metrics-port: /metrics, /healthz and /readyz alone


async def _retention_loop(broker: Broker, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            moved = await broker.enforce_retention()
            if moved:
                log.info("retention trimmed %d partitions", moved)
        except Exception:
            log.exception("retention pass failed; will retry")


async def _series_loop(broker: Broker) -> None:
    """Once a minute, just after it ends: store the minute's DIS monitoring row of every active
    stream and trim the hours past retention (core/metric_series.py)."""
    while True:
        now = time.time()
        await asyncio.sleep(60 - now % 60 + _SERIES_LAG_S)
        try:
            await broker.metric_series.flush(int(time.time() // 60) - 1)
        except BrokerError as exc:   # the store unavailable or full: said once a minute, no traceback
            log.warning("storing the monitoring series failed (%s); the next minute adds its counts", exc.message)
        except Exception:
            log.exception("storing the monitoring series failed; the next minute adds its counts")


async def _storage_health(broker: Broker, health: HealthServicer, interval: float) -> None:
    """The service NOT_SERVING while the store refuses writes (a full disk), SERVING again once it
    recovers; the store logs the changes. The overall "" stays SERVING: reads still work."""
    serving = True
    while True:
        await asyncio.sleep(interval)
        ok = broker.storage_state is StorageState.OK
        if ok != serving:
            serving = ok
            await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING if ok
                             else health_pb2.HealthCheckResponse.NOT_SERVING)


async def _trim_loop(interval: float) -> None:
    """Return freed heap pages to the OS now and then (see malloc.trim); off the event loop, as
    trimming a large heap takes milliseconds."""
    while True:
        await asyncio.sleep(interval)
        if not await asyncio.to_thread(malloc.trim):
            return


def _client_limits(settings: Settings) -> ClientLimits:
    """One door's per-client limits (api/limits.py): each port counts on its own."""
    return ClientLimits.of(settings.max_connections_per_client, settings.max_requests_per_client,
                           settings.max_subscriptions_per_client)


def _accept(runner: HttpRunner) -> Callable[[asyncio.BaseTransport], Callable[[], None] | None] | None:
    """A TLS port's count of connections in their handshake (tls.Site), by the port's own limits."""
    limits = runner.app.get(CLIENT_LIMITS)
    return None if limits is None else tls_accept(limits)


MIN_PING_INTERVAL_MS = 10_000   # the least time between a client's pings (clients ping every 30 s)
PRODUCE_STREAMS_PER_CONNECTION = 1024   # PutRecordsStream calls (one per Producer) beside the counted calls


def grpc_options(settings: Settings, max_message: int) -> list[tuple[str, int]]:
    """The gRPC server's channel options."""
    idle_ms = int(settings.idle_timeout * 1000)
    return [
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT_S * 1000)),   # TLS / HTTP/2 preface
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_connection_idle_ms", idle_ms),          # close connections that carry no RPC
        ("grpc.keepalive_time_ms", 30_000),                 # detect dead peers under long RPCs
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # accept clients' keepalive pings on calls that carry no data for a while (an idle
        # PutRecordsStream, a quiet Subscribe): the default policy allows one per 5 minutes and
        # answers the client library's 30 s pings with GOAWAY too_many_pings after two strikes
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 0),
        # calls open at once on one connection: what a client may run (its request and subscription
        # slots) and its produce streams, which hold no slot; grpc's default is unlimited, and a call
        # whose request message never comes holds its stream without reaching the per-client
        # limits, which count handlers (each such stream costs the broker ~15 KB)
        ("grpc.max_concurrent_streams", settings.max_requests_per_client + settings.max_subscriptions_per_client
         + PRODUCE_STREAMS_PER_CONNECTION),
    ]


def _grpc_server(settings: Settings, max_message: int, broker: Broker, auth: Auth) -> grpc.aio.Server:
    # the gate first: a call without a known key is refused before anything counts or reads it
    refused = count_refused(broker.stats)
    gate = [AuthGate(auth, refused, SERVICE_NAME)] if auth.enabled else []
    return grpc.aio.server(interceptors=[*gate, GrpcLimits(_client_limits(settings), SERVICE_NAME, refused)],
                           options=grpc_options(settings, max_message))


def load_auth(settings: Settings) -> Auth:
    """The credentials of `--auth-file` (none without it: an open broker). Raises StartupError,
    one line naming the file and what is wrong with it (never a secret)."""
    try:
        return Auth(settings.auth_file)
    except CredentialsError as exc:
        raise StartupError(f"--auth-file {' '.join(str(exc).split())}") from None


async def serve(settings: Settings, stop: asyncio.Event, on_ready: Callable[[Running], None] | None = None,
                auth: Auth | None = None) -> None:
    """Run a broker until `stop` is set, then shut it down gracefully. `auth`: the credentials
    (loaded from `settings.auth_file` when not given; __main__ passes its own, to reload on SIGHUP).

    Raises StartupError (nothing started, nothing left open) when the data dir, a port, the TLS
    files or the auth file is not usable."""
    tls = load_tls(settings)   # before anything starts: a bad file leaves nothing to undo
    auth = auth if auth is not None else load_auth(settings)
    claim = await asyncio.to_thread(DataDirClaim.take, settings)
    try:
        await _serve(settings, stop, on_ready, tls, auth)
    finally:
        claim.release()


async def _serve(settings: Settings, stop: asyncio.Event, on_ready: Callable[[Running], None] | None,
                 tls: Tls | None, auth: Auth) -> None:
    with explain_store_failure(settings):
        store = await open_store(settings)
    limits = replace(DEFAULT_LIMITS, partition_records_per_s=settings.partition_records_per_s,
                     partition_bytes_per_s=settings.partition_bytes_per_s,
                     subscribe_heartbeat_ms=round(settings.subscribe_heartbeat * 1000))
    broker = Broker(store, limits=limits)
    try:
        with explain_store_failure(settings):
            await broker.start()   # reads the catalogue and the cursor key from the store
    except StartupError:
        await store.close()
        raise
    max_message = grpc_max_message(broker.limits)
    sources = Sources(broker)

    tsdb_workers = TsdbWorkers(settings.tsdb_workers) if settings.tsdb_workers else None
    if tsdb_workers is not None:
        try:
            await tsdb_workers.start()
        except Exception as exc:
            await tsdb_workers.close()
            await broker.close()
            await store.close()
            raise StartupError(f"cannot start --tsdb-workers {settings.tsdb_workers}: {exc}") from exc
    tsdb_stream = TsdbStream(broker, settings.tsdb_project, settings.tsdb_stream, workers=tsdb_workers)
    health = Health(broker)
    exporter = Exporter(BrokerCollector(broker, sources, settings.data_dir if settings.store == "rocksdb" else None),
                        health, auth)
    # one policy for every HTTP port (api/hosts.py): by default the check is on for a loopback bind
    allowed_hosts = AllowedHosts.of(settings.allowed_hosts, bind=settings.host)
    runner = HttpRunner(build_http_app(broker, body_timeout_s=settings.body_timeout,
                                       stall_timeout_s=settings.idle_timeout, sources=sources,
                                       tsdb_stream=tsdb_stream, auth=auth, client_limits=_client_limits(settings),
                                       exporter=exporter, allowed_hosts=allowed_hosts),
                        keepalive_timeout=settings.idle_timeout, shutdown_timeout=settings.shutdown_grace,
                        access_log=None, handle_signals=False)
    await runner.setup()
    runners = [runner]
    if settings.tsdb_port is not None:   # the OpenTSDB door alone on its own port, same stream and registry
        runners.append(HttpRunner(build_tsdb_http_app(broker, tsdb_stream, body_timeout_s=settings.body_timeout,
                                                      stall_timeout_s=settings.idle_timeout, auth=auth,
                                                      client_limits=_client_limits(settings), exporter=exporter,
                                                      allowed_hosts=allowed_hosts),
                                  keepalive_timeout=settings.idle_timeout, shutdown_timeout=settings.shutdown_grace,
                                  access_log=None, handle_signals=False))
        await runners[-1].setup()
    metrics_runner: HttpRunner | None = None
    if settings.metrics_port is not None:   # /metrics, /healthz, /readyz alone (open: see api/metrics.py)
        metrics_runner = HttpRunner(build_metrics_app(exporter, _client_limits(settings), allowed_hosts),
                                    keepalive_timeout=settings.idle_timeout,
                                    shutdown_timeout=1.0, access_log=None, handle_signals=False)
        await metrics_runner.setup()
        runners.append(metrics_runner)
    server = _grpc_server(settings, max_message, broker, auth)
    servicer = SluiceServicer(broker, sources, auth=auth)
    add_servicer(servicer, server)
    grpc_health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(grpc_health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    # definitions loaded (and every source wanted running started) before a door can take a verb
    await sources.start()
    ssl_context = tls.context if tls else None
    try:
        with explain_bind_failure(settings, "http_port"):
            await Site(runner, settings.host, settings.http_port, ssl_context=ssl_context,
                       accept=_accept(runner)).start()
        http_port = runner.addresses[0][1]
        tsdb_port = None
        if settings.tsdb_port is not None:
            with explain_bind_failure(settings, "tsdb_port"):
                await Site(runners[1], settings.host, settings.tsdb_port, ssl_context=ssl_context,
                           accept=_accept(runners[1])).start()
            tsdb_port = runners[1].addresses[0][1]
        metrics_port = None
        if metrics_runner is not None:
            with explain_bind_failure(settings, "metrics_port"):
                await Site(metrics_runner, settings.host, settings.metrics_port, ssl_context=ssl_context,
                           accept=_accept(metrics_runner)).start()
            metrics_port = metrics_runner.addresses[0][1]
        with explain_bind_failure(settings, "grpc_port"):
            probe_port(settings.host, settings.grpc_port)
            address = f"{settings.host}:{settings.grpc_port}"
            grpc_port = server.add_secure_port(address, tls.grpc_credentials()) if tls \
                else server.add_insecure_port(address)
        await server.start()
    except StartupError:   # undo what started, in the order of a graceful stop
        await sources.close()
        for r in runners:
            await r.cleanup()
        if tsdb_workers is not None:
            await tsdb_workers.close()
        await broker.close()
        await store.close()
        raise
    for name in ("", SERVICE_NAME):
        await grpc_health.set(name, health_pb2.HealthCheckResponse.SERVING)
    health.listening = True

    retention = asyncio.create_task(_retention_loop(broker, settings.retention_interval), name="sluice-retention")
    trimming = asyncio.create_task(_trim_loop(_TRIM_EVERY_S), name="sluice-malloc-trim")
    storage_health = asyncio.create_task(_storage_health(broker, grpc_health, _STORAGE_HEALTH_EVERY_S),
                                         name="sluice-storage-health")
    series = asyncio.create_task(_series_loop(broker), name="sluice-metric-series")
    running = Running(broker, grpc_port, http_port, tsdb_port, tls is not None, metrics_port)
    tsdb_address = f" tsdb={settings.host}:{tsdb_port}" if tsdb_port is not None else ""
    if metrics_port is not None:
        tsdb_address += f" metrics={settings.host}:{metrics_port}"
    if not auth.enabled:
        log.warning("no --auth-file: every door is open to anyone")
        if allowed_hosts is None and not settings.allowed_hosts.strip():   # not loopback, no names, no *
            log.warning("--host %s is not a loopback address and --allowed-hosts names no host: a web page can "
                        "reach this open broker through its visitors' browsers by a name it makes resolve to it "
                        "(DNS rebinding); list the names it is reached by", settings.host)
    # the last line of the startup log (launcher.BrokerProcess.startup_log waits for it)
    log.info("sluice ready grpc=%s:%d http=%s:%d%s%s auth=%s data_dir=%s store=%s", settings.host, grpc_port,
             settings.host, http_port, tsdb_address, " tls=on" if tls else "", "on" if auth.enabled else "off",
             settings.data_dir, settings.store)
    malloc.settle_gc()   # started: what is loaded by now stays
    if on_ready:
        on_ready(running)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining in-flight requests")
        health.stopping = True   # /readyz answers 503 "shutting down" from now on
        await grpc_health.enter_graceful_shutdown()
        await sources.close()     # bounded: a stuck job does not hold the stop
        broker.begin_shutdown()   # long polls answer now, subscriptions end
        drop_waiting_writes(broker)   # and the streams whose consumers do not read do not hold the stop
        servicer.start_draining()

        async def stop_grpc() -> None:
            began = time.monotonic()
            quiet = await servicer.drained(_DRAIN_QUIET_S, settings.shutdown_grace)
            # Drained: all that may still run are subscriptions whose consumer stopped reading;
            # they would hold the stop for the whole grace period. Otherwise: what is left of it.
            await server.stop(1.0 if quiet else max(settings.shutdown_grace - (time.monotonic() - began), 1.0))

        await asyncio.gather(*(r.cleanup() for r in runners), stop_grpc())
        if tsdb_workers is not None:   # after the doors: no put waits for a worker
            await tsdb_workers.close()
        for task in (retention, trimming, storage_health, series):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await broker.close()
        await store.close()
        log.info("stopped; store closed")
