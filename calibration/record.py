"""``Calibration``: a fit's sigmas, coefficients and info; its safetensors file and the checks on what it holds
and on the model it runs on."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from ..samplers.traits import traits
from ..validation import KSamplerInputError
from .solver import check_eta, sample_calibrated

CALIBRATION_FORMAT = "ksampler.calibration/1"  # without a corrector (what every earlier version reads)
# [with a corrector, with evaluation shifts (and a corrector or not)]
CALIBRATION_FORMATS = (CALIBRATION_FORMAT, "ksampler.calibration/2", "ksampler.calibration/3")


@dataclass
class Calibration:
    """Fitted sigmas (model frame, descending, ending in 0), multistep coefficients [steps, order] and, where the
    fit has them, corrector coefficients [steps, order + 1] (row i weighs [D_{i+1}, D_i, ...]) and evaluation
    shifts [steps] (step i calls the model at sigma_i * exp(shift[i])).  ``eta`` is how the sampler runs, not part
    of the fit (nor of the file): 0 follows the ODE the fit matched; above 0 each step re-noises (``solver.solve``)."""

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
        check_info(self.info, len(s) - 1, self.coefficients.shape[1], float(s[0]))


# the types of the info fields that loading, keying and sampling read (where present: older files lack some)
_INFO_FIELDS = {"key": str, "file_key": str, "cfg": float, "steps": int, "order": int, "sigma_min": float,
                "sigma_max": float, "fit_noises": int, "seed": int, "iterations": int, "teacher_steps": int,
                "model_sampling": dict}


def check_info(info, steps: Optional[int], order: Optional[int], first_sigma: Optional[float]) -> None:
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
