"""The sampling pass: run one sampler over a denoiser, for the headless pipeline and the ComfyUI adapter alike.

``run_sampler`` is the one place that decides, from a sampler's traits, what
the sampler function is given: which function runs (reference mode,
``samplers.reference.select``), with which geometry, with which noise sampler,
and at which sigma its result sits.  ``pipeline.sample`` (our own models) and
``comfy_adapter.RegistrySampler`` (ComfyUI's models) build the denoiser and the
starting state their own way and then both call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from torch import Tensor

from .conditioning import KSamplerInputError
from .guard import NonFiniteOutputError, all_finite, nonfinite_sample_error, with_sampler_options
from .samplers import SAMPLERS, get_sampler, get_traits, sampler_name, sampler_traits
from .samplers.noise import BrownianPathNoiseSampler, BrownianTreeNoiseSampler, default_noise_sampler, item_seed
from .samplers.options import resolve_sampler_options
from .samplers.reference import VEGeometryView, select
from .samplers.traits import SamplerTraits
from .schedulers import SCHEDULERS
from .validation import MAX_SEED, MAX_STEPS, check_bool, check_float, check_int, lookup_entry

__all__ = ["NoiseOptions", "resolve_sampler", "noise_sampler_for", "run_sampler", "StepCallback", "PREVIEWS",
           "check_preview", "preview_of", "check_sampler_args"]


def check_sampler_args(**given) -> None:
    """Check the sampler inputs that are given (seed, steps, cfg, sampler_name, scheduler, denoise)."""
    if "seed" in given:
        check_int("seed", given["seed"], 0, MAX_SEED)
    if "steps" in given:
        check_int("steps", given["steps"], 1, MAX_STEPS)
    if "cfg" in given:
        check_float("cfg", given["cfg"], 0.0, 100.0)
    if "denoise" in given:
        check_float("denoise", given["denoise"], 0.0, 1.0)
    for key, registry, kind in (("sampler_name", SAMPLERS, "sampler"), ("scheduler", SCHEDULERS, "scheduler")):
        if key in given:
            lookup_entry(registry, given[key], key, kind)


# on_step(step, denoised, x, total_steps), ComfyUI's callback signature
StepCallback = Callable[[int, Tensor, Tensor, int], None]
# what a step callback's second argument (the preview) shows: the sampler's own report of its denoised
# estimate, the latest model evaluation's denoised estimate, or the noisy state
PREVIEWS = ("default", "denoised", "noisy")


def check_preview(preview: str) -> str:
    """``preview`` if it is one of PREVIEWS, else a KSamplerInputError naming the choices."""
    if preview not in PREVIEWS:
        raise KSamplerInputError(f"preview: must be one of {', '.join(PREVIEWS)}, got {preview!r}")
    return preview


def preview_of(mode: str, info: dict, last_denoised: Optional[Tensor]) -> Tensor:
    """The tensor a step's preview shows for ``mode`` (one of PREVIEWS)."""
    if mode == "denoised" and last_denoised is not None:
        return last_denoised
    if mode == "noisy":
        return info["x"]
    return info["denoised"]


@dataclass(frozen=True)
class NoiseOptions:
    """Noise behaviour beyond ComfyUI (all off by default, which is ComfyUI's behaviour).

    batch_invariant: item k's initial, ancestral and SDE noise depend only on the
        seed and k (its ``batch_index`` entry when given), never on the batch size.
    device_invariant: every extra noise draw is made on the CPU, so CPU and CUDA
        runs agree within float tolerance.
    brownian: "tree" (torchsde's Brownian tree, ComfyUI's values) or "fast" (a
        lazily sampled Brownian path with the same law, one draw per step).
    """

    batch_invariant: bool = False
    device_invariant: bool = False
    brownian: str = "tree"

    def __post_init__(self):
        for flag in ("batch_invariant", "device_invariant"):  # "no" would read as True
            check_bool(flag, getattr(self, flag))
        if self.brownian not in ("tree", "fast"):
            raise KSamplerInputError(f"brownian: must be 'tree' or 'fast', got {self.brownian!r}")


def resolve_sampler(sampler: Union[str, Callable]) -> tuple[Optional[str], Callable, SamplerTraits]:
    """(registry name or None, function, traits) for a registry name or a sampler function.

    A function's traits travel with it (``@traits``; ``functools.wraps`` copies them to a wrapper).
    """
    if isinstance(sampler, str):
        return sampler, get_sampler(sampler), sampler_traits(sampler)
    if callable(sampler):
        return sampler_name(sampler), sampler, get_traits(sampler)
    raise KSamplerInputError(f"sampler: expected a registry name or a function, got {type(sampler).__name__}")


