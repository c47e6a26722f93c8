"""Checking and normalising the data points of one `/api/put` (shared/spec/tsdb-put.md sections 2
and 3): each point on its own, the first failing rule wins, the error strings exactly the spec's.
No I/O: the series' value types are checked against the registry by put.py.

Rules in order (section 3), and what the spec leaves open [ours]:

1. `metric` missing, null or "" -> `Metric name was empty`. A JSON number or boolean is turned
   into text like a tag value [ours, the spec's rule for tags]; an object or array ->
   `Invalid metric name: must be a string` [ours]. A list element that is not an object at
   all has no metric: `Metric name was empty` [ours; the other points still go in].
2. `timestamp`: a JSON integer (not a boolean, not a float such as 1.5 or 1.5e9, not a string),
   4284768..9999999999 -> seconds (x 1000), 10000000000..9999999999999 -> milliseconds; anything
   else -> `Invalid timestamp`.
3. `value` missing, null or "" -> `Empty value` (rule 3 runs before the typing of section 2,
   so "" is refused rather than stored as a string); object or array -> `Invalid value type`.
4. `tags` missing, null, {} or not an object -> `Missing tags`.
5. more than 16 tag keys -> `Too many tags: N, max 16`.
6. characters: the metric, then each tag's key and value in the order received. Legal: ASCII
   letters and digits, `- _ . / ( ) : , [ ] =`, and code points of the CJK Unified Ideographs
   blocks (the main block and extensions A to I, whole blocks, whatever Unicode version Python
   knows). `Invalid metric name ("cpu load"): illegal character:  ` (the character after the
   colon and a space). Empty key or value -> `Invalid tag name: empty string` /
   `Invalid tag value: empty string`; a null tag value is an empty one [ours]; a number or
   boolean becomes its JSON text (`8080`, `1.5`, `true`); an object or array ->
   `Invalid tag value: must be a string, number or boolean` [ours].
7. metric over 255 bytes of UTF-8 -> `Metric name too long`; then each tag key or value over 255
   bytes -> `Tag name too long` / `Tag value too long` (the spec limits them "like metric"; the
   strings are [ours]; unbounded, a series' key - routed, stored in the series registry - would be
   as long as the body); a string value over 20480 bytes of UTF-8 -> `String value too long`.

Value typing (section 2): a JSON integer within signed 64 bits is a long, any other JSON number a
double; true/false a boolean; a string that is a plain decimal literal (`-?digits`, optional
`.digits`, optional exponent; ASCII only; finite) the number it spells (long when it has neither
fraction nor exponent and fits, else double) - stricter than float(): "+5", " 5", "1_000", ".5",
"5.", "NaN", "Infinity", "1,5" stay strings.

Speed: names repeat from point to point and request to request, so each distinct metric, tag key
and tag value is checked once (one regex search over the whole text) and remembered, and so is the
verdict on each series as it arrives (metric and tags with text values, keyed by the tuple
`(metric, *tag keys, *tag values)` as received: its series.SeriesForm, or its error), in maps
bounded by NAME_CACHE entries each. The SeriesForm (normalised tags, key, record pieces, route) is
shared by the points of a series: read only.

`check_batch` is what the put path runs: for a point of a series whose form is known and whose
timestamp and value are plain (an int in range; a float, an int, a boolean or a string value) it
goes straight to the point's record - one tuple lookup, a few type checks and one bytes format -
and any other point takes `check_point`, the rules in full, so both give the same verdict.

Faster still, for a whole body of plain points (put.fast_group): msgspec decodes it against `Wire`
(the four fields and no others, typed; the tags kept as their raw JSON text), and a series is
found by its metric and that text (`raw_series_form`). Anything msgspec refuses, or any point
that is not plain, sends the whole body the long way, which gives the same answer: see
put.fast_group for why the two agree.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
import orjson

from broker.tsdb.series import BOOLEAN, DOUBLE, LONG, NUMERIC, STRING, TYPE_OF, SeriesForm, series_key

MAX_TAGS = 16
METRIC_MAX_BYTES = 255
STRING_MAX_BYTES = 20480
SECONDS = (4_284_768, 9_999_999_999)
MILLISECONDS = (10_000_000_000, 9_999_999_999_999)
NAME_CACHE = 200_000
_LONG_MIN, _LONG_MAX = -2**63, 2**63 - 1

METRIC_EMPTY = "Metric name was empty"
METRIC_NOT_TEXT = "Invalid metric name: must be a string"
BAD_TIMESTAMP = "Invalid timestamp"
EMPTY_VALUE = "Empty value"
BAD_VALUE_TYPE = "Invalid value type"
MISSING_TAGS = "Missing tags"
EMPTY_TAG_NAME = "Invalid tag name: empty string"
EMPTY_TAG_VALUE = "Invalid tag value: empty string"
TAG_VALUE_NOT_TEXT = "Invalid tag value: must be a string, number or boolean"
METRIC_TOO_LONG = "Metric name too long"
TAG_NAME_TOO_LONG = "Tag name too long"
TAG_VALUE_TOO_LONG = "Tag value too long"
STRING_TOO_LONG = "String value too long"
NOT_A_NUMBER = "Unable to parse value to a number"

# Everything that is not legal; the CJK Unified Ideographs blocks: main (4E00-9FFF), A (3400-4DBF),
# B (20000-2A6DF), C D E F I (2A700-2EE5F, adjacent), G H (30000-323AF, adjacent).
_ILLEGAL = re.compile("[^A-Za-z0-9\\-_./():,\\[\\]=\u3400-\u4dbf\u4e00-\u9fff"
                      "\U00020000-\U0002a6df\U0002a700-\U0002ee5f\U00030000-\U000323af]")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")

# name -> "" when legal, else its first illegal character
_names: dict[str, str] = {}
# (metric, *tag keys, *tag values as received; text only) -> the series' form, or the names' error
_series: dict[tuple[Any, ...], SeriesForm | str] = {}
# series key -> its form, for points whose names are not remembered as received (a tag value 8080)
_forms: dict[str, SeriesForm] = {}
# (metric, the tags object's JSON text as received) -> the series' form; valid series only
raw_forms: dict[tuple[str, bytes], SeriesForm] = {}


class Wire(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A point as put.fast_group decodes it. An unknown field is refused (the body goes the long
    way) because msgspec skips unknown fields' values without checking them as orjson does (a
    1e400 or bad UTF-8 there). The tags are raw: their text is checked by orjson when first seen."""

    metric: str
    timestamp: int
    value: float | int | str | bool
    tags: msgspec.Raw


