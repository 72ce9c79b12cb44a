"""Test-suite setup: the shared helper modules in ``tests/helpers/`` are importable from every test folder,
the ``single_thread`` fixture, the tiny exports (``models``, ``exports``), and the autouse ``veil_home`` fixture.

(Test folders have no ``__init__.py``, so helpers are uniquely named modules on ``sys.path``
rather than conftest files, which would shadow each other on ``from conftest import``.)
"""

import os
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when veil.kernels is first imported,
# and any test that trains (tests/bench included, which runs first) imports it: set it before any test
# module loads, not only in tests/kernels/conftest.py (run the compiled kernels with TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from export_models import exports, models  # noqa: E402,F401  (session fixtures: tests/export and tests/serve)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("single_thread")``):
    tiny convolutions on a shared 2-core machine spend more time with several threads waiting on one
    another than computing (measured 60x slower under load)."""
    from unlearn_helpers import one_thread

    with one_thread():
        yield


def pytest_configure(config):
    """Before any fixture (module-scoped ones too, which run before the per-test ``veil_home``):
    no test process, nor a subprocess it starts, may write to the real ``~/.veil``."""
    import os
    import tempfile

    config._veil_home = os.environ["VEIL_HOME"] = tempfile.mkdtemp(prefix="veil_home_session_")


def pytest_unconfigure(config):
    import shutil

    home = getattr(config, "_veil_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(autouse=True)
def veil_home(tmp_path_factory, monkeypatch):
    """A fresh, empty ``$VEIL_HOME`` for every test: the per-dataset privacy databases it writes never
    land in the real ``~/.veil`` (nor leak spends from one test into the next)."""
    home = tmp_path_factory.mktemp("veil_home")
    monkeypatch.setenv("VEIL_HOME", str(home))
    return home
