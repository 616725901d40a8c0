"""Collection storage on real files: refreshes, deletes, compaction, reopening, snapshots."""

from __future__ import annotations

import asyncio
import errno

import pytest

from shoal.index import collection as collection_module
from shoal.index.collection import MANIFEST, MAX_SEGMENTS, Change, Collection
from shoal.index.textindex import TextIndex, TextPredicate

META = {"table": "t", "event": "INSERT", "sequence_number": None}


def upsert(doc_id: str, **doc) -> Change:
    return Change.of(doc_id, doc, 1_700_000_000_000_000, META)


def delete(doc_id: str) -> Change:
    return Change.of(doc_id, None, 1_700_000_000_000_000, META)


def rows(collection: Collection) -> dict[str, dict]:
    result = {}
    for batch in collection.snapshot().batches():
        for row in batch.to_pylist():
            assert row["_id"] not in result, f"{row['_id']} is visible twice"
            result[row["_id"]] = {k: v for k, v in row.items() if not k.startswith("_") and v is not None}
    return result


async def test_updates_and_deletes_by_id(tmp_path):
    collection = Collection.open(tmp_path)
    await collection.apply([upsert("a", x=1), upsert("b", x=2), upsert("a", x=3)], {"pos": 1})
    await collection.apply([delete("b"), upsert("c", x="text")], {"pos": 2})
    assert rows(collection) == {"a": {"x": 3}, "c": {"x": "text"}}
    assert collection.doc_count == 2
    await collection.close()


async def test_a_snapshot_does_not_change_under_a_reader(tmp_path):
    collection = Collection.open(tmp_path)
    await collection.apply([upsert("a", x=1)], None)
    before = collection.snapshot()
    await collection.apply([upsert("a", x=2), upsert("b", x=3)], None)
    assert [r["x"] for b in before.batches() for r in b.to_pylist()] == [1]
    assert rows(collection) == {"a": {"x": 2}, "b": {"x": 3}}
    await collection.close()


async def test_reopen_restores_documents_checkpoint_and_text_index(tmp_path):
    collection = Collection.open(tmp_path)
    for i in range(MAX_SEGMENTS + 5):  # enough refreshes to compact
        await collection.apply([upsert(f"d{j}", i=i, j=j) for j in range(i, i + 10)], {"round": i})
    await collection.apply([delete("d3")], None)
    expected = rows(collection)
    assert len(collection.snapshot().views) <= MAX_SEGMENTS
    await collection.close()

    reopened = Collection.open(tmp_path)
    assert rows(reopened) == expected
    assert reopened.checkpoint == {"round": MAX_SEGMENTS + 4}
    assert reopened._text.num_docs() == len(expected)
    await reopened.close()


async def test_a_failed_refresh_leaves_the_last_committed_state(tmp_path):
    collection = Collection.open(tmp_path)
    await collection.apply([upsert("a", x=1)], {"pos": 1})
    with pytest.raises(TypeError):
        await collection.apply([upsert("b", x=object())], {"pos": 2})  # not a document value
    assert rows(collection) == {"a": {"x": 1}}
    assert collection.checkpoint == {"pos": 1}
    await collection.apply([upsert("b", x=2)], {"pos": 2})
    assert rows(collection) == {"a": {"x": 1}, "b": {"x": 2}}
    await collection.close()


async def test_cancelling_a_writer_lets_its_refresh_finish(tmp_path):
    collection = Collection.open(tmp_path)
    task = asyncio.create_task(collection.apply([upsert(f"d{i}", i=i) for i in range(5000)], {"pos": 1}))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await collection.close()  # must not race the refresh thread
    reopened = Collection.open(tmp_path)
    assert reopened.doc_count in (0, 5000)  # all or nothing
    await reopened.close()


def searched(collection: Collection, word: str) -> set[str]:
    """The _ids a search of `word` in `w` finds, read from the snapshot's matches."""
    predicate = TextPredicate(("w",), word)
    return {row["_id"] for batch in collection.snapshot().search([predicate], None) for row in batch.to_pylist()}


async def test_a_first_refresh_cut_off_before_its_manifest_leaves_nothing_behind(tmp_path):
    """Killed after a first refresh wrote its segment and index, before its manifest: the
    collection reopens empty, and the next first refresh stores its own documents, not the
    segment file the first one left."""
    collection = Collection.open(tmp_path)
    await collection.apply([upsert("a", w="alpha"), upsert("b", w="bravo")], {"pos": 1})
    await collection.close()
    (tmp_path / MANIFEST).unlink()  # what kill -9 just before the manifest's rename leaves

    collection = Collection.open(tmp_path)
    assert rows(collection) == {} and searched(collection, "alpha") == set()
    await collection.apply([upsert("x", w="xray")], {"pos": 1})
    await collection.close()
    collection = Collection.open(tmp_path)
    assert rows(collection) == {"x": {"w": "xray"}}
    assert searched(collection, "xray") == {"x"} and searched(collection, "alpha") == set()
    await collection.close()


async def test_a_refresh_failing_twice_on_a_full_disk_leaves_arrow_and_search_in_step(tmp_path, monkeypatch):
    """A refresh's manifest write fails (a full disk) after its index commit; going back to the
    committed state must rebuild the index, and that fails too. The next refresh first goes
    back again, so search and Arrow hold the same documents, then and after a restart."""
    collection = Collection.open(tmp_path)
    await collection.apply([upsert(k, w=f"word{k}") for k in "abc"], {"pos": 1})
    real_write, real_commit = collection_module.write_fsync, TextIndex.commit
    full = {"manifest": True, "rebuild": True}

    def write_fsync(path, data):
        if path.name.startswith(MANIFEST) and full.pop("manifest", False):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    def commit(index, generation):
        if generation == 1 and full.pop("rebuild", False):  # the rebuild of generation 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_commit(index, generation)

    monkeypatch.setattr(collection_module, "write_fsync", write_fsync)
    monkeypatch.setattr(TextIndex, "commit", commit)
    with pytest.raises(OSError):
        await collection.apply([upsert("d", w="wordd")], {"pos": 2})
    assert not full, "both faults happened"
    await collection.apply([upsert("e", w="worde")], {"pos": 3})
    expected = {"a", "b", "c", "e"}
    assert set(rows(collection)) == expected and collection.checkpoint == {"pos": 3}
    assert {k for k in "abcde" if searched(collection, f"word{k}")} == expected
    await collection.close()
    collection = Collection.open(tmp_path)
    assert set(rows(collection)) == expected
    assert {k for k in "abcde" if searched(collection, f"word{k}")} == expected
    await collection.close()


async def test_a_restart_keeps_the_fields_of_dropped_segments(tmp_path):
    """Once no document holds a field its segments are dropped, but queries still know the
    field (it reads as null); a restart keeps it, and the fields' order, rather than
    rebuilding the schema from the segments left."""
    collection = Collection.open(tmp_path)
    await collection.apply([upsert("a", gone=1, kept="k")], None)
    await collection.apply([upsert("a", kept="k2"), upsert("b", later=True)], None)
    names = collection.snapshot().query_schema.names
    assert "gone" in names
    await collection.close()
    collection = Collection.open(tmp_path)
    assert collection.snapshot().query_schema.names == names
    assert rows(collection) == {"a": {"kept": "k2"}, "b": {"later": True}}
    await collection.close()
