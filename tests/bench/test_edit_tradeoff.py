"""bench/edit_tradeoff.py: the strength x encoding trade-off plot read from edit_eval results."""

import json
import math

import pytest
from bench_helpers import load_bench


@pytest.fixture(scope="module")
def tradeoff():
    return load_bench("edit_tradeoff")


def _row(strength, epsilon, encoding, naive, adaptive, bound, n=128):
    row = {"level": None, "strength": strength, "epsilon": epsilon, "n": n, "ssim": 0.5, "kid": 0.2,
           "naive": naive, "adaptive": adaptive, "bound": bound}
    if encoding is not None:
        row["encoding"] = encoding
    return row


def test_points_take_the_worst_attribute_and_the_stronger_attacker(tradeoff, tmp_path, capsys):
    b = {"eyeglasses": 0.5, "smiling": 0.5}
    rows = [_row(0.95, 0, None, {"eyeglasses": 0.7, "smiling": 0.6}, {"eyeglasses": 0.88, "smiling": 0.65}, b),
            _row(1.0, "inf", "noise", {"eyeglasses": 0.9, "smiling": 1.0}, {"eyeglasses": 0.95, "smiling": 0.99},
                 {"eyeglasses": 1.0, "smiling": 1.0})]
    run = {"label": "x", "protect": ["eyeglasses", "smiling"], "rows": rows}
    pts = tradeoff.points({"runs": [run]})
    assert [p["encoding"] for p in pts] == ["invert", "noise"]  # rows from before encodings were inverted
    assert pts[0]["excess"] == pytest.approx(0.38) and pts[0]["bar"] == pytest.approx(2 * math.sqrt(0.25 / 128))
    assert pts[1]["excess"] == pytest.approx(0.0) and pts[1]["epsilon"] == math.inf  # smiling: naive 1.0 at bound 1
    (tmp_path / "r.json").write_text(json.dumps(run))
    tradeoff.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "t.png")])
    out = capsys.readouterr().out
    assert "strength 0.95  excess +0.380*" in out and "excess +0.000 " in out
    assert (tmp_path / "t.png").stat().st_size > 0
    (tmp_path / "empty.json").write_text(json.dumps({**run, "rows": []}))
    with pytest.raises(SystemExit, match="no rows"):
        tradeoff.main([str(tmp_path / "empty.json"), "--out", str(tmp_path / "e.png")])
