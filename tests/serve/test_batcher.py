"""MicroBatcher with a fake editor: gathering, grouping, splitting back, streaming, overload, batching off."""

import asyncio
import threading

import numpy as np
import pytest

from veil.serve.batcher import MicroBatcher, Overloaded, PreviewJob

K = 2  # attributes


class FakeEditor:
    """regenerate returns targets[:, 0] as a constant image per row, so each job can check it got its own rows."""

    attribute_names = ["a", "b"]
    batch_size = 8

    def __init__(self, gate: threading.Event | None = None):
        self.calls, self.gate = [], gate

    def inversion_attributes(self, originals, *, protected):
        return originals

    def encode(self, images, originals, *, strength, protected, encoding):
        return images

    def regenerate(self, x_t0, targets, *, strength, protected, on_step=None):
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append((x_t0.shape[0], strength))
        out = np.broadcast_to(targets[:, :1, None, None], x_t0.shape).astype(np.float32).copy()
        for i in range(1, 5):
            if on_step is not None:
                on_step(i, 4, out * i / 4)
        return out


def job(value: float, rows: int = 2, strength: float = 0.5) -> PreviewJob:
    t = np.zeros((rows, K), np.float32)
    t[:, 0] = value
    return PreviewJob(image=np.zeros((3, 4, 4), np.float32), original=np.zeros(K, np.float32), targets=t,
                      strength=strength, encoding="noise", protected=("a",))


async def collect(j: PreviewJob):
    steps, final = [], None
    async for event in j.events():
        if event[0] == "step":
            steps.append(event[1])
        else:
            final = event[1]
    return steps, final


def run(coro):
    return asyncio.run(coro)


def test_concurrent_jobs_share_one_batch_and_get_their_own_rows():
    ed = FakeEditor()

    async def main():
        seen = []
        b = MicroBatcher(ed, max_wait_ms=50, preview_every=2, observe=lambda r, j, s: seen.append((r, j)))
        await b.start()
        jobs = [b.submit_preview(job(v)) for v in (0.1, 0.2, 0.3)]
        results = await asyncio.gather(*(collect(j) for j in jobs))
        for _ in range(200):  # the loop task reports the batch once the worker hands it back
            if seen:
                break
            await asyncio.sleep(0.01)
        await b.stop()
        return results, seen

    results, seen = run(main())
    assert ed.calls == [(6, 0.5)] and seen == [(6, 3)]  # one ORT walk for all three requests
    for v, (steps, final) in zip((0.1, 0.2, 0.3), results):
        assert steps == [2]  # every 2nd step, the last one is the final event
        assert final.shape == (2, 3, 4, 4) and np.allclose(final, v)


def test_different_strengths_are_walked_separately_and_rows_are_capped():
    ed = FakeEditor()

    async def main():
        b = MicroBatcher(ed, max_wait_ms=50)
        await b.start()
        jobs = [b.submit_preview(job(0.1, strength=0.5)), b.submit_preview(job(0.2, strength=0.7)),
                b.submit_preview(job(0.3, rows=6)), b.submit_preview(job(0.4, rows=4))]
        out = await asyncio.gather(*(collect(j) for j in jobs))
        await b.stop()
        return out

    out = run(main())
    assert all(np.allclose(f, v) for (_, f), v in zip(out, (0.1, 0.2, 0.3, 0.4)))
    assert max(rows for rows, _ in ed.calls) <= FakeEditor.batch_size
    assert sorted(s for _, s in ed.calls).count(0.7) == 1


def test_batching_off_runs_one_request_at_a_time():
    ed = FakeEditor()

    async def main():
        b = MicroBatcher(ed, max_wait_ms=50, batching=False)
        await b.start()
        await asyncio.gather(*(collect(b.submit_preview(job(v))) for v in (0.1, 0.2, 0.3)))
        await b.stop()

    run(main())
    assert ed.calls == [(2, 0.5)] * 3


def test_a_full_queue_is_shed_with_retry_after_and_the_rest_complete():
    gate = threading.Event()
    ed = FakeEditor(gate)

    async def main():
        b = MicroBatcher(ed, max_wait_ms=0, max_queue=2)
        await b.start()
        first = b.submit_preview(job(0.1))
        await asyncio.sleep(0.05)  # the worker has taken it and waits at the gate
        queued = [b.submit_preview(job(0.2)), b.submit_preview(job(0.3))]
        with pytest.raises(Overloaded) as shed:
            b.submit_preview(job(0.4))
        assert shed.value.retry_after >= 1 and b.depth == 2
        gate.set()
        out = await asyncio.gather(*(collect(j) for j in [first, *queued]))
        await b.stop()
        return out

    out = run(main())
    assert [float(f[0, 0, 0, 0]) for _, f in out] == pytest.approx([0.1, 0.2, 0.3])


def test_exclusive_work_and_errors_reach_the_caller():
    ed = FakeEditor()

    async def main():
        b = MicroBatcher(ed)
        await b.start()
        assert await b.run_exclusive(lambda: 41 + 1) == 42
        with pytest.raises(ZeroDivisionError):
            await b.run_exclusive(lambda: 1 / 0)
        bad = job(0.1)
        bad.targets = np.zeros((2, K + 1), np.float32)  # regenerate sees (2,3) targets: broadcasting fails
        ed.regenerate = lambda *a, **k: (_ for _ in ()).throw(ValueError("bad rows"))
        with pytest.raises(ValueError, match="bad rows"):
            await collect(b.submit_preview(bad))
        await b.stop()

    run(main())


def test_bad_settings_name_the_flag():
    from veil.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-queue"):
        MicroBatcher(FakeEditor(), max_queue=0)
    with pytest.raises(ConfigError, match="--max-wait-ms"):
        MicroBatcher(FakeEditor(), max_wait_ms=float("nan"))
