"""A collection's storage: Arrow segments, deletion masks, the tantivy index, the manifest.

One writer: every change reaches the collection through `apply`, serialized by a lock, and
each call is one *refresh*: it writes a new segment for the upserted documents, masks the
rows they replace or delete, updates the text index, persists all of it together with the
ingest checkpoint that covers it, and only then publishes a new immutable `Snapshot`.
Queries read whichever snapshot was published when they started, so they never see half a
refresh, and a restart resumes from a checkpoint that matches the data on disk exactly.

On disk (`directory/`): `manifest.json` (generation, segments, deletion-mask files, the
schema queries know, the checkpoint), `seg-N.arrow` (written once), `seg-N.del.G` (mask as of generation G), `text/`,
and `tombstones.sqlite` once `apply_newer` has been used (`shoal.index.tombstones`).
The manifest is replaced atomically (write, fsync, rename); files it no longer names are
removed after it is replaced.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
import weakref
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from .doctypes import merge_types, null_array
from .idmap import ABSENT, IdLocations
from .items import ItemDecoder, decode_text, encode_item, with_canonical_numbers
from .memory import release_free_memory
from .segment import (HIDDEN_NAMES, SYSTEM_FIELDS, SYSTEM_NAMES, Segment, SegmentView, conform_batch, write_durably,
                      fsync_directory, write_fsync)
from .textindex import TextIndex, TextPredicate, TextSearcher
from .tombstones import Tombstones

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# The relevance of each document in a search result (BM25), as SQL's SCORE() reads it.
SCORE_COLUMN = "_score"
# Compaction: keep the segment count small so queries do not pay per segment, and rewrite
# a segment once most of its rows are dead.
MAX_SEGMENTS = 12
TARGET_SEGMENTS = 4
MAX_DEAD_FRACTION = 0.5
# A bulk load stores what it read with the time it read it, by Shoal's clock: not a version
# that a change's own timestamp could be compared with (see `Collection.apply_newer`).
UNVERSIONED_EVENT = "SCAN"
# `_locations` packs a segment id and a row into one int (`_packed`).
_ROW_BITS = (1 << 32) - 1
# How often `apply_newer` prunes expired tombstones.
TOMBSTONE_PRUNE_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class Change:
    """One item's new state: `item` is its DynamoDB JSON text (`index.items`), None for a
    delete. Applied in order per `_id`."""

    id: str
    item: bytes | None
    event_time_us: int
    meta: dict[str, str | None]

    @classmethod
    def of(cls, id: str, doc: dict[str, Any] | None, event_time_us: int, meta: dict[str, str | None]) -> "Change":
        """The change to a document of plain values (`ingest.decode`'s types), or a delete."""
        return cls(id, None if doc is None else encode_item(doc), event_time_us, meta)

    @property
    def doc(self) -> dict[str, Any] | None:
        """The item as plain values (decoded one by one: not for the hot path)."""
        return None if self.item is None else decode_text(self.item)


Transform = Callable[[Sequence[Change]], Sequence[Change]]


@dataclass(frozen=True)
class Snapshot:
    """What one query reads: the published segment views, the schema they conform to, and
    the text index as of the same refresh."""

    views: tuple[SegmentView, ...]
    schema: pa.Schema  # every column including hidden ones
    schema_version: int
    searcher: TextSearcher | None = None
    # What readers derive from this snapshot once and share (the SQL engine's table of it).
    # Not an init field: `replace` must not hand it to the next snapshot.
    derived: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def query_schema(self) -> pa.Schema:
        return pa.schema([f for f in self.schema if f.name not in HIDDEN_NAMES])

    def batches(self) -> list[pa.RecordBatch]:
        schema = self.query_schema
        batches = [view.query_batch(schema, self.schema_version) for view in self.views if view.live_count]
        return batches or [_empty_batch(schema)]

    @property
    def doc_count(self) -> int:
        return sum(view.live_count for view in self.views)

    def search(
        self, predicates: Sequence[TextPredicate], limit: int | None, columns: Sequence[str] | None = None
    ) -> list[pa.RecordBatch]:
        """The documents matching every predicate (the best `limit` by score, or all), in the
        query schema plus a `_score` column; only the fields in `columns` when given (a take
        of every column costs more than a selective search)."""
        assert self.searcher is not None, "a published snapshot always has its searcher"
        rowids, scores = self.searcher.search(predicates, limit)
        schema = self.query_schema
        if columns is not None:
            wanted = set(columns)
            schema = pa.schema([f for f in schema if f.name in wanted])
        batches = []
        for view in self.views:
            rows, hits = view.rows_of(rowids)
            if len(rows):
                stored = view.segment.batch
                in_segment = [name for name in schema.names if stored.schema.get_field_index(name) >= 0]
                batch = conform_batch(stored.select(in_segment).take(pa.array(rows)), schema)
                batches.append(batch.append_column(SCORE_COLUMN, pa.array(scores[hits], pa.float64())))
        return batches or [_empty_batch(schema.append(pa.field(SCORE_COLUMN, pa.float64())))]


class Collection:
    """Storage of one collection. Create with `Collection.open`; write only via `apply`."""

    def __init__(self, directory: Path, transform: Transform | None = None) -> None:
        self.directory = directory
        self._transform = transform
        self._lock = asyncio.Lock()
        self._text = TextIndex(directory / "text")
        self._items = ItemDecoder()
        self._locations = IdLocations()  # _id → segment id << 32 | row
        self._deletes_file: dict[int, str] = {}  # segment id → its persisted deletion mask
        self.last_refresh_at: float | None = None
        self._reload_pending = False  # a refresh failed, and so did going back to the disk's state
        self._schema_written: tuple[pa.Schema | None, str] = (None, "")
        self._load()
        self._tombstones = Tombstones.open(directory, self._generation)  # drops those of an unfinished refresh
        self._tombstones_pruned_at = 0.0

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def doc_count(self) -> int:
        return len(self._locations)

    @property
    def total_size(self) -> int:
        # Not `nbytes`: pyarrow 26 segfaults on it for a segment read back from its IPC file
        # that holds an empty sparse union (e.g. list<union> with only empty or null lists).
        return sum(view.segment.batch.get_total_buffer_size() for view in self._snapshot.views)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, directory: Path, transform: Transform | None = None) -> "Collection":
        """Load the last committed state (an empty collection if there is none). `transform`
        rewrites each batch of changes before it is stored (the field mapping)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(directory, transform)

    def _load(self) -> None:
        """Take the last committed state from disk: all of it, or (when reading fails) nothing,
        so a failed reload leaves nothing half-loaded for the next refresh to build on."""
        path = self.directory / MANIFEST
        locations, deletes_file = IdLocations(), {}
        if not path.exists():
            self._text.clear()
            self._text.commit(0)
            manifest = {"generation": 0, "next_rowid": 0, "next_seg_id": 0, "checkpoint": None}
            views, schema, version = [], SYSTEM_FIELDS, 0
        else:
            manifest = orjson.loads(path.read_bytes())
            views = []
            for entry in manifest["segments"]:
                segment = Segment.read(self.directory, entry["id"])
                deleted = None
                if entry["deletes"]:
                    deletes_file[entry["id"]] = entry["deletes"]
                    data = (self.directory / entry["deletes"]).read_bytes()
                    deleted = SegmentView.deleted_from_bytes(data, segment.rows)
                views.append(SegmentView(segment, deleted))
            # The schema as queries knew it: segments holding a field may all have been dropped.
            schema, version = _schema_from_text(manifest["schema"]) if "schema" in manifest else SYSTEM_FIELDS, 1
            for view in views:
                schema = _merged_schema(schema, view.segment.batch.schema)
                ids = view.segment.batch.column("_id")
                if view.deleted is None:
                    rows = np.arange(view.segment.rows)
                else:
                    rows = np.flatnonzero(~view.deleted)
                    ids = ids.take(pa.array(rows))
                locations.set_many(ids.to_pylist(), _packed(view.segment.seg_id, rows))
            if self._text.generation() != manifest["generation"]:
                self._rebuild_text_index(views, manifest["generation"])
        self._locations, self._deletes_file = locations, deletes_file
        self._generation = manifest["generation"]
        self._next_rowid = manifest["next_rowid"]
        self._next_seg_id = manifest["next_seg_id"]
        self.checkpoint = manifest["checkpoint"]
        self._snapshot = Snapshot(tuple(views), schema, version, self._text.searcher(_text_fields(schema)))
        self._remove_unreferenced_files()  # with no manifest too: a first refresh's segment, killed before it

    def _rebuild_text_index(self, views: list[SegmentView], generation: int) -> None:
        """The index is derived data: after a crash between its commit and the manifest's,
        rebuild it from the segments' documents (re-encoded one by one; a decimal comes back
        from its column as text, so it is indexed as a string until the item changes). A
        rebuild that fails leaves the index as it was, not emptied."""
        try:
            self._text.clear()
            for view in views:
                batch = view.live_batch()
                fields = batch.drop_columns([name for name in batch.schema.names if name in SYSTEM_NAMES])
                items = (encode_item({item_name(k): v for k, v in row.items() if v is not None}) for row in fields.to_pylist())
                self._text.update((), zip(batch.column("_id").to_pylist(), batch.column("_rowid").to_pylist(), items))
            self._text.commit(generation)
        except BaseException:
            self._text.rollback()
            raise

    async def close(self) -> None:
        """Wait for a refresh in progress, then release the index. The collection is unusable after."""
        async with self._lock:
            self._text.close()
            if self._tombstones is not None:
                self._tombstones.close()

    # ------------------------------------------------------------------ writing

    async def apply(self, changes: Sequence[Change], checkpoint: dict[str, Any] | None) -> None:
        """Apply `changes` in order and persist them with `checkpoint`, then publish."""
        await self._one_refresh(self._apply, changes, checkpoint)

    async def apply_newer(self, changes: Sequence[Change], checkpoint: dict[str, Any] | None,
                          keep_tombstones_s: float) -> None:
        """`apply` for a source that may deliver an item's changes duplicated or out of order:
        newer wins, by `event_time_us`. A change is dropped when its item's stored version is
        newer: the stored document's `_event_time` (unless a bulk load wrote it: any change
        replaces that), or else the item's newest tombstone. Ties go to the change that comes
        later (in `changes`, or in a later call), so an item's changes in source order still
        apply when their timestamps are equal. Deletes leave tombstones, kept at least
        `keep_tombstones_s` (the source's retention) and persisted with the refresh."""
        await self._one_refresh(self._apply_newer, changes, checkpoint, keep_tombstones_s)

    async def _one_refresh(self, work: Callable[..., None], *arguments: Any) -> None:
        async with self._lock:
            refresh = asyncio.ensure_future(asyncio.to_thread(work, *arguments))
            cancelled = False
            while not refresh.done():
                try:
                    await asyncio.shield(refresh)
                except asyncio.CancelledError:
                    # A started refresh runs to its end, however often the caller is cancelled:
                    # the lock must outlive the worker thread.
                    cancelled = True
                except BaseException:
                    break  # the refresh failed: raised below, unless the caller was cancelled
            if cancelled:
                raise asyncio.CancelledError
            refresh.result()

    def _apply(self, changes: Sequence[Change], checkpoint: dict[str, Any] | None) -> None:
        self._reload_if_a_refresh_failed()
        changes = [_with_canonical_numbers(change) for change in changes]
        if self._transform is not None and changes:
            changes = self._transform(changes)  # before any state changes: a failure leaves none
        try:
            self._refresh(changes, checkpoint)
        except BaseException:
            # Memory may be ahead of the disk now: go back to the last committed state. If that
            # fails too (a full disk), the next refresh tries again first; this one's error is raised.
            self._reload_pending = True
            try:
                self._reload_if_a_refresh_failed()
            except Exception:
                log.exception("going back to the last committed state of %s failed; the next refresh tries again", self.directory)
            raise
        release_free_memory(len(changes))

    def _reload_if_a_refresh_failed(self) -> None:
        if self._reload_pending:
            self._text.rollback()
            self._load()
            self._reload_pending = False

    def _apply_newer(self, changes: Sequence[Change], checkpoint: dict[str, Any] | None,
                     keep_tombstones_s: float) -> None:
        self._reload_if_a_refresh_failed()  # versions are read from the committed state
        if self._tombstones is None:
            self._tombstones = Tombstones.open(self.directory, self._generation, create=True)
        kept = self._newer_changes(changes)
        deletions = {change.id: change.event_time_us for change in kept if change.item is None}
        self._tombstones.add(deletions, self._generation + 1)  # committed before the manifest that covers them
        try:
            self._apply(kept, checkpoint)
        except BaseException:
            self._tombstones.discard_after(self._generation)  # `_apply` went back to the last manifest
            raise
        if time.time() - self._tombstones_pruned_at > TOMBSTONE_PRUNE_INTERVAL_S:
            self._tombstones.prune(int((time.time() - keep_tombstones_s) * 1_000_000))
            self._tombstones_pruned_at = time.time()

    def _newer_changes(self, changes: Sequence[Change]) -> list[Change]:
        """`changes` without those older than their item's version (stored or earlier in the batch)."""
        version = self._stored_versions({change.id for change in changes})
        kept = []
        for change in changes:
            if change.event_time_us < version.get(change.id, change.event_time_us):
                continue  # a duplicate delivered late, or an older version: newer wins
            version[change.id] = change.event_time_us
            kept.append(change)
        return kept

    def _stored_versions(self, ids: set[str]) -> dict[str, int]:
        """Per _id, the event time (µs) of its stored version: its document's, or its newest
        tombstone's when it has no document a change wrote."""
        views = {view.segment.seg_id: view.segment for view in self._snapshot.views}
        versions: dict[str, int] = {}
        unversioned = []
        distinct = list(ids)
        for doc_id, location in zip(distinct, self._locations.get_many(distinct).tolist()):
            if location != ABSENT:
                seg_id, row = _unpacked(location)
                times, versioned = _versions_of(views[seg_id])
                if versioned[row]:
                    versions[doc_id] = int(times[row])
                    continue  # written by a change newer than any of its tombstones
            unversioned.append(doc_id)
        if unversioned and self._tombstones is not None:
            versions.update(self._tombstones.latest(unversioned))
        return versions

    def _refresh(self, changes: Sequence[Change], checkpoint: dict[str, Any] | None) -> None:
        latest: dict[str, Change] = {}
        for change in changes:
            latest[change.id] = change
        dead_rows: dict[int, list[int]] = {}
        replaced: list[str] = []
        for doc_id, location in zip(latest, self._locations.pop_many(list(latest)).tolist()):
            if location != ABSENT:
                seg_id, row = _unpacked(location)
                dead_rows.setdefault(seg_id, []).append(row)
                replaced.append(doc_id)
        views = [
            view.with_deleted(dead_rows[view.segment.seg_id]) if view.segment.seg_id in dead_rows else view
            for view in self._snapshot.views
        ]
        schema, version = self._snapshot.schema, self._snapshot.schema_version
        upserts = [change for change in latest.values() if change.item is not None]
        # The text index is staged beside the Arrow segment's build: tantivy parses each item
        # holding the GIL while pyarrow parses the same texts without it, and tantivy's own
        # indexing thread runs on until the commit.
        rowids = range(self._next_rowid, self._next_rowid + len(upserts))
        staged = _TEXT_STAGING.submit(self._text.update, replaced, zip([c.id for c in upserts], rowids, [c.item for c in upserts]))
        try:
            if upserts:
                segment = self._build_segment(upserts)
                views.append(SegmentView(segment))
                merged = _merged_schema(schema, segment.batch.schema)
                if merged != schema:
                    schema, version = merged, version + 1
        finally:
            futures.wait([staged])  # a failed build rolls the index back: not while it is being written
        staged.result()
        self._commit(self._compact(Snapshot(tuple(views), schema, version)), checkpoint)

    def _build_segment(self, upserts: list[Change]) -> Segment:
        """The segment of `upserts`."""
        seg_id, first_rowid = self._next_seg_id, self._next_rowid
        self._next_seg_id += 1
        self._next_rowid += len(upserts)
        ids = [c.id for c in upserts]
        system = {
            "_id": pa.array(ids, pa.string()),
            "_event_time": pa.array([c.event_time_us for c in upserts], pa.timestamp("us", tz="UTC")),
            "_meta": pa.array([c.meta for c in upserts], SYSTEM_FIELDS.field("_meta").type),
            "_rowid": pa.array(range(first_rowid, first_rowid + len(upserts)), pa.int64()),
        }
        columns = self._items.columns([c.item for c in upserts])
        batch = pa.RecordBatch.from_pydict({**system, **{stored_name(name): column for name, column in columns.items()}})
        self._locations.set_many(ids, _packed(seg_id, np.arange(len(ids))))
        return Segment(seg_id, batch)

    def _compact(self, snapshot: Snapshot) -> Snapshot:
        """Drop dead segments; merge small ones when there are too many; rewrite mostly-dead ones."""
        views = [view for view in snapshot.views if view.live_count]
        if len(views) > MAX_SEGMENTS:
            picks = sorted(views, key=lambda view: view.live_count)[: len(views) - TARGET_SEGMENTS + 1]
        else:
            picks = [view for view in views if view.live_count < view.segment.rows * (1 - MAX_DEAD_FRACTION)]
        if not picks:
            return Snapshot(tuple(views), snapshot.schema, snapshot.schema_version)
        merged = pa.concat_batches([conform_batch(view.live_batch(), snapshot.schema) for view in picks])
        segment = Segment(self._next_seg_id, merged)
        self._next_seg_id += 1
        ids = merged.column("_id").to_pylist()
        self._locations.set_many(ids, _packed(segment.seg_id, np.arange(len(ids))))
        kept = [view for view in views if not any(view is pick for pick in picks)]
        return Snapshot((*kept, SegmentView(segment)), snapshot.schema, snapshot.schema_version)

    def _commit(self, snapshot: Snapshot, checkpoint: dict[str, Any] | None) -> None:
        generation = self._generation + 1
        previous = {id(view) for view in self._snapshot.views}
        committed = {view.segment.seg_id for view in self._snapshot.views}
        entries = []
        files: dict[Path, bytes | pa.RecordBatch] = {}
        for view in snapshot.views:
            seg_id = view.segment.seg_id
            if id(view) not in previous:
                if seg_id not in committed:  # (a file of that name is a failed refresh's: replaced)
                    files[self.directory / Segment.file_name(seg_id)] = view.segment.batch
                if view.deleted is not None:
                    self._deletes_file[seg_id] = f"seg-{seg_id:08d}.del.{generation}"
                    files[self.directory / self._deletes_file[seg_id]] = view.deleted_bytes()
            entries.append({"id": seg_id, "rows": view.segment.rows, "deletes": self._deletes_file.get(seg_id)})
        if checkpoint is not None:
            self.checkpoint = checkpoint
        written = write_durably(files)  # beside the text index's commit, which releases the GIL
        try:
            self._text.commit(generation)
        finally:
            futures.wait([written])
        written.result()
        snapshot = replace(snapshot, searcher=self._text.searcher(_text_fields(snapshot.schema)))
        manifest = {
            "generation": generation,
            "next_rowid": self._next_rowid,
            "next_seg_id": self._next_seg_id,
            "segments": entries,
            "schema": self._schema_text(snapshot.schema),
            "checkpoint": self.checkpoint,
        }
        tmp = self.directory / (MANIFEST + ".tmp")
        write_fsync(tmp, orjson.dumps(manifest))
        fsync_directory(self.directory)  # the new files' entries, before the manifest names them
        os.replace(tmp, self.directory / MANIFEST)
        fsync_directory(self.directory)
        self._generation = generation
        self._snapshot = snapshot
        self.last_refresh_at = time.time()
        self._remove_unreferenced_files()

    def _schema_text(self, schema: pa.Schema) -> str:
        """The schema as the manifest holds it, serialized once per schema (it rarely changes)."""
        if self._schema_written[0] is not schema:
            self._schema_written = (schema, base64.b64encode(schema.serialize().to_pybytes()).decode("ascii"))
        return self._schema_written[1]

    def _remove_unreferenced_files(self) -> None:
        referenced = {Segment.file_name(view.segment.seg_id) for view in self._snapshot.views}
        referenced.update(name for seg_id, name in self._deletes_file.items())
        for path in self.directory.glob("seg-*"):
            if path.name not in referenced:
                path.unlink(missing_ok=True)  # open snapshots keep reading it through their memory map
        live = {view.segment.seg_id for view in self._snapshot.views}
        for seg_id in [s for s in self._deletes_file if s not in live]:
            del self._deletes_file[seg_id]


def _with_canonical_numbers(change: Change) -> Change:
    """`change` with its item's numbers in one text each: the text index finds a number by it."""
    if change.item is None:
        return change
    item = with_canonical_numbers(change.item)
    return change if item is change.item else replace(change, item=item)


def _packed(seg_id: int, rows: np.ndarray) -> np.ndarray:
    """The locations of `rows` of segment `seg_id`, as `_locations` holds them."""
    return (seg_id << 32) | rows.astype(np.int64)


def _unpacked(location: int) -> tuple[int, int]:
    """(segment id, row) of a location."""
    return location >> 32, location & _ROW_BITS


# Each collection stages at most one refresh at a time (its writer lock).
_TEXT_STAGING = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="shoal-text")

