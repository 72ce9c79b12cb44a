"""``veil train-classifier``: train the attribute classifier with its recipe, optionally with DP-SGD.

    veil train-classifier --data source=synthetic,num_images=3000 --out runs/clf

``train_classifier`` trains ``AttributeClassifier`` with the recipe (``ClassifierRecipe``, also
``lightning_modules/configs/classifier32.yaml``), optionally with DP-SGD, then (non-private runs,
``refit_head``) refits the head to the exact optimum of its L2-regularised logistic regression on
the frozen features. It writes

* ``OUT/model/``: the release to share (weights, model kwargs, attribute names, data spec, recipe,
  privacy record; ``checkpoints.write_classifier_release``);
* ``OUT/train_report.json``: public facts of the run (steps, seconds, privacy record);
* ``OUT/private/`` (owner-only): ``last.ckpt`` (``checkpoints.CLASSIFIER_KIND``, with the cached
  training features of a non-private run, so that unlearning the head needs no pass over the
  training images) and ``train_report.json`` with the accuracy on held-out private images, an
  un-noised statistic of private data.

The run is recorded in the dataset's privacy database first (``veil.jobs.dataset_account``). The
unlearning job's retraining baseline calls it with the recipe stored in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from veil import console
from veil.errors import ConfigError
from veil.lightning_modules.diffusion.schedule import q_sample
from veil.lightning_modules.dp.config import DPConfig
from veil.lightning_modules.models.classifier import accuracy, attribute_bce, predict
from veil.jobs.config import (
    apply_overrides,
    check_bool,
    check_float,
    check_int,
    positive_ints,
    read_yaml,
    resolve_config,
)
from veil.lightning_modules.unlearning import influence as U
from veil.outputs import check_out_dir, out_lock, staged_dir, write_json_atomic


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
        check_int(self.seed, "seed", minimum=0)
        check_int(self.epochs, "epochs", minimum=1)
        check_int(self.batch_size, "batch_size", minimum=1)
        self.lr, self.head_l2 = check_float(self.lr, "lr"), check_float(self.head_l2, "head_l2")
        if not self.lr > 0:
            raise ConfigError(f"must be > 0, got {self.lr}", option="lr")
        if self.head_l2 < 0:
            raise ConfigError(f"must be >= 0, got {self.head_l2}", option="head_l2")
        check_bool(self.refit_head, "refit_head")
        self.model = check_model_options(self.model)
        if not isinstance(self.dp, dict):
            raise ConfigError(f"must be a mapping of dp.* options (e.g. {{enabled: true, target_epsilon: 8}}), "
                              f"got {self.dp!r}", option="dp")
        unknown = sorted(set(self.dp) - {f.name for f in dataclasses.fields(DPConfig)})
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join('dp.' + str(u) for u in unknown)}; "
                              f"valid: {[f.name for f in dataclasses.fields(DPConfig)]}")
        dp = DPConfig(**self.dp)  # validates, naming the dp.* option
        self.dp = {k: v for k, v in dp.to_dict().items() if k in self.dp}  # "1e-6" read as a string -> 1e-06
        if dp.enabled and self.refit_head:
            raise ConfigError(": refitting the head on the data is not private; "
                              "set refit_head: false when dp.enabled is true", option="refit_head")
        if self.model.get("noise_conditional") and self.refit_head:
            raise ConfigError(": a noise-conditional (guidance) classifier's head is not a logistic "
                              "regression on fixed features; set refit_head: false with model.noise_conditional",
                              option="refit_head")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The recipe's model options: AttributeClassifier's keyword arguments, checked here so that a bad
# value is refused naming model.<key> rather than failing inside the network's constructor.
MODEL_OPTIONS = ("channels", "feature_dim", "norm_num_groups", "noise_conditional", "time_embedding_dim", "blocks")


def check_model_options(model: Any) -> dict[str, Any]:
    if not isinstance(model, dict):
        raise ConfigError(f"must be a mapping (e.g. {{channels: [16, 32, 64], feature_dim: 64}}), got {model!r}",
                          option="model")
    unknown = sorted(set(model) - set(MODEL_OPTIONS), key=str)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join('model.' + str(u) for u in unknown)}; "
                          f"valid: {list(MODEL_OPTIONS)}")
    model = dict(model)
    if "channels" in model:
        model["channels"] = positive_ints(model["channels"], "model.channels")
    for name in ("feature_dim", "norm_num_groups", "time_embedding_dim"):
        if name in model:
            check_int(model[name], f"model.{name}", minimum=1)
    if "blocks" in model:
        check_int(model["blocks"], "model.blocks", minimum=0)
    if "noise_conditional" in model:
        check_bool(model["noise_conditional"], "model.noise_conditional")
    channels, groups = model.get("channels", [16, 32, 64]), model.get("norm_num_groups", 8)
    if any(c % groups for c in channels):
        raise ConfigError(f"{channels} must all be divisible by model.norm_num_groups ({groups})",
                          option="model.channels")
    return model


def load_recipe(path: str | None, overrides: Sequence[str] = ()) -> tuple[ClassifierRecipe, dict[str, Any]]:
    """(recipe, data options) from a YAML file (keys of ClassifierRecipe plus a ``data`` section) and KEY=VALUE overrides."""
    raw: dict[str, Any] = {}
    path = resolve_config(path, kind="classifier")  # a file, or a shipped recipe's name (classifier32)
    if path is not None:
        raw = read_yaml(path) or {}  # a key given twice is refused, naming it and its lines
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a classifier recipe is a YAML mapping (see "
                              "the shipped classifier32)", option="--config")
    raw = apply_overrides(raw, list(overrides))
    data = raw.pop("data", None) or {}
    if isinstance(data, str):  # one --data string (data: folder:photos,csv=photos/labels.csv), as training configs
        from veil.data_arg import parse_data_arg

        data = parse_data_arg(data, option="data", keep_revision=True)
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(ClassifierRecipe)}, key=str)
    if unknown:
        raise ConfigError(f"unknown classifier option(s) {unknown}; valid: data, "
                          f"{[f.name for f in dataclasses.fields(ClassifierRecipe)]}")
    return ClassifierRecipe(**raw), check_data_options(data, flag="data")


# FaceDataModule's options a user may set for a classifier run (batch_size and poisson come from the recipe).
DATA_OPTIONS = ("source", "root", "csv", "attributes", "resolution", "num_images", "seed", "val_fraction",
                "test_fraction", "revision", "num_workers")


def check_data_options(data: Any, *, flag: str) -> dict[str, Any]:
    """``data`` (the recipe's ``data`` section, or ``--data``'s KEY=VALUE pairs) with its keys checked:
    a misspelt key is refused naming ``flag`` and the valid keys (with a guess), not silently ignored."""
    import difflib

    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping of data options, got {data!r}", option=flag)
    for key in data:
        if key in ("batch_size", "poisson"):
            raise ConfigError(f": {key} is set by the recipe, not the data; use --set batch_size=N "
                              "(poisson follows dp.enabled)", option=flag)
        if key not in DATA_OPTIONS:
            guess = difflib.get_close_matches(str(key), DATA_OPTIONS, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise ConfigError(f": unknown option {key!r}{hint}; valid: {', '.join(DATA_OPTIONS)}", option=flag)
    return dict(data)


# ------------------------------------------------------------------------------------------ evaluation
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
    x, attrs = data
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for f in fractions:
        t = min(int(f * len(alphas_cumprod)), len(alphas_cumprod) - 1)
        x_t = q_sample(x, alphas_cumprod.cpu(), torch.tensor(t), torch.randn(x.shape, generator=gen))
        out[str(t)] = accuracy(predict(model, x_t, t=t), attrs)
    return out


# ------------------------------------------------------------------------------------------ training
def _trainer(out: Path, epochs: int, progress: bool, callbacks=()) -> L.Trainer:
    from veil.jobs.train import progress_bar

    bar = progress_bar(progress)  # on stderr, on a terminal only
    return L.Trainer(default_root_dir=out, max_epochs=epochs, accelerator="cpu" if not torch.cuda.is_available()
                     else "auto", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=bool(bar), enable_model_summary=False, use_distributed_sampler=False,
                     limit_val_batches=0, num_sanity_val_steps=0, callbacks=[*callbacks, *bar])


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
                     datamodule=None, progress: bool = False, ledger: str | Path | None = None,
                     init: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train on ``data`` (FaceDataModule options) or a ready ``datamodule``; write OUT/model and
    OUT/private/last.ckpt; return a record (with the owner-only test accuracy). ``init``: a state dict
    of the same architecture to start from instead of a fresh initialisation (``fine_tune_classifier``).

    All or nothing: ``--out`` is checked (not a file, writable, not being written by another run:
    ``veil.outputs.out_lock`` holds it for the whole run) before any work, and when anything
    fails (a diverged loss, Ctrl-C) what this run created in ``--out`` is removed; the dataset's
    privacy database keeps the run's row, marked failed (``veil.jobs.dataset_account``)."""
    from veil.jobs.train import other_rank

    out = Path(out)
    with out_lock(out, skip=other_rank()) as lock:  # one run at a time into OUT: a second is refused before any work
        if (out / "private" / "last.ckpt").exists() or (out / "model").exists():
            raise ConfigError(f"{out} already holds a classifier; choose another --out", option="--out")
        with staged_dir(out, in_place=True, created=lock.created, keep=other_rank):
            check_out_dir(out)
            return _train(recipe, data, out, datamodule=datamodule, progress=progress, ledger=ledger, init=init)


