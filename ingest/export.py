"""Bulk load by DynamoDB's export to S3 (`use_scan_api: false`): no read capacity used.

An export is written by DynamoDB from the table's point-in-time-recovery backup, so a table of
any size is loaded without touching its provisioned reads (the scan path's concern). The
steps, driven by `SourcePipeline._export_load`:

1. `ensure_point_in_time_recovery`: exports need PITR. When it is off, Shoal turns it on
   (`dynamodb:UpdateContinuousBackups`); when that is denied, the error says what to do.
2. `start_export`: `ExportTableToPointInTime` (DYNAMODB_JSON) into the integration's bucket,
   under a prefix of its own (`export_prefix`), whose uuid is also the `ClientToken`: asking
   again after a crash returns the same export instead of starting a second one.
3. `wait_for_export` polls `DescribeExport` (exports take minutes whatever the table's size).
4. `export_files` finds the data files. AWS's layout is
   `<prefix>/AWSDynamoDB/<export-id>/manifest-summary.json` → `manifest-files.json` (JSON
   lines `{itemCount, md5Checksum, etag, dataFileS3Key}`) → `data/*.json.gz`; the manifest's
   counts must add up to the summary's `itemCount`. The local endpoint (moto) writes one
   `data/<uuid>.gz` and no manifest: then every `.gz` under the prefix is read, and only the
   total can be checked (against DescribeExport's `ItemCount`).
5. `ExportLoader.run` reads up to `PARALLEL_FILES` files at once, streaming: each chunk of a
   file is hashed, gunzipped, split into lines (`{"Item": {...}}`) and decoded to changes
   in a worker thread, and handed to one applier through a bounded queue. Memory is a few
   chunks' worth of changes whatever the table's size; a file is never held whole. At its
   end a file's MD5 (base64, as `md5Checksum`) and item count are checked; a mismatch
   raises `ExportProblem` (the pipeline shows it and retries; the file is not marked done).

Resuming: the checkpoint (`scan.export`) holds the export's ARN and prefix and which files are
fully applied (`done`, ranges of indexes into the files sorted by key). A restart neither
exports again nor re-reads a done file; a file that was partly applied is read again from
its start, which is harmless because a document is overwritten whole by its `_id`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import orjson

from shoal.index.collection import Change

from .decode import document_id, item_text

EXPORTING = "EXPORTING_TO_S3"  # SourceStatus.state while DynamoDB writes the export
DOWNLOADING = "DOWNLOADING_FROM_S3"  # ... while Shoal reads its files
EXPORT_FORMAT = "DYNAMODB_JSON"
PARALLEL_FILES = 4  # downloads at once: enough to hide S3's latency; decoding is the bound
CHUNK_BYTES = 128 * 1024  # of gzip per read: ~1 MB of JSON, a few thousand items per batch
QUEUED_BATCHES = 4  # decoded batches waiting for the applier (the memory bound)
APPLY_ITEMS = 50_000  # waiting batches are applied together up to this many changes
POLL_FIRST_S, POLL_MAX_S = 0.5, 15.0  # DescribeExport: soon for small tables, then every 15 s


class ExportProblem(Exception):
    """The export failed, or its files are not what its manifest says; the message says which."""


@dataclass(frozen=True)
class ExportFile:
    key: str
    item_count: int | None  # None in the local endpoint's layout (no manifest)
    md5: str | None  # base64 MD5 of the gzip file, as manifest-files.json gives it


@dataclass
class FileBatch:
    """Decoded changes of one file; `items_in_file` is set on its last batch only, once the
    file's checksum and count have been verified."""

    index: int  # into the export's files sorted by key
    changes: list[Change]
    items_in_file: int | None = None


# ---------------------------------------------------------------------- the export itself


def export_prefix(table_name: str) -> str:
    return f"shoal-exports/{table_name}/{uuid.uuid4().hex}"


async def ensure_point_in_time_recovery(dynamodb: Any, table_name: str) -> None:
    described = await dynamodb.describe_continuous_backups(TableName=table_name)
    pitr = described["ContinuousBackupsDescription"].get("PointInTimeRecoveryDescription", {})
    if pitr.get("PointInTimeRecoveryStatus") == "ENABLED":
        return
    try:
        await dynamodb.update_continuous_backups(
            TableName=table_name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True})
    except Exception as error:  # noqa: BLE001 - only a denial is turned into advice; others propagate
        code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
        if code not in ("AccessDeniedException", "UnauthorizedOperation"):
            raise
        raise ExportProblem(
            f"point-in-time recovery is off for table {table_name}, and the bulk load by S3 export needs it. "
            "Turn it on (console: table → Backups → Point-in-time recovery → Edit; or "
            f"`aws dynamodb update-continuous-backups --table-name {table_name} "
            "--point-in-time-recovery-specification PointInTimeRecoveryEnabled=true`), or give the "
            "integration's role dynamodb:UpdateContinuousBackups so Shoal can turn it on"
        ) from None


