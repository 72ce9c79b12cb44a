"""Typed training configuration: dataclasses grouped by concern, loaded from YAML.

The YAML file mirrors ``TrainConfig`` one to one (sections ``data``, ``model``, ``dp``, ``optim``,
``trainer``); unknown keys are errors that name the key, values are validated in
``__post_init__`` with the option's dotted name in the message (types too: ``batch_size: abc``,
``max_steps: '5'`` or ``true`` for a number are refused, not coerced; the one conversion is a
number written as a string, e.g. ``1e-3``, which YAML 1.1 reads as a string, in a float option).
``--set a.b=value`` on the command line overrides any key (the value is parsed as YAML). ``data:`` may also be
one ``--data`` string (``data: folder:photos,csv=photos/labels.csv``, ``veil.data_arg``).

``--config`` is a YAML file's path or the name of a shipped config (``synthetic32``: the installed
package's ``veil/lightning_modules/configs/synthetic32.yaml``; ``resolve_config``). A key given twice in
one mapping is refused naming the key and its lines (``read_yaml``), not silently last-one-wins.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from veil.errors import ConfigError
from veil.lightning_modules.dp.config import DPConfig
from veil.lightning_modules.configs import CONFIG_DIR


# ------------------------------------------------------------------------- typed option checks
# Each returns the value (a float option also accepts a number written as a string) or raises a
# ConfigError naming ``key``, the option as the user writes it (``data.batch_size``).
def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if isinstance(value, (str, bool)) else repr(value)


def check_int(value: Any, key: str, *, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer{' or null' if optional else ''}, got {_shown(value)}", option=key)
    if minimum is not None and value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value}", option=key)
    return value


def check_float(value: Any, key: str, *, optional: bool = False) -> float | None:
    """A finite number; a string that spells one (YAML 1.1 reads ``1e-3`` as a string) is converted."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"must be a finite number{' or null' if optional else ''}, got {_shown(value)}", option=key)
    return value


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"must be true or false, got {_shown(value)}", option=key)
    return value


def check_str(value: Any, key: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"must be a string{' or null' if optional else ''}, got {_shown(value)}", option=key)
    return value


def check_list(value: Any, key: str, item, *, optional: bool = False, example: str = "[1, 2]") -> list | None:
    """A non-empty list whose entries pass ``item(entry, f"{key}[i]")``."""
    if value is None and optional:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"must be a non-empty list, e.g. {example}, got {_shown(value)}", option=key)
    return [item(v, f"{key}[{i}]") for i, v in enumerate(value)]


def positive_ints(value: Any, key: str) -> list[int]:
    return check_list(value, key, lambda v, k: check_int(v, k, minimum=1), example="[64, 128]")


# ------------------------------------------------------------------------- YAML files and --config names
class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping gives one key twice (``key``; ``first`` and ``line``: 1-based lines)."""

    def __init__(self, key: Any, first: int, node: yaml.Node):
        self.key, self.first, self.line = key, first, node.start_mark.line + 1
        super().__init__(None, None, f"key {key!r} is given twice (lines {first} and {self.line})", node.start_mark)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], key_node)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: SafeLoader refuses it below
                pass
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (``DuplicateKeyError``, a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path, *, option: str = "--config") -> Any:
    """A YAML file's content; ConfigError naming ``option`` for a missing file, bad YAML or a key given twice."""
    path = Path(path)
    try:
        return parse_yaml(path.read_text())
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: line {exc.line}: key {exc.key!r} is given twice (first on line {exc.first}); "
                          f"keep one", option=option) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}", option=option) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})", option=option) from None


