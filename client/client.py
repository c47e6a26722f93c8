"""`Client`: a thin, typed, synchronous wrapper over the generated gRPC stubs. Returns the
dataclasses of client/model.py; raises the exceptions of client/errors.py. `AsyncClient`
(client/aio.py) is the same for asyncio, built from the same pieces (client/_wire.py)."""
from __future__ import annotations

import copy
import os
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

import grpc

from client import _wire
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc as pb_grpc
from client._wire import CURSOR_TYPES
from client.errors import SluiceError, from_rpc_error
from client.model import (
    AppInfo,
    AppPage,
    Assignment,
    Checkpoint,
    PartitionConsumerState,
    PutResult,
    Record,
    RecordsPage,
    SourceInfo,
    SourceStats,
    StreamDescription,
    StreamPage,
)

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Client", "Subscription", "CURSOR_TYPES", "PutResult", "Record", "RecordsPage"]


class Client:
    """Connects to a broker's gRPC port. Every call raises `client.errors.SluiceError` on refusal.

    `project`: the namespace of every call (the "sluice-project" metadata); default
    $SLUICE_PROJECT, else "default". The same stream name in two projects is two streams.
    `timeout`: seconds per call (long polls add their wait).
    `api_key`: for a broker with an auth file, sent as `authorization: Bearer KEY` on every call;
    the key's workspace is then the project (leave `project` out, or name that one).
    `tls_ca`: for a broker with TLS (--tls-cert): the CA certificate that signed it, as a PEM
    file's path or PEM bytes; the connection is then TLS and the broker's name is verified.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, project: str | None = None, timeout: float = 30.0,
                 api_key: str | None = None, tls_ca: str | bytes | os.PathLike[str] | None = None) -> None:
        _wire.check_target(target)
        self._metadata = _wire.call_metadata(project, api_key)
        credentials = _wire.channel_credentials(tls_ca)
        self._channel = grpc.secure_channel(target, credentials, options=_wire.CHANNEL_OPTIONS) if credentials \
            else grpc.insecure_channel(target, options=_wire.CHANNEL_OPTIONS)
        self._stub = pb_grpc.SluiceStub(self._channel)
        self._timeout = timeout
        self._closed = threading.Event()   # shared with the views of with_timeout

    @property
    def timeout(self) -> float:
        """Seconds a call may take (a streaming produce batch: until its answer)."""
        return self._timeout

    @property
    def project(self) -> str | None:
        """The project named on every call; None with an API key and no project: the key's."""
        return _wire.project_of(self._metadata)

    def close(self) -> None:
        self._closed.set()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def with_timeout(self, timeout: float) -> Client:
        """A view of this client on the same connection whose calls time out after `timeout`
        seconds (e.g. heartbeats that must not outlive a lease). Close the original, not the view."""
        view = copy.copy(self)
        view._timeout = timeout
        return view

    def _call(self, method: Callable[..., T], request: Any, decode: Callable[[T], R], extra_s: float = 0.0) -> R:
        try:
            return decode(method(request, timeout=self._timeout + extra_s, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # -- streams -------------------------------------------------------------------------------

    def create_stream(self, stream_name: str, partition_count: int, *, retention_hours: int = 0,
                      data_type: str = "", stream_type: str = "") -> None:
        """data_type "BLOB" (default) | "JSON" | "CSV"; stream_type "COMMON" (default) | "ADVANCED"."""
        self._call(self._stub.CreateStream, _wire.create_stream(stream_name, partition_count, retention_hours,
                                                                data_type, stream_type), _wire.nothing)

    def list_streams(self, limit: int = 100, start_after: str = "") -> StreamPage:
        return self._call(self._stub.ListStreams, pb.ListStreamsRequest(limit=limit, start_after=start_after),
                          _wire.stream_page)

    def describe_stream(self, stream_name: str, *, start_after_partition: int | None = None,
                        limit: int = 0) -> StreamDescription:
        """One page of partitions (default 100), after `start_after_partition` (exclusive)."""
        return self._call(self._stub.DescribeStream, _wire.describe_stream(stream_name, start_after_partition, limit),
                          _wire.stream_description)

    def update_partition_count(self, stream_name: str, target_partition_count: int) -> tuple[int, int]:
        """Scale the stream's writable partitions to 0..target-1 (the highest ids become DELETED
        on a scale-down: readable until retention). Returns (partition count before, after)."""
        return self._call(self._stub.UpdatePartitionCount, pb.UpdatePartitionCountRequest(
            stream_name=stream_name, target_partition_count=target_partition_count), _wire.scaled)

    def delete_stream(self, stream_name: str) -> None:
        self._call(self._stub.DeleteStream, pb.DeleteStreamRequest(stream_name=stream_name), _wire.nothing)

    # -- writing and reading -------------------------------------------------------------------

    def put_records(self, stream_name: str, records: Iterable[_wire.Payload | tuple[_wire.Payload, str]],
                    *, partition_id: int | None = None) -> list[PutResult]:
        """Send one batch: each item is a payload, or (payload, partition_key)."""
        return self.put_routed(stream_name, _wire.keyed(records, partition_id))

    def put_routed(self, stream_name: str, records: Iterable[tuple[bytes, str | None, int | None]]) -> list[PutResult]:
        """Send one batch whose entries each choose their own route: (payload, partition_key,
        partition_id); a partition_id wins over the key, neither means the broker spreads it."""
        return self._call(self._stub.PutRecords, _wire.put_records(stream_name, records), _wire.put_results)

    def put_records_stream(self, requests: Iterator[pb.PutRecordsStreamRequest]) -> Any:
        """Open a PutRecordsStream call (streaming produce) sending `requests`; returns the gRPC
        call: iterate it for the PutRecordsStreamResponse of each batch, in order (a broken call
        raises grpc.RpcError; `client.errors.from_rpc_error` translates it). No deadline: the call
        lives as long as the producer. `Producer` is the friendly way to use it."""
        return self._stub.PutRecordsStream(requests, metadata=self._metadata)

    def get_cursor(self, stream_name: str, partition_id: int, cursor_type: str = "TRIM_HORIZON",
                   starting_seq: int | None = None, timestamp_ms: int | None = None) -> str:
        return self._call(self._stub.GetCursor, _wire.get_cursor(stream_name, partition_id, cursor_type, starting_seq,
                                                                 timestamp_ms), _wire.cursor_of)

    def get_records(self, cursor: str, *, limit: int = 0, max_fetch_bytes: int = 0, wait_ms: int = 0) -> RecordsPage:
        """One page from `cursor`. With `wait_ms` (long poll, max 20000) an empty read waits for data."""
        return self._call(self._stub.GetRecords, pb.GetRecordsRequest(
            cursor=cursor, limit=limit, max_fetch_bytes=max_fetch_bytes, wait_ms=wait_ms),
            _wire.records_page, wait_ms / 1000)

    def subscribe(self, stream_name: str = "", partition_id: int = 0, cursor_type: str = "LATEST", *,
                  cursor: str = "", starting_seq: int | None = None, timestamp_ms: int | None = None,
                  max_records: int = 0, max_wait_ms: int = 0) -> Iterator[RecordsPage]:
        """Push consumption: yields pages as records are written (empty pages are heartbeats).
        Start from `cursor`, or from stream/partition/cursor_type like get_cursor. Iterate in
        your own pace: the broker waits for you (HTTP/2 flow control). Close the iterator to stop."""
        sub = self.subscription(stream_name, partition_id, cursor_type, cursor=cursor, starting_seq=starting_seq,
                                timestamp_ms=timestamp_ms, max_records=max_records, max_wait_ms=max_wait_ms)
        try:
            yield from sub
        except SluiceError as exc:
            # cancelled by closing this client: the end. By a stopping broker: BrokerUnavailable
            # (a cancel of our own ends the iteration in Subscription itself)
            if exc.status != grpc.StatusCode.CANCELLED or not self._closed.is_set():
                raise
        finally:
            sub.cancel()

    def subscription(self, stream_name: str = "", partition_id: int = 0, cursor_type: str = "LATEST", *,
                     cursor: str = "", starting_seq: int | None = None, timestamp_ms: int | None = None,
                     max_records: int = 0, max_wait_ms: int = 0) -> Subscription:
        """Like `subscribe`, but returns a `Subscription`: an iterator of pages whose `cancel()`
        may be called from any thread (e.g. to stop a reader blocked waiting for records)."""
        request = _wire.subscribe(stream_name, partition_id, cursor_type, cursor, starting_seq, timestamp_ms,
                                  max_records, max_wait_ms)
        return Subscription(self._stub.Subscribe(request, metadata=self._metadata))

    # -- apps and checkpoints ------------------------------------------------------------------

    def create_app(self, app_name: str) -> None:
        self._call(self._stub.CreateApp, pb.CreateAppRequest(app_name=app_name), _wire.nothing)

    def list_apps(self, limit: int = 100, start_after: str = "", stream_name: str = "") -> AppPage:
        return self._call(self._stub.ListApps, pb.ListAppsRequest(limit=limit, start_after=start_after,
                                                                  stream_name=stream_name), _wire.app_page)

    def describe_app(self, app_name: str) -> AppInfo:
        return self._call(self._stub.DescribeApp, pb.DescribeAppRequest(app_name=app_name), _wire.described_app)

    def delete_app(self, app_name: str) -> None:
        self._call(self._stub.DeleteApp, pb.DeleteAppRequest(app_name=app_name), _wire.nothing)

    def commit_checkpoint(self, app_name: str, stream_name: str, partition_id: int, seq: int,
                          metadata: str = "") -> None:
        """Record that `app_name` processed `partition_id` up to and including `seq`."""
        self._call(self._stub.CommitCheckpoint, pb.CommitCheckpointRequest(
            app_name=app_name, stream_name=stream_name, partition_id=partition_id, seq=seq, metadata=metadata),
            _wire.nothing)

    def get_checkpoint(self, app_name: str, stream_name: str, partition_id: int) -> Checkpoint | None:
        """The committed checkpoint, or None."""
        return self._call(self._stub.GetCheckpoint, pb.GetCheckpointRequest(
            app_name=app_name, stream_name=stream_name, partition_id=partition_id), _wire.checkpoint)

    def delete_checkpoint(self, app_name: str, stream_name: str, partition_id: int | None = None) -> None:
        self._call(self._stub.DeleteCheckpoint, _wire.delete_checkpoint(app_name, stream_name, partition_id),
                   _wire.nothing)

    def consumer_state(self, app_name: str, stream_name: str) -> list[PartitionConsumerState]:
        """Every partition's checkpoint, retained range and lag (all pages)."""
        out: list[PartitionConsumerState] = []
        after: int | None = None
        while True:
            resp = self._call(self._stub.GetConsumerState, _wire.consumer_state(app_name, stream_name, after),
                              _wire.same)
            out.extend(_wire.consumer_states(resp))
            if not resp.has_more or not resp.partitions:
                return out
            after = resp.partitions[-1].partition_id

    # -- consumer groups -----------------------------------------------------------------------

    def heartbeat(self, app_name: str, stream_name: str, member_id: str, held: Iterable[int] = (),
                  lease_ms: int = 0) -> Assignment:
        """The partitions this member may work on now, and the lease. See broker/core/leases.py."""
        return self._call(self._stub.Heartbeat, pb.HeartbeatRequest(
            app_name=app_name, stream_name=stream_name, member_id=member_id, held=list(held), lease_ms=lease_ms),
            _wire.assignment)

    def leave_group(self, app_name: str, stream_name: str, member_id: str) -> None:
        self._call(self._stub.LeaveGroup, pb.LeaveGroupRequest(app_name=app_name, stream_name=stream_name,
                                                               member_id=member_id), _wire.nothing)

    # -- sources -------------------------------------------------------------------------------
    # A source is named by its id or its name (`source`). Bad definitions raise InvalidRequest
    # (reason BAD_SOURCE, the message names the property); unknown sources NotFound
    # (SOURCE_NOT_FOUND); a taken name AlreadyExists (SOURCE_EXISTS); updating a running source
    # SluiceError with reason SOURCE_RUNNING.

    def create_source(self, source_name: str, source_type: str, stream_name: str, properties: dict[str, Any],
                      *, description: str = "") -> SourceInfo:
        """Create a source and start it: `source_type` e.g. "stream_generator", `properties` its
        properties object (e.g. {"template": "iot", "interval": "1s"}); `stream_name` must exist."""
        return self._call(self._stub.CreateSource, _wire.create_source(source_name, source_type, stream_name,
                                                                       properties, description), _wire.source_of)

    def list_sources(self) -> list[SourceInfo]:
        """Every source of the project, in name order."""
        return self._call(self._stub.ListSources, pb.ListSourcesRequest(), _wire.sources_of)

    def describe_source(self, source: str) -> SourceInfo:
        return self._call(self._stub.DescribeSource, pb.DescribeSourceRequest(source=source), _wire.source_of)

    def update_source(self, source: str, *, source_name: str | None = None, description: str | None = None,
                      stream_name: str | None = None, properties: dict[str, Any] | None = None) -> SourceInfo:
        """Change a stopped source: the arguments given replace the stored values (`properties`
        as a whole), the others stay."""
        return self._call(self._stub.UpdateSource, _wire.update_source(source, source_name, description, stream_name,
                                                                       properties), _wire.source_of)

    def delete_source(self, source: str) -> None:
        self._call(self._stub.DeleteSource, pb.DeleteSourceRequest(source=source), _wire.nothing)

    def start_source(self, source: str) -> SourceInfo:
        """Start a stopped source (nothing changes on a running one)."""
        return self._call(self._stub.StartSource, pb.StartSourceRequest(source=source), _wire.source_of)

    def stop_source(self, source: str) -> SourceInfo:
        """Stop a source (nothing changes on a stopped one)."""
        return self._call(self._stub.StopSource, pb.StopSourceRequest(source=source), _wire.source_of)

    def source_stats(self, source: str) -> SourceStats:
        """The source with its counters, its recent errors and its rows per second."""
        return self._call(self._stub.GetSourceStats, pb.GetSourceStatsRequest(source=source), _wire.source_stats)



class Subscription:
    """A running Subscribe call: iterate for pages (empty pages are heartbeats); `cancel()` from
    any thread ends the iteration quietly. Broker errors raise `SluiceError` from `next()`."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> RecordsPage:
        try:
            return _wire.subscribe_page(next(self._call))
        except grpc.RpcError as exc:
            if self._cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(exc) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
