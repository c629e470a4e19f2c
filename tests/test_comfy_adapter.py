"""The ComfyUI adapter, tested against the host protocol it documents, with stand-in objects (tests/comfy_standins.py).

There is no ComfyUI in CI; the real host is checked by ../shared/comfyui/parity.py and e2e.sh (README,
"Verifying against ComfyUI").
"""
import sys

import pytest
import torch

from comfy_standins import StandInInterrupt, StandInModelPatcher, install
from ksampler.samplers import SAMPLERS
from ksampler.schedulers import SCHEDULERS, sampling_sigmas


def _cond(value):
    return [[torch.full((1, 4, 8), value), {}]]


@pytest.fixture
def host(monkeypatch):
    modules, adapter = install(monkeypatch)
    return modules, adapter


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
    (sampler,) = adapter.SamplerSelect().get_sampler("dpmpp_2m_sde", batch_invariant_noise=True)
    assert isinstance(sampler, modules["comfy.samplers"].Sampler) and sampler.name == "dpmpp_2m_sde"
    assert sampler.noise_options.batch_invariant
    patcher = StandInModelPatcher(modules)
    (sigmas,) = adapter.Scheduler().get_sigmas(patcher, "karras", 10, 1.0)
    assert torch.equal(sigmas, sampling_sigmas(patcher.model_sampling_object, "karras", 10))
    (sigmas5,) = adapter.Scheduler().get_sigmas(patcher, "karras", 10, 1.0, karras_rho=5.0)
    assert not torch.allclose(sigmas, sigmas5)
    spec = adapter.SamplerSelect.INPUT_TYPES()["required"]["sampler_name"][0]
    assert spec == list(SAMPLERS)
    assert adapter.Scheduler.INPUT_TYPES()["required"]["scheduler"][0] == list(SCHEDULERS)
    from ksampler.nodes import NODE_TABLE
    interop = {k: row for k, row in NODE_TABLE.items() if row[0] == "comfy_adapter"}
    assert set(interop) == {"ksampler_SamplerSelect", "ksampler_Scheduler"}
    assert all(getattr(adapter, row[1]) for row in interop.values())
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
