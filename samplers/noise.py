"""Noise for sampling: the initial latent noise and the extra noise of ancestral and SDE samplers.

Every draw comes from an explicitly seeded ``torch.Generator``; the global RNG
is never touched.  A noise sampler is ``fn(sigma, sigma_next) -> Tensor``
shaped like the state, with unit variance.

* ``prepare_noise``: ComfyUI's initial noise (CPU, seeded with ``seed``, one
  draw of the batch or one draw per ``batch_index`` entry).
* ``default_noise_sampler``: ComfyUI's ancestral noise (a generator on the
  sampling device, seeded ``seed`` there and ``seed + 1`` on the CPU).
* ``BrownianTreeNoiseSampler``: ComfyUI's SDE noise, the increments of a
  ``torchsde`` Brownian tree (Kidger et al. 2021) seeded with ``seed``.
* ``BrownianPathNoiseSampler``: a fast Brownian motion with the same law,
  sampled lazily point by point with Brownian bridges (one Gaussian draw per
  new time point).

Options beyond ComfyUI: ``batch_invariant`` gives item *k* a stream that
depends only on the seed and *k*; ``device_invariant`` draws on the CPU.
"""
from __future__ import annotations

import bisect
import logging
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

NoiseSampler = Callable[[object, object], Tensor]

_U64 = 1 << 64
# Odd constant (2^64 / golden ratio) spacing the per-item streams far apart in seed space.
_ITEM_STRIDE = 0x9E3779B97F4A7C15
# Another odd constant for the per-stream generators of nested latents under batch-invariant noise.
_STREAM_STRIDE = 0xD1B54A32D192ED03

__all__ = ["prepare_noise", "initial_noise", "initial_noise_streams", "default_noise_sampler",
           "BrownianTreeNoiseSampler", "BrownianPathNoiseSampler", "item_seed", "NoiseSampler", "mix_variation",
           "variation_noise", "check_variation"]


def item_seed(seed: int, index: int) -> int:
    """Seed of batch item ``index``'s own stream (item 0 keeps ``seed``)."""
    return (int(seed) + int(index) * _ITEM_STRIDE) % _U64


def _generator(device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) % _U64)
    return gen


def prepare_noise(latent: Tensor, seed: int, batch_index: Optional[Sequence[int]] = None,
                  per_item: bool = False) -> Tensor:
    """Initial noise on the CPU in the latent's shape and dtype, from a generator seeded with ``seed``.

    With ``batch_index``, draws are made one item at a time ([1, ...] each) for
    draw numbers 0..max, and item *k* gets draw ``batch_index[k]``.  ``per_item``
    makes item-by-item draws the rule (batch-invariant noise).
    """
    return _draw_initial_noise(latent, _generator("cpu", seed), batch_index, per_item)


def _draw_initial_noise(latent: Tensor, gen: torch.Generator, batch_index: Optional[Sequence[int]],
                        per_item: bool) -> Tensor:
    shape = list(latent.shape)
    if batch_index is None and not per_item:
        return torch.randn(shape, dtype=latent.dtype, generator=gen, device="cpu")
    indices = list(range(shape[0])) if batch_index is None else [int(i) for i in batch_index]
    draws = {}
    for i in range(max(indices) + 1):
        draw = torch.randn([1] + shape[1:], dtype=latent.dtype, generator=gen, device="cpu")
        if i in indices:
            draws[i] = draw
    return torch.cat([draws[i] for i in indices], dim=0)


def initial_noise(latent: Tensor, seed: int, batch_index: Optional[Sequence[int]] = None, add_noise: bool = True,
                  per_item: bool = False) -> Tensor:
    """The KSampler's starting noise: ``prepare_noise``, or zeros when noise is not added (KSampler Advanced)."""
    if not add_noise:
        return torch.zeros(latent.shape, dtype=latent.dtype, device="cpu")
    return prepare_noise(latent, seed, batch_index, per_item)


