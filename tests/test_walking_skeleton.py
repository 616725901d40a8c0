"""The walking skeleton, end to end: DynamoDB table -> Shoal collection -> SQL.

A real moto endpoint, a real Shoal subprocess, real HTTP.  Every expected answer is computed
here from the items the test wrote (its own model of the table), never read back from Shoal.

Phases of `test_walking_skeleton`:
1. bulk load: ~3,000 items of all ten DynamoDB types (plus one field whose type varies by
   item) written before the collection exists, so they must arrive through the Scan path;
2. SQL checks: COUNT, SUM, GROUP BY, nested fields, point lookup by _id rendering every type,
   typeof() on the mixed field, `mixed = 10` not matching '10', parameters, ORDER BY/LIMIT;
3. live changes: a few hundred puts / UpdateItems / deletes must converge through the stream
   (full comparison of every document); the lag after the last write is printed;
4. crash: SIGKILL, more changes while Shoal is down, restart on the same data dir; it must
   converge without a re-scan and without duplicate _ids;
5. `mixed = 10` must not match the string '10' (and vice versa), checked on the final state.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

from support import (
    Dynamo,
    ShoalProcess,
    compare_collection,
    render,
    render_number,
    type_name,
    wait_until,
)

SEED = 20240930
N_ITEMS = 3000
COLL = "orders"
FQ = f"commons.{COLL}"
CATEGORIES = ["books", "games", "garden", "music", "tools", "toys", "food", "sports"]
CITIES = ["Oslo", "Lima", "Pune", "Kyiv", "Turin", "Osaka"]
WORDS = ["alpha", "beta", "gamma", "delta", "épée", "Zoë", "日本", "x y", "o'brien", "q\"uote"]


# --------------------------------------------------------------------------- data


def doc_id(item: dict) -> str:
    """`_id` of an item of a (pk S, sk N) table: JSON array of the two key texts."""
    return json.dumps([item["pk"]["S"], item["sk"]["N"]], separators=(",", ":"), ensure_ascii=False)


def num_text(rng: random.Random) -> str:
    """A float-valued number text: integer part plus a non-zero multiple of 1/8."""
    return repr(rng.randint(-500, 500) + rng.choice([0.125, 0.25, 0.5, 0.75, 0.875]))


def rand_bytes(rng: random.Random, lo: int = 1, hi: int = 24) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(lo, hi)))


def mixed_value(rng: random.Random) -> dict:
    """`mixed` changes type from item to item; '10' and 10 both occur often."""
    r = rng.random()
    if r < 0.30:
        return {"N": str(rng.randint(0, 19))}
    if r < 0.55:
        return {"S": rng.choice(["10", "abc", "5", "", "ten", "10.0"])}
    if r < 0.65:
        return {"N": num_text(rng)}
    if r < 0.75:
        return {"BOOL": rng.random() < 0.5}
    if r < 0.80:
        return {"NULL": True}
    if r < 0.85:
        return {"B": rand_bytes(rng)}
    if r < 0.90:
        return {"M": {"v": {"N": str(rng.randint(0, 9))}}}
    if r < 0.95:
        return {"L": [{"N": "10"}, {"S": "10"}]}
    return {"N": "1234567890123456789012345.5678901234"}  # 35 digits: a decimal


def list_element(rng: random.Random, depth: int = 0) -> dict:
    kind = rng.choice(["S", "N", "F", "BOOL", "NULL", "B", "M", "L"] if depth < 2 else ["S", "N", "BOOL"])
    if kind == "S":
        return {"S": rng.choice(WORDS)}
    if kind == "N":
        return {"N": str(rng.randint(-1000, 1000))}
    if kind == "F":
        return {"N": num_text(rng)}
    if kind == "BOOL":
        return {"BOOL": rng.random() < 0.5}
    if kind == "NULL":
        return {"NULL": True}
    if kind == "B":
        return {"B": rand_bytes(rng, 1, 8)}
    if kind == "M":
        return {"M": {"k": {"S": rng.choice(WORDS)}, "n": {"N": str(rng.randint(0, 99))},
                      "inner": list_element(rng, depth + 1)}}
    return {"L": [list_element(rng, depth + 1) for _ in range(rng.randint(0, 3))]}


def make_item(rng: random.Random, pk: str, sk: str) -> dict:
    """One item using every DynamoDB type; some attributes are present only sometimes."""
    item: dict = {
        "pk": {"S": pk},
        "sk": {"N": sk},
        "name": {"S": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))},
        "category": {"S": rng.choice(CATEGORIES)},
        "qty": {"N": str(rng.randint(0, 1000))},
        "price": {"N": num_text(rng)},
        "active": {"BOOL": rng.random() < 0.6},
        "avatar": {"B": rand_bytes(rng)},
        "address": {"M": {
            "city": {"S": rng.choice(CITIES)},
            "zip": {"S": f"{rng.randint(0, 99999):05d}"},
            "geo": {"M": {"lat": {"N": num_text(rng)}, "lng": {"N": str(rng.randint(-180, 180))}}},
        }},
        "events": {"L": [list_element(rng) for _ in range(rng.randint(0, 5))]},
        "tags": {"SS": rng.sample(WORDS, rng.randint(1, 4))},
        "scores": {"NS": [str(x) for x in rng.sample(range(-50, 200), rng.randint(1, 4))]
                   + ([num_text(rng)] if rng.random() < 0.3 else [])},
        "blobs": {"BS": sorted({rand_bytes(rng, 1, 6) for _ in range(rng.randint(1, 3))})},
        "mixed": mixed_value(rng),
    }
    if rng.random() < 0.2:
        item["deleted_at"] = {"NULL": True}
    if rng.random() < 0.1:
        item["big"] = {"N": rng.choice([
            "9223372036854775807", "-9223372036854775808",            # int64 limits: int
            "12345678901234567890123456789012345678",                 # 38 digits: decimal
            "0.1234567890123456789012345678901234567",                # 37 digits: decimal
        ])}
    return item


def showcase_item() -> dict:
    """One hand-written item with every type and the edge cases, for the point lookup."""
    return {
        "pk": {"S": "showcase"},
        "sk": {"N": "-5"},
        "name": {"S": "Zoë 日本 \"quoted\" \\ back"},
        "empty_s": {"S": ""},
        "category": {"S": "books"},
        "qty": {"N": "7"},
        "price": {"N": "19.75"},
        "neg": {"N": "-42"},
        "zero": {"N": "0"},
        "int64_max": {"N": "9223372036854775807"},
        "int64_min": {"N": "-9223372036854775808"},
        "beyond_int64": {"N": "123456789012345678901234567890123"},
        "precise": {"N": "3.14159265358979323846264338327950288"},
        "active": {"BOOL": True},
        "inactive": {"BOOL": False},
        "deleted_at": {"NULL": True},
        "avatar": {"B": bytes(range(256))},
        "address": {"M": {
            "city": {"S": "Oslo"},
            "zip": {"S": "00150"},
            "geo": {"M": {"lat": {"N": "59.875"}, "lng": {"N": "10"}}},
            "labels": {"SS": ["home", "work"]},
            "flag": {"BOOL": False},
            "nothing": {"NULL": True},
        }},
        "empty_map": {"M": {}},
        "empty_list": {"L": []},
        "events": {"L": [
            {"S": "x"}, {"N": "1"}, {"N": "2.5"}, {"BOOL": True}, {"NULL": True},
            {"B": b"\x00\xff"}, {"M": {"a": {"L": [{"N": "3"}]}}}, {"L": [{"S": "nested"}]},
        ]},
        "tags": {"SS": ["b", "a", "c"]},
        "scores": {"NS": ["3", "1.5", "-2", "99999999999999999999999999"]},
        "blobs": {"BS": [b"\x01", b"\x02\x03", b"\xff"]},
        "mixed": {"S": "10"},
    }


def initial_items() -> list[dict]:
    rng = random.Random(SEED)
    items = [showcase_item(), make_item(rng, "special", "2.5")]
    for i in range(N_ITEMS - len(items)):
        items.append(make_item(rng, f"u{i % 700:04d}", str(2020 + i // 700)))
    return items


# --------------------------------------------------------------------------- changes


class Workload:
    """Applies random puts / UpdateItems / deletes to DynamoDB and to the test's model."""

    def __init__(self, ddb: Dynamo, table: str, model: dict[str, dict], seed: int):
        self.ddb, self.table, self.model = ddb, table, model
        self.rng = random.Random(seed)
        self.next_key = 10_000
        self.ops = Counter()

    def put_new(self) -> None:
        item = make_item(self.rng, f"n{self.next_key:05d}", str(self.rng.randint(1, 9)))
        self.next_key += 1
        self.ddb.client.put_item(TableName=self.table, Item=item)
        self.model[doc_id(item)] = item
        self.ops["put_new"] += 1

    def overwrite(self) -> None:
        old = self.model[self.rng.choice(sorted(self.model))]
        item = make_item(self.rng, old["pk"]["S"], old["sk"]["N"])
        self.ddb.client.put_item(TableName=self.table, Item=item)
        self.model[doc_id(item)] = item
        self.ops["overwrite"] += 1

    def update(self) -> None:
        item = self.model[self.rng.choice(sorted(self.model))]
        qty, mixed = str(self.rng.randint(0, 1000)), mixed_value(self.rng)
        city, tag = self.rng.choice(CITIES), f"t{self.rng.randint(0, 9)}"
        self.ddb.client.update_item(
            TableName=self.table,
            Key={"pk": item["pk"], "sk": item["sk"]},
            UpdateExpression="SET qty = :q, mixed = :m, address.city = :c "
                             "REMOVE deleted_at ADD tags :t",
            ExpressionAttributeValues={":q": {"N": qty}, ":m": mixed, ":c": {"S": city},
                                       ":t": {"SS": [tag]}},
        )
        item["qty"] = {"N": qty}
        item["mixed"] = mixed
        item["address"]["M"]["city"] = {"S": city}
        item.pop("deleted_at", None)
        item["tags"] = {"SS": sorted(set(item["tags"]["SS"]) | {tag})}
        self.ops["update"] += 1

    def delete(self) -> None:
        key = self.rng.choice(sorted(k for k in self.model if '"showcase"' not in k))
        item = self.model.pop(key)
        self.ddb.client.delete_item(TableName=self.table, Key={"pk": item["pk"], "sk": item["sk"]})
        self.ops["delete"] += 1

    def run(self, n: int, weights: dict[str, int]) -> None:
        names = list(weights)
        for _ in range(n):
            getattr(self, self.rng.choices(names, [weights[k] for k in names])[0])()


