"""Stand-in objects for the slice of ComfyUI's protocol that ksampler.comfy_adapter relies on.

These are NOT ComfyUI: they are minimal fakes written for tests, implementing only
what comfy_adapter documents it uses (see its module docstring):

* comfy.samplers.Sampler (``max_denoise``), KSamplerX0Inpaint, sample()
* comfy.samplers.KSampler's name lists, SCHEDULER_HANDLERS, calculate_sigmas and sampler_object (the host's
  own samplers and schedulers, for names the host has and we do not)
* comfy.model_sampling.CONST / EPS marker classes
* comfy.model_patcher.set_model_options_post_cfg_function
* ``model_options['model_function_wrapper']`` (a model patch around apply_model)
* comfy.sample.fix_empty_latent_channels
* comfy.model_management (interrupt check, intermediate device, free memory)
* comfy.utils (ProgressBar, PROGRESS_BAR_ENABLED)
* latent_preview.prepare_callback
"""
from __future__ import annotations

import copy
import math
import sys
import types

import torch


class StandInInterrupt(Exception):
    pass


class NestedTensor:
    """Stand-in for ComfyUI's NestedTensor: several latent streams (LTX-2: video + audio)."""

    def __init__(self, tensors):
        self.tensors, self.is_nested = list(tensors), True

    def unbind(self):
        return self.tensors

    def to(self, *args, **kwargs):
        return NestedTensor([t.to(*args, **kwargs) for t in self.tensors])


def _pack(tensors):
    return torch.cat([t.reshape(t.shape[0], 1, -1) for t in tensors], dim=-1)


def _unpack(packed, shapes):
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape[1:])
        out.append(packed[:, :, start:start + size].reshape(shape))
        start += size
    return out


