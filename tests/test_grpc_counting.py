"""broker/api/grpc_service.py's `rpc` wrapper counts a refused call before its status leaves.

grpc.aio's `context.abort` sends the status and only then raises, so a client holds its error
while the handler has not resumed; a client that read /metrics right away (tests/e2e/test_metrics.py,
once in a CI run) found its call not counted yet."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from broker.api.grpc_service import rpc
from broker.auth.roles import Action
from broker.core.stats import BrokerStats
from broker.errors import ErrorCode, client_error


class _Aborted(Exception):
    """What grpc.aio raises out of abort(), after the status was sent."""


class _Context:
    def __init__(self, stats: BrokerStats) -> None:
        self.stats = stats
        self.seen_at_abort: Counter[tuple[str, str]] | None = None
        self.calls_at_abort = -1

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: Any, details: str, trailing_metadata: Any = None) -> None:
        # the status is on its way to the client now: what it would scrape next is this
        self.seen_at_abort = Counter(self.stats.request_errors)
        self.calls_at_abort = sum(h.count for h in self.stats.requests.values())
        raise _Aborted(details)


def _servicer() -> Any:
    return SimpleNamespace(_broker=SimpleNamespace(stats=BrokerStats()), _active=0, _draining=False, _auth=None,
                           _last_activity=0.0)


@pytest.mark.parametrize("observe", [True, False])
async def test_a_refused_call_is_counted_before_its_status_is_sent(observe: bool) -> None:
    async def describe_stream(self: Any, request: Any, context: Any, project: str) -> Any:
        raise client_error(ErrorCode.STREAM_NOT_FOUND, stream="nope")
    wrapped = rpc(Action.DESCRIBE, observe=observe)(describe_stream)   # type: ignore[arg-type]
    servicer = _servicer()
    stats: BrokerStats = servicer._broker.stats
    context = _Context(stats)
    with pytest.raises(_Aborted):
        await wrapped(servicer, object(), context)
    assert context.seen_at_abort == {("grpc", "STREAM_NOT_FOUND"): 1}
    assert context.calls_at_abort == (1 if observe else 0)
    # once, not again as the abort's exception passes the wrapper
    assert stats.request_errors == {("grpc", "STREAM_NOT_FOUND"): 1}
    assert sum(h.count for h in stats.requests.values()) == (1 if observe else 0)
    assert servicer._active == 0


async def test_an_answered_call_is_counted_once_without_an_error() -> None:
    async def list_streams(self: Any, request: Any, context: Any, project: str) -> Any:
        return "answer"
    wrapped = rpc(Action.DESCRIBE)(list_streams)   # type: ignore[arg-type]
    servicer = _servicer()
    stats: BrokerStats = servicer._broker.stats
    assert await wrapped(servicer, object(), _Context(stats)) == "answer"
    assert not stats.request_errors and sum(h.count for h in stats.requests.values()) == 1

