"""SQL over HTTP: `POST /v1/orgs/self/queries`, pages of large results, and `run_sql`,
the one path by which both ad-hoc queries and query lambdas run.

A query plans and runs in a thread of the `QueryRunner` on one snapshot per collection,
within the server's `QueryLimits`: a few queries run at once, a bounded number wait, and
beyond that the answer is a 429 at once. The time limit counts from arrival; at the
deadline the client gets a 408 and the query's own liveness check (sql/engine.py) stops
its work within one batch. Without pagination the answer holds at most `row_limit` rows.
With `sql.paginate: true` (Rockset's shape) the server keeps up to `MAX_PAGINATED_ROWS`
rows of the result for `RESULTS_TTL_S`, answers with the first page and a cursor, and
serves the next pages from `GET /v1/orgs/self/queries/{query_id}/pages/{cursor}?docs=N`.
Kept results live in memory within a byte budget; the oldest are dropped first.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from aiohttp import web

from shoal.sql import engine, planner

from .errors import ApiError, invalid, not_found
from .routes import CATALOG, read_json, respond

DEFAULT_ROW_LIMIT = 10_000
MAX_ROW_LIMIT = 100_000  # rows in one answer or page
MAX_PAGINATED_ROWS = 1_000_000  # rows a paginated query keeps for its pages
DEFAULT_TIMEOUT_MS = 120_000  # Rockset's synchronous default
MAX_TIMEOUT_MS = 600_000
RESULTS_TTL_S = 30 * 60
RESULTS_MAX_BYTES = 512 * 2**20
# How long after its deadline a query's answer may come: the engine stops at the next batch.
TIMEOUT_GRACE_S = 0.25

T = TypeVar("T")


@dataclass(frozen=True)
class QueryLimits:
    """Server-wide limits on queries (`shoal serve --max-concurrent-queries` etc.)."""

    # Queries running at once, each on one core: a few per core, so a cheap query shares the
    # cores with slow ones rather than waiting for them to end.
    concurrent: int = max(4, 2 * (os.cpu_count() or 2))
    queued: int = 64  # waiting for a turn; beyond that a 429 at once
    memory_bytes: int = engine.DEFAULT_MEMORY_BYTES  # per query (hash tables, sorts, aggregates)
    max_result_bytes: int = engine.DEFAULT_MAX_RESULT_BYTES  # Arrow bytes of one answer


class QueryRunner:
    """Runs queries in threads of its own, so that no number of queries takes the threads
    ingest writes with, and admits at most `concurrent + queued` at once. A query counts
    until its thread is done, even after its client got a 408, so the cap is on real work."""

    def __init__(self, limits: QueryLimits) -> None:
        self.limits = limits
        self._pool = ThreadPoolExecutor(limits.concurrent, thread_name_prefix="query")
        self._running: set[engine.Liveness] = set()

    async def run(self, work: Callable[[], T], liveness: engine.Liveness) -> T:
        if len(self._running) >= self.limits.concurrent + self.limits.queued:
            raise ApiError(
                429, "TOO_MANY_QUERIES",
                f"{len(self._running)} queries are running or waiting, the most this server takes: retry later",
            )
        self._running.add(liveness)
        future = asyncio.get_running_loop().run_in_executor(self._pool, _as_exception(work))
        future.add_done_callback(lambda done: self._finished(done, liveness))
        try:
            remaining = liveness.deadline - time.perf_counter()
            return await asyncio.wait_for(asyncio.shield(future), max(remaining, 0) + TIMEOUT_GRACE_S)
        except asyncio.TimeoutError:
            liveness.cancelled.set()
            raise engine.QueryTimeout(f"query exceeded its time limit of {liveness.timeout_s * 1000:.0f} ms") from None
        except asyncio.CancelledError:
            liveness.cancelled.set()
            raise

    def _finished(self, done: asyncio.Future, liveness: engine.Liveness) -> None:
        self._running.discard(liveness)
        if not done.cancelled():
            done.exception()  # seen by its handler, or the handler is gone (408, shutdown)

    def cancel_all(self) -> None:
        for liveness in self._running:
            liveness.cancelled.set()

    async def close(self) -> None:
        """Stop every query still running (the server is shutting down) and wait for the threads."""
        self.cancel_all()
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


def _as_exception(work: Callable[[], T]) -> Callable[[], T]:
    """`work`, raising a failure that is no Exception (pyo3's PanicException: a Rust panic in
    tantivy or DataFusion) as a RuntimeError: aiohttp would drop the connection, where the
    error middleware answers a JSON 500 and logs it with its cause."""

    def run() -> T:
        try:
            return work()
        except Exception:
            raise
        except BaseException as error:
            raise RuntimeError(f"the query's thread failed: {error!r}") from error

    return run


QUERY_RUNNER = web.AppKey("query_runner", QueryRunner)

routes = web.RouteTableDef()


@dataclass(frozen=True)
class QueryOptions:
    row_limit: int
    timeout_s: float
    first_page: int | None = None  # rows in the first answer of a paginated query


def _positive_int(container: dict, key: str, where: str, default: int) -> int:
    value = container.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid(f"{where}{key} must be a positive integer")
    return value


def parse_parameters(value: Any, where: str) -> list[dict[str, Any]]:
    parameters = value or []
    if not isinstance(parameters, list) or not all(
        isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("type"), str) for p in parameters
    ):
        raise invalid(f"{where} must be a list of {{name, type, value}}, name and type as strings")
    return parameters


def parse_options(sql: dict[str, Any], body: dict[str, Any]) -> QueryOptions:
    """Row limit, time limit and pagination from Rockset's fields (`sql.*` and `timeout_ms`)."""
    row_limit = _positive_int(sql, "default_row_limit", "sql.", DEFAULT_ROW_LIMIT)
    timeout_ms = _positive_int(body, "timeout_ms", "", DEFAULT_TIMEOUT_MS)
    paginate = sql.get("paginate", False)
    if not isinstance(paginate, bool):
        raise invalid("sql.paginate must be true or false")
    if not paginate:
        return QueryOptions(min(row_limit, MAX_ROW_LIMIT), min(timeout_ms, MAX_TIMEOUT_MS) / 1000)
    first_page = _positive_int(sql, "initial_paginate_response_doc_count", "sql.", min(row_limit, MAX_ROW_LIMIT))
    return QueryOptions(
        min(row_limit, MAX_PAGINATED_ROWS) if "default_row_limit" in sql else MAX_PAGINATED_ROWS,
        min(timeout_ms, MAX_TIMEOUT_MS) / 1000,
        min(first_page, MAX_ROW_LIMIT),
    )


