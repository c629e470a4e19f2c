"""Calibration inside ComfyUI: fitting through the host's own model and guidance, and a SAMPLER that runs a fit.

The fit runs inside a ``comfy.samplers.Sampler`` handed to ComfyUI's ``CFGGuider``, so the model, its patches
and the conditioning go through ComfyUI's own code.  ComfyUI loads checkpoints in inference mode, whose weights
give no gradient: while the fit runs they are swapped for ordinary copies (``ordinary_weights``), and on a UNet
with a middle block a ControlNet's too, its residuals then added out of place (``out_of_place_control``).  Where
that is not possible, or where hooks on the conditioning change the weights between model calls (``_HostHooks``),
the fit says so and uses SPSA (``calibration.fit_calibration``).  comfy_kitchen's rotary embedding ops have no
gradient; while the fit runs the same rotation written in torch stands in for them (``differentiable_rotary``).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import types

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch

from .calibration import (Calibration, cached_calibration, calibration_keys, candidate_fitting_noise,
                          check_fit_batches, check_fit_request, default_log, fit_calibration, fit_settings,
                          fitting_noise)
from .comfy_adapter import guarded_host_denoiser, host_progress
from .comfy_checks import check_host_graph

__all__ = ["calibrate_host", "differentiable_rotary", "ordinary_weights", "out_of_place_control",
           "rotate_pairs", "without_step_caches"]


@contextlib.contextmanager
def ordinary_weights(modules, log=default_log):
    """While the fit runs, the weights of ``modules`` (networks; other objects are skipped) that were made in
    inference mode (ComfyUI's executor loads checkpoints in it) are swapped for ordinary copies, so that autograd
    may save them and the fit gets a gradient instead of falling back to SPSA; the originals are put back after.
    Where the copies would not fit in their device's free memory, nothing is swapped and the log says so (the fit
    then says it uses SPSA)."""
    owners = {id(owner): owner for module in modules if isinstance(module, torch.nn.Module)
              for owner in module.modules()}.values()
    found = [(owner, kind, name, tensor) for owner in owners for kind in ("_parameters", "_buffers")
             for name, tensor in getattr(owner, kind).items() if tensor is not None and tensor.is_inference()]
    need: dict = {}
    for *_, tensor in found:
        need[tensor.device] = need.get(tensor.device, 0) + tensor.numel() * tensor.element_size()
    short = [device for device, size in need.items()
             if size > 0.9 * comfy.model_management.get_free_memory(device)]
    if short:
        log(f"calibration: a copy of the model's weights for a gradient needs {need[short[0]] / 2**30:.2f} GiB on "
            f"{short[0]}, more than is free; the weights stay as they are")
        found = []
    swapped = []

    def restore() -> None:
        for owner, kind, name, tensor in swapped:
            getattr(owner, kind)[name] = tensor
        swapped.clear()
    try:
        with torch.inference_mode(False):
            for owner, kind, name, tensor in found:
                try:
                    copy = tensor.clone()
                except RuntimeError as exc:  # out of memory after all: none of the copies
                    if "out of memory" not in str(exc).lower():
                        raise
                    restore()
                    log("calibration: out of memory copying the model's weights for a gradient; the weights stay "
                        "as they are")
                    break
                getattr(owner, kind)[name] = torch.nn.Parameter(copy, requires_grad=False) \
                    if isinstance(tensor, torch.nn.Parameter) else copy
                swapped.append((owner, kind, name, tensor))
        yield
    finally:
        restore()


STEP_CACHES = {"easycache": "EasyCache", "lazycache": "LazyCache"}  # ComfyUI's: their wrappers' keys, names


def without_step_caches(model, log=default_log):
    """``model``, or where ComfyUI's EasyCache or LazyCache is on it, a clone without them.  They skip model calls
    by reusing earlier outputs, deciding from the calls before, which the fit's passes (and its gradient) cannot
    go through: ComfyUI crashes inside them.  The calibration is the model's; sampling with the cache on uses it
    as usual.  The clone keys the calibration as the model without the cache does, so they share it."""
    wrappers = getattr(model, "wrappers", None) or {}
    found = sorted({key for by_key in wrappers.values() for key in by_key if key in STEP_CACHES})
    if not found:
        return model
    clone = model.clone()
    for wrapper_type in list(clone.wrappers):
        for key in found:
            clone.remove_wrappers_with_key(wrapper_type, key)
    clone.model_options.get("transformer_options", {}).pop("easycache", None)  # both keep their state there
    log(f"calibration: {' and '.join(STEP_CACHES[key] for key in found)} on the model reuses earlier outputs in "
        f"place of model calls, which a fit cannot follow; the calibration is the model's without it (sampling "
        f"with it on uses the calibration as usual)")
    return clone


def _entry_options(conds):
    """The options of each conditioning entry ComfyUI runs (``CFGGuider.conds``: dicts, or conditioning's
    [tensor, options] pairs)."""
    for entries in (conds or {}).values():
        for entry in entries or ():
            options = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 else entry
            yield options if isinstance(options, dict) else {}


def _hook_groups(conds) -> list:
    """The distinct hook groups on the conditioning entries, None for none."""
    groups: list = []
    for options in _entry_options(conds):
        group = options.get("hooks")
        if not any(group is seen for seen in groups):
            groups.append(group)
    return groups


def _control_networks(conds) -> list:
    """The networks of the controls on the conditioning entries (a ControlNet's, a T2I adapter's), the controls
    chained before them included."""
    networks: list = []
    for options in _entry_options(conds):
        control = options.get("control")
        while control is not None:
            networks += [value for value in vars(control).values()
                         if isinstance(value, torch.nn.Module) and not any(value is seen for seen in networks)]
            control = getattr(control, "previous_controlnet", None)
    return networks


@contextlib.contextmanager
def out_of_place_control(network):
    """ComfyUI's UNet adds a control's residuals into its hidden states in place (``openaimodel.apply_control``),
    into skip connections too that a later block has saved for the backward, which autograd then refuses.  While
    the fit runs, the same sums are made out of place, so that a gradient goes through them.  The values are the
    same where no block hands on its input as it is; a UNet without a middle block does (ComfyUI's in-place sum
    then also lands in the last skip connection), and for it, and for any other network, nothing changes.  Yields
    whether the sums were swapped."""
    unet = sys.modules.get("comfy.ldm.modules.diffusionmodules.openaimodel")
    original = getattr(unet, "apply_control", None)
    middle = getattr(getattr(network, "diffusion_model", None), "middle_block", None)
    if original is None or not isinstance(middle, torch.nn.Module) or len(middle) == 0:
        yield False
        return

    def apply_control(h, control, name):
        residuals = control.get(name) if control is not None else None
        residual = residuals.pop() if residuals else None
        if residual is None:
            return h
        try:  # what the host's in-place sum gives: the residual broadcast to h, in h's dtype
            summed = h + residual
        except RuntimeError:
            summed = None
        if summed is None or summed.shape != h.shape:  # as the host does: left out, with a warning
            logging.warning(f"control could not be applied {h.shape} {residual.shape}")
            return h
        return summed.to(h.dtype)
    unet.apply_control = apply_control
    try:
        yield True
    finally:
        unet.apply_control = original


def rotate_pairs(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, RoFormer) on interleaved pairs: channels (2k, 2k+1) of ``x``
    turned by the 2x2 matrix ``freqs_cis[..., k, :, :]``, in the matrices' dtype, returned in x's."""
    pairs = x.to(freqs_cis.dtype).unflatten(-1, (-1, 1, 2))
    return (freqs_cis * pairs).sum(-1).reshape(x.shape).to(x.dtype)


