"""`POST /api/put` against a real broker process: every edge case of shared/spec/tsdb-put.md
section 5 with its exact status and body, the validation order of section 3 with each error
string, the timestamp bounds, value typing (numeric strings stricter than float()), type
conflicts in one request, the flags, bad bodies, gzip, the door's paths, and what a DIS consumer
reads back. Series are unique per test (their metric) except where the spec's own points are
used verbatim; one broker serves the module (retention passes off, so nothing is trimmed)."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest

from broker.launcher import BrokerProcess
from broker.tsdb.series import series_key, series_partition
from tests.tsdb.put_http import (
    JSON_UTF8,
    POINT_ERRORS,
    check_json,
    details,
    points_of,
    put,
    request,
    stream_records,
)

NOW_S = 1_700_000_000


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(tmp_path_factory.mktemp("tsdb-put") / "data", "--retention-interval", "3600",
                         "--tsdb-port", "0").start()
    yield proc
    proc.stop(30)


@pytest.fixture
def metric() -> str:
    return f"t.{uuid.uuid4().hex[:10]}"


def point(metric: str, value: Any = 1, ts: Any = NOW_S, **tags: Any) -> dict[str, Any]:
    return {"metric": metric, "timestamp": ts, "value": value, "tags": tags or {"host": "web01"}}


def one_error(broker: BrokerProcess, p: Any) -> str:
    """The error string of a put of the single point `p` (which must fail)."""
    errors = details(put(broker, [p], "?details"))
    assert len(errors) == 1
    return errors[0]


# -- section 5, in its order ------------------------------------------------------------------

def test_5_1_all_good_no_flags_is_204_without_a_body(broker: BrokerProcess, metric: str) -> None:
    reply = put(broker, [point(metric, 1), point(metric, 2, NOW_S + 1)])
    assert reply.status == 204 and reply.raw == b""
    assert [p["value"] for p in points_of(broker, metric)] == [1, 2]


def test_5_2_details_wins_over_summary(broker: BrokerProcess) -> None:
    body = [{"metric": "sys.cpu.nice", "timestamp": 1346846400, "value": 18, "tags": {"host": "web01"}}]
    reply = put(broker, body, "?summary&details")
    assert check_json(reply, 200) == {"success": 1, "failed": 0, "errors": []}
    assert reply.raw == b'{"success":1,"failed":0,"errors":[]}'


def test_5_3_nan_string_on_a_numeric_series_and_on_a_new_one(broker: BrokerProcess, metric: str) -> None:
    first = {"metric": "m", "timestamp": 1365465600, "value": 1, "tags": {"host": "web01"}}
    assert put(broker, [first]).status == 204
    nan = {"metric": "m", "timestamp": 1365465600, "value": "NaN", "tags": {"host": "web01"}}
    reply = put(broker, [nan], "?details")
    assert check_json(reply, 400) == {"success": 0, "failed": 1, "errors": [
        {"datapoint": nan, "error": "Unable to parse value to a number"}]}
    for spelling in ("NaN", "Infinity", "-Infinity"):   # a brand-new series: a string value
        assert put(broker, [point(metric, spelling, host=spelling)]).status == 204
    assert sorted(p["value"] for p in points_of(broker, metric)) == ["-Infinity", "Infinity", "NaN"]


@pytest.mark.parametrize("tags", ["absent", {}, None, [], "host=a", [["host", "a"]]])
def test_5_4_missing_or_empty_tags(broker: BrokerProcess, tags: Any) -> None:
    p: dict[str, Any] = {"metric": "m", "timestamp": 1499158925, "value": 1}
    if tags != "absent":
        p["tags"] = tags
    assert one_error(broker, p) == "Missing tags"


@pytest.mark.parametrize("where, text, error", [
    ("metric", "cpu load", 'Invalid metric name ("cpu load"): illegal character:  '),
    ("key", "ho st", 'Invalid tag name ("ho st"): illegal character:  '),
    ("value", "a+b", 'Invalid tag value ("a+b"): illegal character: +'),
    ("value", "a'b", "Invalid tag value (\"a'b\"): illegal character: '"),   # Alibaba's current docs allow '
    ("value", "a#b", 'Invalid tag value ("a#b"): illegal character: #'),     # ... and #; our rule does not
    ("metric", "cpu*", 'Invalid metric name ("cpu*"): illegal character: *'),
    ("metric", "a@b&c", 'Invalid metric name ("a@b&c"): illegal character: @'),
    ("metric", 'a"b', 'Invalid metric name ("a"b"): illegal character: "'),
    ("metric", "a\\b", 'Invalid metric name ("a\\b"): illegal character: \\'),
    ("metric", "café", 'Invalid metric name ("café"): illegal character: é'),     # not CJK
    ("metric", "カタ", 'Invalid metric name ("カタ"): illegal character: カ'),     # kana: not CJK Unified
    ("metric", "한국", 'Invalid metric name ("한국"): illegal character: 한'),     # hangul
    ("metric", "\uf900x", 'Invalid metric name ("\uf900x"): illegal character: \uf900'),   # compatibility block
    ("metric", "温\u3000度", 'Invalid metric name ("温\u3000度"): illegal character: \u3000'),  # ideographic space
    ("key", "", "Invalid tag name: empty string"),
    ("value", "", "Invalid tag value: empty string"),
    ("value", None, "Invalid tag value: empty string"),
    ("value", {"a": 1}, "Invalid tag value: must be a string, number or boolean"),
    ("value", ["x"], "Invalid tag value: must be a string, number or boolean"),
    ("value", "a b", 'Invalid tag value ("a b"): illegal character:  '),
])
def test_5_5_bad_characters(broker: BrokerProcess, where: str, text: Any, error: str) -> None:
    p = point("ok.metric", 1)
    if where == "metric":
        p["metric"] = text
    elif where == "key":
        p["tags"] = {"dc": "lga", text: "v"}
    else:
        p["tags"] = {"dc": "lga", "host": text}
    assert one_error(broker, p) == error


@pytest.mark.parametrize("name", ["温度.cpu", "a(b):c,[d]=e/f", "A-Z_a.z/0:9",
                                  "㐀\U00020000\U0002a700\U00030000\u9fff"])
def test_5_5_legal_names_are_accepted(broker: BrokerProcess, name: str) -> None:
    tags = {"机房": "北京-1", "k": name}
    assert put(broker, [point(name, 1, **tags)]).status == 204
    assert [(p["metric"], p["tags"]) for p in points_of(broker, name)] == [(name, dict(sorted(tags.items())))]


@pytest.mark.parametrize("ts, stored_ms", [
    (4284768, 4284768000), (9999999999, 9999999999000), (10000000000, 10000000000),
    (9999999999999, 9999999999999), (1499158925, 1499158925000), (1499158925123, 1499158925123),
    # the current Alibaba page's bounds, kept as the spec asks: seconds under the required rule
    (4294968, 4294968000), (4294967295, 4294967295000), (4294967296, 4294967296000)])
def test_5_6_timestamp_units_by_magnitude(broker: BrokerProcess, metric: str, ts: int, stored_ms: int) -> None:
    assert put(broker, [point(metric, 1, ts)]).status == 204
    assert [p["timestamp"] for p in points_of(broker, metric)] == [stored_ms]


@pytest.mark.parametrize("ts", [4284767, 10000000000000, -1, 0, 1, 1.5, 1.5e9, 1499158925.0, "1499158925", True, False,
                                None, "absent", [1499158925], {"s": 1}, 2**63, 2**64 - 1])
def test_5_6_illegal_timestamps(broker: BrokerProcess, metric: str, ts: Any) -> None:
    p = point(metric, 1, ts)
    if ts == "absent":
        del p["timestamp"]
    assert one_error(broker, p) == "Invalid timestamp"


def test_5_7_mixed_types_on_one_series_in_one_request(broker: BrokerProcess, metric: str) -> None:
    a, b = point(metric, 1, host="a"), point(metric, "up", NOW_S + 1, host="a")
    assert check_json(put(broker, [a, b], "?details"), 400) == {
        "success": 1, "failed": 1, "errors": [{"datapoint": b, "error": "Unable to parse value to a number"}]}
    c, d = point(metric, True, host="b"), point(metric, 2, NOW_S + 1, host="b")
    assert check_json(put(broker, [c, d], "?details"), 400) == {
        "success": 1, "failed": 1,
        "errors": [{"datapoint": d, "error": "Value type mismatch: series holds boolean values"}]}
    e, f = point(metric, 1, host="c"), point(metric, 2.5, NOW_S + 1, host="c")   # long then double: one type
    assert put(broker, [e, f]).status == 204
    assert sorted(p["value"] for p in points_of(broker, metric) if p["tags"] == {"host": "c"}) == [1, 2.5]


@pytest.mark.parametrize("first, then, error", [
    (1.5, True, "Value type mismatch: series holds double values"),
    (7, False, "Value type mismatch: series holds long values"),
    ("up", 1, "Value type mismatch: series holds string values"),
    ("up", "5", "Value type mismatch: series holds string values"),     # a numeric string is a number
    ("up", True, "Value type mismatch: series holds string values"),
    (False, "down", "Value type mismatch: series holds boolean values"),
    (1, "1,5", "Unable to parse value to a number"),
    (1, "down", "Unable to parse value to a number"),
    (1, "Infinity", "Unable to parse value to a number"),     # NaN: test_5_3
    (2.5, "-Infinity", "Unable to parse value to a number"),
    (1, "x" * 20481, "String value too long"),               # rule 7 comes before rule 8
    (True, "x" * 20481, "String value too long"),
])
def test_type_conflicts_after_the_first_point(broker: BrokerProcess, metric: str, first: Any, then: Any,
                                              error: str) -> None:
    assert put(broker, [point(metric, first)]).status == 204
    assert one_error(broker, point(metric, then, NOW_S + 1)) == error
    # the same in one request, the first point fixing the type for the second
    assert details(put(broker, [point(metric, first, host="x"), point(metric, then, NOW_S + 1, host="x")],
                       "?details")) == [error]


@pytest.mark.parametrize("query", ["", "?details", "?summary"])
@pytest.mark.parametrize("raw, message", [
    (b"[]", "No datapoints found in content"),
    (b"{not json", "Unable to parse the given JSON"),
    (b'[{"metric":"m","timestamp":1499158925,"value":NaN,"tags":{"h":"a"}}]', "Unable to parse the given JSON"),
    (b'[{"metric":"m","timestamp":1499158925,"value":Infinity,"tags":{"h":"a"}}]', "Unable to parse the given JSON"),
    (b'[{"metric":"m","timestamp":1499158925,"value":-Infinity,"tags":{"h":"a"}}]', "Unable to parse the given JSON"),
    (b'[{"metric":"m","timestamp":1499158925,"value":1e400,"tags":{"h":"a"}}]', "Unable to parse the given JSON"),
    (b"5", "Unable to parse the given JSON"),
    (b'"points"', "Unable to parse the given JSON"),
    (b"null", "Unable to parse the given JSON"),
    (b"\xff\xfe", "Unable to parse the given JSON"),
    (b"", "Missing request content"),
    (b"  \n", "Missing request content"),
])
def test_5_8_bad_bodies_store_nothing(broker: BrokerProcess, query: str, raw: bytes, message: str) -> None:
    reply = put(broker, None, query, raw=raw)
    body = check_json(reply, 400)
    assert body["error"]["code"] == 400 and body["error"]["message"] == message, body
    reason = {"Missing request content": "PUT_NO_CONTENT", "No datapoints found in content": "PUT_NO_POINTS",
              "Unable to parse the given JSON": "PUT_BAD_JSON"}[message]
    if message != "Unable to parse the given JSON":
        assert body == {"error": {"code": 400, "message": message}, "reason": reason}
    else:   # what did not parse, beside OpenTSDB's message
        assert set(body["error"]) == {"code", "message", "details"} and body["error"]["details"]
    assert set(body) == {"error", "reason"} and body["reason"] == reason
    assert [p for p in points_of(broker, "m") if p["tags"] == {"h": "a"}] == []


def test_5_9_partial_batch_without_flags_stores_the_good_points(broker: BrokerProcess, metric: str) -> None:
    good1, bad, good2 = point(metric, 1, host="a"), point(metric, 2, 0, host="b"), point(metric, 3, host="c")
    reply = put(broker, [good1, bad, good2])
    assert check_json(reply, 400) == POINT_ERRORS
    assert reply.raw == (b'{"error":{"code":400,"message":"One or more data points had errors","details":'
                         b'"Please see the TSD logs or append \\"details\\" to the put request"}}')
    assert sorted(p["value"] for p in points_of(broker, metric)) == [1, 3]
    # with summary: the counts
    assert check_json(put(broker, [good1, bad, good2], "?summary"), 400) == {"success": 2, "failed": 1}
    # every point bad, no flags: the same error object
    assert check_json(put(broker, [bad]), 400) == POINT_ERRORS


def test_5_10_string_values_up_to_20480_bytes(broker: BrokerProcess, metric: str) -> None:
    exact = "温" * 6826 + "ab"   # 20478 + 2 bytes of UTF-8, 6828 characters
    assert len(exact.encode()) == 20480
    assert put(broker, [point(metric, exact, host="a")]).status == 204
    assert one_error(broker, point(metric, exact + "c", host="b")) == "String value too long"
    assert one_error(broker, point(metric, "x" * 20481, host="b")) == "String value too long"
    assert put(broker, [point(metric, "x" * 20480, host="c")]).status == 204
    assert sorted(len(p["value"]) for p in points_of(broker, metric)) == [6828, 20480]


@pytest.mark.parametrize("query, body", [
    ("?summary=false", {"success": 1, "failed": 0}),
    ("?summary=0", {"success": 1, "failed": 0}),
    ("?summary", {"success": 1, "failed": 0}),
    ("?summary=", {"success": 1, "failed": 0}),
    ("?details=false", {"success": 1, "failed": 0, "errors": []}),
    ("?details&summary=no", {"success": 1, "failed": 0, "errors": []}),
    ("?sync&ignoreErrors&summary", {"success": 1, "failed": 0}),
    ("?sync_timeout=0&summary", {"success": 1, "failed": 0}),
    ("?sync_timeout=60000&summary", {"success": 1, "failed": 0}),
    ("?sync_timeout=&summary", {"success": 1, "failed": 0}),
])
def test_5_11_flags_are_valueless(broker: BrokerProcess, metric: str, query: str, body: dict[str, Any]) -> None:
    assert check_json(put(broker, [point(metric)], query), 200) == body


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "+5", " 5", "1e3", "１"])
def test_a_bad_sync_timeout_refuses_the_whole_request(broker: BrokerProcess, metric: str, value: str) -> None:
    query = "?details&sync_timeout=" + quote(value)
    body = check_json(put(broker, [point(metric)], query), 400)
    assert body == {"error": {"code": 400, "message": "Invalid request. sync_timeout must be a non-negative integer "
                                                      f"(milliseconds), got {value!r}"},
                    "reason": "INVALID_REQUEST"}
    assert points_of(broker, metric) == []


# past Python's 4,300 digits of int() (was a 500); leading zeros on 60 s (they were on 7 and 5 ms:
# timeouts on a busy machine, each once in a clean-clone run)
@pytest.mark.parametrize("value", ["0", "0060000", "999999999999999", "99999999999999999999999", "0" * 5000,
                                   "0" * 5000 + "60000"])
def test_any_non_negative_integer_is_a_sync_timeout(broker: BrokerProcess, metric: str, value: str) -> None:
    """A sync_timeout past 15 digits is longer than any wait: as none (the spec refuses only
    non-integers and negatives)."""
    assert check_json(put(broker, [point(metric)], "?summary&sync_timeout=" + value), 200) == {
        "success": 1, "failed": 0}


def test_5_12_tag_numbers_and_booleans_are_text(broker: BrokerProcess, metric: str) -> None:
    assert put(broker, [point(metric, 1, port=8080, ok=True, ratio=1.5, big=12345678901234567890)]).status == 204
    [stored] = points_of(broker, metric)
    assert stored["tags"] == {"big": "12345678901234567890", "ok": "true", "port": "8080", "ratio": "1.5"}
    # the same series as with text tags: numeric, so a string value is refused
    same = point(metric, "x", NOW_S + 1, port="8080", ok="true", ratio="1.5", big="12345678901234567890")
    assert one_error(broker, same) == "Unable to parse value to a number"


# -- section 3: the order of the rules, each string ------------------------------------------

BAD = {"metric": "", "timestamp": 0, "value": None, "tags": {}}


@pytest.mark.parametrize("p, error", [
    ({}, "Metric name was empty"),
    ({"metric": None, "timestamp": 0}, "Metric name was empty"),
    ({**BAD}, "Metric name was empty"),
    ({**BAD, "metric": {"a": 1}}, "Invalid metric name: must be a string"),
    ({**BAD, "metric": "cpu load"}, "Invalid timestamp"),                   # timestamp before characters
    ({**BAD, "metric": "m", "timestamp": 1.5}, "Invalid timestamp"),
    ({**BAD, "metric": "m", "timestamp": NOW_S}, "Empty value"),
    ({**BAD, "metric": "m", "timestamp": NOW_S, "value": ""}, "Empty value"),
    ({"metric": "m", "timestamp": NOW_S, "tags": {}}, "Empty value"),       # value missing
    ({**BAD, "metric": "m", "timestamp": NOW_S, "value": {}}, "Invalid value type"),
    ({**BAD, "metric": "m", "timestamp": NOW_S, "value": [1]}, "Invalid value type"),
    ({**BAD, "metric": "cpu load", "timestamp": NOW_S, "value": 1}, "Missing tags"),   # tags before characters
    ({"metric": "cpu load", "timestamp": NOW_S, "value": 1, "tags": {f"k{i}": "v" for i in range(17)}},
     "Too many tags: 17, max 16"),                                          # tag count before characters
    ({"metric": "m", "timestamp": NOW_S, "value": 1, "tags": {f"k{i}": "v" for i in range(40)}},
     "Too many tags: 40, max 16"),
    ({"metric": "cpu load", "timestamp": NOW_S, "value": "x" * 30000, "tags": {"h st": "a b"}},
     'Invalid metric name ("cpu load"): illegal character:  '),             # metric before tags, chars before size
    ({"metric": "m", "timestamp": NOW_S, "value": 1, "tags": {"a": "x y", "b c": "z"}},
     'Invalid tag value ("x y"): illegal character:  '),                   # tags in the order received
    ({"metric": "m", "timestamp": NOW_S, "value": 1, "tags": {"b c": "z", "a": "x y"}},
     'Invalid tag name ("b c"): illegal character:  '),
    ({"metric": "m" * 256 + " ", "timestamp": NOW_S, "value": 1, "tags": {"h": "a"}},
     'Invalid metric name ("' + "m" * 256 + ' "): illegal character:  '),
    ({"metric": "m" * 256, "timestamp": NOW_S, "value": 1, "tags": {"h": "a b"}},
     'Invalid tag value ("a b"): illegal character:  '),                  # all characters before the sizes
    ({"metric": "m" * 256, "timestamp": NOW_S, "value": "x" * 30000, "tags": {"h": "a"}}, "Metric name too long"),
    ({"metric": "温" * 86, "timestamp": NOW_S, "value": 1, "tags": {"h": "a"}}, "Metric name too long"),  # 258 bytes
    ({"metric": "mm", "timestamp": NOW_S, "value": "温" * 6827, "tags": {"h": "a"}}, "String value too long"),
    # tag keys and values are limited like the metric: 255 bytes, after it, in the order received
    ({"metric": "m" * 256, "timestamp": NOW_S, "value": 1, "tags": {"h" * 256: "a"}}, "Metric name too long"),
    ({"metric": "m", "timestamp": NOW_S, "value": 1, "tags": {"a": "v" * 256, "h" * 256: "a"}},
     "Tag value too long"),
    ({"metric": "m", "timestamp": NOW_S, "value": 1, "tags": {"h" * 256: "a", "a": "v" * 256}},
     "Tag name too long"),
    ({"metric": "m", "timestamp": NOW_S, "value": 1, "tags": {"h": "温" * 86}}, "Tag value too long"),   # 258 bytes
    ({"metric": "m", "timestamp": NOW_S, "value": "x" * 30000, "tags": {"h": "v" * 300}}, "Tag value too long"),
])
def test_the_first_failing_rule_wins(broker: BrokerProcess, p: dict[str, Any], error: str) -> None:
    assert one_error(broker, p) == error


def test_limits_at_their_bounds_are_accepted(broker: BrokerProcess, metric: str) -> None:
    sixteen = {f"k{i}": f"v{i}" for i in range(16)}
    long_metric = metric + "." + "温" * ((255 - len(metric) - 1) // 3)
    long_metric += "x" * (255 - len(long_metric.encode()))
    assert len(long_metric.encode()) == 255
    long_tag = "温" * 85   # 255 bytes
    assert put(broker, [point(metric, 1, **sixteen), point(long_metric, 1),
                        point(metric, 2, **{long_tag: long_tag})]).status == 204
    assert len(points_of(broker, metric)) == 2 and len(points_of(broker, long_metric)) == 1


def test_elements_that_are_not_objects_fail_alone(broker: BrokerProcess, metric: str) -> None:
    good = point(metric, 1)
    body = check_json(put(broker, [1, good, "x", None, [good]], "?details"), 400)
    assert body["success"] == 1 and body["failed"] == 4
    assert body["errors"] == [{"datapoint": d, "error": "Metric name was empty"} for d in (1, "x", None, [good])]


def test_a_metric_that_is_a_number_is_text(broker: BrokerProcess) -> None:
    name = 700000 + uuid.uuid4().int % 100000
    assert put(broker, [point(name, 1)]).status == 204   # type: ignore[arg-type]
    assert [p["metric"] for p in points_of(broker, str(name))] == [str(name)]


@pytest.mark.parametrize("long_way", [False, True], ids=["fast path", "long way"])
def test_names_written_as_numbers_keep_their_text_as_written(broker: BrokerProcess, long_way: bool) -> None:
    """HiTSDB's Jackson reads a number into a string name as its text was written: 1e20 (Python's
    float says 1e+20, refused for its +), 1E2, 1.50, an integer past 64 bits whole. On both paths
    of put.sort (a backslash escape sends a body the long way)."""
    metric = f"t.{uuid.uuid4().hex[:10]}"
    tags = (b'{"e":1e20,"E":1E2,"f":1.50,"big":1180591620717411303424,"neg":-2.5e-3,"i":8080,"b":true,'
            b'"host":"h%d"' + (b',"esc":"x\\/y"}' if long_way else b"}"))
    body = b"[" + b",".join(b'{"metric":"%s","timestamp":%d,"value":1,"tags":%s}'
                            % (metric.encode(), NOW_S + i, tags % i) for i in range(2)) + b"]"
    assert put(broker, None, raw=body).status == 204
    got = sorted((p["tags"] for p in points_of(broker, metric)), key=lambda t: t["host"])
    assert got == [{"E": "1E2", "b": "true", "big": "1180591620717411303424", "e": "1e20", "f": "1.50",
                    "host": f"h{i}", "i": "8080", "neg": "-2.5e-3", **({"esc": "x/y"} if long_way else {})}
                   for i in range(2)]
    name = b"%de3" % (uuid.uuid4().int % 10**6)   # a metric written as a number with an exponent
    assert put(broker, None, raw=b'[{"metric":%s,"timestamp":%d,"value":1,"tags":{"h":"a"}}]'
               % (name, NOW_S)).status == 204
    assert [p["metric"] for p in points_of(broker, name.decode())] == [name.decode()]


# -- value typing -------------------------------------------------------------------------------

@pytest.mark.parametrize("sent, stored", [
    (5, 5), (-5, -5), (0, 0), (2**63 - 1, 2**63 - 1), (-2**63, -2**63),
    (2**63, 9.223372036854776e18), (2**64 - 1, 1.8446744073709552e19),   # beyond signed 64 bits: a double
    (1.5, 1.5), (-0.25, -0.25), (1e300, 1e300), (1.0, 1.0),
    ("5", 5), ("-5", -5), ("007", 7), ("-0", 0), ("1.5", 1.5), ("-1.5e3", -1500.0), ("1E2", 100.0), ("1e-2", 0.01),
    ("9223372036854775807", 2**63 - 1), ("9223372036854775808", 9.223372036854776e18), ("1" + "0" * 300, 1e300),
])
def test_numbers_and_numeric_strings(broker: BrokerProcess, metric: str, sent: Any, stored: Any) -> None:
    assert put(broker, [point(metric, sent)]).status == 204
    [p] = points_of(broker, metric)
    assert p["value"] == stored and type(p["value"]) is type(stored)


@pytest.mark.parametrize("sent", ["+5", " 5", "5 ", "1_000", ".5", "5.", "1,5", "NaN", "nan", "Infinity", "inf", "0x10",
                                  "1e", "e5", "--5", "١٢", "\uff15", "1e400", "1" * 5000, "true", "null", "-", "1.5.5"])
def test_other_strings_are_string_values(broker: BrokerProcess, metric: str, sent: str) -> None:
    """Stricter than float(): what float() takes ("+5", " 5", "1_000", "nan", "inf", fullwidth digits) stays a
    string, as do literals beyond a double ("1e400") and digits that are not ASCII."""
    assert put(broker, [point(metric, sent)]).status == 204
    [p] = points_of(broker, metric)
    assert p["value"] == sent
    assert one_error(broker, point(metric, 1, NOW_S + 1)) == "Value type mismatch: series holds string values"


@pytest.mark.parametrize("value", [True, False])
def test_booleans(broker: BrokerProcess, metric: str, value: bool) -> None:
    assert put(broker, [point(metric, value)]).status == 204
    assert [p["value"] for p in points_of(broker, metric)] == [value]


# -- bodies, paths, methods ---------------------------------------------------------------------

def test_a_single_object_body(broker: BrokerProcess, metric: str) -> None:
    assert put(broker, point(metric, 1)).status == 204
    reply = put(broker, point(metric, "x", NOW_S + 1), "?details")
    assert check_json(reply, 400)["errors"] == [{"datapoint": point(metric, "x", NOW_S + 1),
                                                 "error": "Unable to parse value to a number"}]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_the_body_is_json_whatever_its_content_type_says(broker: BrokerProcess, metric: str,
                                                         content_type: str | None) -> None:
    """As OpenTSDB, which parses the body without looking at Content-Type (curl -d sends a form type)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    reply = request(broker, "POST", "/api/put?summary", json.dumps([point(metric)]).encode(), headers)
    assert check_json(reply, 200) == {"success": 1, "failed": 0}


