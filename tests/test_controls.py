"""Issue 12's controls: variation seeds, guidance schedule, sampler options, two models, previews."""
import math

import pytest
import torch

from analytic import analytic_model, conditioning
from comfy_standins import StandInModelPatcher, install
from ksampler.conditioning import Guidance, GuidanceSchedule, KSamplerInputError
from ksampler.nodes import NODE_CLASS_MAPPINGS, KSamplerAdvanced, KSamplerTwoModels, SamplerOptions
from ksampler.pipeline import ksample, sample
from ksampler.samplers import SAMPLERS
from ksampler.samplers.noise import mix_variation, prepare_noise
from ksampler.samplers.options import parse_options, resolve_sampler_options, sampler_option_defaults
from ksampler.schedulers import sampling_sigmas
from ksampler.twomodel import check_same_sampling, noise_level, switch_step

POS, NEG = conditioning(1.0), conditioning(-1.0)
ADV_REQUIRED = ("enable", 3, 6, 4.0, "euler", "karras", POS, NEG)


def _latent(batch=2, channels=4):
    return {"samples": torch.zeros(batch, channels, 8, 8)}


def _adv(model, latent, sampler="euler", **optional):
    args = (model, "enable", 3, 6, 4.0, sampler, "karras", POS, NEG, latent, 0, 10000, "disable")
    return KSamplerAdvanced().sample(*args, **optional)[0]["samples"]


# ---- defaults change nothing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "euler_ancestral"])
def test_new_inputs_at_their_defaults_leave_the_latent_bit_identical(sampler):
    model = analytic_model(flow=sampler == "euler")
    base = _adv(model, _latent(), sampler)
    defaults = {name: spec[1].get("default", spec[0][0] if isinstance(spec[0], list) else None)
                for name, spec in KSamplerAdvanced.INPUT_TYPES()["optional"].items()}
    defaults["sampler_options"] = None
    assert torch.equal(base, _adv(model, _latent(), sampler, **defaults))
    plain = ksample(model, 3, 6, 4.0, sampler, "karras", POS, NEG, _latent())["samples"]
    assert torch.equal(base, plain)


def test_new_inputs_are_optional_and_appended_at_the_end():
    optional = list(KSamplerAdvanced.INPUT_TYPES()["optional"])
    assert optional[:5] == ["batch_invariant_noise", "cpu_noise", "brownian_noise", "flow_geometry", "karras_rho"]
    assert optional[5:] == ["variation_seed", "variation_strength", "cfg_sigma_min", "cfg_sigma_max", "cfg_ramp",
                            "cfg_ramp_end", "cfg_stop_at", "sampler_options", "preview"]
    assert "ksampler_KSamplerTwoModels" in NODE_CLASS_MAPPINGS and "ksampler_SamplerOptions" in NODE_CLASS_MAPPINGS


# ---- variation seeds ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_variation_strength_0_is_the_seed_and_1_the_variation_seed_bit_for_bit(sampler):
    model = analytic_model()
    run = lambda seed, **kw: ksample(model, seed, 5, 3.0, sampler, "normal", POS, NEG, _latent(), **kw)["samples"]
    assert torch.equal(run(3, variation_seed=11, variation_strength=0.0), run(3))
    if sampler == "euler":  # deterministic: the whole run follows the initial noise
        assert torch.equal(run(3, variation_seed=11, variation_strength=1.0), run(11))
    mixed = run(3, variation_seed=11, variation_strength=0.3)
    assert not torch.equal(mixed, run(3)) and torch.isfinite(mixed).all()


def test_variation_at_strength_1_gives_the_variation_seeds_initial_noise():
    latent = torch.zeros(3, 4, 8, 8)
    a, b = prepare_noise(latent, 3), prepare_noise(latent, 11)
    assert torch.equal(mix_variation(a, b, 1.0), b) and torch.equal(mix_variation(a, b, 0.0), a)


