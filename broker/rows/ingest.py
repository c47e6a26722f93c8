"""The four Timeplus ingest formats: choosing one from the request, and body -> record data.

`choose_format`: `?format=` wins over Content-Type (spec section 4), with the spellings the
generated client uses too (`compat`, `stream`). Decisions: an empty `?format=` counts as absent;
Content-Type's own `format=` parameter is read the same way under any of the known media types;
a request without a Content-Type, or with one we do not know (curl's form default), is `compact`,
the Timeplus default, and then fails as a malformed body if it is not one.

`decode`: an empty body is a 400 in every format ("empty body"); a body that is valid but holds
no rows (`"data": []`, only blank lines) gives no records, and the caller writes nothing.
Malformed JSON is BAD_BODY naming the byte offset and, for streaming, the object's index.
`streaming` takes objects one per line (orjson per line, the fast path) or spread over lines or
concatenated with no separator (an incremental decoder, the fallback); a top-level value that is
not an object is refused. JSON numbers that are NaN/Infinity or overflow a double are refused
rather than stored as null; integers beyond 64 bits are read as doubles (orjson's reading, on
both paths, so a row does not depend on its layout). `raw` and `lines` bodies must be UTF-8.
"""
from __future__ import annotations

import json
import math

import orjson

from broker.errors import ErrorCode, client_error
from broker.rows.encode import RowEncoder

FORMATS = ("compact", "streaming", "raw", "lines")
_SPELLINGS = {"compact": "compact", "compat": "compact", "streaming": "streaming", "stream": "streaming",
              "raw": "raw", "lines": "lines"}
_JSON_TYPES = ("application/json", "application/vnd.timeplus+json")
_NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines")
_JSON_SPACE = " \t\n\r"


def choose_format(format_param: str | None, content_type: str | None) -> str:
    """One of FORMATS; ClientError(INVALID_REQUEST) for a format nobody spells that way."""
    if format_param:
        return _spelled(format_param, "the format parameter")
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "format" and value.strip().strip("\"'"):
            return _spelled(value.strip().strip("\"'"), "the Content-Type format")
    if media in _NDJSON_TYPES:
        return "streaming"
    if media == "text/plain":
        return "raw"
    return "compact"


def _spelled(text: str, where: str) -> str:
    fmt = _SPELLINGS.get(text.strip().lower())
    if fmt is None:
        raise client_error(ErrorCode.INVALID_REQUEST,
                           detail=f"unknown ingest format [{text}] in {where}; use one of {', '.join(FORMATS)}")
    return fmt


def decode(fmt: str, body: bytes, encoder: RowEncoder, now_ms: int) -> list[bytes]:
    """The request body in format `fmt` -> one record data per row (nothing when any row is bad)."""
    if not body:
        raise _bad_body("empty body")
    if fmt == "compact":
        return _compact(body, encoder, now_ms)
    if fmt == "streaming":
        return encoder.objects(_objects(body), now_ms)
    if fmt == "raw":
        return encoder.texts([_text(body)], now_ms)
    if fmt == "lines":
        lines = [line[:-1] if line.endswith("\r") else line for line in _text(body).split("\n")]
        return encoder.texts([line for line in lines if line], now_ms)
    raise client_error(ErrorCode.INVALID_REQUEST, detail=f"unknown ingest format [{fmt}]")


def _compact(body: bytes, encoder: RowEncoder, now_ms: int) -> list[bytes]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        try:   # orjson reports bad UTF-8 at position 0, wherever it is
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise _bad_body(f"the body is not valid UTF-8 at byte {bad.start}") from None
        raise _bad_body(f"malformed JSON at byte {_byte_offset(body, e.pos)}: {e.msg}") from None
    if type(doc) is not dict or "columns" not in doc or "data" not in doc:
        raise _bad_body('the compact format is one JSON object {"columns": [...], "data": [[...], ...]}')
    return encoder.compact(doc["columns"], doc["data"], now_ms)


def _objects(body: bytes) -> list:
    """JSON objects one after another: per line with orjson when that works, else incrementally."""
    try:
        rows = [orjson.loads(line) for line in body.split(b"\n") if not line.isspace() and line]
    except orjson.JSONDecodeError:
        rows = None
    if rows and set(map(type, rows)) <= {dict}:
        return rows
    return _objects_incremental(body)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a double")
    return value


def _int_like_orjson(text: str) -> int | float:
    # orjson (the line fast path) reads integers beyond 64 bits as doubles; so does this path, so
    # the same object gives the same row whatever its layout
    value = int(text)
    return value if _I64_MIN <= value <= _U64_MAX else float(value)


_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite, parse_int=_int_like_orjson)


def _objects_incremental(body: bytes) -> list:
    text = _text(body)
    rows: list = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in _JSON_SPACE:
            pos += 1
        if pos == end:
            break
        try:
            value, after = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _bad_body(f"malformed JSON in object {len(rows)} at byte {_byte_offset(body, e.pos, text)}: "
                            f"{e.msg}") from None
        except ValueError as e:   # from the number hooks
            raise _bad_body(f"object {len(rows)} at byte {_byte_offset(body, pos, text)}: {e}") from None
        except RecursionError:    # orjson's line path stops at depth 1024; this one at the stack's limit
            raise _bad_body(f"object {len(rows)} at byte {_byte_offset(body, pos, text)} is nested too deeply") \
                from None
        if type(value) is not dict:
            raise _bad_body(f"object {len(rows)} at byte {_byte_offset(body, pos, text)} is not a JSON object")
        rows.append(value)
        pos = after
    if not rows:
        raise _bad_body("no JSON object in the body")
    return rows


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad_body(f"the body is not valid UTF-8 (byte {e.start})") from None


def _byte_offset(body: bytes, pos: int, text: str | None = None) -> int:
    """A character offset (what JSON decoders report) -> the byte offset in the body."""
    if text is None:
        if body.isascii():
            return pos
        text = body.decode("utf-8", "replace")
    return len(text[:pos].encode("utf-8", "surrogatepass"))


def _bad_body(detail: str) -> Exception:
    return client_error(ErrorCode.BAD_BODY, detail=detail)
