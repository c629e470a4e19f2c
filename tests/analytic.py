"""Analytic test models: Gaussian data whose exact denoiser and probability-flow ODE are known in closed form.

Data x0 ~ N(mu, s0^2) per element.  For VE noise (x = x0 + sigma n) the exact
denoiser is D = (s0^2 x + sigma^2 mu) / (s0^2 + sigma^2) and the PF-ODE
solution is x(sigma) = mu + (x(sigma_T) - mu) sqrt(s0^2 + sigma^2) / sqrt(s0^2 + sigma_T^2).
For flow noise (x = (1 - sigma) x0 + sigma n) the same holds in the VE frame
(x / (1 - sigma), sigma / (1 - sigma)).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ksampler.models import EDM, EPS, V, VE, X0, DiffusionModel, Flow, LatentFormat


def gaussian_denoiser(x, sigma, mu, s0, flow=False):
    """Exact E[x0 | x] for x0 ~ N(mu, s0^2) under VE or flow noise."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))) if isinstance(sigma, torch.Tensor) else sigma
    if not flow:
        return (x * s0 ** 2 + mu * s ** 2) / (s0 ** 2 + s ** 2)
    a = 1 - s
    return (a * s0 ** 2 * x + mu * s ** 2) / (a ** 2 * s0 ** 2 + s ** 2)


def exact_ode(x_start, sigma_start, sigma_end, mu, s0, flow=False):
    """The probability-flow ODE solution from sigma_start to sigma_end (Gaussian data)."""
    if flow:
        a0, a1 = 1 - sigma_start, 1 - sigma_end
        ve0, ve1 = sigma_start / a0, sigma_end / a1
        x_ve = x_start / a0
        out = mu + (x_ve - mu) * math.sqrt(s0 ** 2 + ve1 ** 2) / math.sqrt(s0 ** 2 + ve0 ** 2)
        return out * a1
    return mu + (x_start - mu) * math.sqrt(s0 ** 2 + sigma_end ** 2) / math.sqrt(s0 ** 2 + sigma_start ** 2)


class GaussianDenoiser:
    """A k-diffusion-protocol denoiser for Gaussian data, with a model-sampling object and a call counter."""

    def __init__(self, mu=0.5, s0=0.8, flow=False, model_sampling=None):
        self.mu, self.s0, self.flow = mu, s0, flow
        self.model_sampling = model_sampling or (Flow(shift=3.0) if flow else VE())
        self.calls = 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return gaussian_denoiser(x, sigma, self.mu, self.s0, self.flow)


class GaussianCFGDenoiser(GaussianDenoiser):
    """Two Gaussians (conditional mean mu_c, unconditional mu_u) under CFG, exposing the unconditional estimate."""

    def __init__(self, mu_c=1.0, mu_u=-0.5, s0=0.8, cfg=3.0, flow=False):
        super().__init__(mu_c, s0, flow)
        self.mu_u, self.cfg = mu_u, cfg

    def denoise_with_uncond(self, x, sigma, **kwargs):
        self.calls += 1
        cond = gaussian_denoiser(x, sigma, self.mu, self.s0, self.flow)
        uncond = gaussian_denoiser(x, sigma, self.mu_u, self.s0, self.flow)
        return uncond + self.cfg * (cond - uncond), uncond

    def __call__(self, x, sigma, **kwargs):
        return self.denoise_with_uncond(x, sigma)[0]


class AnalyticNetwork(nn.Module):
    """A 'network' whose raw output is the exact prediction for Gaussian data with a context-given mean.

    mu is the mean of the context's first feature over tokens (per batch
    item), so different prompts give different targets and CFG is exercised.
    It predicts eps (VE models) or the flow velocity (flow models).
    """

    def __init__(self, model_sampling, s0=0.8):
        super().__init__()
        self.ms = model_sampling
        self.s0 = s0
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.calls = []

    def forward(self, x_in, timestep, context, pooled=None):
        self.calls.append(x_in.shape[0])
        sigma = self.ms.sigma(timestep).to(x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1)))
        mu = context[:, :, 0].mean(dim=1).reshape(-1, *([1] * (x_in.ndim - 1)))
        if self.ms.is_flow:
            x = x_in
            d = gaussian_denoiser(x, sigma, mu, self.s0, flow=True)
            return (x - d) / sigma  # velocity n - x0 so that x - sigma v = D
        sd = self.ms.sigma_data
        x = x_in * (sigma ** 2 + sd ** 2) ** 0.5
        d = gaussian_denoiser(x, sigma, mu, self.s0)
        kind = self.ms.prediction_type
        if kind == "x0":
            return d
        if kind in ("v", "edm"):  # invert denoised = x sd^2 / (s^2 + sd^2) -+ out s sd / sqrt(s^2 + sd^2)
            out = (x * sd ** 2 / (sigma ** 2 + sd ** 2) - d) * (sigma ** 2 + sd ** 2) ** 0.5 / (sigma * sd)
            return out if kind == "v" else -out
        return (x - d) / sigma


MODEL_KINDS = ("eps", "v", "v_zsnr", "x0", "edm", "flow")


def analytic_model(flow: bool = False, channels: int = 4, kind: str | None = None) -> DiffusionModel:
    """A DiffusionModel over the analytic network: eps on SD's discrete schedule, or flow with shift 3; ``kind``
    picks any of MODEL_KINDS (v with zero terminal SNR, x0, EDM) instead."""
    kind = kind or ("flow" if flow else "eps")
    ms = {"eps": lambda: EPS(), "v": lambda: V(), "v_zsnr": lambda: V(zero_terminal_snr=True), "x0": lambda: X0(),
          "edm": lambda: EDM(sigma_min=0.002, sigma_max=120.0, sigma_data=0.5), "flow": lambda: Flow(shift=3.0)}[kind]()
    return DiffusionModel(AnalyticNetwork(ms), ms, LatentFormat(channels, scale_factor=1.0), name="analytic")


def conditioning(value: float, tokens: int = 4, dim: int = 8, **opts):
    """ComfyUI-format conditioning whose first feature averages to ``value``."""
    ctx = torch.zeros(1, tokens, dim)
    ctx[:, :, 0] = value
    return [[ctx, dict(opts)]]
