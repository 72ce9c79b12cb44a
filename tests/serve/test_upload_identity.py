"""Budgets follow the record, not the bytes (issue 30): an upload that near-duplicates a face the server has
seen (an earlier upload, or a --dataset image) takes that record's image id, so its releases compose with
the earlier ones; a dataset pick and the upload of the same file are one record. On SQLite and PostgreSQL
(the store), and through the HTTP API (the tiny ORT editor the other serve tests share)."""

import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from veil.export.runtime import OrtEditor
from veil.lightning_modules.data.synthetic_faces import SyntheticFaces
from veil.privacy.identity import fingerprint
from veil.serve.app import ServeSettings, create_app
from veil.serve.dataset import FolderDataset
from veil.serve.images import from_png, png_bytes, to_model_input
from veil.serve.state import open_state

LEVEL = {"name": "low", "epsilon": 1.0, "strength": 0.5, "encoding": "rr"}


@pytest.fixture(scope="module")
def face_pixels():
    ds = SyntheticFaces(num_images=6, resolution=32, seed=3)
    return [ds.image_uint8(i).copy() for i in range(6)]


def encoded(u8, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format=fmt, **kw)
    return buf.getvalue()


def one_pixel(u8):
    out = u8.copy()
    out[10, 20] = 255 - out[10, 20]
    return out


def upscaled(u8, side=128):
    return np.asarray(Image.fromarray(u8).resize((side, side), Image.Resampling.LANCZOS))


def served_fp(u8):
    return fingerprint(from_png(png_bytes(to_model_input(u8, resolution=32))))


# ------------------------------------------------------------------------------------------ the store
@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    return request.getfixturevalue("pg_database")


def _session(store, image_id, fp):
    token = store.create_session(image_id=image_id, image_png=b"png", attributes={"smiling": 1}, guesses=None,
                                 protected=["smiling"], level=dict(LEVEL), fingerprint=fp)
    return store.session(token).image_id


def test_the_store_gives_a_near_duplicate_the_first_record_and_the_dataset_wins(target, face_pixels):
    a, b, c = face_pixels[:3]
    with open_state(target) as store:
        assert _session(store, "img-a", served_fp(a)) == "img-a"
        assert _session(store, "img-a-jpeg", served_fp(np.asarray(Image.open(io.BytesIO(
            encoded(a, "JPEG", quality=75)))))) == "img-a"
        assert _session(store, "img-a-pixel", served_fp(one_pixel(a))) == "img-a"
        assert _session(store, "img-b", served_fp(b)) == "img-b"  # another face: another record
        assert _session(store, "img-b-128", served_fp(upscaled(b))) == "img-b"
        assert _session(store, "img-fixed", None) == "img-fixed"  # no fingerprint: the id given
        # the owner's dataset holds c and (later registered) b: its id wins over the earlier upload of b
        assert store.register_dataset(["c.png", "b.png"], {"c.png": served_fp(c), "b.png": served_fp(b)}.get) == 2
        assert store.register_dataset(["c.png", "b.png"], None) == 0  # once per store and list
        assert _session(store, "img-c", served_fp(c)) == "c.png"
        assert _session(store, "img-b-again", served_fp(one_pixel(b))) == "b.png"
    with open_state(target) as again:  # a restart (or another replica) reads the same records
        assert again.register_dataset(["c.png", "b.png"], None) == 0
        assert _session(again, "img-new", served_fp(a)) == "img-a"


def test_two_replicas_given_one_new_face_at_once_make_one_record(target, face_pixels):
    stores = [open_state(target), open_state(target)]
    try:
        copies = [served_fp(face_pixels[4]), served_fp(one_pixel(face_pixels[4]))] * 4
        start, ids = threading.Barrier(len(copies)), [None] * len(copies)

        def go(i):
            start.wait()
            ids[i] = _session(stores[i % 2], f"img-{i}", copies[i])
        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(copies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(set(ids)) == 1 and ids[0].startswith("img-"), ids
    finally:
        for store in stores:
            store.close()


# ------------------------------------------------------------------------------------------ the HTTP API
@pytest.fixture(scope="module")
def editor(exports):
    return OrtEditor(exports / "conditional", providers="cpu", threads=1)


@pytest.fixture
def faces_folder(tmp_path, editor, face_pixels):
    folder = tmp_path / "faces"
    folder.mkdir()
    names = editor.attribute_names
    rows = ["file," + ",".join(names)]
    for i in range(3):
        (folder / f"{i:03d}.png").write_bytes(encoded(face_pixels[i]))
        rows.append(f"{i:03d}.png," + ",".join("1" if (i + k) % 2 else "-1" for k in range(len(names))))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def client(editor, faces_folder, tmp_path):
    store = open_state(str(tmp_path / "ledger.sqlite"), budget=float("inf"))  # every level affordable: spends show
    dataset = FolderDataset(faces_folder, attribute_names=editor.attribute_names, resolution=editor.resolution)
    with TestClient(create_app(editor=editor, store=store, settings=ServeSettings(), dataset=dataset),
                    raise_server_exceptions=False) as c:
        yield c
    store.close()


def upload(client, data: bytes, protected: str, name="face.png"):
    names = client.get("/v1/info").json()["attribute_names"]
    attributes = {n: (1 if n == protected else -1) for n in names}
    r = client.post("/v1/sessions", files={"image": (name, data, "image/png")},
                    data={"attributes": json.dumps(attributes), "protected": json.dumps([protected]), "level": "high"})
    assert r.status_code == 201, r.text
    return r.json()


def test_a_copy_of_an_uploaded_face_shares_its_budget(client, face_pixels):
    # Issue 30: the same face re-encoded, changed in one pixel or resized was a new image with a fresh budget.
    p = client.get("/v1/info").json()["classifier_attributes"][0]
    face = face_pixels[5]  # not in the dataset
    first = upload(client, encoded(face), p)
    assert first["image_id"].startswith("img-") and first["history"] == []
    accepted = client.post(f"/v1/sessions/{first['session']}/feedback",
                           json={"action": "accept", "idempotency_key": "identity-key-1"})
    assert accepted.status_code == 200, accepted.text
    after = client.get(f"/v1/sessions/{first['session']}").json()
    assert len(after["history"]) == 1 and after["spent"]
    for data, name in [(encoded(face, "JPEG", quality=75), "face.jpg"), (encoded(one_pixel(face)), "pixel.png"),
                       (encoded(upscaled(face)), "big.png")]:
        copy = upload(client, data, p, name)
        assert copy["image_id"] == first["image_id"], name
        assert copy["history"] == after["history"] and copy["spent"] == after["spent"], name  # the earlier release
    other = upload(client, encoded(face_pixels[4]), p)
    assert other["image_id"] != first["image_id"] and other["history"] == []


def test_a_dataset_pick_and_its_upload_are_one_record(client, faces_folder, face_pixels):
    picked = client.post("/v1/sessions", data={"dataset_image": "001.png"})
    assert picked.status_code == 201 and picked.json()["image_id"] == "001.png"
    p = client.get("/v1/info").json()["classifier_attributes"][0]
    assert upload(client, (faces_folder / "001.png").read_bytes(), p)["image_id"] == "001.png"
    assert upload(client, encoded(face_pixels[1], "JPEG", quality=75), p, "f.jpg")["image_id"] == "001.png"
    assert upload(client, encoded(upscaled(face_pixels[2])), p)["image_id"] == "002.png"  # never picked
