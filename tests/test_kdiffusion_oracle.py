"""Stock k-diffusion (0.1.1.post1) as the oracle for every sampler it shares with us.

Same denoiser (exact Gaussian, VE), same sigmas, same starting point, and for
the stochastic ones the same seeded noise sampler: outputs agree to 1e-5.  The
one documented difference is lms's last step (ComfyUI's rule: return the
denoised estimate at sigma -> 0; k-diffusion extrapolates its multistep formula).
"""
import pytest
import torch

from analytic import GaussianDenoiser
from ksampler.samplers import SAMPLERS
from ksampler.schedulers import karras_sigmas

SHARED_ODE = ["euler", "heun", "dpm_2", "dpmpp_2m"]
SHARED_ANCESTRAL = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"]
SHARED_SDE = ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]


def _setup():
    model = GaussianDenoiser(mu=0.3, s0=0.7)
    sigmas = karras_sigmas(12, 0.03, 14.6)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * 14.6
    return model, sigmas, x


def _seeded(shape):
    gen = torch.Generator().manual_seed(99)
    return lambda sigma, sigma_next: torch.randn(shape, generator=gen)


@pytest.mark.parametrize("name", SHARED_ODE + SHARED_ANCESTRAL + SHARED_SDE)
def test_matches_kdiffusion(kdiff, name):
    model, sigmas, x = _setup()
    kd = getattr(kdiff, f"sample_{name}")
    kw_ours, kw_ref = {}, {}
    if name in SHARED_ANCESTRAL or name in SHARED_SDE:
        kw_ours["noise_sampler"] = _seeded(x.shape)
        kw_ref["noise_sampler"] = _seeded(x.shape)
    ref = kd(model, x.clone(), sigmas, disable=True, **kw_ref)
    ours = SAMPLERS[name](model, x.clone(), sigmas, disable=True, **kw_ours)
    assert float((ref - ours).abs().max()) <= 1e-5


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_dpm_solver_matches_kdiffusion(kdiff, name):
    model, sigmas, x = _setup()
    sigma_min, sigma_max = float(sigmas[-2]), float(sigmas[0])
    if name == "dpm_fast":
        ref = kdiff.sample_dpm_fast(model, x.clone(), sigma_min, sigma_max, len(sigmas) - 1, disable=True)
    else:
        ref = kdiff.sample_dpm_adaptive(model, x.clone(), sigma_min, sigma_max, disable=True)
    ours = SAMPLERS[name](model, x.clone(), sigmas, disable=True)
    assert float((ref - ours).abs().max()) <= 1e-5


def test_lms_documented_last_step_difference(kdiff):
    model, sigmas, x = _setup()
    ref = kdiff.sample_lms(model, x.clone(), sigmas, disable=True)
    ours = SAMPLERS["lms"](model, x.clone(), sigmas, disable=True)
    assert float((ref - ours).abs().max()) > 1e-4, "the last step differs by design"
    # everything before the last step agrees: stop both one step early
    ref_early = kdiff.sample_lms(model, x.clone(), sigmas[:-1], disable=True)
    ours_early = SAMPLERS["lms"](model, x.clone(), sigmas[:-1], disable=True)
    assert float((ref_early - ours_early).abs().max()) <= 1e-5
    # and our last step returns the denoised estimate at the last non-zero sigma
    last = model(ours_early, sigmas[-2].expand(x.shape[0]))
    assert torch.allclose(ours, last, atol=1e-6)


def test_no_noise_drawn_for_plain_euler_heun_dpm2():
    """k-diffusion draws a noise tensor every step in euler/heun/dpm_2 even without churn; we draw none."""
    model, sigmas, x = _setup()
    calls = []

    def counting(sigma, sigma_next):
        calls.append(1)
        return torch.zeros_like(x)
    for name in ("euler", "heun", "dpm_2"):
        SAMPLERS[name](model, x.clone(), sigmas, disable=True, noise_sampler=counting)
    assert calls == []


def test_dpmpp_sde_builds_no_tree_at_eta_zero(monkeypatch):
    """k-diffusion builds the Brownian tree even at eta = 0; we never touch it then."""
    import ksampler.samplers.sde as dpm
    built = []
    monkeypatch.setattr(dpm, "BrownianTreeNoiseSampler", lambda *a, **k: built.append(1))
    model, sigmas, x = _setup()
    SAMPLERS["dpmpp_sde"](model, x.clone(), sigmas, disable=True, eta=0.0)
    SAMPLERS["dpmpp_2m_sde"](model, x.clone(), sigmas, disable=True, eta=0.0)
    assert built == []


def test_dpmpp_3m_is_kdiffusions_3m_sde_without_noise(kdiff):
    """Our ODE dpmpp_3m is k-diffusion's dpmpp_3m_sde at eta = 0 (its measured order follows from that formula)."""
    model, sigmas, x = _setup()
    ref = kdiff.sample_dpmpp_3m_sde(model, x.clone(), sigmas, disable=True, eta=0.0)
    ours = SAMPLERS["dpmpp_3m"](model, x.clone(), sigmas, disable=True)
    assert float((ref - ours).abs().max()) <= 1e-5
