"""ComfyUI-compat mode for the samplers whose float32 rounding ComfyUI reproduces differently (traits.comfy_rounding).

Their compat variants (lms: QUADPACK weights over float32 basis values; the multistep SDE samplers: float32
scalars and tensor-by-tensor divided differences, used by default too with ComfyUI's Brownian tree) are checked
here for what CI can check: they are the ones compat mode runs, and they agree with the default implementations
to rounding.  Bit-exact agreement with ComfyUI itself is measured by ../shared/comfyui/parity.py (README, "Parity").
"""
import functools

import pytest
import torch

from analytic import analytic_model, conditioning
from ksampler.models import EPS
from ksampler.pipeline import ksample
from ksampler.samplers import SAMPLERS, sampler_traits
from ksampler.samplers.karras import deis_coefficients, lms_coefficients, lms_coefficients_quadpack
from ksampler.schedulers import calculate_sigmas

ROUNDING = [name for name in SAMPLERS if sampler_traits(name).comfy_rounding]


def test_the_rounding_variants_are_the_expected_samplers():
    assert set(ROUNDING) == {"lms", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
                             "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"}
    assert all(callable(getattr(SAMPLERS[name], "comfy_variant", None)) for name in ROUNDING)


@pytest.mark.parametrize("name", ROUNDING)
@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_compat_runs_the_variant_and_agrees_to_rounding(name, flow, monkeypatch):
    model = analytic_model(flow=flow)
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    args = (model, 7, 8, 3.0, name, "karras", conditioning(1.0), conditioning(-1.0), latent)
    default = ksample(*args)["samples"]
    variant, calls = SAMPLERS[name].comfy_variant, []

    @functools.wraps(variant)   # keeps the signature: the pipeline passes options by what it accepts
    def spy(*a, **k):
        calls.append(name)
        return variant(*a, **k)
    monkeypatch.setattr(SAMPLERS[name], "comfy_variant", spy)
    compat = ksample(*args, compat=True)["samples"]
    assert calls == [name]
    assert torch.isfinite(compat).all()
    assert float((compat - default).abs().max()) <= 1e-4 * float(default.std())


def test_lms_quadpack_weights_match_the_exact_ones():
    sig = calculate_sigmas(EPS(), "karras", 12).tolist()
    for i in range(1, 11):
        order = min(i + 1, 4)
        exact, quad = lms_coefficients(sig, i, order), lms_coefficients_quadpack(sig, i, order)
        assert quad == pytest.approx(exact, rel=1e-4, abs=1e-6)


def test_deis_float32_weights_match_the_float64_ones():
    sigmas = calculate_sigmas(EPS(), "karras", 12)
    exact, f32 = deis_coefficients(sigmas, 3), deis_coefficients(sigmas, 3, comfy_float32=True)
    for row_exact, row_f32 in zip(exact[:-1], f32[:-1]):
        assert row_f32 == pytest.approx(row_exact, rel=1e-3, abs=1e-5)