def build_standin_modules():
    """Return {module name: module} for the stand-in host."""
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    model_sampling = types.ModuleType("comfy.model_sampling")
    model_patcher = types.ModuleType("comfy.model_patcher")
    sample_mod = types.ModuleType("comfy.sample")
    mm = types.ModuleType("comfy.model_management")
    utils = types.ModuleType("comfy.utils")
    preview = types.ModuleType("latent_preview")

    class EPS:
        """Marker: VE geometry."""

    class CONST:
        """Marker: flow geometry."""

    model_sampling.EPS, model_sampling.CONST = EPS, CONST

    def set_post_cfg(model_options, fn, disable_cfg1_optimization=False):
        out = dict(model_options)
        out["sampler_post_cfg_function"] = list(out.get("sampler_post_cfg_function", [])) + [fn]
        if disable_cfg1_optimization:
            out["disable_cfg1_optimization"] = True
        return out

    model_patcher.set_model_options_post_cfg_function = set_post_cfg

    class Sampler:
        def max_denoise(self, model_wrap, sigmas):
            sigma_max = float(model_wrap.inner_model.model_sampling.sigma_max)
            return math.isclose(sigma_max, float(sigmas[0]), rel_tol=1e-05) or float(sigmas[0]) > sigma_max

    class KSamplerX0Inpaint:
        def __init__(self, model, sigmas):
            self.inner_model, self.sigmas = model, sigmas

        def __call__(self, x, sigma, denoise_mask=None, model_options={}, seed=None):
            if denoise_mask is not None:
                x = x * denoise_mask + self.inner_model.inner_model.model_sampling.noise_scaling(
                    sigma.reshape(-1, *[1] * (x.ndim - 1)), self.noise, self.latent_image) * (1 - denoise_mask)
            out = self.inner_model(x, sigma, model_options=model_options, seed=seed)
            if denoise_mask is not None:
                out = out * denoise_mask + self.latent_image * (1 - denoise_mask)
            return out

    calls = {"sample": 0, "model": 0, "uncond": 0, "post_cfg": 0, "interrupt_checks": 0}

    class CFGWrap:
        """Guided denoiser of the stand-in host: cond/uncond are analytic Gaussian denoisers."""

        def __init__(self, inner_model, cfg, mu_c, mu_u):
            self.inner_model, self.cfg, self.mu_c, self.mu_u = inner_model, cfg, mu_c, mu_u

        def _d(self, x, sigma, mu):
            s = sigma.reshape(-1, *[1] * (x.ndim - 1))
            if isinstance(self.inner_model.model_sampling, CONST):
                a = 1 - s
                return (a * 0.64 * x + mu * s ** 2) / (a ** 2 * 0.64 + s ** 2)
            return (x * 0.64 + mu * s ** 2) / (0.64 + s ** 2)

        def __call__(self, x, sigma, model_options={}, seed=None):
            calls["model"] += 1
            wrapper = model_options.get("model_function_wrapper")

            def apply_model(x, sigma, mu):
                return self._d(x, sigma, mu)

            def run(mu):  # the host calls a model patch's wrapper around apply_model, as ComfyUI does
                if wrapper is None:
                    return apply_model(x, sigma, mu)
                return wrapper(apply_model, {"input": x, "timestep": sigma, "c": {"mu": mu}, "cond_or_uncond": [0]})

            cond = run(self.mu_c)
            skipped = self.cfg == 1.0 and not model_options.get("disable_cfg1_optimization")
            calls["uncond"] += 0 if skipped else 1
            uncond = torch.zeros_like(cond) if skipped else run(self.mu_u)  # the host's unused zeros
            out = cond if skipped else uncond + self.cfg * (cond - uncond)
            for fn in model_options.get("sampler_post_cfg_function", []):
                calls["post_cfg"] += 1
                out = fn({"denoised": out, "uncond_denoised": uncond, "cond_denoised": cond,
                          "uncond": None if skipped else "negative"})
            return out

    def sample(model, noise, positive, negative, cfg, device, sampler, sigmas, model_options={}, latent_image=None,
               denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        if getattr(latent_image, "is_nested", False):  # the host packs the streams into [B, 1, N] and unpacks after
            shapes = [t.shape for t in latent_image.unbind()]
            masks = None
            if denoise_mask is not None:
                given = denoise_mask.unbind() if getattr(denoise_mask, "is_nested", False) else [denoise_mask]
                masks = [m.expand(shape) if m.shape == shape else torch.ones(shape) for m, shape in
                         zip(list(given) + [torch.ones(sh) for sh in shapes[len(given):]], shapes)]
            calls["packed_shapes"] = shapes
            out = sample(model, _pack(noise.unbind()), positive, negative, cfg, device, sampler, sigmas, model_options,
                         _pack(latent_image.unbind()), None if masks is None else _pack(masks), callback,
                         disable_pbar, seed)
            return NestedTensor(_unpack(out, shapes))
        inner = types.SimpleNamespace(model_sampling=model.model_sampling_object)
        wrap = CFGWrap(inner, cfg, positive[0][0].mean(), negative[0][0].mean() if negative else torch.tensor(0.0))
        wrap.inner_model = inner
        return run_sampler(wrap, sampler, sigmas, model_options, noise, latent_image, denoise_mask, callback,
                           disable_pbar, seed)

    def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
        return CFGWrap(model, cond_scale, cond[0][0].mean(), uncond[0][0].mean())(x, timestep, model_options, seed)

    class CFGGuider:
        """The host's guider protocol: conds, a cfg, and predict_noise as the one place guidance is applied."""

        def __init__(self, model_patcher):
            self.model_patcher, self.model_options = model_patcher, model_patcher.model_options

        def set_conds(self, positive, negative):
            self.conds = {"positive": positive, "negative": negative}

        def set_cfg(self, cfg):
            self.cfg = cfg

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                     self.conds.get("positive"), self.cfg, model_options=model_options, seed=seed)

        def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
                   seed=None):
            self.inner_model = types.SimpleNamespace(model_sampling=self.model_patcher.model_sampling_object)
            guider = self

            class Wrap:  # ComfyUI hands the guider itself to the sampler: its conds and patcher too
                inner_model, conds, model_patcher = self.inner_model, self.conds, self.model_patcher

                def __call__(self, x, sigma, model_options={}, seed=None):
                    return guider.predict_noise(x, sigma, model_options, seed)
            return run_sampler(Wrap(), sampler, sigmas, self.model_options, noise, latent_image, denoise_mask,
                               callback, disable_pbar, seed)

    def run_sampler(wrap, sampler, sigmas, model_options, noise, latent_image, denoise_mask, callback, disable_pbar,
                    seed):
        calls["sample"] += 1
        if denoise_mask is not None and latent_image.ndim == 5:  # video: frames-stacked mask, resized in 3-D
            frames = denoise_mask.reshape(1, 1, -1, *denoise_mask.shape[-2:]).float()
            denoise_mask = torch.nn.functional.interpolate(frames, size=latent_image.shape[2:], mode="trilinear")
            denoise_mask = denoise_mask.expand_as(latent_image)
        elif denoise_mask is not None and denoise_mask.shape == latent_image.shape:
            pass
        elif denoise_mask is not None:
            denoise_mask = denoise_mask.reshape(-1, 1, *denoise_mask.shape[-2:]).expand_as(latent_image)
        extra_args = {"model_options": dict(model_options), "seed": seed}
        out = sampler.sample(wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        return out.float()

    samplers.Sampler, samplers.KSamplerX0Inpaint, samplers.sample = Sampler, KSamplerX0Inpaint, sample
    samplers.CFGGuider, samplers.sampling_function = CFGGuider, sampling_function
    samplers.STANDIN_CALLS = calls

    # the host's own names and implementations (January 2026: 44 samplers, 9 schedulers); tests add more
    from ksampler.samplers import COMFY_SAMPLER_NAMES
    from ksampler.schedulers import COMFY_SCHEDULER_NAMES, SCHEDULERS
    samplers.KSAMPLER_NAMES = [n for n in COMFY_SAMPLER_NAMES if n not in ("cfgpp_ud10_ab", "ddim", "uni_pc",
                                                                           "uni_pc_bh2")]
    samplers.SAMPLER_NAMES = samplers.KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
    samplers.SCHEDULER_HANDLERS = {name: SCHEDULERS[name] for name in COMFY_SCHEDULER_NAMES}
    samplers.SCHEDULER_NAMES = list(samplers.SCHEDULER_HANDLERS)
    samplers.HOST_SAMPLER_FUNCTIONS = {}  # name -> k-diffusion-protocol function, for names tests add

    class KSampler:
        SAMPLERS = samplers.SAMPLER_NAMES
        SCHEDULERS = samplers.SCHEDULER_NAMES
        DISCARD_PENULTIMATE_SIGMA_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}

    def calculate_sigmas(model_sampling, scheduler_name, steps):
        calls.setdefault("host_schedules", []).append((scheduler_name, steps))
        return samplers.SCHEDULER_HANDLERS[scheduler_name](model_sampling, steps)

    class KSAMPLER(Sampler):
        """The host's sampler object: its own function, its own noise handling."""

        def __init__(self, name):
            self.name, self.fn = name, samplers.HOST_SAMPLER_FUNCTIONS[name]

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            calls.setdefault("host_samplers", []).append(self.name)
            model_k = KSamplerX0Inpaint(model_wrap, sigmas)
            model_k.latent_image, model_k.noise = latent_image, noise
            extra_args["denoise_mask"] = denoise_mask
            ms = model_wrap.inner_model.model_sampling
            x = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
            out = self.fn(model_k, x, sigmas, extra_args=extra_args, disable=True)
            return ms.inverse_noise_scaling(sigmas[-1], out)

    samplers.KSampler, samplers.calculate_sigmas = KSampler, calculate_sigmas
    samplers.sampler_object = KSAMPLER

    def fix_empty_latent_channels(model, latent):
        if getattr(latent, "is_nested", False):
            return latent
        channels = model.latent_channels
        if latent.shape[1] != channels and torch.count_nonzero(latent) == 0:
            reps = (1, math.ceil(channels / latent.shape[1])) + (1,) * (latent.ndim - 2)
            return latent.repeat(reps)[:, :channels]
        return latent

    sample_mod.fix_empty_latent_channels = fix_empty_latent_channels

    state = {"interrupt_at": None, "free_memory": 1 << 40}

    def throw_exception_if_processing_interrupted():
        calls["interrupt_checks"] += 1
        if state["interrupt_at"] is not None and calls["interrupt_checks"] >= state["interrupt_at"]:
            raise StandInInterrupt()

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_free_memory = lambda dev=None, torch_free_too=False: state["free_memory"]
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.STANDIN_STATE = state

    progress = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            progress.append((value, total or self.total))

    utils.ProgressBar, utils.PROGRESS_BAR_ENABLED, utils.STANDIN_PROGRESS = ProgressBar, False, progress

    def prepare_callback(model, steps, x0_output_dict=None):
        bar = ProgressBar(steps)

        def callback(step, x0, x, total_steps):
            bar.update_absolute(step + 1, total_steps)
        return callback

    preview.prepare_callback = prepare_callback
    nested_tensor = types.ModuleType("comfy.nested_tensor")
    nested_tensor.NestedTensor = NestedTensor

    for name, mod in (("samplers", samplers), ("model_sampling", model_sampling), ("model_patcher", model_patcher),
                      ("sample", sample_mod), ("model_management", mm), ("utils", utils),
                      ("nested_tensor", nested_tensor)):
        setattr(comfy, name, mod)
    return {"comfy": comfy, "comfy.samplers": samplers, "comfy.model_sampling": model_sampling,
            "comfy.model_patcher": model_patcher, "comfy.sample": sample_mod, "comfy.model_management": mm,
            "comfy.utils": utils, "comfy.nested_tensor": nested_tensor, "latent_preview": preview}


