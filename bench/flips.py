"""Mode flips of the calibrated sampler on mixtures of the TUNING split: a diagnostic, never a reported result.

    python bench/flips.py            # tune-sharp32 and tune-narrow12 (no guidance and cfg 3) and tune-wide96
                                     # (cfg 3), NFE 5 and 10
    python bench/flips.py --quick    # tune-narrow12 only, one fitting seed
    python bench/flips.py --refine   # the fit with and without the refinement on more noises (REFINE_CASES)
    python bench/flips.py --shift    # the refined fit with and without the shifted first and last calls
    python bench/flips.py --iterations   # the refined, shifted fit with 300 and 600 iterations
    python bench/flips.py --selection | --penalty | --last-step | --refine-noises   # fit variants (stop 28)
    python bench/flips.py --refine-iterations [--cases 0,1,2,3]   # stop 29; a part of it (--merge-parts joins)
    python bench/flips.py --candidates   # stop 30: the better of two fits (by the refining set), refined
    python bench/flips.py --refine-candidates   # stop 30: two fits, each refined, the better kept
    python bench/flips.py --gradient   # stop 31: SPSA (the fit inside ComfyUI's server) against autograd
    python bench/flips.py --refine-noises-8192   # stop 35: the default refined on 8,192 noises, not 4,096

Where a mixture's modes are narrow and far apart, a few-step sampler sends the noises that lie near the
boundary between two modes' basins to the wrong mode.  One such flip costs an RMS of about the distance between
two means over sqrt(n), so on ``heldout.py``'s 64 evaluation noises a single flip decides a figure.  This bench
counts flips on 2,048 evaluation noises, for the calibrated sampler fitted from three fitting seeds (192 fitting
noises each, ``heldout.py``'s settings), for the start it is fitted from (the same fit with 0 iterations) and for
the registry's one-call samplers x every scheduler.  A flip: an item whose RMS error exceeds a fifth of the RMS
distance between two means (mean_scale * sqrt(2) per element).  "rest": the RMS over the items that did not flip.

On an overlapping mixture (tune-wide96: spread/separation 0.66) the means are closer than a component's spread,
so a flip is not a jump between means, but the error has the same heavy tail: "worst" is the largest error of
one item, and "trimmed" the RMS without the worst 1 % of the items.  There, at NFE 5, "continued" follows the
fitted sampler's state after each step on to sigma = 0 with the exact ODE, for the worst 1 % of the noises and
for as many typical ones (ranked between the quartiles): the median final error from each step's state says how
far the sampler's path is from the ODE's when its later steps take over.  These runs diagnose the fit on the
192 fitting noises alone, without the refinement (``results/flips_tuning.json`` was measured before the refinement
and the shifts existed).

``--refine`` is the evidence the refinement (then on 1,024 more noises, ``calibration.REFINE``) was
adopted on: nine tuning cases, four fitting seeds, each fit with and without it, on the same evaluation noises
(both without the shifts, as measured then).  ``--shift`` is the same for the shifted first and last model calls
(``calibration.SHIFTED_STEPS``), both fits refined.  ``--iterations`` is the same for 600 Adam iterations against
300, both fits refined and shifted: the evidence ``calibration.DEFAULT_FIT``'s 600 was adopted on.
``--refine-noises`` is the same for 4,096 refinement noises against 1,024: the evidence
``heldout.REFINE_NOISES = 4096`` was adopted on (stop 29).  The studies before it pin 1,024 (``AS_MEASURED``).
``--refine-iterations``: 300 refining iterations against 150, both on 4,096 noises (stop 29; not adopted).
``--candidates``: two fits from different fitting noise, the one with the lower RMS on the refining set refined,
against one fit (stop 30); ``--refine-candidates``: both refined, the better after its refinement kept.
``--refine-noises-8192``: that default on 8,192 refining noises against 4,096 (stop 35).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment, int_list, require_ksampler, table, write_json  # noqa: E402
from gmm import MixtureDenoiser  # noqa: E402
import heldout  # noqa: E402  (its families, problems, exact reference and calibration settings)

require_ksampler()
from ksampler.samplers import SAMPLERS  # noqa: E402
from ksampler.schedulers import SCHEDULERS, sampling_sigmas  # noqa: E402

ONE_CALL = ("euler", "dpmpp_2m", "uni_pc", "ipndm", "deis", "lms", "res_multistep")
FIT_SEEDS = (1, 2, 3)
REFINE_SEEDS = (1, 2, 3, 4)
REFINE_CASES = (("tune-wide96", 3.0, 5), ("tune-wide96", 3.0, 10), ("tune-wide96", None, 5), ("tune-wide96", 7.5, 5),
                ("tune-accuracy64", None, 5), ("tune-accuracy64", 7.5, 10), ("tune-sharp32", 3.0, 5),
                ("tune-sharp32", None, 10), ("tune-narrow12", None, 5))
CONTINUED = ("tune-wide96",)  # the overlapping family: where the sampler's path is at each step (NFE 5)
N_EVAL = 2048


item_errors, flips = heldout.item_errors, heldout.flip_stats


def continued(prob: heldout.Problem, cal, ref: torch.Tensor) -> dict:
    """Median error at sigma = 0 when the exact ODE takes over from the sampler's state after each step, for the
    worst 1 % of the noises and as many typical ones."""
    states = []
    out = cal.sampler()(prob.model, prob.noise * float(cal.sigmas[0]), cal.sigmas, disable=True,
                        callback=lambda d: states.append((float(d["sigma"]), d["x"].double())))
    per_item = item_errors(out, ref)
    order = per_item.argsort(descending=True)
    n = max(1, len(order) // 100)
    quartiles = order[len(order) // 4: 3 * len(order) // 4]
    groups = {"worst 1 %": order[:n], "typical": quartiles[torch.linspace(0, len(quartiles) - 1, n).long()]}
    result = {"sigmas": [float(v) for v in cal.sigmas], "items": n}
    for name, idx in groups.items():
        model = MixtureDenoiser(prob.gmm, prob.labels[idx], cfg=prob.cfg, model_sampling=heldout.MS)
        medians = []
        for sigma, x in states[1:]:  # states[0] is the noise itself: the ODE from it is the reference
            end = heldout.exact_reference(model.slope, x[idx], sigma)
            medians.append(float(item_errors(end, ref[idx]).median()))
        result[name] = {"after_step": medians, "final": float(per_item[idx].median())}
    return result


def fit(prob: heldout.Problem, nfe: int, seed: int, iterations: int = heldout.CALIBRATION["iterations"],
        refine: bool = False, shift: bool = heldout.CALIBRATION["shift"], refine_noises: int = heldout.REFINE_NOISES,
        candidates: int = 1, **options):
    """heldout.py's fit from fitting seed ``seed`` (streams apart from heldout.py's); ``refine``: refined as there
    (on ``refine_noises`` noises); ``shift``: with the evaluation shift (``calibration.SHIFTED_STEPS``);
    ``candidates``: that many fits from fitting sets of their own, the best on the refining set refined (the
    first is the one fitted without); ``options``: more of ``heldout.calibrate``'s."""
    model, noise = heldout.fitting_set(prob.gmm, prob.cfg, heldout.FIT_NOISES,
                                       torch.Generator().manual_seed(50_000 + seed))
    larger = heldout.fitting_set(prob.gmm, prob.cfg, refine_noises,
                                 torch.Generator().manual_seed(80_000 + seed)) if refine else None
    more = tuple(heldout.fitting_set(prob.gmm, prob.cfg, heldout.FIT_NOISES,
                                     torch.Generator().manual_seed(60_000 + 1000 * k + seed))
                 for k in range(1, candidates))
    return heldout.calibrate(model, noise, nfe, iterations, refine=larger, shift=shift, candidates=more, **options)


