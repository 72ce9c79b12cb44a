"""K-FAC and EK-FAC preconditioners from curvlinops (``curvlinops-for-pytorch``), for the whole-network solve.

``library_preconditioner(obj, vec, batches, damping=..., kind="kfac" | "ekfac")`` returns v -> M v with
M ~ (G + diag(l2) + damping I)^-1, built like ``curvature.kfac_preconditioner`` but with the Kronecker
factors computed by curvlinops (Dangel et al.; ``KFACLinearOperator`` / ``EKFACLinearOperator``) and
inverted by its ``KFACInverseLinearOperator``:

- the layers it covers are ``curvature._plan``'s (Linear and Conv2d with groups=1, integer padding,
  called once per forward); every other selected parameter (GroupNorm's affine parameters, a
  'same'-padded or grouped convolution) gets the exact GGN diagonal, as in ``curvature``;
- the curvature is the GGN's ("type-2" Fisher: the exact Hessian of the loss in the logits, k
  backward passes per batch), the "expand" convention for convolutions (Eschenhagen et al. 2023),
  which is ``curvature.kfac_preconditioner``'s: ``tests/.../test_curvlinops_kfac.py`` checks that
  curvlinops' K-FAC matrix equals ours to rounding, so the two differ only in how they are damped;
- the damping is exact (``use_exact_damping``): (S (x) A + lambda I)^-1 through the factors'
  eigendecompositions, lambda = damping + the layers' L2 (one value: the mean L2 over the covered
  parameters, weighted by size; ``curvature`` uses each layer's own and pi-damping instead);
- ``kind="ekfac"``: eigenvalue-corrected K-FAC (George et al. 2018): the Kronecker eigenbasis with
  the diagonal re-fit to the GGN's second moments in that basis (one more pass over the batches,
  per-example gradients in the eigenbasis). Exact damping is the only one curvlinops offers for it.

The loss must be ``attribute_bce`` (BCE-with-logits, mean over the k attributes): it is curvlinops'
``BCEWithLogitsLoss(reduction="mean")`` over the N x k logits, the same objective. One process only:
curvlinops' factors are not summed over processes through ``reduce`` (``curvature`` does that).

Install: ``curvlinops-for-pytorch`` is a dependency of veil, but ``make setup`` installs it with
``--no-deps`` plus the packages it imports (einops, einconv, linear_operator, opt-einsum): its declared
dependency backpack-for-pytorch pulls torchvision, and PyPI's torchvision does not import beside the
CPU build of torch 2.13 that veil pins here ("operator torchvision::nms does not exist"), which breaks
``import lightning`` (torchmetrics imports torchvision when it is installed). On a CUDA torch a plain
``pip install curvlinops-for-pytorch`` is fine.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from veil.errors import ConfigError
from veil.lightning_modules.models.classifier import attribute_bce
from veil.lightning_modules.unlearning import curvature as CV
from veil.lightning_modules.unlearning.influence import Batches, Objective, Reduce, one_process

KINDS = ("kfac", "ekfac")


def _import_curvlinops():
    try:
        import curvlinops
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ConfigError("the curvlinops preconditioners need curvlinops-for-pytorch: `make setup` installs it "
                          "(or pip install --no-deps curvlinops-for-pytorch einops einconv linear_operator "
                          "opt-einsum on a CPU torch; see lightning_modules/unlearning/curvlinops_kfac.py)") from exc
    return curvlinops


def kfac_operator(obj: Objective, vec: torch.Tensor, batches: Batches, *, kind: str = "kfac"):
    """curvlinops' (E)K-FAC of the mean objective's GGN at ``vec`` over the covered layers.

    Returns (operator, model copy, the covered parameter names in flat order, fallback names); the
    operator acts on the covered parameters' sub-vector in that order.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r}: choose one of {KINDS}")
    if obj.loss is not attribute_bce:
        raise ConfigError("the curvlinops preconditioners take the classifier's attribute_bce loss "
                          f"(BCE-with-logits, mean over attributes), not {getattr(obj.loss, '__name__', obj.loss)}")
    cl = _import_curvlinops()
    layers, fallback = CV._plan(obj, CV._call_counts(obj, vec, batches))
    covered = [n for n in obj.names if n not in set(fallback)]
    model = copy.deepcopy(obj.module).eval()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in obj.unflatten(vec.detach()).items():
            params[name].copy_(value)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [params[n] for n in covered]
    for p in chosen:
        p.requires_grad_(True)
    data = [(x, (a + 1) * 0.5) for x, a in batches if len(x)]  # attrs {-1, +1} -> BCE targets {0, 1}
    if not data:
        raise ConfigError("K-FAC: no training samples to estimate it from (hessian_samples=0?)")
    op_class = cl.EKFACLinearOperator if kind == "ekfac" else cl.KFACLinearOperator
    op = op_class(model, nn.BCEWithLogitsLoss(reduction="mean"), chosen, data, fisher_type=cl.FisherType.TYPE2,
                  kfac_approx=cl.KFACType.EXPAND, check_deterministic=False, num_data=sum(len(x) for x, _ in data),
                  num_per_example_loss_terms=1, separate_weight_and_bias=False) if chosen else None
    return op, model, covered, fallback


