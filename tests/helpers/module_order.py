"""The order in which the suite hands its modules to the xdist workers (``sort_items``, called by
tests/conftest.py): first the modules that need no cached model, then those that read the cached tiny models and
exports (``CACHED`` fixtures; the prebuild beside the workers makes them meanwhile, so that on an empty cache no
worker waits on it); in each group the longest modules first (``tests/module_seconds.json``, from one run on the
2-core CPU: only their order matters; a module not in it counts half a second a test), so that the run ends on
short modules.

Refresh the table after adding or changing long tests::

    pytest -q -n 2 --dist loadscope --durations=0 > /tmp/durations.txt
    python tests/helpers/module_order.py /tmp/durations.txt
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

CACHED = {"models", "exports"}  # the session fixtures of tests/conftest.py (tests/helpers/export_models.py)
TABLE = Path(__file__).resolve().parents[1] / "module_seconds.json"
LINE = re.compile(r"^([\d.]+)s (?:call|setup|teardown)\s+(tests/\S+?\.py)::")


def parse(text: str) -> dict[str, float]:
    """module -> its summed setup, call and teardown seconds, from pytest's ``--durations=0`` report."""
    seconds: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            seconds[match.group(2)] += float(match.group(1))
    return {module: round(s, 1) for module, s in sorted(seconds.items())}


def load() -> dict[str, float]:
    return json.loads(TABLE.read_text()) if TABLE.is_file() else {}


def module_of(item) -> str:
    return item.nodeid.split("::")[0]


def uses_cache(item) -> bool:
    return bool(CACHED & set(getattr(item, "fixturenames", ())))


def sort_items(items: list) -> None:
    """Sort pytest's ``items`` in place by module (see the top); the order inside a module is kept."""
    count: dict[str, int] = collections.Counter(module_of(item) for item in items)
    cached = {module_of(item) for item in items if uses_cache(item)}
    seconds, first_seen = load(), {m: i for i, m in enumerate(count)}

    def key(item):
        module = module_of(item)
        return module in cached, -seconds.get(module, 0.5 * count[module]), first_seen[module]

    items.sort(key=key)  # stable


if __name__ == "__main__":
    table = parse(Path(sys.argv[1]).read_text())
    if not table:
        raise SystemExit(f"{sys.argv[1]}: no durations found (run pytest with --durations=0)")
    TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {TABLE}: {len(table)} modules, {sum(table.values()):.0f} s in all")
