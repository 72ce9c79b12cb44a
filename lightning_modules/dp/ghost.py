"""Ghost clipping for DP-SGD: per-example gradient norms and the clipped summed gradient from ONE backward.

``GhostClipper(model, max_grad_norm=C, noise_multiplicity=K)`` hooks every module that owns trainable
parameters directly. The forward hooks keep each layer's input ``a``; a hook on the layer's output keeps
the output gradient ``g`` that the ordinary backward of ``losses.sum()`` computes anyway. From those
two, ``backward(losses)`` computes, layer by layer and without a second backward through the network:

1. each example's gradient norm ``norm_i = ||g_i||`` over all trainable parameters, where ``g_i`` is the
   mean over the example's K rows (noise draws) of d loss_row / d theta;
2. the clip factors ``c_i = min(1, C / (norm_i + 1e-6))`` (Opacus's formula);
3. ``p.grad = sum_i c_i g_i`` for every trainable p (no noise: the DP optimizer adds it), then frees
   what it stored. It returns the norms, shape (B,).

Math. A Linear layer (or a Conv2d after im2col) computes ``y_s = W a_s + b`` at positions s = 1..T
(tokens, pixels). Its per-example weight gradient is ``G_i = sum_s g_s a_s^T`` (d*p entries), so

    ||G_i||_F^2 = sum_{s,t} (a_s . a_t) (g_s . g_t) = <A A^T, Gg Gg^T>_F        (the ghost norm)

needs two T x T Gram matrices per example instead of G_i. Mixed ghost clipping (Bu et al. 2022) picks,
per layer, the cheaper of the two: the ghost norm when ``2 T^2 <= d*p`` (two Grams against one
gradient), else instantiate G_i by an einsum. A grouped conv is ``groups`` independent layers: the rule
becomes ``2 groups T^2 <= weight.numel()``. Biases are always instantiated (``sum_s g_s``, p numbers).
GroupNorm and LayerNorm weights get ``sum_s g_s * a_hat_s`` and biases ``sum_s g_s`` (a_hat: the input
normalised again from the stored input): p numbers per example, always instantiated.

Noise multiplicity K. Rows are example-major (rows iK .. iK+K-1 are example i). The mean of the K rows'
gradients is ``(1/K) sum_k sum_s g_{k,s} a_{k,s}^T``: the K rows' positions concatenated (T -> K T)
with output gradients scaled by 1/K. Both paths run on that, so the norm is exactly the norm of the
mean, and the per-example state is one example's (not K rows') gradient. The rule uses T = K * positions.

Book-keeping (Bu et al. 2023). After the norms, ``p.grad = sum_i c_i G_i = sum_{i,s} (c_i g_s) a_s^T``:
one einsum of the stored activations with the output gradients scaled by c_i per row, the same cost as
the weight gradient autograd already computed. No second backward through the network.

Memory per layer, B examples, S = K * T positions, weight d x p (beyond what autograd keeps itself):
stored until ``backward`` returns: the input and the output gradient (one activation-sized tensor
each); temporaries, one layer at a time: ghost 2 B S^2, instantiate B d p; Conv2d also unfolds its
input (im2col) to B S (C_in kh kw), kh*kw times the input, twice (norm, then clipped sum); norms: B p.

Conv inputs are made contiguous before anything reads them (channels_last views from diffusers'
attention blocks, DESIGN.md "Platform facts"). Parameters used outside their module's forward (tied or
shared weights) would be missed, so a parameter owned by two modules is refused.

Not supported yet (later pieces of the DP engine): DDP (the clipped sum is this rank's), bf16/fp16
autocast (refused), Triton kernels (this is the pure-PyTorch path), wiring into ``dp.engine`` config and
the training step. Supported: nn.Linear (any leading dims), nn.Conv2d (stride, padding incl. "same",
dilation, groups; padding_mode "zeros"), nn.GroupNorm and nn.LayerNorm (affine). Anything else that
owns trainable parameters directly is refused with ``UnsupportedLayer``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from veil.errors import ConfigError

MODES = ("auto", "ghost", "instantiate")
_MATMUL = (nn.Linear, nn.Conv2d)
_NORM = (nn.GroupNorm, nn.LayerNorm)


class UnsupportedLayer(ConfigError):
    """A module owns trainable parameters of a kind ghost clipping cannot handle; the message names it."""


def use_ghost(positions: int, weight_numel: int, groups: int = 1) -> bool:
    """Mixed ghost clipping's rule: the ghost norm when its two Grams are no bigger than the gradient."""
    return 2 * groups * positions**2 <= weight_numel


def _check_supported(path: str, module: nn.Module) -> None:
    where = f"{path or '<root>'} ({type(module).__name__})"
    if type(module) not in _MATMUL + _NORM:
        hint = ("per-example norms are undefined under batch statistics; use GroupNorm"
                if isinstance(module, nn.modules.batchnorm._BatchNorm) else
                "supported: Linear, Conv2d, GroupNorm, LayerNorm; replace the module or freeze its "
                "parameters (requires_grad_(False))")
        raise UnsupportedLayer(f"ghost clipping cannot handle {where}: {hint}")
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise UnsupportedLayer(f"ghost clipping cannot handle {where} with padding_mode="
                               f"{module.padding_mode!r}; use padding_mode='zeros'")


