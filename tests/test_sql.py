"""SQL over a real collection: read-only refusals, parameters, dynamic types, mixed numbers."""

from __future__ import annotations

import datetime
import time

import pytest

from shoal.index.collection import Change, Collection
from shoal.sql.engine import execute
from shoal.sql.planner import QueryError, prepare

META = {"table": "t", "event": "INSERT", "sequence_number": None}


@pytest.fixture
async def run(tmp_path):
    collection = Collection.open(tmp_path)
    docs = [
        {"amount": 10, "mixed": 10, "city": {"name": "Oslo"}, "tag": "a", "tags": ["new", "sale"],
         "items": [{"sku": "s1"}, {"sku": "s2"}]},
        {"amount": 2.5, "mixed": "10", "city": {"name": "Rome"}, "tag": "b", "tags": ["new"]},
        {"amount": 7, "mixed": True, "city": {"name": "Oslo"}, "tag": "a"},
        {"amount": "n/a", "tag": "c"},
    ]
    await collection.apply([Change.of(f"d{i}", doc, 0, META) for i, doc in enumerate(docs)], None)

    def query(sql: str, parameters: list | None = None) -> list[dict]:
        known = {("commons", "orders"): collection}

        def schema_of(ws, name):
            return known[(ws, name)].snapshot().query_schema if (ws, name) in known else None

        def snapshot_of(ws, name):
            return known[(ws, name)].snapshot() if (ws, name) in known else None

        return execute(prepare(sql, parameters or [], schema_of), snapshot_of, 1000, 10).table.to_pylist()

    yield query
    await collection.close()


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE commons.orders",
        "INSERT INTO commons.orders VALUES (1)",
        "DELETE FROM commons.orders",
        "CREATE TABLE x AS SELECT 1",
        "SET datafusion.execution.batch_size = 1",
        "COPY (SELECT 1) TO '/tmp/out.csv'",
        "SELECT 1; DROP TABLE commons.orders",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "",
    ],
)
async def test_only_read_only_queries_run(run, sql):
    with pytest.raises(QueryError):
        run(sql)


async def test_syntax_errors_carry_line_and_column(run):
    with pytest.raises(QueryError) as caught:
        run("SELECT amount\nFROM commons.orders WHERE (")
    assert caught.value.line == 2


async def test_unknown_collection(run):
    with pytest.raises(QueryError, match="commons.nope"):
        run("SELECT * FROM commons.nope")


async def test_parameters_bind_as_typed_literals(run):
    rows = run(
        "SELECT _id FROM orders WHERE tag = :tag AND mixed = :n ORDER BY _id",
        [{"name": "tag", "type": "string", "value": "a"}, {"name": "n", "type": "int", "value": "10"}],
    )
    assert rows == [{"_id": "d0"}]
    # A string parameter can never become SQL.
    rows = run("SELECT _id FROM orders WHERE tag = :tag", [{"name": "tag", "type": "string", "value": "a' OR '1'='1"}])
    assert rows == []
    with pytest.raises(QueryError, match="no value"):
        run("SELECT * FROM orders WHERE tag = :missing")


@pytest.mark.parametrize(
    ("type_", "value"),
    [
        ("float", "nan"),  # bound as text, nan and inf were bare names: a column named inf was read
        ("float", "inf"),
        ("float", "-Infinity"),
        ("float", True),
        ("int", 1.9),  # int() cut it to 1
        ("int", 2**70),  # DataFusion read it as a float
        ("int", True),
        ("string", None),  # bound as the text 'None'
        ("string", ["a"]),
    ],
)
async def test_parameters_of_the_wrong_value_are_query_errors(run, type_, value):
    with pytest.raises(QueryError, match=f"not a valid {type_}"):
        run("WITH t AS (SELECT 5 AS inf, 6 AS nan) SELECT :p AS v FROM t", [{"name": "p", "type": type_, "value": value}])


