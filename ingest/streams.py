"""Follows a DynamoDB stream: every shard, parent before child, from a saved position.

The reader's position is a plain dict, saved by the collection in the same manifest as the
data it covers:

    {"stream_arn": ...,
     "shards": {shard_id: {"seq": last sequence number applied or None, "done": read to its end}},
     "verified_at": epoch seconds of the DescribeStream whose shards the position holds}

A shard with no `seq` is read from TRIM_HORIZON; that is how the bulk load hands over: the
position is taken before the scan and replays every change since, which only overwrites
documents with the same or a newer state, so nothing written during the scan is lost.

What DynamoDB Streams requires (docs: shared facts §2), and how the reader honours it:

- Lineage. A shard is read once its parent is done (read to its end), or when the parent is
  no longer listed: an unlisted parent has expired, so all its records predate the position
  and nothing is waited for. Children become readable in a later round than the one that
  finished their parent, and the pipeline applies each round before asking for the next, so
  an item's changes are applied in stream order across a split.
- One reader per shard: each round reads every due shard once, in parallel; rounds never
  overlap (DynamoDB throttles beyond two readers per shard).
- Sequence numbers are decimal strings of varying length: compared as integers, and a record
  at or below the saved one is never applied twice.
- Expired iterators (15 minutes) are re-acquired after the last applied record.
- Lost changes are never skipped silently: `TrimmedDataAccessException`, a shard that was in
  the position but vanished before it was read to its end, or a position last verified longer
  ago than the stream keeps records raise `StreamTrimmed`; the pipeline then rebuilds. Unless
  what was trimmed is older than the bulk load's state (`covered_before`): a replay after a
  bulk load starts at TRIM_HORIZON, where a busy table's records are trimmed all the time.
- Polling: a shard that returned a full page is read again at once, one that returned records
  after the poll interval, an idle one after a wait that doubles up to a small cap
  (`idle_wait`), a throttled one (`LimitExceededException`) after an exponential wait with
  jitter. New shards are found by DescribeStream every 10 s, and at once when a shard ends.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from dataclasses import dataclass
from typing import Any

from shoal.index.collection import Change

from .decode import document_id, item_text

# DynamoDB Streams keeps records 24 h; trimming may come a little early by our clock.
RETENTION_S = 24 * 3600.0
RETENTION_MARGIN_S = 30 * 60.0
# New shards appear when DynamoDB splits one (about every 4 hours) or the table scales.
DESCRIBE_INTERVAL_S = 10.0
# While no shard is readable (children not listed yet), look again sooner.
DESCRIBE_RETRY_S = 1.0
# An idle reader re-saves its position this often, so a restart knows how current it was.
VERIFIED_REFRESH_S = 600.0
GET_RECORDS_LIMIT = 1000
FULL_PAGE_BYTES = 900 * 1024  # GetRecords also stops at 1 MB
MAX_PARALLEL_READS = 8  # below aiobotocore's 10 pooled connections
IDLE_WAIT_CAP_S = 0.8  # a write after a quiet spell is still read within a second
IDLE_WAIT_FACTOR = 4
THROTTLE_WAIT_MIN_S = 0.1
THROTTLE_WAIT_CAP_S = 5.0


class StreamTrimmed(Exception):
    """Changes were lost: the position fell behind the stream's 24-hour retention."""


class StreamEnded(Exception):
    """The stream was disabled and every shard has been read to its end."""


def lag_ms(fresh_as_of: float | None) -> int | None:
    """How far behind the table a view read up to `fresh_as_of` is, now."""
    return None if fresh_as_of is None else max(0, int((time.time() - fresh_as_of) * 1000))


def idle_wait(poll_s: float, empty_reads: int) -> float:
    """The wait before reading a shard again after `empty_reads` empty reads in a row: the poll
    interval, doubling, capped at a few poll intervals and at IDLE_WAIT_CAP_S (never below
    the poll interval itself)."""
    cap = max(poll_s, min(poll_s * IDLE_WAIT_FACTOR, IDLE_WAIT_CAP_S))
    return min(cap, poll_s * 2 ** max(0, empty_reads - 1))


def throttle_wait(poll_s: float, throttles: int) -> float:
    """The wait after `throttles` LimitExceededException in a row: exponential, jittered."""
    ceiling = min(THROTTLE_WAIT_CAP_S, max(poll_s, THROTTLE_WAIT_MIN_S) * 2 ** max(0, throttles - 1))
    return random.uniform(ceiling / 2, ceiling)