def fine_tune_classifier(*, model, recipe: ClassifierRecipe, datamodule, epochs: int, out: str | Path,
                         lr: float | None = None, progress: bool = False) -> dict[str, Any]:
    """Continue training ``model``'s weights on ``datamodule`` (a revision: the baseline an owner would
    otherwise run instead of unlearning) for ``epochs`` with the recipe's optimizer (Adam, a fresh
    state) at ``lr`` (default: the recipe's / 10), without the head refit; writes OUT as
    ``train_classifier`` does (and, like every training run, counts in the dataset's account)."""
    check_int(epochs, "epochs", minimum=1)
    tuned = dataclasses.replace(recipe, epochs=epochs, lr=recipe.lr / 10 if lr is None else lr, refit_head=False)
    return train_classifier(recipe=tuned, datamodule=datamodule, out=out, progress=progress,
                            init={k: v.detach().clone() for k, v in model.state_dict().items()})


def _train(recipe: ClassifierRecipe, data: dict[str, Any] | None, out: Path, *, datamodule, progress: bool,
           ledger: str | Path | None, init: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    from veil.lightning_modules.checkpoints import (
        private_dir,
        seal_private,
        write_classifier_release,
    )
    from veil.lightning_modules.classifier_module import AttributeClassifierModule
    from veil.lightning_modules.data.datamodule import FaceDataModule
    from veil.jobs.dataset_account import DatasetAccount
    from veil.jobs.train import fit

    dm = datamodule or FaceDataModule(**{**check_data_options(data or {}, flag="--data"),
                                         "batch_size": recipe.batch_size, "poisson": bool(recipe.dp.get("enabled"))})
    dm.setup("fit")
    dp_seed = recipe.dp.get("reproducible_noise_seed")
    if dp_seed is not None and recipe.dp.get("enabled"):  # tests/debugging only: the record says not private
        dm.poisson_seed = dp_seed
    L.seed_everything(recipe.seed, verbose=False)  # initialisation and loss draws, NOT the DP noise
    steps = recipe.epochs * (int(1 / dm.sample_rate) if dm.poisson else dm.train_size // dm.batch_size)
    model_kwargs = {"num_attributes": len(dm.attribute_names), "resolution": dm.resolution, **recipe.model}
    module = AttributeClassifierModule(
        model_kwargs=model_kwargs, attribute_names=dm.attribute_names, train_size=dm.train_size,
        sample_rate=dm.sample_rate, planned_steps=max(steps, 1), dp=recipe.dp, lr=recipe.lr,
        head_l2=recipe.head_l2, data_spec=dm.spec(), recipe=recipe.to_dict(),
    )
    if init is not None:
        module.model.load_state_dict(init)
    account = DatasetAccount(module=module, out=out, kind="classifier", data_spec=dm.dataset_spec(),
                             planned_steps=max(steps, 1), ledger=ledger, details={"recipe": recipe.to_dict()})
    account.check()  # refused before training if the dataset's training budget would be passed
    private = private_dir(out)
    start = time.perf_counter()
    trainer = _trainer(out, recipe.epochs, progress, callbacks=[account])
    with console.stage(f"training the classifier ({recipe.epochs} epochs)"):  # a heartbeat every 10 s
        fit(trainer, module, datamodule=dm)  # every step checks loss and weights are finite (dp.step)
    newton = None
    if recipe.refit_head:
        x, attrs = tensors(dm.dataset, dm.split_indices("train"))
        feats = features_of(module.model, x)
        newton = refit_head(module.model, feats, attrs, l2=recipe.head_l2)
        module.train_features = feats  # non-private runs only (refit_head is refused under DP)
        if not all(bool(p.isfinite().all()) for p in module.model.head.parameters()):
            raise ConfigError(f": the head's refit did not converge (NaN or infinite weights); raise "
                              f"head_l2 (now {recipe.head_l2}) or set refit_head: false", option="refit_head")
    seconds = time.perf_counter() - start
    trainer.save_checkpoint(private / "last.ckpt")
    ckpt = {}
    module.on_save_checkpoint(ckpt)  # the same veil record the owner's checkpoint holds
    write_classifier_release(out, module.model, ckpt["veil"])
    public = {"checkpoint": str(out), "seconds": seconds, "steps": module.dp_steps,
              "head_newton_iterations": newton, "privacy": module.privacy()}
    write_json_atomic(out / "train_report.json", public)
    # Accuracy on held-out PRIVATE images: an un-noised statistic of private data, owner-only.
    test = tensors(dm.dataset, dm.split_indices("test"))
    owner = {"test_accuracy": _finite_or_none(test_accuracy(module.model, test))}  # None: no test images
    if module.model.noise_conditional:
        owner["test_accuracy_by_timestep"] = {t: _finite_or_none(a) for t, a in
                                              noisy_accuracy(module.model, module.alphas_cumprod, test).items()}
    write_json_atomic(private / "train_report.json", owner)
    seal_private(out)
    return {**public, **owner}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
