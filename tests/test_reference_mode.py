"""Reference mode (samplers/reference.py): where and how ComfyUI's own form of a sampler is run.

Bit-exact agreement with ComfyUI itself is measured by ../shared/comfyui/parity.py (README, "Parity"); here CI
checks what it can: the table is complete and explained, the one selection rule picks what it says, the
switches that turn reference mode on keep working, and the reference forms agree with ours to rounding where
they differ only in rounding.
"""
import dataclasses

import pytest
import torch

from analytic import analytic_model, conditioning
from ksampler.models import EPS
from ksampler.pipeline import ksample
from ksampler.samplers import SAMPLERS, sampler_traits
from ksampler.samplers import reference
from ksampler.samplers.multistep import deis_coefficients, lms_coefficients
from ksampler.samplers.reference import REFERENCE_VARIANTS, lms_coefficients_quadpack, select
from ksampler.validation import KSamplerInputError
from ksampler.schedulers import calculate_sigmas

ROUNDING = {"lms", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
            "dpmpp_3m_sde_gpu"}
VE_GEOMETRY = {"ddpm", "res_multistep_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
               "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"}


def test_every_reference_variant_is_a_registered_sampler_with_a_one_line_reason():
    assert set(REFERENCE_VARIANTS) == ROUNDING | VE_GEOMETRY
    for name, variant in REFERENCE_VARIANTS.items():
        assert name in SAMPLERS
        assert variant.reason and "\n" not in variant.reason
        assert variant.ve_geometry == (name in VE_GEOMETRY)


def test_default_mode_runs_the_registry_function_unless_the_noise_is_comfyuis_tree():
    for name, fn in SAMPLERS.items():
        chosen, ve = select(name, fn, reference_mode=False, comfy_noise=False)
        assert chosen is fn and not ve
        chosen, ve = select(name, fn, reference_mode=False, comfy_noise=True)
        with_tree = name in REFERENCE_VARIANTS and REFERENCE_VARIANTS[name].with_comfy_noise
        assert (chosen is not fn) == with_tree and not ve


def test_reference_mode_runs_the_table_entry_with_its_geometry():
    for name, fn in SAMPLERS.items():
        chosen, ve = select(name, fn, reference_mode=True, comfy_noise=False)
        variant = REFERENCE_VARIANTS.get(name)
        assert chosen is (fn if variant is None or variant.run is None else variant.run)
        assert ve == (variant is not None and variant.ve_geometry)


def test_reference_variants_keep_the_registry_traits():
    for name, variant in REFERENCE_VARIANTS.items():
        if variant.run is not None:
            assert variant.run.sampler_traits.noise == sampler_traits(name).noise


@pytest.mark.parametrize("name", sorted(ROUNDING))
@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_reference_mode_runs_the_variant_and_agrees_to_rounding(name, flow, monkeypatch):
    model = analytic_model(flow=flow)
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    args = (model, 7, 8, 3.0, name, "karras", conditioning(1.0), conditioning(-1.0), latent)
    default = ksample(*args, noise_options=None)["samples"]
    variant, calls = REFERENCE_VARIANTS[name], []

    def spy(*a, **k):
        calls.append(name)
        return variant.run(*a, **k)
    monkeypatch.setitem(REFERENCE_VARIANTS, name, dataclasses.replace(variant, run=spy))
    ref = ksample(*args, reference_mode=True)["samples"]
    assert calls == [name]
    assert torch.isfinite(ref).all()
    assert float((ref - default).abs().max()) <= 1e-4 * float(default.std())


def test_the_former_compat_keyword_still_selects_reference_mode():
    model = analytic_model(flow=True)
    args = (model, 3, 6, 3.0, "ddpm", "karras", conditioning(1.0), conditioning(-1.0),
            {"samples": torch.zeros(1, 4, 8, 8)})
    ref = ksample(*args, reference_mode=True)["samples"]
    assert torch.equal(ksample(*args, compat=True)["samples"], ref)
    assert not torch.equal(ksample(*args)["samples"], ref)


def test_the_environment_variable_and_node_input_keep_their_values(monkeypatch):
    monkeypatch.delenv("KSAMPLER_FLOW_GEOMETRY", raising=False)
    assert reference.default_reference_mode() is False
    monkeypatch.setenv("KSAMPLER_FLOW_GEOMETRY", "comfyui")
    assert reference.default_reference_mode() is True
    monkeypatch.setenv("KSAMPLER_FLOW_GEOMETRY", "bogus")
    with pytest.raises(ValueError, match="KSAMPLER_FLOW_GEOMETRY"):
        reference.default_reference_mode()
    assert [reference.reference_mode_from_input(v) for v in ("default", "exact", "comfyui")] == [None, False, True]
    for bad in ("ComfyUI", "", None, True):  # never silently 'exact'
        with pytest.raises(KSamplerInputError, match="^flow_geometry: must be one of default, exact, comfyui"):
            reference.reference_mode_from_input(bad)


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
