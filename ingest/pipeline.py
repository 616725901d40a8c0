"""One collection's ingest: bulk load by Scan, then the stream, forever; faults retried.

The checkpoint saved with every refresh says where to resume:

    {"phase": "scan" | "stream",
     "stream": StreamReader position (taken *before* the scan starts),
     "scan": {"start_time", "clock_offset_s", "end_time", "total_records", "rcu_budget",
              **ScanProgress.to_json()}}   # per segment: next_key, done; totals of applied pages

Times are this machine's; `clock_offset_s` is how far DynamoDB's clock was from it when the
bulk load began, so a start can be compared with the changes DynamoDB stamps
(`_bulk_load_state_time`).

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
import email.utils
import errno
import logging
import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shoal.index.collection import Change, Collection, Snapshot

from .aws import AwsAccess, without_secrets
from .decode import document_id, item_text
from .export import (
    DOWNLOADING,
    EXPORTING,
    ExportLoader,
    ExportProblem,
    FileBatch,
    ensure_point_in_time_recovery,
    export_decoder,
    export_files,
    export_prefix,
    from_ranges,
    s3_chunks,
    start_export,
    to_ranges,
    wait_for_export,
)
from .scan import (
    SCAN_CLIENT_CONFIG,
    ParallelScan,
    ScanProgress,
    ThrottleController,
    default_rcu_budget,
    rcu_per_item_guess,
    segments_for,
)
from .kinesis import KinesisReader
from .streams import RETENTION_MARGIN_S, RETENTION_S, ReadResult, StreamReader, StreamTrimmed, lag_ms

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 0.2
# A Kinesis stream is replayed from this long before the bulk load began: a change made just
# before it may reach the stream (and its retried duplicates later) after the scan has started.
KINESIS_REPLAY_MARGIN_S = 60.0
MAX_BACKOFF_S = 30.0
# After the nth failed export (FAILED, gone, or files not as DynamoDB said), the next one
# starts this long after it: the retries of the pipeline come much more often.
EXPORT_RETRY_S = (0.0, 60.0, 300.0, 1800.0, 3600.0)
# Stream rounds read ahead of the apply, and the most changes one refresh takes from them.
READ_AHEAD_ROUNDS = 8
MAX_CHANGES_PER_REFRESH = 20_000


@dataclass(frozen=True)
class SourceConfig:
    table_name: str
    region: str
    rcu: int | None
    use_scan_api: bool
    poll_interval_s: float = DEFAULT_POLL_S
    s3_export_bucket: str | None = None  # the integration's s3_export_bucket_name (use_scan_api false)
    kinesis_stream_arn: str | None = None  # changes from this Kinesis data stream instead of DynamoDB Streams


@dataclass
class SourceStatus:
    """What the API shows about a source; written only by its pipeline."""

    # Rockset's names: INITIALIZING | SCANNING | EXPORTING_TO_S3 | DOWNLOADING_FROM_S3 | PROCESSING_STREAM.
    # An export reuses the scan_* figures: records = items applied from its files, total = the
    # export's item count (the table's estimate until the export is written), no RCU figures.
    state: str = "INITIALIZING"
    scan_start_time: str | None = None
    scan_end_time: str | None = None
    scan_records_processed: int = 0
    scan_total_records: int | None = None
    scan_rcu_budget: int | None = None
    scan_rcu_per_second: float | None = None  # last 10 s while scanning; the scan's average after
    scan_throttled_requests: int = 0
    stream_last_processed_at: str | None = None
    stream_shards: list[dict[str, Any]] = field(default_factory=list)  # StreamReader.shard_status()
    stream_throttled_requests: int = 0
    stream_fresh_as_of: float | None = None  # what the collection holds is the table as of then
    rebuilding: str | None = None  # why the collection is being rebuilt, until the stream catches up
    caught_up: bool = False
    error: str | None = None
    error_at: str | None = None
    retries: int = 0

    @property
    def sync_lag_ms(self) -> int | None:
        """How far behind the table the collection is now: it grows while reads fail or lag."""
        return lag_ms(self.stream_fresh_as_of)

    @property
    def completion_percentage(self) -> float:
        if self.state == "PROCESSING_STREAM":
            return 100.0
        if not self.scan_total_records:
            return 0.0
        return min(99.9, 100.0 * self.scan_records_processed / self.scan_total_records)


def _now_iso() -> str:
    return _iso(datetime.now(timezone.utc))


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bulk_load_state_time(checkpoint: dict) -> float | None:
    """Epoch seconds, by DynamoDB's clock (which stamps the changes it is compared with), of the
    table's state the bulk load began from: its start, or the export's point in time when that
    is earlier (DynamoDB may export a state from before it was asked). Changes before it are in
    what the bulk load read; the stream is replayed from it. The start is this machine's time,
    moved back by how far DynamoDB's clock was behind (`clock_offset_s`), never forward: a
    start later than DynamoDB's own would skip changes made during the load."""
    scan = checkpoint.get("scan", {})
    times = []
    if scan.get("start_time"):
        times.append(datetime.fromisoformat(scan["start_time"]).timestamp() + min(0.0, scan.get("clock_offset_s", 0.0)))
    if scan.get("export_time"):
        times.append(datetime.fromisoformat(scan["export_time"]).timestamp())
    return min(times) if times else None


