"""Packaging: everything imports under the one namespace ``veil``, nothing generic leaks."""

import importlib.util
import subprocess
import sys
from pathlib import Path


def _in_fresh_process(code: str, cwd: Path) -> str:
    # A fresh interpreter outside the repository, so the checkout's folders are not on sys.path.
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_subpackages_import_under_veil(tmp_path):
    out = _in_fresh_process(
        "import veil.lightning_modules, veil.kernels, veil.export, veil.serve, veil.cli; print('ok')", tmp_path)
    assert out.strip() == "ok"


def test_no_top_level_generic_modules_installed(tmp_path):
    code = "import importlib.util as u; print([n for n in ('kernels', 'export', 'serve', 'lightning_modules') if u.find_spec(n)])"
    assert _in_fresh_process(code, tmp_path).strip() == "[]"


def test_importing_veil_is_light(tmp_path):
    # The serving path needs the CLI parser, the privacy bookkeeping and revision manifests
    # without torch (DESIGN.md): none of these may pull it in.
    code = ("import sys, veil, veil.errors, veil.cli, veil.lightning_modules.data, "
            "veil.privacy.revision_manifest, veil.privacy.ledger, "
            "veil.privacy.session, veil.privacy.levels; "
            "veil.cli.build_parser(); print('torch' in sys.modules)")
    assert _in_fresh_process(code, tmp_path).strip() == "False"


def test_veil_kernels_resolves_to_repo_folder():
    spec = importlib.util.find_spec("veil.kernels")
    assert Path(spec.origin).parent.name == "kernels"
