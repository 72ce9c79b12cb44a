"""Ghost clipping for DP-SGD: per-example gradient norms and the clipped summed gradient from ONE backward.

``GhostClipper(model, max_grad_norm=C, noise_multiplicity=K)`` hooks every module that owns trainable
parameters directly. Each forward hook keeps the layer's input ``a`` and returns the layer's output passed
through a tap (``_Tap``: an autograd Function that is the identity forward). ``backward(losses)`` runs ONE
``torch.autograd.grad`` of ``losses.sum()`` with respect to a 0-dim anchor tensor that every tap takes as
an input: autograd runs the ordinary backward through the network but skips the unclipped parameter
gradients (they lead nowhere it was asked about, so e.g. a conv's backward computes only its input
gradient), and calls each tap's backward as it reaches the layer, with the layer's output gradient ``g``.
The clipper uses ``(a, g)`` there and then (``GhostClipper._on_grad``), layer by layer and without a second
backward through the network, for:

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
for Opacus's hooks (batch 32, CPU). Otherwise instantiate G_i: an einsum for a Linear; for a Conv2d ONE
grouped weight-gradient convolution over all rows (``torch.nn.grad.conv2d_weight`` with the batch folded
into the groups: the native kernel, 3-4x faster on the CPU than im2col + einsum), a slice of examples at a
time so that at most 2^24 per-row entries exist at once. A grouped conv is ``groups`` independent layers:
the rule compares one group's d and p. Biases are always instantiated (``sum_s g_s``, p numbers).
GroupNorm and LayerNorm weights get ``sum_s g_s * a_hat_s`` and biases ``sum_s g_s`` (a_hat: the input
normalised again from the stored input; for GroupNorm by PyTorch's own GroupNorm backward, one pass):
p numbers per example, always instantiated.

Noise multiplicity K. Rows are example-major (rows iK .. iK+K-1 are example i). The mean of the K rows'
gradients is ``(1/K) sum_k sum_s g_{k,s} a_{k,s}^T``: the K rows' positions concatenated (T -> K T)
with output gradients scaled by 1/K. Both paths run on that, so the norm is exactly the norm of the
mean, and the per-example state is one example's (not K rows') gradient. The rule uses T = K * positions.
A conv whose rows have few positions (<= 16x16) gets the sum over K inside the grouped convolution (the
K rows as its batch, one example per group); one with many, K rows per example as groups and a mean
(``_conv_example_grads``: which is faster depends on the shape, measured).

The algorithm. Before the backward (``_plan``) each layer gets its path: the rule (or ``mode``) picks
ghost or instantiate for a Linear/Conv2d weight. As the backward reaches a layer, for each call of it:

- GroupNorm / LayerNorm, and an instantiated Linear/Conv2d whose per-example gradients (B x d x p,
  one tensor for all its calls, fp32) take no more bytes than the inputs and output gradients of its
  calls: the per-example weight and bias gradients (mean over K) are computed in the tap and kept,
  ``a`` and ``g`` dropped. The calls of a layer used twice add up (same parameters); the norm is taken
  of the sum, after the backward. For an fp32 Linear the byte test is the rule's instantiate side itself
  (``S (I + O) >= I O`` is ``B I O <= B S (I + O)``); a conv's stored input is kh kw times smaller
  than its im2col, so some instantiated convs (3x3 at 8x8 and 16x16 in the UNet) fail it;
- the others keep ``a`` and ``g`` for after the backward: the ghost-norm layers (few positions, many
  channels: in the UNet the time and attribute embeddings' Linears) and the instantiated layers that
  failed the byte test, whose per-example gradients are made after the backward.

After the backward (``_clip``): per-example squared norms of every layer but the instantiated ones that
kept ``(a, g)`` (the norms of the kept per-example gradients; the ghost norm from the kept ``(a, g)``).
Then the instantiated layers that kept ``(a, g)``, fused (``_fused_clip``), a slice of examples at a
time: their per-example gradients for the slice complete the slice's norms, hence its clip factors, and
are then summed into ``p.grad`` with those factors and dropped. Then the other clipped sums layer by
layer, freeing each layer's tensors once its sum is set: ``c @ G`` (one matmul) for the kept per-example
gradients, book-keeping for the ghost-norm layers. A clip factor needs every layer's norm; taking the
fused layers last, a slice's per-example gradients in them complete the slice's norms, and the same
gradients then give the slice's share of the sums: one pass over their ``(a, g)``, nothing per example
kept beyond the slice. Before the fusion, those layers made their per-example gradients for the norm,
then paid book-keeping for the sum (the cost of their weight gradient again: on the default UNet at
batch 32, K = 1, 17 3x3 convs at 8x8 and 16x16, 84 ms of a 0.95 s step on one CPU thread). Keeping their
per-example gradients instead (92 MiB at batch 32) stayed within the live bytes the backward had freed,
but the heap's holes left by autograd were too small for them: the CPU step's peak RSS went from 1.0x
to 1.2x the non-private step's.

Book-keeping (Bu et al. 2023), for the ghost-norm layers: ``p.grad = sum_i c_i G_i =
sum_{i,s} (c_i g_s) a_s^T``, the ordinary weight gradient of the batch with each row's output gradient
scaled by c_i / K, by the native kernel (``conv2d_weight``, or one matmul for a Linear): the cost of the
weight gradient the backward skipped. No second backward through the network.

Memory, B examples, S = K * T positions, weight d x p. The autograd graph frees each layer's saved
tensors as the backward passes it, and the clipper holds, beyond that: for every layer until the backward
reaches it, its input (the tensor autograd saved for the layer anyway, usually) and a weak reference to
its output (for the in-place check: no storage); afterwards, per layer, its per-example gradients (B p
for norm layers and biases, at most its ``a`` + ``g`` for weights done in the tap) or ``a`` and ``g``
(one activation-sized tensor each) for a layer that keeps them, until step 3 reaches the layer. So the
peak is about the non-private backward's plus the per-example gradients made in the taps plus ``a`` and
``g`` of the layers that keep them. (Before the taps, one ``autograd.grad`` with respect to every
layer's output returned all output gradients at the end: every layer's ``a`` and ``g`` at once, on top
of the graph, about twice the activations; 1.65-1.95x the non-private step's peak on the CPU bench.)
Temporaries, one layer at a time: ghost 2 B S^2 plus, for a Conv2d, its im2col (B S C_in kh kw);
instantiate at most 2^24 per-row entries for a Conv2d in slices (and, K rows summed in the kernel, a
K-major copy of the slice's ``a`` and ``g``), B d p for a Linear; norm layers: B p; the fused layers:
per-example gradients of 2^23 entries (32 MiB), or of 8 examples if more, for all of them at once.

Conv inputs are made contiguous where they are read (channels_last views from diffusers' attention
blocks; the stored tensor stays the one autograd saved). Parameters used outside their module's forward
(tied or shared weights) would be missed, so a parameter owned by two modules is refused. A layer output
modified in place after the layer ran is refused when ``backward`` starts (its version counter moved),
as before the tap. The tap returns ``output.detach()`` (same storage and version counter, not an autograd
view: PyTorch forbids in-place ops on a view returned by a custom Function, with an error of its own that
would pre-empt this one). The clipper keeps only a weak reference, so an output modified in place and
then dropped by everyone is not seen; that is harmless: the tap receives the gradient of the output as
the layer produced it, whatever happens to the tensor downstream.

Precision: under autocast (Lightning's bf16-mixed) the stored inputs and output gradients are what the
forward and backward produced (bf16 for convs and matmuls); they are widened to fp32 and the norms, clip
factors and sums run with autocast off (in the taps too), so p.grad is fp32 (the parameter's dtype). The
taps change neither the forward's values nor its dtype.

Where it runs: ``dp.engine: ghost`` (the default) in ``veil.lightning_modules.dp.step``; the optimizer
``veil.kernels.optimizer.GhostDPOptimizer`` accumulates the clipped sums over virtual steps, adds the
noise once and divides; under DDP each rank's clipped sum is all-reduced once (noise on rank 0 only).
Lightning's ``manual_backward`` is not used (fp16 with a loss scaler is refused in ``dp.optimizer``). An
ordinary backward through a tapped graph (not ``GhostClipper.backward``) passes through the taps
untouched. Supported: nn.Linear (any leading dims), nn.Conv2d (stride, padding incl. "same", dilation,
groups; padding_mode "zeros"), nn.GroupNorm and nn.LayerNorm (affine). Anything else that owns trainable
parameters directly is refused with ``UnsupportedLayer`` when the clipper is built
(``configure_optimizers``), before any step.
"""

