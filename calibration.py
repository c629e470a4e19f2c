"""Model-calibrated sampling: a step schedule and multistep coefficients fitted to the model in hand.

The sampler (``sample_calibrated``) is a linear multistep exponential integrator
in data prediction, written in the VE frame (x / alpha, sigma / alpha, so it
serves eps, v and flow models alike)::

    x_{i+1} = (s_{i+1} / s_i) x_i + (1 - s_{i+1} / s_i) * sum_j c[i, j] D_{i-j}

with D_k the model's denoised estimate at step k and each row of c summing to
one (consistency: a constant D is integrated exactly).  c = [1] is DDIM; the
DPM-Solver++(2M) weights (Lu et al. 2022b) are ``[1 + 1/(2r), -1/(2r)]``.
A calibration may also have a corrector (UniPC's arrangement, Zhao et al. 2023):
the model call at step i + 1 also redoes step i with weights cc[i] over
[D_{i+1}, D_i, ...] before step i + 1 is taken, at no extra call.

``fit_calibration`` fits the schedule and c to one model and conditioning, in
the manner of LD3 (Tong et al. 2025, learned discretisation) and PAS / S4S
(Wang et al. 2024; Frankel et al. 2025, learned solver coefficients): a
teacher solves the probability-flow ODE finely from a few fitting noises; the
``steps`` log sigmas (a monotone softmax parametrisation between the model's
sigma_max and sigma_min) and corrections to Adams-Bashforth weights (and to
the corrector's) are then fitted by Adam, with autograd through the sampler and
the model, to minimise the RMS gap between the student's and the teacher's
final samples.  The gradient comes from three quarters of the fitting noises;
the iterate kept is the best on all of them (the fit never sees the evaluation
noise).  With a corrector, the two forms (with and without) race for a third of
the iterations and the better goes on.  The cost is ``teacher_steps`` model
calls plus ``steps`` forward and backward passes per iteration, all on the
fitting batch.

The fit also moves the sigma at which the model is called in the first and the last step (``shift``), their
states staying where they are.  The first step has no earlier estimate to blend, and the last runs down to
sigma = 0, an unbounded stretch in log sigma; over a step the exact solution blends the denoised estimates along
the path, and a call at another sigma stands for that blend better than one at the step's start.  For Gaussian
data one shifted call is exact.

A small fitting set seldom holds the rare noises on which a few-step sampler
errs most.  ``refine_noise``, a larger set, continues the fit from its result
on that set at a smaller step size (``REFINE``), keeping the iterate that is
best there (the unrefined one included); it costs a teacher solve and
``REFINE["iterations"]`` iterations on the larger batch.

The fit matches the ODE.  The sampler can also run it stochastically (``eta`` > 0, no refit): each step is then
the model sampling's ancestral step (as ``euler_ancestral``'s, eta 1 the DDPM posterior for VE models) with the
fitted blend as its denoised estimate, re-noised from the sampling seed.  It no longer follows the ODE, and
trades that for the fresh detail and prompt adherence of ancestral sampling at few steps.

A ``Calibration`` holds the sigmas, the coefficients (with the corrector's and the
shifts, where fitted) and what it was fitted on;
it saves to and loads from a small safetensors file (``save`` / ``load``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .samplers._common import emit, get_model_sampling, renoise, resolve_noise_sampler, step_range
from .samplers.traits import traits
from .validation import MAX_SEED, KSamplerInputError, check_float, check_int

__all__ = ["Calibration", "calibrate", "candidate_fitting_noise", "fit_calibration", "DEFAULT_FIT",
           "sample_calibrated", "teacher_solve", "multistep_coefficients", "cached_calibration", "calibration_key",
           "fitting_noise", "clear_cache", "CALIBRATION_FORMAT", "CALIBRATION_FORMATS", "REFINE", "check_eta",
           "fit_settings", "calibration_keys", "check_calibration_path", "model_fingerprint", "check_fit_request",
           "check_model_sampling", "model_sampling_record", "MAX_CALIBRATION_STEPS", "check_fit_batches"]

CALIBRATION_FORMAT = "ksampler.calibration/1"  # without a corrector (what every earlier version reads)
# [with a corrector, with evaluation shifts (and a corrector or not)]
CALIBRATION_FORMATS = (CALIBRATION_FORMAT, "ksampler.calibration/2", "ksampler.calibration/3")
Denoiser = Callable[..., Tensor]


# ---- geometry ---------------------------------------------------------------------------------
def _alpha(ms, sigma: Tensor) -> Tensor:
    a = ms.alpha(sigma)
    return a if isinstance(a, Tensor) else torch.as_tensor(a, dtype=sigma.dtype)


def _ve_sigma(ms, sigma: Tensor) -> Tensor:
    """VE-frame sigma sigma / alpha (0 stays 0)."""
    return sigma / _alpha(ms, sigma)


def _ve_bounds(ms, sigma_max: float, sigma_min: float) -> tuple[float, float]:
    """VE-frame (top, bottom) of a model-sigma range; flow's sigma = 1 maps to its offset start (finite)."""
    top = float(sigma_max)
    if float(ms.alpha(torch.tensor(top))) <= 0:
        top = float(ms.offset_first_sigma(torch.tensor([top, 0.0]))[0])
    return (float(_ve_sigma(ms, torch.tensor(top, dtype=torch.float64))),
            float(_ve_sigma(ms, torch.tensor(float(sigma_min), dtype=torch.float64))))


def _model_sigma(ms, sigma_ve: Tensor) -> Tensor:
    """Model sigma of a VE-frame sigma (differentiable for eps/VE, where it is the identity)."""
    if getattr(ms, "is_flow", False):
        return sigma_ve / (1 + sigma_ve)
    one = torch.ones((), dtype=sigma_ve.dtype)
    if float(ms.alpha(one)) == 1.0:
        return sigma_ve
    return torch.stack([torch.as_tensor(ms.sigma_from_half_log_snr(-torch.log(s.detach())), dtype=sigma_ve.dtype)
                        for s in sigma_ve.reshape(-1)]).reshape(sigma_ve.shape)


def multistep_coefficients(sigmas_ve: Tensor, base_order: int, width: int, corrector: bool = False) -> Tensor:
    """Exponential-integrator Adams weights in lambda = -log sigma_ve, per step, padded to ``width``.

    Step i integrates x' = e^-h x + int_0^h e^(s-h) P(s) ds with P the polynomial through the last
    ``base_order`` denoised estimates (fewer at the start): Adams-Bashforth; base_order 1 is DDIM, 2 is close to
    DPM-Solver++(2M) (Lu et al. 2022b).  ``corrector``: P's nodes start at the estimate at the step's end
    (Adams-Moulton, the UniC form of Zhao et al. 2023): row i weighs [D_{i+1}, D_i, ...].  The step into
    sigma = 0 takes the newest estimate.
    """
    n = len(sigmas_ve) - 1
    lam = -torch.log(sigmas_ve[:n])
    first = torch.nn.functional.one_hot(torch.tensor(0), width).to(sigmas_ve.dtype)
    rows = []
    for i in range(n):
        m = min(base_order, i + 1 + int(corrector))
        if float(sigmas_ve[i + 1].detach()) == 0 or m == 1:
            rows.append(first.clone())
            continue
        h = -torch.log(sigmas_ve[i + 1]) - lam[i]
        nodes = [lam[i - j] - lam[i] for j in range(m - int(corrector))]  # 0, then negative offsets
        nodes = torch.stack(([h] if corrector else []) + nodes)
        em = torch.expm1(-h)  # int_0^h e^(s-h) s^k ds for k = 0..3 (h^k - k times the one before)
        w = [-em, h + em, h * h - 2 * h - 2 * em, h * h * h - 3 * h * h + 6 * h + 6 * em]
        rhs = torch.stack(w[:m]) / w[0]
        vander = torch.stack([nodes ** k for k in range(m)])
        c = torch.linalg.solve(vander, rhs)
        rows.append(torch.cat([c, c.new_zeros(width - m)]))
    return torch.stack(rows)


def _row(coefficients: Optional[Tensor], i: int, available: int) -> list:
    """Weights of the ``available`` newest estimates at step i; weights on missing history fold onto the oldest."""
    if coefficients is None:
        return [1.0]
    row = coefficients[i]
    k = min(available, row.shape[0])
    if k == row.shape[0]:
        return list(row)
    head = list(row[:k])
    head[-1] = head[-1] + row[k:].sum()
    return head


def _solve(model, x: Tensor, sigmas: Tensor, coefficients: Optional[Tensor], ms, extra_args: dict,
           callback=None, disable=True, corrector: Optional[Tensor] = None, shift: Optional[Tensor] = None,
           eta: float = 0.0, noise_sampler=None) -> Tensor:
    """The calibrated multistep loop (differentiable in x, sigmas and coefficients).  With ``corrector``, each
    model call also corrects the step that led to it (row i - 1 weighs [D_i, D_{i-1}, ...]), at no extra call.
    With ``shift``, step i calls the model at sigma_i * exp(shift[i]) (its state stays at sigma_i).  With
    ``eta`` > 0 each step is the model sampling's ancestral step with the blend as its denoised estimate: to
    sigma_down, then re-noised to sigma_next with draws from ``noise_sampler``."""
    alphas = torch.stack([_alpha(ms, s) for s in sigmas]).to(x.dtype)
    if eta > 0:
        downs, ups, scales = ms.ancestral_steps(sigmas, eta)
        alphas_down = torch.stack([_alpha(ms, s) for s in downs]).to(x.dtype)
        downs, ups, scales = downs.to(x.dtype), ups.tolist(), scales.tolist()
    sigmas = sigmas.to(x.dtype)
    evaluated = sigmas if shift is None else torch.cat([sigmas[:-1] * torch.exp(shift.to(x.dtype)), sigmas[-1:]])

    def step(x, i, weights, noise):
        if eta == 0:
            return _step(x, sigmas[i], sigmas[i + 1], alphas[i], alphas[i + 1], weights, history)
        x = _step(x, sigmas[i], downs[i], alphas[i], alphas_down[i], weights, history)
        return x if noise is None else renoise(x, scales[i], noise, ups[i])
    history: list[Tensor] = []
    x_before, noise_before = x, None
    for i in step_range(len(sigmas) - 1, disable):
        sigma = sigmas[i]
        denoised = model(x, evaluated[i].reshape(1).expand(x.shape[0]).to(device=x.device, dtype=x.dtype),
                         **extra_args)
        history.insert(0, denoised)
        if corrector is not None and i > 0:  # redone with the same draw: the corrector changes only the blend
            x = step(x_before, i - 1, _row(corrector, i - 1, len(history)), noise_before)
        emit(callback, x, i, float(sigma.detach()), denoised)
        noise = noise_sampler(float(sigma), float(sigmas[i + 1])) if eta > 0 and ups[i] > 0 else None
        x_before, noise_before = x, noise
        x = step(x, i, _row(coefficients, i, len(history)), noise)
        if coefficients is not None:
            del history[max(coefficients.shape[1], 0 if corrector is None else corrector.shape[1]) - 1:]
    return x


def _step(x: Tensor, sigma: Tensor, sigma_next: Tensor, alpha: Tensor, alpha_next: Tensor, weights: list,
          history: list) -> Tensor:
    """One exponential-integrator step of the weighted estimates, in the VE frame written in the model's frame
    (no division by alpha, which is 0 at flow's sigma = 1)."""
    blend = sum(w * d for w, d in zip(weights, history))
    if float(sigma_next.detach()) == 0:
        return blend
    ratio = sigma_next / sigma
    return ratio * x + (alpha_next - ratio * alpha) * blend


