"""Calibration: fitting helps on noise it never saw, files round-trip, the cache never refits, the node's outputs."""
from __future__ import annotations

import math
import weakref

import pytest
import torch

from analytic import analytic_model, conditioning
from ksampler.calibration import (Calibration, cached_calibration, calibrate, clear_cache, fit_calibration,
                                  REFINE, model_fingerprint, multistep_coefficients, run_sigmas, sample_calibrated,
                                  teacher_solve)
from ksampler.calibration_nodes import CalibratedScheduler
from ksampler.models import EPS, Flow
from ksampler.nodes import KSampler
from ksampler.samplers import SAMPLERS
from ksampler.validation import KSamplerInputError

pytestmark = pytest.mark.usefixtures("one_thread")


class Mixture2D:
    """Exact denoiser of a 2-D mixture of three sharp Gaussians (VE or flow frame), counting its calls."""

    def __init__(self, model_sampling):
        self.model_sampling = model_sampling
        self.mu = torch.tensor([[1.5, 0.0], [-1.0, 1.2], [-0.6, -1.4]], dtype=torch.float64)
        self.s = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)
        self.logw = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
        self.calls = 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        a = torch.as_tensor(self.model_sampling.alpha(sigma), dtype=x.dtype).reshape(-1, 1, 1)
        sig = sigma.to(x.dtype).reshape(-1, 1, 1)
        var = a ** 2 * self.s[:, None] ** 2 + sig ** 2                   # [B, K, 1]: x | component k
        diff = x[:, None, :] - a * self.mu                                # [B, K, 2]
        w = torch.softmax(self.logw - torch.log(var[..., 0]) - 0.5 * (diff ** 2).sum(-1) / var[..., 0], dim=-1)
        comp = self.mu + a * self.s[:, None] ** 2 / var * diff
        return (w[..., None] * comp).sum(1)


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("corrector", [False, True], ids=["predictor", "corrector"])
@pytest.mark.parametrize("ms", [EPS(), Flow(shift=3.0)], ids=["eps", "flow"])
def test_fitting_beats_its_start_on_unseen_noise(ms, corrector):
    model = Mixture2D(ms)
    fit_noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cal = fit_calibration(model, ms, fit_noise, 4, iterations=60, lr=0.05, teacher_steps=60, corrector=corrector)
    assert cal.info["race"] == (20 if corrector else 0)  # with a corrector: a third of the iterations race the forms
    assert corrector or cal.corrector is None
    assert cal.info["gradient"] == "autograd" and cal.info["model_calls"] == model.calls > 0  # the cost is exact
    # the RMS before and after the fit are on the same noises (those that pick the iterate kept), so never worse
    assert cal.info["rms_fitted"] <= cal.info["rms_start"]

    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x0 = ms.noise_scaling(torch.tensor(float(ms.sigma_max)), noise, torch.zeros_like(noise), True)
    ref = teacher_solve(model, ms, x0, float(ms.sigma_max), float(ms.sigma_min), 200)
    fitted = cal.sampler()(model, x0, cal.sigmas.double())
    # the start: the same schedule family and weights the fit began from, before any iteration
    start = fit_calibration(model, ms, fit_noise, 4, iterations=0, teacher_steps=60, corrector=corrector)
    started = start.sampler()(model, x0, start.sigmas.double())
    assert _rms(fitted, ref) < 0.8 * _rms(started, ref), (_rms(fitted, ref), _rms(started, ref))
    euler = SAMPLERS["euler"](model, x0, start.sigmas.double(), disable=True)
    assert _rms(fitted, ref) < _rms(euler, ref)


def test_multistep_weights_integrate_polynomials_exactly():
    ve = torch.tensor([10.0, 4.0, 1.5, 0.6, 0.2, 0.0], dtype=torch.float64)
    c = multistep_coefficients(ve, 3, 3)
    assert torch.allclose(c.sum(1), torch.ones(5, dtype=torch.float64))
    # D linear in lambda: step 2 (three estimates) reproduces x' = e^-h x + int e^(s-h) D(s) ds exactly
    lam = -torch.log(ve[:5])
    h = float(lam[3] - lam[2])
    d = lam.clone()                                  # D(lambda) = lambda (a scalar state)
    integral = -math.expm1(-h) * float(lam[2]) + (h + math.expm1(-h))   # int_0^h e^(s-h) (lam_2 + s) ds
    blend = float((c[2, :3] * torch.stack([d[2], d[1], d[0]])).sum())
    assert blend * -math.expm1(-h) == pytest.approx(integral, rel=1e-10)


def test_corrector_weights_integrate_polynomials_exactly():
    ve = torch.tensor([10.0, 4.0, 1.5, 0.6, 0.2, 0.0], dtype=torch.float64)
    lam = -torch.log(ve[:5])
    for q in (2, 3, 4):
        cc = multistep_coefficients(ve, q, 4, corrector=True)
        assert torch.allclose(cc.sum(1), torch.ones(5, dtype=torch.float64))
        # row 2 weighs [D_3, D_2, D_1, D_0]: exact for D a polynomial of degree q - 1 in lambda
        h = float(lam[3] - lam[2])
        d = (lam - lam[2]) ** (q - 1)
        s = torch.linspace(0, h, 20001, dtype=torch.float64)
        integral = float(torch.trapezoid(torch.exp(s - h) * s ** (q - 1), s))
        blend = float((cc[2] * torch.stack([d[3], d[2], d[1], d[0]])).sum())
        assert blend * -math.expm1(-h) == pytest.approx(integral, rel=1e-7)


class _Gaussian:
    """Exact denoiser of one Gaussian N(mu, s^2) in the VE frame; the PF-ODE is solved in closed form."""
    model_sampling = EPS()

    def __init__(self):
        self.mu, self.s = 0.7, 0.5

    def __call__(self, x, sigma, **kw):
        sig = sigma.to(x.dtype).reshape(-1, 1)
        return self.mu + self.s ** 2 / (self.s ** 2 + sig ** 2) * (x - self.mu)

    def exact(self, x, sigma_from: float, sigma_to: float):
        return self.mu + (x - self.mu) * math.sqrt((self.s ** 2 + sigma_to ** 2) / (self.s ** 2 + sigma_from ** 2))


def _observed_order(form) -> float:
    g = _Gaussian()
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(-1, 1) * 10
    errors = []
    for n in (32, 64):
        ve = torch.exp(torch.linspace(math.log(10.0), math.log(0.2), n + 1, dtype=torch.float64))
        c = multistep_coefficients(ve, form[0], 3)
        cc = multistep_coefficients(ve, form[1], 4, corrector=True) if form[1] else None
        out = sample_calibrated(g, x, ve, coefficients=c, corrector=cc)
        errors.append(_rms(out, g.exact(x, 10.0, 0.2)))
    return math.log2(errors[0] / errors[1])


def test_the_corrector_raises_the_order_at_no_extra_call():
    # Adams-Bashforth of order p converges at order p; its Adams-Moulton corrector of order p + 1 (UniPC's
    # arrangement: the corrector reuses the next step's model call) at order p + 1
    assert _observed_order((1, 0)) == pytest.approx(1, abs=0.15)
    assert _observed_order((2, 0)) == pytest.approx(2, abs=0.15)
    assert _observed_order((1, 2)) == pytest.approx(2, abs=0.15)
    assert _observed_order((2, 3)) == pytest.approx(3, abs=0.15)
    g, calls = _Gaussian(), []
    ve = torch.exp(torch.linspace(math.log(10.0), math.log(0.2), 9, dtype=torch.float64))
    sample_calibrated(lambda x, s: calls.append(1) or g(x, s), torch.ones(2, 1, dtype=torch.float64), ve,
                      coefficients=multistep_coefficients(ve, 2, 3),
                      corrector=multistep_coefficients(ve, 3, 4, corrector=True))
    assert len(calls) == 8


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_no_op_corrector_changes_nothing(eta):
    # with eta > 0 the corrected step re-noises with the same draw as the step it corrects
    ms = EPS()
    model = Mixture2D(ms)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 10
    ve = torch.tensor([10.0, 4.0, 1.5, 0.6, 0.2, 0.0], dtype=torch.float64)
    c = multistep_coefficients(ve, 3, 3)
    seeded = {"extra_args": {"seed": 3}, "eta": eta}
    plain = sample_calibrated(model, x, ve, coefficients=c, **seeded)
    no_op = sample_calibrated(model, x, ve, coefficients=c, corrector=torch.cat([torch.zeros(5, 1), c], 1), **seeded)
    assert torch.allclose(plain, no_op, rtol=0, atol=1e-12)


