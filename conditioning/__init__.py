"""Guidance: ComfyUI-format conditioning and classifier-free guidance."""
from .cfg import Guidance, GuidedDenoiser, PreparedCond
from .schedule import GuidanceSchedule
from .validate import KSamplerInputError, check_conditioning

__all__ = ["Guidance", "GuidedDenoiser", "PreparedCond", "GuidanceSchedule", "KSamplerInputError", "check_conditioning"]
