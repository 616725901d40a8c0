"""Items at DynamoDB's limits, and arbitrary items, round-trip through ingest and `SELECT *`.

DynamoDB's rules (developer guide, "Service, account, and table quotas" and "Data types"):
an item is at most 400 KB (names and values); maps and lists nest at most 32 levels; numbers
carry at most 38 significant digits, magnitude 1E-130 to 9.9999999999999999999999999999999999999E+125;
strings and binaries may be empty except in keys; sets are non-empty and unique (numbers by
value); attribute names are any non-empty UTF-8.

Expected values follow Shoal's documented mapping (README "Types", `ingest/decode.py`),
computed here independently of Shoal: N is an int when integral within int64, a float when
float64's shortest text equals the number, otherwise a decimal given as its exact text; B is
base64; sets are arrays in any order; an attribute named like a system column (`_id`,
`_event_time`, `_meta`, `_rowid`) or like search's `_score` is kept as `_item<name>`. Known gaps, so
not generated: an item holding both `_id` and `_item_id` keeps only one of them, and a NUL
character in an attribute name is cut off (Arrow's C interface to DataFusion ends names at NUL).

- `test_items_at_the_limits`: real moto + real Shoal; the same edge items through the bulk
  load (Scan) and through the stream; `SELECT *`, typeof, WHERE and SEARCH on odd names.
- `test_arbitrary_items_round_trip_in_process`: hypothesis, decode → Collection.apply →
  DataFusion → the API's JSON rendering; many examples, two refreshes each (schema merging).
- `test_arbitrary_items_round_trip_end_to_end`: hypothesis, items written to moto and ingested
  by a Shoal server from the stream, read back over HTTP; few examples (bounded to ~1 min).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.index.collection import Change, Collection
from shoal.ingest.decode import document_id, item_text
from shoal.server.routes import _json_default
from shoal.sql.engine import execute
from shoal.sql.planner import prepare
from support import Dynamo, ShoalProcess, run_in_thread, wait_until

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
RENAMED = {"_id", "_event_time", "_meta", "_rowid", "_score"}
MAX_ITEM_BYTES = 400 * 1024


# --------------------------------------------------------------------------- expected values


def stored_name(name: str) -> str:
    return f"_item{name}" if name in RENAMED else name


def expected_number(text: str) -> tuple[str, Any]:
    """(type, value) per the number rule: decimals as their exact `Decimal`."""
    exact = Decimal(text)
    if exact == exact.to_integral_value() and INT64_MIN <= exact <= INT64_MAX:
        return "int", int(exact)
    as_float = float(exact)
    if Decimal(repr(as_float)) == exact:
        return "float", as_float
    return "decimal", exact


def problems_of(actual: Any, av: dict, path: str, out: list[str]) -> None:
    """Compare one JSON value returned by Shoal with the AttributeValue written."""
    ((tag, raw),) = av.items()
    if tag == "S":
        ok = type(actual) is str and actual == raw
    elif tag == "N":
        kind, value = expected_number(raw)
        if kind == "decimal":
            ok = type(actual) is str and Decimal(actual) == value
        else:
            ok = type(actual) is type(value) and actual == value
    elif tag == "B":
        ok = actual == base64.b64encode(raw).decode()
    elif tag == "BOOL":
        ok = actual is raw
    elif tag == "NULL":
        ok = actual is None
    elif tag in ("SS", "NS", "BS"):
        ok = isinstance(actual, list) and len(actual) == len(raw)
        if ok:
            want = [{tag[0]: v} for v in raw]
            if tag == "NS":  # unordered: match by numeric value
                got = sorted(actual, key=lambda v: Decimal(str(v)))
                want.sort(key=lambda v: Decimal(v["N"]))
            else:
                got = sorted(actual, key=str)
                want.sort(key=lambda v: v["S"] if tag == "SS" else base64.b64encode(v["B"]).decode())
            for i, (a, w) in enumerate(zip(got, want)):
                problems_of(a, w, f"{path}<{i}>", out)
    elif tag == "M":
        ok = isinstance(actual, dict)
        if ok:
            for name, sub in raw.items():
                problems_of(actual.get(name, "<missing>"), sub, f"{path}.{name}", out)
            extra = {k: v for k, v in actual.items() if k not in raw and v is not None}
            if extra:
                out.append(f"{path}: unexpected keys {list(extra)[:5]}")
    elif tag == "L":
        ok = isinstance(actual, list) and len(actual) == len(raw)
        if ok:
            for i, (a, sub) in enumerate(zip(actual, raw)):
                problems_of(a, sub, f"{path}[{i}]", out)
    else:
        raise ValueError(tag)
    if not ok:
        shown = repr(actual)
        out.append(f"{path}: {tag} expected {str(raw)[:120]}, got {shown[:120]}{'...' if len(shown) > 120 else ''}")


def row_problems(row: dict | None, item: dict, doc_id: str) -> list[str]:
    if row is None:
        return [f"{doc_id}: no row"]
    out: list[str] = []
    names = {stored_name(name) for name in item}
    for name, av in item.items():
        problems_of(row.get(stored_name(name), "<missing>"), av, f"{doc_id}.{stored_name(name)}", out)
    out.extend(f"{doc_id}.{k}: not in the item, got {v!r:.80}" for k, v in row.items()
               if k not in names and k not in ("_id", "_event_time", "_meta") and v is not None)
    return out


def compare(rows: list[dict], items: dict[str, dict]) -> list[str]:
    by_id = {row["_id"]: row for row in rows}
    problems = [f"unexpected _id {k!r}" for k in by_id.keys() - items.keys()]
    for doc_id, item in items.items():
        problems.extend(row_problems(by_id.get(doc_id), item, doc_id))
    return problems


def item_bytes(item: dict) -> int:
    """DynamoDB's item size: names plus values (numbers ~1 byte per 2 digits; generous here)."""
    def size(av: dict) -> int:
        ((tag, raw),) = av.items()
        if tag == "S":
            return len(raw.encode())
        if tag == "N":
            return len(raw) // 2 + 2
        if tag == "B":
            return len(raw)
        if tag in ("BOOL", "NULL"):
            return 1
        if tag == "SS":
            return sum(len(s.encode()) for s in raw)
        if tag == "NS":
            return sum(len(n) // 2 + 2 for n in raw)
        if tag == "BS":
            return sum(len(b) for b in raw)
        if tag == "L":
            return 3 + sum(1 + size(v) for v in raw)
        return 3 + sum(len(k.encode()) + 1 + size(v) for k, v in raw.items())
    return sum(len(name.encode()) + size(av) for name, av in item.items())


# --------------------------------------------------------------------------- edge items


def nested(levels: int) -> dict:
    """`levels` containers, maps and lists alternating, around one string."""
    value: dict = {"S": "bottom"}
    for level in range(levels):
        value = {"M": {f"level{levels - level}": value}} if level % 2 else {"L": [{"N": str(level)}, value]}
    return value


def edge_items(prefix: str) -> dict[str, dict]:
    """One item per limit; `_id` → item. Each is valid DynamoDB (moto enforces the 400 KB)."""
    words = " ".join(f"word{i}" for i in range(1000))
    items = {
        "max_size": {
            "text": {"S": words},
            "filler": {"S": "é" * 150_000},  # 2 bytes each
            "blob": {"B": bytes(range(256)) * 350},
        },
        "deep": {"deep": nested(32), "shallow": {"S": "deep item"}},
        "empty": {
            "s": {"S": ""}, "b": {"B": b""}, "m": {"M": {}}, "l": {"L": []},
            "inner": {"M": {"s": {"S": ""}, "l": {"L": [{"S": ""}, {"B": b""}]}}},
        },
        "numbers": {
            "digits38": {"N": "12345678901234567890123456789012345678"},
            "neg_digits38": {"N": "-99999999999999999999999999999999999999"},
            "fraction38": {"N": "0.12345678901234567890123456789012345678"},
            "largest": {"N": "9.9999999999999999999999999999999999999E+125"},
            "most_negative": {"N": "-9.9999999999999999999999999999999999999E+125"},
            "e125": {"N": "1E+125"},
            "smallest": {"N": "1E-130"},
            "neg_smallest": {"N": "-1E-130"},
            "tiny": {"N": "0.000000000000000000000000000000000000000000000001"},
            "tiny38": {"N": "1.2345678901234567890123456789012345678E-130"},
            "int64_max": {"N": "9223372036854775807"},
            "int64_min": {"N": "-9223372036854775808"},
            "past_int64": {"N": "9223372036854775808"},
            "tenth": {"N": "0.1"},
            "zero": {"N": "0"},
            "plain": {"N": "42"},
        },
        "binary": {"all_bytes": {"B": bytes(range(256))}, "nul": {"B": b"\x00"},
                   "set": {"BS": [b"\x00", b"\xff\xfe", bytes(range(10))]}},
        "big_set": {"ss": {"SS": [f"elem{i:05d}" for i in range(10_000)]}},
        "number_set": {
            "ns": {"NS": ["1", "-1", "1.5", "0.1", "1E+125", "-1E-130", "12345678901234567890123456789012345678",
                          "9223372036854775808", "0.12345678901234567890123456789012345678"]},
            "ints": {"NS": [str(i) for i in range(1000)]},
        },
        "names": {
            "a.b": {"S": "dotted"},
            "with space": {"S": "spaced words"},
            "Zoë 日本": {"S": "unicode name"},
            "\"quoted\"": {"S": "quote name"},
            "_id": {"S": "attribute named id"},
            "_meta": {"M": {"owner": {"S": "meta attribute"}}},
            "_event_time": {"N": "5"},
            "_rowid": {"S": "rowid attribute"},
            "_score": {"N": "0.5"},
            "nested": {"M": {"x.y": {"N": "7"}, "a b": {"S": "inner spaced"}, "ü": {"BOOL": True}}},
        },
    }
    for key, item in items.items():
        item["pk"] = {"S": f"{prefix}{key}"}
        assert item_bytes(item) <= MAX_ITEM_BYTES, (key, item_bytes(item))
    return {f"{prefix}{key}": item for key, item in items.items()}


def typed_expectations(prefix: str) -> list[tuple[str, str, str]]:
    """(_id, field expression, typeof) for a few edge values."""
    return [
        (f"{prefix}numbers", "digits38", "decimal"),
        (f"{prefix}numbers", "largest", "decimal"),
        (f"{prefix}numbers", "e125", "float"),
        (f"{prefix}numbers", "neg_smallest", "float"),
        (f"{prefix}numbers", "tiny38", "decimal"),
        (f"{prefix}numbers", "int64_max", "int"),
        (f"{prefix}numbers", "past_int64", "decimal"),
        (f"{prefix}binary", "all_bytes", "binary"),
        (f"{prefix}empty", "s", "string"),
        (f"{prefix}big_set", "ss", "array"),
        (f"{prefix}deep", "deep", "object"),
        (f"{prefix}names", '"a.b"', "string"),
    ]


# --------------------------------------------------------------------------- end to end: the limits

COLL = "limits"
FQ = f"commons.{COLL}"


async def select_all(shoal: ShoalProcess) -> list[dict]:
    return await shoal.query(f"SELECT * FROM {FQ} LIMIT 100000")


async def test_items_at_the_limits(ddb: Dynamo, moto_server: str, table_name: str, shoal: ShoalProcess):
    """The edge items arrive intact by the bulk load and by the stream; odd names query."""
    ddb.create_table(table_name)
    scanned = edge_items("scan_")
    ddb.batch_write(table_name, list(scanned.values()))
    await shoal.create_integration("moto", moto_server)
    await shoal.create_collection(COLL, "moto", table_name)
    await shoal.wait_ready(COLL, timeout=60)

    streamed = edge_items("stream_")
    for item in streamed.values():
        ddb.client.put_item(TableName=table_name, Item=item)
    everything = {**scanned, **streamed}

    async def all_arrived():
        rows = await select_all(shoal)
        assert len(rows) == len(everything), f"{len(rows)} of {len(everything)} documents"
        return rows

    rows = await wait_until(all_arrived, 30, 0.2, "every edge item", describe=lambda: shoal.get_collection(COLL))
    problems = compare(rows, everything)
    assert not problems, "\n".join(problems[:30])

    for prefix in ("scan_", "stream_"):
        for doc_id, field, kind in typed_expectations(prefix):
            rows = await shoal.query(f"SELECT typeof({field}) AS t FROM {FQ} WHERE _id = :id", {"id": doc_id})
            assert rows == [{"t": kind}], (doc_id, field, rows)

        names = f"{prefix}names"
        for condition, params in [
            ('"a.b" = :v', {"v": "dotted"}),
            ('"with space" = :v', {"v": "spaced words"}),
            ('"Zoë 日本" = :v', {"v": "unicode name"}),
            ('"""quoted""" = :v', {"v": "quote name"}),
            ("_item_id = :v", {"v": "attribute named id"}),
            ("_item_meta.owner = :v", {"v": "meta attribute"}),
            ('nested."x.y" = 7', {}),
            ('nested."a b" = :v', {"v": "inner spaced"}),
            ("_item_score > 0.25", {}),
            ("SEARCH(CONTAINS(\"a.b\", 'dotted'))", {}),
            ("SEARCH(CONTAINS(\"with space\", 'spaced'))", {}),
            ("SEARCH(CONTAINS(\"Zoë 日本\", 'UNICODE'))", {}),
            ("SEARCH(CONTAINS(nested.\"a b\", 'inner'))", {}),
            ("SEARCH(CONTAINS(_item_id, 'attribute id'))", {}),
        ]:
            rows = await shoal.query(f"SELECT _id FROM {FQ} WHERE {condition} AND _id LIKE '{prefix}%'", params)
            assert rows == [{"_id": names}], (condition, rows)
        # The point lookup reads the search side, which adds a `_score` of its own.
        rows = await shoal.query(f"SELECT * FROM {FQ} WHERE _id = :id", {"id": names})
        assert not row_problems(rows[0], everything[names], names), rows

        rows = await shoal.query(f"SELECT _id FROM {FQ} WHERE SEARCH(CONTAINS(ss, 'elem09999'))"
                                 f" AND _id LIKE '{prefix}%'")
        assert rows == [{"_id": f"{prefix}big_set"}], rows
        rows = await shoal.query(f"SELECT _id FROM {FQ} WHERE SEARCH(CONTAINS(text, 'word999 word0'))"
                                 f" AND _id LIKE '{prefix}%'")
        assert rows == [{"_id": f"{prefix}max_size"}], rows
        rows = await shoal.query(f"SELECT cardinality(ss) AS n FROM {FQ} WHERE _id = :id", {"id": f"{prefix}big_set"})
        assert rows == [{"n": 10_000}], rows


# --------------------------------------------------------------------------- generated items

NAMES = st.one_of(
    st.sampled_from(["a", "b", "n", "a.b", "with space", "Zoë", "日本", "_id", "_meta", "_score", "_rowid", "x\\y"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=6).filter(
        lambda name: not name.startswith("_item")),
)


@st.composite
def dynamo_numbers(draw) -> str:
    """Any DynamoDB number: up to 38 significant digits, magnitude 1E-130 ... <1E+126, or 0."""
    kind = draw(st.sampled_from(["int", "int64", "float", "decimal", "zero"]))
    if kind == "zero":
        return "0"
    if kind == "int":
        return str(draw(st.integers(-(10**38) + 1, 10**38 - 1)))
    if kind == "int64":
        return str(draw(st.integers(INT64_MIN, INT64_MAX)))
    if kind == "float":
        value = draw(st.floats(allow_nan=False, allow_infinity=False).filter(
            lambda f: f == 0 or Decimal("1E-130") <= abs(Decimal(f)) < Decimal("1E+126")))
        return repr(value)
    digits = draw(st.integers(1, 10**38 - 1))
    exponent = draw(st.integers(-130, 125 - len(str(digits)) + 1))
    number = Decimal(digits).scaleb(exponent)
    if abs(number) < Decimal("1E-130"):
        number = Decimal(digits).scaleb(-130 + len(str(digits)) - 1)
    sign = draw(st.sampled_from(["", "-"]))
    return sign + str(number)


def unique_numbers(texts: list[str]) -> list[str]:
    seen: dict[Decimal, str] = {}
    for text in texts:
        seen.setdefault(Decimal(text), text)
    return list(seen.values())


SCALARS = st.one_of(
    st.builds(lambda s: {"S": s}, st.text(max_size=20)),
    st.builds(lambda n: {"N": n}, dynamo_numbers()),
    st.builds(lambda b: {"B": b}, st.binary(max_size=16)),
    st.builds(lambda b: {"BOOL": b}, st.booleans()),
    st.just({"NULL": True}),
    st.builds(lambda s: {"SS": sorted(s)}, st.sets(st.text(min_size=1, max_size=8), min_size=1, max_size=5)),
    st.builds(lambda ns: {"NS": unique_numbers(ns)}, st.lists(dynamo_numbers(), min_size=1, max_size=5)),
    st.builds(lambda bs: {"BS": sorted(bs)}, st.sets(st.binary(min_size=1, max_size=6), min_size=1, max_size=4)),
)


def nested_values(scalars: st.SearchStrategy) -> st.SearchStrategy:
    """Typed values: `scalars`, and maps and lists of them, nested."""
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.builds(lambda m: {"M": m}, st.dictionaries(NAMES, inner, max_size=4)),
            st.builds(lambda values: {"L": values}, st.lists(inner, max_size=4)),
        ),
        max_leaves=12,
    )


