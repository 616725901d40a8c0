"""Follows a DynamoDB stream, shard by shard, parent before child.

The reader's position is a plain dict (`StreamPosition`), saved by the collection in the
same manifest as the data it covers: `{"stream_arn", "shards": {shard_id: {"seq", "done"}}}`
where `seq` is the last sequence number applied. A shard with no `seq` is read from
TRIM_HORIZON; that is how the bulk load hands over: the position is taken before the scan
and replays every change since, which only overwrites documents with the same or a newer
state, so nothing written during the scan is lost.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from shoal.index.collection import Change

from .decode import decode_item, document_id

# New shards appear when DynamoDB splits one (about every 4 hours) or the table scales.
DESCRIBE_INTERVAL_S = 10.0
GET_RECORDS_LIMIT = 1000


class StreamTrimmed(Exception):
    """Changes were lost: the position fell behind the stream's 24-hour retention."""


def change_from_record(record: dict[str, Any], key_names: tuple[str, ...], table_name: str) -> Change:
    body = record["dynamodb"]
    event = record["eventName"]
    created = body.get("ApproximateCreationDateTime")
    event_time_us = int(created.timestamp() * 1_000_000) if created is not None else int(time.time() * 1_000_000)
    if event == "REMOVE":
        doc = None  # REMOVE carries Keys and OldImage; never read keys from an empty NewImage
    elif "NewImage" in body:
        doc = decode_item(body["NewImage"])
    else:
        raise ValueError("stream records carry no NewImage: the stream view type must be NEW_AND_OLD_IMAGES")
    return Change(
        id=document_id(body["Keys"], key_names),
        doc=doc,
        event_time_us=event_time_us,
        meta={"table": table_name, "event": event, "sequence_number": body.get("SequenceNumber")},
    )


@dataclass
class ReadResult:
    changes: list[Change]
    position: dict[str, Any]
    newest_event_time_us: int | None = None
    caught_up: bool = False  # every open shard returned nothing new


@dataclass
class StreamReader:
    client: Any
    position: dict[str, Any]
    key_names: tuple[str, ...]
    table_name: str
    _parents: dict[str, str | None] = field(default_factory=dict)
    _iterators: dict[str, str] = field(default_factory=dict)
    _described_at: float = 0.0

    async def _describe(self) -> None:
        """Learn the stream's shards and their parents (paginated)."""
        arn = self.position["stream_arn"]
        shards_state = self.position["shards"]
        request: dict[str, Any] = {"StreamArn": arn}
        listed: dict[str, str | None] = {}
        while True:
            description = (await self.client.describe_stream(**request))["StreamDescription"]
            for shard in description.get("Shards", []):
                listed[shard["ShardId"]] = shard.get("ParentShardId")
            last = description.get("LastEvaluatedShardId")
            if not last:
                break
            request["ExclusiveStartShardId"] = last
        self._parents = listed
        for shard_id in listed:
            shards_state.setdefault(shard_id, {"seq": None, "done": False})
        self._described_at = time.monotonic()

    def _ready_shards(self) -> list[str]:
        """Open shards whose parent is finished or no longer listed (trimmed away: never wait on it)."""
        shards_state = self.position["shards"]
        ready = []
        for shard_id, parent in self._parents.items():
            if shards_state[shard_id]["done"]:
                continue
            if parent is not None and parent in self._parents and not shards_state[parent]["done"]:
                continue
            ready.append(shard_id)
        return ready

    async def read(self) -> ReadResult:
        """One round over the ready shards. The returned position covers the returned changes."""
        if time.monotonic() - self._described_at > DESCRIBE_INTERVAL_S:
            await self._describe()
        changes: list[Change] = []
        newest = None
        caught_up = True
        for shard_id in self._ready_shards():
            state = self.position["shards"][shard_id]
            iterator = self._iterators.pop(shard_id, None) or await self._iterator(shard_id, state["seq"])
            try:
                response = await self.client.get_records(ShardIterator=iterator, Limit=GET_RECORDS_LIMIT)
            except self.client.exceptions.ExpiredIteratorException:
                continue  # re-acquired at the saved position next round
            except self.client.exceptions.TrimmedDataAccessException as error:
                raise StreamTrimmed(f"shard {shard_id} was trimmed past the saved position") from error
            records = response.get("Records", [])
            for record in records:
                change = change_from_record(record, self.key_names, self.table_name)
                changes.append(change)
                newest = max(newest or 0, change.event_time_us)
            if records:
                state["seq"] = records[-1]["dynamodb"]["SequenceNumber"]
                caught_up = False
            next_iterator = response.get("NextShardIterator")
            if next_iterator is None:
                state["done"] = True  # a closed shard read to its end
            else:
                self._iterators[shard_id] = next_iterator
        return ReadResult(changes, copy.deepcopy(self.position), newest, caught_up)

    async def _iterator(self, shard_id: str, seq: str | None) -> str:
        request = {"StreamArn": self.position["stream_arn"], "ShardId": shard_id}
        if seq is None:
            request["ShardIteratorType"] = "TRIM_HORIZON"
        else:
            request["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
            request["SequenceNumber"] = seq
        try:
            return (await self.client.get_shard_iterator(**request))["ShardIterator"]
        except self.client.exceptions.TrimmedDataAccessException as error:
            raise StreamTrimmed(f"shard {shard_id} was trimmed past the saved position") from error
