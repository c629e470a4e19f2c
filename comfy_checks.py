"""Inside ComfyUI: what the host model expects of the graph, and the guard on its outputs during a run.

Everything is read from the host's objects by attribute (nothing here imports ``comfy``):

* ``ModelPatcher.get_model_object('latent_format')``: latent channels and dimensions;
* ``model.model`` (a ``BaseModel``): its ``model_config`` (the family's name and ``unet_config``),
  ``adm_channels`` and ``diffusion_model``, the network that reads the conditioning.

Only the network classes in ``CONTEXT_WIDTH`` (checked in the real ComfyUI by ``tools/comfy_bad_inputs.py``)
get a conditioning-width check; for any other model that field stays unknown and is not checked.
"""
from __future__ import annotations

import torch

from .graph_checks import ModelSpec, check_graph
from .guard import ModelOutputError, check_output_shape
from .validation import KSamplerInputError

__all__ = ["check_host_model", "host_spec", "check_host_graph", "model_label", "HostOutputGuard", "CONTEXT_WIDTH"]

# network class name -> how to read the width of the conditioning it reads
CONTEXT_WIDTH = {
    "UNetModel": lambda base, net: base.model_config.unet_config["context_dim"],        # SD1.x, SD2.x, SDXL
    "OpenAISignatureMMDITWrapper": lambda base, net: net.context_embedder.in_features,  # SD3
    "WanModel": lambda base, net: net.text_embedding[0].in_features,                   # Wan 2.1 / 2.2
}


def _mmdit_max_side(base, net):
    """SD3's MMDiT crops a stored position embedding of pos_embed_max_size patches a side to the latent, rounding
    a side h to (h + 1) // patch patches; so the longest side it takes is this (None: no stored embedding)."""
    if getattr(net, "pos_embed", None) is None:
        return None
    patch = net.x_embedder.patch_size[0]
    return patch * net.pos_embed_max_size + patch - 2


# network class name -> the longest latent side it takes (checked in the real ComfyUI by tools/comfy_bad_inputs.py)
MAX_SIDE = {"OpenAISignatureMMDITWrapper": _mmdit_max_side}
# model classes whose pooled_output is their 'y' input as it is (its width is the model's adm_channels)
POOLED_IS_Y = ("SD3",)
# (latent channels, spatial dims) -> the node that makes an empty latent for such a model
EMPTY_LATENT_NODES = {(4, 2): "Empty Latent Image", (16, 2): "EmptySD3LatentImage",
                      (16, 3): "EmptyHunyuanLatentVideo"}


def model_label(model) -> str:
    """The model's family as ComfyUI detected it (``SD15``, ``SD3``, ``WAN21_T2V``, ...)."""
    base = model if hasattr(model, "model_config") else getattr(model, "model", model)
    config = getattr(base, "model_config", None)
    return type(config).__name__ if config is not None else type(base).__name__


def check_host_model(model) -> None:
    """A MODEL (a ComfyUI ModelPatcher around a diffusion model) that the host can sample."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "diffusion_model") or not hasattr(base, "model_sampling"):
        raise KSamplerInputError(f"model: got a {type(model).__name__} that holds no ComfyUI diffusion model; "
                                 "connect the MODEL output of a checkpoint loader")
    try:
        fmt = model.get_model_object("latent_format")
        int(fmt.latent_channels)
    except Exception as e:
        raise KSamplerInputError(f"model: the {model_label(model)} MODEL has no usable latent format "
                                 f"({type(e).__name__}: {e}); load it with a checkpoint loader") from None


def _read(fn, *args):
    try:
        value = fn(*args)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def host_spec(model) -> ModelSpec:
    """What a ComfyUI MODEL expects: latent channels and layout, conditioning width, pooled output."""
    base = model.model
    fmt = model.get_model_object("latent_format")
    channels, dims = int(fmt.latent_channels), int(getattr(fmt, "latent_dimensions", 2))
    net = base.diffusion_model
    reader = CONTEXT_WIDTH.get(type(net).__name__)
    context_dim = _read(reader, base, net) if reader else None
    label = model_label(model)
    pooled_dim = _read(lambda: base.adm_channels) if type(base).__name__ in POOLED_IS_Y else None
    side_reader = MAX_SIDE.get(type(net).__name__)
    max_side = _read(side_reader, base, net) if side_reader else None
    return ModelSpec(f"this {label} model", channels, dims, context_dim=context_dim, pooled_dim=pooled_dim,
                     max_side=max_side,
                     empty_latent_node=EMPTY_LATENT_NODES.get((channels, dims), f"the empty latent node for {label}"),
                     encoder_hint=f"the CLIP (text encoder) that belongs to this {label} checkpoint",
                     vae_hint="VAE Encode with this checkpoint's VAE")


def check_host_graph(model, positive, negative, latent, cfg, reads_uncond: bool):
    """The MODEL, then the graph against it; returns ``check_latent``'s (samples, batch_index, noise_mask).

    ``reads_uncond``: the sampler reads the unconditional estimate (CFG++), so ``negative`` is needed even at cfg 1.
    Nested latents (several streams: LTX-2's video + audio) are checked stream by stream.
    """
    check_host_model(model)
    return check_graph(host_spec(model), positive, negative, latent, cfg, reads_uncond, nested=True)


class HostOutputGuard:
    """Checks what the host's model returns during one run, where ComfyUI's own code would crash on it.

    * a forward hook on the network: ``None`` or a wrong shape (it must match the latent) names the model;
    * a ``model_function_wrapper`` chained after any existing one (a model patch): the same for its output.
    The hook is removed on exit, whatever happened; the model options are a copy.
    """

    def __init__(self, base_model, latent_channels: int, label: str):
        self.net = getattr(base_model, "diffusion_model", None)
        self.channels, self.label = latent_channels, label
        self._handle = None
        self._previous = None

    def __enter__(self):
        if isinstance(self.net, torch.nn.Module):
            self._handle = self.net.register_forward_hook(self._check_network)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return False

    def _check_network(self, module, inputs, output):
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor) or isinstance(output, (list, tuple)):
            return None  # several latent streams: ComfyUI packs them itself
        if not isinstance(output, torch.Tensor):
            raise ModelOutputError(f"model: the {self.label} network ({type(module).__name__}) returned "
                                   f"{type(output).__name__} instead of a tensor; a model patch or custom model is "
                                   "broken: remove the patches added last")
        expected = (x.shape[0], self.channels) + tuple(x.shape[2:])
        if tuple(output.shape) != expected:
            raise ModelOutputError(f"model: the {self.label} network ({type(module).__name__}) returned shape "
                                   f"{tuple(output.shape)} for a latent of shape {expected}; check the model "
                                   "patches and that the latent belongs to this model")
        return None

    def model_options(self, options: dict) -> dict:
        """A copy of ``options`` whose model function checks its output (chained after an existing wrapper)."""
        out = dict(options)
        self._previous = out.get("model_function_wrapper")
        out["model_function_wrapper"] = self._wrapper
        return out

    def _wrapper(self, apply_model, args):
        if self._previous is not None:
            out = self._previous(apply_model, args)
        else:
            out = apply_model(args["input"], args["timestep"], **args["c"])
        check_output_shape(out, args["input"], f"the {self.label} model function", "model output")
        return out
