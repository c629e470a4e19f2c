"""Restart sampling (Xu et al. 2023, arXiv:2306.14878): ODE steps plus noisy jumps back up an interval.

Holds: restart.
"""
from __future__ import annotations

import math

import torch

from ._common import as_float_list, emit, get_model_sampling, resolve_noise_sampler, sigma_batch, step_range
from ..schedulers import karras_ramp
from .traits import traits


def default_restart_list(steps: int) -> dict:
    """One restart interval, VE sigma 0.1 -> 2 with K = 2 restarts (the paper's SD setting), sized to the step count."""
    if steps < 4:
        return {}
    return {0.1: [max(2, steps // 5), 2, 2.0]}


def _heun_step(model, x, sigma, sigma_next, extra_args):
    denoised = model(x, sigma_batch(x, sigma), **extra_args)
    d = (x - denoised) / sigma
    x_next = x + d * (sigma_next - sigma)
    if sigma_next > 0:
        d_2 = (x_next - model(x_next, sigma_batch(x, sigma_next), **extra_args)) / sigma_next
        x_next = x + (d + d_2) * ((sigma_next - sigma) / 2)
    return x_next, denoised


@torch.no_grad()
@traits(noise="ancestral")
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1., noise_sampler=None,
                   restart_list=None):
    """Restart sampling (Xu et al. 2023): Heun ODE steps; after reaching each restart level t_min, K times
    re-noise to t_max (forward process, exact for the model's geometry) and solve back with N Heun steps.

    ``restart_list`` maps t_min -> [N, K, t_max], both levels in VE-equivalent sigma (sigma / alpha).
    """
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    sig = as_float_list(sigmas)
    if restart_list is None:
        restart_list = default_restart_list(len(sig) - 1)

    restarts = {}
    for t_min_ve, (n_restart, k_restart, t_max_ve) in restart_list.items():
        target = ms.from_ve(float(t_min_ve))
        j = min(range(1, len(sig)), key=lambda k: abs(sig[k] - target))
        t_max = ms.from_ve(float(t_max_ve))
        if sig[j] > 0 and t_max > sig[j] and t_max < sig[0]:
            restarts[j] = (int(n_restart), int(k_restart), t_max)
    for i in step_range(len(sig) - 1, disable):
        x, denoised = _heun_step(model, x, sig[i], sig[i + 1], extra_args)
        emit(callback, x, i, sig[i], denoised)
        if i + 1 not in restarts:
            continue
        n_restart, k_restart, t_max = restarts[i + 1]
        t_min = sig[i + 1]
        sub = [karras_ramp(k / n_restart, t_min, t_max) for k in range(n_restart + 1)] if n_restart > 0 else [t_max]
        jump = s_noise * math.sqrt(ms.to_ve(t_max) ** 2 - ms.to_ve(t_min) ** 2)
        noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
        for _ in range(k_restart):
            # forward process from t_min to t_max, in the VE frame x / alpha
            x = (x / ms.alpha(t_min) + noise_sampler(t_min, t_max) * jump) * ms.alpha(t_max)
            for j in range(len(sub) - 1):
                x, _ = _heun_step(model, x, sub[j], sub[j + 1], extra_args)
    return x
