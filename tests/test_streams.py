"""Following a DynamoDB stream: lineage, faults, lost changes, and the rebuild they force.

Real parts only. `StreamsDouble` (a test double speaking the DynamoDB Streams wire protocol,
see its docstring) provides what moto lacks: splits, closed shards, trimming, expired
iterators, throttling, a stream disabled and enabled again. The reader tests run
`StreamReader` in this process through a real aiobotocore client; the end-to-end tests run
the Shoal server against moto behind the double, and compare the collection with the table.
Every expectation comes from the records the test filed or the items it wrote.
"""

from __future__ import annotations

import asyncio
import copy
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson
import pytest

from aiobotocore.config import AioConfig

from shoal.index.collection import Change, Collection
from shoal.ingest.aws import AwsAccess
from shoal.ingest.pipeline import SourceConfig, SourcePipeline, _advice_if_slower_than_the_stream
from shoal.ingest.streams import ReadResult, StreamEnded, StreamReader, StreamTrimmed, idle_wait, lag_ms
from streams_double import StreamsDouble
from support import Dynamo, ShoalProcess, compare_collection, wait_until

KEY_SCHEMA = [{"AttributeName": "pk", "KeyType": "HASH"}]
POLL_S = 0.01


@pytest.fixture
def double():
    with StreamsDouble(describe_page_size=2) as running:
        yield running


def keys(pk: str) -> dict:
    return {"pk": {"S": pk}}


def image(pk: str, value: int) -> dict:
    return {"pk": {"S": pk}, "v": {"N": str(value)}}


class Filed:
    """What a test filed in the double, in order: (shard id, sequence number, pk, value or None)."""

    def __init__(self, double: StreamsDouble, arn: str) -> None:
        self.double, self.arn = double, arn
        self.records: list[tuple[str, str, str, int | None]] = []

    def put(self, pk: str, value: int) -> str:
        shard, seq = self.double.add_record(self.arn, "MODIFY" if self.latest(pk) is not None else "INSERT",
                                            keys(pk), image(pk, value))
        self.records.append((shard, seq, pk, value))
        return shard

    def remove(self, pk: str) -> str:
        old = self.latest(pk)
        shard, seq = self.double.add_record(self.arn, "REMOVE", keys(pk), old_image=image(pk, old or 0))
        self.records.append((shard, seq, pk, None))
        return shard

    def latest(self, pk: str) -> int | None:
        return next((value for _, _, key, value in reversed(self.records) if key == pk), None)

    def final(self) -> dict[str, int]:
        state: dict[str, int | None] = {}
        for _, _, pk, value in self.records:
            state[pk] = value
        return {pk: value for pk, value in state.items() if value is not None}

    def seqs(self, shard: str | None = None) -> list[str]:
        return [seq for s, seq, _, _ in self.records if shard is None or s == shard]


def stream_reader(client: Any, arn: str, position: dict | None = None, poll_s: float = POLL_S) -> StreamReader:
    return StreamReader(client, position or {"stream_arn": arn, "shards": {}}, ("pk",), "t", poll_s)


def streams_client(double: StreamsDouble, config: AioConfig | None = None):
    """The client the pipeline uses (`config` overrides its settings)."""
    return AwsAccess(endpoint_url=double.url).client("dynamodbstreams", "us-east-1", config)


async def read_until(reader: StreamReader, done: Callable[[list[ReadResult]], bool],
                     timeout: float = 10.0) -> list[ReadResult]:
    """Rounds until `done(rounds)`; each round's changes count as applied before the next."""
    rounds: list[ReadResult] = []
    deadline = time.monotonic() + timeout
    while not done(rounds):
        assert time.monotonic() < deadline, (
            f"reader did not get there in {timeout}s: {sum(len(r.changes) for r in rounds)} changes in "
            f"{len(rounds)} rounds; shards {reader.shard_status()}")
        rounds.append(await reader.read())
    return rounds


def delivered(rounds: list[ReadResult]) -> list[str]:
    return [change.meta["sequence_number"] for r in rounds for change in r.changes]


def count_is(n: int) -> Callable[[list[ReadResult]], bool]:
    return lambda rounds: len(delivered(rounds)) >= n and bool(rounds) and rounds[-1].caught_up


