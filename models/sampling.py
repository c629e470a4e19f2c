"""Model sampling: one small object per prediction type (eps, v, x0, EDM, flow).

Each object knows how its model family relates the noise level ``sigma`` to the
model's timestep, how noise is mixed into a latent, how a raw network output
becomes a denoised estimate, and the half-log-SNR geometry that exponential and
ancestral samplers need.  Samplers reach model-family specifics only through
these methods (see ``get_model_sampling``).

Variance-exploding (VE) families (eps, v, x0, EDM) use ``x = x0 + sigma * n``
(Karras et al. 2022); flow families use ``x = (1 - sigma) * x0 + sigma * n``
(Lipman et al. 2023, Esser et al. 2024).  Both share the probability-flow ODE
``dx/dsigma = (x - D(x)) / sigma``, so ODE samplers are common to both; only the
noise geometry (``alpha``, half-log-SNR, ancestral re-noising) differs.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from ..validation import MAX_MAGNITUDE, KSamplerInputError, check_bool, check_int

Number = Union[float, Tensor]
MAX_TIMESTEPS = 100000   # training schedules have 1000 (Flux 10000) steps
MAX_RESOLUTION = 16384   # ComfyUI's largest image side


def _check_real(owner: str, name: str, value, low: float, high: float, low_open: bool = True) -> float:
    """A finite number in (low, high] (or [low, high]); the error names ``owner``'s argument ``name``."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.device.type != "meta":
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KSamplerInputError(f"{owner}: {name} must be a finite number, got {value!r}")
    if not (low < value if low_open else low <= value) or value > high:
        raise KSamplerInputError(f"{owner}: {name} must be {'>' if low_open else '>='} {low:g} and <= {high:g}, "
                                 f"got {value:g}")
    return float(value)


def _check_sigma_range(owner: str, sigma_min, sigma_max) -> None:
    _check_real(owner, "sigma_min", sigma_min, 0.0, MAX_MAGNITUDE)
    _check_real(owner, "sigma_max", sigma_max, 0.0, MAX_MAGNITUDE)
    if not sigma_min < sigma_max:
        raise KSamplerInputError(f"{owner}: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")

__all__ = [
    "ModelSampling", "EPS", "V", "X0", "EDM", "Flow", "FluxFlow", "VE",
    "get_model_sampling", "flux_shift_from_resolution", "discrete_sigmas", "ve_ancestral_split",
]


def _bcast(sigma: Number, like: Tensor) -> Union[float, Tensor]:
    """Reshape a scalar or per-item sigma so that it broadcasts against ``like``."""
    if isinstance(sigma, Tensor):
        if sigma.numel() == 1:
            return sigma.reshape(()).to(like.device, like.dtype)
        return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1)).to(like.device, like.dtype)
    return float(sigma)


def ve_ancestral_split(sigma: Number, sigma_next: Number, eta: float) -> tuple:
    """(sigma_down, sigma_up) of the VE ancestral step (k-diffusion's ``get_ancestral_step``; eta > 0).

    The step goes deterministically to sigma_down and then adds sigma_up of fresh noise, so that
    sigma_down^2 + sigma_up^2 = sigma_next^2; eta = 1 is DDPM's posterior.  Floats, 0-d or 1-d tensors.
    """
    up = eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    sigma_up = torch.minimum(sigma_next, up) if isinstance(sigma_next, Tensor) and isinstance(up, Tensor) \
        else min(sigma_next, up)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def discrete_sigmas(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
                    beta_schedule: str = "scaled_linear", zero_terminal_snr: bool = False) -> Tensor:
    """Training sigmas of a DDPM schedule (Ho et al. 2020), ascending, in float64.

    ``scaled_linear`` is SD's schedule (betas linear in sqrt); ``zero_terminal_snr``
    rescales it so that the last step has zero SNR (Lin et al. 2024, arXiv:2305.08891).
    """
    if beta_schedule in ("scaled_linear", "linear"):
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule: unknown schedule {beta_schedule!r}; use 'scaled_linear' or 'sqrt_linear'")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    if zero_terminal_snr:
        sigmas = _rescale_zero_terminal_snr(sigmas)
    return sigmas


