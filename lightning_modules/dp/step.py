"""The one DP-SGD training step both LightningModules run (manual optimisation).

One logical step of ``dp_training_step``:

1. the logical batch (Poisson-sampled at rate q under DP, by the DataModule) is split into physical
   chunks of at most ``dp.max_physical_batch_size`` (without DP: one chunk, the whole batch);
2. per chunk, ``chunk_loss`` returns the mean loss over its rows and K, the rows per example (K
   noise draws under noise multiplicity, adjacent); it is back-propagated once, and
   - ``dp.engine: ghost`` (default): ``dp.ghost.GhostClipper`` takes each example's gradient norm
     (of the mean of its K rows) from the layers' stored activations and output gradients and
     leaves the chunk's clipped sum in ``p.grad``; no per-example gradient is materialised;
   - ``dp.engine: opacus``: Opacus's hooks fill ``p.grad_sample`` and the K rows of each example
     are folded into one per-sample gradient;
   an empty chunk (an empty Poisson batch) gets a zero clipped sum (ghost) or zero-row per-sample
   gradients (opacus), so the step still adds noise, as the accountant assumes;
3. the DP optimizer clips each example's gradient to C (opacus engine; ghost: already clipped) and
   accumulates; at the last chunk it adds
   N(0, sigma^2 C^2) and divides by the expected batch size (the earlier chunks are *virtual*
   steps, taken on the DP optimizer itself so that Lightning's step counter counts logical steps);
4. the accountant records one step at (sigma, q);
5. a loss or an updated parameter that is not finite stops the run (``ConfigError``): a diverged
   model is not a private model to release, and every later step would only spend budget on NaNs.
   The check runs before Lightning's end-of-step checkpoint, so the bad weights are never saved.

Under DDP, DDP's own gradient all-reduce is switched off (the DP optimizer sums clipped gradients
across ranks itself and adds the noise once; DDP's averaging of the unclipped ones is wasted work
and would hang a rank whose Poisson batch is empty). Lightning re-enables the flag after every
forward in manual optimisation, so it is switched off at the start of every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from veil.errors import ConfigError
from veil.lightning_modules.dp.grad_sample import empty_grad_samples, fold_noise_draws

ChunkLoss = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, int]"]  # (x, attrs) -> (mean loss, K)


def disable_ddp_gradient_sync(module) -> None:
    if module._trainer is not None:
        ddp = module.trainer.strategy.model
        if hasattr(ddp, "require_backward_grad_sync"):
            ddp.require_backward_grad_sync = False


def dp_training_step(module, opt, x: torch.Tensor, attrs: torch.Tensor, *, chunk_loss: ChunkLoss,
                     params: list[torch.nn.Parameter]) -> float:
    """One logical step (steps 1-4 above) of ``module`` (``dp_cfg``, ``accounting``, ``manual_backward``)
    with its optimizer ``opt``; ``params`` are the trained parameters. Returns the mean loss."""
    dp = module.dp_cfg.enabled
    ghost = getattr(module, "_ghost_clipper", None) if dp else None
    if dp:
        disable_ddp_gradient_sync(module)
    size = module.dp_cfg.max_physical_batch_size if dp else max(len(x), 1)
    starts = list(range(0, len(x), size)) or [0]
    total = 0.0
    for i, s in enumerate(starts):
        xc, ac = x[s : s + size], attrs[s : s + size]
        if len(xc) == 0:
            if ghost is not None:
                for p in params:
                    p.grad = torch.zeros_like(p)
            else:
                empty_grad_samples(params)
        else:
            loss, k = chunk_loss(xc, ac)
            if ghost is not None:
                ghost.backward_mean(loss, examples=len(xc), noise_multiplicity=k)  # autograd.grad, not manual_backward
            else:
                module.manual_backward(loss)
                fold_noise_draws(params, len(xc), k)
            total += float(loss.detach()) * len(xc)
        if dp:
            if i == len(starts) - 1:
                opt.step()  # clip + noise + divide; Lightning counts this as the global step
            else:
                opt.optimizer.signal_skip_step(do_skip=True)  # virtual step: clip and accumulate only
                opt.optimizer.step()
            opt.zero_grad(set_to_none=True)
    if not dp:
        opt.step()
        opt.zero_grad(set_to_none=True)
    module.accounting.step()
    loss = total / max(len(x), 1)
    check_finite(module.accounting.steps, loss, params)
    return loss


def check_finite(step: int, loss: float, params: list[torch.nn.Parameter]) -> None:
    """Step 5: ConfigError when the loss or a parameter is NaN or infinite. Parameters are the same
    on every rank after the step (the update is all-reduced), so all ranks stop together; the loss
    is this rank's own, so it is checked only in a single process (a non-finite loss anywhere makes
    the summed update, hence the parameters, non-finite a step later at most)."""
    single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    bad = "loss" if single and not math.isfinite(loss) else None
    if bad is None and params and not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
        bad = "weights"
    if bad is not None:
        raise ConfigError(f"training stopped at step {step}: the {bad} became NaN or infinite (the run diverged); "
                          "nothing of this step was saved. Lower the learning rate (optim.lr; lr for "
                          "train-classifier) or dp.max_grad_norm, and start again in a new --out")
