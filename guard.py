"""The model-output guard: every denoised estimate is checked before a sampler uses it (headless and in ComfyUI).

A model that returns ``None`` or a wrong shape gets an error naming the model; NaN or Inf gets one naming
the step, the sigma, the sampler and what to try, at the first step where it appears.  The check is one
float64 reduction per model output (``bench/guard.py`` measures it against a model call).
"""
from __future__ import annotations

import math

import torch

__all__ = ["ModelOutputError", "NonFiniteOutputError", "StepGuard", "check_output_shape", "all_finite",
           "nonfinite_error", "with_sampler_options", "nonfinite_sample_error"]


class ModelOutputError(RuntimeError):
    """The model returned something a sampler cannot use; the message names the model."""


class NonFiniteOutputError(ModelOutputError, FloatingPointError):
    """The model's output holds NaN or Inf; the message names the step, the sigma and the sampler."""


def check_output_shape(out, x: torch.Tensor, model: str, what: str = "denoised estimate") -> None:
    """``out`` must be a tensor shaped like the model input ``x``."""
    if not isinstance(out, torch.Tensor):
        raise ModelOutputError(f"model: {model} returned {type(out).__name__} instead of a {what} tensor shaped "
                               f"{tuple(x.shape)}; a model patch (LoRA, wrapper node) or custom model is broken: "
                               "remove the patches added last")
    if out.shape != x.shape:
        raise ModelOutputError(f"model: {model} returned a {what} of shape {tuple(out.shape)} for an input of shape "
                               f"{tuple(x.shape)}; it must return one shaped like its input: check the model "
                               "patches and that the latent belongs to this model")


def all_finite(t: torch.Tensor) -> bool:
    """One reduction pass: NaN and Inf propagate into the float64 sum."""
    return math.isfinite(float(t.sum(dtype=torch.float64)))


def nonfinite_error(what: str, step: int, total: int, sigma: float, sampler: str,
                    model: str = "the model") -> NonFiniteOutputError:
    return NonFiniteOutputError(
        f"model: the {what} of {model} contains NaN or Inf at step {step}/{total} (sigma={sigma:.6g}) with "
        f"sampler {sampler}; try: float32 or bfloat16 weights instead of float16 (fp16 overflow is the usual "
        "cause), removing the LoRA or model patch added last, a lower cfg, or another sampler; also check the "
        "conditioning and the latent")


def _describe(options: dict) -> str:
    return ", ".join(f"{key}={value!r}" if not callable(value) else key for key, value in options.items())


def with_sampler_options(error: NonFiniteOutputError, options: dict) -> NonFiniteOutputError:
    """``error`` (a NaN blamed on the model) for a run that had sampler options, which can cause it as well."""
    return NonFiniteOutputError(f"{error}; this run also had sampler_options ({_describe(options)}), which can "
                                "make a sampler diverge as well: run once without them (the sampler's defaults) "
                                "to tell which")


def nonfinite_sample_error(sampler: str, options: dict) -> NonFiniteOutputError:
    """A sample that turned NaN or Inf in the sampler's own arithmetic, with sampler options given."""
    return NonFiniteOutputError(f"sampler_options: sampler {sampler} returned a sample with NaN or Inf while every "
                                f"model output was finite, with sampler_options ({_describe(options)}): use the "
                                "sampler's default options or values nearer them")


class StepGuard:
    """Checks each denoised estimate of one run; the sampler's callback advances ``step``."""

    def __init__(self, total_steps: int, sampler: str, model: str, check_finite: bool = True):
        self.total, self.sampler, self.model = total_steps, sampler, model
        self.check_finite = check_finite  # False: NaN/Inf pass (a calibration fit handles diverging trials itself)
        self.step = 0  # steps completed

    def check(self, out, x: torch.Tensor, sigma, what: str = "denoised estimate"):
        check_output_shape(out, x, self.model, what)
        if self.check_finite and not all_finite(out):
            sigma = float(torch.as_tensor(sigma).reshape(-1)[0])
            raise nonfinite_error(what, min(self.step + 1, self.total), self.total, sigma, self.sampler, self.model)
        return out
