"""Everything `Client` and `AsyncClient` share: channel options and TLS, the metadata of every
call (project, API key), and the translation between the client's dataclasses (client/model.py)
and the generated messages. The two clients differ only in how they wait for an answer.

Channel options, chosen for a broker that restarts (deploys, crashes) while clients stay up:
* reconnect backoff: gRPC's default grows to 120 s (x1.6 from 1 s), so after a 20 s outage a
  channel may wait ~7 s more before it tries again. Here a broken channel retries every 100 ms
  at first, then at most every second: a client is back within about a second of the broker.
  `grpc.min_reconnect_backoff_ms` is, despite its name, the least time one connection attempt may
  take (default 20 s); 1 s is plenty on the networks a broker lives on.
* keepalive: while calls are open (long polls, subscriptions), ping every 30 s and give up on a
  connection that does not answer within 10 s, so a broker host that vanished without a FIN is
  noticed. The broker accepts a ping every 10 s on a call that carries no data (an idle produce
  stream; see broker/app.py). No pings without calls.
* message size: the broker's limit (13 MB: its largest body and 1 MB), so a request too large for
  it is refused here, before it is sent (a Producer sends such a batch by PutRecords, which fails
  it alone, never on its stream, where it would end the call).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, TypeVar

import grpc

from client._pb.sluice.v1 import sluice_pb2 as pb
from client.model import (
    AppInfo,
    AppPage,
    Assignment,
    Checkpoint,
    PartitionConsumerState,
    PartitionInfo,
    PutResult,
    Record,
    RecordsPage,
    ScaleEvent,
    Segment,
    SourceError,
    SourceInfo,
    SourceStats,
    SourceThroughput,
    StreamDescription,
    StreamInfo,
    StreamPage,
)

PROJECT_KEY = "sluice-project"
AUTHORIZATION_KEY = "authorization"
_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
DEFAULT_PROJECT = "default"
MAX_MESSAGE = 13 * 1024 * 1024   # the broker's (broker/app.py grpc_max_message): its largest body and 1 MB
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]
CURSOR_TYPES = ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER", "TRIM_HORIZON", "LATEST", "AT_TIMESTAMP")


def call_metadata(project: str | None, api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata of every call (subscriptions included). Without an API key: the project -
    `project`, else $SLUICE_PROJECT, else "default". With one: `authorization: Bearer KEY`, and
    the project only when named (argument or $SLUICE_PROJECT): the broker takes the key's workspace
    otherwise, and refuses a project that is not the key's."""
    project = project or os.environ.get("SLUICE_PROJECT")
    if project and not (project.isascii() and project.isprintable()):   # gRPC metadata is printable ASCII
        raise ValueError(f"project must be printable ASCII (names are [A-Za-z0-9_-]), got {project!r:.80}")
    if api_key is None:
        return ((PROJECT_KEY, project or DEFAULT_PROJECT),)
    if not api_key or not api_key.isascii() or not api_key.isprintable() or api_key != api_key.strip():
        raise ValueError("api_key must be non-empty printable ASCII without surrounding blanks")   # not echoed
    bearer = (AUTHORIZATION_KEY, f"Bearer {api_key}")
    return ((PROJECT_KEY, project), bearer) if project else (bearer,)


def project_of(metadata: tuple[tuple[str, str], ...]) -> str | None:
    return next((value for key, value in metadata if key == PROJECT_KEY), None)


def root_certificates(tls_ca: str | bytes | os.PathLike[str]) -> bytes:
    """`tls_ca`: PEM bytes (or text), or the path of a PEM file of the CA certificate(s) that
    signed the broker's certificate. OSError when the file cannot be read; ValueError when it
    holds no PEM certificate."""
    if isinstance(tls_ca, bytes):
        pem = tls_ca
    elif isinstance(tls_ca, str) and _PEM_BEGIN in tls_ca:
        pem = tls_ca.encode()
    else:
        with open(tls_ca, "rb") as f:
            pem = f.read()
    if _PEM_BEGIN.encode() not in pem:
        raise ValueError("tls_ca holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return pem


def channel_credentials(tls_ca: str | bytes | os.PathLike[str] | None) -> grpc.ChannelCredentials | None:
    """TLS credentials that trust `tls_ca` (see root_certificates), or None for plaintext."""
    if tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates(tls_ca))


