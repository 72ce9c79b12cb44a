"""Synthetic faces: determinism, item format, attribute balance, counterfactuals, learnability.

Fast and deterministic: fake folders are written into tmp_path and synthetic sets are small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from veil.errors import ConfigError
from veil.lightning_modules.data.synthetic_faces import (
    SYNTHETIC_ATTRIBUTES,
    SyntheticFaces,
    render_face,
    save_grid,
)


def test_synthetic_same_seed_is_byte_identical_and_seeds_differ():
    a, b = SyntheticFaces(num_images=6, seed=4), SyntheticFaces(num_images=6, seed=4)
    c = SyntheticFaces(num_images=6, seed=5)
    for i in range(6):
        assert np.array_equal(a.image_uint8(i), b.image_uint8(i))
        assert not np.array_equal(a.image_uint8(i), c.image_uint8(i))
    assert torch.equal(a.attribute_matrix, b.attribute_matrix)
    assert a.ids == [f"synth-4-{i:06d}" for i in range(6)] and len(set(c.ids)) == 6


def test_synthetic_image_depends_only_on_seed_and_index():
    small, large = SyntheticFaces(num_images=10, seed=2), SyntheticFaces(num_images=100, seed=2)
    for i in (0, 3, 9):
        assert torch.equal(small[i][0], large[i][0]) and torch.equal(small[i][1], large[i][1])


@pytest.mark.parametrize("resolution", [32, 64])
def test_synthetic_item_format(resolution):
    ds = SyntheticFaces(num_images=4, resolution=resolution, seed=0)
    image, attrs = ds[1]
    assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.1
    assert attrs.shape == (6,) and attrs.dtype == torch.float32 and set(attrs.tolist()) <= {-1.0, 1.0}
    assert ds.attribute_matrix.shape == (4, 6) and len(ds) == 4 and ds.resolution == resolution
    assert torch.equal(ds[-1][0], ds[3][0])


def test_synthetic_attribute_subset_keeps_values_and_order():
    full = SyntheticFaces(num_images=50, seed=1)
    sub = SyntheticFaces(num_images=50, seed=1, attributes=["pale_skin", "smiling"])
    assert sub.attribute_names == ["pale_skin", "smiling"]
    assert torch.equal(sub.attribute_matrix, full.attribute_matrix[:, [5, 0]])
    assert torch.equal(sub[7][0], full[7][0])  # hidden attributes are still drawn: the same picture


@pytest.mark.parametrize("kwargs, option", [
    (dict(attributes=["smiling", "glasses"]), "glasses"),
    (dict(resolution=40), "resolution"),
    (dict(resolution=16), "resolution"),
    (dict(num_images=0), "num_images"),
])
def test_synthetic_bad_arguments_raise_config_error(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        SyntheticFaces(**kwargs)


def test_synthetic_attributes_are_balanced_and_independent():
    m = SyntheticFaces(num_images=4096, seed=0).attribute_matrix  # (N, 6), no rendering needed
    assert m.mean(0).abs().max() < 0.08  # each mean of +-1 coins has sd 1/64
    corr = torch.corrcoef(m.T) - torch.eye(6)
    assert corr.abs().max() < 0.08


def test_render_face_counterfactuals_share_the_person():
    attrs = dict.fromkeys(SYNTHETIC_ATTRIBUTES, False)
    base = render_face(attrs, resolution=32, rng=np.random.default_rng(11))
    again = render_face(attrs, resolution=32, rng=np.random.default_rng(11))
    glasses = render_face({**attrs, "eyeglasses": True}, resolution=32, rng=np.random.default_rng(11))
    assert base.shape == (32, 32, 3) and base.dtype == np.uint8 and np.array_equal(base, again)
    changed = np.abs(glasses.astype(int) - base.astype(int)).max(axis=2) > 12
    assert 10 < changed.sum() < 300  # the glasses, not the whole picture
    with pytest.raises(ConfigError, match="hat"):
        render_face({"smiling": True}, resolution=32, rng=np.random.default_rng(0))


def test_save_grid_writes_png(tmp_path):
    images = SyntheticFaces(num_images=8, seed=0)
    path = save_grid(torch.stack([images[i][0] for i in range(8)]), tmp_path / "grid.png", nrow=4)
    with Image.open(path) as im:
        assert im.size == (4 * 98 + 2, 2 * 98 + 2) and im.mode == "RGB"  # 32 px tiles enlarged to 96


@pytest.fixture(scope="module")
def faces_and_cnn_accuracy():
    """1000 training / 300 held-out faces at 32px, and a tiny CNN's held-out accuracy per attribute."""
    ds = SyntheticFaces(num_images=1300, seed=7).render_all()
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # (1300, 3, 32, 32)
    y = (ds.attribute_matrix > 0).float()  # (1300, 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is faster than two on a shared, busy CPU
    torch.manual_seed(0)
    net = nn.Sequential(  # 32 -> 32 -> 16 -> 8 -> 4
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 6),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        for idx in torch.randperm(1000, generator=g).split(50):
            loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = ((net(x[1000:]) > 0).float() == y[1000:]).float().mean(0)  # (6,)
    torch.set_num_threads(threads)
    return x, y, accuracy


def test_attributes_are_learnable_by_a_small_cnn(faces_and_cnn_accuracy):
    _, _, accuracy = faces_and_cnn_accuracy
    for name, acc in zip(SYNTHETIC_ATTRIBUTES, accuracy.tolist()):
        assert acc > 0.8, f"{name}: held-out accuracy {acc:.3f}"


def test_no_single_pixel_decides_an_attribute(faces_and_cnn_accuracy):
    x, y, accuracy = faces_and_cnn_accuracy
    features = x[:1000].reshape(1000, -1).numpy()  # every (channel, pixel) value is a candidate
    order = np.argsort(features, axis=0)
    for k, name in enumerate(SYNTHETIC_ATTRIBUTES):
        labels = y[:1000, k].numpy()[order]  # (1000, 3072), sorted by each feature
        # accuracy of "positive above the threshold" for every cut of every feature, best of either sign
        above = (np.cumsum(1 - labels, 0) + labels.sum(0) - np.cumsum(labels, 0)) / len(labels)
        best = float(np.maximum(above, 1 - above).max())  # in-sample: an upper bound for a one-pixel rule
        assert best < 0.9 and best < accuracy[k] - 0.05, f"{name}: one pixel reaches {best:.3f}"
