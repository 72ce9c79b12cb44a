"""The README's "Layout" table lists every module of every package, and names nothing that is not there.

The table has one row per package folder (``| `veil/privacy/` | `veil.privacy` | `ledger.py` (...), ... |``):
the folder, its import name, and its files in backticks. Every ``.py`` file of the folder must be named in its
row; an ``__init__.py`` only when it defines a function or class of its own (other than a lazy ``__getattr__``):
otherwise the row itself describes it. Every backticked ``*.py`` or ``folder/`` in a row must exist (relative to
the row's folder, or to the repository). Rows for folders that are not packages (``bench/``, ``tests/``) are
allowed; their folder must exist. The packages are those of ``[tool.setuptools]`` in pyproject.toml, mapped to
folders by its ``package-dir``, less the data-only ones (no ``.py``: serve's page, the demo's models).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
CELL_NAME = re.compile(r"`([^`\s]+)`")


def package_folders(root: Path = ROOT) -> dict[str, str]:
    """{repository folder ("lightning_modules/dp"): import name ("veil.lightning_modules.dp")} of every package."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    folders = {}
    for package in setuptools["packages"]:
        top = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        rest = package[len(top):].lstrip(".")
        folder = "/".join(filter(None, [mapping[top].strip("/"), *rest.split(".")]))
        if any((root / folder).glob("*.py")):  # data-only folders are listed for their files (no module, no row)
            folders[folder] = package
    return folders


def _init_has_code(path: Path) -> bool:
    """Whether an ``__init__.py`` defines a function or class (beyond a lazy module ``__getattr__``)."""
    tree = ast.parse(path.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name != "__getattr__"
               for n in tree.body)


def modules(folder: Path) -> set[str]:
    """The file names the folder's row must name."""
    return {p.name for p in folder.glob("*.py") if p.name != "__init__.py" or _init_has_code(p)}


def layout_rows(readme: str) -> dict[str, tuple[str, str]]:
    """{folder: (import-name cell, files cell)} of the table(s) in the README's "## Layout" section."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        first = re.fullmatch(r"`([^`]+)`", cells[0]) if cells else None
        if first and len(cells) >= 3:
            rows[first.group(1).strip("/")] = (cells[1], " | ".join(cells[2:]))
    return rows


def named(cell: str) -> set[str]:
    """The backticked file names (``x.py``) and folders (``x/``) of a cell."""
    return {m for m in CELL_NAME.findall(cell) if m.endswith(".py") or (m.endswith("/") and "*" not in m)}


def disagreements(readme: str, root: Path = ROOT) -> dict[str, list[str]]:
    """What the README's Layout table and the packages disagree on, by kind (empty lists: they agree)."""
    rows, packages = layout_rows(readme), package_folders(root)
    out = {"missing from the table (add each to its folder's row)": [],
           "named in the table but not on disk": [],
           "package folders without a row": [],
           "rows whose import name is not the installed one": []}
    for folder, dotted in sorted(packages.items()):
        if folder not in rows:
            out["package folders without a row"].append(f"{folder}/")
            continue
        listed = {n for n in named(rows[folder][1]) if "/" not in n}
        out["missing from the table (add each to its folder's row)"] += [
            f"{folder}/{m}" for m in sorted(modules(root / folder) - listed)]
        if rows[folder][0] != f"`{dotted}`":
            out["rows whose import name is not the installed one"].append(
                f"{folder}/: the table says {rows[folder][0] or '(nothing)'}, installed as `{dotted}`")
    for folder, (_, cell) in sorted(rows.items()):
        if not (root / folder).is_dir():
            if (root / folder).is_file():
                out["named in the table but not on disk"].append(f"{folder} (a row for a file: name it in its "
                                                                 f"folder's row)")
            else:
                out["named in the table but not on disk"].append(f"{folder}/ (a row)")
            continue
        for name in sorted(named(cell)):
            if not ((root / folder / name).exists() or (root / name).exists()):
                out["named in the table but not on disk"].append(f"{folder}/{name}")
    return out


def _report(problems: dict[str, list[str]]) -> str:
    return "README.md's \"Layout\" table and the packages disagree:\n" + "\n".join(
        f"  {kind}:\n" + "\n".join(f"    {item}" for item in items) for kind, items in problems.items() if items)


def test_the_layout_table_lists_every_module_and_nothing_else():
    problems = disagreements((ROOT / "README.md").read_text())
    assert not any(problems.values()), _report(problems)


def test_the_packages_are_read_from_pyproject():
    folders = package_folders()
    assert folders["veil/privacy"] == "veil.privacy" and folders["lightning_modules/dp"] == "veil.lightning_modules.dp"
    assert folders["serve"] == "veil.serve" and folders["veil"] == "veil"
    assert "ledger.py" in modules(ROOT / "veil/privacy") and "__init__.py" not in modules(ROOT / "veil/privacy")
    assert "__init__.py" in modules(ROOT / "veil/cli")  # main() and the parser live there


def test_the_check_names_a_missing_module_an_extra_file_a_missing_row_and_a_wrong_import_name():
    readme = (ROOT / "README.md").read_text()
    rows = layout_rows(readme)
    privacy, serve = rows["veil/privacy"][1], rows["serve"][1]
    assert "`ledger.py`" in privacy and "`batcher.py`" in serve
    bad = readme.replace(privacy, privacy.replace("`ledger.py`", "`ledger`").replace(
        "`bounds.py`", "`bounds.py`, `gone.py`"), 1)
    lines = bad.splitlines()
    lines = [line for line in lines if not line.startswith("| `serve/` |")]
    bad = "\n".join(line.replace("| `veil.privacy` |", "| `veil.privacy.x` |") for line in lines)
    problems = disagreements(bad)
    assert problems["missing from the table (add each to its folder's row)"] == ["veil/privacy/ledger.py"]
    assert problems["named in the table but not on disk"] == ["veil/privacy/gone.py"]
    assert problems["package folders without a row"] == ["serve/"]
    assert problems["rows whose import name is not the installed one"] == [
        "veil/privacy/: the table says `veil.privacy.x`, installed as `veil.privacy`"]
    report = _report(problems)
    assert "veil/privacy/ledger.py" in report and "veil/privacy/gone.py" in report and "serve/" in report
