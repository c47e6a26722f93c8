"""`Client`: a thin, typed, synchronous wrapper over the generated gRPC stubs."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import grpc

from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc as pb_grpc
from client.errors import from_rpc_error

T = TypeVar("T")
CURSOR_TYPES = ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER", "TRIM_HORIZON", "LATEST", "AT_TIMESTAMP")


@dataclass(frozen=True, slots=True)
class PutResult:
    """Outcome of one record: a partition and sequence number, or a DIS error code and message."""
    partition_id: int
    sequence_number: int
    error_code: str = ""
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_code


@dataclass(frozen=True, slots=True)
class Record:
    sequence_number: int
    timestamp: int
    data: bytes
    partition_key: str | None


@dataclass(frozen=True, slots=True)
class RecordsPage:
    records: list[Record]
    next_cursor: str
    millis_behind_latest: int


class Client:
    """Connects to a broker's gRPC port. Every call raises `client.errors.SluiceError` on refusal."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float = 30.0) -> None:
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024)])
        self._stub = pb_grpc.SluiceStub(self._channel)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def with_timeout(self, timeout: float) -> "Client":
        """A view of this client on the same connection whose calls time out after `timeout`
        seconds (e.g. heartbeats that must not outlive a lease). Close the original, not the view."""
        view = copy.copy(self)
        view._timeout = timeout
        return view

    def _call(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def create_stream(self, name: str, partitions: int, *, retention_hours: int = 0, data_type: str = "") -> None:
        self._call(self._stub.CreateStream, pb.CreateStreamRequest(
            stream_name=name, partition_count=partitions, retention_hours=retention_hours, data_type=data_type))

    def list_streams(self, limit: int = 100, start_after: str = "") -> pb.ListStreamsResponse:
        return self._call(self._stub.ListStreams, pb.ListStreamsRequest(limit=limit, start_stream_name=start_after))

    def describe_stream(self, name: str, *, start_after_partition: str = "",
                        limit_partitions: int = 0) -> pb.DescribeStreamResponse:
        """One page of partitions (default 100), after `start_after_partition` (exclusive)."""
        return self._call(self._stub.DescribeStream, pb.DescribeStreamRequest(
            stream_name=name, start_partition_id=start_after_partition, limit_partitions=limit_partitions))

    def delete_stream(self, name: str) -> None:
        self._call(self._stub.DeleteStream, pb.DeleteStreamRequest(stream_name=name))

    def put_records(self, stream: str, records: Iterable[bytes | tuple[bytes, str]],
                    *, partition_id: int | None = None) -> list[PutResult]:
        """Send one batch: each item is a payload, or (payload, partition_key)."""
        return self.put_routed(stream, ((item, None, partition_id) if isinstance(item, bytes)
                                        else (item[0], item[1], partition_id) for item in records))

    def put_routed(self, stream: str,
                   records: Iterable[tuple[bytes, str | None, int | None]]) -> list[PutResult]:
        """Send one batch whose entries each choose their own route: (payload, partition_key,
        partition_id); a partition_id wins over the key, neither means the broker spreads it."""
        data: list[bytes] = []
        keys: list[str] = []
        partition_ids: list[str] = []
        for payload, key, partition_id in records:
            data.append(payload)
            keys.append(key or "")
            partition_ids.append("" if partition_id is None else str(partition_id))
        # the columnar form: parallel arrays, no message per record to build here or parse there
        columns = pb.RecordColumns(data=data, partition_keys=keys if any(keys) else (),
                                   partition_ids=partition_ids if any(partition_ids) else ())
        resp = self._call(self._stub.PutRecords, pb.PutRecordsRequest(stream_name=stream, columns=columns))
        results = [PutResult(p, s) for p, s in zip(resp.partition_ids, resp.sequence_numbers)]
        for f in resp.failures:
            results[f.index] = PutResult(-1, -1, f.error_code, f.error_message)
        return results

    def get_cursor(self, stream: str, partition_id: int | str, cursor_type: str = "TRIM_HORIZON",
                   sequence_number: int | None = None, timestamp: int | None = None) -> str:
        request = pb.GetCursorRequest(stream_name=stream, partition_id=str(partition_id),
                                      cursor_type=pb.CursorType.Value(cursor_type))
        if sequence_number is not None:
            request.starting_sequence_number = str(sequence_number)
        if timestamp is not None:
            request.timestamp = timestamp
        return self._call(self._stub.GetCursor, request).partition_cursor

    def get_records(self, cursor: str, *, limit: int = 0, max_fetch_bytes: int = 0, wait_ms: int = 0) -> RecordsPage:
        """One page from `cursor`. With `wait_ms` (long poll, max 20000) an empty read waits for data."""
        timeout = self._timeout + wait_ms / 1000
        try:
            resp = self._stub.GetRecords(pb.GetRecordsRequest(
                partition_cursor=cursor, limit=limit, max_fetch_bytes=max_fetch_bytes, wait_ms=wait_ms),
                timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return _page(resp)

    def subscribe(self, stream: str = "", partition_id: int | str = "", cursor_type: str = "LATEST", *,
                  cursor: str = "", sequence_number: int | None = None, timestamp: int | None = None,
                  max_records: int = 0, max_wait_ms: int = 0) -> Iterator[RecordsPage]:
        """Push consumption: yields pages as records are written (empty pages are heartbeats).
        Start from `cursor`, or from stream/partition/cursor_type like get_cursor. Iterate in
        your own pace: the broker waits for you (HTTP/2 flow control). Close the iterator or
        call `.cancel()` on it to stop."""
        request = pb.SubscribeRequest(partition_cursor=cursor, stream_name=stream, partition_id=str(partition_id),
                                      cursor_type=pb.CursorType.Value(cursor_type), max_records=max_records,
                                      max_wait_ms=max_wait_ms)
        if sequence_number is not None:
            request.starting_sequence_number = str(sequence_number)
        if timestamp is not None:
            request.timestamp = timestamp
        responses = self._stub.Subscribe(request)
        try:
            for resp in responses:
                yield _page(resp)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise from_rpc_error(exc) from None
        finally:
            responses.cancel()

    def subscription(self, stream: str = "", partition_id: int | str = "", cursor_type: str = "LATEST", *,
                     cursor: str = "", sequence_number: int | None = None, timestamp: int | None = None,
                     max_records: int = 0, max_wait_ms: int = 0) -> "Subscription":
        """Like `subscribe`, but returns a `Subscription`: an iterator of pages whose `cancel()`
        may be called from any thread (e.g. to stop a reader blocked waiting for records)."""
        request = pb.SubscribeRequest(partition_cursor=cursor, stream_name=stream, partition_id=str(partition_id),
                                      cursor_type=pb.CursorType.Value(cursor_type), max_records=max_records,
                                      max_wait_ms=max_wait_ms)
        if sequence_number is not None:
            request.starting_sequence_number = str(sequence_number)
        if timestamp is not None:
            request.timestamp = timestamp
        return Subscription(self._stub.Subscribe(request))

    # -- apps and checkpoints ------------------------------------------------------------------

    def create_app(self, name: str) -> None:
        self._call(self._stub.CreateApp, pb.CreateAppRequest(app_name=name))

    def list_apps(self, limit: int = 100, start_after: str = "", stream: str = "") -> pb.ListAppsResponse:
        return self._call(self._stub.ListApps, pb.ListAppsRequest(limit=limit, start_app_name=start_after,
                                                                  stream_name=stream))

    def describe_app(self, name: str) -> pb.AppInfo:
        return self._call(self._stub.DescribeApp, pb.DescribeAppRequest(app_name=name))

    def delete_app(self, name: str) -> None:
        self._call(self._stub.DeleteApp, pb.DeleteAppRequest(app_name=name))

    def commit_checkpoint(self, app: str, stream: str, partition_id: int | str, sequence_number: int,
                          metadata: str = "") -> None:
        """Record that `app` processed `partition_id` up to and including `sequence_number`."""
        self._call(self._stub.CommitCheckpoint, pb.CommitCheckpointRequest(
            app_name=app, stream_name=stream, partition_id=str(partition_id),
            sequence_number=str(sequence_number), metadata=metadata))

    def get_checkpoint(self, app: str, stream: str, partition_id: int | str) -> tuple[int, str] | None:
        """(sequence_number, metadata) of the committed checkpoint, or None."""
        resp = self._call(self._stub.GetCheckpoint, pb.GetCheckpointRequest(
            app_name=app, stream_name=stream, partition_id=str(partition_id)))
        return (resp.sequence_number, resp.metadata) if resp.found else None

    def delete_checkpoint(self, app: str, stream: str, partition_id: int | str | None = None) -> None:
        request = pb.DeleteCheckpointRequest(app_name=app, stream_name=stream)
        if partition_id is not None:
            request.partition_id = str(partition_id)
        self._call(self._stub.DeleteCheckpoint, request)

    def consumer_state(self, app: str, stream: str) -> list[pb.PartitionConsumingState]:
        """Every partition's checkpoint, retained range and lag (all pages)."""
        out: list[pb.PartitionConsumingState] = []
        after = ""
        while True:
            resp = self._call(self._stub.GetConsumerState, pb.GetConsumerStateRequest(
                app_name=app, stream_name=stream, start_partition_id=after))
            out.extend(resp.partitions)
            if not resp.has_more or not resp.partitions:
                return out
            after = resp.partitions[-1].partition_id

    # -- consumer groups -----------------------------------------------------------------------

    def heartbeat(self, app: str, stream: str, member_id: str, held: Iterable[int] = (),
                  lease_ms: int = 0) -> tuple[list[int], int]:
        """(partitions this member may work on now, lease_ms). See broker/core/leases.py."""
        resp = self._call(self._stub.Heartbeat, pb.HeartbeatRequest(
            app_name=app, stream_name=stream, member_id=member_id, held=list(held), lease_ms=lease_ms))
        return list(resp.partitions), resp.lease_ms

    def leave_group(self, app: str, stream: str, member_id: str) -> None:
        self._call(self._stub.LeaveGroup, pb.LeaveGroupRequest(app_name=app, stream_name=stream, member_id=member_id))


class Subscription:
    """A running Subscribe call: iterate for pages (empty pages are heartbeats); `cancel()` from
    any thread ends the iteration quietly. Broker errors raise `SluiceError` from `next()`."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    def __iter__(self) -> "Subscription":
        return self

    def __next__(self) -> RecordsPage:
        try:
            return _page(next(self._call))
        except grpc.RpcError as exc:
            if self._cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(exc) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def _page(resp: pb.GetRecordsResponse) -> RecordsPage:
    records = [Record(s, t, d, k or None) for s, t, d, k in
               zip(resp.sequence_numbers, resp.timestamps, resp.data, resp.partition_keys)]
    return RecordsPage(records, resp.next_partition_cursor, resp.millis_behind_latest)
