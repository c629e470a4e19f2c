"""UniPC (Zhao et al. 2023, arXiv:2302.04867): unified predictor-corrector, multistep, data prediction.

The sampler works on the variance-preserving form of the VE state
(``x / sqrt(1 + sigma^2)``), in half-log-SNR ``lambda = -log sigma``, with the
B(h) = h ("bh1") or B(h) = e^h - 1 ("bh2") variants.  Like ComfyUI it stops at
sigma = 0.001 instead of 0 (``SamplerTraits.final_sigma``), where the remaining
noise is negligible, and never writes into the caller's ``sigmas``.

Holds: uni_pc, uni_pc_bh2.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import as_float_list, emit, step_range
from .traits import traits

FINAL_SIGMA = 0.001


def _alpha(sigma: float) -> float:
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def _marginals(sigma: float, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha, sigma_vp, lambda) of the VP process for a VE sigma, as 0-d tensors at the sigmas' precision.

    The reference implementation derives lambda as log(alpha) - log(sqrt(1 -
    alpha^2)) and does the whole step's scalar algebra (including the small
    linear solves) at the precision of the sigmas: float32 in ComfyUI, which
    loses digits at small sigma and in the solves of closely spaced steps.
    Doing the same keeps our steps identical to ComfyUI's; float64 sigmas give
    full precision.
    """
    s = torch.tensor(sigma, dtype=dtype)
    log_alpha = 0.5 * torch.log(1 / (s * s + 1))
    one_minus = 1.0 - torch.exp(2.0 * log_alpha)
    lam = log_alpha - 0.5 * torch.log(one_minus)
    return torch.exp(log_alpha), torch.sqrt(one_minus), lam


def _unipc_update(model_fn, x, model_prev, t_prev, t, order, use_corrector, variant, dtype):
    """One UniPC step from t_prev[-1] to t of the given order (Zhao et al. 2023, Alg. 2/3, B(h) form)."""
    t0, m0 = t_prev[-1], model_prev[-1]
    _, sigma_vp0, lam0 = _marginals(t0, dtype)
    alpha_t, sigma_vp_t, lam_t = _marginals(t, dtype)
    lams = [_marginals(t_prev[-(i + 1)], dtype)[2] for i in range(1, order)]
    if dtype != torch.float64 and len({float(v) for v in (lam_t, lam0, *lams)}) < len(lams) + 2:
        # float32 cannot tell these (tiny) sigmas apart in lambda; redo this step in float64
        return _unipc_update(model_fn, x, model_prev, t_prev, t, order, use_corrector, variant, torch.float64)
    h = lam_t - lam0
    rks, d1s = [], []
    for i in range(1, order):
        rk = (lams[i - 1] - lam0) / h
        rks.append(rk)
        d1s.append((model_prev[-(i + 1)] - m0) / float(rk))
    rks = torch.stack(rks + [torch.tensor(1.0, dtype=dtype)])

    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    rows, b = torch.stack(rows), torch.stack(b)

    x_base = x * float(sigma_vp_t / sigma_vp0) - m0 * float(alpha_t * h_phi_1)
    step = float(alpha_t * b_h)

    # sum_k rho_k D1_k as one contraction over the stacked differences (the reference's rounding)
    d1_stack = torch.stack(d1s, dim=1) if d1s else None

    def combine(rhos: Tensor) -> Tensor:
        return torch.tensordot(d1_stack, rhos.to(x.dtype), dims=([1], [0]))

    x_t = x_base
    if d1s:
        rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(rows[:-1, :-1], b[:-1])
        x_t = x_base - step * combine(rhos_p)

    model_t = None
    if use_corrector:
        model_t = model_fn(x_t, t)
        rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(rows, b)
        corr = float(rhos_c[-1]) * (model_t - m0)
        if d1s:
            corr = combine(rhos_c[:-1]) + corr
        x_t = x_base - step * corr
    return x_t, model_t


def _sample_unipc(model, x, sigmas, extra_args, callback, disable, variant):
    extra_args = {} if extra_args is None else extra_args
    ts = as_float_list(sigmas)
    if ts[-1] == 0:
        ts[-1] = FINAL_SIGMA
    steps = len(ts) - 1
    if steps < 1:
        return x

    dtype = sigmas.dtype

    def model_fn(x_vp, t):
        # data prediction through the noise prediction, at the sigmas' precision, as the reference computes it:
        # x_ve = x_vp sqrt(1 + t^2), eps = (x_ve - D) / t, x0 = (x_vp - sigma_vp eps) / alpha
        t_batch = torch.full((x_vp.shape[0],), t, dtype=dtype, device=x_vp.device)
        t_b = t_batch.reshape(-1, *([1] * (x_vp.ndim - 1)))
        x_ve = x_vp * ((t_b ** 2 + 1.0) ** 0.5)
        eps = (x_ve - model(x_ve, t_batch, **extra_args)) / t_b
        alpha, sigma_vp, _ = _marginals(t, dtype)
        return (x_vp - sigma_vp.to(x_vp.device) * eps) / alpha.to(x_vp.device)

    order = max(1, min(3, steps - 1))
    x = x / torch.sqrt(1.0 + torch.tensor(ts[0], dtype=dtype) ** 2.0).to(x.device)
    model_prev, t_prev = [model_fn(x, ts[0])], [ts[0]]
    emit(callback, x / _alpha(ts[0]), 0, ts[0], model_prev[-1])
    for k in step_range(steps, disable):
        target = k + 1
        step_order = min(order, target, steps + 1 - target)
        use_corrector = target < steps
        x, model_x = _unipc_update(model_fn, x, model_prev, t_prev, ts[target], step_order, use_corrector, variant,
                                   sigmas.dtype)
        if use_corrector:
            model_prev.append(model_x)
            t_prev.append(ts[target])
            del model_prev[:-order], t_prev[:-order]
            emit(callback, x / _alpha(ts[target]), target, ts[target], model_x)
    return x / _marginals(ts[-1], dtype)[0].to(x.device)


@torch.no_grad()
@traits(discard_penultimate_sigma=True, final_sigma=FINAL_SIGMA)
def sample_uni_pc(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """UniPC with B(h) = h (bh1), order up to 3 (Zhao et al. 2023)."""
    return _sample_unipc(model, x, sigmas, extra_args, callback, disable, "bh1")


@torch.no_grad()
@traits(discard_penultimate_sigma=True, final_sigma=FINAL_SIGMA)
def sample_uni_pc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """UniPC with B(h) = e^h - 1 (bh2), order up to 3 (Zhao et al. 2023)."""
    return _sample_unipc(model, x, sigmas, extra_args, callback, disable, "bh2")
