"""ComfyUI glue: our registries driving a ComfyUI model patcher through ComfyUI's own guidance path.

Imported only when ComfyUI is running (``comfy.samplers`` is loaded); the core
never imports this module.  What it relies on from the host is its documented
sampling protocol:

* ``comfy.samplers.Sampler``: ``sample(model_wrap, sigmas, extra_args, callback,
  noise, latent_image, denoise_mask, disable_pbar)``, the object that
  ``comfy.samplers.sample`` / ``CFGGuider`` / ``SamplerCustom`` accept as SAMPLER;
* ``comfy.samplers.KSamplerX0Inpaint``: the host's inpainting denoiser wrapper;
* ``comfy.sample.fix_empty_latent_channels`` and ``comfy.samplers.sample``: the
  host's latent fix, latent-format scaling, conditioning, ControlNets, hooks
  and model patches;
* ``latent_preview.prepare_callback``: progress bar and previews;
* ``comfy.model_management.throw_exception_if_processing_interrupted``: stop requests;
* ``model_options['sampler_post_cfg_function']`` (with
  ``disable_cfg1_optimization``) to read the unconditional estimate for CFG++.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils

from .conditioning.schedule import CfgOfSigma, GuidanceSchedule
from .models.sampling import Flow, ModelSampling
from .samplers import SAMPLERS, sampler_traits
from .samplers.options import resolve_sampler_options
from .samplers.noise import check_variation, initial_noise, initial_noise_streams, variation_noise
from .samplers.reference import default_reference_mode, reference_mode_from_input
from .sampling_pass import NoiseOptions, check_preview, run_sampler
from .schedulers import SCHEDULERS, ksampler_sigmas, sampling_sigmas
from .comfy_checks import HostOutputGuard, check_host_graph, model_label
from .guard import StepGuard
from .validation import KSamplerInputError, check_float

if TYPE_CHECKING:
    from .calibration import Calibration

__all__ = ["RegistrySampler", "CalibratedSampler", "host_model_sampling", "common_ksampler", "registry_sampler",
           "registry_sigmas", "core_callback", "host_progress"]


class _HostDelegate:
    """Schedule and prediction maths come from the host's model-sampling object."""

    def __init__(self, host):
        self.host = host
        self.sigma_data = getattr(host, "sigma_data", 1.0)

    @property
    def sigmas(self):
        return self.host.sigmas

    @property
    def sigma_min(self):
        return self.host.sigma_min

    @property
    def sigma_max(self):
        return self.host.sigma_max

    def timestep(self, sigma):
        return self.host.timestep(sigma)

    def sigma(self, timestep):
        return self.host.sigma(timestep)

    def percent_to_sigma(self, percent):
        return self.host.percent_to_sigma(percent)

    def calculate_input(self, sigma, x):
        return self.host.calculate_input(torch.as_tensor(sigma, device=x.device), x)

    def calculate_denoised(self, sigma, model_output, model_input):
        return self.host.calculate_denoised(torch.as_tensor(sigma, device=model_input.device), model_output, model_input)

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        return self.host.noise_scaling(torch.as_tensor(sigma, device=noise.device), noise, latent, max_denoise)

    def inverse_noise_scaling(self, sigma, latent):
        return self.host.inverse_noise_scaling(torch.as_tensor(sigma, device=latent.device), latent)


class HostVE(_HostDelegate, ModelSampling):
    """A host model with VE noise geometry (eps, v, x0, EDM ...)."""


class HostFlow(_HostDelegate, Flow):
    """A host flow model (ComfyUI's CONST): flow noise geometry."""


def host_model_sampling(host) -> ModelSampling:
    """Our model-sampling interface over a ComfyUI model-sampling object."""
    if isinstance(host, comfy.model_sampling.CONST):
        return HostFlow(host)
    return HostVE(host)


