"""`AsyncClient`: `Client` for asyncio, on grpc.aio (no threads). Same methods, same arguments,
same dataclasses and exceptions, awaited; `subscribe()` returns an `AsyncSubscription` to iterate
with `async for`. Create it inside the running event loop; close it with `await client.close()`
or `async with`. Cancelling a task that awaits a call cancels the RPC."""
from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator, Callable, Iterable, TypeVar

import grpc

from client import _wire
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc as pb_grpc
from client.errors import from_rpc_error
from client.model import (
    AppInfo,
    AppPage,
    Assignment,
    Checkpoint,
    PartitionConsumerState,
    PutResult,
    RecordsPage,
    SourceInfo,
    SourceStats,
    StreamDescription,
    StreamPage,
)

R = TypeVar("R")


class AsyncClient:
    """See `client.Client`: the same calls, awaited."""

    def __init__(self, target: str = "127.0.0.1:50051", *, project: str | None = None, timeout: float = 30.0,
                 api_key: str | None = None, tls_ca: str | bytes | os.PathLike[str] | None = None) -> None:
        _wire.check_target(target)
        self._metadata = _wire.call_metadata(project, api_key)
        credentials = _wire.channel_credentials(tls_ca)
        self._channel = grpc.aio.secure_channel(target, credentials, options=_wire.CHANNEL_OPTIONS) if credentials \
            else grpc.aio.insecure_channel(target, options=_wire.CHANNEL_OPTIONS)
        self._stub = pb_grpc.SluiceStub(self._channel)
        self._timeout = timeout

    @property
    def project(self) -> str | None:
        """The project named on every call; None with an API key and no project: the key's."""
        return _wire.project_of(self._metadata)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Any], request: Any, decode: Callable[[Any], R],
                    extra_s: float = 0.0) -> R:
        try:
            return decode(await method(request, timeout=self._timeout + extra_s, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # -- streams -------------------------------------------------------------------------------

    async def create_stream(self, stream_name: str, partition_count: int, *, retention_hours: int = 0,
                            data_type: str = "", stream_type: str = "") -> None:
        await self._call(self._stub.CreateStream, _wire.create_stream(stream_name, partition_count, retention_hours,
                                                                      data_type, stream_type), _wire.nothing)

    async def list_streams(self, limit: int = 100, start_after: str = "") -> StreamPage:
        return await self._call(self._stub.ListStreams, pb.ListStreamsRequest(limit=limit, start_after=start_after),
                                _wire.stream_page)

    async def describe_stream(self, stream_name: str, *, start_after_partition: int | None = None,
                              limit: int = 0) -> StreamDescription:
        return await self._call(self._stub.DescribeStream,
                                _wire.describe_stream(stream_name, start_after_partition, limit),
                                _wire.stream_description)

    async def update_partition_count(self, stream_name: str, target_partition_count: int) -> tuple[int, int]:
        """See Client.update_partition_count."""
        return await self._call(self._stub.UpdatePartitionCount, pb.UpdatePartitionCountRequest(
            stream_name=stream_name, target_partition_count=target_partition_count), _wire.scaled)

    async def delete_stream(self, stream_name: str) -> None:
        await self._call(self._stub.DeleteStream, pb.DeleteStreamRequest(stream_name=stream_name), _wire.nothing)

    # -- writing and reading -------------------------------------------------------------------

    async def put_records(self, stream_name: str, records: Iterable[_wire.Payload | tuple[_wire.Payload, str]],
                          *, partition_id: int | None = None) -> list[PutResult]:
        return await self.put_routed(stream_name, _wire.keyed(records, partition_id))

    async def put_routed(self, stream_name: str,
                         records: Iterable[tuple[bytes, str | None, int | None]]) -> list[PutResult]:
        return await self._call(self._stub.PutRecords, _wire.put_records(stream_name, records), _wire.put_results)

    def put_records_stream(self, requests: AsyncIterator[pb.PutRecordsStreamRequest] | None = None) -> Any:
        """Open a PutRecordsStream call (streaming produce); returns the grpc.aio call. Without
        `requests`, send with `await call.write(request)` (`client._wire.put_records_stream` builds
        one) and `await call.done_writing()`; read each batch's PutRecordsStreamResponse, in order,
        with `await call.read()` or `async for`. No deadline: the call lives as long as the producer."""
        return self._stub.PutRecordsStream(requests, metadata=self._metadata)

    async def get_cursor(self, stream_name: str, partition_id: int, cursor_type: str = "TRIM_HORIZON",
                         starting_seq: int | None = None, timestamp_ms: int | None = None) -> str:
        return await self._call(self._stub.GetCursor, _wire.get_cursor(stream_name, partition_id, cursor_type,
                                                                       starting_seq, timestamp_ms), _wire.cursor_of)

    async def get_records(self, cursor: str, *, limit: int = 0, max_fetch_bytes: int = 0,
                          wait_ms: int = 0) -> RecordsPage:
        return await self._call(self._stub.GetRecords, pb.GetRecordsRequest(
            cursor=cursor, limit=limit, max_fetch_bytes=max_fetch_bytes, wait_ms=wait_ms),
            _wire.records_page, wait_ms / 1000)

    def subscribe(self, stream_name: str = "", partition_id: int = 0, cursor_type: str = "LATEST", *,
                  cursor: str = "", starting_seq: int | None = None, timestamp_ms: int | None = None,
                  max_records: int = 0, max_wait_ms: int = 0) -> AsyncSubscription:
        """Push consumption: `async for page in client.subscribe(...)` (empty pages are heartbeats);
        `cancel()` ends it quietly."""
        request = _wire.subscribe(stream_name, partition_id, cursor_type, cursor, starting_seq, timestamp_ms,
                                  max_records, max_wait_ms)
        return AsyncSubscription(self._stub.Subscribe(request, metadata=self._metadata))

    # -- apps and checkpoints ------------------------------------------------------------------

    async def create_app(self, app_name: str) -> None:
        await self._call(self._stub.CreateApp, pb.CreateAppRequest(app_name=app_name), _wire.nothing)

    async def list_apps(self, limit: int = 100, start_after: str = "", stream_name: str = "") -> AppPage:
        return await self._call(self._stub.ListApps, pb.ListAppsRequest(limit=limit, start_after=start_after,
                                                                        stream_name=stream_name), _wire.app_page)

    async def describe_app(self, app_name: str) -> AppInfo:
        return await self._call(self._stub.DescribeApp, pb.DescribeAppRequest(app_name=app_name), _wire.described_app)

    async def delete_app(self, app_name: str) -> None:
        await self._call(self._stub.DeleteApp, pb.DeleteAppRequest(app_name=app_name), _wire.nothing)

    async def commit_checkpoint(self, app_name: str, stream_name: str, partition_id: int, seq: int,
                                metadata: str = "") -> None:
        await self._call(self._stub.CommitCheckpoint, pb.CommitCheckpointRequest(
            app_name=app_name, stream_name=stream_name, partition_id=partition_id, seq=seq, metadata=metadata),
            _wire.nothing)

    async def get_checkpoint(self, app_name: str, stream_name: str, partition_id: int) -> Checkpoint | None:
        return await self._call(self._stub.GetCheckpoint, pb.GetCheckpointRequest(
            app_name=app_name, stream_name=stream_name, partition_id=partition_id), _wire.checkpoint)

    async def delete_checkpoint(self, app_name: str, stream_name: str, partition_id: int | None = None) -> None:
        await self._call(self._stub.DeleteCheckpoint, _wire.delete_checkpoint(app_name, stream_name, partition_id),
                         _wire.nothing)

    async def consumer_state(self, app_name: str, stream_name: str) -> list[PartitionConsumerState]:
        out: list[PartitionConsumerState] = []
        after: int | None = None
        while True:
            resp = await self._call(self._stub.GetConsumerState, _wire.consumer_state(app_name, stream_name, after),
                                    _wire.same)
            out.extend(_wire.consumer_states(resp))
            if not resp.has_more or not resp.partitions:
                return out
            after = resp.partitions[-1].partition_id

    # -- consumer groups -----------------------------------------------------------------------

    async def heartbeat(self, app_name: str, stream_name: str, member_id: str, held: Iterable[int] = (),
                        lease_ms: int = 0) -> Assignment:
        return await self._call(self._stub.Heartbeat, pb.HeartbeatRequest(
            app_name=app_name, stream_name=stream_name, member_id=member_id, held=list(held), lease_ms=lease_ms),
            _wire.assignment)

    async def leave_group(self, app_name: str, stream_name: str, member_id: str) -> None:
        await self._call(self._stub.LeaveGroup, pb.LeaveGroupRequest(app_name=app_name, stream_name=stream_name,
                                                                     member_id=member_id), _wire.nothing)

    # -- sources -------------------------------------------------------------------------------

    async def create_source(self, source_name: str, source_type: str, stream_name: str, properties: dict[str, Any],
                            *, description: str = "") -> SourceInfo:
        return await self._call(self._stub.CreateSource, _wire.create_source(source_name, source_type, stream_name,
                                                                             properties, description), _wire.source_of)

    async def list_sources(self) -> list[SourceInfo]:
        return await self._call(self._stub.ListSources, pb.ListSourcesRequest(), _wire.sources_of)

    async def describe_source(self, source: str) -> SourceInfo:
        return await self._call(self._stub.DescribeSource, pb.DescribeSourceRequest(source=source), _wire.source_of)

    async def update_source(self, source: str, *, source_name: str | None = None, description: str | None = None,
                            stream_name: str | None = None, properties: dict[str, Any] | None = None) -> SourceInfo:
        return await self._call(self._stub.UpdateSource, _wire.update_source(source, source_name, description,
                                                                             stream_name, properties), _wire.source_of)

    async def delete_source(self, source: str) -> None:
        await self._call(self._stub.DeleteSource, pb.DeleteSourceRequest(source=source), _wire.nothing)

    async def start_source(self, source: str) -> SourceInfo:
        return await self._call(self._stub.StartSource, pb.StartSourceRequest(source=source), _wire.source_of)

    async def stop_source(self, source: str) -> SourceInfo:
        return await self._call(self._stub.StopSource, pb.StopSourceRequest(source=source), _wire.source_of)

    async def source_stats(self, source: str) -> SourceStats:
        return await self._call(self._stub.GetSourceStats, pb.GetSourceStatsRequest(source=source),
                                _wire.source_stats)



class AsyncSubscription:
    """A running Subscribe call: `async for page in sub` (empty pages are heartbeats); `cancel()`
    ends the iteration quietly. Broker errors raise `SluiceError`."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> RecordsPage:
        if self._cancelled:
            raise StopAsyncIteration
        try:
            resp = await self._call.read()
        except grpc.RpcError as exc:
            if self._cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise from_rpc_error(exc) from None
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from read() on a call cancelled by cancel(); a
            # cancellation of the task itself goes on
            task = asyncio.current_task()
            if self._cancelled and task is not None and not task.cancelling():
                raise StopAsyncIteration from None
            raise
        if resp is grpc.aio.EOF:
            raise StopAsyncIteration
        return _wire.subscribe_page(resp)

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()
