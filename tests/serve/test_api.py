"""veil serve in-process (FastAPI's test client): every route, the edit loop to release, and every bad-input class.

Every answer any test here gets is checked against the OpenAPI schema: its status must be one the route declares
(``answers_are_declared``), so the schema lists the error responses the server really gives."""

import json
import zipfile
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import AnswerLog, decode_data_url, png_upload, read_sse

from veil.export.runtime import OrtEditor
from veil.privacy.ledger import PrivacyLedger
from veil.privacy.revision_manifest import pseudonym
from veil.serve.app import ServeSettings, create_app
from veil.serve.images import ImageLimits
from veil.serve.state import open_state

TOKEN = "t" * 32
ANSWERS = AnswerLog()


@pytest.fixture(autouse=True)
def answers_are_declared():
    """After each test: every status a route answered is among the responses its OpenAPI schema declares."""
    ANSWERS.seen.clear()
    yield
    assert ANSWERS.undeclared() == [], "answered but not declared in the OpenAPI schema"


@pytest.fixture(scope="module")
def editor(exports):
    return OrtEditor(exports / "conditional", providers="cpu", threads=1)


def make_client(editor, path, *, budget=None, **settings):
    store = open_state(str(path), budget=budget)
    app = create_app(editor=editor, store=store, settings=ServeSettings(**settings),
                     data_spec={"source": "synthetic", "seed": 0})
    client = TestClient(app, raise_server_exceptions=False)
    ANSWERS.watch(app, client)
    return client, store


@pytest.fixture
def client(editor, tmp_path):
    c, store = make_client(editor, tmp_path / "ledger.sqlite")
    with c:
        yield c
    store.close()


def protected_name(client):
    return client.get("/v1/info").json()["classifier_attributes"][0]


def new_session(client, *, seed=0, attributes=None, protected=None, level=None):
    data = {}
    if attributes is not None:
        data["attributes"] = json.dumps(attributes)
    if protected is not None:
        data["protected"] = json.dumps(protected)
    if level is not None:
        data["level"] = level
    r = client.post("/v1/sessions", files={"image": ("face.png", png_upload(seed=seed), "image/png")}, data=data)
    assert r.status_code == 201, r.text
    return r.json()


def known(client, attribute, value=1):
    names = client.get("/v1/info").json()["attribute_names"]
    return {n: (value if n == attribute else -1) for n in names}


def accept(client, sid, key):
    return client.post(f"/v1/sessions/{sid}/feedback", json={"action": "accept", "idempotency_key": key})


# ------------------------------------------------------------------------------------------ routes
def test_openapi_documents_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/healthz", "/metrics", "/v1/info", "/v1/sessions", "/v1/sessions/{session}",
                  "/v1/sessions/{session}/previews", "/v1/sessions/{session}/feedback", "/v1/revision"):
        assert route in paths, route


