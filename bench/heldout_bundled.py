"""The calibrated sampler on the bundled networks, against ComfyUI's samplers: accuracy and prompt adherence.

    python bench/heldout_bundled.py                            # flow and eps, 5 and 8 steps, cfg 5, 16 prompts
    python bench/heldout_bundled.py --comfy-samplers all --prompts 48   # every ComfyUI sampler (hours on a CPU)
    python bench/heldout_bundled.py --models flow --prompts 48 --steps 5 --results heldout_bundled_48.json
    python bench/heldout_bundled.py --comfy-samplers all --add-comfy   # the stored run plus every other ComfyUI sampler
    python bench/heldout_bundled.py --quick                    # 8 ComfyUI samplers, nothing written
    python bench/heldout_bundled.py --tune-eta --prompts 48    # choose the stochastic rows' eta on tuning prompts
    python bench/heldout_bundled.py --over-seeds                # the stochastic rows over 4 re-noising seeds
    python bench/heldout_bundled.py --over-seeds --select-on-tuning --prompts 48 --models flow   # ComfyUI's pick
    python bench/heldout_bundled.py --recalibrate --calibrations DIR   # after a change to the fit: ours again,
    python bench/heldout_bundled.py --over-seeds --recalibrate --calibrations DIR   # and ours over seeds
    python bench/heldout_bundled.py --recalibrate --node-fit   # ours as a node user with its defaults gets it

For each bundled checkpoint: held-out prompts (``adherence.bench_prompts`` with a seed that no other bench
uses) and held-out noise seeds, txt2img at cfg 5.

- **Reference:** the same guided probability-flow ODE from the same noise, solved with 1,000 steps of the
  order-3 exponential Adams-Bashforth integrator (``calibration.teacher_solve``).
- **ComfyUI:** its samplers (every one that runs from sigmas alone: not the CFG++ ones, which need its CFG
  guider, nor ``dpm_adaptive``, whose step count is its own) x its 9 schedulers at the same step count, run
  from the real checkout in-process (``comfy.k_diffusion.sampling``, ``comfy.samplers``) on our guided
  denoiser, with ComfyUI's model sampling for the checkpoint. Stochastic ones get the sampling seed.
- **Ours:** the calibrated sampler, fitted (``fit_calibration``) on the same model and prompts with fitting
  noise from a seed disjoint from the evaluation seeds, with the calibration's default settings; run as fitted
  (eta 0, following the ODE) and re-noising at ``STOCHASTIC_ETA`` from the sampling seed (the same fit; eta
  chosen by ``--tune-eta`` on 48 tuning prompts with fitting, start and re-noising seeds of their own).
- **Scores:** latent RMS to the reference (the stored latent), decoded image RMS to the reference's image (RGB
  0..1), and adherence (the share of images whose colour and shape match the prompt: ``adherence.Scorer``).
  "ComfyUI best" is the best sampler + scheduler per score, picked after the fact (a favour to ComfyUI).

- **At the node's default size** (``--node-fit``): one fit per prompt, as a user of the Calibrated Scheduler node
  with its defaults makes it (its fit_noises and iterations, read from the node), scored against the stored
  ComfyUI rows; written to results/heldout_bundled_nodefit.json.
- **Fixed picks:** ComfyUI's dpmpp_2m + karras and euler + normal are scored beside its best (``FIXED_PICKS``).

Results go to bench/results/heldout_bundled.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import RESULTS as RESULTS_DIR, environment, int_list, require_ksampler, table, write_json  # noqa: E402

require_ksampler()
import adherence  # noqa: E402  (the scorer and the prompt grammar)
from heldout import COMFYUI_DIR, NODE_FIT, Comfy  # noqa: E402
from ksampler.bundled.loader import load_bundled  # noqa: E402
from ksampler.calibration import DEFAULT_FIT, Calibration, fit_calibration, teacher_solve  # noqa: E402
from ksampler.conditioning.cfg import Guidance  # noqa: E402

PROMPT_SEED = 7_301  # held out: the adherence bench uses seed 0, training draws prompts from the renderer
EVAL_SEED, FIT_SEED = 31_000, 47_000
NODE_FIT_SEED = 48_000  # --node-fit: prompt i's fitting noise (NODE_FIT["fit_noises"] of them) comes from this + i
NODE_SIZE_FIT = {**DEFAULT_FIT, "iterations": NODE_FIT["iterations"]}  # --node-fit's fit_calibration settings
# --select-on-tuning: ComfyUI's best picked on prompts and noise of its own, then scored on the held-out run;
# --tune-eta: the calibrated sampler's eta chosen on those prompts, from a fit on noise of their own
TUNE_PROMPT_SEED, TUNE_EVAL_SEED, TUNE_FIT_SEED = 7_302, 59_000, 91_000
TUNE_ETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TUNE_DRAW_SEEDS = 4  # re-noising seeds per eta on the tuning prompts
# the eta of the stochastic calibrated rows: the best mean adherence in --tune-eta (results/eta_tuning.json)
STOCHASTIC_ETA = 0.75  # 0.9857 mean over flow and eps at 5 and 8 steps, against 0.9844 for eta 0 (ODE)
# --over-seeds: the stochastic rows (ours and every ComfyUI stochastic sampler x scheduler of the stored run) re-run
# with the evaluation seed and OVER_SEEDS - 1 more re-noising seeds (the same start noise, prompts and reference)
OVER_SEEDS = 4
STEPS = (5, 8)
CFG = 5.0
REFERENCE_STEPS = 1000
QUICK_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "ipndm", "deis")
# what a user might pick without a search: ComfyUI's popular default and its plainest pair (scored beside "best")
FIXED_PICKS = (("dpmpp_2m", "karras"), ("euler", "normal"))
STOCHASTIC = ("euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "er_sde")  # the most used stochastic ones
# ComfyUI samplers that call the model once per step, as the calibrated sampler does (counted on the checkout at 5
# and 8 steps; the others, such as heun, dpm_2, exp_heun_2_x0 or seeds_2, call it twice or more per step and so
# get up to twice the calls at the same step count)
ONE_CALL_PER_STEP = ("euler", "euler_ancestral", "lms", "dpm_fast", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
                     "dpmpp_3m_sde", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
                     "res_multistep_ancestral", "gradient_estimation", "er_sde", "sa_solver", "ddim", "uni_pc",
                     "uni_pc_bh2")


def comfy_samplers(comfy: Comfy, which: str) -> list[str]:
    """ComfyUI's samplers that run from sigmas alone: "all" (the _gpu twins, identical on the CPU, left out),
    "ode" (its deterministic ones plus the most used stochastic ones) or "quick"."""
    names = [n for n in comfy.cs.KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
             if "cfg_pp" not in n and n != "dpm_adaptive" and not n.endswith("_gpu")]
    if which == "quick":
        return [n for n in names if n in QUICK_SAMPLERS]
    if which == "ode":
        return [n for n in names if n in Comfy.DETERMINISTIC or n in STOCHASTIC]
    return names


class Setup:
    """One checkpoint with its prompts, guided denoiser, evaluation and fitting noise, and reference."""

    def __init__(self, kind: str, n: int, scorer, log, prompt_seed: int = PROMPT_SEED, eval_seed: int = EVAL_SEED,
                 fit_seed: int = FIT_SEED):
        self.kind = kind
        self.model, self.clip, self.vae = load_bundled(kind)
        self.ms = self.model.model_sampling
        prompts = adherence.bench_prompts(n, seed=prompt_seed)
        self.texts, self.targets = [p for p, _ in prompts], [t for _, t in prompts]
        size = self.model.config["image_size"]
        self.shape = (n, 3, size, size)
        self.denoiser = self.guided(self.texts, self.shape)
        self.eval_seed = eval_seed
        self.noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(eval_seed))
        self.fit_noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(fit_seed))
        self.sigma_max, self.sigma_min = float(self.ms.sigma_max), float(self.ms.sigma_min)
        self.scorer = scorer
        t = time.perf_counter()
        self.reference = teacher_solve(self.denoiser, self.ms, self.start(self.sigma_max), self.sigma_max,
                                       self.sigma_min, REFERENCE_STEPS)
        self.reference_latent = self.model.latent_format.process_out(self.reference)
        self.reference_image = self.image(self.reference_latent)
        self.reference_scores = {"adherence": scorer.score(self.reference_image, self.targets)["both"]}
        log(f"{kind}: reference ({REFERENCE_STEPS} steps) in {time.perf_counter() - t:.0f}s")

    def guided(self, texts: list[str], shape: tuple):
        """The guided denoiser (cfg ``CFG``, empty negative) of ``texts`` (one per item, or one for all) on a batch
        of ``shape``."""
        positive = [[self.clip.encode_context(texts), {}]]
        return Guidance(positive, self.clip.encode(""), CFG).bind(self.model, self.ms, shape, torch.device("cpu"))

    def comfy(self) -> Comfy:
        """ComfyUI's samplers with its model sampling for this checkpoint (the flow shift of a flow model)."""
        return Comfy(COMFYUI_DIR, flow_shift=float(self.ms.shift) if self.kind == "flow" else None)

    def start(self, sigma0: float) -> torch.Tensor:
        """The txt2img start at sigma0 from the evaluation noise (ComfyUI's scaling, max_denoise)."""
        return self.ms.noise_scaling(torch.tensor(sigma0), self.noise, torch.zeros(self.shape), True)

    def image(self, latent: torch.Tensor) -> torch.Tensor:
        """RGB [B, 3, H, W] in 0..1 of a stored latent."""
        return self.vae.decode(latent).permute(0, 3, 1, 2)

    def scores(self, x: torch.Tensor) -> dict:
        if x is None or not bool(torch.isfinite(x).all()):
            return {"latent_rms": math.inf, "image_rms": math.inf, "adherence": 0.0}
        latent = self.model.latent_format.process_out(x)
        image = self.image(latent)
        return {"latent_rms": float((latent - self.reference_latent).pow(2).mean().sqrt()),
                "image_rms": float((image - self.reference_image).pow(2).mean().sqrt()),
                "adherence": self.scorer.score(image, self.targets)["both"]}


