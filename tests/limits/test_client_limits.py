"""Per-client limits (broker/api/limits.py) on a real broker process with small limits: the one past
each limit is refused with the documented code (DIS.4303 / TOO_MANY_REQUESTS in the door's body: HTTP
400 on the DIS door, whose SDK never reads a 429's body, 429 elsewhere; gRPC RESOURCE_EXHAUSTED with
reason TOO_MANY_REQUESTS), and giving one back frees a slot.
No timing assertions: counts and codes, waits with generous deadlines."""
from __future__ import annotations

import http.client
import json
import socket
import urllib.request
import uuid
from typing import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.app import PRODUCE_STREAMS_PER_CONNECTION
from broker.launcher import BrokerProcess
from client import Client
from client.errors import SluiceError
from tests.conftest import eventually

CONNECTIONS, REQUESTS, SUBSCRIPTIONS = 4, 2, 2


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path_factory.mktemp("limits") / "data", "--store", "memory",
                         "--max-connections-per-client", str(CONNECTIONS),
                         "--max-requests-per-client", str(REQUESTS),
                         "--max-subscriptions-per-client", str(SUBSCRIPTIONS),
                         "--body-timeout", "60", "--metrics-port", "0").start()
    yield proc
    proc.stop(30)


@pytest.fixture
def stream(limited: BrokerProcess) -> str:
    name = f"s{uuid.uuid4().hex[:10]}"
    with Client(limited.grpc_target) as c:
        c.create_stream(name, 1)
        c.put_records(name, [b"first"])
    return name


def _connect(proc: BrokerProcess, port: int | None = None) -> socket.socket:
    return socket.create_connection((proc.host, port or proc.http_port), timeout=30)


def _get(sock: socket.socket, path: str) -> tuple[int, dict[str, object], bool]:
    """One GET on an open socket: (status, JSON body, whether the server closed afterwards)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = json.loads(response.read() or b"{}")
    closed = response.will_close
    return response.status, body, closed


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return True


def _stalled_request(proc: BrokerProcess) -> socket.socket:
    """A request in progress for as long as we like: its body never comes (the body timeout is 60 s)."""
    sock = _connect(proc)
    sock.sendall(b"POST /v2/default/streams HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{")
    return sock


class Tail:
    """An open SSE tail, its first event read (so the broker holds it open)."""

    def __init__(self, proc: BrokerProcess, stream: str) -> None:
        self.conn = http.client.HTTPConnection(proc.host, proc.http_port, timeout=30)
        self.conn.request("GET", f"/sluice/v1/tail?stream-name={stream}&partition-id=0&cursor-type=TRIM_HORIZON")
        self.response = self.conn.getresponse()
        self.status = self.response.status
        if self.status == 200:
            line = self.response.readline()
            while line.startswith(b":") or line == b"\n":   # ": connected" when the first batch was not there at once
                line = self.response.readline()
            assert line.startswith(b"id: ")
        else:
            self.body = json.loads(self.response.read())

    def close(self) -> None:
        self.response.close()   # the response holds the socket open too
        self.conn.close()


# -- HTTP ------------------------------------------------------------------------------------------

def test_subscriptions_past_the_limit_get_429_and_a_closed_one_frees_a_slot(limited: BrokerProcess,
                                                                           stream: str) -> None:
    tails = [Tail(limited, stream) for _ in range(SUBSCRIPTIONS)]
    assert [t.status for t in tails] == [200] * SUBSCRIPTIONS
    extra = Tail(limited, stream)
    assert extra.status == 429   # our SSE tail: plain HTTP's status
    assert extra.body["error_code"] == "DIS.4303" and extra.body.get("reason") == "TOO_MANY_REQUESTS"
    extra.close()
    # open subscriptions are not requests in progress: the client can still make requests
    with _connect(limited) as sock:
        assert _get(sock, "/v2/default/streams")[0] == 200
    tails.pop().close()

    def reopened() -> bool:
        t = Tail(limited, stream)
        if t.status == 200:
            tails.append(t)
            return True
        t.close()
        return False

    eventually(reopened, timeout=30)
    for t in tails:
        t.close()


def _quiet_tail(proc: BrokerProcess, stream: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A tail from LATEST of a partition nobody writes: no batch comes before the 15 s heartbeat."""
    conn = http.client.HTTPConnection(proc.host, proc.http_port, timeout=30)
    conn.request("GET", f"/sluice/v1/tail?stream-name={stream}&partition-id=0&cursor-type=LATEST")
    return conn, conn.getresponse()


