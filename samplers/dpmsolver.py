"""Exponential-integrator samplers: DPM-Solver, DPM-Solver++, RES, SEEDS, ER-SDE and SA-Solver.

They step in half-log-SNR ``lambda = log(alpha / sigma)`` through the
model-sampling object, so flow models get flow geometry (``alpha = 1 - sigma``).
"""
from __future__ import annotations

import math

import torch

from ._common import (as_float_list, denoise_with_uncond, emit, get_model_sampling, renoise, resolve_noise_sampler,
                      sigma_batch, step_range)
from .noise import BrownianTreeNoiseSampler
from .traits import traits


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
class _LazyNoise:
    """Build a noise sampler on first use, so runs that never need noise (eta = 0) never pay for it."""

    def __init__(self, factory):
        self.factory, self.sampler = factory, None

    def __call__(self, sigma, sigma_next):
        if self.sampler is None:
            self.sampler = self.factory()
        return self.sampler(sigma, sigma_next)


def _brownian(noise_sampler, x, sigmas, extra_args, cpu=True):
    """The caller's noise sampler, or a lazily built Brownian tree over the positive sigma range (ComfyUI's default)."""
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    sigma_min, sigma_max = positive.min(), sigmas.max()
    return _LazyNoise(lambda: BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=extra_args.get("seed"), cpu=cpu))


def _neg_expm1(v: float) -> float:
    """1 - exp(-v)."""
    return -math.expm1(-v)


# ----------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022): fixed-step "fast" and adaptive variants, in t = -log sigma.
# Times are float32 0-d tensors, as in the reference implementation: the adaptive step
# controller reacts to rounding-level differences, so the same arithmetic gives the same steps.
# ----------------------------------------------------------------------------------------------
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
        sigma_up = torch.minimum(s_next, eta * (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
        sigma_down = (s_next ** 2 - sigma_up ** 2) ** 0.5
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
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
@traits(batch_coupled=True)
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


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022b)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
@traits(noise="ancestral")
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None):
    """Ancestral DPM-Solver++(2S): a half-log-SNR midpoint step to sigma_down, then re-noise."""
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sig_t = sigmas.detach().cpu()
    sig = as_float_list(sigmas)
    downs_t, ups, scales = ms.ancestral_steps(sig_t, eta)
    ups, scales = as_float_list(ups), as_float_list(scales)
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


def _ve_ancestral(sigma_from, sigma_to, eta):
    """k-diffusion's VE ancestral split, on 0-d tensors or floats."""
    if not eta:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


@torch.no_grad()
@traits(noise="brownian")
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++ (stochastic, 2 stages per step) with Brownian noise (Lu et al. 2022b; k-diffusion)."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(noise_sampler, x, sigmas, extra_args)
    return _dpmpp_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r)


