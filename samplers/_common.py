"""Shared pieces of the samplers: the k-diffusion protocol helpers."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from ..models.sampling import get_model_sampling
from .noise import default_noise_sampler

__all__ = ["to_d", "step_range", "sigma_batch", "denoise_with_uncond", "resolve_noise_sampler",
           "get_model_sampling", "as_float_list", "emit", "renoise", "neg_expm1", "h_phi_2", "run_steps",
           "ancestral_schedule", "denoise_at"]


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """ODE derivative dx/dsigma = (x - D(x)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def neg_expm1(v: float) -> float:
    """1 - exp(-v), accurate for small v (the exponential integrators' phi_1 times h)."""
    return -math.expm1(-v)


def h_phi_2(v: float) -> float:
    """h * phi_2(h) = (e^h - 1 - h) / h, at h = v."""
    return (math.expm1(v) - v) / v


def as_float_list(sigmas: Tensor) -> list[float]:
    """Sigmas as Python floats: cheap scalar maths for the step coefficients (no tiny tensor ops)."""
    return [float(s) for s in sigmas.detach().cpu().tolist()]


def step_range(n: int, disable: Optional[bool]) -> Iterable[int]:
    """range(n), or a tqdm progress bar over it unless ``disable`` is True."""
    if disable is True or n <= 0:
        return range(n)
    from tqdm.auto import trange
    return trange(n, disable=disable)


def sigma_batch(x: Tensor, sigma: float) -> Tensor:
    """A per-item sigma tensor for the model call."""
    return x.new_full((x.shape[0],), sigma)


def emit(callback: Optional[Callable], x: Tensor, i: int, sigma: float, denoised: Tensor, sigma_hat: float | None = None) -> None:
    """Call a k-diffusion-style step callback."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                  "denoised": denoised})


def denoise_at(model, x: Tensor, i: int, sigma: float, extra_args: dict,
               callback: Optional[Callable]) -> Tensor:
    """The model's denoised estimate at step i's sigma, reported to ``callback``."""
    denoised = model(x, sigma_batch(x, sigma), **extra_args)
    emit(callback, x, i, sigma, denoised)
    return denoised


def run_steps(model, x: Tensor, sigmas, extra_args: dict, callback: Optional[Callable], disable: Optional[bool],
              step: Callable[[Tensor, Tensor, int], Tensor]) -> Tensor:
    """The step loop of the one-estimate-per-step samplers (k-diffusion's protocol).

    Step i denoises at ``sigmas[i]`` and reports it to ``callback``; a step to sigma 0 ends at that
    estimate, any other step is ``x = step(x, denoised, i)``.
    """
    for i in step_range(len(sigmas) - 1, disable):
        denoised = denoise_at(model, x, i, float(sigmas[i]), extra_args, callback)
        x = denoised if sigmas[i + 1] == 0 else step(x, denoised, i)
    return x


def ancestral_schedule(model, x: Tensor, sigmas: Tensor, extra_args: dict, eta: float, noise_sampler):
    """What the ancestral two-stage loops set up: the model sampling, the noise sampler, the sigmas (tensor
    and floats), and per step sigma_down (0-d tensors), sigma_up and the re-noise scale (floats)."""
    ms = get_model_sampling(model)
    noise_sampler = resolve_noise_sampler(noise_sampler, x, extra_args)
    sig_t = sigmas.detach().cpu()
    sig = as_float_list(sigmas)
    downs_t, ups, scales = ms.ancestral_steps(sig_t, eta)
    return ms, noise_sampler, sig_t, sig, downs_t, as_float_list(ups), as_float_list(scales)


def denoise_with_uncond(model, x: Tensor, sigma: float, extra_args: dict,
                        cfg1_shortcut: bool = False) -> tuple[Tensor, Tensor]:
    """Guided and unconditional denoised estimates, for the CFG++ samplers (Chung et al. 2024).

    A guided denoiser exposes ``denoise_with_uncond``; a bare denoiser has no
    guidance, so its unconditional estimate is the estimate itself.
    ``cfg1_shortcut``: at cfg = 1 skip the unconditional pass and return the
    guided estimate as the unconditional one (ComfyUI's cfgpp_ud10_ab does).
    """
    fn = getattr(model, "denoise_with_uncond", None)
    if fn is not None:
        if cfg1_shortcut:
            return fn(x, sigma_batch(x, sigma), cfg1_shortcut=True, **extra_args)
        return fn(x, sigma_batch(x, sigma), **extra_args)
    denoised = model(x, sigma_batch(x, sigma), **extra_args)
    return denoised, denoised


def renoise(x: Tensor, scale: float, noise: Tensor, amount: float) -> Tensor:
    """The ancestral update x * scale + amount * noise (scale is 1 for VE models)."""
    if scale != 1.0:
        x = x * scale
    return torch.add(x, noise, alpha=amount) if amount != 0 else x


def resolve_noise_sampler(noise_sampler, x: Tensor, extra_args: dict):
    """The caller's noise sampler, or a seeded default (never the global RNG)."""
    if noise_sampler is not None:
        return noise_sampler
    return default_noise_sampler(x, seed=extra_args.get("seed"))


def ancestral_setup(model, x: Tensor, sigmas: Tensor, extra_args: Optional[dict], noise_sampler) -> tuple:
    """The opening of an ancestral sampler: ``extra_args`` (a dict), the model sampling, the noise sampler
    (``resolve_noise_sampler``) and the sigmas as floats."""
    extra_args = {} if extra_args is None else extra_args
    return (extra_args, get_model_sampling(model), resolve_noise_sampler(noise_sampler, x, extra_args),
            as_float_list(sigmas))
