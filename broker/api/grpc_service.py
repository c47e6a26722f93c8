"""The gRPC door: a servicer over the generated sluice.v1 contract. pb <-> model, one Broker call
per RPC, errors rendered by api/render.py.

Requests are registered with a tolerant deserializer: garbage bytes become an INVALID_ARGUMENT
with DIS.4300 instead of grpc's generic INTERNAL "Exception deserializing request!".
Bulk responses are built columnar (see the .proto): a few list extends per batch.

Shutdown drains before it stops: grpc core answers CANCELLED to every call it has received but not
yet handed to the application when the server stops, and the aio server hands calls over one at a
time, so under load most requests in flight at SIGTERM would be cancelled despite the grace period.
`start_draining()` keeps the server taking calls but refuses new work with UNAVAILABLE (DIS.5250, as
the group committer does once closed) and `drained()` waits until the calls already running finish.
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
from google.protobuf.message import DecodeError

from broker.api.render import grpc_status, grpc_trailers
from broker.core.broker import Broker
from broker.core.routing import format_partition_id
from broker.errors import BrokerError, ErrorCode, client_error, server_error
from broker.core.apps import AppInfo
from broker.model import GetRecordsResult, PutColumns, PutEntry, StreamConfig
from client._pb.sluice.v1 import sluice_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Sluice"].full_name
_CURSOR_TYPES = {v: k for k, v in pb.CursorType.items()}


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


Rpc = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def rpc(method: Rpc) -> Rpc:
    """Decode check + the one error mapping for every RPC."""
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        error: BrokerError
        self._active += 1
        try:
            if self._draining:
                error = server_error(ErrorCode.UNAVAILABLE, detail="broker is shutting down")
            elif isinstance(request, _Undecodable):
                error = client_error(ErrorCode.BAD_BODY, detail=f"malformed protobuf request: {request.reason}")
            else:
                try:
                    return await method(self, request, context)
                except BrokerError as exc:
                    error = exc
                except Exception:
                    request_id = uuid.uuid4().hex
                    log.exception("unhandled error in %s, request id %s", method.__name__, request_id)
                    error = server_error(ErrorCode.INTERNAL, request_id=request_id)
            await context.abort(grpc_status(error), error.message, trailing_metadata=grpc_trailers(error))
        finally:
            self._active -= 1
            # refused calls count too: while clients keep calling, grpc core holds calls it has not
            # handed over yet, and stopping then would answer those CANCELLED (not retried by
            # clients) instead of UNAVAILABLE. The stop stays bounded by --shutdown-grace.
            self._last_activity = time.monotonic()
    return wrapper


def _records_response(result: GetRecordsResult) -> pb.GetRecordsResponse:
    response = pb.GetRecordsResponse(next_partition_cursor=result.next_cursor,
                                     millis_behind_latest=result.millis_behind_latest)
    if result.records:
        seqs, timestamps, keys, data = zip(*result.records)
        response.sequence_numbers.extend(seqs)
        response.timestamps.extend(timestamps)
        response.partition_keys.extend(k or "" for k in keys)
        response.data.extend(data)
    return response


def _cursor_type(kind: int) -> str | None:
    return None if kind == pb.CURSOR_TYPE_UNSPECIFIED else _CURSOR_TYPES.get(kind, f"#{kind}")


def _app_info(info: AppInfo) -> pb.AppInfo:
    return pb.AppInfo(app_name=info.name, app_id=info.app_id, create_time=info.created_ms,
                      commit_checkpoint_stream_names=info.stream_names)


def _stream_info(c: StreamConfig) -> pb.StreamInfo:
    return pb.StreamInfo(stream_name=c.stream_name, partition_count=c.partition_count, retention_hours=c.retention_hours,
                         data_type=c.data_type, stream_type=c.stream_type, create_time=c.created_ms,
                         status="RUNNING", stream_id=c.stream_id)


class SluiceServicer:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._draining = False
        self._active = 0                          # RPCs inside a handler right now
        self._pushing = 0                         # of those, Subscribe handlers waiting in context.write
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
            if self._active - self._pushing == 0 and now - self._last_activity >= quiet:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(quiet / 4, max(deadline - now, 0.001)))

    @rpc
    async def CreateStream(self, request: pb.CreateStreamRequest, context: Any) -> pb.CreateStreamResponse:
        await self._broker.create_stream(request.stream_name, request.partition_count,
                                         request.retention_hours or None, request.data_type or None,
                                         request.stream_type or None)
        return pb.CreateStreamResponse()

    @rpc
    async def ListStreams(self, request: pb.ListStreamsRequest, context: Any) -> pb.ListStreamsResponse:
        page = await self._broker.list_streams(request.limit or None, request.start_stream_name or None)
        return pb.ListStreamsResponse(total_number=page.total, stream_names=[c.stream_name for c in page.streams],
                                      has_more_streams=page.has_more,
                                      streams=[_stream_info(c) for c in page.streams])

    @rpc
    async def DescribeStream(self, request: pb.DescribeStreamRequest, context: Any) -> pb.DescribeStreamResponse:
        desc = await self._broker.describe_stream(request.stream_name, request.start_partition_id or None,
                                                  request.limit_partitions or None)
        return pb.DescribeStreamResponse(
            stream=_stream_info(desc.config), has_more_partitions=desc.has_more_partitions,
            partitions=[pb.PartitionInfo(partition_id=format_partition_id(p.partition), status="ACTIVE",
                                         hash_range_start=p.hash_lo, hash_range_end=p.hash_hi,
                                         first_sequence_number=p.bounds.first_seq,
                                         next_sequence_number=p.bounds.next_seq)
                        for p in desc.partitions])

    @rpc
    async def DeleteStream(self, request: pb.DeleteStreamRequest, context: Any) -> pb.DeleteStreamResponse:
        await self._broker.delete_stream(request.stream_name)
        return pb.DeleteStreamResponse()

    @rpc
    async def PutRecords(self, request: pb.PutRecordsRequest, context: Any) -> pb.PutRecordsResponse:
        entries: list[PutEntry] | PutColumns
        if request.HasField("columns"):
            if request.records:
                raise client_error(ErrorCode.INVALID_REQUEST, detail="send records or columns, not both")
            cols = request.columns   # list() copies each repeated field in C: no object per record
            entries = PutColumns(list(cols.data), list(cols.partition_keys) or None,
                                 list(cols.explicit_hash_keys) or None, list(cols.partition_ids) or None)
        else:
            entries = [PutEntry(r.data, r.partition_key or None,
                                r.explicit_hash_key if r.HasField("explicit_hash_key") else None,
                                r.partition_id if r.HasField("partition_id") else None)
                       for r in request.records]
        result = await self._broker.put_records(request.stream_name, entries)
        return pb.PutRecordsResponse(
            failed_record_count=result.failed_record_count, partition_ids=result.partitions,
            sequence_numbers=result.seqs,
            failures=[pb.RecordFailure(index=i, error_code=e.code.dis_code, error_message=e.message)
                      for i, e in result.failures])

    @rpc
    async def GetCursor(self, request: pb.GetCursorRequest, context: Any) -> pb.GetCursorResponse:
        return pb.GetCursorResponse(partition_cursor=await self._get_cursor(request))

    async def _get_cursor(self, request: pb.GetCursorRequest | pb.SubscribeRequest) -> str:
        """GetCursor's fields, which SubscribeRequest repeats, to a cursor."""
        return await self._broker.get_cursor(
            request.stream_name, request.partition_id, _cursor_type(request.cursor_type),
            request.starting_sequence_number if request.HasField("starting_sequence_number") else None,
            request.timestamp if request.HasField("timestamp") else None)

    @rpc
    async def GetRecords(self, request: pb.GetRecordsRequest, context: Any) -> pb.GetRecordsResponse:
        result = await self._broker.get_records(request.partition_cursor, request.limit or None,
                                                request.max_fetch_bytes or None, request.wait_ms or None)
        return _records_response(result)

    @rpc
    async def Subscribe(self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext) -> None:
        cursor = request.partition_cursor or await self._get_cursor(request)
        batches = self._broker.subscribe(cursor, request.max_records or None, request.max_wait_ms or None)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                # write() waits for HTTP/2 flow control: a consumer that stops reading stops us here
                self._pushing += 1
                try:
                    await context.write(_records_response(batch))
                finally:
                    self._pushing -= 1
        raise server_error(ErrorCode.UNAVAILABLE, detail="broker is shutting down")

    @rpc
    async def CreateApp(self, request: pb.CreateAppRequest, context: Any) -> pb.CreateAppResponse:
        await self._broker.create_app(request.app_name)
        return pb.CreateAppResponse()

    @rpc
    async def ListApps(self, request: pb.ListAppsRequest, context: Any) -> pb.ListAppsResponse:
        total, page, more = await self._broker.list_apps(request.limit or None, request.start_app_name or None,
                                                         request.stream_name or None)
        return pb.ListAppsResponse(total_number=total, apps=[_app_info(a) for a in page], has_more_app=more)

    @rpc
    async def DescribeApp(self, request: pb.DescribeAppRequest, context: Any) -> pb.AppInfo:
        return _app_info(await self._broker.describe_app(request.app_name))

    @rpc
    async def DeleteApp(self, request: pb.DeleteAppRequest, context: Any) -> pb.DeleteAppResponse:
        await self._broker.delete_app(request.app_name)
        return pb.DeleteAppResponse()

    @rpc
    async def CommitCheckpoint(self, request: pb.CommitCheckpointRequest, context: Any) -> pb.CommitCheckpointResponse:
        await self._broker.commit_checkpoint(request.app_name, request.stream_name, request.partition_id,
                                             request.sequence_number, request.metadata or None,
                                             request.checkpoint_type or "LAST_READ")
        return pb.CommitCheckpointResponse()

    @rpc
    async def GetCheckpoint(self, request: pb.GetCheckpointRequest, context: Any) -> pb.GetCheckpointResponse:
        mark = await self._broker.get_checkpoint(request.app_name, request.stream_name, request.partition_id,
                                                 request.checkpoint_type or "LAST_READ")
        if mark is None:
            return pb.GetCheckpointResponse(found=False)
        return pb.GetCheckpointResponse(found=True, sequence_number=mark.seq, metadata=mark.metadata)

    @rpc
    async def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest, context: Any) -> pb.DeleteCheckpointResponse:
        await self._broker.delete_checkpoint(
            request.app_name, request.stream_name,
            request.partition_id if request.HasField("partition_id") else None, request.checkpoint_type or "LAST_READ")
        return pb.DeleteCheckpointResponse()

    @rpc
    async def GetConsumerState(self, request: pb.GetConsumerStateRequest, context: Any) -> pb.GetConsumerStateResponse:
        kind = request.checkpoint_type or "LAST_READ"
        states, more = await self._broker.consumer_state(request.app_name, request.stream_name, kind,
                                                         request.start_partition_id or None, request.limit or None)
        return pb.GetConsumerStateResponse(
            app_name=request.app_name, stream_name=request.stream_name, has_more=more,
            partitions=[pb.PartitionConsumingState(
                partition_id=format_partition_id(st.partition), has_checkpoint=st.checkpoint is not None,
                sequence_number=st.checkpoint.seq if st.checkpoint else -1, earliest_offset=st.earliest,
                latest_offset=st.latest, lag=st.lag, checkpoint_type=kind, status="ACTIVE") for st in states])

    @rpc
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        mine, lease = await self._broker.heartbeat(request.app_name, request.stream_name, request.member_id,
                                                   list(request.held), request.lease_ms or None)
        return pb.HeartbeatResponse(partitions=mine, lease_ms=lease)

    @rpc
    async def LeaveGroup(self, request: pb.LeaveGroupRequest, context: Any) -> pb.LeaveGroupResponse:
        await self._broker.leave_group(request.app_name, request.stream_name, request.member_id)
        return pb.LeaveGroupResponse()


def add_servicer(servicer: SluiceServicer, server: grpc.aio.Server) -> None:
    """Register every method of the service with tolerant request parsing."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Sluice"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name), request_deserializer=_tolerant(request_cls.FromString),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
