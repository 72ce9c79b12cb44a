"""The one image decoder and the one resize: training, ``veil edit``, ``veil prepare`` and the server use these.

    photo = read_image(path)                      # Photo(pixels uint8 (H, W, 3), mode, frames)
    photo = decode(pil_image, name="upload")      # the same for an image already opened (the server's bytes)
    face = model_pixels(photo.pixels, resolution=64)   # uint8 (64, 64, 3): centre square, bicubic
    note = upscale_note(photo.pixels.shape, resolution=64, name=str(path))  # None, or a sentence to warn with

Decoding (``decode``): EXIF orientation is applied first; then, by Pillow mode,

- ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``HSV``: Pillow's conversion to RGB (CMYK by its
  plain formula: no ICC colour management);
- ``LA``, ``PA``, ``RGBA``, ``RGBa``, and ``L``/``P``/``RGB`` with a transparent colour (``transparency``):
  composited over ``BACKGROUND`` (white), so a transparent background turns white, never black;
- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grey) and ``I`` (32-bit integer grey): rescaled to 8 bits
  by the file's bit depth, ``round(v * 255 / (2**bits - 1))`` (16-bit white, 65535, is 255; HEAD's
  ``convert("RGB")`` clipped every value above 255 to white). ``I``'s depth is the TIFF's BitsPerSample when
  the file says it (less the sign bit for signed samples: 31 for Pillow's own 32-bit TIFFs), else 16 when
  every value fits in 16 bits, else 32; negative values are refused;
- anything else (``F``: 32-bit float has no fixed white level; ``LAB``, ``La``, ...) is refused by name:
  ``DataError`` naming the file and the mode, with the fix (convert to 8- or 16-bit RGB or grey).

A multi-frame file (GIF, APNG, TIFF pages, MPO) gives its first frame; ``Photo.frames`` says how many it had,
for the caller to say so. ``read_image`` refuses, naming the file, what Pillow cannot open or decode.

Resize (``model_pixels``): the largest centred square, resized with Pillow's bicubic filter, which
antialiases when it shrinks (its kernel is widened by the scale factor). Bicubic rather than Lanczos: it is
what training and ``veil prepare`` always used (CelebA and folder data keep their pixels), and it rings less
than Lanczos when a small photo is enlarged. ``upscale_note`` says when the square's side is more than
``UPSCALE_WARN_FACTOR`` times smaller than the model's resolution (the image is enlarged, and blurry).
Torch-free (Pillow, numpy): the server imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from veil.errors import DataError

__all__ = ["BACKGROUND", "RESAMPLE", "UPSCALE_WARN_FACTOR", "READABLE_MODES", "ImageWarning", "Photo", "decode", "read_image",
           "model_pixels", "center_crop_resize", "upscale_note", "upscale_factor"]

BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white
RESAMPLE = Image.Resampling.BICUBIC  # antialiased by Pillow when shrinking
UPSCALE_WARN_FACTOR = 2.0  # warn when the crop is enlarged by more than this
PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
DEEP_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
READABLE_MODES = PLAIN_MODES + ALPHA_MODES + DEEP_GREY_MODES
_FIX = "convert it to 8- or 16-bit RGB or greyscale (e.g. PNG) and try again"


class ImageWarning(UserWarning):
    """A photo veil reads, but not as well as it could (enlarged a lot, only its first frame used)."""


@dataclass(frozen=True)
class Photo:
    """A decoded image: ``pixels`` uint8 (H, W, 3) RGB, the Pillow ``mode`` it was read in, its ``frames``."""

    pixels: np.ndarray
    mode: str
    frames: int = 1


def read_image(path, *, what: str = "image") -> Photo:
    """The file at ``path`` decoded (see the module docstring); DataError naming the file otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode in full: a truncated file fails here
            return decode(im, name=str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:  # the warning: where a server made it an error
        raise DataError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e)[:160]}); {_FIX}, "
                        f"or remove it") from None


def decode(im: Image.Image, *, name: str) -> Photo:
    """An opened Pillow image as RGB uint8, EXIF orientation applied; DataError naming ``name`` and the mode
    for a mode veil does not read."""
    mode, frames = im.mode, int(getattr(im, "n_frames", 1) or 1)
    if mode not in READABLE_MODES:
        raise DataError(f"{name}: Pillow mode {mode!r} is not one veil reads"
                        + (" (32-bit float has no fixed white level)" if mode == "F" else "") + f"; {_FIX}")
    depth = _bit_depth(im) if mode in DEEP_GREY_MODES else 8  # read before the transpose drops the TIFF tags
    im = ImageOps.exif_transpose(im) or im
    if mode in DEEP_GREY_MODES:
        return Photo(_rescaled_grey(np.asarray(im), bits=depth, name=name), mode, frames)
    if mode in ALPHA_MODES or (mode in ("L", "P", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Photo(np.array(Image.alpha_composite(flat, rgba).convert("RGB"), np.uint8), mode, frames)
    return Photo(np.array(im.convert("RGB"), np.uint8), mode, frames)


def _bit_depth(im: Image.Image) -> int:
    """16 for the ``I;16`` modes; for ``I`` the TIFF's BitsPerSample when present, else from the values."""
    if im.mode.startswith("I;16"):
        return 16
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # TIFF BitsPerSample
    if bits:
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        signed = tags.get(339) in (2, (2,))  # SampleFormat 2: signed integers, one bit fewer for the values
        return bits - 1 if signed else bits
    return 16 if int(np.asarray(im).max(initial=0)) <= 0xFFFF else 32


def _rescaled_grey(values: np.ndarray, *, bits: int, name: str) -> np.ndarray:
    """Grey values of ``bits`` bits -> uint8 (H, W, 3): ``round(v * 255 / (2**bits - 1))``."""
    values = values.astype(np.float64)
    if values.size and values.min() < 0:
        raise DataError(f"{name}: 32-bit integer grey with negative values (no black level to rescale from); "
                        f"{_FIX}")
    grey = np.clip(np.rint(values * (255.0 / (2.0 ** bits - 1.0))), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """The largest centred square (178x218 -> 178x178), resized to resolution x resolution (``RESAMPLE``)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), RESAMPLE)  # a same-size resize is an exact copy


def model_pixels(pixels: np.ndarray, *, resolution: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (resolution, resolution, 3): what every model input is made from."""
    return np.array(center_crop_resize(Image.fromarray(np.asarray(pixels, np.uint8)), resolution), np.uint8)


def upscale_factor(shape, *, resolution: int) -> float:
    """How much the centre square of an (H, W, ...) image is enlarged to reach ``resolution`` (< 1: shrunk)."""
    return resolution / max(1, min(int(shape[0]), int(shape[1])))


def upscale_note(shape, *, resolution: int, name: str) -> str | None:
    """A sentence when the image is enlarged by more than ``UPSCALE_WARN_FACTOR``, else None."""
    factor = upscale_factor(shape, resolution=resolution)
    if factor <= UPSCALE_WARN_FACTOR:
        return None
    return (f"{name}: {int(shape[1])}x{int(shape[0])} is enlarged {factor:.1f}x to {resolution}x{resolution} "
            f"(more than {UPSCALE_WARN_FACTOR:g}x): the model sees a blurry face; use a photo whose shorter side "
            f"is at least {resolution} pixels")
