"""ComfyUI node classes: thin shells that validate inputs, call the core and shape outputs.

``NODE_TABLE`` is the one source of truth for node ids and display names (ours,
the bundled model's and the ComfyUI interop nodes'); ids are namespaced
(``ksampler_...``) so they never collide with ComfyUI built-ins.
Each class's inputs and outputs are declared once, in its ``NodeSpec``
(``node_schema``): the classic (V1) attributes and the V3 ``io.ComfyNode``
(``v3_nodes``) are both built from it.  Input order is public API: saved
workflows store widget values by position, so new inputs only ever go at the
end, as optional inputs.
"""
from __future__ import annotations

import importlib
import math
import sys

from .conditioning.schedule import RAMPS, SIGMA_UNBOUNDED, GuidanceSchedule
from .node_inputs import (NOISE_OPTION_INPUTS, TOOLTIPS, host_only_names, is_comfy_model, sampler_choices,
                          sampler_name_tooltip, scheduler_choices, scheduler_tooltip)
from .node_schema import In, NodeSpec, Out, v1_node, v3_node
from .graph_checks import MODEL_TYPES
from .samplers import SAMPLERS
from .samplers.reference import FLOW_GEOMETRY_CHOICES, default_reference_mode, reference_mode_from_input
from .sampling_pass import PREVIEWS, check_preview, check_sampler_args
from .twomodel import SWITCH_MODES, WAN22_BOUNDARY
from .validation import MAX_SEED, MAX_STEPS, KSamplerInputError

SAMPLER_OPTIONS_TYPE = "KSAMPLER_OPTIONS"

__all__ = ["KSampler", "KSamplerAdvanced", "KSamplerTwoModels", "SamplerOptions", "NODES", "NODE_TABLE",
           "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "is_comfy_model", "v3_nodes"]

CATEGORY = "sampling"


# the optional controls of issue 12, appended after karras_rho on the Advanced node, in this order
CONTROL_INPUTS = (
    In("variation_seed", "INT", TOOLTIPS["variation_seed"], default=0, min=0, max=MAX_SEED, optional=True),
    In("variation_strength", "FLOAT", TOOLTIPS["variation_strength"], default=0.0, min=0.0, max=1.0, step=0.01,
       optional=True),
    In("cfg_sigma_min", "FLOAT", TOOLTIPS["cfg_sigma_min"], default=0.0, min=0.0, max=SIGMA_UNBOUNDED, step=0.001,
       optional=True),
    In("cfg_sigma_max", "FLOAT", TOOLTIPS["cfg_sigma_max"], default=SIGMA_UNBOUNDED, min=0.0, max=SIGMA_UNBOUNDED,
       step=0.001, optional=True),
    In("cfg_ramp", "COMBO", TOOLTIPS["cfg_ramp"], choices=list(RAMPS), optional=True),
    In("cfg_ramp_end", "FLOAT", TOOLTIPS["cfg_ramp_end"], default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
       optional=True),
    In("cfg_stop_at", "FLOAT", TOOLTIPS["cfg_stop_at"], default=1.0, min=0.0, max=1.0, step=0.01, optional=True),
    In("sampler_options", SAMPLER_OPTIONS_TYPE, TOOLTIPS["sampler_options"], optional=True),
    In("preview", "COMBO", TOOLTIPS["preview"], choices=list(PREVIEWS), optional=True),
)


def _common_inputs() -> tuple:
    """steps ... latent_image: the inputs both samplers share, in ComfyUI's order."""
    return (
        In("steps", "INT", TOOLTIPS["steps"], default=20, min=1, max=MAX_STEPS),
        In("cfg", "FLOAT", TOOLTIPS["cfg"], default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        In("sampler_name", "COMBO", sampler_name_tooltip, choices=sampler_choices),
        In("scheduler", "COMBO", scheduler_tooltip, choices=scheduler_choices),
        In("positive", "CONDITIONING", TOOLTIPS["positive"]),
        In("negative", "CONDITIONING", TOOLTIPS["negative"]),
        In("latent_image", "LATENT", TOOLTIPS["latent_image"]),
    )


SEARCH_ALIASES = ("sampler", "sample", "generate", "denoise", "txt2img", "img2img", "ksampler")
LATENT_OUT = Out("LATENT", "The denoised latent.")
MODEL_IN = In("model", MODEL_TYPES, TOOLTIPS["model"])


def _run(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0, **kw):
    """Dispatch to ComfyUI's host path for a ComfyUI model, else to our core."""
    host_samplers, host_schedulers = host_only_names()
    names = {}
    for key, name, host in (("sampler_name", sampler_name, host_samplers), ("scheduler", scheduler, host_schedulers)):
        if isinstance(name, str) and name in host:
            if not is_comfy_model(model):
                raise KSamplerInputError(f"{key}: {name!r} is ComfyUI's own, which runs only with a ComfyUI MODEL "
                                         "(from a checkpoint loader); pick one of ksampler's names for this model")
        else:
            names[key] = name  # the host runs its own names; ours are checked here
    check_sampler_args(seed=seed, steps=steps, cfg=cfg, denoise=denoise, **names)
    if kw.get("sampler_options"):
        if sampler_name not in SAMPLERS:
            raise KSamplerInputError(f"sampler_options: {sampler_name!r} runs as ComfyUI's own sampler, which takes no "
                                     "options from here; remove the Sampler Options+ input or pick a ksampler sampler")
        from .samplers.options import resolve_sampler_options
        resolve_sampler_options(sampler_name, kw["sampler_options"])
    if kw.get("reference_mode") is None:
        kw["reference_mode"] = default_reference_mode()
    if is_comfy_model(model):
        from . import comfy_adapter
        return comfy_adapter.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                             latent_image, denoise=denoise, **kw)
    from .pipeline import ksample
    callback = kw.pop("callback", None)
    if callback is None and "comfy.utils" in sys.modules:
        from .comfy_adapter import core_callback
        callback = core_callback(steps)
    return ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                   callback=callback, **kw)


