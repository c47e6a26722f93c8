"""Every HTTP door of a broker started with `--auth-file`, through the real clients: the official DIS
SDK (`huaweicloudsdkdis`, unmodified) signing its requests, the `timeplus` SDK with its API key,
raw HTTP for what no SDK sends (a stale date, a body or query changed after signing, a missing
key), the OpenTSDB door on both its ports and the SSE tail; each role's allowed and refused verbs;
SIGHUP re-reading the file; and at the end, the broker's whole DEBUG log holds no secret.

One broker serves the module (tests run in file order; the last one reads the log of them all).
"""
from __future__ import annotations

import base64
import gzip
import http.client
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from auth_broker import Keys, Reply, dis_client, raw, write_auth_file
from conftest import in_thread_with_deadline
from dis_signer import sdk_date, sign
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkdis.v2 import (
    CommitCheckpointReq,
    CommitCheckpointRequest,
    ConsumeRecordsRequest,
    CreateAppReq,
    CreateAppRequest,
    CreateStreamReq,
    CreateStreamRequest,
    DeleteAppRequest,
    DeleteCheckpointRequest,
    DeleteStreamRequest,
    ListAppRequest,
    ListStreamsRequest,
    PutRecordsRequest,
    PutRecordsRequestEntry,
    SendRecordsRequest,
    ShowCheckpointRequest,
    ShowCursorRequest,
    ShowStreamRequest,
    UpdatePartitionCountReq,
    UpdatePartitionCountRequest,
)
from swagger_client.rest import ApiException
from timeplus import Environment, Query, Stream

from broker.launcher import ROOT, BrokerProcess

DEADLINE = 30.0


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys.fresh()


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    return write_auth_file(tmp_path_factory.mktemp("auth") / "auth.toml", keys.toml())


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, auth_file: Path) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path_factory.mktemp("auth-broker") / "data", "--auth-file", str(auth_file),
                         "--log-level", "DEBUG", "--tsdb-project", "p1", "--tsdb-port", "0").start()
    yield proc
    proc.stop(30)


def name() -> str:
    return f"s{uuid.uuid4().hex[:10]}"


def client(broker: BrokerProcess, keys: Keys, who: str, project: str | None = None):  # type: ignore[no-untyped-def]
    ak, sk, own = keys.aks[who]
    return dis_client(broker.http_url, ak, sk, project or own)


def dis_refused(call: Callable[[], Any], status: int, code: str) -> None:
    with pytest.raises(ClientRequestException) as info:
        call()
    assert (info.value.status_code, info.value.error_code) == (status, code), info.value.error_msg


def create(c, stream: str, partitions: int = 1):  # type: ignore[no-untyped-def]
    return c.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=stream, partition_count=partitions)))


def put(c, stream: str, *payloads: bytes):  # type: ignore[no-untyped-def]
    return c.send_records(SendRecordsRequest(body=PutRecordsRequest(stream_name=stream, records=[
        PutRecordsRequestEntry(data=base64.b64encode(p).decode(), partition_id="0") for p in payloads])))


def cursor(c, stream: str) -> str:  # type: ignore[no-untyped-def]
    return str(c.show_cursor(ShowCursorRequest(stream_name=stream, partition_id="0",
                                               cursor_type="TRIM_HORIZON")).partition_cursor)


def read(c, partition_cursor: str) -> list[bytes]:  # type: ignore[no-untyped-def]
    got = c.consume_records(ConsumeRecordsRequest(partition_cursor=partition_cursor))
    return [base64.b64decode(r.data) for r in got.records]


def signed_headers(broker: BrokerProcess, keys: Keys, who: str, method: str, path: str, query: str = "",
                   body: bytes = b"", date: str | None = None, project: str = "p1") -> dict[str, str]:
    """What the SDK would send, signed by the test signer (dis_signer.py)."""
    ak, sk, _ = keys.aks[who]
    headers = {"Content-Type": "application/json", "Host": broker.http_target, "X-Project-Id": project,
               "X-Sdk-Date": date or sdk_date(), "User-Agent": "auth-test"}
    return sign(ak, sk, method, path, query, headers, body)


def dis_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, (reply.status, reply.raw)
    body = reply.json
    assert body["error_code"] == code and body["errorCode"] == code, body


# -- the DIS door ---------------------------------------------------------------------------------

def test_ready_line_says_auth_is_on(broker: BrokerProcess) -> None:
    startup = broker.startup_log()
    assert "sluice ready" in startup[-1] and " auth=on " in startup[-1], startup
    assert not any("every door is open" in line for line in startup)


def test_the_dis_sdk_works_end_to_end_with_correct_credentials(broker: BrokerProcess, keys: Keys) -> None:
    admin, stream, app = client(broker, keys, "admin"), name(), f"app-{uuid.uuid4().hex[:8]}"
    assert create(admin, stream, 2).status_code == 201
    assert stream in admin.list_streams(ListStreamsRequest(limit=100)).stream_names
    assert len(admin.show_stream(ShowStreamRequest(stream_name=stream)).partitions) == 2
    sent = put(admin, stream, b"one", b"two")
    assert sent.failed_record_count == 0
    assert read(admin, cursor(admin, stream)) == [b"one", b"two"]
    assert admin.create_app(CreateAppRequest(body=CreateAppReq(app_name=app))).status_code == 201
    admin.commit_checkpoint(CommitCheckpointRequest(body=CommitCheckpointReq(
        app_name=app, checkpoint_type="LAST_READ", stream_name=stream, partition_id="0", sequence_number="1")))
    shown = admin.show_checkpoint(ShowCheckpointRequest(stream_name=stream, partition_id="0", app_name=app,
                                                        checkpoint_type="LAST_READ"))
    assert shown.sequence_number == "1"
    assert [a.app_name for a in admin.list_app(ListAppRequest(limit=100)).apps] == [app]
    admin.delete_checkpoint(DeleteCheckpointRequest(app_name=app, stream_name=stream, checkpoint_type="LAST_READ"))
    admin.delete_app(DeleteAppRequest(app_name=app))
    assert admin.delete_stream(DeleteStreamRequest(stream_name=stream)).status_code == 204


def test_a_wrong_secret_key_is_a_bad_signature(broker: BrokerProcess, keys: Keys) -> None:
    ak, _, project = keys.aks["admin"]
    wrong = dis_client(broker.http_url, ak, "not-the-secret", project)
    dis_refused(lambda: wrong.list_streams(ListStreamsRequest()), 401, "DIS.4100")
    dis_refused(lambda: create(wrong, name()), 401, "DIS.4100")