def change_from_record(record: dict[str, Any], key_names: tuple[str, ...], table_name: str) -> Change:
    body = record["dynamodb"]
    event = record["eventName"]
    created = body.get("ApproximateCreationDateTime")
    event_time_us = int(created.timestamp() * 1_000_000) if created is not None else int(time.time() * 1_000_000)
    if event == "REMOVE":
        item = None  # REMOVE carries Keys and OldImage; never read keys from an empty NewImage
    elif "NewImage" in body:
        item = item_text(body["NewImage"])
    else:
        raise ValueError("stream records carry no NewImage: the stream view type must be NEW_AND_OLD_IMAGES")
    return Change(
        id=document_id(body["Keys"], key_names),
        item=item,
        event_time_us=event_time_us,
        meta={"table": table_name, "event": event, "sequence_number": body.get("SequenceNumber")},
    )


@dataclass
class ReadResult:
    changes: list[Change]
    position: dict[str, Any]  # covers exactly `changes` (and everything before)
    caught_up: bool  # every readable shard's last read found nothing new
    fresh_as_of: float | None  # the least fresh readable shard's (`Shard.fresh_as_of`)


@dataclass
class Shard:
    """What a reader knows of a listed shard beyond its saved position."""

    parents: tuple[str, ...]  # Kinesis names two after a merge
    ending_seq: str | None = None  # Kinesis: set once the shard is closed
    iterator: str | None = None
    due: float = 0.0  # monotonic time of its next read
    empty_reads: int = 0
    throttles: int = 0
    at_tip: bool = False
    # Epoch seconds the shard's changes are read up to: its last record's creation time, or
    # when it was last found at its tip. What the lag counts from, even while reads fail.
    fresh_as_of: float | None = None


@dataclass
class Page:
    records: list[dict[str, Any]]
    ended: bool  # the shard is closed and read to its end
    at_tip: bool = True  # nothing further to read now


