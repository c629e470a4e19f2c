"""CFG++ samplers (Chung et al. 2024, arXiv:2406.08070): the renoising direction uses the unconditional estimate.

Holds: euler_cfg_pp, euler_ancestral_cfg_pp, dpmpp_2s_ancestral_cfg_pp, dpmpp_2m_cfg_pp, res_multistep_cfg_pp,
res_multistep_ancestral_cfg_pp, gradient_estimation_cfg_pp.  The last five are written in VE form (the
``*_ve`` functions) and run on any model through the VE frame (``frames.in_ve_frame``).

A guided denoiser exposes ``denoise_with_uncond``; with a bare denoiser the
unconditional estimate equals the guided one and these reduce to their plain
twins.
"""
from __future__ import annotations

import math

import torch

from ._common import (ancestral_schedule, as_float_list, denoise_with_uncond, emit, get_model_sampling, renoise,
                      resolve_noise_sampler, step_range)
from .dpmsolver import res_multistep
from .frames import in_ve_frame
from .euler import sample_gradient_estimation
from .multistep import lms_coefficients
from .traits import traits


def _guided_at(model, x, i: int, sigma: float, extra_args: dict, callback):
    """The guided and unconditional estimates at step i's sigma; the guided one is reported to ``callback``."""
    denoised, uncond = denoise_with_uncond(model, x, sigma, extra_args)
    emit(callback, x, i, sigma, denoised)
    return denoised, uncond


@torch.no_grad()
@traits(noise="ancestral", cfg_pp=True)
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                  s_noise=1., noise_sampler=None):
    """Ancestral Euler (DDIM-style) with CFG++, in the model's alpha/sigma geometry."""
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    if eta > 0 and s_noise > 0:
        noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sig = as_float_list(sigmas)
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised, uncond = _guided_at(model, x, i, sigma, extra_args, callback)
        if sigma_next == 0:
            x = denoised
            continue
        alpha_s, alpha_t = ms.alpha(sigma), ms.alpha(sigma_next)
        eps_uncond = (x - uncond * alpha_s) / sigma
        # VE ancestral split of the VE-equivalent noise levels sigma / alpha (alpha_s is 0 at flow's sigma = 1)
        s_to = sigma_next / alpha_t
        ratio = (s_to * alpha_s / sigma) ** 2
        sigma_up = min(s_to, eta * s_to * max(1.0 - ratio, 0.0) ** 0.5) if eta else 0.0
        sigma_down = alpha_t * max(s_to ** 2 - sigma_up ** 2, 0.0) ** 0.5
        x = denoised * alpha_t + eps_uncond * sigma_down
        if eta > 0 and s_noise > 0:
            x = x + noise_sampler(sigma, sigma_next) * (alpha_t * s_noise * sigma_up)
    return x


@torch.no_grad()
@traits(cfg_pp=True)
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler (DDIM) with CFG++."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0)


@traits(noise="ancestral", cfg_pp=True)
def dpmpp_2s_ancestral_cfg_pp_ve(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                                 noise_sampler=None, midpoint_uncond=False):
    """Ancestral DPM-Solver++(2S) with CFG++ (VE form).

    The full step renoises with the unconditional estimate at x.  ComfyUI uses the midpoint evaluation's
    instead (``midpoint_uncond=True``, only in reference mode), which shrinks the sample spread (std 0.41
    for a target of 0.50 in tests/test_convergence.py).
    """
    extra_args = {} if extra_args is None else extra_args
    ms, noise_sampler, sig_t, sig, downs_t, ups, scales = ancestral_schedule(model, x, sigmas, extra_args, eta,
                                                                             noise_sampler)
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised, uncond = denoise_with_uncond(model, x, sigma, extra_args)
        sigma_down_t, sigma_up, scale = downs_t[i], ups[i], scales[i]
        sigma_down = float(sigma_down_t)
        emit(callback, x, i, sigma, denoised)
        if sigma_down == 0:
            x = denoised + (x - uncond) * (sigma_down / sigma)
        else:
            sigma_s = float(ms.midpoint_sigma(sig_t[i], sigma_down_t, 0.5))
            x_2 = torch.lerp(x + (denoised - uncond), denoised, 1.0 - sigma_s / sigma)
            denoised_2, uncond_2 = denoise_with_uncond(model, x_2, sigma_s, extra_args)
            x = torch.lerp(x + (denoised - (uncond_2 if midpoint_uncond else uncond)), denoised_2,
                           1.0 - sigma_down / sigma)
        if sigma_next > 0:
            x = renoise(x, scale, noise_sampler(sigma, sigma_next), s_noise * sigma_up)
    return x


