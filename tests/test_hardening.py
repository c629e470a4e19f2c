"""Bad input: each case raises one clear error naming the input (and how to fix it); nothing is mutated.

Also: property-based runs over the registries (hypothesis) and interrupts that leave nothing behind.
"""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytic import MODEL_KINDS, analytic_model, conditioning
from ksampler.conditioning import KSamplerInputError
from ksampler.models import EPS
from ksampler.nodes import KSampler, KSamplerAdvanced
from ksampler.pipeline import ksample, sample
from ksampler.samplers import SAMPLERS, sampler_traits
from ksampler.schedulers import SCHEDULERS, calculate_sigmas, sampling_sigmas

MODEL = analytic_model()


def good():
    return dict(model=MODEL, seed=1, steps=3, cfg=3.0, sampler_name="euler", scheduler="karras",
                positive=conditioning(1.0), negative=conditioning(-1.0),
                latent_image={"samples": torch.zeros(2, 4, 8, 8)}, denoise=1.0)


class NestedLatent:
    """Shaped like ComfyUI's NestedTensor (several latent streams, e.g. LTX-2 audio + video): not a tensor."""
    is_nested = True
    tensors = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 16)]

    def __eq__(self, other):
        return isinstance(other, NestedLatent)


def meta_cond():
    return [[torch.empty(1, 4, 8, device="meta"), {}]]


def with_latent(**kw):
    latent = {"samples": torch.randn(2, 4, 8, 8)}
    latent.update(kw)
    return latent


def nan_latent(value):
    t = torch.zeros(2, 4, 8, 8)
    t[0, 0, 0, 0] = value
    return {"samples": t}


class ShapeModel:
    """A model whose apply_model returns the wrong shape."""
    model_sampling, latent_format = MODEL.model_sampling, MODEL.latent_format

    def apply_model(self, x, sigma, context=None, pooled=None):
        return x[:, :2]


class NaNModel(ShapeModel):
    def apply_model(self, x, sigma, context=None, pooled=None):
        return x * float("nan") if float(sigma.reshape(-1)[0]) < 5 else x * 0.5


