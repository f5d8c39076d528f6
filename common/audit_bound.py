"""The statistics of one-run privacy auditing (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023, arXiv:2305.08846).

m canaries are each put in the training data with probability 1/2, independently. After training the auditor
guesses in or out for r of them and abstains on the rest; v guesses are right. An (ε, δ)-DP training can make
many right guesses only rarely, so a large v rejects the claim "(ε, δ)-DP", and the largest ε so rejected is an
empirical lower bound on the training's true ε.
"""

from __future__ import annotations

import operator

import numpy as np
from scipy import special, stats

# Width in ε at which the bisection stops: far below any ε worth reporting, and cheap (about 36 steps).
_TOLERANCE = 1e-9


def _counts(m: int, r: int, v: int) -> tuple[int, int, int]:
    """m, r and v as ints, refused unless 0 ≤ v ≤ r ≤ m and m ≥ 1."""
    m, r, v = (operator.index(x) for x in (m, r, v))  # a fractional count is a caller's bug, not a value
    if not (0 <= v <= r <= m and m >= 1):
        raise ValueError(f"need 0 <= v <= r <= m and m >= 1, got m={m}, r={r}, v={v}")
    return m, r, v


def p_value(epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """The paper's Theorem 3 bound on the probability that an (ε, δ)-DP training lets an auditor get at least v of
    r guesses right among m canaries; a bound so small that it underflows (below about 1e-300) reads 0.0."""
    m, r, v = _counts(m, r, v)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    # Theorem 3 (Appendix D's p_value_DP_audit computes it the same way): with q = e^ε / (1 + e^ε), the accuracy
    # of ε-DP randomised response, and f(k) = P[Binomial(r, q) >= k],
    #     P[v or more right] <= f(v) + 2mδ · max_{i >= 1} (f(v - i) - f(v)) / i.
    # For δ = 0 this is the stochastic domination of the right guesses by Binomial(r, q).
    q = special.expit(epsilon)
    tail = stats.binom.sf(v - 1, r, q)
    # f(v - i) - f(v) = P[v - i <= Binomial <= v - 1], for i = 1..v a running sum of the pmf downward from v - 1.
    # Summing these positive terms avoids the cancellation of subtracting two tails near 1. Past i = v,
    # f(v - i) = 1, so the ratio only falls and i = 1..v attains the maximum (none when v = 0: then f(v) = 1).
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    slope = np.max(below / np.arange(1, v + 1), initial=0.0)
    # Plain floats suffice: the terms are positive, and any p that underflows is far below every β worth testing.
    return float(min(1.0, tail + 2 * m * delta * slope))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε whose p-value is at most 1 - confidence: at that confidence, a training that got v of r guesses
    right among m canaries is not (ε, δ)-DP for any smaller ε; 0.0 when even ε = 0 cannot be rejected."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1 - confidence

    def rejected(epsilon: float) -> bool:
        return p_value(epsilon, delta, m, r, v) <= beta

    if not rejected(0.0):
        return 0.0
    # Bisection (Appendix D's get_eps_audit) keeping p <= β at lo, so the answer is always an ε the data reject,
    # which makes it sound whatever the p-value's shape. Each term of Theorem 3's maximum is
    # (1 - 2mδ/i) f(v) + (2mδ/i) f(v - i), a nonnegative mix of tails that grow with ε when 2mδ <= 1 (every
    # practical audit: δ well below 1/m), so the p-value then rises with ε and lo is the largest rejected ε.
    lo, hi = 0.0, 1.0
    while rejected(hi):  # ends by ε = 64 at the latest: there q rounds to 1 and f(v) = 1 (v >= 1 here)
        lo, hi = hi, 2 * hi
    while hi - lo > _TOLERANCE:
        middle = (lo + hi) / 2
        if rejected(middle):
            lo = middle
        else:
            hi = middle
    return lo


def max_epsilon_lower_bound(m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The most an audit with m canaries and r guesses can ever prove: the lower bound when all r guesses are right,
    since for 2mδ <= 1 every term of Theorem 3 falls as v grows, so the bound only rises with v."""
    return epsilon_lower_bound(m, r, r, delta, confidence)