def test_an_unknown_access_key(broker: BrokerProcess) -> None:
    stranger = dis_client(broker.http_url, "AKNOBODY", "whatever", "p1")
    dis_refused(lambda: stranger.list_streams(ListStreamsRequest()), 401, "DIS.4107")


def test_missing_and_unparsable_authorization(broker: BrokerProcess) -> None:
    dis_error(raw(broker.http_port, "GET", "/v2/p1/streams"), 401, "DIS.4101")
    dis_error(raw(broker.http_port, "GET", "/v2/p1/streams", {"Authorization": "Basic dTpw"}), 401, "DIS.4102")


def test_a_stale_or_missing_date(broker: BrokerProcess, keys: Keys) -> None:
    stale = signed_headers(broker, keys, "admin", "GET", "/v2/p1/streams", date=sdk_date(time.time() - 20 * 60))
    dis_error(raw(broker.http_port, "GET", "/v2/p1/streams", stale), 401, "DIS.4105")
    ahead = signed_headers(broker, keys, "admin", "GET", "/v2/p1/streams", date=sdk_date(time.time() + 20 * 60))
    dis_error(raw(broker.http_port, "GET", "/v2/p1/streams", ahead), 401, "DIS.4105")
    fresh = signed_headers(broker, keys, "admin", "GET", "/v2/p1/streams")
    assert raw(broker.http_port, "GET", "/v2/p1/streams", fresh).status == 200
    # a replay inside the window is fine (DIS does not forbid it)
    assert raw(broker.http_port, "GET", "/v2/p1/streams", fresh).status == 200
    undated = {k: v for k, v in fresh.items() if k != "X-Sdk-Date"}
    dis_error(raw(broker.http_port, "GET", "/v2/p1/streams", undated), 401, "DIS.4103")


def test_an_unsigned_request_is_refused_before_its_body_is_read(broker: BrokerProcess, keys: Keys) -> None:
    """Headers announcing 10 MB and no body byte sent: the answer comes at once (not after the body
    timeout, and not a 413 or 408), so a stranger cannot make the broker read bodies."""
    stale = signed_headers(broker, keys, "admin", "POST", "/v2/p1/records", date=sdk_date(time.time() - 3600))
    for headers, code in (({}, "DIS.4101"), ({"Authorization": "SDK-HMAC-SHA256 nonsense"}, "DIS.4102"),
                          (stale, "DIS.4105")):
        conn = http.client.HTTPConnection(broker.host, broker.http_port, timeout=10)
        try:
            conn.putrequest("POST", "/v2/p1/records", skip_host="Host" in headers)
            for header, value in {**headers, "Content-Length": "10000000"}.items():
                conn.putheader(header, value)
            conn.endheaders()
            resp = conn.getresponse()
            assert resp.status == 401 and json.loads(resp.read())["error_code"] == code
        finally:
            conn.close()


def test_a_body_changed_after_signing(broker: BrokerProcess, keys: Keys) -> None:
    admin, stream = client(broker, keys, "admin"), name()
    create(admin, stream)
    body = json.dumps({"stream_name": stream, "records": [{"data": "aGVsbG8=", "partition_id": "0"}]}).encode()
    headers = signed_headers(broker, keys, "admin", "POST", "/v2/p1/records", body=body)
    dis_error(raw(broker.http_port, "POST", "/v2/p1/records", headers, body.replace(b"aGVsbG8=", b"ZXZpbA==")),
              401, "DIS.4100")
    assert read(admin, cursor(admin, stream)) == []
    ok = raw(broker.http_port, "POST", "/v2/p1/records", headers, body)
    assert ok.status == 200 and ok.json["failed_record_count"] == 0, ok.raw
    assert read(admin, cursor(admin, stream)) == [b"hello"]


def test_a_compressed_body_is_signed_as_sent(broker: BrokerProcess, keys: Keys) -> None:
    """The payload hash covers the body's bytes exactly as received (shared/spec/dis-api.md 7,
    step 3.6): for a gzip body, the compressed bytes. It is checked before anything inflates them."""
    admin, stream = client(broker, keys, "admin"), name()
    create(admin, stream)
    body = json.dumps({"stream_name": stream, "records": [{"data": "aGVsbG8=", "partition_id": "0"}]}).encode()
    sent = gzip.compress(body)
    for signed_over in (body, gzip.compress(b"{}")):   # the inflated bytes; another gzip body
        headers = {**signed_headers(broker, keys, "admin", "POST", "/v2/p1/records", body=signed_over),
                   "Content-Encoding": "gzip"}
        dis_error(raw(broker.http_port, "POST", "/v2/p1/records", headers, sent), 401, "DIS.4100")
    assert read(admin, cursor(admin, stream)) == []
    headers = {**signed_headers(broker, keys, "admin", "POST", "/v2/p1/records", body=sent), "Content-Encoding": "gzip"}
    ok = raw(broker.http_port, "POST", "/v2/p1/records", headers, sent)
    assert ok.status == 200 and ok.json["failed_record_count"] == 0, ok.raw
    assert read(admin, cursor(admin, stream)) == [b"hello"]


def test_a_query_changed_after_signing(broker: BrokerProcess, keys: Keys) -> None:
    admin, stream = client(broker, keys, "admin"), name()
    create(admin, stream)
    query = f"cursor-type=TRIM_HORIZON&partition-id=0&stream-name={stream}"
    headers = signed_headers(broker, keys, "admin", "GET", "/v2/p1/cursors", query)
    assert raw(broker.http_port, "GET", f"/v2/p1/cursors?{query}", headers).status == 200
    tampered = query.replace("TRIM_HORIZON", "LATEST")
    dis_error(raw(broker.http_port, "GET", f"/v2/p1/cursors?{tampered}", headers), 401, "DIS.4100")
    # the path is signed too, with or without its trailing slash
    assert raw(broker.http_port, "GET", f"/v2/p1/cursors/?{query}", headers).status == 200
    dis_error(raw(broker.http_port, "GET", f"/v2/p2/cursors?{query}", headers), 401, "DIS.4100")


