"""ComfyUI node classes: thin shells that validate inputs, call the core and shape outputs.

``NODE_TABLE`` is the one source of truth for node ids and display names (ours,
the bundled model's and the ComfyUI interop nodes'); ids are namespaced
(``ksampler_...``) so they never collide with ComfyUI built-ins.
Input order is public API: saved workflows store widget values by position,
so new inputs only ever go at the end, as optional inputs.
"""
from __future__ import annotations

import importlib
import sys

from .samplers import SAMPLERS
from .samplers.reference import default_reference_mode, reference_mode_from_input
from .schedulers import SCHEDULERS
from .validation import MAX_SEED, MAX_STEPS, KSamplerInputError, check_sampler_args

__all__ = ["KSampler", "KSamplerAdvanced", "NODES", "NODE_TABLE", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS",
           "is_comfy_model"]

CATEGORY = "sampling"

TOOLTIPS = {
    "model": "The model used for denoising the input latent.",
    "seed": "The random seed used for creating the noise.",
    "steps": "The number of steps used in the denoising process.",
    "cfg": "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher values "
           "result in images more closely matching the prompt however too high values will negatively impact "
           "quality.",
    "sampler_name": "The algorithm used when sampling, this can affect the quality, speed, and style of the "
                    "generated output.",
    "scheduler": "The scheduler controls how noise is gradually removed to form the image.",
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
    "karras_rho": "The rho of the karras scheduler (Karras et al. 2022): higher spends more steps at low noise. "
                  "7 is the paper's and ComfyUI's value; other schedulers ignore it.",
    "flow_geometry": "For flow models (SD3, Flux): 'exact' gives ddpm, res_multistep_ancestral and the cfg_pp "
                     "samplers the flow noise geometry; 'comfyui' reproduces ComfyUI, which runs them with VE "
                     "geometry (and also uses ComfyUI's lms weights and dpmpp_2s_ancestral_cfg_pp re-noising on "
                     "any model); 'default' follows KSAMPLER_FLOW_GEOMETRY (exact unless set).",
}


def _host_only_names() -> tuple[list[str], list[str]]:
    """Inside ComfyUI: the (sampler, scheduler) names the host has and our registries lack."""
    if "comfy.samplers" not in sys.modules:
        return [], []
    from .comfy_adapter import host_only_samplers, host_only_schedulers
    return host_only_samplers(), host_only_schedulers()


def _sampler_names() -> list[str]:
    return list(SAMPLERS) + _host_only_names()[0]


def _scheduler_names() -> list[str]:
    return list(SCHEDULERS) + _host_only_names()[1]


def _combo_tooltip(key: str, host_names: list[str]) -> str:
    if not host_names:
        return TOOLTIPS[key]
    from .comfy_adapter import host_names_tooltip
    return host_names_tooltip(TOOLTIPS[key], host_names)


def is_comfy_model(model) -> bool:
    """True for a ComfyUI ModelPatcher (duck-typed: the core never imports comfy)."""
    return "comfy.samplers" in sys.modules and hasattr(model, "get_model_object") and hasattr(model, "model_options")


def _common_inputs():
    return {
        "steps": ("INT", {"default": 20, "min": 1, "max": MAX_STEPS, "tooltip": TOOLTIPS["steps"]}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": TOOLTIPS["cfg"]}),
        "sampler_name": (_sampler_names(), {"tooltip": _combo_tooltip("sampler_name", _host_only_names()[0])}),
        "scheduler": (_scheduler_names(), {"tooltip": _combo_tooltip("scheduler", _host_only_names()[1])}),
        "positive": ("CONDITIONING", {"tooltip": TOOLTIPS["positive"]}),
        "negative": ("CONDITIONING", {"tooltip": TOOLTIPS["negative"]}),
        "latent_image": ("LATENT", {"tooltip": TOOLTIPS["latent_image"]}),
    }


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


class KSampler:
    """ComfyUI's KSampler surface, sampled by our registries."""

    @classmethod
    def INPUT_TYPES(cls):
        common = _common_inputs()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": TOOLTIPS["model"]}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": TOOLTIPS["seed"]}),
                "steps": common["steps"],
                "cfg": common["cfg"],
                "sampler_name": common["sampler_name"],
                "scheduler": common["scheduler"],
                "positive": common["positive"],
                "negative": common["negative"],
                "latent_image": common["latent_image"],
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": TOOLTIPS["denoise"]}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Uses the provided model, positive and negative conditioning to denoise the latent image, with "
                   "the ksampler pack's sampler and scheduler registries.")

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0):
        return (_run(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise),)


