"""The `nats_jetstream` source against a real nats-server with JetStream: a pull consumer whose
messages are acknowledged only once their rows are durable (shared/spec/sources.md section 5).

In-process (fast retries): subject and/or stream, durable resume over stop/start, deliver
all/last/new, bind to an existing consumer and to a missing one, a queue group sharing one durable,
a bad JSON message acknowledged and skipped, an append that fails (the batch is not acknowledged and
comes back), the server stopped and restarted, an ephemeral consumer resuming across a retry, and
bad definitions. Over a broker process: rows read back through the Timeplus query and the DIS door,
and the crash test - the broker SIGKILLed while messages flow and restarted on its data: every
message arrives, duplicates bounded by max_ack_pending.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import nats
import nats.js.errors
import orjson
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from broker.errors import BrokerError, ErrorCode
from broker.sources import nats as nats_source
from broker.sources.base import Backoff, JobContext
from broker.sources.model import SourceState
from broker.sources.props import Props
from sources.conftest import (
    NatsServer,
    Sluice,
    consumer_info,
    dis_read_all,
    docs,
    eventually,
    js_publish,
    js_stream,
    rest,
    tp_query,
    with_js,
)

COLUMNS = [("i", "int64"), ("tag", "string")]


async def rows_of(s: Sluice, stream: str, n: int, timeout: float = 30) -> list[Any]:
    async def enough() -> list[Any] | None:
        got = await s.column(stream)
        return got if len(got) >= n else None
    return await eventually(enough, timeout, what=f"{n} rows in {stream}")  # type: ignore[no-any-return]


async def settled(s: Sluice, url: str, stream: str, consumer: str) -> Any:
    """Everything delivered has been acknowledged and nothing waits: the consumer's info."""
    async def check() -> Any:
        info = await consumer_info(url, stream, consumer)
        return info if info.num_ack_pending == 0 and info.num_pending == 0 else None
    return await eventually(check, what=f"consumer {consumer} settled")


def js(url: str, **more: Any) -> dict[str, Any]:
    return {"url": url, "data_type": "json", **more}


async def test_rows_arrive_and_are_acknowledged(sluice: Sluice, nats_server: NatsServer) -> None:
    url = nats_server.url
    await js_stream(url, "ORDERS", ["orders.>"])
    await sluice.typed("t", COLUMNS)
    await js_publish(url, "orders.eu", docs(300, tag="eu"))
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="orders.>", durable="sluice"))
    assert sorted(await rows_of(sluice, "t", 300)) == list(range(300))
    info = await settled(sluice, url, "ORDERS", "sluice")
    assert info.num_redelivered == 0 and info.delivered.stream_seq == 300
    assert info.config.ack_policy == AckPolicy.EXPLICIT and info.config.max_ack_pending == 1024
    assert info.config.ack_wait == 30 and info.config.filter_subject == "orders.>"
    await eventually(lambda: sluice.state("j").lag == 0, what="lag 0")
    st = sluice.state("j")
    assert (st.status, st.messages_in, st.rows_written, st.errors) == ("running", 300, 300, 0)
    await js_publish(url, "orders.us", docs(5, 1000, tag="us"))     # and on, as they come
    await rows_of(sluice, "t", 305)
    rows = await sluice.query("select i, tag from table(t) where i >= 1000")
    assert sorted(map(tuple, rows)) == [(1000 + k, "us") for k in range(5)]


async def test_a_message_with_a_header_named_status_is_a_row(sluice: Sluice, nats_server: NatsServer) -> None:
    """nats-py gives a pull request's status (a 408, a 409, a 503) as a header named Status: a
    user's own header of that name must not make a message of the stream a status (dropped, or
    ending the job as 'consumer deleted'). A status has no reply subject; a delivered message has
    its $JS.ACK one."""
    url = nats_server.url
    await js_stream(url, "HDR", ["hdr.>"])
    await sluice.typed("t", COLUMNS)

    async def publish(js: Any) -> None:
        for i, status in enumerate(["408", "503", "409", "100", "404", "200"]):
            await js.publish("hdr.x", orjson.dumps({"i": i, "tag": status}),
                             headers={"Status": status, "Description": "consumer deleted"})
    await with_js(url, publish)
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="hdr.>", durable="sluice"))
    assert sorted(await rows_of(sluice, "t", 6)) == list(range(6))
    info = await settled(sluice, url, "HDR", "sluice")
    assert info.num_redelivered == 0 and sluice.state("j").status == "running"


async def test_subject_and_or_stream(sluice: Sluice, nats_server: NatsServer) -> None:
    url = nats_server.url
    await js_stream(url, "EVENTS", ["ev.*"])
    for name in ("by_subject", "by_stream", "both"):
        await sluice.typed(name, COLUMNS)
    await js_publish(url, "ev.a", docs(3, 0, tag="a"))
    await js_publish(url, "ev.b", docs(2, 10, tag="b"))
    await sluice.create("s1", "nats_jetstream", "by_subject", **js(url, subject="ev.a"))     # stream looked up
    await sluice.create("s2", "nats_jetstream", "by_stream", **js(url, stream="EVENTS"))     # the whole stream
    await sluice.create("s3", "nats_jetstream", "both", **js(url, stream="EVENTS", subject="ev.b", deliver="all"))
    assert sorted(await rows_of(sluice, "by_subject", 3)) == [0, 1, 2]
    assert sorted(await rows_of(sluice, "by_stream", 5)) == [0, 1, 2, 10, 11]
    assert sorted(await rows_of(sluice, "both", 2)) == [10, 11]
    await sluice.create("none", "nats_jetstream", "both", **js(url, subject="nowhere.>"))
    st = await eventually(lambda: sluice.state("none").status == "failed" and sluice.state("none"))
    assert "no JetStream stream holds subject [nowhere.>]" in st.message, st.message
    await sluice.create("gone", "nats_jetstream", "both", **js(url, stream="MISSING"))
    st = await eventually(lambda: sluice.state("gone").status == "failed" and sluice.state("gone"))
    assert "JetStream stream [MISSING] does not exist" in st.message, st.message
    await sluice.create("gone2", "nats_jetstream", "both", **js(url, stream="MISSING", durable="d"))
    st = await eventually(lambda: sluice.state("gone2").status == "failed" and sluice.state("gone2"))
    assert "JetStream stream [MISSING] does not exist" in st.message, st.message


