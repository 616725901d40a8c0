"""The collection's tantivy index: every live document's fields, its `_id` and stable row id.

Schema: `_id` (raw, for deletes by id), `_rowid` (i64 fast field: what search hands to the
SQL side), and `doc`, a JSON field holding the item as the source sent it, in DynamoDB JSON
(`index.items`): tantivy parses that text itself, so no Python runs per value. Every value
sits below its type tag: `title` is at `doc.title.S`, a number at `doc.n.N`, `address.city`
at `doc.address.M.city.S`, the strings of a list at `doc.tags.L.S` and of a set at
`doc.tags.SS`. A query derives the paths a field can have from the collection's schema
(`_tag_paths`), so any field, nested or inside lists, is searchable without declaring it.
Strings and numbers (as their text) are split by `WORDS`; searches look in strings only,
equality with a number in numbers only.

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
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import orjson
import pyarrow as pa
import tantivy

from shoal.ingest.decode import number_text

from .doctypes import type_members

# The document holding the generation of the last commit. Its id names the index's format:
# an index of an older format (-2: numbers as their items wrote them) has no such document,
# so its collection rebuilds it from the segments.
_MARKER_ID = "\x00shoal-generation-2"
_DOC = "doc"
_DOCUMENT_TEXT = b'{"_id":%b,"_rowid":%d,"' + _DOC.encode() + b'":%b}'  # the JSON tantivy parses per document
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


class TextSearcher:
    """The index as of one commit; safe to use from several query threads."""

    def __init__(self, searcher: tantivy.Searcher, schema: tantivy.Schema, fields: Mapping[str, tuple[str, pa.DataType]]) -> None:
        self._searcher = searcher
        self._schema = schema
        self._fields = fields  # column name → (attribute name in the item, column type)
        self._counts: dict[tuple[TextPredicate, ...], int] = {}

    def search(self, predicates: Iterable[TextPredicate], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Row ids and BM25 scores of the documents matching every predicate, best first;
        all of them, or the best `limit`."""
        if limit == 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)  # tantivy panics on a top 0
        query = _all([self._query(p) for p in predicates])
        # tantivy allocates room for `wanted` hits up front: never more than there are documents.
        documents = self._searcher.num_docs
        wanted = max(1, documents if limit is None else min(limit, documents))
        hits = self._searcher.search(query, wanted, count=False).hits
        rowids = self._searcher.fast_field_values("_rowid", [address for _, address in hits])
        return np.array(rowids, np.int64), np.array([score for score, _ in hits], np.float64)

    def count(self, predicates: Sequence[TextPredicate]) -> int:
        """How many documents match every predicate (no scoring, no row ids), remembered:
        the planner asks again for each query over this commit, and counting 250k matches
        takes tantivy 2.3 ms."""
        key = tuple(predicates)
        count = self._counts.get(key)
        if count is None:
            count = self._searcher.search(_all([self._query(p) for p in key]), 1, count=True).count
            if len(self._counts) < _MAX_REMEMBERED_COUNTS:
                self._counts[key] = count
        return count

    def _query(self, predicate: TextPredicate) -> tantivy.Query:
        if predicate.kind == "id":
            return tantivy.Query.term_query(self._schema, "_id", predicate.text)
        numeric = predicate.kind == "equals" and not isinstance(predicate.value, str)
        text = number_text(predicate.value) if numeric else predicate.text
        attribute, column_type = self._fields.get(predicate.field[0], (None, None))
        if attribute is None:
            return tantivy.Query.empty_query()
        tags = _NUMBER_TAGS if numeric else _STRING_TAGS
        below = _tag_paths(column_type, predicate.field[1:], tags)
        paths = [".".join((_DOC, _escaped(attribute), path)) for path in below]
        words = WORDS.analyze(text)
        if not words or not paths:
            return tantivy.Query.empty_query()
        if predicate.kind in ("phrase", "equals") and len(words) > 1:
            return _any([tantivy.Query.phrase_query(self._schema, path, words) for path in paths])
        return _all([_any([tantivy.Query.term_query(self._schema, path, word) for path in paths]) for word in dict.fromkeys(words)])


_MAX_REMEMBERED_COUNTS = 256  # per commit

# Leaf tag of each document type a query looks in, and of the sets of it.
_STRING_TAGS = {"string": ("S", "SS")}
_NUMBER_TAGS = {"int": ("N", "NS"), "float": ("N", "NS")}


def _tag_paths(arrow_type: pa.DataType, names: Sequence[str], tags: Mapping[str, tuple[str, str]]) -> list[str]:
    """The DynamoDB JSON paths, below a value of `arrow_type`, of the field `names` inside
    it, ending at the tags of the types in `tags`: every shape the items' values can have."""
    paths: list[str] = []
    for member, member_type in type_members(arrow_type).items():
        if member == "array":
            element = member_type.value_type
            if not names:
                paths += [tags[m][1] for m in type_members(element) if m in tags]
            paths += ["L." + path for path in _tag_paths(element, names, tags)]
        elif member == "object" and names and member_type.get_field_index(names[0]) >= 0:
            inner = member_type.field(names[0]).type
            paths += [f"M.{_escaped(names[0])}.{path}" for path in _tag_paths(inner, names[1:], tags)]
        elif not names and member in tags:
            paths.append(tags[member][0])
    return list(dict.fromkeys(paths))


def _escaped(name: str) -> str:
    # tantivy splits a JSON path at dots: a dot (or backslash) inside a name is escaped.
    return name.replace("\\", "\\\\").replace(".", "\\.")


def _any(queries: list[tantivy.Query]) -> tantivy.Query:
    return queries[0] if len(queries) == 1 else tantivy.Query.boolean_query([(tantivy.Occur.Should, q) for q in queries])


def _all(queries: list[tantivy.Query]) -> tantivy.Query:
    # Not a boolean query of one clause: tantivy then loses its top-k pruning of a lone term
    # (a common word's top 10 at 1M documents: 2.5 ms alone, 4.4 ms wrapped).
    return queries[0] if len(queries) == 1 else tantivy.Query.boolean_query([(tantivy.Occur.Must, q) for q in queries])


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

    def searcher(self, fields: Mapping[str, tuple[str, pa.DataType]]) -> TextSearcher:
        """The index as of the last commit, for a collection whose columns are `fields`
        (column name → attribute name in the item, column type)."""
        self._index.reload()
        return TextSearcher(self._index.searcher(), self._schema, fields)

    def update(self, removed_ids: Iterable[str], added: Iterable[tuple[str, int, bytes]]) -> None:
        """Stage removals by `_id` and additions of (`_id`, row id, item as DynamoDB JSON);
        `commit` publishes them."""
        for doc_id in removed_ids:
            self._writer.delete_documents_by_term("_id", doc_id)
        for doc_id, rowid, item in added:
            # One JSON text per document, parsed by tantivy straight into its own document:
            # cheaper than building a `tantivy.Document`, which `add_document` then copies.
            self._writer.add_json((_DOCUMENT_TEXT % (orjson.dumps(doc_id), rowid, item)).decode())

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
