"""End to end: the bundled model's txt2img, 20 steps, batch 4 — wall time and peak memory (issue 6, section 5).

    python bench/end_to_end.py [--model eps|flow] [--runs 3] [--sampler dpmpp_2m] [--scheduler karras]

Each measurement runs in a fresh subprocess, so the peak resident set (``ru_maxrss``) belongs to that run alone;
the same subprocess also reports its resident set right after importing torch and loading the model, so the
sampling's own peak is the difference.  With CUDA present, a row on the GPU is added (wall time and
``torch.cuda.max_memory_allocated``).  The SD1.5-sized UNet its/s check is ``bench/unet_overhead.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[6]))
from ksampler.bundled import load_bundled
from ksampler.pipeline import ksample
device = sys.argv[5]
model, clip, vae = load_bundled(sys.argv[1], device=device)
pos, neg = clip.encode("a large red circle on the left"), clip.encode("")
size = model.config.get("image_size", 32)
latent = {"samples": torch.zeros(4, model.latent_format.latent_channels, size, size)}
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
ksample(model, 1, 3, 5.0, sys.argv[2], sys.argv[3], pos, neg, latent)   # warm-up (allocator, kernels)
if device == "cuda":
    torch.cuda.synchronize()
t = time.perf_counter()
out = ksample(model, 1, int(sys.argv[4]), 5.0, sys.argv[2], sys.argv[3], pos, neg, latent)
images = vae.decode(out["samples"])
if device == "cuda":
    torch.cuda.synchronize()
wall = time.perf_counter() - t
res = {"wall_s": wall, "rss_loaded_mb": rss_loaded / 1024, "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if device == "cuda":
    res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
print(json.dumps(res))
"""


def run_once(kind: str, sampler: str, scheduler: str, steps: int, device: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, sampler, scheduler, str(steps), device, str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="both", choices=["eps", "flow", "both"])
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--scheduler", default="karras")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    kinds = ["eps", "flow"] if args.model == "both" else [args.model]
    rows = []
    for device in devices:
        for kind in kinds:
            runs = [run_once(kind, args.sampler, args.scheduler, args.steps, device, args.threads)
                    for _ in range(args.runs)]
            row = {"device": device, "model": kind, "sampler": args.sampler, "scheduler": args.scheduler,
                   "steps": args.steps, "batch": 4, "threads": args.threads,
                   "wall_s_median": statistics.median(r["wall_s"] for r in runs),
                   "wall_s_min": min(r["wall_s"] for r in runs),
                   "rss_loaded_mb": statistics.median(r["rss_loaded_mb"] for r in runs),
                   "rss_peak_mb": statistics.median(r["rss_peak_mb"] for r in runs)}
            if device == "cuda":
                row["cuda_peak_mb"] = statistics.median(r["cuda_peak_mb"] for r in runs)
            rows.append(row)
    print(f"{'device':<6} {'model':<5} {'sampler+scheduler':<20} {'wall s (median)':>16} {'RSS loaded MB':>14} "
          f"{'RSS peak MB':>12} {'sampling MB':>12}")
    for r in rows:
        print(f"{r['device']:<6} {r['model']:<5} {r['sampler'] + '+' + r['scheduler']:<20} {r['wall_s_median']:>16.2f} "
              f"{r['rss_loaded_mb']:>14.0f} {r['rss_peak_mb']:>12.0f} {r['rss_peak_mb'] - r['rss_loaded_mb']:>12.0f}")
    if "cuda" not in devices:
        print("no CUDA device here: the GPU rows need a GPU machine")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "end_to_end.json"), "w") as f:
        json.dump({"rows": rows, "cuda": torch.cuda.is_available(), "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
