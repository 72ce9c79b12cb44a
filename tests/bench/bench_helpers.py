"""Loads the bench scripts (they are scripts under bench/, not part of the installed package)."""

import importlib.util
from pathlib import Path


def load_bench(name: str):
    """The module of ``bench/<name>.py``."""
    path = Path(__file__).parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
