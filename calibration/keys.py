"""What a calibration is fitted for, as cache keys: the model (this process's object, or its weights for files),
the conditioning by content, and what a ComfyUI model patcher adds to its network."""
from __future__ import annotations

import functools
import hashlib
import json
import types
from typing import Callable, Optional

import torch
from torch import Tensor


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
    state = {name: getattr(model, name) for name in PATCHER_STATE if getattr(model, name, None) is not None}
    if _empty(state):
        return None
    h = hashlib.sha1()
    _content_walk(h, state)
    return h.hexdigest()
