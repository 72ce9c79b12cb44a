"""Build-once test artifacts (tiny trained models, their exports), cached on disk across test runs and shared
between pytest-xdist workers: ``cached_dir(name, build)`` returns a folder that ``build(folder)`` filled, built
at most once per *key*.

The key hashes every source file that can change what is built (the package's Python and YAML under
veil/, lightning_modules/, kernels/, export/ and tests/helpers/; not serve/, which nothing that builds
imports), the versions of Python and of the libraries that compute (``DEPENDENCIES``) and the builder's
name, so an edit to any of them rebuilds; nothing is ever reused across a change. Workers that need the same
folder wait on a file lock while one builds it; a folder counts only once its build wrote ``.complete`` (a
build that died is removed and redone).

``VEIL_TEST_CACHE`` (default ``~/.cache/veil-tests``) says where; ``VEIL_TEST_CACHE=off`` builds into a fresh
temporary folder every run (no reuse at all). Old keys are pruned after a week unused.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
# serve/ is left out: nothing that trains or exports imports it (an edit to the server does not rebuild the
# models it serves); everything else that is installed as `veil` is in.
SOURCE_DIRS = ("veil", "lightning_modules", "kernels", "export", "tests/helpers")
SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml", ".safetensors", ".html", ".js", ".css")  # + the demo's models
DEPENDENCIES = ("torch", "lightning", "diffusers", "opacus", "triton", "onnxruntime-gpu", "onnxruntime", "onnx",
                "onnxscript", "numpy", "scipy", "pillow", "dp-accounting", "fastapi")
PRUNE_AFTER_S = 7 * 24 * 3600


def source_key(name: str, *, extra: str = "") -> str:
    """sha256 of the builder's name, the interpreter and torch versions and every source file that builds."""
    from importlib import metadata

    versions = []
    for dist in DEPENDENCIES:
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=absent")
    h = hashlib.sha256(f"{name}\0{sys.version}\0{';'.join(versions)}\0{extra}".encode())
    for top in SOURCE_DIRS:
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cache_root() -> Path | None:
    where = os.environ.get("VEIL_TEST_CACHE", "")
    if where.lower() in ("off", "0", "no"):
        return None
    return Path(where).expanduser() if where else Path.home() / ".cache" / "veil-tests"


USED: set[Path] = set()  # the cached folders this process handed out (checked unchanged at the session's end)


def changed_since_built() -> list[str]:
    """The files of ``USED`` folders that differ from what their build wrote (a test wrote into one)."""
    changed = []
    for folder in sorted(USED):
        if (folder / ".complete").exists():
            built, now = (set(m.splitlines()) for m in ((folder / ".complete").read_text(), _manifest(folder)))
            changed += sorted({str(folder / row.split("\t")[0]) for row in built ^ now})
    return changed


def cached_dir(name: str, build: Callable[[Path], None], *, extra: str = "", check_unchanged: bool = True) -> Path:
    """The folder ``build`` fills for ``name`` at today's sources: reused when complete, built otherwise.
    ``check_unchanged`` False: the tests may write into it (only what rewrites the same state: the demo's
    resume), so it is not compared with what its build wrote."""
    root = cache_root()
    if root is None:
        folder = Path(tempfile.mkdtemp(prefix=f"veil-test-{name}-"))
        build(folder)
        return folder
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{name}-{source_key(name, extra=extra)[:20]}"
    with open(root / f"{folder.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker building the same key: wait for it
        try:
            if not (folder / ".complete").exists():  # absent, or a build that died: (re)build in place
                shutil.rmtree(folder, ignore_errors=True)  # in place: what is built may record its own path
                folder.mkdir()
                try:
                    build(folder)
                except BaseException:
                    shutil.rmtree(folder, ignore_errors=True)
                    raise
                (folder / ".complete").write_text(_manifest(folder))
            elif check_unchanged and (folder / ".complete").read_text() != _manifest(folder):  # a test wrote into the shared copy
                raise RuntimeError(f"the cached test artifact {folder} was changed after it was built (a test "
                                   f"must copy it before writing into it); delete the folder to rebuild it")
            os.utime(folder / ".complete")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if check_unchanged:
        USED.add(folder)
    _prune(root, keep=folder)
    return folder


def _manifest(folder: Path) -> str:
    """Every file's relative path, size and mtime (what a test writing into the shared copy would change)."""
    rows = [f"{p.relative_to(folder)}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".complete"]
    return "\n".join(rows)


def _prune(root: Path, *, keep: Path) -> None:
    """Remove cached folders of other keys unused for a week (best effort: another run may hold one)."""
    now = time.time()
    for folder in root.iterdir():
        done = folder / ".complete"
        if folder == keep or not folder.is_dir() or not done.exists():
            continue
        if now - done.stat().st_mtime > PRUNE_AFTER_S:
            shutil.rmtree(folder, ignore_errors=True)
            Path(f"{folder}.lock").unlink(missing_ok=True)
