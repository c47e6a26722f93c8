"""Prometheus metrics (`GET /metrics`), liveness (`/healthz`) and readiness (`/readyz`).

The core keeps plain counters (core/stats.py) and knows nothing of Prometheus. `BrokerCollector`
is a prometheus_client custom collector: at scrape time it builds metric families from those
counters, so the hot paths pay nothing for Prometheus objects, and it reports only streams that
exist - a deleted stream's series disappear with it (bounded cardinality). What needs the store
(consumer lag, the store's size) is gathered by `refresh()` on the event loop just before the
families are built; lag is bounded to MAX_LAG_SERIES series per scrape.

Where the routes are: the HTTP port and the tsdb port (`add_routes`), and `--metrics-port` serving
them alone (`build_metrics_app`). With an auth file, `/metrics` on a door's port takes an API key
of role admin (it shows every project's streams); on `--metrics-port` it is open, like the health
endpoints everywhere: bind that port where only the scraper reaches it.

The request-latency middleware (`request_timer`) labels a request with its door (the module of
its handler: dis, timeplus, tsdb, tail) and verb (the handler's name: put_records, ...), a fixed
set; a path no route matches is verb "unmatched".
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.api.hosts import AllowedHosts
from broker.api.hosts import middlewares as host_checks
from broker.api.http import (
    PARSER_REJECTED,
    RENDERER,
    Handler,
    error_middleware,
    presented_api_key,
    refuse_cross_site,
    routing_error,
)
from broker.api.limits import CLIENT_LIMITS, ClientLimits
from broker.api.limits import middleware as limits_middleware
from broker.api.render import FALLBACK
from broker.auth import Auth, Role
from broker.core.broker import Broker
from broker.core.stats import Histogram
from broker.errors import BrokerError, ErrorCode, client_error, server_error
from broker.sources.manager import Sources

MAX_LAG_SERIES = 10_000        # consumer-lag series per scrape; the rest are counted as left out
STORE_SIZE_EVERY_S = 30.0      # the data directory is walked at most this often
_AUTH_REASONS = frozenset(c.reason for c in ErrorCode if c.name.startswith("AUTH_")) | {"PERMISSION_DENIED"}


class Health:
    """Liveness is the process answering. Readiness: the doors listen (app.py sets `listening`),
    the store takes writes (not FULL / FAILED) and the broker is not shutting down."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.listening = False
        self.stopping = False   # app.py: a stop began (before the broker's own shutdown does)

    def ready(self) -> tuple[bool, str]:
        if self.stopping or self.broker.shutting_down:
            return False, "shutting down"
        if not self.listening:
            return False, "starting"
        state = self.broker.storage_state
        if state.name != "OK":
            return False, f"storage {state.name.lower()}"
        return True, "ready"


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(h.bounds, h.counts):
        total += n
        out.append((repr(float(bound)), total))
    out.append(("+Inf", h.count))
    return out


