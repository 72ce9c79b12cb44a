"""The training-run half of a dataset's privacy database (``ledger.PrivacyLedger`` mixes it in).

Every DP training run on a dataset is a row of ``training_runs``: started ("running", with its
planned epsilon) before its first step, reopened by a resume, finished or failed with what it spent.
Runs compose by basic composition, (sum of epsilons, sum of deltas); a non-private run, or one with
no epsilon bound, makes the sum infinite; a running run counts its planned epsilon, a failed one the
larger of planned and reported (its noisy checkpoints exist). The optional training budget caps the
sum and is checked, inside the write transaction, before a run starts or resumes (on PostgreSQL under the
advisory lock ``TRAINING_LOCK``, so two runs starting together cannot both pass it). Plain stdlib.
"""

from __future__ import annotations

import json
import math

from veil.errors import ConfigError, PrivacyError
from veil.privacy.db import utc_now
from veil.privacy.mechanism import check_epsilon

TOLERANCE = 1e-12  # epsilons this close count as equal (a spend exactly at the budget is allowed)
TRAINING_LOCK = "veil:training-runs"


class TrainingRunsMixin:
    """Training-run bookkeeping over ``self._db`` (a ``veil.privacy.db.Database``), ``self._write(*locks)`` (a
    write transaction) and ``self.training_budget``; see the module docstring."""

    def start_training_run(self, *, run: str, kind: str, private: bool, planned_epsilon: float | None,
                           delta: float | None, details: dict) -> int:
        """Record a DP training run about to start, after checking the training budget; returns its run_id.

        The run costs ``planned_epsilon`` (inf if not ``private`` or None); PrivacyError, before anything is
        trained, if the composed training epsilon plus that would pass ``training_budget``.
        """
        if not isinstance(run, str) or not run or not isinstance(kind, str) or not kind:
            raise ConfigError(f"training run: run={run!r} and kind={kind!r} must be non-empty strings")
        if not isinstance(private, bool):
            raise ConfigError(f"training run {run!r}: private={private!r} must be True or False")
        planned = None if planned_epsilon is None else check_epsilon(planned_epsilon, option="planned_epsilon")
        delta = self._check_delta(delta)
        try:
            details_json = json.dumps(dict(details))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"training run {run!r}: details must be a JSON-able dict ({e})") from None
        cost = planned if private and planned is not None else math.inf
        with self._write(TRAINING_LOCK) as tx:
            spent, cap = self.training_spent()[0], self.training_budget
            if cap is not None and spent + cost > cap + TOLERANCE:
                what = f"plans epsilon {cost:g}" if private and planned is not None else "is not private (epsilon inf)"
                raise PrivacyError(
                    f"training run {run!r} refused before it started: the dataset's training runs have spent "
                    f"epsilon {spent:g} (basic composition) of its training budget {cap:g}, and this run {what} "
                    f"({spent + cost:g} > {cap:g}); plan a smaller epsilon, or raise the budget with "
                    f"`veil privacy set-training-budget` if that is really intended")
            return tx.insert(
                "INSERT INTO training_runs (run, kind, private, planned_epsilon, delta, status, details, started_at)"
                " VALUES (?, ?, ?, ?, ?, 'running', ?, ?)", (run, kind, int(private), planned, delta, details_json,
                                                            utc_now()), returning="run_id")

    def resume_training_run(self, run_id: int, *, planned_epsilon: float | None) -> None:
        """Reopen run ``run_id`` for a ``--resume`` (status running again); its planned epsilon becomes the
        larger of the old and ``planned_epsilon`` (None: unbounded), budget-checked like a new run."""
        planned = None if planned_epsilon is None else check_epsilon(planned_epsilon, option="planned_epsilon")
        with self._write(TRAINING_LOCK) as tx:
            row = tx.execute("SELECT private, planned_epsilon, status, epsilon FROM training_runs"
                             " WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise ConfigError(f"training run {run_id}: no such run in {self.path}; was --ledger changed?")
            private, old, status, eps = row
            new = None if old is None or planned is None else max(old, planned)
            runs = [r for r in self.training_runs() if r["run_id"] != run_id]
            spent = sum(r["counted_epsilon"] for r in runs)
            cost = self._counted(private, "running", new, None)
            cap = self.training_budget
            if cap is not None and spent + cost > cap + TOLERANCE:
                raise PrivacyError(
                    f"resuming training run {run_id} refused: with its plan of epsilon {cost:g} the dataset's "
                    f"training runs would spend {spent + cost:g} > its training budget {cap:g}; keep the run's "
                    f"plan, or raise the budget with `veil privacy set-training-budget`")
            tx.execute("UPDATE training_runs SET status = 'running', planned_epsilon = ?, finished_at = NULL"
                       " WHERE run_id = ?", (new, run_id))

    def finish_training_run(self, run_id: int, *, epsilon: float | None, delta: float | None, steps: int,
                            status: str = "finished") -> None:
        """Close a running run with what it spent (``epsilon`` None = unbounded); status finished | failed."""
        if status not in ("finished", "failed"):
            raise ConfigError(f"status={status!r}: a run ends 'finished' or 'failed'")
        eps = None if epsilon is None else check_epsilon(epsilon)
        delta = self._check_delta(delta)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"steps={steps!r}: must be an integer >= 0")
        with self._write(TRAINING_LOCK) as tx:
            row = tx.execute("SELECT status FROM training_runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None or row[0] != "running":
                raise ConfigError(f"training run {run_id}: {'no such run' if row is None else row[0]}; "
                                  f"only a running run can be finished")
            tx.execute("UPDATE training_runs SET epsilon = ?, delta = COALESCE(?, delta), steps = ?, status = ?,"
                       " finished_at = ? WHERE run_id = ?", (eps, delta, steps, status, utc_now(), run_id))

    @staticmethod
    def _check_delta(delta) -> float | None:
        if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1):
            raise ConfigError(f"delta={delta!r}: must be a number in [0, 1), or None")
        return None if delta is None else float(delta)

    @staticmethod
    def _counted(private, status, planned, epsilon) -> float:
        """The epsilon a run counts with: finished -> its epsilon; running -> planned; failed -> the larger."""
        if not private:
            return math.inf
        inf = lambda x: math.inf if x is None else x  # noqa: E731
        if status == "finished":
            return inf(epsilon)
        return inf(planned) if status == "running" or epsilon is None else max(inf(planned), epsilon)

    def training_runs(self) -> list[dict]:
        cols = ("run_id", "run", "kind", "private", "planned_epsilon", "epsilon", "delta", "steps", "status",
                "details", "started_at", "finished_at")
        out = []
        for r in self._db.execute(f"SELECT {', '.join(cols)} FROM training_runs ORDER BY run_id"):
            d = dict(zip(cols, r))
            d.update(private=bool(d["private"]), details=json.loads(d["details"]),
                     counted_epsilon=self._counted(d["private"], d["status"], d["planned_epsilon"], d["epsilon"]))
            out.append(d)
        return out

    def training_spent(self) -> tuple[float, float]:
        """(sum of epsilons, sum of deltas) over every training run on the dataset: basic composition.

        Each run counts with ``counted_epsilon`` (inf if not private or unbounded; planned while running)."""
        runs = self.training_runs()
        return sum(r["counted_epsilon"] for r in runs), sum(r["delta"] or 0.0 for r in runs)