def initial_noise_streams(latents: Sequence[Tensor], seed: int, batch_index: Optional[Sequence[int]] = None,
                          add_noise: bool = True, per_item: bool = False) -> list[Tensor]:
    """Initial noise of a nested latent (several streams, e.g. LTX-2's video + audio), one tensor per stream.

    As ComfyUI does, the streams are drawn one after another from one generator
    seeded with ``seed``, each as ``prepare_noise`` draws a single latent.  With
    ``per_item`` (batch-invariant noise) each stream after the first has its own
    generator, so that its items do not depend on how many the earlier streams drew.
    """
    if not add_noise:
        return [torch.zeros(t.shape, dtype=t.dtype, device="cpu") for t in latents]
    gen = _generator("cpu", seed)
    streams = []
    for j, latent in enumerate(latents):
        if per_item and j > 0:
            gen = _generator("cpu", (int(seed) + j * _STREAM_STRIDE) % _U64)
        streams.append(_draw_initial_noise(latent, gen, batch_index, per_item))
    return streams
def mix_variation(noise: Tensor, variation: Tensor, strength: float) -> Tensor:
    """Variance-preserving mix ``cos(a) noise + sin(a) variation``, ``a = strength * pi / 2`` (A1111's variation seeds).

    For independent unit-variance noises the mix has unit variance at every
    strength (a plain linear mix loses variance towards 0.5 and blurs the
    image).  Strength 0 returns ``noise`` and 1 returns ``variation``, bit for
    bit.
    """
    strength = float(strength)
    if not 0.0 <= strength <= 1.0 or math.isnan(strength):
        raise ValueError(f"variation_strength: must be between 0 and 1, got {strength}")
    if variation.shape != noise.shape:
        raise ValueError(f"variation noise: shape {tuple(variation.shape)} differs from noise {tuple(noise.shape)}")
    if strength == 0.0:
        return noise
    if strength == 1.0:
        return variation.to(dtype=noise.dtype, device=noise.device)
    angle = strength * math.pi / 2
    return noise * math.cos(angle) + variation.to(dtype=noise.dtype, device=noise.device) * math.sin(angle)


def check_variation(variation_seed, variation_strength) -> Optional[int]:
    """The validated variation seed (None when the strength is 0: no variation)."""
    from ..validation import MAX_SEED, KSamplerInputError, check_float, check_int
    strength = check_float("variation_strength", variation_strength, 0.0, 1.0)
    if variation_seed is None:
        if strength != 0.0:
            raise KSamplerInputError("variation_seed: a variation_strength above 0 needs a variation_seed")
        return None
    return check_int("variation_seed", variation_seed, 0, MAX_SEED) if strength != 0.0 else None


def variation_noise(noise: Tensor, latent: Tensor, variation_seed: Optional[int], strength: float,
                    batch_index: Optional[Sequence[int]] = None, per_item: bool = False) -> Tensor:
    """The initial noise with a variation seed mixed in (``noise`` itself when there is no variation).

    The variation seed's noise is drawn exactly as the main seed's (same batch
    rule), so strength 1 is the variation seed's own run.
    """
    if variation_seed is None or float(strength) == 0.0:
        return noise
    variation = prepare_noise(latent, int(variation_seed), batch_index, per_item)
    return mix_variation(noise, variation, strength)


def default_noise_sampler(x: Tensor, seed: Optional[int] = None, *, cpu: bool = False,
                          batch_invariant: bool = False, item_indices: Optional[Sequence[int]] = None) -> NoiseSampler:
    """Gaussian noise from a seeded generator, one draw per call (ComfyUI's ancestral noise).

    The generator lives on the sampling device and is seeded with ``seed``, or
    ``seed + 1`` on the CPU so that it does not replay the initial noise.
    ``cpu`` draws on the CPU whatever the device (device-invariant noise);
    ``batch_invariant`` gives each item its own generator.
    """
    seed = 0 if seed is None else int(seed)
    device = torch.device("cpu") if cpu else x.device
    if device.type == "cpu":
        seed += 1
    shape, dtype, target = list(x.shape), x.dtype, x.device

    if not batch_invariant:
        gen = _generator(device, seed)

        def sample(sigma=None, sigma_next=None) -> Tensor:
            return torch.randn(shape, dtype=dtype, device=device, generator=gen).to(target)
        return sample

    indices = list(range(shape[0])) if item_indices is None else [int(i) for i in item_indices]
    gens = [_generator(device, item_seed(seed, k)) for k in indices]
    item_shape = [1] + shape[1:]

    def sample_items(sigma=None, sigma_next=None) -> Tensor:
        return torch.cat([torch.randn(item_shape, dtype=dtype, device=device, generator=g) for g in gens]).to(target)
    return sample_items


