"""The linearised exact-continuation loss against the mode flips: a study on the TUNING split, never a result.

    python bench/continuation.py --variant second [--cases 1,3,4,6,8] [--seeds 1,2,3,4]
    python bench/continuation.py --variant half-weight [--cases 0,2,5,7]

The calibrated sampler's flips are made in mid-path, by deviations that its later steps cancel for typical noises
(``bench/README.md``, "Mode flips on sharp mixtures").  This loss holds each mid-path state x_k to the teacher's
state at that sigma, weighted by how far the teacher's end moves with its state there (J_k):

    loss = sqrt(final MS + weight * mean over k of ||J_k (x_k - x_k^teacher)||^2 / d)

Inside a mode J_k contracts, so typical noises are barely held; near a basin boundary it is large.  J_k is probed
by ``PROBES`` Gaussian vectors v (E ||J e||^2 = E (v . J e)^2), one backward pass each through the teacher's
100-step solve on the fitting batch, and read between the teacher's steps linearly in log sigma.

Variants (each fit otherwise the default: two candidates from fitting sets of their own, each refined on 4,096
noises with the plain loss, the better on the refining noise kept; ``flips.py --refine-candidates``):
- ``second``: the plain fit is the first candidate, the second is fitted with the loss (weight 1);
- ``half-weight``: both candidates are fitted with the loss at weight 0.5.
(Stop 34 ran weight 1 for both candidates, and for the refinement too, in scratch scripts.)

Each is measured on flips.py's nine ``REFINE_CASES``, four fitting seeds, 2,048 evaluation noises, against the
stored default (``results/refine_candidates_tuning.json``, "best of two refined fits"; where the variant keeps the
plain first candidate it reproduces that fit exactly).  The rule, fixed before the runs: adopt only at most 0.95x
in geometric mean over the 36 fits, better in at least 6 of 9 cases, and no more flips in total.  Results are
merged into ``results/continuation_tuning.json`` case by case, so parts of a variant can run side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment, int_list, locked_json, table  # noqa: E402
import flips  # noqa: E402  (the tuning cases, the default's fit and the flip count)
import heldout  # noqa: E402

from ksampler.calibration import fit as fitting, solver  # noqa: E402

PROBES = 4
PROBE_SEED = 12_345
RESULTS_FILE = "continuation_tuning.json"
BASELINE_FILE = "refine_candidates_tuning.json"
BASELINE = "best of two refined fits"
VARIANTS = {  # name: (weight, which candidates use the loss)
    "second": (1.0, (2,)),
    "half-weight": (0.5, (1, 2)),
}
RULE = {"geomean_at_most": 0.95, "cases_better_at_least": 6, "flips_at_most": "the default's"}


class ContinuationStudent(fitting._Student):
    """The calibrated sampler on its fitting batch, with the continuation term in its loss."""

    def __init__(self, *args, weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight = weight
        ms, steps = self.ms, heldout.CALIBRATION["teacher_steps"]
        t_min = math.exp(self.log_eval_range[0])
        hi, lo = solver.ve_bounds(ms, self.s_max, t_min)
        states = []

        def recording(x, sigma, **extra):  # the teacher calls the model once per step, at that step's state
            states.append(x)
            return self.denoiser(x, sigma, **extra)
        with torch.enable_grad():  # the teacher's own solve (past its no_grad), this time with its graph
            start = self.x0.detach().clone().requires_grad_(True)
            end = solver.teacher_solve.__wrapped__(recording, ms, start, self.s_max, t_min, steps)
            gen = torch.Generator().manual_seed(PROBE_SEED)
            probes = []
            for p in range(PROBES):
                v = torch.randn(end.shape, generator=gen, dtype=end.dtype)
                grads = torch.autograd.grad((end * v).sum(), states, retain_graph=p < PROBES - 1)
                probes.append(torch.stack([g.reshape(g.shape[0], -1) for g in grads]))
        gap = float((end.detach() - self.teacher).abs().max())
        if gap > 1e-6:
            raise RuntimeError(f"continuation: the teacher's solve does not reproduce the fit's teacher ({gap:.3g})")
        self.teacher_states = torch.stack([s.detach().reshape(s.shape[0], -1) for s in states])  # [steps, B, d]
        self.teacher_probes = torch.stack(probes)  # [PROBES, steps, B, d]: v^T J at each teacher step
        self.teacher_grid = (math.log(hi), math.log(lo), steps)

    def loss(self, u, form, delta, idx):
        sig, c, cc, shift = self.parameters(u, form, delta)
        self.begin_solve()
        states = []
        out = solver.solve(self.denoiser, self.x0, sig, c, self.ms, {}, corrector=cc, shift=shift,
                           callback=lambda d: states.append(d["x"]))
        batch, size = out.shape[0], out[0].numel()
        final = (out - self.teacher)[idx].reshape(-1, size).pow(2).mean()
        log_hi, log_lo, steps = self.teacher_grid
        terms = []
        for k in range(1, len(states)):  # the start is the teacher's
            t = (log_hi - torch.log(solver.ve_sigma(self.ms, sig[k]))) / (log_hi - log_lo) * (steps - 1)
            j = min(max(math.floor(float(t.detach())), 0), steps - 2)
            w = (t - j).clamp(0, 1).to(out.dtype)
            teacher_k = (1 - w) * self.teacher_states[j] + w * self.teacher_states[j + 1]
            probes_k = (1 - w.detach()) * self.teacher_probes[:, j] + w.detach() * self.teacher_probes[:, j + 1]
            projected = (probes_k * (states[k].reshape(batch, -1) - teacher_k).unsqueeze(0)).sum(-1)  # [P, B]
            terms.append(projected.pow(2).mean(0)[idx].mean() / size)
        continuation = torch.stack(terms).mean() if terms else final.new_zeros(())
        return (final + self.weight * continuation).sqrt()


@contextlib.contextmanager
def students(weight: float, candidates: tuple, refine_noises: int):
    """``fit_calibration``'s students while inside: the fitting sets of ``candidates`` (1: the first fitting set,
    2: the second) with the continuation loss, the refining set plain.  fit_calibration builds them in the order
    first fitting set, refining set, second fitting set; the refining set's size checks that order."""
    plain, built = fitting._Student, []

    def build(*args, **kwargs):
        built.append(len(built) + 1)
        order = {1: 1, 3: 2}.get(built[-1])  # the candidate this fitting set belongs to (None: the refining set)
        student = (ContinuationStudent(*args, weight=weight, **kwargs) if order in candidates
                   else plain(*args, **kwargs))
        if (order is None) != (student.x0.shape[0] == refine_noises):
            raise RuntimeError("continuation: fit_calibration no longer builds its students in the order assumed")
        return student
    fitting._Student = build
    try:
        yield
    finally:
        fitting._Student = plain


