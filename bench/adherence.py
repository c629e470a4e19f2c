"""Prompt adherence of the bundled model per sampler, steps and cfg, scored automatically.

    python bench/adherence.py            # full grid: both checkpoints, 4 samplers, 10/20 steps, cfg 1/3/5/8
    python bench/adherence.py --quick    # a smaller grid, for a quick check

Scorer: colour and position come from image analysis (background = median of
the border pixels, foreground = pixels far from it, colour = nearest palette
entry to the foreground's median, position = nearest named spot to its
centroid); shape comes from a small CNN trained on the procedural renderer's
ground truth.  The scorer's own accuracy on held-out renderer images is
reported first.  Results go to bench/results/adherence.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import require_ksampler  # noqa: E402

require_ksampler()
import ksampler.bundled.dataset as D  # noqa: E402
import ksampler.bundled.loader as bundled  # noqa: E402
from ksampler import pipeline  # noqa: E402

SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m")
STEPS = (10, 20)
CFGS = (1.0, 3.0, 5.0, 8.0)
PALETTE = torch.tensor(list(D.COLOURS.values()))
COLOUR_NAMES = list(D.COLOURS)
SPOTS = torch.tensor(list(D.POSITIONS.values()))
SPOT_NAMES = list(D.POSITIONS)


# ---- the scorer ------------------------------------------------------------------------------
def foreground(images: torch.Tensor, threshold: float = 0.2) -> tuple:
    """(mask [B, H, W], background colour [B, 3]) of images [B, 3, H, W] in 0..1."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    bg = border.median(dim=2).values
    diff = (images - bg[:, :, None, None]).abs().amax(dim=1)
    return diff > threshold, bg


def analyse(images: torch.Tensor) -> list:
    """Per image: {"colour", "position"} from image analysis (None when no foreground is found)."""
    mask, _ = foreground(images)
    size = images.shape[-1]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    out = []
    for img, m in zip(images, mask):
        if int(m.sum()) < 3:
            out.append({"colour": None, "position": None})
            continue
        pixels = img[:, m]                                   # [3, N]
        colour = pixels.median(dim=1).values
        ci = int(((PALETTE - colour) ** 2).sum(dim=1).argmin())
        ys, xs = m.nonzero(as_tuple=True)
        centre = torch.stack([coords[xs].mean(), coords[ys].mean()])
        pi = int(((SPOTS - centre) ** 2).sum(dim=1).argmin())
        out.append({"colour": COLOUR_NAMES[ci], "position": SPOT_NAMES[pi]})
    return out


