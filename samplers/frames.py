"""Run a VE-form sampler on any model through the VE-equivalent frame (``in_ve_frame``, ``VEFrameModel``).

A state ``x = alpha * x0 + sigma * n`` is, divided by ``alpha``, the VE state
``x0 + sigma_ve * n`` with ``sigma_ve = sigma / alpha = exp(-lambda)``.  Both
frames share the denoised estimate, so a sampler written for VE models is exact
for flow models when it runs on ``x / alpha`` and ``sigma_ve`` and the result
is multiplied back by ``alpha``.  For VE models the frame is the identity.
"""
from __future__ import annotations

import functools

import torch

from ..models.sampling import VE, get_model_sampling

_VE = VE()


class VEFrameModel:
    """A denoiser called in the VE frame: D_ve(x_ve, sigma_ve) = D(alpha * x_ve, sigma)."""

    model_sampling = _VE

    def __init__(self, model, model_sampling):
        self.model, self.ms = model, model_sampling
        if hasattr(model, "denoise_with_uncond"):
            self.denoise_with_uncond = self._denoise_with_uncond

    def _native(self, x_ve, sigma_ve):
        sigma = self.ms.from_ve(sigma_ve)
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


def in_ve_frame(fn):
    """Wrap a VE-form sampler so that it is exact on any model sampling (see module docstring); keeps its traits."""
    @functools.wraps(fn)
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        ms = get_model_sampling(model)
        if not ms.is_flow:  # the VE frame of a VE model is the identity
            return fn(model, x, sigmas, extra_args, callback, disable, **options)
        sig = [float(s) for s in ms.offset_first_sigma(sigmas.detach().cpu()).tolist()]
        sig_ve = torch.tensor([ms.to_ve(s) if s > 0 else 0.0 for s in sig], dtype=sigmas.dtype)
        alphas = [ms.alpha(s) for s in sig]

        def frame_cb(info):
            i = info.get("i", 0)
            info = dict(info)
            info["x"] = info["x"] * alphas[min(i, len(alphas) - 1)]
            return callback(info)

        out = fn(VEFrameModel(model, ms), x / alphas[0], sig_ve.to(sigmas.device), extra_args,
                 frame_cb if callback is not None else None, disable, **options)
        return out * alphas[-1]

    return sampler
