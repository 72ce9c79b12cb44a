"""The owner's page in a real headless browser (Chromium + Selenium) against the real ``veil serve``: one full
edit (upload, the classifier's guesses, protect, a streamed preview, more private, accept, the release and
the budget it cost, the revision's zip), the error of a bad upload, a phone's width, and the CSP.

Screenshots (mid-edit, after accept, the error) land in $VEIL_TEST_ARTIFACTS (default <repo>/test-artifacts/);
the mid-edit one is copied to docs/serve_page.png when that file does not exist yet.
"""

import base64
import shutil
import zipfile

import pytest
from browser import (
    REPO,
    ScriptedApi,
    ensure_chromium,
    screenshot,
    set_viewport,
    start_chromium,
)
from serve_helpers import png_upload


def synthetic_face_png() -> bytes:
    """One of the embedded synthetic faces (eyeglasses, smiling), 64x64, as PNG: what an owner would upload."""
    import io

    import numpy as np
    from PIL import Image

    from veil.lightning_modules.data.synthetic_faces import render_face

    attrs = {"smiling": True, "eyeglasses": True, "hat": False, "dark_hair": True, "beard": False, "pale_skin": True}
    buf = io.BytesIO()
    Image.fromarray(render_face(attrs, resolution=64, rng=np.random.default_rng(7))).save(buf, format="PNG")
    return buf.getvalue()
from serve_process import Server

WAIT_S = 60  # generous: the tiny model is fast, but the machine is shared


@pytest.fixture
def page(exports, tmp_path):
    """(driver, server, info, downloads folder): the page loaded in Chromium from a fresh server."""
    ensure_chromium()
    server = Server(exports / "conditional", tmp_path / "ledger.sqlite", log_path=tmp_path / "serve.log")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = None
    try:
        driver = start_chromium(downloads)
        driver.get(server.url + "/")
        yield driver, server, server.client.get("/v1/info").json(), downloads
    finally:
        if driver is not None:
            driver.quit()
        server.stop()


def _wait(driver, condition, message: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d):
        try:
            return condition(d)
        except Exception:  # noqa: BLE001 - an element replaced mid-check: look again
            return False

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check, message)


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _final_candidates(driver) -> list:
    from selenium.webdriver.common.by import By

    return [li.find_element(By.TAG_NAME, "img").get_attribute("src")
            for li in driver.find_elements(By.CSS_SELECTOR, "#candidates li.final")]