def comfy_rows(setup: Setup, comfy: Comfy, samplers: list[str], steps: int, log) -> list[dict]:
    rows = []
    for sampler in samplers:
        for scheduler in comfy.schedulers:
            sigmas = comfy.sigmas(scheduler, steps, sampler)
            try:
                out = comfy.run(sampler, setup.denoiser, setup.start(float(sigmas[0])), sigmas, seed=setup.eval_seed)
            except Exception as exc:  # a sampler that cannot run this schedule scores worst
                log(f"  ! comfyui {sampler}/{scheduler}: {type(exc).__name__}: {exc}")
                out = None
            rows.append({"impl": "comfyui", "sampler": sampler, "scheduler": scheduler, "steps": steps,
                         **setup.scores(out)})
            log(f"  comfyui {sampler}/{scheduler} {steps} steps: " + ", ".join(
                f"{k} {rows[-1][k]:.4g}" for k in ("latent_rms", "image_rms", "adherence")))
    return rows


def fit(setup: Setup, steps: int, log) -> tuple:
    """The calibration of ``setup``'s model and prompts with the default settings, and the seconds it took."""
    t = time.perf_counter()
    cal = fit_calibration(setup.denoiser, setup.ms, setup.fit_noise, steps, log=log, **DEFAULT_FIT)
    return cal, time.perf_counter() - t