async def start_export(dynamodb: Any, table_arn: str, bucket: str, prefix: str) -> str:
    """Start the export; the ARN of the one already started with this prefix, if any."""
    answer = await dynamodb.export_table_to_point_in_time(
        TableArn=table_arn, S3Bucket=bucket, S3Prefix=prefix, ExportFormat=EXPORT_FORMAT,
        ClientToken=prefix.rsplit("/", 1)[-1])
    return answer["ExportDescription"]["ExportArn"]


async def wait_for_export(dynamodb: Any, arn: str) -> dict[str, Any]:
    """The export's description once COMPLETED; ExportProblem when it FAILED or is gone."""
    delay = POLL_FIRST_S
    while True:
        try:
            description = (await dynamodb.describe_export(ExportArn=arn))["ExportDescription"]
        except dynamodb.exceptions.ExportNotFoundException:
            raise ExportProblem(f"the export {arn} no longer exists") from None
        status = description["ExportStatus"]
        if status == "COMPLETED":
            return description
        if status == "FAILED":
            raise ExportProblem(f"the export {arn} failed: {description.get('FailureCode')}: "
                                f"{description.get('FailureMessage')}")
        await asyncio.sleep(delay)
        delay = min(POLL_MAX_S, delay * 2)


async def export_files(s3: Any, description: dict[str, Any]) -> tuple[list[ExportFile], int | None]:
    """The export's data files sorted by key, and the item count they must add up to."""
    bucket, prefix = description["S3Bucket"], description.get("S3Prefix") or ""
    summary_key = description.get("ExportManifest")
    keys: list[str] = []
    if not summary_key:  # DescribeExport without the manifest's key: look for it
        keys = await _list_keys(s3, bucket, _full_key(prefix, "AWSDynamoDB/"))
        summaries = [key for key in keys if key.endswith("/manifest-summary.json")]
        summary_key = summaries[0] if len(summaries) == 1 else None
    if summary_key:
        summary = orjson.loads(await _read_object(s3, bucket, _full_key(prefix, summary_key)))
        manifest = await _read_object(s3, bucket, _full_key(prefix, summary["manifestFilesS3Key"]))
        files = [ExportFile(_full_key(prefix, entry["dataFileS3Key"]), int(entry["itemCount"]), entry["md5Checksum"])
                 for entry in map(orjson.loads, manifest.splitlines()) if entry]
        listed = sum(file.item_count or 0 for file in files)
        if listed != summary["itemCount"]:
            raise ExportProblem(f"the export's manifest lists {listed} items in {len(files)} files, "
                                f"but its summary says {summary['itemCount']}")
        return sorted(files, key=lambda file: file.key), summary["itemCount"]
    data = [key for key in keys if "/data/" in key and key.endswith(".gz")]
    if not data:
        raise ExportProblem(f"the export {description['ExportArn']} left no manifest and no data files "
                            f"under s3://{bucket}/{prefix}")
    return [ExportFile(key, None, None) for key in sorted(data)], description.get("ItemCount")


def _full_key(prefix: str, key: str) -> str:
    """Manifests name keys from the bucket's root; AWS's documented example omits the prefix."""
    if not prefix or key.startswith(prefix.rstrip("/") + "/"):
        return key
    return f"{prefix.rstrip('/')}/{key}"


async def _list_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    arguments = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = await s3.list_objects_v2(**arguments)
        keys.extend(entry["Key"] for entry in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return keys
        arguments["ContinuationToken"] = page["NextContinuationToken"]


async def _read_object(s3: Any, bucket: str, key: str) -> bytes:
    answer = await s3.get_object(Bucket=bucket, Key=key)
    async with answer["Body"] as body:
        return await body.read()


def s3_chunks(s3: Any, bucket: str) -> Callable[[str], AsyncIterator[bytes]]:
    """Reads an object of `bucket` chunk by chunk (how `ExportLoader` reads files)."""
    async def chunks(key: str) -> AsyncIterator[bytes]:
        answer = await s3.get_object(Bucket=bucket, Key=key)
        async with answer["Body"] as body:
            async for chunk in body.iter_chunks(CHUNK_BYTES):
                yield chunk
    return chunks


# ---------------------------------------------------------------------- decoding


def export_decoder(key_names: tuple[str, ...], table_name: str) -> Callable[[list[bytes]], list[Change]]:
    """Lines of an export file → changes; exported documents are marked as bulk-loaded
    (`_meta.event` "SCAN", like the scan path's, which `_remove_unscanned` relies on)."""
    meta = {"table": table_name, "event": "SCAN", "sequence_number": None}

    def decode(lines: list[bytes]) -> list[Change]:
        now_us = int(time.time() * 1_000_000)
        changes = []
        for line in lines:
            item = orjson.loads(line)["Item"]
            changes.append(Change(document_id(item, key_names), item_text(item), now_us, meta))
        return changes
    return decode


class _FileDecoder:
    """One file, fed chunk by chunk: MD5 of the gzip bytes, gunzip (several members allowed),
    whole lines decoded; the partial last line waits for the next chunk."""

    def __init__(self, decode: Callable[[list[bytes]], list[Change]]) -> None:
        self._decode = decode
        self._md5 = hashlib.md5()
        self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        self._in_member = False
        self._tail = b""
        self.items = 0

    def feed(self, chunk: bytes) -> list[Change]:
        self._md5.update(chunk)
        text = []
        while chunk:
            self._in_member = True
            text.append(self._inflater.decompress(chunk))
            if not self._inflater.eof:
                break
            chunk, self._in_member = self._inflater.unused_data, False
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        lines = (self._tail + b"".join(text)).split(b"\n")
        self._tail = lines.pop()
        return self._lines(lines)

    def finish(self, file: ExportFile) -> list[Change]:
        if self._in_member:
            raise ExportProblem(f"{file.key} ends in the middle of its gzip stream")
        changes = self._lines([self._tail])
        md5 = base64.b64encode(self._md5.digest()).decode()
        if file.md5 is not None and md5 != file.md5:
            raise ExportProblem(f"{file.key} has MD5 {md5}, but the export's manifest says {file.md5}")
        if file.item_count is not None and self.items != file.item_count:
            raise ExportProblem(f"{file.key} holds {self.items} items, but the export's manifest says {file.item_count}")
        return changes

    def _lines(self, lines: list[bytes]) -> list[Change]:
        lines = [line for line in lines if line.strip()]
        self.items += len(lines)
        return self._decode(lines) if lines else []


# ---------------------------------------------------------------------- reading files


class ExportLoader:
    """Reads export files in parallel and hands their decoded changes to one applier.

    `chunks(key)` yields a file's bytes (`s3_chunks`, or local files in bench/); `decode`
    turns lines into changes (`export_decoder`). `run(files, apply)` calls `apply` with the
    batches waiting, in queue order: a file's batches arrive in file order and its last one
    (`items_in_file` set) after all the others, so once `apply` returns for it, the whole
    file is applied."""

    def __init__(self, chunks: Callable[[str], AsyncIterator[bytes]],
                 decode: Callable[[list[bytes]], list[Change]], parallel: int = PARALLEL_FILES) -> None:
        self._chunks = chunks
        self._decode = decode
        self._parallel = parallel

    async def run(self, files: Iterable[tuple[int, ExportFile]],
                  apply: Callable[[list[FileBatch]], Awaitable[None]]) -> None:
        todo = list(files)
        queue: asyncio.Queue[FileBatch | BaseException] = asyncio.Queue(QUEUED_BATCHES)
        pending = iter(todo)

        async def reader() -> None:
            try:
                for index, file in pending:  # one shared iterator: each file is read once
                    await self._read(index, file, queue)
            except Exception as error:  # noqa: BLE001 - handed to the applier, which raises it
                await queue.put(error)

        readers = [asyncio.create_task(reader()) for _ in range(min(self._parallel, len(todo)))]
        try:
            remaining = len(todo)
            while remaining:
                batches = [await queue.get()]
                while not queue.empty() and sum(len(b.changes) for b in batches if isinstance(b, FileBatch)) < APPLY_ITEMS:
                    batches.append(queue.get_nowait())
                failed = next((b for b in batches if isinstance(b, BaseException)), None)
                if failed is not None:
                    raise failed
                await apply(batches)  # type: ignore[arg-type]
                remaining -= sum(1 for b in batches if b.items_in_file is not None)  # type: ignore[union-attr]
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _read(self, index: int, file: ExportFile, queue: asyncio.Queue) -> None:
        decoder = _FileDecoder(self._decode)
        async for chunk in self._chunks(file.key):
            changes = await asyncio.to_thread(decoder.feed, chunk)
            if changes:
                await queue.put(FileBatch(index, changes))
        last = await asyncio.to_thread(decoder.finish, file)
        await queue.put(FileBatch(index, last, items_in_file=decoder.items))


# ---------------------------------------------------------------------- checkpoint helpers


def to_ranges(indexes: Iterable[int]) -> list[list[int]]:
    """{0, 1, 2, 5} → [[0, 2], [5, 5]]: a checkpoint stays small with thousands of files."""
    ranges: list[list[int]] = []
    for index in sorted(indexes):
        if ranges and ranges[-1][1] == index - 1:
            ranges[-1][1] = index
        else:
            ranges.append([index, index])
    return ranges


def from_ranges(ranges: Iterable[list[int]]) -> set[int]:
    return {index for first, last in ranges for index in range(first, last + 1)}