async def test_a_durable_consumer_resumes_after_stop_and_start(sluice: Sluice, nats_server: NatsServer) -> None:
    url = nats_server.url
    await js_stream(url, "S", ["s"])
    await sluice.typed("t", COLUMNS)
    # ack_wait beyond the test's deadlines: nothing may depend on the server's redelivery timer
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="s", durable="keep", ack_wait="10m"))
    await js_publish(url, "s", docs(50))
    await rows_of(sluice, "t", 50)
    await settled(sluice, url, "S", "keep")
    await sluice.sources.stop_source("default", "j")
    await js_publish(url, "s", docs(50, 50))                 # published while stopped: kept by the server
    await asyncio.sleep(0.3)
    assert len(await sluice.column("t")) == 50
    await sluice.sources.start_source("default", "j")
    await rows_of(sluice, "t", 100)
    await settled(sluice, url, "S", "keep")
    assert sorted(await sluice.column("t")) == list(range(100))   # each once
    # and across a broker restart (the consumer's position lives in the server)
    await sluice.close()
    await js_publish(url, "s", docs(10, 100))
    await sluice.open()
    await rows_of(sluice, "t", 110)
    await settled(sluice, url, "S", "keep")
    assert sorted(await sluice.column("t")) == list(range(110))


async def test_deliver_all_last_new(sluice: Sluice, nats_server: NatsServer) -> None:
    url = nats_server.url
    await js_stream(url, "D", ["d"])
    await js_publish(url, "d", docs(5))
    for policy in ("all", "last", "new"):
        await sluice.typed(f"d_{policy}", COLUMNS)
        await sluice.create(policy, "nats_jetstream", f"d_{policy}", **js(url, subject="d", deliver=policy,
                                                                           durable=f"c_{policy}"))
        await eventually(lambda p=policy: sluice.state(p).status == "running" and sluice.state(p).lag == 0)
    assert sorted(await rows_of(sluice, "d_all", 5)) == [0, 1, 2, 3, 4]
    assert await rows_of(sluice, "d_last", 1) == [4]
    await js_publish(url, "d", docs(2, 5))
    assert sorted(await rows_of(sluice, "d_all", 7)) == list(range(7))
    assert sorted(await rows_of(sluice, "d_last", 3)) == [4, 5, 6]
    assert sorted(await rows_of(sluice, "d_new", 2)) == [5, 6]
    info = await consumer_info(url, "D", "c_new")
    assert info.config.deliver_policy == DeliverPolicy.NEW


async def test_bind_to_an_existing_consumer_and_to_a_missing_one(sluice: Sluice, nats_server: NatsServer) -> None:
    url = nats_server.url
    await js_stream(url, "B", ["b.*"])
    await sluice.typed("t", COLUMNS)
    await sluice.typed("u", COLUMNS)
    await js_publish(url, "b.x", docs(4))

    async def add(name: str, policy: AckPolicy) -> None:
        await with_js(url, lambda j: j.add_consumer("B", ConsumerConfig(
            durable_name=name, ack_policy=policy, filter_subject="b.*", deliver_policy=DeliverPolicy.ALL)))
    await add("theirs", AckPolicy.ALL)
    await sluice.create("bound", "nats_jetstream", "t", **js(url, stream="B", durable="theirs", bind=True))
    assert sorted(await rows_of(sluice, "t", 4)) == [0, 1, 2, 3]
    info = await settled(sluice, url, "B", "theirs")
    assert info.config.ack_policy == AckPolicy.ALL and info.ack_floor.stream_seq == 4   # its policy, followed

    await sluice.create("missing", "nats_jetstream", "u", **js(url, subject="b.*", durable="later", bind="true"))
    st = await eventually(lambda: sluice.state("missing").status == "failed" and sluice.state("missing"))
    assert "bind: consumer [later] does not exist on JetStream stream [B]" in st.message, st.message
    with pytest.raises(nats.js.errors.NotFoundError):   # nothing was created by the source
        await consumer_info(url, "B", "later")
    await add("later", AckPolicy.EXPLICIT)          # the manager keeps retrying: it attaches once it exists
    assert sorted(await rows_of(sluice, "u", 4)) == [0, 1, 2, 3]
    assert sluice.state("missing").status == "running"


async def test_an_ack_all_consumer_s_batch_is_acknowledged_up_to_its_highest_sequence(
        nats_server: NatsServer) -> None:
    """With an existing AckPolicy.ALL consumer one ack covers every lower stream sequence, so the
    batch's highest one is acknowledged, wherever it is in the batch: a redelivered message last
    (one whose ack_wait ran out while the batch was pulled) acked only up to itself, and the newer
    messages before it came back after ack_wait, written twice."""
    url = nats_server.url
    await js_stream(url, "AA", ["aa"])
    await js_publish(url, "aa", docs(3))
    await with_js(url, lambda j: j.add_consumer("AA", ConsumerConfig(durable_name="all", ack_policy=AckPolicy.ALL)))
    props = Props({"url": url, "stream": "AA", "durable": "all", "bind": "true", "data_type": "json"})
    job = nats_source.JetStreamJob(nats_source.configure_jetstream(props))
    ctx = JobContext(sink=None, state=SourceState(), backoff=Backoff())  # type: ignore[arg-type]
    nc = await nats.connect(url)
    try:
        msgs = await (await nc.jetstream().pull_subscribe_bind("all", "AA")).fetch(3, timeout=10)
        assert [m.metadata.sequence.stream for m in msgs] == [1, 2, 3]
        await job._ack(ctx, [msgs[1], msgs[2], msgs[0]], AckPolicy.ALL)
        await nc.flush()
    finally:
        await nc.close()
    info = await consumer_info(url, "AA", "all")
    assert info.ack_floor.stream_seq == 3 and info.num_ack_pending == 0, info


async def test_a_queue_group_shares_one_durable_consumer(sluice: Sluice, nats_server: NatsServer) -> None:
    url = nats_server.url
    await js_stream(url, "Q", ["q"])
    await sluice.typed("t", COLUMNS)
    for name in ("a", "b"):   # small pulls, so that both members take part
        await sluice.create(name, "nats_jetstream", "t", **js(url, subject="q", queue="workers", max_ack_pending=8))
    await eventually(lambda: sluice.state("a").status == sluice.state("b").status == "running")
    await js_publish(url, "q", docs(400))
    await rows_of(sluice, "t", 400)
    info = await settled(sluice, url, "Q", "workers")
    assert info.num_redelivered == 0
    assert sorted(await sluice.column("t")) == list(range(400))          # each once
    a, b = sluice.state("a").rows_written, sluice.state("b").rows_written
    assert a + b == 400 and a > 0 and b > 0, (a, b)


