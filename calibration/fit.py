"""``fit_calibration``: the schedule, coefficients, corrector and shifts fitted to one model against a teacher
(the package docstring has the method)."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..validation import KSamplerInputError, check_float, check_int
from .gradient import Gradient, RecomputedCallDiffers, gradient_mode, out_of_memory, recomputing, spsa_gradient
from .record import Calibration, check_info, model_sampling_record
from .solver import Denoiser, model_sigma, multistep_coefficients, solve, teacher_solve, ve_bounds


class _Adam:
    """Adam (Kingma & Ba 2015) with a cosine-annealed step size; torch.optim would import torch._dynamo (seconds)."""

    def __init__(self, params: list, lr: float, total: int, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.total, self.betas, self.eps = params, lr, total, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        lr = self.lr * 0.5 * (1 + math.cos(math.pi * min(self.t, self.total) / self.total))
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            m_hat = m / (1 - b1 ** self.t)
            v_hat = v / (1 - b2 ** self.t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))


def _schedule(u: Tensor, log_hi: float, log_lo: float) -> Tensor:
    """steps VE sigmas from a monotone parametrisation: softmax increments in log sigma (the last: a slack)."""
    inc = torch.softmax(u, 0) * (log_hi - log_lo)
    logs = log_hi - torch.cat([u.new_zeros(1), torch.cumsum(inc[:-1], 0)])
    return torch.cat([torch.exp(logs), u.new_zeros(1)])


def _initial_u(ve_init: Tensor, log_hi: float, log_lo: float) -> Tensor:
    logs = torch.log(ve_init[:-1])
    inc = torch.cat([logs[:-1] - logs[1:], (logs[-1] - log_lo).clamp_min(1e-3 * (log_hi - log_lo)).reshape(1)])
    return torch.log(inc.clamp_min(1e-6))


START_SCHEDULES = ("karras", "exponential", "simple", "normal", "beta", "kl_optimal")


def _init_schedules(ms, steps: int, hi: float, lo: float) -> dict:
    """Candidate starting schedules in VE sigmas (steps values, then 0): the registry's, over the model's range."""
    from ..schedulers import sampling_sigmas

    out = {}
    for name in START_SCHEDULES:
        sig = sampling_sigmas(ms, name, steps).double()
        sig = sig[sig > 0]
        if len(sig) != steps:  # schedulers that merge or add points
            continue
        ve = (sig / torch.tensor([float(ms.alpha(float(s))) for s in sig], dtype=torch.float64).clamp_min(1e-12))
        ve = ve.clamp(lo, hi)
        ve[0] = hi
        if steps > 1 and bool((ve[1:] >= ve[:-1]).any()):
            continue
        out[name] = torch.cat([ve, ve.new_zeros(1)])
    if not out:
        out["exponential"] = torch.cat([torch.exp(torch.linspace(math.log(hi), math.log(lo), steps,
                                                                 dtype=torch.float64)), torch.zeros(1)])
    return out


# defaults of a fit, chosen on the tuning split of bench/heldout.py (never on held-out problems)
DEFAULT_FIT = {"order": 3, "iterations": 600, "lr": 0.05, "teacher_steps": 100, "corrector": True, "shift": True,
               "selection": "all", "coefficient_penalty": 0.0, "fit_last_step": True}
SELECTIONS = ("all", "held_aside")  # which fitting noises pick the iterate a fit keeps (fit_calibration)

# the steps whose evaluation sigma the fit shifts: the first and the last (tuning split: python bench/flips.py
# --shift, 0.89x in geometric mean over its nine cases; the last alone, in scratch runs, 0.85x but no gain with
# guidance at NFE 5, where both ends gave 0.52x)
SHIFTED_STEPS = (0, -1)


def _shifted_steps(steps: int) -> list:
    """The indices of ``SHIFTED_STEPS`` in a ``steps``-step schedule (one step: the first is the last)."""
    return sorted({i % steps for i in SHIFTED_STEPS})


# the refinement on a larger noise set (refine_noise), chosen on the tuning split: python bench/flips.py --refine
REFINE = {"iterations": 150, "lr": 0.01}


CORRECTOR_STEP = 0.2  # the corrector's rows move at a fifth of the predictor's rate (tuning split: steadier fits)


class _Student:
    """The calibrated sampler as a function of its parameters, run on the fitting batch against the teacher."""

    def __init__(self, denoiser: Denoiser, ms, x0: Tensor, teacher: Tensor, s_max: float, hi: float, lo: float,
                 order: int, t_min: float, solve_start: Optional[Callable[[], None]] = None):
        self.denoiser, self.ms, self.x0, self.teacher, self.s_max = denoiser, ms, x0, teacher, s_max
        self.solve_start = solve_start
        self.log_hi, self.log_lo, self.order = math.log(hi), math.log(lo), order
        self.log_eval_range = (math.log(t_min), math.log(s_max))  # where the model may be called

    def begin_solve(self) -> None:
        """Before each pass through the model: the host resets what its model keeps from call to call."""
        if self.solve_start is not None:
            self.solve_start()

    def parameters(self, u: Tensor, form: tuple, delta: Optional[dict]) -> tuple:
        """(model sigmas, coefficients, corrector or None, shift or None) of the calibrated sampler.

        form: the base orders (predictor, corrector); corrector None: none, 0: a no-op to start from (all weight
        on the predictor's estimates, none on the new one).  delta: corrections to the rows of each ("predictor",
        "corrector") and the free evaluation shifts ("shift": one per ``SHIFTED_STEPS``), each where fitted."""
        ve = _schedule(u, self.log_hi, self.log_lo)
        sig = torch.cat([model_sigma(self.ms, ve[:-1]), ve[-1:]])
        sig = torch.cat([sig.new_full((1,), self.s_max), sig[1:]])  # the start is fixed (the noise is scaled to it)
        c = multistep_coefficients(ve, form[0], self.order)
        cc = None
        if form[1] is not None:
            cc = multistep_coefficients(ve, form[1], self.order + 1, corrector=True) if form[1] else \
                torch.cat([c.new_zeros(len(c), 1), c], 1)
        delta = delta or {}
        if "predictor" in delta:  # rows past the fitted ones (the last, unless fitted) keep the Adams weights
            rows = delta["predictor"]
            rows = torch.cat([rows, rows.new_zeros(len(c) - len(rows), rows.shape[1])])
            c = c + torch.cat([-rows.sum(1, keepdim=True), rows], 1)
        if cc is not None and "corrector" in delta:
            cc = cc + CORRECTOR_STEP * torch.cat([-delta["corrector"].sum(1, keepdim=True), delta["corrector"]], 1)
        return sig, c, cc, None if "shift" not in delta else self._shift(sig, delta["shift"])

    def _shift(self, sig: Tensor, free: Tensor) -> Tensor:
        """The shifts of every step: ``free`` at ``SHIFTED_STEPS``, else 0, kept where the model may be called
        (the bound passes the gradient on as if it were not there, so that a shift held at it can come back)."""
        log_sig = torch.log(sig[:-1])
        placed = torch.zeros_like(log_sig).index_put((torch.tensor(_shifted_steps(len(log_sig))),), free)
        lo, hi = self.log_eval_range
        bounded = torch.minimum(torch.maximum(placed, lo - log_sig), hi - log_sig)
        return placed + (bounded - placed).detach()

    def loss(self, u: Tensor, form: tuple, delta: Optional[dict], idx, recompute: bool = False) -> Tensor:
        """RMS gap to the teacher's final samples over the items ``idx`` (``recompute``: each model call run again
        in the backward pass instead of kept, ``gradient._Recomputed``)."""
        sig, c, cc, shift = self.parameters(u, form, delta)
        self.begin_solve()
        denoiser = recomputing(self.denoiser) if recompute else self.denoiser
        return _rms_gap(solve(denoiser, self.x0, sig, c, self.ms, {}, corrector=cc, shift=shift)[idx],
                        self.teacher[idx])


def _rms_gap(out: Tensor, target: Tensor) -> Tensor:
    """RMS of ``out - target`` over all items and elements."""
    return (out - target).reshape(out.shape[0], -1).pow(2).mean().sqrt()


def _starts(student: _Student, ms, steps: int, hi: float, lo: float, idx, corrector: bool) -> list:
    """The best start of each form, as (loss, schedule name, form, u): the registry's schedules under order-1..3
    Adams-Bashforth weights; with ``corrector``, also the best corrected start: each of those with a no-op
    corrector (the same samples, so its loss is not re-measured) or an Adams-Moulton corrector one order higher."""
    plain, corrected = [], []
    for name, ve in _init_schedules(ms, steps, hi, lo).items():
        u0 = _initial_u(ve, student.log_hi, student.log_lo)
        for base_order in range(1, min(student.order, 3) + 1):
            forms = [(base_order, None)] + ([(base_order, base_order + 1)] if corrector else [])
            for form in forms:
                with torch.no_grad():
                    value = float(student.loss(u0, form, None, idx))
                if not math.isfinite(value):
                    continue
                if form[1] is None:
                    plain.append((value, name, form, u0))
                    if corrector:
                        corrected.append((value, name, (base_order, 0), u0))
                else:
                    corrected.append((value, name, form, u0))
    if not plain and not corrected:
        raise FloatingPointError("calibration: every starting schedule diverged on the fitting noise; check the model")
    return [min(found, key=lambda t: t[0]) for found in (plain, corrected) if found]


def _run(start: tuple, steps: int, order: int, fit_coefficients: bool, fit_shift: bool,
         fit_last_step: bool = True) -> dict:
    """A start and its zero corrections (and shifts) to fit; the predictor's last row only if ``fit_last_step``."""
    loss, name, form, u0 = start
    shapes = {}
    if fit_coefficients:
        shapes["predictor"] = (steps if fit_last_step else steps - 1, order - 1)
        if form[1] is not None:
            shapes["corrector"] = (steps, order)
    if fit_shift:
        shapes["shift"] = (len(_shifted_steps(steps)),)
    delta = {k: torch.zeros(shape, dtype=torch.float64, requires_grad=True) for k, shape in shapes.items()}
    return {"start": loss, "form": form, "u": u0.clone().requires_grad_(True), "delta": delta or None,
            "name": f"{name}+ab{form[0]}" + ("" if form[1] is None else f"+am{form[1]}" if form[1] else "+corrector")}


