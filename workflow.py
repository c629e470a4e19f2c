"""A small executor for ComfyUI API-format workflows (the graph JSON that ComfyUI's /prompt endpoint takes).

A graph maps node ids to ``{"class_type": ..., "inputs": {name: value or
[source_id, output_index]}}``.  ``Executor.run`` validates the graph (known
node types, required inputs present, links to existing outputs of the right
type, combo values, no cycles), runs the nodes that feed an output node in
topological order, and caches every node's outputs by a signature of its
inputs and its upstream nodes: re-running a graph where only the seed changed
runs only the sampler and what follows it (ComfyUI's behaviour).
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Iterable, Optional

__all__ = ["WorkflowError", "Executor", "load_workflow", "run_workflow", "next_seed", "SEED_CONTROLS",
           "apply_seed_control", "check_structure"]

SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
_SEED_SPACE = 1 << 64


class WorkflowError(ValueError):
    """A workflow that cannot run: the message names the node, the input and the fix."""


def next_seed(seed: int, control: str, rng: Optional[random.Random] = None) -> int:
    """The seed for the next run under a control-after-generate mode (increment and decrement wrap in 0..2^64-1)."""
    if control == "fixed":
        return seed
    if control == "increment":
        return (seed + 1) % _SEED_SPACE
    if control == "decrement":
        return (seed - 1) % _SEED_SPACE
    if control == "randomize":
        return (rng or random.Random()).randrange(_SEED_SPACE)
    raise WorkflowError(f"control_after_generate: unknown mode {control!r}; choose one of: {', '.join(SEED_CONTROLS)}")


def load_workflow(path: str) -> dict:
    """The API-format graph in a JSON file (a bare graph, or ``{"prompt": graph, ...}`` as posted to /prompt)."""
    if not os.path.isfile(path):
        raise WorkflowError(f"workflow: file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:   # -sig: a byte-order mark (Windows editors) is skipped
            data = json.load(f, object_pairs_hook=_object_keeping_duplicates)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"workflow: {path!r} is not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise WorkflowError(f"workflow: {path!r} is not UTF-8 text ({e}); save it as UTF-8 JSON") from None
    except RecursionError:
        raise WorkflowError(f"workflow: {path!r} nests JSON arrays or objects too deeply to read; an API-format "
                            "workflow nests a few levels (node id -> node -> inputs -> value)") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(f"workflow: {path!r} is in ComfyUI's UI format; export it with 'Save (API Format)'")
    if not isinstance(data, dict):
        raise WorkflowError(f"workflow: {path!r} holds {_json_kind(data)}; expected an object mapping node "
                            "ids to nodes (ComfyUI's 'Save (API Format)')")
    _refuse_duplicate_keys(data)
    return data


class _DuplicateKeys(dict):
    """A JSON object that named a key more than once (``duplicates``); the last value was kept by ``json``."""

    duplicates: list


def _object_keeping_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    seen, duplicates = set(), []
    for key, _ in pairs:
        if key in seen and key not in duplicates:
            duplicates.append(key)
        seen.add(key)
    marked = _DuplicateKeys(out)
    marked.duplicates = duplicates
    return marked


def _refuse_duplicate_keys(graph: dict) -> None:
    """A key given twice in one JSON object silently keeps the last value: refuse it, naming where it is."""
    if isinstance(graph, _DuplicateKeys):
        raise WorkflowError(f"node {graph.duplicates[0]}: the workflow has two nodes with this id (JSON keeps only "
                            "the last); give each node its own id")
    for node_id, node in graph.items():
        if not isinstance(node, dict):
            continue
        if isinstance(node, _DuplicateKeys):
            raise WorkflowError(f"node {node_id}: the field {node.duplicates[0]!r} is given twice; keep one")
        inputs = node.get("inputs")
        if isinstance(inputs, _DuplicateKeys):
            raise WorkflowError(f"node {node_id}: input {inputs.duplicates[0]!r} is given twice; keep one")
        for name, value in (inputs.items() if isinstance(inputs, dict) else ()):
            where = _first_duplicate(value)
            if where is not None:
                raise WorkflowError(f"node {node_id}: input {name!r} holds an object that gives the key "
                                    f"{where!r} twice; keep one")


def _first_duplicate(value):
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _DuplicateKeys):
            return item.duplicates[0]
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _json_kind(value) -> str:
    """'an array', 'a string', ...: what a JSON value is, with its article."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and \
        isinstance(value[1], int) and not isinstance(value[1], bool)


