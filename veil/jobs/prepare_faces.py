"""The image side of ``veil prepare``: read a photo, find its faces, crop each one, paste an edit back.

    rgb = read_photo(path)                                 # uint8 (H, W, 3), EXIF orientation applied
    found = detect_faces(rgb)                              # Faces(boxes left to right, rejected count)
    square = crop_square(box, margin=0.5)                  # (left, top, side): centred on the box
    face = crop_face(rgb, square, size=64)                 # uint8 (64, 64, 3): the dataset's image
    photo = paste_face(rgb, edited, square)                # the edit resized back, feathered into a copy

Detection is scikit-image's LBP frontal-face cascade (``skimage.data.lbp_frontal_face_cascade_filename``,
OpenCV's ``lbpcascade_frontalface``, shipped in the wheel: nothing is downloaded), run on the grey photo
scaled down to at most ``DETECT_MAX_SIDE`` pixels, windows from 24 px, scale step 1.2, 4 neighbours.
The cascade alone fires on textures (the cat of ``skimage.data.chelsea()``, a coffee cup) and on face-sized
patches that are not skin (on ``skimage.data.astronaut()``: a reflection on the helmet), so a box is kept
only when the cascade also finds it in the mirror image and at 0.8 of the size (``detect_faces``), and, in a
colour photo, when at least ``MIN_SKIN`` of its inner half has a skin chrominance (YCbCr: Cb in [77, 127],
Cr in [133, 173], Chai and Ngan 1999).
A grey photo has no colour to test: a face-like patch there can pass (the helmet does in a grey astronaut).
Frontal faces only: a profile or a strongly tilted face is missed. A heuristic, not a modern detector: look
at the crops and delete a false one (its file and its labels.csv row) before training. About 1.5 s per
512 x 512 photo on one core.

Alignment is by the box only: each face is centred and scaled the same way (a square ``1 + 2 * margin``
times the box side around the box centre); there is no eye-based rotation (the cascade gives no
landmarks). Parts of the square outside the photo repeat the photo's edge pixels. The square is resized
to the dataset's size by the one resize (``veil.imaging.center_crop_resize``: Pillow's antialiased
bicubic, as training and the server resize), so the crop ``veil prepare`` writes is the pixels training reads.
Photos are read by the one decoder (``veil.imaging.read_image``: EXIF orientation, 16-bit rescaled,
transparency over white, modes veil does not read refused by name).

Paste-back: the edited face is resized to the square (bicubic) and blended into a copy of the photo with a
round feathered mask: weight 1 inside ``FEATHER_INNER`` of the square's half side, falling smoothly
(smoothstep) to 0 at ``FEATHER_OUTER``, so there is no seam and the square's corners stay the original.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from veil.imaging import center_crop_resize, read_image

__all__ = [
    "DETECTOR",
    "RESAMPLE",
    "Faces",
    "crop_face",
    "crop_square",
    "detect_faces",
    "feather_mask",
    "paste_face",
    "read_photo",
]

DETECT_MAX_SIDE = 1280  # the photo is scaled down to this for detection (the cascade's time grows with area)
MIN_WINDOW = 24  # px (at detection scale): the cascade's smallest window
CHECK_SCALE = 0.8  # the third run, at this fraction of the detection size (see detect_faces)
MIN_SKIN = 0.3  # fraction of a colour box's inner half that must have a skin chrominance
FEATHER_INNER, FEATHER_OUTER = 0.55, 0.95  # radii of the blend, in units of the square's half side
DETECTOR = (f"scikit-image LBP frontal-face cascade (lbpcascade_frontalface), scale step 1.2, windows from "
            f"{MIN_WINDOW} px, 4 neighbours, photos scaled to at most {DETECT_MAX_SIDE} px; boxes kept when found "
            f"mirrored and at {CHECK_SCALE:g} of the size, and in colour when >= {MIN_SKIN:g} of their inner half "
            f"is skin-coloured")
RESAMPLE = "Pillow bicubic, antialiased (veil.imaging.center_crop_resize: training's and the server's resize)"


@dataclass
class Faces:
    """What the detector found in one photo: boxes (left, top, width, height) ordered left to right, and how
    many of the cascade's detections were not kept (not found in the mirror image, or not skin-coloured)."""

    boxes: list[tuple[int, int, int, int]]
    rejected: int = 0


def read_photo(path: Path) -> np.ndarray:
    """A photo as uint8 RGB (H, W, 3), by the one decoder (``veil.imaging.read_image``: EXIF orientation,
    16-bit rescaled, transparency composited on ``veil.imaging.BACKGROUND``, white). DataError naming the file when it is
    missing, not an image Pillow reads, or in a mode veil does not read."""
    return read_image(path, what="photo").pixels


@functools.lru_cache(maxsize=1)
def _cascade():
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    return Cascade(lbp_frontal_face_cascade_filename())