async def test_pull_requests_ended_by_max_bytes_go_on(sluice: Sluice, nats_server: NatsServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # each request ends after ~3 messages with a 409 "Message Size Exceeds MaxBytes": the next is
    # asked at once (were it left to expire, 100 requests would take 200 s)
    monkeypatch.setattr(nats_source, "PULL_MAX_BYTES", 3500)
    url = nats_server.url
    await js_stream(url, "BIG", ["big"])
    await sluice.typed("t", COLUMNS)
    await js_publish(url, "big", docs(300, tag="x" * 1000))
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="big", durable="d"))
    assert sorted(await rows_of(sluice, "t", 300, timeout=60)) == list(range(300))
    await settled(sluice, url, "BIG", "d")


async def test_a_consumer_s_own_pull_request_limits_are_kept(sluice: Sluice, nats_server: NatsServer) -> None:
    """An existing consumer may bound the pull requests it takes (max_batch, max_bytes,
    max_expires; nats-py's ConsumerInfo leaves them out): the server refuses a request past one
    (409 "Exceeded MaxRequest..."), every time, so the job read nothing and showed running with no
    error, for good."""
    url = nats_server.url
    await js_stream(url, "L", ["l"])
    limits = {"b": {"max_batch": 10}, "y": {"max_bytes": 100_000}, "e": {"max_expires": 1_000_000_000}}

    for name, limit in limits.items():
        await raw_consumer(url, "L", name, **limit)
    await js_publish(url, "l", docs(50))
    for name in limits:
        await sluice.typed(f"t{name}", COLUMNS)
        await sluice.create(f"j{name}", "nats_jetstream", f"t{name}", **js(url, stream="L", durable=name, bind=True))
    for name in limits:
        assert sorted(await rows_of(sluice, f"t{name}", 50, timeout=15)) == list(range(50)), name
        await settled(sluice, url, "L", name)


async def test_a_pull_request_the_consumer_refuses_fails_the_source_with_the_reason(
        sluice: Sluice, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's bounds not known (changed since they were read): the refusal is the status,
    not a silent loop of refused requests."""
    async def unknown(*_: Any) -> tuple[int, int, float]:
        return 0, 0, 0.0
    monkeypatch.setattr(nats_source, "_pull_limits", unknown)
    url = nats_server.url
    await js_stream(url, "L", ["l"])
    await raw_consumer(url, "L", "b", max_batch=10)
    await sluice.typed("t", COLUMNS)
    await sluice.create("j", "nats_jetstream", "t", **js(url, stream="L", durable="b", bind=True))
    st = await eventually(lambda: "Exceeded MaxRequestBatch" in sluice.state("j").last_error and sluice.state("j"))
    assert "consumer [b]" in st.last_error, st.last_error


async def test_a_message_over_a_pull_request_s_byte_bound_is_still_read(sluice: Sluice, nats_server: NatsServer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A message bigger than a request's max_bytes (PULL_MAX_BYTES, 32 MiB: a server's max_payload
    may be up to 64 MiB) is never delivered into it (409 "Message Size Exceeds MaxBytes" and
    nothing else), and the next request was the same: the source stopped there for good, showing
    running with no error, every later message held behind it."""
    monkeypatch.setattr(nats_source, "PULL_MAX_BYTES", 3500)
    url = nats_server.url
    await js_stream(url, "BIG", ["big"])
    await sluice.typed("t", COLUMNS)
    await js_publish(url, "big", [*docs(2), *docs(1, 2, tag="x" * 5000), *docs(2, 3)])
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="big", durable="d"))
    assert sorted(await rows_of(sluice, "t", 5, timeout=15)) == list(range(5))
    await settled(sluice, url, "BIG", "d")

    # bigger than a consumer's own max_bytes: it cannot be pulled, and the status says so
    await raw_consumer(url, "BIG", "small", max_bytes=3000)
    await sluice.create("s", "nats_jetstream", "t", **js(url, stream="BIG", durable="small", bind=True))
    st = await eventually(lambda: "bigger than its max_bytes" in sluice.state("s").last_error and sluice.state("s"))
    assert "consumer [small]" in st.last_error and "(3000)" in st.last_error, st.last_error


async def test_a_consumer_with_no_room_for_another_request_is_not_asked_in_a_tight_loop(
        sluice: Sluice, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer that holds max_waiting pull requests already (here 1, and two members of a queue
    group) refuses another at once (409 "Exceeded MaxWaiting"): the job asked again at once, ~6,000
    requests a second, half a core, for as long as the other's waited."""
    url = nats_server.url
    await js_stream(url, "W", ["w"])
    await raw_consumer(url, "W", "q", max_waiting=1)
    asks, ask = [0], nats_source._Puller._ask

    async def counted(self: nats_source._Puller) -> None:
        asks[0] += 1
        await ask(self)
    monkeypatch.setattr(nats_source._Puller, "_ask", counted)
    await sluice.typed("t", COLUMNS)
    for name in ("a", "b"):
        await sluice.create(name, "nats_jetstream", "t", **js(url, stream="W", queue="q"))
    await asyncio.sleep(1)
    before = asks[0]
    await asyncio.sleep(3)
    assert asks[0] - before < 100, asks[0] - before
    await js_publish(url, "w", docs(20))
    assert sorted(await rows_of(sluice, "t", 20)) == list(range(20))


async def test_a_bad_message_is_counted_skipped_and_acknowledged(sluice: Sluice, nats_server: NatsServer) -> None:
    url = nats_server.url
    await js_stream(url, "X", ["x"])
    await sluice.typed("t", COLUMNS)
    await js_publish(url, "x", ['{"i": 1}', "{broken", '"a string"', '{"i": "not a number"}', '{"i": 2}'])
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="x", durable="d"))
    assert sorted(await rows_of(sluice, "t", 2)) == [1, 2]
    info = await settled(sluice, url, "X", "d")
    assert info.num_redelivered == 0                       # acknowledged: they do not come back
    st = sluice.state("j")
    assert (st.status, st.messages_in, st.rows_written, st.errors) == ("running", 5, 2, 3)
    assert "[i]" in st.last_error


async def test_an_object_nested_deeper_than_orjson_writes_is_stored_in_a_plain_log(sluice: Sluice,
                                                                                  nats_server: NatsServer) -> None:
    """Into a stream without a schema the sink wrote orjson's re-encoding of each JSON message,
    and orjson reads 1,024 levels but writes 255: a message nested 300 deep raised a TypeError
    out of the sink, so its batch was given back and came again, failing the source for good and
    holding back every message after it. The message is stored as it was sent."""
    url = nats_server.url
    await js_stream(url, "DEEP", ["deep"])
    await sluice.broker.create_stream("plain", 1, project="default")
    deep = '{"a": ' + "[" * 300 + "]" * 300 + "}"
    await js_publish(url, "deep", ['{"i": 1}', deep, '{"i": 2}'])
    await sluice.create("j", "nats_jetstream", "plain", **js(url, subject="deep", durable="d"))
    await eventually(lambda: sluice.state("j").rows_written == 3, what="the three messages stored")
    cursor = await sluice.broker.get_cursor("plain", 0, "TRIM_HORIZON", project="default")
    got = [r.data for r in (await sluice.broker.get_records(cursor, 10, project="default")).records]
    assert got == [b'{"i": 1}', deep.encode(), b'{"i": 2}']
    assert sluice.state("j").errors == 0


