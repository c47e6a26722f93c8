"""The `nats` source (core NATS) against a real nats-server on loopback: messages published arrive as
rows, read back by a query (in-process, and over a broker process's Timeplus door) and through the
DIS door; wildcard subjects, queue groups, text payloads, a bad JSON message counted and skipped,
stop/start, the server going away and coming back, an unreachable server, TLS, every bad
definition refused naming the property (shared/spec/sources.md section 4), and a job's connection
closed even when its close is cut short.
"""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from broker import natsconn
from broker.errors import BrokerError, ErrorCode
from broker.sources import nats as nats_source
from broker.sources.base import Backoff, JobContext
from broker.sources.model import SourceState
from broker.sources.props import Props
from sources.conftest import (
    NatsServer,
    P,
    Sluice,
    dis_read_all,
    docs,
    eventually,
    free_port,
    js_stream,
    publish,
    rest,
    tp_query,
)

COLUMNS = [("i", "int64"), ("tag", "string")]


async def rows_of(s: Sluice, stream: str, n: int) -> list[Any]:
    """Waits until the stream holds at least n rows; its column i."""
    async def enough() -> list[Any] | None:
        got = await s.column(stream)
        return got if len(got) >= n else None
    return await eventually(enough, what=f"{n} rows in {stream}")  # type: ignore[no-any-return]


async def subscribed(s: Sluice, name: str) -> None:
    """Running (subscribed) and settled: core NATS drops what is published before the subscription."""
    await eventually(lambda: s.state(name).status == "running" and s.state(name).message == "",
                     what=f"{name} running")
    await asyncio.sleep(0.2)


async def test_messages_on_wildcard_subjects_arrive_as_rows(sluice: Sluice, nats_server: NatsServer) -> None:
    await sluice.typed("t", COLUMNS)
    await sluice.typed("u", COLUMNS)
    await sluice.create("one", "nats", "t", url=nats_server.url, subject="orders.*", data_type="json")
    await sluice.create("rest", "nats", "u", url=[nats_server.url], subject="orders.>", data_type="json")
    await subscribed(sluice, "one")
    await subscribed(sluice, "rest")
    await publish(nats_server.url, "orders.eu", docs(3, 0, tag="eu"))
    await publish(nats_server.url, "orders.us.west", docs(2, 100, tag="us"))   # > only
    await publish(nats_server.url, "invoices.eu", docs(2, 200, tag="no"))     # neither
    assert sorted(await rows_of(sluice, "u", 5)) == [0, 1, 2, 100, 101]
    assert sorted(await rows_of(sluice, "t", 3)) == [0, 1, 2]
    rows = await sluice.query("select i, tag from table(t)")
    assert sorted(map(tuple, rows)) == [(0, "eu"), (1, "eu"), (2, "eu")]
    st = sluice.state("one")
    assert (st.status, st.messages_in, st.rows_written, st.errors) == ("running", 3, 3, 0)
    assert st.lag == 0 and st.last_event_ms > 0


async def test_queue_group_members_share_the_messages(sluice: Sluice, nats_server: NatsServer) -> None:
    await sluice.typed("t", COLUMNS)
    for name in ("a", "b"):
        await sluice.create(name, "nats", "t", url=nats_server.url, subject="jobs", data_type="json",
                            queue="workers")
        await subscribed(sluice, name)
    await publish(nats_server.url, "jobs", docs(400))
    got = await rows_of(sluice, "t", 400)
    await asyncio.sleep(0.3)
    got = await sluice.column("t")
    assert sorted(got) == list(range(400))                 # each message once, none twice
    a, b = sluice.state("a").rows_written, sluice.state("b").rows_written
    assert a + b == 400 and a > 0 and b > 0, (a, b)


