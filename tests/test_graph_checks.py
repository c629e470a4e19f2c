"""The graph against the model, before any model call, and the model-output guard: one clear error each.

Inside ComfyUI these checks run on the real host (tools/comfy_bad_inputs.py, README "Bad input"); here the
host is the stand-in of tests/comfy_standins.py, and headless runs use the bundled model.
"""
import copy
import types

import pytest
import torch

from comfy_standins import StandInModelPatcher, install
from ksampler import interop_nodes as interop
from ksampler.conditioning import KSamplerInputError
from ksampler.graph_checks import BUNDLED_LATENT_KEY, ModelSpec, check_graph, describe_latent
from ksampler.guard import ModelOutputError, NonFiniteOutputError

SD = ModelSpec("this SD15 model", 4, 2, context_dim=8, empty_latent_node="Empty Latent Image")
SD3 = ModelSpec("this SD3 model", 16, 2, context_dim=8, pooled_dim=6)
VIDEO = ModelSpec("this WAN21 model", 16, 3, context_dim=8)


def cond(value=1.0, width=8, **opts):
    return [[torch.full((1, 4, width), value), dict(opts)]]


def latent(*shape, fill=None):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) if fill is None else \
        torch.full(shape, float(fill))
    return {"samples": t}


DEFAULT = object()


def check(spec, positive=DEFAULT, negative=DEFAULT, lat=None, cfg=4.0, reads_uncond=False):
    return check_graph(spec, cond() if positive is DEFAULT else positive,
                       cond(-1.0) if negative is DEFAULT else negative,
                       latent(1, spec.latent_channels, 8, 8) if lat is None else lat, cfg, reads_uncond)


# (case id, spec, overrides, input named, words the message must hold)
GRAPH_CASES = [
    ("width", SD, dict(positive=cond(width=12)), "positive[0]", ["12-wide", "wants 8-wide", "CLIP"]),
    ("width-negative", SD, dict(negative=cond(width=12)), "negative[0]", ["12-wide"]),
    ("width-named-encoder", ModelSpec("m", 4, context_dim=768), dict(positive=cond(width=1024),
                                                                    negative=cond(width=1024)),
     "positive[0]", ["1024-wide", "OpenCLIP-H", "768-wide"]),
    ("pooled-missing", SD3, dict(lat=latent(1, 16, 8, 8)), "positive[0]", ["pooled_output", "6-wide", "'y'"]),
    ("pooled-width", SD3, dict(positive=cond(pooled_output=torch.zeros(1, 5)), negative=cond(pooled_output=torch.zeros(1, 6)),
                               lat=latent(1, 16, 8, 8)), "positive[0]['pooled_output']", ["[batch, 6]"]),
    ("pooled-nan", SD, dict(positive=cond(pooled_output=torch.full((1, 6), float("nan")))),
     "positive[0]['pooled_output']", ["NaN"]),
    ("pooled-not-tensor", SD, dict(positive=cond(pooled_output=[0.0] * 6)), "positive[0]['pooled_output']",
     ["tensor"]),
    ("cond-nan", SD, dict(positive=cond(float("nan"))), "positive[0]", ["NaN"]),
    ("cond-inf-negative", SD, dict(negative=cond(float("inf"))), "negative[0]", ["NaN or Inf"]),
    ("cond-mask-range", SD, dict(positive=cond(mask=torch.full((1, 8, 8), -1.0))), "positive[0]['mask']",
     ["[0, 1]", "-1"]),
    ("noise-mask-range", SD, dict(lat={"samples": torch.randn(1, 4, 8, 8), "noise_mask": torch.full((1, 8, 8), 2.0)}),
     "latent_image['noise_mask']", ["[0, 1]", "2"]),
    ("empty-positive", SD, dict(positive=[]), "positive", ["empty"]),
    ("empty-negative-cfg", SD, dict(negative=[]), "negative", ["empty", "cfg is 4"]),
    ("none-negative-cfg", SD, dict(negative=None), "negative", ["CONDITIONING"]),
    ("channels", SD, dict(lat=latent(1, 3, 8, 8)), "latent_image['samples']", ["3-channel", "4-channel latents"]),
    ("sd-latent-into-sd3", SD3, dict(lat=latent(1, 4, 8, 8)), "latent_image['samples']",
     ["4-channel 8x8", "64x64 image", "16-channel"]),
    ("rank-3-into-image", SD, dict(lat=latent(1, 4, 64)), "latent_image['samples']", ["audio", "image latents"]),
    ("rank-5-into-image", SD, dict(lat=latent(1, 4, 2, 8, 8)), "latent_image['samples']", ["video", "image"]),
    ("bundled-zero-latent-into-sd", SD, dict(lat={"samples": torch.zeros(1, 3, 32, 32), BUNDLED_LATENT_KEY: True}),
     "latent_image['samples']", ["bundled model", "32x32", "Empty Latent Image"]),
    # areas and masks against the latent: the same check in both paths, since ComfyUI's own hands torch an
    # impossible crop there (an area starting outside the latent) or a mask batch it cannot repeat
    ("area-outside", SD, dict(positive=cond(area=(8, 8, 100, 100))), "positive[0]['area']",
     ["outside the latent", "offset 100"]),
    ("percentage-area-outside-negative", SD, dict(negative=cond(area=("percentage", 0.5, 0.5, 1.5, 1.5))),
     "negative[0]['area']", ["outside the latent"]),
    ("mask-batch", SD, dict(positive=cond(mask=torch.ones(2, 8, 8)), lat=latent(3, 4, 8, 8)),
     "positive[0]['mask']", ["2 masks", "batch of 3"]),
    ("size-multiple", ModelSpec("the bundled flow model", 3, context_dim=8, size_multiple=16, downscale=1,
                                widen_empty_latent=False), dict(lat=latent(1, 3, 24, 24)),
     "latent_image['samples']", ["multiples of 16", "32x32"]),
]


