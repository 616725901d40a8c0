"""Full-text search from SQL: tantivy's answers must equal a brute-force evaluation.

A seeded random corpus (a small vocabulary, so words collide) is searched with random
CONTAINS / PHRASE predicates, alone or with other SQL conditions, between random updates
and deletes; each answer is compared with what plain Python finds in the same documents.
"""

from __future__ import annotations

import dataclasses
import random
import re
from decimal import Decimal

import orjson
import pytest

from shoal.index.collection import Change, Collection
from support import wait_until
from shoal.sql import engine
from shoal.sql.engine import execute
from shoal.sql.planner import QueryError, prepare

META = {"table": "t", "event": "INSERT", "sequence_number": None}
VOCABULARY = ["alpha", "Beta", "gamma", "delta", "ÉPSILON", "zeta", "eta", "theta", "iota", "kappa"]


def words_of(value) -> list[str]:
    """The reference tokenizer: runs of letters and digits, lowercased."""
    return re.findall(r"[^\W_]+", value.lower()) if isinstance(value, str) else []


def field_words(doc: dict, path: tuple[str, ...]) -> list[list[str]]:
    """Each string the field holds (one, or each string of an array), as its words."""
    value = doc
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    values = value if isinstance(value, list) else [value]
    return [words_of(v) for v in values if isinstance(v, str)]


def matches(doc: dict, path: tuple[str, ...], text: str, phrase: bool) -> bool:
    wanted = words_of(text)
    if not wanted:
        return False
    for words in field_words(doc, path):
        if phrase:
            if any(words[i : i + len(wanted)] == wanted for i in range(len(words))):
                return True
        elif set(wanted) <= {w for ws in field_words(doc, path) for w in ws}:
            return True
    return False


def random_text(rng: random.Random, n: int) -> str:
    return rng.choice([" ", ", ", "-", "_ "]).join(rng.choice(VOCABULARY) for _ in range(n))


def random_doc(rng: random.Random) -> dict:
    doc = {"title": random_text(rng, rng.randint(1, 4)), "n": rng.randint(0, 9)}
    if rng.random() < 0.7:
        doc["body"] = random_text(rng, rng.randint(0, 12)) if rng.random() < 0.9 else rng.randint(0, 5)
    if rng.random() < 0.6:
        doc["meta"] = {"tag": random_text(rng, 2)}
    if rng.random() < 0.6:
        doc["tags"] = [rng.choice(VOCABULARY) for _ in range(rng.randint(0, 3))]
    return doc


@pytest.fixture
async def corpus(tmp_path):
    collection = Collection.open(tmp_path)
    docs: dict[str, dict] = {}

    def query(sql: str) -> list[dict]:
        prepared = prepare(sql, [], lambda ws, name: collection.snapshot().query_schema)
        return execute(prepared, lambda ws, name: collection.snapshot(), 100_000, 30).table.to_pylist()

    yield collection, docs, query
    await collection.close()


async def test_random_searches_equal_brute_force(corpus):
    collection, docs, query = corpus
    rng = random.Random(20261123)
    fields = [("title",), ("body",), ("meta", "tag"), ("tags",)]
    for _round in range(12):
        changes = []
        for _ in range(rng.randint(20, 120)):
            doc_id = f"d{rng.randint(0, 300)}"
            if doc_id in docs and rng.random() < 0.3:
                changes.append(Change.of(doc_id, None, 0, META))
                docs.pop(doc_id)
            else:
                docs[doc_id] = random_doc(rng)
                changes.append(Change.of(doc_id, docs[doc_id], 0, META))
        await collection.apply(changes, None)
        for _query in range(25):
            predicates = []
            for _ in range(rng.randint(1, 2)):
                path = rng.choice(fields)
                phrase = path != ("tags",) and rng.random() < 0.4
                predicates.append((path, random_text(rng, rng.randint(1, 2)), phrase))
            calls = ", ".join(
                f"{'PHRASE' if phrase else 'CONTAINS'}({'.'.join(path)}, '{text}')" for path, text, phrase in predicates
            )
            below = rng.randint(0, 10)
            expected = sorted(
                doc_id
                for doc_id, doc in docs.items()
                if all(matches(doc, *p) for p in predicates) and doc["n"] < below
            )
            rows = query(f"SELECT _id FROM commons.docs WHERE SEARCH({calls}) AND n < {below}")
            assert sorted(r["_id"] for r in rows) == expected, calls