VALUES = nested_values(SCALARS)
ITEMS = st.dictionaries(NAMES, VALUES, min_size=1, max_size=6).filter(lambda item: "pk" not in item)
BATCHES = st.lists(ITEMS, min_size=1, max_size=6)


# --------------------------------------------------------------------------- in process

_counter = itertools.count()
FAST_DISK = "/dev/shm" if Path("/dev/shm").is_dir() else None  # each refresh fsyncs: keep examples quick


def keyed(batch: list[dict]) -> dict[str, dict]:
    """Give each generated item a fresh partition key (`pk` S): `_id` → item."""
    out = {}
    for item in batch:
        doc_id = f"h{next(_counter)}"
        out[doc_id] = {**item, "pk": {"S": doc_id}}
    return out


async def round_trip_in_process(first: dict[str, dict], second: dict[str, dict]) -> list[dict]:
    """Two refreshes (so the second batch's types merge with the first's), then `SELECT *`
    rendered as the query API renders it."""
    with tempfile.TemporaryDirectory(dir=FAST_DISK) as directory:
        collection = Collection.open(Path(directory))
        try:
            meta = {"table": "t", "event": "INSERT", "sequence_number": None}
            for batch in (first, second):
                changes = [Change(document_id(item, ("pk",)), item_text(item), 0, meta) for item in batch.values()]
                await collection.apply(changes, None)
            snapshot = collection.snapshot()
            prepared = prepare("SELECT * FROM commons.t", [], lambda ws, name: snapshot.query_schema)
            rows = execute(prepared, lambda ws, name: snapshot, 100_000, 30).table.to_pylist()
            return orjson.loads(orjson.dumps(rows, default=_json_default, option=orjson.OPT_NON_STR_KEYS))
        finally:
            await collection.close()


