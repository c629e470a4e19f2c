"""Bad sampler options (the Advanced node's sampler_options, the Sampler Options+ node, the CLI's --sampler-option)
get one clear error naming the option, the sampler and the allowed range, before sampling starts; never a hang, a
bare Python error from deep in a sampler, or a NaN blamed on the model's weights alone."""
import copy
import math

import pytest
import torch

from analytic import analytic_model, conditioning
from ksampler.__main__ import main
from ksampler.conditioning import KSamplerInputError
from ksampler.guard import NonFiniteOutputError
from ksampler.nodes import KSamplerAdvanced, SamplerOptions
from ksampler.pipeline import ksample
from ksampler.sampling_pass import NoiseOptions, run_sampler
from ksampler.samplers import COMFY_SAMPLER_NAMES, SAMPLERS
from ksampler.samplers.options import (all_option_names, option_range, resolve_sampler_options,
                                       sampler_option_defaults)

MODEL = analytic_model()
P, N = conditioning(1.0), conditioning(-1.0)
BUILT_IN = [name for name in SAMPLERS if name in COMFY_SAMPLER_NAMES or name in ("dpmpp_3m", "restart", "tcd")]


def latent():
    return {"samples": torch.zeros(1, 4, 8, 8)}


def adv(sampler, options, steps=3):
    return KSamplerAdvanced().sample(MODEL, "enable", 1, steps, 3.0, sampler, "karras", P, N, latent(), 0, 10000,
                                     "disable", sampler_options=options)


# options that must not be above their partner
PAIRS = {"s_tmin": "s_tmax", "r_1": "r_2", "sde_start_percent": "sde_end_percent", "restart_t_min": "restart_t_max"}
PAIRED = {upper: lower for lower, upper in PAIRS.items()}


def numeric_options():
    """(sampler, option, default) for every numeric option of every built-in sampler."""
    return [(name, key, default) for name in BUILT_IN for key, default in sampler_option_defaults(name).items()
            if isinstance(default, (int, float)) and not isinstance(default, bool)]


# ---- the findings -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, options, named", [
    ("restart", {"restart_k": 10 ** 8}, "restart_k"),          # ran forever
    ("restart", {"restart_k": 2 ** 70}, "restart_k"),
    ("restart", {"restart_n": 10 ** 8}, "restart_n"),
    ("dpmpp_sde", {"r": 0.0}, "r"),                             # ZeroDivisionError
    ("seeds_2", {"r": 0.0}, "r"),
    ("seeds_3", {"r_1": 0.0}, "r_1"),
    ("seeds_3", {"r_2": 5.0}, "r_2"),                           # math domain error
    ("seeds_3", {"r_1": 0.8, "r_2": 0.5}, "r_1"),               # math domain error: stages out of order
    ("dpm_adaptive", {"pcoeff": 1e9}, "pcoeff"),                # OverflowError
    ("dpm_adaptive", {"h_init": 0.0}, "h_init"),                # NaN blamed on the model
    ("dpm_adaptive", {"rtol": 0.0, "atol": 0.0}, "atol"),
    ("dpm_adaptive", {"accept_safety": 3.0}, "accept_safety"),  # no step ever accepted
    ("dpm_adaptive", {"eta": 20.0}, "eta"),                     # thousands of steps
    ("er_sde", {"eta": 1e9, "solver_type": "Reverse-time SDE"}, "eta"),
    ("sa_solver", {"sde_start_percent": 0.9, "sde_end_percent": 0.1}, "sde_start_percent"),
    ("restart", {"restart_t_min": 3.0}, "restart_t_min"),
    ("euler", {"s_churn": 1.0, "s_tmin": 5.0, "s_tmax": 1.0}, "s_tmin"),
])
def test_an_option_that_hangs_crashes_or_turns_nan_is_refused_before_sampling(sampler, options, named, monkeypatch):
    calls = []
    monkeypatch.setattr(MODEL, "apply_model", lambda *a, **k: calls.append(1))   # no model call may happen
    given = copy.deepcopy(options)
    with pytest.raises(KSamplerInputError, match=rf"{named}\b.*{sampler}|{sampler}.*{named}\b"):
        adv(sampler, options)
    assert options == given and not calls


@pytest.mark.parametrize("option, sampler, value", [("weights", "lms", 1.0), ("weights", "lms", "x"),
                                                     ("step_update", "dpmpp_2m_sde", 1.0),
                                                     ("step_update", "dpmpp_3m_sde", "fast")])
