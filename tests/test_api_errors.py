"""Bad requests get clear 4xx JSON errors {"message", "type"}, and secrets never leak.

Rockset clients branch on the status code and show `message` to people, so every refusal
must be a 4xx with both fields as non-empty strings, never a 500 or an HTML page.  One Shoal
server is shared by this module; each test uses its own names.
"""

from __future__ import annotations

import asyncio

import uuid

import pytest
import tantivy
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shoal.server.errors import json_errors
from shoal.server.queries import QueryLimits, QueryRunner
from shoal.sql import engine
from support import Dynamo, ShoalProcess, assert_error, run_in_thread, wait_until

WS = "/v1/orgs/self/ws/commons"
INTEGRATIONS = "/v1/orgs/self/integrations"
QUERIES = "/v1/orgs/self/queries"


def uniq(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"



def integration_body(name: str, endpoint: str, key_id: str = "testing", secret: str = "testing") -> dict:
    return {"name": name, "dynamodb": {
        "aws_access_key": {"aws_access_key_id": key_id, "aws_secret_access_key": secret},
        "endpoint_url": endpoint}}


def collection_body(name: str, integration: str, table: str) -> dict:
    return {"name": name, "sources": [{"integration_name": integration, "dynamodb": {
        "table_name": table, "aws_region": "us-east-1", "use_scan_api": True, "rcu": 1000}}]}


def sql_body(query: str, **extra) -> dict:
    return {"sql": {"query": query, **extra}}


@pytest.fixture(scope="module")
def server(shoal_module: ShoalProcess) -> ShoalProcess:
    return shoal_module


@pytest.fixture(scope="module")
def integration(server: ShoalProcess, moto_server: str) -> str:
    """An integration named 'moto' on the module's server (created once)."""
    async def make():
        r = await server.request("POST", INTEGRATIONS, integration_body("moto", moto_server))
        assert r.status in (200, 409), r
    run_in_thread(make)
    return "moto"


# --------------------------------------------------------------------------- health & auth


async def test_healthz_needs_no_key(server: ShoalProcess):
    """Load balancers probe /healthz without credentials."""
    r = await server.request("GET", "/healthz", key=None)
    assert r.status == 200, r


@pytest.mark.parametrize("method,path,body", [
    ("GET", INTEGRATIONS, None),
    ("POST", INTEGRATIONS, {"name": "x", "dynamodb": {}}),
    ("GET", "/v1/orgs/self/collections", None),
    ("GET", f"{WS}/collections", None),
    ("GET", f"{WS}/collections/anything", None),
    ("POST", QUERIES, sql_body("SELECT 1")),
])
@pytest.mark.parametrize("auth", ["none", "wrong", "bearer", "empty"])
async def test_v1_requires_api_key(server: ShoalProcess, method, path, body, auth):
    """Every /v1 call without the right `Authorization: ApiKey <key>` is a 401 JSON error."""
    if auth == "none":
        r = await server.request(method, path, body, key=None)
    elif auth == "wrong":
        r = await server.request(method, path, body, key=server.key + "x")
    elif auth == "bearer":
        r = await server.request(method, path, body, key=None,
                                 headers={"Authorization": f"Bearer {server.key}"})
    else:
        r = await server.request(method, path, body, key=None, headers={"Authorization": "ApiKey "})
    err = assert_error(r, 401)
    assert server.key not in r.text, f"the key is echoed back: {r}"
    assert "message" in err


# --------------------------------------------------------------------------- not found


async def test_a_key_of_other_bytes_is_401(server: ShoalProcess):
    """Header bytes that are no ASCII (no key is) reach the server as surrogates: refused."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /v1/orgs/self/integrations HTTP/1.1\r\nHost: x\r\nAuthorization: ApiKey \xff\xfe\r\n"
                 b"Connection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


@pytest.mark.parametrize("header", ["Authorization: ApiKey {key}\x01", "Authorization : ApiKey {key}"])
async def test_a_key_in_a_request_that_cannot_be_parsed_is_not_logged(server: ShoalProcess, header):
    """aiohttp logs a request line it cannot parse as it came; the key in it is not written."""
    key = "leakcheck" + uuid.uuid4().hex
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"GET /v1/orgs/self/integrations HTTP/1.1\r\nHost: x\r\n{header.format(key=key)}\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.0 400"), answer[:100]
    await asyncio.sleep(0.2)
    log = server.log_tail(400)
    assert "Invalid header" in log and "(not shown)" in log, log[-2000:]
    assert key not in log


async def test_unknown_collection_is_404(server: ShoalProcess):
    assert_error(await server.request("GET", f"{WS}/collections/{uniq('nope')}"), 404)
    assert_error(await server.request("DELETE", f"{WS}/collections/{uniq('nope')}"), 404)
    assert_error(await server.request("GET", f"/v1/orgs/self/ws/{uniq('nows')}/collections/x"), 404)


async def test_unknown_integration_is_404(server: ShoalProcess):
    assert_error(await server.request("GET", f"{INTEGRATIONS}/{uniq('nope')}"), 404)
    assert_error(await server.request("DELETE", f"{INTEGRATIONS}/{uniq('nope')}"), 404)


async def test_collection_with_unknown_integration(server: ShoalProcess, ddb: Dynamo, table_name: str):
    """Creating a collection over an integration that does not exist is refused."""
    ddb.create_table(table_name)
    r = await server.request("POST", f"{WS}/collections",
                             collection_body(uniq("c"), uniq("no_integration"), table_name))
    assert_error(r, 400, 404)


async def test_unknown_route_is_json_404(server: ShoalProcess):
    """Even an unknown path answers with the JSON error shape, not an HTML page."""
    assert_error(await server.request("GET", "/v1/orgs/self/no-such-thing"), 404)


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("path", [INTEGRATIONS, f"{WS}/collections", QUERIES])
@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2", "\"just a string\"", b"\xff\xfe"])
async def test_malformed_json_is_400(server: ShoalProcess, path, raw):
    """Bodies that are not a JSON object are a client error, not a crash."""
    assert_error(await server.request("POST", path, data=raw), 400)


@pytest.mark.parametrize("body", [
    {},
    {"name": "no_dynamodb"},
    {"dynamodb": {"aws_access_key": {"aws_access_key_id": "a", "aws_secret_access_key": "b"}}},
    {"name": 42, "dynamodb": {}},
    [],
    {"name": "files", "dynamodb": {"endpoint_url": "file:///etc/passwd"}},
])
async def test_integration_missing_fields_is_400(server: ShoalProcess, body):
    assert_error(await server.request("POST", INTEGRATIONS, body), 400)


@pytest.mark.parametrize("make", [
    lambda t: {},
    lambda t: {"name": uniq("c")},
    lambda t: {"name": uniq("c"), "sources": [{"integration_name": "moto"}]},
    lambda t: {"name": uniq("c"), "sources": [{"integration_name": "moto", "dynamodb": {}}]},
    lambda t: {"sources": [{"integration_name": "moto", "dynamodb": {"table_name": t}}]},
    lambda t: {"name": uniq("c"), "sources": [{"dynamodb": {"table_name": t}}]},
    lambda t: {"name": uniq("c"), "sources": "moto"},
    lambda t: {"name": uniq("c") + "\n", "sources": [{"integration_name": "moto", "dynamodb": {"table_name": t}}]},
    lambda t: {"name": uniq("c"), "sources": [{"integration_name": "moto", "dynamodb": {"table_name": t + "\nx"}}]},
    lambda t: {"name": uniq("c"), "sources": [{"integration_name": "moto", "dynamodb": {
        "table_name": t, "settings": {"dynamodb_stream_poll_frequency": "PT" + "1" * 5000 + "M"}}}]},
])
async def test_collection_missing_fields_is_400(server: ShoalProcess, integration, ddb: Dynamo,
                                                table_name, make):
    ddb.create_table(table_name)
    assert_error(await server.request("POST", f"{WS}/collections", make(table_name)), 400)


@pytest.mark.parametrize("body", [
    {},
    {"sql": {}},
    {"sql": "SELECT 1"},
    {"sql": {"query": ""}},
    {"sql": {"query": 7}},
    {"query": "SELECT 1"},
])
async def test_query_missing_fields_is_400(server: ShoalProcess, body):
    assert_error(await server.request("POST", QUERIES, body), 400)


# --------------------------------------------------------------------------- SQL errors


@pytest.fixture(scope="module")
def small_collection(server: ShoalProcess, integration: str, moto_server: str) -> str:
    """A READY collection `commons.people` over a 4-item table, for SQL error tests."""
    ddb = Dynamo(moto_server)
    table = uniq("people")
    ddb.create_table(table)
    ddb.batch_write(table, [
        {"pk": {"S": "a"}, "name": {"S": "Ann"}, "age": {"N": "31"}},
        {"pk": {"S": "b"}, "name": {"S": "Bob"}, "age": {"N": "45"}},
        {"pk": {"S": "c"}, "name": {"S": "O'Hara"}, "age": {"N": "27"}},
        {"pk": {"S": "d"}, "name": {"S": "Dee"}, "age": {"NULL": True}},
    ])

    async def make():
        await server.create_collection("people", integration, table)
        await server.wait_ready("people")
        await wait_until(lambda: count_people(server, 4), 30, 0.1, "people to hold 4 docs",
                         describe=lambda: server.get_collection("people"))
    run_in_thread(make)
    return "commons.people"


async def count_people(server: ShoalProcess, n: int):
    rows = await server.query("SELECT COUNT(*) AS n FROM commons.people")
    assert rows == [{"n": n}], rows
    return True


@pytest.mark.parametrize("sql", [
    "SELEC 1",
    "SELECT FROM WHERE",
    "SELECT * FROM commons.people WHERE",
    "SELECT (1",
    "SELECT nosuchfunction_xyz(name) FROM commons.people",
    "SELECT 'no end",
    "SELECT " + "(" * 46 + "1" + ")" * 46,
    "SELECT " + "(SELECT " * 60 + "1" + ")" * 60,
    "SELECT * FROM ROWS FROM (range(3))",
    "SELECT " + "+".join(["1"] * 4000) + " AS v",
])
async def test_invalid_sql_is_400(server: ShoalProcess, small_collection, sql):
    err = assert_error(await server.request("POST", QUERIES, sql_body(sql)), 400)
    print(f"{sql[:80]!r} -> {err}")


async def test_unknown_collection_in_sql(server: ShoalProcess, small_collection):
    assert_error(await server.request("POST", QUERIES, sql_body("SELECT * FROM commons.nope_xyz")),
                 400, 404)
    assert_error(await server.request("POST", QUERIES, sql_body("SELECT * FROM nows_xyz.people")),
                 400, 404)


@pytest.mark.parametrize("sql", [
    "DROP TABLE commons.people",
    "DROP VIEW commons.people",
    "INSERT INTO commons.people (pk) VALUES ('x')",
    "CREATE TABLE t (a INT)",
    "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
    "DELETE FROM commons.people",
    "UPDATE commons.people SET name = 'x'",
    "SET datafusion.execution.batch_size = 1",
    "SELECT 1; DROP TABLE commons.people",
])
async def test_ddl_and_dml_are_400(server: ShoalProcess, small_collection, sql):
    """The query endpoint is read-only; anything else is refused and changes nothing."""
    assert_error(await server.request("POST", QUERIES, sql_body(sql)), 400)
    await count_people(server, 4)


async def test_copy_to_is_refused_and_writes_nothing(server: ShoalProcess, small_collection, tmp_path):
    """COPY ... TO would write files on the server's disk."""
    target = tmp_path / "leak.csv"
    for sql in (f"COPY (SELECT * FROM commons.people) TO '{target}'",
                f"COPY commons.people TO '{target}' STORED AS CSV"):
        assert_error(await server.request("POST", QUERIES, sql_body(sql)), 400)
    assert not target.exists(), "COPY wrote a file"


@pytest.mark.parametrize("params", [
    [{"name": "n", "type": "int", "value": "not-a-number"}],
    [{"name": "n", "type": "no-such-type", "value": "1"}],
    [{"type": "int", "value": "1"}],
    [{"name": ["n"], "type": "int", "value": "1"}],
    [{"name": {"n": 1}}],
    "n=1",
])
async def test_bad_parameters_are_400(server: ShoalProcess, small_collection, params):
    body = sql_body("SELECT COUNT(*) AS c FROM commons.people WHERE age > :n", parameters=params)
    assert_error(await server.request("POST", QUERIES, body), 400)


async def test_parameters_are_bound_not_spliced(server: ShoalProcess, small_collection):
    """A string parameter is a value: quotes in it neither break nor widen the query."""
    rows = await server.query("SELECT pk FROM commons.people WHERE name = :n", {"n": "O'Hara"})
    assert rows == [{"pk": "c"}], rows
    rows = await server.query("SELECT pk FROM commons.people WHERE name = :n",
                              {"n": "x' OR '1'='1"})
    assert rows == [], rows
    rows = await server.query("SELECT pk FROM commons.people WHERE age > :n ORDER BY pk", {"n": 30})
    assert rows == [{"pk": "a"}, {"pk": "b"}], rows


async def test_a_panic_in_a_query_thread_is_a_logged_json_500(caplog):
    """A Rust panic in a query's thread (pyo3's PanicException, a BaseException, here
    tantivy's for a top 0) answers JSON 500 with the cause in the log, not a dropped
    connection: the client can tell, and the bug is there to see."""
    index = tantivy.Index(tantivy.SchemaBuilder().add_text_field("t").build())
    runner = QueryRunner(QueryLimits())

    async def handler(request: web.Request) -> web.Response:
        return await runner.run(lambda: index.searcher().search(tantivy.Query.all_query(), 0), engine.Liveness(10))

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/panic", handler)
    try:
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/panic")
            assert r.status == 500 and await r.json() == {
                "message": "internal error; the server log has the details", "type": "INTERNAL_ERROR"}
    finally:
        await runner.close()
    assert "PanicException" in caplog.text and "Limit must be greater than 0" in caplog.text, caplog.text


# --------------------------------------------------------------------------- conflicts & secrets


async def test_duplicate_integration_is_409(server: ShoalProcess, moto_server: str):
    name = uniq("dup")
    r = await server.request("POST", INTEGRATIONS, integration_body(name, moto_server))
    assert r.status == 200, r
    assert_error(await server.request("POST", INTEGRATIONS, integration_body(name, moto_server)), 409)


async def test_duplicate_collection_is_refused(server: ShoalProcess, integration, ddb: Dynamo, table_name):
    ddb.create_table(table_name)
    name = uniq("c")
    r = await server.request("POST", f"{WS}/collections", collection_body(name, integration, table_name))
    assert r.status == 200, r
    assert_error(await server.request("POST", f"{WS}/collections",
                                      collection_body(name, integration, table_name)), 400, 409)
    # Each is a directory, and a file system may ignore letter case: `Name` would be `name`'s.
    assert_error(await server.request("POST", f"{WS}/collections",
                                      collection_body(name.upper(), integration, table_name)), 409)
    assert_error(await server.request("POST", "/v1/orgs/self/ws/COMMONS/collections",
                                      collection_body(uniq("c"), integration, table_name)), 409)
    assert (await server.request("DELETE", f"{WS}/collections/{name}")).status == 200


async def test_secrets_never_echoed(server: ShoalProcess, moto_server: str, ddb: Dynamo, table_name):
    """Neither the secret access key nor the key id appear in any response."""
    key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    secret = "SECRET" + uuid.uuid4().hex + "sEcReT"
    name = uniq("secret")
    body = integration_body(name, moto_server, key_id=key_id, secret=secret)
    responses = [await server.request("POST", INTEGRATIONS, body)]
    assert responses[0].status == 200, responses[0]
    data = responses[0].body["data"]
    assert data["name"] == name and "created_at" in data and "dynamodb" in data, data
    responses += [
        await server.request("GET", f"{INTEGRATIONS}/{name}"),
        await server.request("GET", INTEGRATIONS),
        await server.request("POST", INTEGRATIONS, body),  # 409 must not echo either
    ]
    assert responses[1].status == 200 and responses[1].body["data"]["name"] == name, responses[1]
    assert name in [i["name"] for i in responses[2].body["data"]], responses[2]
    assert responses[3].status == 409, responses[3]
    # A collection over it (moto does not check credentials) and its listings.
    ddb.create_table(table_name)
    coll = uniq("c")
    responses += [
        await server.request("POST", f"{WS}/collections", collection_body(coll, name, table_name)),
        await server.request("GET", f"{WS}/collections/{coll}"),
        await server.request("GET", f"{WS}/collections"),
        await server.request("GET", "/v1/orgs/self/collections"),
    ]
    assert responses[4].status == 200, responses[4]
    for r in responses:
        assert secret not in r.text, f"secret access key echoed: {r}"
        assert key_id not in r.text, f"access key id echoed: {r}"
    assert (await server.request("DELETE", f"{WS}/collections/{coll}")).status == 200


async def test_deleted_things_are_gone(server: ShoalProcess, moto_server: str, ddb: Dynamo, table_name):
    """DELETE answers 200, then the name is unknown (404) and absent from the lists."""
    integ = uniq("gone")
    assert (await server.request("POST", INTEGRATIONS, integration_body(integ, moto_server))).status == 200
    ddb.create_table(table_name)
    coll = uniq("c")
    r = await server.request("POST", f"{WS}/collections", collection_body(coll, integ, table_name))
    assert r.status == 200, r
    assert (await server.request("DELETE", f"{WS}/collections/{coll}")).status == 200

    async def coll_gone():
        r = await server.request("GET", f"{WS}/collections/{coll}")
        assert r.status == 404, r
        return True
    await wait_until(coll_gone, 30, 0.1, "deleted collection to be gone")
    listed = (await server.request("GET", "/v1/orgs/self/collections")).body["data"]
    assert coll not in [c["name"] for c in listed], listed

    assert (await server.request("DELETE", f"{INTEGRATIONS}/{integ}")).status == 200
    assert_error(await server.request("GET", f"{INTEGRATIONS}/{integ}"), 404)
    listed = (await server.request("GET", INTEGRATIONS)).body["data"]
    assert integ not in [i["name"] for i in listed], listed
