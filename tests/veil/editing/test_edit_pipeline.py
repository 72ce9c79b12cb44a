"""The edit pipeline (veil.editing.pipeline) on a fake numpy backend: what inversion sees, the check's re-do
ladder, refusal, shared previews, and no torch on the way."""

import subprocess
import sys

import numpy as np
import pytest

from veil.editing.pipeline import EditPipeline
from veil.editing.plan import RETRY_GUIDANCE_FACTOR, RETRY_STRENGTH_STEP
from veil.errors import ConfigError, EditRefused

NAMES = ["smiling", "eyeglasses", "hat"]


class FakeBackend:
    """Numpy walks that record what they are given. x_t0 = images + the attributes inversion saw (so a
    protected value that leaked would change it); an edit's pixels hold its guidance factor, which the
    fake classifier reads back as its logit (row ``r`` passes once the factor reaches ``needs[r]``)."""

    attribute_names = NAMES
    num_train_timesteps = 1000
    mode = "conditional"
    guidance_scale = 2.0
    batch_size = 64

    def __init__(self, *, label_free=False, needs=None):
        self.label_free = label_free
        self.classifiers = {"check": list(NAMES)}
        self.needs = needs  # (B,) guidance factor each row needs to pass the check
        self.inverted, self.noised, self.regenerated = [], [], []

    def asarray(self, values):
        if isinstance(values, (list, tuple)):
            return np.stack([np.asarray(v, dtype=np.float32) for v in values])
        return np.asarray(values, dtype=np.float32)

    def to_host(self, values):
        return np.asarray(values)

    def from_host(self, values):
        return values

    def invert(self, images, attributes, *, timesteps, guidance):
        self.inverted.append((attributes.copy(), list(timesteps), guidance))
        return images + attributes.sum(axis=1)[:, None, None, None]

    def add_noise(self, images, *, t0, noise):
        self.noised.append(t0)
        return images + (np.ones_like(images) if noise is None else noise)

    def regenerate(self, x_t0, targets, *, timesteps, guidance_factor, guide_targets, on_step):
        self.regenerated.append((len(x_t0), guidance_factor.copy()))
        return np.broadcast_to(guidance_factor[:, None, None, None], x_t0.shape).astype(np.float32).copy()

    def logits(self, images):
        factor = images[:, 0, 0, 0]  # what regenerate wrote
        rows = self._rows[: len(images)]
        self._rows = self._rows[len(images):]
        passing = factor >= self.needs[rows] - 1e-6
        z = np.where(passing, 4.0, -4.0).astype(np.float32)[:, None]  # +4: shows the released value (target +1)
        return np.repeat(z, len(NAMES), axis=1)


def _pipeline(**kw):
    backend = FakeBackend(**{k: kw.pop(k) for k in ("label_free", "needs") if k in kw})
    return EditPipeline(backend, num_steps=10, **kw), backend


def _faces(b=3):
    x = np.zeros((b, 3, 4, 4), np.float32)
    a = np.tile(np.array([1.0, -1.0, 1.0], np.float32), (b, 1))
    return x, a


def test_inversion_never_sees_the_true_protected_values():
    editor, backend = _pipeline()
    x, a = _faces()
    yes, no = a.copy(), a.copy()
    yes[:, 1], no[:, 1] = 1.0, -1.0
    up = [editor.invert(x, o, strength=0.5, protected=["eyeglasses"]) for o in (yes, no)]
    np.testing.assert_array_equal(*up)
    for seen, _, _ in backend.inverted:
        assert (seen[:, 1] == 0).all() and (seen[:, [0, 2]] == a[:, [0, 2]]).all()  # the others still condition it
    edits = [editor.edit(x, o, yes, strength=0.5, protected=["eyeglasses"]) for o in (yes, no)]
    np.testing.assert_array_equal(*edits)
    assert all((seen[:, 1] == 0).all() for seen, _, _ in backend.inverted)


def test_a_label_free_denoiser_inverts_under_zeros_at_guidance_one():
    editor, backend = _pipeline(label_free=True, inversion_guidance=3.0)
    x, a = _faces(2)
    editor.invert(x, a, strength=0.3, protected=["smiling"])
    (seen, grid, w), = backend.inverted
    assert (seen == 0).all() and w == 1.0 and grid == editor.timesteps(0.3)


