"""SQL text -> QueryPlan: parse (sqlglot, ClickHouse dialect after broker/query/sqltext.py),
resolve the stream and its columns, type-check and compile every expression once.

Every error a user can make is raised here, before any data is read: SQL_SYNTAX, UNKNOWN_COLUMN,
UNKNOWN_FUNCTION, TYPE_MISMATCH, UNSUPPORTED_SQL, ILLEGAL_DIVISION, and STREAM_NOT_FOUND from `lookup`. Hostile text
is a client error too, never another exception: the text is at most MAX_SQL_BYTES, parentheses
nest at most MAX_PAREN_DEPTH deep (sqlglot's parser spends ~20 Python frames per level), the
parsed tree is at most MAX_DEPTH deep (a chain `a AND b AND ...` of n terms is n deep: the
compiler recurses per level), and a RecursionError that still happens is UNSUPPORTED_SQL.
"""
from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Callable

import polars as pl
import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from broker.errors import ErrorCode, client_error
from broker.model import ColumnDef
from broker.query import dtypes
from broker.query.compile import (
    DISTINCT_AGGREGATES,
    ExprCompiler,
    Typed,
    function_name,
    is_aggregate,
    output_expr,
    shown,
)
from broker.query.dtypes import DATETIME64, NULL, kind
from broker.query.sqltext import INTERVAL_FN, JSON_FN, JSON_PATH, rewrite
from broker.rows.schema import RAW, TP_TIME

if TYPE_CHECKING:
    from broker.query.exec import Executor

WINDOW_COLUMNS = ("window_start", "window_end")
MAX_SQL_BYTES = 64 * 1024
MAX_PAREN_DEPTH = 32
MAX_DEPTH = 128
MAX_ALIAS_NODES = 4096   # expression nodes a query's aliases may expand to (see _Aliases)
MAX_HOP_WINDOWS = 1000               # windows per row of hop(): size / step
MAX_INTERVAL_MS = 3650 * 86_400_000   # windows of at most ten years: no int64 overflow
_INTERVAL_UNITS = {"millisecond": 1, "second": 1000, "minute": 60_000, "hour": 3_600_000,
                   "day": 86_400_000}


@dataclass(frozen=True)
class Window:
    """tumble (step == size) or hop; windows start at multiples of `step_ms` since the epoch."""
    kind: str
    time_column: str
    size_ms: int
    step_ms: int


@dataclass(frozen=True)
class Aggregate:
    """One aggregate call: `fn` in count_star, count, sum, avg, min, max, count_distinct; its
    input is the stage column `__in{i}` (none for count_star)."""
    fn: str
    input: Typed | None
    type: str


@dataclass
class QueryPlan:
    sql: str
    stream: str                           # "" for a query without FROM (`select 1`)
    bounded: bool                         # FROM table(s): scan what is stored, then finish
    seek_to: str | None                   # as written in SETTINGS seek_to
    seek_ms: int | None                   # earliest -> 0; latest / absent -> None
    header: list[tuple[str, str]]         # (name, canonical type) per result column
    analysis: dict
    time_columns: dict[str, int]          # eventTime / windowStart / windowEnd: index or -1
    raw_stream: bool                      # the stream has no schema: records are raw text
    limit: int | None
    # what the executors run
    columns: dict[str, str] = field(default_factory=dict)   # the stream's columns and types
    needed: tuple[str, ...] = ()          # columns the query reads
    uses_now: bool = False
    where: pl.Expr | None = None
    outputs: list[pl.Expr] = field(default_factory=list)     # result columns `__o{i}`, header order
    window: Window | None = None
    keys: list[Typed] = field(default_factory=list)          # GROUP BY keys (stage `__k{j}`)
    aggregates: list[Aggregate] = field(default_factory=list)
    having: pl.Expr | None = None

    @property
    def aggregating(self) -> bool:
        return bool(self.aggregates or self.keys or self.window)

    def executor(self) -> Executor:
        from broker.query.exec import make_executor
        return make_executor(self)


def _syntax(detail: str) -> Exception:
    return client_error(ErrorCode.SQL_SYNTAX, detail=detail)


def _unsupported(detail: str) -> Exception:
    return client_error(ErrorCode.UNSUPPORTED_SQL, detail=detail)


# sqlglot warns on its logger about statements it only half parses: client input, not our fault
logging.getLogger("sqlglot").setLevel(logging.ERROR)

