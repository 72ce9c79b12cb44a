"""``veil train``: DP-SGD training of the attribute-conditional diffusion model.

    veil train --config synthetic32 --out runs/dp32

writes, every ``trainer.checkpoint_every_n_steps`` steps and at the end (a crash loses at most that
many steps):

* ``OUT/model/`` the release to share (``checkpoints.write_release``: weights, config, privacy record);
* ``OUT/privacy.json`` (epsilon, delta, noise multiplier, max grad norm, sample rate, steps,
  accountant, ``private`` and, when false, why) and ``OUT/config.json``;
* ``OUT/private/`` owner-only: ``last.ckpt`` (``--resume`` continues it, accounting included; a
  resume draws fresh secret noise) and ``logs/`` (per-step loss and batch size: un-noised statistics
  of the private batches).

The run is recorded in the dataset's privacy database before its first step
(``veil.jobs.dataset_account``). Everything that can be checked is checked before the first step,
including ``--out`` (not a file, writable, not being written by another run: ``veil.outputs.out_lock``
holds it for the whole run) and, on ``--resume``, that the privacy plan is the one the run started with.

A run that fails (a bad value found late, a diverged loss, Ctrl-C) before its first checkpoint
leaves nothing behind: what it created in ``--out`` is removed (a folder that existed before stays,
as does a run being resumed); its row in the privacy database is marked failed. A run that fails
later keeps its last checkpoint (``--resume`` continues it), and ``privacy.json`` then says
``"private": false`` with the reason: it is not a finished private model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import lightning as L

from veil import console
from veil.errors import ConfigError
from veil.jobs.config import TrainConfig
from veil.jobs.process_group import owned_process_group
from veil.outputs import check_out_dir, out_lock, staged_dir, write_json_atomic

# Known-harmless warnings that would bury the progress bar; each is explained here once.
KNOWN_WARNINGS = (
    # Opacus' hooks register full backward hooks; the UNet's first input does not require grad.
    "Full backward hook is firing when gradients are computed with respect to module outputs",
    # Manual optimisation: we want the checkpoint to hold the state *after* the optimizer step.
    "Using ModelCheckpoint with manual optimization",
    # No validation_step on purpose: a validation loss would leak outside the DP accounting.
    "You passed in a `val_dataloader` but have no `validation_step`",
    # Opacus' RDP order grid while solving sigma; the PRV accountant (default) is unaffected.
    "Optimal order is the",
    # Lightning internals on this torch version.
    "`isinstance(treespec, LeafSpec)` is deprecated",
)


def silence_known_warnings() -> None:
    import warnings

    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{re.escape(message)}.*")


def progress_bar(progress: bool) -> list:
    """Lightning's progress bar as a callback list: on stderr (stdout keeps the results), only when stderr is a
    terminal (``veil.console``'s heartbeat covers the rest), and reading "Epoch E/N" only when there is an epoch
    limit: a run by steps (``max_epochs`` -1) said "Epoch 0/-2"; it says "Epoch 0 (to step S)". Empty: no bar."""
    import sys

    if not progress or not sys.stderr.isatty():
        return []
    try:
        from lightning.pytorch.callbacks import RichProgressBar

        RichProgressBar()  # raises without rich
    except (ImportError, ModuleNotFoundError):
        from lightning.pytorch.callbacks import TQDMProgressBar  # "Epoch E", on stderr

        return [TQDMProgressBar()]

    class StepsAwareBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            t = self.trainer
            if t.max_epochs is not None and t.max_epochs > 0:
                return super()._get_train_description(current_epoch)
            return f"Epoch {current_epoch}" + (f" (to step {t.max_steps})" if t.max_steps and t.max_steps > 0 else "")

    return [StepsAwareBar(console_kwargs={"stderr": True})]


def other_rank() -> bool:
    """Whether this process is a DDP rank other than 0: those leave --out to rank 0, which made it (the
    ``keep`` of ``veil.outputs.staged_dir``: a failed rank > 0 removes nothing)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) != 0


