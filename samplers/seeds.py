"""SEEDS: stochastic explicit exponential derivative-free solvers (Gonzalez et al. 2023, arXiv:2305.14267).

Holds: seeds_2, seeds_3, exp_heun_2_x0, exp_heun_2_x0_sde (the 2-stage SEEDS loop with r = 1).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from ._common import (as_float_list, get_model_sampling, h_phi_2, neg_expm1, resolve_noise_sampler, run_steps,
                      sigma_batch)
from .traits import traits


def _seeds_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, stages):
    """The step loop of the SEEDS solvers: ``stages(x, denoised, s)`` takes one step, ``s`` holding its facts."""
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    inject = eta > 0 and s_noise > 0
    if inject:
        noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sig_t = ms.offset_first_sigma(sigmas.detach().cpu())
    sig = as_float_list(sig_t)

    def step(x, denoised, i):
        lam_s_t, lam_t_t = ms.half_log_snr(sig_t[i]), ms.half_log_snr(sig_t[i + 1])
        h = float(lam_t_t) - float(lam_s_t)
        facts = SimpleNamespace(ms=ms, sigma=sig[i], sigma_next=sig[i + 1], lam_s_t=lam_s_t, lam_t_t=lam_t_t, h=h,
                                h_eta=h * (eta + 1), inject=inject, noise_sampler=noise_sampler, extra_args=extra_args)
        return stages(x, denoised, facts)
    return run_steps(model, x, sig, extra_args, callback, disable, step)


def _carry_noise(sde_noise, seg: float, fresh):
    """The SDE noise carried across a stage whose exponent is ``seg``: decayed, topped up with fresh noise."""
    return sde_noise * math.exp(seg) + fresh * math.sqrt(-math.expm1(2 * seg))


def _seeds_2(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r, solver_type):
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"solver_type: must be 'phi_1' or 'phi_2', got {solver_type!r}")

    def stages(x, denoised, s):
        ms, sigma, sigma_next, lam_s_t, lam_t_t = s.ms, s.sigma, s.sigma_next, s.lam_s_t, s.lam_t_t
        h, h_eta, inject, noise_sampler, extra_args = s.h, s.h_eta, s.inject, s.noise_sampler, s.extra_args
        sigma_s_1 = float(ms.sigma_from_half_log_snr(torch.lerp(lam_s_t, lam_t_t, r)))
        alpha_s_1, alpha_t = ms.alpha(sigma_s_1), ms.alpha(sigma_next)

        x_2 = x * (sigma_s_1 / sigma * math.exp(-r * h * eta)) + denoised * (alpha_s_1 * neg_expm1(r * h_eta))
        if inject:
            sde_noise = noise_sampler(sigma, sigma_s_1) * math.sqrt(neg_expm1(2 * r * h * eta))
            x_2 = x_2 + sde_noise * (sigma_s_1 * s_noise)
        denoised_2 = model(x_2, sigma_batch(x, sigma_s_1), **extra_args)

        decay = sigma_next / sigma * math.exp(-h * eta)
        if solver_type == "phi_1":
            x = x * decay + torch.lerp(denoised, denoised_2, 1 / (2 * r)) * (alpha_t * neg_expm1(h_eta))
        else:  # phi_2: exponential-integrator weights for a linear-in-lambda denoised estimate
            v = -h_eta
            b2 = h_phi_2(v) / r
            b1 = math.expm1(v) - b2
            x = x * decay - denoised * (alpha_t * b1) - denoised_2 * (alpha_t * b2)
        if inject:
            sde_noise = _carry_noise(sde_noise, (r - 1) * h * eta, noise_sampler(sigma_s_1, sigma_next))
            x = x + sde_noise * (sigma_next * s_noise)
        return x
    return _seeds_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, stages)


@torch.no_grad()
@traits(noise="ancestral")
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                   noise_sampler=None, r=0.5, solver_type="phi_1"):
    """SEEDS-2: stochastic explicit exponential derivative-free solver, 2 stages (Gonzalez et al. 2023)."""
    return _seeds_2(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r, solver_type)


@torch.no_grad()
def sample_exp_heun_2_x0(model, x, sigmas, extra_args=None, callback=None, disable=None, solver_type="phi_2"):
    """Deterministic exponential Heun (2nd order) in data prediction and half-log-SNR time."""
    return _seeds_2(model, x, sigmas, extra_args, callback, disable, 0.0, 0.0, None, 1.0, solver_type)


@torch.no_grad()
@traits(noise="ancestral")
def sample_exp_heun_2_x0_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                             noise_sampler=None, solver_type="phi_2"):
    """Stochastic exponential Heun (2nd order) in data prediction and half-log-SNR time."""
    return _seeds_2(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, 1.0, solver_type)



@torch.no_grad()
@traits(noise="ancestral")
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                   noise_sampler=None, r_1=1. / 3, r_2=2. / 3):
    """SEEDS-3: stochastic explicit exponential derivative-free solver, 3 stages (Gonzalez et al. 2023)."""

    def stages(x, denoised, s):
        ms, sigma, sigma_next, lam_s_t, lam_t_t = s.ms, s.sigma, s.sigma_next, s.lam_s_t, s.lam_t_t
        h, h_eta, inject, noise_sampler, extra_args = s.h, s.h_eta, s.inject, s.noise_sampler, s.extra_args
        sigma_1 = float(ms.sigma_from_half_log_snr(torch.lerp(lam_s_t, lam_t_t, r_1)))
        sigma_2 = float(ms.sigma_from_half_log_snr(torch.lerp(lam_s_t, lam_t_t, r_2)))
        alpha_1, alpha_2, alpha_t = ms.alpha(sigma_1), ms.alpha(sigma_2), ms.alpha(sigma_next)

        x_2 = x * (sigma_1 / sigma * math.exp(-r_1 * h * eta)) + denoised * (alpha_1 * neg_expm1(r_1 * h_eta))
        if inject:
            sde_noise = noise_sampler(sigma, sigma_1) * math.sqrt(neg_expm1(2 * r_1 * h * eta))
            x_2 = x_2 + sde_noise * (sigma_1 * s_noise)
        denoised_2 = model(x_2, sigma_batch(x, sigma_1), **extra_args)

        a3_2 = r_2 / r_1 * h_phi_2(-r_2 * h_eta)
        a3_1 = math.expm1(-r_2 * h_eta) - a3_2
        x_3 = x * (sigma_2 / sigma * math.exp(-r_2 * h * eta)) - denoised * (alpha_2 * a3_1) - denoised_2 * (alpha_2 * a3_2)
        if inject:
            sde_noise = _carry_noise(sde_noise, (r_1 - r_2) * h * eta, noise_sampler(sigma_1, sigma_2))
            x_3 = x_3 + sde_noise * (sigma_2 * s_noise)
        denoised_3 = model(x_3, sigma_batch(x, sigma_2), **extra_args)

        b3 = h_phi_2(-h_eta) / r_2
        b1 = math.expm1(-h_eta) - b3
        x = x * (sigma_next / sigma * math.exp(-h * eta)) - denoised * (alpha_t * b1) - denoised_3 * (alpha_t * b3)
        if inject:
            sde_noise = _carry_noise(sde_noise, (r_2 - 1) * h * eta, noise_sampler(sigma_2, sigma_next))
            x = x + sde_noise * (sigma_next * s_noise)
        return x
    return _seeds_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, stages)

