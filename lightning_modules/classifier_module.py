"""``AttributeClassifierModule``: training of ``AttributeClassifier``, optionally private by DP-SGD.

Training logic only; the network is ``models.classifier.AttributeClassifier`` and the DP plumbing
is ``dp/``, the same as ``DPDiffusionModule``'s (the one optimizer factory, the one chunked DP step
``dp.step.dp_training_step``, the accountant and the privacy record). Manual optimisation, so one
step is the same with and without DP:

1. a batch (Poisson-sampled under DP, shuffled otherwise, from ``FaceDataModule``);
2. ``dp_training_step`` with this module's loss, the mean BCE over the attributes (under DP: in
   physical chunks, clipped per sample, noised once per logical step);
   A noise-conditional model (``model_kwargs["noise_conditional"]``, the guidance classifier) is
   trained on x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps with t uniform over the diffusion
   schedule ``scheduler_config``; under DP each example's loss averages ``dp.noise_multiplicity``
   draws of (t, eps), so its one clipped gradient carries less sampling noise at no privacy cost;
3. Adam with an L2 term of ``head_l2`` on the head's parameters (coupled weight decay, i.e. the
   gradient of (head_l2 / 2) ||theta_head||^2, which is the objective unlearning differentiates).

The checkpoint carries ``checkpoint["veil"] = {"kind": "veil/attribute-classifier", "model_kwargs",
"attribute_names", "data_spec", "recipe", "privacy", "train_features", ...}`` so that unlearning and
retraining can rebuild model, data and recipe from it alone. ``train_features`` (non-private runs
only: they are computed from the data without noise) caches the training set's penultimate
features, so that unlearning the head needs no pass over the training images.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from veil.lightning_modules.checkpoints import CLASSIFIER_KIND
from veil.lightning_modules.diffusion.schedule import (
    alphas_cumprod_table,
    default_scheduler_config,
    q_sample,
)
from veil.lightning_modules.dp.accounting import AccountedModule, PrivacyAccounting
from veil.lightning_modules.dp.config import DPConfig
from veil.lightning_modules.dp.optimizer import dp_optimizer_for
from veil.lightning_modules.dp.step import dp_training_step
from veil.lightning_modules.models.classifier import AttributeClassifier, attribute_bce


class AttributeClassifierModule(AccountedModule, L.LightningModule):
    def __init__(
        self,
        *,
        model_kwargs: dict[str, Any],
        attribute_names: list[str],
        train_size: int,
        sample_rate: float,
        planned_steps: int,
        dp: dict[str, Any] | None = None,
        lr: float = 3e-3,
        head_l2: float = 1e-3,
        data_spec: dict[str, Any] | None = None,
        recipe: dict[str, Any] | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = AttributeClassifier(**model_kwargs)
        self.scheduler_config: dict[str, Any] | None = None  # the noise schedule of a noise-conditional model
        if self.model.noise_conditional:
            self.scheduler_config = dict(scheduler_config or default_scheduler_config())
            self.register_buffer("alphas_cumprod", alphas_cumprod_table(self.scheduler_config), persistent=False)
        self.dp_cfg = DPConfig(**(dp or {"enabled": False}))
        self.accounting = PrivacyAccounting(
            self.dp_cfg, train_size=train_size, sample_rate=sample_rate, planned_steps=planned_steps
        )
        self.train_features: torch.Tensor | None = None  # (N, D) cache for unlearning; never under DP
        self._grad_sampler = None  # Opacus GradSampleModule, kept out of the state dict

    def l2_coefficients(self) -> dict[str, float]:
        """The L2 term of the training objective, by parameter name of ``self.model``."""
        return {n: float(self.hparams.head_l2) for n, _ in self.model.head.named_parameters(prefix="head")}

    def configure_optimizers(self):
        head = list(self.model.head.parameters())
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("head.")]
        base = torch.optim.Adam([{"params": rest, "weight_decay": 0.0},
                                 {"params": head, "weight_decay": self.hparams.head_l2}], lr=self.hparams.lr)
        return dp_optimizer_for(self, base) if self.dp_cfg.enabled else base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def batch_loss(self, x: torch.Tensor, attrs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(mean loss over the rows, K): K rows per example (K noise draws of a noise-conditional model
        under DP, else 1), adjacent, so that ``dp.grad_sample.fold_noise_draws`` can fold them back."""
        if not self.model.noise_conditional:
            return attribute_bce(self.model(x), attrs).mean(), 1
        k = self.dp_cfg.noise_multiplicity if self.dp_cfg.enabled else 1
        x, attrs = x.repeat_interleave(k, 0), attrs.repeat_interleave(k, 0)
        t = torch.randint(0, len(self.alphas_cumprod), (x.shape[0],), device=x.device)
        x_t = q_sample(x, self.alphas_cumprod, t, torch.randn_like(x))
        return attribute_bce(self.model(x_t, t), attrs).mean(), k

    def training_step(self, batch, batch_idx):
        x, attrs = batch  # (B, 3, R, R) in [-1, 1], (B, k) in {-1, +1}
        loss = dp_training_step(self, self.optimizers(), x, attrs, chunk_loss=self.batch_loss,
                                params=list(self.model.parameters()))
        self.log("train/loss", loss, on_step=True, batch_size=max(len(x), 1))  # private statistic: owner-only
        return torch.tensor(loss)

    # ------------------------------------------------------------------- privacy + checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["veil"] = {
            "kind": CLASSIFIER_KIND,
            "model_kwargs": dict(self.hparams.model_kwargs),
            "attribute_names": list(self.hparams.attribute_names),
            "data_spec": self.hparams.data_spec,
            "recipe": self.hparams.recipe,
            "l2": self.l2_coefficients(),
            "scheduler_config": self.scheduler_config,
            **self.accounting.state_dict(),  # dp_steps, accountant_state
            "privacy": self.privacy(),
            "train_features": self.train_features,
        }
