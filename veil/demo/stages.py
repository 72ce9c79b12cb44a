"""Stages 2-5 of ``veil demo`` (see pipeline.py): edits, unlearning, export, serve. Each takes
(out, plan, the earlier stages' results, progress) and returns its key numbers for the report."""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from veil.demo.owner import (attack_releases, choose_level, level_attackers, level_prices, record_guarantees,
                             scripted_owner, utility)
from veil.demo.plan import PRIVATE_DATA, DemoPlan
from veil.privacy.levels import LEVELS

__all__ = ["stage_edits", "stage_unlearning", "stage_export", "stage_serve", "next_commands"]


def _editor(out: Path, plan: DemoPlan):
    from veil.editing.load import load_editor

    models = out / "models"
    return load_editor(models / "public_unet", classifier=models / "guide", classifier_scale=plan.classifier_scale,
                       checker=models / "checker", steps=plan.steps)  # checked by the checker, never the guide


def _published_data(out: Path):
    """The published classifier's datamodule (its images and splits): the edits are of its training images."""
    from veil.lightning_modules.data.datamodule import FaceDataModule

    meta = json.loads((out / "models" / "published" / "model" / "veil_model.json").read_text())
    spec = {k: v for k, v in meta["data_spec"].items() if k not in ("batch_size", "poisson", "revision")}
    return FaceDataModule(**spec)


# ------------------------------------------------------------------------------------------- 2. edits
def stage_edits(out: Path, plan: DemoPlan, done: dict, progress) -> dict:
    from veil.privacy.ledger import PrivacyLedger

    folder = out / "edits"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    editor = _editor(out, plan)
    names, protected = list(editor.attribute_names), list(plan.protected)
    dm = _published_data(out)
    ds = dm.dataset
    train = [int(i) for i in dm.split_indices("train")[: plan.edit_images]]
    items = [(ds.ids[i], *ds[i]) for i in train]  # (id, (3,H,W), (k,))
    progress(f"  attackers: one per level, trained on {plan.attackers.edits_per_level // 2} edits of public faces, "
             f"measured on the other half")
    naive, attackers, attack_rows = level_attackers(editor, names=names, protected=protected, sizes=plan.attackers,
                                                    resolution=ds[0][0].shape[-1], progress=progress)
    with PrivacyLedger.for_dataset(PRIVATE_DATA) as ledger:
        allowed = level_prices(editor, ledger, protected=protected)  # before any release, on public facts only
        for row in attack_rows:
            row.update(allowed.get(row["level"], {}))
        choice = choose_level(attack_rows, allowed=allowed)
        progress(f"  the owner releases all {len(items)} images at {choice['level']}: {choice['why']}")
        result = scripted_owner(editor, ledger, items, names=names, protected=protected, level=choice["level"],
                                progress=progress)
        account = record_guarantees(ledger, [i for i, _, _ in items], result["outcomes"])
        ids = {i for i, _, _ in items}
        in_ledger = sum(1 for r in ledger.releases() if r.image_id in ids)
        refused_ids = sorted({r.image_id for r in ledger.releases() if r.image_id in ids and r.outcome == "refused"}
                             - {r["id"] for r in result["accepted"]})
    accepted = result["accepted"]
    lv = LEVELS[choice["level"]]
    on_releases = attack_releases(attackers[choice["level"]], accepted, names=names, protected=protected,
                                  epsilon=lv.epsilon)
    if on_releases["n"]:
        progress(f"  attacker on the {on_releases['n']} accepted releases: {on_releases['accuracy']:.0%} "
                 f"[95% {on_releases['ci95'][0]:.0%}-{on_releases['ci95'][1]:.0%}], bound {on_releases['bound']:.0%}")
    top = account["max"]
    g = lambda v: v if isinstance(v, str) else f"{v:.4g}"  # noqa: E731  ("inf" is a string in JSON)
    progress(f"  per record, composed over its releases: epsilon at most {g(top['epsilon'])} (labels "
             f"{g(top['labels_epsilon'])}, pixels {g(top['pixels_epsilon'])}) at delta {account['delta']:g}")
    _write_edits(folder, dm, names, protected, accepted, withheld=refused_ids)
    return {"images": len(items), "protected": protected, "level": choice["level"], "level_choice": choice,
            "releases": result["releases"], "refused": result["refused"], "withheld": result["withheld"],
            "accepted_levels": sorted({r["level"] for r in accepted}),
            "guarantee": account, "attacker": attack_rows, "attacker_on_releases": on_releases,
            "utility": utility(naive, accepted, names=names, protected=protected),
            "ledger_releases": in_ledger, "grid": "edits/grid.png" if accepted else None,
            "grid_note": "top: originals, bottom: accepted edits, captioned with their released values (* flipped) "
                         "and level"}