WIRE = msgspec.json.Decoder(list[Wire] | Wire)
# RecursionError: msgspec's nesting limit (~1000 levels, in a tags value) is below orjson's (1024)
WIRE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)
RAW_TAGS_REMEMBERED = 1024   # longer tags texts (padded with whitespace, say) are not kept as keys


def raw_series_form(metric: str, raw_tags: bytes) -> SeriesForm | None:
    """The form of the series named by `metric` and its tags object's JSON text, when check_point
    would take the series (rules 1, 4, 5, 6 and the metric's 7); None when it would not or the
    text is not JSON that orjson reads. Remembered (valid series only)."""
    key = (metric, raw_tags)
    form = raw_forms.get(key)
    if form is None:
        if not metric:
            return None
        try:
            tags = orjson.loads(raw_tags)
        except orjson.JSONDecodeError:
            return None
        if type(tags) is not dict or not tags or len(tags) > MAX_TAGS:
            return None
        if float in set(map(type, tags.values())):   # as written, as the long way takes them (numbers_as_written)
            tags = _tags_as_written(tags, raw_tags)
        # the names checked as series_form does, without its cache keyed by the names as
        # received: this one (by the tags' text) serves the fast path
        verdict = _check_names(metric, tags)
        if type(verdict) is not SeriesForm:
            return None
        if len(raw_tags) <= RAW_TAGS_REMEMBERED:
            if len(raw_forms) >= NAME_CACHE:
                raw_forms.clear()
            raw_forms[key] = verdict
        form = verdict
    return form