def test_health_info_and_metrics(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["state"] == "sqlite" and h["provider"] == "CPUExecutionProvider"
    info = client.get("/v1/info").json()
    assert [lv["name"] for lv in info["levels"]] == ["low", "medium", "high", "max"]
    assert info["classifier"] is True and info["resolution"] == 32 and info["budget"] == 8.0
    text = client.get("/metrics").text
    assert 'veil_requests_total{method="GET",route="/v1/info",status="200"} 1.0' in text
    assert "veil_queue_depth" in text and "veil_batch_rows_bucket" in text


def test_session_from_guesses_and_from_given_attributes(client):
    s = new_session(client)
    assert len(s["session"]) >= 40 and s["image_id"].startswith("img-")
    assert set(s["guesses"]) == set(s["attributes"])
    for name, g in s["guesses"].items():
        assert s["attributes"][name] == g["value"] and 0 <= g["confidence"] <= 1
    assert decode_data_url(s["image"]).shape == (32, 32, 3)
    p = protected_name(client)
    given = new_session(client, seed=1, attributes=known(client, p), protected=[p], level="high")
    assert given["attributes"][p] == 1 and given["protected"] == [p] and given["level"]["name"] == "high"
    state = client.get(f"/v1/sessions/{given['session']}").json()
    assert state["session"] is None and state["image"] is None  # the capability and image only on creation
    assert state["left"] == {p: 8.0} and state["history"] == []


def test_preview_streams_refining_candidates(client):
    p = protected_name(client)
    s = new_session(client, attributes=known(client, p), protected=[p])
    r = client.post(f"/v1/sessions/{s['session']}/previews", json={"level": "high", "n": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = read_sse(r.text)
    kinds = [e for e, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("candidate") == 3
    steps = [d for e, d in events if e == "preview"]
    assert steps and all(len(d["images"]) == 3 for d in steps)
    assert [d["step"] for d in steps] == sorted(d["step"] for d in steps) and steps[-1]["step"] < steps[-1]["steps"]
    for _, d in [e for e in events if e[0] == "candidate"]:
        assert decode_data_url(d["image"]).shape == (32, 32, 3)
        flipped = {n for n, v in d["released_attributes"].items() if v != s["attributes"][n] and n != p}
        assert not flipped  # only the protected attribute may change
        assert d["probability"] == pytest.approx(0.731059 if d["released_attributes"][p] == 1 else 0.268941, abs=1e-5)
    assert client.get(f"/v1/sessions/{s['session']}").json()["level"]["name"] == "high"  # the owner's choice is kept


def test_feedback_moves_the_level_then_accept_releases_once(client):
    p = protected_name(client)
    s = new_session(client, attributes=known(client, p), protected=[p], level="medium")
    sid = s["session"]
    r = client.post(f"/v1/sessions/{sid}/feedback", json={"action": "more_private"}).json()
    assert r["level"]["name"] == "high" and r["decision"] is None and "high" in r["suggestion"]
    assert client.post(f"/v1/sessions/{sid}/feedback", json={"action": "less_private"}).json()["level"]["name"] == "medium"
    first = accept(client, sid, "key-00000001")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["decision"] in ("accepted", "refused")
    if body["decision"] == "accepted":
        rel = body["release"]
        assert rel["cost"][p] == 2.0 and decode_data_url(rel["image"]).shape == (32, 32, 3)
        # medium: labels at epsilon 2, pixels from fresh noise (mu 0: the image is not read), both priced
        assert rel["cost"]["price"] == {"label_epsilon": 2.0, "labels": 1, "pixel_mu": 0.0, "encoding": "fresh"}
        assert rel["cost"]["pixels_protected"] is True
        assert set(rel["released_attributes"]) == set(s["attributes"])
    again = accept(client, sid, "key-00000001").json()  # a retry: the same answer, nothing spent twice
    assert again["replayed"] is True and again["release"] == body["release"]
    state = client.get(f"/v1/sessions/{sid}").json()
    assert state["spent"] == {p: 2.0} and state["left"] == {p: 6.0} and len(state["history"]) == 1
    assert "seed" not in state["history"][0]
    other = accept(client, sid, "key-00000002")
    assert other.status_code == 409 and other.json()["field"] == "session"
    assert client.post(f"/v1/sessions/{sid}/previews", json={}).status_code == 409


def test_a_refused_release_says_why_in_words(editor, tmp_path, monkeypatch):
    monkeypatch.setattr(editor, "check_threshold", 1.0 + 1e-9)  # no edit can pass its check
    c, store = make_client(editor, tmp_path / "r.sqlite")
    with c:
        p = protected_name(c)
        sid = new_session(c, attributes=known(c, p), protected=[p])["session"]
        body = accept(c, sid, "refused-key-1").json()
        assert body["decision"] == "refused" and body["release"] is None, body
        assert "{" not in body["refusal"] and f"the checker read {p} " in body["refusal"], body["refusal"]
        assert "each needs 100%" in body["refusal"] and "charged all the same" in body["refusal"]
        assert set(body["check"]["shown"]) == {p} and body["check"]["attempts"] >= 1
    store.close()


def test_reject_closes_the_session(client):
    p = protected_name(client)
    sid = new_session(client, attributes=known(client, p), protected=[p])["session"]
    assert client.post(f"/v1/sessions/{sid}/feedback", json={"action": "reject"}).json()["decision"] == "rejected"
    assert client.post(f"/v1/sessions/{sid}/feedback", json={"action": "more_private"}).status_code == 409


def test_budget_is_checked_per_image_across_sessions(editor, tmp_path):
    c, store = make_client(editor, tmp_path / "small.sqlite", budget=2.0)
    with c:
        p = protected_name(c)
        outcomes = []
        for i in range(3):  # the same picture each time: its releases compose
            sid = new_session(c, attributes=known(c, p), protected=[p], level="high")["session"]
            outcomes.append(accept(c, sid, f"budget-key-{i}"))
        assert [r.status_code for r in outcomes] == [200, 200, 409]
        err = outcomes[2].json()
        assert "budget" in err["error"] and err["field"] == "protected"
        state = c.get(f"/v1/sessions/{sid}").json()
        assert state["spent"] == {p: 2.0} and state["left"] == {p: 0.0}
    store.close()
    assert len(PrivacyLedger(tmp_path / "small.sqlite").releases()) == 2  # ordinary ledger rows


def test_revision_is_publishable(client):
    p = protected_name(client)
    accepted = []
    for seed in (3, 4):
        s = new_session(client, seed=seed, attributes=known(client, p), protected=[p], level="max")
        r = accept(client, s["session"], f"rev-key-{seed}")
        assert r.status_code == 200
        if r.json()["decision"] == "accepted":
            accepted.append(s["image_id"])
    r = client.get("/v1/revision")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(r.content))
    manifest = json.loads(z.read("manifest.json"))
    assert manifest["format"] == "veil-revision-published/1"
    # issue 34: records are named by their pseudonym under the dataset's key (in its database), not by image id
    key = client.app.state.ctx.store.ledger.pseudonym_key()
    assert sorted(c["id"] for c in manifest["changes"]) == sorted(pseudonym(i, key=key) for i in accepted)
    assert not set(accepted) & {c["id"] for c in manifest["changes"]} and manifest["ids"] == "pseudonymous"
    for change in manifest["changes"]:
        assert "original_attributes" not in change and change["file"] in z.namelist()
        assert set(change["released_attributes"]) == set(known(client, p))
    assert "seed" not in json.dumps(manifest["changes"])


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("payload, status, field", [
    (b"not an image at all", 415, "image"),
    (png_upload()[:60], 422, "image"),  # truncated
    (png_upload(width=8, height=8), 422, "image"),  # below the minimum side
    (b"", 422, "image"),
])
def test_bad_uploads_are_4xx_naming_the_field(client, payload, status, field):
    r = client.post("/v1/sessions", files={"image": ("face.png", payload, "image/png")})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and "Traceback" not in r.text


def test_upload_limits_and_decompression_bomb(editor, tmp_path):
    from PIL import Image

    limits = ImageLimits(max_bytes=64 << 10, max_pixels=100_000)
    c, store = make_client(editor, tmp_path / "l.sqlite", limits=limits)
    with c:
        assert Image.MAX_IMAGE_PIXELS == 100_000  # Pillow's guard at the server's limit
        big = png_upload(width=200, height=200, seed=1)  # random pixels: ~120 KiB
        r = c.post("/v1/sessions", files={"image": ("a.png", big, "image/png")})
        assert r.status_code == 413 and r.json()["field"] in ("image", "body")
        bomb = io.BytesIO()  # 3000x3000 of zeros: ~26 KiB on the wire, 9 M pixels once decoded
        Image.new("RGB", (3000, 3000)).save(bomb, format="PNG")
        assert len(bomb.getvalue()) < limits.max_bytes
        r = c.post("/v1/sessions", files={"image": ("b.png", bomb.getvalue(), "image/png")})
        assert r.status_code == 413 and "pixels" in r.json()["error"], r.text
        jpeg = c.post("/v1/sessions", files={"image": ("c.txt", png_upload(fmt="JPEG"), "text/plain")})
        assert jpeg.status_code == 201  # a JPEG is read from its bytes, whatever its name and content type
    store.close()


def test_bad_json_bodies(client):
    p = protected_name(client)
    sid = new_session(client, attributes=known(client, p), protected=[p])["session"]
    url = f"/v1/sessions/{sid}/previews"
    cases = [
        (b"{not json", "body"),
        (b'{"epsilon": NaN}', "body.epsilon"),
        (b'{"epsilon": Infinity}', "body.epsilon"),
        (json.dumps({"epsilon": "1"}).encode(), "body.epsilon"),
        (json.dumps({"strength": 1.5}).encode(), "body.strength"),
        (json.dumps({"strength": 1e-300}).encode(), "level"),  # in (0, 1] but walks no DDIM step
        (json.dumps({"level": "extreme"}).encode(), "body.level"),
        (json.dumps({"n": 0}).encode(), "body.n"),
        (json.dumps({"n": True}).encode(), "body.n"),
        (json.dumps({"colour": "red"}).encode(), "body.colour"),
        (json.dumps({"protected": ["wings"]}).encode(), "protected"),
        (json.dumps([1, 2]).encode(), "body"),
    ]
    for raw, field in cases:
        r = client.post(url, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
        assert r.json()["field"] == field, (raw, r.json())
    bad = client.post(f"/v1/sessions/{sid}/feedback", json={"action": "sure"})
    assert bad.status_code == 422 and bad.json()["field"] == "body.action"
    nokey = client.post(f"/v1/sessions/{sid}/feedback", json={"action": "accept"})
    assert nokey.status_code == 422 and nokey.json()["field"] == "idempotency_key"


def test_a_chunked_body_over_the_limit_is_413(editor, tmp_path):
    c, store = make_client(editor, tmp_path / "c.sqlite", limits=ImageLimits(max_bytes=16 << 10))
    head = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    with c:
        sid = new_session(c)["session"]
        for url, content_type, first in [("/v1/sessions", "multipart/form-data; boundary=b", head),
                                         (f"/v1/sessions/{sid}/previews", "application/json", b'{"n": 1, "x": "')]:
            chunks = iter([first] + [b"x" * (8 << 10)] * 16)  # 128 KiB, sent without a Content-Length
            r = c.post(url, content=chunks, headers={"content-type": content_type})
            assert "content-length" not in r.request.headers
            assert r.status_code == 413, (url, r.text)  # was 400: FastAPI's "error parsing the body"
            assert r.json()["field"] == "body" and "bytes" in r.json()["error"]
    store.close()


def test_json_nested_ten_thousand_deep_is_422(client):
    p = protected_name(client)
    sid = new_session(client, attributes=known(client, p), protected=[p])["session"]
    deep = "[" * 10_000 + "]" * 10_000
    json_type = {"content-type": "application/json"}
    for method, url, body in [("POST", f"/v1/sessions/{sid}/previews", deep),
                              ("PATCH", f"/v1/sessions/{sid}", '{"protected": ' + deep + "}"),
                              ("POST", f"/v1/sessions/{sid}/feedback", '{"action": ' + deep + "}")]:
        r = client.request(method, url, content=body.encode(), headers=json_type)
        assert r.status_code == 422, (url, r.text)  # was 400
        assert r.json() == {"error": "body: JSON nested too deeply", "field": "body"}
    upload = {"image": ("face.png", png_upload(), "image/png")}
    for name, value in [("protected", deep), ("attributes", '{"a": ' * 10_000 + "1" + "}" * 10_000)]:
        r = client.post("/v1/sessions", files=upload, data={name: value})
        assert r.status_code == 422, (name, r.text)  # was a RecursionError: 500
        assert r.json()["field"] == name and "nested too deeply" in r.json()["error"]


def test_protected_named_twice_is_refused_as_the_cli_refuses_it(client):
    p = protected_name(client)
    upload = {"image": ("face.png", png_upload(), "image/png")}
    r = client.post("/v1/sessions", files=upload, data={"attributes": json.dumps(known(client, p)),
                                                        "protected": json.dumps([p, p])})
    twice = f"protected: {p} listed twice; name each attribute once"  # veil edit --protect's words
    assert r.status_code == 422 and r.json() == {"error": twice, "field": "protected"}, r.text
    sid = new_session(client, attributes=known(client, p), protected=[p])["session"]
    for method, url in [("PATCH", f"/v1/sessions/{sid}"), ("POST", f"/v1/sessions/{sid}/previews")]:
        r = client.request(method, url, json={"protected": [p, p]})
        assert r.status_code == 422 and r.json() == {"error": twice, "field": "protected"}, (url, r.text)
    assert client.get(f"/v1/sessions/{sid}").json()["protected"] == [p]


def test_bad_session_fields(client):
    upload = {"image": ("face.png", png_upload(), "image/png")}
    for data, field in [({"attributes": "{oops"}, "attributes"), ({"attributes": '{"wings": 1}'}, "attributes"),
                        ({"attributes": '{"smiling": 2}'}, "attributes"), ({"attributes": '{"smiling": NaN}'}, "attributes"),
                        ({"protected": '"smiling"'}, "protected"), ({"protected": '["wings"]'}, "protected"),
                        ({"level": "extreme"}, "body.level")]:
        r = client.post("/v1/sessions", files=upload, data=data)
        assert r.status_code == 422, (data, r.text)
        assert r.json()["field"] == field, (data, r.json())


def test_unknown_sessions_and_routes(client):
    assert client.get("/v1/sessions/" + "x" * 43).status_code == 404
    assert client.post("/v1/sessions/" + "x" * 43 + "/previews", json={}).status_code == 404
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]


def test_token_required_when_set(editor, tmp_path):
    c, store = make_client(editor, tmp_path / "t.sqlite", token=TOKEN)
    with c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/v1/info")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/metrics").status_code == 401
    store.close()


def test_internal_errors_are_500_without_traceback(editor, tmp_path, monkeypatch):
    c, store = make_client(editor, tmp_path / "e.sqlite")

    def broken(images):
        raise RuntimeError("secret detail /home/owner/data")

    monkeypatch.setattr(editor, "propose", broken)
    with c:
        r = c.post("/v1/sessions", files={"image": ("face.png", png_upload(), "image/png")})
        assert r.status_code == 500
        assert r.json() == {"error": "internal error (logged on the server)", "field": None}
        assert c.get("/healthz").status_code == 200  # still serving
    store.close()


def test_one_session_cannot_read_another(client):
    p = protected_name(client)
    a = new_session(client, seed=5, attributes=known(client, p), protected=[p])
    b = new_session(client, seed=6, attributes=known(client, p), protected=[p])
    assert a["session"] != b["session"] and a["image_id"] != b["image_id"]
    state = client.get(f"/v1/sessions/{a['session']}").json()
    assert state["image_id"] == a["image_id"] and b["image_id"] not in json.dumps(state)
    assert np.array_equal(decode_data_url(a["image"]), decode_data_url(new_session(client, seed=5)["image"]))


def test_overload_is_shed_with_503_and_retry_after(editor, tmp_path, monkeypatch):
    import threading
    import time

    gate, real = threading.Event(), editor.regenerate

    def held(*args, **kwargs):  # the worker is busy until the gate opens
        gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(editor, "regenerate", held)
    c, store = make_client(editor, tmp_path / "o.sqlite", max_queue=1, max_wait_ms=0)
    with c:
        p = protected_name(c)
        sid = new_session(c, attributes=known(c, p), protected=[p])["session"]
        url, answers = f"/v1/sessions/{sid}/previews", []
        threads = [threading.Thread(target=lambda: answers.append(c.post(url, json={"n": 1}))) for _ in range(2)]
        for t in threads:  # one runs (held at the gate), one waits in the queue of 1
            t.start()
            time.sleep(0.5)
        shed = c.post(url, json={"n": 1})
        assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
        assert shed.json()["error"].startswith("overloaded")
        gate.set()
        for t in threads:
            t.join(60)
        assert [read_sse(r.text)[-1][0] for r in answers] == ["done", "done"]  # the admitted ones complete
        assert "veil_overloaded_total 1.0" in c.get("/metrics").text
    store.close()
