"""One collection's ingest: bulk load by Scan, then the stream, forever; faults retried.

The checkpoint saved with every refresh says where to resume:

    {"phase": "scan" | "stream",
     "stream": StreamReader position (taken *before* the scan starts),
     "scan": {"start_time", "end_time", "total_records", "rcu_budget",
              **ScanProgress.to_json()}}   # per segment: next_key, done; totals of applied pages

A restart in phase "scan" continues each segment after its last applied page (see
`shoal.ingest.scan`), with the stream position taken before the scan first started; in
phase "stream" it resumes after the last applied record. Every failure lands in
`SourceStatus.error` and is retried with backoff; none is swallowed. A stream that lost
changes (`StreamTrimmed`, or a new stream ARN) rebuilds the collection: a new bulk load,
then `_remove_unscanned` deletes what it did not see.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shoal.index.collection import Change, Collection, Snapshot

from .aws import AwsAccess
from .decode import decode_item, document_id
from .scan import (
    SCAN_CLIENT_CONFIG,
    ParallelScan,
    ScanProgress,
    ThrottleController,
    default_rcu_budget,
    rcu_per_item_guess,
    segments_for,
)
from .streams import StreamReader, StreamTrimmed

log = logging.getLogger(__name__)

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
    scan_rcu_budget: int | None = None
    scan_rcu_per_second: float | None = None  # last 10 s while scanning; the scan's average after
    scan_throttled_requests: int = 0
    stream_last_processed_at: str | None = None
    stream_shards: list[dict[str, Any]] = field(default_factory=list)  # StreamReader.shard_status()
    sync_lag_ms: int | None = None
    rebuilding: str | None = None  # why the collection is being rebuilt, until the stream catches up
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


def _average_rate(scan: dict[str, Any]) -> float | None:
    """A finished scan's RCU per second, start to end (time spent down counts, too)."""
    if not scan.get("end_time") or not scan.get("start_time"):
        return None
    seconds = (datetime.fromisoformat(scan["end_time"]) - datetime.fromisoformat(scan["start_time"])).total_seconds()
    return round(scan.get("consumed_rcu", 0.0) / max(seconds, 0.001), 1)


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
        self.status.scan_rcu_budget = scan.get("rcu_budget")
        self.status.scan_throttled_requests = scan.get("throttled_requests", 0)
        self.status.scan_rcu_per_second = _average_rate(scan)
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
                if self.status.error is None:  # it had recovered since the last fault: back off from the start
                    backoff = 1.0
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
            if checkpoint.get("phase") == "stream" and checkpoint["stream"]["stream_arn"] != stream_arn:
                self._rebuilding(f"the table has a new stream ({stream_arn}): its stream was disabled and enabled "
                                 "again, and changes made in between were not recorded")
            if checkpoint.get("phase") != "stream" or checkpoint["stream"]["stream_arn"] != stream_arn:
                checkpoint = await self._bulk_load(table, key_names, stream_arn)
            checkpoint = await self._remove_unscanned(checkpoint)
            self.status.error = None
            try:
                await self._follow_stream(streams, checkpoint, key_names)
            except StreamTrimmed as trimmed:
                self._rebuilding(str(trimmed))
                await self._bulk_load(table, key_names, stream_arn)  # the next round removes what it did not see

    async def _bulk_load(self, table: dict, key_names: tuple[str, ...], stream_arn: str) -> dict:
        """Scan the table into the collection, continuing a scan the checkpoint left unfinished."""
        if not self.config.use_scan_api:
            raise NotImplementedError("bulk load by S3 export is not available yet: set use_scan_api to true")
        self.status.state = "SCANNING"
        budget = self.config.rcu or default_rcu_budget(table)
        saved = self.collection.checkpoint or {}
        resumable = saved.get("phase") == "scan" and "segments" in saved["scan"]
        if resumable and saved["stream"]["stream_arn"] == stream_arn:
            stream_position, scan = saved["stream"], {**saved["scan"], "rcu_budget": budget}
            progress = ScanProgress.from_json(scan)
        else:
            # The stream position comes first: every change from here on is replayed after the scan.
            stream_position = {"stream_arn": stream_arn, "shards": {}}
            progress = ScanProgress.start(segments_for(table, budget))
            scan = {"start_time": _now_iso(), "end_time": None, "total_records": table.get("ItemCount", 0),
                    "rcu_budget": budget}
        controller = ThrottleController(budget, rcu_per_item_guess(table))
        controller.throttled_requests = progress.throttled_requests
        self.status.scan_start_time, self.status.scan_total_records = scan["start_time"], scan["total_records"]
        self.status.scan_rcu_budget, self.status.scan_records_processed = budget, progress.records_processed
        table_name = self.config.table_name

        def changes_of(items: list[dict]) -> list[Change]:
            now_us = int(time.time() * 1_000_000)
            meta = {"table": table_name, "event": "SCAN", "sequence_number": None}
            return [Change(document_id(item, key_names), decode_item(item), now_us, meta) for item in items]

        async def apply_batch(items: list[dict], covered: ScanProgress) -> None:
            changes = await asyncio.to_thread(changes_of, items)
            checkpoint = {"phase": "scan", "stream": stream_position, "scan": {**scan, **covered.to_json()}}
            await self.collection.apply(changes, checkpoint)
            self.status.scan_records_processed = covered.records_processed
            self.status.scan_throttled_requests = controller.throttled_requests
            self.status.scan_rcu_per_second = round(controller.recent_rate(), 1)

        async with self.access.client("dynamodb", self.config.region, SCAN_CLIENT_CONFIG) as client:
            scanner = ParallelScan(client, table_name, controller, progress)
            await scanner.run(apply_batch)
        scan = {**scan, **scanner.progress.to_json(), "end_time": _now_iso()}
        checkpoint = {"phase": "stream", "stream": stream_position, "scan": scan}
        await self.collection.apply([], checkpoint)
        self.status.scan_end_time = scan["end_time"]
        self.status.scan_rcu_per_second = _average_rate(scan)
        return checkpoint

    async def _follow_stream(self, streams: Any, checkpoint: dict, key_names: tuple[str, ...]) -> None:
        """Apply the stream's changes round by round, each with the position that covers it.
        Raises StreamTrimmed when changes were lost, StreamEnded when the stream was disabled."""
        self.status.state = "PROCESSING_STREAM"
        position = copy.deepcopy(checkpoint["stream"])
        reader = StreamReader(streams, position, key_names, self.config.table_name, self.config.poll_interval_s)
        while True:
            result = await reader.read()
            if result.changes or result.position != checkpoint["stream"]:  # or shards found, finished, verified
                checkpoint = {**checkpoint, "stream": result.position}
                await self.collection.apply(result.changes, checkpoint)
            if result.changes:
                self.status.stream_last_processed_at = _now_iso()
            self.status.stream_shards = reader.shard_status()
            self.status.sync_lag_ms = result.lag_ms
            if result.caught_up:
                self.status.caught_up = True
                self.status.rebuilding = None
                self.status.error = None

    def _rebuilding(self, reason: str) -> None:
        """Say plainly that the collection is being rebuilt and why; cleared once caught up again."""
        self.status.rebuilding = (f"{reason}. Rebuilding the collection from a new bulk load; "
                                  "until it has caught up, query results may be stale.")
        self.status.caught_up = False
        self.status.error = None  # the source answered again; this is what happens now
        log.warning("collection of table %s: %s", self.config.table_name, self.status.rebuilding)

    async def _remove_unscanned(self, checkpoint: dict) -> dict:
        """Delete what the last bulk load did not write: documents of items deleted from the table
        before the scan (a rebuild scans over the old documents). Due while the position the bulk
        load left has never been read (no `verified_at`), so a crash right after the bulk load still
        comes here; the position is then marked verified as of the scan's start."""
        position = checkpoint["stream"]
        if "verified_at" in position or any(state["seq"] for state in position["shards"].values()):
            return checkpoint  # (a position with a `seq` but no `verified_at` predates this step)
        scan_start = datetime.fromisoformat(checkpoint["scan"]["start_time"])
        unscanned = await asyncio.to_thread(_written_before_scan, self.collection.snapshot(), scan_start)
        now_us = int(time.time() * 1_000_000)
        meta = {"table": self.config.table_name, "event": "REMOVE", "sequence_number": None}
        checkpoint = {**checkpoint, "stream": {**position, "verified_at": scan_start.timestamp()}}
        await self.collection.apply([Change(doc_id, None, now_us, meta) for doc_id in unscanned], checkpoint)
        if unscanned:
            log.info("removed %d documents of %s the bulk load did not see", len(unscanned), self.config.table_name)
        return checkpoint


def _written_before_scan(snapshot: Snapshot, scan_start: datetime) -> list[str]:
    """_ids of the documents a scan started at `scan_start` did not write: stream changes, or
    scanned earlier (`_bulk_load` writes event SCAN at the time of each page)."""
    since = pa.scalar(scan_start, pa.timestamp("us", tz="UTC"))
    unscanned: list[str] = []
    for batch in snapshot.batches():
        scanned = pc.and_(pc.equal(pc.struct_field(batch["_meta"], "event"), "SCAN"), pc.greater_equal(batch["_event_time"], since))
        unscanned.extend(batch["_id"].filter(pc.invert(pc.fill_null(scanned, False))).to_pylist())
    return unscanned


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
