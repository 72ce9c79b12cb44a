"""Torch side of the export: one DDIM denoise step, one DDIM inversion step and the classifier at t = 0,
each as one ONNX graph (dynamic batch B, named float32 inputs and outputs, opset ``OPSET``), and
``check_step_parity``, which runs them on ONNX Runtime (CPU) against the PyTorch steps.

    denoise_step.onnx  (sample, timestep, prev_timestep, attributes, guidance_scale) -> (next_sample, pred_x0)
    invert_step.onnx   (sample, timestep, next_timestep, attributes, guidance_scale) -> (next_sample,)
    classifier.onnx    (images,) -> (logits,)

The steps are ``diffusion.ddim``'s, called as ``PrivateEditor.regenerate`` / ``.invert`` call them; the
schedule table ``alphas_cumprod`` and (guided backend) the denoiser-to-classifier attribute map are
constants of the graph, timesteps are (B,) int64 tensors (-1 = the clean image).

Classifier guidance puts the classifier's input gradient inside the denoise step, and
``torch.onnx.export`` cannot trace ``torch.func.grad`` itself. So the guided step is first traced to an
aten graph by ``make_fx`` (symbolic shapes), with the parameters passed in through ``functional_call``
and ``convolution_backward`` decomposed into the one ``conv_transpose2d`` that gives the input gradient;
that graph, wrapped in a module that holds the parameters as buffers, is what the dynamo exporter sees.
Every input's dim 0 is one batch symbol (inputs tied to the sample's batch with ``torch._check``, so that
even an unused one, such as a label-free denoiser's attributes, cannot be fixed to the traced batch).

    from veil.export.graphs import export_denoise_step, check_step_parity
    export_denoise_step(editor, "out/denoise_step.onnx"); check_step_parity(editor, "out", batch=8)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from veil.errors import ExportError
from veil.lightning_modules.diffusion.ddim import ddim_denoise_step, ddim_denoise_step_x0, ddim_invert_step
from veil.lightning_modules.diffusion.guidance import GuidanceClassifier
from veil.lightning_modules.editing.editor import PrivateEditor

__all__ = ["OPSET", "DENOISE_STEP_FILE", "INVERT_STEP_FILE", "CLASSIFIER_FILE", "export_denoise_step",
           "export_invert_step", "export_classifier", "check_step_parity"]

OPSET = 18
DENOISE_STEP_FILE, INVERT_STEP_FILE, CLASSIFIER_FILE = "denoise_step.onnx", "invert_step.onnx", "classifier.onnx"
DENOISE_INPUTS = ["sample", "timestep", "prev_timestep", "attributes", "guidance_scale"]
DENOISE_OUTPUTS = ["next_sample", "pred_x0"]
INVERT_INPUTS = ["sample", "timestep", "next_timestep", "attributes", "guidance_scale"]
INVERT_OUTPUTS = ["next_sample"]
CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS = ["images"], ["logits"]
EXAMPLE_BATCH = 2  # traced at B = 2 (not 0 or 1, which the tracers specialize); B is a Dim in the graph
DYNAMO = "torch.onnx.export(dynamo=True)"


# -- the steps, as modules of tensors -----------------------------------------------------------------
def _to_classifier_order(names: list[str], guide: GuidanceClassifier) -> torch.Tensor:
    """(k, k_clf) 0/1 matrix: attrs (B,k) in the denoiser's order @ it = ``guide.targets_for(attrs, names)``
    (an attribute the classifier does not know is dropped; targets_for raises instead, at the edit)."""
    m = torch.zeros(len(names), len(guide.attribute_names))
    for i, name in enumerate(names):
        if name in guide.attribute_names:
            m[i, guide.attribute_names.index(name)] = 1.0
    return m


def _same_batch(sample: torch.Tensor, *others: torch.Tensor) -> None:
    """Tie every input's dim 0 to the sample's, also where an input goes unused (a label-free denoiser's
    attributes and w): the exporter then gives them one batch symbol instead of one each."""
    for x in others:
        torch._check(x.shape[0] == sample.shape[0])


class _DenoiseStep(nn.Module):
    """One denoise step as ``PrivateEditor.regenerate`` takes it (see the module docstring for the inputs)."""

    def __init__(self, editor: PrivateEditor):
        super().__init__()
        self.model, self.guide = editor.model, editor.guide
        self.clip_sample, self.label_free = editor.clip_sample, editor.label_free
        self.cfg_scale = 1.0 if editor.label_free else editor.guidance_scale  # guided backend: a constant w
        self.register_buffer("alphas_cumprod", editor.alphas_cumprod.float().clone())
        if self.guide is not None:
            self.guide_model = self.guide.model  # registered, so functional_call reaches its parameters
            self.register_buffer("to_classifier", _to_classifier_order(editor.attribute_names, self.guide))

    def forward(self, sample, timestep, prev_timestep, attributes, guidance_scale):
        _same_batch(sample, timestep, prev_timestep, attributes, guidance_scale)
        if self.guide is None:  # conditional: classifier-free guidance, w per row (both branches, one call)
            return ddim_denoise_step_x0(self.model, sample, timestep, prev_timestep, attributes,
                                        self.alphas_cumprod, guidance_scale, self.clip_sample)
        targets = attributes @ self.to_classifier  # (B, k_clf)
        attrs = _label_free_zeros(self.model, attributes) if self.label_free else attributes
        guide = dataclasses.replace(self.guide, model=self.guide_model, scale=guidance_scale)  # s per row
        return ddim_denoise_step_x0(self.model, sample, timestep, prev_timestep, attrs, self.alphas_cumprod,
                                    self.cfg_scale, self.clip_sample, guide=guide, guide_targets=targets)


class _InvertStep(nn.Module):
    """One inversion step as ``PrivateEditor.invert`` takes it; a label-free denoiser sees zeros, w = 1."""

    def __init__(self, editor: PrivateEditor):
        super().__init__()
        self.model, self.label_free = editor.model, editor.label_free
        self.register_buffer("alphas_cumprod", editor.alphas_cumprod.float().clone())

    def forward(self, sample, timestep, next_timestep, attributes, guidance_scale):
        _same_batch(sample, timestep, next_timestep, attributes, guidance_scale)
        if self.label_free:
            return ddim_invert_step(self.model, sample, timestep, next_timestep,
                                    _label_free_zeros(self.model, attributes), self.alphas_cumprod, 1.0)
        return ddim_invert_step(self.model, sample, timestep, next_timestep, attributes, self.alphas_cumprod,
                                guidance_scale)


class _Classifier(nn.Module):
    """``GuidanceClassifier.logits``: the classifier at t = 0 (a clean-image classifier takes no t)."""

    def __init__(self, guide: GuidanceClassifier):
        super().__init__()
        self.model = guide.model

    def forward(self, images):
        if getattr(self.model, "noise_conditional", True):
            return self.model(images, torch.zeros(images.shape[0], dtype=torch.long, device=images.device))
        return self.model(images)


# -- tracing the classifier gradient: make_fx, then a module for the exporter ----------------------------
def _conv_input_grad(grad_out, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                     groups, output_mask):
    """``aten.convolution_backward`` for the input gradient only, as the conv_transpose2d it is: the one
    form of it that the ONNX exporter knows (output_padding restores the input size lost to stride)."""
    if transposed or output_mask[1] or output_mask[2] or weight.dim() != 4:
        raise ExportError("export traces only input gradients of Conv2d (the parameters are constants of the graph)")
    k, out = weight.shape[2:], grad_out.shape[2:]
    pad_out = [input.shape[2 + i] - ((out[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
               for i in range(2)]
    return F.conv_transpose2d(grad_out, weight, None, stride, padding, pad_out, groups, dilation), None, None


class _Traced(nn.Module):
    """An aten graph of (state, inputs) with its state (parameters, buffers) held as buffers."""

    def __init__(self, graph: torch.fx.GraphModule, state: list[torch.Tensor]):
        super().__init__()
        self.graph, self.n = graph, len(state)
        for i, v in enumerate(state):
            self.register_buffer(f"state_{i}", v)

    def forward(self, sample, timestep, prev_timestep, attributes, guidance_scale):
        state = [getattr(self, f"state_{i}") for i in range(self.n)]
        return tuple(self.graph(state, sample, timestep, prev_timestep, attributes, guidance_scale))


def _trace_with_gradients(step: nn.Module, example: tuple) -> nn.Module:
    """make_fx of the step with its state as inputs. Only dim 0 of the inputs (the batch) is symbolic: the
    state and every other dim enter as fake tensors of static shape. (make_fx's own symbolic mode makes every
    dim of every parameter a symbol, and its shape algebra then took 100 s of a tiny model's 2-minute export.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    state = {**dict(step.named_parameters()), **dict(step.named_buffers())}
    names, values = list(state), [v.detach() for v in state.values()]

    def fn(state_values, *inputs):
        return torch.func.functional_call(step, dict(zip(names, state_values)), inputs)

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(x: torch.Tensor, batch: bool) -> torch.Tensor:
        sizes = [DimDynamic.DYNAMIC if batch and i == 0 else DimDynamic.STATIC for i in range(x.dim())]
        return mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    decompositions = {torch.ops.aten.convolution_backward.default: _conv_input_grad}
    graph = make_fx(fn, tracing_mode="symbolic", decomposition_table=decompositions)(
        [fake(v, False) for v in values], *[fake(x, True) for x in example])
    return _Traced(graph, values)


# -- export ------------------------------------------------------------------------------------------
def _export(module: nn.Module, example: tuple, path, inputs: list[str], outputs: list[str], exporter: str) -> dict:
    """``torch.onnx.export(dynamo=True)`` with dim 0 of every input dynamic; one self-contained file.

    ``Dim.DYNAMIC``, not a named ``Dim``: diffusers' ``Upsample2D`` branches on ``batch >= 64`` (a
    ``.contiguous()``, a no-op in ONNX), which narrows the batch range; a named Dim refuses any narrowing,
    DYNAMIC accepts it and stays symbolic (the equalities between the inputs' batch sizes unify them into
    one symbol, which ``_check_one_batch`` asserts). ``optimize=False``: onnxscript's constant folding
    fails on the ``SplitToSequence`` of the classifier-free chunk(2) of a dynamic 2B batch; ONNX Runtime
    folds constants itself when it loads the graph."""
    import onnx

    from veil.export import graph_cache

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = tuple({0: torch.export.Dim.DYNAMIC} for _ in example)
    with torch.no_grad():
        program = graph_cache.capture(module.eval(), example, dynamic)
        model, cached = graph_cache.to_onnx(program, input_names=inputs, output_names=outputs, opset_version=OPSET,
                                            optimize=False)
    _check_one_batch(model, inputs + outputs)
    onnx.save_model(model, str(path))
    return {"inputs": list(inputs), "outputs": list(outputs), "opset": OPSET, "exporter": exporter,
            "torch": torch.__version__, "translation": "cached" if cached else "translated"}


def _check_one_batch(model, names: list[str]) -> None:
    """Every named input and output has the same symbolic dim 0 (the batch): none was fixed by tracing."""
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    batch = {values[n].type.tensor_type.shape.dim[0].dim_param for n in names}
    if len(batch) != 1 or "" in batch:
        raise ExportError(f"export: the batch dimension of {names} did not stay one symbol ({batch}); "
                          "tie every batched input to the sample's batch (_same_batch)")


def _resolution(editor: PrivateEditor) -> int:
    unet = getattr(editor.model, "unet", None)
    return int(unet.config.sample_size) if unet is not None else int(getattr(editor.model, "resolution", 32))


def _step_example(editor: PrivateEditor, b: int = EXAMPLE_BATCH) -> tuple:
    r, k, dev = _resolution(editor), len(editor.attribute_names), editor.device
    t = torch.full((b,), editor.num_train_timesteps // 2, dtype=torch.long, device=dev)
    return (torch.zeros(b, 3, r, r, device=dev), t, t - 1, torch.zeros(b, k, device=dev),
            torch.ones(b, device=dev))


def export_denoise_step(editor: PrivateEditor, path) -> dict:
    """denoise_step.onnx: one ``ddim_denoise_step`` as ``PrivateEditor.regenerate`` calls it (either backend)."""
    step, example = _DenoiseStep(editor).eval(), _step_example(editor)
    if editor.guide is None:
        return _export(step, example, path, DENOISE_INPUTS, DENOISE_OUTPUTS, DYNAMO)
    return _export(_trace_with_gradients(step, example), example, path, DENOISE_INPUTS, DENOISE_OUTPUTS,
                   f"make_fx(symbolic) + {DYNAMO}")


def export_invert_step(editor: PrivateEditor, path) -> dict:
    """invert_step.onnx: one ``ddim_invert_step`` as ``PrivateEditor.invert`` calls it."""
    return _export(_InvertStep(editor).eval(), _step_example(editor), path, INVERT_INPUTS, INVERT_OUTPUTS, DYNAMO)


def export_classifier(guide: GuidanceClassifier, path) -> dict:
    """classifier.onnx: logits (B, k_clf) of clean images (B,3,H,W) in [-1,1], as ``GuidanceClassifier.logits``."""
    p = next(guide.model.parameters())
    r = int(getattr(guide.model, "resolution", 0)) or _classifier_resolution(guide.model)
    example = (torch.zeros(EXAMPLE_BATCH, 3, r, r, device=p.device),)
    return _export(_Classifier(guide).eval(), example, path, CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS, DYNAMO)


def _classifier_resolution(model) -> int:
    """The input side R of ``AttributeClassifier``: proj takes C (R / 2^L)^2 features."""
    convs = [m for m in model.trunk if isinstance(m, nn.Conv2d)]
    side = round((model.proj.in_features / convs[-1].out_channels) ** 0.5)
    return side * 2 ** len(convs)


# -- verification ------------------------------------------------------------------------------------
def _random_step_inputs(editor: PrivateEditor, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random inputs of one step: rows at different grid points (row 0 at the clean end, t_prev = -1),
    attributes in {-1,0,+1}, a different guidance scale per row (the edit's for the denoise step, the
    inversion's classifier-free w for the invert step)."""
    grid = editor.timesteps(1.0)  # (n,) ascending
    i = torch.randint(0, len(grid), (batch,), generator=g)
    i[0] = 0
    t = grid[i]
    lower = torch.where(i > 0, grid[(i - 1).clamp(min=0)], torch.full_like(t, -1))
    r, k = _resolution(editor), len(editor.attribute_names)
    attrs = torch.randint(-1, 2, (batch, k), generator=g).float()
    base = editor.guide.scale if editor.guide is not None else editor.guidance_scale  # s or w of the edit
    factor = 0.5 + 2 * torch.rand(batch, generator=g)  # (B,) like the editor's re-dos, per row
    return {"sample": torch.randn(batch, 3, r, r, generator=g), "t": t, "lower": lower, "attributes": attrs,
            "guidance_scale": base * factor, "inversion_scale": editor.inversion_guidance * factor}


def _label_free_zeros(model, attributes: torch.Tensor) -> torch.Tensor:
    """What a label-free denoiser is given: zeros as wide as it was built, whatever the guide's attributes (the
    edit's) are (``TorchBackend`` does the same)."""
    return attributes.new_zeros(attributes.shape[0], model.num_attributes)


def _torch_denoise(editor: PrivateEditor, sample, t, t_prev, attributes, scale) -> torch.Tensor:
    """``ddim_denoise_step`` itself, with the arguments ``PrivateEditor.regenerate`` gives it."""
    if editor.guide is None:
        return ddim_denoise_step(editor.model, sample, t, t_prev, attributes, editor.alphas_cumprod, scale,
                                 editor.clip_sample)
    guide = dataclasses.replace(editor.guide, scale=scale)
    targets = editor.guide.targets_for(attributes, editor.attribute_names)
    attrs = _label_free_zeros(editor.model, attributes) if editor.label_free else attributes
    w = 1.0 if editor.label_free else editor.guidance_scale
    return ddim_denoise_step(editor.model, sample, t, t_prev, attrs, editor.alphas_cumprod, w, editor.clip_sample,
                             guide=guide, guide_targets=targets)


def _torch_invert(editor: PrivateEditor, sample, t, t_next, attributes, scale) -> torch.Tensor:
    if editor.label_free:
        return ddim_invert_step(editor.model, sample, t, t_next, _label_free_zeros(editor.model, attributes),
                                editor.alphas_cumprod)
    return ddim_invert_step(editor.model, sample, t, t_next, attributes, editor.alphas_cumprod, scale)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_error(got, want) -> float:
    return max(float((torch.from_numpy(g) - w.detach().cpu()).abs().max()) for g, w in zip(got, want))


def check_step_parity(editor: PrivateEditor, export_dir, *, batch: int, seed: int = 0) -> dict:
    """Max abs error of each exported graph present in ``export_dir`` (``DENOISE_STEP_FILE`` etc.) against the
    PyTorch step on the same random inputs (torch seed ``seed``), on ONNX Runtime's CPU provider; e.g.
    ``{"denoise_step": 1e-6, "invert_step": 1e-6, "classifier": 1e-7}``. denoise_step's error covers both
    outputs; classifier.onnx is held to ``editor.checker`` (the check classifier: never the guide of a guided editor)."""
    export_dir, dev = Path(export_dir), editor.device
    g = torch.Generator().manual_seed(seed)
    x = _random_step_inputs(editor, batch, g)
    feeds = {k: v.numpy() for k, v in x.items()}
    errors = {}
    with torch.no_grad():
        on = {k: v.to(dev) for k, v in x.items()}
        if (export_dir / DENOISE_STEP_FILE).exists():
            got = _session(export_dir / DENOISE_STEP_FILE).run(DENOISE_OUTPUTS, dict(zip(DENOISE_INPUTS, [
                feeds["sample"], feeds["t"], feeds["lower"], feeds["attributes"], feeds["guidance_scale"]])))
            args = on["sample"], on["t"], on["attributes"], on["guidance_scale"]
            next_sample = _torch_denoise(editor, args[0], args[1], on["lower"], *args[2:])
            # t_prev = -1 (alpha_prod = 1) makes the step return its clipped x0 estimate: pred_x0
            pred_x0 = _torch_denoise(editor, args[0], args[1], torch.full_like(on["t"], -1), *args[2:])
            errors["denoise_step"] = _max_error(got, [next_sample, pred_x0])
        if (export_dir / INVERT_STEP_FILE).exists():
            # inversion walks up: from `lower` (row 0: the clean image) to `t`
            got = _session(export_dir / INVERT_STEP_FILE).run(INVERT_OUTPUTS, dict(zip(INVERT_INPUTS, [
                feeds["sample"], feeds["lower"], feeds["t"], feeds["attributes"], feeds["inversion_scale"]])))
            want = _torch_invert(editor, on["sample"], on["lower"], on["t"], on["attributes"], on["inversion_scale"])
            errors["invert_step"] = _max_error(got, [want])
        if (export_dir / CLASSIFIER_FILE).exists() and editor.checker is not None:
            images = (torch.rand(batch, 3, _resolution(editor), _resolution(editor), generator=g) * 2 - 1)
            got = _session(export_dir / CLASSIFIER_FILE).run(CLASSIFIER_OUTPUTS, {"images": images.numpy()})
            errors["classifier"] = _max_error(got, [editor.checker.logits(images)])
    return errors
