"""Schedulers beyond ComfyUI's nine.  Each is ``fn(model_sampling, steps, **options) -> sigmas`` ending in 0."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor

from ._common import append_zero, loglinear_resample, sigma_range, sigmas_from_ve, ve_sigma_range
from .gits import gits


def polyexponential(model_sampling, steps: int, rho: float = 1.0) -> Tensor:
    """Log-sigma polynomial in the step index (k-diffusion's ``get_sigmas_polyexponential``); rho = 1 is exponential."""
    sigma_min, sigma_max = sigma_range(model_sampling)
    ramp = torch.linspace(1, 0, steps) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def vp(model_sampling, steps: int, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """The VP-SDE schedule (Song et al. 2021), sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), over the model's range.

    Times are evenly spaced between those at which the VP curve reaches the
    model's largest and smallest (VE-frame) sigma.
    """
    lo, hi = ve_sigma_range(model_sampling)

    def t_of(sigma: float) -> float:
        return (-beta_min + math.sqrt(beta_min ** 2 + 2 * beta_d * math.log1p(sigma ** 2))) / beta_d

    t = torch.linspace(t_of(hi), t_of(lo), steps, dtype=torch.float64)
    return append_zero(sigmas_from_ve(model_sampling, torch.sqrt(torch.special.expm1(beta_d * t ** 2 / 2 + beta_min * t))))


def laplace(model_sampling, steps: int, mu: float = 0.0, beta: float = 0.5) -> Tensor:
    """Laplace-distributed log-sigma (Hang et al. 2024, arXiv:2407.03297), in the VE frame, clamped to the model's range."""
    lo, hi = ve_sigma_range(model_sampling)
    x = torch.linspace(0, 1, steps, dtype=torch.float64)
    log_sigma = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
    return append_zero(sigmas_from_ve(model_sampling, torch.exp(log_sigma).clamp(lo, hi)))


# Align Your Steps (Sabour, Fidler & Kreis 2024, arXiv:2404.14507): the published 10-step schedules.
AYS_TABLES = {
    "SD1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "SDXL": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def align_your_steps(model_sampling, steps: int, model_type: str = "SD1") -> Tensor:
    """Align Your Steps (Sabour et al. 2024): a published 10-step table, log-linearly resampled to ``steps``.

    ``model_type`` picks the SD1, SDXL or SVD table.  The table's log-sigma range
    is mapped affinely onto the model's (a near-identity for the models the
    table was optimised for), so the schedule starts at sigma_max and ends at
    sigma_min of whatever model it runs on.
    """
    if model_type not in AYS_TABLES:
        raise ValueError(f"model_type: unknown AYS table {model_type!r}; choose one of {', '.join(AYS_TABLES)}")
    table = AYS_TABLES[model_type]
    sigma_min, sigma_max = sigma_range(model_sampling)
    lo, hi = math.log(table[-1]), math.log(table[0])
    new_lo, new_hi = math.log(sigma_min), math.log(sigma_max)
    mapped = [math.exp(new_lo + (math.log(s) - lo) * (new_hi - new_lo) / (hi - lo)) for s in table]
    resampled = loglinear_resample([math.log(s) for s in mapped], steps)
    return append_zero(torch.tensor([math.exp(v) for v in resampled], dtype=torch.float32))


EXTRA_SCHEDULERS = OrderedDict([
    ("align_your_steps", align_your_steps),
    ("polyexponential", polyexponential),
    ("laplace", laplace),
    ("vp", vp),
    ("gits", gits),
])
