"""A headless Chromium driven by Selenium, for tests of the owner's page (tests/serve/test_browser.py).

Uses Debian's ``chromium`` and ``chromium-driver`` (/usr/bin/chromium, /usr/bin/chromedriver), installed with
apt-get when missing and running as root; otherwise the tests that need them skip, or fail when CI=true.
Screenshots go to ``$VEIL_TEST_ARTIFACTS`` (default ``<repo>/test-artifacts/``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"a headless browser is needed in CI: {reason}", pytrace=False)
    pytest.skip(f"no headless browser: {reason}")


def _installed() -> bool:
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


def ensure_chromium() -> None:
    """Chromium and its driver on this machine (apt-get when root), else skip (fail in CI)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    if not _installed() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], env=env, capture_output=True,
                       check=False)
    if not _installed():
        _unavailable(f"no {CHROMIUM} and {CHROMEDRIVER} (install Debian's chromium and chromium-driver packages)")


def start_chromium(download_dir: Path, *, width: int = 1200, height: int = 900):
    """A headless Chromium that saves downloads to ``download_dir`` and keeps the browser console log."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False,
                                              "safebrowsing.enabled": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # the preference alone is not always honoured by headless Chromium: say it again through the DevTools protocol
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    set_viewport(driver, width, height)
    return driver


def set_viewport(driver, width: int, height: int) -> None:
    """Size the window so that the page itself (not the window around it) is ``width`` x ``height``."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("VEIL_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(driver, name: str) -> Path:
    """The browser window as ``<artifacts>/<name>.png``."""
    path = artifacts_dir() / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


class ScriptedApi:
    """The page's files and a scripted stand-in for the API on a free loopback port: for the error paths a real
    server cannot be made to take on cue (a token, overload with Retry-After, a spent budget).

    ``routes``: {(method, path): [(status, json_body, headers), ...]}, answered in turn (the last one repeats);
    every /v1 request needs ``Authorization: Bearer <token>`` (401 otherwise). ``requests``: (method, path,
    authorization) of each request, in order. Answers carry the real server's CSP.
    """

    def __init__(self, routes: dict, *, token: str):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from veil.serve.app import CSP

        static, api, self.requests = REPO / "serve" / "static", self, []
        types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
                self.send_response(status)
                for k, v in {"Content-Type": content_type, "Content-Length": str(len(body)),
                             "Content-Security-Policy": CSP, **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _answer(self):
                path = self.path.split("?")[0]
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                api.requests.append((self.command, path, self.headers.get("Authorization")))
                if not path.startswith("/v1/"):
                    f = static / ("index.html" if path == "/" else path.removeprefix("/static/"))
                    if f.parent != static or not f.is_file():
                        return self._send(404, b"{}", "application/json")
                    return self._send(200, f.read_bytes(), types.get(f.suffix, "application/octet-stream"))
                if self.headers.get("Authorization") != f"Bearer {token}":
                    status, body, headers = 401, {"error": "missing or wrong server token", "field": "Authorization"}, {}
                else:
                    queue = routes.get((self.command, path)) or [(404, {"error": "no route", "field": None}, {})]
                    status, body, headers = queue.pop(0) if len(queue) > 1 else queue[0]
                self._send(status, json.dumps(body).encode(), "application/json", headers)

            do_GET = do_POST = do_PATCH = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
