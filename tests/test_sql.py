"""SQL over a real collection: read-only refusals, parameters, dynamic types, mixed numbers."""

from __future__ import annotations

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
