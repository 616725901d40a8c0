"""Sync lag: from a write acknowledged by the endpoint to the change visible in SQL.

Everything runs on this machine: a moto server (DynamoDB + Streams), the streams double of
the tests (`tests/streams_double.py`) and a real Shoal server, all started here. Writer
threads write new items at a steady rate (100, 500 and 2,000 changes/s by default): about
100 write requests/s in all, each carrying `rate / 100` items, each writer on its own
schedule, sleeping until the planned moment of its next request (a late request goes at
once; the achieved rate is printed). Every item carries its writer `w` and a sequence number
`seq`, increasing per writer; the write's acknowledgement time is recorded when it returns.

Three phases per rate:

- **Shoal through moto**: BatchWriteItem into a moto table that a collection follows. moto
  takes only ~1,200-1,400 writes/s here (shared facts §4), so at 2,000/s asked it is the
  limit, and its own stream lags.
- **baseline**: the same writers on a second moto table, read by a bare GetRecords poller
  (no Shoal) scheduled like Shoal's reader (a full page is read again at once, a page with
  records after the poll interval, an empty one after `idle_wait`), recording when each
  record arrives. The ratio Shoal ÷ baseline is Shoal's own cost: applying (Arrow, tantivy,
  fsync) and answering the probe.
- **Shoal through the streams double**: the writers file INSERT records straight into the
  double's stream (the ack is `add_record` returning: the record is readable then), which a
  third collection follows through the real DynamoDB Streams protocol (its DescribeTable
  and Scan go on to moto). This is the rate Shoal itself sustains, without moto's write
  limit; the stream has two shards, as real DynamoDB's has at least at 2,000 writes/s (one
  partition takes 1,000 WCU).

The visibility probe asks Shoal `SELECT w, MAX(seq) ... GROUP BY w` every `--probe-ms`
(a few ms each, over the whole collection). A writer's items reach the stream in the order
it wrote them and the stream is applied in order, so when MAX(seq) of writer w reaches s,
every item of w up to s is visible. Each item is counted visible when the answer of the first
probe that saw it arrived: an upper bound, at most one probe gap (printed as the probe's
resolution) above the true moment. The first second of each phase is warm-up, not counted.

Also sampled every 0.5 s: the collection's own `stats.sync_lag_ms` (now minus the creation
time of what the stream is read up to). The double, like DynamoDB, stamps records to the
second, so there it reads up to a second higher than the probe.

    .venv/bin/python bench/sync_lag.py --quick     # 5 s per rate and phase
    .venv/bin/python bench/sync_lag.py             # 20 s per rate and phase
    .venv/bin/python bench/sync_lag.py --rates 2000 --seconds 30 --runs 3
    .venv/bin/python bench/sync_lag.py --quick --json lag.json   # also: figures + lag per write over time

Goal (issue #4): p99 < 1 s at 2,000 changes/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from streams_double import StreamsDouble  # noqa: E402
from support import AWS_ENV, LOCAL_NO_PROXY, Dynamo, MotoProcess, ShoalProcess  # noqa: E402

from shoal.ingest.streams import GET_RECORDS_LIMIT, idle_wait  # noqa: E402

REQUESTS_PER_S = 100  # BatchWriteItem requests per second, all writers together
WRITERS = 4
WARM_UP_S = 1.0
PAD = "x" * 100  # about 150 bytes per item in all


# --------------------------------------------------------------------------- writing


@dataclass
class Writes:
    """What the writers did in one phase: per writer, (first seq, last seq, planned, acked)."""

    batches: dict[int, list[tuple[int, int, float, float]]] = field(default_factory=dict)

    def items(self) -> int:
        return sum(last - first + 1 for rows in self.batches.values() for first, last, _, _ in rows)


def boto3_client(service: str, endpoint: str):
    return boto3.client(
        service, endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"max_attempts": 1}, max_pool_connections=2),
    )


def batch_writer(endpoint: str, table: str) -> Callable[[], Callable[[list[dict]], None]]:
    """Per writer thread, a function that writes items to `table` with BatchWriteItem on its
    own connection, retrying what DynamoDB leaves unprocessed; returns once all are acked."""
    def connect() -> Callable[[list[dict]], None]:
        client = boto3_client("dynamodb", endpoint)

        def put(items: list[dict]) -> None:
            pending = {table: [{"PutRequest": {"Item": item}} for item in items]}
            while pending:
                pending = client.batch_write_item(RequestItems=pending).get("UnprocessedItems") or {}
        return put
    return connect


def stream_writer(double: StreamsDouble, stream_arn: str) -> Callable[[], Callable[[list[dict]], None]]:
    """Per writer thread, a function that files items as INSERT records straight into the
    streams double: a record is readable once `add_record` returns (its ack)."""
    def connect() -> Callable[[list[dict]], None]:
        def put(items: list[dict]) -> None:
            for item in items:
                double.add_record(stream_arn, "INSERT", {"pk": item["pk"]}, new_image=item)
        return put
    return connect


def write_steadily(connect: Callable[[], Callable[[list[dict]], None]], rate: float, seconds: float,
                   first_seq: dict[int, int]) -> Writes:
    """`rate` items/s for `seconds` from WRITERS threads, each writing with its own
    `connect()`; returns what was written and when."""
    batch = max(1, round(rate / REQUESTS_PER_S))
    interval = batch / rate  # between two requests of all writers together
    start = time.monotonic() + 0.2
    writes = Writes({w: [] for w in range(WRITERS)})
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        put = connect()
        seq = first_seq.get(w, 0)
        k = 0
        try:
            while True:
                planned = start + (k * WRITERS + w) * interval
                if planned - start >= seconds:
                    return
                delay = planned - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                put([{"pk": {"S": f"{w}-{seq + i}"}, "w": {"N": str(w)}, "seq": {"N": str(seq + i)}, "pad": {"S": PAD}}
                     for i in range(batch)])
                writes.batches[w].append((seq, seq + batch - 1, planned, time.monotonic()))
                seq += batch
                k += 1
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for w, rows in writes.batches.items():
        if rows:
            first_seq[w] = rows[-1][1] + 1
    return writes


# --------------------------------------------------------------------------- seeing


class Probe(threading.Thread):
    """Polls something for each writer's highest visible seq; keeps (asked_at, answered_at,
    {w: max seq}) per poll. Subclasses implement `poll` and `wait`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.polls: list[tuple[float, float, dict[int, int]]] = []
        self.best: dict[int, int] = {}  # highest seq seen so far, per writer
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                asked = time.monotonic()
                seen = self.poll()
                self.polls.append((asked, time.monotonic(), seen))
                for w, s in seen.items():
                    self.best[w] = max(self.best.get(w, -1), s)
                self.stopping.wait(self.wait(seen))
        except BaseException as error:  # noqa: BLE001 - reported by stop()
            self.error = error

    def poll(self) -> dict[int, int]:
        raise NotImplementedError

    def wait(self, seen: dict[int, int]) -> float:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        if self.error is not None:
            raise self.error

    def seen_all(self, writes: Writes) -> bool:
        best = dict(self.best)
        return all(best.get(w, -1) >= rows[-1][1] for w, rows in writes.batches.items() if rows)

    def resolution_ms(self) -> float | None:
        """Median gap between one poll's question and the next poll's answer: how far an
        item's counted visibility may lie after its true one (None: exact)."""
        gaps = [b[1] - a[0] for a, b in zip(self.polls, self.polls[1:])]
        return 1000 * statistics.median(gaps) if gaps else float("nan")


