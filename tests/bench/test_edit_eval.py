"""bench/edit_eval.py's table logic on fabricated predictions: attacks are compared with the prior-aware
bound (issue 11, item 15), not with p_keep, which only bounds a 50/50 attribute."""

import importlib.util
from pathlib import Path

import pytest
import torch

from veil.privacy.mechanism import keep_probability

NAMES = ["smiling", "eyeglasses", "hat"]
PROTECT = ["eyeglasses", "smiling"]
N = 2000


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parents[2] / "bench" / "edit_eval.py"
    spec = importlib.util.spec_from_file_location("edit_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data():
    """A skewed synthetic protected attribute (eyeglasses: exactly 6.5% positive, as in CelebA), a
    balanced one (smiling) and an unprotected one; released = randomized response at epsilon 1."""
    gen = torch.Generator().manual_seed(0)
    original = torch.where(torch.rand(N, 3, generator=gen) < 0.5, 1.0, -1.0)  # (N,3)
    original[:, 1] = -1.0
    original[torch.randperm(N, generator=gen)[: round(0.065 * N)], 1] = 1.0
    flip = torch.rand(N, 3, generator=gen) >= keep_probability(epsilon=1.0)
    flip[:, 2] = False  # unprotected: released as it is
    released = torch.where(flip, -original, original)
    return original, released


def _row(bench, pred, original, released, priors):
    row = bench.score_edits(pred, original, released, names=NAMES, protect=PROTECT, epsilon=1.0, priors=priors)
    return {"strength": 0.7, **row, "psnr": 30.0, "ssim": 0.9}


def _baseline(priors):
    return {"n": N, "accuracy_on_originals": dict.fromkeys(NAMES, 1.0), "priors": priors, "prior_n": 10 * N}


def test_priors_come_from_known_labels(bench, data):
    original, _ = data
    priors = bench.attribute_priors(original, NAMES)
    assert priors["eyeglasses"] == pytest.approx(0.065)
    with_unknown = torch.cat([original, torch.zeros(5, 3)])  # unknown (0) labels do not count
    assert bench.attribute_priors(with_unknown, NAMES) == priors


def test_always_no_on_a_skewed_attribute_is_not_a_leak(bench, data):
    # The attacker ignores the image and says "no glasses": 93.5% right, far above p_keep = 0.731 at
    # epsilon 1 (the old comparison flagged that as a leak of +0.204) but exactly the Bayes-optimal
    # accuracy randomized response allows at prior 0.065. For smiling it reads the released value.
    original, released = data
    priors = bench.attribute_priors(original, NAMES)
    pred = released.clone()
    pred[:, 1] = -1.0
    row = _row(bench, pred, original, released, priors)
    p_keep = keep_probability(epsilon=1.0)
    assert row["attack"]["eyeglasses"] == pytest.approx(0.935) and row["attack"]["eyeglasses"] > p_keep + 0.2
    assert bench._excess(row["attack"]["eyeglasses"], p_keep, N).endswith("*")  # what the old table said
    assert row["bound"]["eyeglasses"] == pytest.approx(0.935) and row["p_keep"] == pytest.approx(p_keep)
    table = bench.markdown([row], _baseline(priors), PROTECT)
    rows_only = table.split("\n\n")[0]
    assert "*" not in rows_only and "does not beat the prior-aware bound" in table
    assert "| 0.935 | 0.935 | - |" in table  # attack, bound, excess of eyeglasses


def test_an_attacker_above_the_bound_is_flagged(bench, data):
    # Positive control: reading the ORIGINAL off the pixels (a perfect leak) beats every bound below 1.
    original, released = data
    priors = bench.attribute_priors(original, NAMES)
    row = _row(bench, original.clone(), original, released, priors)
    table = bench.markdown([row], _baseline(priors), PROTECT)
    assert row["attack"] == {"eyeglasses": 1.0, "smiling": 1.0}
    assert "+0.065*" in table and "beats the prior-aware bound in 2 of 2 cells" in table
    assert row["unprotected"] == 1.0 and row["follows"]["smiling"] < 0.8
