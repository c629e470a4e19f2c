"""The expected flips as a smooth term of the refinement's loss: a study on the TUNING split, never a result.

    python bench/separatrix.py --variant refinement|polish|line-search [--cases 6,7,8] [--seeds 1,2,3,4]
    python bench/separatrix.py --variant polish --large-eval 16384   # the study (stop 36; bench/README.md)

A flip is a noise that lies between the teacher's boundary of two basins and the calibrated sampler's.  The fit's
loss counts the few flipped noises of its batch, and gives them no gradient that moves the boundary (inside a basin
the map is flat).  This term measures the boundary's displacement instead, on great circles of the noise:

    x(theta) = a cos(theta) + b sin(theta),   a, b ~ N(0, I),

whose every point is itself a unit Gaussian noise.  So the share of a circle that lies between the two boundaries
is an unbiased estimate of the flip rate: sum over the circle's crossings of |theta_student - theta_teacher| / 2 pi.
Each crossing of the teacher is found once per fit (``ANGLES`` points per circle, then ``BISECTIONS`` bisections of
the nearest-mean label of the teacher's end); its two sides end at e_A and e_B.  The student's crossing is the root
of g(theta) = (||end - e_B||^2 - ||end - e_A||^2) / ||e_A - e_B||^2, followed by one Newton step per loss call (a
bisection where that step fails), and its gradient is the implicit function's, -dg/dp / dg/dtheta, both
derivatives by autograd at the same point (the student's map is so steep at a boundary that a finite difference for
dg/dtheta, even over 1e-5 radians, steps across it: a first run of this study did so, and its gradients were
wrong by a factor of about 100, found by a finite-difference check of the whole term).  A flipped
noise costs about mean((e_A - e_B)^2) per element, so the refinement's loss becomes the expected mean square:

    loss = sqrt(MS on the refining batch + mean over circles of sum_k |dtheta_k| / 2 pi * mean((e_A - e_B)^2))

with no weight to tune.  Three variants change only the refinement (``calibration.REFINE``; the default's two candidates
are each refined, the better on the refinement's loss kept); the fits before it are the default's:
- ``refinement``: the refinement runs on this loss;
- ``polish``: the plain refinement, then ``POLISH["iterations"]`` more iterations on this loss at ``POLISH["lr"]``,
  keeping the iterate best on it (the plain refinement's result included);
- ``line-search``: the plain refinement, then ``line_search`` (steepest descent) on this loss.

Measured on ``flips.py``'s nine ``REFINE_CASES``, four fitting seeds, 2,048 evaluation noises, against the default
re-run with today's code (``results/refine_candidates_rerun_tuning.json``, "now"; stop 35 found that the stored
``refine_candidates_tuning.json`` is not reproduced exactly).  The term is zero where the circles cross no jump of
the teacher's end as large as ``flip_stats``' flip: none on tune-wide96 (its four cases; and with 30 bisections none
on tune-accuracy64 either, whose jumps at 20 turn out continuous), so there the fits are the default's by
construction (checked on tune-wide96: all 16 bit for bit), and the earlier rule's "better in at least 6 of 9 cases"
cannot be met.  The rule, fixed before the runs: adopt only at most 0.95x in geometric mean over the 36 fits,
better in at least 4 of the 5 cases where the term acts, no worse in the other four, and no more flips in total.

``--large-eval N`` measures each fit on N more evaluation noises (a stream of their own) and fits the default again
beside it.  On 2,048 noises a case at a flip rate near 0.1 % is decided by a few draws: the default's fit of
tune-sharp32 at NFE 10 from seed 2 has an RMS of 0.0026 there (no flip) and of 0.032 on 16,384 noises (14 flips).
For ``polish`` the rule above is applied to 16,384 noises (fixed before its run, after two scratch fits of
tune-sharp32 at NFE 10 with seeds 1-2: 1.00x and 0.71x there); the 2,048 figures are reported beside it.  The
term's own model calls (the circles' teacher and the student's runs on the crossings) are counted apart from the
fit's.  Results are merged into ``results/separatrix_tuning.json`` case by case, so parts can run side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment  # noqa: E402
import continuation  # noqa: E402  (the case loop, the results lock and the summary)
import flips  # noqa: E402
import heldout  # noqa: E402
from gmm import MixtureDenoiser  # noqa: E402

from ksampler.calibration import fit as fitting, solver  # noqa: E402

CIRCLES, ANGLES, BISECTIONS = 64, 64, 30
CIRCLE_SEED = 90_000  # + the fitting seed: apart from every fitting and evaluation stream of flips.py and heldout.py
WINDOW = math.pi / ANGLES  # a student's crossing further than this from the teacher's counts as this far, flat
LARGE_EVAL_SEED = 7_000  # + the family's seed: apart from heldout.py's streams (1000, 2000, 3000, 4000, 6000 + ...)
RESULTS_FILE = "separatrix_tuning.json"
BASELINE_FILE = "refine_candidates_rerun_tuning.json"
POLISH = {"iterations": 100, "lr": 0.002}
LINE_SEARCH = {"steps": 10, "sizes": (0.03, 0.01, 0.003, 0.001, 0.0003)}


class Crossings:
    """The teacher's crossings between basins on ``CIRCLES`` great circles of the noise."""

    def __init__(self, prob: heldout.Problem, seed: int, ms, s_max: float, t_min: float, teacher_steps: int):
        gen = torch.Generator().manual_seed(CIRCLE_SEED + seed)
        gmm = prob.gmm
        labels = torch.randint(0, gmm.n_classes, (CIRCLES,), generator=gen)
        a = torch.randn(CIRCLES, gmm.dim, generator=gen, dtype=torch.float64)
        b = torch.randn(CIRCLES, gmm.dim, generator=gen, dtype=torch.float64)
        self.ms, self.s_max, self.calls = ms, s_max, 0

        def teacher_end(lab, a_, b_, theta):
            model = heldout.Counting(MixtureDenoiser(gmm, lab, cfg=prob.cfg, model_sampling=ms))
            end = solver.teacher_solve(model, ms, self.start(a_, b_, theta), s_max, t_min, teacher_steps)
            self.calls += model.calls
            return end

        def basin(end):  # the nearest mean
            return torch.cdist(end, gmm.mu.to(end.dtype)).argmin(-1)
        grid = torch.arange(ANGLES, dtype=torch.float64) * (2 * math.pi / ANGLES)
        rep = lambda t: t.repeat_interleave(ANGLES, 0)  # noqa: E731
        ends = teacher_end(rep(labels), rep(a), rep(b), grid.repeat(CIRCLES))
        basins = basin(ends).reshape(CIRCLES, ANGLES)
        circle, j = torch.nonzero(basins != basins.roll(-1, 1), as_tuple=True)
        lo, hi = grid[j], grid[j] + 2 * math.pi / ANGLES
        lab, a, b, side = labels[circle], a[circle], b[circle], basins[circle, j]
        for _ in range(BISECTIONS):
            mid = (lo + hi) / 2
            same = basin(teacher_end(lab, a, b, mid)) == side
            lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
        e_a, e_b = teacher_end(lab, a, b, lo), teacher_end(lab, a, b, hi)
        cost = (e_a - e_b).pow(2).mean(-1)  # a flip's mean square per element
        jump = cost.sqrt() > heldout.FLIP_SHARE * prob.family.mean_scale * math.sqrt(2)  # flip_stats' flip
        self.e_a, self.e_b, self.cost, self.theta = e_a[jump], e_b[jump], cost[jump], ((lo + hi) / 2)[jump]
        self.a, self.b = a[jump], b[jump]
        self.model = heldout.Counting(MixtureDenoiser(gmm, lab[jump], cfg=prob.cfg, model_sampling=ms))
        self.count = len(self.theta)

    def start(self, a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        noise = a * torch.cos(theta)[:, None] + b * torch.sin(theta)[:, None]
        return self.ms.noise_scaling(torch.tensor(self.s_max, dtype=noise.dtype), noise, torch.zeros_like(noise),
                                     False)


class SeparatrixStudent(fitting._Student):
    """The refining batch's student, with the expected flips of its crossings in its loss."""

    @classmethod
    def around(cls, student: fitting._Student, crossings: Crossings) -> "SeparatrixStudent":
        """``student`` (its batch, teacher and ranges) with the flip term over ``crossings``."""
        made = cls.__new__(cls)
        made.__dict__.update(student.__dict__, crossings=crossings, root=None)
        return made

    def g(self, theta, sig, c, cc, shift) -> torch.Tensor:
        cr = self.crossings
        end = solver.solve(cr.model, cr.start(cr.a, cr.b, theta), sig, c, self.ms, {}, corrector=cc,
                           shift=shift)
        return ((end - cr.e_b).pow(2).sum(-1) - (end - cr.e_a).pow(2).sum(-1)) / (cr.e_a - cr.e_b).pow(2).sum(-1)

    def bisect(self, params) -> torch.Tensor:
        """The student's crossing in the teacher's window (NaN where g has no sign change there)."""
        cr = self.crossings
        lo, hi = cr.theta - WINDOW, cr.theta + WINDOW
        found = (self.g(lo, *params) > 0) & (self.g(hi, *params) < 0)
        for _ in range(BISECTIONS):
            mid = (lo + hi) / 2
            above = self.g(mid, *params) > 0
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return torch.where(found, (lo + hi) / 2, torch.full_like(lo, math.nan))

    def flip_term(self, params) -> torch.Tensor:
        cr = self.crossings
        if not cr.count:
            return torch.zeros((), dtype=torch.float64)
        if self.root is None:
            with torch.no_grad():
                self.root = self.bisect(params)
        theta = torch.where(torch.isnan(self.root), cr.theta, self.root).requires_grad_(True)
        with torch.enable_grad():  # dg/dtheta by autograd at the same point as dg/dparams: the ratio stays exact
            g_here = self.g(theta, *params)
            slope, = torch.autograd.grad(g_here.sum(), theta, retain_graph=torch.is_grad_enabled())
        if not torch.is_grad_enabled():
            g_here = g_here.detach()
        theta = theta.detach()
        good = (slope < 0) & ~torch.isnan(self.root)
        root = theta - g_here / torch.where(good, slope, -torch.ones_like(slope))  # one Newton step
        good &= ((root.detach() - cr.theta).abs() < WINDOW) & torch.isfinite(root.detach())
        if not bool(good.all()):
            with torch.no_grad():
                fallback = self.bisect(params)
            root = torch.where(good, root, fallback)
        shift = (root - cr.theta).abs()
        shift = torch.where(torch.isnan(shift), torch.full_like(shift, WINDOW), shift)
        self.root = root.detach()
        return (shift * cr.cost).sum() / (2 * math.pi * CIRCLES)

    def loss(self, u, form, delta, idx):
        params = self.parameters(u, form, delta)
        self.begin_solve()
        out = solver.solve(self.denoiser, self.x0, *params[:2], self.ms, {}, corrector=params[2],
                           shift=params[3])
        final = (out - self.teacher)[idx].reshape(-1, out[0].numel()).pow(2).mean()
        return (final + self.flip_term(params)).sqrt()


def _crossings_for(prob: heldout.Problem, seed: int, student: fitting._Student, extra: dict) -> Crossings:
    crossings = Crossings(prob, seed, student.ms, student.s_max, math.exp(student.log_eval_range[0]),
                          heldout.CALIBRATION["teacher_steps"])
    extra.update({"crossings": crossings.count, "circle_teacher_calls": crossings.calls, "_crossings": crossings})
    return crossings


@contextlib.contextmanager
def _counted(extra: dict):
    try:
        yield
    finally:
        crossings = extra.pop("_crossings", None)
        if crossings is not None:
            extra["crossing_student_calls"] = crossings.model.calls


@contextlib.contextmanager
def in_refinement(prob: heldout.Problem, seed: int, refine_noises: int, extra: dict):
    """``fit_calibration``'s students while inside: its refining set's (the second it builds) with the flip term,
    the fitting sets' plain.  The refining set's size checks that order; ``extra`` gets the term's costs."""
    plain, built = fitting._Student, []

    def build(*args, **kwargs):
        built.append(len(built) + 1)
        student = plain(*args, **kwargs)
        if (built[-1] == 2) != (student.x0.shape[0] == refine_noises):
            raise RuntimeError("separatrix: fit_calibration no longer builds its students in the order assumed")
        if built[-1] != 2:
            return student
        return SeparatrixStudent.around(student, _crossings_for(prob, seed, student, extra))
    fitting._Student = build
    try:
        with _counted(extra):
            yield
    finally:
        fitting._Student = plain


def line_search(student: SeparatrixStudent, best: tuple, form: tuple, calls: dict, steps: int) -> tuple:
    """Steepest descent on the refinement's loss with the flip term from ``best`` (an ``_optimise`` result), each
    step the best of ``LINE_SEARCH["sizes"]`` along the normalised gradient, until none lowers the loss or after
    ``LINE_SEARCH["steps"]`` steps; returns (loss, u, delta) as ``_optimise`` does."""
    _, u, delta = best
    keys = list(delta or {})
    unpack = lambda ps: (ps[0], None if delta is None else dict(zip(keys, ps[1:])))  # noqa: E731

    def objective(ps: list) -> torch.Tensor:
        u_, delta_ = unpack(ps)
        return student.loss(u_, form, delta_, slice(None))
    point = [u.detach().clone()] + [delta[k].detach().clone() for k in keys]
    student.root = None
    with torch.no_grad():
        current = float(objective(point))
    for _ in range(LINE_SEARCH["steps"]):
        leaves = [p.clone().requires_grad_(True) for p in point]
        with torch.enable_grad():
            grads = torch.autograd.grad(objective(leaves), leaves, allow_unused=True)
        calls["backward_passes"] += steps
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(point, grads)]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        if not norm > 0 or not math.isfinite(norm):
            break
        saved, trials = student.root, []
        for size in LINE_SEARCH["sizes"]:
            student.root = saved
            trial = [p - size * g / norm for p, g in zip(point, grads)]
            with torch.no_grad():
                value = float(objective(trial))
            trials.append((value if math.isfinite(value) else math.inf, trial, student.root))
        value, trial, root = min(trials, key=lambda t: t[0])
        if not value < current:
            student.root = saved
            break
        current, point, student.root = value, trial, root
    return (current, *unpack(point))


