"""TLS end to end (`--tls-cert`, `--tls-key`): a real broker process serving a certificate signed
by a throwaway CA (tests/auth/certs.py); our client (sync and async), the official DIS SDK, the
`timeplus` SDK and plain HTTPS clients connect with the CA file and verify the broker's name.
Plaintext to a TLS port fails cleanly and the broker lives on; a handshake that never comes is
dropped; unusable certificate files stop the broker at startup with one line naming the flag.
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from certs import Certs, make_certs, other_key
from conftest import in_thread_with_deadline
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.launcher import BrokerProcess
from broker.tls import HANDSHAKE_TIMEOUT_S
from client import AsyncClient, BrokerUnavailable, Client, SluiceError

ROOT = Path(__file__).resolve().parents[2]
TP_KEY = "t" * 60   # the timeplus SDK wants 60 characters; the broker has no auth file here


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path_factory.mktemp("tls") / "data", "--tls-cert", str(certs.cert),
                         "--tls-key", str(certs.key), "--tsdb-port", "0").start()
    yield proc
    proc.stop(30)


def https(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


def get_json(url: str, certs: Certs, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=https(certs), timeout=10) as answer:
            raw = answer.read()
            return answer.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


def alive(broker: BrokerProcess, certs: Certs) -> None:
    """Both doors still answer over TLS."""
    assert broker.proc is not None and broker.proc.poll() is None
    with Client(broker.grpc_target, tls_ca=str(certs.ca), timeout=10) as client:
        client.list_streams()
    assert get_json(f"{broker.http_url}/v2/proj1/streams", certs)[0] == 200


def test_ready_line_says_tls_and_the_launcher_uses_https(tls_broker: BrokerProcess) -> None:
    assert tls_broker.tls and tls_broker.http_url.startswith("https://")
    assert " tls=on" in tls_broker.startup_log()[-1]


# -- our client ------------------------------------------------------------------------------------

def test_client_with_the_ca_file_and_with_pem_bytes(tls_broker: BrokerProcess, certs: Certs, stream_name: str) -> None:
    with Client(tls_broker.grpc_target, tls_ca=str(certs.ca)) as client:
        client.create_stream(stream_name, 1)
        assert client.put_records(stream_name, [b"over tls"])[0].ok
        with client.subscription(stream_name, 0, "TRIM_HORIZON") as sub:
            assert [r.data for r in next(sub).records] == [b"over tls"]
    with Client(f"localhost:{tls_broker.grpc_port}", tls_ca=certs.ca.read_bytes()) as by_name:
        assert [r.data for r in by_name.get_records(by_name.get_cursor(stream_name, 0)).records] == [b"over tls"]


def test_async_client_with_the_ca(tls_broker: BrokerProcess, certs: Certs, stream_name: str) -> None:
    async def run() -> list[bytes]:
        async with AsyncClient(tls_broker.grpc_target, tls_ca=certs.ca) as client:
            await client.create_stream(stream_name, 1)
            await client.put_records(stream_name, [b"async tls"])
            sub = client.subscribe(stream_name, 0, "TRIM_HORIZON")
            async with sub:
                page = await sub.__anext__()
            return [r.data for r in page.records]
    assert asyncio.run(run()) == [b"async tls"]


def test_grpc_health_over_tls(tls_broker: BrokerProcess, certs: Certs) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    with grpc.secure_channel(tls_broker.grpc_target, credentials) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_client_refuses_a_broker_its_ca_did_not_sign(tls_broker: BrokerProcess, certs: Certs,
                                                     tmp_path: Path) -> None:
    stranger = make_certs(tmp_path / "other")
    with Client(tls_broker.grpc_target, tls_ca=str(stranger.ca), timeout=5) as client:
        with pytest.raises(BrokerUnavailable):
            client.list_streams()
    alive(tls_broker, certs)


def test_the_cli_says_what_a_tls_mismatch_means(tls_broker: BrokerProcess, broker: BrokerProcess, certs: Certs,
                                                tmp_path: Path) -> None:
    """grpc's words ("Socket closed", CERTIFICATE_VERIFY_FAILED, ALPN) get a hint in ours."""
    from tests.test_cli import sluice  # its command line (the venv's console script)
    stranger = make_certs(tmp_path / "other")
    for target, options, hint in (
            (tls_broker.grpc_target, [], "if the broker serves TLS, give --tls-ca FILE"),
            (tls_broker.grpc_target, ["--tls-ca", str(stranger.ca)], f"--tls-ca {stranger.ca} did not sign"),
            (broker.grpc_target, ["--tls-ca", str(certs.ca)], "this port does not serve gRPC over TLS")):
        result = sluice(*options, "streams", "list", target=target)
        assert result.returncode == 3 and hint in result.stderr, (options, result.stderr)
    assert sluice("--tls-ca", str(certs.ca), "streams", "list", target=tls_broker.grpc_target).returncode == 0


