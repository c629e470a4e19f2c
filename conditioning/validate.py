"""Input checks for conditioning: every error names the input and says how to fix it."""
from __future__ import annotations

import torch

__all__ = ["check_conditioning", "check_mask_values", "KSamplerInputError"]


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
    if "area" in opts and opts["area"] is not None:
        area = opts["area"]
        if not isinstance(area, (list, tuple)) or len(area) not in (4, 5):
            raise KSamplerInputError(f"{where}['area']: expected (height, width, y, x) in latent pixels "
                                     f"or ('percentage', h, w, y, x), got {area!r}")