def paired_study(variants: dict, seeds, log, case_indices=None) -> list[dict]:
    """Two fits per tuning case (``REFINE_CASES``, or those at ``case_indices``) and fitting seed, ``variants`` =
    {label: ``fit`` options} (the second label is the change), each measured on the same ``N_EVAL`` evaluation
    noises."""
    (before, _), (after, _) = variants.items()
    cases = []
    for name, cfg, nfe in [REFINE_CASES[i] for i in (case_indices or range(len(REFINE_CASES)))]:
        prob = heldout.Problem(next(f for f in heldout.TUNING if f.name == name), cfg, N_EVAL, heldout.FIT_NOISES)
        ref = prob.reference(heldout.SIGMA_MAX)
        rows = []
        for seed in seeds:
            row = {"seed": seed}
            for label, options in variants.items():
                cal = fit(prob, nfe, seed, **options)
                out = cal.sampler()(prob.model, prob.noise * float(cal.sigmas[0]), cal.sigmas, disable=True)
                row[label] = {**flips(out, ref, prob.family), "model_calls": cal.info["model_calls"],
                              "backward_passes": cal.info["backward_passes"], "seconds": cal.info["seconds"]}
            rows.append(row)
            log(f"  {prob.name} NFE {nfe} seed {seed}: RMS {row[before]['rms']:.4g} -> {row[after]['rms']:.4g}")
        gm = {label: math.exp(sum(math.log(r[label]["rms"]) for r in rows) / len(rows)) for label in variants}
        cases.append({"problem": prob.name, "nfe": nfe, "fits": rows, "geomean_rms": gm,
                      f"{after}_better": sum(r[after]["rms"] < r[before]["rms"] for r in rows)})
    return cases


