"""The model objects our KSampler samples with (outside ComfyUI): a latent format and a diffusion model."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .sampling import ModelSampling

__all__ = ["LatentFormat", "DiffusionModel"]


class LatentFormat:
    """How a model's latents relate to the stored ones: channels, downscale factor, scale and shift.

    ``process_in`` maps a stored latent into the space the model samples in,
    ``process_out`` maps back (ComfyUI's convention: (latent - shift) * scale).
    """

    def __init__(self, channels: int, downscale: int = 8, scale_factor: float = 1.0, shift_factor: float = 0.0,
                 rgb_factors: Optional[Sequence[Sequence[float]]] = None):
        self.latent_channels = int(channels)
        self.downscale = int(downscale)
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)
        self.latent_rgb_factors = rgb_factors
        self.latent_dimensions = 2

    def process_in(self, latent: Tensor) -> Tensor:
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent: Tensor) -> Tensor:
        return latent / self.scale_factor + self.shift_factor

    def __repr__(self) -> str:
        return f"LatentFormat(channels={self.latent_channels}, downscale={self.downscale})"


class DiffusionModel(nn.Module):
    """A denoising network behind its model sampling: ``apply_model(x, sigma, context)`` returns D(x, sigma).

    ``network(x_in, timestep, context, pooled)`` gets the scaled input and the
    model timestep and returns its raw prediction (eps, v, x0 or velocity, as
    ``model_sampling`` says).
    """

    def __init__(self, network: nn.Module, model_sampling: ModelSampling, latent_format: LatentFormat,
                 name: str = "model"):
        super().__init__()
        self.network = network
        self.model_sampling = model_sampling
        self.latent_format = latent_format
        self.name = name

    @property
    def device(self) -> torch.device:
        p = next(self.network.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.network.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def apply_model(self, x: Tensor, sigma: Tensor, context: Optional[Tensor] = None,
                    pooled: Optional[Tensor] = None) -> Tensor:
        ms = self.model_sampling
        sigma = sigma.to(x.device)
        x_in = ms.calculate_input(sigma, x).to(self.dtype)
        timestep = ms.timestep(sigma).float()
        raw = self.network(x_in, timestep, context.to(x_in.dtype) if context is not None else None, pooled)
        return ms.calculate_denoised(sigma, raw.float(), x)