async def test_top_k_by_score(corpus):
    collection, docs, query = corpus
    rng = random.Random(7)
    for i in range(400):
        docs[f"d{i}"] = random_doc(rng)
    await collection.apply([Change.of(k, v, 0, META) for k, v in docs.items()], None)
    everything = query("SELECT _id, SCORE() AS s FROM docs WHERE SEARCH(CONTAINS(title, 'alpha'))")
    best = query("SELECT _id, SCORE() AS s FROM docs WHERE SEARCH(CONTAINS(title, 'alpha')) ORDER BY SCORE() DESC LIMIT 10")
    assert sorted(r["_id"] for r in everything) == sorted(k for k, d in docs.items() if "alpha" in words_of(d["title"]))
    assert len(best) == 10
    scores = [r["s"] for r in best]
    assert scores == sorted(scores, reverse=True)
    assert scores[-1] >= sorted((r["s"] for r in everything), reverse=True)[9]


@pytest.mark.parametrize(
    ("tail", "wanted"),
    [
        ("LIMIT 0", 0),
        ("LIMIT 0 OFFSET 2", 0),
        ("LIMIT 3 OFFSET 2", 3),
        ("LIMIT 1000000000000", None),  # tantivy would reserve room for a trillion hits: abort
        ("LIMIT 9223372036854775807", None),
        ("LIMIT 9223372036854775807 OFFSET 1", "all but one"),
    ],
)
async def test_a_top_k_search_takes_any_limit(corpus, tail, wanted):
    """The k of `ORDER BY SCORE() DESC LIMIT k` sizes tantivy's top-k heap: a k beyond the
    documents gets them all, 0 gets none, in an answer from the matches or from DataFusion."""
    collection, docs, query = corpus
    for i in range(20):
        docs[f"d{i}"] = {"title": "alpha " * (1 + i % 4), "n": i}
    await collection.apply([Change.of(k, v, 0, META) for k, v in docs.items()], None)
    best = "SELECT _id, SCORE() AS s FROM docs WHERE SEARCH(CONTAINS(title, 'alpha')) ORDER BY SCORE() DESC " + tail
    expected = {None: 20, "all but one": 19}.get(wanted, wanted)
    assert len(query(best)) == expected
    assert query(f"SELECT COUNT(*) AS c FROM ({best}) t") == [{"c": expected}]


@pytest.mark.parametrize("limit", ["-1", "1.5", "99999999999999999999"])
async def test_a_top_k_search_refuses_a_bad_limit(corpus, limit):
    """A LIMIT DataFusion does not take is a query error whether the matches or DataFusion
    answer (`LIMIT -1` was read as 1), never a crash."""
    collection, _, query = corpus
    await collection.apply([Change.of("a", {"title": "alpha"}, 0, META)], None)
    best = f"SELECT _id FROM docs WHERE SEARCH(CONTAINS(title, 'alpha')) ORDER BY SCORE() DESC LIMIT {limit}"
    for sql in (best, f"SELECT COUNT(*) AS c FROM ({best}) t"):
        with pytest.raises(QueryError, match="LIMIT"):
            query(sql)


async def test_search_sees_updates_and_deletes_at_once(corpus):
    collection, _, query = corpus
    await collection.apply([Change.of("a", {"title": "red fox"}, 0, META), Change.of("b", {"title": "red hen"}, 0, META)], None)
    await collection.apply([Change.of("a", {"title": "blue fox"}, 0, META), Change.of("b", None, 0, META)], None)
    assert query("SELECT _id FROM docs WHERE SEARCH(CONTAINS(title, 'red'))") == []
    assert query("SELECT _id, title FROM docs WHERE SEARCH(CONTAINS(title, 'fox'))") == [{"_id": "a", "title": "blue fox"}]


