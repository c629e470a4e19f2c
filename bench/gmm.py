"""An analytic Gaussian-mixture data distribution with its exact denoiser, for the benchmarks and the GITS table.

Data x0 in R^d is a mixture of K isotropic Gaussians N(mu_k, s_k^2 I).  Under VE
noise x = x0 + sigma n the marginal is the mixture of N(mu_k, (s_k^2 + sigma^2) I)
and the exact denoiser is

    D(x, sigma) = sum_k w_k(x, sigma) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),

w_k the posterior component probabilities.  A *class* is a reweighting of the
components (class c favours components 2c and 2c + 1), so the conditional and
unconditional denoisers differ and classifier-free guidance (Ho & Salimans
2022) is exercised.  The PF-ODE derivative dx/dsigma = (x - D) / sigma equals
sigma sum_k w_k (x - mu_k) / (s_k^2 + sigma^2), finite down to sigma = 0, which
lets the reference solver integrate all the way to the data.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


class GaussianMixture:
    """K isotropic Gaussians in ``dim`` dimensions, with ``n_classes`` class-conditional reweightings."""

    def __init__(self, dim: int = 64, components: int = 8, n_classes: int = 4, seed: int = 0,
                 mean_scale: float = 0.9, std_range: tuple = (0.25, 0.6), class_bias: float = 3.0,
                 dtype=torch.float64):
        gen = torch.Generator().manual_seed(seed)
        self.dim, self.k, self.n_classes = dim, components, n_classes
        self.mu = (torch.randn(components, dim, generator=gen, dtype=torch.float64) * mean_scale).to(dtype)
        lo, hi = std_range
        self.s = (lo + (hi - lo) * torch.rand(components, generator=gen, dtype=torch.float64)).to(dtype)
        logits = torch.zeros(n_classes + 1, components, dtype=torch.float64)
        for c in range(n_classes):
            for m in (2 * c, 2 * c + 1):
                logits[c, m % components] = class_bias
        # the last row is the unconditional mixture: uniform weights
        self.log_weights = torch.log_softmax(logits, dim=-1).to(dtype)
        self.dtype = dtype

    # ---- densities -------------------------------------------------------------------------------
    def _log_resp(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        """Unnormalised log posterior of each component, [B, K]; x is [B, d], sigma [B] or scalar."""
        var = self.s.to(x.dtype) ** 2 + sigma.reshape(-1, 1).to(x.dtype) ** 2  # [B or 1, K]
        mu = self.mu.to(x.dtype)
        sq = (x * x).sum(-1, keepdim=True) - 2 * x @ mu.T + (mu * mu).sum(-1)  # [B, K]
        return self.log_weights.to(x.dtype)[labels] - 0.5 * self.dim * torch.log(var) - 0.5 * sq / var

    def log_prob(self, x0: Tensor, labels: Tensor) -> Tensor:
        """log p(x0 | class) of clean samples (labels = n_classes: unconditional)."""
        lr = self._log_resp(x0, torch.zeros((), dtype=x0.dtype), labels)
        return torch.logsumexp(lr, dim=-1) - 0.5 * self.dim * math.log(2 * math.pi)

    def sample(self, n: int, labels: Tensor, gen: torch.Generator) -> Tensor:
        """n exact samples x0 ~ p(x0 | labels[i])."""
        probs = self.log_weights[labels].exp()
        comp = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        eps = torch.randn(n, self.dim, generator=gen, dtype=torch.float64).to(self.dtype)
        return self.mu[comp] + self.s[comp, None] * eps

    # ---- the ODE ---------------------------------------------------------------------------------
    def ode_slope(self, x: Tensor, sigma, labels: Tensor) -> Tensor:
        """(x - D(x, sigma)) / sigma, finite at sigma = 0; x is [B, d]."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
        w = torch.softmax(self._log_resp(x, sigma, labels), dim=-1)  # [B, K]
        var = self.s.to(x.dtype) ** 2 + sigma.reshape(-1, 1) ** 2  # [B or 1, K]
        coef = w / var  # [B, K]
        return sigma.reshape(-1, 1) * (coef.sum(-1, keepdim=True) * x - coef @ self.mu.to(x.dtype))

    def denoise(self, x: Tensor, sigma, labels: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
        return x - sigma.reshape(-1, 1) * self.ode_slope(x, sigma, labels)


class MixtureDenoiser:
    """k-diffusion-protocol denoiser on [B, d] (or [B, ...]) states: conditional, unconditional or CFG-guided.

    ``cfg = None``: the conditional denoiser alone.  Otherwise
    D = D_u + cfg (D_c - D_u), and ``denoise_with_uncond`` exposes D_u (CFG++).
    Counts its calls (``calls``: model evaluations, one per batched call).
    """

    def __init__(self, gmm: GaussianMixture, labels: Tensor, cfg: Optional[float] = None, model_sampling=None):
        self.gmm, self.labels, self.cfg = gmm, labels, cfg
        self.uncond = torch.full_like(labels, gmm.n_classes)
        self.model_sampling = model_sampling
        self.calls = 0
        if cfg is not None:
            self.denoise_with_uncond = self._denoise_with_uncond

    def _both(self, x: Tensor, sigma: Tensor):
        shape = x.shape
        flat = x.reshape(shape[0], -1)
        sig = torch.as_tensor(sigma, dtype=x.dtype)
        cond = self.gmm.denoise(flat, sig, self.labels)
        if self.cfg is None:
            return cond.reshape(shape), None
        uncond = self.gmm.denoise(flat, sig, self.uncond)
        return (uncond + self.cfg * (cond - uncond)).reshape(shape), uncond.reshape(shape)

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        self.calls += 1
        return self._both(x, sigma)[0]

    def _denoise_with_uncond(self, x: Tensor, sigma: Tensor, **kwargs):
        self.calls += 1
        return self._both(x, sigma)

    def slope(self, x: Tensor, sigma) -> Tensor:
        """The guided PF-ODE slope (x - D) / sigma, finite at sigma = 0 (for the reference solver)."""
        cond = self.gmm.ode_slope(x, sigma, self.labels)
        if self.cfg is None:
            return cond
        uncond = self.gmm.ode_slope(x, sigma, self.uncond)
        return uncond + self.cfg * (cond - uncond)


def default_problem(dim: int = 64, components: int = 8, dtype=torch.float32) -> GaussianMixture:
    """The benchmark's data: 64 dimensions, 8 components, per-component std 0.25..0.6, overall std near 1."""
    return GaussianMixture(dim=dim, components=components, dtype=dtype)


@torch.no_grad()
def reference_solve(slope_fn, x: Tensor, sigma_start: float, steps_log: int = 1000, steps_lin: int = 100,
                    sigma_switch: float = 0.02, sigma_end: float = 0.0) -> Tensor:
    """The PF-ODE from ``sigma_start`` to ``sigma_end`` (default: the data, sigma = 0) with classical RK4, float64.

    RK4 in t = log sigma (dx/dt = sigma * slope) from sigma_start down to
    ``sigma_switch``, then RK4 in sigma itself down to 0 (the slope is finite there).
    A positive ``sigma_end`` stops the log-sigma stage there instead.
    """
    x = x.to(torch.float64)
    if sigma_end > 0:
        sigma_switch = sigma_end
    t0, t1 = math.log(sigma_start), math.log(min(sigma_switch, sigma_start))
    if t1 < t0:
        h = (t1 - t0) / steps_log
        t = t0

        def f(x_, t_):
            s = math.exp(t_)
            return s * slope_fn(x_, s)
        for _ in range(steps_log):
            k1 = f(x, t)
            k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = f(x + h * k3, t + h)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            t += h
    if sigma_end > 0:
        return x
    s0 = min(sigma_switch, sigma_start)
    h = -s0 / steps_lin
    s = s0
    for _ in range(steps_lin):
        k1 = slope_fn(x, s)
        k2 = slope_fn(x + 0.5 * h * k1, s + 0.5 * h)
        k3 = slope_fn(x + 0.5 * h * k2, s + 0.5 * h)
        k4 = slope_fn(x + h * k3, max(s + h, 0.0))
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        s += h
    return x
