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
        [sys.executable, "-m", "privet", "simulate", "--sites", str(sites), "--cpus-per-site", "1", "--run-config", overrides],
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

    # The plan changes on resume (4 → 5 rounds): every site recalibrates what is left of its budget.
    resumed = launch(base.replace("num-server-rounds=4", "num-server-rounds=5") + " resume=true")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"starting at round {killed_at + 1}" in out
    assert f"FedAdam moments restored from round {killed_at}" in out  # the server optimizer resumes too
    rows = [json.loads(line) for line in (runs / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["aggregated_sites"] for row in rows] == [2] * 5
    assert (runs / "crash" / "final" / "adapter_model.safetensors").exists()
    assert all((runs / "crash" / f"round-{n}" / "server_optimizer.safetensors").exists() for n in range(1, 6))
    for site in ("site-0", "site-1"):
        ledger = json.loads((runs / "crash" / "sites" / site / "ledger.json").read_text())
        on_ledger = {r["round"] for r in ledger["rounds"] if r["kind"] == "train"}
        trained = {row["round"] for row in rows for s in row["sites"] if s["site"] == site and s["status"] == "trained"}
        # Every round a site trained is on its ledger (a round cut short by the crash too), and the
        # re-run of that round counts against the same cap instead of resetting it.
        assert trained <= on_ledger and {1, killed_at} <= on_ledger
        assert ledger["epsilon"] <= 4.0
        assert len({r["noise_multiplier"] for r in ledger["rounds"] if r["kind"] == "train"}) > 1


def test_resume_refuses_a_changed_configuration(tmp_path):
    from server.checkpoint import RunDir, RunDirError

    run = RunDir(tmp_path, "r")
    assert run.start(False, {"lora-r": 8, "resume": False, "num-server-rounds": 3}) == 0
    assert run.start(True, {"lora-r": 8, "resume": True, "num-server-rounds": 5}) == 0
    with pytest.raises(RunDirError, match="differs .* in: lora-r"):
        run.start(True, {"lora-r": 16, "resume": True, "num-server-rounds": 3})
    with pytest.raises(RunDirError, match="already holds run 'r' .*pass resume=true.*or delete"):
        run.start(False, {"lora-r": 8, "resume": False, "num-server-rounds": 3})


def test_a_run_started_without_a_name_resumes_under_its_generated_name(tmp_path):
    from server.checkpoint import RunDir

    # What earlier versions stored for an auto-named run: an empty run-name.
    legacy = RunDir(tmp_path, "run-20261201-101500")
    assert legacy.start(False, {"run-name": "", "lora-r": 8, "resume": False}) == 0
    assert legacy.start(True, {"run-name": "run-20261201-101500", "lora-r": 8, "resume": True}) == 0


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from server.checkpoint import RunDir, RunDirError, read_rows

    run = RunDir(tmp_path, "torn")
    run.start(False, {"run-name": "torn", "resume": False})
    run.append_metrics({"round": 1, "accuracy": 0.5})
    run.finish_round(1)
    with (run.path / "metrics.jsonl").open("a") as handle:
        handle.write('{"round": 2, "accur')  # the crash cut this line short
    assert [row["round"] for row in run.read_metrics()] == [1]
    assert "cut short" in caplog.text
    assert run.start(True, {"run-name": "torn", "resume": True}) == 1
    assert (run.path / "metrics.jsonl").read_text() == '{"round": 1, "accuracy": 0.5}\n'
    (run.path / "metrics.jsonl").write_text('{"round": 1\n{"round": 2}\n')
    with pytest.raises(RunDirError, match="line 1"):
        read_rows(run.path / "metrics.jsonl")

