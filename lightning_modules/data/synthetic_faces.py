"""Procedural synthetic faces with known binary attributes: veil's embedded default dataset.

No face dataset with attribute labels ships with any package veil can reach, so ``veil demo`` and
the tests use these. Each image is a cartoon face drawn with numpy at 2-4x supersampling and
downsampled (antialiased). Six attributes are independent fair coins:

    smiling     open, upturned mouth       vs a flat or slightly downturned line
    eyeglasses  dark rings + bridge        vs bare eyes
    hat         crown + band/brim on top   vs uncovered hair
    dark_hair   black / dark brown hair    vs platinum, golden, ginger or grey
    beard       dark full beard or goatee  vs bare chin
    pale_skin   light pinkish skin         vs tan to brown skin

Everything else is identity or nuisance, drawn from the same per-image generator but never an
attribute: face position (a few pixels) and shape, skin tone within its class, eye spacing,
mouth size, hair and hat and beard style, background gradient, shirt colour, lighting and sensor
noise. The lighting and the position offset are what keep any single pixel from deciding an
attribute; a small model has to look at shapes and relative colours.

Image ``i`` depends only on ``(seed, i)``. All nuisance factors are drawn before (and
independently of) the attribute values, so ``render_face(a, rng=default_rng(s))`` and
``render_face(a2, rng=default_rng(s))`` show the same person with only the changed attributes
differing, which is handy when checking edits.

    python -c "import torch; from veil.lightning_modules.data.synthetic_faces import SyntheticFaces, save_grid; \\
        ds = SyntheticFaces(num_images=64); save_grid(torch.stack([ds[i][0] for i in range(64)]), 'g.png')"
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from veil.errors import ConfigError
from veil.lightning_modules.data.grid import save_grid, uint8_to_tensor

__all__ = ["SYNTHETIC_ATTRIBUTES", "SyntheticFaces", "render_face", "draw_attributes", "save_grid"]

SYNTHETIC_ATTRIBUTES = ("smiling", "eyeglasses", "hat", "dark_hair", "beard", "pale_skin")

# Colour palettes (RGB 0-255). Dark and light hair are far apart in brightness; hats avoid the
# yellow/orange hues of light hair so a hat is never mistaken for blond hair.
_DARK_HAIR = np.array([[22, 18, 18], [48, 32, 24], [35, 26, 22], [62, 42, 30]], np.float32)
_LIGHT_HAIR = np.array([[240, 226, 186], [226, 184, 100], [212, 104, 40], [204, 198, 186]], np.float32)
_PALE_SKIN = np.array([[252, 230, 218], [238, 206, 190]], np.float32)  # ends of the pale range
_TAN_SKIN = np.array([[206, 148, 100], [130, 84, 52]], np.float32)  # ends of the tan range
_BEARD = np.array([[92, 64, 44], [24, 20, 18]], np.float32)
_HAT_HUES = (0.0, 0.33, 0.45, 0.58, 0.66, 0.75, 0.85, 0.95)

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _supersampling(resolution: int) -> int:
    """Supersampling factor: draw on a canvas of at least 128 pixels, at least 2x."""
    return max(2, -(-128 // resolution))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (u right, v down), both in [-1, 1], shape (size, size)."""
    if size not in _GRIDS:
        c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        _GRIDS[size] = np.meshgrid(c, c, indexing="xy")
    return _GRIDS[size]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0


def _ellipse(u, v, cx, cy, rx, ry) -> np.ndarray:
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0


def _paint(img: np.ndarray, mask: np.ndarray, color, alpha: float = 1.0) -> None:
    if alpha >= 1.0:
        img[mask] = color
    else:
        img[mask] = (1.0 - alpha) * img[mask] + alpha * np.asarray(color, np.float32)


def draw_attributes(rng: np.random.Generator) -> dict[str, bool]:
    """All six attributes as independent Bernoulli(0.5), always drawn in the same order."""
    bits = rng.integers(0, 2, size=len(SYNTHETIC_ATTRIBUTES))
    return {name: bool(b) for name, b in zip(SYNTHETIC_ATTRIBUTES, bits)}


