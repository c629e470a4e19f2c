"""Two models in one sampler (Wan 2.2's mixture of experts): a high-noise expert, then a low-noise one.

The high-noise model runs the steps whose starting noise level is at or above
the boundary; the low-noise model runs the rest, from the first step below it.
The noise level is the model's normalised timestep: sigma itself for flow models
(Wan's boundary 0.875 / 0.9 is timestep / 1000 = sigma, whatever the shift),
timestep / number of training steps for discrete (SD-style) models, and sigma
for continuous VE / EDM models.  The two stages are exactly what two chained
KSampler Advanced nodes compute: stage one stops at the switch step with its
leftover noise, stage two continues without adding noise.
"""
from __future__ import annotations

from typing import Optional

import torch

from .validation import MAX_STEPS, KSamplerInputError, check_float

__all__ = ["WAN22_BOUNDARY", "SWITCH_MODES", "noise_level", "switch_step", "check_same_sampling", "prediction_kind"]

# Wan 2.2's published boundaries (timestep / 1000, i.e. sigma for its flow models)
WAN22_BOUNDARY = {"t2v": 0.875, "i2v": 0.9}
SWITCH_MODES = ("sigma", "step")

# the host's prediction classes (ComfyUI's comfy.model_sampling), read by name: the core never imports comfy
_HOST_KINDS = {"EPS": "eps", "V_PREDICTION": "v", "EDM": "edm", "X0": "x0", "IMG_TO_IMG": "x0", "CONST": "flow",
               "COSMOS_RFLOW": "flow"}


def _host(ms):
    return getattr(ms, "host", None)


def prediction_kind(ms) -> str:
    """'eps', 'v', 'x0', 'edm' or 'flow': what the model predicts (ours, or a host model-sampling object)."""
    host = _host(ms) or ms
    for cls in type(host).__mro__:
        if cls.__name__ in _HOST_KINDS and cls.__module__.startswith("comfy"):
            return _HOST_KINDS[cls.__name__]
    return getattr(ms, "prediction_type", type(ms).__name__)


def _discrete_steps(ms) -> Optional[int]:
    host = _host(ms)
    if host is not None:
        discrete = any(c.__name__ == "ModelSamplingDiscrete" for c in type(host).__mro__) and \
            not any(c.__name__ == "ModelSamplingDiscreteEDM" for c in type(host).__mro__)
        return len(host.sigmas) if discrete else None
    from .models.sampling import _Discrete
    return len(ms.sigmas) if isinstance(ms, _Discrete) else None


def noise_level(ms, sigma: float) -> float:
    """The model's normalised noise level at ``sigma`` (see the module docstring)."""
    if prediction_kind(ms) == "flow":
        return float(sigma)
    steps = _discrete_steps(ms)
    if steps is not None:
        return float(ms.timestep(torch.tensor(float(sigma)))) / steps
    return float(sigma)


def switch_step(ms, sigmas, boundary: float) -> int:
    """Number of steps the high-noise model runs: those starting at a noise level >= ``boundary``."""
    boundary = check_float("boundary", boundary, 0.0, 1e4)
    sig = [float(s) for s in sigmas]
    steps = 0
    for sigma in sig[:-1]:
        if noise_level(ms, sigma) < boundary:
            break
        steps += 1
    return steps


def check_same_sampling(ms_high, ms_low) -> None:
    """The two experts must share their prediction type (eps / v / flow ...), else one latent cannot pass between."""
    high, low = prediction_kind(ms_high), prediction_kind(ms_low)
    if high != low:
        raise KSamplerInputError(f"model_low: predicts {low!r} but model_high predicts {high!r}; the two experts must "
                                 "share their model sampling (e.g. both flow models, or both eps); pick two models "
                                 "of the same family")


def check_switch(switch_by: str, switch_at_step: int) -> None:
    if switch_by not in SWITCH_MODES:
        raise KSamplerInputError(f"switch_by: must be one of {', '.join(SWITCH_MODES)}, got {switch_by!r}")
    if isinstance(switch_at_step, bool) or not isinstance(switch_at_step, int) or \
            not 0 <= switch_at_step <= MAX_STEPS:
        raise KSamplerInputError(f"switch_at_step: must be an integer between 0 and {MAX_STEPS}, "
                                 f"got {switch_at_step!r}")
