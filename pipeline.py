"""The sampling pass: noise, schedule, guidance and a registered sampler, end to end.

``sample`` runs one pass on tensors (the Python API); ``ksample`` adds the
KSampler node's semantics (seeded CPU noise, ``batch_index``, the denoise
rule, advanced start/end steps, latent formats) for our own models.  Neither
touches the global RNG nor changes anything the caller passed.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .conditioning import Guidance, KSamplerInputError
from .validation import (LATENT_LAYOUTS, MAX_SEED, check_int, check_latent, check_model, check_noise_mask,
                         check_sampler_args)
from .models.sampling import ModelSampling
from .samplers import final_sigma, get_sampler, sampler_traits
from .samplers.frames import VEGeometryView
from .samplers.traits import compat_variant
from .samplers.noise import (BrownianPathNoiseSampler, BrownianTreeNoiseSampler, default_noise_sampler, initial_noise,
                             item_seed)
from .schedulers import ksampler_sigmas

__all__ = ["NoiseOptions", "sample", "ksample", "prepare_mask", "max_denoise", "StepCallback"]

# callback(step, denoised, x, total_steps), ComfyUI's signature
StepCallback = Callable[[int, Tensor, Tensor, int], None]


@dataclass(frozen=True)
class NoiseOptions:
    """Noise behaviour beyond ComfyUI (all off by default, which is ComfyUI's behaviour).

    batch_invariant: item k's initial, ancestral and SDE noise depend only on the
        seed and k (its ``batch_index`` entry when given), never on the batch size.
    device_invariant: every extra noise draw is made on the CPU, so CPU and CUDA
        runs agree within float tolerance.
    brownian: "tree" (torchsde's Brownian tree, ComfyUI's values) or "fast" (a
        lazily sampled Brownian path with the same law, one draw per step).
    """

    batch_invariant: bool = False
    device_invariant: bool = False
    brownian: str = "tree"

    def __post_init__(self):
        if self.brownian not in ("tree", "fast"):
            raise KSamplerInputError(f"brownian: must be 'tree' or 'fast', got {self.brownian!r}")


def max_denoise(model_sampling, sigmas: Tensor) -> bool:
    """Whether sampling starts at (or above) the model's largest sigma: then the noise is sqrt(1 + sigma^2)-scaled."""
    sigma_max = float(model_sampling.sigma_max)
    sigma = float(sigmas[0])
    return math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max


def prepare_mask(noise_mask: Tensor, shape: Sequence[int], device) -> Tensor:
    """Resize an inpainting mask to a latent of ``shape`` ([B, C, L], [B, C, H, W] or [B, C, T, H, W]).

    The mask is resized (linear, bilinear or trilinear) over the spatial dims, then repeated over channels and
    batch.  Image masks lead with the batch; video masks below rank 5 stack frames (ComfyUI's conventions).
    """
    spatial = len(shape) - 2
    mask = noise_mask.float()
    if spatial == 2:
        mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
    elif spatial == 3 and mask.ndim < 5:
        mask = mask.reshape((1, 1, -1) + tuple(mask.shape[-2:]))
    elif mask.ndim < len(shape):  # audio: [L] or [B, L]
        mask = mask.reshape((-1, 1, mask.shape[-1]))
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]
    mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:]), mode=mode)
    if mask.shape[1] < shape[1]:
        mask = mask.repeat((1, shape[1]) + (1,) * spatial)[:, :shape[1]]
    if mask.shape[0] < shape[0]:
        mask = mask.repeat((math.ceil(shape[0] / mask.shape[0]),) + (1,) * (len(shape) - 1))
    return mask[:shape[0]].to(device)


