"""Helpers for driving the Timeplus door with the unmodified `timeplus` SDK (shared/spec/timeplus-api.md).

The SDK sets no timeouts and `Query.create()` blocks until the first SSE event, so every query here
runs on a daemon thread and the test waits for it with a deadline: a door bug fails the test, it
never hangs the suite. Management calls (get/cancel/delete) use a fresh `Query(env).id(qid)` each
time (spec section 9: `Query.get()` breaks the object it is called on).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import pytest
from conftest import in_thread_with_deadline as _in_thread
from timeplus import Environment, Query, Stream

API_KEY = "k" * 60          # the SDK refuses any key that is not exactly 60 characters
DEADLINE = 30.0             # seconds any single SDK wait may take before the test fails


def new_name(prefix: str = "s") -> str:
    """A Timeplus-legal name: letters, digits and `_`, starting with a letter."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def env_for(http_url: str, workspace: str | None = None) -> Environment:
    env = Environment().address(http_url).apikey(API_KEY)
    return env.workspace(workspace) if workspace is not None else env


def create_stream(env: Environment, name: str, columns: list[tuple[str, str]]) -> Stream:
    stream = Stream(env).name(name)
    for col, typ in columns:
        stream.column(col, typ)
    return stream.create()


def wait_until(check: Callable[[], bool], timeout: float = DEADLINE, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout}s")


class QueryRun:
    """One `Query(env).sql(sql)[.batching_policy(...)].create()` plus its result iteration, on a
    daemon thread. `rows` collects every data event's rows, `batches` each data event's row count,
    `events` every (event name, data) pair in arrival order."""

    def __init__(self, env: Environment, sql: str, batching: tuple[int, int] | None = None) -> None:
        self.env, self.sql, self.batching = env, sql, batching
        self.metadata: dict[str, Any] = {}
        self.events: list[tuple[str, str]] = []
        self.batches: list[int] = []
        self.rows: list[list[Any]] = []
        self.error: BaseException | None = None
        self.created = threading.Event()
        self.ended = threading.Event()
        self._stop = threading.Event()
        self._query: Query | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"tp-query {sql[:40]}")

    # -- the thread --
    def _run(self) -> None:
        try:
            query = Query(self.env).sql(self.sql)
            if self.batching is not None:
                query.batching_policy(*self.batching)
            query.create()
            self._query = query
            self.metadata = query.metadata()
            self.created.set()
            for event in query.result():
                with self._lock:
                    self.events.append((event.event, event.data))
                    if event.event == "message":
                        batch = json.loads(event.data)
                        assert isinstance(batch, list), event.data
                        self.batches.append(len(batch))
                        self.rows.extend(batch)
                if self._stop.is_set():
                    break
        except BaseException as exc:  # reported to the test by start()/wait_*()
            self.error = exc
        finally:
            self.created.set()
            self.ended.set()

    # -- the test's side --
    def start(self, timeout: float = DEADLINE) -> QueryRun:
        """Start; return once create() returned (the metadata event arrived). Raises the SDK's error."""
        self._thread.start()
        if not self.created.wait(timeout):
            raise AssertionError(f"Query.create() did not return within {timeout}s: {self.sql}")
        if self.error is not None and not self.metadata:
            raise self.error
        return self

    @property
    def id(self) -> str:
        return str(self.metadata["id"])

    def header(self) -> list[tuple[str, str]]:
        return [(h["name"], h["type"]) for h in self.metadata["result"]["header"]]

    def snapshot(self) -> list[list[Any]]:
        with self._lock:
            return list(self.rows)

    def wait_rows(self, n: int, timeout: float = DEADLINE) -> list[list[Any]]:
        """Wait until at least n rows arrived (fails early if the stream ended or broke)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.rows) >= n:
                    return list(self.rows)
            if self.ended.is_set():
                break
            time.sleep(0.02)
        raise AssertionError(f"{len(self.rows)} of {n} rows within {timeout}s (ended={self.ended.is_set()}, "
                             f"error={self.error!r}); rows={self.rows[:20]}")

    def wait_end(self, timeout: float = DEADLINE) -> QueryRun:
        if not self.ended.wait(timeout):
            raise AssertionError(f"the result stream did not end within {timeout}s: {self.sql}")
        if self.error is not None:
            raise self.error
        return self

    def cancel(self) -> None:
        """Cancel through a fresh Query object, as the SDK allows (spec section 9)."""
        Query(self.env).id(self.id).cancel()

    def close(self) -> None:
        """Best-effort clean-up: stop iterating and drop the connection."""
        self._stop.set()
        if self.metadata and not self.ended.is_set():
            try:
                self.cancel()
            except Exception:  # clean-up only
                pass
        if self._query is not None and self._query._create_response is not None:
            try:
                self._query._create_response.release_conn()
            except Exception:  # clean-up only
                pass
        self.ended.wait(5)

    def data_events(self) -> list[Any]:
        with self._lock:
            return [json.loads(d) for name, d in self.events if name == "message"]

    def named(self, name: str) -> list[Any]:
        with self._lock:
            return [json.loads(d) for n, d in self.events if n == name]


def bounded(env: Environment, sql: str, batching: tuple[int, int] | None = None,
            timeout: float = DEADLINE) -> QueryRun:
    """Run a bounded query (`table(s)`) to its end and return the finished run."""
    run = QueryRun(env, sql, batching).start(timeout)
    try:
        return run.wait_end(timeout)
    finally:
        run.close()


# -- fixtures (imported by the test modules that use them) -----------------------------------------

@pytest.fixture
def ws() -> str:
    """A fresh workspace per test."""
    return new_name("ws")


@pytest.fixture
def env(broker: Any, ws: str) -> Environment:
    return env_for(broker.http_url, ws)


@pytest.fixture
def runs() -> Iterator[list[QueryRun]]:
    """Queries a test started; closed (cancelled, connection dropped) whatever the outcome."""
    started: list[QueryRun] = []
    yield started
    for run in started:
        run.close()


def in_thread_with_deadline(work: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """conftest's, with this module's deadline."""
    return _in_thread(work, timeout)
