"""A site killed mid-round loses no privacy accounting, and its ledger is never half-written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from common import files
from common.model import weights_sha256
from common.ledger import Ledger
from tests.test_client import site, write_policy  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def run_round(overrides, policy, model_dir, server_round):
    args = json.dumps([overrides, str(policy), str(model_dir), server_round])
    return subprocess.Popen(
        [sys.executable, "-m", "tests.site_round", args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, start_new_session=True,
    )


def _trained_rounds(path):
    try:
        return [r["round"] for r in json.loads(path.read_text())["rounds"] if r["kind"] == "train"]
    except (OSError, ValueError):
        return []


def test_site_killed_mid_round_keeps_the_round_on_its_ledger_and_continues(site, tiny_model_dir):
    tmp_path, data, overrides = site
    # RDP: calibrating PRV for thousands of steps at ε=50 takes minutes, RDP well under a second.
    overrides = {**overrides, "local-epochs": 200, "lora-rounds": 2, "num-server-rounds": 2, "target-epsilon": 50.0,
                 "accountant": "rdp"}
    policy = write_policy(tmp_path, data, [weights_sha256(str(tiny_model_dir))], cap=50.0)
    ledger_path = tmp_path / "state" / "ledger.json"
    proc = run_round(overrides, policy, tiny_model_dir, 1)
    deadline = time.time() + 120
    while not _trained_rounds(ledger_path):
        assert proc.poll() is None and time.time() < deadline, "the site never recorded its round"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # training is under way: 200 epochs take far longer than this
    proc.wait()
    ledger = json.loads(ledger_path.read_text())
    assert [r["round"] for r in ledger["rounds"] if r["kind"] == "train"] == [1] and ledger["epsilon"] > 0

    restarted = run_round({**overrides, "local-epochs": 1}, policy, tiny_model_dir, 2)
    out, _ = restarted.communicate(timeout=120)
    assert json.loads(out.splitlines()[-1]) == {"declined": False}
    ledger = json.loads(ledger_path.read_text())
    assert [r["round"] for r in ledger["rounds"] if r["kind"] == "train"] == [1, 2]
    accountant = create_accountant(mechanism=ledger["accountant"])
    accountant.history = [tuple(e) for e in ledger["history"]]
    assert accountant.get_epsilon(delta=ledger["delta"]) == pytest.approx(ledger["epsilon"])
    assert sum(e[2] for e in ledger["history"]) > 200  # the killed round's steps still count


def test_a_crash_while_saving_leaves_the_previous_ledger_intact(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    with Ledger.locked(path, delta=1e-5) as ledger:
        ledger.record("run", 1, "train", (1.0, 0.1, 10))
    before = path.read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", crash)
    with pytest.raises(OSError), Ledger.locked(path, delta=1e-5) as ledger:
        ledger.record("run", 2, "train", (1.0, 0.1, 10))
    assert path.read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name not in ("ledger.json", "ledger.json.lock")]
