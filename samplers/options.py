"""Per-sampler options (eta, s_noise, s_churn, ...): what each sampler accepts, validated, as keyword arguments.

A sampler's options are its keyword parameters beyond k-diffusion's protocol,
read from its signature, plus a few scalar settings that stand for a
function-valued parameter (as ComfyUI's SamplerER_SDE / SamplerSASolver nodes
offer them):

* er_sde: ``solver_type`` ("ER-SDE", "Reverse-time SDE", "ODE") and ``eta``
  build the noise scale function (Cui et al. 2023);
* sa_solver(_pece): ``eta``, ``sde_start_percent``, ``sde_end_percent`` build
  the stochasticity tau(sigma) (Xue et al. 2023);
* restart: ``restart_t_min``, ``restart_t_max``, ``restart_k``, ``restart_n``
  build one restart interval (Xu et al. 2023; ``restart_n`` 0 = steps // 5).

Options are written ``name=value`` (the CLI's ``--sampler-option`` and the
Sampler Options node); an option the chosen sampler does not take is an error
that names both.  Every option's facts live in the tables below: its type (its
default's), its choices (``_CHOICES``), its range (``_RANGES``, with why each
bound) and the pairs that must be in order (``_ORDERED``); a value of the wrong
type or outside its range is an error naming the option, the sampler and the
range, before sampling starts.  Function-valued parameters (``weights``,
``step_update``, ``tau_func``, ...) are not options: the Python API may pass
functions there.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

from ..validation import KSamplerInputError
from ._common import get_model_sampling

__all__ = ["sampler_option_defaults", "resolve_sampler_options", "parse_options", "all_option_names", "option_range",
           "OptionBuilder"]

_PROTOCOL = {"model", "x", "sigmas", "extra_args", "callback", "disable", "noise_sampler"}
# parameters that are functions or shape the result: Python API only, never a node or CLI option (set through the
# derived scalar options below where there are some); any parameter whose default is a function is one too
_RAW_ONLY = {"tau_func", "noise_scaler", "restart_list", "return_info", "weights", "step_update"}
_FUNCTION_VALUED = {"tau_func", "noise_scaler", "weights", "step_update", "noise_sampler"}

_ER_SDE_TYPES = ("ER-SDE", "Reverse-time SDE", "ODE")
_DERIVED = {
    "er_sde": {"solver_type": "ER-SDE", "eta": 1.0},
    "sa_solver": {"eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8},
    "sa_solver_pece": {"eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8},
    "restart": {"restart_t_min": 0.1, "restart_t_max": 2.0, "restart_k": 2, "restart_n": 0},
}
# string options and their allowed values
_CHOICES = {"solver_type": {"er_sde": _ER_SDE_TYPES, "exp_heun_2_x0": ("phi_1", "phi_2"),
                            "exp_heun_2_x0_sde": ("phi_1", "phi_2"), "seeds_2": ("phi_1", "phi_2"),
                            None: ("midpoint", "heun")},
            "deis_mode": {None: ("tab", "rhoab")}}

# The allowed range [low, high] of every numeric option, per sampler where it differs (None: any other sampler).
# Where ComfyUI's own sampler nodes have a widget for the option, its limits are kept (so no ComfyUI setting is
# refused) unless the maths breaks inside them; otherwise a bound is the edge where the maths breaks or the run
# stops ending, far outside any published setting. Only s_tmax may be inf (its default: churn up to any sigma).
_SIGMA_MAX = 1e4       # a noise level (VE-equivalent sigma) above every model's sigma_max (VE models reach ~1350)
_RANGES: dict[str, dict[Optional[str], tuple]] = {
    # ComfyUI's sampler nodes: eta and s_noise 0..100 (SamplerSASolver's eta 0..10)
    "eta": {None: (0.0, 100.0), "sa_solver": (0.0, 10.0), "sa_solver_pece": (0.0, 10.0),
            # Reverse-time SDE scales noise by lambda^(eta + 1) in float32: beyond ~12 that overflows on a flow
            # schedule (lambda from ~1e-3 to ~1e3) and the run turns NaN (at 10 only on thousands of steps)
            "er_sde": (0.0, 10.0),
            # ancestral DPM-Solver: above 1 (more noise than DDPM) each step aims past the schedule's end and the
            # error control takes hundreds to thousands of steps (eta 5: ~450 on a test model, 20: over 3000)
            "dpm_adaptive": (0.0, 1.0)},
    "s_noise": {None: (0.0, 100.0)},
    # churn: gamma = min(s_churn / steps, sqrt(2) - 1) (Karras et al. 2022), so above 10000 (the steps input's
    # max) nothing changes; s_tmin / s_tmax are noise levels
    "s_churn": {None: (0.0, 10000.0)},
    "s_tmin": {None: (0.0, _SIGMA_MAX)},
    "s_tmax": {None: (0.0, math.inf)},
    # where the inner stage sits, as a fraction of the step (ComfyUI's SEEDS-2 node: 0.01..1): 0 divides by
    # zero, above 1 the stage lies past the step's end (NaN or a math domain error in the noise)
    "r": {None: (0.01, 1.0)},
    "r_1": {None: (0.01, 1.0)},
    "r_2": {None: (0.01, 1.0)},
    "order": {None: (1, 4), "dpm_adaptive": (2, 3)},   # lms's weights exist to order 4; DPM-Solver-12 / 23
    "max_order": {None: (1, 4)},
    "max_stage": {None: (1, 3)},
    "predictor_order": {None: (1, 6)},                  # ComfyUI's SamplerSASolver
    "corrector_order": {None: (0, 6)},
    # dpm_adaptive (ComfyUI's SamplerDPMAdaptative: 0..100; a PID controller that diverges at run time is an
    # error there, naming these options): atol is the floor of the error scale, and at 0
    # (or below float32's rounding of a latent, ~1e-5) the step size shrinks to nothing and the run turns NaN
    # or never ends; h_init below 1e-3 adds nothing (the controller grows h by at most 2.6x a step) and with
    # all PID coefficients 0 a step that small is never grown (~10^4 steps, the steps input's max)
    "rtol": {None: (0.0, 100.0)},
    "atol": {None: (1e-4, 100.0)},
    "h_init": {None: (1e-3, 100.0)},
    "pcoeff": {None: (0.0, 100.0)},
    "icoeff": {None: (0.0, 100.0)},
    "dcoeff": {None: (0.0, 100.0)},
    # a step is accepted when the PID factor reaches accept_safety; the factor is 1 with all coefficients 0,
    # so above 1 no step is ever accepted (a hang): a safety factor is at most 1 (k-diffusion: 0.81)
    "accept_safety": {None: (0.0, 1.0)},
    "ge_gamma": {None: (0.0, 100.0)},                   # Permenter & Yuan 2024 use 2; 1 is Euler
    "gamma": {None: (0.0, 1.0)},                        # tcd: 0 is DDIM, 1 is LCM
    "sde_start_percent": {None: (0.0, 1.0)},
    "sde_end_percent": {None: (0.0, 1.0)},
    # restart (Xu et al. 2023 use K <= 10 and a few steps per restart): every restart re-solves its interval
    # with restart_n Heun steps, so these bound the run's length (100 x 1000 x 2 model calls at most)
    "restart_t_min": {None: (1e-4, _SIGMA_MAX)},
    "restart_t_max": {None: (1e-4, _SIGMA_MAX)},
    "restart_k": {None: (0, 100)},
    "restart_n": {None: (0, 1000)},                     # 0: steps // 5
}
# options a sampler may take in pairs that must be in order: (lower, upper, strict); a pair out of order makes
# the option do nothing (an empty churn or SDE band, no restart) or breaks the maths (seeds_3's noise)
_ORDERED = (("s_tmin", "s_tmax", False), ("r_1", "r_2", False), ("sde_start_percent", "sde_end_percent", False),
            ("restart_t_min", "restart_t_max", True))

# (model, sigmas) -> extra keyword arguments, built when the sampler runs
OptionBuilder = Callable[[object, object], dict]


def _signature_options(fn) -> dict:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params
            if p.name not in _PROTOCOL and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is not inspect.Parameter.empty}


def _is_raw(key: str, default) -> bool:
    """A Python-API-only parameter: function-valued or result-shaping."""
    return key in _RAW_ONLY or callable(default)


def _choices(sampler: str, key: str) -> Optional[tuple]:
    """The values text option ``key`` of ``sampler`` may take (None: any)."""
    choices = _CHOICES.get(key, {})
    return choices.get(sampler, choices.get(None))


def option_range(sampler: str, key: str) -> Optional[tuple]:
    """(low, high) allowed for numeric option ``key`` of ``sampler`` (None: the table has no entry)."""
    ranges = _RANGES.get(key)
    if ranges is None:
        return None
    return ranges.get(sampler, ranges.get(None))


def sampler_option_defaults(name: str, fn=None) -> dict:
    """{option: default} that sampler ``name`` takes through the node and CLI (scalars only)."""
    from . import get_sampler
    fn = fn or get_sampler(name)
    options = {k: v for k, v in _signature_options(fn).items() if not _is_raw(k, v)}
    options.update(_DERIVED.get(name, {}))
    return options


def all_option_names() -> list[str]:
    """Every option some registered sampler takes (for help texts)."""
    return sorted(_option_takers())


def _option_takers() -> dict[str, list[tuple[str, object]]]:
    """{option: [(sampler, default), ...]} over the registered samplers."""
    from . import SAMPLERS
    takers: dict[str, list] = {}
    for name in SAMPLERS:
        for key, default in sampler_option_defaults(name).items():
            takers.setdefault(key, []).append((name, default))
    return takers


def _requirement(sampler: str, key: str, default) -> str:
    """What option ``key`` of ``sampler`` accepts, in words (``_CHOICES``, ``_RANGES``)."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, str):
        return f"one of {', '.join(_choices(sampler, key) or ())}"
    # a sampler registered at run time may take a number the table does not know: finite and >= 0 then
    low, high = option_range(sampler, key) or (0, math.inf)
    return f"{'an integer' if isinstance(default, int) else 'a number'} from {low:g} to {high:g}"