@torch.no_grad()
@traits(noise="brownian_device")
def sample_dpmpp_sde_gpu(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                         noise_sampler=None, r=1 / 2):
    """dpmpp_sde with its Brownian tree built on the sampling device."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(noise_sampler, x, sigmas, extra_args, cpu=False)
    return _dpmpp_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r)


def _dpmpp_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r):
    ms = get_model_sampling(model)
    # The stage sigma is computed in float32 exactly as ComfyUI does: the Brownian tree is queried there.
    sigmas = ms.offset_first_sigma(sigmas.detach().cpu())
    inject = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in step_range(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(x, float(sigma)), **extra_args)
        emit(callback, x, i, float(sigma), denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lambda_s, lambda_t = ms.half_log_snr(sigma), ms.half_log_snr(sigma_next)
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = ms.sigma_from_half_log_snr(lambda_s_1)
        alpha_s, alpha_s_1, alpha_t = ms.alpha(float(sigma)), ms.alpha(float(sigma_s_1)), ms.alpha(float(sigma_next))

        # stage 1: to lambda_s_1 (ancestral split in the VE-equivalent sigma exp(-lambda))
        sd, su = _ve_ancestral(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
        h_ = float(sd.log().neg() - lambda_s)
        x_2 = x * (alpha_s_1 / alpha_s * math.exp(-h_)) + denoised * (alpha_s_1 * _neg_expm1(h_))
        if inject:
            x_2 = x_2 + noise_sampler(sigma, sigma_s_1) * (alpha_s_1 * s_noise * float(su))
        denoised_2 = model(x_2, sigma_batch(x, float(sigma_s_1)), **extra_args)

        # stage 2: to lambda_t with the combined estimate
        sd, su = _ve_ancestral(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h_ = float(sd.log().neg() - lambda_s)
        denoised_d = torch.lerp(denoised, denoised_2, fac)
        x = x * (alpha_t / alpha_s * math.exp(-h_)) + denoised_d * (alpha_t * _neg_expm1(h_))
        if inject:
            x = x + noise_sampler(sigma, sigma_next) * (alpha_t * s_noise * float(su))
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
        denoised = model(x, sigma_batch(x, float(sigma)), **extra_args)
        emit(callback, x, i, float(sigma), denoised)
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


def _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, order,
                         solver_type="midpoint"):
    """DPM-Solver++(2M/3M) SDE in half-log-SNR (Lu et al. 2022b; Gonzalez et al. 2023 for the 3M terms)."""
    ms = get_model_sampling(model)
    sig = as_float_list(ms.offset_first_sigma(sigmas.detach().cpu()))
    inject = eta > 0 and s_noise > 0
    history, hs = [], []  # previous denoised estimates and steps, newest first
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma), **extra_args)
        emit(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = ms.half_log_snr(sigma_next) - ms.half_log_snr(sigma)
            h_eta = h * (eta + 1)
            alpha_t = ms.alpha(sigma_next)
            phi_1 = _neg_expm1(h_eta)  # 1 - exp(-h_eta)
            # x_next = a x + sum_k c_k D_k (+ noise): the multistep terms are collected into one weight per
            # denoised estimate, so the update is one pass per tensor
            weights = [alpha_t * phi_1, 0.0, 0.0]  # on denoised, history[0], history[1]
            if order == 3 and len(history) >= 2:
                r0, r1 = hs[0] / h, hs[1] / h
                phi_2 = -phi_1 / h_eta + 1  # expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                # d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1), d2 = (d1_0 - d1_1) / (r0 + r1),
                # d1_0 = (D - D_1) / r0, d1_1 = (D_1 - D_2) / r1; x += alpha_t (phi_2 d1 - phi_3 d2)
                u = alpha_t * (phi_2 * (1 + r0 / (r0 + r1)) - phi_3 / (r0 + r1))
                v = alpha_t * (-phi_2 * r0 / (r0 + r1) + phi_3 / (r0 + r1))
                weights = [weights[0] + u / r0, -u / r0 + v / r1, -v / r1]
            elif len(history) >= 1:
                r = hs[0] / h
                if order == 3 or solver_type == "heun":
                    coeff = alpha_t * (1 - phi_1 / h_eta)  # alpha_t * phi_2
                else:  # midpoint
                    coeff = 0.5 * alpha_t * phi_1
                weights = [weights[0] + coeff / r, -coeff / r, 0.0]
            x = torch.mul(x, sigma_next / sigma * math.exp(-h * eta)).add_(denoised, alpha=weights[0])
            for weight, older in zip(weights[1:], history):
                if weight:
                    x.add_(older, alpha=weight)
            if inject:
                x.add_(noise_sampler(sigma, sigma_next), alpha=sigma_next * math.sqrt(_neg_expm1(2 * h * eta)) * s_noise)
            hs.insert(0, h)
        history.insert(0, denoised)
        del history[2:], hs[2:]
    return x


def _dpmpp_multistep_sde_float32(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, order,
                                 solver_type="midpoint"):
    """The same update with ComfyUI's numerics (with its Brownian tree, and in compat mode): float32 0-d scalars,
    alpha_t = sigma e^lambda, and the divided differences formed tensor by tensor, in the reference's order."""
    ms = get_model_sampling(model)
    sigmas = ms.offset_first_sigma(sigmas.detach().cpu())
    inject = eta > 0 and s_noise > 0
    history, hs = [], []  # previous denoised estimates and steps, newest first
    for i in step_range(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(x, float(sigma)), **extra_args)
        emit(callback, x, i, float(sigma), denoised)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = ms.half_log_snr(sigma), ms.half_log_snr(sigma_next)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * lambda_t.exp()
            neg_expm1 = (-h_eta).expm1().neg()
            x = float(sigma_next / sigma * (-h * eta).exp()) * x + float(alpha_t * neg_expm1) * denoised
            if order == 3 and len(history) >= 2:
                r0, r1 = hs[0] / h, hs[1] / h
                d1_0 = (denoised - history[0]) / float(r0)
                d1_1 = (history[0] - history[1]) / float(r1)
                d1 = d1_0 + (d1_0 - d1_1) * float(r0) / float(r0 + r1)
                d2 = (d1_0 - d1_1) / float(r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + float(alpha_t * phi_2) * d1 - float(alpha_t * phi_3) * d2
            elif len(history) >= 1:
                r = hs[0] / h
                if order == 3:
                    d = (denoised - history[0]) / float(r)
                    x = x + float(alpha_t * (h_eta.neg().expm1() / h_eta + 1)) * d
                elif solver_type == "heun":
                    x = x + float(alpha_t * (neg_expm1 / -h_eta + 1)) * float(1 / r) * (denoised - history[0])
                else:
                    x = x + float(0.5 * alpha_t * neg_expm1) * float(1 / r) * (denoised - history[0])
            if inject:
                x = x + noise_sampler(float(sigma), float(sigma_next)) * float(sigma_next) * \
                    float((-2 * h * eta).expm1().neg().sqrt()) * s_noise
            hs.insert(0, h)
        history.insert(0, denoised)
        del history[2:], hs[2:]
    return x


def _make_dpmpp_msde(order, solver_type, cpu, noise_kind, doc):
    """The sampler: with ComfyUI's Brownian tree (the default) its update follows the reference's arithmetic, so
    the latent is ComfyUI's; with other noise (the fast Brownian path) it runs fused, one pass per tensor."""
    def pick(noise_sampler):
        reference = noise_sampler is None or getattr(noise_sampler, "reference_noise", False)
        return _dpmpp_multistep_sde_float32 if reference else _dpmpp_multistep_sde

    def make(update):
        @torch.no_grad()
        @traits(noise=noise_kind, comfy_rounding=True)
        def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                    noise_sampler=None, solver_type=solver_type):
            if len(sigmas) <= 1:
                return x
            if solver_type not in ("heun", "midpoint"):
                raise ValueError(f"solver_type: must be 'heun' or 'midpoint', got {solver_type!r}")
            extra_args = {} if extra_args is None else extra_args
            step = update or pick(noise_sampler)
            noise_sampler = _brownian(noise_sampler, x, sigmas, extra_args, cpu=cpu)
            return step(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, order,
                        solver_type)
        sampler.__doc__ = doc
        return sampler
    sampler = make(None)
    sampler.comfy_variant = make(_dpmpp_multistep_sde_float32)
    return sampler


