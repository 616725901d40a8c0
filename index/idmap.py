"""Where each live document is: `_id` → location (segment id << 32 | row), in numpy arrays.

A Python dict cost ~130 bytes per document (a str, an int and a slot per entry: 130 MiB at
1M documents, more than half the collection's Arrow size); these arrays cost ~20.

An `_id` is known by 96 bits: Python's 64-bit string hash (SipHash, keyed per process,
which is fine because the map is rebuilt at each start) and its CRC-32. Live ids that share
the 64-bit hash (odds ~n²/2⁶⁵ among n ids) are told apart by the CRC: one of them is kept
under its full text in a small dict. Ids sharing all 96 bits (~n²/2⁹⁷: 3·10⁻¹² at a billion
documents) would be taken for one another.

The arrays are sorted by hash: a large `main` part, and a `recent` part that takes new ids
and is merged into `main` when it outgrows 1/16 of it, so that a refresh costs a binary
search per id plus an amortised copy, not a copy of the whole map. A removed id's entry
stays with location -1 (reused if its hash comes back) until the next merge.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ABSENT = -1
_MIN_RECENT = 4096  # `recent` is merged into `main` past max(this, len(main) / 16)


@dataclass
class _Part:
    keys: np.ndarray  # uint64, sorted, unique within and across parts
    checks: np.ndarray  # uint32
    locations: np.ndarray  # int64, ABSENT where the id was removed

    @classmethod
    def empty(cls) -> "_Part":
        return cls(np.empty(0, np.uint64), np.empty(0, np.uint32), np.empty(0, np.int64))

    def slots(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: its index here, and whether it is here at all."""
        at = np.searchsorted(self.keys, keys)
        inside = at < len(self.keys)
        found = np.zeros(len(keys), bool)
        found[inside] = self.keys[at[inside]] == keys[inside]
        return at, found

    def live(self) -> "_Part":
        kept = self.locations != ABSENT
        return _Part(self.keys[kept], self.checks[kept], self.locations[kept])

    def with_inserted(self, keys: np.ndarray, checks: np.ndarray, locations: np.ndarray) -> "_Part":
        """This part and new entries (`keys` sorted, none already here)."""
        at = np.searchsorted(self.keys, keys)
        return _Part(np.insert(self.keys, at, keys), np.insert(self.checks, at, checks), np.insert(self.locations, at, locations))


def _fingerprints(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.fromiter(map(hash, ids), np.int64, len(ids)).view(np.uint64)
    checks = np.fromiter((zlib.crc32(i.encode()) for i in ids), np.uint32, len(ids))
    return keys, checks


class IdLocations:
    """`_id` → location of the live documents; batch operations (the ids of one call are
    distinct), one writer."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._main = _Part.empty()
        self._recent = _Part.empty()
        self._colliding: dict[str, int] = {}  # ids whose 64-bit hash another live id has
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def get_many(self, ids: Sequence[str]) -> np.ndarray:
        """The location of each id, ABSENT for those not live."""
        return self._lookup(ids, remove=False)

    def pop_many(self, ids: Sequence[str]) -> np.ndarray:
        """`get_many` of distinct ids, and the ids found are removed."""
        return self._lookup(ids, remove=True)

    def set_many(self, ids: Sequence[str], locations: np.ndarray) -> None:
        """Put each id (distinct) at its location, whether it is live or not."""
        keys, checks = _fingerprints(ids)
        locations = np.asarray(locations, np.int64)
        pending = np.ones(len(ids), bool)
        if self._colliding:
            for n, doc_id in enumerate(ids):
                if doc_id in self._colliding:
                    self._colliding[doc_id] = int(locations[n])
                    pending[n] = False
        for part in (self._main, self._recent):
            at, found = part.slots(keys)
            found &= pending
            slot = at[found]
            held = part.locations[slot]
            same = part.checks[slot] == checks[found]
            take = same | (held == ABSENT)  # its own entry, or a removed id's: the hash is free again
            taking = np.flatnonzero(take)
            _, first = np.unique(slot[taking], return_index=True)
            take[np.setdiff1d(taking, taking[first])] = False  # ids of one batch sharing a hash
            self._count += int(np.count_nonzero(take & (held == ABSENT)))
            part.checks[slot[take]] = checks[found][take]
            part.locations[slot[take]] = locations[found][take]
            for n in np.flatnonzero(found)[~take]:  # another live id has this hash
                self._colliding[ids[n]] = int(locations[n])
                self._count += 1
            pending &= ~found
        new = np.flatnonzero(pending)
        if len(new):
            order = new[np.argsort(keys[new], kind="stable")]
            repeated = np.zeros(len(order), bool)
            repeated[1:] = keys[order[1:]] == keys[order[:-1]]  # hashes shared within the batch
            for n in order[repeated]:
                self._colliding[ids[n]] = int(locations[n])
            order = order[~repeated]
            self._recent = self._recent.with_inserted(keys[order], checks[order], locations[order])
            self._count += len(new)
            if len(self._recent.keys) > max(_MIN_RECENT, len(self._main.keys) >> 4):
                recent = self._recent.live()
                main = self._main.live() if (self._main.locations == ABSENT).any() else self._main  # one copy fewer
                self._main = main.with_inserted(recent.keys, recent.checks, recent.locations)
                self._recent = _Part.empty()

    def _lookup(self, ids: Sequence[str], remove: bool) -> np.ndarray:
        keys, checks = _fingerprints(ids)
        result = np.full(len(ids), ABSENT, np.int64)
        if self._colliding:
            for n, doc_id in enumerate(ids):
                location = self._colliding.pop(doc_id, None) if remove else self._colliding.get(doc_id)
                if location is not None:
                    result[n] = location
                    self._count -= remove
        for part in (self._main, self._recent):
            at, found = part.slots(keys)
            found &= result == ABSENT
            slot = at[found]
            hit = (part.checks[slot] == checks[found]) & (part.locations[slot] != ABSENT)
            result[np.flatnonzero(found)[hit]] = part.locations[slot[hit]]
            if remove:
                part.locations[slot[hit]] = ABSENT
                self._count -= int(np.count_nonzero(hit))
        return result
