"""ConfigError carries the option it is about: ``str(e)`` is the command line's message (the option, then
what is wrong), ``e.phrase(name)`` lets another boundary (the server) name the option its own way, and
both survive pickling (an error raised in a DDP worker process)."""

import pickle

import pytest

from veil.errors import ConfigError, VeilError


def test_the_command_line_message_is_the_option_then_the_detail():
    e = ConfigError("5: must be a whole number >= 1", option="--first")
    assert str(e) == "--first 5: must be a whole number >= 1"
    assert (e.option, e.detail) == ("--first", "5: must be a whole number >= 1")
    assert e.phrase("first") == "first 5: must be a whole number >= 1"
    assert isinstance(e, VeilError) and isinstance(e, ValueError)


@pytest.mark.parametrize("detail, message", [
    (": only with --classifier", "--classifier-scale: only with --classifier"),
    ("=0: must be a whole number >= 1", "--classifier-scale=0: must be a whole number >= 1"),
    (", --tau: choose one", "--classifier-scale, --tau: choose one"),
])
def test_a_detail_that_starts_with_punctuation_joins_the_option(detail, message):
    e = ConfigError(detail, option="--classifier-scale")
    assert str(e) == message
    assert e.phrase("classifier_scale") == "classifier_scale" + detail


def test_without_an_option_the_detail_is_the_whole_message():
    e = ConfigError("a training config must be a YAML mapping")
    assert str(e) == e.detail == "a training config must be a YAML mapping" and e.option is None


def test_pickling_keeps_the_message_and_the_option():
    from veil.lightning_modules.dp.ghost import UnsupportedLayer

    for e in (ConfigError("0: must be >= 1", option="--steps"), ConfigError("no option here"),
              UnsupportedLayer("ghost clipping cannot handle fc (Bilinear): replace it")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
        assert (back.option, back.detail) == (e.option, e.detail)


def test_library_errors_name_their_option_and_keep_their_message():
    from veil.jobs.config import check_int
    from veil.jobs.edit import check_edit_options
    from veil.lightning_modules.dp.config import DPConfig

    with pytest.raises(ConfigError) as info:
        check_int("8", "data.batch_size")
    assert str(info.value) == "data.batch_size must be an integer, got '8' (str)"
    assert info.value.option == "data.batch_size"
    with pytest.raises(ConfigError) as info:
        check_edit_options(guidance=None, steps=0)
    assert str(info.value) == "--steps 0: must be a whole number >= 1"
    assert info.value.phrase("steps") == "steps 0: must be a whole number >= 1"
    with pytest.raises(ConfigError) as info:
        DPConfig(enabled=True, target_epsilon=8.0, delta=2.0)
    assert str(info.value) == "dp.delta must be in (0, 1), got 2.0" and info.value.option == "dp.delta"


@pytest.mark.parametrize("module, function, args, kwargs, message, option", [
    ("veil.privacy.levels", "resolve_level", ("extreme",), {}, "--level 'extreme': choose one of", "--level"),
    ("veil.privacy.mechanism", "check_epsilon", (-1,), {"option": "--epsilon"}, "--epsilon=-1: must be a number >= 0",
     "--epsilon"),
    ("veil.editing.plan", "sample_grid", (), {"num_steps": 0, "num_train_timesteps": 50},
     "--steps=0: must be an integer in [1, 50]", "--steps"),
    ("veil.privacy.locations", "dataset_slug", ({"source": "celeba"},), {},
     "--data: a celeba dataset is located by its folder", "--data"),
    ("veil.serve.images", "ImageLimits", (), {"min_side": 100, "max_side": 50}, "--min-side 100 > --max-side 50",
     "--min-side"),
])
def test_more_library_errors_carry_their_option(module, function, args, kwargs, message, option):
    import importlib

    with pytest.raises(ConfigError) as info:
        getattr(importlib.import_module(module), function)(*args, **kwargs)
    assert str(info.value).startswith(message) and info.value.option == option


def test_an_image_rejected_takes_an_option_and_survives_pickling():
    from veil.serve.images import ImageRejected

    for e in (ImageRejected("image: the upload is empty"), ImageRejected(": too large", 413, option="image")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is ImageRejected and str(back) == str(e)
        assert (back.status, back.option, back.detail) == (e.status, e.option, e.detail)
    assert str(e) == "image: too large" and e.phrase("upload") == "upload: too large"