AS_MEASURED = {"refine_noises": 1024}  # the studies before stop 29 refined on 1,024 noises (REFINE_NOISES then)
STUDIES = {  # flag: (variants, results file, what it compares); each at the settings it was measured with
    "refine": ({"fitted": {**AS_MEASURED, "refine": False, "shift": False, "iterations": 300},
                "refined": {**AS_MEASURED, "refine": True, "shift": False, "iterations": 300}},
               "refine_tuning.json", "the refinement on 1,024 noises"),
    "shift": ({"refined": {**AS_MEASURED, "refine": True, "shift": False, "iterations": 300},
               "shifted": {**AS_MEASURED, "refine": True, "shift": True, "iterations": 300}},
              "shift_tuning.json", "the evaluation shift of the first and last steps (both refined)"),
    "iterations": ({"300 iterations": {**AS_MEASURED, "refine": True, "shift": True, "iterations": 300},
                    "600 iterations": {**AS_MEASURED, "refine": True, "shift": True, "iterations": 600}},
                   "iterations_tuning.json", "600 Adam iterations against 300 (both refined and shifted)"),
    "selection": ({"all": {**AS_MEASURED, "refine": True, "shift": True, "iterations": 600, "selection": "all"},
                   "held aside": {**AS_MEASURED, "refine": True, "shift": True, "iterations": 600,
                                  "selection": "held_aside"}},
                  "selection_tuning.json", "the iterate picked on the held-aside quarter of the fitting noises "
                                           "against all of them"),
    "penalty": ({"no penalty": {**AS_MEASURED, "refine": True, "shift": True, "iterations": 600,
                                "coefficient_penalty": 0.0},
                 "penalty 1": {**AS_MEASURED, "refine": True, "shift": True, "iterations": 600,
                               "coefficient_penalty": 1.0}},
                "penalty_tuning.json", "the coefficient corrections shrunk (coefficient_penalty 1) against not"),
    "last_step": ({"fitted": {**AS_MEASURED, "refine": True, "shift": True, "iterations": 600, "fit_last_step": True},
                   "Adams": {**AS_MEASURED, "refine": True, "shift": True, "iterations": 600,
                             "fit_last_step": False}},
                  "last_step_tuning.json", "the last step on the newest estimate alone against fitted weights"),
    "refine_noises": ({"1024 noises": {"refine": True, "shift": True, "iterations": 600, "refine_noises": 1024},
                       "4096 noises": {"refine": True, "shift": True, "iterations": 600, "refine_noises": 4096}},
                      "refine_noises_tuning.json", "the refinement on 4,096 noises against 1,024"),
    "refine_iterations": ({"150 refining iterations": {"refine": True, "shift": True, "iterations": 600,
                                                       "refine_noises": 4096},
                           "300 refining iterations": {"refine": True, "shift": True, "iterations": 600,
                                                       "refine_noises": 4096, "refine_iterations": 300}},
                          "refine_iterations_tuning.json", "300 refining iterations against 150 (on 4,096 noises)"),
    "candidates": ({"one fit": {"refine": True, "shift": True, "iterations": 600, "refine_noises": 4096},
                    "best of two fits": {"refine": True, "shift": True, "iterations": 600, "refine_noises": 4096,
                                         "candidates": 2}},
                   "candidates_tuning.json", "the better on the refining set of two fits from different fitting "
                                             "noise, refined, against one fit"),
    "refine_candidates": ({"one fit": {"refine": True, "shift": True, "iterations": 600, "refine_noises": 4096},
                           "best of two refined fits": {"refine": True, "shift": True, "iterations": 600,
                                                        "refine_noises": 4096, "candidates": 2,
                                                        "refine_candidates": True}},
                          "refine_candidates_tuning.json", "two fits from different fitting noise, each refined, "
                                                           "the better on the refining set kept, against one fit"),
    "refine_noises_8192": ({"4096 noises": {"refine": True, "shift": True, "iterations": 600, "refine_noises": 4096,
                                            "candidates": 2, "refine_candidates": True},
                            "8192 noises": {"refine": True, "shift": True, "iterations": 600, "refine_noises": 8192,
                                            "candidates": 2, "refine_candidates": True}},
                           "refine_noises_8192_tuning.json", "the default's two refined candidates on 8,192 refining "
                                                             "noises against 4,096 (stop 35; not adopted)"),
    "gradient": ({"autograd": {"refine": True, "shift": True, "iterations": 600, "refine_noises": 4096},
                  "spsa": {"refine": True, "shift": True, "iterations": 600, "refine_noises": 4096,
                           "gradient": "spsa"}},
                 "gradient_tuning.json", "the fit by SPSA (as inside ComfyUI's executor, whose weights give no "
                                         "gradient) against autograd, one fit each"),
}


