"""The query API beyond one answer: pagination of large results, and query lambdas.

A real Shoal server (subprocess) over a real moto table; queries go through HTTP.
"""

from __future__ import annotations

import pytest

from shoal.server import lambdas
from shoal.server.errors import ApiError
from support import ShoalProcess

ROWS = 250


@pytest.fixture(scope="module")
def numbers(shoal_module: ShoalProcess, moto_server: str):
    """A READY collection `commons.numbers` of items n = 0..ROWS-1, each odd or even."""
    from support import Dynamo, run_in_thread

    ddb = Dynamo(moto_server)
    ddb.create_table("numbers_api")
    ddb.batch_write("numbers_api", [{"pk": {"S": f"k{n:04d}"}, "n": {"N": str(n)}, "parity": {"S": "odd" if n % 2 else "even"}} for n in range(ROWS)])

    async def make():
        await shoal_module.create_integration("local_api", moto_server)
        await shoal_module.create_collection("numbers", "local_api", "numbers_api")
        await shoal_module.wait_ready("numbers")

    run_in_thread(make)
    return shoal_module


async def test_pages_cover_the_result_once_in_order(numbers):
    status, first = await numbers.api("POST", "/v1/orgs/self/queries", {
        "sql": {"query": "SELECT n FROM commons.numbers ORDER BY n", "paginate": True, "initial_paginate_response_doc_count": 100},
    })
    assert status == 200, first
    assert first["results_total_doc_count"] == ROWS and len(first["results"]) == 100
    seen = [r["n"] for r in first["results"]]
    cursor = first["pagination"]["next_cursor"]
    while cursor is not None:
        status, page = await numbers.api("GET", f"/v1/orgs/self/queries/{first['query_id']}/pages/{cursor}?docs=60")
        assert status == 200, page
        assert page["pagination"]["current_page_doc_count"] == len(page["results"]) <= 60
        seen += [r["n"] for r in page["results"]]
        cursor = page["pagination"]["next_cursor"]
    assert seen == list(range(ROWS))
    kept = f"/v1/orgs/self/queries/{first['query_id']}/pages"
    status, beyond = await numbers.api("GET", f"{kept}/999999999999999999")
    assert status == 200 and beyond["results"] == [] and beyond["pagination"]["next_cursor"] is None, beyond
    status, body = await numbers.api("GET", f"{kept}/{'9' * 30}")  # beyond Arrow's int64 offsets
    assert status == 400 and body["type"] == "INVALID_INPUT", body


async def test_pages_of_unknown_queries_and_bad_cursors_are_clear_errors(numbers):
    status, body = await numbers.api("GET", "/v1/orgs/self/queries/nope/pages/0")
    assert status == 404 and body["type"] == "NOT_FOUND"
    status, body = await numbers.api("GET", "/v1/orgs/self/queries/nope/pages/x")
    assert status == 400
    # '²'.isdigit() is true, but int() refuses it
    for path in ("nope/pages/²", "nope/pages/0?docs=²", "nope/pages/0?docs=0"):
        status, body = await numbers.api("GET", f"/v1/orgs/self/queries/{path}")
        assert status == 400 and body["type"] == "INVALID_INPUT", (path, body)
    status, body = await numbers.api("POST", "/v1/orgs/self/queries", {"sql": {"query": "SELECT 1", "paginate": "yes"}})
    assert status == 400 and "paginate" in body["message"]


async def test_row_limit_caps_an_unpaginated_answer(numbers):
    body = await numbers.query_full("SELECT n FROM commons.numbers ORDER BY n", limit=7)
    assert [r["n"] for r in body["results"]] == list(range(7))


