"""CFG guidance over ComfyUI conditioning: weighting, areas, masks, timestep ranges and batching."""
import pytest
import torch

from analytic import analytic_model, conditioning, gaussian_denoiser
from ksampler.conditioning import Guidance, KSamplerInputError

MODEL = analytic_model()
MS = MODEL.model_sampling
SHAPE = (1, 4, 16, 16)


def _bind(positive, negative, cfg=1.0):
    return Guidance(positive, negative, cfg).bind(MODEL, MS, SHAPE, torch.device("cpu"))


def _x(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * 3


def _sigma(value=2.0):
    return torch.full((SHAPE[0],), value)


def _single(value, x, sigma):
    """The model's denoised estimate for one prompt value (no guidance)."""
    return MODEL.apply_model(x, sigma, context=conditioning(value)[0][0].expand(x.shape[0], -1, -1))


def test_cfg_formula():
    x, s = _x(), _sigma()
    guided = _bind(conditioning(1.0), conditioning(-1.0), cfg=4.0)(x, s)
    cond, uncond = _single(1.0, x, s), _single(-1.0, x, s)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-5)


def test_entries_are_averaged_by_strength():
    x, s = _x(), _sigma()
    positive = conditioning(1.0, strength=1.0) + conditioning(-0.5, strength=3.0)
    out = _bind(positive, None)(x, s)
    expected = (_single(1.0, x, s) * 1.0 + _single(-0.5, x, s) * 3.0) / 4.0
    assert torch.allclose(out, expected, atol=1e-5)


def test_area_conditioning_covers_its_region_with_feathered_edges():
    x, s = _x(), _sigma()
    positive = conditioning(1.0) + conditioning(-1.0, area=(16, 8, 0, 0))  # (h, w, y, x): the left half
    out = _bind(positive, None)(x, s)
    full, left = _single(1.0, x, s), _single(-1.0, x, s)
    assert torch.allclose(out[..., 8:], full[..., 8:], atol=1e-5), "outside the area only the full entry counts"
    assert torch.allclose(out[..., :4], (full[..., :4] + left[..., :4]) / 2, atol=1e-5), "inside: equal weights"
    # the area's inner edge is feathered over min(8, width // 4) = 2 columns: weight 1/2 at the last column
    edge = out[..., 7]
    expected = (full[..., 7] + 0.5 * left[..., 7]) / 1.5
    assert torch.allclose(edge, expected, atol=1e-5)


def test_percentage_area_is_resolved_against_the_latent():
    x, s = _x(), _sigma()
    a = _bind(conditioning(1.0) + conditioning(-1.0, area=("percentage", 1.0, 0.5, 0.0, 0.0)), None)(x, s)
    b = _bind(conditioning(1.0) + conditioning(-1.0, area=(16, 8, 0, 0)), None)(x, s)
    assert torch.allclose(a, b)


def test_mask_conditioning_weights_by_mask_and_strength():
    x, s = _x(), _sigma()
    mask = torch.zeros(1, 32, 32)  # pixel-size mask, resized to the 16x16 latent
    mask[:, :, :16] = 1.0
    positive = conditioning(1.0) + conditioning(-1.0, mask=mask, mask_strength=0.5)
    out = _bind(positive, None)(x, s)
    full, masked = _single(1.0, x, s), _single(-1.0, x, s)
    assert torch.allclose(out[..., 10:], full[..., 10:], atol=1e-5)
    assert torch.allclose(out[..., :6], (full[..., :6] + 0.5 * masked[..., :6]) / 1.5, atol=1e-5)


def test_start_end_percent_limit_an_entry_to_part_of_the_schedule():
    x = _x()
    positive = conditioning(1.0) + conditioning(-1.0, start_percent=0.5, end_percent=1.0)
    den = _bind(positive, None)
    split = MS.percent_to_sigma(0.5)
    early, late = _sigma(split * 1.5), _sigma(split * 0.5)
    assert torch.allclose(den(x, early), _single(1.0, x, early), atol=1e-5), "inactive before start_percent"
    both = (_single(1.0, x, late) + _single(-1.0, x, late)) / 2
    assert torch.allclose(den(x, late), both, atol=1e-5), "active after start_percent"


def test_positive_and_negative_share_one_batched_call():
    den = _bind(conditioning(1.0, tokens=4), conditioning(-1.0, tokens=8), cfg=3.0)
    den(_x(), _sigma())
    assert den.model_calls == 1 and den.items_evaluated == 2, "token counts 4 and 8 concatenate (LCM 8)"
    den = _bind(conditioning(1.0, tokens=3), conditioning(-1.0, tokens=7), cfg=3.0)
    den(_x(), _sigma())
    assert den.model_calls == 2, "token counts 3 and 7 would need 7x padding: two calls"


def test_cfg_one_skips_the_negative_unless_the_sampler_needs_it():
    den = _bind(conditioning(1.0), conditioning(-1.0), cfg=1.0)
    x, s = _x(), _sigma()
    den(x, s)
    assert den.items_evaluated == 1
    guided, uncond = den.denoise_with_uncond(x, s)
    assert den.items_evaluated == 3
    assert torch.allclose(guided, _single(1.0, x, s), atol=1e-5)
    assert torch.allclose(uncond, _single(-1.0, x, s), atol=1e-5)


def test_negative_may_be_omitted_only_at_cfg_one():
    _bind(conditioning(1.0), [], cfg=1.0)
    with pytest.raises(KSamplerInputError, match="negative"):
        Guidance(conditioning(1.0), [], 5.0)


def test_conditioning_inputs_are_not_modified():
    positive = conditioning(1.0, area=(8, 8, 0, 0), strength=2.0) + conditioning(0.5, start_percent=0.2)
    negative = conditioning(-1.0)
    before = [(t.clone(), dict(d)) for t, d in positive + negative]
    den = _bind(positive, negative, cfg=2.0)
    den(_x(), _sigma())
    after = positive + negative
    assert len(after) == len(before)
    for (t, d), (t0, d0) in zip(after, before):
        assert torch.equal(t, t0) and d == d0


def test_exact_guided_estimate_on_gaussian_data():
    """The analytic network's estimate is the Gaussian posterior mean for the prompt's mean (a check of the fixture)."""
    x, s = _x(), _sigma(0.7)
    out = _single(0.3, x, s)
    sigma_table = MS.sigma(MS.timestep(s))  # the discrete model sees the nearest training sigma
    assert torch.allclose(out, gaussian_denoiser(x * 1.0, s, 0.3, 0.8), atol=0.05 * float((s - sigma_table).abs() + 1))
