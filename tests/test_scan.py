"""The bulk load's scan path: read budget, throttling, resumption after a crash.

Real parts only: moto in server mode holds the table; `ThrottlingProxy` (a test double in
front of moto, see its docstring) meters every Scan page by DynamoDB's item-size rules and
throttles like a provisioned table, because moto does neither. The controller tests run
`ParallelScan` in this process against the proxy; the end-to-end tests run the Shoal server
and read its collection over HTTP. Every expectation comes from the items written here and
from what the proxy measured, never from Shoal's own account.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid

import orjson
import pytest

from shoal.ingest.aws import AwsAccess
from shoal.ingest.scan import (
    MAX_PAGES_HELD,
    SCAN_CLIENT_CONFIG,
    ParallelScan,
    ScanPage,
    ScanProgress,
    ThrottleController,
    default_rcu_budget,
    rcu_per_item_guess,
    segments_for,
)
from support import AWS_ENV, Dynamo, ShoalProcess, b64, compare_collection, wait_until
from throttling_proxy import ThrottlingProxy, item_size, max_window_rate, scan_capacity

N_ITEMS = 3000
COLL = "scanned"
UNLIMITED_RCU = 1_000_000  # a proxy that never throttles, but still meters


# --------------------------------------------------------------------------- the table


def make_item(rng: random.Random, i: int) -> dict:
    """About 500 bytes. (Not a binary sort key: moto's stream records encode binary `Keys`
    twice, which would break the stream replay that follows the scan.)"""
    return {
        "pk": {"S": f"p{i % 700:04d}"},
        "sk": {"N": str(i)},
        "blob": {"B": i.to_bytes(4, "big")},
        "n": {"N": str(rng.randint(-10**9, 10**9))},
        "text": {"S": "".join(rng.choices("abcdefghij klmnopqrstuvwxyzé", k=rng.randint(300, 500)))},
        "flag": {"BOOL": rng.random() < 0.5},
        "tags": {"SS": rng.sample(["red", "green", "blue", "cyan", "teal"], rng.randint(1, 3))},
        "m": {"M": {"x": {"N": str(i)}, "l": {"L": [{"S": "a"}, {"NULL": True}]}}},
    }


def doc_id(item: dict) -> str:
    return json.dumps([item["pk"]["S"], item["sk"]["N"]], separators=(",", ":"))


@pytest.fixture(scope="module")
def table(moto_server: str) -> tuple[str, dict[str, dict]]:
    """A table of N_ITEMS items shared (read-only) by this module: (name, {_id: item})."""
    ddb = Dynamo(moto_server)
    name = f"scan_{uuid.uuid4().hex[:10]}"
    ddb.create_table(name, pk=("pk", "S"), sk=("sk", "N"))
    rng = random.Random(3)
    items = [make_item(rng, i) for i in range(N_ITEMS)]
    ddb.batch_write(name, items)
    return name, {doc_id(item): item for item in items}


@pytest.fixture
def proxy(moto_server: str):
    with ThrottlingProxy(moto_server, UNLIMITED_RCU) as running:
        yield running


def describe(moto_server: str, name: str) -> dict:
    return Dynamo(moto_server).client.describe_table(TableName=name)["Table"]


def access(endpoint: str) -> AwsAccess:
    return AwsAccess(AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"], endpoint_url=endpoint)


async def scan_in_process(endpoint: str, table: dict, budget: float) -> tuple[list[dict], ThrottleController, float]:
    """Run a whole ParallelScan through `endpoint`; return the items in the order handed over,
    the controller, and the seconds it took. Checks that each batch's progress covers it."""
    controller = ThrottleController(budget, rcu_per_item_guess(table))
    progress = ScanProgress.start(segments_for(table, budget))
    received: list[dict] = []

    async def on_batch(items: list[dict], covered: ScanProgress) -> None:
        received.extend(items)
        assert covered.records_processed == len(received), "progress does not cover exactly the batches"

    started = time.monotonic()
    async with access(endpoint).client("dynamodb", "us-east-1", SCAN_CLIENT_CONFIG) as client:
        scanner = ParallelScan(client, table["TableName"], controller, progress)
        await scanner.run(on_batch)
    assert scanner.progress.done and scanner.progress.total_segments == progress.total_segments
    return received, controller, time.monotonic() - started


def assert_each_item_once(received: list[dict], model: dict[str, dict]) -> None:
    ids = [doc_id(item) for item in received]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} items handed over twice"
    assert set(ids) == set(model), f"missing {len(set(model) - set(ids))}, unexpected {len(set(ids) - set(model))}"


