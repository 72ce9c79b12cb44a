"""Fake datasets on disk for the data tests: CelebA's layout, an image folder with a label CSV, a revision."""

import numpy as np
import torch
from PIL import Image

from veil.lightning_modules.data.celeba import CELEBA_ATTRIBUTES
from veil.lightning_modules.data.revision import RevisionChange, write_revision

GREEN = (40, 180, 60)


def _banded_image(width, height, first, last, axis):
    """GREEN with a red band before index ``first`` and a blue one from ``last`` on, along ``axis``."""
    pixels = np.full((height, width, 3), GREEN, np.uint8)
    np.moveaxis(pixels, axis, 0)[:first] = (220, 20, 20)
    np.moveaxis(pixels, axis, 0)[last:] = (20, 20, 220)
    return Image.fromarray(pixels)


def make_celeba(root, n=9):
    """CelebA's layout: n JPEGs of 178x218, 40 random +-1 labels, official split i % 3. Returns (names, labels)."""
    (root / "img_align_celeba").mkdir(parents=True)
    labels = np.random.default_rng(0).choice([-1, 1], size=(n, 40))
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    # 178x218 -> the centred 178x178 square keeps rows 20..197; the bands lie outside it, on 16-row JPEG blocks
    image = _banded_image(178, 218, 16, 208, axis=0)
    for name in names:
        image.save(root / "img_align_celeba" / name, quality=95)
    rows = [f"{name}  " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, labels)]
    (root / "list_attr_celeba.txt").write_text("\n".join([str(n), " ".join(CELEBA_ATTRIBUTES), *rows]) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{m} {i % 3}\n" for i, m in enumerate(names)))
    return names, labels


def make_folder(root, *, header="filename,smiling,hat,young", rows=None, file_column=0):
    """40x30 PNGs under ``root`` and ``root/labels.csv`` (header + rows); returns the CSV path."""
    root.mkdir(parents=True, exist_ok=True)
    image = _banded_image(40, 30, 5, 35, axis=1)  # 40x30 -> the centred 30x30 square keeps columns 5..34
    rows = rows or ["a.png,1,0,1", "b.png,0,1,1", "sub/c.png,1,1,0"]
    for row in rows:
        path = root / row.split(",")[file_column]
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root / "labels.csv"


BASE_SPEC = {"source": "synthetic", "num_images": 12, "resolution": 32, "seed": 3}


def write_example_revision(base, out_dir):
    """A revision of two images of ``base`` (ids 5 and 2): one protected attribute flipped, the image mirrored."""
    names = base.attribute_names
    changes, images = [], {}
    for i, flip in ((5, "smiling"), (2, "eyeglasses")):
        original = {n: int(v) for n, v in zip(names, base.attribute_matrix[i].tolist())}
        changes.append(RevisionChange(base.ids[i], original, {**original, flip: -original[flip]},
                                      protected=[flip], epsilon=1.0, strength=0.5))
        images[base.ids[i]] = torch.flip(base[i][0], dims=[2])  # (3, 32, 32), mirrored
    return write_revision(out_dir, base_spec=BASE_SPEC, attribute_names=names, changes=changes, images=images), images
