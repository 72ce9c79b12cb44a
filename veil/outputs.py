"""Writing outputs safely: refuse a bad or used ``--out`` up front, write files atomically, and leave
no half-written folder behind when a command fails.

    out = check_out_dir(args.out, holds=("model", "privacy.json"), force=args.force)  # before any work
    write_json_atomic(out / "report.json", report)                                    # strict JSON
    with staged_dir(out / "revision") as tmp:                                         # all or nothing
        ... write into tmp ...
    # tmp is renamed to out/revision on success, removed on any exception

Plain stdlib (no torch): every command uses it, the torch-free ones included.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from veil.errors import ConfigError

__all__ = ["check_out_dir", "write_text_atomic", "write_json_atomic", "staged_dir", "dumps_strict"]


def check_out_dir(out, *, flag: str = "--out", holds: Iterable[str] = (), force: bool = False) -> Path:
    """``out`` as a Path, checked before any work: not a file, creatable and writable, and (unless
    ``force``) holding none of ``holds`` (the names this command writes there). ConfigError naming
    ``flag`` otherwise. Creates the folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: is a file, not a folder; choose a folder path")
    used = [name for name in holds if (out / name).exists()]
    if used and not force:
        raise ConfigError(f"{flag} {out}: already holds {', '.join(used)}; choose another {flag} "
                          "(or pass --force to replace them)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".veil-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {out}: cannot write there ({e.strerror or e}); choose a folder you can write") from None
    return out


def dumps_strict(obj: Any, **kwargs) -> str:
    """json.dumps that refuses NaN and infinities (they are not JSON): ValueError names the problem."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path, obj: Any, *, indent: int = 2) -> Path:
    """Strict JSON (no NaN/Infinity), written atomically."""
    return write_text_atomic(path, dumps_strict(obj, indent=indent) + "\n")


@contextmanager
def staged_dir(final, *, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``final``, renamed to ``final`` when the block succeeds and removed
    when it raises (KeyboardInterrupt included). ``replace``: an existing ``final`` is swapped out."""
    final = Path(final)
    if final.exists() and not replace:
        raise ConfigError(f"{final} already exists; choose another --out (or --force)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
