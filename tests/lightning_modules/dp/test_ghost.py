"""Ghost clipping (``veil.lightning_modules.dp.ghost``) against a per-example autograd loop.

The ground truth cannot be wrong in the same way: for each example, ordinary autograd of the mean of
its K rows' losses, one example at a time, then norms, clip factors and the clipped sum in plain
PyTorch. ``GhostClipper`` must match it from one backward of the whole batch, on both of its paths
(ghost norm, instantiated per-example gradients), with noise multiplicity K = 1 and 4, on an MLP, a
conv net (stride, padding, dilation, groups, channels_last input) and the veil UNet with and without
attention. The clip bound always lies between the smallest and the largest true norm, so the factors
matter. Run: OMP_NUM_THREADS=1 pytest tests/lightning_modules/dp/test_ghost.py
"""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from dp_helpers import TINY_MODEL
from torch import nn

from veil.errors import ConfigError
from veil.lightning_modules.dp.ghost import GhostClipper, UnsupportedLayer
from veil.lightning_modules.models.unet import AttributeConditionalUNet

pytestmark = pytest.mark.usefixtures("single_thread")

# float32 throughout. Norms: rtol 1e-4; clipped sums: max error <= 1e-4 x their largest entry. The loop
# and the clipper sum the same products in different orders (one example vs the whole batch through the
# UNet, batched einsums, Gram matrices of up to K*T = 1024 positions whose terms partly cancel); measured:
# <= 2e-7 on the MLP and conv net, <= 4e-6 on the UNet, the same on both paths. Every bug this file looks
# for (a missing 1/K, the norm of the sum of rows instead of the mean, a wrong or missing clip factor, a
# mis-grouped im2col) is off by more than 1e-2.
RTOL = 1e-4


# ---- ground truth and the clipper, on any model and per-row loss ----------------------------------

def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _loop_grads(model, row_loss, inputs, k):
    """(B, P): example i's gradient, the mean over its K rows of d loss_row / d theta, one at a time."""
    params = _params(model)
    b = len(inputs[0]) // k
    out = []
    for i in range(b):
        loss = row_loss(model, *[t[i * k : (i + 1) * k] for t in inputs]).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(grads, params)]))
    return torch.stack(out) if out else torch.zeros(0, sum(p.numel() for p in params))


def _clip_bound(norms):
    """Between the smallest and the largest norm (so some examples are clipped and some not); one example: half."""
    if len(norms) == 1:
        return float(norms[0]) / 2
    s = norms.sort().values
    return float((s[0] * s[-1]).sqrt())


def _compare(model, row_loss, inputs, k, mode="auto"):
    """Norms and clipped sum of GhostClipper vs the loop; returns the clipper's chosen modes."""
    truth = _loop_grads(copy.deepcopy(model), row_loss, inputs, k)  # (B, P)
    norms_true = truth.norm(dim=1)
    bound = _clip_bound(norms_true)
    c = (bound / (norms_true + 1e-6)).clamp(max=1.0)
    assert (c < 0.99).any(), "the clip bound must clip someone, else the factors are not tested"
    want = (c[:, None] * truth).sum(dim=0)

    clipper = GhostClipper(model, max_grad_norm=bound, noise_multiplicity=k, mode=mode)
    norms = clipper.backward(row_loss(model, *inputs))
    got = torch.cat([p.grad.reshape(-1) for p in _params(model)])
    clipper.remove()

    torch.testing.assert_close(norms, norms_true, rtol=RTOL, atol=0)
    assert (got - want).abs().max() <= RTOL * want.abs().max()
    return clipper.chosen_modes


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- models ----------------------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    # first Linear sees 4 tokens per row: 2 T^2 = 32 <= 5*7 = 35 (ghost at K=1), 2 (4T)^2 > 35 at K=4
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.GELU(), nn.Linear(7, 3))


