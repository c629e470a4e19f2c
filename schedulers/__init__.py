"""Scheduler registry: name -> ``fn(model_sampling, steps, **options) -> sigmas``.

Every scheduler returns a float32 tensor of descending sigmas ending in 0; the
nine ComfyUI schedulers come first, in ComfyUI's order, with ComfyUI's exact
definitions.  To add one, write the function and add a line to ``SCHEDULERS``
(or call ``register_scheduler``).
"""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from ._common import append_zero, karras_ramp, sigma_range
from ._special import beta_ppf
from . import extra as _extra
from ..validation import KSamplerInputError, check_new_entry, lookup_entry

__all__ = [
    "SCHEDULERS", "COMFY_SCHEDULER_NAMES", "calculate_sigmas", "sampling_sigmas", "ksampler_sigmas",
    "register_scheduler", "check_scheduler_options", "SCHEDULER_OPTIONS",
    "karras_sigmas", "exponential_sigmas", "karras_ramp",
]

SchedulerFn = Callable[..., Tensor]


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    return append_zero(karras_ramp(torch.linspace(0, 1, n), sigma_min, sigma_max, rho))


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Sigmas evenly spaced in log sigma."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def simple(model_sampling, steps: int) -> Tensor:
    """Evenly strided training sigmas, counted down from the noisiest."""
    table = model_sampling.sigmas
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def normal(model_sampling, steps: int, sgm: bool = False) -> Tensor:
    """Timesteps evenly spaced between those of sigma_max and sigma_min, mapped back to sigmas."""
    start = float(model_sampling.timestep(model_sampling.sigma_max))
    end = float(model_sampling.timestep(model_sampling.sigma_min))
    ends_in_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(model_sampling.sigma(torch.tensor(end))), 0, abs_tol=0.00001):
            steps += 1
            ends_in_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(model_sampling.sigma(t)) for t in timesteps]
    if ends_in_zero:
        sigs.append(0.0)
    return torch.FloatTensor(sigs)


def sgm_uniform(model_sampling, steps: int) -> Tensor:
    """``normal`` without the final timestep, as SGM/SDXL-Turbo sample."""
    return normal(model_sampling, steps, sgm=True)


def karras(model_sampling, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) over the model's sigma range."""
    sigma_min, sigma_max = sigma_range(model_sampling)
    return karras_sigmas(steps, sigma_min, sigma_max, rho)


def exponential(model_sampling, steps: int) -> Tensor:
    """Log-linear sigmas over the model's range."""
    sigma_min, sigma_max = sigma_range(model_sampling)
    return exponential_sigmas(steps, sigma_min, sigma_max)