sample_dpmpp_2m_sde = _make_dpmpp_msde(2, "midpoint", True, "brownian", "DPM-Solver++(2M) SDE, midpoint correction (Lu et al. 2022b).")
sample_dpmpp_2m_sde_gpu = _make_dpmpp_msde(2, "midpoint", False, "brownian_device", "dpmpp_2m_sde with its Brownian tree on the sampling device.")
sample_dpmpp_2m_sde_heun = _make_dpmpp_msde(2, "heun", True, "brownian", "DPM-Solver++(2M) SDE, Heun correction (Lu et al. 2022b).")
sample_dpmpp_2m_sde_heun_gpu = _make_dpmpp_msde(2, "heun", False, "brownian_device", "dpmpp_2m_sde_heun with its Brownian tree on the sampling device.")
sample_dpmpp_3m_sde = _make_dpmpp_msde(3, "heun", True, "brownian", "DPM-Solver++(3M) SDE (Lu et al. 2022b; third-order multistep, k-diffusion).")
sample_dpmpp_3m_sde_gpu = _make_dpmpp_msde(3, "heun", False, "brownian_device", "dpmpp_3m_sde with its Brownian tree on the sampling device.")


@torch.no_grad()
def sample_dpmpp_3m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(3M), the ODE (eta = 0) form of the third-order multistep solver (Lu et al. 2022b)."""
    extra_args = {} if extra_args is None else extra_args
    return _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, disable, 0.0, 0.0, None, 3)


# ----------------------------------------------------------------------------------------------
# RES multistep (Zhang et al. 2023, arXiv:2308.02157)
# ----------------------------------------------------------------------------------------------
def _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta, cfg_pp):
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
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                         noise_sampler=None):
    """RES second-order multistep (Zhang et al. 2023)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, 0.0, False)


