"""Per-sampler facts the sampling pass needs, in one record attached to the sampler function.

Every fact about a sampler that the caller must act on is a field here; there is
no other table of per-sampler facts (ComfyUI reproduction, which is about how to
run a sampler rather than what it is, lives in ``reference.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

NOISE_KINDS = ("none", "ancestral", "brownian", "brownian_device")

__all__ = ["NOISE_KINDS", "SamplerTraits", "DEFAULT_TRAITS", "traits", "get_traits"]


@dataclass(frozen=True)
class SamplerTraits:
    """What a sampler needs from the caller.

    noise: "none" (deterministic), "ancestral" (Gaussian draws from a seeded
        generator), "brownian" (Brownian-tree increments, tree on the CPU) or
        "brownian_device" (tree on the sampling device: the ``_gpu`` variants).
    takes_noise_sampler: the function accepts a ``noise_sampler`` option, which the
        sampling pass then provides (seeded like ancestral noise for deterministic
        samplers with optional noise, e.g. churn).  Default: ``noise != "none"``.
    discard_penultimate_sigma: ComfyUI computes steps + 1 sigmas and drops the
        next-to-last one for this sampler.
    final_sigma: the sigma the returned state sits at when the schedule ends at 0
        (None: at 0).  UniPC stops at 0.001, as ComfyUI's does.
    random_inpaint_noise: the inpainting re-noise uses a fresh seeded draw instead
        of the initial noise (ComfyUI's ``ddim``).
    cfg_pp: the sampler uses the unconditional estimate (CFG++).
    cfg1_shortcut: a CFG++ sampler that, as ComfyUI's does, skips the unconditional
        pass at cfg = 1 and uses the guided estimate in its place (cfgpp_ud10_ab).
    batch_coupled: the sampler's decisions depend on the whole batch (an adaptive
        step size from a batch-wide error norm); batch-invariant noise then runs it
        one item at a time.
    """

    noise: str = "none"
    takes_noise_sampler: Optional[bool] = field(default=None)
    discard_penultimate_sigma: bool = False
    final_sigma: Optional[float] = None
    random_inpaint_noise: bool = False
    cfg_pp: bool = False
    cfg1_shortcut: bool = False
    batch_coupled: bool = False

    def __post_init__(self):
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise: must be one of {NOISE_KINDS}, got {self.noise!r}")
        if self.takes_noise_sampler is None:
            object.__setattr__(self, "takes_noise_sampler", self.noise != "none")

    @property
    def stochastic(self) -> bool:
        return self.noise != "none"


DEFAULT_TRAITS = SamplerTraits()


def traits(**facts) -> Callable:
    """Decorator: attach ``SamplerTraits(**facts)`` to a sampler function (checked at definition)."""
    record = SamplerTraits(**facts)

    def mark(fn):
        fn.sampler_traits = record
        return fn
    return mark


def get_traits(fn) -> SamplerTraits:
    """The traits record of a sampler function (``functools.wraps`` carries it over to a wrapper)."""
    return getattr(fn, "sampler_traits", DEFAULT_TRAITS)
