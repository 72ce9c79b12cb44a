"""Image tensors <-> uint8 pixels, and PNG contact sheets of a batch.

veil's image tensors are float32 (3, H, W) in [-1, 1]; files and previews are uint8 RGB (H, W, 3).
``save_grid(images, "grid.png", nrow=8)`` writes a batch (B, 3, H, W) as one image, row by row, in the
format its extension names (``GRID_EXTENSIONS``; ``grid_format`` checks a path before any work), through
a temporary file and a rename, so an existing grid is never left half-written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from veil.errors import ConfigError

__all__ = ["uint8_to_tensor", "tensor_to_uint8", "make_grid", "save_grid", "grid_format", "GRID_EXTENSIONS"]

# Lossless or common RGB formats that Pillow writes with no plugin (its SAVE table also lists
# stubs such as .h5/.grib that fail at save time, so the list is explicit).
GRID_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


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


def make_grid(images, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (rows*(H+p)+p, nrow*(W+p)+p, 3), images placed row by row."""
    if len(images) == 0:
        raise ValueError("make_grid needs at least one image")
    tiles = [tensor_to_uint8(im) for im in images]
    h, w = tiles[0].shape[:2]
    ncol = min(nrow, len(tiles))
    nrows = -(-len(tiles) // ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), pad_value, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y : y + h, x : x + w] = tile
    return grid


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


def save_grid(images, path, nrow: int = 8, *, scale: int = 1) -> Path:
    """Write ``images`` (B, 3, H, W) in [-1, 1] as one grid image (format from the extension, atomically);
    ``scale`` enlarges it (nearest)."""
    path = Path(path)
    fmt = grid_format(path)
    grid = Image.fromarray(make_grid(images, nrow=nrow))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
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