async def test_text_messages_and_a_bad_json_message(sluice: Sluice, nats_server: NatsServer) -> None:
    await sluice.typed("t", COLUMNS)
    await sluice.typed("raw", [("raw", "string")])
    await sluice.create("j", "nats", "t", url=nats_server.url, subject="in", data_type="json")
    await sluice.create("x", "nats", "raw", url=nats_server.url, subject="in", data_type="text")
    await subscribed(sluice, "j")
    await subscribed(sluice, "x")
    await publish(nats_server.url, "in", ['{"i": 1}', "not json", "[1, 2]", '{"i": 2, "tag": "ok"}'])
    assert sorted(await rows_of(sluice, "t", 2)) == [1, 2]
    texts = await eventually(lambda: _texts(sluice), what="4 text rows")
    assert texts == ['{"i": 1}', "not json", "[1, 2]", '{"i": 2, "tag": "ok"}']
    st = sluice.state("j")
    assert (st.status, st.messages_in, st.rows_written, st.errors) == ("running", 4, 2, 2)
    assert "not JSON" in st.error_log[0][1] and "not a JSON object" in st.last_error


async def test_a_stream_without_a_schema_takes_text_messages_as_their_bytes(sluice: Sluice,
                                                                           nats_server: NatsServer) -> None:
    """sink.py and the README: a plain log takes a `text` message's bytes as they are. Bytes that
    are not UTF-8 were counted as errors and skipped."""
    await sluice.broker.create_stream("plain", 1, project=P)
    await sluice.create("x", "nats", "plain", url=nats_server.url, subject="bytes", data_type="text")
    await subscribed(sluice, "x")
    sent = [b"\xff\xfe binary", "caf\u00e9".encode(), b"", b"\x00\x01"]
    await publish(nats_server.url, "bytes", sent)

    async def stored() -> list[bytes] | None:
        cursor = await sluice.broker.get_cursor("plain", 0, "TRIM_HORIZON", project=P)
        got = [r.data for r in (await sluice.broker.get_records(cursor, 100, project=P)).records]
        return got if len(got) >= len(sent) else None
    assert await eventually(stored, what="every message stored") == sent
    await eventually(lambda: sluice.state("x").rows_written == 4, what="the rows counted")   # once the append returned
    st = sluice.state("x")
    assert (st.messages_in, st.rows_written, st.errors) == (4, 4, 0)


async def test_a_stream_without_a_schema_takes_json_messages_as_they_were_sent(sluice: Sluice,
                                                                                nats_server: NatsServer) -> None:
    """README: into a stream without a schema a JSON object is written as the record itself. The
    sink read each message and wrote orjson's re-encoding of it: an integer past 64 bits became a
    float (123456789012345678901234567890 -> 1.2345678901234568e+29) and a decimal lost its
    digits (1.00000000000000000001 -> 1.0), so the stored record was not what was sent."""
    await sluice.broker.create_stream("plainjson", 1, project=P)
    await sluice.create("x", "nats", "plainjson", url=nats_server.url, subject="objs", data_type="json")
    await subscribed(sluice, "x")
    sent = [b'{"id": 123456789012345678901234567890, "amount": 1.00000000000000000001}',
            b'{"a":1E2,"b":"caf\\u00e9"}', b"[1]"]
    await publish(nats_server.url, "objs", sent)
    await eventually(lambda: sluice.state("x").messages_in == 3 and sluice.state("x").rows_written == 2,
                     what="the messages handled")
    cursor = await sluice.broker.get_cursor("plainjson", 0, "TRIM_HORIZON", project=P)
    assert [r.data for r in (await sluice.broker.get_records(cursor, 100, project=P)).records] == sent[:2]
    assert sluice.state("x").errors == 1   # the array is no object: counted and skipped, as before


async def _texts(s: Sluice) -> list[str] | None:
    rows = [r[0] for r in await s.query("select raw from table(raw)")]
    return rows if len(rows) >= 4 else None


