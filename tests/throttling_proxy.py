"""A test double: a DynamoDB endpoint that meters and throttles Scan like a provisioned table.

moto never throttles and reports a constant ConsumedCapacity (docs: shared facts §4), so the
scan's throttle controller cannot be tested against it alone. `ThrottlingProxy` listens on
loopback, speaks DynamoDB's JSON protocol (POST /, `X-Amz-Target: DynamoDB_20120810.<Op>`),
forwards every request to moto unchanged and passes the answer back. For `Scan` it models
what moto lacks:

* **Cost.** A Scan page costs the sum of the sizes of the items it read, rounded up to the
  next 4 KB: 1 RCU per 4 KB when strongly consistent, 0.5 when eventually consistent, and at
  least that one unit per request. Item sizes follow DynamoDB's published rules
  (`item_size`). The response's ConsumedCapacity is rewritten with this figure in the form
  the request asked for (TOTAL, INDEXES, or none), and `x-amz-crc32` is recomputed.
* **Provisioned throughput.** One token bucket per table, filled at `rcu_per_second` and
  holding at most `burst_seconds` of it. DynamoDB keeps up to 300 s of unused capacity for
  bursts; a short burst here keeps tests short while behaving the same way otherwise. As in
  DynamoDB, a request is admitted while the bucket is not empty and pays its real cost once
  read, so the bucket can go into debt.
* **Throttling.** A Scan arriving at an empty bucket never reaches moto: the answer is HTTP
  400 with `{"__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
  "message": ...}`, DynamoDB's wire format, so botocore raises the real `ClientError`.

Only Scan is metered; every other operation (and DynamoDB Streams) passes through free. A Scan
with a filter, a projection or `Select` is charged by DynamoDB for items it does not return,
which this double cannot see, so it refuses those (400 ValidationException) rather than
mis-model them. Everything it served is recorded (`scan_requests`, `throttled`, `items_read`,
`samples` of (time, units)) for the tests and bench/scan_rcu.py to measure.

It runs its own event loop in a thread, so blocking calls in a test (starting a server,
boto3) never stall the requests it serves.
"""

from __future__ import annotations

import base64
import math
import time
import zlib
from typing import Any

import orjson
from aiohttp import web

from support import LoopbackServer

SCAN_TARGET = "DynamoDB_20120810.Scan"
THROTTLE_TYPE = "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException"
VALIDATION_TYPE = "com.amazon.coral.validate#ValidationException"
UNMODELLED_SCAN_FIELDS = ("FilterExpression", "ScanFilter", "ProjectionExpression", "AttributesToGet", "Select")
CAPACITY_UNIT_BYTES = 4096


# ---------------------------------------------------------------------------- item sizes


def number_size(text: str) -> int:
    """1 byte per two significant digits (leading and trailing zeros trimmed), plus 1."""
    mantissa = text.lstrip("+-").lower().split("e")[0].replace(".", "")
    digits = len(mantissa.strip("0"))
    return math.ceil(digits / 2) + 1


def value_size(value: dict[str, Any]) -> int:
    """Size of one attribute value in DynamoDB JSON (`{"S": "x"}`), without its name.

    Strings count their UTF-8 bytes, binaries their raw bytes, numbers as `number_size`,
    booleans and nulls 1 byte, sets the sum of their elements; a list or map costs 3 bytes
    plus, per element, 1 byte and the element (and a map entry its name's bytes)."""
    ((tag, raw),) = value.items()
    if tag == "S":
        return len(raw.encode())
    if tag == "N":
        return number_size(raw)
    if tag == "B":
        return len(base64.b64decode(raw))
    if tag in ("BOOL", "NULL"):
        return 1
    if tag == "SS":
        return sum(len(s.encode()) for s in raw)
    if tag == "NS":
        return sum(number_size(n) for n in raw)
    if tag == "BS":
        return sum(len(base64.b64decode(b)) for b in raw)
    if tag == "L":
        return 3 + sum(1 + value_size(element) for element in raw)
    if tag == "M":
        return 3 + sum(len(name.encode()) + 1 + value_size(element) for name, element in raw.items())
    raise ValueError(f"unknown DynamoDB type {tag!r}")


def item_size(item: dict[str, Any]) -> int:
    """Size of an item as DynamoDB counts it: attribute names plus values."""
    return sum(len(name.encode()) + value_size(value) for name, value in item.items())


def scan_capacity(items: list[dict[str, Any]], consistent: bool) -> float:
    """Read units of one Scan page: item sizes summed, then rounded up to 4 KB."""
    units = max(1, math.ceil(sum(item_size(item) for item in items) / CAPACITY_UNIT_BYTES))
    return float(units) if consistent else units / 2


# ---------------------------------------------------------------------------- the proxy


