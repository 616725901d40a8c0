"""Crash safety and replay idempotence: the guarantees of issue #4, tested on real parts.

`test_sigkill_during_heavy_streaming`: a real moto endpoint, a real Shoal subprocess, real
HTTP. Two writer threads churn the table all along (new items, whole-item overwrites,
UpdateItems that change attribute types and remove attributes, deletes, deleted keys written
again, BatchWriteItem bursts) while the server is killed with SIGKILL five times, each time
restarted on the same data dir: in the middle of the bulk load; 0.3–3 s after the restart
(resuming it); then three times 0.3–3 s after the restarted server applied its first round
of stream records, so the kills land in rounds that follow a saved stream position. After the
writers stop, every document must equal the table's item (every attribute with its type;
deleted items absent), compared with a strongly consistent Scan of the table.
Randomness is seeded: the seed is printed and named in every failure; set SHOAL_CRASH_SEED to
replay a schedule (thread timing still varies from run to run).

`test_replaying_a_stretch_of_the_stream_changes_nothing`: the reader and the collection in
this process against moto's stream; applying again from an earlier position (as after a
crash, or the bulk load's hand-over from TRIM_HORIZON) leaves every row, system columns
included, exactly as it was.

`test_a_reopened_collection_with_an_empty_union_reports_its_size`: the server crash the
SIGKILL test found (a segfault in pyarrow on restart), reproduced in this process.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from shoal.index.collection import Change, Collection
from shoal.ingest.aws import AwsAccess
from shoal.ingest.streams import StreamReader
from support import AWS_ENV, Dynamo, ShoalProcess, compare_collection, wait_until
from test_walking_skeleton import doc_id, make_item, mixed_value

COLL = "churn"
FQ = f"commons.{COLL}"
INITIAL_ITEMS = 1000
WRITERS = 2
KILLS_AFTER_RESTART = 4
# A pause between a writer's operations (a BatchWriteItem is 10 changes), so the stream
# does not outrun what moto serves of items this rich on a busy machine (a few hundred per second).
OP_INTERVAL_S = 0.05


def crash_seed() -> int:
    return int(os.environ.get("SHOAL_CRASH_SEED") or random.SystemRandom().randrange(1, 10**9))


# --------------------------------------------------------------------------- the writers


class Churn:
    """Random changes to one key range of the table, with a model of what the table holds.

    Each writer owns its keys (prefix), so the union of the models is the table once every
    writer has stopped. The model takes the item DynamoDB returns (`ReturnValues=ALL_NEW`)
    after an UpdateItem, so no expression is re-implemented here."""

    def __init__(self, endpoint: str, table: str, prefix: str, seed: int, model: dict[str, dict] | None = None):
        self.ddb = Dynamo(endpoint)
        self.table, self.prefix = table, prefix
        self.rng = random.Random(seed)
        self.model: dict[str, dict] = model if model is not None else {}
        self.deleted: dict[str, dict] = {}  # doc id → key of a deleted item (to write it again)
        self.next_key = 0
        self.ops: Counter[str] = Counter()

    def new_key(self) -> dict:
        self.next_key += 1
        return {"pk": {"S": f"{self.prefix}{self.next_key:06d}"}, "sk": {"N": str(self.rng.randint(1, 3))}}

    def existing_key(self) -> dict:
        item = self.model[self.rng.choice(list(self.model))]
        return {"pk": item["pk"], "sk": item["sk"]}

    def put(self, key: dict) -> None:
        item = make_item(self.rng, key["pk"]["S"], key["sk"]["N"])
        self.ddb.client.put_item(TableName=self.table, Item=item)
        self.model[doc_id(item)] = item
        self.deleted.pop(doc_id(item), None)

    def op_put_new(self) -> None:
        self.put(self.new_key())

    def op_overwrite(self) -> None:
        self.put(self.existing_key())  # a new attribute set: optional attributes come and go

    def op_resurrect(self) -> None:
        if self.deleted:
            self.put(self.deleted[self.rng.choice(list(self.deleted))])

    def op_update(self) -> None:
        """Type changes, removed attributes, nested and list updates, in one UpdateItem."""
        key = self.existing_key()
        rng = self.rng
        sets = ["mixed = :m"]
        values: dict[str, Any] = {":m": mixed_value(rng)}
        # qty changes type now and then: N ↔ S ↔ BOOL ↔ L
        values[":q"] = rng.choice([{"N": str(rng.randint(0, 999))}, {"S": f"q{rng.randint(0, 9)}"},
                                   {"BOOL": True}, {"L": [{"N": "1"}, {"S": "1"}]}])
        sets.append("qty = :q")
        if rng.random() < 0.4:
            sets.append("events = list_append(if_not_exists(events, :none), :e)")
            values[":none"], values[":e"] = {"L": []}, {"L": [{"S": "again"}, {"N": str(rng.randint(0, 9))}]}
        if rng.random() < 0.3:
            sets.append("address = :a")
            values[":a"] = {"M": {"city": {"S": rng.choice(["Oslo", "Lima"])}, "n": mixed_value(rng)}}
        removable = ["name", "avatar", "tags", "scores", "blobs", "price", "active", "deleted_at", "big", "address"]
        removed = rng.sample(removable, rng.randint(0, 3))
        removed = [r for r in removed if not (r == "address" and ":a" in values)]
        names = {f"#r{i}": name for i, name in enumerate(removed)}  # `name` is a reserved word
        expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(names) if names else "")
        response = self.ddb.client.update_item(
            TableName=self.table, Key=key, UpdateExpression=expression,
            ExpressionAttributeValues=values, ReturnValues="ALL_NEW", **({"ExpressionAttributeNames": names} if names else {}),
        )
        self.model[doc_id(response["Attributes"])] = response["Attributes"]

    def op_delete(self) -> None:
        key = self.existing_key()
        self.ddb.client.delete_item(TableName=self.table, Key=key)
        self.model.pop(doc_id(key), None)
        self.deleted[doc_id(key)] = key

    def op_batch(self) -> None:
        """One BatchWriteItem of 10 distinct keys: new items, overwrites and deletes."""
        keys: dict[str, dict] = {}
        while len(keys) < 10:
            key = self.existing_key() if self.model and self.rng.random() < 0.6 else self.new_key()
            keys[doc_id(key)] = key
        requests, after = [], {}
        for key_id, key in keys.items():
            if key_id in self.model and self.rng.random() < 0.3:
                requests.append({"DeleteRequest": {"Key": key}})
                after[key_id] = None
            else:
                item = make_item(self.rng, key["pk"]["S"], key["sk"]["N"])
                requests.append({"PutRequest": {"Item": item}})
                after[key_id] = item
        pending = {self.table: requests}
        for _ in range(50):
            pending = self.ddb.client.batch_write_item(RequestItems=pending).get("UnprocessedItems") or {}
            if not pending:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"BatchWriteItem kept leaving unprocessed items: {pending}")
        for key_id, item in after.items():
            if item is None:
                self.model.pop(key_id, None)
                self.deleted[key_id] = keys[key_id]
            else:
                self.model[key_id] = item
                self.deleted.pop(key_id, None)

    WEIGHTS = {"op_put_new": 3, "op_overwrite": 2, "op_update": 5, "op_delete": 3, "op_resurrect": 1, "op_batch": 1}

    def step(self) -> None:
        name = self.rng.choices(list(self.WEIGHTS), list(self.WEIGHTS.values()))[0]
        if name != "op_put_new" and not self.model:
            name = "op_put_new"
        getattr(self, name)()
        self.ops[name] += 1


class ChurnThread(threading.Thread):
    """Runs `Churn.step` until stopped; a failed write is kept and re-raised by `finish`."""

    def __init__(self, churn: Churn):
        super().__init__(name=f"churn-{churn.prefix}", daemon=True)
        self.churn = churn
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.wait(OP_INTERVAL_S):
                self.churn.step()
        except BaseException as error:  # noqa: BLE001 - surfaced by finish()
            self.error = error

    def finish(self) -> None:
        self.stopping.set()
        self.join(30)
        assert not self.is_alive(), f"{self.name} did not stop"
        if self.error is not None:
            raise AssertionError(f"{self.name} failed: {self.error!r}") from self.error


def consistent_scan(ddb: Dynamo, table: str) -> dict[str, dict]:
    items: dict[str, dict] = {}
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = ddb.client.scan(**kwargs)
        items.update((doc_id(item), item) for item in page["Items"])
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


# --------------------------------------------------------------------------- SIGKILL


async def test_sigkill_during_heavy_streaming(ddb: Dynamo, moto_server: str, table_name: str,
                                             shoal_unstarted: ShoalProcess, monkeypatch):
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")  # a crash of the server itself leaves a traceback in its log
    seed = crash_seed()
    print(f"\ncrash-safety seed: {seed} (SHOAL_CRASH_SEED={seed} replays the schedule)")
    rng = random.Random(seed)
    shoal = shoal_unstarted
    started = time.monotonic()

    ddb.create_table(table_name, pk=("pk", "S"), sk=("sk", "N"))
    loader = Churn(moto_server, table_name, "init", seed)
    initial = [make_item(loader.rng, f"init{i:06d}", str(i % 3 + 1)) for i in range(INITIAL_ITEMS)]
    ddb.batch_write(table_name, initial)
    loader.model.update((doc_id(item), item) for item in initial)
    loader.next_key = INITIAL_ITEMS
    # The loader's items are churned too (by the first writer), so the scan meets changes.
    writers = [ChurnThread(loader)] + [
        ChurnThread(Churn(moto_server, table_name, f"w{n}-", seed + n)) for n in range(1, WRITERS)
    ]

    shoal.start()
    await shoal.create_integration("moto", moto_server)
    await shoal.create_collection(COLL, "moto", table_name)
    for writer in writers:
        writer.start()

    async def source() -> dict:
        try:
            return (await shoal.get_collection(COLL))["sources"][0]["dynamodb"]
        except aiohttp.ClientError:
            await asyncio.sleep(0.2)
            if not shoal.running:  # not killed by this test: it crashed
                raise RuntimeError(f"seed {seed}: Shoal exited with {shoal.proc.returncode}:\n{shoal.log_tail(60)}")
            raise

    kills: list[str] = []

    def stream_seq(src: dict) -> int:
        """The last sequence number applied as the status shows it (-1: none since the start)."""
        seqs = [shard["last_sequence_number"] for shard in src["status"]["stream_shards"]]
        return max((int(seq) for seq in seqs if seq is not None), default=-1)

    async def kill_now() -> int:
        """SIGKILL; returns the stream position the status showed just before (-1: none)."""
        try:
            src = await source()
            state, seq = src["current_status"]["state"], stream_seq(src)
            kills.append(f"{state} ({src['status']['scan_records_processed']} scanned, stream at {seq})")
        except Exception as error:  # noqa: BLE001 - still starting: the kill goes ahead
            seq = -1
            kills.append(f"status unavailable: {error!r}")
        shoal.kill()
        return seq

    async def scanning():
        src = await source()
        return src["current_status"]["state"] == "SCANNING" and src["status"]["scan_records_processed"] > 0

    def stream_applied_after(seq: int):
        async def applied():
            return stream_seq(await source()) > seq
        return applied

    try:
        # Kill 1: in the middle of the bulk load, once some pages are applied.
        await wait_until(scanning, 30, 0.05, "the bulk load to apply its first pages",
                         describe=lambda: shoal.get_collection(COLL))
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        seq = await kill_now()
        # Kill 2: 0.3–3 s after the restart (resuming the scan). The others 0.3–3 s after the
        # restarted server applied its first round of stream records (which takes moto a few
        # seconds), so they land in the middle of rounds that follow a saved stream position.
        for kill in range(KILLS_AFTER_RESTART):
            await asyncio.sleep(rng.uniform(0.0, 0.5))  # writes while the server is down
            shoal.start()
            if kill > 0:
                await wait_until(stream_applied_after(seq), 60, 0.05, "the restarted server to apply stream records",
                                 describe=lambda: shoal.get_collection(COLL))
            await asyncio.sleep(rng.uniform(0.3, 3.0))
            seq = max(seq, await kill_now())
        shoal.start()
        await asyncio.sleep(1.0)
    finally:
        for writer in writers:
            writer.stopping.set()
        for writer in writers:
            writer.finish()
    writing_s = time.monotonic() - started
    ops = sum((w.churn.ops for w in writers), Counter())
    print(f"{sum(ops.values())} writes in {writing_s:.1f} s {dict(ops)}; kills at: {kills}")
    assert kills[0].startswith("SCANNING"), f"seed {seed}: the first kill missed the bulk load: {kills}"
    assert sum(state.startswith("PROCESSING_STREAM") and "stream at -1" not in state for state in kills) >= 2, (
        f"seed {seed}: fewer than two kills landed while following the stream from a saved position: {kills}")

    table = consistent_scan(ddb, table_name)
    model = {k: v for w in writers for k, v in w.churn.model.items()}
    assert sorted(table) == sorted(model) and all(table[k] == model[k] for k in table), (
        f"seed {seed}: the writers' model diverged from the table (a test bug)")

    async def converged():
        rows = await shoal.query(f"SELECT * FROM {FQ} LIMIT 1000000", limit=1_000_000)
        problems = compare_collection(rows, table)
        assert not problems, f"seed {seed}, {len(rows)} rows, {len(table)} items:\n" + "\n".join(problems)
        return True

    await wait_until(converged, 60, 0.5, f"the collection to equal the table (seed {seed}, kills at {kills})",
                     describe=lambda: shoal.get_collection(COLL))
    coll = await shoal.get_collection(COLL)
    assert coll["status"] == "READY" and coll["stats"]["doc_count"] == len(table), f"seed {seed}: {coll}"
    print(f"converged {time.monotonic() - started - writing_s:.1f} s after the writers stopped; "
          f"{len(table)} items")


# --------------------------------------------------------------------------- replay


def rows_of(collection: Collection) -> dict[str, dict]:
    """Every live document with its system columns (`_event_time`, `_meta`), by `_id`."""
    rows = [row for batch in collection.snapshot().batches() for row in batch.to_pylist()]
    by_id = {row["_id"]: row for row in rows}
    assert len(by_id) == len(rows), "duplicate _id in the collection"
    return by_id


async def test_replaying_a_stretch_of_the_stream_changes_nothing(ddb: Dynamo, moto_server: str, table_name: str,
                                                                  tmp_path: Path):
    ddb.create_table(table_name, pk=("pk", "S"), sk=("sk", "N"))
    churn = Churn(moto_server, table_name, "r", seed=4)
    collection = Collection.open(tmp_path / "collection")
    access = AwsAccess(AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"], endpoint_url=moto_server)
    async with access.client("dynamodbstreams", "us-east-1") as client:
        arn = ddb.client.describe_table(TableName=table_name)["Table"]["LatestStreamArn"]

        async def follow(position: dict) -> dict:
            """Apply round by round until caught up, as the pipeline does; the last position."""
            reader = StreamReader(client, copy.deepcopy(position), ("pk", "sk"), table_name, 0.01)
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, f"the reader did not catch up: {reader.shard_status()}"
                result = await reader.read()
                await collection.apply(result.changes, {"stream": result.position})
                if result.caught_up:
                    return result.position

        positions = [{"stream_arn": arn, "shards": {}}]
        for _stretch in range(3):
            for _ in range(80):
                churn.step()
            positions.append(await follow(positions[-1]))
        final = rows_of(collection)
        assert sorted(final) == sorted(consistent_scan(ddb, table_name)), "the collection differs from the table"
        assert churn.ops["op_delete"] and churn.ops["op_update"] and churn.ops["op_resurrect"], churn.ops

        for start in (positions[1], positions[2], positions[0]):  # a stretch, the last one, all of it
            await follow(start)
            again = rows_of(collection)
            changed = sorted(k for k in set(final) | set(again) if final.get(k) != again.get(k))
            assert not changed, (f"replaying from {start['shards']} changed {len(changed)} documents, e.g. "
                                 f"{[(final.get(k), again.get(k)) for k in changed[:2]]}")
        assert collection.doc_count == len(final)
    await collection.close()


# --------------------------------------------------------------------------- reopening


async def test_a_reopened_collection_with_an_empty_union_reports_its_size(tmp_path: Path):
    """Found by the SIGKILL test: compaction conforms small segments to the collection's schema,
    so a segment can hold an all-null union whose list child is an empty union; pyarrow reads
    that back from the file with no type-ids buffer, and `RecordBatch.nbytes` then crashed the
    server (segfault) on its next status request after a restart."""
    collection = Collection.open(tmp_path / "c")
    mixed = [Change.of(f"big{i}", {"m": [1, "x"] if i % 2 else 5}, 1, {}) for i in range(40)]
    await collection.apply(mixed, None)
    for i in range(14):  # more segments than compaction allows: the small ones are merged
        await collection.apply([Change.of(f"small{i}", {"v": i}, 1, {})], None)
    await collection.close()
    reopened = Collection.open(tmp_path / "c")
    assert reopened.doc_count == 54
    assert reopened.total_size > 0
    await reopened.close()
