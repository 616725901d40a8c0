"""REST handlers, Rockset's paths and shapes. Each handler: parse → execute → render."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from shoal.ingest.decode import binary_text

from .catalog import Catalog, LiveCollection, now_iso
from .errors import invalid
from .specs import collection_json, integration_json, parse_collection, parse_integration

CATALOG = web.AppKey("catalog", Catalog)

routes = web.RouteTableDef()

# The console: static files, no build step, no API key (the page asks for it and sends it).
CONSOLE_DIR = Path(__file__).parent / "static"
# Everything the page loads comes from this server; no inline script can run.
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return binary_text(value)
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


@routes.get("/")
async def console(request: web.Request) -> web.FileResponse:
    return web.FileResponse(CONSOLE_DIR / "index.html", headers={"Content-Security-Policy": CONSOLE_CSP})


routes.static("/static", CONSOLE_DIR)


async def revalidate_console(request: web.Request, response: web.StreamResponse) -> None:
    """The browser asks again each time (a 304 when unchanged), so an upgraded server never
    runs with an old copy of some of the console's modules."""
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-cache"


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
