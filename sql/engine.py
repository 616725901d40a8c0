"""Runs prepared queries on DataFusion over collection snapshots.

Each query gets its own SessionContext (a fraction of a millisecond) holding exactly the
snapshots it reads, registered zero-copy as `workspace.collection`, and the documents
matching each `SEARCH(...)`, found by the snapshot's text index, as `_search.sN`. A
snapshot's documents become a DataFusion table once, which every query over that snapshot
shares (kept in `Snapshot.derived`, freed with the snapshot). DataFusion's SQLOptions
refuse DDL, DML and SET a second time, behind the planner's check. Column names are case
sensitive, as DynamoDB attribute names are.

Limits. DataFusion cannot be interrupted from outside once a batch is being computed, so a
query carries its own `Liveness` check, a volatile Python function that raises once the
query is past its deadline or cancelled: every collection is registered behind a view
that calls it on each batch of at most `BATCH_ROWS` rows, and the planner adds it above
every join and table function (`PreparedQuery.checks`), where a cross join's work happens.
The view costs ~1 ms per million rows scanned (a call returns a slice of one shared array);
batches of 8,192 rows made it ~5 times that, batches of 262,144 were no cheaper. What the
check cannot reach, the planner bounds before any work: the query's size and nesting
(DataFusion's planning cannot be interrupted) and the values that functions such as
`repeat`, `replace` or `range` build whole within one batch (`sql/sizes.py`; the memory
pool does not see them).
A query gets its own memory pool (`memory_bytes`, no spilling to disk): hash tables,
sorts and aggregates beyond it fail with `ResourcesExceeded`, the server lives on. The
answer is capped at `row_limit` rows and `max_result_bytes`. Each query runs on one
partition, so all of its work happens in the calling thread (DataFusion's shared tokio
workers would otherwise let a runaway query starve every other query and the ingest's
field mappings), and a bounded pool of such threads (server/queries.py) is the
concurrency limit. Two partitions were no faster on the 2-core bench machine (group-by at
1M documents within 2%, top-k and join slower).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import datafusion
import pyarrow as pa
import pyarrow.compute as pc
from datafusion import RuntimeEnvBuilder, SessionConfig, SessionContext, SQLOptions, udf
from datafusion.catalog import Table

from shoal.index.collection import SCORE_COLUMN, Snapshot
from shoal.index.doctypes import type_name

from .planner import ALIVE_FUNCTION, DEFAULT_WORKSPACE, SEARCH_SCHEMA, DirectSearch, PreparedQuery, QueryError, Search
from .sizes import BATCH_ROWS

_READ_ONLY = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)


DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_MAX_RESULT_BYTES = 256 << 20
# Where each collection's batches are registered; queries read them through a checking view.
_RAW_SCHEMA = "_raw"


class QueryTimeout(Exception):
    pass


class QueryCancelled(Exception):
    pass


class ResourcesExceeded(Exception):
    """The query needs more memory, or answers with more bytes, than a query may."""


@dataclass(eq=False)  # each query's own: compared and hashed by identity
class Liveness:
    """When a running query must stop: past `deadline` (time.perf_counter) or once cancelled
    (the client went away, the server is shutting down)."""

    timeout_s: float
    deadline: float = field(default=0.0)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not self.deadline:
            self.deadline = time.perf_counter() + self.timeout_s

    def check(self) -> None:
        if self.cancelled.is_set():
            raise QueryCancelled("query cancelled")
        if time.perf_counter() > self.deadline:
            raise QueryTimeout(f"query exceeded its time limit of {self.timeout_s * 1000:.0f} ms")

    def checked(self, *columns: pa.Array) -> pa.Array:
        """The body of the SQL liveness functions: every row passes, until time is up."""
        self.check()
        rows = len(columns[0])
        # A slice of one shared array: building a new one cost more than the rest of the call.
        return _ALL_TRUE.slice(0, rows) if rows <= len(_ALL_TRUE) else _all_true(rows)


def _all_true(rows: int) -> pa.Array:
    return pc.fill_null(pa.nulls(rows, pa.bool_()), True)


_ALL_TRUE = _all_true(BATCH_ROWS)


@dataclass(frozen=True)
class QueryResult:
    table: pa.Table
    elapsed_ms: float

    @property
    def column_fields(self) -> list[dict[str, str]]:
        return [{"name": f.name, "type": column_type(f.type)} for f in self.table.schema]


def column_type(arrow_type: pa.DataType) -> str:
    """The document type name of a result column; `mixed` for a column of several types."""
    if pa.types.is_union(arrow_type):
        return "mixed"
    if pa.types.is_timestamp(arrow_type):
        return "timestamp"
    if pa.types.is_date(arrow_type):
        return "date"
    if pa.types.is_time(arrow_type):
        return "time"
    if pa.types.is_integer(arrow_type):
        return "int"
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return "float"
    if pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return "string"
    if pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return "array"
    try:
        return type_name(arrow_type)
    except TypeError:
        return str(arrow_type)


def _session(memory_bytes: int) -> SessionContext:
    config = (
        SessionConfig()
        .with_target_partitions(1)
        .with_batch_size(BATCH_ROWS)
        .with_information_schema(False)
        .with_default_catalog_and_schema("datafusion", DEFAULT_WORKSPACE)
        .set("datafusion.sql_parser.enable_ident_normalization", "false")
        .set("datafusion.execution.enable_recursive_ctes", "false")  # a query that never ends
    )
    runtime = RuntimeEnvBuilder().with_disk_manager_disabled().with_greedy_memory_pool(memory_bytes)
    context = SessionContext(config, runtime)
    context.catalog().register_schema(DEFAULT_WORKSPACE, datafusion.catalog.Schema.memory_schema())
    context.catalog().register_schema(_RAW_SCHEMA, datafusion.catalog.Schema.memory_schema())
    return context


def _register_checked(context: SessionContext, name: str, table: Table) -> None:
    """Register `table` as `name`, read through the liveness check (the table itself goes
    under a name no query can say)."""
    raw = context.catalog().schema(_RAW_SCHEMA)
    raw_name = f"t{len(raw.names())}"
    raw.register_table(raw_name, table)
    context.register_view(name, context.sql(f"SELECT * FROM {_RAW_SCHEMA}.{raw_name} WHERE {ALIVE_FUNCTION}(TRUE)"))


_TABLE_MAKER = SessionContext()  # only converts batches into tables; never runs a query
_TABLE_MAKER_LOCK = threading.Lock()


def _memory_table(batches: list[pa.RecordBatch]) -> Table:
    """`batches` as a DataFusion table of batches of at most BATCH_ROWS rows (a scan hands
    on one batch between two liveness checks)."""
    sliced = [b.slice(start, BATCH_ROWS) for b in batches for start in range(0, max(b.num_rows, 1), BATCH_ROWS)]
    with _TABLE_MAKER_LOCK:
        _TABLE_MAKER.register_record_batches("t", [sliced])
        table = _TABLE_MAKER.catalog().schema().table("t")
        _TABLE_MAKER.deregister_table("t")
    return table


def _table_of(snapshot: Snapshot) -> Table:
    """The snapshot's documents as a DataFusion table, made by the first query over it
    (~0.6 ms at 1M documents) and shared by the rest. Two queries racing may both make it."""
    table = snapshot.derived.get("table")
    if table is None:
        table = snapshot.derived["table"] = _memory_table(snapshot.batches())
    return table


def execute(
    prepared: PreparedQuery,
    snapshot_of: Callable[[str, str], Snapshot | None],
    row_limit: int,
    timeout_s: float,
    liveness: Liveness | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
) -> QueryResult:
    """Run `prepared`, returning at most `row_limit` rows; blocking (call it from a thread)."""
    started = time.perf_counter()
    if prepared.direct is not None:
        table = _answer_directly(prepared, prepared.direct, snapshot_of, row_limit)
        if table is not None:
            return QueryResult(table, (time.perf_counter() - started) * 1000)
    liveness = liveness or Liveness(timeout_s)
    context = _session(memory_bytes)
    for name, input_types in {ALIVE_FUNCTION: (pa.bool_(),), **dict(prepared.checks)}.items():
        context.register_udf(udf(liveness.checked, list(input_types), pa.bool_(), "volatile", name=name))
    catalog = context.catalog()
    snapshots = {}  # one per collection: its table and its searches read the same state
    for workspace, name in prepared.collections:
        snapshot = snapshots[workspace, name] = snapshot_of(workspace, name)
        if snapshot is None:
            raise QueryError(f"collection '{workspace}.{name}' does not exist")
        if (workspace, name) not in prepared.tables:
            continue  # read only through its searches
        if workspace not in catalog.schema_names():
            catalog.register_schema(workspace, datafusion.catalog.Schema.memory_schema())
        _register_checked(context, f"{workspace}.{name}", _table_of(snapshot))
    if prepared.searches:
        catalog.register_schema(SEARCH_SCHEMA, datafusion.catalog.Schema.memory_schema())
    try:
        for search in prepared.searches:
            liveness.check()  # a search runs whole: its deadline is checked between them
            _register_checked(context, f"{SEARCH_SCHEMA}.{search.table}", _matches(snapshots[search.collection], search))
        frame = context.sql_with_options(prepared.sql, _READ_ONLY).limit(row_limit)
        batches = []
        size = 0
        for batch in frame.execute_stream():
            batches.append(batch.to_pyarrow())
            size += batches[-1].nbytes
            if size > max_result_bytes:
                raise ResourcesExceeded(
                    f"the answer is larger than {max_result_bytes >> 20} MiB: select fewer columns or rows, or paginate"
                )
            liveness.check()
        # Not schema().empty_table(): pyarrow cannot make empty union columns that way.
        table = pa.Table.from_batches(batches) if batches else pa.Table.from_batches([], schema=frame.schema())
    except (QueryTimeout, QueryCancelled, ResourcesExceeded):
        raise
    except MemoryError as error:  # pyarrow's, outside the pool: a search's matches, a batch
        raise ResourcesExceeded(f"the query ran out of memory: {error}") from None
    except Exception as error:
        liveness.check()  # a liveness function stopped the query: say why, not where
        message = _clean_message(str(error))
        if "Resources exhausted" in message:
            raise ResourcesExceeded(
                f"the query needs more than its {memory_bytes >> 20} MiB of memory: {message}"
            ) from None
        raise QueryError(message) from None
    return QueryResult(table, (time.perf_counter() - started) * 1000)


# What an index filter costs against the scan it saves, measured in process on one shared
# 2-core machine at 1M and 2M documents: collecting candidates pays a fixed ~3 ms (a search,
# a second table for DataFusion), ~0.12 ms per segment holding candidates (a take and
# conform) and ~2 µs per candidate; DataFusion scans 3 to 12 ns per document, by the
# predicate, taken as 4. E.g. whole queries at 1M documents (11 segments): 25 candidates
# 5.7 ms against 4.6 ms scanning, 1 candidate 4.5 against 6.0; at 2M (4 segments) 201
# candidates 6.2 against 7.7.
INDEX_FIXED_COST_S = 3e-3
INDEX_COST_PER_SEGMENT_S = 1.2e-4
INDEX_COST_PER_CANDIDATE_S = 2e-6
SCAN_COST_PER_DOCUMENT_S = 4e-9


def _index_is_cheaper(candidates: int, documents: int, segments: int) -> bool:
    index = INDEX_FIXED_COST_S + min(candidates, segments) * INDEX_COST_PER_SEGMENT_S
    return index + candidates * INDEX_COST_PER_CANDIDATE_S < documents * SCAN_COST_PER_DOCUMENT_S


def _matches(snapshot: Snapshot, search: Search) -> Table:
    """The documents a search gives the SQL: its matches, or for an index filter whose
    candidates cost more to collect than scanning, every document (the SQL applies the same
    conditions to each)."""
    if not search.optional:
        return _memory_table(snapshot.search(search.predicates, search.limit, search.columns))
    assert snapshot.searcher is not None, "a published snapshot always has its searcher"
    candidates = snapshot.searcher.count(search.predicates)
    if not _index_is_cheaper(candidates, snapshot.doc_count, len(snapshot.views)):
        return _table_of(snapshot)
    return _memory_table(snapshot.search(search.predicates, max(1, candidates), search.columns))  # all of them, in a heap no larger


def _answer_directly(
    prepared: PreparedQuery, direct: DirectSearch, snapshot_of: Callable[[str, str], Snapshot | None], row_limit: int
) -> pa.Table | None:
    """The answer of a query that only lists its search's matches, taken from the matches
    themselves; None when DataFusion must answer (a column the matches lack is its error)."""
    search = prepared.searches[0]
    snapshot = snapshot_of(*search.collection)
    if snapshot is None:
        raise QueryError(f"collection '{'.'.join(search.collection)}' does not exist")
    matches = pa.Table.from_batches(snapshot.search(search.predicates, search.limit, search.columns))
    if any(name not in matches.column_names for name, _ in direct.columns):
        return None
    if direct.by_score:
        matches = matches.sort_by([(SCORE_COLUMN, "descending")])
    matches = matches.slice(0, min(row_limit, direct.limit if direct.limit is not None else row_limit))
    return matches.select([name for name, _ in direct.columns]).rename_columns([output for _, output in direct.columns])


def _clean_message(message: str) -> str:
    # DataFusion prefixes errors with the Rust error chain; users need the last sentence.
    for prefix in ("DataFusion error: ", "Error during planning: ", "Schema error: ", "Execution error: "):
        message = message.replace(prefix, "")
    return message.strip()