def test_one_edit_from_upload_to_revision(page, tmp_path):
    from selenium.webdriver.common.by import By

    driver, server, info, downloads = page
    assert "script-src 'self'" in server.client.get("/").headers["content-security-policy"]
    _wait(driver, lambda d: "Ready" in _text(d, "status"), "the page did not load /v1/info")
    levels = driver.find_element(By.ID, "level-options").get_attribute("textContent")  # shown once there is an image
    for level in info["levels"]:  # each level with its one-line explanation, from /v1/info
        assert level["explanation"] in levels

    # 1. upload: the attributes arrive pre-filled with the classifier's guesses
    face = tmp_path / "face.png"
    face.write_bytes(synthetic_face_png())
    driver.find_element(By.ID, "file").send_keys(str(face))
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attributes li")) == len(info["attribute_names"]),
          "the attributes did not appear after the upload")
    assert driver.find_element(By.ID, "original").get_attribute("src").startswith("data:image/png")
    assert "% sure" in _text(driver, "attributes")
    unlabelled = driver.execute_script(
        "return [...document.querySelectorAll('input:not([type=hidden]):not([hidden]), select, button')]"
        ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()"
        " && !e.querySelector('img[alt]')).map(e => e.id || e.outerHTML)")
    assert unlabelled == [], f"controls without a label: {unlabelled}"
    p = info["classifier_attributes"][0]

    # 2. correct an attribute (the switch shows the server's answer), then protect one
    value = driver.find_element(By.ID, f"value-{p}")
    before = value.is_selected()
    driver.find_element(By.CSS_SELECTOR, f"label[for='value-{p}']").click()
    _wait(driver, lambda d: d.find_element(By.ID, f"value-{p}").is_selected() != before and "Saved" in _text(d, "status"),
          "the corrected attribute was not saved")
    driver.find_element(By.CSS_SELECTOR, f"label[for='protect-{p}']").click()
    budget = info["budget"]
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"#budget-table td[data-attribute='{p}']").text
          == f"{budget:g}", "the protected attribute's budget did not appear")

    # 3. preview: the candidates stream in beside the original, refined every few steps before the final ones
    driver.execute_script(  # (DevTools' own script: the page's CSP does not apply to it)
        "window.srcChanges = 0; new MutationObserver(ms => { window.srcChanges += ms.length; })"
        ".observe(document.getElementById('candidates'), {subtree: true, attributeFilter: ['src']});")
    driver.find_element(By.ID, "preview-button").click()
    _wait(driver, lambda d: len(_final_candidates(d)) == 4 and "ready" in _text(d, "status"), "no candidates")
    assert driver.execute_script("return window.srcChanges") > 4, "no intermediate preview before the candidates"
    assert all(src.startswith("data:image/png") for src in _final_candidates(driver))
    assert driver.find_element(By.ID, "level-medium").is_selected()
    driver.execute_script("window.scrollTo(0, 0)")
    mid_edit = screenshot(driver, "serve_page_mid_edit")
    docs_png = REPO / "docs" / "serve_page.png"
    if not docs_png.exists():
        shutil.copyfile(mid_edit, docs_png)

    # 4. more private: the level moves up and the preview runs again at it
    old = driver.find_element(By.CSS_SELECTOR, "#candidates li")
    driver.find_element(By.ID, "more-private").click()
    _wait(driver, lambda d: d.find_element(By.ID, "level-high").is_selected(), "more private did not move the level")
    _wait(driver, lambda d: _stale(old) and len(_final_candidates(d)) == 4 and "ready" in _text(d, "status"),
          "no candidates at the more private level")

    # 5. accept: the release (or the refusal the check may give a tiny model) and what it cost
    driver.find_element(By.ID, "accept").click()
    _wait(driver, lambda d: d.find_element(By.ID, "release").is_displayed()
          and ("Release #" in _text(d, "release-summary") or "Refused" in _text(d, "release-summary")),
          "no release after accept")
    high = next(lv for lv in info["levels"] if lv["name"] == "high")
    spent_left = f"{budget - high['epsilon']:g}"
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"#budget-table td[data-attribute='{p}']").text
          == spent_left, f"the budget left did not drop to {spent_left}")
    history = driver.find_elements(By.CSS_SELECTOR, "#history-table tbody tr")
    assert len(history) == 1 and "high" in history[0].text
    assert f"{p}: ε {high['epsilon']:g}" in _text(driver, "release-cost")  # a refused draw is charged too
    if "Refused" not in _text(driver, "release-summary"):
        assert driver.find_element(By.ID, "released-image").get_attribute("src").startswith("data:image/png")
        assert f"{p}: " in _text(driver, "released-attributes")
    assert not driver.find_element(By.ID, "accept").is_enabled()  # the session is closed
    screenshot(driver, "serve_page_after_accept")

    # 6. the publishable revision, downloaded by the page
    driver.find_element(By.ID, "download").click()
    zipped = downloads / "veil-revision.zip"
    _wait(driver, lambda d: zipped.exists() and not list(downloads.glob("*.crdownload")), "no revision downloaded")
    with zipfile.ZipFile(zipped) as z:
        assert "manifest.json" in z.namelist()

    # 7. a phone's width: nothing wider than the window
    set_viewport(driver, 375, 812)
    _wait(driver, lambda d: d.execute_script("return window.innerWidth") == 375, "the window did not narrow")
    widths = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"horizontal overflow at 375 px: {widths}"
    driver.execute_script("document.getElementById('release').scrollIntoView()")
    screenshot(driver, "serve_page_375px")

    _no_csp_violations(driver)


def test_bad_uploads_say_what_is_wrong(page, tmp_path):
    from selenium.webdriver.common.by import By

    driver, _, info, _ = page
    _wait(driver, lambda d: "Ready" in _text(d, "status"), "the page did not load /v1/info")
    _focus_is_visible(driver)
    not_image = tmp_path / "notes.png"  # named .png, but not one by its bytes: the server answers 415
    not_image.write_text("these are not pixels\n" * 10)
    driver.find_element(By.ID, "file").send_keys(str(not_image))
    _wait(driver, lambda d: d.find_element(By.ID, "message").is_displayed(), "no error message for a non-image")
    assert "not a PNG or JPEG" in _text(driver, "message")
    assert driver.find_element(By.ID, "file").get_attribute("aria-invalid") == "true"
    screenshot(driver, "serve_page_error")

    big = tmp_path / "big.png"  # over the server's limit: refused before it is sent
    big.write_bytes(png_upload(32, 32) + b"\0" * (info["max_upload_bytes"] + 1))
    driver.find_element(By.ID, "message-close").click()
    driver.find_element(By.ID, "file").send_keys(str(big))
    _wait(driver, lambda d: "too large" in _text(d, "message"), "no error message for an oversized file")
    assert driver.find_element(By.ID, "edit").get_attribute("hidden") is not None  # no session was started
    _no_csp_violations(driver)



