"""The headless pipeline: noise, schedule, guidance, inpainting and a registered sampler, end to end.

``sample`` runs one pass on tensors (the Python API): it checks its inputs,
builds the denoiser (guidance, inpainting blend, NaN checks) and the starting
state, and hands them to ``sampling_pass.run_sampler``, which the ComfyUI
adapter calls too.  ``ksample`` adds the KSampler node's semantics (seeded CPU
noise, ``batch_index``, the denoise rule, advanced start/end steps, latent
formats) for our own models.  Neither touches the global RNG nor changes
anything the caller passed.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .conditioning import Guidance, GuidanceSchedule, KSamplerInputError
from .graph_checks import check_graph, headless_spec
from .guard import all_finite, check_output_shape, nonfinite_error
from .validation import (LATENT_LAYOUTS, MAX_SEED, MAX_STEPS, MAX_MAGNITUDE, check_batch_index, check_bool,
                         check_int, check_model, check_noise_mask, check_tensor)
from .models.sampling import ModelSampling
from .samplers import sampler_traits
from .samplers.noise import check_variation, initial_noise, variation_noise
from .sampling_pass import NoiseOptions, StepCallback, check_sampler_args, resolve_sampler, run_sampler
from .schedulers import ksampler_sigmas

__all__ = ["NoiseOptions", "sample", "ksample", "prepare_mask", "max_denoise", "StepCallback", "fix_empty_latent_channels"]

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
                 check_finite=True, sampler_name: str = "custom", model_name: str = "the model"):
        self.inner, self.model_sampling = inner, model_sampling
        self.sampler_name, self.model_name = sampler_name, model_name
        self.sigmas, self.mask, self.latent, self.inpaint_noise = sigmas, mask, latent, inpaint_noise
        self.check_finite = check_finite
        self.steps_done = 0
        self.last_denoised = None   # the latest model evaluation's denoised estimate (previews)
        if hasattr(inner, "denoise_with_uncond"):
            self.denoise_with_uncond = self._denoise_with_uncond

    def _blend_in(self, x, sigma):
        if self.mask is None:
            return x
        known = self.model_sampling.noise_scaling(sigma.reshape([sigma.shape[0]] + [1] * (x.ndim - 1)),
                                                  self.inpaint_noise, self.latent)
        return x * self.mask + known * (1.0 - self.mask)

    def _blend_out(self, out):
        if self.mask is None:
            return out
        return out * self.mask + self.latent * (1.0 - self.mask)

    def _check(self, out: Tensor, sigma: Tensor, what: str) -> None:
        if self.check_finite and not all_finite(out):
            total = len(self.sigmas) - 1
            raise nonfinite_error(what, min(self.steps_done + 1, total), total, float(sigma.reshape(-1)[0]),
                                  self.sampler_name, self.model_name)

    def __call__(self, x, sigma, **extra):
        out = self.inner(self._blend_in(x, sigma), sigma, **extra)
        check_output_shape(out, x, self.model_name)
        self._check(out, sigma, "denoised estimate")
        self.last_denoised = self._blend_out(out)
        return self.last_denoised

    def _denoise_with_uncond(self, x, sigma, **extra):
        out, uncond = self.inner.denoise_with_uncond(self._blend_in(x, sigma), sigma, **extra)
        check_output_shape(out, x, self.model_name)
        self._check(out, sigma, "denoised estimate")
        self.last_denoised = self._blend_out(out)
        return self.last_denoised, self._blend_out(uncond)


def _as_sigmas(sigmas) -> Tensor:
    if not isinstance(sigmas, Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise KSamplerInputError(f"sigmas: expected a 1-D tensor of noise levels, got {type(sigmas).__name__}")
    if sigmas.device.type == "meta":
        raise KSamplerInputError("sigmas: the tensor is on the 'meta' device and holds no data; build the sigmas "
                                 "with a scheduler from the registry (schedulers.sampling_sigmas)")
    if sigmas.is_complex():
        raise KSamplerInputError(f"sigmas: dtype {sigmas.dtype} is not real numbers; use float32")
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
    if len(sigmas) and float(sigmas[0]) > MAX_MAGNITUDE:
        raise KSamplerInputError(f"sigmas: the largest noise level is {float(sigmas[0]):g}, past {MAX_MAGNITUDE:g} "
                                 "(real schedules start below a few thousand; larger ones overflow float32); build "
                                 "the sigmas with a scheduler from the registry")
    return sigmas


_MODEL_SAMPLING_NEEDS = ("sigma_max", "noise_scaling", "inverse_noise_scaling")


def _checked_inputs(model, model_sampling, noise, latent, noise_mask, sigmas) -> tuple:
    """(model_sampling, mask batch size, sigmas) after the checks on the tensors ``sample`` is given."""
    if model_sampling is None:
        model_sampling = getattr(model, "model_sampling", None)
        if model_sampling is None:
            raise KSamplerInputError("model_sampling: the model has no .model_sampling; pass one (e.g. models.EPS())")
    missing = [a for a in _MODEL_SAMPLING_NEEDS if not hasattr(model_sampling, a)]
    if missing:
        raise KSamplerInputError(f"model_sampling: expected a ModelSampling (e.g. models.EPS(), or the model's "
                                 f".model_sampling), got {type(model_sampling).__name__} without {', '.join(missing)}")
    check_tensor(noise, "noise", "draw it with torch.randn (samplers.noise.prepare_noise)", min_dims=2)
    check_tensor(latent, "latent", "re-encode the image or start from zeros", min_dims=2)
    if noise.shape != latent.shape:
        raise KSamplerInputError(f"noise: shape {tuple(noise.shape)} differs from latent {tuple(latent.shape)}")
    mask_batch = 1
    if noise_mask is not None:
        if latent.ndim not in LATENT_LAYOUTS:
            raise KSamplerInputError(f"noise_mask: masks need a latent of layout "
                                     f"{' or '.join(LATENT_LAYOUTS.values())}; the latent has shape "
                                     f"{tuple(latent.shape)}")
        mask_batch = check_noise_mask(noise_mask, latent.shape)
    return model_sampling, mask_batch, _as_sigmas(sigmas)


def _checked_noise_options(noise_options) -> NoiseOptions:
    """``noise_options`` (None: the defaults) after checking its type (NoiseOptions checks its flags)."""
    if noise_options is None:
        return NoiseOptions()
    if not isinstance(noise_options, NoiseOptions):
        raise KSamplerInputError(f"noise_options: expected a NoiseOptions (e.g. NoiseOptions(batch_invariant=True)), "
                                 f"got {type(noise_options).__name__}")
    return noise_options


def _checked_options(sampler, sampler_options, noise_options, seed) -> tuple:
    """(traits, noise options, seed) after the checks on ``sample``'s options."""
    _, _, tr = resolve_sampler(sampler)
    noise_options = _checked_noise_options(noise_options)
    if sampler_options is not None and not isinstance(sampler_options, dict):
        raise KSamplerInputError(f"sampler_options: expected a dict, got {type(sampler_options).__name__}")
    if sampler_options and sampler_options.get("return_info", False) is not False:
        # sample() returns the final latent only; k-diffusion's info dict has nowhere to go
        raise KSamplerInputError(f"sampler_options['return_info']: not supported (got "
                                 f"{sampler_options['return_info']!r}); sample() returns the latent only: remove it "
                                 "and read the step count with a callback")
    return tr, noise_options, 0 if seed is None else check_int("seed", seed, 0, MAX_SEED)