def _mlp_inputs(n, seed=0):
    return _randn(n, 4, 5, seed=seed), _randn(n, 4, 3, seed=seed + 1)


def _mlp_loss(model, x, target):
    return (model(x) - target).pow(2).mean(dim=(1, 2))  # (N,)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.GroupNorm(2, 6), nn.SiLU(),
            nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=2), nn.SiLU(),
            nn.Conv2d(6, 4, (2, 3), stride=(1, 2), padding=(1, 0), bias=False),
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def _conv_inputs(n, seed=0):
    x = _randn(n, 3, 8, 8, seed=seed).to(memory_format=torch.channels_last)  # non-contiguous conv input
    return x, _randn(n, 2, seed=seed + 1)


def _conv_loss(model, x, target):
    return (model(x) - target).pow(2).sum(dim=1)


def _unet(attention):
    torch.manual_seed(0)
    model = AttributeConditionalUNet(**{**TINY_MODEL, "attention_levels": (False, attention)})
    if not attention:  # UNet2DModel's mid block has attention of its own; this is diffusers' add_attention=False
        model.unet.mid_block.attentions[0] = None
    return model


def _unet_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)  # one fixed timestep per row
    a = torch.randint(-1, 2, (n, 3), generator=g).float()
    return x, t, a, torch.randn(n, 3, 16, 16, generator=g)


def _unet_loss(model, x, t, a, noise):
    return (model(x, t, a) - noise).pow(2).mean(dim=(1, 2, 3))  # MSE of the noise prediction per row


# ---- agreement with the loop ------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("mode", ["ghost", "instantiate", "auto"])
def test_mlp_matches_loop(mode, k):
    modes = _compare(_mlp(), _mlp_loss, _mlp_inputs(3 * k), k, mode)
    assert set(modes) == {"0", "3"}
    if mode != "auto":
        assert set(modes.values()) == {mode}


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("mode", ["ghost", "instantiate", "auto"])
def test_conv_net_matches_loop(mode, k):
    modes = _compare(_ConvNet(), _conv_loss, _conv_inputs(3 * k), k, mode)
    assert len(modes) == 4


@pytest.mark.parametrize("attention", [False, True], ids=["no-attention", "attention"])
@pytest.mark.parametrize("k", [1, 4])
def test_unet_matches_loop(attention, k):
    model = _unet(attention)
    modes = _compare(model, _unet_loss, _unet_inputs(3 * k), k)
    # the mixed rule really mixes on the UNet: both paths taken in one model
    assert {"ghost", "instantiate"} <= set(modes.values())
    assert any(".attentions." in path for path in modes) == attention


def test_unet_ghost_and_instantiate_agree():
    norms = {}
    for mode in ("ghost", "instantiate"):
        model = _unet(True)
        clipper = GhostClipper(model, max_grad_norm=1.0, noise_multiplicity=2, mode=mode)
        norms[mode] = clipper.backward(_unet_loss(model, *_unet_inputs(4)))
        assert set(clipper.chosen_modes.values()) == {mode}
    torch.testing.assert_close(norms["ghost"], norms["instantiate"], rtol=RTOL, atol=0)


def test_auto_rule_is_the_cheaper_path_and_counts_k_times_positions():
    """Ghost when S (I + O) < I O, S = K x positions: a Linear(64, 64) on 8 tokens is ghost at K = 1
    (8 x 128 < 4096) and instantiated at K = 4 (32 x 128 = 4096); the MLP's small layers never are."""
    from veil.lightning_modules.dp.ghost import use_ghost

    assert use_ghost(8, 64, 64) and not use_ghost(32, 64, 64) and not use_ghost(4, 5, 7)
    for k, expected in [(1, "ghost"), (4, "instantiate")]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        x = torch.randn(2 * k, 8, 64)
        clipper = GhostClipper(model, max_grad_norm=1.0, noise_multiplicity=k)
        clipper.backward(model(x).pow(2).mean(dim=(1, 2)))
        assert clipper.chosen_modes["0"] == expected
        assert clipper.chosen_modes["2"] == "instantiate"  # 8 x 65 >= 64 x 1
        model = _mlp()
        clipper = GhostClipper(model, max_grad_norm=1.0, noise_multiplicity=k)
        clipper.backward(_mlp_loss(model, *_mlp_inputs(2 * k)))
        assert set(clipper.chosen_modes.values()) == {"instantiate"}