# --------------------------------------------------------------------------- checks


async def select_all(shoal: ShoalProcess) -> list[dict]:
    return await shoal.query(f"SELECT * FROM {FQ} LIMIT 100000")


async def wait_converged(shoal: ShoalProcess, model: dict[str, dict], what: str,
                         timeout: float = 60.0, on_poll=None) -> tuple[float, int]:
    """Poll until every document equals the model.  Returns (t, polls): t is the monotonic
    time at which the rows that matched had been read (an upper bound of the moment the
    index converged, at the resolution of one poll), polls how many polls it took."""
    expected_count = len(model)
    expected_sum = sum(int(it["qty"]["N"]) for it in model.values())
    polls = 0

    async def converged():
        nonlocal polls
        polls += 1
        if on_poll is not None:
            await on_poll()
        # Cheap check first; the full comparison only when it already looks right.
        row = (await shoal.query(f"SELECT COUNT(*) AS n, SUM(qty) AS s FROM {FQ}"))[0]
        assert (row["n"], row["s"]) == (expected_count, expected_sum), (
            f"COUNT/SUM(qty) = {row['n']}/{row['s']}, expected {expected_count}/{expected_sum}")
        rows = await select_all(shoal)
        read_at = time.monotonic()
        problems = compare_collection(rows, model)
        assert not problems, "\n".join(problems)
        return read_at

    t = await wait_until(converged, timeout, 0.05, what,
                         describe=lambda: shoal.get_collection(COLL))
    return t, polls


