"""``veil export``: the edit sampler as ONNX graphs for ONNX Runtime (argparse and a thin handler).

    veil export --checkpoint RUN [--classifier CLF --classifier-scale 10 --checker JUDGE] [--steps 50] --out DIR

RUN is a `veil train` release (the denoiser), CLF a `veil train-classifier` release (it guides with
--classifier-scale > 0; with scale 0 it does not steer and only checks), JUDGE another classifier
release that checks the edits: a guided export is never checked by its guide, so without --checker it
has no check and its releases are unchecked (the server says so). DIR receives denoise_step.onnx,
invert_step.onnx, classifier.onnx (the check classifier, when there is one) and veil_export.json; the
export is verified against PyTorch (a whole edit) before anything lands in DIR. The handler is
``veil.api.export_onnx`` (the exporter ``veil.export.exporter``) and the printing; the runtime that reads DIR is ``veil.export.runtime.OrtEditor`` (no torch).
"""

from __future__ import annotations

from veil.cli import finite_float, nonneg_float, positive_int


def add_subcommand(sub) -> None:
    p = sub.add_parser("export", help="export the edit sampler to ONNX Runtime (verified against PyTorch)",
                       description="Write one DDIM denoise step (with its guidance), one inversion step and the "
                                   "classifier as ONNX graphs with a metadata file, verify a whole edit through "
                                   "ONNX Runtime against PyTorch, and only then put them in --out.")
    p.add_argument("--checkpoint", required=True, help="the denoiser: a `veil train` release (OUT or OUT/model)")
    p.add_argument("--classifier", help="a `veil train-classifier` release: guides (--classifier-scale > 0), or only "
                                        "checks the edits (--classifier-scale 0)")
    p.add_argument("--checker", help="a `veil train-classifier` release that checks the edits (classifier.onnx); a "
                                     "guided export without one has no check (never its guide: its own gradients fool "
                                     "it); not the guide's weights")
    p.add_argument("--classifier-scale", type=nonneg_float, default=10.0,
                   help="classifier guidance scale (default 10; 0: the classifier only checks)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="default classifier-free guidance of the conditional backend (default: the model's)")
    p.add_argument("--steps", type=positive_int, default=50, help="default DDIM steps of a full-strength edit "
                                                                  "(the runtime may use any count; default 50)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--out", required=True, help="folder for the export (must not hold an export already)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from veil import api

    meta = api.export_onnx(checkpoint=args.checkpoint, classifier=args.classifier,
                           classifier_scale=args.classifier_scale, checker=args.checker, steps=args.steps,
                           guidance=args.guidance, use_ema=not args.no_ema, out=args.out).meta
    v = meta["verification"]
    worst = max(v["max_abs_error"].values())
    cached = [name for name, g in meta["graphs"].items() if g.get("translation") == "cached"]
    graphs = (f"; {len(cached)} of {len(meta['graphs'])} graphs filled from the graph cache (an architecture "
              f"exported before; VEIL_EXPORT_CACHE=off translates)" if cached else "")
    print(f"wrote {args.out}: {', '.join(meta['files'])} + veil_export.json ({meta['backend']} backend, "
          f"{meta['resolution']}x{meta['resolution']}, opset {meta['versions']['opset']}){graphs}; verified: "
          f"whole edits through ONNX Runtime within {worst:.2g} of PyTorch (tolerance {v['tolerance']:g}); "
          f"models: {meta['model_privacy']}; check: {meta['check']}")
    return 0
