"""Every GPU path of veil checked and timed by one command, for the few minutes a GPU is lent.

    python bench/gpu_check.py --out docs/gpu/                # on a CUDA machine: about 8 minutes
    python bench/gpu_check.py --smoke --out /tmp/gpu_smoke   # the same code paths, tiny, on the CPU (~1 min)
    python bench/gpu_check.py --parts dp,kernels --out /tmp/gpu   # some parts only
    python bench/gpu_check.py --prepare --work bench/out/gpu_work   # only make the models (any machine)

Parts, in order, each in its own process with its own time budget (``--budget part=seconds``); a part
that fails, overruns or crashes is recorded with its reason and the next one runs. A part's process is a fork
of one forkserver that imported the heavy modules once (``PRELOAD``); ``--fresh-processes``: a new interpreter
for each part:

  env      versions: Python, torch (CUDA device), Triton, ONNX Runtime and its providers, Opacus, diffusers
  models   the conditional UNet of configs/synthetic32.yaml trained one step and exported (``veil export
           --steps 10``) at each resolution, with bench/serve.py's ``conditional_export`` (reused from
           ``--work`` when there; runs beside ``tests``); ``--checkpoint``/``--export`` give them instead
  tests    ``pytest -m gpu`` with TRITON_INTERPRET=0 (the compiled kernels), summarised from its JUnit XML
  dp       one DP step (bench/dp_step.py's ``make_step``) of the 4.7M and 10.1M UNets at 32 px and the 4.7M at
           64 px, batch 64 and 256, K = 1 and 4: nonprivate, Opacus hooks, Opacus ghost clipping, veil ghost;
           CUDA-event time after a warm-up, peak memory, and the largest batch each fits (doubling until out of
           memory, bounded in time); first ``check_clipped``: the per-example norms and clipped sums of ghost
           and opacus-ghost against Opacus's hooks on a small batch (a mode that fails it is not timed)
  kernels  achieved bandwidth (least bytes moved / time) of the fused clip-and-noise stage, the fused noise +
           AdamW update and the conv ghost norm (Triton), against a device-to-device ``copy_`` of the same
           bytes; each first checked against its PyTorch reference
  edit     a preview edit (10 inversion + 10 generation steps, batch 1 and 8, 64 and 32 px): PyTorch eager,
           torch.compile, ONNX Runtime with I/O binding (``OrtEditor``), and ONNX Runtime CUDA graphs replayed
           over the same export (``CudaGraphWalk``; "unsupported" where ONNX Runtime refuses the graph); ORT
           and compile checked against eager, CUDA graphs against ORT, before timing
  serve    ``veil serve`` (bench/serve.py's Server, sessions and closed-loop clients) at 1, 16 and 64 clients,
           micro-batched and not; first checked: the server runs on the expected provider and serves a preview

``--smoke`` runs the same code on the CPU at tiny sizes: Triton kernels under TRITON_INTERPRET=1, the CPU
ONNX Runtime provider, wall-clock timers instead of CUDA events, torch.compile with the eager backend
(inductor needs minutes on a small CPU; aot_eager fails on this UNet at batch 1, torch 2.13), no peak memory;
tests/bench/test_gpu_check.py runs it, so this script cannot rot.

Writes ``--out``/gpu_check.json (everything), gpu_check.md (the tables) and gpu_check.log (every part's
output); prints the markdown, its summary table last. Rows carry a status: ok, failed, oom, skipped (the
part's budget ran out, or the row does not apply here) or unsupported. Setting up a bare GPU machine
(its own python3 with a CUDA torch, a few carried wheels, veil installed --no-deps): docs/gpu/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CONFIGS = ROOT / "lightning_modules" / "configs"
PARTS = ("env", "models", "tests", "dp", "kernels", "edit", "serve")
# seconds; models runs beside tests, so a GPU run takes at most 30 + 110 + 160 + 35 + 85 + 60 = 480 s
GPU_BUDGET = {"env": 30, "models": 110, "tests": 110, "dp": 160, "kernels": 35, "edit": 85, "serve": 60}
SMOKE_BUDGET = {"env": 60, "models": 240, "tests": 120, "dp": 180, "kernels": 120, "edit": 180, "serve": 120}
TINY_UNET = ["model.block_out_channels=[16,32]", "model.attention_levels=[false,true]", "model.norm_num_groups=8",
             "model.attention_head_dim=8"]
SIZES = {
    "gpu": dict(
        dp_configs=[["4.7M UNet, 32 px", "synthetic32_long.yaml", []],
                    ["10.1M UNet, 32 px", "synthetic32.yaml", "large"],
                    ["4.7M UNet, 64 px", "synthetic32_long.yaml", ["data.resolution=64"]]],
        dp_cells=[[256, 1], [64, 1], [64, 4], [256, 4]], dp_check=[8, 2], dp_warmup=1, dp_repeats=3,
        largest_cap=16384,
        stage=[10_000_000, 64], update_params=10_000_000, ghost_conv=[64, 128, 16], kernel_reps=10,
        resolutions=[64, 32], edit_batches=[1, 8], edit_repeats=20, compile_backend="inductor", edit_tol=2e-2,
        serve_resolution=64, serve_clients=[1, 16, 64], serve_seconds=4.0, serve_warmup=1.5, serve_threads=2,
        test_paths=["tests"]),
    "smoke": dict(
        dp_configs=[["tiny UNet, 16 px", "synthetic32.yaml", ["data.resolution=16", *TINY_UNET]]],
        dp_cells=[[2, 1], [2, 2]], dp_check=[3, 2], dp_warmup=0, dp_repeats=1, largest_cap=8,
        stage=[0, 3], update_params=0, ghost_conv=[2, 4, 8], kernel_reps=2,
        resolutions=[32], edit_batches=[1, 2], edit_repeats=1, compile_backend="eager", edit_tol=2e-3,
        serve_resolution=32, serve_clients=[1, 2], serve_seconds=0.4, serve_warmup=0.1, serve_threads=1,
        test_paths=["tests/kernels"]),
}
SMOKE_SHAPES = [(8, 3, 3, 3), (8,), (16, 8, 3, 3), (16,), (24, 16), (24,), (5,), (7, 3)]  # odd sizes on purpose


def _sibling(name: str):
    """bench/<name>.py as a module (bench/ is not a package; "kernels" would clash with the source folder)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # bench/serve.py imports bench/export.py by name
    spec.loader.exec_module(module)
    return module


