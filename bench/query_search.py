"""Query and search latency through Shoal's HTTP API, beside the engines called directly.

    python bench/query_search.py            # 1,000,000 documents (the published figures)
    python bench/query_search.py --quick    # 100,000 documents, fewer repetitions

What it does, in one run on one data set:
1. Builds a collection of synthetic documents (Zipf-distributed words in `title`/`body`,
   numbers, a nested `address`, a `tags` array) by calling `Collection.apply` directly:
   this bench measures queries, so it bypasses DynamoDB (the collection is created through
   the API first, with an integration whose endpoint does not answer, so its ingest never
   adds anything). It prints the apply throughput (documents/s into Arrow + tantivy).
2. Starts `shoal serve` on that data directory and measures, per query, the median, p99
   and the ratio against its baseline measured in the same run:
   - search (term, phrase, two words; top 10 by score) through `POST /v1/orgs/self/queries`
     vs tantivy searching the same index in-process (top 10 hits and their row ids);
   - analytics (group-by, filter + sum, top-k, point lookup by `_id`, a join) through the
     API vs DataFusion in-process over the same Arrow batches.
Figures vary ±30% between runs on a shared 2-core machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import datafusion
import numpy as np
import tantivy

from shoal.index.collection import Change, Collection
from shoal.index.textindex import WORDS

KEY = "bench-key-0123456789abcdef"
VOCABULARY = [f"w{i}" for i in range(20_000)]
CITIES = ["Oslo", "Rome", "Lima", "Kyiv", "Pune", "Cork", "Bern", "Nice"]
META = {"table": "bench", "event": "SCAN", "sequence_number": None}

SEARCHES = {
    "term (common word)": "SELECT _id, SCORE() AS s FROM commons.bench WHERE SEARCH(CONTAINS(body, 'w3')) ORDER BY SCORE() DESC LIMIT 10",
    "term (rare word)": "SELECT _id, SCORE() AS s FROM commons.bench WHERE SEARCH(CONTAINS(body, 'w4000')) ORDER BY SCORE() DESC LIMIT 10",
    "phrase": "SELECT _id, SCORE() AS s FROM commons.bench WHERE SEARCH(PHRASE(body, 'w1 w2')) ORDER BY SCORE() DESC LIMIT 10",
    "two words": "SELECT _id, SCORE() AS s FROM commons.bench WHERE SEARCH(CONTAINS(body, 'w5 w40')) ORDER BY SCORE() DESC LIMIT 10",
}
ANALYTICS = {
    "group-by": "SELECT address.city AS city, COUNT(*) AS n, AVG(amount) AS a FROM commons.bench GROUP BY address.city",
    "filter + sum": "SELECT SUM(amount) AS s FROM commons.bench WHERE quantity > 50 AND status = 'paid'",
    "top-k": "SELECT _id, amount FROM commons.bench ORDER BY amount DESC LIMIT 10",
    "point lookup by _id": "SELECT * FROM commons.bench WHERE _id = 'd123457'",
    "join": "SELECT a.status, COUNT(*) AS n FROM commons.bench a JOIN (SELECT _id FROM commons.bench WHERE quantity = 7) b ON a._id = b._id GROUP BY a.status",
}


def zipf_words(rng: np.random.Generator, count: int) -> list[str]:
    ranks = np.minimum(rng.zipf(1.2, count), len(VOCABULARY)) - 1
    return [VOCABULARY[r] for r in ranks]


def documents(start: int, count: int, rng: np.random.Generator) -> list[Change]:
    words = zipf_words(rng, count * 24)
    amounts = rng.random(count) * 500
    quantities = rng.integers(0, 100, count)
    changes = []
    for i in range(count):
        w = words[i * 24 : (i + 1) * 24]
        doc = {
            "title": " ".join(w[:4]),
            "body": " ".join(w[4:]),
            "amount": round(float(amounts[i]), 2),
            "quantity": int(quantities[i]),
            "status": ("paid", "shipped", "pending", "cancelled")[i % 4],
            "address": {"city": CITIES[(start + i) % len(CITIES)], "zip": f"{(start + i) % 9999:04d}"},
            "tags": w[:2],
        }
        changes.append(Change(f"d{start + i}", doc, 0, META))
    return changes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def api(session: aiohttp.ClientSession, base: str, method: str, path: str, body=None) -> dict:
    async with session.request(method, base + path, json=body, headers={"Authorization": f"ApiKey {KEY}"}) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {answer}")
        return answer


def start_server(data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "shoal.server.cli", "serve", "--port", str(port), "--data-dir", str(data_dir), "--api-key", KEY]
    server = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"shoal serve did not start; see {log}")


def summary(times_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(times_ms)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def measure_api(session, base: str, sql: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await api(session, base, "POST", "/v1/orgs/self/queries", {"sql": {"query": sql}})
        times.append((time.perf_counter() - started) * 1000)
    return times


def measure(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return times


def tantivy_top10(index: tantivy.Index, sql: str):
    """The same search straight on tantivy: parse what the SQL asks for, top 10, row ids."""
    schema = index.schema
    text = sql.split("'")[1]
    words = WORDS.analyze(text)
    if "PHRASE" in sql:
        query = tantivy.Query.phrase_query(schema, "doc.body", words)
    else:
        query = tantivy.Query.boolean_query([(tantivy.Occur.Must, tantivy.Query.term_query(schema, "doc.body", w)) for w in words])

    def run():
        searcher = index.searcher()
        hits = searcher.search(query, 10, count=False).hits
        return searcher.fast_field_values("_rowid", [address for _, address in hits])

    return run


def datafusion_direct(batches, sql: str):
    context = datafusion.SessionContext(datafusion.SessionConfig().with_target_partitions(2).set("datafusion.sql_parser.enable_ident_normalization", "false"))
    context.register_record_batches("bench", [batches])
    local = sql.replace("commons.bench", "bench")
    return lambda: context.sql(local).to_arrow_table()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k documents, fewer repetitions")
    parser.add_argument("--docs", type=int, help="number of documents (default 1,000,000; 100,000 with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()
    total = args.docs or (100_000 if args.quick else 1_000_000)
    repeat = 30 if args.quick else 100
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    data_dir, log = work / "data", work / "shoal.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"machine: {os.cpu_count()} cores; {total:,} documents; data in {work}")

    server = start_server(data_dir, port, log)
    async with aiohttp.ClientSession() as session:
        await api(session, base, "POST", "/v1/orgs/self/integrations", {
            "name": "nowhere", "dynamodb": {"aws_access_key": {"aws_access_key_id": "x", "aws_secret_access_key": "y"},
                                            "endpoint_url": "http://127.0.0.1:9"}})
        await api(session, base, "POST", "/v1/orgs/self/ws/commons/collections", {
            "name": "bench", "sources": [{"integration_name": "nowhere", "dynamodb": {"table_name": "bench", "aws_region": "us-east-1"}}]})
    server.terminate()
    server.wait(30)

    storage = data_dir / "collections" / "commons" / "bench" / "index"
    collection = Collection.open(storage)
    rng = np.random.default_rng(42)
    apply_seconds = 0.0
    for start in range(0, total, 50_000):
        batch = documents(start, min(50_000, total - start), rng)
        started = time.perf_counter()
        await collection.apply(batch, None)
        apply_seconds += time.perf_counter() - started
    snapshot = collection.snapshot()
    batches = snapshot.batches()
    await collection.close()
    print(f"apply into Arrow + tantivy: {total / apply_seconds:,.0f} documents/s ({apply_seconds:.1f} s)")

    index = tantivy.Index.open(str(storage / "text"))
    server = start_server(data_dir, port, log)
    rows = []
    try:
        async with aiohttp.ClientSession() as session:
            for name, sql in SEARCHES.items():
                await measure_api(session, base, sql, 3)  # warm caches
                through_api = summary(await measure_api(session, base, sql, repeat))
                direct = summary(measure(tantivy_top10(index, sql), repeat))
                rows.append(("search: " + name, through_api, direct, "tantivy direct"))
            for name, sql in ANALYTICS.items():
                await measure_api(session, base, sql, 3)
                through_api = summary(await measure_api(session, base, sql, repeat))
                direct = summary(measure(datafusion_direct(batches, sql), repeat))
                rows.append((name, through_api, direct, "DataFusion direct"))
    finally:
        server.terminate()
        server.wait(30)
    print(f"\n{'query':28} {'API p50':>9} {'API p99':>9} {'base p50':>9} {'base p99':>9} {'ratio':>6}  baseline")
    for name, (p50, p99), (b50, b99), baseline in rows:
        print(f"{name:28} {p50:8.2f}ms {p99:8.2f}ms {b50:8.2f}ms {b99:8.2f}ms {p50 / b50:5.2f}x  {baseline}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
