"""bench/code_walk.py: the counting on a walk made up here, imports left out, and the HTTP accept walk on the
tests' tiny conditional export (in this process, and through the script on a copy of this checkout)."""

import sys
import textwrap
from pathlib import Path

import pytest
from bench_helpers import load_bench

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def walk():
    return load_bench("code_walk")


def test_repeats_collapse_and_switches_count_package_changes(walk):
    files = ["veil/cli/edit.py", "veil/cli/edit.py", "veil/jobs/edit.py", "lightning_modules/editing/editor.py",
             "lightning_modules/editing/editor.py", "veil/editing/plan.py", "serve/app.py", "veil/jobs/edit.py"]
    s = walk.summarize(files)
    assert s["sequence"] == ["veil/cli/edit.py", "veil/jobs/edit.py", "lightning_modules/editing/editor.py",
                             "veil/editing/plan.py", "serve/app.py", "veil/jobs/edit.py"]
    assert (s["files"], s["switches"], s["steps"]) == (5, 4, 6)  # veil > lightning_modules > veil > serve > veil
    assert s["packages"] == ["lightning_modules", "serve", "veil"]
    assert walk.summarize([]) == {"files": 0, "switches": 0, "steps": 0, "packages": [], "sequence": []}


def test_the_recorder_maps_files_to_packages_and_leaves_imports_out(walk, tmp_path, monkeypatch):
    """Two folders standing for two packages: calls are recorded in order, a module body run by an import
    (and what it calls) is not, nor is anything outside the folders."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (b / "cw_callee.py").write_text("def inner():\n    return 1\n")
    (b / "cw_imported_late.py").write_text(textwrap.dedent("""
        import cw_callee
        cw_callee.inner()  # runs at import: not the command's work

        def late():
            return cw_callee.inner()
    """))
    (a / "cw_caller.py").write_text(textwrap.dedent("""
        import json
        import cw_callee

        def outer():
            json.dumps({})  # not a repository file
            import cw_imported_late
            return cw_callee.inner() + cw_imported_late.late() + helper()

        def helper():
            return 1
    """))
    monkeypatch.syspath_prepend(str(a))
    monkeypatch.syspath_prepend(str(b))
    for name in ("cw_callee", "cw_imported_late", "cw_caller"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import cw_caller

    result, s = walk.record(cw_caller.outer, {a.resolve(): "veil", b.resolve(): "serve"})
    assert result == 3
    assert s["sequence"] == ["veil/cw_caller.py", "serve/cw_callee.py", "serve/cw_imported_late.py",
                             "serve/cw_callee.py", "veil/cw_caller.py"]
    assert (s["files"], s["switches"]) == (3, 2)
    assert sys.getprofile() is None  # the hook is removed


def test_the_accept_walk_on_the_tiny_export(walk, exports, tmp_path):
    r = walk.walk_accept(ROOT, tmp_path, exports / "conditional")
    assert r["decision"] in ("accepted", "refused")
    assert r["files"] > 0 and r["switches"] > 0 and r["steps"] >= r["files"]
    assert {"serve", "veil"} <= set(r["packages"]) and "serve/app.py" in r["sequence"]
    assert any(f.startswith("veil/privacy/") for f in r["sequence"])  # the release reaches the ledger
    table = walk.table({"here": {"accept": r}})
    assert f"| HTTP accept (veil serve) | here | {r['files']} | {r['switches']} | {r['steps']} |" in table


def test_the_script_walks_a_copy_of_a_checkout(walk, exports, tmp_path, capsys):
    """--tree: the checkout copied into an installed layout, walked in a child process that imports it."""
    measured = walk.main(["--tree", str(ROOT), "--only-trees", "--walks", "accept",
                          "--export", str(exports / "conditional"), "--work", str(tmp_path)])
    (label, results), = measured.items()
    assert label == str(ROOT) and results["accept"]["files"] > 0 and results["accept"]["switches"] > 0
    assert (tmp_path / "t0" / "layout" / "veil" / "lightning_modules" / "diffusion" / "ddim.py").exists()
    out = capsys.readouterr().out
    assert "| walk | checkout | files | switches | steps |" in out and f"| HTTP accept (veil serve) | {label} |" in out
