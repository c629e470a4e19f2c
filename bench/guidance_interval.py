"""Guidance in a limited interval (Kynkäänniemi et al. 2024) against full guidance, tuned and reported on separate splits.

    python bench/guidance_interval.py            # tuning grid, then the held-out report
    python bench/guidance_interval.py --quick    # fewer prompts / samples (a smoke run)

Two measurements, each with a TUNING split (used only to pick the interval) and a HELD-OUT split (the only
figures reported):

* the bundled models (bench/adherence.py's scorer): colour / shape / position adherence and ms per image at
  cfg 5 and 8, dpmpp_2m + karras, 20 steps; tuning and held-out splits differ in prompts and noise seeds.
  The chosen interval maximises the mean adherence over cfg 5 and 8 on the tuning prompts (ties: fewer guided
  steps).
* a Gaussian mixture with exact class-conditional denoisers (bench/gmm.py), eps model sampling (SD's
  schedule, as the bundled eps model): NLL gap and MMD^2 of the samples against the true conditional
  distribution p(x | c), and class accuracy (argmax_c p(c | x) = c).  Tuning and held-out splits are different
  mixtures (seeds) and different noise.  The chosen interval has the lowest MMD^2 among those whose class
  accuracy is within 1 point of full guidance's on the tuning mixtures (guidance exists to raise it; with exact
  denoisers cfg 1 would trivially be closest to p(x | c)).  The NLL gap is signed: below 0 the samples sit
  closer to the modes than exact samples do (over-concentration), above 0 farther.

Results go to bench/results/guidance_interval.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import adherence as A  # noqa: E402
from accuracy import mmd2  # noqa: E402
from gmm import GaussianMixture  # noqa: E402

PKG = A.PKG
conditioning = __import__(f"{PKG}.conditioning", fromlist=["x"])
schedulers = __import__(f"{PKG}.schedulers", fromlist=["x"])
samplers = __import__(f"{PKG}.samplers", fromlist=["x"])
models = __import__(f"{PKG}.models", fromlist=["x"])
GuidanceSchedule = conditioning.GuidanceSchedule
UNBOUNDED = conditioning.schedule.SIGMA_UNBOUNDED

CFGS = (5.0, 8.0)
SAMPLER, SCHEDULER, STEPS = "dpmpp_2m", "karras", 20

# ---- the splits: never mixed -------------------------------------------------------------------------------------
TUNING = {"prompt_seed": 101, "noise_seed": 11, "gmm_seeds": (10, 11), "gmm_noise_seed": 5}
HELD_OUT = {"prompt_seed": 202, "noise_seed": 22, "gmm_seeds": (20, 21), "gmm_noise_seed": 6}

# candidate intervals (sigma_low, sigma_high) per sigma scale; UNBOUNDED = no upper limit
CANDIDATES = {
    "flow": [(lo, hi) for lo in (0.0, 0.15, 0.3) for hi in (0.6, 0.85, UNBOUNDED)],
    "eps": [(lo, hi) for lo in (0.0, 0.3, 1.0) for hi in (3.0, 7.0, UNBOUNDED)],
}
GMM_CANDIDATES = [(lo, hi) for lo in (0.0, 0.2, 0.5, 1.0, 2.0) for hi in (2.0, 4.0, 7.0, UNBOUNDED) if lo < hi]


def _label(interval) -> str:
    lo, hi = interval
    return f"[{lo:g}, {'inf' if hi >= UNBOUNDED else f'{hi:g}'}]"


def guided_steps(sigmas, interval) -> int:
    lo, hi = interval
    return sum(lo <= float(s) <= hi for s in sigmas[:-1])


# ---- the bundled models ------------------------------------------------------------------------------------------
def run_bundled(model, clip, vae, scorer, prompts, cfg, seed, interval, repeats=1) -> dict:
    texts, targets = [t for t, _ in prompts], [a for _, a in prompts]
    ctx = clip.encode_context(texts)
    size = model.config["image_size"]
    schedule = None if interval is None else GuidanceSchedule(*interval)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = A.pipeline.ksample(model, seed, STEPS, cfg, SAMPLER, SCHEDULER, [[ctx, {}]], clip.encode(""),
                                 {"samples": torch.zeros(len(texts), 3, size, size)}, guidance_schedule=schedule)
        best = min(best, time.perf_counter() - t0)
    images = vae.decode(out["samples"]).permute(0, 3, 1, 2)
    s = scorer.score(images, targets)
    mean = (s["colour"] + s["shape"] + s["position"]) / 3
    return {"colour": round(s["colour"], 4), "shape": round(s["shape"], 4), "position": round(s["position"], 4),
            "mean": round(mean, 4), "ms_per_image": round(1000 * best / len(texts), 1)}


def bundled(kinds, n_tune, n_held, log) -> dict:
    scorer = A.Scorer(A.train_shape_net(os.path.join(HERE, "results", "shape_scorer.safetensors")))
    tune_prompts = A.bench_prompts(n_tune, seed=TUNING["prompt_seed"])
    held_prompts = A.bench_prompts(n_held, seed=HELD_OUT["prompt_seed"])
    out = {}
    for kind in kinds:
        model, clip, vae = A.bundled.load_bundled(kind)
        scale = "flow" if kind == "flow" else "eps"
        sigmas = schedulers.ksampler_sigmas(model.model_sampling, SCHEDULER, STEPS)
        tuning = []
        for interval in CANDIDATES[scale]:
            rows = {cfg: run_bundled(model, clip, vae, scorer, tune_prompts, cfg, TUNING["noise_seed"], interval)
                    for cfg in CFGS}
            score = sum(r["mean"] for r in rows.values()) / len(rows)
            tuning.append({"interval": interval, "score": round(score, 4), "guided_steps": guided_steps(sigmas, interval)})
            log(f"tune {kind} {_label(interval):14s} mean adherence {score:.3f} ({tuning[-1]['guided_steps']} "
                f"guided steps)")
        chosen = max(tuning, key=lambda r: (r["score"], -r["guided_steps"]))
        log(f"{kind}: chosen interval {_label(chosen['interval'])} (tuning mean {chosen['score']:.3f})")
        held = {}
        for cfg in CFGS:
            full = run_bundled(model, clip, vae, scorer, held_prompts, cfg, HELD_OUT["noise_seed"], None)
            limited = run_bundled(model, clip, vae, scorer, held_prompts, cfg, HELD_OUT["noise_seed"],
                                  chosen["interval"])
            held[str(cfg)] = {"full": full, "interval": limited}
            log(f"held-out {kind} cfg {cfg:g}: full {full}  interval {limited}")
        out[kind] = {"tuning": tuning, "chosen": chosen["interval"], "guided_steps": chosen["guided_steps"],
                     "steps": STEPS, "held_out": held}
    return out


# ---- the Gaussian mixture ----------------------------------------------------------------------------------------
class ScheduledMixtureDenoiser:
    """CFG on a Gaussian mixture's exact denoisers with the scale from a guidance schedule; counts uncond passes."""

    def __init__(self, gmm, labels, cfg_of, model_sampling):
        self.gmm, self.labels, self.cfg_of, self.model_sampling = gmm, labels, cfg_of, model_sampling
        self.uncond_labels = torch.full_like(labels, gmm.n_classes)
        self.uncond_passes = 0

    def __call__(self, x, sigma, **kw):
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        cfg = self.cfg_of(s)
        sig = torch.as_tensor(sigma, dtype=x.dtype)
        cond = self.gmm.denoise(x, sig, self.labels)
        if math.isclose(cfg, 1.0):
            return cond
        self.uncond_passes += 1
        uncond = self.gmm.denoise(x, sig, self.uncond_labels)
        return uncond + cfg * (cond - uncond)