async def test_prefetch_count_bounds_the_buffer_and_drops_are_counted(sluice: Sluice,
                                                                     nats_server: NatsServer) -> None:
    await sluice.typed("t", COLUMNS)
    await sluice.create("n", "nats", "t", url=nats_server.url, subject="burst", data_type="json", prefetch_count=10)
    await subscribed(sluice, "n")
    await publish(nats_server.url, "burst", docs(5000))

    async def accounted() -> bool:
        st = sluice.state("n")
        return bool(st.rows_written + st.errors == 5000)
    await eventually(accounted, what="every message written or counted as dropped")
    st = sluice.state("n")
    assert st.errors > 0 and "slow consumer" in st.last_error and st.status == "running"
    assert len(await sluice.column("t")) == st.rows_written


async def test_a_flood_of_big_messages_is_bounded_in_bytes_not_only_in_count(nats_server: NatsServer) -> None:
    """A writer that cannot keep up (here: stuck) and big messages: the job holds at most
    BUFFER_BYTES beyond nats-py's own bounded queue, and appends at most MAX_BATCH_BYTES at once.
    By count alone (prefetch_count's 524,288) a flood of 32 KiB messages drove a broker past 3 GB."""
    size, count = 512 << 10, 120   # 60 MiB published, under nats-py's own 64 MiB queue
    taken: list[list[bytes]] = []
    release = asyncio.Event()

    class StuckSink:
        async def write(self, batch: list[bytes]) -> None:
            taken.append(batch)
            await release.wait()

    ctx = JobContext(sink=StuckSink(), state=SourceState(), backoff=Backoff())  # type: ignore[arg-type]
    config = nats_source.NatsConfig(nats_source.Connection((nats_server.url,), True, False), "big", "text", None,
                                    None, nats_source.DEFAULT_PREFETCH)
    job = nats_source.NatsJob(config)
    running = asyncio.ensure_future(job.run(ctx))
    try:
        await eventually(lambda: ctx.state.status == "running", what="subscribed")
        await publish(nats_server.url, "big", [bytes([65 + i % 26]) * size for i in range(count)])
        held = lambda: sum(map(len, job._buf))  # noqa: E731
        # the job's buffer fills up to its bound, and then waits: nats-py keeps the rest
        await eventually(lambda: held() >= nats_source.BUFFER_BYTES, what="the buffer full")
        await asyncio.sleep(0.5)
        assert held() < nats_source.BUFFER_BYTES + size
        assert len(taken) == 1 and sum(map(len, taken[0])) <= nats_source.MAX_BATCH_BYTES
        release.set()   # the writer catches up: every message comes through, in order, none dropped
        await eventually(lambda: sum(map(len, taken)) == count, what="every message written")
        assert [m for batch in taken for m in batch] == [bytes([65 + i % 26]) * size for i in range(count)]
        assert all(sum(map(len, b)) <= nats_source.MAX_BATCH_BYTES for b in taken)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_stop_means_no_rows_and_start_means_rows_again(sluice: Sluice, nats_server: NatsServer) -> None:
    await sluice.typed("t", COLUMNS)
    await sluice.create("n", "nats", "t", url=nats_server.url, subject="s", data_type="json")
    await subscribed(sluice, "n")
    await publish(nats_server.url, "s", docs(5))
    await rows_of(sluice, "t", 5)
    stopped = await sluice.sources.stop_source("default", "n")
    assert stopped.state.status == "stopped" and stopped.state.lag is None
    await publish(nats_server.url, "s", docs(5, 100))      # core NATS: nobody listens, they are gone
    await sluice.sources.start_source("default", "n")
    await subscribed(sluice, "n")
    await publish(nats_server.url, "s", docs(5, 200))
    await rows_of(sluice, "t", 10)
    await asyncio.sleep(0.2)
    assert sorted(await sluice.column("t")) == [0, 1, 2, 3, 4, 200, 201, 202, 203, 204]


