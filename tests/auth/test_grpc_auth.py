"""The gRPC door with an auth file: `authorization: Bearer KEY` metadata names the caller, the key's
workspace is the project, its role decides which RPCs it may make. One real broker process for
the module (started with --auth-file), reached by our client, the raw generated stub and the CLI.
"""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from broker.launcher import BrokerProcess
from client import (
    AsyncClient,
    AsyncPartitionConsumer,
    Client,
    GroupConsumer,
    NotFound,
    PartitionConsumer,
    PermissionDenied,
    Producer,
    Unauthenticated,
)
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]

# 60 characters like Timeplus keys; distinct per role and project
ADMIN = "a" * 52 + "admin-p1"
PRODUCER = "p" * 52 + "prod-p1-"
CONSUMER = "c" * 52 + "cons-p1-"
ADMIN_P2 = "b" * 52 + "admin-p2"
KEYS = (ADMIN, PRODUCER, CONSUMER, ADMIN_P2)

AUTH_FILE = f"""
[[api_keys]]
key = "{ADMIN}"
workspace = "p1"
role = "admin"
[[api_keys]]
key = "{PRODUCER}"
workspace = "p1"
role = "producer"
[[api_keys]]
key = "{CONSUMER}"
workspace = "p1"
role = "consumer"
[[api_keys]]
key = "{ADMIN_P2}"
workspace = "p2"
role = "admin"
"""

# The plan's table, written out here on its own (not read from the servicer): every RPC, one action.
ACTION = {
    "CreateStream": "manage", "DeleteStream": "manage", "UpdatePartitionCount": "manage", "CreateApp": "manage",
    "DeleteApp": "manage",
    "CreateSource": "manage", "UpdateSource": "manage", "DeleteSource": "manage", "StartSource": "manage",
    "StopSource": "manage",
    "ListStreams": "describe", "DescribeStream": "describe", "ListApps": "describe", "DescribeApp": "describe",
    "GetConsumerState": "describe", "ListSources": "describe", "DescribeSource": "describe",
    "GetSourceStats": "describe",
    "PutRecords": "write", "PutRecordsStream": "write",
    "GetCursor": "read", "GetRecords": "read", "Subscribe": "read", "GetCheckpoint": "read",
    "CommitCheckpoint": "checkpoint", "DeleteCheckpoint": "checkpoint", "Heartbeat": "checkpoint",
    "LeaveGroup": "checkpoint",
}
ROLES = {ADMIN: {"manage", "describe", "write", "read", "checkpoint"},
         PRODUCER: {"write", "describe"},
         CONSUMER: {"read", "describe", "checkpoint"}}


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    root = tmp_path_factory.mktemp("grpc-auth")
    (root / "auth.toml").write_text(AUTH_FILE)
    proc = BrokerProcess(root / "data", "--auth-file", str(root / "auth.toml"), "--log-level", "DEBUG").start()
    yield proc
    proc.stop(30)


@pytest.fixture
def target(auth_broker: BrokerProcess) -> str:
    return auth_broker.grpc_target


@pytest.fixture
def stream(target: str) -> str:
    """A fresh 2-partition stream of project p1, made by the admin key."""
    name = f"s{uuid.uuid4().hex[:10]}"
    with Client(target, api_key=ADMIN) as admin:
        admin.create_stream(name, 2)
    return name