def _sorted_pair(a: Tensor, b: Tensor):
    return (a, b, 1) if a < b else (b, a, -1)


class BrownianTreeNoiseSampler:
    """Normalised increments of ``torchsde.BrownianTree`` (Kidger et al. 2021), exactly as ComfyUI seeds and queries it.

    One tree per seed; ``seed`` may be a list with one seed per batch item.  The
    tree spans ``transform(sigma_min) .. transform(sigma_max)`` and a query
    returns ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``.  ``cpu`` builds it on the CPU.

    torchsde's tree recurses without bound when queried at times closer together
    than it can split (e.g. a few steps at denoise ~0.004, where ComfyUI fails with
    a RecursionError).  Then this sampler logs a warning and continues with a
    Brownian path of the same law and seeds (``BrownianPathNoiseSampler``).
    """

    reference_noise = True   # ComfyUI's noise: samplers may then also follow its arithmetic exactly

    def __init__(self, x: Tensor, sigma_min, sigma_max, seed=None, transform=lambda s: s, cpu: bool = True):
        import torchsde  # lazily: only SDE samplers need it

        self.transform = transform
        self.cpu = cpu
        self.dtype = x.dtype
        t0, t1 = transform(torch.as_tensor(sigma_min)), transform(torch.as_tensor(sigma_max))
        t0, t1, self.sign = _sorted_pair(t0, t1)
        w0 = torch.zeros_like(x)
        self.batched = isinstance(seed, (list, tuple))
        if self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"seed: a list of seeds needs one per batch item ({x.shape[0]}), got {len(seed)}")
            seeds = [int(s) for s in seed]
            w0 = w0[0]
        else:
            seeds = [0 if seed is None else int(seed)]
        if cpu:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s % _U64) for s in seeds]
        self._seeds, self._like, self._paths = seeds, w0, None

    def _path_fallback(self, sigma, sigma_next, device) -> Tensor:
        if self._paths is None:
            logging.getLogger("ksampler").warning(
                "Brownian tree (torchsde) cannot resolve noise levels %.6g and %.6g (too close together for its "
                "splitting); continuing with a Brownian path of the same law, seeded from the same seed", float(sigma),
                float(sigma_next))
            self._paths = [BrownianPathNoiseSampler(self._like, s, self.transform, self.cpu) for s in self._seeds]
        if self.batched:
            w = torch.stack([path(sigma, sigma_next) for path in self._paths])
        else:
            w = self._paths[0](sigma, sigma_next)
        return w.to(device=device, dtype=self.dtype)

    def __call__(self, sigma, sigma_next) -> Tensor:
        t0, t1 = self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))
        a, b, sign = _sorted_pair(t0, t1)
        device = a.device
        if self._paths is not None:
            return self._path_fallback(sigma, sigma_next, device)
        if self.cpu:
            a, b = a.detach().cpu().float(), b.detach().cpu().float()
        try:
            if self.batched:
                w = torch.stack([tree(a, b) for tree in self.trees])
            else:
                w = self.trees[0](a, b)
        except RecursionError:
            return self._path_fallback(sigma, sigma_next, device)
        # one pass, never in place (the tree may cache what it returns): a division by the signed root rounds
        # exactly as orienting first and dividing by the root does (the reference's order)
        return w.to(device=device, dtype=self.dtype) / (float((t1 - t0).abs().sqrt()) * (self.sign * sign))


