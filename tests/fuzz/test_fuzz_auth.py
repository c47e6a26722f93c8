"""Fuzz of the credentials every door reads, against a broker started with `--auth-file`
(issue 11, point 1): DIS `Authorization` (SDK-HMAC-SHA256) and `X-Sdk-Date`; `X-Api-Key`,
`Authorization: ApiKey|Bearer` on the Timeplus and OpenTSDB doors; gRPC `authorization` metadata.

Each suite finds out whether the broker enforces (a request without credentials gets 401 /
UNAUTHENTICATED; `test_the_http_doors_enforce` and `test_the_grpc_door_enforces` require it) and
asserts:
- always: no 5xx, no INTERNAL/UNKNOWN, every error in its door's shape, the sentinel records
  (written with a correct signature) intact and the log clean after the suite;
- enforced: a genuine request succeeds, and every request whose credentials were broken in any way
  gets 401/403 (gRPC UNAUTHENTICATED/PERMISSION_DENIED) with the documented codes - never a
  success; where the contract leaves the answer open (LENIENT, LENIENT_KEYS), either.
"""
from __future__ import annotations

import hashlib
import hmac
import string
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, unquote

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.launcher import BrokerProcess
from client._pb.sluice.v1 import sluice_pb2 as pb

from .harness import Header, Reply, assert_dis_error, budget, guarded_broker, http_request, json_body, no_5xx, target

pytestmark = pytest.mark.auth

P1, P2 = "p1", "p2"
AK, SK = "AKFUZZ1", "SKFUZZ1-secret"
AK_OTHER, SK_OTHER = "AKFUZZ2", "SKFUZZ2-secret"        # admin of p2
AK_CONSUMER, SK_CONSUMER = "AKFUZZ3", "SKFUZZ3-secret"  # consumer of p1: may not write
KEY = "k-fuzz-admin-p1-" + "a" * 44
KEY_OTHER = "k-fuzz-admin-p2-" + "b" * 44
KEY_CONSUMER = "k-fuzz-consumer-p1-" + "c" * 41
AUTH_FILE = f"""
[[access_keys]]
ak = "{AK}"
sk = "{SK}"
project_id = "{P1}"
role = "admin"
[[access_keys]]
ak = "{AK_OTHER}"
sk = "{SK_OTHER}"
project_id = "{P2}"
role = "admin"
[[access_keys]]
ak = "{AK_CONSUMER}"
sk = "{SK_CONSUMER}"
project_id = "{P1}"
role = "consumer"
[[api_keys]]
key = "{KEY}"
workspace = "{P1}"
role = "admin"
[[api_keys]]
key = "{KEY_OTHER}"
workspace = "{P2}"
role = "admin"
[[api_keys]]
key = "{KEY_CONSUMER}"
workspace = "{P1}"
role = "consumer"
"""
# Where the spec leaves the answer open (a second Authorization header after a genuine one, the
# scheme's case): success or a refusal, but never a 5xx.
LENIENT = frozenset({"duplicate-authorization", "lowercase-scheme"})
HOST = "127.0.0.1"   # the Host header http_request sends: it is signed
UNRESERVED = "-_.~"


# -- the SDK's signature, from shared/spec/dis-api.md section 7 ----------------------------------------