class ShardRounds:
    """Reading a sharded change stream in rounds, whichever service serves it (DynamoDB
    Streams here, Kinesis in `shoal.ingest.kinesis`): parents before children, every due shard
    read once per round, the position a plain dict the collection saves with the data.
    Subclasses list the shards (`_list`), read one (`_read_shard`) and turn a page into
    changes (`_take`). After `read` raises, make a new reader from the saved position: this
    one may hold iterators past what was applied."""

    STREAM = "stream"  # how messages name it

    def __init__(
        self, client: Any, position: dict[str, Any], key_names: tuple[str, ...], table_name: str, poll_interval_s: float
    ) -> None:
        self.client = client
        self.position = position
        self.key_names = key_names
        self.table_name = table_name
        self.poll_interval_s = poll_interval_s
        self.throttled_requests = 0
        self._shards: dict[str, Shard] = {}  # as last listed, in listing order
        self._listed_at: float | None = None  # wall-clock time of that listing
        self._list_due = 0.0
        self._parallel = asyncio.Semaphore(MAX_PARALLEL_READS)

    # ------------------------------------------------------------------ one round

    async def read(self) -> ReadResult:
        """Wait until a shard is due, then read every due shard once."""
        await self._before_round()
        await self._wait_for_due()
        changed = False
        if time.monotonic() >= self._list_due:
            changed = await self._list()
        self._after_listing()
        now = time.monotonic()
        due = [shard_id for shard_id in self._readable() if self._shards[shard_id].due <= now]
        pages = await asyncio.gather(*(self._read_shard(shard_id) for shard_id in due), return_exceptions=True)
        for page in pages:
            if isinstance(page, BaseException):
                raise page
        changes: list[Change] = []
        for shard_id, page in zip(due, pages):
            if page is not None:
                changes.extend(self._take(shard_id, page))
                changed = changed or bool(page.records) or page.ended
        self._refresh_verified(changed)
        return ReadResult(changes, copy.deepcopy(self.position), self._caught_up(), self._fresh_as_of())

    def shard_status(self) -> list[dict[str, Any]]:
        """Per listed shard: where the reader is, for the collection's status."""
        states = self.position["shards"]
        return [
            {
                "shard_id": shard_id,
                "parent_shard_id": shard.parents[0] if shard.parents else None,
                **({"adjacent_parent_shard_id": shard.parents[1]} if len(shard.parents) > 1 else {}),
                "last_sequence_number": states[shard_id]["seq"],
                "done": states[shard_id]["done"],
                "lag_ms": lag_ms(shard.fresh_as_of),
            }
            for shard_id, shard in self._shards.items()
        ]

    async def _before_round(self) -> None:
        """Checks before reading (the saved position's age)."""

    def _after_listing(self) -> None:
        """Checks once the shards are known (whether the stream ended)."""

    def _check_age(self, retention_s: float, retention_text: str) -> None:
        """A position last confirmed longer ago than the stream keeps records may have missed some."""
        verified_at = self.position.get("verified_at")  # absent only in positions saved before it existed
        if verified_at is None:
            return
        age = time.time() - verified_at
        if age > retention_s - RETENTION_MARGIN_S:
            raise StreamTrimmed(
                f"the saved {self.STREAM} position was last confirmed {age / 3600:.1f} hours ago and the stream "
                f"keeps records for {retention_text}, so some were trimmed unread"
            )

    async def _wait_for_due(self) -> None:
        due = [self._shards[shard_id].due for shard_id in self._readable()]
        delay = min([*due, self._list_due]) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def _readable(self) -> list[str]:
        """Listed shards not done whose listed parents are all done (a parent no longer listed
        has expired: never wait on it)."""
        states = self.position["shards"]
        return [
            shard_id
            for shard_id, shard in self._shards.items()
            if not states[shard_id]["done"]
            and all(parent not in self._shards or states[parent]["done"] for parent in shard.parents)
        ]

    def _caught_up(self) -> bool:
        readable = self._readable()  # none while a finished parent's children are not listed yet
        return bool(readable) and all(self._shards[shard_id].at_tip for shard_id in readable)

    def _fresh_as_of(self) -> float | None:
        times = [self._shards[s].fresh_as_of for s in self._readable() if self._shards[s].fresh_as_of is not None]
        return min(times) if times else None

    def _refresh_verified(self, changed: bool) -> None:
        """Stamp the position with its listing's time when it is saved anyway, and at least
        every VERIFIED_REFRESH_S (which makes the pipeline save it)."""
        if self._listed_at is None:
            return
        stale = time.time() - self.position.get("verified_at", 0.0) > VERIFIED_REFRESH_S
        if changed or stale:
            self.position["verified_at"] = self._listed_at

    # ------------------------------------------------------------------ shards

    def _adopt_listing(self, listed: dict[str, Shard], listed_at: float, interval_s: float, retry_s: float) -> bool:
        """Take `listed` as the shards (keeping what is known of each), forget finished shards
        that expired, and schedule the next listing. Returns whether the position changed.
        An unfinished shard that is no longer listed lost its unread records: StreamTrimmed."""
        states = self.position["shards"]
        changed = False
        for shard_id, state in states.items():  # raised before anything changes: rounds queued still apply
            if shard_id not in listed and not state["done"] and not self._lost_records_are_covered():
                raise StreamTrimmed(
                    f"{self.STREAM} shard {shard_id} expired before it was read to its end "
                    f"(last sequence number read: {state['seq'] or 'none'})"
                )
        for shard_id in [s for s in states if s not in listed]:
            del states[shard_id]  # finished (or its records all older than the bulk load), and now past retention
            changed = True
        for shard_id in listed:
            if shard_id not in states:
                states[shard_id] = {"seq": None, "done": False}
                changed = True
        shards = {}
        for shard_id, fresh in listed.items():
            shards[shard_id] = self._shards.get(shard_id) or fresh
            shards[shard_id].ending_seq = fresh.ending_seq
        self._shards = shards
        self._listed_at = listed_at
        self._list_due = time.monotonic() + (interval_s if self._readable() else retry_s)
        return changed

    def _lost_records_are_covered(self) -> bool:
        """Whether records trimmed by now are all in the collection already (see StreamReader)."""
        return False

    async def _list(self) -> bool:
        raise NotImplementedError

    async def _read_shard(self, shard_id: str) -> Page | None:
        raise NotImplementedError

    def _take(self, shard_id: str, page: Page) -> list[Change]:
        raise NotImplementedError