def raw_call(target: str, method: str, request: Any, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError | Any:
    """Call `method` with the generated stub; the answer, or the RpcError it raised."""
    with grpc.insecure_channel(target) as channel:
        call = getattr(pb_grpc.SluiceStub(channel), method)
        try:
            if method == "PutRecordsStream":   # a stream of requests: this one batch
                return list(call(iter([request]), metadata=metadata, timeout=10))
            answer = call(request, metadata=metadata, timeout=10)
            return list(answer) if method == "Subscribe" else answer
        except grpc.RpcError as exc:
            return exc


def error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin trailer"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# -- who is calling ------------------------------------------------------------------------------

@pytest.mark.parametrize(("metadata", "reason", "dis_code"), [
    ((), "AUTH_MISSING", "DIS.4101"),
    ((("sluice-project", "p1"),), "AUTH_MISSING", "DIS.4101"),
    (bearer("x" * 60), "AUTH_UNKNOWN_KEY", "DIS.4107"),
    (bearer(""), "AUTH_MISSING", "DIS.4101"),
    ((("authorization", f"Basic {ADMIN}"),), "AUTH_MALFORMED", "DIS.4102"),
])
def test_missing_unknown_or_malformed_key_is_unauthenticated_with_error_info(target: str, metadata: Any,
                                                                              reason: str, dis_code: str) -> None:
    exc = raw_call(target, "ListStreams", pb.ListStreamsRequest(), metadata)
    assert isinstance(exc, grpc.RpcError)
    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(exc)
    assert (info.reason, info.domain, info.metadata["dis_code"]) == (reason, "sluice", dis_code)
    assert ADMIN not in (exc.details() or "")


def _h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """A header as an HPACK literal without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _unary_call_ends_before_its_message(target: str, metadata: tuple[tuple[str, str], ...], wait: float) -> bool:
    """Over raw HTTP/2: a PutRecords call whose message announces 10 MiB and sends 1 KB of it.
    Whether the broker ends the call (trailers or a reset) within `wait` seconds."""
    host, port = target.rsplit(":", 1)
    headers = b"".join(_hpack_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", f"/{pb.DESCRIPTOR.services_by_name['Sluice'].full_name}"
                                                          "/PutRecords"),
        (":authority", target), ("content-type", "application/grpc"), ("te", "trailers"), *metadata))
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0)            # preface, SETTINGS
                     + _h2_frame(1, 4, 1, headers)                                     # HEADERS, END_HEADERS
                     + _h2_frame(0, 0, 1, b"\x00" + struct.pack(">I", 10 << 20) + b"\x00" * 1000))   # DATA
        deadline = time.monotonic() + wait
        buffer = b""
        while time.monotonic() < deadline:
            try:
                got = sock.recv(65536)
            except TimeoutError:
                return False
            if not got:
                return True   # the connection closed: the call ended too
            buffer += got
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags, stream_id = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                buffer = buffer[9 + length:]
                if kind == 4 and not flags & 1:
                    sock.sendall(_h2_frame(4, 1, 0))   # SETTINGS ACK
                if stream_id == 1 and (kind == 3 or (kind == 1 and flags & 1)):   # RST_STREAM, or END_STREAM
                    return True
            sock.settimeout(max(0.01, deadline - time.monotonic()))
        return False


def test_a_call_without_a_known_key_is_refused_before_its_message_arrives(target: str) -> None:
    """Refused in the handler, it came only once grpc had the whole message: a caller with no
    credential held 10 MiB per call in the broker until it closed (the security probe). The gate
    answers when the metadata arrives; a call with a key is taken and waits for its message."""
    for metadata in ((), bearer("x" * 60), (("authorization", "Basic zzz"),)):
        assert _unary_call_ends_before_its_message(target, metadata, wait=10), metadata
    assert not _unary_call_ends_before_its_message(target, bearer(ADMIN), wait=1.5)


def test_right_key_works_and_scheme_is_case_insensitive(target: str, stream: str) -> None:
    answer = raw_call(target, "DescribeStream", pb.DescribeStreamRequest(stream_name=stream),
                      (("authorization", f"bearer {ADMIN}"),))
    assert isinstance(answer, pb.DescribeStreamResponse) and answer.stream.stream_name == stream


def test_client_raises_unauthenticated(target: str) -> None:
    with Client(target, timeout=10) as anonymous:
        with pytest.raises(Unauthenticated) as caught:
            anonymous.list_streams()
    assert caught.value.reason == "AUTH_MISSING"
    with Client(target, api_key="y" * 60, timeout=10) as stranger:
        with pytest.raises(Unauthenticated) as caught:
            stranger.list_streams()
    assert caught.value.reason == "AUTH_UNKNOWN_KEY" and caught.value.code == "DIS.4107"


def test_health_and_reflection_stay_open(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="sluice.v1.Sluice"),
                                                           timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert "sluice.v1.Sluice" in names


# -- which project -------------------------------------------------------------------------------

def test_the_keys_workspace_is_the_project(target: str, stream: str) -> None:
    with Client(target, api_key=ADMIN) as admin:
        assert admin.project is None   # nothing named: the broker takes the key's
        assert stream in {s.stream_name for s in admin.list_streams(limit=100).streams}
    with Client(target, api_key=ADMIN, project="p1") as named:   # naming its own project is fine
        assert named.project == "p1"
        assert named.describe_stream(stream).stream.stream_name == stream


def test_sluice_project_naming_another_project_is_permission_denied(target: str) -> None:
    with Client(target, api_key=ADMIN, project="p2") as client:
        with pytest.raises(PermissionDenied) as caught:
            client.list_streams()
    assert caught.value.reason == "PERMISSION_DENIED" and caught.value.code == "DIS.4116"
    exc = raw_call(target, "ListStreams", pb.ListStreamsRequest(), (*bearer(ADMIN), ("sluice-project", "default")))
    assert isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(exc).reason == "PERMISSION_DENIED"


def test_a_key_of_p1_never_sees_the_streams_of_p2(target: str, stream: str) -> None:
    other = f"p2only{uuid.uuid4().hex[:8]}"
    with Client(target, api_key=ADMIN_P2) as p2:
        p2.create_stream(other, 1)
        p2.put_records(other, [b"secret of p2"])
        assert other in {s.stream_name for s in p2.list_streams(limit=100).streams}
        assert stream not in {s.stream_name for s in p2.list_streams(limit=100).streams}
    with Client(target, api_key=ADMIN) as p1:
        assert other not in {s.stream_name for s in p1.list_streams(limit=100).streams}
        with pytest.raises(NotFound):   # the same name in p1 is another (missing) stream
            p1.describe_stream(other)
        with pytest.raises(PermissionDenied):
            Client(target, api_key=ADMIN, project="p2").describe_stream(other)


# -- which role ----------------------------------------------------------------------------------

def test_every_rpc_has_one_action() -> None:
    assert set(ACTION) == {m.name for m in pb.DESCRIPTOR.services_by_name["Sluice"].methods}


@pytest.mark.parametrize("key", [ADMIN, PRODUCER, CONSUMER], ids=["admin", "producer", "consumer"])
@pytest.mark.parametrize("method", sorted(ACTION))
def test_each_role_is_refused_exactly_the_rpcs_it_may_not_make(target: str, key: str, method: str) -> None:
    """An empty request of every RPC: refused with PERMISSION_DENIED when the role lacks the
    RPC's action, otherwise it reaches the verb (which then finds the request wanting)."""
    request = getattr(pb, pb.DESCRIPTOR.services_by_name["Sluice"].methods_by_name[method].input_type.name)()
    answer = raw_call(target, method, request, bearer(key))
    code = answer.code() if isinstance(answer, grpc.RpcError) else grpc.StatusCode.OK
    if ACTION[method] in ROLES[key]:
        assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), answer
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(answer).reason == "PERMISSION_DENIED"