def sdk_date(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def signature(sk: str, method: str, t: str, body: bytes, headers: dict[str, str], date: str) -> tuple[str, str]:
    """(SignedHeaders, Signature) of a request, as the official SDK's Signer computes them."""
    path, _, query = t.partition("?")
    uri = "/".join(quote(unquote(segment), safe=UNRESERVED) for segment in path.split("/"))
    uri += "" if uri.endswith("/") else "/"
    pairs = sorted((unquote(k), unquote(v)) for k, _, v in (item.partition("=") for item in query.split("&") if item))
    canonical_query = "&".join(f"{quote(k, safe=UNRESERVED)}={quote(v, safe=UNRESERVED)}" for k, v in pairs)
    lowered = {k.lower(): v.strip() for k, v in headers.items()}
    signed = ";".join(sorted(lowered))
    canonical_headers = "".join(f"{k}:{lowered[k]}\n" for k in sorted(lowered))
    request = "\n".join([method, uri, canonical_query, canonical_headers, signed, hashlib.sha256(body).hexdigest()])
    to_sign = f"SDK-HMAC-SHA256\n{date}\n{hashlib.sha256(request.encode()).hexdigest()}"
    return signed, hmac.new(sk.encode(), to_sign.encode(), hashlib.sha256).hexdigest()


def signed_headers(method: str, t: str, body: bytes, ak: str = AK, sk: str = SK, project: str = P1,
                   date: str | None = None) -> dict[str, str]:
    date = date or sdk_date()
    headers = {"Content-Type": "application/json", "Host": HOST, "X-Project-Id": project, "X-Sdk-Date": date}
    names, sig = signature(sk, method, t, body, headers, date)
    headers["Authorization"] = f"SDK-HMAC-SHA256 Access={ak}, SignedHeaders={names}, Signature={sig}"
    del headers["Host"]   # http_request sends it
    return headers


def sentinel_sign(method: str, t: str, body: bytes) -> list[Header]:
    return list(signed_headers(method, t, body).items())


def test_the_signer_reproduces_the_spec_vector() -> None:
    body = b'{"stream_name": "s1", "records": [{"data": "aGVsbG8=", "partition_key": "k1"}]}'
    headers = {"Content-Type": "application/json", "User-Agent": "huaweicloud-usdk-python/3.0; test",
               "X-Project-Id": "proj123", "Host": "127.0.0.1:8080", "X-Sdk-Date": "20240101T000000Z"}
    names, sig = signature("SKEXAMPLE", "POST", "/v2/proj123/records", body, headers, "20240101T000000Z")
    assert names == "content-type;host;user-agent;x-project-id;x-sdk-date"
    assert sig == "a1a3e69e3fd5d0776377eba86ecf9a987f14500775c06111d1850588ff82d70b"
    _, sig = signature("SKEXAMPLE", "GET", "/v2/proj123/streams?limit=10&start_stream_name=a%20b%2Fc", b"",
                       {k: v for k, v in headers.items() if k != "Content-Length"}, "20240101T000000Z")
    assert sig == "7da519aa42e95a4c7b2bd2cd2c24f5ff7cf70730491ded5ef70a33ef7699f10e"


# -- the broker --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    base: Path = tmp_path_factory.mktemp("fuzz-auth")
    (base / "auth.toml").write_text(AUTH_FILE)
    with guarded_broker(base / "data", "--auth-file", str(base / "auth.toml"), "--tsdb-project", P1, project=P1,
                        sign=sentinel_sign) as proc:
        t = f"/v2/{P1}/streams"
        body = json_body({"stream_name": "auth-s", "partition_count": 1})
        created = send(proc, "POST", t, body, list(signed_headers("POST", t, body).items()))
        assert created is not None and created.status == 201, created
        created = send(proc, "POST", f"/{P1}/api/v1beta2/streams", json_body({
            "name": "auth_t", "columns": [{"name": "n", "type": "int32"}]}),
            [("Content-Type", "application/json"), ("X-Api-Key", KEY)])
        assert created is not None and created.status == 201, created
        yield proc


def send(proc: BrokerProcess, method: str, t: str, body: bytes, headers: list[Header], port: int | None = None,
         ) -> Reply | None:
    return http_request(proc.host, port or proc.http_port, method, t, body, headers)


@pytest.fixture(scope="module")
def enforced(fuzz_broker: BrokerProcess) -> bool:
    """Whether this broker's HTTP doors check credentials: a request with none gets 401 (and then
    on every door; checked here so the fuzz can rely on it)."""
    dis = send(fuzz_broker, "GET", f"/v2/{P1}/streams", b"", [("Content-Type", "application/json")])
    tp = send(fuzz_broker, "GET", f"/{P1}/api/v1beta2/streams", b"", [("Content-Type", "application/json")])
    assert dis is not None and tp is not None
    if dis.status == 401:
        assert tp.status == 401, "the DIS door checks credentials but the Timeplus door does not"
        return True
    assert (dis.status, tp.status) == (200, 200), (dis, tp)
    return False


@pytest.fixture(scope="module")
def grpc_enforced(fuzz_broker: BrokerProcess) -> bool:
    """Whether the gRPC door checks credentials: a call without any gets UNAUTHENTICATED."""
    with grpc.insecure_channel(fuzz_broker.grpc_target) as channel:
        try:
            channel.unary_unary("/sluice.v1.Sluice/ListStreams")(b"", timeout=15)
            return False
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            return True


def test_the_http_doors_enforce(enforced: bool) -> None:
    assert enforced, "a broker with --auth-file answers a request without credentials"


def test_the_grpc_door_enforces(grpc_enforced: bool) -> None:
    assert grpc_enforced, "a broker with --auth-file answers a gRPC call without credentials"


# -- DIS: Authorization and X-Sdk-Date ----------------------------------------------------------------

def _requests() -> list[tuple[str, str, bytes]]:
    put = json_body({"stream_name": "auth-s", "records": [{"data": "YQ==", "partition_id": "0"}]})
    return [("GET", target(f"/v2/{P1}/streams", {"limit": "10"}), b""),
            ("POST", f"/v2/{P1}/records", put),
            ("GET", target(f"/v2/{P1}/cursors", {"stream-name": "auth-s", "partition-id": "0",
                                                 "cursor-type": "TRIM_HORIZON"}), b""),
            ("GET", f"/v2/{P1}/streams/auth-s", b"")]


REQUESTS = st.sampled_from(_requests())
MUTATIONS = st.sampled_from([
    "none", "none", "no-authorization", "junk-authorization", "signature-flip", "signature-short", "unknown-ak",
    "wrong-sk", "other-project-key", "consumer-writes", "no-date", "junk-date", "stale-date", "future-date",
    "other-x-project-id", "tamper-body", "tamper-query", "other-path-project", "lowercase-scheme", "no-commas",
    "unsigned-host", "duplicate-authorization", "empty-signed-headers"])
JUNK = st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=120) | st.sampled_from([
    "", "SDK-HMAC-SHA256", "SDK-HMAC-SHA256 ", "SDK-HMAC-SHA256 Access=", "SDK-HMAC-SHA256 Access=, SignedHeaders=, "
    "Signature=", "Bearer x", "Basic YTpi", "SDK-HMAC-SM3 Access=AKFUZZ1, SignedHeaders=host, Signature=00",
    "SDK-HMAC-SHA256 Access=AKFUZZ1, SignedHeaders=" + "a;" * 500 + ", Signature=" + "0" * 64])
