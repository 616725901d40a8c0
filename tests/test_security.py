"""Access and the query sandbox, against a real Shoal server (subprocess) over HTTP.

- Named API keys in Rockset's shape (`/v1/orgs/self/users/self/apikeys`): shown once,
  stored only as digests in an owner-only file, revoked at once, surviving restarts; the
  startup key (--api-key) always works and is not managed through the API.
- The query endpoint runs only read-only queries: a long list of attempts to write, change
  settings, read files or run several statements is refused with a 400 JSON error and
  changes nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import ssl
import stat
import subprocess
import sys
import uuid

import aiohttp
import orjson
import pytest

from support import Dynamo, ShoalProcess, assert_error, free_port, run_in_thread, subprocess_env, wait_until

KEYS = "/v1/orgs/self/users/self/apikeys"
QUERIES = "/v1/orgs/self/queries"



def uniq(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class GeneratedKeyShoal(ShoalProcess):
    """A server started without --api-key: its first start generates a key. Its output goes to
    a log, not a terminal, so the key goes to an owner-only file, never to the log."""

    def command(self) -> list[str]:
        command = super().command()
        at = command.index("--api-key")
        return command[:at] + command[at + 2:]

    def handed_over_key(self) -> str:
        path = self.data_dir / "generated-api-key"
        assert f"written to {path}" in self.log_path.read_text(), self.log_tail()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = path.read_text().strip()
        assert key and key not in self.log_path.read_text(), "the generated key is in the log"
        return key


# --------------------------------------------------------------------------- named API keys


async def test_named_key_lifecycle(shoal: ShoalProcess):
    """Create → shown once, works; list → masked; duplicate → 409; delete → 401 at once."""
    name = uniq("ci")
    r = await shoal.request("POST", KEYS, {"name": name, "role": "admin"})
    assert r.status == 200, r
    created = r.body["data"]
    key = created["key"]
    assert created["name"] == name and created["created_at"] and re.fullmatch(r"[0-9a-f]{64}", key), created

    r = await shoal.request("GET", "/v1/orgs/self/collections", key=key)
    assert r.status == 200, f"the new key does not open the API: {r}"

    listed = await shoal.request("GET", KEYS, key=key)
    assert listed.status == 200, listed
    entry = next(k for k in listed.body["data"] if k["name"] == name)
    assert entry["key"].endswith(key[-4:]) and key not in listed.text, entry
    assert hashlib.sha256(key.encode()).hexdigest() not in listed.text, "the digest is listed"
    one = await shoal.request("GET", f"{KEYS}/{name}")
    assert one.status == 200 and one.body["data"]["name"] == name and key not in one.text, one

    assert_error(await shoal.request("POST", KEYS, {"name": name}), 409)

    r = await shoal.request("DELETE", f"{KEYS}/{name}")
    assert r.status == 200 and r.body["data"]["name"] == name and key not in r.text, r
    assert_error(await shoal.request("GET", "/v1/orgs/self/collections", key=key), 401)
    assert_error(await shoal.request("GET", f"{KEYS}/{name}"), 404)
    assert_error(await shoal.request("DELETE", f"{KEYS}/{name}"), 404)
    # The startup key is not a named key and keeps working.
    assert (await shoal.request("GET", KEYS)).status == 200


async def test_keys_are_stored_hashed_owner_only_and_survive_restart(shoal: ShoalProcess):
    kept, revoked = uniq("kept"), uniq("revoked")
    keys = {}
    for name in (kept, revoked):
        r = await shoal.request("POST", KEYS, {"name": name})
        assert r.status == 200, r
        keys[name] = r.body["data"]["key"]
    assert (await shoal.request("DELETE", f"{KEYS}/{revoked}")).status == 200

    path = shoal.data_dir / "api_keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    stored = path.read_bytes()
    for key in keys.values():
        assert key.encode() not in stored, "a key is stored in clear"
    names = [k["name"] for k in orjson.loads(stored)["keys"]]
    assert kept in names and revoked not in names, names

    shoal.restart()
    assert (await shoal.request("GET", KEYS, key=keys[kept])).status == 200
    assert_error(await shoal.request("GET", KEYS, key=keys[revoked]), 401)


@pytest.mark.parametrize("body", [
    {},
    {"name": ""},
    {"name": "has space"},
    {"name": "-leading-dash"},
    {"name": "x" * 101},
    {"name": 7},
    {"name": "ok", "role": "read-only"},
    {"name": "ok", "colour": "blue"},
    [],
])
async def test_bad_key_requests_are_400(shoal_module: ShoalProcess, body):
    assert_error(await shoal_module.request("POST", KEYS, body), 400)


async def test_other_users_are_404(shoal_module: ShoalProcess):
    assert_error(await shoal_module.request("GET", "/v1/orgs/self/users/someone@example.com/apikeys"), 404)
    assert_error(await shoal_module.request("POST", "/v1/orgs/self/users/bob/apikeys", {"name": "x"}), 404)


async def test_key_endpoints_need_a_key(shoal_module: ShoalProcess):
    assert_error(await shoal_module.request("POST", KEYS, {"name": uniq("x")}, key=None), 401)
    assert_error(await shoal_module.request("GET", KEYS, key="wrong"), 401)


async def test_generated_key_then_the_last_key_cannot_be_deleted(tmp_path):
    """Without --api-key the first start generates a key (named `default`); the server keeps at
    least one named key, so nobody revokes their way out of their own server."""
    server = GeneratedKeyShoal(tmp_path / "data", tmp_path / "shoal.log")
    try:
        server.start()
        key = server.handed_over_key()
        assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
        listed = await server.request("GET", KEYS, key=key)
        assert [k["name"] for k in listed.body["data"]] == ["default"], listed
        assert_error(await server.request("DELETE", f"{KEYS}/default", key=key), 409)
        other = (await server.request("POST", KEYS, {"name": "second"}, key=key)).body["data"]["key"]
        assert (await server.request("DELETE", f"{KEYS}/default", key=other)).status == 200
        assert_error(await server.request("GET", KEYS, key=key), 401)
        server.restart()
        assert server.log_path.read_text().count("Generated API key") == 1, "a second key was generated"
        assert (await server.request("GET", KEYS, key=other)).status == 200
    finally:
        server.stop()


def test_a_generated_key_is_shown_on_a_terminal(tmp_path):
    """Run by hand (output on a terminal), the first start shows the generated key there, once,
    and writes it nowhere."""
    import os
    import pty

    data_dir = tmp_path / "data"
    controller, terminal = pty.openpty()
    command = [sys.executable, "-m", "shoal.server.cli", "serve", "--port", str(free_port()), "--data-dir", str(data_dir)]
    env = {k: v for k, v in subprocess_env().items() if k != "SHOAL_API_KEY"}
    proc = subprocess.Popen(command, stdout=terminal, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    os.close(terminal)
    shown = b""
    try:
        while b"Generated API key" not in shown or not shown.endswith(b"\n"):
            shown += os.read(controller, 4096)  # an EOF (the server died) raises OSError
    finally:
        proc.kill()
        proc.wait()
        os.close(controller)
    [key] = re.findall(r"Generated API key \(shown once, keep it\): (\S+)", shown.decode())
    assert len(key) >= 32 and not (data_dir / "generated-api-key").exists()
    assert key not in (data_dir / "api_keys.json").read_text()


def test_the_data_dir_is_made_owner_only_only_when_it_is_shoals(tmp_path):
    """A new or empty data directory is made owner-only; one open to others that holds other
    files (`--data-dir /tmp`) is refused as it is, not chmodded under its other users."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "someone-elses.txt").write_text("x")
    (shared / "collections").mkdir()  # a name of Shoal's beside them does not make it Shoal's
    command = [sys.executable, "-m", "shoal.server.cli", "serve", "--port", str(free_port()),
               "--data-dir", str(shared), "--api-key", "k" * 24]
    refused = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert refused.returncode != 0 and "holds files that are not Shoal's (someone-elses.txt)" in refused.stderr, refused
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755

    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    empty.chmod(0o755)
    server = ShoalProcess(empty, tmp_path / "shoal.log")
    try:
        server.start()
        assert stat.S_IMODE(empty.stat().st_mode) == 0o700
        server.stop()
        empty.chmod(0o750)  # its own files now: made owner-only again at the next start
        server.start()
        assert stat.S_IMODE(empty.stat().st_mode) == 0o700
    finally:
        server.stop()