def ddim_uniform(model_sampling, steps: int) -> Tensor:
    """DDIM's uniform timestep skipping (Song et al. 2021): every (T // steps)-th training sigma from index 1."""
    table = model_sampling.sigmas
    if math.isclose(float(table[1]), 0, abs_tol=0.00001):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    stride = max(len(table) // steps, 1)
    sigs += [float(table[i]) for i in range(1, len(table), stride)]
    return torch.FloatTensor(sigs[::-1])


def beta(model_sampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Timesteps at Beta(alpha, beta) quantiles (Lee et al. 2024, arXiv:2407.12173); repeated timesteps are merged."""
    last_index = len(model_sampling.sigmas) - 1
    sigs, last_t = [], -1
    for i in range(steps):
        t = round(beta_ppf(1.0 - i / steps, alpha, beta) * last_index)
        if t != last_t:
            sigs.append(float(model_sampling.sigmas[int(t)]))
        last_t = t
    return torch.FloatTensor(sigs + [0.0])


def linear_quadratic(model_sampling, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None) -> Tensor:
    """Mochi's schedule (Genmo 2024): linear in the first half of the steps, then quadratic, scaled by sigma_max."""
    if steps == 1:
        shape = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        if not 1 <= linear_steps < steps:
            raise KSamplerInputError(f"scheduler_options['linear_steps']: scheduler 'linear_quadratic' needs "
                                     f"1 <= linear_steps < the step count {steps}, got {linear_steps}; leave it out "
                                     "for half the steps")
        linear_part = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quad_coef = step_diff / (linear_steps * quadratic_steps ** 2)
        lin_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        const = quad_coef * (linear_steps ** 2)
        quadratic_part = [quad_coef * i ** 2 + lin_coef * i + const for i in range(linear_steps, steps)]
        shape = [1.0 - v for v in linear_part + quadratic_part + [1.0]]
    return torch.FloatTensor(shape) * torch.as_tensor(model_sampling.sigma_max).float().cpu()


def kl_optimal(model_sampling, steps: int) -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, AYS appendix): linear in arctan(sigma)."""
    sigma_min, sigma_max = sigma_range(model_sampling)
    if steps == 1:  # ComfyUI divides by zero here; one step goes straight from sigma_max to 0
        return torch.FloatTensor([sigma_max, 0.0])
    frac = torch.arange(steps, dtype=torch.float).div_(steps - 1)
    sigmas = frac.new_zeros(steps + 1)
    sigmas[:-1] = (frac * math.atan(sigma_min) + (1 - frac) * math.atan(sigma_max)).tan_()
    return sigmas


SCHEDULERS: "OrderedDict[str, SchedulerFn]" = OrderedDict([
    # ComfyUI's nine, in ComfyUI's order
    ("simple", simple),
    ("sgm_uniform", sgm_uniform),
    ("karras", karras),
    ("exponential", exponential),
    ("ddim_uniform", ddim_uniform),
    ("beta", beta),
    ("normal", normal),
    ("linear_quadratic", linear_quadratic),
    ("kl_optimal", kl_optimal),
    # beyond ComfyUI's list
    *_extra.EXTRA_SCHEDULERS.items(),
])

_BUILTIN_SCHEDULERS = dict(SCHEDULERS)  # the specs above apply to these functions, not to replacements

COMFY_SCHEDULER_NAMES = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                         "linear_quadratic", "kl_optimal")

MAX_SCHEDULE_STEPS = 20000

def register_scheduler(name: str, fn: SchedulerFn, *, replace: bool = False) -> SchedulerFn:
    """Add ``fn(model_sampling, steps, **options) -> sigmas`` to the registry under ``name``."""
    check_new_entry(SCHEDULERS, name, fn, replace, "register_scheduler")
    SCHEDULERS[name] = fn
    return fn


# The options of the built-in schedulers: option -> (kind, low, high, low included), kind "real", "int" or "bool",
# or a tuple of the names allowed.  The ranges are those of ComfyUI's scheduler nodes where one exists (Karras,
# Polyexponential, Beta, VP, Laplace), otherwise where the formula holds (no division by zero, descending sigmas).
SCHEDULER_OPTIONS: dict = {
    "normal": {"sgm": ("bool", None, None, True)},
    "karras": {"rho": ("real", 0.0, 100.0, False)},
    "beta": {"alpha": ("real", 0.0, 50.0, False), "beta": ("real", 0.0, 50.0, False)},
    "linear_quadratic": {"threshold_noise": ("real", 0.0, 1.0, False),
                         "linear_steps": ("int", 1, MAX_SCHEDULE_STEPS, True)},
    "polyexponential": {"rho": ("real", 0.0, 100.0, False)},
    "vp": {"beta_d": ("real", 0.0, 5000.0, False), "beta_min": ("real", 0.0, 5000.0, True)},
    "laplace": {"mu": ("real", -10.0, 10.0, True), "beta": ("real", 0.0, 10.0, False)},
    "align_your_steps": {"model_type": (tuple(_extra.AYS_TABLES), None, None, True)},
}


def _option_names(fn) -> Optional[list]:
    """The keyword options ``fn(model_sampling, steps, **options)`` takes (None: any, it has ``**kwargs``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_scheduler_options(name: str, options) -> None:
    """``options`` for scheduler ``name``: only the options it takes, each of the right type and in range."""
    fn = lookup_entry(SCHEDULERS, name, "scheduler", "scheduler")
    if not isinstance(options, Mapping):
        raise KSamplerInputError(f"scheduler_options: expected a dict of the scheduler's options (e.g. "
                                 f"{{'rho': 7.0}} for karras), got {type(options).__name__}")
    allowed = _option_names(fn)
    specs = SCHEDULER_OPTIONS.get(name, {}) if fn is _BUILTIN_SCHEDULERS.get(name) else {}
    for key, value in options.items():
        where = f"scheduler_options[{key!r}]"
        if allowed is not None and key not in allowed:
            takes = f"its options are: {', '.join(allowed)}" if allowed else "it takes no options"
            raise KSamplerInputError(f"{where}: scheduler {name!r} has no option {key!r}; {takes}")
        if key not in specs:
            continue
        kind, low, high, low_included = specs[key]
        if isinstance(kind, tuple):
            if value not in kind:
                raise KSamplerInputError(f"{where}: scheduler {name!r} takes one of {', '.join(map(repr, kind))}, "
                                         f"got {value!r}")
            continue
        if kind == "bool":
            if not isinstance(value, bool):
                raise KSamplerInputError(f"{where}: scheduler {name!r} takes True or False, got {value!r}")
            continue
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise KSamplerInputError(f"{where}: scheduler {name!r} takes an integer, got {type(value).__name__} "
                                     f"{value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise KSamplerInputError(f"{where}: scheduler {name!r} takes a finite number, got {value!r}")
        if not (low <= value if low_included else low < value) or value > high:
            bound = ">=" if low_included else ">"
            raise KSamplerInputError(f"{where}: scheduler {name!r} needs {key} {bound} {low:g} and <= {high:g}, "
                                     f"got {value:g}")


def check_model_sampling(model_sampling) -> None:
    """A model sampling a scheduler can read (its sigma range), or an error naming it."""
    if any(not hasattr(model_sampling, a) for a in ("sigma_min", "sigma_max")):
        raise KSamplerInputError(f"model_sampling: expected a ModelSampling (e.g. models.EPS(), or a model's "
                                 f".model_sampling), got {type(model_sampling).__name__}")


def calculate_sigmas(model_sampling, name: str, steps: int, **options) -> Tensor:
    """``steps + 1`` descending float32 sigmas ending in 0 from scheduler ``name``.

    (``ddim_uniform`` and ``beta`` follow ComfyUI and can return a few more or
    fewer, for step counts that do not divide the training schedule evenly.)
    """
    fn = lookup_entry(SCHEDULERS, name, "scheduler", "scheduler")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    check_model_sampling(model_sampling)
    check_scheduler_options(name, options)
    sigmas = fn(model_sampling, steps, **options)
    return torch.as_tensor(sigmas, dtype=torch.float32).cpu()


def sampling_sigmas(model_sampling, scheduler: str, steps: int, denoise: float = 1.0,
                    discard_penultimate_sigma: bool = False, schedule: Optional[Callable] = None,
                    **options) -> Tensor:
    """The sigmas a KSampler run uses: ComfyUI's denoise rule and penultimate-sigma rule applied.

    denoise >= 0.9999 uses the full schedule; denoise <= 0 gives an empty tensor
    (nothing to do); otherwise the schedule for ``int(steps / denoise)`` steps is
    computed and its last ``steps + 1`` sigmas kept, so exactly ``steps`` steps run.
    Repeated sigmas (a table scheduler asked for more steps than its 1000-entry
    table holds) are merged, so no step has zero length.  A tiny denoise is
    capped at a ``MAX_SCHEDULE_STEPS``-step schedule (its tail is already far
    below any sigma that changes an image).  ``schedule(model_sampling, n)``, when
    given, computes the n-step schedule instead of the registry's ``scheduler``
    (inside ComfyUI: a scheduler only the host has).
    """
    def raw(n: int) -> Tensor:
        if schedule is not None:
            return torch.as_tensor(schedule(model_sampling, n), dtype=torch.float32).cpu()
        return calculate_sigmas(model_sampling, scheduler, n, **options)

    def compute(n: int) -> Tensor:
        if discard_penultimate_sigma:
            sigmas = raw(n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return raw(n)

    if denoise is None or denoise > 0.9999:
        return _drop_repeats(compute(steps))
    if denoise <= 0.0:
        return torch.zeros([0])
    total = min(int(min(steps / denoise, 1e9)), max(steps, MAX_SCHEDULE_STEPS))
    return _drop_repeats(compute(total)[-(steps + 1):])


def ksampler_sigmas(model_sampling, scheduler: str, steps: int, denoise: float = 1.0,
                    discard_penultimate_sigma: bool = False, start_step: Optional[int] = None,
                    last_step: Optional[int] = None, force_full_denoise: bool = False,
                    schedule: Optional[Callable] = None, **options) -> Tensor:
    """The sigmas of a KSampler / KSampler Advanced run; fewer than 2 means there is nothing to sample.

    ``last_step`` keeps ``sigmas[:last_step + 1]`` (ending at 0 with
    ``force_full_denoise``, else with the leftover noise); ``start_step`` keeps
    ``sigmas[start_step:]``.
    """
    sigmas = sampling_sigmas(model_sampling, scheduler, steps, denoise, discard_penultimate_sigma, schedule,
                             **options)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        sigmas = sigmas[start_step:] if start_step < len(sigmas) - 1 else sigmas[:0]
    return sigmas


def _drop_repeats(sigmas: Tensor) -> Tensor:
    """Remove zero-length steps: the table schedulers repeat sigmas when asked for more steps than the table has."""
    if len(sigmas) > 1 and bool((sigmas[1:] == sigmas[:-1]).any()):
        keep = torch.cat([torch.tensor([True]), sigmas[1:] != sigmas[:-1]])
        return sigmas[keep]
    return sigmas