def guarded_host_denoiser(model_wrap, model_k, extra_args: dict, channels: int, total_steps: int,
                          sampler: str, check_finite: bool = True) -> tuple["HostDenoiser", HostOutputGuard]:
    """The host's denoiser with both guards: each denoised estimate checked (``.guard``, a StepGuard whose
    ``step`` the caller advances) and the network's own outputs (the HostOutputGuard, a context manager;
    its model option is added to ``extra_args``)."""
    label = model_label(model_wrap.inner_model)
    output_guard = HostOutputGuard(model_wrap.inner_model, channels, label)
    extra_args["model_options"] = output_guard.model_options(extra_args.get("model_options", {}))
    step_guard = StepGuard(total_steps, sampler, f"the {label} model", check_finite)
    ms = host_model_sampling(model_wrap.inner_model.model_sampling)
    return HostDenoiser(model_k, ms, extra_args, step_guard), output_guard


class HostDenoiser:
    """The host's denoiser (KSamplerX0Inpaint) seen through our protocol: ``.model_sampling`` and CFG++ access."""

    def __init__(self, model_k, model_sampling, extra_args: dict, guard: StepGuard):
        self.model_k = model_k
        self.model_sampling = model_sampling
        self.guard = guard
        self._uncond = None
        self.last_denoised = None   # the latest model evaluation's denoised estimate (previews)
        self._cfg_pp_options = comfy.model_patcher.set_model_options_post_cfg_function(
            extra_args.get("model_options", {}).copy(), self._capture_uncond, disable_cfg1_optimization=True)
        # with the host's cfg = 1 shortcut kept, no unconditional pass runs and the conditional one stands in
        self._cfg_pp_shortcut_options = comfy.model_patcher.set_model_options_post_cfg_function(
            extra_args.get("model_options", {}).copy(), self._capture_uncond_or_cond)

    def _capture_uncond(self, args):
        self._uncond = args["uncond_denoised"]
        return args["denoised"]

    def _capture_uncond_or_cond(self, args):
        self._uncond = args["uncond_denoised"] if args["uncond"] is not None else args["cond_denoised"]
        return args["denoised"]

    def __call__(self, x, sigma, **extra_args):
        self.last_denoised = self.guard.check(self.model_k(x, sigma, **extra_args), x, sigma)
        return self.last_denoised

    def denoise_with_uncond(self, x, sigma, cfg1_shortcut=False, **extra_args):
        extra = dict(extra_args)
        extra["model_options"] = self._cfg_pp_shortcut_options if cfg1_shortcut else self._cfg_pp_options
        self._uncond = None
        denoised = self.guard.check(self.model_k(x, sigma, **extra), x, sigma)
        uncond = self._uncond if self._uncond is not None else denoised
        self.last_denoised = denoised
        return denoised, uncond


class RegistrySampler(comfy.samplers.Sampler):
    """A ComfyUI SAMPLER that runs an entry of our sampler registry (usable by SamplerCustom too)."""

    def __init__(self, name: str, noise_options: NoiseOptions | None = None, reference_mode: bool = False,
                 options: dict | None = None):
        self.name = name
        self.traits = sampler_traits(name)
        self.noise_options = noise_options or NoiseOptions()
        self.reference_mode = reference_mode
        self.options = dict(options or {})
        resolve_sampler_options(name, self.options)   # fail early, naming the option and the sampler
        self.batch_index = None  # per-item noise streams follow these indices (batch-invariant noise)
        self.preview = "default"  # what the step callback shows: the sampler's report, "denoised" or "noisy"

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        if not bool(torch.isfinite(sigmas).all()):  # a Brownian tree over NaN times never returns
            raise KSamplerInputError(f"sigmas: hold NaN or Inf ({[round(float(v), 4) for v in sigmas[:8]]}); "
                                     "connect the SIGMAS of a scheduler node")
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        seed = extra_args.get("seed")
        seed = 0 if seed is None else int(seed)
        if self.traits.random_inpaint_noise:
            gen = torch.Generator("cpu").manual_seed((seed + 1) % (1 << 64))
            model_k.noise = torch.randn(noise.shape, generator=gen, device="cpu").to(noise.dtype).to(noise.device)
        else:
            model_k.noise = noise
        host_ms = model_wrap.inner_model.model_sampling
        x = host_ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        denoiser, output_guard = guarded_host_denoiser(model_wrap, model_k, extra_args, noise.shape[1],
                                                       len(sigmas) - 1, self.name)

        def on_step(i, denoised, x_i, total_steps):
            denoiser.guard.step = i + 1
            comfy.model_management.throw_exception_if_processing_interrupted()
            if callback is not None:
                callback(i, denoised, x_i, total_steps)

        with output_guard:
            samples, final_sigma = run_sampler(
                self.name, denoiser, x, sigmas, seed=seed, extra_args=extra_args, noise_options=self.noise_options,
                batch_index=self.batch_index, reference_mode=self.reference_mode, options=self.options,
                on_step=on_step, disable=disable_pbar, preview=self.preview)
        last = sigmas[-1] if final_sigma is None else torch.tensor(final_sigma, device=sigmas.device,
                                                                   dtype=sigmas.dtype)
        return host_ms.inverse_noise_scaling(last, samples)


