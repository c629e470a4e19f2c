"""One table per node -> the classic (V1) attributes and the V3 schema, checked equal with a fake comfy_api."""
import os
import subprocess
import sys

import pytest
import torch

import fake_comfy_api
from comfy_standins import install as install_host
from ksampler import node_schema
from ksampler.nodes import NODES, v3_nodes

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def all_nodes(monkeypatch):
    """Every node id -> (V1 class, display name), the interop nodes included (they need the host's modules)."""
    install_host(monkeypatch)
    from ksampler import nodes
    return {node_id: (nodes._node_class(module, name), display)
            for node_id, (module, name, display) in nodes.NODE_TABLE.items()}


def node_schema_image_tooltip(cls) -> str:
    return cls.SPEC.inputs[0].tooltip


def _without_custom_hidden(types: dict) -> dict:
    return {section: dict(inputs) for section, inputs in types.items() if section != "hidden"}


def _host_input_folder(monkeypatch, tmp_path):
    """ComfyUI's folder_paths (a stand-in) with one image in its input folder."""
    import types
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "in.png").write_bytes(b"")
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_input_directory = lambda: str(tmp_path / "input")
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)


@pytest.mark.parametrize("with_search_aliases", [True, False])
def test_v3_schema_equals_v1_input_types(all_nodes, monkeypatch, tmp_path, with_search_aliases):
    """Same ids, order, types, defaults, ranges and tooltips, so saved workflows load on either schema."""
    io = fake_comfy_api.install(monkeypatch, with_search_aliases)
    _host_input_folder(monkeypatch, tmp_path)   # inside a host the image input is a file picker on both
    for node_id, (cls, name) in all_nodes.items():
        v3 = node_schema.v3_node(io, node_id, name, cls)
        schema = v3.define_schema()
        assert (schema.node_id, schema.display_name) == (node_id, name)
        assert (schema.category, schema.description) == (cls.CATEGORY, cls.DESCRIPTION)
        v1_types = _without_custom_hidden(cls.INPUT_TYPES())
        v3_types = fake_comfy_api.v1_view(schema)
        assert v3_types == v1_types, node_id
        for section in v1_types:   # positional widget order
            assert list(v3_types[section]) == list(v1_types[section]), node_id
        assert [o.io_type for o in schema.outputs] == list(cls.RETURN_TYPES)
        assert [o.tooltip for o in schema.outputs] == list(cls.OUTPUT_TOOLTIPS)
        assert schema.is_output_node == bool(getattr(cls, "OUTPUT_NODE", False))
        if node_id == "ksampler_LoadImage":
            assert v3_types["required"]["image"] == (["in.png"], {"tooltip": node_schema_image_tooltip(cls),
                                                                  "image_upload": True})
        if with_search_aliases:
            assert schema.search_aliases == cls.SEARCH_ALIASES and schema.search_aliases
        else:
            assert not hasattr(schema, "search_aliases")   # an older host: not passed


def test_every_node_has_aliases_description_and_output_tooltips(all_nodes):
    for node_id, (cls, name) in all_nodes.items():
        assert cls.DESCRIPTION and cls.SEARCH_ALIASES, node_id
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(cls.OUTPUT_TOOLTIPS), node_id
        for section in ("required", "optional"):
            for input_name, spec in cls.INPUT_TYPES().get(section, {}).items():
                assert spec[1].get("tooltip"), (node_id, input_name)
    ksampler = all_nodes["ksampler_KSampler"][0]
    assert {"sampler", "sample", "generate", "denoise", "txt2img", "img2img"} <= set(ksampler.SEARCH_ALIASES)


def test_seed_widgets_keep_control_after_generate(all_nodes, monkeypatch):
    io = fake_comfy_api.install(monkeypatch)
    for node_id, seed in (("ksampler_KSampler", "seed"), ("ksampler_KSamplerAdvanced", "noise_seed")):
        cls, name = all_nodes[node_id]
        assert cls.INPUT_TYPES()["required"][seed][1]["control_after_generate"] is True
        (item,) = [i for i in node_schema.v3_node(io, node_id, name, cls).define_schema().inputs if i.id == seed]
        assert item.kwargs["control_after_generate"] is True and isinstance(item, io.Int.Input)