# (case id, overrides, input name expected in the message)
NODE_CASES = [
    ("model-str", {"model": "sd15.safetensors"}, "model"),
    ("model-none", {"model": None}, "model"),
    ("seed-float", {"seed": 1.5}, "seed"),
    ("seed-bool", {"seed": True}, "seed"),
    ("seed-negative", {"seed": -1}, "seed"),
    ("seed-too-big", {"seed": 2 ** 64}, "seed"),
    ("steps-str", {"steps": "20"}, "steps"),
    ("steps-zero", {"steps": 0}, "steps"),
    ("steps-too-many", {"steps": 10001}, "steps"),
    ("cfg-none", {"cfg": None}, "cfg"),
    ("cfg-negative", {"cfg": -1.0}, "cfg"),
    ("cfg-too-big", {"cfg": 101.0}, "cfg"),
    ("cfg-nan", {"cfg": float("nan")}, "cfg"),
    ("cfg-inf", {"cfg": float("inf")}, "cfg"),
    ("denoise-above-one", {"denoise": 1.5}, "denoise"),
    ("denoise-negative", {"denoise": -0.1}, "denoise"),
    ("denoise-str", {"denoise": "0.5"}, "denoise"),
    ("sampler-unknown", {"sampler_name": "euler_typo"}, "sampler_name"),
    ("sampler-int", {"sampler_name": 3}, "sampler_name"),
    ("scheduler-unknown", {"scheduler": "karas"}, "scheduler"),
    ("scheduler-none", {"scheduler": None}, "scheduler"),
    ("positive-tensor", {"positive": torch.zeros(1, 4, 8)}, "positive"),
    ("negative-dict", {"negative": {"cond": 1}}, "negative"),
    ("positive-empty", {"positive": []}, "positive"),
    ("negative-empty-with-cfg", {"negative": []}, "negative"),
    ("positive-bare-tensor-entry", {"positive": [torch.zeros(1, 4, 8)]}, "positive[0]"),
    ("positive-options-not-dict", {"positive": [[torch.zeros(1, 4, 8), "strong"]]}, "positive[0]"),
    ("positive-2d-context", {"positive": [[torch.zeros(4, 8), {}]]}, "positive[0]"),
    ("positive-int-dtype", {"positive": [[torch.zeros(1, 4, 8, dtype=torch.int64), {}]]}, "positive[0]"),
    ("positive-meta-device", {"positive": meta_cond()}, "positive[0]"),
    ("negative-width-mismatch", {"negative": [[torch.zeros(1, 4, 16), {}]]}, "negative"),
    ("positive-entries-width-mismatch", {"positive": conditioning(1.0) + [[torch.zeros(1, 4, 16), {}]]},
     "positive[1]"),
    ("positive-bad-strength", {"positive": conditioning(1.0, strength="high")}, "strength"),
    ("positive-nan-strength", {"positive": conditioning(1.0, strength=float("nan"))}, "strength"),
    ("positive-bad-area", {"positive": conditioning(1.0, area=(8, 8))}, "area"),
    ("latent-tensor", {"latent_image": torch.zeros(1, 4, 8, 8)}, "latent_image"),
    ("latent-no-samples", {"latent_image": {"latent": torch.zeros(1, 4, 8, 8)}}, "latent_image"),
    ("latent-samples-list", {"latent_image": {"samples": [[0.0]]}}, "latent_image['samples']"),
    ("latent-nan", {"latent_image": nan_latent(float("nan"))}, "latent_image['samples']"),
    ("latent-inf", {"latent_image": nan_latent(float("inf"))}, "latent_image['samples']"),
    ("latent-rank-3", {"latent_image": {"samples": torch.zeros(4, 8, 8)}}, "latent_image['samples']"),
    ("latent-rank-5", {"latent_image": {"samples": torch.zeros(1, 4, 2, 8, 8)}}, "latent_image['samples']"),
    ("latent-nested", {"latent_image": {"samples": NestedLatent()}}, "nested"),
    ("latent-wrong-channels", {"latent_image": {"samples": torch.randn(1, 3, 8, 8)}}, "channels"),
    ("latent-empty-batch", {"latent_image": {"samples": torch.zeros(0, 4, 8, 8)}}, "latent_image['samples']"),
    ("latent-int-dtype", {"latent_image": {"samples": torch.zeros(1, 4, 8, 8, dtype=torch.int32)}},
     "latent_image['samples']"),
    ("latent-meta-device", {"latent_image": {"samples": torch.empty(1, 4, 8, 8, device="meta")}},
     "latent_image['samples']"),
    ("mask-rank-5", {"latent_image": with_latent(noise_mask=torch.ones(1, 1, 1, 8, 8))}, "noise_mask"),
    ("mask-batch-mismatch", {"latent_image": with_latent(noise_mask=torch.ones(3, 8, 8))}, "noise_mask"),
    ("mask-not-tensor", {"latent_image": with_latent(noise_mask=[[1.0]])}, "noise_mask"),
    ("mask-nan", {"latent_image": with_latent(noise_mask=torch.full((1, 8, 8), float("nan")))}, "noise_mask"),
    ("batch-index-length", {"latent_image": with_latent(batch_index=[0])}, "batch_index"),
    ("batch-index-negative", {"latent_image": with_latent(batch_index=[0, -1])}, "batch_index"),
    ("batch-index-floats", {"latent_image": with_latent(batch_index=[0.0, 1.0])}, "batch_index"),
    ("model-wrong-output-shape", {"model": ShapeModel()}, "model"),
]


