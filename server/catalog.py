"""Integrations and collections of one server: persisted in the data directory, and the
owner of each collection's ingest task.

Layout of the data directory (owner-only, 0700):

    api_keys.json                      digests of API keys
    integrations.json                  integration specs, secrets included (0600)
    collections/<ws>/<name>/collection.json   the collection's spec
    collections/<ws>/<name>/index/     its storage (see shoal.index.collection)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import orjson

from shoal.index.collection import Collection, Snapshot
from shoal.index.segment import fsync_directory
from shoal.ingest.pipeline import SourcePipeline
from shoal.sql.mapping import FieldMapping

from .errors import ApiError, conflict, invalid, not_found
from .specs import (
    CollectionSpec,
    IntegrationSpec,
    collection_from_disk,
    collection_to_disk,
    integration_from_disk,
    integration_to_disk,
)

log = logging.getLogger(__name__)

# Collections reading one DynamoDB stream: DynamoDB throttles more than two readers of a shard.
MAX_READERS_PER_STREAM = 2


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with an owner-only file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)  # what the API confirmed survives a power cut


@dataclass
class LiveCollection:
    spec: CollectionSpec
    storage: Collection
    pipeline: SourcePipeline
    task: asyncio.Task | None = None


class Catalog:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.integrations: dict[str, IntegrationSpec] = {}
        self.collections: dict[tuple[str, str], LiveCollection] = {}
        self._integrations_file = data_dir / "integrations.json"
        self._collections_dir = data_dir / "collections"
        self._lock = asyncio.Lock()  # create/delete one at a time, so checks and effects agree

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load everything persisted and resume every collection's ingest from its checkpoint."""
        self._collections_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for trash in self._collections_dir.glob(".deleted-*"):
            await asyncio.to_thread(shutil.rmtree, trash, True)
        if self._integrations_file.exists():
            for data in orjson.loads(self._integrations_file.read_bytes()):
                spec = integration_from_disk(data)
                self.integrations[spec.name] = spec
        for meta in sorted(self._collections_dir.glob("*/*/collection.json")):
            spec = collection_from_disk(orjson.loads(meta.read_bytes()))
            live = await asyncio.to_thread(self._open, spec)
            self.collections[(spec.workspace, spec.name)] = live
            self._start_ingest(live)

    async def stop(self) -> None:
        for live in self.collections.values():
            await self._stop_ingest(live)
            await live.storage.close()

    def _open(self, spec: CollectionSpec) -> LiveCollection:
        mapping = FieldMapping(spec.field_mapping_sql) if spec.field_mapping_sql else None
        storage = Collection.open(self._collection_dir(spec.workspace, spec.name) / "index", mapping and mapping.apply)
        integration = self.integrations[spec.integration_name]
        source = replace(spec.source, s3_export_bucket=integration.s3_export_bucket_name)
        pipeline = SourcePipeline(storage, source, integration.access)
        return LiveCollection(spec, storage, pipeline)

    def _start_ingest(self, live: LiveCollection) -> None:
        live.task = asyncio.create_task(live.pipeline.run(), name=f"ingest {live.spec.workspace}.{live.spec.name}")

    @staticmethod
    async def _stop_ingest(live: LiveCollection) -> None:
        if live.task is not None:
            live.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live.task

    def _collection_dir(self, workspace: str, name: str) -> Path:
        return self._collections_dir / workspace / name

    # ------------------------------------------------------------------ integrations

    def integration(self, name: str) -> IntegrationSpec:
        spec = self.integrations.get(name)
        if spec is None:
            raise not_found(f"integration '{name}' does not exist")
        return spec

    def collections_using(self, integration_name: str) -> list[str]:
        return [f"{ws}.{name}" for (ws, name), live in self.collections.items()
                if live.spec.integration_name == integration_name]

    async def add_integration(self, spec: IntegrationSpec) -> None:
        async with self._lock:
            if spec.name in self.integrations:
                raise conflict(f"integration '{spec.name}' already exists")
            self.integrations[spec.name] = spec
            self._save_integrations()

    async def delete_integration(self, name: str) -> IntegrationSpec:
        async with self._lock:
            spec = self.integration(name)
            users = self.collections_using(name)
            if users:
                raise ApiError(409, "IN_USE", f"integration '{name}' is used by {', '.join(users)}; delete those first")
            del self.integrations[name]
            self._save_integrations()
            return spec

    def _save_integrations(self) -> None:
        data = [integration_to_disk(spec) for spec in self.integrations.values()]
        write_private(self._integrations_file, orjson.dumps(data))

    # ------------------------------------------------------------------ collections

    def collection(self, workspace: str, name: str) -> LiveCollection:
        live = self.collections.get((workspace, name))
        if live is None:
            raise not_found(f"collection '{workspace}.{name}' does not exist")
        return live

    def snapshot(self, workspace: str, name: str) -> Snapshot | None:
        live = self.collections.get((workspace, name))
        return None if live is None else live.storage.snapshot()

    async def add_collection(self, spec: CollectionSpec) -> LiveCollection:
        async with self._lock:
            if (spec.workspace, spec.name) in self.collections:
                raise conflict(f"collection '{spec.workspace}.{spec.name}' already exists")
            for workspace, name in self.collections:  # one directory each, and file systems may ignore case
                if workspace != spec.workspace and workspace.casefold() == spec.workspace.casefold():
                    raise conflict(f"workspace '{workspace}' exists, spelled with other letter case")
                if (workspace, name.casefold()) == (spec.workspace, spec.name.casefold()):
                    raise conflict(f"collection '{workspace}.{name}' exists, spelled with other letter case")
            integration = self.integration(spec.integration_name)
            if not spec.source.use_scan_api and not integration.s3_export_bucket_name:
                raise invalid(f"use_scan_api false loads the table by an export to S3: integration "
                              f"'{integration.name}' needs an s3_export_bucket_name")
            readers = self._stream_readers(spec)
            if len(readers) >= MAX_READERS_PER_STREAM:
                raise invalid(
                    f"collections {' and '.join(readers)} already read the DynamoDB stream of table "
                    f"'{spec.source.table_name}', and DynamoDB throttles a third reader of a shard: query those, "
                    "or give this collection a Kinesis data stream of the table (kinesis_stream_arn)")
            directory = self._collection_dir(spec.workspace, spec.name)
            if directory.exists():  # left over from a delete interrupted by a crash
                await asyncio.to_thread(shutil.rmtree, directory)
            directory.mkdir(parents=True, mode=0o700)
            live = await asyncio.to_thread(self._open, spec)
            write_private(directory / "collection.json", orjson.dumps(collection_to_disk(spec)))
            self.collections[(spec.workspace, spec.name)] = live
            self._start_ingest(live)
            return live

    def _stream_readers(self, spec: CollectionSpec) -> list[str]:
        """The collections that read the DynamoDB stream `spec` would read (same integration,
        region and table; a Kinesis source reads no DynamoDB stream)."""
        if spec.source.kinesis_stream_arn:
            return []
        return [f"{ws}.{name}" for (ws, name), live in self.collections.items()
                if not live.spec.source.kinesis_stream_arn and live.spec.integration_name == spec.integration_name
                and (live.spec.source.region, live.spec.source.table_name) == (spec.source.region, spec.source.table_name)]

    async def delete_collection(self, workspace: str, name: str) -> LiveCollection:
        async with self._lock:
            live = self.collection(workspace, name)
            await self._stop_ingest(live)
            await live.storage.close()
            del self.collections[(workspace, name)]
            directory = self._collection_dir(workspace, name)
            # Renamed first, so a crash mid-removal never leaves a half collection to load.
            trash = self._collections_dir / f".deleted-{uuid.uuid4().hex}"
            os.replace(directory, trash)
            fsync_directory(directory.parent)  # a deleted collection must not come back after a power cut
            fsync_directory(self._collections_dir)
            await asyncio.to_thread(shutil.rmtree, trash, True)
            return live
