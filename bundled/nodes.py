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

from ..node_schema import In, NodeSpec, Out, host_folder, v1_node

__all__ = ["CheckpointLoader", "TextEncode", "EmptyLatentImage", "LoadImage", "VAEEncode",
           "VAEDecode", "SaveImage"]

from ..graph_checks import BUNDLED_CLIP_TYPE, BUNDLED_LATENT_KEY, BUNDLED_MODEL_TYPE, BUNDLED_VAE_TYPE

CATEGORY = "ksampler/bundled"
MODEL_KINDS = ["flow", "eps"]   # the first is the default (see DEFAULT_KIND in loader.py)
SIZE_MULTIPLE = 16              # the bundled UNet's patch (4) times its two downsamplings
MAX_SIZE = 512
MAX_SCALE = 16                  # Save Image's scale (and the CLI's --scale)
PREVIEW_SIDE = 256              # the short side of the previews the Save node shows inside ComfyUI


def _input_error(message: str):
    from ..validation import KSamplerInputError
    return KSamplerInputError(message)


@v1_node(NodeSpec(
    function="load_checkpoint", category=CATEGORY,
    search_aliases=("checkpoint", "load model", "bundled", "toy model"),
    description="Loads the pack's bundled 32x32 text-to-image model (no download needed).",
    inputs=(In("ckpt_name", "COMBO", "The bundled checkpoint: 'flow' (rectified flow) or 'eps' (epsilon prediction "
               "on SD1.x's discrete schedule).", choices=MODEL_KINDS),),
    outputs=(Out(BUNDLED_MODEL_TYPE, "The model used for denoising latents.", "MODEL"),
             Out(BUNDLED_CLIP_TYPE, "The text encoder used for encoding text prompts.", "CLIP"),
             Out(BUNDLED_VAE_TYPE, "The VAE model used for encoding and decoding images to and from latent space.",
                 "VAE"))))
class CheckpointLoader:
    """Load the bundled model (trained by this pack on its procedural shapes dataset)."""

    def load_checkpoint(self, ckpt_name):
        if ckpt_name not in MODEL_KINDS:
            raise _input_error(f"ckpt_name: unknown bundled checkpoint {ckpt_name!r}; choose one of: "
                               f"{', '.join(MODEL_KINDS)}")
        from .loader import load_bundled
        return load_bundled(ckpt_name)


@v1_node(NodeSpec(
    function="encode", category=CATEGORY, search_aliases=("prompt", "text", "clip", "conditioning", "bundled"),
    description="Encodes a text prompt into CONDITIONING for the bundled model.",
    inputs=(In("text", "STRING", "The text to be encoded (words outside the model's vocabulary are ignored as "
               "unknown tokens).", multiline=True, dynamic_prompts=True),
            In("clip", BUNDLED_CLIP_TYPE, "The CLIP model used for encoding the text.")),
    outputs=(Out("CONDITIONING", "A conditioning containing the embedded text used to guide the diffusion model."),)))
class TextEncode:
    """Encode a prompt with the bundled text encoder."""

    def encode(self, text, clip):
        if not isinstance(text, str):
            raise _input_error(f"text: expected a string, got {type(text).__name__}")
        from .loader import TextEncoderWrapper
        if not isinstance(clip, TextEncoderWrapper):
            raise _input_error(f"clip: expected the CLIP output of the bundled checkpoint loader, got "
                               f"{type(clip).__name__}; connect the loader's CLIP output")
        return (clip.encode(text),)


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not SIZE_MULTIPLE <= value <= MAX_SIZE:
        raise _input_error(f"{name}: must be an integer between {SIZE_MULTIPLE} and {MAX_SIZE}, got {value!r}")
    if value % SIZE_MULTIPLE:
        raise _input_error(f"{name}: must be a multiple of {SIZE_MULTIPLE} for the bundled model, got {value}; "
                           f"use {value // SIZE_MULTIPLE * SIZE_MULTIPLE or SIZE_MULTIPLE}")
    return value


