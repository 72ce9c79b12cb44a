"""Real photos in every mode Pillow reads, through the folder loader (issue 34): 16-bit grey rescaled (not
clipped to white), transparency composited on white (not black), EXIF orientation applied, float refused by
name, the first frame of an animation (said once), one upscale warning per load, NFD/NFC file names, and
semicolon / tab / UTF-16 label CSVs.

The photos are scikit-image's (``skimage.data``: camera, astronaut, chelsea), made small and saved by Pillow
in each mode. The expected pixels are computed here with plain Pillow (centre square, bicubic), not with the
code under test.
"""

from __future__ import annotations

import unicodedata
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data as skdata

from veil.errors import DataError
from veil.lightning_modules.data.image_folder import ImageFolderCSV, load_face_image

SIDE = 64


def small(u8: np.ndarray, side: int = SIDE) -> np.ndarray:
    return np.asarray(Image.fromarray(u8).resize((side, side), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return small(skdata.camera())  # uint8 (64, 64) grey


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return small(skdata.astronaut())  # uint8 (64, 64, 3)


def grey3(u8: np.ndarray) -> np.ndarray:
    return np.repeat(u8[..., None], 3, axis=2)


# ------------------------------------------------------------------------------------------ 16-bit grey
def _deep(camera: np.ndarray, kind: str) -> tuple[Image.Image, str]:
    if kind == "png-I;16":
        return Image.fromarray(camera.astype(np.uint16) * 257), "PNG"
    if kind == "tiff-I;16":
        return Image.fromarray(camera.astype(np.uint16) * 257), "TIFF"
    if kind == "tiff-I;16B":
        return Image.frombytes("I;16B", camera.shape[::-1], (camera.astype(">u2") * 257).tobytes()), "TIFF"
    # 32-bit signed integer TIFF (Pillow's mode I): white is 2**31 - 1
    return Image.fromarray(np.rint(camera.astype(np.float64) * ((2**31 - 1) / 255)).astype(np.int32)), "TIFF"


@pytest.mark.parametrize("kind", ["png-I;16", "tiff-I;16", "tiff-I;16B", "tiff-I"])
def test_deep_grey_is_rescaled_by_its_bit_depth_not_clipped_to_white(tmp_path, camera, kind):
    # HEAD: load_face_image did im.convert("RGB"), which clips every 16-bit value above 255: a white square
    image, fmt = _deep(camera, kind)
    path = tmp_path / f"camera.{fmt.lower()}"
    image.save(path, format=fmt)
    got = load_face_image(path, SIDE).astype(int)
    assert np.abs(got - grey3(camera)).max() <= 1, (kind, Image.open(path).mode, got.mean(), camera.mean())


# ------------------------------------------------------------------------------------------ transparency
def _transparent_left_half(astronaut: np.ndarray, camera: np.ndarray, mode: str) -> Image.Image:
    """The photo with its left half fully transparent; the colour stored under it is black."""
    half = SIDE // 2
    if mode in ("RGBA", "LA"):
        base = astronaut if mode == "RGBA" else camera
        alpha = np.full((SIDE, SIDE), 255, np.uint8)
        alpha[:, :half] = 0
        colour = base.copy()
        colour[:, :half] = 0
        return Image.fromarray(np.dstack([colour, alpha]) if mode == "RGBA" else np.dstack([colour, alpha]), mode)
    p = Image.fromarray(astronaut).quantize(colors=255)  # indices 0..254; 255 is the transparent black
    idx = np.asarray(p).copy()
    idx[:, :half] = 255
    out = Image.fromarray(idx, "P")
    out.putpalette(p.getpalette()[: 255 * 3] + [0, 0, 0])
    out.info["transparency"] = 255
    return out


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white_not_black(tmp_path, astronaut, camera, mode):
    # HEAD: convert("RGB") dropped the alpha, so the transparent half showed the black stored under it
    image = _transparent_left_half(astronaut, camera, mode)
    path = tmp_path / "cutout.png"
    image.save(path, transparency=255) if mode == "P" else image.save(path)
    got = load_face_image(path, SIDE)
    assert (got[:, : SIDE // 2] == 255).all(), got[:, : SIDE // 2].mean()
    opaque = np.asarray(image.convert("RGB"))[:, SIDE // 2:]
    assert np.array_equal(got[:, SIDE // 2:], opaque)


# ------------------------------------------------------------------------------------------ other modes
@pytest.mark.parametrize("kind, tolerance", [
    ("cmyk.jpg", 6.0), ("rgb.webp", 6.0), ("rgb.tiff", 0.0), ("ycbcr.tiff", 2.0), ("palette.gif", 12.0),
])
def test_other_modes_read_as_the_photo(tmp_path, astronaut, kind, tolerance):
    """Regression guards (HEAD read these too): CMYK JPEG, WebP, TIFF, YCbCr TIFF, a palette GIF."""
    image = Image.fromarray(astronaut)
    image = {"cmyk.jpg": image.convert("CMYK"), "ycbcr.tiff": image.convert("YCbCr"),
             "palette.gif": image.quantize(256)}.get(kind, image)
    path = tmp_path / kind
    image.save(path, **({"quality": 95} if kind.endswith("jpg") else {}))
    got = load_face_image(path, SIDE).astype(float)
    assert got.shape == (SIDE, SIDE, 3) and np.abs(got - astronaut).mean() <= tolerance


def test_exif_orientation_is_applied(tmp_path):
    # HEAD ignored the orientation tag: the model saw the cat lying on its side
    cat = np.asarray(Image.fromarray(skdata.chelsea()).resize((90, 60), Image.Resampling.BICUBIC))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "cat.jpg"
    Image.fromarray(cat).save(path, exif=exif, quality=95)
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im).convert("RGB")  # 60 x 90
    square = upright.crop((0, 15, 60, 75)).resize((32, 32), Image.Resampling.BICUBIC)
    assert np.array_equal(load_face_image(path, 32), np.asarray(square))


def test_float_images_are_refused_naming_the_file_and_the_mode(tmp_path, camera):
    # HEAD: convert("RGB") of a float image in [0, 1] gave a black square, silently
    path = tmp_path / "float.tiff"
    Image.fromarray(camera.astype(np.float32) / 255).save(path)
    with pytest.raises(DataError, match=r"float\.tiff: Pillow mode 'F' is not one veil reads.*convert it"):
        load_face_image(path, SIDE)
    (tmp_path / "labels.csv").write_text("file,smiling\nfloat.tiff,1\n")
    with pytest.raises(DataError, match=r"float\.tiff: Pillow mode 'F'"):  # at load, before any training
        ImageFolderCSV(tmp_path, tmp_path / "labels.csv", resolution=SIDE)


# ------------------------------------------------------------------------------------------ warnings at load
def _load(folder, names, resolution):
    (folder / "labels.csv").write_text("file,smiling\n" + "".join(f"{n},1\n" for n in names), encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderCSV(folder, folder / "labels.csv", resolution=resolution)
    return ds, [str(w.message) for w in caught]


def test_an_animation_gives_its_first_frame_and_says_so(tmp_path):
    frames = [Image.new("RGB", (40, 40), (220, 30, 30)), Image.new("RGB", (40, 40), (30, 30, 220))]
    frames[0].save(tmp_path / "blink.gif", save_all=True, append_images=frames[1:])
    ds, said = _load(tmp_path, ["blink.gif"], 32)
    assert np.abs(ds.image_uint8(0).astype(int) - (220, 30, 30)).max() <= 8
    assert len(said) == 1 and "1 images have several frames and only the first is used" in said[0], said


def test_upscaling_is_warned_once_per_load_with_the_count_and_the_worst_file(tmp_path, astronaut):
    # HEAD: a 6x6 crop was silently enlarged to 32x32
    sizes = {"tiny.png": 6, "small.png": 12, "fine.png": 16, "big.png": 64}  # 32 / side: 5.3, 2.7, 2.0, 0.5
    for name, side in sizes.items():
        Image.fromarray(small(astronaut, side)).save(tmp_path / name)
    ds, said = _load(tmp_path, list(sizes), 32)
    assert len(said) == 1, said  # one line for the whole dataset, not one per image
    assert "2 of 4 images are enlarged more than 2x to 32x32" in said[0] and "'tiny.png'" in said[0], said
    assert "5.3x" in said[0] and len(ds) == 4


# ------------------------------------------------------------------------------------------ NFD / NFC names
@pytest.mark.parametrize("csv_form, disk_form", [("NFC", "NFD"), ("NFD", "NFC")])
def test_file_names_match_across_unicode_normalisations(tmp_path, astronaut, csv_form, disk_form):
    # HEAD compared the raw strings: a macOS copy's decomposed café.png was "absent"
    name = "café.png"
    on_disk, in_csv = unicodedata.normalize(disk_form, name), unicodedata.normalize(csv_form, name)
    assert on_disk != in_csv
    Image.fromarray(astronaut).save(tmp_path / on_disk)
    (tmp_path / "sub").mkdir()
    Image.fromarray(astronaut).save(tmp_path / "sub" / on_disk)
    ds, _ = _load(tmp_path, [in_csv, f"sub/{in_csv}"], SIDE)
    assert ds.ids == [in_csv, f"sub/{in_csv}"]  # the ids stay as the labels name them
    assert np.array_equal(ds.image_uint8(0), astronaut) and np.array_equal(ds.image_uint8(1), astronaut)


# ------------------------------------------------------------------------------------------ CSV dialects
@pytest.mark.parametrize("delimiter, encoding", [
    (";", "utf-8"), ("\t", "utf-8"), (";", "utf-8-sig"), ("\t", "utf-16"), (",", "utf-16"), (";", "utf-16-be"),
    (",", "utf-16-le"),  # no byte-order mark: told by the NUL bytes
])
def test_semicolon_tab_and_utf16_label_csvs_are_read(tmp_path, astronaut, delimiter, encoding):
    # HEAD read comma-separated UTF-8 only: one column ("expected a header with ... attribute column") or a
    # UnicodeDecodeError
    for name in ("a.png", "b é.png"):
        Image.fromarray(astronaut).save(tmp_path / name)
    text = "\r\n".join(delimiter.join(r) for r in [["file", "smiling", "hat"], ["a.png", "1", "0"],
                                                    ["b é.png", "-1", "1"]]) + "\r\n"
    raw = text.encode(encoding)
    if encoding == "utf-16-be":
        raw = b"\xfe\xff" + raw  # big-endian with its byte-order mark
    (tmp_path / "labels.csv").write_bytes(raw)
    ds = ImageFolderCSV(tmp_path, tmp_path / "labels.csv", resolution=16)
    assert ds.ids == ["a.png", "b é.png"] and ds.attribute_names == ["smiling", "hat"]
    assert ds.attribute_matrix.tolist() == [[1, -1], [-1, 1]]


@pytest.mark.parametrize("raw, found", [
    ("file,smiling\ncafé.png,1\n".encode("cp1252"), "not UTF-8 (byte 0xe9 at position 16"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 (byte 0x89 at position 0"),  # an image given as csv=
])
def test_a_csv_in_an_unknown_encoding_is_refused_naming_what_was_found(tmp_path, raw, found):
    # HEAD: "not a readable CSV ('utf-8' codec can't decode byte ...)": Python's words, not the encoding or the fix
    (tmp_path / "labels.csv").write_bytes(raw)
    with pytest.raises(DataError, match=r"labels\.csv: the label CSV is .*save it as CSV UTF-8") as info:
        ImageFolderCSV(tmp_path, tmp_path / "labels.csv", resolution=16)
    assert found in str(info.value)
