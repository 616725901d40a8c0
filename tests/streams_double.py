"""A test double: DynamoDB Streams with the shard lineage, trimming and faults moto lacks.

moto serves one stream shard per table that never splits or closes, never trims, never
expires an iterator and never throttles (shared facts §4). `StreamsDouble` listens on
loopback and speaks the real DynamoDB Streams wire protocol: JSON 1.0 on `POST /` with
`X-Amz-Target: DynamoDBStreams_20120810.<Op>` for DescribeStream (paginated by `Limit` and
`ExclusiveStartShardId`), GetShardIterator (all four iterator types), GetRecords and
ListStreams, with errors as HTTP 400 `{"__type": "com.amazonaws.dynamodb.v20120810#<Code>",
"message": ...}`, so aiobotocore raises the real exceptions. What it models:

* **Partitions and lineage.** Each shard owns a range of key hashes and receives the records
  of the items in it. `split` closes a shard (its range gets an `EndingSequenceNumber`) and
  opens two children (`ParentShardId`) that share its range, as DynamoDB does when a
  partition splits, so an item's records are in the parent first, then in one child.
* **Closed shards.** GetRecords returns a closed shard's last records without a
  `NextShardIterator`.
* **Sequence numbers.** Decimal strings of at least 21 digits (botocore refuses shorter ones),
  increasing through the stream, starting just below a power of ten (`first_sequence_number`)
  so their length changes: compare them as integers.
  `ApproximateCreationDateTime` is rounded down to the second, as DynamoDB documents.
* **Trimming.** `trim` drops records; asking for an iterator after a position whose next
  records were dropped, or using an older iterator there, gives TrimmedDataAccessException.
  TRIM_HORIZON starts after what was dropped. `expire_shard` trims a shard and stops listing
  it (what 24 hours do to a closed shard).
* **Iterator expiry.** `expire_iterators` on demand, or every Nth GetRecords
  (`expire_every`): ExpiredIteratorException.
* **Throttling.** `throttle(n, operation)` fails the next n calls of an operation with
  LimitExceededException; so do more than two GetRecords in flight on one shard (DynamoDB's
  documented limit). The highest concurrency seen per shard is recorded.
* **A clock of its own.** With `clock_offset_s`, the double's clock runs that far from this
  machine's: records are stamped by it and every answer's `Date` header gives it, as
  DynamoDB's clock may differ from Shoal's.
* **Disabling and enabling a stream.** `disable_stream` closes its shards (StreamStatus
  DISABLED, later writes go unrecorded); `enable_stream` starts a new stream with a new ARN.

Two ways to fill it: `add_record` (scripted, for the reader's tests), or `mirror(table)`,
which follows moto's own stream of a table and files every record into the double's shards,
so the records are the real ones of the writes a test makes. With `dynamodb_url` every other
request (`DynamoDB_20120810.*`) goes to moto unchanged, except DescribeTable, whose stream
fields are rewritten to name the double's current stream, and Scan, which `hold_scans` can
hold back (to watch a rebuild in progress).

It runs its own event loop in a thread, so blocking calls in a test never stall it; the model
is guarded by a lock because tests change it from their own thread.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import math
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from support import LoopbackServer

STREAMS_PREFIX = "DynamoDBStreams_20120810."
DYNAMODB_PREFIX = "DynamoDB_20120810."
ERROR_PREFIX = "com.amazonaws.dynamodb.v20120810#"
VALIDATION_TYPE = "com.amazon.coral.validate#ValidationException"
JSON_10 = "application/x-amz-json-1.0"
HASH_SPACE = 2**32
MAX_READERS_PER_SHARD = 2
ACCOUNT = "123456789012"
# moto routes a request by the service in its credential scope; it never checks the signature.
MOTO_AUTH = ("AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/dynamodb/aws4_request, "
             "SignedHeaders=host;x-amz-target, Signature=0")


class StreamsError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.type = code if "#" in code else ERROR_PREFIX + code
        self.message = message


@dataclass
class Shard:
    shard_id: str
    parent_id: str | None
    hash_range: tuple[int, int]
    start: int  # StartingSequenceNumber
    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # retained, by sequence number
    end: int | None = None  # EndingSequenceNumber, once closed
    trimmed_upto: int = -1  # highest sequence number trimmed away
    listed: bool = True

    def to_json(self) -> dict[str, Any]:
        numbers = {"StartingSequenceNumber": str(self.start)}
        if self.end is not None:
            numbers["EndingSequenceNumber"] = str(self.end)
        shard: dict[str, Any] = {"ShardId": self.shard_id, "SequenceNumberRange": numbers}
        if self.parent_id:
            shard["ParentShardId"] = self.parent_id
        return shard


@dataclass
class Stream:
    arn: str
    label: str
    table_name: str
    key_schema: list[dict[str, str]]
    created: float
    status: str = "ENABLED"
    shards: dict[str, Shard] = field(default_factory=dict)  # in creation order

    def open_shard_for(self, key_hash: int) -> Shard:
        for shard in self.shards.values():
            low, high = shard.hash_range
            if shard.end is None and low <= key_hash < high:
                return shard
        raise AssertionError(f"no open shard for hash {key_hash} in {self.arn}")


@dataclass
class Iterator:
    stream_arn: str
    shard_id: str
    after: int  # the next record read is the first with a higher sequence number
    expired: bool = False


def key_hash(keys: dict[str, Any]) -> int:
    return zlib.crc32(orjson.dumps(keys, option=orjson.OPT_SORT_KEYS)) % HASH_SPACE


class StreamsDouble(LoopbackServer):
    """See the module docstring. `start()` returns once it listens on `url`; `stop()` ends it."""

    name = "streams double"

    def __init__(self, dynamodb_url: str | None = None, first_sequence_number: int = 10**21 - 1500,
                 describe_page_size: int = 100, read_delay_s: float = 0.0, clock_offset_s: float = 0.0) -> None:
        super().__init__()
        self.clock_offset_s = clock_offset_s
        self.dynamodb_url = dynamodb_url.rstrip("/") if dynamodb_url else None
        self.describe_page_size = describe_page_size
        self.read_delay_s = read_delay_s
        self._next_seq = first_sequence_number
        self._lock = threading.Lock()
        self._streams: dict[str, Stream] = {}
        self._current: dict[str, str] = {}  # table name → ARN of its latest stream
        self._iterators: dict[str, Iterator] = {}
        self._expire_every: int | None = None
        self._throttle: collections.Counter[str] = collections.Counter()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._scans_open = threading.Event()
        self._scans_open.set()
        self._mirrors: dict[str, float] = {}  # table → monotonic time its moto stream was last found drained
        self._feeders: list[asyncio.Task] = []
        # What it served, for the tests to check.
        self.calls: collections.Counter[str] = collections.Counter()
        self.throttled = 0
        self.expired = 0
        self.iterator_requests: list[dict[str, Any]] = []  # GetShardIterator bodies
        self.max_readers: collections.Counter[str] = collections.Counter()  # shard → most GetRecords in flight
        self.scans_held = 0

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._scans_open.set()  # a held Scan must not keep the server from closing
        super().stop()

    async def _closing(self) -> None:
        for feeder in self._feeders:
            feeder.cancel()
        await asyncio.gather(*self._feeders, return_exceptions=True)

    # ------------------------------------------------------------------ scripting (test thread)

    def create_stream(self, table_name: str, key_schema: list[dict[str, str]], arn: str | None = None) -> str:
        """A new ENABLED stream with one shard; it becomes the table's latest stream."""
        with self._lock:
            created = time.time()
            label = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{uuid.uuid4().int % 1000:03d}"
            arn = arn or f"arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/{table_name}/stream/{label}"
            stream = Stream(arn, label, table_name, key_schema, created)
            self._new_shard(stream, None, (0, HASH_SPACE))
            self._streams[arn] = stream
            self._current[table_name] = arn
            return arn

    def add_record(self, stream_arn: str, event_name: str, keys: dict[str, Any],
                   new_image: dict[str, Any] | None = None, old_image: dict[str, Any] | None = None) -> tuple[str, str]:
        """File one record (DynamoDB JSON images); returns (shard id, sequence number)."""
        body: dict[str, Any] = {"Keys": keys, "StreamViewType": "NEW_AND_OLD_IMAGES"}
        if new_image is not None:
            body["NewImage"] = new_image
        if old_image is not None:
            body["OldImage"] = old_image
        record = {"eventID": uuid.uuid4().hex, "eventName": event_name, "eventVersion": "1.1",
                  "eventSource": "aws:dynamodb", "awsRegion": "us-east-1", "dynamodb": body}
        with self._lock:
            return self._file(self._streams[stream_arn], record)

    def shards(self, stream_arn: str) -> list[Shard]:
        with self._lock:
            return list(self._streams[stream_arn].shards.values())

    def open_shards(self, stream_arn: str) -> list[str]:
        return [shard.shard_id for shard in self.shards(stream_arn) if shard.end is None]

    def split(self, stream_arn: str, shard_id: str) -> tuple[str, str]:
        """Close `shard_id` and open two children sharing its key range."""
        with self._lock:
            stream = self._streams[stream_arn]
            parent = stream.shards[shard_id]
            assert parent.end is None, f"{shard_id} is closed already"
            self._close(parent)
            low, high = parent.hash_range
            middle = (low + high) // 2
            return (self._new_shard(stream, shard_id, (low, middle)).shard_id,
                    self._new_shard(stream, shard_id, (middle, high)).shard_id)

    def trim(self, stream_arn: str, upto: int | None = None) -> int:
        """Drop every record with a sequence number up to `upto` (default: all so far). Returns
        how many were dropped."""
        with self._lock:
            upto = self._next_seq - 1 if upto is None else upto
            dropped = 0
            for shard in self._streams[stream_arn].shards.values():
                gone = [seq for seq, _ in shard.records if seq <= upto]
                if gone:
                    shard.records = [(seq, record) for seq, record in shard.records if seq > upto]
                    shard.trimmed_upto = max(shard.trimmed_upto, gone[-1])
                    dropped += len(gone)
            return dropped

    def expire_shard(self, stream_arn: str, shard_id: str) -> None:
        """What retention does to a closed shard: its records are trimmed and it is no longer listed."""
        with self._lock:
            shard = self._streams[stream_arn].shards[shard_id]
            if shard.end is None:
                self._close(shard)
            if shard.records:
                shard.trimmed_upto = max(shard.trimmed_upto, shard.records[-1][0])
                shard.records = []
            shard.listed = False

    def expire_iterators(self) -> None:
        with self._lock:
            for iterator in self._iterators.values():
                iterator.expired = True

    def expire_every(self, n: int | None) -> None:
        """Every nth GetRecords finds its iterator expired (None: never)."""
        with self._lock:
            self._expire_every = n

    def throttle(self, n: int, operation: str = "GetRecords") -> None:
        with self._lock:
            self._throttle[operation] += n

    def disable_stream(self, table_name: str) -> None:
        """StreamStatus DISABLED, every shard closed; writes from now on are not recorded."""
        with self._lock:
            stream = self._streams[self._current[table_name]]
            stream.status = "DISABLED"
            for shard in stream.shards.values():
                if shard.end is None:
                    self._close(shard)

    def enable_stream(self, table_name: str) -> str:
        """A new stream (new ARN) for the table, as after UpdateTable enables one again."""
        with self._lock:
            old = self._streams[self._current[table_name]]
        time.sleep(0.002)  # a distinct label
        return self.create_stream(table_name, old.key_schema)

    def hold_scans(self) -> None:
        self._scans_open.clear()

    def release_scans(self) -> None:
        self._scans_open.set()

    def current_stream(self, table_name: str) -> str:
        with self._lock:
            return self._current[table_name]

    def mirror(self, table_name: str) -> str:
        """Follow moto's stream of `table_name` from its start, filing its records here under
        the same ARN. Returns the ARN."""
        assert self._loop is not None and self.dynamodb_url, "mirror needs a started double with dynamodb_url"
        return asyncio.run_coroutine_threadsafe(self._start_mirror(table_name), self._loop).result(30)

    def wait_mirrored(self, table_name: str, timeout: float = 10.0) -> None:
        """Return once every record moto's stream held when called has been filed here."""
        asked = time.monotonic()
        deadline = asked + timeout
        while self._mirrors.get(table_name, 0.0) <= asked:
            assert time.monotonic() < deadline, f"moto's stream of {table_name} was not drained in {timeout}s"
            time.sleep(0.01)

    # ------------------------------------------------------------------ the model (lock held)

    def _new_shard(self, stream: Stream, parent_id: str | None, hash_range: tuple[int, int]) -> Shard:
        shard_id = f"shardId-{int(time.time() * 1000):020d}-{uuid.uuid4().hex[:8]}"
        shard = Shard(shard_id, parent_id, hash_range, start=self._next_seq)
        stream.shards[shard_id] = shard
        return shard

    def _close(self, shard: Shard) -> None:
        shard.end = shard.records[-1][0] if shard.records else max(shard.start, shard.trimmed_upto)

    def _file(self, stream: Stream, record: dict[str, Any]) -> tuple[str, str]:
        body = record["dynamodb"]
        shard = stream.open_shard_for(key_hash(body["Keys"]))
        seq = self._next_seq
        self._next_seq += 1
        body["SequenceNumber"] = str(seq)
        body["ApproximateCreationDateTime"] = math.floor(self._now())
        body.setdefault("SizeBytes", len(orjson.dumps(body)))
        shard.records.append((seq, record))
        return shard.shard_id, str(seq)

    def _shard(self, arn: str, shard_id: str) -> Shard:
        stream = self._streams.get(arn)
        shard = stream.shards.get(shard_id) if stream else None
        if shard is None or not shard.listed:
            raise StreamsError("ResourceNotFoundException", f"Requested resource not found: Shard does not exist: {shard_id}")
        return shard

    def _check_throttle(self, operation: str) -> None:
        if self._throttle[operation] > 0:
            self._throttle[operation] -= 1
            self.throttled += 1
            raise StreamsError("LimitExceededException", "Rate exceeded for shard")

    # ------------------------------------------------------------------ requests

    def _now(self) -> float:
        return time.time() + self.clock_offset_s

    async def _handle(self, request: web.Request) -> web.Response:
        response = await self._answer(request)
        response.headers["Date"] = email.utils.formatdate(self._now(), usegmt=True)  # by its own clock
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        body = await request.read()
        if target.startswith(STREAMS_PREFIX):
            operation = target[len(STREAMS_PREFIX):]
            self.calls[operation] += 1
            handler = {"DescribeStream": self._describe_stream, "GetShardIterator": self._get_shard_iterator,
                       "GetRecords": self._get_records, "ListStreams": self._list_streams}.get(operation)
            try:
                if handler is None:
                    raise StreamsError("UnknownOperationException", f"unknown operation {operation}")
                return _answer(200, await handler(orjson.loads(body or b"{}")))
            except StreamsError as error:
                return _answer(400, {"__type": error.type, "message": error.message})
        if self.dynamodb_url is None or not target.startswith(DYNAMODB_PREFIX):
            return _answer(400, {"__type": ERROR_PREFIX + "UnknownOperationException", "message": target})
        if target == DYNAMODB_PREFIX + "Scan" and not self._scans_open.is_set():
            self.scans_held += 1
            await asyncio.get_running_loop().run_in_executor(None, self._scans_open.wait)
        status, headers, answer = await self._forward(request.headers, body)
        if target == DYNAMODB_PREFIX + "DescribeTable" and status == 200:
            answer = self._rewrite_table(answer)
            headers["x-amz-crc32"] = str(zlib.crc32(answer))
        return web.Response(status=status, body=answer, headers=headers)

    async def _describe_stream(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._check_throttle("DescribeStream")
            stream = self._streams.get(body["StreamArn"])
            if stream is None:
                raise StreamsError("ResourceNotFoundException", f"Requested resource not found: Stream: {body['StreamArn']} not found")
            listed = [shard for shard in stream.shards.values() if shard.listed]
            after = body.get("ExclusiveStartShardId")
            if after is not None:
                ids = [shard.shard_id for shard in listed]
                listed = listed[ids.index(after) + 1:] if after in ids else []
            size = min(body.get("Limit") or self.describe_page_size, self.describe_page_size)
            page = listed[:size]
            description: dict[str, Any] = {
                "StreamArn": stream.arn, "StreamLabel": stream.label, "StreamStatus": stream.status,
                "StreamViewType": "NEW_AND_OLD_IMAGES", "CreationRequestDateTime": stream.created,
                "TableName": stream.table_name, "KeySchema": stream.key_schema,
                "Shards": [shard.to_json() for shard in page],
            }
            if len(listed) > size:
                description["LastEvaluatedShardId"] = page[-1].shard_id
            return {"StreamDescription": description}

    async def _get_shard_iterator(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.iterator_requests.append(dict(body))
            self._check_throttle("GetShardIterator")
            shard = self._shard(body["StreamArn"], body["ShardId"])
            kind = body["ShardIteratorType"]
            if kind == "TRIM_HORIZON":
                after = max(shard.start - 1, shard.trimmed_upto)
            elif kind == "LATEST":
                after = shard.records[-1][0] if shard.records else max(shard.start - 1, shard.trimmed_upto)
            elif kind in ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"):
                seq = int(body.get("SequenceNumber") or -1)
                last = shard.end if shard.end is not None else self._next_seq - 1
                if not shard.start <= seq <= last:
                    raise StreamsError(VALIDATION_TYPE, f"Invalid SequenceNumber {body.get('SequenceNumber')} for shard {shard.shard_id}")
                after = seq - 1 if kind == "AT_SEQUENCE_NUMBER" else seq
                if shard.trimmed_upto > after:
                    raise StreamsError("TrimmedDataAccessException", "The data you are trying to access has been trimmed.")
            else:
                raise StreamsError(VALIDATION_TYPE, f"Invalid ShardIteratorType {kind}")
            token = uuid.uuid4().hex + uuid.uuid4().hex
            self._iterators[token] = Iterator(body["StreamArn"], shard.shard_id, after)
            return {"ShardIterator": token}

    async def _get_records(self, body: dict[str, Any]) -> dict[str, Any]:
        limit = body.get("Limit", 1000)
        if not 1 <= limit <= 1000:
            raise StreamsError(VALIDATION_TYPE, "Limit must be between 1 and 1000")
        with self._lock:
            iterator = self._iterators.get(body["ShardIterator"])
            if iterator is None:
                raise StreamsError(VALIDATION_TYPE, "Invalid ShardIterator")
            reads = self.calls["GetRecords"]
            if self._expire_every and reads % self._expire_every == 0:
                iterator.expired = True
            if iterator.expired:
                self.expired += 1
                raise StreamsError("ExpiredIteratorException", "Iterator expired. The iterator was created more than 15 minutes ago.")
            self._check_throttle("GetRecords")
            shard_id = iterator.shard_id
            self._in_flight[shard_id] += 1
            self.max_readers[shard_id] = max(self.max_readers[shard_id], self._in_flight[shard_id])
        try:
            if self._in_flight[shard_id] > MAX_READERS_PER_SHARD:
                with self._lock:
                    self.throttled += 1
                raise StreamsError("LimitExceededException", f"More than {MAX_READERS_PER_SHARD} readers on shard {shard_id}")
            if self.read_delay_s:
                await asyncio.sleep(self.read_delay_s)
            with self._lock:
                return self._records_after(iterator, limit)
        finally:
            with self._lock:
                self._in_flight[shard_id] -= 1

    def _records_after(self, iterator: Iterator, limit: int) -> dict[str, Any]:
        shard = self._streams[iterator.stream_arn].shards[iterator.shard_id]
        if shard.trimmed_upto > iterator.after:
            raise StreamsError("TrimmedDataAccessException", "The data you are trying to access has been trimmed.")
        pending = [(seq, record) for seq, record in shard.records if seq > iterator.after]
        page = pending[:limit]
        answer: dict[str, Any] = {"Records": [record for _, record in page]}
        if shard.end is None or len(pending) > len(page):
            token = uuid.uuid4().hex + uuid.uuid4().hex
            self._iterators[token] = Iterator(iterator.stream_arn, shard.shard_id, page[-1][0] if page else iterator.after)
            answer["NextShardIterator"] = token
        return answer

    async def _list_streams(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            table = body.get("TableName")
            return {"Streams": [{"StreamArn": s.arn, "TableName": s.table_name, "StreamLabel": s.label}
                                for s in self._streams.values() if table is None or s.table_name == table]}

    # ------------------------------------------------------------------ moto

    async def _forward(self, request_headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in request_headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.post(self.dynamodb_url + "/", data=body, headers=headers) as response:
            answer = await response.read()
            kept = {k: v for k, v in response.headers.items() if k.lower() in ("content-type", "x-amzn-requestid", "x-amz-crc32")}
            return response.status, kept, answer

    async def _moto(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"X-Amz-Target": operation, "Content-Type": JSON_10, "Authorization": MOTO_AUTH}
        status, _, answer = await self._forward(headers, orjson.dumps(body))
        if status != 200:
            raise RuntimeError(f"moto {operation}: HTTP {status} {answer[:300]!r}")
        return orjson.loads(answer)

    def _rewrite_table(self, answer: bytes) -> bytes:
        """Name the double's latest stream of a mirrored table, enabled or not."""
        data = orjson.loads(answer)
        table = data["Table"]
        with self._lock:
            arn = self._current.get(table["TableName"])
            if arn is None or table["TableName"] not in self._mirrors:
                return answer
            stream = self._streams[arn]
            table["LatestStreamArn"], table["LatestStreamLabel"] = stream.arn, stream.label
            if stream.status == "ENABLED":
                table["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
            else:
                table.pop("StreamSpecification", None)
        return orjson.dumps(data)

    async def _start_mirror(self, table_name: str) -> str:
        table = (await self._moto(DYNAMODB_PREFIX + "DescribeTable", {"TableName": table_name}))["Table"]
        moto_arn = table["LatestStreamArn"]
        shard_id = (await self._moto(STREAMS_PREFIX + "DescribeStream", {"StreamArn": moto_arn}))[
            "StreamDescription"]["Shards"][0]["ShardId"]
        iterator = (await self._moto(STREAMS_PREFIX + "GetShardIterator", {
            "StreamArn": moto_arn, "ShardId": shard_id, "ShardIteratorType": "TRIM_HORIZON"}))["ShardIterator"]
        arn = self.create_stream(table_name, table["KeySchema"], arn=moto_arn)
        self._mirrors[table_name] = 0.0
        self._feeders.append(asyncio.get_running_loop().create_task(self._feed(table_name, iterator)))
        return arn

    async def _feed(self, table_name: str, iterator: str) -> None:
        """Move records from moto's stream into the table's current stream (dropped while disabled)."""
        while True:
            asked = time.monotonic()
            page = await self._moto(STREAMS_PREFIX + "GetRecords", {"ShardIterator": iterator, "Limit": 1000})
            iterator = page["NextShardIterator"]
            with self._lock:
                stream = self._streams[self._current[table_name]]
                for record in page["Records"]:
                    if stream.status == "ENABLED":
                        self._file(stream, record)
            if not page["Records"]:
                self._mirrors[table_name] = asked
                await asyncio.sleep(0.005)


def _answer(status: int, data: dict[str, Any]) -> web.Response:
    body = orjson.dumps(data)
    return web.Response(status=status, body=body, headers={
        "Content-Type": JSON_10, "x-amzn-RequestId": uuid.uuid4().hex, "x-amz-crc32": str(zlib.crc32(body))})
