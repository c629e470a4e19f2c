"""The bundled text-to-image model: load its safetensors weights into MODEL, CLIP and VAE objects.

``load_bundled("eps" | "flow")`` returns ``(model, clip, vae)`` shaped like
ComfyUI's checkpoint loader outputs: ``model`` is a ``DiffusionModel`` that our
KSampler samples, ``clip.encode(text)`` gives CONDITIONING
(``[[context [1, T, D], {}]]``), and ``vae`` maps IMAGE tensors
([B, H, W, 3], 0..1) to latents and back.  The model works in pixel space:
a stored latent is the image in [-1, 1] ([B, 3, H, W]); its latent format's
shift and scale bring it to about zero mean and unit variance for sampling.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
from torch import Tensor

from ..models.base import DiffusionModel, LatentFormat
from ..models.sampling import EPS, Flow

__all__ = ["load_bundled", "load_weights", "save_weights", "make_config", "weights_path", "BundledModelError",
           "TextEncoderWrapper", "PixelVAE", "KINDS", "DEFAULT_KIND", "FORMAT"]

FORMAT = "ksampler-bundled-v1"
KINDS = ("eps", "flow")
DEFAULT_KIND = "flow"   # meets the adherence targets and is by far the more faithful in img2img (bench/adherence.py)
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
_FILES = {"eps": "tiny_eps.safetensors", "flow": "tiny_flow.safetensors"}
_CACHE: dict = {}


class BundledModelError(RuntimeError):
    """A bundled-model weights file that is missing, corrupt, truncated or inconsistent."""


def weights_path(kind: str) -> str:
    """The path of a bundled checkpoint ("eps" or "flow")."""
    if kind not in _FILES:
        raise ValueError(f"kind: unknown bundled model {kind!r}; choose one of: {', '.join(KINDS)}")
    return os.path.join(WEIGHTS_DIR, _FILES[kind])


def make_config(kind: str, net_cfg, tokenizer, shift: float = 1.0, image_size: int = 32) -> dict:
    """Everything needed to rebuild a checkpoint besides its tensors (stored in the safetensors metadata)."""
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    return {
        "format": FORMAT,
        "kind": kind,
        "prediction": "eps" if kind == "eps" else "flow",
        "model_sampling": {"type": "EPS", "timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012,
                           "beta_schedule": "scaled_linear"} if kind == "eps" else
                          {"type": "Flow", "shift": float(shift), "multiplier": 1000.0},
        # stored latent = image * 2 - 1; model space = (latent - shift) * scale: about zero mean, unit variance
        "latent_format": {"channels": 3, "downscale": 1, "scale_factor": 2.5, "shift_factor": -0.42},
        "image_size": int(image_size),
        "net": net_cfg.to_dict(),
        "vocabulary": tokenizer.tokens[2:],
        "synonyms": tokenizer.synonyms,
        "max_length": tokenizer.max_length,
    }


def save_weights(path: str, text_encoder, unet, config: dict, training: Optional[dict] = None) -> None:
    """Write the text encoder and UNet weights as float16 safetensors, with ``config`` in the metadata."""
    from safetensors.torch import save_file
    tensors = {f"text.{k}": v.detach().to(torch.float16).contiguous() for k, v in text_encoder.state_dict().items()}
    tensors.update({f"unet.{k}": v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()})
    metadata = {"ksampler_config": json.dumps(config)}
    if training:
        metadata["training"] = json.dumps(training)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata=metadata)


def load_weights(path: str) -> tuple:
    """(tensors, config) from a bundled-model safetensors file; a clear error names the file when it is unusable."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise BundledModelError(f"weights file {path!r} does not exist; reinstall the package or retrain it with "
                                "tools/train.py")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise BundledModelError(f"weights file {path!r} is corrupt or truncated ({type(e).__name__}: {e}); "
                                "restore it from the repository or retrain it with tools/train.py") from None
    try:
        config = json.loads(metadata["ksampler_config"])
    except (KeyError, ValueError):
        raise BundledModelError(f"weights file {path!r} has no valid 'ksampler_config' metadata; it is not a "
                                "bundled ksampler model (train one with tools/train.py)") from None
    if config.get("format") != FORMAT:
        raise BundledModelError(f"weights file {path!r}: format {config.get('format')!r} is not {FORMAT!r}")
    return tensors, config


def _model_sampling(config: dict):
    ms = config["model_sampling"]
    if ms["type"] == "EPS":
        return EPS(ms["timesteps"], ms["linear_start"], ms["linear_end"], ms["beta_schedule"])
    return Flow(shift=ms["shift"], multiplier=ms["multiplier"])


