"""Soak: continuous writes to the source while clients query, on real parts (bounded in time).

A real moto endpoint, a real Shoal subprocess, real HTTP. A writer thread changes the table at
a steady rate (new items, overwrites, UpdateItems, deletes); every put or update carries a
global sequence number `seq`, so `SELECT MAX(seq)` tells how far the collection has caught up.
Meanwhile 4 aiohttp clients run a mix of queries (point lookup by `_id`, SEARCH top-10,
GROUP BY, filter + SUM, a paginated SELECT and its next page) for `LOAD_S` seconds.

Reported: p50/p99 latency per query kind, sync lag p99 (write acknowledged → its `seq` visible
to `MAX(seq)`, polled every 50 ms, so lag is over-estimated by at most the poll interval plus
one query), writes per second, errors, and the server's RSS over time.
Asserted: no error at all (every answer 2xx and COMPLETED); RSS flat; afterwards the collection
equals the table.

RSS criterion: samples every 0.5 s during the load; the first `WARMUP_S` are dropped (allocator
arenas, DataFusion and tantivy caches, the first compactions), and the median of the last third
of the rest must be within `RSS_GROWTH_LIMIT` of the median of its first third. Medians ignore a
single large query's transient peak; a leak (memory that grows with every write or query) moves
the whole last third. The data itself grows little (~1/4 of writes create items, ~200 bytes
each), far below what this limit allows.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from collections import defaultdict
from typing import Any

import aiohttp

from support import Dynamo, ShoalProcess, compare_collection, sql_params, wait_until

COLL = "soak"
FQ = f"commons.{COLL}"
INITIAL_ITEMS = 2000
WRITES_PER_S = 150
# moto serves writes from one Python process; with the queries sharing 2 cores it sustains
# ~70/s here. Below this the load is too light to mean anything.
MIN_WRITES_PER_S = 50
LOAD_S = 30.0
CLIENTS = 4
LAG_POLL_S = 0.05
RSS_SAMPLE_S = 0.5
WARMUP_S = 5.0
RSS_GROWTH_LIMIT = 1.3
GROUPS = [f"g{i}" for i in range(10)]
WORDS = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island", "juniper"]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def rss_is_flat(samples: list[tuple[float, int]], warmup_s: float, limit: float) -> tuple[bool, float, float]:
    """(flat?, first-third median, last-third median) of the samples after `warmup_s`."""
    start = samples[0][0]
    kept = [rss for at, rss in samples if at - start >= warmup_s]
    third = max(1, len(kept) // 3)
    first, last = statistics.median(kept[:third]), statistics.median(kept[-third:])
    return last <= first * limit, first, last


class Writer(threading.Thread):
    """Writes at a steady rate; `model` is the table's content, `acked[seq]` the ack time."""

    def __init__(self, endpoint: str, table: str, model: dict[str, dict], seed: int):
        super().__init__(name="soak-writer", daemon=True)
        self.ddb, self.table, self.model = Dynamo(endpoint), table, model
        self.rng = random.Random(seed)
        self.seq = 0
        self.next_key = len(model)
        self.acked: dict[int, float] = {}
        self.deletes = 0
        self.elapsed_s = 0.0
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def item(self, pk: str) -> dict:
        self.seq += 1
        words = " ".join(self.rng.sample(WORDS, 3))
        return {"pk": {"S": pk}, "seq": {"N": str(self.seq)}, "grp": {"S": self.rng.choice(GROUPS)},
                "amount": {"N": str(self.rng.randint(1, 1000))}, "text": {"S": words}}

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.25 or len(self.model) < 100:
            self.next_key += 1
            item = self.item(f"k{self.next_key:07d}")
            self.ddb.client.put_item(TableName=self.table, Item=item)
            self.model[item["pk"]["S"]] = item
        elif roll < 0.5:
            item = self.item(self.rng.choice(list(self.model)))
            self.ddb.client.put_item(TableName=self.table, Item=item)
            self.model[item["pk"]["S"]] = item
        elif roll < 0.8:
            pk = self.rng.choice(list(self.model))
            self.seq += 1
            response = self.ddb.client.update_item(
                TableName=self.table, Key={"pk": {"S": pk}}, ReturnValues="ALL_NEW",
                UpdateExpression="SET seq = :s, amount = amount + :one",
                ExpressionAttributeValues={":s": {"N": str(self.seq)}, ":one": {"N": "1"}})
            self.model[pk] = response["Attributes"]
        else:
            pk = self.rng.choice(list(self.model))
            self.ddb.client.delete_item(TableName=self.table, Key={"pk": {"S": pk}})
            del self.model[pk]
            self.deletes += 1
            return
        self.acked[self.seq] = time.monotonic()

    def run(self) -> None:
        started, n = time.monotonic(), 0
        try:
            while not self.stopping.is_set():
                self.step()
                n += 1
                delay = started + n / WRITES_PER_S - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        except BaseException as error:  # noqa: BLE001 - surfaced by finish()
            self.error = error
        self.elapsed_s = time.monotonic() - started

    def finish(self) -> None:
        self.stopping.set()
        self.join(30)
        assert not self.is_alive(), "the writer did not stop"
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error!r}") from self.error


