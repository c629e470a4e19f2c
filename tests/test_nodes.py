"""The node contract (what ComfyUI reads) and the KSampler's behaviour on our own models."""
import copy

import torch

from analytic import analytic_model, conditioning
from ksampler import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from ksampler.nodes import KSampler, KSamplerAdvanced, NODES
from ksampler.samplers import COMFY_SAMPLER_NAMES, SAMPLERS
from ksampler.schedulers import COMFY_SCHEDULER_NAMES, SCHEDULERS

COMFY_BUILTIN_IDS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "KSamplerSelect",
                     "BasicScheduler", "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "VAEDecode",
                     "VAEEncode", "SaveImage", "LoadImage"}


def test_node_ids_are_namespaced_and_single_sourced():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    for node_id in NODE_CLASS_MAPPINGS:
        assert node_id.startswith("ksampler_") and node_id not in COMFY_BUILTIN_IDS
    assert NODE_DISPLAY_NAME_MAPPINGS["ksampler_KSampler"] == "KSampler+"


def test_ksampler_input_contract():
    spec = KSampler.INPUT_TYPES()
    req = spec["required"]
    assert list(req) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                         "latent_image", "denoise"]
    assert set(spec) == {"required", "optional"}
    assert list(spec["optional"]) == ["calibration"]  # optional, after every ComfyUI input
    assert spec["optional"]["calibration"][0] == "KSAMPLER_CALIBRATION"
    assert req["model"][0] == "MODEL,KSAMPLER_BUNDLED_MODEL"  # ComfyUI's MODEL or the bundled one
    assert req["seed"][0] == "INT"
    assert req["seed"][1] == {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                              "tooltip": req["seed"][1]["tooltip"]}
    assert {k: v for k, v in req["steps"][1].items() if k != "tooltip"} == {"default": 20, "min": 1, "max": 10000}
    assert {k: v for k, v in req["cfg"][1].items() if k != "tooltip"} == \
        {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}
    assert {k: v for k, v in req["denoise"][1].items() if k != "tooltip"} == \
        {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}
    for name in ("positive", "negative"):
        assert req[name][0] == "CONDITIONING"
    assert req["latent_image"][0] == "LATENT"
    samplers, schedulers = req["sampler_name"][0], req["scheduler"][0]
    assert samplers[:45] == list(COMFY_SAMPLER_NAMES) and samplers == list(SAMPLERS)
    assert schedulers[:9] == list(COMFY_SCHEDULER_NAMES) and schedulers == list(SCHEDULERS)
    for name, value in req.items():
        assert value[1].get("tooltip"), f"{name} needs a tooltip"
    assert KSampler.RETURN_TYPES == ("LATENT",)
    assert KSampler.FUNCTION == "sample"
    assert KSampler.CATEGORY == "sampling"


def test_ksampler_advanced_input_contract():
    spec = KSamplerAdvanced.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler",
                                      "positive", "negative", "latent_image", "start_at_step", "end_at_step",
                                      "return_with_leftover_noise"]
    assert spec["required"]["add_noise"][0] == ["enable", "disable"]
    assert spec["required"]["return_with_leftover_noise"][0] == ["disable", "enable"]
    assert spec["required"]["noise_seed"][1]["control_after_generate"] is True
    assert spec["required"]["end_at_step"][1]["default"] == 10000
    # our additions are optional and come last, so saved workflows keep their widget positions
    assert list(spec["optional"]) == ["batch_invariant_noise", "cpu_noise", "brownian_noise", "flow_geometry",
                                      "karras_rho", "variation_seed", "variation_strength", "cfg_sigma_min",
                                      "cfg_sigma_max", "cfg_ramp", "cfg_ramp_end", "cfg_stop_at", "sampler_options",
                                      "preview"]


def _latent(batch=2, channels=4, size=8, value=0.0):
    return {"samples": torch.full((batch, channels, size, size), value)}


def _run(latent=None, seed=7, steps=6, cfg=4.0, sampler="euler", scheduler="karras", denoise=1.0, model=None,
         positive=None, negative=None):
    model = model or analytic_model()
    positive = positive if positive is not None else conditioning(1.0)
    negative = negative if negative is not None else conditioning(-1.0)
    latent = latent if latent is not None else _latent()
    return KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent, denoise)[0]


def test_returns_copy_of_latent_dict_with_samples_replaced():
    latent = _latent()
    latent["extra_key"] = "kept"
    out = _run(latent)
    assert out is not latent and out["extra_key"] == "kept"
    assert out["samples"].dtype == torch.float32 and out["samples"].shape == (2, 4, 8, 8)
    assert torch.isfinite(out["samples"]).all()


def test_caller_inputs_are_never_modified():
    latent = {"samples": torch.randn(2, 4, 8, 8), "noise_mask": torch.ones(1, 8, 8), "batch_index": [3, 5]}
    positive, negative = conditioning(1.0, strength=0.8), conditioning(-1.0)
    snapshot = copy.deepcopy((latent, positive, negative))
    _run(latent, denoise=0.5, positive=positive, negative=negative)
    assert latent.keys() == snapshot[0].keys()
    for key in latent:
        a, b = latent[key], snapshot[0][key]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    for got, want in ((positive, snapshot[1]), (negative, snapshot[2])):
        assert len(got) == len(want)
        for (t1, d1), (t2, d2) in zip(got, want):
            assert torch.equal(t1, t2) and d1 == d2


