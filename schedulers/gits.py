"""GITS: geometry-inspired time scheduling (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion
Sampling", arXiv:2405.11326).

Sampling trajectories of the probability-flow ODE are regular: their shape
barely depends on the starting noise.  GITS therefore solves the ODE once,
finely (the *teacher* trajectory), prices every single first-order step
between two teacher points by how far it lands from the teacher, and picks the
cheapest chain of exactly ``steps`` steps by dynamic programming.  A step from
teacher point i to point j reuses the teacher's denoised estimate at i, so the
costs need no model calls beyond the teacher's.

Everything runs in the VE frame (``x / alpha``, ``sigma / alpha``), where the
first-order step is DDIM's: ``x_j = D_i + (sigma_j / sigma_i) (x_i - D_i)``.

* ``gits_schedule`` fits a schedule to a model and problem class (a denoiser
  and a batch of noise); it costs ``2 n_fine`` model calls.
* ``optimal_path`` is the dynamic programme on any cost matrix.
* ``gits`` (the registry entry) is model-free at run time: it runs the dynamic
  programme on a stored reference cost matrix (``_gits_table``, made by
  ``tools/make_gits_table.py`` from a Gaussian-mixture proxy of image latents)
  over the part of its log-sigma grid that the model's range covers.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from ._common import loglinear_resample, sigmas_from_ve, ve_sigma_range

if TYPE_CHECKING:
    from ..models.sampling import ModelSampling

__all__ = ["gits", "gits_schedule", "gits_cost_matrix", "optimal_path", "reference_cost_matrix"]

Denoiser = Callable[..., Tensor]


def optimal_path(cost: Tensor, steps: int) -> list[int]:
    """Cheapest chain 0 = i_0 < i_1 < ... < i_steps = N - 1 through an N x N step-cost matrix (Chen et al. 2024, GITS).

    ``cost[i, j]`` is the price of one step from grid point i to grid point j
    (only i < j is read).  Dynamic programming over the number of steps taken:
    O(steps * N^2), vectorised over the grid.
    """
    n = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != n:
        raise ValueError(f"cost: expected a square matrix, got shape {tuple(cost.shape)}")
    if not 1 <= steps <= n - 1:
        raise ValueError(f"steps: a path through {n} grid points takes 1..{n - 1} steps, got {steps}")
    c = cost.detach().to(torch.float64).cpu().clone()
    forward = torch.ones(n, n, dtype=torch.bool).triu(1)
    c[~forward] = math.inf
    best = c[0].clone()  # best[j]: cheapest 1-step path 0 -> j
    parents = []
    for _ in range(steps - 1):
        total = best[:, None] + c  # total[i, j]: best path to i, then one step i -> j
        best, arg = total.min(dim=0)
        parents.append(arg)
    path = [n - 1]
    for arg in reversed(parents):
        path.append(int(arg[path[-1]]))
    path.append(0)
    return path[::-1]


def _chain(grid: list[float], cost: Tensor, steps: int, max_edges: int) -> list[float]:
    """``steps`` log sigmas from grid[0] to grid[-1]: the DP path, resampled when the grid is too coarse for it."""
    if steps == 1:
        return [grid[0]]
    edges = min(steps - 1, max(1, max_edges), len(grid) - 1)
    chosen = [grid[k] for k in optimal_path(cost, edges)]
    if edges == steps - 1:
        return chosen
    return loglinear_resample(chosen, steps)


# ---- the VE frame ------------------------------------------------------------------------
def _to_model_sigmas(model_sampling, log_sigmas_ve: list[float]) -> Tensor:
    """Model sigmas for VE-frame log sigmas, with the final 0 appended (strictly descending in float32)."""
    sig = sigmas_from_ve(model_sampling, torch.tensor([math.exp(v) for v in log_sigmas_ve], dtype=torch.float64))
    sig = torch.cat([sig, sig.new_zeros([1])])
    # nudge float32 ties (only possible for very long schedules crowded near a flow model's sigma = 1) apart
    for k in range(len(sig) - 2, -1, -1):
        if sig[k] <= sig[k + 1]:
            sig[k] = torch.nextafter(sig[k + 1], torch.tensor(math.inf))
    return sig


# ---- the model-specific schedule -------------------------------------------------------------
@torch.no_grad()
def gits_cost_matrix(denoiser: Denoiser, model_sampling: "ModelSampling", noise: Tensor, sigmas_ve: Tensor, *,
                     weighting: str = "data", sigma_data: float = 1.0,
                     teacher_substeps: int = 1) -> tuple[Tensor, Tensor]:
    """(cost matrix, teacher states) of GITS (Chen et al. 2024) on a descending VE-frame sigma grid.

    The teacher solves the PF-ODE through every grid sigma with the
    second-order data-prediction exponential integrator (DPM-Solver-2,
    ``teacher_substeps`` steps per grid interval).  ``cost[i, j]`` is the RMS
    distance, averaged over the batch, between the teacher at grid point j and
    one DDIM step from the teacher at point i.  ``weighting="data"`` divides an
    error at sigma by ``sqrt(1 + (sigma / sigma_data)^2)``, the factor by which
    the ODE shrinks it on the way to the data (the VP-frame error);
    ``"ve"`` keeps the raw VE-frame error.
    """
    if weighting not in ("data", "ve"):
        raise ValueError(f"weighting: must be 'data' or 've', got {weighting!r}")
    sig = [float(s) for s in sigmas_ve.tolist()]
    if len(sig) < 2 or any(b >= a for a, b in zip(sig, sig[1:])) or sig[-1] <= 0:
        raise ValueError("sigmas_ve: need at least two strictly descending positive VE sigmas")
    ms = model_sampling

    def d_ve(x_ve: Tensor, s_ve: float) -> Tensor:
        s = float(ms.from_ve(s_ve))
        alpha = float(ms.alpha(s))
        return denoiser(x_ve * alpha, x_ve.new_full((x_ve.shape[0],), s)).to(x_ve.dtype)

    x = noise.to(torch.float32) * sig[0]
    states, denoised = [x], []
    for k in range(len(sig) - 1):
        s_hi, s_lo = sig[k], sig[k + 1]
        sub = [math.exp(math.log(s_hi) + (math.log(s_lo) - math.log(s_hi)) * m / teacher_substeps)
               for m in range(teacher_substeps + 1)]
        for m in range(teacher_substeps):
            s, t = sub[m], sub[m + 1]
            d = d_ve(x, s)
            if m == 0:
                denoised.append(d)
            mid = math.sqrt(s * t)
            x_mid = d + (mid / s) * (x - d)
            d_mid = d_ve(x_mid, mid)
            x = d_mid + (t / s) * (x - d_mid)
        states.append(x)

    n = len(sig)
    flat = torch.stack(states).reshape(n, noise.shape[0], -1).double()
    dens = torch.stack(denoised).reshape(n - 1, noise.shape[0], -1).double()
    sig_t = torch.tensor(sig, dtype=torch.float64)
    scale = (1 + (sig_t / sigma_data) ** 2).sqrt() if weighting == "data" else torch.ones_like(sig_t)
    cost = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n - 1):
        ratio = (sig_t[i + 1:] / sig_t[i]).reshape(-1, 1, 1)
        step = dens[i] + ratio * (flat[i] - dens[i])
        err = (step - flat[i + 1:]).pow(2).mean(dim=-1).sqrt().mean(dim=-1)
        cost[i, i + 1:] = err / scale[i + 1:]
    return cost, torch.stack(states)


def gits_schedule(denoiser: Denoiser, model_sampling: "ModelSampling", noise: Tensor, steps: int, n_fine: int = 100, *,
                  sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, weighting: str = "data",
                  sigma_data: float = 1.0, teacher_substeps: int = 1) -> Tensor:
    """GITS schedule fitted to ``denoiser`` (Chen et al. 2024): ``steps + 1`` float32 model sigmas ending in 0.

    denoiser: ``denoiser(x, sigma) -> denoised`` in the model's own frame (k-diffusion protocol; a CFG-guided
        denoiser fits the schedule to guided sampling).
    noise: a batch of unit-variance noise shaped like the latents the schedule is for (a few items suffice;
        the trajectories' regularity is what makes a small batch enough).
    n_fine: intervals of the teacher's grid, log-uniform in VE sigma over the model's range (or
        ``sigma_min``..``sigma_max``, model sigmas).  Costs ``2 * n_fine * teacher_substeps`` model calls.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if isinstance(n_fine, bool) or not isinstance(n_fine, int) or n_fine < 1:
        raise ValueError(f"n_fine: expected an int >= 1, got {n_fine!r}")
    lo, hi = ve_sigma_range(model_sampling)
    if sigma_min is not None:
        lo = model_sampling.to_ve(float(sigma_min))
    if sigma_max is not None:
        top = float(sigma_max)
        if model_sampling.alpha(top) <= 0:
            raise ValueError("sigma_max: must be below the model's pure-noise sigma")
        hi = model_sampling.to_ve(top)
    if not 0 < lo < hi:
        raise ValueError(f"sigma range: need 0 < sigma_min < sigma_max, got VE {lo}..{hi}")
    grid = [math.log(hi) + (math.log(lo) - math.log(hi)) * k / n_fine for k in range(n_fine + 1)]
    sig_ve = torch.tensor([math.exp(v) for v in grid], dtype=torch.float64)
    cost, _ = gits_cost_matrix(denoiser, model_sampling, noise, sig_ve, weighting=weighting, sigma_data=sigma_data,
                               teacher_substeps=teacher_substeps)
    return _to_model_sigmas(model_sampling, _chain(grid, cost, steps, n_fine))


# ---- the model-free registry entry ----------------------------------------------------------
@lru_cache(maxsize=1)
def reference_cost_matrix() -> tuple[tuple[float, ...], Tensor]:
    """(descending log VE sigmas of the grid, full cost matrix) of the stored GITS table (Chen et al. 2024)."""
    import base64

    from . import _gits_table as table

    grid = tuple(table.LOG_SIGMA_MAX - table.LOG_SIGMA_STEP * k for k in range(table.POINTS))
    raw = torch.frombuffer(bytearray(base64.b64decode("".join(table.LOG10_COST_MILLI))), dtype=torch.int16)
    n = table.POINTS
    rows, cols = torch.triu_indices(n, n, offset=1)
    cost = torch.zeros(n, n, dtype=torch.float64)
    cost[rows, cols] = torch.pow(10.0, raw.to(torch.float64) / 1000.0)
    return grid, cost


def gits(model_sampling: "ModelSampling", steps: int) -> Tensor:
    """GITS (Chen et al. 2024) from a stored reference cost matrix, mapped onto the model's VE log-sigma range.

    The grid points nearest the model's VE ``sigma_max`` and ``sigma_min``
    bound the dynamic programme; its path is then stretched affinely in log
    sigma so that it starts and ends exactly there.  Step counts beyond half the
    grid points in range reuse the path for that many steps, log-linearly
    resampled (the grid is 0.1 apart in log sigma).
    """
    lo, hi = ve_sigma_range(model_sampling)
    log_lo, log_hi = math.log(lo), math.log(hi)
    grid, cost = reference_cost_matrix()
    top = min(range(len(grid)), key=lambda k: abs(grid[k] - log_hi))
    bottom = min(range(len(grid)), key=lambda k: abs(grid[k] - log_lo))
    if bottom - top < 2:  # a range narrower than the grid: log-linear
        chain = loglinear_resample([log_hi, log_lo], steps)
    else:
        sub_grid = list(grid[top:bottom + 1])
        chain = _chain(sub_grid, cost[top:bottom + 1, top:bottom + 1], steps, (bottom - top) // 2)
        a, b = sub_grid[0], sub_grid[-1]
        chain = [log_hi + (v - a) * (log_lo - log_hi) / (b - a) for v in chain]
    return _to_model_sigmas(model_sampling, chain)