class KSamplerAdvanced:
    """ComfyUI's KSamplerAdvanced surface, plus the noise options no peer has together (optional, at the end)."""

    @classmethod
    def INPUT_TYPES(cls):
        common = _common_inputs()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": TOOLTIPS["model"]}),
                "add_noise": (["enable", "disable"], {"tooltip": TOOLTIPS["add_noise"]}),
                "noise_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                       "tooltip": TOOLTIPS["noise_seed"]}),
                "steps": common["steps"],
                "cfg": common["cfg"],
                "sampler_name": common["sampler_name"],
                "scheduler": common["scheduler"],
                "positive": common["positive"],
                "negative": common["negative"],
                "latent_image": common["latent_image"],
                "start_at_step": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS,
                                          "tooltip": TOOLTIPS["start_at_step"]}),
                "end_at_step": ("INT", {"default": 10000, "min": 0, "max": MAX_STEPS,
                                        "tooltip": TOOLTIPS["end_at_step"]}),
                "return_with_leftover_noise": (["disable", "enable"],
                                               {"tooltip": TOOLTIPS["return_with_leftover_noise"]}),
            },
            "optional": {
                "batch_invariant_noise": ("BOOLEAN", {"default": False,
                                                      "tooltip": TOOLTIPS["batch_invariant_noise"]}),
                "cpu_noise": ("BOOLEAN", {"default": False, "tooltip": TOOLTIPS["cpu_noise"]}),
                "brownian_noise": (["tree", "fast"], {"tooltip": TOOLTIPS["brownian_noise"]}),
                "flow_geometry": (["default", "exact", "comfyui"], {"tooltip": TOOLTIPS["flow_geometry"]}),
                "karras_rho": ("FLOAT", {"default": 7.0, "min": 0.5, "max": 30.0, "step": 0.1,
                                         "tooltip": TOOLTIPS["karras_rho"]}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "KSampler with start/end steps for base-refiner chains, and noise options."

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, start_at_step, end_at_step, return_with_leftover_noise, batch_invariant_noise=False,
               cpu_noise=False, brownian_noise="tree", flow_geometry="default", karras_rho=7.0):
        from .pipeline import NoiseOptions
        for name, value, choices in (("add_noise", add_noise, ("enable", "disable")),
                                     ("return_with_leftover_noise", return_with_leftover_noise, ("enable", "disable")),
                                     ("brownian_noise", brownian_noise, ("tree", "fast")),
                                     ("flow_geometry", flow_geometry, ("default", "exact", "comfyui"))):
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
    "ksampler_KSampler": ("nodes", "KSampler", "KSampler (ksampler)"),
    "ksampler_KSamplerAdvanced": ("nodes", "KSamplerAdvanced", "KSampler Advanced (ksampler)"),
    "ksampler_CheckpointLoader": ("bundled.nodes", "CheckpointLoader", "Load Bundled Checkpoint (ksampler)"),
    "ksampler_TextEncode": ("bundled.nodes", "TextEncode", "Text Encode (ksampler)"),
    "ksampler_EmptyLatentImage": ("bundled.nodes", "EmptyLatentImage", "Empty Latent Image (ksampler)"),
    "ksampler_LoadImage": ("bundled.nodes", "LoadImage", "Load Image (ksampler)"),
    "ksampler_VAEEncode": ("bundled.nodes", "VAEEncode", "VAE Encode (ksampler)"),
    "ksampler_VAEDecode": ("bundled.nodes", "VAEDecode", "VAE Decode (ksampler)"),
    "ksampler_SaveImage": ("bundled.nodes", "SaveImage", "Save Image (ksampler)"),
    "ksampler_SamplerSelect": ("comfy_adapter", "SamplerSelect", "Sampler (ksampler)"),
    "ksampler_Scheduler": ("comfy_adapter", "Scheduler", "Scheduler (ksampler)"),
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
