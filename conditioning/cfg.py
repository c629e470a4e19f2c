"""Classifier-free guidance over ComfyUI-format conditioning (Ho & Salimans 2022).

Conditioning is a list of ``(tensor, dict)`` pairs: the tensor is the
cross-attention context ``[B, tokens, dim]``; the dict may hold
``strength``, ``area`` / ``mask`` / ``mask_strength``, ``start_percent`` /
``end_percent`` and ``pooled_output``.  Entries that cover the same region are
averaged, weighted by strength x mask (area edges feathered); positive and
negative entries go through the model in one batched call per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .validate import KSamplerInputError, check_area_fits, check_conditioning, check_mask_batch

__all__ = ["Guidance", "GuidedDenoiser", "PreparedCond"]

MAX_CFG = 100.0  # the KSampler node's cfg range is 0 to 100
_FEATHER = 8  # latent pixels of edge feathering for area conditioning without a mask


@dataclass
class PreparedCond:
    """One conditioning entry, resolved against a latent shape."""

    context: Tensor
    pooled: Optional[Tensor] = None
    strength: float = 1.0
    area: Optional[tuple] = None          # (h, w, y, x) in latent pixels
    mask: Optional[Tensor] = None         # [B, h, w] in latent pixels
    mask_strength: float = 1.0
    sigma_start: Optional[float] = None   # active while sigma <= sigma_start
    sigma_end: Optional[float] = None     # ... and sigma >= sigma_end
    extra: dict = field(default_factory=dict)

    def active(self, sigma: float) -> bool:
        if self.sigma_start is not None and sigma > self.sigma_start:
            return False
        if self.sigma_end is not None and sigma < self.sigma_end:
            return False
        return True


_WHOLE_DIM = 2 ** 31  # the size ComfyUI gives a dim an area does not name (cut to the latent when used)


def _resolve_area(area, dims, where: str = "area") -> tuple:
    """Area (sizes, then offsets) in latent pixels, one of each per dim of ``dims``, as ComfyUI resolves it.

    ('percentage', h, w, y, x) fractions are resolved against ``dims``.  An area in latent pixels that names
    fewer dims than the latent has covers the leading ones whole (a 2-D area on a video latent: every frame);
    one that names more keeps its first ones.  The result must start inside the latent (``check_area_fits``).
    """
    if area[0] == "percentage":
        frac = area[1:]
        half = len(frac) // 2
        if half < len(dims):
            raise KSamplerInputError(f"{where}: a 'percentage' area needs {len(dims)} sizes and {len(dims)} offsets "
                                     f"for a latent with {len(dims)} spatial dims {tuple(dims)}, got {tuple(area)}")
        sizes = tuple(max(1, round(frac[d] * dims[d])) for d in range(len(dims)))
        offsets = tuple(round(frac[d + half] * dims[d]) for d in range(len(dims)))
        area = sizes + offsets
    else:
        values = [int(a) for a in area]
        half = len(values) // 2
        sizes, offsets = values[:half], values[half:]
        while len(sizes) < len(dims):
            sizes, offsets = [_WHOLE_DIM] + sizes, [0] + offsets
        area = tuple(sizes[:len(dims)] + offsets[:len(dims)])
    check_area_fits(area, dims, where)
    return area


def check_regions(entries, name: str, latent_shape) -> None:
    """Every entry's area and mask against a latent of ``latent_shape`` (before any model call)."""
    dims = tuple(latent_shape[2:])
    for k, (_, opts) in enumerate(entries):
        if opts.get("area") is not None:
            _resolve_area(opts["area"], dims, f"{name}[{k}]['area']")
        if opts.get("mask") is not None:
            check_mask_batch(opts["mask"], len(dims), latent_shape[0], f"{name}[{k}]['mask']")


def _prepare(entries, dims, device, dtype, model_sampling, name) -> list[PreparedCond]:
    out = []
    for k, (context, opts) in enumerate(entries):
        cond = PreparedCond(context=context.to(device=device, dtype=dtype))
        pooled = opts.get("pooled_output")
        if pooled is not None:
            cond.pooled = pooled.to(device=device, dtype=dtype)
        cond.strength = float(opts.get("strength", 1.0))
        if opts.get("area") is not None:
            cond.area = _resolve_area(opts["area"], dims, f"{name}[{k}]['area']")
        if opts.get("mask") is not None:
            mask = opts["mask"].to(device=device, dtype=torch.float32)
            if mask.ndim == len(dims):
                mask = mask.unsqueeze(0)
            if tuple(mask.shape[1:]) != tuple(dims):
                mask = torch.nn.functional.interpolate(mask.unsqueeze(1), size=tuple(dims), mode="bilinear").squeeze(1)
            cond.mask = mask
            cond.mask_strength = float(opts.get("mask_strength", 1.0))
        if "start_percent" in opts:
            cond.sigma_start = model_sampling.percent_to_sigma(float(opts["start_percent"]))
        if "end_percent" in opts:
            cond.sigma_end = model_sampling.percent_to_sigma(float(opts["end_percent"]))
        cond.extra = {"index": k, "list": name}
        out.append(cond)
    return out


