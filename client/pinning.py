"""A site runs only app code it approved: the app bundle's SHA-256 is checked before any of its code is imported.

Open-source Flower 1.42 runs whatever ClientApp the coordinator's bundle (FAB) holds, and that code is
what enforces the site policy. ``privet site-node`` closes the gap with what Flower does allow: the
SuperNode runs with ``--isolation process``, so it starts no app itself; the site's own launcher
(this module, installed at the site, not shipped in the bundle) accepts only ClientApp tasks and starts
each through ``privet-clientapp``, which refuses a bundle whose SHA-256 is not in the policy's
``allowed-apps`` before Flower unpacks it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import common.offline  # noqa: F401  (before flwr: no telemetry, update check or code install)

from client.policy import PolicyError, SitePolicy

POLICY_ENV = "PRIVET_SITE_POLICY"


def app_hash(app_dir: str | Path) -> str:
    """The SHA-256 Flower gives the bundle it builds from `app_dir` (what `flwr run` sends and `flwr ls` shows)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def approved_apps(policy: SitePolicy) -> frozenset[str]:
    """The bundles this site runs; a site that approved none cannot run pinned."""
    if not policy.allowed_apps:
        raise PolicyError(
            f"site {policy.site_id}: its policy lists no allowed-apps, so no app code is approved; add the SHA-256 "
            "of the app bundle you reviewed (`privet app-hash <app directory>` prints it)"
        )
    return frozenset(policy.allowed_apps)


def clientapp_main() -> int:
    """``privet-clientapp``: Flower's ``flwr-clientapp``, refusing any bundle the site's policy did not approve."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli import flwr_clientapp

    allowed = approved_apps(SitePolicy.load(os.environ[POLICY_ENV]))
    install = runtime.install_from_fab

    def checked_install(fab_file, *args, **kwargs):
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        if digest not in allowed:
            # Flower turns this into an error reply: the coordinator learns the app was refused, and why.
            raise PermissionError(f"app bundle sha256={digest} is not in this site's allowed-apps; nothing of it ran")
        return install(fab_file, *args, **kwargs)

    runtime.install_from_fab = checked_install
    flwr_clientapp()
    return 0


def superexec_main(policy_path: str, runtime_address: str, secret_file: str) -> None:
    """Flower's SuperExec for a ``--isolation process`` SuperNode: ClientApp tasks only, each via ``privet-clientapp``."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    os.environ[POLICY_ENV] = policy_path
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(Path(sys.executable).with_name("privet-clientapp"))
    AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})  # never an agent app or a connector
    sys.argv = ["flower-superexec", "--runtime-api-address", runtime_address, "--insecure",
                "--superexec-auth-secret-file", secret_file]
    flower_superexec()


def run_site_node(policy_path: Path, superlink: str, root_certificates: Path, private_key: Path,
                  runtime_port: int | None = None) -> int:
    """Start this site's SuperNode (process isolation) and its pinned launcher; stop both when either ends."""
    policy = SitePolicy.load(policy_path)
    approved_apps(policy)  # refuse to start rather than accept work it would refuse anyway
    runtime_port = runtime_port or _free_loopback_port()
    runtime_address = f"127.0.0.1:{runtime_port}"
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="privet-site-") as tmp:
        # Only the SuperNode and this site's launcher know it: nothing else on the host can take its tasks.
        secret_file = Path(tmp) / "superexec.secret"
        secret_file.write_text(secrets.token_hex(32))
        secret_file.chmod(0o600)
        bin_dir = Path(sys.executable).parent
        node = subprocess.Popen(
            [str(bin_dir / "flower-supernode"), "--superlink", superlink, "--root-certificates", str(root_certificates),
             "--auth-supernode-private-key", str(private_key), "--node-config", f"policy='{policy_path.resolve()}'",
             "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
             "--superexec-auth-secret-file", str(secret_file)],
            env=env,
        )
        launcher = subprocess.Popen(
            [sys.executable, "-c", "import sys; from client.pinning import superexec_main; superexec_main(*sys.argv[1:])",
             str(policy_path.resolve()), runtime_address, str(secret_file)],
            env=env,
        )
        return _supervise([node, launcher])


def _free_loopback_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago: only this site's two processes use it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _supervise(processes: list[subprocess.Popen]) -> int:
    """Wait until one process ends (or this one is asked to stop), then stop the others; return the first's code."""
    stop = False

    def request_stop(*_):
        nonlocal stop
        stop = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop and all(p.poll() is None for p in processes):
            try:
                processes[0].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        code = next((p.returncode for p in processes if p.returncode is not None), 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    return code


if __name__ == "__main__":
    sys.exit(clientapp_main())