class _Denoiser:
    """What samplers call: the (guided) model, with inpainting, progress and NaN checks around it."""

    def __init__(self, inner, model_sampling, sigmas: list[float], *, mask=None, latent=None, inpaint_noise=None,
                 inpaint_sampling=None, check_finite=True):
        self.inner, self.model_sampling = inner, model_sampling
        self.inpaint_sampling = inpaint_sampling or model_sampling
        self.sigmas, self.mask, self.latent, self.inpaint_noise = sigmas, mask, latent, inpaint_noise
        self.check_finite = check_finite
        self.steps_done = 0
        if hasattr(inner, "denoise_with_uncond"):
            self.denoise_with_uncond = self._denoise_with_uncond

    def _blend_in(self, x, sigma):
        if self.mask is None:
            return x
        known = self.inpaint_sampling.noise_scaling(sigma.reshape([sigma.shape[0]] + [1] * (x.ndim - 1)),
                                                  self.inpaint_noise, self.latent)
        return x * self.mask + known * (1.0 - self.mask)

    def _blend_out(self, out):
        if self.mask is None:
            return out
        return out * self.mask + self.latent * (1.0 - self.mask)

    def _check(self, out: Tensor, sigma: Tensor, what: str) -> None:
        # one reduction pass: NaN and Inf propagate into the (float64) sum
        if self.check_finite and not math.isfinite(float(out.sum(dtype=torch.float64))):
            total = len(self.sigmas) - 1
            raise FloatingPointError(
                f"model: the {what} contains NaN or Inf at step {min(self.steps_done + 1, total)}/{total} "
                f"(sigma={float(sigma.reshape(-1)[0]):.6g}); check the model's weights and dtype (fp16 overflow is "
                "a common cause) and the conditioning")

    def __call__(self, x, sigma, **extra):
        out = self.inner(self._blend_in(x, sigma), sigma, **extra)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise RuntimeError(f"model: returned {getattr(out, 'shape', type(out).__name__)} for input shape "
                               f"{tuple(x.shape)}; the denoiser must return a tensor shaped like its input")
        self._check(out, sigma, "denoised estimate")
        return self._blend_out(out)

    def _denoise_with_uncond(self, x, sigma, **extra):
        out, uncond = self.inner.denoise_with_uncond(self._blend_in(x, sigma), sigma, **extra)
        self._check(out, sigma, "denoised estimate")
        return self._blend_out(out), self._blend_out(uncond)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _noise_sampler(kind: str, x: Tensor, sigmas: Tensor, seed: int, options: NoiseOptions, batch_index):
    if kind == "ancestral":
        return default_noise_sampler(x, seed, cpu=options.device_invariant, batch_invariant=options.batch_invariant,
                                     item_indices=batch_index)
    positive = sigmas[sigmas > 0]
    sigma_min, sigma_max = positive.min(), sigmas.max()
    on_cpu = kind == "brownian" or options.device_invariant
    if options.brownian == "fast":
        return BrownianPathNoiseSampler(x, seed, cpu=on_cpu, batch_invariant=options.batch_invariant,
                                        item_indices=batch_index)
    tree_seed = seed
    if options.batch_invariant:
        indices = list(range(x.shape[0])) if batch_index is None else list(batch_index)
        tree_seed = [item_seed(seed, k) for k in indices]
    return BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=tree_seed, cpu=on_cpu)