class ResultPages:
    """Results of paginated queries, kept for their next pages: at most `max_bytes` in all,
    each for `ttl_s`; the oldest go first."""

    def __init__(self, max_bytes: int = RESULTS_MAX_BYTES, ttl_s: float = RESULTS_TTL_S) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._results: OrderedDict[str, tuple[pa.Table, float]] = OrderedDict()

    def keep(self, query_id: str, table: pa.Table) -> None:
        self._results[query_id] = (table, time.monotonic() + self.ttl_s)
        self._drop_expired()
        while sum(t.nbytes for t, _ in self._results.values()) > self.max_bytes and len(self._results) > 1:
            self._results.popitem(last=False)

    def page(self, query_id: str, offset: int, count: int) -> tuple[pa.Table, int]:
        """Rows `offset`.. of a kept result (at most `count`), and the result's row count."""
        self._drop_expired()
        kept = self._results.get(query_id)
        if kept is None:
            raise not_found(f"no kept results for query '{query_id}': unknown, or older than {self.ttl_s / 60:.0f} minutes")
        table = kept[0]
        return table.slice(offset, count), table.num_rows

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for query_id in [q for q, (_, expires) in self._results.items() if expires < now]:
            del self._results[query_id]


RESULT_PAGES = web.AppKey("result_pages", ResultPages)