class ShapeNet(nn.Module):
    """A small CNN: image [B, 3, 32, 32] -> shape logits (circle, square, triangle, cross)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(64, len(D.SHAPES)))

    def forward(self, x):
        return self.body(x * 2 - 1)


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild noise and blur, so the classifier tolerates the small artefacts of generated images."""
    b = images.shape[0]
    noise = torch.randn(images.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.06
    blur = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    w = (torch.rand(b, 1, 1, 1, generator=gen) < 0.3).float() * 0.5
    return (images * (1 - w) + blur * w + noise).clamp(0, 1)


def train_shape_net(path: str, steps: int = 800, seed: int = 0) -> ShapeNet:
    """Train (or load from ``path``) the shape classifier on renderer images with ground truth."""
    from safetensors.torch import load_file, save_file
    net = ShapeNet()
    if os.path.isfile(path):
        net.load_state_dict(load_file(path))
        return net.eval()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    t0 = time.time()
    for step in range(steps):
        images, _, scenes = D.make_batch(64, seed=10_000_000 + step)
        labels = torch.tensor([D.SHAPES.index(s.objects[0].shape) for s in scenes])
        loss = nn.functional.cross_entropy(net(_augment(images, gen)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"trained the shape scorer in {time.time() - t0:.0f}s (final loss {loss.item():.3f})", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return net.eval()


class Scorer:
    """Scores images against the attributes their prompts name."""

    def __init__(self, shape_net: ShapeNet):
        self.shape_net = shape_net

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list:
        found = analyse(images)
        shapes = self.shape_net(images).argmax(dim=1).tolist()
        for f, s in zip(found, shapes):
            f["shape"] = D.SHAPES[s]
        return found

    def score(self, images: torch.Tensor, targets: list) -> dict:
        """Fractions of images whose colour / shape / position match their target attributes."""
        pred = self.predict(images)
        out = {}
        for key in ("colour", "shape", "position"):
            pairs = [(p[key], t[key]) for p, t in zip(pred, targets) if t.get(key)]
            out[key] = sum(a == b for a, b in pairs) / max(1, len(pairs))
        out["both"] = sum(p["colour"] == t["colour"] and p["shape"] == t["shape"]
                          for p, t in zip(pred, targets)) / len(targets)
        return out


def scorer_accuracy(scorer: Scorer, n: int = 1000, seed: int = 987654) -> dict:
    """The scorer's accuracy on held-out renderer images (single objects, plain and textured backgrounds)."""
    images, _, scenes = D.make_batch(n, seed=seed)
    targets = [{"colour": s.objects[0].colour, "shape": s.objects[0].shape, "position": s.objects[0].position}
               for s in scenes]
    return scorer.score(images, targets)


# ---- the benchmark ---------------------------------------------------------------------------
def bench_prompts(n: int, seed: int = 0) -> list:
    """``n`` prompts naming size, colour, shape and position; colours x shapes are balanced."""
    import random
    rng = random.Random(seed)
    combos = [(c, s) for c in D.COLOURS for s in D.SHAPES]
    rng.shuffle(combos)
    prompts = []
    for i in range(n):
        colour, shape = combos[i % len(combos)]
        size, position = rng.choice(list(D.SIZES)), rng.choice(list(D.POSITIONS))
        where = "in the" if position == "center" else ("at the" if position in ("top", "bottom") else "on the")
        article = "an" if size[0] in "aeiou" else "a"
        prompts.append((f"{article} {size} {colour} {shape} {where} {position}",
                        {"colour": colour, "shape": shape, "size": size, "position": position}))
    return prompts


def generate(model, clip, vae, prompts: list, sampler: str, scheduler: str, steps: int, cfg: float, seed: int,
             latent=None, denoise: float = 1.0) -> tuple:
    """(images [B, 3, H, W] in 0..1, seconds) for a batch of prompts in one sampling pass."""
    ctx = clip.encode_context(prompts)
    size = model.config["image_size"]
    samples = latent if latent is not None else torch.zeros(len(prompts), 3, size, size)
    t0 = time.perf_counter()
    out = pipeline.ksample(model, seed, steps, cfg, sampler, scheduler, [[ctx, {}]], clip.encode(""),
                           {"samples": samples}, denoise)
    seconds = time.perf_counter() - t0
    return vae.decode(out["samples"]).permute(0, 3, 1, 2), seconds


def img2img_check(model, clip, vae, scorer, n: int, scheduler: str) -> dict:
    """Mean pixel error to the input at several denoise values, and which colour wins under a conflicting prompt."""
    images, _, scenes = D.make_batch(n, seed=4242)
    latent = vae.encode(images.permute(0, 2, 3, 1))
    own = [D.caption(s) .replace(f" on a {s.background} background", "") for s in scenes]
    names = list(D.COLOURS)
    other = [names[(names.index(s.objects[0].colour) + 3) % len(names)] for s in scenes]
    conflicting = [p.replace(s.objects[0].colour, o, 1) for p, s, o in zip(own, scenes, other)]
    shuffled = images.roll(1, dims=0)
    result = {"n": n, "unrelated_image_error": round(float((images - shuffled).abs().mean()), 4), "denoise": {}}
    for denoise in (0.3, 0.6, 1.0):
        out, _ = generate(model, clip, vae, own, "dpmpp_2m", scheduler, 20, 5.0, 1, latent, denoise)
        err = float((out - images).abs().mean())
        out2, _ = generate(model, clip, vae, conflicting, "dpmpp_2m", scheduler, 20, 5.0, 1, latent, denoise)
        pred = scorer.predict(out2)
        keeps = sum(p["colour"] == s.objects[0].colour for p, s in zip(pred, scenes)) / n
        follows = sum(p["colour"] == o for p, o in zip(pred, other)) / n
        result["denoise"][str(denoise)] = {"mean_abs_pixel_error": round(err, 4),
                                           "conflicting_prompt_keeps_input_colour": round(keeps, 3),
                                           "conflicting_prompt_follows_prompt_colour": round(follows, 3)}
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer prompts and configurations")
    p.add_argument("--models", default="eps,flow")
    p.add_argument("--prompts", type=int, default=None, help="prompts per configuration (default 64, quick 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default results/adherence.json (--quick: adherence_quick.json)")
    p.add_argument("--scorer", default=os.path.join(HERE, "results", "shape_scorer.safetensors"))
    p.add_argument("--weights-dir", default=None, help="read tiny_<kind>.safetensors from here instead")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(HERE, "results", "adherence_quick.json" if args.quick else "adherence.json")
    torch.set_num_threads(args.threads)
    n = args.prompts or (32 if args.quick else 64)
    samplers = ("euler", "dpmpp_2m") if args.quick else SAMPLERS
    steps_list = (20,) if args.quick else STEPS
    cfgs = (1.0, 5.0) if args.quick else CFGS

    scorer = Scorer(train_shape_net(args.scorer))
    acc = scorer_accuracy(scorer)
    print(f"scorer accuracy on renderer images: colour {acc['colour']:.1%}, shape {acc['shape']:.1%}, "
          f"position {acc['position']:.1%}", flush=True)
    prompts = bench_prompts(n)
    texts, targets = [t for t, _ in prompts], [a for _, a in prompts]
    report = {"quick": args.quick, "prompts_per_config": n, "scorer_accuracy": acc, "rows": [], "img2img": {},
              "torch_threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for kind in args.models.split(","):
        path = os.path.join(args.weights_dir, f"tiny_{kind}.safetensors") if args.weights_dir else None
        model, clip, vae = bundled.load_bundled(kind, path=path)
        for sampler in samplers:
            for steps in steps_list:
                for cfg in cfgs:
                    images, seconds = generate(model, clip, vae, texts, sampler, "karras", steps, cfg, seed=1)
                    s = scorer.score(images, targets)
                    row = {"model": kind, "sampler": sampler, "scheduler": "karras", "steps": steps, "cfg": cfg,
                           "colour": round(s["colour"], 3), "shape": round(s["shape"], 3),
                           "position": round(s["position"], 3), "both": round(s["both"], 3),
                           "ms_per_image": round(1000 * seconds / n, 1)}
                    report["rows"].append(row)
                    print(f"{kind:4s} {sampler:16s} {steps:3d} steps cfg {cfg:3.0f}: colour {s['colour']:6.1%} "
                          f"shape {s['shape']:6.1%} position {s['position']:6.1%} "
                          f"{row['ms_per_image']:6.1f} ms/image", flush=True)
        report["img2img"][kind] = img2img_check(model, clip, vae, scorer, 32 if args.quick else 64, "karras")
        print(f"{kind} img2img: {json.dumps(report['img2img'][kind]['denoise'])}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    """The results as a Markdown table: colour / shape adherence per cfg, and time per image."""
    cfgs = sorted({r["cfg"] for r in report["rows"]})
    head = "| model | sampler | steps | " + " | ".join(f"cfg {c:g}" for c in cfgs) + " | ms/image (cfg>1) |"
    lines = [head, "|" + "---|" * (4 + len(cfgs))]
    keys = []
    for r in report["rows"]:
        k = (r["model"], r["sampler"], r["steps"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rows = {r["cfg"]: r for r in report["rows"] if (r["model"], r["sampler"], r["steps"]) == k}
        cells = [f"{rows[c]['colour']:.0%} / {rows[c]['shape']:.0%}" if c in rows else "" for c in cfgs]
        ms = max(r["ms_per_image"] for r in rows.values())
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + f" | {ms:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
