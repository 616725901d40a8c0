"""Query lambdas (Rockset's saved, parameterised, versioned queries): stored SQL with
default parameters, executed by name and version (or the tag `latest`) with parameters
that override the defaults by name.

Lambdas persist in `lambdas.json` in the data directory (owner-only); each update adds a
version ("1", "2", ...) and never changes an older one, so callers pinned to a version
keep their query. Execution goes through `queries.run_sql`, like any query.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from shoal.sql import planner

from .catalog import now_iso, write_private
from .errors import ApiError, conflict, invalid, not_found
from .queries import parse_options, parse_parameters, run_sql
from .routes import read_json, respond
from .specs import check_name

LATEST = "latest"  # the one tag: the newest version
# The store is rewritten whole on each change, on the event loop: so it stays small (thirty
# versions with a 7 MB default parameter each took 7 s to save and made a 210 MB file).
MAX_VERSION_BYTES = 1024 * 1024
MAX_STORE_BYTES = 32 * 1024 * 1024

routes = web.RouteTableDef()


@dataclass(frozen=True)
class LambdaVersion:
    workspace: str
    name: str
    version: str
    description: str | None
    query: str
    default_parameters: list[dict[str, Any]]
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "workspace": self.workspace,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "created_at": self.created_at,
            "state": "ACTIVE",
            "sql": {"query": self.query, "default_parameters": self.default_parameters},
        }


class LambdaStore:
    """All lambdas of the server, every version kept, persisted on each change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._versions: dict[tuple[str, str], list[LambdaVersion]] = {}
        if path.exists():
            for entry in orjson.loads(path.read_bytes()):
                version = LambdaVersion(**entry)
                self._versions.setdefault((version.workspace, version.name), []).append(version)

    def _save(self) -> None:
        """Write the store; refused (nothing changed on disk) when it would outgrow MAX_STORE_BYTES."""
        text = orjson.dumps([asdict(v) for versions in self._versions.values() for v in versions])
        if len(text) > MAX_STORE_BYTES:
            raise ApiError(400, "INVALID_INPUT", f"query lambdas may take {MAX_STORE_BYTES >> 20} MiB in all: "
                                                 "delete lambdas no longer needed")
        write_private(self.path, text)

    def versions(self, workspace: str, name: str) -> list[LambdaVersion]:
        versions = self._versions.get((workspace, name))
        if not versions:
            raise not_found(f"query lambda '{workspace}.{name}' does not exist")
        return versions

    def version(self, workspace: str, name: str, version: str) -> LambdaVersion:
        for candidate in self.versions(workspace, name):
            if candidate.version == version:
                return candidate
        raise not_found(f"query lambda '{workspace}.{name}' has no version '{version}'")

    def summaries(self, workspace: str | None = None) -> list[dict[str, Any]]:
        return [summary(versions) for (ws, _), versions in self._versions.items() if workspace in (None, ws)]

    def add(self, workspace: str, name: str, body: Any, create: bool) -> LambdaVersion:
        """A new lambda (`create`) or a new version of an existing one, from a request body."""
        exists = (workspace, name) in self._versions
        if create and exists:
            raise conflict(f"query lambda '{workspace}.{name}' already exists")
        previous = self.versions(workspace, name) if not create else []
        description, query, default_parameters = _parse_version(body)
        version = LambdaVersion(workspace, name, str(len(previous) + 1), description, query, default_parameters, now_iso())
        if len(orjson.dumps(asdict(version))) > MAX_VERSION_BYTES:
            raise invalid(f"a query lambda's version (query, description, default parameters) takes at most "
                          f"{MAX_VERSION_BYTES >> 20} MiB")
        self._versions[workspace, name] = [*previous, version]
        try:
            self._save()
        except ApiError:
            self._versions[workspace, name] = previous
            if not previous:
                del self._versions[workspace, name]
            raise
        return version

    def delete(self, workspace: str, name: str) -> list[LambdaVersion]:
        versions = self.versions(workspace, name)
        del self._versions[workspace, name]
        self._save()
        return versions


LAMBDAS = web.AppKey("lambdas", LambdaStore)


def summary(versions: list[LambdaVersion]) -> dict[str, Any]:
    latest = versions[-1]
    return {
        "workspace": latest.workspace,
        "name": latest.name,
        "version_count": len(versions),
        "last_updated": latest.created_at,
        "latest_version": latest.to_json(),
    }