def _draw_nuisance(rng: np.random.Generator) -> dict:
    """Identity and nuisance factors: a fixed number of draws, whatever the attributes are."""
    r = rng.random(46)
    a, b = 0.46 + 0.10 * r[0], 0.58 + 0.14 * r[1]  # face half-axes
    cx, cy = 0.30 * (r[2] - 0.5), 0.12 + 0.32 * (r[3] - 0.5)  # position offset, up to 2.4 / 2.6 px at 32
    return dict(
        a=a, b=b, cx=cx, cy=cy,
        bg=(_hsv(r[4], 0.2 + 0.4 * r[5], 0.45 + 0.5 * r[6]), _hsv(r[7], 0.2 + 0.4 * r[8], 0.45 + 0.5 * r[9])),
        bg_angle=2 * np.pi * r[10],
        shirt=_hsv(r[11], 0.3 + 0.5 * r[12], 0.15 + 0.75 * r[13]), neck_len=0.06 + 0.14 * r[40],
        skin_t=r[14],
        eye_dx=a * (0.36 + 0.10 * r[15]), eye_y=cy - b * (0.08 + 0.10 * r[16]),
        mouth_y=cy + b * (0.42 + 0.10 * r[17]), mouth_w=a * (0.40 + 0.10 * r[18]),
        smile_open=r[19] < 0.9, neutral_curve=-0.03 * r[20],
        hair_pick=int(4 * r[21]), hair_style=int(3 * r[22]), fringe=0.32 + 0.22 * r[23],
        fringe_tilt=0.5 * (r[24] - 0.5), long_len=0.5 + 0.5 * r[25],
        hat_color=_hsv(_HAT_HUES[int(8 * r[26])] + 0.04 * (r[27] - 0.5), 0.55 + 0.4 * r[28], 0.45 + 0.5 * r[29]),
        hat_brimmed=r[30] < 0.5, brim_y=cy - b * (0.42 + 0.12 * r[31]),
        glasses_color=_hsv(r[32], 0.6 * r[33], 0.05 + 0.25 * r[34]), lens_r=0.14 + 0.04 * r[35],
        tinted=r[36] < 0.3, beard_t=r[37], goatee=r[38] < 0.35,
        light=0.5 * 3.0 ** r[39],  # exposure, log-uniform in [0.5, 1.5]
        light_grad=r[41:43], cast=0.9 + 0.2 * r[43:46],  # light direction, white balance
    )


def _skin(pale: bool, t: float) -> np.ndarray:
    lo, hi = _PALE_SKIN if pale else _TAN_SKIN
    return (1 - t) * lo + t * hi


def _draw_background(img, u, v, n) -> None:
    w = 0.5 + 0.5 * (np.cos(n["bg_angle"]) * u + np.sin(n["bg_angle"]) * v) / np.sqrt(2)
    img[:] = (1 - w[..., None]) * n["bg"][0] + w[..., None] * n["bg"][1]


def _draw_head(img, u, v, n, attrs, hair) -> None:
    """Neck, shoulders, hair that falls behind the head, the face and the nose."""
    a, b, cx, cy = n["a"], n["b"], n["cx"], n["cy"]
    skin = _skin(attrs["pale_skin"], n["skin_t"])
    _paint(img, (np.abs(u - cx) < 0.4 * a) & (v > cy), 0.6 * skin)  # the neck, in the chin's shadow
    shoulders_top = cy + b + n["neck_len"]
    _paint(img, _ellipse(u, v, 0.5 * cx, shoulders_top + 0.55, 0.95, 0.55), n["shirt"])
    if n["hair_style"] > 0:  # bob (1) or long (2) hair falls behind the head
        length = 0.35 if n["hair_style"] == 1 else n["long_len"]
        back = _ellipse(u, v, cx, cy + 0.05, 1.32 * a, 1.12 * b) & (v < cy + b * length)
        _paint(img, back, hair)
    _paint(img, _ellipse(u, v, cx, cy, a, b), skin)
    nose = _ellipse(u, v, cx, 0.5 * (n["eye_y"] + n["mouth_y"]) + 0.03, 0.045, 0.11)
    _paint(img, nose, 0.82 * skin)


def _draw_beard(img, u, v, n) -> None:
    a, b, cx, cy = n["a"], n["b"], n["cx"], n["cy"]
    color = (1 - n["beard_t"]) * _BEARD[0] + n["beard_t"] * _BEARD[1]
    chin = _ellipse(u, v, cx, cy + 0.02, 1.04 * a, 1.06 * b)
    if n["goatee"]:
        region = chin & (np.abs(u - cx) < 0.5 * a) & (v > n["mouth_y"] - 0.02)
    else:
        region = chin & (v > cy + 0.22 * b)
    moustache = _ellipse(u, v, cx, n["mouth_y"] - 0.08, 0.9 * n["mouth_w"], 0.055)
    _paint(img, region | moustache, color)


