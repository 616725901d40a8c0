"""Query answers render to the same JSON bytes as `table.to_pylist()` did, for every type."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pyarrow as pa
import pytest

from shoal.index.collection import Change, Collection
from shoal.server.queries import rows_of
from shoal.server.routes import respond
from shoal.sql.engine import execute
from shoal.sql.planner import prepare

META = {"table": "t", "event": "INSERT", "sequence_number": None}
UTC = datetime.timezone.utc

DOCS = [
    {"v": 10, "n": {"a": 1, "b": [1, "x"]}, "t": ["a", "b"], "s": "plain"},
    {"v": 2.5, "n": {"a": "one"}, "t": [], "s": None, "bin": b"\x00\xffbytes"},
    {"v": "10", "n": None, "t": [1, 2.5, None], "s": 'quote " and \\ and \n'},
    {"v": True, "big": Decimal("12345678901234567890123456789012345678"), "s": "ünïcödé ✓"},
    {"v": None, "big": 7, "bin": b"", "n": {"a": {"deep": [True, None]}}},
    {"v": b"\x01\x02", "big": "text", "t": [{"k": 1}, [1, 2]]},
    {"v": {"k": [1, {"z": None}]}, "s": ""},
    {"v": [1, "two", 3.0], "big": Decimal("0.1")},
]


def old_render(table: pa.Table) -> bytes:
    return respond(table.to_pylist()).body


def new_render(table: pa.Table) -> bytes:
    return respond(rows_of(table)).body


def assert_same(table: pa.Table) -> None:
    assert new_render(table) == old_render(table)
    for start, length in [(0, 1), (1, 3), (len(table) // 2, len(table)), (len(table), 5)]:
        assert new_render(table.slice(start, length)) == old_render(table.slice(start, length))


@pytest.fixture
async def query(tmp_path):
    collection = Collection.open(tmp_path)
    # Two refreshes: two segments, so columns come in several chunks, the older one conformed.
    for start, end in [(0, 3), (3, len(DOCS))]:
        changes = [Change.of(f"d{i}", DOCS[i], 1_700_000_000_123_456 + i * 1_001, META) for i in range(start, end)]
        await collection.apply(changes, None)

    def run(sql: str) -> pa.Table:
        snapshot = collection.snapshot()
        prepared = prepare(sql, [], lambda ws, name: snapshot.query_schema)
        return execute(prepared, lambda ws, name: snapshot, 1000, 10).table

    yield run
    await collection.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM commons.orders ORDER BY _id",
        "SELECT v, big, typeof(v) AS tv, n.a AS na FROM commons.orders ORDER BY _id",
        "SELECT _id, _event_time, CAST(_event_time AS TIMESTAMP) AS plain,"
        " arrow_cast(_event_time, 'Timestamp(Millisecond, None)') AS ms,"
        " arrow_cast(_event_time, 'Timestamp(Second, Some(\"UTC\"))') AS s,"
        " CAST('2024-02-29' AS DATE) AS d FROM commons.orders ORDER BY _id",
    ],
)
async def test_answers_render_as_before(query, sql):
    table = query(sql)
    assert len(table) == len(DOCS)
    assert any(pa.types.is_union(t) for t in table.schema.types) or "_event_time" in sql
    assert_same(table)


@pytest.mark.parametrize("unit", ["s", "ms", "us"])
@pytest.mark.parametrize("tz", [None, "UTC"])
def test_timestamps_render_as_orjson_writes_datetimes(unit, tz):
    moments = [
        datetime.datetime(1, 1, 1),
        datetime.datetime(1969, 12, 31, 23, 59, 59, 999_000),
        datetime.datetime(1969, 12, 31, 23, 59, 59, 5_000),
        None,
        datetime.datetime(1970, 1, 1),
        datetime.datetime(2024, 2, 29, 12, 30, 5, 120_000),
        datetime.datetime(2024, 2, 29, 12, 30, 5, 7),
        datetime.datetime(9999, 12, 31, 23, 59, 59, 999_999),
    ]
    divisor = {"s": 1_000_000, "ms": 1_000, "us": 1}[unit]
    kept = [m if m is None else m.replace(microsecond=m.microsecond // divisor * divisor) for m in moments]
    if tz:
        kept = [m if m is None else m.replace(tzinfo=UTC) for m in kept]
    column = pa.chunked_array([pa.array(kept[:3], pa.timestamp(unit, tz)), pa.array(kept[3:], pa.timestamp(unit, tz))])
    assert_same(pa.table({"t": column, "n": pa.array(range(len(kept)))}))


def test_unions_render_as_before():
    union = pa.UnionArray.from_sparse(
        pa.array([0, 1, 2, 1, 0, 3, 2], pa.int8()),
        [
            pa.array([1, None, 3, 4, 5, 6, 7]),
            pa.array(["a", "b", None, "d", "e", "f", "g"]),
            pa.array([datetime.datetime(2020, 1, 1, tzinfo=UTC)] * 7, pa.timestamp("us", "UTC")),
            pa.array([{"x": [1, 2]}] * 7),
        ],
        ["int", "string", "time", "object"],
    )
    other = pa.UnionArray.from_sparse(
        pa.array([5, 9], pa.int8()), [pa.array([b"\x00", b"\x01"]), pa.array([1.5, 2.5])], ["binary", "float"], [5, 9]
    )
    assert_same(pa.table({"u": pa.chunked_array([union, union.slice(2, 3)]), "b": pa.chunked_array([other] * 6)[:10]}))
    assert_same(pa.table({"u": pa.chunked_array([], union.type), "b": pa.chunked_array([], other.type)}))


def test_duplicate_names_render_as_before():
    union = pa.UnionArray.from_sparse(pa.array([0, 1], pa.int8()), [pa.array([1, 2]), pa.array(["a", "b"])], ["i", "s"])
    assert_same(pa.Table.from_arrays([union, pa.array([1, 2]), union], ["x", "x", "y"]))
