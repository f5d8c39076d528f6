"""The accountant, the calibration, the ledger (and its lock), secret generators and the Gaussian mechanism."""

import json
import math
import multiprocessing

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant

from common.ledger import Ledger
from common.privacy import (
    PrivacyError,
    calibrate_noise,
    canonical,
    compute_epsilon,
    gaussian_sum,
    poisson_schedule,
    secret_generator,
)

SIGMA, RATE, STEPS, DELTA = 1.1, 1 / 16, 16, 1e-5


def opacus_epsilon(history, accountant="prv"):
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return acc.get_epsilon(delta=DELTA)


def record_rounds(path, rounds, kind="train", run="run", entry=(SIGMA, RATE, STEPS)):
    with Ledger.locked(path, delta=DELTA) as ledger:
        for server_round in rounds:
            epsilon = ledger.record(run, server_round, kind, entry)
    return epsilon


def test_epsilon_after_k_rounds_equals_one_accountant_run_over_all_steps(tmp_path):
    epsilon = record_rounds(tmp_path / "ledger.json", range(1, 4))
    assert epsilon == pytest.approx(opacus_epsilon([(SIGMA, RATE, 3 * STEPS)]), rel=1e-9)
    assert epsilon > opacus_epsilon([(SIGMA, RATE, STEPS)]) * 1.2  # not the per-round ε


def test_ledger_survives_a_restart_and_keeps_accumulating(tmp_path):
    path = tmp_path / "ledger.json"
    record_rounds(path, [1, 2])
    assert Ledger.read(path, delta=DELTA).epsilon == pytest.approx(opacus_epsilon([(SIGMA, RATE, 2 * STEPS)]))
    assert record_rounds(path, [3]) == pytest.approx(opacus_epsilon([(SIGMA, RATE, 3 * STEPS)]))


def test_ledger_file_lets_anyone_recompute_epsilon_over_every_kind_of_release(tmp_path):
    path = tmp_path / "ledger.json"
    with Ledger.locked(path, delta=DELTA) as ledger:
        ledger.record("run", 1, "count", (20.0, 1.0, 1))
        ledger.record("run", 1, "train", (SIGMA, RATE, STEPS))
        ledger.record("run", 1, "evaluate", (5.0, 1.0, 1))
        ledger.record("run", 2, "train", (SIGMA, RATE, STEPS))
        ledger.record("run", 2, "evaluate", (5.0, 1.0, 1))
    saved = json.loads(path.read_text())
    assert saved["accountant"] == "prv" and saved["delta"] == DELTA
    assert [r["kind"] for r in saved["rounds"]] == ["count", "train", "evaluate", "train", "evaluate"]
    # Equal (σ, q) entries are folded wherever they occur: composition does not depend on order.
    assert sorted(map(tuple, saved["history"])) == sorted([(20.0, 1.0, 1), (SIGMA, RATE, 2 * STEPS), (5.0, 1.0, 2)])
    assert opacus_epsilon([tuple(e) for e in saved["history"]]) == pytest.approx(saved["epsilon"])
    unfolded = [(20.0, 1.0, 1), (SIGMA, RATE, STEPS), (5.0, 1.0, 1), (SIGMA, RATE, STEPS), (5.0, 1.0, 1)]
    assert opacus_epsilon(unfolded, "rdp") == pytest.approx(opacus_epsilon(canonical(unfolded), "rdp"))


def test_ledger_refuses_a_different_delta(tmp_path):
    path = tmp_path / "ledger.json"
    record_rounds(path, [1])
    with pytest.raises(PrivacyError, match="δ"):
        with Ledger.locked(path, delta=1e-6):
            pass


