"""Guidance: ComfyUI-format conditioning and classifier-free guidance."""
from .cfg import Guidance, GuidedDenoiser, PreparedCond
from .validate import KSamplerInputError, check_conditioning

__all__ = ["Guidance", "GuidedDenoiser", "PreparedCond", "KSamplerInputError", "check_conditioning"]
