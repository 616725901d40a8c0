"""`shoal demo`: Shoal indexing a live DynamoDB table on one machine, with no AWS account.

It starts moto as a local DynamoDB endpoint, seeds an `orders` table, runs a Shoal server
that indexes it, prints ready-to-paste queries, then keeps changing the table so a user can
watch the index follow the stream.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

REGION = "us-east-1"
# Dummy credentials: moto accepts any, and they keep a user's real AWS keys out of the demo.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": REGION}
TABLE = "orders"
WORKSPACE = "commons"
INTEGRATION = "demo"
SEED_ORDERS = 2000
WRITE_INTERVAL_S = 0.5
HEARTBEAT_S = 30.0
HEALTH_TIMEOUT_S = 30.0
SETUP_TIMEOUT_S = 60.0

FIRST_NAMES = ["Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
               "Kemi", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tomas"]
LAST_NAMES = ["Okafor", "Schmidt", "Nguyen", "Garcia", "Kowalski", "Tanaka", "Haddad", "Silva",
              "Brown", "Rossi", "Patel", "Johansson", "Murphy", "Dubois", "Kim"]
CITIES = [("Seattle", "98101"), ("Portland", "97205"), ("San Francisco", "94103"),
          ("Austin", "78701"), ("Denver", "80202"), ("Chicago", "60601"),
          ("Boston", "02108"), ("New York", "10001"), ("Atlanta", "30303")]
# (sku, name, price in cents)
PRODUCTS = [("sku-1001", "Espresso beans 1 kg", 2499), ("sku-1002", "Pour-over kettle", 4950),
            ("sku-1003", "Ceramic mug", 1200), ("sku-1004", "Paper filters x100", 599),
            ("sku-1005", "Burr grinder", 12900), ("sku-1006", "Oat milk 6-pack", 1799),
            ("sku-1007", "Cold brew bottle", 2250), ("sku-1008", "Gift card", 5000)]
PRICES = {sku: price for sku, _, price in PRODUCTS}
STATUSES = ["pending", "paid", "shipped", "delivered", "cancelled"]
SEED_STATUS_WEIGHTS = [5, 10, 15, 60, 10]
TAGS = ["priority", "wholesale", "first-order", "subscription", "promo"]
COUPONS = ["WELCOME10", "SPRING5", "LOYAL15"]
BY_STATUS_SQL = (f"SELECT status, COUNT(*) AS n, SUM(amount) AS total FROM {WORKSPACE}.{TABLE} "
                 "GROUP BY status ORDER BY n DESC")
LATEST_SQL = (f"SELECT order_id, status, _event_time FROM {WORKSPACE}.{TABLE} "
              "ORDER BY _event_time DESC LIMIT 5")
COLLECTIONS_PATH = f"/v1/orgs/self/ws/{WORKSPACE}/collections"
INTEGRATIONS_PATH = "/v1/orgs/self/integrations"


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


def main(argv: list[str] | None = None) -> int:
    """Run the demo until Ctrl+C or SIGTERM; return the process exit code."""
    args = _parse_args(argv)
    try:
        # moto and boto3 come with the `demo` extra only, so a plain install still runs `shoal serve`.
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("shoal demo needs the demo extra: pip install 'shoal[demo]'", file=sys.stderr)
        return 1

    for name, port in (("--port", args.port), ("--moto-port", args.moto_port)):
        if not _port_is_free(port):
            print(f"port {port} ({name}) is already in use; pick another with {name}", file=sys.stderr)
            return 1

    os.environ.update(AWS_ENV)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    # werkzeug would log every DynamoDB request moto serves, botocore where it found credentials.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    logging.getLogger("botocore").setLevel(logging.WARNING)

    # SIGTERM and a closed terminal stop the demo the same clean way as Ctrl+C.
    previous = {sig: signal.signal(sig, signal.default_int_handler)
                for sig in (signal.SIGTERM, signal.SIGHUP)}
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=args.moto_port, verbose=False)
    moto.start()
    server: subprocess.Popen[bytes] | None = None
    try:
        moto_url = f"http://127.0.0.1:{args.moto_port}"
        table = boto3.resource("dynamodb", endpoint_url=moto_url, region_name=REGION).Table(TABLE)
        rng = random.Random(7)  # the same sample orders on every run
        print(f"Local DynamoDB (moto) at {moto_url}; seeding {SEED_ORDERS} orders...", flush=True)
        _create_table(table.meta.client)
        _seed(table, rng)

        args.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # as `shoal serve` keeps it
        key_path = args.data_dir.resolve() / "demo-api-key"  # the curl examples work from any directory
        api_key = _api_key(key_path)
        base_url = f"http://127.0.0.1:{args.port}"
        log_path = args.data_dir / "shoal-server.log"
        server = _start_server(args.port, args.data_dir, api_key, log_path)
        _wait_healthy(server, base_url, log_path)

        api = ShoalApi(base_url, api_key)
        _create_collection(api, moto_url)
        _wait_ready(api)
        _print_banner(base_url, api_key, key_path, log_path)
        _write_forever(table, rng, server, log_path)
    except KeyboardInterrupt:
        print("\nStopping the demo...", flush=True)
        return 0
    except DemoError as err:
        print(f"shoal demo: {err}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            _stop_server(server)
        moto.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shoal demo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000, help="Shoal's HTTP port (default 3000)")
    parser.add_argument("--data-dir", type=Path, default=Path("./demo-data"),
                        help="Shoal's data directory, kept across runs (default ./demo-data)")
    parser.add_argument("--moto-port", type=int, default=4566,
                        help="port of the local DynamoDB endpoint (default 4566)")
    return parser.parse_args(argv)


def _port_is_free(port: int) -> bool:
    """Checked up front: moto's thread would hang on a busy port, and a busy Shoal port
    could answer /healthz from some other server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- the sample table -------------------------------------------------------------------


