"""The bundled flow network's prompt adherence at equal model calls, against ComfyUI (stop 43; measurement only).

    python bench/equal_calls_bundled.py [--calls 10] [--threads 1]

Issue 13's goal for the bundled networks compares at equal *steps*. On flow at 5 steps ComfyUI's best, picked on
tuning prompts over re-noising seeds, is seeds_2 + linear_quadratic (``heldout_bundled.py --over-seeds
--select-on-tuning``), which calls the model twice per step, while the calibrated sampler calls it once. This bench
asks the same question at equal model calls:

- **ComfyUI:** every sampler that runs from sigmas alone (``heldout_bundled.comfy_samplers(..., "all")``) x its 9
  schedulers, each at the largest step count whose run makes at most ``--calls`` model calls (counted on a zero
  denoiser; the count does not depend on the model). Stochastic ones over ``OVER_SEEDS`` re-noising seeds,
  deterministic ones once (their image does not depend on the seed).
- **Its pick:** the best mean adherence on the 48 tuning prompts with start and re-noising noise of their own
  (``TUNE_PROMPT_SEED``, ``TUNE_EVAL_SEED``; ties: the lower latent RMS), read on the 16 held-out prompts. Beside it,
  ComfyUI's best on the held-out prompts picked after the fact (a favour to ComfyUI).
- **Ours:** the calibrated sampler fitted with the default settings at ``--calls`` steps (one call per step) on the
  held-out run's fitting noise, run at eta 0 and at ``STOCHASTIC_ETA`` over the same re-noising seeds.

Nothing is chosen on the held-out prompts. Results: bench/results/equal_calls_bundled.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import environment, table, write_json  # noqa: E402
from heldout import Counting  # noqa: E402
import heldout_bundled as hb  # noqa: E402
import adherence  # noqa: E402

MODEL = "flow"
TUNE_PROMPTS, HELD_OUT_PROMPTS = 48, 16


def configs(comfy: hb.Comfy, calls: int) -> list[tuple[str, str, int, int]]:
    """(sampler, scheduler, steps, model calls) for every ComfyUI sampler x scheduler at the largest step count
    whose run makes at most ``calls`` model calls."""
    out = []
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for sampler in hb.comfy_samplers(comfy, "all"):
        for scheduler in comfy.schedulers:
            for steps in range(calls, 0, -1):
                model = Counting(lambda x, sigma: torch.zeros_like(x))  # the count does not depend on the model
                sigmas = comfy.sigmas(scheduler, steps, sampler)
                try:
                    comfy.run(sampler, model, x * float(sigmas[0]), sigmas, seed=0)
                except Exception:  # a sampler that cannot run this schedule at this step count: fewer steps
                    continue
                if model.calls <= calls:
                    out.append((sampler, scheduler, steps, model.calls))
                    break
    return out


def comfy_rows(setup: hb.Setup, comfy: hb.Comfy, chosen: list[tuple], seeds: list, log) -> list[dict]:
    """Each config of ``chosen`` scored over ``seeds`` (a deterministic sampler once)."""
    rows = []
    for sampler, scheduler, steps, calls in chosen:
        sigmas = comfy.sigmas(scheduler, steps, sampler)
        row = hb.seeded_row(setup, "comfyui", sampler, scheduler, lambda seed: comfy.run(
            sampler, setup.denoiser, setup.start(float(sigmas[0])), sigmas, seed=seed),
            seeds[:1] if sampler in hb.Comfy.DETERMINISTIC else seeds, log)
        rows.append({**row, "steps": steps, "model_calls": calls})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10, help="the most model calls per image (default 10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scorer", default=os.path.join(HERE, "results", "shape_scorer.safetensors"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    scorer = adherence.Scorer(adherence.train_shape_net(args.scorer))

    tuning = hb.Setup(MODEL, TUNE_PROMPTS, scorer, log, prompt_seed=hb.TUNE_PROMPT_SEED, eval_seed=hb.TUNE_EVAL_SEED)
    comfy = tuning.comfy()
    chosen = configs(comfy, args.calls)
    log(f"{len(chosen)} ComfyUI configs at most {args.calls} calls; step counts "
        f"{sorted({(s, c) for _, _, s, c in chosen})}")
    tune_seeds = [hb.TUNE_EVAL_SEED + 1000 * k for k in range(hb.OVER_SEEDS)]
    tuned = comfy_rows(tuning, comfy, chosen, tune_seeds, log)
    pick = hb._pick(tuned)
    one_call = hb._pick([r for r in tuned if r["sampler"] in hb.ONE_CALL_PER_STEP])
    log(f"picked on tuning prompts: {pick['sampler']} + {pick['scheduler']} ({pick['adherence']:.4g}); "
        f"one call per step: {one_call['sampler']} + {one_call['scheduler']} ({one_call['adherence']:.4g})")

    held_out = hb.Setup(MODEL, HELD_OUT_PROMPTS, scorer, log)
    seeds = [hb.EVAL_SEED + 1000 * k for k in range(hb.OVER_SEEDS)]
    theirs = comfy_rows(held_out, comfy, chosen, seeds, log)
    key = lambda r: (r["sampler"], r["scheduler"])  # noqa: E731
    by_key = {key(r): r for r in theirs}
    t = time.perf_counter()
    cal = hb.fit(held_out, args.calls, log)[0]
    fit_seconds = time.perf_counter() - t
    ours = [hb.seeded_row(held_out, "calibrated", "calibrated", "calibrated",
                          lambda seed: hb.sample(held_out, cal), [None], log),
            hb.seeded_row(held_out, "calibrated_stochastic", f"calibrated, eta {hb.STOCHASTIC_ETA:g}",
                          "calibrated", lambda seed: hb.sample(held_out, cal, hb.STOCHASTIC_ETA, seed), seeds, log)]
    best = hb._pick(theirs)
    tied = [r for r in tuned if r["adherence"] == pick["adherence"]]
    summary = {
        "calls": args.calls,
        "ours": {r["sampler"]: r["adherence"] for r in ours},
        "ours_latent_rms": {r["sampler"]: r["latent_rms"] for r in ours},
        "comfyui_picked_on_tuning": {**{k: pick[k] for k in ("sampler", "scheduler", "steps", "model_calls")},
                                     "tuning_adherence": pick["adherence"],
                                     "held_out_adherence": by_key[key(pick)]["adherence"],
                                     "tied_at_top": len(tied),
                                     "tied_mean_held_out_adherence": sum(by_key[key(r)]["adherence"]
                                                                         for r in tied) / len(tied)},
        "comfyui_one_call_picked_on_tuning": {**{k: one_call[k] for k in ("sampler", "scheduler", "steps")},
                                              "tuning_adherence": one_call["adherence"],
                                              "held_out_adherence": by_key[key(one_call)]["adherence"]},
        "comfyui_best_after_the_fact": {k: best[k] for k in ("sampler", "scheduler", "steps", "model_calls",
                                                             "adherence")},
        "comfyui_median_held_out": sorted(r["adherence"] for r in theirs)[len(theirs) // 2],
        "comfyui_above_ours": sum(r["adherence"] > ours[1]["adherence"] for r in theirs),
        "fit_model_calls": cal.info["model_calls"], "fit_backward_passes": cal.info["backward_passes"],
        "fit_seconds": round(fit_seconds, 1),
    }
    print(table(["side", "sampler + scheduler", "steps", "model calls", "held-out adherence (mean over seeds)"],
                [["ours", r["sampler"], args.calls, args.calls, r["adherence"]] for r in ours]
                + [[label, f"{r['sampler']} + {r['scheduler']}", r["steps"], r["model_calls"],
                    by_key[key(r)]["adherence"]]
                   for label, r in (("ComfyUI, picked on tuning", pick), ("ComfyUI one-call, picked on tuning",
                                                                          one_call), ("ComfyUI best after the fact",
                                                                                      best))],
                f"{MODEL}, cfg {hb.CFG:g}, at most {args.calls} model calls; {HELD_OUT_PROMPTS} held-out prompts x "
                f"{hb.OVER_SEEDS} re-noising seeds; ComfyUI's pick on {TUNE_PROMPTS} tuning prompts"))
    write_json(f"equal_calls_bundled_{args.calls}.json", {
        "environment": environment(), "model": MODEL, "cfg": hb.CFG, "fit": hb.DEFAULT_FIT, "summary": summary,
        "tuning": {"prompts": TUNE_PROMPTS, "prompt_seed": hb.TUNE_PROMPT_SEED, "seeds": tune_seeds, "rows": tuned},
        "held_out": {"prompts": HELD_OUT_PROMPTS, "prompt_seed": hb.PROMPT_SEED, "seeds": seeds,
                     "reference_adherence": held_out.reference_scores["adherence"], "rows": ours + theirs},
        "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