async def test_an_append_that_waits_past_ack_wait_is_not_delivered_twice(sluice: Sluice, nats_server: NatsServer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An append may wait long: a throttled target makes the sink wait its write limit out (README:
    the source slows to the limit). The batch being appended and the next one pulled meanwhile
    outlived ack_wait, the server delivered them again, and both copies were written: through a
    broker at --partition-records-per-s 10 with ack_wait 1s, 460 messages became 843 rows. The
    job now tells the server they are in progress (+WPI) while the append waits."""
    url = nats_server.url
    await js_stream(url, "SLOW", ["slow"])
    await sluice.typed("t", COLUMNS)
    appending = asyncio.Event()
    release = asyncio.Event()
    real = sluice.broker.append_rows

    async def held(*args: Any, **kwargs: Any) -> int:
        if not release.is_set():   # the first append waits, as a throttled one does
            appending.set()
            await release.wait()
        return await real(*args, **kwargs)
    monkeypatch.setattr(sluice.broker, "append_rows", held)
    await js_publish(url, "slow", docs(10))   # one pull batch: every message is in the held append
    await sluice.create("j", "nats_jetstream", "t", **js(url, stream="SLOW", durable="d", ack_wait="2s",
                                                          prefetch_count=10))
    await asyncio.wait_for(appending.wait(), 30)
    await asyncio.sleep(6)   # three times ack_wait, the append still held
    # a pull of our own on the consumer now: it got the messages again (they were due for
    # redelivery, and the source would have met them too), where marked in progress it gets none
    nc = await nats.connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe_bind("d", "SLOW")
        # nats-py's own TimeoutError, or the builtin one it subclasses when its wait ends first
        with pytest.raises(TimeoutError):
            got = await sub.fetch(10, timeout=1)
            await asyncio.gather(*(m.nak() for m in got))
    finally:
        await nc.close()
    release.set()
    info = await settled(sluice, url, "SLOW", "d")
    rows = await sluice.column("t")
    assert sorted(rows) == list(range(10)), sorted(rows)
    assert info.num_redelivered == 0


async def test_a_failed_append_is_not_acknowledged(sluice: Sluice, nats_server: NatsServer) -> None:
    # ack_wait 10 s, not the default 30: a message in a pull request still open when the failing job
    # stops waits out ack_wait (documented in broker/sources/nats.py), and this test is not about that
    url = nats_server.url
    await js_stream(url, "F", ["f"])
    await sluice.typed("t", COLUMNS)
    await sluice.create("j", "nats_jetstream", "t",
                        **js(url, subject="f", durable="d", nak_delay="100ms", ack_wait="10s"))
    await js_publish(url, "f", docs(10))
    await rows_of(sluice, "t", 10)
    await settled(sluice, url, "F", "d")
    await sluice.broker.delete_stream("t", project="default")    # every append fails now
    await js_publish(url, "f", docs(10, 10))
    st = await eventually(lambda: sluice.state("j").status == "failed" and sluice.state("j"))
    assert "[t]" in st.message, st.message
    info = await consumer_info(url, "F", "d")
    # none acked: the floor has not moved, and all ten are still owed (a message being redelivered
    # after its nak may briefly count both as pending and as awaiting its ack, hence >=)
    assert info.ack_floor.stream_seq == 10 and info.num_pending + info.num_ack_pending >= 10
    await sluice.typed("t", COLUMNS)                               # back: the ten come again
    assert sorted(await rows_of(sluice, "t", 10)) == list(range(10, 20))
    await settled(sluice, url, "F", "d")
    assert sluice.state("j").status == "running"


async def test_the_server_restarting_shows_failed_then_running(sluice: Sluice, nats_server: NatsServer) -> None:
    url = nats_server.url
    await js_stream(url, "R", ["r"])
    await sluice.typed("t", COLUMNS)
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="r", durable="d"))
    await js_publish(url, "r", docs(20))
    await rows_of(sluice, "t", 20)
    await settled(sluice, url, "R", "d")      # acknowledged before the server goes: nothing comes twice
    nats_server.stop()
    st = await eventually(lambda: sluice.state("j").status == "failed" and sluice.state("j"))
    assert "NATS" in st.message, st.message
    nats_server.start()
    await eventually(lambda: sluice.state("j").status == "running", what="running again")
    await js_publish(url, "r", docs(30, 20))                       # after the recovery: none lost
    await rows_of(sluice, "t", 50)
    await settled(sluice, url, "R", "d")
    assert sorted(await sluice.column("t")) == list(range(50))


async def ephemeral_source(sluice: Sluice, url: str, messages: int) -> None:
    """Source j without durable (an ephemeral consumer) from JetStream stream E (subject e) into
    typed stream t, once the first `messages` published are rows."""
    await js_stream(url, "E", ["e"])
    await sluice.typed("t", COLUMNS)
    await js_publish(url, "e", docs(messages))
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="e"))
    await rows_of(sluice, "t", messages)


async def consumer_names(j: Any, stream: str) -> list[str]:
    return [c.name for c in await j.consumers_info(stream)]


async def fail_the_ephemeral_consumer(sluice: Sluice, url: str, stream: str) -> str:
    """Delete source j's one (ephemeral) consumer: its job fails and is run again. Its name."""
    [ephemeral] = await with_js(url, lambda j: consumer_names(j, stream))
    await with_js(url, lambda j: j.delete_consumer(stream, ephemeral))
    await eventually(lambda: sluice.state("j").errors >= 1, what="the job failing")
    return str(ephemeral)


async def test_an_ephemeral_consumer_resumes_across_a_retry(sluice: Sluice, nats_server: NatsServer) -> None:
    url = nats_server.url
    await ephemeral_source(sluice, url, 10)
    ephemeral = await fail_the_ephemeral_consumer(sluice, url, "E")
    await js_publish(url, "e", docs(5, 10))
    await rows_of(sluice, "t", 15)
    [again] = await eventually(lambda: with_js(url, lambda j: consumer_names(j, "E")), what="a new consumer")
    assert again != ephemeral
    await asyncio.sleep(0.3)
    assert sorted(await sluice.column("t")) == list(range(15))     # on from where it was: none twice
    assert sluice.state("j").status == "running"


@pytest.mark.parametrize("deliver", ["new", "last"])
async def test_an_ephemeral_consumer_s_retry_before_its_first_message_skips_nothing(
        sluice: Sluice, nats_server: NatsServer, deliver: str) -> None:
    """A retry before the run appended anything made its consumer per `deliver` again: with new (or
    last, on an empty stream) what was published between the failure and the retry was skipped."""
    url = nats_server.url
    await js_stream(url, "E", ["e"])
    await sluice.typed("t", COLUMNS)
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="e", deliver=deliver))
    [ephemeral] = await eventually(lambda: with_js(url, lambda j: consumer_names(j, "E")), what="its consumer")

    async def fail_and_publish(j: Any) -> None:   # published before the retry can have made another
        await j.delete_consumer("E", ephemeral)
        for doc in docs(5):
            await j.publish("e", doc)
    await with_js(url, fail_and_publish)
    await eventually(lambda: sluice.state("j").errors >= 1, what="the job failing")
    assert sorted(await rows_of(sluice, "t", 5, timeout=10)) == list(range(5))
    await asyncio.sleep(0.3)
    assert sorted(await sluice.column("t")) == list(range(5))     # none twice