def fit_or_load(setup: Setup, steps: int, log, path: str = None) -> Calibration:
    """The calibration stored at ``path``, or a fit (saved there when ``path`` is given)."""
    if path and os.path.isfile(path):
        return Calibration.load(path)
    cal = fit(setup, steps, log)[0]
    if path:
        cal.save(path)
    return cal


def held_out_fit_path(calibrations: str, kind: str, steps: int, n: int) -> str:
    """Where --calibrations keeps the held-out run's fit (written by --recalibrate, read by --over-seeds); None
    without a folder."""
    return calibrations and os.path.join(calibrations, f"heldout_{kind}_{steps}_{n}.safetensors")


def sample(setup: Setup, cal, eta: float = 0.0, seed: int = None) -> torch.Tensor:
    """``cal`` run from the evaluation noise; with eta > 0 re-noising from ``seed``."""
    return replace(cal, eta=eta).sampler()(setup.denoiser, setup.start(float(cal.sigmas[0])), cal.sigmas,
                                           extra_args={} if seed is None else {"seed": seed}, disable=True)


def calibrated_rows(setup: Setup, steps: int, log, save: str = None) -> list[dict]:
    """The calibrated sampler (eta 0, following the ODE) and, once an eta is chosen, its stochastic form with the
    sampling seed (as ComfyUI's stochastic samplers get it).  ``save``: a path to save the fit to."""
    cal, seconds = fit(setup, steps, log)
    if save:
        cal.save(save)
    fitted = {"fit_model_calls": cal.info["model_calls"], "fit_backward_passes": cal.info["backward_passes"],
              "fit_seconds": round(seconds, 1), "fit_noises": cal.info["fit_noises"], "init": cal.info["init"],
              "corrector": cal.info["corrector"], "rms_fitted": cal.info["rms_fitted"]}
    rows = [{"impl": "calibrated", "sampler": "calibrated", "scheduler": "calibrated", "steps": steps,
             **setup.scores(sample(setup, cal)), **fitted}]
    if STOCHASTIC_ETA:
        rows.append({"impl": "calibrated_stochastic", "sampler": f"calibrated, eta {STOCHASTIC_ETA:g}",
                     "scheduler": "calibrated", "steps": steps, "eta": STOCHASTIC_ETA,
                     **setup.scores(sample(setup, cal, STOCHASTIC_ETA, setup.eval_seed)), **fitted})
    return rows


def node_fit_rows(setup: Setup, steps: int, log) -> list[dict]:
    """The calibrated rows as a node user gets them: one fit per prompt, of the Calibrated Scheduler node's default
    size (``NODE_FIT``'s fit_noises, from a seed of the prompt's own; ``NODE_SIZE_FIT``: its iterations and the
    rest of ``DEFAULT_FIT``; no refinement, one candidate), each run on its prompt's evaluation noise."""
    fits, seconds = [], 0.0
    for i, text in enumerate(setup.texts):
        noise = torch.randn((NODE_FIT["fit_noises"],) + setup.shape[1:],
                            generator=torch.Generator().manual_seed(NODE_FIT_SEED + i))
        t = time.perf_counter()
        fits.append(fit_calibration(setup.guided([text], noise.shape), setup.ms, noise, steps, **NODE_SIZE_FIT))
        seconds += time.perf_counter() - t
        log(f"  {setup.kind} {steps} steps, prompt {i + 1}/{len(setup.texts)}: fitted in "
            f"{time.perf_counter() - t:.1f}s")

    def run(eta: float = 0.0, seed: int = None) -> torch.Tensor:  # each prompt's item from its own fit
        return torch.stack([sample(setup, cal, eta, seed)[i] for i, cal in enumerate(fits)])
    fitted = {"fit_model_calls": sum(c.info["model_calls"] for c in fits),
              "fit_backward_passes": sum(c.info["backward_passes"] for c in fits), "fit_seconds": round(seconds, 1),
              "fits": len(fits), "fit_noises": NODE_FIT["fit_noises"], "iterations": NODE_FIT["iterations"],
              "inits": sorted({c.info["init"] for c in fits})}
    rows = [{"impl": "calibrated", "sampler": "calibrated (node size, per prompt)", "scheduler": "calibrated",
             "steps": steps, **setup.scores(run()), **fitted}]
    if STOCHASTIC_ETA:
        rows.append({"impl": "calibrated_stochastic", "sampler": f"calibrated (node size, per prompt), eta "
                     f"{STOCHASTIC_ETA:g}", "scheduler": "calibrated", "steps": steps, "eta": STOCHASTIC_ETA,
                     **setup.scores(run(STOCHASTIC_ETA, setup.eval_seed)), **fitted})
    return rows