from __future__ import annotations

import math
import weakref

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


class _Call:
    """One forward call of a hooked layer: its input until the backward has used it, a weak reference to
    its (tapped) output and that output's version at the forward (the in-place check), the output's size,
    and the output gradient where the layer keeps it for after the backward."""

    __slots__ = ("g", "out", "out_bytes", "out_shape", "version", "x")

    def __init__(self, x: torch.Tensor):
        self.x: torch.Tensor | None = x
        self.out: weakref.ref | None = None
        self.g: torch.Tensor | None = None

    def watch(self, out: torch.Tensor) -> None:
        self.out, self.version = weakref.ref(out), out._version
        self.out_shape, self.out_bytes = out.shape, out.numel() * out.element_size()

    def drop(self) -> None:
        self.x = self.out = self.g = None


class _Layer:
    """One hooked module: its calls since the last backward and, during one, its path and per-example
    gradients. ``plan``: "norm" and "now" compute per-example gradients in the tap; "ghost" and
    "instantiate" keep (input, output grad) for after the backward (ghost norm and book-keeping; the
    fused norm and clipped sum of ``GhostClipper._fused_clip``)."""

    def __init__(self, path: str, module: nn.Module, clipper: GhostClipper):
        self.path, self.module, self.clipper = path, module, clipper
        self.calls: list[_Call] = []
        self.per_example: dict[str, torch.Tensor] = {}  # name -> (B, *p.shape), summed over calls
        self.plan: str | None = None
        self.chosen: str | None = None  # what chosen_modes reports
        self.got_grad = False
        # a bound method, as before the taps: a deep copy of the model gets a copy of the clipper, not
        # hooks that feed this one
        self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module, args, output):
        """Forward hook: keep the input, return the output through a tap (unchanged where no grad flows)."""
        if not (torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad):
            return None
        call = _Call(args[0].detach())
        tapped = _Tap.apply(output, self.clipper._anchor, self.clipper, self, call)
        call.watch(tapped)
        self.calls.append(call)
        return tapped

    def trainable(self, name: str) -> bool:
        p = getattr(self.module, name, None)
        return p is not None and p.requires_grad

    def kept(self):
        """(input, output grad) of every call that kept them for after the backward."""
        conv = isinstance(self.module, nn.Conv2d)
        for call in self.calls:
            if call.g is not None:
                yield (call.x.contiguous() if conv else call.x), call.g

    def free(self) -> None:
        for call in self.calls:
            call.drop()  # a tap of a freed call that fires later (a stale graph) finds nothing
        self.calls.clear()
        self.per_example.clear()
        self.plan, self.got_grad = None, False


