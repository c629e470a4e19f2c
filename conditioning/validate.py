"""Input checks for conditioning: every error names the input and says how to fix it."""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_conditioning", "check_mask_values", "check_area_fits", "check_mask_batch", "KSamplerInputError",
           "MAX_CONTEXT_MAGNITUDE", "MAX_STRENGTH"]

# Text encoders give values within a few thousand (LLM encoders' largest activations included); far larger ones
# overflow float32 in attention and would be reported as a broken model at step 1.
MAX_CONTEXT_MAGNITUDE = 1e6
# ComfyUI's conditioning nodes set a strength of at most 10; 10000 leaves room for any other node pack's use
MAX_STRENGTH = 1e4


class KSamplerInputError(ValueError):
    """A node or API input is invalid; the message names the input and the fix."""


def check_mask_values(mask: torch.Tensor, name: str) -> None:
    """A mask's values must be real, finite and in [0, 1]."""
    if mask.is_complex():
        raise KSamplerInputError(f"{name}: is complex; use real values in [0, 1]")
    if mask.device.type == "meta":
        raise KSamplerInputError(f"{name}: the tensor is on the 'meta' device and holds no data")
    if mask.numel() == 0:
        raise KSamplerInputError(f"{name}: is empty (shape {tuple(mask.shape)})")
    values = mask.float()
    if not bool(torch.isfinite(values).all()):
        raise KSamplerInputError(f"{name}: contains NaN or Inf; masks hold values in [0, 1]")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise KSamplerInputError(f"{name}: values must be in [0, 1], got values from {low:g} to {high:g}; use a "
                                 "MASK output (Load Image's mask, Solid Mask, ...) or clamp it into [0, 1]")


def check_conditioning(cond, name: str, allow_empty: bool = False) -> list:
    """Validate ComfyUI conditioning (a list of (tensor, dict) pairs) and return it as a new list; never mutates it."""
    if not isinstance(cond, (list, tuple)):
        raise KSamplerInputError(f"{name}: expected CONDITIONING (a list of [tensor, dict] pairs), got "
                                 f"{type(cond).__name__}; connect a text-encode node's output")
    if not cond and not allow_empty:
        raise KSamplerInputError(f"{name}: the conditioning list is empty; connect a text-encode node (an empty "
                                 "prompt still gives a valid entry)")
    out = []
    width = None
    for k, entry in enumerate(cond):
        where = f"{name}[{k}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise KSamplerInputError(f"{where}: expected a [tensor, dict] pair, got {type(entry).__name__}")
        tensor, opts = entry
        _check_context(tensor, where)
        if width is not None and tensor.shape[-1] != width:
            raise KSamplerInputError(f"{where}: context width {tensor.shape[-1]} differs from {name}[0]'s "
                                     f"{width}; all entries must come from the same text encoder")
        width = tensor.shape[-1]
        _check_options(opts, where)
        out.append((tensor, opts))
    return out


def _check_context(tensor, where: str) -> None:
    """One entry's context tensor: a finite float tensor [batch, tokens, dim] with data."""
    if not isinstance(tensor, torch.Tensor):
        raise KSamplerInputError(f"{where}: the first element must be a tensor [batch, tokens, dim], got "
                                 f"{type(tensor).__name__}")
    if tensor.ndim != 3:
        raise KSamplerInputError(f"{where}: context must have 3 dims [batch, tokens, dim], got shape "
                                 f"{tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise KSamplerInputError(f"{where}: context dtype {tensor.dtype} is not floating point; "
                                 "pass the text encoder's float output")
    if tensor.device.type == "meta":
        raise KSamplerInputError(f"{where}: context is on the 'meta' device and holds no data; "
                                 "move it to the model's device with .to(device)")
    if tensor.numel() == 0:
        raise KSamplerInputError(f"{where}: context is empty (shape {tuple(tensor.shape)})")
    if not bool(torch.isfinite(tensor).all()):
        raise KSamplerInputError(f"{where}: the conditioning tensor contains NaN or Inf; re-encode the "
                                 "prompt (a broken text encoder, embedding or conditioning node upstream)")
    _check_magnitude(tensor, where, "the conditioning tensor")


def _check_magnitude(tensor: torch.Tensor, where: str, what: str) -> None:
    largest = float(tensor.detach().abs().max())
    if largest > MAX_CONTEXT_MAGNITUDE:
        raise KSamplerInputError(f"{where}: {what} holds values up to {largest:g} in magnitude, past the "
                                 f"{MAX_CONTEXT_MAGNITUDE:g} text encoders stay within (larger values overflow while "
                                 "sampling); re-encode the prompt (a broken encoder or conditioning node upstream)")


