"""Start and stop real Flower processes (SuperLink, SuperNodes, the `flwr` CLI) on 127.0.0.1 for tests.

Every process runs in its own session with its output in a log file; a `Processes` registry stops them all
(SIGTERM to the process group, then SIGKILL) when the test ends, so no SuperExec or app subprocess outlives it.

Typical use, for a federation over real processes (the apps come from the project directory)::

    with Processes(tmp_path / "logs") as procs:
        pki = make_pki(tmp_path / "pki")
        env = flower_env(tmp_path / "flwr-home")
        link = start_superlink(procs, pki, workdir=tmp_path / "server", env=env)
        conn = write_flower_config(tmp_path / "flwr-home", link)
        for site in ("site-1", "site-2"):
            key, pub = make_site_keys(tmp_path / "keys", site)
            node_id = register_supernode(pub, conn, env)
            start_supernode(procs, site, link, env, private_key=key,
                            node_config={"policy": str(policy_path)})
            wait_for_supernode(link, node_id)
        run_id = start_run(PROJECT_ROOT, conn, env, run_config={"num-server-rounds": 2})
        info = wait_for_run(run_id, conn, env, timeout=600)
        assert info["status"] == "finished:completed", run_logs(run_id, conn, env)
        # The ServerApp runs with the SuperLink's working directory: results are in workdir/runs/...
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import pki as _pki

BIN = Path(sys.executable).parent
# Privet turns these off everywhere: no telemetry, no update check, no `uv sync` of app dependencies at run time.
FLWR_OFF = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
LOOPBACK = "127.0.0.1"


class ProcessFailed(RuntimeError):
    """A process exited or timed out before doing what a test waited for; the message carries its log tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Return an environment for Flower processes: FLWR_HOME set, the venv's bin first on PATH, the three FLWR off-switches."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(FLWR_OFF)
    env["FLWR_HOME"] = str(flwr_home)
    # The SuperLink and SuperNode start `flower-superexec` by name: it must be found on PATH.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """One started process: its Popen, its log file, and helpers to wait on its output or exit."""

    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path):
        self.name, self.popen, self.log_path = name, popen, log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        """Return everything the process has printed so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        """Return the last lines of the output, for error messages."""
        return "\n".join(self.output().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_output(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Poll the log until the regex matches; raise ProcessFailed if the process exits first or the deadline passes."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if match := regex.search(self.output()):
                return match
            if not self.alive():
                if match := regex.search(self.output()):
                    return match
                raise ProcessFailed(
                    f"{self.name} exited with {self.popen.returncode} before printing /{pattern}/:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name} did not print /{pattern}/ within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own and return its exit code; raise ProcessFailed after timeout."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ProcessFailed(f"{self.name} still running after {timeout:.0f}s:\n{self.tail()}") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process and everything it started (its process group): SIGTERM, then SIGKILL after timeout."""
        pgid = self.popen.pid  # start_new_session=True makes the child its own group leader
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children (SuperExec, app processes) may outlive a leader that exited: end the group in any case.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Processes:
    """A registry of started processes; a context manager whose exit stops all of them, last started first."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> Proc:
        """Start argv in a new session with stdout and stderr going to <log_dir>/<name>.log."""
        log_path = self.log_dir / f"{name}.log"
        if cwd is not None:
            Path(cwd).mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env), cwd=cwd, start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every process started through this registry."""
        while self.procs:
            self.procs.pop().stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


# --- certificates and keys -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    """Paths of a deployment's CA and SuperLink certificate, as written by `privet certs`."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def make_pki(out_dir: Path, sans: Sequence[str] = _pki.LOOPBACK_SANS) -> Pki:
    """Write a fresh CA and a server certificate for `sans` into out_dir."""
    paths = _pki.write_certificates(Path(out_dir), sans)
    return Pki(Path(out_dir), paths[_pki.CA_CERT], paths[_pki.CA_KEY], paths[_pki.SERVER_CERT], paths[_pki.SERVER_KEY])


def make_site_keys(out_dir: Path, site: str) -> tuple[Path, Path]:
    """Write one site's authentication key pair; return (private key, public key) paths."""
    return _pki.write_site_keys(Path(out_dir), site)


# --- SuperLink and SuperNodes ----------------------------------------------------------------------------------