def test_gzip_bodies(broker: BrokerProcess, metric: str) -> None:
    points = [point(metric, i, NOW_S + i, host=f"h{i % 7}") for i in range(500)]
    assert check_json(put(broker, points, "?summary", gzipped=True), 200) == {"success": 500, "failed": 0}
    assert len(points_of(broker, metric)) == 500
    reply = request(broker, "POST", "/api/put", b"not gzip at all", {"Content-Encoding": "gzip"})
    body = check_json(reply, 400)
    assert body["error"]["code"] == 400 and body["reason"] == "BAD_BODY", body


def test_trailing_slash_and_the_tsdb_port(broker: BrokerProcess, metric: str) -> None:
    assert broker.tsdb_port and broker.tsdb_port not in (broker.http_port, broker.grpc_port)
    assert put(broker, [point(metric, 1, host="a")], path="/api/put/").status == 204
    assert put(broker, [point(metric, 1, host="b")], port=broker.tsdb_port).status == 204
    # one registry behind both ports: a series fixed on one is fixed on the other
    assert details(put(broker, [point(metric, "x", host="a")], "?details", port=broker.tsdb_port)) == [
        "Unable to parse value to a number"]
    assert details(put(broker, [point(metric, True, host="b")], "?details", path="/api/put/")) == [
        "Value type mismatch: series holds long values"]
    # the tsdb port serves this door only; its errors are this door's
    for path in ("/v2/default/streams", "/api/v1beta2/streams", "/nowhere"):
        reply = request(broker, "GET", path, port=broker.tsdb_port)
        assert check_json(reply, 404)["error"]["code"] == 404, path
    reply = request(broker, "GET", "/api/put", port=broker.tsdb_port)
    assert check_json(reply, 405)["error"] == {"code": 405, "message": "Method [GET] not allowed on [/api/put]"}


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/api/put", 405), ("PUT", "/api/put", 405), ("DELETE", "/api/put/", 405), ("PATCH", "/api/put", 405),
    ("PUT", "/api/query", 405), ("DELETE", "/api/query/", 405), ("PUT", "/api/suggest", 405),
    ("GET", "/api/nothing", 404), ("POST", "/api/putx", 404), ("POST", "/api/put/more", 404), ("GET", "/api", 404),
    ("GET", "/api/", 404), ("GET", "/api/query/last", 404),
])
def test_methods_and_unknown_paths_answer_this_doors_error_object(broker: BrokerProcess, method: str, path: str,
                                                                  status: int) -> None:
    body = check_json(request(broker, method, path, b"[]" if method != "GET" else None), status)
    assert body["error"]["code"] == status and body["error"]["message"], body
    assert body["reason"] == ("METHOD_NOT_ALLOWED" if status == 405 else "UNKNOWN_ROUTE")


