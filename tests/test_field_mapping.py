"""Field mapping at ingest (`field_mapping_query`): every stored document went through it."""

from __future__ import annotations

import pytest

from shoal.index.collection import Change, Collection
from shoal.sql.engine import execute
from shoal.sql.mapping import FieldMapping
from shoal.sql.planner import QueryError, prepare
from support import wait_until

META = {"table": "t", "event": "INSERT", "sequence_number": None}
MASKING = (
    "SELECT * EXCEPT (email, city), encode(sha256(email), 'hex') AS email_hash, upper(city) AS city "
    "FROM _input WHERE hidden IS NULL OR NOT hidden"
)


def rows(collection: Collection, sql: str) -> list[dict]:
    prepared = prepare(sql, [], lambda *_: collection.snapshot().query_schema)
    return execute(prepared, lambda *_: collection.snapshot(), 1000, 10).table.to_pylist()


async def test_mapping_masks_derives_and_filters(tmp_path):
    collection = Collection.open(tmp_path, FieldMapping(MASKING).apply)
    try:
        await collection.apply([
            Change.of("a", {"email": "ann@example.com", "city": "oslo", "n": 1}, 0, META),
            Change.of("b", {"email": "bob@example.com", "n": 2}, 0, META),
            Change.of("c", {"email": "cy@example.com", "hidden": True}, 0, META),
        ], None)
        got = rows(collection, "SELECT _id, n, city, email_hash FROM docs ORDER BY _id")
        assert [(r["_id"], r["n"], r["city"]) for r in got] == [("a", 1, "OSLO"), ("b", 2, None)]
        assert len(got[0]["email_hash"]) == 64 and "email" not in collection.snapshot().query_schema.names
        # An update the mapping filters out removes the document; a delete passes through.
        await collection.apply([Change.of("a", {"email": "ann@example.com", "hidden": True}, 0, META), Change.of("b", None, 0, META)], None)
        assert rows(collection, "SELECT _id FROM docs") == []
    finally:
        await collection.close()


async def test_a_failing_mapping_stores_nothing(tmp_path):
    collection = Collection.open(tmp_path, FieldMapping("SELECT *, CAST(n AS INT) AS m FROM _input").apply)
    try:
        await collection.apply([Change.of("a", {"n": "1"}, 0, META)], {"at": 1})
        with pytest.raises(QueryError, match="field mapping failed"):
            await collection.apply([Change.of("a", {"n": "one"}, 0, META)], {"at": 2})
        assert rows(collection, "SELECT _id, m FROM docs") == [{"_id": "a", "m": 1}]
        assert collection.checkpoint == {"at": 1}
    finally:
        await collection.close()


async def test_attributes_named_like_system_columns_keep_their_query_names(tmp_path):
    """An attribute `_id` or `_meta` is `_item_id`, `_item_meta` in a mapping as in queries."""
    mapping = "SELECT _id, _item_id, upper(_item_meta) AS _item_meta, _item_meta AS owner FROM _input"
    collection = Collection.open(tmp_path, FieldMapping(mapping).apply)
    try:
        await collection.apply([Change.of("a", {"_id": "own id", "_meta": "ann", "n": 1}, 0, META)], None)
        assert rows(collection, "SELECT _id, _item_id, _item_meta, owner FROM docs") == [
            {"_id": "a", "_item_id": "own id", "_item_meta": "ANN", "owner": "ann"}
        ]
        assert "n" not in collection.snapshot().query_schema.names
    finally:
        await collection.close()
    with pytest.raises(QueryError, match="_item_meta"):  # `_meta` would read as null
        FieldMapping("SELECT _id, _meta AS owner FROM _input")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT name FROM _input",
        "SELECT *, COUNT(*) AS n FROM _input",
        "SELECT * FROM orders",
        "SELECT * FROM _input ORDER BY n",
        "SELECT * FROM _input WHERE n IN (SELECT 1)",
        "SELECT UPPER(_id) AS _id FROM _input",
        "DELETE FROM _input",
        "SELECT *, repeat('x', 300000000) AS pad FROM _input",  # 300 MB per document
        "SELECT *, lpad(name, 100000) AS pad FROM _input",
    ],
)
def test_mappings_that_are_not_row_by_row_are_refused(sql):
    with pytest.raises(QueryError):
        FieldMapping(sql).apply([Change.of("a", {"n": 1, "name": "x"}, 0, META)])


async def test_mapping_over_http_applies_to_scan_and_stream(shoal, ddb, table_name, moto_server):
    ddb.create_table(table_name)
    ddb.batch_write(table_name, [{"pk": {"S": "a"}, "email": {"S": "ann@example.com"}, "city": {"S": "oslo"}}])
    await shoal.create_integration("local", moto_server)
    status, body = await shoal.api("POST", "/v1/orgs/self/ws/commons/collections", {
        "name": "bad", "field_mapping_query": {"sql": "SELECT email FROM _input"},
        "sources": [{"integration_name": "local", "dynamodb": {"table_name": table_name, "aws_region": "us-east-1"}}],
    })
    assert status == 400 and "_id" in body["message"], body
    status, body = await shoal.api("POST", "/v1/orgs/self/ws/commons/collections", {
        "name": "people", "field_mapping_query": {"sql": MASKING},
        "sources": [{"integration_name": "local", "dynamodb": {"table_name": table_name, "aws_region": "us-east-1"}}],
    })
    assert status == 200 and body["data"]["field_mapping_query"] == {"sql": MASKING}, body
    await shoal.wait_ready("people")
    ddb.client.put_item(TableName=table_name, Item={"pk": {"S": "b"}, "email": {"S": "bob@example.com"}, "city": {"S": "rome"}})

    async def both_mapped():
        return await shoal.query("SELECT _id, city FROM commons.people ORDER BY _id") == [
            {"_id": "a", "city": "OSLO"}, {"_id": "b", "city": "ROME"}]

    await wait_until(both_mapped, timeout=10)
    (row,) = await shoal.query("SELECT * FROM commons.people WHERE _id = 'b'")
    assert "email" not in row and len(row["email_hash"]) == 64
