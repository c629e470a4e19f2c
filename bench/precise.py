"""Held-out cells decided by mode flips, measured again on a larger fresh draw (stop 37; measurement only).

    python bench/precise.py --results heldout_eval16384_sharp16.json --problem "sharp16 cfg 3"
        [--budgets 5,10] [--noises 65536] [--top 12]
    python bench/precise.py --results heldout.json --problem "sharp16 cfg 3" --budgets 20 --noises 16384
    python bench/precise.py --table [--plot]   # every held-out cell on the largest draw it was measured on

On the sharp held-out mixtures a run's RMS is made by the few evaluation noises it sends to another mode than the
exact flow does (flips).  On 16,384 noises the best runs of both sides flip 3 to 30 of them, and each side's best
is the least of many such counts, so the pick favours whichever run drew few flips, and the ratio of the two
bests is uncertain by a third.  This script keeps the choice and the measurement apart:

- the runs are chosen on the stored draw of a ``heldout.py`` run (``--eval-noises`` at NFE 5 and 10; NFE 20 has
  only the 64-noise runs, ``heldout.json`` and ``heldout_second.json``): the calibrated sampler, and the ``--top``
  best registry runs and ComfyUI runs of that cell by RMS;
- each is run again, at the step count and model calls it had there, on ``--noises`` evaluation noises of a
  stream of their own (``PRECISE_EVAL_SEED`` + the family's seed, apart from every other stream), against the
  same exact reference.  The calibrated sampler is fitted again on its fitting sets, which do not depend on the
  evaluation draw (the same fit, up to the run-to-run drift of a refit: its RMS on the fitting noise is recorded
  beside the stored one);
- each side's best is then the best of its runs on the fresh draw.  This is the same rule for both sides, and the
  pick among ComfyUI's top runs on the fresh draw still favours it slightly.  A paired bootstrap over the fresh
  noises gives a 90 % interval for the ratio of the two bests.  It resamples the noises, not the choice of runs.

Nothing is chosen or fitted on what is reported.  Results merge into ``results/precise_eval<N>.json``, one entry
per cell, under a lock, so cells can run side by side.  In 256 dimensions glibc kept the fit's freed memory, and a
65,536-noise cell was killed at 18 GB; wide256 ran on 32,768 noises with ``MALLOC_MMAP_THRESHOLD_=1048576`` in the
environment (large blocks go back to the system when freed), under 2 GB after the fit.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment, int_list, locked_json, table  # noqa: E402
import heldout  # noqa: E402

PRECISE_EVAL_SEED = 8_000  # + the family's seed: apart from heldout.py's streams and separatrix.py's 7,000
BOOTSTRAP, BOOTSTRAP_SEED = 2_000, 17
FRESH_MARK = "\u2020"  # a cell measured on a fresh draw by this script (of 65,536 noises, or the size noted)
FRESH_SMALL_MARK = "\u2021"  # the same on a fresh draw of 16,384
PLOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "heldout_error_vs_nfe.png")


def chosen_rows(stored: dict, budget: int, top: int) -> list[dict]:
    """The calibrated row and the ``top`` best rows of each other side, by RMS on the stored draw."""
    rows = [r for r in stored["rows"] if r["budget"] == budget and math.isfinite(r["rms_error"])]
    chosen = [r for r in rows if r["impl"] == "calibrated"]
    for impl in ("ours", "comfyui"):
        chosen += sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["rms_error"])[:top]
    return chosen


def rerun(prob: heldout.Problem, row: dict, comfy: heldout.Comfy, log, notes: dict) -> torch.Tensor:
    """One chosen row's per-noise errors on the problem's evaluation noise (the calibrated row's fitted RMS, fitted
    again and stored, goes into ``notes``)."""
    if row["impl"] == "calibrated":
        t0 = time.perf_counter()
        cal = heldout.bench_fit(prob, row["budget"])
        notes["rms_fitted"] = {"again": cal.info["rms_fitted"], "stored": row["rms_fitted"]}
        log(f"  calibrated NFE {row['budget']} fitted again in {time.perf_counter() - t0:.0f}s: RMS on its fitting "
            f"noise {cal.info['rms_fitted']:.9g}, stored {row['rms_fitted']:.9g}")
        sigmas, run_fn = cal.sigmas, lambda m, x, s: cal.sampler()(m, x, s, disable=True)
    else:
        run_fn, sigmas_of = (heldout.ours_runner(row["sampler"]) if row["impl"] == "ours"
                             else heldout.comfy_runner(comfy, row["sampler"]))
        sigmas = sigmas_of(row["scheduler"], row["steps"])
    model = heldout.Counting(prob.model)
    out = run_fn(model, prob.noise * float(sigmas[0]), sigmas)
    if model.calls != row["nfe"]:
        raise SystemExit(f"precise: {row['impl']} {row['sampler']}/{row['scheduler']} made {model.calls} model calls, "
                         f"{row['nfe']} in the stored run")
    return heldout.item_errors(out, prob.reference(float(sigmas[0])))


def ratio_interval(ours: torch.Tensor, theirs: torch.Tensor) -> list[float]:
    """The 5th and 95th percentiles of RMS(ours) / RMS(theirs) over noises drawn again with replacement."""
    gen = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    ratios = []
    for _ in range(BOOTSTRAP):
        pick = torch.randint(0, len(ours), (len(ours),), generator=gen)
        ratios.append(heldout.rms_of(ours[pick]) / heldout.rms_of(theirs[pick]))
    levels = torch.tensor([0.05, 0.95], dtype=torch.float64)
    return torch.tensor(ratios, dtype=torch.float64).quantile(levels).tolist()


def measure_cell(prob: heldout.Problem, stored: dict, budget: int, top: int, comfy: heldout.Comfy, log) -> dict:
    """One cell: the chosen rows on the fresh draw, each side's best there, and their ratio."""
    t0 = time.perf_counter()
    rows, errors = [], {}
    key_of = lambda r: (r["impl"], r["sampler"], r["scheduler"])  # noqa: E731
    for row in chosen_rows(stored, budget, top):
        notes = {}
        errors[key_of(row)] = rerun(prob, row, comfy, log, notes)
        tail = heldout.flip_stats_of(errors[key_of(row)], prob.family)
        rows.append({"impl": row["impl"], "sampler": row["sampler"], "scheduler": row["scheduler"],
                     "steps": row["steps"], "nfe": row["nfe"],
                     # a run on 64 noises (heldout.py without --eval-noises) stores no tail
                     "stored": {k: row[k] for k in ("rms_error", "flips", "trimmed") if k in row},
                     "fresh": {"rms_error": tail["rms"], "flips": tail["flips"], "trimmed": tail["trimmed"]},
                     **notes})
        log(f"  {row['impl']} {row['sampler']}/{row['scheduler']}: RMS {row['rms_error']:.4g} -> {tail['rms']:.4g}, "
            f"flips {row.get('flips', '-')} -> {tail['flips']} (per {len(prob.noise):,})")
    best = {}
    for side, impls in (("ours", ("calibrated", "ours")), ("comfyui", ("comfyui",))):
        best[side] = min((r for r in rows if r["impl"] in impls), key=lambda r: r["fresh"]["rms_error"])
    ratio = best["ours"]["fresh"]["rms_error"] / best["comfyui"]["fresh"]["rms_error"]
    interval = ratio_interval(errors[key_of(best["ours"])], errors[key_of(best["comfyui"])])
    stored_ratio = (min(r["stored"]["rms_error"] for r in rows if r["impl"] != "comfyui")
                    / min(r["stored"]["rms_error"] for r in rows if r["impl"] == "comfyui"))
    print(table(["impl", "sampler", "scheduler", "stored RMS", "stored flips", "fresh RMS", "fresh flips",
                 "fresh trimmed"],
                [[r["impl"], r["sampler"], r["scheduler"], r["stored"]["rms_error"], r["stored"].get("flips", "-"),
                  r["fresh"]["rms_error"], r["fresh"]["flips"], r["fresh"]["trimmed"]] for r in rows]))
    print(f"\n{stored['problem']}, NFE {budget}: ours / ComfyUI's best = {ratio:.3f} on {len(prob.noise):,} fresh "
          f"noises (90 % interval {interval[0]:.3f}-{interval[1]:.3f}); {stored_ratio:.3f} on the stored draw\n",
          flush=True)
    return {"problem": stored["problem"], "budget": budget, "top": top, "ratio": ratio,
            "ratio_interval_90": interval, "stored_ratio": stored_ratio,
            "best": {side: key_of(r) for side, r in best.items()}, "rows": rows,
            "environment": environment(), "seconds": round(time.perf_counter() - t0, 1)}


