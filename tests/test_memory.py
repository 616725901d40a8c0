"""The process's freed memory goes back to the system after a refresh (`index.memory`)."""

from shoal.index.memory import release_free_memory


def _anonymous_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) << 10
    raise AssertionError("no RssAnon in /proc/self/status")


def test_freed_memory_is_returned_to_the_system():
    kept, garbage = [], []
    for i in range(100_000):  # 200 MB in malloc'd chunks; one in ten outlives the rest
        (kept if i % 10 == 0 else garbage).append(bytes(2000))
    del garbage  # ~180 MB free, but held by glibc between the kept chunks
    before = _anonymous_rss()
    release_free_memory()
    assert before - _anonymous_rss() > 100 << 20
    assert len(kept) == 10_000
