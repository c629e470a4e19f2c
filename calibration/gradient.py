"""How a fit gets its gradient: autograd through the model, autograd recomputing each model call in the backward
pass (gradient checkpointing), or SPSA where the model gives none; and the way down that ladder when memory runs
out."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..validation import KSamplerInputError
from .solver import Denoiser


def _call_blocker(denoiser, x: Tensor, sigma: float) -> Optional[str]:
    """None where one model call's output carries a gradient to its input, else why not (no_grad, inference
    tensors, or no memory for what a backward pass needs)."""
    try:
        with torch.enable_grad():
            probe = x.detach().clone().requires_grad_(True)
            out = denoiser(probe, probe.new_full((probe.shape[0],), sigma))
            return None if out.requires_grad else "no_grad or inference tensors"
    except RuntimeError as exc:
        if "inference" in str(exc).lower():
            return "no_grad or inference tensors"
        if out_of_memory(exc):
            return f"{_NO_MEMORY} one call keeps: {_first_line(exc)}"
        raise


# how the fit may get its gradient: "auto" (autograd when the model gives one, recomputing each call in the
# backward pass where keeping them all runs out of memory, else SPSA), or one of the ways by name
GRADIENTS = ("auto", "autograd", "recompute", "spsa")
_NO_MEMORY = "no memory for what a backward pass through"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (CUDA's OutOfMemoryError, or the CPU allocator's)."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _gradient_blocker(loss_fn) -> Optional[str]:
    """None where a loss built through the model carries a gradient, else why not: no_grad or inference tensors,
    no memory to keep what a backward pass needs, or a backward pass that torch refuses.  A refused backward means
    an op in the model with no derivative (a custom op with no autograd formula, as comfy_kitchen's rotary embedding
    in ComfyUI's Flux and Wan), a forward that changes in place a tensor the backward needs (ComfyUI's control sums
    in a UNet without a middle block), or a backward past the memory.  A fit without the gradient (SPSA) runs the
    model without keeping anything for a backward pass, so it can go on."""
    try:
        with torch.enable_grad():
            loss = loss_fn()
    except RuntimeError as exc:
        if any(reason in str(exc).lower() for reason in ("inference", "does not require grad")):
            return "no_grad or inference tensors"
        if out_of_memory(exc):
            return f"{_NO_MEMORY} its calls keeps: {_first_line(exc)}"
        raise
    if not loss.requires_grad:
        return "no_grad or inference tensors"
    try:
        loss.backward()
    except RuntimeError as exc:  # NotImplementedError and torch.OutOfMemoryError among them
        return f"its backward pass fails: {_first_line(exc)}"
    return None


class RecomputedCallDiffers(RuntimeError):
    """A model call run again in the backward pass gave other values than in the forward pass (a model that keeps
    state from call to call, such as ComfyUI's hook keyframes): a gradient through it would be silently wrong."""


class _Recomputed(torch.autograd.Function):
    """One model call that keeps nothing for the backward pass but its inputs and output, and runs again there
    (gradient checkpointing, Chen et al. 2016): a fit through it keeps one call's activations at a time, not every
    step's.  The call must give the same values again (``RecomputedCallDiffers`` where it does not)."""

    @staticmethod
    def forward(ctx, x: Tensor, sigma: Tensor, call: Callable) -> Tensor:
        ctx.call = call
        with torch.no_grad():
            out = call(x, sigma)
        ctx.save_for_backward(x, sigma, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, sigma, first = ctx.saved_tensors
        first = first.detach()
        needs = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((x, sigma), needs)]
            out = ctx.call(*inputs)
            gap = float((out.detach() - first).abs().max()) if out.shape == first.shape else math.inf
            if not gap <= RECOMPUTE_TOLERANCE * float(first.float().square().mean().sqrt()) + 1e-12:
                raise RecomputedCallDiffers(f"the model gave other values when a call ran again (largest difference "
                                            f"{gap:.3g}): it keeps state from call to call")
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if wanted else ())
        return (*(next(grads) if need else None for need in needs), None)


# the largest difference, relative to the output's RMS, between a call and the same call run again (a GPU kernel
# may differ in its last bits; a model that keeps state from call to call differs far more)
RECOMPUTE_TOLERANCE = 1e-3


