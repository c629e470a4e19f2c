"""One declarative description per node, from which both ComfyUI node schemas are built.

Each node class carries a ``NodeSpec``: its inputs in widget order (names, types, defaults, ranges, tooltips), its
outputs (types, names, tooltips), category, description and search aliases.  From it:

- ``v1_node`` fills in the classic attributes (``INPUT_TYPES``, ``RETURN_TYPES``, ``OUTPUT_TOOLTIPS``, ...): used
  headless (``python -m ksampler run``) and by hosts without ``comfy_api``;
- ``v3_node`` builds an ``io.ComfyNode`` (``define_schema`` / ``execute``) for hosts with the V3 schema.

Saved workflows store widget values by position, so the order of ``inputs`` is public API: new inputs only ever go
at the end, as optional ones.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

__all__ = ["In", "Out", "NodeSpec", "v1_node", "v3_node", "host_io", "host_folder", "SCHEMA_ENV"]

SCHEMA_ENV = "KSAMPLER_NODE_SCHEMA"   # "v1" registers the classic nodes even on a host with the V3 schema
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def host_folder(kind: str) -> Optional[str]:
    """ComfyUI's "input", "output" or "temp" folder when running inside the ComfyUI server, else None."""
    folder_paths = sys.modules.get("folder_paths")
    getter = getattr(folder_paths, f"get_{kind}_directory", None) if folder_paths is not None else None
    return getter() if getter else None


@dataclass(frozen=True)
class In:
    """One input. ``type`` is a ComfyUI type name ("MODEL", "INT", ...) or ``"COMBO"`` with ``choices``."""
    name: str
    type: str
    tooltip: Union[str, Callable[[], str]]   # a callable is asked at each schema request (host-dependent text)
    default: Any = None
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    round: Optional[float] = None
    choices: Union[list, Callable[[], Optional[list]], None] = None   # a callable is asked at each schema request
    optional: bool = False
    control_after_generate: bool = False
    multiline: bool = False
    dynamic_prompts: bool = False
    image_upload: bool = False   # a combo of the host's input images, with upload and preview; headless a path

    def options(self) -> Optional[list]:
        return self.choices() if callable(self.choices) else self.choices

    def text(self) -> str:
        return self.tooltip() if callable(self.tooltip) else self.tooltip


@dataclass(frozen=True)
class Out:
    type: str
    tooltip: str
    name: Optional[str] = None   # shown on the socket; the type when None


@dataclass(frozen=True)
class NodeSpec:
    function: str                 # the method that runs the node
    category: str
    description: str
    inputs: tuple = ()
    outputs: tuple = ()
    search_aliases: tuple = ()
    hidden: dict = field(default_factory=dict)   # argument name -> hidden kind ("PROMPT", "KSAMPLER_BASE_DIR", ...)
    output_node: bool = False


# ------------------------------------------------------------------------------------------------
# V1: classic class attributes
# ------------------------------------------------------------------------------------------------
def v1_input(spec: In) -> tuple:
    """The classic ``(type or choices, options)`` pair of one input."""
    options = {"tooltip": spec.text()}
    for key in ("default", "min", "max", "step", "round"):
        value = getattr(spec, key)
        if value is not None:
            options[key] = value
    if spec.control_after_generate:
        options["control_after_generate"] = True
    if spec.multiline:
        options["multiline"] = True
    if spec.dynamic_prompts:
        options["dynamicPrompts"] = True
    if spec.type != "COMBO":
        return (spec.type, options)
    choices = spec.options()
    if spec.image_upload:
        if choices is None:   # no host: the file's path
            return ("STRING", options)
        options.pop("default", None)
        options["image_upload"] = True
    return (list(choices), options)


def v1_input_types(spec: NodeSpec) -> dict:
    types: dict = {"required": {}}
    for item in spec.inputs:
        types.setdefault("optional" if item.optional else "required", {})[item.name] = v1_input(item)
    if spec.hidden:
        types["hidden"] = dict(spec.hidden)
    return types


def v1_node(spec: NodeSpec):
    """Class decorator: the classic ComfyUI attributes of a node class, from its spec."""
    def decorate(cls):
        cls.SPEC = spec
        cls.INPUT_TYPES = classmethod(lambda _cls: v1_input_types(spec))
        cls.RETURN_TYPES = tuple(o.type for o in spec.outputs)
        if any(o.name for o in spec.outputs):
            cls.RETURN_NAMES = tuple(o.name or o.type for o in spec.outputs)
        cls.OUTPUT_TOOLTIPS = tuple(o.tooltip for o in spec.outputs)
        cls.FUNCTION = spec.function
        cls.CATEGORY = spec.category
        cls.DESCRIPTION = spec.description
        cls.SEARCH_ALIASES = list(spec.search_aliases)
        if spec.output_node:
            cls.OUTPUT_NODE = True
        return cls
    return decorate


