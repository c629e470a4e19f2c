"""The graph against the model: before any model call, the latent and the conditioning must fit the model.

A ``ModelSpec`` says what a model expects; it is read from the model (``headless_spec`` for our own models,
``comfy_checks.host_spec`` inside ComfyUI), and a field left ``None`` is unknown and not checked.
``check_graph`` raises one ``KSamplerInputError`` that names the input, what it found, what the model
expects and the fix.  Nothing here imports ``comfy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .conditioning.cfg import check_regions
from .conditioning.validate import KSamplerInputError, check_conditioning
from .validation import check_latent

__all__ = ["ModelSpec", "check_graph", "check_latent_fits", "check_conditioning_fits", "headless_spec",
           "describe_latent", "BUNDLED_MODEL_TYPE", "MODEL_TYPES", "BUNDLED_CLIP_TYPE", "BUNDLED_VAE_TYPE",
           "BUNDLED_LATENT_KEY"]

# The bundled loader's outputs are other objects than ComfyUI's MODEL / CLIP / VAE, so they get types of their
# own: the editor then refuses to link them into ComfyUI's nodes (our KSampler takes both kinds of MODEL).
BUNDLED_MODEL_TYPE = "KSAMPLER_BUNDLED_MODEL"
# a node input taking ComfyUI's MODEL or the bundled one (a comma-separated list: the editor and the server accept
# either)
MODEL_TYPES = f"MODEL,{BUNDLED_MODEL_TYPE}"
BUNDLED_CLIP_TYPE = "KSAMPLER_BUNDLED_CLIP"
BUNDLED_VAE_TYPE = "KSAMPLER_BUNDLED_VAE"
# set on the bundled nodes' latents: they are pixels in [-1, 1], not a VAE latent, even when all zero
BUNDLED_LATENT_KEY = "ksampler_bundled"

# text encoders whose widths users mix up, to say where a conditioning of the wrong width came from
ENCODER_WIDTHS = {64: "the bundled model's text encoder (Text Encode (ksampler))", 768: "a CLIP-L (SD1.x)",
                  1024: "an OpenCLIP-H (SD2.x)", 1280: "a CLIP-G", 2048: "CLIP-L + CLIP-G (SDXL)",
                  4096: "a T5-XXL or another LLM encoder (SD3, Flux, Wan)"}


@dataclass(frozen=True)
class ModelSpec:
    """What a model expects of its latent and conditioning (None: unknown, not checked)."""

    name: str                              # "this SD15 model", "the bundled flow model"
    latent_channels: int
    latent_dims: int = 2                   # spatial dims: 1 audio, 2 image, 3 video
    context_dim: Optional[int] = None      # width of the cross-attention conditioning
    pooled_dim: Optional[int] = None       # width of the pooled_output it needs (its ``y`` input)
    widen_empty_latent: bool = True        # an all-zero latent of another channel count is widened (ComfyUI)
    size_multiple: int = 1                 # latent sides must be multiples of this
    max_side: Optional[int] = None         # latent sides may be at most this (SD3: its position embedding's size)
    downscale: int = 8                     # image pixels per latent pixel
    empty_latent_node: str = "the empty latent node for this model"
    encoder_hint: str = "the CLIP (text encoder) of the same checkpoint"
    vae_hint: str = "VAE Encode with this checkpoint's VAE"


def _size(shape) -> str:
    """Sides as a user types them: width x height (x frames for video)."""
    if len(shape) == 3:
        return f"length {shape[2]}"
    if len(shape) == 5:
        return f"{shape[4]}x{shape[3]}, {shape[2]} frames"
    return "x".join(str(s) for s in reversed(shape[2:]))


def describe_latent(samples: torch.Tensor, latent: Optional[dict] = None) -> str:
    """What a latent most likely is, in the sizes the user chose (``a 4-channel 8x8 latent, ...``)."""
    shape = tuple(samples.shape)
    channels = shape[1] if len(shape) > 1 else 1
    base = f"a {channels}-channel {_size(shape)} latent" if len(shape) >= 3 else f"a tensor of shape {shape}"
    if isinstance(latent, dict) and latent.get(BUNDLED_LATENT_KEY):
        return (f"the bundled model's {channels}-channel pixel latent of a {_size(shape)} image (from Empty Latent "
                "Image (ksampler) or VAE Encode (ksampler))")
    if len(shape) == 4 and channels in (4, 16):
        family = "an SD1.x/SD2.x/SDXL" if channels == 4 else "an SD3/Flux"
        return (f"{base}: {family} latent of a {shape[3] * 8}x{shape[2] * 8} image (ComfyUI's empty latent or VAE "
                "Encode nodes)")
    if len(shape) == 5:
        return f"{base} (a video latent)"
    if len(shape) == 3:
        return f"{base} (an audio latent)"
    return base


def _image_size(samples: torch.Tensor, latent: Optional[dict]):
    """(width, height) in pixels of the image an image latent stands for, when its kind is known."""
    if samples.ndim != 4:
        return None
    if isinstance(latent, dict) and latent.get(BUNDLED_LATENT_KEY):
        return samples.shape[3], samples.shape[2]
    if samples.shape[1] in (4, 16):
        return samples.shape[3] * 8, samples.shape[2] * 8
    return None


def nearest_side(side: int, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``side`` (halves round up), at least ``multiple``."""
    multiple = max(1, multiple)
    return max(multiple, (side + multiple // 2) // multiple * multiple)


def _layout(spec: ModelSpec) -> str:
    names = {1: "[batch, {c}, length] audio", 2: "[batch, {c}, height, width] image",
             3: "[batch, {c}, frames, height, width] video"}
    return names.get(spec.latent_dims, f"{spec.latent_dims + 2}-D").format(c=spec.latent_channels) + " latents"


def check_latent_fits(spec: ModelSpec, samples: torch.Tensor, latent: Optional[dict] = None,
                      name: str = "latent_image") -> None:
    """The latent's rank, channels and size against the model (after ``check_latent``'s structural checks)."""
    if getattr(samples, "is_nested", False):
        return  # several latent streams (LTX-2): the host checks each against its own format
    ranks = {spec.latent_dims + 2}
    if spec.latent_dims == 3:
        ranks.add(4)  # ComfyUI gives an image latent a frames dim for video models
    fix = f"use {spec.empty_latent_node} or {spec.vae_hint}"
    size = _image_size(samples, latent)
    pixel_multiple = spec.size_multiple * spec.downscale
    if size is not None and spec.latent_dims == 2:
        # a size the model takes: the given one when valid, else the nearest valid one
        width, height = (nearest_side(s, pixel_multiple) for s in size)
        fix = f"use {spec.empty_latent_node} with width {width} and height {height}, or {spec.vae_hint}"
    what = describe_latent(samples, latent)
    if samples.ndim not in ranks:
        raise KSamplerInputError(f"{name}['samples']: is {what}, shape {tuple(samples.shape)}; {spec.name} samples "
                                 f"{_layout(spec)}: {fix}")
    bundled_latent = isinstance(latent, dict) and bool(latent.get(BUNDLED_LATENT_KEY))
    if samples.shape[1] != spec.latent_channels:
        widened = spec.widen_empty_latent and not bundled_latent and not bool(torch.count_nonzero(samples))
        if not widened:
            raise KSamplerInputError(f"{name}['samples']: is {what}; {spec.name} needs {spec.latent_channels}-channel "
                                     f"latents: {fix}")
    m = spec.size_multiple
    if m > 1 and any(s % m for s in samples.shape[2:]):
        if size is not None and spec.latent_dims == 2:
            fix += f" of an image resized to {width}x{height} (the nearest valid size)"
        else:
            sides = [nearest_side(s, m) * spec.downscale for s in reversed(samples.shape[2:])]
            fix += f" at {'x'.join(map(str, sides))} (the nearest valid size)"
        raise KSamplerInputError(f"{name}['samples']: is {what}; {spec.name} needs sides that are multiples of "
                                 f"{pixel_multiple} pixels: {fix}")
    if spec.max_side is not None and samples.ndim >= 4 and max(samples.shape[-2:]) > spec.max_side:
        most = spec.max_side * spec.downscale
        raise KSamplerInputError(f"{name}['samples']: is {what}; {spec.name} takes at most {most} pixels "
                                 f"({spec.max_side} latent pixels) a side, the size of its position embedding: use "
                                 f"{spec.empty_latent_node} with width and height of at most {most}, or "
                                 f"{spec.vae_hint} of an image no larger")


def check_conditioning_fits(spec: ModelSpec, cond, name: str, allow_empty: bool = False) -> list:
    """Structure (``check_conditioning``), then the width and the pooled output against the model."""
    entries = check_conditioning(cond, name, allow_empty=allow_empty)
    for k, (context, opts) in enumerate(entries):
        width = context.shape[-1]
        if spec.context_dim is not None and width != spec.context_dim:
            source = ENCODER_WIDTHS.get(width)
            found = f"{width}-wide conditioning" + (f" (what {source} gives)" if source else "")
            raise KSamplerInputError(f"{name}[{k}]: is {found}; {spec.name} wants {spec.context_dim}-wide "
                                     f"conditioning: use {spec.encoder_hint}")
        if spec.pooled_dim is None:
            continue
        pooled = opts.get("pooled_output")
        if pooled is None:
            raise KSamplerInputError(f"{name}[{k}]: has no 'pooled_output', which {spec.name} needs (its "
                                     f"{spec.pooled_dim}-wide 'y' input): use {spec.encoder_hint}")
        if pooled.ndim != 2 or pooled.shape[-1] != spec.pooled_dim:
            raise KSamplerInputError(f"{name}[{k}]['pooled_output']: has shape {tuple(pooled.shape)}; {spec.name} "
                                     f"wants [batch, {spec.pooled_dim}]: use {spec.encoder_hint}")
    return entries


def check_graph(spec: ModelSpec, positive, negative, latent, cfg: float, reads_uncond: bool = False,
                nested: bool = False):
    """Every graph-against-model check; returns ``check_latent``'s (samples, batch_index, noise_mask).

    ``negative`` may be empty (or None) only at cfg 1 with a sampler that does not read the unconditional
    estimate (``reads_uncond``: the CFG++ samplers), where it is never evaluated.  ``nested``: accept a nested
    latent (ComfyUI's streams, checked stream by stream by ``check_latent``); its streams' layouts are the host's.
    """
    samples, batch_index, mask = check_latent(latent, nested=nested)
    if not getattr(samples, "is_nested", False):
        check_latent_fits(spec, samples, latent)
    check_conditioning_fits(spec, positive, "positive")
    if not getattr(samples, "is_nested", False):  # areas and masks against the latent (per stream: the host's)
        check_regions(positive, "positive", samples.shape)
    optional = isinstance(cfg, (int, float)) and math.isclose(float(cfg), 1.0) and not reads_uncond
    if negative is None and optional:
        return samples, batch_index, mask
    if isinstance(negative, (list, tuple)) and not negative and not optional:
        why = "a CFG++ sampler reads it" if reads_uncond else f"cfg is {cfg:g}"
        raise KSamplerInputError(f"negative: the conditioning list is empty and {why}; connect a text-encode node "
                                 "(an empty prompt gives a valid negative), or use cfg 1 with a non-CFG++ sampler")
    check_conditioning_fits(spec, negative, "negative", allow_empty=optional)
    if not getattr(samples, "is_nested", False):
        check_regions(negative or [], "negative", samples.shape)
    return samples, batch_index, mask


def headless_spec(model) -> ModelSpec:
    """What one of our own models (``models.DiffusionModel``, the bundled one included) expects."""
    fmt = model.latent_format
    network = getattr(model, "network", None)
    config = getattr(model, "config", None)
    bundled = isinstance(config, dict) and str(config.get("format", "")).startswith("ksampler-bundled")
    if bundled:
        return ModelSpec(f"the bundled {config.get('kind', 'ksampler')} model",
                         fmt.latent_channels, getattr(fmt, "latent_dimensions", 2),
                         context_dim=getattr(network, "context_dim", None), widen_empty_latent=False,
                         size_multiple=getattr(network, "size_multiple", 1), downscale=getattr(fmt, "downscale", 1),
                         empty_latent_node="Empty Latent Image (ksampler)",
                         encoder_hint="Text Encode (ksampler) with the bundled checkpoint's CLIP",
                         vae_hint="VAE Encode (ksampler) with the bundled checkpoint's VAE")
    name = getattr(model, "name", None) or type(model).__name__
    return ModelSpec(f"the model {name!r}", fmt.latent_channels, getattr(fmt, "latent_dimensions", 2),
                     context_dim=getattr(network, "context_dim", None),
                     size_multiple=getattr(network, "size_multiple", 1), downscale=getattr(fmt, "downscale", 8),
                     empty_latent_node="an all-zero latent with the model's channels",
                     encoder_hint="the text encoder that belongs to this model",
                     vae_hint="an encoder of this model's latent space")

