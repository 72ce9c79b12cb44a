"""``DPDiffusionModule``: DDPM training of the attribute-conditional UNet, private by DP-SGD.

Training logic only; the network is ``models.unet.AttributeConditionalUNet`` and the DP plumbing
is ``dp/``. Manual optimisation: each training step is ``dp.step.dp_training_step`` (Poisson batch,
physical chunks, per-sample clipping, noise once per logical step, accounting) with this module's
loss, the DDPM eps-MSE of each example averaged over K = ``dp.noise_multiplicity`` noise draws (as
in DPDM); then the EMA weights follow the parameters.

Under DDP each rank Poisson-samples its own shard at the global q, DDP's own gradient all-reduce
is switched off, and Opacus's ``DistributedDPOptimizer`` adds noise once (rank 0) and sums the
clipped gradients across ranks, so every rank applies the same update.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch

from veil.lightning_modules.checkpoints import DIFFUSION_KIND
from veil.lightning_modules.diffusion.schedule import (
    alphas_cumprod_table,
    default_scheduler_config,
    q_sample,
)
from veil.lightning_modules.dp.accounting import AccountedModule, PrivacyAccounting
from veil.lightning_modules.dp.config import DPConfig
from veil.lightning_modules.dp.optimizer import dp_optimizer_for
from veil.lightning_modules.dp.step import dp_training_step
from veil.lightning_modules.models.params import freeze_all_but, lr_groups
from veil.lightning_modules.models.unet import AttributeConditionalUNet


class DPDiffusionModule(AccountedModule, L.LightningModule):
    def __init__(
        self,
        *,
        model_kwargs: dict[str, Any],
        attribute_names: list[str],
        train_size: int,
        sample_rate: float,
        planned_steps: int,
        dp: dict[str, Any] | None = None,
        optimizer: str = "adamw",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        scheduler_config: dict[str, Any] | None = None,
        cond_drop_prob: float = 0.1,
        attr_drop_prob: float = 0.1,
        ema_decay: float = 0.999,
        data_spec: dict[str, Any] | None = None,
        trainable: list[str] | None = None,
        lr_scale: dict[str, float] | None = None,
        initialized_from: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = AttributeConditionalUNet(**model_kwargs)
        # optim.trainable: DP-SGD clips, noises and updates only these; the rest stay as loaded.
        self.num_trainable = freeze_all_but(self.model, trainable)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.scheduler_config = scheduler_config or default_scheduler_config()
        self.register_buffer("alphas_cumprod", alphas_cumprod_table(self.scheduler_config), persistent=False)

        self.dp_cfg = DPConfig(**(dp or {}))
        self.accounting = PrivacyAccounting(
            self.dp_cfg, train_size=train_size, sample_rate=sample_rate, planned_steps=planned_steps
        )
        self._grad_sampler = None  # Opacus GradSampleModule, not a registered submodule
        self._epsilon_cache = 0.0

    # ---------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        h = self.hparams
        params = lr_groups(self.model, h.lr, h.lr_scale)
        if h.optimizer == "sgd":
            base = torch.optim.SGD(params, lr=h.lr, weight_decay=h.weight_decay)
        else:
            base = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
        return dp_optimizer_for(self, base) if self.dp_cfg.enabled else base

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- loss
    def drop_attributes(self, attrs: torch.Tensor) -> torch.Tensor:
        """Classifier-free-guidance dropout: whole vector -> 0 w.p. p_cond, each entry w.p. p_attr."""
        b, k = attrs.shape
        keep_all = torch.rand(b, 1, device=attrs.device) >= self.hparams.cond_drop_prob
        keep_each = torch.rand(b, k, device=attrs.device) >= self.hparams.attr_drop_prob
        return attrs * (keep_all & keep_each).to(attrs.dtype)

    def per_row_loss(self, x0: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        """DDPM eps-prediction MSE, one value per row: x0 (R,3,H,W), attrs (R,k) -> (R,)."""
        t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = q_sample(x0, self.alphas_cumprod, t, noise)
        eps_hat = self.model(x_t, t, self.drop_attributes(attrs))
        return (eps_hat - noise).pow(2).mean(dim=(1, 2, 3))

    def chunk_loss(self, x0: torch.Tensor, attrs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(mean loss, K) of a physical chunk: each example repeated K times (adjacent rows), K noise draws."""
        k = self.dp_cfg.noise_multiplicity if self.dp_cfg.enabled else 1
        rows = self.per_row_loss(x0.repeat_interleave(k, 0), attrs.repeat_interleave(k, 0))
        return rows.mean(), k

    # ---------------------------------------------------------------- step
    def training_step(self, batch, batch_idx):
        x0, attrs = batch  # (B,3,H,W) in [-1,1], (B,k) in {-1,+1}; B random under Poisson sampling
        loss = dp_training_step(self, self.optimizers(), x0, attrs, chunk_loss=self.chunk_loss,
                                params=self.trainable_parameters())
        self._after_step()
        # Un-noised functions of the private batch: logged to the owner-only OUT/private/logs only
        # (veil/jobs/train.py), never shown on the progress bar, never in the release.
        self.log("train/loss", loss, on_step=True, batch_size=max(len(x0), 1))
        self.log("train/batch_size", float(len(x0)), on_step=True)
        return torch.tensor(loss)

    def _after_step(self) -> None:
        if self.accounting.accountant is not None:
            if self.dp_steps % 25 == 0 or self.dp_steps == 1:
                self._epsilon_cache = self.epsilon()
            self.log("privacy/epsilon", self._epsilon_cache, prog_bar=True, on_step=True)
        decay = min(self.hparams.ema_decay, (1 + self.dp_steps) / (10 + self.dp_steps))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p.detach(), 1 - decay)

    def on_train_epoch_end(self):
        if self.accounting.accountant is not None:
            self._epsilon_cache = self.epsilon()
            self.log("privacy/epsilon", self._epsilon_cache, prog_bar=True)

    # ---------------------------------------------------------------- privacy + checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["veil"] = {
            "kind": DIFFUSION_KIND,
            "model_kwargs": dict(self.hparams.model_kwargs),
            "scheduler_config": dict(self.scheduler_config),
            "attribute_names": list(self.hparams.attribute_names),
            "data_spec": self.hparams.data_spec,
            **self.accounting.state_dict(),  # dp_steps, accountant_state
            "privacy": self.privacy(),
            "initialized_from": self.hparams.initialized_from,
        }

    def release(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(weights, meta) of the shareable model release (``checkpoints.write_release``): the EMA and raw
        weights, what rebuilds the model, and the privacy record; no optimizer or noise state."""
        weights = {**{f"ema.{k}": v for k, v in self.ema.state_dict().items()},
                   **{f"model.{k}": v for k, v in self.model.state_dict().items()}}
        meta = {"model_kwargs": dict(self.hparams.model_kwargs), "scheduler_config": dict(self.scheduler_config),
                "attribute_names": list(self.hparams.attribute_names), "data_spec": self.hparams.data_spec,
                "cond_drop_prob": self.hparams.cond_drop_prob, "initialized_from": self.hparams.initialized_from,
                "privacy": self.privacy()}
        return weights, meta

    def privacy_provenance(self) -> dict[str, Any]:
        """Where the weights started when ``model.init_from`` was set, and how many were trained if a subset."""
        subset = self.num_trainable < sum(p.numel() for p in self.model.parameters())
        return {"initialized_from": self.hparams.initialized_from,
                "trainable_parameters": self.num_trainable if subset else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.accounting.load_state_dict(checkpoint.get("veil", {}))
        self.hparams.initialized_from = checkpoint.get("veil", {}).get("initialized_from")
        if self.accounting.accountant is not None:
            self._epsilon_cache = self.epsilon()

