"""The model-output guard's cost per step against a model call.

    python bench/guard.py [--device cpu|cuda] [--repeats N] [--threads N]

Every denoised estimate goes through ``guard.StepGuard.check`` (a shape check and one float64 reduction for
NaN/Inf); inside ComfyUI each network call also passes ``comfy_checks.HostOutputGuard``'s forward hook and model
function wrapper (shape checks).  Timed here, median of ``--repeats``, on latents of SD1.5 at 512 px
[1, 4, 64, 64], SDXL at 1024 px [1, 4, 128, 128] and Wan at 480p, 81 frames [1, 16, 21, 60, 104], against a
model call: the bundled tiny network (the cheapest model there is) and an SD1.5-sized UNet at 256 px (batch 2,
as with CFG).  Results: bench/results/guard.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import environment, require_ksampler, table, write_json  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, inner: int) -> float:
    """Median seconds per call of ``fn`` (``inner`` calls per timing)."""
    fn()
    runs = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        runs.append((time.perf_counter() - t) / inner)
    return statistics.median(runs)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-unet", action="store_true", help="leave out the SD1.5-sized UNet (slow on a CPU)")
    args = ap.parse_args(argv)
    require_ksampler()
    from ksampler.comfy_checks import HostOutputGuard
    from ksampler.guard import StepGuard
    from ksampler.bundled.loader import load_bundled

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    guard = StepGuard(20, "euler", "the model")
    host = HostOutputGuard(None, 4, "bench")
    net = torch.nn.Identity()
    sigma = torch.tensor(1.0)
    for label, shape in (("SD1.5 512 px", (1, 4, 64, 64)), ("SDXL 1024 px", (1, 4, 128, 128)),
                         ("Wan 480p 81 frames", (1, 16, 21, 60, 104))):
        x = torch.randn(shape, generator=gen).to(device)
        out = x * 0.5
        host.channels = shape[1]
        step = timed(lambda: guard.check(out, x, sigma), device, args.repeats, 200)
        hook = timed(lambda: host._check_network(net, (x,), out), device, args.repeats, 200)
        rows.append({"latent": label, "shape": list(shape), "step_check_s": step, "host_hook_s": hook})

    model, clip, _ = load_bundled("flow", device=device)
    context = clip.encode_context(["a red circle", ""]).to(device)
    xb = torch.randn(2, 3, 32, 32, generator=gen).to(device)
    tb = torch.full((2,), 0.5, device=device)
    with torch.no_grad():
        tiny = timed(lambda: model.apply_model(xb, tb, context=context), device, args.repeats, 5)
    calls = {"bundled tiny network, 2x3x32x32": tiny}
    if not args.skip_unet:
        from sd15_unet import SD15SizedUNet
        torch.manual_seed(0)
        unet = SD15SizedUNet().to(device).eval().requires_grad_(False)
        x2 = torch.randn(2, 4, 32, 32, generator=gen).to(device)
        c2 = torch.randn(2, 77, 768, generator=gen).to(device)
        t2 = torch.full((2,), 500.0, device=device)
        with torch.no_grad():
            calls["SD1.5-sized UNet, 2x4x32x32"] = timed(lambda: unet(x2, t2, c2), device, max(1, args.repeats // 2), 1)

    print(table(["latent", "guard per step (ms)", "host hook per call (ms)"],
                [[r["latent"], r["step_check_s"] * 1e3, r["host_hook_s"] * 1e3] for r in rows],
                title=f"guard cost ({args.device}, {args.threads} thread(s))"))
    sd15 = rows[0]["step_check_s"] + 2 * rows[0]["host_hook_s"]
    print(table(["model call", "ms", "SD1.5-latent guard / call"],
                [[name, s * 1e3, f"{sd15 / s:.2%}"] for name, s in calls.items()], title="against a model call"))
    payload = {"rows": rows, "model_calls_s": calls, "device": args.device, "environment": environment()}
    print(f"-> {write_json('guard.json', payload)}")
    return payload


if __name__ == "__main__":
    main()