@torch.no_grad()
def sample_calibrated(model, x, sigmas, extra_args=None, callback=None, disable=None, coefficients=None,
                      corrector=None, shift=None, eta=0.0, s_noise=1.0, noise_sampler=None):
    """Calibrated linear multistep exponential integrator (LD3, Tong et al. 2025; PAS, Wang et al. 2024)."""
    ms = get_model_sampling(model)
    check_eta(eta)
    rows = []
    for name, c in (("coefficients", coefficients), ("corrector", corrector), ("shift", shift)):
        c = None if c is None else torch.as_tensor(c, dtype=torch.float64)
        if c is not None and c.shape[0] < len(sigmas) - 1:
            raise ValueError(f"sigmas: {len(sigmas) - 1} steps but the calibration has {name} for {c.shape[0]}; "
                             "use the calibration's own sigmas")
        rows.append(None if c is None else c[c.shape[0] - (len(sigmas) - 1):])  # a tail (denoise < 1): its rows
    extra_args = extra_args or {}
    draw = None
    if eta > 0:
        source = resolve_noise_sampler(noise_sampler, x, extra_args)

        def draw(sigma, sigma_next):
            return source(sigma, sigma_next) * s_noise
    return _solve(model, x, sigmas.detach().cpu().to(torch.float64), rows[0], ms, extra_args, callback, disable,
                  corrector=rows[1], shift=rows[2], eta=float(eta), noise_sampler=draw)


def check_eta(eta) -> float:
    """eta: a number in [0, 1] (0: the ODE; 1: an ancestral sampler's full re-noising)."""
    return check_float("eta", eta, 0.0, 1.0)


# ---- the teacher ------------------------------------------------------------------------------
@torch.no_grad()
def teacher_solve(denoiser: Denoiser, model_sampling, x: Tensor, sigma_max: float, sigma_min: float,
                  steps: int = 200) -> Tensor:
    """A fine PF-ODE solve from sigma_max to sigma_min (then to 0): 3-step exponential Adams-Bashforth, log grid."""
    ms = model_sampling
    hi, lo = _ve_bounds(ms, sigma_max, sigma_min)
    ve = torch.exp(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64))
    sig = torch.cat([_model_sigma(ms, ve), torch.zeros(1, dtype=torch.float64)])
    if float(ms.alpha(torch.tensor(float(sigma_max)))) <= 0:
        sig[0] = float(sigma_max)  # flow's pure-noise start: the first step is a DDIM step from it
    c = multistep_coefficients(torch.cat([ve, ve.new_zeros(1)]), 3, 3)
    return _solve(denoiser, x, sig, c, ms, {})


# ---- the calibration ----------------------------------------------------------------------------
@dataclass
class Calibration:
    """Fitted sigmas (model frame, descending, ending in 0), multistep coefficients [steps, order] and, where the
    fit has them, corrector coefficients [steps, order + 1] (row i weighs [D_{i+1}, D_i, ...]) and evaluation
    shifts [steps] (step i calls the model at sigma_i * exp(shift[i])).  ``eta`` is how the sampler runs, not part
    of the fit (nor of the file): 0 follows the ODE the fit matched; above 0 each step re-noises (``_solve``)."""

    sigmas: Tensor
    coefficients: Tensor
    info: dict = field(default_factory=dict)
    corrector: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    eta: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def sampler(self) -> Callable:
        """A k-diffusion-protocol sampler with this calibration's coefficients and eta bound (with eta > 0 it takes
        a ``noise_sampler``, else draws from ``extra_args["seed"]`` as ancestral samplers do)."""
        self.validate()
        coefficients, corrector, shift, eta = self.coefficients, self.corrector, self.shift, self.eta

        @traits(noise="ancestral" if eta > 0 else "none")
        def sample_with_calibration(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                    noise_sampler=None):
            """Calibrated linear multistep exponential integrator (LD3, Tong et al. 2025; PAS, Wang et al. 2024)."""
            check_model_sampling(self, getattr(model, "model_sampling", None))  # a bare callable: not checked
            self.check_sigmas(sigmas)
            return sample_calibrated(model, x, sigmas, extra_args, callback, disable, coefficients=coefficients,
                                     corrector=corrector, shift=shift, eta=eta, noise_sampler=noise_sampler)
        return sample_with_calibration

    def check_sigmas(self, sigmas) -> None:
        """A KSamplerInputError naming ``sigmas`` unless they are this calibration's own sigmas or a tail of them
        (a split's low part): its coefficients were fitted for those steps, and row i belongs to step i."""
        own = self.sigmas.detach().cpu().double()
        given = sigmas.detach().cpu().double().reshape(-1) if isinstance(sigmas, Tensor) else None
        if given is None or not 2 <= len(given) <= len(own) or not bool(torch.isfinite(given).all()) or \
                not torch.allclose(given, own[len(own) - len(given):], rtol=1e-5, atol=1e-8):
            shown = given[:6].tolist() if given is not None else type(sigmas).__name__
            raise KSamplerInputError(f"sigmas: a calibrated sampler runs the sigmas it was fitted for "
                                     f"({[round(v, 4) for v in own.tolist()]}) or their tail, got {shown}; connect "
                                     "the SIGMAS of the Calibrated Scheduler that made this SAMPLER")

    def save(self, path: str, *, name: str = "path") -> None:
        """A small safetensors file (sigmas, coefficients, corrector, shift; the info as JSON metadata), in the
        oldest format that holds it (without a corrector or shifts: the first, which every version reads).
        A file that cannot be written is a ValueError naming ``name`` (the input that gave the path)."""
        from safetensors.torch import save_file
        tensors = {"sigmas": self.sigmas, "coefficients": self.coefficients}
        for tensor_name in ("corrector", "shift"):
            if getattr(self, tensor_name) is not None:
                tensors[tensor_name] = getattr(self, tensor_name)
        version = 2 if self.shift is not None else int(self.corrector is not None)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
                      metadata={"format": CALIBRATION_FORMATS[version], "info": json.dumps(self.info, sort_keys=True)})
        except Exception as exc:  # safetensors raises its own error type for I/O failures, torch a TypeError
            raise KSamplerInputError(f"{name}: could not write {path!r} ({type(exc).__name__}: {exc}); check that "
                                     "its folder exists, is writable and has space, or choose another path") from None

    @classmethod
    def load(cls, path: str, *, name: str = "path") -> "Calibration":
        """The calibration in the file ``path``; a file that is missing, damaged, edited into something that is no
        calibration, or not one this version reads is a ValueError naming ``name`` (the input that gave the path)
        and the file."""
        import os
        from safetensors import safe_open
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str):
            raise KSamplerInputError(f"{name}: expected the path of a calibration file (str), got "
                                     f"{type(path).__name__}")
        if not os.path.isfile(path):
            what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
            raise KSamplerInputError(f"{name}: {path!r} {what}; give the path of a calibration .safetensors file")
        refit = "delete it to fit anew, or choose another file name"
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                stored = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in ("sigmas", "coefficients", "corrector", "shift") if k in stored}
        except Exception as exc:  # safetensors raises its own error types for bad headers and short files
            raise KSamplerInputError(f"{name}: {path!r} is not a readable safetensors file: it is damaged, truncated "
                                     f"or of another kind ({type(exc).__name__}: {exc}); {refit}") from None
        if meta.get("format") not in CALIBRATION_FORMATS:
            raise KSamplerInputError(f"{name}: {path!r} is not a ksampler calibration this version reads (format "
                                     f"{meta.get('format')!r}, expected one of {', '.join(CALIBRATION_FORMATS)})")
        missing = [k for k in ("sigmas", "coefficients") if k not in tensors]
        if missing:
            raise KSamplerInputError(f"{name}: {path!r} holds no {' and no '.join(map(repr, missing))} tensor, so it "
                                     f"is not a whole calibration; {refit}")
        try:
            info = json.loads(meta.get("info", "{}"))
        except ValueError as exc:
            raise KSamplerInputError(f"{name}: {path!r} has 'info' metadata that is not JSON ({exc}); {refit}") \
                from None
        cal = cls(tensors["sigmas"], tensors["coefficients"], info, tensors.get("corrector"), tensors.get("shift"))
        try:
            cal.validate()
        except ValueError as exc:
            raise KSamplerInputError(f"{name}: {path!r} does not hold a valid calibration ({exc}); {refit}") from None
        return cal

    def validate(self) -> None:
        """A ValueError naming what is wrong where the tensors are not a calibration's (finite floating-point
        values, sigmas strictly descending to 0, coefficient rows of the step count, each summing to one) or the
        info's fields that sampling reads are not of their types or disagree with the tensors."""
        for name in ("sigmas", "coefficients", "corrector", "shift"):
            tensor = getattr(self, name)
            if tensor is None and name in ("corrector", "shift"):
                continue
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise ValueError(f"calibration: {name} must be a floating-point tensor, got "
                                 f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"calibration: {name} holds NaN or Inf")
        s = self.sigmas
        if s.ndim != 1 or len(s) < 2 or float(s[-1]) != 0 or bool((s[1:] >= s[:-1]).any()):
            raise ValueError("calibration: sigmas must be a strictly descending 1-D tensor ending in 0, got "
                             f"{s.reshape(-1)[:8].tolist()}{' ...' if s.numel() > 8 else ''}")
        for name, c in (("coefficients", self.coefficients), ("corrector", self.corrector)):
            if c is None and name == "corrector":
                continue
            if c.ndim != 2 or c.shape[0] != len(s) - 1 or c.shape[1] < 1 or \
                    (name == "coefficients" and c.shape[1] > 4):
                raise ValueError(f"calibration: {name} must be shaped [steps={len(s) - 1}, order 1..4"
                                 f"{' + 1' if name == 'corrector' else ''}], got {tuple(c.shape)}")
            if bool(((c.double().sum(1) - 1).abs() > 1e-3).any()):  # consistency: a constant D is integrated exactly
                raise ValueError(f"calibration: each row of {name} must sum to 1, got row sums "
                                 f"{[round(v, 4) for v in c.double().sum(1).tolist()]}")
        if self.corrector is not None and self.corrector.shape[1] != self.coefficients.shape[1] + 1:
            raise ValueError(f"calibration: corrector must be shaped [steps, {self.coefficients.shape[1] + 1}] (one "
                             f"more column than the coefficients), got {tuple(self.corrector.shape)}")
        check_eta(self.eta)
        if self.shift is not None and (self.shift.shape != (len(s) - 1,) or not bool(torch.isfinite(self.shift).all())):
            raise ValueError(f"calibration: shift must be finite, shaped [steps={len(s) - 1}], got "
                             f"{tuple(self.shift.shape)}")
        if self.shift is not None:  # the fit calls the model within [teacher_sigma_min, sigma_max = sigmas[0]]
            evaluated = s[:-1].double() * torch.exp(self.shift.double())
            if bool((evaluated > float(s[0]) * (1 + 1e-3)).any()):
                raise ValueError(f"calibration: shift calls the model above the first sigma {float(s[0]):.6g} (at "
                                 f"{float(evaluated.max()):.6g}); a fit never does")
        _check_info(self.info, len(s) - 1, self.coefficients.shape[1], float(s[0]))


# the types of the info fields that loading, keying and sampling read (where present: older files lack some)
_INFO_FIELDS = {"key": str, "file_key": str, "cfg": float, "steps": int, "order": int, "sigma_min": float,
                "sigma_max": float, "fit_noises": int, "seed": int, "iterations": int, "teacher_steps": int,
                "model_sampling": dict}


