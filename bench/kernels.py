"""Benchmark: the DP-SGD clip-and-noise stage, fused (veil.kernels) vs Opacus's DPOptimizer, same run.

    python bench/kernels.py --quick          # small grid (CPU: reference path vs Opacus)
    python bench/kernels.py                  # 1M..100M parameters x batch 16..256 (CUDA: Triton vs Opacus)
    python bench/kernels.py --whole-step     # one full DP step of a small diffusers UNet, fused vs opacus

Stage = ``DPOptimizer.pre_step()``: per-sample norms over all parameters, clip, sum over the batch,
Gaussian noise (sigma = 1), divide by the batch, from per-sample gradients already in memory
(``p.grad_sample``, UNet-like shapes) to ``p.grad``; the parameter update itself is not included.
Before each run ``p.grad`` is None for both, so both allocate their output.

Columns: time = median of ``--reps`` runs (after one warm-up, which also compiles the kernels);
peak = the most memory allocated during one run above what was allocated before it: on CUDA
``torch.cuda.max_memory_allocated()``; on the CPU the peak of the CPU allocator's running total
recorded by ``torch.profiler`` with ``profile_memory=True`` (every tensor storage goes through that
allocator; tracemalloc does not see it, RSS mixes in the malloc arena). GB/s = the least traffic
the stage needs, 2 * B * P * bytes (read the per-sample gradients for the norms, then again to
clip and sum) + P * bytes (write), over the time; on CUDA also as a fraction of a device-to-device
copy's bandwidth measured in the same run. Ratios are Opacus / fused (> 1: fused is better).
Configurations whose per-sample gradients would not fit in 70% of free memory are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from veil.kernels.optimizer import FusedDPOptimizer

GRID = dict(params=[1_000_000, 10_000_000, 100_000_000], batch=[16, 64, 256])
QUICK_GRID = dict(params=[1_000_000, 4_000_000], batch=[16, 64])


def unet_like_shapes(target: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a 4-level conv UNet (convs, norms, time-embedding and attention linears),
    its base width grown until the total reaches ``target`` parameters."""
    def shapes(w: int) -> list[tuple[int, ...]]:
        out = [(w, 3, 3, 3), (w,)]
        for c in (w, 2 * w, 4 * w, 4 * w, 4 * w, 4 * w, 2 * w, w):  # down path, middle, up path
            for _ in range(2):  # two residual blocks per level
                out += [(c,), (c,), (c, c, 3, 3), (c,), (c, 4 * w), (c,), (c,), (c,), (c, c, 3, 3), (c,)]
            out += [(c,), (c,)] + [(c, c), (c,)] * 4  # attention: norm, q, k, v, out
        return out + [(3, w, 3, 3), (3,)]

    w = 8
    while sum(_numel(s) for s in shapes(w)) < target:
        w += 8
    return shapes(w)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Stage:
    """One optimizer's pre_step over fixed per-sample gradients, re-armed before every run."""

    def __init__(self, kind: str, grads: list[torch.Tensor], *, dtype: torch.dtype):
        device = grads[0].device
        self.params = [nn.Parameter(torch.zeros(g.shape[1:], device=device, dtype=dtype)) for g in grads]
        self.grads = grads
        args = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=len(grads[0]))
        base = torch.optim.SGD(self.params, lr=0.0)
        self.opt = DPOptimizer(base, **args) if kind == "opacus" else FusedDPOptimizer(base, seed=0, **args)

    def arm(self):
        """What backward leaves: per-sample gradients (fresh tensor objects: Opacus marks them used)."""
        self.opt.zero_grad(set_to_none=True)
        for p, g in zip(self.params, self.grads):
            p.grad_sample = g.detach()

    def run(self):
        self.opt.pre_step()
        _sync(self.grads[0].device)