def test_token_overload_and_spent_budget_are_explained(tmp_path):
    """Against a scripted API: the page asks for the token and sends it on every request, takes a dropped file,
    says how long to wait when the server is overloaded (Retry-After) and retries then, and says when the budget
    refuses a release."""
    from selenium.webdriver.common.by import By

    ensure_chromium()
    token, s = "scripted-token-0123456789", "c" * 43
    info, state, created = _scripted_bodies(s)
    protected = {**state, "protected": ["smiling"], "spent": {"smiling": 7.5}, "left": {"smiling": 0.5}}
    api = ScriptedApi({
        ("GET", "/v1/info"): [(200, info, {})],
        ("POST", "/v1/sessions"): [(503, {"error": "overloaded: 64 requests are waiting", "field": None},
                                    {"Retry-After": "2"}), (201, created, {})],
        ("PATCH", f"/v1/sessions/{s}"): [(200, protected, {})],
        ("POST", f"/v1/sessions/{s}/feedback"): [(409, {"error": "budget: smiling has 0.5 left, this release "
                                                                 "costs 2", "field": "protected"}, {})],
    }, token=token)
    driver = start_chromium(tmp_path)
    try:
        driver.get(api.url + "/")
        _wait(driver, lambda d: d.find_element(By.ID, "token-form").is_displayed(), "no token prompt on 401")
        assert "token" in _text(driver, "message")
        driver.find_element(By.ID, "token").send_keys(token + "\n")
        _wait(driver, lambda d: "Ready" in _text(d, "status"), "the token was not used")

        driver.execute_script(  # drag and drop: a PNG file dropped on the drop zone
            "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0)), dt = new DataTransfer();"
            "dt.items.add(new File([bytes], 'face.png', {type: 'image/png'}));"
            "document.getElementById('drop-zone').dispatchEvent("
            "  new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
            base64.b64encode(png_upload(seed=1)).decode())
        _wait(driver, lambda d: "retry in 2 seconds" in _text(d, "message"), "no Retry-After in the overload message")
        retry = driver.find_element(By.ID, "message-retry")
        assert not retry.is_enabled()  # not before Retry-After
        _wait(driver, lambda d: retry.is_enabled(), "Retry was not offered after Retry-After", timeout=10)
        retry.click()
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attributes li")) == 2, "the retry did not land")
        assert "90% sure" in _text(driver, "attributes")

        driver.find_element(By.CSS_SELECTOR, "label[for='protect-smiling']").click()
        _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#budget-table td[data-attribute='smiling']").text
              == "0.5", "the budget left was not shown")
        driver.find_element(By.ID, "accept").click()
        _wait(driver, lambda d: "privacy budget" in _text(d, "message"), "no message for a spent budget")
        assert "0.5 left" in _text(driver, "message") and not driver.find_element(By.ID, "release").is_displayed()
        screenshot(driver, "serve_page_budget_spent")

        infos = [i for i, (_, path, _) in enumerate(api.requests) if path == "/v1/info"]
        assert len(infos) == 2 and api.requests[infos[0]][2] is None  # asked once without, once with the token
        after_token = api.requests[infos[1]:]
        assert all(auth == f"Bearer {token}" for _, p, auth in after_token if p.startswith("/v1/")), after_token
        assert driver.execute_script("return [sessionStorage.length, localStorage.length]") == [1, 0]
        _no_csp_violations(driver)
    finally:
        driver.quit()
        api.close()


def _scripted_bodies(session: str) -> tuple[dict, dict, dict]:
    """(/v1/info, a session's state, the answer that created it) as the real server words them, for ScriptedApi."""
    from veil.privacy.levels import LEVELS
    from veil.serve.app import LEVEL_HELP

    names = ["smiling", "eyeglasses"]
    info = {"attribute_names": names, "classifier": True, "classifier_attributes": names, "resolution": 32,
            "steps": 6, "budget": 8.0, "default_level": "medium", "max_upload_bytes": 1 << 20,
            "dataset": {"available": False, "count": 0},
            "levels": [{**lv.to_json(), "keep_probability": round(lv.keep_probability, 4), "explanation": LEVEL_HELP[n]}
                       for n, lv in LEVELS.items()]}
    state = {"image_id": "img-1", "attributes": {"smiling": 1, "eyeglasses": -1}, "protected": [],
             "guesses": {"smiling": {"value": 1, "confidence": 0.9}, "eyeglasses": {"value": -1, "confidence": 0.8}},
             "level": LEVELS["medium"].to_json(), "decision": None, "release_id": None, "budget": 8.0, "spent": {},
             "left": {}, "history": []}
    image = "data:image/png;base64," + base64.b64encode(png_upload(32, 32)).decode()
    return info, state, {**state, "session": session, "image": image}