def _check_info(info, steps: Optional[int], order: Optional[int], first_sigma: Optional[float]) -> None:
    """A ValueError where a calibration's info is not a dict, a field in ``_INFO_FIELDS`` is not of its type
    (floats: finite numbers), or steps, order or sigma_max disagree with the tensors (where given)."""
    if not isinstance(info, dict):
        raise ValueError(f"calibration: info must be a dict (a JSON object in a file), got {type(info).__name__}")
    for field_name, kind in _INFO_FIELDS.items():
        if field_name not in info:
            continue
        value = info[field_name]
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"calibration: info field {field_name!r} must be {_KIND_NAMES[kind]}, got {value!r}")
    for field_name, expected in (("steps", steps), ("order", order)):
        if field_name in info and expected is not None and info[field_name] != expected:
            raise ValueError(f"calibration: info says {field_name} {info[field_name]}, but the tensors hold "
                             f"{expected}")
    if "sigma_max" in info and first_sigma is not None and \
            not math.isclose(info["sigma_max"], first_sigma, rel_tol=1e-3):  # 1e-3: a float16 file too
        raise ValueError(f"calibration: info says sigma_max {info['sigma_max']:.6g}, but the sigmas start at "
                         f"{first_sigma:.6g}")
    if "model_sampling" in info:
        _check_model_sampling_record(info["model_sampling"])


_KIND_NAMES = {str: "a string", float: "a finite number", int: "an integer", dict: "a JSON object"}


def model_sampling_record(model_sampling) -> dict:
    """What a calibration notes of the model sampling it was fitted on (JSON): its class, prediction type, whether
    it is a flow model, and its sigma range (where it has them)."""
    record = {"type": type(model_sampling).__name__, "flow": bool(getattr(model_sampling, "is_flow", False))}
    prediction = getattr(model_sampling, "prediction_type", None)
    if isinstance(prediction, str):
        record["prediction"] = prediction
    for attribute in ("sigma_min", "sigma_max"):
        try:
            value = float(getattr(model_sampling, attribute))
        except (AttributeError, TypeError, ValueError, RuntimeError):
            continue
        if math.isfinite(value) and value > 0:
            record[attribute] = value
    return record


def _check_model_sampling_record(record: dict) -> None:
    kinds = {"type": str, "flow": bool, "prediction": str, "sigma_min": float, "sigma_max": float}
    for field_name, kind in kinds.items():
        if field_name not in record:
            continue
        value = record[field_name]
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and value > 0
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ValueError(f"calibration: info field 'model_sampling' has {field_name} {value!r}, not "
                             f"{'a positive finite number' if kind is float else kind.__name__}")
    if "flow" not in record:
        raise ValueError("calibration: info field 'model_sampling' has no 'flow' entry")


def _describe_model_sampling(record: dict) -> str:
    sigma_range = f", sigma {record['sigma_min']:.4g} to {record['sigma_max']:.4g}" \
        if "sigma_min" in record and "sigma_max" in record else ""
    kind = "flow" if record["flow"] else record.get("prediction", "?") + " prediction"
    return f"{record.get('type', '?')} ({kind}{sigma_range})"


def check_model_sampling(calibration: "Calibration", model_sampling) -> None:
    """A KSamplerInputError naming ``calibration`` where the model sampling it was fitted on (noted in its info
    since stop 40; older calibrations are not checked) differs from ``model_sampling``: flow or not, prediction
    type, sigma range.  None: nothing to check against."""
    fitted = calibration.info.get("model_sampling") if isinstance(calibration.info, dict) else None
    if not isinstance(fitted, dict) or model_sampling is None:
        return
    now = model_sampling_record(model_sampling)
    same = fitted.get("flow") == now["flow"]
    if "prediction" in fitted and "prediction" in now:
        same = same and fitted["prediction"] == now["prediction"]
    for attribute in ("sigma_min", "sigma_max"):
        if attribute in fitted and attribute in now:
            same = same and math.isclose(fitted[attribute], now[attribute], rel_tol=1e-4)
    if not same:
        raise KSamplerInputError(f"calibration: fitted for a model with {_describe_model_sampling(fitted)} model "
                                 f"sampling, but this model's is {_describe_model_sampling(now)}; refit the "
                                 "calibration for this model (a Calibrated Scheduler on it), or sample the model it "
                                 "was fitted for")


def _call_blocker(denoiser, x: Tensor, sigma: float) -> Optional[str]:
    """None where one model call's output carries a gradient to its input, else why not (no_grad, inference
    tensors, or no memory for what a backward pass needs)."""
    try:
        with torch.enable_grad():
            probe = x.detach().clone().requires_grad_(True)
            out = denoiser(probe, probe.new_full((probe.shape[0],), sigma))
            return None if out.requires_grad else "no_grad or inference tensors"
    except RuntimeError as exc:
        if "inference" in str(exc).lower():
            return "no_grad or inference tensors"
        if _out_of_memory(exc):
            return f"{_NO_MEMORY} one call keeps: {_first_line(exc)}"
        raise


# how the fit may get its gradient: "auto" (autograd when the model gives one, recomputing each call in the
# backward pass where keeping them all runs out of memory, else SPSA), or one of the ways by name
GRADIENTS = ("auto", "autograd", "recompute", "spsa")
_NO_MEMORY = "no memory for what a backward pass through"


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (CUDA's OutOfMemoryError, or the CPU allocator's)."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _gradient_blocker(loss_fn) -> Optional[str]:
    """None where a loss built through the model carries a gradient, else why not: no_grad or inference tensors,
    no memory to keep what a backward pass needs, or a backward pass that torch refuses.  A refused backward means
    an op in the model with no derivative (a custom op with no autograd formula, as comfy_kitchen's rotary embedding
    in ComfyUI's Flux and Wan), a forward that changes in place a tensor the backward needs (ComfyUI's control sums
    in a UNet without a middle block), or a backward past the memory.  A fit without the gradient (SPSA) runs the
    model without keeping anything for a backward pass, so it can go on."""
    try:
        with torch.enable_grad():
            loss = loss_fn()
    except RuntimeError as exc:
        if any(reason in str(exc).lower() for reason in ("inference", "does not require grad")):
            return "no_grad or inference tensors"
        if _out_of_memory(exc):
            return f"{_NO_MEMORY} its calls keeps: {_first_line(exc)}"
        raise
    if not loss.requires_grad:
        return "no_grad or inference tensors"
    try:
        loss.backward()
    except RuntimeError as exc:  # NotImplementedError and torch.OutOfMemoryError among them
        return f"its backward pass fails: {_first_line(exc)}"
    return None


class _Adam:
    """Adam (Kingma & Ba 2015) with a cosine-annealed step size; torch.optim would import torch._dynamo (seconds)."""

    def __init__(self, params: list, lr: float, total: int, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.total, self.betas, self.eps = params, lr, total, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        lr = self.lr * 0.5 * (1 + math.cos(math.pi * min(self.t, self.total) / self.total))
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            m_hat = m / (1 - b1 ** self.t)
            v_hat = v / (1 - b2 ** self.t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))


def _schedule(u: Tensor, log_hi: float, log_lo: float) -> Tensor:
    """steps VE sigmas from a monotone parametrisation: softmax increments in log sigma (the last: a slack)."""
    inc = torch.softmax(u, 0) * (log_hi - log_lo)
    logs = log_hi - torch.cat([u.new_zeros(1), torch.cumsum(inc[:-1], 0)])
    return torch.cat([torch.exp(logs), u.new_zeros(1)])


def _initial_u(ve_init: Tensor, log_hi: float, log_lo: float) -> Tensor:
    logs = torch.log(ve_init[:-1])
    inc = torch.cat([logs[:-1] - logs[1:], (logs[-1] - log_lo).clamp_min(1e-3 * (log_hi - log_lo)).reshape(1)])
    return torch.log(inc.clamp_min(1e-6))


START_SCHEDULES = ("karras", "exponential", "simple", "normal", "beta", "kl_optimal")


def _init_schedules(ms, steps: int, hi: float, lo: float) -> dict:
    """Candidate starting schedules in VE sigmas (steps values, then 0): the registry's, over the model's range."""
    from .schedulers import sampling_sigmas

    out = {}
    for name in START_SCHEDULES:
        sig = sampling_sigmas(ms, name, steps).double()
        sig = sig[sig > 0]
        if len(sig) != steps:  # schedulers that merge or add points
            continue
        ve = (sig / torch.tensor([float(ms.alpha(float(s))) for s in sig], dtype=torch.float64).clamp_min(1e-12))
        ve = ve.clamp(lo, hi)
        ve[0] = hi
        if steps > 1 and bool((ve[1:] >= ve[:-1]).any()):
            continue
        out[name] = torch.cat([ve, ve.new_zeros(1)])
    if not out:
        out["exponential"] = torch.cat([torch.exp(torch.linspace(math.log(hi), math.log(lo), steps,
                                                                 dtype=torch.float64)), torch.zeros(1)])
    return out


# defaults of a fit, chosen on the tuning split of bench/heldout.py (never on held-out problems)
DEFAULT_FIT = {"order": 3, "iterations": 600, "lr": 0.05, "teacher_steps": 100, "corrector": True, "shift": True,
               "selection": "all", "coefficient_penalty": 0.0, "fit_last_step": True}
SELECTIONS = ("all", "held_aside")  # which fitting noises pick the iterate a fit keeps (fit_calibration)

# the steps whose evaluation sigma the fit shifts: the first and the last (tuning split: python bench/flips.py
# --shift, 0.89x in geometric mean over its nine cases; the last alone, in scratch runs, 0.85x but no gain with
# guidance at NFE 5, where both ends gave 0.52x)
SHIFTED_STEPS = (0, -1)


def _shifted_steps(steps: int) -> list:
    """The indices of ``SHIFTED_STEPS`` in a ``steps``-step schedule (one step: the first is the last)."""
    return sorted({i % steps for i in SHIFTED_STEPS})


# the refinement on a larger noise set (refine_noise), chosen on the tuning split: python bench/flips.py --refine
REFINE = {"iterations": 150, "lr": 0.01}


CORRECTOR_STEP = 0.2  # the corrector's rows move at a fifth of the predictor's rate (tuning split: steadier fits)


class RecomputedCallDiffers(RuntimeError):
    """A model call run again in the backward pass gave other values than in the forward pass (a model that keeps
    state from call to call, such as ComfyUI's hook keyframes): a gradient through it would be silently wrong."""


class _Recomputed(torch.autograd.Function):
    """One model call that keeps nothing for the backward pass but its inputs and output, and runs again there
    (gradient checkpointing, Chen et al. 2016): a fit through it keeps one call's activations at a time, not every
    step's.  The call must give the same values again (``RecomputedCallDiffers`` where it does not)."""

    @staticmethod
    def forward(ctx, x: Tensor, sigma: Tensor, call: Callable) -> Tensor:
        ctx.call = call
        with torch.no_grad():
            out = call(x, sigma)
        ctx.save_for_backward(x, sigma, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, sigma, first = ctx.saved_tensors
        first = first.detach()
        needs = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((x, sigma), needs)]
            out = ctx.call(*inputs)
            gap = float((out.detach() - first).abs().max()) if out.shape == first.shape else math.inf
            if not gap <= RECOMPUTE_TOLERANCE * float(first.float().square().mean().sqrt()) + 1e-12:
                raise RecomputedCallDiffers(f"the model gave other values when a call ran again (largest difference "
                                            f"{gap:.3g}): it keeps state from call to call")
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if wanted else ())
        return (*(next(grads) if need else None for need in needs), None)


# the largest difference, relative to the output's RMS, between a call and the same call run again (a GPU kernel
# may differ in its last bits; a model that keeps state from call to call differs far more)
RECOMPUTE_TOLERANCE = 1e-3


