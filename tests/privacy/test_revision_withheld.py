"""Issue 30: a record the check refused is published as withheld, not silently missing (torch-free)."""

import json

import numpy as np
import pytest

from veil.errors import ConfigError, DataError
from veil.privacy.revision_manifest import RevisionChange, load_manifest, pseudonym, publish_revision, \
    write_revision

NAMES = ["smiling", "eyeglasses"]


def _revision(tmp_path, withheld):
    change = RevisionChange("a", {"smiling": 1, "eyeglasses": -1}, {"smiling": -1, "eyeglasses": -1}, ["smiling"],
                            1.0, 1.0)
    return write_revision(tmp_path / "rev", base_spec={"source": "synthetic", "seed": 0, "resolution": 8},
                          attribute_names=NAMES, changes=[change], images={"a": np.zeros((3, 8, 8), np.float32)},
                          withheld=withheld)


def test_withheld_records_are_listed_in_the_owner_and_the_published_revision(tmp_path):
    rev = _revision(tmp_path, ["b", "c"])
    assert load_manifest(rev)["withheld"] == ["b", "c"]
    key = b"k" * 32
    pub = json.loads((publish_revision(rev, tmp_path / "pub", id_key=key) / "manifest.json").read_text())
    assert pub["withheld"] == [pseudonym("b", key=key), pseudonym("c", key=key)] and "charged" in pub["withheld_note"]
    assert "original_attributes" not in json.dumps(pub)


def test_withheld_ids_are_checked_and_old_revisions_read_as_none_withheld(tmp_path):
    with pytest.raises(ConfigError, match="withheld"):
        _revision(tmp_path, ["a"])  # an id cannot be both released and withheld
    rev = _revision(tmp_path, [])
    manifest = json.loads((rev / "manifest.json").read_text())
    del manifest["withheld"]  # a revision written before issue 30
    (rev / "manifest.json").write_text(json.dumps(manifest))
    assert load_manifest(rev)["withheld"] == []
    manifest["withheld"] = "b"
    (rev / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="withheld"):
        load_manifest(rev)
