"""Tiny models and their `veil export`s (exporting the guided step takes a minute or more here, so every test
folder shares them): what the session fixtures ``models`` and ``exports`` of tests/conftest.py return. Built once
per source state and cached on disk (``disk_cache``: rebuilt whenever a source file that builds them changes;
``VEIL_TEST_CACHE=off`` builds them afresh); tests read them and copy before writing. ``python
tests/helpers/export_models.py`` builds both ahead of a run (``make test`` starts it beside pytest's workers)."""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, when run as a script
sys.path.insert(0, str(Path(__file__).parent))  # run as a script: its sibling helpers

from disk_cache import cached_dir  # noqa: E402
from dp_helpers import TINY, train_cli  # noqa: E402
from unlearn_helpers import RECIPE, datamodule, one_thread  # noqa: E402

from veil.cli import main  # noqa: E402
from veil.jobs import train_classifier as TC  # noqa: E402

NOISY = {"channels": [8, 8, 8], "feature_dim": 8, "norm_num_groups": 4, "noise_conditional": True}
EXPORT_STEPS = 6
GUIDED_SCALE = 30.0


def build_models(root: Path) -> None:
    """A label-free tiny UNet and a tiny noise-conditional DP classifier (guided), a tiny conditional UNet, and a
    tiny DP classifier of clean images (``judge``) that checks the guided edits (a guided edit is never checked
    by its guide)."""
    with one_thread():
        assert train_cli(root / "unet", TINY, "optim.cond_drop_prob=1.0", "dp.enabled=false") == 0
        dp = {"enabled": True, "target_epsilon": None, "noise_multiplier": 1.0, "accountant": "rdp",
              "max_physical_batch_size": 16, "noise_multiplicity": 2}
        recipe = TC.ClassifierRecipe(**{**RECIPE, "epochs": 1, "refit_head": False, "dp": dp, "model": dict(NOISY)})
        TC.train_classifier(recipe=recipe, datamodule=datamodule(num_images=160, poisson=True), out=root / "guide")
        judge = {**dp, "noise_multiplier": 2.0, "noise_multiplicity": 1}
        recipe = TC.ClassifierRecipe(**{**RECIPE, "epochs": 1, "refit_head": False, "dp": judge})
        TC.train_classifier(recipe=recipe, datamodule=datamodule(num_images=160, poisson=True), out=root / "judge")
        assert train_cli(root / "cond", TINY, "dp.enabled=false") == 0


def build_exports(out: Path, models: Path) -> None:
    """`veil export` of both backends: guided (scale 30) checked by the judge, conditional with the classifier as
    its checker (scale 0: it does not steer)."""
    with one_thread():
        assert main(["export", "--checkpoint", str(models / "unet"), "--classifier", str(models / "guide"),
                     "--classifier-scale", str(GUIDED_SCALE), "--checker", str(models / "judge"),
                     "--steps", str(EXPORT_STEPS),
                     "--out", str(out / "guided")]) == 0
        assert main(["export", "--checkpoint", str(models / "cond"), "--classifier", str(models / "guide"),
                     "--classifier-scale", "0", "--steps", str(EXPORT_STEPS), "--out", str(out / "conditional")]) == 0
    from veil.export.runtime import OrtBackend

    for name in ("guided", "conditional"):  # ONNX Runtime's optimized-model cache (<export>/ort_cache), made now:
        OrtBackend(out / name)              # later sessions only read it, so no test writes into the shared copy


def cached_models() -> Path:
    return cached_dir("models", build_models)


def cached_exports() -> Path:
    models = cached_models()
    return cached_dir("exports", lambda out: build_exports(out, models), extra=str(models))


if __name__ == "__main__":  # build both ahead of the tests (their privacy records go to a throwaway VEIL_HOME)
    os.environ["VEIL_HOME"] = tempfile.mkdtemp(prefix="veil_home_prebuild_")
    print(cached_exports())
