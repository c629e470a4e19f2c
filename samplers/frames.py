"""Run a VE-form sampler on any model through the VE-equivalent frame.

A state ``x = alpha * x0 + sigma * n`` is, divided by ``alpha``, the VE state
``x0 + sigma_ve * n`` with ``sigma_ve = sigma / alpha = exp(-lambda)``.  Both
frames share the denoised estimate, so a sampler written for VE models is exact
for flow models when it runs on ``x / alpha`` and ``sigma_ve`` and the result
is multiplied back by ``alpha``.  For VE models the frame is the identity.
"""
from __future__ import annotations

import functools
import math

import torch

from ..models.sampling import VE, get_model_sampling
from .traits import get_traits, traits

_VE = VE()


class VEGeometryView:
    """The same denoiser, reporting VE geometry: how ComfyUI runs some samplers on flow models (compat mode)."""

    model_sampling = _VE

    def __init__(self, model):
        self.model = model
        if hasattr(model, "denoise_with_uncond"):
            self.denoise_with_uncond = model.denoise_with_uncond

    def __call__(self, x, sigma, **kwargs):
        return self.model(x, sigma, **kwargs)


class VEFrameModel:
    """A denoiser called in the VE frame: D_ve(x_ve, sigma_ve) = D(alpha * x_ve, sigma)."""

    model_sampling = _VE

    def __init__(self, model, model_sampling):
        self.model, self.ms = model, model_sampling
        if hasattr(model, "denoise_with_uncond"):
            self.denoise_with_uncond = self._denoise_with_uncond

    def _native(self, x_ve, sigma_ve):
        sigma = self.ms.sigma_from_half_log_snr(-sigma_ve.log())
        alpha = self.ms.alpha(sigma)
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.reshape(alpha.shape[:1] + (1,) * (x_ve.ndim - 1)).to(x_ve.dtype)
        return x_ve * alpha, sigma

    def __call__(self, x_ve, sigma_ve, **kwargs):
        x, sigma = self._native(x_ve, sigma_ve)
        return self.model(x, sigma, **kwargs)

    def _denoise_with_uncond(self, x_ve, sigma_ve, **kwargs):
        x, sigma = self._native(x_ve, sigma_ve)
        return self.model.denoise_with_uncond(x, sigma, **kwargs)


def in_ve_frame(fn, comfy_runs_it_raw: bool = True, comfy_variant=None):
    """Wrap a VE-form sampler so that it is exact on any model sampling (see module docstring).

    ``comfy_runs_it_raw``: ComfyUI runs this sampler directly on flow sigmas;
    the unwrapped function (or ``comfy_variant``) stays reachable as
    ``comfy_variant`` for compat mode.
    """
    @functools.wraps(fn)
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        ms = get_model_sampling(model)
        if not ms.is_flow:  # the VE frame of a VE model is the identity
            return fn(model, x, sigmas, extra_args, callback, disable, **options)
        sig = [float(s) for s in ms.offset_first_sigma(sigmas.detach().cpu()).tolist()]
        sig_ve = torch.tensor([math.exp(-ms.half_log_snr(s)) if s > 0 else 0.0 for s in sig], dtype=sigmas.dtype)
        alphas = [ms.alpha(s) for s in sig]

        def frame_cb(info):
            i = info.get("i", 0)
            info = dict(info)
            info["x"] = info["x"] * alphas[min(i, len(alphas) - 1)]
            return callback(info)

        out = fn(VEFrameModel(model, ms), x / alphas[0], sig_ve.to(sigmas.device), extra_args,
                 frame_cb if callback is not None else None, disable, **options)
        return out * alphas[-1]

    base = get_traits(fn)
    traits(comfy_compat=comfy_runs_it_raw, noise=base.noise, cfg_pp=base.cfg_pp,
           discard_penultimate_sigma=base.discard_penultimate_sigma)(sampler)
    if comfy_runs_it_raw:
        sampler.comfy_variant = comfy_variant or fn
    return sampler
