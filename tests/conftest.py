"""Test-suite setup: the shared helper modules in ``tests/helpers/`` are importable from every test folder,
the ``single_thread`` fixture, the tiny models and exports (``models``, ``exports``), and the autouse ``veil_home``
fixture.

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
# One torch (OpenMP) thread in every test process, the xdist workers and every subprocess a test starts (they
# inherit it): the two workers already fill the two cores, and a second thread per process spin-waits against the
# other worker (a 3 s training test took 20 s beside the other worker with two threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "helpers"))


# The session fixtures of the cached tiny models and exports (tests/helpers/export_models.py), imported when a test
# first asks for them: the xdist controller and `pytest tests/kernels` (bench/gpu_check.py's tests part) then never
# import Lightning (~4 s of CPU each).
@pytest.fixture(scope="session")
def models():
    """``build_models``' folder (unet, guide, judge, cond), cached."""
    from export_models import cached_models

    return cached_models()


@pytest.fixture(scope="session")
def exports(models):
    """``build_exports``' folder (guided, conditional), cached."""
    from export_models import cached_exports

    return cached_exports()


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
    no test process, nor a subprocess it starts, may write to the real ``~/.veil``. Under pytest-xdist
    (``-n 2``, what ``make test`` runs) the controller also starts building the cached tiny models and exports
    (tests/helpers/export_models.py) beside the workers, so that no worker sits waiting for that build."""
    import subprocess
    import tempfile

    config._veil_home = os.environ["VEIL_HOME"] = tempfile.mkdtemp(prefix="veil_home_session_")
    # `veil export`'s graph cache (veil.export.graph_cache, keyed by the captured graph: sound across source
    # changes) beside the other cached test artifacts, never the real ~/.cache/veil; with VEIL_TEST_CACHE=off, one
    # per session (every graph translated once per run). Shared by the workers and every subprocess (inherited).
    from disk_cache import cache_root

    root = cache_root()
    os.environ["VEIL_EXPORT_CACHE"] = str(root / "onnx-graphs" if root else Path(config._veil_home) / "onnx-graphs")
    if hasattr(config.option, "loadscopereorder"):  # xdist would otherwise re-sort the modules by test count,
        config.option.loadscopereorder = False        # putting the long few-test modules last (the run's tail)
    config._prebuild = None
    workers = getattr(config.option, "numprocesses", None)
    if workers and not hasattr(config, "workerinput") and _cache_on():
        log = open(Path(config._veil_home) / "prebuild.log", "w")
        config._prebuild = (subprocess.Popen([sys.executable, str(Path(__file__).parent / "helpers" /
                                                                  "export_models.py")],
                                             stdout=log, stderr=subprocess.STDOUT), log)


# Minutes-long end-to-end tests: in CI and `make test` like every other test; `make test-quick` leaves them out
# while developing (each is the only test of what it runs end to end: never drop them from CI).
HEAVY = (  # the end-to-end tests of 10 s or more here (tests/module_seconds.json), left out by `make test-quick`
    "tests/veil/demo/test_demo.py::",
    "tests/bench/test_unlearning_bench.py::",
    "tests/bench/test_gpu_check.py::test_smoke_runs_every_part",
    "tests/bench/test_edit_eval.py::test_end_to_end",
    "tests/bench/test_serve_bench.py::test_serve_bench_measures_both_modes",
    "tests/veil/jobs/test_train_diffusion.py::test_ddp_two_processes",
    "tests/lightning_modules/unlearning/test_unlearning.py::test_two_gloo_processes",
    "tests/lightning_modules/editing/test_label_free_any_attributes.py::test_the_export_of_a_label_free_unet",
    "tests/serve/test_replicas.py::test_replicas_share_one_ledger",
    "tests/serve/test_e2e.py::test_release_survives_sigkill_mid_burst",
    "tests/veil/test_packaging.py::",
    "tests/veil/test_readme_commands.py::",
    "tests/veil/test_own_photos_walkthrough.py::test_the_own_photos_block",
    "tests/veil/test_python_api.py::test_the_readme_block_runs",
)


def pytest_collection_modifyitems(config, items):
    """Mark ``HEAVY`` tests ``heavy``; run the modules in ``module_order.sort_items``' order (no cached model
    first, then the modules that read one; the longest first in each)."""
    from module_order import sort_items

    for item in items:
        if item.nodeid.startswith(HEAVY):
            item.add_marker(pytest.mark.heavy)
    sort_items(items)


def _cache_on() -> bool:
    from disk_cache import cache_root

    return cache_root() is not None


def pytest_sessionfinish(session, exitstatus):
    """A test that wrote into a cached model or export (shared by every later run) fails the session."""
    from disk_cache import changed_since_built

    changed = changed_since_built()
    if changed:
        session.config.get_terminal_writer().line(
            "tests wrote into the cached test models (copy them before writing): " + ", ".join(map(str, changed)),
            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    import shutil

    prebuild = getattr(config, "_prebuild", None)
    if prebuild is not None:
        process, log = prebuild
        if process.poll() is None:
            process.terminate()  # a session that ended early: the half-built folder is redone next time
            process.wait(timeout=60)
        log.close()
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
