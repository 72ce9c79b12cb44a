"""``DPDiffusionModule``: DDPM training of the attribute-conditional UNet, private by DP-SGD.

Training logic only; the network is ``unet.AttributeConditionalUNet`` and the DP plumbing is
``dp.py``. Manual optimisation, because one DP-SGD step is:

1. a logical batch drawn by Poisson sampling (rate q = batch_size / N, from the DataModule);
2. split into physical chunks of at most ``dp.max_physical_batch_size``; for each chunk the
   per-example loss (DDPM eps-MSE, averaged over K = ``dp.noise_multiplicity`` noise draws of the
   same example, as in DPDM) is back-propagated and Opacus's hooks fill ``p.grad_sample``;
3. the DP optimizer clips each example's gradient to C, sums, and, at the last chunk only,
   adds N(0, sigma^2 C^2) and divides by the expected batch size (virtual steps = skipped steps);
4. the accountant records one step at (sigma, q); EMA weights follow the parameters.

Under DDP each rank Poisson-samples its own shard at the global q, DDP's own gradient all-reduce
is switched off, and Opacus's ``DistributedDPOptimizer`` adds noise once (rank 0) and sums the
clipped gradients across ranks, so every rank applies the same update.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch

from veil.lightning_modules import dp as dplib
from veil.lightning_modules.finetune import freeze_all_but, lr_groups
from veil.lightning_modules.unet import AttributeConditionalUNet

CHECKPOINT_KIND = "veil/dp-diffusion"


def default_scheduler_config(num_train_timesteps: int = 1000) -> dict[str, Any]:
    """DDPM noise schedule shared by training, sampling, editing and export."""
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": True,
    }


def q_sample(x0: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward (noising) process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t (B,) or a scalar."""
    alpha_prod_t = alphas_cumprod[t].reshape(-1, 1, 1, 1)  # cumulative alpha at t
    return alpha_prod_t.sqrt() * x0 + (1 - alpha_prod_t).sqrt() * noise


class DPDiffusionModule(dplib.AccountedModule, L.LightningModule):
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
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler(**self.scheduler_config).alphas_cumprod.float()
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

        self.dp_cfg = dplib.DPConfig(**(dp or {}))
        self.accounting = dplib.PrivacyAccounting(
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
        if not self.dp_cfg.enabled:
            return base
        if self._grad_sampler is None:
            # object.__setattr__: not a registered submodule, or the state dict would hold the
            # UNet twice (the hooks live on self.model's layers anyway).
            object.__setattr__(self, "_grad_sampler", dplib.attach_grad_sampler(self.model))
        world = self.trainer.world_size if self._trainer is not None else 1
        expected = self.hparams.sample_rate * self.hparams.train_size / world  # per-rank E[|B|]
        return make_dp_optimizer(
            kernel=self.dp_cfg.kernel,
            optimizer=base,
            noise_multiplier=self.accounting.noise_multiplier,
            max_grad_norm=self.dp_cfg.max_grad_norm,
            expected_batch_size=expected,
            distributed=world > 1,
            secure_mode=self.dp_cfg.secure_mode,
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _disable_ddp_gradient_sync(self) -> None:
        # The DP optimizer sums clipped gradients across ranks itself; DDP's averaging of the
        # unclipped ones is wasted work and would hang a rank whose Poisson batch is empty.
        # Lightning re-enables the flag after every forward in manual optimisation, so this runs
        # at the start of every training step.
        if self.dp_cfg.enabled and self._trainer is not None:
            ddp = self.trainer.strategy.model
            if hasattr(ddp, "require_backward_grad_sync"):
                ddp.require_backward_grad_sync = False

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

    def _chunk_backward(self, x0: torch.Tensor, attrs: torch.Tensor, weight: float) -> float:
        k = self.dp_cfg.noise_multiplicity if self.dp_cfg.enabled else 1
        b = x0.shape[0]
        rows = self.per_row_loss(x0.repeat_interleave(k, 0), attrs.repeat_interleave(k, 0))
        loss = rows.mean()
        self.manual_backward(loss * weight)
        dplib.fold_noise_draws(self.trainable_parameters(), b, k)
        return float(loss.detach())

    def _empty_grad_samples(self) -> None:
        for p in self.trainable_parameters():
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    # ---------------------------------------------------------------- step
    def training_step(self, batch, batch_idx):
        x0, attrs = batch  # (B,3,H,W) in [-1,1], (B,k) in {-1,+1}; B random under Poisson sampling
        self._disable_ddp_gradient_sync()
        opt = self.optimizers()
        size = self.dp_cfg.max_physical_batch_size if self.dp_cfg.enabled else max(len(x0), 1)
        starts = list(range(0, len(x0), size)) or [0]
        losses = []
        for i, s in enumerate(starts):
            xc, ac = x0[s : s + size], attrs[s : s + size]
            last = i == len(starts) - 1
            if len(xc) == 0:
                self._empty_grad_samples()
            else:
                weight = 1.0 if self.dp_cfg.enabled else len(xc) / len(x0)
                losses.append(self._chunk_backward(xc, ac, weight) * len(xc))
            if self.dp_cfg.enabled:
                if last:
                    opt.step()  # noise + divide; Lightning counts this as the global step
                else:
                    # Virtual step: clip and accumulate only, straight on the DP optimizer so
                    # that Lightning's step counter (max_steps) counts logical steps.
                    opt.optimizer.signal_skip_step(do_skip=True)
                    opt.optimizer.step()
                opt.zero_grad(set_to_none=True)
        if not self.dp_cfg.enabled:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self._after_step()
        loss = sum(losses) / max(len(x0), 1)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=max(len(x0), 1))
        self.log("train/batch_size", float(len(x0)), on_step=True)
        return torch.tensor(loss)

    def _after_step(self) -> None:
        self.accounting.step()
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
            "kind": CHECKPOINT_KIND,
            "model_kwargs": dict(self.hparams.model_kwargs),
            "scheduler_config": dict(self.scheduler_config),
            "attribute_names": list(self.hparams.attribute_names),
            "data_spec": self.hparams.data_spec,
            **self.accounting.state_dict(),  # dp_steps, accountant_state, privacy
            "privacy": self.privacy(),
            "initialized_from": self.hparams.initialized_from,
        }

    def privacy(self) -> dict[str, Any]:
        """The accounting's record, plus where the weights started when ``model.init_from`` was set
        (epsilon covers this run's data only; the start's own record is inside)."""
        record = self.accounting.record()
        if self.hparams.initialized_from:
            record["initialized_from"] = self.hparams.initialized_from
        if self.num_trainable < sum(p.numel() for p in self.model.parameters()):
            record["trainable_parameters"] = self.num_trainable
        return record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.accounting.load_state_dict(checkpoint.get("veil", {}))
        self.hparams.initialized_from = checkpoint.get("veil", {}).get("initialized_from")
        if self.accounting.accountant is not None:
            self._epsilon_cache = self.epsilon()


def make_dp_optimizer(**kwargs):
    """The DP optimizer for ``dp.kernel``; ``veil.kernels`` owns the choice and the fused path."""
    from veil.kernels import make_dp_optimizer as _make

    kernel = kwargs.pop("kernel")
    if kernel == "auto":
        from veil.kernels import default_kernel

        # The fused kernels refuse secure_mode (they do not draw cryptographically secure noise).
        device = next(iter(kwargs["optimizer"].param_groups[0]["params"])).device
        kernel = "opacus" if kwargs.get("secure_mode") else default_kernel(device)
    return _make(kernel=kernel, **kwargs)
