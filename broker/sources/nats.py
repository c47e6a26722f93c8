"""`nats` (core NATS) and `nats_jetstream` (a JetStream pull consumer): shared/spec/sources.md
sections 4 and 5, with nats-py.

Connection (both types). One nats-py connection per job, to the servers of `url` (nats:// or
tls://). The first connect tries each server twice with short timeouts and raises when none
answers, so the source shows `failed` at once and the manager backs off and runs a new job. Once
connected, nats-py reconnects on its own for a while (`RECONNECT_ATTEMPTS` x `RECONNECT_WAIT_S`
per server); meanwhile the source shows `failed` ("disconnected ...; reconnecting") and `running`
again once reconnected. When nats-py gives up it closes the connection, the job raises, and the
manager's backoff takes over. The connection is closed in a `finally` with a bounded wait, so a
stop, a delete or the broker's shutdown never waits on a server.

TLS [ours; nats-py upgrades a connection to TLS only when the server's INFO says `tls_required`]:
- `tls.disable: false` (the default) with a nats:// URL: TLS when the server requires it, plain
  otherwise; with a tls:// URL: TLS is required, and a server that does not require TLS is refused
  (the source fails with a message) rather than used in plain text.
- `tls.disable: true`: never TLS. A tls:// URL is then refused at create time (BAD_SOURCE
  `tls.disable`), and a server that requires TLS fails the source with a message.
- `tls.skip_verify_server: true`: the server's certificate and host name are not checked.

Core NATS (`nats`): a subscription (in the `queue` group when given: members share the messages)
on `subject` (wildcards allowed). Received messages are buffered and each time the job wakes, all
of them (up to `MAX_BATCH` per append) go to the sink as one batch: no fixed linger, a quiet
subject costs one append per message, a busy one batches by itself while an append runs.
`prefetch_count` is the subscription's pending-messages limit, and the job's own buffer holds at
most as many again; beyond that nats-py drops messages (NATS's slow consumer; each drop is counted
as an error). At-most-once: messages published while the source is stopped or disconnected are
lost, and so is a batch whose append failed. `nak_delay` is checked and ignored. Lag: messages
received and not yet appended.

JetStream (`nats_jetstream`). Which consumer:
- `stream` names the stream; without it the stream holding `subject` is looked up. `subject`
  (wildcards allowed) filters the consumer; without it the consumer reads the whole stream.
- `durable` names a durable pull consumer: its position lives in the server and survives stops,
  broker restarts and server restarts. Created (`deliver`, `ack_wait`, `max_ack_pending`, the
  filter) when it does not exist; an existing one is used with its own settings (delete it to
  change them), and its ack policy is followed.
- `queue` [ours]: a pull consumer has no deliver group; the members of a queue group share one
  durable pull consumer instead, named by `durable` or, without it, by `queue`, and the server
  shares the stream's messages out over the members' pull requests. Acks are explicit, so no
  member acknowledges another's messages.
- `bind: true`: attach to an existing consumer named by `durable` (or `queue`); nothing is
  created, and the consumer's own filter applies (`subject` then only finds the stream). A missing
  consumer fails the source with a message naming it and the stream, and the manager keeps
  retrying (the consumer may be created later). A push consumer is refused the same way.
- neither `durable` nor `queue`: an ephemeral consumer (the server removes it after
  `EPHEMERAL_INACTIVE_S` without us). Within one run of the source (start to stop) a retry resumes
  after the last message appended, or where the run's first consumer started if none was (from the
  first message when the stream was made again meanwhile); a stop/start or a broker restart starts
  again per `deliver` (spec: only a durable consumer's position survives restarts).
- `deliver`: all | last | new, for a consumer being created.

Delivery: messages are pulled in batches (requests of `min(max_ack_pending / 2, prefetch_count,
JS_MAX_BATCH)` messages, within an existing consumer's own max_batch, max_bytes and max_expires,
which the server refuses a request past; a message bigger than our byte bound is asked for alone,
unbounded, and one bigger than the consumer's fails the source; one request open at a time, the next
asked for while a batch is being appended), every batch goes to `ctx.sink.write` and is acknowledged
only after the write returned, i.e. after the append is durable; while the append waits (a throttled
target: the sink waits its limit out), the batch and the messages pulled meanwhile are marked in
progress (+WPI) every `ack_wait / 4`, so the server does not deliver them again. A message that
cannot be a row (bad JSON) is counted by the sink and acknowledged with its batch, so it does not
come back. When the append fails the batch is negatively acknowledged (redelivered after
`nak_delay`, at once without it) and the job raises, so the manager backs off. When the job is
stopped, the batch being appended is finished and acknowledged first (waiting at most
`CLOSE_WAIT_S`; an append still under way then runs on and is acknowledged once it lands), so a stop
or a graceful broker restart duplicates nothing; messages pulled and not yet appended are negatively
acknowledged (once no pull request of ours can be waiting on the server and the pull inbox is
drained; when that is not known they wait out `ack_wait` instead: see `_Puller.stop`), so a restart
gets them without waiting for `ack_wait`; such a stop takes up to ~4 s longer, for that request's
end. Nothing is given back with AckPolicy.NONE, nor to an ephemeral consumer (the next run makes
another). A crash between an append and its acknowledgement redelivers that batch: duplicates are
bounded by `max_ack_pending` (the server delivers no more than that unacknowledged), nothing is
lost. Consumers we create use explicit acks [ours]: an AckPolicy.ALL ack covers every lower
sequence, so it would also cover messages that another member sharing the consumer, or a run of this
source that crashed, had pulled and not appended yet (the server redelivers those only after
`ack_wait`, while newer ones flow at once): that would lose them. Explicit acks cost ~8% of the
rows/s (`bench/run.py sources --ack-policy both`). With an existing consumer its policy is followed:
`all` acks each batch's highest stream sequence (so the caveat above is the consumer owner's choice), `none`
acks nothing (at-most-once). `nak_delay` [ours for JetStream] is the redelivery delay of a batch
whose append failed; `prefetch_count` [ours] bounds the pull batch. Lag: the consumer's pending
count (`num_pending`) from each batch's last message, and from the consumer's info at most every
`LAG_EVERY_S` while idle.

Not supported: JetStream domains/API prefixes other than `$JS.API`, credentials (user/password in
the URL work: nats-py reads them from it).
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import itertools
import logging
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from broker.natsconn import close_for_good, connect_or_give_up, nats_identity
from broker.sources.base import JobContext, SourceType
from broker.sources.props import Props, bad, shown_url
from broker.sources.sink import DATA_TYPES

log = logging.getLogger("sluice.sources.nats")

SCHEMES = ("nats", "tls")
CONNECT_TIMEOUT_S = 2.0        # one TCP connect (and TLS handshake)
RECONNECT_WAIT_S = 0.5         # between nats-py's attempts on one server
RECONNECT_ATTEMPTS = 20        # per server once connected (~10 s), then the job fails and backs off
RECONNECT_GIVE_UP_S = 30.0     # reconnecting longer than this (nats-py stuck): the job fails all the same
CONNECT_DEADLINE_S = 2 * (CONNECT_TIMEOUT_S + RECONNECT_WAIT_S) + 1   # the first connect, per server
PING_INTERVAL_S = 10           # a silent dead connection is found within ~30 s
MAX_OUTSTANDING_PINGS = 2
CLOSE_WAIT_S = 2.0             # closing the connection at the end of a job, at most
API_TIMEOUT_S = 5.0            # a JetStream API request (consumer info/create, stream lookup)
MAX_BATCH = 5000               # core NATS: messages per append, at most
MAX_BATCH_BYTES = 4 << 20      # and payload bytes per append (one message more than that alone)
# core NATS: what a job holds beyond nats-py's own queue, at most (then it holds nats-py's delivery,
# whose queue fills up to PENDING_BYTES and then drops as a slow consumer: core NATS is at most
# once). By count alone (prefetch_count, 524,288 by default) a flood of big messages held gigabytes.
BUFFER_BYTES = 16 << 20
PENDING_BYTES = 64 << 20       # nats-py's queue of one subscription (its default, said here)
JS_MAX_BATCH = 2000            # JetStream: messages per pull request, at most
PULL_EXPIRES_S = 2.0           # a pull request waits this long for messages, then is asked again
PULL_MAX_BYTES = 32 << 20      # and brings at most this much (the server ends it with a 409 status)
STOP_GRACE_S = 0.5             # a stopping job waits this long past its open request's expiry for the 408
ANSWER_GRACE_S = 1.5           # and this much longer when what it holds is given back only after the 408
REFUSED_WAIT_S = 0.5           # a request refused for want of room (max_waiting): the next this much later
PULL_GRACE_S = 3.0             # no answer this long after a request expired: it was lost, ask again
LAG_EVERY_S = 1.0              # consumer info while idle, at most this often
EPHEMERAL_INACTIVE_S = 30.0    # an ephemeral consumer outlives its job this long
DEFAULT_PREFETCH = 524_288     # spec section 4
DEFAULT_ACK_WAIT_MS = 30_000   # spec section 5
DEFAULT_MAX_ACK_PENDING = 1024
DELIVER = {"all": DeliverPolicy.ALL, "last": DeliverPolicy.LAST, "new": DeliverPolicy.NEW}
STREAM_NOT_FOUND = 10059       # JetStream's err_code

_BAD_NAME = re.compile(r"[\s.*>/\\]")    # JetStream stream and consumer names


# -- properties ---------------------------------------------------------------------------------

def _subject(props: Props, key: str, required: bool) -> str | None:
    """A NATS subject: dot-separated non-empty tokens without spaces; `*` and `>` only as whole
    tokens, `>` only last."""
    value = props.text(key, required=required)
    if value is None:
        return None
    tokens = value.split(".")
    if any(not t or re.search(r"\s", t) for t in tokens):
        raise bad(key, f"[{value[:200]}] is not a NATS subject: tokens separated by dots, none empty, no spaces")
    for i, t in enumerate(tokens):
        if ("*" in t and t != "*") or (">" in t and t != ">") or (t == ">" and i != len(tokens) - 1):
            raise bad(key, f"[{value[:200]}] is not a NATS subject: `*` stands for one whole token and `>` "
                           "for the last ones")
    return value


def _name(props: Props, key: str, what: str) -> str | None:
    value = props.text(key)
    if value is None:
        return None
    if not value or _BAD_NAME.search(value) or len(value) > 255:
        raise bad(key, f"[{value[:200]}] is not a valid {what}: 1-255 characters, no spaces, dots, `*`, `>`, "
                       "`/` or `\\`")
    return value


def _queue_group(props: Props) -> str | None:
    value = props.text("queue")
    if value is None:
        return None
    if not value or re.search(r"\s", value) or len(value) > 255:
        raise bad("queue", f"[{value[:200]}] is not a valid queue group name: 1-255 characters, no spaces")
    return value


@dataclass(frozen=True)
class Connection:
    urls: tuple[str, ...]
    tls_disable: bool
    tls_skip_verify: bool

    @property
    def wants_tls(self) -> bool:
        return any(u.lower().startswith("tls://") for u in self.urls)


def _connection(props: Props) -> Connection:
    urls = tuple(props.urls("url", SCHEMES))
    tls_disable = props.boolean("tls.disable", False)
    skip_verify = props.boolean("tls.skip_verify_server", False)
    conn = Connection(urls, tls_disable, skip_verify)
    if tls_disable and conn.wants_tls:
        raise bad("tls.disable", "is true, but a tls:// URL asks for TLS; use nats:// or leave TLS on")
    return conn


@dataclass(frozen=True)
class NatsConfig:
    conn: Connection
    subject: str
    data_type: str
    queue: str | None
    nak_delay_ms: int | None
    prefetch: int


def configure_nats(props: Props) -> NatsConfig:
    conn = _connection(props)
    subject = _subject(props, "subject", True)
    assert subject is not None
    data_type = props.choice("data_type", DATA_TYPES, required=True)
    queue = _queue_group(props)
    nak_delay = props.duration_ms("nak_delay")   # checked; core NATS has no acknowledgements
    prefetch = props.integer("prefetch_count", DEFAULT_PREFETCH, 1, 16 * 1024 * 1024)
    props.finish()
    return NatsConfig(conn, subject, data_type, queue, nak_delay, prefetch)


class _Position:
    """Where an ephemeral consumer's job got to (the next stream sequence) in which stream (its
    creation time: a stream deleted and made again numbers its messages from 1 again), kept across
    the retries of one run of the source: the config object lives as long as that run."""

    def __init__(self) -> None:
        self.next_seq = 0
        self.stream_created: object = None
        self.no_stream_info = False   # STREAM.INFO went unanswered once (not permitted): not asked again


@dataclass(frozen=True)
class JetStreamConfig:
    conn: Connection
    subject: str | None
    stream: str | None
    data_type: str
    queue: str | None
    durable: str | None
    deliver: str
    bind: bool
    ack_wait_ms: int
    max_ack_pending: int
    nak_delay_ms: int | None
    prefetch: int
    position: _Position = field(default_factory=_Position, compare=False, repr=False)

    @property
    def consumer_name(self) -> str | None:
        return self.durable or self.queue


def configure_jetstream(props: Props) -> JetStreamConfig:
    conn = _connection(props)
    subject = _subject(props, "subject", False)
    stream = _name(props, "stream", "JetStream stream name")
    if subject is None and stream is None:
        raise bad("subject", "or stream is required: the subject to consume, or the JetStream stream (or both)")
    data_type = props.choice("data_type", DATA_TYPES, required=True)
    queue = _name(props, "queue", "queue group (it names the shared pull consumer)")
    durable = _name(props, "durable", "durable consumer name")
    deliver = props.choice("deliver", tuple(DELIVER), default="all")
    bind = props.boolean("bind", False)
    if bind and not (durable or queue):
        raise bad("bind", "needs the name of the consumer to attach to: set durable")
    ack_wait = props.duration_ms("ack_wait", DEFAULT_ACK_WAIT_MS)
    assert ack_wait is not None
    max_ack_pending = props.integer("max_ack_pending", DEFAULT_MAX_ACK_PENDING, 1, 1_000_000)
    nak_delay = props.duration_ms("nak_delay")
    prefetch = props.integer("prefetch_count", DEFAULT_PREFETCH, 1, 16 * 1024 * 1024)
    props.finish()
    return JetStreamConfig(conn, subject, stream, data_type, queue, durable, deliver, bind, ack_wait,
                           max_ack_pending, nak_delay, prefetch)


# -- the connection -----------------------------------------------------------------------------

def _describe(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, nats.js.errors.APIError) and e.description:
        text = e.description
    return text if text and not text.startswith("nats: ") else (text[6:] if text else type(e).__name__)


@functools.lru_cache(maxsize=2)
def _tls_context(skip_verify: bool) -> ssl.SSLContext:
    """One client context per verify mode, shared by every connection: each made anew loaded the
    system's CA store again (~0.8 MB a running source, and RSS crept up with sources made and
    deleted). A context is not changed once made, so sharing it is safe."""
    tls = ssl.create_default_context()
    if skip_verify:
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    return tls


_VIOLATION = re.compile(r'permissions violation for (?:subscription|publish) to "([^"]*)"', re.IGNORECASE)


class _Link:
    """One nats-py connection for one job, and what the source's status says about it."""

    def __init__(self, conn: Connection, ctx: JobContext, wake: Callable[[], None]) -> None:
        self.conn, self.ctx, self._wake = conn, ctx, wake
        self.nc = NATS()
        self.last_error: BaseException | None = None
        self.closing = False
        self.closed = False
        self.connected = False
        self.down_since = 0.0          # when the connection was lost; 0 while it is up
        self._tls_failed = asyncio.Event()
        self.on_reconnect: Callable[[], None] = lambda: None
        # whether the job needs a subject (subscribes or publishes to it); the server refusing one
        # (a permissions violation: -ERR, and the connection stays up) fails the job: `check`
        self.needs: Callable[[str], bool] = lambda subject: False
        self.refused = ""

    def _where(self) -> str:
        return ", ".join(map(shown_url, self.conn.urls))   # never a password: status messages are shown to every role

    async def open(self) -> NATS:
        tls = None if self.conn.tls_disable else _tls_context(self.conn.tls_skip_verify)
        connect = self.nc.connect(
            servers=list(self.conn.urls), name="sluice-source", tls=tls,
            connect_timeout=CONNECT_TIMEOUT_S,  # type: ignore[arg-type]  # nats-py takes seconds
            reconnect_time_wait=RECONNECT_WAIT_S,  # type: ignore[arg-type]
            max_reconnect_attempts=1, allow_reconnect=True,
            ping_interval=PING_INTERVAL_S, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            error_cb=self._error, disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
            closed_cb=self._closed)
        # Bounded: a TLS failure will not go away by trying the server again
        try:
            if not await connect_or_give_up(connect, self._tls_failed, CONNECT_DEADLINE_S * len(self.conn.urls),
                                            CLOSE_WAIT_S):
                raise self.last_error or TimeoutError("no answer")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            cause = self.last_error or e
            if self.conn.tls_disable and isinstance(cause, ssl.SSLError):
                raise ConnectionError(f"the NATS server at {self._where()} requires TLS and tls.disable is "
                                      "true") from None
            raise ConnectionError(f"cannot connect to NATS at {self._where()}: {_describe(cause)}") from None
        # from now on nats-py reconnects by itself for a while (the first connect tried each server twice)
        self.nc.options["max_reconnect_attempts"] = RECONNECT_ATTEMPTS
        self.connected = True
        info: dict[str, Any] = getattr(self.nc, "_server_info", None) or {}
        if self.conn.wants_tls and not info.get("tls_required"):
            at = shown_url(self.nc.connected_url.geturl()) if self.nc.connected_url else self._where()
            raise ConnectionError(f"the url asks for TLS (tls://) but the NATS server at {at} does not use TLS")
        if self.conn.tls_disable and info.get("tls_required"):
            raise ConnectionError(f"the NATS server at {self._where()} requires TLS and tls.disable is true")
        if self._on_own_server():
            raise ConnectionError(f"the NATS server at {self._where()} is the one this broker keeps its data "
                                  "on (--nats-servers): it cannot be a source")
        return self.nc

    def _on_own_server(self) -> bool:
        """Whether the server connected to holds the broker's own data (--store jetstream): no
        source may read it - through it one project would read every project's records and
        metadata, and a source on its subjects feeds itself. By server id or cluster name."""
        info: dict[str, Any] = getattr(self.nc, "_server_info", None) or {}
        return bool(nats_identity(info) & self.ctx.own_servers())

    def check(self) -> None:
        """Raise when nats-py gave up on the connection, or has been reconnecting for too long."""
        lost = self.closed or self.nc.is_closed
        if self.down_since and time.monotonic() - self.down_since > RECONNECT_GIVE_UP_S:
            lost = True
        if self.refused:
            raise PermissionError(f"the NATS server at {self._where()} refuses it: {self.refused}")
        if lost:
            # a protocol error the server closed the connection for (-ERR) nats-py keeps as its own
            # last error, without calling error_cb: the status said no more than "lost"
            error = self.last_error or self.nc.last_error
            why = f": {_describe(error)}" if error else ""
            raise ConnectionError(f"lost the connection to NATS at {self._where()}{why}")

    async def close(self) -> None:
        self.closing = True
        await close_for_good(self.nc, CLOSE_WAIT_S)

    async def _error(self, e: Exception) -> None:
        if isinstance(e, nats.errors.SlowConsumerError):
            self.ctx.state.error("slow consumer: the source fell behind and NATS dropped a message")
            return
        # nats-py gives the server's text in lower case, the subject too
        violation = _VIOLATION.search(str(e))
        if violation and self.needs(violation.group(1)):
            self.refused = _describe(e)
            self._wake()
        self.last_error = e
        if isinstance(e, ssl.SSLError) and not self.connected:
            self._tls_failed.set()
        log.debug("nats: %s", _describe(e))

    async def _disconnected(self) -> None:
        if not self.closing and not self.nc.is_closed and not self.ctx.ending:   # (a stopped source: stopped)
            self.down_since = self.down_since or time.monotonic()
            why = f" ({_describe(self.last_error)})" if self.last_error else ""
            self.ctx.state.failed(f"disconnected from NATS at {self._where()}{why}; reconnecting")

    async def _reconnected(self) -> None:
        if self._on_own_server():   # another node of the broker's own cluster
            self.last_error = ConnectionError("reconnected to a NATS server this broker keeps its data on")
            self.closed = True
            self._wake()
            return
        self.down_since = 0.0
        self.ctx.connected()
        self.on_reconnect()
        self._wake()

    async def _closed(self) -> None:
        self.closed = True
        self._wake()


