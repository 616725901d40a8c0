"""The aiohttp application: middlewares, routes, and the catalog's start and stop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from .auth import ApiKeys, require_api_key
from .catalog import Catalog
from .errors import json_errors
from .lambdas import LAMBDAS, LambdaStore
from .lambdas import routes as lambda_routes
from .queries import MAX_CONCURRENT_QUERIES, QUERY_SLOTS, RESULT_PAGES, ResultPages
from .queries import routes as query_routes
from .routes import CATALOG, revalidate_console, routes

MAX_BODY_BYTES = 8 * 2**20


def make_app(data_dir: Path, keys: ApiKeys) -> web.Application:
    app = web.Application(middlewares=[json_errors, require_api_key(keys)], client_max_size=MAX_BODY_BYTES)
    app.add_routes(routes)
    app.add_routes(query_routes)
    app.add_routes(lambda_routes)
    app.on_response_prepare.append(revalidate_console)

    async def catalog_lifecycle(app: web.Application) -> AsyncIterator[None]:
        catalog = Catalog(data_dir)
        await catalog.start()
        app[CATALOG] = catalog
        app[QUERY_SLOTS] = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)
        app[RESULT_PAGES] = ResultPages()
        app[LAMBDAS] = LambdaStore(data_dir / "lambdas.json")
        yield
        await catalog.stop()

    app.cleanup_ctx.append(catalog_lifecycle)
    return app
