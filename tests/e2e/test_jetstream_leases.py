"""Coordination of several broker processes on one JetStream (`--store jetstream`, one single-node
nats-server, R=1, distinct data dirs, one --nats-prefix), through the store's meta_cas:

* a consumer group whose members use different brokers - each one its own broker for everything:
  reads, checkpoints, heartbeats - keeps exclusive ownership and loses nothing when a member is
  SIGKILLed (the single-broker crash scenario of test_consumer_group.py, with the lease table and
  the checkpoints in the shared store, and the records written through one broker read through
  both: the cross-broker append notifications wake the other's long polls);
* a generator source runs on exactly one broker (the other shows it running elsewhere and writes
  nothing) and moves to the other broker when its holder is SIGKILLed.

tests/cluster/test_consumer_group_cluster.py runs the same group scenario on a 3-node cluster (R=3).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import eventually

from broker.launcher import BrokerProcess
from broker.sources.manager import ELSEWHERE, LEASE_S
from client import Client
from client.errors import NotFound
from tests.e2e.test_consumer_group import PARTITIONS, Member, crash_scenario, members  # noqa: F401
from tests.sources.conftest import NatsServer
from tests.storage.conftest import nats_config


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store", extra=("-c", str(nats_config(tmp_path)))).start()
    yield server
    server.stop()


def js_args(nats: NatsServer) -> tuple[str, ...]:
    return ("--store", "jetstream", "--nats-servers", nats.url, "--replicas", "1", "--nats-prefix", "leases")


@pytest.mark.slow
def test_group_members_on_two_brokers_keep_exclusive_ownership_through_a_crash(
        start_broker: Callable[..., BrokerProcess], nats: NatsServer, tmp_path: Path, stream_name: str,
        members: list[Member]) -> None:
    a = start_broker(*js_args(nats), data_dir=tmp_path / "a")
    with Client(a.grpc_target) as ca:
        ca.create_stream(stream_name, PARTITIONS)
    b = start_broker(*js_args(nats), data_dir=tmp_path / "b")   # b's catalogue has the stream
    # written through a; m0 uses a, m1 (the victim) and m2 use b: the victim's partitions may go to
    # a member of the other broker or of its own
    crash_scenario(a.grpc_target, stream_name, members, [(), (), ()], create=False,
                   member_targets=[a.grpc_target, b.grpc_target, b.grpc_target])


def source_on(c: Client, name: str) -> tuple[str, str, int]:
    """(status, message, rows written by this broker); ("", "", 0) while the broker does not know it."""
    try:
        s = c.describe_source(name)
    except NotFound:
        return "", "", 0
    return s.status, s.message, s.rows_written


@pytest.mark.slow
def test_a_source_runs_on_one_broker_and_moves_when_it_is_killed(
        start_broker: Callable[..., BrokerProcess], nats: NatsServer, tmp_path: Path) -> None:
    a = start_broker(*js_args(nats), data_dir=tmp_path / "a")
    with Client(a.grpc_target) as ca:
        ca.create_stream("gen", 1, data_type="JSON")
    b = start_broker(*js_args(nats), data_dir=tmp_path / "b")   # b's catalogue has the stream
    with Client(a.grpc_target, timeout=10) as ca, Client(b.grpc_target, timeout=10) as cb:
        ca.create_source("g", "stream_generator", "gen", {"template": "iot", "interval": "20ms"})
        # a created it and holds its lease; b learns of it at its next round and leaves it alone
        eventually(lambda: source_on(cb, "g")[1] == ELSEWHERE, timeout=LEASE_S)
        eventually(lambda: source_on(ca, "g")[2] > 20, timeout=10)
        for _ in range(4):
            status_a, message_a, _ = source_on(ca, "g")
            _, message_b, rows_b = source_on(cb, "g")
            assert (status_a, message_a) == ("RUNNING", "") and rows_b == 0 and message_b == ELSEWHERE
            time.sleep(LEASE_S / 8)
        written_by_a = source_on(ca, "g")[2]

        a.kill()   # dies holding the lease: b takes it once it has run out
        killed = time.monotonic()

        def running_on_b() -> bool:
            _, message, rows = source_on(cb, "g")
            return message == "" and rows > 20
        eventually(running_on_b, timeout=LEASE_S * 1.25 + 10)
        moved_s = time.monotonic() - killed
        cb.stop_source("g")
        total = cb.describe_stream("gen").partitions[0].next_seq
        rows_b = source_on(cb, "g")[2]
    print(f"moved after {moved_s:.1f}s (lease {LEASE_S:.0f}s); a wrote >= {written_by_a}, b wrote {rows_b}, "
          f"stream holds {total}")
    assert moved_s >= LEASE_S * 0.5            # not before the dead broker's lease could have run out
    assert total >= written_by_a + rows_b      # (a wrote a few more after the last look)
