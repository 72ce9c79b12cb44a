"""veil.privacy.identity: the near-duplicate test that makes a budget follow a face. Copies of a face (JPEG,
a changed pixel, resizing, brightness) must match it, through the server's own image path; distinct
synthetic faces must not, at the rates the module docstring states."""

import io

import numpy as np
import pytest
from PIL import Image

from veil.errors import ConfigError
from veil.lightning_modules.data.synthetic_faces import SyntheticFaces
from veil.privacy.identity import THRESHOLD, Fingerprint, FingerprintIndex, fingerprint, near_duplicate
from veil.serve.images import from_png, png_bytes, to_model_input


@pytest.fixture(scope="module")
def faces():
    ds = SyntheticFaces(num_images=1000, resolution=32, seed=0)
    return [ds.image_uint8(i).copy() for i in range(len(ds))]


def served(u8: np.ndarray) -> np.ndarray:
    """What the server fingerprints: the upload centre-cropped, resized to 32 px, stored as PNG."""
    return from_png(png_bytes(to_model_input(u8, resolution=32)))


def jpeg(u8, quality=75):
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def resized(u8, side):
    return np.asarray(Image.fromarray(u8).resize((side, side), Image.Resampling.LANCZOS))


def one_pixel(u8):
    out = u8.copy()
    out[16, 16] = 255 - out[16, 16]
    return out


def brighter(u8, by):
    return np.clip(u8.astype(int) + by, 0, 255).astype(np.uint8)


COPIES = {
    "jpeg quality 75": jpeg,
    "one pixel inverted": one_pixel,
    "resized 32 -> 64 -> 32": lambda u: resized(resized(u, 64), 32),
    "uploaded at 128 px": lambda u: resized(u, 128),
    "uploaded at 128 px as JPEG": lambda u: jpeg(resized(u, 128)),
    "brightness +12": lambda u: brighter(u, 12),
    "brightness -12": lambda u: brighter(u, -12),
}


@pytest.mark.parametrize("change", list(COPIES))
def test_copies_of_a_face_are_near_duplicates(faces, change):
    # Issue 30: the server keyed an upload by the SHA-256 of its pixels: each of these was a fresh budget.
    distances = []
    for face in faces[:200]:
        original, copy = fingerprint(served(face)), fingerprint(served(COPIES[change](face)))
        assert near_duplicate(original, copy), (change, original.distance(copy))
        distances.append(original.distance(copy))
    assert max(distances) <= 0.13  # the docstring's table: at most 0.12 on 1000 faces, THRESHOLD is 0.20


def test_distinct_faces_do_not_match_and_the_threshold_sits_between(faces):
    vectors = np.stack([fingerprint(served(face)).vector for face in faces])
    gram = vectors @ vectors.T
    distances = np.sqrt(np.maximum(2 - 2 * gram, 0))[np.triu_indices(len(faces), 1)]
    false_matches = int((distances <= THRESHOLD).sum())
    assert false_matches == 0, f"{false_matches} of {distances.size} pairs of distinct faces match"
    assert distances.min() > 0.22  # the docstring: closest pair 0.225 among these 1000 faces
    uint8_and_float = fingerprint(faces[0]).distance(fingerprint(faces[0].transpose(2, 0, 1) / 127.5 - 1.0))
    assert uint8_and_float < 1e-6


def test_an_index_finds_every_copy_and_keeps_insertion_order(faces):
    index = FingerprintIndex()
    for face in faces[:300]:
        index.add(fingerprint(served(face)))
    assert len(index) == 300
    for i in (0, 7, 299):
        assert index.within(fingerprint(served(jpeg(faces[i])))) == [i]
    index.add(fingerprint(served(faces[7])))
    assert index.within(fingerprint(served(faces[7]))) == [7, 300]


def test_the_stored_text_round_trips_and_bad_inputs_are_named(faces):
    fp = fingerprint(served(faces[3]))
    back = Fingerprint.from_text(fp.to_text())
    assert back == fp and fp.distance(back) < 1e-4 and fp.to_text().startswith("dct8-v1:")
    for text in ("", "dct8-v1:00", "md5:" + "0" * 252, None):
        with pytest.raises(ConfigError, match="fingerprint"):
            Fingerprint.from_text(text)
    with pytest.raises(ConfigError, match="image"):
        fingerprint(np.zeros((4, 32, 32), np.float32))
    flat = fingerprint(np.full((32, 32, 3), 128, np.uint8))  # no direction: matches only other flat images
    assert not flat.vector.any() and near_duplicate(flat, fingerprint(np.zeros((40, 40, 3), np.uint8)))
    assert not near_duplicate(flat, fp)
    assert fingerprint(np.pad(faces[3], ((8, 8), (0, 0), (0, 0)), mode="edge")).distance(fingerprint(faces[3])) < 0.1