@pytest.mark.parametrize(
    ("type_", "value", "bound"),
    [("int", "-7", -7), ("int", 3.0, 3), ("float", "2.5", 2.5), ("float", 1e300, 1e300), ("string", 10, "10"), ("bool", "TRUE", True),
     ("date", "2024-02-29", datetime.date(2024, 2, 29)), ("time", "23:59:58.25", datetime.time(23, 59, 58, 250000)),
     ("datetime", "2024-02-29T23:59:58", datetime.datetime(2024, 2, 29, 23, 59, 58)),
     ("timestamp", "2024-03-01T01:00:00+02:00", datetime.datetime(2024, 2, 29, 23, 0, tzinfo=datetime.timezone.utc)),
     ("timestamp", "2024-02-29T23:00:00Z", datetime.datetime(2024, 2, 29, 23, 0, tzinfo=datetime.timezone.utc)),
     # Microseconds, as `_event_time`: every year Python takes, where nanoseconds end in 2262.
     ("timestamp", "9999-12-31T23:59:59Z", datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)),
     ("datetime", "0001-01-01T00:00:00", datetime.datetime(1, 1, 1))],
)
async def test_parameters_take_values_or_their_text(run, type_, value, bound):
    assert run("SELECT :p AS v", [{"name": "p", "type": type_, "value": value}]) == [{"v": bound}]


@pytest.mark.parametrize(
    ("type_", "value"),
    [("date", "2023-02-29"), ("date", "yesterday"), ("date", "2024-01-01T10:00:00"), ("time", "24:00:00"), ("time", "10:00:00+02:00"),
     ("datetime", "2024-01-01T10:00:00Z"), ("timestamp", "2024-01-01T10:00:00"), ("timestamp", None)],
)
async def test_time_parameters_need_iso_text_of_their_kind(run, type_, value):
    with pytest.raises(QueryError, match=f"not a valid {type_}"):
        run("SELECT :p AS v", [{"name": "p", "type": type_, "value": value}])


@pytest.mark.parametrize(("moment", "ids"), [("1970-01-01T00:00:00.000001Z", ["d0", "d1", "d2", "d3"]),
                                             ("1970-01-01T02:00:00+02:00", [])])
async def test_a_timestamp_parameter_compares_with_the_event_time(run, moment, ids):
    """The documents' `_event_time` is the epoch (0 µs); the parameter is an instant in any zone."""
    rows = run("SELECT _id FROM orders WHERE _event_time < :t ORDER BY _id", [{"name": "t", "type": "timestamp", "value": moment}])
    assert [row["_id"] for row in rows] == ids


async def test_a_parameter_pasted_many_times_is_bounded(run):
    """Each `:p` gets the value's text: ten uses of a 1 MB text are 10 MB of SQL to parse
    (a thousand were a billion characters, and the process aborted)."""
    text = [{"name": "p", "type": "string", "value": "x" * 1_000_000}]
    with pytest.raises(QueryError, match="parameters' values"):
        run("SELECT COUNT(*) AS n FROM orders WHERE tag IN (" + ", ".join([":p"] * 10) + ")", text)
    assert run("SELECT COUNT(*) AS n FROM orders WHERE tag IN (:p, :p)", text) == [{"n": 0}]


async def test_a_query_takes_at_most_16_searches(run):
    """Each search runs whole, before the deadline can stop it (780 held a thread 150 s)."""
    def searches(count: int) -> str:
        return "SELECT " + ", ".join(f"(SELECT COUNT(*) FROM orders WHERE SEARCH(CONTAINS(tag, 'a a a'))) AS c{i}"
                                     for i in range(count))
    assert run(searches(16)) == [{f"c{i}": 2 for i in range(16)}]
    with pytest.raises(QueryError, match="at most 16 SEARCH"):
        run(searches(17))


async def test_time_functions_take_datafusions_formats(run):
    """chrono's `%Y-%m-%d`, as DataFusion reads it: sqlglot rewrote it into PostgreSQL's
    `YYYY-MM-%D` whenever the planner wrote the query back (here, for `orders`)."""
    rows = run("SELECT to_char(_event_time, '%Y-%m-%d') AS d, to_date('07/12/2026', '%d/%m/%Y') AS t, "
               "to_timestamp('2026-12-07 10:00', '%Y-%m-%d %H:%M') AS ts FROM orders WHERE _id = 'd0'")
    assert rows == [{"d": "1970-01-01", "t": datetime.date(2026, 12, 7), "ts": datetime.datetime(2026, 12, 7, 10, 0)}]


