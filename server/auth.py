"""API keys: `Authorization: ApiKey <key>` on every /v1 call, and Rockset's endpoints to
create, list and revoke named keys (`/v1/orgs/self/users/self/apikeys`).

Two kinds of key open the API:

- Named keys, kept in `api_keys.json` (owner-only, replaced atomically) as SHA-256 digests
  with their name, role, creation time and last four characters. A key is shown once, in
  the answer that creates it; listings show `key` masked. Deleting a key revokes it for the
  very next request. The last named key cannot be deleted while no startup key is
  configured, so nobody locks themselves out of their own server.
- The startup key, given with --api-key or SHOAL_API_KEY: accepted as long as the server
  runs with it, never stored, listed or deletable through the API (change it by restarting
  with another). Without one, the first start generates a named key `default`, stores its
  digest and shows the key once (`server/cli.py`: on a terminal, else in an owner-only file).

Keys are random 256-bit secrets, so a plain SHA-256 digest is enough (no password
stretching); a candidate is compared against every digest in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from shoal.ingest.aws import without_secrets

from .catalog import now_iso, write_private
from .errors import ApiError, conflict, error_response, invalid, not_found
from .routes import read_json, respond
from .specs import check_name

KEYS_FILE = "api_keys.json"
# Rockset's built-in roles; Shoal has one user with full access, so only `admin` is honest.
ROLES = ("admin",)


class WithoutApiKeys(logging.Filter):
    """For aiohttp's server log: a request it cannot parse (say, a control character in a
    header) is logged with the raw line, so an Authorization header's key would be written to
    the log. The key is replaced, in the message and in the traceback's text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not record.exc_text:  # kept: handlers may read the exception itself
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = without_secrets(record.getMessage()), None
        if record.exc_text:
            record.exc_text = without_secrets(record.exc_text)
        return True


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """64 alphanumeric characters, as Rockset's keys."""
    return secrets.token_hex(32)


@dataclass(frozen=True)
class NamedKey:
    name: str
    sha256: str
    created_at: str | None = None
    role: str = "admin"
    last4: str = ""

    def render(self, key: str | None = None) -> dict[str, Any]:
        """Rockset's ApiKey object; `key` in full only when just created."""
        return {
            "name": self.name,
            "key": key if key is not None else "*" * 60 + self.last4,
            "created_at": self.created_at,
            "role": self.role,
            "state": "ACTIVE",
        }


class ApiKeys:
    def __init__(self, path: Path, named: list[NamedKey], startup_digest: str | None) -> None:
        self._path = path
        self._named = {k.name: k for k in named}
        self._startup_digest = startup_digest

    def verify(self, key: str) -> bool:
        candidate = _digest(key)
        digests = [k.sha256 for k in self._named.values()]
        if self._startup_digest:
            digests.append(self._startup_digest)
        # Compare against every digest so the time taken does not depend on which one matched.
        return any([hmac.compare_digest(candidate, digest) for digest in digests])

    @classmethod
    def load(cls, data_dir: Path, given_key: str | None) -> tuple["ApiKeys", str | None]:
        """The keys to accept, and a newly generated key to print once (or None)."""
        path = data_dir / KEYS_FILE
        named = [NamedKey(**entry) for entry in orjson.loads(path.read_bytes())["keys"]] if path.exists() else []
        keys = cls(path, named, _digest(given_key) if given_key else None)
        if given_key or named:
            return keys, None
        return keys, keys.create("default", "admin")[1]

    def named(self) -> list[NamedKey]:
        return list(self._named.values())

    def get(self, name: str) -> NamedKey:
        if name not in self._named:
            raise not_found(f"API key '{name}' does not exist")
        return self._named[name]

    def create(self, name: str, role: str) -> tuple[NamedKey, str]:
        if name in self._named:
            raise conflict(f"API key '{name}' already exists")
        key = new_key()
        entry = NamedKey(name, _digest(key), now_iso(), role, key[-4:])
        self._save({**self._named, name: entry})
        return entry, key

    def delete(self, name: str) -> NamedKey:
        entry = self.get(name)
        if len(self._named) == 1 and not self._startup_digest:
            raise ApiError(409, "LAST_API_KEY", f"API key '{name}' is the only key of this server: create another first")
        self._save({n: k for n, k in self._named.items() if n != name})
        return entry

    def _save(self, named: dict[str, NamedKey]) -> None:
        """Persist first, then accept: a key the file does not hold never works."""
        write_private(self._path, orjson.dumps({"keys": [asdict(k) for k in named.values()]}))
        self._named = named


API_KEYS = web.AppKey("api_keys", ApiKeys)


def require_api_key(keys: ApiKeys):
    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            key = key.strip()
            # (A key is ASCII; other header bytes reach here as surrogates, which encode() refuses.)
            if scheme.lower() != "apikey" or not key or not key.isascii() or not keys.verify(key):
                return error_response(
                    401, "AUTHEXCEPTION", "missing or invalid API key: send the header 'Authorization: ApiKey <key>'"
                )
        return await handler(request)

    return middleware


# ------------------------------------------------------------------ Rockset's API key endpoints

routes = web.RouteTableDef()
USER_KEYS = "/v1/orgs/self/users/{user}/apikeys"


def _keys_of(request: web.Request) -> ApiKeys:
    if request.match_info["user"] != "self":
        raise not_found("Shoal has a single user: use /v1/orgs/self/users/self/apikeys")
    return request.app[API_KEYS]


@routes.post(USER_KEYS)
async def create_api_key(request: web.Request) -> web.Response:
    keys = _keys_of(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid('body must be {"name": "...", "role": "admin"}')
    unknown = set(body) - {"name", "role", "created_by"}
    if unknown:
        raise invalid(f"unknown fields: {', '.join(sorted(unknown))}")
    name = check_name("API key", body.get("name"))
    role = body.get("role") or "admin"
    if role not in ROLES:
        raise invalid(f"role must be one of {', '.join(ROLES)}: every key of a Shoal server has full access")
    entry, key = keys.create(name, role)
    return respond({"data": entry.render(key)})


@routes.get(USER_KEYS)
async def list_api_keys(request: web.Request) -> web.Response:
    return respond({"data": [k.render() for k in _keys_of(request).named()]})


@routes.get(USER_KEYS + "/{name}")
async def get_api_key(request: web.Request) -> web.Response:
    return respond({"data": _keys_of(request).get(request.match_info["name"]).render()})


@routes.delete(USER_KEYS + "/{name}")
async def delete_api_key(request: web.Request) -> web.Response:
    return respond({"data": _keys_of(request).delete(request.match_info["name"]).render()})
