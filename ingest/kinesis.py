"""Follows a Kinesis data stream that DynamoDB streams a table's changes into (Kinesis Data
Streams for DynamoDB). `KinesisReader` shares `StreamReader`'s rounds, lineage and position
(`shoal.ingest.streams.ShardRounds`), so the pipeline follows either source with one loop.

The position is a plain dict, saved by the collection in the same manifest as the data it
covers (no KCL lease table):

    {"stream_arn": the Kinesis stream's ARN,
     "start_at": epoch seconds where a shard never read starts (AT_TIMESTAMP), or None for
                 TRIM_HORIZON; set from the time before the bulk load began,
     "shards": {shard_id: {"seq": last Kinesis sequence number applied or None, "done": bool,
                           "read_up_to": epoch seconds it is read up to (see `_check_shards_read_recently`)}},
     "verified_at": epoch seconds of the ListShards whose shards the position holds}

Kinesis records carry no DynamoDB sequence number and may be duplicated or out of order
(the table writes to the stream at least once). Each record's `dynamodb.ApproximateCreationDateTime`
(epoch milliseconds, or microseconds with the destination's MICROSECOND precision: told apart
by magnitude) becomes the change's `event_time_us`, and the pipeline applies the changes with
`Collection.apply_newer`: per item, newer wins; duplicates, older versions and changes older
than a delete are dropped (tombstones, kept as long as the stream keeps records).

What Kinesis requires, and how the reader honours it:

- Lineage. ListShards (paginated) gives each shard's `ParentShardId` and, after a merge,
  `AdjacentParentShardId`. A shard is read once every listed parent is done; a parent no
  longer listed has expired and is never waited for. Children become readable in a round
  after their parents' last records, and the pipeline applies each round before the next.
- A closed shard is read to its end: GetRecords without `NextShardIterator`, or (as moto
  answers) an empty page at the `EndingSequenceNumber` ListShards gave it.
- Iterators: a shard never read starts AT_TIMESTAMP `start_at` (a little before the bulk load
  began, so no change made during the scan is missed; replaying more is harmless because
  newer wins), an expired iterator is re-acquired AFTER_SEQUENCE_NUMBER of the last applied
  record.
- Throttling (`ProvisionedThroughputExceededException`, `LimitExceededException`) backs the
  shard (or the listing) off exponentially, with jitter.
- Lost changes are never skipped silently: a shard of the position that is no longer listed
  before it was read to its end, or a position last confirmed longer ago than the stream's
  retention (DescribeStreamSummary `RetentionPeriodHours`), raises `StreamTrimmed`, and the
  pipeline rebuilds the collection; so does a shard read up to longer ago than that (Kinesis
  serves the oldest record left after a trimmed one, without an error).
- Records of other tables (a stream can serve several) are skipped.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from shoal.index.collection import Change

from .decode import document_id, item_text
from .streams import (
    GET_RECORDS_LIMIT,
    RETENTION_MARGIN_S,
    Page,
    Shard,
    ShardRounds,
    StreamTrimmed,
    idle_wait,
    throttle_wait,
)

LIST_INTERVAL_S = 10.0  # new shards appear when the stream is resharded
LIST_RETRY_S = 1.0  # while no shard is readable (children not listed yet)
# ApproximateCreationDateTime: epoch ms is ~1.7e12 today, epoch µs ~1.7e15.
MICROSECONDS_ABOVE = 10**14


def event_time_us(created: int | float) -> int:
    """ApproximateCreationDateTime (epoch ms, or µs with MICROSECOND precision) in µs."""
    return int(created) if created >= MICROSECONDS_ABOVE else int(created * 1000)


def change_from_kinesis(record: dict[str, Any], key_names: tuple[str, ...], table_name: str) -> Change | None:
    """A Kinesis record's change, or None when it belongs to another table."""
    body = orjson.loads(record["Data"])
    if body.get("tableName", table_name) != table_name:
        return None
    ddb = body["dynamodb"]
    event = body["eventName"]
    if event == "REMOVE":
        item = None  # keyed by Keys; never by an image
    elif "NewImage" in ddb:
        item = item_text(ddb["NewImage"])
    else:
        raise ValueError(f"a {event} record of table {table_name} carries no NewImage")
    return Change(
        id=document_id(ddb["Keys"], key_names),
        item=item,
        event_time_us=event_time_us(ddb["ApproximateCreationDateTime"]),
        # No DynamoDB sequence number in a Kinesis record; the Kinesis one differs between copies
        # of a record, and a replayed duplicate must leave its document exactly as it was.
        meta={"table": table_name, "event": event, "sequence_number": None},
    )