# --------------------------------------------------------------------------- the test double


def test_proxy_sizes_items_by_dynamodb_rules():
    """Examples worked by hand from DynamoDB's item-size rules (CapacityUnitCalculations)."""
    assert item_size({"id": {"S": "abc"}}) == 2 + 3
    assert item_size({"n": {"N": "-0012.3400"}}) == 1 + (2 + 1)  # digits 1234: 2 bytes, +1
    assert item_size({"n": {"N": "1E+3"}}) == 1 + (1 + 1)
    assert item_size({"b": {"B": b64(b"\x00" * 10)}}) == 1 + 10  # raw bytes, not base64 text
    assert item_size({"t": {"BOOL": True}, "z": {"NULL": True}}) == (1 + 1) + (1 + 1)
    assert item_size({"l": {"L": []}}) == 1 + 3
    # a map: 3 bytes, and per entry 1 byte, its name and its value
    assert item_size({"m": {"M": {"ab": {"S": "xyz"}, "c": {"N": "5"}}}}) == 1 + 3 + (1 + 2 + 3) + (1 + 1 + 2)
    assert item_size({"s": {"SS": ["é", "ab"]}, "ns": {"NS": ["10", "3"]}}) == (1 + 2 + 2) + (2 + 2 + 2)
    # a page: sizes summed, then rounded up to 4 KB; at least one unit; half when eventual
    page = [{"k": {"S": "x" * 2047}}] * 3  # 3 × 2048 bytes = 1.5 × 4 KB
    assert scan_capacity(page, consistent=True) == 2.0
    assert scan_capacity(page, consistent=False) == 1.0
    assert scan_capacity([], consistent=True) == 1.0


# --------------------------------------------------------------------------- the controller


async def test_controller_arithmetic():
    """Page sizing, settling, AIMD and backoff on a clock the test moves."""
    now = [100.0]
    controller = ThrottleController(100, rcu_per_item=0.25, clock=lambda: now[0])
    page_rcu = 100 * ThrottleController.PAGE_SECONDS
    assert controller.page_limit() == page_rcu / 0.25

    reservation = await controller.acquire()
    assert reservation.limit == page_rcu / 0.25 and reservation.units == page_rcu
    controller.settle(reservation, consumed=page_rcu * 1.5, items_read=reservation.limit)
    assert controller.consumed == page_rcu * 1.5
    assert controller.rcu_per_item == pytest.approx(0.25 + 0.3 * (1.5 * 0.25 - 0.25))

    # multiplicative decrease, once per episode, from the rate while history is short
    now[0] += 0.15  # the debt of the page above is paid
    controller.throttled(await controller.acquire(), attempt=1)
    assert controller.rate == pytest.approx(70) and controller.throttled_requests == 1
    now[0] += 0.5
    controller.throttled(await controller.acquire(), attempt=2)
    assert controller.rate == pytest.approx(70) and controller.throttled_requests == 2
    assert controller.page_limit() < reservation.limit, "pages shrink with the rate"

    # additive increase, once throttles have stopped for a second, up to the budget
    now[0] += 0.9
    controller._refill()
    assert controller.rate == pytest.approx(70)
    now[0] += 4.0  # 3.9 s of them more than a second after the last throttle
    controller._refill()
    assert controller.rate == pytest.approx(70 + 100 * 0.05 * 3.9)
    now[0] += 60.0
    controller._refill()
    assert controller.rate == 100, "the rate never exceeds the budget"

    # with history, the cut starts from what DynamoDB served: 30 RCU in the last 2 s
    controller.settle(await controller.acquire(), consumed=30.0, items_read=100)
    now[0] += 1.0
    controller.throttled(await controller.acquire(), attempt=1)
    assert controller.rate == pytest.approx(15 * 0.7)
    for attempt in range(1, 12):
        now[0] += 10.0  # the bucket refills, so acquire does not wait
        assert 0 <= controller.throttled(await controller.acquire(), attempt) <= ThrottleController.BACKOFF_MAX_S
    assert controller.rate >= 100 * ThrottleController.MIN_RATE_FRACTION


