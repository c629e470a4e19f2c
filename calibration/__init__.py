"""Model-calibrated sampling: a step schedule and multistep coefficients fitted to the model in hand.

The sampler (``sample_calibrated``) is a linear multistep exponential integrator
in data prediction, written in the VE frame (x / alpha, sigma / alpha, so it
serves eps, v and flow models alike)::

    x_{i+1} = (s_{i+1} / s_i) x_i + (1 - s_{i+1} / s_i) * sum_j c[i, j] D_{i-j}

with D_k the model's denoised estimate at step k and each row of c summing to
one (consistency: a constant D is integrated exactly).  c = [1] is DDIM; the
DPM-Solver++(2M) weights (Lu et al. 2022b) are ``[1 + 1/(2r), -1/(2r)]``.
A calibration may also have a corrector (UniPC's arrangement, Zhao et al. 2023):
the model call at step i + 1 also redoes step i with weights cc[i] over
[D_{i+1}, D_i, ...] before step i + 1 is taken, at no extra call.

``fit_calibration`` fits the schedule and c to one model and conditioning, in
the manner of LD3 (Tong et al. 2025, learned discretisation) and PAS / S4S
(Wang et al. 2024; Frankel et al. 2025, learned solver coefficients): a
teacher solves the probability-flow ODE finely from a few fitting noises; the
``steps`` log sigmas (a monotone softmax parametrisation between the model's
sigma_max and sigma_min) and corrections to Adams-Bashforth weights (and to
the corrector's) are then fitted by Adam, with autograd through the sampler and
the model, to minimise the RMS gap between the student's and the teacher's
final samples.  The gradient comes from three quarters of the fitting noises;
the iterate kept is the best on all of them (the fit never sees the evaluation
noise).  With a corrector, the two forms (with and without) race for a third of
the iterations and the better goes on.  The cost is ``teacher_steps`` model
calls plus ``steps`` forward and backward passes per iteration, all on the
fitting batch.

The fit also moves the sigma at which the model is called in the first and the last step (``shift``), their
states staying where they are.  The first step has no earlier estimate to blend, and the last runs down to
sigma = 0, an unbounded stretch in log sigma; over a step the exact solution blends the denoised estimates along
the path, and a call at another sigma stands for that blend better than one at the step's start.  For Gaussian
data one shifted call is exact.

A small fitting set seldom holds the rare noises on which a few-step sampler
errs most.  ``refine_noise``, a larger set, continues the fit from its result
on that set at a smaller step size (``REFINE``), keeping the iterate that is
best there (the unrefined one included); it costs a teacher solve and
``REFINE["iterations"]`` iterations on the larger batch.

The fit matches the ODE.  The sampler can also run it stochastically (``eta`` > 0, no refit): each step is then
the model sampling's ancestral step (as ``euler_ancestral``'s, eta 1 the DDPM posterior for VE models) with the
fitted blend as its denoised estimate, re-noised from the sampling seed.  It no longer follows the ODE, and
trades that for the fresh detail and prompt adherence of ancestral sampling at few steps.

A ``Calibration`` holds the sigmas, the coefficients (with the corrector's and the
shifts, where fitted) and what it was fitted on;
it saves to and loads from a small safetensors file (``save`` / ``load``).

The package, from the bottom up: ``solver`` (the sampler and the teacher), ``record`` (``Calibration``, its file
and checks), ``gradient`` (how a fit gets its gradient), ``fit`` (``fit_calibration``), ``keys`` (what a fit is
for, as cache keys), ``cache`` (fitting once: memory and files) and ``api`` (``calibrate``, and what the ComfyUI
glue shares with it).  Everything public is importable from here.
"""
from __future__ import annotations

from .api import (FIT_SALT, calibrate, candidate_fitting_noise, check_fit_batches, check_fit_request,
                  fit_settings, fitting_noise, run_sigmas)
from .cache import cached_calibration, check_calibration_path, clear_cache, default_log
from .fit import DEFAULT_FIT, MAX_CALIBRATION_STEPS, REFINE, SHIFTED_STEPS, fit_calibration
from .gradient import GRADIENTS, RECOMPUTE_TOLERANCE, RecomputedCallDiffers
from .keys import calibration_key, calibration_keys, conditioning_digest, model_fingerprint, model_token, \
    patcher_state_digest
from .record import (CALIBRATION_FORMAT, CALIBRATION_FORMATS, Calibration, check_model_sampling,
                     model_sampling_record)
from .solver import check_eta, multistep_coefficients, sample_calibrated, teacher_solve

__all__ = ["Calibration", "calibrate", "candidate_fitting_noise", "fit_calibration", "DEFAULT_FIT",
           "sample_calibrated", "teacher_solve", "multistep_coefficients", "cached_calibration", "calibration_key",
           "fitting_noise", "clear_cache", "CALIBRATION_FORMAT", "CALIBRATION_FORMATS", "REFINE", "check_eta",
           "fit_settings", "calibration_keys", "check_calibration_path", "model_fingerprint", "check_fit_request",
           "check_model_sampling", "model_sampling_record", "MAX_CALIBRATION_STEPS", "check_fit_batches",
           "FIT_SALT", "SHIFTED_STEPS", "GRADIENTS", "RECOMPUTE_TOLERANCE", "RecomputedCallDiffers", "default_log",
           "conditioning_digest", "model_token", "patcher_state_digest", "run_sigmas"]