def test_protected_is_required_and_checked():
    editor, _ = _pipeline()
    x, a = _faces(1)
    with pytest.raises(TypeError):
        editor.invert(x, a, strength=0.3)  # keyword-only and required: a caller cannot forget it
    for bad, match in ([], "at least one"), ("eyeglasses", "at least one"), (["mustache"], "mustache"):
        with pytest.raises(ConfigError, match=match) as e:
            editor.edit(x, a, a, strength=0.3, protected=bad)
        assert e.value.option == "--protect" and e.value.phrase("protected").startswith("protected")


def test_the_check_redoes_only_the_failing_rows_along_the_ladder():
    # row 0 passes at once, row 1 on the first re-do (factor 1.5), row 2 never (it would need 3 > 2.25)
    editor, backend = _pipeline(needs=np.array([1.0, 1.5, 3.0]), max_retries=2)
    backend._rows = np.array([0, 1, 2, 1, 2, 2])  # which row each logits call reads, in order
    x, a = _faces()
    got = editor.edit_checked(x, a, np.ones_like(a), strength=0.5, protected=["smiling"])
    assert [n for n, _ in backend.regenerated] == [3, 2, 1]
    assert got.passed.tolist() == [True, True, False] and got.attempts.tolist() == [1, 2, 3]
    np.testing.assert_allclose(got.strength, [0.5, 0.5 + RETRY_STRENGTH_STEP, 0.5 + 2 * RETRY_STRENGTH_STEP])
    assert got.guidance_factor.tolist() == [1.0, RETRY_GUIDANCE_FACTOR, RETRY_GUIDANCE_FACTOR**2]
    assert got.images[:, 0, 0, 0].tolist() == [1.0, 1.5, 2.25]  # each row keeps its last attempt
    assert got.row(2) == {"passed": False, "attempts": 3, "strength": 0.8, "guidance_factor": 2.25,
                          "shown": {"smiling": pytest.approx(float(1 / (1 + np.exp(4.0))), abs=1e-4)}}


def test_a_checked_editfn_call_refuses_what_fails_every_redo():
    editor, backend = _pipeline(needs=np.array([9.0]), max_retries=1)
    backend._rows = np.array([0, 0])
    x, _ = _faces(1)
    original = {"smiling": 1, "eyeglasses": -1, "hat": 1}
    with pytest.raises(EditRefused, match="after 2 attempts") as e:
        editor([x[0]], originals=[original], targets=[original], strength=0.5, protected=["smiling"], check=True)
    assert e.value.checked.passed.tolist() == [False]


def test_previews_of_one_image_share_one_encoding():
    editor, backend = _pipeline()
    x, _ = _faces(1)
    original = {"smiling": 1, "eyeglasses": -1, "hat": 1}
    targets = [dict(original, smiling=s) for s in (-1, 1, -1)]
    out = editor([x[0]] * 3, originals=[original] * 3, targets=targets, strength=0.4, protected=["smiling"],
                 encoding="noise")
    assert len(out) == 3 and backend.noised == [editor.timesteps(0.4)[-1]] and backend.regenerated[0][0] == 3
    editor([x[0]] * 2, originals=[original] * 2, targets=targets[:2], strength=0.4, protected=["smiling"])
    assert [len(seen) for seen, _, _ in backend.inverted] == [1]  # one inversion (batch 1) for both previews


def test_guesses_and_the_shown_probability_come_from_the_check_classifier():
    editor, backend = _pipeline(needs=np.array([1.0, 5.0]))
    backend._rows = np.array([0, 1, 0, 1])
    x, _ = _faces(2)
    x[:, 0, 0, 0] = 1.0
    guesses = editor.propose(x)
    assert [g["hat"]["value"] for g in guesses] == [1, -1] and guesses[0]["hat"]["confidence"] == 0.982
    targets = np.array([[1.0, 0, 0], [-1.0, 0, 0]], np.float32)
    np.testing.assert_allclose(editor.shown(x, targets, protected=["smiling"])[:, 0], [0.982, 0.982], atol=1e-3)


def test_the_pipeline_imports_no_torch():
    code = "import sys, veil.editing.pipeline, veil.editing.backend; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["False"], result.stderr
