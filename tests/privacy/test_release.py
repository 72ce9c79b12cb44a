"""veil.privacy.release.release, the one release function: refused before any compute when the ledger would
refuse, refusals recorded and charged, all or nothing with the caller's hook, draws as the ledger counts them."""

import math

import pytest

from veil.errors import EditRefused, PrivacyError
from veil.privacy.accounting import gaussian_mu, image_sensitivity
from veil.privacy.ledger import PrivacyLedger
from veil.privacy.levels import LEVELS, PrivacyLevel, resolve_level
from veil.privacy.release import Edited, ReleaseHook, draw_release, release

ATTRS = {"smiling": 1, "eyeglasses": -1, "hat": 1}
HIGH = LEVELS["high"]  # epsilon 1
NOISY = PrivacyLevel("custom", 1.0, 0.5, "noise")  # a level that reads the image


@pytest.fixture
def ledger(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.sqlite", budget=2.0) as ledger:
        yield ledger


SENSITIVITY = image_sensitivity((3, 32, 32))


class Editor:
    """The edit ``release`` is given: records the targets; refuses the images named in ``refuse``.

    Its price is honest: ``pixel_mus`` is [0] per attempt for "fresh", [inf] for "invert", and for "noise" the
    Gaussian mu of 32x32 faces under its schedule ``signal(strength)`` (alpha_prod at t0). The default schedule
    keeps nothing of the image (signal 0), as this edit never reads it ("edit of <id>"): the label tests see
    labels only. ``ladder``: the strengths of the first try and each re-do a check may make."""

    def __init__(self, refuse=(), raises=None, signal=lambda strength: 0.0, ladder=(0.0, 0.15, 0.3)):
        self.calls, self.refuse, self.raises = [], set(refuse), raises
        self.signal, self.ladder, self.priced = signal, ladder, []

    def pixel_mus(self, *, strength, encoding, check):
        self.priced.append((strength, encoding, check))
        attempts = [min(1.0, strength + d) for d in (self.ladder if check else self.ladder[:1])]
        if encoding == "invert":
            return [math.inf]
        if encoding == "fresh":
            return [0.0] * len(attempts)
        return [gaussian_mu(signal=self.signal(s), sensitivity=SENSITIVITY) for s in attempts]

    def __call__(self, ids):
        def edit(targets):
            self.calls.append([dict(t) for t in targets])
            if self.raises is not None:
                raise self.raises
            return [Edited(f"edit of {i}", strength=0.9 if i in self.refuse else None,
                           refusal="not shown" if i in self.refuse else None) for i in ids]
        return edit


def _release(ledger, ids, editor, **kw):
    level, check = kw.pop("level", HIGH), kw.pop("check", False)
    return release(ledger, image_ids=ids, attributes=[ATTRS] * len(ids), protected=["smiling"], level=level,
                   edit=editor(ids), pixel_mus=editor.pixel_mus(strength=level.strength, encoding=level.encoding,
                                                                check=check), **kw)


def test_a_release_is_recorded_with_its_draw_and_its_edit(ledger):
    editor = Editor()
    [done] = _release(ledger, ["img-1"], editor, models=[{"role": "denoiser"}])
    assert done.image == "edit of img-1" and done.refusal is None and done.record.outcome == "released"
    assert done.released_attributes == editor.calls[0][0] == ledger.releases()[0].released_attributes
    assert done.released_attributes["hat"] == 1 and done.released_attributes["eyeglasses"] == -1  # exactly
    rec = done.record
    assert (rec.epsilon, rec.strength, rec.level, rec.models) == (1.0, HIGH.strength, "high", [{"role": "denoiser"}])
    assert ledger.spends("img-1") == {"smiling": 1.0}
    assert (rec.price.label_epsilon, rec.price.labels, rec.price.pixel_mu, rec.price.encoding) == (1.0, 1, 0.0, HIGH.encoding)


def test_a_budget_refusal_edits_nothing_and_writes_nothing(ledger):
    _release(ledger, ["img-1"], Editor(), level=LEVELS["medium"])  # epsilon 2: the whole budget
    editor = Editor()
    with pytest.raises(PrivacyError, match="spent epsilon 2 of its budget 2"):
        _release(ledger, ["img-2", "img-1"], editor, level=LEVELS["medium"])  # one image of the batch over: none
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


def test_a_release_is_priced_by_its_caller_or_not_at_all(ledger):
    with pytest.raises(TypeError, match="pixel_mus"):
        release(ledger, image_ids=["img-1"], attributes=[ATTRS], protected=["smiling"], level=HIGH,
                edit=Editor()(["img-1"]))
    assert ledger.releases() == []


def test_a_client_chosen_level_at_epsilon_0_is_charged_its_pixels(ledger, tmp_path):
    # The hole: the server and the CLI take epsilon, strength and encoding from the client; at epsilon 0 and a
    # small strength the "edit" is nearly the original, and it was charged nothing. Priced by the same rule as
    # every level, its pixels (alpha_prod 0.9 at t0: mu = 3 * 111) are far past any budget.
    level = resolve_level("max", strength=0.1, encoding="noise")
    assert (level.name, level.epsilon) == ("custom", 0.0)
    editor = Editor(signal=lambda s: 1.0 - s)
    with pytest.raises(PrivacyError, match="record has spent epsilon 0 of its budget 2.*pixels"):
        _release(ledger, ["img-1"], editor, level=level)
    assert editor.calls == [] and ledger.releases() == []  # refused before any compute
    assert editor.priced == [(0.1, "noise", False)]
    with PrivacyLedger(tmp_path / "unlimited.sqlite", budget=math.inf) as unlimited:
        [done] = _release(unlimited, ["img-1"], editor, level=level)
        mu = gaussian_mu(signal=0.9, sensitivity=SENSITIVITY)
        assert done.record.price.pixel_mu == pytest.approx(mu) == pytest.approx(3 * SENSITIVITY)
        assert done.record.price.label_epsilon == 0.0 and unlimited.spent("img-1", "smiling") == 0.0
        assert unlimited.guarantee("img-1").epsilon > 1000  # charged, and said: not "epsilon 0"
    invert = resolve_level("max", strength=0.1, encoding="invert")  # inversion: no bound, refused outright
    with pytest.raises(PrivacyError, match="pixels have no bound"):
        _release(ledger, ["img-1"], editor, level=invert)


def test_every_attempt_the_check_may_make_is_in_the_price(tmp_path):
    # A re-do draws a new encoding of the image: whether an edit was re-done depends on the coin, so every
    # attempt the check may make is charged, whether or not it happens.
    editor = Editor(signal=lambda s: (1.0 - s) ** 4)
    mus = editor.pixel_mus(strength=NOISY.strength, encoding="noise", check=True)
    assert len(mus) == 3 and mus[0] > mus[1] > mus[2] > 0  # one per attempt, deeper each time
    with PrivacyLedger(tmp_path / "l.sqlite", budget=math.inf) as ledger:
        [checked] = _release(ledger, ["img-1"], editor, level=NOISY, check=True)
        [alone] = _release(ledger, ["img-2"], editor, level=NOISY, check=False)
    assert checked.record.price.pixel_mu == pytest.approx(math.sqrt(sum(m * m for m in mus)))
    assert alone.record.price.pixel_mu == pytest.approx(mus[0]) and mus[0] < checked.record.price.pixel_mu
    assert ledger.guarantee("img-1").pixels_epsilon > ledger.guarantee("img-2").pixels_epsilon


def test_max_is_free_because_the_image_is_not_read(ledger):
    editor = Editor(signal=lambda s: 1.0 - s)
    for _ in range(10):
        [done] = _release(ledger, ["img-1"], editor, level=LEVELS["max"], check=True)
        assert (done.record.price.pixel_mu, done.record.price.encoding) == (0.0, "fresh")
    assert ledger.guarantee("img-1").epsilon == 0.0 and editor.priced[-1] == (1.0, "fresh", True)