_SEGMENT_VERSIONS: "weakref.WeakKeyDictionary[Segment, tuple[np.ndarray, np.ndarray]]" = weakref.WeakKeyDictionary()


def _versions_of(segment: Segment) -> tuple[np.ndarray, np.ndarray]:
    """A segment's `_event_time` (µs) and, per row, whether a change wrote it (not a bulk
    load); computed once per segment (segments never change)."""
    versions = _SEGMENT_VERSIONS.get(segment)
    if versions is None:
        batch = segment.batch
        times = batch.column("_event_time").cast(pa.int64()).fill_null(0).to_numpy()
        events = pc.struct_field(batch.column("_meta"), "event")
        versioned = pc.fill_null(pc.not_equal(events, UNVERSIONED_EVENT), True).to_numpy(zero_copy_only=False)
        versions = _SEGMENT_VERSIONS[segment] = (times, versioned)
    return versions


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([null_array(0, f.type) for f in schema], schema=schema)


def stored_name(attribute: str) -> str:
    """An attribute's column: an attribute named like a system column, or like the `_score`
    column a search adds, is kept as `_item<name>` (`_id` → `_item_id`)."""
    return f"_item{attribute}" if attribute in _RENAMED_NAMES else attribute


def item_name(column: str) -> str:
    """The attribute a user column holds (`stored_name` undone)."""
    return column[len("_item"):] if column.startswith("_item") and column[len("_item"):] in _RENAMED_NAMES else column


_RENAMED_NAMES = SYSTEM_NAMES | {SCORE_COLUMN}


def _text_fields(schema: pa.Schema) -> dict[str, tuple[str, pa.DataType]]:
    """Per user column, the attribute the text index holds it under, and its type."""
    return {f.name: (item_name(f.name), f.type) for f in schema if f.name not in SYSTEM_NAMES}


def _schema_from_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _merged_schema(schema: pa.Schema, batch_schema: pa.Schema) -> pa.Schema:
    """The collection schema widened by what `batch_schema` brings (system columns stay first)."""
    fields = {f.name: f.type for f in schema}
    for f in batch_schema:
        fields[f.name] = merge_types(fields[f.name], f.type) if f.name in fields else f.type
    return pa.schema([SYSTEM_FIELDS.field(n) if n in SYSTEM_NAMES else pa.field(n, t) for n, t in fields.items()])
