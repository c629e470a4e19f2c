"""The interop nodes: our registries as ComfyUI SAMPLER and SIGMAS, for SamplerCustom and SamplerCustomAdvanced.

They exist only inside ComfyUI (``nodes.NODE_TABLE`` lists them, with their ids and names); their work is the
adapter's (``comfy_adapter.registry_sampler`` and ``registry_sigmas``).
"""
from __future__ import annotations

from .node_inputs import (NOISE_OPTION_INPUTS, sampler_choices, sampler_name_tooltip, scheduler_choices,
                          scheduler_tooltip)
from .node_schema import In, NodeSpec, Out, v1_node
from .sampling_pass import NoiseOptions, check_sampler_args
from .validation import MAX_STEPS

__all__ = ["SamplerSelect", "Scheduler"]


@v1_node(NodeSpec(
    function="get_sampler", category="sampling/custom_sampling/samplers",
    search_aliases=("sampler", "sampler select", "custom sampler", "ksampler"),
    description="A sampler from the ksampler registry, for SamplerCustom and SamplerCustomAdvanced.",
    inputs=(In("sampler_name", "COMBO", sampler_name_tooltip, choices=sampler_choices),
            *NOISE_OPTION_INPUTS),
    outputs=(Out("SAMPLER", "The sampler, for the sampler input of SamplerCustom or SamplerCustomAdvanced."),)))
class SamplerSelect:
    """A ComfyUI SAMPLER from any entry of our sampler registry (for SamplerCustom / SamplerCustomAdvanced)."""

    def get_sampler(self, sampler_name, batch_invariant_noise=False, cpu_noise=False, brownian_noise="tree",
                    flow_geometry="default"):
        from . import comfy_adapter
        options = NoiseOptions(bool(batch_invariant_noise), bool(cpu_noise), brownian_noise)
        return (comfy_adapter.registry_sampler(sampler_name, options, flow_geometry),)


@v1_node(NodeSpec(
    function="get_sigmas", category="sampling/custom_sampling/schedulers",
    search_aliases=("scheduler", "sigmas", "noise schedule", "custom sampler", "ksampler"),
    description="Sigmas from the ksampler scheduler registry, over the model's own noise schedule.",
    inputs=(In("model", "MODEL", "The model whose noise schedule the sigmas follow."),
            In("scheduler", "COMBO", scheduler_tooltip, choices=scheduler_choices),
            In("steps", "INT", "Number of steps.", default=20, min=1, max=MAX_STEPS),
            In("denoise", "FLOAT", "Fraction of the schedule to run (img2img below 1).", default=1.0, min=0.0,
               max=1.0, step=0.01),
            In("karras_rho", "FLOAT", "rho of the karras scheduler; other schedulers ignore it.", default=7.0,
               min=0.5, max=30.0, step=0.1, optional=True)),
    outputs=(Out("SIGMAS", "The noise levels of the schedule, descending and ending in 0, for the sigmas input of "
                           "SamplerCustom or SamplerCustomAdvanced."),)))
class Scheduler:
    """ComfyUI SIGMAS from any entry of our scheduler registry, over the model's own model sampling."""

    def get_sigmas(self, model, scheduler, steps, denoise, karras_rho=7.0):
        from . import comfy_adapter
        check_sampler_args(steps=steps, denoise=denoise)
        return (comfy_adapter.registry_sigmas(model, scheduler, steps, denoise, karras_rho),)