class SqlProbe(Probe):
    """`SELECT w, MAX(seq)` through Shoal's query API, every `interval_s`."""

    def __init__(self, shoal: ShoalProcess, collection: str, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        body = {"sql": {"query": f"SELECT w, MAX(seq) AS s FROM commons.{collection} GROUP BY w"}}
        self.request = urllib.request.Request(
            shoal.url + "/v1/orgs/self/queries", data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": f"ApiKey {shoal.key}", "Content-Type": "application/json"},
        )
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def poll(self) -> dict[int, int]:
        try:
            with self.opener.open(self.request, timeout=30) as response:
                rows = json.loads(response.read())["results"]
        except urllib.error.HTTPError as error:
            if error.code == 400 and not self.best:  # before the first write the fields do not exist yet
                return {}
            raise AssertionError(f"probe failed: {error.code} {error.read()[:500]!r}") from None
        return {int(row["w"]): int(row["s"]) for row in rows if row["w"] is not None}

    def wait(self, seen: dict[int, int]) -> float:
        return self.interval_s


class StreamProbe(Probe):
    """The baseline: a bare GetRecords poller on the table's stream, scheduled like Shoal's reader."""

    def __init__(self, endpoint: str, stream_arn: str, poll_s: float) -> None:
        super().__init__()
        self.poll_s = poll_s
        self.client = boto3_client("dynamodbstreams", endpoint)
        shard = self.client.describe_stream(StreamArn=stream_arn)["StreamDescription"]["Shards"][0]["ShardId"]
        self.iterator = self.client.get_shard_iterator(
            StreamArn=stream_arn, ShardId=shard, ShardIteratorType="LATEST")["ShardIterator"]
        self.records = self.empty_reads = 0

    def poll(self) -> dict[int, int]:
        response = self.client.get_records(ShardIterator=self.iterator, Limit=GET_RECORDS_LIMIT)
        self.iterator = response["NextShardIterator"]
        self.records = len(response["Records"])
        seen: dict[int, int] = {}
        for record in response["Records"]:
            image = record["dynamodb"]["NewImage"]
            w, s = int(image["w"]["N"]), int(image["seq"]["N"])
            seen[w] = max(seen.get(w, -1), s)
        return seen

    def resolution_ms(self) -> None:
        return None  # a record is counted when the page that carries it arrives: exact

    def wait(self, seen: dict[int, int]) -> float:
        if self.records >= GET_RECORDS_LIMIT:
            return 0.0
        self.empty_reads = 0 if self.records else self.empty_reads + 1
        return self.poll_s if self.records else idle_wait(self.poll_s, self.empty_reads)


def lags_ms(writes: Writes, probe: Probe, series: list[tuple[float, float]] | None = None) -> list[float]:
    """Per item written after the warm-up: answer time of the first poll that saw it − ack.
    `series` gets (seconds since the phase's start, lag ms) per write request, warm-up included."""
    start = min(rows[0][2] for rows in writes.batches.values() if rows)
    lags: list[float] = []
    for w, rows in writes.batches.items():
        polls = [(answered, seen[w]) for _, answered, seen in probe.polls if w in seen]
        best, i = -1, 0  # running max of seq seen by writer w, walking the polls in time order
        for first, last, planned, acked in rows:
            while best < last and i < len(polls):
                best = max(best, polls[i][1])
                answered = polls[i][0]
                i += 1
            if best < last:
                raise AssertionError(f"writer {w}: seq {last} was never seen")
            if series is not None:
                series.append((planned - start, 1000 * (answered - acked)))
            if planned - start >= WARM_UP_S:
                lags.extend([1000 * (answered - acked)] * (last - first + 1))
    return lags


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- phases


@dataclass
class Phase:
    p50: float
    p99: float
    max: float
    achieved: float  # items per second, first planned write to last acknowledgement
    resolution_ms: float | None
    status_lag_ms: list[int] = field(default_factory=list)
    series: list[tuple[float, float]] = field(default_factory=list)  # (s since start, lag ms) per request


def achieved_rate(writes: Writes) -> float:
    rows = [row for batch in writes.batches.values() for row in batch]
    return writes.items() / (max(r[3] for r in rows) - min(r[2] for r in rows))


async def measure(probe: Probe, write, drain_timeout: float, sample_status=None) -> Phase:
    status: list[int] = []
    stop_sampling = threading.Event()

    def sampler() -> None:
        while not stop_sampling.wait(0.5):
            value = sample_status()
            if value is not None:
                status.append(value)

    probe.start()
    sampling = threading.Thread(target=sampler, daemon=True) if sample_status else None
    if sampling:
        sampling.start()
    try:
        writes = await asyncio.to_thread(write)
        deadline = time.monotonic() + drain_timeout
        while not probe.seen_all(writes):
            if time.monotonic() > deadline:
                raise AssertionError(f"not every write became visible within {drain_timeout:g} s of the last one")
            await asyncio.sleep(0.1)
    finally:
        stop_sampling.set()
        probe.stop()
    series: list[tuple[float, float]] = []
    lags = lags_ms(writes, probe, series)
    return Phase(percentile(lags, 0.5), percentile(lags, 0.99), max(lags), achieved_rate(writes),
                 probe.resolution_ms(), status, sorted(series))


def collection_lag_sampler(shoal: ShoalProcess, collection: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(shoal.url + f"/v1/orgs/self/ws/commons/collections/{collection}",
                                     headers={"Authorization": f"ApiKey {shoal.key}"})

    def sample() -> int | None:
        with opener.open(request, timeout=10) as response:
            return json.loads(response.read())["data"]["stats"]["sync_lag_ms"]
    return sample


def show(label: str, phase: Phase) -> str:
    resolution = "exact" if phase.resolution_ms is None else f"{phase.resolution_ms:.0f} ms"
    text = (f"  {label:<9} p50 {phase.p50:6.0f} ms   p99 {phase.p99:6.0f} ms   max {phase.max:6.0f} ms   "
            f"achieved {phase.achieved:6.0f} changes/s   probe resolution {resolution}")
    if phase.status_lag_ms:
        text += (f"   status sync_lag_ms median {statistics.median(phase.status_lag_ms):.0f}, "
                 f"max {max(phase.status_lag_ms)}")
    return text


async def create_collection(shoal: ShoalProcess, name: str, integration: str, table: str, poll_s: float) -> None:
    body = {"name": name, "sources": [{"integration_name": integration, "dynamodb": {
        "table_name": table, "aws_region": "us-east-1", "use_scan_api": True,
        "settings": {"dynamodb_stream_poll_frequency": f"PT{poll_s:g}S"}}}]}
    created = await shoal.request("POST", "/v1/orgs/self/ws/commons/collections", body)
    assert created.status == 200, created
    await shoal.wait_ready(name)


def medians(phases: list[Phase]) -> tuple[float, float, float]:
    """Median p50, p99 and achieved rate over runs."""
    return tuple(statistics.median(getattr(p, key) for p in phases) for key in ("p50", "p99", "achieved"))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 s per rate and phase")
    parser.add_argument("--seconds", type=float, help="writing time per rate and phase (default 20; 5 with --quick)")
    parser.add_argument("--rates", type=lambda text: [int(r) for r in text.split(",")], default=[100, 500, 2000],
                        help="changes per second, comma-separated (default 100,500,2000)")
    parser.add_argument("--runs", type=int, default=1, help="runs per rate; medians are printed when more than one")
    parser.add_argument("--poll", type=float, default=0.2,
                        help="stream poll interval of the collection and of the baseline, seconds (Shoal's default 0.2)")
    parser.add_argument("--probe-ms", type=float, default=25, help="pause between two SQL probes")
    parser.add_argument("--json", type=Path, help="also write the figures and the lag over time to this file")
    args = parser.parse_args()
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    drain_timeout = 60.0

    work = Path(tempfile.mkdtemp(prefix="shoal-bench-lag-"))
    moto = MotoProcess(work / "moto.log")
    moto.start()
    double = StreamsDouble(moto.url).start()
    shoal = ShoalProcess(work / "data", work / "shoal.log")
    try:
        ddb = Dynamo(moto.url)
        ddb.create_table("lag_shoal")
        baseline_arn = ddb.create_table("lag_baseline")["LatestStreamArn"]
        ddb.create_table("lag_double")
        double_arn = double.mirror("lag_double")
        # Real DynamoDB spreads 2,000 writes/s over at least two partitions (1,000 WCU each),
        # so over two stream shards at least: the double's table has two from the start.
        double.split(double_arn, double.open_shards(double_arn)[0])
        shoal.start()
        await shoal.create_integration("moto", moto.url)
        await shoal.create_integration("double", double.url)
        await create_collection(shoal, "lag", "moto", "lag_shoal", args.poll)
        await create_collection(shoal, "lag_double", "double", "lag_double", args.poll)
        print(f"moto {moto.url}, streams double {double.url}, Shoal {shoal.url}; {WRITERS} writers, "
              f"~{REQUESTS_PER_S} write requests/s, {seconds:g} s per rate and phase, stream poll {args.poll:g} s, "
              f"SQL probe every {args.probe_ms:g} ms; lag = first answer that saw the item − write ack "
              f"(first {WARM_UP_S:g} s not counted)", flush=True)
        seqs: dict[str, dict[int, int]] = {"shoal": {}, "baseline": {}, "double": {}}
        summary, phases = [], []
        for rate in args.rates:
            print(f"\n{rate} changes/s", flush=True)
            ours, bare, direct = [], [], []
            for _ in range(args.runs):
                ours.append(await measure(
                    SqlProbe(shoal, "lag", args.probe_ms / 1000),
                    lambda: write_steadily(batch_writer(moto.url, "lag_shoal"), rate, seconds, seqs["shoal"]),
                    drain_timeout, collection_lag_sampler(shoal, "lag")))
                print(show("Shoal", ours[-1]), flush=True)
                bare.append(await measure(
                    StreamProbe(moto.url, baseline_arn, args.poll),
                    lambda: write_steadily(batch_writer(moto.url, "lag_baseline"), rate, seconds, seqs["baseline"]),
                    drain_timeout))
                print(show("baseline", bare[-1]), flush=True)
                direct.append(await measure(
                    SqlProbe(shoal, "lag_double", args.probe_ms / 1000),
                    lambda: write_steadily(stream_writer(double, double_arn), rate, seconds, seqs["double"]),
                    drain_timeout, collection_lag_sampler(shoal, "lag_double")))
                print(show("double", direct[-1]), flush=True)
            (p50, p99, achieved), (b50, b99, _), (d50, d99, d_achieved) = map(medians, (ours, bare, direct))
            summary.append((rate, achieved, p50, p99, b50, b99, d_achieved, d50, d99))
            phases.append({"rate": rate, "shoal": [asdict(p) for p in ours], "baseline": [asdict(p) for p in bare],
                           "double": [asdict(p) for p in direct]})
        print("\nmedians over runs" if args.runs > 1 else "\nsummary")
        print("  rate     | through moto: achieved  Shoal p50   p99      baseline p50   p99      ratio p50   p99"
              "  | through the streams double: achieved  p50   p99")
        for rate, achieved, p50, p99, b50, b99, d_achieved, d50, d99 in summary:
            print(f"  {rate:>5}/s  | {achieved:7.0f}/s  {p50:7.0f} ms {p99:6.0f} ms   {b50:8.0f} ms {b99:6.0f} ms   "
                  f"{p50 / b50:7.2f}× {p99 / b99:5.2f}×  | {d_achieved:7.0f}/s  {d50:6.0f} ms {d99:6.0f} ms")
        if args.json:
            args.json.write_text(json.dumps({
                "seconds": seconds, "runs": args.runs, "poll_s": args.poll, "probe_ms": args.probe_ms,
                "summary": [{"rate": rate, "achieved": achieved, "shoal_p50_ms": p50, "shoal_p99_ms": p99,
                             "baseline_p50_ms": b50, "baseline_p99_ms": b99, "ratio_p50": p50 / b50, "ratio_p99": p99 / b99,
                             "double_achieved": d_achieved, "double_p50_ms": d50, "double_p99_ms": d99}
                            for rate, achieved, p50, p99, b50, b99, d_achieved, d50, d99 in summary],
                "phases": phases}))
    finally:
        shoal.stop()
        double.stop()
        moto.stop()


if __name__ == "__main__":
    os.environ.setdefault("NO_PROXY", LOCAL_NO_PROXY)  # boto3 talks to 127.0.0.1 only
    asyncio.run(main())
