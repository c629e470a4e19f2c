"""The "Calibrated Scheduler+" node (ksampler_CalibratedScheduler): sigmas (and a sampler) fitted once to the model and conditioning.

Outputs SIGMAS and SAMPLER for SamplerCustom, and a KSAMPLER_CALIBRATION for our KSampler's optional
``calibration`` input.  Works on ComfyUI models (through the host's own sampling code) and on ours.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Optional

from .calibration import REFINE, check_calibration_path, default_log
from .graph_checks import MODEL_TYPES
from .node_inputs import is_comfy_model
from .node_schema import In, NodeSpec, Out, host_folder, v1_node
from .validation import MAX_SEED, KSamplerInputError, check_float, check_int

__all__ = ["CalibratedScheduler", "CALIBRATION_NODES"]


@v1_node(NodeSpec(
    function="calibrate", category="sampling/custom_sampling/schedulers",
    search_aliases=("calibrate", "calibrated", "sigmas", "schedule", "few steps", "ld3"),
    description="Fits the sigmas and a multistep sampler to this model and conditioning once (cached; it says "
                "when it fits) for SamplerCustom or the ksampler KSampler's calibration input.",
    inputs=(
        In("model", MODEL_TYPES, "The model to calibrate to (a ComfyUI model or the bundled one)."),
        In("positive", "CONDITIONING", "The positive conditioning the sampler will use."),
        In("negative", "CONDITIONING", "The negative conditioning the sampler will use."),
        In("latent_image", "LATENT", "The (empty) latent to sample: only its shape is used."),
        In("steps", "INT", "Steps (= model calls) to fit.", default=8, min=1, max=100),
        In("cfg", "FLOAT", "The guidance scale the sampler will use.", default=5.0, min=0.0, max=100.0, step=0.1,
           round=0.01),
        In("order", "INT", "Past estimates each step blends (1: schedule only).", default=3, min=1, max=3,
           optional=True),
        In("fit_noises", "INT", "Fitting noises (a batch).", default=8, min=4, max=256, optional=True),
        In("fit_seed", "INT", "Seed of the fitting noise (drawn apart from any sampling noise).", default=0, min=0,
           max=MAX_SEED, optional=True),
        In("iterations", "INT", "Optimiser iterations. The forms with and without a corrector first race for a "
           "third as many, so a fit costs 4/3 of this.", default=100, min=0, max=5000, optional=True),
        In("teacher_steps", "INT", "Steps of the fine reference solve the fit matches.", default=100, min=10,
           max=1000, optional=True),
        In("calibration_file", "STRING", "Optional .safetensors path: loaded when it holds this calibration, else "
           "written after fitting. Inside ComfyUI it is relative to ComfyUI's output folder and stays in it; in a "
           "workflow run headless (python -m ksampler run) it is relative to the workflow file's folder.", default="",
           optional=True),
        In("eta", "FLOAT", "0 follows the ODE the fit matched (closest to a fine solve). Above 0 each step re-noises "
           "as an ancestral sampler does (1: fully, as euler_ancestral), from the sampling seed; no refit.",
           default=0.0, min=0.0, max=1.0, step=0.05, optional=True),
        In("refine_noises", "INT", "0: off. Else this many more fitting noises (several times fit_noises, from a "
           "stream of fit_seed of their own), on which the fit goes on at a smaller step, keeping the iterate best "
           f"there. Costs a teacher solve and {REFINE['iterations']} more iterations on this batch, which must fit "
           "in memory.",
           default=0, min=0, max=1024, optional=True),
        In("fit_candidates", "INT", "1: one fit. Else (with refine_noises) this many fits, each from fitting noises "
           "of its own and each refined, keeping the one best on the refining noises; costs that many fits.",
           default=1, min=1, max=4, optional=True)),
    hidden={"base_dir": "KSAMPLER_BASE_DIR"},
    outputs=(Out("SIGMAS", "The fitted sigmas, descending, ending in 0.", "sigmas"),
             Out("SAMPLER", "The fitted multistep sampler, with its corrector if the fit chose one and the "
                 "fitted sigmas of its first and last model calls, run at eta (for SamplerCustom).", "sampler"),
             Out("KSAMPLER_CALIBRATION", "The calibration, for the KSampler's calibration input.",
                 "calibration"))))
class CalibratedScheduler:
    """Fits a step schedule and multistep coefficients to this model, conditioning, steps and cfg (cached)."""

    def calibrate(self, model, positive, negative, latent_image, steps, cfg, order=3, fit_noises=8, fit_seed=0,
                  iterations=100, teacher_steps=100, calibration_file="", eta=0.0, refine_noises=0,
                  fit_candidates=1, base_dir=None):
        from .calibration import check_eta

        check_int("steps", steps, 1, 100)
        check_int("order", order, 1, 3)
        check_int("fit_noises", fit_noises, 4, 256)
        check_int("fit_seed", fit_seed, 0, MAX_SEED)
        check_int("iterations", iterations, 0, 5000)
        check_int("teacher_steps", teacher_steps, 10, 1000)
        check_int("refine_noises", refine_noises, 0, 1024)  # 1 to 3 and fit_candidates: calibration.fit_settings
        check_float("cfg", cfg, 0.0, 100.0)
        check_eta(eta)
        if not isinstance(calibration_file, str):
            raise KSamplerInputError("calibration_file: expected a path string (or empty)")
        path = calibration_file.strip() or None
        made: list = []  # the folders made for calibration_file: removed again, where still empty, if this fails
        try:
            if path is not None:
                path = check_calibration_path("calibration_file", _resolve_calibration_file(path, base_dir, made))
            options = {"order": order, "fit_noises": fit_noises, "seed": fit_seed, "iterations": iterations,
                       "teacher_steps": teacher_steps, "refine_noises": refine_noises,
                       "fit_candidates": fit_candidates, "path": path}
            return _fit(model, positive, negative, latent_image, steps, float(cfg), float(eta), options)
        except BaseException:
            _remove_empty(made)
            raise


def _fit(model, positive, negative, latent_image, steps: int, cfg: float, eta: float, options: dict) -> tuple:
    """The node's outputs: the calibration fitted (or loaded) on a ComfyUI model through the host's own sampling
    code, or on ours, with its sampler at ``eta``."""
    in_host = "comfy.samplers" in sys.modules
    try:
        if is_comfy_model(model):
            from .comfy_adapter import CalibratedSampler
            from .comfy_calibration import calibrate_host
            cal = _with_eta(calibrate_host(model, positive, negative, latent_image, steps, cfg, **options), eta)
            return cal.sigmas.clone(), CalibratedSampler(cal), cal
        from .calibration import calibrate
        if in_host:  # one of our models inside ComfyUI: the node's progress bar and the stop request
            from .comfy_adapter import host_progress
            options["progress"] = host_progress()
        cal = _with_eta(calibrate(model, positive, negative, latent_image, steps, cfg, **options), eta)
    except ValueError as exc:
        raise KSamplerInputError(str(exc)) from exc
    sampler = cal.sampler()
    if in_host:
        from .comfy_adapter import CalibratedSampler
        sampler = CalibratedSampler(cal)
    return cal.sigmas.clone(), sampler, cal


def _resolve_calibration_file(path: str, base_dir=None, made: Optional[list] = None,
                              log=default_log) -> str:
    """Inside the ComfyUI server a calibration file lives in ComfyUI's output folder, as the files its own nodes
    write do: a relative path is taken there (its subfolders made as needed), and a path outside it is refused.
    In a workflow run headless a relative path is taken in the workflow file's folder (``base_dir``, as the
    bundled Load Image takes its path); called from Python it is as given.  ``made`` gets the folders made,
    deepest first."""
    root = host_folder("output")
    if root is None:
        return os.path.join(base_dir, path) if base_dir and not os.path.isabs(path) else path
    root = os.path.abspath(root)
    resolved = os.path.abspath(os.path.join(root, path))
    try:
        inside = os.path.commonpath([root, resolved]) == root
    except ValueError:  # another drive
        inside = False
    if not inside:
        raise KSamplerInputError(f"calibration_file: {path!r} is outside ComfyUI's output folder {root}; inside "
                                 "ComfyUI calibration files are read and written there: give a path relative to it")
    if "\x00" in path or not path.endswith(".safetensors"):
        return resolved  # check_calibration_path says what is wrong with it, before any folder is made
    missing, folder = [], os.path.dirname(resolved)
    while not os.path.exists(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if made is not None:  # noted first: a makedirs that fails halfway leaves its upper folders too
        made.extend(missing)
    try:  # a subfolder, as ComfyUI's Save Image makes one
        os.makedirs(os.path.dirname(resolved), exist_ok=True)
    except OSError as exc:
        raise KSamplerInputError(f"calibration_file: cannot make the folder {os.path.dirname(resolved)!r} "
                                 f"({exc.strerror or exc}); choose another path") from None
    if not os.path.isabs(path) and not os.path.exists(resolved) and os.path.isfile(path):
        log(f"calibration_file: {path!r} is read from ComfyUI's output folder ({resolved}), not from the folder "
            "the server was started in as before; move the file there to reuse it instead of fitting again")
    return resolved


def _remove_empty(folders: list) -> None:
    """Remove ``folders`` (deepest first) while they are empty: a node that fails leaves no folder it made."""
    for folder in folders:
        if not os.path.isdir(folder):  # never made (a makedirs that failed below it)
            continue
        try:
            os.rmdir(folder)
        except OSError:
            return


def _with_eta(cal, eta: float):
    """The (cached) fit itself at its own eta, else a copy that samples at ``eta`` (the cached one is unchanged)."""
    return cal if float(eta) == cal.eta else replace(cal, eta=float(eta))


CALIBRATION_NODES = {
    "ksampler_CalibratedScheduler": (CalibratedScheduler, "Calibrated Scheduler+"),
}
