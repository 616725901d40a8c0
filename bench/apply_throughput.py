"""Apply throughput: stream records into Arrow + tantivy, beside the cost of decoding them.

    python bench/apply_throughput.py            # 200,000 records, 3 runs per figure
    python bench/apply_throughput.py --quick    # 30,000 records, 3 runs

A synthetic in-process record source (no endpoint, no network): DynamoDB Streams records
shaped as aiobotocore hands them (typed attribute values, `N` as text, a `datetime` in
`ApproximateCreationDateTime`), items of ~300 bytes with strings, integers, decimals, a
bool, a nested map, a list and a string set. The stream is realistic: mostly inserts of new
keys first, then updates of existing keys, and some deletes (REMOVE carries `Keys` and the
`OldImage` only).

Figures (changes/s, median of `--runs` runs):
- decode only: records → `Change` objects through `streams.change_from_record`, the code
  the stream reader runs per record (the floor: what any apply must pay first);
- apply: `Collection.apply` in batches of 1,000 (one shard's GetRecords page) and 10,000
  (several shards or a backlog), into a fresh collection in a temp dir, with every fsync and
  tantivy commit; reported alone and end to end (decode + apply) with the ratio to decode;
- scan: the bulk load's shape (plain items, `Change(..., event="SCAN")`, pages of 1,000
  applied 4 at a time) through the same decode and apply.
- text index alone: the same changes into a fresh tantivy index, 10,000 per commit, as a
  refresh stages them: each batch's last version of an item added, and the ids it replaces
  or deletes removed (what any apply into Arrow + tantivy pays for tantivy: the ceiling it
  sets).
Goal (issue #4): end to end ≥ 50,000 changes/s. `--json PATH` also writes the rows to PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from shoal.index.collection import Change, Collection
from shoal.index.memory import use_system_allocator
from shoal.index.textindex import TextIndex
from shoal.ingest.decode import document_id, item_text
from shoal.ingest.streams import change_from_record

TABLE = "orders"
KEY_NAMES = ("pk",)
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]
CITIES = ["Oslo", "Rome", "Lima", "Kyiv", "Pune", "Cork", "Bern", "Nice"]
STATUSES = ["paid", "shipped", "pending", "cancelled"]
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def synthetic_item(rng: random.Random, key: int, version: int) -> dict[str, dict[str, Any]]:
    """One ~300-byte item in DynamoDB JSON."""
    words = rng.choices(WORDS, k=8)
    return {
        "pk": {"S": f"order-{key:08d}"},
        "customer": {"S": f"customer-{rng.randrange(50_000):06d}"},
        "title": {"S": " ".join(words[:3])},
        "note": {"S": " ".join(words[3:])},
        "status": {"S": STATUSES[(key + version) % 4]},
        "quantity": {"N": str(rng.randrange(1, 100))},
        "amount": {"N": f"{rng.randrange(100, 100_000) / 100:.2f}"},
        "version": {"N": str(version)},
        "express": {"BOOL": rng.random() < 0.3},
        "address": {"M": {
            "city": {"S": rng.choice(CITIES)},
            "zip": {"S": f"{rng.randrange(10_000):04d}"},
            "geo": {"M": {"lat": {"N": f"{rng.uniform(-90, 90):.4f}"}, "lon": {"N": f"{rng.uniform(-180, 180):.4f}"}}},
        }},
        "lines": {"L": [{"M": {"sku": {"S": f"sku-{rng.randrange(1000)}"}, "qty": {"N": str(rng.randrange(1, 5))}}}
                        for _ in range(rng.randrange(1, 3))]},
        "tags": {"SS": sorted(set(rng.choices(WORDS, k=3)))},
    }


def synthetic_records(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """`count` stream records: the first 60% mostly inserts, then updates and ~8% deletes."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    live: list[int] = []
    versions: dict[int, int] = {}
    next_key = 0
    for n in range(count):
        roll = rng.random()
        insert_share = 0.9 if n < count * 0.6 else 0.1
        if not live or roll < insert_share:
            event, key = "INSERT", next_key
            next_key += 1
            live.append(key)
        elif roll < insert_share + 0.08:
            event, key = "REMOVE", live.pop(rng.randrange(len(live)))
        else:
            event, key = "MODIFY", rng.choice(live)
        old = synthetic_item(rng, key, versions.get(key, 0)) if event != "INSERT" else None
        versions[key] = versions.get(key, 0) + 1
        body: dict[str, Any] = {
            "ApproximateCreationDateTime": T0 + dt.timedelta(milliseconds=n),
            "Keys": {"pk": {"S": f"order-{key:08d}"}},
            "SequenceNumber": f"{100_000_000_000_000_000_000 + n}",
            "SizeBytes": 320,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        }
        if event != "REMOVE":
            body["NewImage"] = synthetic_item(rng, key, versions[key])
        if old is not None:
            body["OldImage"] = old
        records.append({"eventID": f"e{n}", "eventName": event, "eventVersion": "1.1",
                        "eventSource": "aws:dynamodb", "awsRegion": "us-east-1", "dynamodb": body})
    return records