def test_a_client_leaving_a_quiet_tail_frees_its_slot_well_before_the_heartbeat(limited: BrokerProcess,
                                                                                stream: str) -> None:
    """The headers (and a comment) come at once, and a client closing the connection during the
    silence is noticed: its slot is free again long before the 15 s heartbeat would tell."""
    tails: list[tuple[http.client.HTTPConnection, http.client.HTTPResponse]] = []

    def opened() -> bool:   # (an earlier test's subscriptions may still be leaving)
        conn, response = _quiet_tail(limited, stream)
        if response.status != 200:
            response.close()
            conn.close()
            return False
        tails.append((conn, response))
        return len(tails) == SUBSCRIPTIONS

    eventually(opened, timeout=30, interval=0.2)
    for _, response in tails:
        assert response.readline() == b": connected\n"   # the headers and a comment, at once
    conn, refused = _quiet_tail(limited, stream)
    assert refused.status == 429
    refused.read()
    conn.close()
    for conn, response in tails:
        response.close()
        conn.close()

    def reopened() -> bool:
        conn, response = _quiet_tail(limited, stream)
        try:
            return response.status == 200
        finally:
            response.close()
            conn.close()

    eventually(reopened, timeout=8, interval=0.2)   # a generous bound, still half the heartbeat's