def fit(trainer: L.Trainer, module, **kwargs) -> None:
    """``trainer.fit``, with Ctrl-C kept a KeyboardInterrupt (the CLI reports it in one line, exit 130):
    Lightning turns it into ``sys.exit(1)`` after its own graceful shutdown."""
    try:
        trainer.fit(module, **kwargs)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise


def mark_failed(out: Path, record: dict[str, Any], exc: BaseException) -> None:
    """Rewrite OUT/privacy.json of a run that failed after a checkpoint: it claims no guarantee."""
    kept = json.loads((out / "privacy.json").read_text()).get("steps")
    write_json_atomic(out / "privacy.json", {
        **record, "private": False, "status": "failed", "error": str(exc),
        "not_private_reason": f"the run failed at step {record.get('steps')} ({str(exc).split(';')[0]}); it is not a "
                              f"finished private model. OUT/model and OUT/private/last.ckpt hold step {kept}"})


class ReleaseWriter(L.Callback):
    """Keeps OUT/model (the release) and OUT/privacy.json current: at every checkpoint save and at the end."""

    def __init__(self, out: Path):
        self.out = out

    def _write(self, pl_module) -> None:
        from veil.lightning_modules.checkpoints import DIFFUSION_KIND, write_release

        weights, meta = pl_module.release()
        write_release(self.out, kind=DIFFUSION_KIND, weights=weights, meta=meta)
        write_json_atomic(self.out / "privacy.json", pl_module.privacy())

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.is_global_zero:
            self._write(pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._write(pl_module)


def build_datamodule(cfg: TrainConfig):
    from veil.lightning_modules.data.datamodule import FaceDataModule

    d = cfg.data
    return FaceDataModule(
        source=d.source, root=d.root, csv=d.csv, attributes=d.attributes, resolution=d.resolution,
        num_images=d.num_images, seed=cfg.seed, batch_size=d.batch_size, poisson=cfg.dp.enabled,
        val_fraction=d.val_fraction, test_fraction=d.test_fraction, revision=d.revision,
        num_workers=d.num_workers,
    )


def planned_steps(cfg: TrainConfig, sample_rate: float) -> int:
    steps_per_epoch = int(1 / sample_rate)
    if cfg.trainer.max_steps is not None:
        return cfg.trainer.max_steps
    return cfg.trainer.max_epochs * steps_per_epoch


def build_module(cfg: TrainConfig, dm):
    from veil.lightning_modules.diffusion_module import DPDiffusionModule

    model_kwargs = {"num_attributes": len(dm.attribute_names), "resolution": cfg.data.resolution, **cfg.model.kwargs()}
    return DPDiffusionModule(
        model_kwargs=model_kwargs, attribute_names=list(dm.attribute_names), train_size=dm.train_size,
        sample_rate=dm.sample_rate, planned_steps=planned_steps(cfg, dm.sample_rate), dp=cfg.dp.to_dict(),
        optimizer=cfg.optim.name, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, cond_drop_prob=cfg.optim.cond_drop_prob,
        attr_drop_prob=cfg.optim.attr_drop_prob, ema_decay=cfg.optim.ema_decay, data_spec=dm.spec(),
        trainable=cfg.optim.trainable, lr_scale=cfg.optim.lr_scale,
    )


def build_trainer(cfg: TrainConfig, out: Path, *, progress: bool = True, callbacks=()) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from veil.lightning_modules.checkpoints import private_dir

    t = cfg.trainer
    private = private_dir(out)  # owner-only: the resume state and the per-step statistics of private batches
    ckpt = ModelCheckpoint(dirpath=private, save_last=True, save_top_k=0, every_n_train_steps=t.checkpoint_every_n_steps)
    bar = progress_bar(progress)
    return L.Trainer(
        default_root_dir=out, max_epochs=t.max_epochs if t.max_steps is None else -1,
        max_steps=t.max_steps if t.max_steps is not None else -1, max_time=t.max_time,
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=t.precision,
        use_distributed_sampler=False,  # the DataModule shards and Poisson-samples itself
        callbacks=[ckpt, ReleaseWriter(out), *callbacks, *bar], logger=CSVLogger(private, name="logs"),
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=bool(bar),
        limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
    )


def run_training(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
                 ledger: str | Path | None = None) -> dict[str, Any]:
    """Train; return the privacy record (also written to OUT/privacy.json). ``ledger``: the dataset's
    privacy database (default: the one ``veil.privacy.ledger.ledger_path_for`` finds for the data)."""
    from veil.lightning_modules.checkpoints import PRIVATE_DIR

    out = Path(out)
    ckpt_path = out / PRIVATE_DIR / "last.ckpt"
    if cfg.model.init_from and not Path(cfg.model.init_from).exists():
        raise ConfigError(f"{cfg.model.init_from} does not exist; pass the run folder (or OUT/model) "
                          "of a veil train run on public data (see the shipped config synthetic32_public)",
                          option="model.init_from")
    # One run at a time into OUT (rank 0 holds it; the ranks it starts do not ask): a second run started
    # meanwhile is refused here, before any work, and records nothing. The checks below hold until it ends.
    with out_lock(out, skip=other_rank()) as lock:
        if resume and not ckpt_path.is_file():
            raise ConfigError(f": {ckpt_path} does not exist; start without --resume", option="--resume")
        if not resume and (ckpt_path.exists() or (out / "model").exists()):
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out",
                              option="--out")
        # Until the first checkpoint there is nothing to resume: a failure removes what this run created.
        started = lambda: resume or ckpt_path.exists() or (out / "model").exists()
        with staged_dir(out, in_place=True, created=lock.created, keep=lambda: started() or other_rank()):
            check_out_dir(out)  # writable, before any work (creates the folder)
            return _run(cfg, out, ckpt_path, resume=resume, progress=progress, ledger=ledger)


