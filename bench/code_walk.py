"""How far one command travels through veil's code: files touched and switches between top-level packages.

    python bench/code_walk.py                               # this checkout: one `veil edit`, one HTTP accept
    python bench/code_walk.py --tree /tmp/veil-before       # ... and another checkout, side by side
    python bench/code_walk.py --tree /tmp/veil-before --only-trees --walks edit
    python bench/code_walk.py --export exports/guided --walks accept --sequence   # an existing export

(``git worktree add /tmp/veil-before <commit>`` or ``git archive <commit> | tar -x -C /tmp/veil-before`` makes
such a checkout.) Each (checkout, walk) runs in its own Python process. This checkout runs as installed (the
editable install); another one is copied into an installed layout (its ``[tool.setuptools.package-dir]``:
``lightning_modules/`` -> ``veil/lightning_modules/``, and so on, package data included) that is put first on
``PYTHONPATH``, and the process checks that ``veil`` was imported from that copy.

The two walks, each on a fresh ``$VEIL_HOME`` and a fresh ledger in a temporary folder:

- ``edit``: ``veil edit`` on the two models that ship with the demo (``models/public_unet``, guided and checked
  by ``models/guide``; found in the checkout's demo package): ``--first 1 --protect eyeglasses --level high
  --steps 10``, into a new ``--out`` and ``--ledger``. Recorded: what ``veil.cli.main(argv)`` calls once argparse
  is done, the subcommand's handler ``args.func(args)``, from checking the options to the release in the ledger
  and the files in ``--out`` (not recorded: building the parser, which touches every ``veil/cli/`` module
  whatever the command, and parsing).
- ``accept``: one HTTP accept on ``veil serve``. Setup, not recorded: a ``veil export`` of the same two models
  (6 steps; made once per checkout under ``--work``, or ``--export``), ``veil.cli.main(["serve", ...])`` on it
  with a fresh SQLite ``--state`` whose ``uvicorn.run`` is replaced by FastAPI's in-process ``TestClient`` on the
  app it is handed, ``GET /v1/info`` and ``POST /v1/sessions`` (a random 40x48 PNG, every attribute given,
  eyeglasses protected, level high). Recorded: the one ``POST /v1/sessions/{id}/feedback`` with
  ``{"action": "accept"}``, in every thread that serves it (the test client's event loop, its worker threads,
  the server's ONNX Runtime thread).

What is counted: ``sys.setprofile`` (and ``threading.setprofile`` for threads started after it) sees every call
of a Python function, generator or coroutine resumption included. A call counts when its code lives in a file
of the repository's packages (``veil/``, ``lightning_modules/``, ``kernels/``, ``export/``, ``serve/``; the
installed path is mapped back to the repository's), in the order the calls happen (threads interleaved as they
ran). Not counted: calls into anything else (torch, the standard library, FastAPI), code generated at run time
(dataclasses' ``__init__``: file ``<string>``), and importing: a module body and every call made while it runs
(lazy imports inside the command are loading code, not its work). The sequence of files is collapsed
(consecutive repeats of one file become one step); reported are the number of distinct files in it
(``files``) and the number of steps whose top-level package (the first folder of the path: ``veil``,
``lightning_modules``, ``kernels``, ``export``, ``serve``) differs from the step before (``switches``). A loop
that crosses packages on each step counts each crossing, so the numbers depend on ``--steps`` and on what the
randomized response and the check decide (a refused edit or a re-do walks more); the RR seed comes from the OS,
as a real release's does, so a second run may differ by a few switches.

Prints a markdown table (walk | checkout | files | switches | steps); ``--json`` writes the numbers and the
collapsed sequences, ``--sequence`` prints the sequences. Measured 2026-12-06 on commit cabaced (before issue 29):
``veil edit`` 25 files, 46 switches (165 steps); HTTP accept 15 files, 32-40 switches (137-149 steps). After issue 29
(commit da9505c, same run as the second before figure): ``veil edit`` 28 files, 66 switches (268 steps); HTTP accept
16 files, 51 switches (185 steps). More, not fewer: the job now lives in ``veil/`` and calls the torch library in
``lightning_modules/``, and the torch-free pipeline (``veil/editing/``) and its torch backend
(``lightning_modules/editing/``) call each other several times per edit (attribute arrays to and from the host); each
such call is a switch by this count. What the issue asked for is in the structure: one release function, one
pipeline, one database layer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGES = ("veil", "lightning_modules", "kernels", "export", "serve")
WALKS = ("edit", "accept")
EDIT_ARGS = ("--first", "1", "--protect", "eyeglasses", "--level", "high", "--steps", "10")
EXPORT_STEPS = "6"


# ------------------------------------------------------------------------------------------ counting
def collapse(files: list[str]) -> list[str]:
    """The sequence with consecutive repeats of one file made one step."""
    return [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]


def package_of(path: str) -> str:
    """The top-level package of a repository-relative path: its first folder."""
    return path.split("/", 1)[0]


def summarize(files: list[str]) -> dict:
    """files (distinct), switches (between top-level packages) and steps of a recorded sequence of files."""
    steps = collapse(files)
    tops = [package_of(f) for f in steps]
    return {"files": len(set(steps)), "switches": sum(a != b for a, b in zip(tops, tops[1:])),
            "steps": len(steps), "packages": sorted(set(tops)), "sequence": steps}


def package_roots(source: Path) -> dict[Path, str]:
    """{folder the installed package's modules are loaded from: repository folder} for ``source``'s
    package-dir mapping (``veil.lightning_modules`` -> ``lightning_modules``); its packages must be importable."""
    import importlib.util
    import tomllib

    mapping = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    roots = {}
    for dotted, folder in mapping.items():
        spec = importlib.util.find_spec(dotted)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"code_walk: package {dotted} ({folder}/) is not importable")
        for location in spec.submodule_search_locations:
            roots[Path(location).resolve()] = folder.strip("/")
    return roots


class Recorder:
    """Records the repository file of every Python call while ``active`` (see the module docstring).

    ``with Recorder(roots) as rec:`` installs the hooks (this thread and threads started later) and
    records at once; ``Recorder(roots, active=False)`` installs them idle, to be switched on by ``rec.active``.
    """

    def __init__(self, roots: dict[Path, str], *, active: bool = True):
        self.roots = sorted(((str(k) + os.sep, v) for k, v in roots.items()), key=lambda r: -len(r[0]))
        self.active, self.files, self._where, self._importing = active, [], {}, {}

    def _file(self, filename: str) -> str | None:
        where = self._where.get(filename, False)
        if where is False:
            where, path = None, os.path.realpath(filename)
            for prefix, folder in self.roots:
                if path.startswith(prefix):
                    where = f"{folder}/{path[len(prefix):]}".replace(os.sep, "/")
                    break
            self._where[filename] = where
        return where

    def _hook(self, frame, event, arg):
        code = frame.f_code
        if code.co_name == "<module>":  # importing: the module body and all it calls are not the command's work
            tid = threading.get_ident()
            if event == "call":
                self._importing[tid] = self._importing.get(tid, 0) + 1
            elif event == "return":
                self._importing[tid] = max(0, self._importing.get(tid, 0) - 1)
            return
        if event == "call" and self.active and not self._importing.get(threading.get_ident()):
            where = self._file(code.co_filename)
            if where is not None:
                self.files.append(where)  # list.append is atomic under the GIL: threads interleave as they ran

    def __enter__(self) -> Recorder:
        threading.setprofile(self._hook)
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        threading.setprofile(None)
        self.active = False


def record(fn, roots: dict[Path, str]) -> tuple[object, dict]:
    """(fn(), summary of its walk): a plain call recorded from start to end."""
    with Recorder(roots) as rec:
        result = fn()
    return result, summarize(rec.files)


# ------------------------------------------------------------------------------------------ the two walks
def demo_models(source: Path) -> Path:
    """The shipped demo models of the imported checkout (veil.demo, or the older veil.lightning_modules.demo)."""
    import importlib.util

    for dotted in ("veil.demo", "veil.lightning_modules.demo"):
        try:
            spec = importlib.util.find_spec(dotted)
        except ModuleNotFoundError:
            continue
        if spec is not None and spec.submodule_search_locations:
            models = Path(list(spec.submodule_search_locations)[0]) / "models"
            if (models / "public_unet").is_dir() and (models / "guide").is_dir():
                return models
    raise SystemExit(f"code_walk: no demo models (models/public_unet, models/guide) in {source}")


def walk_edit(source: Path, work: Path) -> dict:
    """One ``veil edit`` release on the demo's models (see the module docstring)."""
    from veil.cli import build_parser

    models = demo_models(source)
    roots = package_roots(source)
    argv = ["edit", "--checkpoint", str(models / "public_unet"), "--classifier", str(models / "guide"), *EDIT_ARGS,
            "--out", str(work / "edit_out"), "--ledger", str(work / "ledger.sqlite")]
    args = build_parser().parse_args(argv)  # what veil.cli.main does first: not the edit's work
    rc, result = record(lambda: args.func(args), roots)  # what veil.cli.main does next: the command
    if rc != 0:
        raise SystemExit(f"code_walk: veil {' '.join(argv)} exited {rc}")
    return {**result, "command": "veil " + " ".join(argv)}


def demo_export(source: Path, work: Path) -> Path:
    """The guided ``veil export`` of the demo's models, made once into ``work``."""
    from veil.cli import main

    out = work / "export"
    if not (out / "veil_export.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        models = demo_models(source)
        rc = main(["export", "--checkpoint", str(models / "public_unet"), "--classifier", str(models / "guide"),
                   "--steps", EXPORT_STEPS, "--out", str(out)])
        if rc != 0:
            raise SystemExit(f"code_walk: veil export exited {rc}")
    return out


def png_upload(width: int = 40, height: int = 48, seed: int = 0) -> bytes:
    """A small random RGB picture as PNG bytes."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _accept_in(app, roots: dict[Path, str]) -> dict:
    """Open a session on ``app`` (not recorded), then record one accept of it."""
    from fastapi.testclient import TestClient

    with Recorder(roots, active=False) as rec, TestClient(app) as client:
        info = client.get("/v1/info").json()
        names, checked = info["attribute_names"], info["classifier_attributes"] or info["attribute_names"]
        protected = "eyeglasses" if "eyeglasses" in checked else checked[0]
        attributes = {n: (1 if n == protected else -1) for n in names}
        r = client.post("/v1/sessions", files={"image": ("face.png", png_upload(), "image/png")},
                        data={"attributes": json.dumps(attributes), "protected": json.dumps([protected]),
                              "level": "high"})
        if r.status_code != 201:
            raise SystemExit(f"code_walk: POST /v1/sessions: {r.status_code} {r.text}")
        session = r.json()["session"]
        rec.active = True
        r = client.post(f"/v1/sessions/{session}/feedback", json={"action": "accept", "idempotency_key": "code-walk-1"})
        rec.active = False
    if r.status_code != 200:
        raise SystemExit(f"code_walk: accept: {r.status_code} {r.text}")
    return {**summarize(rec.files), "decision": r.json().get("decision")}


def walk_accept(source: Path, work: Path, export: Path | None = None) -> dict:
    """One HTTP accept on ``veil serve`` (see the module docstring)."""
    import uvicorn

    from veil.cli import main

    export = export or demo_export(source, work)
    roots = package_roots(source)
    state = work / "state.sqlite"
    for f in work.glob("state.sqlite*"):
        f.unlink()
    result = {}
    real_run = uvicorn.Server.run

    def run_in_process(server, *_args, **_kwargs):  # veil serve's uvicorn.Server(config).run(sockets=[...])
        result.update(_accept_in(server.config.app, roots))

    uvicorn.Server.run = run_in_process
    try:
        rc = main(["serve", "--export", str(export), "--state", str(state), "--budget", "8", "--providers", "cpu",
                   "--threads", "1", "--log-level", "warning", "--port", "0"])
    finally:
        uvicorn.Server.run = real_run
    if rc != 0 or not result:
        raise SystemExit(f"code_walk: veil serve exited {rc} without serving the app")
    return {**result, "command": f"POST /v1/sessions/{{id}}/feedback accept on veil serve --export {export}"}


def run_walk(walk: str, source: Path, work: Path, export: Path | None = None) -> dict:
    """One walk in this process, on a fresh $VEIL_HOME under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    home = work / "veil_home"
    shutil.rmtree(home, ignore_errors=True)
    os.environ["VEIL_HOME"] = str(home)
    for leftover in ("edit_out", "ledger.sqlite"):
        p = work / leftover
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return walk_edit(source, work) if walk == "edit" else walk_accept(source, work, export)


# ------------------------------------------------------------------------------------------ checkouts
def installed_layout(source: Path, dest: Path) -> Path:
    """Copy ``source``'s package folders to ``dest`` as its package-dir mapping installs them (all files: the
    package data, such as the demo's models and the server's page, too)."""
    import tomllib

    mapping = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(dest, ignore_errors=True)
    for dotted, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):  # parents first
        target = dest / Path(*dotted.split("."))
        shutil.copytree(source / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return dest


def measure(label: str, source: Path | None, walks: list[str], work: Path, export: Path | None) -> dict:
    """{walk: result} for one checkout (None: this one, as installed), each walk in a child process."""
    env = dict(os.environ)
    if source is None:
        source = ROOT
    else:
        layout = installed_layout(source, work / "layout")
        env["PYTHONPATH"] = os.pathsep.join([str(layout), *filter(None, [env.get("PYTHONPATH")])])
        env["CODE_WALK_LAYOUT"] = str(layout)
    results = {}
    for walk in walks:
        out = work / f"{walk}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--inner", walk, "--source", str(source),
               "--work", str(work / walk), "--result", str(out)]
        if export is not None:
            cmd += ["--export", str(export)]
        print(f"code_walk: {label}: {walk} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"code_walk: the {walk} walk of {label} failed (exit {proc.returncode})")
        results[walk] = json.loads(out.read_text())
    return results


def table(measured: dict[str, dict]) -> str:
    """walk | checkout | files | switches | steps, one row per (walk, checkout)."""
    names = {"edit": "veil edit (1 release)", "accept": "HTTP accept (veil serve)"}
    lines = ["| walk | checkout | files | switches | steps |", "|---|---|---|---|---|"]
    for walk in WALKS:
        for label, results in measured.items():
            if walk in results:
                r = results[walk]
                lines.append(f"| {names[walk]} | {label} | {r['files']} | {r['switches']} | {r['steps']} |")
    return "\n".join(lines)


def _inner(args) -> None:
    here = str(HERE)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]  # bench/kernels.py is not `kernels`
    import veil

    layout = os.environ.get("CODE_WALK_LAYOUT")
    if layout and not Path(veil.__file__).resolve().is_relative_to(Path(layout).resolve()):
        raise SystemExit(f"code_walk: veil was imported from {veil.__file__}, not from the copy in {layout}")
    result = run_walk(args.inner, Path(args.source).resolve(), Path(args.work),
                      Path(args.export) if args.export else None)
    Path(args.result).write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], help="another checkout to walk (repeatable)")
    p.add_argument("--only-trees", action="store_true", help="walk the --tree checkouts only, not this one")
    p.add_argument("--walks", default=",".join(WALKS), help="comma-separated: edit, accept (default both)")
    p.add_argument("--export", help="serve this export in the accept walk instead of making the demo's")
    p.add_argument("--work", help="folder for exports, layouts and outputs (default: a temporary one, removed)")
    p.add_argument("--json", help="write every number and sequence here")
    p.add_argument("--sequence", action="store_true", help="print each collapsed sequence of files")
    p.add_argument("--inner", choices=WALKS, help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        _inner(args)
        return {}
    walks = [w for w in args.walks.split(",") if w]
    if not walks or set(walks) - set(WALKS):
        p.error(f"--walks: choose from {', '.join(WALKS)}")
    targets = [] if args.only_trees else [(f"this checkout ({ROOT})", None)]
    targets += [(str(Path(t).resolve()), Path(t).resolve()) for t in args.tree]
    if not targets:
        p.error("--only-trees needs --tree")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="code_walk_"))
    try:
        measured = {label: measure(label, source, walks, work / f"t{i}", Path(args.export) if args.export else None)
                    for i, (label, source) in enumerate(targets)}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(measured))
    if args.sequence:
        for label, results in measured.items():
            for walk, r in results.items():
                print(f"\n{walk}, {label}:\n  " + "\n  ".join(r["sequence"]))
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=1))
    return measured


if __name__ == "__main__":
    main()