def _penalised(loss: Tensor, delta: Optional[dict], penalty: float) -> Tensor:
    """``loss`` * (1 + ``penalty`` * the mean square of the coefficient corrections): the corrections shrink to the
    Adams weights unless they pay more than that share of the loss (the shifts are not penalised)."""
    rows = [d.reshape(-1) for k, d in (delta or {}).items() if k != "shift"]
    if not penalty or not rows:
        return loss
    return loss * (1 + penalty * torch.cat(rows).pow(2).mean())


def _optimise(student: _Student, u: Tensor, delta: Optional[dict], form: tuple, iterations: int, lr: float,
              mode: "Gradient", fit_idx, sel_idx, calls: dict, steps: int, penalty: float = 0.0,
              tick: Optional[Callable[[], None]] = None, record: Optional[dict] = None) -> tuple:
    """Adam on (u, delta) with the gradient from the items ``fit_idx`` (of the loss ``_penalised`` by ``penalty``);
    returns (loss, u, delta) of the iterate with the lowest plain loss on the items ``sel_idx``, checked every 10
    iterations (the start included; its loss goes to ``record["start_selected"]``).  ``tick()`` is called before
    each iteration."""
    params = [u] + list((delta or {}).values())

    def snapshot(loss: float) -> tuple:
        return loss, u.detach().clone(), None if delta is None else {k: d.detach().clone() for k, d in delta.items()}

    opt = _Adam(params, lr, max(iterations, 1))
    with torch.no_grad():
        best = snapshot(float(student.loss(u, form, delta, sel_idx)))
    if record is not None:
        record["start_selected"] = best[0]
    gen = torch.Generator().manual_seed(0)
    for it in range(iterations):
        if tick is not None:
            tick()
        for p in params:
            p.grad = None
        if mode.name == "autograd":
            try:
                with torch.enable_grad():
                    loss = _penalised(student.loss(u, form, delta, fit_idx, mode.recompute), delta, penalty)
                    if not torch.isfinite(loss):
                        break
                    loss.backward()
            except RuntimeError as exc:
                if isinstance(exc, RecomputedCallDiffers):
                    mode.cannot_recompute(exc)
                elif out_of_memory(exc):
                    mode.ran_out_of_memory(exc, student.x0.shape[0])
                else:
                    raise
                continue
            calls["backward_passes"] += steps
        elif not spsa_gradient(params, lambda: _penalised(student.loss(u, form, delta, fit_idx), delta, penalty),
                               it, gen):
            continue  # a perturbation left the stable region: skip this iteration
        opt.step()
        if it % 10 == 9 or it == iterations - 1:
            with torch.no_grad():
                sel = float(student.loss(u, form, delta, sel_idx))
            if math.isfinite(sel) and sel < best[0]:
                best = snapshot(sel)
    return best