def final_state(rounds: list[ReadResult]) -> dict[str, int]:
    state: dict[str, Any] = {}
    for r in rounds:
        for change in r.changes:
            state[change.id] = None if change.doc is None else change.doc["v"]
    return {pk: value for pk, value in state.items() if value is not None}


# --------------------------------------------------------------------------- the reader


async def test_children_are_read_only_after_their_parents_last_record(double: StreamsDouble):
    """Three generations, children listed from the start, a parent bigger than one page, a
    parent closed empty: no child record is delivered before its parent's last one, every
    record once, each item's changes in order; sequence numbers change length on the way."""
    arn = double.create_stream("t", KEY_SCHEMA)
    filed = Filed(double, arn)
    pks = [f"k{i:02d}" for i in range(40)]
    [root] = double.open_shards(arn)
    for round_ in range(60):  # 2,400 records: three GetRecords pages
        for pk in pks:
            filed.put(pk, round_)
    a, b = double.split(arn, root)
    b1, b2 = double.split(arn, b)  # b is closed without a record
    for pk in pks[:20]:
        filed.remove(pk)
    for round_ in range(100, 103):
        for pk in pks:
            filed.put(pk, round_)
    a1, a2 = double.split(arn, a)
    for round_ in range(200, 203):
        for pk in pks[::2]:
            filed.put(pk, round_)
    assert {s for s, *_ in filed.records} >= {root, a, b1, b2, a1, a2}, "every generation holds records"
    assert {len(seq) for seq in filed.seqs()} == {21, 22}, "sequence numbers must change length"

    async with streams_client(double) as client:
        reader = stream_reader(client, arn)
        rounds = await read_until(reader, count_is(len(filed.records)))

    got = delivered(rounds)
    assert sorted(got, key=int) == sorted(filed.seqs(), key=int) and len(set(got)) == len(got), "each record once"
    round_of = {seq: i for i, r in enumerate(rounds) for seq in (c.meta["sequence_number"] for c in r.changes)}
    lineage = {a: root, b1: b, b2: b, a1: a, a2: a}
    for child, parent in lineage.items():
        if filed.seqs(child) and filed.seqs(parent):
            first_child = min(round_of[seq] for seq in filed.seqs(child))
            last_parent = max(round_of[seq] for seq in filed.seqs(parent))
            assert first_child > last_parent, f"{child} read in round {first_child}, its parent ended in {last_parent}"
    per_item: dict[str, list[int]] = {}
    for r in rounds:
        for change in r.changes:
            per_item.setdefault(change.id, []).append(int(change.meta["sequence_number"]))
    assert all(seqs == sorted(seqs) for seqs in per_item.values()), "an item's changes out of stream order"
    assert final_state(rounds) == filed.final()
    removes = [c for r in rounds for c in r.changes if c.meta["event"] == "REMOVE"]
    assert len(removes) == 20 and all(c.doc is None for c in removes), "REMOVE keyed by Keys, no document"

    shards = rounds[-1].position["shards"]
    assert all(shards[s]["done"] for s in (root, a, b)), shards
    assert not any(shards[s]["done"] for s in (a1, a2, b1, b2)), shards
    for shard in (root, a, a1, a2, b1, b2):
        assert shards[shard]["seq"] == filed.seqs(shard)[-1], (shard, shards[shard])
    assert shards[b]["seq"] is None
    assert double.calls["DescribeStream"] >= 4, "7 shards at 2 a page: paginated"


async def test_expired_iterators_are_reacquired_after_the_last_applied_record(double: StreamsDouble):
    arn = double.create_stream("t", KEY_SCHEMA)
    filed = Filed(double, arn)
    for i in range(2500):
        filed.put(f"k{i % 50}", i)
    double.expire_every(2)  # every second GetRecords finds its iterator expired
    async with streams_client(double) as client:
        reader = stream_reader(client, arn)
        rounds = await read_until(reader, count_is(2500))
        double.expire_every(None)
        double.expire_iterators()  # an idle reader's iterator expires, then writes resume
        for i in range(2500, 2600):
            filed.put(f"k{i % 50}", i)
        rounds += await read_until(reader, count_is(2600 - len(delivered(rounds))))

    assert delivered(rounds) == filed.seqs(), "a gap or a duplicate around an expired iterator"
    assert double.expired >= 3
    resumed_at = [int(r["SequenceNumber"]) for r in double.iterator_requests
                  if r["ShardIteratorType"] == "AFTER_SEQUENCE_NUMBER"]
    assert len(resumed_at) >= double.expired - 1, double.iterator_requests
    boundaries = {int(seq) for seq in filed.seqs()}
    assert set(resumed_at) <= boundaries, "re-acquired at a sequence number never delivered"