class _Layer:
    """One hooked module: its stored inputs (one per call) and output gradients (by call index)."""

    def __init__(self, path: str, module: nn.Module):
        self.path, self.module = path, module
        self.inputs: list[torch.Tensor] = []
        self.out_grads: dict[int, torch.Tensor] = {}
        self.per_example: dict[str, torch.Tensor] = {}  # norm layers: name -> (B, *p.shape)
        self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad):
            return
        x = args[0]
        if torch.is_autocast_enabled(x.device.type):
            raise ConfigError(f"ghost clipping under autocast is not supported yet ({self.path}); "
                              "train in float32")
        call = len(self.inputs)
        self.inputs.append(x.detach().contiguous() if isinstance(module, nn.Conv2d) else x.detach())
        output.register_hook(lambda grad: self.out_grads.__setitem__(call, grad.detach()))

    def trainable(self, name: str) -> bool:
        p = getattr(self.module, name, None)
        return p is not None and p.requires_grad

    def calls(self, n: int):
        """(input, output grad) of every call that received a gradient; checks the row count."""
        for i, x in enumerate(self.inputs):
            if x.shape[0] != n:
                raise ConfigError(f"{self.path} saw {x.shape[0]} rows but losses has {n}: call "
                                  "clipper.backward once after each forward pass")
            if i in self.out_grads:
                yield x, self.out_grads[i]

    def free(self) -> None:
        self.inputs.clear()
        self.out_grads.clear()
        self.per_example.clear()


