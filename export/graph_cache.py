"""The ONNX translation of a captured program, cached by the program's graph, never by its weights.

``torch.onnx.export(dynamo=True)`` is three steps: capture (``torch.export``), decompose, translate to ONNX. On
the CPU the last two are most of an export (``bench/export_time.py``: about two thirds of its graphs' time), and
they depend on the captured graph only, not on the values of its weights: re-exporting a model of the same
architecture after more training, or the same model with another checker, decomposes and translates the same
graph again. So ``to_onnx`` keys the ONNX graph by everything the translation reads:

    the graph's code (every node, its arguments and literal constants, the shapes, strides and devices of every
    value, the source lines each node came from, less the per-process number of FX-generated code), each node's
    module path, the signature (which input is a parameter, a buffer, a constant or a user input, by name), the
    symbolic ranges of the shapes, the name, shape and dtype of every parameter and buffer, the values of the
    lifted constants, the options given to torch.onnx, and the versions of torch, onnx and onnxscript

and on a hit fills the cached graph's initializers, by name, with this program's parameters and buffers. A graph
is cached only where every initializer of the translated model is one of the program's tensors, bit for bit
(checked when it is written): the cached file holds the graph and the initializers' names, shapes and types, and
no weight (``TEMPLATE``). Whatever the key does not hold, the cache cannot replay. ``veil export`` verifies
every export against PyTorch after this step, cached or not. Every translation drops the source lines torch.onnx
writes into each node's metadata (absolute paths of the exporting machine, ``_drop_source_lines``), so a graph
translates to the same bytes in every process and folder, and a filled template is byte for byte the translation
(``bench/export_time.py`` checks it).

Where: ``$VEIL_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/veil/onnx-graphs`` (``~/.cache/veil/onnx-graphs``);
``VEIL_EXPORT_CACHE=off`` translates every time. Files are written whole (a temporary file renamed) under a
lock per graph, so concurrent exports share the folder safely and translate a graph once. A graph takes 0.1 to
1.5 MB here (mostly each node's module path); one unused for 30 days is deleted when another is written, and
deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

__all__ = ["capture", "to_onnx", "cache_dir", "program_key", "CACHE_ENV"]

CACHE_ENV = "VEIL_EXPORT_CACHE"
FORMAT = "veil-onnx-graph/1"  # bump when what a cached file holds, or how it is filled, changes
TEMPLATE = "{key}.onnx"
PRUNE_AFTER_DAYS = 30
# the source "file" of code FX generated (make_fx's trace of the guided step) is named by a counter of the process
_GENERATED = re.compile(r"<eval_with_key>\.\d+")
SOURCE_LINES = "pkg.torch.onnx.stack_trace"  # node metadata torch.onnx writes: dropped (_drop_source_lines)


def cache_dir() -> Path | None:
    """The cache folder, or None where ``VEIL_EXPORT_CACHE=off``."""
    where = os.environ.get(CACHE_ENV, "").strip()
    if where.lower() == "off":
        return None
    if where:
        return Path(where).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "veil" / "onnx-graphs"


def capture(module: torch.nn.Module, example: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    """The ExportedProgram ``torch.onnx.export(dynamo=True)`` would capture: its strategies in its order (non-strict
    ``torch.export``, then strict), the first that succeeds; the first failure raised where none does."""
    from torch.onnx._internal.exporter import _capture_strategies

    failures = []
    for strategy in _capture_strategies.CAPTURE_STRATEGIES:
        result = strategy(verbose=False)(module, example, None, dynamic_shapes=dynamic_shapes)
        if result.exported_program is not None:
            return result.exported_program
        failures.append(result.exception)
    raise failures[0]


def _versions() -> dict[str, str | None]:
    out = {"torch": torch.__version__}
    for package in ("onnx", "onnxscript"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _tensors(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Every tensor the program carries, by the name its ONNX initializer gets."""
    tensors = dict(program.state_dict)
    tensors.update({k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    return tensors


def program_key(program: torch.export.ExportedProgram, options: dict[str, Any]) -> str | None:
    """The sha256 of what the translation reads (module docstring), or None where the program holds something
    the key cannot describe (a script object among its constants)."""
    if any(not isinstance(v, torch.Tensor) for v in program.constants.values()):
        return None
    h = hashlib.sha256()

    def put(part: str) -> None:
        h.update(part.encode())
        h.update(b"\0")

    put(FORMAT)
    put(json.dumps(_versions(), sort_keys=True))
    put(json.dumps(options, sort_keys=True, default=str))
    graph = program.graph_module.print_readable(print_output=False, include_stride=True, include_device=True)
    put(_GENERATED.sub("<eval_with_key>", graph))  # make_fx's generated code is numbered per process
    for module in program.graph_module.modules():  # the module path of each node: the ONNX nodes' namespace
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                stack = node.meta.get("nn_module_stack") or {}
                put(f"{node.name} {[(k, v[0], str(v[1])) for k, v in stack.items()]}")
    put(str(program.graph_signature))
    put(repr(sorted((str(k), str(v)) for k, v in program.range_constraints.items())))
    for name, t in sorted(program.state_dict.items()):
        put(f"{name} {tuple(t.shape)} {t.dtype} {t.stride()} {t.device.type}")
    for name, t in sorted(program.constants.items()):  # lifted constants: their values are part of the graph
        put(f"{name} {tuple(t.shape)} {t.dtype}")
        h.update(_raw(t))
    return h.hexdigest()


def _subgraphs(node) -> list:
    """The graphs a node holds as attributes (an If's branches, a Loop's body)."""
    from onnx import AttributeProto

    return [g for a in node.attribute for g in ([a.g] if a.type == AttributeProto.GRAPH else list(a.graphs))]


def _has_subgraph_initializers(graph) -> bool:
    return any(len(g.initializer) or _has_subgraph_initializers(g) for n in graph.node for g in _subgraphs(n))


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes as ONNX's ``raw_data`` holds them (little-endian, row-major), any dtype (bfloat16 too)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _onnx_dtype(t: torch.Tensor) -> int | None:
    from onnx import TensorProto as T

    return {torch.float32: T.FLOAT, torch.float16: T.FLOAT16, torch.bfloat16: T.BFLOAT16, torch.float64: T.DOUBLE,
            torch.int64: T.INT64, torch.int32: T.INT32, torch.int16: T.INT16, torch.int8: T.INT8,
            torch.uint8: T.UINT8, torch.bool: T.BOOL}.get(t.dtype)


def _fits(init, t: torch.Tensor | None) -> bool:
    return t is not None and list(init.dims) == list(t.shape) and init.data_type == _onnx_dtype(t)


def _template(model, tensors: dict[str, torch.Tensor]):
    """A copy of ``model`` with its initializers' data removed, or None where an initializer is not one of
    ``tensors`` bit for bit (it could not be filled again from another program's tensors)."""
    from onnx import ModelProto

    if _has_subgraph_initializers(model.graph) or len(model.graph.sparse_initializer):
        return None
    for init in model.graph.initializer:
        t = tensors.get(init.name)
        if not _fits(init, t) or init.data_location != 0 or not init.HasField("raw_data") or init.raw_data != _raw(t):
            return None
    template = ModelProto()
    template.CopyFrom(model)
    for init in template.graph.initializer:
        init.ClearField("raw_data")
    return template


def _fill(template, tensors: dict[str, torch.Tensor]):
    """The template with this program's tensors as its initializers, or None where one does not fit."""
    for init in template.graph.initializer:
        t = tensors.get(init.name)
        if not _fits(init, t):
            return None
        init.raw_data = _raw(t)
    return template


def _read(path: Path):
    import onnx

    try:
        return onnx.load_model(str(path), load_external_data=False)
    except Exception:  # unreadable or damaged (a DecodeError, an OSError): a miss, translated and written again
        return None


def _write(path: Path, template) -> None:
    """Written whole: a temporary file in the same folder, renamed (an error only skips the cache; the temporary
    file is removed); graphs unused for ``PRUNE_AFTER_DAYS`` are deleted then. (Not ``veil.outputs``: the graph
    layer imports no --out helper, pyproject's import-linter layers.)"""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = time.time() - PRUNE_AFTER_DAYS * 86400
        for stale in path.parent.glob("*.onnx"):
            if stale.stat().st_mtime < old:
                stale.unlink(missing_ok=True)
                stale.with_suffix(".lock").unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".onnx")
        with os.fdopen(fd, "wb") as f:
            f.write(template.SerializeToString())
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def to_onnx(program: torch.export.ExportedProgram, **options):
    """``torch.onnx.export(program, dynamo=True, **options)``'s ONNX ModelProto, from the cache where this graph was
    translated before (module docstring). Returns ``(model, cached)``. Two processes translating the same graph at
    once: the second waits for the first (a lock per graph) and fills its template."""
    folder, tensors = cache_dir(), _tensors(program)
    key = program_key(program, options) if folder is not None else None
    if key is None:
        return _translate(program, options), False
    path = folder / TEMPLATE.format(key=key)
    with _locked(path.with_suffix(".lock")):
        template = _read(path) if path.is_file() else None
        model = _fill(template, tensors) if template is not None else None
        if model is not None:
            with contextlib.suppress(OSError):
                os.utime(path)  # used: kept from pruning
            return model, True
        model = _translate(program, options)
        template = _template(model, tensors)
        if template is not None:
            _write(path, template)
    return model, False


def _translate(program, options):
    model = torch.onnx.export(program, (), dynamo=True, external_data=False, verbose=False, report=False,
                              **options).model_proto
    _drop_source_lines(model.graph)
    return model


def _drop_source_lines(graph) -> None:
    """Remove the source lines torch.onnx keeps per node (``pkg.torch.onnx.stack_trace``): absolute paths of the
    exporting machine (a home folder names its user) in a file meant for sharing, a third of its bytes, and the
    per-process number of FX-generated code. ONNX Runtime never reads them; the module path of each node
    (``namespace``, ``pkg.torch.onnx.name_scopes``) stays. A graph then has the same bytes wherever it is exported."""
    for node in graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key != SOURCE_LINES]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            for key, value in keep:
                node.metadata_props.add(key=key, value=value)
        for sub in _subgraphs(node):
            _drop_source_lines(sub)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path`` (released by the OS if the process dies); no lock where the folder cannot
    be written or the platform has no ``fcntl`` (the cache then only misses more)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
