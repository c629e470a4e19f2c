"""SDE solvers in half-log-SNR time with Brownian or Gaussian noise: DPM-Solver++ SDE, ER-SDE and SA-Solver.

Holds: dpmpp_sde, dpmpp_sde_gpu, dpmpp_2m_sde, dpmpp_2m_sde_gpu, dpmpp_2m_sde_heun, dpmpp_2m_sde_heun_gpu,
dpmpp_3m_sde, dpmpp_3m_sde_gpu, dpmpp_3m (the eta = 0 form of the same multistep loop), er_sde, sa_solver,
sa_solver_pece; and ``brownian_noise``, the lazily built Brownian tree they default to.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.sampling import ve_ancestral_split
from ._common import (as_float_list, denoise_at, emit, get_model_sampling, neg_expm1, resolve_noise_sampler, sigma_batch,
                      step_range)
from .noise import BrownianTreeNoiseSampler
from .traits import traits


class _LazyNoise:
    """Build a noise sampler on first use, so runs that never need noise (eta = 0) never pay for it."""

    def __init__(self, factory):
        self.factory, self.sampler = factory, None

    def __call__(self, sigma, sigma_next):
        if self.sampler is None:
            self.sampler = self.factory()
        return self.sampler(sigma, sigma_next)


def brownian_noise(noise_sampler, x, sigmas, extra_args, cpu=True):
    """The caller's noise sampler, or a lazily built Brownian tree over the positive sigma range (ComfyUI's default)."""
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    sigma_min, sigma_max = positive.min(), sigmas.max()
    return _LazyNoise(lambda: BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=extra_args.get("seed"), cpu=cpu))



def _dpmpp_sde_sampler(name: str, tree_on_cpu: bool, doc: str):
    """A dpmpp_sde entry; ``tree_on_cpu`` says where its default Brownian tree lives (the ``_gpu`` variant: not)."""
    @torch.no_grad()
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None,
                r=1 / 2):
        if len(sigmas) <= 1:
            return x
        extra_args = {} if extra_args is None else extra_args
        noise_sampler = brownian_noise(noise_sampler, x, sigmas, extra_args, cpu=tree_on_cpu)
        return _dpmpp_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r)
    return _named(sampler, name, doc, "brownian" if tree_on_cpu else "brownian_device")


def _named(sampler, name: str, doc: str, noise: str):
    """Give a factory-made sampler its public name, its one-line docstring and its traits."""
    sampler.__name__ = sampler.__qualname__ = name
    sampler.__doc__ = doc
    return traits(noise=noise)(sampler)


def _dpmpp_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r):
    ms = get_model_sampling(model)
    # The stage sigma is computed in float32 exactly as ComfyUI does: the Brownian tree is queried there.
    sigmas = ms.offset_first_sigma(sigmas.detach().cpu())
    inject = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in step_range(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_at(model, x, i, float(sigma), extra_args, callback)
        if sigma_next == 0:
            x = denoised
            continue
        lambda_s, lambda_t = ms.half_log_snr(sigma), ms.half_log_snr(sigma_next)
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = ms.sigma_from_half_log_snr(lambda_s_1)
        alpha_s, alpha_s_1, alpha_t = ms.alpha(float(sigma)), ms.alpha(float(sigma_s_1)), ms.alpha(float(sigma_next))

        # stage 1: to lambda_s_1 (ancestral split in the VE-equivalent sigma exp(-lambda))
        ve_s, ve_s_1 = ms.to_ve(sigma), lambda_s_1.neg().exp()
        sd, su = ve_ancestral_split(ve_s, ve_s_1, eta) if eta else (ve_s_1, 0.0)
        h_ = float(sd.log().neg() - lambda_s)
        x_2 = x * (alpha_s_1 / alpha_s * math.exp(-h_)) + denoised * (alpha_s_1 * neg_expm1(h_))
        if inject:
            x_2 = x_2 + noise_sampler(sigma, sigma_s_1) * (alpha_s_1 * s_noise * float(su))
        denoised_2 = model(x_2, sigma_batch(x, float(sigma_s_1)), **extra_args)

        # stage 2: to lambda_t with the combined estimate
        ve_t = ms.to_ve(sigma_next)
        sd, su = ve_ancestral_split(ve_s, ve_t, eta) if eta else (ve_t, 0.0)
        h_ = float(sd.log().neg() - lambda_s)
        denoised_d = torch.lerp(denoised, denoised_2, fac)
        x = x * (alpha_t / alpha_s * math.exp(-h_)) + denoised_d * (alpha_t * neg_expm1(h_))
        if inject:
            x = x + noise_sampler(sigma, sigma_next) * (alpha_t * s_noise * float(su))
    return x



def _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, order,
                         solver_type, step_update):
    """DPM-Solver++(2M/3M) SDE in half-log-SNR (Lu et al. 2022b; Gonzalez et al. 2023 for the 3M terms).

    ``step_update(ms, x, denoised, history, hs, sigma, sigma_next, eta, s_noise, noise_sampler, order,
    solver_type) -> (x, h)`` is one step's update (``fused_msde_update``, or ComfyUI's operation order in
    reference mode); ``history`` / ``hs`` are the previous denoised estimates and steps, newest first.
    """
    ms = get_model_sampling(model)
    sig_t = ms.offset_first_sigma(sigmas.detach().cpu())
    sig = as_float_list(sig_t)
    history, hs = [], []
    for i in step_range(len(sig) - 1, disable):
        denoised = model(x, sigma_batch(x, sig[i]), **extra_args)
        emit(callback, x, i, sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            x, h = step_update(ms, x, denoised, history, hs, sig_t[i], sig_t[i + 1], eta, s_noise, noise_sampler,
                               order, solver_type)
            hs.insert(0, h)
        history.insert(0, denoised)
        del history[2:], hs[2:]
    return x


def fused_msde_update(ms, x, denoised, history, hs, sigma_t, sigma_next_t, eta, s_noise, noise_sampler, order,
                      solver_type):
    """One DPM-Solver++(2M/3M) SDE step in float64 scalars, with one weight per denoised estimate (one pass each)."""
    sigma, sigma_next = float(sigma_t), float(sigma_next_t)
    inject = eta > 0 and s_noise > 0
    h = ms.half_log_snr(sigma_next) - ms.half_log_snr(sigma)
    h_eta = h * (eta + 1)
    alpha_t = ms.alpha(sigma_next)
    phi_1 = neg_expm1(h_eta)  # 1 - exp(-h_eta)
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
        x.add_(noise_sampler(sigma, sigma_next), alpha=sigma_next * math.sqrt(neg_expm1(2 * h * eta)) * s_noise)
    return x, h


def _msde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, order, solver_type, cpu,
          step_update):
    if len(sigmas) <= 1:
        return x
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type: must be 'heun' or 'midpoint', got {solver_type!r}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = brownian_noise(noise_sampler, x, sigmas, extra_args, cpu=cpu)
    return _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, order,
                                solver_type, step_update)


def _msde_sampler(name: str, order: int, default_solver: str, tree_on_cpu: bool, doc: str):
    """A DPM-Solver++ multistep SDE entry of the given order and default correction (see ``_msde``)."""
    @torch.no_grad()
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None,
                solver_type=default_solver, step_update=fused_msde_update):
        return _msde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, order, solver_type,
                     tree_on_cpu, step_update)
    return _named(sampler, name, doc, "brownian" if tree_on_cpu else "brownian_device")


def _cpu_and_device(factory, name: str, doc: str, *config):
    """A Brownian sampler and its ``_gpu`` variant: the same sampler with its Brownian tree on the sampling device."""
    device_doc = f"{name.removeprefix('sample_')} with its Brownian tree on the sampling device."
    return factory(name, *config, True, doc), factory(name + "_gpu", *config, False, device_doc)


sample_dpmpp_sde, sample_dpmpp_sde_gpu = _cpu_and_device(
    _dpmpp_sde_sampler, "sample_dpmpp_sde",
    "DPM-Solver++ (stochastic, 2 stages per step) with Brownian noise (Lu et al. 2022b; k-diffusion).")
(sample_dpmpp_2m_sde, sample_dpmpp_2m_sde_gpu, sample_dpmpp_2m_sde_heun, sample_dpmpp_2m_sde_heun_gpu,
 sample_dpmpp_3m_sde, sample_dpmpp_3m_sde_gpu) = (
    *_cpu_and_device(_msde_sampler, "sample_dpmpp_2m_sde", "DPM-Solver++(2M) SDE, midpoint correction (Lu et al. 2022b).",
                     2, "midpoint"),
    *_cpu_and_device(_msde_sampler, "sample_dpmpp_2m_sde_heun", "DPM-Solver++(2M) SDE, Heun correction (Lu et al. 2022b).",
                     2, "heun"),
    *_cpu_and_device(_msde_sampler, "sample_dpmpp_3m_sde",
                     "DPM-Solver++(3M) SDE (Lu et al. 2022b; third-order multistep, k-diffusion).", 3, "heun"))


@torch.no_grad()
def sample_dpmpp_3m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(3M), the ODE (eta = 0) form of the third-order multistep solver (Lu et al. 2022b)."""
    extra_args = {} if extra_args is None else extra_args
    return _dpmpp_multistep_sde(model, x, sigmas, extra_args, callback, disable, 0.0, 0.0, None, 3, "midpoint",
                                fused_msde_update)


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


