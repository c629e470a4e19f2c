"""The ComfyUI adapter, tested against the host protocol it documents, with stand-in objects (tests/comfy_standins.py).

There is no ComfyUI in CI; the real host is checked by ../shared/comfyui/parity.py and e2e.sh (README,
"Verifying against ComfyUI").
"""
import contextlib
import sys
import types

import pytest
import torch

from comfy_standins import StandInInterrupt, StandInModelPatcher, install
from ksampler import interop_nodes as interop
from ksampler.calibration import clear_cache
from ksampler.conditioning import KSamplerInputError
from ksampler.samplers import SAMPLERS
from ksampler.schedulers import SCHEDULERS, sampling_sigmas


def _cond(value):
    return [[torch.full((1, 4, 8), value), {}]]


@pytest.fixture
def host(monkeypatch):
    modules, adapter = install(monkeypatch)
    return modules, adapter


@pytest.fixture
def comfy_calibration(host, monkeypatch):
    """ksampler.comfy_calibration imported against the stand-ins, with an empty calibration cache."""
    monkeypatch.delitem(sys.modules, "ksampler.comfy_calibration", raising=False)
    import importlib
    clear_cache()
    return importlib.import_module("ksampler.comfy_calibration")


def test_core_never_imports_comfy():
    """Importing the pack (outside ComfyUI) must not import comfy or the adapter."""
    import subprocess
    code = ("import sys, ksampler, ksampler.pipeline, ksampler.samplers, ksampler.schedulers; "
            "bad = [m for m in sys.modules if m == 'comfy' or m.startswith('comfy.') or m == 'ksampler.comfy_adapter' "
            "or m.startswith('k_diffusion') or m.startswith('scipy') or m == 'torchsde']; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde", "uni_pc", "euler_cfg_pp", "ddim"])
def test_common_ksampler_runs_our_registry_through_the_host(host, kind, sampler):
    modules, adapter = host
    patcher = StandInModelPatcher(modules, kind)
    latent = {"samples": torch.zeros(1, 4, 8, 8), "extra": 1}
    out = adapter.common_ksampler(patcher, 5, 6, 3.0, sampler, "karras", _cond(1.0), _cond(-1.0), latent)
    assert out is not latent and out["extra"] == 1 and out["samples"].shape == (1, 4, 8, 8)
    assert torch.isfinite(out["samples"]).all()
    calls = modules["comfy.samplers"].STANDIN_CALLS
    assert calls["sample"] == 1
    # progress: one update per step, and an interrupt check every step
    progress = modules["comfy.utils"].STANDIN_PROGRESS
    steps = len(sampling_sigmas(patcher.model_sampling_object, "karras", 6)) - 1
    assert [p[0] for p in progress] == list(range(1, steps + 1))
    assert calls["interrupt_checks"] == steps
    if sampler == "euler_cfg_pp":
        assert calls["post_cfg"] == steps, "CFG++ reads the unconditional estimate through a post-CFG function"


def test_host_path_equals_core_path(host):
    """Same sigmas, same noise, same denoiser: the adapter's result equals our pipeline's."""
    modules, adapter = host
    from ksampler.pipeline import sample
    from analytic import GaussianCFGDenoiser
    patcher = StandInModelPatcher(modules, "eps")
    out = adapter.common_ksampler(patcher, 9, 8, 3.0, "dpmpp_2m", "normal", _cond(1.0), _cond(-1.0),
                                  {"samples": torch.zeros(1, 4, 8, 8)})["samples"]
    model = GaussianCFGDenoiser(mu_c=1.0, mu_u=-1.0, s0=0.8, cfg=3.0)
    ms = patcher.model_sampling_object.ours
    model.model_sampling = ms
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ref = sample(model, ms, noise, torch.zeros_like(noise), sampling_sigmas(ms, "normal", 8), None, "dpmpp_2m", 9)
    assert torch.allclose(out, ref, atol=1e-5)


def test_interrupt_is_honoured_mid_run(host):
    modules, adapter = host
    modules["comfy.model_management"].STANDIN_STATE["interrupt_at"] = 3
    with pytest.raises(StandInInterrupt):
        adapter.common_ksampler(StandInModelPatcher(modules), 1, 10, 3.0, "euler", "karras", _cond(1.0),
                                _cond(-1.0), {"samples": torch.zeros(1, 4, 8, 8)})
    assert modules["comfy.samplers"].STANDIN_CALLS["interrupt_checks"] == 3


def test_denoise_zero_and_late_start_return_the_latent(host):
    modules, adapter = host
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    out = adapter.common_ksampler(StandInModelPatcher(modules), 1, 5, 3.0, "euler", "karras", _cond(1.0),
                                  _cond(-1.0), latent, denoise=0.0)
    assert torch.equal(out["samples"], latent["samples"])
    out = adapter.common_ksampler(StandInModelPatcher(modules), 1, 5, 3.0, "euler", "karras", _cond(1.0),
                                  _cond(-1.0), latent, start_step=9)
    assert torch.equal(out["samples"], latent["samples"])


def test_empty_latent_channels_fixed_by_the_host(host):
    modules, adapter = host
    out = adapter.common_ksampler(StandInModelPatcher(modules), 1, 3, 3.0, "euler", "karras", _cond(1.0),
                                  _cond(-1.0), {"samples": torch.zeros(1, 1, 8, 8)})
    assert out["samples"].shape == (1, 4, 8, 8)


def test_noise_mask_keeps_unmasked_region_through_the_host(host):
    modules, adapter = host
    latent = {"samples": torch.randn(1, 4, 8, 8), "noise_mask": torch.zeros(1, 8, 8)}
    latent["noise_mask"][:, :4] = 1.0
    out = adapter.common_ksampler(StandInModelPatcher(modules), 1, 6, 3.0, "euler", "karras", _cond(1.0),
                                  _cond(-1.0), latent)["samples"]
    assert torch.allclose(out[:, :, 4:], latent["samples"][:, :, 4:], atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "res_multistep"])
