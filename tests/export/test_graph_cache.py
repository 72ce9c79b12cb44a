"""veil.export.graph_cache: an ONNX graph translated once per captured graph, filled with each program's own
weights; never holding a weight, never replayed for another graph. On a tiny module through graphs._export (the
path every `veil export` graph takes), so every run of the suite translates (the cache starts empty here)."""

import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from veil.export import graph_cache
from veil.export.graphs import _export

pytestmark = pytest.mark.usefixtures("single_thread")


class Tiny(nn.Module):
    def __init__(self, width: int = 4, scale: float = 2.0):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.head = nn.Linear(width, 2)
        self.register_buffer("shift", torch.linspace(-1, 1, 2))
        self.scale = scale  # a Python constant: a literal of the graph

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x))).mean(dim=(2, 3))
        return self.head(h) * self.scale + self.shift


def _weights(seed: int, **kw) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


EXAMPLE = (torch.zeros(2, 3, 8, 8),)


def _run(model: Tiny, path):
    return _export(model, EXAMPLE, path, ["images"], ["logits"], "test")


def _ort(path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "graphs"
    monkeypatch.setenv(graph_cache.CACHE_ENV, str(folder))
    return folder


def test_a_graph_is_translated_once_and_its_template_holds_no_weight(cache, tmp_path, monkeypatch):
    model = _weights(0)
    first, second = _run(model, tmp_path / "a.onnx"), _run(model, tmp_path / "b.onnx")
    assert (first["translation"], second["translation"]) == ("translated", "cached")
    monkeypatch.setenv(graph_cache.CACHE_ENV, "off")
    assert _run(model, tmp_path / "c.onnx")["translation"] == "translated"
    # the cached file is byte for byte what torch.onnx translates, with or without the cache
    a, b, c = ((tmp_path / f"{n}.onnx").read_bytes() for n in "abc")
    assert a == b == c
    [template] = cache.glob("*.onnx")
    kept = onnx.load(str(template))
    assert {i.name for i in kept.graph.initializer} == {"conv.weight", "conv.bias", "norm.weight", "norm.bias",
                                                         "head.weight", "head.bias", "shift"}
    assert all(not i.raw_data and not i.float_data for i in kept.graph.initializer)
    raw = template.read_bytes()
    for p in (model.conv.weight, model.head.weight):
        assert p.detach().numpy().tobytes()[:32] not in raw  # no weight's bytes anywhere in the file


def test_an_export_names_no_path_of_the_machine_that_made_it(cache, tmp_path):
    """torch.onnx keeps each node's source lines (absolute paths: a home folder names its user); a graph meant
    for sharing drops them, cached or not, and keeps each node's module path."""
    import os

    for name in ("a", "b"):
        _run(_weights(0), tmp_path / f"{name}.onnx")
        raw = (tmp_path / f"{name}.onnx").read_bytes()
        assert os.path.dirname(__file__).encode() not in raw and os.path.dirname(torch.__file__).encode() not in raw
        keys = {p.key for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node for p in n.metadata_props}
        assert graph_cache.SOURCE_LINES not in keys and "namespace" in keys


def test_the_same_graph_with_other_weights_gets_its_own_weights(cache, tmp_path):
    x = torch.randn(5, 3, 8, 8)
    assert _run(_weights(0), tmp_path / "a.onnx")["translation"] == "translated"
    other = _weights(1)
    assert _run(other, tmp_path / "b.onnx")["translation"] == "cached"
    with torch.no_grad():
        want = other(x).numpy()
    np.testing.assert_allclose(_ort(tmp_path / "b.onnx", x), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_ort(tmp_path / "a.onnx", x), want, atol=1e-3)
    got = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "b.onnx")).graph.initializer}
    for name, t in {**dict(other.named_parameters()), **dict(other.named_buffers())}.items():
        assert got[name].tobytes() == t.detach().numpy().tobytes(), name