# -- core NATS ----------------------------------------------------------------------------------

class NatsJob:
    def __init__(self, config: NatsConfig) -> None:
        self.config = config
        self._buf: list[bytes] = []
        self._held = 0   # payload bytes in _buf
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def _on_msg(self, msg: Msg) -> None:
        self._buf.append(msg.data)
        self._held += len(msg.data)
        self._wake.set()
        # full: hold nats-py's delivery until we caught up
        if len(self._buf) >= self.config.prefetch or self._held >= BUFFER_BYTES:
            self._room.clear()
            await self._room.wait()

    def _take(self) -> list[bytes]:
        """The next batch off the buffer: up to MAX_BATCH messages and MAX_BATCH_BYTES (at least one)."""
        ends = list(itertools.accumulate(map(len, itertools.islice(self._buf, MAX_BATCH))))
        n = max(1, bisect.bisect_right(ends, MAX_BATCH_BYTES))
        batch = self._buf[:n]
        del self._buf[:n]
        self._held -= ends[n - 1]
        return batch

    async def run(self, ctx: JobContext) -> None:
        c = self.config
        link = _Link(c.conn, ctx, self._wake.set)
        link.needs = lambda subject: subject == c.subject.lower()
        try:
            nc = await link.open()
            sub: Subscription = await nc.subscribe(c.subject, queue=c.queue or "", cb=self._on_msg,
                                                   pending_msgs_limit=c.prefetch, pending_bytes_limit=PENDING_BYTES)
            await nc.flush(timeout=int(API_TIMEOUT_S))
            link.check()   # a refused subscription is answered before the flush's PONG
            ctx.connected()
            while True:
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
                # arrives as the event is set, and a stopped job would go on consuming
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
                self._wake.clear()
                while self._buf:
                    batch = self._take()
                    self._room.set()
                    ctx.state.lag = len(self._buf) + sub.pending_msgs
                    await ctx.sink.write(batch)
                ctx.state.lag = sub.pending_msgs
                link.check()
        finally:
            self._room.set()
            await link.close()


