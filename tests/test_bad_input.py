"""Bad input gets one clear error naming the input (and how to fix it), on every path; nothing is mutated.

Property runs over the whole registries are in test_properties.py, numerical edge cases in
test_numerical_edges.py, interrupts in test_interrupts.py.
"""
import copy

import pytest
import torch

from analytic import analytic_model, conditioning
from ksampler.conditioning import KSamplerInputError
from ksampler.models import EPS
from ksampler.nodes import KSampler, KSamplerAdvanced
from ksampler.pipeline import sample
from ksampler.schedulers import calculate_sigmas

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
