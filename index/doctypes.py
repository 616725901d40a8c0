"""Dynamically typed documents as Arrow columns.

Each value keeps its own type (Rockset's model): a field whose values all share one type is
a plain Arrow column of that type; a field that holds several types becomes a *sparse union*
with one child per type, each child named after the type (`int`, `string`, ...). DataFusion
compares union values by type (`x = 10` matches the int 10, never the string '10'),
`union_tag(x)` names each value's type, and pyarrow returns each value with its own type.

Types and their Arrow form:

| type    | Arrow                      |
|---------|----------------------------|
| bool    | bool                       |
| int     | int64                      |
| float   | float64                    |
| decimal | utf8 child named `decimal`, always inside a union so it never reads as a string |
| string  | utf8                       |
| binary  | binary                     |
| object  | struct (fields in first-seen order, merged across documents) |
| array   | list of the merged element type |
| null    | null (a field seen only as NULL) |

Schemas only grow: `merge_types` unifies what a new batch brings with what the collection
had, and `conform` rewrites an older array into the merged type at query time.
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

NoneType = type(None)

TYPE_OF_PYTHON = {
    bool: "bool",
    int: "int",
    float: "float",
    Decimal: "decimal",
    str: "string",
    bytes: "binary",
    dict: "object",
    list: "array",
}
PYTHON_OF_TYPE = {name: python_type for python_type, name in TYPE_OF_PYTHON.items()}
# Fixed order of union children, so merging the same types always yields the same union.
TYPE_ORDER = ("null", "bool", "int", "float", "decimal", "string", "binary", "object", "array")
_SCALAR_ARROW = {
    "bool": pa.bool_(),
    "int": pa.int64(),
    "float": pa.float64(),
    "decimal": pa.string(),
    "string": pa.string(),
    "binary": pa.binary(),
}


def type_name(arrow_type: pa.DataType) -> str:
    """The document type a non-union Arrow type stands for."""
    if pa.types.is_struct(arrow_type):
        return "object"
    if pa.types.is_list(arrow_type):
        return "array"
    if pa.types.is_null(arrow_type):
        return "null"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_int64(arrow_type):
        return "int"
    if pa.types.is_float64(arrow_type):
        return "float"
    if pa.types.is_string(arrow_type):
        return "string"
    if pa.types.is_binary(arrow_type):
        return "binary"
    raise TypeError(f"not a document type: {arrow_type}")


def type_members(arrow_type: pa.DataType) -> dict[str, pa.DataType]:
    """Type name → Arrow type of each type a column can hold."""
    if pa.types.is_union(arrow_type):
        return {field.name: field.type for field in arrow_type}
    if pa.types.is_null(arrow_type):
        return {}
    return {type_name(arrow_type): arrow_type}


def _from_members(members: dict[str, pa.DataType]) -> pa.DataType:
    if not members:
        return pa.null()
    if len(members) == 1 and "decimal" not in members:
        return next(iter(members.values()))
    names = sorted(members, key=TYPE_ORDER.index)
    return pa.sparse_union(
        [pa.field(name, members[name]) for name in names],
        type_codes=[TYPE_ORDER.index(name) for name in names],
    )


def array_of_members(members: dict[str, pa.Array], length: int) -> pa.Array:
    """One column from an array per type member, each of `length` values and null where the
    value is of another type, laid out as `_from_members` types it: the member alone, or a
    sparse union."""
    arrow_type = _from_members({name: array.type for name, array in members.items()})
    if not pa.types.is_union(arrow_type):
        return next(iter(members.values())) if members else pa.nulls(length)
    names, codes = [f.name for f in arrow_type], list(arrow_type.type_codes)
    type_ids = np.full(length, codes[0], np.int8)
    for name, code in zip(names, codes):
        type_ids[members[name].is_valid().to_numpy(zero_copy_only=False)] = code
    return pa.UnionArray.from_sparse(pa.array(type_ids, pa.int8()), [members[name] for name in names], names, codes)


# ----------------------------------------------------------------------------- inference


def infer_type(values: Sequence[Any]) -> pa.DataType:
    """The Arrow type that holds every value in `values` (None contributes nothing)."""
    python_types = set(map(type, values))
    uniform = len(python_types) == 1  # then no value needs filtering out below
    python_types.discard(NoneType)
    members: dict[str, pa.DataType] = {}
    for python_type in python_types:
        name = TYPE_OF_PYTHON.get(python_type)
        if name is None:
            raise TypeError(f"not a document value: {python_type.__name__}")
        if name == "object":
            members[name] = _infer_struct(values if uniform else [v for v in values if type(v) is dict])
        elif name == "array":
            lists = values if uniform else [v for v in values if type(v) is list]
            members[name] = pa.list_(infer_type(list(itertools.chain.from_iterable(lists))))
        else:
            members[name] = _SCALAR_ARROW[name]
    return _from_members(members)


def _infer_struct(dicts: Sequence[dict]) -> pa.DataType:
    return pa.struct([pa.field(name, infer_type(_values_of(dicts, name))) for name in _names_of(dicts)])


# These two run per field per batch over every document: map/chain keep the loop in C.
def _names_of(dicts: Sequence[dict]) -> dict[str, None]:
    """Every key of `dicts`, in first-seen order."""
    return dict.fromkeys(itertools.chain.from_iterable(dicts))


def _values_of(dicts: Sequence[dict], name: str) -> list[Any]:
    """Each dict's value of `name` (None where it has none)."""
    return list(map(dict.get, dicts, itertools.repeat(name, len(dicts))))