def test_timeplus_paths_are_still_timeplus(broker: BrokerProcess, metric: str) -> None:
    assert put(broker, [{"metric": metric, "timestamp": 1_700_000_000, "value": 1, "tags": {"h": "a"}}]).status == 204
    reply = request(broker, "GET", "/api/v1beta2/streams")
    assert reply.status == 200 and isinstance(reply.json, list)
    assert any(s["name"] == "tsdb" for s in reply.json)   # the points' stream, as any other
    missing = request(broker, "GET", "/api/v1beta2/streams/no_such_stream")
    assert missing.status == 404 and set(missing.json) == {"code", "message", "system", "reason"}


def test_details_echo_points_as_received(broker: BrokerProcess, metric: str) -> None:
    weird = {"metric": metric, "timestamp": 1, "value": 1.25, "tags": {"port": 8080}, "extra": [1, {"a": None}]}
    body = check_json(put(broker, [weird], "?details"), 400)
    assert body == {"success": 0, "failed": 1, "errors": [{"datapoint": weird, "error": "Invalid timestamp"}]}


@pytest.mark.parametrize("depth", [1, 300, 990, 1010])
def test_details_echo_a_failed_points_text_byte_for_byte_however_deep(broker: BrokerProcess, metric: str,
                                                                      depth: int) -> None:
    """Numbers as written (past 64 bits, exponents), spacing, and nesting orjson cannot write back
    (past ~250 levels: this was a 500, with the good points stored all the same) or msgspec cannot
    read (past ~1000)."""
    good = json.dumps(point(metric, 1, host="good")).encode()
    bad = (b'{ "metric" : "%s", "timestamp":1E10, "value":1180591620717411303424, "tags":{"h":"a"}, "extra":%s%s}'
           % (metric.encode(), b"[" * depth, b"]" * depth))
    reply = put(broker, None, "?details", raw=b"[" + good + b" ,\n " + bad + b"]")
    assert reply.status == 400 and reply.raw == (b'{"success":1,"failed":1,"errors":[{"datapoint":' + bad +
                                                 b',"error":"Invalid timestamp"}]}')
    assert [p["tags"] for p in points_of(broker, metric)] == [{"host": "good"}]


