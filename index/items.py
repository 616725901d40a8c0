"""DynamoDB items → Arrow columns, a whole batch at a time.

Every source delivers an item as DynamoDB JSON (a stream record's `NewImage`, a Scan page's
item, an export file's line, a Kinesis record), and a `Change` carries it as that JSON text
(`encode_item` makes it from plain values, for tests and the field mapping). A refresh parses
the texts of its batch in one pyarrow JSON read (C++), which gives one struct column per
attribute with one child per type tag (`{"S": ..., "N": ...}`), and maps the tags to Shoal's
document types (`index.doctypes`) with Arrow compute, column by column: no Python runs per
item. The same texts go to the text index as they are, once the collection has put each
number in its one text (`with_canonical_numbers`: `12.50` → `12.5`).

The fast path covers strings, numbers that are int64 integers or floats written as their
shortest text, booleans, nulls, maps, lists, string and number sets. A column with anything
else (binary, a 38-digit or `1E+125` number, lists and sets in one field, ...) is decoded
value by value with `ingest.decode` (the number rule and the type table live there) and built
by `doctypes.build_array`: that path is the definition, and tests/test_items.py checks that
both give identical columns for random items.

pyarrow's JSON reader reads text that looks like a timestamp as a timestamp; a string stays
a string here: a read that inferred anything but strings, booleans, lists and structs is read
again with those paths declared as strings (`ItemDecoder` remembers them for later batches).
"""

from __future__ import annotations

import io
import re
from decimal import Decimal
from typing import Any, Mapping, Sequence

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from shoal.ingest.decode import binary_text, canonical_number, decode_item, decode_value, number_text

from .doctypes import array_of_members, build_array, build_columns, infer_type, merge_structs

_INT = r"^-?(0|[1-9][0-9]{0,17})$"  # at most 18 digits: always within int64
_PLAIN_DECIMAL = r"^-?[0-9]+\.[0-9]+$"
# The texts `canonical_number` writes, and the other number texts in an item's text (compact
# JSON, as `item_text` and orjson write it): an `N` value (group 1), or an `NS` set with one
# among its elements (group 2); such as the texts Python also reads as numbers: `12.50`,
# `1E+2`, `1_000`, ` 5`. Typed values are the only place `{"N":"` and `{"NS":[` can occur: a
# quote inside a JSON string is escaped, and an attribute named N or NS holds an object.
_CANONICAL = rb"(?:0|-?(?:[1-9][0-9]*(?:\.[0-9]*[1-9])?|0\.[0-9]*[1-9]))"
_OTHER_NUMBER_IN_ITEM = re.compile(
    rb'\{"N":"(?!' + _CANONICAL + rb'")([^"]*)"'
    rb'|\{"NS":\[(?=(?:"' + _CANONICAL + rb'",)*"(?!' + _CANONICAL + rb'"))((?:"[^"\\]*",)*"[^"\\]*")\]'
)


class _NotCovered(Exception):
    """The fast path does not cover this column: decode it value by value."""


def with_canonical_numbers(item: bytes) -> bytes:
    """`item` (DynamoDB JSON text) with every number in its `canonical_number` text; the same
    bytes object when they are already (re.sub with no match: the usual case). Only the other
    texts are replaced, in place: decoding and encoding the whole item cost five times as
    much, and the local endpoint hands a quarter of the items of a realistic stream back with one."""
    return _OTHER_NUMBER_IN_ITEM.sub(_canonical_texts, item)


def _canonical_texts(match: re.Match[bytes]) -> bytes:
    number, members = match.groups()
    if number is not None:
        return b'{"N":"%b"' % canonical_number(number.decode()).encode()
    return b'{"NS":%b' % orjson.dumps([canonical_number(text) for text in orjson.loads(b"[%b]" % members)])


def encode_item(doc: Mapping[str, Any]) -> bytes:
    """A document of plain values (the types of `ingest.decode`) as DynamoDB JSON text."""
    return orjson.dumps({name: _typed(value) for name, value in doc.items()})