@v1_node(NodeSpec(
    function="generate", category=CATEGORY, search_aliases=("empty latent", "blank", "txt2img", "bundled"),
    description="Creates an empty latent batch for the bundled model, to be denoised by the KSampler.",
    inputs=(In("width", "INT", "The width of the image in pixels (the model is trained at 32).", default=32,
               min=SIZE_MULTIPLE, max=MAX_SIZE, step=SIZE_MULTIPLE),
            In("height", "INT", "The height of the image in pixels (the model is trained at 32).", default=32,
               min=SIZE_MULTIPLE, max=MAX_SIZE, step=SIZE_MULTIPLE),
            In("batch_size", "INT", "The number of images in the batch.", default=1, min=1, max=4096)),
    outputs=(Out("LATENT", "The empty latent image batch."),)))
class EmptyLatentImage:
    """An all-zero latent sized for the bundled model (pixel space: 3 channels, no downscaling)."""

    def generate(self, width, height, batch_size=1):
        import torch
        _check_size("width", width)
        _check_size("height", height)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
            raise _input_error(f"batch_size: must be an integer between 1 and 4096, got {batch_size!r}")
        return ({"samples": torch.zeros(batch_size, 3, height, width), BUNDLED_LATENT_KEY: True},)


IMAGE_TOOLTIP = ("The image to load: pick a file of ComfyUI's input folder or upload one. Headless "
                 "(python -m ksampler run) it is a path, relative to the workflow file's folder.")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def input_images() -> list | None:
    """The image files of ComfyUI's input folder (subfolders as 'sub/name.png'), or None outside ComfyUI."""
    root = host_folder("input")
    if root is None:
        return None
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def _resolve(path: str, base_dir, kind: str) -> str:
    """An input file's path: inside the ComfyUI server it must stay in ComfyUI's input folder."""
    served_root = host_folder(kind) if base_dir is None else None
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


@v1_node(NodeSpec(
    function="load_image", category=CATEGORY, search_aliases=("load image", "open image", "img2img", "bundled"),
    description="Loads an image file (PNG, JPEG, ...) for image-to-image sampling.",
    inputs=(In("image", "COMBO", IMAGE_TOOLTIP, default="input.png", choices=input_images, image_upload=True),),
    hidden={"base_dir": "KSAMPLER_BASE_DIR"},
    outputs=(Out("IMAGE", "The image, [1, H, W, 3] in 0..1."), Out("MASK", "1 where the image is transparent."))))
class LoadImage:
    """Load an image file as IMAGE (and its alpha as MASK)."""

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


def _check_vae(vae) -> None:
    from .loader import PixelVAE
    if not isinstance(vae, PixelVAE):
        raise _input_error(f"vae: expected the VAE output of the bundled checkpoint loader, got "
                           f"{type(vae).__name__}; connect the loader's VAE output")


@v1_node(NodeSpec(
    function="encode", category=CATEGORY, search_aliases=("vae encode", "encode image", "img2img", "bundled"),
    description="Encodes an image into a latent for image-to-image sampling (denoise < 1).",
    inputs=(In("pixels", "IMAGE", "The image to be encoded."),
            In("vae", BUNDLED_VAE_TYPE, "The VAE model used for encoding the image.")),
    outputs=(Out("LATENT", "The encoded latent image."),)))
class VAEEncode:
    """Encode an IMAGE into the bundled model's latent space."""

    def encode(self, pixels, vae):
        _check_vae(vae)
        try:
            samples = vae.encode(pixels)
        except (TypeError, ValueError) as e:
            raise _input_error(str(e)) from None
        h, w = samples.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            from ..graph_checks import nearest_side
            raise _input_error(f"pixels: the image is {w}x{h}; the bundled model needs sides that are multiples "
                               f"of {SIZE_MULTIPLE}: resize it to {nearest_side(w, SIZE_MULTIPLE)}x"
                               f"{nearest_side(h, SIZE_MULTIPLE)} (the nearest valid size)")
        return ({"samples": samples, BUNDLED_LATENT_KEY: True},)