def _create_table(client: Any) -> None:
    """moto starts empty on every run, so the table is always new here."""
    client.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "order_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "order_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )


def _seed(table: Any, rng: random.Random) -> None:
    """Orders spread over the last 30 days, so time-ordered queries look real."""
    start = datetime.now(UTC) - timedelta(days=30)
    step = timedelta(days=30) / SEED_ORDERS
    with table.batch_writer() as batch:
        for n in range(1, SEED_ORDERS + 1):
            batch.put_item(Item=_order(rng, _order_id(n), start + n * step))


def _order_id(n: int) -> str:
    return f"ord-{n:06d}"


def _money(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def _order(
    rng: random.Random, order_id: str, created_at: datetime, status: str | None = None
) -> dict[str, Any]:
    """One order using every DynamoDB type a real table tends to hold: S, N, BOOL, M, L, SS, NULL."""
    city, zip_code = rng.choice(CITIES)
    lines = [{"sku": sku, "name": name, "price": _money(price), "qty": rng.randint(1, 3)}
             for sku, name, price in rng.sample(PRODUCTS, rng.randint(1, 4))]
    order: dict[str, Any] = {
        "order_id": order_id,
        "customer": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "city": city,
        "status": status or rng.choices(STATUSES, SEED_STATUS_WEIGHTS)[0],
        "amount": _money(sum(PRICES[line["sku"]] * line["qty"] for line in lines)),
        "quantity": sum(line["qty"] for line in lines),
        "created_at": _iso(created_at),
        "address": {"city": city, "zip": zip_code},
        "items": lines,
        "gift": rng.random() < 0.15,
    }
    tags = rng.sample(TAGS, rng.randint(0, 2))
    if tags:  # a DynamoDB set cannot be empty
        order["tags"] = set(tags)
    roll = rng.random()
    if roll < 0.1:
        order["coupon"] = None
    elif roll < 0.3:
        order["coupon"] = rng.choice(COUPONS)
    return order


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


# --- the Shoal server -------------------------------------------------------------------


def _api_key(path: Path) -> str:
    """Reuse the key of an earlier run, so the curl commands a user saved keep working."""
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _start_server(port: int, data_dir: Path, api_key: str, log_path: Path) -> subprocess.Popen[bytes]:
    """The server's output goes to a file: a pipe nobody reads would block it once full."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "shoal.server.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--data-dir", str(data_dir)],
            env={**os.environ, "SHOAL_API_KEY": api_key},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            # Its own session, so Ctrl+C reaches only the demo, which stops its writer first.
            start_new_session=True,
        )


def _wait_healthy(server: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise _server_failed(f"exited with code {server.returncode}", log_path)
        try:
            with _opener.open(f"{base_url}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise _server_failed(f"did not answer {base_url}/healthz within {HEALTH_TIMEOUT_S:.0f} s", log_path)


def _server_failed(what: str, log_path: Path) -> DemoError:
    output = log_path.read_text(errors="replace")
    return DemoError(f"the Shoal server {what}; its output ({log_path}):\n{output}")


def _stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# Loopback calls must never go through a proxy set in the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ShoalApi:
    """The few calls of Shoal's REST API the demo makes."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"ApiKey {api_key}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """Return (HTTP status, decoded JSON body or raw text); error statuses do not raise."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=self.headers)
        try:
            with _opener.open(request, timeout=30) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, _decode(err.read())


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _create_collection(api: ShoalApi, moto_url: str) -> None:
    """Create the integration and the collection afresh.

    The data directory persists across demo runs but moto's state does not: a collection
    left by an earlier run holds checkpoints of a stream that no longer exists, and its
    integration may point at another --moto-port. So both are deleted and created again.
    """
    integration = {"name": INTEGRATION, "dynamodb": {
        "aws_access_key": {"aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
                           "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"]},
        "endpoint_url": moto_url}}
    collection = {"name": TABLE, "sources": [{"integration_name": INTEGRATION, "dynamodb": {
        "table_name": TABLE, "aws_region": REGION, "use_scan_api": True, "rcu": 1000}}]}
    collection_path = f"{COLLECTIONS_PATH}/{TABLE}"
    status, reply = api.call("DELETE", collection_path)
    _expect((status, reply), "delete the old collection", 200, 404)
    if status == 200:
        _wait_gone(api, collection_path)
    _expect(api.call("DELETE", f"{INTEGRATIONS_PATH}/{INTEGRATION}"), "delete the old integration", 200, 404)
    _expect(api.call("POST", INTEGRATIONS_PATH, integration), "create the integration", 200)
    _expect(api.call("POST", COLLECTIONS_PATH, collection), "create the collection", 200)


