"""Model sampling (per prediction type), latent formats and model adapters."""
from .base import DiffusionModel, LatentFormat
from .sampling import EDM, EPS, VE, X0, Flow, FluxFlow, ModelSampling, V, flux_shift_from_resolution, get_model_sampling

__all__ = ["ModelSampling", "EPS", "V", "X0", "EDM", "VE", "Flow", "FluxFlow", "flux_shift_from_resolution",
           "get_model_sampling", "DiffusionModel", "LatentFormat"]
