"""Kinesis Data Streams for DynamoDB as the change source: out-of-order and duplicated records,
resharding, restarts, replays.

Real parts only: moto's server (the real DynamoDB and Kinesis wire protocols; resharding
patched to behave as Kinesis does, see `kinesis_feed.PatchedMoto`), `KinesisFeed` writing to a
real table and filing the KDS record of each write, shuffled and duplicated, and the Shoal
server. Every expectation comes from the table itself (a Scan) or from the records filed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from shoal.index.collection import Change, Collection
from shoal.index.tombstones import Tombstones
from shoal.ingest.aws import AwsAccess
from shoal.ingest.kinesis import KinesisReader, event_time_us
from shoal.ingest.streams import ReadResult, StreamTrimmed
from kinesis_feed import KinesisFeed, PatchedMoto, boto, create_stream
from support import ShoalProcess, compare_collection, wait_until

KEEP_S = 25 * 3600.0


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> str:
    server = PatchedMoto(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server.url
    finally:
        server.stop()


def new_table(url: str, name: str) -> None:
    """A table with no DynamoDB stream: with Kinesis, Shoal needs none."""
    boto("dynamodb", url).create_table(TableName=name, AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                                       KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}], BillingMode="PAY_PER_REQUEST")


def item(pk: str, value: int) -> dict:
    return {"pk": {"S": pk}, "v": {"N": str(value)}, "note": {"S": f"{pk} at {value}"}}


def table_model(url: str, table: str) -> dict[str, dict]:
    dynamodb, items, request = boto("dynamodb", url), [], {"TableName": table, "ConsistentRead": True}
    while True:
        page = dynamodb.scan(**request)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            return {it["pk"]["S"]: it for it in items}
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


# --------------------------------------------------------------------------- newer wins, in storage

T0 = int(time.time() * 1_000_000)


def change(pk: str, value: int | None, at: int, event: str = "MODIFY") -> Change:
    doc = None if value is None else {"pk": pk, "v": value}
    return Change.of(pk, doc, T0 + at, {"table": "t", "event": "REMOVE" if value is None else event, "sequence_number": None})


def values(collection: Collection) -> dict[str, int]:
    return {row["_id"]: row["v"] for batch in collection.snapshot().batches() for row in batch.to_pylist()}


async def test_newer_wins_drops_older_versions_duplicates_and_changes_older_than_a_delete(tmp_path: Path):
    collection = Collection.open(tmp_path / "c")
    try:
        # A bulk load's documents carry the time they were read (Shoal's clock): any change replaces them.
        await collection.apply([change("a", 0, 10**9, "SCAN"), change("s", 0, 10**9, "SCAN")], {"n": 0})
        await collection.apply_newer([change("a", 1, 100)], {"n": 1}, KEEP_S)
        assert values(collection) == {"a": 1, "s": 0}

        # Older versions and duplicates, in one batch and across batches.
        await collection.apply_newer([change("a", 3, 300), change("a", 2, 200), change("a", 3, 300)], {"n": 2}, KEEP_S)
        await collection.apply_newer([change("a", 2, 200), change("a", 1, 100)], {"n": 3}, KEEP_S)
        assert values(collection)["a"] == 3

        # A delete before an older insert, in one batch, then across batches (the tombstone).
        await collection.apply_newer([change("b", None, 500), change("b", 4, 400, "INSERT")], {"n": 4}, KEEP_S)
        await collection.apply_newer([change("c", None, 500)], {"n": 5}, KEEP_S)
        await collection.apply_newer([change("c", 4, 499, "INSERT"), change("s", 5, 1, "MODIFY")], {"n": 6}, KEEP_S)
        assert values(collection) == {"a": 3, "s": 5}
        await collection.apply_newer([change("c", 6, 600, "INSERT")], {"n": 7}, KEEP_S)  # a newer insert wins
        assert values(collection) == {"a": 3, "s": 5, "c": 6}

        # Ties: the later change wins, in a batch and across batches.
        await collection.apply_newer([change("d", 1, 700), change("d", 2, 700)], {"n": 8}, KEEP_S)
        assert values(collection)["d"] == 2
        await collection.apply_newer([change("d", 3, 700)], {"n": 9}, KEEP_S)
        assert values(collection)["d"] == 3
        assert collection.checkpoint == {"n": 9}
    finally:
        await collection.close()


async def test_tombstones_persist_with_their_refresh_and_expire(tmp_path: Path):
    directory = tmp_path / "c"
    collection = Collection.open(directory)
    await collection.apply_newer([change("x", None, 500), change("y", None, 500)], {"n": 1}, KEEP_S)
    generation = collection._generation
    await collection.close()

    # A refresh that wrote its tombstones but crashed before its manifest: they are discarded.
    Tombstones.open(directory, generation).add({"z": T0 + 900}, generation + 1)
    collection = Collection.open(directory)
    try:
        await collection.apply_newer([change("x", 1, 400), change("z", 1, 800)], {"n": 2}, KEEP_S)
        assert values(collection) == {"z": 1}, "x's tombstone survives a restart; z's never committed"
        assert collection.checkpoint == {"n": 2}

        # Expiry by age: tombstones older than what is kept are pruned.
        old = -3 * 3600 * 1_000_000
        collection._tombstones_pruned_at = 0.0
        await collection.apply_newer([change("old", None, old)], {"n": 3}, 3600.0)
        assert collection._tombstones.latest(["old", "y"]) == {"y": T0 + 500}
    finally:
        await collection.close()


def test_approximate_creation_time_in_milliseconds_or_microseconds():
    assert event_time_us(1_700_000_000_123) == 1_700_000_000_123_000
    assert event_time_us(1_700_000_000_123_456) == 1_700_000_000_123_456


# --------------------------------------------------------------------------- the reader, against moto's Kinesis


def kinesis_client(url: str):
    return AwsAccess(endpoint_url=url).client("kinesis", "us-east-1")


async def read_all(reader: KinesisReader, expected: int, timeout: float = 20.0) -> list[ReadResult]:
    rounds: list[ReadResult] = []
    deadline = time.monotonic() + timeout
    while sum(len(r.changes) for r in rounds) < expected or not rounds[-1].caught_up:
        assert time.monotonic() < deadline, (sum(len(r.changes) for r in rounds), reader.shard_status())
        rounds.append(await reader.read())
    return rounds


async def test_reshards_are_read_parent_before_child_and_the_result_equals_the_table(moto: str, tmp_path: Path):
    """Split, merge (two parents), split again, with shuffled and duplicated records in every
    generation: no child record is delivered before its parents' last ones, each record once,
    and the changes applied newest-wins equal the table."""
    table = f"t_{uuid.uuid4().hex[:8]}"
    new_table(moto, table)
    kinesis = boto("kinesis", moto)
    arn = create_stream(kinesis, f"s_{table}", 1)
    feed = KinesisFeed(moto, table, arn, ("pk",), seed=1)
    pks = [f"k{i:02d}" for i in range(40)]

    def burst(value: int) -> int:
        for pk in pks:
            feed.put(item(pk, value))
        for pk in pks[value % 7::5]:
            feed.delete({"pk": {"S": pk}})
        return feed.flush()

    def shards() -> dict[str, dict]:
        return {s["ShardId"]: s for s in kinesis.list_shards(StreamARN=arn)["Shards"]}

    put = burst(1) + burst(2)
    [root] = shards()
    kinesis.split_shard(StreamARN=arn, ShardToSplit=root, NewStartingHashKey=str(2**127))
    put += burst(3)
    low, high = sorted(set(shards()) - {root})
    kinesis.merge_shards(StreamARN=arn, ShardToMerge=low, AdjacentShardToMerge=high)
    put += burst(4)
    [merged] = set(shards()) - {root, low, high}
    kinesis.split_shard(StreamARN=arn, ShardToSplit=merged, NewStartingHashKey=str(2**126))
    put += burst(5) + burst(6)
    lineage = {s: (v.get("ParentShardId"), v.get("AdjacentParentShardId")) for s, v in shards().items()}
    assert lineage[merged] == (low, high) and all(feed.last_seq.get(s) for s in lineage), (lineage, feed.last_seq)

    collection = Collection.open(tmp_path / "c")
    try:
        async with kinesis_client(moto) as client:
            reader = KinesisReader(client, {"stream_arn": arn, "start_at": None, "shards": {}}, ("pk",), table, 0.01)
            rounds = await read_all(reader, put)
            for r in rounds:
                await collection.apply_newer(r.changes, {"stream": r.position}, reader.tombstone_keep_s)
        assert sum(len(r.changes) for r in rounds) == put, "each record once"
        positions = rounds[-1].position["shards"]
        assert {s: int(positions[s]["seq"]) for s in lineage} == feed.last_seq, "per-shard checkpoints"
        assert all(positions[s]["done"] for s in (root, low, high, merged))
        first_round, last_round, seen = {}, {}, {}  # rounds in which a shard's position advanced
        for i, r in enumerate(rounds):
            for shard_id, state in r.position["shards"].items():
                if state["seq"] != seen.get(shard_id):
                    seen[shard_id] = state["seq"]
                    first_round.setdefault(shard_id, i)
                    last_round[shard_id] = i
        for child, parents in lineage.items():
            for parent in filter(None, parents):
                assert first_round[child] > last_round[parent], f"{child} read before its parent {parent} ended"
        model = table_model(moto, table)
        assert values(collection) == {pk: int(it["v"]["N"]) for pk, it in model.items()}
        assert reader.shard_status()[-1]["parent_shard_id"] == merged
    finally:
        await collection.close()


async def test_lost_records_raise_stream_trimmed(moto: str):
    arn = create_stream(boto("kinesis", moto), f"s_{uuid.uuid4().hex[:8]}", 1)
    async with kinesis_client(moto) as client:
        old = {"stream_arn": arn, "start_at": None, "shards": {}, "verified_at": time.time() - 25 * 3600}
        with pytest.raises(StreamTrimmed, match="25.0 hours ago and the stream keeps records for 24 hours"):
            await KinesisReader(client, old, ("pk",), "t", 0.01).read()
        vanished = {"stream_arn": arn, "start_at": None, "shards": {"shardId-000000000099": {"seq": "5", "done": False}},
                    "verified_at": time.time()}
        with pytest.raises(StreamTrimmed, match="expired before it was read to its end"):
            await KinesisReader(client, vanished, ("pk",), "t", 0.01).read()
        # Listed lately, but a shard read up to longer ago than the stream keeps records.
        [shard] = [s["ShardId"] for s in boto("kinesis", moto).list_shards(StreamARN=arn)["Shards"]]
        behind = {"stream_arn": arn, "start_at": None, "verified_at": time.time(),
                  "shards": {shard: {"seq": "5", "done": False, "read_up_to": time.time() - 25 * 3600}}}
        with pytest.raises(StreamTrimmed, match=f"{shard} was read up to 25.0 hours ago"):
            await KinesisReader(client, behind, ("pk",), "t", 0.01).read()


# --------------------------------------------------------------------------- through Shoal

COLL = "fromkinesis"
FQ = f"commons.{COLL}"


async def converged(shoal: ShoalProcess, url: str, table: str, what: str, timeout: float = 40) -> list[dict]:
    async def check():
        rows = await shoal.query(f"SELECT * FROM {FQ} ORDER BY _id LIMIT 100000")
        problems = compare_collection(rows, table_model(url, table))
        assert not problems, "\n".join(problems)
        return rows

    return await wait_until(check, timeout, 0.1, what, describe=lambda: shoal.get_collection(COLL))


async def read_to(shoal: ShoalProcess, feed: KinesisFeed, what: str) -> dict:
    """Wait until the status shows every shard read up to the last record the feed put."""
    async def there():
        coll = await shoal.get_collection(COLL)
        shards = {s["shard_id"]: s for s in coll["sources"][0]["dynamodb"]["status"]["stream_shards"]}
        behind = {s: seq for s, seq in feed.last_seq.items()
                  if s not in shards or int(shards[s]["last_sequence_number"] or 0) < seq}
        assert not behind, f"shards behind the feed: {behind}; status {shards}"
        return coll

    return await wait_until(there, 30, 0.1, what, describe=lambda: shoal.get_collection(COLL))


async def test_a_collection_follows_kinesis_through_disorder_reshards_restarts_and_replays(
        moto: str, shoal_unstarted: ShoalProcess):
    shoal = shoal_unstarted
    table = f"t_{uuid.uuid4().hex[:8]}"
    new_table(moto, table)
    kinesis = boto("kinesis", moto)
    arn = create_stream(kinesis, f"s_{table}", 2)
    feed = KinesisFeed(moto, table, arn, ("pk",), precision="MICROSECOND", seed=2)
    for i in range(80):  # before the collection exists: only the bulk load sees these
        feed.dynamodb.put_item(TableName=table, Item=item(f"k{i:03d}", i))

    shoal.start()
    await shoal.create_integration("moto", moto)
    bad = {"name": "bad", "sources": [{"integration_name": "moto", "dynamodb": {
        "table_name": table, "aws_region": "us-east-1", "kinesis_stream_arn": "arn:aws:sqs:us-east-1:1:q"}}]}
    status, answer = await shoal.api("POST", "/v1/orgs/self/ws/commons/collections", bad)
    assert status == 400 and "kinesis_stream_arn" in answer["message"], answer
    created = await shoal.create_collection(COLL, "moto", table, poll="PT0.05S", kinesis_stream_arn=arn)
    assert created["sources"][0]["dynamodb"]["kinesis_stream_arn"] == arn
    await shoal.wait_ready(COLL, timeout=40)
    await converged(shoal, moto, table, "the bulk load")

    # Late copies of writes made before the bulk load (delivery is at least once): the bulk load
    # read newer states, which they must neither overwrite nor bring back once deleted.
    feed.put_records([feed.late_copy("INSERT", item("gone", 1), age_s=600),
                      feed.late_copy("MODIFY", item("k000", -1), age_s=600)])
    await read_to(shoal, feed, "the late copies")
    await converged(shoal, moto, table, "late copies of writes older than the bulk load")

    # Updates, deletes and inserts, shuffled and duplicated.
    for round_ in range(3):
        for i in range(0, 80, 3):
            feed.put(item(f"k{i:03d}", 1000 * round_ + i))
        for i in range(round_, 80, 11):
            feed.delete({"pk": {"S": f"k{i:03d}"}})
        for i in range(10):
            feed.put(item(f"n{round_}{i}", i))
        feed.flush()
    await read_to(shoal, feed, "the shuffled records")
    await converged(shoal, moto, table, "shuffled and duplicated records")

    # A delete delivered, then applied, before the older insert of the same item.
    feed.put(item("late", 1))
    feed.delete({"pk": {"S": "late"}})
    insert, remove = feed.pending
    feed.filed += [insert, remove]
    feed.pending.clear()
    feed.put_records([remove])
    await read_to(shoal, feed, "the delete")
    feed.put_records([insert])
    await read_to(shoal, feed, "the older insert")
    rows = await converged(shoal, moto, table, "a delete before an older insert")
    assert "late" not in {row["_id"] for row in rows}

    # A reshard mid-stream: parent read to its end, children found without a restart.
    parent = sorted(feed.last_seq)[0]
    kinesis.split_shard(StreamARN=arn, ShardToSplit=parent, NewStartingHashKey=str(2**126))
    for i in range(1, 80, 4):
        feed.put(item(f"k{i:03d}", 5000 + i))
    feed.flush()
    coll = await read_to(shoal, feed, "the children of the split")
    await converged(shoal, moto, table, "changes after the reshard")
    shown = {s["shard_id"]: s for s in coll["sources"][0]["dynamodb"]["status"]["stream_shards"]}
    assert shown[parent]["done"] and sum(s["parent_shard_id"] == parent for s in shown.values()) == 2, shown
    assert isinstance(coll["stats"]["sync_lag_ms"], int), coll["stats"]

    # Killed mid-stream (records put while it applies, and while it is down): nothing lost or doubled.
    for round_ in range(2):
        for i in range(0, 80, 2):
            feed.put(item(f"k{i:03d}", 7000 + 100 * round_ + i))
        feed.delete({"pk": {"S": f"n{round_}1"}})
        feed.flush()
        await asyncio.sleep(0.05 + 0.1 * round_)
        shoal.kill()
        for i in range(5):
            feed.put(item(f"r{round_}{i}", i))
        feed.flush()
        shoal.start()
    await read_to(shoal, feed, "the records after the restarts")
    rows = await converged(shoal, moto, table, "restarts mid-stream")
    assert (await shoal.get_collection(COLL))["stats"]["doc_count"] == len(table_model(moto, table))

    # Idempotence: a stretch delivered again, in order, changes nothing.
    feed.replay(len(feed.filed) // 3, len(feed.filed))
    await read_to(shoal, feed, "the replayed stretch")
    assert await shoal.query(f"SELECT * FROM {FQ} ORDER BY _id LIMIT 100000") == rows