def _write_edits(folder: Path, dm, names: list[str], protected: list[str], accepted: list[dict],
                 withheld: list[str] = ()) -> None:
    """The revision of the accepted edits (``withheld``: the ids the check refused, listed as withheld) and the
    grid of originals over edits (both or neither)."""
    from veil.lightning_modules.data.grid import EDIT_LEGEND, edit_captions, save_before_after
    from veil.outputs import staged_dir
    from veil.privacy.revision_manifest import RevisionChange, write_revision

    if not accepted:
        return
    with staged_dir(folder, ["revision", "grid.png"]) as stage:
        write_revision(stage / "revision", base_spec=dm.dataset_spec(), attribute_names=names,
                       changes=[RevisionChange(id=r["id"], original_attributes=r["original"],
                                               released_attributes=r["released"], protected=protected,
                                               epsilon=r["epsilon"], strength=r["strength"]) for r in accepted],
                       images={r["id"]: r["edit"] for r in accepted}, withheld=withheld)
        shown = accepted[:8]  # the demo folder is owner-only (0700): the flipped marks may show
        save_before_after(torch.stack([r["image"] for r in shown]), torch.stack([r["edit"] for r in shown]),
                          stage / "grid.png", legend=EDIT_LEGEND,
                          captions=edit_captions([r["released"] for r in shown], [r["original"] for r in shown],
                                                 protected=protected, level=shown[0]["level"]))


# -------------------------------------------------------------------------------------- 3. unlearning
def stage_unlearning(out: Path, plan: DemoPlan, done: dict, progress) -> dict:
    from veil.jobs.unlearn import run_unlearn

    revision = out / "edits" / "revision"
    if not (revision / "manifest.json").is_file():
        return {"changed": 0, "note": "no edit was accepted, so there is nothing to unlearn"}
    target = out / "unlearning" / "unlearned"
    shutil.rmtree(target, ignore_errors=True)
    r = run_unlearn(model=out / "models" / "published", revision=revision, method="replay", out=target,
                    compare_retrain=True, params=None)  # veil unlearn's default (README, "Unlearning")
    acc, remembered = r["test_accuracy"], r["changed_original_attribute_accuracy"]
    probe, interval = r["feature_probe_original_accuracy"], r.get("feature_probe_interval") or {}
    rnd = lambda v: None if v is None or v != v else round(float(v), 4)  # NaN (no flipped value) -> None
    models = {"original": "before", "updated": "after", "retrained": "retrained"}
    progress(f"  update {r['update_seconds'] * 1000:.0f} ms vs retraining {r['retrain_seconds']:.1f} s "
             f"({r['speedup']:.0f}x); test accuracy {acc['before']:.3f} -> {acc['after']:.3f} (retrained "
             f"{acc['retrained']:.3f}); feature probe " + " / ".join(
                 "n/a" if rnd(probe[k]) is None else f"{probe[k]:.1%}" for k in models.values()))
    return {"changed": r["changed_train_samples"],
            "method": "replay: 2 passes of Adam over the revised samples' protected attributes and 3 unchanged "
                      "samples per revised one, every layer",
            "tau": r["update"].get("tau"),
            "update_seconds": round(r["update_seconds"], 4), "retrain_seconds": round(r["retrain_seconds"], 2),
            "speedup": round(r["speedup"], 1),
            "test_accuracy": {"original": rnd(acc["before"]), "updated": rnd(acc["after"]),
                              "retrained": rnd(acc["retrained"])},
            # the linear probe of the original value on the flipped samples' penultimate features: what the
            # report shows (the output-level "remembered" reads 0% for all three models; kept for old reports)
            "feature_probe": {name: rnd(probe[k]) for name, k in models.items()},
            "feature_probe_ci95": {name: [rnd(v) for v in interval[k]] if interval.get(k) else None
                                   for name, k in models.items()},
            "feature_probe_samples": (r.get("feature_probe_samples") or {}).get("before"),
            "remembered": {name: rnd(remembered[k]) for name, k in models.items()}}