def _draws(count: int, shape):
    draws = iter([torch.randn(shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
                  for k in range(count)])
    return lambda sigma, sigma_next: next(draws)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("ms", [EPS(), Flow(shift=3.0)], ids=["eps", "flow"])
def test_eta_with_the_newest_estimate_alone_is_the_ancestral_sampler(ms, eta):
    # the stochastic step is the model sampling's ancestral step with the blend for the denoised estimate: with
    # DDIM weights, euler_ancestral itself (VE or flow re-noising alike)
    model = Mixture2D(ms)
    sig = torch.tensor([10.0, 4.0, 1.5, 0.6, 0.2, 0.0] if isinstance(ms, EPS) else [1.0, 0.8, 0.5, 0.3, 0.1, 0.0],
                       dtype=torch.float64)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * float(sig[0])
    ours = sample_calibrated(model, x, sig, coefficients=torch.ones(5, 1, dtype=torch.float64), eta=eta,
                             noise_sampler=_draws(4, x.shape))
    theirs = SAMPLERS["euler_ancestral"](model, x, sig, eta=eta, noise_sampler=_draws(4, x.shape), disable=True)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_a_stochastic_calibrated_sampler_samples_the_data_distribution(eta):
    # Gaussian data N(mu, s^2): from N(mu, s^2 + sigma_max^2) every eta in 0..1 transports to N(mu, s^2) (in the
    # limit of small steps); the draws make the result a fresh sample, not the ODE's image of the start
    g = _Gaussian()
    ve = torch.cat([torch.exp(torch.linspace(math.log(10.0), math.log(0.01), 80, dtype=torch.float64)),
                    torch.zeros(1, dtype=torch.float64)])
    x = g.mu + math.sqrt(g.s ** 2 + 100) * torch.randn(20_000, 1, generator=torch.Generator().manual_seed(5),
                                                        dtype=torch.float64)
    kw = {"coefficients": multistep_coefficients(ve, 2, 3), "corrector": multistep_coefficients(ve, 3, 4, True),
          "eta": eta}
    out = sample_calibrated(g, x, ve, extra_args={"seed": 1}, **kw)
    assert float(out.mean()) == pytest.approx(g.mu, abs=0.015)
    assert float(out.std()) == pytest.approx(g.s, rel=0.02)
    ode = sample_calibrated(g, x, ve, coefficients=kw["coefficients"], corrector=kw["corrector"])
    assert float(torch.corrcoef(torch.stack([out[:, 0], ode[:, 0]]))[0, 1]) < 0.9
    assert torch.equal(out, sample_calibrated(g, x, ve, extra_args={"seed": 1}, **kw))  # seeded
    assert not torch.equal(out, sample_calibrated(g, x, ve, extra_args={"seed": 2}, **kw))


def test_the_last_steps_shift_is_the_gaussians_mean_value_sigma():
    # one step from sigma_max to 0 on Gaussian data: the exact map scales x - mu by s / sqrt(s^2 + sigma_max^2),
    # a denoiser call at sigma' by s^2 / (s^2 + sigma'^2); they agree at sigma'^2 = s sqrt(s^2 + sigma_max^2) - s^2
    g, ms = _Gaussian(), EPS()
    s_max = float(ms.sigma_max)
    noise = torch.randn(16, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cal = fit_calibration(g, ms, noise, 1, iterations=200, corrector=False, teacher_steps=400,
                          teacher_sigma_min=1e-4)
    expected = 0.5 * math.log(g.s * math.sqrt(g.s ** 2 + s_max ** 2) - g.s ** 2) - math.log(s_max)
    assert cal.info["shift"] and cal.shift.shape == (1,)
    assert float(cal.shift[0]) == pytest.approx(expected, abs=2e-3)
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * s_max
    exact = g.exact(x, s_max, 0.0)
    shifted = _rms(cal.sampler()(g, x, cal.sigmas.double()), exact)
    unshifted = _rms(sample_calibrated(g, x, cal.sigmas.double(), coefficients=cal.coefficients), exact)
    assert shifted < 1e-3 * g.s and unshifted > 100 * shifted  # without the shift, one step is far off
    plain = fit_calibration(g, ms, noise, 1, iterations=20, corrector=False, teacher_steps=50, shift=False)
    assert plain.shift is None and not plain.info["shift"]


def test_shifts_stay_where_the_model_may_be_called():
    ms = EPS()
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    # by default the model is called neither below sigma_min nor above sigma_max; here the last call would go
    # lower (these components are sharper than 0.6) and stops at the bound
    cal = fit_calibration(Mixture2D(ms), ms, noise, 3, iterations=60, teacher_steps=40, corrector=False,
                          sigma_min=0.6)
    evaluated = cal.sigmas[:-1].double() * torch.exp(cal.shift)
    assert bool((evaluated >= 0.6 * (1 - 1e-6)).all()) and float(evaluated[-1]) == pytest.approx(0.6, rel=1e-3)
    assert bool((evaluated <= float(ms.sigma_max) * (1 + 1e-6)).all())
    assert bool((cal.shift[1:-1] == 0).all())  # only the first and the last step's calls move
    x = torch.randn(4, 2, dtype=torch.float64) * 14.6
    ve = cal.sigmas.double()
    assert torch.equal(sample_calibrated(Mixture2D(ms), x, ve, coefficients=cal.coefficients),
                       sample_calibrated(Mixture2D(ms), x, ve, coefficients=cal.coefficients,
                                         shift=torch.zeros(cal.steps, dtype=torch.float64)))


@pytest.mark.parametrize("gradient", ["auto", "spsa"])
def test_solve_start_comes_before_every_pass_through_the_model(gradient):
    """A model that keeps state from call to call within a sample (ComfyUI's hook keyframes step on as the
    sigmas fall, and never back) is reset before each of the fit's passes through it: the teacher's, the
    gradient probe, every run of the fitted sampler (race, candidates, refinement, SPSA's pairs).  No pass starts
    without it and none is cut by it: between two resets the model's sigmas never rise."""
    ms = EPS()
    inner, trace = Mixture2D(ms), []

    def model(x, sigma, **kw):
        trace.append(float(sigma.detach().max()))
        return inner(x, sigma, **kw)
    gen = torch.Generator().manual_seed(6)
    noise, other = (torch.randn(8, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    cal = fit_calibration(model, ms, noise, 3, iterations=6, teacher_steps=20, gradient=gradient,
                          refine_noise=torch.randn(32, 2, generator=gen, dtype=torch.float64), refine_iterations=3,
                          candidate_noise=[other], refine_candidates=True, solve_start=lambda: trace.append("start"))
    assert trace[0] == "start" and cal.info["gradient"] == ("autograd" if gradient == "auto" else "spsa")
    passes, current = [], None
    for item in trace:
        if item == "start":
            current = []
            passes.append(current)
        else:
            current.append(item)
    assert len(passes) > 20 and all(passes), "every reset is followed by a pass"
    assert all(later <= earlier for calls in passes for earlier, later in zip(calls, calls[1:]))


def test_save_load_round_trip_is_bit_identical(tmp_path):
    ms = EPS()
    cal = fit_calibration(Mixture2D(ms), ms, torch.randn(8, 2, dtype=torch.float64), 3, iterations=2,
                          teacher_steps=20, info={"cfg": 1.0})
    path = str(tmp_path / "cal.safetensors")
    cal.save(path)
    back = Calibration.load(path)
    assert torch.equal(back.sigmas, cal.sigmas) and back.sigmas.dtype == cal.sigmas.dtype
    assert torch.equal(back.coefficients, cal.coefficients)
    assert back.info == cal.info and back.corrector is None
    ve = torch.cat([cal.sigmas[:-1].double(), torch.zeros(1, dtype=torch.float64)])
    corrected = Calibration(cal.sigmas, cal.coefficients, {"cfg": 1.0}, multistep_coefficients(ve, 3, 4, True))
    corrected.save(path)
    back = Calibration.load(path)
    assert torch.equal(back.corrector, corrected.corrector) and torch.equal(back.coefficients, corrected.coefficients)
    x = torch.randn(5, 2, dtype=torch.float64) * 14.6
    assert torch.equal(back.sampler()(Mixture2D(ms), x, back.sigmas.double()),
                       corrected.sampler()(Mixture2D(ms), x, corrected.sigmas.double()))
    with pytest.raises(ValueError, match="corrector"):
        Calibration(corrected.sigmas, corrected.coefficients, {}, corrected.corrector[:, :3]).validate()
    shifted = Calibration(cal.sigmas, cal.coefficients, {"cfg": 1.0}, None,
                          torch.tensor([0.0, 0.0, -0.3], dtype=torch.float64))
    shifted.save(path)
    back = Calibration.load(path)
    assert torch.equal(back.shift, shifted.shift) and back.corrector is None
    assert torch.equal(back.sampler()(Mixture2D(ms), x, back.sigmas.double()),
                       shifted.sampler()(Mixture2D(ms), x, shifted.sigmas.double()))
    assert not torch.equal(back.sampler()(Mixture2D(ms), x, back.sigmas.double()),
                           Calibration(cal.sigmas, cal.coefficients).sampler()(Mixture2D(ms), x, cal.sigmas.double()))
    for bad in (torch.zeros(2, dtype=torch.float64), torch.tensor([0.0, math.nan, 0.0], dtype=torch.float64)):
        with pytest.raises(ValueError, match="shift"):
            Calibration(cal.sigmas, cal.coefficients, {}, None, bad).validate()
    # each file takes the oldest format that holds it, so that earlier versions read what they can sample
    from safetensors import safe_open
    for made, expected in ((Calibration(cal.sigmas, cal.coefficients), "ksampler.calibration/1"),
                           (corrected, "ksampler.calibration/2"), (shifted, "ksampler.calibration/3")):
        made.save(path)
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["format"] == expected
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception):
        Calibration.load(str(tmp_path / "bad.safetensors"))


def test_cache_hit_does_not_call_the_model(tmp_path):
    clear_cache()
    model = analytic_model()
    pos, neg = conditioning(1.0), conditioning(-0.5)
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    opts = {"fit_noises": 4, "iterations": 2, "teacher_steps": 10}
    messages = []
    cal = calibrate(model, pos, neg, latent, 3, 3.0, log=messages.append, **opts)
    assert any("fitting once" in m for m in messages)
    net = model.network
    before = len(net.calls)
    assert before > 0
    messages.clear()
    again = calibrate(model, pos, neg, latent, 3, 3.0, log=messages.append, **opts)
    assert again is cal and len(net.calls) == before and any("reusing" in m for m in messages)
    # another cfg or conditioning is another calibration
    other = calibrate(model, pos, neg, latent, 3, 4.0, log=messages.append, **opts)
    assert other is not cal and len(net.calls) > before
    # a file for other inputs is refused, not silently refitted
    path = str(tmp_path / "c.safetensors")
    cal.save(path)
    clear_cache()
    with pytest.raises(ValueError, match="calibration_file"):
        calibrate(model, pos, conditioning(0.3), latent, 3, 3.0, path=path, log=messages.append, **opts)
    fit = []
    assert cached_calibration(cal.info["key"], lambda: fit.append(1), path, messages.append).steps == 3
    assert not fit
    # a file fitted with other settings (an older default, say) is refused naming the setting and its value
    clear_cache()
    with pytest.raises(ValueError, match=r"iterations=2 \(this call: 3\).*pass the file's settings"):
        calibrate(model, pos, neg, latent, 3, 3.0, path=path, log=messages.append, **{**opts, "iterations": 3})
    assert calibrate(model, pos, neg, latent, 3, 3.0, path=path, log=messages.append, **opts).info["key"] == \
        cal.info["key"]
    # with the calibration already in memory, a file holding another one is refused just the same (not ignored)
    other_path = str(tmp_path / "other.safetensors")
    other.save(other_path)
    with open(other_path, "rb") as f:
        stored = f.read()
    with pytest.raises(ValueError, match="calibration_file: .*other inputs"):
        calibrate(model, pos, neg, latent, 3, 3.0, path=other_path, log=messages.append, **opts)
    calibrate(model, pos, neg, latent, 3, 3.0, log=messages.append, **{**opts, "iterations": 3})
    with pytest.raises(ValueError, match=r"iterations=2 \(this call: 3\)"):
        calibrate(model, pos, neg, latent, 3, 3.0, path=path, log=messages.append, **{**opts, "iterations": 3})
    with open(other_path, "rb") as f:
        assert f.read() == stored


def test_a_file_is_keyed_by_the_inputs_as_given_before_the_fit_runs_them(tmp_path):
    """A fit that leaves state on its inputs (the host notes things on a ControlNet it ran) must not key the file
    by that state: the file loads for the same inputs as given, in another process."""
    clear_cache()
    state = {"ran": False}
    path = str(tmp_path / "c.safetensors")
    cal = Calibration(torch.tensor([2.0, 1.0, 0.0]), torch.ones(2, 1, dtype=torch.float64), {})

    def fit():
        state["ran"] = True
        return cal

    def file_key():
        return f"inputs, run={state['ran']}"
    cached_calibration("process-a", fit, path, lambda m: None, file_key=file_key)
    clear_cache()
    state["ran"] = False  # another process, inputs as given
    loaded = cached_calibration("process-b", lambda: pytest.fail("refitted"), path, lambda m: None,
                                file_key=file_key)
    assert torch.equal(loaded.sigmas, cal.sigmas)
    # on a cache hit the file loaded from another process is the cached calibration: no content key needed
    state["ran"] = True
    assert cached_calibration("process-b", lambda: pytest.fail("refitted"), path, lambda m: None,
                              file_key=lambda: pytest.fail("content key computed")) is loaded


def test_a_calibration_file_loads_in_another_process_for_the_same_model(tmp_path):
    """A file is keyed by the model's content too: another process (here: another object with the same weights and
    model sampling, so another process-local token) loads it without fitting; another model is refused."""
    clear_cache()
    pos, neg = conditioning(1.0), conditioning(-0.5)
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    opts = {"fit_noises": 4, "iterations": 2, "teacher_steps": 10}
    path = str(tmp_path / "c.safetensors")
    model, messages = analytic_model(), []
    cal = calibrate(model, pos, neg, latent, 3, 3.0, log=lambda m: None, **opts)
    # asked for a file after the fit: the cached fit is written there, not refitted
    assert calibrate(model, pos, neg, latent, 3, 3.0, path=path, log=messages.append, **opts) is cal
    assert any("saved" in m for m in messages) and cal.info["file_key"]
    clear_cache()
    restarted, messages = analytic_model(), []
    loaded = calibrate(restarted, pos, neg, latent, 3, 3.0, path=path, log=messages.append, **opts)
    assert not restarted.network.calls and any("loaded" in m for m in messages)
    assert torch.equal(loaded.sigmas, cal.sigmas) and loaded.info["file_key"] == cal.info["file_key"]
    clear_cache()
    with pytest.raises(ValueError, match="other inputs"):
        calibrate(analytic_model(flow=True), pos, neg, latent, 3, 3.0, path=path, log=lambda m: None, **opts)


def test_model_fingerprint_follows_the_weights_and_patches_not_the_object():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    b = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b[1].weight.mul_(1.01)
    assert model_fingerprint(a) != model_fingerprint(b)

    class Patcher:  # a ComfyUI ModelPatcher's relevant parts: the model, its patches, the originals it patched over
        def __init__(self, model, patches=None):
            self.model, self.patches, self.backup = model, patches or {}, {}

        def get_model_object(self, name):
            return None

    plain, patched = Patcher(a), Patcher(b)
    patched.backup = {"1.weight": type("Backup", (), {"weight": a[1].weight.detach().clone()})()}
    assert model_fingerprint(plain) == model_fingerprint(patched)  # patched in place: the originals count
    lora = Patcher(a, {"1.weight": [(1.0, (torch.ones(2, 8),), 1.0, None, None)]})
    stronger = Patcher(a, {"1.weight": [(0.5, (torch.ones(2, 8),), 1.0, None, None)]})
    assert len({model_fingerprint(plain), model_fingerprint(lora), model_fingerprint(stronger)}) == 3
    assert model_fingerprint(lambda x: x) is None  # nothing to identify: such a model's files load in-process only

    class Quantised(torch.Tensor):  # weights that cannot be read as values (a GGUF-style tensor, say)
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError("no values here")

    class Opaque(torch.nn.Module):
        def state_dict(self):
            return {"w": torch.zeros(4).as_subclass(Quantised)}
    assert model_fingerprint(Opaque()) is None  # never a fingerprint of shapes alone


def test_patcher_state_goes_into_both_keys_by_content():
    """FreeU, PAG, a ModelSamplingDiscrete override: what a ComfyUI patcher adds besides weight patches (its
    model_options, object patches, wrappers, hooks) changes the model, so it changes the calibration's keys."""
    import copy
    from ksampler.calibration import calibration_key, patcher_state_digest
    from ksampler.models import V
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)

    class Patcher:  # a ModelPatcher's parts the keys read (clone deep-copies model_options, as ComfyUI's does)
        def __init__(self, model_options=None, object_patches=None):
            self.model, self.patches, self.backup = net, {}, {}
            self.model_options = model_options or {"transformer_options": {}}
            self.object_patches, self.wrappers, self.hook_patches = object_patches or {}, {}, {}

        def get_model_object(self, name):
            return self.object_patches.get(name)

        def clone(self):
            return Patcher(copy.deepcopy(self.model_options), dict(self.object_patches))

    def freeu(b1, s1):  # a node's patch: a closure over its settings
        scale = {1280: (b1, s1)}

        def output_block_patch(h, hsp, transformer_options):
            return h * scale[1280][0], hsp
        return Patcher({"transformer_options": {"patches": {"output_block_patch": [output_block_patch]}}})

    plain = Patcher()
    assert patcher_state_digest(plain) is None and patcher_state_digest(net) is None
    pos, neg, shape = conditioning(1.0), conditioning(-0.5), (1, 4, 4, 4)

    def keys(model):
        return [calibration_key(model, pos, neg, shape, 4, 3.0, {}, by_content=b) for b in (False, True)]
    bare = type("Bare", (), {"model": net, "patches": {}, "backup": {}, "get_model_object": lambda self, n: None})()
    assert keys(plain) == keys(bare)  # nothing added: the keys a plain checkpoint always had (its files still load)
    a, same, other = freeu(1.3, 0.9), freeu(1.3, 0.9), freeu(1.3, 0.95)
    assert patcher_state_digest(a) == patcher_state_digest(same) == patcher_state_digest(a.clone())
    assert patcher_state_digest(a) != patcher_state_digest(other)
    assert len({tuple(keys(m)) for m in (plain, a, other)}) == 3 and keys(a) == keys(same)
    for k_plain, k_a in zip(keys(plain), keys(a)):
        assert k_plain != k_a
    # an object patch: the prediction type counts by class (eps and v share every attribute value)
    eps, v = Patcher(object_patches={"model_sampling": EPS()}), Patcher(object_patches={"model_sampling": V()})
    assert patcher_state_digest(eps) != patcher_state_digest(v)
    assert patcher_state_digest(eps) == patcher_state_digest(Patcher(object_patches={"model_sampling": EPS()}))
    # cycles, empty closure cells, builtins and a patcher inside are walked without error, by content
    loop = {"self": None, "fn": torch.tanh}
    loop["self"] = loop

    def later():
        return unset  # noqa: F821  (a cell still empty when the digest is taken)
    odd = Patcher({"transformer_options": {"loop": loop, "later": later, "inner": plain}})
    assert patcher_state_digest(odd) == patcher_state_digest(odd.clone())
    swapped = Patcher({"transformer_options": {"loop": {"self": None, "fn": torch.sigmoid}, "later": later,
                                               "inner": plain}})
    assert patcher_state_digest(odd) != patcher_state_digest(swapped)
    unset = None  # noqa: F841
    # a tensor whose values cannot be read (on the meta device) counts as itself: never equal to another's
    ghost = Patcher({"transformer_options": {"embeds": torch.empty(4, device="meta")}})
    assert patcher_state_digest(ghost) == patcher_state_digest(ghost)
    assert patcher_state_digest(ghost) != patcher_state_digest(
        Patcher({"transformer_options": {"embeds": torch.empty(4, device="meta")}}))


def test_conditioning_objects_key_files_by_content():
    """A ControlNet in the conditioning: files are keyed by its content (hint image, strength, weights), so they
    load after a restart, and a different hint is another calibration."""
    from ksampler.calibration import conditioning_digest

    class Control:  # a ControlNet's parts: its network, hint and settings, and state its runs set and clear
        def __init__(self, hint, strength=1.0):
            torch.manual_seed(0)
            self.control_model, self.cond_hint_original, self.strength = torch.nn.Linear(3, 3), hint, strength
            self.timestep_range = None

    def cond(control):
        return [[torch.ones(1, 2, 4), {"pooled_output": torch.ones(1, 4), "control": control}]]
    edges = torch.zeros(1, 3, 64, 64)
    edges[0, :, 10, 20:40] = 1.0
    moved = torch.zeros(1, 3, 64, 64)
    moved[0, :, 11, 20:40] = 1.0  # an edge map differing from the first in a few pixels
    a, twin = Control(edges), Control(edges.clone())
    assert conditioning_digest(cond(a)) == conditioning_digest(cond(twin))
    for other in (Control(moved), Control(edges, strength=0.8)):
        assert conditioning_digest(cond(a)) != conditioning_digest(cond(other))
    before = conditioning_digest(cond(a))
    a.timestep_range = (999.0, 0.0)  # a sampling run's pre_run ...
    a.timestep_range = None  # ... and its cleanup
    assert conditioning_digest(cond(a)) == before
    # what the host notes on a network when it loads it (ComfyUI: its loaded memory, the patches' uuid) and where
    # it puts it (a load device, set or cleared) do not count; its weights do, every tensor of them
    a.control_model.model_loaded_weight_memory, a.control_model.current_weight_patches_uuid = 4096, object()
    a.load_device = torch.device("cpu")
    assert conditioning_digest(cond(a)) == before
    deep = Control(edges)
    deep.control_model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(3, 3)) for _ in range(12)])
    digest = conditioning_digest(cond(deep))
    with torch.no_grad():
        deep.control_model[11][0].bias[0] += 1.0  # the last layer, deeper than the walk's depth limit
    assert conditioning_digest(cond(deep)) != digest
    # plain conditioning (tensors, numbers, strings) keeps the digest it has had since files were first keyed
    # (pinned from stop 31's code), so files written before still load
    plain = [[torch.ones(1, 2, 4), {"pooled_output": torch.ones(1, 4), "strength": 0.5, "area": (8, 8, 0, 0)}]]
    assert conditioning_digest(plain) == "c0a23a2412c63e919dda06c9d0c1a07e6fd1755e"