# -- what a consumer reads ------------------------------------------------------------------------

def test_a_dis_consumer_reads_points_as_json_records_in_their_series_partition(broker: BrokerProcess,
                                                                               metric: str) -> None:
    series = [{"host": f"web{i:02d}", "dc": "lga" if i % 2 else "sjc"} for i in range(24)]
    sent = [point(metric, i * 10 + k, NOW_S + k, **tags) for k in range(3) for i, tags in enumerate(series)]
    sent.append(point(metric, 1.5, (NOW_S + 9) * 1000 + 123, **series[0]))   # milliseconds
    assert put(broker, sent).status == 204
    records = [(p, rec, ts) for p, rec, ts in stream_records(broker) if rec["metric"] == metric]
    assert len(records) == len(sent)
    for p, rec, stored_ts in records:
        assert set(rec) == {"metric", "timestamp", "value", "tags"}
        assert list(rec["tags"]) == sorted(rec["tags"])   # sorted tags
        assert p == series_partition(series_key(metric, rec["tags"]), 8)
        assert stored_ts >= rec["timestamp"]   # the store's time never precedes a point's own
    by_series: dict[str, list[int]] = {}
    for _, rec, _ in records:
        by_series.setdefault(series_key(metric, rec["tags"]), []).append(rec["timestamp"])
    assert all(ts == sorted(ts) for ts in by_series.values())   # a series is ordered in its partition
    first = [rec for _, rec, _ in records if rec["tags"] == dict(sorted(series[0].items()))]
    assert [r["timestamp"] for r in first] == [NOW_S * 1000, (NOW_S + 1) * 1000, (NOW_S + 2) * 1000,
                                               (NOW_S + 9) * 1000 + 123]
    assert [r["value"] for r in first] == [0, 1, 2, 1.5]
    assert len({p for p, _, _ in records}) > 1   # 24 series spread over the partitions