@pytest.mark.parametrize("strength", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_mixed_noise_has_unit_variance_and_the_expected_correlation(strength):
    n = 400_000
    a = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mixed = mix_variation(a, b, strength)
    # the sample variance of n unit Gaussians has std sqrt(2 / n) = 0.0022: 5 sigma
    assert abs(float(mixed.var()) - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(float(mixed.mean())) < 5 / math.sqrt(n)
    corr = float((mixed * a).mean())
    assert abs(corr - math.cos(strength * math.pi / 2)) < 5 / math.sqrt(n)
    # a plain linear mix would lose variance (the blur other packs had to fix): ours does not
    linear = (1 - strength) * a + strength * b
    assert float(linear.var()) < 0.95 or strength in (0.1, 0.9)


def test_variation_item_k_is_independent_of_the_batch_size():
    from ksampler.pipeline import NoiseOptions
    model = analytic_model()
    options = NoiseOptions(batch_invariant=True)
    run = lambda latent: ksample(model, 3, 5, 3.0, "euler_ancestral", "normal", POS, NEG, latent, variation_seed=9,
                                 variation_strength=0.4, noise_options=options)["samples"]
    four = run(_latent(4))
    one = run({"samples": torch.zeros(1, 4, 8, 8), "batch_index": [2]})
    torch.testing.assert_close(one[0], four[2], rtol=0, atol=1e-6)


def test_variation_bad_inputs_name_the_input():
    model = analytic_model()
    with pytest.raises(KSamplerInputError, match="variation_strength"):
        ksample(model, 3, 5, 3.0, "euler", "normal", POS, NEG, _latent(), variation_seed=1, variation_strength=1.5)
    with pytest.raises(KSamplerInputError, match="variation_seed"):
        ksample(model, 3, 5, 3.0, "euler", "normal", POS, NEG, _latent(), variation_seed=-1, variation_strength=0.5)


# ---- guidance schedule ----------------------------------------------------------------------------------------
class CountingModel:
    """Wraps a model: records (sigma, batch) of every forward pass."""

    def __init__(self, model):
        self.model, self.model_sampling, self.latent_format = model, model.model_sampling, model.latent_format
        self.calls = []

    def apply_model(self, x, sigma, **kw):
        self.calls.append((float(sigma.reshape(-1)[0]), x.shape[0]))
        return self.model.apply_model(x, sigma, **kw)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_no_negative_pass_outside_the_guidance_interval(sampler):
    model = CountingModel(analytic_model())
    sigmas = sampling_sigmas(model.model_sampling, "karras", 10)
    low, high = float(sigmas[6]), float(sigmas[2])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sample(model, None, noise, torch.zeros_like(noise), sigmas, Guidance(POS, NEG, 5.0), sampler,
           guidance_schedule=GuidanceSchedule(low, high))
    assert model.calls
    for sigma, batch in model.calls:
        inside = low <= sigma <= high
        assert batch == (4 if inside else 2), (sigma, batch, low, high)
    assert any(b == 4 for _, b in model.calls) and any(b == 2 for _, b in model.calls)


def test_guidance_interval_changes_only_the_steps_outside_it():
    """Interval covering every sigma = plain CFG; empty interval = cfg 1 everywhere."""
    model = analytic_model()
    run = lambda cfg, schedule=None: ksample(model, 3, 6, cfg, "euler", "karras", POS, NEG, _latent(),
                                             guidance_schedule=schedule)["samples"]
    everywhere = GuidanceSchedule(0.0, 1000.0)   # not the default object: exercises the scheduled path
    torch.testing.assert_close(run(5.0, everywhere), run(5.0), rtol=0, atol=0)
    torch.testing.assert_close(run(5.0, GuidanceSchedule(500.0, 600.0)), run(1.0), rtol=0, atol=0)


def test_cfg_ramp_and_stop_values():
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.5, 0.0]
    ramp = GuidanceSchedule(ramp="linear", cfg_end=1.0).bind(sigmas, 9.0)
    assert [ramp(s) for s in sigmas[:-1]] == pytest.approx([9.0, 7.0, 5.0, 3.0, 1.0])
    assert ramp(7.5) == pytest.approx(8.0)        # between steps 0 and 1 (heun's second call, ...)
    stop = GuidanceSchedule(stop_fraction=0.4).bind(sigmas, 6.0)
    assert [stop(s) for s in sigmas[:-1]] == [6.0, 6.0, 1.0, 1.0, 1.0]
    assert GuidanceSchedule.from_inputs() is None


def test_guidance_schedule_errors_name_the_input():
    with pytest.raises(KSamplerInputError, match="cfg_sigma_min"):
        GuidanceSchedule(3.0, 1.0)
    with pytest.raises(KSamplerInputError, match="cfg_ramp"):
        GuidanceSchedule(ramp="cosine")
    with pytest.raises(KSamplerInputError, match="cfg_stop_at"):
        GuidanceSchedule(stop_fraction=1.5)


# ---- sampler options ------------------------------------------------------------------------------------------
def test_sampler_options_reach_the_sampler_and_change_the_result():
    model = analytic_model()
    run = lambda opts: ksample(model, 3, 6, 3.0, "euler_ancestral", "karras", POS, NEG, _latent(),
                               sampler_options=opts)["samples"]
    assert torch.equal(run({"eta": 1.0}), run(None))
    assert not torch.equal(run({"eta": 0.5}), run(None))
    # eta 0 makes euler_ancestral euler
    euler = ksample(model, 3, 6, 3.0, "euler", "karras", POS, NEG, _latent())["samples"]
    torch.testing.assert_close(run({"eta": 0.0}), euler, rtol=1e-5, atol=1e-5)


def test_an_option_the_sampler_ignores_is_an_error_naming_both():
    with pytest.raises(KSamplerInputError, match=r"'dpmpp_2m' does not take 'eta'"):
        resolve_sampler_options("dpmpp_2m", {"eta": 0.5})
    with pytest.raises(KSamplerInputError, match="s_noise"):
        resolve_sampler_options("euler", {"s_noise": "big"})
    with pytest.raises(KSamplerInputError, match="solver_type"):
        resolve_sampler_options("er_sde", {"solver_type": "RK4"})
    with pytest.raises(KSamplerInputError, match="not name=value"):
        parse_options("eta")
    with pytest.raises(KSamplerInputError, match="no sampler takes"):
        parse_options("etaa=1")


def test_an_option_given_twice_is_an_error_and_the_text_overrides_its_base():
    """A repeated option (a pasted line, say) is an error naming both values, where the last one used to win
    silently; extending a base (the node's base input) is what overrides, by design."""
    with pytest.raises(KSamplerInputError, match=r"^sampler_options: eta is given twice \(0\.5 and 1\.0\); keep one"):
        parse_options("eta=0.5, s_noise=1.0\neta=1.0")
    with pytest.raises(KSamplerInputError, match="s_noise is given twice"):
        parse_options(["s_noise=1", " s_noise = 1"])
    assert parse_options("eta=1.0", {"eta": 0.5, "s_noise": 1.1}) == {"eta": 1.0, "s_noise": 1.1}
    base = {"eta": 0.5}
    parse_options("eta=0.2", base)
    assert base == {"eta": 0.5}  # the base is not changed


@pytest.mark.parametrize("name, options", [("er_sde", {"solver_type": "ODE", "max_stage": 2}),
                                           ("er_sde", {"solver_type": "Reverse-time SDE", "eta": 0.5}),
                                           ("sa_solver", {"eta": 0.3, "sde_start_percent": 0.1}),
                                           ("restart", {"restart_k": 1, "restart_n": 2, "restart_t_max": 1.5}),
                                           ("euler", {"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 5.0}),
                                           ("dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"})])
def test_every_documented_option_family_runs(name, options):
    model = analytic_model()
    run = lambda opts: ksample(model, 3, 8, 3.0, name, "karras", POS, NEG, _latent(), sampler_options=opts)["samples"]
    out = run(options)
    assert torch.isfinite(out).all() and not torch.equal(out, run(None))


def test_er_sde_ode_option_draws_no_noise():
    model = analytic_model()
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    run = lambda seed, opts: ksample(model, seed, 8, 3.0, "er_sde", "karras", POS, NEG, latent, add_noise=False,
                                     sampler_options=opts)["samples"]
    assert torch.equal(run(1, {"solver_type": "ODE"}), run(2, {"solver_type": "ODE"}))
    assert not torch.equal(run(1, None), run(2, None))


def test_sampler_options_node_and_the_every_sampler_table():
    opts = SamplerOptions().build("eta=0.5\ns_noise=1.1")[0]
    assert opts == {"eta": 0.5, "s_noise": 1.1}
    assert SamplerOptions().build("eta=0.2", base=opts)[0] == {"eta": 0.2, "s_noise": 1.1}
    for name in SAMPLERS:
        for key, default in sampler_option_defaults(name).items():
            if default is not None and not callable(default):
                resolve_sampler_options(name, {key: default})   # every default is accepted back


def test_two_model_error_when_the_model_samplings_differ():
    with pytest.raises(KSamplerInputError, match="model_low"):
        KSamplerTwoModels().sample(analytic_model(flow=True), analytic_model(), 1, 6, 3.0, 3.0, "euler", "karras",
                                   POS, NEG, _latent(), 0.875, "sigma", 3)
    check_same_sampling(analytic_model().model_sampling, analytic_model(kind="eps").model_sampling)


# ---- two models -----------------------------------------------------------------------------------------------
def test_switch_step_follows_the_boundary_in_sigma_for_flow_models():
    ms = analytic_model(flow=True).model_sampling          # shift 3: the boundary is still on sigma
    sigmas = sampling_sigmas(ms, "simple", 10)
    k = switch_step(ms, sigmas, 0.875)
    assert all(float(s) >= 0.875 for s in sigmas[:k]) and float(sigmas[k]) < 0.875
    assert noise_level(ms, 0.5) == 0.5
    eps = analytic_model().model_sampling
    assert 0.0 <= noise_level(eps, 1.0) <= 1.0 and noise_level(eps, 14.0) > 0.99


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_two_models_equal_two_chained_advanced_samplers(sampler):
    high, low = analytic_model(flow=True), analytic_model(flow=True)
    low.network.s0 = 0.5      # a different expert
    latent = _latent(1)
    out, switch = KSamplerTwoModels().sample(high, low, 4, 8, 5.0, 2.0, sampler, "simple", POS, NEG, latent, 0.875,
                                             "sigma", 0)
    assert 0 < switch < 8
    adv = KSamplerAdvanced()
    first = adv.sample(high, "enable", 4, 8, 5.0, sampler, "simple", POS, NEG, latent, 0, switch, "enable")[0]
    ref = adv.sample(low, "disable", 4, 8, 2.0, sampler, "simple", POS, NEG, first, switch, 10000, "disable")[0]
    assert torch.equal(out["samples"], ref["samples"])
    by_step, k = KSamplerTwoModels().sample(high, low, 4, 8, 5.0, 2.0, sampler, "simple", POS, NEG, latent, 0.875,
                                            "step", switch)
    assert k == switch and torch.equal(by_step["samples"], out["samples"])
    only_high, k = KSamplerTwoModels().sample(high, low, 4, 8, 5.0, 2.0, sampler, "simple", POS, NEG, latent, 0.0,
                                              "sigma", 0)
    assert k == 8
    plain = ksample(high, 4, 8, 5.0, sampler, "simple", POS, NEG, latent)["samples"]
    assert torch.equal(only_high["samples"], plain)


# ---- previews -------------------------------------------------------------------------------------------------
def test_preview_modes_give_the_callback_denoised_or_noisy():
    """'noisy' shows the state; 'denoised' the latest model estimate, which differs from the sampler's report where
    the sampler reports an earlier estimate (restart reports the estimate before its restart loop)."""
    model = analytic_model()

    def frames(sampler, mode):
        out = []
        ksample(model, 3, 6, 3.0, sampler, "karras", POS, NEG, _latent(1), preview=mode,
                callback=lambda i, d, x, t: out.append((d.clone(), x.clone())))
        return out
    for d, x in frames("euler", "noisy"):
        assert torch.equal(d, x)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(frames("euler", "default"), frames("euler", "denoised")))
    default, latest = frames("restart", "default"), frames("restart", "denoised")
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(default, latest))
    with pytest.raises(KSamplerInputError, match="preview"):
        ksample(model, 3, 4, 3.0, "heun", "karras", POS, NEG, _latent(1), preview="x0")