def test_the_content_walk_counts_each_object_by_its_content_whatever_was_freed_before():
    """Objects walked one after another: the attribute dicts the walk builds for the first are freed before the
    second, and Python may give the next one the same id; each object still counts by its own content, and a
    digest is the same however often it is taken."""
    from ksampler.calibration import conditioning_digest

    class Setting:
        def __init__(self, value):
            self.value = value

    class Holder:  # one object in the conditioning (a ControlNet, a hook group) holding several
        def __init__(self, values):
            self.settings = [Setting(v) for v in values]

    def cond(*values):
        return [[torch.ones(1, 2, 4), {"control": Holder(values)}]]
    digests = {conditioning_digest(cond(1.0, second)) for second in (2.0, 3.0, 4.0)}
    assert len(digests) == 3
    one = cond(1.0, 2.0)
    assert len({conditioning_digest(one) for _ in range(5)}) == 1


def test_the_in_memory_key_follows_the_conditioning_not_where_its_objects_live():
    """A ControlNet copied for each new hint image, the old copy freed: the new one may live at the old one's
    address, and the in-memory key still tells them apart (by content), so another hint is never served the
    calibration fitted for the last one."""
    from ksampler.calibration import calibration_key

    class Control:
        def __init__(self, hint=None):
            self.hint = hint

        def copy(self):
            return Control(self.hint)
    model, base, keys = torch.nn.Linear(2, 2), Control(), set()
    for i in range(20):
        control = base.copy()
        control.hint = torch.full((3,), float(i))
        keys.add(calibration_key(model, [[torch.ones(1, 2, 4), {"control": control}]], [], (1, 4, 8, 8), 5, 3.0, {}))
        del control
    assert len(keys) == 20
    # a model patcher in the conditioning (GLIGEN's): in memory, one model is told from another

    class Patcher:
        def __init__(self):
            self.model, self.patches = torch.nn.Linear(2, 2), {}

        def get_model_object(self, name):
            return None
    first, second = Patcher(), Patcher()

    def key(patcher):
        return calibration_key(model, [[torch.ones(1, 2, 4), {"gligen": ("position", patcher, [])}]], [],
                               (1, 4, 8, 8), 5, 3.0, {})
    assert key(first) == key(first) != key(second)