async def test_throttling_is_retried_and_one_reader_per_shard(double: StreamsDouble):
    double.read_delay_s = 0.02  # so overlapping reads of one shard would show
    arn = double.create_stream("t", KEY_SCHEMA)
    filed = Filed(double, arn)
    [root] = double.open_shards(arn)
    for i in range(30):
        filed.put(f"k{i}", i)
    children = double.split(arn, root)
    for i in range(300):
        filed.put(f"k{i % 60}", 1000 + i)
    double.throttle(2, "DescribeStream")
    double.throttle(1, "GetShardIterator")
    double.throttle(3, "GetRecords")  # with the above, backoffs of up to 0.1 + 0.2 + 0.4 + 0.8 s
    # botocore would retry each throttle itself first (with its own backoff): here the reader
    # meets every one.
    async with streams_client(double, AioConfig(retries={"total_max_attempts": 1})) as client:
        reader = stream_reader(client, arn)
        rounds = await read_until(reader, count_is(len(filed.records)), timeout=15)

    assert sorted(delivered(rounds), key=int) == filed.seqs() and final_state(rounds) == filed.final()
    assert double.throttled == reader.throttled_requests == 6, "every throttle met and backed off"
    assert max(double.max_readers.values()) == 1, dict(double.max_readers)
    assert all(filed.seqs(child) for child in children)


async def test_an_expired_parent_does_not_block_its_children(double: StreamsDouble):
    """A parent no longer listed, and a listed parent whose records were all trimmed: their
    children are read at once by a reader whose position came from a bulk load."""
    unlisted = double.create_stream("t1", KEY_SCHEMA)
    trimmed = double.create_stream("t2", KEY_SCHEMA)
    expected = {}
    for arn in (unlisted, trimmed):
        filed = Filed(double, arn)
        [root] = double.open_shards(arn)
        for i in range(20):
            filed.put(f"k{i}", i)
        last_of_root = int(filed.seqs()[-1])
        double.split(arn, root)
        for i in range(20):
            filed.put(f"k{i}", 100 + i)
        if arn == unlisted:
            double.expire_shard(arn, root)
        else:
            double.trim(arn, upto=last_of_root)
        expected[arn] = (filed, root)

    async with streams_client(double) as client:
        for arn, (filed, root) in expected.items():
            reader = stream_reader(client, arn)
            started = time.monotonic()
            rounds = await read_until(reader, count_is(20), timeout=5)
            assert time.monotonic() - started < 2, "children waited on an expired parent"
            assert sorted(delivered(rounds), key=int) == filed.seqs()[20:], arn
            assert final_state(rounds) == {f"k{i}": 100 + i for i in range(20)}
            shards = rounds[-1].position["shards"]
            assert (root not in shards) if arn == unlisted else shards[root]["done"], shards


