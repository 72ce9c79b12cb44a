"""The math of feature unlearning: gradient differences, Hessian-vector products, CG, LiSSA, Newton.

Convention (one scaling everywhere). The training objective over the N training samples is the
*mean* loss plus an L2 term on some parameters,

    L(theta) = (1/N) sum_i loss(z_i; theta) + sum_p (l2_p / 2) theta_p^2,

and H = grad^2 L(theta) is its Hessian (so the L2 coefficients sit on H's diagonal). With Z the
changed samples as trained on and Z~ their revision,

    g = grad[ sum_{Z~} loss - sum_{Z} loss ](theta)          (a *sum*, as in Warnecke et al.)

and the revised objective is L~ = L + g-term / N, so grad L~(theta) = grad L(theta) + g / N. Then

    first order:   theta <- theta - tau * g / N
    second order:  theta <- theta - tau * (H + damping I)^-1 g / N      (tau = 1: the influence step)

``tau=None`` for first order takes the minimal-residual step along g, tau = (g.Ag) / (Ag.Ag) with
A = H + damping I: it minimises ||g/N - tau A g/N||, the revised gradient predicted by the quadratic
model, so the gradient residual cannot grow (to second order); one HVP, no learning rate to tune.
(H + damping I)^-1 g comes from conjugate gradients (stops at negative curvature, which a
non-convex network's H can have: raise damping then) or LiSSA (converges when
``lissa_scale`` exceeds H's largest eigenvalue; ``largest_eigenvalue`` estimates it).

Parameters are handled as one flat vector over a *subset* S of a module's parameters
(``torch.func.functional_call`` with the others left as they are), so updates touch S only.
Hessian-vector products are double backward by default (``mode="forward"``: ``torch.func.jvp(grad(f))``,
the same numbers, slower on CPU); the head's Hessian also has a closed form.

Distributed: the functions here know nothing of processes. Every sum over samples (gradients,
HVPs, Hessians, losses, sample counts) goes through ``reduce``, the sum of a tensor over the
processes that share the data (the default, ``one_process``, returns it as it is). Under
``FeatureUnlearningModule`` each rank passes its shard and its strategy's sum, so every rank
computes the update of one process with all the data. ``reduce`` must return the same bits on
every rank: the solvers branch on what it returns (CG's stopping tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from veil.errors import ConfigError

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # [(inputs (B, ...), attrs (B, k)), ...], reusable
Reduce = Callable[[torch.Tensor], torch.Tensor]  # t -> sum of t over the processes sharing the data


def one_process(t: torch.Tensor) -> torch.Tensor:
    """The sum over processes when there is one: ``t`` itself."""
    return t


# --------------------------------------------------------------------------------------- subsets
def select_parameter_names(module: nn.Module, prefixes: Sequence[str] | None = None) -> list[str]:
    """Names of ``module``'s trainable parameters that start with one of ``prefixes`` (all when None)."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    if prefixes is None:
        return names
    prefixes = [p for p in prefixes if p]
    chosen = [n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)]
    if not chosen:
        raise ConfigError(f"{list(prefixes)}: no parameter matches; names look like {names[:4]}", option="--params")
    return chosen


