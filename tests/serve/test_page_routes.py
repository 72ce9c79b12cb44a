"""The server side of the owner's page: the page and its assets under a strict CSP, attribute corrections
(PATCH), and picking an image from the owner's dataset (--dataset)."""

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import decode_data_url, png_upload

from veil.export.runtime import OrtEditor
from veil.serve.app import CSP, ServeSettings, create_app
from veil.serve.dataset import FolderDataset
from veil.serve.state import open_state
from veil.errors import DataError


@pytest.fixture(scope="module")
def editor(exports):
    return OrtEditor(exports / "conditional", providers="cpu", threads=1)


@pytest.fixture
def faces(tmp_path, editor):
    """Three owner images (40x48 PNGs) with labels.csv over the model's attributes."""
    folder = tmp_path / "faces"
    folder.mkdir()
    names = editor.attribute_names
    rows = ["file," + ",".join(names)]
    for i in range(3):
        (folder / f"{i:03d}.png").write_bytes(png_upload(seed=10 + i))
        rows.append(f"{i:03d}.png," + ",".join("1" if (i + k) % 2 else "0" for k in range(len(names))))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def client(editor, faces, tmp_path):
    store = open_state(str(tmp_path / "ledger.sqlite"))
    dataset = FolderDataset(faces, attribute_names=editor.attribute_names, resolution=editor.resolution)
    with TestClient(create_app(editor=editor, store=store, settings=ServeSettings(), dataset=dataset),
                    raise_server_exceptions=False) as c:
        yield c
    store.close()


def test_page_and_assets_under_a_strict_csp(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for r in (page, client.get("/v1/info"), client.get("/static/app.js"), client.get("/nothing")):
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self';" in CSP and "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP
    html = page.text
    assert '<script type="module" src="/static/app.js"></script>' in html or 'src="/static/app.js"' in html
    assert "<style" not in html and " style=" not in html and "onclick" not in html  # nothing inline
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert client.get("/static/app.css").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_attributes_can_be_corrected_before_preview(client):
    names = client.get("/v1/info").json()["attribute_names"]
    p = client.get("/v1/info").json()["classifier_attributes"][0]
    s = client.post("/v1/sessions", files={"image": ("f.png", png_upload(), "image/png")}).json()
    flipped = -s["attributes"][p] if s["attributes"][p] else 1
    r = client.patch(f"/v1/sessions/{s['session']}", json={"attributes": {p: flipped}, "protected": [p],
                                                           "level": "high"})
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["attributes"][p] == flipped and state["protected"] == [p] and state["level"]["name"] == "high"
    assert state["left"] == {p: 8.0} and set(state["attributes"]) == set(names)
    for body, field in [({"attributes": {p: 2}}, "attributes"), ({"attributes": {"wings": 1}}, "attributes"),
                        ({"attributes": {p: True}}, f"body.attributes.{p}"), ({"level": "extreme"}, "body.level"),
                        ({"protected": ["wings"]}, "protected"), ({"colour": 1}, "body.colour")]:
        bad = client.patch(f"/v1/sessions/{s['session']}", json=body)
        assert bad.status_code == 422 and bad.json()["field"] == field, (body, bad.text)
    # a value set to unknown cannot stay protected
    unknown = client.patch(f"/v1/sessions/{s['session']}", json={"attributes": {p: 0}})
    assert unknown.status_code == 422 and unknown.json()["field"] == "protected"
    client.post(f"/v1/sessions/{s['session']}/feedback", json={"action": "reject"})
    assert client.patch(f"/v1/sessions/{s['session']}", json={"level": "low"}).status_code == 409


def test_pick_an_image_of_the_dataset(client, faces, editor):
    info = client.get("/v1/info").json()
    assert info["dataset"] == {"available": True, "count": 3}
    page = client.get("/v1/dataset", params={"offset": 1, "limit": 5}).json()
    assert [i["id"] for i in page["items"]] == ["001.png", "002.png"] and page["count"] == 3
    assert decode_data_url(page["items"][0]["image"]).shape == (32, 32, 3)
    s = client.post("/v1/sessions", data={"dataset_image": "001.png"})
    assert s.status_code == 201, s.text
    body = s.json()
    labels = FolderDataset(faces, attribute_names=editor.attribute_names, resolution=32).attributes("001.png")
    assert body["image_id"] == "001.png" and body["attributes"] == labels  # the owner's labels, not guesses
    assert np.array_equal(decode_data_url(body["image"]), decode_data_url(page["items"][0]["image"]))
    for data, files in [({"dataset_image": "../etc/passwd"}, None), ({"dataset_image": "001.png"},
                        {"image": ("f.png", png_upload(), "image/png")}), ({}, None)]:
        r = client.post("/v1/sessions", data=data, files=files)
        assert r.status_code == 422 and r.json()["field"] in ("dataset_image", "image"), r.text
    assert client.get("/v1/dataset", params={"limit": 1000}).status_code == 422


def test_dataset_folder_errors_name_the_file(tmp_path):
    (tmp_path / "labels.csv").write_text("file,smiling\n../outside.png,1\n")
    with pytest.raises(DataError, match="line 2"):
        FolderDataset(tmp_path, attribute_names=["smiling"], resolution=32)
    with pytest.raises(DataError, match="not a folder"):
        FolderDataset(tmp_path / "nothing", attribute_names=["smiling"], resolution=32)
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file,smiling\na.png,maybe\n")
    with pytest.raises(DataError, match="-1/1 or 0/1"):
        FolderDataset(tmp_path, attribute_names=["smiling"], resolution=32)