async def test_lost_changes_raise_stream_trimmed(double: StreamsDouble):
    arn = double.create_stream("t", KEY_SCHEMA)
    filed = Filed(double, arn)
    [root] = double.open_shards(arn)
    for i in range(10):
        filed.put(f"k{i}", i)
    async with streams_client(double) as client:
        reader = stream_reader(client, arn)
        rounds = await read_until(reader, count_is(10))
        saved = rounds[-1].position
        assert saved["shards"][root]["seq"] == filed.seqs()[-1] and "verified_at" in saved

        # Records after the position were trimmed before they were read.
        for i in range(5):
            filed.put(f"k{i}", 100 + i)
        double.trim(arn)
        with pytest.raises(StreamTrimmed, match="trimmed past the saved position"):
            await read_until(reader, lambda rounds: False)
        with pytest.raises(StreamTrimmed, match="trimmed past the saved position"):
            await read_until(stream_reader(client, arn, dict(saved)), lambda rounds: False)

        # A shard of the position expired before it was read to its end.
        partly = double.create_stream("t2", KEY_SCHEMA)
        other = Filed(double, partly)
        [first] = double.open_shards(partly)
        for i in range(10):
            other.put(f"k{i}", i)
        rounds = await read_until(stream_reader(client, partly), count_is(10))
        for i in range(5):
            other.put(f"k{i}", 100 + i)
        double.split(partly, first)
        double.expire_shard(partly, first)
        with pytest.raises(StreamTrimmed, match="expired before it was read to its end"):
            await read_until(stream_reader(client, partly, rounds[-1].position), lambda rounds: False)

        # A position last confirmed longer ago than the stream keeps records.
        calls = sum(double.calls.values())
        old = {"stream_arn": arn, "shards": {}, "verified_at": time.time() - 25 * 3600}
        with pytest.raises(StreamTrimmed, match="25.0 hours ago"):
            await stream_reader(client, arn, old).read()
        assert sum(double.calls.values()) == calls, "decided from the position alone"
        recent = {"stream_arn": partly, "shards": {}, "verified_at": time.time() - 3600}
        await stream_reader(client, partly, recent).read()


async def test_records_trimmed_from_before_the_bulk_load_lose_nothing(double: StreamsDouble):
    """A replay after a bulk load starts at TRIM_HORIZON, where DynamoDB trims all the time: an
    iterator there may point at a record trimmed before it is used. When every record trimmed
    by now is older than what the bulk load read, the reader goes on from the oldest left."""
    arn = double.create_stream("t", KEY_SCHEMA)
    filed = Filed(double, arn)
    for i in range(10):
        filed.put(f"k{i}", i)
    async with streams_client(double) as client:
        def reader(covered_before: float, position: dict | None = None) -> StreamReader:
            return StreamReader(client, position or {"stream_arn": arn, "shards": {}}, ("pk",), "t", POLL_S, covered_before)
        covered = reader(time.time())
        rounds = await read_until(covered, count_is(10))
        after_ten = copy.deepcopy(rounds[-1].position)
        for i in range(5):
            filed.put(f"k{i}", 100 + i)
        double.trim(arn)  # the five new records go unread, with the iterator past the ten
        filed.put("k9", 900)
        rounds += await read_until(covered, lambda rounds: "k9" in {c.id for r in rounds for c in r.changes[-1:]})
        assert delivered(rounds) == filed.seqs()[:10] + filed.seqs()[-1:]
        # Not when the bulk load may not hold what was trimmed: it is older than the retention.
        with pytest.raises(StreamTrimmed, match="trimmed past the saved position"):
            await read_until(reader(time.time() - 25 * 3600, after_ten), lambda rounds: False)


async def test_the_lag_grows_while_a_shard_cannot_be_read(double: StreamsDouble):
    """The lag counts from the time a shard is read up to, so a shard whose reads keep failing
    (here every iterator expires) shows a growing lag rather than its last good figure."""
    arn = double.create_stream("t", KEY_SCHEMA)
    filed = Filed(double, arn)
    for i in range(10):
        filed.put(f"k{i}", i)
    async with streams_client(double) as client:
        reader = stream_reader(client, arn)
        rounds = await read_until(reader, count_is(10))
        assert lag_ms(rounds[-1].fresh_as_of) < 1000, rounds[-1]
        double.expire_every(1)
        filed.put("k0", 100)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            rounds.append(await reader.read())
        assert "k0" not in {c.id for c in rounds[-1].changes}
        assert lag_ms(rounds[-1].fresh_as_of) >= 1400 and reader.shard_status()[0]["lag_ms"] >= 1400
        double.expire_every(None)
        rounds = await read_until(reader, count_is(1))
        assert lag_ms(rounds[-1].fresh_as_of) < 1000


async def test_a_disabled_stream_is_read_to_its_end_then_reported(double: StreamsDouble):
    arn = double.create_stream("t", KEY_SCHEMA)
    filed = Filed(double, arn)
    for i in range(15):
        filed.put(f"k{i}", i)
    double.disable_stream("t")
    async with streams_client(double) as client:
        reader = stream_reader(client, arn)
        rounds: list[ReadResult] = []
        with pytest.raises(StreamEnded, match="disabled"):
            while True:
                rounds.append(await reader.read())
    assert delivered(rounds) == filed.seqs()


