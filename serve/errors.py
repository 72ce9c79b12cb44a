"""Errors of ``veil serve`` as HTTP answers, handled in one place: ``{"error": message, "field": name}``.

    veil error                 status
    ApiError                   its own (401 token, 404, 409 closed session, 422 bad field)
    request validation         422, the field's location joined by dots ("body.epsilon", "path.session")
    ImageRejected              413 too large, 415 not a PNG/JPEG, 422 damaged
    UnknownSession             404          SessionClosed   409
    PrivacyError               409 (budget exhausted, a release the ledger refuses)
    ConfigError / DataError    422
    Overloaded                 503 with Retry-After
    BodyTooLarge               413 (``BodyLimit`` counts the bytes as they arrive, Content-Length or not: a
                               chunked body over the limit is a 413 too, whatever the route made of the cut)
    JSON nested too deep       422 (``JsonGuardRoute``: parsed before FastAPI does, RecursionError caught)
    an unparsable body         400 (a malformed multipart form)
    anything else              500 "internal error", logged with its traceback, never sent

``error_responses(*codes)`` declares them in the OpenAPI schema with the body the server sends (``ErrorBody``);
``sse(event, data)`` formats one server-sent event.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from veil.errors import ConfigError, DataError, PrivacyError, VeilError
from veil.serve.batcher import Overloaded
from veil.serve.images import ImageRejected
from veil.serve.schemas import ErrorBody
from veil.serve.state import SessionClosed, UnknownSession

__all__ = ["ApiError", "BodyLimit", "BodyTooLarge", "JsonGuardRoute", "error_responses", "install_error_handlers",
           "loads_json", "sse"]

ERRORS = {  # status -> what it means on this server (the OpenAPI descriptions)
    400: "a body that cannot be parsed (e.g. a malformed multipart form)",
    401: "no or wrong server token (only when the server has one)",
    404: "unknown session (or a malformed capability)",
    409: "the session is closed, or the ledger refuses the release (budget spent, protected pixels, another level)",
    413: "the body or the image is over the server's limits (bytes, side, pixels)",
    415: "the upload is not a PNG or JPEG by its bytes",
    422: "a field is malformed, of the wrong type, unknown or out of range (named in `field`)",
    500: "an unexpected failure: logged on the server, no traceback sent",
    503: "overloaded: retry after the Retry-After header's seconds",
}
_HEADERS = {401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer (Basic on the docs)"}},
            503: {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}}


def error_responses(*codes: int) -> dict:
    """The OpenAPI ``responses`` of a route that may answer ``codes`` (each with ``ErrorBody``, the real body)."""
    return {code: {"model": ErrorBody, "description": ERRORS[code], **({"headers": _HEADERS[code]}
                                                                       if code in _HEADERS else {})}
            for code in sorted(codes)}

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
    """Plain ASGI: refuse a request body over ``max_bytes``, by its Content-Length or by counting as it arrives.

    Counting raises ``BodyTooLarge`` inside the app's ``receive``; whatever the app then answers (FastAPI turns a
    failed body read into a 400) is replaced by the 413, which is what happened."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = _answer(413, f"body: {int(length)} bytes is over the limit of {self.max_bytes}", "body")
            return await response(scope, receive, send)
        seen, over, started = 0, False, False

        async def counted():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise BodyTooLarge(f"body: more than {self.max_bytes} bytes")
            return message

        async def answer_413():
            nonlocal started
            started = True
            await _answer(413, f"body: more than {self.max_bytes} bytes (sent without a Content-Length)",
                          "body")(scope, receive, send)

        async def guarded(message):
            nonlocal started
            if over:  # the app's answer to a body it could not read whole: the 413 instead, once
                if message["type"] == "http.response.start" and not started:
                    await answer_413()
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except BodyTooLarge:
            if started:
                raise
            await answer_413()


def loads_json(text: str | bytes, name: str):
    """``json.loads`` without NaN or infinity; a nesting too deep for the parser is a 422 naming ``name``, never
    a RecursionError (ValueError for malformed JSON, as ``json.loads``)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(422, f"{name}: JSON nested too deeply", name) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


class JsonGuardRoute(APIRoute):
    """A route that parses a JSON body before FastAPI does, so that nesting too deep for the parser is a 422
    (FastAPI's own parse would turn the RecursionError into a 400). Starlette keeps the parsed body on the
    request, so it is parsed once."""  # a JSON body's NaN is refused later, by the strict pydantic models

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            if request.headers.get("content-type", "").split(";")[0].strip().lower().endswith("json"):
                try:
                    await request.json()  # kept on the request: FastAPI's parse reuses it
                except RecursionError:
                    raise ApiError(422, "body: JSON nested too deeply", "body") from None
                except ValueError:
                    pass  # malformed: FastAPI's own parse answers it (422 json_invalid)
            return await handler(request)

        return guarded


def sse(event: str, data: dict) -> str:
    """One server-sent event: ``event: NAME`` and one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
