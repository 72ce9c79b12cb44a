"""Benchmark: one optimizer step of the UNet, non-private vs DP-SGD engines, by batch and noise multiplicity.

    python bench/dp_step.py                                  # default UNet, batch 32 64 128, K 1 4, all modes
    python bench/dp_step.py --model large --batch 32 64      # a 10.1M-parameter UNet
    python bench/dp_step.py --config lightning_modules/configs/synthetic32_long.yaml --batch 256 --k 1
    python bench/dp_step.py --set data.resolution=64 --modes nonprivate opacus-ghost ghost   # any config override

Modes (rows of one chunk: B examples x K noise draws, the DP step of ``dp.step``):
  nonprivate    the same B*K rows, mean loss, one backward, the base optimizer (the baseline)
  opacus        dp.engine opacus + dp.kernel opacus: Opacus's per-sample hooks (B*K rows of per-sample
                gradients, folded to B), Opacus's clip / noise
  opacus-ghost  Opacus 1.6's own ghost clipping (``GradSampleModuleFastGradientClipping``, what
                ``make_private(grad_sample_mode="ghost")`` builds) with its loss wrapper and optimizer:
                a first backward for the per-example norms (ghost norms for Linear, per-sample gradients
                for Conv2d / GroupNorm), a second for the clipped sum. Opacus has no noise multiplicity:
                at K > 1 its per-layer samplers run unchanged on the B*K rows and the result is folded to
                the mean over each example's K rows before the norm (``_KFoldedGhostClipping``), and the
                loss wrapper gets each example's mean loss over its rows
  fused         dp.engine opacus + dp.kernel fused: the same hooks, veil's fused clip-and-noise stage
  ghost         dp.engine ghost: per-example norms and the clipped sum from the one backward
                (``dp.ghost``), no per-example gradients; veil's noise stage

Before timing opacus-ghost, ``check_clipped`` compares the per-example norms and clipped summed gradients of
ghost, opacus-ghost and Opacus's hooks (the reference: per-sample gradients, Opacus's clipping arithmetic)
on a small batch with the same loss draws, at a clipping norm that clips half the examples; a mismatch
stops the run.

Each configuration runs in a process of its own (a fork of one forkserver that imported torch & co once:
bench/forked.py; ``--fresh-processes``: a new interpreter each) so peak memory is its own: on CUDA the peak of
``torch.cuda.max_memory_allocated`` during a step above the memory held before it; on the CPU the
growth of the process's peak RSS (ru_maxrss) during the first step. Times are the median of
``--repeats`` steps after ``--warmup`` (CUDA events on CUDA). Ratios are against the non-private step,
Opacus's hooks and Opacus's ghost clipping of the same batch and K in the same run (shared machines are
noisy: compare ratios, not absolute times). "largest B" is the largest physical batch (examples, at the
row's K) one step fits in, by doubling from the largest benchmarked batch until CUDA runs out of memory
(bounded by ``--largest-cap`` and ``--largest-seconds``); on the CPU it is not measured ("n/a (CPU)"). A
hooks configuration whose per-sample gradients alone (B*K rows x parameters x 4 bytes) would exceed
``--max-grad-sample-gib`` is not run and says so: on this 24 GiB machine it would swap.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time

MODES = ("nonprivate", "opacus", "opacus-ghost", "fused", "ghost")
HOOKS_MODES = ("opacus", "fused")  # per-sample gradients of every layer (the --max-grad-sample-gib guard)
MODELS = {  # --model: overrides of the config's model section
    "default": [],
    "large": ["model.block_out_channels=[96,192,192]", "model.norm_num_groups=32"],  # 10.1M parameters
}
CHECK_TOLERANCE = 1e-3  # relative L2 error, fp32 without TF32: different algorithms round differently (~1e-6)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


# ------------------------------------------------------------------------------------------ building a step
def build(mode: str, batch: int, k: int, config: str, overrides: list[str], device: str,
          max_grad_norm: float | None = None):
    """The DPDiffusionModule of ``mode`` (dp off for nonprivate and opacus-ghost) and its config; the
    weights depend only on the config (seeded)."""
    import torch

    from veil.jobs.config import load_config
    from veil.lightning_modules.diffusion_module import DPDiffusionModule

    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    dp = dict(cfg.dp.to_dict(), enabled=mode not in ("nonprivate", "opacus-ghost"), target_epsilon=None,
              noise_multiplier=1.0, engine="ghost" if mode == "ghost" else "opacus",
              kernel="opacus" if mode == "opacus" else "auto", noise_multiplicity=k, max_physical_batch_size=batch)
    if max_grad_norm is not None:
        dp["max_grad_norm"] = max_grad_norm
    model_kwargs = dict(num_attributes=6, resolution=cfg.data.resolution, **cfg.model.kwargs())
    module = DPDiffusionModule(model_kwargs=model_kwargs, attribute_names=[f"a{i}" for i in range(6)],
                               train_size=batch * 20, sample_rate=0.05, planned_steps=100, dp=dp).to(device)
    return module, cfg


def _k_folded_ghost_class():
    """Opacus's ghost-clipping module with the K rows of each example folded (K > 1; see the module doc)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
    from opacus.utils.module_utils import trainable_parameters

    class _KFoldedGhostClipping(GradSampleModuleFastGradientClipping):
        """Rows iK .. iK+K-1 are example i. Ghost-norm layers (Linear) see each example's K rows as one
        sequence of K*T positions with the output gradients divided by K (the gradient of the mean of the
        rows); per-sample-gradient layers average their K rows' gradients. Each layer must run once per
        forward (true of the UNet); Opacus's own accumulation for reused layers is not reproduced."""

        k = 1

        def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):
            if not self.hooks_enabled:
                return
            activations, g = self.rearrange_grad_samples(module=module, backprops=forward_output[0].detach(),
                                                         loss_reduction=loss_reduction, batch_first=batch_first)
            k = self.k
            if self.use_ghost_clipping and type(module) in self.NORM_SAMPLERS:
                a = activations[0]
                a = a.reshape(a.shape[0] // k, -1, a.shape[-1])  # (B, K*T, d)
                g = g.reshape(g.shape[0] // k, -1, g.shape[-1]) / k
                norms = self.NORM_SAMPLERS[type(module)](module, [a], g)
            else:  # Opacus's choice of per-sample gradient function, as in its own hook
                sampler = self.GRAD_SAMPLERS.get(type(module)) if not self.force_functorch else None
                grads = (sampler or ft_compute_per_sample_gradient)(module, activations, g)
                norms = {p: gs.view(-1, k, *gs.shape[1:]).mean(dim=1).flatten(1).norm(2, dim=-1)
                         for p, gs in grads.items()}
            for p, n in norms.items():
                if p.requires_grad:
                    p._norm_sample = n
            for _, p in trainable_parameters(module):
                p._forward_counter -= 1
            if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
                del module.max_batch_len

    return _KFoldedGhostClipping


class _ExampleLoss:
    """The criterion given to Opacus's loss wrapper: per-row losses in, each example's mean over its K rows
    out (reduction "none"), or the mean of all rows; ``reduction`` is the attribute the wrapper asserts."""

    def __init__(self, k: int):
        self.k, self.reduction = k, "mean"

    def __call__(self, rows):
        per_example = rows.view(-1, self.k).mean(dim=1)
        return per_example if self.reduction == "none" else per_example.mean()


def attach_opacus_ghost(module, base_opt, *, batch: int, k: int, max_grad_norm: float):
    """Opacus 1.6 ghost clipping on ``module.model``: (module wrapper, DP optimizer, loss wrapper)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from veil.lightning_modules.dp.grad_sample import make_conv_inputs_contiguous

    make_conv_inputs_contiguous(module.model)  # Opacus 1.6's wrong conv per-sample gradients (DESIGN.md)
    cls = GradSampleModuleFastGradientClipping if k == 1 else _k_folded_ghost_class()
    gsm = cls(module.model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm,
              use_ghost_clipping=True)
    gsm.k = k
    opt = DPOptimizerFastGradientClipping(base_opt, noise_multiplier=1.0, max_grad_norm=max_grad_norm,
                                          expected_batch_size=batch, loss_reduction="mean")
    return gsm, opt, DPLossFastGradientClipping(gsm, opt, _ExampleLoss(k), loss_reduction="mean")


def inputs(batch: int, resolution: int, device: str, seed: int = 0):
    """Images (B,3,H,W) in [-1,1] and attributes (B,6) in {-1,+1}, seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1
    a = torch.randint(0, 2, (batch, 6), generator=g).float() * 2 - 1
    return x.to(device), a.to(device)


def make_step(mode: str, batch: int, k: int, config: str, overrides: list[str], device: str,
              max_grad_norm: float | None = None):
    """(step, module, backward): ``step()`` is one whole optimizer step of ``mode`` on fixed inputs;
    ``backward()`` the part that leaves the clipped sum (DP modes) in ``p.grad`` and returns the norms."""
    import torch

    from veil.kernels.reference import (
        clip_factors_reference,
        clipped_sum_reference,
        per_sample_norms_reference,
    )
    from veil.lightning_modules.dp.grad_sample import fold_noise_draws

    module, cfg = build(mode, batch, k, config, overrides, device, max_grad_norm)
    opt = module.configure_optimizers()
    params = module.trainable_parameters()
    x, a = inputs(batch, cfg.data.resolution, device)
    cuda = device.startswith("cuda")
    ghost = getattr(module, "_ghost_clipper", None)
    c = module.dp_cfg.max_grad_norm
    if mode == "opacus-ghost":
        gsm, opt, criterion = attach_opacus_ghost(module, opt, batch=batch, k=k, max_grad_norm=c)

    def backward():
        if mode == "nonprivate":  # the same B*K rows as the DP modes
            module.per_row_loss(x.repeat_interleave(k, 0), a.repeat_interleave(k, 0)).mean().backward()
            return None
        if mode == "opacus-ghost":
            criterion(module.per_row_loss(x.repeat_interleave(k, 0), a.repeat_interleave(k, 0))).backward()
            return gsm.per_sample_gradient_norms
        loss, rows_k = module.chunk_loss(x, a)
        if ghost is not None:
            return ghost.backward_mean(loss, examples=batch, noise_multiplicity=rows_k)
        loss.backward()
        fold_noise_draws(params, batch, rows_k)
        if getattr(backward, "reference", False):  # check_clipped: Opacus's clipping arithmetic
            gs = [p.grad_sample for p in params]
            norms = per_sample_norms_reference(gs)
            factors = clip_factors_reference(norms, max_grad_norm=c)
            for p, g in zip(params, gs):
                p.grad = clipped_sum_reference(g, clip_factors=factors, dtype=p.dtype)
            return norms
        return None

    def step():
        backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    return step, module, backward


# ------------------------------------------------------------------------------------------ measuring
def time_step(step, *, device: str, warmup: int, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after ``warmup``: CUDA events on CUDA, else the wall clock."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_peak_mib(step) -> float:
    """Peak CUDA memory of one call of ``step`` above what was allocated before it, MiB."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    step()
    return (torch.cuda.max_memory_allocated() - held) / 2**20


def is_oom(e: BaseException) -> bool:
    """CUDA out of memory, as torch, cuDNN or cuBLAS report it."""
    import torch

    text = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text))


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(fits, *, start: int, cap: int, seconds: float) -> dict:
    """Doubling search: the largest batch b = start, 2 start, ... <= cap with ``fits(b)`` True (False on
    out of memory), stopped after ``seconds``. Returns {"largest": b or None, "stop": why it stopped}."""
    t0, best, b = time.perf_counter(), None, start
    while True:
        if b > cap:
            return {"largest": best, "stop": f"cap {cap}"}
        if time.perf_counter() - t0 > seconds:
            return {"largest": best, "stop": f"time limit {seconds:g} s"}
        if not fits(b):
            return {"largest": best, "stop": f"out of memory at {b}"}
        best, b = b, 2 * b


def step_fits(mode: str, k: int, config: str, overrides: list[str], device: str):
    """``fits(b)`` for ``largest_batch``: builds ``mode`` at batch b and runs one step."""
    def fits(b: int) -> bool:
        try:
            step = make_step(mode, b, k, config, overrides, device)[0]
            step()
            return True
        except Exception as e:
            if not is_oom(e):
                raise
            return False
        finally:
            step = None
            free_memory()
    return fits


# ------------------------------------------------------------------------------------------ the reference check
def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_clipped(modes: list[str], *, batch: int, k: int, config: str, overrides: list[str], device: str) -> dict:
    """Per-example norms and clipped summed gradients of each of ``modes`` against Opacus's hooks with
    Opacus's clipping arithmetic, the same weights and loss draws, C = the median norm (half the examples
    clipped). TF32 off. Returns {"C", "clipped", "norm_err" / "grad_err": {mode: relative L2 error}, "ok"}."""
    import torch

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def run(mode: str, c: float | None):
        _, module, backward = make_step(mode, batch, k, config, overrides, device, max_grad_norm=c)
        backward.reference = True
        torch.manual_seed(1)  # the loss's draws (t, noise, attribute dropout): the same for every mode
        norms = backward()
        return norms.detach().flatten().double(), [p.grad.detach().double() for p in module.trainable_parameters()]

    try:
        ref_norms, _ = run("opacus", None)
        c = float(ref_norms.median())
        ref_norms, ref_grads = run("opacus", c)
        out = {"C": c, "clipped": int((ref_norms > c).sum()), "batch": batch, "k": k, "norm_err": {}, "grad_err": {}}
        for mode in modes:
            norms, grads = run(mode, c)
            out["norm_err"][mode] = _rel(norms, ref_norms)
            out["grad_err"][mode] = _rel(torch.cat([g.flatten() for g in grads]),
                                         torch.cat([g.flatten() for g in ref_grads]))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        free_memory()
    out["tolerance"] = CHECK_TOLERANCE
    out["ok"] = all(e < CHECK_TOLERANCE for d in ("norm_err", "grad_err") for e in out[d].values())
    return out


# ------------------------------------------------------------------------------------------ the CLI
def run_one(mode: str, batch: int, k: int, config: str, overrides: list[str], warmup: int, repeats: int,
            device: str) -> dict:
    """One configuration in this (fresh) process: time and peak memory."""
    step, module, _ = make_step(mode, batch, k, config, overrides, device)
    rss0 = _rss_mib()
    if device.startswith("cuda"):
        peak = cuda_peak_mib(step)
    else:
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    seconds = time_step(step, device=device, warmup=warmup, repeats=repeats)
    n_params = sum(p.numel() for p in module.model.parameters())
    return {"mode": mode, "batch": batch, "k": k, "params": n_params, "seconds": seconds, "peak_mib": peak}


def _param_count(config: str, overrides: list[str]) -> int:
    module, _ = build("nonprivate", 1, 1, config, overrides, "cpu")
    return sum(p.numel() for p in module.model.parameters())


PRELOAD = ("numpy", "torch", "lightning", "opacus", "diffusers", "veil.lightning_modules.dp.grad_sample")
_CHILDREN = []


def _subprocess(args, *extra: str) -> dict:
    """One configuration in a process of its own (bench/forked.py: forked from its forkserver, torch & co imported
    once, or with ``--fresh-processes`` a new interpreter); its last stdout line, JSON."""
    argv = ["--config", args.config, "--model", args.model, "--warmup", str(args.warmup), "--repeats",
            str(args.repeats), "--device", args.device, *[f"--set={o}" for o in args.set], *extra]
    if not _CHILDREN:
        bench = os.path.dirname(os.path.abspath(__file__))
        if bench not in sys.path:
            sys.path.insert(0, bench)
        import forked  # by name: the forkserver unpickles its child function from it

        _CHILDREN.append(forked.Children(preload=PRELOAD, fresh=args.fresh_processes))
    children = _CHILDREN[0]
    with tempfile.TemporaryDirectory(prefix="dp_step_") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        rc = children.wait(children.start(__file__, argv, stdout=out, stderr=err))
        stdout, stderr = (open(p).read() if os.path.exists(p) else "" for p in (out, err))
    if rc != 0:
        print(stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"bench/dp_step.py {' '.join(extra)} failed")
    return json.loads(stdout.strip().splitlines()[-1])


def _check_before_timing(args, overrides: list[str]) -> None:
    """``check_clipped`` at ``--check-batch`` and the largest K; stops the run on a mismatch."""
    check = check_clipped(["opacus-ghost", "ghost"], batch=args.check_batch, k=max(args.k), config=args.config,
                          overrides=overrides, device=args.device)
    print(f"check (B={check['batch']}, K={check['k']}, C={check['C']:.3g}, {check['clipped']} clipped), relative "
          f"error against Opacus's hooks: norms {check['norm_err']}, clipped sums {check['grad_err']}",
          file=sys.stderr, flush=True)
    if not check["ok"]:
        raise SystemExit(f"opacus-ghost or ghost disagrees with Opacus's hooks beyond {CHECK_TOLERANCE}: "
                         "not timing them")


def _time_row(args, mode: str, batch: int, k: int, n_params: int) -> dict:
    """One configuration in a process of its own, or the reason it is not run."""
    need = batch * k * n_params * 4 / 2**30
    if mode in HOOKS_MODES and need > args.max_grad_sample_gib:
        print(f"  {mode} B={batch} K={k}: not run, per-sample gradients alone need {need:.1f} GiB",
              file=sys.stderr, flush=True)
        return {"mode": mode, "batch": batch, "k": k, "params": n_params, "seconds": None, "peak_mib": None,
                "skipped": f"per-sample grads need {need:.1f} GiB"}
    r = _subprocess(args, "--one", f"{mode}:{batch}:{k}")
    print(f"  {mode} B={batch} K={k}: {r['seconds']:.3f} s, peak {r['peak_mib']:.0f} MiB", file=sys.stderr,
          flush=True)
    return r


def _largest(args, mode: str, k: int) -> str:
    """The "largest B" cell: a doubling search in a process of its own on CUDA; "n/a (CPU)" on the CPU."""
    if not args.device.startswith("cuda"):
        return "n/a (CPU)"
    found = _subprocess(args, "--largest-cap", str(args.largest_cap), "--largest-seconds", str(args.largest_seconds),
                        "--largest", f"{mode}:{max(args.batch)}:{k}")
    largest = str(found["largest"] or f"<{max(args.batch)}")
    return largest + ("" if "memory" in found["stop"] else "+")  # +: stopped by the cap or the time limit


def table(rows: list[dict]) -> str:
    """Plain-text table; ratios against the same batch and K's non-private, hooks and opacus-ghost rows."""
    lines = [(f"{'batch':>5} {'K':>2} {'mode':>12} {'step s':>8} {'x nonpriv':>9} {'opacus/x':>8} {'o-ghost/x':>9} "
              f"{'peak MiB':>9} {'x nonpriv':>9} {'largest B':>10}")]
    for r in rows:
        def same(mode, r=r):
            return next((b for b in rows if b["batch"] == r["batch"] and b["k"] == r["k"] and b["mode"] == mode
                         and b["seconds"] is not None), None)
        largest = r.get("largest") or "-"
        if r["seconds"] is None:
            lines.append(f"{r['batch']:>5} {r['k']:>2} {r['mode']:>12}  not run: {r['skipped']}")
            continue
        base, hooks, oghost = same("nonprivate"), same("opacus"), same("opacus-ghost")
        t_ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
        speedup = f"{hooks['seconds'] / r['seconds']:.2f}" if hooks else "-"
        vs_oghost = f"{oghost['seconds'] / r['seconds']:.2f}" if oghost else "-"
        m_ratio = f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}" if base else "-"
        lines.append(f"{r['batch']:>5} {r['k']:>2} {r['mode']:>12} {r['seconds']:>8.3f} {t_ratio:>9} {speedup:>8} "
                     f"{vs_oghost:>9} {r['peak_mib']:>9.1f} {m_ratio:>9} {largest:>10}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="lightning_modules/configs/synthetic32.yaml")
    parser.add_argument("--model", default="default", choices=sorted(MODELS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides (as `veil train --set`), after --model's")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4], help="noise multiplicities")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-grad-sample-gib", type=float, default=8.0)
    parser.add_argument("--largest-cap", type=int, default=16384, help="largest batch the doubling search tries")
    parser.add_argument("--largest-seconds", type=float, default=60.0, help="time limit of one doubling search")
    parser.add_argument("--check-batch", type=int, default=4, help="batch of the opacus-ghost check (0: no check)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--fresh-processes", action="store_true",
                        help="run each configuration in a new Python process (by default each is a fork of one "
                             "process that imported torch & co once)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    parser.add_argument("--largest", help=argparse.SUPPRESS)  # internal: one doubling search, print JSON
    args = parser.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = MODELS[args.model] + args.set
    if args.one or args.largest:
        mode, b, k = (args.one or args.largest).split(":")
        if args.one:
            result = run_one(mode, int(b), int(k), args.config, overrides, args.warmup, args.repeats, args.device)
        else:
            result = largest_batch(step_fits(mode, int(k), args.config, overrides, args.device), start=int(b),
                                   cap=args.largest_cap, seconds=args.largest_seconds)
        print(json.dumps(result))
        return
    if "opacus-ghost" in args.modes and args.check_batch:
        _check_before_timing(args, overrides)
    n_params = _param_count(args.config, overrides)
    rows = [_time_row(args, mode, batch, k, n_params) for batch in args.batch for k in args.k for mode in args.modes]
    for k in args.k:
        for mode in args.modes:
            largest = _largest(args, mode, k)
            for r in rows:
                if r["mode"] == mode and r["k"] == k:
                    r["largest"] = largest
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "model": args.model, "config": args.config, "rows": rows}, f, indent=1)
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model} "
          f"({n_params / 1e6:.2f}M parameters); largest B: '+' = the search stopped at its cap or time limit")
    print(table(rows))


if __name__ == "__main__":
    main()
