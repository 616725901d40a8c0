"""Bulk load by parallel Scan under a read-capacity budget.

Segments (`Segment`/`TotalSegments`) run concurrently and share one `RcuBudget`, a token
bucket refilled at `rcu` units per second: a segment waits until the bucket is not in debt
before each page, then pays what DynamoDB reports as consumed (`ReturnConsumedCapacity`).
Reads are strongly consistent, as Rockset's were, so no write that DynamoDB acknowledged
before the scan reached an item is missed (1 RCU per 4 KB read).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

Page = list[dict[str, Any]]

# Smaller pages than DynamoDB's 1 MB keep each apply (one refresh) short.
MAX_PAGE_ITEMS = 1000


class RcuBudget:
    """Token bucket of read capacity units, shared by all scan segments of one collection."""

    def __init__(self, rcu_per_second: float) -> None:
        self.rate = float(rcu_per_second)
        self._tokens = self.rate  # one second of burst
        self._last = time.monotonic()
        self.consumed = 0.0

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def wait(self) -> None:
        """Wait until the bucket is out of debt."""
        self._refill()
        while self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)
            self._refill()

    def charge(self, units: float) -> None:
        self._refill()
        self._tokens -= units
        self.consumed += units


async def parallel_scan(
    client: Any,
    table_name: str,
    total_segments: int,
    budget: RcuBudget,
    on_page: Callable[[Page], Awaitable[None]],
) -> None:
    """Scan every segment concurrently, handing each page to `on_page` in segment order."""

    async def scan_segment(segment: int) -> None:
        start_key = None
        while True:
            await budget.wait()
            request: dict[str, Any] = {
                "TableName": table_name,
                "Segment": segment,
                "TotalSegments": total_segments,
                "ConsistentRead": True,
                "ReturnConsumedCapacity": "TOTAL",
                "Limit": MAX_PAGE_ITEMS,
            }
            if start_key:
                request["ExclusiveStartKey"] = start_key
            page = await client.scan(**request)
            budget.charge(page.get("ConsumedCapacity", {}).get("CapacityUnits", 0.0))
            await on_page(page.get("Items", []))
            start_key = page.get("LastEvaluatedKey")
            if not start_key:
                return

    await asyncio.gather(*(scan_segment(segment) for segment in range(total_segments)))


def segments_for(table_size_bytes: int) -> int:
    """One segment per ~256 MB, between 1 and 16 (more would only queue behind the budget)."""
    return max(1, min(16, table_size_bytes // (256 * 2**20) + 1))
