"""Model calls: with CFG exactly one batched model call per model evaluation; at cfg = 1 no negative work at all.

For every sampler, on the analytic model of tests/analytic.py (a real
``DiffusionModel`` whose network records each forward pass and its batch):

* through ``ksampler.pipeline.ksample`` (the KSampler node's path): the
  network's forward passes and their batch sizes;
* through a ``GuidedDenoiser`` bound by hand: how often the sampler asked for
  a denoised estimate (evaluations), and the guidance counters
  ``model_calls`` (batched forward passes) and ``items_evaluated``
  (conditioning entries run: positive + negative).

Asserted: forward passes == evaluations (one batched call per evaluation, and
per step for one-evaluation samplers); at cfg != 1 each pass carries positive
and negative together (batch 2B); at cfg = 1 each pass carries B items and
the negative is never evaluated.  The CFG++ samplers are the documented
exception at cfg = 1: their update needs the unconditional estimate itself
(as in ComfyUI, which disables its cfg = 1 shortcut for them), so they still
run both halves in one batched call; except those whose traits say
``cfg1_shortcut`` (cfgpp_ud10_ab, which keeps ComfyUI's shortcut).

Usage: python bench/model_calls.py
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from _common import environment, require_ksampler, table, write_json  # noqa: E402

require_ksampler()
from analytic import analytic_model, conditioning  # noqa: E402
from ksampler.conditioning import Guidance  # noqa: E402
from ksampler.pipeline import ksample, sample  # noqa: E402
from ksampler.samplers import SAMPLERS, sampler_traits  # noqa: E402
from ksampler.schedulers import sampling_sigmas  # noqa: E402

STEPS, BATCH = 6, 2


class CountingGuided:
    """Counts the sampler's requests for a denoised estimate, passing them to a GuidedDenoiser."""

    def __init__(self, guided):
        self.guided, self.model_sampling = guided, guided.model_sampling
        self.evaluations = 0

    def __call__(self, x, sigma, **kw):
        self.evaluations += 1
        return self.guided(x, sigma, **kw)

    def denoise_with_uncond(self, x, sigma, **kw):
        self.evaluations += 1
        return self.guided.denoise_with_uncond(x, sigma, **kw)


def check(name: str, cfg: float) -> dict:
    pos, neg = conditioning(1.0), conditioning(-0.5)
    latent = torch.zeros(BATCH, 4, 8, 8)
    cfg_pp = sampler_traits(name).cfg_pp

    model = analytic_model()
    ksample(model, 3, STEPS, cfg, name, "karras", pos, neg, {"samples": latent})
    passes = list(model.network.calls)

    model2 = analytic_model()
    ms = model2.model_sampling
    guided = Guidance(pos, neg, cfg).bind(model2, ms, latent.shape, torch.device("cpu"))
    counting = CountingGuided(guided)
    discard = sampler_traits(name).discard_penultimate_sigma
    sigmas = sampling_sigmas(ms, "karras", STEPS, discard_penultimate_sigma=discard)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sample(counting, ms, noise, latent, sigmas, None, name, 3)

    need_negative = cfg != 1.0 or (cfg_pp and not sampler_traits(name).cfg1_shortcut)
    expected_batch = 2 * BATCH if need_negative else BATCH
    rec = {"sampler": name, "cfg": cfg, "steps": len(sigmas) - 1, "evaluations": counting.evaluations,
           "model_calls": guided.model_calls, "items_evaluated": guided.items_evaluated,
           "ksample_forward_passes": len(passes), "ksample_batches": sorted(set(passes)),
           "negative_items": guided.items_evaluated - guided.model_calls, "cfg_pp": cfg_pp}
    problems = []
    if guided.model_calls != counting.evaluations:
        problems.append(f"{guided.model_calls} batched calls for {counting.evaluations} evaluations")
    if len(passes) != counting.evaluations:
        problems.append(f"ksample made {len(passes)} forward passes for {counting.evaluations} evaluations")
    if any(b != expected_batch for b in passes):
        problems.append(f"batches {sorted(set(passes))}, expected {expected_batch}")
    items_per_call = 2 if need_negative else 1
    if guided.items_evaluated != items_per_call * guided.model_calls:
        problems.append(f"{guided.items_evaluated} items in {guided.model_calls} calls, expected {items_per_call} each")
    rec["ok"] = not problems
    rec["problems"] = problems
    return rec


def main() -> None:
    torch.set_num_threads(1)
    records = [check(name, cfg) for cfg in (7.0, 1.0) for name in SAMPLERS]
    rows = [[r["sampler"], r["cfg"], r["steps"], r["evaluations"], r["model_calls"], r["items_evaluated"],
             r["ksample_forward_passes"], "/".join(map(str, r["ksample_batches"])),
             ("no" if r["negative_items"] == 0 else "yes (CFG++ needs uncond)") if r["cfg"] == 1.0 else
             "batched with positive",
             "ok" if r["ok"] else "; ".join(r["problems"])] for r in records]
    print(table(["sampler", "cfg", "steps", "evaluations", "model_calls", "items", "ksample passes",
                 f"pass batch (B={BATCH})", "negative evaluated", "check"], rows,
                f"Model calls per sampler ({STEPS} karras steps, batch {BATCH})"))
    bad = [r for r in records if not r["ok"]]
    one_eval = [r for r in records if r["cfg"] == 7.0 and r["evaluations"] == r["steps"]]
    print(f"\n{len(records) - len(bad)}/{len(records)} checks pass; with CFG, {len(one_eval)} samplers make exactly "
          f"one batched call per step (the rest: one per evaluation, e.g. heun's two per step); at cfg = 1 the "
          f"negative is never evaluated except by the CFG++ samplers (not cfgpp_ud10_ab, which keeps ComfyUI's "
          f"shortcut).")
    path = write_json("model_calls.json", {"environment": environment(), "records": records})
    print(f"wrote {path}")
    assert not bad, f"model-call checks failed: {[(r['sampler'], r['cfg'], r['problems']) for r in bad]}"


if __name__ == "__main__":
    main()
