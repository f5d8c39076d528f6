import json
import math

import pytest
from opacus.accountants import create_accountant

from common.privacy import Ledger, PrivacyError, calibrate_noise, compute_epsilon, poisson_schedule

SIGMA, RATE, STEPS, DELTA = 1.1, 1 / 16, 16, 1e-5


def one_run(steps, accountant="prv"):
    acc = create_accountant(mechanism=accountant)
    acc.history = [(SIGMA, RATE, steps)]
    return acc.get_epsilon(delta=DELTA)


def test_epsilon_after_k_rounds_equals_one_accountant_run_over_all_steps(tmp_path):
    ledger = Ledger.open(tmp_path / "ledger.json", delta=DELTA)
    for server_round in range(1, 4):
        epsilon = ledger.record_round("run", server_round, (SIGMA, RATE, STEPS))
    assert epsilon == pytest.approx(one_run(3 * STEPS), rel=1e-9)
    assert epsilon > one_run(STEPS) * 1.2  # not the per-round ε


def test_ledger_survives_a_restart_and_keeps_accumulating(tmp_path):
    path = tmp_path / "ledger.json"
    first = Ledger.open(path, delta=DELTA)
    first.record_round("run", 1, (SIGMA, RATE, STEPS))
    first.record_round("run", 2, (SIGMA, RATE, STEPS))
    reopened = Ledger.open(path, delta=DELTA)
    assert reopened.epsilon == pytest.approx(one_run(2 * STEPS))
    assert reopened.record_round("run", 3, (SIGMA, RATE, STEPS)) == pytest.approx(one_run(3 * STEPS))


def test_ledger_file_lets_anyone_recompute_epsilon(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = Ledger.open(path, delta=DELTA)
    ledger.record_round("run", 1, (SIGMA, RATE, STEPS))
    ledger.record_round("run", 2, (2.0, RATE / 2, STEPS * 2))
    saved = json.loads(path.read_text())
    assert saved["accountant"] == "prv" and saved["delta"] == DELTA
    acc = create_accountant(mechanism=saved["accountant"])
    acc.history = [tuple(entry) for entry in saved["history"]]
    assert acc.get_epsilon(delta=saved["delta"]) == pytest.approx(saved["epsilon"])
    assert [entry[2] for entry in saved["history"]] == [STEPS, STEPS * 2]


def test_ledger_refuses_a_different_delta(tmp_path):
    path = tmp_path / "ledger.json"
    Ledger.open(path, delta=DELTA).record_round("run", 1, (SIGMA, RATE, STEPS))
    with pytest.raises(PrivacyError, match="δ"):
        Ledger.open(path, delta=1e-6)


def test_a_corrupt_ledger_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{half a ledger")
    with pytest.raises(PrivacyError, match="never delete it"):
        Ledger.open(path, delta=DELTA)


def test_non_private_round_makes_epsilon_infinite_and_is_saved_as_null(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = Ledger.open(path, delta=DELTA)
    assert math.isinf(ledger.record_round("run", 1, None))
    assert json.loads(path.read_text())["epsilon"] is None
    assert math.isinf(Ledger.open(path, delta=DELTA).epsilon_with((SIGMA, RATE, STEPS)))


def test_calibrated_noise_meets_the_target_over_the_planned_steps():
    sigma = calibrate_noise(3.0, DELTA, RATE, 5 * STEPS)
    spent, _ = compute_epsilon([(sigma, RATE, 5 * STEPS)], DELTA)
    assert 3.0 - 0.01 <= spent <= 3.0
    less_noise, _ = compute_epsilon([(sigma * 0.9, RATE, 5 * STEPS)], DELTA)
    assert less_noise > 3.0


def test_calibration_counts_what_the_ledger_already_spent():
    prior = [(SIGMA, RATE, 3 * STEPS)]
    sigma = calibrate_noise(8.0, DELTA, RATE, 3 * STEPS, prior=prior)
    total, _ = compute_epsilon([*prior, (sigma, RATE, 3 * STEPS)], DELTA)
    assert 8.0 - 0.01 <= total <= 8.0
    assert sigma > calibrate_noise(8.0, DELTA, RATE, 3 * STEPS)


def test_calibration_refuses_when_the_budget_is_already_spent():
    with pytest.raises(PrivacyError, match="already spent"):
        calibrate_noise(1.0, DELTA, RATE, STEPS, prior=[(0.5, RATE, 10 * STEPS)])


def test_poisson_schedule_matches_opacus_sampler():
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    for n, batch in [(900, 64), (6000, 64), (93 * 8, 8), (100, 100)]:
        rate, steps = poisson_schedule(n, batch)
        assert len(UniformWithReplacementSampler(num_samples=n, sample_rate=rate)) == steps