@contextlib.contextmanager
def after_refinement(prob: heldout.Problem, seed: int, refine_noises: int, extra: dict, search: bool = False):
    """``fit_calibration``'s refinements while inside: each goes on from its result on the refining set with the flip
    term, keeping the iterate best on that loss (its start included, so never worse on it than the plain
    refinement): by Adam (``POLISH``) or, with ``search``, by ``line_search``."""
    plain, state = fitting._optimise, {}

    def optimise(student, u, delta, form, iterations, lr, mode, fit_idx, sel_idx, calls, steps, penalty=0.0,
                 tick=None):
        best = plain(student, u, delta, form, iterations, lr, mode, fit_idx, sel_idx, calls, steps, penalty, tick)
        if student.x0.shape[0] != refine_noises:
            return best
        if "crossings" not in state:
            state["crossings"] = _crossings_for(prob, seed, student, extra)
        if not state["crossings"].count:  # no term: the default's refinement, as it is
            return best
        polishing = SeparatrixStudent.around(student, state["crossings"])
        if search:
            return line_search(polishing, best, form, calls, steps)
        return plain(polishing, *fitting._resumed(best), form, POLISH["iterations"], POLISH["lr"], mode,
                     fit_idx, sel_idx, calls, steps, penalty)
    fitting._optimise = optimise
    try:
        with _counted(extra):
            yield
    finally:
        fitting._optimise = plain