def _rotate_query_key(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple:
    return rotate_pairs(xq, freqs_cis), rotate_pairs(xk, freqs_cis)


# comfy_kitchen's rotary embedding ops (custom ops with no autograd formula) and what stands in for them in a fit
_ROTARY_STAND_INS = {"apply_rope1": rotate_pairs, "apply_rope": _rotate_query_key}


@contextlib.contextmanager
def differentiable_rotary(log=default_log):
    """ComfyUI's Flux, Wan and other DiTs run their rotary embedding through comfy_kitchen's custom ops, through
    which torch refuses a backward pass.  While the fit runs, every loaded module holding one of these ops (as the
    models import them, by name) holds instead the same rotation written in torch (``rotate_pairs``), so that a
    gradient goes through; the ops are put back after.  Yields whether any was swapped."""
    kitchen = sys.modules.get("comfy_kitchen")
    ops = {name: getattr(kitchen, name, None) for name in _ROTARY_STAND_INS} if kitchen is not None else {}
    swapped = []
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType) or module.__name__.split(".")[0] == "comfy_kitchen":
            continue
        held = module.__dict__
        for name, op in ops.items():
            if op is not None and held.get(name) is op:
                swapped.append((module, name, op))
    said = []

    def stand_in(name: str):
        def rotate(*args, **kwargs):
            if not said:  # said once, where the model runs one (an SD1.5 UNet, say, runs none)
                log("calibration: the model's rotary embedding runs comfy_kitchen's ops, which have no gradient; the "
                    "fit runs the same rotation in torch")
                said.append(name)
            return _ROTARY_STAND_INS[name](*args, **kwargs)
        return rotate
    for module, name, _ in swapped:
        setattr(module, name, stand_in(name))
    try:
        yield bool(swapped)
    finally:
        for module, name, op in swapped:
            setattr(module, name, op)


