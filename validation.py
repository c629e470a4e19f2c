"""Input checks shared by the nodes and the Python API: one clear error per bad input, naming it and the fix."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from .conditioning.validate import KSamplerInputError, check_mask_values

__all__ = ["KSamplerInputError", "check_latent", "check_noise_mask", "check_model",
           "check_batch_index", "check_bool", "check_tensor", "check_magnitude", "LATENT_LAYOUTS", "MAX_SEED",
           "MAX_STEPS", "MAX_BATCH_INDEX", "MAX_MAGNITUDE"]

MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_STEPS = 10000


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(name: str, value, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise KSamplerInputError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise KSamplerInputError(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A flag: True or False only (a string such as "no" is truthy, so it is refused rather than read as True)."""
    if not isinstance(value, bool):
        raise KSamplerInputError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


def check_float(name: str, value, lo: float, hi: float) -> float:
    if not _is_number(value):
        raise KSamplerInputError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise KSamplerInputError(f"{name}: must be finite, got {value}")
    if not lo <= value <= hi:
        raise KSamplerInputError(f"{name}: must be between {lo} and {hi}, got {value}")
    return float(value)


def lookup_entry(registry: Mapping, name, key: str, kind: str):
    """``registry[name]``, or an error naming the input ``key`` and the choices."""
    if not isinstance(name, str):
        raise KSamplerInputError(f"{key}: expected a name (str), got {type(name).__name__}")
    entry = registry.get(name)
    if entry is None:
        raise KSamplerInputError(f"{key}: unknown {kind} {name!r}; choose one of: {', '.join(registry)}")
    return entry


def check_new_entry(registry: Mapping, name, fn, replace: bool, who: str) -> None:
    """The checks ``who`` (a register function) makes before adding ``fn`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{who}: name must be a non-empty string")
    if not callable(fn):
        raise TypeError(f"{who}: fn for {name!r} must be callable")
    if name in registry and not replace:
        raise ValueError(f"{who}: {name!r} is already registered; pass replace=True to override it")


def check_model(model) -> None:
    """A model our own pipeline can sample: a ComfyUI object gets an error naming what it is and what to connect."""
    module = type(model).__module__ or ""
    if module == "comfy" or module.startswith("comfy."):
        what = type(model).__name__
        if hasattr(model, "diffusion_model"):
            raise KSamplerInputError(f"model: got ComfyUI's bare {what} (the network inside a MODEL), not a MODEL; "
                                     "connect the MODEL output of a checkpoint loader (Load Checkpoint, Load "
                                     "Diffusion Model) directly, or pass the ModelPatcher that holds it")
        raise KSamplerInputError(f"model: got a ComfyUI {what} ({module}), not a MODEL; connect the MODEL output "
                                 "of a checkpoint loader")
    missing = [a for a in ("model_sampling", "latent_format", "apply_model") if not hasattr(model, a)]
    if missing:
        raise KSamplerInputError(f"model: expected a MODEL (from a checkpoint loader), got {type(model).__name__} "
                                 f"without {', '.join(missing)}")


LATENT_LAYOUTS = {3: "[batch, channels, length] (audio)", 4: "[batch, channels, height, width] (image)",
                  5: "[batch, channels, frames, height, width] (video)"}


def check_latent(latent, channels: Optional[int] = None, name: str = "latent_image", dims: Optional[int] = None,
                 nested: bool = False):
    """Validate a LATENT dict; returns (samples, batch_index or None, noise_mask or None). Never mutates it.

    ``dims``: the number of dimensions the model's latents have (4 for an image model); by default any of
    ComfyUI's layouts (3, 4 or 5) is accepted. ``nested``: accept a nested latent (ComfyUI's NestedTensor of
    several streams, e.g. LTX-2's video + audio), which only the ComfyUI path samples.
    """
    if not isinstance(latent, dict):
        raise KSamplerInputError(f"{name}: expected a LATENT dict with a 'samples' tensor, got {type(latent).__name__}")
    if "samples" not in latent:
        raise KSamplerInputError(f"{name}: the LATENT dict has no 'samples' entry; connect an Empty Latent Image "
                                 "or VAE Encode node")
    samples = latent["samples"]
    if getattr(samples, "is_nested", False):
        if not nested:
            raise KSamplerInputError(f"{name}['samples']: is a nested latent (several streams, e.g. LTX-2's audio + "
                                     "video); ksampler samples those only inside ComfyUI, with a ComfyUI MODEL")
        return _check_nested_latent(latent, samples, name)
    _check_samples(samples, f"{name}['samples']", dims)
    if channels is not None and samples.shape[1] != channels and bool(torch.count_nonzero(samples)):
        raise KSamplerInputError(f"{name}['samples']: has {samples.shape[1]} channels but the model expects "
                                 f"{channels}; encode the image with this model's VAE")
    batch_index = _check_batch_index(latent, samples.shape[0], name)
    mask = latent.get("noise_mask")
    if mask is not None:
        check_noise_mask(mask, samples.shape, f"{name}['noise_mask']")
    return samples, batch_index, mask


# Noise is drawn for every index up to the largest, so the largest index bounds the work.  ComfyUI's latent nodes
# cap a batch at 4096 and its batch splitting / repeating nodes number items from 0; 16383 (four full batches) is
# past any real graph, and drawing that many is about a second for a 512x512 SD latent.
MAX_BATCH_INDEX = 16383


def check_batch_index(batch_index, batch: int, name: str = "batch_index") -> Optional[list]:
    """A latent's ``batch_index``: one int in [0, MAX_BATCH_INDEX] per batch item (or None); returned as a list."""
    if batch_index is None:
        return None
    if not isinstance(batch_index, (list, tuple)) or not all(_is_int(i) for i in batch_index):
        raise KSamplerInputError(f"{name}: expected a list of ints, got {batch_index!r}")
    if len(batch_index) != batch:
        raise KSamplerInputError(f"{name}: has {len(batch_index)} entries for a batch of "
                                 f"{batch}; give one index per latent")
    if any(i < 0 for i in batch_index):
        raise KSamplerInputError(f"{name}: indices must be >= 0, got {list(batch_index)}")
    if max(batch_index, default=0) > MAX_BATCH_INDEX:
        raise KSamplerInputError(f"{name}: indices must be at most {MAX_BATCH_INDEX} (noise is drawn for every "
                                 f"index up to the largest; ComfyUI's latent batches hold at most 4096), got "
                                 f"{max(batch_index)}; renumber the batch from 0")
    return [int(i) for i in batch_index]


