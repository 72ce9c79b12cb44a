"""veil.export.graphs: the denoise step, the inversion step and the classifier exported to ONNX, for both
edit backends (guided: a label-free tiny UNet + a tiny DP noise-conditional classifier; conditional: a
tiny attribute-conditional UNet), all trained from a seed in the test. Each graph is exported once and
checked on ONNX Runtime's CPU provider against the PyTorch step at several batch sizes (the batch is
dynamic), and an ONNX host loop is checked against the editor's own ``invert`` and ``regenerate``."""

import json

import numpy as np
import onnx
import pytest
import torch
from unlearn_helpers import datamodule, one_thread

from veil.export import graphs as G
from veil.lightning_modules.editing.editor import PrivateEditor

pytestmark = pytest.mark.usefixtures("single_thread")

# float32 through a tiny UNet and one guidance gradient: measured errors are 1e-7 .. 2e-5 (the x0 estimate
# divides by sqrt(alpha_prod_t), which amplifies float32 rounding at large t); 1e-4 leaves room for that.
ATOL = 1e-4
PROTECTED = ["smiling"]


def _editor(models, backend: str) -> PrivateEditor:
    if backend == "guided":
        return PrivateEditor.from_checkpoint(models / "unet", classifier=models / "guide", classifier_scale=30.0,
                                             checker=models / "judge", num_steps=4)  # as the session's export
    if backend == "guided-conditional-unet":  # classifier guidance on top of classifier-free w = 2 (both branches)
        return PrivateEditor.from_checkpoint(models / "cond", classifier=models / "guide", classifier_scale=30.0,
                                             num_steps=4, guidance_scale=2.0, inversion_guidance=1.5)
    # the classifier at scale 0 only checks (as `veil export --classifier-scale 0` exports it: classifier.onnx)
    return PrivateEditor.from_checkpoint(models / "cond", classifier=models / "guide", classifier_scale=0.0,
                                         num_steps=4, guidance_scale=2.0, inversion_guidance=1.5)


# the third: the guided step's other path (a conditional UNet, two branches inside the traced gradient graph);
# another make_fx export (~1.5 min here), so kept to the slow run.
@pytest.fixture(scope="module", params=["guided", "conditional",
                                        pytest.param("guided-conditional-unet", marks=pytest.mark.slow)])
def exported(request, models, exports, tmp_path_factory):
    """(editor, export folder, {graph: what its export returned}), each graph exported once per backend: the
    session's `veil export` folders (conftest.py) where they hold the same graphs."""
    editor = _editor(models, request.param)
    if request.param in ("guided", "conditional"):  # guidance scales are inputs, so the graphs are the same
        graphs = json.loads((exports / request.param / "veil_export.json").read_text())["graphs"]
        return editor, exports / request.param, {name: graphs[f"{name}.onnx"] for name in
                                                  ("denoise_step", "invert_step", "classifier") if f"{name}.onnx" in graphs}
    with one_thread():
        out = tmp_path_factory.mktemp(f"export_{request.param}")
        meta = {"denoise_step": G.export_denoise_step(editor, out / G.DENOISE_STEP_FILE),
                "invert_step": G.export_invert_step(editor, out / G.INVERT_STEP_FILE)}
        if editor.checker is not None:
            meta["classifier"] = G.export_classifier(editor.checker, out / G.CLASSIFIER_FILE)
        return editor, out, meta


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graphs_have_the_named_inputs_outputs_one_dynamic_batch_and_the_pinned_opset(exported):
    editor, out, meta = exported
    expected = {"denoise_step": (["sample", "timestep", "prev_timestep", "attributes", "guidance_scale"],
                                 ["next_sample", "pred_x0"]),
                "invert_step": (["sample", "timestep", "next_timestep", "attributes", "guidance_scale"], ["next_sample"]),
                "classifier": (["images"], ["logits"])}
    assert set(meta) == ({"denoise_step", "invert_step", "classifier"} if editor.checker is not None
                         else {"denoise_step", "invert_step"})
    files = sorted(p.name for p in out.iterdir() if p.name not in ("veil_export.json", "ort_cache"))
    assert files == sorted(f"{name}.onnx" for name in meta)  # no external data
    int64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    for name, info in meta.items():
        inputs, outputs = expected[name]
        assert info == {"inputs": inputs, "outputs": outputs, "opset": G.OPSET, "exporter": info["exporter"],
                        "torch": torch.__version__, "translation": info["translation"]}
        assert info["translation"] in ("translated", "cached")  # veil.export.graph_cache (test_graph_cache.py)
        assert info["exporter"].endswith("torch.onnx.export(dynamo=True)")
        model = onnx.load(out / f"{name}.onnx")
        assert [i.name for i in model.graph.input] == inputs  # the schedule table is a constant, not an input
        assert [o.name for o in model.graph.output] == outputs
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {G.OPSET}
        values = [*model.graph.input, *model.graph.output]
        batch = {v.type.tensor_type.shape.dim[0].dim_param for v in values}
        assert len(batch) == 1 and "" not in batch, batch  # one symbolic batch for every input and output
        types = {v.name: v.type.tensor_type.elem_type for v in values}
        assert all(types[n] == (int64 if n.endswith("timestep") else f32) for n in types), types
    assert ("make_fx" in meta["denoise_step"]["exporter"]) == (editor.guide is not None)


