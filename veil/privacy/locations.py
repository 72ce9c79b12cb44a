"""Which privacy database belongs to which dataset: one per dataset, under ``$VEIL_HOME/datasets``.

``ledger_path_for(spec)`` is ``$VEIL_HOME/datasets/<slug>.sqlite`` (VEIL_HOME defaults to
``~/.veil``): ``synthetic-seed<N>`` for the synthetic faces (image i depends only on (seed, i)),
``<source>-<folder name>-<12 hex of sha256(resolved root)>`` for CelebA and folders. A moved folder
gets a new database: pass the old one explicitly (``--ledger``). Plain stdlib.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Mapping

from veil.errors import ConfigError

__all__ = ["veil_home", "dataset_slug", "ledger_path_for"]


def veil_home() -> Path:
    """``$VEIL_HOME``, or ``~/.veil``: where the per-dataset privacy databases live."""
    return Path(os.environ.get("VEIL_HOME") or "~/.veil").expanduser()


def dataset_slug(data_spec: Mapping) -> str:
    """The database name of a dataset: which images of which source it is (see the module docstring)."""
    source = data_spec.get("source") if isinstance(data_spec, Mapping) else None
    if source == "synthetic":
        seed = data_spec.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f": synthetic faces are located by their generator seed, got seed={seed!r}; "
                              f"give it, e.g. source=synthetic,seed=0", option="--data")
        return f"synthetic-seed{seed}"
    if source in ("celeba", "folder"):
        if not data_spec.get("root"):
            raise ConfigError(f": a {source} dataset is located by its folder; give root=PATH", option="--data")
        root = Path(str(data_spec["root"])).expanduser().resolve()
        name = re.sub(r"[^A-Za-z0-9._-]", "_", root.name).strip("._") or "root"
        return f"{source}-{name}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"
    raise ConfigError(f": source={source!r}: a privacy database belongs to a located dataset "
                      f"(source=synthetic,seed=N | source=celeba,root=PATH | source=folder,root=PATH)", option="--data")


def ledger_path_for(data_spec: dict) -> Path:
    """``$VEIL_HOME/datasets/<slug>.sqlite``: the one privacy database of the dataset ``data_spec`` names."""
    return veil_home() / "datasets" / f"{dataset_slug(data_spec)}.sqlite"
