"""The gRPC door: a servicer over the generated sluice.v1 contract. pb <-> model, one Broker call
per RPC, errors rendered by api/grpc_render.py.

The project of a call is the request metadata key "sluice-project" ("default" when absent); the
core validates it. With an auth file (`--auth-file`) every RPC needs `authorization: Bearer KEY`
metadata: the key's workspace is the project (a "sluice-project" naming another one is
PERMISSION_DENIED) and its role must permit the RPC's Action (`@rpc(Action.X)`, the table of
broker/auth/roles.py). Without one nothing is looked at beyond "sluice-project". gRPC health and
reflection are other services: they stay open (they carry no data).

Wire enums map to the core's strings here, by name minus the enum's prefix
(DATA_TYPE_JSON <-> "JSON"); 0 (`*_UNSPECIFIED`) means "the default", and a number outside the
enum is handed to the core as "#<number>", which it refuses like any other bad value.

Sources (CreateSource ... GetSourceStats) are the broker's `Sources` manager, the same one the
Timeplus door's /v1beta2/sources routes use; a source's properties travel as JSON object text
(`properties_json`, see the .proto), parsed and shown here, checked by the manager.

Requests are registered with a tolerant deserializer: garbage bytes become an INVALID_ARGUMENT
with DIS.4300 instead of grpc's generic INTERNAL "Exception deserializing request!".
Bulk responses are built columnar (see the .proto): a few list extends per batch, no Python object
per record.

Shutdown drains before it stops: grpc core answers CANCELLED to every call it has received but not
yet handed to the application when the server stops, and the aio server hands calls over one at a
time, so under load most requests in flight at SIGTERM would be cancelled despite the grace period.
`start_draining()` keeps the server taking calls but refuses new work with UNAVAILABLE (DIS.5250, as
the group committer does once closed) and `drained()` waits until the calls already running finish.

PutRecordsStream (streaming produce) is PutRecords over one long-lived call: each request is a batch
with a client-chosen id, handled exactly as a PutRecords request (the same WritePath: routing,
throttling, per-record failures); each answer carries that id, and answers go out in request order.
A batch refused as a whole is answered with a BatchError (the catalogue row) and the stream goes on.
With an auth file each batch is authorized again (the key may have been revoked by a SIGHUP reload
since the call opened): a batch the key may no longer write is refused with the AUTH_* /
PERMISSION_DENIED row.
At most PRODUCE_STREAM_WINDOW batches of a call are unanswered at a time: the handler stops reading
the request stream while that many are, so HTTP/2 flow control holds the client back. Batches are
handed to the core in request order: each batch waits until the one before it has been handed to
the group committer (or has failed) before it is routed - also when one waits out a scale event -
so records of one partition are stored in the order they were sent. The call itself holds no
per-client slot; each batch holds a request slot until its answer is written (api/limits.py: a
batch past the limit is answered TOO_MANY_REQUESTS). Open calls are the gauge
`sluice_produce_streams_open` (not subscriptions). Each batch is one
observation of the verb `put_records_stream` in the request metrics. Once the broker is draining,
the call answers the batches it has and ends with UNAVAILABLE; a call waiting in its read with no
batch unanswered does not hold the drain up (like a subscription waiting in `context.write`).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

import grpc
import orjson
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import DecodeError

from broker.api.grpc_render import batch_error, record_failure, status_code, trailers
from broker.api.limits import Refused
from broker.auth import Action, Auth
from broker.core.apps import AppInfo
from broker.core.broker import Broker
from broker.core.limits import Limits, check_project
from broker.errors import BrokerError, ErrorCode, client_error, server_error
from broker.model import DEFAULT_PROJECT, GetRecordsResult, PartitionInfo, PutColumns, PutEntry, StreamConfig
from broker.sources.manager import Source, Sources
from broker.sources.props import bad, redacted
from client._pb.sluice.v1 import sluice_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Sluice"].full_name
PROJECT_KEY = "sluice-project"
AUTHORIZATION_KEY = "authorization"
# What context.write raises once the call has ended under it (the peer's connection dropped; the
# context says neither cancelled nor done yet): grpc's own class, not public API.
try:
    from grpc._cython.cygrpc import ExecuteBatchError as _CALL_ENDED
except ImportError:   # another grpc build: such a write is counted as an error, as before
    _CALL_ENDED = ()  # type: ignore[assignment,misc]
LAST_READ = "LAST_READ"
PRODUCE_STREAM_WINDOW = 8   # unanswered batches per PutRecordsStream call (see the module docstring)


class _Vocabulary:
    """A wire enum <-> the core's strings: DATA_TYPE_JSON (2) <-> "JSON"."""

    def __init__(self, enum: EnumTypeWrapper, prefix: str) -> None:
        self._names = {number: name.removeprefix(prefix) for name, number in enum.items() if number}
        self._numbers = {text: number for number, text in self._names.items()}

    def decode(self, number: int) -> str | None:
        """None for 0 (the default); "#n" for a number outside the enum (the core refuses it)."""
        return None if number == 0 else self._names.get(number, f"#{number}")

    def encode(self, text: str) -> Any:
        return self._numbers.get(text, 0)