# sqlglot drops empty items of a comma list (`select a,, from s` parses as `select a from s`):
# a comma before or after one of these tokens is a syntax error it would hide.
_NOT_AFTER_COMMA = {TokenType.COMMA, TokenType.FROM, TokenType.R_PAREN}
_NOT_BEFORE_COMMA = {TokenType.SELECT, TokenType.L_PAREN}


def _too_deep(what: str, limit: int | None = None) -> Exception:
    if limit is None:
        return _unsupported(f"the query nests {what} too deeply")
    return _unsupported(f"{what} nest more than {limit} levels deep (a chain such as a AND b AND ... "
                        "counts a level per operator; write long lists as IN (...))")


def _check_tokens(text: str) -> None:
    """What sqlglot would silently accept (empty list items) or overflow the stack on (deep
    parentheses)."""
    tokens = Dialect.get_or_raise("clickhouse").tokenize(text)
    depth = 0
    for token in tokens:
        if token.token_type == TokenType.L_PAREN:
            depth += 1
            if depth > MAX_PAREN_DEPTH:
                raise _too_deep("parentheses", MAX_PAREN_DEPTH)
        elif token.token_type == TokenType.R_PAREN:
            depth -= 1
    for before, after in itertools.pairwise(tokens):
        if (before.token_type == TokenType.COMMA and after.token_type in _NOT_AFTER_COMMA) or \
                (after.token_type == TokenType.COMMA and before.token_type in _NOT_BEFORE_COMMA):
            raise _syntax(f"unexpected ',' near line {after.line}, column {after.col}")
    _check_dropped_arguments(tokens)
    if tokens and tokens[-1].token_type == TokenType.COMMA:
        raise _syntax("the query ends with ','")


# Calls whose arguments sqlglot's parser drops without a word, so only the tokens show them:
# `length(s, 1)` parses as length(s); `and(b)` / `or(b)` (the function forms of AND and OR, which
# take two or more) as `(b)`, so `select and(s)` answered s. ClickHouse refuses all three.
_EXPRESSION_START = {TokenType.SELECT, TokenType.WHERE, TokenType.HAVING, TokenType.COMMA, TokenType.L_PAREN,
                     TokenType.NOT, TokenType.WHEN, TokenType.THEN, TokenType.ELSE, TokenType.AND, TokenType.OR,
                     TokenType.EQ, TokenType.NEQ, TokenType.LT, TokenType.LTE, TokenType.GT, TokenType.GTE,
                     TokenType.PLUS, TokenType.DASH, TokenType.SLASH, TokenType.MOD}


def _argument_count(tokens: list, open_at: int) -> int:
    """The arguments of the call whose `(` is tokens[open_at]: its top-level commas + 1 (0 if empty)."""
    depth, commas = 0, 0
    for i in range(open_at, len(tokens)):
        kind = tokens[i].token_type
        if kind == TokenType.L_PAREN:
            depth += 1
        elif kind == TokenType.R_PAREN:
            depth -= 1
            if depth == 0:
                return commas + 1 if i > open_at + 1 else 0
        elif kind == TokenType.COMMA and depth == 1:
            commas += 1
    return commas + 1


def _check_dropped_arguments(tokens: list) -> None:
    for i in range(len(tokens) - 1):
        token, kind = tokens[i], tokens[i].token_type
        if tokens[i + 1].token_type != TokenType.L_PAREN:
            continue
        if kind == TokenType.VAR and token.text.lower() == "length" and _argument_count(tokens, i + 1) > 1:
            raise _syntax("length() takes 1 argument")
        if kind in (TokenType.AND, TokenType.OR) and (i == 0 or tokens[i - 1].token_type in _EXPRESSION_START) \
                and _argument_count(tokens, i + 1) < 2:
            raise _syntax(f"{token.text.lower()}() takes at least 2 arguments")