def _parse_version(body: Any) -> tuple[str | None, str, list[dict[str, Any]]]:
    if not isinstance(body, dict) or not isinstance(body.get("sql"), dict):
        raise invalid('body must be {"name": "...", "sql": {"query": "...", "default_parameters": [...]}}')
    unknown = set(body) - {"name", "description", "sql"} or set(body["sql"]) - {"query", "default_parameters"}
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(sorted(unknown))}")
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid("description must be a string")
    query = body["sql"].get("query")
    if not isinstance(query, str) or not query.strip():
        raise invalid("sql.query must be a non-empty string")
    try:
        planner.parse_single_query(query)
    except planner.QueryError as error:
        raise ApiError(400, "QUERY_ERROR", f"sql.query: {error}") from None
    return description, query, parse_parameters(body["sql"].get("default_parameters"), "sql.default_parameters")


async def _execute(request: web.Request, version: LambdaVersion) -> web.Response:
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise invalid("body must be a JSON object: {\"parameters\": [...], \"default_row_limit\": N}")
    given = parse_parameters(body.get("parameters"), "parameters")
    named = {p.get("name"): p for p in version.default_parameters} | {p.get("name"): p for p in given}
    answer = await run_sql(request.app, version.query, list(named.values()), parse_options(body, body))
    return respond(answer)


def _ws_name(request: web.Request) -> tuple[str, str]:
    return request.match_info["workspace"], request.match_info["lambda"]


@routes.post("/v1/orgs/self/ws/{workspace}/lambdas")
async def create_lambda(request: web.Request) -> web.Response:
    workspace = check_name("workspace", request.match_info["workspace"])
    body = await read_json(request)
    name = check_name("query lambda", body.get("name") if isinstance(body, dict) else None)
    return respond({"data": request.app[LAMBDAS].add(workspace, name, body, create=True).to_json()})


@routes.get("/v1/orgs/self/lambdas")
async def list_all_lambdas(request: web.Request) -> web.Response:
    return respond({"data": request.app[LAMBDAS].summaries()})


@routes.get("/v1/orgs/self/ws/{workspace}/lambdas")
async def list_lambdas(request: web.Request) -> web.Response:
    return respond({"data": request.app[LAMBDAS].summaries(request.match_info["workspace"])})


@routes.delete("/v1/orgs/self/ws/{workspace}/lambdas/{lambda}")
async def delete_lambda(request: web.Request) -> web.Response:
    return respond({"data": summary(request.app[LAMBDAS].delete(*_ws_name(request)))})


@routes.post("/v1/orgs/self/ws/{workspace}/lambdas/{lambda}/versions")
async def update_lambda(request: web.Request) -> web.Response:
    body = await read_json(request)
    return respond({"data": request.app[LAMBDAS].add(*_ws_name(request), body, create=False).to_json()})


@routes.get("/v1/orgs/self/ws/{workspace}/lambdas/{lambda}/versions")
async def list_versions(request: web.Request) -> web.Response:
    return respond({"data": [v.to_json() for v in request.app[LAMBDAS].versions(*_ws_name(request))]})


@routes.get("/v1/orgs/self/ws/{workspace}/lambdas/{lambda}/versions/{version}")
async def get_version(request: web.Request) -> web.Response:
    version = request.app[LAMBDAS].version(*_ws_name(request), request.match_info["version"])
    return respond({"data": version.to_json()})


@routes.post("/v1/orgs/self/ws/{workspace}/lambdas/{lambda}/versions/{version}")
async def execute_version(request: web.Request) -> web.Response:
    return await _execute(request, request.app[LAMBDAS].version(*_ws_name(request), request.match_info["version"]))


def _tagged(request: web.Request) -> LambdaVersion:
    if request.match_info["tag"] != LATEST:
        raise not_found(f"unknown tag '{request.match_info['tag']}': the only tag is '{LATEST}'")
    return request.app[LAMBDAS].versions(*_ws_name(request))[-1]


@routes.get("/v1/orgs/self/ws/{workspace}/lambdas/{lambda}/tags/{tag}")
async def get_tag(request: web.Request) -> web.Response:
    return respond({"data": {"tag_name": LATEST, "version": _tagged(request).to_json()}})


@routes.post("/v1/orgs/self/ws/{workspace}/lambdas/{lambda}/tags/{tag}")
async def execute_tag(request: web.Request) -> web.Response:
    return await _execute(request, _tagged(request))
