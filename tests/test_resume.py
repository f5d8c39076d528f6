"""Nothing lost: kill a simulated federation's server mid-run, resume it, and finish with every round once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_simulation import write_site_data

ROOT = Path(__file__).resolve().parent.parent


def launch(overrides: str, sites=2):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "server.simulate", "--sites", str(sites), "--cpus-per-site", "1", "--run-config", overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def test_server_killed_mid_run_resumes_to_completion(tiny_model_dir, tmp_path):
    data = write_site_data(tmp_path / "sites.csv")
    runs = tmp_path / "runs"
    base = (
        f"dataset='{data}' text-column='text' label-column='product' model='{tiny_model_dir}' "
        f"num-server-rounds=4 runs-dir='{runs}' run-name='crash' batch-size=8 max-length=16 "
        "max-examples-per-site=0 target-epsilon=4.0 aggregation='fedadam'"
    )
    state = runs / "crash" / "state.json"
    proc = launch(base)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if state.exists() and json.loads(state.read_text())["last_round"] >= 1:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        else:
            raise AssertionError("round 1 never completed")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = json.loads(state.read_text())["last_round"]
    assert killed_at < 4 and not (runs / "crash" / "final").exists()

    again = launch(base)
    out, _ = again.communicate(timeout=300)
    assert again.returncode != 0 and "resume=true" in out  # never silently overwrites a run

    resumed = launch(base + " resume=true")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"starting at round {killed_at + 1}" in out
    assert f"FedAdam moments restored from round {killed_at}" in out  # the server optimizer resumes too
    rows = [json.loads(line) for line in (runs / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert (runs / "crash" / "final" / "adapter_model.safetensors").exists()
    assert all((runs / "crash" / f"round-{n}" / "server_optimizer.safetensors").exists() for n in range(1, 5))
    for site in ("site-0", "site-1"):
        ledger = json.loads((runs / "crash" / "sites" / site / "ledger.json").read_text())
        on_ledger = {r["round"] for r in ledger["rounds"]}
        trained = {row["round"] for row in rows for s in row["sites"] if s["site"] == site and s["status"] == "trained"}
        # Every round a site trained is on its ledger (a round cut short by the crash too), and the
        # re-run of that round counts against the same cap instead of resetting it.
        assert trained <= on_ledger and {1, killed_at} <= on_ledger
        assert ledger["epsilon"] <= 4.0


def test_resume_refuses_a_changed_configuration(tmp_path):
    from server.checkpoint import RunDir, RunDirError

    run = RunDir(tmp_path, "r")
    assert run.start(False, {"lora-r": 8, "resume": False, "num-server-rounds": 3}) == 0
    assert run.start(True, {"lora-r": 8, "resume": True, "num-server-rounds": 5}) == 0
    with pytest.raises(RunDirError, match="differs .* in: lora-r"):
        run.start(True, {"lora-r": 16, "resume": True, "num-server-rounds": 3})
    with pytest.raises(RunDirError, match="already holds a run"):
        run.start(False, {"lora-r": 8, "resume": False, "num-server-rounds": 3})
