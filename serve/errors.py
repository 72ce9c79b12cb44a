"""Errors of ``veil serve`` as HTTP answers, handled in one place: ``{"error": message, "field": name}``.

    veil error                 status
    ApiError                   its own (401 token, 404, 409 closed session, 422 bad field)
    request validation         422, the field's location joined by dots ("body.epsilon", "path.session")
    ImageRejected              413 too large, 415 not a PNG/JPEG, 422 damaged
    UnknownSession             404          SessionClosed   409
    PrivacyError               409 (budget exhausted, a release the ledger refuses)
    ConfigError / DataError    422
    Overloaded                 503 with Retry-After
    BodyTooLarge               413 (``BodyLimit`` counts the bytes as they arrive, Content-Length or not)
    anything else              500 "internal error", logged with its traceback, never sent

``sse(event, data)`` formats one server-sent event.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from veil.errors import ConfigError, DataError, PrivacyError, VeilError
from veil.serve.batcher import Overloaded
from veil.serve.images import ImageRejected
from veil.serve.state import SessionClosed, UnknownSession

__all__ = ["ApiError", "BodyLimit", "BodyTooLarge", "install_error_handlers", "sse"]

log = logging.getLogger("veil.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


class BodyTooLarge(Exception):
    pass


def _answer(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def _location(loc) -> str:
    return ".".join(str(part) for part in loc if part != "__root__")


def install_error_handlers(app: FastAPI, metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _answer(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = _location(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            message = f"body: not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
            where = "body"
        else:
            message = f"{where}: {first.get('msg')}" + (f" ({len(errors) - 1} more)" if len(errors) > 1 else "")
        return _answer(422, message, where or "body")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _answer(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(VeilError)
    async def veil_error(request: Request, exc: VeilError):
        if isinstance(exc, Overloaded):
            metrics.overloaded.inc()
            return _answer(503, f"overloaded: {exc}", None, {"Retry-After": str(exc.retry_after)})
        if isinstance(exc, ImageRejected):
            return _answer(exc.status, str(exc), "image")
        if isinstance(exc, UnknownSession):
            return _answer(404, str(exc), "session")
        if isinstance(exc, SessionClosed):
            return _answer(409, str(exc), "session")
        if isinstance(exc, PrivacyError):
            return _answer(409, str(exc), "protected")
        if isinstance(exc, (ConfigError, DataError)):
            return _answer(422, str(exc), None)
        return _answer(400, str(exc), None)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge):
        return _answer(413, str(exc), "body")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        route = getattr(request.scope.get("route"), "path", "unmatched")  # the template: a raw path holds capabilities
        log.exception("internal error on %s %s", request.method, route)
        return _answer(500, "internal error (logged on the server)", None)


class BodyLimit:
    """Plain ASGI: refuse a request body over ``max_bytes``, by its Content-Length or by counting as it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = _answer(413, f"body: {int(length)} bytes is over the limit of {self.max_bytes}", "body")
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"body: more than {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


def sse(event: str, data: dict) -> str:
    """One server-sent event: ``event: NAME`` and one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