def _rescale_zero_terminal_snr(sigmas: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so that the final step has SNR 0 (Lin et al. 2024, Alg. 1)."""
    sqrt_ab = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab ** 2
    # An exactly zero alpha_bar would make sigma infinite; keep the last one tiny but finite.
    alphas_bar[-1] = 4.8973451890853435e-08
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


class ModelSampling:
    """Base class: VE geometry (``x = x0 + sigma * n``) with eps prediction and a continuous log-sigma timestep."""

    prediction_type = "eps"
    is_flow = False
    sigma_data = 1.0

    def __init__(self, sigmas: Tensor):
        owner = type(self).__name__
        if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 2 or sigmas.device.type == "meta" \
                or not sigmas.is_floating_point():
            raise KSamplerInputError(f"{owner}: sigmas must be a 1-D float tensor of at least 2 training noise levels, "
                                     f"got {getattr(sigmas, 'shape', type(sigmas).__name__)}")
        if not bool(torch.isfinite(sigmas).all()) or not bool((sigmas > 0).all()) \
                or bool((sigmas[1:] < sigmas[:-1]).any()):
            raise KSamplerInputError(f"{owner}: sigmas must be finite, positive and ascending (the training noise "
                                     f"levels, lowest first), got values from {float(sigmas.min()):g} to "
                                     f"{float(sigmas.max()):g}; check the schedule's parameters")
        # the log is taken at the table's own precision (float64 for DDPM tables), then stored as float32
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    # ---- schedule ------------------------------------------------------------------
    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: Tensor) -> Tensor:
        """Model timestep for a noise level (continuous: 0.25 log sigma, as in EDM)."""
        return 0.25 * torch.as_tensor(sigma).log()

    def sigma(self, timestep: Tensor) -> Tensor:
        """Noise level for a model timestep."""
        return (torch.as_tensor(timestep) / 0.25).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the sampling process (0 = start, 1 = end); log-linear by default."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        lo, hi = math.log(float(self.sigma_min)), math.log(float(self.sigma_max))
        return math.exp((hi - lo) * (1.0 - percent) + lo)

    # ---- prediction ----------------------------------------------------------------
    def calculate_input(self, sigma: Number, x: Tensor) -> Tensor:
        """Scale the noisy latent to unit variance for the network: x / sqrt(sigma^2 + sigma_data^2)."""
        s = _bcast(sigma, x)
        return x / (s ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma: Number, model_output: Tensor, model_input: Tensor) -> Tensor:
        """Denoised estimate from an eps prediction: x - sigma * eps."""
        return model_input - model_output * _bcast(sigma, model_output)

    def noise_scaling(self, sigma: Number, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        """Starting point of sampling: latent + sigma * noise (sqrt(1 + sigma^2) at full denoise)."""
        s = _bcast(sigma, noise)
        scale = (1.0 + s ** 2) ** 0.5 if max_denoise else s
        return noise * scale + latent

    def inverse_noise_scaling(self, sigma: Number, latent: Tensor) -> Tensor:
        """Undo the scaling of the final state (identity for VE)."""
        return latent

    # ---- sampler geometry ------------------------------------------------------------
    def alpha(self, sigma: Number) -> Number:
        """Coefficient of the clean data in the noisy state (1 for VE)."""
        return 1.0

    def half_log_snr(self, sigma: Number) -> Number:
        """lambda = log(alpha / sigma)."""
        return -sigma.log() if isinstance(sigma, Tensor) else -math.log(sigma)

    def sigma_from_half_log_snr(self, lam: Number) -> Number:
        """Inverse of ``half_log_snr``."""
        return (-lam).exp() if isinstance(lam, Tensor) else math.exp(-lam)

    def to_ve(self, sigma: Number) -> Number:
        """The VE-equivalent noise level sigma / alpha = exp(-lambda) (the identity, up to rounding, for VE)."""
        lam = self.half_log_snr(sigma)
        return lam.neg().exp() if isinstance(lam, Tensor) else math.exp(-lam)

    def from_ve(self, sigma_ve: Number) -> Number:
        """The model's sigma for a VE-equivalent noise level (inverse of ``to_ve``)."""
        return self.sigma_from_half_log_snr(-sigma_ve.log() if isinstance(sigma_ve, Tensor) else -math.log(sigma_ve))

    def offset_first_sigma(self, sigmas: Tensor) -> Tensor:
        """Sigmas safe for half-log-SNR maths (only flow needs a change, at sigma = 1)."""
        return sigmas

    def midpoint_sigma(self, sigma: Number, sigma_to: Number, r: float = 0.5) -> Number:
        """The sigma a fraction ``r`` of the way from ``sigma`` to ``sigma_to`` in half-log-SNR.

        Floats or 0-d tensors; tensors are computed in their own precision with
        the reference implementation's operation order, so a float32 schedule
        gives bit-identical intermediate sigmas (a discrete model's timestep can
        flip on one ulp).
        """
        lam = self.half_log_snr(sigma)
        return self.sigma_from_half_log_snr(lam + r * (self.half_log_snr(sigma_to) - lam))

    def ancestral_step(self, sigma: Number, sigma_next: Number, eta: float = 1.0) -> tuple:
        """(sigma_down, sigma_up, x_scale): ODE-step to sigma_down, then x = x_scale * x + sigma_up * noise.

        VE form of Karras et al. (2022) / k-diffusion's ancestral step; floats or 0-d tensors.
        """
        if not eta:
            return sigma_next, 0.0, 1.0
        sigma_down, sigma_up = ve_ancestral_split(sigma, sigma_next, eta)
        return sigma_down, sigma_up, 1.0

    def ancestral_steps(self, sigmas: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """``ancestral_step`` for every step of a schedule at once (elementwise, same values as per step)."""
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        if not eta:
            return sigma_next.clone(), torch.zeros_like(sigma_next), torch.ones_like(sigma_next)
        sigma_down, sigma_up = ve_ancestral_split(sigma, sigma_next, eta)
        return sigma_down, sigma_up, torch.ones_like(sigma_next)

    def describe(self) -> str:
        return f"{type(self).__name__}(sigma_min={float(self.sigma_min):.4g}, sigma_max={float(self.sigma_max):.4g})"

    def __repr__(self) -> str:
        return self.describe()


class _Discrete(ModelSampling):
    """A discrete DDPM training schedule: timestep = index of the nearest training sigma."""

    def __init__(self, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", zero_terminal_snr: bool = False,
                 sigmas: Tensor | None = None):
        owner = type(self).__name__
        check_bool(f"{owner}: zero_terminal_snr", zero_terminal_snr)
        if sigmas is None:
            check_int(f"{owner}: timesteps", timesteps, 2, MAX_TIMESTEPS)
            _check_real(owner, "linear_start", linear_start, 0.0, 1.0)
            _check_real(owner, "linear_end", linear_end, 0.0, 1.0)
            if not linear_start <= linear_end < 1:
                raise KSamplerInputError(f"{owner}: need 0 < linear_start <= linear_end < 1 (betas), got "
                                         f"{linear_start}, {linear_end}")
            sigmas = discrete_sigmas(timesteps, linear_start, linear_end, beta_schedule, zero_terminal_snr)
        super().__init__(sigmas)
        self.zero_terminal_snr = zero_terminal_snr

    def timestep(self, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma)
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: Tensor) -> Tensor:
        timestep = torch.as_tensor(timestep)
        t = timestep.float().to(self.log_sigmas.device).clamp(0, len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


class EPS(_Discrete):
    """Epsilon prediction on SD's discrete schedule (Ho et al. 2020; SD1.x / SDXL)."""


class V(_Discrete):
    """v prediction on a discrete schedule (Salimans & Ho 2022; SD2.x-v)."""

    prediction_type = "v"

    def calculate_denoised(self, sigma, model_output, model_input):
        s, sd = _bcast(sigma, model_output), self.sigma_data
        return model_input * sd ** 2 / (s ** 2 + sd ** 2) - model_output * s * sd / (s ** 2 + sd ** 2) ** 0.5


class X0(_Discrete):
    """Direct data prediction on a discrete schedule."""

    prediction_type = "x0"

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_output


class EDM(ModelSampling):
    """EDM preconditioning on a continuous log-sigma schedule (Karras et al. 2022, Table 1)."""

    prediction_type = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 120.0, sigma_data: float = 1.0):
        _check_sigma_range("EDM", sigma_min, sigma_max)
        self.sigma_data = _check_real("EDM", "sigma_data", sigma_data, 0.0, MAX_MAGNITUDE)
        super().__init__(torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp())

    def calculate_denoised(self, sigma, model_output, model_input):
        s, sd = _bcast(sigma, model_output), self.sigma_data
        return model_input * sd ** 2 / (s ** 2 + sd ** 2) + model_output * s * sd / (s ** 2 + sd ** 2) ** 0.5


class VE(ModelSampling):
    """A plain VE denoiser ``D(x, sigma)`` with no network preconditioning (k-diffusion's convention)."""

    prediction_type = "x0"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        _check_sigma_range("VE", sigma_min, sigma_max)
        super().__init__(torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp())

    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_output


def _time_shift(shift: float, t: Number) -> Number:
    """SD3's timestep shift (Esser et al. 2024, eq. 23): shift * t / (1 + (shift - 1) * t)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class Flow(ModelSampling):
    """Rectified flow with velocity prediction and a constant timestep shift (SD3, Wan, ...)."""

    prediction_type = "flow"
    is_flow = True

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000):
        # ComfyUI's ModelSamplingSD3 / AuraFlow nodes allow a shift up to 100
        self.shift = _check_real(type(self).__name__, "shift", shift, 0.0, 1000.0)
        self.multiplier = _check_real(type(self).__name__, "multiplier", multiplier, 0.0, MAX_MAGNITUDE)
        check_int(f"{type(self).__name__}: timesteps", timesteps, 2, MAX_TIMESTEPS)
        super().__init__(self._table(timesteps))

    def _table(self, timesteps: int) -> Tensor:
        return self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * self.multiplier)

    def timestep(self, sigma):
        return torch.as_tensor(sigma) * self.multiplier

    def sigma(self, timestep):
        return _time_shift(self.shift, torch.as_tensor(timestep) / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return _time_shift(self.shift, 1.0 - percent)

    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, model_output, model_input):
        """Denoised estimate from a velocity v = noise - x0: x - sigma * v."""
        return model_input - model_output * _bcast(sigma, model_output)

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        s = _bcast(sigma, noise)
        return s * noise + (1.0 - s) * latent

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - _bcast(sigma, latent))

    def alpha(self, sigma):
        return 1.0 - sigma

    def half_log_snr(self, sigma):
        if isinstance(sigma, Tensor):
            return sigma.logit().neg()
        return math.log((1.0 - sigma) / sigma) if 0.0 < sigma < 1.0 else (-math.inf if sigma >= 1.0 else math.inf)

    def sigma_from_half_log_snr(self, lam):
        if isinstance(lam, Tensor):
            return lam.neg().sigmoid()
        return 1.0 / (1.0 + math.exp(lam)) if lam > -700 else 1.0

    def offset_first_sigma(self, sigmas: Tensor) -> Tensor:
        if len(sigmas) > 1 and sigmas[0] >= 1:
            sigmas = sigmas.clone()
            sigmas[0] = self.percent_to_sigma(1e-4)
        return sigmas

    def midpoint_sigma(self, sigma, sigma_to, r=0.5):
        if sigma >= 1.0:  # half-log-SNR is -inf at sigma = 1; step just inside it
            return 0.9999
        if isinstance(sigma, Tensor):
            lam, lam_to = ((1 - sigma) / sigma).log(), ((1 - sigma_to) / sigma_to).log()
            return (lam + r * (lam_to - lam)).exp().add(1) ** -1
        lam, lam_to = math.log((1 - sigma) / sigma), math.log((1 - sigma_to) / sigma_to)
        return 1.0 / (math.exp(lam + r * (lam_to - lam)) + 1)

    def ancestral_step(self, sigma, sigma_next, eta=1.0):
        """Flow ancestral step: shrink towards sigma_down, then rescale and re-noise to sigma_next's marginal."""
        if not eta:   # the plain ODE step (the formula below would leave a rounding residue as noise)
            return sigma_next, 0.0, 1.0
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
        sigma_up = max(sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2, 0.0) ** 0.5
        return sigma_down, sigma_up, alpha_next / alpha_down

    def ancestral_steps(self, sigmas, eta=1.0):
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        if not eta:
            return sigma_next.clone(), torch.zeros_like(sigma_next), torch.ones_like(sigma_next)
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
        sigma_up = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2).clamp(min=0) ** 0.5
        return sigma_down, sigma_up, alpha_next / alpha_down