async def run_sql(app: web.Application, query: str, parameters: list[dict[str, Any]], options: QueryOptions) -> dict[str, Any]:
    """Plan and run `query`, returning Rockset's query response (the first page if paginated)."""
    catalog = app[CATALOG]
    snapshots: dict[tuple[str, str], Any] = {}

    def snapshot_of(workspace: str, name: str):
        """The same snapshot for planning and running: the plan depends on its schema."""
        if (workspace, name) not in snapshots:
            snapshots[workspace, name] = catalog.snapshot(workspace, name)
        return snapshots[workspace, name]

    def schema_of(workspace: str, name: str):
        snapshot = snapshot_of(workspace, name)
        return None if snapshot is None else snapshot.query_schema

    runner = app[QUERY_RUNNER]
    liveness = engine.Liveness(options.timeout_s)

    def plan_and_run() -> tuple[planner.PreparedQuery, engine.QueryResult, list[dict[str, Any]]]:
        liveness.check()  # it may have waited its whole time for a turn
        prepared = planner.prepare(query, parameters, schema_of)
        limits = runner.limits
        result = engine.execute(
            prepared, snapshot_of, options.row_limit, options.timeout_s, liveness, limits.memory_bytes, limits.max_result_bytes
        )
        # Rendered here, not on the event loop, which other requests are waiting for.
        shown = result.table if options.first_page is None else result.table.slice(0, options.first_page)
        return prepared, result, _rendered(shown)

    try:
        prepared, result, rows = await runner.run(plan_and_run, liveness)
    except planner.QueryError as error:
        message = str(error)
        if error.line is not None:
            message += f" (line {error.line}, column {error.column})"
        raise ApiError(400, "QUERY_ERROR", message) from None
    except engine.QueryTimeout as error:
        raise ApiError(408, "QUERY_TIMEOUT", str(error)) from None
    except engine.ResourcesExceeded as error:
        raise ApiError(400, "RESOURCES_EXCEEDED", str(error)) from None
    except engine.QueryCancelled:
        raise ApiError(503, "SHUTTING_DOWN", "the server is shutting down: retry on its next start") from None
    query_id = str(uuid.uuid4())
    answer: dict[str, Any] = {"query_id": query_id, "status": "COMPLETED"}
    if options.first_page is not None:
        app[RESULT_PAGES].keep(query_id, result.table)
        answer["pagination"] = _pagination(0, options.first_page, result.table.num_rows)
    return {
        **answer,
        "results": rows,
        "results_total_doc_count": result.table.num_rows,
        "column_fields": result.column_fields,
        "collections": [f"{ws}.{name}" for ws, name in prepared.collections],
        "stats": {"elapsed_time_ms": round(result.elapsed_ms, 3)},
        "warnings": [],
        "query_errors": [],
    }


def _rendered(table: pa.Table) -> list[dict[str, Any]]:
    """`rows_of`, with a value JSON cannot show (a date past year 9999, an unknown zone) as a 400."""
    try:
        return rows_of(table)
    except (OverflowError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ApiError(400, "QUERY_ERROR", f"the answer holds a value JSON cannot show: {error}") from None


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    """The rows of an answer as Python values for `respond` (`table.to_pylist()`, faster).

    pyarrow makes a Python object per value at ~20 ns for numbers and strings, but ~1 µs for
    a union (a mixed-type field) and ~3 µs for a timestamp with a time zone (`_event_time`,
    in every `SELECT *`). Such top-level columns are converted here column by column into
    values `respond` renders to the same bytes: timestamps into the ISO text orjson writes
    for a datetime, unions by picking each row's value from its child's list."""
    names = table.column_names
    if len(set(names)) < len(names):
        return table.to_pylist()  # duplicate names: the last column wins, as pyarrow does
    picked: dict[str, list[Any]] = {}
    for index, column in enumerate(table.columns):
        if _is_sparse_union(column.type):
            picked[names[index]] = [value for chunk in column.chunks for value in _union_values(chunk)]
            table = table.set_column(index, names[index], pa.nulls(len(table)))  # keeps the key's place
        elif _is_iso_timestamp(column.type):
            table = table.set_column(index, names[index], pa.chunked_array(map(_iso_texts, column.chunks), pa.string()))
    rows = table.to_pylist()
    for name, values in picked.items():
        for row, value in zip(rows, values):
            row[name] = value
    return rows


def _values(array: pa.Array) -> list[Any]:
    if _is_sparse_union(array.type):
        return _union_values(array)
    if _is_iso_timestamp(array.type):
        return _iso_texts(array).to_pylist()
    return array.to_pylist()


def _is_sparse_union(arrow_type: pa.DataType) -> bool:
    return pa.types.is_union(arrow_type) and arrow_type.mode == "sparse"


def _union_values(array: pa.UnionArray) -> list[Any]:
    """Each row's value from the child its type code names (every child of a sparse union
    has a value, often null, in every row)."""
    # From the buffer: pyarrow's `type_codes` ignores a slice's offset.
    codes = np.frombuffer(array.buffers()[1], np.int8, len(array), array.offset)
    children = {}
    for position, code in enumerate(array.type.type_codes):
        rows = codes == code
        if rows.any():  # only the rows of this type: a child spans every row, mostly nulls
            children[code] = iter(_values(array.field(position).filter(pa.array(rows))))
    return [next(children[code]) for code in codes.tolist()]


def _is_iso_timestamp(arrow_type: pa.DataType) -> bool:
    """Timestamps pyarrow gives as datetimes whose orjson text `_iso_texts` reproduces."""
    return pa.types.is_timestamp(arrow_type) and arrow_type.unit != "ns" and arrow_type.tz in (None, "UTC")


# Python's datetimes (what orjson writes) span years 1 to 9999: in seconds from the epoch.
_FIRST_SECOND, _END_SECOND = -62135596800, 253402300800
_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000}


