"""The one DDIM (diffusion/ddim.py) against diffusers' DDIMScheduler: grids, and the whole sampling loop
with classifier-free guidance and with classifier guidance (use_clipped_model_output)."""

import pytest
import torch
from diffusers import DDIMScheduler
from dp_helpers import face_unet

from veil.errors import ConfigError
from veil.lightning_modules.diffusion.ddim import edit_timesteps, sample_timesteps
from veil.lightning_modules.diffusion.guidance import (
    GuidanceClassifier,
    classifier_free_eps,
)
from veil.lightning_modules.diffusion.sample import ddim_sample
from veil.lightning_modules.diffusion.schedule import default_scheduler_config
from veil.lightning_modules.models.classifier import AttributeClassifier

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return face_unet(seed=0)


@pytest.fixture(scope="module")
def guide():
    torch.manual_seed(1)
    clf = AttributeClassifier(num_attributes=6, resolution=32, channels=(8, 16), norm_num_groups=4, feature_dim=8,
                              noise_conditional=True).eval()
    return GuidanceClassifier(clf, [f"a{i}" for i in range(6)], {}, None, default_scheduler_config(), scale=5.0)


def diffusers_ddim_sample(model, cfg, attrs, *, num_steps, guidance_scale, generator, guide=None):
    """The reference: diffusers' DDIMScheduler.step over its own timesteps (what veil sampled with before)."""
    sched = DDIMScheduler(**cfg)
    sched.set_timesteps(num_steps)
    x = torch.randn((attrs.shape[0], 3, 32, 32), generator=generator)
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        eps = classifier_free_eps(model, x, tt, attrs, guidance_scale)
        if guide is not None:
            eps = eps - guide.scale * (1 - sched.alphas_cumprod[int(t)]).sqrt() * guide.log_prob_grad(x, tt, attrs)
        x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=guide is not None).prev_sample
    return x.clamp(-1, 1)


def test_grids_are_diffusers_leading_spacing():
    for n in (1, 7, 10, 50):
        sched = DDIMScheduler(**default_scheduler_config())
        sched.set_timesteps(n)
        assert sample_timesteps(num_steps=n, num_train_timesteps=1000).flip(0).tolist() == sched.timesteps.tolist()
    assert edit_timesteps(strength=0.7, num_steps=50, num_train_timesteps=1000)[-1] == 700
    assert edit_timesteps(strength=1.0, num_steps=50, num_train_timesteps=1000).tolist() == list(range(0, 1000, 20))
    with pytest.raises(ConfigError, match="--strength.*no DDIM step"):  # t0 = 0: the image released unchanged
        edit_timesteps(strength=0.001, num_steps=50, num_train_timesteps=1000)
    with pytest.raises(ConfigError, match="--strength"):
        edit_timesteps(strength=0.0, num_steps=50, num_train_timesteps=1000)
    with pytest.raises(ConfigError, match="--steps"):
        edit_timesteps(strength=0.5, num_steps=0, num_train_timesteps=1000)


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0, 2.0])
def test_sampling_matches_ddim_scheduler(model, guidance_scale):
    cfg, attrs = default_scheduler_config(), torch.tensor([[1.0, -1, 0, 1, -1, 1], [0, 1, 1, -1, 0, 0]])
    ours = ddim_sample(model, cfg, attrs, num_steps=8, guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(3))
    ref = diffusers_ddim_sample(model, cfg, attrs, num_steps=8, guidance_scale=guidance_scale,
                                generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours - torch.randn(ours.shape, generator=torch.Generator().manual_seed(3))).abs().mean() > 0.1


def test_classifier_guided_sampling_matches_ddim_scheduler_with_clipped_model_output(model, guide):
    # Classifier guidance re-derives eps from the clipped x0 (DDIMScheduler's use_clipped_model_output);
    # a strong scale makes the clip bite, so a step that kept the raw eps would not match.
    cfg, attrs = default_scheduler_config(), torch.tensor([[1.0, -1, 1, 1, -1, 1]] * 2)
    kw = dict(num_steps=8, guidance_scale=0.0)
    ours = ddim_sample(model, cfg, attrs, generator=torch.Generator().manual_seed(4), guide=guide, **kw)
    ref = diffusers_ddim_sample(model, cfg, attrs, generator=torch.Generator().manual_seed(4), guide=guide, **kw)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    unguided = ddim_sample(model, cfg, attrs, generator=torch.Generator().manual_seed(4), **kw)
    assert (ours - unguided).abs().max() > 1e-2  # the guidance did something