DATES = st.sampled_from(["", "0", "20240101T000000Z", "2024-01-01T00:00:00Z", "99991231T235959Z", "00000000T000000Z",
                         "20241301T000000Z", "20240101T250000Z", "yesterday"]) | st.text(
    alphabet=string.ascii_letters + string.digits + " :-+TZ.", max_size=20)


def _mutate(mutation: str, method: str, t: str, body: bytes, junk: str, date: str) -> tuple[str, str, bytes,
                                                                                            dict[str, str]]:
    """The request after one credential is broken; "none" leaves it genuine."""
    ak, sk, project = AK, SK, P1
    if mutation == "unknown-ak":
        ak = "AKNOBODY"
    elif mutation == "wrong-sk":
        sk = "not-the-secret"
    elif mutation == "other-project-key":
        ak, sk = AK_OTHER, SK_OTHER
    elif mutation == "consumer-writes" and method == "POST":
        ak, sk = AK_CONSUMER, SK_CONSUMER
    elif mutation == "other-path-project":
        t = t.replace(f"/v2/{P1}/", f"/v2/{P2}/")
    when = {"stale-date": datetime.now(UTC) - timedelta(minutes=16),
            "future-date": datetime.now(UTC) + timedelta(minutes=16)}.get(mutation)
    headers = signed_headers(method, t, body, ak, sk, project, sdk_date(when) if when else None)
    auth = headers["Authorization"]
    if mutation == "no-authorization":
        del headers["Authorization"]
    elif mutation == "junk-authorization":
        headers["Authorization"] = junk
    elif mutation == "signature-flip":
        headers["Authorization"] = auth[:-1] + ("0" if auth[-1] != "0" else "1")
    elif mutation == "signature-short":
        headers["Authorization"] = auth[:-2]
    elif mutation == "no-date":
        del headers["X-Sdk-Date"]
    elif mutation == "junk-date":
        headers["X-Sdk-Date"] = date
    elif mutation == "other-x-project-id":
        headers["X-Project-Id"] = P2
    elif mutation == "tamper-body" and body:
        body = body.replace(b"YQ==", b"Yg==")
    elif mutation == "tamper-query" and "?" in t:
        t = t.replace("=0", "=1", 1) if "=0" in t else t.replace("limit=10", "limit=11")
    elif mutation == "lowercase-scheme":
        headers["Authorization"] = auth.replace("SDK-HMAC-SHA256", "sdk-hmac-sha256")
    elif mutation == "no-commas":
        headers["Authorization"] = auth.replace(", ", " ")
    elif mutation == "unsigned-host":
        headers["Authorization"] = auth.replace("host;", "")
    elif mutation == "empty-signed-headers":
        headers["Authorization"] = auth.replace(auth.split("SignedHeaders=")[1].split(",")[0], "")
    return t, mutation, body, headers


