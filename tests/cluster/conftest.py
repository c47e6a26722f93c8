"""The 3-node cluster harness (issue 13): a real 3-node `nats-server` JetStream cluster on loopback
(ports and store dirs of its own) and two brokers over it (`--store jetstream --replicas 3`, data
dirs of their own), built by broker/cluster.py - the same code as `make cluster`. Module-scoped:
one cluster per test module; a test that kills a node or a broker brings it back before it ends."""
from __future__ import annotations

from typing import Iterator

import pytest

from broker.cluster import ClusterBroker, SluiceCluster, nats_server_exe


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceCluster]:
    try:
        nats_server_exe()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    made = SluiceCluster(tmp_path_factory.mktemp("cluster"), prefix="ct").start()
    yield made
    made.stop()


@pytest.fixture(scope="module", params=["a", "b"])
def broker(request: pytest.FixtureRequest, cluster: SluiceCluster) -> ClusterBroker:
    """Overrides the e2e suite's broker: each test that uses it runs through broker a, then broker b."""
    return cluster.brokers[0] if request.param == "a" else cluster.brokers[1]