def decode_stream(records: list[dict[str, Any]]) -> list[Change]:
    return [change_from_record(record, KEY_NAMES, TABLE) for record in records]


def decode_scan(items: list[dict[str, Any]]) -> list[Change]:
    """What `SourcePipeline._bulk_load`'s `changes_of` does per scanned page."""
    now_us = int(time.time() * 1_000_000)
    meta = {"table": TABLE, "event": "SCAN", "sequence_number": None}
    return [Change(document_id(item, KEY_NAMES), item_text(item), now_us, meta) for item in items]


def text_index_only(directory: Path, changes: list[Change], batch: int) -> None:
    """The tantivy index's share alone: what a refresh stages into it and commits (no Arrow,
    no manifest)."""
    index = TextIndex(directory)
    live: set[str] = set()
    rowid = 0
    try:
        for start in range(0, len(changes), batch):
            latest = {c.id: c for c in changes[start : start + batch]}
            replaced = [doc_id for doc_id in latest if doc_id in live]
            upserts = [c for c in latest.values() if c.item is not None]
            live.difference_update(latest)
            live.update(c.id for c in upserts)
            index.update(replaced, ((c.id, rowid + i, c.item) for i, c in enumerate(upserts)))
            index.commit(start // batch + 1)
            rowid += len(upserts)
    finally:
        index.close()


def timed(function: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds of `function()`."""
    started, cpu_started = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - started, time.process_time() - cpu_started


async def apply_all(directory: Path, sources: list, batch: int, decode: Callable[[list], list[Change]]) -> tuple[float, float, float]:
    """Decode and apply `sources` in batches of `batch` into a new collection; (decode s,
    apply s, CPU s of every thread, tantivy's and the fsyncs' included)."""
    collection = Collection.open(directory)
    decode_s = apply_s = 0.0
    cpu_started = time.process_time()
    try:
        for start in range(0, len(sources), batch):
            started = time.perf_counter()
            changes = decode(sources[start : start + batch])
            decoded = time.perf_counter()
            await collection.apply(changes, {"position": start + batch})
            decode_s += decoded - started
            apply_s += time.perf_counter() - decoded
    finally:
        await collection.close()
    return decode_s, apply_s, time.process_time() - cpu_started


def median_rate(count: int, seconds: list[float]) -> float:
    return count / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30,000 records")
    parser.add_argument("--records", type=int, help="number of stream records (default 200,000)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-scan", action="store_true", help="skip the scan-shaped figures")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    use_system_allocator()  # as `shoal serve` does
    count = args.records or (30_000 if args.quick else 200_000)
    records = synthetic_records(count)
    items = [r["dynamodb"]["NewImage"] for r in records if r["eventName"] == "INSERT"]
    mix = {e: sum(r["eventName"] == e for r in records) for e in ("INSERT", "MODIFY", "REMOVE")}
    # The reader holds one page of records at a time; this bench holds all of them. Keep the
    # garbage collector from walking them again and again (it would charge their number,
    # not the work measured, to every run).
    gc.freeze()
    print(f"machine: {os.cpu_count()} cores; {count:,} stream records {mix}; {args.runs} runs, medians")

    # (label, changes, wall s end to end, apply s or None, decode s, CPU s); medians of the runs
    rows: list[tuple[str, int, float, float | None, float, float]] = []

    def decode_row(label: str, sources: list, decode: Callable[[list], list[Change]]) -> None:
        wall, cpu = zip(*(timed(lambda: decode(sources)) for _ in range(args.runs)))
        rows.append((label, len(sources), statistics.median(wall), None, statistics.median(wall), statistics.median(cpu)))

    decode_row("stream: decode only", records, decode_stream)
    work = Path(tempfile.mkdtemp(prefix="shoal-apply-"))
    try:
        decoded = decode_stream(records)
        wall, cpu = zip(*(timed(lambda: text_index_only(work / f"text-{run}", decoded, 10_000)) for run in range(args.runs)))
        rows.append(("stream: text index alone (tantivy), batches of 10,000", len(records), statistics.median(wall), None,
                     statistics.median(wall), statistics.median(cpu)))
        shapes = [("stream", records, decode_stream, 1_000), ("stream", records, decode_stream, 10_000)]
        if not args.no_scan:
            decode_row("scan: decode only", items, decode_scan)
            shapes.append(("scan", items, decode_scan, 4_000))
        for name, sources, decode, batch in shapes:
            runs = []
            for run in range(args.runs):
                directory = work / f"{name}-{batch}-{run}"
                runs.append(asyncio.run(apply_all(directory, sources, batch, decode)))
                shutil.rmtree(directory)
            decode_s, apply_s, cpu_s = (statistics.median(column) for column in zip(*runs))
            end_to_end = statistics.median(d + a for d, a, _ in runs)
            rows.append((f"{name}: decode + apply, batches of {batch:,}", len(sources), end_to_end, apply_s, decode_s, cpu_s))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print("| path | changes/s end to end | apply alone | decode alone | end to end ÷ decode | CPU µs per change |")
    print("|---|---|---|---|---|---|")
    for label, count, wall, apply_s, decode_s, cpu_s in rows:
        apply_rate = f"{count / apply_s:,.0f}" if apply_s is not None else ""
        ratio = f"{decode_s / wall:.2f}" if apply_s is not None else ""
        print(f"| {label} | {count / wall:,.0f} | {apply_rate} | {count / decode_s:,.0f} | {ratio} | {cpu_s / count * 1e6:.0f} |")
    best = max(count / wall for label, count, wall, apply_s, _, _ in rows if apply_s is not None and label.startswith("stream"))
    print(f"\ngoal: stream end to end ≥ 50,000 changes/s — best here {best:,.0f} ({'met' if best >= 50_000 else 'not met'})")
    # What any end-to-end apply into Arrow + tantivy must spend per change, at the least: the
    # decode and tantivy's own work, each measured alone above (CPU of every thread).
    floor_rows = ("stream: decode only", "stream: text index alone (tantivy), batches of 10,000")
    cpu_floor_us = sum(cpu_s / count * 1e6 for label, count, _, _, _, cpu_s in rows if label in floor_rows)
    cores = os.cpu_count() or 1
    print(f"ceiling: decode + text index alone take {cpu_floor_us:.0f} µs of CPU per change, so no end-to-end "
          f"apply into Arrow + tantivy exceeds {cores * 1e6 / cpu_floor_us:,.0f} changes/s on this machine's {cores} cores")
    if args.json:
        args.json.write_text(json.dumps({"records": count, "runs": args.runs, "mix": mix, "rows": [
            {"path": label, "changes": n, "changes_per_s": n / wall,
             "apply_alone_per_s": n / apply_s if apply_s is not None else None, "decode_alone_per_s": n / decode_s,
             "end_to_end_over_decode": decode_s / wall if apply_s is not None else None, "cpu_us_per_change": cpu_s / n * 1e6}
            for label, n, wall, apply_s, decode_s, cpu_s in rows]}))


if __name__ == "__main__":
    main()