def _recomputing(denoiser: Denoiser) -> Denoiser:
    def call(x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        return _Recomputed.apply(x, sigma, lambda x_, sigma_: denoiser(x_, sigma_, **kwargs))
    return call


class _Student:
    """The calibrated sampler as a function of its parameters, run on the fitting batch against the teacher."""

    def __init__(self, denoiser: Denoiser, ms, x0: Tensor, teacher: Tensor, s_max: float, hi: float, lo: float,
                 order: int, t_min: float, solve_start: Optional[Callable[[], None]] = None):
        self.denoiser, self.ms, self.x0, self.teacher, self.s_max = denoiser, ms, x0, teacher, s_max
        self.solve_start = solve_start
        self.log_hi, self.log_lo, self.order = math.log(hi), math.log(lo), order
        self.log_eval_range = (math.log(t_min), math.log(s_max))  # where the model may be called

    def begin_solve(self) -> None:
        """Before each pass through the model: the host resets what its model keeps from call to call."""
        if self.solve_start is not None:
            self.solve_start()

    def parameters(self, u: Tensor, form: tuple, delta: Optional[dict]) -> tuple:
        """(model sigmas, coefficients, corrector or None, shift or None) of the calibrated sampler.

        form: the base orders (predictor, corrector); corrector None: none, 0: a no-op to start from (all weight
        on the predictor's estimates, none on the new one).  delta: corrections to the rows of each ("predictor",
        "corrector") and the free evaluation shifts ("shift": one per ``SHIFTED_STEPS``), each where fitted."""
        ve = _schedule(u, self.log_hi, self.log_lo)
        sig = torch.cat([_model_sigma(self.ms, ve[:-1]), ve[-1:]])
        sig = torch.cat([sig.new_full((1,), self.s_max), sig[1:]])  # the start is fixed (the noise is scaled to it)
        c = multistep_coefficients(ve, form[0], self.order)
        cc = None
        if form[1] is not None:
            cc = multistep_coefficients(ve, form[1], self.order + 1, corrector=True) if form[1] else \
                torch.cat([c.new_zeros(len(c), 1), c], 1)
        delta = delta or {}
        if "predictor" in delta:  # rows past the fitted ones (the last, unless fitted) keep the Adams weights
            rows = delta["predictor"]
            rows = torch.cat([rows, rows.new_zeros(len(c) - len(rows), rows.shape[1])])
            c = c + torch.cat([-rows.sum(1, keepdim=True), rows], 1)
        if cc is not None and "corrector" in delta:
            cc = cc + CORRECTOR_STEP * torch.cat([-delta["corrector"].sum(1, keepdim=True), delta["corrector"]], 1)
        return sig, c, cc, None if "shift" not in delta else self._shift(sig, delta["shift"])

    def _shift(self, sig: Tensor, free: Tensor) -> Tensor:
        """The shifts of every step: ``free`` at ``SHIFTED_STEPS``, else 0, kept where the model may be called
        (the bound passes the gradient on as if it were not there, so that a shift held at it can come back)."""
        log_sig = torch.log(sig[:-1])
        placed = torch.zeros_like(log_sig).index_put((torch.tensor(_shifted_steps(len(log_sig))),), free)
        lo, hi = self.log_eval_range
        bounded = torch.minimum(torch.maximum(placed, lo - log_sig), hi - log_sig)
        return placed + (bounded - placed).detach()

    def loss(self, u: Tensor, form: tuple, delta: Optional[dict], idx, recompute: bool = False) -> Tensor:
        """RMS gap to the teacher's final samples over the items ``idx`` (``recompute``: each model call run again
        in the backward pass instead of kept, ``_Recomputed``)."""
        sig, c, cc, shift = self.parameters(u, form, delta)
        self.begin_solve()
        denoiser = _recomputing(self.denoiser) if recompute else self.denoiser
        return _rms_gap(_solve(denoiser, self.x0, sig, c, self.ms, {}, corrector=cc, shift=shift)[idx],
                        self.teacher[idx])


def _rms_gap(out: Tensor, target: Tensor) -> Tensor:
    """RMS of ``out - target`` over all items and elements."""
    return (out - target).reshape(out.shape[0], -1).pow(2).mean().sqrt()


def _starts(student: _Student, ms, steps: int, hi: float, lo: float, idx, corrector: bool) -> list:
    """The best start of each form, as (loss, schedule name, form, u): the registry's schedules under order-1..3
    Adams-Bashforth weights; with ``corrector``, also the best corrected start: each of those with a no-op
    corrector (the same samples, so its loss is not re-measured) or an Adams-Moulton corrector one order higher."""
    plain, corrected = [], []
    for name, ve in _init_schedules(ms, steps, hi, lo).items():
        u0 = _initial_u(ve, student.log_hi, student.log_lo)
        for base_order in range(1, min(student.order, 3) + 1):
            forms = [(base_order, None)] + ([(base_order, base_order + 1)] if corrector else [])
            for form in forms:
                with torch.no_grad():
                    value = float(student.loss(u0, form, None, idx))
                if not math.isfinite(value):
                    continue
                if form[1] is None:
                    plain.append((value, name, form, u0))
                    if corrector:
                        corrected.append((value, name, (base_order, 0), u0))
                else:
                    corrected.append((value, name, form, u0))
    if not plain and not corrected:
        raise FloatingPointError("calibration: every starting schedule diverged on the fitting noise; check the model")
    return [min(found, key=lambda t: t[0]) for found in (plain, corrected) if found]


def _run(start: tuple, steps: int, order: int, fit_coefficients: bool, fit_shift: bool,
         fit_last_step: bool = True) -> dict:
    """A start and its zero corrections (and shifts) to fit; the predictor's last row only if ``fit_last_step``."""
    loss, name, form, u0 = start
    shapes = {}
    if fit_coefficients:
        shapes["predictor"] = (steps if fit_last_step else steps - 1, order - 1)
        if form[1] is not None:
            shapes["corrector"] = (steps, order)
    if fit_shift:
        shapes["shift"] = (len(_shifted_steps(steps)),)
    delta = {k: torch.zeros(shape, dtype=torch.float64, requires_grad=True) for k, shape in shapes.items()}
    return {"start": loss, "form": form, "u": u0.clone().requires_grad_(True), "delta": delta or None,
            "name": f"{name}+ab{form[0]}" + ("" if form[1] is None else f"+am{form[1]}" if form[1] else "+corrector")}


def _spsa_gradient(params: list, loss_fn: Callable[[], Tensor], it: int, gen: torch.Generator) -> bool:
    """Simultaneous-perturbation gradient estimate (Spall 1992) into ``p.grad``: two loss evaluations.
    False (and no gradient) where either evaluation is not finite."""
    c_k = 0.05 / (it + 1) ** 0.101
    signs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
    with torch.no_grad():
        for p, d in zip(params, signs):
            p.add_(c_k * d)
        plus = float(loss_fn())
        for p, d in zip(params, signs):
            p.sub_(2 * c_k * d)
        minus = float(loss_fn())
        for p, d in zip(params, signs):
            p.add_(c_k * d)
    if not (math.isfinite(plus) and math.isfinite(minus)):
        return False
    for p, d in zip(params, signs):
        p.grad = (plus - minus) / (2 * c_k) * d
    return True


def _penalised(loss: Tensor, delta: Optional[dict], penalty: float) -> Tensor:
    """``loss`` * (1 + ``penalty`` * the mean square of the coefficient corrections): the corrections shrink to the
    Adams weights unless they pay more than that share of the loss (the shifts are not penalised)."""
    rows = [d.reshape(-1) for k, d in (delta or {}).items() if k != "shift"]
    if not penalty or not rows:
        return loss
    return loss * (1 + penalty * torch.cat(rows).pow(2).mean())


class _Gradient:
    """How the fit gets its gradient: "autograd" (through the model; ``recompute``: each model call run again in
    the backward pass instead of kept) or "spsa".  Where a pass through the model runs out of memory for the
    gradient mid-fit (a larger refining batch, say), autograd recomputes from then on, and where that runs out too,
    SPSA takes over for the rest of the fit."""

    def __init__(self, name: str, recompute: bool, say: Callable[[str], None],
                 on_spsa: Optional[Callable[[], None]] = None):
        self.name, self.recompute, self.say, self.ran_out, self.on_spsa = name, recompute, say, False, on_spsa
        if name == "spsa":
            self._to_spsa()

    def _to_spsa(self) -> None:
        self.name, self.recompute = "spsa", False
        if self.on_spsa is not None:
            self.on_spsa()
            self.on_spsa = None

    def __str__(self) -> str:
        return self.name + (" (each model call run again in the backward pass)" if self.recompute else "")

    def ran_out_of_memory(self, exc: BaseException, batch: int) -> None:
        what = f"no memory for a backward pass through the model on {batch} noises ({_first_line(exc)})"
        if not self.recompute:
            self.say(f"calibration: {what}; running each model call again in the backward pass from now on")
            self.recompute = True
            return
        self.say(f"calibration: {what}; going on by SPSA (two evaluations per iteration, nothing kept for a "
                 "backward pass)")
        self.ran_out = True
        self._to_spsa()

    def cannot_recompute(self, exc: BaseException) -> None:
        self.say(f"calibration: {exc}; going on by SPSA (two evaluations per iteration)")
        self.ran_out = True
        self._to_spsa()


def _optimise(student: _Student, u: Tensor, delta: Optional[dict], form: tuple, iterations: int, lr: float,
              mode: "_Gradient", fit_idx, sel_idx, calls: dict, steps: int, penalty: float = 0.0,
              tick: Optional[Callable[[], None]] = None, record: Optional[dict] = None) -> tuple:
    """Adam on (u, delta) with the gradient from the items ``fit_idx`` (of the loss ``_penalised`` by ``penalty``);
    returns (loss, u, delta) of the iterate with the lowest plain loss on the items ``sel_idx``, checked every 10
    iterations (the start included; its loss goes to ``record["start_selected"]``).  ``tick()`` is called before
    each iteration."""
    params = [u] + list((delta or {}).values())

    def snapshot(loss: float) -> tuple:
        return loss, u.detach().clone(), None if delta is None else {k: d.detach().clone() for k, d in delta.items()}

    opt = _Adam(params, lr, max(iterations, 1))
    with torch.no_grad():
        best = snapshot(float(student.loss(u, form, delta, sel_idx)))
    if record is not None:
        record["start_selected"] = best[0]
    gen = torch.Generator().manual_seed(0)
    for it in range(iterations):
        if tick is not None:
            tick()
        for p in params:
            p.grad = None
        if mode.name == "autograd":
            try:
                with torch.enable_grad():
                    loss = _penalised(student.loss(u, form, delta, fit_idx, mode.recompute), delta, penalty)
                    if not torch.isfinite(loss):
                        break
                    loss.backward()
            except RuntimeError as exc:
                if isinstance(exc, RecomputedCallDiffers):
                    mode.cannot_recompute(exc)
                elif _out_of_memory(exc):
                    mode.ran_out_of_memory(exc, student.x0.shape[0])
                else:
                    raise
                continue
            calls["backward_passes"] += steps
        elif not _spsa_gradient(params, lambda: _penalised(student.loss(u, form, delta, fit_idx), delta, penalty),
                                it, gen):
            continue  # a perturbation left the stable region: skip this iteration
        opt.step()
        if it % 10 == 9 or it == iterations - 1:
            with torch.no_grad():
                sel = float(student.loss(u, form, delta, sel_idx))
            if math.isfinite(sel) and sel < best[0]:
                best = snapshot(sel)
    return best


def _race(student: _Student, runs: list, race: int, iterations: int, lr: float, mode: "_Gradient", items: tuple,
          calls: dict, steps: int, say, penalty: float = 0.0, tick: Optional[Callable[[], None]] = None) -> dict:
    """Fit each run (a form's start) for ``race`` iterations, then the best on the items ``items[1]`` for the rest
    (all ``iterations`` for a single run); returns that run with its result under "best"."""
    fit_idx, sel_idx = items
    for run in runs:
        say(f"calibration: fitting {steps} steps (order {student.order}) from {run['name']} by {mode}"
            + (f" ({race} iterations, then the better of the two forms goes on)" if race else "")
            + f"; start RMS to the teacher on the gradient's noises {run['start']:.4g}")
        run["best"] = _optimise(student, run["u"], run["delta"], run["form"], race or iterations, lr, mode, fit_idx,
                                sel_idx, calls, steps, penalty, tick, record=run)
    won = min(runs, key=lambda r: r["best"][0])
    if race:
        say(f"calibration: {won['name']} leads (RMS {won['best'][0]:.4g} against "
            f"{max(r['best'][0] for r in runs):.4g}); {iterations - race} more iterations")
        won["best"] = _optimise(student, *_resumed(won["best"]), won["form"], iterations - race, lr, mode, fit_idx,
                                sel_idx, calls, steps, penalty, tick)
    return won


def _resumed(best: tuple) -> tuple:
    """(u, delta) of an ``_optimise`` result as fresh leaves to optimise on from."""
    _, u, delta = best
    return u.clone().requires_grad_(True), \
        None if delta is None else {k: d.clone().requires_grad_(True) for k, d in delta.items()}


def _gradient_mode(gradient: str, student: _Student, u: Tensor, form: tuple, delta, fit_idx, s_min: float,
                   say) -> tuple[str, bool]:
    """(the way the fit gets its gradient, whether each model call is run again in the backward pass)."""
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient: must be one of {', '.join(map(repr, GRADIENTS))}, got {gradient!r}")
    if gradient == "spsa":
        return gradient, False
    student.begin_solve()
    recompute = gradient == "recompute"
    blocker = _call_blocker(student.denoiser, student.x0, 4 * s_min)
    if blocker is None:  # one call gives a gradient: does a solve's worth of calls?
        blocker = _gradient_blocker(lambda: student.loss(u, form, delta, fit_idx, recompute))
        if blocker is not None and blocker.startswith(_NO_MEMORY) and not recompute:
            say(f"calibration: {blocker}; running each model call again in the backward pass instead of keeping "
                "it")
            recompute = True
            blocker = _gradient_blocker(lambda: student.loss(u, form, delta, fit_idx, recompute))
    if blocker is None:
        return "autograd", recompute
    if gradient != "auto":
        raise KSamplerInputError(f"gradient: {gradient!r} needs a gradient through the model, and this model gives "
                                 f"none ({blocker}); use gradient='auto' or 'spsa'")
    say(f"calibration: the model gives no gradient here ({blocker}); fitting with SPSA (two evaluations per "
        "iteration) instead of autograd")
    return "spsa", False


def _check_noise(name: str, noise) -> None:
    if not isinstance(noise, Tensor) or noise.ndim < 2 or noise.shape[0] < 4:
        raise ValueError(f"{name}: expected a tensor [B, ...] with at least 4 fitting noises")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError(f"{name}: contains NaN or Inf")


# the most steps a calibration fits: the Calibrated Scheduler node's declared max (each step is a model call per
# fitting noise per iteration, forward and backward)
MAX_CALIBRATION_STEPS = 100


def _check_callables(**given) -> None:
    """A TypeError naming each given argument that is neither None nor callable."""
    for name, value in given.items():
        if value is not None and not callable(value):
            raise TypeError(f"{name}: expected a function (or None), got {type(value).__name__} {value!r}")


def _check_fit_args(noise, steps, order, refine_noise=None) -> None:
    check_int("steps", steps, 1, MAX_CALIBRATION_STEPS)
    check_int("order", order, 1, 4)
    _check_noise("noise", noise)
    if refine_noise is not None:
        _check_noise("refine_noise", refine_noise)
        if refine_noise.shape[1:] != noise.shape[1:]:
            raise ValueError(f"refine_noise: items shaped {tuple(refine_noise.shape[1:])}, but the fitting noise's are "
                             f"{tuple(noise.shape[1:])}; draw both for the same latent")
        if (refine_noise.dtype, refine_noise.device) != (noise.dtype, noise.device):
            raise ValueError(f"refine_noise: {refine_noise.dtype} on {refine_noise.device}, but the fitting noise is "
                             f"{noise.dtype} on {noise.device}; give both the same dtype and device")


def _fit_range(ms, sigma_min, sigma_max, teacher_sigma_min) -> tuple[float, float, float]:
    """(sigma_max, sigma_min, the teacher's sigma_min) of a fit, defaults from the model, checked."""
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("teacher_sigma_min", teacher_sigma_min)):
        if value is not None:  # a number, or a one-value tensor (the model sampling's own)
            check_float(name, value.item() if isinstance(value, Tensor) and value.numel() == 1 else value, 0.0,
                        math.inf)
    s_max = float(ms.sigma_max if sigma_max is None else sigma_max)
    s_min = float(ms.sigma_min if sigma_min is None else sigma_min)
    if not 0 < s_min < s_max:
        raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {s_min}, {s_max}")
    t_min = s_min if teacher_sigma_min is None else float(teacher_sigma_min)
    if not 0 < t_min <= s_min:
        raise ValueError(f"teacher_sigma_min: must be in (0, sigma_min={s_min}], got {teacher_sigma_min}")
    return s_max, s_min, t_min


