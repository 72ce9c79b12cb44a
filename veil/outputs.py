"""Writing outputs safely: refuse a bad or used ``--out`` up front, write files atomically, and leave
no half-written folder behind when a command fails.

    out = check_out_dir(args.out, holds=("model", "report.json"), force=args.force)  # before any work
    with staged_dir(out, ["model", "report.json"], replace=args.force) as stage:     # all or nothing
        ... write stage / "model", stage / "report.json" ...
    # on success both are moved into OUT; on any exception (Ctrl-C included) nothing is

Every command that writes a ``--out`` folder goes through ``staged_dir``, in one of two ways:

* staged (edit, sweep, export, unlearn, the demo's stages): the files are written into a hidden
  folder inside OUT and moved into OUT by name (renames in one file system), all or none, when the
  block succeeds. A job that must move them at a moment of its own (the edit job: inside its ledger
  transaction, so that no release is recorded without its files) calls ``publish`` inside the block
  and ``unpublish`` if what follows fails.
* in place (training: ``--resume`` finds its checkpoint in OUT): nothing is staged; when the block
  fails, what the run created in OUT is removed, unless ``keep()`` says the run is worth keeping.

Either way a failed command leaves OUT as it found it, and removes OUT if it created it.
The commands that run long and record a spend (train, train-classifier, unlearn) also hold ``out_lock``
for the whole run: a second run into the same OUT is refused at once rather than trained twice.
Plain stdlib (no torch): every command uses it, the torch-free ones included.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from veil.errors import ConfigError, DataError

__all__ = ["check_out_dir", "write_text_atomic", "write_json_atomic", "dumps_strict", "staged_dir", "publish",
           "unpublish", "remove_if_empty", "out_lock", "OutLock", "LOCK_FILE"]

REPLACED = ".replaced"  # inside a staging folder: the entries a --force run replaced, until it succeeds


def check_out_dir(out, *, flag: str = "--out", holds: Iterable[str] = (), force: bool = False) -> Path:
    """``out`` as a Path, checked before any work: not a file, creatable and writable, and (unless
    ``force``) holding none of ``holds`` (the names this command writes there). ConfigError naming
    ``flag`` otherwise. Creates the folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file, not a folder; choose a folder path", option=flag)
    used = [name for name in holds if (out / name).exists()]
    if used and not force:
        raise ConfigError(f"{out}: already holds {', '.join(used)}; choose another {flag} "
                          "(or pass --force to replace them)", option=flag)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".veil-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{out}: cannot write there ({e.strerror or e}); choose a folder you can write",
                          option=flag) from None
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


# ------------------------------------------------------------------------ the one staging helper
def _never() -> bool:
    return False


@contextmanager
def staged_dir(out, names: Sequence[str] = (), *, in_place: bool = False, created: bool | None = None,
               replace: bool = False, keep: Callable[[], bool] = _never, prefix: str = ".veil-stage-",
               flag: str = "--out", unwritten: str = "nothing was written") -> Iterator[Path]:
    """The folder a command writes its results into, all or nothing; it yields the folder to write into.

    Staged (the default): a new hidden folder inside ``out`` (``prefix``...); when the block succeeds the
    entries ``names`` (paths relative to it, in order: put the one that marks the result complete last)
    are moved into ``out`` (``publish``; ``replace``: an existing entry is replaced, as ``--force`` asks)
    and the staging folder is removed. ``names`` empty: the block calls ``publish`` itself.
    ``in_place``: nothing is staged, the block writes into ``out`` itself (yielded).

    When the block raises (KeyboardInterrupt included): the staging folder is removed with everything in
    it (and, in place, every entry the block created in ``out``), then ``out`` itself if this command
    created it (``created``: default, whether it did not exist on entry) and nothing else is left in it;
    ``keep()`` true keeps what the block created in ``out`` (a training run with a checkpoint to resume;
    a DDP rank other than 0, which leaves the folder to rank 0). DataError naming ``flag`` (and saying
    ``unwritten``) when the staging folder cannot be made."""
    out = Path(out)
    created = not out.exists() if created is None else created
    if in_place:
        with _removed_on_failure(out, created=created, keep=keep):
            yield out
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out, prefix=prefix))
    except OSError as e:
        raise DataError(f"{flag} {out}: cannot write there ({e.strerror or e}); {unwritten}") from None
    try:
        yield stage
        if names:
            publish(stage, out, names, replace=replace, flag=flag)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not keep():
            remove_if_empty(out)
        raise
    shutil.rmtree(stage, ignore_errors=True)  # with the entries a --force run replaced


@contextmanager
def _removed_on_failure(out: Path, *, created: bool, keep: Callable[[], bool]) -> Iterator[None]:
    before = set(os.listdir(out)) if out.is_dir() and not created else set()
    try:
        yield
    except BaseException:
        if out.is_dir() and not keep():
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                unpublish(out, sorted(set(os.listdir(out)) - before))
        raise


