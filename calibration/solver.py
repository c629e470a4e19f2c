"""The calibrated sampler: a linear multistep exponential integrator in data prediction, written in the VE
frame, and the teacher's fine solve of the same ODE (the package docstring has the formula)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..samplers._common import emit, get_model_sampling, renoise, resolve_noise_sampler, step_range
from ..validation import check_float

Denoiser = Callable[..., Tensor]


# ---- geometry ---------------------------------------------------------------------------------
def _alpha(ms, sigma: Tensor) -> Tensor:
    a = ms.alpha(sigma)
    return a if isinstance(a, Tensor) else torch.as_tensor(a, dtype=sigma.dtype)


def ve_sigma(ms, sigma: Tensor) -> Tensor:
    """VE-frame sigma sigma / alpha (0 stays 0)."""
    return sigma / _alpha(ms, sigma)


def ve_bounds(ms, sigma_max: float, sigma_min: float) -> tuple[float, float]:
    """VE-frame (top, bottom) of a model-sigma range; flow's sigma = 1 maps to its offset start (finite)."""
    top = float(sigma_max)
    if float(ms.alpha(torch.tensor(top))) <= 0:
        top = float(ms.offset_first_sigma(torch.tensor([top, 0.0]))[0])
    return (float(ve_sigma(ms, torch.tensor(top, dtype=torch.float64))),
            float(ve_sigma(ms, torch.tensor(float(sigma_min), dtype=torch.float64))))


def model_sigma(ms, sigma_ve: Tensor) -> Tensor:
    """Model sigma of a VE-frame sigma (differentiable for eps/VE, where it is the identity)."""
    if getattr(ms, "is_flow", False):
        return sigma_ve / (1 + sigma_ve)
    one = torch.ones((), dtype=sigma_ve.dtype)
    if float(ms.alpha(one)) == 1.0:
        return sigma_ve
    return torch.stack([torch.as_tensor(ms.sigma_from_half_log_snr(-torch.log(s.detach())), dtype=sigma_ve.dtype)
                        for s in sigma_ve.reshape(-1)]).reshape(sigma_ve.shape)


def multistep_coefficients(sigmas_ve: Tensor, base_order: int, width: int, corrector: bool = False) -> Tensor:
    """Exponential-integrator Adams weights in lambda = -log sigma_ve, per step, padded to ``width``.

    Step i integrates x' = e^-h x + int_0^h e^(s-h) P(s) ds with P the polynomial through the last
    ``base_order`` denoised estimates (fewer at the start): Adams-Bashforth; base_order 1 is DDIM, 2 is close to
    DPM-Solver++(2M) (Lu et al. 2022b).  ``corrector``: P's nodes start at the estimate at the step's end
    (Adams-Moulton, the UniC form of Zhao et al. 2023): row i weighs [D_{i+1}, D_i, ...].  The step into
    sigma = 0 takes the newest estimate.
    """
    n = len(sigmas_ve) - 1
    lam = -torch.log(sigmas_ve[:n])
    first = torch.nn.functional.one_hot(torch.tensor(0), width).to(sigmas_ve.dtype)
    rows = []
    for i in range(n):
        m = min(base_order, i + 1 + int(corrector))
        if float(sigmas_ve[i + 1].detach()) == 0 or m == 1:
            rows.append(first.clone())
            continue
        h = -torch.log(sigmas_ve[i + 1]) - lam[i]
        nodes = [lam[i - j] - lam[i] for j in range(m - int(corrector))]  # 0, then negative offsets
        nodes = torch.stack(([h] if corrector else []) + nodes)
        em = torch.expm1(-h)  # int_0^h e^(s-h) s^k ds for k = 0..3 (h^k - k times the one before)
        w = [-em, h + em, h * h - 2 * h - 2 * em, h * h * h - 3 * h * h + 6 * h + 6 * em]
        rhs = torch.stack(w[:m]) / w[0]
        vander = torch.stack([nodes ** k for k in range(m)])
        c = torch.linalg.solve(vander, rhs)
        rows.append(torch.cat([c, c.new_zeros(width - m)]))
    return torch.stack(rows)


def _row(coefficients: Optional[Tensor], i: int, available: int) -> list:
    """Weights of the ``available`` newest estimates at step i; weights on missing history fold onto the oldest."""
    if coefficients is None:
        return [1.0]
    row = coefficients[i]
    k = min(available, row.shape[0])
    if k == row.shape[0]:
        return list(row)
    head = list(row[:k])
    head[-1] = head[-1] + row[k:].sum()
    return head


