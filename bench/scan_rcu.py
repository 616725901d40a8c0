"""How well Shoal's bulk-load scan keeps to its read budget, against a naive scan.

Everything runs on this machine: moto holds a table of `--items` items of about 1 KB; the
throttling proxy (tests/throttling_proxy.py, a test double) sits in front of it, meters each
Scan page by DynamoDB's item-size rules and throttles like a table provisioned with
`capacity` RCU/s; a real Shoal server bulk-loads the table through the proxy with `rcu` =
`budget`. What the proxy measured is reported:

  achieved ÷ budget   RCU consumed per second of scan ÷ budget          goal ≥ 0.95
  throttled           throttled requests ÷ Scan requests                goal < 1 %
  max 5-s ÷ budget    highest consumption over any 5-s window ÷ budget  goal ≤ 1.10
  items/s             items read ÷ scan duration

Baseline, measured in the same run through the same proxy: the naive pipeline a user might
write, a single-segment boto3 scan with 1 MB pages and botocore's default retries (no budget
at all) whose items go into a DuckDB table. `end to end` is the time until the data is
queryable: the collection ready in Shoal, the DuckDB table created for the pipeline. Two scenarios: the
table has twice the budget (the budget leaves half of it to the application), and the table
has exactly the budget (any overshoot is throttled). Each is run `--runs` times; medians.

    .venv/bin/python bench/scan_rcu.py [--runs 3] [--items 8000] [--budget 100] [--json PATH]

`--json PATH` also writes the figures, every run's, and the RCU metered per second of each
scan (the plot of consumption against the budget) to PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import string
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import duckdb
import pyarrow as pa
from boto3.dynamodb.types import TypeDeserializer
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import AWS_ENV, Dynamo, MotoProcess, ShoalProcess  # noqa: E402
from throttling_proxy import ThrottlingProxy, max_window_rate  # noqa: E402

WINDOW_S = 5.0
BURST_S = 1.0  # of the modelled table (see the proxy's docstring)


def make_items(count: int, item_bytes: int) -> list[dict]:
    rng = random.Random(7)
    note_bytes = max(0, item_bytes - 100)
    return [
        {
            "pk": {"S": f"order-{i:08d}"},
            "customer": {"S": f"customer-{rng.randint(0, 5000)}"},
            "amount": {"N": f"{rng.randint(1, 100000) / 100}"},
            "note": {"S": "".join(rng.choices(string.ascii_letters + " ", k=rng.randint(note_bytes * 4 // 5, note_bytes * 6 // 5)))},
            "lines": {"L": [{"M": {"sku": {"S": f"sku-{rng.randint(0, 999)}"}, "qty": {"N": str(rng.randint(1, 9))}}}
                            for _ in range(rng.randint(1, 4))]},
        }
        for i in range(count)
    ]


def figures(proxy: ThrottlingProxy, budget: float) -> dict[str, float]:
    samples = list(proxy.samples)
    seconds = samples[-1][0] - proxy.first_scan_at
    return {
        "achieved": proxy.consumed / seconds / budget,
        "throttled_pct": 100.0 * proxy.throttled / max(1, proxy.scan_requests),
        "max_window": max_window_rate(samples, WINDOW_S) / budget,
        "items_per_s": proxy.items_read / seconds,
        "seconds": seconds,
    }


def rcu_per_second(proxy: ThrottlingProxy) -> list[float]:
    """RCU the proxy metered in each whole second since the scan's first request."""
    per_second: list[float] = []
    for at, units in list(proxy.samples):
        second = int(at - proxy.first_scan_at)
        per_second.extend([0.0] * (second + 1 - len(per_second)))
        per_second[second] += units
    return per_second


async def shoal_scan(shoal: ShoalProcess, proxy: ThrottlingProxy, table: str, budget: int, items: int) -> dict:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    await shoal.create_collection(name, "proxied", table, rcu=budget)
    collection = await shoal.wait_ready(name, timeout=600)
    end_to_end_s = time.monotonic() - started
    status = collection["sources"][0]["dynamodb"]["status"]
    assert status["scan_records_processed"] == items, status
    assert status["scan_throttled_requests"] == proxy.throttled, (status, proxy.throttled)
    result = figures(proxy, budget) | {"end_to_end_s": end_to_end_s, "first_scan_after_s": proxy.first_scan_at - started}
    r = await shoal.request("DELETE", f"/v1/orgs/self/ws/commons/collections/{name}")
    assert r.status == 200, r
    return result


