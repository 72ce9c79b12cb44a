"""Test-suite setup: the shared helper modules in ``tests/helpers/`` are importable from every test folder.

(Test folders have no ``__init__.py``, so helpers are uniquely named modules on ``sys.path``
rather than conftest files, which would shadow each other on ``from conftest import``.)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