# =========================================================================================== one part's record
class Part:
    """What one part subprocess found, written to its JSON file after every change (a part killed at its
    budget keeps what it had). ``deadline``: the wall-clock time by which it should stop starting rows."""

    def __init__(self, name: str, path: Path, *, args, deadline: float):
        self.name, self.path, self.args, self.deadline = name, path, args, deadline
        self.smoke = args.smoke
        self.size = SIZES["smoke" if args.smoke else "gpu"]
        self.data = {"status": "running", "reason": None, "rows": [], "checks": [], "info": {}}

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, **row) -> dict:
        row.setdefault("status", "ok")
        self.data["rows"].append(row)
        self.save()
        return row

    def check(self, name: str, *, passed: bool, value: float | None = None, tolerance: float | None = None,
              detail=None) -> bool:
        self.data["checks"].append({"name": name, "passed": bool(passed), "value": value, "tolerance": tolerance,
                                    "detail": detail})
        self.save()
        return bool(passed)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def finish(self, status: str | None = None, reason: str | None = None) -> None:
        failed_checks = [c["name"] for c in self.data["checks"] if not c["passed"]]
        failed_rows = [r for r in self.data["rows"] if r["status"] == "failed"]
        if status is None:  # the part ran to its end: failed if a check or a row failed
            reasons = [f"check failed: {n}" for n in failed_checks]
            if failed_rows:
                reasons.append(f"{len(failed_rows)} row(s) failed, first: {failed_rows[0].get('reason')}")
            status, reason = ("failed", "; ".join(reasons)) if reasons else ("ok", None)
        self.data.update(status=status, reason=reason)
        self.save()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def _torch_device(part: Part) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not part.smoke else "cpu"