def test_a_signed_query_that_could_be_respelled_is_refused(broker: BrokerProcess, keys: Keys) -> None:
    """The canonical query sorts pairs, keeps `+` and decodes bad escapes alike: `limit=5&limit=1`
    signed was taken as `limit=1&limit=5` (the handler reads the first), `x%2By` as `x+y` (a
    space to the handler), `%fe` as `%ff`. The SDK never sends such a query; it is refused."""
    admin, stream = client(broker, keys, "admin"), name()
    create(admin, stream)
    base = f"cursor-type=TRIM_HORIZON&partition-id=0&stream-name={stream}"
    for query in (f"{base}&limit=5&limit=1", f"{base}&x=a+b", f"{base}&x=%fe"):
        headers = signed_headers(broker, keys, "admin", "GET", "/v2/p1/cursors", query)
        dis_error(raw(broker.http_port, "GET", f"/v2/p1/cursors?{query}", headers), 400, "DIS.4200")
    query = f"{base}&x=a%2Bb%20c%C3%A9"   # as the SDK encodes a value: signed and taken
    headers = signed_headers(broker, keys, "admin", "GET", "/v2/p1/cursors", query)
    assert raw(broker.http_port, "GET", f"/v2/p1/cursors?{query}", headers).status == 200


def sdk_with_request_hook(broker: BrokerProcess, keys: Keys, hook: Callable[..., None]):  # type: ignore[no-untyped-def]
    """The official SDK as `client` makes it, plus a request handler: the SDK's own public hook
    (`HttpHandler.add_request_handler`), which it calls after signing, just before sending."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkcore.http.http_handler import HttpHandler
    from huaweicloudsdkdis.v2 import DisClient

    ak, sk, project = keys.aks["admin"]
    config = HttpConfig.get_default_config()
    config.retry_times = 0
    config.timeout = (5, 30)
    return (DisClient.new_builder().with_http_config(config).with_credentials(BasicCredentials(ak, sk, project))
            .with_http_handler(HttpHandler().add_request_handler(hook)).with_endpoints([broker.http_url]).build())


def test_the_sdk_tampered_with_after_signing(broker: BrokerProcess, keys: Keys) -> None:
    """What the SDK signed, changed on the way (body or query): DIS.4100, nothing written."""
    admin, stream = client(broker, keys, "admin"), name()
    create(admin, stream)

    def evil_body(request: Any, **_: Any) -> None:
        good, bad = base64.b64encode(b"hello"), base64.b64encode(b"evil!")
        body = request.body
        assert good in (body if isinstance(body, bytes) else body.encode())   # what the SDK signed
        request.body = body.replace(good, bad) if isinstance(body, bytes) else body.replace(good.decode(), bad.decode())

    dis_refused(lambda: put(sdk_with_request_hook(broker, keys, evil_body), stream, b"hello"), 401, "DIS.4100")
    assert read(admin, cursor(admin, stream)) == []

    def evil_query(request: Any, **_: Any) -> None:
        request.uri = request.uri.replace("TRIM_HORIZON", "LATEST")

    tampered = sdk_with_request_hook(broker, keys, evil_query)
    dis_refused(lambda: cursor(tampered, stream), 401, "DIS.4100")
    untouched = sdk_with_request_hook(broker, keys, lambda **_: None)   # the hook alone changes nothing
    assert put(untouched, stream, b"hello").failed_record_count == 0
    assert read(admin, cursor(untouched, stream)) == [b"hello"]


def test_the_sdk_with_a_clock_20_minutes_off(broker: BrokerProcess, keys: Keys,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's own signer on a host whose clock is wrong (its clock faked, its code untouched)."""
    import datetime as real

    from huaweicloudsdkcore.signer import signer as sdk_signer

    admin = client(broker, keys, "admin")
    for skew in (-20, 20):
        class Skewed(real.datetime):
            @classmethod
            def utcnow(cls, skew: int = skew) -> real.datetime:  # type: ignore[override]
                return real.datetime.now(real.UTC).replace(tzinfo=None) + real.timedelta(minutes=skew)

        monkeypatch.setattr(sdk_signer, "datetime", Skewed)
        dis_refused(lambda: admin.list_streams(ListStreamsRequest()), 401, "DIS.4105")
    monkeypatch.undo()
    admin.list_streams(ListStreamsRequest())   # the right clock again: accepted


def test_another_projects_stream_is_refused(broker: BrokerProcess, keys: Keys) -> None:
    admin, stream = client(broker, keys, "admin"), name()
    create(admin, stream)
    put(admin, stream, b"secret")
    # the key of p2, its requests signed correctly, aimed at p1's stream
    intruder = client(broker, keys, "other", project="p1")
    dis_refused(lambda: intruder.show_stream(ShowStreamRequest(stream_name=stream)), 403, "DIS.4116")
    dis_refused(lambda: intruder.list_streams(ListStreamsRequest()), 403, "DIS.4116")
    dis_refused(lambda: intruder.show_cursor(ShowCursorRequest(stream_name=stream, partition_id="0",
                                                               cursor_type="TRIM_HORIZON")), 403, "DIS.4116")
    dis_refused(lambda: intruder.delete_stream(DeleteStreamRequest(stream_name=stream)), 403, "DIS.4116")
    # in its own project the name means another (absent) stream, and lists never show p1's
    own = client(broker, keys, "other")
    assert stream not in (own.list_streams(ListStreamsRequest(limit=100)).stream_names or [])
    dis_refused(lambda: own.show_stream(ShowStreamRequest(stream_name=stream)), 400, "DIS.4301")
    # X-Project-Id naming another project than the path: 401 DIS.4117
    headers = signed_headers(broker, keys, "admin", "GET", "/v2/p1/streams", project="p2")
    dis_error(raw(broker.http_port, "GET", "/v2/p1/streams", headers), 401, "DIS.4117")