def tune_eta(kind: str, n: int, scorer, step_counts, log, calibrations: str = None) -> dict:
    """The calibrated sampler on ``n`` tuning prompts (fitted on noise of their own) at every eta of TUNE_ETAS,
    each over TUNE_DRAW_SEEDS re-noising seeds: mean adherence and latent RMS.  ``calibrations``: a folder to
    load the fits from (or save them to), so that a re-run scores without refitting."""
    setup = Setup(kind, n, scorer, log, prompt_seed=TUNE_PROMPT_SEED, eval_seed=TUNE_EVAL_SEED,
                  fit_seed=TUNE_FIT_SEED)
    result = {"model": kind, "prompts": n, "prompt_seed": TUNE_PROMPT_SEED, "noise_seed": TUNE_EVAL_SEED,
              "fit_seed": TUNE_FIT_SEED, "reference": setup.reference_scores, "steps": {}}
    for steps in step_counts:
        cal = fit_or_load(setup, steps, log, calibrations and os.path.join(
            calibrations, f"tune_{kind}_{steps}_{n}.safetensors"))
        rows = []
        for eta in TUNE_ETAS:
            seeds = [None] if eta == 0 else [TUNE_EVAL_SEED + 1000 * k for k in range(TUNE_DRAW_SEEDS)]
            scored = [setup.scores(sample(setup, cal, eta, seed)) for seed in seeds]
            rows.append({"eta": eta, "seeds": seeds, "adherence_per_seed": [r["adherence"] for r in scored],
                         **{k: sum(r[k] for r in scored) / len(scored) for k in ("latent_rms", "image_rms",
                                                                                  "adherence")}})
            log(f"{kind} {steps} steps, eta {eta:g}: adherence {rows[-1]['adherence']:.4g} "
                f"({[round(a, 3) for a in rows[-1]['adherence_per_seed']]}), latent RMS {rows[-1]['latent_rms']:.4g}")
        result["steps"][str(steps)] = {"fit_model_calls": cal.info["model_calls"], "rows": rows}
    return result


def seeded_row(setup: Setup, impl: str, sampler: str, scheduler: str, run, seeds: list, log) -> dict:
    """``run(seed)`` scored for each re-noising seed of ``seeds``: the adherence and latent RMS of each, and their
    means."""
    scored = []
    for seed in seeds:
        try:
            scored.append(setup.scores(run(seed)))
        except Exception as exc:  # a sampler that cannot run this schedule scores worst
            log(f"  ! {impl} {sampler}/{scheduler}: {type(exc).__name__}: {exc}")
            scored.append(setup.scores(None))
    row = {"impl": impl, "sampler": sampler, "scheduler": scheduler,
           "adherence_per_seed": [s["adherence"] for s in scored],
           "latent_rms_per_seed": [s["latent_rms"] for s in scored],
           **{k: sum(s[k] for s in scored) / len(scored) for k in ("adherence", "latent_rms")}}
    log(f"  {impl} {sampler}/{scheduler}: adherence {row['adherence']:.4g} "
        f"{[round(a, 3) for a in row['adherence_per_seed']]}, latent RMS {row['latent_rms']:.4g}")
    return row


def comfy_seeded_rows(setup: Setup, comfy: Comfy, samplers: list[str], steps: int, seeds: list, log) -> list[dict]:
    """Every sampler of ``samplers`` x ComfyUI's schedulers, each over ``seeds``."""
    rows = []
    for sampler in samplers:
        for scheduler in comfy.schedulers:
            sigmas = comfy.sigmas(scheduler, steps, sampler)
            rows.append(seeded_row(setup, "comfyui", sampler, scheduler, lambda seed: comfy.run(
                sampler, setup.denoiser, setup.start(float(sigmas[0])), sigmas, seed=seed), seeds, log))
    return rows


def stochastic_samplers(stored: dict, steps: int) -> list[str]:
    """The ComfyUI samplers of a stored run that re-noise (not in ``Comfy.DETERMINISTIC``)."""
    return sorted({r["sampler"] for r in stored["rows"] if r["impl"] == "comfyui" and r["steps"] == steps
                   and r["sampler"] not in Comfy.DETERMINISTIC})


def over_seeds(kind: str, stored: dict, scorer, step_counts, log, calibrations: str = None,
               ours_only: bool = False) -> dict:
    """The stored held-out run's stochastic rows, each over OVER_SEEDS re-noising seeds (the evaluation seed
    first): the calibrated sampler at STOCHASTIC_ETA, refitted as the run fits it (or loaded from
    ``calibrations``), and every ComfyUI stochastic sampler x scheduler of the stored run.  ``ours_only``: the
    ComfyUI rows over seeds of ``stored`` are kept and only the calibrated row runs again (after a refit)."""
    n = stored["prompts"]
    setup = Setup(kind, n, scorer, log)
    comfy = None if ours_only else setup.comfy()
    seeds = [EVAL_SEED + 1000 * k for k in range(OVER_SEEDS)]
    result = {"seeds": seeds, "eta": STOCHASTIC_ETA, "fit": DEFAULT_FIT, "steps": {}}
    for steps in step_counts:
        cal = fit_or_load(setup, steps, log, held_out_fit_path(calibrations, kind, steps, n))
        rows = [seeded_row(setup, "calibrated_stochastic", f"calibrated, eta {STOCHASTIC_ETA:g}", "calibrated",
                           lambda seed: sample(setup, cal, STOCHASTIC_ETA, seed), seeds, log)]
        rows += [r for r in stored["over_seeds"]["steps"][str(steps)]["rows"] if r["impl"] == "comfyui"] \
            if ours_only else comfy_seeded_rows(setup, comfy, stochastic_samplers(stored, steps), steps, seeds, log)
        result["steps"][str(steps)] = {"fit_model_calls": cal.info["model_calls"], "rows": rows}
    return result


