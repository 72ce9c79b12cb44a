"""bench/release_price.py prices the grid with the same rule the ledger charges (veil.privacy.accounting)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from veil.editing.plan import edit_grid
from veil.privacy.accounting import compose, gaussian_mu, image_sensitivity, price_release

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "release_price.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("release_price", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_grid_prices_fresh_at_zero_inversion_unbounded_and_noise_as_the_ledger_does(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--strengths", "0.7", "1.0", "--epsilons", "0", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert "| max | fresh |" in table and "| high | fresh |" in table
    by = {(r["encoding"], r["strength"], r["label_epsilon"]): r for r in rows}
    assert by["fresh", 1.0, 0.0]["epsilon"] == 0 and by["fresh", 1.0, 1.0]["epsilon"] == pytest.approx(1.0, abs=1e-4)
    assert by["invert", 0.4, 0.0]["pixels_epsilon"] == "inf"
    a = bench.alphas(bench.DEMO_SCHEDULE)
    noise = by["noise", 0.7, 1.0]
    ladder = [edit_grid(strength=s, num_steps=50, num_train_timesteps=1000)[-1] for s in (0.7, 0.85, 1.0)]
    assert ladder == [700, 840, 980]  # the first try and the check's two re-dos, all charged
    mus = [gaussian_mu(signal=a[t], sensitivity=image_sensitivity((3, 32, 32))) for t in ladder]
    assert noise["pixel_mu"] == pytest.approx(math.sqrt(sum(m * m for m in mus)), rel=1e-9)
    expected = compose([price_release(epsilon=1.0, protected=["a0"], encoding="noise", pixel_mus=mus)])
    assert noise["epsilon"] == pytest.approx(expected.epsilon, rel=1e-9)
    assert noise["epsilon"] > 1000 and noise["fit_budget"] == 0  # a strength-0.7 edit does not fit the budget
