"""Executors: run a QueryPlan over batches of records. Synchronous, pure, no I/O.

`feed(records, raw)` returns the result rows a batch produces (JSON-ready, header order),
`tick(now_ms)` the periodic emission of a global aggregation, `finish()` what a bounded query
still owes at its end; `done` turns true when LIMIT is reached. Every batch is evaluated with the
plan's Polars expressions (compiled once); no Python runs per row.

Windows (tumble/hop) are aligned to the epoch and keyed by their start. A window is emitted
once, when the watermark reaches its end. A row is late when every window it belongs to was
already emitted (judged against the watermark of the rows before it, so how records are split
into batches never changes the result): it is dropped and counted in `late_rows`. Rows with a null
event time are skipped.

The watermark, when batches say which partition they come from (`feed`'s `source`), is the
standard one of several inputs: the least, over the partitions that hold it, of each one's
largest event time read so far - so a partition read a little behind another (readers woken in
any order, a replay racing through its backlog) does not make its rows late. A partition holds it while it has
backlog to replay (`hold`, until `feed`'s `caught_up`), and for IDLE_MS after it last delivered a
batch or after the query began following it (`follow`): one gone quiet stops holding it back (the
bounded idleness of Flink's watermarks). With no partition holding, it is the largest event time
seen. Batches without a source (a single input) keep the largest event time seen. A bounded query
(`table(s)`) has no watermark: it emits its windows at its end, every row in.
State is bounded by `max_groups` (MAX_GROUPS by default) rows of aggregation state (groups, plus
the distinct values kept for count_distinct). A windowed query over that many emits its oldest
windows early (rows that arrive for them later are late); a global aggregation fails with
UNSUPPORTED_SQL, since there is nothing it could emit early.
"""
from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Callable, Sequence

import polars as pl

from broker.errors import ErrorCode, client_error
from broker.model import Record, RecordBlock
from broker.query import dtypes
from broker.query.compile import NOW_COLUMN
from broker.query.decode import BatchDecoder
from broker.query.plan import QueryPlan

MAX_GROUPS = 500_000
GLOBAL_EMIT_MS = 2_000   # a global aggregation emits its running result this often
MERGE_FRACTION = 8       # batches' partials are merged into the state at 1/8 of its size
MERGE_MIN_ROWS = 4_096   # ... or at this many rows, whichever is more
MERGE_MAX_PENDING = 64   # ... and compacted among themselves at this many batches
IDLE_MS = 2_000          # a partition that delivered nothing this long stops holding the watermark
MAX_WINDOW_ROWS = 262_144  # (row, window) pairs of hop() a batch makes at once (see _window_batch)
_NEVER = -(2**62)        # the largest event time of a partition that has delivered none


