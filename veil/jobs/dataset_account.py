"""Every training run on a dataset is recorded in that dataset's privacy database, before it starts.

The database (``veil.privacy.ledger.PrivacyLedger``, one per dataset, found from the data spec or
given with ``--ledger``) accounts everything spent on the dataset: releases of edited images and
training runs. ``DatasetAccount`` is the Lightning callback both training jobs use:

1. ``check()`` (every rank, before ``trainer.fit``): a run whose planned epsilon would take the
   dataset past its training budget is refused before any step;
2. ``on_fit_start`` (rank 0): the run is recorded as "running" with its planned epsilon (an upper
   bound: the noisy checkpoints exist from the first save on, so a crash still counts);
   a resumed run continues its own row (``OUT/private/ledger_run.json``);
3. ``on_train_end`` / ``on_exception`` (rank 0): the row gets the epsilon actually spent.

Non-private runs (``dp.enabled: false``) and reproducible-noise runs count too, as unbounded
(epsilon infinite): their outputs carry no guarantee about the data they saw.

``RecordedRun`` does the same for a run that is not a Lightning fit: ``veil unlearn``, whose update
reads the private training set and the changed samples without noise (kind "unlearn", not private,
epsilon infinite).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L

from veil.lightning_modules.checkpoints import private_dir
from veil.outputs import write_json_atomic
from veil.privacy.ledger import PrivacyLedger

RUN_FILE = "ledger_run.json"


def planned_epsilon(accounting, *, planned_steps: int) -> float | None:
    """The epsilon the run will have spent after ``planned_steps`` steps (None: unbounded)."""
    if accounting.not_private_reason() is not None:
        return None
    if accounting.cfg.target_epsilon is not None:
        return float(accounting.cfg.target_epsilon)
    from veil.lightning_modules.dp.accounting import make_accountant

    acc = make_accountant(accounting.cfg.accountant)
    acc.history = [(accounting.noise_multiplier, accounting.sample_rate, int(planned_steps))]
    return float(acc.get_epsilon(delta=accounting.delta))


class DatasetAccount(L.Callback):
    """Records this run in the dataset's privacy database (see the module docstring)."""

    def __init__(self, *, module, out: str | Path, kind: str, data_spec: dict[str, Any], planned_steps: int,
                 ledger: str | Path | None = None, details: dict[str, Any] | None = None):
        self.module, self.out, self.kind = module, Path(out), kind
        self.data_spec, self.planned_steps, self.ledger_path = data_spec, planned_steps, ledger
        self.details = details or {}
        self.run_id: int | None = None

    def _ledger(self) -> PrivacyLedger:
        return PrivacyLedger.for_dataset(self.data_spec, path=self.ledger_path)

    def _planned(self) -> float | None:
        return planned_epsilon(self.module.accounting, planned_steps=self.planned_steps)

    def check(self) -> None:
        """PrivacyError now, before training, if this run would exceed the dataset's training budget."""
        with self._ledger() as ledger:
            budget = ledger.training_budget
            if budget is None:
                return
            if self._existing_run() is not None:
                return  # a resume: resume_training_run checks the re-planned spend
            spent, _ = ledger.training_spent()
            planned = self._planned()
            total = math.inf if planned is None else spent + planned
            if total > budget + 1e-12:
                from veil.errors import PrivacyError

                raise PrivacyError(
                    f"training refused: the dataset's training runs have spent epsilon {spent:g} of its training "
                    f"budget {budget:g} and this run plans {'an unbounded spend (not private)' if planned is None else f'{planned:g}'}; "
                    "lower dp.target_epsilon, or raise the budget explicitly with `veil privacy set-training-budget`")

    def _existing_run(self) -> int | None:
        path = self.out / "private" / RUN_FILE
        return int(json.loads(path.read_text())["run_id"]) if path.is_file() else None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        existing = self._existing_run()
        if existing is not None:  # --resume: the same run goes on, with its (possibly re-planned) spend
            with self._ledger() as ledger:
                ledger.resume_training_run(existing, planned_epsilon=self._planned())
            self.run_id = existing
        else:
            record = self.module.privacy()
            with self._ledger() as ledger:
                self.run_id = ledger.start_training_run(
                    run=str(self.out.resolve()), kind=self.kind, private=bool(record.get("private")),
                    planned_epsilon=self._planned(), delta=record.get("delta"),
                    details={"planned_steps": self.planned_steps, **self.details})
                where = str(ledger.path)
            write_json_atomic(private_dir(self.out) / RUN_FILE, {"run_id": self.run_id, "ledger": where})

    def _finish(self, status: str) -> None:
        if self.run_id is None:
            return
        record = self.module.privacy()
        epsilon = record.get("epsilon") if record.get("private") else None
        with self._ledger() as ledger:
            ledger.finish_training_run(self.run_id, epsilon=epsilon, delta=record.get("delta"),
                                       steps=int(record.get("steps", 0)), status=status)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._finish("finished")

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.is_global_zero:
            self._finish("failed")