def test_idle_wait_doubles_up_to_a_small_cap():
    assert [idle_wait(0.2, n) for n in range(1, 6)] == pytest.approx([0.2, 0.4, 0.8, 0.8, 0.8])
    assert [idle_wait(0.05, n) for n in (1, 2, 3, 9)] == pytest.approx([0.05, 0.1, 0.2, 0.2])
    assert {idle_wait(1.0, n) for n in range(1, 6)} == {1.0}, "never slower than the poll interval asks"


async def test_an_idle_reader_backs_off_and_still_sees_a_write_quickly(double: StreamsDouble):
    arn = double.create_stream("t", KEY_SCHEMA)
    filed = Filed(double, arn)
    async with streams_client(double) as client:
        reader = stream_reader(client, arn, poll_s=0.05)
        await reader.read()
        before, started = double.calls["GetRecords"], time.monotonic()
        while time.monotonic() - started < 1.5:
            await reader.read()
        idle_reads = double.calls["GetRecords"] - before
        assert 3 <= idle_reads <= 15, f"{idle_reads} GetRecords in 1.5 s idle at a 0.05 s poll interval"
        filed.put("k", 1)
        written = time.monotonic()
        await read_until(reader, count_is(1), timeout=5)
        assert time.monotonic() - written < 1.0


# --------------------------------------------------------------------------- through Shoal

COLL = "mirrored"
FQ = f"commons.{COLL}"


def item(pk: str, value: int) -> dict:
    return {"pk": {"S": pk}, "v": {"N": str(value)}, "note": {"S": f"note {pk} {value}"}}


async def start_mirrored(shoal: ShoalProcess, double: StreamsDouble, ddb: Dynamo, table: str,
                         n_items: int) -> tuple[str, dict[str, dict]]:
    """A table of `n_items` whose stream the double mirrors, a collection of it loaded, and one
    live change through the stream. Returns the stream's ARN and the model {_id: item}."""
    ddb.create_table(table)
    model = {f"k{i:03d}": item(f"k{i:03d}", i) for i in range(n_items)}
    ddb.batch_write(table, list(model.values()))
    arn = double.mirror(table)
    shoal.start()
    await shoal.create_integration("double", double.url)
    await shoal.create_collection(COLL, "double", table, poll="PT0.05S")
    await shoal.wait_ready(COLL, timeout=30)
    await converged(shoal, model, "the bulk load")
    write(ddb, table, model, ["k001"], ["k002"], ["n000"], 500)
    await converged(shoal, model, "a live change")
    return arn, model


async def converged(shoal: ShoalProcess, model: dict[str, dict], what: str) -> None:
    async def check() -> bool:
        problems = compare_collection(await shoal.query(f"SELECT * FROM {FQ} LIMIT 100000"), model)
        assert not problems, "\n".join(problems)
        return True

    await wait_until(check, 30, 0.1, what, describe=lambda: shoal.get_collection(COLL))


def write(ddb: Dynamo, table: str, model: dict[str, dict], deletes: list[str], updates: list[str],
          inserts: list[str], value: int) -> None:
    for pk in deletes:
        ddb.client.delete_item(TableName=table, Key=keys(pk))
        model.pop(pk)
    for pk in updates + inserts:
        model[pk] = item(pk, value)
        ddb.client.put_item(TableName=table, Item=model[pk])


async def wait_rebuilding(shoal: ShoalProcess, double: StreamsDouble, because: str) -> None:
    """Scans are held: the status must say why the collection is rebuilding while it scans."""
    async def rebuilding():
        coll = await shoal.get_collection(COLL)
        status = coll["sources"][0]["status"]
        assert status["state"] == "REBUILDING", status
        assert because in status["message"], status
        assert "Rebuilding the collection from a new bulk load" in status["message"], status
        assert coll["status"] != "READY", coll
        return coll

    await wait_until(rebuilding, 20, 0.05, "the status to say the collection is rebuilding",
                     describe=lambda: shoal.get_collection(COLL))
    await wait_until(lambda: double.scans_held, 10, 0.05, "the rebuild's scan")
    await rebuilding()
    double.release_scans()