def largest_draws() -> dict:
    """Each held-out cell's best RMS per side, from the largest evaluation draw it has been measured on: a fresh
    draw of this script's, else a ``heldout.py --eval-noises 16384`` run, else the 2,048- and then the 64-noise runs
    (NFE 20 has only the 64).  Keyed by (problem, budget): ours, comfyui, noises, fresh, registry (our best is a
    registry run)."""
    def draw_size(name: str) -> int:  # heldout_eval16384_x.json, precise_eval65536.json -> the evaluation noises
        return int(name.split("_eval")[1].split("_")[0].split(".")[0])

    def stored(pattern: str) -> list[str]:
        return sorted(map(os.path.basename, glob.glob(os.path.join(RESULTS, pattern))), key=draw_size)
    cells = {}
    for name in ["heldout.json", "heldout_second.json", "heldout_eval2048.json", "heldout_second_eval2048.json",
                 *stored("heldout_eval16384_*.json")]:
        with open(os.path.join(RESULTS, name)) as f:
            run = json.load(f)
        for cell in run["summary"]:
            cells[(cell["problem"], cell["budget"])] = {
                "ours": cell["ours"]["rms_error"], "comfyui": cell["comfyui"]["rms_error"],
                "noises": run["eval_noises"], "fresh": False, "registry": cell["ours"]["impl"] == "ours"}
    for name in stored("precise_eval*.json"):  # smaller draws first, so that a larger one wins
        noises = draw_size(name)
        with open(os.path.join(RESULTS, name)) as f:
            for cell in json.load(f)["cells"]:
                key = (cell["problem"], cell["budget"])
                if noises >= cells[key]["noises"]:
                    fresh_rms = {side: next(r["fresh"]["rms_error"] for r in cell["rows"]
                                            if (r["impl"], r["sampler"], r["scheduler"]) == tuple(cell["best"][side]))
                                 for side in ("ours", "comfyui")}
                    cells[key] = {**fresh_rms, "noises": noises, "fresh": True,
                                  "registry": cell["best"]["ours"][0] == "ours"}
    return cells