class CalibratedSampler(comfy.samplers.Sampler):
    """A ComfyUI SAMPLER running a calibration's multistep solver (for SamplerCustom with the calibration's SIGMAS)."""

    def __init__(self, calibration: Calibration):
        self.calibration = calibration
        self.batch_index = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        host_ms = model_wrap.inner_model.model_sampling
        x = host_ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        total = len(sigmas) - 1
        denoiser, output_guard = guarded_host_denoiser(model_wrap, model_k, extra_args, noise.shape[1], total,
                                                       "calibrated")

        def on_step(info):
            denoiser.guard.step = info["i"] + 1
            comfy.model_management.throw_exception_if_processing_interrupted()
            if callback is not None:
                callback(info["i"], info["denoised"], info["x"], total)
        with output_guard:
            samples = self.calibration.sampler()(denoiser, x, sigmas, extra_args=extra_args, callback=on_step,
                                                 disable=disable_pbar)
        return host_ms.inverse_noise_scaling(sigmas[-1], samples)


# ------------------------------------------------------------------------------------------------
# names the host knows and we do not (a newer ComfyUI's, or another pack's): listed after ours and run by
# the host's own implementation, never by a stand-in of ours
# ------------------------------------------------------------------------------------------------
def host_only_samplers() -> list[str]:
    """Sampler names the host's KSampler lists that our registry lacks, in the host's order."""
    names = getattr(getattr(comfy.samplers, "KSampler", None), "SAMPLERS", None) or \
        getattr(comfy.samplers, "SAMPLER_NAMES", ())
    return [n for n in names if isinstance(n, str) and n not in SAMPLERS]


def host_only_schedulers() -> list[str]:
    """Scheduler names the host has (its SCHEDULER_HANDLERS) that our registry lacks, in the host's order."""
    names = getattr(comfy.samplers, "SCHEDULER_HANDLERS", None) or \
        getattr(getattr(comfy.samplers, "KSampler", None), "SCHEDULERS", ())
    return [n for n in names if isinstance(n, str) and n not in SCHEDULERS]


def host_schedule(name: str):
    """``schedule(model_sampling, steps)`` running the host's own scheduler ``name``."""
    def schedule(model_sampling, steps):
        return comfy.samplers.calculate_sigmas(model_sampling, name, steps)
    return schedule


def resolve_names(sampler_name: str, scheduler: str) -> tuple[bool, bool]:
    """(sampler is the host's, scheduler is the host's); a clear error for a name neither side has."""
    for key, name in (("sampler_name", sampler_name), ("scheduler", scheduler)):
        if not isinstance(name, str):
            raise KSamplerInputError(f"{key}: expected a name (str), got {type(name).__name__}")
    host_sampler = sampler_name not in SAMPLERS and sampler_name in host_only_samplers()
    host_scheduler = scheduler not in SCHEDULERS and scheduler in host_only_schedulers()
    for key, name, ours, host, found in (("sampler_name", sampler_name, SAMPLERS, host_only_samplers, host_sampler),
                                         ("scheduler", scheduler, SCHEDULERS, host_only_schedulers, host_scheduler)):
        if name not in ours and not found:
            raise KSamplerInputError(f"{key}: unknown name {name!r}; choose one of: "
                                     f"{', '.join(list(ours) + host())}")
    return host_sampler, host_scheduler