@dataclass
class SuperLink:
    """A running SuperLink: its process, the address serving all its APIs, and the CA that signed its certificate."""

    proc: Proc
    address: str
    ca_cert: Path


def superlink_argv(pki: Pki, port: int, database: Path | str, auth: bool = True) -> list[str]:
    """Return the flower-superlink command line: TLS with the Privet certificates, SuperNode authentication on, loopback only."""
    argv = [
        BIN / "flower-superlink",
        "--ssl-ca-certfile", pki.ca_cert,
        "--ssl-certfile", pki.server_cert,
        "--ssl-keyfile", pki.server_key,
        "--host", LOOPBACK,
        "--port", str(port),
        "--database", str(database),
        "--disable-runtime-dependency-installation",
    ]
    if auth:
        argv.append("--enable-supernode-auth")
    return [str(a) for a in argv]


def start_superlink(procs: Processes, pki: Pki, workdir: Path, env: Mapping[str, str], port: int | None = None,
                    auth: bool = True, database: Path | str | None = None, timeout: float = 60.0) -> SuperLink:
    """Start flower-superlink in workdir (the ServerApp inherits it as working directory) and wait until it serves HTTPS."""
    port = port or free_port()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    database = database or workdir / "superlink.db"
    proc = procs.start("superlink", superlink_argv(pki, port, database, auth=auth), env, cwd=workdir)
    proc.wait_for_output(rf"Uvicorn running on https://{re.escape(LOOPBACK)}:{port}", timeout=timeout)
    return SuperLink(proc, f"{LOOPBACK}:{port}", pki.ca_cert)


def node_config_arg(config: Mapping[str, object]) -> str:
    """Format a mapping as flower-supernode's --node-config value, e.g. {"policy": "/p.toml"} -> 'policy="/p.toml"'."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={json.dumps(str(value))}")
    return " ".join(parts)


def supernode_argv(superlink_address: str, runtime_port: int, ca_cert: Path | None = None,
                   private_key: Path | None = None, node_config: Mapping[str, object] | None = None,
                   max_retries: int | None = None, max_wait_time: float | None = None) -> list[str]:
    """Return the flower-supernode command line; ca_cert=None means "trust only the system CAs"."""
    argv = [str(BIN / "flower-supernode"), "--superlink", superlink_address,
            "--host", LOOPBACK, "--port", str(runtime_port)]
    if ca_cert is not None:
        argv += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        argv += ["--node-config", node_config_arg(node_config)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def start_supernode(procs: Processes, name: str, superlink: SuperLink | str, env: Mapping[str, str],
                    private_key: Path | None, ca_cert: Path | None | str = "superlink",
                    node_config: Mapping[str, object] | None = None, cwd: Path | None = None,
                    max_retries: int | None = None, max_wait_time: float | None = None) -> Proc:
    """Start flower-supernode for one site; by default it trusts the SuperLink's CA (pass ca_cert=None for none)."""
    address = superlink.address if isinstance(superlink, SuperLink) else superlink
    if ca_cert == "superlink":
        ca_cert = superlink.ca_cert if isinstance(superlink, SuperLink) else None
    argv = supernode_argv(address, free_port(), ca_cert=ca_cert, private_key=private_key, node_config=node_config,
                          max_retries=max_retries, max_wait_time=max_wait_time)
    return procs.start(name, argv, env, cwd=cwd or procs.log_dir / name)


def wait_for_supernode(superlink: SuperLink, node_id: int, timeout: float = 30.0) -> None:
    """Wait until the SuperLink logs that the SuperNode with node_id connected (activated)."""
    superlink.proc.wait_for_output(rf"Activated node_id={node_id}\b", timeout=timeout)


# --- the flwr CLI against a deployed SuperLink -----------------------------------------------------------------

def write_flower_config(flwr_home: Path, superlink: SuperLink | str, name: str = "privet",
                        root_certificates: Path | None = None) -> str:
    """Write $FLWR_HOME/config.toml with one TLS connection `name` (made the default) to the SuperLink; return the name."""
    address = superlink.address if isinstance(superlink, SuperLink) else superlink
    if root_certificates is None and isinstance(superlink, SuperLink):
        root_certificates = superlink.ca_cert
    if root_certificates is None:
        raise ValueError("a TLS connection needs root_certificates (the deployment CA certificate)")
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f"default = {json.dumps(name)}\n\n"
        f"[superlink.{name}]\n"
        f"address = {json.dumps(address)}\n"
        # Flower requires an absolute path here.
        f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}\n",
        encoding="utf-8",
    )
    return name