def test_progress_checkpoint_round_trip():
    """A LastEvaluatedKey with a binary key survives JSON, and a batch's progress covers it."""
    key = {"pk": {"S": "a"}, "sk": {"B": b"\x00\xff"}}
    pages = [ScanPage(1, [{}] * 5, key, 2.0, 1), ScanPage(0, [{}] * 3, None, 1.0, 0)]
    progress = ScanProgress.start(2).advanced(pages)
    restored = ScanProgress.from_json(orjson.loads(orjson.dumps(progress.to_json())))
    assert restored == progress
    assert restored.records_processed == 8 and restored.throttled_requests == 1
    assert restored.segments[0].done and not restored.segments[1].done
    assert restored.segments[1].start_key == key


def test_default_budget_and_segments(moto_server: str):
    ddb = Dynamo(moto_server)
    name = f"prov_{uuid.uuid4().hex[:8]}"
    ddb.client.create_table(
        TableName=name, AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}], BillingMode="PROVISIONED",
        ProvisionedThroughput={"ReadCapacityUnits": 400, "WriteCapacityUnits": 5})
    provisioned = describe(moto_server, name)
    assert default_rcu_budget(provisioned) == 100  # a quarter of the table's reads
    on_demand = {**provisioned, "BillingModeSummary": {"BillingMode": "PAY_PER_REQUEST"},
                 "ProvisionedThroughput": {"ReadCapacityUnits": 0}}
    assert default_rcu_budget(on_demand) == 1000
    assert default_rcu_budget({**on_demand, "OnDemandThroughput": {"MaxReadRequestUnits": 2000}}) == 500

    assert segments_for({"TableSizeBytes": 0, "ItemCount": 0}, 1000) == 1
    assert segments_for({"TableSizeBytes": 3 * 2**20 + 1, "ItemCount": 10}, 1000) == 4
    assert segments_for({"TableSizeBytes": 100 * 2**30, "ItemCount": 10}, 100) == 4  # budget-bound
    assert segments_for({"TableSizeBytes": 100 * 2**30, "ItemCount": 10}, 10_000) == 20
    assert segments_for({"TableSizeBytes": 0, "ItemCount": 2500}, 1000) == 3  # size unknown: count × 1 KB


async def test_scan_holds_budget_and_hands_over_each_item_once(moto_server, table, proxy):
    """A budget well below what a free scan uses: the scan finishes, every item arrives once,
    and the consumption the proxy measured stays within the budget."""
    name, model = table
    description = describe(moto_server, name)
    budget = 60
    received, controller, seconds = await scan_in_process(proxy.url, description, budget)
    assert_each_item_once(received, model)
    assert proxy.throttled == 0 and controller.throttled_requests == 0
    assert proxy.items_read == N_ITEMS, "items read more than once"
    assert controller.consumed == pytest.approx(proxy.consumed), "the controller counts what DynamoDB reports"
    achieved = proxy.consumed / seconds
    print(f"\nbudget {budget} RCU/s: achieved {achieved:.1f} RCU/s over {seconds:.1f} s, "
          f"max 5-s window {max_window_rate(proxy.samples, 5.0):.1f} RCU/s, {proxy.scan_requests} requests")
    assert achieved <= budget * 1.05, f"over budget: {achieved:.1f} RCU/s"
    assert achieved >= budget * 0.7, f"the scan left most of its budget unused: {achieved:.1f} RCU/s"
    assert max_window_rate(proxy.samples, 5.0) <= budget * 1.15


async def test_a_slow_apply_keeps_few_pages_in_memory(moto_server, table, proxy):
    """Applying slower than 64 segments read: the scan reads at most MAX_PAGES_HELD pages ahead
    of what was applied (each up to 1 MB), not a page or more per segment."""
    name, model = table
    description = describe(moto_server, name)
    controller = ThrottleController(UNLIMITED_RCU, rcu_per_item_guess(description))
    received: list[dict] = []
    read_while_applying: list[int] = []

    async def slow_on_batch(items: list[dict], covered: ScanProgress) -> None:
        if not received:
            await asyncio.sleep(1.0)  # the first apply is slow: every segment could read meanwhile
            read_while_applying.append(proxy.scan_requests)
        received.extend(items)

    async with access(proxy.url).client("dynamodb", "us-east-1", SCAN_CLIENT_CONFIG) as client:
        await ParallelScan(client, name, controller, ScanProgress.start(64)).run(slow_on_batch)
    assert_each_item_once(received, model)
    assert proxy.scan_requests >= 64 and read_while_applying[0] <= MAX_PAGES_HELD, read_while_applying


