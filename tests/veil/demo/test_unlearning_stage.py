"""The demo's unlearning stage and its report show the feature probe with its interval and n (issue 33).

``stage_unlearning`` is run on a stand-in ``run_unlearn`` (no training: a report as ``veil unlearn``
writes it); the report's section is rendered from a hand-made stage dict. The demo itself is not run.
"""

from __future__ import annotations

import json
import re

import pytest

from veil.demo.report import _unlearning_html, summary_rows
from veil.demo.stages import stage_unlearning
from veil.privacy.bounds import wilson_interval

RUN = {"changed_train_samples": 24, "update": {"tau": 0.5}, "update_seconds": 0.01, "retrain_seconds": 5.0,
       "speedup": 500.0,
       "test_accuracy": {"before": 0.97, "after": 0.975, "retrained": 0.974},
       "changed_original_attribute_accuracy": {"before": 0.0, "after": 0.0, "retrained": 0.0},
       "feature_probe_original_accuracy": {"before": 12 / 20, "after": 9 / 20, "retrained": 5 / 20},
       "feature_probe_interval": {k: list(wilson_interval(c, 20)) for k, c in (("before", 12), ("after", 9),
                                                                                 ("retrained", 5))},
       "feature_probe_samples": {"before": 20, "after": 20, "retrained": 20}}


def test_the_stage_records_the_probe_with_its_interval_and_n(tmp_path, monkeypatch):
    import veil.jobs.unlearn as UJ

    (tmp_path / "edits" / "revision").mkdir(parents=True)
    (tmp_path / "edits" / "revision" / "manifest.json").write_text("{}")
    calls, said = [], []
    monkeypatch.setattr(UJ, "run_unlearn", lambda **kw: calls.append(kw) or json.loads(json.dumps(RUN)))
    stage = stage_unlearning(tmp_path, None, {}, said.append)
    assert len(calls) == 1 and calls[0]["compare_retrain"] is True
    assert stage["feature_probe"] == {"original": 0.6, "updated": 0.45, "retrained": 0.25}
    assert stage["feature_probe_samples"] == 20
    for name, k in (("original", 12), ("updated", 9), ("retrained", 5)):
        lo, hi = stage["feature_probe_ci95"][name]
        assert (lo, hi) == pytest.approx(wilson_interval(k, 20), abs=1e-4) and lo <= k / 20 <= hi
    assert stage["remembered"] == {"original": 0.0, "updated": 0.0, "retrained": 0.0}  # kept for old reports
    assert "feature probe 60.0% / 45.0% / 25.0%" in said[0]
    json.dumps(stage, allow_nan=False)  # strict JSON, as report.json is written


def test_the_summary_row_and_the_section_show_the_probe_not_remembered(tmp_path, monkeypatch):
    import veil.jobs.unlearn as UJ

    (tmp_path / "edits" / "revision").mkdir(parents=True)
    (tmp_path / "edits" / "revision" / "manifest.json").write_text("{}")
    monkeypatch.setattr(UJ, "run_unlearn", lambda **kw: json.loads(json.dumps(RUN)))
    stage = stage_unlearning(tmp_path, None, {}, lambda line: None)
    rows = {what: value for name, what, value in summary_rows({"stages": {"unlearning": stage}})
            if name == "unlearning"}
    assert rows["feature probe: original / updated / retrained"] == (
        "60.0% [38.7%, 78.1%] / 45.0% [25.8%, 65.8%] / 25.0% [11.2%, 46.9%] (n=20)")
    assert not any("remembered" in what for what in rows)
    page = _unlearning_html(stage, tmp_path)
    assert "feature probe [95%]" in page and "<td>updated</td><td class=\"num\">97.5%</td>" \
                                              "<td class=\"num\">45.0% [25.8%, 65.8%]</td>" in page
    assert "remembered" not in page and "read on the 20 flipped" in page
    assert re.search(r'src="data:image/png;base64,', page)  # the bars, with the probe's error bars
    old = {k: v for k, v in stage.items() if not k.startswith("feature_probe")}  # a report from before issue 33
    old_rows = {what: value for _, what, value in summary_rows({"stages": {"unlearning": old}})}
    assert old_rows["feature probe: original / updated / retrained"] == "n/a / n/a / n/a (n=n/a)"
    assert "n/a" in _unlearning_html(old, tmp_path)
