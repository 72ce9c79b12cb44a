"""Runtime dependencies match the imports: deptry (pyproject.toml [tool.deptry]) on the installed package's
source folders, and the CLI's list of the ``train`` extra's modules matches that extra."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from veil.cli import TRAIN_MODULES

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("veil", "lightning_modules", "kernels", "export", "serve")  # package-dir: the `veil` namespace
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _deptry(config: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("deptry", path=str(Path(sys.executable).parent)) or shutil.which("deptry")
    assert exe, "deptry is not installed: pip install -e '.[test]'"
    return subprocess.run([exe, "--no-ansi", "--config", str(config), *FOLDERS], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_every_import_is_a_declared_runtime_dependency():
    done = _deptry(ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_import_declared_only_for_tests_fails_the_check(tmp_path):
    # httpx was imported at run time (serve/launch.py, the demo's serving stage) but declared in [test] only
    text = (ROOT / "pyproject.toml").read_text()
    without = re.sub(r'\n    "httpx[^\n]*', "", text.split("[project.optional-dependencies]")[0], count=1)
    assert without != text.split("[project.optional-dependencies]")[0], "httpx is no base dependency any more"
    config = tmp_path / "pyproject.toml"
    config.write_text(without + "[project.optional-dependencies]" + text.split("[project.optional-dependencies]")[1])
    done = _deptry(config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"serve/launch\.py:\d+:\d+: DEP004 'httpx' imported but declared as a dev dependency",
                     done.stdout + done.stderr), done.stdout + done.stderr


def test_the_cli_knows_the_train_extras_modules():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    names = {re.match(r"[A-Za-z0-9_.-]+", req)[0].lower().replace("_", "-") for req in extra}
    by_dist: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            by_dist.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    missing = sorted(n for n in names if n not in by_dist)
    assert not missing, f"not installed here, cannot check: {missing}"
    # each distribution of the extra is known to the CLI by one of its modules, and the CLI names no other
    unknown = sorted(n for n in names if not by_dist[n] & TRAIN_MODULES)
    assert not unknown, f"add their import names to veil.cli.TRAIN_MODULES: {unknown}"
    assert TRAIN_MODULES <= set().union(*(by_dist[n] for n in names))