async def test_throttles_are_survived_counted_and_slow_the_scan(moto_server, table, proxy):
    """The table has less capacity than the budget: the proxy throttles, the controller sees
    every throttle (botocore does not retry them), backs off, and the scan still completes."""
    name, model = table
    capacity, budget = 60, 240
    proxy.set_rate(capacity, burst_seconds=0.5)
    received, controller, seconds = await scan_in_process(proxy.url, describe(moto_server, name), budget)
    assert_each_item_once(received, model)
    assert proxy.throttled > 0, "the proxy never throttled: the test does not test anything"
    assert controller.throttled_requests == proxy.throttled, "a throttle was retried out of the controller's sight"
    assert controller.rate < budget, "AIMD did not lower the rate"
    achieved = proxy.consumed / seconds
    print(f"\ncapacity {capacity}, budget {budget}: {proxy.throttled}/{proxy.scan_requests} requests throttled, "
          f"achieved {achieved:.1f} RCU/s, controller rate now {controller.rate:.0f}")
    assert achieved >= capacity * 0.5, f"AIMD collapsed: {achieved:.1f} RCU/s of {capacity}"
    assert proxy.throttled < proxy.scan_requests * 0.5


# --------------------------------------------------------------------------- Shoal end to end


def source_status(collection: dict) -> dict:
    return collection["sources"][0]["dynamodb"]["status"]


async def assert_collection_equals(shoal: ShoalProcess, model: dict[str, dict]) -> None:
    rows = await shoal.query(f"SELECT * FROM commons.{COLL}", limit=N_ITEMS + 100)
    problems = compare_collection(rows, model)
    assert not problems, "\n".join(problems)


async def test_shoal_scan_counts_throttles_in_its_status(table, proxy, shoal: ShoalProcess):
    name, model = table
    # Throttles as the table would answer them when over its capacity, but independent of how
    # fast this machine lets the scan go (under load it may never reach a capacity).
    proxy.forced_throttles = 6
    await shoal.create_integration("proxied", proxy.url)
    await shoal.create_collection(COLL, "proxied", name, rcu=150)
    collection = await shoal.wait_ready(COLL, timeout=60)
    status = source_status(collection)
    assert status["scan_records_processed"] == N_ITEMS, status
    assert status["scan_rcu_budget"] == 150, status
    assert proxy.throttled == 6 and proxy.forced_throttles == 0, proxy.throttled
    assert status["scan_throttled_requests"] == 6, status
    assert 0 < status["scan_rcu_per_second"] <= 150, status
    assert collection["sources"][0]["status"]["message"] is None, collection  # throttles are not errors
    await assert_collection_equals(shoal, model)


def saved_checkpoint(shoal: ShoalProcess) -> dict:
    manifest = shoal.data_dir / "collections" / "commons" / COLL / "index" / "manifest.json"
    return orjson.loads(manifest.read_bytes())["checkpoint"]


async def test_scan_resumes_after_kill_from_each_segment(table, proxy, shoal: ShoalProcess):
    """SIGKILL mid-scan, restart: the scan continues where each segment's applied pages end,
    reads only the rest of the table, and the collection equals the table."""
    name, model = table
    await shoal.create_integration("proxied", proxy.url)
    await shoal.create_collection(COLL, "proxied", name, rcu=50)

    async def scanned_a_third():
        status = source_status(await shoal.get_collection(COLL))
        return status["scan_records_processed"] >= N_ITEMS // 3
    await wait_until(scanned_a_third, 30, 0.1, "a third of the scan", describe=lambda: shoal.get_collection(COLL))
    shoal.kill()
    time.sleep(0.5)  # requests the proxy was serving when Shoal died
    read_before = proxy.items_read
    checkpoint = saved_checkpoint(shoal)
    scan = checkpoint["scan"]
    assert checkpoint["phase"] == "scan", checkpoint
    assert 0 < scan["records_processed"] < N_ITEMS, scan
    assert scan["total_segments"] > 1 and not all(s["done"] for s in scan["segments"]), scan

    shoal.start()
    status = source_status(await shoal.get_collection(COLL))
    assert status["scan_records_processed"] >= scan["records_processed"], ("restarted from zero", status)
    collection = await shoal.wait_ready(COLL, timeout=60)
    read_after = proxy.items_read - read_before
    assert read_after == N_ITEMS - scan["records_processed"], (
        f"after the restart the scan read {read_after} items; the checkpoint left "
        f"{N_ITEMS - scan['records_processed']} to read")
    assert source_status(collection)["scan_records_processed"] == N_ITEMS, collection
    await assert_collection_equals(shoal, model)