@pytest.mark.parametrize("case,spec,overrides,name,words", GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_graph_errors_name_the_input_what_was_found_and_the_fix(case, spec, overrides, name, words):
    given = copy.deepcopy(overrides)
    with pytest.raises(KSamplerInputError) as info:
        check(spec, **overrides)
    message = str(info.value)
    assert message.startswith(name + ":") or message.startswith(name + " "), message
    for word in words:
        assert word in message, (word, message)
    for key, value in given.items():  # nothing the caller passed is changed
        assert repr(value) == repr(overrides[key])


def test_what_the_model_accepts_passes():
    check(SD)
    check(SD, lat=latent(1, 3, 8, 8, fill=0))              # an all-zero latent is widened (as ComfyUI does)
    check(SD3, positive=cond(pooled_output=torch.zeros(1, 6)), negative=cond(pooled_output=torch.zeros(1, 6)),
          lat=latent(1, 4, 8, 8, fill=0))
    check(VIDEO, lat=latent(1, 16, 3, 8, 8))
    check(SD, positive=cond(area=(8, 8, 4, 4)))             # past the far edge: cut there, as in ComfyUI
    check(SD, positive=cond(mask=torch.ones(2, 8, 8)), lat=latent(4, 4, 8, 8))  # masks repeat over the batch
    check(VIDEO, lat=latent(1, 16, 8, 8))                  # ComfyUI gives an image latent a frames dim
    check(SD, negative=[], cfg=1.0)                         # cfg 1: the negative is never evaluated
    check(SD, negative=None, cfg=1.0)
    check(ModelSpec("unknown", 4), positive=cond(width=4096), negative=cond(width=4096))  # width unknown: unchecked
    check(SD, positive=[[torch.randn(1, 4, 8, dtype=torch.float64), {}]],
          lat={"samples": torch.randn(1, 4, 8, 8).half()})  # dtypes convert downstream
    with pytest.raises(KSamplerInputError, match="CFG\\+\\+"):
        check(SD, negative=[], cfg=1.0, reads_uncond=True)


def test_latent_descriptions_give_the_sizes_the_user_chose():
    assert "64x64 image" in describe_latent(torch.zeros(1, 4, 8, 8))
    assert "SD3/Flux" in describe_latent(torch.zeros(1, 16, 16, 8)) and "64x128 image" in \
        describe_latent(torch.zeros(1, 16, 16, 8))
    assert "3 frames" in describe_latent(torch.zeros(1, 16, 3, 8, 8))
    assert "pixel latent of a 32x32 image" in describe_latent(torch.zeros(1, 3, 32, 32), {BUNDLED_LATENT_KEY: True})


# --- headless: the bundled model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    from ksampler.bundled.loader import load_bundled
    return load_bundled("flow")


def _bundled_run(bundled, **kw):
    from ksampler.nodes import KSampler
    model, clip, _ = bundled
    args = dict(model=model, seed=1, steps=2, cfg=3.0, sampler_name="euler", scheduler="karras",
                positive=clip.encode("a red circle"), negative=clip.encode(""),
                latent_image={"samples": torch.zeros(1, 3, 32, 32), BUNDLED_LATENT_KEY: True}, denoise=1.0)
    args.update(kw)
    return KSampler().sample(**args)[0]


@pytest.mark.parametrize("size", [64, 128])
def test_an_sd_empty_latent_into_the_bundled_model_names_the_image_size_and_the_node(bundled, size):
    sd_latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}  # ComfyUI's Empty Latent Image at size x size
    with pytest.raises(KSamplerInputError) as info:
        _bundled_run(bundled, latent_image=sd_latent)
    message = str(info.value)
    assert message.startswith("latent_image['samples']:")
    assert f"{size}x{size} image" in message and "Empty Latent Image (ksampler)" in message, message
    assert f"width {size} and height {size}" in message, message


