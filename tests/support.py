"""Shared pieces of the end-to-end tests: real processes, real HTTP, real DynamoDB API.

Nothing here mocks Shoal or DynamoDB.  `ShoalProcess` runs the server as a subprocess,
`MotoProcess` runs moto's DynamoDB endpoint as a subprocess, `Dynamo` wraps a boto3 client
for that endpoint, and the `render_*` / `compare_*` functions compute, independently of
Shoal, what a query should return for the items a test wrote.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import inspect
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import boto3
from aiohttp import web
from botocore.config import Config

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
LOCAL_NO_PROXY = "127.0.0.1,localhost"
STARTUP_TIMEOUT = 20.0


def free_port() -> int:
    """A port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(AWS_ENV)
    env["NO_PROXY"] = env["no_proxy"] = LOCAL_NO_PROXY
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(path: Path, lines: int = 200) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"
    return "\n".join(text.splitlines()[-lines:])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group we created for `proc` (start_new_session=True)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.send_signal(sig)


# --------------------------------------------------------------------------- wait_until


async def wait_until(
    cond: Callable[[], Any],
    timeout: float = 60.0,
    interval: float = 0.1,
    what: str = "condition",
    describe: Callable[[], Any] | None = None,
) -> Any:
    """Poll `cond` (sync or async) until it returns something truthy; return that value.

    `cond` may raise AssertionError to explain why it is not true yet; the last explanation
    is shown on timeout together with `describe()` (e.g. the collection's JSON), so a test
    never hangs and always says what it was waiting for.
    """
    deadline = time.monotonic() + timeout
    last_value: Any = None
    last_reason = ""
    while True:
        try:
            value = cond()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last_value, last_reason = value, ""
        except AssertionError as exc:
            last_reason = str(exc)
        if time.monotonic() >= deadline:
            details = ""
            if describe is not None:
                try:
                    d = describe()
                    if inspect.isawaitable(d):
                        d = await d
                    details = d if isinstance(d, str) else json.dumps(d, indent=1, default=str)
                except Exception as exc:  # noqa: BLE001 - best effort diagnostics
                    details = f"<describe() failed: {exc!r}>"
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what}\n"
                f"last value: {last_value!r}\nlast reason: {last_reason}\n{details}"
            )
        await asyncio.sleep(interval)


def run_in_thread(coro_factory: Callable[[], Awaitable[Any]], timeout: float = 180.0) -> Any:
    """Run a coroutine to completion from sync code (e.g. a module-scoped fixture) on a
    fresh event loop in a worker thread, leaving the test's own event loop untouched."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coro_factory())).result(timeout=timeout)


# --------------------------------------------------------------------------- moto


class MotoProcess:
    """moto's server mode as a subprocess: the local DynamoDB + Streams endpoint."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            if _http_ok(self.url + "/moto-api/"):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not come up in {STARTUP_TIMEOUT}s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        _kill_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- Shoal

_DEFAULT_KEY = object()


class Response:
    def __init__(self, status: int, text: str, headers: dict[str, str]):
        self.status = status
        self.text = text
        self.headers = headers
        try:
            self.body: Any = json.loads(text) if text else None
            self.is_json = True
        except ValueError:
            self.body = text
            self.is_json = False

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.text[:2000]!r}>"