@pytest.mark.parametrize("change", [{"scale": 3.0}, {"width": 6}])
def test_another_graph_is_never_replayed(cache, tmp_path, change):
    """A literal constant (a Python float in forward) or a shape: another key, translated, and right."""
    assert _run(_weights(0), tmp_path / "a.onnx")["translation"] == "translated"
    changed = _weights(0, **change)
    assert _run(changed, tmp_path / "b.onnx")["translation"] == "translated"
    assert len(list(cache.glob("*.onnx"))) == 2
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(tmp_path / "b.onnx", x), changed(x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_damaged_template_is_translated_again_and_replaced(cache, tmp_path):
    model = _weights(0)
    _run(model, tmp_path / "a.onnx")
    [template] = cache.glob("*.onnx")
    template.write_bytes(b"\x08not an onnx model")
    assert _run(model, tmp_path / "b.onnx")["translation"] == "translated"
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert _run(model, tmp_path / "c.onnx")["translation"] == "cached"


def test_off_writes_nothing_and_the_default_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(graph_cache.CACHE_ENV, "off")
    assert graph_cache.cache_dir() is None
    monkeypatch.delenv(graph_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert graph_cache.cache_dir() == tmp_path / "xdg" / "veil" / "onnx-graphs"


def test_a_model_with_an_initializer_that_is_not_a_program_tensor_is_not_cached():
    """Whatever the template cannot fill from the next program's tensors (a folded constant, a renamed weight) keeps
    the graph out of the cache; a template whose initializer no longer fits is not filled."""
    model = _weights(0)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[
        onnx.numpy_helper.from_array(t.detach().numpy(), name) for name, t in tensors.items()]))
    assert graph_cache._template(proto, tensors) is not None
    extra = onnx.ModelProto()
    extra.CopyFrom(proto)
    extra.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "folded"))
    assert graph_cache._template(extra, tensors) is None
    changed = {**tensors, "shift": tensors["shift"] + 1}  # same name, other bytes: not this program's
    assert graph_cache._template(proto, changed) is None
    template = graph_cache._template(proto, tensors)
    assert graph_cache._fill(template, {**tensors, "shift": torch.zeros(3)}) is None  # another shape


def test_one_translation_at_a_time_per_graph(tmp_path):
    """The per-graph lock: a second exporter of the same graph waits for the first (then finds its template)."""
    lock, order = tmp_path / "k.lock", []

    def hold():
        with graph_cache._locked(lock):
            order.append("first in")
            time.sleep(0.3)
            order.append("first out")

    t = threading.Thread(target=hold)
    t.start()
    while not order:
        time.sleep(0.01)
    with graph_cache._locked(lock):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]


def test_fx_generated_code_keys_and_translates_the_same_in_any_process(cache, tmp_path):
    """make_fx's generated code is numbered per process (``<eval_with_key>.N``): the number is neither in the key
    nor in the nodes' source-line metadata, so the guided step's graph hits and exports the same bytes anywhere."""
    from torch.fx.experimental.proxy_tensor import make_fx

    class Held(nn.Module):  # as graphs._Traced holds the guided step's make_fx graph and its state
        def __init__(self, gm):
            super().__init__()
            self.gm = gm
            self.register_buffer("state_0", torch.ones(3))

        def forward(self, t):
            return tuple(self.gm([self.state_0], t))

    x = torch.randn(2, 3)
    traced = [make_fx(lambda state, t: [torch.sin(t) * state[0] + 1])([torch.ones(3)], x) for _ in range(2)]
    assert traced[0].code == traced[1].code
    programs = [graph_cache.capture(Held(gm), (x,), None) for gm in traced]
    texts = [p.graph_module.print_readable(print_output=False) for p in programs]
    assert texts[0] != texts[1] and "<eval_with_key>." in texts[0]  # the numbers differ...
    options = {"input_names": ["x"], "output_names": ["y"], "opset_version": 18, "optimize": False}
    keys = [graph_cache.program_key(p, options) for p in programs]
    assert keys[0] == keys[1]  # ...not the key
    (first, hit0), (second, hit1) = (graph_cache.to_onnx(p, **options) for p in programs)
    assert (hit0, hit1) == (False, True)
    assert first.SerializeToString() == second.SerializeToString()
    keys = {p.key for n in first.graph.node for p in n.metadata_props}
    assert "namespace" in keys and graph_cache.SOURCE_LINES not in keys  # no source lines, numbered or not


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path, monkeypatch):
    """VEIL_EXPORT_CACHE naming a file (or a read-only folder): the export translates and succeeds, nothing cached."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(graph_cache.CACHE_ENV, str(blocked))
    for name in ("a", "b"):
        assert _run(_weights(0), tmp_path / f"{name}.onnx")["translation"] == "translated"
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert blocked.read_text() == "not a folder"


def test_templates_hold_and_fill_any_dtype_bfloat16_included():
    """Bytes, not numpy arrays (numpy has no bfloat16): a half-precision export's graph caches like a float32 one."""
    t = torch.randn(2, 3).to(torch.bfloat16)
    init = onnx.helper.make_tensor("w", onnx.TensorProto.BFLOAT16, [2, 3], graph_cache._raw(t), raw=True)
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[init]))
    template = graph_cache._template(proto, {"w": t})
    assert template is not None and template.graph.initializer[0].raw_data == b""
    other = t * 2
    filled = graph_cache._fill(template, {"w": other})
    assert filled.graph.initializer[0].raw_data == graph_cache._raw(other) != graph_cache._raw(t)
    assert graph_cache._fill(template, {"w": other.float()}) is None  # another dtype: not this graph's
