"""Test-suite setup: the shared helper modules in ``tests/helpers/`` are importable from every test folder,
and the ``single_thread`` fixture.

(Test folders have no ``__init__.py``, so helpers are uniquely named modules on ``sys.path``
rather than conftest files, which would shadow each other on ``from conftest import``.)
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("single_thread")``):
    tiny convolutions on a shared 2-core machine spend more time with several threads waiting on one
    another than computing (measured 60x slower under load)."""
    from unlearn_helpers import one_thread

    with one_thread():
        yield
