"""Query limits on a real Shoal server (subprocess) over a real moto table, through HTTP.

A runaway query (a three-way cross join of a 1,500-document collection: 3.4 billion rows)
must answer 408 at its deadline and stop burning CPU right after; while such queries run,
ingest goes on and other queries get answers; more queries than the server takes get a
429; a query over its memory budget gets a 400 and the server lives on. The server runs
with small limits (`LimitedShoal`) so the tests stay short. In process: a join of any
sources stops at its deadline, and values too big to build are refused before any work.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import uuid
import weakref
from unittest.mock import ANY

import pyarrow as pa
import pytest

from shoal.index.collection import Change, Collection
from shoal.sql import engine
from shoal.sql.planner import QueryError, prepare
from support import Dynamo, Response, ShoalProcess, assert_error, run_in_thread, wait_until

QUERIES = "/v1/orgs/self/queries"
DOCS = 1500
RUNAWAY = "SELECT COUNT(*) AS n FROM commons.big a, commons.big b, commons.big c WHERE a.n + b.n + c.n >= 0"
CONCURRENT, QUEUED = 3, 1


class LimitedShoal(ShoalProcess):
    def command(self) -> list[str]:
        return super().command() + [
            "--max-concurrent-queries", str(CONCURRENT), "--max-queued-queries", str(QUEUED), "--query-memory-mb", "32",
        ]

    def cpu_seconds(self) -> float:
        """CPU time the server process used so far (user + system)."""
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def server(tmp_path_factory, moto_server: str):
    """A LimitedShoal with a READY collection `commons.big` of DOCS documents over table `big_<id>`."""
    base = tmp_path_factory.mktemp("limits")
    proc = LimitedShoal(base / "data", base / "shoal.log", key=f"key-{uuid.uuid4().hex}")
    proc.start()
    ddb = Dynamo(moto_server)
    proc.table = f"big_{uuid.uuid4().hex[:8]}"
    ddb.create_table(proc.table)
    ddb.batch_write(proc.table, [{"pk": {"S": f"k{i:05d}"}, "n": {"N": str(i)}} for i in range(DOCS)])

    async def make():
        await proc.create_integration("limits_moto", moto_server)
        await proc.create_collection("big", "limits_moto", proc.table)
        await proc.wait_ready("big")

        async def loaded():
            return (await proc.query("SELECT COUNT(*) AS n FROM commons.big")) == [{"n": DOCS}]
        await wait_until(loaded, 60, 0.2, f"commons.big to hold {DOCS} documents")

    try:
        run_in_thread(make)
        yield proc
    finally:
        proc.stop()


def assert_error_type(r: Response, status: int, type_: str) -> None:
    assert assert_error(r, status)["type"] == type_, r


async def runaway(server: ShoalProcess, timeout_ms: int) -> tuple[Response, float]:
    started = time.monotonic()
    r = await server.request("POST", QUERIES, {"sql": {"query": RUNAWAY}, "timeout_ms": timeout_ms})
    return r, time.monotonic() - started


async def test_a_runaway_query_stops_at_its_deadline(server: LimitedShoal):
    """The 408 comes at the deadline, and the server's CPU use drops right after it (compared
    with a second of the query's run: other processes share this machine's cores)."""
    query = asyncio.ensure_future(runaway(server, 2000))
    await asyncio.sleep(0.5)
    cpu = server.cpu_seconds()
    await asyncio.sleep(1.0)
    running = server.cpu_seconds() - cpu
    r, took = await query
    assert_error_type(r, 408, "QUERY_TIMEOUT")
    assert 1.9 < took < 3.0, f"the 408 came after {took:.2f} s for a 2 s limit"
    cpu = server.cpu_seconds()
    await asyncio.sleep(1.0)
    after = server.cpu_seconds() - cpu
    assert running > 0.2, f"the runaway used only {running:.2f} s of CPU in a second: the test measures nothing"
    assert after < running / 4, f"CPU per second: {running:.2f} s while running, {after:.2f} s after the 408"


async def test_ingest_and_queries_go_on_beside_runaways(server: LimitedShoal, moto_server: str):
    """Two runaways take two of the three query threads and both cores; a write to the table
    still reaches the collection within seconds, and a query gets the third thread."""
    running = [asyncio.ensure_future(runaway(server, 10_000)) for _ in range(2)]
    try:
        await asyncio.sleep(1.0)
        key = f"new{uuid.uuid4().hex[:6]}"
        Dynamo(moto_server).client.put_item(TableName=server.table, Item={"pk": {"S": key}, "n": {"N": "-1"}})
        written = time.monotonic()

        async def visible():
            rows = await server.query(f"SELECT n FROM commons.big WHERE pk = '{key}'")
            return rows == [{"n": -1}]
        await wait_until(visible, 10, 0.2, "the new item to show in SQL while runaways run")
        lag = time.monotonic() - written
        assert lag < 5, f"the write took {lag:.1f} s to show"
        assert all(not task.done() for task in running), "a runaway ended early; the test proves nothing"
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    # Closing the connection does not stop a query; its own deadline does.
    await wait_until(lambda: server_is_idle(server), 30, 0.5, "the runaways to end")


async def server_is_idle(server: LimitedShoal) -> bool:
    cpu = server.cpu_seconds()
    await asyncio.sleep(0.5)
    return server.cpu_seconds() - cpu < 0.15


async def test_too_many_queries_get_a_429(server: LimitedShoal):
    await wait_until(lambda: server_is_idle(server), 30, 0.5, "earlier queries to end")
    running = [asyncio.ensure_future(runaway(server, 3000)) for _ in range(CONCURRENT + QUEUED)]
    await asyncio.sleep(0.5)
    started = time.monotonic()
    r = await server.request("POST", QUERIES, {"sql": {"query": "SELECT 1 AS one"}})
    assert_error_type(r, 429, "TOO_MANY_QUERIES")
    assert time.monotonic() - started < 1, "the 429 was not immediate"
    answers = await asyncio.gather(*running)
    for answer, took in answers:
        assert_error_type(answer, 408, "QUERY_TIMEOUT")  # the queued one counted its wait too
        assert took < 4.5, took
    await wait_until(lambda: server_is_idle(server), 30, 0.5, "the runaways to end")
    assert await server.query("SELECT 1 AS one") == [{"one": 1}]


async def test_a_query_over_its_memory_gets_400_and_the_server_lives(server: LimitedShoal):
    r = await server.request("POST", QUERIES, {"sql": {"query": (
        "SELECT a.pk || b.pk AS k, COUNT(*) AS n FROM commons.big a, commons.big b GROUP BY a.pk || b.pk ORDER BY n DESC LIMIT 1"
    )}})
    assert_error_type(r, 400, "RESOURCES_EXCEEDED")
    assert "32 MiB" in r.body["message"], r
    assert await server.query("SELECT COUNT(*) AS n FROM commons.big WHERE n >= 0") == [{"n": DOCS}]


@pytest.fixture
async def tiny(tmp_path):
    """Run SQL in process, over a collection `commons.c` of three documents."""
    collection = Collection.open(tmp_path)
    meta = {"table": "t", "event": "INSERT", "sequence_number": None}
    await collection.apply([Change.of(f"d{i}", {"n": i}, 0, meta) for i in range(3)], None)

    def run(sql: str, timeout_s: float = 10) -> list[dict]:
        snapshot = collection.snapshot()
        prepared = prepare(sql, [], lambda ws, name: snapshot.query_schema if name == "c" else None)
        return engine.execute(prepared, lambda ws, name: snapshot, 100, timeout_s).table.to_pylist()

    yield run
    await collection.close()


@pytest.mark.parametrize("sql", [
    "SELECT COUNT(*) AS n FROM range(1000000) a, range(1000000) b",
    "SELECT COUNT(*) AS n FROM (SELECT value AS v FROM range(1000000)) a CROSS JOIN (SELECT value AS w FROM range(1000000))",
    "WITH r AS (SELECT value FROM range(1000000)) SELECT COUNT(*) AS n FROM r a, r b",
    "SELECT COUNT(*) AS n FROM commons.c, range(1000000) a, generate_series(1, 1000000) b",
])
async def test_a_join_of_any_sources_stops_at_its_deadline(tiny, sql):
    """Every join checks its deadline above it, not only joins of collections: a cross join of
    table functions, subqueries or CTEs (a trillion rows) ran 15 s past a 1 s limit."""
    started = time.monotonic()
    with pytest.raises(engine.QueryTimeout):
        tiny(sql, timeout_s=0.5)
    took = time.monotonic() - started
    assert took < 5, f"a 0.5 s query stopped after {took:.1f} s"


async def test_a_join_check_leaves_answers_and_stars_alone(tiny):
    """The column that carries a join side's check is not listed by `*` or `side.*`."""
    assert tiny("SELECT * FROM range(2) a, (SELECT 'x' AS s) b ORDER BY value") == [{"value": 0, "s": "x"}, {"value": 1, "s": "x"}]
    assert tiny("SELECT a.*, c.n FROM range(2) a JOIN commons.c ON a.value = c.n ORDER BY value") == [
        {"value": 0, "n": 0}, {"value": 1, "n": 1}]
    assert tiny("WITH r AS (SELECT n FROM commons.c) SELECT COUNT(*) AS k FROM r LEFT JOIN range(1) z ON r.n = z.value") == [{"k": 3}]
    assert tiny("SELECT * FROM commons.c CROSS JOIN UNNEST([7]) AS u(x) WHERE n = 0") == [{"_id": "d0", "_event_time": ANY, "_meta": ANY, "n": 0, "x": 7}]


