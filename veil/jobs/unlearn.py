"""``veil unlearn``: update a trained attribute classifier to a dataset revision, and measure it.

    veil unlearn --model runs/clf --revision runs/rev --method second --compare-retrain --out runs/unl

``run_unlearn`` builds the tensors the update needs (``UnlearningData``: the training set as trained
on, the changed samples and their revision), runs ``FeatureUnlearningModule`` through a Lightning
``Trainer`` (``run_update``; ``--set trainer.devices=2 --set trainer.strategy=ddp`` spreads it over
CPU processes as for training), and writes OUT/model (the release), OUT/private/unlearned.ckpt (owner-only)
and OUT/unlearn_report.json (strict JSON), all moved into OUT only once written; with
``compare_retrain`` it also retrains from scratch on the revised data with the same recipe and seed
(the baseline) and compares.

Under DDP every rank runs this whole job (Lightning's CPU DDP re-runs the command once per extra
rank): all ranks end with the same weights and the same report, and rank 0 alone writes files and
runs the retraining baseline (after the update, on its own), so the report of the other ranks
lacks the comparison with it. ``wait_for_other_ranks`` lets rank 0 end when they do.

What the model "still remembers" is measured on the changed training samples: on their *revised*
images, how often it predicts the *original* value of each edited (flipped) protected attribute.
The retrained model never saw the originals, so its rate is the floor to compare against.

Privacy: the update (first or second order) uses un-noised gradients of the private training set
and the changed samples, so OUT/model is **not** differentially private (epsilon infinite), even when
the model it updates was trained with DP. Rank 0 records the run in the dataset's privacy database
before the update (``veil.jobs.dataset_account.RecordedRun``: kind "unlearn", not private), which
makes the dataset's composed training spend infinite: a finite training budget refuses the run
before any computation (PrivacyError, exit 2). One run at a time writes OUT (``veil.outputs.out_lock``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from veil import console
from veil.errors import CheckpointError, ConfigError, DataError
from veil.lightning_modules.checkpoints import load_classifier, private_dir, seal_private
from veil.lightning_modules.models.classifier import AttributeClassifier, predict
from veil.jobs.train_classifier import (
    ClassifierRecipe,
    features_of,
    tensors,
    test_accuracy,
    train_classifier,
)
from veil.jobs.config import apply_overrides
from veil.jobs.dataset_account import RUN_FILE, RecordedRun
from veil.jobs.process_group import owned_process_group
from veil.jobs.train import other_rank
from veil.lightning_modules.unlearning_module import (
    FeatureUnlearningModule,
    UnlearningInputs,
)
from veil.outputs import check_out_dir, out_lock, staged_dir, write_json_atomic
from veil.privacy.bounds import wilson_interval


@dataclass
class UnlearningData:
    """The tensors one unlearning run needs, from the checkpoint's data spec and a revision."""

    dm_rev: Any
    train: tuple[torch.Tensor, torch.Tensor]  # as trained on
    changed_positions: torch.Tensor  # (m,) rows of ``train`` that the revision changed
    revised_changed: tuple[torch.Tensor, torch.Tensor]  # their revision (m rows)
    revised_train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]  # revised dataset's test split
    original_changed: torch.Tensor  # (m, k) the attributes the changed samples had
    flipped: torch.Tensor  # (m, k) bool: protected attributes the revision changed
    changed_elsewhere: int  # changed samples outside the training split (not unlearned)
    protected: torch.Tensor | None = None  # (m, k) bool: the attributes each change protected (released by RR)

    def revised_weights(self) -> torch.Tensor | None:
        """(m, k): 1 for the attributes each change protected (released by randomized response), 0 for the others,
        whose labels are the originals of a face the edit re-rendered: ``replay`` learns only the former from the
        revised samples (lightning_modules/unlearning/replay.py); None when the revision names none."""
        return None if self.protected is None else self.protected.float()

    @classmethod
    def build(cls, ckpt: dict[str, Any], revision, *, base=None, origin: str = "the model") -> "UnlearningData":
        """``base``: a FaceDataModule of the checkpoint's data whose images are loaded already (benchmarks);
        ``origin`` names the model in errors (its data paths are checked: moved, missing or other images)."""
        from veil.data_arg import check_recorded_data
        from veil.lightning_modules.data.datamodule import FaceDataModule
        from veil.lightning_modules.data.revision import RevisedDataset

        spec = ckpt["veil"].get("data_spec")
        if not isinstance(spec, dict):
            raise CheckpointError("checkpoint has no data_spec; it was not written by `veil train-classifier`")
        if not Path(revision).is_dir():
            raise DataError(f"{revision}: revision folder not found; pass the folder write_revision created")
        if base is None:
            check_recorded_data(spec, {}, origin=origin, option="--model",
                                remedy="unlearning updates a model on the images it was trained on: put that "
                                       "folder back where it was recorded")
        dm, dm_rev = FaceDataModule.from_spec(spec), FaceDataModule.from_spec(spec, revision=str(revision))
        if base is not None:
            dm._dataset, dm_rev._dataset = base.dataset, RevisedDataset(base.dataset, revision)
        rev_ds = dm_rev.dataset  # DataError here if the revision names ids that are not in the dataset
        train_idx = dm.split_indices("train")
        position = {i: p for p, i in enumerate(train_idx)}
        changed = [i for i in rev_ds.changed_indices if i in position]
        by_id = {c["id"]: c for c in rev_ds.manifest["changes"]}
        names = rev_ds.attribute_names
        changes = [by_id[rev_ds.ids[i]] for i in changed]
        original = torch.tensor([[float(c["original_attributes"][n]) for n in names] for c in changes]).reshape(-1, len(names))
        flipped = torch.tensor([[n in c["protected"] and c["original_attributes"][n] != c["released_attributes"][n]
                                 for n in names] for c in changes], dtype=torch.bool).reshape(-1, len(names))
        protected = torch.tensor([[n in c["protected"] for n in names] for c in changes],
                                 dtype=torch.bool).reshape(-1, len(names))
        train = tensors(dm.dataset, train_idx)
        revised_changed = tensors(rev_ds, changed)
        positions = torch.tensor([position[i] for i in changed], dtype=torch.long)
        rx, ra = train[0].clone(), train[1].clone()
        rx[positions], ra[positions] = revised_changed
        return cls(dm_rev, train, positions, revised_changed, (rx, ra), tensors(rev_ds, dm_rev.split_indices("test")),
                   original, flipped, len(rev_ds.changed_indices) - len(changed), protected)