class Executor:
    def __init__(self, plan: QueryPlan) -> None:
        self.plan = plan
        self.decoder = BatchDecoder(plan.columns, plan.needed)
        self.done = plan.limit == 0
        self.emitted = 0
        self.scanned_rows = 0
        self.scanned_bytes = 0
        self.late_rows = 0
        self.skipped_rows = 0
        self.last_event_time_ms = 0
        self._source: int | None = None   # the batch being fed: its partition, and whether it
        self._caught_up = False           # ends that partition's backlog (hold)
        # time columns the filter reads are parsed before it, the others after it (fewer rows)
        self._where_columns = None if plan.where is None else set(plan.where.meta.root_names())

    def hold(self, source: int) -> None:
        """A replay: source (a partition) has backlog to read; see the module's docstring."""

    def follow(self, source: int) -> None:
        """A partition the query reads from now on (live); see the module's docstring."""

    def feed(self, records: Sequence[Record], raw: bool, source: int | None = None,
             caught_up: bool = False) -> list[list]:
        """The result rows of a batch of records (`raw`: of a stream without a schema), from
        `source` (a partition), `caught_up`: the last batch of its backlog (see hold)."""
        if self.done or not records:
            return []
        self._source, self._caught_up = source, caught_up
        return self._feed([r.data for r in records], records[-1].timestamp_ms,
                          lambda: pl.Series("__ts", [r.timestamp_ms for r in records], dtype=pl.Int64), raw)

    def feed_block(self, block: RecordBlock, raw: bool) -> list[list]:
        """feed() for records read as columns (a scan): no Python object per record."""
        if self.done or not block.data:
            return []

        def stamps() -> pl.Series:
            runs = pl.DataFrame({"ts": [t for _, t in block.times], "n": [n for n, _ in block.times]},
                                schema={"ts": pl.Int64, "n": pl.UInt32})
            return runs.select(pl.col("ts").repeat_by("n").explode()).to_series().alias("__ts")
        return self._feed(block.data, block.times[-1][1], stamps, raw)

    def _feed(self, datas: Sequence[bytes], last_ms: int, stamps: Callable[[], pl.Series], raw: bool) -> list[list]:
        self.scanned_rows += len(datas)
        self.scanned_bytes += sum(map(len, datas))
        self.last_event_time_ms = max(self.last_event_time_ms, last_ms)
        where = self.plan.where
        df = self.decoder.decode(datas, stamps, raw, self._where_columns)
        self.skipped_rows += self.decoder.skipped
        if self.plan.uses_now:
            # a column of its own, not a broadcast literal: Polars keeps that as a scalar column, and
            # a constant compared with it ('x' = to_string(now())) was one value, not one per row
            now = pl.Series(NOW_COLUMN, [_now()], dtype=pl.Datetime("ms")).new_from_index(0, df.height)
            df = df.with_columns(now)
        if where is not None:
            df = df.filter(where)
            df = self.decoder.parse_times(df, self.plan.needed)   # of the rows kept only
        return self._batch(df)

    def tick(self, now_ms: int) -> list[list]:
        return []

    def finish(self) -> list[list]:
        return []

    def _batch(self, df: pl.DataFrame) -> list[list]:
        raise NotImplementedError

    def _project(self, df: pl.DataFrame) -> list[list]:
        """The result rows of `df`: one per row even when every output is a constant."""
        return self._rows(df.select(_ROW, *self.plan.outputs).drop("__row"))

    def _rows(self, out: pl.DataFrame) -> list[list]:
        """Result rows, cut at LIMIT."""
        if self.plan.limit is not None:
            out = out.head(self.plan.limit - self.emitted)
            self.done = self.emitted + out.height >= self.plan.limit
        self.emitted += out.height
        if pl.Float32 in out.dtypes:
            # a float32 as Python's float is its widened binary value (0.10000000149011612):
            # the shortest text that reads back as it (0.1), as Proton prints a Float32
            out = out.with_columns(pl.col(pl.Float32).cast(pl.String).cast(pl.Float64))
        return [list(row) for row in out.iter_rows()]


_ROW = pl.int_range(pl.len()).alias("__row")
_EPOCH = datetime(1970, 1, 1)
# A type's default, ClickHouse's value of an aggregate of no row (min, max)
_DEFAULTS: dict[str, object] = {"int": 0, "uint": 0, "float": 0.0, "string": "", "bool": False,
                                "date": _EPOCH.date(), "datetime": _EPOCH, "datetime64": _EPOCH}


def _now() -> object:
    from datetime import datetime
    return datetime.now(UTC).replace(tzinfo=None)


class ProjectExecutor(Executor):
    """SELECT without aggregation: filter and project each batch."""

    def _batch(self, df: pl.DataFrame) -> list[list]:
        return self._project(df)

    def finish(self) -> list[list]:
        if self.plan.stream or self.emitted or self.done:
            return []
        # no FROM: one row of constants, if WHERE keeps it (`select 1 where 0` is no row)
        df = pl.DataFrame({NOW_COLUMN: [_now()]}, schema={NOW_COLUMN: pl.Datetime("ms")})
        return self._project(df if self.plan.where is None else df.filter(self.plan.where))


