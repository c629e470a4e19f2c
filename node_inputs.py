"""What the node modules share about their inputs: the tooltips, the sampler and scheduler choices (ours, and inside
ComfyUI the host's own names after them), the optional noise inputs, and how a ComfyUI MODEL is told apart.  It
sits below ``nodes``, ``interop_nodes`` and ``calibration_nodes``: ``nodes`` loads the other two through
``NODE_TABLE``, so they take what they share with it from here, not from ``nodes``."""
from __future__ import annotations

import sys

from .node_schema import In
from .samplers import COMFY_SAMPLER_NAMES, SAMPLERS
from .samplers.reference import FLOW_GEOMETRY_CHOICES
from .schedulers import COMFY_SCHEDULER_NAMES, SCHEDULERS


def _extras_note(names, comfy_names, what: str) -> str:
    extra = [n for n in names if n not in comfy_names]
    return f" Besides ComfyUI's {what}, this pack offers: {', '.join(extra)}." if extra else ""


SAMPLER_NAME_TOOLTIP = ("The algorithm used when sampling, this can affect the quality, speed, and style of the "
                        "generated output." + _extras_note(SAMPLERS, COMFY_SAMPLER_NAMES, "samplers"))
SCHEDULER_TOOLTIP = ("The scheduler controls how noise is gradually removed to form the image."
                     + _extras_note(SCHEDULERS, COMFY_SCHEDULER_NAMES, "schedulers"))

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
    "variation_seed": "A second seed whose noise is mixed into the seed's (A1111-style variations of one image).",
    "variation_strength": "How much of the variation seed's noise to mix in, variance-preserving: 0 is the "
                          "seed's image, 1 the variation seed's; 0.05-0.3 gives small variations.",
    "cfg_sigma_min": "Guidance interval: CFG applies only while sigma >= this (cfg 1 below it, which skips the "
                     "negative pass and saves time). 0 = no lower bound.",
    "cfg_sigma_max": "Guidance interval: CFG applies only while sigma <= this (cfg 1 above it). Kynkaanniemi et al. "
                     "2024 limit guidance to the middle noise levels. 10000 = no upper bound.",
    "cfg_ramp": "'linear' ramps cfg from the cfg input at the first step to cfg_ramp_end at the last.",
    "cfg_ramp_end": "The cfg at the last step when cfg_ramp is 'linear'.",
    "cfg_stop_at": "Fraction of the steps after which cfg drops to 1 (the negative pass is skipped). 1 = never.",
    "sampler_options": "Options of the chosen sampler (eta, s_noise, s_churn, ...), from a Sampler Options+ node.",
    "preview": "What the progress preview shows: 'default' (the sampler's report, the host's behaviour), "
               "'denoised' (the latest denoised estimate of the model) or 'noisy' (the current noisy latent).",
}


# the optional noise inputs of the Advanced node and the Sampler node, in this order
NOISE_OPTION_INPUTS = (
    In("batch_invariant_noise", "BOOLEAN", TOOLTIPS["batch_invariant_noise"], default=False, optional=True),
    In("cpu_noise", "BOOLEAN", TOOLTIPS["cpu_noise"], default=False, optional=True),
    In("brownian_noise", "COMBO", TOOLTIPS["brownian_noise"], choices=["tree", "fast"], optional=True),
    In("flow_geometry", "COMBO", TOOLTIPS["flow_geometry"], choices=list(FLOW_GEOMETRY_CHOICES),
       optional=True),
)


def host_only_names() -> tuple[list[str], list[str]]:
    """Inside ComfyUI: the (sampler, scheduler) names the host has and our registries lack."""
    if "comfy.samplers" not in sys.modules:
        return [], []
    from .comfy_adapter import host_only_samplers, host_only_schedulers
    return host_only_samplers(), host_only_schedulers()


def sampler_choices() -> list[str]:
    return list(SAMPLERS) + host_only_names()[0]


def scheduler_choices() -> list[str]:
    return list(SCHEDULERS) + host_only_names()[1]


def _combo_tooltip(text: str, host_names: list[str]) -> str:
    if not host_names:
        return text
    from .comfy_adapter import host_names_tooltip
    return host_names_tooltip(text, host_names)


def sampler_name_tooltip() -> str:
    """The sampler_name tooltip: our extra entries, and inside ComfyUI the entries run by the host's own code."""
    return _combo_tooltip(SAMPLER_NAME_TOOLTIP, host_only_names()[0])


def scheduler_tooltip() -> str:
    return _combo_tooltip(SCHEDULER_TOOLTIP, host_only_names()[1])


def is_comfy_model(model) -> bool:
    """True for a ComfyUI ModelPatcher (duck-typed: the core never imports comfy)."""
    return "comfy.samplers" in sys.modules and hasattr(model, "get_model_object") and hasattr(model, "model_options")
