"""Run a tiny `veil train` under Lightning DDP (or not) and dump each rank's parameters.

    python ddp_train_script.py OUT DEVICES

Used by test_train_diffusion.py: DEVICES=2 as a subprocess (Lightning's CPU DDP (gloo) re-launches this script
once per extra rank, so it needs the ``__main__`` guard), DEVICES=1 in the test's own process (``main``).
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "helpers"))
from dp_helpers import TINY, gloo_threads  # noqa: E402


class DumpParameters(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.model.parameters()])
        torch.save(flat, self.out / f"params_rank{trainer.global_rank}.pt")


def main(out: str, devices: int) -> None:
    from veil.jobs import train
    from veil.jobs.config import load_config

    overrides = TINY + [f"trainer.devices={devices}", f"trainer.strategy={'ddp' if devices > 1 else 'auto'}"]
    cfg = load_config(None, overrides)
    build = train.build_trainer

    def build_with_dump(cfg, out_dir, progress=True, callbacks=()):
        trainer = build(cfg, out_dir, progress=False, callbacks=callbacks)
        trainer.callbacks.append(DumpParameters(Path(out_dir)))
        return trainer

    before = gloo_threads()  # none in a fresh process; run in a test process, whatever it had
    train.build_trainer = build_with_dump
    try:
        train.run_training(cfg, out, progress=False)
    finally:
        train.build_trainer = build
    # The job destroys the group its Trainer made: no gloo thread may run on into interpreter exit
    # (the cause of the unlearning test's old SIGABRT, training.process_group).
    left = sorted(set(gloo_threads().items()) - set(before.items()))
    assert not left, f"process-group threads {left} outlived training"


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