@pytest.mark.parametrize(("sql", "message"), [
    ("SELECT COUNT(*) AS n FROM (SELECT unnest(range(100000000)) AS x) t", "range"),  # 48 s, 4.8 GB
    ("SELECT length(repeat('x', 300000000)) AS n", "repeat"),  # 1.3 GB beside a 1 MiB pool
    ("SELECT length(repeat(repeat('ab', 1000), 1000)) AS n", "repeat"),
    ("SELECT length(lpad('x', 2000000)) AS n", "lpad"),
    ("SELECT cardinality(array_repeat(1, 2000000)) AS n", "array_repeat"),
    ("SELECT generate_series(1, 2000000) AS n", "generate_series"),
    ("SELECT range(n) AS r FROM commons.c", "integer literals"),
    # Over a field: once per row of a 65,536-row batch (lpad to 100,000 aborted the process).
    ("SELECT length(lpad(CAST(n AS VARCHAR), 100000)) AS k FROM commons.c", "per row"),
    ("SELECT length(repeat(CAST(n AS VARCHAR), 11)) AS k FROM commons.c", "per row"),
    ("SELECT length(repeat('x', n)) AS k FROM commons.c", "not from the data"),
    # A replacement grows its input by each match (900 MB, 6 s past a 1 s limit).
    ("SELECT length(replace(repeat('a', 100000), 'a', repeat('b', 9000))) AS n", "replace"),
    ("SELECT length(replace(repeat('a', 1000), '', repeat('b', 2000))) AS n", "replace"),
    ("SELECT length(regexp_replace(CAST(n AS VARCHAR), '.', repeat('b', 20), 'g')) AS k FROM commons.c", "grow"),
    ("SELECT length(replace(CAST(n AS VARCHAR), '0', CAST(n AS VARCHAR))) AS k FROM commons.c", "not from the data"),
    ("SELECT cardinality(array_replace_all(array_repeat(1, 1000), 1, repeat('x', 2000))) AS n", "array_replace_all"),
    # length × length steps between two liveness checks (11 s past a 1 s limit).
    ("SELECT levenshtein(repeat('a', 100000), repeat('b', 100000)) AS d", "levenshtein"),
    ("SELECT levenshtein(CAST(n AS VARCHAR), 'jon') AS d FROM commons.c", "bounded part"),
    ("SELECT levenshtein(left(CAST(n AS VARCHAR), 1000), repeat('j', 100)) AS d FROM commons.c", "per batch"),
    # Constants are built anew for each row of a batch of 65,536 (59 GB: the process aborted).
    ("SELECT repeat('x', 900000) AS s FROM commons.c", "columns and groups"),
    ("SELECT '" + "x" * 20000 + "' AS s FROM commons.c", "columns and groups"),
    ("SELECT unnest(range(900000)) AS k FROM commons.c", "columns and groups"),
    ("SELECT COUNT(*) AS k FROM commons.c GROUP BY repeat('x', 900000)", "columns and groups"),
    ("SELECT concat(repeat('x', 20000), n) AS s FROM commons.c", "computed from a field"),
    ("SELECT COUNT(*) AS k FROM commons.c WHERE coalesce(CAST(n AS VARCHAR), repeat('x', 20000)) = 'b'", "computed from a field"),
    # Values that differ per row though they read no field: built per row.
    ("SELECT COUNT(*) AS k FROM commons.c WHERE length(repeat(uuid(), 30000)) > 0", "per row"),
    ("SELECT COUNT(*) AS k FROM commons.c WHERE length(repeat(CAST(random() AS VARCHAR), 1000000)) > 0", "per row"),
    # A join copies a constant row into each row it pairs it with.
    ("SELECT length(a) AS k FROM commons.c CROSS JOIN (SELECT repeat('x', 30000) AS a) t", "rows a query reads from"),
    ("WITH k AS (SELECT repeat('x', 900000) AS x) SELECT length(x) AS l FROM commons.c, k", "rows a query reads from"),
    ("SELECT length(x) AS l FROM commons.c CROSS JOIN (VALUES (repeat('x', 30000))) v(x)", "rows a query reads from"),
    # Functions that multiply what they are given (21 nested hex encodings: 2 MB).
    ("SELECT length(" + "encode(" * 21 + "'a'" + ", 'hex')" * 21 + ") AS k", "encode"),
    ("SELECT length(array_to_string(range(1000000), repeat('x', 1000))) AS k", "array_to_string"),
    ("SELECT length(array_to_string(make_array(CAST(n AS VARCHAR)), repeat('x', 10))) AS k FROM commons.c", "separator"),
    ("SELECT length(concat_ws(repeat('x', 100000), " + ", ".join(["'a'"] * 11) + ")) AS k", "concat_ws"),
    ("SELECT levenshtein(left(CAST(n AS VARCHAR), -1), 'a') AS d FROM commons.c", "bounded part"),
    ("SELECT levenshtein(repeat(md5('a'), 3000), repeat(md5('b'), 3000)) AS d", "levenshtein"),
    # Found by probing (each aborted the process, ran far past its limit or panicked).
    ("SELECT n FROM commons.c WHERE range(1000000)[n % 10 + 1] = 5", "computed from a field"),
    ("SELECT max(range(9999)) AS k FROM commons.c", "aggregate's input"),
    ("WITH t AS (SELECT repeat('x', 999000) AS a), u AS (SELECT repeat(a, 10) AS b FROM t) SELECT length(b) AS k FROM u",
     "rows a query reads from"),
    ("SELECT length(list_join(range(3000), repeat('x', 990000))) AS k", "list_join"),
    ("SELECT max(length(to_char(arrow_cast(n, 'Timestamp(Second, None)'), repeat('%c', 100)))) AS k FROM commons.c", "computed from a field"),
    ("SELECT COUNT(*) AS k FROM commons.c WHERE regexp_like('zzz', concat(CAST(n AS VARCHAR), repeat('a', 500)))", "pattern"),
    ("SELECT COUNT(*) AS k FROM commons.c WHERE 'zzz' LIKE concat(CAST(n AS VARCHAR), repeat('%_', 100))", "pattern"),
    ("SELECT array_has_all(range(100000), range(100000)) AS k", "array_has_all"),
    ("SELECT approx_percentile_cont(value, 0.5, 1000000000) AS k FROM range(10)", "centroids"),
    ("SELECT max(cardinality(a)) AS k FROM (SELECT array_agg(n) OVER (ORDER BY n) AS a FROM commons.c)", "window"),
    ("SELECT length(string_agg(repeat('x', 9000), ',')) AS k FROM range(200000)", "aggregate's input"),
    # Each call within its limit, together far beyond.
    ("SELECT " + " || ".join(["repeat('x', 900000)"] * 12) + " AS s", "in all"),
])
async def test_functions_that_build_huge_values_are_refused(tiny, sql, message):
    """DataFusion builds their values whole, outside the query's memory pool and between two
    liveness checks: a size beyond 1,000,000 is a query error before any work."""
    with pytest.raises(QueryError, match=message):
        tiny(sql)


