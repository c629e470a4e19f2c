"""How few mode flips can a 5- or 10-call sampler make?  A diagnostic on the TUNING split, never a reported result.

    python bench/flip_floor.py            # the two sharp tuning families, no guidance and cfg 3, NFE 5 and 10
    python bench/flip_floor.py --quick    # tune-narrow12 without guidance only

On the sharp held-out mixtures the goal (at most half the RMS error of ComfyUI's best) is missed at NFE 10 through
the few noises that a sampler sends to another mode than the exact flow does (flips, as in ``flips.py``).  Every
try to make the calibrated sampler flip less (``bench/README.md``, "Mode flips on sharp mixtures") moved the flips
by a fifth at most.  This bench asks what the goal would need of the flips alone, and what any of the registry's
samplers and schedules achieves.

For each case, on 16,384 evaluation noises (``separatrix.py``'s large stream, so the default fits that
``separatrix.py --large-eval`` measured there can be read beside), every deterministic registry sampler x every
registry scheduler at the budget (``heldout.run_grid``'s set: it holds ComfyUI's deterministic samplers and
schedulers, so its best is at least as good as ComfyUI's best) is run and scored per noise:

- "flip-only RMS": the RMS over all noises that the flipped ones alone carry, sqrt(sum of their squared errors / N).
  A sampler with this run's flips and no other error would score it.
- the goal: half the best run's RMS.  A run whose flip-only RMS is above the goal cannot meet it, however precise
  its other noises are made.

Nothing here is fitted or chosen; the figures say where the calibrated sampler's family (schedule and multistep
weights) stands against the goal's demand on the tuning split.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment, require_ksampler, table, write_json  # noqa: E402
import heldout  # noqa: E402
import separatrix  # noqa: E402  (its large evaluation stream, and the default's figures measured on it)

require_ksampler()
from ksampler.schedulers import SCHEDULERS  # noqa: E402

FAMILIES = ("tune-narrow12", "tune-sharp32")
CFGS = (None, 3.0)
BUDGETS = (5, 10)
N_EVAL = 16_384


def flip_split(per_item: torch.Tensor, family: heldout.Family) -> dict:
    """The RMS, the flips, the RMS the flipped noises alone carry over all noises, and the rest's RMS."""
    flipped = per_item > heldout.FLIP_SHARE * family.mean_scale * math.sqrt(2)
    n = len(per_item)
    return {"rms": heldout.rms_of(per_item), "flips": int(flipped.sum()),
            "flip_only_rms": float(per_item[flipped].pow(2).sum().div(n).sqrt()),
            "rest": heldout.rms_of(per_item[~flipped])}


def registry_runs(prob: heldout.Problem, budget: int) -> list[dict]:
    """Every deterministic registry sampler x scheduler with the most steps whose calls fit ``budget``."""
    rows = []
    for name in heldout.OURS_DET + list(heldout.OURS_EXTRA):
        run_fn, sigmas_of = heldout.ours_runner(name)
        cache = {}
        for scheduler in SCHEDULERS:
            cache = {k: v for k, v in cache.items() if k == "linear"}
            found = heldout._largest_fitting(prob, run_fn, lambda st: sigmas_of(scheduler, st), budget, cache)
            if found is None:
                continue
            steps, sigmas = found
            try:
                out = run_fn(prob.model, prob.noise * float(sigmas[0]), sigmas)
            except Exception:  # a sampler that cannot run this schedule (as in heldout.run_grid)
                continue
            if not bool(torch.isfinite(out).all()):
                continue
            per_item = heldout.item_errors(out, prob.reference(float(sigmas[0])))
            rows.append({"sampler": name, "scheduler": scheduler, "steps": steps, **flip_split(per_item, prob.family)})
    return rows


