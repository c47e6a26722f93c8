"""Fuzz of the gRPC door, every method of sluice.v1.Sluice.

tests/e2e/test_grpc.py already sends random bytes to PutRecords and fixed garbage to every method.
Here, what it does not reach:
- random bytes to every method (Subscribe, a server stream, too; PutRecordsStream, a bidirectional
  one, as two batches: each answered in its place, with its catalogue row when refused);
- valid protobuf messages of every request type, built from the descriptors, with junk in every
  field: extreme integers, enum numbers outside the enum, odd strings (NUL, unicode), random
  bytes, repeated fields, nested messages; names drawn mostly from real streams, apps and cursors;
- odd request metadata: `sluice-project` values (and `-bin` bytes) of every kind.
Every answer is a response of the method's type or a refusal with a DIS code, never INTERNAL,
UNKNOWN or a hang (unary calls have a deadline; a Subscribe that is valid streams until its
deadline, by design). After the suite: health SERVING, a put and read back, the sentinel intact.
"""
from __future__ import annotations

import json
import string
from collections import Counter
from typing import Any, Iterator

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from broker.launcher import BrokerProcess
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc

from .harness import budget, guarded_broker

TIMEOUT = 15.0
SERVICE = pb.DESCRIPTOR.services_by_name["Sluice"]
METHODS = sorted(SERVICE.methods_by_name)
STREAM, APP = "fz-grpc", "fz-grpc-app"
BAD = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def _alive(proc: BrokerProcess) -> None:
    with grpc.insecure_channel(proc.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name),
                                                           timeout=TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = sluice_pb2_grpc.SluiceStub(channel)
        name = "fz-after"
        stub.CreateStream(pb.CreateStreamRequest(stream_name=name, partition_count=1), timeout=TIMEOUT)
        put = stub.PutRecords(pb.PutRecordsRequest(stream_name=name, records=pb.RecordList(
            entries=[pb.PutRecordsEntry(data=b"after the fuzz")])), timeout=TIMEOUT)
        assert put.failed_record_count == 0
        cursor = stub.GetCursor(pb.GetCursorRequest(stream_name=name, partition_id=0,
                                                    cursor_type=pb.CURSOR_TYPE_TRIM_HORIZON), timeout=TIMEOUT).cursor
        assert list(stub.GetRecords(pb.GetRecordsRequest(cursor=cursor), timeout=TIMEOUT).data) == [b"after the fuzz"]


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with guarded_broker(tmp_path_factory.mktemp("fuzz-grpc") / "data", alive=_alive) as proc:
        yield proc


@pytest.fixture(scope="module")
def channel(fuzz_broker: BrokerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_broker.grpc_target) as ch:
        stub = sluice_pb2_grpc.SluiceStub(ch)
        _ensure_stream(stub)
        stub.CreateApp(pb.CreateAppRequest(app_name=APP), timeout=TIMEOUT)
        yield ch


def _ensure_stream(stub: Any) -> None:
    try:
        stub.CreateStream(pb.CreateStreamRequest(stream_name=STREAM, partition_count=2), timeout=TIMEOUT)
        stub.PutRecords(pb.PutRecordsRequest(stream_name=STREAM, records=pb.RecordList(
            entries=[pb.PutRecordsEntry(data=b"x%d" % i, partition_id=i % 2) for i in range(6)])), timeout=TIMEOUT)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err


def _cursor(channel: grpc.Channel) -> str:
    stub = sluice_pb2_grpc.SluiceStub(channel)
    return str(stub.GetCursor(pb.GetCursorRequest(stream_name=STREAM, partition_id=1,
                                                  cursor_type=pb.CURSOR_TYPE_TRIM_HORIZON), timeout=TIMEOUT).cursor)


def dis_code(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("dis-error-code")


def call(channel: grpc.Channel, method: str, raw: bytes, metadata: tuple[tuple[str, Any], ...] = ()) -> str:
    """One call with raw request bytes; returns "ok" or the status name. Never INTERNAL/UNKNOWN; a
    refusal carries a DIS code; a Subscribe may stream until its deadline (a valid one waits)."""
    path = f"/{SERVICE.full_name}/{method}"
    response_type = pb.DESCRIPTOR.message_types_by_name[SERVICE.methods_by_name[method].output_type.name]
    streaming = SERVICE.methods_by_name[method].server_streaming
    try:
        if SERVICE.methods_by_name[method].client_streaming:   # PutRecordsStream: the bytes as two batches
            answers = channel.stream_stream(path, request_serializer=None, response_deserializer=None)(
                iter([raw, raw]), timeout=TIMEOUT, metadata=metadata)
            outcomes = [getattr(pb, response_type.name).FromString(message) for message in answers]
            assert len(outcomes) == 2, (method, raw[:60], outcomes)   # one answer per batch, the call goes on
            for outcome in outcomes:   # a bad batch is answered with its catalogue row, never INTERNAL
                if outcome.WhichOneof("outcome") == "error":
                    assert outcome.error.dis_code and outcome.error.reason != "INTERNAL", (method, raw[:60], outcome)
            return "ok"
        if streaming:
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                raw, timeout=1.0, metadata=metadata)
            for n, message in enumerate(stream):
                getattr(pb, response_type.name).FromString(message)
                if n >= 2:
                    stream.cancel()
                    break
        else:
            answer = channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                raw, timeout=TIMEOUT, metadata=metadata)
            getattr(pb, response_type.name).FromString(answer)
        return "ok"
    except grpc.RpcError as err:
        code = err.code()
        if streaming and code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return code.name
        assert code not in BAD and code != grpc.StatusCode.DEADLINE_EXCEEDED, (method, raw[:60], code, err.details())
        assert dis_code(err), (method, raw[:60], code, err.details(), "a refusal carries a DIS code")
        return str(code.name)


