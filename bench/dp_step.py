"""Benchmark: one optimizer step of the UNet, non-private vs DP-SGD engines, by batch and noise multiplicity.

    python bench/dp_step.py                                  # default UNet, batch 32 64 128, K 1 4, all modes
    python bench/dp_step.py --model large --batch 32 64      # a 10.2M-parameter UNet
    python bench/dp_step.py --config lightning_modules/configs/synthetic32_long.yaml --batch 256 --k 1

Modes (rows of one chunk: B examples x K noise draws, the DP step of ``dp.step``):
  nonprivate  the same B*K rows, mean loss, one backward, the base optimizer (the baseline)
  opacus      dp.engine opacus + dp.kernel opacus: Opacus's per-sample hooks (B*K rows of per-sample
              gradients, folded to B), Opacus's clip / noise
  fused       dp.engine opacus + dp.kernel fused: the same hooks, veil's fused clip-and-noise stage
  ghost       dp.engine ghost: per-example norms and the clipped sum from the one backward
              (``dp.ghost``), no per-example gradients; veil's noise stage

Each configuration runs in a fresh subprocess so peak memory is its own: on CUDA the peak of
``torch.cuda.max_memory_allocated`` during a step above the memory held before it; on the CPU the
growth of the process's peak RSS (ru_maxrss) during the first step. Times are the median of
``--repeats`` steps after ``--warmup``. Ratios are against the non-private step and Opacus's hooks
of the same batch and K in the same run (shared machines are noisy: compare ratios, not absolute
times). A hooks configuration whose per-sample gradients alone (B*K rows x parameters x 4 bytes)
would exceed ``--max-grad-sample-gib`` is not run and says so: on this 24 GiB machine it would swap.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("nonprivate", "opacus", "fused", "ghost")
MODELS = {  # --model: overrides of the config's model section
    "default": [],
    "large": ["model.block_out_channels=[96,192,192]", "model.norm_num_groups=32"],  # 10.2M parameters
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build(mode: str, batch: int, k: int, config: str, overrides: list[str], device: str):
    import torch

    from veil.lightning_modules.diffusion_module import DPDiffusionModule
    from veil.jobs.config import load_config

    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    dp = dict(cfg.dp.to_dict(), enabled=mode != "nonprivate", target_epsilon=None, noise_multiplier=1.0,
              engine="ghost" if mode == "ghost" else "opacus", kernel="opacus" if mode == "opacus" else "auto",
              noise_multiplicity=k, max_physical_batch_size=batch)
    model_kwargs = dict(num_attributes=6, resolution=cfg.data.resolution, **cfg.model.kwargs())
    module = DPDiffusionModule(model_kwargs=model_kwargs, attribute_names=[f"a{i}" for i in range(6)],
                               train_size=batch * 20, sample_rate=0.05, planned_steps=100, dp=dp).to(device)
    return module, cfg


def run_one(mode: str, batch: int, k: int, config: str, overrides: list[str], warmup: int, repeats: int,
            device: str) -> dict:
    import torch

    from veil.lightning_modules.dp.grad_sample import fold_noise_draws

    module, cfg = build(mode, batch, k, config, overrides, device)
    opt = module.configure_optimizers()
    params = module.trainable_parameters()
    res = cfg.data.resolution
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    a = torch.randint(0, 2, (batch, 6), device=device).float() * 2 - 1
    cuda = device.startswith("cuda")
    ghost = getattr(module, "_ghost_clipper", None)

    def step():
        if mode == "nonprivate":  # the same B*K rows as the DP modes
            module.per_row_loss(x.repeat_interleave(k, 0), a.repeat_interleave(k, 0)).mean().backward()
        else:
            loss, rows_k = module.chunk_loss(x, a)
            if ghost is not None:
                ghost.backward_mean(loss, examples=batch, noise_multiplicity=rows_k)
            else:
                loss.backward()
                fold_noise_draws(params, batch, rows_k)
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
    n_params = sum(p.numel() for p in module.model.parameters())
    return {"mode": mode, "batch": batch, "k": k, "params": n_params, "seconds": statistics.median(times),
            "peak_mib": peak}


def _param_count(config: str, overrides: list[str]) -> int:
    module, _ = build("nonprivate", 1, 1, config, overrides, "cpu")
    return sum(p.numel() for p in module.model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="lightning_modules/configs/synthetic32.yaml")
    parser.add_argument("--model", default="default", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4], help="noise multiplicities")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-grad-sample-gib", type=float, default=8.0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = MODELS[args.model]
    if args.one:
        mode, batch, k = args.one.split(":")
        print(json.dumps(run_one(mode, int(batch), int(k), args.config, overrides, args.warmup, args.repeats,
                                 device)))
        return
    n_params = _param_count(args.config, overrides)
    rows = []
    for batch in args.batch:
        for k in args.k:
            for mode in args.modes:
                need = batch * k * n_params * 4 / 2**30
                if mode in ("opacus", "fused") and need > args.max_grad_sample_gib:
                    rows.append({"mode": mode, "batch": batch, "k": k, "params": n_params, "seconds": None,
                                 "peak_mib": None, "skipped": f"per-sample grads need {need:.1f} GiB"})
                    print(f"  {mode} B={batch} K={k}: not run, per-sample gradients alone need {need:.1f} GiB",
                          file=sys.stderr, flush=True)
                    continue
                cmd = [sys.executable, __file__, "--one", f"{mode}:{batch}:{k}", "--config", args.config,
                       "--model", args.model, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                       "--device", device]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"benchmark {mode} batch {batch} K {k} failed")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"  {mode} B={batch} K={k}: {r['seconds']:.3f} s, peak {r['peak_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "model": args.model, "config": args.config, "rows": rows}, f, indent=1)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model} "
          f"({n_params / 1e6:.2f}M parameters)")
    print(f"{'batch':>5} {'K':>2} {'mode':>10} {'step s':>8} {'x nonpriv':>9} {'opacus/x':>8} {'peak MiB':>9} "
          f"{'x nonpriv':>9}")
    for r in rows:
        def same(mode, r=r):
            return next((b for b in rows if b["batch"] == r["batch"] and b["k"] == r["k"] and b["mode"] == mode
                         and b["seconds"] is not None), None)
        if r["seconds"] is None:
            print(f"{r['batch']:>5} {r['k']:>2} {r['mode']:>10}  not run: {r['skipped']}")
            continue
        base, hooks = same("nonprivate"), same("opacus")
        t_ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
        speedup = f"{hooks['seconds'] / r['seconds']:.2f}" if hooks else "-"
        m_ratio = f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}" if base else "-"
        print(f"{r['batch']:>5} {r['k']:>2} {r['mode']:>10} {r['seconds']:>8.3f} {t_ratio:>9} {speedup:>8} "
              f"{r['peak_mib']:>9.1f} {m_ratio:>9}")


if __name__ == "__main__":
    main()