def test_producer_writes_and_looks_but_may_not_manage_or_read(target: str, stream: str) -> None:
    with Client(target, api_key=PRODUCER) as producer:
        assert all(r.ok for r in producer.put_records(stream, [b"one", b"two"]))
        assert stream in {s.stream_name for s in producer.list_streams(limit=100).streams}
        assert producer.describe_stream(stream).stream.partition_count == 2
        with pytest.raises(PermissionDenied, match="role producer may not manage"):
            producer.create_stream(f"x{uuid.uuid4().hex[:8]}", 1)
        with pytest.raises(PermissionDenied):
            producer.get_cursor(stream, 0)
    with Client(target, api_key=ADMIN) as admin:
        cursor = admin.get_cursor(stream, 0)
    with Client(target, api_key=PRODUCER) as producer:
        with pytest.raises(PermissionDenied):
            producer.get_records(cursor)


def test_consumer_reads_subscribes_and_commits_but_may_not_write(target: str, stream: str) -> None:
    with Client(target, api_key=ADMIN) as admin:
        admin.put_records(stream, [b"r0", b"r1"], partition_id=0)
        admin.create_app(f"app-{stream}")
    with Client(target, api_key=CONSUMER) as consumer:
        page = consumer.get_records(consumer.get_cursor(stream, 0))
        assert [r.data for r in page.records] == [b"r0", b"r1"]
        with consumer.subscription(stream, 0, "TRIM_HORIZON") as sub:
            assert [r.data for r in next(sub).records] == [b"r0", b"r1"]
        consumer.commit_checkpoint(f"app-{stream}", stream, 0, 1)
        assert consumer.get_checkpoint(f"app-{stream}", stream, 0).seq == 1   # type: ignore[union-attr]
        with pytest.raises(PermissionDenied, match="role consumer may not write"):
            consumer.put_records(stream, [b"nope"])
        with pytest.raises(PermissionDenied):
            consumer.delete_stream(stream)