async def test_select_star_is_the_document_without_score(corpus):
    collection, _, query = corpus
    await collection.apply([Change.of("a", {"title": "red fox", "n": 1}, 0, META)], None)
    (row,) = query("SELECT * FROM docs WHERE SEARCH(CONTAINS(title, 'fox'))")
    assert "_score" not in row and row["title"] == "red fox" and row["n"] == 1


async def test_index_rebuilt_from_segments_after_loss(tmp_path):
    collection = Collection.open(tmp_path)
    await collection.apply([Change.of("a", {"title": "red fox", "tags": ["wild"]}, 0, META)], None)
    await collection.close()
    for path in sorted((tmp_path / "text").iterdir(), reverse=True):
        if path.is_file():
            path.unlink()
    collection = Collection.open(tmp_path)
    try:
        prepared = prepare("SELECT _id FROM docs WHERE SEARCH(CONTAINS(tags, 'wild'))", [], lambda *_: collection.snapshot().query_schema)
        assert execute(prepared, lambda *_: collection.snapshot(), 10, 5).table.to_pylist() == [{"_id": "a"}]
    finally:
        await collection.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT _id FROM docs WHERE SEARCH(CONTAINS(title, 'x')) OR n = 1",
        "SELECT _id FROM docs WHERE SEARCH(title)",
        "SELECT _id FROM docs WHERE SEARCH(CONTAINS(title, 1))",
        "SELECT _id FROM docs a JOIN docs b ON a._id = b._id WHERE SEARCH(CONTAINS(a.title, 'x'))",
        "SELECT SCORE() FROM docs",
    ],
)
async def test_misused_search_is_a_clear_error(corpus, sql):
    collection, _, query = corpus
    await collection.apply([Change.of("a", {"title": "red fox", "n": 1}, 0, META)], None)
    with pytest.raises(QueryError):
        query(sql)


async def test_search_over_http_follows_the_stream(shoal, ddb, table_name, moto_server):
    """Through the API: a live collection's search answers change with the table's writes."""
    ddb.create_table(table_name)
    ddb.batch_write(table_name, [
        {"pk": {"S": "a"}, "title": {"S": "Red fox jumps"}, "address": {"M": {"city": {"S": "New York"}}}},
        {"pk": {"S": "b"}, "title": {"S": "A red hen"}, "address": {"M": {"city": {"S": "Oslo"}}}},
    ])
    await shoal.create_integration("local", moto_server)
    await shoal.create_collection("docs", "local", table_name)
    await shoal.wait_ready("docs")
    search = "SELECT _id FROM commons.docs WHERE SEARCH(CONTAINS(title, :words)) ORDER BY SCORE() DESC, _id"
    assert await shoal.query(search, {"words": "red"}) == [{"_id": "a"}, {"_id": "b"}]
    assert await shoal.query(
        "SELECT _id FROM commons.docs WHERE SEARCH(CONTAINS(address.city, 'york'), PHRASE(title, 'red fox'))"
    ) == [{"_id": "a"}]
    ddb.client.put_item(TableName=table_name, Item={"pk": {"S": "a"}, "title": {"S": "Blue fox"}})

    async def moved():
        return await shoal.query(search, {"words": "red"}) == [{"_id": "b"}]

    await wait_until(moved, timeout=10)
    status, body = await shoal.api("POST", "/v1/orgs/self/queries", {"sql": {"query": "SELECT SCORE() FROM commons.docs"}})
    assert status == 400 and "SEARCH" in body["message"], body