def test_client_tls_ca_that_is_not_a_certificate(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="no PEM certificate"):
        Client("127.0.0.1:1", tls_ca=str(tmp_path / "junk.pem"))
    with pytest.raises(OSError):
        Client("127.0.0.1:1", tls_ca=str(tmp_path / "missing.pem"))


def test_cli_with_tls_ca(tls_broker: BrokerProcess, certs: Certs, stream_name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    base = [sys.executable, "-m", "client.cli", "--target", tls_broker.grpc_target]

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**env, **extra})
    made = cli("--tls-ca", str(certs.ca), "streams", "create", stream_name)
    assert made.returncode == 0, made.stderr
    listed = cli("streams", "list", SLUICE_TLS_CA=str(certs.ca))
    assert listed.returncode == 0 and stream_name in listed.stdout.split()
    missing = cli("--tls-ca", str(tmp_path / "nope.pem"), "streams", "list")
    assert missing.returncode == 2 and "--tls-ca" in missing.stderr
    plaintext = cli("streams", "list")   # no CA: plaintext to a TLS port
    assert plaintext.returncode == 3, plaintext.stderr


# -- the SDKs --------------------------------------------------------------------------------------

def test_official_dis_sdk_over_https_with_the_ca(tls_broker: BrokerProcess, certs: Certs) -> None:
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkdis.v2 import (
        ConsumeRecordsRequest,
        CreateStreamReq,
        CreateStreamRequest,
        DisClient,
        PutRecordsRequest,
        PutRecordsRequestEntry,
        SendRecordsRequest,
        ShowCursorRequest,
    )

    config = HttpConfig.get_default_config()
    config.retry_times = 0
    config.timeout = (5, 30)
    config.ssl_ca_cert = str(certs.ca)   # verified against our CA, not skipped
    client = (DisClient.new_builder().with_http_config(config)
              .with_credentials(BasicCredentials("AKTEST", "SKTEST", "proj1"))
              .with_endpoints([tls_broker.http_url]).build())
    name = f"dis{uuid.uuid4().hex[:8]}"
    client.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=name, partition_count=1)))
    sent = client.send_records(SendRecordsRequest(body=PutRecordsRequest(
        stream_name=name, records=[PutRecordsRequestEntry(data=base64.b64encode(b"dis over https").decode())])))
    assert sent.failed_record_count == 0
    cursor = client.show_cursor(ShowCursorRequest(stream_name=name, partition_id="0",
                                                  cursor_type="TRIM_HORIZON")).partition_cursor
    records = client.consume_records(ConsumeRecordsRequest(partition_cursor=cursor)).records
    assert [base64.b64decode(r.data) for r in records] == [b"dis over https"]


def test_timeplus_sdk_over_https_with_the_ca(tls_broker: BrokerProcess, certs: Certs) -> None:
    from timeplus import Environment, Query, Stream

    env = Environment().address(tls_broker.http_url).apikey(TP_KEY).workspace(f"ws{uuid.uuid4().hex[:8]}")
    env._conf().ssl_ca_cert = str(certs.ca)   # the swagger Configuration under the SDK's Environment
    name = f"tp_{uuid.uuid4().hex[:8]}"

    def ingest_and_query() -> list[Any]:
        Stream(env).name(name).column("msg", "string").create()
        Stream(env).name(name).ingest(["msg"], [["hello over https"]])
        assert name in [s.name for s in Stream(env).list()]
        query = Query(env).sql(f"select msg from table({name})")
        query.create()
        rows: list[Any] = []
        for event in query.result():   # SSE over TLS; a bounded query ends by itself
            if event.event == "message":
                rows.extend(json.loads(event.data))
        return rows
    assert in_thread_with_deadline(ingest_and_query) == [["hello over https"]]


def test_tsdb_port_serves_https_too(tls_broker: BrokerProcess, certs: Certs) -> None:
    assert tls_broker.tsdb_port is not None
    url = f"https://{tls_broker.host}:{tls_broker.tsdb_port}/api/put"
    status, _ = get_json(url, certs, [{"metric": "tls.test", "timestamp": int(time.time()), "value": 1,
                                       "tags": {"host": "a"}}])
    assert status == 204


# -- plaintext and stalled clients ---------------------------------------------------------------

