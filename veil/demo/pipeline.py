"""``veil demo``: the whole framework on the embedded synthetic faces, stage by stage, ending in a report.

    run_demo(out="runs/demo", quick=False)   # models -> edits -> unlearning -> export -> serve; report.json/.html

Each stage writes ``OUT/<stage>/stage.json`` (its key numbers) when it is done, and a later run reuses
it (an interrupted demo resumes at the stage it was in; ``fresh=True`` redoes everything). The demo
is owner-only (folder 0700: its grids and report show private originals; ``veil_home`` holds release
seeds) and keeps its privacy account in its own ``OUT/veil_home`` (``$VEIL_HOME`` for the demo and the server it
starts): every training run and release on the synthetic faces is recorded there, so the report's
epsilons are what the demo spent in total, and a demo never spends the budget of the user's own
databases in ``~/.veil``.

1. models: a label-free UNet on public faces (seed 1), a DP noise-conditional classifier on the private
   faces (seed 0; it guides the edits), a small DP classifier of clean images on the private faces (the
   checker: it checks the edits, since a guided edit is never checked by its guide; its epsilon counts in
   the account too), and the classifier the owner already published (trained without DP on the original
   private images: its epsilon is infinite, and the account says so).
2. edits (``owner.py``): the scripted owner chooses ONE level for the dataset and protected attribute before
   any release, on public faces only (the least private level the ledger's pixel policy and budget allow whose
   adaptive attacker, measured on edits of public faces, is not significantly above the Bayes bound), then
   releases some of the published classifier's training images at it through the ledger; accepted edits form
   a revision. The report gives each record's composed (epsilon, delta) from the ledger and the attacker on
   the accepted releases, with 95% intervals.
3. unlearning: the published classifier updated to the revision (``veil unlearn``'s default update),
   against retraining from scratch.
4. export: the guided editor to ONNX (verified against PyTorch), and the preview latency of ONNX Runtime
   against PyTorch.
5. serve: ``veil serve`` on the export, one session from upload to release over HTTP, then stopped; then the
   next steps the report prints (``stages.next_commands``: ``veil demo [--quick] --out OUT --serve``, ``veil
   serve`` on the export and the demo's ledger, ``veil privacy show`` of that ledger), each valid as printed
   (tests/veil/demo/test_demo.py runs them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from veil.errors import ConfigError
from veil.demo.plan import PLANS, PRIVATE_DATA, PUBLIC_DATA, DemoPlan, command
from veil.outputs import staged_dir, write_json_atomic
from veil.lightning_modules.configs import CONFIG_DIR

__all__ = ["run_demo", "STAGES"]

STAGES = ("models", "edits", "unlearning", "export", "serve")
PROVES = {
    "models": "DP training on the private faces is accounted for, model by model and in total for the dataset",
    "edits": "every release is priced in both channels (labels: randomized response; pixels: what the encoding "
             "reads of the image) and composed per record in the dataset's ledger, at one level chosen on public "
             "faces; an adaptive attacker on the accepted releases is compared with the Bayes bound, with 95% "
             "intervals",
    "unlearning": "a model trained on the originals is updated to the revision in closed form, far faster than "
                  "retraining",
    "export": "the edit sampler runs on ONNX Runtime without torch and matches PyTorch",
    "serve": "an edit session runs from upload to release over HTTP, with the same ledger",
}
CONFIGS = CONFIG_DIR
SHIPPED = Path(__file__).resolve().parent / "models"  # the demo's shipped models (each with COMMAND and its record)


def run_demo(*, out, quick: bool = False, fresh: bool = False, progress: Callable[[str], None] = print) -> dict:
    """Run (or resume) every stage into ``out``; returns the report (also OUT/report.json and .html)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file; give a folder for the demo", option="--out")
    plan = PLANS["quick" if quick else "default"]
    meta = out / "demo.json"
    retrain = fresh  # --fresh retrains every model from the embedded data instead of taking the shipped ones
    if meta.is_file() and not fresh:
        earlier = json.loads(meta.read_text())
        if earlier.get("plan") != plan.name:
            raise ConfigError(f"{out}: holds a {earlier.get('plan')} demo; resume it with the same --quick "
                              f"setting, give another --out, or --fresh to start over", option="--out")
        retrain = bool(earlier.get("retrain"))  # a resumed --fresh demo keeps retraining
    if retrain and plan.use_shipped:
        plan = dataclasses.replace(plan, use_shipped=False)
        progress("--fresh: every model is trained here from the embedded data, within the demo's budget (about "
                 "15 minutes in all on a 2-core CPU; the public UNet gets 5 minutes, so its edits are rough: the "
                 "shipped one had 66)")
    if fresh and out.exists():
        for name in (*STAGES, "veil_home", "report.json", "report.html", "demo.json"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)  # owner-only: the report and grids show the private originals, veil_home holds seeds
    write_json_atomic(meta, {"plan": plan.name, "retrain": retrain})
    with _demo_process_state(out):
        return _run_stages(out, plan, quick, progress)


