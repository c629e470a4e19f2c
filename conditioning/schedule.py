"""Guidance schedules: the CFG scale as a function of the noise level.

* An interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited
  interval improves sample and distribution quality", arXiv:2404.07724):
  the scale applies while ``sigma_low <= sigma <= sigma_high`` and is 1
  outside, where the negative (unconditional) pass is skipped.
* A linear ramp from ``cfg`` at the first step to ``cfg_end`` at the last.
* A stop: cfg 1 once ``stop_fraction`` of the steps are done.

Step positions are read from sigma (the fractional index of sigma in the
pass's schedule), so multi-stage samplers that call the model between grid
points get the interpolated value and the schedule never needs a step counter.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .validate import KSamplerInputError

__all__ = ["GuidanceSchedule", "CfgOfSigma", "SIGMA_UNBOUNDED", "RAMPS"]

SIGMA_UNBOUNDED = 10000.0   # the node's "no upper bound" for the interval (above any model's sigma_max)
RAMPS = ("constant", "linear")

CfgOfSigma = Callable[[float], float]


def _number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise KSamplerInputError(f"{name}: must be a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GuidanceSchedule:
    """Where and how strongly CFG applies; the default applies ``cfg`` everywhere (today's behaviour).

    sigma_low, sigma_high: CFG only while sigma_low <= sigma <= sigma_high (model sigma units).
    ramp: "constant", or "linear" from cfg at the first step to ``cfg_end`` at the last.
    stop_fraction: cfg is 1 once this fraction of the pass's steps is done (1.0: never).
    """

    sigma_low: float = 0.0
    sigma_high: float = SIGMA_UNBOUNDED
    ramp: str = "constant"
    cfg_end: float = 1.0
    stop_fraction: float = 1.0

    def __post_init__(self):
        _number("cfg_sigma_min", self.sigma_low, 0.0, SIGMA_UNBOUNDED)
        _number("cfg_sigma_max", self.sigma_high, 0.0, SIGMA_UNBOUNDED)
        if self.sigma_low > self.sigma_high:
            raise KSamplerInputError(f"cfg_sigma_min: {self.sigma_low:g} is above cfg_sigma_max "
                                     f"{self.sigma_high:g}; the guidance interval must be low <= high")
        if self.ramp not in RAMPS:
            raise KSamplerInputError(f"cfg_ramp: must be one of {', '.join(RAMPS)}, got {self.ramp!r}")
        _number("cfg_ramp_end", self.cfg_end, 0.0, 100.0)
        _number("cfg_stop_at", self.stop_fraction, 0.0, 1.0)

    @property
    def is_default(self) -> bool:
        """True when the schedule is a constant cfg everywhere (the sampling pass then runs unchanged)."""
        return self.sigma_low <= 0.0 and self.sigma_high >= SIGMA_UNBOUNDED and self.ramp == "constant" \
            and self.stop_fraction >= 1.0

    def bind(self, sigmas: Sequence[float], cfg: float) -> CfgOfSigma:
        """``cfg_of(sigma)`` for a pass over ``sigmas`` (descending) at base scale ``cfg``."""
        sig = [float(s) for s in sigmas]
        total = max(len(sig) - 1, 1)
        ascending = sig[::-1]
        cfg = float(cfg)

        def position(sigma: float) -> float:
            """Fraction of the pass done at ``sigma`` (0 at sigmas[0], 1 at sigmas[-1])."""
            if sigma >= sig[0]:
                return 0.0
            if sigma <= sig[-1]:
                return 1.0
            j = bisect.bisect_left(ascending, sigma)      # ascending[j-1] < sigma <= ascending[j]
            hi_i = len(sig) - 1 - j                        # index in sig of the grid point at or above sigma
            lo_s, hi_s = sig[hi_i + 1], sig[hi_i]
            frac = (hi_s - sigma) / (hi_s - lo_s) if hi_s > lo_s else 0.0
            return (hi_i + frac) / total

        def cfg_of(sigma: float) -> float:
            if not self.sigma_low <= sigma <= self.sigma_high:
                return 1.0
            t = position(sigma)
            # a small tolerance: steps that start exactly at the stop fraction already drop to 1
            if self.stop_fraction < 1.0 and t >= self.stop_fraction - 1e-9:
                return 1.0
            if self.ramp == "linear":
                step_t = min(1.0, t * total / max(total - 1, 1))   # the last step's start is the ramp's end
                return cfg + (self.cfg_end - cfg) * step_t
            return cfg
        return cfg_of

    @classmethod
    def from_inputs(cls, sigma_low=0.0, sigma_high=SIGMA_UNBOUNDED, ramp="constant", cfg_end=1.0,
                    stop_fraction=1.0) -> Optional["GuidanceSchedule"]:
        """The schedule for node / CLI inputs, or None when they leave guidance unchanged."""
        schedule = cls(sigma_low, sigma_high, ramp, cfg_end, stop_fraction)
        return None if schedule.is_default else schedule
