"""The bundled text-to-image model: a tiny network trained on a synthetic shapes dataset, its loader and nodes.

Not part of the core: nothing in ``models``, ``samplers``, ``schedulers``,
``conditioning`` or the sampling pass imports it.  Holds: ``loader`` (weights ->
MODEL, CLIP, VAE), ``network`` (text encoder, UNet, tokenizer), ``dataset``
(the scene renderer), ``images`` (PNG input/output), ``nodes`` (its ComfyUI
nodes) and ``weights/`` (the two safetensors checkpoints).
"""
__all__ = ["load_bundled", "weights_path", "BundledModelError", "KINDS", "DEFAULT_KIND"]


def __getattr__(name: str):
    """The loader's names, imported on first use (importing the nodes stays light)."""
    if name in __all__:
        from . import loader
        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
