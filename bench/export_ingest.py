"""Export ingest throughput: gzip DynamoDB-JSON export files into a queryable collection.

    python bench/export_ingest.py                 # 200,000 and 1,000,000 items, 3 runs / 1 run
    python bench/export_ingest.py --items 200000 --runs 3
    python bench/export_ingest.py --profile       # also: where a load's time goes (py-spy, all threads)

Files as DynamoDB's export writes them (`{"Item": {...}}` per line, gzip, 50,000 items per
file), ~300-byte items of strings, numbers (integers and decimals), a bool, a nested map, a
list and a string set, in a temp dir. Per size, in the same run (medians of `--runs`):

- floor: read + gunzip + `orjson.loads` of every line (the least any loader must do);
- text index alone: the same items into a fresh tantivy index, 10,000 per commit, as a
  refresh stages them (`apply_throughput.text_index_only`; decoded beforehand, not timed):
  the ceiling that indexing every field in tantivy sets on this machine, whatever the rest
  of the load costs;
- load: `shoal.ingest.export.ExportLoader` over the same files (local reads instead of S3;
  the same decode in worker threads, the same hand-off) with `Collection.apply` in a fresh
  collection, checkpoint and all, as `SourcePipeline._export_load` runs it; the result is
  checked to be queryable (doc count and a DataFusion GROUP BY over its snapshot).

Each load runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; it is compared
with the collection's final Arrow size (`Collection.total_size`, as the API reports it). Goals (issue #3):
≥ 100,000 items/s; peak memory < 3 × the Arrow size for 1M items. `--json PATH` also
writes the figures per size, with each load's items applied over time, to PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from shoal.index.collection import Collection
from shoal.index.memory import use_system_allocator
from shoal.ingest.export import CHUNK_BYTES, ExportFile, ExportLoader, FileBatch, export_decoder, to_ranges

from apply_throughput import text_index_only

ITEMS_PER_FILE = 50_000
KEY_NAMES = ("pk",)
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]
STATUSES = ["paid", "shipped", "pending", "cancelled"]


def item(rng: random.Random, key: int) -> dict:
    """One item in DynamoDB JSON, about 300 bytes as an export line."""
    words = rng.choices(WORDS, k=7)
    return {
        "pk": {"S": f"order-{key:09d}"},
        "customer": {"S": f"customer-{rng.randrange(50_000):06d}"},
        "title": {"S": " ".join(words[:4])},
        "status": {"S": STATUSES[key % 4]},
        "quantity": {"N": str(rng.randrange(1, 100))},
        "price": {"N": f"{rng.randrange(1, 100_000)}.{rng.randrange(100):02d}"},
        "paid": {"BOOL": rng.random() < 0.7},
        "address": {"M": {"city": {"S": rng.choice(WORDS).title()}, "zip": {"N": str(rng.randrange(10_000, 99_999))}}},
        "lines": {"L": [{"N": str(rng.randrange(1000))}, {"S": rng.choice(WORDS)}]},
        "tags": {"SS": rng.sample(WORDS, 2)},
    }


def write_files(directory: Path, items: int) -> list[Path]:
    rng = random.Random(7)
    paths = []
    for first in range(0, items, ITEMS_PER_FILE):
        path = directory / f"part-{first // ITEMS_PER_FILE:05d}.json.gz"
        lines = b"".join(orjson.dumps({"Item": item(rng, key)}) + b"\n"
                         for key in range(first, min(items, first + ITEMS_PER_FILE)))
        path.write_bytes(gzip.compress(lines, compresslevel=6))
        paths.append(path)
    return paths


def floor(paths: list[Path]) -> float:
    """Seconds to read, gunzip and orjson-parse every line."""
    started = time.perf_counter()
    for path in paths:
        with gzip.open(path, "rb") as lines:
            for line in lines:
                orjson.loads(line)
    return time.perf_counter() - started


async def load(paths: list[Path], directory: Path) -> tuple[float, int, int]:
    """Seconds to load the files into a fresh collection; its doc count and Arrow bytes."""
    collection = Collection.open(directory)
    files = [ExportFile(str(path), None, None) for path in paths]
    done: set[int] = set()
    progress: list[tuple[float, int]] = []  # (seconds since the start, items applied): the rate over time

    async def chunks(key: str):
        with open(key, "rb") as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
                yield chunk

    async def apply(batches: list[FileBatch]) -> None:
        done.update(batch.index for batch in batches if batch.items_in_file is not None)
        checkpoint = {"phase": "scan", "scan": {"export": {"done": to_ranges(done)}}}
        await collection.apply([change for batch in batches for change in batch.changes], checkpoint)
        progress.append((time.perf_counter() - started, collection.doc_count))

    started = time.perf_counter()
    await ExportLoader(chunks, export_decoder(KEY_NAMES, "bench")).run(enumerate(files), apply)
    seconds = time.perf_counter() - started
    count, size = collection.doc_count, collection.total_size
    check_queryable(collection, count)
    await collection.close()
    return seconds, count, size, progress


def text_index_alone(paths: list[Path], work: Path) -> tuple[float, float]:
    """Wall and CPU seconds (every thread's) to stage and commit the files' items into a fresh
    tantivy index, alone."""
    decode = export_decoder(KEY_NAMES, "bench")
    changes = []
    for path in paths:
        with gzip.open(path, "rb") as lines:
            changes += decode(lines.read().splitlines())
    directory = work / f"text-{time.monotonic_ns()}"
    started, cpu_started = time.perf_counter(), time.process_time()
    text_index_only(directory, changes, 10_000)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    shutil.rmtree(directory, ignore_errors=True)
    return seconds, cpu


def check_queryable(collection: Collection, count: int) -> None:
    import pyarrow as pa
    from datafusion import SessionContext

    snapshot = collection.snapshot()
    context = SessionContext()
    context.register_record_batches("t", [[b for b in snapshot.batches() if b.num_rows]])
    rows = pa.Table.from_batches(context.sql("SELECT status, count(*) AS n FROM t GROUP BY status").collect())
    assert sum(rows.column("n").to_pylist()) == count, rows


def child(paths: list[str], directory: str) -> None:
    """One load in this fresh process, set up as `shoal serve` sets up its own; prints JSON
    with its figures."""
    use_system_allocator()
    cpu_started = time.process_time()
    seconds, count, size, progress = asyncio.run(load([Path(p) for p in paths], Path(directory)))
    cpu = time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "count": count, "arrow_bytes": size, "peak_rss": peak,
                      "progress": progress}))


def run_load(paths: list[Path], work: Path, profile: bool = False) -> dict:
    directory = work / f"collection-{time.monotonic_ns()}"
    command = [sys.executable, __file__, "--child", str(directory), *map(str, paths)]
    stacks = work / "stacks.txt"
    py_spy = Path(sys.executable).with_name("py-spy")
    if profile and not py_spy.exists():
        raise SystemExit("--profile needs py-spy in the venv: .venv/bin/pip install py-spy")
    if profile:  # py-spy samples every thread (the decode runs in workers, apply in another)
        command = [str(py_spy), "record", "--format", "raw", "--rate", "50",
                   "--threads", "--nonblocking", "-o", str(stacks), "--", *command]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"load failed:\n{out.stderr[-4000:]}")
    shutil.rmtree(directory, ignore_errors=True)
    if profile:
        print_profile(stacks)
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


def print_profile(stacks: Path) -> None:
    """Share of samples per innermost Shoal/library frame, and per thread, from py-spy's raw stacks."""
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        parts = frames.split(";")
        threads[parts[0][:60]] += samples
        own[parts[-1][:110]] += samples
    print(f"  profile: {total} samples; threads: " + ", ".join(f"{t} {n / total:.0%}" for t, n in threads.most_common(6)))
    for frame, samples in own.most_common(22):
        print(f"    {samples / total:6.1%}  {frame}")


def bench(items: int, runs: int, profile: bool) -> dict:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = write_files(work, items)
        gz_bytes = sum(p.stat().st_size for p in paths)
        floors = [floor(paths) for _ in range(runs)]
        text_runs = [text_index_alone(paths, work) for _ in range(runs)]
        text_alone = items / statistics.median(wall for wall, _ in text_runs)
        text_cpu_us = 1e6 * statistics.median(cpu for _, cpu in text_runs) / items
        loads = [run_load(paths, work) for _ in range(runs)]
        assert all(result["count"] == items for result in loads), loads
        load_cpu_us = 1e6 * statistics.median(r["cpu_seconds"] for r in loads) / items
        floor_rate = items / statistics.median(floors)
        load_rate = items / statistics.median(r["seconds"] for r in loads)
        peak = statistics.median(r["peak_rss"] for r in loads)
        arrow = loads[0]["arrow_bytes"]
        print(f"\n{items:,} items in {len(paths)} files ({gz_bytes / 2**20:.0f} MiB gzip), {runs} run(s):")
        print(f"  floor (read + gunzip + orjson): {floor_rate:>10,.0f} items/s")
        print(f"  text index alone (tantivy):     {text_alone:>10,.0f} items/s   CPU {text_cpu_us:.1f} µs per item, "
              f"so at most {cores * 1e6 / text_cpu_us:,.0f} items/s on {cores} cores")
        print(f"  load into a collection:         {load_rate:>10,.0f} items/s   CPU {load_cpu_us:.1f} µs per item; "
              f"ratio to floor {load_rate / floor_rate:.2f}, to the text index alone {load_rate / text_alone:.2f}   "
              f"goal 100,000: {'met' if load_rate >= 100_000 else 'NOT met'}")
        print(f"  peak RSS {peak / 2**20:,.0f} MiB, final Arrow size {arrow / 2**20:,.0f} MiB: "
              f"{peak / arrow:.2f} x   (goal < 3 x)")
        if profile:
            run_load(paths, work, profile=True)
        return {"items": items, "runs": runs, "gzip_bytes": gz_bytes, "floor_items_per_s": floor_rate,
                "text_index_alone_items_per_s": text_alone, "load_over_text_index_alone": load_rate / text_alone,
                "text_index_alone_cpu_us_per_item": text_cpu_us, "load_cpu_us_per_item": load_cpu_us,
                "load_items_per_s": load_rate, "load_over_floor": load_rate / floor_rate, "peak_rss_bytes": peak,
                "arrow_bytes": arrow, "peak_rss_over_arrow": peak / arrow, "loads": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, action="append", help="items per size (repeatable)")
    parser.add_argument("--runs", type=int, help="runs per figure (default: 3 for 200k, 1 above)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(rest, args.child)
        return
    sizes = [bench(items, args.runs or (3 if items <= 200_000 else 1), args.profile)
             for items in args.items or [200_000, 1_000_000]]
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes}))


if __name__ == "__main__":
    main()