# --------------------------------------------------------------------------- the query sandbox


@pytest.fixture(scope="module")
def people(shoal_module: ShoalProcess, moto_server: str) -> ShoalProcess:
    """A READY collection `commons.people` of 3 documents on the module's server."""
    ddb = Dynamo(moto_server)
    table = uniq("people")
    ddb.create_table(table)
    ddb.batch_write(table, [{"pk": {"S": k}, "n": {"N": str(i)}} for i, k in enumerate("abc")])

    async def make():
        await shoal_module.create_integration("sandbox_moto", moto_server)
        await shoal_module.create_collection("people", "sandbox_moto", table)
        await shoal_module.wait_ready("people")
        await wait_until(lambda: count_people(shoal_module), 30, 0.1, "people to hold 3 docs")

    run_in_thread(make)
    return shoal_module


async def count_people(server: ShoalProcess) -> bool:
    assert await server.query("SELECT COUNT(*) AS n FROM commons.people") == [{"n": 3}]
    return True


def refused_queries(target: str) -> list[str]:
    """Attempts to leave the read-only query surface. `target` is a file path that must
    not be created or read."""
    return [
        # DDL, DML and settings, in any spelling
        "DROP TABLE commons.people",
        "dRoP tAbLe commons.people",
        "/* hello */ DROP VIEW commons.people",
        "-- comment\nDELETE FROM commons.people",
        "CREATE TABLE t (a INT)",
        "CREATE TABLE t AS SELECT * FROM commons.people",
        "CREATE VIEW v AS SELECT 1",
        "CREATE OR REPLACE VIEW commons.people AS SELECT 1 AS n",
        f"CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '{target}'",
        "CREATE SCHEMA s",
        "DROP SCHEMA commons CASCADE",
        "CREATE FUNCTION f() RETURNS INT RETURN 1",
        "INSERT INTO commons.people (pk) VALUES ('x')",
        "INSERT INTO commons.people SELECT * FROM commons.people",
        "UPDATE commons.people SET n = 0",
        "DELETE FROM commons.people",
        "TRUNCATE commons.people",
        "MERGE INTO commons.people p USING commons.people q ON p.pk = q.pk WHEN MATCHED THEN DELETE",
        "SELECT * INTO newtable FROM commons.people",
        "WITH d AS (DELETE FROM commons.people RETURNING *) SELECT * FROM d",
        "SET datafusion.execution.batch_size = 1",
        "SET datafusion.catalog.information_schema = true",
        "RESET datafusion.execution.batch_size",
        "BEGIN", "COMMIT", "ROLLBACK",
        "PREPARE p AS SELECT 1", "EXECUTE p", "DEALLOCATE p",
        "GRANT ALL ON commons.people TO PUBLIC",
        "ANALYZE commons.people", "VACUUM",
        "CALL f()",
        # statements that describe or run plans
        "EXPLAIN SELECT 1",
        "EXPLAIN ANALYZE SELECT COUNT(*) FROM commons.people",
        "DESCRIBE commons.people",
        "SHOW TABLES", "SHOW ALL",
        # files and the network
        f"COPY (SELECT * FROM commons.people) TO '{target}'",
        f"COPY commons.people TO '{target}' STORED AS CSV",
        f"COPY commons.people FROM '{target}'",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM \"/etc/passwd\"",
        "select\t*\nfrom\n'/etc/hosts'",
        "SELECT * FROM 'file:///etc/passwd'",
        "SELECT * FROM 'https://example.com/data.parquet'",
        "SELECT * FROM 's3://bucket/data.parquet'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('/etc/passwd')",
        "SELECT * FROM read_json('/etc/passwd')",
        "SELECT * FROM parquet_metadata('/etc/passwd')",
        "SELECT * FROM some_table_function('/etc/passwd')",
        # ... nested in subqueries, CTEs, unions and joins
        "SELECT * FROM (SELECT * FROM '/etc/passwd') t",
        "WITH x AS (SELECT * FROM '/etc/passwd') SELECT * FROM x",
        "SELECT n FROM commons.people UNION ALL SELECT * FROM '/etc/passwd'",
        "SELECT (SELECT COUNT(*) FROM '/etc/passwd')",
        "SELECT * FROM commons.people WHERE pk IN (SELECT column1 FROM read_csv('/etc/passwd'))",
        "SELECT * FROM commons.people p JOIN read_csv('/etc/passwd') f ON true",
        # extensions, catalogs and other engines' syntax
        "LOAD 'httpfs'", "INSTALL httpfs", "ATTACH '/tmp/x.db' AS x",
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM datafusion.information_schema.df_settings",
        "SELECT * FROM datafusion.commons.people",
        # several statements
        "SELECT 1; SELECT 2",
        "SELECT 1; DROP TABLE commons.people",
        "SELECT 1;\n-- trailing\nDELETE FROM commons.people",
        "SELECT ';'; DROP TABLE commons.people",
    ]


