"""API keys: `Authorization: ApiKey <key>` on every /v1 call.

Keys are kept only as SHA-256 digests (in `api_keys.json`, owner-only) and compared in
constant time. A key given with --api-key or SHOAL_API_KEY is used as is and not stored;
otherwise the first start generates one, stores its digest and prints the key once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import orjson
from aiohttp import web

from .errors import error_response

KEYS_FILE = "api_keys.json"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, digests: list[str]) -> None:
        self._digests = digests

    def verify(self, key: str) -> bool:
        candidate = _digest(key)
        # Compare against every digest so the time taken does not depend on which one matched.
        return any([hmac.compare_digest(candidate, digest) for digest in self._digests])

    @classmethod
    def load(cls, data_dir: Path, given_key: str | None) -> tuple["ApiKeys", str | None]:
        """The keys to accept, and a newly generated key to print once (or None)."""
        if given_key:
            return cls([_digest(given_key)]), None
        path = data_dir / KEYS_FILE
        if path.exists():
            return cls([entry["sha256"] for entry in orjson.loads(path.read_bytes())["keys"]]), None
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps({"keys": [{"name": "default", "sha256": _digest(key)}]}))
        return cls([_digest(key)]), key


def require_api_key(keys: ApiKeys):
    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "apikey" or not key.strip() or not keys.verify(key.strip()):
                return error_response(
                    401, "AUTHEXCEPTION", "missing or invalid API key: send the header 'Authorization: ApiKey <key>'"
                )
        return await handler(request)

    return middleware