def _sort_key(node_id: str):
    # isdecimal, not isdigit: '²' is a digit that int() refuses
    return (0, int(node_id), "") if node_id.isdecimal() else (1, 0, node_id)


def _input_specs(cls) -> tuple:
    spec = cls.INPUT_TYPES()
    return spec.get("required", {}), spec.get("optional", {}), spec.get("hidden", {})


def types_match(received: str, expected: str) -> bool:
    """ComfyUI's rule for a link: '*' matches anything; comma-separated lists match when they share a type."""
    if not isinstance(received, str) or not isinstance(expected, str):
        return received == expected
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return "*" in got or "*" in want or bool(got & want)


def _label(node_id: str, graph: dict) -> str:
    return f"node {node_id} ({graph[node_id].get('class_type', '?')})"


def check_structure(graph: Any) -> None:
    """The graph's shape (before anything reads it): an object of nodes, each with a class_type and inputs."""
    if not isinstance(graph, dict) or not graph:
        got = "an empty object" if isinstance(graph, dict) else _json_kind(graph)
        raise WorkflowError(f"workflow: expected a non-empty JSON object mapping node ids to nodes, got {got}")
    for node_id, node in graph.items():
        if not isinstance(node_id, str):
            raise WorkflowError(f"node {node_id!r}: node ids must be strings (JSON object keys), got "
                                f"{type(node_id).__name__}")
        if not isinstance(node, dict):
            raise WorkflowError(f"node {node_id}: expected an object {{\"class_type\": ..., \"inputs\": {{...}}}}, "
                                f"got {_json_kind(node)}")
        if not isinstance(node.get("class_type"), str):
            got = "it is missing" if "class_type" not in node else \
                f"got {_json_kind(node['class_type'])} {node['class_type']!r:.60}"
            raise WorkflowError(f"node {node_id}: 'class_type' must be a string naming a node type (e.g. "
                                f"\"ksampler_KSampler\"); {got}")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"node {node_id}: 'inputs' must be an object mapping input names to values, got "
                                f"{_json_kind(node['inputs'])}")


