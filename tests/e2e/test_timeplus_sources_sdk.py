"""Sources through the unmodified `timeplus` SDK (1.4.1) against a broker process: create, list,
get, exist, stop, start and delete a stream_generator source (shared/spec/timeplus-api.md section
6), its rows read back by a query, stats and updates over the REST shape the SDK's models describe,
and bad definitions answered 400 with an ErrorResponse naming the property.
"""
from __future__ import annotations

import json
from typing import Any

import pytest
from swagger_client.rest import ApiException
from timeplus import Source
from timeplus_sdk_helpers import bounded, create_stream, env, env_for, new_name, wait_until, ws  # noqa: F401 (fixtures)

from tests.conftest import rest

IOT = [("device", "string"), ("number", "float64"), ("time", "datetime64(3)")]


def count(env: Any, stream: str) -> int:
    return bounded(env, f"select count() from table({stream})").rows[0][0]


def test_the_sdk_creates_lists_gets_stops_starts_and_deletes_a_source(env):
    stream = new_name()
    create_stream(env, stream, IOT)
    source = (Source(env).name("gen").type("stream_generator").stream(stream)
              .properties({"template": "iot", "interval": 20}).description("demo").create())
    meta = source.metadata()
    sid = meta["id"]
    assert (meta["name"], meta["type"], meta["stream"], meta["description"]) == ("gen", "stream_generator", stream,
                                                                                 "demo")
    assert meta["status"] == "running" and meta["start_time"] > 0
    assert meta["properties"] == {"template": "iot", "interval": 20}

    listed = Source(env).list()
    assert [(s.id, s.name, s.status) for s in listed] == [(sid, "gen", "running")]
    assert Source(env).id(sid).exist()
    got = Source(env).id(sid).get().metadata()
    assert got["stream"] == stream and got["message"] == ""

    wait_until(lambda: count(env, stream) >= 10, what="generated rows")
    rows = bounded(env, f"select device, number from table({stream}) limit 5").rows
    assert all(d in ("device_0", "device_1", "device_2") and 0 <= n <= 100 for d, n in rows)

    assert Source(env).id(sid).stop() is not False
    assert Source(env).id(sid).get().metadata()["status"] == "stopped"
    stopped_at = count(env, stream)
    wait_until(lambda: count(env, stream) == stopped_at, what="a stable count")   # settled
    assert count(env, stream) == stopped_at

    assert Source(env).id(sid).start() is not False
    assert Source(env).id(sid).get().metadata()["status"] == "running"
    wait_until(lambda: count(env, stream) >= stopped_at + 10, what="rows after start")

    Source(env).id(sid).delete()
    assert not Source(env).id(sid).exist()
    assert Source(env).list() == []


def test_sources_belong_to_their_workspace(broker, env, ws):
    stream = new_name()
    create_stream(env, stream, IOT)
    Source(env).name("gen").type("stream_generator").stream(stream).properties({"template": "iot"}).create()
    other = env_for(broker.http_url, new_name("ws"))
    assert Source(other).list() == []
    assert [s.name for s in Source(env).list()] == ["gen"]
    Source(env).id("gen").delete()      # by name as well as by id


def test_update_stats_and_errors_over_rest(broker, env, ws):
    stream = new_name()
    create_stream(env, stream, IOT)
    base = f"/{ws}/api/v1beta2/sources"
    status, created = rest(broker, "POST", base, {"name": "g", "type": "stream_generator", "stream": stream,
                                                  "properties": {"template": "iot", "interval": "10ms"}})
    assert status == 201
    sid = created["id"]
    status, body = rest(broker, "PUT", f"{base}/{sid}", {"description": "x"})
    assert status == 400 and body["reason"] == "SOURCE_RUNNING"
    wait_until(lambda: rest(broker, "GET", f"{base}/{sid}/stats")[1]["success_count"] >= 5, what="stats")
    status, stats = rest(broker, "GET", f"{base}/{sid}/stats?error_log_time_range=1h&metrics_time_range=1h")
    assert status == 200 and stats["errors"] == [] and stats["failure_count"] == 0
    assert sum(t["value"] for t in stats["throughput"]) == stats["success_count"] == stats["rows_written"]
    assert rest(broker, "POST", f"{base}/{sid}/stop")[0] == 204
    assert rest(broker, "POST", f"{base}/{sid}/stop")[0] == 204        # stop on a stopped source: no-op
    status, body = rest(broker, "PUT", f"{base}/{sid}", {"description": "now stopped",
                                                         "properties": {"template": "iot", "interval": "1s"}})
    assert status == 200 and body["description"] == "now stopped" and body["properties"]["interval"] == "1s"
    assert rest(broker, "DELETE", f"{base}/{sid}")[0] == 204
    status, body = rest(broker, "GET", f"{base}/{sid}")
    assert status == 404 and body["reason"] == "SOURCE_NOT_FOUND"


@pytest.mark.parametrize("properties, prop", [
    ({"template": "weather"}, "template"),
    ({"template": "iot", "interval": "soon"}, "interval"),
    ({"template": "iot", "colour": "blue"}, "colour"),
])
def test_a_bad_definition_is_a_400_naming_the_property(env, properties, prop):
    stream = new_name()
    create_stream(env, stream, IOT)
    with pytest.raises(ApiException) as e:
        Source(env).name("bad").type("stream_generator").stream(stream).properties(properties).create()
    assert e.value.status == 400
    body = json.loads(e.value.body)
    assert body["code"] == 36 and f"property [{prop}]" in body["message"]
    assert Source(env).list() == []


def test_an_unknown_type_or_stream_is_a_400(env):
    stream = new_name()
    create_stream(env, stream, IOT)
    for kind, target, prop in (("kafka", stream, "type"), ("stream_generator", "nope", "stream")):
        with pytest.raises(ApiException) as e:
            Source(env).name("bad").type(kind).stream(target).properties({"template": "iot"}).create()
        assert e.value.status == 400 and f"property [{prop}]" in json.loads(e.value.body)["message"]