def _enum(enum: Any, prefix: str, text: str) -> Any:
    """"JSON" -> DATA_TYPE_JSON; "" -> 0 (the broker's default). ValueError for an unknown name."""
    if not text:
        return 0
    try:
        return enum.Value(prefix + text)
    except ValueError:
        raise ValueError(f"unknown {prefix.rstrip('_').lower()} {text!r}") from None


def _name(enum: Any, prefix: str, number: int) -> str:
    return str(enum.Name(number)).removeprefix(prefix) if number in enum.values() else str(number)


def cursor_type(text: str) -> Any:
    return _enum(pb.CursorType, "CURSOR_TYPE_", text)


# -- requests ----------------------------------------------------------------------------------

def create_stream(stream_name: str, partition_count: int, retention_hours: int, data_type: str,
                  stream_type: str) -> pb.CreateStreamRequest:
    return pb.CreateStreamRequest(stream_name=stream_name, partition_count=partition_count,
                                  retention_hours=retention_hours,
                                  data_type=_enum(pb.DataType, "DATA_TYPE_", data_type),
                                  stream_type=_enum(pb.StreamType, "STREAM_TYPE_", stream_type))


def describe_stream(stream_name: str, start_after_partition: int | None, limit: int) -> pb.DescribeStreamRequest:
    request = pb.DescribeStreamRequest(stream_name=stream_name, limit=limit)
    if start_after_partition is not None:
        request.start_after_partition = start_after_partition
    return request


Payload = bytes | bytearray | memoryview


def keyed(records: Iterable[Payload | tuple[Payload, str]],
          partition_id: int | None) -> Iterator[tuple[bytes, str | None, int | None]]:
    """`put_records`' items (a payload, or (payload, partition_key)) as `put_routed`'s. Any
    bytes-like payload, as Producer.send takes: a bytearray was taken for a pair (its first byte
    the payload), failing "expected bytes, int found"."""
    for item in records:
        if isinstance(item, (bytes, bytearray, memoryview)):
            yield bytes(item), None, partition_id
        elif isinstance(item, str):   # unpacked as a pair, it failed "too many values to unpack"
            raise TypeError("a record's payload must be bytes, not str")
        else:
            data, key = item
            yield bytes(data) if isinstance(data, (bytearray, memoryview)) else data, key, partition_id


def check_target(target: str) -> None:
    """A ValueError for a target no broker is at: empty, or a host:port / [v6]:port whose port is
    outside 1..65535 - gRPC takes it modulo 65536, so ":99999" dialled port 34463 and
    "127.0.0.1:<port + 65536>" reached a broker on <port>. URI-style targets and bare IPv6
    addresses are gRPC's to read."""
    if not target.strip():
        raise ValueError("target must be the broker's host:port, not empty")
    host, sep, port = target.rpartition(":")
    if not sep or "/" in target or not (port.isascii() and port.isdigit()):
        return
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return
    if len(port.lstrip("0")) > 5 or not 1 <= int(port) <= 65535:   # no int() of 5,000 digits
        raise ValueError(f"{target!r:.100}: the port must be within 1..65535, got {port:.20}")


def put_records(stream_name: str, records: Iterable[tuple[bytes, str | None, int | None]]) -> pb.PutRecordsRequest:
    """(payload, partition_key, partition_id) per record. The columnar form (parallel arrays, no
    message per record to build here or parse there) unless only some records name a partition."""
    request: pb.PutRecordsRequest = _put_batch(pb.PutRecordsRequest(stream_name=stream_name), records)
    return request


def put_records_stream(batch_id: int, stream_name: str,
                       records: Iterable[tuple[bytes, str | None, int | None]]) -> pb.PutRecordsStreamRequest:
    """One batch of a PutRecordsStream call: the same fields as put_records, and the batch's id."""
    request: pb.PutRecordsStreamRequest = _put_batch(
        pb.PutRecordsStreamRequest(batch_id=batch_id, stream_name=stream_name), records)
    return request


def _put_batch(request: Any, records: Iterable[tuple[bytes, str | None, int | None]]) -> Any:
    """Fill the `batch` oneof (records | columns) PutRecordsRequest and PutRecordsStreamRequest share."""
    data: list[bytes] = []
    keys: list[str] = []
    partition_ids: list[Any] = []   # int, or None for "not given"
    for payload, key, partition_id in records:
        data.append(payload)
        keys.append(key or "")
        partition_ids.append(partition_id)
    pinned = sum(p is not None for p in partition_ids)
    if pinned and pinned != len(data):
        entries = [pb.PutRecordsEntry(data=d, partition_key=k, partition_id=p) if p is not None
                   else pb.PutRecordsEntry(data=d, partition_key=k) for d, k, p in zip(data, keys, partition_ids)]
        request.records.entries.extend(entries)
        return request
    columns = request.columns
    columns.data.extend(data)
    if any(keys):
        columns.partition_keys.extend(keys)
    if pinned:
        columns.partition_ids.extend(partition_ids)
    columns.SetInParent()   # an empty batch still says "columns" (the broker refuses it: EMPTY_REQUEST)
    return request