class StreamReader(ShardRounds):
    """Reads one DynamoDB stream from `position`. `covered_before` (epoch seconds): changes
    made before it are in the collection already (its bulk load read them), so losing them to
    trimming loses nothing."""

    def __init__(
        self, client: Any, position: dict[str, Any], key_names: tuple[str, ...], table_name: str, poll_interval_s: float,
        covered_before: float | None = None,
    ) -> None:
        super().__init__(client, position, key_names, table_name, poll_interval_s)
        self.covered_before = covered_before
        self._stream_enabled = True
        self._age_checked = False

    async def _before_round(self) -> None:
        if not self._age_checked:
            self._check_age(RETENTION_S, "24 hours")
            self._age_checked = True

    def _after_listing(self) -> None:
        if not self._stream_enabled and all(state["done"] for state in self.position["shards"].values()):
            raise StreamEnded(f"the stream {self.position['stream_arn']} was disabled and has been read to its end")

    async def _list(self) -> bool:
        """DescribeStream (paginated): the shards and their parents, and whether the stream is
        still enabled."""
        listed: dict[str, Shard] = {}
        request: dict[str, Any] = {"StreamArn": self.position["stream_arn"]}
        listed_at = time.time()
        try:
            while True:
                description = (await self.client.describe_stream(**request))["StreamDescription"]
                for shard in description.get("Shards", []):
                    parent = shard.get("ParentShardId")
                    listed[shard["ShardId"]] = Shard((parent,) if parent else ())
                if not description.get("LastEvaluatedShardId"):
                    break
                request["ExclusiveStartShardId"] = description["LastEvaluatedShardId"]
        except self.client.exceptions.LimitExceededException:
            self.throttled_requests += 1
            self._list_due = time.monotonic() + throttle_wait(self.poll_interval_s, 1)
            return False
        self._stream_enabled = description.get("StreamStatus", "ENABLED") in ("ENABLED", "ENABLING")
        return self._adopt_listing(listed, listed_at, DESCRIBE_INTERVAL_S, DESCRIBE_RETRY_S)

    async def _read_shard(self, shard_id: str) -> Page | None:
        """One GetRecords (re-acquiring an expired iterator once); None when the shard could
        not be read this round (it is rescheduled)."""
        shard = self._shards[shard_id]
        seq = self.position["shards"][shard_id]["seq"]
        async with self._parallel:
            for attempt in (1, 2):
                try:
                    if shard.iterator is None:
                        shard.iterator = await self._iterator(shard_id, seq)
                    response = await self.client.get_records(ShardIterator=shard.iterator, Limit=GET_RECORDS_LIMIT)
                except self.client.exceptions.ExpiredIteratorException:
                    shard.iterator = None  # re-acquired after the last applied record
                    if attempt == 2:
                        shard.due = time.monotonic() + self.poll_interval_s
                        return None
                    continue
                except self.client.exceptions.LimitExceededException:
                    self.throttled_requests += 1
                    shard.throttles += 1
                    shard.at_tip = False
                    shard.due = time.monotonic() + throttle_wait(self.poll_interval_s, shard.throttles)
                    return None
                except self.client.exceptions.TrimmedDataAccessException as error:
                    if not self._lost_records_are_covered():
                        raise StreamTrimmed(
                            f"the stream was trimmed past the saved position of shard {shard_id} "
                            f"(sequence number {seq or 'TRIM_HORIZON'}): changes after it were lost"
                        ) from error
                    # As a bulk load's replay begins, at TRIM_HORIZON, where records are being
                    # trimmed: go on from the oldest record left (`_take` skips what was applied).
                    shard.iterator, seq = None, None
                    if attempt == 2:
                        shard.due = time.monotonic() + self.poll_interval_s
                        return None
                    continue
                shard.throttles = 0
                shard.iterator = response.get("NextShardIterator")
                return Page(response.get("Records", []), ended=shard.iterator is None)
        raise AssertionError("unreachable")

    def _lost_records_are_covered(self) -> bool:
        """Whether every record trimmed by now is older than `covered_before`: DynamoDB trims
        records older than RETENTION_S (a little early, by our clock)."""
        trimmed_before = time.time() - RETENTION_S + RETENTION_MARGIN_S
        return self.covered_before is not None and trimmed_before < self.covered_before

    async def _iterator(self, shard_id: str, seq: str | None) -> str:
        request = {"StreamArn": self.position["stream_arn"], "ShardId": shard_id}
        if seq is None:
            request["ShardIteratorType"] = "TRIM_HORIZON"
        else:
            request["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
            request["SequenceNumber"] = seq
        return (await self.client.get_shard_iterator(**request))["ShardIterator"]

    def _take(self, shard_id: str, page: Page) -> list[Change]:
        """The page's new records as changes; advances the shard's position and schedule."""
        shard, state = self._shards[shard_id], self.position["shards"][shard_id]
        last = int(state["seq"]) if state["seq"] is not None else -1
        records = [r for r in page.records if int(r["dynamodb"]["SequenceNumber"]) > last]
        changes = [change_from_record(record, self.key_names, self.table_name) for record in records]
        now = time.monotonic()
        if records:
            state["seq"] = records[-1]["dynamodb"]["SequenceNumber"]
            full = len(page.records) >= GET_RECORDS_LIMIT or sum(
                r["dynamodb"].get("SizeBytes", 0) for r in page.records
            ) >= FULL_PAGE_BYTES
            shard.due = now if full else now + self.poll_interval_s
            shard.empty_reads, shard.at_tip = 0, False
            shard.fresh_as_of = changes[-1].event_time_us / 1_000_000
        else:
            shard.empty_reads += 1
            shard.due = now + idle_wait(self.poll_interval_s, shard.empty_reads)
            shard.at_tip, shard.fresh_as_of = True, time.time()
        if page.ended:
            state["done"] = True
            self._list_due = now  # its children are listed by now
        return changes