def solve(model, x: Tensor, sigmas: Tensor, coefficients: Optional[Tensor], ms, extra_args: dict,
          callback=None, disable=True, corrector: Optional[Tensor] = None, shift: Optional[Tensor] = None,
          eta: float = 0.0, noise_sampler=None) -> Tensor:
    """The calibrated multistep loop (differentiable in x, sigmas and coefficients).  With ``corrector``, each
    model call also corrects the step that led to it (row i - 1 weighs [D_i, D_{i-1}, ...]), at no extra call.
    With ``shift``, step i calls the model at sigma_i * exp(shift[i]) (its state stays at sigma_i).  With
    ``eta`` > 0 each step is the model sampling's ancestral step with the blend as its denoised estimate: to
    sigma_down, then re-noised to sigma_next with draws from ``noise_sampler``."""
    alphas = torch.stack([_alpha(ms, s) for s in sigmas]).to(x.dtype)
    if eta > 0:
        downs, ups, scales = ms.ancestral_steps(sigmas, eta)
        alphas_down = torch.stack([_alpha(ms, s) for s in downs]).to(x.dtype)
        downs, ups, scales = downs.to(x.dtype), ups.tolist(), scales.tolist()
    sigmas = sigmas.to(x.dtype)
    evaluated = sigmas if shift is None else torch.cat([sigmas[:-1] * torch.exp(shift.to(x.dtype)), sigmas[-1:]])

    def step(x, i, weights, noise):
        if eta == 0:
            return _step(x, sigmas[i], sigmas[i + 1], alphas[i], alphas[i + 1], weights, history)
        x = _step(x, sigmas[i], downs[i], alphas[i], alphas_down[i], weights, history)
        return x if noise is None else renoise(x, scales[i], noise, ups[i])
    history: list[Tensor] = []
    x_before, noise_before = x, None
    for i in step_range(len(sigmas) - 1, disable):
        sigma = sigmas[i]
        denoised = model(x, evaluated[i].reshape(1).expand(x.shape[0]).to(device=x.device, dtype=x.dtype),
                         **extra_args)
        history.insert(0, denoised)
        if corrector is not None and i > 0:  # redone with the same draw: the corrector changes only the blend
            x = step(x_before, i - 1, _row(corrector, i - 1, len(history)), noise_before)
        emit(callback, x, i, float(sigma.detach()), denoised)
        noise = noise_sampler(float(sigma), float(sigmas[i + 1])) if eta > 0 and ups[i] > 0 else None
        x_before, noise_before = x, noise
        x = step(x, i, _row(coefficients, i, len(history)), noise)
        if coefficients is not None:
            del history[max(coefficients.shape[1], 0 if corrector is None else corrector.shape[1]) - 1:]
    return x


def _step(x: Tensor, sigma: Tensor, sigma_next: Tensor, alpha: Tensor, alpha_next: Tensor, weights: list,
          history: list) -> Tensor:
    """One exponential-integrator step of the weighted estimates, in the VE frame written in the model's frame
    (no division by alpha, which is 0 at flow's sigma = 1)."""
    blend = sum(w * d for w, d in zip(weights, history))
    if float(sigma_next.detach()) == 0:
        return blend
    ratio = sigma_next / sigma
    return ratio * x + (alpha_next - ratio * alpha) * blend


@torch.no_grad()
def sample_calibrated(model, x, sigmas, extra_args=None, callback=None, disable=None, coefficients=None,
                      corrector=None, shift=None, eta=0.0, s_noise=1.0, noise_sampler=None):
    """Calibrated linear multistep exponential integrator (LD3, Tong et al. 2025; PAS, Wang et al. 2024)."""
    ms = get_model_sampling(model)
    check_eta(eta)
    rows = []
    for name, c in (("coefficients", coefficients), ("corrector", corrector), ("shift", shift)):
        c = None if c is None else torch.as_tensor(c, dtype=torch.float64)
        if c is not None and c.shape[0] < len(sigmas) - 1:
            raise ValueError(f"sigmas: {len(sigmas) - 1} steps but the calibration has {name} for {c.shape[0]}; "
                             "use the calibration's own sigmas")
        rows.append(None if c is None else c[c.shape[0] - (len(sigmas) - 1):])  # a tail (denoise < 1): its rows
    extra_args = extra_args or {}
    if eta > 0:
        source = resolve_noise_sampler(noise_sampler, x, extra_args)

        def draw(sigma, sigma_next):
            return source(sigma, sigma_next) * s_noise
    else:
        draw = None
    return solve(model, x, sigmas.detach().cpu().to(torch.float64), rows[0], ms, extra_args, callback, disable,
                 corrector=rows[1], shift=rows[2], eta=float(eta), noise_sampler=draw)


def check_eta(eta) -> float:
    """eta: a number in [0, 1] (0: the ODE; 1: an ancestral sampler's full re-noising)."""
    return check_float("eta", eta, 0.0, 1.0)


# ---- the teacher ------------------------------------------------------------------------------
@torch.no_grad()
def teacher_solve(denoiser: Denoiser, model_sampling, x: Tensor, sigma_max: float, sigma_min: float,
                  steps: int = 200) -> Tensor:
    """A fine PF-ODE solve from sigma_max to sigma_min (then to 0): 3-step exponential Adams-Bashforth, log grid."""
    ms = model_sampling
    hi, lo = ve_bounds(ms, sigma_max, sigma_min)
    ve = torch.exp(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64))
    sig = torch.cat([model_sigma(ms, ve), torch.zeros(1, dtype=torch.float64)])
    if float(ms.alpha(torch.tensor(float(sigma_max)))) <= 0:
        sig[0] = float(sigma_max)  # flow's pure-noise start: the first step is a DDIM step from it
    c = multistep_coefficients(torch.cat([ve, ve.new_zeros(1)]), 3, 3)
    return solve(denoiser, x, sig, c, ms, {})