def demo_home(out) -> str:
    """The demo's own VEIL_HOME (its privacy databases), absolute."""
    return str((Path(out) / "veil_home").resolve())


@contextlib.contextmanager
def _demo_process_state(out: Path):
    """For the demo's duration: its own privacy databases (VEIL_HOME), Lightning's loggers at WARNING (no "GPU
    available", tips, model tables) and the ONNX exporter's registry at ERROR (a dozen "torchvision is not
    installed"); all put back after it, so that a caller's later commands are as before."""
    import lightning.pytorch  # noqa: F401  (it sets its loggers to INFO when imported: import it first)

    home = os.environ.get("VEIL_HOME")
    quiet = {"lightning.pytorch": logging.WARNING, "lightning.fabric": logging.WARNING, "lightning": logging.WARNING,
             "torch.onnx._internal.exporter._registration": logging.ERROR}
    loggers = [logging.getLogger(name) for name in quiet]
    levels = [lg.level for lg in loggers]
    os.environ["VEIL_HOME"] = demo_home(out)
    for lg in loggers:
        lg.setLevel(quiet[lg.name])
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if home is None:
            os.environ.pop("VEIL_HOME", None)
        else:
            os.environ["VEIL_HOME"] = home


def _run_stages(out: Path, plan, quick: bool, progress) -> dict:
    started, report = time.perf_counter(), {"format": "veil-demo-report/1", "quick": quick, "stages": {}}
    for i, stage in enumerate(STAGES, 1):
        done = out / stage / "stage.json"
        if done.is_file():
            report["stages"][stage] = json.loads(done.read_text())
            progress(f"[{i}/{len(STAGES)}] {stage}: done earlier ({done}), reused")
            continue
        progress(f"[{i}/{len(STAGES)}] {stage}: {PROVES[stage]}")
        t0 = time.perf_counter()
        result = STAGE_FUNCTIONS[stage](out, plan, report["stages"], progress)
        result = {"seconds": round(time.perf_counter() - t0, 1), "proves": PROVES[stage], **result}
        (out / stage).mkdir(exist_ok=True)
        write_json_atomic(done, result)
        report["stages"][stage] = result
        progress(f"[{i}/{len(STAGES)}] {stage}: done in {result['seconds']:.0f} s")
    report.update(created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  seconds=round(time.perf_counter() - started, 1), machine=_machine())
    write_json_atomic(out / "report.json", report)
    from veil.demo.report import summary_table, write_html

    for path in (out / "report.json", write_html(report, out)):
        os.chmod(path, 0o600)
    progress(summary_table(report))
    return report


def _machine() -> str:
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU, {gpu}"


def _params(state_path: Path) -> int | None:
    """Parameters of a release (its raw weights, not the EMA copy)."""
    from safetensors.torch import load_file

    if not state_path.is_file():
        return None
    state = load_file(str(state_path))
    raw = [k for k in state if not k.startswith("ema")] or list(state)
    return int(sum(state[k].numel() for k in raw))