def gmm_problem(seed: int) -> GaussianMixture:
    return GaussianMixture(dim=64, components=8, n_classes=4, seed=seed, mean_scale=0.6, std_range=(0.4, 0.8),
                           dtype=torch.float32)


def gmm_run(gmm, cfg, interval, n, noise_seed) -> dict:
    ms = models.EPS()
    gen = torch.Generator().manual_seed(noise_seed)
    labels = torch.randint(0, gmm.n_classes, (n,), generator=gen)
    exact = gmm.sample(n, labels, gen).double()
    many = labels.repeat(8)
    nll_exact = float(-gmm.log_prob(gmm.sample(len(many), many, gen).float(), many).double().mean())
    noise = torch.randn(n, gmm.dim, generator=gen)
    sigmas = schedulers.ksampler_sigmas(ms, SCHEDULER, STEPS)
    lo, hi = interval if interval is not None else (0.0, UNBOUNDED)
    cfg_of = GuidanceSchedule(lo, hi).bind(sigmas.tolist(), cfg)
    model = ScheduledMixtureDenoiser(gmm, labels, cfg_of, ms)
    x = noise * float(torch.sqrt(1.0 + sigmas[0] ** 2))
    out = samplers.get_sampler(SAMPLER)(model, x, sigmas, disable=True).double()
    bandwidth = float(torch.cdist(exact[:512], exact[:512]).median())
    log_post = torch.stack([gmm.log_prob(out.float(), torch.full_like(labels, c)) for c in range(gmm.n_classes)], 1)
    return {"nll_gap": float(-gmm.log_prob(out.float(), labels).double().mean()) - nll_exact,
            "mmd2": mmd2(out, exact, bandwidth), "class_accuracy": float((log_post.argmax(1) == labels).double().mean()),
            "uncond_passes": model.uncond_passes}