class RecordedRun:
    """A run on the dataset that is not a Lightning fit (``veil unlearn``), recorded like ``DatasetAccount``'s.

        run = RecordedRun(out=out, kind="unlearn", data_spec=spec, details={...})
        run.check()          # PrivacyError now, before any work, if the training budget would be passed
        with run:            # "running" (budget checked again inside the write), then finished | failed
            ... compute, write OUT ...

    ``private`` False (the default) or ``planned_epsilon`` None: the run is unbounded (epsilon infinite), so
    the dataset's composed training spend becomes infinite and any finite training budget refuses it.
    Used on rank 0 only (the ranks it starts record nothing). ``where``: the database, once entered."""

    def __init__(self, *, out: str | Path, kind: str, data_spec: dict[str, Any], ledger: str | Path | None = None,
                 private: bool = False, planned_epsilon: float | None = None, delta: float | None = None,
                 details: dict[str, Any] | None = None):
        self.out, self.kind, self.data_spec, self.ledger_path = Path(out), kind, data_spec, ledger
        self.private, self.planned, self.delta = private, planned_epsilon, delta
        self.details = details or {}
        self.run_id: int | None = None
        self.where: str | None = None

    @property
    def cost(self) -> float:
        return self.planned if self.private and self.planned is not None else math.inf

    def _ledger(self) -> PrivacyLedger:
        return PrivacyLedger.for_dataset(self.data_spec, path=self.ledger_path)

    def check(self) -> None:
        """PrivacyError if this run would take the dataset's training runs past their training budget."""
        with self._ledger() as ledger:
            budget = ledger.training_budget
            if budget is None:
                return
            spent, _ = ledger.training_spent()
            if spent + self.cost > budget + 1e-12:
                from veil.errors import PrivacyError

                what = f"plans epsilon {self.cost:g}" if math.isfinite(self.cost) else \
                    "is not private (epsilon infinite: it reads the private data without noise)"
                raise PrivacyError(
                    f"{self.kind} refused: the dataset's training runs have spent epsilon {spent:g} of its training "
                    f"budget {budget:g} and this run {what}; nothing was computed. Raise or remove the budget "
                    "explicitly with `veil privacy set-training-budget` if that is really intended")

    def __enter__(self) -> "RecordedRun":
        with self._ledger() as ledger:
            self.run_id = ledger.start_training_run(
                run=str(self.out.resolve()), kind=self.kind, private=self.private, planned_epsilon=self.planned,
                delta=self.delta, details=self.details)
            self.where = str(ledger.path)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """finished, or failed when the block raised (its cost counts either way: the computation ran)."""
        if self.run_id is None:
            return
        epsilon = self.planned if self.private else None
        with self._ledger() as ledger:
            ledger.finish_training_run(self.run_id, epsilon=epsilon, delta=self.delta, steps=0,
                                       status="finished" if exc_type is None else "failed")