def _race(student: _Student, runs: list, race: int, iterations: int, lr: float, mode: "Gradient", items: tuple,
          calls: dict, steps: int, say, penalty: float = 0.0, tick: Optional[Callable[[], None]] = None) -> dict:
    """Fit each run (a form's start) for ``race`` iterations, then the best on the items ``items[1]`` for the rest
    (all ``iterations`` for a single run); returns that run with its result under "best"."""
    fit_idx, sel_idx = items
    for run in runs:
        say(f"calibration: fitting {steps} steps (order {student.order}) from {run['name']} by {mode}"
            + (f" ({race} iterations, then the better of the two forms goes on)" if race else "")
            + f"; start RMS to the teacher on the gradient's noises {run['start']:.4g}")
        run["best"] = _optimise(student, run["u"], run["delta"], run["form"], race or iterations, lr, mode, fit_idx,
                                sel_idx, calls, steps, penalty, tick, record=run)
    won = min(runs, key=lambda r: r["best"][0])
    if race:
        say(f"calibration: {won['name']} leads (RMS {won['best'][0]:.4g} against "
            f"{max(r['best'][0] for r in runs):.4g}); {iterations - race} more iterations")
        won["best"] = _optimise(student, *_resumed(won["best"]), won["form"], iterations - race, lr, mode, fit_idx,
                                sel_idx, calls, steps, penalty, tick)
    return won