def naive_pipeline(endpoint: str, table: str) -> tuple[int, float]:
    """What a script without a budget does: one segment, 1 MB pages, botocore's retries, the
    items deserialized by boto3 and loaded into a DuckDB table. (rows in the table, seconds)"""
    started = time.monotonic()
    deserialize = TypeDeserializer().deserialize
    rows = [{name: deserialize(value) for name, value in item.items()} for item in naive_scan(endpoint, table)]
    connection = duckdb.connect()
    connection.register("scanned", pa.Table.from_pylist(rows))
    connection.execute("CREATE TABLE items AS SELECT * FROM scanned")
    count = connection.execute("SELECT count(*) FROM items").fetchone()[0]
    return count, time.monotonic() - started


def naive_scan(endpoint: str, table: str) -> list[dict]:
    """Every item of `table` in DynamoDB JSON, scanned as a script without a budget would."""
    client = boto3.client("dynamodb", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                          aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], config=Config())
    items, request = [], {"TableName": table, "ConsistentRead": True}
    while True:
        try:
            page = client.scan(**request)
        except client.exceptions.ProvisionedThroughputExceededException:
            time.sleep(1.0)  # botocore gave up after its own retries: wait and carry on
            continue
        items.extend(page["Items"])
        if "LastEvaluatedKey" not in page:
            return items
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def line(label: str, f: dict[str, float]) -> str:
    return (f"  {label:<22} achieved÷budget {f['achieved']:5.2f}   throttled {f['throttled_pct']:5.1f} %   "
            f"max 5-s÷budget {f['max_window']:5.2f}   {f['items_per_s']:6.0f} items/s   ({f['seconds']:.1f} s scan, "
            f"{f['end_to_end_s']:.1f} s until queryable"
            + (f", first Scan {f['first_scan_after_s']:.1f} s after the create)" if "first_scan_after_s" in f else ")"))


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--items", type=int, default=8000)
    parser.add_argument("--item-bytes", type=int, default=1000, help="about how large an item is")
    parser.add_argument("--budget", type=int, default=100, help="rcu of the collection (RCU/s)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    scenarios = []

    work = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    moto = MotoProcess(work / "moto.log")
    moto.start()
    shoal = ShoalProcess(work / "data", work / "shoal.log")
    try:
        ddb = Dynamo(moto.url)
        table = "bench_scan"
        ddb.create_table(table)
        ddb.batch_write(table, make_items(args.items, args.item_bytes))
        with ThrottlingProxy(moto.url, args.budget) as proxy:
            shoal.start()
            await shoal.create_integration("proxied", proxy.url)
            for capacity_factor, title in ((2, "table capacity = 2 × budget"), (1, "table capacity = budget")):
                capacity = args.budget * capacity_factor
                print(f"\n{title}: budget {args.budget} RCU/s, table {capacity} RCU/s "
                      f"(burst {BURST_S:g} s), {args.items} items of ~{args.item_bytes} bytes", flush=True)
                ours, naive, our_rcu, naive_rcu = [], [], [], []
                for run in range(args.runs):
                    proxy.set_rate(capacity, BURST_S)
                    proxy.reset_counts()
                    ours.append(await shoal_scan(shoal, proxy, table, args.budget, args.items))
                    our_rcu.append(rcu_per_second(proxy))
                    proxy.set_rate(capacity, BURST_S)
                    proxy.reset_counts()
                    count, end_to_end_s = await asyncio.to_thread(naive_pipeline, proxy.url, table)
                    assert count == args.items, count
                    naive.append(figures(proxy, args.budget) | {"end_to_end_s": end_to_end_s})
                    naive_rcu.append(rcu_per_second(proxy))
                    print(line(f"run {run + 1} Shoal", ours[-1]), flush=True)
                    print(line(f"run {run + 1} naive → DuckDB", naive[-1]), flush=True)
                print(line("median Shoal", medians(ours)))
                print(line("median naive → DuckDB", medians(naive)))
                scenarios.append({
                    "capacity_rcu": capacity, "shoal": medians(ours), "naive_duckdb": medians(naive),
                    "end_to_end_ratio": medians(ours)["end_to_end_s"] / medians(naive)["end_to_end_s"],
                    "shoal_runs": ours, "naive_duckdb_runs": naive,
                    "shoal_rcu_per_s": our_rcu, "naive_duckdb_rcu_per_s": naive_rcu,
                })
        if args.json:
            args.json.write_text(json.dumps({"budget_rcu": args.budget, "items": args.items,
                                             "item_bytes": args.item_bytes, "runs": args.runs, "scenarios": scenarios}))
    finally:
        shoal.stop()
        moto.stop()


if __name__ == "__main__":
    asyncio.run(main())