def _area_inside(inner, outer) -> bool:
    half = len(inner) // 2
    for d in range(half):
        if inner[half + d] < outer[half + d]:
            return False
        if inner[d] + inner[half + d] > outer[d] + outer[half + d]:
            return False
    return True


def _mirror_areas(source: list[PreparedCond], target: list[PreparedCond]) -> list[PreparedCond]:
    """Give every area in ``source`` a twin in ``target`` (ComfyUI: each cond area has an opposite of equal area).

    The twin copies the smallest ``target`` entry that encloses the area (an
    entry without an area encloses everything), so that both CFG branches
    average over the same regions.
    """
    target = list(target)
    for cond in source:
        if cond.area is None:
            continue
        smallest = None
        for other in target:
            if other.area is None:
                if smallest is None:
                    smallest = other
            elif _area_inside(cond.area, other.area):
                if smallest is None or smallest.area is None or \
                        math.prod(smallest.area[:len(smallest.area) // 2]) > math.prod(other.area[:len(other.area) // 2]):
                    smallest = other
        if smallest is None or smallest.area == cond.area:
            continue
        twin = PreparedCond(context=smallest.context, pooled=smallest.pooled, strength=cond.strength, area=cond.area,
                            mask=cond.mask, mask_strength=cond.mask_strength, sigma_start=cond.sigma_start,
                            sigma_end=cond.sigma_end, extra=dict(smallest.extra, twin=True))
        target.append(twin)
    return target


def _input_and_weight(cond: PreparedCond, x: Tensor):
    """The model input (x, cropped to the area) and the per-element weight of this entry's output."""
    dims = x.shape[2:]
    region = x
    area = None
    if cond.area is not None:
        half = len(cond.area) // 2
        sizes = list(cond.area[:half])
        offsets = list(cond.area[half:])
        for d in range(len(dims)):
            sizes[d] = min(dims[d] - offsets[d], sizes[d])
            region = region.narrow(d + 2, offsets[d], sizes[d])
        area = (sizes, offsets)
    if cond.mask is not None:
        mask = cond.mask[:region.shape[0]]
        if area is not None:
            for d in range(len(dims)):
                mask = mask.narrow(d + 1, area[1][d], area[0][d])
        mask = (mask * cond.mask_strength).to(x.dtype)
        weight = mask.unsqueeze(1).repeat((region.shape[0] // mask.shape[0], region.shape[1]) + (1,) * (mask.ndim - 1))
    else:
        weight = torch.ones_like(region)
    weight = weight * cond.strength
    if cond.mask is None and area is not None:
        sizes, offsets = area
        for d in range(len(dims)):
            ramp = min(_FEATHER, weight.shape[2 + d] // 4)
            for t in range(ramp):
                factor = (t + 1) / ramp
                if offsets[d] != 0:
                    weight.narrow(d + 2, t, 1).mul_(factor)
                if sizes[d] + offsets[d] < dims[d]:
                    weight.narrow(d + 2, sizes[d] - 1 - t, 1).mul_(factor)
    return region, weight, area


def _concat_contexts(contexts: list[Tensor]) -> Optional[Tensor]:
    """Concatenate contexts; token counts that differ are padded by repetition to their LCM (attention is unchanged)."""
    length = 1
    for c in contexts:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in contexts])


def _can_batch(a: Tensor, b: Tensor) -> bool:
    if a.shape == b.shape:
        return True
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    return math.lcm(a.shape[1], b.shape[1]) // min(a.shape[1], b.shape[1]) <= 4


class GuidedDenoiser:
    """The CFG-guided denoiser the samplers call: ``D(x, sigma) = uncond + cfg * (cond - uncond)``."""

    def __init__(self, model, model_sampling, positive: list[PreparedCond], negative: list[PreparedCond], cfg: float,
                 max_batch: Optional[int] = None):
        self.model = model
        self.model_sampling = model_sampling
        self.positive, self.negative = positive, negative
        self.cfg = float(cfg)
        self.max_batch = max_batch
        self.cfg_of = None         # optional guidance schedule: sigma -> cfg (conditioning.schedule)
        self.model_calls = 0       # batched forward passes
        self.items_evaluated = 0   # conditioning entries evaluated (cond + uncond)

    # -- the model passes -------------------------------------------------------------------
    def _evaluate(self, x: Tensor, sigma: Tensor, lists: list[list[PreparedCond]]) -> list[Tensor]:
        s = float(sigma.detach().reshape(-1)[0])
        outs = [torch.zeros_like(x) for _ in lists]
        counts = [torch.full_like(x, 1e-37) for _ in lists]
        pending = []
        for which, conds in enumerate(lists):
            for cond in conds:
                if cond.active(s):
                    region, weight, area = _input_and_weight(cond, x)
                    pending.append((which, cond, region, weight, area))
        while pending:
            first = pending[0]
            group = [p for p in pending if p[2].shape == first[2].shape and _can_batch(p[1].context, first[1].context)
                     and (p[1].pooled is None) == (first[1].pooled is None)]
            if self.max_batch:
                group = group[:self.max_batch]
            pending = [p for p in pending if all(p is not g for g in group)]
            batch = x.shape[0]
            inputs = torch.cat([g[2] for g in group])
            contexts = _concat_contexts([_repeat_batch(g[1].context, batch) for g in group])
            kwargs = {}
            if first[1].pooled is not None:
                kwargs["pooled"] = torch.cat([_repeat_batch(g[1].pooled, batch) for g in group])
            sigmas = sigma.reshape(-1).repeat(len(group)) if sigma.numel() == batch else \
                sigma.reshape(-1)[:1].expand(inputs.shape[0])
            self.model_calls += 1
            self.items_evaluated += len(group)
            output = self.model.apply_model(inputs, sigmas, context=contexts, **kwargs)
            if output.shape != inputs.shape:
                raise RuntimeError(f"model: returned shape {tuple(output.shape)} for input {tuple(inputs.shape)}; "
                                   "the model must return a denoised tensor shaped like its input")
            for chunk, (which, cond, region, weight, area) in zip(output.chunk(len(group)), group):
                if area is None:
                    outs[which] += chunk * weight
                    counts[which] += weight
                else:
                    out_view, count_view = outs[which], counts[which]
                    for d in range(x.ndim - 2):
                        out_view = out_view.narrow(d + 2, area[1][d], area[0][d])
                        count_view = count_view.narrow(d + 2, area[1][d], area[0][d])
                    out_view += chunk * weight
                    count_view += weight
        return [o / c for o, c in zip(outs, counts)]

    def predict(self, x: Tensor, sigma: Tensor, need_uncond: bool = False) -> tuple[Tensor, Tensor]:
        """(guided, unconditional) estimates; at cfg = 1 the negative pass is skipped unless ``need_uncond``."""
        cfg = self.cfg if self.cfg_of is None else self.cfg_of(float(sigma.reshape(-1)[0]))
        if math.isclose(cfg, 1.0) and not need_uncond:
            cond = self._evaluate(x, sigma, [self.positive])[0]
            return cond, cond
        cond, uncond = self._evaluate(x, sigma, [self.positive, self.negative])
        return torch.lerp(uncond, cond, cfg), uncond

    def __call__(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        return self.predict(x, sigma)[0]

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor, cfg1_shortcut: bool = False,
                            **extra) -> tuple[Tensor, Tensor]:
        return self.predict(x, sigma, need_uncond=not cfg1_shortcut)


def _repeat_batch(t: Tensor, batch: int) -> Tensor:
    """Repeat (or trim) a conditioning tensor to the latent's batch size."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] > batch:
        return t[:batch]
    reps = math.ceil(batch / t.shape[0])
    return t.repeat((reps,) + (1,) * (t.ndim - 1))[:batch]


class Guidance:
    """CFG guidance: positive and negative ComfyUI conditioning and a scale, bound to a model at sampling time."""

    def __init__(self, positive: list, negative: Optional[list], cfg: float = 1.0):
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) \
                or not 0.0 <= cfg <= MAX_CFG:
            raise KSamplerInputError(f"cfg: must be a number between 0 and {MAX_CFG:g} (the KSampler node's range), "
                                     f"got {cfg!r}")
        self.positive = check_conditioning(positive, "positive")
        self.negative = check_conditioning(negative, "negative", allow_empty=math.isclose(float(cfg), 1.0)) \
            if negative is not None else []
        if self.positive and self.negative and self.positive[0][0].shape[-1] != self.negative[0][0].shape[-1]:
            raise KSamplerInputError(f"negative: context width {self.negative[0][0].shape[-1]} differs from "
                                     f"positive's {self.positive[0][0].shape[-1]}; encode both prompts with the same "
                                     "text encoder")
        if not self.negative and not math.isclose(float(cfg), 1.0):
            raise KSamplerInputError("negative: empty conditioning with cfg != 1; pass a negative prompt (it may be "
                                     "empty text) or set cfg to 1")
        self.cfg = float(cfg)

    def check_latent(self, latent_shape) -> None:
        """Check the conditioning's areas and masks against a latent of ``latent_shape`` (``bind`` does too)."""
        check_regions(self.positive, "positive", latent_shape)
        check_regions(self.negative, "negative", latent_shape)

    def bind(self, model, model_sampling, latent_shape, device, dtype=torch.float32, max_batch=None) -> GuidedDenoiser:
        self.check_latent(latent_shape)
        dims = tuple(latent_shape[2:])
        positive = _prepare(self.positive, dims, device, dtype, model_sampling, "positive")
        negative = _prepare(self.negative, dims, device, dtype, model_sampling, "negative")
        negative = _mirror_areas(positive, negative)
        positive = _mirror_areas(negative, positive)
        return GuidedDenoiser(model, model_sampling, positive, negative, self.cfg, max_batch)
