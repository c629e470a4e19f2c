"""Nodes for the bundled text-to-image model, shaped like ComfyUI's SD nodes so a graph for it reads like an SD graph.

Loader -> (MODEL, CLIP, VAE); text encode -> CONDITIONING; empty latent;
image load and VAE encode; VAE decode and image save.  Sampling is done by
``ksampler_KSampler``.  Heavy modules (torch, the networks, Pillow) are
imported inside the node functions, so importing the pack stays cheap.

Hidden inputs: ``PROMPT`` (the API graph, stored in saved PNGs as ComfyUI
does), ``KSAMPLER_BASE_DIR`` (where relative image paths are resolved: the
workflow file's folder when run by ``python -m ksampler run``) and
``KSAMPLER_OUTPUT_DIR`` (where images are saved).  Inside ComfyUI the last two
are not given and ComfyUI's input and output folders are used.
"""
from __future__ import annotations

import json
import os
import sys

__all__ = ["CheckpointLoader", "TextEncode", "EmptyLatentImage", "LoadImage", "VAEEncode",
           "VAEDecode", "SaveImage"]

from ..graph_checks import BUNDLED_CLIP_TYPE, BUNDLED_LATENT_KEY, BUNDLED_MODEL_TYPE, BUNDLED_VAE_TYPE

CATEGORY = "ksampler/bundled"
MODEL_KINDS = ["flow", "eps"]   # the first is the default (see DEFAULT_KIND in loader.py)
SIZE_MULTIPLE = 16              # the bundled UNet's patch (4) times its two downsamplings
MAX_SIZE = 512


def _input_error(message: str):
    from ..validation import KSamplerInputError
    return KSamplerInputError(message)


def _comfy_dir(kind: str):
    """ComfyUI's input or output folder when running inside ComfyUI, else None."""
    folder_paths = sys.modules.get("folder_paths")
    if folder_paths is None:
        return None
    getter = getattr(folder_paths, f"get_{kind}_directory", None)
    return getter() if getter else None


class CheckpointLoader:
    """Load the bundled model (trained by this pack on its procedural shapes dataset)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (MODEL_KINDS, {"tooltip": "The bundled checkpoint: 'flow' (rectified flow) or 'eps' "
                                                   "(epsilon prediction on SD1.x's discrete schedule)."}),
        }}

    RETURN_TYPES = (BUNDLED_MODEL_TYPE, BUNDLED_CLIP_TYPE, BUNDLED_VAE_TYPE)
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.",
                       "The text encoder used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")
    FUNCTION = "load_checkpoint"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the pack's bundled 32x32 text-to-image model (no download needed)."

    def load_checkpoint(self, ckpt_name):
        if ckpt_name not in MODEL_KINDS:
            raise _input_error(f"ckpt_name: unknown bundled checkpoint {ckpt_name!r}; choose one of: "
                               f"{', '.join(MODEL_KINDS)}")
        from .loader import load_bundled
        return load_bundled(ckpt_name)


class TextEncode:
    """Encode a prompt with the bundled text encoder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The text to be encoded (words outside the model's vocabulary are "
                                           "ignored as unknown tokens)."}),
            "clip": (BUNDLED_CLIP_TYPE, {"tooltip": "The CLIP model used for encoding the text."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes a text prompt into CONDITIONING for the bundled model."

    def encode(self, text, clip):
        if not isinstance(text, str):
            raise _input_error(f"text: expected a string, got {type(text).__name__}")
        if not hasattr(clip, "encode"):
            raise _input_error(f"clip: expected the CLIP output of the bundled checkpoint loader, got "
                               f"{type(clip).__name__}")
        return (clip.encode(text),)


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not SIZE_MULTIPLE <= value <= MAX_SIZE:
        raise _input_error(f"{name}: must be an integer between {SIZE_MULTIPLE} and {MAX_SIZE}, got {value!r}")
    if value % SIZE_MULTIPLE:
        raise _input_error(f"{name}: must be a multiple of {SIZE_MULTIPLE} for the bundled model, got {value}; "
                           f"use {value // SIZE_MULTIPLE * SIZE_MULTIPLE or SIZE_MULTIPLE}")
    return value


class EmptyLatentImage:
    """An all-zero latent sized for the bundled model (pixel space: 3 channels, no downscaling)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 32, "min": SIZE_MULTIPLE, "max": MAX_SIZE, "step": SIZE_MULTIPLE,
                              "tooltip": "The width of the image in pixels (the model is trained at 32)."}),
            "height": ("INT", {"default": 32, "min": SIZE_MULTIPLE, "max": MAX_SIZE, "step": SIZE_MULTIPLE,
                               "tooltip": "The height of the image in pixels (the model is trained at 32)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "The number of images in the batch."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "Creates an empty latent batch for the bundled model, to be denoised by the KSampler."

    def generate(self, width, height, batch_size=1):
        import torch
        _check_size("width", width)
        _check_size("height", height)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
            raise _input_error(f"batch_size: must be an integer between 1 and 4096, got {batch_size!r}")
        return ({"samples": torch.zeros(batch_size, 3, height, width), BUNDLED_LATENT_KEY: True},)


def _resolve(path: str, base_dir, kind: str) -> str:
    """An input file's path: inside the ComfyUI server it must stay in ComfyUI's input folder."""
    served_root = _comfy_dir(kind) if base_dir is None else None
    if served_root:
        root = os.path.abspath(served_root)
        resolved = os.path.abspath(os.path.join(root, path))
        if os.path.commonpath([root, resolved]) != root:
            raise _input_error(f"image: {path!r} is outside ComfyUI's input folder {root}; put the file there and "
                               "give its name")
        return resolved
    if os.path.isabs(path):
        return path
    return os.path.join(base_dir, path) if base_dir else os.path.abspath(path)


class LoadImage:
    """Load an image file as IMAGE (and its alpha as MASK)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("STRING", {"default": "input.png",
                                     "tooltip": "Path of the image file; relative paths are resolved against the "
                                                "workflow file's folder (ComfyUI's input folder inside ComfyUI)."}),
            },
            "hidden": {"base_dir": "KSAMPLER_BASE_DIR"},
        }

    RETURN_TYPES = ("IMAGE", "MASK")
    OUTPUT_TOOLTIPS = ("The image, [1, H, W, 3] in 0..1.", "1 where the image is transparent.")
    FUNCTION = "load_image"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads an image file (PNG, JPEG, ...) for image-to-image sampling."

    @classmethod
    def IS_CHANGED(cls, image, base_dir=None):
        try:
            path = _resolve(image, base_dir, "input") if isinstance(image, str) else ""
        except ValueError:
            return ""   # load_image reports it
        try:
            st = os.stat(path)
            return f"{path}:{st.st_mtime_ns}:{st.st_size}"
        except OSError:
            return path

    def load_image(self, image, base_dir=None):
        if not isinstance(image, str) or not image:
            raise _input_error(f"image: expected a file path, got {image!r}")
        from .images import load_image
        path = _resolve(image, base_dir, "input")
        try:
            return load_image(path)
        except (FileNotFoundError, ValueError) as e:
            raise _input_error(str(e)) from None