def snapshot(model: AttributeClassifier) -> AttributeClassifier:
    return copy.deepcopy(model).eval()


def check_only_selected_changed(before, after, names: Sequence[str]) -> None:
    """Internal invariant: parameters outside the selected subset are bit-identical."""
    old = dict(before.named_parameters())
    for n, p in after.named_parameters():
        assert n in names or torch.equal(p, old[n]), f"unlearning touched {n}, which it was not asked to"


def base_report(*, method, params, info, data: UnlearningData, seconds: float) -> dict[str, Any]:
    return {"method": method, "params": list(params) if params else None, "update_seconds": seconds,
            "changed_train_samples": len(data.changed_positions), "changed_outside_train": data.changed_elsewhere,
            "train_size": len(data.train[0]), "update": info}


def add_model_metrics(report: dict[str, Any], key: str, model, data: UnlearningData) -> None:
    """Test accuracy, what the model predicts for the flipped attributes of the changed samples, and
    what its penultimate features still say of their original values (``feature_probe_counts``): the
    probe's accuracy, its Wilson 95% interval ``feature_probe_interval`` [lo, hi] (None when nothing
    was flipped) and ``feature_probe_samples``, the (sample, attribute) entries it is read on (the same
    number for every model); each under ``report[metric][key]``."""
    report.setdefault("test_accuracy", {})[key] = test_accuracy(model, data.test)
    logits = predict(model, data.revised_changed[0])  # (m, k) on the revised images
    report.setdefault("changed_released_accuracy", {})[key] = released_accuracy(model, data, logits=logits)
    correct, n = feature_probe_counts(model, data)
    report.setdefault("feature_probe_original_accuracy", {})[key] = correct / n if n else float("nan")
    report.setdefault("feature_probe_interval", {})[key] = list(wilson_interval(correct, n)) if n else None
    # the same entries for every model; per model like every metric (bench/unlearning.py reads report[k][key])
    report.setdefault("feature_probe_samples", {})[key] = n
    mask = data.flipped
    said_original = ((logits > 0) == (data.original_changed > 0))[mask].float()
    p_original = torch.sigmoid(logits * data.original_changed)[mask]  # probability given to the original value
    nan = float("nan")
    report.setdefault("changed_original_attribute_accuracy", {})[key] = float(said_original.mean()) if mask.any() else nan
    report.setdefault("changed_original_attribute_probability", {})[key] = float(p_original.mean()) if mask.any() else nan


