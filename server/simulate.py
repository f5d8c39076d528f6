"""Run a whole federation on this machine with Flower's simulation engine (Ray), in this process.

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

import common.offline  # noqa: F401  (before flwr: no telemetry, update check or code install)

import click
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir, get_project_config, parse_config_args
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from common.config import ConfigError, RunConfig

PROJECT_DIR = Path(__file__).resolve().parent.parent


def simulate(
    num_sites: int,
    overrides: dict | None = None,
    *,
    app_dir: str | Path = PROJECT_DIR,
    cpus_per_site: float | None = None,
    verbose: bool = False,
    client_app: str | None = None,
) -> None:
    """Simulate `num_sites` sites training together; raises if the ServerApp fails.

    `client_app` replaces the ClientApp named in pyproject.toml (tests use it to simulate failing sites).
    """
    if num_sites < 1:
        raise ValueError(f"sites={num_sites} must be at least 1")
    app_dir = Path(app_dir).resolve()
    RunConfig.from_mapping(dict(overrides or {}))  # name a bad key or value before Ray starts
    run_config = get_fused_config_from_dir(app_dir, dict(overrides or {}))
    config = RunConfig.from_mapping(run_config)
    if config.min_sites > num_sites:
        raise ValueError(f"min-sites={config.min_sites} is more than the {num_sites} simulated sites")
    components = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
    # One site at a time gets every core: on a small machine that beats several sites sharing them.
    cpus = cpus_per_site if cpus_per_site is not None else float(os.cpu_count() or 1)
    run = replace(
        Run.create_empty(run_id=1),
        override_config=dict(overrides or {}),
        federation_id=NOOP_FEDERATION_ID,
        primary_task_id=1,
    )
    # The same task identity Flower's own run_simulation() sets up for an in-process run.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    _run_simulation(
        server_app_attr=components["serverapp"],
        client_app_attr=client_app or components["clientapp"],
        num_supernodes=num_sites,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": max(cpus, float(os.cpu_count() or 1)), "logging_level": "error"},
        },
        app_dir=str(app_dir),
        run=run,
        server_app_context=context,
        is_app=True,
        verbose_logging=verbose,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``privet simulate`` (also ``python -m server.simulate``)."""
    parser.add_argument("--sites", type=int, default=4, help="number of simulated sites (default 4)")
    parser.add_argument(
        "--run-config",
        default="",
        help="overrides in Flower's format, e.g. \"num-server-rounds=5 run-name='trial' dp=true\"",
    )
    parser.add_argument("--cpus-per-site", type=float, default=None, help="CPU cores per site (default: all)")
    parser.add_argument("--verbose", action="store_true", help="Flower's debug logging")


def run_from_args(args: argparse.Namespace) -> int:
    """Parse the overrides and simulate; a bad option ends with a one-line error, not a traceback."""
    try:
        overrides = parse_config_args([args.run_config]) if args.run_config.strip() else {}
        simulate(args.sites, overrides, cpus_per_site=args.cpus_per_site, verbose=args.verbose)
    except (ConfigError, ValueError, click.ClickException) as err:
        message = err.format_message() if isinstance(err, click.ClickException) else str(err)
        print(f"privet simulate: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m server.simulate", description=__doc__)
    add_arguments(_parser)
    sys.exit(run_from_args(_parser.parse_args()))
