"""Bad input to the core pipeline (sample, ksample, Guidance, schedulers, model samplings) gets one clear error
naming the input, before any work; valid edge inputs (areas past the latent's edge, repeating masks) still run."""
import copy

import pytest
import torch

from analytic import GaussianDenoiser, analytic_model, conditioning
from ksampler.conditioning import Guidance, KSamplerInputError
from ksampler.models import EDM, EPS, VE, Flow, FluxFlow
from ksampler.nodes import KSampler
from ksampler.pipeline import NoiseOptions, ksample, sample
from ksampler.schedulers import calculate_sigmas
from ksampler.validation import MAX_BATCH_INDEX

MODEL = analytic_model()
P, N = conditioning(1.0), conditioning(-1.0)
G = GaussianDenoiser()
SIGMAS = torch.tensor([14.6, 1.0, 0.0])


def latent(batch=1, **extra):
    return {"samples": torch.zeros(batch, 4, 8, 8), **extra}


def node(positive=P, negative=N, latent_image=None):
    return KSampler().sample(MODEL, 1, 2, 3.0, "euler", "karras", positive, negative, latent_image or latent())


def run_ksample(**over):
    kw = dict(model=MODEL, seed=1, steps=2, cfg=3.0, sampler_name="euler", scheduler="karras", positive=P,
              negative=N, latent=latent())
    kw.update(over)
    return ksample(**kw)


def run_sample(**over):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(model=G, model_sampling=G.model_sampling, noise=x, latent=torch.zeros_like(x), sigmas=SIGMAS)
    kw.update(over)
    return sample(**kw)


# -- batch_index ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [2 ** 70, 10 ** 7, MAX_BATCH_INDEX + 1])
def test_huge_batch_index_is_refused_not_drawn(index):
    with pytest.raises(KSamplerInputError, match=r"latent_image\['batch_index'\].*at most"):
        node(latent_image=latent(batch_index=[index]))


def test_largest_batch_index_still_samples():
    out = run_ksample(latent=latent(batch_index=[MAX_BATCH_INDEX]), steps=1)
    assert torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("batch_index, what", [([0, 1, 2], "entries"), ([-1], ">= 0"), ("a", "list of ints"),
                                               ([1.5], "list of ints"), ([2 ** 70], "at most")])
def test_sample_checks_batch_index(batch_index, what):
    with pytest.raises(KSamplerInputError, match=f"batch_index.*{what}"):
        run_sample(batch_index=batch_index, sampler="euler_ancestral")


# -- conditioning areas and masks -----------------------------------------------------------------------------

@pytest.mark.parametrize("area, what", [
    ((-8, -8, 0, 0), "size must be >= 1"),
    ((0, 0, 0, 0), "size must be >= 1"),
    ((8, 8, -1, 0), "offset must be >= 0"),
    (("a", 8, 0, 0), "'percentage'"),
    (("a", "b", "c", "d"), "'percentage'"),
    ((float("nan"), 4, 0, 0), "finite number"),
    ((4.5, 4.5, 0, 0), "whole numbers"),
    ((True, True, False, False), "finite number"),
    ((8, 8, 0), "as many offsets as sizes"),
    ((), "expected"),
    ("area", "expected"),
    (("percentage", 2.0, -1.0, 0.0, 0.0), "size must be >= 0"),
    (("percentage", float("nan"), 0.5, 0, 0), "finite number"),
    (("pct", 1.0, 1.0, 0.0, 0.0), "'percentage'"),
])
def test_malformed_area_is_refused(area, what):
    with pytest.raises(KSamplerInputError, match=rf"positive\[0\]\['area'\].*{what}"):
        node(positive=conditioning(1.0, area=area))


@pytest.mark.parametrize("area", [(8, 8, 100, 100), (4, 4, 8, 0), ("percentage", 0.5, 0.5, 1.5, 1.5),
                                  ("percentage", 0.5, 0.5, 1.0, 0.0)])
def test_area_outside_the_latent_is_refused(area):
    with pytest.raises(KSamplerInputError, match=r"negative\[0\]\['area'\].*outside the latent"):
        node(negative=conditioning(-1.0, area=area))


def test_area_outside_the_latent_is_refused_before_a_calibration_fit():
    from ksampler import calibrate
    with pytest.raises(KSamplerInputError, match=r"positive\[0\]\['area'\].*outside the latent"):
        calibrate(MODEL, conditioning(1.0, area=(8, 8, 100, 100)), N, latent(), 3, 3.0, fit_noises=4, iterations=2,
                  teacher_steps=10, log=lambda m: None)


@pytest.mark.parametrize("area, same_as", [((100, 100, 2, 2), (6, 6, 2, 2)),
                                           (("percentage", 1.5, 1.5, 0.25, 0.25), (6, 6, 2, 2))])
