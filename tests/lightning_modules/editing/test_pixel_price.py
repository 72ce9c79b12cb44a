"""Issue 30: the pixel price of the real edit pipeline holds for what ``encode`` does. "fresh" does not read the
image (so its price 0 is true), "noise" clips the image to [-1, 1] first (so the sensitivity 2 sqrt(3 r r) the
price assumes is enforced), and ``pixel_mus`` is the Gaussian mu of the schedule's alpha_prod at t0, one per
attempt of the check's re-do ladder. On a tiny random UNet."""

import math

import pytest
import torch
from dp_helpers import face_unet

from veil.lightning_modules.diffusion.schedule import default_scheduler_config
from veil.lightning_modules.editing.editor import PrivateEditor
from veil.privacy.accounting import gaussian_mu

NAMES = ["smiling", "eyeglasses", "hat", "dark_hair", "beard", "pale_skin"]
PROTECTED = ["eyeglasses"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def editor():
    return PrivateEditor(face_unet(seed=0), default_scheduler_config(), NAMES, num_steps=10, guidance_scale=2.0)


def _images(seed, n=2, r=32):
    return torch.rand((n, 3, r, r), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_fresh_does_not_read_the_image(editor):
    x1, x2 = _images(1), _images(2)
    a = torch.zeros((2, len(NAMES)))
    z = torch.randn(x1.shape, generator=torch.Generator().manual_seed(3))
    for strength in (0.5, 1.0):
        one = editor.encode(x1, a, strength=strength, protected=PROTECTED, encoding="fresh", noise=z)
        two = editor.encode(x2, a, strength=strength, protected=PROTECTED, encoding="fresh", noise=z)
        assert torch.equal(one, two)
        ab = editor.alphas_cumprod[editor.timesteps(strength)[-1]]
        torch.testing.assert_close(one, (1 - ab).sqrt() * z)  # the forward process of a blank: noise only
    assert not torch.equal(editor.encode(x1, a, strength=0.5, protected=PROTECTED, encoding="noise", noise=z),
                           editor.encode(x2, a, strength=0.5, protected=PROTECTED, encoding="noise", noise=z))


def test_noise_clips_the_image_to_the_domain_its_price_assumes(editor):
    a = torch.zeros((2, len(NAMES)))
    z = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(4))
    loud = torch.full((2, 3, 32, 32), 5.0)
    code = editor.encode(loud, a, strength=0.5, protected=PROTECTED, encoding="noise", noise=z)
    assert torch.equal(code, editor.encode(torch.ones_like(loud), a, strength=0.5, protected=PROTECTED,
                                           encoding="noise", noise=z))
    partly = _images(5)
    partly[:, :, :8] = -7.0  # out of range in a band only: the rest passes through as it is
    clipped = partly.clamp(-1, 1)
    code = editor.encode(partly, a, strength=0.5, protected=PROTECTED, encoding="noise", noise=z)
    torch.testing.assert_close(code, editor.encode(clipped, a, strength=0.5, protected=PROTECTED, encoding="noise",
                                                   noise=z), rtol=0, atol=0)
    ab = editor.alphas_cumprod[editor.timesteps(0.5)[-1]]
    torch.testing.assert_close(code, ab.sqrt() * clipped + (1 - ab).sqrt() * z)


def test_pixel_mus_are_the_gaussian_of_the_schedule(editor, monkeypatch):
    r = editor.resolution
    sensitivity = 2 * math.sqrt(3 * r * r)
    for strength in (0.5, 1.0):
        t0 = editor.timesteps(strength)[-1]
        signal = float(editor.alphas_cumprod[t0])
        [mu] = editor.pixel_mus(strength=strength, encoding="noise", check=False)
        assert mu == pytest.approx(gaussian_mu(signal=signal, sensitivity=sensitivity), rel=1e-6)
        assert mu == pytest.approx(math.sqrt(signal / (1 - signal)) * sensitivity, rel=1e-6) and mu > 0
    assert editor.pixel_mus(strength=1.0, encoding="fresh", check=False) == [0.0]
    assert editor.pixel_mus(strength=0.4, encoding="invert", check=False) == [math.inf]
    assert not editor.can_check and len(editor.pixel_mus(strength=0.5, encoding="noise", check=True)) == 1
    # an editor that checks may re-do along its ladder: each re-do is another encoding, each priced
    monkeypatch.setattr(PrivateEditor, "can_check", property(lambda self: True))
    ladder = editor.retry_ladder(0.5)
    mus = editor.pixel_mus(strength=0.5, encoding="noise", check=True)
    assert len(ladder) > 1 and len(mus) == len(ladder)
    assert mus == pytest.approx([editor.pixel_mus(strength=s, encoding="noise", check=False)[0] for s, _ in ladder])
    assert editor.pixel_mus(strength=1.0, encoding="fresh", check=True) == [0.0] * len(editor.retry_ladder(1.0))
