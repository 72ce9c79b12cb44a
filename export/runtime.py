"""``OrtEditor``: the edit pipeline (``veil.editing.pipeline``) on ONNX Runtime; numpy only, no torch.

It loads a ``veil export`` folder (``veil_export.json`` + ``denoise_step.onnx``, ``invert_step.onnx``,
``classifier.onnx`` when there is a classifier); ``OrtBackend`` walks the DDIM grid the pipeline gives it
on the host, one ONNX Runtime call per step:

    invert (invert_step per grid point) | add_noise (fresh secret noise, the forward process)
    -> regenerate (denoise_step per grid point, top down) -> logits (classifier at t = 0, the check)

The orchestration (what inversion sees, the grid, the check and its re-dos, refusal, guesses) is the
pipeline's, shared with the torch backend (``PrivateEditor``). Images are numpy float32 arrays (B,3,H,W)
in [-1, 1], attributes (B,k) float32 in the export's attribute order; the ``EditFn`` call
(``editor(images, originals=..., targets=...)``) takes lists of (3,H,W) arrays and attribute dicts.

Loading checks every file: a missing file, a hash that does not match ``veil_export.json``, or a
metadata file of another format version raise ``ExportError`` naming the file. Sessions are made
once: providers chosen explicitly (CUDA when ``session.get_providers()`` confirms it after the
session is made, else CPU), graph optimizations on and the optimized model cached on disk (next
start loads it with optimizations off), ``intra_op_num_threads`` set for the machine. On CUDA the
sample stays on the device between steps (I/O binding); on the CPU plain ``run`` is used.

The encoding noise comes from a numpy generator seeded from the OS CSPRNG at each edit
(``veil.privacy.randomness.secret_seed``); never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from veil.editing.backend import OnStep
from veil.editing.pipeline import EditPipeline, check_guidance
from veil.editing.plan import DEFAULT_CHECK_THRESHOLD, DEFAULT_MAX_RETRIES, check_check_options
from veil.errors import ConfigError, ExportError
from veil.privacy.model_privacy import check_model_privacy
from veil.privacy.randomness import secret_seed

__all__ = ["OrtEditor", "OrtBackend", "EXPORT_FORMAT", "META_FILE", "read_export_meta", "file_sha256"]

EXPORT_FORMAT = "veil-export/1"
META_FILE = "veil_export.json"
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_export_meta(folder) -> dict:
    """``veil_export.json`` of an export folder, its format and every listed file's hash checked."""
    folder = Path(folder)
    path = folder / META_FILE
    if not path.is_file():
        raise ExportError(f"{path}: missing; {folder} is not a `veil export` folder (run `veil export ... --out {folder}`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable ({e}); re-export the model") from e
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{path}: format {found!r}, this veil reads {EXPORT_FORMAT!r}; re-export the model with "
                          f"this version of veil")
    for name, record in meta.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise ExportError(f"{f}: missing (listed in {META_FILE}); copy the whole export folder")
        digest = file_sha256(f)
        if digest != record.get("sha256"):
            raise ExportError(f"{f}: sha256 {digest[:16]}... does not match {META_FILE} ({str(record.get('sha256'))[:16]}"
                              f"...): the file is corrupted or from another export")
    for required in ("denoise_step.onnx", "invert_step.onnx"):
        if required not in meta.get("files", {}):
            raise ExportError(f"{path}: lists no {required}; re-export the model")
    return meta


class _Graph:
    """One ONNX Runtime session and how to run it (plain ``run`` on the CPU, I/O binding on CUDA)."""

    def __init__(self, session, provider: str):
        self.session, self.provider = session, provider
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.provider != CUDA:
            return self.session.run(self.outputs, feeds)
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            v = value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
            binding.bind_ortvalue_input(name, v)
        for name in self.outputs:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()  # OrtValues on the device: the next step binds them without a copy


