"""API errors: every failure a client sees is JSON `{"message", "type"}` with a 4xx/5xx status."""

from __future__ import annotations

import logging

from aiohttp import web
import orjson

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_INPUT", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "ALREADY_EXISTS", message)


def error_response(status: int, type_: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"message": message, "type": type_}),
        content_type="application/json",
    )


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Turn every error, including aiohttp's own 404/405/413, into the JSON error shape."""
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error.status, error.type, error.message)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        # aiohttp's own text says more than the reason when it is not just "413: <reason>"
        # ("Maximum request body size 8388608 exceeded, actual body size 9437198").
        detailed = error.text and not error.text.startswith(f"{error.status}:")
        return error_response(error.status, error.reason.upper().replace(" ", "_"), error.text if detailed else error.reason)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(500, "INTERNAL_ERROR", "internal error; the server log has the details")