def gmm_mean(seeds, cfg, interval, n, noise_seed) -> dict:
    rows = [gmm_run(gmm_problem(s), cfg, interval, n, noise_seed) for s in seeds]
    return {k: round(sum(r[k] for r in rows) / len(rows), 5) for k in rows[0]}


def mixture(n, log) -> dict:
    out = {}
    for cfg in CFGS:
        tuning = []
        full = gmm_mean(TUNING["gmm_seeds"], cfg, None, n, TUNING["gmm_noise_seed"])
        for interval in GMM_CANDIDATES:
            r = gmm_mean(TUNING["gmm_seeds"], cfg, interval, n, TUNING["gmm_noise_seed"])
            tuning.append({"interval": interval, **r})
            log(f"tune gmm cfg {cfg:g} {_label(interval):14s} {r}")
        ok = [r for r in tuning if r["class_accuracy"] >= full["class_accuracy"] - 0.01]
        chosen = min(ok, key=lambda r: r["mmd2"])["interval"]
        held_full = gmm_mean(HELD_OUT["gmm_seeds"], cfg, None, n, HELD_OUT["gmm_noise_seed"])
        held_int = gmm_mean(HELD_OUT["gmm_seeds"], cfg, chosen, n, HELD_OUT["gmm_noise_seed"])
        held_none = gmm_mean(HELD_OUT["gmm_seeds"], 1.0, None, n, HELD_OUT["gmm_noise_seed"])
        log(f"gmm cfg {cfg:g}: chosen {_label(chosen)}; held-out full {held_full}  interval {held_int}  "
            f"(cfg 1: {held_none})")
        out[str(cfg)] = {"tuning_full": full, "tuning": tuning, "chosen": chosen,
                         "held_out": {"full": held_full, "interval": held_int, "cfg_1": held_none}}
    return out


def markdown(report: dict) -> str:
    lines = ["| model | cfg | guidance | colour | shape | position | mean | ms/image |", "|---|---|---|---|---|---|---|---|"]
    for kind, r in report["bundled"].items():
        for cfg, cell in r["held_out"].items():
            for name in ("full", "interval"):
                c = cell[name]
                what = "full" if name == "full" else f"sigma in {_label(r['chosen'])} ({r['guided_steps']}/{r['steps']} steps)"
                lines.append(f"| {kind} | {float(cfg):g} | {what} | {c['colour']:.0%} | {c['shape']:.0%} | "
                             f"{c['position']:.0%} | {c['mean']:.1%} | {c['ms_per_image']:.0f} |")
    lines += ["", "| GMM cfg | guidance | NLL gap | MMD^2 | class accuracy | uncond passes |", "|---|---|---|---|---|---|"]
    for cfg, r in report["gmm"].items():
        for name in ("full", "interval", "cfg_1"):
            c = r["held_out"][name]
            what = {"full": "full", "interval": f"sigma in {_label(r['chosen'])}", "cfg_1": "none (cfg 1)"}[name]
            lines.append(f"| {float(cfg):g} | {what} | {c['nll_gap']:+.3f} | {c['mmd2']:.2e} | "
                         f"{c['class_accuracy']:.1%} | {c['uncond_passes']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="eps,flow")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-gmm", action="store_true")
    p.add_argument("--skip-bundled", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_path = args.out or os.path.join(HERE, "results",
                                        "guidance_interval_quick.json" if args.quick else "guidance_interval.json")

    def log(msg):
        print(msg, flush=True)
    report = {"quick": args.quick, "splits": {"tuning": TUNING, "held_out": HELD_OUT}, "sampler": SAMPLER,
              "scheduler": SCHEDULER, "steps": STEPS, "torch_threads": args.threads,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not args.skip_bundled:
        report["bundled"] = bundled(args.models.split(","), 16 if args.quick else 32, 24 if args.quick else 64, log)
    if not args.skip_gmm:
        report["gmm"] = mixture(256 if args.quick else 1024, log)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    if "bundled" in report and "gmm" in report:
        print(markdown(report))
    return report


if __name__ == "__main__":
    main()
