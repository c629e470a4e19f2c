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
that names both.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

from ..validation import KSamplerInputError
from ._common import get_model_sampling

__all__ = ["sampler_option_defaults", "resolve_sampler_options", "parse_options", "all_option_names",
           "OptionBuilder"]

_PROTOCOL = {"model", "x", "sigmas", "extra_args", "callback", "disable", "noise_sampler"}
# function-valued or result-shaping parameters: set through the derived scalar options below (Python API: raw)
_RAW_ONLY = {"tau_func", "noise_scaler", "restart_list", "return_info"}

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
# options that must not be negative (all numeric ones), and those with a tighter range
_RANGES = {"sde_start_percent": (0.0, 1.0), "sde_end_percent": (0.0, 1.0), "max_stage": (1, 3),
           "predictor_order": (1, 6), "corrector_order": (0, 6), "order": (1, 4), "max_order": (1, 4)}

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


def sampler_option_defaults(name: str, fn=None) -> dict:
    """{option: default} that sampler ``name`` takes through the node and CLI (scalars only)."""
    from . import get_sampler
    fn = fn or get_sampler(name)
    options = {k: v for k, v in _signature_options(fn).items() if k not in _RAW_ONLY}
    options.update(_DERIVED.get(name, {}))
    return options


def all_option_names() -> list[str]:
    """Every option some registered sampler takes (for help texts)."""
    from . import SAMPLERS
    names = set()
    for name in SAMPLERS:
        names.update(sampler_option_defaults(name))
    return sorted(names)


def _coerce(sampler: str, key: str, value, default):
    where = f"sampler_options: {key} (sampler {sampler})"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise KSamplerInputError(f"{where}: must be true or false, got {value!r}")
        return value
    if isinstance(default, str):
        choices = _CHOICES.get(key, {})
        allowed = choices.get(sampler, choices.get(None))
        if not isinstance(value, str) or (allowed and value not in allowed):
            raise KSamplerInputError(f"{where}: must be one of {', '.join(allowed or ())}, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise KSamplerInputError(f"{where}: must be an integer, got {value!r}")
    elif isinstance(default, float) or default is None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or \
                (math.isinf(value) and default != math.inf):
            raise KSamplerInputError(f"{where}: must be a finite number, got {value!r}")
        value = float(value)
    low, high = _RANGES.get(key, (0, math.inf))
    if not low <= value <= high:
        raise KSamplerInputError(f"{where}: must be between {low} and {high}, got {value!r}")
    return value


def resolve_sampler_options(name: str, options: Optional[dict], fn=None) -> tuple[dict, Optional[OptionBuilder]]:
    """(keyword arguments, builder of the run-time ones) for ``options`` on sampler ``name``.

    Raises KSamplerInputError naming the option and the sampler when the sampler does not take it.
    Function-valued parameters (``tau_func``, ``noise_scaler``, ``restart_list``) pass through unchecked
    (Python API).
    """
    from . import get_sampler
    fn = fn or get_sampler(name)
    if not options:
        return {}, None
    if not isinstance(options, dict):
        raise KSamplerInputError(f"sampler_options: expected a dict of name -> value, got {type(options).__name__}")
    accepted = sampler_option_defaults(name, fn)
    raw = _signature_options(fn)
    kwargs, derived = {}, {}
    for key, value in options.items():
        if key == "noise_sampler" or (key in _RAW_ONLY and key in raw):
            kwargs[key] = value
            continue
        if key not in accepted:
            takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes no options"
            raise KSamplerInputError(f"sampler_options: sampler {name!r} does not take {key!r} ({takes}); "
                                     "remove the option or choose a sampler that uses it")
        value = _coerce(name, key, value, accepted[key])
        if key in _DERIVED.get(name, {}):
            derived[key] = value
        else:
            kwargs[key] = value
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
        if not 0 < t_min < t_max:
            raise KSamplerInputError(f"sampler_options: restart_t_min ({t_min:g}) must be above 0 and below "
                                     f"restart_t_max ({t_max:g}) (sampler restart)")
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
    """``"eta=0.5, s_noise=1.1"`` (or a list of ``name=value`` strings) -> {"eta": 0.5, "s_noise": 1.1}."""
    items = text if isinstance(text, (list, tuple)) else [p for p in str(text).replace("\n", ",").split(",")]
    out = dict(into or {})
    known = set(all_option_names())
    for item in items:
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise KSamplerInputError(f"sampler_options: {item.strip()!r} is not name=value (e.g. eta=0.5)")
        if key not in known:
            raise KSamplerInputError(f"sampler_options: no sampler takes {key!r}; known options: "
                                     f"{', '.join(sorted(known))}")
        out[key] = _parse_value(value)
    return out