def _coerce(sampler: str, key: str, value, default):
    """``value`` for option ``key`` of ``sampler`` (whose default is ``default``), checked against the table."""
    if _accepts(sampler, key, value, default):
        return float(value) if isinstance(default, float) or default is None else \
            int(value) if isinstance(default, int) and not isinstance(default, bool) else value
    raise KSamplerInputError(f"sampler_options: {key} (sampler {sampler}): must be "
                             f"{_requirement(sampler, key, default)}, got {value!r}")


def _accepts(sampler: str, key: str, value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, str):
        allowed = _choices(sampler, key)
        return isinstance(value, str) and (not allowed or value in allowed)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(default, int) and not (isinstance(value, int) or value.is_integer()):
        return False          # 3.0 (from a JSON workflow) is the integer 3; 2.5 is not an integer
    low, high = option_range(sampler, key) or (0, math.inf)
    if isinstance(value, int) and abs(value) > 2 ** 53:
        return False          # far outside every range, and too large for a float
    return not math.isnan(value) and (math.isfinite(value) or high == math.inf) and low <= value <= high


def _check_order(name: str, settings: dict) -> None:
    """Options that come in (lower, upper) pairs must be in order (``_ORDERED``)."""
    for lower, upper, strict in _ORDERED:
        if lower in settings and upper in settings:
            low, high = settings[lower], settings[upper]
            if low > high or (strict and low == high):
                relation = "below" if strict else "at most"
                raise KSamplerInputError(f"sampler_options: {lower} ({low:g}) must be {relation} {upper} ({high:g}) "
                                         f"(sampler {name}); change one of them")


