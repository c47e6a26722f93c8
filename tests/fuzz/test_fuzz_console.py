"""Fuzz of the web console's JSON API (and its page files) over raw HTTP: every route from the
door's router with every method, bodies near valid ones and junk, junk names, ids, projects and
query parameters (partition, cursor type, sequence numbers, timestamps, limits, cursors). Every
answer is < 500 with a request id, and an error is a Timeplus-style `{"code", "message"}` body
(the console renders the catalogue like the Timeplus door). Queries sent are bounded (`table(...)`)
or do not compile, so every answer ends."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterator
from urllib.parse import quote, urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.api import console
from broker.launcher import BrokerProcess

from .harness import Reply, assert_dis_error, budget, guarded_broker, http_request, json_body, no_5xx

PROJECT = "fzcon"
RAW = "fz_raw"
GEN = "fz_gen"
TEXT = st.text(max_size=12) | st.sampled_from(["", "\x00", "ünï", "💥", "x" * 300, RAW, "-1", "1e3", "0", "1"])
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | TEXT
           | st.sampled_from([2**63, 2**64, -2**63 - 1, 10**30]))
WILD = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
JUNK = st.one_of(WILD.map(json_body), st.binary(max_size=80),
                 st.sampled_from([b"", b"null", b"{}", b"[]", b"[" * 3000 + b"]" * 3000, b"9" * 5000, b"{'a': 1}"]))


def near(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """`valid` with up to one key dropped and up to two keys set to anything."""
    names = sorted(valid)
    return st.builds(lambda drop, over: {**{k: v for k, v in valid.items() if k not in drop}, **over},
                     st.sets(st.sampled_from(names), max_size=1),
                     st.dictionaries(st.sampled_from(names), WILD, max_size=2)).map(json_body)


VALID_BODIES = {
    "/api/streams": near({"name": "fz_new", "partitions": 2, "retention_hours": 24}),
    "/api/streams/{name}/records": near({"data": "x", "partition_key": "k", "partition_id": "0"}),
    "/api/apps": near({"name": "fzapp"}),
    "/api/queries": near({"sql": f"select raw from table({RAW}) limit 3"}),
}
NAMES = st.sampled_from([RAW, RAW, GEN, "missing", "%00", "x" * 300, "a b", "..", "%FF", "fzapp"])
IDS = st.sampled_from(["@SOURCE@", "nope", "%00", "x" * 300, "", "00000000-0000-0000-0000-000000000000"])
PARAMS = st.dictionaries(
    st.sampled_from(["project", "partition", "cursor_type", "seq", "timestamp", "limit", "cursor", "offset",
                     "filter"]),
    st.sampled_from(["", "0", "1", "-1", "9" * 30, "9" * 5000, "x", "shardId-0000000000", "TRIM_HORIZON", "LATEST",
                     "AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER", "AT_TIMESTAMP", PROJECT, "default", "bad project",
                     "\x00", "AQAAAAAAAAAB", "ünï"]), max_size=4)


def _routes() -> list[tuple[str, str]]:
    door = console.build_app(None, None, None)  # type: ignore[arg-type]
    found = sorted({(r.method, r.resource.canonical) for r in door.router.routes()
                    if r.resource is not None and r.method != "HEAD"})
    assert len(found) >= 18, found
    return found


ROUTES = _routes()


def _body_for(route: tuple[str, str]) -> st.SearchStrategy[bytes]:
    valid = VALID_BODIES.get(route[1])
    return JUNK if valid is None or route[0] != "POST" else valid | JUNK


ROUTE_REQUESTS = st.sampled_from(ROUTES).flatmap(lambda r: st.tuples(st.just(r), _body_for(r)))


def send(proc: BrokerProcess, method: str, target: str, body: bytes = b"") -> Reply | None:
    return http_request(proc.host, proc.http_port, method, target, body, [("Content-Type", "application/json")])


def ok(proc: BrokerProcess, method: str, path: str, body: Any, status: int) -> Reply:
    reply = send(proc, method, path, b"" if body is None else json_body(body))
    assert reply is not None and reply.status == status, (path, reply and reply.raw[:300])
    return reply


def _alive(proc: BrokerProcess) -> None:
    ok(proc, "GET", f"/console/api/streams?project={PROJECT}", None, 200)


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with guarded_broker(tmp_path_factory.mktemp("fuzz-console") / "data", project=PROJECT, alive=_alive) as proc:
        ok(proc, "POST", f"/console/api/streams?project={PROJECT}", {"name": RAW, "partitions": 2}, 201)
        yield proc


def _check(reply: Reply | None, context: object) -> int:
    assert reply is not None, ("the broker closed the connection without an answer", context)
    no_5xx(reply, context)
    if reply.status >= 400 and reply.raw:
        if b'"error_code"' in reply.raw:   # aiohttp's parser refused it: the fallback door's (DIS) body
            body = assert_dis_error(reply, reply.status)
            assert body["reason"] in ("INVALID_REQUEST", "BAD_BODY"), body
        else:
            body = json.loads(reply.raw)
            assert isinstance(body["code"], int) and body["message"] and body["reason"], body
    return reply.status


def test_every_route_and_method_with_junk(fuzz_broker: BrokerProcess) -> None:
    seen: Counter[int] = Counter()
    columns = [{"name": "device", "type": "string"}, {"name": "number", "type": "float64"}]
    ok(fuzz_broker, "POST", f"/{PROJECT}/api/v1beta2/streams", {"name": GEN, "columns": columns}, 201)
    source = ok(fuzz_broker, "POST", f"/{PROJECT}/api/v1beta2/sources", {
        "name": "fzgen", "type": "stream_generator", "stream": GEN,
        "properties": {"template": "iot", "interval": "1s"}}, 201).json["id"]

    @budget(400)
    @given(request=ROUTE_REQUESTS, method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"] + ["same"] * 6),
           name=NAMES, ident=IDS, params=PARAMS, own_project=st.booleans())
    def one(request: tuple[tuple[str, str], bytes], method: str, name: str, ident: str, params: dict[str, str],
            own_project: bool) -> None:
        (route_method, template), body = request
        method = route_method if method == "same" else method
        ident = source if ident == "@SOURCE@" else ident
        path = "/console" + (template.replace("{name}", quote(name, safe="%")).replace("{id}", quote(ident, safe="%")))
        if own_project:
            params = {**params, "project": PROJECT}
        target = path + ("?" + urlencode(params, quote_via=quote) if params else "")
        reply = send(fuzz_broker, method, target, body)
        seen[_check(reply, (method, target, body[:80])) // 100] += 1
        if method == "DELETE" and reply is not None and reply.status == 204 and name == RAW:
            ok(fuzz_broker, "POST", f"/console/api/streams?project={PROJECT}", {"name": RAW, "partitions": 2}, 201)

    one()
    send(fuzz_broker, "POST", f"/console/api/sources/{source}/stop?project={PROJECT}")
    print(f"console fuzz: answers by class {dict(seen)}")
    assert seen[2] >= 20 and seen[4] >= 100, f"strategies too weak to reach both answers: {seen}"
