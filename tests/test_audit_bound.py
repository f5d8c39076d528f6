import math
import time

import numpy as np
import pytest
from scipy import stats

from common.audit_bound import epsilon_lower_bound, max_epsilon_lower_bound, p_value

BETA = 0.05


def accuracy(epsilon):
    """e^ε / (1 + e^ε), written out rather than taken from the module."""
    return math.exp(epsilon) / (1 + math.exp(epsilon))


def theorem_3(epsilon, delta, m, r, v):
    """Steinke et al.'s Theorem 3 read literally: f(v) + 2mδ · max over i = 1..m of (f(v - i) - f(v)) / i."""
    def f(k):
        return stats.binom.sf(k - 1, r, accuracy(epsilon))  # P[Binomial >= k]
    i = np.arange(1, m + 1)
    worst = np.max((f(v - i) - f(v)) / i)
    return min(1.0, f(v) + 2 * m * delta * worst)


@pytest.mark.parametrize("r", [1, 7, 100, 1000])
@pytest.mark.parametrize("epsilon", [0.0, 0.3, 1.0, 4.0])
def test_without_delta_the_p_value_is_the_binomial_tail(r, epsilon):
    for v in range(0, r + 1, max(1, r // 20)):
        expected = stats.binom.sf(v - 1, r, accuracy(epsilon))
        assert p_value(epsilon, 0.0, 2 * r, r, v) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_small_cases_by_hand():
    # ε = 0, r = v = 10, δ = 0: every guess is a fair coin, all ten right has probability 2^-10.
    assert p_value(0.0, 0.0, 10, 10, 10) == pytest.approx(2**-10, rel=1e-12)
    # ε = 0, r = v = 2, m = 10, δ = 0.01: f(2) = 1/4; (f(1) - f(2)) / 1 = 1/2, (f(0) - f(2)) / 2 = 3/8, so
    # p = 1/4 + 2 · 10 · 0.01 · 1/2 = 0.35.
    assert p_value(0.0, 0.01, 10, 2, 2) == pytest.approx(0.35, rel=1e-12)
    # ε = ln 3, so q = 3/4: f(2) = 9/16, f(1) - f(2) = 6/16, (f(0) - f(2)) / 2 = 7/32; p = 9/16 + 0.2 · 3/8.
    assert p_value(math.log(3), 0.01, 10, 2, 2) == pytest.approx(0.6375, rel=1e-12)
    # No right guesses is certain under any claim.
    assert p_value(5.0, 1e-5, 10, 10, 0) == 1.0


def test_matches_theorem_3_read_literally():
    rng = np.random.default_rng(7)
    for _ in range(60):
        m = int(rng.integers(1, 400))
        r = int(rng.integers(0, m + 1))
        v = int(rng.integers(0, r + 1))
        epsilon = float(rng.uniform(0, 6))
        delta = float(10 ** rng.uniform(-7, -2))
        assert p_value(epsilon, delta, m, r, v) == pytest.approx(
            theorem_3(epsilon, delta, m, r, v), rel=1e-9, abs=1e-14
        )


def test_p_value_rises_with_epsilon_and_falls_with_v():
    for m, r, delta in [(1000, 100, 1e-5), (200, 200, 1e-5), (1000, 300, 1e-4), (50, 30, 1e-2)]:
        epsilons = np.linspace(0, 8, 81)
        for v in range(0, r + 1, max(1, r // 10)):
            ps = [p_value(e, delta, m, r, v) for e in epsilons]
            assert all(b >= a - 1e-15 for a, b in zip(ps, ps[1:]))
        for epsilon in (0.0, 1.0, 3.0):
            ps = [p_value(epsilon, delta, m, r, v) for v in range(r + 1)]
            assert all(b <= a + 1e-15 for a, b in zip(ps, ps[1:]))


@pytest.mark.parametrize("r", [1, 10, 100, 1000, 10_000])
def test_all_right_without_delta_has_a_closed_form(r):
    # p = q^r, so the largest ε with p <= β is the logit of β^(1/r), or none (0.0) when even 2^-r > β.
    q = BETA ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(max(0.0, math.log(q / (1 - q))), abs=1e-8)


def test_the_bound_is_the_largest_rejected_epsilon():
    for m, r, v, delta in [(1000, 100, 90, 1e-5), (500, 300, 250, 1e-6), (10_000, 2000, 1500, 1e-5)]:
        bound = epsilon_lower_bound(m, r, v, delta)
        assert p_value(bound, delta, m, r, v) <= BETA < p_value(bound + 1e-6, delta, m, r, v)


def test_reproduces_the_papers_examples():
    # Steinke et al. report ε >= 0.699 for m = r = 100, v = 75, δ = 1e-4 at 95%, and 0.673 with m = 1000
    # (abstaining on 900); and 2.675 for m = 100000, r = 1510, v = 1439, δ = 1e-5 among their experiments.
    assert epsilon_lower_bound(100, 100, 75, 1e-4) == pytest.approx(0.699, abs=1e-3)
    assert epsilon_lower_bound(1000, 100, 75, 1e-4) == pytest.approx(0.673, abs=1e-3)
    assert epsilon_lower_bound(100_000, 1510, 1439, 1e-5) == pytest.approx(2.675, abs=1e-3)


def test_a_hundred_right_guesses_cannot_prove_more_than_about_3_5():
    bound = epsilon_lower_bound(1000, 100, 100, 1e-5)
    print(f"m=1000, r=v=100, delta=1e-5, 95%: epsilon >= {bound:.6f}")
    assert bound == pytest.approx(3.465376, abs=1e-5)
    assert bound < math.log(BETA ** (1 / 100) / (1 - BETA ** (1 / 100))) < 3.5  # δ only lowers it
    assert max_epsilon_lower_bound(1000, 100, 1e-5) == bound


@pytest.mark.parametrize("r", [2, 10, 100, 1000, 10_000])
def test_random_guessing_proves_nothing(r):
    assert epsilon_lower_bound(r, r, r // 2, 1e-5) == 0.0
    assert epsilon_lower_bound(10 * r, r, r // 2, 0.0) == 0.0


def test_the_bound_grows_with_v_and_falls_with_delta_and_confidence():
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(100, 201, 5)]
    assert all(b >= a for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] == max_epsilon_lower_bound(1000, 200, 1e-5) > bounds[-2]
    assert epsilon_lower_bound(1000, 200, 180, 1e-3) < epsilon_lower_bound(1000, 200, 180, 1e-5) < (
        epsilon_lower_bound(1000, 200, 180, 0.0)
    )
    assert epsilon_lower_bound(1000, 200, 180, 1e-5, confidence=0.99) < epsilon_lower_bound(1000, 200, 180, 1e-5)


def test_ten_thousand_canaries_take_well_under_a_second():
    start = time.perf_counter()
    epsilon_lower_bound(10_000, 10_000, 9000, 1e-5)
    max_epsilon_lower_bound(10_000, 10_000, 1e-5)
    assert time.perf_counter() - start < 1.0  # 0.2 s measured on one shared core


@pytest.mark.parametrize(
    "m, r, v", [(10, 5, 6), (10, 11, 3), (0, 0, 0), (10, -1, 0), (10, 5, -1)]
)
def test_refuses_impossible_counts(m, r, v):
    with pytest.raises(ValueError):
        p_value(1.0, 1e-5, m, r, v)


def test_refuses_bad_parameters():
    with pytest.raises(TypeError):
        p_value(1.0, 1e-5, 10, 5.5, 3)
    for epsilon, delta in [(-0.1, 1e-5), (math.nan, 1e-5), (1.0, -1e-5), (1.0, 1.5), (1.0, math.nan)]:
        with pytest.raises(ValueError):
            p_value(epsilon, delta, 10, 5, 3)
    for confidence in (0.0, 1.0, 95):
        with pytest.raises(ValueError):
            epsilon_lower_bound(10, 5, 5, 1e-5, confidence)
