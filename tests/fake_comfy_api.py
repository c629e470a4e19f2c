"""A stand-in for the slice of ComfyUI's V3 node API (``comfy_api.latest``) that ksampler.node_schema uses.

NOT ComfyUI: a minimal fake written for tests (CI has no ComfyUI). Inputs and outputs record their arguments;
``Schema`` is a dataclass with the fields the pack passes (``search_aliases`` only when asked, as on newer hosts);
``v1_view`` turns a schema back into the classic ``INPUT_TYPES`` form by ComfyUI's documented mapping, so the tests
can compare the two schemas the pack builds from one table.
"""
from __future__ import annotations

import dataclasses
import enum
import sys
import types


class Hidden(str, enum.Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class UploadType(str, enum.Enum):
    image = "image_upload"


class FolderType(str, enum.Enum):
    input = "input"
    output = "output"


class _Input:
    def __init__(self, id: str, **kwargs):
        self.id, self.kwargs = id, kwargs


class _Output:
    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _comfytype(io_type: str):
    class Input(_Input):
        pass

    class Output(_Output):
        pass
    Input.io_type = Output.io_type = io_type
    return type(io_type.title(), (), {"io_type": io_type, "Input": Input, "Output": Output})


Int, Float, String, Boolean, Combo = (_comfytype(t) for t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))
Model, Clip, Vae, Conditioning, Latent, Image, Mask, Sampler, Sigmas = (
    _comfytype(t) for t in ("MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "SAMPLER", "SIGMAS"))


def Custom(io_type: str):
    return _comfytype(io_type)


def make_schema_class(with_search_aliases: bool):
    fields = [("node_id", str), ("display_name", str, None), ("category", str, "sd"),
              ("inputs", list, dataclasses.field(default_factory=list)),
              ("outputs", list, dataclasses.field(default_factory=list)),
              ("hidden", list, dataclasses.field(default_factory=list)), ("description", str, ""),
              ("is_output_node", bool, False)]
    if with_search_aliases:
        fields.append(("search_aliases", list, dataclasses.field(default_factory=list)))
    return dataclasses.make_dataclass("Schema", fields)


Schema = make_schema_class(True)


class _HiddenHolder:
    def __init__(self, values: dict):
        self.values = values

    def __getattr__(self, name):
        return self.values.get(name)


class ComfyNode:
    hidden = _HiddenHolder({})

    @classmethod
    def define_schema(cls):
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError


class ComfyExtension:
    async def get_node_list(self):
        raise NotImplementedError


_OPTION_NAMES = {"dynamic_prompts": "dynamicPrompts"}


def v1_view(schema) -> dict:
    """The classic INPUT_TYPES of a V3 schema (custom hidden kinds have no V3 form and are left out)."""
    view: dict = {"required": {}}
    for item in schema.inputs:
        kwargs = dict(item.kwargs)
        section = "optional" if kwargs.pop("optional", False) else "required"
        options = {_OPTION_NAMES.get(k, k): v for k, v in kwargs.items() if v is not None and (v is not False or k == "default")}
        kind = item.io_type
        if kind == "COMBO":
            choices = options.pop("options")
            if "upload" in options:
                options[options.pop("upload").value] = True
                options.pop("image_folder", None)
            view.setdefault(section, {})[item.id] = (choices, options)
        else:
            view.setdefault(section, {})[item.id] = (kind, options)
    return view


def install(monkeypatch, with_search_aliases: bool = True):
    """Put ``comfy`` and ``comfy_api.latest`` (this fake) into sys.modules, undone by monkeypatch."""
    io = sys.modules[__name__]
    monkeypatch.setattr(io, "Schema", make_schema_class(with_search_aliases))
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, ComfyExtension
    package = types.ModuleType("comfy_api")
    package.latest = latest
    for name, module in (("comfy", types.ModuleType("comfy")), ("comfy_api", package),
                         ("comfy_api.latest", latest)):
        monkeypatch.setitem(sys.modules, name, module)
    return io


__all__ = ["install", "v1_view"]
