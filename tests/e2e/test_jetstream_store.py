"""A broker process with `--store jetstream` on a real single-node nats-server (R=1): records,
apps, checkpoints and cursors written through one broker are all there when another broker starts
on an EMPTY data dir against the same NATS; numbering goes on where it stopped. And a NATS the
broker cannot use is one error line at startup."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from huaweicloudsdkdis.v2 import (
    ConsumeRecordsRequest,
    CreateStreamReq,
    CreateStreamRequest,
    PutRecordsRequest,
    PutRecordsRequestEntry,
    SendRecordsRequest,
    ShowCursorRequest,
)

from broker.launcher import BrokerProcess
from broker.storage.jetstream import FIRST_CONNECT_S
from client import Client
from tests.conftest import make_dis_client
from tests.sources.conftest import NatsServer, free_port
from tests.storage.conftest import nats_config


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store", extra=("-c", str(nats_config(tmp_path)))).start()
    yield server
    server.stop()


def read_all(client: Client, stream: str, partition: int) -> list[tuple[int, bytes, str | None]]:
    cursor = client.get_cursor(stream, partition, "TRIM_HORIZON")
    out: list[tuple[int, bytes, str | None]] = []
    while True:
        page = client.get_records(cursor, limit=7)   # several pages: cursors cross messages
        out += [(r.seq, r.data, r.partition_key) for r in page.records]
        if not page.records:
            return out
        cursor = page.next_cursor


def test_a_broker_restarted_on_an_empty_data_dir_serves_everything(
        start_broker: Callable[..., BrokerProcess], nats: NatsServer, tmp_path: Path) -> None:
    args = ("--store", "jetstream", "--nats-servers", nats.url, "--replicas", "1", "--nats-prefix", "e2e")
    first = start_broker(*args, data_dir=tmp_path / "first")

    dis = make_dis_client(first.http_url)
    dis.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name="orders", partition_count=3)))
    sent = dis.send_records(SendRecordsRequest(body=PutRecordsRequest(stream_name="orders", records=[
        PutRecordsRequestEntry(data=base64.b64encode(b"dis-%d" % i).decode(), partition_key=f"k{i % 5}")
        for i in range(30)])))
    assert sent.failed_record_count == 0
    expected: dict[int, list[tuple[int, bytes, str | None]]] = {0: [], 1: [], 2: []}
    for i, rec in enumerate(sent.records):
        partition = int(rec.partition_id.rsplit("-", 1)[-1])
        expected[partition].append((int(rec.sequence_number), b"dis-%d" % i, f"k{i % 5}"))

    with Client(first.grpc_target, project="proj1") as c:
        for round_ in range(5):
            for r, i in zip(c.put_records("orders", [b"grpc-%d-%d" % (round_, i) for i in range(10)], partition_id=1),
                            range(10)):
                assert not r.reason, r
                expected[1].append((r.seq, b"grpc-%d-%d" % (round_, i), None))
        c.create_app("billing")
        c.commit_checkpoint("billing", "orders", 1, 12)
        page = c.get_records(c.get_cursor("orders", 1, "AT_SEQUENCE_NUMBER", starting_seq=3), limit=2)
        cursor_from_first = page.next_cursor
        for p in range(3):
            assert read_all(c, "orders", p) == sorted(expected[p])
    first.stop()

    second_dir = tmp_path / "second"
    second = start_broker(*args, data_dir=second_dir)   # nothing of the first broker's data dir
    with Client(second.grpc_target, project="proj1") as c:
        assert c.list_streams().stream_names == ["orders"]
        for p in range(3):
            got = read_all(c, "orders", p)
            assert got == sorted(expected[p])
            assert [seq for seq, _, _ in got] == list(range(len(got)))            # gap-free from 0
        assert c.get_checkpoint("billing", "orders", 1).seq == 12                 # apps and checkpoints
        assert [r.seq for r in c.get_records(cursor_from_first, limit=3).records] == [5, 6, 7]   # its cursor too
        (more,) = c.put_records("orders", [b"after"], partition_id=1)
        assert more.seq == len(expected[1])                                        # numbering goes on
    dis = make_dis_client(second.http_url)
    cursor = dis.show_cursor(ShowCursorRequest(stream_name="orders", partition_id="shardId-0000000002",
                                               cursor_type="TRIM_HORIZON")).partition_cursor
    records = dis.consume_records(ConsumeRecordsRequest(partition_cursor=cursor, max_fetch_bytes=1 << 20)).records
    assert [base64.b64decode(r.data) for r in records] == [data for _, data, _ in sorted(expected[2])]


def broker_fails(tmp_path: Path, *args: str) -> str:
    """Start `python -m broker --store jetstream ...args`; it must exit 1 without a traceback: its last line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    out = subprocess.run([sys.executable, "-m", "broker", "--store", "jetstream", "--data-dir", str(tmp_path / "d"),
                          "--grpc-port", "0", "--http-port", "0", *args], capture_output=True, text=True, timeout=60,
                         env=env, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 1 and "Traceback" not in out.stderr and "sluice ready" not in out.stdout, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("sluice-broker: error: "), out.stderr
    return last


def test_unreachable_nats_servers_are_one_error_line(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"   # nothing listens there
    last = broker_fails(tmp_path, "--nats-servers", url)
    assert f"cannot open the JetStream store on {url}" in last and "cannot connect" in last, last


def test_a_nats_token_is_not_in_the_error_line(tmp_path: Path) -> None:
    """`nats://TOKEN@host` is NATS's token form (nats-py sends the user of a URL without a
    password as the auth_token): masked in the startup error as a password is."""
    port = free_port()   # nothing listens there
    last = broker_fails(tmp_path, "--nats-servers", f"nats://S3CRETTOKEN@127.0.0.1:{port},nats://u:PW@127.0.0.1:{port}")
    assert "S3CRETTOKEN" not in last and "PW" not in last, last
    assert f"nats://***@127.0.0.1:{port},nats://u:***@127.0.0.1:{port}" in last, last


def test_replicas_above_the_cluster_are_one_error_line(nats: NatsServer, tmp_path: Path) -> None:
    last = broker_fails(tmp_path, "--nats-servers", nats.url, "--replicas", "3")
    assert "3 replicas" in last and "non-clustered" in last, last


def test_a_broker_reaches_jetstream_over_tls_with_a_user_and_password(
        start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    """`--nats-tls-ca` with a nats-server that requires TLS (a throwaway CA) and a user/password in
    the `--nats-servers` URL: the broker works; without the CA, or with a wrong password, it is
    one startup error line (the unknown CA at once)."""
    from tests.auth.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    conf = tmp_path / "nats-tls.conf"
    conf.write_text(f'max_payload: 8MB\ntls {{\n  cert_file: "{certs.cert}"\n  key_file: "{certs.key}"\n}}\n'
                    'authorization {\n  user: sluice\n  password: "s3cret-pass"\n}\n')
    server = NatsServer(tmp_path / "nats-store", extra=("-c", str(conf))).start()
    try:
        url = f"nats://sluice:s3cret-pass@127.0.0.1:{server.port}"
        broker = start_broker("--store", "jetstream", "--nats-servers", url, "--replicas", "1",
                              "--nats-tls-ca", str(certs.ca), data_dir=tmp_path / "b")
        with Client(broker.grpc_target) as c:
            c.create_stream("tls", 1)
            assert [r.seq for r in c.put_records("tls", [b"a", b"b"], partition_id=0)] == [0, 1]
            assert [data for _, data, _ in read_all(c, "tls", 0)] == [b"a", b"b"]
        broker.stop()

        began = time.monotonic()
        no_ca = broker_fails(tmp_path / "no-ca", "--nats-servers", url, "--replicas", "1")
        assert "cannot connect" in no_ca and "CERTIFICATE_VERIFY_FAILED" in no_ca, no_ca
        # at once, not after the first connection's whole bound (nats-py would retry a refused
        # handshake for ever): generous for a busy machine
        assert time.monotonic() - began < FIRST_CONNECT_S * 0.75
        assert "s3cret-pass" not in no_ca and "sluice:***@" in no_ca, no_ca
        wrong = broker_fails(tmp_path / "wrong", "--nats-servers", url.replace("s3cret-pass", "nope"),
                             "--replicas", "1", "--nats-tls-ca", str(certs.ca))
        assert "cannot connect" in wrong and "nope" not in wrong, wrong
    finally:
        server.stop()


def test_a_reconnect_to_nats_logs_no_password(start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    """The broker logs where it reconnected to after NATS comes back: the URL's host, never the
    user's password (or a token) of `--nats-servers` (nats-py's connected_url holds them both)."""
    conf = tmp_path / "nats-auth.conf"
    conf.write_text('max_payload: 8MB\nauthorization {\n  user: sluice\n  password: "s3cret-pass"\n}\n')
    server = NatsServer(tmp_path / "nats-store", extra=("-c", str(conf))).start()
    try:
        url = f"nats://sluice:s3cret-pass@127.0.0.1:{server.port}"
        broker = start_broker("--store", "jetstream", "--nats-servers", url, "--replicas", "1",
                              data_dir=tmp_path / "b")
        with Client(broker.grpc_target) as c:
            c.create_stream("before", 1)
        server.stop()
        server.start()
        deadline = time.monotonic() + 30
        while not any("reconnected" in line or "a new connection" in line for line in broker.stderr_lines):
            assert time.monotonic() < deadline, broker.stderr_lines[-20:]
            time.sleep(0.2)
        told = "\n".join(line for line in broker.stderr_lines if "NATS" in line)
        assert "s3cret-pass" not in told, told
        assert f"127.0.0.1:{server.port}" in told, told
    finally:
        server.stop()
