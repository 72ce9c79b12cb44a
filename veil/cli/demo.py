"""``veil demo``: the whole framework on the embedded synthetic faces, ending in a report (argparse and a thin handler).

    veil demo                      # ~5 min on a 2-core CPU (shipped models): runs/demo/report.html, report.json, a summary table
    veil demo --fresh              # start over and retrain every model here (~15 min)
    veil demo --quick --out D      # ~1.5 min, tiny models: checks the plumbing (the test runs it)
    veil demo --serve              # then keep serving the page (upload the faces in OUT/serve/faces; Ctrl-C)

Stages: models -> edits -> unlearning -> export -> serve (``veil.demo.pipeline``). An
interrupted demo resumes at the stage it was in. The default takes the models shipped in
veil/demo/models/ (each with its command and privacy record); ``--fresh`` starts over in
the same folder and retrains every model from the embedded data within the demo's budget (~15 min).
"""

from __future__ import annotations

import sys


def add_subcommand(sub) -> None:
    p = sub.add_parser("demo", help="run the whole framework on the embedded synthetic faces and write a report",
                       description="Train the private models, edit private images with a scripted owner through "
                                   "the dataset's ledger, unlearn the revision from a published classifier, export "
                                   "to ONNX, serve one edit over HTTP; write OUT/report.html and report.json.")
    p.add_argument("--out", default="runs/demo", help="the demo's folder (default runs/demo; reused to resume)")
    p.add_argument("--quick", action="store_true", help="tiny models, a few images (~1.5 min): the plumbing only")
    p.add_argument("--fresh", action="store_true",
                   help="start over in --out and retrain every model from the embedded data instead of using the "
                        "shipped ones (~15 min on a 2-core CPU; the public UNet then gets 5 minutes and draws roughly)")
    p.add_argument("--serve", action="store_true", help="afterwards, serve the page on the demo's faces until Ctrl-C")
    p.add_argument("--port", type=int, default=8000, help="port of --serve (default 8000)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    import os
    import subprocess
    from pathlib import Path

    from veil.demo.pipeline import demo_home, run_demo

    out = Path(args.out)
    report = run_demo(out=out, quick=args.quick, fresh=args.fresh,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"\nwrote {out / 'report.html'} and {out / 'report.json'}; the demo's privacy account: {out / 'veil_home'}")
    if not args.serve:  # the serve stage's own next step: valid for this demo (--quick included)
        print(f"open the interactive page on the demo's models: {report['stages']['serve']['command']}")
        return 0
    from veil.demo.serving import write_faces
    from veil.demo.stages import _published_data, serve_command

    faces = write_faces(_published_data(out), out / "serve" / "faces")
    # not `--dataset faces`: the export's data is the synthetic faces, which veil serve cannot check a folder
    # against (serve/dataset.py's check_export_data refuses it), so the faces are uploaded like any photo
    print(f"serving the page: http://127.0.0.1:{args.port}/ ; upload any of the {len(list(faces.glob('*.png')))} "
          f"demo faces in {faces} (Ctrl-C stops)", flush=True)
    try:
        # the demo's own privacy account, as during its stages (run_demo put the caller's VEIL_HOME back)
        env = {**os.environ, "VEIL_HOME": demo_home(out)}
        return subprocess.call(serve_command(out, "--port", str(args.port)), env=env)
    except KeyboardInterrupt:
        return 0