def _draw_eyes(img, u, v, n, glasses: bool) -> None:
    for side in (-1.0, 1.0):
        ex, ey = n["cx"] + side * n["eye_dx"], n["eye_y"]
        _paint(img, _ellipse(u, v, ex, ey, 0.095, 0.062), (245, 245, 240))
        _paint(img, _ellipse(u, v, ex, ey, 0.052, 0.056), (40, 28, 24))
        if glasses:
            d2 = (u - ex) ** 2 + (v - ey) ** 2
            r = n["lens_r"]
            if n["tinted"]:
                _paint(img, d2 <= r**2, (30, 30, 40), alpha=0.35)
            _paint(img, (d2 <= r**2) & (d2 >= (r - 0.06) ** 2), n["glasses_color"])
            outward = side * (u - ex)  # distance from the eye towards this side's ear
            arm = (np.abs(v - ey + 0.02) < 0.025) & (outward > r - 0.02) & (outward < n["a"] * 1.02 - n["eye_dx"])
            _paint(img, arm, n["glasses_color"])
    if glasses:
        gap = n["eye_dx"] - n["lens_r"] + 0.03
        bridge = (np.abs(u - n["cx"]) < gap) & (np.abs(v - n["eye_y"] + 0.02) < 0.028)
        _paint(img, bridge, n["glasses_color"])


def _draw_mouth(img, u, v, n, smiling: bool, skin) -> None:
    mx, my, w = n["cx"], n["mouth_y"], n["mouth_w"]
    x = np.clip((u - mx) / w, -1.0, 1.0)
    inside = np.abs(u - mx) < w
    lip = 0.55 * skin + np.array([70.0, 10.0, 10.0], np.float32)
    if not smiling:  # a flat or slightly downturned line, narrower than a smile
        centre = my + n["neutral_curve"] * (1 - x**2)
        _paint(img, (np.abs(u - mx) < 0.7 * w) & (np.abs(v - centre) < 0.035), lip * 0.8)
        return
    if n["smile_open"]:  # a half-moon: flat-ish top, round bottom, teeth along the top
        top, bottom = my - 0.06 + 0.03 * (1 - x**2), my - 0.06 + 0.24 * (1 - x**2)
        mouth = inside & (v >= top - 0.03) & (v <= bottom)
        _paint(img, mouth, (110, 25, 30))
        _paint(img, inside & (v >= top) & (v <= top + 0.065) & (np.abs(x) < 0.85), (250, 250, 245))
    else:  # a closed smile: a thick arc whose corners curl up
        centre = my - 0.08 + 0.2 * (1 - x**2)
        _paint(img, inside & (np.abs(v - centre) < 0.05), lip * 0.7)


def _draw_hair_top(img, u, v, n, hair) -> None:
    a, b, cx, cy = n["a"], n["b"], n["cx"], n["cy"]
    cap = _ellipse(u, v, cx, cy - 0.04, 1.22 * a, 1.08 * b)
    fringe = v < cy - b * n["fringe"] + n["fringe_tilt"] * (u - cx)
    outside_face = ~_ellipse(u, v, cx, cy, a, b)
    sides = outside_face & (v < cy + 0.05 * b)  # sideburns down to about the eyes
    _paint(img, cap & (fringe | sides), hair)


def _draw_hat(img, u, v, n) -> None:
    a, b, cx, cy, y = n["a"], n["b"], n["cx"], n["cy"], n["brim_y"]
    color = n["hat_color"]
    if n["hat_brimmed"]:  # a flat-topped crown with a wide brim
        crown = (np.abs(u - cx) < 1.05 * a) & (v < y) & (v > y - 0.62)
        _paint(img, crown, color)
        _paint(img, (np.abs(u - cx) < 1.05 * a) & (np.abs(v - y + 0.1) < 0.06), 0.45 * color)
        _paint(img, _ellipse(u, v, cx, y + 0.01, 1.75 * a, 0.085), 0.8 * color)
    else:  # a beanie: a dome over the head with a thick folded band
        _paint(img, _ellipse(u, v, cx, cy - 0.05, 1.3 * a, 1.12 * b) & (v < y), color)
        _paint(img, (np.abs(u - cx) < 1.3 * a) & (np.abs(v - y + 0.06) < 0.09), 0.7 * color)


