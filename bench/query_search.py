"""Query and search latency through Shoal's HTTP API, beside the engines called directly.

    python bench/query_search.py            # 1,000,000 documents (the published figures)
    python bench/query_search.py --quick    # 100,000 documents, fewer repetitions
    python bench/query_search.py --analytics-only --docs 200000   # to iterate on the SQL engine

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
     API vs DataFusion in-process over the same Arrow batches, and vs DuckDB in-process over
     a copy of them (a peer a user might pick instead; same SQL, its own table).
3. With `--json PATH`, writes the figures, every latency sample, the apply rate per batch of
   50,000, the bench's peak RSS and the collection's size on disk vs in Arrow to PATH.
Figures vary ±30% between runs on a shared 2-core machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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
import duckdb
import numpy as np
import orjson
import pyarrow as pa
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
    # Selective filters: through the API the text index gives the candidates when that costs
    # less than a scan (0.01% and 0.25% of the documents here); DataFusion direct scans.
    "selective filter (string)": "SELECT COUNT(*) AS n, SUM(amount) AS s FROM commons.bench WHERE address.zip = '0042'",
    "selective filter (number)": "SELECT _id, amount FROM commons.bench WHERE quantity = 7 AND status = 'paid'",
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
            # Odd cents: never a whole number, which DynamoDB's number rule would make an int
            # (a mixed int/float column, which the in-process DataFusion baseline cannot average).
            "amount": (int(amounts[i] * 100) | 1) / 100,
            "quantity": int(quantities[i]),
            "status": ("paid", "shipped", "pending", "cancelled")[i % 4],
            "address": {"city": CITIES[(start + i) % len(CITIES)], "zip": f"{(start + i) % 9999:04d}"},
            "tags": w[:2],
        }
        changes.append(Change.of(f"d{start + i}", doc, 0, META))
    return changes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def api(session: aiohttp.ClientSession, base: str, method: str, path: str, body=None) -> dict:
    async with session.request(method, base + path, json=body, headers={"Authorization": f"ApiKey {KEY}"}) as response:
        answer = await response.json(loads=orjson.loads)  # the client's parser is not what is measured
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


async def measure_beside(session, base: str, sql: str, baseline, repeat: int) -> tuple[list[float], list[float], list[float]]:
    """The query through the API and its in-process `baseline`, taken in turns, so that both
    see the same load on a shared machine; also the server's own time in its engine
    (`stats.elapsed_time_ms`: the rest is HTTP, planning and rendering JSON)."""
    api_ms, baseline_ms, engine_ms = [], [], []
    for _ in range(repeat):
        started = time.perf_counter()
        answer = await api(session, base, "POST", "/v1/orgs/self/queries", {"sql": {"query": sql}})
        api_ms.append((time.perf_counter() - started) * 1000)
        engine_ms.append(answer["stats"]["elapsed_time_ms"])
        baseline_ms += measure(baseline, 1)
    return api_ms, baseline_ms, engine_ms


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
        query = tantivy.Query.phrase_query(schema, "doc.body.S", words)
    else:
        query = tantivy.Query.boolean_query([(tantivy.Occur.Must, tantivy.Query.term_query(schema, "doc.body.S", w)) for w in words])

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


def duckdb_copy(batches) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB database holding a copy of the collection's rows as table `bench`."""
    connection = duckdb.connect()
    connection.execute("SET threads = 2")
    connection.register("arrow_rows", pa.Table.from_batches(batches))
    connection.execute("CREATE TABLE bench AS SELECT * FROM arrow_rows")
    connection.unregister("arrow_rows")
    return connection


