"""Process memory policy: what a refresh frees goes back to the system.

A refresh lives on short-lived memory: the items' texts, pyarrow's parse of them, tantivy's
documents. Freed, that memory stays with the allocator that gave it: mimalloc (pyarrow's
default pool) keeps its pages, and glibc keeps freed chunks in its arenas (one per thread
that allocated). Loading 1M documents (bench/export_ingest.py) peaked at 3.7× the
collection's Arrow size; with Arrow's buffers in the system allocator (so one allocator
holds all the garbage) and `malloc_trim` after refreshes, at 2.9×, at the same rate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import pyarrow as pa

LARGE_REFRESH = 5_000  # changes
TRIM_INTERVAL_S = 1.0
_trimmed_at = 0.0  # when the last trim began (time.monotonic)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only
if _malloc_trim is not None:
    _malloc_trim.argtypes = [ctypes.c_size_t]


def use_system_allocator() -> None:
    """Allocate Arrow buffers with malloc, whose free memory `release_free_memory` returns.
    Call once at process start, before collections are opened."""
    pa.set_memory_pool(pa.system_memory_pool())


def release_free_memory(changes: int) -> None:
    """Return the allocators' free memory to the system after a refresh of `changes`.
    `malloc_trim` walks every free chunk of the heap, returned or not: ~7 ms with 500k small
    holes, even when there is nothing new to return. So it runs after each large refresh (a
    bulk load's: its garbage goes back at once) and after small ones (a stream's) at most
    once every `TRIM_INTERVAL_S`."""
    global _trimmed_at
    now = time.monotonic()
    if changes < LARGE_REFRESH and now - _trimmed_at < TRIM_INTERVAL_S:
        return
    _trimmed_at = now
    pool = pa.default_memory_pool()
    if pool.backend_name != "system":
        pool.release_unused()  # the system pool's is the malloc_trim below
    if _malloc_trim is not None:
        _malloc_trim(0)
