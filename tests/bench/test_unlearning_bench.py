"""bench/unlearning.py --large at a tiny scale: real edits by ``veil edit`` (``run_edit``) with the demo's
shipped models, the baselines (retraining, fine-tuning for 1 and 3 epochs, no update) and every update
method, with the metrics that tell them apart; the table and the plot."""

import argparse
import json
import math

import pytest
from bench_helpers import load_bench

pytestmark = pytest.mark.usefixtures("single_thread")


def test_large_setting_runs_end_to_end_on_real_edits(tmp_path):
    bench = load_bench("unlearning")
    args = argparse.Namespace(num_images=300, epochs=1, fractions=[0.1], work=str(tmp_path / "work"), threads=1,
                              json=str(tmp_path / "rows.json"))
    rows = bench.run_large(args, log=lambda message: None)
    baselines = ["retrained (reference)", "no update", "fine-tune 1 epoch", "fine-tune 3 epochs"]
    assert [r["method"] for r in rows] == baselines + [label for label, *_ in bench.LARGE_METHODS]
    assert json.loads((tmp_path / "rows.json").read_text())[-1]["method"] == rows[-1]["method"]
    # the revision is veil edit's: eyeglasses protected at `high` (epsilon 1), each change with its image
    manifest = json.loads((tmp_path / "work" / "revision0.1" / "manifest.json").read_text())
    changes = manifest["changes"]
    assert len(changes) == rows[0]["changed"] > 0 and len(changes) <= round(0.1 * 240)
    assert all(c["protected"] == ["eyeglasses"] and c["epsilon"] == 1.0 for c in changes)
    assert all((tmp_path / "work" / "revision0.1" / c["file"]).is_file() for c in changes)
    flipped = sum(c["original_attributes"]["eyeglasses"] != c["released_attributes"]["eyeglasses"] for c in changes)
    assert rows[0]["flipped"] == flipped
    ref = rows[0]
    assert ref["kl"] == pytest.approx(0.0, abs=1e-7) and ref["acc"] == ref["acc_retrained"] and ref["speedup"] == 1
    for r in rows:
        assert 0 <= r["acc"] <= 1 and 0 <= r["released"] <= 1 and r["kl"] >= -1e-7
        assert math.isnan(r["probe"]) or 0 <= r["probe"] <= 1
        assert r["retrain_s"] > 0 and r["finetune1_s"] > 0
    fine3 = rows[3]
    assert fine3["update_s"] > rows[2]["update_s"]  # 3 epochs = the 1-epoch run continued for 2 more
    updates = [r for r in rows if r["kind"] == "update"]
    assert all(r["update_s"] > 0 and r["speedup"] == pytest.approx(r["retrain_s"] / r["update_s"]) for r in updates)
    ggn = [r for r in updates if r["method"].startswith("GGN")]
    assert ggn and all(r["cg_residual_first"] == pytest.approx(1.0) and r["damping"] > 0 for r in ggn)
    table = bench.large_table(rows)
    assert len(table.splitlines()) == len(rows) + 2 and "GGN/all (CR 10 it, line search)" in table
    bench.large_plot(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 10_000
