"""Image tensors <-> uint8 pixels, and PNG contact sheets of a batch.

veil's image tensors are float32 (3, H, W) in [-1, 1]; files and previews are uint8 RGB (H, W, 3).
``save_grid(images, "grid.png", nrow=8)`` writes a batch (B, 3, H, W) as one PNG, row by row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["uint8_to_tensor", "tensor_to_uint8", "make_grid", "save_grid"]


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


def save_grid(images, path, nrow: int = 8, *, scale: int = 1) -> Path:
    """Write ``images`` (B, 3, H, W) in [-1, 1] as one PNG grid; ``scale`` enlarges it (nearest)."""
    grid = Image.fromarray(make_grid(images, nrow=nrow))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