def flwr(args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 120.0,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run the `flwr` CLI with a deadline; raise ProcessFailed with its output if it fails and check is set."""
    argv = [str(BIN / "flwr"), *map(str, args)]
    try:
        done = subprocess.run(argv, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise ProcessFailed(f"`flwr {' '.join(map(str, args))}` timed out after {timeout:.0f}s") from err
    if check and done.returncode != 0:
        raise ProcessFailed(f"`flwr {' '.join(map(str, args))}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def flwr_json(args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 120.0) -> dict:
    """Run a `flwr` command with --format json and return the parsed JSON object it prints."""
    done = flwr([*args, "--format", "json"], env, cwd=cwd, timeout=timeout)
    start = done.stdout.find("{")
    if start < 0:
        raise ProcessFailed(f"`flwr {' '.join(map(str, args))}` printed no JSON:\n{done.stdout}\n{done.stderr}")
    data = json.loads(done.stdout[start:])
    if not data.get("success", True):
        raise ProcessFailed(f"`flwr {' '.join(map(str, args))}` failed: {data}")
    return data


def register_supernode(public_key: Path, connection: str, env: Mapping[str, str]) -> int:
    """Register a site's public key with `flwr supernode register`; return the node id the SuperLink assigned."""
    return int(flwr_json(["supernode", "register", public_key, connection], env)["node-id"])


def list_supernodes(connection: str, env: Mapping[str, str]) -> dict[int, str]:
    """Return {node id: status} from `flwr supernode list` (status: registered, online, offline, ...)."""
    nodes = flwr_json(["supernode", "list", connection], env)["nodes"]
    return {int(node["node-id"]): node["status"] for node in nodes}


def node_statuses(address: str, ca_cert: Path) -> dict[int, str]:
    """Return {node id: status} straight from the Control API at address, in-process: what `flwr supernode list`
    shows, without its second of start-up (for polling)."""
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.control import ControlHttpClient

    client = ControlHttpClient.from_server_address(
        server_address=address, insecure=False, root_certificates=Path(ca_cert).read_bytes(), interceptors=[]
    )
    try:
        return {node.node_id: node.status for node in client.ListNodes(ListNodesRequest()).nodes_info}
    finally:
        client.close()


def start_run(app_dir: Path, connection: str, env: Mapping[str, str],
              run_config: Mapping[str, object] | None = None) -> int:
    """Submit the Flower app in app_dir with `flwr run APP CONNECTION` (optionally --run-config overrides); return the run id."""
    args = ["run", Path(app_dir).resolve(), connection]
    if run_config:
        args += ["--run-config", node_config_arg(run_config)]
    return int(flwr_json(args, env, cwd=app_dir)["run-id"])


def run_info(run_id: int, connection: str, env: Mapping[str, str]) -> dict:
    """Return `flwr ls --run-id` for one run (keys include status, e.g. "running", "finished:completed")."""
    runs = flwr_json(["ls", connection, "--run-id", str(run_id)], env)["runs"]
    return next(run for run in runs if int(run["run-id"]) == run_id)


def run_logs(run_id: int, connection: str, env: Mapping[str, str]) -> str:
    """Return the ServerApp's log so far (`flwr log RUN CONNECTION --show`)."""
    return flwr(["log", str(run_id), connection, "--show"], env, check=False).stdout


def wait_for_run(run_id: int, connection: str, env: Mapping[str, str], timeout: float = 600.0,
                 poll: float = 2.0) -> dict:
    """Wait until the run has finished (status "finished:..."); return its `flwr ls` entry, or raise ProcessFailed."""
    deadline = time.monotonic() + timeout
    while True:
        info = run_info(run_id, connection, env)
        if str(info["status"]).startswith("finished"):
            return info
        if time.monotonic() > deadline:
            raise ProcessFailed(
                f"run {run_id} still {info['status']} after {timeout:.0f}s:\n{run_logs(run_id, connection, env)}"
            )
        time.sleep(poll)