def _check_tree(tree: exp.Expr) -> None:
    """Depth, and the shape of the pre-pass's functions (which a user can also write)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep("expressions", MAX_DEPTH)
        if isinstance(node, exp.Alias) and isinstance(node.args.get("alias"), exp.Placeholder):
            # `raw :a`, `t.raw:a`, `raw:a:b`, `raw:1a` are not the pre-pass's JSON access, and
            # sqlglot reads `x :a` as x with the alias `a`: the whole record came back, named a
            raise _syntax("JSON access is written column:key or column:a.b (no spaces, no stream before the "
                          "column, a key starting with a letter or _)")
        if isinstance(node, exp.Anonymous) and node.name == JSON_FN:
            args = node.expressions
            if not (len(args) == 2 and isinstance(args[0], exp.Column) and isinstance(args[1], exp.Literal)
                    and args[1].is_string and JSON_PATH.fullmatch(args[1].this)):
                raise _syntax("JSON access is written column:key or column:a.b")
        stack.extend((child, depth + 1) for child in node.iter_expressions())


# ClickHouse's comparison operators (=, !=, <, <=, >, >=, [NOT] LIKE, [NOT] ILIKE, IN) share one
# precedence and group left to right: `a = b < c` is `(a = b) < c`, `a != b IN (1)` is
# `(a != b) IN (1)`. sqlglot gives = and != a lower precedence than < and >, and those a lower one
# than IN and LIKE, so it read both as `a = (b < c)` - another answer.
_EQUALITY_LEVEL = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)
_COMPARISON_LEVEL = (*_EQUALITY_LEVEL, exp.Like, exp.ILike, exp.In)


def _grouped_right(node: exp.Expr) -> bool:
    """An operator of the comparison level on the right of another: `NOT IN` is Not(In) (a NOT
    there can be no other: ClickHouse refuses `a = NOT b`)."""
    right = node.expression
    return isinstance(node, _EQUALITY_LEVEL) and (isinstance(right, _COMPARISON_LEVEL) or (
        isinstance(right, exp.Not) and isinstance(right.this, exp.In)))


def _regroup(node: exp.Expr) -> exp.Expr:
    """`a op (b op2 c)` as sqlglot parsed it (no parentheses written) -> `(a op b) op2 c`."""
    while _grouped_right(node):
        top = node.expression.copy()
        right = top.this if isinstance(top, exp.Not) else top
        left = node.copy()
        left.set("expression", right.this)
        right.set("this", _regroup(left))
        node = top
    return node


def _comparisons_left_to_right(tree: exp.Expr) -> None:
    """Regroups every chain of comparisons as ClickHouse does (above), children first, in place."""
    for node in reversed(list(tree.walk(bfs=False))):
        if _grouped_right(node):
            node.replace(_regroup(node))


def _parse(sql: str) -> exp.Select:
    size = len(sql.encode("utf-8", "surrogatepass"))
    if size > MAX_SQL_BYTES:
        raise _unsupported(f"the SQL text is {size} bytes; at most {MAX_SQL_BYTES} are accepted")
    try:
        text = rewrite(sql)
        _check_tokens(text)
        statements = sqlglot.parse(text, read="clickhouse")
    except (ParseError, TokenError) as e:
        raise _syntax((str(e).splitlines() or ["cannot parse the query"])[0][:300]) from None
    except RecursionError:
        raise _too_deep("expressions") from None
    statements = [s for s in statements if s is not None]
    if len(statements) != 1:
        raise _syntax("expected exactly one statement")
    tree = statements[0]
    assert tree is not None
    _check_tree(tree)
    _comparisons_left_to_right(tree)
    if not isinstance(tree, exp.Select):
        if isinstance(tree, (exp.Insert, exp.Create, exp.Drop, exp.Delete, exp.Update, exp.Alter, exp.Command,
                             exp.SetOperation)):
            raise _unsupported(f"only SELECT queries are supported, not {tree.key.upper()}")
        raise _syntax(f"expected a SELECT query: {sql.strip()[:40]!r}")   # `selec x` parses as an alias
    if not tree.expressions:
        raise _syntax("the select list is empty")
    for key in ("joins", "with_", "order", "offset", "distinct", "laterals", "qualify", "windows", "prewhere"):
        if tree.args.get(key):
            raise _unsupported(f"{key.rstrip('_').upper()} is not supported")
    _check_modifiers(tree)
    if tree.find(exp.Subquery, exp.Window, exp.Union) is not None:
        raise _unsupported("subqueries, window functions (OVER) and UNION are not supported")
    return tree


# Clauses sqlglot keeps beside the ones the compiler reads, each of which changes the answer; they
# were dropped without a word (`select * except (i)` listed i, `limit 1 by b` was `limit 1`,
# `with rollup` had no subtotal rows, `prewhere i > 1` kept every row)
_MODIFIERS = (("group", "rollup", "WITH ROLLUP"), ("group", "cube", "WITH CUBE"), ("group", "totals", "WITH TOTALS"),
              ("group", "all", "GROUP BY ALL"), ("group", "grouping_sets", "GROUPING SETS"),
              ("limit", "expressions", "LIMIT ... BY"), ("limit", "limit_options", "LIMIT ... WITH TIES"))


def _check_modifiers(tree: exp.Select) -> None:
    for clause, key, text in _MODIFIERS:
        node = tree.args.get(clause)
        if node is not None and node.args.get(key):
            raise _unsupported(f"{text} is not supported")
    source = tree.args.get("from_")
    if source is not None and source.this.args.get("sample") is not None:
        raise _unsupported("SAMPLE is not supported")
    for star in tree.expressions:
        if isinstance(star, exp.Star) and any(star.args.get(k) for k in ("except_", "replace", "rename")):
            raise _unsupported("* EXCEPT / REPLACE is not supported")


def _interval_ms(node: exp.Expression) -> int:
    if isinstance(node, exp.Anonymous) and node.name == INTERVAL_FN:
        arg = node.expressions[0] if len(node.expressions) == 1 else None
        if not (isinstance(arg, exp.Literal) and not arg.is_string and _DIGITS.fullmatch(arg.this)):
            raise _syntax(f"expected an interval such as 5s, got {node.sql('clickhouse')[:100]}")
        ms = int(arg.this)
    elif isinstance(node, exp.Interval):
        unit = node.text("unit").lower().rstrip("s")
        if unit not in _INTERVAL_UNITS:
            raise _unsupported(f"interval unit {unit}")
        value = node.this.this if isinstance(node.this, exp.Literal) else None
        if not (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
            raise _syntax(f"bad interval {node.sql('clickhouse')[:100]}")
        ms = int(float(value) * _INTERVAL_UNITS[unit])
    else:
        raise _syntax(f"expected an interval such as 5s, got {node.sql('clickhouse')[:100]}")
    if ms <= 0:
        raise _syntax("a window interval must be positive")
    if ms > MAX_INTERVAL_MS:
        raise _unsupported(f"a window interval is at most {MAX_INTERVAL_MS // 86_400_000} days")
    return ms


_DIGITS = re.compile(r"[0-9]{1,30}")   # int() of more digits than 4300 is a ValueError
_NUMBER = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,12})?")


# The one database a Timeplus workspace has: `default.s` is the workspace's `s`.
WORKSPACE_DATABASE = "default"


def _stream_name(node: exp.Column | exp.Table | exp.Identifier) -> str:
    """A stream's name as the query names it. A qualified name must name the workspace's own
    database (`default.s`): any other qualifier (`p1.s`, another project's name) is an unknown
    stream, never the workspace's `s` read in its place - a query reads its own workspace only."""
    if isinstance(node, exp.Column):
        parts = [node.args.get("catalog"), node.args.get("db"), node.args.get("table")]
    elif isinstance(node, exp.Table):
        parts = [node.args.get("catalog"), node.args.get("db")]
    else:
        parts = []
    qualifiers = [p.name for p in parts if p is not None]
    if qualifiers and qualifiers != [WORKSPACE_DATABASE]:
        raise client_error(ErrorCode.STREAM_NOT_FOUND, stream=".".join([*qualifiers, node.name])[:200])
    return node.name


def _stream_arg(node: exp.Expression) -> tuple[str, bool]:
    """`s` or `table(s)` -> (name, bounded)."""
    if isinstance(node, (exp.Column, exp.Table, exp.Identifier)) and node.name:
        return _stream_name(node), False
    if isinstance(node, exp.Anonymous) and node.name.lower() == "table" and len(node.expressions) == 1:
        return _stream_arg(node.expressions[0])[0], True
    raise _syntax(f"expected a stream name, got {node.sql('clickhouse')}")


def _source(tree: exp.Select) -> tuple[str, bool, exp.Anonymous | None]:
    """(stream, bounded, the tumble/hop call or None)."""
    source = tree.args.get("from_")
    if source is None:
        return "", True, None
    table = source.this
    if not isinstance(table, exp.Table):
        raise _unsupported(f"FROM {table.sql('clickhouse')}")
    inner = table.this
    if isinstance(inner, exp.Identifier):
        return _stream_name(table), False, None
    if isinstance(inner, exp.Anonymous):
        name = inner.name.lower()
        if name == "table":
            stream, bounded = _stream_arg(inner)
            return stream, bounded, None
        if name in ("tumble", "hop"):
            if not inner.expressions:
                raise _syntax(f"{name}() needs a stream")
            stream, bounded = _stream_arg(inner.expressions[0])
            return stream, bounded, inner
    raise _unsupported(f"FROM {table.sql('clickhouse')}")


def _window(call: exp.Anonymous, columns: dict[str, str]) -> Window:
    name = call.name.lower()
    args = list(call.expressions[1:])
    intervals = 1 if name == "tumble" else 2
    time_column = TP_TIME
    if len(args) == intervals + 1:
        col = args.pop(0)
        if not isinstance(col, exp.Column):
            raise _syntax(f"{name}(): expected a time column, got {col.sql('clickhouse')}")
        time_column = col.name
    if len(args) != intervals:
        shape = "tumble(stream, [time_column], size)" if name == "tumble" else \
            "hop(stream, [time_column], step, size)"
        raise _syntax(f"expected {shape}")
    if time_column not in columns:
        raise client_error(ErrorCode.UNKNOWN_COLUMN, column=time_column,
                           detail=f"{name}() needs an existing time column")
    if kind(columns[time_column]) not in ("datetime64", "datetime", "date"):
        raise client_error(ErrorCode.TYPE_MISMATCH,
                           detail=f"{name}() time column {time_column} is {columns[time_column]}")
    sizes = [_interval_ms(a) for a in args]
    if name == "tumble":
        return Window("tumble", time_column, sizes[0], sizes[0])
    step, size = sizes
    if step > size:
        raise _syntax("hop(): the step must not exceed the size")
    if -(-size // step) > MAX_HOP_WINDOWS:
        raise _unsupported(f"hop(): a row would be in {-(-size // step)} windows (size / step); "
                           f"at most {MAX_HOP_WINDOWS} are supported")
    return Window("hop", time_column, size, step)


_DATE_WITH_OFFSET = re.compile(r"(\d{4}-\d\d-\d\d)(Z|[+-].*)", re.ASCII)   # midnight at that offset


def _settings(tree: exp.Select) -> tuple[str | None, int | None]:
    seek_to: str | None = None
    for item in tree.args.get("settings") or []:
        if not (isinstance(item, exp.EQ) and isinstance(item.this, exp.Column)):
            raise _syntax(f"bad setting {item.sql('clickhouse')}")
        if item.this.name.lower() == "seek_to":   # other settings are accepted and ignored
            value = item.expression
            if not (isinstance(value, exp.Literal) and value.is_string):
                raise _syntax("seek_to takes a string: 'earliest', 'latest' or an ISO 8601 time")
            seek_to = value.this
    if seek_to is None or seek_to.lower() == "latest":
        return seek_to, None
    if seek_to.lower() == "earliest":
        return seek_to, 0
    text = seek_to.strip()
    dated = _DATE_WITH_OFFSET.fullmatch(text)   # fromisoformat read the offset as the time of day
    try:
        when = datetime.fromisoformat(f"{dated[1]}T00:00{dated[2]}" if dated else text.replace(" ", "T", 1))
    except ValueError:
        raise _syntax(f"seek_to='{seek_to}': expected 'earliest', 'latest' or an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return seek_to, max(0, math.floor(when.timestamp() * 1000))


def _limit(tree: exp.Select) -> int | None:
    node = tree.args.get("limit")
    if node is None:
        return None
    value = node.expression
    if not (isinstance(value, exp.Literal) and not value.is_string and _DIGITS.fullmatch(value.this)
            and int(value.this) < 2**63):
        raise _syntax("LIMIT takes an integer from 0 to 2^63-1")
    return int(value.this)


def _display_name(node: exp.Expression) -> str:
    """The name Timeplus gives an unaliased result column: the expression's text."""
    if isinstance(node, exp.Column):
        return node.name

    def back(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.Anonymous) and n.name == JSON_FN:
            return exp.Var(this=f"{n.expressions[0].name}:{n.expressions[1].this}")
        return n
    return node.transform(back).sql("clickhouse")


def _select_items(tree: exp.Select, columns: dict[str, str]) -> list[tuple[str, exp.Expression]]:
    items: list[tuple[str, exp.Expression]] = []
    for node in tree.expressions:
        if isinstance(node, exp.Star):
            if not columns:
                raise _syntax("SELECT * needs FROM")
            items.extend((name, exp.column(name)) for name in columns)
        elif isinstance(node, exp.Alias):
            items.append((node.alias, node.this))
        else:
            items.append((_display_name(node), node))
    return items


class _Aliases:
    """Select aliases used elsewhere in the query (WHERE, other items): each name of an alias that
    is not a stream column stands for the aliased expression, as in ClickHouse (where the alias
    wins over a column of its name by default, prefer_column_name_to_alias = 0; here the column
    does, as GROUP BY has it). An alias that leads back to itself is an error, as ClickHouse's
    cyclic aliases; one that expands past MAX_ALIAS_NODES expression nodes too (`1 as a0, a0 + a0
    as a1, ...`: each use copies the tree, 2^n nodes, and compiling them held the event loop for
    seconds - ClickHouse's max_expanded_ast_elements)."""

    def __init__(self, named: dict[str, exp.Expression], columns: dict[str, str]) -> None:
        self.named, self.columns = named, columns
        self._sizes: dict[str, int] = {}   # an alias's expression's nodes, expanded
        self._expanded: dict[str, exp.Expression] = {}
        self.added = 0   # nodes the expansions of this query added so far (each use copies)

    def _refs(self, node: exp.Expression) -> list[str]:
        return [c.name for c in node.find_all(exp.Column)
                if not c.table and c.name not in self.columns and c.name in self.named]

    def _extra(self, node: exp.Expression, seen: tuple[str, ...] = ()) -> int:
        """Nodes the expansion of `node`'s aliases adds to it (counted, not built)."""
        extra = 0
        for name in self._refs(node):
            if name in seen:
                raise _syntax(f"cyclic aliases: {' -> '.join((*seen, name))}")
            if name not in self._sizes:
                alias = self.named[name]
                self._sizes[name] = sum(1 for _ in alias.walk()) + self._extra(alias, (*seen, name))
            extra += self._sizes[name] - 1
            if extra > MAX_ALIAS_NODES:
                break
        return extra

    def expand(self, node: exp.Expression) -> exp.Expression:
        """`node` with its aliases expanded; the whole query's expansions add at most
        MAX_ALIAS_NODES nodes (per expression, 500 uses of a big alias took 14 s: the review)."""
        self.added += self._extra(node)
        if self.added > MAX_ALIAS_NODES:
            raise _unsupported(f"the query's aliases expand to more than {MAX_ALIAS_NODES} expression nodes")
        return self._expand(node)

    def _expand(self, node: exp.Expression) -> exp.Expression:
        def swap(n: exp.Expression) -> exp.Expression:
            if not isinstance(n, exp.Column) or n.table or n.name in self.columns or n.name not in self.named:
                return n
            if n.name not in self._expanded:
                self._expanded[n.name] = self._expand(self.named[n.name])
            return self._expanded[n.name].copy()
        return node.copy().transform(swap)


def _aggregate_of(node: exp.Expression, compiler: ExprCompiler) -> Aggregate:
    name = function_name(node)
    arg = node.this if not isinstance(node, exp.Anonymous) else (
        node.expressions[0] if len(node.expressions) == 1 else None)
    # min(i, 100) is Min(this=i, expressions=[100]): the 100 was dropped, the answer min(i);
    # count(a, b) ClickHouse takes (it counts the rows)
    if (isinstance(node, exp.Anonymous) and len(node.expressions) != 1) or node.args.get("accuracy") is not None \
            or (not isinstance(node, (exp.Anonymous, exp.Count)) and node.args.get("expressions")):
        raise _syntax(f"{name}() takes one argument")
    if isinstance(node, exp.Count):
        if arg is None or isinstance(arg, exp.Star):
            return Aggregate("count_star", None, "uint64")
        if isinstance(arg, exp.Distinct):
            if len(arg.expressions) != 1:
                raise _unsupported("count(DISTINCT ...) of more than one expression")
            return Aggregate("count_distinct", compiler.compile(arg.expressions[0]), "uint64")
        return Aggregate("count", compiler.compile(arg), "uint64")
    if arg is None or isinstance(arg, exp.Star):
        raise _syntax(f"{name}() needs an argument")
    if any(is_aggregate(n) for n in arg.find_all(exp.Expression) if n is not arg):
        raise _unsupported("aggregates inside aggregates")
    t = compiler.compile(arg)
    if name in DISTINCT_AGGREGATES:
        return Aggregate("count_distinct", t, "uint64")
    if name in ("sum", "avg"):
        if not dtypes.is_numeric(t.type):
            raise client_error(ErrorCode.TYPE_MISMATCH, detail=f"{name}() of {t.type}")
        # ClickHouse: the sum and avg of a Nullable (a nullable column, or an expression of one:
        # `n + 1`) are Nullable, NULL when no value was not null
        nullable = dtypes.is_nullable(t.type)
        if name == "avg":
            return Aggregate("avg", t, dtypes.nullable("float64", nullable))
        k = kind(t.type)
        total = "float64" if k in ("float", NULL) else "uint64" if k == "uint" else "int64"
        return Aggregate("sum", t, dtypes.nullable(total, nullable))
    if kind(t.type) == "json":
        raise client_error(ErrorCode.TYPE_MISMATCH, detail=f"{name}() of json")
    return Aggregate(name, t, t.type)


def compile_query(sql: str, lookup: Callable[[str], tuple[ColumnDef, ...]]) -> QueryPlan:
    try:
        return _compile(sql, lookup)
    except RecursionError:   # the limits above should make this unreachable: still a 4xx
        raise _too_deep("expressions") from None


def _compile(sql: str, lookup: Callable[[str], tuple[ColumnDef, ...]]) -> QueryPlan:
    tree = _parse(sql)
    plan = _source_plan(sql, tree, lookup)
    _check_qualifiers(tree, plan.stream)
    items = _select_items(tree, plan.columns)
    named = {node.alias: node.this for node in tree.expressions if isinstance(node, exp.Alias)}
    aliases = _Aliases(named, plan.columns)
    if named:   # an alias may be used in WHERE and in the other select items, as in ClickHouse
        items = [(name, aliases.expand(node)) for name, node in items]
    inputs = ExprCompiler(plan.columns, plan.stream)
    where_node: Any = tree.args.get("where")
    if where_node is not None:
        if named:
            where_node = aliases.expand(where_node)
        if any(is_aggregate(n) for n in where_node.walk()):
            raise _unsupported("aggregates in WHERE (use HAVING)")
        plan.where = inputs.compile_bool(where_node.this).expr
    has_aggr = bool(tree.args.get("group") or tree.args.get("having") or plan.window or any(
        is_aggregate(n) for _, node in items for n in node.find_all(exp.Expression)))
    group_names: list[str] = []
    if has_aggr:
        result_types, group_names = _compile_aggregation(plan, tree, items, inputs)
    else:
        result_types = [_add_output(plan, inputs.compile(node)) for _, node in items]
    plan.uses_now = inputs.uses_now
    needed = set(inputs.used) | ({plan.window.time_column} if plan.window else set())
    plan.needed = tuple(c for c in plan.columns if c in needed)
    plan.header = [(name, t) for (name, _), t in zip(items, result_types)]
    _describe(plan, items, has_aggr, group_names)
    return plan


def _check_qualifiers(tree: exp.Select, stream: str) -> None:
    """A qualified column (`t.i`, `default.t.i`, `x.i` of `FROM t AS x`) names the query's stream or
    its alias; any other qualifier is an unknown column, as ClickHouse's `Missing columns: 'x.i'`
    (it was dropped, and `select nope.i from t` read t's i)."""
    source = tree.args.get("from_")
    alias = source.this.alias if source is not None else ""
    for col in tree.find_all(exp.Column):
        if not col.table or col.find_ancestor(exp.From) is not None:
            continue
        db, catalog = col.text("db"), col.text("catalog")
        if catalog or db not in ("", WORKSPACE_DATABASE) or col.table not in (stream, alias) \
                or (db and col.table != stream):
            raise client_error(ErrorCode.UNKNOWN_COLUMN, column=col.sql("clickhouse")[:200],
                               detail=f"the query reads {stream or 'no stream'}" + (f" as {alias}" if alias else ""))


def _source_plan(sql: str, tree: exp.Select, lookup: Callable[[str], tuple[ColumnDef, ...]]) -> QueryPlan:
    """The plan of what the query reads (stream, columns, window, settings, LIMIT), no output yet."""
    stream, bounded, window_call = _source(tree)
    seek_to, seek_ms = _settings(tree)
    limit = _limit(tree)
    defs = lookup(stream) if stream else ()
    columns = {c.name: c.type for c in defs}
    raw_stream = [c.name for c in defs] == [RAW, TP_TIME] and kind(defs[0].type) == "string"
    window = _window(window_call, columns) if window_call is not None else None
    return QueryPlan(sql=sql, stream=stream, bounded=bounded, seek_to=seek_to, seek_ms=seek_ms,
                     header=[], analysis={}, time_columns={}, raw_stream=raw_stream, limit=limit,
                     columns=columns, window=window)


def _add_output(plan: QueryPlan, t: Typed) -> str:
    plan.outputs.append(output_expr(t).alias(f"__o{len(plan.outputs)}"))
    return t.type


def _compile_aggregation(plan: QueryPlan, tree: exp.Select, items: list[tuple[str, exp.Expression]],
                         inputs: ExprCompiler) -> tuple[list[str], list[str]]:
    """GROUP BY keys (stage `__k{j}`), aggregates (`__a{i}`), and the outputs and HAVING over
    them -> (result types, GROUP BY names)."""
    if not plan.stream:
        raise _unsupported("aggregation needs FROM")
    columns, window, group = plan.columns, plan.window, tree.args.get("group")
    aliases = dict(items)
    key_nodes: list[exp.Expression] = []
    group_names: list[str] = []
    for g in (group.expressions if group else []):
        if isinstance(g, exp.Literal) and not g.is_string:   # `group by 1`: positional, as ClickHouse's
            if not (g.this.isdigit() and 1 <= int(g.this) <= len(items)):
                raise _syntax(f"GROUP BY {g.this[:20]}: a position is 1 to {len(items)}, the select items")
            g = items[int(g.this) - 1][1]
        if isinstance(g, exp.Column) and g.name not in columns and g.name in aliases:
            g = aliases[g.name]   # before the window's check: `window_start as w ... group by w`
        if window and isinstance(g, exp.Column) and g.name in WINDOW_COLUMNS:
            continue   # the window is always a key
        if any(is_aggregate(n) for n in g.walk()):
            raise _unsupported("aggregates in GROUP BY")
        key_nodes.append(g)
        group_names.append(_display_name(g))
        plan.keys.append(inputs.compile(g))
    agg_nodes: list[exp.Expression] = []
    out_columns = {f"__k{j}": k.type for j, k in enumerate(plan.keys)}
    if window:
        out_columns.update(dict.fromkeys(WINDOW_COLUMNS, DATETIME64))

    def replace(n: exp.Expression) -> exp.Expression:
        for j, k in enumerate(key_nodes):
            if n == k:
                return exp.column(f"__k{j}")
        if is_aggregate(n):
            for i, a in enumerate(agg_nodes):
                if n == a:
                    return exp.column(f"__a{i}")
            agg_nodes.append(n)
            plan.aggregates.append(_aggregate_of(n, inputs))
            out_columns[f"__a{len(agg_nodes) - 1}"] = plan.aggregates[-1].type
            return exp.column(f"__a{len(agg_nodes) - 1}")
        return n

    outputs = ExprCompiler(out_columns, plan.stream)

    def unalias(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.Column) and n.name not in columns and n.name in aliases:
            return aliases[n.name].copy()
        return n

    def compile_outer(node: exp.Expression, resolve_aliases: bool = False, condition: bool = False) -> Typed:
        if resolve_aliases:
            node = node.copy().transform(unalias)
        rewritten = node.copy().transform(replace)
        for col in rewritten.find_all(exp.Column):
            if col.name not in out_columns:
                inputs.compile(col)   # an unknown column is reported as such
                raise _unsupported(f"column {col.name} must be in GROUP BY or inside an aggregate")
        # HAVING is a condition as WHERE is: a number is true when not 0, anything else not bool a
        # TYPE_MISMATCH (`having count(*)` compiled as its UInt64 and failed every batch in Polars'
        # filter, an internal error and a traceback in the log)
        if condition:
            return outputs.compile_bool(rewritten, text=shown(node, 300))
        return outputs.compile(rewritten)

    result_types = [_add_output(plan, compile_outer(node)) for _, node in items]
    having_node = tree.args.get("having")
    if having_node is not None:
        plan.having = compile_outer(having_node.this, resolve_aliases=True, condition=True).expr
        if outputs.uses_now:
            raise _unsupported("now() in HAVING")
    if outputs.uses_now:
        raise _unsupported("now() over aggregates")
    return result_types, group_names


def _describe(plan: QueryPlan, items: list[tuple[str, exp.Expression]], has_aggr: bool,
              group_names: list[str]) -> None:
    """What the door reports about the query: time columns of the result, sqlanalyze's answer."""
    names = [name for name, _ in plan.header]
    plan.time_columns = {
        "eventTime": names.index(TP_TIME) if TP_TIME in names else -1,
        "windowStart": _index_of(items, "window_start") if plan.window else -1,
        "windowEnd": _index_of(items, "window_end") if plan.window else -1,
    }
    plan.analysis = {
        "is_streaming": not plan.bounded, "query_type": "SELECT",
        "has_aggr": has_aggr, "has_subquery": False, "has_table_join": False, "has_union": False,
        "original_query": plan.sql, "rewritten_query": plan.sql,
        "required_columns": [{"database": "default", "table": plan.stream, "column": c,
                              "column_type": plan.columns[c]} for c in plan.needed],
        "result_columns": [{"column": n, "column_type": t} for n, t in plan.header],
        "group_by_columns": group_names,
    }


def _index_of(items: list[tuple[str, exp.Expression]], column: str) -> int:
    for i, (_, node) in enumerate(items):
        if isinstance(node, exp.Column) and node.name == column:
            return i
    return -1