def _keyframed(hook) -> bool:
    """Whether a hook's strength changes during a sample (keyframes of more than one strength)."""
    keyframes = getattr(getattr(hook, "hook_keyframe", None), "keyframes", None) or ()
    return len({float(kf.strength) for kf in keyframes}) > 1


def _weight_hooks(group) -> frozenset:
    """The weight-patching hooks of a hook group, each with its strength (what ComfyUI patches into the weights
    while the entries with that group run)."""
    return frozenset((hook, float(getattr(hook, "strength_model", 1.0))) for hook in getattr(group, "hooks", ())
                     if getattr(getattr(hook, "hook_type", None), "value", None) == "weight")


class _HostHooks:
    """What ComfyUI's hooks on the conditioning mean for a fit.  ComfyUI patches a weight hook's weights into the
    model in place (through ``.data``, unseen by autograd) when the entries it is on run, and again when a keyframe
    changes its strength; so where the weights change between the model calls of one solve (entries with
    different weight hooks, or keyframes of more than one strength) a gradient through them would be silently
    wrong, and the fit uses SPSA.  Keyframes step on as the sigmas fall and never step back; ComfyUI resets them
    when a sample starts, and ``solve_start`` does so before each of the fit's solves."""

    def __init__(self, model_wrap):
        self.patcher = getattr(model_wrap, "model_patcher", None)
        every = _hook_groups(getattr(model_wrap, "conds", None))
        self.groups = [g for g in every if g is not None]
        weight_sets = {_weight_hooks(g) for g in every}
        self.keyframed = any(_keyframed(hook) for g in self.groups for hook in getattr(g, "hooks", ()))
        self.weights_change = len(weight_sets) > 1 or any(_keyframed(hook) for hooks in weight_sets
                                                           for hook, _ in hooks)

    def solve_start(self) -> None:
        for group in self.groups:
            group.reset()
        if self.patcher is not None:  # unpatched: the next call patches the first keyframe's strength
            self.patcher.clear_cached_hook_weights()