# -------------------------------------------------------------------------------------------- 1. models
def stage_models(out: Path, plan: DemoPlan, done: dict, progress) -> dict:
    from veil.jobs.train_classifier import load_recipe, train_classifier
    from veil.jobs.config import load_config
    from veil.jobs.train import run_training
    from veil.privacy.ledger import PrivacyLedger

    folder = out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    jobs = [("public_unet", "label-free denoiser (guided by the classifier below)", "synthetic32_public.yaml",
             plan.public_unet, "train", PUBLIC_DATA),
            ("guide", "DP noise-conditional classifier: guides the edits", "classifier32_guidance.yaml",
             plan.guide, "train-classifier", PRIVATE_DATA),
            ("checker", "DP classifier of clean images: checks the edits (never the guide)", "classifier32_guidance.yaml",
             plan.checker, "train-classifier", PRIVATE_DATA),
            ("published", "classifier the owner already published (trained on the original images)",
             "classifier32.yaml", plan.published, "train-classifier", PRIVATE_DATA)]
    shipped_any = False
    for name, role, config, overrides, tool, data in jobs:
        target = folder / name
        shipped = SHIPPED / name
        cmd = command(tool, config, overrides, str(target))
        if not (target / "model").is_dir():
            shutil.rmtree(target, ignore_errors=True)  # a run interrupted half-way: start it again
            if plan.use_shipped and (shipped / "model" / "veil_model.json").is_file():
                cmd = (shipped / "COMMAND").read_text().strip()
                _import_shipped(shipped, target, name=name, command=cmd, data=data)
                progress(f"  {name}: the model shipped with veil ({shipped}), recorded in the demo's account")
            else:
                progress(f"  training {name} ({role})")
                t0 = time.perf_counter()
                if tool == "train":
                    run_training(load_config(str(CONFIGS / config), overrides), target, progress=False)
                else:
                    recipe, data_options = load_recipe(str(CONFIGS / config), overrides)
                    train_classifier(recipe=recipe, data=data_options, out=target)
                progress(f"  {name}: trained in {time.perf_counter() - t0:.0f} s")
        from_shipped = (target / "SHIPPED").is_file()
        shipped_any |= from_shipped
        if from_shipped:
            cmd = (target / "SHIPPED").read_text().strip()
        rows.append({"name": name, "role": role, **_privacy_of(target, data),
                     "params": _params(target / "model" / "model.safetensors"),
                     "source": "shipped with veil" if from_shipped else "trained by this demo", "command": cmd})
    with PrivacyLedger.for_dataset(PRIVATE_DATA) as ledger:
        eps, delta = ledger.training_spent()
        runs = len(ledger.training_runs())
    account = {"epsilon": "inf" if eps == float("inf") else round(eps, 4), "delta": delta, "runs": runs,
               "note": "basic composition of every training run on the private faces; the published classifier "
                       "was trained without DP, so the data's total is infinite: the guide's and the checker's "
                       "epsilons cover what the edits use"}
    return {"shipped": shipped_any, "models": rows, "dataset_account": account}


def _import_shipped(shipped: Path, target: Path, *, name: str, command: str, data: dict) -> None:
    """Copy a shipped model in and record its training run in the demo's account of the data its release names
    (``data`` if it names none), with its own privacy record: shipped or not, what it cost is counted."""
    from veil.privacy.ledger import PrivacyLedger

    with staged_dir(target.parent, [target.name]) as stage:  # all of it or nothing: a resumed demo copies it again
        shutil.copytree(shipped, stage / target.name)
        (stage / target.name / "SHIPPED").write_text(command + "\n")
    meta = json.loads((target / "model" / "veil_model.json").read_text())
    record = meta.get("privacy") or {}
    private = bool(record.get("private") and record.get("enabled", True))
    eps = record.get("epsilon") if private else None
    spec = {k: v for k, v in (meta.get("data_spec") or data).items() if k in ("source", "seed", "root") and v is not None}
    with PrivacyLedger.for_dataset(spec) as ledger:  # the data it was really trained on, as its release says
        run = ledger.start_training_run(run=str(target), kind="classifier" if "classifier" in str(meta.get("kind")) else
                                        "diffusion", private=private, planned_epsilon=eps,
                                        delta=record.get("delta") if private else None,
                                        details={"shipped": True, "model": name, "command": command})
        ledger.finish_training_run(run, epsilon=eps, delta=record.get("delta") if private else None,
                                   steps=int(record.get("steps") or 0))


def _privacy_of(run: Path, data: dict) -> dict:
    meta = json.loads((run / "model" / "veil_model.json").read_text())
    record = meta.get("privacy") or json.loads((run / "privacy.json").read_text())
    private = bool(record.get("private") and record.get("enabled", True))
    eps = record.get("epsilon") if private else "inf"
    return {"data": f"synthetic faces, seed {data['seed']} ({'public' if data is PUBLIC_DATA else 'private'})",
            "private": private, "epsilon": eps, "delta": record.get("delta") if private else None}


STAGE_FUNCTIONS: dict[str, Callable] = {"models": stage_models}
from veil.demo.stages import stage_edits, stage_export, stage_serve, stage_unlearning  # noqa: E402

STAGE_FUNCTIONS.update(edits=stage_edits, unlearning=stage_unlearning, export=stage_export, serve=stage_serve)