def _as_sigmas(sigmas) -> Tensor:
    if not isinstance(sigmas, Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        except (TypeError, ValueError):
            raise KSamplerInputError(f"sigmas: expected a 1-D tensor of noise levels, got {type(sigmas).__name__}")
    if sigmas.ndim != 1:
        raise KSamplerInputError(f"sigmas: expected a 1-D tensor, got shape {tuple(sigmas.shape)}")
    if not sigmas.is_floating_point():
        sigmas = sigmas.float()
    if not bool(torch.isfinite(sigmas).all()):
        raise KSamplerInputError("sigmas: contain NaN or Inf; build them with a scheduler from the registry")
    if len(sigmas) > 1 and bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise KSamplerInputError(f"sigmas: must be strictly descending, got {[round(float(s), 4) for s in sigmas]}")
    if len(sigmas) and float(sigmas[-1]) < 0:
        raise KSamplerInputError("sigmas: must not be negative")
    return sigmas


def sample(model, model_sampling: Optional[ModelSampling], noise: Tensor, latent: Tensor, sigmas: Tensor,
           guidance: Optional[Guidance] = None, sampler: Union[str, Callable] = "euler", seed: Optional[int] = 0, *,
           noise_mask: Optional[Tensor] = None, callback: Optional[StepCallback] = None, disable: bool = True,
           sampler_options: Optional[dict] = None, noise_options: Optional[NoiseOptions] = None,
           batch_index: Optional[Sequence[int]] = None, compat: bool = False, check_finite: bool = True) -> Tensor:
    """Run one sampling pass and return the final latent (in the model's latent space, float32).

    model: with ``guidance``, an object with ``apply_model(x, sigma, context=..., pooled=...)``
        returning the denoised estimate (``models.DiffusionModel``); without it, any
        k-diffusion denoiser ``model(x, sigma) -> denoised``.
    model_sampling: the model's ``ModelSampling`` (default: ``model.model_sampling``).
    noise, latent: the initial noise and the latent to start from (zeros for txt2img).
    sigmas: descending noise levels ending in 0 (``schedulers.sampling_sigmas``).
    sampler: a registry name or a k-diffusion-protocol function.
    seed: seeds the ancestral / SDE noise (ComfyUI's seed semantics).
    noise_mask: 1 where the latent is re-generated, 0 where it is kept (inpainting).
    callback: ``callback(step, denoised, x, total_steps)`` after every step; raising aborts the run.
    compat: run the samplers that differ from ComfyUI by design (``traits.comfy_compat``: flow
        geometry, dpmpp_2s_ancestral_cfg_pp's renoising) exactly as ComfyUI does, and those whose
        float32 rounding ComfyUI orders differently (``traits.comfy_rounding``) with its rounding.
    """
    if model_sampling is None:
        model_sampling = getattr(model, "model_sampling", None)
        if model_sampling is None:
            raise KSamplerInputError("model_sampling: the model has no .model_sampling; pass one (e.g. models.EPS())")
    for name, t in (("noise", noise), ("latent", latent)):
        if not isinstance(t, Tensor):
            raise KSamplerInputError(f"{name}: expected a tensor, got {type(t).__name__}")
    if noise.shape != latent.shape:
        raise KSamplerInputError(f"noise: shape {tuple(noise.shape)} differs from latent {tuple(latent.shape)}")
    mask_batch = 1
    if noise_mask is not None:
        if latent.ndim not in LATENT_LAYOUTS:
            raise KSamplerInputError(f"noise_mask: masks need a latent of layout "
                                     f"{' or '.join(LATENT_LAYOUTS.values())}; the latent has shape "
                                     f"{tuple(latent.shape)}")
        mask_batch = check_noise_mask(noise_mask, latent.shape)
    sigmas = _as_sigmas(sigmas)
    if len(sigmas) <= 1:
        return latent.float().clone()

    if isinstance(sampler, str):
        name, fn, tr = sampler, get_sampler(sampler), sampler_traits(sampler)
    elif callable(sampler):
        from .samplers.traits import get_traits
        name, fn, tr = getattr(sampler, "__name__", "custom"), sampler, get_traits(sampler)
    else:
        raise KSamplerInputError(f"sampler: expected a registry name or a function, got {type(sampler).__name__}")
    if noise_options is not None and not isinstance(noise_options, NoiseOptions):
        raise KSamplerInputError(f"noise_options: expected a NoiseOptions, got {type(noise_options).__name__}")
    if sampler_options is not None and not isinstance(sampler_options, dict):
        raise KSamplerInputError(f"sampler_options: expected a dict, got {type(sampler_options).__name__}")
    noise_options = noise_options or NoiseOptions()
    options = dict(sampler_options or {})
    seed = 0 if seed is None else check_int("seed", seed, 0, MAX_SEED)
    if noise_options.batch_invariant and tr.batch_coupled and latent.shape[0] > 1:
        indices = list(batch_index) if batch_index is not None else list(range(latent.shape[0]))
        masks = [noise_mask] * latent.shape[0]
        if mask_batch > 1:
            masks = [noise_mask[k:k + 1] for k in range(latent.shape[0])]
        items = [sample(model, model_sampling, noise[k:k + 1], latent[k:k + 1], sigmas, guidance, sampler, seed,
                        noise_mask=masks[k], callback=callback, disable=disable, sampler_options=sampler_options,
                        noise_options=noise_options, batch_index=[indices[k]], compat=compat,
                        check_finite=check_finite) for k in range(latent.shape[0])]
        return torch.cat(items)

    device = getattr(model, "device", None)
    if not isinstance(device, torch.device):
        device = latent.device
    noise = noise.to(device=device, dtype=torch.float32)
    latent = latent.to(device=device, dtype=torch.float32)
    sigmas_dev = sigmas.to(device)

    if guidance is not None:
        inner = guidance.bind(model, model_sampling, latent.shape, device)
    else:
        inner = model
    fn, ve_geometry = compat_variant(fn, tr, compat)
    if ve_geometry:
        inner = VEGeometryView(inner)
    elif not hasattr(inner, "model_sampling") or inner.model_sampling is not model_sampling:
        inner = _WithSampling(inner, model_sampling)

    mask = None
    inpaint_noise = noise
    if noise_mask is not None:
        mask = prepare_mask(noise_mask, latent.shape, device)
        if tr.random_inpaint_noise:
            gen = torch.Generator("cpu").manual_seed((seed + 1) % (1 << 64))
            inpaint_noise = torch.randn(noise.shape, generator=gen).to(device)
    sigma_list = [float(s) for s in sigmas.tolist()]
    denoiser = _Denoiser(inner, inner.model_sampling, sigma_list, mask=mask, latent=latent,
                         inpaint_noise=inpaint_noise, inpaint_sampling=model_sampling, check_finite=check_finite)

    x = model_sampling.noise_scaling(sigmas_dev[0], noise, latent, max_denoise(model_sampling, sigmas))

    if "noise_sampler" not in options and _accepts(fn, "noise_sampler"):
        # deterministic samplers take one too, for optional noise (churn): seeded like ancestral noise
        kind = tr.noise if tr.noise != "none" else "ancestral"
        options["noise_sampler"] = _noise_sampler(kind, x, sigmas, seed, noise_options, batch_index)

    total = len(sigmas) - 1

    def k_callback(info):
        denoiser.steps_done = info["i"] + 1  # names the step in NaN errors
        if callback is not None:
            callback(info["i"], info["denoised"], info["x"], total)

    extra_args = {}
    samples = fn(denoiser, x, sigmas_dev, extra_args=extra_args, callback=k_callback, disable=disable, **options)
    last = sigma_list[-1]
    if last == 0 and isinstance(sampler, str) and final_sigma(name) is not None:
        last = final_sigma(name)
    return model_sampling.inverse_noise_scaling(torch.tensor(last, device=device), samples).float()


class _WithSampling:
    """Attach a model sampling to a bare denoiser callable."""

    def __init__(self, fn, model_sampling):
        self.fn, self.model_sampling = fn, model_sampling
        if hasattr(fn, "denoise_with_uncond"):
            self.denoise_with_uncond = fn.denoise_with_uncond

    def __call__(self, x, sigma, **extra):
        return self.fn(x, sigma, **extra)


def fix_empty_latent_channels(latent: Tensor, channels: int) -> Tensor:
    """Widen an all-zero latent with the wrong channel count to the model's channels (ComfyUI's empty-latent fix)."""
    if latent.shape[1] != channels and torch.count_nonzero(latent) == 0:
        reps = math.ceil(channels / latent.shape[1])
        return latent.repeat((1, reps) + (1,) * (latent.ndim - 2))[:, :channels]
    return latent


def ksample(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
            latent: dict, denoise: float = 1.0, *, add_noise: bool = True, start_step: Optional[int] = None,
            last_step: Optional[int] = None, force_full_denoise: bool = False,
            callback: Optional[StepCallback] = None, disable: bool = True,
            noise_options: Optional[NoiseOptions] = None, compat: bool = False,
            sampler_options: Optional[dict] = None, scheduler_options: Optional[dict] = None) -> dict:
    """The KSampler node's behaviour on one of our models; returns a new latent dict."""
    check_model(model)
    samples, batch_index, noise_mask = check_latent(latent, model.latent_format.latent_channels,
                                                    dims=getattr(model.latent_format, "latent_dimensions", 2) + 2)
    check_sampler_args(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                       denoise=denoise)
    noise_options = noise_options or NoiseOptions()
    samples = fix_empty_latent_channels(samples, model.latent_format.latent_channels)

    noise = initial_noise(samples, seed, batch_index, add_noise, noise_options.batch_invariant)
    tr = sampler_traits(sampler_name)
    ms = model.model_sampling
    sigmas = ksampler_sigmas(ms, scheduler, steps, denoise, tr.discard_penultimate_sigma, start_step, last_step,
                             force_full_denoise, **(scheduler_options or {}))
    out = dict(latent)
    if len(sigmas) <= 1:  # denoise 0, or a start step past the end: nothing to do
        out["samples"] = samples.float().clone()
        return out

    fmt = model.latent_format
    latent_in = fmt.process_in(samples.float()) if torch.count_nonzero(samples) > 0 else samples.float()
    guidance = Guidance(positive, negative, cfg)
    result = sample(model, ms, noise, latent_in, sigmas, guidance, sampler_name, seed, noise_mask=noise_mask,
                    callback=callback, disable=disable, sampler_options=sampler_options,
                    noise_options=noise_options, batch_index=batch_index, compat=compat)
    out["samples"] = fmt.process_out(result).float().cpu()
    return out
