"""Per-sampler traits that the sampling pass needs, attached to the sampler function itself."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

NOISE_KINDS = ("none", "ancestral", "brownian", "brownian_device")


@dataclass(frozen=True)
class SamplerTraits:
    """What a sampler needs from the caller.

    noise: "none" (deterministic), "ancestral" (Gaussian draws from a seeded
    generator), "brownian" (Brownian-tree increments, tree on the CPU) or
    "brownian_device" (tree on the sampling device: the ``_gpu`` variants).
    discard_penultimate_sigma: ComfyUI computes steps + 1 sigmas and drops the
    next-to-last one for this sampler.
    random_inpaint_noise: the inpainting re-noise uses a fresh seeded draw
    instead of the initial noise (ComfyUI's ``ddim``).
    comfy_compat: by design this sampler differs from ComfyUI's (flow-model
    geometry, or a fixed ComfyUI slip); compat mode reproduces ComfyUI by
    running ``fn.comfy_variant`` (or the same function) with VE geometry
    (see README, "Parity").
    comfy_rounding: ComfyUI computes this sampler's step in float32 with an
    operation order whose rounding shows on ill-conditioned schedules (tiny
    first steps); compat mode runs ``fn.comfy_variant``, which reproduces it,
    with the model's own geometry.
    cfg_pp: the sampler uses the unconditional estimate (CFG++).
    batch_coupled: the sampler's decisions depend on the whole batch (an
    adaptive step size from a batch-wide error norm); batch-invariant noise then
    runs it one item at a time.
    """

    noise: str = "none"
    discard_penultimate_sigma: bool = False
    random_inpaint_noise: bool = False
    comfy_compat: bool = False
    comfy_rounding: bool = False
    cfg_pp: bool = False
    batch_coupled: bool = False

    @property
    def stochastic(self) -> bool:
        return self.noise != "none"


DEFAULT_TRAITS = SamplerTraits()


def traits(**kw) -> Callable:
    """Decorator: attach ``SamplerTraits(**kw)`` to a sampler function."""
    for key, value in kw.items():
        if key == "noise" and value not in NOISE_KINDS:
            raise ValueError(f"noise: must be one of {NOISE_KINDS}, got {value!r}")

    def mark(fn):
        fn.sampler_traits = replace(getattr(fn, "sampler_traits", DEFAULT_TRAITS), **kw)
        return fn
    return mark


def get_traits(fn) -> SamplerTraits:
    return getattr(fn, "sampler_traits", DEFAULT_TRAITS)


def compat_variant(fn: Callable, tr: SamplerTraits, compat: bool) -> tuple[Callable, bool]:
    """(the function to run, whether it runs with VE geometry) for ComfyUI-compat mode or the default."""
    if compat and tr.comfy_compat:
        return getattr(fn, "comfy_variant", fn), True
    if compat and tr.comfy_rounding:
        return fn.comfy_variant, False
    return fn, False