def _check_raw(name: str, key: str, value, default):
    """A Python-API-only parameter: a function where the sampler calls one, a well-formed restart_list."""
    where = f"sampler_options: {key} (sampler {name})"
    if key in _FUNCTION_VALUED or callable(default):
        if value is None and default is None:
            return value
        if not callable(value):
            raise KSamplerInputError(f"{where}: is a function parameter (Python API), got {type(value).__name__} "
                                     f"{value!r}; pass a function, or leave it out for the sampler's own")
        return value
    if key == "return_info":
        if value is not False:
            raise KSamplerInputError(f"{where}: the sampling pass needs the sample back, not (sample, info); "
                                     "call the sampler function itself for its step statistics")
        return value
    if key == "restart_list":
        return _check_restart_list(name, value)
    return value


def _check_restart_list(name: str, value) -> Optional[dict]:
    """``{t_min: [N, K, t_max]}``, each entry checked like the restart_* options."""
    if value is None:
        return value
    where = f"sampler_options: restart_list (sampler {name})"
    if not isinstance(value, dict):
        raise KSamplerInputError(f"{where}: expected a dict t_min -> [N, K, t_max], got {type(value).__name__}")
    for t_min, entry in value.items():
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise KSamplerInputError(f"{where}: entry {t_min!r} must be [N, K, t_max], got {entry!r}")
        settings = {key: _coerce("restart", key, item, default) for key, item, default in
                    (("restart_t_min", t_min, 0.1), ("restart_n", entry[0], 0), ("restart_k", entry[1], 2),
                     ("restart_t_max", entry[2], 2.0))}
        if settings["restart_n"] < 1:   # the option's 0 (steps // 5) is resolved before the list is built
            raise KSamplerInputError(f"{where}: entry {t_min!r} needs N >= 1 steps back, got {entry[0]!r}")
        _check_order(name, settings)
    return value


