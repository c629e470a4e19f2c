"""Analytic correctness: deterministic samplers converge to the exact PF-ODE solution at their expected order,
and stochastic samplers reproduce the target distribution.

Data are Gaussian (mu = 0.5, s0 = 0.5), so the exact denoiser and ODE solution are
closed-form (tests/analytic.py).  Sigmas follow Karras et al.'s rho = 7 schedule
from 30 to 0.005 and stop there (no final jump to 0), in float64, and the error is
the largest deviation from the exact solution at sigma = 0.005.  Multistep
methods start with lower-order steps, so their fitted slope sits a little under
their nominal order at these step counts; the thresholds say what we measured.
"""
import math

import pytest
import torch

from analytic import GaussianCFGDenoiser, GaussianDenoiser, exact_ode, gaussian_denoiser
from ksampler.models import EPS, Flow
from ksampler.pipeline import sample
from ksampler.samplers import SAMPLERS, sampler_traits
from ksampler.samplers.traits import get_traits
from ksampler.schedulers import karras_sigmas, sampling_sigmas

MU, S0 = 0.5, 0.5
SIGMA_MAX, SIGMA_MIN = 30.0, 0.005
STEPS = (16, 24, 32, 48, 64)

# sampler -> minimum fitted slope of log(error) against log(steps)
EXPECTED_ORDER = {
    "euler": 0.9, "ddim": 0.9, "euler_cfg_pp": 0.9,
    "heunpp2": 0.7, "gradient_estimation": 0.7, "gradient_estimation_cfg_pp": 0.7,
    "heun": 1.8, "dpm_2": 1.8, "exp_heun_2_x0": 1.8, "dpmpp_2m": 1.8, "dpmpp_2m_cfg_pp": 1.8,
    "res_multistep": 1.8, "res_multistep_cfg_pp": 1.8, "ipndm": 1.8,
    # deis: third order, but still pre-asymptotic at 16-64 steps (see test_deis_is_third_order_asymptotically);
    # dpmpp_3m: bit-identical to k-diffusion's dpmpp_3m_sde at eta 0, whose slope tends to 2 on this problem
    "dpmpp_3m": 1.5, "deis": 2.2,
    "lms": 3.0, "dpm_fast": 3.0, "uni_pc": 3.0, "uni_pc_bh2": 3.0,
}


def grid(n: int, flow: bool) -> torch.Tensor:
    sig = karras_sigmas(n + 1, SIGMA_MIN, SIGMA_MAX).double()[:-1]
    return sig / (1 + sig) if flow else sig  # the same VE-frame grid for flow


def ode_error(name: str, n: int, flow: bool = False) -> float:
    model = GaussianDenoiser(MU, S0, flow)
    sig = grid(n, flow)
    x = torch.linspace(-3, 3, 32, dtype=torch.float64).reshape(1, 32) * (1.0 if flow else SIGMA_MAX)
    out = SAMPLERS[name](model, x.clone(), sig, disable=True)
    return float((out - exact_ode(x, float(sig[0]), float(sig[-1]), MU, S0, flow)).abs().max())


def fitted_order(name: str, flow: bool = False, steps=STEPS) -> float:
    xs = [math.log(n) for n in steps]
    ys = [math.log(ode_error(name, n, flow)) for n in steps]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


@pytest.mark.parametrize("flow", [False, True], ids=["ve", "flow"])
@pytest.mark.parametrize("name", list(EXPECTED_ORDER))
def test_convergence_order(name, flow):
    order = fitted_order(name, flow)
    assert order >= EXPECTED_ORDER[name], f"{name}: fitted order {order:.2f} < {EXPECTED_ORDER[name]}"


@pytest.mark.parametrize("flow", [False, True], ids=["ve", "flow"])
def test_deis_is_third_order_asymptotically(flow):
    """Over 64-256 steps deis's slope reaches its nominal 3 (2.94 VE, 2.91 flow); the start steps are not what
    holds it at 2.7 / 2.3 over 16-64 steps: replacing them by the exact solution changes the error by < 0.1 %."""
    assert fitted_order("deis", flow, steps=(64, 96, 128, 192, 256)) >= 2.85


