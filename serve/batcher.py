"""Micro-batching of preview edits: concurrent requests gathered for a few milliseconds into one ONNX Runtime batch.

    batcher = MicroBatcher(editor, max_wait_ms=5, max_rows=64, max_queue=64, batching=True, preview_every=2)
    await batcher.start()
    job = batcher.submit_preview(PreviewJob(image=x, original=a, targets=T, strength=0.55, encoding="noise",
                                            protected=("smiling",)))       # Overloaded when the queue is full
    async for event in job.events():   # ("step", k, n, [png, ...]) every few steps, then ("final", images)
        ...
    image = await batcher.run_exclusive(lambda: editor(...))   # an accept's checked edit, in the same line
    await batcher.stop()

One worker thread runs every ONNX Runtime call, so the event loop never blocks on a model and ORT's own
intra-op threads have the cores. The loop task takes the first waiting job, then waits up to
``max_wait_ms`` for more while the batch has fewer than ``max_rows`` rows (none when ``batching`` is
off: one request at a time, the benchmark's baseline), and hands the batch to the worker. Inside a
batch, jobs with the same (strength, encoding, protected) share one walk down the DDIM grid: each job's
image is encoded once (its candidates differ only in their targets), the rows are concatenated, and
``OrtEditor.regenerate`` calls back after every step with the predicted clean images, which are split
back per job (``max_rows`` never exceeds the editor's chunk, so one callback holds the whole batch).

Overload: at most ``max_queue`` jobs wait; beyond that ``submit_*`` raises ``Overloaded`` at once with
a Retry-After estimate (the server answers 503), so a burst is shed instead of piling up latency.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from veil.errors import ConfigError, VeilError
from veil.serve.images import data_url, png_bytes

__all__ = ["MicroBatcher", "PreviewJob", "Overloaded"]


class Overloaded(VeilError):
    """The preview queue is full; ``retry_after`` (seconds) is when to try again."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class PreviewJob:
    """One preview request: ``image`` (3,H,W), its attributes ``original`` (k,), ``targets`` (n,k), one per candidate."""

    image: np.ndarray
    original: np.ndarray
    targets: np.ndarray
    strength: float
    encoding: str
    protected: tuple[str, ...]
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return int(self.targets.shape[0])

    @property
    def key(self) -> tuple:
        return (self.strength, self.encoding, self.protected)

    def _emit(self, event: tuple) -> None:  # from the worker thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self):
        """("step", k, n, [data URL per candidate]) ..., then ("final", images (n,3,H,W)); raises a failed edit's error."""
        while True:
            event = await self._queue.get()
            if event[0] == "error":
                raise event[1]
            yield event
            if event[0] == "final":
                return


@dataclass
class _Exclusive:
    fn: Callable[[], Any]
    future: asyncio.Future
    rows: int = 1
    key: tuple = ("exclusive",)
    cancelled: bool = False


