"""The streaming SQL engine of the Timeplus door: SQL text -> QueryPlan -> Executor.

`compile_query(sql, lookup)` parses and type-checks (every user error is raised there, before
any data is read); `plan.executor()` runs it over batches of records with Polars. The runner
(reading partitions, SSE, batching policy) is the caller's business.
"""
from broker.query.exec import MAX_GROUPS, Executor
from broker.query.plan import QueryPlan, compile_query

__all__ = ["MAX_GROUPS", "Executor", "QueryPlan", "compile_query"]
