"""Dataset revisions: the manifest round trip and its errors, the revised dataset.

Fast and deterministic: fake folders are written into tmp_path and synthetic sets are small.
"""

from __future__ import annotations

import json

import pytest
import torch
from fake_data import BASE_SPEC, write_example_revision

from veil.errors import ConfigError, DataError
from veil.lightning_modules.data.revision import (
    RevisedDataset,
    RevisionChange,
    load_manifest,
)
from veil.lightning_modules.data.synthetic_faces import (
    SyntheticFaces,
)


def test_revision_round_trip(tmp_path):
    base = SyntheticFaces(num_images=12, seed=3)
    out_dir, images = write_example_revision(base, tmp_path / "rev")
    manifest = load_manifest(tmp_path / "rev")
    assert out_dir == tmp_path / "rev" and manifest == load_manifest(out_dir / "manifest.json")
    assert manifest["format"] == "veil-revision/1" and manifest["base"] == BASE_SPEC
    assert [c["id"] for c in manifest["changes"]] == [base.ids[5], base.ids[2]]
    assert manifest["changes"][0]["file"] == f"images/{base.ids[5]}.png" and manifest["changes"][0]["epsilon"] == 1.0
    assert sorted(p.name for p in (tmp_path / "rev").iterdir()) == ["images", "manifest.json"]  # no temp files left

    revised = RevisedDataset(base, tmp_path / "rev")
    assert revised.changed_indices == [2, 5] and revised.changed_ids == [base.ids[2], base.ids[5]]
    assert len(revised) == 12 and revised.ids == base.ids and revised.resolution == 32
    for i, flip in ((5, "smiling"), (2, "eyeglasses")):
        image, attrs = revised[i]
        assert torch.allclose(image, images[base.ids[i]], atol=1 / 127.5 + 1e-6)
        k = base.attribute_names.index(flip)
        assert attrs[k] == -base.attribute_matrix[i, k] and torch.equal(revised.attribute_matrix[i], attrs)
    assert torch.equal(revised[0][0], base[0][0]) and torch.equal(revised[0][1], base.attribute_matrix[0])
    assert (revised.attribute_matrix != base.attribute_matrix).sum() == 2


def test_revision_errors(tmp_path):
    base = SyntheticFaces(num_images=12, seed=3)
    write_example_revision(base, tmp_path / "rev")
    with pytest.raises(DataError, match=r"synth-3-000005"):
        RevisedDataset(SyntheticFaces(num_images=4, seed=3), tmp_path / "rev")
    with pytest.raises(DataError, match="cover"):
        RevisedDataset(CelebAStub(base.ids), tmp_path / "rev")
    with pytest.raises(DataError, match="manifest.json"):
        load_manifest(tmp_path / "empty")
    manifest = json.loads((tmp_path / "rev" / "manifest.json").read_text())
    (tmp_path / "rev" / "manifest.json").write_text(json.dumps({**manifest, "format": "veil-revision/9"}))
    with pytest.raises(DataError, match="veil-revision/1"):
        load_manifest(tmp_path / "rev")
    (tmp_path / "rev" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "rev" / manifest["changes"][0]["file"]).unlink()
    with pytest.raises(DataError, match=manifest["changes"][0]["file"]):
        load_manifest(tmp_path / "rev")
    with pytest.raises(ConfigError, match="released_attributes"):
        RevisionChange("x", {"smiling": 1}, {"smiling": 0})


class CelebAStub:
    """A base dataset with other attribute names."""

    def __init__(self, ids):
        self.ids, self.attribute_names, self.resolution = ids, ["Smiling"], 32
        self.attribute_matrix = torch.ones(len(ids), 1)