class MicroBatcher:
    """See the module docstring. ``observe(rows, jobs, seconds)`` is called after each batch (metrics)."""

    def __init__(self, editor, *, max_wait_ms: float = 5.0, max_rows: int | None = None, max_queue: int = 64,
                 batching: bool = True, preview_every: int = 2,
                 observe: Callable[[int, int, float], None] | None = None):
        if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms) and 0 <= max_wait_ms <= 1000):
            raise ConfigError(f"={max_wait_ms!r}: must be a number of milliseconds in [0, 1000]",
                              option="--max-wait-ms")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigError(f"={max_queue!r}: must be a whole number >= 1", option="--max-queue")
        if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 1:
            raise ConfigError(f"={preview_every!r}: must be a whole number >= 1", option="--preview-every")
        self.editor = editor
        self.max_rows = int(min(max_rows or editor.batch_size, editor.batch_size))
        self.max_wait_s, self.max_queue, self.batching = max_wait_ms / 1000.0, max_queue, bool(batching)
        self.preview_every, self.observe = preview_every, observe
        self._pending: deque = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="veil-ort")
        self._last_batch_s = 0.5  # for Retry-After, until a batch has been timed

    # -- the queue ------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="veil-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in self._pending:
            self._fail(item, Overloaded("the server is shutting down; retry on another replica", 1))
        self._pending.clear()
        self._executor.shutdown(wait=True)

    def _admit(self, item) -> None:
        if self._task is None or self._task.done():
            raise Overloaded("the preview worker is not running; retry shortly", 1)
        if len(self._pending) >= self.max_queue:
            wait = max(1, math.ceil(self._last_batch_s * len(self._pending) / max(1, self.max_rows)))
            raise Overloaded(f"{len(self._pending)} requests are waiting (the limit is {self.max_queue}); "
                             f"retry in {wait} s", wait)
        self._pending.append(item)
        self._wake.set()

    def submit_preview(self, job: PreviewJob) -> PreviewJob:
        if job.rows > self.max_rows:
            raise ConfigError(f"n={job.rows}: at most {self.max_rows} candidates per preview")
        job._loop, job._queue = asyncio.get_running_loop(), asyncio.Queue()
        self._admit(job)
        return job

    async def run_exclusive(self, fn: Callable[[], Any]):
        """Run ``fn`` (an accept's edit) on the worker, alone, in queue order; Overloaded when the queue is full."""
        item = _Exclusive(fn, asyncio.get_running_loop().create_future())
        self._admit(item)
        return await item.future

    # -- the loop task --------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = [self._pending.popleft()]
            if self.batching and not isinstance(batch[0], _Exclusive):
                deadline = loop.time() + self.max_wait_s
                rows = batch[0].rows
                while rows < self.max_rows:
                    if not self._pending:
                        left = deadline - loop.time()
                        if left <= 0:
                            break
                        self._wake.clear()
                        try:
                            await asyncio.wait_for(self._wake.wait(), left)
                        except asyncio.TimeoutError:
                            break
                        continue
                    nxt = self._pending[0]
                    if isinstance(nxt, _Exclusive) or rows + nxt.rows > self.max_rows:
                        break
                    batch.append(self._pending.popleft())
                    rows += nxt.rows
            batch = [item for item in batch if not item.cancelled]
            if not batch:
                continue
            started = time.perf_counter()
            if isinstance(batch[0], _Exclusive):
                item = batch[0]
                try:
                    result = await loop.run_in_executor(self._executor, item.fn)
                    if not item.future.done():
                        item.future.set_result(result)
                except Exception as e:  # noqa: BLE001 - handed to the request that asked
                    if not item.future.done():
                        item.future.set_exception(e)
            else:
                await loop.run_in_executor(self._executor, self._previews, batch)
            seconds = time.perf_counter() - started
            self._last_batch_s = 0.8 * self._last_batch_s + 0.2 * seconds
            if self.observe is not None:
                self.observe(sum(item.rows for item in batch), len(batch), seconds)

    # -- the worker thread ----------------------------------------------------------------------------
    def _previews(self, batch: Sequence[PreviewJob]) -> None:
        groups: dict[tuple, list[PreviewJob]] = {}
        for job in batch:
            groups.setdefault(job.key, []).append(job)
        for jobs in groups.values():
            try:
                self._group(jobs)
            except Exception as e:  # noqa: BLE001 - every job of the group is told
                for job in jobs:
                    job._emit(("error", e))

    def _group(self, jobs: Sequence[PreviewJob]) -> None:
        ed = self.editor
        strength, encoding, protected = jobs[0].key
        # 1. encode each job's image once (its candidates share x_t0; they differ in their targets)
        images = np.stack([job.image for job in jobs]).astype(np.float32)  # (J,3,H,W)
        originals = np.stack([job.original for job in jobs]).astype(np.float32)  # (J,k)
        a_inv = ed.inversion_attributes(originals, protected=list(protected))
        x_t0 = ed.encode(images, a_inv, strength=strength, protected=list(protected), encoding=encoding)
        counts = [job.rows for job in jobs]
        x_rows = np.repeat(x_t0, counts, axis=0)  # (R,3,H,W)
        targets = np.concatenate([job.targets for job in jobs]).astype(np.float32)  # (R,k)
        bounds = np.cumsum([0] + counts)

        # 2. one walk down the grid for all rows; every few steps, each job gets its own rows back
        def on_step(i: int, n: int, pred_x0: np.ndarray) -> None:
            if i % self.preview_every and i != n:
                return
            for job, lo, hi in zip(jobs, bounds[:-1], bounds[1:]):
                if not job.cancelled and i != n:
                    job._emit(("step", i, n, [data_url(png_bytes(im)) for im in pred_x0[lo:hi]]))

        out = ed.regenerate(x_rows, targets, strength=strength, protected=list(protected), on_step=on_step)
        for job, lo, hi in zip(jobs, bounds[:-1], bounds[1:]):
            job._emit(("final", out[lo:hi]))

    def _fail(self, item, exc: Exception) -> None:
        if isinstance(item, _Exclusive):
            if not item.future.done():
                item.future.set_exception(exc)
        else:
            item._queue.put_nowait(("error", exc))
