"""The entry points: ``calibrate`` for our models, the checks and noise a fit in ComfyUI shares with it, and the
sigmas of a KSampler run with a calibration."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..validation import MAX_SEED, KSamplerInputError, check_float, check_int
from .cache import cached_calibration, check_calibration_path, default_log
from .fit import DEFAULT_FIT, MAX_CALIBRATION_STEPS, REFINE, check_callables, fit_calibration
from .keys import calibration_keys
from .record import Calibration, check_model_sampling

FIT_SALT = 0x5EEDCA11B  # the fitting noise stream: never the KSampler's noise of the same seed


def fitting_noise(seed: int, count: int, shape, dtype=torch.float32, stream: int = 0) -> Tensor:
    """``count`` unit noises shaped like one latent item, from the salted fitting stream of ``seed`` (``stream`` 1:
    a second stream, apart from the first, for the refining noise; 2 and up: the other candidate fits')."""
    gen = torch.Generator().manual_seed(((int(seed) ^ FIT_SALT) + int(stream) * 0x9E3779B97F4A7C15) % (1 << 63))
    return torch.randn((count,) + tuple(shape), generator=gen, dtype=dtype)


def check_fit_batches(positive, negative, latent_shape, fit_noises: int, refine_noises: int = 0) -> None:
    """A fit samples ``fit_noises`` (and ``refine_noises``) noises of one latent at once, so the conditioning's
    masks must repeat over those batches as over a latent batch (``check_regions``); the error says why."""
    from ..conditioning.cfg import check_regions
    for batch in sorted({fit_noises, refine_noises} - {0}):
        shape = (batch,) + tuple(latent_shape[1:])
        try:
            check_regions(positive, "positive", shape)
            check_regions(negative or [], "negative", shape)
        except KSamplerInputError as exc:
            raise KSamplerInputError(f"{exc} (a calibration fits {batch} noises of the latent at once: fit_noises, "
                                     "refine_noises)") from None


def fit_settings(order: int, fit_noises: int, seed: int, iterations: int, teacher_steps: int,
                 refine_noises: int = 0, fit_candidates: int = 1) -> dict:
    """The settings of a ``calibrate`` fit (ours or the host's), checked, as they go into the cache key.  The
    bounds are the Calibrated Scheduler node's, but order 4 (``fit_calibration``'s) and refining sets up to 4,096
    noises (those of the studies in the README) for Python callers."""
    check_int("order", order, 1, 4)
    check_int("fit_noises", fit_noises, 4, 256)
    check_int("seed", seed, 0, MAX_SEED)
    check_int("iterations", iterations, 0, 5000)
    check_int("teacher_steps", teacher_steps, 10, 1000)
    check_int("refine_noises", refine_noises, 0, 4096)
    if 0 < refine_noises < 4:
        raise KSamplerInputError(f"refine_noises: expected 0 (no refinement) or at least 4, got {refine_noises!r}")
    check_int("fit_candidates", fit_candidates, 1, 4)
    if fit_candidates > 1 and not refine_noises:
        raise ValueError(f"fit_candidates: {fit_candidates} fits are told apart on the refining noises; set "
                         "refine_noises (e.g. 8 times fit_noises) or fit_candidates to 1")
    settings = {"order": order, "fit_noises": fit_noises, "seed": seed, "iterations": iterations,
                "teacher_steps": teacher_steps}
    if refine_noises:  # only then in the key, so that the files of unrefined calibrations keep theirs
        settings.update({"refine_noises": refine_noises, "refine": dict(REFINE)})
    if fit_candidates > 1:  # likewise
        settings["fit_candidates"] = fit_candidates
    return settings


def candidate_fitting_noise(seed: int, settings: dict, shape) -> list:
    """The fitting noise of each candidate fit after the first (``fit_candidates`` - 1 sets, from streams of
    ``seed`` of their own, apart from the fitting and the refining noise)."""
    return [fitting_noise(seed, settings["fit_noises"], shape, stream=1 + k)
            for k in range(1, settings.get("fit_candidates", 1))]


def calibrate(model, positive, negative, latent: dict, steps: int, cfg: float, *, order: int = 3,
              fit_noises: int = 8, seed: int = 0, iterations: int = DEFAULT_FIT["iterations"],
              teacher_steps: int = DEFAULT_FIT["teacher_steps"], refine_noises: int = 0, fit_candidates: int = 1,
              path: Optional[str] = None, log: Callable[[str], None] = default_log,
              progress: Optional[Callable[[int, int], None]] = None) -> Calibration:
    """Fit (once; cached per model, conditioning, latent shape, steps, cfg and settings) a calibration for one of
    our models (``models.DiffusionModel``) sampling txt2img with this conditioning.

    Use it with ``ksample(..., calibration=cal)`` or ``sample(..., sigmas=cal.sigmas, sampler=cal.sampler())``.
    ``path``: a .safetensors file to load the calibration from (if it exists and is for these inputs) or save
    it to.  The fitting noise comes from a stream of ``seed`` salted apart from the sampling noise.
    ``refine_noises``: that many more fitting noises (from a second stream), on which the fit is refined
    (``fit_calibration``'s ``refine_noise``; several times ``fit_noises`` to see rare noises; 0: none).
    ``fit_candidates``: with ``refine_noises``, that many fits from fitting noises of their own, each refined, and
    the one best on the refining noises kept (``fit_calibration``'s ``refine_candidates``; it costs that many
    fits).  ``progress``: ``fit_calibration``'s (a fit's iterations as they go; raise from it to stop the fit).
    """
    from ..conditioning.cfg import Guidance
    from ..validation import check_latent, check_model

    check_model(model)
    samples, _, _ = check_latent(latent, model.latent_format.latent_channels,
                                 dims=getattr(model.latent_format, "latent_dimensions", 2) + 2)
    steps, cfg, path = check_fit_request(steps, cfg, path, log=log, progress=progress)
    log = log or _silent
    settings = fit_settings(order, fit_noises, seed, iterations, teacher_steps, refine_noises, fit_candidates)
    from ..graph_checks import check_graph, headless_spec
    check_graph(headless_spec(model), positive, negative, latent, cfg)  # what our KSampler checks, before the fit
    check_fit_batches(positive, negative, samples.shape, fit_noises, refine_noises)
    key, file_key = calibration_keys(model, positive, negative, samples.shape, steps, cfg, settings)

    def fit() -> Calibration:
        ms = model.model_sampling
        device = getattr(model, "device", torch.device("cpu"))
        guidance = Guidance(positive, negative, cfg)
        noise = fitting_noise(seed, fit_noises, samples.shape[1:]).to(device)
        guided = guidance.bind(model, ms, noise.shape, device)
        refine_noise = refine_guided = None
        if refine_noises:
            refine_noise = fitting_noise(seed, refine_noises, samples.shape[1:], stream=1).to(device)
            refine_guided = guidance.bind(model, ms, refine_noise.shape, device)
        return fit_calibration(guided, ms, noise, steps, order=order, iterations=iterations,
                               teacher_steps=teacher_steps, refine_noise=refine_noise,
                               refine_denoiser=refine_guided, refine_candidates=True,
                               candidate_noise=[n.to(device) for n in
                                                candidate_fitting_noise(seed, settings, samples.shape[1:])],
                               log=log, info={"cfg": float(cfg), **settings}, progress=progress)
    return cached_calibration(key, fit, path, log, settings, file_key, steps, cfg)


def _silent(message: str) -> None:
    """A log that says nothing (``log=None``)."""


def check_fit_request(steps, cfg, path, **functions) -> tuple:
    """(steps, cfg, path) of a ``calibrate`` call (ours or the host's), checked before any fit: steps and cfg within
    the Calibrated Scheduler node's bounds, the file (if any) as ``check_calibration_path`` wants it under the
    name ``path``, and ``functions`` (log, progress) callable or None."""
    check_int("steps", steps, 1, MAX_CALIBRATION_STEPS)
    cfg = check_float("cfg", cfg, 0.0, 100.0)  # the node's bounds, as sampling_pass.check_sampler_args
    check_callables(**functions)
    return steps, cfg, None if path is None else check_calibration_path("path", path)


def run_sigmas(calibration: "Calibration", steps: int, cfg: float, denoise: float = 1.0,
               model_sampling=None) -> Tensor:
    """The sigmas a KSampler run uses with ``calibration``, after checking that it is a whole calibration and that
    the run is the one it was fitted for (and, given the run's ``model_sampling``, on that model sampling; the
    calibration's sampler checks that too when it runs)."""
    if not isinstance(calibration, Calibration):
        raise ValueError(f"calibration: expected a Calibration (from the Calibrated Scheduler node or "
                         f"ksampler.calibration.calibrate), got {type(calibration).__name__}")
    calibration.validate()
    check_model_sampling(calibration, model_sampling)
    if int(steps) != calibration.steps:
        raise ValueError(f"steps: the calibration was fitted for {calibration.steps} steps, the run asks for {steps}; "
                         f"set steps to {calibration.steps} or fit a calibration for {steps}")
    fitted_cfg = calibration.info.get("cfg")
    if fitted_cfg is not None and not math.isclose(float(fitted_cfg), float(cfg), rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(f"cfg: the calibration was fitted at cfg {fitted_cfg:g}, the run uses {float(cfg):g}; "
                         "use the same cfg or fit a calibration for this one")
    if not math.isclose(float(denoise), 1.0):
        raise ValueError(f"denoise: calibrations are fitted for txt2img (denoise 1.0), got {denoise}; set denoise to "
                         "1.0 or disconnect the calibration")
    return calibration.sigmas.clone()