@v1_node(NodeSpec(
    function="decode", category=CATEGORY, search_aliases=("vae decode", "decode latent", "bundled"),
    description="Decodes latents into images.",
    inputs=(In("samples", "LATENT", "The latent to be decoded."),
            In("vae", BUNDLED_VAE_TYPE, "The VAE model used for decoding the latent.")),
    outputs=(Out("IMAGE", "The decoded image."),)))
class VAEDecode:
    """Decode a latent of the bundled model into an IMAGE."""

    def decode(self, samples, vae):
        if not isinstance(samples, dict) or "samples" not in samples:
            raise _input_error(f"samples: expected a LATENT dict with a 'samples' tensor, got "
                               f"{type(samples).__name__}")
        _check_vae(vae)
        try:
            return (vae.decode(samples["samples"]),)
        except (TypeError, ValueError) as e:
            raise _input_error(str(e)) from None


@v1_node(NodeSpec(
    function="save_images", category=CATEGORY, output_node=True,
    search_aliases=("save image", "save", "export image", "output image", "bundled"),
    description="Saves the images to the output folder as PNG files (the graph in their 'prompt' text chunk).",
    inputs=(In("images", "IMAGE", "The images to save."),
            In("filename_prefix", "STRING", "The prefix for the file names; it may include a subfolder (e.g. "
               "'tests/img').", default="ksampler"),
            In("scale", "INT", "Enlarge the saved images this many times (nearest neighbour).", default=1, min=1,
               max=MAX_SCALE, optional=True)),
    hidden={"prompt": "PROMPT", "output_dir": "KSAMPLER_OUTPUT_DIR"}))
class SaveImage:
    """Save images as PNG files (the graph is stored in the PNG's 'prompt' text chunk, as ComfyUI does)."""

    @classmethod
    def IS_CHANGED(cls, *args, **kwargs):
        return float("nan")   # always save again when the graph is re-run

    def save_images(self, images, filename_prefix="ksampler", scale=1, prompt=None, output_dir=None):
        from .images import check_file_prefix, check_image_tensor, check_output_folder, next_free_path, save_png
        check_image_tensor(images, "images")
        check_file_prefix("filename_prefix", filename_prefix)
        if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= MAX_SCALE:
            raise _input_error(f"scale: must be an integer between 1 and {MAX_SCALE}, got {scale!r}")
        root = os.path.abspath(output_dir or host_folder("output") or "output")
        folder = os.path.abspath(os.path.join(root, os.path.dirname(filename_prefix)))
        if os.path.commonpath([root, folder]) != root:
            raise _input_error(f"filename_prefix: {filename_prefix!r} points outside the output folder {root}; "
                               "use a relative prefix without '..'")
        check_output_folder("output_dir", root)
        if folder != root:
            check_output_folder("filename_prefix", folder)
        text = {"prompt": json.dumps(prompt)} if prompt is not None else {}
        subfolder = os.path.relpath(folder, root) if folder != root else ""
        preview_root = host_folder("temp") if output_dir is None else None
        ui = []
        for image in images:
            path = next_free_path(folder, os.path.basename(filename_prefix))
            save_png(image[..., :3], path, text, scale)
            entry = {"filename": os.path.basename(path), "subfolder": subfolder, "type": "output"}
            preview_scale = -(-PREVIEW_SIDE // min(image.shape[0], image.shape[1]))   # ceil
            if preview_root and preview_scale > scale:
                # the frontend shows images at their pixel size: a larger copy in the temp folder for the preview
                preview = next_free_path(preview_root, "ksampler_preview")
                save_png(image[..., :3], preview, {}, preview_scale)
                entry = {"filename": os.path.basename(preview), "subfolder": "", "type": "temp"}
            ui.append(entry)
        return {"ui": {"images": ui}, "result": ()}

