"""Bad-input matrix through the real ComfyUI: our KSampler and the built-in one, side by side, in one process.

    /tmp/comfy/venv/bin/python tools/comfy_bad_inputs.py [--comfyui-dir DIR] [--models-dir DIR] [--json out.json]

Each case breaks one input of a clean graph on the harness's tiny SD1.5 (eps) and SD3 (flow) checkpoints, a
tiny random-weight Wan 2.1 (video) or the bundled model mixed with ComfyUI's nodes, and runs both nodes on it.
Every run is classified:

* ``clear error``: an exception whose message names the broken input (``positive``, ``latent_image`` ...);
* ``other error``: any other exception (a torch traceback from deep inside);
* ``silent``: it returned a latent (for a NaN case: a latent of NaN);
* ``hung``: it ran past --timeout seconds;
* ``mutated``: it changed something the caller passed (a tensor, a dict, the model's options or weights).

Dtype cases (a float16 / bfloat16 / float64 latent or conditioning) are not errors: our node must return what
the built-in returns (``converts``: a float32 latent within --tol x std, or within the half type's precision for
a half-precision latent, see HALF_TOL) and the built-in is the reference.  For our node the
table also gives the model calls made before the error (graph errors must come before the first) and whether
the next clean run is bit-identical to a fresh one.  Exits 1 unless every case of ours is a clear error (or
converts), with no model call before a graph error, nothing mutated and every clean re-run identical.
Needs the set-up of ../shared/comfyui (setup.sh); ComfyUI is imported as a library, nothing of it is copied.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_extra_parity import load_pack, tiny_wan  # noqa: E402


def _harness() -> str:
    """../shared/comfyui beside the checkout (or beside a folder above it, for a git worktree)."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        if os.path.isdir(os.path.join(folder, "shared", "comfyui")):
            return os.path.join(folder, "shared", "comfyui")
    return os.path.join(os.path.dirname(folder), "shared", "comfyui")


HARNESS = os.environ.get("COMFY_HARNESS") or _harness()

STEPS, CFG, SEED = 3, 4.0, 7
# A half-precision latent reaches ComfyUI's sampling unchanged on both nodes (same noise, drawn in its dtype; same
# scaling); the first step then mixes precisions differently: the built-in's samplers get a sigma tensor in the
# latent's dtype, ours step in float32.  So these cases agree to the half type's precision, 16 ulps at 1:
HALF_TOL = {"float16": 16 * 2.0 ** -10, "bfloat16": 16 * 2.0 ** -7}


@dataclass
class Case:
    name: str
    model: str          # "sd15", "sd3", "wan" or "bundled"
    input: str          # the node input the error must name
    change: Callable    # (env, args) -> None: breaks args (a dict of the node's inputs) in place
    dtype: bool = False  # a dtype case: converts, no error expected
    half: str = ""       # "float16" / "bfloat16": a half-precision latent (see HALF_TOL)
    steps: int = STEPS
    output: bool = False  # the model's output is broken (caught during the run); else a graph error, caught
    #                       before the first model call


@dataclass
class Outcome:
    kind: str
    detail: str = ""
    calls: int = 0
    output: object = None
    extra: dict = field(default_factory=dict)


class Hung(Exception):
    pass


def _alarm(signum, frame):
    raise Hung()


# ----------------------------------------------------------------------------------------------------------
# snapshots: what the caller passed, to detect mutation
# ----------------------------------------------------------------------------------------------------------
def snapshot(value, depth=0):
    import torch
    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach().clone(), value.dtype, value.device, id(value))
    if isinstance(value, dict):
        return ("dict", {k: snapshot(v, depth + 1) for k, v in value.items()}, id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [snapshot(v, depth + 1) for v in value], id(value))
    if hasattr(value, "model_options") and hasattr(value, "model"):  # a ModelPatcher
        base = value.model
        net = getattr(base, "diffusion_model", None)
        weights = float(sum(p.double().sum() for p in net.parameters())) if net is not None else 0.0
        hooks = (len(net._forward_hooks), len(net._forward_pre_hooks)) if net is not None else (0, 0)
        return ("patcher", repr(sorted(value.model_options.keys())),
                repr(sorted(value.model_options.get("transformer_options", {}).keys())),
                len(value.patches), weights, hooks, id(value))
    if hasattr(value, "network") and hasattr(value, "latent_format"):  # the bundled DiffusionModel
        net = value.network
        return ("bundled", float(sum(p.double().sum() for p in net.parameters())), len(net._forward_hooks))
    return ("other", id(value))