def _check_options(opts, where: str) -> None:
    """One entry's options: numbers finite, mask in [0, 1], pooled output finite, area well formed."""
    if not isinstance(opts, dict):
        raise KSamplerInputError(f"{where}: the second element must be a dict of options, got "
                                 f"{type(opts).__name__}")
    for key in ("strength", "mask_strength", "start_percent", "end_percent"):
        if key in opts:
            value = opts[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise KSamplerInputError(f"{where}['{key}']: expected a number, got {type(value).__name__}")
            if value != value or value in (float("inf"), float("-inf")):
                raise KSamplerInputError(f"{where}['{key}']: must be finite, got {value}")
            if key.endswith("strength") and abs(value) > MAX_STRENGTH:
                raise KSamplerInputError(f"{where}['{key}']: must be between {-MAX_STRENGTH:g} and "
                                         f"{MAX_STRENGTH:g} (ComfyUI's nodes set at most 10), got {value:g}")
    if "mask" in opts and opts["mask"] is not None:
        mask = opts["mask"]
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
            raise KSamplerInputError(f"{where}['mask']: expected a [batch, height, width] tensor, got "
                                     f"{getattr(mask, 'shape', type(mask).__name__)}")
        check_mask_values(mask, f"{where}['mask']")
    pooled = opts.get("pooled_output")
    if pooled is not None:
        if not isinstance(pooled, torch.Tensor) or not pooled.is_floating_point():
            raise KSamplerInputError(f"{where}['pooled_output']: expected a float tensor [batch, dim], got "
                                     f"{getattr(pooled, 'dtype', type(pooled).__name__)}; re-encode the prompt")
        if pooled.device.type == "meta" or not bool(torch.isfinite(pooled).all()):
            raise KSamplerInputError(f"{where}['pooled_output']: contains NaN or Inf (or no data); "
                                     "re-encode the prompt")
        if pooled.numel():
            _check_magnitude(pooled, f"{where}['pooled_output']", "the pooled output")
    if "area" in opts and opts["area"] is not None:
        _check_area(opts["area"], f"{where}['area']")


_AREA_FORMS = ("(height, width, y, x) in latent pixels (ComfyUI's Conditioning (Set Area)) or ('percentage', "
               "height, width, y, x) as fractions of the latent (Conditioning (Set Area with Percentage))")


def _check_area(area, where: str) -> None:
    """An area's form: sizes then offsets (one of each per latent dim), in latent pixels or as fractions."""
    if not isinstance(area, (list, tuple)) or not area:
        raise KSamplerInputError(f"{where}: expected {_AREA_FORMS}, got {area!r}")
    percentage = isinstance(area[0], str)
    if percentage and area[0] != "percentage":
        raise KSamplerInputError(f"{where}: the only named form is 'percentage', got {area[0]!r}; expected "
                                 f"{_AREA_FORMS}")
    values = area[1:] if percentage else area
    if not values or len(values) % 2:
        raise KSamplerInputError(f"{where}: expected as many offsets as sizes (e.g. {_AREA_FORMS}), got {area!r}")
    half = len(values) // 2
    for k, value in enumerate(values):
        what = "size" if k < half else "offset"
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise KSamplerInputError(f"{where}: every {what} must be a finite number (not a bool), got {value!r} in "
                                     f"{area!r}; expected {_AREA_FORMS}")
        if not percentage and not float(value).is_integer():
            raise KSamplerInputError(f"{where}: sizes and offsets in latent pixels must be whole numbers, got "
                                     f"{value!r} in {area!r}; round them, or use the 'percentage' form")
        low = 0 if percentage or what == "offset" else 1
        if value < low:
            raise KSamplerInputError(f"{where}: every {what} must be >= {low}, got {value!r} in {area!r}; an area "
                                     "starts inside the latent (offsets from its top-left corner) and has a size")


_DIM_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("frames", "height", "width")}


def check_area_fits(area: tuple, dims: tuple, where: str) -> None:
    """A resolved area (sizes then offsets, in latent pixels, one per dim of ``dims``) must start inside the latent.

    An area that runs past the latent's far edge is cut there, as ComfyUI does; one that starts at or past it
    covers nothing (ComfyUI would hand the model an empty crop).
    """
    half = len(area) // 2
    names = _DIM_NAMES.get(len(dims), tuple(f"dim {d}" for d in range(len(dims))))
    for d, side in enumerate(dims):
        size, offset = area[d], area[half + d]
        if size < 1 or offset < 0 or offset >= side:
            raise KSamplerInputError(f"{where}: lies outside the latent: its {names[d]} offset {offset} (size "
                                     f"{size}) is not within the latent's {names[d]} {side} (latent pixels, 1/8 of "
                                     "image pixels for most models); move the area inside the image")


def check_mask_batch(mask: torch.Tensor, spatial_dims: int, batch: int, where: str) -> None:
    """A conditioning mask's batch must be 1, at least the latent's, or divide it (masks repeat over the batch, and
    ComfyUI fails on any other count)."""
    count = mask.shape[0] if mask.ndim > spatial_dims else 1
    if count < batch and batch % count:
        raise KSamplerInputError(f"{where}: holds {count} masks for a latent batch of {batch}; give one mask, one "
                                 f"per latent ({batch}), or a count that divides the batch (masks repeat over it)")