def _finish(img, u, v, n, ss: int, rng: np.random.Generator) -> np.ndarray:
    """Lighting (level, linear gradient, colour cast), downsampling, sensor noise, uint8."""
    gx, gy = (n["light_grad"] - 0.5) * 0.8
    shade = n["light"] * (1.0 + gx * u + gy * v)
    img *= shade[..., None] * n["cast"].astype(np.float32)
    s = img.shape[0] // ss
    small = img.reshape(s, ss, s, ss, 3).mean(axis=(1, 3))
    small += rng.normal(0.0, 2.0, size=small.shape).astype(np.float32)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_face(attribute_values: dict[str, bool], *, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one face: ``attribute_values`` maps each of SYNTHETIC_ATTRIBUTES to a bool.

    The nuisance factors are drawn from ``rng``; returns uint8 RGB of shape (resolution, resolution, 3).
    """
    _check_resolution(resolution)
    missing = [k for k in SYNTHETIC_ATTRIBUTES if k not in attribute_values]
    if missing:
        raise ConfigError(f"render_face: attribute_values lacks {missing}; give all of {list(SYNTHETIC_ATTRIBUTES)}")
    attrs = {k: bool(attribute_values[k]) for k in SYNTHETIC_ATTRIBUTES}
    n = _draw_nuisance(rng)
    ss = _supersampling(resolution)
    u, v = _grid(resolution * ss)
    img = np.empty(u.shape + (3,), np.float32)  # (S, S, 3), 0-255
    hair = (_DARK_HAIR if attrs["dark_hair"] else _LIGHT_HAIR)[n["hair_pick"]]
    skin = _skin(attrs["pale_skin"], n["skin_t"])
    _draw_background(img, u, v, n)
    _draw_head(img, u, v, n, attrs, hair)
    if attrs["beard"]:
        _draw_beard(img, u, v, n)
    _draw_eyes(img, u, v, n, attrs["eyeglasses"])
    _draw_mouth(img, u, v, n, attrs["smiling"], skin)
    _draw_hair_top(img, u, v, n, hair)
    if attrs["hat"]:
        _draw_hat(img, u, v, n)
    return _finish(img, u, v, n, ss, rng)


def _check_resolution(resolution) -> None:
    if not isinstance(resolution, int) or resolution < 32 or resolution % 16:
        raise ConfigError(f"resolution={resolution!r}: synthetic faces need a multiple of 16, >= 32 (e.g. 32 or 64)")


def _item_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


class SyntheticFaces(Dataset):
    """``ds[i] -> (image (3,H,W) float32 in [-1,1], attrs (k,) float32 in {-1,+1})``, rendered lazily and cached."""

    def __init__(
        self,
        *,
        num_images: int = 2048,
        resolution: int = 32,
        seed: int = 0,
        attributes: Sequence[str] | None = None,
    ):
        if not isinstance(num_images, int) or num_images < 1:
            raise ConfigError(f"num_images={num_images!r}: give a positive number of images")
        _check_resolution(resolution)
        names = list(SYNTHETIC_ATTRIBUTES if attributes is None else attributes)
        unknown = [a for a in names if a not in SYNTHETIC_ATTRIBUTES]
        if unknown or not names or len(set(names)) != len(names):
            raise ConfigError(
                f"attributes={names!r}: unknown or repeated {unknown or names}; "
                f"choose distinct names from {list(SYNTHETIC_ATTRIBUTES)}"
            )
        self.num_images, self.resolution, self.seed = num_images, resolution, int(seed)
        self.attribute_names = names
        self.ids = [f"synth-{self.seed}-{i:06d}" for i in range(num_images)]
        columns = [SYNTHETIC_ATTRIBUTES.index(a) for a in names]
        bits = np.array([list(draw_attributes(_item_rng(self.seed, i)).values()) for i in range(num_images)], bool)
        self.all_attributes = bits  # (N, 6) bool, every attribute in SYNTHETIC_ATTRIBUTES order
        self.attribute_matrix = torch.from_numpy(np.where(bits[:, columns], 1.0, -1.0).astype(np.float32))  # (N, k)
        self._cache = np.zeros((num_images, resolution, resolution, 3), np.uint8)
        self._cached = np.zeros(num_images, bool)

    def __len__(self) -> int:
        return self.num_images

    def image_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 (H, W, 3), rendered on first use."""
        if not self._cached[index]:
            rng = _item_rng(self.seed, index)
            attrs = draw_attributes(rng)  # consumes the same draws as at construction
            self._cache[index] = render_face(attrs, resolution=self.resolution, rng=rng)
            self._cached[index] = True
        return self._cache[index]

    def render_all(self) -> "SyntheticFaces":
        """Render every image now (e.g. before forking DataLoader workers); returns self."""
        for i in range(self.num_images):
            self.image_uint8(i)
        return self

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic faces")
        return uint8_to_tensor(self.image_uint8(index)), self.attribute_matrix[index].clone()