def noise_sampler_for(kind: str, x: Tensor, sigmas: Tensor, seed: int, options: NoiseOptions,
                      batch_index: Optional[Sequence[int]]):
    """The noise sampler for a sampler drawing ``kind`` noise ("ancestral", "brownian", "brownian_device")."""
    if kind == "ancestral":
        return default_noise_sampler(x, seed, cpu=options.device_invariant, batch_invariant=options.batch_invariant,
                                     item_indices=batch_index)
    positive = sigmas[sigmas > 0]
    sigma_min, sigma_max = positive.min(), sigmas.max()
    on_cpu = kind == "brownian" or options.device_invariant
    if options.brownian == "fast":
        return BrownianPathNoiseSampler(x, seed, cpu=on_cpu, batch_invariant=options.batch_invariant,
                                        item_indices=batch_index)
    tree_seed = seed
    if options.batch_invariant:
        indices = list(range(x.shape[0])) if batch_index is None else list(batch_index)
        tree_seed = [item_seed(seed, k) for k in indices]
    return BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=tree_seed, cpu=on_cpu)


def _checks_finite(denoiser) -> bool:
    """Whether the run checks for NaN (a calibration fit does not: it handles diverging trials itself)."""
    guard = getattr(denoiser, "guard", None)
    return bool(getattr(denoiser, "check_finite", getattr(guard, "check_finite", True)))


def run_sampler(sampler: Union[str, Callable], denoiser, x: Tensor, sigmas: Tensor, *, seed: int,
                extra_args: dict, noise_options: NoiseOptions, batch_index: Optional[Sequence[int]] = None,
                reference_mode: bool = False, options: Optional[dict] = None,
                on_step: Optional[StepCallback] = None, disable: bool = True,
                preview: str = "default") -> tuple[Tensor, Optional[float]]:
    """Run ``sampler`` from state ``x`` over ``sigmas``; returns (final state, the sigma it sits at if not the last).

    denoiser: ``denoiser(x, sigma, **extra_args) -> denoised`` with ``.model_sampling`` (and
        ``denoise_with_uncond`` for CFG++).
    reference_mode: run the samplers of ``samplers.reference.REFERENCE_VARIANTS`` as ComfyUI does.
    options: the sampler's own options (``samplers.options``, validated against what the sampler
        takes); a ``noise_sampler`` given there is used as is.  With options given, a NaN the guard blames
        on the model names them too, and a NaN the sampler's own arithmetic makes is an error naming them.
    preview: what ``on_step`` gets as ``denoised`` (PREVIEWS); "denoised" reads the denoiser's
        ``last_denoised``.
    """
    name, fn, tr = resolve_sampler(sampler)
    check_preview(preview)
    resolved, option_builder = resolve_sampler_options(name, options, fn) if name else (dict(options or {}), None)
    given = {key: value for key, value in dict(options or {}).items() if key != "noise_sampler"}  # as passed
    options = dict(resolved)
    evaluated = denoiser   # the denoiser that records ``last_denoised`` (before any geometry view)
    comfy_noise = "noise_sampler" not in options and noise_options.brownian == "tree"
    fn, ve_geometry = select(name, fn, reference_mode, comfy_noise)
    if ve_geometry:
        denoiser = VEGeometryView(denoiser)
    if "noise_sampler" not in options and tr.takes_noise_sampler:
        # deterministic samplers take one too, for optional noise (churn): seeded like ancestral noise
        kind = tr.noise if tr.noise != "none" else "ancestral"
        options["noise_sampler"] = noise_sampler_for(kind, x, sigmas.detach().cpu(), seed, noise_options,
                                                     batch_index)
    if option_builder is not None:
        options.update(option_builder(denoiser, sigmas))
    total = len(sigmas) - 1

    def k_callback(info):
        if on_step is not None:
            on_step(info["i"], preview_of(preview, info, getattr(evaluated, "last_denoised", None)), info["x"], total)

    try:
        samples = fn(denoiser, x, sigmas, extra_args=extra_args, callback=k_callback, disable=disable, **options)
    except NonFiniteOutputError as error:
        if not given:
            raise
        raise with_sampler_options(error, given) from error
    if given and _checks_finite(evaluated) and not all_finite(samples):
        raise nonfinite_sample_error(name or "custom", given)
    final = tr.final_sigma if float(sigmas[-1]) == 0 else None
    return samples, final