def test_dis_credentials(fuzz_broker: BrokerProcess, enforced: bool) -> None:
    seen: Counter[int] = Counter()

    @budget(400)
    @given(request=REQUESTS, mutation=MUTATIONS, junk=JUNK, date=DATES)
    def one(request: tuple[str, str, bytes], mutation: str, junk: str, date: str) -> None:
        method, t, body = request
        t, mutation, body, headers = _mutate(mutation, method, t, body, junk, date)
        extra: list[Header] = list(headers.items())
        if mutation == "duplicate-authorization":
            extra.append(("Authorization", junk))
        reply = send(fuzz_broker, method, t, body, extra)
        assert reply is not None, (mutation, t)
        no_5xx(reply, (mutation, method, t, headers))
        seen[reply.status] += 1
        if reply.status >= 400:
            err = assert_dis_error(reply, reply.status)
            if enforced and reply.status == 401:
                assert err["error_code"] in ("DIS.4100", "DIS.4101", "DIS.4102", "DIS.4103", "DIS.4104", "DIS.4105",
                                             "DIS.4107", "DIS.4117"), err
        if not enforced:
            return
        broken = mutation != "none" and not (mutation == "consumer-writes" and method != "POST") and not (
            mutation == "tamper-body" and not body) and not (mutation == "tamper-query" and "?" not in t)
        if mutation in LENIENT:
            assert reply.status in (200, 201, 204, 401, 403), (mutation, reply.status)
        elif broken:
            assert reply.status in (401, 403), (mutation, method, t, reply.status, reply.raw[:200])
        else:
            assert reply.status in (200, 201, 204), (mutation, method, t, reply.status, reply.raw[:200])

    one()
    assert seen[200] >= 10, seen


# -- API keys: Timeplus, OpenTSDB ---------------------------------------------------------------------

KEY_HEADERS = st.sampled_from([
    [("X-Api-Key", KEY)], [("Authorization", f"ApiKey {KEY}")], [("Authorization", f"Bearer {KEY}")],
    [("X-Api-Key", KEY_OTHER)], [("X-Api-Key", KEY_CONSUMER)], [], [("X-Api-Key", "")], [("X-Api-Key", KEY[:-1])],
    [("X-Api-Key", KEY + " ")], [("X-Api-Key", KEY.upper())], [("Authorization", f"Basic {KEY}")],
    [("Authorization", "Bearer")], [("Authorization", f"bearer {KEY}")], [("X-Api-Key", KEY), ("X-Api-Key", "junk")],
    [("X-Api-Key", "junk"), ("X-Api-Key", KEY)], [("X-Api-Key", "x" * 4000)], [("X-Api-Key", KEY_OTHER),
                                                                                ("Authorization", f"Bearer {KEY}")]])
GENUINE = ([("X-Api-Key", KEY)], [("Authorization", f"ApiKey {KEY}")], [("Authorization", f"Bearer {KEY}")])
# two keys at once, a trailing blank (aiohttp strips it), the scheme's case: left open by the spec
LENIENT_KEYS = ([("X-Api-Key", KEY), ("X-Api-Key", "junk")], [("X-Api-Key", "junk"), ("X-Api-Key", KEY)],
                [("X-Api-Key", KEY_OTHER), ("Authorization", f"Bearer {KEY}")], [("X-Api-Key", KEY + " ")],
                [("Authorization", f"bearer {KEY}")])


def expected_for_key(keys: list[Header], method: str, path: str) -> set[int]:
    """The answers the contract allows (issue11-plan.md: roles, project binding, credentials)."""
    tsdb = path.startswith(("/api/put", "/api/query"))
    ok = {200, 204, 400} if tsdb else {200}   # a tsdb body may be refused after the key was accepted
    if keys in LENIENT_KEYS:
        return ok | {401, 403}
    if keys in GENUINE:
        return ok
    if keys == [("X-Api-Key", KEY_CONSUMER)]:   # READ + DESCRIBE, no WRITE
        return {403} if path == "/api/put" else ok
    if keys == [("X-Api-Key", KEY_OTHER)]:      # p2's admin: /api/... without a workspace is p2's
        return {200} if path == "/api/v1beta2/streams" else {403}
    return {401}
