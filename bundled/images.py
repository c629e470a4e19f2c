"""PNG reading and writing for IMAGE tensors ([B, H, W, 3] float in 0..1, ComfyUI's convention), via Pillow."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

__all__ = ["load_image", "save_png", "resize_image", "image_grid", "next_free_path", "check_output_folder",
           "check_file_prefix", "check_image_tensor"]

# file systems allow 255 bytes per name; next_free_path adds '_00001_.png' (and longer counters past 99999)
MAX_PREFIX_BYTES = 240
MAX_NAME_BYTES = 255


def _pil():
    try:
        from PIL import Image, PngImagePlugin
    except ImportError:
        raise ImportError("Pillow is needed to read and write images: pip install pillow") from None
    return Image, PngImagePlugin


def load_image(path: str) -> tuple:
    """(IMAGE [1, H, W, 3] in 0..1, MASK [1, H, W]) from an image file; the mask is 1 - alpha (zeros without alpha)."""
    Image, _ = _pil()
    if os.path.isdir(path):
        raise ValueError(f"image: {path!r} is a folder; give the path of a PNG or JPEG file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image: file {path!r} does not exist; give the path of a PNG or JPEG file")
    try:
        with Image.open(path) as im:
            im.load()
            rgba = im.convert("RGBA")
            has_alpha = "A" in im.getbands() or "transparency" in im.info
    except Exception as e:
        raise ValueError(f"image: cannot read {path!r} as an image ({type(e).__name__}: {e})") from None
    data = torch.frombuffer(bytearray(rgba.tobytes()), dtype=torch.uint8).view(rgba.height, rgba.width, 4)
    data = data.float() / 255.0
    image = data[..., :3].unsqueeze(0).contiguous()
    mask = (1.0 - data[..., 3]).unsqueeze(0) if has_alpha else torch.zeros(1, rgba.height, rgba.width)
    return image, mask


def _input_error(message: str) -> ValueError:
    from ..validation import KSamplerInputError
    return KSamplerInputError(message)


def check_output_folder(name: str, path: str) -> str:
    """Create the folder ``path`` (and its parents) now, so one that cannot be made fails before any work."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise _input_error(f"{name}: expected a folder path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise _input_error(f"{name}: {path!r} is an existing file, not a folder; give a folder (a missing one is "
                           "created)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _input_error(f"{name}: cannot create the folder {path!r} ({e.strerror or e}); give a folder you can "
                           "write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _input_error(f"{name}: the folder {path!r} is not writable; give a folder you can write to")
    return path


def check_file_prefix(name: str, prefix: str) -> str:
    """A file name prefix (it may hold subfolders): no NUL, and every part short enough for a file system."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise _input_error(f"{name}: expected a non-empty string, got {prefix!r}")
    if "\0" in prefix:
        raise _input_error(f"{name}: {prefix!r} contains a NUL character, which no file name may hold; remove it")
    *folders, base = prefix.replace(os.sep, "/").split("/")
    if not base.strip():
        raise _input_error(f"{name}: {prefix!r} ends with a folder separator; end it with a file name prefix")
    if len(base.encode("utf-8")) > MAX_PREFIX_BYTES:
        raise _input_error(f"{name}: the file name part is {len(base.encode('utf-8'))} bytes long; at most "
                           f"{MAX_PREFIX_BYTES} (file systems allow {MAX_NAME_BYTES} per name and the counter "
                           "'_00001_.png' is added): shorten it")
    for folder in folders:
        if len(folder.encode("utf-8")) > MAX_NAME_BYTES:
            raise _input_error(f"{name}: the folder name {folder[:40]!r}... is {len(folder.encode('utf-8'))} bytes "
                               f"long; at most {MAX_NAME_BYTES}: shorten it")
    return prefix


def check_image_tensor(images, name: str = "images") -> Tensor:
    """IMAGE [B, H, W, 3 or 4]: a float tensor with pixels (H, W > 0) and no NaN or Inf."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise _input_error(f"{name}: expected an IMAGE tensor [B, H, W, 3], got {shape}")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise _input_error(f"{name}: the images are {images.shape[2]}x{images.shape[1]} pixels (empty); connect a "
                           "node that outputs an image with pixels")
    if not images.is_floating_point():
        raise _input_error(f"{name}: expected a float IMAGE tensor (ComfyUI's images hold 0..1), got dtype "
                           f"{images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise _input_error(f"{name}: contains NaN or Inf values, which a PNG cannot store; check the nodes before "
                           "this one (a lower cfg or another sampler, if it came from a KSampler)")
    return images


def _to_uint8(image: Tensor) -> Tensor:
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images: expected [H, W, 3] per image, got {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"images: the image is {image.shape[1]}x{image.shape[0]} pixels (empty); nothing to save")
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):
        raise ValueError("images: contains NaN or Inf values, which a PNG cannot store")
    return (image.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)


def save_png(image: Tensor, path: str, text: Optional[dict] = None, scale: int = 1) -> str:
    """Write one image [H, W, 3] (0..1) as PNG, with optional tEXt chunks, enlarged ``scale`` times (nearest)."""
    Image, PngImagePlugin = _pil()
    pixels = _to_uint8(image)
    im = Image.fromarray(pixels.numpy() if pixels.shape[-1] != 1 else pixels[..., 0].numpy())
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path, pnginfo=info)
    return path


def resize_image(image: Tensor, width: int, height: int) -> Tensor:
    """IMAGE [B, H, W, 3] resized to ``height`` x ``width`` (area-weighted when shrinking, bicubic when enlarging)."""
    if image.shape[1] == height and image.shape[2] == width:
        return image.clone()
    x = image.permute(0, 3, 1, 2).float()
    shrink = height < image.shape[1] and width < image.shape[2]
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="area" if shrink else "bicubic",
                                        align_corners=None if shrink else False)
    return x.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def image_grid(rows: list, pad: int = 1, background: float = 1.0) -> Tensor:
    """One image [H, W, 3] from rows of equally sized images [h, w, 3], with ``pad`` pixels between them."""
    h, w = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    out = torch.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), background)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = im[..., :3]
    return out


def next_free_path(directory: str, prefix: str, suffix: str = ".png") -> str:
    """``directory/prefix_00001_.png`` with the first counter not yet used (ComfyUI's file naming)."""
    os.makedirs(directory, exist_ok=True)
    counter = 1
    existing = set(os.listdir(directory))
    base = os.path.basename(prefix)
    while f"{base}_{counter:05d}_{suffix}" in existing:
        counter += 1
    return os.path.join(directory, f"{base}_{counter:05d}_{suffix}")