def _matmul_operands(layer: _Layer, b: int, k: int):
    """Inputs a (B, S, G, I) and output grads g (B, S, G, O), scaled by 1/K, with S = K * positions
    summed over calls; a Linear is one group, a Conv2d after im2col has ``groups``. None if no call."""
    m = layer.module
    a_parts, g_parts = [], []
    for x, g in layer.calls(b * k):
        if isinstance(m, nn.Linear):
            t = math.prod(x.shape[1:-1])
            a, g = x.reshape(b, k * t, 1, x.shape[-1]), g.reshape(b, k * t, 1, g.shape[-1])  # one group
        else:
            padding = m.padding
            if isinstance(padding, str):  # "same"/"valid": torch's own (possibly asymmetric) padding
                x, padding = F.pad(x, m._reversed_padding_repeated_twice), 0
            u = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)  # (N, C kh kw, L)
            t, groups = u.shape[-1], m.groups
            a = u.transpose(1, 2).reshape(b, k * t, groups, u.shape[1] // groups)  # (B, S, G, C/G kh kw)
            g = g.reshape(b * k, g.shape[1], t).transpose(1, 2)  # (N, L, O)
            g = g.reshape(b, k * t, groups, g.shape[-1] // groups)  # (B, S, G, O/G)
        a_parts.append(a)
        g_parts.append(g / k)
    if not a_parts:
        return None
    return torch.cat(a_parts, dim=1), torch.cat(g_parts, dim=1)


def _matmul_sq_norms(layer: _Layer, a, g, mode: str) -> tuple[torch.Tensor, str]:
    """Squared per-example norm (B,) of this layer's trainable parameters, and the path taken."""
    b, s, groups = a.shape[:3]
    sq = torch.zeros(b, dtype=a.dtype, device=a.device)
    chosen = "bias only"
    if layer.trainable("weight"):
        w = layer.module.weight
        chosen = ("ghost" if use_ghost(s, w.numel(), groups) else "instantiate") if mode == "auto" else mode
        if chosen == "ghost":
            gram_a = torch.einsum("bsgi,btgi->bgst", a, a)  # (B, G, S, S)
            gram_g = torch.einsum("bsgo,btgo->bgst", g, g)
            sq += torch.einsum("bgst,bgst->b", gram_a, gram_g)
        else:
            sq += torch.einsum("bsgi,bsgo->bgoi", a, g).pow(2).sum(dim=(1, 2, 3))  # G_i: (B, G, O/G, I)
    if layer.trainable("bias"):
        sq += g.sum(dim=1).pow(2).sum(dim=(1, 2))
    return sq, chosen


def _matmul_clipped(layer: _Layer, a, g, c: torch.Tensor) -> None:
    """Book-keeping: p.grad = sum_i c_i G_i from the stored a and the c-scaled output grads."""
    m = layer.module
    if layer.trainable("weight"):
        gc = g * c.to(g.dtype)[:, None, None, None]
        m.weight.grad = torch.einsum("bsgo,bsgi->goi", gc, a).reshape(m.weight.shape).to(m.weight.dtype)
    if layer.trainable("bias"):
        m.bias.grad = torch.einsum("bsgo,b->go", g, c.to(g.dtype)).reshape(m.bias.shape).to(m.bias.dtype)


def _norm_per_example(layer: _Layer, b: int, k: int) -> dict[str, torch.Tensor]:
    """GroupNorm/LayerNorm per-example grads {name: (B, *p.shape)}, each the mean over the K rows."""
    m = layer.module
    out: dict[str, torch.Tensor] = {}
    for x, g in layer.calls(b * k):
        if isinstance(m, nn.GroupNorm):
            x_hat = F.group_norm(x, m.num_groups, eps=m.eps)  # (N, C, *)
            dims = tuple(range(2, x.dim()))
        else:
            x_hat = F.layer_norm(x, m.normalized_shape, eps=m.eps)  # (N, *, *normalized_shape)
            dims = tuple(range(1, x.dim() - len(m.normalized_shape)))
        rows = {"weight": (g * x_hat).sum(dim=dims), "bias": g.sum(dim=dims)}  # (N, *p.shape)
        for name, r in rows.items():
            if layer.trainable(name):
                r = r.reshape(b, k, *r.shape[1:]).mean(dim=1)
                out[name] = out[name] + r if name in out else r
    return out


class GhostClipper:
    """Per-example norms and the clipped summed gradient of ``model`` from one backward (module doc).

    ``mode`` sets how Linear/Conv2d weights get their norm: "auto" (mixed ghost clipping's rule),
    "ghost" or "instantiate" for every such layer. ``chosen_modes`` records, after ``backward``, the
    path each Linear/Conv2d took.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, noise_multiplicity: int = 1,
                 mode: str = "auto"):
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ConfigError(f"max_grad_norm must be a positive number, got {max_grad_norm}")
        if not (isinstance(noise_multiplicity, int) and noise_multiplicity >= 1):
            raise ConfigError(f"noise_multiplicity must be an integer >= 1, got {noise_multiplicity}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self.max_grad_norm, self.k, self.mode = float(max_grad_norm), noise_multiplicity, mode
        self.chosen_modes: dict[str, str] = {}
        owners: dict[int, str] = {}
        to_hook = []
        for path, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            _check_supported(path, module)
            for p in own:
                if id(p) in owners:
                    raise UnsupportedLayer(f"{path} ({type(module).__name__}) shares a parameter with "
                                           f"{owners[id(p)]}; ghost clipping needs each parameter in one module")
                owners[id(p)] = path
            to_hook.append((path, module))
        self._layers = [_Layer(path, module) for path, module in to_hook]

    @property
    def stored_tensors(self) -> int:
        """How many activations and output gradients the hooks hold now (0 after ``backward``)."""
        return sum(len(l.inputs) + len(l.out_grads) for l in self._layers)

    def backward(self, losses: torch.Tensor) -> torch.Tensor:
        """Back-propagate ``losses.sum()`` (losses: (B*K,), example-major) once; set every trainable
        ``p.grad`` to sum_i c_i g_i; return the per-example norms (B,)."""
        k = self.k
        if losses.dim() != 1 or losses.shape[0] % k:
            raise ConfigError(f"losses must have shape (B*K,) with K={k} (noise_multiplicity), "
                              f"got {tuple(losses.shape)}")
        b = losses.shape[0] // k
        try:
            if losses.requires_grad:
                losses.sum().backward()
            return self._clip(b, losses)
        finally:
            for layer in self._layers:
                layer.free()

    def _clip(self, b: int, losses: torch.Tensor) -> torch.Tensor:
        # 1. squared norms, layer by layer; a matmul layer's operands are rebuilt later for step 3
        #    rather than kept (im2col is kh*kw times the input)
        dtype = torch.promote_types(losses.dtype, torch.float32)
        sq = torch.zeros(b, dtype=dtype, device=losses.device)
        for layer in self._layers:
            if isinstance(layer.module, _MATMUL):
                ops = _matmul_operands(layer, b, self.k)
                if ops is not None:
                    layer_sq, self.chosen_modes[layer.path] = _matmul_sq_norms(layer, *ops, self.mode)
                    sq += layer_sq.to(dtype)
            else:
                layer.per_example = _norm_per_example(layer, b, self.k)
                for r in layer.per_example.values():
                    sq += r.flatten(1).pow(2).sum(dim=1).to(dtype)
        # 2. clip factors, as Opacus: c_i = min(1, C / (norm_i + 1e-6)); rounding may leave a tiny
        #    negative ghost sum for an all-zero gradient
        norms = sq.clamp_min(0).sqrt()
        c = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        # 3. book-keeping: the clipped sum from the stored tensors; unused parameters get zeros
        for layer in self._layers:
            for name in ("weight", "bias"):
                if layer.trainable(name):
                    p = getattr(layer.module, name)
                    p.grad = torch.zeros_like(p)
            if isinstance(layer.module, _MATMUL):
                ops = _matmul_operands(layer, b, self.k)
                if ops is not None:
                    _matmul_clipped(layer, *ops, c)
            else:
                for name, r in layer.per_example.items():
                    p = getattr(layer.module, name)
                    p.grad = torch.einsum("b...,b->...", r, c.to(r.dtype)).to(p.dtype)
        return norms

    def remove(self) -> None:
        """Remove the hooks and drop anything stored."""
        for layer in self._layers:
            layer.handle.remove()
            layer.free()
        self._layers = []
