"""One decoder, one resize (issue 34): the server's upload path, its --dataset thumbnails and the folder data
source that training and ``veil edit`` read give byte-identical model inputs for the same file; an upload the
model must enlarge more than 2x is answered with a ``warnings`` field, not refused.

Photos from scikit-image (astronaut, chelsea, camera), saved as the formats an upload may be (PNG, JPEG).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import decode_data_url
from skimage import data as skdata

from veil.lightning_modules.data.image_folder import ImageFolderCSV
from veil.serve.dataset import FolderDataset
from veil.serve.images import ImageLimits, decode_upload, from_png, png_bytes, to_model_input

RESOLUTION = 32


def _photo(kind: str) -> tuple[bytes, str]:
    """(file bytes, name) of a small real photo saved as ``kind``."""
    buf = io.BytesIO()
    if kind == "astronaut.png":  # 120 x 90: not square, shrunk
        Image.fromarray(skdata.astronaut()).resize((120, 90), Image.Resampling.BICUBIC).save(buf, "PNG")
    elif kind == "chelsea.jpg":
        Image.fromarray(skdata.chelsea()).save(buf, "JPEG", quality=90)
    elif kind == "camera16.png":  # 16-bit grey: white at 65535
        Image.fromarray(skdata.camera()[::4, ::4].astype(np.uint16) * 257).save(buf, "PNG")
    elif kind == "cutout.png":  # RGBA, transparent top half
        rgba = np.dstack([skdata.astronaut()[::8, ::8], np.full((64, 64), 255, np.uint8)])
        rgba[:32, :, 3] = 0
        Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    else:  # "rotated.jpg": EXIF orientation 8
        exif = Image.Exif()
        exif[0x0112] = 8
        Image.fromarray(skdata.coffee()[::5, ::5]).save(buf, "JPEG", exif=exif, quality=90)
    return buf.getvalue(), kind


KINDS = ["astronaut.png", "chelsea.jpg", "camera16.png", "cutout.png", "rotated.jpg"]


def as_uint8(x: np.ndarray) -> np.ndarray:
    """float (3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    return np.rint((np.asarray(x, np.float64).transpose(1, 2, 0) + 1.0) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for kind in KINDS:
        data, name = _photo(kind)
        (root / name).write_bytes(data)
    (root / "labels.csv").write_text("file,smiling\n" + "".join(f"{k},1\n" for k in KINDS))
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_upload_dataset_pick_and_training_read_the_same_pixels(folder, kind):
    # HEAD: the server resized with Lanczos and training with bicubic (one id edited from different pixels);
    # the server also ignored EXIF orientation
    data, _ = _photo(kind)
    training = ImageFolderCSV(folder, folder / "labels.csv", resolution=RESOLUTION)
    trained_on = training.image_uint8(KINDS.index(kind))  # what `veil train` / `veil edit` see
    uploaded = to_model_input(decode_upload(data, limits=ImageLimits()), resolution=RESOLUTION)
    assert np.array_equal(as_uint8(uploaded), trained_on)
    assert np.array_equal(as_uint8(from_png(png_bytes(uploaded))), trained_on)  # what the session stores
    picked = FolderDataset(folder, attribute_names=["smiling"], resolution=RESOLUTION).image_png(kind)
    assert np.array_equal(as_uint8(from_png(picked)), trained_on)
    assert np.array_equal(training[KINDS.index(kind)][0].numpy(), uploaded)  # the float tensors, bit for bit


def test_dataset_thumbnails_find_nfd_names_and_read_semicolon_csvs(tmp_path):
    import unicodedata

    data, _ = _photo("astronaut.png")
    (tmp_path / unicodedata.normalize("NFD", "café.png")).write_bytes(data)
    (tmp_path / "labels.csv").write_bytes("file;smiling\r\ncafé.png;1\r\n".encode("utf-16"))
    ds = FolderDataset(tmp_path, attribute_names=["smiling"], resolution=RESOLUTION)
    assert ds.ids == ["café.png"] and ds.attributes("café.png") == {"smiling": 1}
    assert from_png(ds.image_png("café.png")).shape == (3, RESOLUTION, RESOLUTION)


# ------------------------------------------------------------------------------------------ the HTTP answer
@pytest.fixture(scope="module")
def editor(exports):
    from veil.export.runtime import OrtEditor

    return OrtEditor(exports / "conditional", providers="cpu", threads=1)


def test_an_enlarged_upload_is_answered_with_a_warning_not_refused(editor, tmp_path):
    from veil.serve.app import ServeSettings, create_app
    from veil.serve.state import open_state

    store = open_state(str(tmp_path / "ledger.sqlite"), budget=float("inf"))
    app = create_app(editor=editor, store=store, settings=ServeSettings(limits=ImageLimits(min_side=8)))
    attributes = json.dumps({n: -1 for n in editor.attribute_names})
    answers = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        for side in (10, 64):
            buf = io.BytesIO()
            Image.fromarray(skdata.astronaut()).resize((side, side), Image.Resampling.BICUBIC).save(buf, "PNG")
            r = client.post("/v1/sessions", files={"image": ("face.png", buf.getvalue(), "image/png")},
                            data={"attributes": attributes})
            assert r.status_code == 201, r.text
            answers[side] = r.json()
        data, _ = _photo("camera16.png")
        r = client.post("/v1/sessions", files={"image": ("grey16.png", data, "image/png")},
                        data={"attributes": attributes})
        assert r.status_code == 201, r.text
    store.close()
    assert editor.resolution == RESOLUTION
    (note,) = answers[10]["warnings"]  # 32 / 10 = 3.2x: said, and the session is made
    assert "10x10 is enlarged 3.2x to 32x32 (more than 2x)" in note, note
    assert answers[64]["warnings"] == [] and r.json()["warnings"] == []
    assert decode_data_url(r.json()["image"]).mean() < 200  # the 16-bit photo, not a white square (HEAD: 255)
