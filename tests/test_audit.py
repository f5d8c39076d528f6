"""The one-run privacy audit: it must see memorisation without DP, pass honest DP-SGD, and catch noise never added.

The canaries and coin flips are secret, so these runs cannot be seeded; each threshold sits 4-5 standard deviations
from what was measured (see each test), a failure chance well below 1e-4 per test. One configuration serves all
three: the tiny BERT without dropout, 600 records, fedavg LoRA r=16, 40 local epochs at learning rate 0.02,
batch 32, 200 canaries and 100 guesses; there v right guesses give the bound 71 → 0.52, 74 → 0.65, 81 → 1.01
(δ=1e-5, 95%).
"""

import argparse
import json
import shutil

import numpy as np
import opacus.optimizers.optimizer
import pytest
import torch

from client import audit
from client.site import site_terms
from common import privacy
from common.audit_bound import epsilon_lower_bound
from common.config import ConfigError, RunConfig
from common.ledger import Ledger
from common.model import weights_sha256
from common.train import TensorData
from tests.test_client import write_policy
from tests.test_simulation import LABELS, write_site_data

CANARIES, GUESSES = 200, 100


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model trains no faster on two threads, and the CI machine runs other tests beside these."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    return write_site_data(tmp_path_factory.mktemp("audit") / "records.csv", n=600)


def overrides(data, model_dir, **changes):
    """The cheapest configuration measured to memorise mislabelled canaries reliably (LoRA trains every round)."""
    return {
        "dataset": str(data), "text-column": "text", "label-column": "product", "labels": ",".join(LABELS),
        "model": str(model_dir), "max-examples-per-site": 0, "max-length": 16, "batch-size": 32,
        "num-server-rounds": 1, "lora-rounds": 10, "local-epochs": 40, "learning-rate": 0.02, "aggregation": "fedavg",
        "lora-r": 16, "lora-alpha": 32, "target-epsilon": 1.0, **changes,
    }


def simulated(config, tmp_path):
    return audit.audited_terms(config, None, 0, 1, tmp_path / "scratch")


def test_without_dp_the_audit_finds_memorisation(site_data, tiny_model_dir_no_dropout, tmp_path, capsys):
    # Two rounds of 20 epochs, so the audit's round loop runs as a federation's would. Measured (6 runs): v = 87-98
    # of 100, bound 1.39-2.72. Asserting 0.5 needs v >= 71, 5 standard deviations (4.4) below the mean (93.7).
    changes = {"dp": False, "num-server-rounds": 2, "local-epochs": 20}
    run_config = " ".join(f"{key}={json.dumps(value)}"
                          for key, value in overrides(site_data, tiny_model_dir_no_dropout, **changes).items())
    parser = argparse.ArgumentParser()
    audit.add_arguments(parser)
    args = parser.parse_args(["--site", "0", "--sites", "1", "--run-config", run_config, "--canaries", str(CANARIES),
                              "--guesses", str(GUESSES), "--out", str(tmp_path)])
    assert audit.run(args) == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["format"] == audit.AUDIT_FORMAT and report["verdict"] == "no DP claim"
    assert report["claimed_epsilon"] is None and report["training"]["dp"] is False
    assert report["canaries"] == CANARIES and report["guesses"] == GUESSES
    assert report["epsilon_lower_bound"] > 0.5
    assert report["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(CANARIES, GUESSES, report["right"], 1e-5))
    assert "verdict: no DP claim" in capsys.readouterr().out


def test_honest_dp_sgd_passes_and_the_real_ledger_is_untouched(site_data, tiny_model_dir_no_dropout, tmp_path):
    # A policy site whose ledger already holds a release: the audit calibrates against a copy, as a real run would.
    # Measured with this plan (σ ≈ 10, claim ≈ 0.6; 7 runs): v = 51-57 of 100, bound 0. A bound above the claim
    # needs v >= 74; with guesses near coin flips that is P[Binomial(100, 1/2) >= 74] ≈ 1e-6.
    config = RunConfig.from_mapping(overrides(site_data, tiny_model_dir_no_dropout))
    data = shutil.copy(site_data, tmp_path / site_data.name)  # the policy names its data relative to itself
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir_no_dropout))], cap=1.0, max_rounds=1)
    ledger_path = tmp_path / "state" / "ledger.json"
    Ledger(ledger_path, delta=1e-5, site="clinic-a").record("earlier", 1, "train", (5.0, 0.1, 10))
    before = ledger_path.read_bytes()
    terms = site_terms(config, {"policy": str(policy)}, tmp_path / "unused")
    result = audit.audit_site(config, terms, None, canaries=CANARIES, guesses=GUESSES)
    assert ledger_path.read_bytes() == before
    assert sorted(p.name for p in ledger_path.parent.iterdir()) == ["ledger.json"]  # no lock file, no copy
    assert result.site == "clinic-a" and result.verdict == "consistent"
    assert 0 < result.claimed_epsilon < result.ledger_epsilon <= 1.0 < result.epsilon_ceiling
    assert result.epsilon_lower_bound <= result.claimed_epsilon
    assert result.training["rounds"] == 1 and result.training["noise_multiplier"] > 1