def _typed(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, (int, float, Decimal)):
        return {"N": number_text(value)}
    if value is None:
        return {"NULL": True}
    if isinstance(value, dict):
        return {"M": {name: _typed(v) for name, v in value.items()}}
    if isinstance(value, list):
        return {"L": [_typed(v) for v in value]}
    if isinstance(value, (bytes, bytearray)):
        return {"B": binary_text(value)}
    raise TypeError(f"not a document value: {type(value).__name__}")


def decode_text(item: bytes) -> dict[str, Any]:
    """One item's DynamoDB JSON text as plain values (the slow path, one item)."""
    return decode_item(orjson.loads(item))


class ItemDecoder:
    """Decodes batches of item texts into columns; one per collection (it learns which
    attribute paths pyarrow mistakes for timestamps)."""

    def __init__(self) -> None:
        self._declared: pa.Schema | None = None  # paths to read as strings

    def columns(self, items: Sequence[bytes]) -> dict[str, pa.Array]:
        """The user columns of `items` (name → column, in first-seen order), typed as
        `doctypes.build_columns` types the decoded documents."""
        if not items:
            return {}
        try:
            table = self._read(items)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            # Not what pyarrow's reader takes (e.g. nesting beyond its limit): the slow path.
            return build_columns([decode_text(item) for item in items])
        columns = {}
        for name, chunked in zip(table.column_names, table.columns):
            tagged = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()  # one block: no copy
            if tagged.null_count != len(tagged):  # else declared, but in no item of this batch
                columns[name] = _converted(tagged)
        return columns

    def _read(self, items: Sequence[bytes]) -> pa.Table:
        data = b"\n".join(items)

        def read() -> pa.Table:
            # One block: the reader infers each block's types on its own, and a path could
            # look like a timestamp in one block and not in another.
            return pa_json.read_json(
                io.BytesIO(data), read_options=pa_json.ReadOptions(block_size=len(data) + 1, use_threads=False),
                parse_options=pa_json.ParseOptions(explicit_schema=self._declared, unexpected_field_behavior="infer"))

        table = read()
        strings = _as_strings(table.schema)
        if strings is None:
            return table
        self._declared = strings if self._declared is None else pa.schema(list(merge_structs(pa.struct(list(self._declared)), pa.struct(list(strings)))))
        table = read()
        if _as_strings(table.schema) is not None:
            raise pa.ArrowInvalid("the JSON reader keeps inferring non-string values")
        return table


# ----------------------------------------------------------------------------- the fast path


def _converted(tagged: pa.Array) -> pa.Array:
    """`_column`, or value by value where the fast path does not reach."""
    try:
        return _column(tagged)
    except _NotCovered:
        values = [_plain(value) for value in tagged.to_pylist()]
        return build_array(values, infer_type(values))


def _column(tagged: pa.Array) -> pa.Array:
    """One attribute's values, given as a struct with a child per type tag (null where the
    item lacks the attribute), as the column `build_array` would make of the decoded values."""
    if pa.types.is_null(tagged.type):
        return pa.nulls(len(tagged))
    members: dict[str, pa.Array] = {}
    for field, child in zip(tagged.type, tagged.flatten()):  # flatten: null where the attribute is
        if child.null_count == len(child) or field.name == "NULL":
            continue  # a NULL holds no value of any type
        for name, array in _members(field.name, child).items():
            if name in members:
                raise _NotCovered  # e.g. a list and a set in one field: merge by value
            members[name] = array
    return array_of_members(members, len(tagged))


def _members(tag: str, child: pa.Array) -> dict[str, pa.Array]:
    """Type name → full-length array of the values tagged `tag` (null elsewhere)."""
    if tag == "S" and pa.types.is_string(child.type):
        return {"string": child}
    if tag == "BOOL" and pa.types.is_boolean(child.type):
        return {"bool": child}
    if tag == "N" and pa.types.is_string(child.type):
        return _numbers(child)
    if tag == "M" and pa.types.is_struct(child.type):
        return {"object": _struct(child)}
    if tag == "L" and pa.types.is_list(child.type):
        return {"array": _list(child, _column(child.values))}
    if tag == "SS" and child.type == pa.list_(pa.string()):
        return {"array": child}
    if tag == "NS" and child.type == pa.list_(pa.string()):
        return {"array": _list(child, array_of_members(_numbers(child.values), len(child.values)))}
    raise _NotCovered  # binary (base64 to decode), or an unexpected shape