async def test_soak_writes_and_mixed_queries(ddb: Dynamo, moto_server: str, table_name: str,
                                            shoal_unstarted: ShoalProcess):
    seed = random.SystemRandom().randrange(1, 10**9)
    print(f"\nsoak seed {seed}")
    shoal = shoal_unstarted
    ddb.create_table(table_name)
    model: dict[str, dict] = {}
    writer = Writer(moto_server, table_name, model, seed)
    initial = [writer.item(f"k{i:07d}") for i in range(INITIAL_ITEMS)]
    ddb.batch_write(table_name, initial)
    model.update((item["pk"]["S"], item) for item in initial)
    writer.next_key = INITIAL_ITEMS
    shoal.start()
    await shoal.create_integration("moto", moto_server)
    await shoal.create_collection(COLL, "moto", table_name)
    await shoal.wait_ready(COLL)

    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    lags: list[float] = []
    rss: list[tuple[float, int]] = []
    headers = {"Authorization": f"ApiKey {shoal.key}"}
    rng = random.Random(seed)

    async def post(session: aiohttp.ClientSession, kind: str, sql: dict[str, Any]) -> dict | None:
        began = time.monotonic()
        try:
            async with session.post(f"{shoal.url}/v1/orgs/self/queries", json={"sql": sql}, headers=headers) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200 or body.get("status") != "COMPLETED":
                    errors.append(f"{kind}: {resp.status} {str(body)[:300]}")
                    return None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
            errors.append(f"{kind}: {error!r}")
            return None
        latencies[kind].append(time.monotonic() - began)
        return body

    async def paginated(session: aiohttp.ClientSession) -> None:
        body = await post(session, "paginated", {
            "query": f"SELECT _id, amount FROM {FQ} WHERE amount > :a ORDER BY _id",
            "parameters": sql_params({"a": rng.randint(1, 900)}),
            "paginate": True, "initial_paginate_response_doc_count": 50})
        cursor = body and body["pagination"]["next_cursor"]
        if cursor:
            began = time.monotonic()
            url = f"{shoal.url}/v1/orgs/self/queries/{body['query_id']}/pages/{cursor}?docs=50"
            async with session.get(url, headers=headers) as resp:
                if resp.status != 200:
                    errors.append(f"page: {resp.status} {(await resp.text())[:300]}")
                    return
                await resp.read()
            latencies["next page"].append(time.monotonic() - began)

    async def one_query(session: aiohttp.ClientSession) -> None:
        kind = rng.choice(["point", "search", "group-by", "filter+sum", "paginated"])
        if kind == "point":
            await post(session, kind, {"query": f"SELECT * FROM {FQ} WHERE _id = :id",
                                       "parameters": sql_params({"id": rng.choice(list(model) or ["k0"])})})
        elif kind == "search":
            await post(session, kind, {"query": f"SELECT _id, SCORE() AS s FROM {FQ} WHERE "
                                                f"SEARCH(CONTAINS(text, '{rng.choice(WORDS)}')) ORDER BY SCORE() DESC LIMIT 10"})
        elif kind == "group-by":
            await post(session, kind, {"query": f"SELECT grp, COUNT(*) AS n, AVG(amount) AS a FROM {FQ} GROUP BY grp"})
        elif kind == "filter+sum":
            await post(session, kind, {"query": f"SELECT SUM(amount) AS s FROM {FQ} WHERE grp = :g AND amount > 100",
                                       "parameters": sql_params({"g": rng.choice(GROUPS)})})
        else:
            await paginated(session)

    async def client(session: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            await one_query(session)

    async def lag_poller(session: aiohttp.ClientSession, until: float) -> None:
        seen = 0
        while time.monotonic() < until:
            body = await post(session, "max(seq)", {"query": f"SELECT MAX(seq) AS m FROM {FQ}"})
            now = time.monotonic()
            visible = (body and body["results"][0]["m"]) or 0
            for seq in range(seen + 1, visible + 1):
                if seq in writer.acked:  # the initial items carry seqs never acknowledged one by one
                    lags.append(now - writer.acked[seq])
            seen = max(seen, visible)
            await asyncio.sleep(LAG_POLL_S)

    async def rss_sampler(until: float) -> None:
        while time.monotonic() < until:
            rss.append((time.monotonic(), rss_kib(shoal.proc.pid)))
            await asyncio.sleep(RSS_SAMPLE_S)

    writer.start()
    started = time.monotonic()
    until = started + LOAD_S
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await asyncio.gather(*(client(session, until) for _ in range(CLIENTS)),
                                 lag_poller(session, until + 3.0), rss_sampler(until))
    finally:
        writer.finish()
    writes = len(writer.acked) + writer.deletes

    print(f"{writes} writes in {writer.elapsed_s:.0f} s ({writes / writer.elapsed_s:.0f}/s, {writer.deletes} deletes); "
          f"{sum(map(len, latencies.values()))} queries; {len(errors)} errors")
    for kind, values in sorted(latencies.items()):
        print(f"  {kind:>10}: n={len(values):5d}  p50={percentile(values, 50) * 1000:7.1f} ms  "
              f"p99={percentile(values, 99) * 1000:7.1f} ms")
    print(f"  sync lag: n={len(lags)}  p50={percentile(lags, 50) * 1000:.0f} ms  p99={percentile(lags, 99) * 1000:.0f} ms")
    flat, first, last = rss_is_flat(rss, WARMUP_S, RSS_GROWTH_LIMIT)
    print(f"  RSS: start {rss[0][1] / 1024:.0f} MiB, max {max(r for _, r in rss) / 1024:.0f} MiB, "
          f"first-third median {first / 1024:.0f} MiB, last-third median {last / 1024:.0f} MiB "
          f"({last / first:.2f}x)")

    assert not errors, f"{len(errors)} failed queries, e.g. {errors[:5]}"
    assert writes >= MIN_WRITES_PER_S * writer.elapsed_s, f"the writer fell behind: {writes} writes"
    assert len(lags) >= len(writer.acked) * 0.9, f"only {len(lags)} of {len(writer.acked)} writes seen"
    assert flat, f"RSS grew from {first} KiB to {last} KiB (> {RSS_GROWTH_LIMIT}x): {rss}"

    async def converged():
        rows = await shoal.query(f"SELECT * FROM {FQ} LIMIT 1000000", limit=1_000_000)
        problems = compare_collection(rows, model)
        assert not problems, f"seed {seed}, {len(rows)} rows, {len(model)} items:\n" + "\n".join(problems)
        return True

    await wait_until(converged, 30, 0.5, "the collection to equal the table", describe=lambda: shoal.get_collection(COLL))
    table = {item["pk"]["S"]: item for item in ddb.scan_all(table_name)}
    assert sorted(table) == sorted(model), "the writer's model diverged from the table (a test bug)"
