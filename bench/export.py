"""Latency of a preview edit: ``OrtEditor`` (ONNX Runtime) against ``PrivateEditor`` eager and under
torch.compile, in the same run.

    python bench/export.py                       # 32 and 64, batch 1 and 8, both backends
    python bench/export.py --resolutions 32 --batches 1 --repeats 5 --threads 2

A preview edit = 10 inversion steps + 10 generation steps (strength 1.0 at --steps 10), DDIM
inversion, the same images and targets for the three. The models have the architectures of
``configs/synthetic32_public.yaml`` (label-free UNet, guided backend with the classifier of
``configs/classifier32_guidance.yaml``) and ``configs/synthetic32.yaml`` (conditional UNet,
classifier-free guidance), trained for one step at each resolution (latency does not depend on the
weights) into ``--work``, exported with ``veil export``; models and exports are reused on later runs.

Prints a table of p50 / p90 milliseconds per edit and the ratios eager / ORT and compile / ORT
(higher: ORT faster), and writes it to ``--out``/export.md and .json. Ratios, not absolute times:
these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lightning_modules" / "configs"


def _veil(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "veil.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"veil {' '.join(args)} failed:\n{result.stderr[-2000:]}")


def models(work: Path, resolution: int) -> dict[str, Path]:
    """One-step models and their exports at ``resolution`` (made once, reused)."""
    d = work / f"r{resolution}"
    data = ["--set", "data.num_images=300", "--set", f"data.resolution={resolution}", "--set", "trainer.max_steps=1",
            "--set", "dp.enabled=false"]
    paths = {"unet": d / "unet", "cond": d / "cond", "guide": d / "guide",
             "guided": d / "export_guided", "conditional": d / "export_conditional"}
    if not (paths["unet"] / "model").exists():
        _veil("train", "--config", str(CONFIGS / "synthetic32_public.yaml"), *data, "--out", str(paths["unet"]))
    if not (paths["cond"] / "model").exists():
        _veil("train", "--config", str(CONFIGS / "synthetic32.yaml"), *data, "--set", "dp.target_epsilon=null",
              "--out", str(paths["cond"]))
    if not (paths["guide"] / "model").exists():
        _veil("train-classifier", "--config", str(CONFIGS / "classifier32_guidance.yaml"),
              "--data", f"source=synthetic,num_images=300,resolution={resolution}", "--set", "epochs=1", "--set", "batch_size=64",
              "--set", "dp.enabled=false", "--out", str(paths["guide"]))
    if not (paths["guided"] / "veil_export.json").exists():
        _veil("export", "--checkpoint", str(paths["unet"]), "--classifier", str(paths["guide"]), "--steps", "10",
              "--out", str(paths["guided"]))
    if not (paths["conditional"] / "veil_export.json").exists():
        _veil("export", "--checkpoint", str(paths["cond"]), "--steps", "10", "--out", str(paths["conditional"]))
    return paths


def _times(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def measure(paths: dict, backend: str, batch: int, *, repeats: int, threads: int, compile_: bool) -> dict:
    from veil.editing.load import load_editor

    if backend == "guided":
        editor = load_editor(paths["unet"], runtime="torch", classifier=paths["guide"], steps=10)
    else:
        editor = load_editor(paths["cond"], runtime="torch", steps=10)
    ort_editor = load_editor(paths[backend], runtime="ort", steps=10, providers="auto", threads=threads)
    k, res = len(editor.attribute_names), ort_editor.resolution
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, res, res, generator=g) * 2 - 1
    a = torch.where(torch.rand(batch, k, generator=g) < 0.5, 1.0, -1.0)
    protected = [editor.attribute_names[0]]
    kw = dict(strength=1.0, protected=protected, encoding="invert")
    row = {"backend": backend, "resolution": res, "batch": batch, "provider": ort_editor.provider, "threads": threads}
    row["eager"] = _times(lambda: editor.edit(x, a, -a, **kw), repeats, 1)
    xn, an = x.numpy(), a.numpy()
    row["ort"] = _times(lambda: ort_editor.edit(xn, an, -an, **kw), repeats, 1)
    row["compile"], row["compile_error"] = [], None
    if compile_:
        try:
            editor.model = torch.compile(editor.model, dynamic=False)
            if editor.guide is not None:
                editor.guide.model = torch.compile(editor.guide.model, dynamic=False)
            row["compile"] = _times(lambda: editor.edit(x, a, -a, **kw), repeats, 2)
        except Exception as e:  # noqa: BLE001 - reported in the table, as a miss
            row["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    got, want = ort_editor.edit(xn, an, -an, **kw), editor.edit(x, a, -a, **kw).numpy()
    row["max_abs_error"] = float(np.abs(got - want).max())
    return row


def table(rows: list[dict]) -> str:
    head = ("| resolution | backend | batch | eager p50 / p90 ms | compile p50 / p90 ms | ORT p50 / p90 ms | "
            "eager / ORT | compile / ORT | ORT provider | max abs error |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        def pp(key):
            return f"{_pct(r[key], 50):.1f} / {_pct(r[key], 90):.1f}" if r[key] else (r.get(f"{key}_error") or "n/a")
        ort50 = _pct(r["ort"], 50)
        ratio = lambda key: f"{_pct(r[key], 50) / ort50:.2f}x" if r[key] else "n/a"  # noqa: E731
        lines.append(f"| {r['resolution']} | {r['backend']} | {r['batch']} | {pp('eager')} | {pp('compile')} | "
                     f"{pp('ort')} | {ratio('eager')} | {ratio('compile')} | {r['provider']} | "
                     f"{r['max_abs_error']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default="32,64")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--backends", default="guided,conditional")
    p.add_argument("--repeats", type=int, default=10, help="timed edits per cell (after warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (the same)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it needs a C++ compiler)")
    p.add_argument("--work", default="bench/out/export/work", help="where the one-step models and exports go")
    p.add_argument("--out", default="bench/out/export", help="folder for export.md and export.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for res in [int(r) for r in args.resolutions.split(",")]:
        paths = models(Path(args.work), res)
        for backend in args.backends.split(","):
            for batch in [int(b) for b in args.batches.split(",")]:
                rows.append(measure(paths, backend, batch, repeats=args.repeats, threads=args.threads,
                                    compile_=not args.no_compile))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = (f"preview edit: 10 inversion + 10 generation steps, {args.threads} threads, {args.repeats} timed edits "
            f"per cell; torch {torch.__version__}\n\n" + table(rows))
    (out / "export.md").write_text(text)
    (out / "export.json").write_text(json.dumps({"rows": rows, "median": {
        f"{r['resolution']}/{r['backend']}/{r['batch']}": statistics.median(r["ort"]) for r in rows}}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
