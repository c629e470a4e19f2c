"""The API-format workflow executor: ordering, caching, seed control and its errors."""
import copy
import json
import random

import pytest

from ksampler.workflow import (Executor, WorkflowError, apply_seed_control, load_workflow, next_seed,
                               seed_inputs)

CALLS = []


class Number:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "control_after_generate": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    def make(self, value):
        CALLS.append(("Number", value))
        return (value,)


class Add:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {}), "b": ("INT", {})}, "optional": {"mode": (["plus", "minus"], {})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "add"

    def add(self, a, b, mode="plus"):
        CALLS.append(("Add", a, b))
        return (a + b if mode == "plus" else a - b,)


class Text:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "make"

    def make(self, text):
        return (text,)


class Sink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {})}, "hidden": {"where": "OUT_DIR", "uid": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "sink"

    def sink(self, x, where=None, uid=None):
        CALLS.append(("Sink", x, where, uid))
        return {"ui": {"x": x}, "result": ()}


class Broken:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    def go(self, x):
        raise RuntimeError("boom")


NODES = {"Number": Number, "Add": Add, "Sink": Sink, "Text": Text, "Broken": Broken}


def graph():
    return {
        "1": {"class_type": "Number", "inputs": {"value": 2}},
        "2": {"class_type": "Number", "inputs": {"value": 3}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Sink", "inputs": {"x": ["3", 0]}},
        "5": {"class_type": "Number", "inputs": {"value": 99}},   # feeds no output: never runs
    }


@pytest.fixture(autouse=True)
def _clear():
    CALLS.clear()


def test_runs_upstream_first_and_only_what_outputs_need():
    ex = Executor(NODES)
    out = ex.run(graph(), context={"OUT_DIR": "/tmp/x"})
    assert out["3"] == (5,)
    assert ex.executed.index("3") > max(ex.executed.index("1"), ex.executed.index("2"))
    assert ex.executed[-1] == "4" and "5" not in ex.executed
    assert ("Sink", 5, "/tmp/x", "4") in CALLS   # hidden inputs: context by type, UNIQUE_ID = the node id


def test_order_is_topological_regardless_of_id_order():
    g = {"9": {"class_type": "Sink", "inputs": {"x": ["a", 0]}},
         "a": {"class_type": "Add", "inputs": {"a": ["10", 0], "b": ["2", 0]}},
         "10": {"class_type": "Number", "inputs": {"value": 1}},
         "2": {"class_type": "Number", "inputs": {"value": 1}}}
    ex = Executor(NODES)
    ex.run(g)
    assert ex.executed.index("a") > ex.executed.index("10") and ex.executed.index("a") > ex.executed.index("2")
    assert ex.executed[-1] == "9"


def test_outputs_are_cached_and_only_changed_nodes_rerun():
    ex = Executor(NODES)
    g = graph()
    ex.run(g)
    ex.run(g)
    assert ex.executed == []   # all served from the cache (the sink has no IS_CHANGED)
    g2 = copy.deepcopy(g)
    g2["2"]["inputs"]["value"] = 4
    out = ex.run(g2)
    assert out["3"] == (6,)
    assert sorted(ex.executed) == ["2", "3", "4"]   # node 1 came from the cache


def test_each_node_runs_once_per_run_even_with_several_consumers():
    g = {"1": {"class_type": "Number", "inputs": {"value": 2}},
         "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
         "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["1", 0]}},
         "4": {"class_type": "Sink", "inputs": {"x": ["3", 0]}}}
    out = Executor(NODES).run(g)
    assert out["3"] == (6,)
    assert CALLS.count(("Number", 2)) == 1


def test_unknown_node_type_is_named_with_a_suggestion():
    g = graph()
    g["3"]["class_type"] = "add"
    with pytest.raises(WorkflowError, match=r"node 3: unknown node type 'add'; did you mean 'Add'"):
        Executor(NODES).run(g)


def test_missing_required_input_is_named():
    g = graph()
    del g["3"]["inputs"]["b"]
    with pytest.raises(WorkflowError, match=r"node 3 \(Add\): missing required input 'b' \(INT\)"):
        Executor(NODES).run(g)


def test_unknown_input_link_errors_and_bad_combo():
    g = graph()
    g["3"]["inputs"]["c"] = 1
    with pytest.raises(WorkflowError, match=r"unknown input 'c'"):
        Executor(NODES).run(g)
    g = graph()
    g["3"]["inputs"]["b"] = ["7", 0]
    with pytest.raises(WorkflowError, match=r"links to node '7', which is not in the workflow"):
        Executor(NODES).run(g)
    g = graph()
    g["3"]["inputs"]["b"] = ["2", 3]
    with pytest.raises(WorkflowError, match=r"links to output 3 of node 2 \(Number\), which has 1 output"):
        Executor(NODES).run(g)
    g = graph()
    g["3"]["inputs"]["mode"] = "times"
    with pytest.raises(WorkflowError, match=r"mode 'times' is not one of: plus, minus"):
        Executor(NODES).run(g)


def test_type_mismatch_between_linked_output_and_input():
    g = graph()
    g["6"] = {"class_type": "Text", "inputs": {"text": "hi"}}
    g["3"]["inputs"]["b"] = ["6", 0]
    with pytest.raises(WorkflowError, match=r"input 'b' expects INT but is linked to output 0 of node 6 \(Text\), "
                                            r"which is STRING"):
        Executor(NODES).run(g)


def test_cycle_is_reported_with_its_nodes():
    g = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["3", 0]}},
         "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["3", 0]}},
         "3": {"class_type": "Number", "inputs": {"value": 1}},
         "4": {"class_type": "Sink", "inputs": {"x": ["1", 0]}}}
    with pytest.raises(WorkflowError, match=r"cycle between nodes 1 -> 2 -> 1"):
        Executor(NODES).run(g)