def test_video_latent_through_the_host(host, sampler):
    """5-D video latents [B, C, T, H, W] (Wan, HunyuanVideo, ...) sample as in ComfyUI; a per-frame mask keeps
    the frames it marks 0 (a frames-stacked [T, H, W] mask, ComfyUI's convention for video)."""
    modules, adapter = host
    samples = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 8, 8)
    mask[0] = 0.0
    latent = {"samples": samples, "noise_mask": mask}
    out = adapter.common_ksampler(StandInModelPatcher(modules, latent_dims=3), 2, 6, 3.0, sampler, "karras", _cond(1.0),
                                  _cond(-1.0), latent)["samples"]
    assert out.shape == samples.shape and torch.isfinite(out).all()
    assert torch.allclose(out[:, :, 0], samples[:, :, 0], atol=1e-5)
    assert not torch.allclose(out[:, :, 1:], samples[:, :, 1:], atol=1e-2)
    assert torch.equal(latent["samples"], samples) and torch.equal(latent["noise_mask"][0], torch.zeros(8, 8))


def test_audio_latent_through_the_host(host):
    """3-D latents [B, C, L] (Stable Audio) sample as in ComfyUI."""
    modules, adapter = host
    latent = {"samples": torch.zeros(2, 4, 16)}
    out = adapter.common_ksampler(StandInModelPatcher(modules, latent_dims=1), 2, 6, 3.0, "dpmpp_2m", "karras", _cond(1.0),
                                  _cond(-1.0), latent)["samples"]
    assert out.shape == (2, 4, 16) and torch.isfinite(out).all()


def test_interop_nodes(host):
    modules, adapter = host
    (sampler,) = interop.SamplerSelect().get_sampler("dpmpp_2m_sde", batch_invariant_noise=True)
    assert isinstance(sampler, modules["comfy.samplers"].Sampler) and sampler.name == "dpmpp_2m_sde"
    assert sampler.noise_options.batch_invariant
    patcher = StandInModelPatcher(modules)
    (sigmas,) = interop.Scheduler().get_sigmas(patcher, "karras", 10, 1.0)
    assert torch.equal(sigmas, sampling_sigmas(patcher.model_sampling_object, "karras", 10))
    (sigmas5,) = interop.Scheduler().get_sigmas(patcher, "karras", 10, 1.0, karras_rho=5.0)
    assert not torch.allclose(sigmas, sigmas5)
    spec = interop.SamplerSelect.INPUT_TYPES()["required"]["sampler_name"][0]
    assert spec == list(SAMPLERS)
    assert interop.Scheduler.INPUT_TYPES()["required"]["scheduler"][0] == list(SCHEDULERS)
    from ksampler.nodes import NODE_TABLE
    rows = {k: row for k, row in NODE_TABLE.items() if row[0] == "interop_nodes"}
    assert set(rows) == {"ksampler_SamplerSelect", "ksampler_Scheduler"}
    assert all(getattr(interop, row[1]) for row in rows.values())
    # a SAMPLER from the interop node runs through the host's sample() like SamplerCustom does
    out = modules["comfy.samplers"].sample(patcher, torch.randn(1, 4, 8, 8), _cond(1.0), _cond(-1.0), 3.0, "cpu",
                                           sampler, sigmas, latent_image=torch.zeros(1, 4, 8, 8), seed=3)
    assert torch.isfinite(out).all()


def test_node_dispatches_comfy_models_to_the_adapter(host):
    modules, adapter = host
    from ksampler.nodes import KSampler, is_comfy_model
    patcher = StandInModelPatcher(modules)
    assert is_comfy_model(patcher)
    out = KSampler().sample(patcher, 2, 4, 3.0, "heun", "simple", _cond(1.0), _cond(-1.0),
                            {"samples": torch.zeros(1, 4, 8, 8)})[0]
    assert modules["comfy.samplers"].STANDIN_CALLS["sample"] == 1 and torch.isfinite(out["samples"]).all()


# ---- names the host knows and we do not: listed after ours, run by the host's own implementation ----
def _add_host_names(modules, monkeypatch):
    """A host with one extra sampler (Euler, written here) and one extra scheduler (uniform in sigma)."""
    samplers = modules["comfy.samplers"]

    def host_euler(model, x, sigmas, extra_args=None, disable=None):
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **(extra_args or {}))
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    def host_uniform(model_sampling, steps):
        return torch.cat([torch.linspace(float(model_sampling.sigma_max), float(model_sampling.sigma_min), steps),
                          torch.zeros(1)])

    samplers.HOST_SAMPLER_FUNCTIONS["standin_euler"] = host_euler
    samplers.SAMPLER_NAMES.append("standin_euler")
    samplers.SCHEDULER_HANDLERS["standin_uniform"] = host_uniform
    monkeypatch.setattr(samplers.KSampler, "SCHEDULERS", list(samplers.SCHEDULER_HANDLERS))
    return host_euler, host_uniform


def test_host_only_names_are_listed_after_ours_and_labelled(host, monkeypatch):
    modules, adapter = host
    _add_host_names(modules, monkeypatch)
    from ksampler.nodes import KSampler, KSamplerAdvanced
    for node in (KSampler, KSamplerAdvanced):
        required = node.INPUT_TYPES()["required"]
        names, spec = required["sampler_name"]
        assert names == list(SAMPLERS) + ["standin_euler"]
        assert "ComfyUI's own implementation" in spec["tooltip"] and "standin_euler" in spec["tooltip"]
        names, spec = required["scheduler"]
        assert names == list(SCHEDULERS) + ["standin_uniform"] and "standin_uniform" in spec["tooltip"]
    assert interop.SamplerSelect.INPUT_TYPES()["required"]["sampler_name"][0][-1] == "standin_euler"
    assert interop.Scheduler.INPUT_TYPES()["required"]["scheduler"][0][-1] == "standin_uniform"