@pytest.mark.parametrize("flow", [False, True], ids=["ve", "flow"])
def test_deis_rhoab_mode_is_third_order(flow, monkeypatch):
    """deis_mode="rhoab" (the paper's variant, polynomial in sigma): 2.90 VE, 2.81 flow over 64-256 steps."""
    import functools
    monkeypatch.setitem(SAMPLERS, "deis_rhoab", functools.partial(SAMPLERS["deis"], deis_mode="rhoab"))
    assert fitted_order("deis_rhoab", flow, steps=(64, 96, 128, 192, 256)) >= 2.75


def test_every_deterministic_sampler_has_an_order_check():
    deterministic = {n for n in SAMPLERS if not sampler_traits(n).stochastic}
    # dpm_adaptive picks its own steps (checked below); ipndm_v's error is not monotone in the step count here;
    # cfgpp_ud10_ab is biased by design (its extrapolation of the unconditional derivative adds an O(h) term to
    # every step, so it does not converge to the ODE's solution): its steps are checked one by one below
    assert deterministic - set(EXPECTED_ORDER) == {"dpm_adaptive", "ipndm_v", "cfgpp_ud10_ab"}


def test_ipndm_v_converges():
    assert ode_error("ipndm_v", 64) < ode_error("ipndm_v", 16) / 4


@pytest.mark.parametrize("rtol", [0.05, 0.005])
def test_dpm_adaptive_accuracy_follows_tolerance(rtol):
    model = GaussianDenoiser(MU, S0)
    sig = grid(10, False)
    x = torch.linspace(-3, 3, 32, dtype=torch.float64).reshape(1, 32) * SIGMA_MAX
    out = SAMPLERS["dpm_adaptive"](model, x.clone(), sig, disable=True, rtol=rtol, atol=rtol / 10)
    err = float((out - exact_ode(x, float(sig[0]), float(sig[-1]), MU, S0)).abs().max())
    assert err < 20 * rtol


def test_sampling_to_zero_returns_the_data_mean_direction():
    """With the final step to sigma 0, samples land on the data: their mean and spread match N(mu, s0^2)."""
    model = GaussianDenoiser(MU, S0)
    ms = EPS()
    sigmas = sampling_sigmas(ms, "karras", 30)
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    out = sample(model, ms, noise, torch.zeros_like(noise), sigmas, None, "dpmpp_2m", 0)
    assert abs(float(out.mean()) - MU) < 0.05
    assert abs(float(out.std()) - S0) < 0.05


# --- stochastic samplers: the target distribution's mean and variance -----------------------------
# lcm and tcd assume a consistency-distilled model (its D(x) is a sample, not the posterior mean), so with the
# exact posterior-mean denoiser they under-disperse by design; their steps are checked on their own below.
CONSISTENCY = {"lcm", "tcd"}
STOCHASTIC = [n for n in SAMPLERS if sampler_traits(n).stochastic and n not in CONSISTENCY]


def _sample_gaussian(name, flow, steps=100, n=4096, seed=5):
    model = GaussianDenoiser(MU, S0, flow)
    ms = Flow(shift=3.0) if flow else EPS()
    model.model_sampling = ms
    traits = sampler_traits(name) if isinstance(name, str) else get_traits(name)
    sigmas = sampling_sigmas(ms, "karras", steps, discard_penultimate_sigma=traits.discard_penultimate_sigma)
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(11))
    return sample(model, ms, noise, torch.zeros_like(noise), sigmas, None, name, seed)


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_matches_target_distribution(name, flow):
    """4096 samples of N(mu, s0^2) in 100 steps: mean within 0.05, std within 6 % (statistical error ~1-2 %)."""
    out = _sample_gaussian(name, flow)
    assert abs(float(out.mean()) - MU) < 0.05, f"{name}: mean {float(out.mean()):.3f}"
    assert abs(float(out.std()) / S0 - 1) < 0.06, f"{name}: std {float(out.std()):.3f}"


def test_comfyui_dpmpp_2s_ancestral_cfg_pp_slip_is_fixed():
    """ComfyUI renoises its full step with the midpoint's unconditional estimate; that shrinks the spread."""
    from ksampler.samplers.reference import REFERENCE_VARIANTS
    ours = _sample_gaussian("dpmpp_2s_ancestral_cfg_pp", False)
    comfy = _sample_gaussian(REFERENCE_VARIANTS["dpmpp_2s_ancestral_cfg_pp"].run, False)
    assert abs(float(ours.std()) / S0 - 1) < 0.06
    assert float(comfy.std()) / S0 < 0.9


