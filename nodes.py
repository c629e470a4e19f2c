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
import sys

from .node_schema import In, NodeSpec, Out, v1_node, v3_node
from .graph_checks import BUNDLED_MODEL_TYPE
from .samplers import COMFY_SAMPLER_NAMES, SAMPLERS
from .samplers.reference import default_reference_mode, reference_mode_from_input
from .schedulers import COMFY_SCHEDULER_NAMES, SCHEDULERS
from .validation import MAX_SEED, MAX_STEPS, KSamplerInputError, check_sampler_args

__all__ = ["KSampler", "KSamplerAdvanced", "NODES", "NODE_TABLE", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS",
           "is_comfy_model", "v3_nodes"]

CATEGORY = "sampling"
# ComfyUI's MODEL or the bundled one (a comma-separated list: the editor and the server accept either)
MODEL_TYPES = f"MODEL,{BUNDLED_MODEL_TYPE}"


def _extras_note(names, comfy_names, what: str) -> str:
    extra = [n for n in names if n not in comfy_names]
    return f" Besides ComfyUI's {what}, this pack offers: {', '.join(extra)}." if extra else ""


SAMPLER_NAME_TOOLTIP = ("The algorithm used when sampling, this can affect the quality, speed, and style of the "
                        "generated output." + _extras_note(SAMPLERS, COMFY_SAMPLER_NAMES, "samplers"))
SCHEDULER_TOOLTIP = ("The scheduler controls how noise is gradually removed to form the image."
                     + _extras_note(SCHEDULERS, COMFY_SCHEDULER_NAMES, "schedulers"))
FLOW_GEOMETRY_CHOICES = ["default", "exact", "comfyui"]

TOOLTIPS = {
    "model": "The model used for denoising the input latent.",
    "seed": "The random seed used for creating the noise.",
    "steps": "The number of steps used in the denoising process.",
    "cfg": "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher values "
           "result in images more closely matching the prompt however too high values will negatively impact "
           "quality.",
    "sampler_name": SAMPLER_NAME_TOOLTIP,
    "scheduler": SCHEDULER_TOOLTIP,
    "positive": "The conditioning describing the attributes you want to include in the image.",
    "negative": "The conditioning describing the attributes you want to exclude from the image.",
    "latent_image": "The latent image to denoise.",
    "denoise": "The amount of denoising applied, lower values will maintain the structure of the initial image "
               "allowing for image to image sampling.",
    "add_noise": "Add the seeded noise before sampling (disable to continue from a latent that still holds noise).",
    "noise_seed": "The random seed used for creating the noise.",
    "start_at_step": "The step of the schedule to start at.",
    "end_at_step": "The step of the schedule to stop at.",
    "return_with_leftover_noise": "Return the latent at the stop step with its remaining noise (for a refiner).",
    "batch_invariant_noise": "Each image's noise depends only on the seed and its index, never on the batch size.",
    "cpu_noise": "Draw all extra (ancestral/SDE) noise on the CPU, so CPU and GPU give the same image.",
    "brownian_noise": "SDE samplers' Brownian noise: 'tree' matches ComfyUI; 'fast' has the same statistics at a "
                      "fraction of the cost.",
    "calibration": "A calibration from 'Calibrated Scheduler+': its fitted sigmas and sampler replace "
                   "sampler_name and scheduler (steps and cfg must be those it was fitted for).",
    "karras_rho": "The rho of the karras scheduler (Karras et al. 2022): higher spends more steps at low noise. "
                  "7 is the paper's and ComfyUI's value; other schedulers ignore it.",
    "flow_geometry": "For flow models (SD3, Flux): 'exact' gives ddpm, res_multistep_ancestral and the cfg_pp "
                     "samplers the flow noise geometry; 'comfyui' reproduces ComfyUI, which runs them with VE "
                     "geometry (and also uses ComfyUI's lms weights and dpmpp_2s_ancestral_cfg_pp re-noising on "
                     "any model); 'default' follows KSAMPLER_FLOW_GEOMETRY (exact unless set).",
}


# the optional noise inputs of the Advanced node and the Sampler node, in this order
NOISE_OPTION_INPUTS = (
    In("batch_invariant_noise", "BOOLEAN", TOOLTIPS["batch_invariant_noise"], default=False, optional=True),
    In("cpu_noise", "BOOLEAN", TOOLTIPS["cpu_noise"], default=False, optional=True),
    In("brownian_noise", "COMBO", TOOLTIPS["brownian_noise"], choices=["tree", "fast"], optional=True),
    In("flow_geometry", "COMBO", TOOLTIPS["flow_geometry"], choices=FLOW_GEOMETRY_CHOICES, optional=True),
)


