"""The sources manager and the stream_generator in-process, over a real RocksStore: templates and
their fields, the schedule (absolute deadlines: no drift, no gaps), status and counters,
stop/start/update/delete, definitions surviving a restart, a deleted target stream, values of the
wrong type, and every bad definition refused before anything starts.
"""
from __future__ import annotations

import asyncio
import time
from itertools import pairwise
from typing import Any

import orjson
import pytest

from broker.errors import BrokerError, ErrorCode
from broker.model import ColumnDef, StreamSchema
from broker.sources import base
from broker.sources.generator import TEMPLATE_COLUMNS

from .conftest import P, Sluice, eventually


@pytest.fixture
def h(sluice: Sluice) -> Sluice:
    """conftest's in-process broker with its sources (fast backoff), under a short name."""
    return sluice


async def typed(h: Sluice, name: str, columns: list[tuple[str, str]], partitions: int = 1) -> None:
    await h.broker.create_stream(name, partitions, project=P,
                                 schema=StreamSchema(tuple(ColumnDef(n, t) for n, t in columns)))


def gen(name: str, stream: str, template: str = "iot", interval: Any = "10ms", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "stream_generator", "stream": stream,
            "properties": {"template": template, "interval": interval, **extra}}


# -- the templates and the schedule ------------------------------------------------------------------

@pytest.mark.parametrize("template", ["iot", "user_logins", "devops"])
async def test_each_template_writes_its_documented_fields(h: Sluice, template: str) -> None:
    await typed(h, "t", [*TEMPLATE_COLUMNS[template], ("unrelated", "string")])
    await h.sources.create(P, gen("g", "t", template))

    async def enough() -> list[dict[str, Any]] | None:
        rows = await h.rows("t")
        return rows if len(rows) >= 30 else None
    rows = await eventually(enough)
    names = [c for c, _ in TEMPLATE_COLUMNS[template]]
    for row in rows:
        assert set(row) == {*names, "unrelated", "_tp_time"}
        assert row["unrelated"] == ""    # a stream column the template does not make: its default
    if template == "iot":
        assert {r["device"] for r in rows} <= {"device_0", "device_1", "device_2"}
        assert all(0 <= r["number"] <= 100 for r in rows)
    elif template == "user_logins":
        assert {r["username"] for r in rows} <= {"user1", "user2"}
        assert {r["city"] for r in rows} <= {"Shanghai", "Beijing"}
    else:
        assert {r["hostname"] for r in rows} <= {"host_0", "host_1", "host_2"}
        assert {r["region"] for r in rows} <= {"eu-central-1", "us-west-1", "sa-east-1"}
        assert {r["rack"] for r in rows} <= {"1", "2", "3"}
        assert all(0 <= r["usage_user"] <= 100 and 0 <= r["usage_system"] <= 100 for r in rows)
    # the entity is drawn at random: 30 events show more than one of them
    entity = {"iot": "device", "user_logins": "username", "devops": "hostname"}[template]
    assert len({r[entity] for r in rows}) > 1