def test_hook_keyframes_count_by_their_settings_not_where_a_sample_left_them():
    """ComfyUI's hook keyframes note on themselves where a sample is (the current keyframe, its steps, the last
    sigma) and each keyframe's start sigma when a sample starts: a file keyed before a run loads after it; a
    keyframe's strength or start is another calibration."""
    from ksampler.calibration import conditioning_digest

    class HookKeyframe:
        def __init__(self, strength, start_percent):
            self.strength, self.start_percent, self.guarantee_steps, self.start_t = strength, start_percent, 1, 1e9

    class HookKeyframeGroup:
        def __init__(self, *keyframes):
            self.keyframes = list(keyframes)
            self._current_keyframe, self._current_used_steps, self._current_index = self.keyframes[0], 0, 0
            self._current_strength, self._curr_t = None, -1.0

    def cond(group):
        return [[torch.ones(1, 2, 4), {"hooks": [group]}]]
    group = HookKeyframeGroup(HookKeyframe(1.0, 0.0), HookKeyframe(0.5, 0.5))
    before = conditioning_digest(cond(group))
    group._current_keyframe, group._current_used_steps, group._current_index = group.keyframes[1], 3, 1
    group._current_strength, group._curr_t, group.curr_t = torch.tensor(0.5), torch.tensor(0.03), -1.0
    group.keyframes[1].start_t = 4.09  # a sample ran: where it left them does not count
    assert conditioning_digest(cond(group)) == before
    for other in (HookKeyframeGroup(HookKeyframe(1.0, 0.0), HookKeyframe(0.25, 0.5)),
                  HookKeyframeGroup(HookKeyframe(1.0, 0.0), HookKeyframe(0.5, 0.7))):
        assert conditioning_digest(cond(other)) != before


def test_a_patchers_cache_identity_follows_its_weight_patches_not_its_uuid():
    """ComfyUI draws a patcher's ``patches_uuid`` anew whenever a sample registers hook patches: the in-memory
    key follows the weight patches themselves, so a conditioning with hooks does not refit at every run."""
    from ksampler.calibration import model_token
    net = torch.nn.Linear(3, 3)

    class Patcher:
        def __init__(self, patches):
            self.model, self.patches, self.patches_uuid = net, patches, object()

        def get_model_object(self, name):
            return None
    lora = {"weight": [(1.0, (torch.ones(3, 3),), 1.0, None, None)]}
    plain, with_lora = Patcher({}), Patcher(lora)
    token = model_token(with_lora)
    with_lora.patches_uuid = object()  # a sample registered hook patches
    assert model_token(with_lora) == token
    assert model_token(Patcher({"weight": [(1.0, (torch.ones(3, 3),), 1.0, None, None)]})) == token
    assert len({model_token(plain), token, model_token(Patcher({"weight": [(0.5, (torch.ones(3, 3),), 1.0, None,
                                                                             None)]}))}) == 3


