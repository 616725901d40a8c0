"""REST handlers, Rockset's paths and shapes. Each handler: parse → execute → render."""

from __future__ import annotations

import asyncio
import base64
import uuid
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from shoal.sql import engine, planner

from .catalog import Catalog, LiveCollection, now_iso
from .errors import ApiError, invalid
from .specs import collection_json, integration_json, parse_collection, parse_integration

CATALOG = web.AppKey("catalog", Catalog)
QUERY_SLOTS = web.AppKey("query_slots", asyncio.Semaphore)

DEFAULT_ROW_LIMIT = 10_000
MAX_ROW_LIMIT = 100_000
DEFAULT_TIMEOUT_MS = 120_000  # Rockset's synchronous default
MAX_TIMEOUT_MS = 600_000

routes = web.RouteTableDef()


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")  # as DynamoDB puts binary on the wire
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError


def respond(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload, default=_json_default, option=orjson.OPT_NON_STR_KEYS),
        content_type="application/json",
    )


async def read_json(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as error:
        raise invalid(f"request body is not valid JSON: {error}") from None


def _render_collection(live: LiveCollection, deleted: bool = False) -> dict[str, Any]:
    return collection_json(
        live.spec, live.pipeline.status, live.storage.doc_count, live.storage.total_size, deleted
    )


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return respond({"status": "ok"})


# ------------------------------------------------------------------ integrations


@routes.post("/v1/orgs/self/integrations")
async def create_integration(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    spec = parse_integration(await read_json(request), now_iso())
    await catalog.add_integration(spec)
    return respond({"data": integration_json(spec, [])})


@routes.get("/v1/orgs/self/integrations")
async def list_integrations(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    return respond({"data": [integration_json(s, catalog.collections_using(s.name)) for s in catalog.integrations.values()]})


@routes.get("/v1/orgs/self/integrations/{name}")
async def get_integration(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    spec = catalog.integration(request.match_info["name"])
    return respond({"data": integration_json(spec, catalog.collections_using(spec.name))})


@routes.delete("/v1/orgs/self/integrations/{name}")
async def delete_integration(request: web.Request) -> web.Response:
    spec = await request.app[CATALOG].delete_integration(request.match_info["name"])
    return respond({"data": integration_json(spec, [])})


# ------------------------------------------------------------------ collections


@routes.post("/v1/orgs/self/ws/{workspace}/collections")
async def create_collection(request: web.Request) -> web.Response:
    spec = parse_collection(request.match_info["workspace"], await read_json(request), now_iso())
    live = await request.app[CATALOG].add_collection(spec)
    return respond({"data": _render_collection(live)})


@routes.get("/v1/orgs/self/collections")
async def list_all_collections(request: web.Request) -> web.Response:
    return respond({"data": [_render_collection(live) for live in request.app[CATALOG].collections.values()]})


@routes.get("/v1/orgs/self/ws/{workspace}/collections")
async def list_collections(request: web.Request) -> web.Response:
    workspace = request.match_info["workspace"]
    lives = [live for (ws, _), live in request.app[CATALOG].collections.items() if ws == workspace]
    return respond({"data": [_render_collection(live) for live in lives]})


@routes.get("/v1/orgs/self/ws/{workspace}/collections/{name}")
async def get_collection(request: web.Request) -> web.Response:
    live = request.app[CATALOG].collection(request.match_info["workspace"], request.match_info["name"])
    return respond({"data": _render_collection(live)})


@routes.delete("/v1/orgs/self/ws/{workspace}/collections/{name}")
async def delete_collection(request: web.Request) -> web.Response:
    live = await request.app[CATALOG].delete_collection(request.match_info["workspace"], request.match_info["name"])
    return respond({"data": _render_collection(live, deleted=True)})


# ------------------------------------------------------------------ queries


def _parse_query(body: Any) -> tuple[str, list[dict], int, float]:
    if not isinstance(body, dict) or not isinstance(body.get("sql"), dict):
        raise invalid('body must be {"sql": {"query": "...", "parameters": [...], "default_row_limit": N}}')
    sql = body["sql"]
    query = sql.get("query")
    if not isinstance(query, str) or not query.strip():
        raise invalid("sql.query must be a non-empty string")
    parameters = sql.get("parameters") or []
    if not isinstance(parameters, list) or not all(isinstance(p, dict) for p in parameters):
        raise invalid("sql.parameters must be a list of {name, type, value}")
    row_limit = sql.get("default_row_limit", DEFAULT_ROW_LIMIT)
    if not isinstance(row_limit, int) or isinstance(row_limit, bool) or row_limit < 1:
        raise invalid("sql.default_row_limit must be a positive integer")
    timeout_ms = body.get("timeout_ms", DEFAULT_TIMEOUT_MS)
    if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms < 1:
        raise invalid("timeout_ms must be a positive integer")
    return query, parameters, min(row_limit, MAX_ROW_LIMIT), min(timeout_ms, MAX_TIMEOUT_MS) / 1000


@routes.post("/v1/orgs/self/queries")
async def run_query(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    query, parameters, row_limit, timeout_s = _parse_query(await read_json(request))

    snapshots: dict[tuple[str, str], Any] = {}

    def snapshot_of(workspace: str, name: str):
        """The same snapshot for planning and running: the plan depends on its schema."""
        if (workspace, name) not in snapshots:
            snapshots[workspace, name] = catalog.snapshot(workspace, name)
        return snapshots[workspace, name]

    def schema_of(workspace: str, name: str):
        snapshot = snapshot_of(workspace, name)
        return None if snapshot is None else snapshot.query_schema

    def plan_and_run() -> tuple[planner.PreparedQuery, engine.QueryResult]:
        prepared = planner.prepare(query, parameters, schema_of)
        return prepared, engine.execute(prepared, snapshot_of, row_limit, timeout_s)

    async with request.app[QUERY_SLOTS]:
        try:
            prepared, result = await asyncio.to_thread(plan_and_run)
        except planner.QueryError as error:
            message = str(error)
            if error.line is not None:
                message += f" (line {error.line}, column {error.column})"
            raise ApiError(400, "QUERY_ERROR", message) from None
        except engine.QueryTimeout as error:
            raise ApiError(408, "QUERY_TIMEOUT", str(error)) from None
    rows = result.table.to_pylist()
    return respond(
        {
            "query_id": str(uuid.uuid4()),
            "status": "COMPLETED",
            "results": rows,
            "results_total_doc_count": len(rows),
            "column_fields": result.column_fields,
            "collections": [f"{ws}.{name}" for ws, name in prepared.collections],
            "stats": {"elapsed_time_ms": round(result.elapsed_ms, 3)},
            "warnings": [],
            "query_errors": [],
        }
    )
