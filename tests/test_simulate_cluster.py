"""`privet simulate --ray-address`: sites on an existing Ray cluster, and the Flower entry point simulate relies on."""

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import flwr.simulation
import pytest
import ray
from flwr.simulation.run_simulation import _run_simulation

import server.simulate
from client.site import SIMULATION_ENV
from tests.model_fixtures import write_labelled_csv

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def overrides(tiny_model_dir, tmp_path, run_name="cluster"):
    return {"dataset": str(write_labelled_csv(tmp_path / "train.csv")), "text-column": "text",
            "label-column": "product", "model": str(tiny_model_dir), "num-server-rounds": 1,
            "runs-dir": str(tmp_path / "runs"), "run-name": run_name, "batch-size": 8, "max-length": 16,
            "max-examples-per-site": 0}


def test_public_run_simulation_still_cannot_pass_a_run_config():
    """Privet calls flwr's private _run_simulation because the public one cannot carry a run config.

    When this fails, flwr's public run_simulation has grown a way to pass one: switch server/simulate.py to it.
    """
    parameters = set(inspect.signature(flwr.simulation.run_simulation).parameters)
    assert parameters == {"server_app", "client_app", "num_supernodes", "backend_name", "backend_config",
                          "enable_tf_gpu_growth", "verbose_logging"}


def test_private_run_simulation_accepts_every_argument_privet_passes(monkeypatch, tiny_model_dir, tmp_path):
    calls = []
    monkeypatch.setattr(server.simulate, "_run_simulation", lambda **kwargs: calls.append(kwargs))
    server.simulate.simulate(2, overrides(tiny_model_dir, tmp_path), cpus_per_site=1)
    inspect.signature(_run_simulation).bind(**calls[0])  # raises TypeError if flwr dropped or renamed one
    assert calls[0]["server_app_context"].run_config["run-name"] == "cluster"  # the run config does travel


def test_two_sites_lower_min_sites_and_say_that_robustness_needs_three(monkeypatch, tiny_model_dir, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(server.simulate, "_run_simulation", lambda **kwargs: calls.append(kwargs))
    server.simulate.simulate(2, overrides(tiny_model_dir, tmp_path), cpus_per_site=1)
    assert calls[0]["server_app_context"].run_config["min-sites"] == 2
    out = capsys.readouterr().out
    assert "min-sites lowered to 2" in out and "honest majority of at least 3 sites" in out
    with pytest.raises(ValueError, match="min-sites=3 is more than the 2 simulated sites"):
        server.simulate.simulate(2, {**overrides(tiny_model_dir, tmp_path), "min-sites": 3}, cpus_per_site=1)


def test_without_an_address_simulate_starts_a_private_local_ray(monkeypatch, tiny_model_dir, tmp_path):
    """address="local": a cluster someone started with `ray start` on this machine is never joined by accident."""
    calls = []
    monkeypatch.setattr(server.simulate, "_run_simulation", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv(SIMULATION_ENV, "0")  # restored after the test
    server.simulate.simulate(2, overrides(tiny_model_dir, tmp_path), cpus_per_site=1)
    init_args = calls[0]["backend_config"]["init_args"]
    assert init_args["address"] == "local" and init_args["num_cpus"] >= 1
    assert os.environ[SIMULATION_ENV] == "1"  # inherited by the local workers


def test_attaching_gives_cluster_workers_the_site_mark_and_asks_for_no_resources(monkeypatch, tiny_model_dir,
                                                                                 tmp_path):
    init, calls = [], []
    monkeypatch.setattr(ray, "init", lambda **kwargs: init.append(kwargs))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 8.0}},
                                               {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
                                               {"Alive": True, "Resources": {}},  # a head that runs no tasks
                                               {"Alive": False, "Resources": {"CPU": 1.0}}])
    monkeypatch.setattr(server.simulate, "_run_simulation", lambda **kwargs: calls.append(kwargs))
    server.simulate.simulate(2, overrides(tiny_model_dir, tmp_path), ray_address="ray://head:10001")
    (kwargs,) = init
    assert kwargs["address"] == "ray://head:10001" and "num_cpus" not in kwargs and "num_gpus" not in kwargs
    env = kwargs["runtime_env"]["env_vars"]
    assert env[SIMULATION_ENV] == "1" and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    backend = calls[0]["backend_config"]
    assert "address" not in backend["init_args"] and "num_cpus" not in backend["init_args"]
    assert backend["client_resources"]["num_cpus"] == 4.0  # every live node with CPUs can run one site


def test_an_unreachable_cluster_is_a_one_line_error(monkeypatch, tiny_model_dir, tmp_path, capsys):
    def refuse(**kwargs):
        raise ConnectionError("could not connect")

    monkeypatch.setattr(ray, "init", refuse)
    from privet.cli import main

    assert main(["simulate", "--sites", "2", "--run-config", f"model='{tiny_model_dir}' runs-dir='{tmp_path}'",
                 "--ray-address", "10.255.255.1:6379"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot attach to the Ray cluster at --ray-address '10.255.255.1:6379'" in err


def private_network_namespace() -> list[str] | None:
    """`unshare` arguments for a private network and PID namespace, or None where this machine cannot make one.

    In it the Ray head can listen on loopback only (Ray swaps 127.0.0.1 for the host's address and listens on all
    interfaces otherwise), and everything the test starts dies with the namespace, whatever happens.
    """
    command = ["unshare", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc"]
    if not (shutil.which("unshare") and shutil.which("ip") and RAY.exists()):
        return None
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return command if probe.returncode == 0 else None


def test_two_sites_train_on_a_ray_cluster_started_with_ray_start(tiny_model_dir, tmp_path):
    namespace = private_network_namespace()
    if namespace is None:
        pytest.skip("needs unshare and ip (a private network namespace) so the Ray head listens on loopback only")
    config = overrides(tiny_model_dir, tmp_path)
    run_config = " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())
    # Ray puts Unix sockets under its temp dir: a short path keeps them under the 107-character limit.
    ray_tmp = tempfile.mkdtemp(prefix="privet-ray-", dir="/tmp")
    script = f"""
set -e
ip link set lo up
"{RAY}" start --head --port=6379 --num-cpus=2 --num-gpus=0 --include-dashboard=false --disable-usage-stats \\
    --temp-dir={ray_tmp} > "{tmp_path / 'ray-start.log'}" 2>&1
"{sys.executable}" -m privet simulate --sites 2 --ray-address 127.0.0.1:6379 --run-config '{run_config}'
"""
    # The workers `ray start` launches must get the site mark from Privet, not from this test's environment.
    env = {key: value for key, value in os.environ.items() if key not in (SIMULATION_ENV, "RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        result = subprocess.run([*namespace, "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=540)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "cluster" / "metrics.jsonl").read_text().splitlines()]
    assert [row["aggregated_sites"] for row in rows] == [2]
    assert {site["site"]: site["status"] for site in rows[0]["sites"]} == {"site-0": "trained", "site-1": "trained"}
    assert (tmp_path / "runs" / "cluster" / "final" / "adapter_model.safetensors").is_file()