@pytest.mark.parametrize(
    "where",
    ["_id = 'd7'", "'d7' = _id", "docs._id = 'd7' AND n >= 0", "_id = 'd7' AND n < 0", "_id = 'nope'", "_id = 'd3'"],
)
async def test_point_lookups_by_id_equal_a_filter(corpus, where):
    """`_id = 'x'` is answered from the index; the answer must be what a filter gives."""
    collection, docs, query = corpus
    rng = random.Random(3)
    changes = [Change.of(f"d{i}", random_doc(rng), 0, META) for i in range(20)]
    await collection.apply(changes, None)
    await collection.apply([Change.of("d3", None, 0, META), Change.of("d7", {"title": "new", "n": 1}, 0, META)], None)
    looked_up = query(f"SELECT _id, title FROM docs WHERE {where}")
    # The same condition where the planner cannot use the index (a CTE) is a plain filter.
    filtered = query(f"WITH plain AS (SELECT * FROM commons.docs) SELECT _id, title FROM plain AS docs WHERE {where}")
    assert looked_up == filtered
    schema_of = lambda *_: collection.snapshot().query_schema  # noqa: E731
    assert prepare(f"SELECT _id FROM docs WHERE {where}", [], schema_of).searches
    assert not prepare(f"WITH plain AS (SELECT * FROM docs) SELECT _id FROM plain AS docs WHERE {where}", [], schema_of).searches


@pytest.mark.parametrize(
    "select",
    [
        "SELECT _id, SCORE() AS s FROM docs WHERE SEARCH(CONTAINS(title, 'alpha')) ORDER BY SCORE() DESC LIMIT 7",
        "SELECT * FROM docs WHERE SEARCH(CONTAINS(title, 'alpha beta')) ORDER BY SCORE() DESC LIMIT 5",
        "SELECT d._id, d.body, SCORE() FROM commons.docs AS d WHERE SEARCH(PHRASE(body, 'gamma delta')) ORDER BY SCORE() DESC LIMIT 50",
        "SELECT title AS t, n FROM docs WHERE SEARCH(CONTAINS(tags, 'eta'))",
        "SELECT _id, n FROM docs WHERE SEARCH(CONTAINS(meta.tag, 'iota')) LIMIT 3",
        "SELECT * FROM docs WHERE _id = 'd17'",
    ],
)
async def test_searches_answered_without_datafusion_equal_its_answers(corpus, select, monkeypatch):
    """Listing a search's matches skips DataFusion (`DirectSearch`); the answer must be the same."""
    collection, _, _ = corpus
    rng = random.Random(11)

    def doc() -> dict:  # words repeated a random number of times, so that scores differ
        return {**random_doc(rng), "title": " ".join(rng.choice(VOCABULARY[:3]) for _ in range(rng.randint(1, 12)))}

    for first in range(0, 300, 100):  # several segments: matches come segment by segment
        await collection.apply([Change.of(f"d{i}", doc(), 0, META) for i in range(first, first + 100)], None)
    prepared = prepare(select, [], lambda *_: collection.snapshot().query_schema)
    via_datafusion = dataclasses.replace(prepared, direct=None)
    expected = execute(via_datafusion, lambda *_: collection.snapshot(), 100_000, 30).table
    with monkeypatch.context() as patched:
        patched.setattr(engine, "_session", lambda *_: pytest.fail("DataFusion was asked"))
        direct = execute(prepared, lambda *_: collection.snapshot(), 100_000, 30).table
    assert prepared.direct is not None
    assert direct.schema == expected.schema and direct.num_rows == expected.num_rows > 0
    key = lambda row: orjson.dumps(row, option=orjson.OPT_SORT_KEYS, default=str)  # noqa: E731
    if "LIMIT" not in select:
        assert sorted(map(key, direct.to_pylist())) == sorted(map(key, expected.to_pylist()))
    score = next((name for name in direct.column_names if name in ("s", "SCORE()")), None)
    if score is not None:  # the same scores best first; the same rows, but for ties at the cut
        scores = direct.column(score).to_pylist()
        assert scores == expected.column(score).to_pylist() == sorted(scores, reverse=True)
        above_cut = lambda table: sorted(key(r) for r in table.to_pylist() if r[score] > scores[-1])  # noqa: E731
        assert above_cut(direct) == above_cut(expected)