def test_dis_roles(broker: BrokerProcess, keys: Keys) -> None:
    admin, stream, app = client(broker, keys, "admin"), name(), f"app-{uuid.uuid4().hex[:8]}"
    create(admin, stream)
    admin.create_app(CreateAppRequest(body=CreateAppReq(app_name=app)))
    producer, consumer = client(broker, keys, "producer"), client(broker, keys, "consumer")

    # producer: puts, lists and describes; creates, deletes and reads nothing
    assert put(producer, stream, b"from-producer").failed_record_count == 0
    assert stream in producer.list_streams(ListStreamsRequest(limit=100)).stream_names
    assert producer.show_stream(ShowStreamRequest(stream_name=stream)).stream_name == stream
    dis_refused(lambda: create(producer, name()), 403, "DIS.4116")
    dis_refused(lambda: producer.delete_stream(DeleteStreamRequest(stream_name=stream)), 403, "DIS.4116")
    dis_refused(lambda: cursor(producer, stream), 403, "DIS.4116")
    partition_cursor = cursor(admin, stream)
    dis_refused(lambda: read(producer, partition_cursor), 403, "DIS.4116")
    dis_refused(lambda: producer.create_app(CreateAppRequest(body=CreateAppReq(app_name="x"))), 403, "DIS.4116")

    # consumer: reads, lists, commits checkpoints; puts and manages nothing
    assert read(consumer, cursor(consumer, stream)) == [b"from-producer"]
    assert stream in consumer.list_streams(ListStreamsRequest(limit=100)).stream_names
    consumer.commit_checkpoint(CommitCheckpointRequest(body=CommitCheckpointReq(
        app_name=app, checkpoint_type="LAST_READ", stream_name=stream, partition_id="0", sequence_number="0")))
    assert consumer.show_checkpoint(ShowCheckpointRequest(stream_name=stream, partition_id="0", app_name=app,
                                                          checkpoint_type="LAST_READ")).sequence_number == "0"
    dis_refused(lambda: put(consumer, stream, b"x"), 403, "DIS.4116")
    dis_refused(lambda: create(consumer, name()), 403, "DIS.4116")
    dis_refused(lambda: consumer.delete_app(DeleteAppRequest(app_name=app)), 403, "DIS.4116")

    # scaling is managing: the signed PUT of update_partition_count
    def scale(who, target: int):  # type: ignore[no-untyped-def]
        return who.update_partition_count(UpdatePartitionCountRequest(
            stream_name=stream, body=UpdatePartitionCountReq(stream_name=stream, target_partition_count=target)))
    dis_refused(lambda: scale(producer, 3), 403, "DIS.4116")
    dis_refused(lambda: scale(consumer, 3), 403, "DIS.4116")
    scale(admin, 3)
    assert admin.show_stream(ShowStreamRequest(stream_name=stream)).writable_partition_count == 3

    # admin: everything, including what both refused
    admin.delete_app(DeleteAppRequest(app_name=app))
    admin.delete_stream(DeleteStreamRequest(stream_name=stream))


# -- the Timeplus door ------------------------------------------------------------------------------

def tp_env(broker: BrokerProcess, key: str, workspace: str | None = "p1") -> Environment:
    """The SDK keeps one API key per process (spec section 2): make the env right before using it."""
    env = Environment().address(broker.http_url).apikey(key)
    return env.workspace(workspace) if workspace is not None else env


def tp_query(env: Environment, sql: str) -> list[list[Any]]:
    """A bounded query's rows, on a thread with a deadline (the SDK sets no timeouts)."""
    def run() -> list[list[Any]]:
        rows: list[list[Any]] = []
        query = Query(env).sql(sql)
        query.create()
        for event in query.result():
            if event.event == "message":
                rows += json.loads(event.data)
        return rows

    result: list[list[Any]] = in_thread_with_deadline(run, DEADLINE)
    return result


def tp_refused(call: Callable[[], Any], status: int, code: int) -> None:
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == status, (info.value.status, info.value.body)
    assert json.loads(info.value.body)["code"] == code, info.value.body


def tp_name() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


def tp_create(env: Environment, stream: str) -> None:
    Stream(env).name(stream).column("v", "string").create()


def test_the_timeplus_sdk_with_the_right_key(broker: BrokerProcess, keys: Keys) -> None:
    key = keys.api["admin"][0]
    stream = tp_name()
    tp_create(tp_env(broker, key), stream)
    env = tp_env(broker, key)
    Stream(env).name(stream).ingest(["v"], [["hello"], ["world"]])
    assert sorted(tp_query(env, f"select v from table({stream})")) == [["hello"], ["world"]]
    assert stream in [s.name for s in Stream(env).list()]
    # no workspace in the path: the key's own, not `default`
    plain = tp_env(broker, key, workspace=None)
    assert stream in [s.name for s in Stream(plain).list()]
    # the same stream through the DIS door of its project
    admin = client(broker, keys, "admin")
    assert len(read(admin, cursor(admin, stream))) == 2
    Stream(tp_env(broker, key)).name(stream).delete()


def test_the_timeplus_sdk_with_a_wrong_or_missing_key(broker: BrokerProcess, keys: Keys) -> None:
    wrong = tp_env(broker, "w" * 60)
    tp_refused(lambda: Stream(wrong).list(), 401, 516)
    tp_refused(lambda: tp_create(tp_env(broker, "w" * 60), tp_name()), 401, 516)
    missing = raw(broker.http_port, "GET", "/p1/api/v1beta2/streams")
    assert missing.status == 401 and missing.json["code"] == 516, missing.raw
    assert "API key" in missing.json["message"]
    unknown = raw(broker.http_port, "GET", "/api/v1beta2/streams", {"X-Api-Key": "w" * 60})
    assert unknown.status == 401 and unknown.json["reason"] == "AUTH_UNKNOWN_KEY", unknown.raw


def test_the_other_key_spellings(broker: BrokerProcess, keys: Keys) -> None:
    key = keys.api["consumer"][0]
    for headers in ({"X-Api-Key": key}, {"Authorization": f"ApiKey {key}"}, {"Authorization": f"Bearer {key}"},
                    {"Authorization": f"bearer {key}"}):
        reply = raw(broker.http_port, "GET", "/p1/api/v1beta2/streams", headers)
        assert reply.status == 200, (headers, reply.raw)
    assert raw(broker.http_port, "GET", "/p1/api/v1beta2/streams", {"Authorization": f"Basic {key}"}).status == 401


def test_a_key_of_bytes_that_are_not_utf8_is_just_unknown(broker: BrokerProcess) -> None:
    """aiohttp hands such header bytes over as lone surrogates: 401 on every API-key door, never a 500."""
    paths = ["/p1/api/v1beta2/streams", "/api/query?start=1h-ago&m=sum:cpu", "/sluice/v1/tail?stream-name=s",
             "/metrics"]
    for value in (b"\xff", b"k\xc3(" * 20, b"Bearer " + b"\xfe\xff"):
        for path in paths:
            header = "Authorization" if value.startswith(b"Bearer ") else "X-Api-Key"
            reply = raw(broker.http_port, "GET", path, {header: value})  # type: ignore[dict-item]
            assert reply.status == 401, (path, value, reply.status, reply.raw)


