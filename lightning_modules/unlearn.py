"""``veil train-classifier`` and ``veil unlearn``: train an attribute classifier, update it to a revision.

    veil train-classifier --data source=synthetic,num_images=3000 --out runs/clf
    veil unlearn --model runs/clf/last.ckpt --revision runs/rev --method second --compare-retrain --out runs/unl

``train_classifier`` trains ``AttributeClassifier`` with the recipe (``ClassifierRecipe``, also
``lightning_modules/configs/classifier32.yaml``), optionally with DP-SGD, then (non-private runs,
``refit_head``) refits the head to the exact optimum of its L2-regularised logistic regression on
the frozen features. ``run_unlearn`` applies ``FeatureUnlearningModule`` and writes the updated
checkpoint and ``unlearn_report.json``; with ``compare_retrain`` it also retrains from scratch on
the revised data with the same recipe and seed (the baseline) and compares.

What the model "still remembers" is measured on the changed training samples: on their *revised*
images, how often it predicts the *original* value of each edited (flipped) protected attribute.
The retrained model never saw the originals, so its rate is the floor to compare against.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import yaml

from veil.errors import CheckpointError, ConfigError, DataError
from veil.lightning_modules import unlearning as U
from veil.lightning_modules.classifier import CHECKPOINT_KIND, AttributeClassifier, accuracy, attribute_bce, predict


@dataclass
class ClassifierRecipe:
    """How a classifier is trained; stored in its checkpoint so the retrain baseline repeats it."""

    seed: int = 0
    epochs: int = 4
    lr: float = 3e-3
    batch_size: int = 64
    head_l2: float = 1e-3  # L2 on the head: keeps its logistic regression strictly convex
    refit_head: bool = True  # after training, fit the head to its exact optimum (non-private runs only)
    model: dict[str, Any] = field(default_factory=lambda: {"channels": [16, 32, 64], "feature_dim": 64,
                                                           "norm_num_groups": 8})
    dp: dict[str, Any] = field(default_factory=lambda: {"enabled": False})

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs}: must be >= 1")
        if not self.lr > 0 or self.batch_size < 1 or self.head_l2 < 0:
            raise ConfigError(f"lr={self.lr}, batch_size={self.batch_size}, head_l2={self.head_l2}: "
                              "need lr > 0, batch_size >= 1, head_l2 >= 0")
        from veil.lightning_modules.dp import DPConfig

        dp = DPConfig(**self.dp)  # validates, naming the dp.* option
        if dp.enabled and self.refit_head:
            raise ConfigError("refit_head: refitting the head on the data is not private; "
                              "set refit_head: false when dp.enabled is true")
        if self.model.get("noise_conditional") and self.refit_head:
            raise ConfigError("refit_head: a noise-conditional (guidance) classifier's head is not a logistic "
                              "regression on fixed features; set refit_head: false with model.noise_conditional")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(path: str | None, overrides: Sequence[str] = ()) -> tuple[ClassifierRecipe, dict[str, Any]]:
    """(recipe, data options) from a YAML file (keys of ClassifierRecipe plus a ``data`` section) and KEY=VALUE overrides."""
    from veil.lightning_modules.config import apply_overrides

    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--config {path} does not exist")
        raw = yaml.safe_load(Path(path).read_text()) or {}
    raw = apply_overrides(raw, list(overrides))
    data = raw.pop("data", None) or {}
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(ClassifierRecipe)})
    if unknown:
        raise ConfigError(f"unknown classifier option(s) {unknown}; valid: data, "
                          f"{[f.name for f in dataclasses.fields(ClassifierRecipe)]}")
    return ClassifierRecipe(**raw), dict(data)


# ------------------------------------------------------------------------------------------ data and checkpoints
def tensors(dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items of ``dataset``: images (n, 3, R, R), attrs (n, k)."""
    items = [dataset[i] for i in indices]
    if not items:
        r, k = dataset.resolution, len(dataset.attribute_names)
        return torch.zeros(0, 3, r, r), torch.zeros(0, k)
    return torch.stack([x for x, _ in items]), torch.stack([a for _, a in items])


def test_accuracy(model, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    return accuracy(predict(model, data[0]), data[1])


def noisy_accuracy(model, alphas_cumprod: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor], *,
                   fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75), seed: int = 0) -> dict[str, float]:
    """A noise-conditional classifier's accuracy on x_t, at timesteps t = fraction * T (seeded noise)."""
    from veil.lightning_modules.dp_diffusion_module import q_sample

    x, attrs = data
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for f in fractions:
        t = min(int(f * len(alphas_cumprod)), len(alphas_cumprod) - 1)
        x_t = q_sample(x, alphas_cumprod.cpu(), torch.tensor(t), torch.randn(x.shape, generator=gen))
        out[str(t)] = accuracy(predict(model, x_t, t=t), attrs)
    return out


