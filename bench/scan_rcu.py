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

Baseline, measured in the same run through the same proxy: a naive single-segment boto3 scan
with 1 MB pages and botocore's default retries, i.e. no budget at all. Two scenarios: the
table has twice the budget (the budget leaves half of it to the application), and the table
has exactly the budget (any overshoot is throttled). Each is run `--runs` times; medians.

    .venv/bin/python bench/scan_rcu.py [--runs 3] [--items 8000] [--budget 100]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import string
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
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


async def shoal_scan(shoal: ShoalProcess, proxy: ThrottlingProxy, table: str, budget: int, items: int) -> dict:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    await shoal.create_collection(name, "proxied", table, rcu=budget)
    collection = await shoal.wait_ready(name, timeout=600)
    status = collection["sources"][0]["dynamodb"]["status"]
    assert status["scan_records_processed"] == items, status
    assert status["scan_throttled_requests"] == proxy.throttled, (status, proxy.throttled)
    result = figures(proxy, budget)
    r = await shoal.request("DELETE", f"/v1/orgs/self/ws/commons/collections/{name}")
    assert r.status == 200, r
    return result


def naive_scan(endpoint: str, table: str) -> int:
    """What a script without a budget does: one segment, 1 MB pages, botocore's retries."""
    client = boto3.client("dynamodb", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                          aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], config=Config())
    read, request = 0, {"TableName": table, "ConsistentRead": True}
    while True:
        try:
            page = client.scan(**request)
        except client.exceptions.ProvisionedThroughputExceededException:
            time.sleep(1.0)  # botocore gave up after its own retries: wait and carry on
            continue
        read += page["Count"]
        if "LastEvaluatedKey" not in page:
            return read
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def line(label: str, f: dict[str, float]) -> str:
    return (f"  {label:<22} achieved÷budget {f['achieved']:5.2f}   throttled {f['throttled_pct']:5.1f} %   "
            f"max 5-s÷budget {f['max_window']:5.2f}   {f['items_per_s']:6.0f} items/s   ({f['seconds']:.1f} s)")


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--items", type=int, default=8000)
    parser.add_argument("--item-bytes", type=int, default=1000, help="about how large an item is")
    parser.add_argument("--budget", type=int, default=100, help="rcu of the collection (RCU/s)")
    args = parser.parse_args()

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
                ours, naive = [], []
                for run in range(args.runs):
                    proxy.set_rate(capacity, BURST_S)
                    proxy.reset_counts()
                    ours.append(await shoal_scan(shoal, proxy, table, args.budget, args.items))
                    proxy.set_rate(capacity, BURST_S)
                    proxy.reset_counts()
                    assert await asyncio.to_thread(naive_scan, proxy.url, table) == args.items
                    naive.append(figures(proxy, args.budget))
                    print(line(f"run {run + 1} Shoal", ours[-1]), flush=True)
                    print(line(f"run {run + 1} naive scan", naive[-1]), flush=True)
                print(line("median Shoal", medians(ours)))
                print(line("median naive scan", medians(naive)))
    finally:
        shoal.stop()
        moto.stop()


if __name__ == "__main__":
    asyncio.run(main())