class Executor:
    """Runs API-format graphs with this pack's nodes (or any ``{class_type: class}`` mapping); caches outputs."""

    def __init__(self, node_classes: Optional[dict] = None):
        if node_classes is None:
            from .nodes import NODE_CLASS_MAPPINGS
            node_classes = NODE_CLASS_MAPPINGS
        self.node_classes = dict(node_classes)
        self.cache: dict = {}
        self.executed: list = []   # node ids run (not served from the cache) by the last ``run``
        self.ui: dict = {}         # node id -> the "ui" dict it returned in the last ``run`` (e.g. saved images)

    # ---- validation --------------------------------------------------------------------
    def validate(self, graph: Any) -> None:
        """Raise ``WorkflowError`` for the first problem found in the graph (types, inputs, links)."""
        check_structure(graph)
        for node_id, node in graph.items():
            cls = self.node_classes.get(node["class_type"])
            if cls is None:
                import difflib
                close = difflib.get_close_matches(node["class_type"], list(self.node_classes), n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise WorkflowError(f"node {node_id}: unknown node type {node['class_type']!r}; {hint}available: "
                                    f"{', '.join(sorted(self.node_classes))}")
            self._validate_inputs(node_id, node, cls, graph)

    def _validate_inputs(self, node_id: str, node: dict, cls, graph: dict) -> None:
        required, optional, _ = _input_specs(cls)
        inputs = node.get("inputs", {})
        label = _label(node_id, graph)
        for name in inputs:
            if name not in required and name not in optional:
                raise WorkflowError(f"{label}: unknown input {name!r}; its inputs are: "
                                    f"{', '.join(list(required) + list(optional))}")
        for name, spec in list(required.items()) + list(optional.items()):
            kind = spec[0]
            if name not in inputs:
                if name in required:
                    what = "one of " + ", ".join(map(repr, kind[:5])) if isinstance(kind, list) else kind
                    raise WorkflowError(f"{label}: missing required input {name!r} ({what}); add it to the "
                                        "node's inputs")
                continue
            value = inputs[name]
            if _is_link(value):
                src, index = value
                if src not in graph:
                    raise WorkflowError(f"{label}: input {name!r} links to node {src!r}, which is not in the "
                                        "workflow")
                src_cls = self.node_classes.get(graph[src].get("class_type"))
                if src_cls is None:
                    continue   # reported when that node is checked
                outputs = tuple(src_cls.RETURN_TYPES)
                if not 0 <= index < len(outputs):
                    raise WorkflowError(f"{label}: input {name!r} links to output {index} of {_label(src, graph)}, "
                                        f"which has {len(outputs)} output(s) ({', '.join(outputs) or 'none'})")
                got = outputs[index]
                if isinstance(kind, str) and not types_match(got, kind):
                    raise WorkflowError(f"{label}: input {name!r} expects {kind} but is linked to output {index} "
                                        f"of {_label(src, graph)}, which is {got}")
            elif isinstance(kind, list):
                if value not in kind:
                    shown = ", ".join(map(str, kind[:12])) + (", ..." if len(kind) > 12 else "")
                    raise WorkflowError(f"{label}: {name} {value!r} is not one of: {shown}")
            elif kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "*"):
                raise WorkflowError(f"{label}: input {name!r} ({kind}) must be linked to a node output "
                                    f"([node_id, output_index]), got the value {value!r}")

    def order(self, graph: dict, targets: Iterable[str]) -> list:
        """The nodes ``targets`` depend on (themselves included), upstream first; a cycle raises ``WorkflowError``."""
        state: dict = {}   # 1 = on the current path, 2 = done
        result: list = []

        def upstream(node_id: str):
            inputs = graph[node_id].get("inputs", {})
            return iter([inputs[name][0] for name in sorted(inputs) if _is_link(inputs[name])])

        # a depth-first walk with its own stack: a long chain of nodes must not hit Python's recursion limit
        for target in sorted(targets, key=_sort_key):
            if state.get(target) == 2:
                continue
            state[target] = 1
            path, pending = [target], [upstream(target)]
            while pending:
                source = next(pending[-1], None)
                if source is None:
                    done = path.pop()
                    pending.pop()
                    state[done] = 2
                    result.append(done)
                elif state.get(source) == 1:
                    cycle = path[path.index(source):] + [source]
                    raise WorkflowError(f"workflow: cycle between nodes {' -> '.join(cycle)}; a node cannot depend "
                                        "on its own output")
                elif state.get(source) != 2:
                    state[source] = 1
                    path.append(source)
                    pending.append(upstream(source))
        return result

    def output_nodes(self, graph: dict) -> list:
        return [n for n in sorted(graph, key=_sort_key)
                if getattr(self.node_classes[graph[n]["class_type"]], "OUTPUT_NODE", False)]

    # ---- execution ---------------------------------------------------------------------
    def run(self, graph: dict, outputs: Optional[Iterable[str]] = None, context: Optional[dict] = None) -> dict:
        """Run the graph; returns ``{node_id: output tuple}`` for every node that ran or came from the cache.

        outputs: the node ids wanted (default: the output nodes, e.g. image savers).
        context: values for hidden inputs by type (``KSAMPLER_BASE_DIR``, ``KSAMPLER_OUTPUT_DIR``, ...).
        """
        self.validate(graph)
        targets = list(outputs) if outputs is not None else self.output_nodes(graph)
        for t in targets:
            if t not in graph:
                raise WorkflowError(f"outputs: node {t!r} is not in the workflow")
        if not targets:
            raise WorkflowError("workflow: it has no output node (such as ksampler_SaveImage), so nothing would "
                                "run; add one")
        context = dict(context or {})
        context.setdefault("PROMPT", graph)
        results: dict = {}
        signatures: dict = {}
        new_cache: dict = {}
        self.executed = []
        self.ui = {}
        for node_id in self.order(graph, targets):
            node = graph[node_id]
            cls = self.node_classes[node["class_type"]]
            required, optional, hidden = _input_specs(cls)
            literal = {k: v for k, v in node.get("inputs", {}).items() if not _is_link(v)}
            hidden_values = {name: context[kind] if kind != "UNIQUE_ID" else node_id
                             for name, kind in hidden.items() if kind in context or kind == "UNIQUE_ID"}
            signature = self._signature(node_id, node, cls, literal, hidden_values, signatures)
            signatures[node_id] = signature
            if signature is not None and signature in self.cache:
                results[node_id] = self.cache[signature]
                new_cache[signature] = results[node_id]
                continue
            kwargs = dict(literal)
            for name, value in node.get("inputs", {}).items():
                if _is_link(value):
                    kwargs[name] = results[value[0]][value[1]]
            kwargs.update(hidden_values)
            results[node_id], ui = self._call(node_id, graph, cls, kwargs)
            if ui:
                self.ui[node_id] = ui
            self.executed.append(node_id)
            if signature is not None:
                new_cache[signature] = results[node_id]
        self.cache = new_cache   # keep what this run used (ComfyUI's classic cache)
        return results

    def _signature(self, node_id, node, cls, literal, hidden_values, signatures):
        """A hashable key of everything a node's output depends on, or None when it must always run."""
        changed = None
        is_changed = getattr(cls, "IS_CHANGED", None)
        if is_changed is not None:
            try:
                changed = is_changed(**literal, **hidden_values)
            except TypeError:
                changed = None
            if isinstance(changed, float) and math.isnan(changed):
                return None
        parts = []
        for name in sorted(node.get("inputs", {})):
            value = node["inputs"][name]
            if _is_link(value):
                upstream = signatures.get(value[0])
                if upstream is None:
                    return None
                parts.append((name, "link", upstream, value[1]))
            else:
                parts.append((name, "value", json.dumps(value, sort_keys=True, default=repr)))
        hidden = tuple(sorted((k, json.dumps(v, sort_keys=True, default=repr)) for k, v in hidden_values.items()
                              if k != "prompt"))
        return (node["class_type"], repr(changed), tuple(parts), hidden)

    @staticmethod
    def _call(node_id, graph, cls, kwargs) -> tuple:
        """(the node's output tuple, its "ui" dict or None)."""
        label = _label(node_id, graph)
        try:
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        except WorkflowError:
            raise
        except Exception as e:
            raise WorkflowError(f"{label} failed: {type(e).__name__}: {e}") from e
        ui = None
        if isinstance(out, dict):
            ui = out.get("ui")
            out = out.get("result", ())
        out = tuple(out) if out is not None else ()
        if len(out) != len(cls.RETURN_TYPES):
            raise WorkflowError(f"{label} returned {len(out)} output(s), expected {len(cls.RETURN_TYPES)}")
        return out, ui