# -- JetStream ----------------------------------------------------------------------------------

class _Puller:
    """Pull requests to one consumer on an inbox of our own: one request open at a time, the
    messages handed out as they arrive (no waiting for a request to fill up). A request no longer
    followed (a reconnect, no answer in time) may still wait on the server or answer late (see
    `_lose`); no other is asked until then, since an answer cannot be told apart by request
    (messages carry the stream's subject, not the request's)."""

    def __init__(self, nc: NATS, stream: str, consumer: str, batch: int, wake: asyncio.Event,
                 max_bytes: int | None = None, expires_s: float | None = None, consumer_max_bytes: int = 0) -> None:
        self.nc, self.batch, self.wake = nc, batch, wake
        # a request's bounds: ours, or the consumer's own when lower (`_pull_limits`)
        self.max_bytes = PULL_MAX_BYTES if max_bytes is None else max_bytes
        self.expires_s = PULL_EXPIRES_S if expires_s is None else expires_s
        self.consumer_max_bytes = consumer_max_bytes   # the consumer's own bound (0: none)
        self.requested = batch       # messages the open request asked for
        self.ask_after = 0.0         # no request before (the last one was refused for want of room)
        self.one_unbounded = False   # the next request: one message, no byte bound
        self.consumer = consumer
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = ""
        self.buf: list[Msg] = []
        self.open = False          # a request is open (not yet filled, expired or refused)
        self.left = 0              # messages the open request may still bring
        self.asked_at = 0.0
        # until when a request we stopped following may still wait on the server or answer
        self.lost_until = 0.0
        self.fatal: str | None = None
        self.stopping = False
        self.sub: Subscription | None = None

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(self.inbox, cb=self._on_msg, pending_msgs_limit=4 * self.batch + 64)

    def ask_no_more(self) -> None:
        self.stopping = True

    def take_all(self) -> list[Msg]:
        out, self.buf = self.buf, []
        return out

    async def stop(self, waiting: Callable[[], Awaitable[int]], holding: bool, give_back: bool) -> None:
        """Ask no more and let our requests end (filled, expired or refused) while the consumer may
        still send messages (`waiting`) or we hold some to give back (`give_back`, and `holding`
        some not appended or any in `buf`), then drain the inbox (UNSUB, then a round trip, bounded
        by CLOSE_WAIT_S), so every message the server sent is taken and can be given back.
        Unsubscribing while the consumer is sending loses the messages on their way inside the
        server: counted delivered, no subscriber found, they wait out ack_wait. Given back while a
        request is still waiting, they would be sent into it again, and nats-server 2.9 does worse
        when nobody listens there any more: it drops a redelivery until ack_wait and steps its
        stream position back, delivering another message twice (so `may_give_back` after this). With
        nothing to send and nothing held an open request brings nothing (the server looks for a
        subscriber before it sends), so an idle job stops at once; so does one that gives nothing
        back (AckPolicy.NONE, an ephemeral consumer), which unsubscribes without the round trip:
        nothing on its way is wanted."""
        self.ask_no_more()
        if give_back and self._waiting_until() > time.monotonic() and self.nc.is_connected \
                and (holding or self.buf or await self._any(waiting)):
            while self.nc.is_connected and (left := self._waiting_until() - time.monotonic()) > 0:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self.wake.wait()
        if self.sub is None:
            return
        if not give_back:   # nothing in flight is wanted: no round trip
            await self.sub.unsubscribe()
            return
        # the drain's round trip waits for a PONG that a server gone away without a word (not
        # noticed yet) never sends: bounded, and what it would have brought waits out ack_wait
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                await self.sub.drain()

    def _waiting_until(self) -> float:
        """Until when a request of ours may still be waiting on the server, as far as we know (the
        open one's answer with ANSWER_GRACE_S more: not seen, a late 408 costs what is held
        ack_wait)."""
        latest = self.asked_at + self.expires_s + STOP_GRACE_S + ANSWER_GRACE_S if self.open else 0.0
        return max(latest, self.lost_until)

    def may_give_back(self) -> bool:
        """After `stop`: no request of ours can be waiting on the server any more, so what we hold
        may be negatively acknowledged. False when the open request's end was not seen (`stop` did
        not wait because nothing was held then, or its answer was late): what we hold then waits
        out ack_wait rather than risk the loss and the duplicate `stop` describes."""
        return not self.open and time.monotonic() >= self.lost_until

    @staticmethod
    async def _any(waiting: Callable[[], Awaitable[int]]) -> bool:
        try:
            async with asyncio.timeout(STOP_GRACE_S):
                return await waiting() > 0
        except Exception:   # not known: wait for the request, as long as it may take
            return True

    def reset(self) -> None:
        """After a reconnect: the open request is not followed any more (its answer may have been
        lost with the old connection), but the server may still hold it, by its reply subject,
        which nats-py subscribes again: until its expiry (and its answer's grace) it may bring
        messages, and no other request is asked."""
        self._lose()

    def _lose(self) -> None:
        """Stop following the open request. Counted from now, not from when it was asked: nats-py
        sends what it had not sent yet (a request too) when it reconnects, so the server may have
        just got it; and an answer that took this long may still come."""
        if self.open:
            self.open = False
            self.lost_until = max(self.lost_until,
                                  time.monotonic() + self.expires_s + STOP_GRACE_S + ANSWER_GRACE_S)

    async def _on_msg(self, msg: Msg) -> None:
        # nats-py gives a status line as a header named Status, as it would a user's own header of
        # that name: a status has no reply subject, a delivered message its $JS.ACK one
        status = msg.headers.get("Status") if msg.headers and not msg.reply else None
        if status is None:
            self.buf.append(msg)   # ours, also from a request no longer followed
            if self.open:
                self.left -= 1
                if self.left <= 0:
                    self.open = False
                    if len(self.buf) < self.batch and self.nc.is_connected and not self.stopping:
                        await self._ask()   # the next batch comes while this one is appended
        elif status == "100":      # idle heartbeat / flow control: nothing to do
            return
        else:
            brought_nothing = self.open and self.left == self.requested
            # a 408 this early is not the open request's expiry (the server counts its expiry
            # from when it got the request): a late answer to one no longer followed
            if not (status == "408" and time.monotonic() < self.asked_at + self.expires_s / 2):
                self.open = False
            description = (msg.headers or {}).get("Description", "")
            if status == "409" and ("Deleted" in description or "push" in description.lower()):
                self.fatal = f"the consumer cannot be read: {description}"
            elif status == "409" and description.startswith("Exceeded MaxRequest"):
                # the consumer's own bound on a request (changed since the job read it): every
                # request would be refused; the job fails, and its next run reads the bounds again
                self.fatal = f"consumer [{self.consumer}] refuses the pull request: {description}"
            elif status == "409" and "Exceeds MaxBytes" in description and brought_nothing:
                # its first message alone is bigger than the request's max_bytes: asked again the
                # same way, it never comes, nor anything after it. Ours: that one is asked for alone,
                # unbounded (the sink skips it if over the record limit). The consumer's own: failed.
                if self.consumer_max_bytes:
                    self.fatal = (f"a message on consumer [{self.consumer}] is bigger than its max_bytes "
                                  f"({self.consumer_max_bytes}): it cannot be pulled")
                else:
                    self.one_unbounded = True
            elif status == "409" and "MaxWaiting" in description:
                # the consumer holds as many requests as it takes (other members', other clients'):
                # asked again at once, it refuses again at once, thousands of times a second
                self.ask_after = time.monotonic() + REFUSED_WAIT_S
            elif status == "503":
                self.fatal = f"pull requests get no answer: consumer [{self.consumer}] was deleted or JetStream is gone"
            elif status not in ("404", "408", "409"):   # 409: max_bytes reached, among others
                log.debug("pull request answered %s %s", status, description)
        self.wake.set()

    async def _ask(self) -> None:
        if self.stopping:
            return
        expires = int(self.expires_s * 1e9)
        if self.one_unbounded:   # a message bigger than max_bytes: alone
            self.one_unbounded = False
            self.requested, body = 1, b'{"batch":1,"expires":%d}' % expires
        else:
            self.requested = self.batch
            body = b'{"batch":%d,"max_bytes":%d,"expires":%d}' % (self.batch, self.max_bytes, expires)
        self.open, self.left, self.asked_at = True, self.requested, time.monotonic()
        await self.nc.publish(self.next_subject, body, reply=self.inbox)

    async def take(self, wait_s: float) -> list[Msg]:
        """The messages received so far; waits up to `wait_s` for the first. Keeps a request open
        (but for a while after one was lost: see `_lose`)."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.fatal:
                raise LookupError(self.fatal)
            if self.open and self.nc.is_connected and time.monotonic() - self.asked_at > self.expires_s + PULL_GRACE_S:
                self._lose()                # never answered (lost, or the answer is late): ask again later
            next_at = max(self.lost_until, self.ask_after)
            if not self.open and len(self.buf) < self.batch and self.nc.is_connected and time.monotonic() >= next_at:
                await self._ask()
            if self.buf:
                return self.take_all()
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            if not self.open and next_at > time.monotonic():   # then the next request
                left = min(left, next_at - time.monotonic())
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, self.expires_s + PULL_GRACE_S)):   # not wait_for: see above
                    await self.wake.wait()


class JetStreamJob:
    def __init__(self, config: JetStreamConfig) -> None:
        self.config = config
        self._wake = asyncio.Event()

    async def _stream(self, js: Any) -> str:
        c = self.config
        if c.stream:
            return c.stream
        assert c.subject
        try:
            return str(await js.find_stream_name_by_subject(c.subject))
        except nats.js.errors.NotFoundError:
            raise LookupError(f"no JetStream stream holds subject [{c.subject}]; create one or set stream") from None

    async def _consumer(self, js: Any, stream: str) -> tuple[ConsumerInfo, bool]:
        """The consumer to read, and whether it existed (True) or was made here."""
        c = self.config
        name = c.consumer_name
        if name:
            try:
                return await js.consumer_info(stream, name), True
            except nats.js.errors.NotFoundError as e:
                if e.err_code == STREAM_NOT_FOUND:
                    raise LookupError(f"JetStream stream [{stream}] does not exist") from None
                if c.bind:
                    raise LookupError(f"bind: consumer [{name}] does not exist on JetStream stream [{stream}]") \
                        from None
        config = ConsumerConfig(
            durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=c.ack_wait_ms / 1000,
            max_ack_pending=c.max_ack_pending, filter_subject=c.subject, deliver_policy=DELIVER[c.deliver])
        if not name:
            config.inactive_threshold = EPHEMERAL_INACTIVE_S
            await self._resume(js, stream, config)
        try:
            info = await js.add_consumer(stream, config)
        except nats.js.errors.NotFoundError:
            raise LookupError(f"JetStream stream [{stream}] does not exist") from None
        position = c.position
        if not name and not position.next_seq and info.delivered is not None:
            # where this run starts: a retry before anything was appended resumes here too, not per
            # `deliver` again (new, or last on an empty stream, would skip what came meanwhile)
            position.next_seq = (info.delivered.stream_seq or 0) + 1
        return info, False

    async def _resume(self, js: Any, stream: str, config: ConsumerConfig) -> None:
        """An ephemeral consumer on a retry of this run: on from the last message appended, unless
        the stream is not the one it was (made again since, or a memory stream the server lost in
        a restart): then every message of the new one, none of which this run has read. Looking
        at the stream is best effort: a user allowed to make consumers may not be allowed to ask
        about streams (STREAM.INFO), and then a retry resumes at its position, as it always did."""
        position = self.config.position
        info = None
        if not position.no_stream_info:
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                raise LookupError(f"JetStream stream [{stream}] does not exist") from None
            except (nats.errors.Error, TimeoutError):   # not permitted (no answer) or not answered in time
                position.no_stream_info = True
        created = info.created if info is not None else None
        if position.next_seq:
            made_again = info is not None and (
                (created is not None and position.stream_created is not None and created != position.stream_created)
                or position.next_seq > info.state.last_seq + 1)
            if made_again:
                config.deliver_policy = DeliverPolicy.ALL
                position.next_seq = 0
            else:
                config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = position.next_seq
        if info is not None:
            position.stream_created = created

    async def run(self, ctx: JobContext) -> None:
        c = self.config
        link = _Link(c.conn, ctx, self._wake.set)
        pulled: list[Msg] = []   # taken from the server, not yet acknowledged
        puller: _Puller | None = None
        policy = AckPolicy.EXPLICIT
        try:
            nc = await link.open()
            js = nc.jetstream(timeout=API_TIMEOUT_S)
            try:
                stream = await self._stream(js)
                info, existing = await self._consumer(js, stream)
            except nats.js.errors.ServiceUnavailableError:
                raise ConnectionError("JetStream is not enabled on the NATS server") from None
            except nats.errors.NoRespondersError:
                raise ConnectionError("JetStream is not enabled on the NATS server (no responders)") from None
            if info.config.deliver_subject:
                raise LookupError(f"consumer [{info.name}] on JetStream stream [{stream}] is a push consumer; this "
                                  "source reads pull consumers")
            policy = info.config.ack_policy or AckPolicy.EXPLICIT
            ack_wait_s = info.config.ack_wait or c.ack_wait_ms / 1000
            pending_limit = info.config.max_ack_pending if policy != AckPolicy.NONE else None
            batch = min(c.prefetch, JS_MAX_BATCH)
            if pending_limit and pending_limit > 0:
                batch = min(batch, max(1, pending_limit // 2))
            # one made here has no such bounds; an existing one may (its owner's settings)
            max_batch, max_bytes, max_expires_s = await _pull_limits(nc, stream, info.name) if existing else (0, 0, 0.0)
            puller = own = _Puller(nc, stream, info.name, min(batch, max_batch or batch), self._wake,
                                   min(PULL_MAX_BYTES, max_bytes or PULL_MAX_BYTES),
                                   min(PULL_EXPIRES_S, max_expires_s or PULL_EXPIRES_S), max_bytes)

            async def waiting() -> int:
                """Messages the consumer may still send us: not delivered yet, or delivered and
                not acknowledged but not in our hands (on their way, or due for redelivery)."""
                now = await js.consumer_info(stream, own.consumer)
                held = len(pulled) + len(own.buf)
                return (now.num_pending or 0) + max(0, (now.num_ack_pending or 0) - held)
            link.on_reconnect = puller.reset
            # its pull requests, their inbox and its acknowledgements (refused: it would read nothing,
            # or have every message delivered again)
            link.needs = lambda subject: subject in (own.inbox.lower(), own.next_subject.lower()) or \
                subject.startswith("$js.ack.")
            await puller.start()
            ctx.state.lag = info.num_pending
            ctx.connected()
            lag_at = time.monotonic()
            while True:
                link.check()
                pulled = await puller.take(LAG_EVERY_S)
                if not pulled:
                    if time.monotonic() - lag_at >= LAG_EVERY_S and nc.is_connected:
                        lag_at = time.monotonic()
                        with contextlib.suppress(nats.errors.Error, TimeoutError):
                            ctx.state.lag = (await js.consumer_info(stream, info.name)).num_pending
                    continue
                step = asyncio.ensure_future(self._deliver(ctx, pulled, policy))
                keeper = asyncio.ensure_future(_in_progress(pulled, puller, ack_wait_s)) \
                    if policy != AckPolicy.NONE else None
                try:
                    await asyncio.shield(step)
                except asyncio.CancelledError:
                    # stopping with a batch in hand: its append is under way, so let it finish and
                    # be acknowledged (briefly), and a stop neither loses nor duplicates it; the
                    # open request runs out meanwhile
                    puller.ask_no_more()
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(CLOSE_WAIT_S):   # then cancelled, as wait_for did
                            await step
                    raise
                finally:
                    if keeper is not None:
                        keeper.cancel()
                    if step.done() and not step.cancelled():
                        pulled = []    # acknowledged, or given back by _deliver
        finally:
            # stopped (or failed) mid-batch: what was pulled and not appended goes back at once, so
            # a restart need not wait for ack_wait - once no request of ours waits on the server
            # (see _Puller.stop). Not with AckPolicy.NONE (nothing to give back), nor to an
            # ephemeral consumer (nobody reads it again: the next run makes another).
            try:
                if puller is not None:
                    give_back = policy != AckPolicy.NONE and c.consumer_name is not None
                    if link.nc.is_connected:
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(PULL_EXPIRES_S + STOP_GRACE_S + ANSWER_GRACE_S + CLOSE_WAIT_S):
                                await puller.stop(waiting, bool(pulled), give_back)
                    unwritten = pulled + puller.take_all()
                    if unwritten and give_back and link.nc.is_connected and puller.may_give_back():
                        with contextlib.suppress(Exception):
                            await self._nak(unwritten, policy, None)
            finally:
                await link.close()   # also when cancelled again meanwhile (a shutdown right after a stop)

    async def _deliver(self, ctx: JobContext, msgs: list[Msg], policy: AckPolicy) -> None:
        """Append a batch, then acknowledge it; if the append fails, give the batch back (after
        nak_delay) and raise."""
        try:
            await ctx.sink.write([m.data for m in msgs])
        except asyncio.CancelledError:
            # given up on by a stop (CLOSE_WAIT_S) while its append ran on to its end: the rows are
            # durable, so acknowledged rather than given back and written again by the next run
            if ctx.sink.landed:
                await self._ack(ctx, msgs, policy)
            raise
        except Exception:
            await self._nak(msgs, policy, self.config.nak_delay_ms)
            raise
        await self._ack(ctx, msgs, policy)

    async def _ack(self, ctx: JobContext, msgs: list[Msg], policy: AckPolicy) -> None:
        """Acknowledge a batch whose rows are durable; the lag and an ephemeral consumer's position."""
        if policy == AckPolicy.EXPLICIT:
            for m in msgs:
                await m.ack()
        elif policy == AckPolicy.ALL:
            # covers every lower stream sequence: the batch's highest, wherever it is (a message
            # redelivered while the batch was pulled can come after newer ones)
            await max(msgs, key=_stream_seq).ack()
        if self.config.consumer_name is None:
            self.config.position.next_seq = max(map(_stream_seq, msgs)) + 1
        if not ctx.ending:   # a stopped source shows no lag (its batch in hand is acknowledged as it stops)
            ctx.state.lag = msgs[-1].metadata.num_pending

    async def _nak(self, msgs: list[Msg], policy: AckPolicy, delay_ms: int | None) -> None:
        if policy == AckPolicy.NONE:
            return
        delay = delay_ms / 1000 if delay_ms else None
        for m in msgs:
            with contextlib.suppress(nats.errors.Error):
                await m.nak(delay=delay)


