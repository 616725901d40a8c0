"""Kinesis Data Streams for DynamoDB, for the tests: a table's writes as KDS records in moto's Kinesis.

moto does not stream DynamoDB changes into Kinesis (EnableKinesisStreamingDestination is not
implemented, shared facts §4), so `KinesisFeed` does what DynamoDB would: it makes each write
on the real (moto) table, and files the KDS record of that write, in the documented JSON form
(`awsRegion, eventID, eventName, userIdentity, recordFormat, tableName, dynamodb:
{ApproximateCreationDateTime, Keys, NewImage, OldImage, SizeBytes}, eventSource`), with the
item's key as partition key (so an item's records share a shard, as with DynamoDB). `flush`
puts the pending records into the Kinesis stream shuffled and partly duplicated, as the
at-least-once delivery of the real destination may.

`PatchedMoto` runs moto's server (the real Kinesis and DynamoDB wire protocols) with its
resharding fixed to behave as Kinesis does: moto 5.2 keeps routing records to a closed parent
(it looks for the first shard whose hash range holds the key, closed or not) and moves or
copies the parent's records into the children. The patch routes records to open shards only
and leaves a parent's records where they are; nothing else changes.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from support import AWS_ENV, STARTUP_TIMEOUT, _http_ok, _kill_group, free_port, subprocess_env, tail

_MOTO_WITH_KINESIS_RESHARDING = r'''
import sys
from moto.kinesis import models
from moto.server import main


def get_shard_for_key(self, partition_key, explicit_hash_key):
    key = int(explicit_hash_key) if explicit_hash_key else int(models.md5_hash(partition_key.encode()).hexdigest(), 16)
    return next((s for s in self.shards.values() if s.is_open and s.starting_hash <= key <= s.ending_hash), None)


def _next_id(self):
    return max(s._shard_id for s in self.shards.values()) + 1


def split_shard(self, shard_to_split, new_starting_hash_key):
    shard, start = self.shards[shard_to_split], int(new_starting_hash_key)
    if not (shard.is_open and shard.starting_hash < start <= shard.ending_hash):
        raise models.InvalidArgumentError(message=f"cannot split {shard_to_split} at {start}")
    first = _next_id(self)
    for offset, (low, high) in enumerate(((shard.starting_hash, start - 1), (start, shard.ending_hash))):
        child = models.Shard(first + offset, low, high, parent=shard.shard_id)
        self.shards[child.shard_id] = child
    shard.is_open = False


def merge_shards(self, shard_to_merge, adjacent_shard_to_merge):
    low, high = self.shards[shard_to_merge], self.shards[adjacent_shard_to_merge]
    if not (low.is_open and high.is_open and low.ending_hash + 1 == high.starting_hash):
        raise models.InvalidArgumentError(adjacent_shard_to_merge)
    child = models.Shard(_next_id(self), low.starting_hash, high.ending_hash,
                         parent=low.shard_id, adjacent_parent=high.shard_id)
    self.shards[child.shard_id] = child
    low.is_open = high.is_open = False


models.Stream.get_shard_for_key = get_shard_for_key
models.Stream.split_shard = split_shard
models.Stream.merge_shards = merge_shards
sys.exit(main(sys.argv[1:]))
'''


class PatchedMoto:
    """moto's server (DynamoDB, Kinesis, ...) as a subprocess, with Kinesis resharding as AWS does it."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PatchedMoto":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _MOTO_WITH_KINESIS_RESHARDING, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            if _http_ok(self.url + "/moto-api/"):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto did not come up in {STARTUP_TIMEOUT}s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc, 15)
            self.proc.wait(timeout=10)


def boto(service: str, endpoint_url: str):
    return boto3.client(service, endpoint_url=endpoint_url, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                        config=Config(retries={"max_attempts": 1}))


def create_stream(kinesis, name: str, shards: int) -> str:
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    return kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamARN"]


def wire(value: dict) -> dict:
    """An AttributeValue as boto3 gives it (bytes for B) → DynamoDB JSON as on the wire (base64)."""
    (kind, inner), = value.items()
    if kind == "B":
        return {"B": base64.b64encode(inner).decode()}
    if kind == "BS":
        return {"BS": [base64.b64encode(b).decode() for b in inner]}
    if kind == "M":
        return {"M": {k: wire(v) for k, v in inner.items()}}
    if kind == "L":
        return {"L": [wire(v) for v in inner]}
    return value


def wire_item(item: dict) -> dict:
    return {name: wire(value) for name, value in item.items()}