class _FittingSampler(comfy.samplers.Sampler):
    """Runs ``fit_calibration`` on the host's guided denoiser; the 'sample' it returns is the unchanged latent.
    The node's progress bar follows the fit's iterations, and a stop request ends it at the next model call."""

    def __init__(self, steps: int, options: dict):
        self.steps, self.options, self.result = steps, options, None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        host, output_guard = guarded_host_denoiser(model_wrap, model_k, extra_args, noise.shape[1], self.steps,
                                                   "calibration fit", check_finite=False)

        def denoiser(x, sigma):
            comfy.model_management.throw_exception_if_processing_interrupted()
            return host(x, sigma, **extra_args)
        options = dict(self.options)
        log = options.get("log") or default_log
        hooks = _HostHooks(model_wrap)
        if hooks.keyframed:
            options["solve_start"] = hooks.solve_start
        if hooks.weights_change:
            log("calibration: hooks on the conditioning change the model's weights in place between its calls (hook "
                "keyframes, or weight hooks on only some of the conditioning), which autograd cannot follow; "
                "fitting with SPSA (two evaluations per iteration) instead")
            options["gradient"] = "spsa"
        if options.get("refine_noise") is not None:  # where ComfyUI put the fitting noise
            options["refine_noise"] = options["refine_noise"].to(device=noise.device, dtype=noise.dtype)
        options["candidate_noise"] = [n.to(device=noise.device, dtype=noise.dtype)
                                      for n in options.get("candidate_noise", ())]
        with output_guard, contextlib.ExitStack() as for_the_gradient:
            if options.get("gradient") != "spsa":  # the weights copied, a control's where its sums go out of place
                controls = _control_networks(getattr(model_wrap, "conds", None))
                summed = bool(controls) and for_the_gradient.enter_context(out_of_place_control(model_wrap.inner_model))
                for_the_gradient.enter_context(ordinary_weights([model_wrap.inner_model] + (controls if summed else []),
                                                                log))
                for_the_gradient.enter_context(differentiable_rotary(log))
            # a fit that turns to SPSA needs none of that: the originals back, the copies freed
            self.result = fit_calibration(denoiser, host.model_sampling, noise, self.steps, progress=host_progress(),
                                          on_spsa=for_the_gradient.close, **options)
        return latent_image


def calibrate_host(model, positive, negative, latent: dict, steps: int, cfg: float, *, order: int = 3,
                   fit_noises: int = 8, seed: int = 0, iterations: int = 100, teacher_steps: int = 100,
                   refine_noises: int = 0, fit_candidates: int = 1, path: str | None = None,
                   log=default_log) -> Calibration:
    """``calibration.calibrate`` for a ComfyUI MODEL (a ModelPatcher): fitted once per inputs, cached."""
    steps, cfg, path = check_fit_request(steps, cfg, path, log=log)
    log = log or (lambda message: None)
    settings = fit_settings(order, fit_noises, seed, iterations, teacher_steps, refine_noises, fit_candidates)
    check_host_graph(model, positive, negative, latent, cfg, False)  # what our KSampler checks, before the fit
    check_fit_batches(positive, negative, latent["samples"].shape, fit_noises, refine_noises)
    model = without_step_caches(model, log)
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    key, file_key = calibration_keys(model, positive, negative, samples.shape, steps, cfg, settings)

    def fit() -> Calibration:
        with torch.inference_mode(False):
            noise = fitting_noise(seed, fit_noises, samples.shape[1:])
            # the host's guided denoiser takes any batch (ComfyUI repeats the conditioning to it)
            refine_noise = fitting_noise(seed, refine_noises, samples.shape[1:], stream=1) if refine_noises else None
            ms = model.get_model_object("model_sampling")
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(positive, negative)
            guider.set_cfg(cfg)
            fitter = _FittingSampler(steps, {"order": order, "iterations": iterations, "teacher_steps": teacher_steps,
                                             "refine_noise": refine_noise, "refine_candidates": True,
                                             "candidate_noise": candidate_fitting_noise(seed, settings,
                                                                                        samples.shape[1:]),
                                             "log": log,
                                             "info": {"cfg": float(cfg), **settings}})
            sigmas = torch.tensor([float(ms.sigma_max), 0.0])
            guider.sample(noise, torch.zeros_like(noise), fitter, sigmas, seed=seed, disable_pbar=True)
        return fitter.result
    return cached_calibration(key, fit, path, log, settings, file_key, steps, cfg)