class _Tap(torch.autograd.Function):
    """The identity on a layer's output whose backward hands the output gradient to the clipper as the
    backward reaches the layer. ``anchor`` (a 0-dim leaf) is what ``GhostClipper`` differentiates with
    respect to, so autograd runs every tap; the tap returns no gradient for it. The forward returns
    ``output.detach()``: the same storage and version counter, not an autograd view (see the module doc)."""

    @staticmethod
    def forward(ctx, output, anchor, clipper, layer, call):
        ctx.clipper, ctx.layer, ctx.call = clipper, layer, call
        return output.detach()

    @staticmethod
    def backward(ctx, g):
        ctx.clipper._on_grad(ctx.layer, ctx.call, g)
        return g, None, None, None, None


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for a tensor stored in half precision (autocast): norms and sums are accumulated in fp32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _conv_input(m: nn.Conv2d, x: torch.Tensor):
    """(input, padding) as the conv saw them: "same"/"valid" become torch's own (possibly asymmetric) zeros."""
    if isinstance(m.padding, str):
        return F.pad(x, m._reversed_padding_repeated_twice), 0
    return x, m.padding


def _matmul_operands(layer: _Layer, b: int, k: int):
    """Inputs a (B, S, G, I) and output grads g (B, S, G, O), scaled by 1/K, with S = K * positions
    summed over calls; a Linear is one group, a Conv2d after im2col has ``groups``."""
    m = layer.module
    a_parts, g_parts = [], []
    for x, g in layer.kept():
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
        g_parts.append(g / k if k > 1 else g)
    if len(a_parts) == 1:  # one call: no copy
        return a_parts[0], g_parts[0]
    return torch.cat(a_parts, dim=1), torch.cat(g_parts, dim=1)