class AggregateExecutor(Executor):
    """GROUP BY and aggregates, with or without a window. State: one frame of partial aggregates
    per group (`__w` window start, `__k{j}` keys), merged with each batch's partials, plus one
    frame of distinct (group, value) rows per count_distinct."""

    def __init__(self, plan: QueryPlan, max_groups: int = MAX_GROUPS) -> None:
        super().__init__(plan)
        self.max_groups = max_groups
        self.window = plan.window
        self.key_names = [f"__k{j}" for j in range(len(plan.keys))]
        self.group_cols = (["__w"] if self.window else []) + (self.key_names or (
            [] if self.window else ["__g"]))
        stage = [k.expr.alias(f"__k{j}") for j, k in enumerate(plan.keys)]
        stage += [a.input.expr.alias(f"__in{i}") for i, a in enumerate(plan.aggregates)
                  if a.input is not None]
        if self.window:
            stage.append(pl.col(self.window.time_column).cast(pl.Datetime("ms")).dt.epoch("ms")
                         .cast(pl.Int64).alias("__t"))
        elif not self.key_names:
            stage.append(pl.lit(0, pl.Int8).alias("__g"))
        self.stage = stage
        self.partials: list[pl.Expr] = []
        self.merges: list[pl.Expr] = []
        self.finals: list[pl.Expr] = []
        self.distinct: dict[int, pl.DataFrame | None] = {}
        for i, a in enumerate(plan.aggregates):
            self._spec(i, a.fn, a.type)
        self.state: pl.DataFrame | None = None
        # partials of recent batches not yet merged into the state (see _merge)
        self.pending: list[pl.DataFrame] = []
        self.pending_distinct: dict[int, list[pl.DataFrame]] = {i: [] for i in self.distinct}
        self.pending_rows = 0
        self.min_window: int | None = None   # smallest window start in state and pending
        self.watermark = -(2**62)      # see the module's docstring; never moves back
        self.seen = -(2**62)           # largest event time seen, of any partition
        self.marks: dict[int, int] = {}      # partition -> its largest event time read
        self.backlog: set[int] = set()       # partitions replaying: they hold the watermark
        self.active: dict[int, float] = {}   # partition -> until when (clock ms) it holds it
        self.clock: Callable[[], float] = lambda: time.monotonic() * 1000
        self.closed_upto = -(2**62)    # windows ending at or before this were emitted early
        self.dirty = False
        self.next_emit_ms: int | None = None
        schema = {n: dtypes.polars_dtype(plan.columns[n]) for n in plan.needed}
        if plan.uses_now:   # as _feed adds it to every batch (`min(now())` failed here)
            schema[NOW_COLUMN] = pl.Datetime("ms")
        empty = pl.DataFrame(schema=schema)
        self.empty_stage = empty.select(_ROW, *self.stage).drop("__row")

    def _spec(self, i: int, fn: str, type_text: str) -> None:
        a, c = f"__a{i}", pl.col(f"__in{i}")
        if fn == "count_star":
            self.partials.append(pl.len().cast(pl.UInt64).alias(a))
        elif fn == "count":
            self.partials.append(c.count().cast(pl.UInt64).alias(a))
        elif fn == "sum":
            total = c.cast(dtypes.polars_dtype(type_text)).sum()
            if dtypes.is_nullable(type_text):   # null while no value was: a partial, and the merge
                self.partials.append(pl.when(c.count() > 0).then(total).alias(a))
                self.merges.append(pl.when(pl.col(a).count() > 0).then(pl.col(a).sum()))
                return
            self.partials.append(total.alias(a))
        elif fn == "avg":
            self.partials += [c.cast(pl.Float64).sum().alias(a + "_s"),
                              c.count().cast(pl.UInt64).alias(a + "_n")]
            self.merges += [pl.col(a + "_s").sum(), pl.col(a + "_n").sum()]
            self.finals.append(pl.when(pl.col(a + "_n") > 0)
                               .then(pl.col(a + "_s") / pl.col(a + "_n")).alias(a))
            return
        elif fn in ("min", "max"):
            self.partials.append(getattr(c, fn)().alias(a))
            self.merges.append(getattr(pl.col(a), fn)())
            return
        elif fn == "count_distinct":
            self.distinct[i] = None
            self.partials.append(pl.lit(0, pl.UInt64).alias(a))   # filled in when emitted
            self.merges.append(pl.col(a).first())
            return
        self.merges.append(pl.col(a).sum())

    # state
    def state_rows(self) -> int:
        """Rows of aggregation state. Pending partials count as they are (an upper bound, since
        they may repeat groups of the state) unless that passes max_groups: then they are merged
        and the exact number is given, so the bound is neither exceeded nor reached early."""
        if self.pending_rows and self._state_height() + self.pending_rows > self.max_groups:
            self._flush()
        return self._state_height() + self.pending_rows

    def _state_height(self) -> int:
        n = self.state.height if self.state is not None else 0
        return n + sum(d.height for d in self.distinct.values() if d is not None)

    def _merge(self, stage: pl.DataFrame) -> None:
        """Add a batch. Its partial aggregates wait in `pending` until they reach 1/MERGE_FRACTION
        of the state (or MERGE_MIN_ROWS), or the state is read: a merge costs O(state), so merging
        every batch made a 1-row batch cost ~10 ms over 100k groups; amortised, a batch costs
        O(batch) plus O(batch * MERGE_FRACTION) of later merges."""
        if stage.height == 0:
            return
        self.dirty = True
        partial = stage.group_by(self.group_cols).agg(self.partials)
        self.pending.append(partial)
        self.pending_rows += partial.height
        if self.window is not None:
            low = int(partial.get_column("__w").min())  # type: ignore[arg-type]
            self.min_window = low if self.min_window is None else min(self.min_window, low)
        for i in self.distinct:
            values = stage.select(*self.group_cols, pl.col(f"__in{i}").alias("__v")) \
                .drop_nulls("__v").unique()
            self.pending_distinct[i].append(values)
            self.pending_rows += values.height
        if self.pending_rows >= max(MERGE_MIN_ROWS, self._state_height() // MERGE_FRACTION):
            self._flush()
        elif len(self.pending) >= MERGE_MAX_PENDING:   # many small batches: compact them
            self.pending = [pl.concat(self.pending, how="vertical_relaxed")
                            .group_by(self.group_cols).agg(self.merges)]
            for i, parts in self.pending_distinct.items():
                self.pending_distinct[i] = [pl.concat(parts, how="vertical_relaxed").unique()]
            self.pending_rows = self.pending[0].height + sum(
                p[0].height for p in self.pending_distinct.values())

    def _flush(self) -> None:
        """Merge the pending partials into the state."""
        if not self.pending:
            return
        parts = ([self.state] if self.state is not None else []) + self.pending
        self.state = pl.concat(parts, how="vertical_relaxed").group_by(self.group_cols).agg(self.merges)
        for i, old in self.distinct.items():
            parts = ([old] if old is not None else []) + self.pending_distinct[i]
            self.distinct[i] = pl.concat(parts, how="vertical_relaxed").unique()
            self.pending_distinct[i] = []
        self.pending = []
        self.pending_rows = 0

    def _take(self, groups: pl.DataFrame, rest: pl.DataFrame | None) -> pl.DataFrame:
        """Finalise the aggregates of `groups`; keep `rest` as the state."""
        for i, d in self.distinct.items():
            if d is None:
                continue
            counts = d.join(groups.select(self.group_cols), on=self.group_cols, how="semi",
                            nulls_equal=True) \
                .group_by(self.group_cols).agg(pl.len().cast(pl.UInt64).alias(f"__d{i}"))
            groups = groups.join(counts, on=self.group_cols, how="left", nulls_equal=True) \
                .with_columns(pl.col(f"__d{i}").fill_null(0).alias(f"__a{i}")).drop(f"__d{i}")
            if rest is not None:
                self.distinct[i] = d.join(rest.select(self.group_cols), on=self.group_cols,
                                          how="semi", nulls_equal=True)
        if rest is not None:
            self.state = rest
            if self.window is not None:
                low = rest.get_column("__w").min()
                self.min_window = None if low is None else int(low)  # type: ignore[arg-type]
        if self.finals:
            groups = groups.with_columns(self.finals)
        return groups

    def _result(self, groups: pl.DataFrame) -> list[list]:
        if groups.height == 0:
            return []
        if self.window:
            size = self.window.size_ms
            groups = groups.with_columns(
                pl.from_epoch(pl.col("__w"), "ms").alias("window_start"),
                pl.from_epoch(pl.col("__w") + size, "ms").alias("window_end"))
        groups = groups.sort([c for c in self.group_cols if c != "__g"] or ["__g"], nulls_last=True)
        if self.plan.having is not None:
            groups = groups.filter(self.plan.having)
        return self._project(groups)

    def _global(self) -> list[list]:
        self._flush()
        if self.state is None:
            if self.key_names:
                return []
            # no row yet: the aggregates of nothing, as ClickHouse's: count and sum 0, min and max
            # their type's default (a null under a type that is not nullable before), avg null
            # (ClickHouse's nan, which JSON writes as null), one of a nullable (a nullable column or
            # an expression of one: `min(n + 1)`) null
            groups = self.empty_stage.select(self.partials).with_columns(
                pl.lit(0, pl.Int8).alias("__g"),
                *(pl.lit(_DEFAULTS[dtypes.kind(a.type)], dtypes.polars_dtype(a.type)).alias(f"__a{i}")
                  for i, a in enumerate(self.plan.aggregates)
                  if a.fn in ("min", "max") and not dtypes.is_nullable(a.type) and dtypes.kind(a.type) in _DEFAULTS))
            return self._result(self._take(groups, None))
        return self._result(self._take(self.state, None))

    def _batch(self, df: pl.DataFrame) -> list[list]:
        stage = df.select(_ROW, *self.stage).drop("__row")
        if self.window is None:
            self._merge(stage)
            if self.state_rows() > self.max_groups:
                raise client_error(ErrorCode.UNSUPPORTED_SQL, detail=(
                    f"the aggregation holds more than {self.max_groups} groups; aggregate over a "
                    "window or fewer keys"))
            return []
        return self._window_batch(stage)

    def hold(self, source: int) -> None:
        self.backlog.add(source)

    def follow(self, source: int) -> None:
        self.active.setdefault(source, self.clock() + IDLE_MS)

    def _holding(self, now: float) -> list[int]:
        """The partitions holding the watermark now."""
        return [p for p in {*self.backlog, *self.active} if p in self.backlog or self.active[p] > now]

    def _advance(self, now: float) -> None:
        holding = self._holding(now)
        low = min((self.marks.get(p, _NEVER) for p in holding), default=self.seen)
        self.watermark = max(self.watermark, low)

    def _window_batch(self, stage: pl.DataFrame) -> list[list]:
        assert self.window is not None
        size, step = self.window.size_ms, self.window.step_ms
        bounded, source, now = self.plan.bounded, self._source, self.clock()
        null_times = stage.get_column("__t").null_count()
        if null_times:
            self.skipped_rows += null_times
            stage = stage.filter(pl.col("__t").is_not_null())
        if stage.height:
            mark = self.closed_upto if bounded else max(self.watermark, self.closed_upto)
            # the watermark each row sees: the largest event time before it; with sources, no
            # more than the least of the other holding partitions' largest (see the docstring)
            own = pl.col("__t").cum_max().shift(1)
            if bounded:
                seen = pl.lit(mark)
            elif source is None:
                seen = own.fill_null(mark)
            else:
                seen = own.fill_null(self.marks.get(source, _NEVER))
                others = [self.marks.get(p, _NEVER) for p in self._holding(now) if p != source]
                if others:
                    seen = pl.min_horizontal(seen, pl.lit(min(others)))
            stage = stage.with_columns(pl.max_horizontal(seen, pl.lit(mark)).alias("__pw"),
                                       ((pl.col("__t") // step) * step).alias("__base"))
            self.late_rows += stage.filter(pl.col("__base") + size <= pl.col("__pw")).height
            # a row's open windows start at the multiples of step in (max(t, pw) - size, base]: at
            # most size/step of them (plan.MAX_HOP_WINDOWS), made as a list per row and exploded,
            # MAX_WINDOW_ROWS (row, window) pairs at a time: a 50,000-record scan block of
            # hop(s, 1ms, 1s) exploded in one go was 50M rows, 2-6 GB at once
            first = -((size - 1 - pl.max_horizontal("__t", "__pw")) // step) * step
            rows = max(1, MAX_WINDOW_ROWS // -(-size // step))
            for offset in range(0, stage.height, rows):
                self._merge(stage.slice(offset, rows).with_columns(first.alias("__first"))
                            .filter(pl.col("__first") <= pl.col("__base"))
                            .with_columns(pl.int_ranges("__first", pl.col("__base") + step, step).alias("__w"))
                            .drop("__first").explode("__w"))
            top = int(stage.get_column("__t").max())  # type: ignore[arg-type]
            self.seen = max(self.seen, top)
            if source is not None:
                self.marks[source] = max(self.marks.get(source, _NEVER), top)
        if source is not None:
            self.active[source] = now + IDLE_MS
            if self._caught_up:
                self.backlog.discard(source)
        if bounded:
            return self._closed(self.closed_upto)
        if source is None:
            self.watermark = max(self.watermark, self.seen)
        else:
            self._advance(now)
        return self._closed(self.watermark)

    def _closed(self, ends: int) -> list[list]:
        """Emit the windows ending by `ends` (and the oldest ones, if the state is over its bound)."""
        assert self.window is not None
        size = self.window.size_ms
        if self.min_window is None or (self.min_window + size > ends and self.state_rows() <= self.max_groups):
            return []   # no window ends by the watermark and the state is within bounds
        self._flush()
        if self.state is None:
            return []
        if self.state_rows() > self.max_groups:   # emit the oldest windows early
            starts = self.state.group_by("__w").len().sort("__w")
            over = self.state_rows() - self.max_groups
            cum = starts.get_column("len").cum_sum()
            n = int((cum < over).sum()) + 1
            last = int(starts.get_column("__w")[min(n, starts.height) - 1])
            self.closed_upto = max(self.closed_upto, last + size)
            ends = max(ends, self.closed_upto)
        closed = self.state.get_column("__w") + size <= ends
        if not closed.any():
            return []
        return self._result(self._take(self.state.filter(closed), self.state.filter(~closed)))

    def tick(self, now_ms: int) -> list[list]:
        if self.window is not None:   # a partition gone quiet may stop holding the watermark back
            if self.plan.bounded or self.done or not (self.active or self.backlog):
                return []
            before = self.watermark
            self._advance(self.clock())
            return self._closed(self.watermark) if self.watermark > before else []
        if self.plan.bounded or self.done:
            return []
        if self.next_emit_ms is None:
            self.next_emit_ms = now_ms + GLOBAL_EMIT_MS
            return []
        if now_ms < self.next_emit_ms or not self.dirty:
            return []
        self.next_emit_ms = now_ms + GLOBAL_EMIT_MS
        self.dirty = False
        return self._global()

    def finish(self) -> list[list]:
        if self.done:
            return []
        if self.window is None:
            return self._global()
        self._flush()
        if self.state is None:
            return []
        return self._result(self._take(self.state, self.state.clear()))


def make_executor(plan: QueryPlan) -> Executor:
    return AggregateExecutor(plan) if plan.aggregating else ProjectExecutor(plan)

