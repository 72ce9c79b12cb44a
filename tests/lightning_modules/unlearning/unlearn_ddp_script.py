"""Unlearn under Lightning DDP on CPU (gloo), or in one process, and dump each rank's result.

    python unlearn_ddp_script.py CKPT REVISION OUT DEVICES [VEIL ARGS...]

Used by test_unlearning.py as a subprocess: Lightning's CPU DDP re-launches this script once per
extra rank, so it needs the ``__main__`` guard. For ("second", ["proj"]), ("first", ["head"]) and
("replay", every parameter),
every rank runs ``unlearn_and_measure`` through the Trainer (each takes the training positions p
with p % DEVICES == rank; the module sums over ranks) and saves its updated parameters and report
as OUT/{method}_devices{DEVICES}_rank{r}.pt. Every rank then checks that no gloo thread is left,
and rank 0 waits for the others, so the exit status is that of all ranks. VEIL ARGS, when given, then run as
the command line ``veil VEIL ARGS`` on every rank (``veil.cli.main``: a ``veil unlearn --set
trainer.devices=2 ...`` under the same launch, instead of launching 2 more processes for it).

The gloo-thread check guards the cause of the SIGABRT ("terminate called without an active
exception") that the earlier, hand-rolled version of this script (mp.spawn, init_process_group,
then importing veil) hit now and then after its work was done: importing veil (Lightning, opacus)
after the group existed imported ``torch.distributed.nn``, whose ``group=group.WORLD`` default
arguments then held the group, so ``destroy_process_group`` freed nothing and gloo's worker
threads ran on into interpreter teardown, where one of them releasing the last reference to a
collective's tensor needs the GIL and aborts. The whole story and the fix are in
lightning_modules/unlearning_module.py; it needed no ``os._exit``.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "helpers"))
from dp_helpers import gloo_threads  # noqa: E402

CONFIGS = (("second", ["proj"]), ("first", ["head"]), ("replay", None))


def main(ckpt: str, revision: str, out: str, devices: int, veil_args: list[str] | None = None) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from veil.lightning_modules import checkpoints as CK
    from veil.jobs import unlearn as UJ

    cfg = UJ.UnlearnTrainerConfig(devices=devices, strategy="ddp" if devices > 1 else "auto")
    before = gloo_threads()  # none in a fresh process; run in a test process, whatever it had
    for method, params in CONFIGS:
        model, record = CK.load_classifier(ckpt, owner=True)
        data = UJ.UnlearningData.build(record, revision)
        knobs = {"passes": 2, "lr": 1e-3} if method == "replay" else {"hessian_samples": 10**9}
        report = UJ.unlearn_and_measure(model, record, data, method=method, params=params, trainer=cfg,
                                        batch_size=64, **knobs)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"flat": flat, "report": report},
                   Path(out) / f"{method}_devices{devices}_rank{rank_zero_only.rank}.pt")
        left = sorted(set(gloo_threads().items()) - set(before.items()))
        assert not left, f"rank {rank_zero_only.rank}: process-group threads {left} outlived the update"
    if veil_args:
        from veil.cli import main as veil

        code = veil(veil_args)  # on rank 0 it waits for the other ranks at its end, as `veil unlearn` does
        assert code == 0, f"rank {rank_zero_only.rank}: veil {' '.join(veil_args)} exited {code}"
    UJ.wait_for_other_ranks()


if __name__ == "__main__":
    torch.set_num_threads(1)  # before any process group exists; Lightning sets 1 per rank on 2 cores too
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