async def test_an_ephemeral_consumer_reads_a_stream_made_again_from_its_start(sluice: Sluice,
                                                                             nats_server: NatsServer) -> None:
    """The upstream stream deleted and made again under a running source without `durable`: its
    retry resumed at the old stream's next sequence, skipping the new stream's first messages for
    good while showing `running` (the sources probe: 150 of 250 rows)."""
    url = nats_server.url
    await ephemeral_source(sluice, url, 100)
    await with_js(url, lambda j: j.delete_stream("E"))
    await eventually(lambda: sluice.state("j").errors >= 1, what="the job failing")
    await js_stream(url, "E", ["e"])
    await js_publish(url, "e", docs(100, 100))   # sequences 1-100 again
    await js_publish(url, "e", docs(50, 200))
    await rows_of(sluice, "t", 250)
    await asyncio.sleep(0.3)
    assert sorted(await sluice.column("t")) == list(range(250))
    assert sluice.state("j").status == "running"


PERMISSIONS = """
authorization {
  users = [
    { user: admin, password: admin }
    { user: reader, password: reader, permissions: {
        publish: { allow: ["$JS.API.INFO", "$JS.API.CONSUMER.CREATE.S", "$JS.API.CONSUMER.CREATE.S.>",
                           "$JS.API.CONSUMER.INFO.S.>", "$JS.API.CONSUMER.MSG.NEXT.S.>", "$JS.ACK.S.>",
                           "$JS.API.CONSUMER.DELETE.S.>"] }
        subscribe: { allow: ["_INBOX.>"] } } }
  ]
}
"""


async def test_an_ephemeral_consumer_needs_no_stream_info_permission(sluice: Sluice, tmp_path: Path) -> None:
    """A user allowed to make and pull consumers, not to ask about streams: looking at the stream
    before an ephemeral consumer (is it the stream of this run's position?) is best effort; the
    source ran, and a retry resumes at its position (the review: it failed for ever before)."""
    conf = tmp_path / "perm.conf"
    conf.write_text(PERMISSIONS)
    server = NatsServer(tmp_path / "perm-store", extra=("-c", str(conf))).start()
    try:
        admin = f"nats://admin:admin@127.0.0.1:{server.port}"
        await js_stream(admin, "S", ["s.>"])
        await js_publish(admin, "s.a", docs(5))
        await sluice.typed("t", COLUMNS)
        await sluice.create("j", "nats_jetstream", "t", **js(f"nats://reader:reader@127.0.0.1:{server.port}",
                                                            stream="S"))
        await rows_of(sluice, "t", 5)
        await fail_the_ephemeral_consumer(sluice, admin, "S")
        await js_publish(admin, "s.a", docs(5, 5))
        await rows_of(sluice, "t", 10)
        await asyncio.sleep(0.3)
        assert sorted(await sluice.column("t")) == list(range(10))   # on from where it was: none twice
    finally:
        server.stop()


async def test_a_stop_mid_batch_finishes_its_batch_and_hands_back_the_rest(sluice: Sluice,
                                                                           nats_server: NatsServer) -> None:
    url = nats_server.url
    await js_stream(url, "M", ["m"])
    await sluice.typed("t", COLUMNS)
    await js_publish(url, "m", docs(3000))
    # ack_wait far beyond the test's deadline: what comes back after the restart was negatively
    # acknowledged at the stop, not redelivered by the server's timer
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="m", durable="d", ack_wait="10m",
                                                        max_ack_pending=400))
    await eventually(lambda: sluice.state("j").rows_written >= 200, what="some rows")
    await sluice.sources.stop_source("default", "j")
    await sluice.sources.start_source("default", "j")

    async def everything() -> list[Any] | None:
        got = await sluice.column("t")
        return got if set(got) == set(range(3000)) else None
    await eventually(everything, 30, what="all 3000 (no wait for ack_wait)")
    await asyncio.sleep(0.3)
    assert len(await sluice.column("t")) == 3000    # the batch in hand at the stop was finished, not redone
    await settled(sluice, url, "M", "d")


STOPS = 8


async def test_stops_while_the_consumer_is_sending_hand_everything_back(sluice: Sluice,
                                                                       nats_server: NatsServer) -> None:
    """Stopped again and again mid-drain, each time while pull requests are being answered: every
    message arrives once, none waits out ack_wait (10 minutes). A job that unsubscribed from its
    inbox while the consumer was still sending lost those messages until then."""
    url = nats_server.url
    await js_stream(url, "R", ["r"])
    await sluice.typed("t", COLUMNS)
    await js_publish(url, "r", docs(STOPS * 400 + 400))
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="r", durable="d", ack_wait="10m",
                                                        max_ack_pending=400, prefetch_count=100))
    for n in range(1, STOPS + 1):
        await eventually(lambda n=n: sluice.state("j").rows_written >= 350 * n, what=f"{350 * n} rows")
        await sluice.sources.stop_source("default", "j")
        await sluice.sources.start_source("default", "j")

    async def everything() -> list[Any] | None:
        got = await sluice.column("t")
        return got if set(got) == set(range(STOPS * 400 + 400)) else None
    await eventually(everything, 30, what="every message (ack_wait is 10 minutes)")
    await asyncio.sleep(0.3)
    assert len(await sluice.column("t")) == STOPS * 400 + 400    # none twice
    await settled(sluice, url, "R", "d")


