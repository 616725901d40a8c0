"""Bulk load by parallel Scan, held to a read-capacity budget, resumable per segment.

`ParallelScan` runs one reader task per unfinished segment (`Segment`/`TotalSegments`,
strongly consistent, as Rockset's were: no write DynamoDB acknowledged before the scan reached
an item is missed) and one writer task. Readers put pages on a queue, at most MAX_PAGES_HELD
read and not yet applied among them (memory stays bounded whatever the segments); the writer takes
whatever pages are waiting, hands their items to `on_batch` together with the `ScanProgress`
that covers exactly those pages (each segment's `LastEvaluatedKey` after its last page in the
batch), and only then counts them as done. A page a reader holds, or one still queued, is in
no saved progress, so a restart reads it again and never skips or double-counts one.

Every request goes through one `ThrottleController` (its docstring explains the design), and
the scan client makes a single attempt per request (`SCAN_CLIENT_CONFIG`): botocore would
otherwise retry throttled requests itself, so the controller would neither see the signal
nor count it, and two backoffs would stack. Every throttle therefore reaches the controller,
which slows down, backs off with jitter, counts it, and retries the same page; a throttle is
never fatal. Any other error ends the scan and is retried by the pipeline from the progress
last saved.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable

from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError

Item = dict[str, Any]

# Error codes that mean "too fast": the table's or the account's throughput, not a fault.
THROTTLE_CODES = frozenset({"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"})

MAX_SEGMENTS = 64
SEGMENT_BYTES = 2**20  # a segment smaller than one full page (1 MB) only adds requests
RCU_PER_SEGMENT = 500  # each segment sustains well over this; the rest is headroom for latency
MIN_SEGMENTS = 4  # so reading overlaps applying, even at a small budget
ASSUMED_ITEM_BYTES = 1024  # when DescribeTable knows no size yet (it updates about every 6 h)

# One attempt per request: throttles belong to ThrottleController (module docstring).
SCAN_CLIENT_CONFIG = AioConfig(
    retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=MAX_SEGMENTS
)

# Without `rcu`: a quarter of a provisioned table's reads, leaving the rest to the application;
# on-demand, a fixed figure well under what a new on-demand table serves at once (12,000 RCU/s).
DEFAULT_PROVISIONED_FRACTION = 0.25
DEFAULT_ON_DEMAND_RCU = 1000

# A batch handed to the collection: one refresh, so not too large.
MAX_BATCH_ITEMS = 5000
# Pages read and not yet applied, at most (up to 1 MB and 1,000 items each, several times that
# as Python values): what a scan holds in memory when applying is slower than reading.
MAX_PAGES_HELD = 24


def default_rcu_budget(table: dict[str, Any]) -> int:
    """The budget when the source names none, from DescribeTable's `Table`.

    Provisioned: 25% of ReadCapacityUnits. On-demand: 1,000 RCU/s, or 25% of the table's
    `OnDemandThroughput.MaxReadRequestUnits` when that cap is lower.
    """
    on_demand = (table.get("BillingModeSummary") or {}).get("BillingMode") == "PAY_PER_REQUEST"
    provisioned = (table.get("ProvisionedThroughput") or {}).get("ReadCapacityUnits") or 0
    if not on_demand and provisioned > 0:
        return max(1, int(provisioned * DEFAULT_PROVISIONED_FRACTION))
    cap = (table.get("OnDemandThroughput") or {}).get("MaxReadRequestUnits") or 0
    if cap > 0:
        return max(1, min(DEFAULT_ON_DEMAND_RCU, int(cap * DEFAULT_PROVISIONED_FRACTION)))
    return DEFAULT_ON_DEMAND_RCU


def table_bytes(table: dict[str, Any]) -> int:
    """DescribeTable's size, or an estimate from the item count while it reports none."""
    return table.get("TableSizeBytes") or table.get("ItemCount", 0) * ASSUMED_ITEM_BYTES


