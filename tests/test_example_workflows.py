"""example_workflows/: editor-format graphs whose widget values line up with our nodes' widget order."""
import json
import os

import pytest

from ksampler.nodes import NODES

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")
NAMES = ["text_to_image", "image_to_image", "bundled_text_to_image", "bundled_image_to_image"]
STANDARD = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "LoadImage", "VAEEncode", "VAEDecode",
            "SaveImage"}


def _widget_names(cls) -> list:
    """The editor's widgets of a node in order (a seed adds its 'control after generate' widget)."""
    names = []
    for section in ("required", "optional"):
        for name, (kind, options) in cls.INPUT_TYPES().get(section, {}).items():
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                names.append(name)
                if options.get("control_after_generate"):
                    names.append("control_after_generate")
                if any(item.name == name and item.image_upload for item in cls.SPEC.inputs):
                    names.append("upload")   # the editor's upload button (headless the input is a path)
    return names


@pytest.mark.parametrize("name", NAMES)
def test_example_workflow_matches_the_node_table(name):
    with open(os.path.join(FOLDER, name + ".json")) as f:
        graph = json.load(f)
    assert os.path.isfile(os.path.join(FOLDER, name + ".jpg"))
    types = [node["type"] for node in graph["nodes"]]
    assert "ksampler_KSampler" in types
    assert set(types) <= STANDARD | set(NODES)
    assert (set(types) <= STANDARD | {"ksampler_KSampler"}) == (not name.startswith("bundled"))
    ids = {node["id"] for node in graph["nodes"]}
    for link in graph["links"]:   # [id, from node, from slot, to node, to slot, type]
        assert link[1] in ids and link[3] in ids
    for node in graph["nodes"]:
        if node["type"] in NODES:
            cls = NODES[node["type"]][0]
            values = node.get("widgets_values") or []
            widgets = _widget_names(cls)
            assert len(values) == len(widgets), (name, node["type"])
            spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
            for widget, value in zip(widgets, values):
                if widget == "control_after_generate":
                    assert value == "fixed"   # the example reproduces its thumbnail's seed
                elif widget == "upload":
                    assert value == "image"
                elif isinstance(spec[widget][0], list):
                    assert value in spec[widget][0], (name, widget, value)