def duckdb_direct(connection: duckdb.DuckDBPyConnection, sql: str):
    local = sql.replace("commons.bench", "bench")
    return lambda: connection.sql(local).to_arrow_table()


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k documents, fewer repetitions")
    parser.add_argument("--docs", type=int, help="number of documents (default 1,000,000; 100,000 with --quick)")
    parser.add_argument("--analytics-only", action="store_true", help="skip the searches and the DuckDB peer")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--json", type=Path, help="also write the figures and latency samples to this file")
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
    apply_rates = []  # documents/s of each batch: how the cost grows with the collection
    for start in range(0, total, 50_000):
        batch = documents(start, min(50_000, total - start), rng)
        started = time.perf_counter()
        await collection.apply(batch, None)
        apply_rates.append(len(batch) / (time.perf_counter() - started))
        apply_seconds += len(batch) / apply_rates[-1]
    snapshot = collection.snapshot()
    batches = snapshot.batches()
    await collection.close()
    arrow_bytes, disk_bytes = sum(b.nbytes for b in batches), directory_bytes(storage)
    duck = None if args.analytics_only else duckdb_copy(batches)
    print(f"apply into Arrow + tantivy: {total / apply_seconds:,.0f} documents/s ({apply_seconds:.1f} s)")

    index = tantivy.Index.open(str(storage / "text"))
    server = start_server(data_dir, port, log)
    rows, samples, duck_rows = [], {}, []
    try:
        async with aiohttp.ClientSession() as session:
            for name, sql in {} if args.analytics_only else SEARCHES.items():
                await measure_api(session, base, sql, 3)  # warm caches
                api_ms = await measure_api(session, base, sql, repeat)
                direct_ms = measure(tantivy_top10(index, sql), repeat)
                rows.append(("search: " + name, summary(api_ms), summary(direct_ms), "tantivy direct"))
                samples["search: " + name] = {"api_ms": api_ms, "tantivy_ms": direct_ms}
            for name, sql in ANALYTICS.items():
                await measure_api(session, base, sql, 3)
                api_ms, direct_ms, engine_ms = await measure_beside(session, base, sql, datafusion_direct(batches, sql), repeat)
                rows.append((name, summary(api_ms), summary(direct_ms), "DataFusion direct"))
                samples[name] = {"api_ms": api_ms, "datafusion_ms": direct_ms, "engine_ms": engine_ms}
                if args.analytics_only:
                    continue
                measure(duckdb_direct(duck, sql), 3)
                duck_ms = measure(duckdb_direct(duck, sql), repeat)
                duck_rows.append((name, summary(api_ms), summary(duck_ms), "DuckDB (copy)"))
                samples[name]["duckdb_ms"] = duck_ms
    finally:
        server.terminate()
        server.wait(30)
    print(f"\n{'query':28} {'API p50':>9} {'API p99':>9} {'base p50':>9} {'base p99':>9} {'ratio':>6}  baseline")
    for name, (p50, p99), (b50, b99), baseline in rows:
        print(f"{name:28} {p50:8.2f}ms {p99:8.2f}ms {b50:8.2f}ms {b99:8.2f}ms {p50 / b50:5.2f}x  {baseline}")
    for name, (p50, p99), (b50, b99), baseline in duck_rows:
        print(f"{name:28} {p50:8.2f}ms {p99:8.2f}ms {b50:8.2f}ms {b99:8.2f}ms {p50 / b50:5.2f}x  {baseline}")
    print("\nof which in the server's engine (p50; the rest is HTTP, planning, JSON):")
    for name in ANALYTICS:
        print(f"{name:28} {statistics.median(samples[name]['engine_ms']):8.2f}ms")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\nArrow {arrow_bytes / 2**20:,.0f} MiB, on disk {disk_bytes / 2**20:,.0f} MiB ({disk_bytes / arrow_bytes:.2f}x); "
          f"this bench's peak RSS {peak_rss / 2**20:,.0f} MiB (it holds the documents, the Arrow batches and the DuckDB copy)")
    if args.json:
        args.json.write_text(json.dumps({
            "documents": total, "repeat": repeat, "apply_docs_per_s": total / apply_seconds,
            "apply_docs_per_s_by_batch": apply_rates, "arrow_bytes": arrow_bytes, "disk_bytes": disk_bytes,
            "bench_peak_rss_bytes": peak_rss,
            "queries": [{"query": name, "baseline": baseline, "api_p50_ms": p50, "api_p99_ms": p99,
                         "baseline_p50_ms": b50, "baseline_p99_ms": b99, "ratio_p50": p50 / b50}
                        for name, (p50, p99), (b50, b99), baseline in rows + duck_rows],
            "samples_ms": samples,
        }))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
