"""EditSession: previews spend nothing, feedback moves the level, accept releases exactly once, the editor is
told what is protected."""

import math

import pytest

from veil.errors import ConfigError, PrivacyError
from veil.privacy.accounting import gaussian_mu, image_sensitivity
from veil.privacy.ledger import PrivacyLedger
from veil.privacy.level_policy import set_level
from veil.privacy.mechanism import flip_probability
from veil.privacy.session import EditSession, draw_release
from veil.privacy.levels import LEVELS, PrivacyLevel

ATTRS = {"smiling": 1, "eyeglasses": -1, "hat": 1}


class RecordingEditor:
    """A stand-in EditFn: the 'edit' is the target attributes and strength, so tests can see what was asked.

    Its price is honest: ``pixel_mus`` is [0] for "fresh" (not read), [inf] for "invert", and for "noise" the
    Gaussian mu of 32x32 faces under its fake schedule ``signal(strength)`` (alpha_prod at t0); the default
    keeps nothing of the image (signal 0), so the tests of the label rules see labels only."""

    def __init__(self, signal=lambda strength: 0.0):
        self.calls, self.encodings, self.signal = [], [], signal

    def pixel_mus(self, *, strength, encoding, check):
        assert check is False  # no can_check: nothing is re-done
        if encoding == "invert":
            return [math.inf]
        if encoding == "fresh":
            return [0.0]
        return [gaussian_mu(signal=self.signal(strength), sensitivity=image_sensitivity((3, 32, 32)))]

    def __call__(self, images, *, originals, targets, strength, protected, encoding):
        assert encoding in ("invert", "noise", "fresh")
        self.encodings.append(encoding)
        self.calls.append((list(images), list(originals), list(targets), strength, list(protected)))
        return [(im, dict(t), strength) for im, t in zip(images, targets)]