def _guided(model, model_sampling, guidance: Optional[Guidance], schedule: Optional[GuidanceSchedule],
            sigmas: Tensor, shape, device):
    """The denoiser to sample: ``guidance`` bound to the model (its scale read from ``schedule``), or ``model``."""
    if schedule is not None and not isinstance(schedule, GuidanceSchedule):
        raise KSamplerInputError(f"guidance_schedule: expected a GuidanceSchedule, got {type(schedule).__name__}")
    if guidance is not None and not isinstance(guidance, Guidance):
        raise KSamplerInputError(f"guidance: expected a conditioning.Guidance(positive, negative, cfg) or None, got "
                                 f"{type(guidance).__name__}")
    scheduled = schedule is not None and not schedule.is_default
    if guidance is None:
        if scheduled:
            raise KSamplerInputError("guidance_schedule: needs guidance (positive/negative conditioning and a cfg); "
                                     "a bare denoiser has no CFG to schedule")
        return model
    inner = guidance.bind(model, model_sampling, shape, device)
    if scheduled:
        inner.cfg_of = schedule.bind(sigmas.tolist(), guidance.cfg)
    return inner


def _inpaint_noise(noise: Tensor, seed: int, random: bool, device) -> Tensor:
    """The noise that re-noises the kept region: the initial noise, or a fresh seeded draw (``random_inpaint_noise``)."""
    if not random:
        return noise
    gen = torch.Generator("cpu").manual_seed((seed + 1) % (1 << 64))
    return torch.randn(noise.shape, generator=gen).to(device)


