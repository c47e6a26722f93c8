"""JetStreamStore: the log and the metadata on a NATS JetStream cluster, so a broker keeps nothing
of its own on disk, and several brokers can serve one deployment (issue 13).

Layout (every name starts with --nats-prefix, default "sluice"; P below):

    JetStream stream P_<stream_id>_<partition>   one per Sluice partition, subject P.<stream_id>.<partition>,
                                                 file storage, --replicas, allow_direct, no max_age:
                                                 the broker's own retention trims (a JetStream expiry
                                                 of every message written after the last trim would
                                                 lose the head - the next seq - for good; partitions
                                                 made by the first version have max_age = retention +
                                                 a day: `nats stream edit P_<id>_<p> --max-age 0`)
    KV bucket P_meta                             the catalogue and the core's metadata:
        s.<project>.<stream_name>                JSON StreamConfig (created with kv.create: STREAM_EXISTS is exact)
        n                                        the next stream id (a compare-and-set counter)
        t.<stream_id>.<partition>                the trim marker: logical first seq (+ the head when trimmed)
        m[.<hh>...]                              a core metadata key (meta_get/scan/write), encoded below
    core NATS subject P.w.<stream_id>.<part>     an append's notification to the other brokers (see "Several brokers")
    core NATS subject P.c                        a create, scale or drop of a stream, ditto

Why one JetStream stream per partition (measured, single node, 4 partitions, batches of 10 x 100 B,
nats-server 2.9.10, one client): appends with Expected-Last-Sequence on a per-partition stream ran
10.7-12.3k messages/s against 11.1-14.1k with Expected-Last-Subject-Sequence on one stream per
Sluice stream - about even - but reads were 17.2k messages/s against 4.8k: a partition's JetStream
sequence numbers are consecutive (only a prefix is ever purged), so a read pipelines direct gets of
j, j+1, ... at once, where the shared stream must ask `next_by_subj` one message at a time. In a
cluster a stream per partition also spreads the RAFT leaders (and the write load) over the nodes.
The price: a JetStream stream (1.3 ms to create on one node) per partition.

One message per Sluice append batch (or per run of batches of one partition in one append call,
which then commit together): the body is frames of `u32 length + batch value`, the batch value
being the RocksDB store's compact layout (storage/keys.py: offsets, keys, payloads; no JSON, no
base64 per record); headers `S-Seq` (first Sluice seq), `S-N` (records) and `S-Ts` (the newest
timestamp) number it without decoding the body.

Numbering by optimistic concurrency: a publish carries `Nats-Expected-Last-Sequence` = the JetStream
seq of the partition's last message (a per-partition head cache: last JetStream seq, next Sluice
seq, last timestamp), so two writers never assign the same Sluice seqs; on a mismatch the head is
re-read from the last message, the message renumbered and published again. `Nats-Msg-Id` is
<stream_id>.<partition>.<first seq>.<writer id>.<nonce> (the writer id is this store instance's, the
nonce made once per built message: no other message, not even one of ours numbered from a stale
head, is ever taken for it; a duplicate ack outside settling is a numbering conflict). A publish
whose outcome is unknown (a timeout, a reconnect) is settled before anything else is appended to
that partition: the same message is published again - JetStream answers a duplicate ack with the
original seq if the first one was stored - or, when the expected-last check refuses it, the message
after the expected one is read: ours (by msg id) or not stored, ever (its slot is taken). When
JetStream stays unreachable for SETTLE_S the batch fails with OutcomeUnknown (UNAVAILABLE; the core
fails the whole request, retriable, rather than reporting records certainly not written), and before
the next append to the partition a fence - an empty message (S-N 0) with the same
Expected-Last-Sequence - takes the slot, so the given-up message cannot be stored after any later
one (one sent just before a disconnect could be flushed after the reconnect). It may still be
stored first: a leader that had it in its log commits it once a quorum is back, and the fence
finds the slot taken - its records then exist, in order and numbered, which the request's
UNAVAILABLE (outcome unknown) allowed. Readers skip empty messages.
The client keeps no pending buffer (pending_size=0): a publish while disconnected fails at once,
certainly unsent (plain UNAVAILABLE).

Lookups that decide something - the head, the first message, settling, and any 404 - go to the
stream leader ($JS.API.STREAM.MSG.GET); reads prefetch with direct gets (any replica answers: one
behind says 404 for a message that exists, and that 404 is asked of the leader again).

Metadata keys are bytes; KV keys are `[-/_=.A-Za-z0-9]` tokens. A key is written "m", one hex token
per byte for its first PREFIX_TOKENS bytes, then one hex token per run of the rest ending in a \\0
(the core's separator: project\\0app\\0...), then what follows the last \\0: a prefix scan is a subject
filter of the prefix's whole tokens (m.61.62.>, m.41...6170703100.>: one app's checkpoints, not every
key sharing 8 bytes), the rows of its last partial token filtered here. A key whose KV key would be
longer than KV_KEY_MAX characters (a subject past the server's max_control_line closes the
connection) is stored as its leading tokens up to KV_KEY_KEEP characters + "z<sha256 of the key>",
its value prefixed with the full key. Key order is restored by sorting. (The first version wrote the
rest after 8 bytes as one token: open() rewrites such keys once, marked by the KV key "v".)

meta_write is not atomic on KV (there is no multi-key transaction in JetStream 2.9): its changes
are applied one at a time in the order given, each waited for, so a crash of the broker, or an
error, in the middle leaves a prefix of them applied. This broker's
own readers see a meta_write whole or not at all (a readers-writer lock in this store); readers on
other brokers may see one half done. The callers (grep meta_write, 2026-11-29):
* one key: create_app, commit_checkpoint, the cursor key (core/reads.py), a source definition
  (sources/manager.py);
* deletes only: delete_app (its checkpoints first, the app key last: a crash leaves the app with
  fewer checkpoints, and deleting it again finishes), delete_checkpoint, forget_stream (a deleted
  stream's checkpoints), a deleted stream's monitoring series - deletes are idempotent, so a
  partial one is finished by the next delete of the same thing;
* the monitoring series' flush (core/metric_series.py): a row block and the oldest-hour key per
  stream; the flush that stopped raised, so the next one computes its deltas from the same
  snapshots again and rewrites whole blocks (rows are replaced, never added to);
* the tsdb registry's new series types (tsdb/series.py): one independent key per series; a prefix
  stores some types, the put that wrote them failed and is retried, and a type once stored is kept.
None needs two keys to change together.

meta_cas (compare-and-set of one key) runs on KV revisions: the key is read from the bucket's leader,
compared, and written only if still at the revision read (_kv_swap); a write that lost a race reads
the key again and compares again. The brokers coordinate through it: the cursor key, consumer
group leases (core/leases.py StoreLeases), source leases (sources/manager.py), tsdb series types.
The catalogue's own conditional writes (the next stream id, a name's create, scale and drop, a trim
marker) go through _kv_swap too. On a cluster of nats-server before 2.9.21 a KV revision check is not
exact (nats-io/nats-server#4320: two concurrent kv.update from one revision both succeeded, 96 of
144 increments lost in tests/cluster/test_store_contract_cluster.py); there _kv_swap checks the
bucket's stream-level last sequence instead (cas_on_stream), exact, at the price of a retry whenever
any key of the bucket changed in between.

Several brokers (watch, storage/base.py StoreEvents), over core NATS, at most once:
* after JetStream acks an append message the store publishes `P.w.<stream_id>.<partition>` =
  `<js seq> <first seq> <count> <newest ts> <writer id>`; every store subscribes to `P.w.>` and
  raises its head cache (only forward: two writers' notifications may cross), remembers where the
  message starts (tail reads), and reports the partition to the broker once per burst (one
  call_soon for every notification already received), which wakes its long polls, subscriptions
  and streaming queries. The connection is no_echo: a store is not told of its own appends.
* after a create, a scale (update_stream) or a drop is in the KV bucket, `P.c` carries the stream
  id, project and name; a receiver re-reads the name's key (the truth, whatever order events
  arrive in) and reports the stream as changed or dropped. (A KV watch would not see a drop: the
  name key is purged, which leaves no message to watch.)
* a notification can be lost (a broker disconnected, a slow consumer): a reconnect or a dropped
  message re-reads the catalogue, forgets every head (reloaded from JetStream when needed) and
  wakes every reader. Until then a reader on this broker may not see another's newest records;
  it never sees wrong ones, and a cursor (fresh_bounds: one direct get of the last message) and
  any append of its own (a numbering conflict reloads the head) are always current.
* find_stream reads a name's key: the broker asks before answering STREAM_NOT_FOUND, so a stream
  created through another broker a moment ago is found even before its event.
* update_stream refuses (UNAVAILABLE, retriable) a layout not computed from the one stored
  (_based_on): two brokers scaling one stream at once cannot write over each other's event.
Known gap: a scale event is exact for the writes of the broker that runs it (core/catalogue.py);
another broker's writes routed by the old layout in the moment before its event arrives may land
after the boundary.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import ssl
import struct
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence, TypeVar, cast

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType
from nats.js.api import StreamConfig as JsStreamConfig
from nats.js.kv import KeyValue

from broker.errors import BrokerError, ErrorCode, client_error, server_error
from broker.model import AppendBatch, PartitionBounds, Record, RecordBlock, StreamConfig
from broker.natsconn import close_for_good, connect_or_give_up, nats_identity
from broker.settings import Settings, without_passwords
from broker.storage import keys as layout
from broker.storage.base import (
    AppendOutcome,
    Durability,
    IncompatibleStore,
    OutcomeUnknown,
    StorageState,
    Store,
    StoreCapabilities,
    StoreEvents,
    changed_fields,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")   # what a KV key may hold (nats-py's rule)
REQUEST_TIMEOUT_S = 5.0        # one JetStream request (a publish's ack, a direct get, an API call)
# How long an unknown publish outcome is retried (< DUPLICATE_WINDOW_S). With the publish's own
# REQUEST_TIMEOUT_S before it, a request answers within ~25 s: before a client's usual 30 s deadline
# (at 30 s the answer came after ~36 s, and the client saw DEADLINE_EXCEEDED, not UNAVAILABLE).
SETTLE_S = 20.0
DUPLICATE_WINDOW_S = 120.0     # JetStream's msg-id deduplication window on partition streams
MAX_RENUMBER = 1000            # numbering conflicts one append retries before giving up (UNAVAILABLE)
PROBE_EVERY_S = 1.0            # while writes are refused: how often JetStream is asked whether it answers
OPEN_RETRY_S = 30.0            # opening: how long a JetStream that does not answer (leader elections) is waited for
CLOSE_REOPENING_S = 1.0        # closing a connection being made when the store closes or gives up
FIRST_CONNECT_S = 20.0         # opening: the first connection, all servers and attempts included
SCAN_WINDOW = 64               # metadata scans: last-message gets in flight
READ_WINDOW = 32               # direct gets in flight for one read
BOUNDS_IN_FLIGHT = 64          # partitions' bounds asked at once by bounds_many (the streams listing)
PREFIX_TOKENS = 8              # metadata key bytes written as one token each (prefix scans)
KV_KEY_MAX = 1024              # a metadata key whose KV key is longer is stored under a hash: a subject
KV_KEY_KEEP = 768              # over the server's max_control_line (4 KB) closes the connection; a hashed
                               # one keeps its leading tokens up to this many characters (prefix scans)
HEADER_ROOM = 1024             # bytes of a message left to the headers under the server's max_payload

_FRAME = struct.Struct(">I")
_WRONG_LAST_SEQ = (10071, 10164)
_NO_SPACE = (10023, 10047, 10028, 10077)   # insufficient resources, resources exceeded, store failed
_PREFIX_OK = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _unavailable(what: str, exc: BaseException | None = None) -> BrokerError:
    err = server_error(ErrorCode.UNAVAILABLE, detail=f"JetStream: {what}" + (f" ({exc})" if exc else ""))
    if exc is not None:
        err.__cause__ = exc
    return err


def _api_error(exc: nats.js.errors.APIError) -> BrokerError:
    desc = str(exc.description or "")
    if exc.err_code in _NO_SPACE or "resources" in desc or "maximum bytes" in desc:
        err = server_error(ErrorCode.STORAGE_FULL)
        err.__cause__ = exc
        return err
    return _unavailable(desc or f"error {exc.err_code}", None)


def _translate(exc: BaseException) -> BrokerError:
    """Any nats-py failure -> a catalogued BrokerError (never a raw nats exception)."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code:
        return _api_error(exc)
    if isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError)):
        return _unavailable("no answer in time", exc)
    if isinstance(exc, (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
                        nats.js.errors.ServiceUnavailableError)):
        return _unavailable("no responders", exc)
    return _unavailable(type(exc).__name__, exc)