def test_area_past_the_far_edge_is_cut_there_as_in_comfyui(area, same_as):
    cut = node(positive=P + conditioning(2.0, area=area))[0]["samples"]
    inside = node(positive=P + conditioning(2.0, area=same_as))[0]["samples"]
    assert torch.equal(cut, inside)


def test_image_area_on_a_video_latent_covers_every_frame():
    from ksampler.conditioning.cfg import _resolve_area
    assert _resolve_area((4, 4, 2, 2), (3, 8, 8)) == (2 ** 31, 4, 4, 0, 2, 2)
    with pytest.raises(KSamplerInputError, match="'percentage' area needs 3 sizes"):
        _resolve_area(("percentage", 0.5, 0.5, 0, 0), (3, 8, 8))


def test_cond_mask_batch_that_cannot_repeat_over_the_latent_batch_is_refused():
    with pytest.raises(KSamplerInputError, match=r"positive\[0\]\['mask'\].*2 masks for a latent batch of 3"):
        node(positive=conditioning(1.0, mask=torch.ones(2, 8, 8)), latent_image=latent(3))


@pytest.mark.parametrize("masks, batch", [(1, 3), (2, 4), (4, 3), (3, 3)])
def test_cond_mask_batch_that_repeats_or_is_cut_still_samples(masks, batch):
    out = node(positive=conditioning(1.0, mask=torch.ones(masks, 8, 8)), latent_image=latent(batch))[0]
    assert out["samples"].shape[0] == batch


@pytest.mark.parametrize("opts, key", [({"strength": 1e308}, "strength"), ({"mask_strength": -1e5}, "mask_strength")])
def test_huge_strength_is_refused(opts, key):
    with pytest.raises(KSamplerInputError, match=rf"positive\[0\]\['{key}'\].*between"):
        node(positive=conditioning(1.0, **opts))


def test_huge_conditioning_values_are_refused():
    with pytest.raises(KSamplerInputError, match=r"positive\[0\].*magnitude"):
        run_ksample(positive=conditioning(3e38))


# -- Guidance -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1e308, -1.0, 100.5, float("nan"), None, "7", True])
def test_guidance_checks_cfg(cfg):
    with pytest.raises(KSamplerInputError, match="cfg"):
        Guidance(P, N, cfg)


@pytest.mark.parametrize("negative", [[], conditioning(-1.0, dim=16)])
def test_guidance_negative_errors_are_input_errors(negative):
    with pytest.raises(KSamplerInputError, match="negative"):
        Guidance(P, negative, 3.0)


# -- sample(): types and values up front ----------------------------------------------------------------------

@pytest.mark.parametrize("over, name", [
    ({"guidance": "cfg"}, "guidance"),
    ({"model_sampling": "eps"}, "model_sampling"),
    ({"noise": torch.tensor(0.0), "latent": torch.tensor(0.0)}, "noise"),
    ({"sigmas": torch.empty(3, device="meta")}, "sigmas"),
    ({"sigmas": [1e30, 1.0, 0.0]}, "sigmas"),
    ({"noise": torch.full((1, 4, 8, 8), float("nan"))}, "noise"),
    ({"noise": torch.full((1, 4, 8, 8), float("inf"))}, "noise"),
    ({"latent": torch.full((1, 4, 8, 8), float("nan"))}, "latent"),
    ({"latent": torch.full((1, 4, 8, 8), 3e38)}, "latent"),
    ({"noise": torch.empty(1, 4, 8, 8, device="meta")}, "noise"),
    ({"sampler": "dpm_adaptive", "sampler_options": {"return_info": True}}, "return_info"),
    ({"reference_mode": "yes"}, "reference_mode"),
    ({"compat": "no"}, "compat"),
    ({"check_finite": "no"}, "check_finite"),
    ({"callback": "print"}, "callback"),
    ({"noise_options": {"batch_invariant": True}}, "noise_options"),
])
def test_sample_checks_its_inputs(over, name):
    with pytest.raises(KSamplerInputError, match=name):
        run_sample(**over)


@pytest.mark.parametrize("flags, name", [({"batch_invariant": "no"}, "batch_invariant"),
                                         ({"device_invariant": 1}, "device_invariant")])
def test_noise_options_flags_are_bools(flags, name):
    with pytest.raises(KSamplerInputError, match=name):
        NoiseOptions(**flags)


def test_sample_with_guidance_samples_and_mutates_nothing():
    positive = conditioning(1.0, area=(100, 100, 2, 2))
    before = copy.deepcopy(positive)
    out = run_sample(model=MODEL, model_sampling=MODEL.model_sampling, guidance=Guidance(P + positive, N, 3.0))
    assert torch.isfinite(out).all()
    assert str(positive) == str(before)