VARIANTS = {"refinement": in_refinement, "polish": after_refinement,
            "line-search": functools.partial(after_refinement, search=True)}


_LARGE: dict = {}


def measured(prob: heldout.Problem, cal, size: int) -> dict:
    """``continuation.evaluate``'s figures, and under "large" the same on ``size`` noises of their own stream."""
    key = (prob.name, size)
    if key not in _LARGE:
        _LARGE[key] = heldout.Problem(prob.family, prob.cfg, size, heldout.FIT_NOISES, eval_seed=LARGE_EVAL_SEED)
    return {**continuation.evaluate(prob, cal), "large": continuation.evaluate(_LARGE[key], cal)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=tuple(VARIANTS), required=True)
    continuation.add_case_arguments(ap)
    ap.add_argument("--large-eval", type=int, default=0, metavar="N",
                    help="also measure on N evaluation noises of a stream of their own (LARGE_EVAL_SEED), with the "
                         "default fitted again beside each fit")
    args = ap.parse_args()
    indices, seeds = continuation.cases_and_seeds(ap, args, "the re-run default")
    if args.large_eval < 0:
        ap.error("--large-eval: a number of evaluation noises (0: none)")
    with open(os.path.join(RESULTS, BASELINE_FILE)) as f:
        rerun = {(r["case"], r["seed"]): r["now"] for r in json.load(f)["rows"]}
    torch.set_num_threads(1)
    options = flips.STUDIES["refine_candidates"][0][continuation.BASELINE]
    for index in indices:
        if args.large_eval:  # the default is fitted again, to be measured on the large set too
            measure = functools.partial(measured, size=args.large_eval)
            default_for = lambda prob, nfe, seed: measure(prob, flips.fit(prob, nfe, seed, **options))  # noqa: E731
        else:
            measure, default_for = continuation.evaluate, lambda prob, nfe, seed: rerun[(index, seed)]  # noqa: E731
        case = continuation.fit_case(index, seeds, lambda msg: print(msg, file=sys.stderr, flush=True),
                                     VARIANTS[args.variant], default_for, measure)
        name = args.variant + (f" (large eval {args.large_eval})" if args.large_eval else "")
        with continuation.locked_results(RESULTS_FILE, f"{BASELINE_FILE}: the default re-run (stop 35)") as payload:
            entry = payload["variants"].setdefault(name, {
                "circles": CIRCLES, "angles": ANGLES, "bisections": BISECTIONS, "cases": [],
                **({"default": "fitted again beside each fit"} if args.large_eval else {}),
                **({"polish": POLISH} if args.variant == "polish" else {}),
                **({"line_search": LINE_SEARCH} if args.variant == "line-search" else {})})
            entry["cases"] = sorted([c for c in entry["cases"] if c["case"] != index] + [case],
                                    key=lambda c: c["case"])
            entry["summary"] = continuation.summary(entry["cases"])
            if args.large_eval:
                entry["summary_large"] = continuation.summary(entry["cases"], "large")
            entry["environment"] = environment()
            cases = entry["cases"]
    continuation.print_cases(cases, args.variant, f"the expected-flips term, variant {args.variant} (tuning split; "
                             "every case run so far)")
    if args.large_eval:
        print("on the large set:", continuation.summary(cases, "large"))


if __name__ == "__main__":
    main()