def test_sd_conditioning_into_the_bundled_model_names_the_mix(bundled):
    sd = [[torch.randn(1, 77, 768), {}]]
    with pytest.raises(KSamplerInputError, match=r"^positive\[0\]: is 768-wide .* wants 64-wide .*Text Encode "
                                                 r"\(ksampler\)"):
        _bundled_run(bundled, positive=sd, negative=sd)


def test_bundled_latent_sides_checked_before_the_model(bundled):
    with pytest.raises(KSamplerInputError, match="multiples of 16"):
        _bundled_run(bundled, latent_image={"samples": torch.zeros(1, 3, 24, 24)})


def test_bundled_nodes_mark_their_latents(bundled):
    from ksampler.bundled.nodes import EmptyLatentImage, VAEEncode
    assert EmptyLatentImage().generate(32, 32)[0][BUNDLED_LATENT_KEY] is True
    assert VAEEncode().encode(torch.rand(1, 32, 32, 3), bundled[2])[0][BUNDLED_LATENT_KEY] is True


def test_a_comfy_object_is_not_sampled_as_our_model():
    from ksampler.nodes import KSampler
    bare = type("BaseModel", (), {"__module__": "comfy.model_base", "diffusion_model": None, "model_sampling": 1,
                                  "latent_format": 1, "apply_model": 1})()
    vae = type("VAE", (), {"__module__": "comfy.sd"})()
    for obj, words in ((bare, "bare BaseModel"), (vae, "ComfyUI VAE")):
        with pytest.raises(KSamplerInputError, match=f"^model: got (ComfyUI's )?(a )?{words}"):
            KSampler().sample(obj, 1, 2, 3.0, "euler", "karras", cond(), cond(-1.0), latent(1, 4, 8, 8))


def test_headless_nan_names_step_sigma_and_sampler():
    from analytic import analytic_model
    from ksampler.pipeline import ksample
    model = analytic_model()

    class NaNLate:
        model_sampling, latent_format = model.model_sampling, model.latent_format

        def apply_model(self, x, sigma, context=None, pooled=None):
            out = model.apply_model(x, sigma, context=context, pooled=pooled)
            return out * float("nan") if float(sigma.reshape(-1)[0]) < 1.0 else out

    with pytest.raises(NonFiniteOutputError, match=r"at step \d+/\d+ \(sigma=0\.\d+\) with sampler dpmpp_2m; try:"):
        ksample(NaNLate(), 1, 8, 3.0, "dpmpp_2m", "karras", cond(), cond(-1.0), latent(1, 4, 8, 8))


