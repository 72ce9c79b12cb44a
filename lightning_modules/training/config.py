"""Typed training configuration: dataclasses grouped by concern, loaded from YAML.

The YAML file mirrors ``TrainConfig`` one to one (sections ``data``, ``model``, ``dp``, ``optim``,
``trainer``); unknown keys are errors that name the key, values are validated in
``__post_init__`` with the option's dotted name in the message. ``--set a.b=value`` on the
command line overrides any key (the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from veil.errors import ConfigError
from veil.lightning_modules.dp.config import DPConfig


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | celeba | folder
    root: str | None = None  # CelebA root or image folder
    csv: str | None = None  # attribute CSV for source=folder
    attributes: list[str] | None = None  # subset by name; null = all of the source's
    resolution: int = 32
    num_images: int = 2048  # synthetic only
    batch_size: int = 64  # expected (Poisson) logical batch size
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    revision: str | None = None  # train on a dataset revision folder
    num_workers: int = 0

    def __post_init__(self):
        if self.source not in ("synthetic", "celeba", "folder"):
            raise ConfigError(f"data.source must be synthetic, celeba or folder, got {self.source!r}")
        if self.source in ("celeba", "folder") and not self.root:
            raise ConfigError(f"data.root is required for data.source={self.source}")
        if self.resolution < 16 or self.resolution % 16:
            raise ConfigError(f"data.resolution must be a multiple of 16 (>= 16), got {self.resolution}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    layers_per_block: int = 1
    norm_num_groups: int = 16
    attention_head_dim: int = 32
    dropout: float = 0.0
    init_from: str | None = None  # start from this (public-data) checkpoint; see training/init_from.py

    def kwargs(self) -> dict[str, Any]:
        """The denoiser's constructor arguments (everything but init_from)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(self).items() if k != "init_from"}

    def __post_init__(self):
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ConfigError("model.attention_levels needs one flag per entry of model.block_out_channels")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError("model.block_out_channels must all be divisible by model.norm_num_groups")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 5e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    cond_drop_prob: float = 0.1
    attr_drop_prob: float = 0.1
    trainable: list[str] | None = None  # null: all; else globs or groups (conditioning, norms); models/params.py
    lr_scale: dict[str, float] | None = None  # {glob or group: factor}: lr * factor for those parameters

    def __post_init__(self):
        for name in ("cond_drop_prob", "attr_drop_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"optim.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr_scale is not None and (not isinstance(self.lr_scale, dict)
                                          or not all(isinstance(v, (int, float)) and v > 0 for v in self.lr_scale.values())):
            raise ConfigError(f"optim.lr_scale must map parameter globs or groups to factors > 0, got {self.lr_scale!r}")
        if self.trainable is not None and (isinstance(self.trainable, str) or not self.trainable):
            raise ConfigError(f"optim.trainable must be a non-empty list (e.g. [conditioning, norms]) or null, "
                              f"got {self.trainable!r}")
        if self.name not in ("adamw", "sgd"):
            raise ConfigError(f"optim.name must be adamw or sgd, got {self.name!r}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainerConfig:
    max_epochs: int | None = 10
    max_steps: int | None = None  # if set, overrides max_epochs for planning and stopping
    max_time: str | None = None  # wall-clock cap "DD:HH:MM:SS"; epsilon is then that of the steps run
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"  # "ddp" for multi-GPU / multi-process
    precision: str = "32-true"
    checkpoint_every_n_steps: int = 100
    log_every_n_steps: int = 10

    def __post_init__(self):
        if self.max_epochs is None and self.max_steps is None:
            raise ConfigError("trainer: set trainer.max_epochs or trainer.max_steps")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"trainer.max_steps must be >= 1, got {self.max_steps}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"trainer.max_epochs must be >= 1, got {self.max_epochs}")


@dataclass
class TrainConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "dp": DPConfig, "optim": OptimConfig, "trainer": TrainerConfig}


def _build(cls, values: dict[str, Any], prefix: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(prefix + u for u in unknown)}; valid: {sorted(names)}")
    return cls(**values)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError("a training config must be a YAML mapping with sections data, model, dp, optim, trainer")
    raw = dict(raw)
    top = {"seed": raw.pop("seed", 0)}
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid: seed, {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"config section {name} must be a mapping, got {type(value).__name__}")
        sections[name] = _build(cls, value, f"{name}.")
    return TrainConfig(**top, **sections)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. dp.target_epsilon=10), got {item!r}")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path} does not exist; shipped configs: {shipped_configs()}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path} is not valid YAML: {exc}") from exc
    return config_from_dict(apply_overrides(raw, overrides or []))


def shipped_configs() -> list[str]:
    """Paths of the shipped `veil train` (diffusion) configs; classifier*.yaml are `veil train-classifier`'s."""
    folder = Path(__file__).parents[1] / "configs"
    return sorted(str(p) for p in folder.glob("*.yaml") if not p.name.startswith("classifier"))
