"""Issue 30, item 4: one level per protected attribute and dataset, so a published level says nothing of an image."""

import pytest

from veil.cli import main
from veil.errors import PrivacyError
from veil.privacy.ledger import PrivacyLedger
from veil.privacy.level_policy import pinned_levels, set_level
from veil.privacy.session import EditSession

ATTRS = {"smiling": 1, "eyeglasses": -1, "hat": 1}


class Editor:
    """A stand-in EditFn that prices nothing (fresh) and records what it was asked."""

    def __init__(self):
        self.calls = []

    def pixel_mus(self, *, strength, encoding, check):
        return [0.0]

    def __call__(self, images, *, originals, targets, strength, protected, encoding):
        self.calls.append(encoding)
        return [dict(t) for t in targets]


def _accept(ledger, image_id, level, editor=None, protected=("smiling",)):
    return EditSession(image_id=image_id, image="pixels", attributes=ATTRS, protected=list(protected),
                       editor=editor or Editor(), ledger=ledger, level=level).accept()


def test_the_first_release_pins_the_level_and_another_image_cannot_choose_its_own(tmp_path):
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        _accept(ledger, "img-1", "high")
        assert pinned_levels(ledger)["smiling"]["name"] == "high"
        editor = Editor()
        with pytest.raises(PrivacyError, match="releases 'smiling' at level 'high'.*set-level"):
            _accept(ledger, "img-2", "max", editor)  # e.g. more protection where the picture shows a smile
        assert editor.calls == [] and ledger.count("img-2") == 0  # refused before any compute
        _accept(ledger, "img-2", "high")
        _accept(ledger, "img-3", "max", protected=["hat"])  # another attribute: its own level
        assert pinned_levels(ledger)["hat"]["name"] == "max"
        with pytest.raises(PrivacyError, match="'hat'"):  # a release protecting both needs both levels to agree
            _accept(ledger, "img-4", "high", protected=["smiling", "hat"])


def test_the_owner_changes_the_level_for_the_whole_dataset_and_it_is_recorded(tmp_path):
    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path) as ledger:
        _accept(ledger, "img-1", "high")
    assert main(["privacy", "set-level", "smiling", "max", "--reason", "chosen on public faces",
                 "--ledger", str(path)]) == 0
    with PrivacyLedger(path) as ledger:
        _accept(ledger, "img-2", "max")
        with pytest.raises(PrivacyError):
            _accept(ledger, "img-3", "high")
        change = [c for c in ledger.policy_changes() if c["setting"] == "level:smiling"][-1]
        assert change["old_value"]["name"] == "high" and change["new_value"]["name"] == "max"
        assert change["reason"] == "chosen on public faces"
        set_level(ledger, "smiling", None, reason="unpinned: the next release pins it")
        _accept(ledger, "img-4", "medium")
        assert pinned_levels(ledger)["smiling"]["name"] == "medium"
    assert main(["privacy", "set-level", "smiling", "ultra", "--reason", "x", "--ledger", str(path)]) == 2