# --- inside ComfyUI (stand-in host) -------------------------------------------------------------------------
@pytest.fixture
def host(monkeypatch):
    return install(monkeypatch)


def _host_run(adapter, patcher, positive=DEFAULT, negative=DEFAULT, lat=None, sampler="euler", steps=6):
    return adapter.common_ksampler(patcher, 3, steps, 3.0, sampler, "karras",
                                   cond() if positive is DEFAULT else positive,
                                   cond(-1.0) if negative is DEFAULT else negative,
                                   lat or latent(1, patcher.latent_channels, 8, 8))


def test_host_spec_reads_the_model(host):
    modules, adapter = host
    from ksampler.comfy_checks import host_spec
    sd = host_spec(StandInModelPatcher(modules))
    assert (sd.latent_channels, sd.latent_dims, sd.context_dim, sd.pooled_dim) == (4, 2, 8, None)
    sd3 = host_spec(StandInModelPatcher(modules, "flow", family="SD3"))
    assert (sd3.latent_channels, sd3.context_dim, sd3.pooled_dim) == (16, 8, 6)
    assert sd3.name == "this SD3 model" and sd3.empty_latent_node == "EmptySD3LatentImage"


def test_host_sd3_takes_latents_no_larger_than_its_position_embedding(host):
    """SD3's MMDiT crops a stored position embedding (pos_embed_max_size patches a side) to the latent; a latent
    past it failed on an assert deep inside the network (the built-in KSampler too).  Here it is an input error
    before the first model call, naming the largest size; a network without a stored embedding has no limit."""
    modules, adapter = host
    patcher = StandInModelPatcher(modules, "flow", family="SD3")
    net = patcher.model.diffusion_model
    net.pos_embed, net.pos_embed_max_size = torch.zeros(1, 16, 2), 4  # 4 patches a side
    net.x_embedder = types.SimpleNamespace(patch_size=(2, 2))
    from ksampler.comfy_checks import host_spec
    assert host_spec(patcher).max_side == 8  # (h + 1) // 2 <= 4
    pooled, negative = cond(pooled_output=torch.zeros(1, 6)), cond(-1.0, pooled_output=torch.zeros(1, 6))
    out = _host_run(adapter, patcher, pooled, negative, latent(1, 16, 8, 6), steps=2)
    assert out["samples"].shape == (1, 16, 8, 6)
    modules["comfy.samplers"].STANDIN_CALLS.clear()
    with pytest.raises(KSamplerInputError, match=r"^latent_image\['samples'\]: is a 16-channel 10x8 latent.*this SD3 "
                       r"model takes at most 64 pixels \(8 latent pixels\) a side.*EmptySD3LatentImage"):
        _host_run(adapter, patcher, pooled, negative, latent(1, 16, 8, 10))
    assert modules["comfy.samplers"].STANDIN_CALLS.get("model", 0) == 0
    net.pos_embed = None  # sin-cos embeddings made for any size
    assert host_spec(patcher).max_side is None


@pytest.mark.parametrize("overrides,name", [
    (dict(positive=cond(width=12)), "positive[0]"),
    (dict(negative=cond(float("nan"))), "negative[0]"),
    (dict(positive=[]), "positive"),
    (dict(lat=latent(1, 3, 8, 8)), "latent_image['samples']"),
    (dict(lat={"samples": torch.randn(1, 4, 8, 8), "noise_mask": -torch.ones(1, 8, 8)}), "latent_image['noise_mask']"),
])
def test_host_graph_errors_come_before_any_model_call(host, overrides, name):
    modules, adapter = host
    patcher = StandInModelPatcher(modules)
    options = copy.deepcopy(patcher.model_options)
    with pytest.raises(KSamplerInputError) as info:
        _host_run(adapter, patcher, **overrides)
    assert str(info.value).startswith(name)
    calls = modules["comfy.samplers"].STANDIN_CALLS
    assert calls["sample"] == 0 and calls["model"] == 0
    assert patcher.model_options == options


