"""When each deleted item was deleted, for sources that deliver changes out of order.

Kinesis Data Streams for DynamoDB may deliver an item's REMOVE before an older INSERT or
MODIFY of it. Once the document is gone, only a tombstone (the `_id` and the deletion's
event time) can tell that the late change is older and must be dropped
(`Collection.apply_newer`). Tombstones are kept for at least as long as the stream keeps
records; older ones can no longer meet a late change and are pruned by age.

Stored in SQLite (`tombstones.sqlite`, WAL, synchronous=FULL) so that a refresh costs an
insert per delete and a lookup per new `_id`, never a rewrite of all tombstones. Each row
carries the generation of the refresh that wrote it and is committed *before* that
refresh's manifest: rows of a generation the manifest never reached (a crash, or a refresh
that failed) are discarded when the collection is opened or rolled back, so the tombstones
always match the documents on disk.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable

FILE = "tombstones.sqlite"
_LOOKUP_CHUNK = 500  # below SQLite's limit on bound parameters


class Tombstones:
    """The tombstones of one collection; used by its single writer only."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)  # writer threads vary
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the manifest names it
        self._db.execute("CREATE TABLE IF NOT EXISTS tombstones "
                         "(id TEXT NOT NULL, time_us INTEGER NOT NULL, generation INTEGER NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS by_id ON tombstones (id)")
        self._db.execute("CREATE INDEX IF NOT EXISTS by_time ON tombstones (time_us)")
        self._db.execute("CREATE INDEX IF NOT EXISTS by_generation ON tombstones (generation)")

    @classmethod
    def open(cls, directory: Path, committed_generation: int, create: bool = False) -> "Tombstones | None":
        """The collection's tombstones without those of refreshes after `committed_generation`
        (the manifest's); None when there are none and `create` is false."""
        path = directory / FILE
        if not create and not path.exists():
            return None
        store = cls(path)
        store.discard_after(committed_generation)
        return store

    def latest(self, ids: Iterable[str]) -> dict[str, int]:
        """The newest deletion time (µs) of each of `ids` that has a tombstone."""
        ids = list(ids)
        found: dict[str, int] = {}
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start:start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT id, MAX(time_us) FROM tombstones WHERE id IN ({marks}) GROUP BY id", chunk)
            found.update(rows)
        return found

    def add(self, deletions: dict[str, int], generation: int) -> None:
        """Record `deletions` (_id → time µs) for the refresh `generation`, durably."""
        if deletions:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO tombstones VALUES (?, ?, ?)",
                                     ((doc_id, time_us, generation) for doc_id, time_us in deletions.items()))

    def discard_after(self, generation: int) -> None:
        self._db.execute("DELETE FROM tombstones WHERE generation > ?", (generation,))

    def prune(self, before_us: int) -> int:
        """Forget deletions older than `before_us`; returns how many."""
        return self._db.execute("DELETE FROM tombstones WHERE time_us < ?", (before_us,)).rowcount

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0]

    def close(self) -> None:
        self._db.close()