@torch.no_grad()
def released_accuracy(model, data: UnlearningData, *, logits: torch.Tensor | None = None) -> float:
    """On the changed samples' revised images: how often the model predicts the *released* value of each
    protected attribute (the label the revision gives them); NaN without protected attributes.
    ``logits``: the model's on those images, when the caller has them already."""
    if data.protected is None or not data.protected.any():
        return float("nan")
    logits = predict(model, data.revised_changed[0]) if logits is None else logits
    return float(((logits > 0) == (data.revised_changed[1] > 0))[data.protected].float().mean())


def feature_probe_leakage(model, data: UnlearningData, *, l2: float = 1e-3) -> float:
    """The accuracy of ``feature_probe_counts``'s probe (correct / read on); NaN when nothing was flipped."""
    correct, n = feature_probe_counts(model, data, l2=l2)
    return correct / n if n else float("nan")


@torch.no_grad()
def feature_probe_counts(model, data: UnlearningData, *, l2: float = 1e-3) -> tuple[int, int]:
    """How much of the *original* protected attributes the model's penultimate features still hold.

    A linear probe (L2-regularised logistic regression, Newton to its optimum) of each attribute the
    revision flipped somewhere is fit on the features of the held-out test images and their labels;
    returned is (correct, n): how often, of the n (changed sample, attribute) entries whose release
    flipped the attribute, it predicts the *original* value from the features of their *revised* image.
    A model that never saw the originals (the retrained one) sits near what the edited pixels show; a
    model that memorised the originals scores higher. (0, 0) when nothing was flipped (or no test image)."""
    from types import SimpleNamespace

    from veil.jobs.train_classifier import refit_head

    cols = data.flipped.any(0)
    if not cols.any() or not len(data.test[0]):
        return 0, 0
    feats = features_of(model, data.test[0])
    probe = SimpleNamespace(head=torch.nn.Linear(feats.shape[1], int(cols.sum())))
    torch.nn.init.zeros_(probe.head.weight), torch.nn.init.zeros_(probe.head.bias)
    with torch.enable_grad():
        refit_head(probe, feats, data.test[1][:, cols], l2=l2)
    said = probe.head(features_of(model, data.revised_changed[0])) > 0
    hits = (said == (data.original_changed[:, cols] > 0))[data.flipped[:, cols]]
    return int(hits.sum()), int(hits.numel())


@torch.no_grad()
def output_kl(model, reference, x: torch.Tensor) -> float:
    """Mean over images and attributes of KL(reference || model) between their Bernoulli outputs."""
    ref, out = predict(reference, x), predict(model, x)
    log_p, log_1p = torch.nn.functional.logsigmoid(ref), torch.nn.functional.logsigmoid(-ref)
    log_q, log_1q = torch.nn.functional.logsigmoid(out), torch.nn.functional.logsigmoid(-out)
    return float((log_p.exp() * (log_p - log_q) + log_1p.exp() * (log_1p - log_1q)).mean())