def segments_for(table: dict[str, Any], rcu_budget: float) -> int:
    """TotalSegments: one per MB of table, but no more than the budget can keep busy."""
    by_size = math.ceil(table_bytes(table) / SEGMENT_BYTES)
    by_budget = max(MIN_SEGMENTS, math.ceil(rcu_budget / RCU_PER_SEGMENT))
    return max(1, min(MAX_SEGMENTS, by_size, by_budget))


def rcu_per_item_guess(table: dict[str, Any]) -> float:
    """Strongly consistent cost of an average item, before any page has told us."""
    count = table.get("ItemCount") or 0
    size = table.get("TableSizeBytes") or 0
    average = size / count if count and size else ASSUMED_ITEM_BYTES
    return max(average, 1.0) / 4096


# ---------------------------------------------------------------------------- throttle control


@dataclass(frozen=True)
class Reservation:
    """Permission for one Scan request: its `Limit` and the units held for it."""

    limit: int
    units: float
    sent_at: float


class ThrottleController:
    """Keeps the read consumption of all segments of one scan at `budget` RCU per second.

    Design, in three parts:

    * **Pacing (token bucket with reservations).** Tokens refill at `rate` RCU/s (never above
      the budget) and the bucket holds at most `BURST_SECONDS` of them. Before a request, a
      segment *reserves* the page's expected cost (`acquire`, FIFO among segments), waiting
      while the bucket is in debt; when DynamoDB answers, the reservation is settled against
      the `ConsumedCapacity` it reports, so any error in the estimate is paid by the next
      request. Requests *sent* in any window of T seconds thus consume at most
      rate·T + burst + one page. DynamoDB counts a read when it serves it, though, and when
      it is slow, answers bunch up: so the units reserved but not yet answered are also
      capped at `MAX_IN_FLIGHT_S` of the rate (at least one page may always be in flight).
      That bounds any window's consumption to rate·T plus under a second's worth, and adapts
      the concurrency to the latency (in flight ≈ rate × latency).
    * **Page size.** `Limit` is chosen so that one page costs about `PAGE_SECONDS` of the
      current rate (between `MIN_PAGE_RCU` and DynamoDB's 1 MB page, `MAX_PAGE_RCU`), using
      a moving average of the units per item that DynamoDB reported. Small budgets get small
      pages (smooth consumption), large budgets full pages (few requests); the request rate
      follows from rate ÷ page cost. A segment has one request out at a time, so when few
      segments are left (the end of a scan) or DynamoDB is slow, pages grow until `readers`
      segments can keep up: page ≥ rate × latency × `LATENCY_HEADROOM` ÷ readers.
    * **AIMD on throttling.** A throttled request (`THROTTLE_CODES`: the table or account is
      short of capacity, e.g. because the application is using it) read nothing, so its
      reservation is refunded, but only up to an empty bucket: the table is short *now*.
      The rate is cut to `DECREASE_FACTOR` × the lower of the rate and what DynamoDB actually
      served over the last `DELIVERED_WINDOW_S` (so a budget far above the table's capacity
      converges at the first throttle, not after many cuts), at most once per
      `DECREASE_HOLD_S` so that throttles of several segments at once count as one signal.
      The segment sleeps an exponential backoff with full jitter, then reserves again.
      `INCREASE_AFTER_S` after the last throttle, the rate grows additively by
      `INCREASE_PER_S` of the budget per second, back up to the budget. Throttles are
      counted (`throttled_requests`) and never fatal.
    """

    PAGE_SECONDS = 0.1
    BURST_SECONDS = 0.1
    MAX_IN_FLIGHT_S = 0.5
    LATENCY_HEADROOM = 1.5
    LATENCY_WEIGHT = 0.2  # of the newest answer in the moving average
    MIN_PAGE_RCU = 2.0
    MAX_PAGE_RCU = 256.0  # 1 MB at 4 KB per RCU
    MAX_PAGE_ITEMS = 1000  # keeps one batch's decode short
    DECREASE_FACTOR = 0.7
    DECREASE_HOLD_S = 1.0
    DELIVERED_WINDOW_S = 2.0
    INCREASE_AFTER_S = 1.0
    INCREASE_PER_S = 0.05
    MIN_RATE_FRACTION = 0.02
    BACKOFF_BASE_S = 0.1
    BACKOFF_MAX_S = 10.0
    ITEM_COST_WEIGHT = 0.3  # of the newest page in the moving average
    RATE_WINDOW_S = 10.0

    def __init__(self, budget: float, rcu_per_item: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = float(budget)
        self.rate = self.budget
        self.rcu_per_item = rcu_per_item
        self.consumed = 0.0
        self.throttled_requests = 0
        self.readers = 1  # segments still reading; ParallelScan keeps it current
        self.latency: float | None = None  # moving average, seconds from request to answer
        self._clock = clock
        self._tokens = 0.0
        self._started_at = self._refilled_at = clock()
        self._last_throttle_at = self._last_cut_at = -math.inf
        self._in_flight = 0.0  # units reserved by requests not answered yet
        self._requests_in_flight = 0
        self._turn = asyncio.Lock()
        self._answered = asyncio.Event()
        self._recent: deque[tuple[float, float]] = deque()

    # -- pacing

    def _refill(self) -> None:
        now = self._clock()
        quiet_since = max(self._refilled_at, self._last_throttle_at + self.INCREASE_AFTER_S)
        if now > quiet_since:
            self.rate = min(self.budget, self.rate + self.budget * self.INCREASE_PER_S * (now - quiet_since))
        self._tokens = min(self.rate * self.BURST_SECONDS, self._tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now

    def page_limit(self) -> int:
        """Items per request: a page costs `PAGE_SECONDS` of the rate, or what lets the segments
        still reading keep up with it at the latency seen (the page-size point above)."""
        keep_up = self.rate * (self.latency or 0.0) * self.LATENCY_HEADROOM / max(1, self.readers)
        target = max(self.rate * self.PAGE_SECONDS, keep_up)
        target = min(self.MAX_PAGE_RCU, max(self.MIN_PAGE_RCU, target))
        return max(1, min(self.MAX_PAGE_ITEMS, int(target / self.rcu_per_item)))

    @property
    def in_flight_cap(self) -> float:
        return self.rate * self.MAX_IN_FLIGHT_S

    async def acquire(self) -> Reservation:
        """Wait until the budget allows one more request, and reserve its expected cost."""
        async with self._turn:
            while True:
                self._refill()
                limit = self.page_limit()
                reservation = Reservation(limit, max(1.0, limit * self.rcu_per_item), self._clock())
                if self._tokens < 0:
                    await asyncio.sleep(-self._tokens / self.rate)
                elif self._requests_in_flight and self._in_flight + reservation.units > self.in_flight_cap:
                    self._answered.clear()
                    await self._answered.wait()
                else:
                    break
            self._tokens -= reservation.units
            self._in_flight += reservation.units
            self._requests_in_flight += 1
            return reservation

    def _answer(self, reservation: Reservation) -> None:
        self._in_flight -= reservation.units
        self._requests_in_flight -= 1
        self._answered.set()
        latency = self._clock() - reservation.sent_at
        if self.latency is None:
            self.latency = latency
        self.latency += self.LATENCY_WEIGHT * (latency - self.latency)

    def settle(self, reservation: Reservation, consumed: float | None, items_read: int) -> float:
        """Charge what DynamoDB reported instead of the estimate; return the units counted.

        An endpoint that reports no ConsumedCapacity is charged the estimate.
        """
        units = reservation.units if consumed is None else consumed
        self._answer(reservation)
        self._refill()
        self._tokens += reservation.units - units
        self.consumed += units
        now = self._clock()
        self._recent.append((now, units))
        if consumed is not None and items_read:
            sample = consumed / items_read
            self.rcu_per_item += self.ITEM_COST_WEIGHT * (sample - self.rcu_per_item)
        return units

    def throttled(self, reservation: Reservation, attempt: int) -> float:
        """Record a throttled request; return how long its segment should wait (s)."""
        self._answer(reservation)
        self.throttled_requests += 1
        now = self._clock()
        # Nothing was read, so nothing is charged; but the table is short right now, so the
        # refund never lets the next request through at once.
        self._tokens = min(0.0, self._tokens + reservation.units)
        if now - self._last_cut_at >= self.DECREASE_HOLD_S:
            self._last_cut_at = now
            basis, history = self.rate, min(self.DELIVERED_WINDOW_S, now - self._started_at)
            if history >= self.DECREASE_HOLD_S:  # else too little to tell
                basis = min(basis, self._consumed_rate(history))
            self.rate = max(self.budget * self.MIN_RATE_FRACTION, basis * self.DECREASE_FACTOR)
        self._last_throttle_at = now
        return random.uniform(0, min(self.BACKOFF_MAX_S, self.BACKOFF_BASE_S * 2**attempt))

    def recent_rate(self) -> float:
        """RCU/s consumed over the last `RATE_WINDOW_S` seconds (for the status)."""
        return self._consumed_rate(min(self.RATE_WINDOW_S, self._clock() - self._started_at))

    def _consumed_rate(self, seconds: float) -> float:
        now = self._clock()
        while self._recent and self._recent[0][0] < now - self.RATE_WINDOW_S:
            self._recent.popleft()
        if seconds <= 0:
            return 0.0
        return sum(units for at, units in self._recent if at >= now - seconds) / seconds


# ---------------------------------------------------------------------------- progress


def _key_to_json(key: dict[str, Any] | None) -> dict[str, Any] | None:
    """A LastEvaluatedKey as JSON: key attributes are S, N or B, and B (bytes) goes as base64."""
    if key is None:
        return None
    return {
        name: {"B": base64.b64encode(value["B"]).decode("ascii")} if "B" in value else value
        for name, value in key.items()
    }


def _key_from_json(key: dict[str, Any] | None) -> dict[str, Any] | None:
    if key is None:
        return None
    return {name: {"B": base64.b64decode(value["B"])} if "B" in value else value for name, value in key.items()}


@dataclass(frozen=True)
class SegmentProgress:
    next_key: dict[str, Any] | None = None  # ExclusiveStartKey of the next page, as JSON
    done: bool = False

    @property
    def start_key(self) -> dict[str, Any] | None:
        """`next_key` as botocore takes it."""
        return _key_from_json(self.next_key)


@dataclass(frozen=True)
class ScanProgress:
    """How far a scan's *applied* pages reach: saved in the checkpoint with those pages."""

    segments: tuple[SegmentProgress, ...]
    records_processed: int = 0
    consumed_rcu: float = 0.0
    throttled_requests: int = 0

    @classmethod
    def start(cls, total_segments: int) -> "ScanProgress":
        return cls(tuple(SegmentProgress() for _ in range(total_segments)))

    @property
    def total_segments(self) -> int:
        return len(self.segments)

    @property
    def done(self) -> bool:
        return all(segment.done for segment in self.segments)

    def advanced(self, pages: list["ScanPage"]) -> "ScanProgress":
        """This progress plus `pages` (in the order each segment read them)."""
        segments = list(self.segments)
        for page in pages:
            segments[page.segment] = SegmentProgress(_key_to_json(page.next_key), page.next_key is None)
        return replace(
            self,
            segments=tuple(segments),
            records_processed=self.records_processed + sum(len(page.items) for page in pages),
            consumed_rcu=self.consumed_rcu + sum(page.consumed_rcu for page in pages),
            throttled_requests=self.throttled_requests + sum(page.throttles for page in pages),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "total_segments": self.total_segments,
            "segments": [{"next_key": s.next_key, "done": s.done} for s in self.segments],
            "records_processed": self.records_processed,
            "consumed_rcu": round(self.consumed_rcu, 1),
            "throttled_requests": self.throttled_requests,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ScanProgress":
        return cls(
            tuple(SegmentProgress(s["next_key"], s["done"]) for s in data["segments"]),
            data.get("records_processed", 0),
            data.get("consumed_rcu", 0.0),
            data.get("throttled_requests", 0),
        )


@dataclass(frozen=True)
class ScanPage:
    segment: int
    items: list[Item]
    next_key: dict[str, Any] | None  # LastEvaluatedKey as botocore gives it; None: segment finished
    consumed_rcu: float
    throttles: int  # throttled attempts before this page was read


# ---------------------------------------------------------------------------- the scan


class ParallelScan:
    """One scan of `table_name` from `progress` on; `run` returns when every segment is done."""

    def __init__(self, client: Any, table_name: str, controller: ThrottleController, progress: ScanProgress) -> None:
        self.client = client
        self.table_name = table_name
        self.controller = controller
        self.progress = progress  # what the batches handed to `on_batch` so far cover
        self._queue: asyncio.Queue[ScanPage] = asyncio.Queue()
        self._pages_held = asyncio.Semaphore(MAX_PAGES_HELD)  # taken before a page is read, given back once applied

    async def run(self, on_batch: Callable[[list[Item], ScanProgress], Awaitable[None]]) -> None:
        """Read every unfinished segment; `on_batch(items, progress)` must persist `items`
        together with `progress` (which covers them and everything before)."""
        pending = [index for index, segment in enumerate(self.progress.segments) if not segment.done]
        if not pending:
            return
        self.controller.readers = len(pending)
        try:
            async with asyncio.TaskGroup() as group:
                for index in pending:
                    group.create_task(self._read_segment(index, self.progress.segments[index].start_key))
                group.create_task(self._write(len(pending), on_batch))
        except ExceptionGroup as failure:
            raise failure.exceptions[0] from None

    async def _read_segment(self, segment: int, start_key: dict[str, Any] | None) -> None:
        request: dict[str, Any] = {
            "TableName": self.table_name,
            "Segment": segment,
            "TotalSegments": self.progress.total_segments,
            "ConsistentRead": True,
            "ReturnConsumedCapacity": "TOTAL",
        }
        key = start_key
        while True:
            await self._pages_held.acquire()
            page, reservation, throttles = await self._read_page(request, key)
            consumed = (page.get("ConsumedCapacity") or {}).get("CapacityUnits")
            items = page.get("Items", [])
            units = self.controller.settle(reservation, consumed, page.get("ScannedCount", len(items)))
            key = page.get("LastEvaluatedKey")
            await self._queue.put(ScanPage(segment, items, key, units, throttles))
            if key is None:
                self.controller.readers -= 1
                return

    async def _read_page(self, request: dict[str, Any], key: dict[str, Any] | None) -> tuple[dict, Reservation, int]:
        """One page, retried for as long as DynamoDB throttles it."""
        throttles = 0
        while True:
            reservation = await self.controller.acquire()
            arguments = {**request, "Limit": reservation.limit}
            if key is not None:
                arguments["ExclusiveStartKey"] = key
            try:
                return await self.client.scan(**arguments), reservation, throttles
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in THROTTLE_CODES:
                    raise
                throttles += 1
                await asyncio.sleep(self.controller.throttled(reservation, throttles))

    async def _write(self, segments: int, on_batch: Callable[[list[Item], ScanProgress], Awaitable[None]]) -> None:
        finished = 0
        while finished < segments:
            pages = [await self._queue.get()]
            items = len(pages[0].items)
            while not self._queue.empty() and items < MAX_BATCH_ITEMS:
                pages.append(self._queue.get_nowait())
                items += len(pages[-1].items)
            progress = self.progress.advanced(pages)
            await on_batch([item for page in pages for item in page.items], progress)
            self.progress = progress
            for _ in pages:
                self._pages_held.release()
            finished += sum(page.next_key is None for page in pages)
