"""Benchmark: one optimizer step of the default UNet, non-private vs DP-SGD (Opacus / fused).

    python bench/dp_step.py                       # batch 32 and 64, synthetic32 model, this device
    python bench/dp_step.py --batch 64 --config lightning_modules/configs/synthetic32_long.yaml

Each configuration runs in a fresh subprocess so peak memory is its own: on CUDA the peak of
``torch.cuda.max_memory_allocated`` during a step above the memory held before it; on the CPU
the growth of the process's peak RSS (ru_maxrss) during the first step. Times are the median
of ``--repeats`` steps after ``--warmup``. Ratios are against the non-private step of the same
run (shared machines are noisy: compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("nonprivate", "opacus", "fused")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(mode: str, batch: int, config: str, warmup: int, repeats: int, device: str) -> dict:
    import torch

    from veil.lightning_modules.diffusion_module import DPDiffusionModule
    from veil.lightning_modules.training.config import load_config

    cfg = load_config(config)
    torch.manual_seed(0)
    dp = dict(cfg.dp.to_dict(), enabled=mode != "nonprivate", target_epsilon=None, noise_multiplier=1.0,
              kernel=mode if mode != "nonprivate" else "auto", noise_multiplicity=1,
              max_physical_batch_size=batch)
    model_kwargs = dict(num_attributes=6, resolution=cfg.data.resolution,
                        **cfg.model.kwargs())
    module = DPDiffusionModule(model_kwargs=model_kwargs, attribute_names=[f"a{i}" for i in range(6)],
                               train_size=batch * 20, sample_rate=0.05, planned_steps=100, dp=dp).to(device)
    opt = module.configure_optimizers()
    x = torch.rand(batch, 3, cfg.data.resolution, cfg.data.resolution, device=device) * 2 - 1
    a = torch.randint(0, 2, (batch, 6), device=device).float() * 2 - 1
    cuda = device.startswith("cuda")

    def step():
        module.per_row_loss(x, a).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    rss0 = _rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    step()
    peak = (torch.cuda.max_memory_allocated() - held) / 2**20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in module.model.parameters())
    return {"mode": mode, "batch": batch, "params": params, "seconds": statistics.median(times), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="lightning_modules/configs/synthetic32.yaml")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        mode, batch = args.one.split(":")
        print(json.dumps(run_one(mode, int(batch), args.config, args.warmup, args.repeats, device)))
        return
    rows = []
    for batch in args.batch:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--one", f"{mode}:{batch}", "--config", args.config,
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--device", device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"benchmark {mode} batch {batch} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"device: {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, params {rows[0]['params'] / 1e6:.2f}M")
    print(f"{'batch':>5} {'mode':>11} {'step s':>8} {'x nonpriv':>9} {'peak MiB':>9} {'x nonpriv':>9}")
    for r in rows:
        base = next(b for b in rows if b["batch"] == r["batch"] and b["mode"] == rows[0]["mode"])
        print(f"{r['batch']:>5} {r['mode']:>11} {r['seconds']:>8.3f} {r['seconds'] / base['seconds']:>9.2f} "
              f"{r['peak_mib']:>9.1f} {r['peak_mib'] / max(base['peak_mib'], 1e-9):>9.2f}")


if __name__ == "__main__":
    main()