def test_host_sd3_needs_its_pooled_output(host):
    modules, adapter = host
    patcher = StandInModelPatcher(modules, "flow", family="SD3")
    with pytest.raises(KSamplerInputError, match=r"^positive\[0\]: has no 'pooled_output'.*6-wide 'y'"):
        _host_run(adapter, patcher)
    good = cond(pooled_output=torch.zeros(1, 6))
    out = _host_run(adapter, patcher, positive=good, negative=good)["samples"]
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()


def test_host_model_type(host):
    modules, adapter = host
    from ksampler.nodes import KSampler
    bare = StandInModelPatcher(modules).model
    bare_module = type("BaseModel", (type(bare),), {"__module__": "comfy.model_base"})
    bare.__class__ = bare_module
    with pytest.raises(KSamplerInputError, match="^model: got ComfyUI's bare BaseModel"):
        KSampler().sample(bare, 1, 2, 3.0, "euler", "karras", cond(), cond(-1.0), latent(1, 4, 8, 8))


def _wrapper(kind, below_sigma=None):
    def wrapper(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        if below_sigma is not None and float(args["timestep"].reshape(-1)[0]) >= below_sigma:
            return out
        return {"nan": out * float("nan"), "inf": out * float("inf"), "none": None, "shape": out[:, :1]}[kind]
    return wrapper


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "euler_cfg_pp"])
def test_host_nan_is_caught_at_the_step_it_starts(host, sampler):
    modules, adapter = host
    patcher = StandInModelPatcher(modules)
    patcher.model_options["model_function_wrapper"] = _wrapper("nan", below_sigma=1.0)
    from ksampler.schedulers import sampling_sigmas
    sigmas = sampling_sigmas(patcher.model_sampling_object, "karras", 8)
    first = int((sigmas[:-1] < 1.0).nonzero()[0]) + 1  # the first step whose sigma is below 1
    with pytest.raises(NonFiniteOutputError) as info:
        _host_run(adapter, patcher, sampler=sampler, steps=8)
    message = str(info.value)
    assert f"at step {first}/8 (sigma={float(sigmas[first - 1]):.6g}) with sampler {sampler}; try:" in message
    assert message.startswith("model:") and "float16" in message


@pytest.mark.parametrize("kind,error", [("none", "returned NoneType"), ("shape", "of shape (1, 1, 8, 8)"),
                                        ("inf", "NaN or Inf at step 1/")])
def test_host_model_patch_that_breaks_the_output_names_the_model(host, kind, error):
    modules, adapter = host
    patcher = StandInModelPatcher(modules)
    patcher.model_options["model_function_wrapper"] = _wrapper(kind)
    with pytest.raises(ModelOutputError) as info:
        _host_run(adapter, patcher)
    assert str(info.value).startswith("model:") and error in str(info.value), str(info.value)


def test_host_existing_model_patch_still_runs_and_nothing_is_left_behind(host):
    """Our output check chains after the user's model patch; after an error the next clean run is identical."""
    modules, adapter = host
    patcher = StandInModelPatcher(modules)
    seen = []

    def user_patch(apply_model, args):
        seen.append(1)
        return apply_model(args["input"], args["timestep"], **args["c"])

    fresh = _host_run(adapter, StandInModelPatcher(modules))["samples"]
    patcher.model_options["model_function_wrapper"] = user_patch
    assert torch.equal(_host_run(adapter, patcher)["samples"], fresh) and seen
    assert patcher.model_options["model_function_wrapper"] is user_patch
    broken = StandInModelPatcher(modules)
    broken.model_options["model_function_wrapper"] = _wrapper("nan")
    with pytest.raises(NonFiniteOutputError):
        _host_run(adapter, broken)
    with pytest.raises(KSamplerInputError):
        _host_run(adapter, StandInModelPatcher(modules), positive=cond(width=3))
    assert torch.equal(_host_run(adapter, StandInModelPatcher(modules))["samples"], fresh)