# -- messages from the descriptors -------------------------------------------------------------------

INTS = {FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
        FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
        FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
        FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
        FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1)}
PROPERTIES = [json.dumps(p) for p in ({"template": "iot", "interval": "1s"}, {"url": "ws://127.0.0.1:1",
                                                                              "data_type": "json"},
                                      {"url": "nats://127.0.0.1:1", "subject": "x", "data_type": "text"}, {}, [], 5)]
STRINGS = st.sampled_from([STREAM, STREAM, APP, "@CURSOR@", "", "stream_generator", "websocket", "fzsrc",
                           *PROPERTIES]) | st.text(max_size=20) | st.sampled_from(["\x00", "a\x00b", "ünï", "x" * 300,
                                                                                   "{", "null", "9" * 40])


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 2, -1 if lo < 0 else 3, lo, hi, hi - 1]) | st.integers(lo, hi) | st.integers(0, 4)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in INTS:
        return _ints(*INTS[t])
    if t == FieldDescriptor.TYPE_ENUM:   # open enums: any int32 goes on the wire
        return st.sampled_from([v.number for v in field.enum_type.values]) | _ints(-2**31, 2**31 - 1)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_STRING:
        return STRINGS
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    raise AssertionError(f"no strategy for {field.full_name}")


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor`'s type with any subset of fields set to junk (oneof members too:
    the last one set wins, as on the wire)."""
    cls = getattr(pb, descriptor.name) if descriptor.containing_type is None else None
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            value: st.SearchStrategy[Any] = messages(field.message_type, depth + 1)
        else:
            value = _scalar(field)
        optional[field.name] = st.lists(value, max_size=4) if _repeated(field) else value

    def build(values: dict[str, Any]) -> Any:
        msg = (cls or _class_of(descriptor))()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            target = getattr(msg, name) if field.type == FieldDescriptor.TYPE_MESSAGE or isinstance(value, list) \
                else None
            if isinstance(value, list):
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for v in value:
                        target.add().CopyFrom(v)   # type: ignore[union-attr]
                else:
                    target.extend(value)   # type: ignore[union-attr]
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(value)   # type: ignore[union-attr]
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=optional).map(build)


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _class_of(descriptor: Descriptor) -> Any:
    from google.protobuf import message_factory
    return message_factory.GetMessageClass(descriptor)


def _request_type(method: str) -> Descriptor:
    return SERVICE.methods_by_name[method].input_type


REQUESTS = st.sampled_from(METHODS).flatmap(lambda m: st.tuples(st.just(m), messages(_request_type(m))))
PROJECT_VALUES = st.sampled_from(["default", "fzp", "", " ", "x" * 65, "has space", "a/b", "..", "DEFAULT"]) | \
    st.text(alphabet=string.ascii_letters + string.digits + "-_ .!~", max_size=70)
METADATA = st.one_of(
    st.just(()),
    PROJECT_VALUES.map(lambda v: (("sluice-project", v),)),
    st.lists(PROJECT_VALUES, min_size=2, max_size=3).map(lambda vs: tuple(("sluice-project", v) for v in vs)),
    st.binary(max_size=20).map(lambda b: (("sluice-project-bin", b),)),
    st.tuples(st.sampled_from(["x-junk", "authorization", "grpc-timeout-ish", "sluice-projects"]),
              st.text(alphabet=string.printable.strip("\r\n\x0b\x0c\t"), max_size=30)).map(lambda kv: (kv,)))


def _cleanup(channel: grpc.Channel, metadata: tuple[tuple[str, Any], ...]) -> None:
    """Delete sources the fuzz made (a generator would write for the rest of the suite) and put
    back the stream it may have deleted."""
    stub = sluice_pb2_grpc.SluiceStub(channel)
    for md in {(), tuple(m for m in metadata if m[0] == "sluice-project")}:
        try:
            for source in stub.ListSources(pb.ListSourcesRequest(), timeout=TIMEOUT, metadata=md).sources:
                stub.DeleteSource(pb.DeleteSourceRequest(source=source.source_id), timeout=TIMEOUT, metadata=md)
        except grpc.RpcError as err:
            assert err.code() not in BAD, err
    _ensure_stream(stub)


def test_valid_messages_with_junk_fields(channel: grpc.Channel) -> None:
    cursor = _cursor(channel)
    seen: Counter[str] = Counter()

    @budget(1500)
    @given(request=REQUESTS, metadata=METADATA)
    def one(request: tuple[str, Any], metadata: tuple[tuple[str, Any], ...]) -> None:
        method, message = request
        for field in message.DESCRIPTOR.fields:   # a real cursor where the fuzz asked for one
            if field.type == FieldDescriptor.TYPE_STRING and not _repeated(field) \
                    and getattr(message, field.name) == "@CURSOR@":
                setattr(message, field.name, cursor)
        seen[call(channel, method, message.SerializeToString(), metadata)] += 1
        if method in ("CreateSource", "UpdateSource", "StartSource", "DeleteStream"):
            _cleanup(channel, metadata)

    one()
    assert seen["ok"] >= 20 and seen["INVALID_ARGUMENT"] >= 40, f"strategies too weak: {seen}"


def test_random_bytes_to_every_method(channel: grpc.Channel) -> None:
    seen: Counter[str] = Counter()

    @budget(800)
    @given(method=st.sampled_from(METHODS), raw=st.binary(max_size=200) | st.sampled_from(
        [b"\xff" * 11, b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x12\x7f" + b"\x00" * 5, b"\x00", b"\x07"]))
    def one(method: str, raw: bytes) -> None:
        seen[call(channel, method, raw)] += 1

    one()
    _cleanup(channel, ())
    assert seen["INVALID_ARGUMENT"] >= 50, seen