async def test_a_bulk_load_interrupted_before_its_clean_up_still_removes_what_it_did_not_see(
        moto_server: str, ddb: Dynamo, table_name: str, tmp_path: Path):
    """The checkpoint says the (re)scan finished, but the process died before the documents it
    did not write were deleted: the next start deletes them, and only then, never documents
    the stream wrote afterwards."""
    ddb.create_table(table_name)
    table = [item(f"k{i}", i) for i in range(10)]
    ddb.batch_write(table_name, table)
    arn = ddb.client.describe_table(TableName=table_name)["Table"]["LatestStreamArn"]
    scan_start = time.time()

    def change(pk: str, event: str, at: float) -> Change:
        return Change.of(pk, {"pk": pk, "v": -1}, int(at * 1_000_000), {"table": table_name, "event": event, "sequence_number": None})

    collection = Collection.open(tmp_path / "index")
    leftovers = [change("deleted-before", "SCAN", scan_start - 3600), change("deleted-by-stream", "INSERT", scan_start - 60)]
    scanned = [change(it["pk"]["S"], "SCAN", scan_start + 0.001) for it in table]
    finished_scan = {"phase": "stream", "stream": {"stream_arn": arn, "shards": {}},
                     "scan": {"start_time": datetime.fromtimestamp(scan_start, timezone.utc).isoformat(), "end_time": None,
                              "total_records": 10}}
    await collection.apply(leftovers + scanned, finished_scan)

    async def follow_until_caught_up() -> None:
        pipeline = SourcePipeline(collection, SourceConfig(table_name, "us-east-1", 1000, True, 0.05),
                                  AwsAccess(endpoint_url=moto_server))
        task = asyncio.create_task(pipeline.run())
        try:
            await wait_until(lambda: pipeline.status.caught_up, 15, 0.05, "the stream to catch up",
                             describe=lambda: vars(pipeline.status))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def ids() -> list[str]:
        return sorted(i for batch in collection.snapshot().batches() for i in batch["_id"].to_pylist())

    try:
        await follow_until_caught_up()
        assert ids() == sorted(it["pk"]["S"] for it in table)
        assert collection.checkpoint["stream"]["verified_at"] >= scan_start - 0.001, collection.checkpoint
        ddb.client.put_item(TableName=table_name, Item=item("late", 1))
        await follow_until_caught_up()  # a restart: the stream's documents are not "unscanned"
        assert ids() == sorted([*(it["pk"]["S"] for it in table), "late"])
    finally:
        await collection.close()


async def test_rounds_read_during_a_slow_apply_are_applied_together(moto_server: str, ddb: Dynamo, table_name: str,
                                                                     tmp_path: Path):
    """While one refresh is slow, the rounds read meanwhile wait, and the next refresh takes
    them all, with the position of the last: the checkpoint covers every change applied."""
    ddb.create_table(table_name)
    collection = Collection.open(tmp_path / "index")
    pipeline = SourcePipeline(collection, SourceConfig(table_name, "us-east-1", 1000, True, 0.05),
                              AwsAccess(endpoint_url=moto_server))
    task = asyncio.create_task(pipeline.run())
    applied: list[list[str]] = []
    held = asyncio.Event()
    release = asyncio.Event()
    apply = collection.apply

    async def slow_apply(changes, checkpoint):
        if changes:
            applied.append([c.id for c in changes])
            held.set()
            await release.wait()  # a slow disk
        await apply(changes, checkpoint)

    def burst(name: str) -> list[str]:
        for i in range(5):
            ddb.client.put_item(TableName=table_name, Item=item(f"{name}{i}", i))
        return [f"{name}{i}" for i in range(5)]

    try:
        await wait_until(lambda: pipeline.status.caught_up, 15, 0.05, "the empty table's bulk load")
        collection.apply = slow_apply
        first = burst("a")
        await asyncio.wait_for(held.wait(), 10)
        second = burst("b")
        await asyncio.sleep(0.6)  # read in a round of its own (polled every 0.05 s)
        third = burst("c")
        await asyncio.sleep(0.6)
        release.set()
        await wait_until(lambda: collection.snapshot().doc_count == 15, 15, 0.05, "every change applied")
        assert applied[0] == first and sorted(applied[1]) == sorted(second + third), applied
        sequence_numbers = [m["sequence_number"] for b in collection.snapshot().batches() for m in b["_meta"].to_pylist()]
        shard, = collection.checkpoint["stream"]["shards"].values()
        assert shard["seq"] == max(sequence_numbers, key=int), (shard, sequence_numbers)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await collection.close()