@pytest.mark.parametrize(
    ("select", "read"),
    [
        ("SELECT COUNT(*) AS c FROM docs WHERE SEARCH(CONTAINS(title, 'alpha'))", ("_id",)),
        ("SELECT t.title, t.n FROM (SELECT * FROM docs WHERE SEARCH(CONTAINS(title, 'alpha'))) t ORDER BY t.n, t.title", None),
        ("SELECT meta.tag AS tag, COUNT(*) AS c FROM docs WHERE SEARCH(CONTAINS(body, 'beta')) GROUP BY meta.tag ORDER BY 1", ("_id", "meta")),
        ("SELECT typeof(body) AS t, COUNT(*) AS c FROM docs WHERE SEARCH(CONTAINS(title, 'gamma')) GROUP BY 1 ORDER BY 1", ("_id", "body")),
        ("WITH m AS (SELECT d._id, d.body FROM docs d WHERE SEARCH(CONTAINS(title, 'beta')) AND n > 3) SELECT body FROM m ORDER BY _id", ("_id", "n", "body")),
        ("SELECT _id, tags FROM docs WHERE SEARCH(CONTAINS(title, 'alpha')) ORDER BY SCORE() DESC LIMIT 5", ("_id", "tags")),
        ("SELECT SUM(n) AS s FROM docs WHERE meta.tag = 'alpha beta'", ("_id", "n", "meta")),
    ],
)
async def test_matches_carry_only_the_fields_the_query_reads(corpus, select, read, monkeypatch):
    """A search hands on only the fields its query names (`Search.columns`; `read` None: all of
    them); the answer is the one it gives with every field."""
    collection, _, _ = corpus
    rng = random.Random(13)
    for first in range(0, 300, 100):
        await collection.apply([Change.of(f"d{i}", random_doc(rng), 0, META) for i in range(first, first + 100)], None)
    monkeypatch.setattr(engine, "_index_is_cheaper", lambda *_: True)
    prepared = prepare(select, [], lambda *_: collection.snapshot().query_schema)
    search = prepared.searches[0]
    every = collection.snapshot().query_schema.names
    assert set(search.columns or every) == set(read or every)
    every_field = dataclasses.replace(prepared, searches=(dataclasses.replace(search, columns=None),))
    pruned, whole = (execute(p, lambda *_: collection.snapshot(), 100_000, 30).table for p in (prepared, every_field))
    assert pruned.num_rows > 0 and pruned.to_pylist() == whole.to_pylist()


async def test_a_direct_search_of_an_unknown_column_is_datafusions_error(corpus):
    collection, _, query = corpus
    await collection.apply([Change.of("a", {"title": "alpha"}, 0, META)], None)
    with pytest.raises(QueryError, match="missing"):
        query("SELECT _id, missing FROM docs WHERE SEARCH(CONTAINS(title, 'alpha'))")


async def test_a_cached_plan_follows_a_changed_schema(corpus):
    """Plans are reused (`prepare` caches them) only while the schemas they read are unchanged:
    `typeof(n)` is a constant over an int field, per value over a mixed one."""
    collection, _, query = corpus
    await collection.apply([Change.of("a", {"n": 1}, 0, META)], None)
    assert query("SELECT _id, typeof(n) AS t FROM docs") == [{"_id": "a", "t": "int"}]
    await collection.apply([Change.of("b", {"n": "1"}, 0, META)], None)
    assert sorted(map(tuple, map(dict.values, query("SELECT _id, typeof(n) AS t FROM docs")))) == [("a", "int"), ("b", "string")]


