"""Silent and slow clients on every port of a real broker with short timeouts (`--idle-timeout 2
--body-timeout 2`): a client that connects and sends nothing, or half a request head, or half a
body, or never reads its answer, is closed (or answered 408) within a bounded time, and other
clients are served meanwhile. Bounds are generous (tens of seconds): what is checked is that the
broker does close, not how fast.

Where each bound comes from: HTTP ports - aiohttp's keep-alive timer, armed when a connection is
made (so also before the first request) and not extended by bytes of an unfinished head
(`--idle-timeout`); bodies - http.read_body (`--body-timeout`, 408); answers not read -
http_app._RequestHandler.finish_response and http.write_or_drop (`--idle-timeout`); gRPC - grpc
core's handshake timeout (`grpc.server_handshake_timeout_ms`, 10 s: tls.HANDSHAKE_TIMEOUT_S, also
the TLS handshake) and `grpc.max_connection_idle_ms` for a connection that carries no call.
"""
from __future__ import annotations

import http.client
import re
import socket
import time
import uuid
from typing import Iterator

import pytest

from broker.launcher import BrokerProcess
from client import Client
from tests.conftest import eventually

BOUND = 30.0   # seconds: far above the 2 s timeouts, so a loaded machine does not fail the test


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path_factory.mktemp("timeouts") / "data", "--store", "memory", "--idle-timeout", "2",
                         "--body-timeout", "2", "--tsdb-port", "0").start()
    yield proc
    proc.stop(30)


def _closed(sock: socket.socket, seconds: float = BOUND, until_head: bool = False) -> tuple[bool, bytes]:
    """Read until the peer closes (or, `until_head`, an answer's head is in) or `seconds` pass:
    (closed or answered, what was received)."""
    deadline = time.monotonic() + seconds
    data = b""
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
        if until_head and b"\r\n\r\n" in data:
            return True, data
    return False, data


def _served(proc: BrokerProcess, port: int, path: str) -> int:
    conn = http.client.HTTPConnection(proc.host, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _ports(proc: BrokerProcess) -> dict[str, tuple[int, str]]:
    assert proc.tsdb_port is not None
    return {"http": (proc.http_port, "/v2/default/streams"),
            "tsdb": (proc.tsdb_port, "/api/suggest?type=metrics")}


HALF_HEAD = b"GET /v2/default/streams HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.mark.parametrize("door", ["http", "tsdb"])
@pytest.mark.parametrize("sent", [b"", HALF_HEAD], ids=["nothing", "half-head"])
def test_a_silent_http_client_is_closed_while_others_are_served(impatient: BrokerProcess, door: str,
                                                                 sent: bytes) -> None:
    port, path = _ports(impatient)[door]
    with socket.create_connection((impatient.host, port), timeout=10) as silent:
        silent.sendall(sent)
        assert _served(impatient, port, path) == 200
        closed, data = _closed(silent)
    assert closed and not data.startswith(b"HTTP/1.1 5")


@pytest.mark.parametrize("door", ["http", "tsdb"])
def test_half_a_body_gets_408_within_the_body_timeout(impatient: BrokerProcess, door: str) -> None:
    """The Timeplus ingest on the HTTP port, the OpenTSDB put on its own port."""
    port, _ = _ports(impatient)[door]
    path = "/api/put"
    if door == "http":
        name = f"s{uuid.uuid4().hex[:8]}"
        conn = http.client.HTTPConnection(impatient.host, port, timeout=10)
        conn.request("POST", "/default/api/v1beta2/streams", headers={"Content-Type": "application/json"},
                     body=f'{{"name": "{name}", "columns": [{{"name": "v", "type": "int64"}}]}}')
        assert conn.getresponse().status == 201
        conn.close()
        path = f"/default/api/v1beta2/streams/{name}/ingest"
    with socket.create_connection((impatient.host, port), timeout=BOUND) as slow:
        slow.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 1000\r\n\r\n[{{".encode())
        answered, data = _closed(slow, until_head=True)
    assert answered
    assert not data or data.split(b" ", 2)[1] == b"408", data[:200]   # 408, or closed without an answer


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="reads the TCP state from TCP_INFO (Linux)")
def test_a_client_that_never_reads_its_answer_is_dropped(impatient: BrokerProcess) -> None:
    name = f"s{uuid.uuid4().hex[:8]}"
    with Client(impatient.grpc_target) as client:
        client.create_stream(name, 1)
        for _ in range(12):   # 12 MiB, more than the socket buffers hold
            client.put_records(name, [b"x" * (256 * 1024)] * 4, partition_id=0)
        cursor = client.get_cursor(name, 0, "TRIM_HORIZON")
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect((impatient.host, impatient.http_port))
    try:
        reader.sendall(f"GET /v2/default/records?partition-cursor={cursor}&max_fetch_bytes=10485760 HTTP/1.1\r\n"
                       f"Host: 127.0.0.1\r\n\r\n".encode())
        # never read: the broker's write waits, then gives up and resets the connection
        eventually(lambda: _tcp_state(reader) == TCP_CLOSE, timeout=BOUND)
        assert _served(impatient, impatient.http_port, "/v2/default/streams") == 200
    finally:
        reader.close()


TCP_CLOSE = 7   # linux/tcp_states.h


def _tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of a socket (the first byte of TCP_INFO)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


@pytest.mark.parametrize("sent", [b"", b"PRI * HTTP/2.0\r\n"], ids=["nothing", "half-preface"])
def test_a_silent_grpc_client_is_closed_while_others_are_served(impatient: BrokerProcess, sent: bytes) -> None:
    with socket.create_connection((impatient.host, impatient.grpc_port), timeout=10) as silent:
        silent.sendall(sent)
        with Client(impatient.grpc_target) as client:
            assert client.list_streams().streams is not None
        closed, _ = _closed(silent)
    assert closed



def _bad_bodies(proc: BrokerProcess) -> float:
    conn = http.client.HTTPConnection(proc.host, proc.http_port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = re.search(r'^sluice_request_errors_total\{door="dis",reason="BAD_BODY"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_a_client_gone_mid_body_is_a_client_error_not_a_logged_traceback(impatient: BrokerProcess, how: str) -> None:
    """A client that closes its connection (or only its sending side) partway through a body is
    counted as BAD_BODY; nothing is logged as an unhandled error (anyone could fill the log)."""
    logged, before = len(impatient.stderr_lines), _bad_bodies(impatient)
    with socket.create_connection((impatient.host, impatient.http_port), timeout=10) as gone:
        gone.sendall(b"POST /v2/default/records HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"st")
        if how == "shutdown":
            gone.shutdown(socket.SHUT_WR)
            _closed(gone)
    eventually(lambda: _bad_bodies(impatient) == before + 1, timeout=BOUND)
    assert not [line for line in impatient.stderr_lines[logged:] if "ERROR" in line or "Traceback" in line], \
        impatient.stderr_lines[logged:]
