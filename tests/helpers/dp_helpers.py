"""Helpers for the DP tests: a tiny UNet config, a tiny `veil train` config, a one-batch-per-step fit,
random batches."""

import glob
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

TINY_MODEL = dict(num_attributes=3, resolution=16, block_out_channels=(16, 32), attention_levels=(False, True),
                  layers_per_block=1, norm_num_groups=8, attention_head_dim=8)


# `veil train --set` overrides of a tiny private run (4 steps) on 96 synthetic faces.
TINY = [
    "seed=0", "data.num_images=96", "data.resolution=32", "data.batch_size=16",
    "model.block_out_channels=[16,32]", "model.attention_levels=[false,true]", "model.norm_num_groups=8",
    "model.attention_head_dim=8", "dp.target_epsilon=null", "dp.noise_multiplier=1.0", "dp.accountant=rdp",
    "dp.max_physical_batch_size=8", "optim.name=sgd", "optim.lr=0.05", "trainer.max_epochs=null",
    "trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.checkpoint_every_n_steps=2",
]


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def fit_batches(module, batches, *, seed=0):
    """Run exactly one training step per given (x, attrs) batch on the CPU."""
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        max_steps=len(batches), max_epochs=1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(_Batches(batches), batch_size=None))
    return trainer


def make_batch(b, *, seed=0, k=3, res=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, res, res, generator=g) * 2 - 1
    a = torch.randint(0, 2, (b, k), generator=g).float() * 2 - 1
    return x, a


def train_cli(out, overrides, *extra, resume=False):
    """`veil train --out OUT --no-progress --set ...` (overrides, then extra), optionally --resume."""
    from veil.cli import main

    args = ["train", "--out", str(out), "--no-progress"] + [a for kv in list(overrides) + list(extra) for a in ("--set", kv)]
    return main(args + (["--resume"] if resume else []))


FACE_UNET = dict(num_attributes=6, resolution=32, block_out_channels=(16, 32), attention_levels=(False, True),
                 norm_num_groups=8, attention_head_dim=8)


def face_unet(seed: int = 0):
    """An untrained attention UNet for the 6 synthetic-face attributes at 32x32 (the DDIM and editor tests)."""
    from veil.lightning_modules.models.unet import AttributeConditionalUNet

    torch.manual_seed(seed)
    return AttributeConditionalUNet(**FACE_UNET).eval()


def write_tiny_release(out, *, data_spec, privacy=None):
    """A `veil train` run folder holding the model release (OUT/model) of ``face_unet()``; returns ``out``."""
    from veil.lightning_modules.checkpoints import DIFFUSION_KIND, write_release
    from veil.lightning_modules.data.synthetic_faces import SYNTHETIC_ATTRIBUTES
    from veil.lightning_modules.diffusion.schedule import default_scheduler_config

    model = face_unet()
    write_release(out, kind=DIFFUSION_KIND, weights={f"ema.{k}": v for k, v in model.state_dict().items()},
                  meta={"model_kwargs": FACE_UNET, "scheduler_config": default_scheduler_config(),
                        "attribute_names": list(SYNTHETIC_ATTRIBUTES), "data_spec": data_spec,
                        "privacy": privacy or {"enabled": False}})
    return out


def gloo_threads() -> dict[str, str]:
    """{thread id: name} of this process's threads that serve a process group (Linux names them)."""
    names = {Path(task).name: Path(task, "comm").read_text().strip() for task in glob.glob("/proc/self/task/*")}
    return {tid: n for tid, n in names.items() if n.startswith(("pt_gloo", "gloo", "pt_tcpstore"))}