def test_another_workspace_is_refused(broker: BrokerProcess, keys: Keys) -> None:
    key = keys.api["admin"][0]
    tp_refused(lambda: Stream(tp_env(broker, key, "p2")).list(), 403, 497)
    tp_refused(lambda: tp_create(tp_env(broker, key, "p2"), tp_name()), 403, 497)
    tp_refused(lambda: tp_create(tp_env(broker, key, "default"), tp_name()), 403, 497)
    # the p2 key sees its own workspace, without p1's streams
    stream = tp_name()
    tp_create(tp_env(broker, key), stream)
    other = keys.api["other"][0]
    assert stream not in [s.name for s in Stream(tp_env(broker, other, "p2")).list()]
    assert stream not in [s.name for s in Stream(tp_env(broker, other, None)).list()]
    tp_refused(lambda: Stream(tp_env(broker, other, "p1")).name(stream).delete(), 403, 497)
    Stream(tp_env(broker, key)).name(stream).delete()


def test_timeplus_roles(broker: BrokerProcess, keys: Keys) -> None:
    admin, producer, consumer = (keys.api[r][0] for r in ("admin", "producer", "consumer"))
    stream = tp_name()
    tp_create(tp_env(broker, admin), stream)
    # producer: ingests and lists; no streams made or deleted, no queries
    Stream(tp_env(broker, producer)).name(stream).ingest(["v"], [["p"]])
    assert stream in [s.name for s in Stream(tp_env(broker, producer)).list()]
    tp_refused(lambda: tp_create(tp_env(broker, producer), tp_name()), 403, 497)
    tp_refused(lambda: Stream(tp_env(broker, producer)).name(stream).delete(), 403, 497)
    tp_refused(lambda: tp_query(tp_env(broker, producer), f"select v from table({stream})"), 403, 497)
    # consumer: queries and lists; no ingest, no streams made or deleted
    assert tp_query(tp_env(broker, consumer), f"select v from table({stream})") == [["p"]]
    assert stream in [s.name for s in Stream(tp_env(broker, consumer)).list()]
    tp_refused(lambda: Stream(tp_env(broker, consumer)).name(stream).ingest(["v"], [["c"]]), 403, 497)
    tp_refused(lambda: tp_create(tp_env(broker, consumer), tp_name()), 403, 497)
    tp_refused(lambda: Stream(tp_env(broker, consumer)).name(stream).delete(), 403, 497)
    # admin: everything
    Stream(tp_env(broker, admin)).name(stream).ingest(["v"], [["a"]])
    assert sorted(tp_query(tp_env(broker, admin), f"select v from table({stream})")) == [["a"], ["p"]]
    Stream(tp_env(broker, admin)).name(stream).delete()


# -- the OpenTSDB door (both ports) and the SSE tail --------------------------------------------------

POINT = json.dumps([{"metric": "auth.test", "timestamp": 1_700_000_000, "value": 1, "tags": {"h": "a"}}]).encode()


@pytest.mark.parametrize("port_of", ["http_port", "tsdb_port"])
def test_the_opentsdb_door_with_and_without_a_key(broker: BrokerProcess, keys: Keys, port_of: str) -> None:
    port = getattr(broker, port_of)
    missing = raw(port, "POST", "/api/put", {"Content-Type": "application/json"}, POINT)
    assert missing.status == 401 and missing.json["error"]["code"] == 401, missing.raw
    assert missing.json["reason"] == "AUTH_MISSING"
    wrong = raw(port, "POST", "/api/put", {"X-Api-Key": "nope"}, POINT)
    assert wrong.status == 401 and wrong.json["reason"] == "AUTH_UNKNOWN_KEY", wrong.raw
    assert raw(port, "POST", "/api/put", {"X-Api-Key": keys.api["producer"][0]}, POINT).status == 204
    assert raw(port, "POST", "/api/put", {"Authorization": f"Bearer {keys.api['admin'][0]}"}, POINT).status == 204
    refused = raw(port, "POST", "/api/put", {"X-Api-Key": keys.api["consumer"][0]}, POINT)
    assert refused.status == 403 and refused.json["reason"] == "PERMISSION_DENIED", refused.raw
    # the door's project is --tsdb-project (p1): a key of p2 is refused
    other = raw(port, "POST", "/api/put", {"X-Api-Key": keys.api["other"][0]}, POINT)
    assert other.status == 403 and other.json["error"]["code"] == 403, other.raw
    query = "/api/query?start=1699999000&m=sum:auth.test"
    assert raw(port, "GET", query).status == 401
    assert raw(port, "GET", query, {"X-Api-Key": keys.api["producer"][0]}).status == 403
    got = raw(port, "GET", query, {"X-Api-Key": keys.api["consumer"][0]})
    assert got.status == 200 and got.json and got.json[0]["metric"] == "auth.test", got.raw
    assert raw(port, "GET", "/api/suggest?type=metrics", {"X-Api-Key": keys.api["consumer"][0]}).status == 200


def test_the_sse_tail(broker: BrokerProcess, keys: Keys) -> None:
    admin, stream = client(broker, keys, "admin"), name()
    create(admin, stream)
    put(admin, stream, b"tailed")
    path = f"/sluice/v1/tail?stream-name={stream}&partition-id=0&cursor-type=TRIM_HORIZON&max_wait_ms=0"
    missing = raw(broker.http_port, "GET", path)
    assert missing.status == 401 and missing.json["error_code"] == "DIS.4101", missing.raw
    assert raw(broker.http_port, "GET", path, {"X-Api-Key": keys.api["producer"][0]}).status == 403
    assert raw(broker.http_port, "GET", path + "&project=p1", {"X-Api-Key": keys.api["other"][0]}).status == 403
    # a p2 key without `project`: its own project, where the stream does not exist
    absent = raw(broker.http_port, "GET", path, {"X-Api-Key": keys.api["other"][0]})
    assert absent.status == 400 and absent.json["error_code"] == "DIS.4301", absent.raw
    conn = http.client.HTTPConnection(broker.host, broker.http_port, timeout=DEADLINE)
    try:
        conn.request("GET", path, headers={"X-Api-Key": keys.api["consumer"][0]})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        event = b""
        while b"\n\n" not in event:
            event += resp.read1(65536)
        assert b"event: records" in event and base64.b64encode(b"tailed") in event, event
    finally:
        conn.close()


