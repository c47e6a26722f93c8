"""Issue 13's "done when": a consumer group whose members use different brokers keeps exclusive
ownership and loses nothing when a member dies - on the 3-node JetStream cluster (R=3) of
tests/cluster/conftest.py with its two brokers.

The crash scenario of tests/e2e/test_consumer_group.py (three group_worker.py processes, a
6-partition stream written continuously, one member SIGKILLed mid-stream; verify_after_crash checks
exclusive ownership by the members' own clocks, every record handled with its payload, in order per
assignment, and duplicates only in the killed member's uncommitted tail), with each member on its
own broker for everything - reads, checkpoints, heartbeats and LeaveGroup: m0 and m2 on broker a,
m1 (the victim) on broker b. The producer writes through b, so the survivors read through a what
was written through b (woken by the cross-broker append notifications), and every partition of the
victim moves to a member of the other broker, resuming after the checkpoint committed through b.
"""
from __future__ import annotations

import pytest

from broker.cluster import SluiceCluster
from client import Client
from tests.e2e.test_consumer_group import PARTITIONS, Member, crash_scenario, members  # noqa: F401


@pytest.mark.slow
def test_group_members_on_both_brokers_keep_exclusive_ownership_through_a_member_crash(
        cluster: SluiceCluster, stream_name: str, members: list[Member]) -> None:
    a, b = cluster.brokers
    with Client(a.grpc_target) as ca:
        ca.create_stream(stream_name, PARTITIONS)   # through a; b learns of it from the catalogue events
    crash_scenario(b.grpc_target, stream_name, members, [(), (), ()], create=False,
                   member_targets=[a.grpc_target, b.grpc_target, a.grpc_target])
