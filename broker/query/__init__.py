"""The streaming SQL engine of the Timeplus door: SQL text -> QueryPlan -> Executor.

`compile_query(sql, lookup)` parses and type-checks (every user error is raised there, before
any data is read); `plan.executor()` runs it over batches of records with Polars. The runner
(reading partitions, SSE, batching policy) is the caller's business.
"""
import polars as pl

from broker.query.exec import MAX_GROUPS, Executor
from broker.query.plan import QueryPlan, compile_query

# What evaluating a plan may raise besides a catalogue error: a bug of ours, or a Polars panic,
# which is a BaseException (caught as Exception alone, it left its query "running" for ever)
EVALUATION_ERRORS: tuple[type[BaseException], ...] = (Exception, pl.exceptions.PanicException)

__all__ = ["EVALUATION_ERRORS", "MAX_GROUPS", "Executor", "QueryPlan", "compile_query"]
