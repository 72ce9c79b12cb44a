"""Uploaded images in, model-sized arrays out, and PNGs back: the server's only image handling.

    limits = ImageLimits(max_bytes=8 << 20, max_pixels=16_000_000, max_side=8192, min_side=16)
    pixels = decode_upload(data, limits=limits)       # uint8 (H, W, 3), decoded and verified
    x = to_model_input(pixels, resolution=32)         # float32 (3, 32, 32) in [-1, 1]
    png = png_bytes(x)                                # what the session stores and the API returns
    url = data_url(png)                               # "data:image/png;base64,..." for JSON and SSE

An upload is never trusted by its name or content type: Pillow must recognise it as PNG or JPEG from
its bytes, ``verify()`` must pass, and it is decoded in full (a truncated file fails). Size limits
apply before decoding (bytes), from the header (width, height, pixel count) and through Pillow's
decompression-bomb guard, which is turned into an error here for anything over ``max_pixels``.
Every failure is an ``ImageRejected`` with the HTTP status it deserves (413 too large, 415 not a
PNG or JPEG, 422 unreadable or out of bounds) and a message that names the field.

Decoding and resizing are ``veil.imaging``'s, the ones training and ``veil edit`` use (so an upload and the
same file in the owner's folder give byte-identical model inputs): EXIF orientation applied, 16-bit grey
rescaled, transparency composited over white, a mode veil does not read refused (422) by name; the model
sees the centre square resized to its resolution with Pillow's antialiased bicubic. ``upload_warnings``
says what the owner should know (enlarged more than ``UPSCALE_WARN_FACTOR``, only the first frame used):
the server answers such an upload with a ``warnings`` field, not a refusal. ``image_id_for`` names a NEW
record by the SHA-256 of its decoded pixels; which record an upload is, is decided by its perceptual
fingerprint (``veil.serve.state``, ``veil.privacy.identity``): a re-encoded, resized or retouched copy of a
face already seen, or of a ``--dataset`` image, takes that record's id and composes with its releases.
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from veil.errors import ConfigError, DataError
from veil.imaging import Photo, decode, model_pixels, upscale_note

__all__ = ["ImageLimits", "ImageRejected", "decode_upload", "decode_upload_photo", "upload_warnings",
           "to_model_input", "png_bytes", "data_url", "image_id_for", "from_png", "install_bomb_guard"]

FORMATS = ("PNG", "JPEG")


class ImageRejected(ConfigError):
    """An upload the server will not decode; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422, *, option: str | None = None):
        super().__init__(message, option=option)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be: bytes on the wire, pixels, and the length of each side."""

    max_bytes: int = 8 << 20  # 8 MiB
    max_pixels: int = 16_000_000
    max_side: int = 8192
    min_side: int = 16

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "max_side", "min_side"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"={v!r}: must be a whole number >= 1", option=f"--{name.replace('_', '-')}")
        if self.min_side > self.max_side:
            raise ConfigError(f"{self.min_side} > --max-side {self.max_side}", option="--min-side")


def decode_upload(data: bytes, *, limits: ImageLimits, field: str = "image") -> np.ndarray:
    """The upload's pixels as uint8 (H, W, 3); ImageRejected naming ``field`` otherwise."""
    return decode_upload_photo(data, limits=limits, field=field).pixels


def decode_upload_photo(data: bytes, *, limits: ImageLimits, field: str = "image") -> Photo:
    """The upload decoded (``veil.imaging.Photo``: pixels, mode, frames); ImageRejected naming ``field``."""
    if not data:
        raise ImageRejected(f"{field}: the upload is empty; send a PNG or JPEG file")
    if len(data) > limits.max_bytes:
        raise ImageRejected(f"{field}: {len(data)} bytes is over the limit of {limits.max_bytes} bytes", 413)
    install_bomb_guard(limits)
    try:
        return _decode(data, limits=limits, field=field)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"{field}: more than {limits.max_pixels} pixels (decompression-bomb guard)", 413) from None


def install_bomb_guard(limits: ImageLimits) -> None:
    """Pillow's decompression-bomb guard at ``max_pixels``, its warning made an error (process-wide: set
    once by the server, not per request, because Pillow's limit and Python's warning filters are global)."""
    if Image.MAX_IMAGE_PIXELS != limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def upload_warnings(photo: Photo, *, resolution: int, field: str = "image") -> list[str]:
    """What the owner should know about an accepted upload: enlarged a lot, or only its first frame used."""
    notes = [upscale_note(photo.pixels.shape, resolution=resolution, name=field)]
    if photo.frames > 1:
        notes.append(f"{field}: has {photo.frames} frames; only the first is edited")
    return [n for n in notes if n]


def _decode(data: bytes, *, limits: ImageLimits, field: str) -> Photo:
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
            fmt, (w, h) = probe.format, probe.size
            _check_size(w, h, limits=limits, field=field)
            probe.verify()  # structure and checksums, without decoding the pixels
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:  # verify() leaves the image unusable: reopen
            im.load()  # decode in full: a truncated file fails here
            photo = decode(im, name=field)  # veil.imaging: the decoder training uses
    except DataError as e:  # a mode veil does not read (it names the field and the mode)
        raise ImageRejected(str(e)) from None
    except UnidentifiedImageError:
        raise ImageRejected(f"{field}: not a PNG or JPEG image (the file's bytes were checked, not its name or "
                            f"content type)", 415) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except ImageRejected:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying "damaged"
        raise ImageRejected(f"{field}: a damaged or truncated {fmt if 'fmt' in locals() else 'image'} file "
                            f"({type(e).__name__}: {str(e)[:120]})") from None
    if photo.pixels.ndim != 3 or photo.pixels.shape[2] != 3:
        raise ImageRejected(f"{field}: could not be read as an RGB image")
    return photo


def _check_size(w: int, h: int, *, limits: ImageLimits, field: str) -> None:
    if max(w, h) > limits.max_side:
        raise ImageRejected(f"{field}: {w}x{h} is larger than {limits.max_side} pixels on a side", 413)
    if w * h > limits.max_pixels:
        raise ImageRejected(f"{field}: {w}x{h} is more than {limits.max_pixels} pixels", 413)
    if min(w, h) < limits.min_side:
        raise ImageRejected(f"{field}: {w}x{h} is smaller than {limits.min_side} pixels on a side")


def image_id_for(pixels: np.ndarray) -> str:
    """The id of an upload that starts a new record: ``img-`` + 24 hex of SHA-256 over its shape and pixels."""
    h = hashlib.sha256(repr(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return "img-" + h.hexdigest()[:24]


def to_model_input(pixels: np.ndarray, *, resolution: int) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, r, r) in [-1, 1]: ``veil.imaging.model_pixels`` (centre square, bicubic),
    the pixels training reads from the same file."""
    x = model_pixels(pixels, resolution=resolution).astype(np.float32).transpose(2, 0, 1)
    return x / 127.5 - 1.0


def png_bytes(x: np.ndarray) -> bytes:
    """float (3, H, W) in [-1, 1] -> PNG bytes (no metadata)."""
    u8 = np.clip(np.rint((np.asarray(x, np.float32).transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes) -> np.ndarray:
    """PNG bytes the server wrote -> float32 (3, H, W) in [-1, 1]."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return x / 127.5 - 1.0


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