def test_without_host_extras_the_lists_and_tooltips_are_ours(host):
    from ksampler.nodes import KSampler, TOOLTIPS
    required = KSampler.INPUT_TYPES()["required"]
    assert required["sampler_name"][0] == list(SAMPLERS), "the January 2026 host's 44 names are all ours"
    assert required["sampler_name"][1]["tooltip"] == TOOLTIPS["sampler_name"]


def test_host_only_sampler_and_scheduler_run_the_hosts_implementation(host, monkeypatch):
    modules, adapter = host
    host_euler, host_uniform = _add_host_names(modules, monkeypatch)
    from ksampler.nodes import KSampler
    patcher = StandInModelPatcher(modules, "eps")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = KSampler().sample(patcher, 9, 6, 3.0, "standin_euler", "standin_uniform", _cond(1.0), _cond(-1.0),
                            latent)[0]["samples"]
    calls = modules["comfy.samplers"].STANDIN_CALLS
    assert calls["host_samplers"] == ["standin_euler"] and calls["host_schedules"] == [("standin_uniform", 6)]
    # the same run with our euler over the host's sigmas: the host's function is Euler too, so they agree
    ms = patcher.model_sampling_object
    ours = adapter.common_ksampler(patcher, 9, 6, 3.0, "euler", "karras", _cond(1.0), _cond(-1.0), latent)
    assert not torch.allclose(ours["samples"], out, atol=1e-3), "the host's scheduler, not karras, was used"
    from ksampler.pipeline import sample
    from analytic import GaussianCFGDenoiser
    model = GaussianCFGDenoiser(mu_c=1.0, mu_u=-1.0, s0=0.8, cfg=3.0)
    model.model_sampling = ms.ours
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ref = sample(model, ms.ours, noise, torch.zeros_like(noise), host_uniform(ms, 6), None, "euler", 9)
    assert torch.allclose(out, ref, atol=1e-5)


def test_host_only_scheduler_follows_the_denoise_rule(host, monkeypatch):
    modules, adapter = host
    _add_host_names(modules, monkeypatch)
    patcher = StandInModelPatcher(modules, "eps")
    adapter.common_ksampler(patcher, 1, 6, 3.0, "dpm_2", "standin_uniform", _cond(1.0), _cond(-1.0),
                            {"samples": torch.randn(1, 4, 8, 8)}, denoise=0.5)
    # 12-step schedule (6 / 0.5), plus one for dpm_2's discarded penultimate sigma
    assert modules["comfy.samplers"].STANDIN_CALLS["host_schedules"] == [("standin_uniform", 13)]
    (sigmas,) = interop.Scheduler().get_sigmas(patcher, "standin_uniform", 4, 1.0)
    assert len(sigmas) == 5 and float(sigmas[-1]) == 0.0


def test_host_only_sampler_from_the_interop_node_is_the_hosts_object(host, monkeypatch):
    modules, adapter = host
    _add_host_names(modules, monkeypatch)
    (sampler,) = interop.SamplerSelect().get_sampler("standin_euler")
    assert type(sampler).__name__ == "KSAMPLER" and sampler.name == "standin_euler"