def test_a_timeplus_streaming_query_counts_as_a_subscription(limited: BrokerProcess, stream: str) -> None:
    tails = [Tail(limited, stream) for _ in range(SUBSCRIPTIONS)]
    try:
        conn = http.client.HTTPConnection(limited.host, limited.http_port, timeout=30)
        conn.request("POST", "/default/api/v1beta2/queries", body=json.dumps({"sql": f"SELECT * FROM {stream}"}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 429
        assert json.loads(response.read())["reason"] == "TOO_MANY_REQUESTS"
        conn.close()
    finally:
        for t in tails:
            t.close()


def _refusals_counted(broker: BrokerProcess, door: str = "dis") -> float:
    """sluice_request_errors_total of a door's TOO_MANY_REQUESTS (the scrape is a request too)."""
    with urllib.request.urlopen(f"{broker.http_url}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sluice_request_errors_total" and sample.labels == {
                    "door": door, "reason": "TOO_MANY_REQUESTS"}:
                return sample.value
    return 0.0


def test_requests_in_progress_past_the_limit_are_refused(limited: BrokerProcess) -> None:
    counted_before = _refusals_counted(limited)
    refusals = 0
    stalled = [_stalled_request(limited) for _ in range(REQUESTS)]
    try:
        def refused() -> bool:   # once the stalled ones are being handled
            nonlocal refusals
            with _connect(limited) as sock:
                status, body, _ = _get(sock, "/v2/default/streams")
            assert status in (200, 400)
            refusals += status == 400
            return status == 400 and body["error_code"] == "DIS.4303" and body["reason"] == "TOO_MANY_REQUESTS"

        eventually(refused, timeout=30)
        stalled.pop().close()   # the handler sees the connection go: its slot is freed

        def served() -> bool:
            with _connect(limited) as sock:
                return _get(sock, "/v2/default/streams")[0] == 200

        eventually(served, timeout=30)
        # the refusals are errors in the metrics, by their reason (the limits sit inside the timer)
        assert _refusals_counted(limited) - counted_before == refusals >= 1
    finally:
        for s in stalled:
            s.close()


def test_health_checks_are_not_requests_the_limit_counts(limited: BrokerProcess) -> None:
    """A liveness probe from the address of a client using all its request slots still answers
    (as gRPC's health service, which the limits leave alone)."""
    stalled = [_stalled_request(limited) for _ in range(REQUESTS)]
    try:
        def refused() -> bool:
            with _connect(limited) as sock:
                return _get(sock, "/v2/default/streams")[0] == 400

        eventually(refused, timeout=30)
        for port in (limited.http_port, limited.metrics_port):
            for path in ("/healthz", "/readyz"):
                with _connect(limited, port) as sock:
                    assert _get(sock, path)[:2] == (200, {"status": "ok" if path == "/healthz" else "ready"}), path
    finally:
        for s in stalled:
            s.close()


def test_the_metrics_ports_requests_are_timed_and_counted(limited: BrokerProcess) -> None:
    """Nothing on --metrics-port was timed or counted (the operations probe): scrapes, 404s."""
    def counts() -> tuple[float, float]:
        with urllib.request.urlopen(f"http://{limited.host}:{limited.metrics_port}/metrics", timeout=30) as reply:
            text = reply.read().decode()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        scrapes = sum(s.value for s in samples if s.name == "sluice_request_duration_seconds_count"
                      and s.labels == {"door": "metrics", "verb": "open_metrics"})
        unknown = sum(s.value for s in samples if s.name == "sluice_request_errors_total"
                      and s.labels == {"door": "http", "reason": "UNKNOWN_ROUTE"})
        return scrapes, unknown

    scrapes, unknown = counts()
    with _connect(limited, limited.metrics_port) as sock:
        assert _get(sock, "/nowhere")[0] == 404
    assert counts() == (scrapes + 1, unknown + 1)   # the first scrape counted, and the 404


def test_the_metrics_port_has_the_per_client_limits_and_json_errors(limited: BrokerProcess) -> None:
    """--metrics-port had neither: one client could open connections until the broker's file
    descriptors ran out, and an unknown path was aiohttp's text/plain 404."""
    port = limited.metrics_port
    with _connect(limited, port) as sock:
        status, body, _ = _get(sock, "/nowhere")
    assert status == 404 and body["error_code"] == "DIS.4200" and body["reason"] == "UNKNOWN_ROUTE", body
    held = [_connect(limited, port) for _ in range(CONNECTIONS)]
    try:
        for sock in held:
            assert _get(sock, "/healthz")[0] == 200
        extra = _connect(limited, port)
        status, body, _ = _get(extra, "/healthz")
        assert status == 429 and body["error_code"] == "DIS.4303", body
        assert _closed_by_peer(extra)
        extra.close()
    finally:
        for sock in held:
            sock.close()


def test_connections_past_the_limit_are_answered_then_closed(limited: BrokerProcess) -> None:
    held = [_connect(limited) for _ in range(CONNECTIONS)]
    for sock in held:   # each one served: they are open and counted
        assert _get(sock, "/v2/default/streams")[0] == 200
    try:
        extra = _connect(limited)
        status, body, _ = _get(extra, "/v2/default/streams")
        assert status == 400 and body["error_code"] == "DIS.4303" and body["reason"] == "TOO_MANY_REQUESTS"
        assert _closed_by_peer(extra)
        extra.close()
        held.pop().close()

        def served() -> bool:
            with _connect(limited) as sock:
                return _get(sock, "/v2/default/streams")[0] == 200

        eventually(served, timeout=30)
        # a flood past twice the limit is closed at once, unanswered
        flood = [_connect(limited) for _ in range(CONNECTIONS + 2)]
        assert _closed_by_peer(flood[-1])
        for sock in flood:
            sock.close()
    finally:
        for sock in held:
            sock.close()


# -- gRPC ------------------------------------------------------------------------------------------

def test_grpc_advertises_at_most_the_calls_a_client_may_run_per_connection(limited: BrokerProcess) -> None:
    """grpc's default is no limit: a client opening streams whose request message never comes
    (so no handler, no per-client count) grew the broker without bound. The server's HTTP/2
    SETTINGS now carry MAX_CONCURRENT_STREAMS = request slots + subscription slots + room for
    produce streams (PutRecordsStream holds no slot: a lower cap starved the 4th Producer of a Client
    under these limits)."""
    import struct

    with socket.create_connection(("127.0.0.1", limited.grpc_port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + struct.pack(">I", 0)[1:] + b"\x04\x00" + b"\x00" * 4)
        head = b""
        while len(head) < 9:
            head += sock.recv(9 - len(head))
        length, kind = int.from_bytes(head[:3], "big"), head[3]
        assert kind == 4, head   # the server's first frame is its SETTINGS
        body = b""
        while len(body) < length:
            body += sock.recv(length - len(body))
    settings = dict(struct.unpack(">HI", body[i:i + 6]) for i in range(0, length, 6))
    # 0x3: SETTINGS_MAX_CONCURRENT_STREAMS; produce streams hold no slot, so they have room of their own
    assert settings.get(3) == REQUESTS + SUBSCRIPTIONS + PRODUCE_STREAMS_PER_CONNECTION, settings


def test_more_producers_on_one_client_than_its_slots_all_deliver(limited: BrokerProcess, stream: str) -> None:
    """Each Producer holds one produce stream open (no per-client slot): more of them than the
    client's request and subscription slots share its connection."""
    from client import Producer

    with Client(limited.grpc_target, timeout=10) as client:
        producers = [Producer(client, stream, linger_ms=0) for _ in range(REQUESTS + SUBSCRIPTIONS + 2)]
        try:
            first = [p.send(b"first", partition_id=0).result(20) for p in producers]   # every stream open now
            again = [p.send(b"again", partition_id=0).result(20) for p in producers]
        finally:
            for p in producers:
                p.close(10)
    assert all(r.ok for r in first + again), [r.reason for r in first + again if not r.ok]


def test_grpc_subscribe_streams_past_the_limit_are_resource_exhausted(limited: BrokerProcess, stream: str) -> None:
    with Client(limited.grpc_target) as client:
        subs = [client.subscription(stream, 0, "TRIM_HORIZON") for _ in range(SUBSCRIPTIONS)]
        for sub in subs:
            assert next(sub).records
        extra = client.subscription(stream, 0, "TRIM_HORIZON")
        with pytest.raises(SluiceError) as refused:
            next(extra)
        assert refused.value.status is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.reason == "TOO_MANY_REQUESTS" and refused.value.code == "DIS.4303"
        assert client.list_streams().streams is not None   # other calls are not affected
        subs.pop().cancel()

        def reopened() -> bool:
            sub = client.subscription(stream, 0, "TRIM_HORIZON")
            try:
                next(sub)
            except SluiceError as exc:
                assert exc.reason == "TOO_MANY_REQUESTS"
                return False
            subs.append(sub)
            return True

        eventually(reopened, timeout=30)
        for sub in subs:
            sub.cancel()


def test_grpc_calls_in_progress_past_the_limit_are_resource_exhausted(limited: BrokerProcess, stream: str) -> None:
    counted_before = _refusals_counted(limited, "grpc")
    refusals = 0
    with Client(limited.grpc_target) as client:
        cursor = client.get_cursor(stream, 0, "LATEST")
        from client._pb.sluice.v1 import sluice_pb2 as pb
        polls = [client._stub.GetRecords.future(pb.GetRecordsRequest(cursor=cursor, wait_ms=20_000))
                 for _ in range(REQUESTS)]
        try:
            def refused() -> bool:
                nonlocal refusals
                try:
                    client.list_streams()
                except SluiceError as exc:
                    assert exc.status is grpc.StatusCode.RESOURCE_EXHAUSTED and exc.reason == "TOO_MANY_REQUESTS"
                    refusals += 1
                    return True
                return False

            eventually(refused, timeout=30)
            # both long polls answer (the record comes through the HTTP door: its limits are its own)
            conn = http.client.HTTPConnection(limited.host, limited.http_port, timeout=30)
            record = {"data": "d2FrZQ==", "partition_id": "0"}   # b"wake"
            conn.request("POST", "/v2/default/records", headers={"Content-Type": "application/json"},
                         body=json.dumps({"stream_name": stream, "records": [record]}))
            assert conn.getresponse().status == 200
            conn.close()
            for poll in polls:
                assert poll.result(timeout=30).data == [b"wake"]
            polls = []
            eventually(lambda: not refused(), timeout=30)
            # counted as the HTTP doors' refusals are (they were not: the limits sit before the handler's timer)
            assert _refusals_counted(limited, "grpc") - counted_before == refusals >= 1
        finally:
            for poll in polls:
                poll.cancel()


def test_the_official_sdk_reads_the_refusal_of_a_client_over_its_limit(limited: BrokerProcess) -> None:
    """The SDK never reads a 429's body (its callers saw error_code "429" and urllib3's message):
    the DIS door's refusal is a 400 whose DIS code and message the SDK hands over."""
    from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
    from huaweicloudsdkdis.v2 import ListStreamsRequest

    from tests.auth.auth_broker import dis_client

    held = [_connect(limited) for _ in range(CONNECTIONS)]
    try:
        for sock in held:
            assert _get(sock, "/v2/default/streams")[0] == 200
        client = dis_client(limited.http_url, "ak", "sk", "default")   # no --auth-file: signatures unread
        with pytest.raises(ClientRequestException) as refused:   # its connection is one past the limit
            client.list_streams(ListStreamsRequest())
        assert (refused.value.status_code, refused.value.error_code) == (400, "DIS.4303")
        assert "Too many requests" in refused.value.error_msg
    finally:
        for sock in held:
            sock.close()


def test_a_client_leaving_its_long_polls_frees_their_slots_before_their_wait_ends(limited: BrokerProcess,
                                                                                  stream: str) -> None:
    """Long polls (`wait_ms` 20 s, nothing written) hold request slots; a client that closes them
    gets its slots back within seconds, not when the waits run out."""
    with _connect(limited) as sock:
        status, body, _ = _get(sock, f"/v2/default/cursors?stream-name={stream}&partition-id=0&cursor-type=LATEST")
    assert status == 200, body
    polls = [_connect(limited) for _ in range(REQUESTS)]
    for sock in polls:
        sock.sendall(f"GET /v2/default/records?partition-cursor={body['partition_cursor']}&wait_ms=20000 "
                     f"HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())

    def refused() -> bool:   # once the long polls are being handled
        with _connect(limited) as sock:
            status, _, _ = _get(sock, "/v2/default/streams")
        return status == 400

    eventually(refused, timeout=30)
    for sock in polls:
        sock.close()

    def served() -> bool:
        with _connect(limited) as sock:
            return _get(sock, "/v2/default/streams")[0] == 200

    eventually(served, timeout=10)   # the waits end 20 s after they began