# ------------------------------------------------------------------------------------------ 4. export
def _p50_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


def stage_export(out: Path, plan: DemoPlan, done: dict, progress) -> dict:
    from veil.export.exporter import export_model
    from veil.editing.load import load_editor
    from veil.privacy.levels import LEVELS

    target = out / "export" / "guided"
    shutil.rmtree(target, ignore_errors=True)
    models = out / "models"
    meta = export_model(checkpoint=models / "public_unet", classifier=models / "guide",
                        classifier_scale=plan.classifier_scale, checker=models / "checker", steps=plan.steps,
                        out=target)
    v = meta["verification"]
    ort, torch_editor = load_editor(target), _editor(out, plan)
    lv, names = LEVELS["medium"], list(ort.attribute_names)
    x = np.zeros((1, 3, ort.resolution, ort.resolution), np.float32)
    a = np.ones((1, len(names)), np.float32)
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)  # timing only: never a release
    protected = list(plan.protected)
    ort_ms = _p50_ms(lambda: ort.edit(x, a, -a, strength=lv.strength, protected=protected, encoding=lv.encoding,
                                      noise=noise), plan.latency_repeats)
    xt, at, nt = torch.from_numpy(x), torch.from_numpy(a), torch.from_numpy(noise)
    with torch.no_grad():
        torch_ms = _p50_ms(lambda: torch_editor.edit(xt, at, -at, strength=lv.strength, protected=protected,
                                                     encoding=lv.encoding, noise=nt), plan.latency_repeats)
    progress(f"  parity {max(v['max_abs_error'].values()):.2g} (tolerance {v['tolerance']:g}); a preview at medium: "
             f"ONNX Runtime {ort_ms:.0f} ms, PyTorch {torch_ms:.0f} ms")
    return {"parity_max_abs_error": max(v["max_abs_error"].values()), "tolerance": v["tolerance"],
            "latency_ms": {"ort_p50": ort_ms, "torch_p50": torch_ms}, "speedup": round(torch_ms / ort_ms, 2),
            "provider": ort.provider, "export": str(target)}


# ------------------------------------------------------------------------------------------- 5. serve
def serve_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "veil.cli", "serve", "--export", str(out / "export" / "guided"), *extra]


def stage_serve(out: Path, plan: DemoPlan, done: dict, progress) -> dict:
    import httpx

    from veil.demo.serving import free_port, one_session, wait_ready

    port = free_port()
    log = out / "serve" / "serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(serve_command(out, "--port", str(port), "--log-level", "warning"), stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log)
        dm = _published_data(out)
        test = dm.split_indices("test")
        i = int(test[0]) if test else 0
        with httpx.Client(base_url=url, timeout=120) as client:
            level = (done.get("edits") or {}).get("level") or "high"  # the level the edits pinned for the dataset
            result = one_session(client, dm.dataset.image_uint8(i), list(plan.protected), level=level)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    progress(f"  over HTTP: {result['preview_events']} preview events, then {result['decision']} "
             f"(release {result['release_id']})")
    return {**result, **next_commands(out, plan)}


def next_commands(out: Path, plan: DemoPlan) -> dict:
    """What the report tells the owner to run next, each valid as printed once the demo is done: the page on
    the demo's faces (``veil demo`` with this demo's own --quick setting, or it is refused; it writes the faces
    itself), the server by hand on the demo's own ledger (not ~/.veil: the demo never spends the user's
    databases; uploads only: ``veil serve --dataset`` takes only the folder an export was trained on), its account."""
    from veil.privacy.ledger import PrivacyLedger

    q = lambda path: shlex.quote(str(path))  # noqa: E731  (a folder with a space stays one argument)
    with PrivacyLedger.for_dataset(PRIVATE_DATA) as ledger:  # $VEIL_HOME is out/veil_home here
        ledger_path = out / "veil_home" / "datasets" / Path(ledger.path).name  # named as the user named --out
    quick = " --quick" if plan.name == "quick" else ""
    return {"command": f"veil demo{quick} --out {q(out)} --serve",
            "serve_command": f"veil serve --export {q(out / 'export' / 'guided')} --state {q(ledger_path)}",
            "account_command": f"veil privacy show --ledger {q(ledger_path)}"}
