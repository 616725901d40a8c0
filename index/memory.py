"""Process memory policy: what a refresh frees goes back to the system.

A refresh lives on short-lived memory: the items' texts, pyarrow's parse of them, tantivy's
documents. Freed, that memory stays with the allocator that gave it: mimalloc (pyarrow's
default pool) keeps its pages, and glibc keeps freed chunks in its arenas (one per thread
that allocated). Loading 1M documents (bench/export_ingest.py) peaked at 3.7× the
collection's Arrow size; with Arrow's buffers in the system allocator (so one allocator
holds all the garbage) and `malloc_trim` after every refresh, at 2.9×, at the same rate.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only


def use_system_allocator() -> None:
    """Allocate Arrow buffers with malloc, whose free memory `release_free_memory` returns.
    Call once at process start, before collections are opened."""
    pa.set_memory_pool(pa.system_memory_pool())


def release_free_memory() -> None:
    """Return the allocators' free memory to the system. Its cost follows what it returns:
    ~4 ms for 150 MiB of garbage, ~10 µs when there is none (a small stream refresh)."""
    pa.default_memory_pool().release_unused()
    if _malloc_trim is not None:
        _malloc_trim(0)