def _descending_float32(sig: Tensor) -> Tensor:
    """The fitted sigmas in float32, nudged up where rounding would make them not strictly descending."""
    sig32 = sig.detach().to(torch.float32)
    for k in range(len(sig32) - 2, -1, -1):
        if sig32[k] <= sig32[k + 1]:
            sig32[k] = torch.nextafter(sig32[k + 1], torch.tensor(math.inf))
    return sig32


def fit_calibration(denoiser: Denoiser, model_sampling, noise: Tensor, steps: int, *, order: int = 3,
                    iterations: int = DEFAULT_FIT["iterations"], lr: float = DEFAULT_FIT["lr"],
                    fit_coefficients: bool = True, corrector: bool = DEFAULT_FIT["corrector"],
                    shift: bool = DEFAULT_FIT["shift"],
                    teacher_steps: int = DEFAULT_FIT["teacher_steps"], selection: str = DEFAULT_FIT["selection"],
                    coefficient_penalty: float = DEFAULT_FIT["coefficient_penalty"],
                    fit_last_step: bool = DEFAULT_FIT["fit_last_step"],
                    sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                    teacher_sigma_min: Optional[float] = None, max_denoise: bool = True, gradient: str = "auto",
                    refine_noise: Optional[Tensor] = None, refine_denoiser: Optional[Denoiser] = None,
                    refine_iterations: int = REFINE["iterations"], candidate_noise: Sequence[Tensor] = (),
                    candidate_denoisers: Optional[Sequence[Denoiser]] = None, refine_candidates: bool = False,
                    log: Optional[Callable[[str], None]] = None, info: Optional[dict] = None,
                    progress: Optional[Callable[[int, int], None]] = None,
                    solve_start: Optional[Callable[[], None]] = None,
                    on_spsa: Optional[Callable[[], None]] = None) -> Calibration:
    """Fit a step schedule (and multistep coefficients) to ``denoiser`` on ``noise`` (see the module docstring).

    denoiser: ``denoiser(x, sigma) -> denoised`` in the model's frame, guidance included (a CFG-guided
        denoiser fits to guided sampling); it must be differentiable in x for the coefficient fit.
    noise: unit-variance fitting noise [B, ...] (B >= 4; 8-64 is typical); never the noise you evaluate on.
    order: how many past denoised estimates each step may blend (1: schedule only, DDIM steps).
    corrector: also try a corrector (each model call corrects the step that led to it, as in UniPC, at no extra
        call), started from a no-op or from Adams-Moulton weights, whichever is better on the fitting noise; the
        forms with and without race for a third of the iterations, and the better one gets the rest (so a fit
        costs 4/3 of ``iterations``).
    shift: also fit the sigma at which the model is called in the steps ``SHIFTED_STEPS`` (the first, with no
        earlier estimate to blend, and the last, down to sigma 0), their states staying where they are (as in the
        time-shift sampler of Li et al. 2024), within [teacher_sigma_min, sigma_max].
    sigma_min, sigma_max: the range the schedule spans (default: the model's).
    teacher_sigma_min: where the teacher's fine solve stops and denoises (default sigma_min); lower it for a model
        that is valid below its sigma_min (an analytic one), so that the fit also learns the last stretch to 0.
    max_denoise: the start is scaled like ComfyUI's txt2img (sqrt(1 + sigma^2) for eps models); False: sigma.
    gradient: "autograd" (through the model), "recompute" (autograd keeping one model call's activations at a
        time: each call runs again in the backward pass, one more model call per step), "spsa" (derivative-free:
        two evaluations per iteration, for a model that gives no gradient) or "auto" (autograd when the model gives
        one, recomputing where keeping every call runs out of memory, else SPSA; it says which).
    refine_noise: more fitting noise [B', ...] (B' several times B; never the evaluation noise): the fit then
        continues on it (``REFINE``: its own teacher solve, then ``REFINE["iterations"]`` iterations at a smaller
        step size), keeping the iterate best on it, the unrefined one included.
    refine_denoiser: the denoiser for ``refine_noise``'s batch where it differs from ``denoiser`` (one bound to
        its batch, such as per-item labels); default ``denoiser``.
    refine_iterations: the refinement's iterations (default ``REFINE["iterations"]``).
    candidate_noise: more fitting sets, each shaped like ``noise`` (needs ``refine_noise``): each is fitted as
        ``noise`` is, and the fit with the lowest RMS on the refining noise is the one refined.  Fits from
        different fitting noise can end in different local optima; the larger set tells them apart.
    candidate_denoisers: the denoiser of each candidate set where it differs from ``denoiser``.
    refine_candidates: refine every candidate fit and keep the one best on the refining noise after its
        refinement (each candidate then costs a refinement too).
    selection: which noises pick the iterate kept (of each phase, and the form that wins the race): "all" the
        fitting noises, or "held_aside": only the quarter that the gradient never sees.
    coefficient_penalty: shrinks the coefficient corrections towards the Adams weights (``_penalised``; 0: none).
    fit_last_step: False keeps the step into sigma 0 on the newest estimate alone (its call may still shift), so
        that it does not extrapolate the denoised estimate to sigma 0.
    progress: ``progress(done, total)`` before each optimiser iteration, counted over the whole fit (candidates
        and refinements included): for a progress bar, or to stop the fit by raising (the host's interrupt).
    solve_start: called before each solve from the start noise through the model (the teacher's, and each run of
        the fitted sampler): for a model that keeps state from call to call within a sample, to reset it as a new
        sample would (ComfyUI's hook keyframes step on as the sigmas fall).
    on_spsa: called once where the fit turns to SPSA (from the start or mid-fit): to free what was set up for a
        gradient (ComfyUI: the copies of the model's weights).
    """
    _check_fit_args(noise, steps, order, refine_noise)
    check_int("iterations", iterations, 0, 100_000)
    check_int("teacher_steps", teacher_steps, 10, 10_000)  # fewer than 10 is no fine solve
    lr = check_float("lr", lr, 0.0, math.inf)
    _check_callables(denoiser=denoiser, refine_denoiser=refine_denoiser, log=log, progress=progress,
                     solve_start=solve_start)
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info: expected a dict (or None), got {type(info).__name__}")
    try:  # what the fit keeps of it must pass the calibration's checks: found now, not after the fit
        _check_info(info or {}, None, None, None)
    except ValueError as exc:
        raise KSamplerInputError(f"info: {str(exc).replace('calibration: ', '', 1)}") from None
    candidate_noise = list(candidate_noise)
    for i, extra in enumerate(candidate_noise):
        _check_noise(f"candidate_noise[{i}]", extra)
        if (extra.shape, extra.dtype, extra.device) != (noise.shape, noise.dtype, noise.device):
            raise ValueError(f"candidate_noise[{i}]: must be shaped like the fitting noise {tuple(noise.shape)} "
                             f"({noise.dtype} on {noise.device}), got {tuple(extra.shape)} ({extra.dtype} on "
                             f"{extra.device})")
    if candidate_noise and refine_noise is None:
        raise ValueError("candidate_noise: the candidates are told apart on the refining noise; pass refine_noise")
    if candidate_denoisers is not None and len(candidate_denoisers) != len(candidate_noise):
        raise ValueError(f"candidate_denoisers: one per candidate_noise set ({len(candidate_noise)}), got "
                         f"{len(candidate_denoisers)}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection: must be one of {', '.join(map(repr, SELECTIONS))}, got {selection!r}")
    coefficient_penalty = check_float("coefficient_penalty", coefficient_penalty, 0.0, math.inf)
    refine_iterations = check_int("refine_iterations", refine_iterations, 0, 100_000)
    ms, say, t_start = model_sampling, log or (lambda msg: None), time.perf_counter()
    calls = {"forward": 0, "backward_passes": 0}
    fits_planned = 1 + len(candidate_noise)
    refinements = 0 if refine_noise is None else (fits_planned if refine_candidates and fits_planned > 1 else 1)
    plan = {"done": 0, "total": None}

    def tick() -> None:
        plan["done"] += 1
        if progress is not None:
            progress(plan["done"], max(plan["total"], plan["done"]))

    def counting(model: Denoiser) -> Denoiser:
        def counted(x, sigma, **kw):
            calls["forward"] += 1
            return model(x, sigma, **kw)
        return counted

    s_max, s_min, t_min = _fit_range(ms, sigma_min, sigma_max, teacher_sigma_min)
    hi, lo = _ve_bounds(ms, s_max, s_min)

    def student_on(model: Denoiser, batch: Tensor) -> _Student:
        x0 = ms.noise_scaling(torch.tensor(s_max, dtype=batch.dtype), batch, torch.zeros_like(batch), max_denoise)
        if solve_start is not None:
            solve_start()
        teacher = teacher_solve(model, ms, x0, s_max, t_min, teacher_steps).to(batch.dtype)
        return _Student(model, ms, x0, teacher, s_max, hi, lo, order, t_min, solve_start)

    def gradient_items(batch: Tensor) -> slice:  # the gradient's items: all but the first quarter
        return slice(max(1, batch.shape[0] // 4), None)

    def selection_items(batch: Tensor) -> slice:  # the items that pick the iterate
        return slice(None) if selection == "all" else slice(0, max(1, batch.shape[0] // 4))

    fit_idx, mode = gradient_items(noise), None

    def fit_on(model: Denoiser, batch: Tensor) -> tuple[_Student, dict, int]:
        nonlocal mode
        student = student_on(counting(model), batch)
        runs = [_run(start, steps, order, order > 1 and fit_coefficients, shift, fit_last_step)
                for start in _starts(student, ms, steps, hi, lo, fit_idx, corrector)]
        if mode is None:
            mode = _Gradient(*_gradient_mode(gradient, student, runs[0]["u"], runs[0]["form"], runs[0]["delta"],
                                             fit_idx, s_min, say), say, on_spsa)
        race = iterations // 3 if len(runs) > 1 else 0
        if plan["total"] is None:  # the later fits are planned alike (their forms' count may differ by one)
            per_fit = len(runs) * (race or iterations) + (iterations - race if race else 0)
            plan["total"] = fits_planned * per_fit + refinements * refine_iterations
        return student, _race(student, runs, race, iterations, lr, mode, (fit_idx, selection_items(batch)), calls,
                               steps, say, coefficient_penalty, tick), race

    student, won, race = fit_on(denoiser, noise)
    final, u, delta = won["best"]  # its loss is already measured on the selection's noises
    refined = candidate_rms = None
    if refine_noise is not None:
        larger = student_on(counting(refine_denoiser or denoiser), refine_noise)

        def refine(fitted: dict) -> tuple:
            say(f"calibration: refining on {refine_noise.shape[0]} more noises ({refine_iterations} iterations)")
            return _optimise(larger, *_resumed(fitted["best"]), fitted["form"], refine_iterations, REFINE["lr"],
                             mode, gradient_items(refine_noise), selection_items(refine_noise), calls, steps,
                             coefficient_penalty, tick)
        fits = [(student, won, race)] + [fit_on(model, batch) for model, batch in
                                         zip(candidate_denoisers or [denoiser] * len(candidate_noise),
                                             candidate_noise)]
        pick, results = 0, None
        if len(fits) > 1:
            if refine_candidates:
                results = [refine(w) for _, w, _ in fits]
                candidate_rms = [r[0] for r in results]
            else:
                with torch.no_grad():
                    candidate_rms = [float(larger.loss(w["best"][1], w["form"], w["best"][2],
                                                       selection_items(refine_noise))) for _, w, _ in fits]
            pick = min(range(len(fits)), key=lambda i: (not math.isfinite(candidate_rms[i]), candidate_rms[i]))
            say(f"calibration: {len(fits)} fits from different fitting noise; on the refining noise their RMS is "
                + ", ".join(f"{v:.4g}" for v in candidate_rms) + f"{' refined' if refine_candidates else ''}; "
                f"fit {pick + 1} " + ("is kept" if refine_candidates else "goes on"))
        student, won, race = fits[pick]
        final = won["best"][0]
        refined = results[pick] if results is not None else refine(won)
        _, u, delta = refined
    with torch.no_grad():
        sig, c, cc, shifts = student.parameters(u, won["form"], delta)
    shifts = None if shifts is None or not bool(shifts.any()) else shifts.detach().to(torch.float64)
    seconds = time.perf_counter() - t_start
    meta = dict(info or {})
    meta.update({"steps": steps, "order": order, "init": won["name"], "corrector": cc is not None, "race": race,
                 "fit_coefficients": "predictor" in (won["delta"] or {}), "shift": shifts is not None,
                 "iterations": iterations, "lr": lr, "selection": selection,
                 "coefficient_penalty": coefficient_penalty, "fit_last_step": bool(fit_last_step),
                 "teacher_steps": teacher_steps, "teacher_sigma_min": t_min, "fit_noises": int(noise.shape[0]),
                 "gradient": "autograd, then spsa" if mode.ran_out else mode.name, "recompute": mode.recompute,
                 "model_calls": calls["forward"], "backward_passes": calls["backward_passes"],
                 "seconds": round(seconds, 3), "rms_start": won["start_selected"], "rms_fitted": final,
                 "sigma_min": s_min, "sigma_max": s_max, "model_sampling": model_sampling_record(ms)})
    if candidate_rms is not None:
        meta.update({"candidates": len(candidate_rms), "candidate_rms": candidate_rms,
                     "refine_candidates": bool(refine_candidates)})
    if refined is not None:
        meta.update({"refine_noises": int(refine_noise.shape[0]), "refine_iterations": refine_iterations,
                     "refine_lr": REFINE["lr"], "rms_refined": refined[0]})
    say(f"calibration: done in {seconds:.1f}s, {calls['forward']} model calls + {calls['backward_passes']} "
        f"backward passes; RMS to the teacher {won['start_selected']:.4g} -> {final:.4g}"
        + ("" if refined is None else f" (on the {refine_noise.shape[0]} refining noises: {refined[0]:.4g})"))
    cal = Calibration(_descending_float32(sig), c.detach().to(torch.float64), meta,
                      None if cc is None else cc.detach().to(torch.float64), shifts)
    cal.validate()
    return cal


# ---- fitting once: keys, the cache, files ------------------------------------------------------
FIT_SALT = 0x5EEDCA11B  # the fitting noise stream: never the KSampler's noise of the same seed
_CACHE: "dict[str, Calibration]" = {}


def default_log(msg: str) -> None:
    print(msg, flush=True)


def model_token(model) -> str:
    """A stable identity for a model object in this process: a token attached to its network, and for a ComfyUI
    ModelPatcher a digest of its weight patches (LoRAs: a sample of their values, as in ``model_fingerprint``).
    Not the patcher's ``patches_uuid``: ComfyUI draws that anew each time a sample registers hook patches, the
    model unchanged, so a conditioning with hooks would refit at every run."""
    target = getattr(model, "model", model) if hasattr(model, "get_model_object") else model
    token = getattr(target, "_ksampler_calibration_token", None)
    if token is None:
        import uuid
        token = uuid.uuid4().hex
        try:
            setattr(target, "_ksampler_calibration_token", token)
        except AttributeError as exc:
            raise ValueError(f"model: cannot tag a {type(target).__name__} for the calibration cache") from exc
    patches = getattr(model, "patches", None) if hasattr(model, "get_model_object") else None
    if not patches:
        return token
    import hashlib
    h = hashlib.sha1()
    _digest_walk(h, patches, _fingerprint_leaf)
    return f"{token}/{h.hexdigest()}"


def _digest_walk(h, value, leaf: Callable) -> None:
    """Feed ``value`` into the digest ``h``: dicts (by sorted key), lists and tuples item by item, each other value
    through ``leaf(h, value, walk)`` (``walk`` feeds a nested value the same way)."""
    def walk(v):
        if isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for item in v:
                walk(item)
            h.update(b"]")
        else:
            leaf(h, v, walk)
    walk(value)


def conditioning_digest(conditioning, in_process: bool = False) -> str:
    """A digest of ComfyUI-style conditioning ([[tensor, {options}], ...]) by content, the same in another
    process: tensors by their values, numbers and strings by repr, other objects (a ControlNet, say) as
    ``_content_walk`` feeds them.  ``in_process``: a model patcher in it (GLIGEN's) also counts by its
    ``model_token``, which tells models apart in this process only."""
    import hashlib
    h = hashlib.sha1()

    def leaf(h, v, walk):
        if isinstance(v, Tensor):
            t = v.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        elif not isinstance(v, _PLAIN):
            _content_walk(h, v, in_process)
        else:
            h.update(repr(v).encode())
    _digest_walk(h, conditioning, leaf)
    return h.hexdigest()


def calibration_key(model, positive, negative, latent_shape, steps: int, cfg: float, settings: dict,
                    by_content: bool = False) -> Optional[str]:
    """The cache key: model, conditioning, latent shape, sampler settings, steps and cfg.  The model is this
    process's object (``model_token``), or with ``by_content`` its weights (``model_fingerprint``: the same in
    another process, for calibration files; None for a model without weights).  The conditioning counts by
    content either way: an object's address names it only while it lives, and the next one (a ControlNet copied
    for another hint image) may get the same address; a model patcher in it also by its ``model_token``."""
    import hashlib
    model_id = model_fingerprint(model) if by_content else model_token(model)
    if model_id is None:
        return None
    state = patcher_state_digest(model)
    if state is not None:
        model_id += "+" + state
    parts = [model_id, conditioning_digest(positive, not by_content), conditioning_digest(negative, not by_content),
             str(tuple(latent_shape[1:])), str(int(steps)), repr(float(cfg)), json.dumps(settings, sort_keys=True)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def calibration_keys(model, positive, negative, latent_shape, steps: int, cfg: float,
                     settings: dict) -> tuple[str, Callable[[], Optional[str]]]:
    """``calibration_key`` for the in-memory cache, and a function giving the key by content for files (computed
    only when a file is used)."""
    def file_key() -> Optional[str]:
        return calibration_key(model, positive, negative, latent_shape, steps, cfg, settings, by_content=True)
    return calibration_key(model, positive, negative, latent_shape, steps, cfg, settings), file_key


def _fingerprint_leaf(h, value, walk, samples: int = 16) -> None:
    """A model's value for ``_digest_walk``: a tensor by shape, dtype and ``samples`` evenly spaced values, a weight
    adapter (ComfyUI's LoRA patches) by its tensors, a number or string by repr, anything else by its type."""
    if isinstance(value, Tensor):
        flat = value.detach().reshape(-1)
        h.update(f"{tuple(value.shape)}{value.dtype}".encode())
        if flat.numel():
            index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
            h.update(flat[index].to("cpu", torch.float64).numpy().tobytes())
    elif hasattr(value, "weights"):
        h.update(type(value).__name__.encode())
        walk(value.weights)
    else:
        h.update(repr(value).encode() if isinstance(value, (int, float, str, bool, type(None))) else
                 type(value).__name__.encode())


_UNREADABLE = (RuntimeError, TypeError, NotImplementedError)  # reading tensors that hold no plain values


def _feed_weights(h, network, backup: Optional[dict] = None) -> None:
    """Feed each of ``network``'s weights into the digest ``h`` by name, as ``_fingerprint_leaf`` (a sample of its
    values); for a weight the host has patched in place, its original from ``backup`` (ComfyUI's
    ModelPatcher.backup).  Raises one of ``_UNREADABLE`` for weights whose values cannot be read."""
    for name, tensor in sorted(network.state_dict().items()):
        original = (backup or {}).get(name)
        h.update(name.encode())
        _digest_walk(h, getattr(original, "weight", original) if original is not None else tensor, _fingerprint_leaf)


def model_fingerprint(model) -> Optional[str]:
    """A digest of a model's content, the same for the same weights in any process: its weights (a sample of each
    tensor's values), its model sampling, and for a ComfyUI ModelPatcher its patches (LoRAs and the like), with the
    original value of any weight the host has patched in place.  None for a model without weights (state_dict) or
    with weights it cannot read as values: its files then load in the process that wrote them only."""
    import hashlib
    patcher = hasattr(model, "get_model_object")
    target = getattr(model, "model", model) if patcher else model
    if not callable(getattr(target, "state_dict", None)):
        return None  # nothing to identify it by: its files load in this process only (by model_token)
    h = hashlib.sha1()
    try:
        _feed_weights(h, target, getattr(model, "backup", None) or {})
    except _UNREADABLE:  # weights that cannot be read as values (quantised)
        return None
    ms = model.get_model_object("model_sampling") if patcher else getattr(model, "model_sampling", None)
    h.update(type(ms).__name__.encode())
    for attribute in ("sigma_min", "sigma_max", "shift", "multiplier"):
        value = getattr(ms, attribute, None)
        if isinstance(value, (int, float, Tensor)):
            h.update(f"{attribute}={float(value):.9g}".encode())
    if patcher:
        _digest_walk(h, getattr(model, "patches", None) or {}, _fingerprint_leaf)
    return h.hexdigest()


# what a ComfyUI ModelPatcher carries besides its network and weight patches that changes what the model computes:
# model_options (FreeU, PAG, CFG functions, attention replacements), object patches (ModelSamplingDiscrete and
# the like), wrappers, hooks, injections
PATCHER_STATE = ("model_options", "object_patches", "weight_wrapper_patches", "wrappers", "callbacks", "injections",
                 "hook_patches", "forced_hooks")
# what ComfyUI's hook keyframes note on themselves as a sample runs (where the sample is; each keyframe's start_t,
# worked out from its start_percent and the model when a sample starts), by class: not what they compute
SAMPLE_STATE = {"HookKeyframeGroup": frozenset({"_current_keyframe", "_current_used_steps", "_current_index",
                                                 "_current_strength", "_curr_t", "curr_t"}),
                "HookKeyframe": frozenset({"start_t"})}
_STATE_DEPTH, _STATE_NODES = 12, 20_000
_PLAIN = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)


def _empty(value, depth: int = 0) -> bool:
    """True for a dict, list or tuple holding nothing but such empty ones (checked to a depth)."""
    if not isinstance(value, (dict, list, tuple)):
        return False
    if depth > _STATE_DEPTH:
        return False
    return all(_empty(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def _cell(cell):
    """A closure cell's value (None while the cell is empty)."""
    try:
        return cell.cell_contents
    except ValueError:
        return None


def _content_walk(h, value, in_process: bool = False) -> None:
    """Feed ``value`` into the digest ``h`` by content, the same in any process: dicts by sorted key and sequences
    item by item (empty ones skipped), functions by name and the values they close over, other objects by their
    classes and their attributes (None ones skipped: unset and cleared are the same; devices and the
    ``SAMPLE_STATE`` of ComfyUI's hook keyframes skipped), a network
    (``torch.nn.Module``) by its class and its weights only (a sample of each tensor's values, as in
    ``model_fingerprint``; not the attributes the host sets on it when it loads it), tensors by their bytes (a
    parameter, and tensors over 2**24 values: a sample; one whose values cannot be read, by its identity in this
    process).  A model patcher met inside counts by its class only (``in_process``: and its ``model_token``), and
    the walk stops at a depth and a size."""
    import functools
    import types
    seen: dict = {}  # id -> the object, kept alive: a freed temporary's id may be reused by the next one
    budget = [_STATE_NODES]

    def classes(v) -> bytes:
        return ">".join(c.__qualname__ for c in type(v).__mro__).encode()

    def walk(v, depth: int) -> None:
        budget[0] -= 1
        if isinstance(v, _PLAIN):
            h.update(repr(v).encode())
        elif isinstance(v, Tensor):
            try:
                if isinstance(v, torch.nn.Parameter) or v.numel() > 1 << 24:
                    _fingerprint_leaf(h, v, None)
                else:
                    t = v.detach().to("cpu").contiguous()
                    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            except _UNREADABLE:  # values it cannot read (meta, quantised):
                h.update(f"{classes(v)!r}@{id(v)}".encode())  # this object, in this process only
        elif isinstance(v, type):
            h.update(f"type:{v.__module__}.{v.__qualname__}".encode())
        elif depth > _STATE_DEPTH or budget[0] < 0 or id(v) in seen or hasattr(v, "get_model_object"):
            h.update(classes(v))
            if in_process and hasattr(v, "get_model_object"):
                h.update(model_token(v).encode())
        else:
            seen[id(v)] = v
            if isinstance(v, torch.nn.Module):  # a network by its weights, not what the host notes on it
                h.update(classes(v))
                try:
                    _feed_weights(h, v)
                except _UNREADABLE:
                    h.update(f"@{id(v)}".encode())  # weights it cannot read: this object, in this process only
            elif isinstance(v, dict):  # empty entries skipped: {} and {"patches": {}} are the same options
                for k in sorted(v, key=repr):
                    if not _empty(v[k]):
                        h.update(repr(k).encode())
                        walk(v[k], depth + 1)
            elif isinstance(v, (list, tuple, set, frozenset)):
                h.update(b"[")
                for item in (sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v):
                    if not _empty(item):
                        walk(item, depth + 1)
                h.update(b"]")
            elif isinstance(v, types.FunctionType):
                h.update(f"fn:{v.__module__}.{v.__qualname__}:{v.__code__.co_firstlineno}".encode())
                walk([v.__defaults__, v.__kwdefaults__, [_cell(c) for c in v.__closure__ or ()]], depth + 1)
            elif isinstance(v, types.MethodType):
                walk([v.__func__, v.__self__], depth + 1)
            elif isinstance(v, functools.partial):
                walk([v.func, v.args, v.keywords], depth + 1)
            else:
                h.update(classes(v))
                if callable(v) and hasattr(v, "__qualname__"):  # a builtin function, a class's method
                    h.update(f"{getattr(v, '__module__', '')}.{v.__qualname__}".encode())
                attributes = getattr(v, "__dict__", None)
                if isinstance(attributes, dict):  # where it runs is not what it computes: devices skipped
                    noted = SAMPLE_STATE.get(type(v).__name__, ())
                    walk({k: a for k, a in attributes.items()
                          if a is not None and not isinstance(a, torch.device) and k not in noted}, depth + 1)
    walk(value, 0)


def patcher_state_digest(model) -> Optional[str]:
    """A digest of what a ComfyUI ModelPatcher adds to its network besides weight patches (``PATCHER_STATE``), by
    content (``_content_walk``): the same for a clone (ComfyUI deep-copies model_options) and in another process.
    None where there is nothing (a plain checkpoint; empty dicts and lists count as nothing), so that such a
    model's keys are the ones they always were."""
    import hashlib
    state = {name: getattr(model, name) for name in PATCHER_STATE if getattr(model, name, None) is not None}
    if _empty(state):
        return None
    h = hashlib.sha1()
    _content_walk(h, state)
    return h.hexdigest()


def fitting_noise(seed: int, count: int, shape, dtype=torch.float32, stream: int = 0) -> Tensor:
    """``count`` unit noises shaped like one latent item, from the salted fitting stream of ``seed`` (``stream`` 1:
    a second stream, apart from the first, for the refining noise; 2 and up: the other candidate fits')."""
    gen = torch.Generator().manual_seed(((int(seed) ^ FIT_SALT) + int(stream) * 0x9E3779B97F4A7C15) % (1 << 63))
    return torch.randn((count,) + tuple(shape), generator=gen, dtype=dtype)


def cached_calibration(key: str, fit: Callable[[], Calibration], path: Optional[str] = None,
                       log: Callable[[str], None] = default_log, settings: Optional[dict] = None,
                       file_key: Optional[Callable[[], Optional[str]]] = None, steps: Optional[int] = None,
                       cfg: Optional[float] = None) -> Calibration:
    """The calibration for ``key``: from memory, else from ``path`` (checked to be for the same inputs), else fitted
    (once, saying so) and stored in memory and at ``path``.  ``settings``: the fit's settings in the key, named
    in the error when the file's differ.  ``file_key``: the key by the model's content (``calibration_key(...,
    by_content=True)``), computed only with a ``path``, so that a file fitted in another process (after a restart)
    loads for the same model and inputs.  ``steps``, ``cfg``: what the call asks for, which a file's own tensors
    and info must hold too (a file edited under its key is refused, not sampled at another step count)."""
    import os
    cal = _CACHE.get(key)
    if cal is not None:
        log(f"calibration: reusing the fitted schedule ({cal.steps} steps, key {key[:10]})")
        if path and os.path.exists(path):  # the file must still be this calibration's, as on a cache miss
            _load_matching(path, (key, cal.info.get("key")), file_key, settings, steps, cfg)
        elif path:  # fitted before a file was asked for: write it now
            _save(cal, path, file_key() if file_key is not None else None, log)
        return cal
    content_key = file_key() if (path and file_key is not None) else None  # the inputs as given, before a fit
    if path and os.path.exists(path):
        cal = _load_matching(path, (key,), lambda: content_key, settings, steps, cfg)
        log(f"calibration: loaded {path}")
        _CACHE[key] = cal
        return cal
    log(f"calibration: fitting once for these inputs (key {key[:10]}) ...")
    cal = fit()
    cal.info["key"] = key
    _CACHE[key] = cal
    if path:
        _save(cal, path, content_key, log)
    return cal


def _load_matching(path: str, keys: tuple, file_key: Optional[Callable[[], Optional[str]]],
                   settings: Optional[dict], steps: Optional[int] = None, cfg: Optional[float] = None) -> Calibration:
    """The calibration in ``path`` when it was fitted under one of ``keys`` (this process's key; on a cache hit
    also the cached calibration's own, which a file loaded from another process keeps), or for the content key
    ``file_key()`` (computed only when those differ), and holds ``steps`` steps at ``cfg`` (where given); else a
    ValueError naming calibration_file and the settings that differ."""
    cal = Calibration.load(path, name="calibration_file")
    if cal.info.get("key") in [k for k in keys if k is not None]:
        return _requested(cal, path, steps, cfg)
    content_key = file_key() if file_key is not None else None
    if content_key is not None and cal.info.get("file_key") == content_key:
        return _requested(cal, path, steps, cfg)
    differ = [f"{name}={cal.info[name]!r} (this call: {value!r})" for name, value in (settings or {}).items()
              if name in cal.info and cal.info[name] != value]
    if differ:
        raise ValueError(f"calibration_file: {path!r} was fitted with other settings: {', '.join(differ)}; "
                         "pass the file's settings to use it, or delete it to fit anew")
    raise ValueError(f"calibration_file: {path!r} holds a calibration fitted for other inputs (model, "
                     "conditioning, steps, cfg or settings); delete it or choose another file name")


def _requested(cal: Calibration, path: str, steps: Optional[int], cfg: Optional[float]) -> Calibration:
    """``cal`` (loaded from ``path`` under this call's key) when it holds ``steps`` steps at ``cfg``, else a
    ValueError naming calibration_file: the key matched, so the file was edited or damaged."""
    fitted_cfg = cal.info.get("cfg")
    if steps is not None and cal.steps != steps:
        found = f"{cal.steps} steps"
    elif cfg is not None and fitted_cfg is not None and not math.isclose(fitted_cfg, cfg, rel_tol=1e-6, abs_tol=1e-9):
        found = f"cfg {fitted_cfg:g}"
    else:
        return cal
    asked = " at ".join(part for part in (f"{steps} steps" if steps is not None else "",
                                          f"cfg {cfg:g}" if cfg is not None else "") if part)
    raise KSamplerInputError(f"calibration_file: {path!r} is keyed for this call ({asked}) but holds a calibration "
                             f"for {found} (edited or damaged); delete it to fit anew")


def _save(cal: Calibration, path: str, content_key: Optional[str], log: Callable[[str], None]) -> None:
    """Write ``cal`` to ``path`` with the key by the model's content (for other processes), if it has one."""
    if content_key is not None:
        cal.info["file_key"] = content_key
    cal.save(path, name="calibration_file")
    log(f"calibration: saved {path}")


def check_calibration_path(name: str, path) -> str:
    """A calibration file to load or write (``name``: the input): a .safetensors path (str or os.PathLike) in a
    folder that exists, naming a file or nothing yet (then in a folder where one can be written).  Returns it as
    a str."""
    import os
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise KSamplerInputError(f"{name}: expected a file path (str), got {type(path).__name__} {path!r}")
    if "\x00" in path:
        raise KSamplerInputError(f"{name}: {path!r} contains a NUL character, which no file name may hold; remove it")
    if not path.endswith(".safetensors"):
        raise KSamplerInputError(f"{name}: {path!r} must end in .safetensors")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise KSamplerInputError(f"{name}: folder {folder!r} does not exist; create it first")
    if os.path.exists(path):
        if not os.path.isfile(path):
            what = "a folder" if os.path.isdir(path) else "not a regular file"
            raise KSamplerInputError(f"{name}: {path!r} is {what}; give the path of a calibration file (or of one "
                                     "to write)")
    else:  # a fit would write it: find out now whether a file can be written there, not after the fit
        import tempfile
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".ksampler-probe-", suffix=".safetensors"):
                pass
        except OSError as exc:
            raise KSamplerInputError(f"{name}: cannot write a new file in {folder!r} ({exc.strerror or exc}); choose "
                                     "a folder you can write to") from None
    return path


def check_fit_batches(positive, negative, latent_shape, fit_noises: int, refine_noises: int = 0) -> None:
    """A fit samples ``fit_noises`` (and ``refine_noises``) noises of one latent at once, so the conditioning's
    masks must repeat over those batches as over a latent batch (``check_regions``); the error says why."""
    from .conditioning.cfg import check_regions
    for batch in sorted({fit_noises, refine_noises} - {0}):
        shape = (batch,) + tuple(latent_shape[1:])
        try:
            check_regions(positive, "positive", shape)
            check_regions(negative or [], "negative", shape)
        except KSamplerInputError as exc:
            raise KSamplerInputError(f"{exc} (a calibration fits {batch} noises of the latent at once: fit_noises, "
                                     "refine_noises)") from None


def clear_cache() -> None:
    _CACHE.clear()


def fit_settings(order: int, fit_noises: int, seed: int, iterations: int, teacher_steps: int,
                 refine_noises: int = 0, fit_candidates: int = 1) -> dict:
    """The settings of a ``calibrate`` fit (ours or the host's), checked, as they go into the cache key.  The
    bounds are the Calibrated Scheduler node's, but order 4 (``fit_calibration``'s) and refining sets up to 4,096
    noises (those of the studies in the README) for Python callers."""
    check_int("order", order, 1, 4)
    check_int("fit_noises", fit_noises, 4, 256)
    check_int("seed", seed, 0, MAX_SEED)
    check_int("iterations", iterations, 0, 5000)
    check_int("teacher_steps", teacher_steps, 10, 1000)
    check_int("refine_noises", refine_noises, 0, 4096)
    if 0 < refine_noises < 4:
        raise KSamplerInputError(f"refine_noises: expected 0 (no refinement) or at least 4, got {refine_noises!r}")
    check_int("fit_candidates", fit_candidates, 1, 4)
    if fit_candidates > 1 and not refine_noises:
        raise ValueError(f"fit_candidates: {fit_candidates} fits are told apart on the refining noises; set "
                         "refine_noises (e.g. 8 times fit_noises) or fit_candidates to 1")
    settings = {"order": order, "fit_noises": fit_noises, "seed": seed, "iterations": iterations,
                "teacher_steps": teacher_steps}
    if refine_noises:  # only then in the key, so that the files of unrefined calibrations keep theirs
        settings.update({"refine_noises": refine_noises, "refine": dict(REFINE)})
    if fit_candidates > 1:  # likewise
        settings["fit_candidates"] = fit_candidates
    return settings


def candidate_fitting_noise(seed: int, settings: dict, shape) -> list:
    """The fitting noise of each candidate fit after the first (``fit_candidates`` - 1 sets, from streams of
    ``seed`` of their own, apart from the fitting and the refining noise)."""
    return [fitting_noise(seed, settings["fit_noises"], shape, stream=1 + k)
            for k in range(1, settings.get("fit_candidates", 1))]


def calibrate(model, positive, negative, latent: dict, steps: int, cfg: float, *, order: int = 3,
              fit_noises: int = 8, seed: int = 0, iterations: int = DEFAULT_FIT["iterations"],
              teacher_steps: int = DEFAULT_FIT["teacher_steps"], refine_noises: int = 0, fit_candidates: int = 1,
              path: Optional[str] = None, log: Callable[[str], None] = default_log,
              progress: Optional[Callable[[int, int], None]] = None) -> Calibration:
    """Fit (once; cached per model, conditioning, latent shape, steps, cfg and settings) a calibration for one of
    our models (``models.DiffusionModel``) sampling txt2img with this conditioning.

    Use it with ``ksample(..., calibration=cal)`` or ``sample(..., sigmas=cal.sigmas, sampler=cal.sampler())``.
    ``path``: a .safetensors file to load the calibration from (if it exists and is for these inputs) or save
    it to.  The fitting noise comes from a stream of ``seed`` salted apart from the sampling noise.
    ``refine_noises``: that many more fitting noises (from a second stream), on which the fit is refined
    (``fit_calibration``'s ``refine_noise``; several times ``fit_noises`` to see rare noises; 0: none).
    ``fit_candidates``: with ``refine_noises``, that many fits from fitting noises of their own, each refined, and
    the one best on the refining noises kept (``fit_calibration``'s ``refine_candidates``; it costs that many
    fits).  ``progress``: ``fit_calibration``'s (a fit's iterations as they go; raise from it to stop the fit).
    """
    from .conditioning.cfg import Guidance
    from .validation import check_latent, check_model

    check_model(model)
    samples, _, _ = check_latent(latent, model.latent_format.latent_channels,
                                 dims=getattr(model.latent_format, "latent_dimensions", 2) + 2)
    steps, cfg, path = check_fit_request(steps, cfg, path, log=log, progress=progress)
    log = log or _silent
    settings = fit_settings(order, fit_noises, seed, iterations, teacher_steps, refine_noises, fit_candidates)
    from .graph_checks import check_graph, headless_spec
    check_graph(headless_spec(model), positive, negative, latent, cfg)  # what our KSampler checks, before the fit
    check_fit_batches(positive, negative, samples.shape, fit_noises, refine_noises)
    key, file_key = calibration_keys(model, positive, negative, samples.shape, steps, cfg, settings)

    def fit() -> Calibration:
        ms = model.model_sampling
        device = getattr(model, "device", torch.device("cpu"))
        guidance = Guidance(positive, negative, cfg)
        noise = fitting_noise(seed, fit_noises, samples.shape[1:]).to(device)
        guided = guidance.bind(model, ms, noise.shape, device)
        refine_noise = refine_guided = None
        if refine_noises:
            refine_noise = fitting_noise(seed, refine_noises, samples.shape[1:], stream=1).to(device)
            refine_guided = guidance.bind(model, ms, refine_noise.shape, device)
        return fit_calibration(guided, ms, noise, steps, order=order, iterations=iterations,
                               teacher_steps=teacher_steps, refine_noise=refine_noise,
                               refine_denoiser=refine_guided, refine_candidates=True,
                               candidate_noise=[n.to(device) for n in
                                                candidate_fitting_noise(seed, settings, samples.shape[1:])],
                               log=log, info={"cfg": float(cfg), **settings}, progress=progress)
    return cached_calibration(key, fit, path, log, settings, file_key, steps, cfg)


def _silent(message: str) -> None:
    """A log that says nothing (``log=None``)."""


def check_fit_request(steps, cfg, path, **functions) -> tuple:
    """(steps, cfg, path) of a ``calibrate`` call (ours or the host's), checked before any fit: steps and cfg within
    the Calibrated Scheduler node's bounds, the file (if any) as ``check_calibration_path`` wants it under the
    name ``path``, and ``functions`` (log, progress) callable or None."""
    check_int("steps", steps, 1, MAX_CALIBRATION_STEPS)
    cfg = check_float("cfg", cfg, 0.0, 100.0)  # the node's bounds, as validation.check_sampler_args
    _check_callables(**functions)
    return steps, cfg, None if path is None else check_calibration_path("path", path)


def run_sigmas(calibration: "Calibration", steps: int, cfg: float, denoise: float = 1.0,
               model_sampling=None) -> Tensor:
    """The sigmas a KSampler run uses with ``calibration``, after checking that it is a whole calibration and that
    the run is the one it was fitted for (and, given the run's ``model_sampling``, on that model sampling; the
    calibration's sampler checks that too when it runs)."""
    if not isinstance(calibration, Calibration):
        raise ValueError(f"calibration: expected a Calibration (from the Calibrated Scheduler node or "
                         f"ksampler.calibration.calibrate), got {type(calibration).__name__}")
    calibration.validate()
    check_model_sampling(calibration, model_sampling)
    if int(steps) != calibration.steps:
        raise ValueError(f"steps: the calibration was fitted for {calibration.steps} steps, the run asks for {steps}; "
                         f"set steps to {calibration.steps} or fit a calibration for {steps}")
    fitted_cfg = calibration.info.get("cfg")
    if fitted_cfg is not None and not math.isclose(float(fitted_cfg), float(cfg), rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(f"cfg: the calibration was fitted at cfg {fitted_cfg:g}, the run uses {float(cfg):g}; "
                         "use the same cfg or fit a calibration for this one")
    if not math.isclose(float(denoise), 1.0):
        raise ValueError(f"denoise: calibrations are fitted for txt2img (denoise 1.0), got {denoise}; set denoise to "
                         "1.0 or disconnect the calibration")
    return calibration.sigmas.clone()
