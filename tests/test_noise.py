"""Noise: ComfyUI's seed semantics, the Brownian tree, the fast Brownian mode's statistics, and invariance options."""
import math

import pytest
import torch

from analytic import analytic_model, conditioning
from ksampler.pipeline import NoiseOptions, ksample
from ksampler.samplers import SAMPLERS, sampler_traits
from ksampler.samplers.noise import (BrownianPathNoiseSampler, BrownianTreeNoiseSampler, default_noise_sampler,
                                     item_seed, prepare_noise)


def test_ancestral_noise_uses_seed_plus_one_on_cpu():
    x = torch.zeros(2, 3)
    ns = default_noise_sampler(x, seed=10)
    gen = torch.Generator().manual_seed(11)
    assert torch.equal(ns(1.0, 0.5), torch.randn(2, 3, generator=gen))
    assert torch.equal(ns(0.5, 0.2), torch.randn(2, 3, generator=gen))


def test_cpu_option_draws_the_cpu_stream():
    x = torch.zeros(2, 3)
    a = default_noise_sampler(x, seed=4, cpu=True)(1.0, 0.5)
    b = default_noise_sampler(x, seed=4)(1.0, 0.5)
    assert torch.equal(a, b)


def test_prepare_noise_per_item_equals_plain_draw_for_multiples_of_16():
    latent = torch.zeros(3, 4, 8, 8)
    assert torch.equal(prepare_noise(latent, 9), prepare_noise(latent, 9, per_item=True))


def test_item_seeds_are_distinct_and_item_zero_keeps_the_seed():
    assert item_seed(5, 0) == 5
    seeds = {item_seed(s, k) for s in range(20) for k in range(20)}
    assert len(seeds) == 400


def test_brownian_tree_matches_torchsde_seeded_like_comfyui():
    import torchsde
    x = torch.zeros(2, 3)
    sigma_min, sigma_max = torch.tensor(0.03), torch.tensor(14.6)
    ns = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=42)
    tree = torchsde.BrownianTree(sigma_min, torch.zeros(2, 3), sigma_max, entropy=42)
    for a, b in [(14.6, 7.0), (7.0, 2.0), (2.0, 0.03)]:
        ta, tb = torch.tensor(a), torch.tensor(b)
        expected = -tree(tb, ta) / (tb - ta).abs().sqrt()
        assert torch.allclose(ns(ta, tb), expected, atol=1e-6)


def _paths(n=20000, seed=3, **kw):
    return BrownianPathNoiseSampler(torch.zeros(n, 1), seed=seed, **kw)


def test_fast_brownian_increments_are_standard_normal():
    ns = _paths()
    z = ns(2.0, 1.0).flatten()
    assert abs(float(z.mean())) < 0.03 and abs(float(z.var()) - 1) < 0.04


def test_fast_brownian_disjoint_increments_are_independent():
    ns = _paths()
    z1, z2, z3 = ns(3.0, 2.0).flatten(), ns(2.0, 1.5).flatten(), ns(1.5, 0.1).flatten()
    for a, b in ((z1, z2), (z2, z3), (z1, z3)):
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(corr) < 0.03
    for z in (z2, z3):
        assert abs(float(z.var()) - 1) < 0.04


def test_fast_brownian_nested_queries_follow_the_bridge():
    """W(0.3)-W(0) inside W(1)-W(0): correlation sqrt(0.3), as for a Brownian motion (the SDE samplers' substeps)."""
    ns = _paths()
    whole = ns(1.0, 0.0).flatten()
    part = ns(0.3, 0.0).flatten()
    assert abs(float(part.var()) - 1) < 0.04
    corr = float(torch.corrcoef(torch.stack([whole, part]))[0, 1])
    assert abs(corr - math.sqrt(0.3)) < 0.03
    # additivity is exact: W(1) - W(0) = (W(1) - W(0.3)) + (W(0.3) - W(0))
    rest = ns(1.0, 0.3).flatten()
    assert torch.allclose(whole * 1.0, rest * math.sqrt(0.7) + part * math.sqrt(0.3), atol=1e-5)


def test_fast_brownian_is_seeded_and_repeatable():
    a = _paths(n=8, seed=1)
    b = _paths(n=8, seed=1)
    c = _paths(n=8, seed=2)
    qa = [a(2.0, 1.0), a(1.0, 0.5)]
    qb = [b(2.0, 1.0), b(1.0, 0.5)]
    assert all(torch.equal(u, v) for u, v in zip(qa, qb))
    assert not torch.equal(qa[0], c(2.0, 1.0))


# --- batch invariance: item k alone equals item k of a batch of 4, for every sampler ---------------------
MODEL = analytic_model()


SDE = [n for n in SAMPLERS if sampler_traits(n).noise in ("brownian", "brownian_device")]


@pytest.mark.parametrize("name,brownian", [(n, "tree") for n in SAMPLERS] + [(n, "fast") for n in SDE])
def test_batch_invariant_noise_for_every_sampler(name, brownian):
    options = NoiseOptions(batch_invariant=True, brownian=brownian)
    pos, neg = conditioning(1.0), conditioning(-1.0)
    batch = ksample(MODEL, 21, 5, 3.0, name, "karras", pos, neg, {"samples": torch.zeros(4, 4, 8, 8)},
                    noise_options=options)["samples"]
    for k in (1, 3):
        alone = ksample(MODEL, 21, 5, 3.0, name, "karras", pos, neg,
                        {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [k]}, noise_options=options)["samples"]
        assert torch.allclose(batch[k], alone[0], atol=1e-5), f"{name}: item {k} depends on the batch"


