"""Special functions the schedulers need, in plain Python floats (no scipy at import or run time)."""
from __future__ import annotations

import math

_TINY = 1e-300


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function, evaluated by the modified Lentz method."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution: Newton's method on I_x(a, b) = p, safeguarded by bisection."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if a == b:
        # Symmetric distribution: the median is exactly 1/2, and the upper half mirrors the lower one.
        if p == 0.5:
            return 0.5
        if p > 0.5:
            return 1.0 - beta_ppf(1.0 - p, a, b)
    log_norm = _log_beta(a, b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(200):
        f = betainc(a, b, x) - p
        if f == 0.0:
            return x
        if f > 0:
            hi = x
        else:
            lo = x
        density = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_norm)
        step = f / density if density > 0 else 0.0
        x_new = x - step
        if not lo < x_new < hi:
            x_new = 0.5 * (lo + hi)
        if abs(x_new - x) <= 1e-17 + 1e-15 * x:
            return x_new
        x = x_new
    return x