class VAEEncode:
    """Encode an IMAGE into the bundled model's latent space."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to be encoded."}),
            "vae": (BUNDLED_VAE_TYPE, {"tooltip": "The VAE model used for encoding the image."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The encoded latent image.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes an image into a latent for image-to-image sampling (denoise < 1)."

    def encode(self, pixels, vae):
        if not hasattr(vae, "encode"):
            raise _input_error(f"vae: expected the VAE output of the bundled checkpoint loader, got "
                               f"{type(vae).__name__}")
        try:
            samples = vae.encode(pixels)
        except (TypeError, ValueError) as e:
            raise _input_error(str(e)) from None
        h, w = samples.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise _input_error(f"pixels: the image is {w}x{h}; the bundled model needs sides that are multiples "
                               f"of {SIZE_MULTIPLE} (resize it, e.g. to 32x32)")
        return ({"samples": samples, BUNDLED_LATENT_KEY: True},)


class VAEDecode:
    """Decode a latent of the bundled model into an IMAGE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
            "vae": (BUNDLED_VAE_TYPE, {"tooltip": "The VAE model used for decoding the latent."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Decodes latents into images."

    def decode(self, samples, vae):
        if not isinstance(samples, dict) or "samples" not in samples:
            raise _input_error(f"samples: expected a LATENT dict with a 'samples' tensor, got "
                               f"{type(samples).__name__}")
        if not hasattr(vae, "decode"):
            raise _input_error(f"vae: expected the VAE output of the bundled checkpoint loader, got "
                               f"{type(vae).__name__}")
        try:
            return (vae.decode(samples["samples"]),)
        except (TypeError, ValueError) as e:
            raise _input_error(str(e)) from None


class SaveImage:
    """Save images as PNG files (the graph is stored in the PNG's 'prompt' text chunk, as ComfyUI does)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ksampler",
                                               "tooltip": "The prefix for the file names; it may include a "
                                                          "subfolder (e.g. 'tests/img')."}),
            },
            "optional": {
                "scale": ("INT", {"default": 1, "min": 1, "max": 16,
                                  "tooltip": "Enlarge the saved images this many times (nearest neighbour)."}),
            },
            "hidden": {"prompt": "PROMPT", "output_dir": "KSAMPLER_OUTPUT_DIR"},
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("paths",)
    OUTPUT_TOOLTIPS = ("The paths of the saved files, one per line.",)
    OUTPUT_NODE = True
    FUNCTION = "save_images"
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves the images to the output folder."

    @classmethod
    def IS_CHANGED(cls, *args, **kwargs):
        return float("nan")   # always save again when the graph is re-run

    def save_images(self, images, filename_prefix="ksampler", scale=1, prompt=None, output_dir=None):
        import torch
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise _input_error(f"images: expected an IMAGE tensor [B, H, W, 3], got {shape}")
        if not isinstance(filename_prefix, str) or not filename_prefix.strip():
            raise _input_error(f"filename_prefix: expected a non-empty string, got {filename_prefix!r}")
        if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= 16:
            raise _input_error(f"scale: must be an integer between 1 and 16, got {scale!r}")
        from .images import next_free_path, save_png
        root = os.path.abspath(output_dir or _comfy_dir("output") or "output")
        folder = os.path.abspath(os.path.join(root, os.path.dirname(filename_prefix)))
        if os.path.commonpath([root, folder]) != root:
            raise _input_error(f"filename_prefix: {filename_prefix!r} points outside the output folder {root}; "
                               "use a relative prefix without '..'")
        text = {"prompt": json.dumps(prompt)} if prompt is not None else {}
        paths, ui = [], []
        for image in images:
            path = next_free_path(folder, os.path.basename(filename_prefix))
            save_png(image[..., :3], path, text, scale)
            paths.append(path)
            ui.append({"filename": os.path.basename(path), "subfolder": os.path.relpath(folder, root)
                       if folder != root else "", "type": "output"})
        return {"ui": {"images": ui}, "result": ("\n".join(paths),)}
