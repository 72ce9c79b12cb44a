"""The sizes of ``veil demo`` (default and ``--quick``) and the exact commands that make its models.

Every model is trained from the embedded synthetic faces by the same code as ``veil train`` and
``veil train-classifier``, with the shipped configs and the ``--set`` overrides below; the report
prints each model's command, so any of them can be rerun by hand. By default the public UNet and
the guide are the ones shipped in ``veil/demo/models/`` (trained longer than the demo's
budget: their COMMAND files say how; the demo takes ~5 minutes on a 2-core CPU). With ``--fresh``
every model is trained here with the sizes below, within about 15 minutes (the public UNet gets a
5-minute wall-clock cap, so it is a rough denoiser: the edits show the mechanism, not photo
quality; the guide trains on 8000 faces, the shipped one on 20000); ``--quick`` (about 1.5 minutes,
used by the test) trains tiny models for a few steps: its numbers check the plumbing, not quality.
The checker (a small DP classifier of clean images on the private faces that checks the guided edits:
the guide never checks its own edits) is always trained here, in well under a minute; its epsilon is
recorded in the private data's account like the guide's.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from veil.demo.owner import AttackerSizes

__all__ = ["DemoPlan", "PLANS", "PRIVATE_DATA", "PUBLIC_DATA"]

PRIVATE_DATA = {"source": "synthetic", "seed": 0}  # the owner's faces
PUBLIC_DATA = {"source": "synthetic", "seed": 1}  # another seed: the label-free UNet's public data

TINY_UNET = ["data.num_images=256", "data.batch_size=32", "model.block_out_channels=[16,32]",
             "model.attention_levels=[false,true]", "model.norm_num_groups=8", "model.attention_head_dim=8",
             "trainer.max_steps=6", "trainer.max_time=null", "trainer.checkpoint_every_n_steps=6",
             "trainer.accelerator=cpu"]
TINY_CLASSIFIER = ["model.channels=[8,16,16]", "model.feature_dim=16", "model.norm_num_groups=4"]
CHECKER = ["model.noise_conditional=false", "dp.noise_multiplicity=1"]  # of clean images: it reads the edits at t = 0


@dataclass(frozen=True)
class DemoPlan:
    name: str
    public_unet: list[str]  # --set overrides of configs/synthetic32_public.yaml
    guide: list[str]  # ... of configs/classifier32_guidance.yaml (DP, noise-conditional)
    checker: list[str]  # ... of configs/classifier32_guidance.yaml, made a small DP classifier of clean images that
    #                     checks the guided edits (a guided edit is never checked by its guide)
    published: list[str]  # ... of configs/classifier32.yaml (non-private: what the owner already published)
    edit_images: int  # private images the scripted owner edits
    steps: int  # DDIM steps of a full-strength edit
    attackers: AttackerSizes = field(default_factory=AttackerSizes)
    protected: tuple[str, ...] = ("eyeglasses",)
    latency_repeats: int = 5
    classifier_scale: float = 10.0
    use_shipped: bool = True  # take a model from veil/demo/models/ when it ships there (never for quick)


PLANS = {
    "default": DemoPlan(
        name="default",
        public_unet=["data.num_images=8000", "trainer.max_time=00:00:05:00", "trainer.checkpoint_every_n_steps=100"],
        guide=["epochs=2", "batch_size=512", "dp.max_physical_batch_size=256", "dp.noise_multiplicity=2",
               "data.num_images=8000"],
        checker=CHECKER + ["model.channels=[16,32,32]", "model.feature_dim=32", "epochs=2", "batch_size=512", "dp.max_physical_batch_size=256",
                                                  "data.num_images=8000"],
        published=[],
        edit_images=24, steps=20,
        attackers=AttackerSizes(naive_images=2048, naive_epochs=4, edits_per_level=96, adaptive_epochs=4)),
    "quick": DemoPlan(
        name="quick",
        public_unet=TINY_UNET,
        guide=TINY_CLASSIFIER + ["model.noise_conditional=true", "epochs=1", "batch_size=64",
                                 "dp.max_physical_batch_size=64", "dp.noise_multiplicity=2", "data.num_images=640"],
        checker=CHECKER + TINY_CLASSIFIER + ["epochs=1", "batch_size=64", "dp.max_physical_batch_size=64",
                                             "data.num_images=640"],
        published=TINY_CLASSIFIER + ["epochs=1", "data.num_images=400"],
        edit_images=3, steps=6, latency_repeats=2, use_shipped=False,
        attackers=AttackerSizes(naive_images=128, naive_epochs=1, edits_per_level=16, adaptive_epochs=1)),
}


def command(tool: str, config: str, overrides: list[str], out: str) -> str:
    """The shell command that trains one of the demo's models (quoted: ``[16,32]`` is a glob to a shell)."""
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    name = config.removesuffix(".yaml")  # a shipped config, by name: the command runs from an install too
    return f"veil {tool} --config {name} {sets} --out {shlex.quote(str(out))}".replace("  ", " ")
