"""Discrete-time samplers on the variance-preserving form of the state: DDPM and the consistency samplers.

Holds: ddpm, lcm, tcd.
"""
from __future__ import annotations

import math

import torch

from ._common import ancestral_setup, emit, run_steps, sigma_batch, step_range
from .traits import traits


def _vp_norm(ms, sigma: float) -> float:
    """sqrt(alpha^2 + sigma^2): the factor that maps the sampler's state to a variance-preserving one."""
    return math.sqrt(ms.alpha(sigma) ** 2 + sigma ** 2)


@torch.no_grad()
@traits(noise="ancestral")
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) on the VP form of the state."""
    extra_args, ms, noise_sampler, sig = ancestral_setup(model, x, sigmas, extra_args, noise_sampler)
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_prev = sig[i], sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma), **extra_args)
        emit(callback, x, i, sigma, denoised)
        norm, norm_prev = _vp_norm(ms, sigma), _vp_norm(ms, sigma_prev)
        alpha_bar = (ms.alpha(sigma) / norm) ** 2
        alpha_bar_prev = (ms.alpha(sigma_prev) / norm_prev) ** 2
        alpha_step = alpha_bar / alpha_bar_prev
        beta = 1 - alpha_step
        # posterior mean of q(x_prev | x, x0) in its x0 form, which stays finite at alpha_bar = 0
        mu = denoised * (math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)) \
            + x * (math.sqrt(alpha_step) * (1 - alpha_bar_prev) / (1 - alpha_bar) / norm)
        if sigma_prev > 0:
            mu = mu + noise_sampler(sigma, sigma_prev) * math.sqrt(beta * (1 - alpha_bar_prev) / (1 - alpha_bar))
            x = mu * norm_prev
        else:
            x = mu
    return x


@torch.no_grad()
@traits(noise="ancestral")
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent-consistency multistep sampling (Luo et al. 2023): jump to the estimate, re-noise to the next sigma."""
    extra_args, ms, noise_sampler, sig = ancestral_setup(model, x, sigmas, extra_args, noise_sampler)

    def step(x, denoised, i):
        return ms.noise_scaling(sig[i + 1], noise_sampler(sig[i], sig[i + 1]), denoised)
    return run_steps(model, x, sig, extra_args, callback, disable, step)


@torch.no_grad()
@traits(noise="ancestral")
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, gamma=0.3):
    """Trajectory-consistency distillation sampling (Zheng et al. 2024, Alg. 4): strategic stochastic steps.

    From sigma_t it predicts x0, moves deterministically (DDIM) to the
    intermediate sigma_s with (1 - gamma) of the way's progress in time, then
    re-noises to sigma_next.  gamma = 0 is DDIM; gamma = 1 is LCM.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: must lie in [0, 1], got {gamma}")
    extra_args, ms, noise_sampler, sig = ancestral_setup(model, x, sigmas, extra_args, noise_sampler)

    def step(x, denoised, i):
        sigma, sigma_next = sig[i], sig[i + 1]
        t_next = float(ms.timestep(torch.tensor(sigma_next)))
        sigma_s = sigma_next if gamma == 0.0 else min(float(ms.sigma(torch.tensor((1 - gamma) * t_next))), sigma_next)
        eps = (x - denoised * ms.alpha(sigma)) / sigma
        x_s = denoised * ms.alpha(sigma_s) + eps * sigma_s
        if sigma_s >= sigma_next or gamma == 0.0:
            return x_s
        # forward-diffuse x_s from sigma_s to sigma_next (VP form keeps the marginal exact)
        vs, vn = _vp_norm(ms, sigma_s), _vp_norm(ms, sigma_next)
        ab_s, ab_n = (ms.alpha(sigma_s) / vs) ** 2, (ms.alpha(sigma_next) / vn) ** 2
        ratio = ab_n / ab_s
        return (x_s / vs * math.sqrt(ratio) + noise_sampler(sigma, sigma_next) * math.sqrt(1 - ratio)) * vn
    return run_steps(model, x, sig, extra_args, callback, disable, step)

