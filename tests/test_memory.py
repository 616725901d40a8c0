"""Freed memory goes back to the system when a refresh ends (`index.memory`)."""

import pytest

from shoal.index import memory
from shoal.index.memory import release_free_memory


def _anonymous_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) << 10
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(memory._malloc_trim is None, reason="no glibc malloc_trim here")
def test_freed_memory_is_returned_after_a_large_refresh_and_not_after_each_small_one():
    release_free_memory(changes=memory.LARGE_REFRESH)  # a trim just happened
    kept, garbage = [], []
    for i in range(100_000):  # 200 MB in malloc'd chunks; one in ten outlives the rest
        (kept if i % 10 == 0 else garbage).append(bytes(2000))
    del garbage  # ~180 MB free, but held by glibc between the kept chunks
    before = _anonymous_rss()
    release_free_memory(changes=10)  # a small refresh within TRIM_INTERVAL_S: no trim
    assert before - _anonymous_rss() < 50 << 20
    release_free_memory(changes=memory.LARGE_REFRESH)
    assert before - _anonymous_rss() > 100 << 20
    assert len(kept) == 10_000