def _resumed(best: tuple) -> tuple:
    """(u, delta) of an ``_optimise`` result as fresh leaves to optimise on from."""
    _, u, delta = best
    return u.clone().requires_grad_(True), \
        None if delta is None else {k: d.clone().requires_grad_(True) for k, d in delta.items()}


def _check_noise(name: str, noise) -> None:
    if not isinstance(noise, Tensor) or noise.ndim < 2 or noise.shape[0] < 4:
        raise ValueError(f"{name}: expected a tensor [B, ...] with at least 4 fitting noises")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError(f"{name}: contains NaN or Inf")


# the most steps a calibration fits: the Calibrated Scheduler node's declared max (each step is a model call per
# fitting noise per iteration, forward and backward)
MAX_CALIBRATION_STEPS = 100


def check_callables(**given) -> None:
    """A TypeError naming each given argument that is neither None nor callable."""
    for name, value in given.items():
        if value is not None and not callable(value):
            raise TypeError(f"{name}: expected a function (or None), got {type(value).__name__} {value!r}")


def _check_fit_args(noise, steps, order, refine_noise=None) -> None:
    check_int("steps", steps, 1, MAX_CALIBRATION_STEPS)
    check_int("order", order, 1, 4)
    _check_noise("noise", noise)
    if refine_noise is not None:
        _check_noise("refine_noise", refine_noise)
        if refine_noise.shape[1:] != noise.shape[1:]:
            raise ValueError(f"refine_noise: items shaped {tuple(refine_noise.shape[1:])}, but the fitting noise's are "
                             f"{tuple(noise.shape[1:])}; draw both for the same latent")
        if (refine_noise.dtype, refine_noise.device) != (noise.dtype, noise.device):
            raise ValueError(f"refine_noise: {refine_noise.dtype} on {refine_noise.device}, but the fitting noise is "
                             f"{noise.dtype} on {noise.device}; give both the same dtype and device")