@settings(max_examples=100, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(BATCHES, BATCHES)
def test_arbitrary_items_round_trip_in_process(first, second):
    first, second = keyed(first), keyed(second)
    rows = asyncio.run(round_trip_in_process(first, second))
    problems = compare(rows, {**first, **second})
    assert not problems, "\n".join(problems[:20])


# --------------------------------------------------------------------------- end to end

E2E_COLL = "generated"


@pytest.fixture(scope="module")
def generated_table(shoal_module: ShoalProcess, moto_server: str) -> tuple[Dynamo, str]:
    """A table with a READY collection `commons.generated` on the module's Shoal server."""
    ddb = Dynamo(moto_server)
    table = f"gen_{uuid.uuid4().hex[:8]}"
    ddb.create_table(table)

    async def make():
        await shoal_module.create_integration("moto_gen", moto_server)
        await shoal_module.create_collection(E2E_COLL, "moto_gen", table, poll="PT0.05S")
        await shoal_module.wait_ready(E2E_COLL, timeout=60)
    run_in_thread(make)
    return ddb, table


@settings(max_examples=40, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=BATCHES)
def test_arbitrary_items_round_trip_end_to_end(shoal_module: ShoalProcess, generated_table, batch):
    """Each example writes its items to moto (one collection for all examples, so the schema
    keeps widening) and waits until Shoal's `SELECT *` returns exactly them."""
    ddb, table = generated_table
    items = keyed(batch)
    for item in items.values():
        ddb.client.put_item(TableName=table, Item=item)
    ids = ", ".join(f"'{doc_id}'" for doc_id in items)

    async def arrived():
        rows = await shoal_module.query(f"SELECT * FROM commons.{E2E_COLL} WHERE _id IN ({ids})")
        assert len(rows) == len(items), f"{len(rows)} of {len(items)}"
        return rows

    started = time.monotonic()
    rows = asyncio.run(wait_until(arrived, 20, 0.05, "the generated items",
                                  describe=lambda: shoal_module.get_collection(E2E_COLL)))
    assert time.monotonic() - started < 20
    problems = compare(rows, items)
    assert not problems, "\n".join(problems[:20])