# ------------------------------------------------------------------------------------------------
# V3: io.ComfyNode classes, for hosts with comfy_api's V3 schema
# ------------------------------------------------------------------------------------------------
def host_io():
    """The host's ``comfy_api.latest.io`` module, or None (no ComfyUI, an older one, or KSAMPLER_NODE_SCHEMA=v1)."""
    choice = os.environ.get(SCHEMA_ENV, "").strip().lower()
    if choice not in ("", "v1", "v3"):
        raise ValueError(f"{SCHEMA_ENV}: must be 'v1' or 'v3', got {choice!r}")
    if choice == "v1" or "comfy" not in sys.modules:   # only inside a ComfyUI process
        return None
    try:
        from comfy_api.latest import io
    except ImportError:
        return None
    return io if hasattr(io, "ComfyNode") and hasattr(io, "Schema") else None


def _io_class(io, type_name: str):
    """The io class of a ComfyUI type ("MODEL" -> io.Model, ...); a custom type for the others."""
    for value in vars(io).values():
        if isinstance(value, type) and getattr(value, "io_type", None) == type_name and hasattr(value, "Input"):
            return value
    return io.Custom(type_name)


def v3_input(io, spec: In):
    common = {"tooltip": spec.text(), "optional": spec.optional}
    if spec.type == "COMBO":
        extra = {"upload": io.UploadType.image, "image_folder": io.FolderType.input} if spec.image_upload else {}
        default = None if spec.image_upload else spec.default   # a picked file, as in V1
        return io.Combo.Input(spec.name, options=list(spec.options() or []), default=default, **extra, **common)
    if spec.type in ("INT", "FLOAT"):
        ranges = {key: getattr(spec, key) for key in ("min", "max", "step") if getattr(spec, key) is not None}
        if spec.type == "INT":
            cls_input = io.Int.Input
            if spec.control_after_generate:
                ranges["control_after_generate"] = True
        else:
            cls_input = io.Float.Input
            if spec.round is not None:
                ranges["round"] = spec.round
        return cls_input(spec.name, default=spec.default, **ranges, **common)
    if spec.type == "STRING":
        return io.String.Input(spec.name, default=spec.default, multiline=spec.multiline,
                               dynamic_prompts=spec.dynamic_prompts or None, **common)
    if spec.type == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    return _io_class(io, spec.type).Input(spec.name, **common)


def v3_schema(io, node_id: str, display_name: str, spec: NodeSpec):
    kwargs = dict(node_id=node_id, display_name=display_name, category=spec.category, description=spec.description,
                  inputs=[v3_input(io, item) for item in spec.inputs],
                  outputs=[_io_class(io, o.type).Output(display_name=o.name, tooltip=o.tooltip)
                           for o in spec.outputs],
                  hidden=[io.Hidden(kind) for kind in spec.hidden.values() if kind in io.Hidden._value2member_map_],
                  is_output_node=spec.output_node)
    if "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:   # newer hosts
        kwargs["search_aliases"] = list(spec.search_aliases)
    return io.Schema(**kwargs)


def v3_node(io, node_id: str, display_name: str, v1_cls):
    """An ``io.ComfyNode`` with the schema of ``v1_cls.SPEC``, whose ``execute`` runs ``v1_cls``'s method."""
    spec: NodeSpec = v1_cls.SPEC
    host_hidden = {name: kind for name, kind in spec.hidden.items() if kind in io.Hidden._value2member_map_}

    def define_schema(cls):
        return v3_schema(io, node_id, display_name, spec)

    def execute(cls, **kwargs):
        for name, kind in host_hidden.items():
            kwargs[name] = getattr(cls.hidden, io.Hidden(kind).name, None)
        return getattr(v1_cls(), spec.function)(**kwargs)   # a tuple, or a {"ui", "result"} dict

    attrs = {"__doc__": v1_cls.__doc__, "__module__": v1_cls.__module__, "V1_CLASS": v1_cls,
             "define_schema": classmethod(define_schema), "execute": classmethod(execute)}
    is_changed = getattr(v1_cls, "IS_CHANGED", None)
    if is_changed is not None:
        attrs["fingerprint_inputs"] = classmethod(lambda cls, **kwargs: is_changed(**kwargs))
    return type(v1_cls.__name__, (io.ComfyNode,), attrs)
