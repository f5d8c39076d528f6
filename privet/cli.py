"""The `privet` command. Each subcommand is one `_add_<name>(subparsers)` function that registers its parser and handler."""

import argparse
import sys
from pathlib import Path

import common.offline  # noqa: F401  (before flwr: no telemetry, update check or code install)
from privet import cli_model


class CommandError(Exception):
    """An error the user can fix; `main` prints its message (no traceback) and exits with status 1."""


class _Parser(argparse.ArgumentParser):
    """A usage mistake is a user error like any other: one line, exit status 1."""

    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types whose message is the whole story for the user; anything else is a bug and shows its
    traceback. Called only while an error is being matched, so no command imports what it does not use."""
    from client.audit import AuditError
    from client.policy import Declined, PolicyError
    from common.config import ConfigError
    from common.data import DataError
    from common.inference import InferenceError
    from common.model import ModelError
    from common.privacy import PrivacyError
    from server.checkpoint import RunDirError
    from server.simulate import SimulateError

    return (CommandError, FileExistsError, AuditError, ConfigError, DataError, Declined, InferenceError, ModelError,
            PolicyError, PrivacyError, RunDirError, SimulateError)


def _add_certs(subparsers) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="create a CA and the SuperLink's TLS certificate",
        description="Create a private CA (ca.crt, ca.key) and a SuperLink TLS certificate signed by it "
        "(server.crt, server.key). Private keys are written with mode 0600.",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write the four files into")
    parser.add_argument(
        "--san", action="append", default=[], metavar="NAME_OR_IP",
        help="DNS name or IP address the sites use to reach the SuperLink (repeatable, or comma-separated); "
        "localhost, 127.0.0.1 and ::1 are always added because the SuperLink's own ServerApp runner "
        "connects over loopback",
    )
    parser.add_argument("--days", type=int, default=825, help="validity of the server certificate (default 825)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.set_defaults(handler=_run_certs)


def _run_certs(args) -> None:
    from common import pki

    sans = [part.strip() for value in args.san for part in value.split(",") if part.strip()]
    sans = list(dict.fromkeys([*sans, *pki.LOOPBACK_SANS]))
    try:
        paths = pki.write_certificates(args.out, sans, force=args.force, server_days=args.days)
    except ValueError as err:  # pki's refusals are plain ValueErrors
        raise CommandError(str(err)) from None
    out = args.out
    print(f"Wrote to {out}/:")
    print(f"  {paths[pki.CA_CERT]}")
    print("      CA certificate (public). Give it to every site and to whoever runs `flwr`:")
    print("        flower-superlink --ssl-ca-certfile   flower-supernode --root-certificates")
    print("        root-certificates = \"<absolute path>\" in the Flower config connection ($FLWR_HOME/config.toml)")
    print(f"  {paths[pki.CA_KEY]}  (mode 0600)")
    print("      CA private key. Used only to sign certificates: keep it offline, never copy it into a container.")
    print(f"  {paths[pki.SERVER_CERT]}")
    print(f"      SuperLink certificate for {', '.join(sans)}:  flower-superlink --ssl-certfile")
    print(f"  {paths[pki.SERVER_KEY]}  (mode 0600)")
    print("      SuperLink private key:  flower-superlink --ssl-keyfile  (stays on the SuperLink host)")


def _add_site_keys(subparsers) -> None:
    parser = subparsers.add_parser(
        "site-keys",
        help="create one site's SuperNode authentication key pair",
        description="Create an ECDSA P-384 key pair for one site: <site>.key (OpenSSH private key, mode 0600, "
        "stays at the site) and <site>.pub (OpenSSH public key, sent to the coordinator to register).",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write <site>.key and <site>.pub into")
    parser.add_argument("--site", required=True, help="site name, e.g. site-1")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.set_defaults(handler=_run_site_keys)


def _run_site_keys(args) -> None:
    from common import pki

    try:
        private_path, public_path = pki.write_site_keys(args.out, args.site, force=args.force)
    except ValueError as err:
        raise CommandError(str(err)) from None
    fingerprint = pki.public_key_fingerprint(public_path.read_bytes())
    print(f"Wrote {args.site}'s SuperNode authentication keys:")
    print(f"  {private_path}  (mode 0600)")
    print("      private key; never leaves the site:  flower-supernode --auth-supernode-private-key")
    print(f"  {public_path}")
    print(f"      public key, fingerprint {fingerprint}")
    print("Send the .pub file to the coordinator (confirm the fingerprint by phone); they register it with:")
    print(f"  flwr supernode register {public_path.name} <connection>")
    print("The SuperLink (started with --enable-supernode-auth) then accepts this site and no unregistered one.")


def _add_simulate(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="simulate a whole federation on this machine or on a Ray cluster (--ray-address)",
        description="Run the ServerApp and N simulated sites with Flower's simulation engine; results go to "
        "runs/<run-name>/.",
    )
    from server import simulate

    simulate.add_arguments(parser)
    parser.set_defaults(handler=_run_simulate)


def _run_simulate(args) -> None:
    from server import simulate

    simulate.run_from_args(args)


def _add_model_hash(subparsers) -> None:
    parser = subparsers.add_parser(
        "model-hash",
        help="print a model's weights SHA-256, for a site policy's allowed-models",
        description="Print the SHA-256 over a local model directory's weight files (default: the packaged model).",
    )
    parser.add_argument("model", nargs="?", default="default", help="local model directory, or 'default'")
    parser.set_defaults(handler=_run_model_hash)


def _run_model_hash(args) -> None:
    from common.model import weights_sha256

    print(weights_sha256(args.model))


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write (again) a run's report.html and report.md",
        description="Rebuild runs/<run-name>/report.html and report.md from what is on disk in the run directory.",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory, e.g. runs/bank-demo")
    parser.set_defaults(handler=_run_report)


def _run_report(args) -> None:
    from server.run_report import write_report

    if not (args.run_dir / "state.json").exists():
        raise CommandError(f"{args.run_dir} is not a Privet run directory (no state.json)")
    html, markdown = write_report(args.run_dir)
    print(f"wrote {html} and {markdown}")


def _add_app_hash(subparsers) -> None:
    parser = subparsers.add_parser(
        "app-hash",
        help="print the SHA-256 of the app bundle `flwr run` builds from a directory, for a policy's allowed-apps",
        description="Build the Flower app bundle (FAB) from DIR exactly as `flwr run DIR` does and print its SHA-256. "
        "A site lists the hashes of the bundles it reviewed in its policy's allowed-apps; `privet site-node` runs no "
        "other.",
    )
    parser.add_argument("app", nargs="?", type=Path, default=Path("."), help="the app directory (default: .)")
    parser.set_defaults(handler=_run_app_hash)


def _run_app_hash(args) -> None:
    from client.pinning import app_hash

    if not (args.app / "pyproject.toml").is_file():
        raise CommandError(f"{args.app} is not a Flower app directory (no pyproject.toml)")
    print(app_hash(args.app))


def _add_site_node(subparsers) -> None:
    parser = subparsers.add_parser(
        "site-node",
        help="run this site: its SuperNode, running only the app bundles its policy approved",
        description="Start flower-supernode for this site (process isolation, the policy as its node config) and the "
        "site's own launcher, which starts only ClientApps whose bundle SHA-256 is in the policy's allowed-apps. "
        "Stops both when either ends.",
    )
    parser.add_argument("--policy", type=Path, required=True, help="the site policy (TOML)")
    parser.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, host:port")
    parser.add_argument("--root-certificates", type=Path, required=True, help="the deployment CA certificate")
    parser.add_argument("--auth-supernode-private-key", type=Path, required=True, help="this site's private key")
    parser.add_argument("--runtime-port", type=int, default=None,
                        help="local port of the SuperNode's Runtime API on 127.0.0.1 (default: a free one)")
    parser.set_defaults(handler=_run_site_node)


def _run_site_node(args) -> None:
    from client.pinning import run_site_node

    for path in (args.policy, args.root_certificates, args.auth_supernode_private_key):
        if not path.is_file():
            raise CommandError(f"{path} does not exist")
    code = run_site_node(args.policy, args.superlink, args.root_certificates, args.auth_supernode_private_key,
                         args.runtime_port)
    if code:
        raise SystemExit(code)


def _add_audit(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="audit a site's DP training empirically (one-run canary audit)",
        description="Train the site's exact path once with secret canaries and compare the ε lower bound they "
        "prove with the ε the ledger claims; writes audit.json (exit 0: no violation, 1: VIOLATION, 2: cannot run).",
    )
    from client import audit

    audit.add_arguments(parser)
    # Exit status 1 is the audit's VIOLATION verdict, so an audit that cannot run ends with 2 (documented).
    parser.set_defaults(handler=_run_audit, error_status=2)


def _run_audit(args) -> None:
    from client import audit

    status = audit.run(args)
    out = audit.output_dir(args)
    if (out / "state.json").is_file():  # a run directory: its report shows the audit from now on
        from server.run_report import write_report

        print("refreshed {} and {}".format(*write_report(out)))
    if status != 0:
        raise SystemExit(status)


def parser() -> argparse.ArgumentParser:
    """The `privet` command line's parser, with every subcommand."""
    root = _Parser(
        prog="privet", description="Privacy-preserving federated LoRA fine-tuning with DP-SGD on Flower."
    )
    subparsers = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_certs(subparsers)
    _add_site_keys(subparsers)
    _add_simulate(subparsers)
    _add_model_hash(subparsers)
    _add_report(subparsers)
    _add_app_hash(subparsers)
    _add_site_node(subparsers)
    _add_audit(subparsers)
    cli_model.add_commands(subparsers)  # predict, evaluate, ledger, export
    return root


def main(argv=None) -> int:
    """Run the `privet` command line; return the exit status."""
    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except user_errors() as err:  # evaluated only when something was raised; a bug keeps its traceback
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"privet {args.command}: error: {message}", file=sys.stderr)
        return getattr(args, "error_status", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