def test_unknown_names_are_errors_and_host_names_need_a_comfy_model(host, monkeypatch):
    modules, adapter = host
    _add_host_names(modules, monkeypatch)
    from analytic import analytic_model, conditioning
    from ksampler.nodes import KSampler
    from ksampler.validation import KSamplerInputError
    patcher = StandInModelPatcher(modules, "eps")
    with pytest.raises(KSamplerInputError, match="sampler_name: unknown"):
        KSampler().sample(patcher, 1, 4, 3.0, "no_such_sampler", "karras", _cond(1.0), _cond(-1.0),
                          {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(KSamplerInputError, match="scheduler: unknown"):
        adapter.common_ksampler(patcher, 1, 4, 3.0, "euler", "no_such_scheduler", _cond(1.0), _cond(-1.0),
                                {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(KSamplerInputError, match="runs only with a ComfyUI MODEL"):
        KSampler().sample(analytic_model(), 1, 4, 3.0, "standin_euler", "karras", conditioning(1.0),
                          conditioning(-1.0), {"samples": torch.zeros(1, 4, 8, 8)})


def test_headless_unknown_name_stays_an_error():
    """Outside ComfyUI there is no host to run a name we lack."""
    from analytic import analytic_model, conditioning
    from ksampler.nodes import KSampler
    from ksampler.validation import KSamplerInputError
    assert "comfy.samplers" not in sys.modules
    with pytest.raises(KSamplerInputError, match="unknown sampler 'standin_euler'"):
        KSampler().sample(analytic_model(), 1, 4, 3.0, "standin_euler", "karras", conditioning(1.0),
                          conditioning(-1.0), {"samples": torch.zeros(1, 4, 8, 8)})


# ---- nested latents (LTX-2 audio + video) through the host ----
def _nested_latent(modules, mask=False):
    nested = modules["comfy.nested_tensor"].NestedTensor
    video = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    audio = torch.randn(1, 4, 5, 16, generator=torch.Generator().manual_seed(1))
    latent = {"samples": nested((video, audio))}
    if mask:
        video_mask, audio_mask = torch.ones_like(video), torch.ones_like(audio)
        video_mask[:, :, 0] = 0.0
        audio_mask[:, :, :2] = 0.0
        latent["noise_mask"] = nested((video_mask, audio_mask))
    return latent, video, audio


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "euler_ancestral"])
def test_nested_latent_samples_stream_by_stream_with_masks(host, sampler):
    modules, adapter = host
    latent, video, audio = _nested_latent(modules, mask=True)
    out = adapter.common_ksampler(StandInModelPatcher(modules), 3, 5, 3.0, sampler, "karras", _cond(1.0),
                                  _cond(-1.0), latent)["samples"]
    assert getattr(out, "is_nested", False) and [t.shape for t in out.unbind()] == [video.shape, audio.shape]
    out_video, out_audio = out.unbind()
    assert torch.allclose(out_video[:, :, 0], video[:, :, 0], atol=1e-5)
    assert torch.allclose(out_audio[:, :, :2], audio[:, :, :2], atol=1e-5)
    assert not torch.allclose(out_video[:, :, 1], video[:, :, 1], atol=1e-2)
    assert torch.equal(latent["samples"].unbind()[0], video), "the input latent is not modified"


def test_nested_initial_noise_is_drawn_stream_after_stream_from_one_generator(host):
    """ComfyUI's prepare_noise: one generator seeded with the seed, the streams drawn in order."""
    modules, adapter = host
    latent, video, audio = _nested_latent(modules)
    seen = {}
    real_sample = modules["comfy.samplers"].sample

    def spy(model, noise, *args, **kwargs):
        seen["noise"] = [t.clone() for t in noise.unbind()]
        return real_sample(model, noise, *args, **kwargs)
    modules["comfy.samplers"].sample = spy
    adapter.common_ksampler(StandInModelPatcher(modules), 11, 2, 3.0, "euler", "karras", _cond(1.0), _cond(-1.0),
                            latent)
    gen = torch.Generator().manual_seed(11)
    assert torch.equal(seen["noise"][0], torch.randn(video.shape, generator=gen))
    assert torch.equal(seen["noise"][1], torch.randn(audio.shape, generator=gen))


def test_nested_latent_is_refused_headless_and_checked_stream_by_stream(host):
    modules, adapter = host
    from analytic import analytic_model, conditioning
    from ksampler.nodes import KSampler
    from ksampler.validation import KSamplerInputError
    latent, video, audio = _nested_latent(modules)
    with pytest.raises(KSamplerInputError, match="only inside ComfyUI"):
        KSampler().sample(analytic_model(), 1, 4, 3.0, "euler", "karras", conditioning(1.0), conditioning(-1.0),
                          latent)
    nested = modules["comfy.nested_tensor"].NestedTensor
    bad = {"samples": nested((video, audio.clone().fill_(float("nan"))))}
    with pytest.raises(KSamplerInputError, match=r"\['samples'\]\[1\]: contains NaN"):
        adapter.common_ksampler(StandInModelPatcher(modules), 1, 4, 3.0, "euler", "karras", _cond(1.0), _cond(-1.0),
                                bad)
    two = {"samples": nested((video, torch.zeros(2, 4, 5, 16)))}
    with pytest.raises(KSamplerInputError, match="different batch sizes"):
        adapter.common_ksampler(StandInModelPatcher(modules), 1, 4, 3.0, "euler", "karras", _cond(1.0), _cond(-1.0),
                                two)


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_cfgpp_ud10_ab_through_the_host_equals_the_core(host, cfg):
    """cfgpp_ud10_ab reads the unconditional estimate through the host's post-CFG hook; at cfg 1 it keeps the
    host's shortcut (no negative pass; the conditional estimate stands in), like the core."""
    modules, adapter = host
    from ksampler.pipeline import sample
    from analytic import GaussianCFGDenoiser
    patcher = StandInModelPatcher(modules, "eps")
    out = adapter.common_ksampler(patcher, 9, 8, cfg, "cfgpp_ud10_ab", "normal", _cond(1.0), _cond(-1.0),
                                  {"samples": torch.zeros(1, 4, 8, 8)})["samples"]
    model = GaussianCFGDenoiser(mu_c=1.0, mu_u=-1.0 if cfg != 1.0 else 1.0, s0=0.8, cfg=cfg)
    ms = patcher.model_sampling_object.ours
    model.model_sampling = ms
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ref = sample(model, ms, noise, torch.zeros_like(noise), sampling_sigmas(ms, "normal", 8), None,
                 "cfgpp_ud10_ab", 9)
    assert torch.allclose(out, ref, atol=1e-5)


def test_sampler_options_with_a_host_only_sampler_is_a_clear_error(host, monkeypatch):
    modules, _ = host
    _add_host_names(modules, monkeypatch)
    from ksampler.nodes import KSamplerAdvanced
    from ksampler.validation import KSamplerInputError
    patcher = StandInModelPatcher(modules, "eps")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(KSamplerInputError, match="sampler_options: 'standin_euler' runs as ComfyUI's own sampler"):
        KSamplerAdvanced().sample(patcher, "enable", 9, 4, 3.0, "standin_euler", "simple", _cond(1.0), _cond(-1.0),
                                  latent, 0, 10000, "disable", sampler_options={"eta": 0.5})
    assert modules["comfy.samplers"].STANDIN_CALLS.get("host_samplers", []) == []   # nothing ran


def test_variation_seed_on_a_nested_latent_is_a_clear_error(host):
    modules, adapter = host
    latent, _, _ = _nested_latent(modules)
    from ksampler.validation import KSamplerInputError
    with pytest.raises(KSamplerInputError, match="variation_strength: variation seeds are not supported for nested"):
        adapter.common_ksampler(StandInModelPatcher(modules), 3, 5, 3.0, "euler", "karras", _cond(1.0), _cond(-1.0),
                                latent, variation_seed=4, variation_strength=0.3)
    # strength 0 is no variation: the plain run
    plain = adapter.common_ksampler(StandInModelPatcher(modules), 3, 5, 3.0, "euler", "karras", _cond(1.0),
                                    _cond(-1.0), latent)["samples"]
    same = adapter.common_ksampler(StandInModelPatcher(modules), 3, 5, 3.0, "euler", "karras", _cond(1.0),
                                   _cond(-1.0), latent, variation_seed=4, variation_strength=0.0)["samples"]
    assert all(torch.equal(a, b) for a, b in zip(plain.unbind(), same.unbind()))


def test_calibration_fits_and_samples_through_the_host(host, comfy_calibration):
    """The Calibrated Scheduler's ComfyUI path: the fit runs inside the host's CFGGuider, its SAMPLER through
    the host's sample() (as SamplerCustom runs it), both with the adapter's guarded denoiser; a second call for
    the same inputs reuses the fit."""
    modules, adapter = host
    patcher = StandInModelPatcher(modules, "flow")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    messages = []
    cal = comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 3.0, fit_noises=4,
                                           iterations=2, teacher_steps=10, log=messages.append)
    assert cal.steps == 3 and torch.isfinite(cal.sigmas).all()
    again = comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 3.0, fit_noises=4,
                                             iterations=2, teacher_steps=10, log=messages.append)
    assert again is cal and any("reusing" in m for m in messages)
    # refined on a larger batch through the same host denoiser: its own cache entry, the refinement in its info
    refined = comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 3.0, fit_noises=4,
                                               iterations=2, teacher_steps=10, refine_noises=8, log=messages.append)
    assert refined is not cal and refined.info["refine_noises"] == 8 and any("refining on 8" in m for m in messages)
    with pytest.raises(ValueError, match="refine_noises"):
        comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 3.0, fit_noises=4,
                                         refine_noises=2)
    # two candidate fits through the host, each refined, the better kept
    best = comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 3.0, fit_noises=4,
                                            iterations=2, teacher_steps=10, refine_noises=8, fit_candidates=2,
                                            log=messages.append)
    assert best is not refined and best.info["candidates"] == 2 and len(best.info["candidate_rms"]) == 2
    assert any("2 fits from different fitting noise" in m for m in messages)
    with pytest.raises(ValueError, match="fit_candidates"):
        comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 3.0, fit_noises=4,
                                         fit_candidates=2)
    out = modules["comfy.samplers"].sample(patcher, torch.randn(1, 4, 8, 8), _cond(1.0), _cond(-1.0), 3.0, "cpu",
                                           adapter.CalibratedSampler(cal), cal.sigmas,
                                           latent_image=torch.zeros(1, 4, 8, 8), seed=3)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_a_calibration_fit_in_the_host_shows_progress_and_stops_when_asked(host, comfy_calibration):
    """Inside ComfyUI a fit can take minutes: the node's progress bar follows its iterations to the end, and a
    stop request (the host's interrupt) ends it mid-fit, caching nothing, so the next run fits anew."""
    modules, adapter = host
    patcher = StandInModelPatcher(modules, "eps")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    opts = {"fit_noises": 4, "iterations": 6, "teacher_steps": 10, "log": lambda m: None}
    bar = modules["comfy.utils"].STANDIN_PROGRESS
    bar.clear()
    comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 3.0, **opts)
    total = bar[-1][1]
    assert total >= 6 and bar == [(done, total) for done in range(1, total + 1)]
    clear_cache()
    checks = modules["comfy.samplers"].STANDIN_CALLS
    state = modules["comfy.model_management"].STANDIN_STATE
    state["interrupt_at"] = checks["interrupt_checks"] + 20  # mid-fit: the teacher alone checks 10 times
    try:
        with pytest.raises(StandInInterrupt):
            comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 4.0, **opts)
    finally:
        state["interrupt_at"] = None
    messages = []
    comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 4.0,
                                     **{**opts, "log": messages.append})
    assert any("fitting once" in m for m in messages)
    # one of our own models on the node inside the host: the same progress bar and stop request
    from analytic import analytic_model, conditioning
    from ksampler.calibration_nodes import CalibratedScheduler
    ours, node_opts = analytic_model(), {"fit_noises": 4, "iterations": 6, "teacher_steps": 10}
    bar.clear()
    CalibratedScheduler().calibrate(ours, conditioning(1.0), conditioning(-0.5), latent, 3, 3.0, **node_opts)
    assert bar and bar[-1][0] == bar[-1][1] >= 6 and [done for done, _ in bar] == list(range(1, len(bar) + 1))
    state["interrupt_at"] = checks["interrupt_checks"] + 3
    try:
        with pytest.raises(StandInInterrupt):
            CalibratedScheduler().calibrate(ours, conditioning(1.0), conditioning(-0.5), latent, 3, 4.0, **node_opts)
    finally:
        state["interrupt_at"] = None


