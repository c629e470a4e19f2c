"""Sampler registry: name -> k-diffusion-protocol function.

Every entry has the signature ``fn(model, x, sigmas, extra_args=None,
callback=None, disable=None, **options)`` where ``model(x, sigma, **extra_args)``
returns the denoised estimate and ``sigmas`` is a 1-D tensor ending in 0.
ComfyUI's 45 names come first, in ComfyUI's order; ours follow.

To add a sampler, write the function in its family's file, state its facts
with ``@traits(...)`` (``traits.py``) and add one line to ``SAMPLERS``, or call
``register_sampler`` at run time, which also takes any k-diffusion function::

    import k_diffusion.sampling as K
    register_sampler("kd_euler_ancestral", K.sample_euler_ancestral, noise="ancestral")
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, Optional

import torch

from .cfgpp import (sample_cfgpp_ud10_ab, sample_dpmpp_2m_cfg_pp, sample_dpmpp_2s_ancestral_cfg_pp,
                    sample_euler_ancestral_cfg_pp, sample_euler_cfg_pp, sample_gradient_estimation_cfg_pp,
                    sample_res_multistep_ancestral_cfg_pp, sample_res_multistep_cfg_pp)
from .discrete import sample_ddpm, sample_lcm, sample_tcd
from .dpmsolver import (sample_dpm_adaptive, sample_dpm_fast, sample_dpmpp_2m, sample_dpmpp_2s_ancestral,
                        sample_res_multistep, sample_res_multistep_ancestral)
from .euler import (sample_ddim, sample_dpm_2, sample_dpm_2_ancestral, sample_euler, sample_euler_ancestral,
                    sample_gradient_estimation, sample_heun, sample_heunpp2)
from .multistep import sample_deis, sample_ipndm, sample_ipndm_v, sample_lms
from .restart import sample_restart
from .sde import (sample_dpmpp_2m_sde, sample_dpmpp_2m_sde_gpu, sample_dpmpp_2m_sde_heun, sample_dpmpp_2m_sde_heun_gpu,
                  sample_dpmpp_3m, sample_dpmpp_3m_sde, sample_dpmpp_3m_sde_gpu, sample_dpmpp_sde, sample_dpmpp_sde_gpu,
                  sample_er_sde, sample_sa_solver, sample_sa_solver_pece)
from .seeds import sample_exp_heun_2_x0, sample_exp_heun_2_x0_sde, sample_seeds_2, sample_seeds_3
from .traits import NOISE_KINDS, SamplerTraits, get_traits, traits
from .unipc import sample_uni_pc, sample_uni_pc_bh2
from ..validation import check_new_entry, lookup_entry

__all__ = ["SAMPLERS", "COMFY_SAMPLER_NAMES", "register_sampler", "sampler_traits", "sampler_name", "get_sampler",
           "SamplerTraits", "traits"]

SamplerFn = Callable[..., torch.Tensor]

SAMPLERS: "OrderedDict[str, SamplerFn]" = OrderedDict([
    # ---- ComfyUI's 45, in ComfyUI's order (cfgpp_ud10_ab since ComfyUI 0.35) ----
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
    ("cfgpp_ud10_ab", sample_cfgpp_ud10_ab),
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

# ComfyUI's sampler list (45 names: cfgpp_ud10_ab since 0.35), in its order: the KSampler offers these first.
COMFY_SAMPLER_NAMES = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "cfgpp_ud10_ab", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)


def register_sampler(name: str, fn: SamplerFn, *, noise: str = "none", discard_penultimate_sigma: bool = False,
                     cfg_pp: bool = False, takes_noise_sampler: Optional[bool] = None,
                     replace: bool = False) -> SamplerFn:
    """Add any k-diffusion-protocol function under ``name``; the keywords are its traits (``SamplerTraits``).

    noise: "none", "ancestral" (the sampler takes ``noise_sampler``) or
    "brownian" (Brownian increments through ``noise_sampler``).  The registry holds
    a thin wrapper carrying the traits, so ``fn`` itself is never modified.
    """
    check_new_entry(SAMPLERS, name, fn, replace, "register_sampler")
    if noise not in NOISE_KINDS:
        raise ValueError(f"register_sampler: noise must be one of {NOISE_KINDS}, got {noise!r}")

    @functools.wraps(fn)
    def registered(*args, **kwargs):
        return fn(*args, **kwargs)

    registered.sampler_traits = SamplerTraits(noise=noise, discard_penultimate_sigma=discard_penultimate_sigma,
                                              cfg_pp=cfg_pp, takes_noise_sampler=takes_noise_sampler)
    SAMPLERS[name] = registered
    return registered


def get_sampler(name: str) -> SamplerFn:
    """The registered function for ``name``, with a clear error for unknown names."""
    return lookup_entry(SAMPLERS, name, "sampler_name", "sampler")


def sampler_traits(name: str) -> SamplerTraits:
    """What the sampling pass must provide for sampler ``name``."""
    return get_traits(get_sampler(name))


def sampler_name(fn: SamplerFn) -> Optional[str]:
    """The registry name of a sampler function (None for a function that is not registered)."""
    return next((name for name, registered in SAMPLERS.items() if registered is fn), None)
