"""KSampler iterations per second on an SD1.5-sized UNet (random weights) against the raw forward pass.

    python bench/unet_overhead.py [--device cpu|cuda] [--size 32] [--steps 6] [--dtype float32|float16]

One KSampler step with CFG is one batched forward pass of 2 (positive + negative), so the ceiling is the raw
forward rate of a batch of 2; the gap is everything else our node does per step (guidance, sampler update, noise
scaling, callbacks).  The raw rate and ours are timed alternately, after a warm-up, median of ``--repeats``.
Goal: within 1 %.  Results go to bench/results/unet_overhead.json (one row per device, appended).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import require_ksampler  # noqa: E402
from sd15_unet import SD15SizedUNet, parameter_count  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="latent side (default 64 on CUDA = 512 px, 32 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed run (default 20 CUDA, 6 CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="float16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "unet_overhead.json"))
    args = ap.parse_args(argv)

    require_ksampler()
    from ksampler import models, pipeline

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or (64 if cuda else 32)
    steps = args.steps or (20 if cuda else 6)
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))

    torch.manual_seed(0)   # the random weights only; sampling itself is seeded through ksample's seed
    unet = SD15SizedUNet().to(device=device, dtype=dtype).eval().requires_grad_(False)
    model = models.DiffusionModel(unet, models.EPS(), models.LatentFormat(4, 8, 0.18215))
    gen = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = {"samples": torch.zeros(1, 4, size, size)}
    x2 = torch.randn(2, 4, size, size, generator=gen).to(device, dtype)
    t2 = torch.full((2,), 500.0, device=device)
    c2 = torch.cat([positive[0][0], negative[0][0]]).to(device, dtype)

    def raw() -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                unet(x2, t2, c2)
        _sync(device)
        return steps / (time.perf_counter() - t)

    def ours() -> float:
        _sync(device)
        t = time.perf_counter()
        pipeline.ksample(model, 0, steps, 5.0, args.sampler, "normal", positive, negative, latent)
        _sync(device)
        return steps / (time.perf_counter() - t)

    with torch.no_grad():   # warm-up: allocator, kernels, autotuning
        unet(x2, t2, c2)
    pipeline.ksample(model, 0, 2, 5.0, args.sampler, "normal", positive, negative, latent)
    raw_rates, our_rates = [], []
    for _ in range(args.repeats):
        raw_rates.append(raw())
        our_rates.append(ours())
    row = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({args.threads} threads)",
           "dtype": str(dtype).replace("torch.", ""), "latent": [1, 4, size, size], "cfg_batch": 2,
           "parameters": parameter_count(unet), "sampler": args.sampler, "steps": steps,
           "raw_its": statistics.median(raw_rates), "ours_its": statistics.median(our_rates),
           "raw_runs": raw_rates, "our_runs": our_rates}
    row["ratio"] = row["ours_its"] / row["raw_its"]
    print(f"{row['device']}, {row['dtype']}, latent {size}x{size}, {row['parameters'] / 1e6:.0f}M parameters, "
          f"{args.sampler}, {steps} steps x {args.repeats}: raw forward (batch 2) {row['raw_its']:.3f} it/s, "
          f"KSampler {row['ours_its']:.3f} it/s, ratio {row['ratio']:.4f} (goal >= 0.99)")
    rows = []
    if os.path.isfile(args.out):
        with open(args.out) as f:
            rows = [r for r in json.load(f).get("rows", []) if r["device"] != row["device"]]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows + [row], "torch": torch.__version__}, f, indent=1)
    return row


if __name__ == "__main__":
    main()