def get_cursor(stream_name: str, partition_id: int, kind: str, starting_seq: int | None,
               timestamp_ms: int | None) -> pb.GetCursorRequest:
    request = pb.GetCursorRequest(stream_name=stream_name, partition_id=partition_id, cursor_type=cursor_type(kind))
    if starting_seq is not None:
        request.starting_seq = starting_seq
    if timestamp_ms is not None:
        request.timestamp_ms = timestamp_ms
    return request


def subscribe(stream_name: str, partition_id: int, kind: str, cursor: str, starting_seq: int | None,
              timestamp_ms: int | None, max_records: int, max_wait_ms: int) -> pb.SubscribeRequest:
    request = pb.SubscribeRequest(cursor=cursor, stream_name=stream_name, partition_id=partition_id,
                                  cursor_type=cursor_type(kind), max_records=max_records, max_wait_ms=max_wait_ms)
    if starting_seq is not None:
        request.starting_seq = starting_seq
    if timestamp_ms is not None:
        request.timestamp_ms = timestamp_ms
    return request


def delete_checkpoint(app_name: str, stream_name: str, partition_id: int | None) -> pb.DeleteCheckpointRequest:
    request = pb.DeleteCheckpointRequest(app_name=app_name, stream_name=stream_name)
    if partition_id is not None:
        request.partition_id = partition_id
    return request


def consumer_state(app_name: str, stream_name: str, start_after_partition: int | None) -> pb.GetConsumerStateRequest:
    request = pb.GetConsumerStateRequest(app_name=app_name, stream_name=stream_name)
    if start_after_partition is not None:
        request.start_after_partition = start_after_partition
    return request


def properties_json(properties: Any) -> str:
    """A source's properties object as the JSON text the wire carries (ints stay ints).
    ValueError for what JSON cannot say (NaN, infinities, non-string keys of other types, nesting
    deeper than the encoder goes: a RecursionError)."""
    try:
        return json.dumps(properties, allow_nan=False, ensure_ascii=False)
    except TypeError as exc:
        raise ValueError(f"source properties must be JSON values: {exc}") from None
    except RecursionError:
        raise ValueError("source properties are nested too deeply to be written as JSON") from None


def create_source(source_name: str, source_type: str, stream_name: str, properties: Any,
                  description: str) -> pb.CreateSourceRequest:
    return pb.CreateSourceRequest(source_name=source_name, source_type=source_type, stream_name=stream_name,
                                  properties_json=properties_json(properties), description=description)


def update_source(source: str, source_name: str | None, description: str | None, stream_name: str | None,
                  properties: Any | None) -> pb.UpdateSourceRequest:
    """Only the fields given (not None) are sent: the broker keeps the others."""
    request = pb.UpdateSourceRequest(source=source)
    if source_name is not None:
        request.source_name = source_name
    if description is not None:
        request.description = description
    if stream_name is not None:
        request.stream_name = stream_name
    if properties is not None:
        request.properties_json = properties_json(properties)
    return request


# -- answers -----------------------------------------------------------------------------------

def stream_info(s: pb.StreamInfo) -> StreamInfo:
    return StreamInfo(s.stream_name, s.partition_count, s.retention_hours,
                      _name(pb.DataType, "DATA_TYPE_", s.data_type),
                      _name(pb.StreamType, "STREAM_TYPE_", s.stream_type), s.created_ms,
                      _name(pb.StreamStatus, "STREAM_STATUS_", s.status), s.stream_id,
                      s.readable_partition_count or s.partition_count,
                      tuple(ScaleEvent(e.timestamp_ms, e.src_partition_count, e.target_partition_count)
                            for e in s.scale_events))


def stream_page(resp: pb.ListStreamsResponse) -> StreamPage:
    return StreamPage(resp.total, [stream_info(s) for s in resp.streams], resp.has_more)


