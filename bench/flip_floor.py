"""How few mode flips can a 5- or 10-call sampler make?  A diagnostic on the TUNING split, never a reported result.

    python bench/flip_floor.py            # the two sharp tuning families, no guidance and cfg 3, NFE 5 and 10
    python bench/flip_floor.py --quick    # tune-narrow12 without guidance only
    python bench/flip_floor.py --budgets 15,20   # the same at more model calls (flip_floor_nfe15-20_tuning.json)

On the sharp held-out mixtures the goal (at most half the RMS error of ComfyUI's best) is missed at NFE 10 through
the few noises that a sampler sends to another mode than the exact flow does (flips, as in ``flips.py``).  Every
try to make the calibrated sampler flip less (``bench/README.md``, "Mode flips on sharp mixtures") moved the flips
by a fifth at most.  This bench asks what the goal would need of the flips alone, and what any of the registry's
samplers and schedules achieves.

For each case, on 16,384 evaluation noises (``separatrix.py``'s large stream, so the default fits that
``separatrix.py --large-eval`` measured there can be read beside), every deterministic registry sampler x every
registry scheduler at the budget (``heldout.run_grid``'s set: it holds ComfyUI's deterministic samplers and
schedulers, whose held-out runs match ComfyUI's own, so its best stands for ComfyUI's best) is run and scored per
noise:

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
from _common import RESULTS, environment, int_list, table, write_json  # noqa: E402
import heldout  # noqa: E402
import separatrix  # noqa: E402  (its large evaluation stream, and the default's figures measured on it)

FAMILIES = ("tune-narrow12", "tune-sharp32")
CFGS = (None, 3.0)
BUDGETS = (5, 10)
N_EVAL = 16_384


def flip_only_rms(stats: dict, n: int) -> float:
    """The RMS over all ``n`` noises that the flipped ones alone carry, from ``heldout.flip_stats_of``'s RMS, flips
    and the RMS of the rest: sqrt(RMS^2 - rest^2 x (n - flips) / n)."""
    if stats["flips"] == 0:
        return 0.0
    rest = stats["rest"] if stats["flips"] < n else 0.0
    return math.sqrt(max(0.0, stats["rms"] ** 2 - rest ** 2 * (n - stats["flips"]) / n))


def registry_runs(prob: heldout.Problem, budget: int) -> list[dict]:
    """``heldout.run_grid``'s registry runs at ``budget`` (every deterministic sampler x scheduler), each scored by
    ``heldout.flip_stats`` and ``flip_only_rms``; runs that failed or left a non-finite value are left out."""
    def score(out, sigma0: float) -> dict:
        if out is None or not bool(torch.isfinite(out).all()):
            return {"rms": math.inf}
        stats = heldout.flip_stats(out, prob.reference(sigma0), prob.family)
        return {**stats, "flip_only_rms": flip_only_rms(stats, len(out))}
    rows = heldout.run_grid(prob, None, (budget,), lambda msg: None, score)
    return [{k: r[k] for k in ("sampler", "scheduler", "steps", "rms", "flips", "flip_only_rms", "rest")}
            for r in rows if math.isfinite(r["rms"])]


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
                return {"seeds": len(fits), "rms": [f["rms"] for f in fits], "flips": [f["flips"] for f in fits],
                        "flip_only_rms": [flip_only_rms(f, N_EVAL) for f in fits], "rest": [f["rest"] for f in fits]}
    return None


def floor_case(prob: heldout.Problem, budget: int) -> dict:
    rows = registry_runs(prob, budget)
    best = min(rows, key=lambda r: r["rms"])
    goal = 0.5 * best["rms"]
    lowest = min(rows, key=lambda r: r["flip_only_rms"])
    fewest = min(rows, key=lambda r: (r["flips"], r["rms"]))
    under = [r for r in rows if r["flip_only_rms"] <= goal]
    return {"problem": prob.name, "family": prob.family.name, "cfg": prob.cfg, "nfe": budget, "eval_noises": N_EVAL,
            "runs": len(rows), "best": best, "goal": goal, "lowest_flip_only": lowest, "fewest_flips": fewest,
            "runs_under_goal": len(under), "under_goal": sorted(under, key=lambda r: r["flip_only_rms"]),
            "default_fits": stored_default(prob.name, budget)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tune-narrow12 without guidance only")
    ap.add_argument("--budgets", type=int_list, default=",".join(map(str, BUDGETS)),
                    help="comma-separated NFE budgets (default 5,10; others write flip_floor_nfe<B>_tuning.json)")
    args = ap.parse_args()
    budgets = tuple(args.budgets)
    if not all(2 <= b <= 100 for b in budgets):
        ap.error("--budgets: each from 2 to 100 model calls")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cases = []
    for family in (f for f in heldout.TUNING if f.name in FAMILIES[:1 if args.quick else None]):
        for cfg in CFGS[:1 if args.quick else None]:
            prob = heldout.Problem(family, cfg, N_EVAL, heldout.FIT_NOISES, eval_seed=separatrix.LARGE_EVAL_SEED)
            for budget in budgets:
                cases.append(floor_case(prob, budget))
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
        name = ("flip_floor_tuning.json" if budgets == BUDGETS
                else f"flip_floor_nfe{'-'.join(map(str, budgets))}_tuning.json")
        write_json(name, {"environment": environment(), "split": "tuning", "eval_seed": separatrix.LARGE_EVAL_SEED,
                          "cases": cases, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