def _positions(m: nn.Module, out_shape: torch.Size) -> int:
    """Output positions per row of one call (tokens of a Linear, pixels of a Conv2d output)."""
    return math.prod(out_shape[1:-1]) if isinstance(m, nn.Linear) else math.prod(out_shape[2:])


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


# K > 1: rows with at most this many output positions get their per-example conv gradients with the
# example's K rows as the batch of the grouped convolution (the kernel sums them), others one row per
# group and a mean. Measured on the 2-core CPU (one thread, B = 32, K = 4): the first is 1.3-6x faster
# at 8x8 and 16x16 outputs with 64-384 channels, 1.1-1.3x slower at 32x32 with 32-96 channels.
_FOLD_MAX_POSITIONS = 256


def _conv_example_grads(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """Per-example weight gradients (N / K, *weight.shape) of a Conv2d, each the mean of the example's
    K rows' (rows example-major), by one grouped weight-gradient convolution (see _FOLD_MAX_POSITIONS)."""
    b = x.shape[0] // k
    if k == 1 or g[0, 0].numel() > _FOLD_MAX_POSITIONS:
        rows = _conv_row_grads(m, x, g)  # (N, *weight.shape)
        return rows if k == 1 else rows.view(b, k, *m.weight.shape).mean(dim=1)
    x, padding = _conv_input(m, x)
    # (K, B C, H, W): row k of every example is batch entry k; example i's channels are groups i*G ..
    x = x.reshape(b, k, *x.shape[1:]).transpose(0, 1).reshape(k, b * x.shape[1], *x.shape[2:])
    g = g.reshape(b, k, *g.shape[1:]).transpose(0, 1).reshape(k, b * g.shape[1], *g.shape[2:])
    w = torch.nn.grad.conv2d_weight(x, (b * m.out_channels, *m.weight.shape[1:]), g, stride=m.stride,
                                    padding=padding, dilation=m.dilation, groups=b * m.groups)
    return w.view(b, *m.weight.shape).div_(k)


_SLICE_ELEMENTS = 1 << 24  # per-row gradients materialised at once by the conv instantiate path (64 MiB fp32)
# per-example gradients of all the fused layers (GhostClipper._fused_clip) at once: 32 MiB fp32. Larger
# slices run faster (2 threads, batch 32: 61 ms for the 17 fused convs in one slice, 81 ms in slices of
# 8 examples), but they are made after the backward, where the heap's holes left by autograd are too
# small for them: they add to the process's peak RSS on the CPU (batch 32, K = 1, three runs each: peak
# RSS growth 316-334 MiB with 2^24, 289-325 MiB with 2^23, 313-329 MiB before the fusion; non-private
# 303-306 MiB)
_FUSED_SLICE_ELEMENTS = 1 << 23
# ... but at least this many examples per slice: the grouped convolution runs a few examples' wide layers
# poorly (2 threads, the 10.1M UNet at batch 32, K = 1: its 7 fused 16x16 convs, 10.6 MB per example,
# took 481 ms in slices of 3 examples, 393 ms of 6, 322 ms of 12)
_FUSED_MIN_EXAMPLES = 8


def _conv_slices(m: nn.Conv2d, b: int, k: int):
    """Slices of examples [s, e) whose K rows' per-row conv weight gradients take ~``_SLICE_ELEMENTS``."""
    step = max(1, _SLICE_ELEMENTS // (k * m.weight.numel()))
    return [(s, min(b, s + step)) for s in range(0, b, step)]


CONV_GHOST_BACKEND = "auto"  # veil.kernels.ghost_norm's backend; the tests set "triton" (interpreter on the CPU)


def _conv_kernel_applies(layer: _Layer) -> bool:
    """The Triton ghost norm of a Conv2d (no im2col) takes one call of a groups=1, integer-padded conv,
    on CUDA (or wherever CONV_GHOST_BACKEND forces it); otherwise im2col + Grams in PyTorch."""
    m = layer.module
    if not (isinstance(m, nn.Conv2d) and m.groups == 1 and not isinstance(m.padding, str)
            and len(layer.calls) == 1 and layer.calls[0].g is not None):
        return False
    return CONV_GHOST_BACKEND != "auto" or layer.calls[0].x.is_cuda


def _kept_sq_norms(layer: _Layer, b: int, k: int) -> torch.Tensor:
    """Squared per-example norm (B,) of a ghost-norm layer from its kept (input, output grad): the
    weight's by the ghost norm, the bias's instantiated."""
    m = layer.module
    if _conv_kernel_applies(layer):
        from veil.kernels.ghost_norm import conv2d_ghost_sq_norms

        ((x, g),) = layer.kept()
        sq = conv2d_ghost_sq_norms(x.contiguous(), g.contiguous(), kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                                   dilation=m.dilation, rows_per_example=k, backend=CONV_GHOST_BACKEND)
        if layer.trainable("bias"):
            sq += _bias_sq(layer, b, k)
        return sq
    a, g = _matmul_operands(layer, b, k)
    gram_a = torch.einsum("bsgi,btgi->bgst", a, a)  # (B, G, S, S)
    gram_g = torch.einsum("bsgo,btgo->bgst", g, g)
    sq = torch.einsum("bgst,bgst->b", gram_a, gram_g)
    if layer.trainable("bias"):
        sq += g.sum(dim=1).pow(2).sum(dim=(1, 2))
    return sq


def _bias_sq(layer: _Layer, b: int, k: int) -> torch.Tensor:
    """Squared norms (B,) of a Conv2d's per-example bias gradients (sum over positions, mean over K)."""
    total = None
    for x, g in layer.kept():
        r = _wide(g).sum(dim=(2, 3)).view(b, k, -1).mean(dim=1)
        total = r if total is None else total + r
    return total.pow(2).sum(dim=1)


def _matmul_clipped(layer: _Layer, b: int, k: int, c: torch.Tensor) -> None:
    """Book-keeping: p.grad = sum_i c_i G_i, the weight gradient of the batch with each row's output
    gradient scaled by c_i / K (its example's clip factor, the mean over K): one native weight-gradient
    kernel (conv) or matmul (Linear) per call, the cost of the ordinary weight gradient."""
    m = layer.module
    weight, bias = None, None
    for x, g in layer.kept():
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


def _norm_rows(layer: _Layer, x: torch.Tensor, g: torch.Tensor, b: int, k: int) -> dict[str, torch.Tensor]:
    """One call's GroupNorm/LayerNorm per-example grads {name: (B, *p.shape)}, each the mean over K rows."""
    x, g = _wide(x), _wide(g)
    rows = (_group_norm_rows if isinstance(layer.module, nn.GroupNorm) else _layer_norm_rows)(layer, x, g)
    return {name: r.reshape(b, k, *r.shape[1:]).mean(dim=1) for name, r in rows.items()}


def _layer_norm_rows(layer: _Layer, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row LayerNorm grads {name: (N, *p.shape)}: sum_s g_s * x_hat_s and sum_s g_s."""
    m = layer.module
    x_hat = F.layer_norm(x, m.normalized_shape, eps=m.eps)  # (N, *, *normalized_shape)
    dims = tuple(range(1, x.dim() - len(m.normalized_shape)))
    out = {}
    if layer.trainable("weight"):
        out["weight"] = (g * x_hat).sum(dim=dims)  # (N, *p.shape)
    del x_hat
    if layer.trainable("bias"):
        out["bias"] = g.sum(dim=dims)
    return out


def _group_norm_rows(layer: _Layer, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row GroupNorm grads {name: (N, C)}: sum_s g_s * x_hat_s and sum_s g_s, by PyTorch's own
    GroupNorm backward on the N rows laid side by side as one row of N C channels in N G groups (the
    same groups), so that its gamma and beta gradients, summed over rows and positions, are summed over
    positions only: one pass over x and g, without forming x_hat (1.2-7x faster on the CPU)."""
    m = layer.module
    n, c, hw = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    x, g = x.reshape(1, n * c, hw).contiguous(), g.reshape(1, n * c, hw).contiguous()
    groups = n * m.num_groups
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, 1, n * c, hw, groups, m.eps)  # (1, N G)
    mask = [False, layer.trainable("weight"), layer.trainable("bias")]
    ones = torch.ones(n * c, dtype=x.dtype, device=x.device)  # gamma = 1: dgamma is sum_s g_s x_hat_s
    _, w, bias = torch.ops.aten.native_group_norm_backward(g, x, mean, rstd, ones, 1, n * c, hw, groups, mask)
    out = {}
    if mask[1]:
        out["weight"] = w.view(n, c)
    if mask[2]:
        out["bias"] = bias.view(n, c)
    return out


def _matmul_rows(layer: _Layer, x: torch.Tensor, g: torch.Tensor, b: int, k: int) -> dict[str, torch.Tensor]:
    """One call's per-example Linear/Conv2d grads {name: (B, *p.shape)}, each the mean over K rows: an
    einsum (Linear) or grouped weight-gradient convolutions a slice of examples at a time (Conv2d)."""
    m = layer.module
    out = {}
    if isinstance(m, nn.Linear):
        x, g = _wide(x), _wide(g)
        g2 = g.reshape(b, -1, g.shape[-1])  # (B, K T, O)
        if layer.trainable("weight"):
            w = torch.einsum("bso,bsi->boi", g2, x.reshape(b, -1, x.shape[-1]))  # (B, O, I)
            out["weight"] = w.div_(k) if k > 1 else w
        if layer.trainable("bias"):
            out["bias"] = g2.sum(dim=1).div_(k)
        return out
    if layer.trainable("weight"):
        slices, w = _conv_slices(m, b, k), None
        if len(slices) > 1:
            w = torch.empty(b, *m.weight.shape, dtype=_wide_dtype(x.dtype), device=x.device)
        for s, e in slices:
            rows = _conv_example_grads(m, _wide(x[s * k : e * k]).contiguous(), _wide(g[s * k : e * k]), k)
            if w is None:  # one slice: no copy
                w = rows
            else:
                w[s:e] = rows
            del rows
        out["weight"] = w
    if layer.trainable("bias"):
        out["bias"] = _wide(g).sum(dim=(2, 3)).view(b, k, -1).mean(dim=1)
    return out


def _sq(r: torch.Tensor) -> torch.Tensor:
    """Squared norms (B,) of per-example gradients (B, ...) without a squared copy of them."""
    r = r.flatten(1)
    return torch.linalg.vector_norm(r, dim=1).square()


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
        self._anchor = torch.zeros((), requires_grad=True)  # what the one backward differentiates for
        self._active: tuple[int, int] | None = None  # (B, K) while this clipper's backward runs
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
        self._layers = [_Layer(path, module, self) for path, module in to_hook]

    @property
    def stored_tensors(self) -> int:
        """How many inputs, outputs (weak references), output gradients and per-example gradients the
        clipper holds now (0 after ``backward``)."""
        return sum(sum((c.x is not None) + (c.out is not None) + (c.g is not None) for c in l.calls)
                   + len(l.per_example) for l in self._layers)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors the clipper holds now (inputs, kept output gradients, per-example gradients;
        an input that autograd saves too is counted, though it shares autograd's storage)."""
        def nbytes(t):
            return 0 if t is None else t.numel() * t.element_size()
        return sum(sum(nbytes(c.x) + nbytes(c.g) for c in l.calls) + sum(map(nbytes, l.per_example.values()))
                   for l in self._layers)

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
            self._plan(b, k)
            if total.requires_grad and any(layer.calls for layer in self._layers):
                # The one backward. Autograd computes what flows to the taps (every layer's output
                # gradient, each handed to _on_grad as the backward reaches the layer), not the
                # (unclipped) parameter gradients: the clipped ones are computed once, below.
                self._active = (b, k)
                torch.autograd.grad(total, [self._anchor], allow_unused=True)
                self._active = None
            # The norms and sums run outside any autocast of the caller's step: fp32 (or the
            # stored fp64), whatever precision the forward used.
            with torch.autocast(total.device.type, enabled=False):
                return self._clip(b, k, total)
        finally:
            self._active = None
            for layer in self._layers:
                layer.free()

    def _plan(self, b: int, k: int) -> None:
        """Before the backward: check every call (rows, outputs not modified in place), drop the weak
        references, and give each layer its path (module doc, "The algorithm")."""
        for layer in self._layers:
            m = layer.module
            for call in layer.calls:
                if call.x.shape[0] != b * k:
                    raise ConfigError(f"{layer.path} saw {call.x.shape[0]} rows but losses has {b * k}: call "
                                      "clipper.backward once after each forward pass")
                out = call.out() if call.out is not None else None
                if out is not None and out._version != call.version:
                    raise ConfigError(f"the output of {layer.path} ({type(m).__name__}) was modified in "
                                      "place after the layer ran; ghost clipping needs each layer's output gradient "
                                      "(make the operation out of place, or use dp.engine: opacus)")
                call.out = None
            if not layer.calls:
                continue
            if isinstance(m, _NORM):
                layer.plan = "norm"
                continue
            if not layer.trainable("weight"):
                layer.plan, layer.chosen = "now", "bias only"
                continue
            w = m.weight  # (O, I) or (O, C / groups, kh, kw)
            if self.mode == "auto":
                s = k * sum(_positions(m, call.out_shape) for call in layer.calls)
                groups = m.groups if isinstance(m, nn.Conv2d) else 1
                layer.chosen = "ghost" if use_ghost(s, w[0].numel(), w.shape[0] // groups) else "instantiate"
            else:
                layer.chosen = self.mode
            layer.plan = layer.chosen
            if layer.chosen == "instantiate":
                # per-example gradients in the tap if they are no larger than what they are made from
                per_example = b * w.numel() * _wide_dtype(layer.calls[0].x.dtype).itemsize
                operands = sum(c.x.numel() * c.x.element_size() + c.out_bytes for c in layer.calls)
                if per_example <= operands:
                    layer.plan = "now"

    def _on_grad(self, layer: _Layer, call: _Call, g: torch.Tensor) -> None:
        """A tap's backward: the output gradient of one call of ``layer``, as the backward reaches it."""
        if self._active is None or call.x is None:  # not this clipper's backward, or a freed call
            return
        b, k = self._active
        x, call.x = call.x, None
        layer.got_grad = True
        if not b:
            return
        if layer.plan in ("ghost", "instantiate"):
            call.x, call.g = x, g  # for the ghost norm / slices and book-keeping after the backward
            return
        with torch.autocast(g.device.type, enabled=False):
            rows = (_norm_rows if layer.plan == "norm" else _matmul_rows)(layer, x, g, b, k)
            del x
            for name, r in rows.items():
                if name in layer.per_example:
                    layer.per_example[name].add_(r)  # a layer used twice: its calls' gradients add up
                else:
                    layer.per_example[name] = r

    def _clip(self, b: int, k: int, losses: torch.Tensor) -> torch.Tensor:
        # 1. squared norms, layer by layer: the kept per-example gradients, or the ghost norm from the
        #    kept (input, output grad) (im2col rebuilt for step 3 rather than kept: kh*kw times the
        #    input); the instantiated layers that kept (input, output grad) are step 2's
        dtype = torch.promote_types(losses.dtype, torch.float32)
        sq = torch.zeros(b, dtype=dtype, device=losses.device)
        fused = []
        for layer in self._layers if b else []:  # an empty batch: no norms, zero gradients below
            if not layer.got_grad:
                continue
            if isinstance(layer.module, _MATMUL):
                self.chosen_modes[layer.path] = layer.chosen
            if layer.plan == "instantiate":
                fused.append(layer)
                continue
            if layer.plan == "ghost":
                sq += _kept_sq_norms(layer, b, k).to(dtype)
            for r in layer.per_example.values():
                sq += _sq(r).to(dtype)
        # 2. clip factors, with the instantiated layers' norms and clipped sums fused
        norms = self._fused_clip(fused, sq, b, k)
        c = self._factors(norms)
        # 3. the other clipped sums, freeing each layer once done; unused parameters get zeros
        for layer in self._layers:
            if b and layer.got_grad:  # sets every trainable parameter's grad of the layer
                if layer.plan == "ghost":
                    _matmul_clipped(layer, b, k, c)  # book-keeping
                for name, r in layer.per_example.items():
                    p = getattr(layer.module, name)
                    p.grad = (c.to(r.dtype) @ r.flatten(1)).view(p.shape).to(p.dtype)
            else:
                for name in ("weight", "bias"):
                    if layer.trainable(name):
                        p = getattr(layer.module, name)
                        p.grad = torch.zeros_like(p)
            layer.free()
        return norms

    def _factors(self, norms: torch.Tensor) -> torch.Tensor:
        """Clip factors as Opacus: c_i = min(1, C / (norm_i + 1e-6))."""
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

    def _fused_clip(self, fused: list[_Layer], sq: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """The norms (B,) from ``sq`` (every other layer's squared norms) and ``fused``, the instantiated
        layers that kept (input, output grad); sets the fused layers' clipped sums. A slice of examples at
        a time: their per-example gradients in the fused layers (summed over calls) complete the slice's
        squared norms, hence its clip factors, and ``p.grad += c[slice] @ G[slice]``. One pass over each
        (a, g) and nothing per example kept beyond the slice (``_FUSED_SLICE_ELEMENTS``): no book-keeping
        pass, and no B x parameters held after the backward."""
        norms, sums = torch.empty_like(sq), {}
        per_example = sum(getattr(layer.module, name).numel() for layer in fused
                          for name in ("weight", "bias") if layer.trainable(name))
        step = max(_FUSED_MIN_EXAMPLES, _FUSED_SLICE_ELEMENTS // max(per_example, 1))
        for s in range(0, b, step):
            e = min(b, s + step)
            part, rows = sq[s:e].clone(), []
            for layer in fused:
                grads = {}  # name -> (e - s, *p.shape), summed over the layer's calls
                for call in layer.calls:
                    if call.g is not None:
                        x, g = call.x[s * k : e * k], call.g[s * k : e * k]  # the slice's rows
                        for name, r in _matmul_rows(layer, x, g, e - s, k).items():
                            grads[name] = grads[name].add_(r) if name in grads else r
                for r in grads.values():
                    part += _sq(r).to(part.dtype)
                rows.append((layer, grads))
            # rounding may leave a tiny negative ghost sum for an all-zero gradient
            norms[s:e] = part.clamp_min(0).sqrt()
            c = self._factors(norms[s:e])
            for layer, grads in rows:
                for name, r in grads.items():
                    share = c.to(r.dtype) @ r.flatten(1)
                    sums[layer, name] = sums[layer, name].add_(share) if (layer, name) in sums else share
            del rows
        for (layer, name), total in sums.items():
            p = getattr(layer.module, name)
            p.grad = total.view(p.shape).to(p.dtype)
        return norms

    def remove(self) -> None:
        """Remove the hooks and drop anything stored."""
        for layer in self._layers:
            layer.handle.remove()
            layer.free()
        self._layers = []
