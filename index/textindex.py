"""The collection's tantivy index: `_id` and the stable row id of every live document.

Full-text fields come with the search issue; the walking skeleton keeps the index in step
with the Arrow segments (same writer, same refresh) so that search can join on `_rowid`.

Consistency with the segment manifest: each commit also stores a marker document holding
the manifest generation it belongs to, so `generation()` tells after a crash whether the
index matches the manifest on disk (if not, the collection rebuilds it from the segments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import tantivy

_MARKER_ID = "\x00shoal-generation"


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("_id", stored=False, tokenizer_name="raw", index_option="basic")
    builder.add_integer_field("_rowid", stored=True, indexed=True, fast=True)
    return builder.build()


class TextIndex:
    """A tantivy index with one writer, owned by the collection's writer task."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._schema = _schema()
        self._index = tantivy.Index(self._schema, path=str(path))
        self._writer = self._index.writer(heap_size=64_000_000, num_threads=1)

    def generation(self) -> int | None:
        """The manifest generation of the last commit, or None for a new index."""
        self._index.reload()
        searcher = self._index.searcher()
        hits = searcher.search(tantivy.Query.term_query(self._schema, "_id", _MARKER_ID), 1).hits
        if not hits:
            return None
        return -searcher.doc(hits[0][1])["_rowid"][0]

    def num_docs(self) -> int:
        self._index.reload()
        return self._index.searcher().num_docs - (1 if self.generation() is not None else 0)

    def update(self, removed_ids: Iterable[str], added: Iterable[tuple[str, int]]) -> None:
        """Stage removals by `_id` and additions of (`_id`, row id); `commit` publishes them."""
        for doc_id in removed_ids:
            self._writer.delete_documents_by_term("_id", doc_id)
        for doc_id, rowid in added:
            self._writer.add_document(tantivy.Document(_id=doc_id, _rowid=rowid))

    def commit(self, generation: int) -> None:
        self._writer.delete_documents_by_term("_id", _MARKER_ID)
        self._writer.add_document(tantivy.Document(_id=_MARKER_ID, _rowid=-generation))
        self._writer.commit()

    def close(self) -> None:
        """Release the index lock (tantivy drops it with the writer)."""
        self._writer.wait_merging_threads()
        del self._writer

    def clear(self) -> None:
        self._writer.delete_all_documents()
