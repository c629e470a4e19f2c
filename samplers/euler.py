"""First- and second-order steps of the probability-flow ODE in sigma (Karras et al. 2022).

Holds: euler, euler_ancestral, heun, heunpp2, dpm_2, dpm_2_ancestral, ddim, gradient_estimation.

The ODE ``dx/dsigma = (x - D(x)) / sigma`` has the same form for VE and flow
models, so these steps serve both; ancestral re-noising goes through the
model-sampling object's ``ancestral_step``.
"""
from __future__ import annotations

import torch

from ._common import (ancestral_setup, as_float_list, denoise_with_uncond, emit, get_model_sampling, renoise,
                      resolve_noise_sampler, run_steps, sigma_batch, step_range)
from .traits import traits


def _euler_to(x, denoised, sigma, sigma_to):
    """Euler step of the PF-ODE from sigma to sigma_to: x + (sigma_to - sigma) (x - D) / sigma.

    In k-diffusion's order of operations (ComfyUI's latents to the bit), in place on one fresh tensor.
    """
    return (x - denoised).div_(sigma).mul_(sigma_to - sigma).add_(x)


def _log_midpoint(a: float, b: float, dtype) -> float:
    """exp(lerp(log a, log b, 1/2)), at the schedule's precision (bit-identical to the reference for float32)."""
    a, b = torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)
    return float(a.log().lerp(b.log(), 0.5).exp())


def _churn(model, x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, extra_args):
    """Karras et al. (2022) Alg. 2 lines 5-6: raise the noise level to sigma_hat by adding fresh noise.

    The raise happens in the VE-equivalent frame (x / alpha, sigma / alpha), so it
    keeps flow models on their marginals; for VE models it is the paper's step.
    """
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma, noise_sampler
    ms = get_model_sampling(model)
    if ms.alpha(sigma) <= 0:  # already pure noise (flow at sigma = 1): nothing to raise
        return x, sigma, noise_sampler
    ve = ms.to_ve(sigma)
    ve_hat = ve * (gamma + 1)
    sigma_hat = ms.from_ve(ve_hat)
    noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    x_ve = x / ms.alpha(sigma) + noise_sampler(sigma, sigma_hat) * (s_noise * (ve_hat ** 2 - ve ** 2) ** 0.5)
    return x_ve * ms.alpha(sigma_hat), sigma_hat, noise_sampler


def _churn_loop(model, x, sigmas, extra_args, callback, disable, churn, noise_sampler, step):
    """The loop of the churn samplers: per step, raise the noise to sigma_hat (``_churn``), denoise there
    and report it, then ``x = step(x, denoised, sigma_hat, i, sig, denoise)`` (``sig``: the sigmas as
    floats; ``denoise(x, sigma)``: the model's estimate, for steps with more stages)."""
    extra_args = {} if extra_args is None else extra_args

    def denoise(x_stage, sigma):
        return model(x_stage, sigma_batch(x_stage, sigma), **extra_args)
    sig = as_float_list(sigmas)
    n = len(sig) - 1
    for i in step_range(n, disable):
        x, sigma_hat, noise_sampler = _churn(model, x, sig[i], n, *churn, noise_sampler, extra_args)
        denoised = denoise(x, sigma_hat)
        emit(callback, x, i, sig[i], denoised, sigma_hat)
        x = step(x, denoised, sigma_hat, i, sig, denoise)
    return x


def _euler_churn_step(x, denoised, sigma_hat, i, sig, denoise):
    return _euler_to(x, denoised, sigma_hat, sig[i + 1])


@torch.no_grad()
@traits(takes_noise_sampler=True)
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., noise_sampler=None):
    """Euler steps, with optional churn (Karras et al. 2022, Alg. 2)."""
    return _churn_loop(model, x, sigmas, extra_args, callback, disable, (s_churn, s_tmin, s_tmax, s_noise),
                       noise_sampler, _euler_churn_step)