def publish(stage, out, names: Sequence[str], *, replace: bool = False, flag: str = "--out",
            unwritten: str = "nothing was written") -> None:
    """Move the entries ``names`` (relative paths, in order) from the staging folder ``stage`` into ``out``:
    renames inside one folder, all or none of them (a failure moves back the ones already moved). An entry
    that exists in ``out`` is replaced when ``replace`` (kept in the staging folder until it is removed, put
    back on failure), else refused: ConfigError naming ``flag`` (it appeared after the --out check)."""
    stage, out = Path(stage), Path(out)
    moved, aside = [], []
    try:
        for name in names:
            target = out / name
            if target.exists() or target.is_symlink():
                if not replace:
                    raise ConfigError(f"{out}: {name} appeared while veil was working; {unwritten}", option=flag)
                (stage / REPLACED / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, stage / REPLACED / name)
                aside.append(name)
            os.replace(stage / name, target)
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            os.replace(out / name, stage / name)
        for name in reversed(aside):
            os.replace(stage / REPLACED / name, out / name)
        raise


def unpublish(out, names: Sequence[str]) -> None:
    """Remove the entries ``names`` from ``out`` (what a publish moved there, when what followed failed)."""
    for name in names:
        path = Path(out) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def remove_if_empty(folder) -> None:
    """Remove ``folder`` if it is empty (a folder this command created and nothing else wrote into)."""
    try:
        Path(folder).rmdir()
    except OSError:
        pass


# ------------------------------------------------------------------------ one run at a time per --out
LOCK_FILE = ".veil-lock"  # inside OUT while a run holds it; never an output (no "already holds" check names it)


@dataclass(frozen=True)
class OutLock:
    """What ``out_lock`` yields: the locked folder and whether ``out_lock`` created it (None: not locked here,
    ``skip``), to pass to ``staged_dir(created=...)`` so that a failed run still removes a folder it made."""

    folder: Path
    created: bool | None


@contextmanager
def out_lock(out, *, flag: str = "--out", skip: bool = False) -> Iterator[OutLock]:
    """Hold an exclusive lock on the folder ``out`` for the whole block: one veil run at a time writes into it.

    The lock is ``fcntl.flock`` on ``OUT/.veil-lock`` (created, 0600, holding the holder's pid), taken without
    waiting: when another process holds it, ConfigError naming ``flag`` at once, before any work, and nothing
    of ``out`` is touched. The kernel drops the lock when the holder exits or crashes; the file is removed
    when the block ends (on success and on failure), so it is never mistaken for a result. Take it *before*
    checking whether ``out`` holds an earlier run's results (else two runs could both pass the check) and
    outside ``staged_dir`` (so a refused run's cleanup cannot remove what the running one wrote):

        with out_lock(out, skip=other_rank()) as lock, staged_dir(out, in_place=True, created=lock.created):
            check_out_dir(out, holds=..., force=...)
            ...

    Creates ``out`` (and removes it again if the block fails and leaves it empty). ``skip``: take no lock
    (a DDP rank other than 0, started by the rank that holds it); also where ``fcntl`` does not exist."""
    out = Path(out)
    try:
        import fcntl
    except ImportError:  # not POSIX: no flock, no lock
        fcntl = None
    if skip or fcntl is None:
        yield OutLock(out, None)
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file, not a folder; choose a folder path", option=flag)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # under a file, unwritable
        raise ConfigError(f"{out}: cannot write there ({e.strerror or e}); choose a folder you can write",
                          option=flag) from None
    try:
        fd = _lock(out / LOCK_FILE, fcntl, flag=flag)
    except BaseException:
        if created:
            remove_if_empty(out)
        raise
    try:
        yield OutLock(out, created)
    except BaseException:
        _unlock(fd, out / LOCK_FILE)
        if created:
            remove_if_empty(out)
        raise
    _unlock(fd, out / LOCK_FILE)


def _lock(path: Path, fcntl, *, flag: str) -> int:
    """An open descriptor of ``path`` holding its exclusive flock; ConfigError if another process holds it."""
    for _ in range(8):  # a holder that ends removes the file: lock the one that is there now
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError(f"{path.parent}: cannot write there ({e.strerror or e}); choose a folder you can write",
                              option=flag) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(f"{path.parent}: another veil run is writing into this folder (process "
                              f"{holder or 'unknown'} holds {path}); wait for it to end, or choose another {flag}",
                              option=flag) from None
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"{path.parent}: cannot lock {path} ({e.strerror or e}); choose a folder on a local "
                              "file system", option=flag) from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the file we locked was removed by the run that held it
    raise ConfigError(f"{path.parent}: could not lock {path} (other runs keep taking it); try again, or choose "
                      f"another {flag}", option=flag)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _unlock(fd: int, path: Path) -> None:
    """Remove the lock file (only if it is still ours: a failed run may have removed its folder meanwhile),
    then close it, which releases the lock."""
    try:
        if _same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)