@pytest.fixture
def mirrored(moto_server: str):
    with StreamsDouble(moto_server) as running:
        yield running


@pytest.fixture
def mirrored_behind(moto_server: str):
    """The double with DynamoDB's clock ten minutes behind this machine's."""
    with StreamsDouble(moto_server, clock_offset_s=-600) as running:
        yield running


async def test_changes_apply_when_dynamodbs_clock_is_behind(mirrored_behind: StreamsDouble, ddb: Dynamo,
                                                            table_name: str, shoal_unstarted: ShoalProcess):
    """DynamoDB stamps changes by its own clock, here ten minutes behind Shoal's. The replay
    skips changes made well before the bulk load began; compared by Shoal's clock, every change
    of the first nine minutes would look that old and be lost. The load's start is moved back
    by the offset its `Date` header showed, so changes during and after the load are applied."""
    shoal = shoal_unstarted
    _, model = await start_mirrored(shoal, mirrored_behind, ddb, table_name, 30)  # one live change included
    write(ddb, table_name, model, ["k003"], ["k004", "k005"], ["n001"], 900)
    await converged(shoal, model, "changes stamped ten minutes behind Shoal's clock")
    manifest_path = shoal.data_dir / "collections" / "commons" / COLL / "index" / "manifest.json"
    scan = orjson.loads(manifest_path.read_bytes())["checkpoint"]["scan"]
    assert -602 < scan["clock_offset_s"] < -598, scan


async def test_a_trimmed_stream_rebuilds_the_collection(mirrored: StreamsDouble, ddb: Dynamo, table_name: str,
                                                        shoal_unstarted: ShoalProcess):
    """Shoal is down while changes are made and then trimmed from the stream: the status says
    so, the collection is rebuilt, items deleted meanwhile are gone, and the stream (split
    later) keeps flowing."""
    shoal = shoal_unstarted
    arn, model = await start_mirrored(shoal, mirrored, ddb, table_name, 120)
    source = (await shoal.get_collection(COLL))["sources"][0]["dynamodb"]
    assert source["settings"] == {"dynamodb_stream_poll_frequency": "PT0.05S"}, source

    shoal.kill()
    write(ddb, table_name, model, [f"k{i:03d}" for i in range(10, 25)], [f"k{i:03d}" for i in range(30, 45)],
          [f"n{i:03d}" for i in range(1, 16)], 600)
    mirrored.wait_mirrored(table_name)
    assert mirrored.trim(arn) > 0
    # The double trims records just written; DynamoDB trims those older than a day, so what it
    # trims is newer than the bulk load only once that is more than a day old: make it so.
    manifest_path = shoal.data_dir / "collections" / "commons" / COLL / "index" / "manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest["checkpoint"]["scan"]["start_time"] = "2020-01-01T00:00:00.000Z"
    manifest_path.write_bytes(orjson.dumps(manifest))
    mirrored.hold_scans()
    shoal.start()
    await wait_rebuilding(shoal, mirrored, "trimmed past the saved position")
    await converged(shoal, model, "the rebuild (items deleted while trimmed must be gone)")
    coll = await shoal.wait_ready(COLL, timeout=20)
    assert coll["sources"][0]["status"] == {**coll["sources"][0]["status"], "state": "WATCHING", "message": None}
    assert coll["stats"]["doc_count"] == len(model) == ddb.count(table_name)

    [root] = mirrored.open_shards(arn)
    children = mirrored.split(arn, root)
    write(ddb, table_name, model, ["k050", "n001", "n000"], [f"k{i:03d}" for i in range(60, 80)], ["m000"], 700)
    await converged(shoal, model, "changes after the rebuild, in the split's children")

    async def shards_shown():
        coll = await shoal.get_collection(COLL)
        shards = {s["shard_id"]: s for s in coll["sources"][0]["dynamodb"]["status"]["stream_shards"]}
        assert set(shards) == {root, *children} and shards[root]["done"], shards
        assert all(shards[c]["parent_shard_id"] == root for c in children), shards
        return coll

    coll = await wait_until(shards_shown, 10, 0.1, "the shards in the status")
    assert isinstance(coll["stats"]["sync_lag_ms"], int), coll["stats"]


