"""Pieces every scheduler shares: the final zero, the model's sigma range, the Karras ramp and the VE frame."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["append_zero", "sigma_range", "karras_ramp", "ve_sigma_range", "sigmas_from_ve", "loglinear_resample"]


def append_zero(sigmas: Tensor) -> Tensor:
    """The schedule with its final sigma 0 appended."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def sigma_range(model_sampling) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a model sampling, as floats."""
    return float(model_sampling.sigma_min), float(model_sampling.sigma_max)


def karras_ramp(ramp, sigma_min: float, sigma_max: float, rho: float = 7.0):
    """Karras et al. (2022), eq. 5 at ramp position(s) in [0, 1]: 0 gives sigma_max, 1 gives sigma_min."""
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def ve_sigma_range(model_sampling) -> tuple[float, float]:
    """The model's sigma range in the VE frame (sigma / alpha); flow's sigma = 1 maps to a large finite value."""
    sigma_min, sigma_max = sigma_range(model_sampling)
    top = sigma_max
    if model_sampling.alpha(top) <= 0:
        top = float(model_sampling.offset_first_sigma(torch.tensor([top, 0.0]))[0])
    return model_sampling.to_ve(sigma_min), model_sampling.to_ve(top)


def sigmas_from_ve(model_sampling, sigmas_ve: Tensor) -> Tensor:
    """Map VE-frame sigmas to the model's own sigmas, as float32 (the identity, up to rounding, for VE models)."""
    return torch.tensor([model_sampling.from_ve(s) for s in sigmas_ve.tolist()], dtype=torch.float32)


def loglinear_resample(log_sigmas: list[float], steps: int) -> list[float]:
    """``steps`` points along a descending log-sigma chain, linear between its nodes (AYS, Sec. 3.4)."""
    n = len(log_sigmas)
    out = []
    for i in range(steps):
        pos = 0.0 if steps == 1 else i * (n - 1) / (steps - 1)
        lo = min(int(math.floor(pos)), n - 2)
        w = pos - lo
        out.append((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1])
    return out