class StandInModelSampling:
    """A host model-sampling object: SD's discrete eps schedule, or flow with shift 3 (see make_model_sampling)."""

    def __init__(self, kind="eps"):
        from ksampler.models import EPS, Flow
        self.ours = EPS() if kind == "eps" else Flow(shift=3.0)
        self.sigmas = self.ours.sigmas
        self.sigma_min, self.sigma_max = self.ours.sigma_min, self.ours.sigma_max

    def timestep(self, sigma):
        return self.ours.timestep(sigma)

    def sigma(self, timestep):
        return self.ours.sigma(timestep)

    def percent_to_sigma(self, percent):
        return self.ours.percent_to_sigma(percent)

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        return self.ours.noise_scaling(sigma, noise, latent, max_denoise)

    def inverse_noise_scaling(self, sigma, latent):
        return self.ours.inverse_noise_scaling(sigma, latent)


def make_model_sampling(modules, kind="eps"):
    """An instance of the host's marker class (EPS or CONST), as ComfyUI's model_sampling objects are."""
    marker = modules["comfy.model_sampling"].CONST if kind == "flow" else modules["comfy.model_sampling"].EPS
    cls = type(f"StandIn{kind.title()}Sampling", (StandInModelSampling, marker), {})
    return cls(kind)


class UNetModel(torch.nn.Module):
    """Stand-in network, named like SD's so that the host spec reads its width from ``unet_config``."""