def seed_inputs(graph: dict, node_classes: Optional[dict] = None) -> list:
    """[(node_id, input_name, value)] of the seed widgets in a graph."""
    if node_classes is None:
        from .nodes import NODE_CLASS_MAPPINGS
        node_classes = NODE_CLASS_MAPPINGS
    check_structure(graph)
    found = []
    for node_id in sorted(graph, key=_sort_key):
        cls = node_classes.get(graph[node_id]["class_type"])
        if cls is None:
            continue
        required, optional, _ = _input_specs(cls)
        for name, spec in list(required.items()) + list(optional.items()):
            value = graph[node_id].get("inputs", {}).get(name)
            if len(spec) > 1 and spec[1].get("control_after_generate") and isinstance(value, int) \
                    and not isinstance(value, bool):
                found.append((node_id, name, value))
    return found


def apply_seed_control(graph: dict, control: str, rng: Optional[random.Random] = None,
                       node_classes: Optional[dict] = None) -> dict:
    """A copy of the graph with every seed widget (``control_after_generate`` inputs) advanced one run."""
    out = json.loads(json.dumps(graph))
    for node_id, name, value in seed_inputs(out, node_classes):
        out[node_id]["inputs"][name] = next_seed(value, control, rng)
    return out


def run_workflow(path: str, output_dir: Optional[str] = None, executor: Optional[Executor] = None) -> dict:
    """Load and run a workflow file; relative image paths resolve against the file's folder."""
    graph = load_workflow(path)
    executor = executor or Executor()
    context = {"KSAMPLER_BASE_DIR": os.path.dirname(os.path.abspath(path))}
    if output_dir:
        context["KSAMPLER_OUTPUT_DIR"] = os.path.abspath(output_dir)
    return executor.run(graph, context=context)