def shipped_names(kind: str = "train") -> list[str]:
    """Names of the shipped configs: ``train`` (veil train's diffusion configs) or ``classifier`` (veil
    train-classifier's recipes, classifier*.yaml)."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    return [n for n in names if n.startswith("classifier") == (kind == "classifier")]


def resolve_config(config: str | Path | None, *, kind: str = "train") -> Path | None:
    """``--config``: a YAML file's path, or a shipped config's name (``synthetic32`` or ``synthetic32.yaml``;
    a file of that name in the current folder wins). ConfigError (exit 2) listing the shipped names otherwise."""
    if config is None:
        return None
    path = Path(config).expanduser()
    if path.is_file():
        return path
    text = str(config)
    names = shipped_names(kind)
    if "/" not in text and os.sep not in text:
        stem = text[:-5] if text.endswith(".yaml") else text
        if stem in names:
            return CONFIG_DIR / f"{stem}.yaml"
    raise ConfigError(f"{text}: no such file, nor a shipped config's name; shipped: {', '.join(names)} (e.g. "
                      f"--config {names[0] if names else 'NAME'}), or give a YAML file's path", option="--config")



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
        for name in ("root", "csv", "revision"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else check_str(str(value) if isinstance(value, Path) else value,
                                                                     f"data.{name}", optional=True))
        self.attributes = check_list(self.attributes, "data.attributes", check_str, optional=True,
                                     example="[smiling, eyeglasses]")
        check_int(self.resolution, "data.resolution")
        check_int(self.num_images, "data.num_images", minimum=1)
        check_int(self.batch_size, "data.batch_size", minimum=1)
        check_int(self.num_workers, "data.num_workers", minimum=0)
        for name in ("val_fraction", "test_fraction"):
            value = check_float(getattr(self, name), f"data.{name}")
            setattr(self, name, value)
            if not 0 <= value < 1:
                raise ConfigError(f"must be in [0, 1), got {value}", option=f"data.{name}")
        if self.source not in ("synthetic", "celeba", "folder"):
            raise ConfigError(f"must be synthetic, celeba or folder, got {self.source!r}", option="data.source")
        if self.source in ("celeba", "folder") and not self.root:
            raise ConfigError(f"is required for data.source={self.source}", option="data.root")
        if self.resolution < 16 or self.resolution % 16:
            raise ConfigError(f"must be a multiple of 16 (>= 16), got {self.resolution}", option="data.resolution")
        if self.batch_size < 1:
            raise ConfigError(f"must be >= 1, got {self.batch_size}", option="data.batch_size")


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
        channels = self.block_out_channels = positive_ints(self.block_out_channels, "model.block_out_channels")
        self.attention_levels = check_list(self.attention_levels, "model.attention_levels", check_bool,
                                           example="[false, true]")
        check_int(self.layers_per_block, "model.layers_per_block", minimum=1)
        groups = check_int(self.norm_num_groups, "model.norm_num_groups", minimum=1)
        head = check_int(self.attention_head_dim, "model.attention_head_dim", minimum=1)
        self.dropout = check_float(self.dropout, "model.dropout")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {self.dropout}", option="model.dropout")
        self.init_from = check_str(str(self.init_from) if isinstance(self.init_from, Path) else self.init_from,
                                   "model.init_from", optional=True)
        if len(self.attention_levels) != len(channels):
            raise ConfigError("needs one flag per entry of model.block_out_channels", option="model.attention_levels")
        if any(c % groups for c in channels):
            raise ConfigError(f"{channels} must all be divisible by "
                              f"model.norm_num_groups ({groups})", option="model.block_out_channels")
        # Attention splits a level's channels into heads of attention_head_dim: the levels with
        # attention, and the middle block (always attended, at the last level's width).
        attended = sorted({c for c, a in zip(channels, self.attention_levels) if a} | {channels[-1]})
        if any(c % head for c in attended):
            raise ConfigError(f"{attended} (the attended levels and the last) must be "
                              f"divisible by model.attention_head_dim ({head}); e.g. attention_head_dim: "
                              f"{math.gcd(*attended)}", option="model.block_out_channels")


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
        check_str(self.name, "optim.name")
        for name in ("lr", "weight_decay", "ema_decay", "cond_drop_prob", "attr_drop_prob"):
            setattr(self, name, check_float(getattr(self, name), f"optim.{name}"))
        if self.weight_decay < 0:
            raise ConfigError(f"must be >= 0, got {self.weight_decay}", option="optim.weight_decay")
        if self.lr_scale is not None and isinstance(self.lr_scale, dict):
            self.lr_scale = {k: check_float(v, f"optim.lr_scale.{k}") for k, v in self.lr_scale.items()}
        for name in ("cond_drop_prob", "attr_drop_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"must be in [0, 1], got {getattr(self, name)}", option=f"optim.{name}")
        if self.lr_scale is not None and (not isinstance(self.lr_scale, dict)
                                          or not all(isinstance(v, (int, float)) and v > 0 for v in self.lr_scale.values())):
            raise ConfigError(f"must map parameter globs or groups to factors > 0, got {self.lr_scale!r}",
                              option="optim.lr_scale")
        if self.trainable is not None and (isinstance(self.trainable, str) or not self.trainable):
            raise ConfigError(f"must be a non-empty list (e.g. [conditioning, norms]) or null, "
                              f"got {self.trainable!r}", option="optim.trainable")
        if self.name not in ("adamw", "sgd"):
            raise ConfigError(f"must be adamw or sgd, got {self.name!r}", option="optim.name")
        if not self.lr > 0:
            raise ConfigError(f"must be > 0, got {self.lr}", option="optim.lr")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"must be in [0, 1), got {self.ema_decay}", option="optim.ema_decay")


MAX_STEPS = 10_000_000  # PRV accounting of 10**6 steps takes minutes; 10**9 needs hundreds of GB
MAX_EPOCHS = 1_000_000


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
        check_int(self.max_epochs, "trainer.max_epochs", optional=True)
        check_int(self.max_steps, "trainer.max_steps", optional=True)
        for name, most in (("max_steps", MAX_STEPS), ("max_epochs", MAX_EPOCHS)):
            if getattr(self, name) is not None and getattr(self, name) > most:  # accounting such a run cannot finish
                raise ConfigError(f"must be <= {most:,}, got {getattr(self, name):,}", option=f"trainer.{name}")
        check_int(self.checkpoint_every_n_steps, "trainer.checkpoint_every_n_steps", minimum=1)
        check_int(self.log_every_n_steps, "trainer.log_every_n_steps", minimum=1)
        for name in ("accelerator", "strategy"):
            check_str(getattr(self, name), f"trainer.{name}")
        if self.devices != "auto":
            check_int(self.devices, "trainer.devices", minimum=1)
        if isinstance(self.precision, bool) or not isinstance(self.precision, (str, int)):
            raise ConfigError(f"must be a string such as 32-true or bf16-mixed, "
                              f"got {_shown(self.precision)}", option="trainer.precision")
        if self.max_time is not None and not re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", str(self.max_time)):
            raise ConfigError(f"must be a string DD:HH:MM:SS (e.g. '00:02:00:00', quoted), "
                              f"got {_shown(self.max_time)}", option="trainer.max_time")
        if self.max_epochs is None and self.max_steps is None:
            raise ConfigError("trainer: set trainer.max_epochs or trainer.max_steps")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"must be >= 1, got {self.max_steps}", option="trainer.max_steps")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"must be >= 1, got {self.max_epochs}", option="trainer.max_epochs")


@dataclass
class TrainConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        check_int(self.seed, "seed", minimum=0)
        if self.seed >= 2**32:
            raise ConfigError(f"must be < 2**32, got {self.seed}", option="seed")

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
            raise ConfigError(f"expects KEY=VALUE (e.g. dp.target_epsilon=10), got {item!r}", option="--set")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section ("data:" in YAML)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section", option="--set")
        try:
            node[parts[-1]] = parse_yaml(value)
        except yaml.YAMLError:
            raise ConfigError(f"{item}: {value!r} is not a YAML value (a number, a name, [a, list], "
                              "null); quote it if it is text", option="--set") from None
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from ``path`` (a YAML file or a shipped config's name; None: the defaults) and ``--set``s."""
    raw: dict[str, Any] = {}
    path = resolve_config(path, kind="train")
    if path is not None:
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a training config is a YAML mapping with sections data, model, dp, "
                              f"optim, trainer; shipped: {', '.join(shipped_names('train'))}", option="--config")
    return config_from_dict(apply_overrides(_data_string(raw), overrides or []))


def _data_string(raw: dict[str, Any]) -> dict[str, Any]:
    """A config's ``data:`` given as one ``--data`` string (``data: folder:photos,csv=photos/labels.csv``;
    ``veil.data_arg``, paths resolved from the current directory) as the mapping; synthetic:SEED sets ``seed``."""
    if not isinstance(raw.get("data"), str):
        return raw
    from veil.data_arg import parse_data_arg

    data = parse_data_arg(raw["data"], option="data", keep_revision=True)
    if "seed" in data:
        raw["seed"] = data.pop("seed")
    return {**raw, "data": data}


def shipped_configs() -> list[str]:
    """Paths of the shipped `veil train` (diffusion) configs; classifier*.yaml are `veil train-classifier`'s."""
    folder = CONFIG_DIR
    return sorted(str(p) for p in folder.glob("*.yaml") if not p.name.startswith("classifier"))