def _host_only_names() -> tuple[list[str], list[str]]:
    """Inside ComfyUI: the (sampler, scheduler) names the host has and our registries lack."""
    if "comfy.samplers" not in sys.modules:
        return [], []
    from .comfy_adapter import host_only_samplers, host_only_schedulers
    return host_only_samplers(), host_only_schedulers()


def sampler_choices() -> list[str]:
    return list(SAMPLERS) + _host_only_names()[0]


def scheduler_choices() -> list[str]:
    return list(SCHEDULERS) + _host_only_names()[1]


def _combo_tooltip(text: str, host_names: list[str]) -> str:
    if not host_names:
        return text
    from .comfy_adapter import host_names_tooltip
    return host_names_tooltip(text, host_names)


def sampler_name_tooltip() -> str:
    """The sampler_name tooltip: our extra entries, and inside ComfyUI the entries run by the host's own code."""
    return _combo_tooltip(SAMPLER_NAME_TOOLTIP, _host_only_names()[0])


def scheduler_tooltip() -> str:
    return _combo_tooltip(SCHEDULER_TOOLTIP, _host_only_names()[1])


def is_comfy_model(model) -> bool:
    """True for a ComfyUI ModelPatcher (duck-typed: the core never imports comfy)."""
    return "comfy.samplers" in sys.modules and hasattr(model, "get_model_object") and hasattr(model, "model_options")


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
    host_samplers, host_schedulers = _host_only_names()
    names = {}
    for key, name, host in (("sampler_name", sampler_name, host_samplers), ("scheduler", scheduler, host_schedulers)):
        if isinstance(name, str) and name in host:
            if not is_comfy_model(model):
                raise KSamplerInputError(f"{key}: {name!r} is ComfyUI's own, which runs only with a ComfyUI MODEL "
                                         "(from a checkpoint loader); pick one of ksampler's names for this model")
        else:
            names[key] = name  # the host runs its own names; ours are checked here
    check_sampler_args(seed=seed, steps=steps, cfg=cfg, denoise=denoise, **names)
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
    description="KSampler with start/end steps for base-refiner chains, and noise options (batch-invariant, "
                "CPU, fast Brownian noise, flow geometry, karras rho).",
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
               optional=True)),
    outputs=(LATENT_OUT,)))
class KSamplerAdvanced:
    """ComfyUI's KSamplerAdvanced surface, plus the noise options no peer has together (optional, at the end)."""

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, start_at_step, end_at_step, return_with_leftover_noise, batch_invariant_noise=False,
               cpu_noise=False, brownian_noise="tree", flow_geometry="default", karras_rho=7.0):
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
                   scheduler_options=scheduler_options)
        return (out,)


# The one table of node ids and display names: id -> (module, class, display name).  Ids are public API
# (saved workflows store them) and never change.  The interop nodes exist only inside ComfyUI.
NODE_TABLE = {
    "ksampler_KSampler": ("nodes", "KSampler", "KSampler+"),
    "ksampler_KSamplerAdvanced": ("nodes", "KSamplerAdvanced", "KSampler+ (Advanced)"),
    "ksampler_CheckpointLoader": ("bundled.nodes", "CheckpointLoader", "Load Bundled Model"),
    "ksampler_TextEncode": ("bundled.nodes", "TextEncode", "Bundled Text Encode"),
    "ksampler_EmptyLatentImage": ("bundled.nodes", "EmptyLatentImage", "Bundled Empty Latent"),
    "ksampler_LoadImage": ("bundled.nodes", "LoadImage", "Bundled Load Image"),
    "ksampler_VAEEncode": ("bundled.nodes", "VAEEncode", "Bundled VAE Encode"),
    "ksampler_VAEDecode": ("bundled.nodes", "VAEDecode", "Bundled VAE Decode"),
    "ksampler_SaveImage": ("bundled.nodes", "SaveImage", "Bundled Save Image"),
    "ksampler_CalibratedScheduler": ("calibration_nodes", "CalibratedScheduler", "Calibrated Scheduler+"),
    "ksampler_SamplerSelect": ("comfy_adapter", "SamplerSelect", "KSamplerSelect+"),
    "ksampler_Scheduler": ("comfy_adapter", "Scheduler", "Scheduler+"),
}


def _node_class(module: str, name: str):
    if module == "nodes":
        return globals()[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


# id -> (class, display name) for the nodes available here
NODES = {node_id: (_node_class(module, cls), display) for node_id, (module, cls, display) in NODE_TABLE.items()
         if module != "comfy_adapter" or "comfy.samplers" in sys.modules}

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}


def v3_nodes(io) -> list:
    """The same nodes as V3 ``io.ComfyNode`` classes (same ids, inputs, order and defaults), for hosts with V3."""
    return [v3_node(io, node_id, name, cls) for node_id, (cls, name) in NODES.items()]
