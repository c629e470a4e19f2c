"""Linear multistep methods on the PF-ODE derivative dx/dsigma, one model call per step.

Holds: lms, ipndm, ipndm_v, deis.
"""
from __future__ import annotations

import math

import torch

from ._common import as_float_list, denoise_at, step_range


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


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, weights=lms_coefficients):
    """Linear multistep (Adams-Bashforth on the sigma grid, Karras et al. 2022 / k-diffusion).

    As in ComfyUI, the last step to sigma 0 returns the denoised estimate.  ``weights(sigmas, i, order)``
    gives the step's weights, newest derivative first: by default exact integrals of the Lagrange basis
    (reference mode passes ComfyUI's float32 quadrature, ``reference.lms_coefficients_quadpack``).
    """
    return _multistep_on_d(model, x, sigmas, extra_args, callback, disable, order, weights, weights_include_step=True)


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


def _multistep_on_d(model, x, sigmas, extra_args, callback, disable, max_order, weights, weights_include_step=False):
    """Explicit multistep on the PF-ODE derivative: x += h * sum_k w_k d_{i-k}; the last step returns D.

    ``weights_include_step``: the weights are already integrals over the step (lms), x += sum_k w_k d_{i-k}.
    """
    extra_args = {} if extra_args is None else extra_args
    sig = as_float_list(sigmas)
    history = []
    for i in step_range(len(sig) - 1, disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoise_at(model, x, i, sigma, extra_args, callback)
        d = (x - denoised) / sigma
        history.insert(0, d)
        del history[max_order:]
        if sigma_next == 0:
            x = denoised
            continue
        w = weights(sig, i, min(max_order, i + 1))
        if weights_include_step:
            x = x + sum(coeff * d_old for coeff, d_old in zip(w, history))
            continue
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
        denoised = denoise_at(model, x, i, sigma, extra_args, callback)
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

