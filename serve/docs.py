"""``/docs``: Swagger UI from files the server serves itself, under its Content-Security-Policy, with no internet.

    GET /openapi.json             the schema
    GET /docs                     an HTML shell: no inline script or style, so the CSP needs no exception
    GET /docs/assets/{name}       swagger-ui-bundle.js, swagger-ui.css, favicon.png: the copy of swagger-ui-dist
                                  that the ``fastapi-offline`` package ships (its package data, nothing fetched);
                                  init.js: SwaggerUIBundle on ./openapi.json (below)

FastAPI's own /docs loads Swagger UI from a CDN with an inline script, which the server's CSP (only its own
scripts) blocks, and a deployment may have no internet at all. With a server token, all three need it
(``veil.serve.auth``: Bearer, or HTTP Basic with the token as the password, which a browser asks for); Swagger
UI's Authorize button then takes the Bearer token for "Try it out".
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from veil.serve.errors import ApiError

__all__ = ["install_docs", "SWAGGER_UI"]

SWAGGER_UI = Path(str(files(fastapi_offline) / "static"))  # swagger-ui-dist 5, as fastapi-offline ships it
ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
          "favicon.png": "image/png"}

# relative URLs: /docs -> docs/assets/..., openapi.json (so that a proxy's path prefix keeps working)
SHELL = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{title} - API</title>
  <link rel="icon" type="image/png" href="docs/assets/favicon.png">
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"><noscript>The API documentation needs JavaScript; the schema is at openapi.json.</noscript></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script src="docs/assets/init.js"></script>
</body>
</html>
"""

# validatorUrl null: Swagger UI would otherwise send the schema to validator.swagger.io
INIT = """window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  docExpansion: "list",
  defaultModelsExpandDepth: 0,
});
"""


def install_docs(app: FastAPI, *, auth: list) -> None:
    """Add /openapi.json, /docs and its assets to ``app`` (made with ``docs_url=None, openapi_url=None``)."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    def openapi_schema():
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=auth)
    def docs_page():
        return HTMLResponse(SHELL.format(title=app.title), headers={"Cache-Control": "no-cache"})

    @app.get("/docs/assets/{name}", include_in_schema=False, dependencies=auth)
    def docs_asset(name: str):
        if name == "init.js":
            return Response(INIT, media_type="text/javascript; charset=utf-8")
        if name not in ASSETS:
            raise ApiError(404, f"{name}: not a file of the API documentation", "name")
        return FileResponse(SWAGGER_UI / name, media_type=ASSETS[name], headers={"Cache-Control": "max-age=3600"})