class _SACoefficients:
    """SA-Solver weights for one step; where float32 cannot resolve the noise levels (ComfyUI fails there), in float64."""

    def __init__(self, ms, sig_t: Tensor, lambdas: Tensor):
        self.ms, self.sig_t, self.lambdas = ms, sig_t, lambdas
        self.precise = None   # (sigmas, lambdas) in float64, built if a float32 system turns out singular

    def __call__(self, j: int, lo: int, hi: int, s: int, t: int, tau: float) -> Tensor:
        b = None
        try:
            b = sa_solver_coefficients(self.sig_t[j], self.lambdas[lo:hi], self.lambdas[s], self.lambdas[t], tau)
        except torch.linalg.LinAlgError:
            pass
        if b is None or not bool(torch.isfinite(b).all()):
            if self.precise is None:
                self.precise = (self.sig_t.double(), self.ms.half_log_snr(self.sig_t.double()))
            sig64, lam64 = self.precise
            b = sa_solver_coefficients(sig64[j], lam64[lo:hi], lam64[s], lam64[t], tau)
        return b


def _weighted(history: list, b: Tensor) -> Tensor:
    """sum_k b_k D_k over the newest len(b) denoised estimates, oldest first."""
    order = len(b)
    acc = history[-order] * float(b[0])
    for k in range(1, order):
        acc = acc + history[-order + k] * float(b[k])
    return acc


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
    coefficients = _SACoefficients(ms, sig_t, lambdas)
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
            corr = _weighted(history, coefficients(i, i - c_order + 1, i + 1, i - 1, i, tau))
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
        pred = _weighted(history, coefficients(i + 1, i - p_order + 1, i + 1, i, i + 1, tau))
        h = float(lambdas[i + 1] - lambdas[i])
        x_pred = x * (sigma_next / sigma * math.exp(-(tau ** 2) * h)) + pred
        if tau > 0 and s_noise > 0:
            noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
            noise = noise_sampler(sigma, sigma_next) * (sigma_next * math.sqrt(neg_expm1(2 * tau ** 2 * h)) * s_noise)
            x_pred = x_pred + noise
    return x_pred


@torch.no_grad()
@traits(noise="ancestral")
def sample_sa_solver_pece(model, x, sigmas, extra_args=None, callback=None, disable=False, tau_func=None,
                          s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4):
    """SA-Solver in PECE mode: the corrected state is evaluated again (Xue et al. 2023)."""
    return sample_sa_solver(model, x, sigmas, extra_args, callback, disable, tau_func, s_noise, noise_sampler,
                            predictor_order, corrector_order, use_pece=True)