_NOT_YET = (nats.errors.TimeoutError, TimeoutError, nats.js.errors.ServiceUnavailableError)


async def _patiently(call: Callable[[], Awaitable[T]], deadline: float) -> T:
    """Opening: `call()`, again while JetStream does not answer yet (a restarted cluster electing its
    leaders) until `deadline` (OPEN_RETRY_S after the start); then its error stands."""
    told = False
    while True:
        try:
            return await call()
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc, BrokerError) and exc.code is ErrorCode.UNAVAILABLE else exc
            if not isinstance(cause, _NOT_YET) or time.monotonic() > deadline:
                raise
            if not told:
                told = True
                log.warning("JetStream does not answer yet (%s); retrying for up to %.0f s", cause or "timeout",
                            deadline - time.monotonic())
        await asyncio.sleep(0.5)


async def _guard(call: Awaitable[T]) -> T:
    try:
        return await call
    except (BrokerError, _Missing):
        raise
    except Exception as exc:
        raise _translate(exc) from exc


# -- metadata keys ---------------------------------------------------------------------------------

def _meta_tokens(key: bytes) -> list[str]:
    """One hex token per byte of the first PREFIX_TOKENS, then one per run ending in a \\0 (the
    core's separator: project\\0app\\0...), then the rest."""
    tokens = [key[i:i + 1].hex() for i in range(min(len(key), PREFIX_TOKENS))]
    rest, at = key[PREFIX_TOKENS:], 0
    while at < len(rest):
        cut = rest.find(b"\0", at)
        end = len(rest) if cut < 0 else cut + 1
        tokens.append(rest[at:end].hex())
        at = end
    return tokens


def _joined(tokens: Iterable[str]) -> str:
    return "m" + "".join("." + t for t in tokens)


def _kept(tokens: list[str]) -> list[str]:
    """The leading tokens whose KV key stays within KV_KEY_KEEP characters."""
    size = 1
    for n, token in enumerate(tokens):
        size += 1 + len(token)
        if size > KV_KEY_KEEP:
            return tokens[:n]
    return tokens


def meta_kv_key(key: bytes) -> str:
    """The KV key of a metadata key: its tokens, or - when that is longer than KV_KEY_MAX - the
    leading tokens kept and a hash token ("z" + sha256); such a key's value holds the full key."""
    tokens = _meta_tokens(key)
    plain = _joined(tokens)
    if len(plain) <= KV_KEY_MAX:
        return plain
    return _joined(_kept(tokens)) + ".z" + hashlib.sha256(key).hexdigest()


def _hashed(kv_key: str) -> bool:
    return kv_key.rpartition(".")[2].startswith("z")


def meta_key_of(kv_key: str) -> bytes:
    """The metadata key of a KV key that is not hashed (hashed ones: the value holds it)."""
    return bytes.fromhex(kv_key[1:].replace(".", ""))


def _meta_pattern(prefix: bytes) -> tuple[str, bool]:
    """The subject filter a prefix scan reads (the prefix's whole tokens, as kept in hashed keys,
    + ".>") and whether the prefix itself may be a key it misses (to be got on its own)."""
    tokens = _meta_tokens(prefix)
    whole = tokens if len(prefix) <= PREFIX_TOKENS or prefix.endswith(b"\0") else tokens[:-1]
    return _joined(_kept(whole)) + ".>", len(whole) == len(tokens)


def _wrap(key: bytes, value: bytes) -> bytes:
    return _FRAME.pack(len(key)) + key + value


def _unwrap(raw: bytes) -> tuple[bytes, bytes]:
    (n,) = _FRAME.unpack_from(raw)
    return raw[4:4 + n], raw[4 + n:]


# -- message bodies --------------------------------------------------------------------------------

def _frames(values: Iterable[bytes]) -> bytes:
    return b"".join(part for v in values for part in (_FRAME.pack(len(v)), v))


def _unframe(body: bytes) -> list[bytes]:
    out, at, end = [], 0, len(body)
    while at < end:
        (n,) = _FRAME.unpack_from(body, at)
        out.append(body[at + 4:at + 4 + n])
        at += 4 + n
    return out


@dataclass(slots=True)
class _Msg:
    """A partition message as read back: its JetStream seq, Sluice numbering and batch values."""
    js_seq: int
    first: int
    count: int
    last_ts: int
    msg_id: str
    body: bytes

    @property
    def end(self) -> int:
        return self.first + self.count


def _parse(msg: Msg) -> _Msg | None:
    """A direct-get answer -> _Msg; None for 404 (no such message)."""
    hdr = msg.headers or {}
    status = hdr.get("Status")
    if status:
        if status == "404":
            return None
        raise _unavailable(f"direct get answered {status} {hdr.get('Description', '')}".strip())
    return _Msg(int(hdr["Nats-Sequence"]), int(hdr["S-Seq"]), int(hdr["S-N"]), int(hdr["S-Ts"]),
                hdr.get("Nats-Msg-Id", ""), msg.data)


def _parse_stored(stored: dict[str, Any]) -> _Msg:
    """A $JS.API.STREAM.MSG.GET answer's message -> _Msg."""
    hdr: dict[str, str] = {}
    raw = base64.b64decode(stored.get("hdrs") or b"")
    for line in raw.decode().split("\r\n")[1:]:   # after "NATS/1.0"
        name, sep, value = line.partition(":")
        if sep:
            hdr[name.strip()] = value.strip()
    return _Msg(int(stored["seq"]), int(hdr["S-Seq"]), int(hdr["S-N"]), int(hdr["S-Ts"]),
                hdr.get("Nats-Msg-Id", ""), base64.b64decode(stored.get("data") or b""))


@dataclass(slots=True)
class _Head:
    js_last: int   # JetStream seq of the partition's last message (0: none ever)
    next_seq: int  # the Sluice seq the next record gets
    last_ts: int


@dataclass(slots=True)
class _Trim:
    first: int     # logical first retained seq
    rev: int = 0   # KV revision (compare-and-set)


