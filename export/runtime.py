"""``OrtEditor``: the private edit on ONNX Runtime, the same interface as ``PrivateEditor``; no torch.

It loads a ``veil export`` folder (``veil_export.json`` + ``denoise_step.onnx``, ``invert_step.onnx``,
``classifier.onnx`` when there is a classifier) and walks the same DDIM grid (``veil.editing.plan``) on
the host, one ONNX Runtime call per step:

    encode (inversion: invert_step per grid point; or fresh secret noise, the forward process)
    -> regenerate (denoise_step per grid point, top down) -> check (classifier at t = 0) -> re-do

Images are numpy float32 arrays (B,3,H,W) in [-1, 1], attributes (B,k) float32 in the export's
attribute order; the ``EditFn`` call (``editor(images, originals=..., targets=...)``) takes lists of
(3,H,W) arrays and attribute dicts, as ``veil.privacy.session`` passes them.

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
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from veil.editing.plan import (
    DEFAULT_CHECK_THRESHOLD,
    DEFAULT_MAX_RETRIES,
    check_check_options,
    CheckedEdits,
    edit_grid,
    retry_ladder,
)
from veil.errors import ConfigError, EditRefused, ExportError
from veil.privacy.levels import check_encoding
from veil.privacy.randomness import secret_seed

__all__ = ["OrtEditor", "EXPORT_FORMAT", "META_FILE", "read_export_meta", "file_sha256"]

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


class OrtEditor:
    """The ``PrivateEditor`` interface over a ``veil export`` folder (see the module docstring).

    ``providers``: "auto" (CUDA if a session confirms it, else CPU), "cpu" or "cuda" (an error if CUDA
    cannot be used); ``threads``: ONNX Runtime intra-op threads (default: the machine's cores);
    ``cache_dir``: where optimized models are kept (default ``<export>/ort_cache``; None: no cache).
    """

    def __init__(self, folder, *, num_steps: int | None = None, providers: str = "auto", threads: int | None = None,
                 cache_dir: str | Path | None | bool = True, batch_size: int = 64, keep_unprotected: bool | None = None,
                 check_threshold: float = DEFAULT_CHECK_THRESHOLD, max_retries: int = DEFAULT_MAX_RETRIES):
        if providers not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--providers={providers!r}: choose auto, cpu or cuda")
        check_check_options(check_threshold=check_threshold, max_retries=max_retries)
        self.folder = Path(folder)
        self.meta = meta = read_export_meta(self.folder)
        self.attribute_names: list[str] = list(meta["attribute_names"])
        self.backend: str = meta["backend"]
        self.label_free = bool(meta["label_free"])
        self.resolution = int(meta["resolution"])
        self.num_train_timesteps = int(meta["scheduler_config"]["num_train_timesteps"])
        self.num_steps = int(meta["steps"]["default"] if num_steps is None else num_steps)
        edit_grid(strength=1.0, num_steps=self.num_steps, num_train_timesteps=self.num_train_timesteps)  # validate
        self.alphas_cumprod = np.asarray(meta["alphas_cumprod"], dtype=np.float64)
        g = meta["guidance"]
        self.guidance_scale, self.inversion_guidance = float(g["guidance_scale"]), float(g["inversion_guidance"])
        self.classifier_scale = float(g.get("classifier_scale") or 0.0)
        self.keep_unprotected = bool(g.get("keep_unprotected", True) if keep_unprotected is None else keep_unprotected)
        self.check_threshold, self.max_retries = float(check_threshold), max_retries
        self.batch_size = batch_size
        self.costs: list[dict] | None = meta.get("costs")
        self.model_privacy: str | None = meta.get("model_privacy")
        clf = meta.get("classifier")
        self.classifier_attribute_names: list[str] = list(clf["attribute_names"]) if clf else []
        self.threads = int(threads or os.cpu_count() or 1)
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
                raise ConfigError(f"--providers cuda: ONNX Runtime could not run {name} on CUDA "
                                  f"(it fell back to {got}); check the CUDA and cuDNN libraries")
            session = self._session(name, [CPU])  # ONNX Runtime lists CUDA without a GPU: confirm, then settle
            got = session.get_providers()[0]
        self.provider = got
        return _Graph(session, got)

    def _session(self, name: str, providers: list[str]):
        import onnxruntime as ort

        source = self.folder / name
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.log_severity_level = 3  # errors only: the CUDA probe on a machine without CUDA is expected to fail
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
                so = self._fresh_options(ort)
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

    def _fresh_options(self, ort):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.log_severity_level = 3
        return so

    # -- the same helpers as PrivateEditor ------------------------------------------------------------
    @property
    def can_check(self) -> bool:
        return self.classifier is not None

    def timesteps(self, strength: float) -> list[int]:
        return edit_grid(strength=strength, num_steps=self.num_steps, num_train_timesteps=self.num_train_timesteps)

    def attribute_vector(self, attributes: Mapping[str, int]) -> np.ndarray:
        unknown = sorted(set(attributes) - set(self.attribute_names))
        if unknown:
            raise ConfigError(f"attributes {unknown} are not known to the model ({self.attribute_names})")
        return np.array([float(attributes.get(n, 0)) for n in self.attribute_names], dtype=np.float32)

    def protected_mask(self, protected: Sequence[str]) -> np.ndarray:
        if isinstance(protected, str) or not protected:
            raise ConfigError(f"--protect={protected!r}: name at least one attribute to protect, as a list of "
                              f"names from {self.attribute_names}")
        unknown = sorted(set(protected) - set(self.attribute_names))
        if unknown:
            raise ConfigError(f"--protect: {unknown} are not attributes of the model ({self.attribute_names})")
        missing = sorted(set(protected) - set(self.classifier_attribute_names)) if self.can_check else []
        if missing:
            raise ConfigError(f"--protect: the classifier does not know {missing} "
                              f"(it knows {self.classifier_attribute_names})")
        return np.array([n in set(protected) for n in self.attribute_names])

    def inversion_attributes(self, originals: np.ndarray, *, protected: Sequence[str]) -> np.ndarray:
        if originals.ndim != 2 or originals.shape[1] != len(self.attribute_names):
            raise ValueError(f"attributes {tuple(originals.shape)}: expected (B, {len(self.attribute_names)})")
        masked = np.where(self.protected_mask(protected), 0.0, originals).astype(np.float32)
        return np.zeros_like(masked) if self.label_free else masked

    def _chunks(self, *arrays):
        for i in range(0, arrays[0].shape[0], self.batch_size):
            yield [a[i : i + self.batch_size] for a in arrays]

    @staticmethod
    def _images(images) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images {x.shape}: expected (B,3,H,W) float32 in [-1,1]")
        return x

    # -- steps 2 and 3 ---------------------------------------------------------------------------------
    def invert(self, images, originals: np.ndarray, *, strength: float, protected: Sequence[str]) -> np.ndarray:
        a = self.inversion_attributes(np.asarray(originals, dtype=np.float32), protected=protected)
        grid, out = self.timesteps(strength), []
        w = 1.0 if self.label_free else self.inversion_guidance
        for x, a_b in self._chunks(self._images(images), a):
            b = x.shape[0]
            t = np.full(b, -1, dtype=np.int64)
            for t_next in grid:
                t_next = np.full(b, t_next, dtype=np.int64)
                (x,) = self.invert_graph.run({"sample": x, "timestep": t, "next_timestep": t_next, "attributes": a_b,
                                              "guidance_scale": np.full(b, w, dtype=np.float32)})
                t = t_next
            out.append(_host(x))
        return np.concatenate(out)

    def encode(self, images, originals: np.ndarray, *, strength: float, protected: Sequence[str],
               encoding: str = "invert", noise: np.ndarray | None = None) -> np.ndarray:
        """images -> x_t0 by ``encoding``; ``noise`` replaces the secret noise (tests and verification only)."""
        check_encoding(encoding)
        if encoding == "invert":
            if noise is not None:
                raise ConfigError("noise=: DDIM inversion takes no noise (only the 'noise' encoding does)")
            return self.invert(images, originals, strength=strength, protected=protected)
        self.protected_mask(protected)
        x = self._images(images)
        if noise is None:
            noise = np.random.default_rng(secret_seed()).standard_normal(x.shape, dtype=np.float32)
        if noise.shape != x.shape:
            raise ValueError(f"noise {noise.shape}: expected the images' shape {x.shape}")
        a = self.alphas_cumprod[self.timesteps(strength)[-1]]
        return (np.sqrt(a) * x + np.sqrt(1 - a) * noise).astype(np.float32)

    def guide_targets(self, targets: np.ndarray, *, protected: Sequence[str]) -> np.ndarray:
        return targets if self.keep_unprotected else np.where(self.protected_mask(protected), targets, 0.0)

    def regenerate(self, x_t0: np.ndarray, targets: np.ndarray, *, strength: float, protected: Sequence[str],
                   guidance_factor=1.0, on_step: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
        """x_t0 (B,3,H,W), targets (B,k) -> edits (B,3,H,W) in [-1,1]. ``on_step(i, n, pred_x0)`` is called after
        each step with the predicted clean image (live previews; it costs a device-to-host copy on CUDA)."""
        targets = np.asarray(targets, dtype=np.float32)
        grid = self.timesteps(strength)
        factor = np.broadcast_to(np.asarray(guidance_factor, dtype=np.float32), (x_t0.shape[0],))
        if self.backend == "guided":
            attrs, scale = self.guide_targets(targets, protected=protected).astype(np.float32), self.classifier_scale
        else:
            attrs, scale = targets, self.guidance_scale
        out = []
        for x, a_b, f in self._chunks(self._images(x_t0), attrs, factor):
            b = x.shape[0]
            w = (scale * f).astype(np.float32)
            for i in range(len(grid) - 1, -1, -1):
                feeds = {"sample": x, "timestep": np.full(b, grid[i], dtype=np.int64),
                         "prev_timestep": np.full(b, grid[i - 1] if i > 0 else -1, dtype=np.int64),
                         "attributes": a_b, "guidance_scale": w}
                x, x0 = self.denoise.run(feeds)
                if on_step is not None:
                    on_step(len(grid) - i, len(grid), _host(x0))
            out.append(np.clip(_host(x), -1.0, 1.0))
        return np.concatenate(out)

    def edit(self, images, originals: np.ndarray, targets: np.ndarray, *, strength: float, protected: Sequence[str],
             guidance_factor=1.0, encoding: str = "invert", noise: np.ndarray | None = None) -> np.ndarray:
        images = self._images(images)
        originals, targets = np.asarray(originals, dtype=np.float32), np.asarray(targets, dtype=np.float32)
        if originals.shape != targets.shape or originals.shape[0] != images.shape[0]:
            raise ValueError(f"edit: images {images.shape}, originals {originals.shape}, targets {targets.shape} "
                             f"do not line up as (B,3,H,W), (B,k), (B,k)")
        x_t0 = self.encode(images, originals, strength=strength, protected=protected, encoding=encoding, noise=noise)
        return self.regenerate(x_t0, targets, strength=strength, protected=protected, guidance_factor=guidance_factor)

    # -- step 4 ----------------------------------------------------------------------------------------
    def logits(self, images) -> np.ndarray:
        if self.classifier is None:
            raise ConfigError("checking an edit needs a classifier; this export has none (`veil export --classifier`)")
        return np.concatenate([_host(self.classifier.run({"images": x})[0]) for (x,) in self._chunks(self._images(images))])

    def shown(self, edited, targets: np.ndarray, *, protected: Sequence[str]) -> np.ndarray:
        """(B,p): P(the edit shows the released value) per protected attribute, as ``PrivateEditor.shown``."""
        mask = self.protected_mask(protected)
        z = self.logits(edited)
        names = [n for n, m in zip(self.attribute_names, mask) if m]
        cols = [self.attribute_names.index(n) for n in names]
        clf = [self.classifier_attribute_names.index(n) for n in names]
        return 1.0 / (1.0 + np.exp(-z[:, clf] * np.asarray(targets, dtype=np.float32)[:, cols]))

    def edit_checked(self, images, originals: np.ndarray, targets: np.ndarray, *, strength: float,
                     protected: Sequence[str], encoding: str = "invert") -> CheckedEdits:
        images = self._images(images)
        originals, targets = np.asarray(originals, dtype=np.float32), np.asarray(targets, dtype=np.float32)
        mask = self.protected_mask(protected)
        b = images.shape[0]
        out, shown = np.empty_like(images), np.zeros((b, int(mask.sum())), dtype=np.float32)
        attempts, used_s, used_g = np.zeros(b, dtype=np.int64), np.zeros(b), np.zeros(b)
        pending = np.arange(b)
        for k, (s, g) in enumerate(retry_ladder(strength, self.max_retries)):
            edited = self.edit(images[pending], originals[pending], targets[pending], strength=s, protected=protected,
                               guidance_factor=g, encoding=encoding)
            p = self.shown(edited, targets[pending], protected=protected)
            out[pending], shown[pending] = edited, p
            attempts[pending], used_s[pending], used_g[pending] = k + 1, s, g
            pending = pending[~(p >= self.check_threshold).all(axis=1)]
            if not len(pending):
                break
        passed = (shown >= self.check_threshold).all(axis=1)
        return CheckedEdits(out, shown, passed, attempts, used_s, used_g, self.check_threshold,
                               tuple(n for n in self.attribute_names if n in set(protected)))

    def propose(self, images) -> list[dict[str, dict]]:
        """Attribute guesses of unlabelled images at t = 0 with their confidence, as ``PrivateEditor.propose``."""
        z = self.logits(images)
        rows = []
        for zr in z:
            row = {}
            for n in self.attribute_names:
                if n in self.classifier_attribute_names:
                    v = float(zr[self.classifier_attribute_names.index(n)])
                    row[n] = {"value": 1 if v >= 0 else -1, "confidence": round(float(1 / (1 + np.exp(-abs(v)))), 4)}
                else:
                    row[n] = {"value": 0, "confidence": 0.0}
            rows.append(row)
        return rows

    def __call__(self, images: Sequence[np.ndarray], *, originals: Sequence[Mapping[str, int]],
                 targets: Sequence[Mapping[str, int]], strength: float, protected: Sequence[str],
                 check: bool = False, encoding: str = "invert") -> list[np.ndarray]:
        """The EditFn of ``veil.privacy.session`` (see ``PrivateEditor.__call__``)."""
        a = np.stack([self.attribute_vector(o) for o in originals])
        a_new = np.stack([self.attribute_vector(t) for t in targets])
        x = np.stack([np.asarray(im, dtype=np.float32) for im in images])
        if check:
            result = self.edit_checked(x, a, a_new, strength=strength, protected=protected, encoding=encoding)
            if not bool(result.passed.all()):
                i = int(np.flatnonzero(~result.passed)[0])
                raise EditRefused(f"the edit does not show its released values after {int(result.attempts[i])} "
                                  f"attempts ({result.row(i)['shown']}, threshold {self.check_threshold:g}); "
                                  f"not released", result)
            return list(result.images)
        a_inv = self.inversion_attributes(a, protected=protected)
        if all(im is images[0] for im in images) and bool((a_inv == a_inv[0]).all()):
            x_t0 = self.encode(x[:1], a_inv[:1], strength=strength, protected=protected, encoding=encoding)
            return list(self.regenerate(np.repeat(x_t0, len(images), axis=0), a_new, strength=strength,
                                        protected=protected))
        return list(self.edit(x, a, a_new, strength=strength, protected=protected, encoding=encoding))

    def describe(self) -> dict[str, Any]:
        """What runs where: for logs, the CLI summary and the server's health check."""
        return {"export": str(self.folder), "backend": self.backend, "provider": self.provider,
                "threads": self.threads, "cache": None if self.cache_dir is None else str(self.cache_dir)}
