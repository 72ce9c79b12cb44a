"""The order the suite hands its modules to the xdist workers (tests/helpers/module_order.py): the modules that
read the cached models last, the longest first within each group."""

import json
from pathlib import Path

import module_order

ROOT = Path(__file__).resolve().parents[2]


def test_durations_report_is_summed_per_module():
    text = """============================= slowest durations ==============================
12.50s call     tests/bench/test_a.py::test_one[x-1]
0.50s setup    tests/bench/test_a.py::test_one[x-1]
3.00s call     tests/veil/test_b.py::TestThing::test_two
0.25s teardown tests/bench/test_a.py::test_three
(12 durations < 0.005s hidden.  Use -vv to show these durations.)
"""
    assert module_order.parse(text) == {"tests/bench/test_a.py": 13.2, "tests/veil/test_b.py": 3.0}


def test_the_table_names_test_modules_that_exist():
    table = json.loads(module_order.TABLE.read_text())
    assert len(table) > 50 and all(s >= 0 for s in table.values())
    missing = [m for m in table if not (ROOT / m).is_file()]
    assert not missing, f"tests/module_order.json names modules that are gone (refresh it): {missing}"


class _Item:
    def __init__(self, nodeid, fixturenames=()):
        self.nodeid, self.fixturenames = nodeid, fixturenames


def test_modules_without_cached_models_first_then_the_longest_first_in_each_group(monkeypatch):
    monkeypatch.setattr(module_order, "load", lambda: {"tests/a.py": 5.0, "tests/b.py": 50.0, "tests/c.py": 20.0,
                                                      "tests/d.py": 1.0})
    items = [_Item("tests/a.py::t1"), _Item("tests/c.py::t1", ("exports",)), _Item("tests/a.py::t2"),
             _Item("tests/d.py::t1", ("models", "tmp_path")), _Item("tests/b.py::t1"), _Item("tests/c.py::t2"),
             _Item("tests/new.py::t1"), _Item("tests/new.py::t2")]  # not in the table: 2 tests, 1 s
    module_order.sort_items(items)
    assert [i.nodeid for i in items] == ["tests/b.py::t1", "tests/a.py::t1", "tests/a.py::t2", "tests/new.py::t1",
                                         "tests/new.py::t2", "tests/c.py::t1", "tests/c.py::t2", "tests/d.py::t1"]


def test_xdist_keeps_the_order(request):
    """pytest-xdist's loadscope re-sorts modules by their number of tests unless told not to (tests/conftest.py)."""
    if hasattr(request.config.option, "loadscopereorder"):
        assert request.config.option.loadscopereorder is False


def test_every_heavy_entry_names_a_test_that_exists():
    """conftest's HEAVY prefixes (what `make test-quick` leaves out) name existing modules and test functions: a
    renamed or merged test would otherwise silently come back into the quick subset."""
    import ast
    import re

    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text())  # read, not imported: tests/ has 3 conftests
    heavy = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["HEAVY"])
    assert len(heavy) > 5 and len(heavy) == len(set(heavy))
    for entry in heavy:
        module, _, name = entry.partition("::")
        assert (ROOT / module).is_file(), entry
        if name:
            assert re.search(rf"^def {re.escape(name)}", (ROOT / module).read_text(), re.M), entry
