"""Ghost clipping for DP-SGD: per-example gradient norms and the clipped summed gradient from ONE backward.

``GhostClipper(model, max_grad_norm=C, noise_multiplicity=K)`` hooks every module that owns trainable
parameters directly. The forward hooks keep each layer's input ``a`` and output; ``backward(losses)``
runs ONE ``torch.autograd.grad`` of ``losses.sum()`` with respect to those outputs, which gives every
layer's output gradient ``g`` and skips the unclipped parameter gradients an ordinary backward would
compute (they would be thrown away). From ``a`` and ``g`` it computes, layer by layer and without a
second backward through the network:

1. each example's gradient norm ``norm_i = ||g_i||`` over all trainable parameters, where ``g_i`` is the
   mean over the example's K rows (noise draws) of d loss_row / d theta;
2. the clip factors ``c_i = min(1, C / (norm_i + 1e-6))`` (Opacus's formula);
3. ``p.grad = sum_i c_i g_i`` for every trainable p (no noise: the DP optimizer adds it), then frees
   what it stored. It returns the norms, shape (B,).

Math. A Linear layer (or a Conv2d after im2col) computes ``y_s = W a_s + b`` at positions s = 1..T
(tokens, pixels). Its per-example weight gradient is ``G_i = sum_s g_s a_s^T`` (d*p entries), so

    ||G_i||_F^2 = sum_{s,t} (a_s . a_t) (g_s . g_t) = <A A^T, Gg Gg^T>_F        (the ghost norm)

needs two T x T Gram matrices per example instead of G_i. Mixed ghost clipping (Bu et al. 2022) picks,
per layer, the cheaper of the two. Its rule ``2 T^2 <= d*p`` compares memory (two Grams against one
gradient); here memory is bounded either way (the conv path below works in slices), so the rule
compares time: the ghost norm when its multiply-adds, T^2 (p + d), are fewer than instantiating's,
T d p, i.e. ``T (p + d) < d p`` (``use_ghost``). With the memory rule, K = 4 made the Grams of the
UNet's 8x8 layers (T = 256) 4.5x the work of instantiating: the DP step took 9.7 s against 5.0 s
for Opacus's hooks (batch 32, CPU). Otherwise instantiate G_i: an einsum for a Linear; for a Conv2d ONE grouped weight-gradient
convolution over all rows (``torch.nn.grad.conv2d_weight`` with the batch folded into the groups: the
native kernel, 3-4x faster on the CPU than im2col + einsum), a slice of examples at a time so that at
most 2^24 per-row entries exist at once. A grouped conv is ``groups`` independent layers: the rule
compares one group's d and p. Biases are always instantiated (``sum_s g_s``, p numbers).
GroupNorm and LayerNorm weights get ``sum_s g_s * a_hat_s`` and biases ``sum_s g_s`` (a_hat: the input
normalised again from the stored input): p numbers per example, always instantiated.

Noise multiplicity K. Rows are example-major (rows iK .. iK+K-1 are example i). The mean of the K rows'
gradients is ``(1/K) sum_k sum_s g_{k,s} a_{k,s}^T``: the K rows' positions concatenated (T -> K T)
with output gradients scaled by 1/K. Both paths run on that, so the norm is exactly the norm of the
mean, and the per-example state is one example's (not K rows') gradient. The rule uses T = K * positions.

Book-keeping (Bu et al. 2023). After the norms, ``p.grad = sum_i c_i G_i = sum_{i,s} (c_i g_s) a_s^T``:
the ordinary weight gradient of the batch with each row's output gradient scaled by c_i / K, by the
native kernel (``conv2d_weight``, or one matmul for a Linear): the cost of the weight gradient the
backward skipped. No second backward through the network.

Memory per layer, B examples, S = K * T positions, weight d x p (beyond what autograd keeps itself):
stored until ``backward`` returns: the input and the output gradient (one activation-sized tensor
each) and the output (usually kept by autograd anyway); temporaries, one layer at a time: ghost
2 B S^2 plus, for a Conv2d, its im2col (B S C_in kh kw); instantiate B d p for a Linear, at most 2^24
entries for a Conv2d; norm layers: B p.

Conv inputs are made contiguous before anything reads them (channels_last views from diffusers'
attention blocks, DESIGN.md "Platform facts"). Parameters used outside their module's forward (tied or
shared weights) would be missed, so a parameter owned by two modules is refused; a layer output
modified in place after the layer ran would have the wrong gradient, so that is refused too.

Precision: under autocast (Lightning's bf16-mixed) the stored inputs and output gradients are what the
forward and backward produced (bf16 for convs and matmuls); they are widened to fp32 and the norms, clip
factors and sums run with autocast off, so p.grad is fp32 (the parameter's dtype).

Where it runs: ``dp.engine: ghost`` (the default) in ``veil.lightning_modules.dp.step``; the optimizer
``veil.kernels.optimizer.GhostDPOptimizer`` accumulates the clipped sums over virtual steps, adds the
noise once and divides; under DDP each rank's clipped sum is all-reduced once (noise on rank 0 only).
Lightning's ``manual_backward`` is not used (fp16 with a loss scaler is refused in ``dp.optimizer``). Supported: nn.Linear (any leading dims),
nn.Conv2d (stride, padding incl. "same", dilation, groups; padding_mode "zeros"), nn.GroupNorm and
nn.LayerNorm (affine). Anything else that owns trainable parameters directly is refused with
``UnsupportedLayer`` when the clipper is built (``configure_optimizers``), before any step.
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


def use_ghost(positions: int, in_features: int, out_features: int) -> bool:
    """The ghost norm when it costs fewer multiply-adds than instantiating, per group: S^2 (I + O) for
    the two Grams against S I O for the per-example gradient, i.e. S (I + O) < I O."""
    return positions * (in_features + out_features) < in_features * out_features


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
    """One hooked module: per call, its input and output (kept for ``backward``) and output gradient."""

    def __init__(self, path: str, module: nn.Module):
        self.path, self.module = path, module
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[tuple[torch.Tensor, int]] = []  # (output, its version counter at the forward)
        self.out_grads: dict[int, torch.Tensor] = {}
        self.per_example: dict[str, torch.Tensor] = {}  # norm layers: name -> (B, *p.shape)
        self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad):
            return
        x = args[0]
        self.inputs.append(x.detach().contiguous() if isinstance(module, nn.Conv2d) else x.detach())
        self.outputs.append((output, output._version))

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
        self.outputs.clear()
        self.out_grads.clear()
        self.per_example.clear()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for a tensor stored in half precision (autocast): norms and sums are accumulated in fp32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _conv_input(m: nn.Conv2d, x: torch.Tensor):
    """(input, padding) as the conv saw them: "same"/"valid" become torch's own (possibly asymmetric) zeros."""
    if isinstance(m.padding, str):
        return F.pad(x, m._reversed_padding_repeated_twice), 0
    return x, m.padding