@dataclass
class Objective:
    """L(theta_S) over the parameters ``names`` of ``module``; see the module docstring.

    ``loss(logits, attrs) -> (B,)`` is the per-sample loss; ``l2`` maps parameter names to their
    L2 coefficient (missing: 0). The other parameters of ``module`` stay fixed.
    """

    module: nn.Module
    names: list[str]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    l2: dict[str, float]

    def __post_init__(self):
        params = dict(self.module.named_parameters())
        unknown = [n for n in self.names if n not in params]
        if unknown or not self.names:
            raise ConfigError(f"parameters {unknown or self.names}: not parameters of {type(self.module).__name__}")
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.l2_vector = torch.cat([torch.full((s,), float(self.l2.get(n, 0.0))) for n, s in zip(self.names, self.sizes)])

    def flat(self) -> torch.Tensor:
        """The current values of the selected parameters as one vector (P,)."""
        params = dict(self.module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, vec.split(self.sizes), self.shapes)}

    @torch.no_grad()
    def assign(self, vec: torch.Tensor) -> None:
        """Write ``vec`` into the selected parameters (the others are untouched)."""
        params = dict(self.module.named_parameters())
        for n, t in self.unflatten(vec).items():
            params[n].copy_(t)

    def sum_loss(self, vec: torch.Tensor, x: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        """sum_i loss(z_i; theta) over one batch, theta_S = vec (no L2 term)."""
        logits = functional_call(self.module, self.unflatten(vec), (x,), strict=False)
        return self.loss(logits, attrs).sum()


# --------------------------------------------------------------------------------------- derivatives
def gradient_sum(obj: Objective, vec: torch.Tensor, batches: Batches, *,
                 reduce: Reduce = one_process) -> tuple[torch.Tensor, int]:
    """(sum_i grad loss(z_i), number of samples) over ``batches``, summed over processes."""
    total = torch.zeros_like(vec)
    count = 0
    g = grad(obj.sum_loss)
    for x, a in batches:
        if len(x):
            total += g(vec, x, a)
            count += len(x)
    counts = reduce(torch.tensor([float(count)], dtype=vec.dtype))
    return reduce(total), int(counts.item())


def gradient_difference(obj: Objective, vec: torch.Tensor, *, original: Batches, revised: Batches,
                        reduce: Reduce = one_process) -> torch.Tensor:
    """g = grad[ sum_{Z~} loss - sum_{Z} loss ] at vec: Z = ``original`` (as trained on), Z~ = ``revised``."""
    g_new, n_new = gradient_sum(obj, vec, revised, reduce=reduce)
    g_old, n_old = gradient_sum(obj, vec, original, reduce=reduce)
    if n_new != n_old:
        raise ConfigError(f"gradient_difference: {n_old} original samples but {n_new} revised ones; pair them")
    return g_new - g_old


def objective_gradient(obj: Objective, vec: torch.Tensor, batches: Batches, *,
                       reduce: Reduce = one_process) -> torch.Tensor:
    """grad L(vec) = mean gradient over ``batches`` + l2 * vec: the gradient residual when batches is revised."""
    total, count = gradient_sum(obj, vec, batches, reduce=reduce)
    return total / max(count, 1) + obj.l2_vector.to(vec.dtype) * vec


def _batch_hvp_reverse(obj: Objective, vec: torch.Tensor, v: torch.Tensor, x, a) -> torch.Tensor:
    """H_batch v by reverse-over-reverse (double backward): on CPU several times faster than jvp(grad)."""
    w = vec.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(obj.sum_loss(w, x, a), w, create_graph=True)
    (hv,) = torch.autograd.grad(g, w, grad_outputs=v)
    return hv


def make_hvp(obj: Objective, vec: torch.Tensor, batches: Batches, *, damping: float = 0.0,
             mode: str = "reverse", reduce: Reduce = one_process) -> Callable:
    """v -> (H + damping I) v, H the Hessian of the mean objective over ``batches`` at vec.

    ``mode``: "reverse" (double backward) or "forward" (``torch.func.jvp(grad(f))``, forward-over-reverse);
    the two agree (tested), reverse is faster on CPU.
    """
    if mode not in ("reverse", "forward"):
        raise ConfigError(f"hvp mode {mode!r}: choose 'reverse' or 'forward'")
    g = grad(obj.sum_loss)
    n_local = sum(len(x) for x, _ in batches)
    n = int(reduce(torch.tensor([float(n_local)])).item())
    if n == 0:
        raise ConfigError("Hessian: no training samples to estimate it from (hessian_samples=0?)")

    def hvp(v: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(vec)
        for x, a in batches:
            if not len(x):
                continue
            if mode == "forward":
                total += jvp(lambda w: g(w, x, a), (vec,), (v,))[1]  # forward-over-reverse: H_batch v
            else:
                total += _batch_hvp_reverse(obj, vec, v, x, a)
        return reduce(total) / n + (obj.l2_vector + damping) * v

    return hvp


def dense_hessian(obj: Objective, vec: torch.Tensor, batches: Batches, *,
                  reduce: Reduce = one_process) -> torch.Tensor:
    """The full (P, P) Hessian of the mean objective, by vmap over jvp(grad) (for small P: a head)."""
    g = grad(obj.sum_loss)
    eye = torch.eye(len(vec), dtype=vec.dtype)
    total = torch.zeros(len(vec), len(vec), dtype=vec.dtype)
    count = 0
    for x, a in batches:
        if len(x):
            total += vmap(lambda v: jvp(lambda w: g(w, x, a), (vec,), (v,))[1])(eye)  # rows = columns
            count += len(x)
    n = reduce(torch.tensor([float(count)], dtype=vec.dtype))
    return reduce(total) / n + torch.diag(obj.l2_vector.to(vec.dtype))


def logistic_head_hessian(obj: Objective, vec: torch.Tensor, batches: Batches, *,
                          reduce: Reduce = one_process) -> torch.Tensor:
    """The same Hessian in closed form for a Linear head under ``attribute_bce`` (mean over k attributes):

    block j (row j of the weight and bias j) = (1/(N k)) sum_i s_ij (1 - s_ij) [f_i; 1][f_i; 1]^T + L2,
    s_ij = sigmoid(logit_ij); attributes do not interact. Milliseconds instead of P HVPs.
    """
    k, d = obj.shapes[0]
    weight, bias = vec[: k * d].view(k, d), vec[k * d :]
    blocks = torch.zeros(k, d + 1, d + 1, dtype=vec.dtype)
    count = 0
    for x, _ in batches:
        if len(x):
            xt = torch.cat([x.to(vec.dtype), torch.ones(len(x), 1, dtype=vec.dtype)], dim=1)  # (B, d+1)
            s = torch.sigmoid(x.to(vec.dtype) @ weight.T + bias)  # (B, k)
            blocks += torch.einsum("bj,bp,bq->jpq", s * (1 - s), xt, xt)
            count += len(x)
    n = reduce(torch.tensor([float(count)], dtype=vec.dtype))
    blocks = reduce(blocks) / (n * k)
    hessian = torch.zeros(len(vec), len(vec), dtype=vec.dtype)
    for j in range(k):
        idx = torch.cat([torch.arange(j * d, (j + 1) * d), torch.tensor([k * d + j])])
        hessian[idx.unsqueeze(1), idx] = blocks[j]
    return hessian + torch.diag(obj.l2_vector.to(vec.dtype))


def is_logistic_head(obj: Objective) -> bool:
    from veil.lightning_modules.models.classifier import attribute_bce

    return isinstance(obj.module, nn.Linear) and obj.names == ["weight", "bias"] and obj.loss is attribute_bce


# --------------------------------------------------------------------------------------- solvers
@dataclass
class SolveInfo:
    iterations: int
    relative_residual: float  # ||A x - b|| / ||b||
    stopped: str  # "converged" | "max_iter" | "negative_curvature"


def conjugate_gradient(apply: Callable, b: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-5):
    """Solve A x = b for symmetric A (given as ``apply``); stop at ||r|| <= tol ||b|| or p.Ap <= 0."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r.dot(r)
    b_norm = b.norm().clamp_min(1e-30)
    stopped, k = "max_iter", 0
    for k in range(1, max_iter + 1):
        ap = apply(p)
        curvature = p.dot(ap)
        if curvature <= 0:
            stopped, k = "negative_curvature", k - 1
            break
        alpha = rr / curvature
        x, r = x + alpha * p, r - alpha * ap
        rr_new = r.dot(r)
        if rr_new.sqrt() <= tol * b_norm:
            stopped = "converged"
            break
        p, rr = r + (rr_new / rr) * p, rr_new
    if stopped == "negative_curvature" and k == 0:
        raise ConfigError("conjugate gradients met negative curvature at once: the damped Hessian is not "
                          "positive definite along g; raise damping")
    info = SolveInfo(k, float((apply(x) - b).norm() / b_norm), stopped)
    return x, info


def largest_eigenvalue(apply: Callable, dim: int, *, iterations: int = 20, seed: int = 0,
                       dtype: torch.dtype = torch.float32, reduce: Reduce = one_process) -> float:
    """Power iteration: |lambda_max| of the symmetric operator ``apply`` (to pick LiSSA's scale)."""
    gen = torch.Generator().manual_seed(seed)
    v = reduce(torch.randn(dim, generator=gen, dtype=dtype))  # the same start on every process
    v = v / v.norm()
    lam = 0.0
    for _ in range(iterations):
        w = apply(v)
        lam = float(w.norm())
        v = w / max(lam, 1e-30)
    return lam


def lissa(apply: Callable, b: torch.Tensor, *, scale: float, iterations: int = 200):
    """LiSSA: A^-1 b ~ (1/scale) sum_j (I - A/scale)^j b, by v <- b + v - A v / scale.

    Converges when A is positive definite and ``scale`` > its largest eigenvalue.
    """
    if not scale > 0:
        raise ConfigError(f"lissa_scale={scale}: must be > 0 (above the Hessian's largest eigenvalue)")
    v = b.clone()
    for _ in range(iterations):
        v = b + v - apply(v) / scale
        if not torch.isfinite(v).all():
            raise ConfigError(f"LiSSA diverged: raise lissa_scale (now {scale}) or damping")
    x = v / scale
    info = SolveInfo(iterations, float((apply(x) - b).norm() / b.norm().clamp_min(1e-30)), "max_iter")
    return x, info


def objective_value(obj: Objective, vec: torch.Tensor, batches: Batches, *, reduce: Reduce = one_process) -> float:
    """L(vec): mean loss over ``batches`` (summed over processes) plus the L2 term."""
    with torch.no_grad():
        total = sum((obj.sum_loss(vec, x, a) for x, a in batches if len(x)), torch.zeros((), dtype=vec.dtype))
        count = sum(len(x) for x, _ in batches)
        sums = reduce(torch.stack([total, torch.tensor(float(count), dtype=vec.dtype)]))
    return float(sums[0] / sums[1] + 0.5 * (obj.l2_vector.to(vec.dtype) * vec * vec).sum())


def newton_minimize(obj: Objective, vec: torch.Tensor, batches: Batches, *, max_iter: int = 20,
                    tol: float = 1e-9, reduce: Reduce = one_process) -> tuple[torch.Tensor, int]:
    """Minimise the mean objective over ``batches`` by damped Newton (for a convex, small subset).

    In float64, so the optimum is found to float32 precision; the step is halved until the objective
    decreases (pure Newton can overshoot on logistic regression far from its optimum); stops when
    ||grad|| <= tol. The Hessian is in closed form for a logistic head, by vmap(jvp(grad)) otherwise.
    Returns (vec, Newton steps taken).
    """
    dtype = vec.dtype
    vec = vec.double()
    batches = [(x.double(), a.double()) for x, a in batches]
    hessian_of = logistic_head_hessian if is_logistic_head(obj) else dense_hessian
    value = objective_value(obj, vec, batches, reduce=reduce)
    for it in range(max_iter):
        gradient = objective_gradient(obj, vec, batches, reduce=reduce)
        if gradient.norm() <= tol:
            return vec.to(dtype), it
        step = torch.linalg.solve(hessian_of(obj, vec, batches, reduce=reduce), gradient)
        for _ in range(30):  # backtracking: Armijo on the Newton decrement
            candidate = vec - step
            new_value = objective_value(obj, candidate, batches, reduce=reduce)
            if new_value <= value - 1e-4 * float(gradient.dot(step)):
                break
            step = step / 2
        else:
            return vec.to(dtype), it  # no decrease at float64 precision: at the optimum
        vec, value = candidate, new_value
    return vec.to(dtype), max_iter


def iter_batches(x: torch.Tensor, attrs: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split tensors into a reusable list of batches."""
    return [(x[i : i + batch_size], attrs[i : i + batch_size]) for i in range(0, len(x), batch_size)] or \
        [(x[:0], attrs[:0])]


def flatten_params(params: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])
