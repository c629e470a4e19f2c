"""Check the calibration node inside the real ComfyUI, in-process, with its tiny checkpoints.

    /tmp/comfy/venv/bin/python tools/comfy_calibration_check.py [--comfyui-dir DIR] [--steps 5]

For each tiny model (SD1.5 eps, SD3 flow) and under torch.inference_mode (as ComfyUI's executor runs nodes): our
"Calibrated Scheduler (ksampler)" fits through the host's model (CFGGuider, ModelPatcher); ComfyUI's own
SamplerCustom node then samples with its SIGMAS and SAMPLER; our KSampler samples with the calibration; a second
node call must reuse the fit without a model call; at eta 0.5 (the same fit, re-noising from the seed) SamplerCustom
and our KSampler must again agree; a fit refined on 8 more noises (``refine_noises``) must run; a calibration file
written by one load of the checkpoint must load, without fitting, for a fresh load with an empty cache (as after a
restart); FreeU (RescaleCFG on SD3), a model sampling override (ModelSamplingDiscrete, ModelSamplingSD3) and LoRA-
style weight patches must each get a fit of their own; a calibration_file outside ComfyUI's output folder must be
refused; a fit recomputing each model call in its backward pass (as one short of memory does) must be the same
fit, its extra model calls counted; with a ControlNet in the conditioning (SD1.5), a calibration file must load
after a restart and be refused for another hint; ComfyUI's progress hook must see a fit's iterations one by one,
and a stop request (interrupt_current_processing) must end the fit at the next one; with hooks on the
conditioning (SD1.5: keyframed and not), the fit must follow them (``_hooks_check``); EasyCache and LazyCache on the
model must share the plain model's fit (``_step_cache_check``); a ControlNet on a UNet with a middle block must be
fitted by autograd (``_controlnet_gradient_check``); a tiny Wan 2.1, whose rotary embedding torch cannot
differentiate where comfy_kitchen runs it, must be fitted by autograd through our torch rotation (by SPSA, saying
why, with that turned off), and sample alike in both nodes (``_rope_model_check``). ComfyUI is imported as a
library (../shared/comfyui harness); nothing of it is copied here.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import math
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = next((os.path.join(d, "shared", "comfyui") for d in (os.path.dirname(ROOT),
                                                                 os.path.dirname(os.path.dirname(ROOT)))
                if os.path.isdir(os.path.join(d, "shared", "comfyui"))), "../shared/comfyui")


def _first(node_output):
    """The first output of a node call (a classic tuple or a V3 NodeOutput)."""
    return node_output[0] if isinstance(node_output, tuple) else node_output.result[0]


def _with_controlnet(nodes, model, m, row: int) -> tuple:
    """The random prompts with a random-weight ControlNet for ``model``'s UNet, applied by ComfyUI's own
    ControlNetApplyAdvanced on an edge-map hint (a line at pixel row ``row``)."""
    import torch
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    from harness_nodes import random_conditioning
    config = dict(model.model.model_config.unet_config, hint_channels=3, operations=comfy.ops.manual_cast,
                  dtype=torch.float32, device=torch.device("cpu"))
    config.pop("out_channels", None)
    torch.manual_seed(0)
    network = comfy.cldm.cldm.ControlNet(**config)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.02)
    control = comfy.controlnet.ControlNet(network, load_device=torch.device("cpu"), manual_cast_dtype=None)
    hint = torch.zeros(1, 32, 32, 3)
    hint[:, row, 5:25, :] = 1.0  # an edge map: mostly zeros
    pos = random_conditioning(101, m["cond_tokens"], m["cond_dim"], m["pooled_dim"])
    neg = random_conditioning(202, m["cond_tokens"], m["cond_dim"], m["pooled_dim"])
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 0.8, 0.0, 1.0)
    return pos, neg, network


def _controlnet_gradient_check(nodes, classes, m, latent, args) -> tuple:
    """A ControlNet on a UNet with a middle block (the tiny SD1.5 UNet's config with one, random weights, loaded by
    ComfyUI as SD1.5 in inference mode, as the executor loads it): the fit runs by autograd through the
    ControlNet, the out-of-place residual sums give the host's values bit for bit, and the weights are the host's
    inference tensors again after.  The tiny checkpoint itself has no middle block: there the fit stays SPSA."""
    import torch
    import comfy.ops
    import comfy.samplers
    import comfy.sd
    import make_tiny_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(0)
    unet = UNetModel(**dict(make_tiny_models.SD15_UNET, transformer_depth_middle=1), dtype=torch.float32,
                     device="cpu", operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model_state_dict(unet.state_dict())
        pos, neg, network = _with_controlnet(nodes, model, m, 10)
        same = []
        out_of_place = importlib.import_module("ksampler_pack.comfy_calibration").out_of_place_control

        class Compare(comfy.samplers.Sampler):  # one guided call each way, inside ComfyUI's sampling
            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                       disable_pbar=False):
                sigma = sigmas[:1].expand(noise.shape[0])
                host = model_wrap(noise * float(sigmas[0]), sigma, **extra_args)
                with out_of_place(model_wrap.inner_model) as swapped:
                    ours = model_wrap(noise * float(sigmas[0]), sigma, **extra_args)
                same.append(swapped and torch.equal(host, ours))
                return latent_image
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(5.0)
        noise = torch.randn(2, m["latent_channels"], 4, 4, generator=torch.Generator().manual_seed(3))
        guider.sample(noise, torch.zeros_like(noise), Compare(), torch.tensor([5.0, 0.0]), seed=0, disable_pbar=True)
        cal = classes["ksampler_CalibratedScheduler"]().calibrate(
            model, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=2, teacher_steps=args.teacher_steps)[2]
        restored = all(p.is_inference() for p in network.parameters())
    ok = same == [True] and cal.info["gradient"] == "autograd" and restored
    return ok, (f"the residual sums out of place give the host's values {same == [True]}, fitted by "
                f"{cal.info['gradient']}, the ControlNet's weights the host's again {restored}")


def _lora_like(model):
    """A clone of ``model`` with weight patches as a LoRA loader adds them (ComfyUI's own ``add_patches``: a
    random diff on eight of the network's weights, at strength 0.5)."""
    import torch
    patched = model.clone()
    weights = model.model.state_dict()
    names = [n for n in weights if n.startswith("diffusion_model.") and n.endswith(".weight")][:8]
    gen = torch.Generator().manual_seed(1)
    patched.add_patches({n: (0.05 * torch.randn(weights[n].shape, generator=gen),) for n in names}, 0.5)
    return patched


def _controlnet_file_check(nodes, classes, m, latent, args, work) -> bool:
    """A ControlNet in the conditioning (a random-weight one built for the tiny UNet, applied by ComfyUI's own
    ControlNetApplyAdvanced): a calibration file written with it loads, without fitting, for everything built anew
    (as after a restart), also when a sampling run has loaded and run the new ControlNet first; a hint moved by one
    pixel row is refused as other inputs."""
    import torch

    def build(row: int):
        model = nodes.CheckpointLoaderSimple().load_checkpoint(m["checkpoint"])[0]
        return (model,) + _with_controlnet(nodes, model, m, row)[:2]
    path = os.path.join(work, "controlnet.safetensors")
    node, cache = classes["ksampler_CalibratedScheduler"](), sys.modules["ksampler_pack.calibration"]

    def calibrate(model, pos, neg):
        return node.calibrate(model, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=2,
                              teacher_steps=args.teacher_steps, calibration_file=path)[2]
    with torch.inference_mode():
        model, pos, neg = build(10)
        cal = calibrate(model, pos, neg)
        nodes.KSampler().sample(model, 1, 3, 5.0, "euler", "karras", pos, neg, latent)
        # as after a restart, with the new ControlNet already used by a sampling run (ComfyUI keeps node outputs,
        # so a second queue hands the calibration a ControlNet its KSampler has loaded and run)
        fresh = build(10)
        nodes.KSampler().sample(fresh[0], 1, 3, 5.0, "euler", "karras", fresh[1], fresh[2], latent)
        cache.clear_cache()
        t = time.time()
        again = calibrate(*fresh)
        reloaded = torch.equal(again.sigmas, cal.sigmas) and again is not cal and time.time() - t < 5.0
        cache.clear_cache()
        try:
            calibrate(*build(11))
            refused = False
        except Exception as exc:  # noqa: BLE001  (the node's input error)
            refused = "other inputs" in str(exc)
    return reloaded and refused


def _hooks_check(nodes, classes, m, latent, args, work) -> tuple:
    """Hooks on the conditioning (ComfyUI's weight hooks: the checkpoint's own weights, perturbed, as a "model as LoRA"
    hook, put on both prompts by ComfyUI's own hook nodes, as Cond Set Props does), with keyframes from strength 1
    to 0 and without. With keyframes, each of the fit's passes starts at the first keyframe's strength (as each
    sample does), the fit runs by SPSA and says why, a second call after a KSampler run reuses the fit, a file
    written by it loads after a KSampler run (ComfyUI notes where a sample left the keyframes on them), and the
    model samples as before the fit. One unchanging hook on both: the fit runs by autograd, and the model samples as
    before it."""
    import torch
    import comfy.hooks
    import comfy_extras.nodes_hooks as nodes_hooks
    from harness_nodes import random_conditioning
    model = nodes.CheckpointLoaderSimple().load_checkpoint(m["checkpoint"])[0]
    pos = random_conditioning(101, m["cond_tokens"], m["cond_dim"], m["pooled_dim"])
    neg = random_conditioning(202, m["cond_tokens"], m["cond_dim"], m["pooled_dim"])
    gen = torch.Generator().manual_seed(0)
    weights = {f"diffusion_model.{k}": v.clone() * (1 + 0.1 * torch.randn(v.shape, generator=gen))
               for k, v in model.model.diffusion_model.state_dict().items()}
    plain_hook = comfy.hooks.create_hook_model_as_lora(weights, None, 1.0, 1.0)
    keyframes = _first(nodes_hooks.CreateHookKeyframesInterpolated().create_hook_keyframes(
        1.0, 0.0, "linear", 0.0, 1.0, 5))
    keyed_hook = _first(nodes_hooks.SetHookKeyframes().set_hook_keyframes(plain_hook, keyframes))
    node, cache = classes["ksampler_CalibratedScheduler"](), sys.modules["ksampler_pack.calibration"]
    path = os.path.join(work, "hooks.safetensors")
    seen = []
    original = comfy.hooks.HookKeyframeGroup.prepare_current_keyframe

    def spy(self, curr_t, transformer_options):
        changed = original(self, curr_t, transformer_options)
        seen.append((float(curr_t), float(self.strength)))
        return changed

    def with_hooks(conditioning, hooks):  # ComfyUI's "Cond Set Props" node
        return _first(nodes_hooks.ConditioningSetProperties().set_properties(conditioning, 1.0, "default",
                                                                             hooks=hooks))

    def calibrate(p, n, **extra):
        return node.calibrate(model, p, n, latent, args.steps, 5.0, fit_noises=4, iterations=2,
                              teacher_steps=args.teacher_steps, **extra)[2]
    comfy.hooks.HookKeyframeGroup.prepare_current_keyframe = spy
    printed = io.StringIO()
    try:
        with torch.inference_mode():
            p, n = (with_hooks(c, keyed_hook) for c in (pos, neg))
            before = nodes.KSampler().sample(model, 3, args.steps, 5.0, "euler", "karras", p, n, latent)[0]
            seen.clear()
            with contextlib.redirect_stdout(printed):  # the fit's log
                cal = calibrate(p, n, calibration_file=path)
            messages = printed.getvalue().splitlines()
            sigma_max = float(model.get_model_object("model_sampling").sigma_max)
            starts = [strength for (t, strength), (t_before, _) in zip(seen[1:], seen) if t > t_before] + \
                [seen[0][1]]
            from_first = len(starts) > 4 and all(strength == 1.0 for strength in starts) and \
                min(strength for _, strength in seen) < 1.0 and seen[0][0] == sigma_max
            spsa = cal.info["gradient"] == "spsa" and any("hooks on the conditioning" in msg for msg in messages)
            after = nodes.KSampler().sample(model, 3, args.steps, 5.0, "euler", "karras", p, n, latent)[0]
            unchanged = torch.equal(before["samples"], after["samples"])
            reused = calibrate(p, n) is cal
            cache.clear_cache()
            t = time.time()
            from_file = calibrate(p, n, calibration_file=path)
            loaded = torch.equal(from_file.sigmas, cal.sigmas) and time.time() - t < 5.0
            p, n = (with_hooks(c, plain_hook) for c in (pos, neg))
            before = nodes.KSampler().sample(model, 3, args.steps, 5.0, "euler", "karras", p, n, latent)[0]
            steady = calibrate(p, n).info["gradient"] == "autograd"  # with the weights swapped for the gradient
            after = nodes.KSampler().sample(model, 3, args.steps, 5.0, "euler", "karras", p, n, latent)[0]
            unchanged &= torch.equal(before["samples"], after["samples"])
    finally:
        comfy.hooks.HookKeyframeGroup.prepare_current_keyframe = original
    ok = from_first and spsa and unchanged and reused and loaded and steady
    return ok, (f"passes from the first keyframe {from_first} ({len(starts)} passes), SPSA with the reason {spsa}, "
                f"KSampler unchanged by either fit {unchanged}, reused after a KSampler run {reused}, the file loaded "
                f"after a KSampler run {loaded}; one unchanging hook by autograd {steady}")


def _step_cache_check(classes, model, pos, neg, latent, args, cal) -> bool:
    """ComfyUI's EasyCache and LazyCache on the model (its own nodes): the calibration node shares the fit of the
    model without them (``cal``, in the cache) instead of crashing inside them, and our KSampler samples the
    cached model with it."""
    import torch
    import comfy_extras.nodes_easycache as nodes_easycache
    ok = True
    for node in (nodes_easycache.EasyCacheNode, nodes_easycache.LazyCacheNode):
        cached = _first(node.execute(model, 0.2, 0.15, 0.95, False))
        shared = classes["ksampler_CalibratedScheduler"]().calibrate(
            cached, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
            teacher_steps=args.teacher_steps)[2]
        out = classes["ksampler_KSampler"]().sample(cached, 3, args.steps, 5.0, "euler", "karras", pos, neg, latent,
                                                    calibration=shared)[0]
        ok &= shared is cal and bool(torch.isfinite(out["samples"]).all())
    return ok


def _progress_and_stop_check(classes, model, pos, neg, latent, args) -> tuple:
    """A fit through the node reports each iteration to ComfyUI's progress hook (its node's bar), and a stop
    request raised after the fifth update ends the fit at the next one, by the host's own exception.  The hook
    here only records (the server's hook also checks for a stop; this checks that the fit does)."""
    import comfy.model_management as mm
    import comfy.utils
    seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append((value, total))
        if len(seen) == 5:
            mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        classes["ksampler_CalibratedScheduler"]().calibrate(
            model, pos, neg, latent, args.steps, 6.5, fit_noises=4, iterations=max(args.iterations, 30),
            teacher_steps=args.teacher_steps)
        stopped = False
    except mm.InterruptProcessingException:
        stopped = True
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    total = seen[0][1] if seen else None
    ok = stopped and seen == [(i, total) for i in range(1, 6)] and total > max(args.iterations, 30)
    return ok, f"{seen[:2]}...{seen[-1:]} ({len(seen)} updates)"


def _rope_model_check(classes, custom, args) -> tuple:
    """A tiny random-weight Wan 2.1 (video), whose rotary embedding runs comfy_kitchen's custom op where ComfyUI has
    it, which torch cannot differentiate: our torch rotation must give the op's values, the fit must go by autograd
    through it and say so, and the op must be back after; with the swap turned off, the fit must go on by SPSA and
    say why.  SamplerCustom with the fitted SAMPLER and SIGMAS must equal our KSampler with the calibration."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from comfy_extra_parity import tiny_wan
    import comfy.ldm.flux.math as flux_math
    model = tiny_wan()
    pos = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(1)), {}]]
    neg = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(2)), {}]]
    latent = {"samples": torch.zeros(1, 16, 3, 8, 8)}
    kitchen_op = flux_math.apply_rope1
    kitchen = "comfy_kitchen" in getattr(kitchen_op, "__module__", "")
    comfy_calibration = importlib.import_module("ksampler_pack.comfy_calibration")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 24, 2, 128, generator=gen)
    freqs = flux_math.rope(torch.arange(24.0).reshape(1, 24), 128, 10000).unsqueeze(2)
    same_values = torch.allclose(comfy_calibration.rotate_pairs(x, freqs), kitchen_op(x, freqs), atol=1e-5)
    # Flux's attention (q and k turned together by flux.math's apply_rope): the same values, and a gradient
    q, k, v = (torch.randn(1, 2, 24, 128, generator=gen) for _ in range(3))
    pe = flux_math.rope(torch.arange(24.0).reshape(1, 24), 128, 10000).unsqueeze(1)
    with torch.no_grad():
        by_kitchen = flux_math.attention(q, k, v, pe)
    with comfy_calibration.differentiable_rotary(lambda message: None):
        probe = q.clone().requires_grad_(True)
        by_torch = flux_math.attention(probe, k, v, pe)
        by_torch.sum().backward()
    same_values &= (torch.allclose(by_torch.detach(), by_kitchen, atol=1e-5) and probe.grad is not None
                    and bool(torch.isfinite(probe.grad).all()) and flux_math.apply_rope1 is kitchen_op)

    def fit(swap: bool) -> tuple:
        sys.modules["ksampler_pack.calibration"].clear_cache()
        said_out = io.StringIO()  # the fit says what it does on stdout
        with contextlib.ExitStack() as stack:
            if not swap:
                stack.enter_context(_patched(comfy_calibration, "differentiable_rotary",
                                             lambda log: contextlib.nullcontext(False)))
            stack.enter_context(torch.inference_mode())
            stack.enter_context(contextlib.redirect_stdout(said_out))
            t = time.time()
            sigmas, sampler, cal = classes["ksampler_CalibratedScheduler"]().calibrate(
                model, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
                teacher_steps=args.teacher_steps)
            fit_s = time.time() - t
            out = _first(custom.SamplerCustom().sample(model, True, 3, 5.0, pos, neg, sampler, sigmas, latent))
            ours = classes["ksampler_KSampler"]().sample(model, 3, args.steps, 5.0, "euler", "karras", pos, neg,
                                                         latent, calibration=cal)[0]
        ok = (bool(torch.isfinite(out["samples"]).all()) and torch.allclose(ours["samples"], out["samples"], atol=1e-5)
              and bool((sigmas[1:] < sigmas[:-1]).all()) and math.isfinite(cal.info["rms_fitted"]))
        return ok, cal, fit_s, said_out.getvalue().splitlines()
    ok, cal, fit_s, said = fit(True)
    if not kitchen:  # nothing to swap: autograd through the host's torch rotation
        ok &= cal.info["gradient"] == "autograd"
        return ok, (f"wan21 (rotary embedding by torch, no comfy_kitchen): fit {fit_s:.1f}s by autograd, RMS to the "
                    f"teacher {cal.info['rms_start']:.4g} -> {cal.info['rms_fitted']:.4g}; KSampler(calibration) == "
                    f"SamplerCustom, finite: {ok}")
    swapped = cal.info["gradient"] == "autograd" and any("comfy_kitchen" in m for m in said) \
        and flux_math.apply_rope1 is kitchen_op and sys.modules["comfy.ldm.wan.model"].apply_rope1 is kitchen_op
    spsa_ok, spsa, spsa_s, spsa_said = fit(False)
    fallback = spsa.info["gradient"] == "spsa" and any("no autograd formula" in m and "SPSA" in m for m in spsa_said)
    return ok and swapped and same_values and spsa_ok and fallback, (
        f"wan21 (rotary embedding by comfy_kitchen): our torch rotation gives the op's values (Wan's apply_rope1, and "
        f"Flux's attention, with a gradient): {same_values}; fit "
        f"{fit_s:.1f}s by autograd through it, said so, the op back after: {swapped}; RMS to the teacher "
        f"{cal.info['rms_start']:.4g} -> {cal.info['rms_fitted']:.4g}; KSampler(calibration) == SamplerCustom, "
        f"finite: {ok}; without the swap, by SPSA ({spsa_s:.1f}s, RMS -> {spsa.info['rms_fitted']:.4g}) and said "
        f"why: {fallback}, KSampler == SamplerCustom: {spsa_ok}")


@contextlib.contextmanager
def _patched(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui-dir", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--teacher-steps", type=int, default=100)
    args = ap.parse_args()
    sys.path.insert(0, HARNESS)
    import harness_env
    comfyui_dir = harness_env.env_path("COMFYUI_DIR", args.comfyui_dir)
    models_dir = harness_env.env_path("COMFY_MODELS")
    manifest = harness_env.load_manifest(models_dir)
    nodes = harness_env.bootstrap_comfy(comfyui_dir, models_dir)
    import torch
    import comfy_extras.nodes_custom_sampler as custom
    import comfy_extras.nodes_freelunch as nodes_freelunch
    import comfy_extras.nodes_model_advanced as nodes_model_advanced
    from harness_nodes import random_conditioning

    spec = importlib.util.spec_from_file_location("ksampler_pack", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ksampler_pack"] = pack
    spec.loader.exec_module(pack)
    # the classic classes: on a host with the V3 schema the package exports comfy_entrypoint instead, whose
    # nodes run these same classes' methods
    classes = sys.modules["ksampler_pack.nodes"].NODE_CLASS_MAPPINGS
    torch.set_num_threads(1)
    import folder_paths
    # inside ComfyUI a calibration file lives in its output folder (and a path outside it is refused)
    os.makedirs(folder_paths.get_output_directory(), exist_ok=True)
    work = tempfile.mkdtemp(prefix="ksampler_calibration_check_", dir=folder_paths.get_output_directory())
    failures = 0
    runs = {}
    for key in ("sd15_eps", "sd3_flow"):
        m = manifest["models"][key]
        model = nodes.CheckpointLoaderSimple().load_checkpoint(m["checkpoint"])[0]
        pos = random_conditioning(101, m["cond_tokens"], m["cond_dim"], m["pooled_dim"])
        neg = random_conditioning(202, m["cond_tokens"], m["cond_dim"], m["pooled_dim"])
        latent = {"samples": torch.zeros((1, m["latent_channels"], 4, 4))}
        with torch.inference_mode():
            t = time.time()
            sigmas, sampler, cal = classes["ksampler_CalibratedScheduler"]().calibrate(
                model, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
                teacher_steps=args.teacher_steps)
            fit_s = time.time() - t
            ok = (sigmas.ndim == 1 and len(sigmas) == args.steps + 1 and float(sigmas[-1]) == 0
                  and bool((sigmas[1:] < sigmas[:-1]).all()))
            out = _first(custom.SamplerCustom().sample(model, True, 3, 5.0, pos, neg, sampler, sigmas, latent))
            ok &= bool(torch.isfinite(out["samples"]).all())
            ours = classes["ksampler_KSampler"]().sample(model, 3, args.steps, 5.0, "euler", "karras", pos, neg,
                                                         latent, calibration=cal)[0]
            same = torch.allclose(ours["samples"], out["samples"], atol=1e-5)
            t = time.time()
            again = classes["ksampler_CalibratedScheduler"]().calibrate(
                model, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
                teacher_steps=args.teacher_steps)
            cached = again[2] is cal and time.time() - t < 1.0
            step_caches = _step_cache_check(classes, model, pos, neg, latent, args, cal)
            # eta > 0: the same fit, re-noising from the seed; SamplerCustom and our KSampler draw the same noise
            _, noisy_sampler, noisy = classes["ksampler_CalibratedScheduler"]().calibrate(
                model, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
                teacher_steps=args.teacher_steps, eta=0.5)
            noisy_out = _first(custom.SamplerCustom().sample(model, True, 3, 5.0, pos, neg, noisy_sampler, sigmas,
                                                             latent))
            noisy_ours = classes["ksampler_KSampler"]().sample(model, 3, args.steps, 5.0, "euler", "karras", pos,
                                                               neg, latent, calibration=noisy)[0]
            stochastic = (noisy.sigmas is cal.sigmas and bool(torch.isfinite(noisy_out["samples"]).all())
                          and torch.allclose(noisy_ours["samples"], noisy_out["samples"], atol=1e-5)
                          and not torch.allclose(noisy_out["samples"], out["samples"], atol=1e-3))
            # refined on 8 more noises (a batch of another size through the host's guided model)
            t = time.time()
            refined_sigmas, refined_sampler, refined = classes["ksampler_CalibratedScheduler"]().calibrate(
                model, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
                teacher_steps=args.teacher_steps, refine_noises=8)
            refine_s = time.time() - t
            refined_out = _first(custom.SamplerCustom().sample(model, True, 3, 5.0, pos, neg, refined_sampler,
                                                               refined_sigmas, latent))
            refinement = (refined is not cal and refined.info.get("refine_noises") == 8
                          and math.isfinite(refined.info["rms_refined"])
                          and bool((refined_sigmas[1:] < refined_sigmas[:-1]).all())
                          and bool(torch.isfinite(refined_out["samples"]).all()))
            # a calibration file outlives the process: written from the cached fit, then loaded for a freshly
            # loaded checkpoint (new objects) with an empty cache, as after a restart, without fitting
            path = os.path.join(work, f"{key}.safetensors")
            classes["ksampler_CalibratedScheduler"]().calibrate(
                model, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
                teacher_steps=args.teacher_steps, calibration_file=path)
            sys.modules["ksampler_pack.calibration"].clear_cache()
            fresh = nodes.CheckpointLoaderSimple().load_checkpoint(m["checkpoint"])[0]
            t = time.time()
            restarted = classes["ksampler_CalibratedScheduler"]().calibrate(
                fresh, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
                teacher_steps=args.teacher_steps, calibration_file=path)[2]
            reload_s = time.time() - t
            reloaded = (os.path.exists(path) and restarted is not cal and torch.equal(restarted.sigmas, cal.sigmas)
                        and reload_s < 0.5 * fit_s)
            # what ComfyUI patches into the model besides its weights counts as another model: FreeU or
            # RescaleCFG (model_options) and a model sampling override (an object patch) each get a fit of their
            # own, the same settings again (a new node run, a deep-copied clone) reuse it, and the file written
            # for the plain model is refused for the patched one
            outcomes = []

            def fit_for(patched, file=None):
                return classes["ksampler_CalibratedScheduler"]().calibrate(
                    patched, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
                    teacher_steps=args.teacher_steps, **({"calibration_file": file} if file else {}))[2]
            variants = [_first(nodes_freelunch.FreeU_V2.execute(model, 1.3, 1.4, 0.9, 0.2)) if key == "sd15_eps"
                        else _first(nodes_model_advanced.RescaleCFG().patch(model, 0.7)),  # FreeU needs a UNet
                        _first(nodes_model_advanced.ModelSamplingDiscrete().patch(model, "v_prediction", False))
                        if key == "sd15_eps" else
                        _first(nodes_model_advanced.ModelSamplingSD3().patch(model, 6.0)),
                        _lora_like(model)]
            patch_keys = []
            for patched in variants:
                with_patch = fit_for(patched)
                repeat = fit_for(patched.clone())
                patch_keys.append(with_patch.info["key"])
                sys.modules["ksampler_pack.calibration"].clear_cache()  # so that the file is read
                try:
                    fit_for(patched, path)
                    refused = False
                except Exception as exc:  # noqa: BLE001  (the node's input error)
                    refused = "other inputs" in str(exc)
                outcomes.append(with_patch is not cal and repeat is with_patch and refused)
            patched_apart = all(outcomes) and len(set(patch_keys + [cal.info["key"]])) == len(variants) + 1
            controlled = _controlnet_file_check(nodes, classes, m, latent, args, work) if key == "sd15_eps" else True
            progress_stop = _progress_and_stop_check(classes, model, pos, neg, latent, args)
            hooked = _hooks_check(nodes, classes, m, latent, args, work) if key == "sd15_eps" else (True, "")
            graded = _controlnet_gradient_check(nodes, classes, m, latent, args) if key == "sd15_eps" else (True, "")
        print(f"{key}: sigmas {[round(float(s), 4) for s in sigmas]}; fit {fit_s:.1f}s "
              f"({cal.info['model_calls']} model calls, gradient: {cal.info['gradient']}); RMS to the teacher "
              f"{cal.info['rms_start']:.4g} -> {cal.info['rms_fitted']:.4g}; shifts of the first and last calls "
              f"{None if cal.shift is None else [round(float(cal.shift[0]), 4), round(float(cal.shift[-1]), 4)]}; "
              f"SamplerCustom finite: {ok}; "
              f"KSampler(calibration) == SamplerCustom: {same}; second call cached: {cached}; at eta 0.5 (no "
              f"refit) KSampler == SamplerCustom, and unlike eta 0: {stochastic}; refined on 8 noises "
              f"({refine_s:.1f}s, RMS on them {refined.info.get('rms_refined', float('nan')):.4g}), SamplerCustom "
              f"finite: {refinement}; the file reloaded for a fresh checkpoint load with an empty cache, without "
              f"fitting ({reload_s:.2f}s): {reloaded}; FreeU (SD3: RescaleCFG), a model sampling override and "
              f"LoRA-style weight patches fitted apart, reused for a clone, the plain model's file refused: "
              f"{patched_apart}"
              + ("" if key != "sd15_eps" else f"; with a ControlNet, the file reloaded after a sampling run for a "
                 f"fresh load and refused for a moved hint: {controlled}")
              + f"; progress hook {progress_stop[1]}, stopped mid-fit on request: {progress_stop[0]}; EasyCache and "
                f"LazyCache share the plain model's fit, and sample with it: {step_caches}"
              + ("" if key != "sd15_eps" else f"; hooks: {hooked[1]}; a ControlNet on a UNet with a middle block: "
                 f"{graded[1]}"))
        runs[key] = (model, pos, neg, latent, cal, sigmas, sampler)
        failures += not (ok and same and cached and stochastic and refinement and reloaded and patched_apart
                         and controlled and progress_stop[0] and hooked[0] and step_caches and graded[0])
    # a calibration refuses a model whose model sampling is not the one it was fitted on (SD1.5's on SD3 and the
    # other way), in our KSampler and in SamplerCustom, before the first model call
    refused = []
    for fitted, target in (("sd15_eps", "sd3_flow"), ("sd3_flow", "sd15_eps")):
        model, pos, neg, latent = runs[target][:4]
        cal, sigmas, sampler = runs[fitted][4:]
        counter = [0]
        handle = model.model.diffusion_model.register_forward_pre_hook(
            lambda *_: counter.__setitem__(0, counter[0] + 1))
        for run in (lambda: classes["ksampler_KSampler"]().sample(model, 3, args.steps, 5.0, "euler", "karras", pos,
                                                                  neg, latent, calibration=cal),
                    lambda: custom.SamplerCustom().sample(model, True, 3, 5.0, pos, neg, sampler, sigmas, latent)):
            try:
                with torch.inference_mode():
                    run()
                refused.append(False)
            except Exception as exc:  # noqa: BLE001  (the node's input error)
                refused.append("calibration: fitted for a model with" in str(exc) and counter[0] == 0)
        handle.remove()
    print(f"a calibration used on the other model refused before a model call (KSampler, SamplerCustom; SD1.5's on "
          f"SD3, SD3's on SD1.5): {refused}")
    failures += not all(refused)
    # each model call run again in the backward pass (as a fit short of memory does): the same fit, its extra
    # model calls counted (one per step of each backward pass, and of the gradient probe's)
    model, pos, neg, latent, cal = runs["sd15_eps"][:5]
    comfy_calibration = importlib.import_module("ksampler_pack.comfy_calibration")
    sys.modules["ksampler_pack.calibration"].clear_cache()
    with torch.inference_mode(), _patched(comfy_calibration, "fit_calibration",
                                          functools.partial(comfy_calibration.fit_calibration, gradient="recompute")):
        recomputed = classes["ksampler_CalibratedScheduler"]().calibrate(
            model, pos, neg, latent, args.steps, 5.0, fit_noises=4, iterations=args.iterations,
            teacher_steps=args.teacher_steps)[2]
    same_fit = (recomputed.info["recompute"] and torch.allclose(recomputed.sigmas, cal.sigmas, rtol=1e-5)
                and recomputed.info["model_calls"]
                == cal.info["model_calls"] + cal.info["backward_passes"] + args.steps)
    print(f"sd15_eps recomputing each model call in the backward pass: the same fit, {recomputed.info['model_calls']} "
          f"model calls against {cal.info['model_calls']} (+ one per step of each backward pass): {same_fit}")
    failures += not same_fit
    outside = os.path.join(tempfile.gettempdir(), "ksampler_outside.safetensors")
    model, pos, neg, latent = runs["sd15_eps"][:4]
    try:
        classes["ksampler_CalibratedScheduler"]().calibrate(model, pos, neg, latent, args.steps, 5.0,
                                                            calibration_file=outside)
        kept_in = False
    except Exception as exc:  # noqa: BLE001  (the node's input error)
        kept_in = "outside ComfyUI's output folder" in str(exc) and not os.path.exists(outside)
    print(f"a calibration_file outside ComfyUI's output folder refused: {kept_in}")
    failures += not kept_in
    shutil.rmtree(work, ignore_errors=True)
    wan_ok, wan_line = _rope_model_check(classes, custom, args)
    print(wan_line)
    failures += not wan_ok
    print("PASS" if not failures else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