@torch.no_grad()
@traits(noise="ancestral")
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral sampling with Euler steps (k-diffusion; flow re-noising via the model sampling)."""
    extra_args, ms, noise_sampler, sig = ancestral_setup(model, x, sigmas, extra_args, noise_sampler)

    def step(x, denoised, i):
        sigma, sigma_next = sig[i], sig[i + 1]
        sigma_down, sigma_up, scale = ms.ancestral_step(sigma, sigma_next, eta)
        x = _euler_to(x, denoised, sigma, sigma_down)
        if eta > 0:
            x = renoise(x, scale, noise_sampler(sigma, sigma_next), s_noise * sigma_up)
        return x
    return run_steps(model, x, sig, extra_args, callback, disable, step)


@torch.no_grad()
@traits(takes_noise_sampler=True)
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float("inf"), s_noise=1., noise_sampler=None):
    """Heun's second-order method (Karras et al. 2022, Alg. 2); Euler on the last step to 0."""

    def step(x, denoised, sigma_hat, i, sig, denoise):
        sigma_next = sig[i + 1]
        dt = sigma_next - sigma_hat
        d = (x - denoised) / sigma_hat
        if sigma_next == 0:
            return x + d * dt
        x_2 = x + d * dt
        denoised_2 = denoise(x_2, sigma_next)
        d_2 = (x_2 - denoised_2) / sigma_next
        return x + (d + d_2) * (dt / 2)
    return _churn_loop(model, x, sigmas, extra_args, callback, disable, (s_churn, s_tmin, s_tmax, s_noise),
                       noise_sampler, step)


@torch.no_grad()
@traits(takes_noise_sampler=True)
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                   s_tmax=float("inf"), s_noise=1., noise_sampler=None):
    """Heun++: a three-stage Heun variant whose stage weights grow with sigma (sd-webui-samplers-scheduler, MIT)."""
    s_end = as_float_list(sigmas)[-1]

    def step(x, denoised, sigma_hat, i, sig, denoise):
        d = (x - denoised) / sigma_hat
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == s_end:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = (x_2 - denoise(x_2, sig[i + 1])) / sig[i + 1]
        if sig[i + 2] == s_end:
            w2 = sig[i + 1] / (2 * sig[0])
            return x + (d * (1 - w2) + d_2 * w2) * dt
        x_3 = x_2 + d_2 * (sig[i + 2] - sig[i + 1])
        d_3 = (x_3 - denoise(x_3, sig[i + 2])) / sig[i + 2]
        w2, w3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
        return x + (d * (1 - w2 - w3) + d_2 * w2 + d_3 * w3) * dt
    return _churn_loop(model, x, sigmas, extra_args, callback, disable, (s_churn, s_tmin, s_tmax, s_noise),
                       noise_sampler, step)


@torch.no_grad()
@traits(discard_penultimate_sigma=True, takes_noise_sampler=True)
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., noise_sampler=None):
    """DPM-Solver-2 in sigma with a log-midpoint (Lu et al. 2022; Karras et al. 2022, Alg. 2)."""

    def step(x, denoised, sigma_hat, i, sig, denoise):
        sigma_next = sig[i + 1]
        d = (x - denoised) / sigma_hat
        if sigma_next == 0:
            return x + d * (sigma_next - sigma_hat)
        sigma_mid = _log_midpoint(sigma_hat, sigma_next, sigmas.dtype)
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
        return x + d_2 * (sigma_next - sigma_hat)
    return _churn_loop(model, x, sigmas, extra_args, callback, disable, (s_churn, s_tmin, s_tmax, s_noise),
                       noise_sampler, step)


@torch.no_grad()
@traits(noise="ancestral", discard_penultimate_sigma=True)
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion; flow re-noising via the model sampling)."""
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sig_t = sigmas.detach().cpu()
    sig = as_float_list(sigmas)
    downs, ups, scales = (as_float_list(v) for v in ms.ancestral_steps(sig_t, eta))
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma), **extra_args)
        sigma_down, sigma_up, scale = downs[i], ups[i], scales[i]
        emit(callback, x, i, sigma, denoised)
        d = (x - denoised) / sigma
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
            continue
        sigma_mid = _log_midpoint(sigma, sigma_down, sig_t.dtype)
        x_2 = x + d * (sigma_mid - sigma)
        d_2 = (x_2 - model(x_2, sigma_batch(x, sigma_mid), **extra_args)) / sigma_mid
        x = x + d_2 * (sigma_down - sigma)
        x = renoise(x, scale, noise_sampler(sigma, sigma_next), s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.,
                               cfg_pp=False):
    """Gradient-estimation sampler (Permenter & Yuan 2024): Euler plus a (gamma - 1) correction from the last d."""
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    old_d = None
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        if cfg_pp:
            denoised, uncond = denoise_with_uncond(model, x, sigma, extra_args)
            d = (x - uncond) / sigma
        else:
            denoised = model(x, sigma_batch(x, sigma), **extra_args)
            d = (x - denoised) / sigma
        emit(callback, x, i, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (d - old_d) * ((ge_gamma - 1) * dt)
        old_d = d
    return x


@torch.no_grad()
@traits(random_inpaint_noise=True)
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DDIM (Song et al. 2021): the deterministic first-order step; inpainting re-noises with a fresh draw."""
    return sample_euler(model, x, sigmas, extra_args, callback, disable)