KEY_REQUESTS = st.sampled_from([
    ("GET", f"/{P1}/api/v1beta2/streams", b""), ("GET", "/api/v1beta2/streams", b""),
    ("POST", f"/{P1}/api/v1beta2/sqlanalyze", json_body({"sql": "select 1 from auth_t"})),
    ("POST", "/api/put", json_body([{"metric": "auth.m", "timestamp": int(time.time()), "value": 1,
                                     "tags": {"h": "a"}}])),
    ("POST", "/api/query", json_body({"start": "1h-ago", "queries": [{"metric": "auth.m", "aggregator": "sum"}]}))])


def test_api_keys(fuzz_broker: BrokerProcess, enforced: bool) -> None:
    seen: Counter[int] = Counter()

    @budget(300)
    @given(request=KEY_REQUESTS, keys=KEY_HEADERS | st.text(
        alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=80).map(lambda v: [("X-Api-Key", v)]))
    def one(request: tuple[str, str, bytes], keys: list[Header]) -> None:
        method, path, body = request
        reply = send(fuzz_broker, method, path, body, [("Content-Type", "application/json"), *keys])
        assert reply is not None, (path, keys)
        no_5xx(reply, (method, path, keys))
        seen[reply.status] += 1
        if not enforced:
            return
        assert reply.status in expected_for_key(keys, method, path), (method, path, keys, reply.status,
                                                                      reply.raw[:200])

    one()
    assert seen[200] + seen[204] >= 10, seen


# -- gRPC: authorization metadata ---------------------------------------------------------------------

METADATA_VALUES = st.sampled_from([f"Bearer {KEY}", f"Bearer {KEY_OTHER}", f"Bearer {KEY_CONSUMER}", f"bearer {KEY}",
                                   f"ApiKey {KEY}", KEY, "Bearer", "Bearer ", "", f"Bearer {KEY} extra",
                                   "Basic x"]) | st.text(alphabet=string.ascii_letters + string.digits + " -._~+/=",
                                                         max_size=80)


def expected_for_bearer(value: str | None, project: str | None) -> set[grpc.StatusCode]:
    """ListStreams (DESCRIBE, every role) under `authorization: value` and `sluice-project: project`."""
    codes = grpc.StatusCode
    own = {f"Bearer {KEY}": P1, f"Bearer {KEY_CONSUMER}": P1, f"Bearer {KEY_OTHER}": P2}.get(value or "")
    if value == f"bearer {KEY}":   # the scheme's case: left open
        return {codes.OK, codes.UNAUTHENTICATED, codes.PERMISSION_DENIED, codes.INVALID_ARGUMENT}
    if own is None:
        return {codes.UNAUTHENTICATED, codes.INVALID_ARGUMENT} if project == "x y" else {codes.UNAUTHENTICATED}
    if project is None or project == own:
        return {codes.OK}
    return {codes.PERMISSION_DENIED, codes.INVALID_ARGUMENT} if project == "x y" else {codes.PERMISSION_DENIED}


def test_grpc_authorization_metadata(fuzz_broker: BrokerProcess, grpc_enforced: bool) -> None:
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(fuzz_broker.grpc_target) as channel:
        list_streams = channel.unary_unary("/sluice.v1.Sluice/ListStreams", request_serializer=None,
                                           response_deserializer=None)

        @budget(250)
        @given(value=st.none() | METADATA_VALUES, project=st.sampled_from([None, P1, P2, "default", "x y"]))
        def one(value: str | None, project: str | None) -> None:
            metadata: list[tuple[str, Any]] = []
            if value is not None:
                metadata.append(("authorization", value))
            if project is not None:
                metadata.append(("sluice-project", project))
            try:
                list_streams(pb.ListStreamsRequest().SerializeToString(), timeout=15, metadata=tuple(metadata))
                seen["ok"] += 1
                outcome = grpc.StatusCode.OK
            except grpc.RpcError as err:
                outcome = err.code()
                seen[outcome.name] += 1
                assert outcome not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                       grpc.StatusCode.DEADLINE_EXCEEDED), (value, project, err.details())
                assert dict(err.trailing_metadata() or ()).get("dis-error-code"), (value, err.details())
            if grpc_enforced:
                assert outcome in expected_for_bearer(value, project), (value, project, outcome)

        one()
    assert seen["ok"] >= 5, seen
