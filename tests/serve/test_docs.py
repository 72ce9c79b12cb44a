"""The API's documentation, /docs: Swagger UI from the server's own files under its CSP (no CDN, no inline
script), the OpenAPI schema's error responses, and the server token on every route but /healthz and the page.

In-process (FastAPI's test client), then the real ``veil serve`` in headless Chromium: /docs lists the API's
operations, with and without a token, with no CSP violation; the screenshot lands in $VEIL_TEST_ARTIFACTS (and
in docs/serve_docs.png when that file does not exist yet).
"""

import base64
import re
import shutil

import pytest
from browser import REPO, ensure_chromium, screenshot, start_chromium
from fastapi.testclient import TestClient
from serve_helpers import AnswerLog

from veil.export.runtime import OrtEditor
from veil.serve.app import CSP, ServeSettings, create_app
from veil.serve.state import open_state

TOKEN = "d" * 32
ROUTES = ["/healthz", "/metrics", "/v1/info", "/v1/dataset", "/v1/sessions", "/v1/sessions/{session}",
          "/v1/sessions/{session}/previews", "/v1/sessions/{session}/feedback", "/v1/revision"]
OPERATIONS = 10  # the routes above: /v1/sessions/{session} has GET and PATCH


@pytest.fixture(scope="module")
def editor(exports):
    return OrtEditor(exports / "conditional", providers="cpu", threads=1)


@pytest.fixture
def make(editor, tmp_path):
    """make(token=None) -> (client, app); the stores are closed after the test."""
    stores = []

    def build(token=None):
        store = open_state(str(tmp_path / f"docs{len(stores)}.sqlite"))
        stores.append(store)
        app = create_app(editor=editor, store=store, settings=ServeSettings(token=token))
        return TestClient(app, raise_server_exceptions=False), app

    yield build
    for store in stores:
        store.close()


def _basic(password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"owner:{password}".encode()).decode()}


def test_docs_come_from_the_server_itself_under_its_csp(make):
    client, _ = make()
    with client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
        assert "unsafe" not in CSP  # neither 'unsafe-inline' nor 'unsafe-eval' was needed
        html = page.text
        assert "<script>" not in html and "style=" not in html and "<style" not in html  # nothing inline
        assert not re.search(r"(src|href)=\"(https?:)?//", html), "an asset from elsewhere"
        assets = re.findall(r"(?:src|href)=\"([^\"]+)\"", html)
        assert sorted(assets) == sorted(f"docs/assets/{n}" for n in ("favicon.png", "swagger-ui.css",
                                                                      "swagger-ui-bundle.js", "init.js"))
        for asset in assets:
            r = client.get("/" + asset)
            assert r.status_code == 200 and len(r.content) > 200 or asset.endswith("init.js"), asset
        assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").text
        assert "validatorUrl: null" in client.get("/docs/assets/init.js").text  # nothing sent to swagger.io
        assert client.get("/docs/assets/../app.py").status_code == 404
        assert client.get("/docs/assets/swagger-ui.js.map").status_code == 404
        assert client.get("/openapi.json").json()["info"]["title"] == "veil serve"


def test_the_schema_declares_each_route_errors_with_the_body_the_server_sends(make):
    client, _ = make()
    token_client, _ = make(TOKEN)
    with client, token_client:
        schema = client.get("/openapi.json").json()
        with_token = token_client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        error = client.get("/v1/sessions/" + "x" * 43).json()  # a real error body
    assert sorted(schema["components"]["schemas"]["ErrorBody"]["properties"]) == sorted(error) == ["error", "field"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # the 422s are ErrorBody too
    expected = {"/v1/sessions": {"400", "413", "415", "422", "503"}, "/v1/sessions/{session}/previews":
                {"400", "404", "409", "413", "422", "503"}, "/v1/sessions/{session}/feedback":
                {"400", "404", "409", "413", "422", "503"}, "/v1/dataset": {"422"}}
    for route in ROUTES:
        assert route in schema["paths"], route
        for method, op in schema["paths"][route].items():
            codes = {c for c in op["responses"] if c.startswith(("4", "5"))}
            assert expected.get(route, set()) <= codes, (route, method, codes)
            assert "500" in codes and "401" not in codes, (route, method)
            for code in codes:
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (route, code, ref)
            guarded = with_token["paths"][route][method]["responses"]
            assert ("401" in guarded) == (route != "/healthz"), (route, method)
    assert with_token["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"  # Swagger's Authorize


def test_the_token_guards_every_route_but_healthz_and_the_page(make):
    client, app = make(TOKEN)
    answers = AnswerLog()
    answers.watch(app, client)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with client:
        for path in ["/healthz", "/", "/static/app.js", "/static/app.css"]:  # the page loads, then asks
            assert client.get(path).status_code == 200, path
        checked = []
        for route in app.routes:
            methods = getattr(route, "methods", None) or {"GET"}
            path = route.path.replace("{session}", "x" * 43).replace("{name}", "init.js")
            if path in ("/healthz", "/") or path.startswith("/static"):
                continue
            for method in methods - {"HEAD"}:
                for headers in [{}, {"Authorization": "Bearer wrong-token-0123456789"}, _basic("wrong")]:
                    r = client.request(method, path, headers=headers)
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.json()["field"] == "Authorization"
                checked.append((method, route.path))
        assert len(checked) == OPERATIONS - 1 + 3, checked  # all but /healthz; /docs, /openapi.json, its assets
        assert client.get("/v1/info", headers=bearer).status_code == 200
        assert client.get("/metrics", headers=bearer).status_code == 200
        docs = client.get("/docs")
        assert docs.headers["www-authenticate"].startswith("Basic realm=")  # so that a browser asks for it
        for path in ["/docs", "/openapi.json", "/docs/assets/swagger-ui.css"]:  # Bearer, or Basic with the token
            assert client.get(path, headers=bearer).status_code == 200, path
            assert client.get(path, headers=_basic(TOKEN)).status_code == 200, path
        r = client.get("/v1/info", headers=_basic(TOKEN))  # a browser's Basic credentials drive no API route
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert answers.undeclared() == []


# ------------------------------------------------------------------------------------------ in Chromium
def _swagger_operations(driver, timeout: float = 60) -> list[str]:
    from selenium.webdriver.support.ui import WebDriverWait

    def listed(d):
        ops = d.execute_script("return [...document.querySelectorAll('.opblock-summary')].map(e => e.innerText)")
        return ops if len(ops) >= OPERATIONS else False

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(listed, "Swagger UI listed no operations")


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"] or "Uncaught" in e["message"] or e["level"] == "SEVERE"]


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "token"])
def test_docs_show_the_api_in_headless_chromium(exports, tmp_path, token):
    from serve_process import Server

    ensure_chromium()
    extra = ("--token", token) if token else ()
    server = Server(exports / "conditional", tmp_path / "ledger.sqlite", *extra, log_path=tmp_path / "serve.log")
    driver = None
    try:
        driver = start_chromium(tmp_path, width=1200, height=1000)
        if token:  # what the browser sends once the owner typed the token into its Basic prompt
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": _basic(token)})
        driver.get(server.url + "/docs")
        ops = _swagger_operations(driver)
        text = "\n".join(ops)
        for route in ROUTES:
            assert route in text, (route, text)
        assert driver.execute_script("return document.querySelector('.info .title').innerText").startswith("veil serve")
        assert _console_errors(driver) == []
        if token is None:
            shot = screenshot(driver, "serve_docs")
            docs_png = REPO / "docs" / "serve_docs.png"
            if not docs_png.exists():
                shutil.copyfile(shot, docs_png)
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
