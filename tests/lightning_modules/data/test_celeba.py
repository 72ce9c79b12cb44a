"""CelebA read from a fake folder in CelebA's layout: crops, attribute selection, the official split, file errors.

Fast and deterministic: fake folders are written into tmp_path and synthetic sets are small.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from fake_data import GREEN, make_celeba

from veil.errors import ConfigError, DataError
from veil.lightning_modules.data.celeba import CELEBA_ATTRIBUTES, CelebA


def test_celeba_loads_crops_and_selects_attributes(tmp_path):
    names, labels = make_celeba(tmp_path)
    ds = CelebA(tmp_path, attributes=["Smiling", "Eyeglasses"], resolution=16, split="all")
    assert len(ds) == 9 and ds.ids == names and ds.attribute_names == ["Smiling", "Eyeglasses"]
    cols = [CELEBA_ATTRIBUTES.index("Smiling"), CELEBA_ATTRIBUTES.index("Eyeglasses")]
    assert torch.equal(ds.attribute_matrix, torch.tensor(labels[:, cols], dtype=torch.float32))
    image, attrs = ds[4]
    assert image.shape == (3, 16, 16) and attrs.shape == (2,)
    pixels = ds.image_uint8(4).astype(int)
    assert np.abs(pixels - np.array(GREEN)).max() < 16  # no red or blue: the bands were cropped away
    assert ds.partition == [i % 3 for i in range(9)]


@pytest.mark.parametrize("split, expected", [("train", [0, 3, 6]), ("valid", [1, 4, 7]), ("test", [2, 5, 8])])
def test_celeba_official_split(tmp_path, split, expected):
    names, _ = make_celeba(tmp_path)
    ds = CelebA(tmp_path, attributes=["Male"], resolution=8, split=split)
    assert ds.ids == [names[i] for i in expected]


def _corrupt(path, line_no, new_line):
    lines = path.read_text().splitlines()
    lines[line_no - 1] = new_line
    path.write_text("\n".join(lines) + "\n")


ATTR = "list_attr_celeba.txt"


@pytest.mark.parametrize("damage, pattern", [
    (lambda r: (r / ATTR).unlink(), ATTR),
    (lambda r: shutil.rmtree(r / "img_align_celeba"), "img_align_celeba"),
    (lambda r: _corrupt(r / ATTR, 5, "000003.jpg 1 -1"), rf"{ATTR}, line 5: expected 41"),
    (lambda r: _corrupt(r / ATTR, 4, "000002.jpg " + "1 " * 39 + "yes"), r"line 4.*'Young'.*'yes'"),
    (lambda r: _corrupt(r / ATTR, 1, "12"), r"line 1: announces 12 images but lists 9"),
    (lambda r: (r / "img_align_celeba" / "000007.jpg").unlink(), "000007.jpg"),
    (lambda r: (r / "list_eval_partition.txt").unlink(), "list_eval_partition.txt"),
])
def test_celeba_file_errors_name_the_file(tmp_path, damage, pattern):
    make_celeba(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=pattern):
        CelebA(tmp_path, attributes=["Smiling"], resolution=8, split="train")


def test_celeba_argument_errors(tmp_path):
    make_celeba(tmp_path)
    with pytest.raises(ConfigError, match=r"'Smilling'.*did you mean \['Smiling'\]"):
        CelebA(tmp_path, attributes=["Smilling"], resolution=8)
    with pytest.raises(ConfigError, match="split"):
        CelebA(tmp_path, attributes=["Smiling"], split="validation")
    with pytest.raises(DataError, match="nowhere"):
        CelebA(tmp_path / "nowhere", attributes=["Smiling"])