def over_seeds_selected(kind: str, n: int, stored: dict, scorer, step_counts, log) -> dict:
    """ComfyUI's best stochastic sampler + scheduler by mean adherence over OVER_SEEDS re-noising seeds, picked on
    ``n`` tuning prompts with start and re-noising noise of their own, then looked up in the held-out rows over
    seeds (``stored["over_seeds"]``): the pick a user could make without seeing the held-out prompts."""
    setup = Setup(kind, n, scorer, log, prompt_seed=TUNE_PROMPT_SEED, eval_seed=TUNE_EVAL_SEED)
    comfy = setup.comfy()
    seeds = [TUNE_EVAL_SEED + 1000 * k for k in range(OVER_SEEDS)]
    result = {"prompts": n, "prompt_seed": TUNE_PROMPT_SEED, "seeds": seeds, "steps": {}}
    for steps in step_counts:
        held_out = {(r["sampler"], r["scheduler"]): r for r in stored["over_seeds"]["steps"][str(steps)]["rows"]
                    if r["impl"] == "comfyui"}
        tuned = [r for r in comfy_seeded_rows(setup, comfy, stochastic_samplers(stored, steps), steps, seeds, log)
                 if (r["sampler"], r["scheduler"]) in held_out]
        result["steps"][str(steps)] = {**_picked_on_tuning(tuned, held_out), "tuning_rows": tuned}
        log(f"{kind} {steps} steps: picked over seeds on tuning prompts "
            f"{ {k: v for k, v in result['steps'][str(steps)].items() if k != 'tuning_rows'} }")
    return result


def summarise_over_seeds(kind: str, entry: dict) -> list:
    """Per step count: ours against ComfyUI's best stochastic row by mean adherence (picked after the fact), the
    means of ComfyUI's rows that scored the best adherence with the evaluation seed alone, and ComfyUI's pick on
    tuning prompts (when run)."""
    lines = []
    for steps, cell in entry["steps"].items():
        ours = next(r for r in cell["rows"] if r["impl"] == "calibrated_stochastic")
        theirs = [r for r in cell["rows"] if r["impl"] == "comfyui"]
        best = _pick(theirs)
        top_first = max(r["adherence_per_seed"][0] for r in theirs)
        lucky = [r for r in theirs if r["adherence_per_seed"][0] == top_first]
        picked = entry.get("selected_on_tuning", {}).get("steps", {}).get(steps)
        lines.append([kind, steps, ours["sampler"], ours["adherence"], best["adherence"],
                      f"{best['sampler']} + {best['scheduler']}",
                      f"{sum(r['adherence'] > ours['adherence'] for r in theirs)} of {len(theirs)}",
                      f"{len(lucky)} at {top_first:.3g}: mean {sum(r['adherence'] for r in lucky) / len(lucky):.3g}",
                      _tuning_picks(picked, theirs) if picked else None])
    return lines


def _tuning_picks(picked: dict, held_out: list[dict]) -> str:
    """ComfyUI's pick on tuning prompts and its held-out mean adherence; also the pick among its samplers that call
    the model once per step."""
    one = _pick([r for r in picked["tuning_rows"] if r["sampler"] in ONE_CALL_PER_STEP])
    one_held_out = next(r for r in held_out if (r["sampler"], r["scheduler"]) == (one["sampler"], one["scheduler"]))
    return (f"{picked['sampler']} + {picked['scheduler']}: {picked['held_out_adherence']:.3g} (tied: "
            f"{picked['tied_at_top']}, their mean {picked['tied_mean_held_out_adherence']:.3g}); one call per step: "
            f"{one['sampler']} + {one['scheduler']}: {one_held_out['adherence']:.3g}")


def choose_eta(studies: list[dict]) -> dict:
    """The eta with the best adherence averaged over every study's step counts (ties: the lower mean latent RMS)."""
    cells = [cell["rows"] for study in studies for cell in study["steps"].values()]
    mean = {eta: {k: sum(next(r[k] for r in rows if r["eta"] == eta) for rows in cells) / len(cells)
                  for k in ("adherence", "latent_rms")} for eta in TUNE_ETAS}
    best = min(TUNE_ETAS, key=lambda eta: (-mean[eta]["adherence"], mean[eta]["latent_rms"]))
    return {"eta": best, "mean": {str(eta): m for eta, m in mean.items()}}


def _pick(rows: list[dict]) -> dict:
    """The best adherence, ties broken by the lower latent RMS (the most accurate of the best-adhering)."""
    return min(rows, key=lambda r: (-r["adherence"], r["latent_rms"]))


def _picked_on_tuning(tuned: list[dict], held_out: dict) -> dict:
    """The best of ``tuned`` (rows on tuning prompts) and its held-out adherence (``held_out``: rows by (sampler,
    scheduler)); also how many tied at the top on the tuning prompts and their mean held-out adherence."""
    pick = _pick(tuned)
    tied = [r for r in tuned if r["adherence"] == pick["adherence"]]
    return {"sampler": pick["sampler"], "scheduler": pick["scheduler"], "tuning_adherence": pick["adherence"],
            "held_out_adherence": held_out[(pick["sampler"], pick["scheduler"])]["adherence"],
            "tied_at_top": len(tied),
            "tied_mean_held_out_adherence": sum(held_out[(r["sampler"], r["scheduler"])]["adherence"]
                                                for r in tied) / len(tied)}