class _HookGroup:
    """ComfyUI's hooks on a conditioning entry, as the fit sees them: weight hooks, each with its strength and
    keyframes, and the group's reset (what ComfyUI does to them when a sample starts)."""

    class WeightHook:
        hook_type = types.SimpleNamespace(value="weight")  # comfy.hooks.EnumHookType.Weight

        def __init__(self, *strengths):
            self.strength_model = 1.0
            self.hook_keyframe = types.SimpleNamespace(keyframes=[types.SimpleNamespace(strength=s)
                                                                  for s in strengths])

    def __init__(self, *hooks):
        self.hooks, self.resets = list(hooks), 0

    def reset(self):
        self.resets += 1


@pytest.mark.parametrize("case", ["keyframes", "positive only", "the same on both"])
def test_hooks_on_the_conditioning_are_followed_by_the_fit(host, comfy_calibration, case):
    """ComfyUI patches a weight hook's weights into the model in place, through ``.data``, where autograd does not
    see it: with keyframes of more than one strength, or weight hooks on only some entries, the weights change
    between the calls of one pass, a gradient would be silently wrong, and the fit uses SPSA and says why.  Hook
    keyframes step on as the sigmas fall and never back: they are reset, and the weights cached for them
    cleared, before each of the fit's passes, as ComfyUI does when a sample starts.  One unchanging hook on every
    entry leaves the gradient as it was."""
    modules, _ = host
    patcher = StandInModelPatcher(modules, "eps")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    hook = _HookGroup.WeightHook(*((1.0, 0.5, 0.0) if case == "keyframes" else (1.0,)))
    group = _HookGroup(hook)
    positive = [[torch.full((1, 4, 8), 1.0), {"hooks": group}]]
    negative = _cond(-1.0) if case == "positive only" else [[torch.full((1, 4, 8), -1.0), {"hooks": group}]]
    messages = []
    cal = comfy_calibration.calibrate_host(patcher, positive, negative, latent, 3, 3.0, fit_noises=4, iterations=3,
                                           teacher_steps=10, log=messages.append)
    said = any("hooks on the conditioning change the model's weights" in m for m in messages)
    if case == "the same on both":
        assert cal.info["gradient"] == "autograd" and not said and group.resets == 0
    else:
        assert cal.info["gradient"] == "spsa" and said
    if case == "keyframes":  # the teacher, the probe, each iteration's pair of passes: all from the first keyframe
        assert group.resets >= 2 + 2 * 3 and patcher.hook_weight_clears == group.resets
    else:
        assert group.resets == 0 and not hasattr(patcher, "hook_weight_clears")