def _stream_seq(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


async def _pull_limits(nc: NATS, stream: str, consumer: str) -> tuple[int, int, float]:
    """The consumer's own bounds on one pull request - max_batch, max_bytes, max_expires (seconds);
    0: none - which nats-py's ConsumerInfo leaves out. The server refuses a request past one (409
    "Exceeded MaxRequest...") every time, so the job must ask within them. Not known (no answer, not
    permitted): none; a refusal then fails the job with the server's reason."""
    try:
        reply = await nc.request(f"$JS.API.CONSUMER.INFO.{stream}.{consumer}", b"", timeout=API_TIMEOUT_S)
        config = orjson.loads(reply.data).get("config") or {}
        return (max(0, int(config.get("max_batch") or 0)), max(0, int(config.get("max_bytes") or 0)),
                max(0, int(config.get("max_expires") or 0)) / 1e9)
    except (nats.errors.Error, TimeoutError, ValueError, TypeError, AttributeError):
        return 0, 0, 0.0


async def _in_progress(batch: list[Msg], puller: _Puller, ack_wait_s: float) -> None:
    """While a batch is appended: every ack_wait / 4, tell the server that it and the messages
    pulled meanwhile are still being worked on (+WPI). An append may wait long (a throttled target
    makes the sink wait its write limit out); past ack_wait the server delivered them again and
    both copies were written (460 messages became 843 rows at --partition-records-per-s 10)."""
    every = max(ack_wait_s / 4, 0.05)
    while True:
        await asyncio.sleep(every)
        for m in [*batch, *puller.buf]:
            if not getattr(m, "_ackd", False):
                with contextlib.suppress(nats.errors.Error):
                    await m.in_progress()


NATS_TYPE = SourceType("nats", configure_nats, NatsJob, lambda config: config.data_type)
JETSTREAM_TYPE = SourceType("nats_jetstream", configure_jetstream, JetStreamJob, lambda config: config.data_type)

__all__ = ["JETSTREAM_TYPE", "NATS_TYPE", "JetStreamConfig", "NatsConfig", "configure_jetstream", "configure_nats"]