@pytest.mark.parametrize(
    ("where", "ids"),
    [
        ("mixed = 10", ["d0"]),
        ("10 = mixed", ["d0"]),
        ("mixed = '10'", ["d1"]),
        ("mixed = true", ["d2"]),
        ("mixed != 10", ["d1", "d2"]),  # other types differ; the absent value is null
        ("mixed > 5", ["d0"]),
        ("5 < mixed", ["d0"]),
        ("mixed >= -1.5", ["d0"]),
        ("mixed IN (10, '10')", ["d0", "d1"]),
        ("mixed NOT IN (10)", ["d1", "d2"]),
        ("tag = 1", []),  # a string column never equals a number, and does not fail
        ("tag != 1", ["d0", "d1", "d2", "d3"]),
        ("tag IN ('a', 1)", ["d0", "d2"]),
        ("amount > 5", ["d0", "d2"]),  # the string 'n/a' is neither greater nor smaller
        ("amount < 'z'", ["d3"]),
    ],
)
async def test_values_compare_by_their_own_type(run, where, ids):
    assert [r["_id"] for r in run(f"SELECT _id FROM orders WHERE {where} ORDER BY _id")] == ids


async def test_typeof_names_each_value_type(run):
    rows = run("SELECT _id, typeof(mixed) AS t, typeof(city.name) AS c FROM orders ORDER BY _id")
    assert [(r["t"], r["c"]) for r in rows] == [("int", "string"), ("string", "string"), ("bool", "string"), ("null", "null")]


async def test_mixed_number_fields_aggregate_as_numbers(run):
    (row,) = run("SELECT SUM(amount), MAX(amount) AS top, COUNT(amount) AS n FROM orders")
    assert row == {"SUM(amount)": 19.5, "top": 10.0, "n": 4}  # the string 'n/a' counts but does not add


async def test_nested_fields_group(run):
    rows = run("SELECT city.name AS city, COUNT(*) AS n FROM orders WHERE city.name IS NOT NULL GROUP BY city.name ORDER BY n DESC")
    assert rows == [{"city": "Oslo", "n": 2}, {"city": "Rome", "n": 1}]


async def test_arrays_unnest_to_one_row_per_element(run):
    rows = run("SELECT tag, COUNT(*) AS n FROM (SELECT unnest(tags) AS tag FROM orders) GROUP BY tag ORDER BY tag")
    assert rows == [{"tag": "new", "n": 2}, {"tag": "sale", "n": 1}]
    rows = run("SELECT _id, i.sku AS sku FROM (SELECT _id, unnest(items) AS i FROM orders) ORDER BY sku")
    assert rows == [{"_id": "d0", "sku": "s1"}, {"_id": "d0", "sku": "s2"}]


async def test_rockset_unnest_gives_each_element_beside_its_document(run):
    rows = run("SELECT o._id, t.tag FROM orders o CROSS JOIN UNNEST(o.tags AS tag) AS t ORDER BY o._id, t.tag")
    assert rows == [{"_id": "d0", "tag": "new"}, {"_id": "d0", "tag": "sale"}, {"_id": "d1", "tag": "new"}]
    rows = run("SELECT label, COUNT(*) AS n FROM orders CROSS JOIN UNNEST(orders.tags AS label) WHERE amount > 5 GROUP BY label ORDER BY label")
    assert rows == [{"label": "new", "n": 1}, {"label": "sale", "n": 1}]
    # With one collection in FROM, the array may go unnamed by it, as in Rockset's examples.
    assert run("SELECT label, COUNT(*) AS n FROM orders CROSS JOIN UNNEST(tags AS label) WHERE amount > 5 GROUP BY label ORDER BY label") == rows
    rows = run("SELECT i.item.sku AS sku, o.city.name AS city FROM orders o CROSS JOIN UNNEST(o.items AS item) i ORDER BY sku")
    assert rows == [{"sku": "s1", "city": "Oslo"}, {"sku": "s2", "city": "Oslo"}]
    rows = run("SELECT * FROM orders o CROSS JOIN UNNEST(o.tags AS label) u WHERE o._id = 'd1'")
    assert [(row["_id"], row["tag"], row["label"]) for row in rows] == [("d1", "b", "new")]
    assert "_unnest_of" not in rows[0]
    # The element column is typed as the array's elements, not as a field of the same name.
    rows = run("SELECT o._id FROM orders o CROSS JOIN UNNEST(o.tags AS mixed) u WHERE u.mixed = 'sale'")
    assert rows == [{"_id": "d0"}]


