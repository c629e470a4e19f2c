"""ksampler: a KSampler node pack with explicit sampler and scheduler registries.

Inside ComfyUI this folder is a custom node pack: V3 nodes (``comfy_entrypoint``)
on hosts with ``comfy_api``'s V3 schema, else classic ``NODE_CLASS_MAPPINGS``;
installed with pip it is the importable package ``ksampler``.  The pure-torch
core (``samplers``, ``schedulers``, ``conditioning``, ``models``, ``pipeline``)
never imports ``comfy``; the ComfyUI glue lives in ``comfy_adapter`` alone.
"""
from .node_schema import host_io
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .pipeline import NoiseOptions, ksample, sample
from .calibration import Calibration, calibrate

__version__ = "0.1.0"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "NoiseOptions", "sample", "ksample", "calibrate",
           "Calibration", "__version__"]

_io = host_io()
if _io is not None:
    # A host with the V3 schema loads ``comfy_entrypoint`` only when the V1 mappings are absent; the V1
    # classes stay importable from ``ksampler.nodes`` (the headless executor uses them).
    from comfy_api.latest import ComfyExtension

    from .nodes import v3_nodes

    NODE_CLASS_MAPPINGS = NODE_DISPLAY_NAME_MAPPINGS = None

    class KSamplerExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return v3_nodes(_io)

    async def comfy_entrypoint() -> KSamplerExtension:
        return KSamplerExtension()

    __all__ += ["comfy_entrypoint"]
