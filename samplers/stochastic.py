"""SDE solvers in half-log-SNR time: SEEDS-3, ER-SDE and SA-Solver; and the discrete DDPM / LCM / TCD steps."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import as_float_list, emit, get_model_sampling, resolve_noise_sampler, sigma_batch, step_range
from .traits import traits


def _neg_expm1(v: float) -> float:
    return -math.expm1(-v)


def _phi_2(v: float) -> float:
    """h * phi_2(h) = (e^h - 1 - h) / h."""
    return (math.expm1(v) - v) / v


@torch.no_grad()
@traits(noise="ancestral")
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                   noise_sampler=None, r_1=1. / 3, r_2=2. / 3):
    """SEEDS-3: stochastic explicit exponential derivative-free solver, 3 stages (Gonzalez et al. 2023)."""
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
        sigma_1 = float(ms.sigma_from_half_log_snr(torch.lerp(lam_s_t, lam_t_t, r_1)))
        sigma_2 = float(ms.sigma_from_half_log_snr(torch.lerp(lam_s_t, lam_t_t, r_2)))
        alpha_1, alpha_2, alpha_t = ms.alpha(sigma_1), ms.alpha(sigma_2), ms.alpha(sigma_next)

        x_2 = x * (sigma_1 / sigma * math.exp(-r_1 * h * eta)) + denoised * (alpha_1 * _neg_expm1(r_1 * h_eta))
        if inject:
            sde_noise = noise_sampler(sigma, sigma_1) * math.sqrt(_neg_expm1(2 * r_1 * h * eta))
            x_2 = x_2 + sde_noise * (sigma_1 * s_noise)
        denoised_2 = model(x_2, sigma_batch(x, sigma_1), **extra_args)

        a3_2 = r_2 / r_1 * _phi_2(-r_2 * h_eta)
        a3_1 = math.expm1(-r_2 * h_eta) - a3_2
        x_3 = x * (sigma_2 / sigma * math.exp(-r_2 * h * eta)) - denoised * (alpha_2 * a3_1) - denoised_2 * (alpha_2 * a3_2)
        if inject:
            seg = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * math.exp(seg) + noise_sampler(sigma_1, sigma_2) * math.sqrt(-math.expm1(2 * seg))
            x_3 = x_3 + sde_noise * (sigma_2 * s_noise)
        denoised_3 = model(x_3, sigma_batch(x, sigma_2), **extra_args)

        b3 = _phi_2(-h_eta) / r_2
        b1 = math.expm1(-h_eta) - b3
        x = x * (sigma_next / sigma * math.exp(-h * eta)) - denoised * (alpha_t * b1) - denoised_3 * (alpha_t * b3)
        if inject:
            seg = (r_2 - 1) * h * eta
            sde_noise = sde_noise * math.exp(seg) + noise_sampler(sigma_2, sigma_next) * math.sqrt(-math.expm1(2 * seg))
            x = x + sde_noise * (sigma_next * s_noise)
    return x


def _er_sde_noise_scaler(v):
    """ER-SDE's default noise scale function (Cui et al. 2023, eq. 18): v (e^(v^0.3) + 10)."""
    return v * ((v ** 0.3).exp() + 10.0) if isinstance(v, torch.Tensor) else v * (math.exp(v ** 0.3) + 10.0)


