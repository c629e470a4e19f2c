"""Exponential integrators in t = -log sigma: DPM-Solver, DPM-Solver++ (single- and multistep ODE) and RES.

Holds: dpm_fast, dpm_adaptive, dpmpp_2s_ancestral, dpmpp_2m, res_multistep, res_multistep_ancestral
(and ``res_multistep``, the shared RES loop that cfgpp.py's RES entries call).  The SDE forms of
DPM-Solver++ (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde and their variants) and dpmpp_3m are in sde.py.
"""
from __future__ import annotations

import math

import torch

from ..models.sampling import ve_ancestral_split
from ._common import (ancestral_schedule, denoise_at, denoise_with_uncond, emit, get_model_sampling,
                      renoise, resolve_noise_sampler, sigma_batch, step_range)
from .traits import traits
from ..validation import KSamplerInputError


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps on the eps parametrisation (Lu et al. 2022, Alg. 1 and 2)."""

    def __init__(self, model, extra_args):
        self.model, self.extra_args = model, extra_args

    @staticmethod
    def sigma(t):
        return t.neg().exp()

    @staticmethod
    def t(sigma):
        return sigma.log().neg()

    def eps(self, x, t):
        denoised = self.model(x, self.sigma(t) * x.new_ones([x.shape[0]]), **self.extra_args)
        return (x - denoised) / self.sigma(t)

    def step_1(self, x, t, t_next, eps):
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * eps

    def step_2(self, x, t, t_next, eps, r1=0.5, cache=None):
        h = t_next - t
        if cache is not None and "eps_r1" in cache:
            eps_r1 = cache["eps_r1"]
        else:
            s1 = t + r1 * h
            eps_r1 = self.eps(x - self.sigma(s1) * (r1 * h).expm1() * eps, s1)
            if cache is not None:
                cache["eps_r1"] = eps_r1
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x, t, t_next, eps, r1=1 / 3, r2=2 / 3, cache=None):
        h = t_next - t
        s1, s2 = t + r1 * h, t + r2 * h
        if cache is not None and "eps_r1" in cache:
            eps_r1 = cache["eps_r1"]
        else:
            eps_r1 = self.eps(x - self.sigma(s1) * (r1 * h).expm1() * eps, s1)
        u2 = x - self.sigma(s2) * (r2 * h).expm1() * eps \
            - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        eps_r2 = self.eps(u2, s2)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def ancestral(self, t, t_next, t_end, eta, forward=True):
        """Step target and noise amount for eta > 0 (the ancestral mode of k-diffusion's DPM-Solver)."""
        if not eta:
            return t_next, 0.0
        s, s_next = self.sigma(t), self.sigma(t_next)
        sigma_down, _ = ve_ancestral_split(s, s_next, eta)
        t_down = self.t(sigma_down)
        t_next_ = torch.minimum(t_end, t_down) if forward else torch.maximum(t_end, t_down)
        return t_next_, float((s_next ** 2 - self.sigma(t_next_) ** 2) ** 0.5)


def _end_sigmas(sigmas):
    """ComfyUI's range for the DPM-Solver samplers: (last non-zero sigma, first sigma), as 0-d CPU tensors."""
    sigmas = sigmas.detach().cpu()
    if not sigmas.is_floating_point():
        sigmas = sigmas.float()
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    return sigma_min.clone(), sigmas[0].clone()


@torch.no_grad()
@traits(takes_noise_sampler=True)
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0., s_noise=1.,
                    noise_sampler=None):
    """DPM-Solver-fast (Lu et al. 2022, Sec. 3.4): len(sigmas) - 1 model calls, orders 3,...,3,(2,1) evenly in t."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    sigma_min, sigma_max = _end_sigmas(sigmas)
    if sigma_min <= 0:
        raise ValueError("sigmas: dpm_fast needs a positive smallest sigma")
    nfe = len(sigmas) - 1
    solver = _DPMSolver(model, extra_args)
    t_start, t_end = solver.t(sigma_max), solver.t(sigma_min)
    m = nfe // 3 + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, dtype=t_start.dtype)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i in step_range(len(orders), disable):
        t, t_next = ts[i], ts[i + 1]
        t_next_, sigma_up = solver.ancestral(t, t_next, t_end, eta)
        eps = solver.eps(x, t)
        if callback is not None:
            sig = float(solver.sigma(t))
            callback({"x": x, "i": i, "sigma": sig, "sigma_hat": sig, "denoised": x - solver.sigma(t) * eps})
        if orders[i] == 1:
            x = solver.step_1(x, t, t_next_, eps)
        elif orders[i] == 2:
            x = solver.step_2(x, t, t_next_, eps)
        else:
            x = solver.step_3(x, t, t_next_, eps)
        if sigma_up:
            noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
            x = x + noise_sampler(solver.sigma(t), solver.sigma(t_next)) * (sigma_up * s_noise)
    return x


class _PIDController:
    """PID step-size control for adaptive ODE solvers (Söderlind 2003), as DPM-Solver's adaptive mode uses it."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs = []

    def propose_step(self, error) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        try:
            factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        except (OverflowError, ZeroDivisionError):
            factor = math.nan
        if not math.isfinite(factor):   # large coefficients: the same product in logs (atan saturates anyway)
            logs = sum(b * math.log(max(e, 1e-300)) for e, b in zip(self.errs, (self.b1, self.b2, self.b3)))
            factor = math.exp(min(logs, 700.0))
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