async def test_a_server_error_that_ends_the_connection_is_named_in_the_status(sluice: Sluice,
                                                                              nats_server: NatsServer) -> None:
    """nats-py keeps a protocol error the server closes the connection for (-ERR) as its own last
    error and calls no error callback, so the source said only 'lost the connection to NATS at
    ...' - here for a subject past the server's 4 KiB control line, which create takes (the
    server's limit can be raised) and no retry will ever get past."""
    await sluice.typed("t", COLUMNS)
    await sluice.create("long", "nats", "t", url=nats_server.url, subject="a" * 5000, data_type="json")
    st = await eventually(lambda: sluice.state("long").errors > 0 and sluice.state("long"), what="a failure")
    assert "maximum control line exceeded" in st.last_error.lower(), st.last_error


async def test_the_server_going_away_shows_failed_then_running(sluice: Sluice, nats_server: NatsServer) -> None:
    await sluice.typed("t", COLUMNS)
    await sluice.create("n", "nats", "t", url=nats_server.url, subject="s", data_type="json")
    await subscribed(sluice, "n")
    await publish(nats_server.url, "s", docs(3))
    await rows_of(sluice, "t", 3)
    nats_server.stop()
    st = await eventually(lambda: sluice.state("n").status == "failed" and sluice.state("n"), what="failed")
    assert "NATS" in st.message and nats_server.url in st.message, st.message
    nats_server.start()
    await subscribed(sluice, "n")
    await publish(nats_server.url, "s", docs(3, 10))
    assert sorted(await rows_of(sluice, "t", 6)) == [0, 1, 2, 10, 11, 12]


async def test_an_unreachable_server_fails_the_source_until_it_answers(sluice: Sluice, tmp_path: Path) -> None:
    await sluice.typed("t", COLUMNS)
    server = NatsServer(tmp_path / "late", free_port())
    await sluice.create("n", "nats", "t", url=f"nats://127.0.0.1:{server.port}", subject="s", data_type="json")
    st = await eventually(lambda: sluice.state("n").status == "failed" and sluice.state("n"), what="failed")
    assert st.message.startswith(f"ConnectionError: cannot connect to NATS at nats://127.0.0.1:{server.port}"), \
        st.message
    await eventually(lambda: sluice.state("n").errors >= 2, what="retries")   # retried, not given up
    server.start()
    try:
        await subscribed(sluice, "n")
        await publish(server.url, "s", docs(2))
        assert sorted(await rows_of(sluice, "t", 2)) == [0, 1]
    finally:
        server.stop()