def _arrival_s(record: dict[str, Any]) -> float:
    """When Kinesis took the record (epoch seconds); botocore reads it as a datetime."""
    arrived = record.get("ApproximateArrivalTimestamp")
    return arrived.timestamp() if arrived is not None else time.time()


class KinesisReader(ShardRounds):
    """Reads one Kinesis stream from `position`."""

    STREAM = "Kinesis"

    def __init__(
        self, client: Any, position: dict[str, Any], key_names: tuple[str, ...], table_name: str, poll_interval_s: float
    ) -> None:
        super().__init__(client, position, key_names, table_name, poll_interval_s)
        self.retention_s: float | None = None  # from DescribeStreamSummary, on the first read
        self._list_throttles = 0

    @property
    def tombstone_keep_s(self) -> float:
        """How long a delete must be remembered: a late change can come as long as the stream keeps records."""
        assert self.retention_s is not None, "known after the first read"
        return self.retention_s + RETENTION_MARGIN_S

    async def _before_round(self) -> None:
        if self.retention_s is None:
            summary = (await self.client.describe_stream_summary(StreamARN=self.position["stream_arn"]))
            self.retention_s = summary["StreamDescriptionSummary"]["RetentionPeriodHours"] * 3600.0
            self._check_age(self.retention_s, f"{self.retention_s / 3600:g} hours")
        self._check_shards_read_recently()

    def _check_shards_read_recently(self) -> None:
        """Kinesis has no TrimmedDataAccessException: an iterator after a trimmed record starts at
        the oldest one left, silently. So each shard's position says when it was read up to (its
        last record's creation time, or when it was last at its tip), and a shard read up to
        longer ago than the stream keeps records may have lost some: StreamTrimmed."""
        assert self.retention_s is not None
        for shard_id, state in self.position["shards"].items():
            age = time.time() - state.get("read_up_to", time.time())
            if not state["done"] and age > self.retention_s - RETENTION_MARGIN_S:
                raise StreamTrimmed(
                    f"Kinesis shard {shard_id} was read up to {age / 3600:.1f} hours ago and the stream keeps records "
                    f"for {self.retention_s / 3600:g} hours, so some may have been trimmed unread")

    def _refresh_verified(self, changed: bool) -> None:
        super()._refresh_verified(changed)
        if self.position.get("verified_at") == self._listed_at:  # saved now: how current each shard is, too
            for shard_id, shard in self._shards.items():
                if shard.fresh_as_of is not None:
                    self.position["shards"][shard_id]["read_up_to"] = shard.fresh_as_of

    async def _list(self) -> bool:
        """ListShards (paginated): the shards, their parents, and where closed ones end."""
        listed: dict[str, Shard] = {}
        request: dict[str, Any] = {"StreamARN": self.position["stream_arn"]}
        listed_at = time.time()
        try:
            while True:
                answer = await self.client.list_shards(**request)
                for shard in answer.get("Shards", []):
                    parents = tuple(p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p)
                    ending = shard.get("SequenceNumberRange", {}).get("EndingSequenceNumber")
                    listed[shard["ShardId"]] = Shard(parents, ending)
                if not answer.get("NextToken"):
                    break
                request = {"NextToken": answer["NextToken"]}  # (a NextToken excludes the stream's name)
        except self.client.exceptions.LimitExceededException:
            self.throttled_requests += 1
            self._list_throttles += 1
            self._list_due = time.monotonic() + throttle_wait(self.poll_interval_s, self._list_throttles)
            return False
        self._list_throttles = 0
        return self._adopt_listing(listed, listed_at, LIST_INTERVAL_S, LIST_RETRY_S)

    async def _read_shard(self, shard_id: str) -> Page | None:
        """One GetRecords (re-acquiring an expired iterator once); None when the shard could
        not be read this round (it is rescheduled)."""
        shard = self._shards[shard_id]
        errors = self.client.exceptions
        async with self._parallel:
            for attempt in (1, 2):
                try:
                    if shard.iterator is None:
                        shard.iterator = await self._iterator(shard_id)
                    response = await self.client.get_records(
                        StreamARN=self.position["stream_arn"], ShardIterator=shard.iterator, Limit=GET_RECORDS_LIMIT)
                except errors.ExpiredIteratorException:
                    shard.iterator = None  # re-acquired after the last applied record
                    if attempt == 2:
                        shard.due = time.monotonic() + self.poll_interval_s
                        return None
                    continue
                except (errors.ProvisionedThroughputExceededException, errors.LimitExceededException):
                    self.throttled_requests += 1
                    shard.throttles += 1
                    shard.at_tip = False
                    shard.due = time.monotonic() + throttle_wait(self.poll_interval_s, shard.throttles)
                    return None
                shard.throttles = 0
                records = response.get("Records", [])
                shard.iterator = response.get("NextShardIterator")
                at_tip = not records and response.get("MillisBehindLatest", 0) == 0
                ended = shard.iterator is None or (shard.ending_seq is not None and at_tip)
                return Page(records, ended, at_tip)
        raise AssertionError("unreachable")

    async def _iterator(self, shard_id: str) -> str:
        request: dict[str, Any] = {"StreamARN": self.position["stream_arn"], "ShardId": shard_id}
        seq = self.position["shards"][shard_id]["seq"]
        if seq is not None:
            request.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=seq)
        elif self.position.get("start_at") is not None:
            request.update(ShardIteratorType="AT_TIMESTAMP", Timestamp=self.position["start_at"])
        else:
            request["ShardIteratorType"] = "TRIM_HORIZON"
        return (await self.client.get_shard_iterator(**request))["ShardIterator"]

    def _take(self, shard_id: str, page: Page) -> list[Change]:
        """The page's records as changes (other tables' skipped); advances the shard's position
        and schedule."""
        shard, state = self._shards[shard_id], self.position["shards"][shard_id]
        changes = [c for c in (change_from_kinesis(r, self.key_names, self.table_name) for r in page.records) if c]
        now = time.monotonic()
        if page.records:
            state["seq"] = page.records[-1]["SequenceNumber"]
            full = len(page.records) >= GET_RECORDS_LIMIT
            shard.due = now if full else now + self.poll_interval_s
            shard.empty_reads, shard.at_tip = 0, False
            # Read up to the newest record's arrival (what retention trims by), other tables'
            # records too: a table idle on a shared stream is still read up to date.
            arrived = max(_arrival_s(record) for record in page.records)
            shard.fresh_as_of = state["read_up_to"] = max(state.get("read_up_to", 0.0), arrived)
        else:
            shard.empty_reads += 1
            shard.at_tip = page.at_tip
            if page.at_tip:
                shard.due, shard.fresh_as_of = now + idle_wait(self.poll_interval_s, shard.empty_reads), time.time()
            else:  # Kinesis may answer an empty page with records further on (MillisBehindLatest > 0)
                shard.due = now + self.poll_interval_s
        if page.ended:
            state["done"] = True
            self._list_due = now  # its children are listed by now
        return changes