class FluxFlow(Flow):
    """Rectified flow with Flux's exponential shift ``mu`` (Black Forest Labs 2024): sigma = e^mu / (e^mu + 1/t - 1)."""

    def __init__(self, shift: float = 1.15, timesteps: int = 10000):
        # mu: e^mu must stay finite in float32 (it overflows past 88); Flux's largest images give mu below 50
        self.shift = _check_real("FluxFlow", "shift (mu)", shift, -80.0, 80.0, low_open=False)
        check_int("FluxFlow: timesteps", timesteps, 2, MAX_TIMESTEPS)
        self.multiplier = 1.0
        ModelSampling.__init__(self, self._table(timesteps))

    def _table(self, timesteps: int) -> Tensor:
        return self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps)

    def timestep(self, sigma):
        return torch.as_tensor(sigma)

    def sigma(self, timestep):
        t = torch.as_tensor(timestep)
        e = math.exp(self.shift)
        return e / (e + (1 / t - 1))

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t, e = 1.0 - percent, math.exp(self.shift)
        return e / (e + (1 / t - 1))

    @classmethod
    def from_resolution(cls, width: int, height: int, base_shift: float = 0.5, max_shift: float = 1.15) -> "FluxFlow":
        """Flux's resolution-dependent shift: mu linear in the number of 2x2 latent patches."""
        return cls(shift=flux_shift_from_resolution(width, height, base_shift, max_shift))


def flux_shift_from_resolution(width: int, height: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for an image of ``width`` x ``height`` pixels: base_shift at 256 patches, max_shift at 4096."""
    for name, side in (("width", width), ("height", height)):  # ComfyUI's ModelSamplingFlux node's range
        check_int(f"flux shift: {name}", side, 16, MAX_RESOLUTION)
    for name, shift in (("base_shift", base_shift), ("max_shift", max_shift)):
        _check_real("flux shift", name, shift, 0.0, 100.0, low_open=False)
    slope = (max_shift - base_shift) / (4096 - 256)
    return (width * height / (8 * 8 * 2 * 2)) * slope + base_shift - slope * 256


_DEFAULT_VE = None


def get_model_sampling(model) -> ModelSampling:
    """The model-sampling object of a denoiser, or plain VE for a bare k-diffusion-style callable."""
    ms = getattr(model, "model_sampling", None)
    if ms is not None:
        return ms
    global _DEFAULT_VE
    if _DEFAULT_VE is None:
        _DEFAULT_VE = VE()
    return _DEFAULT_VE