async def test_the_query_endpoint_refuses_everything_but_one_query(people: ShoalProcess, tmp_path):
    target = tmp_path / "leak.csv"
    executed = []
    for sql in refused_queries(str(target)):
        r = await people.request("POST", QUERIES, {"sql": {"query": sql}})
        if r.status != 400 or not r.is_json or not r.body.get("message") or not r.body.get("type"):
            executed.append(f"{sql!r} -> {r}")
    assert not executed, "not refused with a 400 JSON error:\n" + "\n".join(executed)
    # Table functions that could read files are refused by name, before DataFusion sees them.
    r = await people.request("POST", QUERIES, {"sql": {"query": "SELECT * FROM read_csv('/etc/passwd')"}})
    assert "not allowed" in r.body["message"], r
    assert not target.exists(), "a refused statement wrote a file"
    await count_people(people)
    # A lambda is the same surface.
    r = await people.request("POST", "/v1/orgs/self/ws/commons/lambdas",
                             {"name": uniq("evil"), "sql": {"query": "DROP TABLE commons.people"}})
    assert assert_error(r, 400)["type"] == "QUERY_ERROR", r


async def test_harmless_table_functions_and_odd_spellings_still_work(people: ShoalProcess):
    """The sandbox refuses by what a statement does, not by how it looks."""
    assert await people.query("SELECT 1 /* ; DROP TABLE x */ AS one") == [{"one": 1}]
    assert await people.query("SELECT value FROM generate_series(1, 3) ORDER BY value") == [
        {"value": 1}, {"value": 2}, {"value": 3}]
    assert await people.query("SELECT ';' AS s") == [{"s": ";"}]
    assert await people.query(
        "WITH p AS (SELECT pk FROM commons.people) SELECT COUNT(*) AS n FROM p, (SELECT 1) one") == [{"n": 3}]