def _skin_fraction(rgb: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Fraction of the box's inner half (the middle 50% of each side) with a skin chrominance (YCbCr)."""
    left, top, w, h = box
    inner = rgb[top + h // 4: top + h - h // 4, left + w // 4: left + w - w // 4].astype(np.float32)
    if inner.size == 0:
        return 0.0
    r, g, b = inner[..., 0], inner[..., 1], inner[..., 2]
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return float(((cb >= 77) & (cb <= 127) & (cr >= 133) & (cr <= 173)).mean())


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / min(a[2] * a[3], b[2] * b[3])


def _windows(rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The cascade's merged detections (left, top, width, height) in ``rgb``'s pixels."""
    from skimage.color import rgb2gray

    grey = rgb2gray(rgb).astype(np.float32)  # (h, w) in [0, 1], ITU-R 709 luma
    if min(grey.shape) < MIN_WINDOW:
        return []
    found = _cascade().detect_multi_scale(img=grey, scale_factor=1.2, step_ratio=1,
                                          min_size=(MIN_WINDOW, MIN_WINDOW), max_size=grey.shape,
                                          min_neighbor_number=4)
    return [(int(d["c"]), int(d["r"]), int(d["width"]), int(d["height"])) for d in found]


def _resized(rgb: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def _found_in(box, boxes, *, at: float = 0.5):
    """The box of ``boxes`` that overlaps ``box`` most, if it overlaps by at least ``at``; else None."""
    best = max(boxes, key=lambda other: _overlap(box, other), default=None)
    return best if best is not None and _overlap(box, best) >= at else None


def detect_faces(rgb: np.ndarray) -> Faces:
    """Frontal faces in ``rgb`` (uint8 (H, W, 3)): boxes in the photo's pixels, left to right.

    The cascade runs three times: on the photo (scaled to at most ``DETECT_MAX_SIDE``), on its mirror image and
    at ``CHECK_SCALE`` of that size. A box counts only when the mirror run finds it too and, if it is large
    enough to be seen there (``MIN_WINDOW / CHECK_SCALE``), the smaller run as well: a face is found either
    way round and at either size, most of the cascade's chance hits on texture are not. In a colour photo
    its middle must also be skin-coloured. Each kept box is the mean of the direct and mirrored boxes."""
    height, width = rgb.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    small = _resized(rgb, scale)
    w = small.shape[1]
    direct = _windows(small)
    mirrored = [(w - c - bw, r, bw, bh) for c, r, bw, bh in _windows(small[:, ::-1])]
    smaller = [tuple(v / CHECK_SCALE for v in b) for b in _windows(_resized(small, CHECK_SCALE))]
    paired = []
    for box in direct:
        twin = _found_in(box, mirrored)
        if twin is None or (box[2] >= MIN_WINDOW / CHECK_SCALE and _found_in(box, smaller) is None):
            continue
        paired.append(tuple(round((p + q) / 2 / scale) for p, q in zip(box, twin)))
    colour = bool(np.any(rgb[..., 0] != rgb[..., 1]) or np.any(rgb[..., 1] != rgb[..., 2]))
    kept = [b for b in paired if not colour or _skin_fraction(rgb, b) >= MIN_SKIN]
    unique: list[tuple[int, int, int, int]] = []
    for box in sorted(kept, key=lambda b: -b[2] * b[3]):  # one box per face: the largest of overlapping ones
        if _found_in(box, unique) is None:
            unique.append(box)
    return Faces(sorted(unique, key=lambda b: (b[0], b[1])), rejected=len(direct) - len(unique))


def crop_square(box: tuple[int, int, int, int], *, margin: float) -> tuple[int, int, int]:
    """(left, top, side) of the square ``1 + 2 * margin`` times the box's side, centred on the box."""
    left, top, w, h = box
    side = max(1, round(max(w, h) * (1 + 2 * margin)))
    return round(left + w / 2 - side / 2), round(top + h / 2 - side / 2), side


def _square_pixels(rgb: np.ndarray, square: tuple[int, int, int]) -> np.ndarray:
    """The square's pixels (side, side, 3); where it leaves the photo, the photo's edge pixels repeated."""
    left, top, side = square
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
    inside = rgb[y0:y1, x0:x1]
    pad = ((y0 - top, top + side - y1), (x0 - left, left + side - x1), (0, 0))
    return np.pad(inside, pad, mode="edge")


def crop_face(rgb: np.ndarray, square: tuple[int, int, int], *, size: int) -> np.ndarray:
    """The face square resized to ``size`` by the one resize (training's and the server's): uint8 (size, size, 3)."""
    return np.array(center_crop_resize(Image.fromarray(_square_pixels(rgb, square)), size), np.uint8)


def feather_mask(side: int) -> np.ndarray:
    """(side, side) float32 weights in [0, 1]: 1 in the middle, smoothstep down to 0 towards the edges."""
    centre = (side - 1) / 2
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    r = np.hypot(yy - centre, xx - centre) / (side / 2)  # 0 at the centre, 1 at the middle of an edge
    t = np.clip((FEATHER_OUTER - r) / (FEATHER_OUTER - FEATHER_INNER), 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep: no jump in value or slope


def paste_face(rgb: np.ndarray, edited: np.ndarray, square: tuple[int, int, int]) -> np.ndarray:
    """A copy of ``rgb`` with ``edited`` (uint8 (s, s, 3)) resized to ``square`` and blended in, feathered."""
    left, top, side = square
    height, width = rgb.shape[:2]
    big = np.asarray(Image.fromarray(edited).resize((side, side), Image.Resampling.BICUBIC), np.float32)
    mask = feather_mask(side)[..., None]
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
    out = rgb.copy()
    if x0 >= x1 or y0 >= y1:
        return out
    window = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
    here = out[y0:y1, x0:x1].astype(np.float32)
    blended = mask[window] * big[window] + (1 - mask[window]) * here
    out[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out