async def test_functions_build_values_up_to_the_limit(tiny):
    assert tiny("SELECT COUNT(*) AS n FROM (SELECT unnest(range(1000000)) AS x) t") == [{"n": 1_000_000}]
    assert tiny("SELECT length(repeat('ab', 500000)) AS n, cardinality(generate_series(-2, 2)) AS g") == [{"n": 1_000_000, "g": 5}]
    assert tiny("SELECT length(repeat(CAST(n AS VARCHAR), 10)) AS k FROM commons.c WHERE n = 1") == [{"k": 10}]
    assert tiny("SELECT lpad(CAST(n AS VARCHAR), 3, '0') AS k FROM commons.c WHERE n = 1") == [{"k": "001"}]
    assert tiny("SELECT replace(CAST(n AS VARCHAR), '1', 'one') AS k, regexp_replace('a@b.c', '@.*', '@redacted') AS e "
                "FROM commons.c WHERE n = 1") == [{"k": "one", "e": "a@redacted"}]
    assert tiny("SELECT levenshtein('kitten', 'sitting') AS d, levenshtein(left(CAST(n AS VARCHAR), 100), '2') AS e "
                "FROM commons.c WHERE n = 1") == [{"d": 3, "e": 1}]
    assert tiny("SELECT length(repeat('x', 600000) || repeat('y', 600000)) AS n") == [{"n": 1_200_000}]
    # Over rows: a constant compared with each value, a length, a CASE's one value at a time.
    long_text = "x" * 20000
    assert tiny(f"SELECT COUNT(*) AS k FROM commons.c WHERE CAST(n AS VARCHAR) IN ('{long_text}', '1')") == [{"k": 1}]
    assert tiny("SELECT length(repeat('x', 900000)) AS k FROM commons.c WHERE n = 1") == [{"k": 900_000}]
    branches = " ".join(f"WHEN {i} THEN 'value number {i}'" for i in range(1000))
    assert tiny(f"SELECT CASE n {branches} END AS v FROM commons.c WHERE n = 2") == [{"v": "value number 2"}]
    assert tiny(f"SELECT length('{long_text}') AS k") == [{"k": 20000}]
    assert tiny("SELECT COUNT(*) AS k FROM (SELECT unnest(range(1000000)) AS x) t") == [{"k": 1_000_000}]
    assert tiny("WITH k AS (SELECT 'ab' AS x) SELECT length(x) AS l FROM commons.c, k WHERE n = 1") == [{"l": 2}]
    assert tiny("SELECT range(5)[n + 1] AS r, to_char(arrow_cast(n, 'Timestamp(Second, None)'), '%Y-%m-%d') AS d, "
                "array_has_all(make_array(n, 0), make_array(0)) AS h FROM commons.c WHERE n = 1") == [
        {"r": 1, "d": "1970-01-01", "h": True}]
    assert tiny("SELECT COUNT(*) AS k FROM commons.c WHERE CAST(n AS VARCHAR) LIKE concat('%', CAST(n AS VARCHAR))") == [{"k": 3}]
    assert tiny("SELECT COUNT(*) AS k FROM commons.c WHERE regexp_like(CAST(n AS VARCHAR), '^[0-9]+$')") == [{"k": 3}]
    assert tiny("SELECT approx_percentile_cont(value, 0.5, 100) AS p, cardinality(array_agg(value)) AS a FROM range(10)") == [
        {"p": ANY, "a": 10}]
    assert tiny("SELECT regexp_replace(CAST(n AS VARCHAR) || ' at https://x.io/a', 'https?://[^ ]+', '[link removed]', 'g') AS a, "
                "regexp_replace(CAST(n AS VARCHAR) || ' ab', '(\\d+) (\\w+)', '$2 is $1', 'g') AS b, "
                "replace('/items/{id}', '{id}', CAST(n AS VARCHAR)) AS c, "
                "array_to_string(make_array(CAST(n AS VARCHAR), 'x'), ', ') AS d, "
                "concat_ws('-', n, 'x') AS e, length(md5(CAST(n AS VARCHAR))) AS f FROM commons.c WHERE n = 1") == [
        {"a": "1 at [link removed]", "b": "ab is 1", "c": "/items/1", "d": "1, x", "e": "1-x", "f": 32}]