def _iso_texts(array: pa.TimestampArray) -> pa.StringArray:
    """orjson's text of each datetime: `YYYY-MM-DDTHH:MM:SS`, then `.ffffff` unless the
    microseconds are 0, then `+00:00` if the timestamp is in UTC. Beyond year 9999 an
    OverflowError, as pyarrow's own conversion (strftime would write garbage)."""
    per_second = _PER_SECOND[array.type.unit]
    bounds = pc.min_max(array.cast(pa.int64()))
    if bounds["min"].is_valid and not (
        _FIRST_SECOND * per_second <= bounds["min"].as_py() and bounds["max"].as_py() < _END_SECOND * per_second
    ):
        raise OverflowError("a timestamp outside the years 1 to 9999")
    seconds = pc.floor_temporal(array, unit="second").cast(pa.timestamp("s", array.type.tz))
    text = pc.strftime(seconds, format="%Y-%m-%dT%H:%M:%S")
    micros = pc.add(pc.multiply(pc.millisecond(array), 1000), pc.microsecond(array))
    fraction = pc.if_else(
        pc.equal(micros, 0), "", pc.binary_join_element_wise(".", pc.utf8_lpad(micros.cast(pa.string()), 6, "0"), "")
    )
    return pc.binary_join_element_wise(text, fraction, "+00:00" if array.type.tz else "", "")


def _pagination(offset: int, count: int, total: int) -> dict[str, Any]:
    """Cursors are row offsets into the kept result, as text (clients treat them as opaque)."""
    offset = min(offset, total)
    end = min(offset + count, total)
    return {
        "start_cursor": str(offset),
        "next_cursor": str(end) if end < total else None,
        "current_page_doc_count": end - offset,
    }


@routes.post("/v1/orgs/self/queries")
async def post_query(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("sql"), dict):
        raise invalid('body must be {"sql": {"query": "...", "parameters": [...], "default_row_limit": N}}')
    sql = body["sql"]
    query = sql.get("query")
    if not isinstance(query, str) or not query.strip():
        raise invalid("sql.query must be a non-empty string")
    parameters = parse_parameters(sql.get("parameters"), "sql.parameters")
    return respond(await run_sql(request.app, query, parameters, parse_options(sql, body)))


@routes.get("/v1/orgs/self/queries/{query_id}/pages/{cursor}")
async def get_page(request: web.Request) -> web.Response:
    cursor = _row_number(request.match_info["cursor"])
    if cursor is None:
        raise invalid(f"cursor {request.match_info['cursor']!r} is not one this server gave out")
    docs = _row_number(request.query.get("docs", str(DEFAULT_ROW_LIMIT)))
    if not docs:
        raise invalid("docs must be a positive integer")
    count = min(docs, MAX_ROW_LIMIT)
    table, total = request.app[RESULT_PAGES].page(request.match_info["query_id"], cursor, count)
    rows = await asyncio.to_thread(_rendered, table)  # off the event loop, as `run_sql` renders
    return respond({"results": rows, "pagination": _pagination(cursor, count, total)})


def _row_number(text: str) -> int | None:
    """`text` as a count or offset of rows, if written as one: ASCII digits (isdigit() also
    takes '²', which int() refuses), at most 18 of them (Arrow's offsets are int64)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None