def test_node_outputs_descending_sigmas_and_ksampler_uses_them():
    clear_cache()
    model = analytic_model()
    pos, neg = conditioning(1.0), conditioning(-0.5)
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    sigmas, sampler, cal = CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, fit_noises=4,
                                                           iterations=2)
    assert sigmas.ndim == 1 and len(sigmas) == 5 and float(sigmas[-1]) == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all()) and callable(sampler)
    out = KSampler().sample(model, 7, 4, 3.0, "euler", "karras", pos, neg, latent, calibration=cal)[0]
    assert out["samples"].shape == (1, 4, 4, 4) and bool(torch.isfinite(out["samples"]).all())
    with pytest.raises(KSamplerInputError, match="steps"):
        KSampler().sample(model, 7, 5, 3.0, "euler", "karras", pos, neg, latent, calibration=cal)
    with pytest.raises(KSamplerInputError, match="cfg"):
        KSampler().sample(model, 7, 4, 5.0, "euler", "karras", pos, neg, latent, calibration=cal)
    with pytest.raises(KSamplerInputError, match="denoise"):
        KSampler().sample(model, 7, 4, 3.0, "euler", "karras", pos, neg, latent, 0.5, calibration=cal)
    with pytest.raises(KSamplerInputError, match="order"):
        CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, order=7)
    with pytest.raises(KSamplerInputError, match="calibration_file"):
        CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, calibration_file="/nonexistent/x.safetensors")
    assert torch.equal(run_sigmas(cal, 4, 3.0), cal.sigmas)
    # eta re-noises from the sampling seed, with the same fit (no refit: the cached calibration is unchanged)
    _, _, stochastic = CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, fit_noises=4, iterations=2,
                                                       eta=0.5)
    assert stochastic.eta == 0.5 and cal.eta == 0.0 and torch.equal(stochastic.sigmas, cal.sigmas)
    runs = [KSampler().sample(model, seed, 4, 3.0, "euler", "karras", pos, neg, latent, calibration=c)[0]["samples"]
            for c, seed in ((cal, 7), (stochastic, 7), (stochastic, 7), (stochastic, 8))]
    assert not torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2]) and not torch.equal(runs[2], runs[3])
    for bad in (-0.1, 1.5, "0.5", math.nan):
        with pytest.raises(KSamplerInputError, match="eta"):
            CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, fit_noises=4, iterations=2, eta=bad)
    # the node's refinement: a fit of its own, refined on that many more noises
    _, _, refined = CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, fit_noises=4, iterations=2,
                                                    refine_noises=8)
    assert refined.info["refine_noises"] == 8 and refined.info["key"] != cal.info["key"]
    for bad in (2, -1, 2000, 8.0, True):
        with pytest.raises(KSamplerInputError, match="refine_noises"):
            CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, fit_noises=4, iterations=2,
                                            refine_noises=bad)
    # fit_candidates: that many fits from fitting noises of their own, each refined, the best on the refining
    # noises kept; a cache entry of its own
    _, _, best = CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, fit_noises=4, iterations=2,
                                                 refine_noises=8, fit_candidates=2)
    assert best.info["candidates"] == 2 and best.info["refine_candidates"] and best.info["fit_candidates"] == 2
    assert best.info["key"] != refined.info["key"]
    assert best.info["rms_refined"] == min(best.info["candidate_rms"])
    for bad in (0, 5, 2.0, True):
        with pytest.raises(KSamplerInputError, match="fit_candidates"):
            CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, fit_noises=4, iterations=2,
                                            refine_noises=8, fit_candidates=bad)
    with pytest.raises(KSamplerInputError, match="fit_candidates.*refine_noises"):
        CalibratedScheduler().calibrate(model, pos, neg, latent, 4, 3.0, fit_noises=4, iterations=2,
                                        fit_candidates=2)
    # the KSampler path runs a calibration's corrector (dropping it would change the latent)
    ve = torch.cat([cal.sigmas[:-1].double(), torch.zeros(1, dtype=torch.float64)])
    plain = Calibration(cal.sigmas, cal.coefficients, dict(cal.info))
    corrected = Calibration(cal.sigmas, cal.coefficients, dict(cal.info), multistep_coefficients(ve, 3, 4, True))
    outs = [KSampler().sample(model, 7, 4, 3.0, "euler", "karras", pos, neg, latent, calibration=c)[0]["samples"]
            for c in (plain, corrected)]
    assert not torch.allclose(outs[0], outs[1]) and bool(torch.isfinite(outs[1]).all())


def test_bad_inputs_are_named():
    ms = EPS()
    model = Mixture2D(ms)
    with pytest.raises(ValueError, match="steps"):
        fit_calibration(model, ms, torch.randn(8, 2), 0)
    with pytest.raises(ValueError, match="noise"):
        fit_calibration(model, ms, torch.randn(2, 2), 3)
    with pytest.raises(ValueError, match="noise"):
        fit_calibration(model, ms, torch.full((8, 2), math.nan), 3)
    with pytest.raises(ValueError, match="order"):
        fit_calibration(model, ms, torch.randn(8, 2), 3, order=9)


def test_a_model_without_gradient_is_fitted_by_spsa_and_says_so():
    ms = EPS()
    inner = Mixture2D(ms)

    @torch.no_grad()
    def no_grad_model(x, sigma, **kw):  # like ComfyUI's weights under inference mode
        return inner(x, sigma)
    messages = []
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cal = fit_calibration(no_grad_model, ms, noise, 4, iterations=30, teacher_steps=40, log=messages.append)
    assert cal.info["gradient"] == "spsa" and any("SPSA" in m for m in messages)
    assert cal.info["backward_passes"] == 0
    assert cal.info["rms_fitted"] <= cal.info["rms_start"]  # both on the selection noises: never worse
    # a forward that changes in place a tensor its backward needs (ComfyUI's ControlNet path adds its residuals
    # so) gives no usable gradient either: SPSA, said so, not a crash in the backward pass

    def in_place_model(x, sigma, **kw):
        one = (x * 0).exp()  # exp keeps its output for the backward ...
        one.mul_(1.0)  # ... which is then changed in place
        return inner(x, sigma) + one - 1
    messages.clear()
    cal = fit_calibration(in_place_model, ms, noise, 4, iterations=4, teacher_steps=40, log=messages.append)
    assert cal.info["gradient"] == "spsa" and any("inplace operation" in m and "SPSA" in m for m in messages)


@torch.library.custom_op("ksampler_tests::rotate_pairs", mutates_args=())
def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """A custom op with no autograd formula, as comfy_kitchen's rotary embedding in ComfyUI's Flux and Wan."""
    return x.flip(-1).clone()


@_rotate_pairs.register_fake
def _(x):
    return torch.empty_like(x)


def test_a_model_whose_backward_torch_refuses_is_fitted_by_spsa_and_says_why():
    ms = EPS()
    inner = Mixture2D(ms)

    def custom_op_model(x, sigma, **kw):  # the forward runs; torch refuses only the backward through the op
        return _rotate_pairs(_rotate_pairs(inner(x, sigma)))
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = noise.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="no autograd formula"):  # what the stand-in stands for
        custom_op_model(x, torch.ones(32, dtype=torch.float64)).sum().backward()
    messages = []
    cal = fit_calibration(custom_op_model, ms, noise, 4, iterations=30, teacher_steps=40, log=messages.append)
    assert cal.info["gradient"] == "spsa" and cal.info["backward_passes"] == 0
    assert any("no autograd formula" in m and "SPSA" in m for m in messages)
    assert cal.info["rms_fitted"] <= cal.info["rms_start"]  # both on the selection noises: never worse
    plain = fit_calibration(inner, ms, noise, 4, iterations=30, teacher_steps=40, gradient="spsa")
    assert torch.equal(cal.sigmas, plain.sigmas)  # the same fit as SPSA asked for: the op changes no value
    # asked for autograd by name, the same model gets an input error saying what to pass instead
    with pytest.raises(KSamplerInputError, match="gradient: 'autograd'.*no autograd formula.*'auto' or 'spsa'"):
        fit_calibration(custom_op_model, ms, noise, 4, iterations=2, teacher_steps=40, gradient="autograd")