def _check_batch_index(latent: dict, batch: int, name: str):
    return check_batch_index(latent.get("batch_index"), batch, f"{name}['batch_index']")


def _streams(nested) -> list:
    return list(nested.unbind()) if hasattr(nested, "unbind") else list(getattr(nested, "tensors", []))


def _check_nested_latent(latent: dict, samples, name: str):
    """A nested latent: every stream a latent tensor, one batch size; a nested mask has one entry per stream (or
    fewer: ComfyUI does not mask the rest), a plain mask applies to the first stream."""
    streams = _streams(samples)
    if not streams:
        raise KSamplerInputError(f"{name}['samples']: the nested latent holds no streams")
    for i, stream in enumerate(streams):
        _check_samples(stream, f"{name}['samples'][{i}]")
    if len({int(t.shape[0]) for t in streams}) != 1:
        raise KSamplerInputError(f"{name}['samples']: the streams of the nested latent have different batch sizes "
                                 f"({', '.join(str(int(t.shape[0])) for t in streams)}); give them one batch size")
    batch_index = _check_batch_index(latent, int(streams[0].shape[0]), name)
    mask = latent.get("noise_mask")
    if mask is not None:
        masks = _streams(mask) if getattr(mask, "is_nested", False) else [mask]
        if len(masks) > len(streams):
            raise KSamplerInputError(f"{name}['noise_mask']: has {len(masks)} masks for {len(streams)} streams")
        for i, (m, stream) in enumerate(zip(masks, streams)):
            label = f"{name}['noise_mask'][{i}]"
            if isinstance(m, torch.Tensor) and tuple(m.shape) == tuple(stream.shape):  # a full-shape mask
                if not bool(torch.isfinite(m.float()).all()) or m.is_complex():
                    raise KSamplerInputError(f"{label}: must hold finite real values in [0, 1]")
            else:
                check_noise_mask(m, stream.shape, label)
    return samples, batch_index, mask


def _check_samples(samples, name: str, dims: Optional[int] = None) -> None:
    if not isinstance(samples, torch.Tensor):
        raise KSamplerInputError(f"{name}: expected a tensor, got {type(samples).__name__}")
    if samples.device.type == "meta":
        raise KSamplerInputError(f"{name}: the tensor is on the 'meta' device and holds no data; "
                                 "move it to the CPU or the model's device")
    allowed = (dims,) if dims is not None else tuple(LATENT_LAYOUTS)
    if samples.ndim not in allowed:
        layouts = " or ".join(LATENT_LAYOUTS.get(d, f"{d} dims") for d in allowed)
        raise KSamplerInputError(f"{name}: expected {layouts}, got shape {tuple(samples.shape)}")
    if samples.numel() == 0:
        raise KSamplerInputError(f"{name}: is empty (shape {tuple(samples.shape)})")
    if not samples.is_floating_point():
        raise KSamplerInputError(f"{name}: dtype {samples.dtype} is not floating point; use float32")
    if not bool(torch.isfinite(samples).all()):
        raise KSamplerInputError(f"{name}: contains NaN or Inf; re-encode the image or create a new "
                                 "empty latent")
    check_magnitude(samples, name, "re-encode the image or create a new empty latent")