def test_subscribe_is_refused_before_the_first_message(target: str, stream: str) -> None:
    refusals = (((), grpc.StatusCode.UNAUTHENTICATED), (bearer(PRODUCER), grpc.StatusCode.PERMISSION_DENIED))
    for metadata, code in refusals:
        with grpc.insecure_channel(target) as channel:
            call = pb_grpc.SluiceStub(channel).Subscribe(
                pb.SubscribeRequest(stream_name=stream, cursor_type=pb.CURSOR_TYPE_TRIM_HORIZON), metadata=metadata,
                timeout=10)
            with pytest.raises(grpc.RpcError) as caught:
                next(call)
            assert caught.value.code() == code


def test_admin_may_do_everything(target: str) -> None:
    name = f"adm{uuid.uuid4().hex[:8]}"
    with Client(target, api_key=ADMIN) as admin:
        admin.create_stream(name, 1)
        admin.put_records(name, [b"x"])
        assert [r.data for r in admin.get_records(admin.get_cursor(name, 0)).records] == [b"x"]
        admin.create_app(f"app-{name}")
        admin.commit_checkpoint(f"app-{name}", name, 0, 0)
        source = admin.create_source(f"g{uuid.uuid4().hex[:8]}", "stream_generator", name,
                                     {"template": "iot", "interval": "1s"})
        admin.stop_source(source.source_id)
        admin.delete_source(source.source_id)
        admin.delete_app(f"app-{name}")
        admin.delete_stream(name)


# -- the client's helpers carry the key ------------------------------------------------------------

def test_async_client_sends_the_key_on_calls_and_subscriptions(target: str, stream: str) -> None:
    async def run() -> list[bytes]:
        async with AsyncClient(target, api_key=ADMIN) as admin:
            await admin.put_records(stream, [b"async"], partition_id=1)
        async with AsyncClient(target, api_key=CONSUMER) as consumer:
            sub = consumer.subscribe(stream, 1, "TRIM_HORIZON")
            async with sub:
                page = await sub.__anext__()
            return [r.data for r in page.records]
    assert asyncio.run(run()) == [b"async"]

    async def anonymous() -> None:
        async with AsyncClient(target) as client:
            sub = client.subscribe(stream, 1, "TRIM_HORIZON")
            await sub.__anext__()
    with pytest.raises(Unauthenticated):
        asyncio.run(anonymous())