def _matmul_operands(layer: _Layer, b: int, k: int):
    """Inputs a (B, S, G, I) and output grads g (B, S, G, O), scaled by 1/K, with S = K * positions
    summed over calls; a Linear is one group, a Conv2d after im2col has ``groups``. None if no call."""
    m = layer.module
    a_parts, g_parts = [], []
    for x, g in layer.calls(b * k):
        x, g = _wide(x), _wide(g)
        if isinstance(m, nn.Linear):
            t = math.prod(x.shape[1:-1])
            a, g = x.reshape(b, k * t, 1, x.shape[-1]), g.reshape(b, k * t, 1, g.shape[-1])  # one group
        else:
            x, padding = _conv_input(m, x)
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


def _positions(layer: _Layer) -> int:
    """Output positions per row summed over calls (tokens of a Linear, pixels of a Conv2d output)."""
    m = layer.module
    total = 0
    for i, g in layer.out_grads.items():
        total += math.prod(g.shape[1:-1]) if isinstance(m, nn.Linear) else math.prod(g.shape[2:])
    return total


def _conv_row_grads(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-row weight gradients (N, *weight.shape) of a Conv2d in one grouped weight-gradient convolution
    (row n's channels are groups n*G .. n*G+G-1): the native kernel, no im2col."""
    x, padding = _conv_input(m, x)
    n = x.shape[0]
    w = torch.nn.grad.conv2d_weight(
        x.reshape(1, n * x.shape[1], *x.shape[2:]), (n * m.out_channels, *m.weight.shape[1:]),
        g.reshape(1, n * g.shape[1], *g.shape[2:]), stride=m.stride, padding=padding, dilation=m.dilation,
        groups=n * m.groups)
    return w.view(n, *m.weight.shape)


_SLICE_ELEMENTS = 1 << 24  # per-row gradients materialised at once by the conv instantiate path (64 MiB fp32)


def _conv_instantiated_sq(layer: _Layer, b: int, k: int) -> torch.Tensor:
    """Squared norms (B,) of the per-example conv weight gradients (each the mean of its K rows), a slice of
    examples at a time so that at most ~``_SLICE_ELEMENTS`` per-row gradient entries exist at once."""
    m = layer.module
    calls = list(layer.calls(b * k))
    step = max(1, _SLICE_ELEMENTS // (k * m.weight.numel()))
    out = []
    for s in range(0, b, step):
        e = min(b, s + step)
        acc = None
        for x, g in calls:
            rows = _conv_row_grads(m, _wide(x[s * k : e * k]), _wide(g[s * k : e * k]))
            rows = rows.view(e - s, k, -1).mean(dim=1)
            acc = rows if acc is None else acc + rows
        out.append(acc.pow(2).sum(dim=1))
    return torch.cat(out)


CONV_GHOST_BACKEND = "auto"  # veil.kernels.ghost_norm's backend; the tests set "triton" (interpreter on the CPU)


def _conv_kernel_applies(layer: _Layer) -> bool:
    """The Triton ghost norm of a Conv2d (no im2col) takes one call of a groups=1, integer-padded conv,
    on CUDA (or wherever CONV_GHOST_BACKEND forces it); otherwise im2col + Grams in PyTorch."""
    m = layer.module
    if not (isinstance(m, nn.Conv2d) and m.groups == 1 and not isinstance(m.padding, str)
            and len(layer.out_grads) == 1 and len(layer.inputs) == 1):
        return False
    return CONV_GHOST_BACKEND != "auto" or layer.inputs[0].is_cuda


def _matmul_sq_norms(layer: _Layer, b: int, k: int, mode: str) -> tuple[torch.Tensor, str]:
    """Squared per-example norm (B,) of this layer's trainable parameters, and the path taken."""
    m = layer.module
    chosen = "bias only"
    if layer.trainable("weight"):
        s = k * _positions(layer)
        w = m.weight  # (O, I) or (O, C / groups, kh, kw)
        chosen = ("ghost" if use_ghost(s, w[0].numel(), w.shape[0] // (m.groups if isinstance(m, nn.Conv2d) else 1))
                  else "instantiate") if mode == "auto" else mode
    sq = None
    if chosen == "ghost" and _conv_kernel_applies(layer):
        from veil.kernels.ghost_norm import conv2d_ghost_sq_norms

        ((x, g),) = layer.calls(b * k)
        sq = conv2d_ghost_sq_norms(x.contiguous(), g.contiguous(), kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                                   dilation=m.dilation, rows_per_example=k, backend=CONV_GHOST_BACKEND)
        if layer.trainable("bias"):
            sq += _bias_sq(layer, b, k)
        return sq, chosen
    if chosen == "instantiate" and isinstance(m, nn.Conv2d):
        sq = _conv_instantiated_sq(layer, b, k)
        if layer.trainable("bias"):
            sq += _bias_sq(layer, b, k)
        return sq, chosen
    a, g = _matmul_operands(layer, b, k)
    sq = torch.zeros(b, dtype=a.dtype, device=a.device)
    if chosen == "ghost":
        gram_a = torch.einsum("bsgi,btgi->bgst", a, a)  # (B, G, S, S)
        gram_g = torch.einsum("bsgo,btgo->bgst", g, g)
        sq += torch.einsum("bgst,bgst->b", gram_a, gram_g)
    elif chosen == "instantiate":
        sq += torch.einsum("bsgi,bsgo->bgoi", a, g).pow(2).sum(dim=(1, 2, 3))  # G_i: (B, G, O/G, I)
    if layer.trainable("bias"):
        sq += g.sum(dim=1).pow(2).sum(dim=(1, 2))
    return sq, chosen


def _bias_sq(layer: _Layer, b: int, k: int) -> torch.Tensor:
    """Squared norms (B,) of a Conv2d's per-example bias gradients (sum over positions, mean over K)."""
    total = None
    for x, g in layer.calls(b * k):
        r = _wide(g).sum(dim=(2, 3)).view(b, k, -1).mean(dim=1)
        total = r if total is None else total + r
    return total.pow(2).sum(dim=1)


def _matmul_clipped(layer: _Layer, b: int, k: int, c: torch.Tensor) -> None:
    """Book-keeping: p.grad = sum_i c_i G_i, the weight gradient of the batch with each row's output
    gradient scaled by c_i / K (its example's clip factor, the mean over K): one native weight-gradient
    kernel (conv) or matmul (Linear) per call, the cost of the ordinary weight gradient."""
    m = layer.module
    weight, bias = None, None
    for x, g in layer.calls(b * k):
        x, g = _wide(x), _wide(g)
        gc = g * (c / k).to(g.dtype).repeat_interleave(k).view(-1, *([1] * (g.dim() - 1)))
        if isinstance(m, nn.Linear):
            g2 = gc.reshape(-1, gc.shape[-1])
            w = g2.T @ x.reshape(-1, x.shape[-1]) if layer.trainable("weight") else None
            bsum = g2.sum(dim=0)
        else:
            xi, padding = _conv_input(m, x)
            w = (torch.nn.grad.conv2d_weight(xi, m.weight.shape, gc, stride=m.stride, padding=padding,
                                             dilation=m.dilation, groups=m.groups)
                 if layer.trainable("weight") else None)
            bsum = gc.sum(dim=(0, 2, 3))
        if w is not None:
            weight = w if weight is None else weight + w
        bias = bsum if bias is None else bias + bsum
    if weight is not None:
        m.weight.grad = weight.reshape(m.weight.shape).to(m.weight.dtype)
    if bias is not None and layer.trainable("bias"):
        m.bias.grad = bias.reshape(m.bias.shape).to(m.bias.dtype)


def _norm_per_example(layer: _Layer, b: int, k: int) -> dict[str, torch.Tensor]:
    """GroupNorm/LayerNorm per-example grads {name: (B, *p.shape)}, each the mean over the K rows."""
    m = layer.module
    out: dict[str, torch.Tensor] = {}
    for x, g in layer.calls(b * k):
        x, g = _wide(x), _wide(g)
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
        """How many inputs, outputs and output gradients the hooks hold now (0 after ``backward``)."""
        return sum(len(l.inputs) + len(l.outputs) + len(l.out_grads) for l in self._layers)

    def backward(self, losses: torch.Tensor, *, noise_multiplicity: int | None = None) -> torch.Tensor:
        """Back-propagate ``losses.sum()`` (losses: (B*K,), example-major) once; set every trainable
        ``p.grad`` to sum_i c_i g_i; return the per-example norms (B,). ``noise_multiplicity`` overrides
        K for this call (a model that draws no noise uses K = 1)."""
        k = self._k(noise_multiplicity)
        if losses.dim() != 1 or losses.shape[0] % k:
            raise ConfigError(f"losses must have shape (B*K,) with K={k} (noise_multiplicity), "
                              f"got {tuple(losses.shape)}")
        return self._run(losses.sum(), losses.shape[0] // k, k)

    def backward_mean(self, loss: torch.Tensor, *, examples: int, noise_multiplicity: int | None = None) -> torch.Tensor:
        """As ``backward`` for ``loss``, the MEAN over ``examples * K`` rows (what a training step's loss
        is): back-propagates ``loss * rows``, i.e. the sum of the rows' losses."""
        k = self._k(noise_multiplicity)
        if loss.dim() != 0 or examples < 1:
            raise ConfigError(f"backward_mean takes a scalar loss over >= 1 examples, got shape "
                              f"{tuple(loss.shape)} and {examples} examples")
        return self._run(loss * (examples * k), examples, k)

    def _k(self, noise_multiplicity: int | None) -> int:
        k = self.k if noise_multiplicity is None else noise_multiplicity
        if not (isinstance(k, int) and k >= 1):
            raise ConfigError(f"noise_multiplicity must be an integer >= 1, got {k!r}")
        return k

    def _run(self, total: torch.Tensor, b: int, k: int) -> torch.Tensor:
        try:
            self._output_grads(total)
            # The norms and sums run outside any autocast of the caller's step: fp32 (or the
            # stored fp64), whatever precision the forward used.
            with torch.autocast(total.device.type, enabled=False):
                return self._clip(b, k, total)
        finally:
            for layer in self._layers:
                layer.free()

    def _output_grads(self, total: torch.Tensor) -> None:
        """The one backward: ``autograd.grad`` of ``total`` with respect to the hooked layers' outputs.
        Autograd then computes only what flows to those outputs, not the (unclipped) parameter
        gradients: the clipped ones are computed once, by book-keeping."""
        calls = [(layer, i, out, version) for layer in self._layers for i, (out, version) in enumerate(layer.outputs)]
        if not (total.requires_grad and calls):
            return
        for layer, _, out, version in calls:
            if out._version != version:
                raise ConfigError(f"the output of {layer.path} ({type(layer.module).__name__}) was modified in "
                                  "place after the layer ran; ghost clipping needs each layer's output gradient "
                                  "(make the operation out of place, or use dp.engine: opacus)")
        grads = torch.autograd.grad(total, [c[2] for c in calls], allow_unused=True)
        for (layer, i, _, _), g in zip(calls, grads):
            if g is not None:
                layer.out_grads[i] = g

    def _clip(self, b: int, k: int, losses: torch.Tensor) -> torch.Tensor:
        # 1. squared norms, layer by layer; a matmul layer's operands are rebuilt later for step 3
        #    rather than kept (im2col is kh*kw times the input)
        dtype = torch.promote_types(losses.dtype, torch.float32)
        sq = torch.zeros(b, dtype=dtype, device=losses.device)
        for layer in self._layers if b else []:  # an empty batch: no norms, zero gradients below
            if isinstance(layer.module, _MATMUL):
                if layer.out_grads:
                    layer_sq, self.chosen_modes[layer.path] = _matmul_sq_norms(layer, b, k, self.mode)
                    sq += layer_sq.to(dtype)
            else:
                layer.per_example = _norm_per_example(layer, b, k)
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
            if not b:
                continue
            if isinstance(layer.module, _MATMUL):
                if layer.out_grads:
                    _matmul_clipped(layer, b, k, c)
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