def _ratio_text(cell: dict) -> str:
    """The cell's ratio, with a third digit where two would not show which side of 0.5 it is on."""
    ratio = cell["ours"] / cell["comfyui"]
    return f"{ratio:.3f}" if abs(ratio - 0.5) < 0.005 else f"{ratio:.2f}"


def _marked(cell: dict, text: str) -> str:
    """``text`` with the signs of the draw it comes from (see the table's legend)."""
    mark = ((FRESH_SMALL_MARK if cell["noises"] == 16_384 else FRESH_MARK) if cell["fresh"]
            else "*" if cell["noises"] > 2048 else "")
    size_note = f" ({cell['noises']:,})" if cell["fresh"] and cell["noises"] not in (16_384, 65_536) else ""
    return f"{text}{'r' if cell['registry'] else ''}{mark}{size_note}"


LEGEND = (f"{FRESH_MARK} a fresh draw of 65,536 noises (or the number in brackets), {FRESH_SMALL_MARK} a fresh draw "
          "of 16,384, * 16,384 noises of heldout.py's own run, else 2,048 (NFE 5 and 10) or 64 (NFE 20); r: our best "
          "is a registry run, else the calibrated sampler")
GUIDANCE = ("no cfg", "cfg 3", "cfg 7.5")


def largest_draw_table(cells: dict) -> str:
    """The held-out ratios at NFE 5 and 10 on the largest draws, and the goal's count."""
    lines = ["| problem | none | cfg 3 | cfg 7.5 |", "|---|---|---|---|"]
    met = total = 0
    for family in heldout.HELDOUT + heldout.HELDOUT_2:
        row = []
        for cfg in GUIDANCE:
            parts = []
            for budget in (5, 10):
                cell = cells[(f"{family.name} {cfg}", budget)]
                met, total = met + (cell["ours"] <= 0.5 * cell["comfyui"]), total + 1
                parts.append(_marked(cell, _ratio_text(cell)))
            row.append(" / ".join(parts))
        lines.append(f"| {family.name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + f"\n\nmet (at most 0.5x) in {met} of {total} cells; {LEGEND}"


def error_tables(cells: dict) -> str:
    """Per held-out family: the best RMS error of each side at NFE 5, 10 and 20 on the largest draws, and the
    ratio."""
    out = []
    for family in heldout.HELDOUT + heldout.HELDOUT_2:
        lines = [f"**{family.name}** (d = {family.dim}, K = {family.components}, spread/separation "
                 f"{family.spread_to_separation():.3g})", "",
                 "| guidance | " + " | ".join(f"NFE {b}: ours / ComfyUI (ratio)" for b in heldout.BUDGETS) + " |",
                 "|---" * (len(heldout.BUDGETS) + 1) + "|"]
        for cfg in GUIDANCE:
            row = []
            for budget in heldout.BUDGETS:
                cell = cells[(f"{family.name} {cfg}", budget)]
                row.append(_marked(cell, f"{cell['ours']:.3g} / {cell['comfyui']:.3g} ({_ratio_text(cell)})"))
            lines.append(f"| {'none' if cfg == 'no cfg' else cfg} | " + " | ".join(row) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + f"\n\n{LEGEND}"


def plot(cells: dict, path: str) -> None:
    """Best RMS error against NFE per held-out problem on the largest draws, ours solid (red) and ComfyUI's dashed
    (blue), drawn with PIL on log axes; points on 64 evaluation noises are hollow and not joined to the others."""
    from PIL import Image, ImageDraw

    problems = [f"{family.name} {cfg}" for family in heldout.HELDOUT + heldout.HELDOUT_2 for cfg in GUIDANCE]
    budgets = heldout.BUDGETS
    cols, (w, h, pad) = 3, (330, 240, 46)
    img = Image.new("RGB", (cols * w, math.ceil(len(problems) / cols) * h + 44), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 6), "Best RMS error vs NFE on held-out mixtures (log-log): solid red = ours (registry or calibrated), "
                    "dashed blue = ComfyUI's best.", fill="black")
    d.text((10, 22), "Each point on the largest draw of its cell (16,384-65,536 noises); hollow points: 64 noises, not "
                     "joined to the others. bench/precise.py --table --plot", fill="black")
    for k, prob in enumerate(problems):
        ox, oy = (k % cols) * w, 44 + (k // cols) * h
        pts = [(b, cells[(prob, b)]) for b in budgets]
        vals = [c[side] for _, c in pts for side in ("ours", "comfyui")]
        lo, hi = math.log10(min(vals)) - 0.2, math.log10(max(vals)) + 0.2
        bx0, bx1, by0, by1 = ox + pad, ox + w - 12, oy + 22, oy + h - 28
        d.rectangle([bx0, by0, bx1, by1], outline="black")
        d.text((ox + pad, oy + 6), prob, fill="black")

        def xy(nfe, err):
            fx = (math.log(nfe) - math.log(budgets[0])) / (math.log(budgets[-1]) - math.log(budgets[0]))
            fy = (math.log10(err) - lo) / (hi - lo)
            return bx0 + fx * (bx1 - bx0), by1 - fy * (by1 - by0)
        for e in range(math.floor(lo), math.ceil(hi) + 1):
            if lo <= e <= hi:
                _, y = xy(budgets[0], 10.0 ** e)
                d.line([bx0 - 4, y, bx0, y], fill="black")
                d.text((ox + 4, y - 6), f"1e{e}", fill="black")
        for b in budgets:
            x, _ = xy(b, 10.0 ** lo)
            d.text((x - 6, by1 + 4), str(b), fill="black")
        for side, colour, dashed in (("ours", (200, 30, 30), False), ("comfyui", (30, 60, 200), True)):
            line = [(xy(b, c[side]), c["noises"] > 64) for b, c in pts]
            for ((x0, y0), large0), ((x1, y1), large1) in zip(line, line[1:]):
                if not (large0 and large1):  # a line would read as a trend across draws of other sizes
                    continue
                n = 12 if dashed else 1
                for j in range(0, n, 2 if dashed else 1):
                    d.line([x0 + (x1 - x0) * j / n, y0 + (y1 - y0) * j / n, x0 + (x1 - x0) * (j + 1) / n,
                            y0 + (y1 - y0) * (j + 1) / n], fill=colour, width=2)
            for (x, y), large in line:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour if large else "white", outline=colour, width=2)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true",
                    help="print the held-out tables on the largest draws (ratios, then errors per family), and stop")
    ap.add_argument("--plot", action="store_true", help=f"with --table: draw them against NFE into {PLOT}")
    ap.add_argument("--results", help="a stored heldout.py results file (in results/), e.g. "
                                      "heldout_eval16384_sharp16.json, or heldout.json for NFE 20")
    ap.add_argument("--problem", help='the cell\'s problem, e.g. "sharp16 cfg 3"')
    ap.add_argument("--budgets", type=int_list, default="5,10",
                    help="comma-separated NFE budgets, one cell each (default 5,10)")
    ap.add_argument("--noises", type=int, default=65_536, help="fresh evaluation noises (default 65,536)")
    ap.add_argument("--top", type=int, default=12, help="runs kept per side besides the calibrated one (default 12)")
    args = ap.parse_args()
    if args.table:
        cells = largest_draws()
        print(largest_draw_table(cells) + "\n\n" + error_tables(cells))
        if args.plot:
            plot(cells, PLOT)
            print(f"\nplot: {PLOT}")
        return
    if args.plot:
        ap.error("--plot goes with --table")
    if not (args.results and args.problem):
        ap.error("--results and --problem name the cell to measure (or --table)")
    try:
        with open(os.path.join(RESULTS, args.results)) as f:
            stored_run = json.load(f)
    except (OSError, ValueError) as exc:
        ap.error(f"--results: cannot read {args.results!r} in {RESULTS}: {exc}")
    cells = {r["problem"]: r for r in stored_run.get("results", [])}
    if args.problem not in cells:
        ap.error(f"--problem: {args.problem!r} is not in {args.results}; it has {sorted(cells)}")
    stored = cells[args.problem]
    budgets = args.budgets
    if not budgets or not set(budgets) <= set(stored_run["budgets"]):
        ap.error(f"--budgets: {args.results} has the budgets {stored_run['budgets']}")
    if args.noises <= stored_run["eval_noises"] or args.top < 1:
        ap.error(f"--noises takes more than the stored run's {stored_run['eval_noises']}; --top at least 1")
    torch.set_num_threads(1)
    family = next(f for f in heldout.HELDOUT + heldout.HELDOUT_2 if f.name == stored["family"])
    prob = heldout.Problem(family, stored["cfg"], args.noises, heldout.FIT_NOISES, eval_seed=PRECISE_EVAL_SEED)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    comfy = heldout.Comfy(heldout.COMFYUI_DIR)
    for budget in budgets:  # one Problem: the budgets share its reference solves
        cell = measure_cell(prob, stored, budget, args.top, comfy, log)
        cell["from"], cell["stored_eval_noises"] = args.results, stored_run["eval_noises"]
        with locked_json(f"precise_eval{args.noises}.json", {
                "about": "heldout.py cells measured again on a fresh draw, with runs chosen on the stored draw "
                         "(bench/precise.py)",
                "eval_seed": PRECISE_EVAL_SEED, "bootstrap": BOOTSTRAP, "cells": []}) as payload:
            payload["cells"] = [c for c in payload["cells"]
                                if (c["problem"], c["budget"]) != (cell["problem"], budget)] + [cell]


if __name__ == "__main__":
    main()
