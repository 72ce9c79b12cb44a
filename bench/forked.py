"""A bench script's child runs (``main(argv)`` in a process of its own) forked from one forkserver that imported
the heavy modules once, instead of a new interpreter each (5-10 s of torch, Lightning, Opacus and diffusers
imports per run on a small CPU); ``fresh=True``: a new interpreter each (``python script argv``), as before.

    children = Children(preload=("torch", "lightning"), env={"TRITON_INTERPRET": "1"})
    proc = children.start(__file__, ["--one", "ghost:64:1"], stdout="out.txt", stderr="err.txt")
    rc = children.wait(proc, timeout=600)   # None: past the timeout, killed with its whole process group

Each run is still its own process (its own peak memory, its own CUDA context, its own session: killed with
the servers and subprocesses it started). A fork is only safe for CUDA while the forking process has no CUDA
context: none of the preloaded modules makes one on import (``torch.cuda.is_available()`` is asked through
NVML, ``PYTORCH_NVML_BASED_CUDA_CHECK``), and a child that finds CUDA initialised before its fork stops and
says so. ``env`` is set in this process's environment while the forkserver starts (it inherits it: Triton
reads ``TRITON_INTERPRET`` when a kernel is defined, at import) and put back once it runs.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Sequence


class Children:
    def __init__(self, *, preload: Sequence[str], env: dict[str, str] | None = None, fresh: bool = False):
        """Forked children: starts the forkserver now (it imports ``preload`` while this process goes on) with
        ``env`` added to this process's environment, which is then put back. One per process: Python has one
        forkserver, and a second Children reuses it, preload and environment included. ``fresh``: no
        forkserver; each child is a new interpreter with ``env`` added to its environment."""
        self.fresh, self.env = fresh, {"PYTORCH_NVML_BASED_CUDA_CHECK": "1", **(env or {})}
        if fresh:
            return
        import multiprocessing
        from multiprocessing import forkserver

        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([m for m in preload if importlib.util.find_spec(m.split(".")[0])])
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def start(self, script: str, argv: list[str], *, stdout: str, stderr: str | None = None, cwd: str | None = None):
        """``script``'s ``main(argv)`` in a child of its own session, its output appended to ``stdout`` (and
        ``stderr``, or the same file)."""
        if self.fresh:
            with open(stdout, "ab") as out, open(stderr or stdout, "ab") as err:
                return subprocess.Popen([sys.executable, str(script), *argv], cwd=cwd, env={**os.environ, **self.env},
                                        stdout=out, stderr=err, start_new_session=True)
        proc = self.ctx.Process(target=_child, args=(str(script), list(argv), str(stdout), str(stderr or stdout),
                                                     cwd or os.getcwd()), name=f"{os.path.basename(script)} child")
        proc.start()
        return proc

    @staticmethod
    def wait(proc, timeout: float | None = None) -> int | None:
        """The child's exit status, or None past ``timeout`` seconds (then it and its process group are killed)."""
        if isinstance(proc, subprocess.Popen):
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            proc.join(timeout)
            if proc.exitcode is not None:
                return proc.exitcode
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its session: a fresh child's from Popen, a forked one's setsid()
        except ProcessLookupError:
            pass
        proc.kill()
        (proc.wait if isinstance(proc, subprocess.Popen) else proc.join)()
        return None


def _child(script: str, argv: list[str], stdout: str, stderr: str, cwd: str) -> None:
    os.setsid()
    for fd, path in ((1, stdout), (2, stderr)):
        f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own, line-buffered
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.chdir(cwd)
    import torch

    if torch.cuda._is_in_bad_fork():  # the forkserver made a CUDA context: nothing CUDA works in this fork
        raise SystemExit("CUDA was initialised before the fork (a preloaded module touched it): run the script "
                         "with --fresh-processes")
    spec = importlib.util.spec_from_file_location("__forked_main__", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(script))  # as when the script runs itself
    spec.loader.exec_module(module)
    module.main(argv)