def _run(cfg: TrainConfig, out: Path, ckpt_path: Path, *, resume: bool, progress: bool,
         ledger: str | Path | None) -> dict[str, Any]:
    from veil.lightning_modules.checkpoints import seal_private
    from veil.jobs.dataset_account import DatasetAccount

    silence_known_warnings()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # initialisation, data, loss draws: NOT the DP noise
    dm = build_datamodule(cfg)
    dm.setup("fit")  # fails here, before training, on missing data or unknown attributes
    if cfg.dp.reproducible:  # tests/debugging only; the privacy record says "private": false
        dm.poisson_seed = cfg.dp.reproducible_noise_seed
    module = build_module(cfg, dm)
    if resume:
        check_resume(cfg, ckpt_path, module)
    if cfg.model.init_from and not resume:  # on resume the weights come from last.ckpt
        from veil.jobs.init_from import load_start

        module.hparams.initialized_from = load_start(module, cfg.model.init_from, data_spec=dm.spec())
    account = DatasetAccount(module=module, out=out, kind="diffusion", data_spec=dm.dataset_spec(),
                             planned_steps=module.hparams.planned_steps, ledger=ledger,
                             details={"config": cfg.to_dict()})
    account.check()  # refused here, before any step, if the dataset's training budget would be passed
    write_json_atomic(out / "config.json", cfg.to_dict())
    trainer = build_trainer(cfg, out, progress=progress, callbacks=[account])
    steps = f"{cfg.trainer.max_steps} steps" if cfg.trainer.max_steps is not None else f"{cfg.trainer.max_epochs} epochs"
    with owned_process_group(), console.stage(f"training ({steps})"):  # a heartbeat where no bar shows
        try:
            fit(trainer, module, datamodule=dm, ckpt_path=str(ckpt_path) if resume else None)
        except Exception as exc:  # a diverged run (dp.step) or a late error: no guarantee is claimed
            if trainer.is_global_zero and (out / "privacy.json").exists():
                mark_failed(out, module.privacy(), exc)
            raise
        trainer.save_checkpoint(ckpt_path)
    record = module.privacy()
    if trainer.is_global_zero:
        write_json_atomic(out / "privacy.json", record)
        seal_private(out)
    return record


