"""DynamoDB JSON → plain Python values, and item keys → document `_id`.

DynamoDB tags every value with its type (`{"N": "5"}`). Shoal stores plain values whose
Python type *is* the document type, so the index layer can type columns per value:

| DynamoDB | Python            | Shoal type |
|----------|-------------------|------------|
| S        | str               | string     |
| N        | int / float / Decimal (rule below) | int / float / decimal |
| B        | bytes             | binary     |
| BOOL     | bool              | bool       |
| NULL     | None              | null       |
| M        | dict              | object     |
| L        | list              | array      |
| SS/NS/BS | list of str / numbers / bytes | array |

Number rule (no silent loss): an integral value within int64 is an `int`; otherwise a
`float` when the shortest float64 text equals the number exactly (e.g. `1.5`, `0.1`);
otherwise the exact `Decimal` (e.g. 38-digit values), which is stored as its decimal text.
"""

from __future__ import annotations

import base64
from decimal import Context, Decimal, InvalidOperation
from typing import Any, Callable, Mapping

import orjson

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def decode_number(text: str) -> int | float | Decimal:
    """Decode an `N` value by the number rule in the module docstring.

    Hot path (every number of every change): most texts are plain integers, or decimals that
    already are the shortest text of their float64 (`12.34`); both are recognised without
    building a Decimal. Everything else takes the exact route."""
    if "." in text:
        try:
            as_float = float(text)
        except ValueError:
            pass
        else:
            # Equal to the float's shortest text, so the float is the number exactly (the rule);
            # integral values (`100.0`) take the exact route, which makes them ints.
            if not as_float.is_integer() and repr(as_float) == text:
                return as_float
    else:
        try:
            value = int(text)
        except ValueError:
            pass
        else:
            if INT64_MIN <= value <= INT64_MAX:
                return value
            return _float_or_decimal(Decimal(value))
    return _decode_exact(text)


def canonical_number(text: str) -> str:
    """A number's one text: plain digits, no exponent, no leading or trailing zeros, no sign
    on zero (`12.50` → `12.5`, `1E+2` → `100`, `-0.0` → `0`). DynamoDB trims zeros itself, but
    the local endpoint hands numbers back as they were written. Collections keep this text,
    and the text index looks a query's number up by it. A text that is no number is returned
    as it is (decoding it fails with its own error)."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    if not value:
        return "0"
    if not _EXPONENTS.start <= value.adjusted() < _EXPONENTS.stop:
        return text  # no DynamoDB number: its plain digits could be a million characters
    # As many digits as the text has: normalize() rounds to the context's precision.
    return format(value.normalize(Context(prec=len(text))), "f")


def number_text(value: int | float | Decimal) -> str:
    """The text a collection keeps for a number of this value (`canonical_number`'s)."""
    if isinstance(value, int):
        return str(value)
    return canonical_number(repr(value) if isinstance(value, float) else str(value))


# Decimal exponents of DynamoDB's numbers (1E-130 to 9.99E+125), with room on each side.
_EXPONENTS = range(-200, 200)


def _decode_exact(text: str) -> int | float | Decimal:
    try:
        exact = Decimal(text)
    except InvalidOperation as exc:
        raise ValueError(f"not a DynamoDB number: {text!r}") from exc
    if exact == exact.to_integral_value() and INT64_MIN <= exact <= INT64_MAX:
        return int(exact)
    return _float_or_decimal(exact)


def _float_or_decimal(exact: Decimal) -> float | Decimal:
    as_float = float(exact)
    if Decimal(repr(as_float)) == exact:
        return as_float
    return exact


def binary_text(value: bytes | bytearray) -> str:
    """A binary value as DynamoDB JSON writes it (base64): in item texts, `_id`s and answers."""
    return base64.b64encode(value).decode("ascii")


def _binary(value: bytes | str) -> bytes:
    # botocore hands us bytes; export files and Kinesis records carry base64 text.
    return base64.b64decode(value) if isinstance(value, str) else bytes(value)


def decode_value(typed: Mapping[str, Any]) -> Any:
    """Decode one typed DynamoDB value (`{"S": "x"}`) to its plain Python value."""
    ((tag, raw),) = typed.items()
    # The common tags first, inline: this runs for every attribute of every change.
    if tag == "S":
        return raw
    if tag == "N":
        return decode_number(raw)
    if tag == "M":
        return decode_item(raw)
    if tag == "L":
        return [decode_value(value) for value in raw]
    return _OTHER_DECODERS[tag](raw)


def decode_item(item: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Decode a whole item (attribute name → typed value)."""
    return {name: decode_value(typed) for name, typed in item.items()}


_OTHER_DECODERS: dict[str, Callable[[Any], Any]] = {
    "B": _binary,
    "BOOL": bool,
    "NULL": lambda _: None,
    "SS": list,
    "NS": lambda values: [decode_number(v) for v in values],
    "BS": lambda values: [_binary(v) for v in values],
}


def item_text(item: Mapping[str, Mapping[str, Any]]) -> bytes:
    """An item (typed values, as botocore or a JSON record hands it) as DynamoDB JSON text,
    the form a `Change` carries: binary values are bytes from botocore, base64 in the text.
    Copied to its own size: orjson's result keeps a 4 KiB buffer, 10x a typical item, for as
    long as the change waits to be applied."""
    return bytes(memoryview(orjson.dumps(item, default=_base64_text)))


def _base64_text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return binary_text(value)
    raise TypeError(f"not a DynamoDB JSON value: {type(value).__name__}")


def _key_text(typed: Mapping[str, Any]) -> str:
    ((tag, raw),) = typed.items()
    if tag == "B":
        return binary_text(_binary(raw))
    if tag == "N":
        return canonical_number(raw)  # one item, one `_id`, however the endpoint wrote its key
    return str(raw)


def document_id(keys: Mapping[str, Mapping[str, Any]], key_names: tuple[str, ...]) -> str:
    """The `_id` of an item: its partition key text, or a JSON array of partition and sort key.

    Stable (the same item always maps to the same `_id`) and unambiguous: a key attribute has
    one type, and the composite form is JSON, so no separator can collide with key text.
    """
    if len(key_names) == 1:
        return _key_text(keys[key_names[0]])
    return orjson.dumps([_key_text(keys[name]) for name in key_names]).decode()
