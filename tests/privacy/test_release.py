"""veil.privacy.release.release, the one release function: refused before any compute when the ledger would
refuse, refusals recorded and charged, all or nothing with the caller's hook, draws as the ledger counts them."""

import pytest

from veil.errors import EditRefused, PrivacyError
from veil.privacy.ledger import PrivacyLedger
from veil.privacy.levels import LEVELS
from veil.privacy.release import Edited, ReleaseHook, draw_release, release

ATTRS = {"smiling": 1, "eyeglasses": -1, "hat": 1}
HIGH = LEVELS["high"]  # epsilon 1


@pytest.fixture
def ledger(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.sqlite", budget=2.0) as ledger:
        yield ledger


class Editor:
    """The edit ``release`` is given: records the targets; refuses the images named in ``refuse``."""

    def __init__(self, refuse=(), raises=None):
        self.calls, self.refuse, self.raises = [], set(refuse), raises

    def __call__(self, ids):
        def edit(targets):
            self.calls.append([dict(t) for t in targets])
            if self.raises is not None:
                raise self.raises
            return [Edited(f"edit of {i}", strength=0.9 if i in self.refuse else None,
                           refusal="not shown" if i in self.refuse else None) for i in ids]
        return edit


def _release(ledger, ids, editor, **kw):
    return release(ledger, image_ids=ids, attributes=[ATTRS] * len(ids), protected=["smiling"],
                   level=kw.pop("level", HIGH), edit=editor(ids), **kw)


def test_a_release_is_recorded_with_its_draw_and_its_edit(ledger):
    editor = Editor()
    [done] = _release(ledger, ["img-1"], editor, models=[{"role": "denoiser"}])
    assert done.image == "edit of img-1" and done.refusal is None and done.record.outcome == "released"
    assert done.released_attributes == editor.calls[0][0] == ledger.releases()[0].released_attributes
    assert done.released_attributes["hat"] == 1 and done.released_attributes["eyeglasses"] == -1  # exactly
    rec = done.record
    assert (rec.epsilon, rec.strength, rec.level, rec.models) == (1.0, HIGH.strength, "high", [{"role": "denoiser"}])
    assert ledger.spends("img-1") == {"smiling": 1.0}


def test_a_budget_refusal_edits_nothing_and_writes_nothing(ledger):
    _release(ledger, ["img-1"], Editor(), level=LEVELS["medium"])  # epsilon 2: the whole budget
    editor = Editor()
    with pytest.raises(PrivacyError, match="spent epsilon 2 of its budget 2"):
        _release(ledger, ["img-2", "img-1"], editor)  # one image of the batch over: none of it
    assert editor.calls == [] and len(ledger.releases()) == 1 and ledger.spends("img-2") == {}


def test_a_refused_edit_is_recorded_and_charged(ledger):
    editor = Editor(refuse={"img-2"})
    done = _release(ledger, ["img-1", "img-2"], editor)
    assert [d.record.outcome for d in done] == ["released", "refused"]
    assert done[1].image is None and done[1].refusal == "not shown" and done[1].record.strength == 0.9
    assert ledger.spends("img-2") == {"smiling": 1.0}  # charged: the draw happened, the refusal depends on it
    [refused] = _release(ledger, ["img-3"], Editor(raises=EditRefused("the checker read smiling=+1")))
    assert refused.record.outcome == "refused" and "checker" in refused.refusal
    assert ledger.spends("img-3") == {"smiling": 1.0} and ledger.summary()["releases"]["refused"] == 2


def test_an_error_in_the_edit_records_nothing(ledger):
    with pytest.raises(ValueError, match="not finite"):
        _release(ledger, ["img-1"], Editor(raises=ValueError("not finite")))
    assert ledger.releases() == []


def test_the_hook_runs_in_the_same_transaction(ledger):
    seen = []

    def recorded(tx, released):
        seen.append((ledger.spent("img-1", "smiling"), [r.record.release_id for r in released]))
        tx.execute("INSERT INTO settings (key, value) VALUES (?, ?)", ("hook", "1"))

    [done] = _release(ledger, ["img-1"], Editor(), hook=ReleaseHook(recorded=recorded))
    assert seen == [(1.0, [done.record.release_id])]  # the hook reads the new rows through the ledger
    assert ledger._setting("hook") == 1

    def fail(tx, released):
        tx.execute("INSERT INTO settings (key, value) VALUES (?, ?)", ("lost", "1"))
        raise OSError("disk full")

    def already_answered(tx):
        raise LookupError("this key was answered already")

    with pytest.raises(OSError):
        _release(ledger, ["img-2"], Editor(), hook=ReleaseHook(recorded=fail))
    with pytest.raises(LookupError):
        _release(ledger, ["img-2"], Editor(), hook=ReleaseHook(opened=already_answered))
    assert ledger.count("img-2") == 0 and ledger.spends("img-2") == {} and ledger._setting("lost") is None


def test_a_seeded_draw_follows_how_often_the_image_was_released(ledger):
    editor = Editor()
    for _ in range(2):
        _release(ledger, ["img-1"], editor, seed=11)
    expected = [draw_release(image_id="img-1", attributes=ATTRS, protected=["smiling"], epsilon=1.0, seed=11,
                             release_index=k) for k in range(2)]
    assert [r.seed for r in ledger.releases("img-1")] == [s for _, s in expected]
    assert editor.calls == [[r] for r, _ in expected]