def test_host_network_hook_names_the_model_and_is_removed(host):
    modules, adapter = host
    from ksampler.comfy_checks import HostOutputGuard

    class Broken(torch.nn.Module):
        def forward(self, x, t):
            return None if t == 0 else x[:, :2]

    base = type("BaseModel", (), {})()
    base.diffusion_model = Broken()
    guard = HostOutputGuard(base, 4, "SD15")
    with guard:
        with pytest.raises(ModelOutputError, match="^model: the SD15 network \\(Broken\\) returned NoneType"):
            base.diffusion_model(torch.zeros(1, 4, 8, 8), 0)
        with pytest.raises(ModelOutputError, match="returned shape \\(1, 2, 8, 8\\) for a latent of shape "
                                                   "\\(1, 4, 8, 8\\)"):
            base.diffusion_model(torch.zeros(1, 4, 8, 8), 1)
    assert not base.diffusion_model._forward_hooks
    assert base.diffusion_model(torch.zeros(1, 4, 8, 8), 0) is None  # outside a run: untouched


def test_host_dtypes_pass_through_as_comfyui_gets_them(host):
    """float16 / bfloat16 latents and float64 conditioning reach the host unchanged (it converts them)."""
    modules, adapter = host
    seen = {}
    sample = modules["comfy.samplers"].sample

    def spy(model, noise, positive, negative, cfg, device, sampler, sigmas, latent_image=None, **kw):
        seen["latent"], seen["noise"], seen["positive"] = latent_image.dtype, noise.dtype, positive[0][0].dtype
        return sample(model, noise, positive, negative, cfg, device, sampler, sigmas, latent_image=latent_image, **kw)
    modules["comfy.samplers"].sample = spy
    for dtype in (torch.float16, torch.bfloat16):
        _host_run(adapter, StandInModelPatcher(modules), positive=[[torch.ones(1, 4, 8, dtype=torch.float64), {}]],
                  lat={"samples": torch.randn(1, 4, 8, 8).to(dtype)})
        assert seen == {"latent": dtype, "noise": dtype, "positive": torch.float64}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_headless_dtypes_convert_and_nothing_is_mutated(bundled, dtype):
    """A half-precision latent: noise drawn in its dtype, scaled in its dtype, sampled in float32 (ComfyUI's order);
    float64 conditioning is cast to the model's dtype."""
    model, clip, _ = bundled
    lat = {"samples": (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(dtype)}
    pos = [[clip.encode("a red circle")[0][0].double(), {}]]
    given = (lat["samples"].clone(), pos[0][0].clone())
    out = _bundled_run(bundled, latent_image=lat, positive=pos, denoise=0.5)["samples"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(lat["samples"], given[0]) and lat["samples"].dtype == dtype and torch.equal(pos[0][0], given[1])
    ref = _bundled_run(bundled, latent_image={"samples": lat["samples"].float()}, denoise=0.5,
                       positive=[[pos[0][0].float(), {}]])["samples"]
    assert float((out - ref).abs().max()) < 0.05  # the same image up to the half-precision noise and scaling


def test_workflow_links_accept_comfyui_type_lists():
    from ksampler.workflow import types_match
    assert types_match("KSAMPLER_BUNDLED_MODEL", "MODEL,KSAMPLER_BUNDLED_MODEL")
    assert types_match("MODEL", "MODEL,KSAMPLER_BUNDLED_MODEL") and types_match("LATENT", "*")
    assert not types_match("KSAMPLER_BUNDLED_MODEL", "MODEL") and not types_match("CLIP", "KSAMPLER_BUNDLED_CLIP")


def test_host_negative_may_be_missing_at_cfg_1(host):
    modules, adapter = host
    lat = latent(1, 4, 8, 8)
    out = adapter.common_ksampler(StandInModelPatcher(modules), 3, 4, 1.0, "euler", "karras", cond(), None, lat)
    assert torch.isfinite(out["samples"]).all()
    with pytest.raises(KSamplerInputError, match="^negative: the conditioning list is empty and a CFG\\+\\+"):
        adapter.common_ksampler(StandInModelPatcher(modules), 3, 4, 1.0, "euler_cfg_pp", "karras", cond(), [], lat)


def test_host_scheduler_node_names_a_model_that_is_not_comfyuis(host, bundled):
    modules, adapter = host
    with pytest.raises(KSamplerInputError, match="^model: expected a ComfyUI MODEL, got DiffusionModel"):
        interop.Scheduler().get_sigmas(bundled[0], "karras", 4, 1.0)