# -- SIGHUP, a bad auth file, and secrets in the log ------------------------------------------------

def test_sighup_reloads_the_file_and_a_broken_file_keeps_the_old_keys(broker: BrokerProcess, keys: Keys,
                                                                      auth_file: Path) -> None:
    new_key = secrets.token_hex(30)
    listing = "/p1/api/v1beta2/streams"
    assert raw(broker.http_port, "GET", listing, {"X-Api-Key": new_key}).status == 401
    write_auth_file(auth_file, keys.toml(extra_api=((new_key, "p1", "consumer"),)))
    keys.api["late"] = (new_key, "p1")   # for the log check below
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + DEADLINE
    while raw(broker.http_port, "GET", listing, {"X-Api-Key": new_key}).status != 200:
        assert time.monotonic() < deadline, "the added key did not work after SIGHUP"
        time.sleep(0.05)
    deadline = time.monotonic() + DEADLINE
    while not any("auth file reloaded" in line for line in broker.stderr_lines):
        assert time.monotonic() < deadline, "no log line about the reload"
        time.sleep(0.05)

    good = auth_file.read_text()
    write_auth_file(auth_file, good + '\n[[api_keys]]\nkey = "x"\nworkspace = "p1"\nrole = "superuser"\n')
    broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + DEADLINE
    while not any("not reloaded" in line for line in broker.stderr_lines):
        assert time.monotonic() < deadline, "no log line about the broken file"
        time.sleep(0.05)
    line = next(line for line in broker.stderr_lines if "not reloaded" in line)
    assert str(auth_file) in line and "role" in line, line
    assert raw(broker.http_port, "GET", listing, {"X-Api-Key": new_key}).status == 200
    assert raw(broker.http_port, "GET", listing, {"X-Api-Key": keys.api["admin"][0]}).status == 200
    assert broker.proc.poll() is None
    write_auth_file(auth_file, good)


def test_a_source_s_secrets_are_shown_only_to_roles_that_may_manage(broker: BrokerProcess, keys: Keys) -> None:
    """The producer and consumer roles could list sources and read their URL passwords and
    opening-message tokens; they see *** now, on the Timeplus door and on gRPC."""
    from client import Client

    stream, port = name(), broker.http_port
    admin = {"X-Api-Key": keys.api["admin"][0], "Content-Type": "application/json"}
    made = raw(port, "POST", "/p1/api/v1beta2/streams", admin,
               json.dumps({"name": stream, "columns": [{"name": "i", "type": "int64"}]}).encode())
    assert made.status == 201, made.raw
    url = "ws://alice:WSPASSWORD123@127.0.0.1:9/feed"
    # a list: each masked; the third is NATS's token form (nats-py sends a user without a password
    # as the server's auth_token)
    nats_url = "nats://alice:FIRSTSECRET@127.0.0.1:9,nats://bob:SECONDSECRET@127.0.0.1:10,nats://NATSTOKEN@127.0.0.1:11"
    shown_to = {url: "ws://alice:***@127.0.0.1:9/feed",
                nats_url: "nats://alice:***@127.0.0.1:9,nats://bob:***@127.0.0.1:10,nats://***@127.0.0.1:11"}
    made_sources = {}
    for kind, props in (("websocket", {"url": url, "data_type": "json", "open_message": "token=SECRET-TOKEN"}),
                        ("nats", {"url": nats_url, "subject": "x", "data_type": "json"})):
        created = raw(port, "POST", "/p1/api/v1beta2/sources", admin, json.dumps({
            "name": f"{kind}_{stream}", "type": kind, "stream": stream, "properties": props}).encode())
        assert created.status == 201, created.raw
        made_sources[json.loads(created.raw)["id"]] = (f"{kind}_{stream}", props)
    for role in ("producer", "consumer", "admin"):
        asked = {"X-Api-Key": keys.api[role][0]}
        listed = raw(port, "GET", "/p1/api/v1beta2/sources", asked).json
        for sid, (source, props) in made_sources.items():
            one = raw(port, "GET", f"/p1/api/v1beta2/sources/{sid}", asked).json["properties"]
            every = [s["properties"] for s in listed if s["id"] == sid]
            with Client(broker.grpc_target, api_key=keys.api[role][0], timeout=10) as c:
                described = c.describe_source(source).properties
                stats = c.source_stats(source).source.properties   # showed them to every role
            for shown in (one, *every, described, stats):
                if role == "admin":
                    assert shown["url"] == props["url"], shown
                    assert shown.get("open_message") == props.get("open_message"), shown
                else:
                    assert shown["url"] == shown_to[props["url"]], shown
                    assert shown.get("open_message") == ("***" if "open_message" in props else None), shown
    for sid in made_sources:
        raw(port, "DELETE", f"/p1/api/v1beta2/sources/{sid}", admin)