def _host(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def default_threads() -> int:
    """$OMP_NUM_THREADS when it is a whole number >= 1 (what torch follows too: one setting for replicas or
    processes that share a machine), else the machine's cores."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else (os.cpu_count() or 1)


class OrtBackend:
    """``veil.editing.backend.EditBackend`` over a ``veil export`` folder (see the module docstring).

    ``providers``: "auto" (CUDA if a session confirms it, else CPU), "cpu" or "cuda" (an error if CUDA
    cannot be used); ``threads``: ONNX Runtime intra-op threads (default: ``default_threads()``);
    ``cache_dir``: where optimized models are kept (default ``<export>/ort_cache``; None: no cache);
    ``guidance_scale``: classifier-free guidance w instead of the export's.
    """

    def __init__(self, folder, *, providers: str = "auto", threads: int | None = None,
                 cache_dir: str | Path | None | bool = True, batch_size: int = 64, guidance_scale: float | None = None):
        if providers not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"={providers!r}: choose auto, cpu or cuda", option="--providers")
        self.folder = Path(folder)
        self.meta = meta = read_export_meta(self.folder)
        self.attribute_names: list[str] = list(meta["attribute_names"])
        self.mode: str = meta["backend"]
        self.label_free = bool(meta["label_free"])
        self.num_train_timesteps = int(meta["scheduler_config"]["num_train_timesteps"])
        self.alphas_cumprod = np.asarray(meta["alphas_cumprod"], dtype=np.float64)
        g = meta["guidance"]
        self.guidance_scale = float(g["guidance_scale"]) if guidance_scale is None else \
            check_guidance("--guidance", guidance_scale)
        self.classifier_scale = float(g.get("classifier_scale") or 0.0)
        self.batch_size = batch_size
        clf = meta.get("classifier")
        self.classifiers: dict[str, list[str]] = {"check": list(clf["attribute_names"])} if clf else {}
        self.threads = int(threads or default_threads())
        if cache_dir is True:
            cache_dir = self.folder / "ort_cache"
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._want = providers
        self.provider: str | None = None  # the one the sessions run on, confirmed by ONNX Runtime
        self.denoise = self._graph("denoise_step.onnx")
        self.invert_graph = self._graph("invert_step.onnx")
        self.classifier = self._graph("classifier.onnx") if clf else None

    # -- sessions -----------------------------------------------------------------------------------
    def _graph(self, name: str) -> _Graph:
        import onnxruntime as ort

        want = [CPU] if self._want == "cpu" or self.provider == CPU else \
            [CUDA, CPU] if CUDA in ort.get_available_providers() or self._want == "cuda" else [CPU]
        quiet = want[0] == CUDA and self._want == "auto"  # the CUDA probe fails loudly on a machine without CUDA
        if quiet:
            ort.set_default_logger_severity(4)
        try:
            session = self._session(name, want)
        finally:
            if quiet:
                ort.set_default_logger_severity(2)  # ONNX Runtime's default: warnings
        got = session.get_providers()[0]
        if got != want[0] and want[0] == CUDA:
            if self._want == "cuda":
                raise ConfigError(f": ONNX Runtime could not run {name} on CUDA (it fell back to {got}); check the "
                                  f"CUDA and cuDNN libraries", option="--providers cuda")
            session = self._session(name, [CPU])  # ONNX Runtime lists CUDA without a GPU: confirm, then settle
            got = session.get_providers()[0]
        self.provider = got
        return _Graph(session, got)

    def _session(self, name: str, providers: list[str]):
        import onnxruntime as ort

        source = self.folder / name
        so = self._options(ort)
        tag = "cuda" if providers[0] == CUDA else "cpu"
        cached = None
        if self.cache_dir is not None:
            cached = self.cache_dir / f"{source.stem}.{self.meta['files'][name]['sha256'][:16]}.{tag}.onnx"
            if cached.is_file():
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                try:
                    return ort.InferenceSession(str(cached), so, providers=providers)
                except Exception:  # noqa: BLE001 - a damaged cache is rebuilt from the checked source
                    cached.unlink(missing_ok=True)
                so = self._options(ort)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        partial = None
        if cached is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                partial = cached.with_suffix(f".partial-{os.getpid()}")
                so.optimized_model_filepath = str(partial)
            except OSError:  # a read-only export folder: run without the cache
                partial = None
        session = ort.InferenceSession(str(source), so, providers=providers)
        if partial is not None and partial.is_file():
            os.replace(partial, cached)  # whole files only: a crash never leaves a half-written cache
        return session

    def _options(self, ort):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.log_severity_level = 3  # errors only: the CUDA probe on a machine without CUDA is expected to fail
        return so

    # -- arrays --------------------------------------------------------------------------------------
    def asarray(self, values) -> np.ndarray:
        if isinstance(values, (list, tuple)):
            return np.stack([np.asarray(v, dtype=np.float32) for v in values])
        return np.asarray(values, dtype=np.float32)

    def to_host(self, values) -> np.ndarray:
        return np.asarray(values)

    def from_host(self, values: np.ndarray) -> np.ndarray:
        return values

    def _chunks(self, *arrays):
        for i in range(0, arrays[0].shape[0], self.batch_size):
            yield [np.ascontiguousarray(a[i : i + self.batch_size]) for a in arrays]

    @staticmethod
    def _images(images) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images {x.shape}: expected (B,3,H,W) float32 in [-1,1]")
        return x

    # -- the walks -------------------------------------------------------------------------------------
    def invert(self, images, attributes, *, timesteps, guidance: float) -> np.ndarray:
        out = []
        for x, a_b in self._chunks(self._images(images), self.asarray(attributes)):
            b = x.shape[0]
            t = np.full(b, -1, dtype=np.int64)
            for t_next in timesteps:
                t_next = np.full(b, t_next, dtype=np.int64)
                (x,) = self.invert_graph.run({"sample": x, "timestep": t, "next_timestep": t_next, "attributes": a_b,
                                              "guidance_scale": np.full(b, guidance, dtype=np.float32)})
                t = t_next
            out.append(_host(x))
        return np.concatenate(out)

    def add_noise(self, images, *, t0: int, noise) -> np.ndarray:
        x = self._images(images)
        if noise is None:
            noise = np.random.default_rng(secret_seed()).standard_normal(x.shape, dtype=np.float32)
        a = self.alphas_cumprod[t0]
        return (np.sqrt(a) * x + np.sqrt(1 - a) * np.asarray(noise)).astype(np.float32)

    def regenerate(self, x_t0, targets, *, timesteps, guidance_factor: np.ndarray, guide_targets,
                   on_step: OnStep | None = None) -> np.ndarray:
        grid = list(timesteps)
        if self.mode == "guided":  # the graph steers by classifier guidance towards its "attributes" input
            attrs, scale = self.asarray(guide_targets), self.classifier_scale
        else:
            attrs, scale = self.asarray(targets), self.guidance_scale
        out = []
        for x, a_b, f in self._chunks(self._images(x_t0), attrs, guidance_factor):
            b = x.shape[0]
            w = (scale * f).astype(np.float32)
            for i in range(len(grid) - 1, -1, -1):
                feeds = {"sample": x, "timestep": np.full(b, grid[i], dtype=np.int64),
                         "prev_timestep": np.full(b, grid[i - 1] if i > 0 else -1, dtype=np.int64),
                         "attributes": a_b, "guidance_scale": w}
                x, x0 = self.denoise.run(feeds)
                if on_step is not None:
                    on_step(len(grid) - i, len(grid), _host(x0))  # a device-to-host copy on CUDA
            out.append(np.clip(_host(x), -1.0, 1.0))
        return np.concatenate(out)

    def logits(self, images) -> np.ndarray:
        return np.concatenate([_host(self.classifier.run({"images": x})[0]) for (x,) in self._chunks(self._images(images))])


class OrtEditor(EditPipeline):
    """The edit pipeline over a ``veil export`` folder: the ``PrivateEditor`` interface on numpy arrays.

    ``num_steps``: DDIM steps (default: the export's); ``keep_unprotected``: default the export's;
    ``guidance_scale``: classifier-free guidance instead of the export's; ``providers``, ``threads``,
    ``cache_dir``, ``batch_size``: ``OrtBackend``'s.
    """

    def __init__(self, folder, *, num_steps: int | None = None, providers: str = "auto", threads: int | None = None,
                 cache_dir: str | Path | None | bool = True, batch_size: int = 64, keep_unprotected: bool | None = None,
                 check_threshold: float = DEFAULT_CHECK_THRESHOLD, max_retries: int = DEFAULT_MAX_RETRIES,
                 guidance_scale: float | None = None):
        check_check_options(check_threshold=check_threshold, max_retries=max_retries)
        engine = OrtBackend(folder, providers=providers, threads=threads, cache_dir=cache_dir, batch_size=batch_size,
                            guidance_scale=guidance_scale)
        meta, g = engine.meta, engine.meta["guidance"]
        super().__init__(engine, num_steps=int(meta["steps"]["default"] if num_steps is None else num_steps),
                         inversion_guidance=float(g["inversion_guidance"]),
                         keep_unprotected=bool(g.get("keep_unprotected", True) if keep_unprotected is None
                                               else keep_unprotected),
                         check_threshold=check_threshold, max_retries=max_retries)
        self.costs, self.model_privacy, self.data_spec = meta.get("costs"), meta.get("model_privacy"), meta.get("data_spec")
        for i, cost in enumerate(self.costs or []):  # a claimed negative or NaN epsilon is refused, never printed
            check_model_privacy(cost, where=str(self.folder / META_FILE), field=f"costs[{i}]")

    # -- the export's facts (the server reads these) ------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.engine.folder

    @property
    def meta(self) -> dict:
        return self.engine.meta

    @property
    def resolution(self) -> int:
        return int(self.engine.meta["resolution"])

    @property
    def provider(self) -> str | None:
        return self.engine.provider

    @property
    def threads(self) -> int:
        return self.engine.threads

    @property
    def cache_dir(self) -> Path | None:
        return self.engine.cache_dir

    @property
    def classifier_scale(self) -> float:
        return self.engine.classifier_scale

    @property
    def classifier_attribute_names(self) -> list[str]:
        return list(self.engine.classifiers.get("check", []))

    def describe(self) -> dict[str, Any]:
        """What runs where: for logs, the CLI summary and the server's health check."""
        return {"export": str(self.folder), "backend": self.backend, "provider": self.provider,
                "threads": self.threads, "cache": None if self.cache_dir is None else str(self.cache_dir)}