def library_preconditioner(obj: Objective, vec: torch.Tensor, batches: Batches, *, damping: float,
                           kind: str = "kfac", reduce: Reduce = one_process) -> CV.Operator:
    """v -> M v ~ (G + diag(l2) + damping I)^-1 v: curvlinops' (E)K-FAC with exact damping on the covered
    Linear/Conv2d layers, the exact GGN diagonal on the other selected parameters (module docstring)."""
    if reduce is not one_process:
        raise ConfigError("the curvlinops preconditioners run in one process (their factors are not reduced "
                          "over processes): use --preconditioner kfac under DDP")
    if not damping >= 0:
        raise ConfigError(f"damping={damping}: must be a finite number >= 0")
    op, _, covered, fallback = kfac_operator(obj, vec, batches, kind=kind)
    offsets, start = {}, 0
    for name, size in zip(obj.names, obj.sizes):
        offsets[name] = torch.arange(start, start + size)
        start += size
    inverse, cov_index = None, None
    if op is not None:
        sizes = [obj.sizes[obj.names.index(n)] for n in covered]
        lam = damping + sum(float(obj.l2.get(n, 0.0)) * s for n, s in zip(covered, sizes)) / sum(sizes)
        if not lam > 0:
            raise ConfigError("K-FAC preconditioner: damping + l2 must be > 0; pass damping > 0")
        cl = _import_curvlinops()
        inverse = cl.KFACInverseLinearOperator(op, damping=lam, use_exact_damping=True)
        cov_index = torch.cat([offsets[n] for n in covered])
        op_dtype = next(obj.module.parameters()).dtype
    fb_index = fb_inverse = None
    if fallback:
        n = CV._sample_count(batches, reduce, "K-FAC")
        diag = {name: torch.zeros(obj.sizes[obj.names.index(name)], dtype=vec.dtype) for name in fallback}
        gen = torch.Generator().manual_seed(0)
        for x, a in batches:
            if len(x):
                with torch.no_grad():
                    logits = torch.func.functional_call(obj.module, obj.unflatten(vec.detach()), (x,), strict=False)
                directions = CV._loss_directions(obj, logits, a, None, gen)
                CV._accumulate_fallback_diagonal(obj, vec, x, torch.stack(directions), fallback, diag)
        parts = []
        for name in fallback:
            d = diag[name] / n + float(obj.l2.get(name, 0.0)) + damping
            if not bool((d > 0).all()):
                raise ConfigError(f"K-FAC preconditioner: {name} has zero curvature; pass damping > 0")
            parts.append(1.0 / d)
        fb_index, fb_inverse = torch.cat([offsets[n] for n in fallback]), torch.cat(parts)

    def precondition(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        if inverse is not None:
            sub = v[cov_index]
            out[cov_index] = (inverse @ sub.to(op_dtype)).to(v.dtype)  # the operator works in the model's dtype
        if fb_index is not None:
            out[fb_index] = v[fb_index] * fb_inverse.to(v.dtype)
        return out

    return precondition