def select_on_tuning(kind: str, n: int, scorer, which: str, held_out: dict, step_counts, log) -> dict:
    """ComfyUI's best sampler + scheduler by adherence, picked on ``n`` tuning prompts and noises of their own
    (``TUNE_PROMPT_SEED``, ``TUNE_EVAL_SEED``), then scored on the held-out run ``held_out`` (its stored rows):
    what a user who chose ComfyUI's best on other prompts would get.  Also the mean held-out adherence over every
    combination tied at the top on the tuning prompts (a pick that favours none of them)."""
    setup = Setup(kind, n, scorer, log, prompt_seed=TUNE_PROMPT_SEED, eval_seed=TUNE_EVAL_SEED)
    comfy = setup.comfy()
    result = {"prompts": n, "prompt_seed": TUNE_PROMPT_SEED, "noise_seed": TUNE_EVAL_SEED,
              "held_out_prompts": held_out["prompts"], "steps": {}}
    for steps in step_counts:
        tuned = comfy_rows(setup, comfy, comfy_samplers(comfy, which), steps, log)
        scored = {(r["sampler"], r["scheduler"]): r for r in held_out["rows"]
                  if r["impl"] == "comfyui" and r["steps"] == steps}
        tuned = [r for r in tuned if (r["sampler"], r["scheduler"]) in scored]
        picks = {}
        deterministic = [r for r in tuned if r["sampler"] in Comfy.DETERMINISTIC]
        for label, pool in (("any", tuned), ("deterministic", deterministic)):
            picks[label] = _picked_on_tuning(pool, scored)
        result["steps"][str(steps)] = {**picks, "tuning_rows": tuned}
        log(f"{kind} {steps} steps: picked on tuning prompts {picks}")
    return result


def summarise(entry: dict) -> tuple[list, list[dict]]:
    """Per step count: the calibrated run against ComfyUI's best per score (adherence also among its
    deterministic samplers, which follow the same ODE), and the reference's own adherence."""
    kind, rows = entry["model"], entry["rows"]
    lines, summary = [], []
    for steps in sorted({r["steps"] for r in rows}):
        cal = next(r for r in rows if r["impl"] == "calibrated" and r["steps"] == steps)
        com = [r for r in rows if r["impl"] == "comfyui" and r["steps"] == steps]
        det = [r for r in com if r["sampler"] in Comfy.DETERMINISTIC]
        one = [r for r in com if r["sampler"] in ONE_CALL_PER_STEP]
        best = {"latent_rms": min(com, key=lambda r: r["latent_rms"]),
                "latent_rms (one call per step)": min(one, key=lambda r: r["latent_rms"]),
                "image_rms": min(com, key=lambda r: r["image_rms"]),
                "image_rms (one call per step)": min(one, key=lambda r: r["image_rms"]),
                "adherence": max(com, key=lambda r: r["adherence"]),
                "adherence (deterministic)": max(det, key=lambda r: r["adherence"])}
        fixed = {f"{s} + {k}": r for s, k in FIXED_PICKS for r in com if (r["sampler"], r["scheduler"]) == (s, k)}
        summary.append({"model": kind, "steps": steps, "calibrated": cal, "reference": entry.get("reference"),
                        "comfyui_best": {k: {"sampler": r["sampler"], "scheduler": r["scheduler"],
                                             "value": r[k.split(" ")[0]]} for k, r in best.items()},
                        "comfyui_fixed": {name: {score: r[score] for score in ("latent_rms", "image_rms", "adherence")}
                                          for name, r in fixed.items()}})
        for key, b in best.items():
            score = key.split(" ")[0]
            lines.append([kind, steps, key, cal[score], b[score], f"{b['sampler']} + {b['scheduler']}",
                          cal[score] / b[score] if score != "adherence" and b[score] > 0 else None])
        for name, r in fixed.items():
            for score in ("latent_rms", "adherence"):
                lines.append([kind, steps, f"{score}, a fixed pick", cal[score], r[score], name,
                              cal[score] / r[score] if score != "adherence" and r[score] > 0 else None])
        stochastic = next((r for r in rows if r["impl"] == "calibrated_stochastic" and r["steps"] == steps), None)
        if stochastic:
            summary[-1]["calibrated_stochastic"] = stochastic
            for key in ("latent_rms", "image_rms", "adherence"):
                b = best[key]
                lines.append([kind, steps, f"{key}, {stochastic['sampler']}", stochastic[key], b[key],
                              f"{b['sampler']} + {b['scheduler']}",
                              stochastic[key] / b[key] if key != "adherence" and b[key] > 0 else None])
        if entry.get("reference"):
            lines.append([kind, steps, "adherence of the reference", entry["reference"]["adherence"], None, None,
                          None])
        picked = entry.get("selected_on_tuning", {}).get("steps", {}).get(str(steps))
        if picked:
            summary[-1]["comfyui_selected_on_tuning"] = {k: p for k, p in picked.items() if k != "tuning_rows"}
            for label in ("any", "deterministic"):
                p = picked[label]
                for ours in [cal] + ([stochastic] if stochastic else []):
                    lines.append([kind, steps, f"adherence ({ours['sampler']}), ComfyUI's pick on tuning prompts "
                                  f"({label})", ours["adherence"], p["held_out_adherence"],
                                  f"{p['sampler']} + {p['scheduler']} (tied: {p['tied_at_top']}, their mean "
                                  f"{p['tied_mean_held_out_adherence']:.3g})", None])
    return lines, summary