@torch.no_grad()
def distances(before, after, retrained, names: Sequence[str]) -> dict[str, float]:
    """L2 distance in parameters to the retrained model, over all parameters and over the updated ones."""
    def dist(model, only=None):
        ref = dict(retrained.named_parameters())
        return float(torch.sqrt(sum(((p - ref[n]) ** 2).sum() for n, p in model.named_parameters()
                                    if only is None or n in only)))
    return {"before": dist(before), "after": dist(after),
            "updated_params_before": dist(before, names), "updated_params_after": dist(after, names)}


def save_unlearned(ckpt: dict[str, Any], model, out: Path, *, revision: str, record: dict[str, Any]) -> None:
    """The original checkpoint with the new weights, the revision in its data spec, and the unlearning
    record: the release to share in OUT/model, the owner's checkpoint (with the training features)
    in OUT/private/unlearned.ckpt."""
    from veil.lightning_modules.checkpoints import write_classifier_release

    new = copy.copy(ckpt)
    new["state_dict"] = {**ckpt["state_dict"], **{f"model.{n}": t.detach().clone() for n, t in model.state_dict().items()}}
    veil = copy.deepcopy(ckpt["veil"])
    veil["data_spec"] = {**(veil.get("data_spec") or {}), "revision": revision}
    veil["unlearning"] = {k: record[k] for k in ("method", "params", "changed_train_samples")}
    if (veil.get("privacy") or {}).get("enabled"):
        # The update reads the changed samples and the training set without noise: the DP
        # guarantee of the trained model does not extend to the unlearned one.
        veil["privacy"] = {"enabled": False, "private": False, "epsilon": None, "trained_with": veil["privacy"],
                           "note": "non-private unlearning update applied after DP training",
                           "not_private_reason": NOT_PRIVATE_NOTE}
    new["veil"] = veil
    torch.save(new, private_dir(out) / "unlearned.ckpt")
    write_classifier_release(out, model, veil)
    seal_private(out)


def _retrain(ckpt: dict, dm_rev, out: Path, *, ledger: str | Path | None = None) -> tuple[Any, float]:
    from veil.lightning_modules.data.datamodule import FaceDataModule

    recipe = ClassifierRecipe(**ckpt["veil"]["recipe"])
    dm = FaceDataModule.from_spec(dm_rev.spec())
    dm._dataset = dm_rev.dataset  # the same (already loaded) images: time the training, not the loading
    record = train_classifier(recipe=recipe, datamodule=dm, out=out, ledger=ledger)  # recorded like any training
    model, _ = load_classifier(record["checkpoint"])  # the retrained run's release
    return model, record["seconds"]


# ------------------------------------------------------------------ the Trainer that runs the update
# Lightning's CPU DDP launches the other ranks from rank 0 (once per process: later Trainers reuse
# them); rank 0 keeps their processes here so that ``wait_for_other_ranks`` can wait for them.
_LAUNCHED: list[subprocess.Popen] = []


@dataclass
class UnlearnTrainerConfig:
    """How the update runs (``--set trainer.KEY=VALUE``): ``devices`` CPU processes under ``strategy``."""

    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"  # "ddp" (or auto) for devices > 1: one process per rank, each with its shard

    def __post_init__(self):
        if self.accelerator != "cpu":
            raise ConfigError(f"={self.accelerator}: the unlearning update runs on CPU processes; "
                              "use trainer.accelerator=cpu and trainer.devices=N for N processes",
                              option="trainer.accelerator")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ConfigError(f"must be a whole number of processes >= 1, got {self.devices!r}",
                              option="trainer.devices")
        if self.strategy not in ("auto", "ddp"):
            raise ConfigError(f"={self.strategy}: choose auto or ddp (each rank its own process, "
                              "which keeps its updated weights)", option="trainer.strategy")


