"""The controls and the two-model node through the real ComfyUI server (API-format graphs posted to /prompt).

    /tmp/comfy/venv/bin/python tools/comfy_server_check.py --comfyui-dir /tmp/comfy/ComfyUI-<branch> --port 8193

Uses the shared harness (../shared/comfyui: its Server, run_graph and random-conditioning nodes, imported at run
time) and the tiny sd15_eps / sd3_flow checkpoints.  Checks that /object_info serves KSampler Advanced with the
new optional inputs at the end, KSampler+ (Two Models) and Sampler Options+; then runs:
* KSampler Advanced with every control set (variation seed, guidance interval, ramp, stop, sampler options from a
  Sampler Options node, preview 'denoised') on both models;
* KSampler+ (Two Models) on two loads of the flow checkpoint (switch by sigma), and its switch_step output;
* the same node on an eps and a flow model, which must fail with an error naming model_low;
* a sampler option the sampler does not take, which must fail naming the option and the sampler;
* the Calibrated Scheduler+ (its optional inputs ending in eta, refine_noises, fit_candidates) fitted and refined
  on the flow model into ComfyUI's SamplerCustom (without fit_candidates in the graph, as saved before it, and
  with 2), and with refine_noises 2 or fit_candidates 2 without refinement, which must fail naming the input;
* the fit logged as "by autograd", not SPSA (the checkpoint's weights, loaded in inference mode, copied for it);
* the Calibrated Scheduler+ with keyframed hooks on both prompts (ComfyUI's hook nodes), fitted by SPSA saying why,
  and on a model with EasyCache or LazyCache, fitted without it saying so;
* the Calibrated Scheduler+ on the bundled model into our KSampler's calibration input;
* a calibration_file written under the server's output folder, and one outside it refused naming the input;
* Sampler Options+ with an option given twice, which must fail naming both values;
* a long calibration fit interrupted (POST /interrupt) 5 s into its run: it ends within seconds as
  execution_interrupted, and the next prompt runs as before (the progress bar: comfy_calibration_check.py).
Exit status 0 when every expectation holds.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.environ.get("COMFY_HARNESS") or next(
    (p for p in (os.path.join(os.path.dirname(ROOT), "shared", "comfyui"),
                 os.path.join(os.path.dirname(os.path.dirname(ROOT)), "shared", "comfyui")) if os.path.isdir(p)),
    os.path.join(os.path.dirname(ROOT), "shared", "comfyui"))

NEW_INPUTS = ["variation_seed", "variation_strength", "cfg_sigma_min", "cfg_sigma_max", "cfg_ramp", "cfg_ramp_end",
              "cfg_stop_at", "sampler_options", "preview"]


def conditioning(m):
    return {nid: {"class_type": "HarnessRandomConditioning",
                  "inputs": {"seed": seed, "tokens": m["cond_tokens"], "dim": m["cond_dim"],
                             "pooled_dim": m["pooled_dim"], "scale": 1.0}} for nid, seed in (("2", 101), ("3", 202))}


def advanced_graph(m, options_text, sampler):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": m["checkpoint"]}}, **conditioning(m)}
    g["4"] = {"class_type": m["empty_latent_node"], "inputs": {"width": 64, "height": 64, "batch_size": 2}}
    g["11"] = {"class_type": "ksampler_SamplerOptions", "inputs": {"options": options_text}}
    g["5"] = {"class_type": "ksampler_KSamplerAdvanced", "inputs": {
        "model": ["1", 0], "add_noise": "enable", "noise_seed": 7, "steps": 6, "cfg": 5.0, "sampler_name": sampler,
        "scheduler": "karras", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable",
        "batch_invariant_noise": True, "variation_seed": 8, "variation_strength": 0.25, "cfg_sigma_min": 0.05,
        "cfg_sigma_max": 5.0, "cfg_ramp": "linear", "cfg_ramp_end": 2.0, "cfg_stop_at": 0.9,
        "sampler_options": ["11", 0], "preview": "denoised"}}
    g["9"] = {"class_type": "HarnessLatentStats", "inputs": {"samples": ["5", 0]}}
    return g


def two_model_graph(m_high, m_low):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": m_high["checkpoint"]}},
         "12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": m_low["checkpoint"]}},
         **conditioning(m_high)}
    g["4"] = {"class_type": m_high["empty_latent_node"], "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["5"] = {"class_type": "ksampler_KSamplerTwoModels", "inputs": {
        "model_high": ["1", 0], "model_low": ["12", 0], "noise_seed": 3, "steps": 8, "cfg_high": 5.0, "cfg_low": 2.0,
        "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
        "latent_image": ["4", 0], "boundary": 0.875, "switch_by": "sigma", "switch_at_step": 4}}
    g["9"] = {"class_type": "HarnessLatentStats", "inputs": {"samples": ["5", 0]}}
    return g


def calibration_graph(m, refine_noises: int, fit_candidates=None):
    """The Calibrated Scheduler+ (a quick fit, refined on ``refine_noises`` more noises; ``fit_candidates`` fits if
    given, else the input left out, as in a workflow saved before it existed) into ComfyUI's SamplerCustom."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": m["checkpoint"]}}, **conditioning(m)}
    g["4"] = {"class_type": m["empty_latent_node"], "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["5"] = {"class_type": "ksampler_CalibratedScheduler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "steps": 3,
        "cfg": 4.0, "order": 3, "fit_noises": 4, "fit_seed": 0, "iterations": 2, "teacher_steps": 10,
        "calibration_file": "", "eta": 0.0, "refine_noises": refine_noises}}
    if fit_candidates is not None:
        g["5"]["inputs"]["fit_candidates"] = fit_candidates
    g["6"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": 5, "cfg": 4.0, "positive": ["2", 0],
        "negative": ["3", 0], "sampler": ["5", 1], "sigmas": ["5", 0], "latent_image": ["4", 0]}}
    g["9"] = {"class_type": "HarnessLatentStats", "inputs": {"samples": ["6", 0]}}
    return g


