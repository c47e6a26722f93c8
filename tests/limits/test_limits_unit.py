"""The per-client counters of broker/api/limits.py alone."""
from __future__ import annotations

from typing import Any

import pytest

from broker.api.limits import ClientLimits, PeerCounter, Slot, grpc_peer
from broker.errors import ErrorCode


def test_a_counter_refuses_past_its_limit_per_peer_and_forgets_empty_peers() -> None:
    c = PeerCounter(2, "things")
    assert c.try_enter("a") and c.try_enter("a") and not c.try_enter("a")
    assert c.try_enter("b")
    c.leave("a")
    assert c.try_enter("a")
    for peer in ("a", "a", "b"):
        c.leave(peer)
    assert c.held("a") == c.held("b") == 0 and not c._held
    error = c.refusal()
    assert error.code is ErrorCode.TOO_MANY_REQUESTS and "at most 2 things" in error.message


def test_a_slot_is_released_once() -> None:
    c = PeerCounter(1, "things")
    assert c.try_enter("a")
    slot = Slot(c, "a")
    slot.release()
    slot.release()
    assert c.held("a") == 0
    assert ClientLimits.of(1, 2, 3).requests.limit == 2


class _Context:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize("peer, ip", [("ipv4:127.0.0.1:50000", "127.0.0.1"), ("ipv6:[::1]:50000", "::1"),
                                      ("unix:/tmp/s", "unix:/tmp/s")])
def test_grpc_peers_are_addresses_without_ports(peer: str, ip: str) -> None:
    context: Any = _Context(peer)
    assert grpc_peer(context) == ip