@pytest.mark.parametrize("batch", [1, 8])
def test_each_graph_matches_its_torch_step_at_any_batch(exported, batch):
    """The same files at batch 1 and 8 (the example batch of the trace was 2): rows at different timesteps,
    row 0 stepping to (or from) the clean image t = -1, a different guidance scale per row."""
    editor, out, meta = exported
    errors = G.check_step_parity(editor, out, batch=batch, seed=batch)
    print(f"batch {batch}: {errors}")
    assert set(errors) == set(meta)
    assert all(e < ATOL for e in errors.values()), errors


def test_a_batch_past_diffusers_upsample_branch_still_matches(exported):
    """diffusers' Upsample2D branches on a UNet batch >= 64 (a no-op ``contiguous``) that the trace did not
    take: the graph must still be right there. A conditional UNet runs on 2B rows (both classifier-free
    branches), a label-free one on B rows."""
    editor, out, _ = exported
    batch = 65 if editor.label_free else 33
    errors = G.check_step_parity(editor, out, batch=batch, seed=3)
    print(f"batch {batch}: {errors}")
    assert all(e < ATOL for e in errors.values()), errors


def test_the_guidance_scale_input_steers_the_step(exported):
    editor, out, _ = exported
    x = G._random_step_inputs(editor, 4, torch.Generator().manual_seed(0))
    session = _session(out / G.DENOISE_STEP_FILE)
    feeds = {"sample": x["sample"].numpy(), "timestep": x["t"].numpy(), "prev_timestep": x["lower"].numpy(),
             "attributes": np.ones_like(x["attributes"].numpy())}
    low = session.run(None, {**feeds, "guidance_scale": np.zeros(4, np.float32)})[0]
    high = session.run(None, {**feeds, "guidance_scale": x["guidance_scale"].numpy() * 4})[0]
    assert np.abs(high - low).max() > 1e-3


def test_an_onnx_host_loop_reproduces_the_editors_invert_and_regenerate(exported):
    """Walk the grid up with invert_step and back down with denoise_step (the last step to t = -1) on ONNX
    Runtime, fed what the editor feeds its steps; per-row guidance factors differ (the editor's re-dos)."""
    editor, out, _ = exported
    dm = datamodule(num_images=160)
    images = torch.stack([dm.dataset[i][0] for i in range(3)])  # (3,3,32,32)
    originals = torch.stack([dm.dataset[i][1] for i in range(3)])  # (3,k)
    targets = originals.clone()
    targets[:, editor.attribute_names.index("smiling")] = torch.tensor([1.0, -1.0, 1.0])
    factor = torch.tensor([1.0, 1.5, 2.25])
    strength, b = 0.6, images.shape[0]
    grid = editor.timesteps(strength).tolist()
    assert len(grid) >= 2

    want_xt = editor.invert(images, originals, strength=strength, protected=PROTECTED)
    want = editor.regenerate(want_xt, targets, strength=strength, protected=PROTECTED, guidance_factor=factor)

    invert, denoise = _session(out / G.INVERT_STEP_FILE), _session(out / G.DENOISE_STEP_FILE)
    inv_attrs = editor.inversion_attributes(originals, protected=PROTECTED).numpy()
    inv_w = np.full(b, editor.inversion_guidance, np.float32)  # ignored by a label-free denoiser
    step = lambda t: np.full(b, t, np.int64)  # noqa: E731
    x = images.numpy()
    for t, t_next in zip([-1] + grid[:-1], grid):
        x = invert.run(None, {"sample": x, "timestep": step(t), "next_timestep": step(t_next),
                              "attributes": inv_attrs, "guidance_scale": inv_w})[0]
    np.testing.assert_allclose(x, want_xt.numpy(), rtol=0, atol=ATOL)

    if editor.guide is not None:  # guided: the targets of classifier guidance, s = guide.scale x factor per row
        attrs, scale = editor.guide_targets(targets, protected=PROTECTED), editor.guide.scale * factor
    else:  # conditional: the targets through the UNet, w = guidance_scale x factor per row
        attrs, scale = targets, editor.guidance_scale * factor
    for t, t_prev in zip(grid[::-1], grid[::-1][1:] + [-1]):
        x, x0 = denoise.run(None, {"sample": x, "timestep": step(t), "prev_timestep": step(t_prev),
                                   "attributes": attrs.numpy(), "guidance_scale": scale.numpy().astype(np.float32)})
    np.testing.assert_allclose(x0, x, rtol=0, atol=1e-6)  # at t_prev = -1 the step lands on its x0 estimate
    np.testing.assert_allclose(np.clip(x, -1, 1), want.numpy(), rtol=0, atol=ATOL)