@pytest.mark.parametrize("k", [1, 4])
def test_batch_of_one(k):
    _compare(_ConvNet(), _conv_loss, _conv_inputs(k), k)
    _compare(_mlp(), _mlp_loss, _mlp_inputs(k), k)


def test_clip_factors_matter():
    model, k = _mlp(), 2
    inputs = _mlp_inputs(4 * k)
    truth = _loop_grads(copy.deepcopy(model), _mlp_loss, inputs, k)
    bound = _clip_bound(truth.norm(dim=1))
    clipper = GhostClipper(model, max_grad_norm=bound, noise_multiplicity=k)
    norms = clipper.backward(_mlp_loss(model, *inputs))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert (norms > bound).any() and (norms < bound).any()
    assert (got - truth.sum(dim=0)).abs().max() > 0.1 * got.abs().max()  # not the unclipped sum
    assert got.norm() <= len(norms) * bound * (1 + 1e-5)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("make,inputs,loss", [(_mlp, _mlp_inputs, _mlp_loss), (_ConvNet, _conv_inputs, _conv_loss)],
                         ids=["mlp", "conv"])
def test_empty_batch(make, inputs, loss, k):
    model = make()
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # stale gradients must not survive
    clipper = GhostClipper(model, max_grad_norm=1.0, noise_multiplicity=k)
    norms = clipper.backward(loss(model, *inputs(0)))
    assert norms.shape == (0,)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used, self.unused = nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        self.unused(x)  # computed, never reaches the loss
        return self.used(x)


def test_layer_outside_the_loss_gets_zero_gradient():
    model = _TwoHeads()
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # stale gradients must not survive
    _compare(model, _mlp_loss, _mlp_inputs(6), 2)
    assert not model.unused.weight.grad.any() and not model.unused.bias.grad.any()


# ---- refusals, hooks, memory --------------------------------------------------------------------------

class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.gain


@pytest.mark.parametrize("layer,name", [
    (nn.BatchNorm2d(3), "BatchNorm2d"), (_Scale(), "_Scale"), (nn.Embedding(4, 3), "Embedding"),
    (nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), "Conv2d"),
])
def test_unsupported_layer_is_refused_by_path(layer, name):
    model = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 3, 1), body=nn.Sequential(nn.Identity(), layer)))
    with pytest.raises(UnsupportedLayer, match=rf"body\.1 \({name}\)"):
        GhostClipper(model, max_grad_norm=1.0)
    layer.requires_grad_(False)  # a frozen layer owns no trainable parameter: accepted
    GhostClipper(model, max_grad_norm=1.0).remove()


def test_shared_parameter_is_refused():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(UnsupportedLayer, match="shares a parameter"):
        GhostClipper(nn.Sequential(a, b), max_grad_norm=1.0)


def test_bad_arguments_are_refused():
    model = _mlp()
    with pytest.raises(ConfigError, match="mode"):
        GhostClipper(model, max_grad_norm=1.0, mode="fast")
    with pytest.raises(ConfigError, match="max_grad_norm"):
        GhostClipper(model, max_grad_norm=0.0)
    clipper = GhostClipper(model, max_grad_norm=1.0, noise_multiplicity=2)
    with pytest.raises(ConfigError, match="noise_multiplicity"):
        clipper.backward(_mlp_loss(model, *_mlp_inputs(3)))  # 3 rows are not whole examples of K=2
    model(_mlp_inputs(4)[0])  # a forward whose rows are not the losses' rows
    with pytest.raises(ConfigError, match="once after each forward"):
        clipper.backward(_mlp_loss(model, *_mlp_inputs(2)))


