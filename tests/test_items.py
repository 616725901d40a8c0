"""Bulk decoding of items (index/items.py) against the definition: decoding each item to plain
values (ingest/decode.py) and typing them with doctypes.build_columns."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_item_limits import BATCHES, nested_values

from shoal.index import items as items_module
from shoal.index.doctypes import build_columns
from shoal.index.items import ItemDecoder, encode_item
from shoal.ingest.decode import canonical_number, decode_item, item_text


def by_value(texts: list[bytes]) -> dict[str, pa.Array]:
    return build_columns([decode_item(orjson.loads(text)) for text in texts])


def assert_same_columns(actual: dict[str, pa.Array], expected: dict[str, pa.Array]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, column in expected.items():
        # Struct fields may come in another order (the reader puts declared paths first).
        got = actual[name]
        if got.type != column.type:
            assert _sorted_type(got.type) == _sorted_type(column.type), name
        assert got.to_pylist() == column.to_pylist(), name


def _sorted_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_struct(arrow_type):
        return "struct<" + ",".join(sorted(f"{f.name}:{_sorted_type(f.type)}" for f in arrow_type)) + ">"
    if pa.types.is_list(arrow_type):
        return f"list<{_sorted_type(arrow_type.value_type)}>"
    if pa.types.is_union(arrow_type):
        return "union<" + ",".join(f"{f.name}:{_sorted_type(f.type)}" for f in arrow_type) + ">"
    return str(arrow_type)


@settings(max_examples=150, deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(BATCHES, BATCHES)
def test_any_items_decode_as_by_value(first, second):
    decoder = ItemDecoder()  # two batches: the second reads with what the first declared
    for batch in (first, second):
        texts = [item_text(item) for item in batch]
        assert_same_columns(decoder.columns(texts), by_value(texts))


# Items of the shapes the fast path covers: no binary, numbers of the common forms.
FAST_NUMBERS = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15).map(repr),
    st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False).map(lambda d: str(d.normalize())),
    # Plain decimal text that is not a float's shortest text: exact, so a decimal.
    st.decimals(min_value=-10, max_value=10, places=20, allow_nan=False).map(lambda d: f"{d:f}"),
)
FAST_SCALARS = st.one_of(
    st.builds(lambda s: {"S": s}, st.text(max_size=12)),
    st.sampled_from(["2024-01-01", "2024-01-01T10:00:00Z", "2024-01-01 10:00:00", "10:00"]).map(lambda s: {"S": s}),
    st.builds(lambda n: {"N": n}, FAST_NUMBERS),
    st.builds(lambda b: {"BOOL": b}, st.booleans()),
    st.just({"NULL": True}),
    st.builds(lambda s: {"SS": sorted(s)}, st.sets(st.text(min_size=1, max_size=8), min_size=1, max_size=4)),
    st.builds(lambda ns: {"NS": sorted(set(ns))}, st.lists(st.integers(-1000, 1000).map(str), min_size=1, max_size=4)),
)
FAST_ITEMS = st.dictionaries(st.sampled_from(["a", "b", "c", "when", "n"]), nested_values(FAST_SCALARS), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FAST_ITEMS, min_size=1, max_size=12), st.lists(FAST_ITEMS, min_size=1, max_size=12))
def test_common_items_decode_as_by_value(first, second):
    decoder = ItemDecoder()
    for batch in (first, second):
        texts = [item_text(item) for item in batch]
        assert_same_columns(decoder.columns(texts), by_value(texts))


def test_common_shapes_take_the_fast_path(monkeypatch):
    """The batch-at-a-time path really runs for common items (no value-by-value fallback)."""
    def refuse(value):
        raise AssertionError(f"decoded value by value: {value!r}")
    monkeypatch.setattr(items_module, "_plain", refuse)
    texts = [encode_item({"s": f"w{i}", "n": i, "f": i + 0.25, "b": i % 2 == 0, "m": {"city": "Oslo", "at": [i, "x"]},
                          "when": "2024-01-01T10:00:00Z", "none": None, "mixed": i if i % 3 else "text"}) for i in range(50)]
    columns = ItemDecoder().columns(texts)
    assert_same_columns(columns, by_value(texts))
    assert pa.types.is_union(columns["mixed"].type) and columns["when"].type == pa.string()


def test_timestamp_like_strings_stay_text_and_are_remembered():
    decoder = ItemDecoder()
    first = [encode_item({"at": "2024-01-01 10:00:00"}), encode_item({"at": "2024-01-01T10:00:00Z"})]
    assert decoder.columns(first)["at"].to_pylist() == ["2024-01-01 10:00:00", "2024-01-01T10:00:00Z"]
    later = [encode_item({"at": "2024-02-01"}), encode_item({"other": 1})]
    assert decoder.columns(later)["at"].to_pylist() == ["2024-02-01", None]
    assert "at" not in decoder.columns([encode_item({"other": 2})]), "a declared path no item of the batch has"


def _number_texts() -> st.SearchStrategy[str]:
    """Number texts as a source may write them: canonical or not (zeros, exponents, signs)."""
    decimals = st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**30), max_value=10**30, places=None)
    plain = st.builds(lambda d: format(d, "f"), decimals)
    padded = st.builds(lambda text, zeros: text + ("" if "." in text else ".") + "0" * zeros, plain, st.integers(0, 3))
    exponent = st.builds(lambda d: f"{d:E}", decimals)
    signed = st.builds(lambda text: "+" + text.lstrip("-"), plain)
    leading = st.builds(lambda text: "0" + text.lstrip("-"), plain)
    return st.one_of(plain, padded, exponent, signed, leading, st.builds(str, st.integers(-(2**70), 2**70)))


@given(st.lists(_number_texts(), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_numbers_get_one_text_with_their_value(texts):
    """`with_canonical_numbers` rewrites every number of an item (alone, in a set, in a list
    in a map) to `canonical_number`'s text, without changing its value; an item whose numbers
    already are in that text comes back as the same bytes."""
    shapes = {
        "N": ({"n": {"N": texts[0]}}, lambda item: [item["n"]["N"]], texts[:1]),
        "NS": ({"s": {"NS": texts}}, lambda item: item["s"]["NS"], texts),
        "M/L": ({"m": {"M": {"l": {"L": [{"N": t} for t in texts]}}}}, lambda item: [v["N"] for v in item["m"]["M"]["l"]["L"]], texts),
    }
    for shape, (item, numbers_of, written) in shapes.items():
        out = orjson.loads(items_module.with_canonical_numbers(orjson.dumps(item)))
        for before, after in zip(written, numbers_of(out), strict=True):
            assert after == canonical_number(before) and Decimal(after) == Decimal(before), shape
        canonical = orjson.dumps(out)
        assert items_module.with_canonical_numbers(canonical) is canonical, shape


def test_only_typed_numbers_are_rewritten():
    """The rewrite finds numbers by their type tags in the text: a string that spells a typed
    number, attributes named N or NS, and sets of texts that are no numbers are left alone."""
    item = {
        "N": {"M": {"N": {"N": "12.50"}, "NS": {"NS": ["1E+2", "3"]}}},
        "text": {"S": '{"N":"12.50"} and {"NS":["1.0"]}'},
        "odd": {"NS": ['1"]', "2.0", "x\\"]},
        "NS": {"L": [{"N": "007"}]},
    }
    out = orjson.loads(items_module.with_canonical_numbers(orjson.dumps(item)))
    assert out == {
        "N": {"M": {"N": {"N": "12.5"}, "NS": {"NS": ["100", "3"]}}},
        "text": item["text"],
        "odd": item["odd"],  # no number set: decoding it fails with its own error
        "NS": {"L": [{"N": "7"}]},
    }