def _open_stream(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Any:
    """A streaming response whose headers and first line have come; read the rest with .read()."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    conn.request(method, path, body=body or None, headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200, (path, resp.status, resp.read()[:300])
    resp.readline()
    return conn, resp


def _rest(opened: Any) -> str:
    conn, resp = opened
    try:
        return in_thread_with_deadline(resp.read, DEADLINE).decode()  # type: ignore[no-any-return]
    finally:
        conn.close()


def test_a_removed_key_ends_the_streams_it_opened(broker: BrokerProcess, keys: Keys, auth_file: Path) -> None:
    """A SIGHUP reload that removes a key refused its next requests, but the subscription, tail and
    streaming queries it had opened went on delivering. Each now ends, saying why in its own way."""
    from client import Client, Unauthenticated

    key, good = secrets.token_hex(30), auth_file.read_text()
    write_auth_file(auth_file, good + f'\n[[api_keys]]\nkey = "{key}"\nworkspace = "p1"\nrole = "consumer"\n')
    reload_until(broker, key)
    assert broker.proc is not None
    stream = name()
    with Client(broker.grpc_target, api_key=keys.api["admin"][0], timeout=10) as admin:
        admin.create_stream(stream, 1)
        admin.put_records(stream, [b'{"a": 1}'], partition_id=0)
        port, asked = broker.http_port, {"X-Api-Key": key}
        sql = json.dumps({"sql": f"select * from {stream} settings seek_to='earliest'"}).encode()
        json_asked = {**asked, "Content-Type": "application/json"}
        tail = _open_stream(port, "GET", f"/sluice/v1/tail?stream-name={stream}&partition-id=0"
                            "&cursor-type=TRIM_HORIZON", asked)
        query = _open_stream(port, "POST", "/p1/api/v1beta2/queries", json_asked, sql)
        console = _open_stream(port, "POST", "/console/api/queries?project=p1", json_asked, sql)
        subscriber = Client(broker.grpc_target, api_key=key, timeout=10)
        pages = subscriber.subscribe(stream, 0, "TRIM_HORIZON")
        assert next(pages).records   # open, and delivering

        write_auth_file(auth_file, good)   # the key removed
        reload_until(broker, asked["X-Api-Key"], 401)
        admin.put_records(stream, [b'{"a": 2}'], partition_id=0)   # a batch for the subscription to meet

        tail_text = _rest(tail)
        assert "event: error" in tail_text and "AUTH_UNKNOWN_KEY" in tail_text, tail_text[-500:]
        events = _rest(query).strip().split("\n\n")
        final = json.loads(events[-1].split("data: ", 1)[1])
        assert events[-1].startswith("event: query") and final["status"] == "failed", events[-1]
        assert "removed or changed" in final["message"]
        end = json.loads(_rest(console).strip().splitlines()[-1])
        assert end["end"]["status"] == "failed" and "removed or changed" in end["end"]["message"], end

        def drain() -> None:
            for _ in pages:
                pass
        with pytest.raises(Unauthenticated):
            in_thread_with_deadline(drain, DEADLINE)
        subscriber.close()


def _half_sent(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[socket.socket, bytes]:
    """A request whose head and first bytes of body are sent; send the rest with the returned bytes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:5])
    return sock, body[5:]


def _finish(sent: tuple[socket.socket, bytes]) -> tuple[int, Any]:
    sock, rest = sent
    with sock:
        sock.sendall(rest)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def reload_until(broker: BrokerProcess, api_key: str, status: int = 200) -> None:
    """SIGHUP, then wait until `api_key` (of p1) gets `status`: 200 once a key the auth file now
    holds is let in, 401 once one it no longer holds is refused."""
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + DEADLINE
    while raw(broker.http_port, "GET", "/p1/api/v1beta2/streams", {"X-Api-Key": api_key}).status != status:
        assert time.monotonic() < deadline, f"the key did not get {status} after SIGHUP"
        time.sleep(0.05)


def added_keys(broker: BrokerProcess, keys: Keys, auth_file: Path, tag: str, role: str) -> tuple[str, str, str]:
    """An AK/SK and an API key of `role` in p1, added to the auth file and loaded by SIGHUP:
    (ak, sk, api_key), once the API key works."""
    ak, sk, api_key = f"AK{tag.upper()}{secrets.token_hex(4)}", secrets.token_urlsafe(24), secrets.token_hex(30)
    write_auth_file(auth_file, auth_file.read_text() + f'\n[[access_keys]]\nak = "{ak}"\nsk = "{sk}"\n'
                    f'project_id = "p1"\nrole = "{role}"\n[[api_keys]]\nkey = "{api_key}"\nworkspace = "p1"\n'
                    f'role = "{role}"\n')
    keys.aks[tag], keys.api[f"{tag}-{role}"] = (ak, sk, "p1"), (api_key, "p1")   # for the log check
    reload_until(broker, api_key)
    return ak, sk, api_key


def test_a_key_removed_while_its_request_s_body_comes_writes_nothing(broker: BrokerProcess, keys: Keys,
                                                                    auth_file: Path) -> None:
    """A key was checked when a request's head arrived: one removed by a SIGHUP reload while the
    body was still coming (up to the body timeout) wrote anyway - a DIS PutRecords, an /api/put and
    a Timeplus ingest each answered 200 after the key had stopped working for every new request.
    The key is asked again once the body is in: 401 in each door's body, nothing written."""
    good = auth_file.read_text()
    ak, sk, api_key = added_keys(broker, keys, auth_file, "late", "producer")
    assert broker.proc is not None
    port, asked = broker.http_port, {"X-Api-Key": api_key}
    admin = client(broker, keys, "admin")
    dis_stream, tp_stream, metric = name(), name(), f"late.{uuid.uuid4().hex[:8]}"
    create(admin, dis_stream)
    made = raw(port, "POST", "/p1/api/v1beta2/streams", {"X-Api-Key": keys.api["admin"][0]},
               json.dumps({"name": tp_stream, "columns": [{"name": "i", "type": "int64"}]}).encode())
    assert made.status == 201, made.raw

    records = json.dumps({"stream_name": dis_stream, "records": [{"data": "bGF0ZQ==", "partition_id": "0"}]}).encode()
    headers = {"Content-Type": "application/json", "Host": broker.http_target, "X-Project-Id": "p1",
               "X-Sdk-Date": sdk_date()}
    dis_put = _half_sent(port, "POST", "/v2/p1/records", sign(ak, sk, "POST", "/v2/p1/records", "", headers, records),
                         records)
    points = json.dumps([{"metric": metric, "timestamp": 1764400000, "value": 1, "tags": {"h": "a"}}]).encode()
    tsdb_put = _half_sent(port, "POST", "/api/put?details", {**asked, "Host": broker.http_target}, points)
    rows = json.dumps({"columns": ["i"], "data": [[1]]}).encode()
    ingest = _half_sent(port, "POST", f"/p1/api/v1beta2/streams/{tp_stream}/ingest",
                        {**asked, "Host": broker.http_target, "Content-Type": "application/json"}, rows)

    write_auth_file(auth_file, good)   # both keys removed
    reload_until(broker, asked["X-Api-Key"], 401)

    status, body = _finish(dis_put)
    assert (status, body.get("error_code"), body.get("reason")) == (401, "DIS.4107", "AUTH_UNKNOWN_KEY"), body
    status, body = _finish(tsdb_put)
    assert (status, body.get("reason")) == (401, "AUTH_UNKNOWN_KEY"), body
    status, body = _finish(ingest)
    assert (status, body.get("code")) == (401, 516), body
    assert read(admin, cursor(admin, dis_stream)) == []
    stats = raw(port, "GET", f"/p1/api/v1beta2/streams/{tp_stream}/stats", {"X-Api-Key": keys.api["admin"][0]})
    assert stats.status == 200 and stats.json["row_count"] == 0, stats.raw
    suggested = raw(port, "GET", f"/api/suggest?type=metrics&q={metric}", {"X-Api-Key": keys.api["admin"][0]})
    assert suggested.status == 200 and suggested.json == [], suggested.raw


