"""Train the bundled text-to-image model on the procedural dataset (reproducible: fixed seeds, fixed step count).

    python tools/train.py --kind eps  --out bundled/weights/tiny_eps.safetensors
    python tools/train.py --kind flow --out bundled/weights/tiny_flow.safetensors

eps: epsilon prediction on SD's discrete schedule (Ho et al. 2020), uniform
timesteps.  flow: rectified flow with velocity v = noise - x0 and mostly
logit-normal noise levels (Esser et al. 2024).  Both losses are weighted so
that they equal the plain MSE of the preconditioned UNet body (EDM-style,
see ``tinynet.TinyUNet``), which keeps every noise level well conditioned.
Both drop the caption with probability ``--cond-drop`` so that classifier-free
guidance works (Ho & Salimans 2022).  Weights (an EMA of the trained ones) are
written as float16 safetensors with the full config in the metadata; the
training record (steps, losses, wall and CPU time) goes to a JSON next to them.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # do not spin-wait on a shared machine

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def _import_package():
    """Import the package whether this file runs from a checkout (tools/ inside the package) or installed."""
    try:
        import ksampler  # noqa: F401
        return "ksampler"
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        parent, name = os.path.split(root)
        sys.path.insert(0, parent)
        __import__(name)
        return name


PKG = _import_package()
bundled = __import__(f"{PKG}.bundled.loader", fromlist=["x"])
dataset = __import__(f"{PKG}.bundled.dataset", fromlist=["x"])
tinynet = __import__(f"{PKG}.bundled.network", fromlist=["x"])
sampling = __import__(f"{PKG}.models.sampling", fromlist=["x"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("eps", "flow"), required=True)
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels", default="48,96,128")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--fine-channels", type=int, default=16, help="full-resolution path width (0: none)")
    p.add_argument("--layout-size", type=int, default=8, help="learned layout map side (0: none)")
    p.add_argument("--aux-mask", type=int, default=1, help="1: train an auxiliary mask channel")
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--aux-scale", type=float, default=2.0, help="the mask target is (2 mask - 1) times this")
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--cond-drop", type=float, default=0.12)
    p.add_argument("--two-shape-prob", type=float, default=0.05)
    p.add_argument("--shift", type=float, default=1.0, help="flow: timestep shift stored for sampling")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--time-limit", type=float, default=1140.0,
                   help="stop early (and record it) after this many seconds of training, so that a checkpoint "
                        "never takes over 20 minutes on a loaded machine")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)

    tokenizer = tinynet.Tokenizer(dataset.VOCABULARY, 16, dataset.SYNONYMS)
    net_cfg = tinynet.NetConfig(vocab_size=len(tokenizer), max_length=tokenizer.max_length, text_dim=args.text_dim,
                                text_layers=args.text_layers, patch=args.patch, prediction=args.kind,
                                fine_channels=args.fine_channels, layout_size=args.layout_size,
                                aux_mask=bool(args.aux_mask),
                                channels=tuple(int(c) for c in args.channels.split(",")))
    config = bundled.make_config(args.kind, net_cfg, tokenizer, shift=args.shift, image_size=args.image_size)
    text, unet = tinynet.TextEncoder(net_cfg), tinynet.TinyUNet(net_cfg)
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema_text, ema_unet = copy.deepcopy(text).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    ema_params = list(ema_text.parameters()) + list(ema_unet.parameters())
    fmt = config["latent_format"]
    discrete = sampling.discrete_sigmas().float()   # EPS(): SD's 1000-step scaled-linear schedule

    print(f"training {args.kind}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {args.steps} steps of "
          f"{args.batch}, {args.threads} threads", flush=True)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    losses, running, stopped_at = [], None, None
    for step in range(args.steps):
        if time.perf_counter() - t_wall > args.time_limit:
            stopped_at = step
            print(f"time limit of {args.time_limit:.0f}s reached: stopping at step {step}", flush=True)
            break
        images, captions, _, masks = dataset.make_batch(args.batch, seed=args.seed * 1_000_003 + step,
                                                        size=args.image_size, two_shape_prob=args.two_shape_prob,
                                                        with_mask=True)
        drop = torch.rand(args.batch, generator=gen) < args.cond_drop
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        x0 = ((images * 2 - 1) - fmt["shift_factor"]) * fmt["scale_factor"]   # the model's latent space
        noise = torch.randn(x0.shape, generator=gen)
        if args.kind == "eps":
            t = torch.randint(0, len(discrete), (args.batch,), generator=gen)
            sigma = discrete[t].view(-1, 1, 1, 1)
            x_in = (x0 + sigma * noise) / (sigma ** 2 + 1).sqrt()
            timestep, target = t.float(), noise
            weight = sigma.view(-1) ** 2 + 1.0          # eps error = F error / sqrt(sigma^2 + 1)
        else:
            u = torch.randn(args.batch, generator=gen).sigmoid()
            uniform = torch.rand(args.batch, generator=gen)
            sigma = torch.where(torch.rand(args.batch, generator=gen) < 0.2, uniform, u).clamp(1e-4, 1.0)
            s = sigma.view(-1, 1, 1, 1)
            x_in = (1 - s) * x0 + s * noise
            timestep, target = sigma * 1000.0, noise - x0
            weight = sigma ** 2 + (1 - sigma) ** 2      # velocity error = F error / sqrt(that)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        context = text(tokenizer(captions))
        pred, aux = unet(x_in, timestep, context, return_aux=True)
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3)).mul(weight).mean()
        if aux is not None:
            # auxiliary target: the clean objects' mask, so that shape is learned as strongly as colour
            loss = loss + args.aux_weight * ((aux - (masks * 2 - 1) * args.aux_scale) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            el = time.perf_counter() - t_wall
            losses.append([step + 1, round(running, 5)])
            print(f"step {step + 1}/{args.steps} loss {running:.4f} lr {lr_at(step, args):.2e} "
                  f"{el:.0f}s ({el / (step + 1):.3f}s/step, eta {el / (step + 1) * (args.steps - step - 1):.0f}s)",
                  flush=True)
    wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu

    record = {
        "kind": args.kind, "steps": args.steps, "batch": args.batch, "seed": args.seed, "lr": args.lr,
        "ema": args.ema, "cond_drop": args.cond_drop, "two_shape_prob": args.two_shape_prob,
        "threads": args.threads, "train_wall_seconds": round(wall, 1), "train_cpu_seconds": round(cpu, 1),
        "final_loss": round(running, 5), "loss_curve": losses, "stopped_early_at_step": stopped_at, "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    bundled.save_weights(args.out, ema_text, ema_unet, config, training={k: record[k] for k in (
        "steps", "batch", "seed", "train_wall_seconds")})
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(record, f, indent=1)
    print(f"saved {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) in {wall:.0f}s wall, {cpu:.0f}s CPU",
          flush=True)
    return record


if __name__ == "__main__":
    main()