def _reference_mode(reference_mode, compat) -> Optional[bool]:
    """``reference_mode``, or its former name ``compat`` when given: a bool (None: the default, as the nodes pass)."""
    if compat is not None:
        return check_bool("compat", compat)
    return reference_mode if reference_mode is None else check_bool("reference_mode", reference_mode)


def sample(model, model_sampling: Optional[ModelSampling], noise: Tensor, latent: Tensor, sigmas: Tensor,
           guidance: Optional[Guidance] = None, sampler: Union[str, Callable] = "euler", seed: Optional[int] = 0, *,
           noise_mask: Optional[Tensor] = None, callback: Optional[StepCallback] = None, disable: bool = True,
           sampler_options: Optional[dict] = None, noise_options: Optional[NoiseOptions] = None,
           batch_index: Optional[Sequence[int]] = None, reference_mode: bool = False, check_finite: bool = True,
           compat: Optional[bool] = None, guidance_schedule: Optional[GuidanceSchedule] = None,
           preview: str = "default") -> Tensor:
    """Run one sampling pass and return the final latent (in the model's latent space, float32).

    model: with ``guidance``, an object with ``apply_model(x, sigma, context=..., pooled=...)``
        returning the denoised estimate (``models.DiffusionModel``); without it, any
        k-diffusion denoiser ``model(x, sigma) -> denoised``.
    model_sampling: the model's ``ModelSampling`` (default: ``model.model_sampling``).
    noise, latent: the initial noise and the latent to start from (zeros for txt2img).
    sigmas: descending noise levels ending in 0 (``schedulers.sampling_sigmas``).
    sampler: a registry name or a k-diffusion-protocol function (its traits travel with it).
    seed: seeds the ancestral / SDE noise (ComfyUI's seed semantics).
    noise_mask: 1 where the latent is re-generated, 0 where it is kept (inpainting).
    callback: ``callback(step, denoised, x, total_steps)`` after every step; raising aborts the run.
    reference_mode: run the samplers listed in ``samplers.reference.REFERENCE_VARIANTS`` exactly as
        ComfyUI does (``compat`` is its former name).
    sampler_options (validated: ``samplers.options``), guidance_schedule (``conditioning.schedule``), preview (PREVIEWS).
    """
    reference_mode = _reference_mode(reference_mode, compat)
    check_bool("check_finite", check_finite)
    if callback is not None and not callable(callback):
        raise KSamplerInputError(f"callback: expected a function callback(step, denoised, x, total_steps), got "
                                 f"{type(callback).__name__}")
    model_sampling, mask_batch, sigmas = _checked_inputs(model, model_sampling, noise, latent, noise_mask, sigmas)
    batch_index = check_batch_index(batch_index, latent.shape[0])
    if len(sigmas) <= 1:
        return latent.float().clone()
    tr, noise_options, seed = _checked_options(sampler, sampler_options, noise_options, seed)
    if noise_options.batch_invariant and tr.batch_coupled and latent.shape[0] > 1:
        indices = list(batch_index) if batch_index is not None else list(range(latent.shape[0]))
        items = [sample(model, model_sampling, noise[k:k + 1], latent[k:k + 1], sigmas, guidance, sampler, seed,
                        noise_mask=noise_mask[k:k + 1] if mask_batch > 1 else noise_mask, callback=callback,
                        disable=disable, sampler_options=sampler_options, noise_options=noise_options,
                        batch_index=[indices[k]], reference_mode=reference_mode, check_finite=check_finite,
                        guidance_schedule=guidance_schedule, preview=preview) for k in range(latent.shape[0])]
        return torch.cat(items)

    device = model.device if isinstance(getattr(model, "device", None), torch.device) else latent.device
    noise = noise.to(device=device, dtype=torch.float32)
    latent = latent.to(device=device, dtype=torch.float32)
    inner = _guided(model, model_sampling, guidance, guidance_schedule, sigmas, latent.shape, device)
    mask = prepare_mask(noise_mask, latent.shape, device) if noise_mask is not None else None
    inpaint_noise = _inpaint_noise(noise, seed, mask is not None and tr.random_inpaint_noise, device)
    denoiser = _Denoiser(inner, model_sampling, [float(s) for s in sigmas.tolist()], mask=mask, latent=latent,
                         inpaint_noise=inpaint_noise, check_finite=check_finite,
                         sampler_name=resolve_sampler(sampler)[0] or "custom",
                         model_name=repr(getattr(model, "name", None) or type(model).__name__))
    x = model_sampling.noise_scaling(sigmas.to(device)[0], noise, latent, max_denoise(model_sampling, sigmas))

    def on_step(i, denoised, x_i, total):
        denoiser.steps_done = i + 1  # names the step in NaN errors
        if callback is not None:
            callback(i, denoised, x_i, total)

    samples, final_sigma = run_sampler(sampler, denoiser, x, sigmas.to(device), seed=seed, extra_args={},
                                       noise_options=noise_options, batch_index=batch_index,
                                       reference_mode=reference_mode, options=sampler_options, on_step=on_step,
                                       disable=disable, preview=preview)
    last = float(sigmas[-1]) if final_sigma is None else final_sigma
    return model_sampling.inverse_noise_scaling(torch.tensor(last, device=device), samples).float()


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
            noise_options: Optional[NoiseOptions] = None, reference_mode: bool = False,
            sampler_options: Optional[dict] = None, scheduler_options: Optional[dict] = None,
            compat: Optional[bool] = None, calibration=None, variation_seed: Optional[int] = None,
            variation_strength: float = 0.0, guidance_schedule: Optional[GuidanceSchedule] = None,
            preview: str = "default") -> dict:
    """The KSampler node's behaviour on one of our models; returns a new latent dict.

    calibration: a ``calibration.Calibration`` whose sigmas and sampler replace ``sampler_name`` and ``scheduler``.
    variation_seed, variation_strength: mix the variation seed's initial noise into the seed's
        (variance-preserving; 0 is the seed's latent, 1 the variation seed's); ignored without added noise.
    guidance_schedule, preview: see ``sample``.

    reference_mode (formerly ``compat``): see ``sample``.
    """
    reference_mode = _reference_mode(reference_mode, compat)
    check_model(model)
    check_sampler_args(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                       denoise=denoise)
    check_bool("add_noise", add_noise)
    check_bool("force_full_denoise", force_full_denoise)
    for name, step in (("start_step", start_step), ("last_step", last_step)):
        if step is not None:  # KSampler Advanced's start_at_step / end_at_step: 0 to 10000
            check_int(name, step, 0, MAX_STEPS)
    if scheduler_options is not None and not isinstance(scheduler_options, dict):
        raise KSamplerInputError(f"scheduler_options: expected a dict of the scheduler's options (e.g. "
                                 f"{{'rho': 7.0}} for karras), got {type(scheduler_options).__name__}")
    samples, batch_index, noise_mask = check_graph(headless_spec(model), positive, negative, latent, cfg,
                                                   sampler_traits(sampler_name).cfg_pp)
    guidance = Guidance(positive, negative, cfg)
    noise_options = _checked_noise_options(noise_options)
    samples = fix_empty_latent_channels(samples, model.latent_format.latent_channels)

    noise = initial_noise(samples, seed, batch_index, add_noise, noise_options.batch_invariant)
    if add_noise:
        noise = variation_noise(noise, samples, check_variation(variation_seed, variation_strength),
                                variation_strength, batch_index, noise_options.batch_invariant)
    tr = sampler_traits(sampler_name)
    ms = model.model_sampling
    sigmas = ksampler_sigmas(ms, scheduler, steps, denoise, tr.discard_penultimate_sigma, start_step, last_step,
                             force_full_denoise, **(scheduler_options or {}))
    sampler = sampler_name
    if calibration is not None:
        from .calibration import run_sigmas
        try:
            sigmas, sampler = run_sigmas(calibration, steps, cfg, denoise, ms), calibration.sampler()
        except ValueError as exc:
            raise KSamplerInputError(str(exc)) from exc
    out = dict(latent)
    if len(sigmas) <= 1:  # denoise 0, or a start step past the end: nothing to do
        out["samples"] = samples.float().clone()
        return out

    fmt = model.latent_format
    # in the latent's own dtype, then float32, as ComfyUI does (a float16 latent is scaled in float16)
    latent_in = fmt.process_in(samples).float() if torch.count_nonzero(samples) > 0 else samples.float()
    result = sample(model, ms, noise, latent_in, sigmas, guidance, sampler, seed, noise_mask=noise_mask,
                    callback=callback, disable=disable, sampler_options=sampler_options,
                    noise_options=noise_options, batch_index=batch_index, reference_mode=reference_mode,
                    guidance_schedule=guidance_schedule, preview=preview)
    out["samples"] = fmt.process_out(result).float().cpu()
    return out
