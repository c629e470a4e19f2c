"""Accuracy per model call: every sampler x every scheduler at NFE 5, 10, 20, 50, ours and stock k-diffusion's.

Data: an analytic Gaussian mixture (bench/gmm.py: 64 dimensions, 8 components,
4 classes), sampled under classifier-free guidance (scale 3) with the exact
conditional and unconditional denoisers, on SD1.5's discrete eps schedule
(sigma 0.0292 .. 14.61).

Deterministic samplers: RMS error of the final samples against the PF-ODE
solution from the same starting point x_T = sigma_0 * noise (512 noises),
solved in float64 with RK4 in log sigma and then in sigma down to 0; the
solver's convergence is checked by halving its step.  NFE = model calls,
counted by a wrapper: for each sampler and schedule we take the largest step
count whose counted calls fit the budget (so heun gets (NFE + 1) / 2 steps,
dpm_2 likewise, uni_pc NFE steps), and report the calls actually made.
dpm_adaptive picks its own steps: it runs over a sweep of tolerances and each
run counts at the smallest budget its calls fit.

Stochastic samplers: the conditional model without guidance (its exact
distribution is known), started from the exact noisy marginal; the distance is
the NLL gap (mean -log p of the samples under the true density minus that of
fresh exact samples; negative = under-dispersed, piled on the modes), which
ranks them, with the unbiased MMD^2 (Gaussian kernel, median bandwidth) beside
it.  The "floor" row gives both for exact samples (their noise level).

The ``gits_fit`` schedule is ours, fitted with ``gits_schedule`` on the same
problem class but on different noise (128 noises, seed 99; its sigma_data is
chosen per sampler and NFE by the error on those fitting noises).

Usage: python bench/accuracy.py [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from functools import lru_cache

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, require_ksampler, table, write_json  # noqa: E402
from gmm import GaussianMixture, MixtureDenoiser, reference_solve  # noqa: E402

require_ksampler()
from ksampler.models import EPS  # noqa: E402
from ksampler.samplers import SAMPLERS, sampler_traits  # noqa: E402
from ksampler.samplers.noise import (BrownianPathNoiseSampler, BrownianTreeNoiseSampler,  # noqa: E402
                                     default_noise_sampler)
from ksampler.schedulers import SCHEDULERS, sampling_sigmas  # noqa: E402
from ksampler.schedulers.gits import gits_schedule  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import k_diffusion.sampling as K  # noqa: E402
# torchsde warns when a query lands a float32 ulp outside the tree's span (k-diffusion and ComfyUI do that alike)
warnings.filterwarnings("ignore", message="Should have t")

BUDGETS = (5, 10, 20, 50)
CFG = 3.0
MS = EPS()
SIGMA_MIN, SIGMA_MAX = float(MS.sigma_min), float(MS.sigma_max)
GITS_SIGMA_DATA = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)
ADAPTIVE_RTOL = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
REF_STEPS = (500, 50)


def problem() -> GaussianMixture:
    return GaussianMixture(dim=64, components=8, n_classes=4, seed=0, mean_scale=0.6, std_range=(0.4, 0.8),
                           dtype=torch.float32)


class Counting:
    """Counts model calls (a batched call is one call)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.model_sampling = getattr(inner, "model_sampling", None)
        if hasattr(inner, "denoise_with_uncond"):
            self.denoise_with_uncond = self._dwu

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.inner(x, sigma, **kw)

    def _dwu(self, x, sigma, **kw):
        self.calls += 1
        return self.inner.denoise_with_uncond(x, sigma, **kw)


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.gmm = problem()
        n_eval = 128 if quick else 512
        gen = torch.Generator().manual_seed(1)
        self.labels = torch.randint(0, 4, (n_eval,), generator=gen)
        self.noise = torch.randn(n_eval, 64, generator=gen)
        self.model = MixtureDenoiser(self.gmm, self.labels, cfg=CFG, model_sampling=MS)
        fit_gen = torch.Generator().manual_seed(99)
        self.fit_labels = torch.randint(0, 4, (128,), generator=fit_gen)
        self.fit_noise = torch.randn(128, 64, generator=fit_gen)
        self.fit_model = MixtureDenoiser(self.gmm, self.fit_labels, cfg=CFG, model_sampling=MS)
        self.refs, self.fit_refs = {}, {}
        self.ref_seconds = 0.0
        self.fit_calls = 0

    # ---- references ----------------------------------------------------------------------------
    def reference(self, sigma0: float, fit: bool = False) -> torch.Tensor:
        cache = self.fit_refs if fit else self.refs
        key = round(sigma0, 6)
        if key not in cache:
            t = time.perf_counter()
            model, noise = (self.fit_model, self.fit_noise) if fit else (self.model, self.noise)
            cache[key] = reference_solve(model.slope, noise.double() * float(torch.tensor(sigma0).float()), sigma0,
                                         *REF_STEPS)
            self.ref_seconds += time.perf_counter() - t
        return cache[key]

    def convergence(self) -> dict:
        """How far the reference is from one solved with twice the steps (RMS), and the sigma_min floor."""
        coarse = self.reference(SIGMA_MAX)
        fine = reference_solve(self.model.slope, self.noise.double() * SIGMA_MAX, SIGMA_MAX,
                               REF_STEPS[0] * 2, REF_STEPS[1] * 2)
        at_min = reference_solve(self.model.slope, self.noise.double() * SIGMA_MAX, SIGMA_MAX, REF_STEPS[0] * 2,
                                 sigma_end=SIGMA_MIN)
        last = self.model(at_min.float(), torch.full((len(at_min),), SIGMA_MIN)).double()
        return {"reference_vs_2x_steps_rms": float((coarse - fine).pow(2).mean().sqrt()),
                "floor_exact_to_sigma_min_then_denoise_rms": float((last - fine).pow(2).mean().sqrt()),
                "data_rms": float(fine.pow(2).mean().sqrt())}

    # ---- schedules -----------------------------------------------------------------------------
    @lru_cache(maxsize=None)
    def gits_fit(self, steps: int, sigma_data: float) -> torch.Tensor:
        counting = Counting(self.fit_model)
        sig = gits_schedule(counting, MS, self.fit_noise, steps, n_fine=100, sigma_data=sigma_data)
        self.fit_calls += counting.calls
        return sig

    def ours_sigmas(self, scheduler: str, steps: int, discard: bool, sigma_data: float = 1.0) -> torch.Tensor:
        if scheduler == "gits_fit":
            sig = self.gits_fit(steps + 1 if discard else steps, sigma_data)
            return torch.cat([sig[:-2], sig[-1:]]) if discard else sig
        return sampling_sigmas(MS, scheduler, steps, discard_penultimate_sigma=discard)

    @staticmethod
    def kd_sigmas(scheduler: str, steps: int) -> torch.Tensor:
        if scheduler == "karras":
            return K.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)
        if scheduler == "exponential":
            return K.get_sigmas_exponential(steps, SIGMA_MIN, SIGMA_MAX)
        if scheduler == "polyexponential(rho=2)":
            return K.get_sigmas_polyexponential(steps, SIGMA_MIN, SIGMA_MAX, rho=2.0)
        if scheduler == "vp":
            return K.get_sigmas_vp(steps)
        raise KeyError(scheduler)

    # ---- running -------------------------------------------------------------------------------
    def error(self, out: torch.Tensor, sigma0: float, fit: bool = False) -> float:
        if not bool(torch.isfinite(out).all()):
            return math.inf
        return float((out.double() - self.reference(sigma0, fit)).pow(2).mean().sqrt())

    def run(self, fn, sigmas, fit=False, **opts):
        model = Counting(self.fit_model if fit else self.model)
        noise = self.fit_noise if fit else self.noise
        x = noise * float(sigmas[0])
        with torch.no_grad():
            try:
                out = fn(model, x, sigmas, disable=True, **opts)
            except Exception as exc:  # a sampler that cannot run this schedule scores inf
                print(f"  ! {getattr(fn, '__name__', fn)}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return math.inf, model.calls
        return self.error(out, float(sigmas[0]), fit), model.calls


@lru_cache(maxsize=None)
def nfe_of(kind: str, name: str, n_steps: int) -> int:
    """Model calls sampler ``name`` makes on a schedule of ``n_steps`` steps (probed with a counting model)."""
    gmm = _probe_gmm()
    model = Counting(MixtureDenoiser(gmm, torch.zeros(1, dtype=torch.long), cfg=CFG, model_sampling=MS))
    sig = K.get_sigmas_karras(n_steps, SIGMA_MIN, SIGMA_MAX)
    fn, opts = (OURS_DET if kind == "ours" else KD_DET)[name]
    with torch.no_grad():
        fn(model, torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * SIGMA_MAX, sig, disable=True,
           **opts)
    return model.calls


@lru_cache(maxsize=1)
def _probe_gmm():
    return problem()


def _kd_fast(model, x, sigmas, disable=True, **kw):
    positive = sigmas[sigmas > 0]
    return K.sample_dpm_fast(model, x, float(positive.min()), float(sigmas.max()), len(sigmas) - 1, disable=disable)


def _kd_3m_eta0(model, x, sigmas, disable=True, **kw):
    return K.sample_dpmpp_3m_sde(model, x, sigmas, disable=disable, eta=0.0,
                                 noise_sampler=lambda a, b: torch.zeros_like(x))


_ENDPOINT_ONLY = {"dpm_fast"}
OURS_DET = {n: (SAMPLERS[n], {}) for n in SAMPLERS
            if not sampler_traits(n).stochastic and n != "dpm_adaptive"}
OURS_DET["dpmpp_3m_sde(eta=0)"] = (SAMPLERS["dpmpp_3m_sde"], {"eta": 0.0, "noise_sampler": lambda a, b: 0.0})
KD_DET = {"euler": (K.sample_euler, {}), "heun": (K.sample_heun, {}), "dpm_2": (K.sample_dpm_2, {}),
          "lms": (K.sample_lms, {}), "dpmpp_2m": (K.sample_dpmpp_2m, {}), "dpm_fast": (_kd_fast, {}),
          "dpmpp_3m_sde(eta=0)": (_kd_3m_eta0, {})}
KD_SCHEDULES = ("karras", "exponential", "polyexponential(rho=2)", "vp")


def steps_for(kind: str, name: str, budget: int, sigmas_of) -> int | None:
    for steps in range(budget, 0, -1):
        n = len(sigmas_of(steps)) - 1
        if n >= 1 and nfe_of(kind, name, n) <= budget:
            return steps
    return None


def deterministic(b: Bench, budgets, log) -> list[dict]:
    rows = []
    ours_schedulers = list(SCHEDULERS) + ["gits_fit"]
    for name, (fn, opts) in OURS_DET.items():
        t = time.perf_counter()
        tr = sampler_traits(name.split("(")[0])
        discard = tr.discard_penultimate_sigma
        scheds = ["karras"] if name in _ENDPOINT_ONLY else ours_schedulers
        for sch in scheds:
            for budget in budgets:
                steps = steps_for("ours", name, budget,
                                  lambda s: b.ours_sigmas(sch if sch != "gits_fit" else "karras", s, discard))
                if steps is None:
                    continue
                extra = {}
                if sch == "gits_fit":  # pick sigma_data on the fitting noise, never on the evaluation noise
                    fit_err = {sd: b.run(fn, b.ours_sigmas(sch, steps, discard, sd), fit=True, **opts)[0]
                               for sd in GITS_SIGMA_DATA}
                    sd = min(fit_err, key=fit_err.get)
                    extra = {"gits_sigma_data": sd}
                    sig = b.ours_sigmas(sch, steps, discard, sd)
                else:
                    sig = b.ours_sigmas(sch, steps, discard)
                err, calls = b.run(fn, sig, **opts)
                rows.append({"impl": "ours", "sampler": name, "scheduler": "(endpoints)" if name in _ENDPOINT_ONLY
                             else sch, "budget": budget, "steps": steps, "nfe": calls, "rms_error": err,
                             "target": "cfg++ ODE" if tr.cfg_pp else "cfg ODE", **extra})
        log(f"  ours {name}: {time.perf_counter() - t:.1f}s")
    for name, (fn, opts) in KD_DET.items():
        scheds = ["karras"] if name in _ENDPOINT_ONLY else KD_SCHEDULES
        for sch in scheds:
            for budget in budgets:
                steps = steps_for("kd", name, budget, lambda s: b.kd_sigmas(sch, s))
                if steps is None:
                    continue
                err, calls = b.run(fn, b.kd_sigmas(sch, steps), **opts)
                rows.append({"impl": "k-diffusion", "sampler": name, "scheduler": "(endpoints)" if name in
                             _ENDPOINT_ONLY else sch, "budget": budget, "steps": steps, "nfe": calls,
                             "rms_error": err, "target": "cfg ODE"})
    # dpm_adaptive: a tolerance sweep; each run counts at the smallest budget that its calls fit
    for impl, fn in (("ours", SAMPLERS["dpm_adaptive"]), ("k-diffusion", None)):
        for rtol in ADAPTIVE_RTOL:
            sig = K.get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX)
            if impl == "ours":
                err, calls = b.run(fn, sig, rtol=rtol, atol=rtol / 10)
            else:
                err, calls = b.run(lambda m, x, s, disable=True: K.sample_dpm_adaptive(
                    m, x, SIGMA_MIN, SIGMA_MAX, rtol=rtol, atol=rtol / 10, disable=True), sig)
            fits = [bb for bb in budgets if calls <= bb]
            rows.append({"impl": impl, "sampler": f"dpm_adaptive(rtol={rtol})", "scheduler": "(adaptive)",
                         "budget": fits[0] if fits else None, "steps": None, "nfe": calls, "rms_error": err,
                         "target": "cfg ODE"})
    return rows


