"""Run a whole federation with Flower's simulation engine (Ray), driven from this process: on a private Ray
instance on this machine, or on an existing Ray cluster (``--ray-address``).

This does what ``flwr run .`` does on a local simulation SuperLink, minus the background
SuperLink: the run config is this app's ``pyproject.toml`` defaults fused with the overrides,
and every simulated site gets ``partition-id``/``num-partitions`` as Flower gives them.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from common.offline import FLOWER_OFF  # before flwr: no telemetry, update check or code install

from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir, get_project_config
from flwr.common.constant import SUPERLINK_NODE_ID
# The private entry point: flwr's public run_simulation() has no run-config parameter (the ServerApp would see
# run_config={} and the ClientApps {}), so Privet passes its fused config through `run` and `server_app_context`.
# tests/test_simulate_cluster.py fails when the public function grows one, or this one drops a parameter used here.
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from common.config import SIMULATION_ENV, ConfigError, RunConfig, parse_overrides
from server.preflight import check_run
from server.robust import MIN_ROBUST_SITES

PROJECT_DIR = Path(__file__).resolve().parent.parent


class SimulateError(ValueError):
    """A `privet simulate` option the user can fix (--sites, --ray-address)."""


def simulate(
    num_sites: int,
    overrides: dict | None = None,
    *,
    app_dir: str | Path = PROJECT_DIR,
    cpus_per_site: float | None = None,
    verbose: bool = False,
    client_app: str | None = None,
    ray_address: str | None = None,
) -> None:
    """Simulate `num_sites` sites training together; raises if the ServerApp fails.

    The run config, the run directory, the model and the data are checked before Ray starts (server.preflight).

    `ray_address` (e.g. ``auto``, ``10.0.0.5:6379`` or ``ray://host:10001``) runs the sites on that existing Ray
    cluster instead of a private local one. `client_app` replaces the ClientApp named in pyproject.toml (tests use
    it to simulate failing sites).
    """
    if num_sites < 1:
        raise SimulateError(f"--sites {num_sites} must be at least 1")
    app_dir = Path(app_dir).resolve()
    overrides = dict(overrides or {})
    RunConfig.from_mapping(overrides)  # name a bad key or value before Ray starts
    if "min-sites" not in overrides and num_sites < RunConfig().min_sites:
        # Printed, not only logged: the run goes on below the default on the user's behalf (stderr is for errors).
        print(f"privet simulate: min-sites lowered to {num_sites} for {num_sites} site(s); robustness against a "
              f"rogue site needs an honest majority of at least {MIN_ROBUST_SITES} sites", flush=True)
        overrides["min-sites"] = num_sites
    run_config = get_fused_config_from_dir(app_dir, overrides)
    config = RunConfig.from_mapping(run_config)
    if config.min_sites > num_sites:
        raise ConfigError(f"min-sites={config.min_sites} is more than the {num_sites} simulated sites")
    check_run(config)
    components = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
    run = replace(
        Run.create_empty(run_id=1),
        override_config=overrides,
        federation_id=NOOP_FEDERATION_ID,
        primary_task_id=1,
    )
    # The same task identity Flower's own run_simulation() sets up for an in-process run.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    # Marks the simulated sites: a SuperNode without a site policy refuses to work unless this is set. Ray's
    # workers inherit the environment of the local Ray instance this process starts; a cluster's workers get it
    # through the runtime environment (attach_ray).
    os.environ[SIMULATION_ENV] = "1"
    if ray_address:
        smallest_node = attach_ray(ray_address)
        # One site per node by default, each with all of its node's cores (as locally: one site, every core).
        cpus = cpus_per_site if cpus_per_site is not None else smallest_node
        # Flower's own ray.init is skipped now that Ray is initialised, so these only set what its defaults would.
        init_args = {"logging_level": "error"}
    else:
        # One site at a time gets every core: on a small machine that beats several sites sharing them.
        cpus = cpus_per_site if cpus_per_site is not None else float(os.cpu_count() or 1)
        # address="local": a private Ray instance, even when `ray start` left a cluster running on this machine.
        init_args = {"address": "local", "num_cpus": max(cpus, float(os.cpu_count() or 1)), "logging_level": "error"}
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    try:
        _run_simulation(
            server_app_attr=components["serverapp"],
            client_app_attr=client_app or components["clientapp"],
            num_supernodes=num_sites,
            backend_name="ray",
            backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}, "init_args": init_args},
            app_dir=str(app_dir),
            run=run,
            server_app_context=context,
            is_app=True,
            verbose_logging=verbose,
            exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        )
    finally:
        import ray

        if ray.is_initialized():  # Flower shuts Ray down after a run; not when it failed before starting one
            ray.shutdown()


def attach_ray(address: str) -> float:
    """Connect this process to the Ray cluster at `address`; return the CPU count of its smallest node with CPUs.

    Flower would pass its own runtime environment to ``ray.init``, so Privet initialises Ray itself: the
    cluster's workers (started by `ray start`, not by this process) need the simulated-site mark, Flower's
    offline switches and this process's import path in their environment.
    """
    import ray

    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    env_vars = {**FLOWER_OFF, SIMULATION_ENV: "1", "PYTHONPATH": pythonpath}
    try:
        # No num_cpus/num_gpus: the cluster's nodes declare their own resources, and Ray refuses them here.
        ray.init(address=address, runtime_env={"env_vars": env_vars}, logging_level="error")
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SimulateError(
            f"cannot attach to the Ray cluster at --ray-address {address!r} ({err}); start one with "
            "`ray start --head` or correct the address"
        ) from None
    cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    cpus = [count for count in cpus if count > 0]
    if not cpus:
        ray.shutdown()
        raise SimulateError(f"the Ray cluster at {address!r} has no node with CPUs to run a site on")
    return float(min(cpus))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``privet simulate`` (also ``python -m privet simulate``)."""
    parser.add_argument("--sites", type=int, default=4, help="number of simulated sites (default 4)")
    parser.add_argument(
        "--run-config",
        default="",
        help="overrides in Flower's format, e.g. \"num-server-rounds=5 run-name='trial' dp=true\"",
    )
    parser.add_argument("--cpus-per-site", type=float, default=None,
                        help="CPU cores per site (default: all of this machine's; with --ray-address, all of the "
                        "smallest node's)")
    parser.add_argument(
        "--ray-address", default=None, metavar="ADDRESS",
        help="run the sites on an existing Ray cluster: 'auto' (the one `ray start` began on this machine), "
        "'HOST:6379' or 'ray://HOST:10001'. Every node needs the same Python environment with Privet, and the "
        "data set's path must be readable on every node. Default: a private Ray instance on this machine",
    )
    parser.add_argument("--verbose", action="store_true", help="Flower's debug logging")


def run_from_args(args: argparse.Namespace) -> None:
    """Parse the overrides and simulate (`privet simulate`; its user errors end in one line there)."""
    overrides = parse_overrides(args.run_config)
    simulate(args.sites, overrides, cpus_per_site=args.cpus_per_site, verbose=args.verbose,
             ray_address=args.ray_address)