# ---- inside ComfyUI (stand-in host) ----------------------------------------------------------------------------
def test_host_guidance_schedule_skips_the_unconditional_pass(monkeypatch):
    modules, adapter = install(monkeypatch)
    patcher = StandInModelPatcher(modules, "eps")
    calls = modules["comfy.samplers"].STANDIN_CALLS
    sigmas = sampling_sigmas(patcher.model_sampling_object, "karras", 8)
    schedule = GuidanceSchedule(float(sigmas[5]), float(sigmas[2]))
    out = adapter.common_ksampler(patcher, 5, 8, 4.0, "euler", "karras", POS, NEG, _latent(1),
                                  guidance_schedule=schedule)
    assert torch.isfinite(out["samples"]).all()
    assert calls["model"] == 8 and calls["uncond"] == 4          # steps 2, 3, 4, 5 are inside the interval
    plain = adapter.common_ksampler(patcher, 5, 8, 4.0, "euler", "karras", POS, NEG, _latent(1))
    assert not torch.equal(plain["samples"], out["samples"])


def test_host_variation_and_options_and_preview(monkeypatch):
    modules, adapter = install(monkeypatch)
    patcher = StandInModelPatcher(modules, "flow")
    run = lambda seed=5, **kw: adapter.common_ksampler(patcher, seed, 6, 3.0, "euler_ancestral", "karras", POS, NEG,
                                                       _latent(1), **kw)["samples"]
    assert torch.equal(run(variation_seed=9, variation_strength=0.0), run())
    assert not torch.equal(run(variation_seed=9, variation_strength=0.5), run())
    assert not torch.equal(run(sampler_options={"eta": 0.3}), run())
    with pytest.raises(KSamplerInputError, match="does not take"):
        run(sampler_options={"s_churn": 0.3})
    assert torch.equal(run(preview="denoised"), run())