@pytest.mark.parametrize("case,overrides,name", NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_node_bad_input(case, overrides, name):
    kwargs = good()
    kwargs.update(overrides)
    snapshot = copy.deepcopy({k: v for k, v in kwargs.items() if k != "model"})
    with pytest.raises((KSamplerInputError, ValueError, TypeError, RuntimeError)) as info:
        KSampler().sample(**kwargs)
    message = str(info.value)
    assert name in message, f"error must name {name!r}: {message}"
    assert len(message) > len(name) + 15, "the message must say what is wrong and how to fix it"
    _assert_unchanged(kwargs, snapshot)


def _assert_unchanged(kwargs, snapshot):
    for key, before in snapshot.items():
        after = kwargs[key]
        if isinstance(before, torch.Tensor):
            assert after.device.type == "meta" or torch.equal(after, before)
        elif isinstance(before, dict):
            assert after.keys() == before.keys()
            for k in before:
                a, b = after[k], before[k]
                if isinstance(b, torch.Tensor):
                    assert b.device.type == "meta" or torch.equal(a, b) or (a.isnan().any() and b.isnan().any())
                else:
                    assert a == b
        elif isinstance(before, list):
            assert len(after) == len(before)


def test_model_nan_error_names_step_and_sigma():
    kwargs = good()
    kwargs.update(model=NaNModel(), steps=6)
    with pytest.raises(FloatingPointError) as info:
        KSampler().sample(**kwargs)
    message = str(info.value)
    assert "model" in message and "step" in message and "sigma=" in message
    assert "/6" in message


ADVANCED_CASES = [
    ("add-noise-yes", {"add_noise": "yes"}, "add_noise"),
    ("leftover-bool", {"return_with_leftover_noise": True}, "return_with_leftover_noise"),
    ("start-negative", {"start_at_step": -1}, "start_at_step"),
    ("end-float", {"end_at_step": 4.5}, "end_at_step"),
    ("brownian-unknown", {"brownian_noise": "slow"}, "brownian_noise"),
    ("noise-seed-negative", {"noise_seed": -3}, "seed"),
]


@pytest.mark.parametrize("case,overrides,name", ADVANCED_CASES, ids=[c[0] for c in ADVANCED_CASES])
def test_advanced_node_bad_input(case, overrides, name):
    kwargs = dict(model=MODEL, add_noise="enable", noise_seed=1, steps=3, cfg=3.0, sampler_name="euler",
                  scheduler="karras", positive=conditioning(1.0), negative=conditioning(-1.0),
                  latent_image={"samples": torch.zeros(1, 4, 8, 8)}, start_at_step=0, end_at_step=10000,
                  return_with_leftover_noise="disable")
    kwargs.update(overrides)
    with pytest.raises((KSamplerInputError, ValueError, TypeError)) as info:
        KSamplerAdvanced().sample(**kwargs)
    assert name in str(info.value)


API_CASES = [
    ("sigmas-ascending", dict(sigmas=torch.tensor([0.0, 1.0, 2.0])), "sigmas"),
    ("sigmas-repeated", dict(sigmas=torch.tensor([2.0, 2.0, 0.0])), "sigmas"),
    ("sigmas-2d", dict(sigmas=torch.ones(2, 2)), "sigmas"),
    ("sigmas-nan", dict(sigmas=torch.tensor([2.0, float("nan"), 0.0])), "sigmas"),
    ("sigmas-negative", dict(sigmas=torch.tensor([2.0, -1.0])), "sigmas"),
    ("noise-shape", dict(noise=torch.zeros(1, 4, 4, 4)), "noise"),
    ("latent-not-tensor", dict(latent=[0.0]), "latent"),
    ("sampler-unknown", dict(sampler="dpmpp_9m"), "sampler_name"),
    ("sampler-type", dict(sampler=3.5), "sampler"),
    ("brownian-mode", dict(noise_options="fast"), "noise_options"),
]


@pytest.mark.parametrize("case,overrides,name", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, overrides, name):
    from analytic import GaussianDenoiser
    model = GaussianDenoiser()
    kwargs = dict(model=model, model_sampling=EPS(), noise=torch.randn(1, 4, 8, 8), latent=torch.zeros(1, 4, 8, 8),
                  sigmas=calculate_sigmas(EPS(), "karras", 4), sampler="euler", seed=0)
    kwargs.update(overrides)
    if case == "brownian-mode":
        kwargs["noise_options"] = "fast"
    with pytest.raises((KSamplerInputError, ValueError, TypeError)) as info:
        sample(**kwargs)
    assert name in str(info.value)


def test_scheduler_api_bad_input():
    with pytest.raises(ValueError, match="scheduler"):
        calculate_sigmas(EPS(), "nope", 5)
    with pytest.raises((ValueError, TypeError), match="steps"):
        calculate_sigmas(EPS(), "karras", 0)
    with pytest.raises((ValueError, TypeError), match="steps"):
        calculate_sigmas(EPS(), "karras", 2.5)


# --- properties over the registries -------------------------------------------------------------------
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


# --- interrupts ---------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "uni_pc", "sa_solver"])
def test_interrupt_leaves_nothing_behind(sampler):
    args = (MODEL, 5, 8, 3.0, sampler, "karras", conditioning(1.0), conditioning(-1.0),
            {"samples": torch.zeros(1, 4, 8, 8)})
    clean = ksample(*args)["samples"]

    def stop_at_3(step, denoised, x, total):
        if step == 3:
            raise Interrupt()
    with pytest.raises(Interrupt):
        ksample(*args, callback=stop_at_3)
    again = ksample(*args)["samples"]
    assert torch.equal(clean, again)


@pytest.mark.parametrize("sampler", ["sa_solver", "sa_solver_pece"])
def test_sa_solver_with_noise_levels_float32_cannot_separate(sampler):
    """28 steps at denoise 1/256: float32 lambdas repeat, so the float32 Lagrange system is singular (ComfyUI
    raises LinAlgError); ours runs the step algebra in float64 and returns a finite, reproducible result."""
    model = analytic_model(flow=False)
    latent = {"samples": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(28))}
    runs = [KSampler().sample(model, 3, 28, 1.0, sampler, "polyexponential", conditioning(1.0), conditioning(-1.0),
                              latent, 1 / 256)[0]["samples"] for _ in range(2)]
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])