async def test_memory_pyarrow_cannot_get_is_a_resources_error(tiny, monkeypatch):
    """A search's matches are built outside the query's memory pool: when pyarrow's malloc
    fails, the query answers RESOURCES_EXCEEDED (400), not a 500."""
    def failing_matches(snapshot, search):
        raise pa.ArrowMemoryError("malloc of size 4320000 failed")

    monkeypatch.setattr(engine, "_matches", failing_matches)
    with pytest.raises(engine.ResourcesExceeded, match="ran out of memory"):
        tiny("SELECT COUNT(*) AS k FROM (SELECT _id FROM commons.c WHERE SEARCH(CONTAINS(n, 'x'))) t")


async def test_a_replaced_snapshot_and_its_cached_table_are_freed(tmp_path):
    """Queries over one snapshot share its DataFusion table (kept in `Snapshot.derived`);
    once the collection has moved on and no query reads the old snapshot, both go, so a
    collection that changes every second does not keep its past versions in memory."""
    collection = Collection.open(tmp_path)
    meta = {"table": "t", "event": "INSERT", "sequence_number": None}

    def count() -> list[dict]:
        snapshot = collection.snapshot()
        prepared = prepare("SELECT COUNT(*) AS n FROM commons.c", [], lambda ws, name: snapshot.query_schema)
        return engine.execute(prepared, lambda ws, name: snapshot, 10, 10).table.to_pylist()

    await collection.apply([Change.of("a", {"n": 1}, 0, meta)], None)
    assert count() == [{"n": 1}]
    first_table = collection.snapshot().derived["table"]
    assert count() == [{"n": 1}] and collection.snapshot().derived["table"] is first_table, "not shared"
    replaced = weakref.ref(collection.snapshot())
    del first_table
    await collection.apply([Change.of("b", {"n": 2}, 0, meta)], None)
    assert "table" not in collection.snapshot().derived, "the next snapshot inherited the old table"
    assert count() == [{"n": 2}]
    gc.collect()
    assert replaced() is None, "the replaced snapshot (and with it its table) is still referenced"
    await collection.close()