@v1_node(NodeSpec(
    function="sample", category=CATEGORY, search_aliases=SEARCH_ALIASES,
    description="Uses the provided model, positive and negative conditioning to denoise the latent image, with the "
                "ksampler pack's sampler and scheduler registries (ComfyUI's KSampler inputs, and more samplers and "
                "schedulers).",
    inputs=(MODEL_IN,
            In("seed", "INT", TOOLTIPS["seed"], default=0, min=0, max=MAX_SEED, control_after_generate=True),
            *_common_inputs(),
            In("denoise", "FLOAT", TOOLTIPS["denoise"], default=1.0, min=0.0, max=1.0, step=0.01),
            In("calibration", "KSAMPLER_CALIBRATION", TOOLTIPS["calibration"], optional=True)),
    outputs=(LATENT_OUT,)))
class KSampler:
    """ComfyUI's KSampler surface, sampled by our registries."""

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0, calibration=None):
        kw = {} if calibration is None else {"calibration": calibration}
        return (_run(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                     **kw),)


@v1_node(NodeSpec(
    function="sample", category=CATEGORY,
    search_aliases=SEARCH_ALIASES + ("advanced", "refiner", "start at step", "end at step"),
    description="KSampler with start/end steps for base-refiner chains, noise options (batch-invariant, CPU, fast "
                "Brownian noise, flow geometry, karras rho), variation seeds, a guidance schedule, sampler options "
                "and a choice of preview.",
    inputs=(MODEL_IN,
            In("add_noise", "COMBO", TOOLTIPS["add_noise"], choices=["enable", "disable"]),
            In("noise_seed", "INT", TOOLTIPS["noise_seed"], default=0, min=0, max=MAX_SEED,
               control_after_generate=True),
            *_common_inputs(),
            In("start_at_step", "INT", TOOLTIPS["start_at_step"], default=0, min=0, max=MAX_STEPS),
            In("end_at_step", "INT", TOOLTIPS["end_at_step"], default=10000, min=0, max=MAX_STEPS),
            In("return_with_leftover_noise", "COMBO", TOOLTIPS["return_with_leftover_noise"],
               choices=["disable", "enable"]),
            *NOISE_OPTION_INPUTS,
            In("karras_rho", "FLOAT", TOOLTIPS["karras_rho"], default=7.0, min=0.5, max=30.0, step=0.1,
               optional=True),
            *CONTROL_INPUTS),
    outputs=(LATENT_OUT,)))