def _numbers(texts: pa.Array) -> dict[str, pa.Array]:
    """Number texts (`canonical_number`'s, as a collection keeps them) by the number rule
    (`ingest.decode`): int64 integers, and floats whose shortest text is the number; anything
    else goes the exact way."""
    is_int = pc.fill_null(pc.match_substring_regex(texts, _INT), False)
    is_plain_decimal = pc.fill_null(pc.match_substring_regex(texts, _PLAIN_DECIMAL), False)
    floats = pc.cast(pc.if_else(is_plain_decimal, texts, None), pa.float64())
    exact_float = pc.and_(
        pc.and_(is_plain_decimal, pc.not_equal(floats, pc.floor(floats))),
        pc.equal(pc.cast(floats, pa.string()), texts),
    )
    exact_float = pc.fill_null(exact_float, False)
    covered = pc.or_(is_int, exact_float)
    if pc.sum(covered).as_py() != len(texts) - texts.null_count:
        raise _NotCovered
    members = {}
    if pc.any(is_int).as_py():
        members["int"] = pc.cast(pc.if_else(is_int, texts, None), pa.int64())
    if pc.any(exact_float).as_py():
        members["float"] = pc.if_else(exact_float, floats, None)
    return members


def _struct(maps: pa.StructArray) -> pa.Array:
    """A map attribute's values (each map field tagged) as a struct of converted fields,
    null where the value is not a map; fields no map of the batch holds are left out."""
    fields, children = [], []
    for field, child in zip(maps.type, maps.flatten()):
        if child.null_count == len(child):
            continue
        converted = _converted(child)
        fields.append(pa.field(field.name, converted.type))
        children.append(converted)
    if not fields:
        raise _NotCovered  # only empty maps: pyarrow makes no zero-field struct with a length
    return pa.StructArray.from_arrays(children, fields=fields, mask=maps.is_null())


def _list(lists: pa.ListArray, elements: pa.Array) -> pa.Array:
    """`lists` with its elements replaced by `elements` (converted `lists.values`)."""
    return pa.ListArray.from_arrays(lists.offsets, elements, mask=lists.is_null())


# ----------------------------------------------------------------------------- by value


def _plain(tagged: dict[str, Any] | None) -> Any:
    """A value as the reader returns it (a dict with every tag of its column, None for the
    tags it lacks) decoded to its plain value; None for a missing attribute."""
    if tagged is None:
        return None
    tag, raw = next(((tag, raw) for tag, raw in tagged.items() if raw is not None), ("NULL", True))
    if tag == "M":
        return {name: _plain(value) for name, value in raw.items() if value is not None}
    if tag == "L":
        return [_plain(value) for value in raw]
    return decode_value({tag: raw})


# ----------------------------------------------------------------------------- declared strings


def _as_strings(schema: pa.Schema) -> pa.Schema | None:
    """The paths of `schema` the reader inferred as something other than DynamoDB JSON's
    strings, booleans, lists and structs, declared as strings; None when there are none."""
    fields = [f for f in (_field_as_strings(field) for field in schema) if f is not None]
    return pa.schema(fields) if fields else None


def _field_as_strings(field: pa.Field) -> pa.Field | None:
    kind = field.type
    if pa.types.is_struct(kind):
        children = [f for f in (_field_as_strings(child) for child in kind) if f is not None]
        return pa.field(field.name, pa.struct(children)) if children else None
    if pa.types.is_list(kind):
        element = _field_as_strings(kind.value_field)
        return pa.field(field.name, pa.list_(element)) if element is not None else None
    if pa.types.is_string(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind):
        return None
    return pa.field(field.name, pa.string())