def test_controls_and_two_models_in_a_workflow_of_the_bundled_nodes():
    """The new nodes run in the pack's own executor, on the bundled models, with links between them."""
    from ksampler.workflow import Executor
    graph = {
        "1": {"class_type": "ksampler_CheckpointLoader", "inputs": {"ckpt_name": "flow"}},
        "2": {"class_type": "ksampler_TextEncode", "inputs": {"text": "a large red circle", "clip": ["1", 1]}},
        "3": {"class_type": "ksampler_TextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "ksampler_EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "ksampler_SamplerOptions", "inputs": {"options": "eta=0.5"}},
        "6": {"class_type": "ksampler_KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": "enable", "noise_seed": 1, "steps": 4, "cfg": 5.0,
            "sampler_name": "euler_ancestral", "scheduler": "karras", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable",
            "variation_seed": 2, "variation_strength": 0.3, "cfg_sigma_min": 0.1, "cfg_sigma_max": 0.9,
            "sampler_options": ["5", 0], "preview": "denoised"}},
        "7": {"class_type": "ksampler_KSamplerTwoModels", "inputs": {
            "model_high": ["1", 0], "model_low": ["1", 0], "noise_seed": 1, "steps": 4, "cfg_high": 5.0,
            "cfg_low": 2.0, "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
            "negative": ["3", 0], "latent_image": ["4", 0], "boundary": 0.875, "switch_by": "sigma",
            "switch_at_step": 2}},
    }
    results = Executor().run(graph, outputs=["6", "7"])
    assert torch.isfinite(results["6"][0]["samples"]).all()
    latent, switch = results["7"]
    assert torch.isfinite(latent["samples"]).all() and switch == 1     # simple, 4 steps: only sigma 1.0 >= 0.875
