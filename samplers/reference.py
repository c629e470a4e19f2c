"""Reference mode: running samplers exactly as ComfyUI does, where our default deliberately differs.

This module is the one place ComfyUI reproduction lives.  Our default sampler
functions hold the maths we stand behind; ``REFERENCE_VARIANTS`` maps the
sampler names whose ComfyUI form differs to what reference mode runs instead,
with the reason in one line.  ``select`` is the one rule that picks what runs;
the sampling pass (``sampling_pass.py``) calls it for the headless pipeline and
the ComfyUI adapter alike.

Users switch reference mode on with the node input ``flow_geometry = comfyui``
or the environment variable ``KSAMPLER_FLOW_GEOMETRY=comfyui`` (names kept for
saved workflows and scripts; the switch covers more than flow geometry).

Samplers whose step scalars follow the schedule's precision (deis, dpmpp_2m,
res_multistep, er_sde, sa_solver, uni_pc) need no entry: our schedules are
float32, as ComfyUI's are, so they match in both modes.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

from ..models.sampling import VE
from . import cfgpp, multistep, sde
from .traits import get_traits

__all__ = ["ReferenceVariant", "REFERENCE_VARIANTS", "select", "VEGeometryView", "REFERENCE_MODE_ENV",
           "FLOW_GEOMETRY_CHOICES", "default_reference_mode", "reference_mode_from_input", "lms_coefficients_quadpack",
           "comfy_msde_update"]

REFERENCE_MODE_ENV = "KSAMPLER_FLOW_GEOMETRY"   # 'exact' (default) or 'comfyui' (reference mode)
FLOW_GEOMETRY_CHOICES = ("default", "exact", "comfyui")  # the nodes' input flow_geometry


def default_reference_mode() -> bool:
    """Reference mode unless told otherwise: only when KSAMPLER_FLOW_GEOMETRY=comfyui (parity runs)."""
    value = os.environ.get(REFERENCE_MODE_ENV, "exact").strip().lower()
    if value not in ("exact", "comfyui"):
        from ..validation import KSamplerInputError
        raise KSamplerInputError(f"{REFERENCE_MODE_ENV}: must be 'exact' or 'comfyui', got {value!r}")
    return value == "comfyui"


def reference_mode_from_input(flow_geometry: str) -> Optional[bool]:
    """The node input ``flow_geometry`` ('default', 'exact', 'comfyui') as reference mode (None: the default); any
    other value is an error naming the input."""
    if not isinstance(flow_geometry, str) or flow_geometry not in FLOW_GEOMETRY_CHOICES:
        from ..validation import KSamplerInputError
        raise KSamplerInputError(f"flow_geometry: must be one of {', '.join(FLOW_GEOMETRY_CHOICES)}, got "
                                 f"{flow_geometry!r}")
    return None if flow_geometry == "default" else flow_geometry == "comfyui"


class VEGeometryView:
    """The same denoiser, reporting VE geometry: how ComfyUI runs some samplers on flow models."""

    model_sampling = VE()

    def __init__(self, model):
        self.model = model
        if hasattr(model, "denoise_with_uncond"):
            self.denoise_with_uncond = model.denoise_with_uncond

    def __call__(self, x, sigma, **kwargs):
        return self.model(x, sigma, **kwargs)


def lms_coefficients_quadpack(sigmas: list[float], i: int, order: int) -> list[float]:
    """The same weights as ComfyUI computes them: QUADPACK (scipy ``quad``) over float32 basis values.

    On schedules with tiny first steps the extrapolation weights reach ~1e4, so the
    float32 rounding of the basis decides the last digits of the result; reference
    mode reproduces it.
    """
    try:
        import numpy as np
        from scipy import integrate
    except ImportError:
        raise ImportError("lms in reference mode (flow_geometry = comfyui, or KSAMPLER_FLOW_GEOMETRY=comfyui) "
                          "reproduces ComfyUI's scipy quadrature: install scipy, or use the default mode") from None
    nodes = np.asarray([sigmas[i - k] for k in range(order)], dtype=np.float32)

    def basis(j):
        def value(tau):
            out = 1.0
            for k in range(order):
                if k != j:   # numpy's promotion of a Python float with a float32 node (float32 under NumPy 2)
                    out = out * ((tau - nodes[k]) / (nodes[j] - nodes[k]))
            return out
        return value

    a, b = np.float32(sigmas[i]), np.float32(sigmas[i + 1])
    return [integrate.quad(basis(j), a, b, epsrel=1e-4)[0] for j in range(order)]



def comfy_msde_update(ms, x, denoised, history, hs, sigma, sigma_next, eta, s_noise, noise_sampler, order,
                      solver_type):
    """One DPM-Solver++(2M/3M) SDE step with ComfyUI's numerics: float32 0-d scalars, alpha_t = sigma e^lambda,
    and the divided differences formed tensor by tensor, in the reference's order (``sde.fused_msde_update``'s
    twin)."""
    inject = eta > 0 and s_noise > 0
    lambda_s, lambda_t = ms.half_log_snr(sigma), ms.half_log_snr(sigma_next)
    h = lambda_t - lambda_s
    h_eta = h * (eta + 1)
    alpha_t = sigma_next * lambda_t.exp()
    one_minus_decay = (-h_eta).expm1().neg()
    x = float(sigma_next / sigma * (-h * eta).exp()) * x + float(alpha_t * one_minus_decay) * denoised
    if order == 3 and len(history) >= 2:
        r0, r1 = hs[0] / h, hs[1] / h
        d1_0 = (denoised - history[0]) / float(r0)
        d1_1 = (history[0] - history[1]) / float(r1)
        d1 = d1_0 + (d1_0 - d1_1) * float(r0) / float(r0 + r1)
        d2 = (d1_0 - d1_1) / float(r0 + r1)
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        x = x + float(alpha_t * phi_2) * d1 - float(alpha_t * phi_3) * d2
    elif len(history) >= 1:
        r = hs[0] / h
        if order == 3:
            d = (denoised - history[0]) / float(r)
            x = x + float(alpha_t * (h_eta.neg().expm1() / h_eta + 1)) * d
        elif solver_type == "heun":
            x = x + float(alpha_t * (one_minus_decay / -h_eta + 1)) * float(1 / r) * (denoised - history[0])
        else:
            x = x + float(0.5 * alpha_t * one_minus_decay) * float(1 / r) * (denoised - history[0])
    if inject:
        x = x + noise_sampler(float(sigma), float(sigma_next)) * float(sigma_next) * \
            float((-2 * h * eta).expm1().neg().sqrt()) * s_noise
    return x, h



def _with(fn: Callable, **options) -> Callable:
    """``fn`` with some options fixed, keeping its traits."""
    variant = functools.partial(fn, **options)
    variant.sampler_traits = get_traits(fn)
    return variant


@dataclass(frozen=True)
class ReferenceVariant:
    """What reference mode runs for one sampler.

    run: the function to run instead (None: the registry's own function).
    ve_geometry: run it with VE geometry (as ComfyUI runs it on flow models).
    with_comfy_noise: also outside reference mode whenever the noise is ComfyUI's Brownian tree (then
        following ComfyUI's arithmetic makes the latent ComfyUI's to the bit; other noise runs the default).
    reason: why ComfyUI's form differs, in one line.
    """

    run: Optional[Callable]
    ve_geometry: bool
    reason: str
    with_comfy_noise: bool = False


_MSDE = "ComfyUI's float32 scalars and tensor-by-tensor update order (rounding on ill-conditioned schedules)"
_FLOW = "ComfyUI runs the VE form directly on flow sigmas (wrong noise geometry on flow models)"

REFERENCE_VARIANTS: dict[str, ReferenceVariant] = {
    "lms": ReferenceVariant(_with(multistep.sample_lms, weights=lms_coefficients_quadpack), False,
                            "ComfyUI integrates the weights by QUADPACK over float32 basis values"),
    "dpmpp_2m_sde": ReferenceVariant(_with(sde.sample_dpmpp_2m_sde, step_update=comfy_msde_update), False, _MSDE,
                                     True),
    "dpmpp_2m_sde_gpu": ReferenceVariant(_with(sde.sample_dpmpp_2m_sde_gpu, step_update=comfy_msde_update), False,
                                         _MSDE, True),
    "dpmpp_2m_sde_heun": ReferenceVariant(_with(sde.sample_dpmpp_2m_sde_heun, step_update=comfy_msde_update), False,
                                          _MSDE, True),
    "dpmpp_2m_sde_heun_gpu": ReferenceVariant(_with(sde.sample_dpmpp_2m_sde_heun_gpu, step_update=comfy_msde_update),
                                              False, _MSDE, True),
    "dpmpp_3m_sde": ReferenceVariant(_with(sde.sample_dpmpp_3m_sde, step_update=comfy_msde_update), False, _MSDE,
                                     True),
    "dpmpp_3m_sde_gpu": ReferenceVariant(_with(sde.sample_dpmpp_3m_sde_gpu, step_update=comfy_msde_update), False,
                                         _MSDE, True),
    "ddpm": ReferenceVariant(None, True, "ComfyUI's DDPM step assumes VE geometry (wrong marginals on flow models)"),
    "res_multistep_ancestral": ReferenceVariant(None, True, "ComfyUI re-noises with the VE ancestral step on flow "
                                                            "models"),
    "dpmpp_2s_ancestral_cfg_pp": ReferenceVariant(
        _with(cfgpp.dpmpp_2s_ancestral_cfg_pp_ve, midpoint_uncond=True), True,
        "ComfyUI re-noises the full step with the midpoint's uncond (a slip that shrinks the spread); VE form"),
    "dpmpp_2m_cfg_pp": ReferenceVariant(cfgpp.dpmpp_2m_cfg_pp_ve, True, _FLOW),
    "res_multistep_cfg_pp": ReferenceVariant(cfgpp.res_multistep_cfg_pp_ve, True, _FLOW),
    "res_multistep_ancestral_cfg_pp": ReferenceVariant(cfgpp.res_multistep_ancestral_cfg_pp_ve, True, _FLOW),
    "gradient_estimation_cfg_pp": ReferenceVariant(cfgpp.gradient_estimation_cfg_pp_ve, True, _FLOW),
}


def select(name: Optional[str], fn: Callable, reference_mode: bool, comfy_noise: bool) -> tuple[Callable, bool]:
    """(the function to run, whether it runs with VE geometry) for sampler ``name`` (registered as ``fn``).

    comfy_noise: the sampler gets ComfyUI's Brownian-tree noise.
    """
    variant = REFERENCE_VARIANTS.get(name) if name is not None else None
    if variant is None or not (reference_mode or (variant.with_comfy_noise and comfy_noise)):
        return fn, False
    return (variant.run or fn), variant.ve_geometry