@torch.no_grad()
@traits(noise="ancestral")
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None,
                  noise_scaler=None, max_stage=3):
    """Extended reverse-time SDE solver, VP ER-SDE-Solver-3 (Cui et al. 2023, arXiv:2309.06169)."""
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    noise_scaler = _er_sde_noise_scaler if noise_scaler is None else noise_scaler
    if s_noise > 0:
        noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sigmas = ms.offset_first_sigma(sigmas.detach().cpu())
    sig = as_float_list(sigmas)
    # lambda_er = sigma / alpha (the VE-equivalent noise level).  The step's scalars stay 0-d tensors at the
    # schedule's precision: the divided differences below amplify their rounding on closely spaced steps.
    er_lambdas = ms.half_log_snr(sigmas).neg().exp()
    n_points = 200
    point_index = torch.arange(0, n_points, dtype=er_lambdas.dtype)
    old_denoised = old_denoised_d = None
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma), **extra_args)
        emit(callback, x, i, sigma, denoised)
        stage = min(max_stage, i + 1)
        if sigma_next == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = noise_scaler(lam_t) / noise_scaler(lam_s)
            x = x * float(alpha_t / alpha_s * r) + denoised * float(alpha_t * (1 - r))
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / n_points
                pos = lam_t + point_index * step
                scaled = noise_scaler(pos)
                s_1 = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / float(lam_s - er_lambdas[i - 1])
                x = x + denoised_d * float(alpha_t * (dt + s_1 * noise_scaler(lam_t)))
                if stage >= 3:
                    s_u = torch.sum((pos - lam_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / float((lam_s - er_lambdas[i - 2]) / 2)
                    x = x + denoised_u * float(alpha_t * (dt ** 2 / 2 + s_u * noise_scaler(lam_t)))
                old_denoised_d = denoised_d
            if s_noise > 0:
                amount = float((lam_t ** 2 - lam_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0))
                x = x + noise_sampler(sigma, sigma_next) * float(alpha_t) * s_noise * amount
        old_denoised = denoised
    return x


# ----------------------------------------------------------------------------------------------
# SA-Solver (Xue et al. 2023, arXiv:2309.05019)
# ----------------------------------------------------------------------------------------------
def _sa_exponential_moments(s: Tensor, t: Tensor, order: int, tau: float) -> Tensor:
    """(1 + tau^2) * integral_s^t exp((1 + tau^2)(u - t)) u^p du, p = 0..order-1, by integration by parts."""
    a = 1.0 + tau ** 2
    decay = torch.exp(-a * (t - s))
    moments = []
    for p in range(order):
        boundary = t ** p - s ** p * decay
        moments.append(boundary - (p / a) * moments[-1] if p else boundary)
    return torch.stack(moments)


def sa_solver_coefficients(sigma_next: Tensor, lambdas: Tensor, lambda_s: Tensor, lambda_t: Tensor,
                           tau: float) -> Tensor:
    """SA-Solver b_i (Xue et al. 2023, eqs. 15 and 18): integrals of the Lagrange basis over [lambda_s, lambda_t].

    Computed at the precision of the schedule (float32 in ComfyUI): on closely spaced steps the Vandermonde
    system is ill-conditioned, and the same arithmetic keeps the same answer.
    """
    order = lambdas.shape[0]
    moments = _sa_exponential_moments(lambda_s, lambda_t, order, tau)
    vander_t = torch.vander(lambdas, order, increasing=True).T
    return sigma_next * lambda_t.exp() * torch.linalg.solve(vander_t, moments)


def _sa_tau(start_sigma: float, end_sigma: float, eta: float = 1.0):
    """SA-Solver's stochasticity: eta inside the [end_sigma, start_sigma] band, an ODE outside it."""
    def tau(sigma: float) -> float:
        if eta <= 0:
            return 0.0
        return eta if start_sigma >= sigma >= end_sigma else 0.0
    return tau


@torch.no_grad()
@traits(noise="ancestral")
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=False, tau_func=None, s_noise=1.0,
                     noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False):
    """Stochastic Adams predictor-corrector (Xue et al. 2023), data prediction in half-log-SNR."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    sig_t = ms.offset_first_sigma(sigmas.detach().cpu())
    sig = as_float_list(sig_t)
    lambdas = ms.half_log_snr(sig_t)  # +inf at sigma 0, never used in a solve
    precise = []   # (sigmas, lambdas) in float64, built if a float32 system turns out singular

    def coefficients(j: int, lo: int, hi: int, s: int, t: int, tau: float) -> Tensor:
        b = None
        try:
            b = sa_solver_coefficients(sig_t[j], lambdas[lo:hi], lambdas[s], lambdas[t], tau)
        except torch.linalg.LinAlgError:
            pass
        if b is None or not bool(torch.isfinite(b).all()):
            # float32 cannot resolve these closely spaced noise levels (ComfyUI fails here): solve in float64
            if not precise:
                precise.append((sig_t.double(), ms.half_log_snr(sig_t.double())))
            sig64, lam64 = precise[0]
            b = sa_solver_coefficients(sig64[j], lam64[lo:hi], lam64[s], lam64[t], tau)
        return b

    if tau_func is None:
        tau_func = _sa_tau(ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8), eta=1.0)
    max_order = max(predictor_order, corrector_order)
    x_pred, h, tau, noise = x, 0.0, 0.0, None
    history = []
    lower_order_to_end = sig[-1] == 0
    n = len(sig) - 1
    for i in step_range(n, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x_pred, sigma_batch(x, sigma), **extra_args)
        emit(callback, x_pred, i, sigma, denoised)
        history.append(denoised)
        del history[:-max_order]

        p_order = min(predictor_order, len(history))
        c_order = 0 if i == 0 or (sigma_next == 0 and not use_pece) else min(corrector_order, len(history))
        if lower_order_to_end:
            p_order = min(p_order, n - 1 - i)
            c_order = min(c_order, n - i)

        if c_order == 0:
            x = x_pred
        else:
            b = coefficients(i, i - c_order + 1, i + 1, i - 1, i, tau)
            corr = history[-c_order] * float(b[0])
            for k in range(1, c_order):
                corr = corr + history[-c_order + k] * float(b[k])
            x = x * (sigma / sig[i - 1] * math.exp(-(tau ** 2) * h)) + corr
            if tau > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                denoised = model(x, sigma_batch(x, sigma), **extra_args)
                history[-1] = denoised

        if sigma_next == 0:
            x_pred = denoised
            continue
        tau = tau_func(sigma_next)
        b = coefficients(i + 1, i - p_order + 1, i + 1, i, i + 1, tau)
        pred = history[-p_order] * float(b[0])
        for k in range(1, p_order):
            pred = pred + history[-p_order + k] * float(b[k])
        h = float(lambdas[i + 1] - lambdas[i])
        x_pred = x * (sigma_next / sigma * math.exp(-(tau ** 2) * h)) + pred
        if tau > 0 and s_noise > 0:
            noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
            noise = noise_sampler(sigma, sigma_next) * (sigma_next * math.sqrt(_neg_expm1(2 * tau ** 2 * h)) * s_noise)
            x_pred = x_pred + noise
    return x_pred


@torch.no_grad()
@traits(noise="ancestral")
def sample_sa_solver_pece(model, x, sigmas, extra_args=None, callback=None, disable=False, tau_func=None,
                          s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4):
    """SA-Solver in PECE mode: the corrected state is evaluated again (Xue et al. 2023)."""
    return sample_sa_solver(model, x, sigmas, extra_args, callback, disable, tau_func, s_noise, noise_sampler,
                            predictor_order, corrector_order, use_pece=True)


# ----------------------------------------------------------------------------------------------
# Discrete-step samplers
# ----------------------------------------------------------------------------------------------
def _vp_norm(ms, sigma: float) -> float:
    """sqrt(alpha^2 + sigma^2): the factor that maps the sampler's state to a variance-preserving one."""
    return math.sqrt(ms.alpha(sigma) ** 2 + sigma ** 2)


@torch.no_grad()
@traits(noise="ancestral", comfy_compat=True)
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) on the VP form of the state."""
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sig = as_float_list(sigmas)
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
    extra_args = {} if extra_args is None else extra_args
    ms = get_model_sampling(model)
    noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sig = as_float_list(sigmas)
    for i in step_range(len(sig) - 1, disable):
        denoised = model(x, sigma_batch(x, sig[i]), **extra_args)
        emit(callback, x, i, sig[i], denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = ms.noise_scaling(sig[i + 1], noise_sampler(sig[i], sig[i + 1]), x)
    return x


@torch.no_grad()
@traits(noise="ancestral")
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, gamma=0.3):
    """Trajectory-consistency distillation sampling (Zheng et al. 2024, Alg. 4): strategic stochastic steps.

    From sigma_t it predicts x0, moves deterministically (DDIM) to the
    intermediate sigma_s with (1 - gamma) of the way's progress in time, then
    re-noises to sigma_next.  gamma = 0 is DDIM; gamma = 1 is LCM.
    """
    extra_args = {} if extra_args is None else extra_args
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: must lie in [0, 1], got {gamma}")
    ms = get_model_sampling(model)
    noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sig = as_float_list(sigmas)
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma), **extra_args)
        emit(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        t_next = float(ms.timestep(torch.tensor(sigma_next)))
        sigma_s = sigma_next if gamma == 0.0 else min(float(ms.sigma(torch.tensor((1 - gamma) * t_next))), sigma_next)
        eps = (x - denoised * ms.alpha(sigma)) / sigma
        x_s = denoised * ms.alpha(sigma_s) + eps * sigma_s
        if sigma_s >= sigma_next or gamma == 0.0:
            x = x_s
            continue
        # forward-diffuse x_s from sigma_s to sigma_next (VP form keeps the marginal exact)
        vs, vn = _vp_norm(ms, sigma_s), _vp_norm(ms, sigma_next)
        ab_s, ab_n = (ms.alpha(sigma_s) / vs) ** 2, (ms.alpha(sigma_next) / vn) ** 2
        ratio = ab_n / ab_s
        x = (x_s / vs * math.sqrt(ratio) + noise_sampler(sigma, sigma_next) * math.sqrt(1 - ratio)) * vn
    return x
