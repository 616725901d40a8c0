"""One collection's ingest: bulk load by Scan, then the stream, forever; faults retried.

The checkpoint saved with every refresh says where to resume:

    {"phase": "scan" | "stream",
     "stream": StreamReader position (taken *before* the scan starts),
     "scan": {"start_time", "end_time", "records_processed", "total_records"}}

A restart in phase "scan" scans again from the start (re-applying an item only overwrites
it with its current state); in phase "stream" it resumes after the last applied record.
Every failure lands in `SourceStatus.error` and is retried with backoff; none is swallowed.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from shoal.index.collection import Change, Collection

from .aws import AwsAccess
from .decode import decode_item, document_id
from .scan import RcuBudget, parallel_scan, segments_for
from .streams import StreamReader

log = logging.getLogger(__name__)

DEFAULT_RCU = 1000  # per second, when the source names no budget
DEFAULT_POLL_S = 0.2
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class SourceConfig:
    table_name: str
    region: str
    rcu: int | None
    use_scan_api: bool
    poll_interval_s: float = DEFAULT_POLL_S


@dataclass
class SourceStatus:
    """What the API shows about a source; written only by its pipeline."""

    state: str = "INITIALIZING"  # Rockset's names: INITIALIZING | SCANNING | PROCESSING_STREAM
    scan_start_time: str | None = None
    scan_end_time: str | None = None
    scan_records_processed: int = 0
    scan_total_records: int | None = None
    stream_last_processed_at: str | None = None
    sync_lag_ms: int | None = None
    caught_up: bool = False
    error: str | None = None
    error_at: str | None = None
    retries: int = 0

    @property
    def completion_percentage(self) -> float:
        if self.state == "PROCESSING_STREAM":
            return 100.0
        if not self.scan_total_records:
            return 0.0
        return min(99.9, 100.0 * self.scan_records_processed / self.scan_total_records)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SourcePipeline:
    def __init__(self, collection: Collection, config: SourceConfig, access: AwsAccess) -> None:
        self.collection = collection
        self.config = config
        self.access = access
        self.status = SourceStatus()
        self._restore_status(collection.checkpoint or {})

    def _restore_status(self, checkpoint: dict[str, Any]) -> None:
        scan = checkpoint.get("scan", {})
        self.status.scan_start_time = scan.get("start_time")
        self.status.scan_end_time = scan.get("end_time")
        self.status.scan_records_processed = scan.get("records_processed", 0)
        self.status.scan_total_records = scan.get("total_records")
        if checkpoint.get("phase") == "stream":
            self.status.state = "PROCESSING_STREAM"

    async def run(self) -> None:
        """Ingest until cancelled; each failure is recorded in the status, then retried."""
        backoff = 1.0
        while True:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - every fault is surfaced, then retried
                self.status.error = _describe_error(error)
                self.status.error_at = _now_iso()
                self.status.retries += 1
                log.warning("ingest of %s failed (retry in %.0f s): %s", self.config.table_name, backoff, self.status.error)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _run_once(self) -> None:
        async with self.access.client("dynamodb", self.config.region) as dynamodb, \
                self.access.client("dynamodbstreams", self.config.region) as streams:
            table = (await dynamodb.describe_table(TableName=self.config.table_name))["Table"]
            key_names = tuple(
                k["AttributeName"] for k in sorted(table["KeySchema"], key=lambda k: k["KeyType"] != "HASH")
            )
            stream_arn = _check_stream(table)
            checkpoint = copy.deepcopy(self.collection.checkpoint or {})
            if checkpoint.get("phase") != "stream" or checkpoint["stream"]["stream_arn"] != stream_arn:
                checkpoint = await self._bulk_load(dynamodb, table, key_names, stream_arn)
            self.status.error = None
            await self._follow_stream(streams, checkpoint, key_names)

    async def _bulk_load(self, dynamodb: Any, table: dict, key_names: tuple[str, ...], stream_arn: str) -> dict:
        if not self.config.use_scan_api:
            raise NotImplementedError("bulk load by S3 export is not available yet: set use_scan_api to true")
        self.status.state = "SCANNING"
        # The stream position comes first: every change from here on is replayed after the scan.
        stream_position = {"stream_arn": stream_arn, "shards": {}}
        scan = {
            "start_time": _now_iso(),
            "end_time": None,
            "records_processed": 0,
            "total_records": table.get("ItemCount", 0),
        }
        self.status.scan_start_time, self.status.scan_total_records = scan["start_time"], scan["total_records"]
        self.status.scan_records_processed = 0
        budget = RcuBudget(self.config.rcu or DEFAULT_RCU)
        table_name = self.config.table_name

        async def apply_page(items: list[dict]) -> None:
            now_us = int(time.time() * 1_000_000)
            meta = {"table": table_name, "event": "SCAN", "sequence_number": None}
            changes = [Change(document_id(item, key_names), decode_item(item), now_us, meta) for item in items]
            scan["records_processed"] += len(changes)
            await self.collection.apply(changes, {"phase": "scan", "stream": stream_position, "scan": dict(scan)})
            self.status.scan_records_processed = scan["records_processed"]

        await parallel_scan(dynamodb, table_name, segments_for(table.get("TableSizeBytes", 0)), budget, apply_page)
        scan["end_time"] = _now_iso()
        checkpoint = {"phase": "stream", "stream": stream_position, "scan": scan}
        await self.collection.apply([], checkpoint)
        self.status.scan_end_time = scan["end_time"]
        return checkpoint

    async def _follow_stream(self, streams: Any, checkpoint: dict, key_names: tuple[str, ...]) -> None:
        self.status.state = "PROCESSING_STREAM"
        reader = StreamReader(streams, checkpoint["stream"], key_names, self.config.table_name)
        while True:
            result = await reader.read()
            if result.changes:
                checkpoint = {**checkpoint, "stream": result.position}
                await self.collection.apply(result.changes, checkpoint)
                self.status.stream_last_processed_at = _now_iso()
                if result.newest_event_time_us is not None:
                    self.status.sync_lag_ms = max(0, int(time.time() * 1000 - result.newest_event_time_us / 1000))
            elif result.position != checkpoint["stream"]:
                checkpoint = {**checkpoint, "stream": result.position}  # shards found or finished
                await self.collection.apply([], checkpoint)
            if result.caught_up:
                self.status.caught_up = True
                self.status.sync_lag_ms = 0 if not result.changes else self.status.sync_lag_ms
                self.status.error = None
                await asyncio.sleep(self.config.poll_interval_s)


def _check_stream(table: dict) -> str:
    spec = table.get("StreamSpecification") or {}
    arn = table.get("LatestStreamArn")
    if not spec.get("StreamEnabled") or not arn:
        raise SourceProblem(
            f"table {table['TableName']} has no DynamoDB stream: enable one with view type NEW_AND_OLD_IMAGES"
        )
    if spec.get("StreamViewType") != "NEW_AND_OLD_IMAGES":
        raise SourceProblem(
            f"the stream of table {table['TableName']} has view type {spec.get('StreamViewType')}; "
            "Shoal needs NEW_AND_OLD_IMAGES"
        )
    return arn


class SourceProblem(Exception):
    """A problem with the source that the user must fix; the message says how."""


def _describe_error(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code = response["Error"].get("Code", "Error")
        message = response["Error"].get("Message", "")
        return f"{code}: {message}".strip()
    return str(error) or type(error).__name__