async def test_lambda_versions_run_with_default_and_given_parameters(numbers):
    base = "/v1/orgs/self/ws/commons/lambdas"
    status, created = await numbers.api("POST", base, {
        "name": "by_parity",
        "description": "count of one parity",
        "sql": {"query": "SELECT COUNT(*) AS c FROM commons.numbers WHERE parity = :p",
                "default_parameters": [{"name": "p", "type": "string", "value": "odd"}]},
    })
    assert status == 200 and created["data"]["version"] == "1", created
    status, again = await numbers.api("POST", base, {"name": "by_parity", "sql": {"query": "SELECT 1"}})
    assert status == 409, again

    status, run = await numbers.api("POST", f"{base}/by_parity/tags/latest", {})
    assert status == 200 and run["results"] == [{"c": ROWS // 2}], run
    status, run = await numbers.api("POST", f"{base}/by_parity/versions/1", {"parameters": [{"name": "p", "type": "string", "value": "none"}]})
    assert run["results"] == [{"c": 0}], run

    status, updated = await numbers.api("POST", f"{base}/by_parity/versions", {
        "sql": {"query": "SELECT MAX(n) AS top FROM commons.numbers WHERE parity = :p",
                "default_parameters": [{"name": "p", "type": "string", "value": "even"}]},
    })
    assert status == 200 and updated["data"]["version"] == "2", updated
    _, latest = await numbers.api("POST", f"{base}/by_parity/tags/latest", {})
    _, pinned = await numbers.api("POST", f"{base}/by_parity/versions/1", {})
    assert latest["results"] == [{"top": ROWS - 2}] and pinned["results"] == [{"c": ROWS // 2}]

    status, listed = await numbers.api("GET", base)
    assert [(s["name"], s["version_count"]) for s in listed["data"]] == [("by_parity", 2)]
    status, _ = await numbers.api("DELETE", f"{base}/by_parity")
    assert status == 200
    status, gone = await numbers.api("POST", f"{base}/by_parity/tags/latest", {})
    assert status == 404, gone


@pytest.mark.parametrize(
    "body",
    [
        {"name": "bad sql", "sql": {"query": "SELECT 1"}},
        {"name": "broken", "sql": {"query": "SELEC 1"}},
        {"name": "writer", "sql": {"query": "DROP TABLE commons.numbers"}},
        {"name": "params", "sql": {"query": "SELECT 1", "default_parameters": "p"}},
        {"name": "extra", "sql": {"query": "SELECT 1"}, "owner": "me"},
        {"sql": {"query": "SELECT 1"}},
        {"name": "deep", "sql": {"query": "SELECT " + "(" * 46 + "1" + ")" * 46}},
        {"name": "unended", "sql": {"query": "SELECT 'x"}},
        {"name": "listname", "sql": {"query": "SELECT 1", "default_parameters": [{"name": [1], "type": "int", "value": "1"}]}},
        {"name": "huge", "sql": {"query": "SELECT :p", "default_parameters": [{"name": "p", "type": "string", "value": "x" * 2**21}]}},
    ],
)
async def test_bad_lambdas_are_refused(numbers, body):
    status, answer = await numbers.api("POST", "/v1/orgs/self/ws/commons/lambdas", body)
    assert status == 400 and answer["message"], answer


async def test_lambdas_survive_a_restart(shoal):
    status, _ = await shoal.api("POST", "/v1/orgs/self/ws/commons/lambdas", {"name": "one", "sql": {"query": "SELECT :x AS x",
        "default_parameters": [{"name": "x", "type": "int", "value": "1"}]}})
    assert status == 200
    shoal.kill()
    shoal.start()
    status, run = await shoal.api("POST", "/v1/orgs/self/ws/commons/lambdas/one/tags/latest", {})
    assert status == 200 and run["results"] == [{"x": 1}], run
    assert (shoal.data_dir / "lambdas.json").stat().st_mode & 0o077 == 0


async def test_time_parameters_answer_as_iso_text_with_their_types(numbers):
    """Rockset's date, time, datetime and timestamp parameters, through the API: each answers
    as ISO text and names its type in column_fields; a timestamp filters `_event_time`."""
    status, body = await numbers.api("POST", "/v1/orgs/self/queries", {"sql": {
        "query": "SELECT :d AS d, :t AS t, :dt AS dt, :ts AS ts",
        "parameters": [{"name": "d", "type": "date", "value": "2024-02-29"},
                       {"name": "t", "type": "time", "value": "07:30:00"},
                       {"name": "dt", "type": "datetime", "value": "2024-02-29T07:30:00"},
                       {"name": "ts", "type": "timestamp", "value": "2024-02-29T09:30:00+02:00"}]}})
    assert status == 200, body
    assert body["results"] == [{"d": "2024-02-29", "t": "07:30:00", "dt": "2024-02-29T07:30:00", "ts": "2024-02-29T07:30:00+00:00"}]
    assert [f["type"] for f in body["column_fields"]] == ["date", "time", "timestamp", "timestamp"]
    status, body = await numbers.api("POST", "/v1/orgs/self/queries", {"sql": {
        "query": "SELECT COUNT(*) AS n FROM commons.numbers WHERE _event_time > :since",
        "parameters": [{"name": "since", "type": "timestamp", "value": "2020-01-01T00:00:00Z"}]}})
    assert status == 200 and body["results"] == [{"n": ROWS}], body
    status, body = await numbers.api("POST", "/v1/orgs/self/queries", {"sql": {
        "query": "SELECT :d AS d", "parameters": [{"name": "d", "type": "date", "value": "29/02/2024"}]}})
    assert status == 400 and "not a valid date" in body["message"], body


@pytest.mark.parametrize("sql", ["SELECT to_date(2147483647) AS d", "SELECT to_timestamp(1e300) AS t",
                                 "SELECT arrow_cast(1, 'Timestamp(Second, Some(\"+99:99\"))') AS t",
                                 "SELECT arrow_cast(9223372036854775807, 'Timestamp(Second, None)') AS t"])
async def test_values_json_cannot_show_are_400(numbers, sql):
    """Dates beyond Python's year 9999 and unknown time zones: a query error, not a 500."""
    status, body = await numbers.api("POST", "/v1/orgs/self/queries", {"sql": {"query": sql}})
    assert status == 400 and body["type"] == "QUERY_ERROR", body


def test_the_lambda_store_refuses_to_outgrow_its_limit(tmp_path, monkeypatch):
    """It is rewritten whole on each change: past its limit a new version or lambda is
    refused, and neither the store nor its file changes."""
    monkeypatch.setattr(lambdas, "MAX_STORE_BYTES", 4096)
    store = lambdas.LambdaStore(tmp_path / "lambdas.json")
    body = {"name": "l", "sql": {"query": "SELECT :p AS p", "default_parameters": [{"name": "p", "type": "string", "value": "x" * 1000}]}}
    store.add("commons", "l", body, create=True)
    with pytest.raises(ApiError, match="MiB in all"):
        for _ in range(10):
            kept = len(store.versions("commons", "l"))
            store.add("commons", "l", body, create=False)
    assert 1 < kept < 10 and len(store.versions("commons", "l")) == kept
    assert len(lambdas.LambdaStore(tmp_path / "lambdas.json").versions("commons", "l")) == kept
    with pytest.raises(ApiError, match="MiB in all"):
        store.add("commons", "other", {**body, "name": "other"}, create=True)
    assert [summary["name"] for summary in store.summaries()] == ["l"]


async def test_a_page_json_cannot_show_is_400(numbers):
    """The first page renders; the next holds a timestamp past year 9999."""
    status, first = await numbers.api("POST", "/v1/orgs/self/queries", {"sql": {
        "query": "SELECT arrow_cast(CASE WHEN value = 0 THEN 0 ELSE 9223372036854775807 END, 'Timestamp(Second, None)') AS t "
                 "FROM range(2) ORDER BY value", "paginate": True, "initial_paginate_response_doc_count": 1}})
    assert status == 200 and first["results"] == [{"t": "1970-01-01T00:00:00"}], first
    status, body = await numbers.api("GET", f"/v1/orgs/self/queries/{first['query_id']}/pages/1")
    assert status == 400 and body["type"] == "QUERY_ERROR" and "years 1 to 9999" in body["message"], body