def test_backward_frees_storage_and_remove_unhooks():
    model = _mlp()
    clipper = GhostClipper(model, max_grad_norm=1.0)
    losses = _mlp_loss(model, *_mlp_inputs(2))
    assert clipper.stored_tensors == 6  # the inputs and (weak references to) outputs of Linear, LayerNorm, Linear
    clipper.backward(losses)
    assert clipper.stored_tensors == 0
    with torch.no_grad():
        model(_mlp_inputs(2)[0])
    assert clipper.stored_tensors == 0  # nothing kept without grad

    twin = copy.deepcopy(model)  # a deep copy's hooks feed a copy of the clipper, not this one
    twin(_mlp_inputs(2)[0])
    assert clipper.stored_tensors == 0

    clipper.remove()
    assert all(not m._forward_hooks for m in model.modules())
    _mlp_loss(model, *_mlp_inputs(2)).sum().backward()
    assert clipper.stored_tensors == 0


# ---- the taps: layers used twice, memory during the backward, in-place outputs, errors -----------------

class _Twice(nn.Module):
    """Hooked layers used twice in one forward (their calls' per-example gradients add up): a GroupNorm, a
    conv at 8x8 with few channels (per-example gradients computed in the tap), a conv at 2x2 with many
    (its input and output gradient kept: ghost norm, or instantiated after the backward), a Linear on 4
    tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.wide = nn.Conv2d(4, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 16, 4, stride=4)
        self.deep = nn.Conv2d(16, 16, 3, padding=1)
        self.lin = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = self.stem(x)
        h = self.wide(F.silu(self.norm(h)))
        h = self.wide(F.silu(self.norm(h)))
        h = self.down(h)
        h = self.deep(torch.tanh(self.deep(h)))
        t = h.flatten(2).transpose(1, 2)  # (N, 4, 16)
        t = self.lin(torch.tanh(self.lin(t)))
        return self.head(t.mean(dim=1))


def _spy_plans(monkeypatch):
    """Records each layer's path through the backward ({path: plan}) of every GhostClipper.backward."""
    from veil.lightning_modules.dp import ghost as G

    plans = {}
    real = G.GhostClipper._plan

    def spy(self, b, k):
        real(self, b, k)
        plans.update({layer.path: layer.plan for layer in self._layers if layer.calls})

    monkeypatch.setattr(G.GhostClipper, "_plan", spy)
    return plans


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("mode", ["ghost", "instantiate", "auto"])
def test_layers_used_twice_match_loop(mode, k, monkeypatch):
    plans = _spy_plans(monkeypatch)
    modes = _compare(_Twice(), _conv_loss, _conv_inputs(3 * k), k, mode)
    assert len(modes) == 6 and plans["norm"] == "norm"
    twice = {name: plans[name] for name in ("wide", "deep", "lin")}
    if mode == "ghost":  # every call's (a, g) kept
        assert twice == {"wide": "ghost", "deep": "ghost", "lin": "ghost"}
    elif mode == "instantiate" or k == 4:  # per-example in the tap, or (2x2, 16 channels) after the backward
        assert twice == {"wide": "now", "deep": "instantiate", "lin": "now"}
    else:
        assert twice == {"wide": "now", "deep": "ghost", "lin": "now"}