def test_denoise_zero_returns_input():
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    out = _run(latent, denoise=0.0)
    assert torch.equal(out["samples"], latent["samples"])


def test_denoise_below_one_runs_exactly_steps():
    model = analytic_model()
    net = model.network
    for denoise in (1.0, 0.6, 0.3):
        net.calls.clear()
        _run({"samples": torch.randn(1, 4, 8, 8)}, steps=7, denoise=denoise, model=model)
        assert len(net.calls) == 7  # euler: one batched model call per step


def test_seed_semantics_match_comfyui_noise():
    """Initial noise is torch.randn on the CPU from a generator seeded with the seed, in the latent's shape."""
    from ksampler.samplers.noise import prepare_noise
    latent = torch.zeros(2, 4, 8, 8)
    noise = prepare_noise(latent, 42)
    expected = torch.randn(latent.shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(noise, expected)


def test_batch_index_gives_item_k_the_kth_draw():
    from ksampler.samplers.noise import prepare_noise
    latent = torch.zeros(2, 4, 8, 8)
    noise = prepare_noise(latent, 42, batch_index=[2, 0])
    gen = torch.Generator().manual_seed(42)
    draws = [torch.randn(1, 4, 8, 8, generator=gen) for _ in range(3)]
    assert torch.equal(noise[0], draws[2][0]) and torch.equal(noise[1], draws[0][0])
    # through the node: item with batch_index k matches the k-th item of a plain batch (4*8*8 is a multiple of 16)
    full = _run(_latent(batch=3), sampler="euler")["samples"]
    single = _run({"samples": torch.zeros(1, 4, 8, 8), "batch_index": [2]}, sampler="euler")["samples"]
    assert torch.allclose(full[2], single[0], atol=1e-5)


def test_noise_mask_keeps_unmasked_region():
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1.0
    latent["noise_mask"] = mask
    out = _run(latent, sampler="dpmpp_2m")["samples"]
    keep = mask[0] == 0
    assert torch.allclose(out[0][:, keep], latent["samples"][0][:, keep], atol=1e-5)
    assert not torch.allclose(out[0][:, ~keep], latent["samples"][0][:, ~keep], atol=1e-2)


def test_prepare_mask_layouts():
    """Masks resize to audio, image and video latents; video masks below rank 5 stack frames (ComfyUI's rule)."""
    from ksampler.pipeline import prepare_mask
    # image: [B, H, W] -> bilinear to the latent, repeated over channels
    img = prepare_mask(torch.ones(2, 16, 16), (2, 4, 8, 8), "cpu")
    assert img.shape == (2, 4, 8, 8) and torch.equal(img, torch.ones_like(img))
    # audio: [L], [B, L] and per-channel [B, C, L]
    ramp = torch.linspace(0, 1, 32)
    audio = prepare_mask(ramp, (3, 2, 8), "cpu")
    assert audio.shape == (3, 2, 8) and bool((audio[:, :, 1:] >= audio[:, :, :-1]).all())
    assert torch.equal(audio[0], audio[2]) and torch.equal(audio[:, 0], audio[:, 1])
    per_item = prepare_mask(torch.stack([torch.zeros(8), torch.ones(8)]), (2, 2, 8), "cpu")
    assert torch.equal(per_item[0], torch.zeros(2, 8)) and torch.equal(per_item[1], torch.ones(2, 8))
    per_channel = prepare_mask(torch.tensor([[[0.0] * 8, [1.0] * 8]]), (1, 2, 8), "cpu")
    assert torch.equal(per_channel[0, 0], torch.zeros(8)) and torch.equal(per_channel[0, 1], torch.ones(8))
    # video: 9 mask frames [T, H, W] onto 3 latent frames; frame values survive the temporal resize
    frames = torch.zeros(9, 16, 16)
    frames[6:] = 1.0
    video = prepare_mask(frames, (2, 4, 3, 8, 8), "cpu")
    assert video.shape == (2, 4, 3, 8, 8)
    assert torch.equal(video[:, :, 0], torch.zeros(2, 4, 8, 8)) and torch.equal(video[:, :, 2], torch.ones(2, 4, 8, 8))
    assert torch.equal(prepare_mask(frames[:, None], (2, 4, 3, 8, 8), "cpu"), video)  # [T, 1, H, W]
    full = prepare_mask(torch.rand(2, 1, 3, 8, 8), (2, 4, 3, 8, 8), "cpu")  # [B, 1, T, H, W]: per item
    assert not torch.equal(full[0], full[1])


def test_pipeline_masks_video_latents_and_rejects_bad_masks():
    """Python API: a video mask keeps its frames; a mask that fits no layout is one clear error."""
    import pytest
    from ksampler.conditioning import KSamplerInputError
    from ksampler.models import EPS
    from ksampler.pipeline import sample
    from ksampler.schedulers import sampling_sigmas
    from analytic import GaussianDenoiser
    model = GaussianDenoiser(model_sampling=EPS())
    latent = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    sigmas = sampling_sigmas(model.model_sampling, "karras", 6)
    mask = torch.ones(4, 4, 4)
    mask[:2] = 0.0
    out = sample(model, None, noise, latent, sigmas, None, "euler", 0, noise_mask=mask)
    assert torch.allclose(out[:, :, :2], latent[:, :, :2], atol=1e-5)
    for bad in (torch.ones(4, 2, 4, 4), torch.ones(1, 2, 4, 4, 4), torch.ones(3, 1, 4, 4, 4), torch.ones(4),
                torch.ones(1, 1, 1, 4, 4, 4)):
        with pytest.raises(KSamplerInputError, match="noise_mask"):
            sample(model, None, noise, latent, sigmas, None, "euler", 0, noise_mask=bad)
    with pytest.raises(KSamplerInputError, match="noise_mask"):
        sample(model, None, noise.reshape(1, -1), latent.reshape(1, -1), sigmas, None, "euler", 0,
                   noise_mask=mask)


def test_cfg_one_makes_no_negative_call():
    model = analytic_model()
    _run(model=model, cfg=1.0, steps=5)
    assert model.network.calls == [2] * 5  # batch 2, positive only
    model.network.calls.clear()
    _run(model=model, cfg=3.0, steps=5)
    assert model.network.calls == [4] * 5  # positive and negative in one batched call per step


def test_cfg_guides_towards_the_prompt():
    """The analytic model's data mean is the prompt value: sampling lands near it, further with more cfg."""
    model = analytic_model()
    out1 = _run(model=model, cfg=1.0, steps=20, sampler="dpmpp_2m")["samples"]
    out5 = _run(model=model, cfg=3.0, steps=20, sampler="dpmpp_2m")["samples"]
    assert 0.5 < float(out1.mean()) < 1.5
    assert float(out5.mean()) > float(out1.mean())


def test_empty_latent_channels_are_widened():
    out = _run({"samples": torch.zeros(1, 1, 8, 8)})
    assert out["samples"].shape == (1, 4, 8, 8)


def test_advanced_start_end_and_leftover_noise():
    model = analytic_model()
    pos, neg = conditioning(1.0), conditioning(-1.0)
    adv = KSamplerAdvanced()
    latent = _latent(batch=1)
    full = adv.sample(model, "enable", 3, 10, 4.0, "euler", "karras", pos, neg, latent, 0, 10000, "disable")[0]
    first = adv.sample(model, "enable", 3, 10, 4.0, "euler", "karras", pos, neg, latent, 0, 5, "enable")[0]
    second = adv.sample(model, "disable", 3, 10, 4.0, "euler", "karras", pos, neg, first, 5, 10000, "disable")[0]
    assert torch.allclose(full["samples"], second["samples"], atol=1e-4)
    assert float(first["samples"].std()) > float(full["samples"].std())  # leftover noise kept
    same = adv.sample(model, "enable", 3, 10, 4.0, "euler", "karras", pos, neg, latent, 12, 10000, "disable")[0]
    assert torch.equal(same["samples"], latent["samples"])


def test_batch_invariant_noise_option():
    model = analytic_model()
    pos, neg = conditioning(1.0), conditioning(-1.0)
    adv = KSamplerAdvanced()
    for sampler in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"):
        batch = adv.sample(model, "enable", 11, 6, 4.0, sampler, "karras", pos, neg,
                           {"samples": torch.zeros(4, 4, 8, 8)}, 0, 10000, "disable", True)[0]["samples"]
        for k in (0, 2):
            single = adv.sample(model, "enable", 11, 6, 4.0, sampler, "karras", pos, neg,
                                {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [k]}, 0, 10000, "disable",
                                True)[0]["samples"]
            assert torch.allclose(batch[k], single[0], atol=1e-5), f"{sampler}: item {k} depends on the batch"


def test_karras_rho_option_changes_the_schedule():
    from ksampler.schedulers import calculate_sigmas
    model = analytic_model()
    pos, neg = conditioning(1.0), conditioning(-1.0)
    latent = _latent(batch=1)
    adv = KSamplerAdvanced()
    args = (model, "enable", 3, 6, 4.0, "euler", "karras", pos, neg, latent, 0, 10000, "disable")
    default = adv.sample(*args)[0]["samples"]
    same = adv.sample(*args, karras_rho=7.0)[0]["samples"]
    other = adv.sample(*args, karras_rho=3.0)[0]["samples"]
    assert torch.equal(default, same) and not torch.allclose(default, other)
    s3, s7 = calculate_sigmas(model.model_sampling, "karras", 6, rho=3.0), calculate_sigmas(model.model_sampling, "karras", 6)
    assert torch.allclose(s3[[0, -2]], s7[[0, -2]]) and not torch.allclose(s3, s7)
