"""`veil demo --quick`: every stage runs, the report's numbers are sane, the ledger agrees, and a rerun resumes."""

import json
import math
from html import escape

from veil.cli import main
from veil.privacy.bounds import bayes_accuracy_bound
from veil.privacy.ledger import PrivacyLedger


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "veil-demo-report/1" and report["quick"] is True
    stages = report["stages"]
    assert list(stages) == ["models", "edits", "unlearning", "export", "serve"]

    models = {m["name"]: m for m in stages["models"]["models"]}
    guide = models["guide"]
    assert guide["private"] is True and math.isfinite(guide["epsilon"]) and guide["epsilon"] > 0
    assert models["published"]["epsilon"] == "inf" and stages["models"]["dataset_account"]["epsilon"] == "inf"
    assert all(m["command"].startswith("veil train") and m["params"] > 0 for m in models.values())

    edits = stages["edits"]
    assert edits["images"] == 3 and edits["releases"] + edits["refused"] + edits["withheld"] == edits["images"]
    # one level for the whole dataset, chosen on public faces before any release; never "low" (inversion: the
    # demo's dataset keeps its pixels protected)
    assert edits["level"] in ("medium", "high", "max") and edits["level_choice"]["level"] == edits["level"]
    assert edits["accepted_levels"] == ([edits["level"]] if edits["releases"] else [])
    for row in edits["attacker"]:  # public edits: the Bayes bound of the measured half's prior, a 95% interval
        assert row["bound"] == round(bayes_accuracy_bound(epsilon=row["epsilon"], prior=row["prior_test"]), 4)
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] and "public" in row["data"]
        assert abs(row["prior_train"] - row["prior_test"]) <= 1 / row["n"] + 1e-9
    assert edits["attacker"][0]["refused"] and "pixel policy" in edits["attacker"][0]["refused"]  # low
    on = edits["attacker_on_releases"]  # the attack on what was really published
    assert on["n"] == edits["releases"]
    if on["n"]:
        assert on["level"] == edits["level"] and on["ci95"][0] <= on["accuracy"] <= on["ci95"][1]
        assert on["bound"] == round(bayes_accuracy_bound(epsilon=on["epsilon"], prior=on["prior_test"]), 4)
    # the ledger in the demo's own home agrees with the report: every draw recorded once, and the serve stage's
    with PrivacyLedger.for_dataset({"source": "synthetic", "seed": 0}, path=out / "veil_home" / "datasets" /
                                   "synthetic-seed0.sqlite") as ledger:
        assert edits["ledger_releases"] == edits["releases"] + edits["refused"]
        assert len(ledger.releases()) == edits["ledger_releases"] + 1  # + the HTTP session's release
        assert any(r["kind"] == "classifier" and r["private"] for r in ledger.training_runs())
        records = edits["guarantee"]["records"]
        assert len(records) == edits["images"]
        for record in records:  # per record, the ledger's composed guarantee (labels and pixels)
            assert {k: v for k, v in record.items() if k not in ("id", "outcome")} == \
                ledger.guarantee(record["id"]).to_json()
            assert {r.level for r in ledger.releases(record["id"])} <= {edits["level"]}
        assert edits["guarantee"]["max"]["epsilon"] == max(r["epsilon"] for r in records)
        assert edits["guarantee"]["max"]["pixels_epsilon"] == 0  # fresh: the image is not read

    unlearning = stages["unlearning"]
    if edits["releases"]:
        assert unlearning["changed"] == edits["releases"] and unlearning["speedup"] > 1
        for v in unlearning["test_accuracy"].values():
            assert 0 <= v <= 1

    export = stages["export"]
    assert export["parity_max_abs_error"] < export["tolerance"]
    assert export["latency_ms"]["ort_p50"] > 0 and export["latency_ms"]["torch_p50"] > 0

    serve = stages["serve"]
    assert serve["ok"] is True and serve["retry_replayed"] is True and serve["preview_events"] >= 3

    html = (out / "report.html").read_text()
    assert all(escape(s["proves"]) in html for s in stages.values()) and "data:image/png;base64," in html
    printed = capsys.readouterr()
    assert "update speed-up over retraining" in printed.err and "veil demo --out" in printed.out

    # a second run resumes: every stage is reused, the numbers are the same
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "done earlier" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["stages"] == stages