def test_a_long_poll_of_a_key_removed_while_it_waits_reads_nothing(broker: BrokerProcess, keys: Keys,
                                                                   auth_file: Path) -> None:
    """A long poll (DIS GetRecords and gRPC GetRecords with wait_ms, up to 20 s) was checked when it
    began: a SIGHUP reload that removed its key while it waited left it waiting, and a record put
    after the key was gone was handed to it (200 / a page with the record). It is asked again once
    the wait ends: DIS 401 DIS.4107, gRPC UNAUTHENTICATED, no record."""
    import grpc

    from client._pb.sluice.v1 import sluice_pb2 as pb
    from client._pb.sluice.v1 import sluice_pb2_grpc

    good = auth_file.read_text()
    ak, sk, api_key = added_keys(broker, keys, auth_file, "poll", "consumer")
    assert broker.proc is not None
    port, asked = broker.http_port, {"X-Api-Key": api_key}
    admin, stream = client(broker, keys, "admin"), name()
    create(admin, stream)
    latest = str(admin.show_cursor(ShowCursorRequest(stream_name=stream, partition_id="0",
                                                     cursor_type="LATEST")).partition_cursor)
    query = f"partition-cursor={latest}&wait_ms=20000"
    headers = {"Content-Type": "application/json", "Host": broker.http_target, "X-Project-Id": "p1",
               "X-Sdk-Date": sdk_date()}
    signed = sign(ak, sk, "GET", "/v2/p1/records", query, headers)
    metadata = [("authorization", f"Bearer {api_key}")]
    with grpc.insecure_channel(broker.grpc_target) as channel:
        stub = sluice_pb2_grpc.SluiceStub(channel)
        dis_poll = _half_sent(port, "GET", f"/v2/p1/records?{query}", signed, b"")   # all of it: a GET
        grpc_poll = stub.GetRecords.future(pb.GetRecordsRequest(cursor=latest, wait_ms=20000), metadata=metadata,
                                           timeout=DEADLINE)
        # calls made after the polls, answered: the polls were let in with the key before it went
        # (the gRPC one on the same connection, the DIS one sent before this request was)
        stub.ListStreams(pb.ListStreamsRequest(), metadata=metadata, timeout=DEADLINE)
        assert raw(port, "GET", "/p1/api/v1beta2/streams", asked).status == 200
        write_auth_file(auth_file, good)   # both keys removed
        reload_until(broker, asked["X-Api-Key"], 401)
        put(admin, stream, b"after the key was removed")   # wakes both polls
        status, body = _finish(dis_poll)
        assert (status, body.get("error_code"), body.get("reason")) == (401, "DIS.4107", "AUTH_UNKNOWN_KEY"), body
        with pytest.raises(grpc.RpcError) as info:
            grpc_poll.result(DEADLINE)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, info.value


def test_the_log_holds_no_secret(broker: BrokerProcess, keys: Keys) -> None:
    """Last in the module: the DEBUG log of everything above names no SK and no API key."""
    log = "".join(broker.stderr_lines)
    assert "DEBUG" in log and "sluice ready" in log
    for secret in keys.secrets():
        assert secret not in log
    assert "Signature=" not in log and "X-Api-Key" not in log


# -- without an auth file, and with a broken one --------------------------------------------------------

def test_sighup_leaves_an_open_broker_serving(start_broker: Callable[..., BrokerProcess]) -> None:
    """SIGHUP re-reads the auth file; without one it was not handled at all, so the signal's
    default ended the process at once (no drain; `systemctl reload`, or the terminal it was
    started from closing), where a broker with an auth file goes on. Now both go on."""
    proc = start_broker()
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + DEADLINE
    while not any("SIGHUP" in line for line in proc.stderr_lines):
        assert proc.proc.poll() is None, f"SIGHUP ended the broker (status {proc.proc.returncode})"
        assert time.monotonic() < deadline, proc.stderr_lines[-5:]
        time.sleep(0.05)
    assert raw(proc.http_port, "GET", "/v2/p1/streams").status == 200
    assert proc.stop() == 0


def test_an_open_broker_says_so(start_broker: Callable[..., BrokerProcess]) -> None:
    proc = start_broker()
    startup = proc.startup_log()
    assert "sluice ready" in startup[-1] and " auth=off " in startup[-1], startup
    assert any("WARNING" in line and "no --auth-file: every door is open to anyone" in line for line in startup)
    # and nothing is asked of a client
    assert raw(proc.http_port, "GET", "/v2/p1/streams").status == 200
    assert raw(proc.http_port, "GET", "/api/v1beta2/streams").status == 200


@pytest.mark.parametrize(("content", "needle"), [
    (None, "cannot read the auth file"),
    ("[[access_keys]]\nak = \"A\"\n", "`sk` must be a non-empty string"),
    ("this is = not toml [", "not valid TOML"),
    ("", "nobody could use the broker"),
    # keys no request could present: HTTP parsers and the doors strip a header's surrounding
    # whitespace, and the DIS Authorization header ends an AK at a space or a comma
    ('[[api_keys]]\nkey = "k-with-a-trailing-space "\nworkspace = "p1"\n', "`key` begins or ends with whitespace"),
    ('[[access_keys]]\nak = "AK ONE"\nsk = "S"\nproject_id = "p1"\n', "`ak` holds a space or a comma"),
    ('[[access_keys]]\nak = "AK,1"\nsk = "S"\nproject_id = "p1"\n', "`ak` holds a space or a comma"),
])
def test_a_bad_auth_file_is_one_line_and_exit_1(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "auth.toml"
    if content is not None:
        path.write_text(content)
    out = subprocess.run([sys.executable, "-m", "broker", "--data-dir", str(tmp_path / "data"), "--grpc-port", "0",
                          "--http-port", "0", "--auth-file", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("sluice-broker: error: --auth-file ") and str(path) in lines[0], lines[0]
    assert needle in lines[0], lines[0]