def stream_description(resp: pb.DescribeStreamResponse) -> StreamDescription:
    return StreamDescription(stream_info(resp.stream), [
        PartitionInfo(p.partition_id, _name(pb.PartitionStatus, "PARTITION_STATUS_", p.status), p.hash_range_start,
                      p.hash_range_end, p.first_seq, p.next_seq,
                      tuple(Segment(s.start_seq, tuple((q.partition_id, q.end_seq) for q in s.parents), s.timestamp_ms)
                            for s in p.segments))
        for p in resp.partitions], resp.has_more)


def batch_failure(error: pb.BatchError, n: int) -> list[PutResult]:
    """A PutRecordsStream batch of `n` records refused as a whole: the same result for each."""
    return [PutResult(-1, -1, error.reason, error.message, error.dis_code)] * n


def put_results(resp: pb.PutRecordsResponse) -> list[PutResult]:
    results = [PutResult(p, s) for p, s in zip(resp.partition_ids, resp.seqs)]
    for f in resp.failures:
        results[f.index] = PutResult(-1, -1, f.reason, f.message, f.dis_code)
    return results


def records_page(resp: pb.GetRecordsResponse | pb.RecordBatch) -> RecordsPage:
    records = [Record(s, t, d, k or None) for s, t, d, k in
               zip(resp.seqs, resp.timestamps_ms, resp.data, resp.partition_keys)]
    return RecordsPage(records, resp.next_cursor, resp.millis_behind_latest, resp.layout_ms)


def subscribe_page(resp: pb.SubscribeResponse) -> RecordsPage:
    """A batch, or a heartbeat as an empty page."""
    if resp.WhichOneof("event") == "heartbeat":
        return RecordsPage([], resp.heartbeat.next_cursor, resp.heartbeat.millis_behind_latest)
    return records_page(resp.records)


def app_info(a: pb.AppInfo) -> AppInfo:
    return AppInfo(a.app_name, a.app_id, a.created_ms, list(a.checkpoint_stream_names))


def app_page(resp: pb.ListAppsResponse) -> AppPage:
    return AppPage(resp.total, [app_info(a) for a in resp.apps], resp.has_more)


def checkpoint(resp: pb.GetCheckpointResponse) -> Checkpoint | None:
    return Checkpoint(resp.seq, resp.metadata) if resp.found else None


def consumer_states(resp: pb.GetConsumerStateResponse) -> list[PartitionConsumerState]:
    return [PartitionConsumerState(p.partition_id, p.checkpoint_seq if p.has_checkpoint else None, p.first_seq,
                                   p.last_seq, p.lag) for p in resp.partitions]


def assignment(resp: pb.HeartbeatResponse) -> Assignment:
    return Assignment(list(resp.partition_ids), resp.lease_ms)


def source_info(s: pb.SourceInfo) -> SourceInfo:
    return SourceInfo(s.source_id, s.source_name, s.description, s.source_type, s.stream_name,
                      json.loads(s.properties_json) if s.properties_json else {},
                      _name(pb.SourceStatus, "SOURCE_STATUS_", s.status), s.message, s.started_ms, s.created_ms,
                      s.updated_ms, s.messages_in, s.rows_written, s.error_count, s.last_error, s.last_error_ms,
                      s.last_event_ms, s.lag if s.HasField("lag") else None)


def sources_of(resp: pb.ListSourcesResponse) -> list[SourceInfo]:
    return [source_info(s) for s in resp.sources]


def source_of(resp: pb.CreateSourceResponse | pb.DescribeSourceResponse | pb.UpdateSourceResponse
              | pb.StartSourceResponse | pb.StopSourceResponse) -> SourceInfo:
    return source_info(resp.source)


def source_stats(resp: pb.GetSourceStatsResponse) -> SourceStats:
    return SourceStats(source_info(resp.source), [SourceError(e.time_ms, e.message) for e in resp.recent_errors],
                       [SourceThroughput(t.time_ms, t.rows) for t in resp.throughput])


T = TypeVar("T")


# -- response converters shared by Client and AsyncClient -------------------------------------------

def nothing(_: object) -> None:
    return None


def scaled(resp: pb.UpdatePartitionCountResponse) -> tuple[int, int]:
    return resp.src_partition_count, resp.target_partition_count


def same(resp: T) -> T:
    return resp


def cursor_of(resp: pb.GetCursorResponse) -> str:
    return str(resp.cursor)


def described_app(resp: pb.DescribeAppResponse) -> AppInfo:
    return app_info(resp.app)