class ScheduledCFGGuider(comfy.samplers.CFGGuider):
    """The host's CFG guider with the scale read from a guidance schedule at every model call.

    Where the schedule gives 1 the host's cfg-1 shortcut skips the negative pass.
    """

    def __init__(self, model_patcher, cfg_of: CfgOfSigma):
        super().__init__(model_patcher)
        self.cfg_of = cfg_of

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        cfg = self.cfg_of(float(timestep.reshape(-1)[0]))
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative", None),
                                                self.conds.get("positive", None), cfg, model_options=model_options,
                                                seed=seed)


def _host_sample(model, noise, positive, negative, cfg, sampler, sigmas, latent_image, noise_mask, callback,
                 seed, guidance_schedule: GuidanceSchedule | None):
    """comfy.samplers.sample, or a ScheduledCFGGuider's sample when the guidance schedule is not the default."""
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    sigmas = sigmas.to(model.load_device)
    if guidance_schedule is None or guidance_schedule.is_default:
        return comfy.samplers.sample(model, noise, positive, negative, cfg, model.load_device, sampler, sigmas,
                                     model_options=model.model_options, latent_image=latent_image,
                                     denoise_mask=noise_mask, callback=callback, disable_pbar=disable_pbar, seed=seed)
    guider = ScheduledCFGGuider(model, guidance_schedule.bind(sigmas.tolist(), cfg))
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider.sample(noise, latent_image, sampler, sigmas, denoise_mask=noise_mask, callback=callback,
                         disable_pbar=disable_pbar, seed=seed)


def _initial_noise(latent_image, seed, batch_index, add_noise, per_item, variation_seed, variation_strength):
    """The seeded initial noise (one stream per nested latent stream), with the variation seed mixed in."""
    if getattr(latent_image, "is_nested", False):
        # several streams (LTX-2: video + audio): the host packs them, and unpacks the result, around the sampler
        if variation_seed is not None and add_noise:
            raise KSamplerInputError("variation_strength: variation seeds are not supported for nested (video + "
                                     "audio) latents; set variation_strength to 0")
        from comfy.nested_tensor import NestedTensor
        return NestedTensor(initial_noise_streams(latent_image.unbind(), seed, batch_index, add_noise, per_item))
    noise = initial_noise(latent_image, seed, batch_index, add_noise, per_item)
    if not add_noise:
        return noise
    return variation_noise(noise, latent_image, variation_seed, variation_strength, batch_index, per_item)


def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0,
                    add_noise=True, start_step=None, last_step=None, force_full_denoise=False,
                    noise_options: NoiseOptions | None = None, reference_mode: bool = False,
                    scheduler_options: dict | None = None, compat: bool | None = None, calibration=None,
                    sampler_options: dict | None = None, variation_seed: int | None = None,
                    variation_strength: float = 0.0, guidance_schedule: GuidanceSchedule | None = None,
                    preview: str = "default"):
    """The built-in KSampler's flow with our schedules, samplers and noise; returns a new latent dict.

    reference_mode (formerly ``compat``): run ComfyUI's own form of the samplers in ``samplers.reference``.
    """
    reference_mode = bool(compat) if compat is not None else reference_mode
    import latent_preview

    check_preview(preview)
    noise_options = noise_options or NoiseOptions()
    host_sampler, host_scheduler = resolve_names(sampler_name, scheduler)
    reads_uncond = False if host_sampler else sampler_traits(sampler_name).cfg_pp
    samples, batch_index, noise_mask = check_host_graph(model, positive, negative, latent, cfg, reads_uncond)
    negative = [] if negative is None else negative  # allowed at cfg 1, where the host never evaluates it
    latent_image = comfy.sample.fix_empty_latent_channels(model, samples)
    noise = _initial_noise(latent_image, seed, batch_index, add_noise, noise_options.batch_invariant,
                           check_variation(variation_seed, variation_strength), variation_strength)
    if host_sampler:
        discard = sampler_name in getattr(comfy.samplers.KSampler, "DISCARD_PENULTIMATE_SIGMA_SAMPLERS", ())
    else:
        discard = sampler_traits(sampler_name).discard_penultimate_sigma
    sigmas = ksampler_sigmas(model.get_model_object("model_sampling"), scheduler, steps, denoise, discard,
                             start_step, last_step, force_full_denoise,
                             schedule=host_schedule(scheduler) if host_scheduler else None,
                             **({} if host_scheduler else scheduler_options or {}))
    if calibration is not None:
        from .calibration import run_sigmas
        try:
            sigmas = run_sigmas(calibration, steps, cfg, denoise,
                                host_model_sampling(model.get_model_object("model_sampling")))
        except ValueError as exc:
            raise KSamplerInputError(str(exc)) from exc
    out = latent.copy()
    if len(sigmas) <= 1:
        out["samples"] = latent_image
        return out

    callback = latent_preview.prepare_callback(model, steps)
    if calibration is not None:
        sampler = CalibratedSampler(calibration)
    elif host_sampler:  # the host's own implementation: our noise options do not apply to it
        sampler = comfy.samplers.sampler_object(sampler_name)
    else:
        sampler = RegistrySampler(sampler_name, noise_options, reference_mode, sampler_options)
        sampler.preview = preview
    sampler.batch_index = batch_index
    result = _host_sample(model, noise, positive, negative, cfg, sampler, sigmas, latent_image, noise_mask, callback,
                          seed, guidance_schedule)
    out["samples"] = result.to(comfy.model_management.intermediate_device())
    return out


