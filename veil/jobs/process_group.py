"""A process group lives only as long as the job that made it.

Lightning's DDP strategy makes a torch.distributed (gloo on CPU) process group and never destroys
it, so gloo's worker threads run on into interpreter teardown; one of them releasing the last
reference to a collective's tensor then needs the GIL, CPython ends the thread with
``pthread_exit``, and the forced unwind through a ``noexcept`` destructor aborts the process
(SIGABRT, "terminate called without an active exception"), after all work was done. That is what
the unlearning job's two-process test hit now and then (``lightning_modules/unlearning_module.py`` tells the whole
story). ``owned_process_group`` destroys, when the job ends, a group that was made inside it, and
warns if something still holds the group (then its threads live on anyway): import
``torch.distributed.nn`` before a group exists, since its functions bind ``group.WORLD`` as default
arguments when imported.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  imported before any group exists, so it holds none


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def owned_process_group():
    """Destroy on exit a process group made inside the block (one made before, by torchrun or a
    script, is its maker's and is left alone)."""
    had_group = _initialized()
    try:
        yield
    finally:
        if not had_group and _initialized():
            group = weakref.ref(dist.group.WORLD)
            dist.destroy_process_group()
            if group() is not None:
                warnings.warn("the process group outlived destroy_process_group (was torch.distributed.nn imported "
                              "after it was made?); the process may abort at exit", RuntimeWarning, stacklevel=3)
