"""The server token (``--token``): with one set, every route but /healthz and the page's own files needs it.

    auth = token_dependencies(settings.token)          # [] without a token
    @app.get("/v1/info", dependencies=auth["api"])     # Authorization: Bearer <token>
    @app.get("/docs", dependencies=auth["docs"])       # Bearer, or HTTP Basic with the token as the password

The API wants the Bearer token (the page asks for it and keeps it in ``sessionStorage``; Swagger UI's Authorize
button sends it). A browser cannot send a Bearer token when it opens /docs, so the docs (the HTML shell, Swagger
UI's files and /openapi.json: read-only GETs) also take HTTP Basic, any user name and the token as the password,
and their 401 asks the browser for it. Basic is taken there only: a browser's remembered Basic credentials never
drive an edit. Tokens are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from veil.serve.errors import ApiError

__all__ = ["token_dependencies", "DOCS_REALM"]

DOCS_REALM = 'Basic realm="veil serve: the server token as the password", charset="UTF-8"'
_bearer = HTTPBearer(auto_error=False, description="the server token (veil serve --token or $VEIL_SERVE_TOKEN)")


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def _basic_password(header: str | None) -> str:
    """The password of an ``Authorization: Basic`` header ("" if there is none or it is malformed)."""
    if not header or not header.lower().startswith("basic "):
        return ""
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


def token_dependencies(token: str | None) -> dict[str, list]:
    """``{"api": [...], "docs": [...]}``: the dependencies that check ``token`` (both empty when it is None)."""
    if token is None:
        return {"api": [], "docs": []}

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)):
        if credentials is None or not _same(credentials.credentials, token):
            raise ApiError(401, "missing or wrong server token: send 'Authorization: Bearer <token>'",
                           "Authorization", headers={"WWW-Authenticate": "Bearer"})

    def require_docs_token(request: Request):
        header = request.headers.get("authorization")
        given = header[7:] if header and header.startswith("Bearer ") else _basic_password(header)
        if not _same(given, token):
            raise ApiError(401, "missing or wrong server token: the docs want 'Authorization: Bearer <token>', or "
                                "HTTP Basic with the token as the password (the browser asks for it)",
                           "Authorization", headers={"WWW-Authenticate": DOCS_REALM})

    return {"api": [Depends(require_token)], "docs": [Depends(require_docs_token)]}