PLAN_KEYS = ("enabled", "target_epsilon", "noise_multiplier", "max_grad_norm", "delta", "accountant",
             "noise_multiplicity", "reproducible_noise_seed")  # what decides sigma and the accounting


def check_resume(cfg: TrainConfig, ckpt_path: Path, module) -> None:
    """Refuse a resume whose privacy plan differs from the run's: a changed dp.* key, another data
    sample rate, or more steps under dp.target_epsilon (sigma was solved for the old plan, so the run
    would silently end above the target). An explicit re-plan is allowed: dp.target_epsilon null and
    dp.noise_multiplier equal to the run's sigma; the message says what epsilon that ends at."""
    import torch

    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hp = saved.get("hyper_parameters") or {}
    old_dp, new_dp = dict(hp.get("dp") or {}), cfg.dp.to_dict()
    sigma = float(((saved.get("veil") or {}).get("privacy") or {}).get("noise_multiplier") or 0.0)
    old_steps, new_steps = int(hp.get("planned_steps", 0)), int(module.hparams.planned_steps)
    if abs(float(hp.get("sample_rate", 0)) - module.hparams.sample_rate) > 1e-12:
        raise ConfigError(f": the data give sample rate {module.hparams.sample_rate:g}, the run was planned at "
                          f"{hp.get('sample_rate')}; resume with the run's data.* settings", option="--resume")
    explicit = (new_dp.get("target_epsilon") is None and new_dp.get("noise_multiplier") is not None
                and math.isclose(float(new_dp["noise_multiplier"]), sigma, rel_tol=1e-9))
    changed = [k for k in PLAN_KEYS if old_dp.get(k) != new_dp.get(k)
               and not (explicit and k in ("target_epsilon", "noise_multiplier"))]
    if changed:
        raise ConfigError(f": dp.{', dp.'.join(changed)} differ from the run's plan "
                          f"({', '.join(f'{k}={old_dp.get(k)!r}' for k in changed)}); a resumed run keeps its "
                          "privacy plan. Resume with those values, or start a new run in another --out",
                          option="--resume")
    if new_dp.get("enabled") and new_steps != old_steps and not explicit:
        from veil.jobs.dataset_account import planned_epsilon

        acc = module.accounting
        acc.noise_multiplier = sigma
        end = planned_epsilon(acc, planned_steps=new_steps)
        raise ConfigError(
            f": the run solved sigma = {sigma:.4f} for dp.target_epsilon over {old_steps} steps; continuing to "
            f"{new_steps} steps at that sigma ends at epsilon {end:.3f}, not the target. To do that on purpose, "
            f"pass --set dp.target_epsilon=null --set dp.noise_multiplier={sigma!r}; else keep the run's step count",
            option="--resume")


def describe(record: dict[str, Any]) -> str:
    if not record.get("enabled"):
        return f"non-private training: {record['steps']} steps, no privacy guarantee (epsilon = inf)"
    if not record.get("private", False):
        return (f"NOT PRIVATE: {record.get('not_private_reason', 'recorded before veil drew its noise from the OS')}; "
                f"{record['steps']} steps at sigma = {record['noise_multiplier']:.3f}")
    eps = record["epsilon"]
    eps_s = "inf (noise multiplier 0)" if eps is None or not math.isfinite(eps) else f"{eps:.3f}"
    start = record.get("initialized_from")
    note = ""
    if start:
        d = start.get("data_spec") or {}
        note = (f"; started from {start['path']} ({d.get('source')} data, seed {d.get('seed')}, "
                f"{'with' if start.get('used_attribute_labels') else 'without'} attribute labels), "
                "which this epsilon does not cover")
    if "trainable_parameters" in record:
        note += f"; {record['trainable_parameters']:,} parameters trained"
    return (
        f"privacy spent: epsilon = {eps_s} at delta = {record['delta']:.2e} "
        f"({record['accountant']} accountant; sigma = {record['noise_multiplier']:.3f}, C = {record['max_grad_norm']}, "
        f"q = {record['sample_rate']:.4f}, {record['steps']} steps){note}"
    )