# ---- stochastic ------------------------------------------------------------------------------------
STOCH_SCHEDULERS = ("karras", "exponential", "align_your_steps", "gits")
KD_STOCH = {"euler_ancestral": K.sample_euler_ancestral, "dpm_2_ancestral": K.sample_dpm_2_ancestral,
            "dpmpp_2s_ancestral": K.sample_dpmpp_2s_ancestral, "dpmpp_sde": K.sample_dpmpp_sde,
            "dpmpp_2m_sde": K.sample_dpmpp_2m_sde, "dpmpp_3m_sde": K.sample_dpmpp_3m_sde}


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 with a Gaussian kernel (Gretton et al. 2012)."""
    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth ** 2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


def stochastic(b: Bench, budgets, quick: bool, log) -> list[dict]:
    gmm = b.gmm
    n = 512 if quick else 1024
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 4, (n,), generator=gen)
    exact = gmm.sample(n, labels, gen).double()
    other = gmm.sample(n, labels, gen).double()
    start0 = gmm.sample(n, labels, gen)
    start_noise = torch.randn(n, 64, generator=gen)
    bandwidth = float(torch.cdist(exact[:512], exact[:512]).median())
    # the exact mean NLL from many samples (same class mix), so that the gap's noise is the sample set's alone
    many = labels.repeat(16)
    nll_exact = float(-gmm.log_prob(gmm.sample(len(many), many, gen).float(), many).double().mean())
    model = MixtureDenoiser(gmm, labels, cfg=None, model_sampling=MS)
    probe_model = MixtureDenoiser(gmm, labels[:2], cfg=None, model_sampling=MS)

    def score(out):
        out = out.double()
        if not bool(torch.isfinite(out).all()):
            return math.inf, math.inf
        return mmd2(out, exact, bandwidth), float(-gmm.log_prob(out.float(), labels).double().mean()) - nll_exact

    rows = [{"impl": "floor", "sampler": "exact samples", "scheduler": "-", "budget": None, "nfe": 0,
             "mmd2": mmd2(other, exact, bandwidth),
             "nll_gap": float(-gmm.log_prob(other.float(), labels).double().mean()) - nll_exact}]

    def one(impl, name, fn, sigmas, noise_kind, fast=False, probe=False, **opts):
        counting = Counting(probe_model if probe else model)
        x = (start0 + float(sigmas[0]) * start_noise)[:2 if probe else n]
        seed = 1234
        if noise_kind == "ancestral":
            opts["noise_sampler"] = default_noise_sampler(x, seed)
        elif noise_kind.startswith("brownian"):
            pos = sigmas[sigmas > 0]
            opts["noise_sampler"] = (BrownianPathNoiseSampler(x, seed) if fast else
                                     BrownianTreeNoiseSampler(x, pos.min(), sigmas.max(), seed=seed))
        elif noise_kind == "kd_ancestral":
            torch.manual_seed(seed)
        elif noise_kind == "kd_brownian":
            pos = sigmas[sigmas > 0]
            opts["noise_sampler"] = K.BrownianTreeNoiseSampler(x, pos.min(), sigmas.max(), seed=seed)
        with torch.no_grad():
            try:
                out = fn(counting, x, sigmas, disable=True, **opts)
            except Exception as exc:
                print(f"  ! {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return None
        if probe:
            return {"nfe": counting.calls}
        m, g = score(out)
        return {"impl": impl, "sampler": name + ("[fast]" if fast else ""), "nfe": counting.calls, "mmd2": m,
                "nll_gap": g}

    def nfe_probe(fn, sig, noise_kind, **opts):
        r = one("probe", "probe", fn, sig, noise_kind, probe=True, **opts)
        return math.inf if r is None else r["nfe"]

    ours = [nm for nm in SAMPLERS if sampler_traits(nm).stochastic]
    for nm in ours:
        t = time.perf_counter()
        tr = sampler_traits(nm)
        variants = [False, True] if tr.noise.startswith("brownian") else [False]
        for sch in STOCH_SCHEDULERS:
            probe_cache = {}
            for budget in budgets:
                chosen = None
                for steps in range(budget, 0, -1):
                    sig = sampling_sigmas(MS, sch, steps, discard_penultimate_sigma=tr.discard_penultimate_sigma)
                    key = len(sig)
                    if key not in probe_cache:
                        probe_cache[key] = nfe_probe(SAMPLERS[nm], sig, tr.noise)
                    if probe_cache[key] <= budget:
                        chosen = (steps, sig)
                        break
                if chosen is None:
                    continue
                for fast in variants:
                    r = one("ours", nm, SAMPLERS[nm], chosen[1], tr.noise, fast=fast)
                    if r:
                        rows.append({**r, "scheduler": sch, "budget": budget, "steps": chosen[0]})
        log(f"  ours {nm}: {time.perf_counter() - t:.1f}s")
    for nm, fn in KD_STOCH.items():
        kind = "kd_brownian" if nm.endswith("sde") else "kd_ancestral"
        for sch in ("karras", "exponential"):
            for budget in budgets:
                chosen = None
                for steps in range(budget, 0, -1):
                    sig = Bench.kd_sigmas(sch, steps)
                    if nfe_probe(fn, sig, kind) <= budget:
                        chosen = (steps, sig)
                        break
                if chosen is None:
                    continue
                r = one("k-diffusion", nm, fn, chosen[1], kind)
                if r:
                    rows.append({**r, "scheduler": sch, "budget": budget, "steps": chosen[0]})
    return rows


# ---- report ------------------------------------------------------------------------------------------
def best(rows, impl, budget, key):
    cand = [r for r in rows if r["impl"] == impl and r["budget"] == budget and r.get("target", "cfg ODE") == "cfg ODE"
            and math.isfinite(r[key])]
    return min(cand, key=lambda r: abs(r[key])) if cand else None


def report(det, sto, budgets, conv) -> tuple[str, dict]:
    out = []
    out.append(f"reference: RK4 in float64; vs twice the steps: {conv['reference_vs_2x_steps_rms']:.2e} RMS; "
               f"data RMS {conv['data_rms']:.3f}; floor of any sampler that denoises from sigma_min "
               f"(exact path, then one denoise): {conv['floor_exact_to_sigma_min_then_denoise_rms']:.2e}")
    head = []
    summary = {}
    for budget in budgets:
        o, k = best(det, "ours", budget, "rms_error"), best(det, "k-diffusion", budget, "rms_error")
        ratio = o["rms_error"] / k["rms_error"] if o and k else None
        summary[budget] = {"ours": o, "k-diffusion": k, "ratio": ratio}
        head.append([budget, o and f"{o['sampler']} + {o['scheduler']}", o and o["nfe"], o and o["rms_error"],
                     k and f"{k['sampler']} + {k['scheduler']}", k and k["nfe"], k and k["rms_error"], ratio])
    out.append(table(["NFE<=", "ours best", "nfe", "RMS err", "k-diffusion best", "nfe", "RMS err", "ratio"], head,
                     "Deterministic: best sampler + schedule per NFE budget (RMS error vs the exact PF-ODE)"))
    for impl in ("ours", "k-diffusion"):
        names = sorted({r["sampler"] for r in det if r["impl"] == impl and not r["sampler"].startswith("dpm_adaptive")},
                       key=lambda s: list(OURS_DET if impl == "ours" else KD_DET).index(s))
        lines = []
        for nm in names:
            line = [nm]
            for budget in budgets:
                cand = [r for r in det if r["impl"] == impl and r["sampler"] == nm and r["budget"] == budget]
                if not cand:
                    line.append("-")
                    continue
                r = min(cand, key=lambda r: r["rms_error"])
                k_row = [c for c in cand if c["scheduler"] in ("karras", "(endpoints)")]
                line.append(f"{r['rms_error']:.3g} ({r['scheduler']}, {r['nfe']})"
                            + (f" | karras {k_row[0]['rms_error']:.3g}" if k_row and k_row[0] is not r else ""))
            lines.append(line)
        target_note = " (cfg_pp samplers follow the CFG++ ODE, not the reference; not ranked)" if impl == "ours" else ""
        out.append(table(["sampler"] + [f"NFE<={bb}: best (schedule, nfe)" for bb in budgets], lines,
                         f"{impl}: per sampler, best schedule at each budget{target_note}"))
    ad = [[r["impl"], r["sampler"], r["nfe"], r["rms_error"]] for r in det if r["sampler"].startswith("dpm_adaptive")]
    out.append(table(["impl", "dpm_adaptive", "nfe", "RMS err"], ad, "dpm_adaptive (tolerance sweep, atol = rtol/10)"))
    if sto:
        srows = []
        floor = sto[0]
        for budget in budgets:
            o, k = best(sto, "ours", budget, "nll_gap"), best(sto, "k-diffusion", budget, "nll_gap")
            srows.append([budget, o and f"{o['sampler']} + {o['scheduler']}", o and o["nfe"], o and o["mmd2"],
                          o and o["nll_gap"], k and f"{k['sampler']} + {k['scheduler']}", k and k["nfe"],
                          k and k["mmd2"], k and k["nll_gap"]])
        out.append(table(["NFE<=", "ours best", "nfe", "MMD^2", "NLL gap", "k-diffusion best", "nfe", "MMD^2",
                          "NLL gap"], srows,
                         f"Stochastic: best by |NLL gap| (floor: exact samples MMD^2 "
                         f"{floor['mmd2']:.2e}, NLL gap {floor['nll_gap']:+.3f})"))
        per = []
        for impl in ("ours", "k-diffusion"):
            for nm in dict.fromkeys(r["sampler"] for r in sto if r["impl"] == impl):
                line = [impl, nm]
                for budget in budgets:
                    cand = [r for r in sto if r["impl"] == impl and r["sampler"] == nm and r["budget"] == budget]
                    r = min(cand, key=lambda r: abs(r["nll_gap"])) if cand else None
                    line.append(f"{r['mmd2']:.2e} / {r['nll_gap']:+.2f} ({r['scheduler']})" if r else "-")
                per.append(line)
        out.append(table(["impl", "sampler"] + [f"NFE<={bb}: MMD^2 / NLL gap (schedule)" for bb in budgets], per,
                         "Stochastic samplers: best schedule per budget"))
    return "\n".join(out), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer noises and samples, NFE 5 and 10 only")
    ap.add_argument("--no-stochastic", action="store_true", help="skip the stochastic samplers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    budgets = (5, 10) if args.quick else BUDGETS

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    b = Bench(args.quick)
    conv = b.convergence()
    log(f"reference checked ({time.perf_counter() - t0:.1f}s)")
    det = deterministic(b, budgets, log)
    sto = [] if args.no_stochastic else stochastic(b, budgets, args.quick, log)
    text, summary = report(det, sto, budgets, conv)
    print(text)
    s10 = summary.get(10)
    if s10 and s10["ratio"] is not None:
        verdict = "MET" if s10["ratio"] <= 0.5 else "MISSED"
        print(f"\nGoal (ours best at NFE 10 <= 0.5 x k-diffusion's best): ratio {s10['ratio']:.3f} -> {verdict}")
    print(f"gits_fit: {b.fit_calls} model calls on the fitting noises; reference solves {b.ref_seconds:.1f}s; "
          f"total {time.perf_counter() - t0:.0f}s")
    path = write_json("accuracy_quick.json" if args.quick else "accuracy.json", {
        "environment": environment(), "quick": args.quick, "cfg": CFG, "model_sampling": MS.describe(),
        "n_eval": len(b.noise), "reference": conv, "summary": summary, "deterministic": det, "stochastic": sto,
        "gits_fit_model_calls": b.fit_calls, "seconds": time.perf_counter() - t0})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