@pytest.mark.parametrize("mask_kind", ["frames", "per_item"])
@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "uni_pc", "dpm_adaptive"])
def test_batch_invariant_noise_on_masked_video_latents(name, mask_kind):
    """Python API, video latents [B, C, T, H, W] with an inpainting mask: item k alone equals item k of the batch
    (a frames mask [T, H, W] applies to every item; a [B, 1, T, H, W] mask is split per item, also when a
    batch-coupled sampler (dpm_adaptive) runs item by item)."""
    from ksampler.models import EPS
    from ksampler.pipeline import sample
    from ksampler.samplers.noise import prepare_noise
    from ksampler.schedulers import sampling_sigmas
    from analytic import GaussianDenoiser
    model = GaussianDenoiser(model_sampling=EPS())
    latent = torch.randn(3, 2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(3, 4, 4) if mask_kind == "frames" else torch.rand(3, 1, 3, 4, 4)
    options = NoiseOptions(batch_invariant=True)
    sigmas = sampling_sigmas(model.model_sampling, "karras", 6)
    noise = prepare_noise(latent, 8, per_item=True)
    batch = sample(model, None, noise, latent, sigmas, None, name, 8, noise_mask=mask, noise_options=options)
    for k in (0, 2):
        item_mask = mask if mask_kind == "frames" else mask[k:k + 1]
        alone = sample(model, None, noise[k:k + 1], latent[k:k + 1], sigmas, None, name, 8, noise_mask=item_mask,
                       noise_options=options, batch_index=[k])
        assert torch.allclose(batch[k], alone[0], atol=1e-5), f"{name}: item {k} depends on the batch"


def test_without_the_option_ancestral_noise_depends_on_batch_size():
    """ComfyUI's default (kept for parity): one generator draws the whole batch's ancestral noise."""
    pos, neg = conditioning(1.0), conditioning(-1.0)
    batch = ksample(MODEL, 21, 5, 3.0, "euler_ancestral", "karras", pos, neg,
                    {"samples": torch.zeros(4, 4, 8, 8)})["samples"]
    alone = ksample(MODEL, 21, 5, 3.0, "euler_ancestral", "karras", pos, neg,
                    {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [1]})["samples"]
    assert not torch.allclose(batch[1], alone[0], atol=1e-3)


def test_fast_brownian_mode_is_a_different_but_valid_stream():
    pos, neg = conditioning(1.0), conditioning(-1.0)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    tree = ksample(MODEL, 3, 8, 3.0, "dpmpp_2m_sde", "karras", pos, neg, latent)["samples"]
    fast = ksample(MODEL, 3, 8, 3.0, "dpmpp_2m_sde", "karras", pos, neg, latent,
                   noise_options=NoiseOptions(brownian="fast"))["samples"]
    again = ksample(MODEL, 3, 8, 3.0, "dpmpp_2m_sde", "karras", pos, neg, latent,
                    noise_options=NoiseOptions(brownian="fast"))["samples"]
    assert torch.equal(fast, again) and not torch.allclose(fast, tree, atol=1e-3)
    assert torch.isfinite(fast).all()


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_churn_noise_is_seeded_by_the_run_and_keeps_the_marginal(flow):
    """Karras churn (s_churn) draws its noise from the run's seeded generator, in the model's geometry."""
    from analytic import GaussianDenoiser
    from ksampler.models import EPS, Flow
    from ksampler.pipeline import sample
    from ksampler.schedulers import sampling_sigmas
    model = GaussianDenoiser(0.5, 0.5, flow)
    ms = Flow(shift=3.0) if flow else EPS()
    model.model_sampling = ms
    sigmas = sampling_sigmas(ms, "karras", 60)
    noise = torch.randn(4096, 1, generator=torch.Generator().manual_seed(1))

    def run(seed):
        return sample(model, ms, noise, torch.zeros_like(noise), sigmas, None, "heun", seed,
                      sampler_options={"s_churn": 40.0})
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert abs(float(a.mean()) - 0.5) < 0.05 and abs(float(a.std()) / 0.5 - 1) < 0.06


def test_brownian_tree_too_fine_for_torchsde_continues_on_a_path(caplog):
    """35 steps at denoise 1/256 on a flow model: torchsde's tree recurses without bound (ComfyUI raises
    RecursionError); ours warns once and finishes on a Brownian path with the same seed, reproducibly."""
    model = analytic_model(flow=True)
    latent = {"samples": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(35))}
    runs = []
    for _ in range(2):
        with caplog.at_level("WARNING", logger="ksampler"):
            runs.append(ksample(model, 3, 35, 1.0, "dpmpp_sde", "exponential", conditioning(1.0),
                                conditioning(-1.0), latent, 1 / 256)["samples"])
    assert "cannot resolve noise levels" in caplog.text
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], latent["samples"])


def test_brownian_tree_fallback_path_keeps_the_law():
    """The fallback's increments are standard normal, like the tree's."""
    x = torch.zeros(4000)
    sampler = BrownianTreeNoiseSampler(x, 0.1, 1.0, seed=5)
    sampler._paths = [BrownianPathNoiseSampler(x, 5)]   # as after a failed tree query
    draw = sampler(0.5, 0.4)
    assert abs(float(draw.mean())) < 0.1 and abs(float(draw.std()) - 1) < 0.05