def bundled_calibration_graph():
    """The bundled model fitted by the Calibrated Scheduler+ (its calibration_file in a subfolder of the output
    folder) and sampled by our KSampler with the calibration."""
    g = {"1": {"class_type": "ksampler_CheckpointLoader", "inputs": {"ckpt_name": "flow"}},
         "2": {"class_type": "ksampler_TextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
         "3": {"class_type": "ksampler_TextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
         "4": {"class_type": "ksampler_EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}}
    g["5"] = {"class_type": "ksampler_CalibratedScheduler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "steps": 3,
        "cfg": 4.0, "fit_noises": 4, "iterations": 2, "teacher_steps": 10,
        "calibration_file": "ksampler_check/bundled.safetensors"}}
    g["6"] = {"class_type": "ksampler_KSampler", "inputs": {
        "model": ["1", 0], "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "karras",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0,
        "calibration": ["5", 2]}}
    g["9"] = {"class_type": "HarnessLatentStats", "inputs": {"samples": ["6", 0]}}
    return g


def hooked_calibration_graph(m):
    """``calibration_graph`` with ComfyUI's hook nodes on both prompts: the checkpoint as a "model as LoRA" hook,
    its strength keyframed from 1 to 0 over the sample."""
    g = calibration_graph(m, 0)
    g["20"] = {"class_type": "CreateHookModelAsLoraModelOnly", "inputs": {"ckpt_name": m["checkpoint"],
                                                                         "strength_model": 0.5}}
    g["21"] = {"class_type": "CreateHookKeyframesInterpolated", "inputs": {
        "strength_start": 1.0, "strength_end": 0.0, "interpolation": "linear", "start_percent": 0.0,
        "end_percent": 1.0, "keyframes_count": 5, "print_keyframes": False}}
    g["22"] = {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["20", 0], "hook_kf": ["21", 0]}}
    for nid, cond in (("23", "2"), ("24", "3")):
        g[nid] = {"class_type": "ConditioningSetProperties", "inputs": {"cond_NEW": [cond, 0], "strength": 1.0,
                                                                        "set_cond_area": "default", "hooks": ["22", 0]}}
    for node in ("5", "6"):
        g[node]["inputs"]["positive"], g[node]["inputs"]["negative"] = ["23", 0], ["24", 0]
    return g


def step_cache_calibration_graph(m, cache: str):
    """``calibration_graph`` with ComfyUI's EasyCache or LazyCache on the model, for the fit and the sampling."""
    g = calibration_graph(m, 0)
    g["20"] = {"class_type": cache, "inputs": {"model": ["1", 0], "reuse_threshold": 0.2, "start_percent": 0.15,
                                               "end_percent": 0.95, "verbose": False}}
    g["5"]["inputs"]["model"] = g["6"]["inputs"]["model"] = ["20", 0]
    return g


def interrupted_fit(e2e, base: str, graph: dict, running_for: float, timeout: float) -> dict:
    """Queue ``graph``, POST /interrupt once it has run ``running_for`` seconds, and return how it ended: whether
    its history holds execution_interrupted, and the seconds from the interrupt to the end (HTTP through the
    shared harness only)."""
    import time
    import uuid
    st, body = e2e.http("POST", f"{base}/prompt", {"prompt": graph, "client_id": str(uuid.uuid4())})
    if st != 200 or "prompt_id" not in body:
        return {"interrupted": False, "seconds_to_stop": None, "error": body}
    pid, t_interrupt, deadline = body["prompt_id"], None, time.time() + timeout
    started = None
    while time.time() < deadline:
        st, queue = e2e.http("GET", f"{base}/queue")
        running = any(item[1] == pid for item in (queue or {}).get("queue_running", []))
        if running and started is None:
            started = time.time()
        if started is not None and t_interrupt is None and time.time() - started >= running_for:
            t_interrupt = time.time()
            e2e.http("POST", f"{base}/interrupt", {})
        st, hist = e2e.http("GET", f"{base}/history/{pid}")
        if st == 200 and isinstance(hist, dict) and pid in hist and hist[pid].get("status", {}).get("completed") \
                is not None:
            kinds = [kind for kind, _ in hist[pid]["status"].get("messages", [])]
            return {"interrupted": "execution_interrupted" in kinds and t_interrupt is not None,
                    "seconds_to_stop": None if t_interrupt is None else round(time.time() - t_interrupt, 2),
                    "error": None if "execution_interrupted" in kinds else kinds}
        time.sleep(0.2)
    return {"interrupted": False, "seconds_to_stop": None, "error": f"not finished after {timeout}s"}


def _node_table() -> dict:
    """nodes.NODE_TABLE read from the source (the tool runs outside the package)."""
    import ast
    with open(os.path.join(ROOT, "nodes.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NODE_TABLE":
            return ast.literal_eval(node.value)
    raise RuntimeError("nodes.py has no NODE_TABLE")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR", "/tmp/comfy/ComfyUI"))
    ap.add_argument("--models-dir", default=os.environ.get("COMFY_MODELS", "/tmp/comfy/models"))
    ap.add_argument("--venv", default=os.environ.get("COMFY_VENV", "/tmp/comfy/venv"))
    ap.add_argument("--port", type=int, default=8193)
    a = ap.parse_args(argv)
    # a stop request (timeout, kill) still stops the server and unlinks the pack: SystemExit runs the finally
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.path.insert(0, HARNESS)
    import e2e
    import harness_env
    manifest = harness_env.load_manifest(a.models_dir)
    work = tempfile.mkdtemp(prefix="ksampler_server_check_")
    custom_nodes = os.path.join(a.comfyui_dir, "custom_nodes")
    made, server, failures = [], None, []

    def expect(what, ok, detail=""):
        print(f"{'PASS' if ok else 'FAIL'}  {what}" + (f"  ({detail})" if detail else ""), flush=True)
        if not ok:
            failures.append(what)
    try:
        e2e.link_into(custom_nodes, os.path.join(HARNESS, "harness_nodes"), e2e.HARNESS_LINK, made)
        e2e.link_into(custom_nodes, ROOT, "ksampler", made)
        server = e2e.Server(a.comfyui_dir, os.path.join(a.venv, "bin", "python"), a.port, work, a.models_dir)
        print(f"server up in {server.start(300):.0f}s (log {server.log_path})", flush=True)
        st, info = e2e.http("GET", f"{server.base}/object_info")
        adv = info.get("ksampler_KSamplerAdvanced", {})
        optional = list(adv.get("input", {}).get("optional", {}))
        order = adv.get("input_order", {}).get("optional", optional)
        expect("KSampler+ (Advanced) serves the new optional inputs last, in order",
               order[-len(NEW_INPUTS):] == NEW_INPUTS,
               str(order))
        for node, title in (("ksampler_KSamplerTwoModels", "KSampler+ (Two Models)"),
                            ("ksampler_SamplerOptions", "Sampler Options+")):
            expect(f"{node} is served from the pack as {title!r}",
                   str(info.get(node, {}).get("python_module", "")).startswith("custom_nodes.")
                   and info.get(node, {}).get("display_name") == title,
                   info.get(node, {}).get("display_name", "missing"))
        table = _node_table()
        missing = [node for node in table if node not in info]
        expect("every node of NODE_TABLE is served (the pack loaded whole)", not missing, ", ".join(missing))
        cal = info.get("ksampler_CalibratedScheduler", {}).get("input", {})
        cal_order = info.get("ksampler_CalibratedScheduler", {}).get("input_order", {}).get(
            "optional", list(cal.get("optional", {})))
        expect("Calibrated Scheduler+ serves eta, refine_noises, then fit_candidates, last",
               cal_order[-3:] == ["eta", "refine_noises", "fit_candidates"], str(cal_order))
        models = manifest["models"]
        res = e2e.run_graph(server.base, calibration_graph(models["sd3_flow"], 8), 600)
        expect("Calibrated Scheduler+ refined on 8 noises, into SamplerCustom (sd3_flow)", res["ok"],
               res.get("error", ""))
        with open(server.log_path, encoding="utf-8", errors="replace") as f:
            fit_log = [line.strip() for line in f if line.startswith("calibration: fitting ") and " by " in line]
        expect("the fit in the server gets a gradient (the weights loaded in inference mode are copied for it)",
               bool(fit_log) and all(line.split(" by ")[-1].startswith("autograd") for line in fit_log),
               fit_log[0] if fit_log else "no fit logged")
        res = e2e.run_graph(server.base, hooked_calibration_graph(models["sd15_eps"]), 600)
        with open(server.log_path, encoding="utf-8", errors="replace") as f:
            hooked_log = [line.strip() for line in f if line.startswith("calibration: ")][len(fit_log):]
        expect("Calibrated Scheduler+ with keyframed hooks on both prompts (sd15_eps): fitted by SPSA, saying why",
               res["ok"] and any("hooks on the conditioning change" in line for line in hooked_log)
               and any(" by spsa" in line for line in hooked_log), res.get("error", ""))
        for cache in ("EasyCache", "LazyCache"):
            res = e2e.run_graph(server.base, step_cache_calibration_graph(models["sd3_flow"], cache), 600)
            with open(server.log_path, encoding="utf-8", errors="replace") as f:
                said = any(line.startswith(f"calibration: {cache} on the model") for line in f)
            expect(f"Calibrated Scheduler+ on a model with {cache} (sd3_flow): fitted without it, saying so",
                   res["ok"] and said, res.get("error", ""))
        res = e2e.run_graph(server.base, calibration_graph(models["sd3_flow"], 8, 2), 600)
        expect("Calibrated Scheduler+ keeping the better of 2 refined fits, into SamplerCustom (sd3_flow)",
               res["ok"], res.get("error", ""))
        long_fit = calibration_graph(models["sd3_flow"], 0)
        long_fit["5"]["inputs"]["iterations"] = 5000
        stopped = interrupted_fit(e2e, server.base, long_fit, 5.0, 600)
        expect("a long calibration fit (5000 iterations) stops within seconds when interrupted mid-fit",
               stopped["interrupted"] and stopped["seconds_to_stop"] < 10,
               f"stopped {stopped['seconds_to_stop']}s after the interrupt, {stopped['error']}")
        res = e2e.run_graph(server.base, calibration_graph(models["sd3_flow"], 0), 600)
        expect("the next prompt after the interrupted fit (the same graph, 2 iterations) runs", res["ok"],
               res.get("error", ""))
        res = e2e.run_graph(server.base, calibration_graph(models["sd3_flow"], 2), 300)
        message = str((res.get("error") or {}).get("exception_message", ""))
        expect("Calibrated Scheduler+ with refine_noises 2: clear error naming refine_noises",
               not res["ok"] and "refine_noises" in message, message[:160])
        res = e2e.run_graph(server.base, calibration_graph(models["sd3_flow"], 0, 2), 300)
        message = str((res.get("error") or {}).get("exception_message", ""))
        expect("Calibrated Scheduler+ with fit_candidates 2 and no refinement: clear error naming both",
               not res["ok"] and "fit_candidates" in message and "refine_noises" in message, message[:160])
        saved = calibration_graph(models["sd3_flow"], 0)
        saved["5"]["inputs"]["calibration_file"] = "ksampler_check/flow.safetensors"
        res = e2e.run_graph(server.base, saved, 300)
        written = os.path.join(work, "output", "ksampler_check", "flow.safetensors")
        expect("Calibrated Scheduler+ with calibration_file 'ksampler_check/flow.safetensors': written under the "
               "server's output folder (the subfolder made)", res["ok"] and os.path.isfile(written),
               res.get("error", "") or written)
        res = e2e.run_graph(server.base, bundled_calibration_graph(), 300)
        written = os.path.join(work, "output", "ksampler_check", "bundled.safetensors")
        expect("Calibrated Scheduler+ on the bundled model (its own MODEL type), into our KSampler's calibration "
               "input, its file under the output folder", res["ok"] and os.path.isfile(written),
               res.get("error", "") or written)
        saved["5"]["inputs"]["calibration_file"] = "../outside.safetensors"
        res = e2e.run_graph(server.base, saved, 300)
        message = str((res.get("error") or {}).get("exception_message", ""))
        expect("calibration_file outside the output folder: clear error naming calibration_file, nothing written",
               not res["ok"] and message.startswith("calibration_file:") and "output folder" in message
               and not os.path.exists(os.path.join(work, "outside.safetensors")), message[:160])
        res = e2e.run_graph(server.base, advanced_graph(models["sd15_eps"], "eta=0.6, s_noise=1.01\neta=0.7",
                                                        "euler_ancestral"), 300)
        message = str((res.get("error") or {}).get("exception_message", ""))
        expect("Sampler Options+ with eta given twice: clear error naming both values",
               not res["ok"] and "eta is given twice (0.6 and 0.7)" in message, message[:160])
        for key, sampler, options in (("sd15_eps", "euler_ancestral", "eta=0.6, s_noise=1.01"),
                                      ("sd3_flow", "dpmpp_2m_sde", "eta=0.5\nsolver_type=heun")):
            res = e2e.run_graph(server.base, advanced_graph(models[key], options, sampler), 300)
            expect(f"KSampler+ (Advanced) with every control, {key} {sampler}", res["ok"], res.get("error", ""))
        res = e2e.run_graph(server.base, two_model_graph(models["sd3_flow"], models["sd3_flow"]), 300)
        expect("KSampler+ (Two Models), two flow models, switch by sigma", res["ok"], res.get("error", ""))
        res = e2e.run_graph(server.base, two_model_graph(models["sd3_flow"], models["sd15_eps"]), 300)
        message = str((res.get("error") or {}).get("exception_message", ""))
        expect("KSampler+ (Two Models), flow + eps: clear error naming model_low", not res["ok"] and
               "model_low" in message, message[:160])
        res = e2e.run_graph(server.base, advanced_graph(models["sd15_eps"], "s_churn=0.5", "dpmpp_2m"), 300)
        message = str((res.get("error") or {}).get("exception_message", ""))
        expect("an option the sampler ignores: error naming both", not res["ok"] and "'dpmpp_2m' does not take "
               "'s_churn'" in message, message[:160])
    finally:
        if server is not None:
            server.stop()
        for link in made:
            os.unlink(link)
    print(f"{'all checks passed' if not failures else f'{len(failures)} check(s) failed'}; work folder {work}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
