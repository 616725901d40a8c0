"""Immutable Arrow segments, and a segment seen with its deletions at one moment.

A segment is one RecordBatch written once as an Arrow IPC file and memory-mapped back on
restart. Updates and deletes never touch it: they set bits in a deletion mask, and each
published mask is a fresh array, so a query holding an older `SegmentView` keeps reading a
consistent state while the writer moves on.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from .doctypes import conform, null_array

# Columns every document has, ahead of the item's own attributes.
SYSTEM_FIELDS = pa.schema(
    [
        pa.field("_id", pa.string(), nullable=False),
        pa.field("_event_time", pa.timestamp("us", tz="UTC")),
        pa.field(
            "_meta",
            pa.struct(
                [
                    pa.field("table", pa.string()),
                    pa.field("event", pa.string()),
                    pa.field("sequence_number", pa.string()),
                ]
            ),
        ),
        pa.field("_rowid", pa.int64(), nullable=False),
    ]
)
SYSTEM_NAMES = frozenset(SYSTEM_FIELDS.names)
# Internal: a stable row id that search results join on; not part of a document.
HIDDEN_NAMES = frozenset({"_rowid"})


def write_fsync(path: Path, data: bytes) -> None:
    """Write a new file durably: the manifest may name it only once it is on disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries durable: files created, renamed or removed in it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A refresh writes its segment and a deletion mask for each segment whose rows it replaced.
# Their fsyncs run side by side, so the file system commits them in one journal flush or a
# few rather than one each (3x faster on ext4 here); and the whole write runs beside the
# text index's commit. Two pools: a write waits for its fsyncs, never for another write.
_WRITES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="shoal-write")
_FSYNCS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="shoal-fsync")


def write_durably(files: dict[Path, bytes | pa.RecordBatch]) -> Future[None]:
    """Start writing new files (a batch as an Arrow IPC file, streamed: a merged segment is
    never copied whole into bytes); the future is done once every one of them is on disk."""
    return _WRITES.submit(_write_all, files)


def _write_all(files: dict[Path, bytes | pa.RecordBatch]) -> None:
    handles = []
    try:
        for path, data in files.items():
            handles.append(open(path, "wb"))
            if isinstance(data, pa.RecordBatch):
                with pa.ipc.new_file(handles[-1], data.schema) as writer:
                    writer.write_batch(data)
            else:
                handles[-1].write(data)
            handles[-1].flush()
        for _ in _FSYNCS.map(lambda f: os.fsync(f.fileno()), handles):
            pass
    finally:
        for f in handles:
            f.close()


@dataclass(frozen=True, eq=False)
class Segment:
    seg_id: int
    batch: pa.RecordBatch

    @property
    def rows(self) -> int:
        return self.batch.num_rows

    @cached_property
    def rowid_order(self) -> tuple[np.ndarray, np.ndarray]:
        """The segment's row ids sorted, and the row of each (merged segments are unordered)."""
        rowids = self.batch.column("_rowid").to_numpy()
        order = np.argsort(rowids, kind="stable")
        return rowids[order], order

    @staticmethod
    def file_name(seg_id: int) -> str:
        return f"seg-{seg_id:08d}.arrow"

    @classmethod
    def read(cls, directory: Path, seg_id: int) -> "Segment":
        source = pa.memory_map(str(directory / cls.file_name(seg_id)))
        return cls(seg_id, pa.ipc.open_file(source).get_batch(0))


@dataclass(frozen=True, eq=False)
class SegmentView:
    """A segment and its deletion mask as of one published state. Never mutated."""

    segment: Segment
    deleted: np.ndarray | None = None  # bool per row; None when nothing is deleted
    _query_cache: dict = field(default_factory=dict, repr=False)

    @property
    def live_count(self) -> int:
        if self.deleted is None:
            return self.segment.rows
        return self.segment.rows - int(self.deleted.sum())

    def with_deleted(self, rows: list[int]) -> "SegmentView":
        deleted = np.zeros(self.segment.rows, bool) if self.deleted is None else self.deleted.copy()
        deleted[rows] = True
        return SegmentView(self.segment, deleted)

    def rows_of(self, rowids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The live rows holding any of `rowids`, and for each the index of its id in `rowids`."""
        sorted_ids, order = self.segment.rowid_order
        if not len(sorted_ids) or not len(rowids):
            return np.empty(0, np.int64), np.empty(0, np.int64)
        positions = np.minimum(np.searchsorted(sorted_ids, rowids), len(sorted_ids) - 1)
        hits = np.flatnonzero(sorted_ids[positions] == rowids)
        rows = order[positions[hits]]
        if self.deleted is not None:
            live = ~self.deleted[rows]
            rows, hits = rows[live], hits[live]
        return rows, hits

    def live_batch(self) -> pa.RecordBatch:
        batch = self.segment.batch
        if self.deleted is None or not self.deleted.any():
            return batch
        return batch.filter(pa.array(~self.deleted))

    def query_batch(self, schema: pa.Schema, schema_version: int) -> pa.RecordBatch:
        """Live rows in the collection's query `schema` (cached per schema version)."""
        cached = self._query_cache.get(schema_version)
        if cached is None:
            cached = conform_batch(self.live_batch(), schema)
            self._query_cache.clear()
            self._query_cache[schema_version] = cached
        return cached

    def deleted_bytes(self) -> bytes:
        assert self.deleted is not None
        return np.packbits(self.deleted).tobytes()

    @staticmethod
    def deleted_from_bytes(data: bytes, rows: int) -> np.ndarray:
        return np.unpackbits(np.frombuffer(data, np.uint8), count=rows).astype(bool)


def conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with exactly the columns of `schema`, each conformed to its merged type."""
    present = set(batch.schema.names)
    columns = [
        conform(batch.column(f.name), f.type) if f.name in present else null_array(batch.num_rows, f.type)
        for f in schema
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)