def source_of(coll: dict) -> dict:
    assert len(coll["sources"]) == 1, coll
    return coll["sources"][0]


async def test_walking_skeleton(ddb: Dynamo, moto_server: str, table_name: str,
                                shoal_unstarted: ShoalProcess, record_property):
    """Bulk load, SQL over all types, live changes, crash and restart: all converge."""
    shoal = shoal_unstarted
    # ---- 1. the table exists and is full before Shoal ever sees it
    ddb.create_table(table_name, pk=("pk", "S"), sk=("sk", "N"))
    items = initial_items()
    ddb.batch_write(table_name, items)
    model = {doc_id(it): it for it in items}
    assert len(model) == N_ITEMS, "test data has duplicate keys"
    assert ddb.count(table_name) == N_ITEMS

    shoal.start()
    await shoal.create_integration("moto", moto_server)
    created = await shoal.create_collection(COLL, "moto", table_name)
    assert created["name"] == COLL and created["workspace"] == "commons", created
    assert source_of(created)["dynamodb"]["table_name"] == table_name, created

    coll = await shoal.wait_ready(COLL, timeout=120)
    src = source_of(coll)["dynamodb"]
    assert src["current_status"]["state"] == "PROCESSING_STREAM", coll
    assert src["current_status"]["initial_dump_completion_percentage"] == 100, coll
    assert src["status"]["scan_records_processed"] == N_ITEMS, coll

    async def doc_count_is(n):
        c = await shoal.get_collection(COLL)
        assert c["stats"]["doc_count"] == n, f"doc_count {c['stats']['doc_count']} != {n}"
        return c
    await wait_until(lambda: doc_count_is(N_ITEMS), 30, 0.2, "stats.doc_count after bulk load",
                     describe=lambda: shoal.get_collection(COLL))

    # ---- 2. SQL against independently computed answers
    body = await shoal.query_full(f"SELECT COUNT(*) AS n FROM {FQ}")
    assert body["results"] == [{"n": N_ITEMS}], body
    assert body["collections"] == [FQ], body
    assert [f["name"] for f in body["column_fields"]] == ["n"], body
    assert body["results_total_doc_count"] == 1, body
    assert isinstance(body["stats"]["elapsed_time_ms"], (int, float)), body
    assert body["query_id"], body

    total_qty = sum(int(it["qty"]["N"]) for it in items)
    rows = await shoal.query(f"SELECT SUM(qty) AS s FROM {FQ}")
    assert rows == [{"s": total_qty}] and isinstance(rows[0]["s"], int), rows

    by_cat = Counter(it["category"]["S"] for it in items)
    rows = await shoal.query(
        f"SELECT category, COUNT(*) AS n FROM {FQ} GROUP BY category ORDER BY category")
    assert rows == [{"category": c, "n": by_cat[c]} for c in sorted(by_cat)], rows

    by_city = Counter(it["address"]["M"]["city"]["S"] for it in items)
    rows = await shoal.query(
        f"SELECT address.city AS city, COUNT(*) AS n FROM {FQ} GROUP BY address.city")
    assert {r["city"]: r["n"] for r in rows} == dict(by_city), rows
    rows = await shoal.query(f"SELECT COUNT(*) AS n FROM {FQ} WHERE address['city'] = :c",
                             {"c": "Lima"})
    assert rows == [{"n": by_city["Lima"]}], rows
    north = sum(1 for it in items if float(it["address"]["M"]["geo"]["M"]["lat"]["N"]) > 100.5)
    rows = await shoal.query(f"SELECT COUNT(*) AS n FROM {FQ} WHERE address.geo.lat > :x",
                             {"x": 100.5})
    assert rows == [{"n": north}], rows

    over = sum(1 for it in items if int(it["qty"]["N"]) > 500)
    rows = await shoal.query(f"SELECT COUNT(*) AS n FROM {FQ} WHERE qty > :n", {"n": 500})
    assert rows == [{"n": over}], rows

    top = sorted(items, key=lambda it: (-int(it["qty"]["N"]), doc_id(it)))[:5]
    rows = await shoal.query(f"SELECT _id, qty FROM {FQ} ORDER BY qty DESC, _id LIMIT 5")
    assert rows == [{"_id": doc_id(it), "qty": int(it["qty"]["N"])} for it in top], rows

    # Point lookups: every attribute type rendered per the contract.
    for it in (items[0], items[1], items[2], *[x for x in items if "big" in x][:3]):
        rows = await shoal.query(f"SELECT * FROM {FQ} WHERE _id = :id", {"id": doc_id(it)})
        assert len(rows) == 1, (doc_id(it), rows)
        problems = compare_collection(rows, {doc_id(it): it})
        assert not problems, "\n".join(problems)
        assert rows[0].get("_event_time") is not None, rows[0]
    # A few spelled out, so a reader sees the contract:
    row = (await shoal.query(f"SELECT * FROM {FQ} WHERE _id = :id",
                             {"id": '["showcase","-5"]'}))[0]
    assert row["int64_max"] == 2**63 - 1 and type(row["int64_max"]) is int, row
    assert row["beyond_int64"] == "123456789012345678901234567890123", row
    assert row["price"] == 19.75 and type(row["price"]) is float, row
    assert row["deleted_at"] is None and "deleted_at" in row, row
    assert row["address"]["geo"]["lng"] == 10 and row["empty_map"] == {}, row
    assert sorted(row["tags"]) == ["a", "b", "c"], row

    # typeof() per row matches the Python-side type of what was written.
    expected_types = {doc_id(it): type_name(it["mixed"]) for it in items}
    rows = await shoal.query(f"SELECT _id, typeof(mixed) AS t FROM {FQ} LIMIT 100000")
    got_types = {r["_id"]: r["t"] for r in rows}
    wrong = {k: (got_types.get(k), v) for k, v in expected_types.items() if got_types.get(k) != v}
    assert not wrong, f"{len(wrong)} typeof(mixed) mismatches (got, expected): {list(wrong.items())[:10]}"
    rows = await shoal.query(f"SELECT typeof(mixed) AS t, COUNT(*) AS n FROM {FQ} GROUP BY typeof(mixed)")
    assert {r["t"]: r["n"] for r in rows} == dict(Counter(expected_types.values())), rows

    # Every document, every attribute.
    problems = compare_collection(await select_all(shoal), model)
    assert not problems, "after bulk load:\n" + "\n".join(problems)

    # ---- 3. live changes through the stream
    work = Workload(ddb, table_name, model, seed=SEED + 1)
    work.run(400, {"put_new": 3, "overwrite": 2, "update": 4, "delete": 2})
    last_write = time.monotonic()
    converged_at, polls = await wait_converged(shoal, model, "live changes to converge")
    lag = converged_at - last_write
    assert ddb.count(table_name) == len(model), "test model diverged from DynamoDB"
    print(f"\nlive changes {dict(work.ops)}: converged at most {lag * 1000:.0f} ms after the "
          f"last write ({polls} poll(s); the first poll alone costs a full SELECT *)")
    record_property("live_convergence_lag_ms", round(lag * 1000))
    coll = await shoal.get_collection(COLL)
    print(f"collection after live changes: status={coll['status']} stats={coll['stats']}")
    scanned_before_crash = source_of(coll)["dynamodb"]["status"]["scan_records_processed"]
    assert scanned_before_crash == N_ITEMS, coll

    # ---- 4. crash, changes while down, restart on the same data dir
    shoal.kill()
    count_before = len(model)
    work.run(250, {"put_new": 5, "overwrite": 1, "update": 3, "delete": 2})
    assert len(model) != N_ITEMS and len(model) != count_before, (
        "the table size must change, so a re-scan would show in scan_records_processed")
    assert ddb.count(table_name) == len(model), "test model diverged from DynamoDB"
    restart_t = time.monotonic()
    shoal.start()

    states_seen: list[str] = []

    async def record_state():
        c = await shoal.get_collection(COLL)
        st = source_of(c)["dynamodb"]["current_status"]["state"]
        if not states_seen or states_seen[-1] != st:
            states_seen.append(st)

    await wait_converged(shoal, model, "changes made while Shoal was down to converge",
                         on_poll=record_state)
    print(f"after restart: converged {time.monotonic() - restart_t:.2f}s after start; "
          f"source states seen: {states_seen}")
    coll = await shoal.get_collection(COLL)
    src = source_of(coll)["dynamodb"]
    assert "SCANNING" not in states_seen, f"re-scan after restart: states {states_seen}; {coll}"
    assert src["current_status"]["state"] == "PROCESSING_STREAM", coll
    assert src["status"]["scan_records_processed"] == scanned_before_crash, (
        f"scan_records_processed changed across restart (a re-scan?): {coll}")
    assert coll["status"] == "READY", coll
    await wait_until(lambda: doc_count_is(len(model)), 30, 0.2, "stats.doc_count after restart",
                     describe=lambda: shoal.get_collection(COLL))
    rows = await shoal.query(
        f"SELECT _id, COUNT(*) AS n FROM {FQ} GROUP BY _id HAVING COUNT(*) > 1")
    assert rows == [], f"duplicate _ids after restart: {rows[:10]}"
    rows = await shoal.query(f"SELECT COUNT(*) AS n FROM {FQ}")
    assert rows == [{"n": ddb.count(table_name)}], rows

    # ---- 5. dynamic typing, on the final state (last, so a failure here cannot hide the
    # ingest phases above): the number 10 is not the string '10', and vice versa.
    final = list(model.values())
    int_tens = sorted(doc_id(it) for it in final if it["mixed"] == {"N": "10"})
    str_tens = sorted(doc_id(it) for it in final if it["mixed"] == {"S": "10"})
    assert int_tens and str_tens, "test data should contain both 10 and '10'"
    rows = await shoal.query(f"SELECT _id FROM {FQ} WHERE mixed = 10 ORDER BY _id LIMIT 100000")
    got = [r["_id"] for r in rows]
    assert got == int_tens, (f"mixed = 10 returned {len(got)} rows, expected {len(int_tens)}; "
                             f"wrongly included {sorted(set(got) - set(int_tens))[:5]}")
    rows = await shoal.query(f"SELECT _id FROM {FQ} WHERE mixed = '10' ORDER BY _id LIMIT 100000")
    got = [r["_id"] for r in rows]
    assert got == str_tens, (f"mixed = '10' returned {len(got)} rows, expected {len(str_tens)}; "
                             f"wrongly included {sorted(set(got) - set(str_tens))[:5]}")


