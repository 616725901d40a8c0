"""Runs prepared queries on DataFusion over collection snapshots.

Each query gets its own SessionContext (a fraction of a millisecond) holding exactly the
snapshots it reads, registered zero-copy as `workspace.collection`, and the documents
matching each `SEARCH(...)`, found by the snapshot's text index, as `_search.sN`. DataFusion's SQLOptions
refuse DDL, DML and SET a second time, behind the planner's check. Column names are case
sensitive, as DynamoDB attribute names are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import datafusion
import pyarrow as pa
from datafusion import SessionConfig, SessionContext, SQLOptions

from shoal.index.collection import Snapshot
from shoal.index.doctypes import type_name

from .planner import DEFAULT_WORKSPACE, SEARCH_SCHEMA, PreparedQuery, QueryError

_READ_ONLY = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)


class QueryTimeout(Exception):
    pass


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


def _session() -> SessionContext:
    config = (
        SessionConfig()
        .with_target_partitions(2)
        .with_information_schema(False)
        .with_default_catalog_and_schema("datafusion", DEFAULT_WORKSPACE)
        .set("datafusion.sql_parser.enable_ident_normalization", "false")
    )
    context = SessionContext(config)
    context.catalog().register_schema(DEFAULT_WORKSPACE, datafusion.catalog.Schema.memory_schema())
    return context


def execute(
    prepared: PreparedQuery,
    snapshot_of: Callable[[str, str], Snapshot | None],
    row_limit: int,
    timeout_s: float,
) -> QueryResult:
    """Run `prepared`, returning at most `row_limit` rows; blocking (call it from a thread)."""
    started = time.perf_counter()
    deadline = started + timeout_s
    context = _session()
    catalog = context.catalog()
    snapshots = {}  # one per collection: its table and its searches read the same state
    for workspace, name in prepared.collections:
        snapshot = snapshots[workspace, name] = snapshot_of(workspace, name)
        if snapshot is None:
            raise QueryError(f"collection '{workspace}.{name}' does not exist")
        if workspace not in catalog.schema_names():
            catalog.register_schema(workspace, datafusion.catalog.Schema.memory_schema())
        context.register_record_batches(f"{workspace}.{name}", [snapshot.batches()])
    if prepared.searches:
        catalog.register_schema(SEARCH_SCHEMA, datafusion.catalog.Schema.memory_schema())
    for search in prepared.searches:
        matches = snapshots[search.collection].search(search.predicates, search.limit)
        context.register_record_batches(f"{SEARCH_SCHEMA}.{search.table}", [matches])
    try:
        frame = context.sql_with_options(prepared.sql, _READ_ONLY).limit(row_limit)
        batches = []
        for batch in frame.execute_stream():
            batches.append(batch.to_pyarrow())
            if time.perf_counter() > deadline:
                raise QueryTimeout(f"query exceeded its time limit of {timeout_s * 1000:.0f} ms")
        # Not schema().empty_table(): pyarrow cannot make empty union columns that way.
        table = pa.Table.from_batches(batches) if batches else pa.Table.from_batches([], schema=frame.schema())
    except Exception as error:
        if isinstance(error, QueryTimeout):
            raise
        raise QueryError(_clean_message(str(error))) from None
    return QueryResult(table, (time.perf_counter() - started) * 1000)


def _clean_message(message: str) -> str:
    # DataFusion prefixes errors with the Rust error chain; users need the last sentence.
    for prefix in ("DataFusion error: ", "Error during planning: ", "Schema error: ", "Execution error: "):
        message = message.replace(prefix, "")
    return message.strip()