DATA_TYPES = _Vocabulary(pb.DataType, "DATA_TYPE_")
STREAM_TYPES = _Vocabulary(pb.StreamType, "STREAM_TYPE_")
CURSOR_TYPES = _Vocabulary(pb.CursorType, "CURSOR_TYPE_")
CHECKPOINT_TYPES = _Vocabulary(pb.CheckpointType, "CHECKPOINT_TYPE_")
SOURCE_STATUSES = _Vocabulary(pb.SourceStatus, "SOURCE_STATUS_")


class _Undecodable:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return _Undecodable(str(exc) or "malformed protobuf")
    return deserialize


Rpc = Callable[..., Awaitable[Any]]


def grpc_max_message(limits: Limits) -> int:
    """The largest gRPC message the broker takes or sends: the largest HTTP body and 1 MB of
    framing. The client library's `_wire.MAX_MESSAGE` is the same with the default limits."""
    return limits.max_http_body_bytes + 1024 * 1024


# A GetRecords answer's bytes beyond its payloads, at most, per record: a partition key of 256
# characters of 4 bytes, its sequence number and time, and protobuf's framing of the four.
_RECORD_OVERHEAD_MAX = 256 * 4 + 40


def project_of(context: grpc.aio.ServicerContext) -> str:
    """The "sluice-project" request metadata, "default" when absent (the core validates it); the
    last one when given twice, as `authorize` reads it."""
    asked = _last(context.invocation_metadata() or (), PROJECT_KEY)
    return DEFAULT_PROJECT if asked is None else asked


def authorize(auth: Auth, context: grpc.aio.ServicerContext, action: Action) -> str:
    """With an auth file: the caller's project, from its `authorization: Bearer KEY` metadata.
    The key's workspace is the project; a "sluice-project" naming another one is refused (as is a
    role that may not do `action`). Raises the catalogue's AUTH_* / PERMISSION_DENIED rows."""
    metadata = context.invocation_metadata() or ()
    asked = _last(metadata, PROJECT_KEY)
    principal = auth.api_key(_bearer_token(_last(metadata, AUTHORIZATION_KEY)))
    Auth.check(principal, principal.project if asked is None else asked, action)
    return principal.project


class AuthGate(grpc.aio.ServerInterceptor):
    """With an auth file: a call of `service` without a known API key is refused as soon as its
    metadata arrives, before grpc reads its request message. Refused in the handler alone (the
    `rpc` wrapper), it came only once the whole message had: a caller with no credential held 30
    calls of 10 MiB each in the broker's memory until it closed (the security probe). The role and
    the project are checked in the handler still (`authorize`), which knows the method's Action."""

    def __init__(self, auth: Auth, refused: Callable[[str, BrokerError], None], service: str) -> None:
        """`refused(method name, error)`: told of each call refused (count_refused)."""
        self._auth, self._refused = auth, refused
        self._prefix = f"/{service}/"

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        method: str = details.method  # type: ignore[attr-defined]
        if self._auth.enabled and method.startswith(self._prefix):
            bearer = _last(details.invocation_metadata or (), AUTHORIZATION_KEY)  # type: ignore[attr-defined]
            try:
                self._auth.api_key(_bearer_token(bearer))
            except BrokerError as exc:
                self._refused(method[len(self._prefix):], exc)
                return _refused(exc)
        return await continuation(details)


def _refused(error: BrokerError) -> grpc.RpcMethodHandler:
    """A handler that answers `error` at once: a request-streaming one, so that no message is
    awaited first (a unary handler receives its request before its behavior runs)."""
    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(status_code(error), error.message, trailing_metadata=trailers(error))
    return grpc.stream_unary_rpc_method_handler(refuse)


def _last(metadata: Any, key: str) -> str | None:
    """The last value of `key` in a call's metadata (the gate and the handler read the same one)."""
    found = None
    for k, v in metadata:
        if k == key:
            found = str(v)
    return found


def _bearer_token(value: str | None) -> str | None:
    """`Bearer KEY` -> KEY; None when absent. Another scheme is AUTH_MALFORMED (never echoed)."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise client_error(ErrorCode.AUTH_MALFORMED, detail="expected the metadata authorization: Bearer <API key>")
    return token.strip()


_METHODS = frozenset(m.name for m in pb.DESCRIPTOR.services_by_name["Sluice"].methods)


def grpc_verb(name: str) -> str:
    """A method's metrics verb: put_records for PutRecords; "unmatched" for a name the service
    does not have (callers choose it: one series each would grow /metrics without bound)."""
    return _snake(name) if name in _METHODS else "unmatched"


def count_refused(stats: Any) -> Callable[[str, BrokerError], None]:
    """What the interceptors call for a call they refuse before its handler (AuthGate, the
    per-client limits): counted in the metrics as the handler's own errors are."""
    def refused(method: str, error: BrokerError) -> None:
        stats.observe_request("grpc", grpc_verb(method), 0.0, error)
    return refused