async def test_sigterm_lets_queries_finish_then_exits(shoal: ShoalProcess, ddb: Dynamo, table_name: str):
    """On SIGTERM a query in flight still gets its answer, a runaway is cancelled after the
    grace period, ingest stops cleanly, and the process exits within seconds; the collection
    then reopens whole."""
    ddb.create_table(table_name)
    ddb.batch_write(table_name, [{"pk": {"S": f"k{i}"}} for i in range(200)])
    await shoal.create_integration("term_moto", ddb.endpoint_url)
    await shoal.create_collection("term", "term_moto", table_name)
    await shoal.wait_ready("term")
    finishing = asyncio.ensure_future(shoal.request(
        "POST", QUERIES, {"sql": {"query": "SELECT COUNT(*) AS n FROM generate_series(1, 150000000)"}, "timeout_ms": 60_000}))
    endless = asyncio.ensure_future(shoal.request(
        "POST", QUERIES, {"sql": {"query": "SELECT COUNT(*) AS n FROM generate_series(1, 1000000000000)"}, "timeout_ms": 60_000}))
    await asyncio.sleep(0.5)
    os.kill(shoal.proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    r = await finishing
    assert r.status == 200 and r.body["results"] == [{"n": 150_000_000}], r
    await asyncio.to_thread(shoal.proc.wait, 15)
    took = time.monotonic() - sent
    assert shoal.proc.returncode == 0, f"exit code {shoal.proc.returncode}:\n{shoal.log_tail()}"
    assert took < 8, f"the server took {took:.1f} s to exit"
    answer = await asyncio.gather(endless, return_exceptions=True)
    assert isinstance(answer[0], Exception) or answer[0].status == 503, answer
    assert "Traceback" not in shoal.log_tail(), shoal.log_tail()
    shoal.start()
    assert await shoal.query("SELECT COUNT(*) AS n FROM commons.term") == [{"n": 200}]  # from disk, at once
    await shoal.wait_ready("term", timeout=30)
