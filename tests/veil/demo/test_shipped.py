"""The demo takes its shipped models when they are there, and counts what they cost in its account."""

import dataclasses
import json
import shutil

from veil.demo import pipeline
from veil.demo.plan import PLANS, PRIVATE_DATA, PUBLIC_DATA
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
    assert rows["checker"]["source"] == "trained by this demo" and rows["checker"]["private"]  # checks the edits
    assert rows["guide"]["command"].startswith("veil train ... --out guide")
    # each shipped run is counted in the account of the data its release names, with its own privacy record
    # (the tiny test models: the UNet on seed 0, the guide on seed 3)
    seeds = {n: json.loads((shipped / n / "model" / "veil_model.json").read_text())["data_spec"]["seed"]
             for n in ("public_unet", "guide")}
    assert seeds == {"public_unet": 0, "guide": 3}
    with PrivacyLedger.for_dataset(PRIVATE_DATA) as ledger:
        runs = ledger.training_runs()
        assert [r["details"].get("model") for r in runs if r["details"].get("shipped")] == ["public_unet"]
        assert len(runs) == 3  # + the published classifier and the checker, trained here
    with PrivacyLedger.for_dataset({"source": "synthetic", "seed": 3}) as ledger:
        (guide,) = ledger.training_runs()
        assert guide["details"]["shipped"] and guide["private"] and guide["epsilon"] == rows["guide"]["epsilon"]
    with PrivacyLedger.for_dataset(PUBLIC_DATA) as ledger:
        assert ledger.training_runs() == []


def test_fresh_retrains_instead_of_taking_the_shipped_models_and_a_resume_keeps_to_it(tmp_path, monkeypatch):
    """--fresh: the models stage sees use_shipped False (every model trained here), and a resumed
    --fresh demo keeps retraining; a plain run takes the shipped ones. The stages are stubbed: this
    checks the switch, test_shipped_models_are_used_and_recorded the stage itself."""
    seen = []

    def stub(out, plan, done, progress):
        seen.append(plan.use_shipped)
        raise KeyboardInterrupt  # interrupted in the first stage

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "models", stub)
    lines = []
    for fresh in (True, False):  # --fresh, interrupted, then resumed without --fresh
        try:
            pipeline.run_demo(out=tmp_path / "demo", fresh=fresh, progress=lines.append)
        except KeyboardInterrupt:
            pass
    try:
        pipeline.run_demo(out=tmp_path / "other", progress=lines.append)  # a plain demo
    except KeyboardInterrupt:
        pass
    assert seen == [False, False, True]
    assert any(line.startswith("--fresh: every model is trained here") for line in lines)


def test_the_models_shipped_with_veil_load_and_say_what_they_cost():
    """The two models in veil/demo/models/ (what `make demo` starts from) load as the demo
    loads them, name the data they were trained on, and carry the privacy record their COMMAND claims."""
    from veil.lightning_modules import checkpoints as CK

    shipped = pipeline.SHIPPED
    unet = CK.load_diffusion_checkpoint(shipped / "public_unet")  # EMA weights only: use_ema is the default
    assert unet.privacy["private"] is False and unet.privacy["steps"] > 0
    assert unet.data_spec["seed"] == PUBLIC_DATA["seed"]  # public faces, not the private ones
    assert "public_unet" in (shipped / "public_unet" / "COMMAND").read_text()
    guide, meta = CK.load_classifier(shipped / "guide")
    record = meta["privacy"] if "privacy" in meta else json.loads(
        (shipped / "guide" / "model" / "veil_model.json").read_text())["privacy"]
    assert guide.noise_conditional and record["private"] is True and 0 < record["epsilon"] <= 10.0
    assert record["delta"] < 1 / 18000 and record["steps"] == 70
    command = (shipped / "guide" / "COMMAND").read_text()
    assert "--config classifier32_guidance " in command and f"{record['steps']} DP steps" in command
