"""The demo's scripted owner and its attacker comparison, with a plain-Python editor (no diffusion model):
one level for the dataset chosen on public faces and the ledger's policy and budget, every private image
released at it, per-record guarantees from the ledger, and an attacker scored against the Bayes bound of
the prior of the very set it is measured on, with a 95% interval.

Run: OMP_NUM_THREADS=1 pytest tests/veil/demo/test_owner.py
"""

from __future__ import annotations

import math

import pytest
import torch

from veil.demo.attacker import attack_row, stratified_halves, wilson_interval
from veil.demo.owner import (AttackerSizes, attack_releases, choose_level, level_attackers, level_prices,
                             record_guarantees, scripted_owner)
from veil.demo.plan import PRIVATE_DATA
from veil.lightning_modules.data.synthetic_faces import SYNTHETIC_ATTRIBUTES
from veil.privacy.bounds import bayes_accuracy_bound
from veil.privacy.ledger import PrivacyLedger

NAMES = list(SYNTHETIC_ATTRIBUTES)
PROTECTED = ["eyeglasses"]
COL = NAMES.index("eyeglasses")


class FakeEditor:
    """An editor whose "invert" edit is the image itself (it keeps everything) and whose "fresh" edit shows
    only the released protected value (a flat image of that sign); priced as the real one prices them."""

    attribute_names = NAMES
    can_check = False

    def pixel_mus(self, *, strength, encoding, check):
        return [math.inf] if encoding == "invert" else [0.0] if encoding == "fresh" else [3.0]

    def attribute_vector(self, attributes):
        return torch.tensor([float(attributes.get(n, 0)) for n in NAMES])

    def edit(self, x, a, released, *, strength, protected, encoding):
        if encoding == "invert":
            return x.clone()
        return torch.ones_like(x) * 0.5 * released[:, COL].view(-1, 1, 1, 1)

    def __call__(self, images, *, originals, targets, strength, protected, encoding, check=False):
        return [self.edit(im[None], None, self.attribute_vector(t)[None], strength=strength, protected=protected,
                          encoding=encoding)[0] for im, t in zip(images, targets)]


def _items(values):
    return [(f"synth-0-{i:06d}", torch.zeros(3, 8, 8),
             torch.tensor([v if n == "eyeglasses" else 1 for n in NAMES], dtype=torch.float32))
            for i, v in enumerate(values)]


def test_wilson_interval_matches_scipy_and_contains_the_estimate():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 10), (3, 10), (40, 48), (48, 48), (12, 24)):
        lo, hi = wilson_interval(k, n)
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-6)
        assert lo <= k / n <= hi
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_stratified_halves_give_both_halves_the_same_prior():
    labels = torch.tensor([1] * 7 + [-1] * 25)[torch.randperm(32, generator=torch.Generator().manual_seed(0))]
    train, test = stratified_halves(labels)
    assert sorted(train.tolist() + test.tolist()) == list(range(32))
    pos = lambda idx: int((labels[idx] > 0).sum())  # noqa: E731
    assert abs(pos(train) - pos(test)) <= 1 and abs(len(train) - len(test)) <= 1


def test_attack_row_uses_the_bayes_bound_of_the_measured_sets_prior():
    truth = torch.tensor([1.0] * 5 + [-1.0] * 15)  # prior 0.25: always "no" is right 75% of the time
    guess = -torch.ones(20)
    row = attack_row(guess, truth, epsilon=1.0, train_prior=0.5)
    assert row["prior_test"] == 0.25 and row["prior_train"] == 0.5
    assert row["bound"] == round(bayes_accuracy_bound(epsilon=1.0, prior=0.25), 4)
    assert row["bound"] != round(math.e / (1 + math.e), 4)  # not the 50/50-prior bound
    assert row["accuracy"] == 0.75 and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    assert row["within_bound"] is True  # guessing the majority is what the labels alone allow