def test_function_parameters_are_not_options(option, sampler, value):
    assert option not in all_option_names() and option not in sampler_option_defaults(sampler)
    with pytest.raises(KSamplerInputError, match=f"no sampler takes '{option}'"):
        SamplerOptions().build(f"{option}=1")
    with pytest.raises(KSamplerInputError, match=rf"{option} \(sampler {sampler}\).*function"):
        adv(sampler, {option: value})


def test_a_function_parameter_still_takes_a_function_through_the_python_api():
    from ksampler.samplers.multistep import lms_coefficients
    from ksampler.samplers.reference import comfy_msde_update
    kwargs, _ = resolve_sampler_options("lms", {"weights": lms_coefficients})
    assert kwargs == {"weights": lms_coefficients}
    # with ComfyUI's Brownian tree the sampling pass runs ComfyUI's update order (reference.py): the same function
    plain = ksample(MODEL, 1, 4, 3.0, "dpmpp_2m_sde", "karras", P, N, latent())["samples"]
    given = ksample(MODEL, 1, 4, 3.0, "dpmpp_2m_sde", "karras", P, N, latent(),
                    sampler_options={"step_update": comfy_msde_update})["samples"]
    assert torch.equal(plain, given)


@pytest.mark.parametrize("sampler, options, named", [
    ("euler_ancestral", {"noise_sampler": 5}, "noise_sampler"),
    ("sa_solver", {"tau_func": "x"}, "tau_func"),
    ("er_sde", {"noise_scaler": 3}, "noise_scaler"),
    ("restart", {"restart_list": {"a": 1}}, "restart_list"),
    ("restart", {"restart_list": {0.1: [2, 10 ** 8, 2.0]}}, "restart_k"),
    ("restart", {"restart_list": {0.1: [0, 2, 2.0]}}, "restart_list"),
    ("restart", {"restart_list": [1, 2]}, "restart_list"),
    ("dpm_adaptive", {"return_info": True}, "return_info"),
])
def test_python_api_parameters_are_checked_for_their_kind(sampler, options, named):
    with pytest.raises(KSamplerInputError, match=named):
        resolve_sampler_options(sampler, options)


# ---- every option of every sampler: type and range -------------------------------------------------------------
def test_every_numeric_option_of_every_built_in_sampler_has_a_range_in_the_table():
    missing = [(name, key) for name, key, _ in numeric_options() if option_range(name, key) is None]
    assert not missing
    for name, key, default in numeric_options():
        low, high = option_range(name, key)
        assert low <= default <= high, (name, key)      # the default is always allowed


def _bad_values(name, key, default):
    low, high = option_range(name, key)
    bad = [math.nan, True, "1", None, [1]]
    if high != math.inf:
        bad += [math.inf, high * 2 + 1]
    if isinstance(default, int):
        bad.append(low + 0.5)                            # not an integer
    bad.append(-math.inf if low == 0 else low / 2 if low > 0 else low - 1)
    if low == 0:
        bad.append(-1)
    return bad


@pytest.mark.parametrize("name, key, default", numeric_options(), ids=lambda v: str(v))
def test_every_numeric_option_refuses_wrong_types_and_values_outside_its_range(name, key, default):
    low, high = option_range(name, key)
    for value in _bad_values(name, key, default):
        with pytest.raises(KSamplerInputError, match=rf"{key} \(sampler {name}\): must be an? (integer|number) "
                                                     f"from {low:g} to {high:g}"):
            resolve_sampler_options(name, {key: value})
    for value in (low, high if high != math.inf else 1e30):   # both ends of the range are allowed
        options = {key: value}
        if key in PAIRS:                                 # with the option it must stay below at its far end
            options[PAIRS[key]] = option_range(name, PAIRS[key])[1]
        elif key in PAIRED:
            options[PAIRED[key]] = option_range(name, PAIRED[key])[0]
        if name == "restart" and options.get("restart_t_min") == options.get("restart_t_max"):
            continue                                     # restart_t_min must be strictly below restart_t_max
        resolve_sampler_options(name, options)