def load_classifier(path) -> tuple[AttributeClassifier, dict[str, Any]]:
    """(model, checkpoint) from a ``veil train-classifier`` / ``veil unlearn`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass OUT/last.ckpt of `veil train-classifier`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    kind = ckpt.get("veil", {}).get("kind") if isinstance(ckpt, dict) else None
    if kind != CHECKPOINT_KIND:
        raise CheckpointError(f"{path}: a {kind or 'non-veil'} checkpoint, expected {CHECKPOINT_KIND!r}; "
                              "train one with `veil train-classifier`")
    record = ckpt["veil"]
    model = AttributeClassifier(**record["model_kwargs"])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the recorded model_kwargs ({e})") from None
    return model.eval(), ckpt


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

    @classmethod
    def build(cls, ckpt: dict[str, Any], revision, *, base=None) -> "UnlearningData":
        """``base``: a FaceDataModule of the checkpoint's data whose images are loaded already (benchmarks)."""
        from veil.lightning_modules.data.datamodule import FaceDataModule
        from veil.lightning_modules.data.revision import RevisedDataset

        spec = ckpt["veil"].get("data_spec")
        if not isinstance(spec, dict):
            raise CheckpointError("checkpoint has no data_spec; it was not written by `veil train-classifier`")
        if not Path(revision).is_dir():
            raise DataError(f"{revision}: revision folder not found; pass the folder write_revision created")
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
        train = tensors(dm.dataset, train_idx)
        revised_changed = tensors(rev_ds, changed)
        positions = torch.tensor([position[i] for i in changed], dtype=torch.long)
        rx, ra = train[0].clone(), train[1].clone()
        rx[positions], ra[positions] = revised_changed
        return cls(dm_rev, train, positions, revised_changed, (rx, ra), tensors(rev_ds, dm_rev.split_indices("test")),
                   original, flipped, len(rev_ds.changed_indices) - len(changed))


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
    """Test accuracy, and what the model predicts for the flipped attributes of the changed samples."""
    report.setdefault("test_accuracy", {})[key] = test_accuracy(model, data.test)
    logits = predict(model, data.revised_changed[0])  # (m, k) on the revised images
    mask = data.flipped
    said_original = ((logits > 0) == (data.original_changed > 0))[mask].float()
    p_original = torch.sigmoid(logits * data.original_changed)[mask]  # probability given to the original value
    nan = float("nan")
    report.setdefault("changed_original_attribute_accuracy", {})[key] = float(said_original.mean()) if mask.any() else nan
    report.setdefault("changed_original_attribute_probability", {})[key] = float(p_original.mean()) if mask.any() else nan


@torch.no_grad()
def distances(before, after, retrained, names: Sequence[str]) -> dict[str, float]:
    """L2 distance in parameters to the retrained model, over all parameters and over the updated ones."""
    def dist(model, only=None):
        ref = dict(retrained.named_parameters())
        return float(torch.sqrt(sum(((p - ref[n]) ** 2).sum() for n, p in model.named_parameters()
                                    if only is None or n in only)))
    return {"before": dist(before), "after": dist(after),
            "updated_params_before": dist(before, names), "updated_params_after": dist(after, names)}


def save_unlearned(ckpt: dict[str, Any], model, path: Path, *, revision: str, record: dict[str, Any]) -> None:
    """The original checkpoint with the new weights, the revision in its data spec, and the unlearning record."""
    new = copy.copy(ckpt)
    new["state_dict"] = {**ckpt["state_dict"], **{f"model.{n}": t.detach().clone() for n, t in model.state_dict().items()}}
    veil = copy.deepcopy(ckpt["veil"])
    veil["data_spec"] = {**(veil.get("data_spec") or {}), "revision": revision}
    veil["unlearning"] = {k: record[k] for k in ("method", "params", "changed_train_samples")}
    if (veil.get("privacy") or {}).get("enabled"):
        # The update reads the changed samples and the training set without noise: the DP
        # guarantee of the trained model does not extend to the unlearned one.
        veil["privacy"] = {"enabled": False, "epsilon": None, "trained_with": veil["privacy"],
                           "note": "non-private unlearning update applied after DP training"}
    new["veil"] = veil
    torch.save(new, path)