@pytest.mark.parametrize("name", sorted(CONSISTENCY))
def test_consistency_samplers_renoise_to_the_right_marginal(name):
    """One lcm/tcd step from sigma to sigma_next: x = a D + sigma_next n for a fresh n, whatever D is."""
    model = GaussianDenoiser(MU, S0)
    model.model_sampling = EPS()
    x = torch.full((8192, 1), 2.0)
    sig = torch.tensor([2.0, 0.7, 0.0])
    out = SAMPLERS[name](model, x, sig[:2], disable=True,
                         noise_sampler=lambda a, b: torch.randn(8192, 1, generator=torch.Generator().manual_seed(1)))
    d = gaussian_denoiser(x[:1], torch.tensor([2.0]), MU, S0)
    if name == "lcm":
        assert torch.allclose(out.mean(), d[0, 0], atol=0.03)
        assert abs(float(out.std()) - 0.7) < 0.02
    else:
        # tcd with gamma 0.3: deterministic DDIM move to sigma_s < 0.7, then forward noise to 0.7
        assert abs(float(out.std()) - 0.7) > 0.05 and 0 < float(out.std()) < 0.7


CFG_PP_PAIRS = [("euler", "euler_cfg_pp"), ("euler_ancestral", "euler_ancestral_cfg_pp"),
                ("dpmpp_2m", "dpmpp_2m_cfg_pp"), ("res_multistep", "res_multistep_cfg_pp"),
                ("res_multistep_ancestral", "res_multistep_ancestral_cfg_pp"),
                ("gradient_estimation", "gradient_estimation_cfg_pp"),
                ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp")]


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("plain,pp", CFG_PP_PAIRS)
def test_cfg_pp_differs_from_plain_twin(plain, pp, flow):
    """With cfg != 1 a CFG++ sampler differs from its plain twin; without guidance (uncond = cond) it is the
    twin on VE models (on flow models the CFG++ samplers use the VE-frame noise split, so they need not be)."""
    def run(name, model):
        ms = Flow(shift=3.0) if flow else EPS()
        model.model_sampling = ms
        sigmas = sampling_sigmas(ms, "karras", 12)
        noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(3))
        return sample(model, ms, noise, torch.zeros_like(noise), sigmas, None, name, 0)
    if not flow:
        bare = GaussianDenoiser(flow=flow)
        assert torch.allclose(run(plain, bare), run(pp, bare), atol=1e-4), f"{pp} must equal {plain} without guidance"
    guided = GaussianCFGDenoiser(cfg=4.0, flow=flow)
    assert not torch.allclose(run(plain, guided), run(pp, guided), atol=1e-3), f"{pp} must differ at cfg 4"