def recomputing(denoiser: Denoiser) -> Denoiser:
    def call(x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        return _Recomputed.apply(x, sigma, lambda x_, sigma_: denoiser(x_, sigma_, **kwargs))
    return call


def spsa_gradient(params: list, loss_fn: Callable[[], Tensor], it: int, gen: torch.Generator) -> bool:
    """Simultaneous-perturbation gradient estimate (Spall 1992) into ``p.grad``: two loss evaluations.
    False (and no gradient) where either evaluation is not finite."""
    c_k = 0.05 / (it + 1) ** 0.101
    signs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
    with torch.no_grad():
        for p, d in zip(params, signs):
            p.add_(c_k * d)
        plus = float(loss_fn())
        for p, d in zip(params, signs):
            p.sub_(2 * c_k * d)
        minus = float(loss_fn())
        for p, d in zip(params, signs):
            p.add_(c_k * d)
    if not (math.isfinite(plus) and math.isfinite(minus)):
        return False
    for p, d in zip(params, signs):
        p.grad = (plus - minus) / (2 * c_k) * d
    return True


class Gradient:
    """How the fit gets its gradient: "autograd" (through the model; ``recompute``: each model call run again in
    the backward pass instead of kept) or "spsa".  Where a pass through the model runs out of memory for the
    gradient mid-fit (a larger refining batch, say), autograd recomputes from then on, and where that runs out too,
    SPSA takes over for the rest of the fit."""

    def __init__(self, name: str, recompute: bool, say: Callable[[str], None],
                 on_spsa: Optional[Callable[[], None]] = None):
        self.name, self.recompute, self.say, self.on_spsa = name, recompute, say, on_spsa
        self.first = name  # the way the fit started
        if name == "spsa":
            self._to_spsa()

    def _to_spsa(self) -> None:
        self.name, self.recompute = "spsa", False
        if self.on_spsa is not None:
            self.on_spsa()
            self.on_spsa = None

    @property
    def ran_out(self) -> bool:
        """Whether the fit started with autograd and went on by SPSA."""
        return self.first != self.name

    def __str__(self) -> str:
        return self.name + (" (each model call run again in the backward pass)" if self.recompute else "")

    def ran_out_of_memory(self, exc: BaseException, batch: int) -> None:
        what = f"no memory for a backward pass through the model on {batch} noises ({_first_line(exc)})"
        if not self.recompute:
            self.say(f"calibration: {what}; running each model call again in the backward pass from now on")
            self.recompute = True
            return
        self.say(f"calibration: {what}; going on by SPSA (two evaluations per iteration, nothing kept for a "
                 "backward pass)")
        self._to_spsa()

    def cannot_recompute(self, exc: BaseException) -> None:
        self.say(f"calibration: {exc}; going on by SPSA (two evaluations per iteration)")
        self._to_spsa()


def gradient_mode(gradient: str, student, u: Tensor, form: tuple, delta, fit_idx, s_min: float,
                  say) -> tuple[str, bool]:
    """(the way the fit gets its gradient, whether each model call is run again in the backward pass)."""
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient: must be one of {', '.join(map(repr, GRADIENTS))}, got {gradient!r}")
    if gradient == "spsa":
        return gradient, False
    student.begin_solve()
    recompute = gradient == "recompute"
    blocker = _call_blocker(student.denoiser, student.x0, 4 * s_min)
    if blocker is None:  # one call gives a gradient: does a solve's worth of calls?
        blocker = _gradient_blocker(lambda: student.loss(u, form, delta, fit_idx, recompute))
        if blocker is not None and blocker.startswith(_NO_MEMORY) and not recompute:
            say(f"calibration: {blocker}; running each model call again in the backward pass instead of keeping "
                "it")
            recompute = True
            blocker = _gradient_blocker(lambda: student.loss(u, form, delta, fit_idx, recompute))
    if blocker is None:
        return "autograd", recompute
    if gradient != "auto":
        raise KSamplerInputError(f"gradient: {gradient!r} needs a gradient through the model, and this model gives "
                                 f"none ({blocker}); use gradient='auto' or 'spsa'")
    say(f"calibration: the model gives no gradient here ({blocker}); fitting with SPSA (two evaluations per "
        "iteration) instead of autograd")
    return "spsa", False