def locked_results(results_file: str = RESULTS_FILE, baseline: str = f"{BASELINE_FILE}: {BASELINE}"):
    """The study's results file, under a lock (parts may run side by side)."""
    return locked_json(results_file, {"split": "tuning", "rule": RULE, "baseline": baseline, "variants": {}})


def summary(cases: list, key: Optional[str] = None) -> dict:
    """The rule's figures over ``cases``: from each side's result, or from its ``key`` entry (another evaluation)."""
    of = (lambda r, side: r[side]) if key is None else (lambda r, side: r[side][key])  # noqa: E731
    logs = [[math.log(of(r, "variant")["rms"] / of(r, "default")["rms"]) for r in c["fits"]] for c in cases]
    flat = [v for case in logs for v in case]
    return {"fits": len(flat), "geomean_ratio": math.exp(sum(flat) / len(flat)) if flat else math.nan,
            "cases_better": sum(sum(case) < 0 for case in logs), "cases": len(cases),
            "flips_default": sum(of(r, "default")["flips"] for c in cases for r in c["fits"]),
            "flips_variant": sum(of(r, "variant")["flips"] for c in cases for r in c["fits"])}


def evaluate(prob: heldout.Problem, cal) -> dict:
    """flips.py's figures of ``cal`` on the case's ``flips.N_EVAL`` evaluation noises."""
    out = cal.sampler()(prob.model, prob.noise * float(cal.sigmas[0]), cal.sigmas, disable=True)
    return flips.flips(out, prob.reference(heldout.SIGMA_MAX), prob.family)


