"""The collection's tantivy index: every live document's fields, its `_id` and stable row id.

Schema: `_id` (raw, for deletes by id), `_rowid` (i64 fast field: what search hands to the
SQL side), and `doc`, a JSON field holding the whole document, so any field, nested
(`address.city`) or inside an array, is searchable without declaring it. Strings are split
by `WORDS`; numbers and booleans are indexed as typed values; binary is not indexed.

Tokenization (`WORDS`, used for documents and for query text alike): split on every
character that is not a letter or digit, drop tokens longer than 40 bytes, lowercase. So
`CONTAINS(title, 'São-Paulo')` looks for the words `são` and `paulo`; there is no stemming
or stop-word list, so a word matches only itself, in any letter case.

The index is written by the collection's single writer in the same refresh as the Arrow
segments, and each snapshot holds the `TextSearcher` of the commit it was published with,
so a query sees the same documents in both. Each commit also stores a marker document
holding the manifest generation, so `generation()` tells after a crash whether the index
matches the manifest on disk (if not, the collection rebuilds it from the segments).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import orjson
import tantivy

_MARKER_ID = "\x00shoal-generation"
_DOC = "doc"
_TOKENIZER = "shoal_words"
WORDS = (
    tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
    .filter(tantivy.Filter.remove_long(40))
    .filter(tantivy.Filter.lowercase())
    .build()
)


@dataclass(frozen=True)
class TextPredicate:
    """One search condition: `field` (a path into the document) holds every word of `text`,
    anywhere (`kind="contains"`, Rockset's CONTAINS) or consecutively (`"phrase"`); or, with
    `kind="id"`, the document's `_id` is exactly `text` (a point lookup); or, with
    `kind="equals"`, the field may equal `value`: a number exactly (ints and floats alike),
    a string by its words in order, so a candidate that SQL's own comparison then confirms."""

    field: tuple[str, ...]
    text: str
    kind: str = "contains"
    value: str | int | float | None = None


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("_id", stored=False, tokenizer_name="raw", index_option="basic")
    builder.add_integer_field("_rowid", stored=True, indexed=True, fast=True)
    builder.add_json_field(_DOC, stored=False, tokenizer_name=_TOKENIZER, index_option="position")
    return builder.build()


def _json_value(value: Any) -> Any:
    """What orjson cannot write: decimals as their text, binary not at all."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return None
    raise TypeError(f"cannot index a {type(value).__name__}")


class TextSearcher:
    """The index as of one commit; safe to use from several query threads."""

    def __init__(self, searcher: tantivy.Searcher, schema: tantivy.Schema) -> None:
        self._searcher = searcher
        self._schema = schema

    def search(self, predicates: Iterable[TextPredicate], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Row ids and BM25 scores of the documents matching every predicate, best first;
        all of them, or the best `limit`."""
        clauses = [(tantivy.Occur.Must, self._query(p)) for p in predicates]
        query = tantivy.Query.boolean_query(clauses)
        wanted = limit if limit is not None else max(1, self._searcher.num_docs)
        hits = self._searcher.search(query, wanted, count=False).hits
        rowids = self._searcher.fast_field_values("_rowid", [address for _, address in hits])
        return np.array(rowids, np.int64), np.array([score for score, _ in hits], np.float64)

    def count(self, predicates: Iterable[TextPredicate]) -> int:
        """How many documents match every predicate (cheap: no scoring, no row ids)."""
        query = tantivy.Query.boolean_query([(tantivy.Occur.Must, self._query(p)) for p in predicates])
        return self._searcher.search(query, 1, count=True).count

    def _query(self, predicate: TextPredicate) -> tantivy.Query:
        if predicate.kind == "id":
            return tantivy.Query.term_query(self._schema, "_id", predicate.text)
        # tantivy splits a JSON path at dots: a dot (or backslash) inside a name is escaped.
        path = ".".join((_DOC, *(name.replace("\\", "\\\\").replace(".", "\\.") for name in predicate.field)))
        if predicate.kind == "equals" and not isinstance(predicate.value, str):
            return tantivy.Query.term_query(self._schema, path, predicate.value)
        words = WORDS.analyze(predicate.text)
        if not words:
            return tantivy.Query.empty_query()
        if predicate.kind in ("phrase", "equals") and len(words) > 1:
            return tantivy.Query.phrase_query(self._schema, path, words)
        terms = [tantivy.Query.term_query(self._schema, path, word) for word in words]
        return terms[0] if len(terms) == 1 else tantivy.Query.boolean_query([(tantivy.Occur.Must, t) for t in terms])


class TextIndex:
    """A tantivy index with one writer, owned by the collection's writer task."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._schema = _schema()
        try:
            self._index = tantivy.Index(self._schema, path=str(path))
        except ValueError:
            # Written with another schema by an older Shoal: it is derived data, so start over
            # (`generation()` is then None and the collection rebuilds it from the segments).
            shutil.rmtree(path)
            path.mkdir()
            self._index = tantivy.Index(self._schema, path=str(path))
        self._index.register_tokenizer(_TOKENIZER, WORDS)
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

    def searcher(self) -> TextSearcher:
        """The index as of the last commit."""
        self._index.reload()
        return TextSearcher(self._index.searcher(), self._schema)

    def update(self, removed_ids: Iterable[str], added: Iterable[tuple[str, int, dict[str, Any]]]) -> None:
        """Stage removals by `_id` and additions of (`_id`, row id, document); `commit` publishes them."""
        for doc_id in removed_ids:
            self._writer.delete_documents_by_term("_id", doc_id)
        for doc_id, rowid, fields in added:
            # One JSON text per document, parsed by tantivy straight into its own document:
            # cheaper than building a `tantivy.Document`, which `add_document` then copies.
            self._writer.add_json(orjson.dumps({"_id": doc_id, "_rowid": rowid, _DOC: fields}, default=_json_value).decode())

    def commit(self, generation: int) -> None:
        self._writer.delete_documents_by_term("_id", _MARKER_ID)
        self._writer.add_document(tantivy.Document(_id=_MARKER_ID, _rowid=-generation))
        self._writer.commit()

    def rollback(self) -> None:
        """Forget what was staged since the last commit (a refresh that failed half-way)."""
        self._writer.rollback()

    def close(self) -> None:
        """Release the index lock (tantivy drops it with the writer)."""
        self._writer.wait_merging_threads()
        del self._writer

    def clear(self) -> None:
        self._writer.delete_all_documents()