@pytest.mark.parametrize("cache", ["easycache", "lazycache"])
def test_a_step_cache_on_the_model_is_left_out_of_the_fit(host, comfy_calibration, cache):
    """ComfyUI's EasyCache and LazyCache skip model calls by reusing earlier outputs, deciding from the calls
    before, which the fit's passes cannot go through (ComfyUI crashes inside them): the fit runs on a clone without
    them and says so, the model with the cache shares the calibration of the model without it, and the model
    handed in keeps its cache."""
    modules, _ = host
    plain = StandInModelPatcher(modules, "eps")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    opts = {"fit_noises": 4, "iterations": 2, "teacher_steps": 10}

    def skipping_wrapper(executor, *args, **kwargs):  # stands in for the cache's wrapper
        return executor(*args, **kwargs)
    cached = plain.clone()
    cached.model_options["transformer_options"]["easycache"] = object()
    cached.add_wrapper_with_key("outer_sample", cache, skipping_wrapper)
    messages = []
    cal = comfy_calibration.calibrate_host(cached, _cond(1.0), _cond(-1.0), latent, 3, 3.0, log=messages.append,
                                           **opts)
    assert any("reuses earlier outputs" in m and "the calibration is the model's without it" in m
                             for m in messages)
    assert comfy_calibration.calibrate_host(plain, _cond(1.0), _cond(-1.0), latent, 3, 3.0, **opts) is cal
    assert cached.wrappers["outer_sample"][cache] == [skipping_wrapper]
    assert "easycache" in cached.model_options["transformer_options"]
    assert comfy_calibration.without_step_caches(plain, messages.append) is plain


def _unet_with_controls(apply_control, middle: bool):
    """A UNet's skeleton as ComfyUI writes it: a block's output goes on to the next block (which saves it for the
    backward) and onto the skip stack; the middle block (if any) and the way back add the control's residuals
    with ``apply_control``."""
    torch.manual_seed(0)
    down, mid, up = torch.nn.Linear(3, 3), torch.nn.Sequential(*([torch.nn.Linear(3, 3)] if middle else [])), \
        torch.nn.Linear(6, 3)

    def forward(x, residuals):
        control = {"middle": [residuals[0]], "output": [residuals[1]]}
        h = torch.tanh(down(x))
        skips = [h]
        h = apply_control(mid(torch.tanh(h)), control, "middle")
        skip = apply_control(skips.pop(), control, "output")
        return up(torch.cat([h, skip], 1))
    return types.SimpleNamespace(diffusion_model=types.SimpleNamespace(middle_block=mid)), forward


def test_a_controls_residuals_are_added_out_of_place_while_a_fit_runs(host, comfy_calibration, monkeypatch):
    """ComfyUI's UNet adds a control's residuals into its hidden states in place, skip connections included that
    a later block saved for the backward: autograd refuses the gradient, so a ControlNet fit fell back to SPSA.
    While the fit runs the sums are made out of place: the same values, and a gradient; the host's function is
    put back after.  A UNet without a middle block hands a skip connection on as the middle's output, so the
    in-place sum lands in both; there nothing is swapped."""
    def host_apply_control(h, control, name):  # as ComfyUI's openaimodel.apply_control adds them
        residual = control[name].pop()
        h += residual
        return h
    unet_module = types.ModuleType("comfy.ldm.modules.diffusionmodules.openaimodel")
    unet_module.apply_control = host_apply_control
    monkeypatch.setitem(sys.modules, unet_module.__name__, unet_module)
    network, forward = _unet_with_controls(lambda *a: unet_module.apply_control(*a), middle=True)
    x, residuals = torch.randn(2, 3), [torch.randn(2, 3), torch.randn(2, 3)]
    with torch.no_grad():
        expected = forward(x, residuals)
    probe = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        forward(probe, residuals).sum().backward()
    with comfy_calibration.out_of_place_control(network) as swapped:
        assert swapped and unet_module.apply_control is not host_apply_control
        out = forward(probe, residuals)
        out.sum().backward()
        # as the host's in-place sum: a residual broadcast to h, in h's dtype; one that cannot be is left out
        h = torch.ones(2, 3, dtype=torch.float16)
        for residual in (torch.full((1, 3), 0.1), torch.ones(2, 4), torch.ones(3, 2, 3)):
            host_sum = h.clone()
            try:
                host_sum += residual
            except RuntimeError:
                host_sum = h
            ours = unet_module.apply_control(h, {"output": [residual]}, "output")
            assert torch.equal(ours, host_sum) and ours.dtype == h.dtype
    assert torch.equal(out.detach(), expected) and probe.grad is not None and torch.isfinite(probe.grad).all()
    assert unet_module.apply_control is host_apply_control
    without_middle, _ = _unet_with_controls(host_apply_control, middle=False)
    with comfy_calibration.out_of_place_control(without_middle) as swapped:
        assert not swapped and unet_module.apply_control is host_apply_control
    with comfy_calibration.out_of_place_control(types.SimpleNamespace()) as swapped:  # a DiT: no UNet blocks
        assert not swapped


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """[..., n, 2, 2] rotations by ``angles`` [..., n], the layout of ComfyUI's freqs_cis."""
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


