"""Unlearn on 2 gloo processes (or 1) and save the updated parameters of each rank.

    python unlearn_ddp_script.py CKPT REVISION OUT WORLD

Each rank takes the training positions p with p % WORLD == rank (and the changed ones among
them); gradient sums, HVPs and counts are all-reduced, so every rank must end with the same
parameters as one process with all the data. Used by test_unlearning.py as a subprocess.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank: int, world: int, ckpt: str, revision: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("UNLEARN_PORT", "29517"))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from veil.lightning_modules import checkpoints as CK
    from veil.lightning_modules.unlearning import job as UJ
    from veil.lightning_modules.unlearning.module import FeatureUnlearningModule

    for method, params in (("second", ["proj"]), ("first", ["head"])):
        model, record = CK.load_classifier(ckpt)
        data = UJ.UnlearningData.build(record, revision)
        x, attrs = data.train
        mine = torch.arange(rank, len(x), world)  # this rank's shard of the training positions
        local = {int(p): i for i, p in enumerate(mine)}
        keep = [j for j, p in enumerate(data.changed_positions.tolist()) if p in local]
        changed = torch.tensor([local[int(data.changed_positions[j])] for j in keep], dtype=torch.long)
        revised = tuple(t[keep] for t in data.revised_changed)
        unlearner = FeatureUnlearningModule(model, method=method, l2=record["veil"]["l2"], params=params,
                                            hessian_samples=10**9, batch_size=64)
        unlearner.unlearn(train=(x[mine], attrs[mine]), changed=changed, revised=revised)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(flat, os.path.join(out, f"{method}_world{world}_rank{rank}.pt"))
    print(f"rank {rank}/{world}: results saved", file=sys.stderr, flush=True)  # shown if a later step fails
    if world > 1:
        dist.barrier()  # no rank tears the group down while another is still in a collective
        dist.destroy_process_group()
        # Results are on disk. Leave without running C++ static destructors: in some fresh-clone
        # CI runs a gloo worker thread outlived teardown and the exit aborted with SIGABRT
        # ("terminate called without an active exception") after all work was done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    ckpt, revision, out, world = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if world == 1:
        run(0, 1, ckpt, revision, out)
    else:
        mp.spawn(run, args=(world, ckpt, revision, out), nprocs=world, join=True)