# a default run takes tens of steps; a run that takes this many is not converging (and would not end)
_MAX_ADAPTIVE_STEPS = 10000


def _not_converging(steps: int, sigma: float, h: float, *settings) -> KSamplerInputError:
    names = ("rtol", "atol", "pcoeff", "icoeff", "dcoeff", "accept_safety")
    given = ", ".join(f"{name}={value:g}" for name, value in zip(names, settings))
    what = "its step size fell below float32's resolution" if steps < _MAX_ADAPTIVE_STEPS else \
        f"it took {steps} steps without reaching the end"
    return KSamplerInputError(
        f"sampler_options: dpm_adaptive's step-size control does not converge with {given}: {what} (at sigma "
        f"{sigma:.4g}, step size {h:.3g}); use the defaults (rtol 0.05, atol 0.0078, pcoeff 0, icoeff 1, dcoeff 0, "
        "accept_safety 0.81), loosen rtol / atol, or choose another sampler")


@torch.no_grad()
@traits(batch_coupled=True, takes_noise_sampler=True)
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, rtol=0.05,
                        atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81, eta=0.,
                        s_noise=1., noise_sampler=None, return_info=False):
    """DPM-Solver-12/23 with adaptive steps (Lu et al. 2022, Sec. 3.4); the step count ignores len(sigmas)."""
    if order not in (2, 3):
        raise ValueError(f"order: must be 2 or 3, got {order}")
    if len(sigmas) <= 1:
        return (x, {}) if return_info else x
    extra_args = {} if extra_args is None else extra_args
    sigma_min, sigma_max = _end_sigmas(sigmas)
    if sigma_min <= 0:
        raise ValueError("sigmas: dpm_adaptive needs a positive smallest sigma")
    solver = _DPMSolver(model, extra_args)
    t_start, t_end = solver.t(sigma_max), solver.t(sigma_min)
    forward = bool(t_end > t_start)
    if not forward and eta:
        raise ValueError("eta: must be 0 for reverse sampling")
    pid = _PIDController(abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff, 1.5 if eta else order,
                         accept_safety)
    atol_t, rtol_t = torch.tensor(atol, dtype=x.dtype), torch.tensor(rtol, dtype=x.dtype)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    s, x_prev = t_start, x
    while bool(s < t_end - 1e-5) if forward else bool(s > t_end + 1e-5):
        t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
        t_, sigma_up = solver.ancestral(s, t, t_end, eta, forward)
        if bool(t_ == s) or info["steps"] >= _MAX_ADAPTIVE_STEPS:
            raise _not_converging(info["steps"], float(solver.sigma(s)), pid.h, rtol, atol, pcoeff, icoeff, dcoeff,
                                  accept_safety)
        eps = solver.eps(x, s)
        denoised = x - solver.sigma(s) * eps
        cache = {}
        if order == 2:
            x_low = solver.step_1(x, s, t_, eps)
            x_high = solver.step_2(x, s, t_, eps, cache=cache)
        else:
            x_low = solver.step_2(x, s, t_, eps, r1=1 / 3, cache=cache)
            x_high = solver.step_3(x, s, t_, eps, cache=cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high
            if sigma_up:
                noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
                x = x + noise_sampler(solver.sigma(s), solver.sigma(t)) * (sigma_up * s_noise)
            s = t
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
        info["nfe"] += order
        info["steps"] += 1
        if callback is not None:
            sig = float(solver.sigma(s))
            callback({"x": x, "i": info["steps"] - 1, "sigma": sig, "sigma_hat": sig, "denoised": denoised,
                      "error": float(error), "h": pid.h, **info})
    return (x, info) if return_info else x


@torch.no_grad()
@traits(noise="ancestral")
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None):
    """Ancestral DPM-Solver++(2S): a half-log-SNR midpoint step to sigma_down, then re-noise."""
    extra_args = {} if extra_args is None else extra_args
    ms, noise_sampler, sig_t, sig, downs_t, ups, scales = ancestral_schedule(model, x, sigmas, extra_args, eta,
                                                                             noise_sampler)
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma), **extra_args)
        sigma_down_t, sigma_up, scale = downs_t[i], ups[i], scales[i]
        sigma_down = float(sigma_down_t)
        emit(callback, x, i, sigma, denoised)
        if sigma_next == 0 or sigma_down == 0:
            x = torch.lerp(x, denoised, 1.0 - sigma_down / sigma)
        else:
            sigma_s = float(ms.midpoint_sigma(sig_t[i], sigma_down_t, 0.5))
            x_2 = torch.lerp(x, denoised, 1.0 - sigma_s / sigma)
            denoised_2 = model(x_2, sigma_batch(x, sigma_s), **extra_args)
            x = torch.lerp(x, denoised_2, 1.0 - sigma_down / sigma)
        if sigma_next > 0 and eta > 0:
            x = renoise(x, scale, noise_sampler(sigma, sigma_next), s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), in t = -log sigma.

    Step scalars are 0-d tensors at the schedule's precision, combined in k-diffusion's order (which ComfyUI
    shares), so closely spaced steps round the same way.
    """
    extra_args = {} if extra_args is None else extra_args
    sigmas = sigmas.detach().cpu()
    old_denoised = None
    for i in step_range(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(model, x, i, float(sigma), extra_args, callback)
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = -sigma.log(), -sigma_next.log()
            h = t_next - t
            decay, weight = float((-t_next).exp() / (-t).exp()), float((-h).expm1())
            if old_denoised is None:
                step = denoised * weight
            else:
                r = (t - -sigmas[i - 1].log()) / h
                step = denoised * float(1 + 1 / (2 * r))
                step.sub_(old_denoised * float(1 / (2 * r))).mul_(weight)
            x = (x * decay).sub_(step)   # in place on fresh tensors only: the same roundings, fewer allocations
        old_denoised = denoised
    return x


def res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta, cfg_pp):
    """Second-order refined exponential solver in t = -log sigma, with optional ancestral noise and CFG++.

    The step's scalars are 0-d tensors at the schedule's precision, combined in the reference's order: on
    closely spaced steps c2 is ill-conditioned and float32 rounding shows in the result.
    """
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    sigmas = sigmas.detach().cpu()
    old_sigma_down = old_denoised = None
    for i in step_range(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if cfg_pp:
            denoised, uncond = denoise_with_uncond(model, x, float(sigma), extra_args)
        else:
            denoised = uncond = model(x, sigma_batch(x, float(sigma)), **extra_args)
        sigma_down, sigma_up, scale = ms.ancestral_step(sigma, sigma_next, eta)
        sigma_down = torch.as_tensor(sigma_down, dtype=sigmas.dtype)
        emit(callback, x, i, float(sigma), denoised)
        if sigma_down == 0 or old_denoised is None:
            d = (x - uncond) / float(sigma)
            x = denoised + d * float(sigma_down) if cfg_pp else x + d * float(sigma_down - sigma)
        else:
            t, t_old, t_next, t_prev = (-s.log() for s in (sigma, old_sigma_down, sigma_down, sigmas[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi_1 = torch.expm1(-h) / -h
            phi_2 = (phi_1 - 1.0) / -h
            b1 = torch.nan_to_num(phi_1 - phi_2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi_2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
            x = float((-h).exp()) * x + float(h) * (float(b1) * uncond + float(b2) * old_denoised)
        if sigma_next > 0 and sigma_up > 0:
            noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
            noise = noise_sampler(float(sigma), float(sigma_next))
            if scale == 1.0:
                x = x + noise * s_noise * float(sigma_up)
            else:
                x = renoise(x, float(scale), noise, s_noise * float(sigma_up))
        old_denoised = uncond
        old_sigma_down = sigma_down
    return x


@torch.no_grad()
@traits(takes_noise_sampler=True)
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                         noise_sampler=None):
    """RES second-order multistep (Zhang et al. 2023)."""
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, 0.0, False)


@torch.no_grad()
@traits(noise="ancestral")
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                   s_noise=1., noise_sampler=None):
    """RES multistep with ancestral noise."""
    return res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta, False)

