"""Peak memory of a calibration fit in the real ComfyUI: plain autograd against recomputing each model call in
the backward pass (what a fit short of memory falls back to), on the harness's tiny SD1.5 and a tiny Wan 2.1.

    /tmp/comfy/venv/bin/python tools/comfy_fit_memory.py [--comfyui-dir DIR] [--steps 5] [--side 4]

Each fit runs in a process of its own (the Calibrated Scheduler node under torch.inference_mode, as ComfyUI's
executor runs it), which reports its peak resident memory before and after the fit; the recomputing fit is
forced with ``gradient="recompute"``.  Prints one row per model and way, and exits 1 unless both ways give the
same sigmas and the recomputing fit's extra model calls are one per step of each backward pass (and of the
gradient probe's).  ComfyUI is imported as a library (../shared/comfyui harness); nothing of it is copied here.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = next((os.path.join(d, "shared", "comfyui") for d in (os.path.dirname(ROOT),
                                                                 os.path.dirname(os.path.dirname(ROOT)))
                if os.path.isdir(os.path.join(d, "shared", "comfyui"))), "../shared/comfyui")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit_once(way: str, model_key: str, steps: int, side: int) -> dict:
    """One fit in this process; returns its figures."""
    sys.path.insert(0, HARNESS)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness_env
    nodes = harness_env.bootstrap_comfy(harness_env.env_path("COMFYUI_DIR", None),
                                        harness_env.env_path("COMFY_MODELS"))
    import torch
    from comfy_extra_parity import load_pack, tiny_wan
    classes = load_pack()
    comfy_calibration = importlib.import_module("ksampler_pack.comfy_calibration")
    if way == "recompute":
        comfy_calibration.fit_calibration = functools.partial(comfy_calibration.fit_calibration,
                                                              gradient="recompute")
    torch.set_num_threads(1)
    if model_key == "wan21":
        model = tiny_wan()
        pos = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(1)), {}]]
        neg = [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(2)), {}]]
        latent = {"samples": torch.zeros(1, 16, 3, 2 * side, 2 * side)}
    else:
        from harness_nodes import random_conditioning
        m = harness_env.load_manifest(harness_env.env_path("COMFY_MODELS"))["models"][model_key]
        model = nodes.CheckpointLoaderSimple().load_checkpoint(m["checkpoint"])[0]
        pos = random_conditioning(101, m["cond_tokens"], m["cond_dim"], m["pooled_dim"])
        neg = random_conditioning(202, m["cond_tokens"], m["cond_dim"], m["pooled_dim"])
        latent = {"samples": torch.zeros(1, m["latent_channels"], side, side)}
    before = _peak_mib()
    with torch.inference_mode():
        t = time.time()
        sigmas, _, cal = classes["ksampler_CalibratedScheduler"]().calibrate(
            model, pos, neg, latent, steps, 5.0, fit_noises=4, iterations=6, teacher_steps=20)
        seconds = time.time() - t
    return {"way": way, "model": model_key, "latent": list(latent["samples"].shape), "seconds": round(seconds, 1),
            "peak_before_mib": round(before), "peak_after_mib": round(_peak_mib()),
            "model_calls": cal.info["model_calls"], "backward_passes": cal.info["backward_passes"],
            "recompute": bool(cal.info.get("recompute")), "sigmas": [float(s) for s in sigmas]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui-dir", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--side", type=int, default=4, help="latent side (Wan: twice this, 3 frames)")
    ap.add_argument("--one", nargs=2, metavar=("WAY", "MODEL"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    if args.comfyui_dir:
        os.environ["COMFYUI_DIR"] = args.comfyui_dir
    if args.one:
        print("RESULT " + json.dumps(fit_once(args.one[0], args.one[1], args.steps, args.side)), flush=True)
        return 0
    failures = 0
    print("| model | latent | way | fit s | model calls | backward passes | peak RSS before -> after the fit (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for model_key in ("sd15_eps", "wan21"):
        rows = {}
        for way in ("autograd", "recompute"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", way, model_key, "--steps",
                                  str(args.steps), "--side", str(args.side)], capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                print(f"{model_key} {way}: failed\n{out.stderr[-2000:]}")
                failures += 1
                continue
            r = rows[way] = json.loads(lines[-1][len("RESULT "):])
            print(f"| {model_key} | {r['latent']} | {way}{' (recomputing)' if r['recompute'] else ''} | "
                  f"{r['seconds']} | {r['model_calls']} | {r['backward_passes']} | "
                  f"{r['peak_before_mib']} -> {r['peak_after_mib']} |", flush=True)
        if len(rows) == 2:
            plain, again = rows["autograd"], rows["recompute"]
            same = (again["recompute"] and not plain["recompute"]
                    and all(abs(a - b) <= 1e-5 * max(abs(b), 1e-3) for a, b in zip(again["sigmas"], plain["sigmas"]))
                    and again["model_calls"] == plain["model_calls"] + plain["backward_passes"] + args.steps)
            print(f"{model_key}: the same sigmas, extra model calls one per step of each backward pass: {same}")
            failures += not same
    print("PASS" if not failures else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