def test_backward_holds_less_than_every_layers_input_and_output_grad(monkeypatch):
    """Taking every output gradient from one autograd.grad at the end (the design before the taps) held
    every layer's input and output gradient at once when the backward ended. The taps use each layer's
    as the backward reaches it: what the clipper holds after any tap is less than that sum, and after the
    last tap (per-example gradients, the ghost-norm layers' input and output gradients) far less."""
    from veil.lightning_modules.dp import ghost as G

    held, operands = [], [0]
    real = G.GhostClipper._on_grad

    def spy(self, layer, call, g):
        operands[0] += call.x.numel() * call.x.element_size() + g.numel() * g.element_size()
        real(self, layer, call, g)
        held.append(self.stored_bytes)

    monkeypatch.setattr(G.GhostClipper, "_on_grad", spy)
    plans = _spy_plans(monkeypatch)
    model, k = _unet(True), 2
    clipper = GhostClipper(model, max_grad_norm=1.0, noise_multiplicity=k)
    losses = _unet_loss(model, *_unet_inputs(4 * k))
    calls = sum(len(layer.calls) for layer in clipper._layers)
    clipper.backward(losses)
    assert len(held) == calls  # every tap fired, once
    assert {"now", "ghost", "norm"} <= set(plans.values())
    assert max(held) < operands[0]
    assert held[-1] < operands[0] / 2
    assert clipper.stored_bytes == 0 and clipper.stored_tensors == 0


class _InPlace(nn.Module):
    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.how, self.lin, self.norm, self.head = how, nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        if self.how == "mul_":
            h.mul_(2)
        h = self.norm(h)
        if self.how == "silu":
            h = F.silu(h, inplace=True)
        return self.head(h)


@pytest.mark.parametrize("how,path", [("mul_", r"lin \(Linear\)"), ("silu", r"norm \(LayerNorm\)")])
def test_output_modified_in_place_is_refused(how, path):
    model = _InPlace(how)
    clipper = GhostClipper(model, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match=rf"the output of {path} was modified in place"):
        clipper.backward(_mlp_loss(model, *_mlp_inputs(2)))
    assert clipper.stored_tensors == 0
    model.how = None  # out of place: accepted
    _compare(model, _mlp_loss, _mlp_inputs(4), 1)


def test_taps_change_neither_the_forward_nor_an_ordinary_backward():
    # not _ConvNet: torch 2.13's CPU bf16 conv2d gets its last conv (kernel (2, 3), stride (1, 2), padding
    # (1, 0)) wrong, with or without the taps
    model = _Twice()
    plain = copy.deepcopy(model)
    x, target = _conv_inputs(4)
    clipper = GhostClipper(model, max_grad_norm=1.0)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, want = model(x), plain(x)
        assert out.dtype == want.dtype and torch.equal(out, want)
    _conv_loss(model, x, target).sum().backward()  # a backward the clipper does not run: taps pass through
    _conv_loss(plain, x, target).sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    clipper.remove()


def test_an_error_during_the_backward_frees_everything(monkeypatch):
    from veil.lightning_modules.dp import ghost as G

    model = _mlp()
    clipper = GhostClipper(model, max_grad_norm=1.0)

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(G, "_norm_rows", boom)  # the LayerNorm's tap fails mid-backward
    with pytest.raises(RuntimeError, match="boom"):
        clipper.backward(_mlp_loss(model, *_mlp_inputs(2)))
    assert clipper.stored_tensors == 0 and clipper._active is None
    monkeypatch.undo()
    _compare(model, _mlp_loss, _mlp_inputs(4), 1)  # the next step is unaffected


# ---- after the backward: the fused norm and clipped sum; the per-example kernels ---------------------

@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("elements,min_examples", [(1, 1), (1, 2), (1 << 30, 1)],
                         ids=["one-example-slices", "two-example-slices", "one-slice"])