class _Device:
    """``inner`` as a model on a device with room for the activations of ``room`` items: a call with grad on (an
    input requiring it) keeps its batch's worth until its output is freed (by the backward pass, or the pass
    failing), and past the room it fails as CUDA's allocator fails."""

    def __init__(self, inner, room: int, cpu_allocator: bool = False):
        self.inner, self.room, self.kept, self.most, self.cpu_allocator = inner, room, 0, 0, cpu_allocator

    def __call__(self, x, sigma, **kw):
        if not (torch.is_grad_enabled() and (x.requires_grad or sigma.requires_grad)):
            return self.inner(x, sigma)
        if self.kept + x.shape[0] > self.room:
            if self.cpu_allocator:  # the CPU allocator's own failure (a RuntimeError of another wording)
                torch.empty(2 ** 62, dtype=torch.uint8)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        out = self.inner(x, sigma)
        self.kept += x.shape[0]
        self.most = max(self.most, self.kept)
        weakref.finalize(out, self._free, x.shape[0])
        return out

    def _free(self, items: int) -> None:
        self.kept -= items


def test_a_fit_short_of_memory_recomputes_each_call_in_the_backward_pass_then_goes_by_spsa():
    """A real model at a real size may have no room for the activations of every model call of a solve, which a
    backward pass through it needs.  The fit then runs each call again in the backward pass (keeping one call's
    at a time), and where even one call's do not fit, goes by SPSA (nothing kept); it says which, where it raised
    the out-of-memory error before.  Where only the larger refining batch runs out, the fit gets that far as it
    was and goes down the same ladder there."""
    ms = EPS()
    inner = Mixture2D(ms)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    opts = {"iterations": 12, "teacher_steps": 40}
    plain = fit_calibration(inner, ms, noise, 4, **opts)
    assert plain.info["gradient"] == "autograd" and not plain.info["recompute"]
    device = _Device(inner, room=32)  # two calls' worth of 16 noises: a 4-step solve keeps four
    messages = []
    cal = fit_calibration(device, ms, noise, 4, log=messages.append, **opts)
    assert cal.info["gradient"] == "autograd" and cal.info["recompute"] and device.most <= 32
    assert any("no memory for what a backward pass through its calls keeps" in m and "again in the backward" in m
               for m in messages)
    assert torch.allclose(cal.sigmas, plain.sigmas, rtol=1e-9, atol=0)  # the same gradient, by recomputing
    messages.clear()
    cal = fit_calibration(_Device(inner, room=8), ms, noise, 4, log=messages.append, **opts)  # not even one call
    assert cal.info["gradient"] == "spsa" and cal.info["backward_passes"] == 0
    assert any("no memory for what a backward pass through one call keeps" in m and "SPSA" in m for m in messages)
    assert torch.equal(cal.sigmas, fit_calibration(inner, ms, noise, 4, gradient="spsa", **opts).sigmas)
    messages.clear()
    cal = fit_calibration(_Device(inner, room=32, cpu_allocator=True), ms, noise, 4, log=messages.append, **opts)
    assert cal.info["recompute"] and any("can't allocate memory" in m for m in messages)
    refine = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # room for a plain solve on the 16 fitting noises, and for one call on the 64 refining noises: recomputing there
    messages.clear()
    cal = fit_calibration(_Device(inner, 64), ms, noise, 4, refine_noise=refine, log=messages.append, **opts)
    assert cal.info["gradient"] == "autograd" and cal.info["recompute"] and math.isfinite(cal.info["rms_refined"])
    assert any("on 64 noises" in m and "again in the backward pass from now on" in m for m in messages)
    assert not any("SPSA" in m for m in messages)
    # room for three calls: recomputing from the start, then by SPSA on the refining noises
    messages.clear()
    cal = fit_calibration(_Device(inner, 48), ms, noise, 4, refine_noise=refine, log=messages.append, **opts)
    assert cal.info["gradient"] == "autograd, then spsa" and math.isfinite(cal.info["rms_refined"])
    assert any("again in the backward pass instead of keeping it" in m for m in messages)
    assert any("on 64 noises" in m and "going on by SPSA" in m for m in messages)
    # asked for autograd by name: recomputing is autograd too; no room even for one call is an input error
    assert fit_calibration(_Device(inner, 32), ms, noise, 4, gradient="autograd", **opts).info["recompute"]
    with pytest.raises(KSamplerInputError, match="gradient: 'autograd'.*no memory.*'auto' or 'spsa'"):
        fit_calibration(_Device(inner, 8), ms, noise, 4, gradient="autograd", **opts)


def test_on_spsa_is_called_once_where_the_fit_turns_to_spsa():
    """``on_spsa`` frees what was set up for a gradient (ComfyUI: the weight copies): called once where the fit
    turns to SPSA, from the start or mid-fit, and never for a fit by autograd."""
    ms = EPS()
    inner = Mixture2D(ms)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    refine = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    opts = {"iterations": 6, "teacher_steps": 40}
    for model, extra, expected in ((inner, {}, 0), (_Device(inner, 8), {}, 1),
                                   (_Device(inner, 48), {"refine_noise": refine}, 1), (inner, {"gradient": "spsa"}, 1)):
        called = []
        cal = fit_calibration(model, ms, noise, 4, on_spsa=lambda: called.append(1), **extra, **opts)
        assert len(called) == expected and (cal.info["gradient"] == "autograd") == (expected == 0)


def test_recomputing_each_call_in_the_backward_pass_is_the_same_fit_at_one_more_call_per_step():
    """gradient='recompute' asks for it by name: the fit of plain autograd (the same gradient), each of its
    backward passes running the model once more per step (and the gradient probe's once), counted as model
    calls."""
    ms = EPS()
    model = Mixture2D(ms)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    opts = {"iterations": 9, "teacher_steps": 40}
    plain = fit_calibration(model, ms, noise, 3, **opts)
    recomputed = fit_calibration(model, ms, noise, 3, gradient="recompute", **opts)
    assert recomputed.info["gradient"] == "autograd" and recomputed.info["recompute"]
    assert torch.allclose(recomputed.sigmas, plain.sigmas, rtol=1e-9, atol=0)
    assert torch.allclose(recomputed.coefficients, plain.coefficients, rtol=1e-9, atol=1e-12)
    extra = recomputed.info["model_calls"] - plain.info["model_calls"]
    assert recomputed.info["backward_passes"] == plain.info["backward_passes"] and extra == plain.info[
        "backward_passes"] + 3
    with pytest.raises(ValueError, match="gradient: must be one of 'auto', 'autograd', 'recompute', 'spsa'"):
        fit_calibration(model, ms, noise, 3, gradient="checkpoint", **opts)


def test_a_model_that_keeps_state_from_call_to_call_is_not_fitted_by_recomputing():
    """Recomputing runs each call again in the backward pass, in another order; a model whose output depends on
    the calls before (as ComfyUI's hook keyframes step on as the sigmas fall) would then give a gradient through
    other values, silently wrong.  The recomputed call is compared with the first: where they differ, a fit short
    of memory goes by SPSA saying why, and gradient='recompute' by name is an input error."""
    ms = EPS()
    inner = Mixture2D(ms)
    calls = [0]

    def stateful(x, sigma, **kw):
        calls[0] += 1
        return inner(x, sigma) * (1 + 0.01 * (calls[0] % 2))
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    opts = {"iterations": 6, "teacher_steps": 40}
    with pytest.raises(KSamplerInputError, match="gradient: 'recompute'.*other values when a call ran again"):
        fit_calibration(stateful, ms, noise, 4, gradient="recompute", **opts)
    messages = []
    cal = fit_calibration(_Device(stateful, room=32), ms, noise, 4, log=messages.append, **opts)
    assert cal.info["gradient"] == "spsa" and any("keeps state from call to call" in m and "SPSA" in m
                                                  for m in messages)
    # the same call again within the tolerance (a GPU kernel's last bits) is not a difference
    jitter = [0]

    def last_bits(x, sigma, **kw):
        jitter[0] += 1
        return inner(x, sigma) * (1 + 1e-9 * (jitter[0] % 2))
    assert fit_calibration(last_bits, ms, noise, 4, gradient="recompute", **opts).info["recompute"]


def test_refining_on_more_noise_is_never_worse_there_and_counts_its_calls():
    ms = EPS()
    model = Mixture2D(ms)
    fit_noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    refine_noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    opts = {"iterations": 30, "teacher_steps": 40}
    plain = fit_calibration(model, ms, fit_noise, 4, **opts)
    before = model.calls
    messages = []
    refined = fit_calibration(model, ms, fit_noise, 4, refine_noise=refine_noise, log=messages.append, **opts)
    assert refined.info["refine_noises"] == 256 and any("refining on 256" in m for m in messages)
    assert refined.info["model_calls"] == model.calls - before > plain.info["model_calls"]
    assert refined.info["backward_passes"] > plain.info["backward_passes"]
    # on the refining noise, against its own teacher, the kept iterate is the best there (the unrefined one included)
    x0 = ms.noise_scaling(torch.tensor(float(ms.sigma_max)), refine_noise, torch.zeros_like(refine_noise), True)
    ref = teacher_solve(model, ms, x0, float(ms.sigma_max), float(ms.sigma_min), opts["teacher_steps"])

    def error(cal):
        return _rms(cal.sampler()(model, x0, cal.sigmas.double()), ref)
    assert error(refined) <= error(plain) * (1 + 1e-4), (error(refined), error(plain))
    assert math.isclose(error(refined), refined.info["rms_refined"], rel_tol=1e-3)
    # refine_iterations: the refinement's length (REFINE's by default); more iterations cost more backward passes
    assert refined.info["refine_iterations"] == REFINE["iterations"]
    longer = fit_calibration(model, ms, fit_noise, 4, refine_noise=refine_noise,
                             refine_iterations=2 * REFINE["iterations"], **opts)
    assert longer.info["refine_iterations"] == 2 * REFINE["iterations"]
    assert longer.info["backward_passes"] > refined.info["backward_passes"]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="refine_iterations"):
            fit_calibration(model, ms, fit_noise, 4, refine_noise=refine_noise, refine_iterations=bad, **opts)


