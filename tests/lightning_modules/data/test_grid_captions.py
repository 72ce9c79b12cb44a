"""Labelled grids (issue 31): tiles enlarged to at least MIN_TILE px and captioned under each tile, flipped
values marked (red, FLIP_MARK) only where a caller asks, the one drawing function for every grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from veil.lightning_modules.data.grid import (
    FLIP_MARK,
    MIN_TILE,
    attribute_caption,
    edit_captions,
    make_grid,
    save_before_after,
    save_grid,
)


def _faces(n: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _red(pixels: np.ndarray) -> int:
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return int(((r > 150) & (g < 80) & (b < 80)).sum())


def test_a_sixteen_image_grid_is_no_longer_thumbnail_sized(tmp_path):
    path = save_grid(_faces(16), tmp_path / "grid.png")  # the issue: 274x70 px, 32 px per tile
    with Image.open(path) as im:
        assert im.size == (8 * (96 + 2) + 2, 2 * (96 + 2) + 2) and MIN_TILE == 96


def test_tiles_are_enlarged_by_whole_pixels_and_lanczos_on_request():
    x = _faces(2, 16)
    grid = make_grid(x, nrow=2, padding=0, min_tile=96)  # 16 px -> 6x
    assert grid.shape == (96, 192, 3)
    tile = make_grid(x[:1], padding=0)  # the 16 px original
    assert np.array_equal(grid[:96, :96], np.kron(tile, np.ones((6, 6, 1), np.uint8)))  # nearest: blocks
    smooth = make_grid(x, nrow=2, padding=0, min_tile=96, resample="lanczos")
    assert smooth.shape == grid.shape and not np.array_equal(smooth, grid)


def test_captions_are_written_under_their_tiles_and_flips_in_red():
    x = _faces(2)
    plain = make_grid(x, nrow=2, min_tile=96)
    captions = [attribute_caption({"smiling": 1, "eyeglasses": -1}, level="medium"),
                attribute_caption({"smiling": 1, "eyeglasses": 1}, flipped=["eyeglasses"], level="medium")]
    grid = make_grid(x, nrow=2, min_tile=96, captions=captions, legend="a legend")
    assert grid.shape[1] == plain.shape[1] and grid.shape[0] > plain.shape[0] + 3 * 10  # 3 lines + the legend
    band = grid[2 + 96 : 2 + 96 + 40]  # under the first row of tiles
    left, right = band[:, : 2 + 96], band[:, 2 + 96 :]
    assert (left < 128).any() and (right < 128).any()  # text under each tile
    assert _red(left) == 0 and _red(right) > 5  # only the flipped value is red
    assert captions[1] == ["smiling=1", f"eyeglasses=1{FLIP_MARK}", "level medium"]
    assert attribute_caption({"smiling": 0, "hat": -1}) == ["hat=0"]  # unknowns left out on a sample grid


def test_edit_captions_mark_flips_and_refusals_and_the_before_after_layout(tmp_path):
    released = [{"eyeglasses": 1, "smiling": 1}, {"eyeglasses": -1, "smiling": 1}, {"eyeglasses": 1, "smiling": -1}]
    originals = [{"eyeglasses": 1, "smiling": 1}, {"eyeglasses": 1, "smiling": 1}, {"eyeglasses": -1, "smiling": -1}]
    caps = edit_captions(released, originals, protected=["eyeglasses"], level="high", refused=[2])
    assert caps == [["eyeglasses=1", "level high"], [f"eyeglasses=0{FLIP_MARK}", "level high"],
                    ["refused", "(not released)"]]
    path = save_before_after(_faces(3), _faces(3), tmp_path / "ba.png", captions=caps, width=2)
    with Image.open(path) as im:  # 2 pairs of rows, 2 wide; tiles 96 px plus caption bands
        assert im.size[0] == 2 * 98 + 2 and im.size[1] > 4 * 98 + 2
    with pytest.raises(ValueError, match="captions"):
        save_before_after(_faces(3), _faces(3), tmp_path / "bad.png", captions=caps[:2])


def test_a_long_legend_wraps_at_words_instead_of_being_cut():
    x = _faces(2)
    short = make_grid(x, nrow=2, min_tile=96, legend="a legend")
    text = "released values (1 present, 0 absent); * flipped by randomized response, the original value given away"
    long = make_grid(x, nrow=2, min_tile=96, legend=text)
    assert long.shape[1] == short.shape[1] and long.shape[0] >= short.shape[0] + 2 * 9  # 3+ lines, not one
    foot = long[short.shape[0] - 12 :]  # the legend's lines: text reaches the last one
    assert (foot[-12:] < 128).any()