def illegal_character(name: str) -> str:
    """"" when every character of `name` is legal, else the first one that is not."""
    found = _names.get(name)
    if found is None:
        m = _ILLEGAL.search(name)
        found = m.group() if m else ""
        if len(_names) >= NAME_CACHE:
            _names.clear()
        _names[name] = found
    return found


@dataclass(slots=True)
class Point:
    """A valid point, normalised: time in ms, the value typed, tag values text, tags sorted."""

    metric: str
    timestamp_ms: int
    value: int | float | str | bool
    kind: str                 # long, double, string, boolean
    tags: dict[str, str]      # sorted by key
    key: str                  # series_key(metric, tags)
    form: SeriesForm | None = field(default=None, compare=False, repr=False)   # the series' form

    @property
    def type(self) -> str:
        return TYPE_OF[self.kind]


def _as_text(value: Any) -> str | None:
    """A JSON scalar as a name: text as is, numbers and booleans as their JSON text."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return orjson.dumps(value).decode()
    return None


def typed_value(value: Any) -> tuple[int | float | str | bool, str] | str:
    """(value, kind) of a JSON value that is not null or "", or the error string of rule 3."""
    t = type(value)
    if t is str:
        return _typed_text(value)
    if t is int:
        if _LONG_MIN <= value <= _LONG_MAX:
            return value, LONG
        return float(value), DOUBLE
    if t is float:
        return value, DOUBLE
    if t is bool:
        return value, BOOLEAN
    return BAD_VALUE_TYPE


def _typed_text(text: str) -> tuple[int | float | str, str]:
    """A string value: the number it spells when it is a plain decimal literal, else itself."""
    if _NUMBER.fullmatch(text) is None:
        return text, STRING
    return _number(text)


def _number(text: str) -> tuple[int | float | str, str]:
    """A plain decimal literal as a number: a long when it is an integer that fits, else a double;
    a literal too big for a double stays a string (it is not a finite number)."""
    if "." not in text and "e" not in text and "E" not in text:
        digits = text.lstrip("-").lstrip("0")
        if len(digits) <= 19:    # never hand int() thousands of digits
            n = int(text[0] + digits if text[0] == "-" and digits else digits or "0")
            if _LONG_MIN <= n <= _LONG_MAX:
                return n, LONG
    f = float(text)
    if math.isinf(f):
        return text, STRING
    return f, DOUBLE


def plain_value(value: Any) -> tuple[str, bytes] | None:
    """(kind, its JSON in the record) of a value that needs no more checks than this: a float, an
    int within 64 bits, a boolean, a string within the size limit; None for any other (the long
    way decides it)."""
    vt = value.__class__
    if vt is float:
        return DOUBLE, orjson.dumps(value)
    if vt is int:
        return (LONG, b"%d" % value) if _LONG_MIN <= value <= _LONG_MAX else None
    if vt is bool:
        return BOOLEAN, b"true" if value else b"false"
    if vt is str and value and (len(value) <= STRING_MAX_BYTES // 4 or len(value.encode()) <= STRING_MAX_BYTES):
        typed, kind = _typed_text(value)
        return kind, orjson.dumps(typed)
    return None


def check_point(raw: Any) -> Point | str:
    """A valid point, or the error string of the first rule it breaks."""
    if type(raw) is not dict:
        return METRIC_EMPTY
    metric = raw.get("metric")
    if metric is None or metric == "":
        return METRIC_EMPTY
    if type(metric) is not str:
        metric = _as_text(metric)
        if metric is None:
            return METRIC_NOT_TEXT
    # 2. timestamp
    ts = raw.get("timestamp")
    if type(ts) is not int:
        return BAD_TIMESTAMP
    if SECONDS[0] <= ts <= SECONDS[1]:
        ts *= 1000
    elif not MILLISECONDS[0] <= ts <= MILLISECONDS[1]:
        return BAD_TIMESTAMP
    # 3. value
    value = raw.get("value")
    if value is None or value == "":
        return EMPTY_VALUE
    typed = typed_value(value)
    if isinstance(typed, str):
        return typed
    # 4, 5. tags
    tags = raw.get("tags")
    if type(tags) is not dict or not tags:
        return MISSING_TAGS
    if len(tags) > MAX_TAGS:
        return f"Too many tags: {len(tags)}, max {MAX_TAGS}"
    # 6, 7 for the names: the verdict on these exact names is usually known
    verdict = series_form(metric, tags)
    if isinstance(verdict, str):
        return verdict
    # 7 for the value (a character is at most 4 bytes of UTF-8: short texts need no encoding)
    value, kind = typed
    if kind == STRING and isinstance(value, str) and len(value) > STRING_MAX_BYTES // 4 \
            and len(value.encode()) > STRING_MAX_BYTES:
        return STRING_TOO_LONG
    return Point(metric, ts, value, kind, verdict.tags, verdict.key, verdict)


def series_form(metric: str, tags: dict[Any, Any]) -> SeriesForm | str:
    """Rules 6 and the metric's 7 for a metric (text) and a non-empty tags object: the series'
    form, or the error. Remembered when every tag value is text: 1, 1.0 and True are equal keys
    of a dict, "1" is not."""
    try:
        names: tuple[Any, ...] = (metric, *tags, *tags.values())
        verdict = _series.get(names)
    except TypeError:   # an unhashable tag value (object, array): the long way
        names, verdict = (), None
    if verdict is None:
        verdict = _check_names(metric, tags)
        if names and all(type(v) is str for v in tags.values()):
            if len(_series) >= NAME_CACHE:
                _series.clear()
            # interned: the few distinct names are shared by the stored keys, so comparing a key
            # found by its hash reads memory the last points read too
            _series[tuple(map(sys.intern, names))] = verdict
    return verdict


def _too_long(name: str) -> bool:
    """Over METRIC_MAX_BYTES of UTF-8 (a character is at most 4 bytes: short names need no encoding)."""
    return len(name) > METRIC_MAX_BYTES // 4 and len(name.encode()) > METRIC_MAX_BYTES


def _check_names(metric: str, tags: dict[str, Any]) -> SeriesForm | str:
    """Rules 6 and the metric's 7 over the names: the series' form, or the error."""
    bad = illegal_character(metric)
    if bad:
        return f'Invalid metric name ("{metric}"): illegal character: {bad}'
    clean: dict[str, str] = {}
    for k, v in tags.items():
        if not k:
            return EMPTY_TAG_NAME
        bad = illegal_character(k)
        if bad:
            return f'Invalid tag name ("{k}"): illegal character: {bad}'
        if type(v) is not str:
            if v is None:
                return EMPTY_TAG_VALUE
            v = _as_text(v)
            if v is None:
                return TAG_VALUE_NOT_TEXT
        if not v:
            return EMPTY_TAG_VALUE
        bad = illegal_character(v)
        if bad:
            return f'Invalid tag value ("{v}"): illegal character: {bad}'
        clean[k] = v
    if _too_long(metric):
        return METRIC_TOO_LONG
    for k, v in clean.items():
        if _too_long(k):
            return TAG_NAME_TOO_LONG
        if _too_long(v):
            return TAG_VALUE_TOO_LONG
    if len(clean) > 1:
        clean = dict(sorted(clean.items()))
    key = series_key(metric, clean)
    form = _forms.get(key)
    if form is None:
        if len(_forms) >= NAME_CACHE:
            _forms.clear()
        form = _forms[key] = SeriesForm(metric, clean, key)
    return form


def check_points(raw: list[Any]) -> list[Point | str]:
    """check_point for each element, in order."""
    return [check_point(p) for p in raw]


# A checked point as the writer takes it: (its index in the request, its series' form, its kind,
# its time in ms, its record: series.record_data's bytes).
Checked = tuple[int, SeriesForm, str, int, bytes]


def check_batch(raw: list[Any], texts: Callable[[int], bytes] | None = None) -> tuple[list[str | None], list[Checked]]:
    """Every element of a put checked and, when valid, made into its record: (per element its
    error string or None; the valid ones in order). The same verdicts as check_point. `texts`:
    element i's JSON text as received, for names written as non-integer numbers (numbers_as_written)."""
    errors: list[str | None] = [None] * len(raw)
    ok: list[Checked] = []
    add = ok.append
    known = _series.get
    dumps, join = orjson.dumps, b"".join
    last_ts, middle = -1, b""   # a record's bytes between its series' head and its value: per timestamp
    for i, p in enumerate(raw):
        # the fast path: a known series, a plain timestamp and value; anything else falls through
        try:
            if p.__class__ is dict and (tags := p["tags"]).__class__ is dict:
                # only text metrics and tag values are stored keys: other JSON values find nothing
                form = known((p["metric"], *tags, *tags.values()))
                ts = p["timestamp"]
                # the seconds' and the milliseconds' ranges meet: 9,999,999,999 s, 10,000,000,000 ms
                if form.__class__ is SeriesForm and ts.__class__ is int and 4_284_768 <= ts <= 9_999_999_999_999:
                    if ts <= 9_999_999_999:
                        ts *= 1000
                    value = p["value"]
                    typed = (DOUBLE, dumps(value)) if value.__class__ is float else plain_value(value)
                    if typed is not None:
                        kind, vj = typed
                        # form.record(ts, vj), inline: points of a request mostly share their time
                        if ts != last_ts:
                            last_ts, middle = ts, b'%d,"value":' % ts
                        add((i, form, kind, ts, join((form.head, middle, vj, form.tail))))
                        continue
        except (KeyError, TypeError):   # a field missing, an unhashable tag value: the long way
            pass
        if texts is not None:
            p = numbers_as_written(p, texts, i)
        checked = check_point(p)
        if isinstance(checked, str):
            errors[i] = checked
        else:
            form = checked.form
            assert form is not None
            add((i, form, checked.kind, checked.timestamp_ms, form.record(checked.timestamp_ms, dumps(checked.value))))
    return errors, ok