# -- ksample --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("over, name", [
    ({"noise_options": {"batch_invariant": True}}, "noise_options"),
    ({"start_step": 1.5}, "start_step"),
    ({"start_step": -1}, "start_step"),
    ({"last_step": -1}, "last_step"),
    ({"last_step": 10001}, "last_step"),
    ({"add_noise": "no"}, "add_noise"),
    ({"force_full_denoise": 1}, "force_full_denoise"),
    ({"reference_mode": "yes"}, "reference_mode"),
    ({"scheduler_options": [1]}, "scheduler_options"),
])
def test_ksample_checks_its_inputs(over, name):
    with pytest.raises(KSamplerInputError, match=name):
        run_ksample(**over)


# -- scheduler options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler, options, what", [
    ("karras", {"rho": 0.0}, r"'rho'.*'karras' needs rho > 0"),
    ("karras", {"rho": -7.0}, r"'rho'.*'karras' needs rho > 0"),
    ("karras", {"rho": float("nan")}, r"'rho'.*finite number"),
    ("karras", {"rho": "7"}, r"'rho'.*finite number"),
    ("karras", {"foo": 1}, r"'foo'.*'karras' has no option 'foo'; its options are: rho"),
    ("simple", {"rho": 7.0}, r"'rho'.*'simple' has no option 'rho'; it takes no options"),
    ("polyexponential", {"rho": 1e9}, r"'rho'.*<= 100"),
    ("beta", {"alpha": 0.0}, r"'alpha'.*'beta' needs alpha > 0"),
    ("vp", {"beta_d": 0.0}, r"'beta_d'"),
    ("laplace", {"beta": -1.0}, r"'beta'"),
    ("linear_quadratic", {"linear_steps": 2.5}, r"'linear_steps'.*integer"),
    ("linear_quadratic", {"linear_steps": 3}, r"'linear_steps'.*1 <= linear_steps < the step count 3"),
    ("linear_quadratic", {"threshold_noise": 1.5}, r"'threshold_noise'"),
    ("align_your_steps", {"model_type": "SD9"}, r"'model_type'.*one of"),
    ("normal", {"sgm": "yes"}, r"'sgm'.*True or False"),
])
def test_scheduler_options_are_checked(scheduler, options, what):
    with pytest.raises(KSamplerInputError, match=rf"scheduler_options\[{what}"):
        run_ksample(scheduler=scheduler, steps=3, scheduler_options=options)


@pytest.mark.parametrize("scheduler, options", [("karras", {"rho": 3.0}), ("beta", {"alpha": 0.5, "beta": 0.7}),
                                                ("linear_quadratic", {"linear_steps": 1}),
                                                ("align_your_steps", {"model_type": "SDXL"})])
def test_valid_scheduler_options_still_work(scheduler, options):
    sigmas = calculate_sigmas(EPS(), scheduler, 3, **options)
    assert torch.isfinite(sigmas).all() and sigmas[-1] == 0


def test_calculate_sigmas_checks_the_model_sampling():
    with pytest.raises(KSamplerInputError, match="model_sampling"):
        calculate_sigmas(None, "karras", 3)


# -- model samplings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, name", [
    (lambda: FluxFlow(float("nan")), "shift"),
    (lambda: FluxFlow(1e3), "shift"),
    (lambda: FluxFlow(timesteps=0), "timesteps"),
    (lambda: FluxFlow.from_resolution(0, 0), "width"),
    (lambda: FluxFlow.from_resolution(1024, 1024, max_shift=float("inf")), "max_shift"),
    (lambda: Flow(shift=float("nan")), "shift"),
    (lambda: Flow(shift=0.0), "shift"),
    (lambda: Flow(multiplier=0.0), "multiplier"),
    (lambda: EPS(timesteps=1), "timesteps"),
    (lambda: EPS(linear_start=float("nan")), "linear_start"),
    (lambda: EPS(linear_start=0.02, linear_end=0.01), "linear_start <= linear_end"),
    (lambda: EPS(zero_terminal_snr="yes"), "zero_terminal_snr"),
    (lambda: EPS(sigmas=torch.tensor([1.0, float("nan")])), "sigmas"),
    (lambda: EPS(sigmas=torch.tensor([2.0, 1.0])), "sigmas"),
    (lambda: EDM(sigma_min=float("nan")), "sigma_min"),
    (lambda: EDM(sigma_data=0.0), "sigma_data"),
    (lambda: EDM(sigma_max=1e30), "sigma_max"),
    (lambda: VE(sigma_min=0.0), "sigma_min"),
])
def test_model_sampling_arguments_are_checked(make, name):
    with pytest.raises(KSamplerInputError, match=name):
        make()


def test_valid_model_samplings_still_build():
    assert torch.isfinite(calculate_sigmas(FluxFlow.from_resolution(1024, 1024), "simple", 3)).all()
    for ms in (EPS(), EPS(zero_terminal_snr=True), Flow(shift=3.0), FluxFlow(-2.0), EDM(sigma_data=0.5), VE()):
        assert torch.isfinite(calculate_sigmas(ms, "karras", 3)).all()


def test_reference_mode_none_is_the_default_as_the_nodes_pass_it():
    assert torch.equal(run_ksample(reference_mode=None)["samples"], run_ksample()["samples"])