def test_a_corrupt_ledger_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{half a ledger")
    with pytest.raises(PrivacyError, match="never delete it"):
        with Ledger.locked(path, delta=DELTA):
            pass


def test_non_private_round_makes_epsilon_infinite_and_is_saved_as_null(tmp_path):
    path = tmp_path / "ledger.json"
    with Ledger.locked(path, delta=DELTA) as ledger:
        assert math.isinf(ledger.record("run", 1, "train", None))
    assert json.loads(path.read_text())["epsilon"] is None
    assert math.isinf(Ledger.read(path, delta=DELTA).epsilon_with((SIGMA, RATE, STEPS)))


def _record_many(path: str, run: str, count: int, ready) -> None:
    ready.wait()
    for server_round in range(1, count + 1):
        with Ledger.locked(path, delta=DELTA) as ledger:
            ledger.record(run, server_round, "train", (SIGMA, RATE, STEPS))


def test_two_processes_writing_one_ledger_lose_no_release(tmp_path):
    path = str(tmp_path / "ledger.json")
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    workers = [context.Process(target=_record_many, args=(path, run, 15, ready)) for run in ("a", "b")]
    for worker in workers:
        worker.start()
    ready.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert sorted((r["run"], r["round"]) for r in saved["rounds"]) == sorted(
        (run, i) for run in ("a", "b") for i in range(1, 16))
    assert saved["history"] == [[SIGMA, RATE, 30 * STEPS]]


def test_calibrated_noise_meets_the_target_over_the_planned_steps():
    sigma = calibrate_noise(3.0, DELTA, [(RATE, 5 * STEPS)])
    spent, _ = compute_epsilon([(sigma, RATE, 5 * STEPS)], DELTA)
    assert 3.0 - 0.01 <= spent <= 3.0
    less_noise, _ = compute_epsilon([(sigma * 0.9, RATE, 5 * STEPS)], DELTA)
    assert less_noise > 3.0


def test_calibration_counts_what_the_ledger_spent_and_the_evaluations_planned():
    prior = [(SIGMA, RATE, 3 * STEPS)]
    evaluations = [(5.0, 1.0, 3)]
    sigma = calibrate_noise(8.0, DELTA, [(RATE, 3 * STEPS)], prior=prior, also=evaluations)
    total, _ = compute_epsilon([*prior, *evaluations, (sigma, RATE, 3 * STEPS)], DELTA)
    assert 8.0 - 0.01 <= total <= 8.0
    assert sigma > calibrate_noise(8.0, DELTA, [(RATE, 3 * STEPS)], prior=prior) > calibrate_noise(8.0, DELTA, [(RATE, 3 * STEPS)])


def test_calibration_refuses_when_the_budget_is_already_spent():
    with pytest.raises(PrivacyError, match="already spent"):
        calibrate_noise(1.0, DELTA, [(RATE, STEPS)], prior=[(0.5, RATE, 10 * STEPS)])


def test_poisson_schedule_matches_opacus_sampler():
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    for n, batch in [(900, 64), (6000, 64), (93 * 8, 8), (100, 100), (49 * 128, 128)]:
        rate, steps = poisson_schedule(n, batch)
        assert len(UniformWithReplacementSampler(num_samples=n, sample_rate=rate)) == steps


def test_secret_generators_differ_and_ignore_the_global_seed():
    torch.manual_seed(42)
    first = torch.randn(1000, generator=secret_generator())
    torch.manual_seed(42)
    second = torch.randn(1000, generator=secret_generator())
    assert not torch.allclose(first, second)
    # Still a proper standard normal.
    assert abs(float(first.mean())) < 0.15 and abs(float(first.std()) - 1) < 0.1


def test_gaussian_sum_clips_each_row_and_adds_noise_of_the_stated_scale():
    rows = np.zeros((50, 2))
    rows[0] = [30.0, 40.0]  # norm 50: clipped to norm 2, i.e. [1.2, 1.6]
    rows[1:, 0] = 1.0
    draws = np.array([gaussian_sum(rows, bound=2.0, noise_multiplier=3.0) for _ in range(400)])
    assert draws.mean(axis=0) == pytest.approx([49 + 1.2, 1.6], abs=1.0)
    assert draws.std(axis=0) == pytest.approx([6.0, 6.0], rel=0.15)