def same(a, b) -> bool:
    import torch
    if a[0] != b[0]:
        return False
    if a[0] == "tensor":
        return a[2] == b[2] and a[3] == b[3] and a[4] == b[4] and a[1].shape == b[1].shape and \
            bool(torch.equal(a[1], b[1]) or (torch.isnan(a[1]).any() and torch.equal(a[1].nan_to_num(), b[1].nan_to_num())))
    if a[0] == "dict":
        return a[2] == b[2] and a[1].keys() == b[1].keys() and all(same(a[1][k], b[1][k]) for k in a[1])
    if a[0] in ("list", "tuple"):
        return a[2] == b[2] and len(a[1]) == len(b[1]) and all(same(x, y) for x, y in zip(a[1], b[1]))
    return a == b


# ----------------------------------------------------------------------------------------------------------
# the models and the clean graphs
# ----------------------------------------------------------------------------------------------------------
class Env:
    def __init__(self, nodes, ours, models_dir):
        import torch
        sys.path.insert(0, HARNESS)
        from harness_nodes import random_conditioning
        with open(os.path.join(models_dir, "tiny_models.json")) as f:
            manifest = json.load(f)["models"]
        self.nodes, self.ours = nodes, ours
        self.spec = {"sd15": manifest["sd15_eps"], "sd3": manifest["sd3_flow"]}
        self.models, self.vaes, self.clean = {}, {}, {}
        for key in ("sd15", "sd3"):
            spec = self.spec[key]
            model, _, vae = nodes.CheckpointLoaderSimple().load_checkpoint(spec["checkpoint"])
            self.models[key], self.vaes[key] = model, vae
            pos = random_conditioning(101, spec["cond_tokens"], spec["cond_dim"], spec["pooled_dim"])
            neg = random_conditioning(202, spec["cond_tokens"], spec["cond_dim"], spec["pooled_dim"])
            latent = torch.randn(1, spec["latent_channels"], 8, 8, generator=torch.Generator().manual_seed(3))
            self.clean[key] = dict(positive=pos, negative=neg, latent_image={"samples": latent}, denoise=0.6)
        self.models["wan"] = tiny_wan()
        gen = torch.Generator().manual_seed(1)
        self.clean["wan"] = dict(positive=[[torch.randn(1, 8, 4096, generator=gen), {}]],
                                 negative=[[torch.randn(1, 8, 4096, generator=gen), {}]],
                                 latent_image={"samples": torch.randn(1, 16, 3, 8, 8, generator=gen)}, denoise=0.6)
        model, clip, vae = ours["ksampler_CheckpointLoader"]().load_checkpoint("flow")
        self.models["bundled"], self.bundled_clip, self.bundled_vae = model, clip, vae
        encode = ours["ksampler_TextEncode"]().encode
        self.clean["bundled"] = dict(positive=encode("a red circle", clip)[0], negative=encode("", clip)[0],
                                     latent_image=ours["ksampler_EmptyLatentImage"]().generate(32, 32, 1)[0],
                                     denoise=1.0)

    def args(self, key, steps=STEPS):
        import copy
        clean = self.clean[key]
        args = dict(model=self.models[key], seed=SEED, steps=steps, cfg=CFG, sampler_name="euler",
                    scheduler="karras")
        for name in ("positive", "negative", "latent_image"):
            args[name] = copy.deepcopy(clean[name])
        args["denoise"] = clean["denoise"]
        return args

    def fresh_checkpoint(self, key):
        return self.nodes.CheckpointLoaderSimple().load_checkpoint(self.spec[key]["checkpoint"])[0]


# ----------------------------------------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------------------------------------
def _set(name, value):
    def change(env, a):
        a[name] = value(env, a) if callable(value) else value
    return change


def _cond(name, fn):
    """Replace the first entry's tensor of ``name`` by fn(tensor)."""
    def change(env, a):
        tensor, opts = a[name][0]
        a[name] = [[fn(tensor), opts]] + a[name][1:]
    return change


def _opts(name, **kw):
    def change(env, a):
        tensor, opts = a[name][0]
        new = dict(opts)
        for k, v in kw.items():
            if v is None:
                new.pop(k, None)
            else:
                new[k] = v(opts.get(k)) if callable(v) else v
        a[name] = [[tensor, new]]
    return change