def run_model(kind: str, n: int, scorer, which: str, reference_only: bool, log, stored: dict = None,
              step_counts=STEPS, mode: str = "fresh", calibrations: str = None, node_fit: bool = False) -> dict:
    """One checkpoint's rows.  mode "recalibrate": the ComfyUI rows of ``stored`` (an earlier run of it) are kept
    and only the calibrated rows run again (``node_fit``: as ``node_fit_rows``); "add_comfy": every stored row is
    kept and only the ComfyUI samplers of ``which`` that it lacks are run.  ``calibrations``: a folder to save the
    fits to (for --over-seeds)."""
    setup = Setup(kind, n, scorer, log)
    log(f"{kind}: reference adherence {setup.reference_scores['adherence']:.4g}")
    if reference_only:
        return {"model": kind, "prompts": n, "reference": setup.reference_scores}
    comfy = None if mode == "recalibrate" else setup.comfy()
    rows = []
    for steps in step_counts:
        kept = [r for r in stored["rows"] if r["steps"] == steps] if stored else []
        if mode == "add_comfy":
            have = {r["sampler"] for r in kept if r["impl"] == "comfyui"}
            rows += kept + comfy_rows(setup, comfy, [s for s in comfy_samplers(comfy, which) if s not in have],
                                      steps, log)
            continue
        calibrated = node_fit_rows(setup, steps, log) if node_fit else \
            calibrated_rows(setup, steps, log, held_out_fit_path(calibrations, kind, steps, n))
        log(f"{kind} {steps} steps calibrated: {calibrated}")
        rows += calibrated
        rows += [r for r in kept if not r["impl"].startswith("calibrated")] if mode == "recalibrate" else \
            comfy_rows(setup, comfy, comfy_samplers(comfy, which), steps, log)
    return {"model": kind, "prompts": n, "reference": setup.reference_scores, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 prompts, 8 ComfyUI samplers, nothing written")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--models", default="flow,eps", help="the models to run (none: only re-summarise); the stored "
                                                         "results of the others are kept")
    ap.add_argument("--comfy-samplers", choices=("all", "ode"), default="ode",
                    help="all of ComfyUI's samplers that run from sigmas, or its deterministic ones plus "
                         f"{', '.join(STOCHASTIC)}")
    ap.add_argument("--reference-only", action="store_true", help="add the reference's own scores to the "
                                                                  "stored results of --models")
    ap.add_argument("--recalibrate", action="store_true", help="run only the calibrated rows of --models again "
                                                                 "(after a change to the calibration); the stored "
                                                                 "ComfyUI rows are kept")
    ap.add_argument("--node-fit", action="store_true",
                    help="with --recalibrate: the calibrated rows as a node user with the Calibrated Scheduler's "
                         "default fit size gets them (one fit per prompt; node_fit_rows), written beside the stored "
                         "run as *_nodefit.json")
    ap.add_argument("--add-comfy", action="store_true", help="run only the ComfyUI samplers (of --comfy-samplers) "
                                                               "that the stored results of --models lack; every "
                                                               "stored row is kept")
    ap.add_argument("--select-on-tuning", action="store_true",
                    help="pick ComfyUI's best by adherence on tuning prompts of their own (as many as --prompts), "
                         "then score that pick on the stored held-out run of --models (16 prompts); with "
                         "--over-seeds: its best stochastic one by mean adherence over the re-noising seeds, scored "
                         "on the stored held-out rows over seeds; every stored row is kept")
    ap.add_argument("--tune-eta", action="store_true",
                    help="choose the stochastic calibrated rows' eta on tuning prompts of their own (as many as "
                         "--prompts), fitted on noise of their own; writes results/eta_tuning.json")
    ap.add_argument("--over-seeds", action="store_true",
                    help=f"score the stochastic rows of the stored run of --models over {OVER_SEEDS} re-noising seeds "
                         "(ours refitted, or loaded from --calibrations); every stored row is kept, and the rows over seeds "
                         "of the step counts not in --steps too")
    ap.add_argument("--calibrations", help="with --tune-eta or --over-seeds: a folder to load the fits from or save "
                                           "them to; with --recalibrate: a folder to save the new fits to")
    ap.add_argument("--steps", type=int_list, default=",".join(map(str, STEPS)), help="comma-separated step counts")
    ap.add_argument("--results", default="heldout_bundled.json", help="the results file in bench/results (a run "
                                                                     "with other prompts or steps: another file)")
    ap.add_argument("--threads", type=int, help="torch threads (default: up to 2); 1 when two runs share 2 cores")
    ap.add_argument("--scorer", default=os.path.join(HERE, "results", "shape_scorer.safetensors"))
    args = ap.parse_args()
    if args.node_fit and not (args.recalibrate and not (args.over_seeds or args.select_on_tuning or args.tune_eta)):
        ap.error("--node-fit goes with --recalibrate alone (the stored ComfyUI rows are kept)")
    torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    n = 16 if args.quick else args.prompts  # with --select-on-tuning: the tuning prompts (the held-out run's stay)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    scorer = adherence.Scorer(adherence.train_shape_net(args.scorer))
    path = os.path.join(RESULTS_DIR, args.results)
    out_name = args.results.replace(".json", "_nodefit.json") if args.node_fit else args.results
    step_counts = tuple(args.steps)
    stored = {}
    if os.path.isfile(path) and not args.quick:
        with open(path) as f:
            stored = {e["model"]: e for e in json.load(f)["results"]}
    t0 = time.perf_counter()
    if args.tune_eta:
        studies = [tune_eta(kind, n, scorer, step_counts, log, args.calibrations)
                   for kind in args.models.split(",") if kind and kind != "none"]
        choice = choose_eta(studies)
        print(table(["model", "steps", "eta", "adherence", "latent RMS", "image RMS"],
                    [[st["model"], steps, r["eta"], r["adherence"], r["latent_rms"], r["image_rms"]]
                     for st in studies for steps, cell in st["steps"].items() for r in cell["rows"]],
                    f"the calibrated sampler at each eta, {n} tuning prompts, cfg {CFG:g} (adherence: the mean over "
                    f"{TUNE_DRAW_SEEDS} re-noising seeds); best mean adherence: eta {choice['eta']:g}"))
        write_json("eta_tuning.json", {"environment": environment(), "cfg": CFG, "fit": DEFAULT_FIT,
                                       "etas": TUNE_ETAS, "draw_seeds": TUNE_DRAW_SEEDS, "choice": choice,
                                       "studies": studies, "seconds": time.perf_counter() - t0})
        return
    which = "quick" if args.quick else args.comfy_samplers
    for kind in [m for m in args.models.split(",") if m and m != "none"]:  # none: re-summarise the stored runs
        if args.over_seeds and args.select_on_tuning:
            if "over_seeds" not in stored.get(kind, {}):
                ap.error(f"--over-seeds --select-on-tuning: no {kind} rows over seeds in {args.results} to score "
                         "the pick on (run --over-seeds first)")
            picks = over_seeds_selected(kind, args.prompts, stored[kind], scorer, step_counts, log)
            kept = stored[kind]["over_seeds"].get("selected_on_tuning", {}).get("steps", {})
            picks["steps"] = {**kept, **picks["steps"]}  # the step counts not run now keep their picks
            stored[kind]["over_seeds"]["selected_on_tuning"] = picks
            continue
        if args.over_seeds:
            if kind not in stored or (args.recalibrate and "over_seeds" not in stored[kind]):
                ap.error(f"--over-seeds: no stored {kind} run (with --recalibrate: rows over seeds) in "
                         f"{args.results} to re-run the stochastic rows of")
            rows = over_seeds(kind, stored[kind], scorer, step_counts, log, args.calibrations, args.recalibrate)
            kept = stored[kind].get("over_seeds", {})
            rows["steps"] = {**kept.get("steps", {}), **rows["steps"]}  # the step counts not run now are kept
            if "selected_on_tuning" in kept:  # read from ComfyUI's held-out rows, which a re-run reproduces
                rows["selected_on_tuning"] = kept["selected_on_tuning"]
            stored[kind]["over_seeds"] = rows
            continue
        if args.select_on_tuning:
            if kind not in stored:
                ap.error(f"--select-on-tuning: no stored {kind} run in {args.results} to score the pick on")
            stored[kind]["selected_on_tuning"] = select_on_tuning(kind, args.prompts, scorer, which, stored[kind],
                                                                  step_counts, log)
            continue
        mode = "recalibrate" if args.recalibrate else "add_comfy" if args.add_comfy else "fresh"
        if mode != "fresh" and (kind not in stored or stored[kind]["prompts"] != n or
                                {r["steps"] for r in stored[kind]["rows"]} != set(step_counts)):
            ap.error(f"--{mode.replace('_', '-')}: no stored {kind} run with {n} prompts and steps "
                     f"{','.join(map(str, step_counts))} in {args.results} to keep the rows of")
        entry = run_model(kind, n, scorer, which, args.reference_only, log,
                          stored.get(kind) if mode != "fresh" else None, step_counts, mode, args.calibrations,
                          args.node_fit)
        if args.reference_only:
            stored.setdefault(kind, {"model": kind, "prompts": n, "rows": []})["reference"] = entry["reference"]
        else:
            if mode != "fresh" and "selected_on_tuning" in stored[kind]:  # the ComfyUI rows it was scored on stay
                entry["selected_on_tuning"] = stored[kind]["selected_on_tuning"]
            if mode != "fresh" and "over_seeds" in stored[kind]:  # ComfyUI's rows over seeds stay valid; after a
                entry["over_seeds"] = stored[kind]["over_seeds"]  # refit, --over-seeds --recalibrate redoes ours
            stored[kind] = entry
    if args.node_fit:  # its file holds the models fitted at node size: now, or by an earlier run (read now, so
        ran_now = [m for m in args.models.split(",") if m and m != "none"]  # that two runs side by side keep both)
        earlier = os.path.join(RESULTS_DIR, out_name)
        if os.path.isfile(earlier):
            with open(earlier) as f:
                kept = {e["model"]: e for e in json.load(f)["results"] if e["model"] not in ran_now}
        else:
            kept = {}
        stored = {**kept, **{m: stored[m] for m in ran_now}}
    if args.select_on_tuning or args.over_seeds:  # the tables and the file are the held-out run's
        n = max(e["prompts"] for e in stored.values())
    lines, summary = [], []
    for entry in stored.values():
        if entry.get("rows"):
            more_lines, more_summary = summarise(entry)
            lines += more_lines
            summary += more_summary
    print(table(["model", "steps", "score", "calibrated", "ComfyUI best", "ComfyUI's pick", "ratio"], lines,
                f"bundled networks, cfg {CFG:g}, {n} held-out prompts (latent / image RMS: lower is better; "
                "adherence: higher is better)"))
    seeded = [line for e in stored.values() if e.get("over_seeds") for line in summarise_over_seeds(e["model"],
                                                                                                     e["over_seeds"])]
    if seeded:
        print(table(["model", "steps", "ours", "adherence", "ComfyUI best", "ComfyUI's pick", "ComfyUI above ours",
                     "ComfyUI's best with the evaluation seed alone", "ComfyUI's pick on tuning prompts"], seeded,
                    f"the stochastic rows, mean adherence over {OVER_SEEDS} re-noising seeds (the evaluation seed "
                    "first; the same start noise)"))
    if not args.quick:
        ran = sorted({r["sampler"] for e in stored.values() for r in e.get("rows", []) if r["impl"] == "comfyui"})
        fit = {**NODE_SIZE_FIT, "fit_noises": NODE_FIT["fit_noises"], "per_prompt": True} if args.node_fit \
            else DEFAULT_FIT
        write_json(out_name, {"environment": environment(), "cfg": CFG, "prompts": n, "comfy_samplers": ran,
                              "reference_steps": REFERENCE_STEPS, "fit": fit, "summary": summary,
                              "results": list(stored.values()),
                              # this invocation's time only: a --recalibrate or --add-comfy run keeps the
                              # rows (and their fit_seconds) of earlier ones
                              "seconds_this_invocation": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