def merge_parts(results: str) -> None:
    """Join the parts of a study run with --cases (results/<name>_cases*.json, in the order of their names) into
    results/<name>, their seconds summed."""
    import glob
    import json
    paths = sorted(glob.glob(os.path.join(RESULTS, results.replace(".json", "_cases*.json"))))
    if not paths:
        raise SystemExit(f"flips: no parts of {results} to merge")
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    write_json(results, {**parts[0], "cases": [c for p in parts for c in p["cases"]],
                         "seconds": sum(p["seconds"] for p in parts), "merged_from": [os.path.basename(p)
                                                                                     for p in paths]})


def run_case(family: heldout.Family, cfg, nfe: int, seeds, n_eval: int, log) -> dict:
    prob = heldout.Problem(family, cfg, n_eval, heldout.FIT_NOISES)
    ref = prob.reference(heldout.SIGMA_MAX)
    registry = []
    for name in ONE_CALL:
        for scheduler in SCHEDULERS:
            sig = sampling_sigmas(heldout.MS, scheduler, nfe)
            if len(sig) - 1 != nfe:
                continue
            with torch.no_grad():
                out = SAMPLERS[name](prob.model, prob.noise * float(sig[0]), sig, disable=True)
            if bool(torch.isfinite(out).all()):
                registry.append({"sampler": name, "scheduler": scheduler, **flips(out, ref, family)})
    fits = []
    for seed in seeds:
        row = {"seed": seed}
        for label, iterations in (("start", 0), ("fitted", heldout.CALIBRATION["iterations"])):
            cal = fit(prob, nfe, seed, iterations)
            out = cal.sampler()(prob.model, prob.noise * float(cal.sigmas[0]), cal.sigmas, disable=True)
            row[label] = {"init": cal.info["init"], **flips(out, ref, family)}
        if family.name in CONTINUED and nfe == 5:
            row["continued"] = continued(prob, cal, ref)
        fits.append(row)
        log(f"  {prob.name} NFE {nfe} seed {seed}: start {row['start']['flips']} flips, fitted "
            f"{row['fitted']['flips']}")
    return {"problem": prob.name, "family": family.name, "cfg": cfg, "nfe": nfe, "eval_noises": n_eval,
            "registry_best_rms": min(registry, key=lambda r: r["rms"]),
            "registry_fewest_flips": min(registry, key=lambda r: (r["flips"], r["rms"])), "fits": fits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tune-narrow12 only, one fitting seed")
    for name, (_, _, what) in STUDIES.items():  # one flag per paired study, named by its STUDIES entry
        ap.add_argument("--" + name.replace("_", "-"), action="store_true", help=f"{what} (REFINE_CASES)")
    ap.add_argument("--cases", type=int_list, default=None,
                    help="with a study: comma-separated indices into REFINE_CASES (a part of the study, written to "
                         "<results>_cases<indices>.json, for running parts side by side; --merge-parts joins them)")
    ap.add_argument("--merge-parts", action="store_true", help="with a study: join its parts' results files")
    args = ap.parse_args()
    torch.set_num_threads(1)
    study = next((name for name in STUDIES if getattr(args, name)), None)
    if study and args.merge_parts:
        merge_parts(STUDIES[study][1])
        return
    if study:
        variants, results, what = STUDIES[study]
        (before, _), (after, _) = variants.items()
        t0 = time.perf_counter()
        indices = args.cases
        if indices and not all(0 <= i < len(REFINE_CASES) for i in indices):
            ap.error(f"--cases: indices into REFINE_CASES, 0 to {len(REFINE_CASES) - 1}")
        if indices:
            results = results.replace(".json", f"_cases{'-'.join(map(str, indices))}.json")
        cases = paired_study(variants, REFINE_SEEDS, lambda msg: print(msg, file=sys.stderr, flush=True), indices)
        print(table(["problem", "NFE", f"{before} RMS (seeds)", f"{after} RMS (seeds)", "geometric mean",
                     f"{after} better", "calls + backward passes"],
                    [[c["problem"], c["nfe"], " ".join(f"{r[before]['rms']:.3g}" for r in c["fits"]),
                      " ".join(f"{r[after]['rms']:.3g}" for r in c["fits"]),
                      f"{c['geomean_rms'][before]:.4g} -> {c['geomean_rms'][after]:.4g} "
                      f"({c['geomean_rms'][after] / c['geomean_rms'][before]:.2f}x)",
                      f"{c[after + '_better']} of {len(c['fits'])}",
                      f"{c['fits'][0][before]['model_calls']} + {c['fits'][0][before]['backward_passes']} -> "
                      f"{c['fits'][0][after]['model_calls']} + {c['fits'][0][after]['backward_passes']}"]
                     for c in cases],
                    f"{what}, {N_EVAL} evaluation noises (tuning split)"))
        write_json(results, {"environment": environment(), "split": "tuning", "cases": cases, "variants": variants,
                             "calibration": heldout.CALIBRATION, "fit_noises": heldout.FIT_NOISES,
                             "refine_noises": heldout.REFINE_NOISES, "refine": heldout.REFINE,
                             "seconds": time.perf_counter() - t0})
        return
    guidance = {"tune-narrow12": (None, 3.0)} if args.quick else \
        {"tune-sharp32": (None, 3.0), "tune-narrow12": (None, 3.0), "tune-wide96": (3.0,)}
    families = [f for f in heldout.TUNING if f.name in guidance]
    seeds = FIT_SEEDS[:1] if args.quick else FIT_SEEDS
    t0 = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    cases = [run_case(fam, cfg, nfe, seeds, N_EVAL, log) for fam in families for cfg in guidance[fam.name]
             for nfe in (5, 10)]
    lines = []
    for c in cases:
        reg, few = c["registry_best_rms"], c["registry_fewest_flips"]
        lines.append([c["problem"], c["nfe"], f"{reg['sampler']}+{reg['scheduler']}: {reg['flips']} / {reg['rest']:.3g}",
                      f"{few['sampler']}+{few['scheduler']}: {few['flips']} / {few['rest']:.3g}",
                      " ".join(f"{r['start']['flips']}" for r in c["fits"]),
                      " ".join(f"{r['fitted']['flips']}" for r in c["fits"]),
                      " ".join(f"{r['fitted']['rest']:.3g}" for r in c["fits"]),
                      f"{reg['rms']:.3g} / {reg['trimmed']:.3g} / {reg['worst']:.3g}",
                      " ".join(f"{r['fitted']['rms']:.3g}/{r['fitted']['trimmed']:.3g}/{r['fitted']['worst']:.3g}"
                               for r in c["fits"])])
    print(table(["problem", "NFE", "registry best RMS: flips / rest", "registry fewest flips", "start flips (seeds)",
                 "fitted flips (seeds)", "fitted rest (seeds)", "registry best: RMS / trimmed / worst",
                 "fitted: RMS / trimmed / worst (seeds)"], lines,
                f"mode flips on {N_EVAL} evaluation noises (tuning split; a diagnostic, not a reported result)"))
    rows = [[c["problem"], r["seed"], " ".join(f"{v:.3g}" for v in r["continued"]["sigmas"][1:-1]),
             *(" ".join(f"{v:.3g}" for v in r["continued"][g]["after_step"]) + f" -> {r['continued'][g]['final']:.3g}"
               for g in ("typical", "worst 1 %"))]
            for c in cases for r in c["fits"] if "continued" in r]
    if rows:
        print(table(["problem", "seed", "sigma after each step", "typical: exact ODE on from each step -> sampler",
                     "worst 1 %: the same"], rows,
                    "median error at sigma 0 when the exact ODE takes over from the fitted sampler's state (NFE 5)"))
    if not args.quick:
        write_json("flips_tuning.json", {"environment": environment(), "split": "tuning", "cases": cases,
                                         "calibration": heldout.CALIBRATION, "fit_noises": heldout.FIT_NOISES,
                                         "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
