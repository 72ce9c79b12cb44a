"""``AttributeClassifierModule``: training of ``AttributeClassifier``, optionally private by DP-SGD.

Training logic only; the network is ``classifier.AttributeClassifier`` and the DP plumbing is
``dp.py`` (the same as ``DPDiffusionModule``'s: Opacus per-sample hooks through
``dp.attach_grad_sampler``, ``veil.kernels.make_dp_optimizer``, the accountant and the privacy
record). Manual optimisation, so one step is the same with and without DP:

1. a batch (Poisson-sampled under DP, shuffled otherwise, from ``FaceDataModule``);
2. under DP, split into physical chunks of at most ``dp.max_physical_batch_size``; each chunk's
   mean BCE is back-propagated and the DP optimizer clips per sample, and at the last chunk adds
   noise and divides by the expected batch size (earlier chunks are virtual steps);
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

from veil.lightning_modules import dp as dplib
from veil.lightning_modules.classifier import CHECKPOINT_KIND, AttributeClassifier, attribute_bce


class AttributeClassifierModule(dplib.AccountedModule, L.LightningModule):
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
            from veil.lightning_modules.dp_diffusion_module import default_scheduler_config
            from veil.lightning_modules.editor import alphas_cumprod_table

            self.scheduler_config = dict(scheduler_config or default_scheduler_config())
            self.register_buffer("alphas_cumprod", alphas_cumprod_table(self.scheduler_config), persistent=False)
        self.dp_cfg = dplib.DPConfig(**(dp or {"enabled": False}))
        self.accounting = dplib.PrivacyAccounting(
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
        if not self.dp_cfg.enabled:
            return base
        if self._grad_sampler is None:
            object.__setattr__(self, "_grad_sampler", dplib.attach_grad_sampler(self.model))
        world = self.trainer.world_size if self._trainer is not None else 1
        from veil.lightning_modules.dp_diffusion_module import make_dp_optimizer

        return make_dp_optimizer(
            kernel=self.dp_cfg.kernel, optimizer=base, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.dp_cfg.max_grad_norm,
            expected_batch_size=self.hparams.sample_rate * self.hparams.train_size / world,
            distributed=world > 1, secure_mode=self.dp_cfg.secure_mode,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def batch_loss(self, x: torch.Tensor, attrs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(mean loss over the rows, K): K rows per example (K noise draws of a noise-conditional model
        under DP, else 1), adjacent, so that ``dp.fold_noise_draws`` can fold them back."""
        from veil.lightning_modules.dp_diffusion_module import q_sample

        if not self.model.noise_conditional:
            return attribute_bce(self.model(x), attrs).mean(), 1
        k = self.dp_cfg.noise_multiplicity if self.dp_cfg.enabled else 1
        x, attrs = x.repeat_interleave(k, 0), attrs.repeat_interleave(k, 0)
        t = torch.randint(0, len(self.alphas_cumprod), (x.shape[0],), device=x.device)
        x_t = q_sample(x, self.alphas_cumprod, t, torch.randn_like(x))
        return attribute_bce(self.model(x_t, t), attrs).mean(), k

    def _empty_grad_samples(self) -> None:
        for p in self.model.parameters():
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def _dp_step(self, opt, x: torch.Tensor, attrs: torch.Tensor) -> float:
        size = self.dp_cfg.max_physical_batch_size
        starts = list(range(0, len(x), size)) or [0]
        total = 0.0
        for i, s in enumerate(starts):
            xc, ac = x[s : s + size], attrs[s : s + size]
            if len(xc) == 0:
                self._empty_grad_samples()
            else:
                loss, k = self.batch_loss(xc, ac)
                self.manual_backward(loss)
                dplib.fold_noise_draws(self.model.parameters(), len(xc), k)
                total += float(loss.detach()) * len(xc)
            if i == len(starts) - 1:
                opt.step()  # clip + noise + divide by the expected batch size
            else:
                opt.optimizer.signal_skip_step(do_skip=True)  # virtual step: clip and accumulate
                opt.optimizer.step()
            opt.zero_grad(set_to_none=True)
        self.accounting.step()
        return total / max(len(x), 1)

    def training_step(self, batch, batch_idx):
        x, attrs = batch  # (B, 3, R, R) in [-1, 1], (B, k) in {-1, +1}
        opt = self.optimizers()
        if self.dp_cfg.enabled:
            if self._trainer is not None and hasattr(self.trainer.strategy.model, "require_backward_grad_sync"):
                self.trainer.strategy.model.require_backward_grad_sync = False  # the DP optimizer sums
            loss = self._dp_step(opt, x, attrs)
        else:
            loss_t, _ = self.batch_loss(x, attrs)
            self.manual_backward(loss_t)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.accounting.step()
            loss = float(loss_t.detach())
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=max(len(x), 1))
        return torch.tensor(loss)

    # ------------------------------------------------------------------- privacy + checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["veil"] = {
            "kind": CHECKPOINT_KIND,
            "model_kwargs": dict(self.hparams.model_kwargs),
            "attribute_names": list(self.hparams.attribute_names),
            "data_spec": self.hparams.data_spec,
            "recipe": self.hparams.recipe,
            "l2": self.l2_coefficients(),
            "scheduler_config": self.scheduler_config,
            **self.accounting.state_dict(),  # dp_steps, accountant_state, privacy
            "train_features": self.train_features,
        }