def stored_default(problem: str, nfe: int) -> dict | None:
    """The default fits' figures on the same 16,384 noises, from ``separatrix.py --large-eval`` (where it ran)."""
    path = os.path.join(RESULTS, separatrix.RESULTS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        variants = json.load(f)["variants"]
    for variant in variants.values():
        for case in variant["cases"]:
            if case["problem"] == problem and case["nfe"] == nfe and "large" in case["fits"][0]["default"]:
                fits = [fit["default"]["large"] for fit in case["fits"]]
                # flip-only mean square = RMS^2 - rest^2 x (share of noises not flipped)
                only = [math.sqrt(max(0.0, f["rms"] ** 2 - f["rest"] ** 2 * (N_EVAL - f["flips"]) / N_EVAL))
                        for f in fits]
                return {"seeds": len(fits), "rms": [f["rms"] for f in fits], "flips": [f["flips"] for f in fits],
                        "flip_only_rms": only, "rest": [f["rest"] for f in fits]}
    return None


def floor_case(family: heldout.Family, cfg, budget: int, prob: heldout.Problem) -> dict:
    rows = registry_runs(prob, budget)
    best = min(rows, key=lambda r: r["rms"])
    goal = 0.5 * best["rms"]
    lowest = min(rows, key=lambda r: r["flip_only_rms"])
    fewest = min(rows, key=lambda r: (r["flips"], r["rms"]))
    under = [r for r in rows if r["flip_only_rms"] <= goal]
    return {"problem": prob.name, "family": family.name, "cfg": cfg, "nfe": budget, "eval_noises": N_EVAL,
            "runs": len(rows), "best": best, "goal": goal, "lowest_flip_only": lowest, "fewest_flips": fewest,
            "runs_under_goal": len(under), "default_fits": stored_default(prob.name, budget)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tune-narrow12 without guidance only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cases = []
    for family in (f for f in heldout.TUNING if f.name in FAMILIES[:1 if args.quick else None]):
        for cfg in CFGS[:1 if args.quick else None]:
            prob = heldout.Problem(family, cfg, N_EVAL, heldout.FIT_NOISES, eval_seed=separatrix.LARGE_EVAL_SEED)
            for budget in BUDGETS:
                cases.append(floor_case(family, cfg, budget, prob))
                print(f"{prob.name} NFE {budget} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)

    def run(r):
        return f"{r['sampler']}+{r['scheduler']}"

    def default(c):
        d = c["default_fits"]
        if d is None:
            return "-"
        return (f"{' '.join(f'{v:.3g}' for v in d['flip_only_rms'])} ({' '.join(map(str, d['flips']))} flips; "
                f"RMS {' '.join(f'{v:.3g}' for v in d['rms'])})")
    print(table(["problem", "NFE", "best RMS (flips)", "goal", "lowest flip-only RMS (flips, rest)",
                 "fewest flips (flip-only, rest)", "runs whose flips fit the goal", "default fits: flip-only (seeds)"],
                [[c["problem"], c["nfe"], f"{c['best']['rms']:.4f} ({c['best']['flips']}, {run(c['best'])})",
                  f"{c['goal']:.4f}",
                  f"{c['lowest_flip_only']['flip_only_rms']:.4f} ({c['lowest_flip_only']['flips']}, "
                  f"{c['lowest_flip_only']['rest']:.3g}, {run(c['lowest_flip_only'])})",
                  f"{c['fewest_flips']['flips']} ({c['fewest_flips']['flip_only_rms']:.4f}, "
                  f"{c['fewest_flips']['rest']:.3g}, {run(c['fewest_flips'])})",
                  f"{c['runs_under_goal']} of {c['runs']}", default(c)] for c in cases],
                f"flips against the goal, {N_EVAL:,} evaluation noises (tuning split; a diagnostic)"))
    if not args.quick:
        write_json("flip_floor_tuning.json", {"environment": environment(), "split": "tuning",
                                              "eval_seed": separatrix.LARGE_EVAL_SEED, "cases": cases,
                                              "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
