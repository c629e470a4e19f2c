"""The shared suite: every sampler and every scheduler in the registries, on tiny deterministic tensors."""
import math

import pytest
import torch

from analytic import (MODEL_KINDS, GaussianCFGDenoiser, GaussianDenoiser, analytic_model, conditioning,
                      gaussian_denoiser)
from ksampler.models import EPS, Flow
from ksampler.pipeline import sample
from ksampler.samplers import COMFY_SAMPLER_NAMES, SAMPLERS, register_sampler, sampler_traits
from ksampler.schedulers import COMFY_SCHEDULER_NAMES, SCHEDULERS, calculate_sigmas, sampling_sigmas

ALL_SAMPLERS = list(SAMPLERS)
ALL_SCHEDULERS = list(SCHEDULERS)


def _run(name, seed=1, flow=False, steps=8, cfg_model=True, shape=(2, 3, 4, 4)):
    model = GaussianCFGDenoiser(flow=flow) if cfg_model else GaussianDenoiser(flow=flow)
    ms = EPS() if not flow else model.model_sampling
    model.model_sampling = ms
    sigmas = sampling_sigmas(ms, "karras", steps, discard_penultimate_sigma=sampler_traits(name).discard_penultimate_sigma)
    gen = torch.Generator().manual_seed(123)
    noise = torch.randn(shape, generator=gen)
    latent = torch.zeros_like(noise)
    return sample(model, ms, noise, latent, sigmas, None, name, seed)


def test_comfy_names_first_in_order():
    expected = ("euler euler_cfg_pp euler_ancestral euler_ancestral_cfg_pp heun heunpp2 exp_heun_2_x0 "
                "exp_heun_2_x0_sde dpm_2 dpm_2_ancestral lms dpm_fast dpm_adaptive dpmpp_2s_ancestral "
                "dpmpp_2s_ancestral_cfg_pp dpmpp_sde dpmpp_sde_gpu dpmpp_2m dpmpp_2m_cfg_pp dpmpp_2m_sde "
                "dpmpp_2m_sde_gpu dpmpp_2m_sde_heun dpmpp_2m_sde_heun_gpu dpmpp_3m_sde dpmpp_3m_sde_gpu ddpm lcm "
                "ipndm ipndm_v deis cfgpp_ud10_ab res_multistep res_multistep_cfg_pp res_multistep_ancestral "
                "res_multistep_ancestral_cfg_pp gradient_estimation gradient_estimation_cfg_pp er_sde seeds_2 "
                "seeds_3 sa_solver sa_solver_pece ddim uni_pc uni_pc_bh2").split()
    assert list(COMFY_SAMPLER_NAMES) == expected
    assert ALL_SAMPLERS[:45] == expected
    assert list(COMFY_SCHEDULER_NAMES) == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                           "normal", "linear_quadratic", "kl_optimal"]
    assert ALL_SCHEDULERS[:9] == list(COMFY_SCHEDULER_NAMES)


@pytest.mark.parametrize("kind", [k for k in MODEL_KINDS if k != "flow"])
def test_analytic_network_gives_the_exact_denoiser_for_every_prediction_type(kind):
    """The test network's raw output, through the model sampling's conversion, is the exact Gaussian denoiser."""
    model = analytic_model(kind=kind)
    ms = model.model_sampling
    sigma = ms.sigmas[[10, 400, 990]]
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * (1 + sigma.reshape(-1, 1, 1, 1))
    context = conditioning(0.7)[0][0].expand(3, -1, -1)
    expected = gaussian_denoiser(x, sigma, 0.7, 0.8)
    torch.testing.assert_close(model.apply_model(x, sigma, context=context), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_sampler_shape_finite_deterministic(name, flow):
    a = _run(name, seed=1, flow=flow)
    b = _run(name, seed=1, flow=flow)
    assert a.shape == (2, 3, 4, 4) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), "same inputs and seed must give bit-identical output"


@pytest.mark.parametrize("shape", [(2, 3, 6), (2, 3, 2, 4, 4)], ids=["audio", "video"])
@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_sampler_on_audio_and_video_latents(name, shape):
    """[B, C, L] and [B, C, T, H, W] latents: same contract, and each element follows the same path as in 4-D."""
    a = _run(name, seed=1, flow=True, shape=shape)
    assert a.shape == shape and torch.isfinite(a).all() and torch.equal(a, _run(name, seed=1, flow=True, shape=shape))
    if not sampler_traits(name).stochastic:  # elementwise maths: the layout does not change a single value
        flat = _run(name, seed=1, flow=True, shape=(2, 3, math.prod(shape[2:]), 1))
        torch.testing.assert_close(a.reshape(flat.shape), flat, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in ALL_SAMPLERS if sampler_traits(n).stochastic])
def test_stochastic_sampler_is_seed_sensitive(name):
    a = _run(name, seed=1)
    b = _run(name, seed=2)
    assert not torch.allclose(a, b), f"{name} should depend on the seed"