def test_choose_level_takes_the_least_private_allowed_level_within_its_bound():
    rows = [{"level": "low", "epsilon": 4.0, "accuracy": 0.9, "ci95": [0.8, 0.95], "bound": 0.98, "n": 48,
             "prior_test": 0.5, "within_bound": True},
            {"level": "medium", "epsilon": 2.0, "accuracy": 1.0, "ci95": [0.93, 1.0], "bound": 0.881, "n": 48,
             "prior_test": 0.5, "within_bound": False},
            {"level": "high", "epsilon": 1.0, "accuracy": 0.7, "ci95": [0.56, 0.81], "bound": 0.731, "n": 48,
             "prior_test": 0.5, "within_bound": True},
            {"level": "max", "epsilon": 0.0, "accuracy": 0.5, "ci95": [0.36, 0.64], "bound": 0.5, "n": 48,
             "prior_test": 0.5, "within_bound": True}]
    allowed = {"low": {"refused": "its pixels have no bound"}, "medium": {"refused": None},
               "high": {"refused": None}, "max": {"refused": None}}
    choice = choose_level(rows, allowed=allowed)
    assert choice["level"] == "high" and choice["passed"]  # low refused by the policy, medium above its bound
    assert "low refused" in choice["why"] and "medium: attacker" in choice["why"]
    allowed["low"]["refused"] = None  # a dataset whose owner said its pixels are not protected
    assert choose_level(rows, allowed=allowed)["level"] == "low"


def test_level_prices_follow_the_ledgers_pixel_policy_and_budget():
    with PrivacyLedger.for_dataset(PRIVATE_DATA) as ledger:
        prices = level_prices(FakeEditor(), ledger, protected=PROTECTED)
        assert "pixel policy is 'protected'" in prices["low"]["refused"]
        assert all(prices[n]["refused"] is None for n in ("medium", "high", "max"))
        assert prices["medium"]["guarantee"]["epsilon"] == pytest.approx(2.0, abs=1e-3)
        assert prices["max"]["guarantee"]["epsilon"] == 0
        ledger.set_pixel_policy("not-protected", reason="test: labels only")
        assert level_prices(FakeEditor(), ledger, protected=PROTECTED)["low"]["refused"] is None
        ledger.set_budget(1.5, reason="test: a small budget")
        prices = level_prices(FakeEditor(), ledger, protected=PROTECTED)
        assert "over the budget" in prices["medium"]["refused"] and prices["high"]["refused"] is None


def test_owner_releases_every_image_at_one_level_and_the_ledger_composes_each_record():
    items = _items([1, -1, 1, 1, -1, -1])
    with PrivacyLedger.for_dataset(PRIVATE_DATA) as ledger:
        result = scripted_owner(FakeEditor(), ledger, items, names=NAMES, protected=PROTECTED, level="medium",
                                progress=lambda line: None)
        account = record_guarantees(ledger, [i for i, _, _ in items], result["outcomes"])
        levels = {r.level for r in ledger.releases()}
        assert len(ledger.releases()) == len(items)
        for record in account["records"]:
            assert record == {"id": record["id"], "outcome": "released", **ledger.guarantee(record["id"]).to_json()}
    assert result["releases"] == len(items) and {r["level"] for r in result["accepted"]} == {"medium"}
    assert levels == {"medium"}
    assert account["max"]["epsilon"] == pytest.approx(2.0, abs=1e-3) and account["max"]["pixels_epsilon"] == 0
    assert account["max"]["pixels_protected"] is True and account["delta"] == 1e-6


def test_attack_on_the_accepted_releases_is_scored_against_their_originals():
    items = _items([1, 1, 1, -1, -1, -1, -1, -1])
    with PrivacyLedger.for_dataset(PRIVATE_DATA) as ledger:
        result = scripted_owner(FakeEditor(), ledger, items, names=NAMES, protected=PROTECTED, level="max",
                                progress=lambda line: None)
    reads_released = lambda x: x.mean(dim=(1, 2, 3))[:, None].expand(-1, len(NAMES)) * 10  # noqa: E731
    row = attack_releases(reads_released, result["accepted"], names=NAMES, protected=PROTECTED, epsilon=0.0)
    assert row["n"] == 8 and row["data"] == "accepted releases of the private images" and row["level"] == "max"
    assert row["prior_test"] == 0.375 and row["bound"] == round(bayes_accuracy_bound(epsilon=0.0, prior=0.375), 4)
    assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]


def test_level_attackers_train_and_measure_on_public_edits_with_equal_priors():
    sizes = AttackerSizes(naive_images=32, naive_epochs=1, edits_per_level=24, adaptive_epochs=1)
    _, attackers, rows = level_attackers(FakeEditor(), names=NAMES, protected=PROTECTED, sizes=sizes,
                                         resolution=32, levels=("low", "max"), progress=lambda line: None)
    assert set(attackers) == {"low", "max"} and [r["level"] for r in rows] == ["low", "max"]
    for row in rows:
        assert row["n"] == 12 and "public synthetic faces" in row["data"]
        assert abs(row["prior_train"] - row["prior_test"]) <= 1 / 12 + 1e-9
        assert row["bound"] == round(bayes_accuracy_bound(epsilon=row["epsilon"], prior=row["prior_test"]), 4)
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