class ThrottlingProxy(LoopbackServer):
    """See the module docstring. `start()` returns once it listens on `url`; `stop()` ends it."""

    name = "throttling proxy"

    def __init__(self, target_url: str, rcu_per_second: float, burst_seconds: float = 1.0) -> None:
        super().__init__()
        self.target_url = target_url.rstrip("/")
        self.rcu_per_second = float(rcu_per_second)
        self.burst_seconds = burst_seconds
        self._buckets: dict[str, tuple[float, float]] = {}  # table → (tokens, refilled at)
        self.reset_counts()

    # -- measurements (written by the proxy's thread; ints and list appends are safe to read)

    def reset_counts(self) -> None:
        self.scan_requests = 0
        self.throttled = 0
        self.forced_throttles = 0  # the next Scan requests to throttle whatever the bucket holds
        self.items_read = 0
        self.samples: list[tuple[float, float]] = []  # (monotonic time of the answer, units)
        self.first_scan_at: float | None = None

    @property
    def consumed(self) -> float:
        return sum(units for _, units in list(self.samples))

    def set_rate(self, rcu_per_second: float, burst_seconds: float | None = None) -> None:
        """Change the modelled capacity; every table's bucket starts full again."""
        self.rcu_per_second = float(rcu_per_second)
        if burst_seconds is not None:
            self.burst_seconds = burst_seconds
        self._buckets = {}

    # -- requests

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("X-Amz-Target") != SCAN_TARGET:
            status, headers, answer = await self._forward(request, body)
            return web.Response(status=status, body=answer, headers=headers)
        return await self._scan(request, body)

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.post(self.target_url + "/", data=body, headers=headers) as response:
            answer = await response.read()
            kept = {k: v for k, v in response.headers.items()
                    if k.lower() in ("content-type", "x-amzn-requestid", "x-amz-crc32")}
            return response.status, kept, answer

    async def _scan(self, request: web.Request, body: bytes) -> web.Response:
        scan = orjson.loads(body)
        unmodelled = [name for name in UNMODELLED_SCAN_FIELDS if name in scan]
        if unmodelled:
            return _error(VALIDATION_TYPE, f"the throttling proxy does not model Scan with {', '.join(unmodelled)}")
        self.scan_requests += 1
        if self.first_scan_at is None:
            self.first_scan_at = time.monotonic()
        table = scan["TableName"]
        if self._tokens(table) <= 0 or self.forced_throttles > 0:
            self.forced_throttles = max(0, self.forced_throttles - 1)
            self.throttled += 1
            return _error(THROTTLE_TYPE, "The level of configured provisioned throughput for the table was exceeded. "
                                         "Consider increasing your provisioning level with the UpdateTable API.")
        status, headers, answer = await self._forward(request, body)
        if status != 200:
            return web.Response(status=status, body=answer, headers=headers)
        page = orjson.loads(answer)
        items = page.get("Items", [])
        units = scan_capacity(items, bool(scan.get("ConsistentRead")))
        tokens, refilled_at = self._buckets[table]
        self._buckets[table] = (tokens - units, refilled_at)
        self.items_read += len(items)
        self.samples.append((time.monotonic(), units))
        mode = scan.get("ReturnConsumedCapacity", "NONE")
        page.pop("ConsumedCapacity", None)
        if mode in ("TOTAL", "INDEXES"):
            page["ConsumedCapacity"] = {"TableName": table, "CapacityUnits": units}
            if mode == "INDEXES":
                page["ConsumedCapacity"]["Table"] = {"CapacityUnits": units}
        rewritten = orjson.dumps(page)
        headers["x-amz-crc32"] = str(zlib.crc32(rewritten))
        return web.Response(status=200, body=rewritten, headers=headers)

    def _tokens(self, table: str) -> float:
        """The table's bucket, refilled up to now."""
        now = time.monotonic()
        capacity = self.rcu_per_second * self.burst_seconds
        tokens, refilled_at = self._buckets.get(table, (capacity, now))
        tokens = min(capacity, tokens + (now - refilled_at) * self.rcu_per_second)
        self._buckets[table] = (tokens, now)
        return tokens


def _error(error_type: str, message: str) -> web.Response:
    return web.Response(
        status=400,
        body=orjson.dumps({"__type": error_type, "message": message}),
        headers={"Content-Type": "application/x-amz-json-1.0"},
    )


# ---------------------------------------------------------------------------- measurements


def max_window_rate(samples: list[tuple[float, float]], window_s: float) -> float:
    """The highest consumption (units/s) over any `window_s`-long window between the first and
    the last sample (the whole span's average when it is shorter than one window)."""
    if not samples:
        return 0.0
    end = samples[-1][0]
    if end - samples[0][0] < window_s:
        return sum(units for _, units in samples) / window_s
    best = running = 0.0
    right = 0
    for t0, units in samples:
        if t0 + window_s > end:
            break
        while right < len(samples) and samples[right][0] < t0 + window_s:
            running += samples[right][1]
            right += 1
        best = max(best, running / window_s)
        running -= units  # the window moves past this sample
    return best