def numbers_as_written(p: Any, texts: Callable[[int], bytes], i: int) -> Any:
    """Point i with each name written as a non-integer JSON number (a tag value, the metric) as
    its text was written - `1e20`, `1E2`, `1.50`, an integer past 64 bits - as HiTSDB's Jackson
    reads a number into a string; Python's float would say `1e+20` (refused for its +), `100.0`,
    `1.5`. Other points (integers and booleans are spelled alike either way) as they are."""
    if type(p) is not dict:
        return p
    tags, metric = p.get("tags"), p.get("metric")
    in_tags = type(tags) is dict and float in set(map(type, tags.values()))
    if not in_tags and type(metric) is not float:
        return p
    try:
        written = _FIELD_TEXTS.decode(texts(i))
        fixed = dict(p)
        if type(metric) is float:
            fixed["metric"] = bytes(written["metric"]).decode()
        if isinstance(tags, dict) and in_tags:
            fixed["tags"] = _tags_as_written(tags, written["tags"])
        return fixed
    except (msgspec.DecodeError, KeyError, RecursionError):   # nesting past msgspec's limit: as parsed
        return p


def _tags_as_written(tags: dict[str, Any], tags_text: bytes | msgspec.Raw) -> dict[str, Any]:
    """`tags` (parsed from `tags_text`) with each float value as its text there. Raises what
    msgspec raises for a text it cannot read."""
    texts = _FIELD_TEXTS.decode(tags_text)
    return {k: bytes(texts[k]).decode() if type(v) is float else v for k, v in tags.items()}


_FIELD_TEXTS = msgspec.json.Decoder(dict[str, msgspec.Raw])   # an object's members, each as written


def type_conflict(series_kind: str, kind: str) -> str | None:
    """The error string when a point of `kind` goes to a series holding `series_kind` values
    (rule 8), None when it may (long and double mix)."""
    series_type = TYPE_OF[series_kind]
    if series_type == TYPE_OF[kind]:
        return None
    if series_type == NUMERIC and kind == STRING:
        return NOT_A_NUMBER
    return f"Value type mismatch: series holds {series_kind} values"


__all__ = ["Point", "Checked", "Wire", "WIRE", "WIRE_ERRORS", "raw_forms", "raw_series_form", "plain_value",
           "check_point", "check_points", "check_batch", "series_form", "type_conflict", "illegal_character",
           "typed_value", "NUMERIC", "STRING", "BOOLEAN", "LONG", "DOUBLE"]