class KSamplerAdvanced:
    """ComfyUI's KSamplerAdvanced surface, plus the noise options no peer has together (optional, at the end)."""

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, start_at_step, end_at_step, return_with_leftover_noise, batch_invariant_noise=False,
               cpu_noise=False, brownian_noise="tree", flow_geometry="default", karras_rho=7.0, variation_seed=0,
               variation_strength=0.0, cfg_sigma_min=0.0, cfg_sigma_max=SIGMA_UNBOUNDED, cfg_ramp="constant",
               cfg_ramp_end=1.0, cfg_stop_at=1.0, sampler_options=None, preview="default"):
        from .pipeline import NoiseOptions
        for name, value, choices in (("add_noise", add_noise, ("enable", "disable")),
                                     ("return_with_leftover_noise", return_with_leftover_noise, ("enable", "disable")),
                                     ("brownian_noise", brownian_noise, ("tree", "fast")),
                                     ("flow_geometry", flow_geometry, FLOW_GEOMETRY_CHOICES)):
            if value not in choices:
                raise KSamplerInputError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
        for name, value in (("start_at_step", start_at_step), ("end_at_step", end_at_step)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEPS:
                raise KSamplerInputError(f"{name}: must be an integer between 0 and {MAX_STEPS}, got {value!r}")
        from .validation import check_float
        check_float("karras_rho", karras_rho, 0.5, 30.0)
        options = NoiseOptions(batch_invariant=bool(batch_invariant_noise), device_invariant=bool(cpu_noise),
                               brownian=brownian_noise)
        scheduler_options = {"rho": float(karras_rho)} if scheduler == "karras" and karras_rho != 7.0 else None
        out = _run(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, 1.0,
                   add_noise=add_noise == "enable", start_step=start_at_step, last_step=end_at_step,
                   force_full_denoise=return_with_leftover_noise != "enable", noise_options=options,
                   reference_mode=reference_mode_from_input(flow_geometry),
                   scheduler_options=scheduler_options,
                   **_control_kwargs(variation_seed, variation_strength, cfg_sigma_min, cfg_sigma_max, cfg_ramp,
                                     cfg_ramp_end, cfg_stop_at, sampler_options, preview))
        return (out,)


def _control_kwargs(variation_seed, variation_strength, cfg_sigma_min, cfg_sigma_max, cfg_ramp, cfg_ramp_end,
                    cfg_stop_at, sampler_options, preview) -> dict:
    """The sampling keyword arguments of the Advanced node's controls, validated."""
    from .samplers.noise import check_variation
    check_preview(preview)
    if sampler_options is not None and not isinstance(sampler_options, dict):
        raise KSamplerInputError(f"sampler_options: expected the output of a Sampler Options+ node, got "
                                 f"{type(sampler_options).__name__}")
    check_variation(variation_seed, variation_strength)
    return {"variation_seed": variation_seed, "variation_strength": float(variation_strength),
            "guidance_schedule": GuidanceSchedule.from_inputs(cfg_sigma_min, cfg_sigma_max, cfg_ramp, cfg_ramp_end,
                                                              cfg_stop_at),
            "sampler_options": dict(sampler_options) if sampler_options else None, "preview": preview}


def _option_names_tooltip() -> str:
    from .samplers.options import all_option_names
    return ("name=value pairs separated by commas or new lines. Known options: " + ", ".join(all_option_names())
            + ". The KSampler rejects an option its sampler does not take.")


@v1_node(NodeSpec(
    function="build", category=CATEGORY, search_aliases=("sampler options", "eta", "s_noise", "churn"),
    description="Options of the sampler (eta, s_noise, s_churn / s_tmin / s_tmax, er_sde, sa_solver, restart).",
    inputs=(In("options", "STRING", _option_names_tooltip(), default="eta=1.0, s_noise=1.0", multiline=True),
            In("base", SAMPLER_OPTIONS_TYPE, "Options to extend (these override them).", optional=True)),
    outputs=(Out(SAMPLER_OPTIONS_TYPE, "Sampler options for the sampler_options input of KSampler+ (Advanced) "
                                       "and KSampler+ (Two Models)."),)))
class SamplerOptions:
    """Per-sampler options (eta, s_noise, s_churn, ...) as one typed value for KSampler Advanced / two models."""

    def build(self, options, base=None):
        from .samplers.options import parse_options
        if base is not None and not isinstance(base, dict):
            raise KSamplerInputError(f"base: expected sampler options, got {type(base).__name__}")
        if not isinstance(options, str):
            raise KSamplerInputError(f"options: expected text such as 'eta=0.5', got {type(options).__name__}")
        return (parse_options(options, base),)


def _cfg_input(name: str, which: str) -> In:
    return In(name, "FLOAT", f"CFG of the {which}-noise expert.", default=3.5, min=0.0, max=100.0, step=0.1,
              round=0.01)


@v1_node(NodeSpec(
    function="sample", category=CATEGORY, search_aliases=SEARCH_ALIASES + ("two models", "wan 2.2", "experts"),
    description="Samples with a high-noise model until the boundary noise level, then a low-noise model (Wan "
                "2.2's two experts), each with its own cfg; the same latent as two chained KSampler Advanced "
                "nodes with that switch step.",
    inputs=(In("model_high", MODEL_TYPES, "The high-noise expert (runs the first steps)."),
            In("model_low", MODEL_TYPES, "The low-noise expert (runs the steps below the boundary)."),
            In("noise_seed", "INT", TOOLTIPS["noise_seed"], default=0, min=0, max=MAX_SEED,
               control_after_generate=True),
            _common_inputs()[0], _cfg_input("cfg_high", "high"), _cfg_input("cfg_low", "low"),
            *_common_inputs()[2:],
            In("boundary", "FLOAT", "Switch when the noise level falls below this: 0.875 for Wan 2.2 text-to-video, "
                                    "0.9 for image-to-video (the level is sigma for flow models, whatever their "
                                    "shift; timestep/1000 for SD-style models).",
               default=WAN22_BOUNDARY["t2v"], min=0.0, max=1.0, step=0.001),
            In("switch_by", "COMBO", "'sigma': switch at the boundary; 'step': switch at switch_at_step.",
               choices=list(SWITCH_MODES)),
            In("switch_at_step", "INT", "The first step of the low-noise expert when switch_by is 'step'.",
               default=10, min=0, max=MAX_STEPS),
            In("positive_low", "CONDITIONING", "Positive conditioning of the low-noise expert (default: positive).",
               optional=True),
            In("negative_low", "CONDITIONING", "Negative conditioning of the low-noise expert (default: negative).",
               optional=True),
            In("sampler_options", SAMPLER_OPTIONS_TYPE, TOOLTIPS["sampler_options"], optional=True)),
    outputs=(LATENT_OUT, Out("INT", "The step at which the low-noise expert took over.", name="switch_step"))))
class KSamplerTwoModels:
    """Two experts in one sampler (Wan 2.2): a high-noise model until the boundary, then a low-noise model."""

    def sample(self, model_high, model_low, noise_seed, steps, cfg_high, cfg_low, sampler_name, scheduler, positive,
               negative, latent_image, boundary, switch_by, switch_at_step, positive_low=None, negative_low=None,
               sampler_options=None):
        from . import twomodel
        from .validation import check_float
        twomodel.check_switch(switch_by, switch_at_step)
        check_sampler_args(seed=noise_seed, steps=steps, sampler_name=sampler_name, scheduler=scheduler)
        check_float("cfg_high", cfg_high, 0.0, 100.0)
        check_float("cfg_low", cfg_low, 0.0, 100.0)
        check_float("boundary", boundary, 0.0, 1.0)   # the input's declared range (ComfyUI refuses values outside)
        if sampler_options is not None and not isinstance(sampler_options, dict):
            raise KSamplerInputError(f"sampler_options: expected the output of a Sampler Options+ node, got "
                                     f"{type(sampler_options).__name__}")
        switch = self._switch_step(model_high, model_low, steps, sampler_name, scheduler, boundary, switch_by,
                                   switch_at_step)
        if switch < steps:
            _check_low_conditioning(model_low, positive, negative, positive_low, negative_low, cfg_low)
        kw = {"sampler_options": dict(sampler_options) if sampler_options else None}
        latent = latent_image
        if switch > 0:
            latent = _run(model_high, noise_seed, steps, cfg_high, sampler_name, scheduler, positive, negative,
                          latent, 1.0, add_noise=True, start_step=0, last_step=switch,
                          force_full_denoise=switch >= steps, **kw)
        if switch < steps:
            latent = _run(model_low, noise_seed, steps, cfg_low, sampler_name, scheduler,
                          positive if positive_low is None else positive_low,
                          negative if negative_low is None else negative_low, latent, 1.0, add_noise=switch == 0,
                          start_step=switch, last_step=10000, force_full_denoise=True, **kw)
        return (latent, switch)

    @staticmethod
    def _switch_step(model_high, model_low, steps, sampler_name, scheduler, boundary, switch_by,
                     switch_at_step) -> int:
        from . import twomodel
        from .samplers import sampler_traits
        from .schedulers import ksampler_sigmas
        if is_comfy_model(model_high) != is_comfy_model(model_low):
            raise KSamplerInputError("model_low: one model is a ComfyUI model and the other this pack's bundled "
                                     "model; use two models of the same kind")
        ms_high, ms_low = _model_sampling(model_high), _model_sampling(model_low)
        twomodel.check_same_sampling(ms_high, ms_low)
        if switch_by != "sigma":
            return min(int(switch_at_step), steps)
        raw = model_high.get_model_object("model_sampling") if is_comfy_model(model_high) \
            else model_high.model_sampling
        sigmas = ksampler_sigmas(raw, scheduler, steps, 1.0, sampler_traits(sampler_name).discard_penultimate_sigma)
        return twomodel.switch_step(ms_high, sigmas, boundary)


def _check_low_conditioning(model_low, positive, negative, positive_low, negative_low, cfg_low: float) -> None:
    """The low-noise expert's conditioning, checked under the names of the inputs it comes from.

    The sampler checks the pair it is given as 'positive' and 'negative'; with positive_low or negative_low
    connected, a mismatch must name that input instead.
    """
    if positive_low is None and negative_low is None:
        return
    from .graph_checks import check_conditioning_fits, headless_spec
    if is_comfy_model(model_low):
        from .comfy_checks import host_spec
        spec = host_spec(model_low)
    else:
        spec = headless_spec(model_low)
    pair = []
    for name, given, default in (("positive_low", positive_low, positive), ("negative_low", negative_low, negative)):
        if given is not None:
            # an empty negative_low only at cfg_low 1, where it is never evaluated (else the low stage would fail
            # after the high one has run)
            entries = check_conditioning_fits(spec, given, name,
                                              allow_empty=name == "negative_low" and math.isclose(cfg_low, 1.0))
            pair.append((name, entries))
        elif isinstance(default, (list, tuple)) and default:
            # the high-noise stage (or the sampler) reports a malformed default under its own name
            try:
                pair.append((name.replace("_low", ""), check_conditioning_fits(spec, default, "default")))
            except KSamplerInputError:
                return
    if len(pair) < 2 or not pair[0][1] or not pair[1][1]:
        return
    (pos_name, pos), (neg_name, neg) = pair
    pos_width, neg_width = pos[0][0].shape[-1], neg[0][0].shape[-1]
    if pos_width == neg_width:
        return
    if neg_name == "negative_low":
        raise KSamplerInputError(f"negative_low: context width {neg_width} differs from {pos_name}'s {pos_width}; "
                                 f"the low-noise expert takes {pos_name} and negative_low together: encode both "
                                 "with the same text encoder")
    raise KSamplerInputError(f"positive_low: context width {pos_width} differs from negative's {neg_width} (the "
                             "low-noise expert takes negative while negative_low is not connected): encode both "
                             "with the same text encoder, or connect a negative_low of positive_low's encoder")


def _model_sampling(model):
    """Our model-sampling view of a model (ComfyUI's via the adapter)."""
    if is_comfy_model(model):
        from .comfy_adapter import host_model_sampling
        return host_model_sampling(model.get_model_object("model_sampling"))
    from .validation import check_model
    check_model(model)
    return model.model_sampling


# The one table of node ids and display names: id -> (module, class, display name).  Ids are public API
# (saved workflows store them) and never change.  The interop nodes exist only inside ComfyUI.
NODE_TABLE = {
    "ksampler_KSampler": ("nodes", "KSampler", "KSampler+"),
    "ksampler_KSamplerAdvanced": ("nodes", "KSamplerAdvanced", "KSampler+ (Advanced)"),
    "ksampler_KSamplerTwoModels": ("nodes", "KSamplerTwoModels", "KSampler+ (Two Models)"),
    "ksampler_SamplerOptions": ("nodes", "SamplerOptions", "Sampler Options+"),
    "ksampler_CheckpointLoader": ("bundled.nodes", "CheckpointLoader", "Load Bundled Model"),
    "ksampler_TextEncode": ("bundled.nodes", "TextEncode", "Bundled Text Encode"),
    "ksampler_EmptyLatentImage": ("bundled.nodes", "EmptyLatentImage", "Bundled Empty Latent"),
    "ksampler_LoadImage": ("bundled.nodes", "LoadImage", "Bundled Load Image"),
    "ksampler_VAEEncode": ("bundled.nodes", "VAEEncode", "Bundled VAE Encode"),
    "ksampler_VAEDecode": ("bundled.nodes", "VAEDecode", "Bundled VAE Decode"),
    "ksampler_SaveImage": ("bundled.nodes", "SaveImage", "Bundled Save Image"),
    "ksampler_CalibratedScheduler": ("calibration_nodes", "CalibratedScheduler", "Calibrated Scheduler+"),
    "ksampler_SamplerSelect": ("interop_nodes", "SamplerSelect", "KSamplerSelect+"),
    "ksampler_Scheduler": ("interop_nodes", "Scheduler", "Scheduler+"),
}


def _node_class(module: str, name: str):
    if module == "nodes":
        return globals()[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


# id -> (class, display name) for the nodes available here
NODES = {node_id: (_node_class(module, cls), display) for node_id, (module, cls, display) in NODE_TABLE.items()
         if module != "interop_nodes" or "comfy.samplers" in sys.modules}

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}


def v3_nodes(io) -> list:
    """The same nodes as V3 ``io.ComfyNode`` classes (same ids, inputs, order and defaults), for hosts with V3."""
    return [v3_node(io, node_id, name, cls) for node_id, (cls, name) in NODES.items()]