class BrokerCollector(Collector):
    def __init__(self, broker: Broker, sources: Sources | None = None, data_dir: str | None = None) -> None:
        self.broker = broker
        self.sources = sources
        self.data_dir = data_dir
        self._lag: list[tuple[str, str, str, int, int]] = []
        self._lag_left_out = 0
        self._store_size: int | None = None
        self._sized_at = -STORE_SIZE_EVERY_S
        self._refreshing = asyncio.Lock()

    async def refresh(self, project: str | None = None) -> None:
        """What needs the store, gathered before a scrape: consumer lag (of `project` only, when
        given: a key's scrape shows its own project's), the store's size."""
        async with self._refreshing:
            self._lag, self._lag_left_out = await self.broker.consumers.lag_snapshot(MAX_LAG_SERIES, project)
            if self.data_dir and time.monotonic() - self._sized_at >= STORE_SIZE_EVERY_S:
                self._sized_at = time.monotonic()
                self._store_size = await asyncio.to_thread(_directory_size, self.data_dir)

    def collect(self) -> Iterator[Metric]:
        return self.frozen().collect()

    def frozen(self) -> _Frozen:
        """This moment's families, for a scrape: what is per partition (four series each: tens of
        thousands on a big broker, seconds of work) as plain copies of its counters, made into
        families and text by the caller off the event loop; the rest (a few dozen) as families."""
        return _Frozen(self._stream_rows(), [*self._requests(), *self._commits(), *self._consumers(),
                                             *self._sources(), *self._store()])

    def _stream_rows(self) -> list[_StreamRow]:
        """Per stream, copies of what its families show (C-level copies: the loop may change the
        originals while a thread reads these)."""
        stats = self.broker.stats.streams
        rows = []
        for config in self.broker.catalogue.all():
            s = stats.get(config.stream_id)
            counters = () if s is None else (s.put_records[:], s.put_bytes[:], s.get_records[:], s.get_bytes[:])
            rows.append(_StreamRow(config.project, config.stream_name, config.partition_count,
                                   config.readable_partition_count, counters,
                                   (s.put_requests, s.get_requests, s.throttled_records) if s else (0, 0, 0),
                                   sorted(s.failures.items()) if s else []))
        return rows

    def _requests(self) -> Iterator[Metric]:
        stats = self.broker.stats
        latency = HistogramMetricFamily("sluice_request_duration_seconds", "Request latency per door and verb",
                                        labels=["door", "verb"])
        for (door, verb), h in sorted(stats.requests.items()):
            latency.add_metric([door, verb], _buckets(h), h.sum)
        errors = CounterMetricFamily("sluice_request_errors", "Requests answered with an error, by door and "
                                     "catalogue reason", labels=["door", "reason"])
        auth = CounterMetricFamily("sluice_auth_failures", "Requests refused by authentication or authorization, "
                                   "by door and DIS code", labels=["door", "code", "reason"])
        for (door, reason), n in sorted(stats.request_errors.items()):
            errors.add_metric([door, reason], n)
            if reason in _AUTH_REASONS:
                auth.add_metric([door, ErrorCode[reason].dis_code, reason], n)
        subs = GaugeMetricFamily("sluice_subscriptions_open", "Open push subscriptions (gRPC Subscribe, SSE "
                                 "tails, streaming-query readers); produce streams are not counted here",
                                 value=stats.subscriptions)
        produce = GaugeMetricFamily("sluice_produce_streams_open", "Open streaming produce calls (gRPC "
                                    "PutRecordsStream)", value=stats.produce_streams)
        queries = GaugeMetricFamily("sluice_queries_running", "Streaming SQL queries running",
                                    value=self.broker.queries.running())
        remote = CounterMetricFamily("sluice_remote_appends", "Partitions whose readers another broker's appends "
                                     "woke (a shared store: one per partition per burst of its notifications)",
                                     value=stats.remote_appends)
        changes = CounterMetricFamily("sluice_remote_stream_changes", "Streams another broker created, scaled or "
                                      "deleted, taken into this broker's catalogue (a shared store)",
                                      value=stats.remote_stream_changes)
        yield from (latency, errors, auth, subs, produce, queries, remote, changes)

    def _commits(self) -> Iterator[Metric]:
        stats = self.broker.stats
        seconds = HistogramMetricFamily("sluice_commit_duration_seconds", "One group commit (one store append)")
        seconds.add_metric([], _buckets(stats.commit_seconds), stats.commit_seconds.sum)
        records = HistogramMetricFamily("sluice_commit_records", "Records per group commit")
        records.add_metric([], _buckets(stats.commit_records), stats.commit_records.sum)
        failures = CounterMetricFamily("sluice_commit_failures", "Group commits the store refused",
                                       value=stats.commit_failures)
        yield from (seconds, records, failures)

    def _consumers(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily("sluice_consumer_lag_records", "Records after an app's checkpoint, per partition",
                                labels=["project", "app", "stream", "partition"])
        for project, app, stream, p, n in self._lag:
            lag.add_metric([project, app, stream, str(p)], n)
        left = GaugeMetricFamily("sluice_consumer_lag_series_left_out", f"Checkpoints beyond the {MAX_LAG_SERIES} "
                                 "lag series of one scrape", value=self._lag_left_out)
        yield from (lag, left)

    def _sources(self) -> Iterator[Metric]:
        lab = ["project", "source", "type", "stream"]
        messages = CounterMetricFamily("sluice_source_messages_in", "Messages a source received", labels=lab)
        rows = CounterMetricFamily("sluice_source_rows_written", "Rows a source appended durably", labels=lab)
        errors = CounterMetricFamily("sluice_source_errors", "Messages a source skipped and failed attempts",
                                     labels=lab)
        status = GaugeMetricFamily("sluice_source_status", "1 for a source's current status",
                                   labels=[*lab, "status"])
        for source in self.sources.all() if self.sources is not None else ():
            d, st = source.definition, source.state
            names = [d.project, d.name, d.type, d.stream]
            messages.add_metric(names, st.messages_in)
            rows.add_metric(names, st.rows_written)
            errors.add_metric(names, st.errors)
            status.add_metric([*names, st.status], 1)
        yield from (messages, rows, errors, status)

    def _store(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("sluice_storage_state", "1 for the store's current state (ok: writes taken; "
                                  "full / failed: refused until it recovers)", labels=["state"])
        current = self.broker.storage_state
        for s in type(current):   # every state of the store's enum (doors do not import storage)
            state.add_metric([s.name.lower()], 1 if s is current else 0)
        yield state
        if self._store_size is not None:
            yield GaugeMetricFamily("sluice_store_size_bytes", "Size of the data directory (walked at most every "
                                    f"{STORE_SIZE_EVERY_S:.0f} s)", value=self._store_size)
        yield GaugeMetricFamily("sluice_commits", "Group commits since start", value=self.broker.commits)


@dataclass
class _StreamRow:
    project: str
    stream: str
    partition_count: int
    readable: int
    counters: tuple[list[int], ...]   # put records, put bytes, get records, get bytes: per partition
    totals: tuple[int, int, int]      # put requests, get requests, throttled records
    failures: list[tuple[str, int]]


class _Frozen(Collector):
    """A scrape's families (BrokerCollector.frozen): those per partition made from the rows when
    collected, in a thread (generate_latest collects as it writes)."""

    def __init__(self, rows: list[_StreamRow], others: list[Metric]) -> None:
        self.rows, self.others = rows, others

    def collect(self) -> Iterator[Metric]:
        yield from self._streams()
        yield from self.others

    def _streams(self) -> Iterator[Metric]:
        part = ["project", "stream", "partition"]
        rec_in = CounterMetricFamily("sluice_records_in", "Records appended, per partition", labels=part)
        bytes_in = CounterMetricFamily("sluice_bytes_in", "Payload bytes appended, per partition", labels=part)
        rec_out = CounterMetricFamily("sluice_records_out", "Records handed to consumers (GetRecords, "
                                      "subscriptions, tails) and read by queries, per partition", labels=part)
        bytes_out = CounterMetricFamily("sluice_bytes_out", "Payload bytes handed to consumers", labels=part)
        lab = ["project", "stream"]
        puts = CounterMetricFamily("sluice_put_requests", "Put calls answered (any door), per stream", labels=lab)
        gets = CounterMetricFamily("sluice_get_requests", "GetRecords calls answered, per stream", labels=lab)
        failed = CounterMetricFamily("sluice_record_failures", "Records refused inside an answered put, by "
                                     "catalogue reason", labels=[*lab, "reason"])
        throttled = CounterMetricFamily("sluice_throttled_records", "Records refused for the partition write "
                                        "limit (DIS.4303)", labels=lab)
        partitions = GaugeMetricFamily("sluice_stream_partitions", "ACTIVE (writable) partitions of each stream",
                                       labels=lab)
        for row in self.rows:
            names = [row.project, row.stream]
            partitions.add_metric(names, row.partition_count)
            for p in range(row.readable):   # DELETED ones too: readable until retention
                labels = [*names, str(p)]
                values = tuple(v[p] if p < len(v) else 0 for v in row.counters) if row.counters else (0, 0, 0, 0)
                for family, value in zip((rec_in, bytes_in, rec_out, bytes_out), values):
                    family.add_metric(labels, value)
            for family, value in zip((puts, gets, throttled), row.totals):
                family.add_metric(names, value)
            for reason, n in row.failures:
                failed.add_metric([*names, reason], n)
        yield from (rec_in, bytes_in, rec_out, bytes_out, puts, gets, failed, throttled, partitions)


def _directory_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:   # removed while walking (a compaction)
                pass
    return total


# -- the routes -------------------------------------------------------------------------------------

class _OneProject(Collector):
    """The broker's families with only one project's series: a key reaches only its own project
    (issue 11), so an admin key of p2 must not see p1's streams, apps or sources. Series without a
    project label (doors, commits, the store) describe the broker, not a project, and stay."""

    def __init__(self, inner: Collector, project: str) -> None:
        self.inner = inner
        self.project = project

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [s for s in family.samples if s.labels.get("project", self.project) == self.project]
            yield family


class Exporter:
    """The broker's collector, and the three handlers."""

    def __init__(self, collector: BrokerCollector, health: Health, auth: Auth | None = None) -> None:
        self.collector = collector
        self.health = health
        self.auth = auth

    async def metrics(self, request: web.Request, open_: bool = False) -> web.Response:
        project: str | None = None   # an admin key sees its own project's series only
        if not open_ and self.auth is not None and self.auth.enabled:
            who = self.auth.api_key(presented_api_key(request))
            if who.role is not Role.ADMIN:
                raise client_error(ErrorCode.PERMISSION_DENIED, detail="/metrics takes an admin API key")
            project = who.project
        await self.collector.refresh(project)
        frozen = self.collector.frozen()   # at once, no await between: the lag just gathered for `project`
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(frozen if project is None else _OneProject(frozen, project))
        # off the loop: 100,000 partitions are 400,000 series, ~2 s of formatting that would stall
        # every door (and /healthz) meanwhile
        body = await asyncio.to_thread(generate_latest, scrape)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def open_metrics(self, request: web.Request) -> web.Response:
        return await self.metrics(request, open_=True)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, why = self.health.ready()
        return web.json_response({"status": why}, status=200 if ready else 503)


def add_routes(app: web.Application, exporter: Exporter, metrics: bool = True, open_metrics: bool = False) -> None:
    """/healthz, /readyz and (with `metrics`) /metrics on a root app; `open_metrics`: no key asked."""
    app.router.add_get("/healthz", exporter.healthz)
    app.router.add_get("/readyz", exporter.readyz)
    if metrics:
        app.router.add_get("/metrics", exporter.open_metrics if open_metrics else exporter.metrics)


def build_metrics_app(exporter: Exporter, client_limits: ClientLimits | None = None,
                      allowed_hosts: AllowedHosts | None = None) -> web.Application:
    """`--metrics-port`: /metrics (open), /healthz and /readyz alone, with the per-client limits
    and Host names of every HTTP port (`client_limits`, `allowed_hosts`) and the fallback door's
    error bodies (unknown paths)."""
    broker = exporter.health.broker
    app = web.Application(middlewares=[error_middleware([], FALLBACK), request_timer(broker),
                                       *host_checks(allowed_hosts),
                                       *([] if client_limits is None else [limits_middleware(client_limits)])])
    app[RENDERER] = FALLBACK
    count_rejections(app, broker)
    if client_limits is not None:
        app[CLIENT_LIMITS] = client_limits
    add_routes(app, exporter, open_metrics=True)
    return app


def count_rejections(app: web.Application, broker: Broker) -> None:
    """The requests aiohttp's parser refuses on this app's port (before any middleware): errors
    of door "http", verb "malformed"."""
    stats = broker.stats

    def rejected(error: BrokerError) -> None:
        stats.observe_request("http", "malformed", 0.0, error)

    app[PARSER_REJECTED] = rejected


def _door_and_verb(request: web.Request) -> tuple[str, str]:
    route = request.match_info.route
    handler: Any = getattr(route, "handler", None)
    if handler is None or getattr(route, "resource", None) is None:
        return "http", "unmatched"
    return handler.__module__.rsplit(".", 1)[-1], handler.__name__


def request_timer(broker: Broker) -> Middleware:
    """Latency of every request per door and verb, and errors by catalogue reason (auth failures
    among them): plain counters in broker.stats. Inside the error middleware, so it sees the
    error before it is rendered, and outside the per-client limits, so their refusals count too.
    aiohttp's routing exceptions (404, 405, 413) count as the rows the error middleware renders
    them as, anything unexpected as INTERNAL."""
    stats = broker.stats

    @web.middleware
    async def timed(request: web.Request, handler: Handler) -> web.StreamResponse:
        began = time.perf_counter()
        error: BrokerError | None = None
        try:
            refuse_cross_site(request)   # here, not a middleware of its own: one less per request
            return await handler(request)
        except BrokerError as exc:
            error = exc
            raise
        except web.HTTPException as exc:
            if exc.status >= 400:
                error = routing_error(request, exc)
            raise
        except Exception:
            error = server_error(ErrorCode.INTERNAL)
            raise
        finally:
            door, verb = _door_and_verb(request)
            stats.observe_request(door, verb, time.perf_counter() - began, error)
            # the error's traceback holds this frame: kept in a local it would make a reference
            # cycle that keeps the request and its body alive until a full garbage collection
            error = None

    return timed
