"""ksampler: a KSampler node pack with explicit sampler and scheduler registries.

Inside ComfyUI this folder is a custom node pack (``NODE_CLASS_MAPPINGS``);
installed with pip it is the importable package ``ksampler``.  The pure-torch
core (``samplers``, ``schedulers``, ``conditioning``, ``models``, ``pipeline``)
never imports ``comfy``; the ComfyUI glue lives in ``comfy_adapter`` alone.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .pipeline import NoiseOptions, ksample, sample
from .calibration import Calibration, calibrate

__version__ = "0.1.0"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "NoiseOptions", "sample", "ksample", "calibrate",
           "Calibration", "__version__"]