# =========================================================================================== env, models, tests
def part_env(part: Part) -> None:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    for name in ("torch", "triton", "onnxruntime", "opacus", "diffusers", "lightning", "fastapi", "pytest"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a missing package is a finding, not a crash
            info[name] = f"missing ({_error(e)})"
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        info["torch_cuda"] = torch.version.cuda
        import onnxruntime as ort

        info["ort_providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001
        info["error"] = _error(e)
    part.data["info"] = info
    part.row(what="versions", **{k: v for k, v in info.items() if k in ("torch", "cuda", "onnxruntime")})


def tiny_conditional_export(work: Path, resolution: int) -> tuple[Path, Path]:
    """--smoke: ``conditional_export``'s layout with a tiny UNet, trained one step on the CPU."""
    export_bench = _sibling("export")
    d = work / f"tiny_r{resolution}"
    if not (d / "cond" / "model").exists():
        sets = [f"--set={s}" for s in ["data.num_images=32", f"data.resolution={resolution}", "data.batch_size=8",
                                         *TINY_UNET, "trainer.max_steps=1", "dp.enabled=false",
                                         "dp.target_epsilon=null", "trainer.accelerator=cpu"]]
        export_bench._veil("train", "--config", str(CONFIGS / "synthetic32.yaml"), *sets, "--out", str(d / "cond"))
    if not (d / "export_conditional" / "veil_export.json").exists():
        export_bench._veil("export", "--checkpoint", str(d / "cond"), "--steps", "10", "--out",
                           str(d / "export_conditional"))
    return d / "cond", d / "export_conditional"


def part_models(part: Part) -> None:
    """``info["paths"]``: {resolution: {"checkpoint", "export"}}, saved as each is made."""
    args = part.args
    paths = part.data["info"]["paths"] = {}
    if args.checkpoint and args.export:
        res = json.loads((Path(args.export) / "veil_export.json").read_text())["resolution"]
        paths[str(res)] = {"checkpoint": str(Path(args.checkpoint).resolve()),
                           "export": str(Path(args.export).resolve())}
        part.row(resolution=res, made="given", **paths[str(res)])
    else:
        serve_bench = _sibling("serve")
        for res in part.size["resolutions"]:
            t0 = time.perf_counter()
            if part.smoke:
                ckpt, export = tiny_conditional_export(Path(args.work), res)
            else:
                export = serve_bench.conditional_export(Path(args.work), res)
                ckpt = export.parent / "cond"
            paths[str(res)] = {"checkpoint": str(ckpt.resolve()), "export": str(export.resolve())}
            part.row(resolution=res, made="made or reused", seconds=time.perf_counter() - t0, **paths[str(res)])


def _junit_counts(path: Path) -> dict:
    """Totals of a JUnit XML report; ``bad``: failed or errored tests; ``collection``: modules that did not
    import (pytest reports them as a test case with an empty class name and the module as its name)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["bad"], counts["collection"] = [], []
    for c in root.iter("testcase"):
        if c.find("failure") is not None or c.find("error") is not None:
            if c.get("classname"):
                counts["bad"].append(f"{c.get('classname')}::{c.get('name')}")
            else:
                counts["collection"].append(c.get("name", ""))
    return counts


def part_tests(part: Part) -> None:
    """``pytest -m gpu`` in a subprocess, over several processes where pytest-xdist is installed (the GPU
    image has it: Triton compiles each kernel variant on first use). Collection errors (a module that does
    not import on this machine) fail the part only when the module mentions gpu (it may hold gpu tests)."""
    workers = min(8, max(1, (os.cpu_count() or 2) // 2))
    xdist = ["-n", str(workers)] if importlib.util.find_spec("xdist") and workers > 1 else []
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *xdist,
               "--continue-on-collection-errors", f"--junitxml={junit}", *part.size["test_paths"]]
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                             timeout=max(part.left(), 5))
        print(out.stdout[-6000:], out.stderr[-3000:], sep="\n")
        if not junit.is_file():
            return part.row(status="failed", reason=f"pytest exited {out.returncode} without a report")
        c = _junit_counts(junit)
    collect_errors = c["collection"]
    gpu_collect = [m for m in collect_errors if _mentions_gpu(m)]
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"] - len(collect_errors)
    cuda = _torch_device(part) == "cuda"
    status, reason = "ok", None
    if c["bad"] or gpu_collect:
        status = "failed"
        reason = f"failed: {c['bad'][:5]}; modules with gpu tests that did not import: {gpu_collect}"
    elif cuda and passed == 0:
        status, reason = "failed", "no gpu test passed on a CUDA machine (all skipped?)"
    elif c["tests"] == 0:
        status, reason = "failed", f"no gpu test collected (pytest exit {out.returncode})"
    part.row(status=status, reason=reason, collected=c["tests"], passed=passed, failed=c["failures"],
             errors=c["errors"], skipped=c["skipped"], collection_errors=collect_errors,
             seconds=time.perf_counter() - t0, note=None if cuda else "no CUDA: gpu tests skip themselves")


def _mentions_gpu(module: str) -> bool:
    path = ROOT / (module.replace(".", "/") + ".py")
    return path.is_file() and "gpu" in path.read_text(errors="replace")


# =========================================================================================== dp
def part_dp(part: Part) -> None:
    """One model configuration (``--unit``) of the DP step: the check, the timed rows, the largest batches."""
    import torch

    dp_step = _sibling("dp_step")
    label, config, overrides = part.size["dp_configs"][part.args.unit]
    overrides = dp_step.MODELS[overrides] if isinstance(overrides, str) else overrides
    config, device, s = str(CONFIGS / config), _torch_device(part), part.size
    modes = ["nonprivate", "opacus", "opacus-ghost", "ghost"]
    b, k = s["dp_check"]
    bad = set()
    try:
        check = dp_step.check_clipped(["opacus-ghost", "ghost"], batch=b, k=k, config=config, overrides=overrides,
                                      device=device)
    except Exception as e:  # noqa: BLE001 - neither is timed then; the non-private rows still are
        traceback.print_exc()
        part.check(f"{label}: ghost and opacus-ghost vs Opacus hooks (B={b}, K={k})", passed=False, detail=_error(e))
        check, bad = None, {"opacus-ghost", "ghost"}
    for mode in ("opacus-ghost", "ghost") if check else ():
        err = max(check["norm_err"][mode], check["grad_err"][mode])
        if not part.check(f"{label}: {mode} norms and clipped sums vs Opacus hooks (B={b}, K={k}, "
                          f"{check['clipped']} of {b} clipped)", passed=err < check["tolerance"], value=err,
                          tolerance=check["tolerance"]):
            bad.add(mode)
    model = dp_step.build("nonprivate", 1, 1, config, overrides, "cpu")[0].model
    n_params = sum(p.numel() for p in model.parameters())
    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    searches_from = part.deadline - 0.3 * part.left()  # the timed rows leave 30% of the time to the searches
    for batch, k in s["dp_cells"]:  # cheapest and the targets' cell (K = 1, B = 256) first
        for mode in modes:
            base = dict(config=label, params=n_params, batch=batch, k=k, mode=mode)
            need = batch * k * n_params * 4
            if mode in bad:
                part.row(**base, status="failed", reason="not timed: its reference check failed")
            elif time.time() > searches_from - 5:
                part.row(**base, status="skipped", reason="part budget")
            elif mode == "opacus" and total and need > 0.9 * total:
                part.row(**base, status="skipped", reason=f"per-sample gradients alone need {need / 2**30:.0f} GiB")
            else:
                part.row(**base, **_time_dp(dp_step, mode, batch, k, config, overrides, device, s))
    searches = [m for m in modes if m not in bad]
    start = max(b for b, _ in s["dp_cells"])
    for i, mode in enumerate(searches):
        seconds = min(60.0, part.left() / (len(searches) - i)) - 2
        if seconds <= 0:
            part.row(config=label, mode=mode, k=1, kind="largest", status="skipped", reason="part budget")
            continue
        try:
            fits = dp_step.step_fits(mode, 1, config, overrides, device)
            found = dp_step.largest_batch(fits, start=start, cap=s["largest_cap"], seconds=seconds)
        except Exception as e:  # noqa: BLE001 - anything but out of memory: recorded
            found = {"status": "failed", "reason": _error(e)}
        part.row(config=label, mode=mode, k=1, kind="largest", **found)


def _time_dp(dp_step, mode, batch, k, config, overrides, device, s) -> dict:
    """Peak memory (CUDA) and median step seconds of one configuration; out of memory is a result."""
    try:
        step = dp_step.make_step(mode, batch, k, config, overrides, device)[0]
        peak = None  # on the CPU: bench/dp_step.py measures it, one configuration per process
        if device == "cuda":
            peak = dp_step.cuda_peak_mib(step)  # the first step, untimed
        else:
            step()
        seconds = dp_step.time_step(step, device=device, warmup=s["dp_warmup"], repeats=s["dp_repeats"])
        return {"seconds": seconds, "peak_mib": peak, "timer": "CUDA events" if device == "cuda" else "wall clock"}
    except Exception as e:  # noqa: BLE001 - recorded in the row
        if dp_step.is_oom(e):
            return {"status": "oom", "reason": _error(e)}
        return {"status": "failed", "reason": _error(e)}
    finally:
        step = None
        dp_step.free_memory()


# =========================================================================================== kernels
class _Timer:
    """Median seconds of ``fn`` (after ``prepare``, untimed) over ``reps`` runs after one warm-up."""

    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn, *, reps: int, prepare=None) -> float:
        import statistics

        import torch

        times = []
        for i in range(reps + 1):
            if prepare:
                prepare()
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                t = start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                fn()
                t = time.perf_counter() - t0
            if i:
                times.append(t)
        return statistics.median(times)


def _copy_seconds(nbytes: int, device: str, timer: _Timer, reps: int) -> float:
    """A device-to-device ``copy_`` that reads and writes ``nbytes`` in all (nbytes / 2 each way)."""
    import torch

    src = torch.empty(max(1, nbytes // 8), dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src), reps=reps)


def _bandwidth_row(part: Part, name: str, *, nbytes: int, seconds: float, device: str, timer, reps: int, **extra):
    copy = _copy_seconds(nbytes, device, timer, reps)
    return part.row(kernel=name, bytes=nbytes, seconds=seconds, gbps=nbytes / seconds / 1e9,
                    copy_gbps=nbytes / copy / 1e9, copy_fraction=copy / seconds, **extra)


def _rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def part_kernels(part: Part) -> None:
    import torch

    device, s = _torch_device(part), part.size
    timer, reps = _Timer(device), s["kernel_reps"]
    shapes = _sibling("kernels").unet_like_shapes(s["stage"][0]) if s["stage"][0] else SMOKE_SHAPES
    g = torch.Generator(device=device).manual_seed(0)
    for name, fn in (("clip-and-noise stage", _kernel_stage), ("noise + AdamW update", _kernel_update),
                     ("conv ghost norm", _kernel_ghost_norm)):
        if part.left() < 5:
            part.row(kernel=name, status="skipped", reason="part budget")
            continue
        try:
            fn(part, shapes=shapes, device=device, timer=timer, reps=reps, gen=g)
        except Exception as e:  # noqa: BLE001 - recorded, the next kernel runs
            traceback.print_exc()
            part.row(kernel=name, status="failed", reason=_error(e))
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


def _kernel_stage(part, *, shapes, device, timer, reps, gen) -> None:
    """FusedDPOptimizer.pre_step (per-sample norms, clip, sum, noise, divide) on fixed per-sample gradients:
    bytes = 2 B P x 4 (read twice) + P x 4 (write)."""
    import torch

    from veil.kernels.optimizer import FusedDPOptimizer

    batch = part.size["stage"][1]
    scale = torch.logspace(-1, 1, batch, device=device)  # some samples clipped, some not
    grads = [torch.randn((batch, *sh), device=device, generator=gen) * scale.view(-1, *[1] * len(sh))
             for sh in shapes]
    n = sum(math.prod(sh) for sh in shapes)

    def stage(backend: str, sigma: float):
        params = [torch.nn.Parameter(torch.zeros(sh, device=device)) for sh in shapes]
        opt = FusedDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma, max_grad_norm=1.0,
                               expected_batch_size=batch, seed=0, backend=backend)

        def arm():
            opt.zero_grad(set_to_none=True)
            for p, gs in zip(params, grads):
                p.grad_sample = gs.detach()  # a new tensor object each time: Opacus marks the ones it used
        return params, opt, arm

    outs = {}
    for backend in ("triton", "reference"):
        params, opt, arm = stage(backend, 0.0)
        arm()
        opt.pre_step()
        outs[backend] = torch.cat([p.grad.flatten() for p in params])
    err = _rel_err(outs["triton"], outs["reference"])
    if not part.check(f"clip-and-noise stage: triton vs reference at sigma 0 ({n:,} parameters x {batch})",
                      passed=err < 1e-5, value=err, tolerance=1e-5):
        return part.row(kernel="clip-and-noise stage", status="failed", reason="check failed")
    params, opt, arm = stage("triton", 1.0)
    seconds = timer(opt.pre_step, reps=reps, prepare=arm)
    _bandwidth_row(part, "clip-and-noise stage", nbytes=2 * batch * n * 4 + n * 4, seconds=seconds, device=device,
                   timer=timer, reps=reps, params=n, batch=batch)


def _kernel_update(part, *, shapes, device, timer, reps, gen) -> None:
    """fused_noise_adamw_: reads s, p, m, v and writes p, m, v: bytes = 7 P x 4."""
    import torch

    from veil.kernels.noise_update import fused_noise_adamw_

    if part.size["update_params"]:
        shapes = _sibling("kernels").unet_like_shapes(part.size["update_params"])
    summed = [torch.randn(sh, device=device, generator=gen) for sh in shapes]
    n = sum(math.prod(sh) for sh in shapes)
    kw = dict(denominator=64.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, seed=0)

    def state():
        return ([torch.randn(sh, device=device, generator=torch.Generator(device=device).manual_seed(1))
                 for sh in shapes], [torch.zeros(sh, device=device) for sh in shapes],
                [torch.zeros(sh, device=device) for sh in shapes])

    got = {}
    for backend in ("triton", "reference"):
        p, m, v = state()
        fused_noise_adamw_(p, summed, m, v, noise_std=0.0, backend=backend, **kw)
        got[backend] = torch.cat([t.flatten() for t in p])
    err = _rel_err(got["triton"], got["reference"])
    if not part.check(f"noise + AdamW update: triton vs reference at noise 0 ({n:,} parameters)",
                      passed=err < 1e-6, value=err, tolerance=1e-6):
        return part.row(kernel="noise + AdamW update", status="failed", reason="check failed")
    p, m, v = state()
    seconds = timer(lambda: fused_noise_adamw_(p, summed, m, v, noise_std=1.0, backend="triton", **kw), reps=reps)
    _bandwidth_row(part, "noise + AdamW update", nbytes=7 * n * 4, seconds=seconds, device=device, timer=timer,
                   reps=reps, params=n)


def _kernel_ghost_norm(part, *, shapes, device, timer, reps, gen) -> None:
    """conv2d_ghost_sq_norms of a 3x3 conv (stride 1, padding 1), x and g (B, C, H, W): bytes = x + g read
    once + B x 4 written (a lower bound: it is compute-bound, two S x S Grams per example)."""
    import torch

    from veil.kernels.ghost_norm import conv2d_ghost_sq_norms

    b, c, hw = part.size["ghost_conv"]
    x = torch.randn(b, c, hw, hw, device=device, generator=gen)
    g = torch.randn(b, c, hw, hw, device=device, generator=gen)
    kw = dict(kernel_size=3, padding=1)
    err = _rel_err(conv2d_ghost_sq_norms(x, g, backend="triton", **kw),
                   conv2d_ghost_sq_norms(x, g, backend="reference", **kw))
    if not part.check(f"conv ghost norm: triton vs reference (x {b}x{c}x{hw}x{hw}, 3x3)", passed=err < 1e-4,
                      value=err, tolerance=1e-4):
        return part.row(kernel="conv ghost norm", status="failed", reason="check failed")
    seconds = timer(lambda: conv2d_ghost_sq_norms(x, g, backend="triton", **kw), reps=reps)
    reference = timer(lambda: conv2d_ghost_sq_norms(x, g, backend="reference", **kw), reps=reps)
    _bandwidth_row(part, "conv ghost norm", nbytes=2 * x.numel() * 4 + b * 4, seconds=seconds, device=device,
                   timer=timer, reps=reps, shape=[b, c, hw, hw], reference_seconds=reference,
                   speedup_vs_reference=reference / seconds)


# =========================================================================================== edit
class Unsupported(Exception):
    """ONNX Runtime (or this machine) cannot run the configuration: a result, not a failure."""


class CudaGraphWalk:
    """``OrtBackend``'s two DDIM walks over the same export with ONNX Runtime CUDA graphs: every input and
    output bound once to fixed torch CUDA buffers (a captured graph replays the same addresses), new values
    copied into them between steps on the stream ONNX Runtime runs on (``user_compute_stream``)."""

    def __init__(self, folder: Path, *, batch: int, resolution: int, attributes: int):
        import numpy as np
        import onnxruntime as ort
        import torch

        cuda = "CUDAExecutionProvider"
        if cuda not in ort.get_available_providers():
            raise Unsupported(f"onnxruntime {ort.__version__} has no CUDA provider ({ort.get_available_providers()})")
        opts = {"enable_cuda_graph": "1", "user_compute_stream": str(torch.cuda.current_stream().cuda_stream)}
        so = ort.SessionOptions()
        so.log_severity_level = 3
        f32 = dict(dtype=torch.float32, device="cuda")
        self.x = torch.zeros(batch, 3, resolution, resolution, **f32)
        self.t, self.t2 = (torch.zeros(batch, dtype=torch.int64, device="cuda") for _ in range(2))
        self.a, self.w = torch.zeros(batch, attributes, **f32), torch.zeros(batch, **f32)
        self.graphs = {}
        for name, second in (("invert_step.onnx", "next_timestep"), ("denoise_step.onnx", "prev_timestep")):
            try:
                sess = ort.InferenceSession(str(folder / name), so, providers=[(cuda, opts)])
            except Exception as e:
                raise Unsupported(_error(e)) from e
            if sess.get_providers()[0] != cuda:
                raise Unsupported(f"the session fell back to {sess.get_providers()}")
            feeds = {"sample": self.x, "timestep": self.t, second: self.t2, "attributes": self.a,
                     "guidance_scale": self.w}
            binding, outs = sess.io_binding(), [torch.empty_like(self.x) for _ in sess.get_outputs()]
            for i in sess.get_inputs():
                v = feeds[i.name]
                binding.bind_input(i.name, "cuda", 0, np.int64 if v.dtype == torch.int64 else np.float32,
                                   list(v.shape), v.data_ptr())
            for o, buf in zip(sess.get_outputs(), outs):
                binding.bind_output(o.name, "cuda", 0, np.float32, list(buf.shape), buf.data_ptr())
            self.graphs[name] = (sess, binding, outs)

    def _run(self, name: str):
        sess, binding, outs = self.graphs[name]
        sess.run_with_iobinding(binding)
        self.x.copy_(outs[0])

    def edit(self, images, inversion_attributes, targets, *, grid: list[int], inversion_guidance: float,
             guidance: float):
        """Numpy in, numpy out: invert up ``grid`` under ``inversion_attributes``, regenerate towards ``targets``."""
        import torch

        self.x.copy_(torch.from_numpy(images))
        self.a.copy_(torch.from_numpy(inversion_attributes))
        self.w.fill_(inversion_guidance)
        t = -1
        for t_next in grid:
            self.t.fill_(t)
            self.t2.fill_(t_next)
            self._run("invert_step.onnx")
            t = t_next
        self.a.copy_(torch.from_numpy(targets))
        self.w.fill_(guidance)
        for i in range(len(grid) - 1, -1, -1):
            self.t.fill_(grid[i])
            self.t2.fill_(grid[i - 1] if i > 0 else -1)
            self._run("denoise_step.onnx")
        return self.x.clamp(-1, 1).cpu().numpy()


def part_edit(part: Part) -> None:
    paths = part.args.paths
    s, device = part.size, _torch_device(part)
    cells = [(r, b) for b in s["edit_batches"] for r in s["resolutions"] if str(r) in paths]
    for res, batch in cells:
        runtime = "eager"
        try:
            for runtime, row in _edit_cell(part, paths[str(res)], res, batch, device):
                part.row(resolution=res, batch=batch, runtime=runtime, **row)
        except Exception as e:  # noqa: BLE001 - this cell's runtime fails; the next cell runs
            traceback.print_exc()
            part.row(resolution=res, batch=batch, runtime=runtime, status="failed", reason=_error(e))
    if not cells:
        part.finish("failed", f"no models for resolutions {s['resolutions']} (the models part: {list(paths)})")


def _edit_cell(part: Part, paths: dict, res: int, batch: int, device: str):
    """(runtime, row) of one (resolution, batch): eager, ORT, ORT CUDA graphs, torch.compile, each checked."""
    import numpy as np
    import torch

    from veil.export.runtime import OrtEditor
    from veil.lightning_modules.editing.editor import PrivateEditor

    export_bench, s = _sibling("export"), part.size
    tol, repeats = s["edit_tol"], s["edit_repeats"]

    def timed(fn, warmup=1):
        ms = export_bench._times(fn, repeats, warmup)
        return {"p50_ms": export_bench._pct(ms, 50), "p90_ms": export_bench._pct(ms, 90)}

    base = PrivateEditor.from_checkpoint(paths["checkpoint"], num_steps=10)
    ort_ed, ort_error = None, None
    try:
        ort_ed = OrtEditor(paths["export"], num_steps=10, providers="cuda" if device == "cuda" else "cpu",
                           threads=None if device == "cuda" else 1, cache_dir=None)
    except Exception as e:  # noqa: BLE001 - no CUDA provider: a finding
        ort_error = _error(e)
    w = ort_ed.guidance_scale if ort_ed else base.guidance_scale
    w_inv = ort_ed.inversion_guidance if ort_ed else base.inversion_guidance
    eager = PrivateEditor(base.model.to(device), base.scheduler_config, base.attribute_names, num_steps=10,
                          guidance_scale=w, inversion_guidance=w_inv, label_free=base.label_free)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, 3, res, res)).astype(np.float32)
    a = np.where(rng.random((batch, len(eager.attribute_names))) < 0.5, 1.0, -1.0).astype(np.float32)
    kw = dict(strength=1.0, protected=[eager.attribute_names[0]], encoding="invert")
    want = eager.edit(x, a, -a, **kw).numpy()
    yield "eager", {"device": device, **timed(lambda: eager.edit(x, a, -a, **kw))}

    if ort_ed is None:
        yield "ort io-binding", {"status": "unsupported", "reason": ort_error}
    else:
        got = ort_ed.edit(x, a, -a, **kw)
        err = float(np.abs(got - want).max())
        ok = part.check(f"ORT ({ort_ed.provider}) vs eager, {res} px, batch {batch}: max abs error", passed=err < tol,
                        value=err, tolerance=tol)
        yield "ort io-binding", ({"provider": ort_ed.provider, **timed(lambda: ort_ed.edit(x, a, -a, **kw))}
                                 if ok else {"status": "failed", "reason": f"check failed: {err:.3g}"})
    yield "ort cuda-graph", _cuda_graph_row(part, paths, ort_ed, x, a, kw, res, batch, device, timed)

    if part.left() < (60 if device == "cuda" else 20):
        yield "torch.compile", {"status": "skipped", "reason": "part budget"}
        return
    try:
        compiled = PrivateEditor(torch.compile(eager.model, backend=s["compile_backend"], dynamic=False),
                                 base.scheduler_config, base.attribute_names, num_steps=10, guidance_scale=w,
                                 inversion_guidance=w_inv, label_free=base.label_free)
        t0 = time.perf_counter()
        got = compiled.edit(x, a, -a, **kw).numpy()  # compiles
        first = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - recorded
        yield "torch.compile", {"status": "failed", "reason": _error(e)}
        return
    err = float(np.abs(got - want).max())
    ok = part.check(f"torch.compile ({s['compile_backend']}) vs eager, {res} px, batch {batch}: max abs error",
                    passed=err < tol, value=err, tolerance=tol)
    yield "torch.compile", ({"backend": s["compile_backend"], "first_call_s": first,
                             **timed(lambda: compiled.edit(x, a, -a, **kw))} if ok else
                            {"status": "failed", "reason": f"check failed: {err:.3g}"})


def _cuda_graph_row(part, paths, ort_ed, x, a, kw, res, batch, device, timed) -> dict:
    import numpy as np

    if device != "cuda":
        return {"status": "skipped", "reason": "needs CUDA"}
    if ort_ed is None:
        return {"status": "unsupported", "reason": "no ONNX Runtime CUDA provider"}
    try:
        walk = CudaGraphWalk(Path(paths["export"]), batch=batch, resolution=res, attributes=a.shape[1])
        grid = ort_ed.timesteps(kw["strength"])
        inv = np.asarray(ort_ed.inversion_attributes(a, protected=kw["protected"]), dtype=np.float32)
        run = lambda: walk.edit(x, inv, -a, grid=grid, inversion_guidance=ort_ed.inversion_guidance,
                                guidance=ort_ed.guidance_scale)
        got = run()
    except Unsupported as e:
        return {"status": "unsupported", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - e.g. capture refused at the first run
        return {"status": "unsupported", "reason": _error(e)}
    want = ort_ed.edit(x, a, -a, **kw)
    err = float(np.abs(got - want).max())
    if not part.check(f"ORT CUDA graphs vs ORT I/O binding, {res} px, batch {batch}: max abs error",
                      passed=err < 1e-3, value=err, tolerance=1e-3):
        return {"status": "failed", "reason": f"check failed: {err:.3g}"}
    return {"provider": "CUDAExecutionProvider", **timed(run)}


# =========================================================================================== serve
def part_serve(part: Part) -> None:
    import asyncio

    import httpx
    import onnxruntime as ort

    serve_bench, s = _sibling("serve"), part.size
    res, device = s["serve_resolution"], _torch_device(part)
    if str(res) not in part.args.paths:
        res = int(next(iter(part.args.paths), 0)) or res
    if str(res) not in part.args.paths:
        return part.finish("failed", "no export (the models part failed)")
    want = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if want not in ort.get_available_providers():
        return part.finish("unsupported", f"onnxruntime {ort.__version__} has no {want} "
                                          f"({ort.get_available_providers()})")
    ns = argparse.Namespace(threads=s["serve_threads"], max_queue=32, max_wait_ms=5.0, steps=5, candidates=1,
                            seconds=s["serve_seconds"], warmup=s["serve_warmup"])
    export = Path(part.args.paths[str(res)]["export"])
    logs = Path(tempfile.mkdtemp(prefix="gpu_check_serve_"))
    servers, sessions = {}, {}
    try:
        for mode in serve_bench.MODES:
            servers[mode] = serve_bench.Server(export, batched=mode == "batched", args=ns,
                                               log_path=logs / f"{mode}.log")
        for mode, server in servers.items():
            server.wait_ready()
            provider = httpx.get(server.url + "/healthz", timeout=10).json().get("provider")
            sessions[mode], info = serve_bench.make_sessions(server.url, max(s["serve_clients"]), res)

            async def one(url=server.url, session=sessions[mode][0]):
                async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                    return await serve_bench._preview(c, session, {"n": 1})
            outcome = asyncio.run(one())
            part.check(f"veil serve ({mode}) on {want}: one preview at {res} px", passed=provider == want and
                       outcome[0] == "ok", detail={"provider": provider, "outcome": outcome})
        for clients in s["serve_clients"]:
            for mode, server in servers.items():
                if part.left() < ns.seconds + ns.warmup + 2:
                    part.row(clients=clients, mode=mode, status="skipped", reason="part budget")
                    continue
                r = serve_bench.measure(server, sessions[mode][:clients], mode=mode, resolution=res, args=ns)
                r.pop("latency_ms")
                bad = r["errors"] or not r["admitted"]
                part.row(**r, steps=info["steps"], status="failed" if bad else "ok",
                         reason=(r["error_samples"] or ["nothing admitted"])[0] if bad else None)
    finally:
        for server in servers.values():
            server.close()
        for log in sorted(logs.glob("*.log")):
            print(f"--- server log {log.name} (tail)\n{log.read_text(errors='replace')[-3000:]}")


# =========================================================================================== the parent
# What every part process starts with (bench/forked.py): the heavy imports of the parts, made once by a
# forkserver that then forks one child per part. Each part is still its own process, with its own budget and
# process group; ``--fresh-processes`` starts a new interpreter for each instead.
PRELOAD = ("numpy", "torch", "onnxruntime", "triton", "lightning", "opacus", "diffusers", "httpx",
           "veil.lightning_modules.editing.editor", "veil.export.runtime")


def _children(args):
    """How the parts start (bench/forked.py): forked, or (``--fresh-processes``) as new interpreters; the
    environment every part gets."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import forked  # by name (not _sibling): the forkserver unpickles its child function from it

    env = {"TRITON_INTERPRET": "1" if args.smoke else "0", "PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, also on a machine with a GPU
    return forked.Children(preload=PRELOAD, env=env, fresh=args.fresh_processes)


def _run_part(args, name: str, budget: float, state: Path, log, unit: int = 0) -> dict:
    """One part in its own process with ``budget`` seconds; its JSON record, completed by the parent if the child
    crashed or overran."""
    record = state / f"{name}_{unit}.json"
    argv = ["--part", name, "--unit", str(unit), "--state", str(state),
            "--deadline", str(time.time() + budget - 3), "--work", args.work]
    argv += ["--smoke"] if args.smoke else []
    argv += ["--checkpoint", args.checkpoint, "--export", args.export] if args.checkpoint and args.export else []
    log.write(f"\n===== {name} {unit} (budget {budget:.0f} s)\n")
    log.flush()
    t0 = time.perf_counter()
    rc = args.children.wait(args.children.start(__file__, argv, stdout=log.name, cwd=str(ROOT)), budget)
    if rc is None:
        why = f"over its budget of {budget:.0f} s (killed; rows so far kept)"
    else:
        why = None if rc == 0 else f"the part's process exited {rc} (see gpu_check.log)"
    data = json.loads(record.read_text()) if record.is_file() else {"status": "running", "rows": [], "checks": []}
    if why and data.get("status") in ("running", "ok", None):
        data.update(status="failed", reason=why)
    data["seconds"] = time.perf_counter() - t0
    return data


def _merge(units: list[dict]) -> dict:
    out = {"status": "ok", "reason": None, "rows": [], "checks": [], "info": {}, "seconds": 0.0}
    for u in units:
        out["rows"] += u.get("rows", [])
        out["checks"] += u.get("checks", [])
        out["seconds"] += u.get("seconds", 0.0)
        out["info"].update(u.get("info", {}))
        if u.get("status") != "ok" and out["status"] == "ok":
            out["status"], out["reason"] = u.get("status"), u.get("reason")
    return out


def _budgets(args) -> dict[str, float]:
    budgets = dict(SMOKE_BUDGET if args.smoke else GPU_BUDGET)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets:
            raise SystemExit(f"--budget {item}: the parts are {', '.join(PARTS)}")
        budgets[name] = float(seconds)
    return budgets


def run_all(args) -> dict:
    """Every selected part in order (env always; models when edit or serve runs, beside tests), then the
    JSON, the markdown and the log in ``--out``."""
    budgets, selected = _budgets(args), set(args.parts)
    if selected & {"edit", "serve"}:
        selected.add("models")
    out, started = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    report = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "smoke": args.smoke, "budgets": budgets, "parts": {}}
    parts = report["parts"]
    args.children = _children(args)
    (out / "gpu_check.log").write_text("")  # then appended to, by this process and by each part's
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, open(out / "gpu_check.log", "a") as log:
        state = Path(tmp)
        parts["env"] = _run_part(args, "env", budgets["env"], state, log)
        (state / "models.log").write_text("")
        with open(state / "models.log", "a") as models_log:  # the models are made while the tests run
            thread = threading.Thread(target=lambda: parts.update(
                models=_run_part(args, "models", budgets["models"], state, models_log)))
            if "models" in selected:
                thread.start()
            if "tests" in selected:
                parts["tests"] = _run_part(args, "tests", budgets["tests"], state, log)
            if "models" in selected:
                thread.join()
        log.write((state / "models.log").read_text())
        paths = parts.get("models", {}).get("info", {}).get("paths", {})
        (state / "paths.json").write_text(json.dumps(paths))
        if "dp" in selected:  # one subprocess per model configuration; unused time passes on
            units, left, records = len(SIZES["smoke" if args.smoke else "gpu"]["dp_configs"]), budgets["dp"], []
            for unit in range(units):
                t0 = time.perf_counter()
                records.append(_run_part(args, "dp", left / (units - unit), state, log, unit))
                left -= time.perf_counter() - t0
            parts["dp"] = _merge(records)
        for name in ("kernels", "edit", "serve"):
            if name in selected:
                parts[name] = _run_part(args, name, budgets[name], state, log)
    report["parts"] = {name: parts[name] for name in PARTS if name in parts}
    report["seconds"] = time.perf_counter() - started
    report["env"] = parts["env"].get("info", {})
    text = markdown(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(text)
    print(text)
    return report


def run_part(args) -> None:
    """Child: one part, its record kept in ``--state``."""
    state = Path(args.state)
    paths_file = state / "paths.json"
    args.paths = json.loads(paths_file.read_text()) if paths_file.is_file() else {}
    part = Part(args.part, state / f"{args.part}_{args.unit}.json", args=args, deadline=args.deadline)
    part.save()
    try:
        globals()[f"part_{args.part}"](part)
    except BaseException as e:  # noqa: BLE001 - SystemExit from a reused bench function too
        traceback.print_exc()
        part.finish("failed", _error(e))
        return
    if part.data["status"] == "running":
        part.finish()


# =========================================================================================== the tables
def _f(x, fmt: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _note(r: dict) -> str:
    return "" if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason') or ''}"


def _over(rows: list[dict], r: dict, key: str, **same) -> str:
    """r[key] over the ok row that matches ``same`` (e.g. the non-private step of the same cell)."""
    base = next((b for b in rows if b.get("status") == "ok" and all(b.get(k) == v for k, v in same.items())), None)
    return f"{r[key] / base[key]:.2f}x" if base and r.get(key) and base.get(key) else "-"


def _under(rows: list[dict], r: dict, key: str, **same) -> str:
    """The matching ok row's r[key] over this one (how many times faster this row is)."""
    base = next((b for b in rows if b.get("status") == "ok" and all(b.get(k) == v for k, v in same.items())), None)
    return f"{base[key] / r[key]:.2f}x" if base and r.get(key) and base.get(key) else "-"


def _dp_tables(rows: list[dict]) -> list[str]:
    steps = [r for r in rows if r.get("kind") != "largest"]
    body = []
    for r in steps:
        cell = dict(config=r["config"], batch=r["batch"], k=r["k"])
        body.append([r["config"], r["batch"], r["k"], r["mode"], _f(r.get("seconds") and r["seconds"] * 1e3, ".1f"),
                     _over(steps, r, "seconds", mode="nonprivate", **cell),
                     _under(steps, r, "seconds", mode="opacus", **cell),
                     _under(steps, r, "seconds", mode="opacus-ghost", **cell), _f(r.get("peak_mib"), ".0f"),
                     _over(steps, r, "peak_mib", mode="nonprivate", **cell), _note(r)])
    largest = [[r["config"], r["mode"], r["k"], r.get("largest") or "-", r.get("stop") or _note(r)]
               for r in rows if r.get("kind") == "largest"]
    return _table(["config", "B", "K", "mode", "step ms", "x nonprivate", "faster than hooks",
                   "faster than opacus-ghost", "peak MiB", "x nonprivate", "note"], body) + [""] + \
        _table(["config", "mode", "K", "largest batch that fits", "search stopped"], largest)


def _kernel_table(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        size = r.get("shape") or (f"{r.get('params', 0):,}" + (f" x {r['batch']}" if r.get("batch") else ""))
        vs_ref = f"{r['speedup_vs_reference']:.2g}x the reference's speed" if r.get("speedup_vs_reference") else ""
        body.append([r["kernel"], size, _f(r.get("seconds") and r["seconds"] * 1e3), _f(r.get("gbps")),
                     _f(r.get("copy_gbps")), _f(r.get("copy_fraction") and 100 * r["copy_fraction"], ".0f"),
                     " ".join(filter(None, [_note(r), vs_ref]))])
    return _table(["kernel", "size", "ms", "GB/s", "copy GB/s", "% of copy", "note"], body)


def _edit_table(rows: list[dict]) -> list[str]:
    def faster_than(runtime: str, r: dict) -> str:
        return _under(rows, r, "p50_ms", runtime=runtime, resolution=r["resolution"], batch=r["batch"])

    body = [[r["resolution"], r["batch"], r["runtime"], _f(r.get("p50_ms"), ".1f"), _f(r.get("p90_ms"), ".1f"),
             faster_than("eager", r), faster_than("torch.compile", r), _note(r)] for r in rows]
    return _table(["px", "batch", "runtime", "p50 ms", "p90 ms", "faster than eager", "faster than compile", "note"],
                  body)


def _serve_table(rows: list[dict]) -> list[str]:
    body = [[r.get("clients"), r.get("mode"), _f(r.get("rps"), ".1f"), _f(r.get("p50_ms"), ".0f"),
             _f(r.get("p99_ms"), ".0f"), r.get("shed", "-"), r.get("errors", "-"),
             _over(rows, r, "rps", mode="unbatched", clients=r.get("clients")) if r.get("mode") == "batched" else "-",
             _note(r)] for r in rows]
    return _table(["clients", "mode", "req/s", "p50 ms", "p99 ms", "shed", "errors", "batched / unbatched", "note"],
                  body)


DETAIL = {"dp": _dp_tables, "kernels": _kernel_table, "edit": _edit_table, "serve": _serve_table}


def _result(name: str, part: dict) -> str:
    """The summary table's one-line result of a part."""
    rows, info = part.get("rows", []), part.get("info", {})
    if name == "env":
        return (f"torch {info.get('torch')}, {info.get('cuda') or 'no CUDA'}, ORT {info.get('onnxruntime')} "
                f"{info.get('ort_providers')}")
    if name == "tests" and rows and "collected" in rows[0]:
        r = rows[0]
        return f"{r['collected']} gpu tests: {r['passed']} passed, {r['skipped']} skipped" + \
            (f" ({r['note']})" if r.get("note") else "")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    return ", ".join(f"{v} {k}" for k, v in counts.items()) + " rows" if counts else "-"


def _check_line(c: dict) -> str:
    value = "" if c["value"] is None else f" = {c['value']:.3g} (tolerance {c['tolerance']:.0e})"
    return f"- check {'passed' if c['passed'] else 'FAILED'}: {c['name']}{value}"


def markdown(report: dict) -> str:
    env = report.get("env", {})
    lines = [f"# gpu_check{' --smoke' if report['smoke'] else ''}, {report['started']}", "",
             (f"{env.get('cuda') or 'CPU'}; torch {env.get('torch')}, Triton {env.get('triton')}, ONNX Runtime "
              f"{env.get('onnxruntime')}, Opacus {env.get('opacus')}; {report['seconds']:.0f} s in all"), ""]
    for name, tables in DETAIL.items():
        if name in report["parts"]:
            part = report["parts"][name]
            lines += [f"## {name}", ""] + [_check_line(c) for c in part.get("checks", [])] + [""] + \
                tables(part.get("rows", [])) + [""]
    summary = []
    for name, part in report["parts"].items():
        checks = part.get("checks", [])
        passed = f"{sum(c['passed'] for c in checks)}/{len(checks)} passed" if checks else "-"
        summary.append([name, part.get("status"), f"{part.get('seconds', 0):.0f}", _result(name, part), passed,
                        part.get("reason") or ""])
    return "\n".join(lines + ["## summary", ""] + _table(["part", "status", "seconds", "result", "checks", "reason"],
                                                         summary)) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/gpu", help="folder for gpu_check.json, gpu_check.md, gpu_check.log")
    p.add_argument("--smoke", action="store_true", help="the same code paths at tiny sizes on the CPU")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                   help=f"a part's time budget (defaults: GPU {GPU_BUDGET}; --smoke {SMOKE_BUDGET})")
    p.add_argument("--work", default="bench/out/gpu_work", help="where the models and exports are made (reused)")
    p.add_argument("--checkpoint", help="a `veil train` release to edit with (with --export: no models are made)")
    p.add_argument("--export", help="its `veil export` folder")
    p.add_argument("--prepare", action="store_true", help="only make the models into --work, then stop")
    p.add_argument("--parts", default="tests,dp,kernels,edit,serve",
                   help="which parts to run, comma-separated (env always; models with edit or serve)")
    p.add_argument("--fresh-processes", action="store_true",
                   help="start each part as a new Python process (by default each is a fork of one process that "
                        "imported torch & co once)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part
    p.add_argument("--unit", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if bool(args.checkpoint) != bool(args.export):
        p.error("--checkpoint and --export go together")
    args.work = str(Path(args.work).resolve())  # the parts run in the repository root
    args.checkpoint, args.export = (str(Path(x).resolve()) if x else None for x in (args.checkpoint, args.export))
    args.parts = [x for x in args.parts.split(",") if x]
    if not set(args.parts) <= set(PARTS) - {"env", "models"}:
        p.error(f"--parts {','.join(args.parts)}: choose from tests, dp, kernels, edit, serve")
    if args.part:
        return run_part(args)
    if args.prepare:
        args.part, args.state, args.deadline = "models", tempfile.mkdtemp(prefix="gpu_check_"), time.time() + 3600
        run_part(args)
        print(json.dumps(json.loads((Path(args.state) / "models_0.json").read_text()), indent=1))
        return
    run_all(args)


if __name__ == "__main__":
    main()
