"""Sampler registry: name -> k-diffusion-protocol function.

Every entry has the signature ``fn(model, x, sigmas, extra_args=None,
callback=None, disable=None, **options)`` where ``model(x, sigma, **extra_args)``
returns the denoised estimate and ``sigmas`` is a 1-D tensor ending in 0.
ComfyUI's 44 names come first, in ComfyUI's order; ours follow.

To add a sampler, write the function (mark it with ``@traits(...)`` if it draws
noise) and add one line to ``SAMPLERS``, or call ``register_sampler`` at run
time, which also takes any k-diffusion function::

    import k_diffusion.sampling as K
    register_sampler("kd_euler_ancestral", K.sample_euler_ancestral, noise="ancestral")
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from .cfgpp import (sample_dpmpp_2m_cfg_pp, sample_dpmpp_2s_ancestral_cfg_pp, sample_euler_ancestral_cfg_pp,
                    sample_euler_cfg_pp, sample_gradient_estimation_cfg_pp, sample_res_multistep_ancestral_cfg_pp,
                    sample_res_multistep_cfg_pp)
from .dpmsolver import (sample_dpm_adaptive, sample_dpm_fast, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                        sample_dpmpp_2m_sde_gpu, sample_dpmpp_2m_sde_heun, sample_dpmpp_2m_sde_heun_gpu,
                        sample_dpmpp_2s_ancestral, sample_dpmpp_3m, sample_dpmpp_3m_sde, sample_dpmpp_3m_sde_gpu,
                        sample_dpmpp_sde, sample_dpmpp_sde_gpu, sample_exp_heun_2_x0, sample_exp_heun_2_x0_sde,
                        sample_res_multistep, sample_res_multistep_ancestral, sample_seeds_2)
from .karras import (sample_deis, sample_dpm_2, sample_dpm_2_ancestral, sample_euler, sample_euler_ancestral,
                     sample_gradient_estimation, sample_heun, sample_heunpp2, sample_ipndm, sample_ipndm_v, sample_lms)
from .restart import sample_restart
from .stochastic import (sample_ddpm, sample_er_sde, sample_lcm, sample_sa_solver, sample_sa_solver_pece,
                         sample_seeds_3, sample_tcd)
from .traits import NOISE_KINDS, SamplerTraits, get_traits, traits
from .unipc import FINAL_SIGMA, sample_uni_pc, sample_uni_pc_bh2

__all__ = ["SAMPLERS", "COMFY_SAMPLER_NAMES", "register_sampler", "sampler_traits", "get_sampler", "SamplerTraits",
           "traits"]

SamplerFn = Callable[..., torch.Tensor]


@torch.no_grad()
@traits(random_inpaint_noise=True)
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DDIM (Song et al. 2021): the deterministic first-order step; inpainting re-noises with a fresh draw."""
    return sample_euler(model, x, sigmas, extra_args, callback, disable)