def trainer_config(overrides: Sequence[str] = ()) -> UnlearnTrainerConfig:
    """``UnlearnTrainerConfig`` from ``--set trainer.KEY=VALUE`` overrides (values parsed as YAML)."""
    raw = apply_overrides({}, list(overrides))
    names = sorted(f.name for f in dataclasses.fields(UnlearnTrainerConfig))
    if set(raw) - {"trainer"} or not isinstance(raw.get("trainer", {}), dict):
        raise ConfigError(f": veil unlearn takes trainer.* options only ({', '.join('trainer.' + n for n in names)})",
                          option="--set")
    unknown = sorted(set(raw.get("trainer", {})) - set(names))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join('trainer.' + u for u in unknown)}; valid: {names}")
    return UnlearnTrainerConfig(**raw.get("trainer", {}))


def build_trainer(cfg: UnlearnTrainerConfig) -> L.Trainer:
    return L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                     inference_mode=False,  # the update differentiates (predict_step re-enables grad)
                     use_distributed_sampler=False,  # every rank gets the one batch and takes its shard
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def run_update(unlearner: FeatureUnlearningModule, inputs: UnlearningInputs,
               cfg: UnlearnTrainerConfig) -> tuple[dict[str, Any], bool]:
    """Update ``unlearner``'s model in place through ``Trainer.predict``; (what was done, whether rank 0).

    A process group the strategy made is destroyed here, after the update's last collective, so
    that gloo's threads end before the interpreter does (``training.process_group``; module.py on the SIGABRT).
    """
    trainer = build_trainer(cfg)
    with owned_process_group(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # one batch, in memory
        warnings.filterwarnings("ignore", message=".*nn.functional.all_gather is deprecated.*")  # Lightning's
        (info,) = trainer.predict(unlearner, dataloaders=DataLoader([inputs], batch_size=None))
    _LAUNCHED.extend(getattr(trainer.strategy.launcher, "procs", ()))
    return info, trainer.is_global_zero


def wait_for_other_ranks() -> None:
    """On the rank that launched the others: wait for them to end; fail if one failed (call once, at the end)."""
    while _LAUNCHED:
        proc = _LAUNCHED.pop(0)
        if proc.wait() != 0:
            raise RuntimeError(f"an unlearning rank (pid {proc.pid}) exited with status {proc.returncode}")


def unlearn_and_measure(clf, ckpt: dict[str, Any], data: UnlearningData, *, method: str,
                        params: Sequence[str] | None = None,
                        retrained: tuple[Any, float] | Callable[[], tuple[Any, float]] | None = None,
                        trainer: UnlearnTrainerConfig | None = None, **knobs: Any) -> dict[str, Any]:
    """Unlearn in place through a Trainer (timed) and measure before/after.

    ``retrained``: (model, seconds) of the retraining baseline to compare with, or a function that
    makes it, called on rank 0 after the update. The report's private ``_global_zero`` says whether
    this is rank 0, ``_train_features`` the updated feature cache (or None).
    """
    before = snapshot(clf)
    unlearner = FeatureUnlearningModule(clf, method=method, l2=ckpt["veil"].get("l2", {}), params=params, **knobs)
    residual_before = unlearner.gradient_residual(data.revised_train)
    cache = ckpt["veil"].get("train_features")
    inputs = UnlearningInputs(train=data.train, changed=data.changed_positions, revised=data.revised_changed,
                              train_features=cache, revised_weights=data.revised_weights())
    with console.stage(f"the {method} update on {len(data.changed_positions)} changed samples"):
        info, global_zero = run_update(unlearner, inputs, trainer or UnlearnTrainerConfig())
    seconds = info.pop("seconds")  # the update itself on the slowest rank, not the Trainer's setup
    check_only_selected_changed(before, clf, unlearner.names)
    report = base_report(method=method, params=params, info=info, data=data, seconds=seconds)
    report["gradient_residual"] = {"before": residual_before, "after": unlearner.gradient_residual(data.revised_train)}
    add_model_metrics(report, "before", before, data)
    add_model_metrics(report, "after", clf, data)
    if retrained is not None and global_zero:
        model, retrain_seconds = retrained() if callable(retrained) else retrained
        report["retrain_seconds"] = retrain_seconds
        report["speedup"] = retrain_seconds / max(seconds, 1e-9)
        report["gradient_residual"]["retrained"] = unlearner.gradient_residual(data.revised_train, model)
        add_model_metrics(report, "retrained", model, data)
        report["distance_to_retrained"] = distances(before, clf, model, unlearner.names)
        report["output_kl_to_retrained"] = {"before": output_kl(before, model, data.test[0]),
                                            "after": output_kl(clf, model, data.test[0])}
    features = None
    if cache is not None and info["cached_features"]:  # the trunk is unchanged: only Z's rows move
        features = cache.clone()
        features[data.changed_positions] = features_of(clf, data.revised_changed[0])
    report["_train_features"], report["_global_zero"] = features, global_zero
    return report


OUT_ENTRIES = ("model", "private", "unlearn_report.json", "retrained")  # what a run writes in OUT
UNLEARN_FILES = ("private/unlearned.ckpt", "model", "unlearn_report.json")  # moved in in this order: the report last


def run_unlearn(*, model: str | Path, revision: str | Path, method: str, out: str | Path, force: bool = False,
                compare_retrain: bool = False, params: Sequence[str] | None = None,
                trainer: UnlearnTrainerConfig | None = None, ledger: str | Path | None = None,
                **knobs: Any) -> dict[str, Any]:
    """Unlearn ``revision`` from the classifier run ``model`` (its folder, or an owner ``.ckpt``); rank 0 writes
    OUT/model (the release), OUT/private/unlearned.ckpt and the report.

    ``out`` is checked before any work (ConfigError: a file, unwritable, being written by another run
    (``out_lock``, held for the whole run), or holding an earlier run's results unless ``force``). The
    results are written into a temporary folder inside OUT and moved in place only when all are
    written; a run that fails leaves OUT as it found it (and removes OUT if it created it). ``knobs`` go
    to ``FeatureUnlearningModule`` (tau, damping, solver, cg_max_iter, lissa_scale, hessian_samples, ...);
    ``trainer`` says how many processes run the update.

    The run is recorded in the dataset's privacy database (``ledger``; default: the SQLite database the
    model's own training run was recorded in, else the dataset's) as a training run of kind "unlearn",
    not private: the update reads the training set and the changed samples without noise, so its
    release carries no DP guarantee (epsilon infinite) and the dataset's composed training spend becomes
    infinite. A finite training budget therefore refuses it (PrivacyError) before any computation; a run
    that fails is marked failed (it still counts). The report's ``privacy`` says so.
    """
    out = Path(out)
    if _run_folder(model) == out.resolve():
        raise ConfigError(f"{out}: is the --model run folder; write the unlearned model to a new folder",
                          option="--out")
    with out_lock(out, skip=other_rank()) as lock, \
            staged_dir(out, in_place=True, created=lock.created, keep=other_rank):  # a failure removes what it made
        check_out_dir(out, holds=OUT_ENTRIES, force=force)
        return _unlearn_into(out, model=model, revision=revision, method=method, compare_retrain=compare_retrain,
                             params=params, trainer=trainer, ledger=ledger, **knobs)


def _run_folder(model: str | Path) -> Path:
    """The run folder ``--model`` names (for OUT/private/x.ckpt: OUT)."""
    path = Path(model).resolve()
    if path.suffix == ".ckpt" and path.parent.name == "private":
        return path.parent.parent
    return path.parent if path.name == "model" else path


NOT_PRIVATE_NOTE = ("not private: the update reads the private training set and the changed samples without noise, "
                    "so the released model carries no DP guarantee (epsilon infinite), whatever the model it updated "
                    "was trained with; the dataset's composed training spend is now infinite")


def unlearn_account(out: Path, ckpt: dict[str, Any], *, model, revision, method, params,
                    ledger: str | Path | None) -> RecordedRun:
    """The dataset account's record of this unlearning run (see ``run_unlearn``), not yet started."""
    from veil.lightning_modules.data.datamodule import DATASET_KEYS

    spec = ckpt["veil"].get("data_spec")
    if not isinstance(spec, dict):
        raise CheckpointError("checkpoint has no data_spec; it was not written by `veil train-classifier`")
    if ledger is None:  # where the model's training was recorded (a SQLite file that is still there)
        run_file = _run_folder(model) / "private" / RUN_FILE
        with contextlib.suppress(OSError, ValueError, AttributeError):
            recorded = json.loads(run_file.read_text()).get("ledger")
            ledger = recorded if isinstance(recorded, str) and Path(recorded).is_file() else None
    trained_with = ckpt["veil"].get("privacy") or {}
    details = {"model": str(Path(model).resolve()), "revision": str(Path(revision).resolve()), "method": method,
               "params": list(params) if params else None, "model_private": bool(trained_with.get("private")),
               "note": NOT_PRIVATE_NOTE}
    return RecordedRun(out=out, kind="unlearn", data_spec={k: v for k, v in spec.items() if k in DATASET_KEYS},
                       ledger=ledger, private=False, details=details)


def _unlearn_into(out: Path, *, model, revision, method, compare_retrain, params, trainer, ledger,
                  **knobs) -> dict[str, Any]:
    clf, ckpt = load_classifier(model, owner=True)  # the owner's checkpoint (cached features) when there
    if clf.noise_conditional:
        raise ConfigError(f"{model}: a noise-conditional (guidance) classifier; unlearning updates "
                          "classifiers of clean images", option="--model")
    account = None  # rank 0 records the run; the ranks it starts (which run this job too) do not
    if not other_rank():
        account = unlearn_account(out, ckpt, model=model, revision=revision, method=method, params=params,
                                  ledger=ledger)
        account.check()  # PrivacyError here, before any work, when a training budget is set
    with console.stage("reading the training set and the revision"):
        data = UnlearningData.build(ckpt, revision, origin=f"the model {model}")  # DataError: another dataset
    retrained_dir, aside = out / "retrained", out / f".retrained.old-{os.getpid()}"
    made_retrained = False

    def retrain() -> tuple[Any, float]:  # on rank 0 only; in its final place, as the ledger records it
        nonlocal made_retrained
        if retrained_dir.exists():  # --force: the earlier run's, put back if this run fails
            os.replace(retrained_dir, aside)
        made_retrained = True
        with console.stage("retraining from scratch on the revised data, to compare"):
            return _retrain(ckpt, data.dm_rev, retrained_dir, ledger=account.ledger_path if account else ledger)

    try:
        with account or contextlib.nullcontext():  # "running" from here (budget checked again), then finished | failed
            report = unlearn_and_measure(clf, ckpt, data, method=method, params=params,
                                         retrained=retrain if compare_retrain else None, trainer=trainer, **knobs)
            ckpt["veil"]["train_features"] = report.pop("_train_features")
            if not report.pop("_global_zero"):
                return report  # another rank: the same update and report; rank 0 writes them
            report = finite_or_none(report)  # NaN (no flipped attribute to measure) is not JSON
            report["privacy"] = {"private": False, "epsilon": None, "ledger": account.where, "run_id": account.run_id,
                                 "note": NOT_PRIVATE_NOTE}
            with staged_dir(out, UNLEARN_FILES, replace=True, prefix=".unlearn.tmp-") as tmp:  # --force replaces
                save_unlearned(ckpt, clf, tmp, revision=str(revision), record=report)
                write_json_atomic(tmp / "unlearn_report.json", report)
                private_dir(out)  # owner-only; it may hold other owner files: only unlearned.ckpt moves into it
            seal_private(out)
    except BaseException:
        if made_retrained:
            shutil.rmtree(retrained_dir, ignore_errors=True)
            if aside.exists():
                os.replace(aside, retrained_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return report


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj
