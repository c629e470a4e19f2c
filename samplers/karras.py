"""Samplers stepping the probability-flow ODE in sigma: Euler, Heun, DPM-2, linear multistep and relatives.

The ODE ``dx/dsigma = (x - D(x)) / sigma`` has the same form for VE and flow
models, so these steps serve both; ancestral re-noising goes through the
model-sampling object's ``ancestral_step``.
"""
from __future__ import annotations

import math

import torch

from ._common import (as_float_list, denoise_with_uncond, emit, get_model_sampling, renoise, resolve_noise_sampler,
                      sigma_batch, step_range)
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
    ve = math.exp(-ms.half_log_snr(sigma))
    ve_hat = ve * (gamma + 1)
    sigma_hat = ms.sigma_from_half_log_snr(-math.log(ve_hat))
    noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    x_ve = x / ms.alpha(sigma) + noise_sampler(sigma, sigma_hat) * (s_noise * (ve_hat ** 2 - ve ** 2) ** 0.5)
    return x_ve * ms.alpha(sigma_hat), sigma_hat, noise_sampler


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., noise_sampler=None):
    """Euler steps, with optional churn (Karras et al. 2022, Alg. 2)."""
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    n = len(sig) - 1
    for i in step_range(n, disable):
        x, sigma_hat, noise_sampler = _churn(model, x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, extra_args)
        denoised = model(x, sigma_batch(x, sigma_hat), **extra_args)
        emit(callback, x, i, sig[i], denoised, sigma_hat)
        x = _euler_to(x, denoised, sigma_hat, sig[i + 1])
    return x


@torch.no_grad()
@traits(noise="ancestral")
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral sampling with Euler steps (k-diffusion; flow re-noising via the model sampling)."""
    extra_args = {} if extra_args is None else extra_args
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
        sigma_down, sigma_up, scale = ms.ancestral_step(sigma, sigma_next, eta)
        x = _euler_to(x, denoised, sigma, sigma_down)
        if eta > 0:
            x = renoise(x, scale, noise_sampler(sigma, sigma_next), s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float("inf"), s_noise=1., noise_sampler=None):
    """Heun's second-order method (Karras et al. 2022, Alg. 2); Euler on the last step to 0."""
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    n = len(sig) - 1
    for i in step_range(n, disable):
        x, sigma_hat, noise_sampler = _churn(model, x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, extra_args)
        sigma_next = sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma_hat), **extra_args)
        emit(callback, x, i, sig[i], denoised, sigma_hat)
        dt = sigma_next - sigma_hat
        d = (x - denoised) / sigma_hat
        if sigma_next == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        denoised_2 = model(x_2, sigma_batch(x, sigma_next), **extra_args)
        d_2 = (x_2 - denoised_2) / sigma_next
        x = x + (d + d_2) * (dt / 2)
    return x


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                   s_tmax=float("inf"), s_noise=1., noise_sampler=None):
    """Heun++: a three-stage Heun variant whose stage weights grow with sigma (sd-webui-samplers-scheduler, MIT)."""
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    n = len(sig) - 1
    s_end = sig[-1]
    for i in step_range(n, disable):
        x, sigma_hat, noise_sampler = _churn(model, x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, extra_args)
        denoised = model(x, sigma_batch(x, sigma_hat), **extra_args)
        emit(callback, x, i, sig[i], denoised, sigma_hat)
        d = (x - denoised) / sigma_hat
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = (x_2 - model(x_2, sigma_batch(x, sig[i + 1]), **extra_args)) / sig[i + 1]
        if sig[i + 2] == s_end:
            w2 = sig[i + 1] / (2 * sig[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
            continue
        x_3 = x_2 + d_2 * (sig[i + 2] - sig[i + 1])
        d_3 = (x_3 - model(x_3, sigma_batch(x, sig[i + 2]), **extra_args)) / sig[i + 2]
        w2, w3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
        x = x + (d * (1 - w2 - w3) + d_2 * w2 + d_3 * w3) * dt
    return x


@torch.no_grad()
@traits(discard_penultimate_sigma=True)
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., noise_sampler=None):
    """DPM-Solver-2 in sigma with a log-midpoint (Lu et al. 2022; Karras et al. 2022, Alg. 2)."""
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    n = len(sig) - 1
    for i in step_range(n, disable):
        x, sigma_hat, noise_sampler = _churn(model, x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, extra_args)
        sigma_next = sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma_hat), **extra_args)
        emit(callback, x, i, sig[i], denoised, sigma_hat)
        d = (x - denoised) / sigma_hat
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
            continue
        sigma_mid = _log_midpoint(sigma_hat, sigma_next, sigmas.dtype)
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = (x_2 - model(x_2, sigma_batch(x, sigma_mid), **extra_args)) / sigma_mid
        x = x + d_2 * (sigma_next - sigma_hat)
    return x


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


def _lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the Lagrange basis polynomial of node j (exact, expanded about a)."""
    poly, denom = [1.0], 1.0  # coefficients in powers of (tau - a), ascending
    for k, root in enumerate(nodes):
        if k == j:
            continue
        shifted = root - a
        poly = [(poly[p - 1] if p > 0 else 0.0) - shifted * (poly[p] if p < len(poly) else 0.0)
                for p in range(len(poly) + 1)]
        denom *= nodes[j] - root
    h = b - a
    return sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly)) / denom


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights for step i on the (non-uniform) sigma grid, newest derivative first."""
    nodes = [sigmas[i - k] for k in range(order)]
    return [_lagrange_integral(nodes, j, sigmas[i], sigmas[i + 1]) for j in range(order)]


def lms_coefficients_quadpack(sigmas: list[float], i: int, order: int) -> list[float]:
    """The same weights as ComfyUI computes them: QUADPACK (scipy ``quad``) over float32 basis values.

    On schedules with tiny first steps the extrapolation weights reach ~1e4, so the
    float32 rounding of the basis decides the last digits of the result; compat
    mode reproduces it.
    """
    try:
        import numpy as np
        from scipy import integrate
    except ImportError:
        raise ImportError("lms in ComfyUI-compat mode (flow_geometry = comfyui, or KSAMPLER_FLOW_GEOMETRY=comfyui) "
                          "reproduces ComfyUI's scipy quadrature: install scipy, or use the default mode") from None
    nodes = np.asarray([sigmas[i - k] for k in range(order)], dtype=np.float32)

    def basis(j):
        def value(tau):
            out = 1.0
            for k in range(order):
                if k != j:   # numpy's promotion of a Python float with a float32 node (float32 under NumPy 2)
                    out = out * ((tau - nodes[k]) / (nodes[j] - nodes[k]))
            return out
        return value

    a, b = np.float32(sigmas[i]), np.float32(sigmas[i + 1])
    return [integrate.quad(basis(j), a, b, epsrel=1e-4)[0] for j in range(order)]


def _lms(model, x, sigmas, extra_args, callback, disable, order, coefficients):
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    ds = []
    for i in step_range(len(sig) - 1, disable):
        denoised = model(x, sigma_batch(x, sig[i]), **extra_args)
        ds.append((x - denoised) / sig[i])
        if len(ds) > order:
            ds.pop(0)
        emit(callback, x, i, sig[i], denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        coeffs = coefficients(sig, i, min(i + 1, order))
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


def _sample_lms_comfy(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """lms with ComfyUI's float32 quadrature of the weights (compat mode)."""
    return _lms(model, x, sigmas, extra_args, callback, disable, order, lms_coefficients_quadpack)


@torch.no_grad()
@traits(comfy_rounding=True)
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams-Bashforth on the sigma grid, Karras et al. 2022 / k-diffusion).

    As in ComfyUI, the last step to sigma 0 returns the denoised estimate.  The
    weights are exact integrals of the Lagrange basis (compat mode: ComfyUI's
    float32 quadrature).
    """
    return _lms(model, x, sigmas, extra_args, callback, disable, order, lms_coefficients)


sample_lms.comfy_variant = torch.no_grad()(_sample_lms_comfy)


def _ipndm_fixed(order: int) -> list[float]:
    """Adams-Bashforth weights for equal steps (iPNDM, Zhang & Chen 2023), newest first."""
    return {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}[order]


def _ipndm_variable(sig: list[float], i: int, order: int) -> list[float]:
    """Variable-step iPNDM weights (diff-sampler's ipndm_v, Zhou et al. 2024), newest first.

    They extend the equal-step Adams-Bashforth weights with divided-difference
    corrections scaled by ratios of the previous step sizes.
    """
    h = [sig[i + 1] - sig[i]] + [sig[i - k] - sig[i - k - 1] for k in range(order - 1)]
    if order == 1:
        return [1.0]
    r = h[0] / h[1]
    c = [1 + r / 2, -r / 2]
    if order == 2:
        return c
    q1 = h[1] / h[2]
    t1 = (1 - h[0] / (3 * (h[0] + h[1])) * (h[0] * (h[0] + h[1])) / (h[1] * (h[1] + h[2]))) / 2
    c = [c[0] + t1, c[1] - (1 + q1) * t1, t1 * q1]
    if order == 3:
        return c
    q2 = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    q3 = h[2] / h[3]
    t2 = ((1 - h[0] / (3 * (h[0] + h[1]))) / 2 + (1 - h[0] / (2 * (h[0] + h[1]))) * h[0] / (6 * (h[0] + h[1] + h[2]))) \
        * (h[0] * (h[0] + h[1]) * (h[0] + h[1] + h[2])) / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3]))
    return [c[0] + t2, c[1] - (1 + q1 + q2) * t2, c[2] + (q1 + q2 * (1 + q3)) * t2, -t2 * q2 * q1]


def _multistep_on_d(model, x, sigmas, extra_args, callback, disable, max_order, weights):
    """Explicit multistep on the PF-ODE derivative: x += h * sum_k w_k d_{i-k}; the last step returns D."""
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    history = []
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma), **extra_args)
        emit(callback, x, i, sigma, denoised)
        d = (x - denoised) / sigma
        history.insert(0, d)
        del history[max_order:]
        if sigma_next == 0:
            x = denoised
            continue
        w = weights(sig, i, min(max_order, i + 1))
        step = history[0] * w[0]
        for coeff, d_old in zip(w[1:], history[1:]):
            step = step + d_old * coeff
        x = x + step * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """Improved PNDM (Zhang & Chen 2023, DEIS paper): Adams-Bashforth with equal-step weights."""
    return _multistep_on_d(model, x, sigmas, extra_args, callback, disable, max_order,
                           lambda sig, i, order: _ipndm_fixed(order))


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM with variable-step weights (Zhou et al. 2024, diff-sampler)."""
    return _multistep_on_d(model, x, sigmas, extra_args, callback, disable, max_order, _ipndm_variable)


def _deis_times(sig: list[float], eps_s: float = 1e-3, sigma_min: float = 0.002, sigma_max: float = 80.0):
    """Map EDM sigmas to the VP time of DEIS (Zhang & Chen 2023), with that VP schedule's betas."""
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / eps_s - math.log(sigma_max ** 2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    ts = [(math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(s ** 2 + 1)) - beta_min) / beta_d for s in sig]
    return ts, beta_min, beta_d + beta_min


def _deis_times_float32(sigmas: torch.Tensor, eps_s: float = 1e-3):
    """``_deis_times`` with ComfyUI's precisions: float32 times, float64 betas from a float32 log(sigma_min^2 + 1)."""
    import numpy as np
    sig = sigmas.detach().cpu().to(torch.float32)
    log_min = float(torch.tensor(np.log((torch.tensor(0.002) ** 2 + 1).numpy()), dtype=torch.float32) / eps_s)
    log_max = float(np.log(np.float64(80 ** 2 + 1)))
    beta_d = 2 * (log_min - log_max) / (eps_s - 1)
    beta_min = log_max - 0.5 * beta_d
    ts = ((beta_min ** 2 + 2 * beta_d * (sig ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return ts, beta_min, beta_d + beta_min


def deis_coefficients(sigmas, max_order: int, n_quad: int = 10000, comfy_float32: bool = False) -> list[list[float]]:
    """DEIS 'tAB' weights (Zhang & Chen 2023): Lagrange extrapolation of dx/dsigma in VP time, integrated numerically.

    The integral of L_j(tau) dsigma/dtau over each step uses ``n_quad`` evenly
    spaced points and weight (t_next - t) / n_quad, as the reference
    implementation does, in float64.  ``comfy_float32``: ComfyUI's numerics
    (float32 throughout, dlog(alpha)/dtau by autograd), ~1e-4 relative away on
    schedules with tiny first steps; compat mode uses them.  Where float32 cannot tell two noise levels apart
    (their VP times coincide, so the Lagrange basis divides by zero and ComfyUI's latent turns NaN), the weights
    are computed in float64 instead.
    """
    if comfy_float32:
        ts, beta_0, beta_1 = _deis_times_float32(torch.as_tensor(sigmas))
        if not bool((ts[1:] < ts[:-1]).all()):
            comfy_float32 = False
    if not comfy_float32:
        sig = sigmas.detach().cpu().tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]
        times, beta_0, beta_1 = _deis_times(sig)
        ts = torch.tensor(times, dtype=torch.float64)
    coeffs = []
    for i in range(len(ts) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            coeffs.append([])
            continue
        t_cur, t_next = ts[i], ts[i + 1]
        if comfy_float32:
            with torch.inference_mode(False), torch.enable_grad():
                tau = torch.linspace(t_cur, t_next, n_quad).requires_grad_(True)
                alpha = torch.exp(-0.5 * tau ** 2 * (beta_1 - beta_0) - tau * beta_0)
                (log_alpha_slope,) = torch.autograd.grad(alpha.log().sum(), tau)
            alpha, tau = alpha.detach(), tau.detach()
        else:
            tau = torch.linspace(t_cur, t_next, n_quad, dtype=torch.float64)
            alpha = torch.exp(-0.5 * tau ** 2 * (beta_1 - beta_0) - tau * beta_0)
            log_alpha_slope = -(tau * (beta_1 - beta_0) + beta_0)
        dsigma_dtau = -0.5 * log_alpha_slope / torch.sqrt(alpha * (1 - alpha))
        dtau = (t_next - t_cur) / n_quad
        nodes = ts[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            basis = None
            for k in range(order):
                if k != j:
                    factor = (tau - nodes[k]) / (nodes[j] - nodes[k])
                    basis = factor if basis is None else basis * factor
            row.append(float(torch.sum(dsigma_dtau * basis) * dtau))
        coeffs.append(row)
    return coeffs


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode="tab"):
    """DEIS multistep (Zhang & Chen 2023), 'tab' variant; the last step to 0 is an Euler step.

    The weights follow the schedule's precision: float32 sigmas get ComfyUI's float32 weights (so the latent is
    ComfyUI's), float64 sigmas full float64 weights.  ``deis_mode="rhoab"``: the paper's rho-AB variant, the
    eps extrapolation polynomial in sigma itself, integrated exactly (``max_order`` points, as for tAB).
    """
    if deis_mode not in ("tab", "rhoab"):
        raise ValueError(f"deis_mode: 'tab' or 'rhoab', got {deis_mode!r}")
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    if deis_mode == "tab":
        coeff_list = deis_coefficients(sigmas, max_order, comfy_float32=sigmas.dtype != torch.float64)
    else:
        coeff_list = [lms_coefficients(sig, i, min(i + 1, max_order)) if sig[i + 1] > 0 else []
                      for i in range(len(sig) - 1)]
    history = []
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = model(x, sigma_batch(x, sigma), **extra_args)
        emit(callback, x, i, sigma, denoised)
        d = (x - denoised) / sigma
        order = 1 if sigma_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (sigma_next - sigma) * d
        else:
            x_next = x + coeff_list[i][0] * d
            for coeff, d_old in zip(coeff_list[i][1:], history):
                x_next = x_next + coeff * d_old
        history.insert(0, d)
        del history[max_order - 1:]
        x = x_next
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