async def test_unnest_of_an_unknown_source_is_a_query_error(run):
    with pytest.raises(QueryError, match="name the array by a collection"):
        run("SELECT * FROM orders o CROSS JOIN UNNEST(x.tags AS tag)")
    with pytest.raises(QueryError, match="name the array by a collection"):
        run("SELECT * FROM orders o JOIN orders p ON o._id = p._id CROSS JOIN UNNEST(tags AS tag)")
    with pytest.raises(QueryError, match="ORDINALITY"):
        run("SELECT * FROM orders o CROSS JOIN UNNEST(o.tags AS tag) WITH ORDINALITY")


async def test_no_rows_over_mixed_type_fields(run):
    assert run("SELECT * FROM orders WHERE _id = 'nope'") == []
    assert run("SELECT amount, mixed FROM orders WHERE tag = 'zzz'") == []


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT " + "(" * 46 + "1" + ")" * 46, "too deeply"),  # sqlglot's parser recursed past Python's limit
        ("SELECT " + "(SELECT " * 60 + "1" + ")" * 60, "too deeply"),
        ("SELECT * FROM ROWS FROM (range(3))", "ROWS FROM"),
        ("SELECT 'no end", "syntax error"),
        ("SELECT 1 /* no end", "syntax error"),
        ("SELECT 1 AS v /*" + "x" * (256 * 1024) + "*/", "longer than"),
        ("SELECT _id FROM orders WHERE tag IN (" + ", ".join(["'a'"] * 12000) + ")", "more than 20,000 tokens"),
        ("SELECT " + " + ".join(["1"] * 4000) + " AS v", "more than 500 deep"),  # DataFusion: 15 s of planning
        ("SELECT _id FROM orders WHERE " + " OR ".join(["tag = 'a'"] * 600), "more than 500 deep"),
    ],
)
async def test_queries_too_big_or_malformed_to_plan_are_query_errors(run, sql, message):
    """Refused before any work that cannot be interrupted, never a crash or a hang."""
    with pytest.raises(QueryError, match=message):
        run(sql)


async def test_long_in_lists_plan_quickly(run):
    """`x IN (...)` over a mixed or differently typed field compares each kind's values as one
    list: as ORed equalities, DataFusion took ~15 s to plan 2,000 of them."""
    values = ", ".join(str(n) for n in range(-1000, 1000))
    started = time.perf_counter()
    assert [r["_id"] for r in run(f"SELECT _id FROM orders WHERE amount IN ({values}) ORDER BY _id")] == ["d0", "d2"]
    assert run(f"SELECT _id FROM orders WHERE tag IN ({values}, 'b')") == [{"_id": "d1"}]
    assert [r["_id"] for r in run(f"SELECT _id FROM orders WHERE mixed NOT IN ({values}) ORDER BY _id")] == ["d1", "d2"]
    took = time.perf_counter() - started
    assert took < 3, f"three queries took {took:.1f} s"


async def test_only_short_queries_keep_their_plans():
    """Plans are cached (the same object comes back) only for texts, parameters and rewritten
    SQL of up to 64 KiB: 512 plans of 8 MiB bodies would hold 4 GB."""
    no_collections = lambda workspace, name: None  # noqa: E731
    short = "SELECT 1 AS v"
    assert prepare(short, [], no_collections) is prepare(short, [], no_collections)
    long = "SELECT 1 AS v /*" + "x" * (64 * 1024) + "*/"
    assert prepare(long, [], no_collections) is not prepare(long, [], no_collections)
    bulky = [{"name": "s", "type": "string", "value": "x" * (64 * 1024)}]
    assert prepare("SELECT :s AS v", bulky, no_collections) is not prepare("SELECT :s AS v", bulky, no_collections)
