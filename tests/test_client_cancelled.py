"""A call the broker cancels is the broker going away, not a fatal error.

grpc core answers CANCELLED to calls it had received but not yet handed to the broker when a
stop's grace runs out (broker/app.py). A consumer-group member whose heartbeat met that stopped
for good (CI caught it in test_group_keeps_its_assignment_through_a_broker_restart). Here a real
gRPC server on loopback cancels calls on purpose (`context.cancel()`: on the wire the same
CANCELLED status, no ErrorInfo), so the case is deterministic."""
from __future__ import annotations

import asyncio
import threading
from concurrent import futures
from typing import Any, Iterator

import grpc
import pytest
from conftest import eventually

from client import AsyncClient, Client, GroupConsumer
from client._pb.sluice.v1 import sluice_pb2 as pb
from client._pb.sluice.v1 import sluice_pb2_grpc as pb_grpc
from client.errors import BrokerUnavailable


class _Cancelling(pb_grpc.SluiceServicer):
    """Cancels the first `cancel` heartbeats, then answers them (no partitions, the asked-for lease)."""

    def __init__(self, cancel: int) -> None:
        self.cancel = cancel
        self.answered = 0
        self.lock = threading.Lock()

    def CreateApp(self, request: Any, context: Any) -> Any:
        return pb.CreateAppResponse()

    def LeaveGroup(self, request: Any, context: Any) -> Any:
        return pb.LeaveGroupResponse()

    def Heartbeat(self, request: Any, context: Any) -> Any:
        with self.lock:
            if self.cancel > 0:
                self.cancel -= 1
                context.cancel()
                return pb.HeartbeatResponse()
            self.answered += 1
        return pb.HeartbeatResponse(partition_ids=[], lease_ms=request.lease_ms)


@pytest.fixture
def cancelling() -> Iterator[tuple[_Cancelling, str]]:
    servicer = _Cancelling(cancel=2)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_SluiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_a_cancelled_call_is_broker_unavailable_and_retriable(cancelling: tuple[_Cancelling, str]) -> None:
    _, target = cancelling
    with Client(target, timeout=5) as c:
        with pytest.raises(BrokerUnavailable) as caught:
            c.heartbeat("app", "s", "m", held=[], lease_ms=3000)
        assert (caught.value.status, caught.value.reason, caught.value.retriable) == \
            (grpc.StatusCode.CANCELLED, "CANCELLED", True)

    async def aio() -> None:
        async with AsyncClient(target, timeout=5) as c:
            with pytest.raises(BrokerUnavailable) as caught:
                await c.heartbeat("app", "s", "m", held=[], lease_ms=3000)
            assert caught.value.retriable
            await c.heartbeat("app", "s", "m", held=[], lease_ms=3000)   # the third call is answered
    asyncio.run(aio())


def test_a_group_member_keeps_going_when_the_broker_cancels_a_heartbeat(
        cancelling: tuple[_Cancelling, str]) -> None:
    servicer, target = cancelling
    member = GroupConsumer(target, "app", "s", lambda p, r: None, member_id="a", lease_ms=3000)
    member.start()
    try:
        eventually(lambda: servicer.answered >= 2 or member.error is not None, timeout=15)
        assert member.error is None
        assert servicer.cancel == 0
    finally:
        member.stop()


def test_a_subscription_the_broker_cancels_raises_unless_the_client_was_closed() -> None:
    """Client.subscribe ended quietly on any CANCELLED, so a broker's stop looked like the end."""
    release = threading.Event()

    class Subscribing(pb_grpc.SluiceServicer):
        def Subscribe(self, request: Any, context: Any) -> Any:
            yield pb.SubscribeResponse(records=pb.RecordBatch(seqs=[0], timestamps_ms=[1], data=[b"a"],
                                                              partition_keys=["k"], next_cursor="c"))
            if request.stream_name == "cancelled":
                context.cancel()
            else:
                release.wait(10)

    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_SluiceServicer_to_server(Subscribing(), server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        with Client(target, timeout=5) as c:
            pages = c.subscribe("cancelled", 0, "TRIM_HORIZON")
            assert [r.data for r in next(pages).records] == [b"a"]
            with pytest.raises(BrokerUnavailable):
                next(pages)
        c = Client(target, timeout=5)
        pages = c.subscribe("open", 0, "TRIM_HORIZON")
        assert [r.data for r in next(pages).records] == [b"a"]
        threading.Timer(0.2, c.close).start()
        assert list(pages) == []   # closing the client ends it quietly
    finally:
        release.set()
        server.stop(0)