async def test_a_new_stream_arn_rebuilds_the_collection(mirrored: StreamsDouble, ddb: Dynamo, table_name: str,
                                                        shoal_unstarted: ShoalProcess):
    """The stream is disabled, the table changes unrecorded, a stream is enabled again (new
    ARN): Shoal reads the old stream to its end, says so, and rebuilds."""
    shoal = shoal_unstarted
    old_arn, model = await start_mirrored(shoal, mirrored, ddb, table_name, 80)

    mirrored.wait_mirrored(table_name)
    mirrored.disable_stream(table_name)

    async def stream_gone():
        status = (await shoal.get_collection(COLL))["sources"][0]["status"]
        assert status["state"] == "ERROR" and "stream" in status["message"], status
        return status

    await wait_until(stream_gone, 20, 0.1, "the status to report the disabled stream")
    write(ddb, table_name, model, [f"k{i:03d}" for i in range(10, 20)], [f"k{i:03d}" for i in range(20, 30)],
          ["n900"], 600)
    mirrored.wait_mirrored(table_name)  # (dropped: no stream was recording)
    mirrored.hold_scans()
    new_arn = mirrored.enable_stream(table_name)
    assert new_arn != old_arn
    await wait_rebuilding(shoal, mirrored, f"the table has a new stream ({new_arn})")
    await converged(shoal, model, "the rebuild after the new stream")
    write(ddb, table_name, model, ["k030"], ["k031"], ["n901"], 700)
    await converged(shoal, model, "changes in the new stream")
    coll = await shoal.wait_ready(COLL, timeout=20)
    assert [s["shard_id"] for s in coll["sources"][0]["dynamodb"]["status"]["stream_shards"]] == \
        mirrored.open_shards(new_arn)


def test_a_bulk_load_slower_than_the_stream_says_what_to_change():
    """A bulk load longer than the stream keeps changes is trimmed past before it is read: the
    rebuild's status says so and what to change, or it would go round forever unexplained."""
    def scan(hours: float) -> dict:
        return {"scan": {"start_time": "2026-11-01T00:00:00.000Z",
                         "end_time": datetime.fromtimestamp(1793491200 + hours * 3600, timezone.utc).isoformat()}}
    assert _advice_if_slower_than_the_stream(scan(2)) == ""
    advice = _advice_if_slower_than_the_stream(scan(30))
    assert "took 30.0 hours" in advice and "larger rcu budget" in advice and "use_scan_api false" in advice


def test_the_replay_skips_changes_the_bulk_load_already_holds():
    """After a bulk load the stream is replayed from TRIM_HORIZON; changes made more than a
    margin before the load began are in what it read, and are not applied again."""
    from datetime import datetime

    from shoal.index.collection import Change
    from shoal.ingest.pipeline import REPLAY_SKIP_MARGIN_S, _after_bulk_load_began

    started = "2026-11-23T10:00:00.000Z"
    start_us = int(datetime.fromisoformat(started).timestamp() * 1_000_000)
    meta = {"table": "t", "event": "MODIFY", "sequence_number": "1"}
    at = [start_us - int((REPLAY_SKIP_MARGIN_S + 5) * 1e6), start_us - int((REPLAY_SKIP_MARGIN_S - 5) * 1e6), start_us + 1]
    changes = [Change.of(f"d{i}", {"n": i}, t, meta) for i, t in enumerate(at)]
    kept = _after_bulk_load_began(changes, {"phase": "stream", "scan": {"start_time": started}})
    assert [c.id for c in kept] == ["d1", "d2"]
    assert _after_bulk_load_began(changes, {"phase": "stream", "stream": {}}) == changes  # no bulk load known