async def test_events_follow_absolute_deadlines_without_gaps_or_drift(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    started = time.time_ns() // 1_000_000
    await h.sources.create(P, gen("g", "t", interval="20ms"))

    async def enough() -> list[dict[str, Any]] | None:
        rows = await h.rows("t")
        return rows if len(rows) >= 40 else None
    await eventually(enough)
    await h.sources.stop_source(P, "g")
    stopped = time.time_ns() // 1_000_000
    rows = await h.rows("t")
    from datetime import datetime
    times = sorted(int(datetime.fromisoformat(r["time"] + "+00:00").timestamp() * 1000) for r in rows)
    steps = {b - a for a, b in pairwise(times)}
    assert steps == {20}, steps                          # one event per interval: none missed, none twice
    assert started - 20 <= times[0] and times[-1] <= stopped
    assert len(rows) <= (stopped - started) // 20 + 1    # never ahead of the schedule


async def test_status_and_counters(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    created = await h.sources.create(P, {**gen("g", "t"), "description": "demo"})
    d = created.definition
    assert (d.name, d.type, d.stream, d.description) == ("g", "stream_generator", "t", "demo")
    assert d.properties == {"template": "iot", "interval": "10ms"}   # as given
    assert created.state.status == "running" and d.started_ms > 0

    async def wrote() -> bool:
        return h.sources.get(P, d.id).state.rows_written >= 10
    await eventually(wrote)
    st = h.sources.get(P, "g").state     # by name too
    assert st.errors == 0 and st.last_event_ms > 0 and st.lag is None
    await h.sources.stop_source(P, d.id)
    st = h.sources.get(P, d.id).state
    assert st.status == "stopped"
    # once stopped nothing is in flight: every message taken in was written, and counted
    assert st.messages_in == st.rows_written == len(await h.rows("t"))


async def test_stop_stops_rows_and_start_brings_them_back(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await h.sources.create(P, gen("g", "t"))

    async def count() -> int:
        return len(await h.rows("t"))
    await eventually(lambda: _at_least(count, 5))
    first = await h.sources.stop_source(P, "g")
    after_stop = await count()
    await asyncio.sleep(0.3)                    # 30 intervals
    assert await count() == after_stop
    again = await h.sources.stop_source(P, "g")  # stop on a stopped source: no-op
    assert again.state.status == "stopped"
    restarted = await h.sources.start_source(P, "g")
    assert restarted.state.status == "running"
    assert restarted.definition.started_ms >= first.definition.started_ms
    await eventually(lambda: _at_least(count, after_stop + 5))
    same = await h.sources.start_source(P, "g")  # start on a running source: no-op
    assert same.definition.started_ms == restarted.definition.started_ms


async def _at_least(count: Any, n: int) -> bool:
    return await count() >= n


async def test_definitions_survive_a_restart_and_running_ones_run_again(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await typed(h, "u", TEMPLATE_COLUMNS["devops"])
    running = await h.sources.create(P, gen("on", "t"))
    stopped = await h.sources.create(P, gen("off", "u", "devops"))
    await h.sources.stop_source(P, "off")
    await h.close()
    await h.open()
    assert [s.definition.name for s in h.sources.list(P)] == ["off", "on"]
    assert h.sources.get(P, "on").definition == running.definition
    assert h.sources.get(P, "off").state.status == "stopped"
    before_u = len(await h.rows("u"))
    before_t = len(await h.rows("t"))

    async def more() -> bool:
        return len(await h.rows("t")) >= before_t + 5
    await eventually(more)
    assert h.sources.get(P, "on").state.status == "running"
    assert len(await h.rows("u")) == before_u
    assert stopped.definition.id == h.sources.get(P, "off").definition.id


async def test_update_only_when_stopped_and_checked_like_create(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await typed(h, "u", TEMPLATE_COLUMNS["devops"])
    await h.sources.create(P, gen("g", "t"))
    with pytest.raises(BrokerError) as e:
        await h.sources.update(P, "g", {"description": "x"})
    assert e.value.code is ErrorCode.SOURCE_RUNNING
    await h.sources.stop_source(P, "g")
    with pytest.raises(BrokerError) as e:
        await h.sources.update(P, "g", {"properties": {"template": "nope"}})
    assert e.value.code is ErrorCode.BAD_SOURCE and "[template]" in e.value.message
    with pytest.raises(BrokerError) as e:   # refused, not ignored: the answer would show the old type
        await h.sources.update(P, "g", {"type": "websocket"})
    assert e.value.code is ErrorCode.BAD_SOURCE and "[type]" in e.value.message
    assert (await h.sources.update(P, "g", {"type": "stream_generator"})).definition.type == "stream_generator"
    updated = await h.sources.update(P, "g", {"stream": "u", "properties": {"template": "devops", "interval": 5},
                                              "name": "g2", "description": "moved"})
    d = updated.definition
    assert (d.name, d.stream, d.description, d.properties["template"]) == ("g2", "u", "moved", "devops")
    await h.sources.start_source(P, "g2")

    async def rows_in_u() -> bool:
        return len(await h.rows("u")) >= 5
    await eventually(rows_in_u)
    await h.close()
    await h.open()
    assert h.sources.get(P, "g2").definition.stream == "u"    # the update was stored


async def test_names_are_unique_per_project_and_delete_forgets(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await h.broker.create_stream("t", 1, project="other",
                                 schema=StreamSchema(tuple(ColumnDef(n, c) for n, c in TEMPLATE_COLUMNS["iot"])))
    await h.sources.create(P, gen("g", "t"))
    with pytest.raises(BrokerError) as e:
        await h.sources.create(P, gen("g", "t"))
    assert e.value.code is ErrorCode.SOURCE_EXISTS
    await h.sources.create("other", gen("g", "t"))              # another project: another namespace
    assert [s.definition.project for s in h.sources.list("other")] == ["other"]
    await h.sources.delete(P, "g")
    for ref in ("g", "no-such-id"):
        with pytest.raises(BrokerError) as e:
            h.sources.get(P, ref)
        assert e.value.code is ErrorCode.SOURCE_NOT_FOUND
    count = len(await h.rows("t"))
    await asyncio.sleep(0.2)
    assert len(await h.rows("t")) == count                      # its job is gone
    await h.close()
    await h.open()
    assert h.sources.list(P) == [] and len(h.sources.list("other")) == 1


async def test_a_deleted_target_fails_the_source_until_the_stream_is_back(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await h.sources.create(P, gen("g", "t"))
    await h.broker.delete_stream("t", project=P)

    async def failed() -> bool:
        st = h.sources.get(P, "g").state
        return st.status == "failed" and "[t]" in st.message
    await eventually(failed)
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])

    async def back() -> bool:
        return h.sources.get(P, "g").state.status == "running" and len(await h.rows("t")) >= 3
    await eventually(back)


async def test_values_of_the_wrong_type_are_counted_and_skipped(h: Sluice) -> None:
    # `number` is a fraction in [0, 100): an int32 column refuses almost every one of them
    await typed(h, "t", [("device", "string"), ("number", "int32"), ("time", "datetime64(3)")])
    await h.sources.create(P, gen("g", "t", interval="5ms"))

    async def errors() -> bool:
        return h.sources.get(P, "g").state.errors >= 20
    await eventually(errors)
    st = h.sources.get(P, "g").state
    assert st.status == "running"                          # skipped, not stopped
    assert "[number]" in st.last_error and st.messages_in >= st.errors + st.rows_written - 1
    assert len(await h.rows("t")) == st.rows_written        # what was refused was not written


async def test_a_stream_without_schema_takes_the_objects_as_records(h: Sluice) -> None:
    await h.broker.create_stream("plain", 2, project=P)
    await h.sources.create(P, gen("g", "plain", "user_logins"))

    async def enough() -> list[dict[str, Any]] | None:
        rows = await h.rows("plain")
        return rows if len(rows) >= 5 else None
    rows = await eventually(enough)
    assert all(set(r) == {"username", "city", "time"} for r in rows)


@pytest.mark.parametrize("body, prop", [
    ({"name": "g", "type": "kafka", "stream": "t", "properties": {"x": 1}}, "type"),
    ({"name": "g", "stream": "t", "properties": {"template": "iot"}}, "type"),
    ({"type": "stream_generator", "stream": "t", "properties": {"template": "iot"}}, "name"),
    ({"name": "9g", "type": "stream_generator", "stream": "t", "properties": {"template": "iot"}}, "name"),
    ({"name": "g" * 65, "type": "stream_generator", "stream": "t", "properties": {"template": "iot"}}, "name"),
    ({"name": "g", "type": "stream_generator", "properties": {"template": "iot"}}, "stream"),
    ({"name": "g", "type": "stream_generator", "stream": "missing", "properties": {"template": "iot"}}, "stream"),
    ({"name": "g", "type": "stream_generator", "stream": "t"}, "properties"),
    ({"name": "g", "type": "stream_generator", "stream": "t", "properties": []}, "properties"),
    ({"name": "g", "type": "stream_generator", "stream": "t", "properties": {}}, "template"),   # the one it needs
    ({"name": "g", "type": "stream_generator", "stream": "t", "properties": {"interval": "1s"}}, "template"),
    ({"name": "g", "type": "stream_generator", "stream": "t", "properties": {"template": "weather"}}, "template"),
    ({"name": "g", "type": "stream_generator", "stream": "t", "properties": {"template": 3}}, "template"),
    ({"name": "g", "type": "stream_generator", "stream": "t",
      "properties": {"template": "iot", "interval": "fast"}}, "interval"),
    ({"name": "g", "type": "stream_generator", "stream": "t",
      "properties": {"template": "iot", "interval": "0s"}}, "interval"),
    ({"name": "g", "type": "stream_generator", "stream": "t",
      "properties": {"template": "iot", "interval": -5}}, "interval"),
    ({"name": "g", "type": "stream_generator", "stream": "t",
      "properties": {"template": "iot", "interval": True}}, "interval"),
    ({"name": "g", "type": "stream_generator", "stream": "t",
      "properties": {"template": "iot", "intreval": "1s"}}, "intreval"),
    ({"name": "g", "type": "stream_generator", "stream": "t", "description": 5,
      "properties": {"template": "iot"}}, "description"),
])
async def test_bad_definitions_are_refused_naming_the_property(h: Sluice, body: dict[str, Any], prop: str) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    with pytest.raises(BrokerError) as e:
        await h.sources.create(P, body)
    assert e.value.code is ErrorCode.BAD_SOURCE, e.value.message
    assert f"property [{prop}]" in e.value.message, e.value.message
    assert h.sources.list(P) == []
    assert await h.store.meta_scan(b"S") == []      # nothing stored, nothing started


async def test_a_body_that_is_not_an_object_is_refused(h: Sluice) -> None:
    for body in (None, [], "x", 5):
        with pytest.raises(BrokerError) as e:
            await h.sources.create(P, body)
        assert e.value.code is ErrorCode.BAD_BODY


async def test_close_is_prompt_with_many_sources_running(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    for i in range(20):
        await h.sources.create(P, gen(f"g{i}", "t", interval="1ms"))
    await asyncio.sleep(0.2)
    closing = asyncio.create_task(h.sources.close())
    await asyncio.wait_for(closing, 10)     # a stop never waits on a job for long
    assert all(s.state.status == "running" for s in h.sources.list(P))   # wanted running: they come back
    await h.close()
    await h.open()
    assert len([s for s in h.sources.list(P) if s.state.status == "running"]) == 20


# -- supervision: fake source types whose jobs misbehave in known ways ---------------------------------

class _Script:
    """A job per run, scripted by the test: it records each run's backoff attempt and what ran."""

    def __init__(self) -> None:
        self.attempts: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.behaviour = "fail"        # fail | cancel_itself | linger | text

    def type(self, data_type: str = "json") -> base.SourceType:
        from broker.sources.props import Props

        def configure(props: Props) -> str:
            props.raw("x")
            props.finish()
            return "config"
        return base.SourceType("scripted", configure, lambda config: _ScriptedJob(self), lambda config: data_type)


class _ScriptedJob:
    def __init__(self, script: _Script) -> None:
        self.s = script

    async def run(self, ctx: base.JobContext) -> None:
        s = self.s
        s.attempts.append(ctx.backoff.attempt)
        s.running += 1
        s.most_at_once = max(s.most_at_once, s.running)
        try:
            ctx.connected()
            if s.behaviour == "fail":
                raise OSError("refused")          # connects, then drops at once
            if s.behaviour == "cancel_itself":
                raise asyncio.CancelledError()    # a library's own cancellation, not ours
            while s.behaviour == "text":
                await ctx.sink.write([b"one", b"two"])
                await asyncio.sleep(0.02)
            await asyncio.sleep(3600)
        finally:
            if s.behaviour == "linger":
                await asyncio.shield(asyncio.sleep(0.3))   # slow to let go of its connection
            s.running -= 1


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> _Script:
    from broker.sources import manager
    s = _Script()
    monkeypatch.setitem(manager.TYPES, "scripted", s.type())
    return s


def scripted(name: str = "s", stream: str = "t") -> dict[str, Any]:
    return {"name": name, "type": "scripted", "stream": stream, "properties": {"x": 1}}


async def test_a_job_that_connects_and_drops_at_once_backs_off_further_each_time(h: Sluice, script: _Script) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await h.sources.create(P, scripted())

    async def runs() -> bool:
        return len(script.attempts) >= 4
    await eventually(runs)
    assert script.attempts[:4] == [0, 1, 2, 3]     # never reset by a connection that did not last
    st = h.sources.get(P, "s").state
    assert st.status == "failed" and "refused" in st.message


async def test_a_job_cancelled_by_its_library_is_a_failure_and_is_retried(h: Sluice, script: _Script) -> None:
    script.behaviour = "cancel_itself"
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await h.sources.create(P, scripted())

    async def retried() -> bool:
        return len(script.attempts) >= 2
    await eventually(retried)
    assert "cancelled" in h.sources.get(P, "s").state.last_error


async def test_one_job_per_source_even_when_a_job_is_slow_to_let_go(h: Sluice, script: _Script,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.sources import manager
    monkeypatch.setattr(manager, "STOP_WAIT_S", 0.05)   # stop gives up waiting long before the job lets go
    script.behaviour = "linger"
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await h.sources.create(P, scripted())
    for _ in range(3):
        await h.sources.stop_source(P, "s")
        await h.sources.start_source(P, "s")

    async def last_one_runs() -> bool:
        return script.running == 1 and not h.sources._ending
    await eventually(last_one_runs)
    assert script.most_at_once == 1 and len(script.attempts) >= 2


async def test_a_cancelled_verb_still_finishes_so_store_and_memory_agree(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await h.sources.create(P, gen("g", "t"))
    stop = asyncio.create_task(h.sources.stop_source(P, "g"))
    await asyncio.sleep(0)          # the verb has begun ...
    stop.cancel()                   # ... and its caller goes away (a gRPC deadline)
    with pytest.raises(asyncio.CancelledError):
        await stop

    async def settled() -> bool:
        return h.sources.get(P, "g").state.status == "stopped"
    await eventually(settled)
    await h.close()
    await h.open()
    assert h.sources.get(P, "g").definition.wanted == "stopped"


async def test_a_text_source_whose_stream_lost_raw_fails_instead_of_dropping_messages(h: Sluice,
                                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                                     script: _Script) -> None:
    from broker.sources import manager
    monkeypatch.setitem(manager.TYPES, "scripted", script.type("text"))
    script.behaviour = "text"
    await typed(h, "t", [("raw", "string")])
    await h.sources.create(P, scripted())

    async def two() -> bool:
        return len(await h.rows("t")) >= 2
    await eventually(two)
    await h.broker.delete_stream("t", project=P)
    await typed(h, "t", [("other", "string")])     # recreated without raw, while the source runs

    async def failed() -> bool:
        st = h.sources.get(P, "s").state
        return st.status == "failed" and "raw" in st.message
    await eventually(failed)
    assert await h.rows("t") == []                 # nothing was written as empty rows
    skipped = [m for _, m in h.sources.get(P, "s").state.error_log if "skipped" in m]
    assert skipped == []                           # and nothing was counted as a bad message


async def test_stored_definitions_this_broker_cannot_run_do_not_stop_it(h: Sluice) -> None:
    await typed(h, "t", TEMPLATE_COLUMNS["iot"])
    await h.sources.create(P, gen("g", "t"))
    alien = orjson.loads(h.sources.get(P, "g").definition.to_json())
    alien.update(id="alien-1", name="alien", type="kafka")
    await h.store.meta_write({b"S" + P.encode() + b"\0alien-1": orjson.dumps(alien),
                              b"S" + P.encode() + b"\0broken": b"{not json"})
    await h.close()
    await h.open()                                     # starts, skipping what it cannot read
    assert sorted(s.definition.name for s in h.sources.list(P)) == ["alien", "g"]

    async def alien_failed() -> bool:
        return h.sources.get(P, "alien").state.status == "failed"
    await eventually(alien_failed)
    assert "kafka" in h.sources.get(P, "alien").state.message
    await h.sources.stop_source(P, "alien")
    with pytest.raises(BrokerError) as e:
        await h.sources.start_source(P, "alien")
    assert e.value.code is ErrorCode.BAD_SOURCE and "[type]" in e.value.message


@pytest.mark.parametrize(("url", "shown"), [
    ("ws://alice:SECRET@127.0.0.1:9/feed", "ws://alice:***@127.0.0.1:9/feed"),
    # a NATS url may be a comma-separated list: every URL of it masked, not only the first
    ("nats://alice:S1@127.0.0.1:1,nats://bob:S2@127.0.0.1:2", "nats://alice:***@127.0.0.1:1,nats://bob:***@127.0.0.1:2"),
    ("nats://a:S1@[::1:4222", "nats://a:***@[::1:4222"),   # urlsplit refuses it: masked by pattern
    # a user without a password is NATS's token form (nats-py sends it as the auth_token)
    ("nats://u@h:1,ws://h/x?a=b", "nats://***@h:1,ws://h/x?a=***"),
    ("nats://S3CRETTOKEN@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
    ("nats://S3CRETTOKEN@[::1:4222", "nats://***@[::1:4222"),   # urlsplit refuses it: masked by pattern
    # a feed's token in its query (the operations probe: shown to a consumer key as given)
    ("ws://alice:P1@127.0.0.1:9/feed?token=T2&x=1&flag", "ws://alice:***@127.0.0.1:9/feed?token=***&x=***&***"),
    ("wss://h/feed?token=T2#frag", "wss://h/feed?token=***#frag"),
    ("nats://a:S1@[::1:4222/?token=T2", "nats://a:***@[::1:4222/?token=***"),
    ("wss://feeduser:s3cr,et@example.com/feed", "wss://feeduser:***@example.com/feed"),   # a comma in a password
    ("nats://a:p,1@h:1, nats://b:p,2@h:2", "nats://a:***@h:1,nats://b:***@h:2"),
])
def test_shown_urls_mask_every_password(url: str, shown: str) -> None:
    from broker.sources.props import redacted, shown_url

    assert shown_url(url) == shown
    assert redacted({"url": url, "servers": [url]}) == {"url": shown, "servers": [shown]}


@pytest.mark.parametrize("url", ["wss://u:PW1@h/feed?token=TK2#frag", "ws://u:PW1@h:0/x?token=TK2",
                                 "ftp://u:PW1@h/x?token=TK2", "ws://u:PW1@h:99999/x?token=TK2"])
def test_a_refused_url_is_named_masked(url: str) -> None:
    """The review: a definition invalid on this broker (stored by another version) becomes a status
    message every role reads, and validation errors echoed the URL whole."""
    from broker.sources import websocket
    from broker.sources.props import Props, redacted

    with pytest.raises(BrokerError) as err:
        websocket.configure(Props({"url": url, "data_type": "json"}))
    assert "PW1" not in err.value.message and "TK2" not in err.value.message, err.value.message
    assert redacted({"subject": "a.b?c=d"}) == {"subject": "a.b?c=d"}   # not a URL: as given


def test_integers_past_64_bits_are_out_of_range_not_of_another_type() -> None:
    """orjson reads a JSON integer past 64 bits as a float: "[1e+23] is not a duration" and "must
    be a whole number, not a number" (the gRPC probe). They are out of range, as they are."""
    from broker.sources.props import Props, parse_duration_ms

    with pytest.raises(BrokerError, match="must be at most a week"):
        parse_duration_ms(1e23, "interval")
    assert parse_duration_ms(250.0, "interval") == 250
    for value, words in ((1e23, r"must be within \[1, 10\]"), (-1e23, r"must be within \[1, 10\]"),
                         (2.5, "not a fraction"), ("x", "not a string")):
        with pytest.raises(BrokerError, match=words):
            Props({"n": value}).integer("n", 1, 1, 10)
    assert Props({"n": 7.0}).integer("n", 1, 1, 10) == 7
    # digits as a string are a number ("7" is taken): past 18 of them they were "not a string"
    assert Props({"n": "0000000000000000000007"}).integer("n", 1, 1, 10) == 7
    for text in ("99999999999999999999", "9" * 5000):   # 5,000 digits: past int()'s own limit too
        with pytest.raises(BrokerError, match=r"must be within \[1, 10\]"):
            Props({"n": text}).integer("n", 1, 1, 10)


def test_throughput_covers_the_last_minute_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The window kept 60 entries, one per second with writes: a source writing every 3 s showed
    a 96 s old entry in its "last 60 seconds" (the sources probe)."""
    from broker.sources import model
    from broker.sources.model import SourceState

    now_ns = [1_700_000_000 * 10**9]
    monkeypatch.setattr(model.time, "time_ns", lambda: now_ns[0])
    state = SourceState()
    for _ in range(40):   # a write every 3 s for 120 s
        state.wrote(1)
        now_ns[0] += 3 * 10**9
    now = now_ns[0] // 10**9
    seconds = [second for second, _ in state.throughput()]
    assert seconds and all(now - 60 < s <= now for s in seconds), (now, seconds)
    assert len(seconds) == 19 and sum(rows for _, rows in state.throughput()) == 19   # 63 s .. 117 s
