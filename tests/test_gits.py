"""GITS (Chen et al. 2024, arXiv:2405.11326): the dynamic programme, the fitted schedule and the registry entry."""
import itertools
import math

import pytest
import torch

from analytic import GaussianDenoiser, exact_ode
from ksampler.models import EPS, VE, Flow
from ksampler.samplers import SAMPLERS
from ksampler.schedulers import SCHEDULERS, calculate_sigmas, sampling_sigmas
from ksampler.schedulers.gits import gits_cost_matrix, gits_schedule, optimal_path, reference_cost_matrix


def _path_cost(cost, path):
    return sum(float(cost[a, b]) for a, b in zip(path, path[1:]))


def test_dp_hand_made_matrix():
    # five points; the direct hop 0 -> 4 is dear, two cheap hops via 2 win with 2 steps, three via 1 and 3 with 3
    inf = 100.0
    cost = torch.full((5, 5), inf)
    cost[0, 4] = 10.0
    cost[0, 2], cost[2, 4] = 1.0, 2.0
    cost[0, 1], cost[1, 3], cost[3, 4] = 0.5, 0.5, 0.5
    cost[1, 2], cost[2, 3] = 5.0, 5.0
    assert optimal_path(cost, 1) == [0, 4]
    assert optimal_path(cost, 2) == [0, 2, 4]
    assert optimal_path(cost, 3) == [0, 1, 3, 4]
    assert optimal_path(cost, 4) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", range(5))
def test_dp_matches_brute_force(seed):
    n = 8
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for steps in range(1, n):
        best = min(_path_cost(cost, (0,) + inner + (n - 1,))
                   for inner in itertools.combinations(range(1, n - 1), steps - 1))
        path = optimal_path(cost, steps)
        assert path[0] == 0 and path[-1] == n - 1 and len(path) == steps + 1
        assert all(a < b for a, b in zip(path, path[1:]))
        assert math.isclose(_path_cost(cost, path), best, rel_tol=1e-12)


def test_dp_rejects_bad_step_counts():
    with pytest.raises(ValueError, match="steps"):
        optimal_path(torch.rand(4, 4), 4)
    with pytest.raises(ValueError, match="steps"):
        optimal_path(torch.rand(4, 4), 0)


def test_cost_matrix_zero_for_a_straight_trajectory():
    # delta data at mu: D = mu everywhere, the ODE is exactly linear in sigma and every DDIM step is exact
    ms = VE()
    cost, states = gits_cost_matrix(lambda x, s: torch.full_like(x, 0.3), ms, torch.randn(4, 6),
                                    torch.tensor([10.0, 3.0, 1.0, 0.1], dtype=torch.float64))
    assert states.shape == (4, 4, 6)
    assert float(cost.triu(1).abs().max()) < 1e-5


def _euler_error(ms, model, sigmas, noise):
    x = noise * float(sigmas[0])
    out = SAMPLERS["euler"](model, x, sigmas, disable=True)
    ref = exact_ode(x.double(), float(sigmas[0]), 0.0, model.mu, model.s0)
    return float((out.double() - ref).pow(2).mean().sqrt())


@pytest.mark.parametrize("steps", [4, 6, 10])
def test_fitted_schedule_beats_karras_at_equal_nfe(steps):
    ms = EPS()
    model = GaussianDenoiser(mu=0.5, s0=0.5, model_sampling=ms)
    fit_noise = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    eval_noise = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))  # not the noise it was fitted on
    calls = model.calls
    sigmas = gits_schedule(model, ms, fit_noise, steps, n_fine=60)
    assert model.calls - calls == 120  # two model calls per teacher interval
    assert len(sigmas) == steps + 1 and sigmas.dtype == torch.float32 and float(sigmas[-1]) == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert math.isclose(float(sigmas[0]), float(ms.sigma_max), rel_tol=1e-5)
    assert math.isclose(float(sigmas[-2]), float(ms.sigma_min), rel_tol=1e-5)
    karras = calculate_sigmas(ms, "karras", steps)
    assert _euler_error(ms, model, sigmas, eval_noise) < 0.85 * _euler_error(ms, model, karras, eval_noise)


def test_fitted_schedule_on_flow_model():
    ms = Flow(shift=3.0)
    model = GaussianDenoiser(mu=0.5, s0=0.5, flow=True, model_sampling=ms)
    sigmas = gits_schedule(model, ms, torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), 8, n_fine=40)
    assert len(sigmas) == 9 and float(sigmas[-1]) == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert float(sigmas[0]) <= 1.0 and float(sigmas[-2]) >= float(ms.sigma_min) * 0.9999


def test_registry_entry():
    assert "gits" in SCHEDULERS
    grid, cost = reference_cost_matrix()
    assert cost.shape == (len(grid), len(grid)) and bool(torch.isfinite(cost).all())
    assert all(a > b for a, b in zip(grid, grid[1:]))
    for ms in (EPS(), Flow(shift=3.0), EPS(zero_terminal_snr=True), VE()):
        for steps in (1, 10, 61, 500):
            sigmas = calculate_sigmas(ms, "gits", steps)
            assert len(sigmas) == steps + 1 and float(sigmas[-1]) == 0
            assert bool((sigmas[1:] < sigmas[:-1]).all())
            assert float(sigmas[0]) <= float(ms.sigma_max) * 1.0001
            assert float(sigmas[-2]) >= float(ms.sigma_min) * 0.9999
    # the denoise rule asks for long schedules; they stay valid and run exactly `steps` steps
    assert len(sampling_sigmas(EPS(), "gits", 20, denoise=0.05)) == 21
