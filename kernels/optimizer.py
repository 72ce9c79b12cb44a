"""Opacus DP optimizers whose clip / accumulate / noise / scale stage runs fused.

``FusedDPOptimizer`` and ``FusedDistributedDPOptimizer`` subclass Opacus 1.6's ``DPOptimizer`` and
``DistributedDPOptimizer`` and keep their whole protocol: ``signal_skip_step`` for virtual batches,
``accumulated_iterations``, ``attach_step_hook`` (the accountant), ``zero_grad`` and the
"gradients not cleared" guard, and, for the distributed one, noise on rank 0 only followed by an
all-reduce SUM and a division by the world size. Only the arithmetic of ``pre_step`` changes:

* backend "triton" (default on CUDA): one launch for the per-sample norms of all parameters, then
  one pass that clips, sums over the batch, adds the running sum of skipped steps, draws the noise
  in-kernel and divides, writing straight into ``p.grad`` (reusing its memory when it exists).
  Skipped (virtual) steps run the same pass without noise into ``p.summed_grad``.
* backend "reference" (default on CPU, for fp64, and under TRITON_INTERPRET=1): ``veil.kernels.reference``, Opacus's exact arithmetic
  without its temporaries. At sigma = 0 it equals Opacus; at sigma > 0 it draws the same noise as
  Opacus given the same generator state.

Noise: a ``torch.Generator`` (given; or, per step, seeded from ``seed`` and the step number) on the
reference path; Philox keyed by ``seed`` (or a key drawn once from the given generator) at counters
``(step << 32) + flat element index`` on the triton path. With neither ``seed`` nor ``generator``
(the default) the key and the reference generators are seeded from the OS CSPRNG (``secrets``) in
this process, so nobody who knows the config or the global RNG's seed can replay the noise.
``state_dict()`` carries only the public step counter, never a key or a generator state: a
checkpoint can be shared without handing out the noise, and an optimizer resumed in a new process
draws fresh secret noise (with an explicit ``seed``, the per-step derivation continues the stream
without repeating it). Neither backend draws Opacus's ``secure_mode`` noise, so ``secure_mode=True``
is refused with a ``PrivacyError``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import secrets

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from veil.errors import ConfigError, PrivacyError
from veil.kernels.reference import (
    add_noise_reference_,
    clip_factors_reference,
    clipped_sum_reference,
    per_sample_norms_reference,
)

BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def _compiled_triton() -> bool:
    """Triton is installed and the kernels are compiled, not interpreted (the interpreter cannot read
    CUDA tensors through pointer tables: with TRITON_INTERPRET=1, 'auto' stays on the reference path)."""
    try:
        from veil.kernels.multi_tensor import interpreting
        from veil.kernels.per_sample_norms import _per_sample_sq_norms_kernel
    except ImportError:
        return False
    return not interpreting(_per_sample_sq_norms_kernel)


def _validate(*, noise_multiplier, max_grad_norm, backend, seed, generator, secure_mode) -> None:
    """Refuse what the fused optimizer cannot honour, naming the option and the fix."""
    if secure_mode:
        raise PrivacyError(
            "secure_mode=True asks for noise robust to floating-point attacks, which the fused DP kernels "
            "do not draw (Philox / torch.normal noise); set dp.kernel: opacus to get Opacus's secure noise"
        )
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if seed is not None and generator is not None:
        raise ConfigError("pass a noise seed or a torch.Generator, not both (dp.seed)")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ConfigError(f"must be an integer in [0, 2**63), got {seed!r}", option="dp.seed")
    if not max_grad_norm > 0:
        raise ConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if not noise_multiplier >= 0:
        raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")


class _FusedDPMixin:
    """The fused ``pre_step`` and its pieces; mixed in before an Opacus DP optimizer class."""

    def __init__(
        self, optimizer, *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int | None,
        loss_reduction: str = "mean", generator=None, secure_mode: bool = False, backend: str = "auto",
        seed: int | None = None, **kwargs,
    ):
        _validate(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, backend=backend,
                  seed=seed, generator=generator, secure_mode=secure_mode)
        super().__init__(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, generator=generator,
            secure_mode=secure_mode, **kwargs,
        )
        self.backend = backend
        self.seed = seed
        self._philox_seed: int | None = None  # Philox key of the triton path, fixed on first use
        self._noise_step = 0  # noisy triton steps so far: the high 32 bits of every Philox counter
        self._seeded_generators: dict[str, torch.Generator] = {}  # reference path, from ``seed``

    # --- what the subclasses change ------------------------------------------------------------
    def _adds_noise(self) -> bool:
        """Whether this process adds the noise (the distributed optimizer: rank 0 only)."""
        return True

    # --- per-sample gradients, backend, denominators -----------------------------------------
    def _grad_sample_chunks(self) -> list[list[torch.Tensor]]:
        """chunks[k][t]: parameter t's k-th accumulated per-sample gradient (Opacus's list, not concatenated)."""
        per_param = []
        for p in self.params:
            if not hasattr(p, "grad_sample"):
                raise ValueError("Per sample gradient not found. Are you using GradSampleModule?")
            if p.grad_sample is None:
                raise ValueError("Per sample gradient is not initialized. Not updated in backward pass?")
            per_param.append(p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample])
        if len({len(gs) for gs in per_param}) > 1:
            raise ValueError("Number of accumulated steps is inconsistent across parameters")
        return [list(chunk) for chunk in zip(*per_param)]

    def _resolve_backend(self, chunks: list[list[torch.Tensor]]) -> str:
        """'auto' is triton when every tensor sits on one CUDA device in a dtype the kernels take."""
        if self.backend != "auto":
            return self.backend
        tensors = [g for chunk in chunks for g in chunk] + self.params
        devices = {t.device for t in tensors}
        on_one_gpu = len(devices) == 1 and next(iter(devices)).type == "cuda"
        dtypes_ok = all(t.dtype in _TRITON_DTYPES for t in tensors)
        return "triton" if on_one_gpu and dtypes_ok and _compiled_triton() else "reference"

    def _denominator(self) -> float:
        """Opacus's scale_grad: expected_batch_size * accumulated_iterations for a mean loss, else 1."""
        if self.loss_reduction == "mean":
            return float(self.expected_batch_size * self.accumulated_iterations)
        return 1.0

    def _noise_std(self) -> float:
        """sigma * C on the rank that adds noise, 0 elsewhere."""
        return self.noise_multiplier * self.max_grad_norm if self._adds_noise() else 0.0

    # --- noise sources ---------------------------------------------------------------------------
    def _reference_generator(self, device: torch.device):
        """The given generator; else, for this step, one seeded from (``seed``, step) or from the OS CSPRNG."""
        if self.generator is not None:
            return self.generator
        key = str(device)
        if self.seed is not None:  # reproducible (not private): a fresh stream per noisy step
            return torch.Generator(device=device).manual_seed(_step_seed(self.seed, self._noise_step, key))
        if key not in self._seeded_generators:  # secret: seeded once per process and device, never stored
            self._seeded_generators[key] = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        return self._seeded_generators[key]

    def _philox_key(self) -> int:
        """``seed``, else a key drawn once from the given generator, else one from the OS CSPRNG."""
        if self._philox_seed is None:
            if self.seed is not None:
                self._philox_seed = self.seed
            elif self.generator is not None:
                key = torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device)
                self._philox_seed = int(key.item())
            else:
                self._philox_seed = secrets.randbits(62)
        return self._philox_seed

    def _philox_counters(self) -> tuple[int, list[int]]:
        """(offset of this step, start of each parameter in the flat vector); advances the step."""
        sizes = [p.numel() for p in self.params]
        if sum(sizes) >= 2**32:
            raise ConfigError("the fused DP kernels' noise counters cover < 2**32 parameters; use dp.kernel: opacus")
        offset = self._noise_step << 32
        self._noise_step += 1
        return offset, list(itertools.accumulate(sizes[:-1], initial=0))

    # --- reference backend -------------------------------------------------------------------------
    def _clip_and_accumulate_reference(self, chunks: list[list[torch.Tensor]]) -> None:
        """Opacus's clip_and_accumulate, without concatenating accumulated per-sample gradients."""
        clips = []
        for chunk in chunks:  # rows are independent: norms of a concatenation = concatenated norms
            if len(chunk[0]) == 0:
                clips.append(torch.zeros((0,), device=chunk[0].device))
                continue
            norms = per_sample_norms_reference(chunk)
            clips.append(clip_factors_reference(norms, max_grad_norm=self.max_grad_norm))
        for t, p in enumerate(self.params):
            _check_processed_flag(p.grad_sample)
            for chunk, clip in zip(chunks, clips):
                grad = clipped_sum_reference(chunk[t], clip_factors=clip, dtype=p.dtype)
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad.add_(grad)
            _mark_as_processed(p.grad_sample)

    # --- triton backend ----------------------------------------------------------------------------
    def _triton_clip_factors(self, chunk: list[torch.Tensor]) -> torch.Tensor:
        """c[b] = min(1, C / (n[b] + 1e-6)) with n[b] from the one-launch norm kernel, fp32 (B,)."""
        from veil.kernels.per_sample_norms import per_sample_sq_norms

        if len(chunk[0]) == 0:
            return torch.zeros((0,), device=chunk[0].device)
        norms = per_sample_sq_norms(chunk).sqrt_()
        return clip_factors_reference(norms, max_grad_norm=self.max_grad_norm)

    def _triton_pass(self, chunk: list[torch.Tensor], *, final: bool) -> None:
        """One batch of per-sample gradients into ``summed_grad`` (final=False) or, noised and divided, ``grad``."""
        from veil.kernels.clip_and_noise import fused_clip_and_noise

        params = self.params
        clip = self._triton_clip_factors(chunk)
        has_prev = [p.summed_grad is not None for p in params]
        assert all(has_prev) or not any(has_prev), "summed_grad is set for some parameters only"
        prevs = [p.summed_grad.contiguous() for p in params] if all(has_prev) else None
        if not final:
            outs = prevs or [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
            fused_clip_and_noise(chunk, clip_factors=clip, outputs=outs, prevs=prevs, noise_std=0.0, denominator=1.0)
            for p, out in zip(params, outs):
                p.summed_grad = out
            return
        if prevs is not None:
            for p in params:
                _check_processed_flag(p.summed_grad)
        outs = [self._grad_buffer(p) for p in params]
        std = self._noise_std()
        offset, bases = self._philox_counters() if std > 0 else (0, None)
        fused_clip_and_noise(
            chunk, clip_factors=clip, outputs=outs, prevs=prevs, noise_std=std, denominator=self._denominator(),
            seed=self._philox_key() if std > 0 else 0, philox_offset=offset, elem_bases=bases,
        )
        for p, out in zip(params, outs):
            p.grad = out.view_as(p)
            p.summed_grad = None  # consumed: nothing of it is needed after this step

    @staticmethod
    def _grad_buffer(p: torch.nn.Parameter) -> torch.Tensor:
        """Where the update goes: p.grad's memory when it fits, else the running sum, else new memory."""
        g = p.grad
        if g is not None and g.shape == p.shape and g.dtype == p.dtype and g.device == p.device and g.is_contiguous():
            return g
        if p.summed_grad is not None and p.summed_grad.is_contiguous():
            return p.summed_grad
        return torch.empty_like(p, memory_format=torch.contiguous_format)

    # --- Opacus's interface ------------------------------------------------------------------------
    def clip_and_accumulate(self) -> None:
        """Clip each sample to norm C and add the batch sum into ``p.summed_grad``."""
        chunks = self._grad_sample_chunks()
        if self._resolve_backend(chunks) == "reference":
            return self._clip_and_accumulate_reference(chunks)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
        for chunk in chunks:
            self._triton_pass(chunk, final=False)
        for p in self.params:
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """``p.grad = p.summed_grad + N(0, (sigma C)^2)``, in place in ``summed_grad`` (as Opacus's rank != 0)."""
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        std = self._noise_std()
        backend = self._resolve_backend([[p.summed_grad for p in params]])
        if std > 0 and backend == "reference":
            for p in params:
                add_noise_reference_(p.summed_grad, std=std, generator=self._reference_generator(p.device))
            self._noise_step += 1
        elif std > 0:
            from veil.kernels.clip_and_noise import fused_clip_and_noise

            summed = [p.summed_grad.contiguous() for p in params]
            no_samples = [s.reshape(1, -1)[:0] for s in summed]  # B = 0: the pass only adds noise
            offset, bases = self._philox_counters()
            fused_clip_and_noise(
                no_samples, clip_factors=torch.zeros((0,), device=summed[0].device), outputs=summed, prevs=summed,
                noise_std=std, denominator=1.0, seed=self._philox_key(), philox_offset=offset, elem_bases=bases,
            )
            for p, s in zip(params, summed):
                p.summed_grad = s
        for p in params:
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Opacus's scale_grad (``p.grad /= expected_batch_size * accumulated_iterations``), the same
        division, but with the denominator computed once: Opacus re-reads every parameter's
        ``grad_sample`` for each parameter, O(T^2) Python that costs ~10 ms per step on a UNet."""
        if self.loss_reduction == "mean":
            denominator = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= denominator

    def pre_step(self, closure=None) -> bool:
        """Opacus's pre_step; on the triton backend, clip + sum + noise + scale is one pass."""
        params = self.params
        if not params:
            return True
        chunks = self._grad_sample_chunks()
        for p in params:
            _check_processed_flag(p.grad_sample)
        skip = self._check_skip_next_step()
        backend = self._resolve_backend(chunks)
        if skip or backend == "reference":
            self.clip_and_accumulate()
            if skip:
                self._is_last_step_skipped = True
                return False
            self.add_noise()
            self.scale_grad()
        else:
            for chunk in chunks[:-1]:  # accumulated backward passes (a list of grad_samples)
                self._triton_pass(chunk, final=False)
            self._triton_pass(chunks[-1], final=True)
            for p in params:
                _mark_as_processed(p.grad_sample)
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    # --- checkpoints: the step counter travels, the key never does -------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["veil_dp_noise"] = {"noise_step": self._noise_step}  # public: how many noisy steps were taken
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        noise = state_dict.pop("veil_dp_noise", None)
        super().load_state_dict(state_dict)
        if noise is not None:
            self._noise_step = int(noise["noise_step"])


def _step_seed(seed: int, step: int, device: str) -> int:
    """A 63-bit seed for (seed, step, device): reproducible streams that never repeat across steps."""
    digest = hashlib.sha256(repr((int(seed), int(step), device)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class FusedDPOptimizer(_FusedDPMixin, DPOptimizer):
    """Opacus's ``DPOptimizer`` with the fused clip / noise stage; extra keywords ``backend``, ``seed``."""


class FusedDistributedDPOptimizer(_FusedDPMixin, DistributedDPOptimizer):
    """Opacus's ``DistributedDPOptimizer`` with the fused stage: noise on rank 0, then all-reduce SUM / world size."""

    def _adds_noise(self) -> bool:
        return self.rank == 0


class _ClippedSumMixin:
    """The DP optimizer of the ghost engine (``veil.lightning_modules.dp.ghost``): every ``p.grad`` already
    holds one physical chunk's clipped sum, ``sum_i c_i g_i``, computed from one backward. ``pre_step``
    adds it to ``p.summed_grad`` (virtual steps accumulate there), and at the last chunk adds the noise
    (the fused mixin's ``add_noise``: CSPRNG-seeded, rank 0 only under DDP) and divides by the expected
    batch size. The distributed class then all-reduces the noised sums once (Opacus's ``reduce_gradients``).
    Nothing here reads ``p.grad_sample``: no per-example gradient exists.

    ``fused_update``: at the last chunk, noise + mean + the base optimizer's update in one pass of
    ``veil.kernels.noise_update`` (no ``p.grad``, no noise tensor) for a plain ``torch.optim.SGD``,
    ``AdamW``, or ``Adam`` without weight decay, in one process. "auto" (default): when the noise
    runs on the Triton backend (CUDA); "always": whenever the optimizer qualifies (else ConfigError;
    on the CPU it runs the reference path); "never": the three separate stages.
    """

    _distributed = False

    def __init__(self, *args, fused_update: str = "auto", **kwargs):
        if fused_update not in ("auto", "always", "never"):
            raise ConfigError(f"fused_update must be auto, always or never, got {fused_update!r}")
        super().__init__(*args, **kwargs)
        self.fused_update = fused_update

    def clip_and_accumulate(self) -> None:
        for p in self.params:
            if p.grad is None:
                raise ValueError("no clipped gradient on a parameter: run GhostClipper.backward before the step")
            if p.summed_grad is None:
                p.summed_grad = p.grad.detach().clone()  # never an alias of p.grad (zero_grad zeroes it)
            else:
                _check_processed_flag(p.summed_grad)
                p.summed_grad.add_(p.grad.detach())

    def _denominator(self) -> float:
        return float(self.expected_batch_size) if self.loss_reduction == "mean" else 1.0

    def scale_grad(self) -> None:
        denominator = self._denominator()
        if denominator != 1.0:
            for p in self.params:
                p.grad /= denominator

    def pre_step(self, closure=None) -> bool:
        if not self.params:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    # --- noise + update in one pass --------------------------------------------------------------
    def _unfusable(self) -> str | None:
        """Why the base optimizer cannot take the fused update (None: it can)."""
        opt = self.original_optimizer
        if self._distributed:
            return "under DDP the noised sums are all-reduced between the noise and the update"
        if type(opt) not in (torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam):
            return f"{type(opt).__name__} is not SGD, AdamW or Adam"
        for group in opt.param_groups:
            if any(group.get(flag) for flag in ("maximize", "amsgrad", "differentiable", "capturable")):
                return "maximize/amsgrad/differentiable/capturable are not supported"
            if torch.is_tensor(group["lr"]):
                return "a tensor lr is not supported"
            if type(opt) is torch.optim.Adam and group["weight_decay"] != 0:
                return "Adam's coupled weight decay is not supported (use AdamW)"
        if any(p.dtype != torch.float32 or not p.is_contiguous() for p in self.params):
            return "parameters must be contiguous fp32"
        return None

    def _fused_backend(self) -> str | None:
        """The noise_update backend to use at this step, or None for the separate stages."""
        if self.fused_update == "never" or not self.params:
            return None
        reason = self._unfusable()
        if reason is not None:
            if self.fused_update == "always":
                raise ConfigError(f"fused_update='always': {reason}")
            return None
        triton = self._resolve_backend([list(self.params)]) == "triton"
        if self.fused_update == "auto" and not triton:
            return None
        return "triton" if triton else "reference"

    def step(self, closure=None):
        backend = self._fused_backend()
        if backend is None:
            return super().step(closure)
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return None
        self._fused_noise_update(backend)
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return None

    @torch.no_grad()
    def _fused_noise_update(self, backend: str) -> None:
        from veil.kernels.noise_update import fused_noise_adamw_, fused_noise_sgd_

        params = self.params
        std = self._noise_std()
        noise = {"noise_std": std, "denominator": self._denominator(), "backend": backend}
        if std > 0 and backend == "triton":
            offset, bases = self._philox_counters()
            base_of = {id(p): b for p, b in zip(params, bases)}
            noise.update(seed=self._philox_key(), philox_offset=offset)
        else:
            base_of = None
            if std > 0:
                noise["generator"] = self._reference_generator(params[0].device)
                self._noise_step += 1
        opt = self.original_optimizer
        for group in opt.param_groups:
            ps = [p for p in group["params"] if p.requires_grad]
            if not ps:
                continue
            summed = [p.summed_grad for p in ps]
            for t in summed:
                _check_processed_flag(t)
            bases = [base_of[id(p)] for p in ps] if base_of is not None else None
            states = [opt.state[p] for p in ps]
            if type(opt) is torch.optim.SGD:
                momentum = group["momentum"]
                first = momentum != 0 and "momentum_buffer" not in states[0]
                if first:
                    for p, st in zip(ps, states):
                        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                buffers = [st["momentum_buffer"] for st in states] if momentum != 0 else None
                fused_noise_sgd_(ps, summed, buffers, lr=group["lr"], momentum=momentum,
                                 dampening=group["dampening"], weight_decay=group["weight_decay"],
                                 nesterov=group["nesterov"], first_step=first, elem_bases=bases, **noise)
            else:  # AdamW, or Adam without weight decay (the same update)
                for p, st in zip(ps, states):
                    if "step" not in st:
                        st["step"] = torch.tensor(0.0)
                        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    st["step"] += 1
                beta1, beta2 = group["betas"]
                fused_noise_adamw_(ps, summed, [st["exp_avg"] for st in states],
                                   [st["exp_avg_sq"] for st in states], lr=group["lr"], beta1=beta1, beta2=beta2,
                                   eps=group["eps"], weight_decay=group["weight_decay"] if type(opt) is
                                   torch.optim.AdamW else 0.0, step=int(states[0]["step"]), elem_bases=bases,
                                   **noise)
            for t in summed:
                _mark_as_processed(t)


class GhostDPOptimizer(_ClippedSumMixin, FusedDPOptimizer):
    """Noise and scale of pre-clipped sums (``dp.engine: ghost``); keywords as ``FusedDPOptimizer``."""


class GhostDistributedDPOptimizer(_ClippedSumMixin, FusedDistributedDPOptimizer):
    """``GhostDPOptimizer`` under DDP: noise on rank 0, all-reduce SUM of the noised sums, / world size."""

    _distributed = True