def _fit_range(ms, sigma_min, sigma_max, teacher_sigma_min) -> tuple[float, float, float]:
    """(sigma_max, sigma_min, the teacher's sigma_min) of a fit, defaults from the model, checked."""
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("teacher_sigma_min", teacher_sigma_min)):
        if value is not None:  # a number, or a one-value tensor (the model sampling's own)
            check_float(name, value.item() if isinstance(value, Tensor) and value.numel() == 1 else value, 0.0,
                        math.inf)
    s_max = float(ms.sigma_max if sigma_max is None else sigma_max)
    s_min = float(ms.sigma_min if sigma_min is None else sigma_min)
    if not 0 < s_min < s_max:
        raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {s_min}, {s_max}")
    t_min = s_min if teacher_sigma_min is None else float(teacher_sigma_min)
    if not 0 < t_min <= s_min:
        raise ValueError(f"teacher_sigma_min: must be in (0, sigma_min={s_min}], got {teacher_sigma_min}")
    return s_max, s_min, t_min


def _descending_float32(sig: Tensor) -> Tensor:
    """The fitted sigmas in float32, nudged up where rounding would make them not strictly descending."""
    sig32 = sig.detach().to(torch.float32)
    for k in range(len(sig32) - 2, -1, -1):
        if sig32[k] <= sig32[k + 1]:
            sig32[k] = torch.nextafter(sig32[k + 1], torch.tensor(math.inf))
    return sig32