class OpenAISignatureMMDITWrapper(torch.nn.Module):
    """Stand-in SD3 network: the conditioning width is its context embedder's input."""

    def __init__(self, context_dim):
        super().__init__()
        self.context_embedder = torch.nn.Linear(context_dim, 2)


class SD15:
    """Stand-in model config (its class name is the family's)."""

    def __init__(self, context_dim):
        self.unet_config = {"context_dim": context_dim}


class SD3(SD15):
    pass


class BaseModel:
    """Stand-in ComfyUI BaseModel: model_config, adm_channels, diffusion_model, model_sampling."""

    def __init__(self, model_sampling, family="SD15", context_dim=8, adm_channels=0):
        self.model_config = {"SD15": SD15, "SD3": SD3}[family](context_dim)
        self.adm_channels = adm_channels
        self.diffusion_model = UNetModel() if family == "SD15" else OpenAISignatureMMDITWrapper(context_dim)
        self.model_sampling = model_sampling


class StandInSD3(BaseModel):
    pass


StandInSD3.__name__ = "SD3"  # the host spec looks the model class up by name


class StandInLatentFormat:
    def __init__(self, channels=4, dims=2):
        self.latent_channels, self.latent_dimensions = channels, dims


class StandInModelPatcher:
    """Just enough of a ModelPatcher: get_model_object, model_options, load_device, a model with its config.

    ``family`` "SD15" (4 channels, conditioning 8 wide, no pooled output) or "SD3" (16 channels, conditioning
    8 wide, a 6-wide pooled output required); ``latent_dims`` 3 for a video model, 1 for an audio one.
    """

    def __init__(self, modules, kind="eps", family="SD15", latent_dims=2):
        self.model_sampling_object = make_model_sampling(modules, kind)
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}  # as ComfyUI keeps them: {wrapper type: {key: [wrapper, ...]}}; a clone copies each level
        self.load_device = torch.device("cpu")
        self.latent_channels = 4 if family == "SD15" else 16
        cls = BaseModel if family == "SD15" else StandInSD3
        self.model = cls(self.model_sampling_object, family, 8, 0 if family == "SD15" else 6)
        self.latent_format = StandInLatentFormat(self.latent_channels, latent_dims)

    def get_model_object(self, name):
        assert name in ("model_sampling", "latent_format")
        return self.model_sampling_object if name == "model_sampling" else self.latent_format

    def clear_cached_hook_weights(self):  # ComfyUI: drops hook weights cached for a keyframe, unpatches them
        self.hook_weight_clears = getattr(self, "hook_weight_clears", 0) + 1

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def clone(self):
        twin = copy.copy(self)
        twin.model_options = copy.deepcopy(self.model_options)
        twin.wrappers = {t: {k: list(w) for k, w in by_key.items()} for t, by_key in self.wrappers.items()}
        return twin


def install(monkeypatch):
    """Install the stand-in host into sys.modules (undone by monkeypatch) and import the adapter fresh."""
    modules = build_standin_modules()
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "ksampler.comfy_adapter", raising=False)
    import importlib
    adapter = importlib.import_module("ksampler.comfy_adapter")
    return modules, adapter