@traits(cfg_pp=True)
def dpmpp_2m_cfg_pp_ve(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) with CFG++ (Chung et al. 2024), VE form."""
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    old_uncond = None
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised, uncond = _guided_at(model, x, i, sigma, extra_args, callback)
        if sigma_next == 0:
            x = denoised
        else:
            ratio = sigma_next / sigma  # exp(-h)
            x = denoised + (x - uncond) * ratio
            if old_uncond is not None:
                h = math.log(sigma / sigma_next)
                r = math.log(sig[i - 1] / sigma) / h
                x = x + (denoised - old_uncond) * (-math.expm1(-h) / (2 * r))
        old_uncond = uncond
    return x


@traits(cfg_pp=True, takes_noise_sampler=True)
def res_multistep_cfg_pp_ve(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                             noise_sampler=None):
    """RES multistep with CFG++ (Zhang et al. 2023; Chung et al. 2024), VE form."""
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, 0.0, True)


@traits(noise="ancestral", cfg_pp=True)
def res_multistep_ancestral_cfg_pp_ve(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                       s_noise=1., noise_sampler=None):
    """RES multistep with ancestral noise and CFG++ (Chung et al. 2024), VE form."""
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta, True)


@traits(cfg_pp=True)
def gradient_estimation_cfg_pp_ve(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.):
    """Gradient estimation with CFG++ (Permenter & Yuan 2024; Chung et al. 2024), VE form."""
    return sample_gradient_estimation(model, x, sigmas, extra_args, callback, disable, ge_gamma, cfg_pp=True)


sample_dpmpp_2s_ancestral_cfg_pp = torch.no_grad()(in_ve_frame(dpmpp_2s_ancestral_cfg_pp_ve))
sample_dpmpp_2m_cfg_pp = torch.no_grad()(in_ve_frame(dpmpp_2m_cfg_pp_ve))
sample_res_multistep_cfg_pp = torch.no_grad()(in_ve_frame(res_multistep_cfg_pp_ve))
sample_res_multistep_ancestral_cfg_pp = torch.no_grad()(in_ve_frame(res_multistep_ancestral_cfg_pp_ve))
sample_gradient_estimation_cfg_pp = torch.no_grad()(in_ve_frame(gradient_estimation_cfg_pp_ve))


UD10_HISTORY_WEIGHT = 0.25          # the blend towards the Adams-Bashforth step
UD10_UNCOND_HISTORY_WEIGHT = 0.1    # the extrapolation of the unconditional derivative
UD10_ZERO_WEIGHT = 1.0              # the final step's blend towards the sigma = 0 extrapolation


@torch.no_grad()
@traits(cfg_pp=True, cfg1_shortcut=True)
def sample_cfgpp_ud10_ab(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """CFG++ Euler (Chung et al. 2024) with an AB2 history and a sigma-0 extrapolation (ComfyUI's cfgpp_ud10_ab)."""
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    sig = as_float_list(sigmas)
    step_derivatives, d_uncond_prev, denoised_prev = [], None, None
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        # ComfyUI's reference keeps the cfg = 1 shortcut here: the unconditional estimate is then the guided one
        denoised, uncond = denoise_with_uncond(model, x, sigma, extra_args, cfg1_shortcut=True)
        emit(callback, x, i, sigma, denoised)
        alpha_next = ms.alpha(sigma_next) if sigma_next > 0 else 1.0
        d_uncond = (x - uncond * ms.alpha(sigma)) / sigma
        dt = sigma_next - sigma
        d_used = d_uncond
        if d_uncond_prev is not None:
            # variable-step extrapolation of the unconditional derivative
            d_used = d_uncond + (d_uncond - d_uncond_prev) * (UD10_UNCOND_HISTORY_WEIGHT * dt / (sigma - sig[i - 1]))
        euler_step = denoised * alpha_next + d_used * sigma_next - x
        step_derivatives = (step_derivatives + [euler_step / dt])[-2:]
        if len(step_derivatives) == 2:
            c_new, c_old = lms_coefficients(sig, i, 2)  # exact; the order-2 basis is linear, so quadrature is too
            ab2_step = step_derivatives[1] * c_new + step_derivatives[0] * c_old
            euler_step = torch.lerp(euler_step, ab2_step, UD10_HISTORY_WEIGHT)
        x = x + euler_step
        if sigma_next == 0 and denoised_prev is not None:
            # the last two denoised estimates, extrapolated linearly to sigma = 0
            slope = (denoised - denoised_prev) / (sigma - sig[i - 1])
            x = torch.lerp(x, denoised - slope * sigma, UD10_ZERO_WEIGHT)
        denoised_prev, d_uncond_prev = denoised, d_uncond
    return x