async def test_equality_filters_from_the_index_equal_a_scan(corpus, monkeypatch):
    """`field = literal` may be answered from index candidates (`Search.optional`); with the
    index always used and never used, random filters over mixed-type fields agree."""
    collection, _, query = corpus
    rng = random.Random(5)
    long_word = "x" * 45
    strings = ["alpha", "Alpha", "alpha beta", "beta alpha", "alpha-beta", "", "  ", long_word, f"alpha {long_word}", f"alpha {long_word} beta", "3"]
    values = [*strings, 3, 3.0, 3.5, -2, 0, True, None, Decimal("3"), 10**17]
    docs = {}
    for first in range(0, 240, 80):
        changes = []
        for i in range(first, first + 80):
            doc = {"v": rng.choice(values), "meta": {"tag": rng.choice(strings)}, "n": rng.choice([1, 2, 2.5, 3])}
            docs[f"d{i}"] = {k: v for k, v in doc.items() if v is not None}
            changes.append(Change.of(f"d{i}", docs[f"d{i}"], 0, META))
        await collection.apply(changes, None)
    literals = ["'alpha'", "'Alpha'", "'alpha beta'", "'alpha-beta'", "''", f"'{long_word}'", f"'alpha {long_word}'",
                f"'alpha {long_word} beta'", "'3'", "3", "3.0", "3.5", "-2", "0", "2.5", "2", str(10**17)]
    for literal in literals:
        for field in ("v", "meta.tag", "n"):
            sql = f"SELECT _id FROM docs WHERE {field} = {literal} AND _id <> 'none'"
            answers = []
            for use_index in (True, False):  # always the candidates; never
                monkeypatch.setattr(engine, "_index_is_cheaper", lambda *_, use_index=use_index: use_index)
                answers.append(sorted(row["_id"] for row in query(sql)))
            assert answers[0] == answers[1], sql
    plan = prepare("SELECT _id FROM docs WHERE meta.tag = 'alpha beta'", [], lambda *_: collection.snapshot().query_schema)
    assert plan.searches and plan.searches[0].optional
    assert query("SELECT _id FROM docs WHERE meta.tag = 'alpha beta' ORDER BY _id") == [
        {"_id": k} for k in sorted(docs) if docs[k]["meta"]["tag"] == "alpha beta"
    ]


async def test_numbers_are_found_by_value_however_their_text_was_written(corpus, monkeypatch):
    """The local endpoint hands numbers back as they were written (`12.50`, `1E+2`); the
    index must find each by its value, as a scan does."""
    collection, _, query = corpus
    texts = {"a": "12.50", "b": "1E+2", "c": "-0.0", "d": "007", "e": "1.25E1", "f": "100.000", "g": ".5"}
    items = {k: orjson.dumps({"v": {"N": t}, "s": {"NS": [t, "5"]}}) for k, t in texts.items()}
    await collection.apply([Change(k, item, 0, META) for k, item in items.items()], None)
    for literal, expected in (("12.5", ["a", "e"]), ("100", ["b", "f"]), ("0", ["c"]), ("7", ["d"]), ("0.5", ["g"])):
        for use_index in (True, False):
            monkeypatch.setattr(engine, "_index_is_cheaper", lambda *_, use_index=use_index: use_index)
            assert sorted(r["_id"] for r in query(f"SELECT _id FROM docs WHERE v = {literal}")) == expected, (literal, use_index)
    assert query("SELECT v, s FROM docs WHERE _id = 'f'") == [{"v": 100, "s": [100, 5]}]


@pytest.mark.parametrize(
    ("select", "plain"),
    [
        ("SELECT x.* EXCEPT (body) FROM docs x WHERE n = 3", "SELECT x.* EXCEPT (body) FROM plain x WHERE n = 3"),
        ("SELECT * REPLACE (upper(title) AS title) FROM docs WHERE n = 3", "SELECT * REPLACE (upper(title) AS title) FROM plain WHERE n = 3"),
        ("SELECT * EXCLUDE (body, meta) FROM docs WHERE SEARCH(CONTAINS(title, 'alpha'))",
         "SELECT * EXCLUDE (body, meta) FROM plain WHERE _id IN (SELECT _id FROM docs WHERE SEARCH(CONTAINS(title, 'alpha')))"),
    ],
)
async def test_stars_with_except_and_replace_over_the_index_equal_a_scan(corpus, select, plain, monkeypatch):
    """A star the planner expands over a search's matches keeps its EXCEPT and REPLACE."""
    collection, _, query = corpus
    rng = random.Random(17)
    await collection.apply([Change.of(f"d{i}", random_doc(rng), 0, META) for i in range(200)], None)
    monkeypatch.setattr(engine, "_index_is_cheaper", lambda *_: True)
    assert prepare(select, [], lambda *_: collection.snapshot().query_schema).searches
    got = query(f"{select} ORDER BY _id")
    assert got and got == query(f"WITH plain AS (SELECT * FROM commons.docs) {plain} ORDER BY _id")