async def test_a_stop_holding_everything_gives_it_back_after_its_request_ended(sluice: Sluice,
                                                                              nats_server: NatsServer,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped while it holds every message delivered, unappended (its append hangs), with its pull
    request still open: the server has nothing more to send, yet the messages given back would go
    into that request. Given back after the job unsubscribed, nats-server 2.9 took one of them off
    its redelivery queue for the request, found nobody listening, dropped it until ack_wait (10
    minutes here) and stepped its stream position back, so another came twice."""
    from broker.sources.sink import Sink
    monkeypatch.setattr(nats_source, "CLOSE_WAIT_S", 0.2)    # the hung append is given up on soon
    # the case needs the request still open at the stop: it runs out later than any of our waits
    monkeypatch.setattr(nats_source, "PULL_EXPIRES_S", 5.0)
    stop, open_at_stop = nats_source._Puller.stop, []

    async def watched(self: Any, *args: Any, **kwargs: Any) -> None:
        open_at_stop.append(self.open)
        await stop(self, *args, **kwargs)
    monkeypatch.setattr(nats_source._Puller, "stop", watched)
    url = nats_server.url
    write = await _five_messages_and_writes_that_hang(sluice, url, monkeypatch)
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="h", durable="d", ack_wait="10m"))

    async def all_delivered() -> bool:
        try:
            info = await consumer_info(url, "H", "d")
        except nats.js.errors.NotFoundError:    # not created yet
            return False
        return info.num_pending == 0 and info.num_ack_pending == 5
    await eventually(all_delivered, what="the five delivered to the job")
    await sluice.sources.stop_source("default", "j")
    assert open_at_stop == [True]
    monkeypatch.setattr(Sink, "write", write)
    await sluice.sources.start_source("default", "j")
    assert sorted(await rows_of(sluice, "t", 5, timeout=15)) == list(range(5))
    await settled(sluice, url, "H", "d")
    assert sorted(await sluice.column("t")) == list(range(5))     # none twice


async def test_a_stop_during_an_append_slower_than_its_wait_acknowledges_what_it_wrote(
        sluice: Sluice, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop lets the batch in hand finish for CLOSE_WAIT_S; an append still under way then runs to
    its end (the committer finishes it) and its rows are durable, but the batch was given back as
    unwritten: the next start wrote it a second time (5 messages became 10 rows)."""
    monkeypatch.setattr(nats_source, "CLOSE_WAIT_S", 0.3)   # an append slower than the stop's wait
    url = nats_server.url
    await js_stream(url, "SL", ["sl"])
    await sluice.typed("t", COLUMNS)
    appending, real = asyncio.Event(), sluice.broker.append_rows

    async def slow(*args: Any, **kwargs: Any) -> int:
        appending.set()
        await asyncio.sleep(1.0)
        return await real(*args, **kwargs)
    monkeypatch.setattr(sluice.broker, "append_rows", slow)
    await js_publish(url, "sl", docs(5))
    await sluice.create("j", "nats_jetstream", "t", **js(url, stream="SL", durable="d", ack_wait="10m"))
    await asyncio.wait_for(appending.wait(), 30)
    await sluice.sources.stop_source("default", "j")
    assert sorted(await sluice.column("t")) == list(range(5))    # written, though the stop gave up waiting
    assert sluice.state("j").status == "stopped" and sluice.state("j").lag is None   # no lag shown when stopped
    monkeypatch.setattr(sluice.broker, "append_rows", real)
    await sluice.sources.start_source("default", "j")
    await eventually(lambda: sluice.state("j").status == "running")
    await asyncio.sleep(1.5)
    assert sorted(await sluice.column("t")) == list(range(5))    # none twice
    await settled(sluice, url, "SL", "d")


async def test_a_stopped_source_shows_stopped_whatever_its_server_does_while_the_job_ends(
        sluice: Sluice, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop returns once the job has ended, and a JetStream job ends slowly (its batch in hand,
    its open request): the server going away and coming back meanwhile made nats-py's callbacks
    set the status again - failed ("disconnected ... reconnecting"), then running - so a stopped
    source showed failed or running, for good."""
    url = nats_server.url
    await _five_messages_and_writes_that_hang(sluice, url, monkeypatch)
    await sluice.create("j", "nats_jetstream", "t", **js(url, subject="h", durable="d"))
    await eventually(lambda: sluice.state("j").messages_in == 0 and sluice.state("j").status == "running")
    await asyncio.sleep(0.5)   # the batch is in hand, its append hung
    stop = asyncio.ensure_future(sluice.sources.stop_source("default", "j"))
    await asyncio.sleep(0.3)
    assert not stop.done()
    nats_server.stop()         # while the job ends
    await asyncio.sleep(0.3)
    nats_server.start()
    await stop
    await asyncio.sleep(1.5)   # nats-py's reconnect, had the job not closed the connection yet
    assert sluice.state("j").status == "stopped", sluice.state("j")
    assert sluice.state("j").message == ""


@contextlib.asynccontextmanager
async def a_puller(url: str, subject: str) -> AsyncIterator[tuple[nats.NATS, nats_source._Puller]]:
    """A job's puller on its own connection, over a stream of `subject` and a durable consumer."""
    await js_stream(url, subject.upper(), [subject])
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_consumer(subject.upper(), ConsumerConfig(durable_name="d",
                                                                          ack_policy=AckPolicy.EXPLICIT))
        yield nc, nats_source._Puller(nc, subject.upper(), "d", 10, asyncio.Event())
    finally:
        await nc.close()


async def test_a_request_no_longer_followed_after_a_reconnect_is_waited_out(nats_server: NatsServer,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """After a reconnect the job stops following its open request (its answer may be lost), but
    the server keeps it by its reply subject, which nats-py subscribes again: a stop that holds
    messages waits it out with the inbox still subscribed, and nothing is given back before."""
    monkeypatch.setattr(nats_source, "PULL_EXPIRES_S", 1.0)
    async with a_puller(nats_server.url, "l") as (_, puller):
        await puller.start()
        await puller._ask()
        before = time.monotonic()
        puller.reset()                  # what a reconnect does
        # from the reset: nats-py sends a request it had not sent yet when it reconnects
        lost_until = before + nats_source.PULL_EXPIRES_S + nats_source.STOP_GRACE_S + nats_source.ANSWER_GRACE_S
        assert puller.lost_until >= lost_until
        assert not puller.open and not puller.may_give_back()

        async def nothing_waiting() -> int:
            return 0
        await puller.stop(nothing_waiting, True, True)
        assert time.monotonic() >= lost_until and puller.may_give_back()


async def test_after_a_reconnect_no_request_is_asked_until_the_lost_one_has_expired(
        nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request no longer followed after a reconnect may still bring messages, and they carry the
    stream's subject, not the request's: were another request open meanwhile, they would count
    against it, and its end would be taken as seen while it still waited on the server."""
    monkeypatch.setattr(nats_source, "PULL_EXPIRES_S", 1.0)
    async with a_puller(nats_server.url, "l2") as (_, puller):
        asks: list[float] = []
        ask = puller._ask

        async def counted() -> None:
            asks.append(time.monotonic())
            await ask()
        puller._ask = counted           # type: ignore[method-assign]
        await puller.start()
        assert await puller.take(0.1) == [] and len(asks) == 1
        puller.reset()                  # what a reconnect does
        lost_until = puller.lost_until
        await js_publish(nats_server.url, "l2", docs(3))    # brought by the lost request, or the next one
        got: list[Any] = []
        while len(got) < 3:
            got += await puller.take(10)
        assert all(at >= lost_until for at in asks[1:]), (asks, lost_until)
        assert sorted(orjson.loads(m.data)["i"] for m in got) == [0, 1, 2]


async def test_a_408_before_the_open_request_can_have_expired_does_not_end_it(nats_server: NatsServer) -> None:
    """The server counts a request's expiry from when it got it: a 408 sooner is a late answer to
    a request no longer followed, and taken for the open one's it let a second request be asked
    (two then waiting on the server, one unseen at a stop)."""
    async with a_puller(nats_server.url, "l3") as (nc, puller):
        await puller.start()
        await puller._ask()
        late = Msg(nc, subject=puller.inbox, headers={"Status": "408", "Description": "Request Timeout"})
        await puller._on_msg(late)
        assert puller.open
        await asyncio.sleep(nats_source.PULL_EXPIRES_S / 2)
        await puller._on_msg(late)      # now it may be the open request's own
        assert not puller.open


# -- bad definitions ---------------------------------------------------------------------------------

GOOD = {"url": "nats://127.0.0.1:4222", "subject": "a.b", "data_type": "json"}


@pytest.mark.parametrize("props, prop", [
    ({k: v for k, v in GOOD.items() if k != "url"}, "url"),
    ({**GOOD, "url": "ws://127.0.0.1:4222"}, "url"),
    ({"url": GOOD["url"], "data_type": "json"}, "subject"),
    ({**GOOD, "subject": "a.*x"}, "subject"),
    ({**GOOD, "stream": "has.dot"}, "stream"),
    ({**GOOD, "stream": ""}, "stream"),
    ({k: v for k, v in GOOD.items() if k != "data_type"}, "data_type"),
    ({**GOOD, "durable": "a b"}, "durable"),
    ({**GOOD, "durable": "x.y"}, "durable"),
    ({**GOOD, "queue": "q*"}, "queue"),
    ({**GOOD, "deliver": "first"}, "deliver"),
    ({**GOOD, "bind": True}, "bind"),
    ({**GOOD, "bind": "yes"}, "bind"),
    ({**GOOD, "ack_wait": "30"}, "ack_wait"),
    ({**GOOD, "ack_wait": "0ms"}, "ack_wait"),
    ({**GOOD, "max_ack_pending": 0}, "max_ack_pending"),
    ({**GOOD, "max_ack_pending": 1.5}, "max_ack_pending"),
    ({**GOOD, "nak_delay": "-1s"}, "nak_delay"),
    ({**GOOD, "tls": {"disable": "no"}}, "tls.disable"),
    ({**GOOD, "url": "tls://h:1", "tls": {"disable": True}}, "tls.disable"),
    ({**GOOD, "tls.verify": True}, "tls.verify"),
])
async def test_bad_definitions_are_refused_naming_the_property(sluice: Sluice, props: dict[str, Any],
                                                               prop: str) -> None:
    await sluice.typed("t", COLUMNS)
    with pytest.raises(BrokerError) as e:
        await sluice.create("j", "nats_jetstream", "t", **props)
    assert e.value.code is ErrorCode.BAD_SOURCE, e.value.message
    assert f"property [{prop}]" in e.value.message, e.value.message
    assert sluice.sources.list("default") == []


# -- over a broker process ---------------------------------------------------------------------------

def _create_typed(broker: Any, name: str) -> None:
    status, body = rest(broker.http_url, "POST", "/api/v1beta2/streams",
                        {"name": name, "columns": [{"name": "i", "type": "int64"}, {"name": "tag", "type": "string"}]})
    assert status == 201, body


def _source(broker: Any, body: dict[str, Any]) -> dict[str, Any]:
    status, got = rest(broker.http_url, "POST", "/api/v1beta2/sources", body)
    assert status == 201, got
    return got  # type: ignore[no-any-return]


def test_rows_read_back_through_the_query_and_the_dis_door(start_broker: Any, nats_server: NatsServer) -> None:
    url = nats_server.url
    broker = start_broker()
    _create_typed(broker, "orders")
    asyncio.run(js_stream(url, "ORDERS", ["orders.*"]))
    asyncio.run(js_publish(url, "orders.new", docs(100, tag="n")))
    status, body = rest(broker.http_url, "POST", "/api/v1beta2/sources", {
        "name": "bad", "type": "nats_jetstream", "stream": "orders",
        "properties": {"url": url, "subject": "orders.*", "data_type": "json", "deliver": "first"}})
    assert status == 400 and "property [deliver]" in body["message"], body
    sid = _source(broker, {"name": "j", "type": "nats_jetstream", "stream": "orders",
                           "properties": {"url": [url], "subject": "orders.*", "data_type": "json",
                                          "durable": "sluice"}})["id"]

    def all_rows() -> list[list[Any]] | None:
        rows = tp_query(broker.http_url, "select i, tag from table(orders)")
        return rows if len(rows) >= 100 else None
    rows = asyncio.run(eventually(all_rows, what="100 rows"))
    assert sorted(map(tuple, rows)) == [(i, "n") for i in range(100)]
    records = [orjson.loads(d) for d in dis_read_all(broker.http_url, "orders")]
    assert sorted(r["i"] for r in records) == list(range(100))
    _, got = rest(broker.http_url, "GET", f"/api/v1beta2/sources/{sid}")
    assert got["status"] == "running" and got["stats"]["rows_written"] == 100 and got["stats"]["lag"] == 0


def test_a_graceful_broker_restart_duplicates_nothing(start_broker: Any, nats_server: NatsServer,
                                                      tmp_path: Path) -> None:
    url = nats_server.url
    data = tmp_path / "graceful-data"
    broker = start_broker(data_dir=data)
    _create_typed(broker, "g")
    asyncio.run(js_stream(url, "G", ["g"]))
    asyncio.run(Publisher(url, "g", 5000, per_second=1, backlog=5000)._run())
    sid = _source(broker, {"name": "j", "type": "nats_jetstream", "stream": "g",
                           "properties": {"url": url, "subject": "g", "data_type": "json", "durable": "d",
                                          "ack_wait": "10m", "max_ack_pending": 400}})["id"]

    def written() -> int:
        return int(rest(broker.http_url, "GET", f"/api/v1beta2/sources/{sid}")[1]["stats"]["rows_written"])
    asyncio.run(eventually(lambda: written() >= 1000, what="1000 rows"))
    assert broker.stop(30) == 0                       # SIGTERM mid-drain: the batch in hand is finished
    broker = start_broker(data_dir=data)

    def everything() -> list[bytes] | None:
        got = dis_read_all(broker.http_url, "g")
        return got if len({orjson.loads(d)["i"] for d in got}) >= 5000 else None
    records = asyncio.run(eventually(everything, 60, what="every message (ack_wait is 10 minutes)"))
    asyncio.run(asyncio.sleep(0.3))
    seen = [orjson.loads(d)["i"] for d in dis_read_all(broker.http_url, "g")]
    assert len(records) <= len(seen) == 5000 and set(seen) == set(range(5000))   # none lost, none twice


class Publisher(threading.Thread):
    """Publishes docs 0..n-1 with JetStream acks (each stored when counted), at a steady pace, on
    a thread and loop of its own, so the test can kill and restart the broker meanwhile."""

    def __init__(self, url: str, subject: str, n: int, per_second: float, backlog: int = 0) -> None:
        super().__init__(daemon=True)
        self.url, self.subject, self.n, self.per_second, self.backlog = url, subject, n, per_second, backlog
        self.sent = 0
        self.backlog_done = threading.Event()   # the first `backlog` are published as fast as they go
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # reported by the test
            self.error = e

    async def _run(self) -> None:
        nc = await nats.connect(self.url)
        js_ctx = nc.jetstream()
        for i in range(self.backlog):   # fast: plain publishes, then the stream's count says they are in
            await nc.publish(self.subject, orjson.dumps({"i": i, "tag": "crash"}))
        await nc.flush()
        stream = await js_ctx.find_stream_name_by_subject(self.subject)
        while (await js_ctx.stream_info(stream)).state.messages < self.backlog:  # noqa: ASYNC110 (polled)
            await asyncio.sleep(0.02)
        self.sent = self.backlog
        self.backlog_done.set()
        started = time.monotonic()
        for i in range(self.backlog, self.n):   # then paced, each acknowledged by the stream
            await js_ctx.publish(self.subject, orjson.dumps({"i": i, "tag": "crash"}))
            self.sent = i + 1
            ahead = started + (i + 1 - self.backlog) / self.per_second - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await nc.close()


CRASH_N = 10_000
CRASH_BACKLOG = 8000
CRASH_MAX_ACK_PENDING = 200


@pytest.mark.slow
def test_a_broker_crash_loses_nothing_and_duplicates_are_bounded(start_broker: Any, nats_server: NatsServer,
                                                                  tmp_path: Path) -> None:
    url = nats_server.url
    data = tmp_path / "crash-data"
    broker = start_broker(data_dir=data)
    _create_typed(broker, "crash")
    asyncio.run(js_stream(url, "CRASH", ["crash.>"]))
    # most messages wait in the stream when the source starts, so it drains them in full batches
    # when the kills come; the rest are published while the broker is killed and restarted
    publisher = Publisher(url, "crash.x", CRASH_N, per_second=1000, backlog=CRASH_BACKLOG)
    publisher.start()
    publisher.backlog_done.wait(60)

    def rows_written(proc: Any) -> int:
        try:
            status, got = rest(proc.http_url, "GET", f"/api/v1beta2/sources/{sid}", timeout=5)
        except OSError:
            return 0
        return int(got["stats"]["rows_written"]) if status == 200 else 0

    sid = _source(broker, {"name": "j", "type": "nats_jetstream", "stream": "crash",
                           "properties": {"url": url, "subject": "crash.>", "data_type": "json", "durable": "sluice",
                                          "ack_wait": "2s", "max_ack_pending": CRASH_MAX_ACK_PENDING}})["id"]
    kills = 0
    for threshold in (2000, 2000):   # rows this broker run wrote (counters start at 0 per run)
        asyncio.run(eventually(lambda b=broker, n=threshold: rows_written(b) >= n, 60,  # type: ignore[misc]
                               what=f"{threshold} rows"))
        broker.kill()
        kills += 1
        broker = start_broker(data_dir=data)             # the source runs again by itself
    publisher.join(60)
    assert publisher.error is None and publisher.sent == CRASH_N, publisher.error

    def everything() -> list[bytes] | None:
        got = dis_read_all(broker.http_url, "crash")
        return got if len({orjson.loads(d)["i"] for d in got}) >= CRASH_N else None
    records = asyncio.run(eventually(everything, 90, what="every message"))
    seen = [orjson.loads(d)["i"] for d in records]
    duplicates = len(seen) - len(set(seen))
    print(f"\ncrash test: {CRASH_N} messages, {kills} broker kills, {len(seen)} rows, {duplicates} duplicates "
          f"(bound {kills} x max_ack_pending = {kills * CRASH_MAX_ACK_PENDING})")
    assert set(seen) == set(range(CRASH_N))                          # none lost
    assert duplicates <= kills * CRASH_MAX_ACK_PENDING               # redeliveries bounded
    _, got = rest(broker.http_url, "GET", f"/api/v1beta2/sources/{sid}")
    assert got["status"] == "running", got
    rows = tp_query(broker.http_url, "select i from table(crash)")
    assert sorted(r[0] for r in rows) == sorted(seen)                # the query sees the same rows
    info = asyncio.run(consumer_info(url, "CRASH", "sluice"))
    assert info.num_pending == 0


async def _five_messages_and_writes_that_hang(sluice: Sluice, url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """JetStream stream H (subject h) holding 5 messages, a typed stream t, and every Sink.write
    hung for good; returns the real Sink.write (to set back)."""
    from broker.sources.sink import Sink
    await js_stream(url, "H", ["h"])
    await sluice.typed("t", COLUMNS)
    await js_publish(url, "h", docs(5))
    write = Sink.write

    async def hung(self: Sink, payloads: Any) -> int:
        await asyncio.Event().wait()
        return await write(self, payloads)
    monkeypatch.setattr(Sink, "write", hung)
    return write


async def raw_consumer(url: str, stream: str, durable: str, **limits: int) -> None:
    """A durable consumer with explicit acks and server-side `limits` (max_batch, max_bytes,
    max_waiting, ...: nats-py's ConsumerConfig leaves some out), made by the raw API request."""
    async def make(j: Any) -> None:
        config = {"durable_name": durable, "ack_policy": "explicit", **limits}
        reply = await j._nc.request(f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                                    orjson.dumps({"stream_name": stream, "config": config}))
        assert b'"error"' not in reply.data, reply.data
    await with_js(url, make)