# ------------------------------------------------------------------------------------------ training
def _trainer(out: Path, epochs: int, progress: bool) -> L.Trainer:
    return L.Trainer(default_root_dir=out, max_epochs=epochs, accelerator="cpu" if not torch.cuda.is_available()
                     else "auto", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=progress, enable_model_summary=False, use_distributed_sampler=False,
                     limit_val_batches=0, num_sanity_val_steps=0)


@torch.no_grad()
def features_of(model, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(x[i : i + 512]) for i in range(0, len(x), 512)])


def refit_head(model, feats: torch.Tensor, attrs: torch.Tensor, *, l2: float) -> int:
    """Fit the head to the optimum of its L2-regularised logistic regression on frozen features (Newton)."""
    obj = U.Objective(model.head, ["weight", "bias"], attribute_bce, {"weight": l2, "bias": l2})
    vec, iters = U.newton_minimize(obj, obj.flat(), U.iter_batches(feats, attrs, 1024), max_iter=20, tol=1e-8)
    obj.assign(vec)
    return iters


def train_classifier(*, recipe: ClassifierRecipe, data: dict[str, Any] | None = None, out: str | Path,
                     datamodule=None, progress: bool = False) -> dict[str, Any]:
    """Train on ``data`` (FaceDataModule options) or a ready ``datamodule``; write OUT/last.ckpt; return a record."""
    from veil.lightning_modules.classifier_module import AttributeClassifierModule
    from veil.lightning_modules.data.datamodule import FaceDataModule

    out = Path(out)
    if (out / "last.ckpt").exists():
        raise ConfigError(f"--out {out} already holds last.ckpt; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    dm = datamodule or FaceDataModule(**{**(data or {}), "batch_size": recipe.batch_size,
                                         "poisson": bool(recipe.dp.get("enabled"))})
    dm.setup("fit")
    L.seed_everything(recipe.seed, verbose=False)
    steps = recipe.epochs * (int(1 / dm.sample_rate) if dm.poisson else dm.train_size // dm.batch_size)
    model_kwargs = {"num_attributes": len(dm.attribute_names), "resolution": dm.resolution, **recipe.model}
    module = AttributeClassifierModule(
        model_kwargs=model_kwargs, attribute_names=dm.attribute_names, train_size=dm.train_size,
        sample_rate=dm.sample_rate, planned_steps=max(steps, 1), dp=recipe.dp, lr=recipe.lr,
        head_l2=recipe.head_l2, data_spec=dm.spec(), recipe=recipe.to_dict(),
    )
    start = time.perf_counter()
    trainer = _trainer(out, recipe.epochs, progress)
    trainer.fit(module, datamodule=dm)
    newton = None
    if recipe.refit_head:
        x, attrs = tensors(dm.dataset, dm.split_indices("train"))
        feats = features_of(module.model, x)
        newton = refit_head(module.model, feats, attrs, l2=recipe.head_l2)
        module.train_features = feats  # non-private runs only (refit_head is refused under DP)
    seconds = time.perf_counter() - start
    trainer.save_checkpoint(out / "last.ckpt")
    test = tensors(dm.dataset, dm.split_indices("test"))
    record = {"checkpoint": str(out / "last.ckpt"), "seconds": seconds, "steps": module.dp_steps,
              "head_newton_iterations": newton, "test_accuracy": test_accuracy(module.model, test),
              "privacy": module.privacy()}
    if module.model.noise_conditional:
        record["test_accuracy_by_timestep"] = noisy_accuracy(module.model, module.alphas_cumprod, test)
    (out / "train_report.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# ------------------------------------------------------------------------------------------ unlearning
def _retrain(ckpt: dict, dm_rev, out: Path) -> tuple[Any, float]:
    from veil.lightning_modules.data.datamodule import FaceDataModule

    recipe = ClassifierRecipe(**ckpt["veil"]["recipe"])
    dm = FaceDataModule.from_spec(dm_rev.spec())
    dm._dataset = dm_rev.dataset  # the same (already loaded) images: time the training, not the loading
    record = train_classifier(recipe=recipe, datamodule=dm, out=out)
    model, _ = load_classifier(record["checkpoint"])
    return model, record["seconds"]


def unlearn_and_measure(clf, ckpt: dict[str, Any], data: UnlearningData, *, method: str,
                        params: Sequence[str] | None = None, retrained: tuple[Any, float] | None = None,
                        **knobs: Any) -> dict[str, Any]:
    """Unlearn in place (timed) and measure before/after (and against ``retrained`` = (model, seconds))."""
    from veil.lightning_modules.unlearning_module import FeatureUnlearningModule

    before = snapshot(clf)
    unlearner = FeatureUnlearningModule(clf, method=method, l2=ckpt["veil"].get("l2", {}), params=params, **knobs)
    residual_before = unlearner.gradient_residual(data.revised_train)
    cache = ckpt["veil"].get("train_features")
    start = time.perf_counter()
    info = unlearner.unlearn(train=data.train, changed=data.changed_positions, revised=data.revised_changed,
                             train_features=cache)
    seconds = time.perf_counter() - start
    check_only_selected_changed(before, clf, unlearner.names)
    report = base_report(method=method, params=params, info=info, data=data, seconds=seconds)
    report["gradient_residual"] = {"before": residual_before, "after": unlearner.gradient_residual(data.revised_train)}
    add_model_metrics(report, "before", before, data)
    add_model_metrics(report, "after", clf, data)
    if retrained is not None:
        model, retrain_seconds = retrained
        report["retrain_seconds"] = retrain_seconds
        report["speedup"] = retrain_seconds / max(seconds, 1e-9)
        report["gradient_residual"]["retrained"] = unlearner.gradient_residual(data.revised_train, model)
        add_model_metrics(report, "retrained", model, data)
        report["distance_to_retrained"] = distances(before, clf, model, unlearner.names)
    features = None
    if cache is not None and info["cached_features"]:  # the trunk is unchanged: only Z's rows move
        features = cache.clone()
        features[data.changed_positions] = features_of(clf, data.revised_changed[0])
    report["_train_features"] = features
    return report


def run_unlearn(*, model: str | Path, revision: str | Path, method: str, out: str | Path,
                compare_retrain: bool = False, params: Sequence[str] | None = None,
                **knobs: Any) -> dict[str, Any]:
    """Unlearn ``revision`` from the classifier checkpoint ``model``; write OUT/unlearned.ckpt and the report.

    ``knobs`` go to ``FeatureUnlearningModule`` (tau, damping, solver, cg_max_iter, lissa_scale,
    hessian_samples, ...).
    """
    out = Path(out)
    clf, ckpt = load_classifier(model)
    if clf.noise_conditional:
        raise ConfigError(f"--model {model}: a noise-conditional (guidance) classifier; unlearning updates "
                          "classifiers of clean images")
    data = UnlearningData.build(ckpt, revision)  # DataError on a revision of another dataset
    retrained = _retrain(ckpt, data.dm_rev, out / "retrained") if compare_retrain else None
    report = unlearn_and_measure(clf, ckpt, data, method=method, params=params, retrained=retrained, **knobs)
    ckpt["veil"]["train_features"] = report.pop("_train_features")
    out.mkdir(parents=True, exist_ok=True)
    save_unlearned(ckpt, clf, out / "unlearned.ckpt", revision=str(revision), record=report)
    (out / "unlearn_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ------------------------------------------------------------------------------------------ synthetic revisions
def synthetic_flip_revision(out, *, datamodule, fraction: float, attribute: str = "eyeglasses", seed: int = 0) -> Path:
    """A revision of ``fraction`` of the training images of a synthetic-faces datamodule, each re-rendered
    as the same person with ``attribute`` flipped (the benchmark's and the tests' stand-in for private edits)."""
    from veil.lightning_modules.data import synthetic_faces as sf
    from veil.lightning_modules.data.grid import uint8_to_tensor
    from veil.lightning_modules.data.revision import RevisionChange, write_revision

    if datamodule.source != "synthetic" or attribute not in datamodule.attribute_names:
        raise ConfigError(f"synthetic_flip_revision: needs synthetic faces with attribute {attribute!r}")
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction={fraction}: must be in (0, 1]")
    train = datamodule.split_indices("train")
    gen = torch.Generator().manual_seed(seed)
    picked = sorted(train[i] for i in torch.randperm(len(train), generator=gen)[: max(1, round(fraction * len(train)))])
    names, ds = datamodule.attribute_names, datamodule.dataset
    changes, images = [], {}
    for i in picked:
        rng = sf._item_rng(ds.seed, i)
        attrs = sf.draw_attributes(rng)  # the same draws as the dataset, so the same person ...
        original = {n: 1 if attrs[n] else -1 for n in names}
        attrs[attribute] = not attrs[attribute]  # ... with one attribute flipped
        images[ds.ids[i]] = uint8_to_tensor(sf.render_face(attrs, resolution=ds.resolution, rng=rng))
        changes.append(RevisionChange(ds.ids[i], original, {**original, attribute: -original[attribute]},
                                      protected=[attribute]))
    return write_revision(out, base_spec=datamodule.dataset_spec(), attribute_names=names, changes=changes,
                          images=images)
