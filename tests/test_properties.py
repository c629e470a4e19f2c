"""Properties over the whole registries (hypothesis): every sampler x scheduler x model kind, through both nodes.

Outputs are finite and shaped like the input, schedules descend to 0, and no input is ever changed.
"""
import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytic import MODEL_KINDS, analytic_model, conditioning
from ksampler.nodes import KSampler, KSamplerAdvanced
from ksampler.samplers import SAMPLERS, sampler_traits
from ksampler.schedulers import SCHEDULERS, sampling_sigmas


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(sampler=st.sampled_from(list(SAMPLERS)), scheduler=st.sampled_from(list(SCHEDULERS)),
       steps=st.integers(1, 60), denoise=st.floats(0.0, 1.0), cfg=st.floats(0.0, 15.0),
       kind=st.sampled_from(MODEL_KINDS))
def test_property_sigmas_and_outputs(sampler, scheduler, steps, denoise, cfg, kind):
    model = analytic_model(kind=kind)
    sigmas = sampling_sigmas(model.model_sampling, scheduler, steps, denoise,
                             sampler_traits(sampler).discard_penultimate_sigma)
    assert torch.isfinite(sigmas).all()
    if len(sigmas):
        assert bool((sigmas[1:] < sigmas[:-1]).all()) and float(sigmas[-1]) == 0.0
    latent = {"samples": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(steps))}
    positive, negative = conditioning(1.0), conditioning(-1.0)
    snapshot = copy.deepcopy((latent, positive, negative))
    out = KSampler().sample(model, 3, steps, cfg, sampler, scheduler, positive, negative, latent, denoise)[0]
    assert torch.isfinite(out["samples"]).all()
    assert torch.equal(latent["samples"], snapshot[0]["samples"])
    assert torch.equal(positive[0][0], snapshot[1][0][0]) and positive[0][1] == snapshot[1][0][1]
    assert torch.equal(negative[0][0], snapshot[2][0][0])


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(sampler=st.sampled_from(list(SAMPLERS)), scheduler=st.sampled_from(list(SCHEDULERS)),
       steps=st.integers(1, 40), bounds=st.tuples(st.integers(0, 45), st.integers(0, 45)),
       cfg=st.floats(0.0, 15.0), kind=st.sampled_from(MODEL_KINDS), batch=st.integers(1, 3), add_noise=st.booleans(),
       leftover=st.booleans(), batch_invariant=st.booleans(), cpu_noise=st.booleans(),
       brownian=st.sampled_from(["tree", "fast"]), geometry=st.sampled_from(["default", "exact", "comfyui"]),
       rho=st.floats(0.5, 30.0), masked=st.booleans())
def test_property_advanced_node(sampler, scheduler, steps, bounds, cfg, kind, batch, add_noise, leftover,
                                batch_invariant, cpu_noise, brownian, geometry, rho, masked):
    """KSamplerAdvanced over its whole surface: the output is finite, keeps the latent's shape, leaves every input
    untouched, and a start step at or past the end returns the latent unchanged."""
    start, end = bounds
    model = analytic_model(kind=kind)
    latent = {"samples": torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(steps))}
    if masked:
        latent["noise_mask"] = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(start))
    positive, negative = conditioning(1.0), conditioning(-1.0)
    snapshot = copy.deepcopy((latent, positive, negative))
    out = KSamplerAdvanced().sample(model, "enable" if add_noise else "disable", 7, steps, cfg, sampler, scheduler,
                                    positive, negative, latent, start, end, "enable" if leftover else "disable",
                                    batch_invariant, cpu_noise, brownian, geometry, rho)[0]
    assert out["samples"].shape == latent["samples"].shape and torch.isfinite(out["samples"]).all()
    n_steps = len(sampling_sigmas(model.model_sampling, scheduler, steps, 1.0,
                                  sampler_traits(sampler).discard_penultimate_sigma)) - 1  # ddim_uniform: not steps
    if start >= min(n_steps, end):
        assert torch.equal(out["samples"], latent["samples"])
    assert out is not latent and torch.equal(latent["samples"], snapshot[0]["samples"])
    assert set(latent) == set(snapshot[0])
    assert torch.equal(positive[0][0], snapshot[1][0][0]) and positive[0][1] == snapshot[1][0][1]
    assert torch.equal(negative[0][0], snapshot[2][0][0])