class BrownianPathNoiseSampler:
    """A Brownian motion sampled lazily at the queried times (fast mode; same law as the tree).

    W is pinned to 0 at the first queried time.  A new time beyond the known
    ones extends the path with an independent Gaussian increment; a new time
    between two known ones is drawn from the Brownian bridge between them
    (Glasserman 2004, Sec. 3.1).  Either costs one Gaussian draw.  Queries
    return the same normalised increment ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``
    as the tree; when a query extends the path from its end, that increment is
    the fresh draw itself, and the new path value is only formed if a later
    query lands between known times.  Samplers that walk down a schedule thus
    pay one draw and no other full-tensor work per query.
    """

    def __init__(self, x: Tensor, seed: Optional[int] = None, transform=lambda s: s, cpu: bool = True,
                 batch_invariant: bool = False, item_indices: Optional[Sequence[int]] = None):
        self.transform = transform
        self.shape, self.dtype, self.target = list(x.shape), x.dtype, x.device
        self.device = torch.device("cpu") if cpu else x.device
        seed = 0 if seed is None else int(seed)
        if batch_invariant:
            indices = list(range(self.shape[0])) if item_indices is None else [int(i) for i in item_indices]
            self.gens = [_generator(self.device, item_seed(seed, k)) for k in indices]
        else:
            self.gens = [_generator(self.device, seed)]
        self.times: list[float] = []
        # per known time: a tensor, None (the pinned zero), or (parent time, draw, scale): W = W(parent) + scale * draw
        self.values: list = []

    def _randn(self) -> Tensor:
        if len(self.gens) == 1:
            return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=self.gens[0])
        item = [1] + self.shape[1:]
        return torch.cat([torch.randn(item, dtype=self.dtype, device=self.device, generator=g) for g in self.gens])

    def _insert(self, t: float, value) -> None:
        k = bisect.bisect_left(self.times, t)
        self.times.insert(k, t)
        self.values.insert(k, value)

    def _materialize(self, t: float) -> Tensor:
        """W(t) as a tensor, forming any unformed extensions on the way (iteratively)."""
        chain = []
        while True:
            k = self.times.index(t)
            value = self.values[k]
            if isinstance(value, Tensor):
                break
            if value is None:
                value = self.values[k] = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                break
            chain.append((k, value))
            t = value[0]
        for k, (_, draw, scale) in reversed(chain):
            value = self.values[k] = value.add(draw, alpha=scale)
        return value

    def _add_point(self, t: float) -> None:
        """Make t a known time: an (unformed) extension beyond the ends, or a Brownian-bridge draw between them."""
        times = self.times
        k = bisect.bisect_left(times, t)
        if k == 0 or k == len(times):
            end = times[0] if k == 0 else times[-1]
            self._insert(t, (end, self._randn(), math.sqrt(abs(t - end))))
            return
        t_lo, t_hi = times[k - 1], times[k]
        w_lo, w_hi = self._materialize(t_lo), self._materialize(t_hi)
        std = math.sqrt((t - t_lo) * (t_hi - t) / (t_hi - t_lo))
        self._insert(t, torch.lerp(w_lo, w_hi, (t - t_lo) / (t_hi - t_lo)).add_(self._randn(), alpha=std))

    def _lazy_terms(self, t0: float, t1: float):
        """[(draw, +-scale)] with W(t1) - W(t0) = sum(scale * draw) when one time extends the other, else None."""
        for start, end, sign in ((t0, t1, 1.0), (t1, t0, -1.0)):
            terms, t = [], end
            while True:
                value = self.values[self.times.index(t)]
                if not isinstance(value, tuple):
                    break
                parent, draw, scale = value
                terms.append((draw, sign * scale))
                if parent == start:
                    return terms
                t = parent
        return None

    def __call__(self, sigma, sigma_next) -> Tensor:
        t0, t1 = float(self.transform(torch.as_tensor(sigma))), float(self.transform(torch.as_tensor(sigma_next)))
        if t0 == t1:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.target)
        times = self.times
        if not times:
            self._insert(t0, None)
        if (t0 == times[0] and t1 < t0) or (t0 == times[-1] and t1 > t0):
            draw = self._randn()  # extending the path from an end: the normalised increment is the draw itself
            self._insert(t1, (t0, draw, math.sqrt(abs(t1 - t0))))
            return draw.to(self.target)
        for t in (t0, t1):
            if t not in times:
                self._add_point(t)
        norm = 1.0 / math.sqrt(abs(t1 - t0))
        terms = self._lazy_terms(t0, t1)
        if terms is not None:
            out = terms[0][0] * (terms[0][1] * norm)
            for draw, scale in terms[1:]:
                out = out.add(draw, alpha=scale * norm)
            return out.to(self.target)
        return ((self._materialize(t1) - self._materialize(t0)) * norm).to(self.target)