def time_stages(stages: dict[str, Stage], reps: int) -> dict[str, float]:
    """Median seconds of ``reps`` runs of each stage after one warm-up, the stages interleaved run by
    run so that load from other processes on a shared machine hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in stages}
    for i in range(reps + 1):
        for name, stage in stages.items():
            stage.arm()
            _sync(stage.grads[0].device)
            t0 = time.perf_counter()
            stage.run()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_bytes(stage: Stage) -> int:
    """Peak allocation during one run above what was allocated before it (see module docstring)."""
    stage.arm()
    device = stage.grads[0].device
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        stage.run()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stage.run()
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        prof.export_chrome_trace(fh.name)
        events = json.load(open(fh.name))["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not mem:
        return 0
    # "Total Allocated" is a running total that carries over between profiling sessions: measure
    # from its value just before the first allocation of this run
    before = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in mem) - before)


def copy_bandwidth(device) -> float | None:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the ceiling for a streaming kernel."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**28, device=device)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times[1:])


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def bench_config(n_params: int, batch: int, *, dtype, device, reps: int, copy_bw) -> dict | None:
    """One grid point: both stages on the same per-sample gradients."""
    shapes = unet_like_shapes(n_params)
    n_params = sum(_numel(s) for s in shapes)
    elem = torch.finfo(dtype).bits // 8
    need = batch * n_params * elem + 6 * n_params * 4
    if need > 0.7 * _free_bytes(device):
        return {"params": n_params, "batch": batch, "skipped": f"needs {need / 2**30:.1f} GiB"}
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn((batch, *s), device=device, dtype=dtype, generator=gen) for s in shapes]
    row = {"params": n_params, "batch": batch, "tensors": len(shapes)}
    traffic = 2 * batch * n_params * elem + n_params * elem
    stages = {kind: Stage(kind, grads, dtype=dtype) for kind in ("opacus", "fused")}
    for kind, seconds in time_stages(stages, reps).items():
        row[f"{kind}_s"] = seconds
        row[f"{kind}_bw"] = traffic / seconds
    for kind, stage in stages.items():
        row[f"{kind}_peak"] = peak_bytes(stage)
        stage.opt.zero_grad(set_to_none=True)
    del stages
    if copy_bw:
        row["fused_copy_frac"] = row["fused_bw"] / copy_bw
    del grads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_stage_table(rows: list[dict], *, device, copy_bw) -> None:
    path = "Triton kernels" if device.type == "cuda" else f"reference path, {torch.get_num_threads()} threads"
    print(f"\nDP clip-and-noise stage on {device} ({path} vs Opacus 1.6 DPOptimizer); ratio = opacus / fused")
    if copy_bw:
        print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    head = (f"{'params':>11} {'batch':>5} | {'opacus ms':>9} {'fused ms':>9} {'speedup':>7} | "
            f"{'opacus MiB':>10} {'fused MiB':>9} {'mem ratio':>9} | {'opacus GB/s':>11} {'fused GB/s':>10}")
    print(head + (f" {'% copy':>6}" if copy_bw else ""))
    print("-" * len(head))
    for r in rows:
        if "skipped" in r:
            print(f"{r['params']:>11,} {r['batch']:>5} | skipped ({r['skipped']})")
            continue
        mib = lambda b: b / 2**20  # noqa: E731
        line = (f"{r['params']:>11,} {r['batch']:>5} | {r['opacus_s'] * 1e3:>9.2f} {r['fused_s'] * 1e3:>9.2f} "
                f"{r['opacus_s'] / r['fused_s']:>6.2f}x | {mib(r['opacus_peak']):>10.1f} {mib(r['fused_peak']):>9.1f} "
                f"{r['opacus_peak'] / max(r['fused_peak'], 1):>8.2f}x | {r['opacus_bw'] / 1e9:>11.1f} "
                f"{r['fused_bw'] / 1e9:>10.1f}")
        print(line + (f" {100 * r['fused_copy_frac']:>5.0f}%" if copy_bw else ""))


def tiny_unet(device, *, width: int):
    """A small attribute-free diffusers UNet with one attention down block (and its up twin)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=16 if width <= 32 else 32, in_channels=3, out_channels=3,
                       block_out_channels=(width, width), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).to(device)


def whole_step(kernel: str, *, device, batch: int, width: int, reps: int) -> tuple[float, float]:
    """Median seconds of one DP training step (forward, per-sample backward, DP optimizer step);
    also the median of the optimizer step alone. Hooks mode: timing does not depend on the values."""
    from opacus import GradSampleModule

    from veil.lightning_modules.dp.optimizer import make_dp_optimizer

    unet = tiny_unet(device, width=width)
    model = GradSampleModule(unet)
    opt = make_dp_optimizer(kernel=kernel, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
                            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch, seed=0)
    size = unet.config.sample_size
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    steps, opt_steps = [], []
    for i in range(reps + 1):
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ((model(x, t).sample - x) ** 2).mean(dim=(1, 2, 3)).sum().backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        if i:
            steps.append(time.perf_counter() - t0)
            opt_steps.append(time.perf_counter() - t1)
    return statistics.median(steps), statistics.median(opt_steps)


def run_whole_step(device, *, reps: int) -> None:
    width, batch = (32, 16) if device.type == "cpu" else (128, 64)
    n = sum(p.numel() for p in tiny_unet(device, width=width).parameters())
    print(f"\nWhole DP step, diffusers UNet2DModel ({n:,} params, width {width}), batch {batch}, on {device}")
    print(f"{'kernel':>8} | {'step ms':>8} {'optimizer ms':>12}")
    results = {k: whole_step(k, device=device, batch=batch, width=width, reps=reps) for k in ("opacus", "fused")}
    for kernel, (step, opt) in results.items():
        print(f"{kernel:>8} | {step * 1e3:>8.1f} {opt * 1e3:>12.2f}")
    print(f"speedup of the whole step: {results['opacus'][0] / results['fused'][0]:.2f}x, "
          f"of the optimizer step: {results['opacus'][1] / results['fused'][1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid (CPU-sized)")
    parser.add_argument("--whole-step", action="store_true", help="time one full DP step of a small UNet")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per point (default 5 CPU, 10 CUDA)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (10 if device.type == "cuda" else 5)
    if args.whole_step:
        return run_whole_step(device, reps=reps)
    grid = QUICK_GRID if args.quick else GRID
    copy_bw = copy_bandwidth(device)
    rows = [bench_config(p, b, dtype=getattr(torch, args.dtype), device=device, reps=reps, copy_bw=copy_bw)
            for p in grid["params"] for b in grid["batch"]]
    print_stage_table(rows, device=device, copy_bw=copy_bw)


if __name__ == "__main__":
    main()