def _wait_gone(api: ShoalApi, path: str) -> None:
    """A deletion may finish in the background; till then the name is taken and the
    integration in use."""
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while api.call("GET", path)[0] != 404:
        if time.monotonic() > deadline:
            raise DemoError(f"{path} still exists {SETUP_TIMEOUT_S:.0f} s after its deletion")
        time.sleep(0.2)


def _expect(result: tuple[int, Any], action: str, *ok: int) -> None:
    status, reply = result
    if status not in ok:
        raise DemoError(f"could not {action}: HTTP {status}: {reply}")


def _wait_ready(api: ShoalApi) -> None:
    """Wait for the initial scan, so the first query a user pastes already sees every order."""
    print("Shoal is loading the table...", flush=True)
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while time.monotonic() < deadline:
        status, reply = api.call("GET", f"{COLLECTIONS_PATH}/{TABLE}")
        if status == 200 and reply.get("data", {}).get("status") == "READY":
            return
        time.sleep(0.5)
    print(f"(the collection is not READY after {SETUP_TIMEOUT_S:.0f} s; queries may see part of the table)")


def _print_banner(base_url: str, api_key: str, key_path: Path, log_path: Path) -> None:
    """How to use the demo. The key is shown on a terminal only; output going elsewhere (a
    log, CI) gets commands that read it from its owner-only file, as `shoal serve` does."""
    if sys.stdout.isatty():
        key_line = f"API key: {api_key}"
        auth = shlex.quote(f"Authorization: ApiKey {api_key}")
    else:
        key_line = f"API key: in {key_path} (owner-only; not printed, as this output is no terminal)"
        auth = f'"Authorization: ApiKey $(cat {shlex.quote(str(key_path))})"'

    def query(sql: str) -> str:
        body = shlex.quote(json.dumps({"sql": {"query": sql}}))
        return (f"curl -s -X POST {base_url}/v1/orgs/self/queries \\\n"
                f"  -H {auth} -H 'Content-Type: application/json' \\\n  -d {body}")

    print(f"""
Shoal is running at {base_url}
{key_line}
Server log: {log_path}

List the collections:
curl -s {base_url}/v1/orgs/self/ws/{WORKSPACE}/collections -H {auth}

Orders and revenue by status:
{query(BY_STATUS_SQL)}

The latest changes (a writer puts, updates and deletes orders every {WRITE_INTERVAL_S} s):
{query(LATEST_SQL)}

Press Ctrl+C to stop.
""", flush=True)


# --- the live writer ----------------------------------------------------------------------


def _write_forever(
    table: Any, rng: random.Random, server: subprocess.Popen[bytes], log_path: Path
) -> NoReturn:
    """Keep the table changing, so the stream always has something for Shoal to apply."""
    live = [_order_id(n) for n in range(1, SEED_ORDERS + 1)]
    next_n = SEED_ORDERS + 1
    ticks = deleted = 0
    next_heartbeat = time.monotonic() + HEARTBEAT_S
    while server.poll() is None:
        table.put_item(Item=_order(rng, _order_id(next_n), datetime.now(UTC), status="pending"))
        live.append(_order_id(next_n))
        next_n += 1
        table.update_item(
            Key={"order_id": rng.choice(live)},
            UpdateExpression="SET #status = :status, updated_at = :now",
            ExpressionAttributeNames={"#status": "status"},  # `status` is a reserved word
            ExpressionAttributeValues={":status": rng.choice(STATUSES),
                                       ":now": _iso(datetime.now(UTC))},
        )
        ticks += 1
        if rng.random() < 0.1:
            i = rng.randrange(len(live))
            live[i], live[-1] = live[-1], live[i]
            table.delete_item(Key={"order_id": live.pop()})
            deleted += 1
        if time.monotonic() >= next_heartbeat:
            print(f"[{datetime.now():%H:%M:%S}] writer: {ticks} new, {ticks} updated, {deleted} deleted; "
                  f"{len(live)} orders in the table", flush=True)
            next_heartbeat += HEARTBEAT_S
        time.sleep(WRITE_INTERVAL_S)
    raise _server_failed(f"exited with code {server.returncode}", log_path)