# --------------------------------------------------------------------------- bodies


LAMBDA = "/v1/orgs/self/ws/commons/lambdas/sec_lambda"
POST_PATHS = [
    "/v1/orgs/self/integrations",
    "/v1/orgs/self/ws/commons/collections",
    QUERIES,
    KEYS,
    "/v1/orgs/self/ws/commons/lambdas",
    f"{LAMBDA}/versions",
    f"{LAMBDA}/versions/1",
    f"{LAMBDA}/tags/latest",
]


@pytest.fixture(scope="module")
def with_lambda(shoal_module: ShoalProcess) -> ShoalProcess:
    """A query lambda `commons.sec_lambda`, so that every lambda path names one that exists."""
    async def make():
        r = await shoal_module.request("POST", "/v1/orgs/self/ws/commons/lambdas",
                                       {"name": "sec_lambda", "sql": {"query": "SELECT 1 AS one"}})
        assert r.status in (200, 409), r
    run_in_thread(make)
    return shoal_module


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2", b"\xff\xfe", b'{"a": 1} trailing'])
async def test_malformed_json_is_400_on_every_post(with_lambda: ShoalProcess, path, raw):
    assert_error(await with_lambda.request("POST", path, data=raw), 400)


@pytest.mark.parametrize("path", POST_PATHS)
async def test_oversize_body_is_413_json(with_lambda: ShoalProcess, path):
    big = b'{"name": "' + b"x" * (9 * 2**20) + b'"}'
    assert_error(await with_lambda.request("POST", path, data=big), 413)
    assert (await with_lambda.request("GET", "/healthz", key=None)).status == 200


# --------------------------------------------------------------------------- listening


def serve(tmp_path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.server.cli", "serve", "--data-dir", str(tmp_path / "data"),
         "--api-key", "listen-key", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=subprocess_env(), text=True,
    )


def output_until_listening(proc: subprocess.Popen) -> str:
    """The server's output up to its 'Shoal listening' line (it has started by then)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Shoal listening"):
            return "".join(lines)
    raise AssertionError("the server exited before listening:\n" + "".join(lines))


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.parametrize("host,warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_listening_beyond_loopback_without_tls_warns(tmp_path, host, warned):
    proc = serve(tmp_path, "--host", host, "--port", str(free_port()))
    try:
        out = output_until_listening(proc)
        assert ("WARNING" in out and "without TLS" in out) == warned, out
    finally:
        stop(proc)


def self_signed_certificate(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made with `cryptography` for this test."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_tls_serves_https(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    port = free_port()
    proc = serve(tmp_path, "--host", "0.0.0.0", "--port", str(port), "--tls-cert", cert, "--tls-key", key)
    try:
        out = output_until_listening(proc)
        assert "WARNING" not in out and f"https://0.0.0.0:{port}" in out, out
        trusted = ssl.create_default_context(cafile=cert)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{port}/v1/orgs/self/users/self/apikeys",
                                   headers={"Authorization": "ApiKey listen-key"}, ssl=trusted) as r:
                assert r.status == 200, await r.text()
            with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
                async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                    await r.read()
    finally:
        stop(proc)


def test_tls_needs_both_files(tmp_path):
    proc = serve(tmp_path, "--port", str(free_port()), "--tls-cert", str(tmp_path / "cert.pem"))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "--tls-key" in out, out