def test_the_stream_is_an_ordinary_schemaless_stream(broker: BrokerProcess, metric: str) -> None:
    assert put(broker, [point(metric)]).status == 204
    reply = request(broker, "GET", "/v2/default/streams/tsdb")
    assert reply.status == 200
    desc = reply.json
    assert desc["partition_count"] == 8 and desc["data_type"] == "JSON"


def test_every_json_answer_says_utf8_and_carries_a_request_id(broker: BrokerProcess, metric: str) -> None:
    for reply in (put(broker, [point(metric)], "?summary"), put(broker, [point(metric, ts=0)], "?details"),
                  put(broker, [point(metric, ts=0)]), put(broker, None, raw=b"{"),
                  request(broker, "GET", "/api/put"), request(broker, "GET", "/api/zzz")):
        assert reply.headers["Content-Type"] == JSON_UTF8
        assert reply.headers["X-Request-Id"]
        json.loads(reply.raw)
    empty = put(broker, [point(metric, ts=NOW_S + 5)])
    assert empty.status == 204 and empty.raw == b"" and empty.headers["X-Request-Id"]


def test_a_large_body_is_checked_off_the_loop_and_answered_in_full(broker: BrokerProcess, metric: str) -> None:
    """Over 256 KiB the body is parsed in a thread: the answer is the same."""
    sent = [point(metric, i, NOW_S + i, host=f"h{i % 50}") for i in range(6000)]
    sent[4321]["timestamp"] = 0
    assert len(json.dumps(sent)) > 256 * 1024
    body = check_json(put(broker, sent, "?details"), 400)
    assert body["success"] == 5999 and body["errors"] == [{"datapoint": sent[4321], "error": "Invalid timestamp"}]


def test_tsdb_stream_and_project_options(start_broker: Any, tmp_path: Path) -> None:
    proc = start_broker("--tsdb-stream", "points", "--tsdb-project", "metrics", data_dir=tmp_path / "opts")
    assert put(proc, [point("x.y", 1)]).status == 204
    assert [rec["metric"] for _, rec, _ in stream_records(proc, "metrics", "points")] == ["x.y"]
    assert request(proc, "GET", "/v2/default/streams/tsdb").status == 400   # nothing in the default place
