"""The feature probe in ``veil unlearn``'s report and verdict (issue 33): its Wilson 95% interval and n.

The output-level "predicts the original value" reads 0% for the original, updated and retrained models
alike; the linear probe on the penultimate features tells them apart, so the report carries it with its
interval and the number of (sample, attribute) entries it is read on, and the verdict shows it first.
No training here: a hand-made model whose one feature is a pixel, and hand-made ``UnlearningData``.
"""

from __future__ import annotations

import math

import pytest
import torch

from veil.cli.unlearn import SUMMARY_KEYS, VERDICT_ROWS, verdict
from veil.jobs import unlearn as UJ
from veil.privacy.bounds import wilson_interval


class _PixelFeature(torch.nn.Module):
    """Penultimate features = the first pixel (one feature); a head over it, as AttributeClassifier has."""

    def __init__(self, k: int):
        super().__init__()
        self.head = torch.nn.Linear(1, k)

    def features(self, x):
        return x[:, 0, 0, 0:1]

    def forward(self, x):
        return self.head(self.features(x))


def _images(values) -> torch.Tensor:
    x = torch.zeros(len(values), 3, 2, 2)
    x[:, 0, 0, 0] = torch.tensor(values, dtype=torch.float32)
    return x


def _data(*, remembered: int, changed: int = 10, flip: bool = True) -> UJ.UnlearningData:
    """Attribute 0 flipped (+1 originally, -1 released) on every changed sample; the first ``remembered``
    revised images still show +1 in their feature (the probe says the original), the rest -1."""
    labels = torch.tensor([1.0, -1.0] * 20)
    test = (_images(labels.tolist()), torch.stack([labels, torch.ones(40)], 1))  # the feature is attribute 0
    revised_x = _images([1.0] * remembered + [-1.0] * (changed - remembered))
    revised_a = torch.stack([-torch.ones(changed), torch.ones(changed)], 1)
    original = torch.stack([torch.ones(changed), torch.ones(changed)], 1)
    flipped = torch.zeros(changed, 2, dtype=torch.bool)
    flipped[:, 0] = flip
    train = (_images([0.0] * changed), original)
    return UJ.UnlearningData(dm_rev=None, train=train, changed_positions=torch.arange(changed),
                             revised_changed=(revised_x, revised_a), revised_train=(revised_x, revised_a),
                             test=test, original_changed=original, flipped=flipped, changed_elsewhere=0,
                             protected=flipped.clone())


def test_wilson_interval_lives_below_the_jobs_matches_scipy_and_contains_the_estimate():
    from veil.demo.attacker import wilson_interval as demo_wilson

    stats = pytest.importorskip("scipy.stats")
    assert demo_wilson is wilson_interval  # one function, re-exported for the demo's attackers
    for k, n in ((31, 110), (3, 10), (0, 7), (7, 7)):
        lo, hi = wilson_interval(k, n)
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-6)
        assert lo <= k / n <= hi and hi - lo < 1


def test_the_report_carries_the_probe_its_interval_and_n():
    report: dict = {}
    model = _PixelFeature(2)
    UJ.add_model_metrics(report, "before", model, _data(remembered=3))
    UJ.add_model_metrics(report, "after", model, _data(remembered=8))
    assert report["feature_probe_original_accuracy"] == {"before": 0.3, "after": 0.8}
    assert report["feature_probe_samples"] == {"before": 10, "after": 10}  # only the flipped entries
    for key, k in (("before", 3), ("after", 8)):
        lo, hi = report["feature_probe_interval"][key]
        assert (lo, hi) == pytest.approx(wilson_interval(k, 10))
        assert lo < report["feature_probe_original_accuracy"][key] < hi
    assert UJ.feature_probe_leakage(model, _data(remembered=3)) == 0.3  # the float the benchmark reads
    assert UJ.feature_probe_counts(model, _data(remembered=3)) == (3, 10)
    nothing: dict = {}  # no flipped value: NaN accuracy (None in the JSON), no interval, n = 0
    UJ.add_model_metrics(nothing, "after", model, _data(remembered=3, flip=False))
    assert math.isnan(nothing["feature_probe_original_accuracy"]["after"])
    assert nothing["feature_probe_interval"]["after"] is None and nothing["feature_probe_samples"]["after"] == 0
    assert UJ.finite_or_none(nothing)["feature_probe_original_accuracy"]["after"] is None


REPORT = {"method": "second", "params": ["head"], "changed_train_samples": 400, "update_seconds": 0.5,
          "retrain_seconds": 155.0, "speedup": 310.0,
          "test_accuracy": {"before": 0.9985, "after": 0.999, "retrained": 0.9992},
          "changed_original_attribute_accuracy": {"before": 0.0, "after": 0.0, "retrained": 0.0},
          "feature_probe_original_accuracy": {"before": 31 / 110, "after": 30 / 110, "retrained": 24 / 110},
          "feature_probe_interval": {k: list(wilson_interval(c, 110))
                                     for k, c in (("before", 31), ("after", 30), ("retrained", 24))},
          "feature_probe_samples": {"before": 110, "after": 110, "retrained": 110},
          "gradient_residual": {"before": 0.3, "after": 1e-7, "retrained": 2e-4}}


def test_the_verdict_shows_the_probe_first_with_its_interval_and_n():
    lines = verdict(REPORT).splitlines()
    probe = next(i for i, line in enumerate(lines) if "a probe reads the original value" in line)
    output = next(i for i, line in enumerate(lines) if "predicts the original value" in line)
    accuracy = next(i for i, line in enumerate(lines) if line.lstrip().startswith("test accuracy"))
    assert accuracy < probe < output  # first among the forgetting rows; the output-level row stays, after it
    lo, hi = wilson_interval(31, 110)
    assert "n=110" in lines[probe]
    assert f"28.2% [{lo * 100:.1f}, {hi * 100:.1f}]" in lines[probe] and "21.8% [" in lines[probe]
    assert lines[output].split()[-3:] == ["0.000", "0.000", "0.000"]
    header = lines[1]
    for line in lines[2:]:  # the columns stay aligned under their headers, whatever the cells' widths
        assert len(line) == len(header)
    assert [k for k, _, _ in VERDICT_ROWS][:3] == ["test_accuracy", "feature_probe_original_accuracy",
                                                   "changed_original_attribute_accuracy"]
    assert {"feature_probe_interval", "feature_probe_samples"} <= set(SUMMARY_KEYS)
    old = {k: v for k, v in REPORT.items() if k not in ("feature_probe_interval", "feature_probe_samples")}
    row = next(line for line in verdict(old).splitlines() if "a probe reads" in line)
    assert "28.2%" in row and "[" not in row and "n=" not in row  # a report from before: no interval, no n
