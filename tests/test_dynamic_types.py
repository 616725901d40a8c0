"""Dynamic typing, one pair of types at a time.

The walking skeleton checks `mixed = 10` / `mixed = '10'` on a field holding nine types at
once; when it fails, this module says which companion type breaks it.  Each case is a small
table whose `mixed` field holds the string '10', the number 10, and one value of another
type.  Equality must respect the type (10 is not '10'), must not fail because some other
row holds a type the literal cannot be cast to, and typeof() must name each row's type.
"""

from __future__ import annotations

import uuid

import pytest

from support import Dynamo, ShoalProcess, run_in_thread, type_name

COMPANIONS = {
    "int": {"N": "7"},
    "float": {"N": "2.5"},
    "decimal": {"N": "1234567890123456789012345.5678901234"},
    "string": {"S": "abc"},
    "binary": {"B": b"\x01\x02"},
    "bool": {"BOOL": True},
    "null": {"NULL": True},
    "object": {"M": {"v": {"N": "10"}}},
    "array": {"L": [{"N": "10"}, {"S": "10"}]},
}


VARIANTS = ["with_number", "no_number"]


def cname(kind: str, variant: str) -> str:
    return f"typed_{kind}_{variant}"


@pytest.fixture(scope="module")
def typed_collections(shoal_module: ShoalProcess, moto_server: str) -> dict[tuple[str, str], dict]:
    """READY collections per (companion type, variant): {(kind, variant): {_id: AttributeValue}}.
    Variant 'with_number' holds '10', 10 and the companion; 'no_number' only '10' and it."""
    ddb = Dynamo(moto_server)
    expected: dict[tuple[str, str], dict] = {}

    async def make():
        integ = f"moto_{uuid.uuid4().hex[:6]}"
        await shoal_module.create_integration(integ, moto_server)
        for kind, av in COMPANIONS.items():
            for variant in VARIANTS:
                table = f"{cname(kind, variant)}_{uuid.uuid4().hex[:6]}"
                ddb.create_table(table)
                items = {"s10": {"S": "10"}, "n10": {"N": "10"}, "other": av}
                if variant == "no_number":
                    del items["n10"]
                ddb.batch_write(table, [{"pk": {"S": k}, "mixed": v} for k, v in items.items()])
                await shoal_module.create_collection(cname(kind, variant), integ, table)
                expected[kind, variant] = items
        for kind, variant in expected:
            await shoal_module.wait_ready(cname(kind, variant))

    run_in_thread(make)
    return expected


async def ids(shoal: ShoalProcess, coll: str, where: str, params=None) -> list[str]:
    rows = await shoal.query(f"SELECT _id FROM commons.{coll} WHERE {where} ORDER BY _id", params)
    return [r["_id"] for r in rows]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", list(COMPANIONS))
async def test_equality_respects_type(shoal_module: ShoalProcess, typed_collections, kind, variant):
    """`mixed = 10` finds only the number, `mixed = '10'` only the string, whatever else the
    field holds in other rows (and even when no row holds a number at all)."""
    shoal, coll = shoal_module, cname(kind, variant)
    number = ["n10"] if variant == "with_number" else []
    rows = await shoal.query(f"SELECT COUNT(*) AS n FROM commons.{coll}")
    assert rows == [{"n": len(typed_collections[kind, variant])}], rows
    assert await ids(shoal, coll, "mixed = 10") == number, "mixed = 10"
    assert await ids(shoal, coll, "mixed = '10'") == ["s10"], "mixed = '10'"
    assert await ids(shoal, coll, "mixed = :v", {"v": 10}) == number, "mixed = :v (int 10)"
    assert await ids(shoal, coll, "mixed = :v", {"v": "10"}) == ["s10"], "mixed = :v (string '10')"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", list(COMPANIONS))
async def test_typeof_per_row(shoal_module: ShoalProcess, typed_collections, kind, variant):
    coll = cname(kind, variant)
    rows = await shoal_module.query(f"SELECT _id, typeof(mixed) AS t FROM commons.{coll}")
    expected = {k: type_name(av) for k, av in typed_collections[kind, variant].items()}
    assert {r["_id"]: r["t"] for r in rows} == expected, rows