class KinesisFeed:
    """Writes to a table and files, for each write, the record Kinesis Data Streams for DynamoDB
    would carry. `precision` is the destination's ApproximateCreationDateTimePrecision. An item's
    records get strictly increasing timestamps (its writes are apart by at least one unit here)."""

    def __init__(self, endpoint_url: str, table: str, stream_arn: str, key_names: tuple[str, ...],
                 precision: str = "MILLISECOND", seed: int = 0) -> None:
        self.dynamodb = boto("dynamodb", endpoint_url)
        self.kinesis = boto("kinesis", endpoint_url)
        self.table, self.stream_arn, self.key_names, self.precision = table, stream_arn, key_names, precision
        self.random = random.Random(seed)
        self.pending: list[dict] = []  # records not put into the stream yet, in write order
        self.filed: list[dict] = []  # every record put (first copy), in write order
        self._last_time: dict[str, int] = {}
        self.last_seq: dict[str, int] = {}  # per shard, the highest sequence number put

    # ---- writes

    def put(self, item: dict) -> dict:
        old = self.dynamodb.put_item(TableName=self.table, Item=item, ReturnValues="ALL_OLD").get("Attributes")
        return self._record("MODIFY" if old else "INSERT", item, new=item, old=old)

    def delete(self, key: dict) -> dict | None:
        old = self.dynamodb.delete_item(TableName=self.table, Key=key, ReturnValues="ALL_OLD").get("Attributes")
        return self._record("REMOVE", key, new=None, old=old) if old else None  # no item: no record

    def late_copy(self, event: str, item: dict, age_s: float) -> dict:
        """The stream record of a write of `item` made `age_s` ago, as a retried put delivers it
        long after the first (the write is not made, and the record is not filed)."""
        record = self._kds_record(event, item, new=item if event != "REMOVE" else None, old=None, created_s=time.time() - age_s)
        return {"PartitionKey": self._partition_key(item), "Data": json.dumps(record).encode()}

    def _record(self, event: str, item: dict, new: dict | None, old: dict | None) -> dict:
        partition_key = self._partition_key(item)
        record = self._kds_record(event, item, new, old, time.time(), self._last_time.get(partition_key, 0) + 1)
        self._last_time[partition_key] = record["dynamodb"]["ApproximateCreationDateTime"]
        self.pending.append({"PartitionKey": partition_key, "Data": json.dumps(record).encode()})
        return record

    def _partition_key(self, item: dict) -> str:
        return json.dumps(wire_item({name: item[name] for name in self.key_names}), sort_keys=True)

    def _kds_record(self, event: str, item: dict, new: dict | None, old: dict | None, created_s: float,
                    not_before: int = 0) -> dict:
        keys = {name: item[name] for name in self.key_names}
        created = int(created_s * 1_000_000) if self.precision == "MICROSECOND" else int(created_s * 1000)
        created = max(created, not_before)
        body: dict[str, Any] = {"ApproximateCreationDateTime": created, "Keys": wire_item(keys),
                                "SizeBytes": len(json.dumps(wire_item(new or old or keys)))}
        if new is not None:
            body["NewImage"] = wire_item(new)
        if old is not None:
            body["OldImage"] = wire_item(old)
        return {"awsRegion": AWS_ENV["AWS_DEFAULT_REGION"], "eventID": str(uuid.uuid4()), "eventName": event,
                "userIdentity": None, "recordFormat": "application/json", "tableName": self.table,
                "dynamodb": body, "eventSource": "aws:dynamodb"}

    # ---- delivery

    def flush(self, shuffle: bool = True, duplicates: float = 0.3) -> int:
        """Put the pending records into the stream: shuffled, and a `duplicates` share of them
        twice (a retried put). Returns how many records were put."""
        records = list(self.pending)
        self.filed.extend(self.pending)
        self.pending.clear()
        records += [r for r in records if self.random.random() < duplicates]
        if shuffle:
            self.random.shuffle(records)
        self.put_records(records)
        return len(records)

    def put_records(self, records: list[dict]) -> None:
        for start in range(0, len(records), 500):
            answer = self.kinesis.put_records(StreamARN=self.stream_arn, Records=records[start:start + 500])
            assert answer["FailedRecordCount"] == 0, answer
            for put in answer["Records"]:
                self.last_seq[put["ShardId"]] = max(self.last_seq.get(put["ShardId"], 0), int(put["SequenceNumber"]))

    def replay(self, start: int, end: int) -> None:
        """Put again, in order, the filed records [start, end) (a stretch delivered twice)."""
        self.put_records(self.filed[start:end])
