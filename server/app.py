"""The aiohttp application: middlewares, routes, and the catalog's start and stop."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from .auth import API_KEYS, ApiKeys, WithoutApiKeys, require_api_key
from .auth import routes as key_routes
from .catalog import Catalog
from .errors import json_errors
from .lambdas import LAMBDAS, LambdaStore
from .lambdas import routes as lambda_routes
from .queries import QUERY_RUNNER, RESULT_PAGES, QueryLimits, QueryRunner, ResultPages
from .queries import routes as query_routes
from .routes import CATALOG, revalidate_console, routes

MAX_BODY_BYTES = 8 * 2**20
# After SIGTERM, how long queries in flight may take to finish before they are cancelled (503).
SHUTDOWN_GRACE_S = 5.0


def make_app(data_dir: Path, keys: ApiKeys, limits: QueryLimits = QueryLimits()) -> web.Application:
    app = web.Application(middlewares=[json_errors, require_api_key(keys)], client_max_size=MAX_BODY_BYTES)
    if not any(isinstance(f, WithoutApiKeys) for f in logging.getLogger("aiohttp.server").filters):
        logging.getLogger("aiohttp.server").addFilter(WithoutApiKeys())
    app.add_routes(routes)
    app.add_routes(query_routes)
    app.add_routes(lambda_routes)
    app.add_routes(key_routes)
    app[API_KEYS] = keys
    app.on_response_prepare.append(revalidate_console)

    async def catalog_lifecycle(app: web.Application) -> AsyncIterator[None]:
        catalog = Catalog(data_dir)
        await catalog.start()
        app[CATALOG] = catalog
        app[QUERY_RUNNER] = runner = QueryRunner(limits)
        app[RESULT_PAGES] = ResultPages()
        app[LAMBDAS] = LambdaStore(data_dir / "lambdas.json")
        yield
        await runner.close()
        await catalog.stop()

    app.cleanup_ctx.append(catalog_lifecycle)

    async def cancel_queries_after_grace(app: web.Application) -> None:
        # on_shutdown runs once the server stopped accepting, before it waits for handlers.
        asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S, app[QUERY_RUNNER].cancel_all)

    app.on_shutdown.append(cancel_queries_after_grace)
    return app
