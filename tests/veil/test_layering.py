"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and the check can fail.

import-linter (grimp) builds its graph by walking one package folder, but ``veil`` is spread over
several (``[tool.setuptools.package-dir]``: ``veil.lightning_modules`` is ``lightning_modules/``, and
so on). So the tree is copied into a temporary folder as it is installed, and ``lint-imports`` runs
on that copy with the contracts of the real pyproject.toml.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def installed_layout(dest: Path) -> Path:
    """Copy every package's .py files to dest/<dotted path>, as setuptools' package-dir maps them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    for package in setuptools["packages"]:
        top = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        source = ROOT / mapping[top] / Path(*package[len(top):].lstrip(".").split(".") if package != top else ())
        target = dest / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for f in source.glob("*.py"):
            shutil.copy(f, target / f.name)
    return dest


def lint(tree: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the copy shadows the editable install (its finder comes after the path finder).
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return installed_layout(tmp_path_factory.mktemp("layout"))


def test_every_package_folder_is_listed_in_pyproject():
    """A folder with an __init__.py that [tool.setuptools] packages misses would be left out of a
    regular (non-editable) install."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    nested = {n for n in found if any(n != m and n.startswith(m + ".") and m in setuptools["package-dir"]
                                      for m in setuptools["package-dir"])}
    assert found - nested <= set(setuptools["packages"]) and not (found & nested) - set(setuptools["packages"]), \
        sorted(found - set(setuptools["packages"]))


def test_the_copy_holds_every_module(tree):
    copied = {p.relative_to(tree).with_suffix("").as_posix().replace("/", ".") for p in tree.rglob("*.py")}
    assert {"veil.cli.train", "veil.privacy.session", "veil.lightning_modules.dp.step",
            "veil.lightning_modules.diffusion.ddim", "veil.kernels.optimizer"} <= copied


def test_import_contracts_hold(tree):
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line", [
    # sideways: the torch editor importing its sibling of the same layer
    ("lightning_modules/editing/editor.py", "from veil.lightning_modules import unlearning_module"),
    # upwards: a job importing the demo
    ("veil/jobs/edit.py", "import veil.demo"),
    # upwards: the diffusion math importing a job
    ("lightning_modules/diffusion/ddim.py", "from veil.lightning_modules.editing import editor"),
    # torch in the torch-free bookkeeping
    ("veil/privacy/levels.py", "import torch"),
    # the torch library holding a recipe: the ledger, the --out helper
    ("lightning_modules/data/datamodule.py", "from veil.privacy import ledger"),
    ("lightning_modules/checkpoints.py", "import veil.outputs"),
    # the torch-free edit pipeline importing torch
    ("veil/editing/plan.py", "import torch"),
    ("veil/editing/pipeline.py", "import torch"),
    # anything importing the command line
    ("lightning_modules/models/unet.py", "import veil.cli"),
])
def test_a_bad_import_breaks_a_contract(tmp_path, module, line):
    tree = installed_layout(tmp_path)
    installed = {"lightning_modules": "veil/lightning_modules"}
    top, _, rest = module.partition("/")
    path = tree / installed.get(top, top) / rest
    path.write_text(path.read_text() + f"\n{line}  # added by the test\n")
    result = lint(tree)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr
