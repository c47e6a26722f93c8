"""Issue 13 point 6: the store contract (tests/storage/test_contract.py) and the stateful suite
(tests/storage/test_stateful.py) over a real 3-node nats-server JetStream cluster at R=3, beside
their single-node (R=1) runs in tests/storage.

Every contract test that takes a `store` runs here unchanged, against a JetStreamStore opened
through the broker's registry on every node's URL with `replicas=3` and a prefix of its own per
test (its JetStream streams and KV bucket deleted afterwards); the RocksDB-only part is left out.
The stateful machine drives the same model against a JetStreamStore on the cluster, reopened at
random on the same prefix (a broker restarted on an empty data dir).

The cluster is NATS only (no brokers): a module-scoped broker.cluster.NatsCluster, the same
nodes as `make cluster` and tests/cluster/conftest.py.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from broker.cluster import NatsCluster, nats_server_exe
from broker.settings import Settings
from broker.storage import open_store
from broker.storage.base import Store
from broker.storage.jetstream import JetStreamStore
from tests.storage import test_contract as _contract
from tests.storage.conftest import delete_prefix, delete_prefix_sync, fresh_prefix
from tests.storage.test_stateful import StoresAgree

REPLICAS = 3
# the stateful machine's examples here: 50 as on one node took 95 s at R=3 (every stream created is
# a RAFT group of three, ~0.2 s, every write a quorum round trip); 10 derandomized examples of 30
# steps (~20 s) still create, drop, append, trim and reopen across several streams, and the
# single-node run in tests/storage keeps the 50
R3_EXAMPLES = 10

# every contract test over a `store` (the first part of test_contract.py), collected here with this
# module's `store` fixture
for _name, _test in vars(_contract).items():
    if _name.startswith("test_") and "store" in inspect.signature(_test).parameters:
        globals()[_name] = _test


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    try:
        nats_server_exe()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    made = NatsCluster(tmp_path_factory.mktemp("contract-cluster")).start()
    yield made
    made.stop()


@pytest.fixture
async def store(nats_cluster: NatsCluster, tmp_path: Path) -> AsyncIterator[Store]:
    """A JetStream store on the 3-node cluster, R=3, built through the registry as the broker builds it."""
    prefix = fresh_prefix()
    s = await open_store(Settings(store="jetstream", data_dir=str(tmp_path / "data"),
                                  nats_servers=nats_cluster.servers, nats_prefix=prefix, replicas=REPLICAS))
    yield s
    await s.close()
    await delete_prefix(nats_cluster.urls[0], prefix)


class ClusterAgrees(StoresAgree):
    """The stateful machine over a JetStream store on the 3-node cluster (R=3)."""
    cluster: NatsCluster | None = None   # set by the test below

    def open_other(self) -> Store:
        assert self.cluster is not None
        if not hasattr(self, "prefix"):
            self.prefix = fresh_prefix()
        return self.run(JetStreamStore.open(self.cluster.urls, prefix=self.prefix, replicas=REPLICAS))

    def teardown(self) -> None:
        super().teardown()
        assert self.cluster is not None
        delete_prefix_sync(self.cluster.urls[0], self.prefix)


def test_jetstream_r3_agrees_with_the_model(nats_cluster: NatsCluster) -> None:
    ClusterAgrees.cluster = nats_cluster
    run_state_machine_as_test(ClusterAgrees, settings=settings(max_examples=R3_EXAMPLES, stateful_step_count=30,
                                                               deadline=None, derandomize=True))