@torch.no_grad()
@traits(noise="ancestral", comfy_compat=True)
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                   s_noise=1., noise_sampler=None):
    """RES multistep with ancestral noise."""
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta, False)


# ----------------------------------------------------------------------------------------------
# SEEDS (Gonzalez et al. 2023, arXiv:2305.14267) and the exponential Heun method
# ----------------------------------------------------------------------------------------------
def _seeds_2(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r, solver_type):
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"solver_type: must be 'phi_1' or 'phi_2', got {solver_type!r}")
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    inject = eta > 0 and s_noise > 0
    if inject:
        noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sig_t = ms.offset_first_sigma(sigmas.detach().cpu())
    sig = as_float_list(sig_t)
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma), **extra_args)
        emit(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lam_s_t, lam_t_t = ms.half_log_snr(sig_t[i]), ms.half_log_snr(sig_t[i + 1])
        lambda_s, lambda_t = float(lam_s_t), float(lam_t_t)
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        sigma_s_1 = float(ms.sigma_from_half_log_snr(torch.lerp(lam_s_t, lam_t_t, r)))
        alpha_s_1, alpha_t = ms.alpha(sigma_s_1), ms.alpha(sigma_next)

        x_2 = x * (sigma_s_1 / sigma * math.exp(-r * h * eta)) + denoised * (alpha_s_1 * _neg_expm1(r * h_eta))
        if inject:
            sde_noise = noise_sampler(sigma, sigma_s_1) * math.sqrt(_neg_expm1(2 * r * h * eta))
            x_2 = x_2 + sde_noise * (sigma_s_1 * s_noise)
        denoised_2 = model(x_2, sigma_batch(x, sigma_s_1), **extra_args)

        decay = sigma_next / sigma * math.exp(-h * eta)
        if solver_type == "phi_1":
            x = x * decay + torch.lerp(denoised, denoised_2, 1 / (2 * r)) * (alpha_t * _neg_expm1(h_eta))
        else:  # phi_2: exponential-integrator weights for a linear-in-lambda denoised estimate
            v = -h_eta
            b2 = (math.expm1(v) - v) / v / r
            b1 = math.expm1(v) - b2
            x = x * decay - denoised * (alpha_t * b1) - denoised_2 * (alpha_t * b2)
        if inject:
            seg = (r - 1) * h * eta
            sde_noise = sde_noise * math.exp(seg) + noise_sampler(sigma_s_1, sigma_next) * math.sqrt(-math.expm1(2 * seg))
            x = x + sde_noise * (sigma_next * s_noise)
    return x


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