async def test_partition_key_only_ids(ddb: Dynamo, moto_server: str, table_name: str,
                                      shoal: ShoalProcess):
    """A table with only a numeric partition key: _id is the number's text; a collection on
    an empty table becomes READY and then receives everything through the stream."""
    ddb.create_table(table_name, pk=("id", "N"))
    await shoal.create_integration("moto", moto_server)
    await shoal.create_collection("nums", "moto", table_name)
    await shoal.wait_ready("nums")

    keys = ["1", "2", "42", "-7", "12.5", "100000000000"]
    for k in keys:
        ddb.client.put_item(TableName=table_name, Item={"id": {"N": k}, "v": {"S": f"v{k}"}})
    ddb.client.delete_item(TableName=table_name, Key={"id": {"N": "2"}})
    ddb.client.update_item(TableName=table_name, Key={"id": {"N": "42"}},
                           UpdateExpression="SET v = :v", ExpressionAttributeValues={":v": {"N": "43"}})
    expected = {k: {"id": {"N": k}, "v": {"S": f"v{k}"}} for k in keys if k != "2"}
    expected["42"]["v"] = {"N": "43"}

    async def converged():
        rows = await shoal.query("SELECT * FROM commons.nums LIMIT 1000")
        problems = compare_collection(rows, expected)
        assert not problems, "\n".join(problems)
        return rows

    rows = await wait_until(converged, 60, 0.1, "stream changes on a pk-only table",
                            describe=lambda: shoal.get_collection("nums"))
    by_id = {r["_id"]: r for r in rows}
    assert by_id["12.5"]["id"] == 12.5 and by_id["-7"]["id"] == -7, rows
    assert by_id["42"]["v"] == render_number("43"), rows
    assert render({"N": "100000000000"}) == by_id["100000000000"]["id"], rows