@torch.library.custom_op("ksampler_tests::kitchen_rope1", mutates_args=())
def _kitchen_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Stands in for comfy_kitchen's apply_rope1: a custom op with no autograd formula (a rotation by complex
    product, as RoFormer writes it)."""
    turned = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous()) * \
        torch.complex(freqs_cis[..., 0, 0], freqs_cis[..., 1, 0])
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


@_kitchen_rope1.register_fake
def _(x, freqs_cis):
    return torch.empty_like(x)


def _kitchen_modules(monkeypatch) -> tuple:
    """Stand-ins for comfy_kitchen, ComfyUI's comfy.ldm.flux.math that binds its rotary ops, and a model module
    that imports one by name, put in sys.modules."""
    def kitchen_rope(xq, xk, freqs_cis):
        return _kitchen_rope1(xq, freqs_cis), _kitchen_rope1(xk, freqs_cis)
    kitchen = types.ModuleType("comfy_kitchen")
    kitchen.apply_rope1, kitchen.apply_rope = _kitchen_rope1, kitchen_rope
    flux_math = types.ModuleType("comfy.ldm.flux.math")  # as ComfyUI binds them
    flux_math.apply_rope1, flux_math.apply_rope = kitchen.apply_rope1, kitchen.apply_rope
    dit = types.ModuleType("comfy.ldm.wan.model")  # as a model imports it: from comfy.ldm.flux.math import ...
    dit.apply_rope1 = flux_math.apply_rope1
    for module in (kitchen, flux_math, dit):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return kitchen, flux_math, dit


def test_rotary_embedding_ops_without_a_gradient_are_swapped_while_a_fit_runs(host, comfy_calibration,
                                                                            monkeypatch):
    """ComfyUI's Flux and Wan import comfy_kitchen's rotary embedding ops by name; torch refuses a backward through
    them, so a fit fell back to SPSA.  While the fit runs, every loaded module holding one holds the same rotation
    in torch (the same values, and a gradient); comfy_kitchen itself is left alone, and the ops are put back after,
    also when the fit fails.  Without comfy_kitchen nothing is swapped."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=gen)
    freqs = _rotation_matrices(torch.rand(2, 1, 5, 4, generator=gen) * 6.3)
    by_complex = _kitchen_rope1(x, freqs)
    assert torch.allclose(comfy_calibration.rotate_pairs(x, freqs), by_complex, atol=1e-6)
    assert comfy_calibration.rotate_pairs(x.double(), freqs).dtype == torch.float64
    assert torch.allclose(comfy_calibration.rotate_pairs(x, freqs).norm(dim=-1), x.norm(dim=-1), atol=1e-5)

    kitchen, flux_math, dit = _kitchen_modules(monkeypatch)
    kitchen_rope = kitchen.apply_rope
    other = types.ModuleType("comfy.ldm.other")
    other.apply_rope1 = len  # a name alike, not the op: left alone
    monkeypatch.setitem(sys.modules, other.__name__, other)
    probe = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        dit.apply_rope1(probe, freqs).sum().backward()
    messages = []
    with comfy_calibration.differentiable_rotary(messages.append) as swapped:
        assert swapped and dit.apply_rope1 is not _kitchen_rope1 and flux_math.apply_rope1 is not _kitchen_rope1
        assert kitchen.apply_rope1 is _kitchen_rope1 and other.apply_rope1 is len
        assert not messages  # said where the model runs one, once
        out = dit.apply_rope1(probe, freqs)
        assert len(messages) == 1 and "comfy_kitchen" in messages[0] and "rotary" in messages[0]
        (out * by_complex).sum().backward()
        q, k = flux_math.apply_rope(x, 2 * x, freqs)
        assert torch.allclose(q, by_complex, atol=1e-6) and torch.allclose(k, 2 * by_complex, atol=1e-5)
        assert len(messages) == 1
    assert torch.allclose(out.detach(), by_complex, atol=1e-6)
    # the gradient of sum(R x . R x0) in x is R^T R x0 = x0 (a rotation is orthogonal)
    assert torch.allclose(probe.grad, x, atol=1e-5)
    assert dit.apply_rope1 is _kitchen_rope1 and flux_math.apply_rope is kitchen_rope
    with pytest.raises(ZeroDivisionError):
        with comfy_calibration.differentiable_rotary(messages.append):
            1 / 0
    assert dit.apply_rope1 is _kitchen_rope1
    monkeypatch.delitem(sys.modules, "comfy_kitchen")
    with comfy_calibration.differentiable_rotary(messages.append) as swapped:
        assert not swapped and dit.apply_rope1 is _kitchen_rope1


def test_a_host_model_with_a_rotary_op_without_a_gradient_is_fitted_by_autograd(host, comfy_calibration,
                                                                             monkeypatch):
    """A fit through a host model whose forward runs a rotary embedding op with no autograd formula (as
    ComfyUI's Wan and Flux with comfy_kitchen): autograd through the torch rotation that stands in while the fit
    runs, said so, the op put back after; the fit is the one the same model without the op gets.  Any other op
    torch cannot differentiate (here: the rotation left unswapped) makes the fit go on by SPSA, saying why."""
    modules, _ = host
    _, _, dit = _kitchen_modules(monkeypatch)
    turn = _rotation_matrices(torch.linspace(0.3, 2.9, 4).expand(1, 1, 1, 4))  # 4 pairs of the 8 columns
    back = turn.transpose(-1, -2)

    def through_the_op(apply_model, args):  # turned there and back: the same values, through the op twice
        out = apply_model(args["input"], args["timestep"], **args["c"])
        return dit.apply_rope1(dit.apply_rope1(out, turn), back)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    opts = dict(fit_noises=4, iterations=4, teacher_steps=10)

    def fit(with_op: bool, messages: list):
        clear_cache()
        patcher = StandInModelPatcher(modules, "flow")
        if with_op:
            patcher.model_options["model_function_wrapper"] = through_the_op
        return comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), latent, 3, 3.0,
                                                log=messages.append, **opts)
    messages = []
    cal = fit(True, messages)
    assert cal.info["gradient"] == "autograd" and any("comfy_kitchen" in m for m in messages)
    assert dit.apply_rope1 is _kitchen_rope1
    plain = fit(False, [])
    assert plain.info["gradient"] == "autograd" and torch.allclose(cal.sigmas, plain.sigmas, atol=1e-5)
    monkeypatch.setattr(comfy_calibration, "differentiable_rotary", lambda log: contextlib.nullcontext(False))
    messages.clear()
    spsa = fit(True, messages)
    assert spsa.info["gradient"] == "spsa" and spsa.info["backward_passes"] == 0
    assert any("no autograd formula" in m and "SPSA" in m for m in messages)


