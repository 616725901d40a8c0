"""Field mapping at ingest: `SELECT ... FROM _input`, run on every batch before it is stored.

Rockset's `field_mapping_query`: drop, rename, derive or mask the fields of each incoming
document, bulk load and stream alike, with SQL. The upserted documents of a batch become
an Arrow table `_input` (`_id` plus the documents' fields, typed and named as in storage:
an attribute named like a system column is `_item<name>`, e.g. `_item_id`), the
mapping runs on DataFusion, and each output row is stored as the document with that `_id`.
A document the mapping's WHERE filters out is deleted, as if the item had been; deletes
pass through untouched.

Rules, checked when the collection is created: one SELECT from `_input` alone, row by row
(no joins, subqueries, grouping, aggregates, windows, ORDER BY or LIMIT), keeping `_id`
unchanged (`SELECT *, ...` or `SELECT _id, ...`). A field the mapping names that a batch
lacks reads as null. Timestamps the mapping makes are stored as ISO 8601 text.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Sequence

import pyarrow as pa
from datafusion import SessionConfig, SessionContext, SQLOptions
from sqlglot import exp

from shoal.index.collection import Change, item_name, stored_name
from shoal.index.items import ItemDecoder, encode_item

from .planner import QueryError, parse_single_query
from .sizes import check_built_sizes

INPUT = "_input"
_READ_ONLY = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)
_NOT_ROW_BY_ROW = (exp.Join, exp.Group, exp.Having, exp.Order, exp.Limit, exp.Offset, exp.AggFunc, exp.Window, exp.Subquery)


class FieldMapping:
    """A validated mapping; `apply` runs it on one batch of changes (blocking: call it off
    the event loop, as the collection's writer thread does)."""

    def __init__(self, sql: str) -> None:
        tree = parse_single_query(sql)
        if not isinstance(tree, exp.Select):
            raise QueryError("a field mapping is one SELECT ... FROM _input")
        tables = list(tree.find_all(exp.Table))
        if len(tables) != 1 or tables[0].name != INPUT or tables[0].db:
            raise QueryError("a field mapping reads FROM _input and nothing else")
        for node in tree.walk():
            if isinstance(node, _NOT_ROW_BY_ROW) or (isinstance(node, exp.Select) and node is not tree):
                raise QueryError(f"a field mapping works one document at a time: no {node.key.upper()}")
        keeps_id = any(
            isinstance(e, exp.Star) or (isinstance(e, exp.Column) and e.name == "_id" and not e.table) for e in tree.expressions
        )
        if not keeps_id:
            raise QueryError("a field mapping must keep _id unchanged: SELECT *, ... or SELECT _id, ... FROM _input")
        check_built_sizes(tree)  # it runs on every refresh, where nothing could stop it
        self.sql = sql
        self._named_fields = {column.parts[0].name for column in tree.find_all(exp.Column)}
        system = sorted(name for name in self._named_fields - {"_id"} if stored_name(name) != name)
        if system:
            # It would read as null: _input has no such column.
            raise QueryError(f"in _input, as in queries, an attribute named {system[0]} is {stored_name(system[0])}")
        self._items = ItemDecoder()

    def apply(self, changes: Sequence[Change]) -> list[Change]:
        latest = {change.id: change for change in changes}  # storage keeps only the last per _id too
        upserts = [change for change in latest.values() if change.item is not None]
        mapped = self._run(upserts) if upserts else {}
        return [change if change.item is None else dataclasses.replace(change, item=mapped.get(change.id)) for change in latest.values()]

    def _run(self, upserts: list[Change]) -> dict[str, bytes]:
        # Attributes named like system columns (`_id`) are `_item<name>`, as in queries.
        documents = {stored_name(k): v for k, v in self._items.columns([c.item for c in upserts]).items()}
        columns = {"_id": pa.array([c.id for c in upserts], pa.string()), **documents}
        for name in self._named_fields - columns.keys():
            columns[name] = pa.nulls(len(upserts))
        context = SessionContext(SessionConfig().with_target_partitions(1).set("datafusion.sql_parser.enable_ident_normalization", "false"))
        context.register_record_batches(INPUT, [[pa.RecordBatch.from_pydict(columns)]])
        try:
            rows = context.sql_with_options(self.sql, _READ_ONLY).to_arrow_table().to_pylist()
        except Exception as error:  # DataFusion reports every failure as a plain Exception
            raise QueryError(f"field mapping failed: {error}") from None
        ids = {c.id for c in upserts}
        mapped = {}
        for row in rows:
            doc_id = row.pop("_id")
            if doc_id not in ids:
                raise QueryError(f"field mapping changed _id (got {doc_id!r}): it must pass _id through unchanged")
            mapped[doc_id] = encode_item({item_name(k): _stored(v) for k, v in row.items() if v is not None})
        return mapped


def _stored(value: Any) -> Any:
    """A mapping output value as a document value."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _stored(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_stored(v) for v in value]
    return value
