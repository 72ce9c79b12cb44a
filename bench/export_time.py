"""How long ``veil export`` spends making each ONNX graph, with and without its graph cache, in the same run.

    python bench/export_time.py                      # the demo's shipped label-free UNet + guide (guided graphs)
    python bench/export_time.py --checkpoint runs/public --classifier runs/guide --checker runs/judge
    python bench/export_time.py --checkpoint runs/dp32 --classifier runs/clf --classifier-scale 0

Each graph is made three times, as ``veil export`` makes it (``veil.export.graphs``: capture, then translation
to ONNX through ``veil.export.graph_cache``), in one process and this order:

    first   an empty cache: translated, its template written (this row also pays the process's one-time costs)
    off     VEIL_EXPORT_CACHE=off: what every export cost before the cache
    cached  the template of ``first`` filled with the weights

and the table gives the seconds of each, the ratio off / cached (higher: the cache saves more), and whether
``cached`` wrote the same bytes as ``off``. The rest of ``veil export`` (loading, the verification against
PyTorch: a few seconds) is the same either way and not in the table. Ratios, not absolute times: these machines
are shared and noisy. Writes ``--out``/export_time.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "veil" / "demo" / "models"
GRAPHS = ("denoise_step", "invert_step", "classifier")
MODES = ("first", "off", "cached")


def measure(editor, graphs: list[str], work: Path) -> list[dict]:
    from veil.export import graph_cache
    from veil.export import graphs as G

    make = {"denoise_step": lambda p: G.export_denoise_step(editor, p),
            "invert_step": lambda p: G.export_invert_step(editor, p),
            "classifier": lambda p: G.export_classifier(editor.checker, p)}
    before = os.environ.get(graph_cache.CACHE_ENV)
    rows = {g: {"graph": g} for g in graphs}
    try:
        for mode in MODES:
            os.environ[graph_cache.CACHE_ENV] = "off" if mode == "off" else str(work / "cache")
            for g in graphs:
                start = time.perf_counter()
                info = make[g](work / f"{mode}-{g}.onnx")
                rows[g][mode] = time.perf_counter() - start
                rows[g][f"{mode} translation"] = info["translation"]
    finally:
        if before is None:
            os.environ.pop(graph_cache.CACHE_ENV, None)
        else:
            os.environ[graph_cache.CACHE_ENV] = before
    for g, row in rows.items():
        row["off / cached"] = row["off"] / row["cached"]
        row["same bytes"] = (work / f"off-{g}.onnx").read_bytes() == (work / f"cached-{g}.onnx").read_bytes()
    return list(rows.values())


def table(rows: list[dict]) -> str:
    lines = ["| graph | first (s) | off (s) | cached (s) | off / cached | cached = off, byte for byte |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['first']:.1f} | {r['off']:.1f} | {r['cached']:.1f} | "
                     f"{r['off / cached']:.1f}x | {'yes' if r['same bytes'] else 'NO'} |")
    total = {m: sum(r[m] for r in rows) for m in MODES}
    lines.append(f"| all | {total['first']:.1f} | {total['off']:.1f} | {total['cached']:.1f} | "
                 f"{total['off'] / total['cached']:.1f}x | |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(SHIPPED / "public_unet"), help="the denoiser (veil train's --out)")
    p.add_argument("--classifier", default=str(SHIPPED / "guide"), help="the guide, or the conditional's classifier")
    p.add_argument("--classifier-scale", type=float, default=10.0, help="0: a conditional export")
    p.add_argument("--checker", default=None, help="the check classifier (classifier.onnx); none: no classifier graph")
    p.add_argument("--graphs", default=",".join(GRAPHS), help=f"which of {','.join(GRAPHS)}")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default="bench/out/export_time", help="folder for export_time.md and .json")
    args = p.parse_args(argv)
    from veil.editing.load import load_editor

    torch.set_num_threads(args.threads)
    editor = load_editor(args.checkpoint, runtime="torch", classifier=args.classifier, checker=args.checker,
                         classifier_scale=args.classifier_scale, steps=10)
    graphs = [g for g in args.graphs.split(",") if g != "classifier" or editor.checker is not None]
    unknown = set(graphs) - set(GRAPHS)
    if unknown:
        p.error(f"--graphs: unknown {sorted(unknown)}; choose from {','.join(GRAPHS)}")
    with tempfile.TemporaryDirectory(prefix="veil-export-time-") as work:
        rows = measure(editor, graphs, Path(work))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = (f"`veil export`'s graphs, {editor.backend} backend ({args.checkpoint}), {args.threads} torch threads, "
            f"torch {torch.__version__}\n\n" + table(rows) + "\n")
    (out / "export_time.md").write_text(text)
    (out / "export_time.json").write_text(json.dumps({"rows": rows, "checkpoint": args.checkpoint}, indent=1))
    print(text)
    return rows


if __name__ == "__main__":
    main()