# Latents, noise and noise levels of real models stay within a few thousand; values past this overflow float32
# in the model's arithmetic (squares, products) and would be reported as a broken model at step 1.
MAX_MAGNITUDE = 1e6


def check_magnitude(values: torch.Tensor, name: str, fix: str, limit: float = MAX_MAGNITUDE) -> None:
    """``values`` (finite) must lie within +-``limit``; the error names the input, the largest value and ``fix``."""
    largest = float(values.detach().abs().max()) if values.numel() else 0.0
    if largest > limit:
        raise KSamplerInputError(f"{name}: holds values up to {largest:g} in magnitude, past the {limit:g} any real "
                                 f"input stays within (larger values overflow float32 while sampling); {fix}")


def check_tensor(value, name: str, fix: str, min_dims: int = 1) -> torch.Tensor:
    """A tensor with data (not on the meta device, not empty), real floating point or integer, finite, of sane
    magnitude, with at least ``min_dims`` dims; the error names ``name`` and says ``fix``."""
    if not isinstance(value, torch.Tensor):
        raise KSamplerInputError(f"{name}: expected a tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise KSamplerInputError(f"{name}: the tensor is on the 'meta' device and holds no data; "
                                 "move it to the CPU or the model's device")
    if value.ndim < min_dims:
        raise KSamplerInputError(f"{name}: expected at least {min_dims} dims ([batch, ...]), got shape "
                                 f"{tuple(value.shape)}")
    if value.numel() == 0:
        raise KSamplerInputError(f"{name}: is empty (shape {tuple(value.shape)})")
    if value.is_complex() or value.dtype == torch.bool:
        raise KSamplerInputError(f"{name}: dtype {value.dtype} is not real numbers; use float32")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise KSamplerInputError(f"{name}: contains NaN or Inf; {fix}")
    check_magnitude(value, name, fix)
    return value


# per latent layout (its number of spatial dims): the mask shapes accepted (as ComfyUI resizes masks)
_MASK_LAYOUTS = {1: "[length], [batch, length] or [batch, 1 or channels, length]",
                 2: "[height, width], [batch, height, width] or [batch, 1, height, width]",
                 3: "[height, width], [frames, height, width], [frames, 1, height, width] or "
                    "[batch, 1 or channels, frames, height, width]"}


def check_noise_mask(mask, latent_shape, name: str = "noise_mask") -> int:
    """An inpainting mask that ``pipeline.prepare_mask`` can resize to a latent of ``latent_shape``; returns how
    many batch items it holds (1 when it has no batch dim)."""
    if not isinstance(mask, torch.Tensor):
        raise KSamplerInputError(f"{name}: expected a tensor, got {type(mask).__name__}")
    spatial, channels = len(latent_shape) - 2, latent_shape[1]
    full_rank = spatial + 2  # [batch, channel, *spatial]
    if spatial == 3 and mask.ndim < full_rank:  # video: the leading dims stack frames, as in ComfyUI
        ok, batch = 2 <= mask.ndim <= 4 and (mask.ndim < 4 or mask.shape[1] == 1), 1
    else:
        ok = spatial <= mask.ndim <= full_rank
        if mask.ndim == full_rank:
            ok = ok and mask.shape[1] in ((1,) if spatial == 2 else (1, channels))
        batch = mask.shape[0] if mask.ndim > spatial else 1
    if not ok:
        raise KSamplerInputError(f"{name}: expected {_MASK_LAYOUTS[spatial]} for a latent of shape "
                                 f"{tuple(latent_shape)}, got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise KSamplerInputError(f"{name}: is empty (shape {tuple(mask.shape)})")
    if mask.device.type == "meta":
        raise KSamplerInputError(f"{name}: the tensor is on the 'meta' device and holds no data")
    if batch not in (1, latent_shape[0]):
        raise KSamplerInputError(f"{name}: batch {batch} does not match the latent batch {latent_shape[0]}; "
                                 "give one mask or one per latent")
    check_mask_values(mask, name)
    return batch