def test_flow_geometry_choices_and_extra_entries_in_tooltips(all_nodes):
    advanced = all_nodes["ksampler_KSamplerAdvanced"][0].INPUT_TYPES()["optional"]
    select = all_nodes["ksampler_SamplerSelect"][0].INPUT_TYPES()["optional"]
    assert advanced["flow_geometry"][0] == select["flow_geometry"][0] == ["default", "exact", "comfyui"]
    from ksampler.samplers import COMFY_SAMPLER_NAMES, SAMPLERS
    required = all_nodes["ksampler_KSampler"][0].INPUT_TYPES()["required"]
    extra = [n for n in SAMPLERS if n not in COMFY_SAMPLER_NAMES]
    assert extra and all(n in required["sampler_name"][1]["tooltip"] for n in extra)
    assert "gits" in required["scheduler"][1]["tooltip"]


def test_v3_execute_runs_the_v1_method_with_host_hidden_inputs(all_nodes, monkeypatch, tmp_path):
    io = fake_comfy_api.install(monkeypatch)
    empty = node_schema.v3_node(io, "ksampler_EmptyLatentImage", "x", all_nodes["ksampler_EmptyLatentImage"][0])
    (latent,) = empty.execute(width=32, height=16, batch_size=2)
    assert latent["samples"].shape == (2, 3, 16, 32)
    save_cls = all_nodes["ksampler_SaveImage"][0]
    save = node_schema.v3_node(io, "ksampler_SaveImage", "x", save_cls)
    assert [h.value for h in save.define_schema().hidden] == ["PROMPT"]   # KSAMPLER_OUTPUT_DIR has no V3 form
    seen = {}
    monkeypatch.setattr(save_cls, "save_images", lambda self, **kw: seen.update(kw) or {"ui": {}, "result": ()})
    monkeypatch.setattr(save, "hidden", fake_comfy_api._HiddenHolder({"prompt": {"1": {}}}))
    save.execute(images=torch.zeros(1, 8, 8, 3), filename_prefix="p")
    assert seen["prompt"] == {"1": {}} and seen["filename_prefix"] == "p"
    assert save.fingerprint_inputs(images=None) != save.fingerprint_inputs(images=None)   # NaN: always runs


def test_host_io_outside_comfyui_and_forced_v1(monkeypatch):
    assert node_schema.host_io() is None   # no ComfyUI in this process
    io = fake_comfy_api.install(monkeypatch)
    assert node_schema.host_io() is io
    monkeypatch.setenv(node_schema.SCHEMA_ENV, "v1")
    assert node_schema.host_io() is None
    monkeypatch.setenv(node_schema.SCHEMA_ENV, "v4")
    with pytest.raises(ValueError, match="KSAMPLER_NODE_SCHEMA"):
        node_schema.host_io()


_PACK_UNDER_FAKE_HOST = """
import asyncio, sys
sys.path.insert(0, {tests!r})
import fake_comfy_api
class _Patch:
    def setattr(self, obj, name, value): setattr(obj, name, value)
    def setitem(self, mapping, key, value): mapping[key] = value
fake_comfy_api.install(_Patch())
import ksampler
print(ksampler.NODE_CLASS_MAPPINGS is None, hasattr(ksampler, "comfy_entrypoint"))
if hasattr(ksampler, "comfy_entrypoint"):
    nodes = asyncio.run(asyncio.run(ksampler.comfy_entrypoint()).get_node_list())
    print(",".join(n.define_schema().node_id for n in nodes))
"""


@pytest.mark.parametrize("forced", ["", "v1"])
def test_pack_registers_v3_on_a_v3_host_and_v1_when_forced(forced):
    env = dict(os.environ, KSAMPLER_NODE_SCHEMA=forced)
    out = subprocess.run([sys.executable, "-c", _PACK_UNDER_FAKE_HOST.format(tests=HERE)], capture_output=True,
                         text=True, env=env, check=True).stdout.split()
    if forced == "v1":
        assert out == ["False", "False"]   # classic NODE_CLASS_MAPPINGS
    else:
        assert out[:2] == ["True", "True"]
        assert out[2].split(",") == list(NODES)   # the same ids, in the table's order


def test_v3_nodes_cover_the_table(monkeypatch):
    io = fake_comfy_api.install(monkeypatch)
    built = v3_nodes(io)
    assert [n.define_schema().node_id for n in built] == list(NODES)
    assert all(issubclass(n, io.ComfyNode) and n.V1_CLASS is NODES[n.define_schema().node_id][0] for n in built)