@pytest.mark.parametrize("name", [n for n in ALL_SAMPLERS if not sampler_traits(n).stochastic])
def test_deterministic_sampler_ignores_seed(name):
    assert torch.equal(_run(name, seed=1), _run(name, seed=2))


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_sampler_leaves_inputs_untouched(name):
    model = GaussianCFGDenoiser()
    ms = EPS()
    model.model_sampling = ms
    sigmas = sampling_sigmas(ms, "normal", 5)
    noise = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros_like(noise)
    copies = sigmas.clone(), noise.clone(), latent.clone()
    sample(model, ms, noise, latent, sigmas, None, name, 3)
    assert torch.equal(sigmas, copies[0]) and torch.equal(noise, copies[1]) and torch.equal(latent, copies[2])


def test_global_rng_untouched():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    for name in ["euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "ddpm", "lcm", "sa_solver", "er_sde", "restart"]:
        _run(name, seed=7)
    assert torch.equal(torch.rand(3), expected), "sampling must not draw from or reseed the global RNG"


SCHED_MODELS = {"eps": EPS(), "flow": Flow(shift=3.0), "zsnr": EPS(zero_terminal_snr=True)}


@pytest.mark.parametrize("model_kind", list(SCHED_MODELS))
@pytest.mark.parametrize("name", ALL_SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 60])
def test_scheduler_contract(name, steps, model_kind):
    ms = SCHED_MODELS[model_kind]
    sigmas = calculate_sigmas(ms, name, steps)
    assert sigmas.dtype == torch.float32 and sigmas.ndim == 1
    assert torch.isfinite(sigmas).all()
    assert float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all()), f"{name} must be strictly descending: {sigmas}"
    if name == "ddim_uniform":
        # ComfyUI's definition strides the 1000 training steps by 1000 // steps, which can add a step
        assert steps + 1 <= len(sigmas) <= steps + 1 + math.ceil(steps / 2)
    else:
        assert len(sigmas) == steps + 1


@pytest.mark.parametrize("name", ALL_SCHEDULERS)
def test_scheduler_bounds(name):
    ms = EPS()
    sigmas = calculate_sigmas(ms, name, 10)
    assert float(sigmas[0]) <= float(ms.sigma_max) * 1.0001
    assert float(sigmas[-2]) >= float(ms.sigma_min) * 0.9999 - 1e-6


@pytest.mark.parametrize("discard", [False, True])
@pytest.mark.parametrize("denoise", [1.0, 0.75, 0.5, 0.2])
def test_denoise_rule_runs_exactly_steps(denoise, discard):
    ms = EPS()
    sigmas = sampling_sigmas(ms, "karras", 10, denoise, discard)
    assert len(sigmas) == 11
    full = sampling_sigmas(ms, "karras", 10, 1.0, discard)
    if denoise < 1:
        assert float(sigmas[0]) < float(full[0])
    else:
        assert torch.equal(sigmas, full)
    assert len(sampling_sigmas(ms, "karras", 10, 0.0)) == 0


def test_discard_penultimate_sigma():
    ms = EPS()
    plain = calculate_sigmas(ms, "karras", 11)
    dropped = sampling_sigmas(ms, "karras", 10, discard_penultimate_sigma=True)
    assert torch.equal(dropped, torch.cat([plain[:-2], plain[-1:]]))
    assert sampler_traits("dpm_2").discard_penultimate_sigma and sampler_traits("uni_pc").discard_penultimate_sigma
    assert not sampler_traits("euler").discard_penultimate_sigma


def test_register_kdiffusion_function_in_one_call(kdiff):
    name = "kd_euler_ancestral_test"
    try:
        register_sampler(name, kdiff.sample_euler_ancestral, noise="ancestral")
        assert sampler_traits(name).noise == "ancestral"
        a = _run(name, seed=5, cfg_model=False)
        b = _run("euler_ancestral", seed=5, cfg_model=False)
        assert torch.allclose(a, b, atol=1e-5), "k-diffusion's own function must run through our pass"
        with pytest.raises(ValueError, match="already registered"):
            register_sampler(name, kdiff.sample_euler)
    finally:
        SAMPLERS.pop(name, None)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="sampler_name"):
        _run("euler_typo")
    with pytest.raises(ValueError, match="scheduler"):
        calculate_sigmas(EPS(), "karas", 10)


@pytest.mark.parametrize("ms", [EPS(), Flow(shift=3.0)], ids=["eps", "flow"])
def test_ancestral_step_at_eta_zero_is_the_plain_ode_step(ms):
    """eta = 0 adds no noise at all (the flow formula alone would leave a float32 rounding residue of ~2e-4)."""
    sigmas = calculate_sigmas(ms, "linear_quadratic", 6)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        sigma_down, sigma_up, scale = ms.ancestral_step(sigma, sigma_next, 0.0)
        assert float(sigma_down) == float(sigma_next) and float(sigma_up) == 0.0 and float(scale) == 1.0
    sigma_down, sigma_up, scale = ms.ancestral_steps(sigmas, 0.0)
    assert torch.equal(sigma_down, sigmas[1:]) and not sigma_up.any() and bool((scale == 1).all())
