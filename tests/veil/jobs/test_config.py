"""Configs: every shipped YAML parses; bad values fail naming the option."""

import pytest

from veil.errors import ConfigError
from veil.jobs.config import (
    config_from_dict,
    load_config,
    shipped_configs,
)


@pytest.mark.parametrize("path", shipped_configs())
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert cfg.dp.max_grad_norm > 0 and cfg.data.batch_size > 0


def test_shipped_configs_exist():
    names = {p.rsplit("/", 1)[-1] for p in shipped_configs()}
    assert {"synthetic32.yaml", "celeba64.yaml"} <= names


@pytest.mark.parametrize(
    "raw, option",
    [
        ({"dp": {"target_epsilon": 0}}, "dp.target_epsilon"),
        ({"dp": {"target_epsilon": -2}}, "dp.target_epsilon"),
        ({"dp": {"target_epsilon": 5, "noise_multiplier": 1.0}}, "dp.noise_multiplier"),
        ({"dp": {"max_grad_norm": 0}}, "dp.max_grad_norm"),
        ({"dp": {"accountant": "gdp"}}, "dp.accountant"),
        ({"dp": {"kernel": "cuda"}}, "dp.kernel"),
        ({"dp": {"delta": 2}}, "dp.delta"),
        ({"data": {"source": "imagenet"}}, "data.source"),
        ({"data": {"source": "celeba"}}, "data.root"),
        ({"data": {"resolution": 30}}, "data.resolution"),
        ({"trainer": {"max_steps": 0}}, "trainer.max_steps"),
        ({"optim": {"lr": 0}}, "optim.lr"),
        ({"data": {"batchsize": 3}}, "data.batchsize"),
        ({"dataa": {}}, "dataa"),
        # values of the wrong type name the key too (they were TypeErrors or silently accepted)
        ({"data": {"batch_size": "abc"}}, "data.batch_size"),
        ({"data": {"batch_size": True}}, "data.batch_size"),
        ({"trainer": {"max_steps": "5"}}, "trainer.max_steps"),
        ({"trainer": {"max_time": 3600}}, "trainer.max_time"),
        ({"model": {"block_out_channels": "abc"}}, "model.block_out_channels"),
        ({"model": {"block_out_channels": [16, 32], "attention_levels": [False, True], "norm_num_groups": 8,
                    "attention_head_dim": 24}}, "model.attention_head_dim"),
        ({"dp": {"max_grad_norm": float("inf")}}, "dp.max_grad_norm"),
        ({"dp": {"enabled": "false"}}, "dp.enabled"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_values_name_the_option(raw, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        config_from_dict(raw)


def test_set_overrides(tmp_path):
    cfg = load_config(None, ["dp.target_epsilon=3", "trainer.max_steps=7", "data.attributes=[smiling]"])
    assert cfg.dp.target_epsilon == 3 and cfg.trainer.max_steps == 7 and cfg.data.attributes == ["smiling"]


def test_numbers_written_as_strings_are_read_as_numbers():
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float option takes it as the number it spells."""
    cfg = load_config(None, ["optim.lr=1e-3", "dp.delta=1e-7"])
    assert cfg.optim.lr == 1e-3 and cfg.dp.delta == 1e-7


def test_set_into_an_empty_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\ntrainer:\n  max_steps: 3\n")
    assert load_config(path, ["data.num_images=64"]).data.num_images == 64