class ShoalProcess:
    """The Shoal server as a subprocess on a fixed data dir, with a small HTTP client.

    start()   launch and wait for GET /healthz == 200 (fails with the server's stderr)
    kill()    SIGKILL (the crash test)
    stop()    SIGTERM, then SIGKILL after 10 s
    restart() kill if running, then start again on the same data dir and port
    api()     async request -> (status, parsed JSON body or text)
    """

    def __init__(self, data_dir: Path, log_path: Path, key: str = "test-key-0123456789"):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_path)
        self.key = key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # ---- process control

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "shoal.server.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--api-key", self.key,
        ]

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        assert not self.running, "Shoal is already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== shoal start #{self.starts} {time.strftime('%X')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=subprocess_env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"Shoal exited during start-up with code {self.proc.returncode}; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            if _http_ok(self.url + "/healthz"):
                return
            time.sleep(0.1)
        self.kill()
        raise AssertionError(
            f"Shoal did not answer GET /healthz with 200 within {timeout}s; "
            f"log {self.log_path}:\n{tail(self.log_path)}"
        )

    def kill(self) -> None:
        """SIGKILL: no chance to flush or checkpoint."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _kill_group(self.proc, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _kill_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        # Whatever the group still holds (workers) must not outlive the test.
        _kill_group(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_tail(self, lines: int = 200) -> str:
        return tail(self.log_path, lines)

    # ---- HTTP

    async def request(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        key: Any = _DEFAULT_KEY,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> Response:
        """One HTTP request.  key=None sends no Authorization header; key="x" a wrong one."""
        hdrs = dict(headers or {})
        k = self.key if key is _DEFAULT_KEY else key
        if k is not None:
            hdrs.setdefault("Authorization", f"ApiKey {k}")
        kwargs: dict[str, Any] = {}
        if data is not None:
            kwargs["data"] = data
            hdrs.setdefault("Content-Type", "application/json")
        elif json_body is not None:
            kwargs["json"] = json_body
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.request(method, self.url + path, headers=hdrs, **kwargs) as resp:
                text = await resp.text(errors="replace")
                return Response(resp.status, text, dict(resp.headers))

    async def api(self, method: str, path: str, json: Any = None, **kw: Any) -> tuple[int, Any]:
        r = await self.request(method, path, json, **kw)
        return r.status, r.body

    # ---- Rockset-shaped conveniences

    async def create_integration(self, name: str, endpoint_url: str, **extra: Any) -> dict:
        body = {
            "name": name,
            "dynamodb": {
                "aws_access_key": {
                    "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
                    "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                },
                "endpoint_url": endpoint_url,
            },
            **extra,
        }
        r = await self.request("POST", "/v1/orgs/self/integrations", body)
        assert r.status == 200, f"create integration {name}: {r}"
        return r.body["data"]

    async def create_collection(
        self, name: str, integration: str, table: str, ws: str = "commons", rcu: int = 1000,
        region: str = "us-east-1", poll: str | None = None, **dynamodb: Any,
    ) -> dict:
        """Create a collection (scan bulk load); `poll` sets dynamodb_stream_poll_frequency
        (e.g. "PT0.05S"), `dynamodb` adds source fields (kinesis_stream_arn)."""
        settings = {"settings": {"dynamodb_stream_poll_frequency": poll}} if poll else {}
        body = {
            "name": name,
            "sources": [{
                "integration_name": integration,
                "dynamodb": {
                    "table_name": table, "aws_region": region,
                    "use_scan_api": True, "rcu": rcu, **settings, **dynamodb,
                },
            }],
        }
        r = await self.request("POST", f"/v1/orgs/self/ws/{ws}/collections", body)
        assert r.status == 200, f"create collection {ws}.{name}: {r}"
        return r.body["data"]

    async def get_collection(self, name: str, ws: str = "commons") -> dict:
        r = await self.request("GET", f"/v1/orgs/self/ws/{ws}/collections/{name}")
        assert r.status == 200, f"GET collection {ws}.{name}: {r}"
        return r.body["data"]

    async def wait_ready(self, name: str, ws: str = "commons", timeout: float = 90.0) -> dict:
        async def ready():
            c = await self.get_collection(name, ws)
            return c if c.get("status") == "READY" else None

        return await wait_until(
            ready, timeout, 0.2, f"collection {ws}.{name} to become READY",
            describe=lambda: self.get_collection(name, ws),
        )

    async def query_full(
        self, sql: str, params: dict[str, Any] | None = None, limit: int = 100_000
    ) -> dict:
        body = {"sql": {"query": sql, "default_row_limit": limit}}
        if params:
            body["sql"]["parameters"] = sql_params(params)
        r = await self.request("POST", "/v1/orgs/self/queries", body)
        assert r.status == 200, f"query failed: {sql!r} params={params!r}: {r}"
        assert r.body.get("status") == "COMPLETED", f"query not COMPLETED: {sql!r}: {r}"
        return r.body

    async def query(self, sql: str, params: dict[str, Any] | None = None, limit: int = 100_000) -> list[dict]:
        return (await self.query_full(sql, params, limit))["results"]


def sql_params(params: dict[str, Any]) -> list[dict[str, str]]:
    """Python values -> Rockset query parameters [{name, type, value}] (value is text)."""
    out = []
    for name, v in params.items():
        if isinstance(v, bool):
            out.append({"name": name, "type": "bool", "value": "true" if v else "false"})
        elif isinstance(v, int):
            out.append({"name": name, "type": "int", "value": str(v)})
        elif isinstance(v, float):
            out.append({"name": name, "type": "float", "value": repr(v)})
        else:
            out.append({"name": name, "type": "string", "value": str(v)})
    return out


# --------------------------------------------------------------------------- DynamoDB


class Dynamo:
    """A boto3 DynamoDB client for the moto endpoint plus the few operations tests need."""

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url
        self.client = boto3.client(
            "dynamodb",
            endpoint_url=endpoint_url,
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            config=Config(retries={"max_attempts": 1}),
        )

    def create_table(
        self, name: str, pk: tuple[str, str] = ("pk", "S"), sk: tuple[str, str] | None = None
    ) -> dict:
        """Create a table with a NEW_AND_OLD_IMAGES stream and wait until it is ACTIVE."""
        attrs = [{"AttributeName": pk[0], "AttributeType": pk[1]}]
        schema = [{"AttributeName": pk[0], "KeyType": "HASH"}]
        if sk:
            attrs.append({"AttributeName": sk[0], "AttributeType": sk[1]})
            schema.append({"AttributeName": sk[0], "KeyType": "RANGE"})
        self.client.create_table(
            TableName=name,
            AttributeDefinitions=attrs,
            KeySchema=schema,
            BillingMode="PAY_PER_REQUEST",
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
        )
        deadline = time.monotonic() + 30
        while True:
            desc = self.client.describe_table(TableName=name)["Table"]
            if desc["TableStatus"] == "ACTIVE":
                assert desc.get("LatestStreamArn"), f"table {name} has no stream: {desc}"
                return desc
            assert time.monotonic() < deadline, f"table {name} not ACTIVE: {desc}"
            time.sleep(0.1)

    def batch_write(self, table: str, items: list[dict]) -> None:
        for i in range(0, len(items), 25):
            request = {table: [{"PutRequest": {"Item": it}} for it in items[i:i + 25]]}
            for _attempt in range(20):
                resp = self.client.batch_write_item(RequestItems=request)
                request = resp.get("UnprocessedItems") or {}
                if not request:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"BatchWriteItem kept leaving unprocessed items: {request}")

    def scan_all(self, table: str) -> list[dict]:
        items: list[dict] = []
        kwargs: dict[str, Any] = {"TableName": table}
        while True:
            page = self.client.scan(**kwargs)
            items.extend(page["Items"])
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def count(self, table: str) -> int:
        """Item count by a Select=COUNT scan (exact, unlike DescribeTable's ItemCount)."""
        total = 0
        kwargs: dict[str, Any] = {"TableName": table, "Select": "COUNT"}
        while True:
            page = self.client.scan(**kwargs)
            total += page["Count"]
            if "LastEvaluatedKey" not in page:
                return total
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


# --------------------------------------------------------------------------- expected values

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def render_number(text: str) -> int | float | str:
    """The contract for N: int if integral and within int64, float if the float64's shortest
    text is the same number (`0.1`, `12.50`), otherwise the exact decimal text."""
    d = Decimal(text)
    if d == d.to_integral_value():
        i = int(d)
        if INT64_MIN <= i <= INT64_MAX:
            return i
    f = float(d)
    if math.isfinite(f) and Decimal(repr(f)) == d:
        return f
    return text


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def render(av: dict) -> Any:
    """A DynamoDB AttributeValue (boto3 low-level form) -> the JSON value Shoal should return."""
    (t, v), = av.items()
    if t == "S":
        return v
    if t == "N":
        return render_number(v)
    if t == "B":
        return b64(v)
    if t == "BOOL":
        return v
    if t == "NULL":
        return None
    if t == "M":
        return {k: render(x) for k, x in v.items()}
    if t == "L":
        return [render(x) for x in v]
    if t == "SS":
        return sorted(v)
    if t == "NS":
        return sorted((render_number(x) for x in v), key=lambda n: Decimal(str(n)))
    if t == "BS":
        return sorted(b64(x) for x in v)
    raise ValueError(f"unknown attribute type {t}")


def type_name(av: dict) -> str:
    """What `typeof(field)` should say for this attribute value."""
    (t, v), = av.items()
    if t == "N":
        r = render_number(v)
        return "int" if isinstance(r, int) else "float" if isinstance(r, float) else "decimal"
    return {
        "S": "string", "B": "binary", "BOOL": "bool", "NULL": "null", "M": "object",
        "L": "array", "SS": "array", "NS": "array", "BS": "array",
    }[t]


_MISSING = object()


def _r(x: Any, limit: int = 160) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + f"...<{len(s)} chars>"


def _same_scalar(actual: Any, expected: Any) -> bool:
    # bool is an int subclass and 1 == 1.0: compare the JSON types too.
    return type(actual) is type(expected) and actual == expected


def check_value(actual: Any, av: dict, path: str, problems: list[str]) -> None:
    """Compare one returned JSON value with the AttributeValue written; append differences."""
    (t, v), = av.items()
    if actual is _MISSING:
        problems.append(f"{path}: missing, expected {t} {_r(render(av))}")
        return
    if t in ("SS", "NS", "BS"):
        expected = render(av)
        if not isinstance(actual, list):
            problems.append(f"{path}: expected {t} as array {_r(expected)}, got {_r(actual)}")
            return
        key = (lambda n: Decimal(str(n))) if t == "NS" else (lambda s: str(s))
        try:
            got = sorted(actual, key=key)
        except Exception:  # noqa: BLE001 - wrong element types
            got = actual
        if len(got) != len(expected) or not all(_same_scalar(a, e) for a, e in zip(got, expected)):
            problems.append(f"{path}: {t} expected {_r(expected)} (any order), got {_r(actual)}")
    elif t == "M":
        if not isinstance(actual, dict):
            problems.append(f"{path}: expected object, got {_r(actual)}")
            return
        for k, sub in v.items():
            check_value(actual.get(k, _MISSING), sub, f"{path}.{k}", problems)
        extra = {k: x for k, x in actual.items() if k not in v and x is not None}
        if extra:
            problems.append(f"{path}: unexpected keys {_r(extra)}")
    elif t == "L":
        if not isinstance(actual, list) or len(actual) != len(v):
            problems.append(f"{path}: expected array {_r(render(av))}, got {_r(actual)}")
            return
        for i, (a, sub) in enumerate(zip(actual, v)):
            check_value(a, sub, f"{path}[{i}]", problems)
    else:
        expected = render(av)
        if not _same_scalar(actual, expected):
            problems.append(
                f"{path}: {t} expected {_r(expected)} ({type(expected).__name__}), "
                f"got {_r(actual)} ({type(actual).__name__})"
            )


def check_document(row: dict, item: dict, doc_id: str) -> list[str]:
    """Every attribute of `item` must be in `row`, rendered per the contract.  Fields the item
    lacks may be absent or null (a columnar engine may fill them); `_`-fields are ignored."""
    problems: list[str] = []
    for name, av in item.items():
        check_value(row.get(name, _MISSING), av, f"{doc_id}.{name}", problems)
    for name, value in row.items():
        if name.startswith("_") or name in item:
            continue
        if value is not None:
            problems.append(f"{doc_id}.{name}: not in the item, got {value!r}")
    return problems


def compare_collection(rows: list[dict], model: dict[str, dict], max_report: int = 15) -> list[str]:
    """Rows of `SELECT * FROM coll` against the expected {_id: item}; returns problems."""
    problems: list[str] = []
    by_id: dict[str, dict] = {}
    dups = []
    for r in rows:
        if "_id" not in r:
            problems.append(f"row without _id: {r!r}"[:300])
            continue
        if r["_id"] in by_id:
            dups.append(r["_id"])
        by_id[r["_id"]] = r
    if dups:
        problems.append(f"{len(dups)} duplicate _id(s), e.g. {dups[:5]}")
    missing = sorted(set(model) - set(by_id))
    extra = sorted(set(by_id) - set(model))
    if missing:
        problems.append(f"{len(missing)} _id(s) missing, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} _id(s) that should not exist, e.g. {extra[:5]}")
    for doc_id in sorted(set(model) & set(by_id)):
        problems.extend(check_document(by_id[doc_id], model[doc_id], doc_id))
        if len(problems) >= max_report:
            break
    return problems[:max_report]


def assert_error(r: Response, *statuses: int) -> dict:
    """A JSON error with the expected status and non-empty string message and type."""
    assert r.status in statuses, f"expected HTTP {statuses}, got {r}"
    assert r.is_json and isinstance(r.body, dict), f"error body is not a JSON object: {r}"
    for field in ("message", "type"):
        assert isinstance(r.body.get(field), str) and r.body[field], f"no {field!r} in {r}"
    return r.body


class LoopbackServer:
    """An aiohttp server on 127.0.0.1 with its own thread and event loop, for the test doubles
    that speak an AWS protocol. Subclasses answer every request in `_handle` (with
    `self._session` to reach a real endpoint) and may end their own tasks in `_closing`."""

    name = "loopback-server"

    def __init__(self) -> None:
        self.url = ""
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None

    def start(self):
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"the {self.name} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    async def _closing(self) -> None:
        """Called on the server's loop when it stops, before it closes."""

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{path:.*}", self._handle)  # S3 speaks GET/PUT on paths
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            self._session = session
            ready.set()
            await self._stopping.wait()
            await self._closing()
        await runner.cleanup()
