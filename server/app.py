"""The aiohttp application: middlewares, routes, and the catalog's start and stop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from .auth import ApiKeys, require_api_key
from .catalog import Catalog
from .errors import json_errors
from .routes import CATALOG, QUERY_SLOTS, routes

MAX_BODY_BYTES = 8 * 2**20
MAX_CONCURRENT_QUERIES = 8


def make_app(data_dir: Path, keys: ApiKeys) -> web.Application:
    app = web.Application(middlewares=[json_errors, require_api_key(keys)], client_max_size=MAX_BODY_BYTES)
    app.add_routes(routes)

    async def catalog_lifecycle(app: web.Application) -> AsyncIterator[None]:
        catalog = Catalog(data_dir)
        await catalog.start()
        app[CATALOG] = catalog
        app[QUERY_SLOTS] = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)
        yield
        await catalog.stop()

    app.cleanup_ctx.append(catalog_lifecycle)
    return app
