"""Full-text search from SQL: tantivy's answers must equal a brute-force evaluation.

A seeded random corpus (a small vocabulary, so words collide) is searched with random
CONTAINS / PHRASE predicates, alone or with other SQL conditions, between random updates
and deletes; each answer is compared with what plain Python finds in the same documents.
"""

from __future__ import annotations

import random
import re

import pytest

from shoal.index.collection import Change, Collection
from support import wait_until
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
                changes.append(Change(doc_id, None, 0, META))
                docs.pop(doc_id)
            else:
                docs[doc_id] = random_doc(rng)
                changes.append(Change(doc_id, docs[doc_id], 0, META))
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
    await collection.apply([Change(k, v, 0, META) for k, v in docs.items()], None)
    everything = query("SELECT _id, SCORE() AS s FROM docs WHERE SEARCH(CONTAINS(title, 'alpha'))")
    best = query("SELECT _id, SCORE() AS s FROM docs WHERE SEARCH(CONTAINS(title, 'alpha')) ORDER BY SCORE() DESC LIMIT 10")
    assert sorted(r["_id"] for r in everything) == sorted(k for k, d in docs.items() if "alpha" in words_of(d["title"]))
    assert len(best) == 10
    scores = [r["s"] for r in best]
    assert scores == sorted(scores, reverse=True)
    assert scores[-1] >= sorted((r["s"] for r in everything), reverse=True)[9]


async def test_search_sees_updates_and_deletes_at_once(corpus):
    collection, _, query = corpus
    await collection.apply([Change("a", {"title": "red fox"}, 0, META), Change("b", {"title": "red hen"}, 0, META)], None)
    await collection.apply([Change("a", {"title": "blue fox"}, 0, META), Change("b", None, 0, META)], None)
    assert query("SELECT _id FROM docs WHERE SEARCH(CONTAINS(title, 'red'))") == []
    assert query("SELECT _id, title FROM docs WHERE SEARCH(CONTAINS(title, 'fox'))") == [{"_id": "a", "title": "blue fox"}]


async def test_select_star_is_the_document_without_score(corpus):
    collection, _, query = corpus
    await collection.apply([Change("a", {"title": "red fox", "n": 1}, 0, META)], None)
    (row,) = query("SELECT * FROM docs WHERE SEARCH(CONTAINS(title, 'fox'))")
    assert "_score" not in row and row["title"] == "red fox" and row["n"] == 1


async def test_index_rebuilt_from_segments_after_loss(tmp_path):
    collection = Collection.open(tmp_path)
    await collection.apply([Change("a", {"title": "red fox", "tags": ["wild"]}, 0, META)], None)
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
    await collection.apply([Change("a", {"title": "red fox", "n": 1}, 0, META)], None)
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
    changes = [Change(f"d{i}", random_doc(rng), 0, META) for i in range(20)]
    await collection.apply(changes, None)
    await collection.apply([Change("d3", None, 0, META), Change("d7", {"title": "new", "n": 1}, 0, META)], None)
    looked_up = query(f"SELECT _id, title FROM docs WHERE {where}")
    # The same condition where the planner cannot use the index (a CTE) is a plain filter.
    filtered = query(f"WITH plain AS (SELECT * FROM commons.docs) SELECT _id, title FROM plain AS docs WHERE {where}")
    assert looked_up == filtered
    schema_of = lambda *_: collection.snapshot().query_schema  # noqa: E731
    assert prepare(f"SELECT _id FROM docs WHERE {where}", [], schema_of).searches
    assert not prepare(f"WITH plain AS (SELECT * FROM docs) SELECT _id FROM plain AS docs WHERE {where}", [], schema_of).searches
