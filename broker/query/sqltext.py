"""The Timeplus spellings sqlglot's ClickHouse dialect does not know, rewritten before parsing.

`raw:key` / `raw:a.b` (JSON access) become `__json(raw, 'key')`, and interval literals such as
`5s` (in `tumble(s, 5s)`) become `__interval(5000)`. One regex walks the text and leaves string
literals, quoted identifiers and comments untouched, so a `'a:b'` or `'5s'` value is never
rewritten. An interval's number has at most 18 digits (a longer one is left as
written, and is then not an interval). Everything else (`::` casts, `SETTINGS`, `table(s)`) the dialect parses itself.
"""
from __future__ import annotations

import re

JSON_FN = "__json"
INTERVAL_FN = "__interval"

JSON_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

_TOKENS = re.compile(r"""
      '(?:[^'\\]|\\.|'')*'                 # string literal: kept
    | "(?:[^"\\]|\\.)*"                    # quoted identifier: kept
    | `[^`]*`                              # quoted identifier: kept
    | --[^\n]*                             # comment: kept
    | /\*.*?\*/                            # comment: kept
    | (?<![\w:.])(?P<col>[A-Za-z_]\w*):(?!:)(?P<path>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)
    | (?<![\w.])(?P<n>\d{1,18})(?P<unit>ms|s|m|h|d)\b
""", re.VERBOSE | re.DOTALL)


def _rewrite(m: re.Match[str]) -> str:
    if m.group("col"):
        return f"{JSON_FN}({m.group('col')}, '{m.group('path')}')"
    if m.group("n"):
        return f"{INTERVAL_FN}({int(m.group('n')) * UNIT_MS[m.group('unit')]})"
    return m.group(0)


def rewrite(sql: str) -> str:
    return _TOKENS.sub(_rewrite, sql)