def host_progress(total: int = 1):
    """``progress(done, total)`` for work a node runs: the host's stop request honoured, then the node's progress
    bar moved (a calibration fit's iterations: ``fit_calibration``'s ``progress``)."""
    pbar = comfy.utils.ProgressBar(total)

    def progress(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, total)
    return progress


def core_callback(steps: int):
    """Progress bar and interrupt checks for runs of our own models inside ComfyUI."""
    progress = host_progress(steps)

    def callback(step, denoised, x, total_steps):
        progress(step + 1, total_steps)
    return callback


# ------------------------------------------------------------------------------------------------
# our registries as ComfyUI SAMPLER and SIGMAS (for the interop nodes, interop_nodes.py)
# ------------------------------------------------------------------------------------------------
def host_names_tooltip(text: str, host_names: list[str]) -> str:
    """A combo's tooltip, naming the entries that run ComfyUI's own implementation."""
    if not host_names:
        return text
    return (f"{text} Run by ComfyUI's own implementation, not ksampler's (the host lists them and ksampler does "
            f"not have them; ksampler's noise options do not apply): {', '.join(host_names)}.")


def registry_sampler(sampler_name: str, noise_options: NoiseOptions, flow_geometry: str = "default"):
    """The ComfyUI SAMPLER of ``sampler_name``: ours with these noise options and flow geometry, or for a name only
    the host has, the host's own object (our noise options do not apply to it)."""
    if sampler_name not in SAMPLERS:
        if sampler_name in host_only_samplers():
            return comfy.samplers.sampler_object(sampler_name)
        raise KSamplerInputError(f"sampler_name: unknown sampler {sampler_name!r}; choose one of: "
                                 f"{', '.join(list(SAMPLERS) + host_only_samplers())}")
    mode = reference_mode_from_input(flow_geometry)
    return RegistrySampler(sampler_name, noise_options, default_reference_mode() if mode is None else mode)


def registry_sigmas(model, scheduler: str, steps: int, denoise: float, karras_rho: float = 7.0):
    """The SIGMAS of ``scheduler`` (ours, or the host's own for a name only it has) over a ComfyUI model's own
    model sampling."""
    _, host_scheduler = resolve_names("euler", scheduler)
    check_float("karras_rho", karras_rho, 0.5, 30.0)
    if not hasattr(model, "get_model_object"):
        raise KSamplerInputError(f"model: expected a ComfyUI MODEL, got {type(model).__name__}; the bundled "
                                 "model's sigmas come with KSampler (ksampler), which takes it directly")
    ms = model.get_model_object("model_sampling")
    if host_scheduler:
        return sampling_sigmas(ms, scheduler, steps, denoise, schedule=host_schedule(scheduler))
    options = {"rho": float(karras_rho)} if scheduler == "karras" else {}
    return sampling_sigmas(ms, scheduler, steps, denoise, **options)