def test_noise_that_is_never_added_is_caught(site_data, tiny_model_dir_no_dropout, tmp_path, monkeypatch):
    # The bug a ledger cannot see: Opacus' optimizer and its accountant still report σ, but no noise is added.
    # Measured (15 runs): v = 84-95 of 100, bound 1.19-2.17, claim 0.63. VIOLATION needs v >= 74, 4.6 standard
    # deviations (3.1) below the mean (88.3).
    monkeypatch.setattr(opacus.optimizers.optimizer, "_generate_noise",
                        lambda std, reference, generator=None, secure_mode=False: torch.zeros_like(reference))
    config = RunConfig.from_mapping(overrides(site_data, tiny_model_dir_no_dropout))
    terms, partition = simulated(config, tmp_path)
    result = audit.audit_site(config, terms, partition, canaries=CANARIES, guesses=GUESSES)
    assert result.training["noise_multiplier"] > 1  # what the ledger and Opacus both claim
    assert result.verdict == audit.VIOLATION
    assert result.epsilon_lower_bound > result.claimed_epsilon
    path = audit.write_audit(result, tmp_path)
    assert json.loads(path.read_text())["verdict"] == "VIOLATION"


def test_a_noise_multiplier_that_differs_from_the_ledger_is_refused(site_data, tiny_model_dir_no_dropout, tmp_path,
                                                                     monkeypatch):
    # The bug a ledger can see: Opacus reports the σ it really used, and the site's own check withholds the update.
    real = privacy.make_private
    monkeypatch.setattr(privacy, "make_private", lambda *a, **kw: real(*a, **{**kw, "noise_multiplier": 0.0}))
    config = RunConfig.from_mapping(overrides(site_data, tiny_model_dir_no_dropout, **{"local-epochs": 1}))
    terms, partition = simulated(config, tmp_path)
    with pytest.raises(privacy.PrivacyError, match="Opacus ran"):
        audit.audit_site(config, terms, partition, canaries=CANARIES, guesses=GUESSES)


def test_canaries_leave_the_training_data_with_every_label_wrong():
    rng = np.random.default_rng(0)
    data = TensorData(torch.arange(40).reshape(10, 4), torch.ones(10, 4, dtype=torch.long), torch.arange(10) % 3)
    rest, canaries = audit.split_canaries(data, 4, 3, rng)
    assert len(rest) == 6 and len(canaries) == 4
    assert not set(rest.input_ids[:, 0].tolist()) & set(canaries.input_ids[:, 0].tolist())
    originals = canaries.input_ids[:, 0] // 4 % 3
    assert (canaries.labels != originals).all()
    tags = torch.tensor([[-100, 0, 1, -100], [-100, 2, -100, -100]])
    tokens = TensorData(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), tags)
    _, wrong = audit.split_canaries(tokens, 2, 5, rng)
    order = [0, 1] if (wrong.labels[0] == -100).sum() == 2 else [1, 0]
    assert ((wrong.labels == -100) == (tags[order] == -100)).all()
    assert (wrong.labels[tags[order] != -100] != tags[order][tags[order] != -100]).all()


def test_guesses_take_the_extremes_only():
    losses = np.array([0.1, 5.0, 0.2, 3.0, 1.0, 1.1])
    included = np.array([True, False, False, False, True, True])
    # In: 0.1 (right), 0.2 (wrong); out: 5.0 (right), 3.0 (right); the middle two are abstentions.
    assert audit.count_right(losses, included, 4) == 3
    assert audit.count_right(losses, included, 2) == 2


def test_verdicts():
    assert audit.judge(2.0, 1.0, 3.5, 100)[0] == audit.VIOLATION
    assert audit.judge(0.3, 1.0, 3.5, 100)[0] == "consistent"
    assert audit.judge(0.3, 8.0, 3.5, 100)[0] == "inconclusive at this size"
    assert audit.judge(1.2, None, 3.5, 100)[0] == "no DP claim"
    assert "3.50" in audit.judge(0.3, 8.0, 3.5, 100)[1]


@pytest.mark.parametrize("canaries, guesses, confidence, message", [
    (1, 1, 0.95, "at least 2"), (100, 51, 0.95, "even number"), (100, 102, 0.95, "even number"),
    (100, 10, 1.0, "confidence"),
])
def test_bad_sizes_are_refused(canaries, guesses, confidence, message):
    with pytest.raises(audit.AuditError, match=message):
        audit.check_sizes(canaries, guesses, confidence)


def test_more_canaries_than_the_site_can_spare_are_refused(site_data, tiny_model_dir_no_dropout, tmp_path):
    config = RunConfig.from_mapping(overrides(site_data, tiny_model_dir_no_dropout))
    terms, partition = simulated(config, tmp_path)
    with pytest.raises(audit.AuditError, match="use at most"):
        audit.audit_site(config, terms, partition, canaries=600, guesses=100)


def test_the_run_config_comes_from_a_run_directory(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"last_round": 3, "config": {"num-server-rounds": 5, "dp": True}}))
    config = audit.load_config(tmp_path, "dp=false")
    assert config.num_server_rounds == 5 and config.dp is False
    with pytest.raises(audit.AuditError, match="no state.json"):
        audit.load_config(tmp_path / "missing", "")
    with pytest.raises(ConfigError, match="--run-config: cannot read dp=\\[: dp must be true or false"):
        audit.load_config(None, "dp=[")


def test_the_command_reports_bad_input_in_one_line(capsys):
    from privet.cli import main

    assert main(["audit", "--guesses", "7"]) == 2  # 1 is the VIOLATION verdict
    err = capsys.readouterr().err
    assert err.startswith("privet audit: error: guesses=7") and err.count("\n") == 1


def test_default_sizes_fit_a_small_site():
    """The demo's site 0 has 902 training records: the defaults leave it a batch and guess at most 100."""
    assert audit.default_sizes(902, 128, None, None) == (774, 100)
    assert audit.default_sizes(5000, 128, None, None) == (1000, 100)
    assert audit.default_sizes(60, 8, None, None) == (52, 52)
    assert audit.default_sizes(61, 8, None, None) == (53, 52)
    assert audit.default_sizes(902, 128, 200, None) == (200, 100)
