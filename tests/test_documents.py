"""The document model: DynamoDB JSON decoding and dynamically typed Arrow columns."""

from __future__ import annotations

import base64
import tracemalloc
from decimal import Decimal

import orjson
import pyarrow as pa
import pytest

from shoal.index.doctypes import build_array, build_columns, conform, infer_type, merge_types, null_array
from shoal.ingest.decode import decode_item, decode_number, document_id, item_text


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("10", 10, int),
        ("-9223372036854775808", -(2**63), int),
        ("9223372036854775808", Decimal("9223372036854775808"), Decimal),  # past int64: exact, not rounded
        ("1.5", 1.5, float),
        ("0.1", 0.1, float),
        ("1E+3", 1000, int),
        ("12345678901234567890.123456789012345678", Decimal("12345678901234567890.123456789012345678"), Decimal),
        ("1E-130", 1e-130, float),
        # Texts with a point take a fast path; it must agree with the exact route.
        ("100.0", 100, int),
        ("12.30", 12.3, float),
        ("-0.25", -0.25, float),
        ("0.1000000000000000055511151231257827", Decimal("0.1000000000000000055511151231257827"), Decimal),
    ],
)
def test_numbers_decode_without_loss(text, expected, kind):
    value = decode_number(text)
    assert type(value) is kind
    assert value == expected
    assert Decimal(str(value)) == Decimal(text)  # the text round-trips exactly


def test_all_ten_types_decode():
    item = {
        "s": {"S": "x"},
        "n": {"N": "5"},
        "b": {"B": base64.b64encode(b"\x00\xff").decode()},  # export/Kinesis form: base64 text
        "b2": {"B": b"\x01"},  # botocore form: bytes
        "bool": {"BOOL": False},
        "null": {"NULL": True},
        "m": {"M": {"inner": {"L": [{"N": "1"}, {"S": "a"}]}}},
        "ss": {"SS": ["a", "b"]},
        "ns": {"NS": ["1", "2.5"]},
        "bs": {"BS": [b"\x02"]},
    }
    assert decode_item(item) == {
        "s": "x",
        "n": 5,
        "b": b"\x00\xff",
        "b2": b"\x01",
        "bool": False,
        "null": None,
        "m": {"inner": [1, "a"]},
        "ss": ["a", "b"],
        "ns": [1, 2.5],
        "bs": [b"\x02"],
    }


def test_item_text_is_dynamodb_json_held_at_its_own_size():
    item = {"pk": {"S": "a"}, "n": {"N": "1.5"}, "b": {"B": b"\x00\xff"}, "m": {"M": {"x": {"BOOL": True}}}}
    text = item_text(item)
    assert orjson.loads(text) == {**item, "b": {"B": base64.b64encode(b"\x00\xff").decode()}}
    # A change waits in queues with its text: no 4 KiB buffer behind a 100-byte item.
    tracemalloc.start()
    try:
        texts = [item_text(item) for _ in range(1000)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < len(texts) * (len(text) + 200), held


def test_document_id_is_stable_and_unambiguous():
    assert document_id({"pk": {"S": "a"}}, ("pk",)) == "a"
    assert document_id({"pk": {"N": "7"}}, ("pk",)) == "7"
    # DynamoDB trims a number key, the local endpoint keeps it as written: one item either way.
    assert document_id({"pk": {"N": "12.50"}, "sk": {"N": "1E+2"}}, ("pk", "sk")) == '["12.5","100"]'
    # The separator cannot collide with key text: both keys differ although concatenations agree.
    one = document_id({"pk": {"S": "a|b"}, "sk": {"S": "c"}}, ("pk", "sk"))
    two = document_id({"pk": {"S": "a"}, "sk": {"S": "b|c"}}, ("pk", "sk"))
    assert one != two
    assert one == '["a|b","c"]'


def test_a_field_of_one_type_is_a_plain_column():
    assert infer_type([1, None, 3]) == pa.int64()
    assert infer_type(["a"]) == pa.string()
    assert infer_type([{"a": 1}, {"b": "x"}]) == pa.struct([("a", pa.int64()), ("b", pa.string())])
    assert infer_type([[1, 2], []]) == pa.list_(pa.int64())
    assert infer_type([None]) == pa.null()


def test_mixed_types_keep_each_value_and_its_type():
    values = [10, "10", 1.5, True, None, {"k": 1}, [1, "a"], b"\x00", Decimal("1.00000000000000000000001")]
    arrow_type = infer_type(values)
    assert pa.types.is_union(arrow_type)
    array = build_array(values, arrow_type)
    decoded = array.to_pylist()
    decoded[-1] = Decimal(decoded[-1])  # decimals are kept as their exact text
    assert decoded == values
    assert [type(v) for v in decoded] == [type(v) for v in values]


def test_decimals_never_read_as_strings():
    arrow_type = infer_type([Decimal("1.00000000000000000000001")])
    assert pa.types.is_union(arrow_type) and [f.name for f in arrow_type] == ["decimal"]


def test_merge_then_conform_keeps_values():
    old = build_array([{"a": 1}, None], infer_type([{"a": 1}]))
    new_type = infer_type([{"a": "x", "b": [1]}])
    merged = merge_types(old.type, new_type)
    assert conform(old, merged).to_pylist() == [{"a": 1, "b": None}, None]
    ints = pa.array([1, None])
    union = merge_types(pa.int64(), merge_types(pa.string(), pa.float64()))
    assert conform(ints, union).to_pylist() == [1, None]
    assert null_array(2, union).to_pylist() == [None, None]


def test_columns_of_a_batch():
    columns = build_columns([{"a": 1, "m": {"x": "y"}}, {"b": True}])
    assert columns["a"].to_pylist() == [1, None]
    assert columns["m"].to_pylist() == [{"x": "y"}, None]
    assert columns["b"].to_pylist() == [None, True]