def fit_case(index: int, seeds: list, log, students_for, default_for, measure=evaluate) -> dict:
    """The default's fit of case ``index`` of ``flips.REFINE_CASES`` per fitting seed, with ``fit_calibration``'s
    parts swapped inside ``students_for(prob, seed, refine_noises, extra)`` (which may fill ``extra``), measured by
    ``measure(prob, cal)`` against ``default_for(prob, nfe, seed)``'s result."""
    options = flips.STUDIES["refine_candidates"][0][BASELINE]
    name, cfg, nfe = flips.REFINE_CASES[index]
    prob = heldout.Problem(next(f for f in heldout.TUNING if f.name == name), cfg, flips.N_EVAL, heldout.FIT_NOISES)
    rows = []
    for seed in seeds:
        default = default_for(prob, nfe, seed)
        t0 = time.perf_counter()
        extra = {}
        with students_for(prob, seed, options["refine_noises"], extra):
            cal = flips.fit(prob, nfe, seed, **options)
        rows.append({"seed": seed, "variant": measure(prob, cal), "default": default,
                     "candidate_rms": cal.info.get("candidate_rms"), "model_calls": cal.info["model_calls"],
                     "backward_passes": cal.info["backward_passes"], **extra,
                     "seconds": time.perf_counter() - t0})
        log(f"  {prob.name} NFE {nfe} seed {seed}: RMS {default['rms']:.4g} -> {rows[-1]['variant']['rms']:.4g}, "
            f"flips {default['flips']} -> {rows[-1]['variant']['flips']}")
    ratio = math.exp(sum(math.log(r["variant"]["rms"] / r["default"]["rms"]) for r in rows) / len(rows))
    return {"case": index, "problem": prob.name, "nfe": nfe, "fits": rows, "geomean_ratio": ratio}


def run_case(index: int, variant: str, seeds: list, log) -> dict:
    weight, candidates = VARIANTS[variant]
    with open(os.path.join(RESULTS, BASELINE_FILE)) as f:
        stored = {(c["problem"], c["nfe"]): c for c in json.load(f)["cases"]}
    return fit_case(index, seeds, log, lambda prob, seed, refine_noises, extra: students(weight, candidates,
                                                                                        refine_noises),
                    lambda prob, nfe, seed: next(r for r in stored[(prob.name, nfe)]["fits"]
                                                 if r["seed"] == seed)[BASELINE])


def add_case_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cases", type=int_list, default=None,
                    help="comma-separated indices into flips.REFINE_CASES (default: all)")
    ap.add_argument("--seeds", type=int_list, default=",".join(map(str, flips.REFINE_SEEDS)),
                    help="fitting seeds (default 1-4)")


def cases_and_seeds(ap: argparse.ArgumentParser, args, baseline: str) -> tuple[list, list]:
    """The case indices and fitting seeds of ``add_case_arguments``' options (``baseline`` names the default's
    fits in the error for a seed it lacks)."""
    indices = args.cases if args.cases else list(range(len(flips.REFINE_CASES)))
    seeds = args.seeds
    if not all(0 <= i < len(flips.REFINE_CASES) for i in indices):
        ap.error(f"--cases: indices into REFINE_CASES, 0 to {len(flips.REFINE_CASES) - 1}")
    if not set(seeds) <= set(flips.REFINE_SEEDS):
        ap.error(f"--seeds: {baseline} has seeds {', '.join(map(str, flips.REFINE_SEEDS))}")
    return indices, seeds


def print_cases(cases: list, label: str, title: str) -> None:
    print(table(["problem", "NFE", "default RMS (seeds)", f"{label} RMS (seeds)", "ratio (geometric mean)", "flips"],
                [[c["problem"], c["nfe"], " ".join(f"{r['default']['rms']:.3g}" for r in c["fits"]),
                  " ".join(f"{r['variant']['rms']:.3g}" for r in c["fits"]), f"{c['geomean_ratio']:.3f}",
                  f"{sum(r['default']['flips'] for r in c['fits'])} -> {sum(r['variant']['flips'] for r in c['fits'])}"]
                 for c in cases], title))
    print(summary(cases))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=tuple(VARIANTS), required=True)
    add_case_arguments(ap)
    args = ap.parse_args()
    indices, seeds = cases_and_seeds(ap, args, "the stored default")
    torch.set_num_threads(1)
    for index in indices:
        case = run_case(index, args.variant, seeds, lambda msg: print(msg, file=sys.stderr, flush=True))
        with locked_results() as payload:
            weight, candidates = VARIANTS[args.variant]
            entry = payload["variants"].setdefault(args.variant, {"weight": weight, "candidates": list(candidates),
                                                                  "probes": PROBES, "cases": []})
            entry["cases"] = sorted([c for c in entry["cases"] if c["case"] != index] + [case],
                                    key=lambda c: c["case"])
            entry["summary"] = summary(entry["cases"])
            entry["environment"] = environment()
            cases = entry["cases"]
    print_cases(cases, args.variant, f"the continuation loss, variant {args.variant} (tuning split; every case run "
                                     "so far)")


if __name__ == "__main__":
    main()