def _snake(name: str) -> str:
    """PutRecords -> put_records."""
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def rpc(action: Action, *, observe: bool = True) -> Callable[[Rpc], Rpc]:
    """`@rpc(Action.X)`: the decode check, who may call (with auth on), the project, and the one
    error mapping for every RPC. Every RPC is exactly one Action (see broker/auth/roles.py).
    `observe=False`: the method observes its own request metrics (one per batch of a stream); here
    only the error that ends a call is counted."""
    def decorate(method: Rpc) -> Rpc:
        verb = _snake(method.__name__)   # metrics: the same verb names as the HTTP doors' routes

        @functools.wraps(method)
        async def wrapper(self: SluiceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            error: BrokerError | None = None
            began = time.perf_counter()
            self._active += 1

            def count() -> None:
                if observe:
                    self._broker.stats.observe_request("grpc", verb, time.perf_counter() - began, error)
                elif error is not None:   # counted, but a long call's duration is no request latency
                    self._broker.stats.request_errors[("grpc", error.code.reason)] += 1
            try:
                if self._draining:
                    error = server_error(ErrorCode.UNAVAILABLE, detail="broker is shutting down")
                elif isinstance(request, _Undecodable):
                    error = client_error(ErrorCode.BAD_BODY,
                                         detail=f"malformed protobuf request: {request.reason}")
                else:
                    try:
                        project = project_of(context) if self._auth is None \
                            else authorize(self._auth, context, action)
                        return await method(self, request, context, project)
                    except BrokerError as exc:
                        error = exc
                    except Exception:
                        request_id = uuid.uuid4().hex
                        log.exception("unhandled error in %s, request id %s", method.__name__, request_id)
                        error = server_error(ErrorCode.INTERNAL, request_id=request_id)
                # counted before the abort: it sends the status before it raises, and a client that
                # reads the metrics as soon as it has its error must find this call in them
                count()
                await context.abort(status_code(error), error.message, trailing_metadata=trailers(error))
            finally:
                self._active -= 1
                if error is None:   # answered, or cancelled (an error was counted before its abort)
                    count()
                # refused calls count too: while clients keep calling, grpc core holds calls it has not
                # handed over yet, and stopping then would answer those CANCELLED (not retried by
                # clients) instead of UNAVAILABLE. The stop stays bounded by --shutdown-grace.
                self._last_activity = time.monotonic()
                # a caught error's traceback holds this frame: left in `error` it would make a
                # reference cycle keeping the request (a PutRecords of megabytes) alive until a full
                # garbage collection, which the broker's collector settings make rare
                error = None
        wrapper.action = action  # type: ignore[attr-defined]   # for tests and per-action hooks
        return wrapper
    return decorate


def _fill(out: Any, result: GetRecordsResult) -> Any:
    """The columns of a GetRecordsResponse or RecordBatch (same field names): one extend each."""
    out.next_cursor = result.next_cursor
    out.millis_behind_latest = result.millis_behind_latest
    out.layout_ms = result.layout_ms
    if result.records:
        seqs, timestamps, keys, data = zip(*result.records)
        out.seqs.extend(seqs)
        out.timestamps_ms.extend(timestamps)
        out.partition_keys.extend(k or "" for k in keys)
        out.data.extend(data)
    return out


def _subscribe_response(result: GetRecordsResult) -> pb.SubscribeResponse:
    out = pb.SubscribeResponse()
    if result.records:
        _fill(out.records, result)
    else:   # the core's heartbeat: an empty batch after a quiet spell
        out.heartbeat.next_cursor = result.next_cursor
        out.heartbeat.millis_behind_latest = result.millis_behind_latest
    return out


def _app_info(info: AppInfo) -> pb.AppInfo:
    return pb.AppInfo(app_name=info.name, app_id=info.app_id, created_ms=info.created_ms,
                      checkpoint_stream_names=info.stream_names)


def _stream_info(c: StreamConfig) -> pb.StreamInfo:
    return pb.StreamInfo(stream_name=c.stream_name, partition_count=c.partition_count,
                         retention_hours=c.retention_hours, data_type=DATA_TYPES.encode(c.data_type),
                         stream_type=STREAM_TYPES.encode(c.stream_type), created_ms=c.created_ms,
                         status=pb.STREAM_STATUS_RUNNING, stream_id=c.stream_id,
                         readable_partition_count=c.readable_partition_count,
                         scale_events=[pb.ScaleEvent(timestamp_ms=e.timestamp_ms,
                                                     src_partition_count=e.src_partition_count,
                                                     target_partition_count=e.target_partition_count)
                                       for e in c.scale_events])


_PARTITION_STATUSES = {"ACTIVE": pb.PARTITION_STATUS_ACTIVE, "DELETED": pb.PARTITION_STATUS_DELETED,
                       "EXPIRED": pb.PARTITION_STATUS_EXPIRED}


def _partition_info(p: PartitionInfo) -> pb.PartitionInfo:
    return pb.PartitionInfo(partition_id=p.partition, status=_PARTITION_STATUSES[p.status],
                            hash_range_start=p.hash_lo, hash_range_end=p.hash_hi,
                            first_seq=p.bounds.first_seq, next_seq=p.bounds.next_seq,
                            segments=[pb.Segment(start_seq=s.start_seq, timestamp_ms=s.timestamp_ms,
                                                 parents=[pb.ParentEnd(partition_id=q, end_seq=end)
                                                          for q, end in s.parents])
                                      for s in p.segments])


def _optional(request: Any, field: str) -> Any:
    return getattr(request, field) if request.HasField(field) else None


def _checkpoint_type(number: int) -> str:
    return CHECKPOINT_TYPES.decode(number) or LAST_READ


def _source_info(source: Source, secrets: bool) -> pb.SourceInfo:
    """`secrets` False: the properties as a role that may not manage sources sees them (redacted).
    No default: every caller says which (GetSourceStats once showed them to every role)."""
    d, st = source.definition, source.state
    properties = d.properties if secrets else redacted(d.properties)
    info = pb.SourceInfo(source_id=d.id, source_name=d.name, description=d.description, source_type=d.type,
                         stream_name=d.stream, properties_json=orjson.dumps(properties).decode(),
                         status=SOURCE_STATUSES.encode(st.status.upper()), message=st.message,
                         started_ms=d.started_ms, created_ms=d.created_ms, updated_ms=d.updated_ms,
                         messages_in=st.messages_in, rows_written=st.rows_written, error_count=st.errors,
                         last_error=st.last_error, last_error_ms=st.last_error_ms, last_event_ms=st.last_event_ms)
    if st.lag is not None:
        info.lag = st.lag
    return info


def _properties(text: str) -> Any:
    """properties_json -> the object the manager checks ("" = not given: None). Text that is not
    JSON is BAD_SOURCE naming the property; a JSON value that is not an object the manager refuses."""
    if not text:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise bad("properties", f"properties_json must be the text of a JSON object: {e}") from None
    if not isinstance(value, dict):   # `null` is not "unchanged": leave the field out for that
        raise bad("properties", "properties_json must be the text of a JSON object")
    return value


class _StreamBatches:
    """The unanswered batches of one PutRecordsStream call, in request order."""

    def __init__(self, servicer: SluiceServicer) -> None:
        self.window = asyncio.Semaphore(PRODUCE_STREAM_WINDOW)   # acquired before a batch is read
        self._servicer = servicer
        self._queue: asyncio.Queue[asyncio.Task[pb.PutRecordsStreamResponse] | None] = asyncio.Queue()

    def add(self, task: asyncio.Task[pb.PutRecordsStreamResponse] | None) -> None:
        """A batch's task; None: no more batches."""
        self._servicer._stream_batches += task is not None
        self._queue.put_nowait(task)

    async def answer(self, context: grpc.aio.ServicerContext) -> None:
        """Write each batch's answer, in request order, as soon as it and those before it are done."""
        while (task := await self._queue.get()) is not None:
            try:
                await context.write(await task)
            finally:
                # answered only once written: the drain waits for the batches taken until their
                # answers are on their way
                self._servicer._stream_batches -= 1
                self.window.release()

    def cancel(self) -> None:
        """The call is over: drop the batches not answered (an append already handed to the
        committer is shielded there: it completes)."""
        while not self._queue.empty():
            task = self._queue.get_nowait()
            if task is not None:
                task.cancel()
                self._servicer._stream_batches -= 1


class SluiceServicer:
    def __init__(self, broker: Broker, sources: Sources | None = None, auth: Auth | None = None) -> None:
        """`sources`: the broker's managed sources (app.py starts and closes them); without it, an
        unstarted set of its own (tests of the other verbs). `auth`: the broker's credentials;
        None (or an Auth without a file) leaves every RPC open, as without --auth-file."""
        self._broker = broker
        self._auth = auth if auth is not None and auth.enabled else None
        self._sources = sources or Sources(broker)
        self._draining = False
        self._active = 0                          # RPCs inside a handler right now
        self._pushing = 0                         # of those, Subscribe handlers waiting in context.write
        self._reading = 0                         # and PutRecordsStream handlers waiting for a batch
        self._stream_batches = 0                  # PutRecordsStream batches taken, not answered yet
        self._last_activity = time.monotonic()    # when one last finished

    def start_draining(self) -> None:
        """Shutdown step: from now on every RPC is answered UNAVAILABLE; running ones go on.
        (Subscriptions end by themselves once the broker begins shutting down.)"""
        self._draining = True
        self._last_activity = time.monotonic()  # quiet is counted from here at the earliest

    async def drained(self, quiet: float, timeout: float) -> bool:
        """Wait until no RPC has run for `quiet` seconds (so the calls grpc core had queued have
        been taken and answered), at most `timeout` seconds. True when quiet was reached.

        A subscription waiting in `context.write` is not waited for: once shutdown began it ends
        right after that write, and if its consumer has stopped reading the write never completes
        (the status cannot overtake the data HTTP/2 flow control holds back). Nothing is lost by
        not waiting - the records are stored, the consumer resumes from its cursor - so such
        streams are left to `server.stop()` to cancel."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self._active - self._pushing - self._reading == 0 and self._stream_batches == 0 \
                    and now - self._last_activity >= quiet:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(quiet / 4, max(deadline - now, 0.001)))

    # -- streams -----------------------------------------------------------------------------------

    @rpc(Action.MANAGE)
    async def CreateStream(self, request: pb.CreateStreamRequest, context: Any,
                           project: str) -> pb.CreateStreamResponse:
        await self._broker.create_stream(request.stream_name, request.partition_count, request.retention_hours or None,
                                         DATA_TYPES.decode(request.data_type), STREAM_TYPES.decode(request.stream_type),
                                         project=project)
        return pb.CreateStreamResponse()

    @rpc(Action.DESCRIBE)
    async def ListStreams(self, request: pb.ListStreamsRequest, context: Any, project: str) -> pb.ListStreamsResponse:
        page = await self._broker.list_streams(request.limit or None, request.start_after or None, project=project)
        return pb.ListStreamsResponse(total=page.total, has_more=page.has_more,
                                      streams=[_stream_info(c) for c in page.streams])

    @rpc(Action.DESCRIBE)
    async def DescribeStream(self, request: pb.DescribeStreamRequest, context: Any,
                             project: str) -> pb.DescribeStreamResponse:
        desc = await self._broker.describe_stream(request.stream_name, _optional(request, "start_after_partition"),
                                                  request.limit or None, project=project)
        return pb.DescribeStreamResponse(
            stream=_stream_info(desc.config), has_more=desc.has_more_partitions,
            partitions=[_partition_info(p) for p in desc.partitions])

    @rpc(Action.MANAGE)
    async def UpdatePartitionCount(self, request: pb.UpdatePartitionCountRequest, context: Any,
                                   project: str) -> pb.UpdatePartitionCountResponse:
        before, after = await self._broker.update_partition_count(request.stream_name,
                                                                  request.target_partition_count, project=project)
        return pb.UpdatePartitionCountResponse(src_partition_count=before.partition_count,
                                               target_partition_count=after.partition_count)

    @rpc(Action.MANAGE)
    async def DeleteStream(self, request: pb.DeleteStreamRequest, context: Any,
                           project: str) -> pb.DeleteStreamResponse:
        await self._broker.delete_stream(request.stream_name, project=project)
        return pb.DeleteStreamResponse()

    # -- writing -----------------------------------------------------------------------------------

    @rpc(Action.WRITE)
    async def PutRecords(self, request: pb.PutRecordsRequest, context: Any, project: str) -> pb.PutRecordsResponse:
        return await self._put_records(request, project)

    async def _put_records(self, request: pb.PutRecordsRequest | pb.PutRecordsStreamRequest, project: str,
                           handed: asyncio.Future[None] | None = None) -> pb.PutRecordsResponse:
        """One batch (the fields PutRecordsRequest and PutRecordsStreamRequest share) into the core.
        `handed` (a stream's batch): set once the batch is with the committer (see WritePath)."""
        entries: list[PutEntry] | PutColumns
        columnar = request.WhichOneof("batch") == "columns"
        # refused by its count before a Python object is made per record
        count = len(request.columns.data) if columnar else len(request.records.entries)
        await self._broker.check_put(request.stream_name, count, project=project)
        if columnar:
            cols = request.columns   # list() copies each repeated field in C: no object per record
            pids = cols.partition_ids
            entries = PutColumns(list(cols.data), list(cols.partition_keys) or None,
                                 list(cols.explicit_hash_keys) or None,
                                 # PutColumns says "" for "not set", so ids travel as text; a batch
                                 # routed by partition id is routed record by record in the core anyway
                                 [str(p) for p in pids] if pids else None)
        else:
            entries = [PutEntry(r.data, r.partition_key or None, _optional(r, "explicit_hash_key"),
                                _optional(r, "partition_id"))
                       for r in request.records.entries]
        if handed is None:
            result = await self._broker.put_records(request.stream_name, entries, project=project)
        else:
            result = await self._broker.put_records(request.stream_name, entries, project=project, handed=handed)
        partitions = result.partitions
        if result.failures:  # the core says -1, the wire's uint32 says 0 (and seq -1)
            partitions = list(partitions)
            for i, _ in result.failures:
                partitions[i] = 0
        return pb.PutRecordsResponse(failed_record_count=result.failed_record_count, partition_ids=partitions,
                                     seqs=result.seqs, failures=[record_failure(i, e) for i, e in result.failures])

    @rpc(Action.WRITE, observe=False)
    async def PutRecordsStream(self, requests: Any, context: grpc.aio.ServicerContext, project: str) -> None:
        """See the module docstring. `requests`: the call's async iterator of batches."""
        batches = _StreamBatches(self)
        writer = asyncio.create_task(batches.answer(context))
        stream = aiter(requests)
        draining = False
        stats = self._broker.stats
        stats.produce_streams += 1
        loop = asyncio.get_running_loop()
        previous: asyncio.Future[None] | None = None   # the batch before: handed to the committer yet?
        try:
            while not writer.done():
                await batches.window.acquire()   # K unanswered: stop reading, the client is held back
                self._reading += 1
                try:
                    request = await anext(stream)
                except StopAsyncIteration:
                    break
                finally:
                    self._reading -= 1
                if self._draining:
                    draining = True
                    break
                handed: asyncio.Future[None] = loop.create_future()
                batches.add(asyncio.create_task(self._put_batch(request, context, project, previous, handed)))
                previous = handed
            batches.add(None)
            await writer
        finally:   # normally a no-op; when the client went away (the call was cancelled) or an answer
            writer.cancel()        # could not be written: drop what is left
            batches.cancel()
            stats.produce_streams -= 1
        if draining:
            raise server_error(ErrorCode.UNAVAILABLE, detail="broker is shutting down")

    async def _put_batch(self, request: Any, context: grpc.aio.ServicerContext, project: str,
                         previous: asyncio.Future[None] | None,
                         handed: asyncio.Future[None]) -> pb.PutRecordsStreamResponse:
        """One batch of a stream: its answer, a BatchError for a batch refused as a whole.
        `previous`: done once the batch before is with the committer (or failed); `handed`: set
        once this one is, so the next may go on."""
        began = time.perf_counter()
        error: BrokerError | None = None
        refused = request.error if isinstance(request, Refused) else None
        if isinstance(request, Refused):   # past the client's limit of requests in progress
            request = request.request
        try:
            if previous is not None:
                await previous
            if isinstance(request, _Undecodable):   # no batch id to echo: 0, and the answer's position says which
                error = client_error(ErrorCode.BAD_BODY, detail=f"malformed protobuf request: {request.reason}")
                response = pb.PutRecordsStreamResponse()
            else:
                response = pb.PutRecordsStreamResponse(batch_id=request.batch_id)
                try:
                    if refused is not None:
                        raise refused
                    # the call may outlive its key (the auth file is re-read on SIGHUP): a removed key
                    # raises, and one bound to another project now must not write there (as Subscribe)
                    if self._auth is not None and authorize(self._auth, context, Action.WRITE) != project:
                        raise client_error(ErrorCode.PERMISSION_DENIED,
                                           detail="the key is bound to another project now")
                    response.result.CopyFrom(await self._put_records(request, project, handed))
                except BrokerError as exc:
                    error = exc
                except Exception:
                    request_id = uuid.uuid4().hex
                    log.exception("unhandled error in PutRecordsStream, request id %s", request_id)
                    error = server_error(ErrorCode.INTERNAL, request_id=request_id)
        finally:
            if not handed.done():
                handed.set_result(None)
        if error is not None:
            response.error.CopyFrom(batch_error(error))
        self._broker.stats.observe_request("grpc", "put_records_stream", time.perf_counter() - began, error)
        self._last_activity = time.monotonic()
        error = None   # no reference cycle through its traceback (see rpc)
        return response

    # -- reading -----------------------------------------------------------------------------------

    @rpc(Action.READ)
    async def GetCursor(self, request: pb.GetCursorRequest, context: Any, project: str) -> pb.GetCursorResponse:
        return pb.GetCursorResponse(cursor=await self._get_cursor(request, project))

    async def _get_cursor(self, request: pb.GetCursorRequest | pb.SubscribeRequest, project: str) -> str:
        """GetCursor's fields, which SubscribeRequest repeats, to a cursor."""
        return await self._broker.get_cursor(request.stream_name, request.partition_id,
                                             CURSOR_TYPES.decode(request.cursor_type),
                                             _optional(request, "starting_seq"), _optional(request, "timestamp_ms"),
                                             project=project)

    @rpc(Action.READ)
    async def GetRecords(self, request: pb.GetRecordsRequest, context: Any, project: str) -> pb.GetRecordsResponse:
        limit, largest = request.limit or None, grpc_max_message(self._broker.limits)
        while True:
            result = await self._broker.get_records(request.cursor, limit, request.max_fetch_bytes or None,
                                                    request.wait_ms or None, project=project)
            if request.wait_ms and self._auth is not None and authorize(self._auth, context, Action.READ) != project:
                # a long poll outlives its first check: a key a reload removed raised, one bound to
                # another project now must not read here (as Subscribe)
                raise client_error(ErrorCode.PERMISSION_DENIED, detail="the key is bound to another project now")
            response = _fill(pb.GetRecordsResponse(), result)
            n = len(result.records)
            # max_fetch_bytes counts payloads: with long partition keys a page in range can pass the
            # largest message grpc sends (RESOURCE_EXHAUSTED, no details). Then it is read again,
            # shorter, from the same cursor (reads take nothing; a rare page of ~10,000 keys of ~1 KiB)
            if n <= 1 or sum(map(len, response.data)) + n * _RECORD_OVERHEAD_MAX <= largest:
                return response
            size = response.ByteSize()
            if size <= largest:
                return response
            limit = max(1, n * largest // size * 9 // 10)

    @rpc(Action.READ)
    async def Subscribe(self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext, project: str) -> None:
        cursor = request.cursor or await self._get_cursor(request, project)
        batches = self._broker.subscribe(cursor, request.max_records or None, request.max_wait_ms or None,
                                         project=project)
        # the core's subscribe is an async generator (typed AsyncIterator): close it with the call
        async with contextlib.aclosing(batches):  # type: ignore[type-var]
            async for batch in batches:
                if self._auth is not None and authorize(self._auth, context, Action.READ) != project:
                    # the key was rebound to another project by a reload (a removed one raised)
                    raise client_error(ErrorCode.PERMISSION_DENIED, detail="the key is bound to another project now")
                # write() waits for HTTP/2 flow control: a consumer that stops reading stops us here
                self._pushing += 1
                try:
                    await context.write(_subscribe_response(batch))
                except _CALL_ENDED:   # the consumer went away (its connection dropped): not an error
                    return
                finally:
                    self._pushing -= 1
        raise server_error(ErrorCode.UNAVAILABLE, detail="broker is shutting down")

    # -- apps and checkpoints ----------------------------------------------------------------------

    @rpc(Action.MANAGE)
    async def CreateApp(self, request: pb.CreateAppRequest, context: Any, project: str) -> pb.CreateAppResponse:
        await self._broker.create_app(request.app_name, project=project)
        return pb.CreateAppResponse()

    @rpc(Action.DESCRIBE)
    async def ListApps(self, request: pb.ListAppsRequest, context: Any, project: str) -> pb.ListAppsResponse:
        total, page, more = await self._broker.list_apps(request.limit or None, request.start_after or None,
                                                         request.stream_name or None, project=project)
        return pb.ListAppsResponse(total=total, apps=[_app_info(a) for a in page], has_more=more)

    @rpc(Action.DESCRIBE)
    async def DescribeApp(self, request: pb.DescribeAppRequest, context: Any, project: str) -> pb.DescribeAppResponse:
        return pb.DescribeAppResponse(app=_app_info(await self._broker.describe_app(request.app_name,
                                                                                    project=project)))

    @rpc(Action.MANAGE)
    async def DeleteApp(self, request: pb.DeleteAppRequest, context: Any, project: str) -> pb.DeleteAppResponse:
        await self._broker.delete_app(request.app_name, project=project)
        return pb.DeleteAppResponse()

    @rpc(Action.CHECKPOINT)
    async def CommitCheckpoint(self, request: pb.CommitCheckpointRequest, context: Any,
                               project: str) -> pb.CommitCheckpointResponse:
        await self._broker.commit_checkpoint(request.app_name, request.stream_name, request.partition_id, request.seq,
                                             request.metadata or None, _checkpoint_type(request.checkpoint_type),
                                             project=project)
        return pb.CommitCheckpointResponse()

    @rpc(Action.READ)
    async def GetCheckpoint(self, request: pb.GetCheckpointRequest, context: Any,
                            project: str) -> pb.GetCheckpointResponse:
        mark = await self._broker.get_checkpoint(request.app_name, request.stream_name, request.partition_id,
                                                 _checkpoint_type(request.checkpoint_type), project=project)
        if mark is None:
            return pb.GetCheckpointResponse(found=False, seq=-1)
        return pb.GetCheckpointResponse(found=True, seq=mark.seq, metadata=mark.metadata)

    @rpc(Action.CHECKPOINT)
    async def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest, context: Any,
                               project: str) -> pb.DeleteCheckpointResponse:
        await self._broker.delete_checkpoint(request.app_name, request.stream_name, _optional(request, "partition_id"),
                                             _checkpoint_type(request.checkpoint_type), project=project)
        return pb.DeleteCheckpointResponse()

    @rpc(Action.DESCRIBE)
    async def GetConsumerState(self, request: pb.GetConsumerStateRequest, context: Any,
                               project: str) -> pb.GetConsumerStateResponse:
        kind = _checkpoint_type(request.checkpoint_type)
        states, more = await self._broker.consumer_state(request.app_name, request.stream_name, kind,
                                                         _optional(request, "start_after_partition"),
                                                         request.limit or None, project=project)
        return pb.GetConsumerStateResponse(
            app_name=request.app_name, stream_name=request.stream_name, has_more=more,
            partitions=[pb.PartitionConsumerState(
                partition_id=st.partition, has_checkpoint=st.checkpoint is not None,
                checkpoint_seq=st.checkpoint.seq if st.checkpoint else -1, first_seq=st.earliest,
                last_seq=st.latest, lag=st.lag, checkpoint_type=CHECKPOINT_TYPES.encode(kind),
                status=_PARTITION_STATUSES[st.status]) for st in states])

    # -- consumer groups ---------------------------------------------------------------------------

    @rpc(Action.CHECKPOINT)
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any, project: str) -> pb.HeartbeatResponse:
        mine, lease = await self._broker.heartbeat(request.app_name, request.stream_name, request.member_id,
                                                   list(request.held), request.lease_ms or None, project=project)
        return pb.HeartbeatResponse(partition_ids=mine, lease_ms=lease)

    @rpc(Action.CHECKPOINT)
    async def LeaveGroup(self, request: pb.LeaveGroupRequest, context: Any, project: str) -> pb.LeaveGroupResponse:
        await self._broker.leave_group(request.app_name, request.stream_name, request.member_id, project=project)
        return pb.LeaveGroupResponse()

    # -- sources -----------------------------------------------------------------------------------
    # The project is checked here: the manager takes any string, and a malformed project is a
    # malformed request (as for streams and apps), not "no such source".

    @rpc(Action.MANAGE)
    async def CreateSource(self, request: pb.CreateSourceRequest, context: Any,
                           project: str) -> pb.CreateSourceResponse:
        body = {"name": request.source_name, "type": request.source_type, "stream": request.stream_name,
                "properties": _properties(request.properties_json), "description": request.description}
        source = await self._sources.create(check_project(project), body)
        return pb.CreateSourceResponse(source=_source_info(source, secrets=True))   # a managing role's verb

    @rpc(Action.DESCRIBE)
    async def ListSources(self, request: pb.ListSourcesRequest, context: Any, project: str) -> pb.ListSourcesResponse:
        every = await self._sources.find_all(check_project(project))   # in name order
        after = [s for s in every if s.definition.name > request.start_after] if request.start_after else every
        page = after[:request.limit] if request.limit else after
        secrets = self._may_manage(context)
        return pb.ListSourcesResponse(total=len(every), sources=[_source_info(s, secrets) for s in page],
                                      has_more=len(page) < len(after))

    @rpc(Action.DESCRIBE)
    async def DescribeSource(self, request: pb.DescribeSourceRequest, context: Any,
                             project: str) -> pb.DescribeSourceResponse:
        return pb.DescribeSourceResponse(source=_source_info(await self._sources.find(check_project(project),
                                                                               request.source),
                                                             self._may_manage(context)))

    def _may_manage(self, context: Any) -> bool:
        """Whether the caller's role may manage (without an auth file: anyone). Its key was
        checked already (the call's own Action)."""
        if self._auth is None:
            return True
        try:
            authorize(self._auth, context, Action.MANAGE)
        except BrokerError:
            return False
        return True

    @rpc(Action.MANAGE)
    async def UpdateSource(self, request: pb.UpdateSourceRequest, context: Any,
                           project: str) -> pb.UpdateSourceResponse:
        body: dict[str, Any] = {}
        for field, key in (("source_name", "name"), ("description", "description"), ("stream_name", "stream")):
            if request.HasField(field):
                body[key] = getattr(request, field)
        if request.HasField("properties_json"):
            # given but empty: the manager refuses it ("properties is required"), not "unchanged"
            body["properties"] = _properties(request.properties_json) if request.properties_json else ""
        source = await self._sources.update(check_project(project), request.source, body)
        return pb.UpdateSourceResponse(source=_source_info(source, secrets=True))   # a managing role's verb

    @rpc(Action.MANAGE)
    async def DeleteSource(self, request: pb.DeleteSourceRequest, context: Any,
                           project: str) -> pb.DeleteSourceResponse:
        await self._sources.delete(check_project(project), request.source)
        return pb.DeleteSourceResponse()

    @rpc(Action.MANAGE)
    async def StartSource(self, request: pb.StartSourceRequest, context: Any, project: str) -> pb.StartSourceResponse:
        source = await self._sources.start_source(check_project(project), request.source)
        return pb.StartSourceResponse(source=_source_info(source, secrets=True))   # a managing role's verb

    @rpc(Action.MANAGE)
    async def StopSource(self, request: pb.StopSourceRequest, context: Any, project: str) -> pb.StopSourceResponse:
        source = await self._sources.stop_source(check_project(project), request.source)
        return pb.StopSourceResponse(source=_source_info(source, secrets=True))   # a managing role's verb

    @rpc(Action.DESCRIBE)
    async def GetSourceStats(self, request: pb.GetSourceStatsRequest, context: Any,
                             project: str) -> pb.GetSourceStatsResponse:
        source = await self._sources.find(check_project(project), request.source)
        st = source.state
        return pb.GetSourceStatsResponse(
            source=_source_info(source, self._may_manage(context)),
            recent_errors=[pb.SourceError(time_ms=ms, message=m) for ms, m in st.error_log],
            throughput=[pb.SourceThroughput(time_ms=sec * 1000, rows=rows) for sec, rows in st.throughput()])


def add_servicer(servicer: SluiceServicer, server: grpc.aio.Server) -> None:
    """Register every method of the service with tolerant request parsing."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Sluice"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        if method.client_streaming:
            make = grpc.stream_stream_rpc_method_handler   # PutRecordsStream (every client stream answers a stream)
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name), request_deserializer=_tolerant(request_cls.FromString),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