@pytest.mark.parametrize("name", ["euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "cfgpp_ud10_ab"])
@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_cfg_pp_first_step_formula(name, flow):
    """A first CFG++ step (DDIM form, Chung et al. 2024, Alg. 1): x_next = a_next D_cfg + sigma_next eps_uncond,
    with eps_uncond = (x - a D_uncond) / sigma and a the data coefficient (1 for VE, 1 - sigma for flow)."""
    model = GaussianCFGDenoiser(cfg=5.0, flow=flow)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(1, 9) * (1 if flow else 3)
    s, s_next = (0.8, 0.5) if flow else (3.0, 1.5)
    out = SAMPLERS[name](model, x.clone(), torch.tensor([s, s_next], dtype=torch.float64), disable=True)
    sig = torch.tensor([s], dtype=torch.float64)
    cond = gaussian_denoiser(x, sig, model.mu, model.s0, flow)
    uncond = gaussian_denoiser(x, sig, model.mu_u, model.s0, flow)
    guided = uncond + 5.0 * (cond - uncond)
    a, a_next = (1 - s, 1 - s_next) if flow else (1.0, 1.0)
    assert torch.allclose(out, a_next * guided + s_next * (x - a * uncond) / s, atol=1e-10)


def _ud10_estimates(model, x, s, flow):
    sig = torch.tensor([s], dtype=torch.float64)
    cond = gaussian_denoiser(x, sig, model.mu, model.s0, flow)
    uncond = gaussian_denoiser(x, sig, model.mu_u, model.s0, flow)
    return uncond + model.cfg * (cond - uncond), uncond


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_cfgpp_ud10_ab_second_step_blends_ab2_and_extrapolates_the_uncond_derivative(flow):
    """Step 2 of cfgpp_ud10_ab (../shared/spec): the CFG++ Euler step with d_u + 0.1 (dt / dt_prev) (d_u - d_u_prev),
    blended 1/4 of the way towards the variable-step AB2 step over the two step derivatives."""
    model = GaussianCFGDenoiser(cfg=3.0, flow=flow)
    x0 = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(1, 9) * (1 if flow else 3)
    s0, s1, s2 = (0.9, 0.6, 0.35) if flow else (3.0, 1.5, 0.7)
    alpha = (lambda s: 1 - s) if flow else (lambda s: 1.0)
    out = SAMPLERS["cfgpp_ud10_ab"](model, x0.clone(), torch.tensor([s0, s1, s2], dtype=torch.float64), disable=True)
    g0, u0 = _ud10_estimates(model, x0, s0, flow)
    du0 = (x0 - alpha(s0) * u0) / s0
    e0 = alpha(s1) * g0 + s1 * du0 - x0
    x1 = x0 + e0
    g1, u1 = _ud10_estimates(model, x1, s1, flow)
    du1 = (x1 - alpha(s1) * u1) / s1
    h, h_prev = s2 - s1, s1 - s0
    e1 = alpha(s2) * g1 + s2 * (du1 + 0.1 * h / h_prev * (du1 - du0)) - x1
    ab2 = (h + h * h / (2 * h_prev)) * (e1 / h) - h * h / (2 * h_prev) * (e0 / h_prev)
    assert torch.allclose(out, x1 + 0.75 * e1 + 0.25 * ab2, atol=1e-10)


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_cfgpp_ud10_ab_last_step_is_the_linear_extrapolation_of_the_denoised_estimates(flow):
    model = GaussianCFGDenoiser(cfg=3.0, flow=flow)
    x0 = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(1, 9) * (1 if flow else 3)
    s0, s1 = (0.9, 0.5) if flow else (3.0, 1.0)
    alpha = (lambda s: 1 - s) if flow else (lambda s: 1.0)
    out = SAMPLERS["cfgpp_ud10_ab"](model, x0.clone(), torch.tensor([s0, s1, 0.0], dtype=torch.float64), disable=True)
    g0, u0 = _ud10_estimates(model, x0, s0, flow)
    x1 = alpha(s1) * g0 + s1 * (x0 - alpha(s0) * u0) / s0
    g1, _ = _ud10_estimates(model, x1, s1, flow)
    assert torch.allclose(out, g1 - s1 * (g1 - g0) / (s1 - s0), atol=1e-10)
    # one step straight to 0 has no history: the guided estimate itself
    one = SAMPLERS["cfgpp_ud10_ab"](model, x0.clone(), torch.tensor([s0, 0.0], dtype=torch.float64), disable=True)
    assert torch.allclose(one, g0, atol=1e-12)


def test_cfgpp_ud10_ab_keeps_the_cfg1_shortcut():
    """Unlike the other CFG++ samplers, ComfyUI's cfgpp_ud10_ab keeps the cfg = 1 shortcut: no negative pass, and
    the conditional estimate stands in for the unconditional one."""
    from analytic import analytic_model, conditioning
    from ksampler.conditioning import Guidance
    model = analytic_model()
    ms = model.model_sampling
    shape = (1, 4, 8, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = sampling_sigmas(ms, "karras", 5)
    guided = Guidance(conditioning(1.0), conditioning(-1.0), 1.0).bind(model, ms, shape, torch.device("cpu"))
    positive_only = Guidance(conditioning(1.0), None, 1.0).bind(model, ms, shape, torch.device("cpu"))
    out = SAMPLERS["cfgpp_ud10_ab"](guided, x.clone(), sigmas, disable=True)
    assert guided.items_evaluated == 5, "one (positive) evaluation per step"
    assert torch.equal(out, SAMPLERS["cfgpp_ud10_ab"](positive_only, x.clone(), sigmas, disable=True))
    SAMPLERS["euler_cfg_pp"](guided, x.clone(), sigmas, disable=True)
    assert guided.items_evaluated == 5 + 10, "the other CFG++ samplers evaluate the negative at cfg 1 too"


def test_cfgpp_ud10_ab_error_shrinks_with_steps():
    for flow in (False, True):
        assert ode_error("cfgpp_ud10_ab", 64, flow) < ode_error("cfgpp_ud10_ab", 16, flow) * 0.6