def fit_calibration(denoiser: Denoiser, model_sampling, noise: Tensor, steps: int, *, order: int = 3,
                    iterations: int = DEFAULT_FIT["iterations"], lr: float = DEFAULT_FIT["lr"],
                    fit_coefficients: bool = True, corrector: bool = DEFAULT_FIT["corrector"],
                    shift: bool = DEFAULT_FIT["shift"],
                    teacher_steps: int = DEFAULT_FIT["teacher_steps"], selection: str = DEFAULT_FIT["selection"],
                    coefficient_penalty: float = DEFAULT_FIT["coefficient_penalty"],
                    fit_last_step: bool = DEFAULT_FIT["fit_last_step"],
                    sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                    teacher_sigma_min: Optional[float] = None, max_denoise: bool = True, gradient: str = "auto",
                    refine_noise: Optional[Tensor] = None, refine_denoiser: Optional[Denoiser] = None,
                    refine_iterations: int = REFINE["iterations"], candidate_noise: Sequence[Tensor] = (),
                    candidate_denoisers: Optional[Sequence[Denoiser]] = None, refine_candidates: bool = False,
                    log: Optional[Callable[[str], None]] = None, info: Optional[dict] = None,
                    progress: Optional[Callable[[int, int], None]] = None,
                    solve_start: Optional[Callable[[], None]] = None,
                    on_spsa: Optional[Callable[[], None]] = None) -> Calibration:
    """Fit a step schedule (and multistep coefficients) to ``denoiser`` on ``noise`` (see ``ksampler.calibration``).

    denoiser: ``denoiser(x, sigma) -> denoised`` in the model's frame, guidance included (a CFG-guided
        denoiser fits to guided sampling); it must be differentiable in x for the coefficient fit.
    noise: unit-variance fitting noise [B, ...] (B >= 4; 8-64 is typical); never the noise you evaluate on.
    order: how many past denoised estimates each step may blend (1: schedule only, DDIM steps).
    corrector: also try a corrector (each model call corrects the step that led to it, as in UniPC, at no extra
        call), started from a no-op or from Adams-Moulton weights, whichever is better on the fitting noise; the
        forms with and without race for a third of the iterations, and the better one gets the rest (so a fit
        costs 4/3 of ``iterations``).
    shift: also fit the sigma at which the model is called in the steps ``SHIFTED_STEPS`` (the first, with no
        earlier estimate to blend, and the last, down to sigma 0), their states staying where they are (as in the
        time-shift sampler of Li et al. 2024), within [teacher_sigma_min, sigma_max].
    sigma_min, sigma_max: the range the schedule spans (default: the model's).
    teacher_sigma_min: where the teacher's fine solve stops and denoises (default sigma_min); lower it for a model
        that is valid below its sigma_min (an analytic one), so that the fit also learns the last stretch to 0.
    max_denoise: the start is scaled like ComfyUI's txt2img (sqrt(1 + sigma^2) for eps models); False: sigma.
    gradient: "autograd" (through the model), "recompute" (autograd keeping one model call's activations at a
        time: each call runs again in the backward pass, one more model call per step), "spsa" (derivative-free:
        two evaluations per iteration, for a model that gives no gradient) or "auto" (autograd when the model gives
        one, recomputing where keeping every call runs out of memory, else SPSA; it says which).
    refine_noise: more fitting noise [B', ...] (B' several times B; never the evaluation noise): the fit then
        continues on it (``REFINE``: its own teacher solve, then ``REFINE["iterations"]`` iterations at a smaller
        step size), keeping the iterate best on it, the unrefined one included.
    refine_denoiser: the denoiser for ``refine_noise``'s batch where it differs from ``denoiser`` (one bound to
        its batch, such as per-item labels); default ``denoiser``.
    refine_iterations: the refinement's iterations (default ``REFINE["iterations"]``).
    candidate_noise: more fitting sets, each shaped like ``noise`` (needs ``refine_noise``): each is fitted as
        ``noise`` is, and the fit with the lowest RMS on the refining noise is the one refined.  Fits from
        different fitting noise can end in different local optima; the larger set tells them apart.
    candidate_denoisers: the denoiser of each candidate set where it differs from ``denoiser``.
    refine_candidates: refine every candidate fit and keep the one best on the refining noise after its
        refinement (each candidate then costs a refinement too).
    selection: which noises pick the iterate kept (of each phase, and the form that wins the race): "all" the
        fitting noises, or "held_aside": only the quarter that the gradient never sees.
    coefficient_penalty: shrinks the coefficient corrections towards the Adams weights (``_penalised``; 0: none).
    fit_last_step: False keeps the step into sigma 0 on the newest estimate alone (its call may still shift), so
        that it does not extrapolate the denoised estimate to sigma 0.
    progress: ``progress(done, total)`` before each optimiser iteration, counted over the whole fit (candidates
        and refinements included): for a progress bar, or to stop the fit by raising (the host's interrupt).
    solve_start: called before each solve from the start noise through the model (the teacher's, and each run of
        the fitted sampler): for a model that keeps state from call to call within a sample, to reset it as a new
        sample would (ComfyUI's hook keyframes step on as the sigmas fall).
    on_spsa: called once where the fit turns to SPSA (from the start or mid-fit): to free what was set up for a
        gradient (ComfyUI: the copies of the model's weights).
    """
    _check_fit_args(noise, steps, order, refine_noise)
    check_int("iterations", iterations, 0, 100_000)
    check_int("teacher_steps", teacher_steps, 10, 10_000)  # fewer than 10 is no fine solve
    lr = check_float("lr", lr, 0.0, math.inf)
    check_callables(denoiser=denoiser, refine_denoiser=refine_denoiser, log=log, progress=progress,
                    solve_start=solve_start)
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info: expected a dict (or None), got {type(info).__name__}")
    try:  # what the fit keeps of it must pass the calibration's checks: found now, not after the fit
        check_info(info or {}, None, None, None)
    except ValueError as exc:
        raise KSamplerInputError(f"info: {str(exc).replace('calibration: ', '', 1)}") from None
    candidate_noise = list(candidate_noise)
    for i, extra in enumerate(candidate_noise):
        _check_noise(f"candidate_noise[{i}]", extra)
        if (extra.shape, extra.dtype, extra.device) != (noise.shape, noise.dtype, noise.device):
            raise ValueError(f"candidate_noise[{i}]: must be shaped like the fitting noise {tuple(noise.shape)} "
                             f"({noise.dtype} on {noise.device}), got {tuple(extra.shape)} ({extra.dtype} on "
                             f"{extra.device})")
    if candidate_noise and refine_noise is None:
        raise ValueError("candidate_noise: the candidates are told apart on the refining noise; pass refine_noise")
    if candidate_denoisers is not None and len(candidate_denoisers) != len(candidate_noise):
        raise ValueError(f"candidate_denoisers: one per candidate_noise set ({len(candidate_noise)}), got "
                         f"{len(candidate_denoisers)}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection: must be one of {', '.join(map(repr, SELECTIONS))}, got {selection!r}")
    coefficient_penalty = check_float("coefficient_penalty", coefficient_penalty, 0.0, math.inf)
    refine_iterations = check_int("refine_iterations", refine_iterations, 0, 100_000)
    ms, say, t_start = model_sampling, log or (lambda msg: None), time.perf_counter()
    calls = {"forward": 0, "backward_passes": 0}
    fits_planned = 1 + len(candidate_noise)
    refinements = 0 if refine_noise is None else (fits_planned if refine_candidates and fits_planned > 1 else 1)
    plan = {"done": 0, "total": None}

    def tick() -> None:
        plan["done"] += 1
        if progress is not None:
            progress(plan["done"], max(plan["total"], plan["done"]))

    def counting(model: Denoiser) -> Denoiser:
        def counted(x, sigma, **kw):
            calls["forward"] += 1
            return model(x, sigma, **kw)
        return counted

    s_max, s_min, t_min = _fit_range(ms, sigma_min, sigma_max, teacher_sigma_min)
    hi, lo = ve_bounds(ms, s_max, s_min)

    def student_on(model: Denoiser, batch: Tensor) -> _Student:
        x0 = ms.noise_scaling(torch.tensor(s_max, dtype=batch.dtype), batch, torch.zeros_like(batch), max_denoise)
        if solve_start is not None:
            solve_start()
        teacher = teacher_solve(model, ms, x0, s_max, t_min, teacher_steps).to(batch.dtype)
        return _Student(model, ms, x0, teacher, s_max, hi, lo, order, t_min, solve_start)

    def gradient_items(batch: Tensor) -> slice:  # the gradient's items: all but the first quarter
        return slice(max(1, batch.shape[0] // 4), None)

    def selection_items(batch: Tensor) -> slice:  # the items that pick the iterate
        return slice(None) if selection == "all" else slice(0, max(1, batch.shape[0] // 4))

    fit_idx, mode = gradient_items(noise), None

    def fit_on(model: Denoiser, batch: Tensor) -> tuple[_Student, dict, int]:
        nonlocal mode
        student = student_on(counting(model), batch)
        runs = [_run(start, steps, order, order > 1 and fit_coefficients, shift, fit_last_step)
                for start in _starts(student, ms, steps, hi, lo, fit_idx, corrector)]
        if mode is None:
            mode = Gradient(*gradient_mode(gradient, student, runs[0]["u"], runs[0]["form"], runs[0]["delta"],
                                           fit_idx, s_min, say), say, on_spsa)
        race = iterations // 3 if len(runs) > 1 else 0
        if plan["total"] is None:  # the later fits are planned alike (their forms' count may differ by one)
            per_fit = len(runs) * (race or iterations) + (iterations - race if race else 0)
            plan["total"] = fits_planned * per_fit + refinements * refine_iterations
        return student, _race(student, runs, race, iterations, lr, mode, (fit_idx, selection_items(batch)), calls,
                               steps, say, coefficient_penalty, tick), race

    student, won, race = fit_on(denoiser, noise)
    final, u, delta = won["best"]  # its loss is already measured on the selection's noises
    refined = candidate_rms = None
    if refine_noise is not None:
        larger = student_on(counting(refine_denoiser or denoiser), refine_noise)

        def refine(fitted: dict) -> tuple:
            say(f"calibration: refining on {refine_noise.shape[0]} more noises ({refine_iterations} iterations)")
            return _optimise(larger, *_resumed(fitted["best"]), fitted["form"], refine_iterations, REFINE["lr"],
                             mode, gradient_items(refine_noise), selection_items(refine_noise), calls, steps,
                             coefficient_penalty, tick)
        fits = [(student, won, race)] + [fit_on(model, batch) for model, batch in
                                         zip(candidate_denoisers or [denoiser] * len(candidate_noise),
                                             candidate_noise)]
        pick, results = 0, None
        if len(fits) > 1:
            if refine_candidates:
                results = [refine(w) for _, w, _ in fits]
                candidate_rms = [r[0] for r in results]
            else:
                with torch.no_grad():
                    candidate_rms = [float(larger.loss(w["best"][1], w["form"], w["best"][2],
                                                       selection_items(refine_noise))) for _, w, _ in fits]
            pick = min(range(len(fits)), key=lambda i: (not math.isfinite(candidate_rms[i]), candidate_rms[i]))
            say(f"calibration: {len(fits)} fits from different fitting noise; on the refining noise their RMS is "
                + ", ".join(f"{v:.4g}" for v in candidate_rms) + f"{' refined' if refine_candidates else ''}; "
                f"fit {pick + 1} " + ("is kept" if refine_candidates else "goes on"))
        student, won, race = fits[pick]
        final = won["best"][0]
        refined = results[pick] if results is not None else refine(won)
        _, u, delta = refined
    with torch.no_grad():
        sig, c, cc, shifts = student.parameters(u, won["form"], delta)
    shifts = None if shifts is None or not bool(shifts.any()) else shifts.detach().to(torch.float64)
    seconds = time.perf_counter() - t_start
    meta = dict(info or {})
    meta.update({"steps": steps, "order": order, "init": won["name"], "corrector": cc is not None, "race": race,
                 "fit_coefficients": "predictor" in (won["delta"] or {}), "shift": shifts is not None,
                 "iterations": iterations, "lr": lr, "selection": selection,
                 "coefficient_penalty": coefficient_penalty, "fit_last_step": bool(fit_last_step),
                 "teacher_steps": teacher_steps, "teacher_sigma_min": t_min, "fit_noises": int(noise.shape[0]),
                 "gradient": "autograd, then spsa" if mode.ran_out else mode.name, "recompute": mode.recompute,
                 "model_calls": calls["forward"], "backward_passes": calls["backward_passes"],
                 "seconds": round(seconds, 3), "rms_start": won["start_selected"], "rms_fitted": final,
                 "sigma_min": s_min, "sigma_max": s_max, "model_sampling": model_sampling_record(ms)})
    if candidate_rms is not None:
        meta.update({"candidates": len(candidate_rms), "candidate_rms": candidate_rms,
                     "refine_candidates": bool(refine_candidates)})
    if refined is not None:
        meta.update({"refine_noises": int(refine_noise.shape[0]), "refine_iterations": refine_iterations,
                     "refine_lr": REFINE["lr"], "rms_refined": refined[0]})
    say(f"calibration: done in {seconds:.1f}s, {calls['forward']} model calls + {calls['backward_passes']} "
        f"backward passes; RMS to the teacher {won['start_selected']:.4g} -> {final:.4g}"
        + ("" if refined is None else f" (on the {refine_noise.shape[0]} refining noises: {refined[0]:.4g})"))
    cal = Calibration(_descending_float32(sig), c.detach().to(torch.float64), meta,
                      None if cc is None else cc.detach().to(torch.float64), shifts)
    cal.validate()
    return cal
