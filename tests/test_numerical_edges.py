"""Numerical edge cases: schedules whose noise levels float32 can barely (or cannot) tell apart."""
import pytest
import torch

from analytic import analytic_model, conditioning
from ksampler.nodes import KSampler
from ksampler.samplers import SAMPLERS


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_noise_levels_float32_can_barely_separate(sampler, flow):
    """Karras, 25 steps at denoise 1/64: neighbouring noise levels differ by ~0.5 %, and on the flow model two of
    DEIS's float32 VP times coincide (ComfyUI's latent turns NaN there). Every sampler must stay finite."""
    model = analytic_model(flow=flow)
    latent = {"samples": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(25))}
    out = KSampler().sample(model, 3, 25, 3.0, sampler, "karras", conditioning(1.0), conditioning(-1.0),
                            latent, 1 / 64)[0]["samples"]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", ["sa_solver", "sa_solver_pece"])
def test_sa_solver_with_noise_levels_float32_cannot_separate(sampler):
    """28 steps at denoise 1/256: float32 lambdas repeat, so the float32 Lagrange system is singular (ComfyUI
    raises LinAlgError); ours runs the step algebra in float64 and returns a finite, reproducible result."""
    model = analytic_model(flow=False)
    latent = {"samples": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(28))}
    runs = [KSampler().sample(model, 3, 28, 1.0, sampler, "polyexponential", conditioning(1.0), conditioning(-1.0),
                              latent, 1 / 256)[0]["samples"] for _ in range(2)]
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])