class _RWLock:
    """Many readers or one writer (meta_get/scan vs meta_write), on the event loop; a waiting
    writer goes first (readers in a loop would starve it)."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiting = 0
        self._cond = asyncio.Condition()

    async def read_acquire(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._waiting)
            self._readers += 1

    async def read_release(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def write_acquire(self) -> None:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._waiting -= 1
            self._writer = True

    async def write_release(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()


def _server_address(url: Any) -> str:
    """Where a NATS connection went, for a log line: host and port, never the user, password or
    token of its `--nats-servers` URL (nats-py's connected_url keeps them in its netloc)."""
    return "?" if url is None else str(url.netloc).rpartition("@")[2]


class JetStreamStore(Store):
    def __init__(self, nc: NatsClient, kv: KeyValue, *, prefix: str = "sluice", replicas: int = 1) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=REQUEST_TIMEOUT_S)
        self._kv = kv
        self._kv_bucket = f"{prefix}_meta"
        self._prefix = prefix
        self._replicas = replicas
        self.capabilities = StoreCapabilities(Durability.REPLICATED if replicas > 1 else Durability.PROCESS_CRASH,
                                              shared=True)
        self._writer_id = uuid.uuid4().hex[:12]
        self._configs: dict[int, StreamConfig] = {}
        self._heads: dict[tuple[int, int], _Head] = {}
        self._trims: dict[tuple[int, int], _Trim] = {}
        self._locks: dict[tuple[int, int], asyncio.Lock] = {}
        # where sequential reads resume: (sid, p) -> {sluice seq: JetStream seq of the message holding it}
        self._resume: dict[tuple[int, int], dict[int, int]] = {}
        # partitions with a publish given up on (not settled): the JetStream seq it expected last; a
        # fence takes the slot after it before the next append (_fence)
        self._fences: dict[tuple[int, int], int] = {}
        self._meta_lock = _RWLock()
        # compare-and-set on the bucket's stream-level last sequence instead of the key's revision:
        # set by open() on a cluster before nats-server 2.9.21 (see _kv_swap)
        self.cas_on_stream = False
        self._cas_lock = asyncio.Lock()   # (then one at a time per broker: they would all conflict)
        self._state = StorageState.OK
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self._closing_flag: list[bool] = []
        self._options: dict[str, Any] = {}   # how open() connected: a closed connection is opened again so
        self._reopening: asyncio.Task[None] | None = None
        self._replicas_told: set[str] = set()   # partition streams found with other replicas (logged once)
        self.renumbered = 0    # numbering conflicts resolved
        self.settled = 0       # unknown publish outcomes settled
        # other brokers' changes (watch): appends and catalogue events from core NATS
        self._events: StoreEvents | None = None
        self._woken: set[tuple[int, int]] = set()   # partitions to wake, once per burst
        self._resyncing: asyncio.Task[None] | None = None
        self._hints: set[asyncio.Task[None]] = set()
        self.remote_appends = 0        # other brokers' append notifications taken
        self.remote_stream_changes = 0  # other brokers' creates, scales and deletes taken
        self.resyncs = 0               # full re-reads after a reconnect or dropped notifications

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    async def from_settings(cls, settings: Settings) -> JetStreamStore:
        servers = [s.strip() for s in settings.nats_servers.split(",") if s.strip()]
        return await cls.open(servers, prefix=settings.nats_prefix, replicas=settings.replicas,
                              creds=settings.nats_creds, tls_ca=settings.nats_tls_ca)

    @classmethod
    async def open(cls, servers: Sequence[str], *, prefix: str = "sluice", replicas: int = 1,
                   creds: str | None = None, tls_ca: str | None = None) -> JetStreamStore:
        if not _PREFIX_OK.fullmatch(prefix):
            raise ValueError(f"prefix must be 1-32 of A-Z a-z 0-9 _ -, not {prefix!r}")
        options: dict[str, Any] = {"servers": list(servers), "connect_timeout": 5, "max_reconnect_attempts": -1,
                                   "reconnect_time_wait": 0.5, "allow_reconnect": True, "name": "sluice-broker",
                                   # no buffer while disconnected: a publish then fails at once, certainly
                                   # unsent, instead of being flushed on a reconnect after we gave up on it
                                   "pending_size": 0,
                                   "no_echo": True}   # its own notifications (watch) are not sent back to it
        if creds:
            options["user_credentials"] = creds
        if tls_ca:
            options["tls"] = ssl.create_default_context(cafile=tls_ca)

        errors_told: list[bool] = []   # one line per outage, not one per reconnect attempt
        last_error: list[Exception] = []
        tls_refused = asyncio.Event()

        async def quiet(exc: Exception) -> None:   # nats-py would print every error to stderr
            if isinstance(exc, nats.errors.SlowConsumerError) and opened:
                opened[0]._resync_soon("notifications were dropped (slow consumer)")
                return
            last_error[:] = [exc]
            if isinstance(exc, ssl.SSLCertVerificationError):   # an unknown CA: the first connection gives up at once
                tls_refused.set()
            if not errors_told:
                errors_told.append(True)
                log.warning("NATS connection: %s", exc)

        async def disconnected() -> None:
            if not closing:
                log.warning("NATS: disconnected; reconnecting")
                if opened:   # health says so now, not at the next write refused (an idle broker stayed "ready")
                    opened[0]._refused(server_error(ErrorCode.UNAVAILABLE, detail="disconnected from NATS"),
                                       "the connection to NATS was lost")

        async def reconnected() -> None:
            errors_told.clear()
            current = opened[0]._nc if opened else nc
            log.info("NATS: reconnected to %s", _server_address(current.connected_url))
            if opened:   # notifications sent while this broker was away are lost: read everything again
                opened[0]._resync_soon("reconnected")
                opened[0]._hint_soon()   # and its own, sent meanwhile, may be: the others do too

        async def closed() -> None:   # for good: nats-py gives up after some protocol errors (-ERR)
            if not closing and opened:
                opened[0]._connection_closed()

        closing: list[bool] = []   # the store's close() appends: its disconnection is no news
        opened: list[JetStreamStore] = []
        options.update(error_cb=quiet, disconnected_cb=disconnected, reconnected_cb=reconnected, closed_cb=closed)
        nc = NatsClient()
        try:
            # the first connection tries each server a few times and gives up (a broker must not hang
            # at startup); once connected, reconnects go on for as long as it takes
            # (bounded as a whole too; a TLS handshake that fails - an unknown CA - would make nats-py
            # retry for ever instead of raising: it ends the attempt at once)
            if not await connect_or_give_up(nc.connect(**{**options, "max_reconnect_attempts": 2}), tls_refused,
                                            FIRST_CONNECT_S, CLOSE_REOPENING_S):
                raise TimeoutError("no answer")
            nc.options["max_reconnect_attempts"] = -1
        except BaseException as exc:   # cancelled too (a stop during startup): no socket left open
            closing.append(True)
            await close_for_good(nc, CLOSE_REOPENING_S)
            if not isinstance(exc, Exception):
                raise
            cause: BaseException = last_error[-1] if isinstance(exc, TimeoutError) and last_error else exc
            raise _unavailable(f"cannot connect to {', '.join(without_passwords(servers))}", cause) from exc
        try:
            js = nc.jetstream(timeout=REQUEST_TIMEOUT_S)
            bucket = f"{prefix}_meta"
            deadline = time.monotonic() + OPEN_RETRY_S
            kv = await _patiently(lambda: cls._open_bucket(js, bucket, replicas), deadline)
            store = cls(nc, kv, prefix=prefix, replicas=replicas)
            store._closing_flag = closing
            store._options = options
            opened.append(store)
            await _patiently(store._migrate_meta_keys, deadline)
            for config in await _patiently(store.list_streams, deadline):
                store._configs[config.stream_id] = config
        except (IncompatibleStore, asyncio.CancelledError):
            closing.append(True)
            await close_for_good(nc, CLOSE_REOPENING_S)
            raise
        except Exception as exc:
            closing.append(True)
            await close_for_good(nc, CLOSE_REOPENING_S)
            if isinstance(exc, nats.js.errors.APIError):   # say what was refused: --replicas too high, ...
                raise _unavailable(f"creating or reading the KV bucket {prefix}_meta with {replicas} replicas: "
                                   f"{exc.description} (error {exc.err_code})") from None
            raise _translate(exc) from exc
        version = tuple(int(x) for x in re.findall(r"\d+", str(nc._server_info.get("version", "")))[:3])
        if replicas > 1 and version and version < (2, 9, 21):
            store.cas_on_stream = True
            log.info("nats-server %s checks a clustered key-value update's expected revision before proposing "
                     "it only (nats-io/nats-server#4320, fixed in 2.9.21): compare-and-sets (leases, series types) "
                     "are checked on the bucket's last sequence instead, exact but retried when any metadata "
                     "key changed meanwhile", ".".join(map(str, version)))
        if nc.max_payload < 6 * 1024 * 1024:
            log.warning("NATS max_payload is %d bytes: an append batch larger than that (a PutRecords of up to "
                        "5 MB to one partition) is refused; set max_payload: 8MB in nats-server's configuration",
                        nc.max_payload)
        return store

    @staticmethod
    async def _open_bucket(js: Any, bucket: str, replicas: int) -> KeyValue:
        """The metadata bucket, created if missing. An existing one is looked up first: its stream info
        needs no JetStream meta leader (creating does), so a broker (re)started while a cluster elects
        one - a node died - opens at once."""
        try:
            info = await js.stream_info(f"KV_{bucket}")
        except nats.js.errors.NotFoundError:
            try:
                return await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, replicas=replicas,
                                                                storage=StorageType.FILE))
            except nats.js.errors.APIError as exc:
                if exc.err_code != 10058:   # exists with another configuration (or another broker made it)
                    raise
                info = await js.stream_info(f"KV_{bucket}")
        if info.config.num_replicas != replicas:
            raise IncompatibleStore(
                f"the KV bucket {bucket} has {info.config.num_replicas} replicas, --replicas is {replicas}: "
                f"start with --replicas {info.config.num_replicas}, or change the bucket first "
                f"(nats stream edit KV_{bucket} --replicas {replicas})") from None
        kv: KeyValue = await js.key_value(bucket)   # another difference (a setting changed by hand): kept
        return kv

    @property
    def storage_state(self) -> StorageState:
        return self._state

    def _connection_closed(self) -> None:
        """The NATS connection closed for good (not by close()): open a new one in the background;
        calls meanwhile fail UNAVAILABLE (connection closed)."""
        if self._closed or (self._reopening is not None and not self._reopening.done()):
            return
        log.warning("NATS: the connection was closed (%s); opening a new one", self._nc.last_error)
        self._reopening = asyncio.get_running_loop().create_task(self._reopen(), name="sluice-jetstream-reopen")

    async def _reopen(self) -> None:
        pause = 0.2
        while not self._closed:
            nc = NatsClient()
            try:
                # (cancelled by close(): not left connecting in the background)
                await connect_or_give_up(nc.connect(**self._options), None, None, CLOSE_REOPENING_S)
                js = nc.jetstream(timeout=REQUEST_TIMEOUT_S)
                kv = await js.key_value(self._kv_bucket)
                if self._events is not None:   # the watch's subscriptions went with the old connection
                    await self._subscribe(nc)
            except asyncio.CancelledError:   # the store closing: the connection being made goes too
                await close_for_good(nc, CLOSE_REOPENING_S)
                raise
            except Exception as exc:
                log.warning("NATS: opening a new connection failed (%s); trying again in %gs", exc, pause)
                await close_for_good(nc, CLOSE_REOPENING_S)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            if self._closed:
                await close_for_good(nc, CLOSE_REOPENING_S)
                return
            self._nc, self._js, self._kv = nc, js, kv
            self._heads.clear()   # other brokers may have appended meanwhile
            log.info("NATS: a new connection to %s", _server_address(nc.connected_url))
            self._resync_soon("a new connection")   # what was announced meanwhile is lost
            self._hint_soon()   # and so may be what this broker announced: the others read again too
            return

    async def _migrate_meta_keys(self) -> None:
        """Once per bucket (the KV key "v"): metadata keys the first version wrote (everything past
        8 bytes one token) rewritten as meta_kv_key writes them now. Brokers of the first version
        must not run alongside this."""
        try:
            await self._kv.get("v")
            return
        except nats.js.errors.KeyNotFoundError:
            pass
        moved = 0
        for kv_key, value in await self._scan("m.>"):
            if _hashed(kv_key):
                continue
            key = meta_key_of(kv_key)
            now = meta_kv_key(key)
            if now != kv_key:
                await self._kv.put(now, _wrap(key, value) if _hashed(now) else value)
                await self._kv_erase(kv_key)
                moved += 1
        if moved:
            log.info("metadata: %d keys rewritten in the current layout", moved)
        try:
            await self._kv.create("v", b"2")
        except nats.js.errors.KeyWrongLastSequenceError:
            pass

    # -- names -------------------------------------------------------------------------------------

    def _stream_name(self, sid: int, p: int) -> str:
        return f"{self._prefix}_{sid}_{p}"

    def _subject(self, sid: int, p: int) -> str:
        return f"{self._prefix}.{sid}.{p}"

    def _appends_subject(self, sid: int, p: int) -> str:
        return f"{self._prefix}.w.{sid}.{p}"

    @staticmethod
    def _name_key(project: str, stream_name: str) -> str:
        return f"s.{project}.{stream_name}"

    def _lock(self, sid: int, p: int) -> asyncio.Lock:
        lock = self._locks.get((sid, p))
        if lock is None:
            lock = self._locks[(sid, p)] = asyncio.Lock()
        return lock

    def _check_open(self) -> None:
        if self._closed:
            raise server_error(ErrorCode.UNAVAILABLE, detail="store is closed")

    # -- the catalogue -----------------------------------------------------------------------------

    async def _ensure_partition(self, config: StreamConfig, p: int) -> None:
        js_config = JsStreamConfig(
            name=self._stream_name(config.stream_id, p), subjects=[self._subject(config.stream_id, p)],
            storage=StorageType.FILE, num_replicas=self._replicas, allow_direct=True,
            duplicate_window=DUPLICATE_WINDOW_S)   # no max_age: see the module docstring
        try:
            await self._js.add_stream(js_config)
        except nats.js.errors.APIError as exc:
            if exc.err_code != 10058:   # already there (another configuration: left as it is)
                raise
            name = js_config.name or ""
            info = await self._js.stream_info(name)
            if info.config.num_replicas != self._replicas and name not in self._replicas_told:
                self._replicas_told.add(name)
                log.warning("JetStream stream %s has %s replicas, not --replicas %d: left as it is (nats stream edit "
                            "%s --replicas %d changes it)", name, info.config.num_replicas, self._replicas, name,
                            self._replicas)

    async def _next_stream_id(self) -> int:
        while True:   # exact across brokers: two never get one id (they would share partitions)
            value, revision = await self._kv_read("n")
            current = int(value or b"1")
            if await self._kv_swap("n", revision, str(current + 1).encode()) is not None:
                return current

    async def create_stream(self, config: StreamConfig) -> StreamConfig:
        self._check_open()
        return await _guard(self._create_stream(config))

    async def _create_stream(self, config: StreamConfig) -> StreamConfig:
        stored = replace(config, stream_id=await self._next_stream_id())
        key = self._name_key(stored.project, stored.stream_name)
        if await self._kv_swap(key, None, json.dumps(asdict(stored)).encode()) is None:
            raise client_error(ErrorCode.STREAM_EXISTS, stream=config.stream_name)
        try:
            await asyncio.gather(*(self._ensure_partition(stored, p) for p in range(stored.partition_count)))
        except BaseException:
            await asyncio.shield(self._undo_create(stored, key))
            raise
        self._configs[stored.stream_id] = stored
        for p in range(stored.partition_count):
            self._heads[(stored.stream_id, p)] = _Head(0, 0, 0)
            self._trims[(stored.stream_id, p)] = _Trim(0)
        await self._announce_stream("put", stored)
        return stored

    async def _undo_create(self, stored: StreamConfig, key: str) -> None:
        try:
            await self._kv_erase(key)
            await self._delete_partitions(stored.stream_id, stored.partition_count)
        except Exception:
            log.warning("could not undo the half-created stream %s (id %d)", stored.stream_name, stored.stream_id,
                        exc_info=True)

    async def _current(self, stream_id: int) -> tuple[StreamConfig, int]:
        """The stored config of a live stream and its KV revision; STREAM_NOT_FOUND."""
        config = self._configs.get(stream_id)
        if config is None:   # another broker may have created it: look again
            for c in await self.list_streams():
                self._configs.setdefault(c.stream_id, c)
            config = self._configs.get(stream_id)
        if config is not None:
            value, revision = await self._kv_read(self._name_key(config.project, config.stream_name))
            if value is not None and revision is not None:
                stored = StreamConfig.from_dict(json.loads(value))
                if stored.stream_id == stream_id:
                    return stored, revision
            self._forget(stream_id)
        raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {stream_id}")

    def _forget(self, stream_id: int) -> None:
        self._configs.pop(stream_id, None)
        for cache in (self._heads, self._trims, self._resume, self._locks):
            for k in [k for k in cache if k[0] == stream_id]:
                del cache[k]   # type: ignore[attr-defined]

    async def update_stream(self, config: StreamConfig, fields: Sequence[str] | None = None) -> StreamConfig:
        self._check_open()
        return await _guard(self._update_stream(config, fields))

    async def _update_stream(self, given: StreamConfig, fields: Sequence[str] | None) -> StreamConfig:
        while True:
            current, revision = await self._current(given.stream_id)
            config = changed_fields(current, given, fields)   # on what is stored now, not this broker's view
            if not _based_on(config, current):   # another broker scaled it since this one looked
                self._changed(current)
                raise _unavailable(f"stream {current.stream_name} was scaled through another broker meanwhile; "
                                   f"retry against its layout now")
            if await self._kv_swap(self._name_key(current.project, current.stream_name),
                                   revision, json.dumps(asdict(config)).encode()) is not None:
                break
        self._configs[config.stream_id] = config
        await asyncio.gather(*(self._ensure_partition(config, p) for p in range(config.readable_partition_count)))
        await self._announce_stream("put", config)
        return config

    async def drop_stream(self, stream_id: int) -> None:
        self._check_open()
        await _guard(self._drop_stream(stream_id))

    async def _drop_stream(self, stream_id: int) -> None:
        config, revision = await self._current(stream_id)
        if await self._kv_swap(self._name_key(config.project, config.stream_name), revision, None) is None:
            return await self._drop_stream(stream_id)   # changed meanwhile: decide again
        self._forget(stream_id)
        await self._announce_stream("del", config)
        # the name is free and the stream invisible from here on; a crash below leaves JetStream
        # streams no config points to (garbage, never read: ids are never reused)
        await self._delete_partitions(stream_id, config.readable_partition_count)
        await asyncio.gather(*(self._kv_erase(f"t.{stream_id}.{p}") for p in range(config.readable_partition_count)))

    async def _delete_partitions(self, stream_id: int, count: int) -> None:
        async def one(p: int) -> None:
            try:
                await self._js.delete_stream(self._stream_name(stream_id, p))
            except nats.js.errors.NotFoundError:
                pass
        await asyncio.gather(*(one(p) for p in range(count)))

    async def list_streams(self) -> list[StreamConfig]:
        self._check_open()
        rows = await _guard(self._scan("s.>"))
        configs = [StreamConfig.from_dict(json.loads(v)) for _, v in rows]
        return sorted(configs, key=lambda c: c.key)

    async def _scan(self, pattern: str) -> list[tuple[str, bytes]]:
        """Every live (key, value) of the bucket matching a subject pattern, in no particular order.

        No consumer: creating one needs the cluster's JetStream meta leader, and an R1 consumer is
        placed on any peer of the stream, a dead node's too - after a node dies, creations time out
        at random for a long time (measured on nats-server 2.9.10: about every other one, still 40 s
        after), so a broker could not start or list while one node of three was down. Instead the
        bucket's subjects (STREAM.INFO with subjects_filter, paged) and the last message of each
        (STREAM.MSG.GET last_by_subj: answered by the stream's leader, never a lagging replica),
        SCAN_WINDOW requests in flight; a key whose last message is a delete or purge marker is gone."""
        stream = f"KV_{self._kv_bucket}"
        cut = len(f"$KV.{self._kv_bucket}.")
        subjects: list[str] = []
        while True:
            reply = await self._nc.request(f"$JS.API.STREAM.INFO.{stream}", json.dumps(
                {"subjects_filter": f"$KV.{self._kv_bucket}.{pattern}", "offset": len(subjects)}).encode(),
                timeout=REQUEST_TIMEOUT_S)
            info = json.loads(reply.data)
            if "error" in info:
                raise nats.js.errors.APIError.from_error(info["error"])
            page = list((info.get("state") or {}).get("subjects") or {})
            subjects += page
            if not page or len(subjects) >= int(info.get("total") or 0):
                break
        rows: list[tuple[str, bytes]] = []
        for i in range(0, len(subjects), SCAN_WINDOW):
            window = subjects[i:i + SCAN_WINDOW]
            got = await asyncio.gather(*(self._js.get_msg(stream, subject=s) for s in window), return_exceptions=True)
            for subject, msg in zip(window, got):
                if isinstance(msg, nats.js.errors.NotFoundError):   # deleted meanwhile
                    continue
                if isinstance(msg, BaseException):
                    raise msg
                if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
                    continue
                rows.append((subject[cut:], msg.data or b""))
        return rows

    # -- the head, the trim point, messages ------------------------------------------------------

    async def _direct_get(self, sid: int, p: int, payload: dict[str, Any]) -> _Msg | None:
        """A direct get: answered by any replica, so a 404 may be a replica behind the leader."""
        name = self._stream_name(sid, p)
        try:
            reply = await self._nc.request(f"$JS.API.DIRECT.GET.{name}", json.dumps(payload).encode(),
                                           timeout=REQUEST_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            raise _Missing() from None
        except nats.errors.TimeoutError:   # nats-server 2.9.10 does not answer one to a missing stream
            try:
                await self._js.stream_info(name)
            except nats.js.errors.NotFoundError:
                raise _Missing() from None
            raise
        return _parse(reply)

    async def _leader_get(self, sid: int, p: int, payload: dict[str, Any]) -> _Msg | None:
        """The stream leader's answer ($JS.API.STREAM.MSG.GET): never behind, for the head, the first
        message, settling, and any 404 a direct get gave."""
        reply = await self._nc.request(f"$JS.API.STREAM.MSG.GET.{self._stream_name(sid, p)}",
                                       json.dumps(payload).encode(), timeout=REQUEST_TIMEOUT_S)
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error is not None:
            if error.get("err_code") == 10037:   # no message found
                return None
            if error.get("err_code") == 10059:   # stream not found
                raise _Missing()
            raise _api_error(nats.js.errors.APIError(code=error.get("code"), err_code=error.get("err_code"),
                                                     description=error.get("description")))
        return _parse_stored(answer["message"])

    async def _get(self, sid: int, p: int, js_seq: int) -> _Msg | None:
        msg = await self._direct_get(sid, p, {"seq": js_seq})
        return msg if msg is not None else await self._leader_get(sid, p, {"seq": js_seq})

    async def _first_msg(self, sid: int, p: int) -> _Msg | None:
        return await self._leader_get(sid, p, {"seq": 1, "next_by_subj": self._subject(sid, p)})

    async def _last_msg(self, sid: int, p: int) -> _Msg | None:
        return await self._leader_get(sid, p, {"last_by_subj": self._subject(sid, p)})

    async def _trim_point(self, sid: int, p: int) -> _Trim:
        trim = self._trims.get((sid, p))
        if trim is None:
            value, revision = await self._kv_read(f"t.{sid}.{p}")
            trim = _Trim(json.loads(value)["first"], revision) if value is not None and revision else _Trim(0)
            self._trims[(sid, p)] = trim
        return trim

    async def _load_head(self, sid: int, p: int) -> _Head:
        """From the partition's last message (raises _Missing when its JetStream stream is)."""
        for _ in range(3):
            last = await self._last_msg(sid, p)
            if last is not None:
                head = _Head(last.js_seq, last.end, last.last_ts)
                break
            # empty: never written, or every message expired (max_age): the trim marker holds the head
            head = _Head(0, 0, 0)
            info = await self._js.stream_info(self._stream_name(sid, p))
            if info.state.messages:
                continue   # another writer's first message landed between the two calls: read it
            if info.state.last_seq:
                marker = None
                try:
                    entry = await self._kv.get(f"t.{sid}.{p}")
                    assert entry.value is not None
                    marker = json.loads(entry.value)
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    pass
                if marker is None or info.state.last_seq != marker["js"]:
                    raise _unavailable(f"partition {sid}/{p}: its records expired (a JetStream max_age, set by the "
                                       f"first version) after the last trim, so its next sequence number is unknown")
                head = _Head(marker["js"], marker["next"], marker["ts"])
            break
        else:
            raise _unavailable(f"partition {sid}/{p}: its last message could not be read")
        return self._raise_head(sid, p, head)

    def _raise_head(self, sid: int, p: int, head: _Head) -> _Head:
        """Set the partition's cached head, only ever forward (by JetStream seq): a late answer
        (this broker's own publish ack, a direct get) must not hide a newer message another broker
        announced meanwhile. Returns the head now cached. Where the JetStream stream itself was
        created again (seqs restart), the caller drops the cached head first."""
        cached = self._heads.get((sid, p))
        if cached is not None and cached.js_last >= head.js_last:
            return cached
        self._heads[(sid, p)] = head
        return head

    async def _head(self, sid: int, p: int) -> _Head:
        head = self._heads.get((sid, p))
        return head if head is not None else await self._load_head(sid, p)

    def _partition_known(self, sid: int, p: int) -> StreamConfig:
        config = self._configs.get(sid)
        if config is None:
            raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {sid}")
        if not 0 <= p < config.readable_partition_count:
            raise client_error(ErrorCode.PARTITION_NOT_FOUND, partition_id=p)
        return config

    async def _with_partition(self, sid: int, p: int, call: Any) -> Any:
        """Run `call()` (reads of the partition's JetStream stream); a missing JetStream stream of a
        live partition (a crash between the catalogue and its creation) is created, empty."""
        self._partition_known(sid, p)
        try:
            return await _guard(call())
        except _Missing:
            pass
        try:
            if not await _guard(self._recreate(sid, p)):
                raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=f"id {sid}")
            return await _guard(call())
        except _Missing:
            raise _unavailable(f"partition {sid}/{p}: its JetStream stream is missing") from None

    async def _recreate(self, sid: int, p: int) -> bool:
        """A live partition's missing JetStream stream (a crash between the catalogue and its
        creation), created again, empty - once the catalogue itself (a KV read, not this broker's
        cache) says the stream still exists: another broker may have dropped it. False: dropped."""
        try:
            config, _ = await self._current(sid)
        except BrokerError as exc:
            if exc.code is ErrorCode.STREAM_NOT_FOUND:
                return False
            raise
        if not 0 <= p < config.readable_partition_count:
            return False
        await self._ensure_partition(config, p)
        return True

    # -- append ------------------------------------------------------------------------------------

    async def append(self, batches: Sequence[AppendBatch]) -> list[AppendOutcome]:
        self._check_open()
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(batches):
            groups.setdefault((b.stream_id, b.partition), []).append(i)
        outcomes: list[AppendOutcome] = [None] * len(batches)

        async def one(key: tuple[int, int], indexes: list[int]) -> None:
            results = await self._append_partition(key[0], key[1], [batches[i] for i in indexes])
            for i, r in zip(indexes, results):
                outcomes[i] = r

        await asyncio.gather(*(one(k, ix) for k, ix in groups.items()))
        return outcomes

    async def _append_partition(self, sid: int, p: int, batches: list[AppendBatch]) -> list[AppendOutcome]:
        config = self._configs.get(sid)
        if config is None or not 0 <= p < config.readable_partition_count:
            return [None] * len(batches)
        async with self._lock(sid, p):
            try:
                await self._head(sid, p)
            except _Missing:
                try:
                    if not await _guard(self._recreate(sid, p)):
                        return [None] * len(batches)   # dropped (by another broker)
                    await _guard(self._load_head(sid, p))
                except BrokerError as exc:
                    return [exc] * len(batches)
                except _Missing:
                    return [_unavailable(f"partition {sid}/{p}: its JetStream stream is missing")] * len(batches)
            except Exception as exc:
                err = _translate(exc)
                return [err] * len(batches)
            limit = self._nc.max_payload - HEADER_ROOM
            outcomes: list[AppendOutcome] = []
            run: list[tuple[AppendBatch, bytes]] = []
            size = 0
            for b in batches:
                value = layout.encode_batch(b.timestamp_ms, b.items)   # stamped again if its time is raised
                need = len(value) + _FRAME.size
                if need > limit:
                    if run:
                        outcomes += await self._publish_run(sid, p, run)
                        run, size = [], 0
                    outcomes.append(client_error(ErrorCode.REQUEST_TOO_LARGE,
                                                 detail=f"a batch of {need} bytes is more than the JetStream "
                                                        f"server's max_payload allows ({self._nc.max_payload})"))
                    continue
                if run and size + need > limit:
                    outcomes += await self._publish_run(sid, p, run)
                    run, size = [], 0
                run.append((b, value))
                size += need
            if run:
                outcomes += await self._publish_run(sid, p, run)
            return outcomes

    async def _publish_run(self, sid: int, p: int, run: list[tuple[AppendBatch, bytes]]) -> list[AppendOutcome]:
        """Publish `run` (batches of one partition) as one message; per batch its first seq or the
        error (the same for all: one message is stored whole or not at all)."""
        try:
            firsts = await self._publish(sid, p, run)
        except _Missing:   # its JetStream stream was deleted meanwhile: the stream is gone
            return [None] * len(run)
        except BrokerError as exc:
            self._refused(exc)
            return [exc] * len(run)
        except Exception as exc:   # a bug: never a raw exception out of the store
            log.exception("JetStream append failed")
            return [_translate(exc)] * len(run)
        if self._state is not StorageState.OK:
            self._writable_again("a write went through")
        return list(firsts)

    # -- writes refused: health reports it (storage_state) until JetStream answers again ---------

    def _refused(self, exc: BrokerError, what: str = "JetStream refused a write") -> None:
        if self._closed or exc.code not in (ErrorCode.STORAGE_FULL, ErrorCode.UNAVAILABLE):
            return
        state = StorageState.FULL if exc.code is ErrorCode.STORAGE_FULL else StorageState.FAILED
        if state is not self._state:
            self._state = state
            log.warning("storage %s: %s (%s); probing it every %gs", state.value, what, exc.message, PROBE_EVERY_S)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover(), name="sluice-jetstream-probe")

    async def _recover(self) -> None:
        """While writes are refused: JetStream's account info every PROBE_EVERY_S; once it answers,
        writes are tried again (a write that still fails refuses them again)."""
        while self._state is not StorageState.OK and not self._closed:
            await asyncio.sleep(PROBE_EVERY_S)
            try:
                info = await self._js.account_info()
            except Exception:   # still unreachable: probe again
                continue
            limit = info.limits.max_storage if info.limits else -1
            if self._state is StorageState.FULL and limit and limit > 0 and info.storage >= limit:
                continue
            self._writable_again("JetStream answers again")

    def _writable_again(self, why: str) -> None:
        if self._state is not StorageState.OK:
            log.info("storage ok: %s; writes are taken again", why)
        self._state = StorageState.OK

    def _build(self, sid: int, p: int, head: _Head,
               run: list[tuple[AppendBatch, bytes]]) -> tuple[bytes, dict[str, str], list[int]]:
        ts = head.last_ts
        values, firsts = [], []
        seq = head.next_seq
        for b, value in run:
            ts = max(ts, b.timestamp_ms)
            values.append(value if ts == b.timestamp_ms else _stamp(value, ts))
            firsts.append(seq)
            seq += len(b.items)
        headers = {"Nats-Expected-Last-Sequence": str(head.js_last),
                   "Nats-Msg-Id": f"{sid}.{p}.{head.next_seq}.{self._writer_id}.{uuid.uuid4().hex[:12]}",
                   "S-Seq": str(head.next_seq), "S-N": str(seq - head.next_seq), "S-Ts": str(ts)}
        return _frames(values), headers, firsts

    async def _publish(self, sid: int, p: int, run: list[tuple[AppendBatch, bytes]]) -> list[AppendOutcome]:
        subject = self._subject(sid, p)
        if (sid, p) in self._fences:
            try:
                await self._fence(sid, p)
            except _Missing:   # no JetStream stream: the given-up publish cannot be stored either
                self._fences.pop((sid, p), None)
                self._heads.pop((sid, p), None)
            except OutcomeUnknown as exc:   # nothing of this append was sent: certainly not written
                raise _unavailable(f"partition {sid}/{p}: fencing a publish given up on", exc) from None
        for _ in range(MAX_RENUMBER):
            head = self._heads.get((sid, p))
            if head is None:
                head = await _guard(self._load_head(sid, p))
            body, headers, firsts = self._build(sid, p, head, run)
            stored: int | None
            try:
                stored, duplicate = await self._request_publish(subject, body, headers)
                if duplicate:   # a msg id is made once per build: another message's, never ours
                    raise _Conflict()
            except _Missing:
                if not await _guard(self._recreate(sid, p)):
                    raise
                self._heads.pop((sid, p), None)   # a new JetStream stream: its seqs start again
                await _guard(self._load_head(sid, p))
                continue
            except _Conflict:
                self.renumbered += 1
                await _guard(self._load_head(sid, p))
                continue
            except _Unknown as unknown:
                stored = await self._settle(sid, p, subject, body, headers, unknown.cause)
                if stored is None:   # certainly not stored (another message took the slot): renumber
                    self.renumbered += 1
                    await _guard(self._load_head(sid, p))
                    continue
            assert stored is not None
            count = int(headers["S-N"])
            self._raise_head(sid, p, _Head(stored, head.next_seq + count, int(headers["S-Ts"])))
            self._remember(sid, p, head.next_seq, stored)
            await self._announce_append(sid, p, stored, head.next_seq, count, headers["S-Ts"])
            return list(firsts)
        raise _unavailable(f"partition {sid}/{p}: numbering conflicts did not stop after {MAX_RENUMBER} tries")

    async def _request_publish(self, subject: str, body: bytes, headers: dict[str, str],
                               timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, bool]:
        """The JetStream seq the message was stored at and whether the ack says duplicate (it had
        been stored before). Raises _Conflict (the expected last seq is not the partition's),
        _Unknown (no answer: maybe stored), BrokerError (certainly not stored)."""
        try:
            reply = await self._nc.request(subject, body, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise _Missing() from None
        except nats.errors.OutboundBufferLimitError as exc:   # disconnected: refused before it was sent
            raise _unavailable("not connected", exc) from None          # (no pending buffer: pending_size=0)
        except (TimeoutError, nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError, OSError) as exc:
            raise _Unknown(exc) from exc
        ack = json.loads(reply.data)
        error = ack.get("error")
        if error is not None:
            if error.get("err_code") in _WRONG_LAST_SEQ:
                raise _Conflict()
            raise _api_error(nats.js.errors.APIError(code=error.get("code"), err_code=error.get("err_code"),
                                                     description=error.get("description")))
        return int(ack["seq"]), bool(ack.get("duplicate"))

    async def _settle(self, sid: int, p: int, subject: str, body: bytes, headers: dict[str, str],
                      cause: BaseException) -> int | None:
        """A publish got no answer: stored (its JetStream seq) or certainly not (None). Raises
        OutcomeUnknown (UNAVAILABLE) when JetStream stays unreachable for SETTLE_S, forgets the head
        and leaves a fence to publish before the next append (the message may still be stored later:
        one sent just before a disconnect and flushed after the reconnect)."""
        deadline = time.monotonic() + SETTLE_S
        expected = int(headers["Nats-Expected-Last-Sequence"])
        pause = 0.05
        log.warning("JetStream publish to %s: outcome unknown (%s); settling it", subject, cause)
        while True:
            stored: int | None
            try:
                try:
                    # a duplicate if it was stored; the last try ends with the deadline
                    left = min(REQUEST_TIMEOUT_S, max(deadline - time.monotonic(), 0.5))
                    stored, _ = await self._request_publish(subject, body, headers, left)
                except _Conflict:
                    after = await self._leader_get(sid, p, {"seq": expected + 1})
                    stored = after.js_seq if after is not None and after.msg_id == headers["Nats-Msg-Id"] else None
                self.settled += 1
                return stored
            except (_Unknown, _Missing, BrokerError) as exc:
                if isinstance(exc, BrokerError) and exc.code is not ErrorCode.UNAVAILABLE:
                    self._heads.pop((sid, p), None)
                    raise
                if isinstance(exc, _Missing) and sid not in self._configs:
                    raise   # the stream was deleted: its records are gone either way
                if time.monotonic() > deadline:
                    raise self._give_up(sid, p, expected, f"not settled in {SETTLE_S:g}s") from None
            except (TimeoutError, nats.errors.Error, OSError):   # not connected, no answer
                if time.monotonic() > deadline:
                    raise self._give_up(sid, p, expected, f"not settled in {SETTLE_S:g}s") from None
            except Exception as exc:   # a bug or an unforeseen failure: still never a stale head
                raise self._give_up(sid, p, expected, f"settling failed ({type(exc).__name__}: {exc})") from exc
            if self._closed:
                raise self._give_up(sid, p, expected, "the store closed while settling it")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _give_up(self, sid: int, p: int, expected: int, why: str) -> OutcomeUnknown:
        """Settling failed: the head is re-read and a fence published before the next append."""
        self._heads.pop((sid, p), None)
        self._fences[(sid, p)] = expected
        return OutcomeUnknown(f"JetStream: partition {sid}/{p}: a publish's outcome is unknown ({why}); retry")

    async def _fence(self, sid: int, p: int) -> None:
        """After a publish given up on: take the slot after the JetStream seq it expected last with
        an empty message (S-N 0, same Expected-Last-Sequence), so the given-up one cannot be stored
        after anything else (its expected-last check fails from then on; if it holds the slot
        already, it was stored - in order). Readers skip empty messages; the
        numbering is unaffected. Raises (the fence stays) when JetStream does not answer."""
        expected = self._fences[(sid, p)]
        head = await _guard(self._load_head(sid, p))
        if head.js_last == expected:   # the slot is still free: take it
            headers = {"Nats-Expected-Last-Sequence": str(expected),
                       "Nats-Msg-Id": f"{sid}.{p}.fence.{self._writer_id}.{uuid.uuid4().hex[:12]}",
                       "S-Seq": str(head.next_seq), "S-N": "0", "S-Ts": str(head.last_ts)}
            subject = self._subject(sid, p)
            try:
                await self._request_publish(subject, b"", headers)
            except _Conflict:   # something else took the slot: as good as a fence
                pass
            except _Unknown as unknown:
                await self._settle(sid, p, subject, b"", headers, unknown.cause)   # raises when given up
        elif head.js_last < expected:   # never: JetStream seqs only grow (a replica behind?)
            raise _unavailable(f"partition {sid}/{p}: its last message is older than one published before")
        self._fences.pop((sid, p), None)
        self._heads.pop((sid, p), None)   # the next publish reads it again

    def _remember(self, sid: int, p: int, seq: int, js_seq: int) -> None:
        """Where `seq` starts (a message boundary): tail reads and sequential readers find it here."""
        marks = self._resume.setdefault((sid, p), {})
        marks[seq] = js_seq
        if len(marks) > 256:
            for k in sorted(marks)[:128]:
                del marks[k]

    # -- reads -------------------------------------------------------------------------------------

    async def _locate(self, sid: int, p: int, seq: int, head: _Head) -> _Msg | None:
        """The message holding `seq` (None when no stored message does)."""
        marks = self._resume.get((sid, p))
        if marks:
            js = marks.get(seq)
            if js is not None:
                msg = await self._get(sid, p, js)
                if msg is not None and msg.first <= seq < msg.end:
                    return msg
        first = await self._first_msg(sid, p)
        if first is None or seq < first.first:
            return first
        if seq < first.end:
            return first
        lo, hi = first.js_seq + 1, head.js_last   # the answer's JetStream seq is in [lo, hi]
        found: _Msg | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            msg = await self._get(sid, p, mid)
            if msg is None:   # purged meanwhile
                lo = mid + 1
                continue
            if msg.end <= seq:
                lo = mid + 1
            elif msg.first > seq:
                hi = mid - 1
                found = msg
            else:
                return msg
        return found

    async def _iter_msgs(self, sid: int, p: int, start: int, limit: int,
                         max_bytes: int) -> AsyncIterator[tuple[_Msg, int]]:
        """(message, index of its first wanted record) from `start` on, in order, prefetching the
        next ones (pipelined direct gets) sized by how many records are still wanted and by how
        many messages of the average size seen fit in what is left of `max_bytes` (at least 1)."""
        head = await self._head(sid, p)
        trim = await self._trim_point(sid, p)
        start = max(start, trim.first)
        if start >= head.next_seq:
            return
        msg = await self._locate(sid, p, start, head)
        if msg is None:
            return
        skip = max(0, start - msg.first)
        records, seen = msg.end - msg.first - skip, 1
        fetched = len(msg.body)
        js = msg.js_seq + 1
        yield msg, skip
        last = msg
        while records < limit and js <= head.js_last:
            per_msg = max(1, records // seen)
            by_bytes = max(1, (max_bytes - fetched) // max(1, fetched // seen))
            window = min(READ_WINDOW, max(1, -(-(limit - records) // per_msg)), by_bytes, head.js_last - js + 1)
            got = await asyncio.gather(*(self._get(sid, p, j) for j in range(js, js + window)))
            js += window
            for m in got:
                if m is None:   # purged meanwhile (a trim: always a prefix): what came before is all
                    return
                records += m.count
                seen += 1
                fetched += len(m.body)
                last = m
                yield m, 0
            self._remember(sid, p, last.end, last.js_seq + 1)

    async def _collect(self, sid: int, p: int, start: int, limit: int, max_bytes: int, columns: bool) -> Any:
        out: list[Any] = []   # records, or payloads (columns)
        times: list[tuple[int, int]] = []
        first: int | None = None
        budget = max_bytes
        async for msg, skip in self._iter_msgs(sid, p, start, limit, max_bytes):
            seq = msg.first
            for value in _unframe(msg.body):
                n, _ = layout.batch_header(value)
                if skip >= n:
                    skip -= n
                    seq += n
                    continue
                hi = min(n, skip + limit - len(out))
                got: list[Any]
                if columns:
                    got, ts, used = layout.batch_payloads(value, skip, hi, budget, not out)
                    if got:
                        times.append((len(got), ts))
                else:
                    got, used = layout.decode_batch(value, seq, skip, hi, budget, not out)
                if got and first is None:
                    first = seq + skip
                out += got
                budget -= used
                if len(out) >= limit or len(got) < hi - skip:
                    self._remember(sid, p, seq + skip + len(got), msg.js_seq)
                    return _result(out, times, first, start, columns)
                skip = 0
                seq += n
        return _result(out, times, first, start, columns)

    async def read(self, stream_id: int, partition: int, start_seq: int, limit: int,
                   max_bytes: int) -> list[Record]:
        self._check_open()
        records: list[Record] = await self._with_partition(
            stream_id, partition, lambda: self._collect(stream_id, partition, start_seq, limit, max_bytes, False))
        return records

    async def read_block(self, stream_id: int, partition: int, start_seq: int, limit: int,
                         max_bytes: int) -> RecordBlock:
        self._check_open()
        block: RecordBlock = await self._with_partition(
            stream_id, partition, lambda: self._collect(stream_id, partition, start_seq, limit, max_bytes, True))
        return block

    async def bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        self._check_open()

        async def get() -> PartitionBounds:
            head = await self._head(stream_id, partition)
            trim = await self._trim_point(stream_id, partition)
            first = min(max(trim.first, 0), head.next_seq)
            return PartitionBounds(first, head.next_seq, head.last_ts)
        result: PartitionBounds = await self._with_partition(stream_id, partition, get)
        return result

    async def bounds_many(self, partitions: Sequence[tuple[int, int]]) -> list[PartitionBounds | None]:
        """bounds() of many partitions with up to BOUNDS_IN_FLIGHT of them asked at once (one
        round trip each for a partition whose head is not in memory), not one after another."""
        self._check_open()
        out: list[PartitionBounds | None] = []

        async def one(sid: int, p: int) -> PartitionBounds | None:
            if sid not in self._configs:
                return None
            try:
                return await self.bounds(sid, p)
            except BrokerError as exc:   # dropped meanwhile
                if exc.code is not ErrorCode.STREAM_NOT_FOUND:
                    raise
                return None

        for at in range(0, len(partitions), BOUNDS_IN_FLIGHT):
            got = await asyncio.gather(*(one(sid, p) for sid, p in partitions[at:at + BOUNDS_IN_FLIGHT]),
                                       return_exceptions=True)
            for item in got:
                if isinstance(item, BaseException):
                    raise item
            out += cast(list[PartitionBounds | None], got)
        return out

    async def seq_at_time(self, stream_id: int, partition: int, timestamp_ms: int) -> int:
        self._check_open()

        async def find() -> int:
            head = await self._head(stream_id, partition)
            trim = await self._trim_point(stream_id, partition)
            if head.next_seq <= trim.first or head.last_ts < timestamp_ms:
                return head.next_seq
            # the first message whose newest timestamp is >= timestamp_ms
            first = await self._first_msg(stream_id, partition)
            if first is None:
                return head.next_seq
            lo, hi, found = first.js_seq + 1, head.js_last, None
            if first.last_ts >= timestamp_ms:   # retention's usual question: nothing has expired yet
                lo, found = hi + 1, first
            while lo <= hi:
                mid = (lo + hi) // 2
                msg = await self._get(stream_id, partition, mid)
                if msg is None or msg.last_ts < timestamp_ms:
                    lo = mid + 1
                else:
                    found, hi = msg, mid - 1
            if found is None:
                return head.next_seq
            seq = found.first
            for value in _unframe(found.body):
                n, ts = layout.batch_header(value)
                if ts >= timestamp_ms:
                    break
                seq += n
            return max(seq, trim.first)
        result: int = await self._with_partition(stream_id, partition, find)
        return result

    async def trim(self, stream_id: int, partition: int, before_seq: int) -> None:
        self._check_open()
        await self._with_partition(stream_id, partition, lambda: self._trim(stream_id, partition, before_seq))

    async def _trim(self, sid: int, p: int, before_seq: int) -> None:
        async with self._lock(sid, p):
            head = await self._head(sid, p)
            trim = await self._trim_point(sid, p)
            before = min(before_seq, head.next_seq)
            if before <= trim.first:
                return
            marker = json.dumps({"first": before, "next": head.next_seq, "ts": head.last_ts,
                                 "js": head.js_last}).encode()
            key = f"t.{sid}.{p}"
            while True:   # compare-and-set: the logical first seq never moves back
                rev = await self._kv_swap(key, trim.rev or None, marker)
                if rev is not None:
                    self._trims[(sid, p)] = _Trim(before, rev)
                    break
                self._trims.pop((sid, p), None)
                trim = await self._trim_point(sid, p)
                if before <= trim.first:
                    return
            # purge whole messages below the one holding `before` (the last one always stays: it
            # holds the head); a message straddling the cut stays, hidden by the marker
            keep = head.js_last if before >= head.next_seq else \
                getattr(await self._locate(sid, p, before, head), "js_seq", head.js_last)
            if keep > 1:
                await self._js.purge_stream(self._stream_name(sid, p), seq=keep)
            marks = self._resume.get((sid, p))
            if marks:
                for k in [k for k in marks if k < before]:
                    del marks[k]

    # -- other brokers: notifications and catalogue events (core NATS) ---------------------------

    async def watch(self, events: StoreEvents) -> None:
        """Report other brokers' appends and stream changes to `events`: core NATS subscriptions on
        P.w.> (a message per JetStream append message: `<js seq> <first seq> <count> <ts> <writer>`)
        and P.c (a JSON line per create, scale or delete, after the KV bucket has it). Returns once
        the server has both subscriptions: what is announced from then on is seen."""
        self._check_open()
        self._events = events
        await _guard(self._subscribe(self._nc))

    async def _subscribe(self, nc: NatsClient) -> None:
        """The watch's subscriptions on `nc`, in place at the server when this returns."""
        await nc.subscribe(f"{self._prefix}.w.>", cb=self._on_append)
        await nc.subscribe(f"{self._prefix}.c", cb=self._on_catalogue)
        await nc.flush(timeout=int(REQUEST_TIMEOUT_S))

    async def _announce_append(self, sid: int, p: int, js_seq: int, first: int, count: int, ts: str) -> None:
        """After JetStream's ack: tell the other brokers (their head caches and sleeping readers).
        Core NATS, at most once: a lost one costs a reader on another broker its wake-up until the
        next append (or its reconnect's re-read), never a record."""
        try:
            await self._nc.publish(self._appends_subject(sid, p), f"{js_seq} {first} {count} {ts} {self._writer_id}"
                                   .encode())
        except Exception:   # reconnecting and its buffer full, closing: tell the others to read again
            log.debug("announcing an append to %d/%d", sid, p, exc_info=True)
            await self._hint_resync()

    async def _hint_resync(self) -> None:
        """A notification of this broker's may have been lost (a publish failed, a reconnect): a
        resync hint on P.c makes every other broker read the catalogue and partition heads again.
        Best effort: if it cannot be sent now, the reconnect sends it."""
        if self._closed:
            return
        try:
            await self._nc.publish(f"{self._prefix}.c", json.dumps({"op": "resync", "w": self._writer_id}).encode())
        except Exception:
            log.debug("sending a resync hint", exc_info=True)

    def _hint_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._hint_resync(), name="sluice-jetstream-hint")
        self._hints.add(task)
        task.add_done_callback(self._hints.discard)

    async def _announce_stream(self, op: str, config: StreamConfig) -> None:
        try:
            await self._nc.publish(f"{self._prefix}.c", json.dumps({
                "op": op, "id": config.stream_id, "project": config.project, "name": config.stream_name,
                "w": self._writer_id}).encode())
        except Exception:
            log.debug("announcing a stream change of %d", config.stream_id, exc_info=True)

    async def _on_append(self, msg: Msg) -> None:
        """Another broker appended: raise the partition's head (only ever forward: notifications of
        two writers may cross), remember where the message starts (tail reads find it), and wake the
        partition's readers once per burst (call_soon after the messages already received)."""
        try:
            _, _, sid_s, p_s = msg.subject.rsplit(".", 3)
            js_s, first_s, count_s, ts_s, writer = msg.data.decode().split()
            sid, p, js_seq, first = int(sid_s), int(p_s), int(js_s), int(first_s)
            count, ts = int(count_s), int(ts_s)
        except ValueError:
            log.debug("ignoring a malformed append notification on %s", msg.subject)
            return
        if writer == self._writer_id:
            return
        if sid in self._configs:
            if self._raise_head(sid, p, _Head(js_seq, first + count, ts)).js_last == js_seq:
                self._remember(sid, p, first, js_seq)
        if not self._woken:
            asyncio.get_running_loop().call_soon(self._wake)
        self._woken.add((sid, p))

    def _wake(self) -> None:
        woken, self._woken = self._woken, set()
        self.remote_appends += len(woken)
        if self._events is not None and not self._closed:
            self._events.appended(woken)

    async def _on_catalogue(self, msg: Msg) -> None:
        """Another broker created, scaled or deleted a stream: the KV bucket says what is true now
        (events may be late or cross each other), and the broker is told what changed."""
        try:
            event = json.loads(msg.data)
            if event.get("w") == self._writer_id or self._closed:
                return
            if event.get("op") == "resync":
                self._resync_soon("another broker's notifications may have been lost")
                return
            sid = int(event["id"])
            stored = await _guard(self._find_stream(str(event["project"]), str(event["name"])))
            self.remote_stream_changes += 1
            if stored is None or stored.stream_id != sid:
                self._dropped(sid)
            if stored is not None:
                self._changed(stored)
        except Exception:
            log.warning("could not take another broker's stream change %r; re-reading the catalogue", msg.data,
                        exc_info=True)
            self._resync_soon("a stream change could not be read")

    def _changed(self, config: StreamConfig) -> None:
        if self._configs.get(config.stream_id) == config:
            return
        self._configs[config.stream_id] = config
        if self._events is not None:
            self._events.stream_changed(config)

    def _dropped(self, sid: int) -> None:
        """Told always, even when this store forgot the id already (a verb of this broker found it
        gone): the broker may still know it (stream_dropped is idempotent)."""
        self._forget(sid)
        if self._events is not None:
            self._events.stream_dropped(sid)

    def _resync_soon(self, why: str) -> None:
        """Notifications may have been missed (a reconnect, a slow consumer): read the catalogue
        again, forget every head (reloaded from JetStream when next needed) and wake every reader."""
        if self._events is None or self._closed or (self._resyncing is not None and not self._resyncing.done()):
            return
        log.info("JetStream store: %s; reading the catalogue and partition heads again", why)
        self._resyncing = asyncio.get_running_loop().create_task(self._resync(), name="sluice-jetstream-resync")

    async def _resync(self) -> None:
        pause = 0.1
        while not self._closed:
            try:
                listed = {c.stream_id: c for c in await self.list_streams()}
                break
            except BrokerError:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
        else:
            return
        self.resyncs += 1
        # what this store or the broker knows and the listing lacks: dropped, once a read of its
        # name (after the listing) confirms it (a stream created meanwhile is not in the listing)
        known = {c.stream_id: c for c in self._configs.values()}
        known_streams = getattr(self._events, "known_streams", None)
        if known_streams is not None:
            known.update((c.stream_id, c) for c in known_streams())
        for sid, config in known.items():
            if sid in listed:
                continue
            try:
                stored = await _guard(self._find_stream(config.project, config.stream_name))
            except BrokerError:
                continue   # unknown for now: the next resync decides
            if stored is None or stored.stream_id != sid:
                self._dropped(sid)
        for config in listed.values():
            self._changed(config)
        self._heads.clear()
        self._trims.clear()
        if self._events is not None:
            self._events.appended([(c.stream_id, p) for c in listed.values()
                                   for p in range(c.readable_partition_count)])

    def own_servers(self) -> frozenset[str]:
        info: dict[str, Any] = getattr(self._nc, "_server_info", None) or {}
        return nats_identity(info)

    async def find_stream(self, project: str, stream_name: str) -> StreamConfig | None:
        self._check_open()
        stored = await _guard(self._find_stream(project, stream_name))
        if stored is not None:
            for other in [c.stream_id for c in self._configs.values()
                          if c.key == stored.key and c.stream_id != stored.stream_id]:
                self._forget(other)   # that name's previous stream, deleted through another broker
            self._configs[stored.stream_id] = stored
        return stored

    async def _find_stream(self, project: str, stream_name: str) -> StreamConfig | None:
        """The stream's config from the bucket's leader: a direct get may be answered by a replica
        behind it, which would not have a stream just created, or would have one just scaled at
        its old layout - and this lookup decides (an event applied, a refusal made or not)."""
        key = self._name_key(project, stream_name)
        if not _KV_KEY.fullmatch(key) or key.endswith(".") or ".." in key:   # no such (possible) name
            return None
        value, _ = await self._kv_read(key)
        return StreamConfig.from_dict(json.loads(value)) if value else None

    async def fresh_bounds(self, stream_id: int, partition: int) -> PartitionBounds:
        """bounds() after a direct get of the partition's last message and a read of its trim
        marker: current even when another broker's notification of an append is still on its way,
        or another broker trimmed it (a TRIM_HORIZON cursor starts at what is still there)."""
        self._check_open()

        async def get() -> PartitionBounds:
            last = await self._last_msg(stream_id, partition)
            head = self._heads.get((stream_id, partition))
            if last is not None:
                head = self._raise_head(stream_id, partition, _Head(last.js_seq, last.end, last.last_ts))
            if head is None:
                head = await self._load_head(stream_id, partition)
            self._trims.pop((stream_id, partition), None)   # another broker's retention may have trimmed
            trim = await self._trim_point(stream_id, partition)
            return PartitionBounds(min(max(trim.first, 0), head.next_seq), head.next_seq, head.last_ts)
        result: PartitionBounds = await self._with_partition(stream_id, partition, get)
        return result

    # -- metadata ----------------------------------------------------------------------------------

    async def meta_get(self, key: bytes) -> bytes | None:
        self._check_open()
        await self._meta_lock.read_acquire()
        try:
            return await _guard(self._meta_get(key))
        finally:
            await self._meta_lock.read_release()

    async def _meta_get(self, key: bytes) -> bytes | None:
        kv_key = meta_kv_key(key)
        try:
            entry = await self._kv.get(kv_key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):   # (a delete marker)
            return None
        value = entry.value if entry.value is not None else b""
        if _hashed(kv_key):
            stored_key, value = _unwrap(value)
            if stored_key != key:
                return None
        return value

    async def meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        self._check_open()
        await self._meta_lock.read_acquire()
        try:
            return await _guard(self._meta_scan(prefix))
        finally:
            await self._meta_lock.read_release()

    async def _meta_scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        rows: dict[bytes, bytes] = {}
        pattern, itself = _meta_pattern(prefix)
        if itself:
            exact = await self._meta_get(prefix)
            if exact is not None:
                rows[prefix] = exact
        for k, v in await self._scan(pattern):
            if _hashed(k):
                key, v = _unwrap(v)
            else:
                key = meta_key_of(k)
            if key.startswith(prefix):
                rows[key] = v
        return sorted(rows.items())

    async def meta_write(self, changes: dict[bytes, bytes | None]) -> None:
        self._check_open()
        if not changes:
            return
        await self._meta_lock.write_acquire()
        try:
            await _guard(self._meta_write(changes))
        finally:
            await self._meta_lock.write_release()

    async def meta_cas(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        """One key, atomic in the KV bucket by itself: only kept out of a multi-key meta_write
        (shared with readers and other compare-and-sets, so a lease renewal never queues behind
        them all)."""
        self._check_open()
        await self._meta_lock.read_acquire()
        try:
            kv_key = meta_kv_key(key)
            if _hashed(kv_key):   # the value holds the key: compared and written so
                expected = None if expected is None else _wrap(key, expected)
                new = None if new is None else _wrap(key, new)
            return await _guard(self._meta_cas(kv_key, expected, new))
        finally:
            await self._meta_lock.read_release()

    async def _kv_read(self, kv_key: str) -> tuple[bytes | None, int | None]:
        """A key's value and revision from the bucket's leader (a direct get may be answered by a
        replica behind it: a compare-and-set would then report a difference that is not there);
        (None, None) when absent or deleted."""
        reply = await self._nc.request(f"$JS.API.STREAM.MSG.GET.KV_{self._kv_bucket}", json.dumps(
            {"last_by_subj": f"$KV.{self._kv_bucket}.{kv_key}"}).encode(), timeout=REQUEST_TIMEOUT_S)
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error is not None:
            if error.get("err_code") == 10037:   # no message found
                return None, None
            raise nats.js.errors.APIError.from_error(error)
        stored = answer["message"]
        if b"KV-Operation" in base64.b64decode(stored.get("hdrs") or b""):   # a delete or purge marker
            return None, None
        return base64.b64decode(stored.get("data") or b""), int(stored["seq"])

    async def _meta_cas(self, kv_key: str, expected: bytes | None, new: bytes | None) -> bool:
        """Read the key (from the leader), compare, then write only if it is still at the revision
        read (_kv_swap); another broker's write in between makes the write fail and the value is
        read and compared again, so a False is always a value that differed (linearizable, not
        just a lost race)."""
        for _ in range(MAX_RENUMBER):
            current, revision = await self._kv_read(kv_key)
            if current != expected:
                return False
            if new is None and revision is None:   # absent stays absent
                return True
            if await self._kv_swap(kv_key, revision, new) is not None:
                return True
        raise _unavailable(f"compare-and-set of a metadata key lost {MAX_RENUMBER} races in a row")

    async def _kv_swap(self, kv_key: str, revision: int | None, new: bytes | None) -> int | None:
        """Write `new` (None: delete) to a key only if it is still at `revision` (None: absent): the
        new revision (0 for a delete), or None when the key has moved on. Every conditional write of
        the bucket goes through here.

        On nats-server 2.9.21 and later, or one node: kv.create / kv.update(last=revision), or a purge
        of the key's subject below revision + 1 (applied in order: it purges nothing when the key
        moved on). On a cluster before 2.9.21 (cas_on_stream) the per-subject expected sequence is
        a pre-check only - two updates from one revision proposed together both pass it
        (nats-io/nats-server#4320) - so the write carries the stream-level Nats-Expected-Last-Sequence
        instead, which the leader checks against what it has proposed (the log's numbering relies
        on it): read the bucket's last sequence L, then the key; if the key is still at `revision`,
        it is so at L, and the write is stored only if nothing at all was written to the bucket
        since (any key's change, checkpoints included, means read again). A delete is then a purge
        marker written so (Nats-Rollup: the key's older message goes), itself purged after: a purge
        stores nothing and leaves L alone, and it only takes away a marker - absent either way."""
        if not self.cas_on_stream:
            try:
                if new is None:
                    return 0 if revision is None or await self._kv_erase(kv_key, revision) else None
                if revision is None:
                    return await self._kv.create(kv_key, new)
                return await self._kv.update(kv_key, new, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None
        subject = f"$KV.{self._kv_bucket}.{kv_key}"
        async with self._cas_lock:
            for _ in range(MAX_RENUMBER):
                reply = await self._nc.request(f"$JS.API.STREAM.INFO.KV_{self._kv_bucket}", b"",
                                               timeout=REQUEST_TIMEOUT_S)
                info = json.loads(reply.data)
                if "error" in info:
                    raise nats.js.errors.APIError.from_error(info["error"])
                last = int(info["state"]["last_seq"])
                if (await self._kv_read(kv_key))[1] != revision:
                    return None
                if new is None and revision is None:
                    return 0
                headers = {"Nats-Expected-Last-Sequence": str(last)}
                if new is None:
                    headers.update({"KV-Operation": "PURGE", "Nats-Rollup": "sub"})
                try:
                    ack = await self._js.publish(subject, new or b"", headers=headers)
                except nats.js.errors.APIError as exc:
                    if exc.err_code == 10071:   # wrong last sequence: the bucket moved on
                        continue
                    raise
                if new is None:
                    await self._kv_erase(kv_key, ack.seq)   # the marker (nothing if the key was written since)
                    return 0
                return int(ack.seq)
        raise _unavailable(f"a conditional write of a metadata key lost {MAX_RENUMBER} races in a row")

    async def _kv_erase(self, key: str, revision: int | None = None) -> bool:
        """Delete a key by purging its subject from the bucket's stream (history is 1): unlike a KV
        delete, no tombstone is left for scans to wade through. With `revision`, only if that is
        still the key's revision (False when the key has moved on)."""
        request: dict[str, Any] = {"filter": f"$KV.{self._kv_bucket}.{key}"}
        if revision is not None:
            request["seq"] = revision + 1   # purges the key's messages below revision + 1
        reply = await self._nc.request(f"$JS.API.STREAM.PURGE.KV_{self._kv_bucket}", json.dumps(request).encode(),
                                       timeout=REQUEST_TIMEOUT_S)
        answer = json.loads(reply.data)
        if "error" in answer:
            raise _api_error(nats.js.errors.APIError(**{k: answer["error"].get(k) for k in
                                                        ("code", "err_code", "description")}))
        return revision is None or answer.get("purged", 0) > 0

    async def _meta_write(self, changes: dict[bytes, bytes | None]) -> None:
        """One change at a time, in the order given, each waited for: a crash or an error leaves a
        prefix applied (pipelined puts could not promise that: after one failed, later ones may
        have been stored)."""
        for key, value in changes.items():
            if value is None:
                await self._kv_erase(meta_kv_key(key))
            else:
                kv_key = meta_kv_key(key)
                await self._kv.put(kv_key, _wrap(key, value) if _hashed(kv_key) else value)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing_flag.append(True)
        if self._probe is not None:
            self._probe.cancel()
        if self._resyncing is not None:
            self._resyncing.cancel()
        if self._reopening is not None:
            self._reopening.cancel()   # and waited for: its connection is closed before we return
            await asyncio.wait({self._reopening}, timeout=3 * CLOSE_REOPENING_S)   # its connect's end, its close
        try:
            await self._nc.close()
        except Exception:
            log.debug("closing the NATS connection", exc_info=True)


def _based_on(config: StreamConfig, current: StreamConfig) -> bool:
    """Whether `config`, a new layout (one more scale event), was computed from `current`, the
    stored one: its event starts from current's partition count and it keeps current's events
    (but those it dropped as older than the retention). Two brokers scaling at once: the second
    one's layout is refused, not written over the first's."""
    if config == current or not config.scale_events:
        return True
    newest = config.scale_events[-1]
    if newest in current.scale_events:   # the same event, written again (a retry)
        return True
    horizon = newest.timestamp_ms - config.retention_ms
    return newest.src_partition_count == current.partition_count and \
        all(e in config.scale_events for e in current.scale_events if e.timestamp_ms > horizon)


def _result(out: list[Any], times: list[tuple[int, int]], first: int | None, start: int, columns: bool) -> Any:
    if columns:
        return RecordBlock(first if first is not None else start, out, times)
    return out


_TS = struct.Struct(">q")   # a batch value's timestamp: bytes 4..12 of its header (storage/keys.py)


def _stamp(value: bytes, ts: int) -> bytes:
    """The batch value with its timestamp raised to `ts` (the partition's clock)."""
    return value[:4] + _TS.pack(ts) + value[12:]


class _Missing(Exception):
    """The partition's JetStream stream does not exist (no responders on its subject)."""


class _Conflict(Exception):
    """The expected last sequence was not the partition's: renumber."""


class _Unknown(Exception):
    """No answer to a publish: it may or may not be stored."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause
