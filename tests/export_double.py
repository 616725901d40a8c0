"""A test double: DynamoDB and S3 in front of moto, with what moto's export lacks.

`ExportDouble` listens on loopback and forwards every request (DynamoDB's JSON protocol on
POST /, S3's REST calls on paths) to moto unchanged, so a Shoal integration can use it as
its one `endpoint_url`. On top it models, in the real wire format:

* **AWS's export layout.** moto writes one `data/<uuid>.gz` and no manifest (facts §4), and
  cannot be told otherwise. With `real_layout`, `ExportTableToPointInTime` never reaches
  moto: the double reads the table from moto (Scan), writes `files` gzip data files
  `<prefix>/AWSDynamoDB/<export-id>/data/<name>.json.gz` (one `{"Item": ...}` per line),
  `manifest-files.json` (`{itemCount, md5Checksum, etag, dataFileS3Key}` per line, MD5 in
  base64) and `manifest-summary.json` into moto's S3, and answers `ExportDescription` as
  DynamoDB does (ARN `table/<name>/export/<id>`, `ExportManifest`, `ItemCount`, epoch-second
  timestamps). `corrupt_file` replaces one data file after its manifest line was written
  (same items, other bytes: only its MD5 differs).
* **Time.** `hold_exports()` makes DescribeExport answer `IN_PROGRESS` until
  `release_exports()`, as a real export does for minutes; `before_export(fn)` runs `fn` (in a
  thread) when the export is asked for, before the table is read.
* **Exports that go.** `forget_exports()` makes DescribeExport answer
  `ExportNotFoundException` for every real-layout export so far, as for an expired one.
  `fail_exports = (code, message)` makes every export end FAILED with that FailureCode.
  `export_time_lag_s` dates a real-layout export's `ExportTime` that long before the request
  (an export of an earlier point in time).
* **Permissions.** `deny_pitr_update` answers UpdateContinuousBackups with HTTP 400
  `AccessDeniedException`, as DynamoDB does for a role without that permission.
* **Slow files.** `block_files(part)` holds S3 GETs of keys containing `part` until
  `unblock_files()` or another `block_files`.

It counts what it served: `exports_started`, `completed_seen` (moto exports seen COMPLETED),
and `gets` (S3 GETs per key).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gzip
import hashlib
import threading
import time
import uuid
from typing import Any, Callable

import orjson
from aiohttp import web

from support import LoopbackServer

TARGET_PREFIX = "DynamoDB_20120810."
ACCOUNT = "123456789012"


class ExportDouble(LoopbackServer):
    name = "export-double"

    def __init__(self, moto_url: str, real_layout: bool = False, files: int = 3) -> None:
        super().__init__()
        self.moto_url = moto_url
        self.real_layout = real_layout
        self.files = files
        self.corrupt_file: int | None = None
        self.deny_pitr_update = False
        self.exports_started = 0
        self.completed_seen = 0
        self.gets: collections.Counter[str] = collections.Counter()
        self._before_export: Callable[[], None] | None = None
        self._held = threading.Event()
        self._blocked_part: str | None = None
        self.export_time_lag_s = 0.0
        self.fail_exports: tuple[str, str] | None = None
        self._exports: dict[str, dict[str, Any]] = {}  # real-layout exports by ARN
        self._forgotten: set[str] = set()

    # -- what tests call (from their own thread)

    def hold_exports(self) -> None:
        self._held.set()

    def release_exports(self) -> None:
        self._held.clear()

    def before_export(self, fn: Callable[[], None]) -> None:
        self._before_export = fn

    def forget_exports(self) -> None:
        self._forgotten.update(self._exports)

    def block_files(self, part: str) -> None:
        """Hold GETs of keys containing `part` (from now on, and those held already)."""
        self._blocked_part = part

    def unblock_files(self) -> None:
        self._blocked_part = None

    # -- serving

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        target = request.headers.get("X-Amz-Target", "")
        if target.startswith(TARGET_PREFIX):
            operation = target[len(TARGET_PREFIX):]
            handler = getattr(self, f"_op_{operation}", None)
            if handler is not None:
                return await handler(request, body)
        elif request.method == "GET" and "list-type" not in request.query:
            key = request.path.lstrip("/").split("/", 1)[-1]
            self.gets[key] += 1
            while self._blocked_part and self._blocked_part in key:
                await asyncio.sleep(0.02)
        status, headers, answer = await self._forward(request, body)
        return web.Response(status=status, body=answer, headers=headers)

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.moto_url + request.path_qs, data=body,
                                         headers=headers) as response:
            answer = await response.read()
            kept = {k: v for k, v in response.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding", "server", "date")}
            return response.status, kept, answer

    async def _op_UpdateContinuousBackups(self, request: web.Request, body: bytes) -> web.Response:
        if self.deny_pitr_update:
            table = orjson.loads(body)["TableName"]
            return _error("com.amazon.coral.service#AccessDeniedException",
                          f"User: arn:aws:sts::{ACCOUNT}:assumed-role/shoal/shoal is not authorized to perform: "
                          f"dynamodb:UpdateContinuousBackups on resource: arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/{table}")
        status, headers, answer = await self._forward(request, body)
        return web.Response(status=status, body=answer, headers=headers)

    async def _op_ExportTableToPointInTime(self, request: web.Request, body: bytes) -> web.Response:
        self.exports_started += 1
        if self._before_export is not None:
            await asyncio.to_thread(self._before_export)
        if not self.real_layout:
            status, headers, answer = await self._forward(request, body)
            return web.Response(status=status, body=answer, headers=headers)
        asked = orjson.loads(body)
        description = await self._write_real_export(request, asked)
        self._exports[description["ExportArn"]] = description
        return _json({"ExportDescription": {**description, "ExportStatus": "IN_PROGRESS"}})

    async def _op_DescribeExport(self, request: web.Request, body: bytes) -> web.Response:
        arn = orjson.loads(body)["ExportArn"]
        if arn in self._forgotten:
            return _error("com.amazonaws.dynamodb.v20120810#ExportNotFoundException", f"Export not found: {arn}")
        if arn in self._exports:
            description = {"ExportDescription": {**self._exports[arn], "ExportStatus": "COMPLETED"}}
        else:
            status, headers, answer = await self._forward(request, body)
            if status != 200:
                return web.Response(status=status, body=answer, headers=headers)
            description = orjson.loads(answer)
        if description["ExportDescription"]["ExportStatus"] == "COMPLETED" and self.fail_exports:
            code, message = self.fail_exports
            description["ExportDescription"].update(ExportStatus="FAILED", FailureCode=code, FailureMessage=message)
        if description["ExportDescription"]["ExportStatus"] == "COMPLETED":
            self.completed_seen += 1
            if self._held.is_set():
                description["ExportDescription"]["ExportStatus"] = "IN_PROGRESS"
        return _json(description)

    # -- the real layout

    async def _write_real_export(self, request: web.Request, asked: dict[str, Any]) -> dict[str, Any]:
        table_arn, bucket, prefix = asked["TableArn"], asked["S3Bucket"], asked.get("S3Prefix", "")
        table_name = table_arn.rsplit("/", 1)[-1]
        items = await self._scan(request, table_name)
        started = time.time()
        export_id = f"{int(started * 1000):014d}-{uuid.uuid4().hex[:8]}"
        base = f"{prefix}/AWSDynamoDB/{export_id}" if prefix else f"AWSDynamoDB/{export_id}"
        files: list[tuple[str, bytes]] = []
        manifest_lines = []
        for n in range(self.files):
            part = items[n::self.files]
            data = gzip.compress(b"".join(orjson.dumps({"Item": item}) + b"\n" for item in part))
            key = f"{base}/data/{uuid.uuid4().hex[:26]}.json.gz"
            files.append((key, data))
            manifest_lines.append(orjson.dumps({
                "itemCount": len(part), "md5Checksum": base64.b64encode(hashlib.md5(data).digest()).decode(),
                "etag": hashlib.md5(data).hexdigest(), "dataFileS3Key": key}))
        if self.corrupt_file is not None:
            key, data = files[self.corrupt_file]
            lines = gzip.decompress(data).splitlines(keepends=True)
            files[self.corrupt_file] = (key, gzip.compress(b"".join(reversed(lines)), mtime=0))
        summary = {
            "version": "2020-06-30", "exportArn": f"{table_arn}/export/{export_id}",
            "startTime": _iso(started), "endTime": _iso(time.time()), "tableArn": table_arn,
            "tableId": str(uuid.uuid4()), "exportTime": _iso(started), "s3Bucket": bucket, "s3Prefix": prefix,
            "s3SseAlgorithm": "AES256", "s3SseKmsKeyId": None, "manifestFilesS3Key": f"{base}/manifest-files.json",
            "billedSizeBytes": sum(len(data) for _, data in files), "itemCount": len(items),
            "outputFormat": "DYNAMODB_JSON", "exportType": "FULL_EXPORT"}
        objects = [(f"{base}/_started", b""), *files, (f"{base}/manifest-files.json", b"\n".join(manifest_lines) + b"\n"),
                   (f"{base}/manifest-summary.json", orjson.dumps(summary))]
        for key, data in objects:
            await self._put_object(request, bucket, key, data)
        return {
            "ExportArn": summary["exportArn"], "StartTime": started, "EndTime": time.time(), "ExportTime": started - self.export_time_lag_s,
            "ExportManifest": f"{base}/manifest-summary.json", "TableArn": table_arn, "TableId": summary["tableId"],
            "ClientToken": asked.get("ClientToken", ""), "S3Bucket": bucket, "S3BucketOwner": ACCOUNT,
            "S3Prefix": prefix, "S3SseAlgorithm": "AES256", "ExportFormat": "DYNAMODB_JSON",
            "BilledSizeBytes": summary["billedSizeBytes"], "ItemCount": len(items), "ExportType": "FULL_EXPORT"}

    async def _scan(self, request: web.Request, table_name: str) -> list[dict]:
        """The table's items in DynamoDB JSON as on the wire (binary in base64), from moto."""
        headers = {"X-Amz-Target": TARGET_PREFIX + "Scan", "Content-Type": "application/x-amz-json-1.0",
                   "Authorization": request.headers["Authorization"]}  # names the service; moto checks no signature
        items: list[dict] = []
        scan: dict[str, Any] = {"TableName": table_name, "ConsistentRead": True}
        while True:
            async with self._session.post(self.moto_url + "/", data=orjson.dumps(scan), headers=headers) as response:
                page = orjson.loads(await response.read())
            items.extend(page["Items"])
            if "LastEvaluatedKey" not in page:
                return items
            scan["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    async def _put_object(self, request: web.Request, bucket: str, key: str, data: bytes) -> None:
        credential = request.headers["Authorization"].replace("/dynamodb/", "/s3/")
        headers = {"Authorization": credential, "x-amz-content-sha256": "UNSIGNED-PAYLOAD"}
        async with self._session.put(f"{self.moto_url}/{bucket}/{key}", data=data, headers=headers) as response:
            assert response.status == 200, (response.status, await response.text())

    async def _closing(self) -> None:
        self._blocked_part = None


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def _json(body: dict) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/x-amz-json-1.0")


def _error(error_type: str, message: str) -> web.Response:
    return web.Response(status=400, body=orjson.dumps({"__type": error_type, "Message": message}),
                        content_type="application/x-amz-json-1.0")
