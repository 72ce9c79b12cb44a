"""Image tensors <-> uint8 pixels, and labelled contact sheets of a batch: every grid veil writes is drawn here.

veil's image tensors are float32 (3, H, W) in [-1, 1]; files and previews are uint8 RGB (H, W, 3).
``save_grid(images, "grid.png", nrow=8, captions=[...])`` writes a batch (B, 3, H, W) as one image, row by
row, each tile enlarged to at least ``MIN_TILE`` pixels and captioned underneath (``attribute_caption``:
requested or released values, flipped ones marked, the level), in the format its extension names
(``GRID_EXTENSIONS``; ``grid_format`` checks a path before any work), through a temporary file and a
rename, so an existing grid is never left half-written. Captions use Pillow's default font (no font file).

Privacy: a caption is part of the picture. On a grid meant for sharing, caption requested or released
values only; the flipped mark (with the released value, it gives the original away) belongs on owner-only
previews.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from veil.errors import ConfigError

__all__ = ["uint8_to_tensor", "tensor_to_uint8", "make_grid", "save_grid", "save_before_after", "grid_format",
           "attribute_caption", "edit_captions", "GRID_EXTENSIONS", "MIN_TILE", "FLIP_MARK", "EDIT_LEGEND"]

# Lossless or common RGB formats that Pillow writes with no plugin (its SAVE table also lists
# stubs such as .h5/.grib that fail at save time, so the list is explicit).
GRID_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MIN_TILE = 96  # px: a saved grid's tiles are enlarged to at least this height (32 px faces are unreadable)
FLIP_MARK = "*"  # after an attribute whose released value the mechanism flipped (owner-only grids)
EDIT_LEGEND = f"released values (1 present, 0 absent); {FLIP_MARK} flipped by randomized response (owner-only)"
_RESAMPLE = {"nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


def uint8_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()  # (3, H, W), 0..255
    return x / 127.5 - 1.0


def tensor_to_uint8(image) -> np.ndarray:
    """float (3, H, W) in [-1, 1] (tensor or array) -> uint8 (H, W, 3); values outside are clipped."""
    x = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(x.shape)}")
    return np.clip(np.rint((x.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, nrow: int = 8, padding: int = 2, pad_value: int = 255, *, captions=None,
              legend: str | None = None, scale: int = 1, min_tile: int = 0, resample: str = "nearest") -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 RGB grid, images placed row by row: the one place grids are drawn.

    Each tile is enlarged ``scale`` times, or more until it is at least ``min_tile`` pixels tall (``resample``:
    "nearest", whole-pixel blocks, or "lanczos"). ``captions`` (one entry per image: a string, a list of lines or
    None) are written under their tiles in Pillow's default font; a line ending in ``FLIP_MARK`` is drawn in red.
    ``legend`` is written under the whole grid, wrapped at words to its width. With neither, the shape is
    (rows*(H'+p)+p, nrow*(W'+p)+p, 3), H' and W' the enlarged tile size.
    """
    if len(images) == 0:
        raise ValueError("make_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"make_grid: {len(captions)} captions for {len(images)} images")
    tiles = [tensor_to_uint8(im) for im in images]
    h, w = tiles[0].shape[:2]
    scale = max(int(scale), 1, -(-int(min_tile) // h))  # ceil(min_tile / h)
    h, w = h * scale, w * scale
    lines = [_caption_lines(c) for c in captions] if captions is not None else [[] for _ in tiles]
    font = _font() if any(lines) or legend else None
    line_h = _line_height(font) if font else 0
    band = max(len(ls) for ls in lines) * line_h + (2 if any(lines) else 0)  # caption band under every tile
    ncol = min(nrow, len(tiles))
    nrows = -(-len(tiles) // ncol)
    cell_h, cell_w = h + band + padding, w + padding
    legend_lines = _wrap(legend, font, ncol * cell_w + padding - 2) if legend else []
    foot = len(legend_lines) * line_h + 2 if legend else 0
    canvas = Image.new("RGB", (ncol * cell_w + padding, nrows * cell_h + padding + foot), (pad_value,) * 3)
    draw = ImageDraw.Draw(canvas)
    for k, (tile, tile_lines) in enumerate(zip(tiles, lines)):
        r, c = divmod(k, ncol)
        y, x = padding + r * cell_h, padding + c * cell_w
        canvas.paste(_enlarge(tile, scale, resample), (x, y))
        for j, text in enumerate(tile_lines):
            draw.text((x + 1, y + h + 1 + j * line_h), _fit(draw, text, font, w - 2), font=font,
                      fill=(200, 0, 0) if text.endswith(FLIP_MARK) else (0, 0, 0))
    for j, text in enumerate(legend_lines):  # wrapped at words: the legend is read whole, never cut
        draw.text((padding + 1, canvas.height - foot + j * line_h), text, font=font, fill=(0, 0, 0))
    return np.asarray(canvas)


def save_before_after(originals, edits, path, *, captions=None, legend: str | None = None, width: int = 8,
                      min_tile: int = MIN_TILE) -> Path:
    """Pairs of rows, ``width`` images wide: originals (captioned "original") above their edits (``captions``:
    one per edit, e.g. ``attribute_caption(released, flipped=..., level=...)``); tensors or arrays in [-1, 1].
    It shows the originals: the caller writes it owner-only."""
    originals, edits = np.asarray(originals), np.asarray(edits)
    if captions is not None and len(captions) != len(edits):
        raise ValueError(f"save_before_after: {len(captions)} captions for {len(edits)} edits")
    width = max(1, min(width, len(originals)))
    blank = np.ones((1, *originals.shape[1:]), originals.dtype)  # white, to fill a short last row
    tiles, labels = [], []
    for i in range(0, len(originals), width):
        fill = width - len(originals[i : i + width])
        tiles += [originals[i : i + width], *[blank] * fill, edits[i : i + width], *[blank] * fill]
        labels += ["original"] * (width - fill) + [None] * fill
        labels += (list(captions[i : i + width]) if captions is not None else [None] * (width - fill)) + [None] * fill
    return save_grid(np.concatenate(tiles), path, nrow=width, captions=labels if any(labels) else None,
                     legend=legend, min_tile=min_tile)


def attribute_caption(values: Mapping[str, int], *, flipped: Iterable[str] = (), level: str | None = None,
                      skip_unknown: bool = True) -> list[str]:
    """Caption lines of a tile: ``name=value`` per attribute (+1 -> 1, -1 -> 0, 0 -> ?; unknowns left out
    when ``skip_unknown``), ``FLIP_MARK`` after each name in ``flipped``, then ``level`` if given.

    ``flipped`` together with the released value gives the ORIGINAL value away: pass it only for grids that
    stay with the data owner (owner-only files), never for a grid meant for sharing.
    """
    flipped = set(flipped)
    shown = {1: "1", -1: "0", 0: "?"}
    out = [f"{n}={shown.get(int(v), str(v))}{FLIP_MARK if n in flipped else ''}"
           for n, v in values.items() if not (skip_unknown and int(v) == 0 and n not in flipped)]
    return out + ([f"level {level}"] if level else [])


def edit_captions(released: Sequence[Mapping[str, int]], originals: Sequence[Mapping[str, int]], *,
                  protected: Sequence[str], level: str | None = None, refused: Iterable[int] = ()) -> list[list[str]]:
    """Captions of edit tiles for an OWNER-ONLY grid: each protected attribute's released value, ``FLIP_MARK``
    where it differs from ``originals`` (so the caption gives the original away), and ``level``; the tiles at
    the indices in ``refused`` read "refused" (not released)."""
    refused = set(refused)
    return [["refused", "(not released)"] if k in refused else
            attribute_caption({p: r[p] for p in protected}, flipped=[p for p in protected if r[p] != o[p]],
                              level=level, skip_unknown=False)
            for k, (r, o) in enumerate(zip(released, originals))]


def _caption_lines(caption) -> list[str]:
    if caption is None:
        return []
    return [str(caption)] if isinstance(caption, str) else [str(t) for t in caption]


def _font():
    """Pillow's default font: the scalable one at 10 px where this Pillow has it (>= 10.1), else the bitmap one."""
    try:
        return ImageFont.load_default(size=10)
    except (TypeError, ImportError, OSError):  # older Pillow, or no FreeType
        return ImageFont.load_default()


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ag|")[1::2]
    return int(bottom - min(top, 0)) + 2


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` pixels, broken between words (a longer word gets its own line)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, cut with "..." to fit ``width`` pixels (a long attribute list stays inside its tile)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _enlarge(tile: np.ndarray, scale: int, resample: str) -> Image.Image:
    image = Image.fromarray(tile)
    if scale == 1:
        return image
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    return image.resize((image.width * scale, image.height * scale), _RESAMPLE[resample])


def grid_format(path, *, flag: str = "--out") -> str:
    """Pillow's format name for ``path``'s extension; ConfigError naming ``flag`` if it has none or an unknown one."""
    Image.init()
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if ext not in GRID_EXTENSIONS or fmt not in Image.SAVE:
        got = f"the extension {ext!r} is not an image format veil writes" if ext else "has no extension"
        raise ConfigError(f"{path}: {got}; give an image file name ending in one of "
                          f"{', '.join(GRID_EXTENSIONS)} (e.g. grid.png)", option=flag)
    return fmt


def save_grid(images, path, nrow: int = 8, *, scale: int = 1, captions=None, legend: str | None = None,
              min_tile: int = MIN_TILE, resample: str = "nearest") -> Path:
    """Write ``images`` (B, 3, H, W) in [-1, 1] as one grid image (format from the extension, atomically):
    tiles enlarged ``scale`` times and to at least ``min_tile`` px, ``captions`` and ``legend`` as in
    ``make_grid``."""
    path = Path(path)
    fmt = grid_format(path)
    grid = Image.fromarray(make_grid(images, nrow=nrow, captions=captions, legend=legend, scale=scale,
                                     min_tile=min_tile, resample=resample))
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()  # an owner-only file stays so
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            grid.save(f, format=fmt)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