def test_a_host_fit_that_turns_to_spsa_puts_the_originals_back_before_going_on(host, comfy_calibration,
                                                                              monkeypatch):
    """What a fit in the host sets up for a gradient (the weight copies, the rotary stand-ins) is undone as soon
    as the fit turns to SPSA, which needs none of it, not when the fit ends: on a tight GPU the copies take room."""
    modules, _ = host
    events = []

    @contextlib.contextmanager
    def recorded_weights(modules_, log):
        events.append("copies made")
        try:
            yield
        finally:
            events.append("originals back")
    monkeypatch.setattr(comfy_calibration, "ordinary_weights", recorded_weights)

    def without_gradient(apply_model, args):  # a model whose output carries no gradient
        events.append("call")
        return apply_model(args["input"], args["timestep"], **args["c"]).detach()
    patcher = StandInModelPatcher(modules, "flow")
    patcher.model_options["model_function_wrapper"] = without_gradient
    messages = []
    cal = comfy_calibration.calibrate_host(patcher, _cond(1.0), _cond(-1.0), {"samples": torch.zeros(1, 4, 8, 8)},
                                           3, 3.0, fit_noises=4, iterations=4, teacher_steps=10,
                                           log=messages.append)
    assert cal.info["gradient"] == "spsa" and events.count("originals back") == 1
    back = events.index("originals back")
    assert events.index("copies made") < back and events[back + 1:].count("call") > 10  # the SPSA fit after


def test_the_networks_of_the_controls_on_the_conditioning_are_found(host, comfy_calibration):
    """A ControlNet's network and those of the controls chained before it (ControlNetApply on top of another)
    are the weights copied for the fit's gradient, each once."""
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    earlier = types.SimpleNamespace(control_model=first, previous_controlnet=None, strength=1.0)
    later = types.SimpleNamespace(control_model=second, previous_controlnet=earlier, strength=0.5)
    conds = {"positive": [{"control": later}], "negative": [{"control": later}, {}]}
    found = comfy_calibration._control_networks(conds)
    assert len(found) == 2 and found[0] is second and found[1] is first
    assert comfy_calibration._control_networks({"positive": [[torch.ones(1), {}]]}) == []


def test_weights_loaded_in_inference_mode_are_copied_for_the_fits_gradient(host, comfy_calibration, monkeypatch):
    """ComfyUI's executor loads checkpoints in inference mode, whose tensors autograd cannot save: while a fit
    runs, ordinary copies stand in for them (a gradient through the network works), and the originals are put
    back after, also when the fit fails; without the free memory for the copies nothing is swapped, and the log
    says so."""
    modules, _ = host
    with torch.inference_mode():
        network = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    originals = list(network.parameters()) + list(network.buffers())
    assert all(t.is_inference() for t in originals)
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        network.eval()(x).sum().backward()
    messages = []
    with comfy_calibration.ordinary_weights([network, "not a network"], messages.append):
        assert not any(t.is_inference() for t in list(network.parameters()) + list(network.buffers()))
        network.eval()(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert not any(p.requires_grad for p in network.parameters())
    assert all(a is b for a, b in zip(list(network.parameters()) + list(network.buffers()), originals))
    with pytest.raises(ValueError, match="boom"):
        with comfy_calibration.ordinary_weights([network], messages.append):
            raise ValueError("boom")
    assert all(a is b for a, b in zip(list(network.parameters()) + list(network.buffers()), originals))
    assert not messages
    modules["comfy.model_management"].STANDIN_STATE["free_memory"] = 16
    with comfy_calibration.ordinary_weights([network], messages.append):
        assert all(t.is_inference() for t in network.parameters())
    assert messages and "more than is free" in messages[0]
    # out of memory while copying after all: the copies made so far are dropped, the originals stay, it says so
    modules["comfy.model_management"].STANDIN_STATE["free_memory"] = 1 << 40
    messages.clear()
    real_clone, clones = torch.Tensor.clone, []

    def clone_then_fail(self, *args, **kwargs):
        clones.append(1)
        if len(clones) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_clone(self, *args, **kwargs)
    with monkeypatch.context() as patched:
        patched.setattr(torch.Tensor, "clone", clone_then_fail)
        with comfy_calibration.ordinary_weights([network], messages.append):
            assert all(a is b for a, b in zip(list(network.parameters()) + list(network.buffers()), originals))
    assert len(clones) == 2 and messages and "out of memory" in messages[0]


def test_interop_sampler_refuses_non_finite_sigmas_naming_them(host):
    """SamplerCustom hands our SAMPLER whatever SIGMAS are linked: NaN ones would hang a Brownian tree."""
    modules, adapter = host
    (sampler,) = interop.SamplerSelect().get_sampler("dpmpp_2m_sde")
    patcher = StandInModelPatcher(modules)
    for bad in (torch.tensor([14.6, float("nan"), 0.0]), torch.tensor([float("inf"), 1.0, 0.0])):
        with pytest.raises(KSamplerInputError, match="^sigmas: hold NaN or Inf"):
            modules["comfy.samplers"].sample(patcher, torch.randn(1, 4, 8, 8), _cond(1.0), _cond(-1.0), 3.0, "cpu",
                                             sampler, bad, latent_image=torch.zeros(1, 4, 8, 8), seed=3)


def test_interop_sampler_refuses_an_unknown_flow_geometry_naming_it(host):
    """Checked for our samplers only: a name only the host has runs the host's own object, without our options."""
    modules, adapter = host
    for bad in ("Exact", "", None, 1):
        with pytest.raises(KSamplerInputError, match="^flow_geometry: must be one of default, exact, comfyui"):
            interop.SamplerSelect().get_sampler("euler", flow_geometry=bad)
    (sampler,) = interop.SamplerSelect().get_sampler("euler", flow_geometry="comfyui")
    assert sampler.reference_mode is True