def test_candidate_fits_the_one_best_on_the_refining_noise_is_refined():
    ms = EPS()
    model = Mixture2D(ms)
    draw = [torch.randn(16, 2, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (4, 6, 7)]
    refine_noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    opts = {"iterations": 30, "teacher_steps": 40, "refine_noise": refine_noise, "refine_iterations": 10}
    messages = []
    best = fit_calibration(model, ms, draw[0], 4, candidate_noise=draw[1:], log=messages.append, **opts)
    rms = best.info["candidate_rms"]
    assert best.info["candidates"] == 3 and len(rms) == 3 and all(math.isfinite(v) for v in rms)
    assert any("3 fits from different fitting noise" in m for m in messages)
    # each candidate's RMS is its own fit's on the refining noise, and the kept one is the lowest's, refined
    singles = [fit_calibration(model, ms, noise, 4, **{**opts, "refine_iterations": 0}) for noise in draw]
    for single, value in zip(singles, rms):
        assert math.isclose(single.info["rms_refined"], value, rel_tol=1e-9)
    winner = min(range(3), key=rms.__getitem__)
    alone = fit_calibration(model, ms, draw[winner], 4, **opts)
    assert torch.equal(best.sigmas, alone.sigmas) and torch.equal(best.coefficients, alone.coefficients)
    assert best.info["rms_refined"] == alone.info["rms_refined"] <= min(rms)
    assert best.info["model_calls"] > alone.info["model_calls"]
    # refine_candidates: each fit is refined, and the one best there after its refinement is kept
    after = fit_calibration(model, ms, draw[0], 4, candidate_noise=draw[1:], refine_candidates=True, **opts)
    refined_alone = [fit_calibration(model, ms, noise, 4, **opts) for noise in draw]
    for single, value in zip(refined_alone, after.info["candidate_rms"]):
        assert math.isclose(single.info["rms_refined"], value, rel_tol=1e-9)
    kept = refined_alone[min(range(3), key=after.info["candidate_rms"].__getitem__)]
    assert after.info["refine_candidates"] and torch.equal(after.sigmas, kept.sigmas)
    assert after.info["rms_refined"] == min(single.info["rms_refined"] for single in refined_alone)
    assert after.info["backward_passes"] > best.info["backward_passes"]
    # a candidate set with its own denoiser (one bound to its batch) is fitted with that denoiser
    seen = []

    def other(x, sigma, **kw):
        seen.append(x.shape[0])
        return model(x, sigma, **kw)
    fit_calibration(model, ms, draw[0], 4, candidate_noise=draw[1:2], candidate_denoisers=[other],
                    **{**opts, "iterations": 2})
    assert seen and set(seen) == {16}
    with pytest.raises(ValueError, match="candidate_noise.*refine_noise"):
        fit_calibration(model, ms, draw[0], 4, candidate_noise=draw[1:], iterations=2)
    with pytest.raises(ValueError, match=r"candidate_noise\[0\].*shaped like"):
        fit_calibration(model, ms, draw[0], 4, candidate_noise=[draw[1][:8]], **opts)
    with pytest.raises(ValueError, match=r"candidate_noise\[1\].*NaN"):
        fit_calibration(model, ms, draw[0], 4, candidate_noise=[draw[1], torch.full_like(draw[1], math.nan)], **opts)
    with pytest.raises(ValueError, match="candidate_denoisers"):
        fit_calibration(model, ms, draw[0], 4, candidate_noise=draw[1:], candidate_denoisers=[model], **opts)


@pytest.mark.parametrize("candidates, refine, refine_candidates, corrector, iterations", [
    (1, False, False, True, 9), (1, True, False, False, 9), (3, True, False, True, 9), (3, True, True, True, 9),
    (1, False, False, True, 2)])
def test_progress_counts_every_iteration_of_the_fit_and_can_stop_it(candidates, refine, refine_candidates,
                                                                     corrector, iterations):
    """progress(done, total) comes before each optimiser iteration: done runs 1..total exactly, over the race of
    the two forms, the candidate fits and the refinements; raising from it stops the fit there."""
    ms = EPS()
    model = Mixture2D(ms)
    draw = [torch.randn(16, 2, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in range(candidates)]
    opts = {"iterations": iterations, "teacher_steps": 20, "refine_iterations": 4, "corrector": corrector,
            "candidate_noise": draw[1:], "refine_candidates": refine_candidates,
            "refine_noise": torch.randn(64, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
            if refine else None}
    seen = []
    fit_calibration(model, ms, draw[0], 4, progress=lambda done, total: seen.append((done, total)), **opts)
    race = iterations // 3 if corrector else 0  # the two forms race, then the leader goes on; too few: both go on
    per_fit = 2 * race + iterations - race if race else (2 if corrector else 1) * iterations
    refinements = 0 if not refine else (candidates if refine_candidates and candidates > 1 else 1)
    total = candidates * per_fit + refinements * 4
    assert seen == [(done, total) for done in range(1, total + 1)]

    class Stop(Exception):
        pass

    def stop_at_3(done, total):
        if done == 3:
            raise Stop
    with pytest.raises(Stop):
        fit_calibration(model, ms, draw[0], 4, progress=stop_at_3, **opts)


def test_refine_settings_are_checked_and_keyed_apart():
    from ksampler.calibration import FIT_SALT, calibration_key, fitting_noise
    ms = EPS()
    model = Mixture2D(ms)
    with pytest.raises(ValueError, match="refine_noise"):
        fit_calibration(model, ms, torch.randn(8, 2), 3, refine_noise=torch.randn(8, 3))
    with pytest.raises(ValueError, match="refine_noise"):
        fit_calibration(model, ms, torch.randn(8, 2), 3, refine_noise=torch.full((8, 2), math.nan))
    with pytest.raises(ValueError, match="refine_noise.*same dtype"):
        fit_calibration(model, ms, torch.randn(8, 2), 3, refine_noise=torch.randn(8, 2, dtype=torch.float64))
    # the fitting stream is the one earlier versions drew; the refining stream is another
    first = torch.randn((4, 3), generator=torch.Generator().manual_seed((7 ^ FIT_SALT) % (1 << 63)))
    assert torch.equal(fitting_noise(7, 4, (3,)), first)
    assert not torch.allclose(fitting_noise(7, 4, (3,), stream=1), first)

    clear_cache()
    net_model = analytic_model()
    pos, neg = conditioning(1.0), conditioning(-0.5)
    latent = {"samples": torch.zeros(1, 4, 4, 4)}
    opts = {"fit_noises": 4, "iterations": 2, "teacher_steps": 10}
    with pytest.raises(ValueError, match="refine_noises"):
        calibrate(net_model, pos, neg, latent, 3, 3.0, refine_noises=2, log=lambda m: None, **opts)
    plain = calibrate(net_model, pos, neg, latent, 3, 3.0, log=lambda m: None, **opts)
    # an unrefined calibration keeps the key (and so the files) of the versions before the refinement
    old_settings = {"order": 3, "fit_noises": 4, "seed": 0, "iterations": 2, "teacher_steps": 10}
    assert plain.info["key"] == calibration_key(net_model, pos, neg, (1, 4, 4, 4), 3, 3.0, old_settings)
    refined = calibrate(net_model, pos, neg, latent, 3, 3.0, refine_noises=8, log=lambda m: None, **opts)
    assert refined is not plain and refined.info["key"] != plain.info["key"] and refined.info["refine_noises"] == 8
    # and fit_candidates 1 keeps the key of a refined calibration; each candidate fit draws noise of its own
    assert calibrate(net_model, pos, neg, latent, 3, 3.0, refine_noises=8, fit_candidates=1, log=lambda m: None,
                     **opts) is refined
    from ksampler.calibration import candidate_fitting_noise, fit_settings
    more = candidate_fitting_noise(7, fit_settings(3, 4, 7, 2, 10, 8, 3), (3,))
    assert len(more) == 2 and not torch.allclose(more[0], more[1])
    for other in (fitting_noise(7, 4, (3,)), fitting_noise(7, 4, (3,), stream=1)):
        assert not any(torch.allclose(other, n) for n in more)


def test_selection_and_penalty_settings_are_checked():
    ms = EPS()
    model = Mixture2D(ms)
    noise = torch.randn(8, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="selection"):
        fit_calibration(model, ms, noise, 3, selection="best")
    for bad in (-1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="coefficient_penalty"):
            fit_calibration(model, ms, noise, 3, coefficient_penalty=bad)


def test_held_aside_selection_keeps_the_iterate_best_on_the_quarter_the_gradient_never_sees():
    ms = EPS()
    model = Mixture2D(ms)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    opts = {"iterations": 30, "teacher_steps": 40, "corrector": False}
    cal = fit_calibration(model, ms, noise, 4, selection="held_aside", **opts)
    assert cal.info["selection"] == "held_aside"
    x0 = ms.noise_scaling(torch.tensor(float(ms.sigma_max)), noise, torch.zeros_like(noise), True)
    ref = teacher_solve(model, ms, x0, float(ms.sigma_max), float(ms.sigma_min), opts["teacher_steps"])
    out = cal.sampler()(model, x0, cal.sigmas.double())
    held = slice(0, 8)  # the first quarter: never in the gradient
    assert math.isclose(_rms(out[held], ref[held]), cal.info["rms_fitted"], rel_tol=1e-3)
    assert not math.isclose(_rms(out, ref), cal.info["rms_fitted"], rel_tol=1e-3)
    start = fit_calibration(model, ms, noise, 4, **{**opts, "iterations": 0})
    assert cal.info["rms_fitted"] <= _rms(start.sampler()(model, x0, start.sigmas.double())[held], ref[held]) + 1e-9


def test_the_coefficient_penalty_keeps_the_weights_near_adams():
    from ksampler.calibration.solver import ve_sigma
    ms = EPS()
    model = Mixture2D(ms)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    opts = {"iterations": 40, "teacher_steps": 40, "corrector": False, "shift": False}

    def drift(cal):  # how far the fitted weights are from the Adams weights of the fitted schedule
        base = int(cal.info["init"].split("+ab")[1][0])
        adams = multistep_coefficients(ve_sigma(ms, cal.sigmas.double()), base, cal.coefficients.shape[1])
        return float((cal.coefficients - adams).abs().max())
    free = fit_calibration(model, ms, noise, 4, **opts)
    shrunk = fit_calibration(model, ms, noise, 4, coefficient_penalty=1e4, **opts)
    assert shrunk.info["coefficient_penalty"] == 1e4 and free.info["coefficient_penalty"] == 0.0
    assert drift(free) > 0.02 and drift(shrunk) < 0.1 * drift(free), (drift(free), drift(shrunk))


def test_without_fitting_the_last_step_it_takes_the_newest_estimate_alone():
    ms = EPS()
    model = Mixture2D(ms)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    opts = {"iterations": 30, "teacher_steps": 40, "corrector": False}
    cal = fit_calibration(model, ms, noise, 4, fit_last_step=False, **opts)
    assert cal.info["fit_last_step"] is False
    assert cal.coefficients[-1].tolist() == [1.0, 0.0, 0.0]  # the Adams step into sigma 0: the newest estimate
    assert cal.coefficients[1:-1].sub(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).abs().max() > 0.05
    free = fit_calibration(model, ms, noise, 4, **opts)
    assert free.info["fit_last_step"] is True and free.coefficients[-1].tolist() != [1.0, 0.0, 0.0]


def test_inside_comfyui_a_calibration_file_lives_in_its_output_folder(tmp_path, monkeypatch, capsys):
    """Inside the ComfyUI server (folder_paths present) calibration_file is relative to ComfyUI's output folder
    (subfolders made as its Save Image makes them), as the server's working folder is not the user's to know; a
    path outside it is refused before the fit, and a file left in the working folder by older versions is named
    with where to move it.  Headless the path is as given."""
    import os
    import sys
    import types
    output, started_in = tmp_path / "output", tmp_path / "server"
    output.mkdir(), started_in.mkdir()
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(output)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.chdir(started_in)
    model, pos, neg = analytic_model(), conditioning(1.0), conditioning(-1.0)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    opts = {"fit_noises": 4, "iterations": 2, "teacher_steps": 10}
    clear_cache()
    fitted = CalibratedScheduler().calibrate(model, pos, neg, latent, 3, 3.0, calibration_file="cal/a.safetensors",
                                             **opts)[2]
    assert (output / "cal" / "a.safetensors").is_file() and not (started_in / "cal").exists()
    clear_cache()
    loaded = CalibratedScheduler().calibrate(model, pos, neg, latent, 3, 3.0, calibration_file="cal/a.safetensors",
                                             **opts)[2]
    assert loaded is not fitted and torch.equal(loaded.sigmas, fitted.sigmas)
    said = capsys.readouterr().out
    assert f"calibration: loaded {output / 'cal' / 'a.safetensors'}" in said and said.count("fitting once") == 1
    inside = str(output / "cal" / "a.safetensors")  # an absolute path inside the folder is the same file
    assert torch.equal(CalibratedScheduler().calibrate(model, pos, neg, latent, 3, 3.0, calibration_file=inside,
                                                       **opts)[0], fitted.sigmas)
    for outside in ("../a.safetensors", str(started_in / "a.safetensors"), "cal/../../a.safetensors"):
        with pytest.raises(KSamplerInputError, match="^calibration_file: .*outside ComfyUI's output folder"):
            CalibratedScheduler().calibrate(model, pos, neg, latent, 3, 3.0, calibration_file=outside, **opts)
    assert not (tmp_path / "a.safetensors").exists() and not (started_in / "a.safetensors").exists()
    for bad, why in (("sub\x00/a.safetensors", "NUL"), ("new/a.txt", "must end in .safetensors")):
        with pytest.raises(KSamplerInputError, match=f"^calibration_file: .*{why}"):
            CalibratedScheduler().calibrate(model, pos, neg, latent, 3, 3.0, calibration_file=bad, **opts)
    assert not (output / "new").exists()  # no folder made for a path refused
    (output / "taken.safetensors").write_bytes(b"")  # a file where a folder would have to be
    with pytest.raises(KSamplerInputError, match="^calibration_file: cannot make the folder .*taken.safetensors"):
        CalibratedScheduler().calibrate(model, pos, neg, latent, 3, 3.0,
                                        calibration_file="taken.safetensors/a.safetensors", **opts)
    with pytest.raises(KSamplerInputError, match="^positive"):  # a graph refused after the folders were made
        CalibratedScheduler().calibrate(model, [], neg, latent, 3, 3.0, calibration_file="new/deeper/a.safetensors",
                                        **opts)
    assert not (output / "new").exists()  # the node that failed left none of the folders it made
    (output / "kept").mkdir()
    with pytest.raises(KSamplerInputError, match="^positive"):
        CalibratedScheduler().calibrate(model, [], neg, latent, 3, 3.0, calibration_file="kept/new/a.safetensors",
                                        **opts)
    assert (output / "kept").is_dir() and not (output / "kept" / "new").exists()  # one it did not make stays
    fitted.save(str(started_in / "old.safetensors"))  # where an older version wrote it
    capsys.readouterr()
    CalibratedScheduler().calibrate(model, pos, neg, latent, 3, 3.0, calibration_file="old.safetensors", **opts)
    said = capsys.readouterr().out
    assert "'old.safetensors' is read from ComfyUI's output folder" in said and "move the file there" in said
    monkeypatch.delitem(sys.modules, "folder_paths")  # headless: as given, relative to the working folder
    clear_cache()
    CalibratedScheduler().calibrate(model, pos, neg, latent, 3, 3.0, calibration_file="b.safetensors", **opts)
    assert os.path.isfile(started_in / "b.safetensors") and not (output / "b.safetensors").exists()


def test_in_a_headless_workflow_a_calibration_file_is_relative_to_the_workflow(tmp_path, monkeypatch):
    """``python -m ksampler run wf.json`` takes a relative calibration_file in the workflow file's folder, as the
    bundled Load Image takes its path, wherever it is run from; an absolute path is as given."""
    import json
    import os
    from ksampler.workflow import run_workflow
    folder, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    folder.mkdir(), elsewhere.mkdir()
    graph = {
        "1": {"class_type": "ksampler_CheckpointLoader", "inputs": {"ckpt_name": "flow"}},
        "2": {"class_type": "ksampler_TextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "ksampler_TextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "ksampler_EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "ksampler_CalibratedScheduler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "steps": 2,
            "cfg": 3.0, "fit_noises": 4, "iterations": 1, "teacher_steps": 10,
            "calibration_file": "cals/fit.safetensors"}},
        "6": {"class_type": "ksampler_KSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "karras",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0,
            "calibration": ["5", 2]}},
        "7": {"class_type": "ksampler_VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "ksampler_SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "t"}}}
    (folder / "cals").mkdir()
    (folder / "wf.json").write_text(json.dumps(graph))
    monkeypatch.chdir(elsewhere)
    clear_cache()
    run_workflow(str(folder / "wf.json"), output_dir=str(tmp_path / "out"))
    assert (folder / "cals" / "fit.safetensors").is_file() and not (elsewhere / "cals").exists()
    graph["5"]["inputs"]["calibration_file"] = str(tmp_path / "absolute.safetensors")
    (folder / "wf.json").write_text(json.dumps(graph))
    clear_cache()
    run_workflow(str(folder / "wf.json"), output_dir=str(tmp_path / "out"))
    assert os.path.isfile(tmp_path / "absolute.safetensors")