def _latent(fn=None, **keys):
    def change(env, a):
        latent = dict(a["latent_image"])
        if fn is not None:
            latent["samples"] = fn(latent["samples"])
        latent.update(keys)
        a["latent_image"] = latent
    return change


def _nan_at(t):
    t = t.clone()
    t.view(-1)[t.numel() // 2] = float("nan")
    return t


def _inf_at(t):
    t = t.clone()
    t.view(-1)[0] = float("inf")
    return t


def _wrapper(kind, from_step_sigma=None):
    """A model patch (a unet function wrapper, as custom nodes set) that breaks the model's output."""
    def change(env, a):
        import torch
        model = a["model"].clone()

        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            sigma = float(args["timestep"].reshape(-1)[0])
            if from_step_sigma is not None and sigma > from_step_sigma:
                return out
            if kind == "nan":
                return out * float("nan")
            if kind == "inf":
                return out * torch.tensor(65504.0) ** 8  # as a float16 overflow: +-Inf
            if kind == "none":
                return None
            return out[:, :1]
        model.set_model_unet_function_wrapper(wrapper)
        a["model"] = model
    return change


def _broken_lora(env, a):
    """A LoRA-like weight patch with NaN in it: the patched model outputs NaN from the first step."""
    import torch
    model = a["model"].clone()
    sd = model.model.state_dict()
    key = next(k for k in sd if k.startswith("diffusion_model.") and k.endswith(".weight") and sd[k].ndim == 2)
    model.add_patches({key: (torch.full_like(sd[key], float("nan")),)}, 1.0)
    a["model"] = model


def _network_returns(kind):
    """A custom network whose forward returns None or a wrong shape (a fresh copy of the checkpoint)."""
    def change(env, a):
        model = env.fresh_checkpoint(a["model_key"])
        net = model.model.diffusion_model
        if kind == "none":
            net.forward = lambda *args, **kw: None
        else:
            net.forward = lambda x, *args, **kw: x[:, :1]
        a["model"] = model
    return change


def cases() -> list:
    import torch
    out = []

    def add(name, model, inp, change, **kw):
        out.append(Case(name, model, inp, change, **kw))

    for m in ("sd15", "sd3", "wan"):
        width = {"sd15": 768, "sd3": 4096, "wan": 4096}[m]
        add("positive = []", m, "positive", _set("positive", []))
        add("positive = None", m, "positive", _set("positive", None))
        add("positive = bare tensor", m, "positive", _set("positive", lambda e, a: a["positive"][0][0]))
        add("positive entry without dict", m, "positive", _set("positive", lambda e, a: [a["positive"][0][0]]))
        add("positive entry [tensor, None]", m, "positive", _set("positive", lambda e, a: [[a["positive"][0][0], None]]))
        add("positive 2-D tensor", m, "positive", _cond("positive", lambda t: t[0]))
        add("positive NaN inside", m, "positive", _cond("positive", _nan_at))
        add(f"positive width {1024 if width == 768 else 768} (wrong text encoder)", m, "positive",
            _cond("positive", lambda t, w=width: torch.randn(1, t.shape[1], 1024 if w == 768 else 768)))
        add("negative = [] at cfg 4", m, "negative", _set("negative", []))
        add("negative Inf inside", m, "negative", _cond("negative", _inf_at))
        add("latent 3 channels (non-zero)", m, "latent_image",
            _latent(lambda s: torch.randn((s.shape[0], 3) + tuple(s.shape[2:]))))
        add("latent 3-D tensor", m, "latent_image", _latent(lambda s: s.reshape(s.shape[0], s.shape[1], -1)))
        add("noise_mask all -1", m, "latent_image", _latent(noise_mask=torch.full((1, 64, 64), -1.0)))
        add("model returns NaN from sigma < 1 (wrapper)", m, "model", _wrapper("nan", from_step_sigma=1.0),
            steps=6, output=True)
        add("model returns Inf (fp16-style overflow)", m, "model", _wrapper("inf"), output=True)
        add("model function returns None", m, "model", _wrapper("none"), output=True)
        add("model function returns wrong shape", m, "model", _wrapper("shape"), output=True)
        add("latent float16", m, "latent_image", _latent(lambda s: s.half()), dtype=True, half="float16")
        add("positive/negative float64", m, "positive", lambda e, a: [
            _cond(n, lambda t: t.double())(e, a) for n in ("positive", "negative")], dtype=True)
    # SD1.5 (eps) extras
    add("latent 4-channel SD latent 5-D", "sd15", "latent_image", _latent(lambda s: s.unsqueeze(2)))
    add("latent not a dict (bare tensor)", "sd15", "latent_image", _set("latent_image",
                                                                        lambda e, a: a["latent_image"]["samples"]))
    add("latent NaN inside", "sd15", "latent_image", _latent(_nan_at))
    add("noise_mask values up to 2", "sd15", "latent_image", _latent(noise_mask=torch.full((1, 64, 64), 2.0)))
    add("model = bare BaseModel", "sd15", "model", _set("model", lambda e, a: a["model"].model))
    add("model = VAE object", "sd15", "model", _set("model", lambda e, a: e.vaes["sd15"]))
    add("model = None", "sd15", "model", _set("model", None))
    add("broken LoRA (NaN weights)", "sd15", "model", _broken_lora, output=True)
    add("network returns None", "sd15", "model", _network_returns("none"), output=True)
    add("network returns wrong shape", "sd15", "model", _network_returns("shape"), output=True)
    add("conditioning mask all -1", "sd15", "positive", _opts("positive", mask=torch.full((1, 8, 8), -1.0)))
    add("strength NaN", "sd15", "positive", _opts("positive", strength=float("nan")))
    add("latent bfloat16", "sd15", "latent_image", _latent(lambda s: s.bfloat16()), dtype=True, half="bfloat16")
    add("latent float64", "sd15", "latent_image", _latent(lambda s: s.double()), dtype=True)
    add("positive/negative float16", "sd15", "positive", lambda e, a: [
        _cond(n, lambda t: t.half())(e, a) for n in ("positive", "negative")], dtype=True)
    add("area past the latent (offset 100 of 8)", "sd15", "positive", _opts("positive", area=(8, 8, 100, 100)))
    add("area of negative size", "sd15", "positive", _opts("positive", area=(-8, -8, 0, 0)))
    add("percentage area starting past the latent", "sd15", "positive",
        _opts("positive", area=("percentage", 0.5, 0.5, 1.5, 1.5)))
    add("batch_index 2**40", "sd15", "latent_image", _latent(batch_index=[2 ** 40]))
    add("2 conditioning masks for a latent batch of 3", "sd15", "positive", lambda e, a: [
        _latent(lambda s: s.repeat(3, 1, 1, 1))(e, a), _opts("positive", mask=torch.ones(2, 8, 8))(e, a)])
    add("positive values 1e30 (broken encoder)", "sd15", "positive", _cond("positive", lambda t: t * 1e30))
    # SD3 (flow) extras
    add("SD latent (4 channels, non-zero) into SD3", "sd3", "latent_image",
        _latent(lambda s: torch.randn(1, 4, 8, 8)))
    add("pooled_output missing", "sd3", "positive", _opts("positive", pooled_output=None))
    add("pooled_output 1280 wide", "sd3", "positive", _opts("positive", pooled_output=torch.randn(1, 1280)))
    add("pooled_output NaN", "sd3", "positive", _opts("positive", pooled_output=lambda p: _nan_at(p)))
    add("pooled_output not a tensor", "sd3", "positive", _opts("positive", pooled_output=[0.0] * 2048))
    add("negative pooled_output missing", "sd3", "negative", _opts("negative", pooled_output=None))
    add("latent past SD3's position embedding (40x40 of 32)", "sd3", "latent_image",
        _latent(lambda s: torch.zeros(1, 16, 40, 40)))
    add("broken LoRA (NaN weights)", "sd3", "model", _broken_lora, output=True)
    add("network returns None", "sd3", "model", _network_returns("none"), output=True)
    add("pooled_output float64", "sd3", "positive", _opts("positive", pooled_output=lambda p: p.double()),
        dtype=True)
    # Wan 2.1 (video) extras
    add("video latent 4 channels (non-zero)", "wan", "latent_image",
        _latent(lambda s: torch.randn((1, 4) + tuple(s.shape[2:]))))
    add("video latent 6-D", "wan", "latent_image", _latent(lambda s: s.unsqueeze(0)))
    add("video noise_mask NaN", "wan", "latent_image", _latent(noise_mask=_nan_at(torch.ones(3, 64, 64))))
    add("latent bfloat16", "wan", "latent_image", _latent(lambda s: s.bfloat16()), dtype=True, half="bfloat16")
    # mixed graphs: the bundled nodes with ComfyUI's own
    add("bundled MODEL with an SD1.5 graph", "sd15", "model", _set("model", lambda e, a: e.models["bundled"]))
    add("bundled conditioning into SD1.5", "sd15", "positive",
        lambda e, a: a.update(positive=e.clean["bundled"]["positive"], negative=e.clean["bundled"]["negative"]))
    add("bundled empty latent (32x32) into SD1.5", "sd15", "latent_image",
        _set("latent_image", lambda e, a: e.clean["bundled"]["latent_image"]))
    add("bundled VAE-encoded latent into SD3", "sd3", "latent_image", _set("latent_image", lambda e, a: e.ours[
        "ksampler_VAEEncode"]().encode(torch.rand(1, 32, 32, 3), e.bundled_vae)[0]))
    add("bundled conditioning into Wan", "wan", "positive",
        lambda e, a: a.update(positive=e.clean["bundled"]["positive"]))
    add("SD 64x64 empty latent into the bundled model", "bundled", "latent_image",
        _set("latent_image", lambda e, a: e.nodes.EmptyLatentImage().generate(64, 64, 1)[0]))
    add("SD 128x128 empty latent into the bundled model", "bundled", "latent_image",
        _set("latent_image", lambda e, a: e.nodes.EmptyLatentImage().generate(128, 128, 1)[0]))
    add("SD1.5 conditioning into the bundled model", "bundled", "positive",
        lambda e, a: a.update(positive=e.clean["sd15"]["positive"], negative=e.clean["sd15"]["negative"]))
    add("bundled model: positive = []", "bundled", "positive", _set("positive", []))
    add("bundled model: noise_mask all -1", "bundled", "latent_image",
        _latent(noise_mask=torch.full((1, 32, 32), -1.0)))
    add("bundled model: latent 24x24 (not a multiple of 16)", "bundled", "latent_image",
        _latent(lambda s: torch.zeros(1, 3, 24, 24)))
    add("bundled model: conditioning NaN", "bundled", "positive", _cond("positive", _nan_at))
    return out


# ----------------------------------------------------------------------------------------------------------
# running and classifying
# ----------------------------------------------------------------------------------------------------------
def count_calls(model):
    """A forward pre-hook counting the network's calls; returns (counter, remove)."""
    net = getattr(getattr(model, "model", None), "diffusion_model", None) or getattr(model, "network", None)
    counter = [0]
    if net is None or not hasattr(net, "register_forward_pre_hook"):
        return counter, lambda: None

    def hook(module, inputs):
        counter[0] += 1
    handle = net.register_forward_pre_hook(hook)
    return counter, handle.remove


def _release_models():
    """ComfyUI patches a loaded model's weights in place and restores them when it unloads it: unload first, so a
    snapshot sees the caller's weights (a LoRA still applied from the last run is not a mutation)."""
    import comfy.model_management
    loaded = comfy.model_management.current_loaded_models
    if any(getattr(getattr(m, "model", None), "patches", None) for m in loaded):
        comfy.model_management.unload_all_models()


def run_node(fn, args, timeout) -> Outcome:
    import torch
    _release_models()
    before = {k: snapshot(v) for k, v in args.items()}
    counter, remove = count_calls(args.get("model"))
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        result = fn(**args)
        outcome = Outcome("silent", output=result[0]["samples"])
        if isinstance(outcome.output, torch.Tensor) and not bool(torch.isfinite(outcome.output).all()):
            outcome.detail = "NaN/Inf latent"
    except Hung:
        outcome = Outcome("hung", f"over {timeout} s")
    except Exception as e:  # classified below
        outcome = Outcome("error", f"{type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        remove()
    outcome.calls = counter[0]
    _release_models()
    after = {k: snapshot(v) for k, v in args.items()}
    if any(not same(before[k], after[k]) for k in args):
        outcome.extra["mutated"] = [k for k in args if not same(before[k], after[k])]
    return outcome


def classify(outcome: Outcome, case: Case) -> str:
    if outcome.extra.get("mutated"):
        return "mutated"
    if outcome.kind == "error":
        message = outcome.detail.split(": ", 1)[-1]
        return "clear error" if re.search(rf"(^|\W){re.escape(case.input)}\W", message) else "other error"
    return outcome.kind


def relative_diff(ref, out) -> float:
    return float((ref.float() - out.float()).abs().max() / ref.float().std())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR", "/tmp/comfy/ComfyUI"))
    ap.add_argument("--models-dir", default=os.environ.get("COMFY_MODELS", "/tmp/comfy/models"))
    ap.add_argument("--timeout", type=int, default=120, help="seconds before a run counts as hung")
    ap.add_argument("--tol", type=float, default=1e-4, help="dtype cases: max |ours - built-in| / std(built-in)")
    ap.add_argument("--only", default="", help="run the cases whose name matches this regular expression")
    ap.add_argument("--models", default="sd15,sd3,wan,bundled", help="run the cases on these models")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    sys.path.insert(0, HARNESS)
    import harness_env
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)
    nodes = harness_env.bootstrap_comfy(a.comfyui_dir, a.models_dir)
    import comfy.utils
    import torch
    comfy.utils.PROGRESS_BAR_ENABLED = False
    ours = load_pack()
    env = Env(nodes, ours, a.models_dir)
    ours_fn, builtin_fn = ours["ksampler_KSampler"]().sample, nodes.KSampler().sample

    fresh = {}
    for key in a.models.split(","):
        fresh[key] = ours_fn(**env.args(key))[0]["samples"]

    rows, failures = [], []
    for case in cases():
        if (a.only and not re.search(a.only, case.name)) or case.model not in a.models.split(","):
            continue
        results = {}
        for side, fn in (("ours", ours_fn), ("built-in", builtin_fn)):
            args = env.args(case.model, case.steps)
            args["model_key"] = case.model
            case.change(env, args)
            args.pop("model_key")
            results[side] = run_node(fn, args, a.timeout)
        mine, ref = results["ours"], results["built-in"]
        ours_class, ref_class = classify(mine, case), classify(ref, case)
        diff = None
        if case.dtype:
            ref_class = "reference" if ref_class == "silent" else ref_class
            if ours_class == "silent" and ref.kind == "silent":
                diff = relative_diff(ref.output, mine.output)
                tol = HALF_TOL.get(case.half, a.tol)
                finite = bool(torch.isfinite(mine.output).all()) and mine.output.dtype == torch.float32
                ours_class = "converts" if diff <= tol and finite else f"silent (differs {diff:.1e})"
        clean = ours_fn(**env.args(case.model))[0]["samples"]
        identical = bool(torch.equal(clean, fresh[case.model]))
        graph_error = not case.output
        ok = (ours_class == "converts") if case.dtype else (ours_class == "clear error")
        ok = ok and identical and not (graph_error and mine.kind == "error" and mine.calls > 0)
        if not ok:
            failures.append(case)
        rows.append(dict(model=case.model, case=case.name, input=case.input, ours=ours_class,
                         builtin=ref_class, calls=mine.calls if mine.kind == "error" else "-",
                         diff=diff,
                         clean_rerun="identical" if identical else "DIFFERS", ours_message=mine.detail[:400],
                         builtin_message=(ref.detail or "")[:200]))
        print(f"[{len(rows)}] {case.model:8s} {case.name:50s} ours: {ours_class:12s} built-in: {ref_class:12s}"
              f" | {mine.detail[:160] if diff is None else f'max|ours - built-in| / std = {diff:.2e}'}", flush=True)

    print("\n| model | case | ours | built-in | model calls before our error | clean re-run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['case']} | {r['ours']} | {r['builtin']} | {r['calls']} | {r['clean_rerun']} |")
    classes = ["clear error", "other error", "silent", "hung", "mutated", "converts", "reference"]
    print("\n| class | ours | built-in |\n| --- | --- | --- |")
    for c in classes:
        n_ours = sum(r["ours"] == c for r in rows)
        n_ref = sum(r["builtin"] == c for r in rows)
        if n_ours or n_ref:
            print(f"| {c} | {n_ours} | {n_ref} |")
    other = sorted({r["ours"] for r in rows} - set(classes))
    for c in other:
        print(f"| {c} | {sum(r['ours'] == c for r in rows)} | - |")
    print(f"\n{len(rows) - len(failures)}/{len(rows)} cases as required on our node")
    for case in failures:
        print(f"  NOT OK: {case.model} {case.name}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