async def test_stopping_is_prompt_while_the_server_is_unreachable(sluice: Sluice) -> None:
    await sluice.typed("t", COLUMNS)
    # a black hole: a port nobody listens on, behind an address that drops packets is not portable;
    # a closed port plus nats-py's own retries is what a stop must not wait on
    for k in range(5):
        await sluice.create(f"n{k}", "nats", "t", url=f"nats://127.0.0.1:{free_port()}", subject="s",
                            data_type="json")
    await asyncio.sleep(0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for k in range(5):
        await sluice.sources.stop_source("default", f"n{k}")
    assert loop.time() - started < 10
    assert all(sluice.state(f"n{k}").status == "stopped" for k in range(5))


# -- TLS ---------------------------------------------------------------------------------------------

@pytest.fixture
def tls_server(tmp_path: Path) -> Any:
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = NatsServer(tmp_path / "tls-store", extra=("--tls", "--tlscert", str(cert), "--tlskey", str(key))).start()
    yield server
    server.stop()


async def test_tls(sluice: Sluice, tls_server: NatsServer, nats_server: NatsServer) -> None:
    await sluice.typed("t", COLUMNS)
    tls_url = f"tls://127.0.0.1:{tls_server.port}"
    await sluice.create("ok", "nats", "t", url=tls_url, subject="s", data_type="json",
                        **{"tls.skip_verify_server": True})
    # nats:// and tls.disable false: TLS because the server requires it (nested spelling of the key)
    await sluice.create("ok2", "nats", "t", url=f"nats://127.0.0.1:{tls_server.port}", subject="s2",
                        data_type="json", tls={"disable": False, "skip_verify_server": "true"})
    await sluice.create("unverified", "nats", "t", url=tls_url, subject="s", data_type="json")
    await sluice.create("disabled", "nats", "t", url=f"nats://127.0.0.1:{tls_server.port}", subject="s",
                        data_type="json", **{"tls.disable": True})
    await sluice.create("plain", "nats", "t", url=f"tls://127.0.0.1:{nats_server.port}", subject="s",
                        data_type="json", **{"tls.skip_verify_server": True})
    await subscribed(sluice, "ok")
    await subscribed(sluice, "ok2")
    st = await eventually(lambda: sluice.state("unverified").status == "failed" and sluice.state("unverified"))
    assert "certificate" in st.message.lower(), st.message
    st = await eventually(lambda: sluice.state("disabled").status == "failed" and sluice.state("disabled"))
    assert "requires TLS and tls.disable is true" in st.message, st.message
    st = await eventually(lambda: sluice.state("plain").status == "failed" and sluice.state("plain"))
    assert "asks for TLS (tls://) but the NATS server" in st.message, st.message

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    nc = await nats.connect(tls_url, tls=ctx)
    for d in docs(3):
        await nc.publish("s", d)
    await nc.publish("s2", orjson.dumps({"i": 9}))
    await nc.flush()
    await nc.close()
    assert sorted(await rows_of(sluice, "t", 4)) == [0, 1, 2, 9]


# -- bad definitions ---------------------------------------------------------------------------------

GOOD = {"url": "nats://127.0.0.1:4222", "subject": "a.b", "data_type": "json"}


@pytest.mark.parametrize("props, prop", [
    ({k: v for k, v in GOOD.items() if k != "url"}, "url"),
    ({**GOOD, "url": "http://127.0.0.1:4222"}, "url"),
    ({**GOOD, "url": "nats://"}, "url"),
    ({**GOOD, "url": 4222}, "url"),
    ({**GOOD, "url": []}, "url"),
    ({**GOOD, "url": ["nats://a:4222", "ws://b:80"]}, "url"),
    ({**GOOD, "url": "nats://a:99999"}, "url"),
    # a server list past 100: 300,000 were taken, their checks holding the event loop ~5 s (every
    # door waited), and GET answered the 7.8 MB definition
    ({**GOOD, "url": [f"nats://127.0.0.1:{10000 + i}" for i in range(101)]}, "url"),
    ({**GOOD, "url": ",".join(f"nats://127.0.0.1:{10000 + i}" for i in range(101))}, "url"),
    ({**GOOD, "url": ["nats://127.0.0.1:4222/" + "a" * 70_000]}, "url"),   # every string property: 64 KiB
    ({k: v for k, v in GOOD.items() if k != "subject"}, "subject"),
    ({**GOOD, "subject": ""}, "subject"),
    ({**GOOD, "subject": "a..b"}, "subject"),
    ({**GOOD, "subject": "a.b*"}, "subject"),
    ({**GOOD, "subject": "a.>.b"}, "subject"),
    ({**GOOD, "subject": "a b"}, "subject"),
    ({**GOOD, "subject": 5}, "subject"),
    ({k: v for k, v in GOOD.items() if k != "data_type"}, "data_type"),
    ({**GOOD, "data_type": "xml"}, "data_type"),
    ({**GOOD, "queue": "two words"}, "queue"),
    ({**GOOD, "queue": 7}, "queue"),
    ({**GOOD, "nak_delay": "soon"}, "nak_delay"),
    ({**GOOD, "prefetch_count": 0}, "prefetch_count"),
    ({**GOOD, "prefetch_count": "many"}, "prefetch_count"),
    ({**GOOD, "tls.disable": "maybe"}, "tls.disable"),
    ({**GOOD, "tls": {"skip_verify_server": 1}}, "tls.skip_verify_server"),
    ({**GOOD, "url": "tls://127.0.0.1:4222", "tls.disable": True}, "tls.disable"),
    ({**GOOD, "durable": "d"}, "durable"),          # a JetStream property: not this type's
    ({**GOOD, "subjet": "a"}, "subjet"),
])
async def test_bad_definitions_are_refused_naming_the_property(sluice: Sluice, props: dict[str, Any],
                                                               prop: str) -> None:
    await sluice.typed("t", COLUMNS)
    with pytest.raises(BrokerError) as e:
        await sluice.create("n", "nats", "t", **props)
    assert e.value.code is ErrorCode.BAD_SOURCE, e.value.message
    assert f"property [{prop}]" in e.value.message, e.value.message
    assert sluice.sources.list("default") == []


async def test_good_spellings_are_taken(sluice: Sluice) -> None:
    await sluice.typed("t", COLUMNS)
    await sluice.typed("raw", [("raw", "string")])
    source = await sluice.create("n", "nats", "t", url="nats://127.0.0.1:1, tls://127.0.0.1:2", subject="a.*.>",
                                 data_type="json", queue="q.1", nak_delay="1m30s", prefetch_count="100",
                                 **{"tls.disable": "false", "tls.skip_verify_server": False})
    assert source.definition.properties["url"] == "nats://127.0.0.1:1, tls://127.0.0.1:2"   # as given
    with pytest.raises(BrokerError) as e:   # text goes to a column raw
        await sluice.create("x", "nats", "t", url="nats://h:1", subject="a", data_type="text")
    assert "property [data_type]" in e.value.message
    await sluice.create("x", "nats", "raw", url="nats://h:1", subject="a", data_type="text")


def test_a_password_with_a_comma_is_one_url() -> None:
    """A comma may be in a URL's password (RFC 3986 userinfo), and shown_url splits a url string
    only at a comma before a scheme; the property itself was cut at every comma, so
    nats://bob:pa,ss@host was refused at create ("[ss@host:4222] must start with nats://"), and a
    list string with such a password named the password's tail in the message."""
    one = "nats://bob:pa,ss@127.0.0.1:4222"
    config = nats_source.configure_nats(Props({"url": one, "subject": "a", "data_type": "json"}))
    assert config.conn.urls == (one,)
    config = nats_source.configure_nats(Props({"url": f"{one}, tls://127.0.0.1:2", "subject": "a",
                                               "data_type": "json"}))
    assert config.conn.urls == (one, "tls://127.0.0.1:2")


# -- over a broker process: REST, the Timeplus query, the DIS door -------------------------------------

def test_over_a_broker_process(start_broker: Any, nats_server: NatsServer) -> None:
    broker = start_broker()
    status, body = rest(broker.http_url, "POST", "/api/v1beta2/streams", {
        "name": "orders", "columns": [{"name": "i", "type": "int64"}, {"name": "tag", "type": "string"}]})
    assert status == 201, body
    status, body = rest(broker.http_url, "POST", "/api/v1beta2/sources",
                        {"name": "bad", "type": "nats", "stream": "orders",
                         "properties": {"url": nats_server.url, "subject": "a..b", "data_type": "json"}})
    assert status == 400 and "property [subject]" in body["message"], body
    status, body = rest(broker.http_url, "POST", "/api/v1beta2/sources",
                        {"name": "n", "type": "nats", "stream": "orders",
                         "properties": {"url": nats_server.url, "subject": "orders.*", "data_type": "json"}})
    assert status == 201 and body["status"] == "running", body
    sid = body["id"]

    def running() -> bool:
        _, got = rest(broker.http_url, "GET", f"/api/v1beta2/sources/{sid}")
        return bool(got["status"] == "running" and got["message"] == "")
    asyncio.run(eventually(running, what="running"))
    asyncio.run(asyncio.sleep(0.3))
    asyncio.run(publish(nats_server.url, "orders.x", docs(20, tag="x")))

    def all_rows() -> list[list[Any]] | None:
        rows = tp_query(broker.http_url, "select i, tag from table(orders)")
        return rows if len(rows) >= 20 else None
    rows = asyncio.run(eventually(all_rows, what="20 rows"))
    assert sorted(map(tuple, rows)) == [(i, "x") for i in range(20)]
    records = [orjson.loads(d) for d in dis_read_all(broker.http_url, "orders")]
    assert sorted(r["i"] for r in records) == list(range(20)) and all(r["tag"] == "x" for r in records)
    _, stats = rest(broker.http_url, "GET", f"/api/v1beta2/sources/{sid}/stats")
    assert stats["messages_in"] == stats["rows_written"] == 20 and stats["error_count"] == 0
    assert rest(broker.http_url, "DELETE", f"/api/v1beta2/sources/{sid}")[0] == 204


async def test_a_close_cut_short_still_closes_the_socket(nats_server: NatsServer) -> None:
    # a job's close cancelled at nats-py's first pause (a broker stop that runs out of time) left
    # the socket open: it outlived the job and its event loop (a ResourceWarning, a leaked fd)
    ctx = JobContext(sink=None, state=SourceState(), backoff=Backoff())  # type: ignore[arg-type]
    link = nats_source._Link(nats_source.Connection((nats_server.url,), True, False), ctx, lambda: None)
    nc = await link.open()
    writer = nc._transport._io_writer
    closing = asyncio.ensure_future(link.close())
    await asyncio.sleep(0)      # into nats-py's close, which yields before it closes its transport
    assert not closing.done() and not writer.transport.is_closing()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert writer.transport.is_closing()


async def test_connections_share_one_tls_context(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connect made its own SSLContext, loading the system's CA store again: ~0.8 MB a running
    source, and RSS crept up as sources were made and deleted (the sources probe)."""
    nats_source._tls_context.cache_clear()
    made: list[ssl.SSLContext] = []
    real = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(nats_source.ssl, "create_default_context", counted)
    links = []
    for _ in range(5):
        ctx = JobContext(sink=None, state=SourceState(), backoff=Backoff())  # type: ignore[arg-type]
        link = nats_source._Link(nats_source.Connection((nats_server.url,), False, False), ctx, lambda: None)
        await link.open()
        links.append(link)
    for link in links:
        await link.close()
    assert len(made) == 1


async def test_a_stop_while_a_connect_is_being_ended_is_not_swallowed() -> None:
    # connect_or_give_up cancels nats-py's connect until it ends; a stop (cancel) of its caller
    # meanwhile was swallowed, so a stopped source went on as if its connect had merely failed
    let_go = asyncio.Event()

    async def stubborn() -> None:   # ignores cancels until let go (Python 3.11's wait_for can swallow one)
        while not let_go.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await let_go.wait()

    refused = asyncio.Event()
    refused.set()    # given up at once: the clean-up is what takes time
    caller = asyncio.ensure_future(natsconn.connect_or_give_up(stubborn(), refused, 10, 30))
    await asyncio.sleep(0.1)
    assert not caller.done()
    caller.cancel()
    await asyncio.sleep(0.1)
    let_go.set()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_the_nats_the_broker_keeps_its_data_on_cannot_be_a_source(
        nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """--store jetstream: a source on the store's own NATS read every project's records and
    metadata (the catalogue, other projects' source passwords) from the KV bucket and the
    JetStream API replies, and one on `>` fed itself. Refused when it connects, both source types;
    the same server for a broker on RocksDB is an ordinary origin (the other tests here)."""
    from broker.core.broker import Broker
    from broker.model import ColumnDef, StreamSchema
    from broker.sources import base
    from broker.sources.manager import Sources
    from broker.storage.jetstream import JetStreamStore
    from sources.conftest import P, _fast_backoff

    monkeypatch.setattr(base.Backoff, "__init__", _fast_backoff)
    store = await JetStreamStore.open([nats_server.url], prefix="own", replicas=1)
    broker = Broker(store, cursor_secret=b"k" * 32)
    await broker.start()
    sources = Sources(broker)
    await sources.start()
    try:
        await broker.create_stream("t", 1, project=P, schema=StreamSchema((ColumnDef("raw", "string"),)))
        for name, type_, props in (("core", "nats", {"subject": ">"}),
                                   ("js", "nats_jetstream", {"stream": "KV_own_meta"})):
            await sources.create(P, {"name": name, "type": type_, "stream": "t",
                                     "properties": {"url": nats_server.url, "data_type": "text", **props}})
            await eventually(lambda n=name: "keeps its data on" in sources.get(P, n).state.last_error,
                             what=f"{name} refused")
            assert sources.get(P, name).state.rows_written == 0
        assert store.own_servers() and all(s.startswith(("server ", "cluster ")) for s in store.own_servers())
    finally:
        await sources.close()
        await broker.close()
        await store.close()


@pytest.mark.parametrize("userinfo, shown, secret", [
    ("bob:NATSPASSWORD456", "bob:***@127.0.0.1", "NATSPASSWORD456"),
    # NATS's token auth: nats-py sends a user without a password as the token
    ("NATSTOKEN789", "nats://***@127.0.0.1", "NATSTOKEN789"),
])
async def test_a_password_or_token_in_the_url_is_never_in_the_status(
        sluice: Sluice, caplog: pytest.LogCaptureFixture, userinfo: str, shown: str, secret: str) -> None:
    """Status messages are shown to every role (and logged): the password was in them, and a token
    too, which was also shown to the roles that may not manage sources."""
    from broker.sources.props import redacted

    await sluice.typed("t", COLUMNS)
    url = f"nats://{userinfo}@127.0.0.1:{free_port()}"
    for name, type_, extra in (("core", "nats", {"subject": "a"}), ("js", "nats_jetstream", {"stream": "S"})):
        await sluice.create(name, type_, "t", url=url, data_type="json", **extra)
        await eventually(lambda n=name: sluice.state(n).errors > 0, what=f"{name} failed")
        st = sluice.state(name)
        assert shown in st.last_error, st.last_error
        assert secret not in st.message + st.last_error
    assert secret not in caplog.text
    assert secret not in str(redacted({"url": url})) + str(redacted({"url": [url, url]}))


DENIED = """
authorization {
  users = [
    { user: admin, password: admin }
    { user: limited, password: limited, permissions: {
        subscribe: { deny: ["secret.>"] }, publish: { deny: ["$JS.API.CONSUMER.MSG.NEXT.>"] } } }
  ]
}
"""


async def test_a_subscription_or_pull_the_server_refuses_fails_the_source_with_the_reason(
        sluice: Sluice, tmp_path: Path) -> None:
    """A permissions violation on what the job needs (its subject; a JetStream job's pull
    requests): the server answers -ERR and keeps the connection, and the source showed running
    with no error, receiving nothing, for good."""
    conf = tmp_path / "denied.conf"
    conf.write_text(DENIED)
    server = NatsServer(tmp_path / "denied-store", extra=("-c", str(conf))).start()
    try:
        await js_stream(f"nats://admin:admin@127.0.0.1:{server.port}", "S", ["s.>"])
        url = f"nats://limited:limited@127.0.0.1:{server.port}"
        await sluice.typed("t", COLUMNS)
        await sluice.create("core", "nats", "t", url=url, data_type="json", subject="secret.x")
        await sluice.create("js", "nats_jetstream", "t", url=url, data_type="json", stream="S", durable="d")
        for name, what in (("core", 'subscription to "secret.x"'), ("js", "publish to")):
            st = await eventually(lambda n=name: sluice.state(n).status == "failed" and sluice.state(n),
                                  what=f"{name} failed")
            assert "permissions violation" in st.message.lower() and what in st.message.lower(), st.message
            assert "limited:***@" in st.message and "limited:limited" not in st.message
    finally:
        server.stop()