def test_plain_http_to_the_https_port_fails_cleanly(tls_broker: BrokerProcess, certs: Certs) -> None:
    for port in (tls_broker.http_port, tls_broker.tsdb_port):
        conn = http.client.HTTPConnection(tls_broker.host, port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/v2/proj1/streams")
            conn.getresponse().read()
        conn.close()
    with grpc.insecure_channel(tls_broker.grpc_target) as channel:   # plaintext gRPC to the TLS port
        with pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    with Client(tls_broker.grpc_target, timeout=3) as plain:
        with pytest.raises(SluiceError):
            plain.list_streams()
    alive(tls_broker, certs)


@pytest.mark.slow
def test_a_handshake_that_never_comes_is_dropped(tls_broker: BrokerProcess, certs: Certs) -> None:
    """Connect and send nothing: each door closes the connection after its handshake timeout."""
    ports = (tls_broker.http_port, tls_broker.tsdb_port, tls_broker.grpc_port)
    silent = [socket.create_connection((tls_broker.host, port), timeout=10) for port in ports]
    try:
        begun = time.monotonic()
        for sock in silent:
            sock.settimeout(max(HANDSHAKE_TIMEOUT_S * 4 - (time.monotonic() - begun), 1))
            try:
                assert sock.recv(1024) == b""   # closed by the broker, not by our timeout
            except ConnectionResetError:
                pass
    finally:
        for sock in silent:
            sock.close()
    alive(tls_broker, certs)


def test_connections_in_their_handshake_count_against_the_client_s_limit(tmp_path: Path, certs: Certs) -> None:
    """asyncio's TLS server hands a connection to the HTTP handler, which counts it against
    --max-connections-per-client, only once its handshake is done: a client holding connections
    that never finish one was counted for none of them (any number, 10 s each, where a plain port
    closes them past twice the limit) and was served beside them. They count from their accept
    now: with the limit's worth held, the client's next connection is answered 429; past twice the
    limit one is closed unanswered."""
    broker = BrokerProcess(tmp_path / "data", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
                           "--max-connections-per-client", "2").start()
    silent: list[socket.socket] = []
    try:
        for _ in range(2):   # the limit's worth, each in its handshake for as long as it stays silent
            silent.append(socket.create_connection((broker.host, broker.http_port), timeout=10))
        status, _ = get_json(f"{broker.http_url}/v2/proj1/streams", certs)
        assert status == 400, status   # the DIS door's TOO_MANY_REQUESTS (its SDK reads no 429 body)
        for _ in range(2):
            silent.append(socket.create_connection((broker.host, broker.http_port), timeout=10))
        flooded = socket.create_connection((broker.host, broker.http_port), timeout=10)   # the fifth: a flood
        with flooded:
            try:
                assert flooded.recv(1024) == b""   # closed by the broker at once
            except ConnectionResetError:
                pass
    finally:
        for sock in silent:
            sock.close()
        broker.stop(15)


# -- startup errors --------------------------------------------------------------------------------

def start_error(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run([sys.executable, "-m", "broker", "--data-dir", str(tmp_path / "data"), "--grpc-port", "0",
                           "--http-port", "0", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_unusable_tls_files_stop_the_broker_with_one_line(tmp_path: Path, certs: Certs) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not pem at all\n")
    cases = [
        (("--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(certs.key)), "--tls-cert"),
        (("--tls-cert", str(certs.cert), "--tls-key", str(tmp_path / "missing.key")), "--tls-key"),
        (("--tls-cert", str(junk), "--tls-key", str(certs.key)), "--tls-cert"),
        (("--tls-cert", str(certs.cert), "--tls-key", str(junk)), "--tls-key"),
        (("--tls-cert", str(certs.cert), "--tls-key", str(other_key(tmp_path / "other.key"))), "--tls-key"),
        (("--tls-cert", str(certs.key), "--tls-key", str(certs.cert)), "--tls-cert"),
    ]
    for args, flag in cases:
        result = start_error(tmp_path, *args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sluice-broker: error: "), result.stderr
        assert flag in lines[0] and "Traceback" not in result.stderr
        assert "sluice ready" not in result.stdout
    assert not (tmp_path / "data").exists()   # refused before the data dir was touched


def test_an_encrypted_key_is_refused_not_prompted_for(tmp_path: Path, certs: Certs) -> None:
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(certs.key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    result = start_error(tmp_path, "--tls-cert", str(certs.cert), "--tls-key", str(locked))
    assert result.returncode == 1 and "encrypted" in result.stderr and "--tls-key" in result.stderr