def merge_types(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The narrowest type holding every value of `a` and of `b`."""
    if a == b:
        return a
    members = type_members(a)
    for name, other in type_members(b).items():
        mine = members.get(name)
        if mine is None or mine == other:
            members[name] = other
        elif name == "object":
            members[name] = merge_structs(mine, other)
        elif name == "array":
            members[name] = pa.list_(merge_types(mine.value_type, other.value_type))
    return _from_members(members)


def merge_structs(a: pa.StructType, b: pa.StructType) -> pa.StructType:
    fields = {f.name: f.type for f in a}
    for f in b:
        fields[f.name] = merge_types(fields[f.name], f.type) if f.name in fields else f.type
    return pa.struct([pa.field(n, t) for n, t in fields.items()])


# ----------------------------------------------------------------------------- building


def build_array(values: Sequence[Any], arrow_type: pa.DataType) -> pa.Array:
    """Build an array of `arrow_type` (from `infer_type` or wider) from plain values."""
    if not _needs_own_build(arrow_type):
        # pyarrow converts plain values and lists of them in one C++ pass once it is told
        # the type; unions and structs need the work below.
        return pa.array(values, arrow_type)
    if pa.types.is_union(arrow_type):
        return _build_union(values, arrow_type)
    if pa.types.is_struct(arrow_type):
        mask = pa.array([v is None for v in values], pa.bool_())
        children = [
            build_array([None if v is None else v.get(f.name) for v in values], f.type)
            for f in arrow_type
        ]
        return pa.StructArray.from_arrays(children, fields=list(arrow_type), mask=mask)
    # A list of a type holding a union or a struct.
    offsets = [0]
    flat: list[Any] = []
    for v in values:
        if v is not None:
            flat.extend(v)
        offsets.append(len(flat))
    mask = pa.array([v is None for v in values], pa.bool_())
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), build_array(flat, arrow_type.value_type), mask=mask
    )


def _needs_own_build(arrow_type: pa.DataType) -> bool:
    """Whether a union (a mixed-type field, or a decimal) or a struct is inside `arrow_type`.
    pyarrow leaves the children of a null struct non-null ("" or 0), and DataFusion reads
    `address.city` from the child alone: a missing `address` would have city "". So structs
    are built from children that are null wherever the struct is."""
    if pa.types.is_union(arrow_type) or pa.types.is_struct(arrow_type):
        return True
    if pa.types.is_list(arrow_type):
        return _needs_own_build(arrow_type.value_type)
    return False


def _build_union(values: Sequence[Any], union: pa.UnionType) -> pa.Array:
    names = [f.name for f in union]
    python_types = list(map(type, values))
    # Per Python type, the code of its child; a None is a null of the first child.
    code_of_type = {PYTHON_OF_TYPE[name]: code for name, code in zip(names, union.type_codes)}
    code_of_type[NoneType] = union.type_codes[0]
    type_ids = list(map(code_of_type.__getitem__, python_types))
    children = []
    for field in union:
        own = PYTHON_OF_TYPE[field.name]
        if field.name == "decimal":
            child_values = [str(v) if t is own else None for v, t in zip(values, python_types)]
        else:
            child_values = [v if t is own else None for v, t in zip(values, python_types)]
        children.append(build_array(child_values, field.type))
    return pa.UnionArray.from_sparse(
        pa.array(type_ids, pa.int8()), children, names, list(union.type_codes)
    )


def build_columns(docs: Sequence[dict]) -> dict[str, pa.Array]:
    """Columns of user fields for a batch of documents, each typed by `infer_type`."""
    columns = {}
    for name in _names_of(docs):
        values = _values_of(docs, name)
        columns[name] = build_array(values, infer_type(values))
    return columns


# ----------------------------------------------------------------------------- conforming


def null_array(length: int, arrow_type: pa.DataType) -> pa.Array:
    """An all-null array of any document type (pyarrow cannot make null unions itself)."""
    if pa.types.is_union(arrow_type):
        children = [null_array(length, f.type) for f in arrow_type]
        type_ids = pa.array([arrow_type.type_codes[0]] * length, pa.int8())
        return pa.UnionArray.from_sparse(type_ids, children, [f.name for f in arrow_type], list(arrow_type.type_codes))
    if pa.types.is_struct(arrow_type):
        children = [null_array(length, f.type) for f in arrow_type]
        mask = pa.array([True] * length, pa.bool_())
        return pa.StructArray.from_arrays(children, fields=list(arrow_type), mask=mask)
    return pa.nulls(length, arrow_type)


def conform(array: pa.Array, target: pa.DataType) -> pa.Array:
    """Rewrite `array` (of a type `target` was merged from) into `target`, values unchanged."""
    if array.type == target:
        return array
    if pa.types.is_null(array.type):
        return null_array(len(array), target)
    if pa.types.is_union(target):
        return _conform_to_union(array, target)
    if pa.types.is_struct(target):
        present = {f.name for f in array.type}
        children = [
            conform(array.field(f.name), f.type) if f.name in present else null_array(len(array), f.type)
            for f in target
        ]
        mask = array.is_null() if array.null_count else None
        return pa.StructArray.from_arrays(children, fields=list(target), mask=mask)
    if pa.types.is_list(target):
        array = array.cast(pa.list_(array.type.value_type)) if not pa.types.is_list(array.type) else array
        values = conform(array.values, target.value_type)
        offsets = array.offsets
        mask = array.is_null() if array.null_count else None
        return pa.ListArray.from_arrays(offsets, values, mask=mask)
    raise TypeError(f"cannot conform {array.type} to {target}")


def _conform_to_union(array: pa.Array, target: pa.UnionType) -> pa.Array:
    length = len(array)
    names = [f.name for f in target]
    if pa.types.is_union(array.type):
        source_codes = dict(zip((f.name for f in array.type), array.type.type_codes))
        children = [
            conform(array.field(array.type.type_codes.index(source_codes[f.name])), f.type)
            if f.name in source_codes
            else null_array(length, f.type)
            for f in target
        ]
        type_ids = array.type_codes  # codes are fixed per type name (TYPE_ORDER), so they carry over
    else:
        own = type_name(array.type)
        children = [
            conform(array, f.type) if f.name == own else null_array(length, f.type) for f in target
        ]
        type_ids = pa.array([target.type_codes[names.index(own)]] * length, pa.int8())
    return pa.UnionArray.from_sparse(type_ids, children, names, list(target.type_codes))