def test_an_integral_float_is_an_integer_and_ints_are_numbers():
    kwargs, _ = resolve_sampler_options("lms", {"order": 3.0})
    assert kwargs == {"order": 3} and isinstance(kwargs["order"], int)
    kwargs, _ = resolve_sampler_options("euler_ancestral", {"eta": 1})
    assert kwargs == {"eta": 1.0} and isinstance(kwargs["eta"], float)
    assert resolve_sampler_options("euler", {"s_tmax": math.inf})[0] == {"s_tmax": math.inf}   # its default


@pytest.mark.parametrize("text, named", [("eta=nan", "eta"), ("eta=1e400", "eta"), ("restart_k=100000000", "restart_k"),
                                         ("r=0", "r"), ("s_noise=-1", "s_noise"), ("order=2.5", "order"),
                                         ("eta=0x10", "eta"), ("midpoint_uncond=1", "midpoint_uncond")])
def test_the_sampler_options_node_refuses_a_value_no_sampler_accepts(text, named):
    with pytest.raises(KSamplerInputError, match=rf"sampler_options: {named}: must be .* \(sampler "):
        SamplerOptions().build(text)


def test_the_cli_refuses_an_out_of_range_option_naming_it(tmp_path, capsys):
    code = main(["generate", "--prompt", "red", "--steps", "2", "--batch-size", "1", "--no-progress",
                 "--out", str(tmp_path), "--sampler", "restart", "--sampler-option", "restart_k=100000000"])
    err = capsys.readouterr().err
    assert code == 2 and "restart_k" in err and "from 0 to 100" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))


# ---- valid options still run -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, options", [("restart", {"restart_k": 3, "restart_n": 3}),
                                              ("seeds_3", {"r_1": 0.5, "r_2": 0.5}),
                                              ("seeds_2", {"r": 1.0}),
                                              ("dpmpp_sde", {"r": 0.01}),
                                              ("dpm_adaptive", {"pcoeff": 100.0, "icoeff": 100.0, "dcoeff": 100.0}),
                                              ("dpm_adaptive", {"h_init": 0.001, "atol": 1e-4, "rtol": 0.0}),
                                              ("er_sde", {"eta": 10.0, "solver_type": "Reverse-time SDE"}),
                                              ("euler", {"s_churn": 10000.0, "s_tmin": 0.0, "s_tmax": math.inf})])
def test_options_at_the_ends_of_their_ranges_run(sampler, options):
    out = adv(sampler, options, steps=6)[0]["samples"]
    assert torch.isfinite(out).all()


# ---- what runs past the checks ---------------------------------------------------------------------------------
def test_a_dpm_adaptive_controller_that_diverges_is_an_error_naming_its_options():
    # no integral term: the step size collapses (it turned NaN, blamed on the model)
    with pytest.raises(KSamplerInputError, match=r"dpm_adaptive.*pcoeff=3.*icoeff=0.*use the defaults"):
        adv("dpm_adaptive", {"pcoeff": 3.0, "icoeff": 0.0}, steps=8)


def _nan_after(calls):
    inner = analytic_model()
    apply = inner.apply_model

    def nan_model(x, sigma, **kw):
        calls.append(1)
        out = apply(x, sigma, **kw)
        return out * math.nan if len(calls) > 1 else out
    inner.apply_model = nan_model
    return inner


def test_a_nan_with_sampler_options_given_names_them_too_and_without_blames_the_model_alone():
    run = lambda options: ksample(_nan_after([]), 1, 3, 3.0, "euler_ancestral", "karras", P, N, latent(),
                                  sampler_options=options)
    with pytest.raises(NonFiniteOutputError, match=r"^model: .*float16.*sampler_options \(eta=0.5\)"):
        run({"eta": 0.5})
    with pytest.raises(NonFiniteOutputError, match=r"^model: .*float16") as caught:
        run(None)
    assert "sampler_options" not in str(caught.value)


def test_a_nan_from_the_samplers_own_arithmetic_is_an_error_naming_the_options():
    def scaling(model, x, sigmas, extra_args=None, callback=None, disable=None, scale=1.0):
        return model(x, sigmas[0] * x.new_ones([x.shape[0]])) * scale

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    denoiser = lambda x, sigma, **kw: x * 0.5
    denoiser.model_sampling = MODEL.model_sampling
    with pytest.raises(NonFiniteOutputError, match=r"sampler_options: .*NaN or Inf.*scale=1e\+39"):
        run_sampler(scaling, denoiser, x, torch.tensor([1.0, 0.0]), seed=0, extra_args={},
                    noise_options=NoiseOptions(), options={"scale": 1e39})
