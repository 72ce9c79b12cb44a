"""The demo takes its shipped models when they are there, and counts what they cost in its account."""

import dataclasses
import json
import shutil

from veil.lightning_modules.demo import pipeline
from veil.lightning_modules.demo.plan import PLANS, PRIVATE_DATA, PUBLIC_DATA
from veil.privacy.ledger import PrivacyLedger


def test_shipped_models_are_used_and_recorded(models, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    for name, source in (("public_unet", "unet"), ("guide", "guide")):
        shutil.copytree(models / source, shipped / name, ignore=shutil.ignore_patterns("private"))
        (shipped / name / "COMMAND").write_text(f"veil train ... --out {name}  # how {name} was made\n")
    monkeypatch.setattr(pipeline, "SHIPPED", shipped)
    monkeypatch.setenv("VEIL_HOME", str(tmp_path / "home"))
    plan = dataclasses.replace(PLANS["quick"], use_shipped=True)
    result = pipeline.stage_models(tmp_path / "demo", plan, {}, progress=lambda line: None)
    rows = {r["name"]: r for r in result["models"]}
    assert result["shipped"] is True
    assert rows["public_unet"]["source"] == rows["guide"]["source"] == "shipped with veil"
    assert rows["published"]["source"] == "trained by this demo"  # not shipped: trained here
    assert rows["guide"]["command"].startswith("veil train ... --out guide")
    # each shipped run is counted in the account of the data its release names, with its own privacy record
    # (the tiny test models: the UNet on seed 0, the guide on seed 3)
    seeds = {n: json.loads((shipped / n / "model" / "veil_model.json").read_text())["data_spec"]["seed"]
             for n in ("public_unet", "guide")}
    assert seeds == {"public_unet": 0, "guide": 3}
    with PrivacyLedger.for_dataset(PRIVATE_DATA) as ledger:
        runs = ledger.training_runs()
        assert [r["details"].get("model") for r in runs if r["details"].get("shipped")] == ["public_unet"]
        assert len(runs) == 2  # + the published classifier trained here
    with PrivacyLedger.for_dataset({"source": "synthetic", "seed": 3}) as ledger:
        (guide,) = ledger.training_runs()
        assert guide["details"]["shipped"] and guide["private"] and guide["epsilon"] == rows["guide"]["epsilon"]
    with PrivacyLedger.for_dataset(PUBLIC_DATA) as ledger:
        assert ledger.training_runs() == []