SAMPLERS: "OrderedDict[str, SamplerFn]" = OrderedDict([
    # ---- ComfyUI's 44, in ComfyUI's order ----
    ("euler", sample_euler),
    ("euler_cfg_pp", sample_euler_cfg_pp),
    ("euler_ancestral", sample_euler_ancestral),
    ("euler_ancestral_cfg_pp", sample_euler_ancestral_cfg_pp),
    ("heun", sample_heun),
    ("heunpp2", sample_heunpp2),
    ("exp_heun_2_x0", sample_exp_heun_2_x0),
    ("exp_heun_2_x0_sde", sample_exp_heun_2_x0_sde),
    ("dpm_2", sample_dpm_2),
    ("dpm_2_ancestral", sample_dpm_2_ancestral),
    ("lms", sample_lms),
    ("dpm_fast", sample_dpm_fast),
    ("dpm_adaptive", sample_dpm_adaptive),
    ("dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral),
    ("dpmpp_2s_ancestral_cfg_pp", sample_dpmpp_2s_ancestral_cfg_pp),
    ("dpmpp_sde", sample_dpmpp_sde),
    ("dpmpp_sde_gpu", sample_dpmpp_sde_gpu),
    ("dpmpp_2m", sample_dpmpp_2m),
    ("dpmpp_2m_cfg_pp", sample_dpmpp_2m_cfg_pp),
    ("dpmpp_2m_sde", sample_dpmpp_2m_sde),
    ("dpmpp_2m_sde_gpu", sample_dpmpp_2m_sde_gpu),
    ("dpmpp_2m_sde_heun", sample_dpmpp_2m_sde_heun),
    ("dpmpp_2m_sde_heun_gpu", sample_dpmpp_2m_sde_heun_gpu),
    ("dpmpp_3m_sde", sample_dpmpp_3m_sde),
    ("dpmpp_3m_sde_gpu", sample_dpmpp_3m_sde_gpu),
    ("ddpm", sample_ddpm),
    ("lcm", sample_lcm),
    ("ipndm", sample_ipndm),
    ("ipndm_v", sample_ipndm_v),
    ("deis", sample_deis),
    ("res_multistep", sample_res_multistep),
    ("res_multistep_cfg_pp", sample_res_multistep_cfg_pp),
    ("res_multistep_ancestral", sample_res_multistep_ancestral),
    ("res_multistep_ancestral_cfg_pp", sample_res_multistep_ancestral_cfg_pp),
    ("gradient_estimation", sample_gradient_estimation),
    ("gradient_estimation_cfg_pp", sample_gradient_estimation_cfg_pp),
    ("er_sde", sample_er_sde),
    ("seeds_2", sample_seeds_2),
    ("seeds_3", sample_seeds_3),
    ("sa_solver", sample_sa_solver),
    ("sa_solver_pece", sample_sa_solver_pece),
    ("ddim", sample_ddim),
    ("uni_pc", sample_uni_pc),
    ("uni_pc_bh2", sample_uni_pc_bh2),
    # ---- beyond ComfyUI's list ----
    ("dpmpp_3m", sample_dpmpp_3m),
    ("restart", sample_restart),
    ("tcd", sample_tcd),
])

COMFY_SAMPLER_NAMES = tuple(list(SAMPLERS)[:44])

# Traits given at registration time (for functions we do not own, e.g. k-diffusion's).
_REGISTERED_TRAITS: dict[str, SamplerTraits] = {}
# Samplers whose returned state sits at a small sigma instead of 0 when the schedule ends at 0.
_FINAL_SIGMA = {"uni_pc": FINAL_SIGMA, "uni_pc_bh2": FINAL_SIGMA}


def register_sampler(name: str, fn: SamplerFn, *, noise: str = "none", discard_penultimate_sigma: bool = False,
                     cfg_pp: bool = False, replace: bool = False) -> SamplerFn:
    """Add any k-diffusion-protocol function under ``name``; ``noise`` says what extra noise it draws.

    noise: "none", "ancestral" (the sampler takes ``noise_sampler``) or
    "brownian" (Brownian increments through ``noise_sampler``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("register_sampler: name must be a non-empty string")
    if not callable(fn):
        raise TypeError(f"register_sampler: fn for {name!r} must be callable")
    if noise not in NOISE_KINDS:
        raise ValueError(f"register_sampler: noise must be one of {NOISE_KINDS}, got {noise!r}")
    if name in SAMPLERS and not replace:
        raise ValueError(f"register_sampler: {name!r} is already registered; pass replace=True to override it")
    SAMPLERS[name] = fn
    _REGISTERED_TRAITS[name] = SamplerTraits(noise=noise, discard_penultimate_sigma=discard_penultimate_sigma,
                                             cfg_pp=cfg_pp)
    return fn


def get_sampler(name: str) -> SamplerFn:
    """The registered function for ``name``, with a clear error for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"sampler_name: expected a name (str), got {type(name).__name__}")
    fn = SAMPLERS.get(name)
    if fn is None:
        raise ValueError(f"sampler_name: unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return fn


def sampler_traits(name: str) -> SamplerTraits:
    """What the sampling pass must provide for sampler ``name``."""
    fn = get_sampler(name)
    return _REGISTERED_TRAITS.get(name) or get_traits(fn)


def final_sigma(name: str):
    """The sigma a sampler's result sits at when the schedule ends in 0 (None: at 0)."""
    return _FINAL_SIGMA.get(name)