def test_fused_norm_and_clipped_sum_match_loop(elements, min_examples, k, monkeypatch):
    """The instantiated layers that held (a, g) through the backward get their per-example gradients a
    slice of examples at a time; these complete the slice's norms and add its share to the clipped sum,
    with no book-keeping pass. Any slicing matches the loop, and a slice holds the per-example gradients
    of at most ``_FUSED_SLICE_ELEMENTS`` entries, or of ``_FUSED_MIN_EXAMPLES`` examples."""
    from veil.lightning_modules.dp import ghost as G

    made, seen, fusing = [], {}, [False]
    real_rows, real_fused = G._matmul_rows, G.GhostClipper._fused_clip

    def rows(layer, x, g, b, k):
        if fusing[0]:
            made.append(b)
        return real_rows(layer, x, g, b, k)

    def fused(self, layers, sq, b, k):
        fusing[0] = True
        seen.update(layers=len(layers), b=b)
        try:
            return real_fused(self, layers, sq, b, k)
        finally:
            fusing[0] = False

    def book_keeping(*args):
        raise AssertionError("book-keeping for a layer whose clipped sum was fused")

    monkeypatch.setattr(G, "_FUSED_SLICE_ELEMENTS", elements)
    monkeypatch.setattr(G, "_FUSED_MIN_EXAMPLES", min_examples)
    monkeypatch.setattr(G, "_matmul_rows", rows)
    monkeypatch.setattr(G, "_matmul_clipped", book_keeping)  # mode="instantiate": no ghost-norm layer
    monkeypatch.setattr(G.GhostClipper, "_fused_clip", fused)
    _compare(_unet(True), _unet_loss, _unet_inputs(3 * k), k, mode="instantiate")
    assert seen["layers"] >= 10  # 3x3 convs whose per-example gradients outweigh their input + output grad
    b = seen["b"]
    step = b if elements > 1 else min_examples
    assert set(made) == {min(step, b - s) for s in range(0, b, step)}


@pytest.mark.parametrize("fold_max", [0, 1 << 20], ids=["rows-then-mean", "k-rows-in-the-kernel"])
def test_conv_gradients_of_k_rows_either_way_match_loop(fold_max, monkeypatch):
    """K > 1: a conv's per-example gradients from one row per group and the mean of the K rows, or from
    the example's K rows as the grouped convolution's batch (``_FOLD_MAX_POSITIONS`` picks by positions):
    both match the loop (stride, dilation, groups, "same" padding, channels_last; a conv used twice)."""
    from veil.lightning_modules.dp import ghost as G

    rows = []
    real = G._conv_row_grads
    monkeypatch.setattr(G, "_FOLD_MAX_POSITIONS", fold_max)
    monkeypatch.setattr(G, "_conv_row_grads", lambda *a: rows.append(1) or real(*a))
    k = 4
    _compare(_ConvNet(), _conv_loss, _conv_inputs(3 * k), k, mode="instantiate")
    _compare(_Twice(), _conv_loss, _conv_inputs(3 * k), k, mode="instantiate")
    _compare(_unet(False), _unet_loss, _unet_inputs(2 * k), k, mode="instantiate")
    assert bool(rows) == (fold_max == 0)


class _Norms(nn.Module):
    """GroupNorms on (N, C, L) (a transposed, non-contiguous view) and (N, C) inputs, one with a frozen
    weight or bias."""

    def __init__(self, frozen):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(5, 8), nn.Linear(8, 3)
        self.wide, self.flat = nn.GroupNorm(2, 8), nn.GroupNorm(4, 8)
        if frozen:
            getattr(self.wide, frozen).requires_grad_(False)

    def forward(self, x):
        h = self.wide(self.lin(x).transpose(1, 2))  # (N, 8, 4)
        return self.head(self.flat(torch.tanh(h).mean(dim=2)))  # GroupNorm on (N, 8)


@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
@pytest.mark.parametrize("k", [1, 3])
def test_group_norm_rows_match_loop(frozen, k):
    """GroupNorm's per-example gradients come from PyTorch's GroupNorm backward on the rows laid side by
    side as one row: any input rank, non-contiguous inputs, either affine parameter frozen."""
    n = 3 * k
    _compare(_Norms(frozen), _conv_loss, (_randn(n, 4, 5, seed=0), _randn(n, 3, seed=1)), k)