def resolve_sampler_options(name: str, options: Optional[dict], fn=None) -> tuple[dict, Optional[OptionBuilder]]:
    """(keyword arguments, builder of the run-time ones) for ``options`` on sampler ``name``.

    Raises KSamplerInputError naming the option and the sampler when the sampler does not take it, or when
    its value is of the wrong type or outside the option's range (``_RANGES``).  Function-valued parameters
    (``tau_func``, ``noise_scaler``, ``weights``, ``step_update``) and ``restart_list`` are Python API only:
    checked for their kind, then passed through.
    """
    from . import get_sampler
    fn = fn or get_sampler(name)
    if not options:
        return {}, None
    if not isinstance(options, dict):
        raise KSamplerInputError(f"sampler_options: expected a dict of name -> value, got {type(options).__name__}")
    accepted = sampler_option_defaults(name, fn)
    raw = _signature_options(fn)
    kwargs, derived, settings = {}, {}, dict(accepted)
    for key, value in options.items():
        if key == "noise_sampler" or (key in raw and _is_raw(key, raw[key])):
            kwargs[key] = _check_raw(name, key, value, raw.get(key))
            continue
        if key not in accepted:
            takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes no options"
            raise KSamplerInputError(f"sampler_options: sampler {name!r} does not take {key!r} ({takes}); "
                                     "remove the option or choose a sampler that uses it")
        value = settings[key] = _coerce(name, key, value, accepted[key])
        if key in _DERIVED.get(name, {}):
            derived[key] = value
        else:
            kwargs[key] = value
    _check_order(name, settings)
    if not derived:
        return kwargs, None
    settings = dict(_DERIVED[name], **derived)
    if name == "er_sde":
        return _er_sde(kwargs, settings), None
    if name.startswith("sa_solver"):
        return kwargs, _sa_solver_builder(settings)
    return kwargs, _restart_builder(settings)


def _er_sde(kwargs: dict, settings: dict) -> dict:
    solver, eta = settings["solver_type"], settings["eta"]
    if solver == "ER-SDE":
        return kwargs
    if solver == "ODE" or eta == 0:
        eta = 0.0
        kwargs = dict(kwargs, s_noise=0.0)
    exponent = eta + 1.0

    def reverse_time_sde_scaler(v):
        """The reverse-time SDE's noise scale v^(eta + 1) (Cui et al. 2023; eta 0 is the ODE)."""
        return v ** exponent
    return dict(kwargs, noise_scaler=reverse_time_sde_scaler)


def _sa_solver_builder(settings: dict) -> OptionBuilder:
    from .sde import _sa_tau

    def build(model, sigmas) -> dict:
        ms = get_model_sampling(model)
        return {"tau_func": _sa_tau(ms.percent_to_sigma(settings["sde_start_percent"]),
                                    ms.percent_to_sigma(settings["sde_end_percent"]), eta=settings["eta"])}
    return build


def _restart_builder(settings: dict) -> OptionBuilder:
    def build(model, sigmas) -> dict:
        steps = len(sigmas) - 1
        n = settings["restart_n"] or max(2, steps // 5)
        t_min, t_max = float(settings["restart_t_min"]), float(settings["restart_t_max"])
        return {"restart_list": {t_min: [int(n), int(settings["restart_k"]), t_max]}}
    return build


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_options(text, into: Optional[dict] = None) -> dict:
    """``"eta=0.5, s_noise=1.1"`` (or a list of ``name=value`` strings) -> {"eta": 0.5, "s_noise": 1.1}.

    A value no sampler accepts for its option (``eta=nan``, ``restart_k=100000000``), or an option given twice in
    the text, is an error here already; the KSampler checks the options against the sampler it runs.
    """
    items = text if isinstance(text, (list, tuple)) else [p for p in str(text).replace("\n", ",").split(",")]
    out = dict(into or {})  # the options of this text override those of ``into``
    takers = _option_takers()
    given: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str):
            raise KSamplerInputError(f"sampler_options: expected name=value text (e.g. eta=0.5), got "
                                     f"{type(item).__name__} {item!r}")
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise KSamplerInputError(f"sampler_options: {item.strip()!r} is not name=value (e.g. eta=0.5)")
        if key not in takers:
            raise KSamplerInputError(f"sampler_options: no sampler takes {key!r}; known options: "
                                     f"{', '.join(sorted(takers))}")
        if key in given:
            raise KSamplerInputError(f"sampler_options: {key} is given twice ({given[key]} and {value.strip()}); "
                                     "keep one")
        given[key] = value.strip()
        out[key] = _accepted_somewhere(key, _parse_value(value), takers[key])
    return out


def _accepted_somewhere(key: str, value, takers: list):
    """``value`` if some sampler taking option ``key`` accepts it, else an error saying what each accepts."""
    if any(_accepts(sampler, key, value, default) for sampler, default in takers):
        return value
    by_requirement: dict[str, list[str]] = {}
    for sampler, default in takers:
        by_requirement.setdefault(_requirement(sampler, key, default), []).append(sampler)
    parts = []
    for requirement, samplers in by_requirement.items():
        more = f" and {len(samplers) - 3} more" if len(samplers) > 3 else ""
        parts.append(f"{requirement} (sampler {', '.join(samplers[:3])}{more})")
    raise KSamplerInputError(f"sampler_options: {key}: must be {'; or '.join(parts)}, got {value!r}")