def test_no_output_node_and_node_failures_are_clear():
    g = graph()
    del g["4"]
    with pytest.raises(WorkflowError, match="no output node"):
        Executor(NODES).run(g)
    assert Executor(NODES).run(g, outputs=["3"])["3"] == (5,)
    g = graph()
    g["3"] = {"class_type": "Broken", "inputs": {"x": ["1", 0]}}
    with pytest.raises(WorkflowError, match=r"node 3 \(Broken\) failed: RuntimeError: boom"):
        Executor(NODES).run(g)
    with pytest.raises(WorkflowError, match="non-empty JSON object"):
        Executor(NODES).run({})


def test_graph_is_not_mutated():
    g = graph()
    snapshot = copy.deepcopy(g)
    Executor(NODES).run(g)
    apply_seed_control(g, "increment", node_classes=NODES)
    assert g == snapshot


def test_seed_control_wraps_and_randomize_is_reproducible():
    top = (1 << 64) - 1
    assert next_seed(5, "fixed") == 5
    assert next_seed(top, "increment") == 0
    assert next_seed(0, "decrement") == top
    a = [next_seed(1, "randomize", random.Random(7)) for _ in range(3)]
    assert a == [next_seed(1, "randomize", random.Random(7)) for _ in range(3)]
    assert all(0 <= s <= top for s in a)
    with pytest.raises(WorkflowError, match="unknown mode 'twice'"):
        next_seed(1, "twice")
    g = apply_seed_control(graph(), "increment", node_classes=NODES)
    assert [v for _, _, v in seed_inputs(g, NODES)] == [3, 4, 100]


def test_load_workflow_accepts_prompt_wrapper_and_rejects_ui_format(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"prompt": graph(), "client_id": "x"}))
    assert load_workflow(str(p)) == graph()
    p.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(WorkflowError, match="UI format"):
        load_workflow(str(p))
    p.write_text("{not json")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(str(p))
    with pytest.raises(WorkflowError, match="does not exist"):
        load_workflow(str(tmp_path / "missing.json"))


def test_pack_nodes_validate_shipped_workflows():
    """The shipped workflows only use this pack's node ids, with all inputs valid (no model needed)."""
    import os
    import ksampler
    root = os.path.dirname(ksampler.__file__)
    ex = Executor()
    for name in ("text_to_image.json", "image_to_image.json"):
        g = load_workflow(os.path.join(root, "workflows", name))
        ex.validate(g)
        assert all(n["class_type"].startswith("ksampler_") for n in g.values())
    bad = load_workflow(os.path.join(root, "workflows", "text_to_image.json"))
    bad["5"]["inputs"]["positive"] = ["1", 0]
    with pytest.raises(WorkflowError, match="expects CONDITIONING but is linked to output 0 of node 1 "
                                            r"\(ksampler_CheckpointLoader\), which is KSAMPLER_BUNDLED_MODEL"):
        ex.validate(bad)
    bad = load_workflow(os.path.join(root, "workflows", "text_to_image.json"))
    bad["5"]["inputs"]["model"] = "flow"
    with pytest.raises(WorkflowError,
                       match=r"input 'model' \(MODEL,KSAMPLER_BUNDLED_MODEL\) must be linked to a node output"):
        ex.validate(bad)
