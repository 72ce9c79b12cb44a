"""Synthetic dataset revisions for the unlearning tests and benchmark: a stand-in for private edits.

``synthetic_flip_revision`` re-renders a share of a synthetic-faces training set as the same people
with one attribute flipped and writes them as a revision (``veil edit``'s format).
"""

from pathlib import Path

import torch

from veil.errors import ConfigError


def synthetic_flip_revision(out, *, datamodule, fraction: float, attribute: str = "eyeglasses", seed: int = 0) -> Path:
    """A revision of ``fraction`` of the training images of a synthetic-faces datamodule, each re-rendered
    as the same person with ``attribute`` flipped (the benchmark's and the tests' stand-in for private edits)."""
    from veil.lightning_modules.data import synthetic_faces as sf
    from veil.lightning_modules.data.grid import uint8_to_tensor
    from veil.lightning_modules.data.revision import RevisionChange, write_revision

    if datamodule.source != "synthetic" or attribute not in datamodule.attribute_names:
        raise ConfigError(f"synthetic_flip_revision: needs synthetic faces with attribute {attribute!r}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction={fraction}: must be in (0, 1]")
    train = datamodule.split_indices("train")
    gen = torch.Generator().manual_seed(seed)
    picked = sorted(train[i] for i in torch.randperm(len(train), generator=gen)[: max(1, round(fraction * len(train)))])
    names, ds = datamodule.attribute_names, datamodule.dataset
    changes, images = [], {}
    for i in picked:
        rng = sf._item_rng(ds.seed, i)
        attrs = sf.draw_attributes(rng)  # the same draws as the dataset, so the same person ...
        original = {n: 1 if attrs[n] else -1 for n in names}
        attrs[attribute] = not attrs[attribute]  # ... with one attribute flipped
        images[ds.ids[i]] = uint8_to_tensor(sf.render_face(attrs, resolution=ds.resolution, rng=rng))
        changes.append(RevisionChange(ds.ids[i], original, {**original, attribute: -original[attribute]},
                                      protected=[attribute]))
    return write_revision(out, base_spec=datamodule.dataset_spec(), attribute_names=names, changes=changes,
                          images=images)