class TextEncoderWrapper:
    """The CLIP-like object: ``encode(text)`` -> CONDITIONING ``[[context [1, T, D], {}]]``."""

    def __init__(self, encoder, tokenizer):
        self.encoder = encoder
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tokenize(self, text: str) -> Tensor:
        """Token ids [1, max_length] (unknown words become <unk>)."""
        return self.tokenizer([text])

    @torch.no_grad()
    def encode_context(self, texts: list) -> Tensor:
        """Contexts [len(texts), T, D] for a list of prompts."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"text: expected a string prompt, got {type(t).__name__}")
        return self.encoder(self.tokenizer(texts).to(self.device)).float().cpu()

    def encode(self, text: str) -> list:
        """ComfyUI CONDITIONING for one prompt."""
        return [[self.encode_context([text]), {}]]

    def __repr__(self) -> str:
        return f"TextEncoderWrapper(vocabulary={len(self.tokenizer)} tokens, max_length={self.tokenizer.max_length})"


def _check_finite(t: Tensor, name: str, fix: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf values; {fix}")


class PixelVAE:
    """The VAE-like object of a pixel-space model: IMAGE [B, H, W, 3] in 0..1 <-> latent [B, 3, H, W] in -1..1."""

    latent_channels = 3
    downscale_ratio = 1

    def encode(self, images: Tensor) -> Tensor:
        """Latent [B, 3, H, W] (the image in -1..1) for IMAGE [B, H, W, 3] (or 4 channels: alpha is dropped).

        Values outside 0..1 are kept, as ComfyUI's VAE Encode keeps them; NaN or Inf is refused.
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"pixels: expected an IMAGE tensor [B, H, W, 3], got {type(images).__name__}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"pixels: expected an IMAGE tensor [B, H, W, 3] (channels last, 4 with alpha), got "
                             f"shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"pixels: expected a float IMAGE tensor (ComfyUI's images hold 0..1), got dtype "
                            f"{images.dtype}")
        _check_finite(images, "pixels", "fix or replace the node that made the image")
        return images[..., :3].float().permute(0, 3, 1, 2).mul(2).sub(1).contiguous()

    def decode(self, latent: Tensor) -> Tensor:
        """IMAGE [B, H, W, 3] in 0..1 for a latent [B, 3, H, W]."""
        if not isinstance(latent, Tensor) or latent.ndim != 4 or latent.shape[1] != 3:
            shape = tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
            raise ValueError(f"samples: expected a latent [B, 3, H, W] from this model, got {shape}; decode "
                             "latents with the VAE of the model that produced them")
        if not latent.is_floating_point():
            raise TypeError(f"samples: expected a float latent, got dtype {latent.dtype}")
        _check_finite(latent, "samples", "check the nodes before this one (a lower cfg or another sampler, if "
                                         "it came from a KSampler)")
        return latent.float().add(1).div(2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()

    def __repr__(self) -> str:
        return "PixelVAE()"


def build(tensors: dict, config: dict, device: Union[str, torch.device] = "cpu", path: str = "<memory>") -> tuple:
    """(model, clip, vae) from loaded tensors and config."""
    from .network import NetConfig, TextEncoder, TinyUNet, Tokenizer
    net_cfg = NetConfig.from_dict(config["net"])
    tokenizer = Tokenizer(config["vocabulary"], config["max_length"], config.get("synonyms"))
    text, unet = TextEncoder(net_cfg), TinyUNet(net_cfg)
    for prefix, module in (("text.", text), ("unet.", unet)):
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            problems = [f"{len(v)} {what} (e.g. {prefix}{v[0]})" for what, v in
                        (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("tensors of the wrong shape", wrong)) if v]
            raise BundledModelError(f"weights file {path!r} does not match its config: {'; '.join(problems)}; it "
                                    "may be from another version of the pack: retrain it with tools/train.py")
        module.load_state_dict(state, strict=True)
    text.to(device).eval().requires_grad_(False)
    unet.to(device).eval().requires_grad_(False)
    lf = config["latent_format"]
    fmt = LatentFormat(lf["channels"], lf["downscale"], lf["scale_factor"], lf["shift_factor"])
    model = DiffusionModel(unet, _model_sampling(config), fmt, name=f"ksampler-tiny-{config['kind']}")
    model.config = config
    return model, TextEncoderWrapper(text, tokenizer), PixelVAE()


def load_bundled(kind: str = DEFAULT_KIND, device: Union[str, torch.device] = "cpu",
                 path: Optional[str] = None) -> tuple:
    """(model, clip, vae) of a bundled checkpoint ("eps" or "flow", or a weights ``path``); cached per file."""
    path = path or weights_path(kind)
    key = (os.path.abspath(path), str(device))
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = None
    cached = _CACHE.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    tensors, config = load_weights(path)
    result = build(tensors, config, device, path)
    _CACHE[key] = (stamp, result)
    return result