@pytest.fixture
def ledger(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.sqlite", budget=3.0) as ledger:
        yield ledger


def _session(ledger, editor=None, **kw):
    kw = {"image_id": "img-7", "image": "pixels", "attributes": ATTRS, "protected": ["smiling", "eyeglasses"],
          "editor": editor or RecordingEditor(), "ledger": ledger, "level": "medium", "seed": 5, **kw}
    return EditSession(**kw)


def test_previews_spend_nothing_and_follow_the_level(ledger):
    editor = RecordingEditor()
    session = _session(ledger, editor)
    cands = session.preview(6)
    assert len(cands) == 6 and ledger.releases() == [] and ledger.spends("img-7") == {}
    assert all(c.image[0] == "pixels" and c.image[2] == LEVELS["medium"].strength and c.level.name == "medium"
               for c in cands)
    assert all(c.released_attributes["hat"] == 1 for c in cands)  # unprotected: unchanged
    assert all(0 < c.probability <= 1 for c in cands)
    assert session.preview(6) != cands  # each round draws afresh (same seed, next round)


def test_feedback_moves_the_level(ledger):
    editor = RecordingEditor()
    session = _session(ledger, editor)
    assert session.feedback("more_private").level.name == "high"
    assert session.feedback("more_private").level.name == "max"
    session.preview(1)
    assert editor.encodings[-1] == LEVELS["max"].encoding  # the level's encoding reaches the editor
    assert session.feedback("more_private").level.name == "max"  # max stays max
    assert session.feedback("less_private").level.name == "high"
    assert session.preview(1)[0].image[2] == LEVELS["high"].strength
    assert editor.encodings[-1] == LEVELS["high"].encoding
    assert [h["action"] for h in session.history] == ["more_private"] * 3 + ["less_private"]
    with pytest.raises(ConfigError, match="feedback"):
        session.feedback("publish")


def test_accept_releases_exactly_once_and_spends_its_epsilon(ledger):
    editor = RecordingEditor()
    session = _session(ledger, editor)
    session.preview()
    session.feedback("more_private")  # high: eps 1.0
    outcome = session.feedback("accept")
    release = outcome.release
    assert outcome.decision == "accepted" and ledger.spends("img-7") == {"eyeglasses": 1.0, "smiling": 1.0}
    assert ledger.count("img-7") == 1
    assert release.record.epsilon == 1.0 and release.record.strength == LEVELS["high"].strength and release.record.level == "high"
    assert release.record.released_attributes == release.released_attributes == release.image[1]
    assert release.original_attributes == ATTRS
    assert len(editor.calls[-1][0]) == 1  # one fresh edit, not a preview
    with pytest.raises(PrivacyError, match="already released"):
        session.feedback("accept")
    with pytest.raises(ConfigError, match="closed"):
        session.feedback("more_private")
    assert ledger.count("img-7") == 1 and session.state()["release_id"] == release.record.release_id
    assert session.state()["spent"] == {"eyeglasses": 1.0, "smiling": 1.0} and session.state()["budget"] == 3.0
    assert session.state()["guarantee"]["epsilon"] == pytest.approx(2.0, abs=1e-4)  # two labels at 1: the record


def test_reject_records_nothing(ledger):
    session = _session(ledger)
    assert session.feedback("reject").decision == "rejected"
    assert ledger.releases() == []
    with pytest.raises(ConfigError):
        session.feedback("accept")


def test_a_level_above_the_whole_budget_is_refused(ledger):
    session = _session(ledger, level="medium")  # two protected labels at 2: the record would spend 4 > 3
    with pytest.raises(PrivacyError, match="record has spent epsilon 0 of its budget 3.*would take it to 4"):
        session.accept()
    assert session.decision is None and ledger.releases() == []  # still open: the owner can go more private
    # DDIM inversion ("low"'s encoding) at labels the budget allows: the pixels have no bound
    inverted = _session(ledger, image_id="img-8", level=PrivacyLevel("custom", 0.5, 0.4, "invert"))
    with pytest.raises(PrivacyError, match="pixels have no bound"):
        inverted.accept()
    assert inverted.decision is None and ledger.count("img-8") == 0
    assert session.feedback("more_private").level.name == "high" and session.accept().record.epsilon == 1.0


def test_over_budget_release_is_refused(ledger):
    one = ["eyeglasses"]  # one protected label: a level's epsilon is what the record spends
    _session(ledger, level="medium", protected=one).accept()  # spent 2.0 of 3.0
    editor = RecordingEditor()
    with pytest.raises(PrivacyError, match="spent epsilon 2 of its budget 3"):
        _session(ledger, editor, level="medium", protected=one).accept()
    assert editor.calls == [] and ledger.spent("img-7", "eyeglasses") == 2.0  # refused before any compute
    # the level is one per dataset and attribute (issue 30): the owner changes it for the whole dataset
    set_level(ledger, "eyeglasses", LEVELS["high"], reason="one step more private")
    _session(ledger, level="high", protected=one).accept()  # 3.0: exactly the budget
    set_level(ledger, "eyeglasses", LEVELS["max"], reason="the most private")
    _session(ledger, level="max", protected=one).accept()   # eps 0, the image not read: free
    assert ledger.spent("img-7", "eyeglasses") == 3.0 and ledger.count("img-7") == 3
    assert ledger.guarantee("img-7").epsilon == pytest.approx(3.0, abs=1e-4)


def test_the_editor_is_told_which_attributes_are_protected(ledger):
    # The editor inverts with the protected attributes unknown; the session must say which they are.
    editor = RecordingEditor()
    session = _session(ledger, editor, protected=["eyeglasses"])
    session.preview(2)
    session.accept()
    assert [call[4] for call in editor.calls] == [["eyeglasses"], ["eyeglasses"]]


def test_a_release_that_would_publish_a_protected_value_exactly_is_refused_before_editing(ledger):
    # Every release publishes all attributes, so after one release the image's protected set is fixed:
    # dropping smiling would publish its true value; adding hat, published exactly before, protects nothing.
    _session(ledger, protected=["smiling", "eyeglasses"], level="max").accept()
    editor = RecordingEditor()
    with pytest.raises(PrivacyError, match="publish 'smiling' exactly"):
        _session(ledger, editor, protected=["eyeglasses"], level="max").accept()
    with pytest.raises(PrivacyError, match="'hat' was published exactly"):
        _session(ledger, editor, protected=["smiling", "eyeglasses", "hat"], level="max").accept()
    assert editor.calls == [] and ledger.count("img-7") == 1


def test_successive_releases_draw_fresh_attributes():
    # With a fixed seed, release k of an image uses its own stream: draws over k flip at the RR rate.
    eps, n = 1.0, 4000
    flips = sum(draw_release(image_id="x", attributes=ATTRS, protected=["smiling"], epsilon=eps, seed=1,
                             release_index=k)[0]["smiling"] != 1 for k in range(n))
    q = flip_probability(epsilon=eps)
    assert abs(flips / n - q) <= 5 * math.sqrt(q * (1 - q) / n)
    a, s1 = draw_release(image_id="x", attributes=ATTRS, protected=["smiling"], epsilon=eps, seed=1, release_index=0)
    b, s2 = draw_release(image_id="x", attributes=ATTRS, protected=["smiling"], epsilon=eps, seed=1, release_index=0)
    assert (a, s1) == (b, s2)
    _, secret = draw_release(image_id="x", attributes=ATTRS, protected=["smiling"], epsilon=eps, seed=None,
                             release_index=0)
    assert secret != s1


@pytest.mark.parametrize("kw, match", [
    (dict(protected=[]), "--protect"), (dict(protected=["beard"]), "--protect"),
    (dict(attributes={"smiling": 0, "eyeglasses": 1}), "unknown"), (dict(level="extreme"), "--level"),
])
def test_bad_session_arguments(ledger, kw, match):
    with pytest.raises(ConfigError, match=match):
        _session(ledger, **kw)


def test_max_is_released_again_and_again_at_no_price_only_because_the_image_is_not_read(ledger):
    # Issue 30: max costs what its pixels cost. Its encoding is "fresh" (x_t0 is pure noise): the editor is
    # told so, the release is priced mu 0, and the record's guarantee stays 0 however often it is released.
    editor = RecordingEditor(signal=lambda s: 1.0 - s)  # any image it did read would be charged
    for k in range(12):
        rel = _session(ledger, editor, level="max", seed=k).accept()
        price = rel.record.price
        assert (price.label_epsilon, price.pixel_mu, price.encoding) == (0.0, 0.0, "fresh")
    assert editor.encodings == ["fresh"] * 12 and ledger.count("img-7") == 12
    assert ledger.guarantee("img-7").epsilon == 0.0 and ledger.remaining("img-7") == 3.0


def test_a_noise_level_at_epsilon_0_is_charged_its_pixels(ledger):
    # The same label epsilon 0, but an encoding that reads the image: each release is charged its Gaussian
    # (signal 1e-5 at strength 1: mu = sqrt(1e-5 / (1 - 1e-5)) * 111 = 0.35) and the budget stops them.
    deep = PrivacyLevel("custom", 0.0, 1.0, "noise")
    editor = RecordingEditor(signal=lambda s: 1e-5)
    mu = editor.pixel_mus(strength=1.0, encoding="noise", check=False)[0]
    assert mu == pytest.approx(0.3505, abs=1e-3)
    released = 0
    with pytest.raises(PrivacyError, match="record has spent epsilon"):
        for k in range(100):
            _session(ledger, editor, level=deep, seed=k).accept()
            released += 1
    assert 0 < released == ledger.count("img-7") < 100 and editor.encodings == ["noise"] * released
    assert ledger.guarantee("img-7").pixel_mu == pytest.approx(mu * math.sqrt(released))
    assert 3.0 - 1.0 < ledger.guarantee("img-7").epsilon <= 3.0