def test_a_refused_release_reads_as_a_sentence_across_the_card(tmp_path):
    """A release the check refused: its sentence (with the checker's readings, no Python dict) across the whole
    release card, not squeezed into the column an image would have taken."""
    from selenium.webdriver.common.by import By

    from veil.privacy.levels import LEVELS
    from veil.serve.release import refusal_words

    ensure_chromium()
    token, s = "scripted-token-0123456789", "r" * 43
    info, state, created = _scripted_bodies(s)
    protected = {**state, "protected": ["smiling"], "left": {"smiling": 8.0}}
    check = {"passed": False, "attempts": 3, "strength": 0.6, "guidance_factor": 1.0, "shown": {"smiling": 0.4137},
             "threshold": 0.5}
    refused = {"action": "accept", "decision": "refused", "level": LEVELS["medium"].to_json(), "release_id": 7,
               "release": None, "refusal": refusal_words(check, 0.5), "check": check, "replayed": False,
               "suggestion": "start a new session to try again, at a further cost"}
    closed = {**protected, "decision": "refused", "release_id": 7, "spent": {"smiling": 2.0}, "left": {"smiling": 6.0}}
    api = ScriptedApi({("GET", "/v1/info"): [(200, info, {})], ("POST", "/v1/sessions"): [(201, created, {})],
                       ("PATCH", f"/v1/sessions/{s}"): [(200, protected, {})],
                       ("GET", f"/v1/sessions/{s}"): [(200, closed, {})],
                       ("POST", f"/v1/sessions/{s}/feedback"): [(200, refused, {})]}, token=token)
    driver = start_chromium(tmp_path)
    try:
        driver.get(api.url + "/")
        driver.execute_script(f"sessionStorage.setItem('veil-serve-token', '{token}')")
        driver.get(api.url + "/")
        _wait(driver, lambda d: "Ready" in _text(d, "status"), "the page did not load /v1/info")
        face = tmp_path / "face.png"
        face.write_bytes(png_upload(seed=2))
        driver.find_element(By.ID, "file").send_keys(str(face))
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attributes li")) == 2, "no attributes")
        driver.find_element(By.CSS_SELECTOR, "label[for='protect-smiling']").click()
        _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#budget-table td[data-attribute='smiling']").text
              == "8", "the protected attribute's budget did not appear")
        driver.find_element(By.ID, "accept").click()
        _wait(driver, lambda d: "Refused" in _text(d, "release-summary"), "no refusal after accept")
        summary = _text(driver, "release-summary")
        assert "{" not in summary and "'" not in summary, summary  # no Python dict
        assert "after 3 attempts" in summary and "smiling 41%" in summary and "needs 50%" in summary, summary
        widths = driver.execute_script(
            "const card = document.querySelector('#release .release'), text = document.getElementById('release-summary');"
            "return [text.getBoundingClientRect().width, card.getBoundingClientRect().width]")
        assert widths[0] >= 0.95 * widths[1], f"the refusal is squeezed: {widths}"
        assert not driver.find_element(By.ID, "released-figure").is_displayed()
        driver.execute_script("document.getElementById('release').scrollIntoView()")
        screenshot(driver, "serve_page_refused")
        _no_csp_violations(driver)
    finally:
        driver.quit()
        api.close()


def _stale(element) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        element.is_enabled()
        return False
    except StaleElementReferenceException:
        return True


def _no_csp_violations(driver) -> None:
    logs = driver.get_log("browser")
    bad = [entry["message"] for entry in logs
           if "Content Security Policy" in entry["message"] or "Uncaught" in entry["message"]]
    assert not bad, bad


def _focus_is_visible(driver, presses: int = 3) -> None:
    """Tab through the first controls: each one focused by the keyboard shows an outline."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(presses):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        name, style, width = driver.execute_script(
            "const e = document.activeElement, s = getComputedStyle(e);"
            "return [e.id || e.className || e.tagName, s.outlineStyle, s.outlineWidth];")
        assert name != "BODY" and style != "none" and width != "0px", (name, style, width)