def _clock_offset(response: dict[str, Any]) -> float:
    """How far DynamoDB's clock is ahead of this machine's (negative: behind), from the `Date`
    header of one of its answers (to the second, rounded down); 0 without one."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        moment = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):  # no header, or not a date
        return 0.0
    if moment.tzinfo is None:  # `-0000`: UTC, by RFC 5322
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp() - time.time()


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
        self._clock_offset_s = 0.0  # DynamoDB's clock minus this machine's, as of the last DescribeTable
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
                self.status.error = _describe_error(error, self.config)
                self.status.error_at = _now_iso()
                self.status.retries += 1
                log.warning("ingest of %s failed (retry in %.0f s): %s", self.config.table_name, backoff, self.status.error)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _run_once(self) -> None:
        kinesis_arn = self.config.kinesis_stream_arn
        changes_client = ("kinesis", _arn_region(kinesis_arn)) if kinesis_arn else ("dynamodbstreams", self.config.region)
        async with self.access.client("dynamodb", self.config.region) as dynamodb, \
                self.access.client(*changes_client) as changes:
            described = await dynamodb.describe_table(TableName=self.config.table_name)
            self._clock_offset_s = _clock_offset(described)
            table = described["Table"]
            key_names = tuple(
                k["AttributeName"] for k in sorted(table["KeySchema"], key=lambda k: k["KeyType"] != "HASH")
            )
            stream_arn = kinesis_arn or _check_stream(table)  # with Kinesis, the table needs no DynamoDB stream
            checkpoint = copy.deepcopy(self.collection.checkpoint or {})
            if checkpoint.get("phase") == "stream" and checkpoint["stream"]["stream_arn"] != stream_arn:
                self._rebuilding(f"the table has a new stream ({stream_arn}): its stream was disabled and enabled "
                                 "again, and changes made in between were not recorded")
            bulk_started = None
            if checkpoint.get("phase") != "stream" or checkpoint["stream"]["stream_arn"] != stream_arn:
                bulk_started = time.time()  # before the bulk load: Kinesis is replayed from here
                checkpoint = await self._bulk_load(table, key_names, stream_arn)
            checkpoint = await self._remove_unscanned(self._with_replay_start(checkpoint, bulk_started))
            if bulk_started is not None:
                self.status.error = None  # a whole bulk load worked; a stream fault is cleared by a round read
            if kinesis_arn:
                reader: StreamReader | KinesisReader = KinesisReader(
                    changes, copy.deepcopy(checkpoint["stream"]), key_names, self.config.table_name,
                    self.config.poll_interval_s)
            else:
                began = _bulk_load_state_time(checkpoint)
                reader = StreamReader(changes, copy.deepcopy(checkpoint["stream"]), key_names, self.config.table_name,
                                      self.config.poll_interval_s, None if began is None else began - REPLAY_SKIP_MARGIN_S)
            try:
                await self._follow_stream(reader, checkpoint)
            except StreamTrimmed as trimmed:
                self._rebuilding(str(trimmed) + _advice_if_slower_than_the_stream(checkpoint))
                bulk_started = time.time()
                checkpoint = await self._bulk_load(table, key_names, stream_arn)
                await self._remove_unscanned(self._with_replay_start(checkpoint, bulk_started))  # then the next round

    def _with_replay_start(self, checkpoint: dict, bulk_started: float | None) -> dict:
        """A Kinesis position not yet read, with the time its shards start AT_TIMESTAMP: a little
        before the bulk load began (by this process's clock, or the saved scan's start after a
        restart), so no change made during the bulk load is missed; replaying a little more is
        harmless, since newer wins. No start known: TRIM_HORIZON, equally safe, only longer."""
        position = checkpoint["stream"]
        if not self.config.kinesis_stream_arn or "start_at" in position or "verified_at" in position:
            return checkpoint
        starts = [t for t in (bulk_started, _bulk_load_state_time(checkpoint)) if t is not None]
        start_at = min(starts) - KINESIS_REPLAY_MARGIN_S if starts else None
        return {**checkpoint, "stream": {**position, "start_at": start_at}}

    async def _bulk_load(self, table: dict, key_names: tuple[str, ...], stream_arn: str) -> dict:
        """Load the whole table, by Scan or by an export to S3 (`use_scan_api` false), continuing
        one the checkpoint left unfinished; returns the checkpoint that starts the stream."""
        if self.config.use_scan_api:
            return await self._scan_load(table, key_names, stream_arn)
        return await self._export_load(table, key_names, stream_arn)

    async def _scan_load(self, table: dict, key_names: tuple[str, ...], stream_arn: str) -> dict:
        """Scan the table into the collection, continuing a scan the checkpoint left unfinished."""
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
            scan = {"start_time": _now_iso(), "clock_offset_s": self._clock_offset_s, "end_time": None,
                    "total_records": table.get("ItemCount", 0), "rcu_budget": budget}
        controller = ThrottleController(budget, rcu_per_item_guess(table))
        controller.throttled_requests = progress.throttled_requests
        self.status.scan_start_time, self.status.scan_total_records = scan["start_time"], scan["total_records"]
        self.status.scan_rcu_budget, self.status.scan_records_processed = budget, progress.records_processed
        table_name = self.config.table_name

        def changes_of(items: list[dict]) -> list[Change]:
            now_us = int(time.time() * 1_000_000)
            meta = {"table": table_name, "event": "SCAN", "sequence_number": None}
            return [Change(document_id(item, key_names), item_text(item), now_us, meta) for item in items]

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

    async def _export_load(self, table: dict, key_names: tuple[str, ...], stream_arn: str) -> dict:
        """Export the table to S3 and load the export's files (see `shoal.ingest.export`),
        continuing an export the checkpoint left unfinished: the same export, done files skipped.

        As for a scan, the stream position is taken before the export starts and replayed after
        it, so changes made while DynamoDB exports end up applied. Checkpoint part `scan`:
        {start_time, end_time, total_records, records_processed (items of done files),
         export_time (the export's point in time, once it is known),
         export: {bucket, prefix, arn (None until started), files, done (ranges of indexes),
                  failures, failed_at, failure (of the exports that failed before this one)}}."""
        bucket, table_name = self.config.s3_export_bucket, self.config.table_name
        if not bucket:
            raise SourceProblem("use_scan_api is false, so the bulk load exports the table to S3, but the "
                                "integration has no s3_export_bucket_name: create one that has it, or use the scan")
        saved = self.collection.checkpoint or {}
        if saved.get("phase") == "scan" and "export" in saved["scan"] and saved["stream"]["stream_arn"] == stream_arn:
            stream_position, scan = saved["stream"], saved["scan"]
        else:
            # The stream position comes first: every change from here on is replayed after the export.
            stream_position = {"stream_arn": stream_arn, "shards": {}}
            scan = {"start_time": _now_iso(), "clock_offset_s": self._clock_offset_s, "end_time": None,
                    "total_records": table.get("ItemCount", 0), "records_processed": 0, "export": {"bucket": bucket, "prefix": export_prefix(table_name), "arn": None}}
            await self.collection.apply([], {"phase": "scan", "stream": stream_position, "scan": scan})
        export = scan["export"]
        self.status.state = EXPORTING
        self.status.scan_start_time, self.status.scan_total_records = scan["start_time"], scan["total_records"]
        self.status.scan_records_processed, self.status.scan_rcu_budget = scan["records_processed"], None

        async def save(**changed: Any) -> None:
            nonlocal scan, export
            export = {**export, **changed}
            scan = {**scan, "export": export}
            await self.collection.apply([], {"phase": "scan", "stream": stream_position, "scan": scan})

        async def start_over(problem: ExportProblem) -> None:
            """Make the retry take a new export, from its first file (the files done were the old
            one's), once EXPORT_RETRY_S of this problem's count has passed."""
            nonlocal scan, export
            failures = export.get("failures", 0) + 1
            export = {"bucket": export["bucket"], "prefix": export_prefix(table_name), "arn": None,
                      "failures": failures, "failed_at": time.time(), "failure": str(problem)}
            # The next export's load starts now: what this one loaded is replaced or removed after
            # it (`_remove_unscanned`), and an old start would age the stream position with it.
            scan = {key: value for key, value in scan.items() if key != "export_time"}
            scan = {**scan, "start_time": _now_iso(), "clock_offset_s": self._clock_offset_s, "records_processed": 0,
                    "export": export}
            self.status.scan_start_time, self.status.scan_records_processed = scan["start_time"], 0
            await self.collection.apply([], {"phase": "scan", "stream": stream_position, "scan": scan})

        async with self.access.client("dynamodb", self.config.region) as dynamodb, \
                self.access.client("s3", self.config.region) as s3:
            if export["arn"] is None:
                if export.get("failures"):
                    next_at = export["failed_at"] + EXPORT_RETRY_S[min(export["failures"], len(EXPORT_RETRY_S)) - 1]
                    if time.time() < next_at:  # an export is billed by the table's size: not every few seconds
                        raise ExportProblem(f"{export['failure']}. Export {export['failures']} of the table failed; "
                                            f"the next one starts at {_iso(datetime.fromtimestamp(next_at, timezone.utc))}")
                await ensure_point_in_time_recovery(dynamodb, table_name)
                await save(arn=await start_export(dynamodb, table["TableArn"], export["bucket"], export["prefix"]))
            try:
                description = await wait_for_export(dynamodb, export["arn"])
            except ExportProblem as problem:
                await start_over(problem)
                raise
            if description.get("ExportTime") is not None:  # the table's state the files hold
                scan = {**scan, "export_time": _iso(description["ExportTime"])}
            self.status.state = DOWNLOADING
            files, total = await export_files(s3, description)
            if total is not None:
                scan = {**scan, "total_records": total}
                self.status.scan_total_records = total
            done = from_ranges(export.get("done", []))
            partly_applied: dict[int, int] = {}  # items per file not done yet (status only: re-read after a crash)

            async def apply_batches(batches: list[FileBatch]) -> None:
                nonlocal scan
                finished = [batch for batch in batches if batch.items_in_file is not None]
                done.update(batch.index for batch in finished)
                scan = {**scan, "records_processed": scan["records_processed"] + sum(b.items_in_file or 0 for b in finished),
                        "export": {**export, "files": len(files), "done": to_ranges(done)}}
                changes = [change for batch in batches for change in batch.changes]
                await self.collection.apply(changes, {"phase": "scan", "stream": stream_position, "scan": scan})
                for batch in batches:
                    partly_applied[batch.index] = partly_applied.get(batch.index, 0) + len(batch.changes)
                for batch in finished:
                    del partly_applied[batch.index]
                self.status.scan_records_processed = scan["records_processed"] + sum(partly_applied.values())

            loader = ExportLoader(s3_chunks(s3, export["bucket"]), export_decoder(key_names, table_name))
            await loader.run(((i, file) for i, file in enumerate(files) if i not in done), apply_batches)
        if total is not None and scan["records_processed"] != total:
            problem = ExportProblem(f"the export's files hold {scan['records_processed']} items, "
                                    f"but DynamoDB says it exported {total}")
            await start_over(problem)  # reading the same files again would find the same
            raise problem
        scan = {**scan, "end_time": _now_iso()}
        checkpoint = {"phase": "stream", "stream": stream_position, "scan": scan}
        await self.collection.apply([], checkpoint)
        self.status.scan_records_processed, self.status.scan_end_time = scan["records_processed"], scan["end_time"]
        return checkpoint

    async def _follow_stream(self, reader: StreamReader | KinesisReader, checkpoint: dict) -> None:
        """Apply the stream's changes round by round, each with the position that covers it.
        Raises StreamTrimmed when changes were lost, StreamEnded when the stream was disabled.
        Kinesis may deliver an item's changes duplicated or out of order: there, newer wins.

        Rounds are read ahead while earlier ones are applied (up to READ_AHEAD_ROUNDS), so a
        busy stream costs the slower of reading and applying, not their sum; and the rounds
        waiting when an apply ends are applied together, as one refresh with the last one's
        position (each round's position covers every change before it), so an apply that
        falls behind catches up in bigger, cheaper refreshes instead of one per round. A
        read's error is raised once the rounds read before it are applied."""
        self.status.state = "PROCESSING_STREAM"
        rounds: asyncio.Queue[ReadResult | Exception] = asyncio.Queue(READ_AHEAD_ROUNDS)
        reading = asyncio.ensure_future(_read_ahead(reader, rounds))
        try:
            while True:
                waiting = [await rounds.get()]
                while not rounds.empty() and sum(len(r.changes) for r in waiting) < MAX_CHANGES_PER_REFRESH:
                    waiting.append(rounds.get_nowait())
                results = [r for r in waiting if isinstance(r, ReadResult)]
                if results:
                    merged = results[0] if len(results) == 1 else ReadResult(
                        [c for r in results for c in r.changes], results[-1].position, results[-1].caught_up, results[-1].fresh_as_of)
                    checkpoint = await self._apply_round(reader, merged, checkpoint)
                if len(results) < len(waiting):
                    raise waiting[-1]  # the reader stops at its first error
        finally:
            reading.cancel()  # and waited for: the next reader must not share the client with its calls
            await asyncio.gather(reading, return_exceptions=True)

    async def _apply_round(self, reader: StreamReader | KinesisReader, result: ReadResult, checkpoint: dict) -> dict:
        """Apply one round's changes with the position that covers them; returns the checkpoint."""
        if result.changes or result.position != checkpoint["stream"]:  # or shards found, finished, verified
            checkpoint = {**checkpoint, "stream": result.position}
            changes = _after_bulk_load_began(result.changes, checkpoint)
            if isinstance(reader, KinesisReader):
                await self.collection.apply_newer(changes, checkpoint, reader.tombstone_keep_s)
            else:
                await self.collection.apply(changes, checkpoint)
        if result.changes:
            self.status.stream_last_processed_at = _now_iso()
        self.status.stream_shards = reader.shard_status()
        self.status.stream_fresh_as_of = result.fresh_as_of
        self.status.stream_throttled_requests = reader.throttled_requests
        self.status.error = None  # the source answered: a lasting fault keeps its backoff until then
        if result.caught_up:
            self.status.caught_up = True
            self.status.rebuilding = None
        return checkpoint

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
        checkpoint = {**checkpoint, "stream": {**position, "verified_at": _bulk_load_state_time(checkpoint)}}
        await self.collection.apply([Change(doc_id, None, now_us, meta) for doc_id in unscanned], checkpoint)
        if unscanned:
            log.info("removed %d documents of %s the bulk load did not see", len(unscanned), self.config.table_name)
        return checkpoint


def _advice_if_slower_than_the_stream(checkpoint: dict) -> str:
    """What to change when the last bulk load took longer than a DynamoDB stream keeps changes:
    the stream was trimmed before it was read, and every rebuild would end the same way."""
    scan = checkpoint.get("scan", {})
    if not scan.get("start_time") or not scan.get("end_time"):
        return ""
    took = (datetime.fromisoformat(scan["end_time"]) - datetime.fromisoformat(scan["start_time"])).total_seconds()
    if took < RETENTION_S - RETENTION_MARGIN_S:
        return ""
    return (f". The bulk load took {took / 3600:.1f} hours, longer than a DynamoDB stream keeps changes, so a "
            "rebuild would end the same way: give the collection a larger rcu budget, or load by export to S3 "
            "(use_scan_api false)")


def _written_before_scan(snapshot: Snapshot, scan_start: datetime) -> list[str]:
    """_ids of the documents a scan started at `scan_start` did not write: stream changes, or
    scanned earlier (`_bulk_load` writes event SCAN at the time of each page)."""
    since = pa.scalar(scan_start, pa.timestamp("us", tz="UTC"))
    unscanned: list[str] = []
    for batch in snapshot.batches():
        scanned = pc.and_(pc.equal(pc.struct_field(batch["_meta"], "event"), "SCAN"), pc.greater_equal(batch["_event_time"], since))
        unscanned.extend(batch["_id"].filter(pc.invert(pc.fill_null(scanned, False))).to_pylist())
    return unscanned


# DynamoDB Streams rounds ApproximateCreationDateTime down to the second; clocks differ a little.
REPLAY_SKIP_MARGIN_S = 60.0


async def _read_ahead(reader: StreamReader | KinesisReader, rounds: asyncio.Queue) -> None:
    """Read rounds into `rounds` until the first error, which goes in last."""
    while True:
        try:
            result = await reader.read()
        except Exception as error:
            await rounds.put(error)
            return
        await rounds.put(result)


def _after_bulk_load_began(changes: list[Change], checkpoint: dict) -> list[Change]:
    """The changes the bulk load may not hold. The stream is replayed from before the bulk load
    (DynamoDB Streams from TRIM_HORIZON: up to 24 h of changes); a change made well before it
    began is already in what it read (the scan reads strongly consistent, the export is of its
    ExportTime or later), so applying it again would only rewrite the same documents, the
    longest part of getting READY. From Kinesis, records come late or twice: applied, a late
    copy would overwrite the newer state the bulk load read (which has no version to compare),
    or bring back an item deleted before it."""
    started = _bulk_load_state_time(checkpoint)
    if started is None or not changes:
        return changes
    covered_before_us = (started - REPLAY_SKIP_MARGIN_S) * 1_000_000
    return [change for change in changes if change.event_time_us >= covered_before_us]


def _arn_region(arn: str) -> str:
    """The region of an ARN (arn:partition:service:region:account:resource)."""
    return arn.split(":")[3]


def _check_stream(table: dict) -> str:
    spec = table.get("StreamSpecification") or {}
    arn = table.get("LatestStreamArn")
    name = table["TableName"]
    if not spec.get("StreamEnabled") or not arn:
        raise SourceProblem(
            f"table {name} has no DynamoDB stream: enable one with view type NEW_AND_OLD_IMAGES (aws dynamodb "
            f"update-table --table-name {name} --stream-specification StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES); "
            "ingest starts by itself once it is enabled"
        )
    if spec.get("StreamViewType") != "NEW_AND_OLD_IMAGES":
        raise SourceProblem(
            f"the stream of table {name} has view type {spec.get('StreamViewType')}; Shoal needs NEW_AND_OLD_IMAGES "
            "(a delete or update is only complete with both images). A stream's view type cannot be changed: "
            "disable the stream, then enable it again with view type NEW_AND_OLD_IMAGES"
        )
    return arn


class SourceProblem(Exception):
    """A problem with the source that the user must fix; the message says how."""


_INVALID_CREDENTIALS = ("UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException")
# AWS's InvalidSignatureException quotes the request it expected to be signed, session token
# included: status and log show neither.
_EXPECTED_REQUEST = re.compile(r"\s*The Canonical String for this request should have been.*", re.S)


def _describe_error(error: Exception, config: SourceConfig) -> str:
    """The status line of a failed attempt: AWS's code and message as AWS put them and, for the
    faults only the user can fix (missing table or wrong region, missing permission, invalid
    keys), what to do. Everything is retried anyway, so ingest resumes once it is fixed."""
    response = getattr(error, "response", None)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):  # tantivy's, too
        return (f"{error}. The disk of Shoal's data directory is full: free space or grow it; ingest "
                "resumes by itself (nothing was half-written: the collection is as of its last refresh)")
    if not (isinstance(response, dict) and "Error" in response):
        return str(error) or type(error).__name__
    code = response["Error"].get("Code", "Error")
    message = without_secrets(_EXPECTED_REQUEST.sub("", response["Error"].get("Message", "")))
    described = f"{code}: {message}".strip()
    said = described.rstrip(".") + "."  # what AWS said, as a sentence the advice follows
    operation = getattr(error, "operation_name", "")
    if code == "ResourceNotFoundException" and operation == "DescribeTable":
        return (f"{said} There is no table {config.table_name} in region {config.region}: check the "
                "collection's table_name and aws_region, or create the table; ingest starts once it exists")
    if code in ("AccessDeniedException", "AccessDenied"):
        denied = re.search(r"not authorized to perform: ([\w-]+:[\w*]+)", message)
        permission = denied.group(1) if denied else f"the permission to call {operation}"
        return (f"{said} Allow {permission} to the integration's AWS credentials (in their IAM policy); "
                "ingest resumes by itself once it is allowed")
    if code in _INVALID_CREDENTIALS:
        return f"{said} The integration's AWS credentials are not valid: create the integration with valid ones"
    return described