def test_producer_and_consumers_built_from_a_target_use_the_key(target: str, stream: str) -> None:
    app = f"app-{stream}"
    with Client(target, api_key=ADMIN) as admin:
        admin.create_app(app)   # a consumer key may not create apps; the consumers use these
        admin.create_app(f"group-{stream}")
    with Producer(target, stream, api_key=PRODUCER, linger_ms=0) as producer:
        assert producer.send(b"via producer", partition_id=0).result(10).ok
    with PartitionConsumer(target, stream, 0, app=app, api_key=CONSUMER, wait_ms=100) as consumer:
        record = consumer.poll()[0]
        assert record.data == b"via producer"
        consumer.commit()

    async def read_async() -> bytes:
        async with AsyncPartitionConsumer(target, stream, 0, api_key=CONSUMER, wait_ms=100) as consumer:
            return (await consumer.poll())[0].data
    assert asyncio.run(read_async()) == b"via producer"

    seen: list[bytes] = []
    group = GroupConsumer(target, f"group-{stream}", stream, lambda p, records: seen.extend(r.data for r in records),
                          api_key=CONSUMER, lease_ms=2000)
    with group:
        deadline = time.monotonic() + 30
        while b"via producer" not in seen and group.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert group.error is None and b"via producer" in seen


def test_bad_api_key_values_are_refused_without_echoing_them() -> None:
    for bad in ("", " padded", "line\nbreak", "non-ascii-é"):
        with pytest.raises(ValueError) as caught:
            Client("127.0.0.1:1", api_key=bad)
        assert bad.strip() == "" or bad not in str(caught.value)


# -- the CLI -------------------------------------------------------------------------------------

def cli(target: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run([sys.executable, "-m", "client.cli", "--target", target, *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**clean, **env})


def test_cli_with_api_key_flag_and_env(target: str, stream: str) -> None:
    listed = cli(target, "--api-key", ADMIN, "streams", "list")
    assert listed.returncode == 0, listed.stderr
    assert stream in listed.stdout.split()
    from_env = cli(target, "streams", "list", SLUICE_API_KEY=PRODUCER)
    assert from_env.returncode == 0 and stream in from_env.stdout.split()
    refused = cli(target, "streams", "create", f"x{uuid.uuid4().hex[:6]}", SLUICE_API_KEY=PRODUCER)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    anonymous = cli(target, "streams", "list")
    assert anonymous.returncode == 1 and "AUTH_MISSING" in anonymous.stderr
    wrong = cli(target, "--api-key", "z" * 60, "streams", "list")
    assert wrong.returncode == 1 and "AUTH_UNKNOWN_KEY" in wrong.stderr
    for result in (listed, from_env, refused, anonymous, wrong):
        assert not any(key in result.stdout + result.stderr for key in (*KEYS, "z" * 60))


# -- last: nothing secret in the log -------------------------------------------------------------

def test_zz_the_broker_log_holds_no_key(auth_broker: BrokerProcess) -> None:
    log = "".join(auth_broker.stderr_lines)
    assert "sluice ready" in log
    for key in KEYS:
        assert key not in log
        assert key[:20] not in log


def test_made_up_method_names_share_one_metrics_verb(auth_broker: BrokerProcess) -> None:
    """The gate labelled a refused call by the method name the caller sent: 20,000 made-up names
    with no key added 18 series each to /metrics for the broker's life (the operations probe:
    memory 111 -> 181 MiB, a 32 MB scrape). Names the service lacks are verb "unmatched", as the
    HTTP doors label a path no route matches."""
    names = [f"Zq{uuid.uuid4().hex[:12]}" for _ in range(30)]
    with grpc.insecure_channel(auth_broker.grpc_target) as channel:
        for name in names:
            call = channel.unary_unary(f"/sluice.v1.Sluice/{name}")
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=10)
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    request = urllib.request.Request(f"{auth_broker.http_url}/metrics", headers={"X-Api-Key": ADMIN})
    with urllib.request.urlopen(request, timeout=30) as reply:
        families = list(text_string_to_metric_families(reply.read().decode()))
    verbs = {s.labels["verb"]: s.value for f in families for s in f.samples
             if s.name == "sluice_request_duration_seconds_count" and s.labels["door"] == "grpc"}
    assert not any(v.startswith("zq") for v in verbs), sorted(verbs)
    assert verbs["unmatched"] >= len(names)
