"""deploy/README.md's deployment, run as written with real processes on loopback: certificates, keys, registration,
the SuperLink behind the proxy, three sites with policies under `privet site-node`, `flwr run`; then an app bundle
the sites never approved, which none of them runs."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from tests import procs
from tests.test_simulation import LABELS, write_site_data

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "deploy" / "README.md"
pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)")]

# The README's commands; the test checks each is in the README (with its example values) and runs it (with its own).
COMMANDS = {
    "certs": "privet certs --out {secrets} --san {san}",
    "site-keys": "privet site-keys --out {secrets}/sites --site {site}",
    "model-hash": "privet model-hash {model}",
    "app-hash": "privet app-hash {app}",
    "superlink": ("flower-superlink --ssl-ca-certfile {secrets}/ca.crt --ssl-certfile {secrets}/server.crt "
                  "--ssl-keyfile {secrets}/server.key --enable-supernode-auth --host 127.0.0.1 --port {link_port} "
                  "--database {state}/superlink.db --disable-runtime-dependency-installation"),
    "proxy": "nginx -c {nginx_conf} -e stderr -g 'daemon off;'",
    "register": "flwr supernode register {registry}/{site}.pub privet --format json",
    "site-node": ("privet site-node --policy {policy} --superlink {fleet} --root-certificates {secrets}/ca.crt "
                  "--auth-supernode-private-key {secrets}/sites/{site}.key"),
    "run": "flwr run {app} privet --run-config {run_config}",
}
README_VALUES = {
    "secrets": "deploy/secrets", "san": "privet.coordinator.example.org", "site": "site-1", "model": "default",
    "app": ".", "link_port": "9091", "state": "deploy/state/superlink", "nginx_conf": "/etc/privet/nginx.conf",
    "registry": "deploy/registry", "policy": "deploy/sites/site-1/policy.toml",
    "fleet": "privet.coordinator.example.org:9092",
    "run_config": "\"site-registry='/etc/privet/registry/sites.toml' run-name='bank-2026-q4' num-server-rounds=5\"",
}


def test_every_command_the_test_runs_is_in_the_readme():
    text = re.sub(r"\s+", " ", README.read_text().replace("\\\n", " "))
    for name, template in COMMANDS.items():
        assert template.format(**README_VALUES) in text, name


def command(name: str, **values) -> list[str]:
    """One of the README's commands as argv, with this test's values."""
    argv = shlex.split(COMMANDS[name].format(**values))
    tools = {"privet": Path(sys.executable).with_name("privet"), "flwr": procs.BIN / "flwr",
             "flower-superlink": procs.BIN / "flower-superlink"}
    return [str(tools.get(argv[0], argv[0])), *argv[1:]]


def privet(name: str, cwd: Path, **values) -> str:
    done = subprocess.run(command(name, **values), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def write_policy(site_dir: Path, site: str, model_hash: str, app_hash: str) -> Path:
    site_dir.mkdir(parents=True)
    write_site_data(site_dir / "notes.csv", n=64, seed=int(site[-1]))
    policy = site_dir / "policy.toml"
    policy.write_text(
        f'site-id = "{site}"\ndata-path = "notes.csv"\ntext-column = "text"\nlabel-column = "product"\n'
        f'epsilon-cap = 3.0\ndelta = 1e-5\nledger-path = "ledger/ledger.json"\n'
        f'allowed-models = ["{model_hash}"]\nmax-rounds = 5\nallowed-apps = ["{app_hash}"]\n'
    )
    return policy


def start_proxy(registry: procs.Processes, work: Path, secrets: Path, link: procs.SuperLink) -> tuple[int, int]:
    """deploy/proxy/nginx.conf with this test's certificate paths and ports, started as the README says."""
    fleet, control = procs.free_port(), procs.free_port()
    conf = (ROOT / "deploy" / "proxy" / "nginx.conf").read_text()
    conf = (conf.replace("/etc/privet/tls/", f"{secrets}/").replace("/tmp/nginx", f"{work}/nginx")
            .replace("127.0.0.1:9091", link.address).replace("listen 9092", f"listen 127.0.0.1:{fleet}")
            .replace("listen 9093", f"listen 127.0.0.1:{control}"))
    (work / "nginx.conf").write_text(conf)
    proxy = registry.start("nginx", command("proxy", nginx_conf=work / "nginx.conf"), procs.flower_env(work / "nx"),
                           cwd=work)
    proxy.wait_for_output(r"start worker process|worker process", timeout=30)
    return fleet, control


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_readme_deployment_trains_and_an_unapproved_app_never_runs(tiny_model_dir, tmp_path):
    secrets, sites = tmp_path / "secrets", ("site-1", "site-2", "site-3")
    privet("certs", tmp_path, secrets=secrets, san="localhost")
    for site in sites:
        privet("site-keys", tmp_path, secrets=secrets, site=site)
    model_hash = privet("model-hash", tmp_path, model=tiny_model_dir).strip()
    # The reviewed app: a snapshot of Privet's app files, so edits in the working tree cannot change its hash.
    app = _copy_app(tmp_path / "app")
    app_hash = privet("app-hash", tmp_path, app=app).strip()
    assert re.fullmatch(r"[0-9a-f]{64}", app_hash)

    with procs.Processes(tmp_path / "logs") as registry:
        link_port = procs.free_port()
        state = tmp_path / "server"
        link = registry.start("superlink", command("superlink", secrets=secrets, link_port=link_port, state=state),
                              procs.flower_env(tmp_path / "link-home"), cwd=state)
        link.wait_for_output(rf"Uvicorn running on https://127\.0\.0\.1:{link_port}", timeout=60)
        superlink = procs.SuperLink(link, f"127.0.0.1:{link_port}", secrets / "ca.crt")
        fleet, control = start_proxy(registry, tmp_path, secrets, superlink)

        coordinator = procs.flower_env(tmp_path / "coordinator-home")
        procs.write_flower_config(tmp_path / "coordinator-home", f"127.0.0.1:{control}",
                                  root_certificates=secrets / "ca.crt")
        keys = tmp_path / "registry"
        keys.mkdir()
        nodes = {}
        for site in sites:
            shutil.copy(secrets / "sites" / f"{site}.pub", keys / f"{site}.pub")
            out = subprocess.run(command("register", registry=keys, site=site), env=coordinator, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
            nodes[site] = int(json.loads(out.stdout[out.stdout.find("{"):])["node-id"])
        (keys / "sites.toml").write_text("[sites]\n" + "".join(f'{s} = "{s}.pub"\n' for s in sites))

        for site in sites:
            home = tmp_path / "sites" / site
            policy = write_policy(home, site, model_hash if site != "site-3" else "0" * 64, app_hash)
            registry.start(f"site-node-{site}", command("site-node", policy=policy, fleet=f"127.0.0.1:{fleet}",
                                                        secrets=secrets, site=site),
                           procs.flower_env(home / "flwr-home"), cwd=home)
        for site in sites:
            procs.wait_for_supernode(superlink, nodes[site], timeout=120)

        run_config = {"run-name": "deployed", "num-server-rounds": 2, "model": str(tiny_model_dir),
                      "dataset": "policy", "labels": ",".join(LABELS), "batch-size": 8, "max-length": 16,
                      "min-sites": 2, "target-epsilon": 3.0, "site-registry": str(keys / "sites.toml")}
        argv = command("run", app=app, run_config=shlex.quote(procs.node_config_arg(run_config)))
        run_id = _submit(argv, coordinator)
        info = procs.wait_for_run(run_id, "privet", coordinator, timeout=600)
        assert info["status"] == "finished:completed", procs.run_logs(run_id, "privet", coordinator)

        # The coordinator ships changed code: one line that would leave a trace at every site it ran on.
        evil = _copy_app(tmp_path / "evil")
        client_app = evil / "client" / "app.py"
        client_app.write_text(client_app.read_text() + f"\nPath({str(tmp_path / 'evil-code-ran')!r}).touch()\n")
        argv = command("run", app=evil, run_config=shlex.quote(procs.node_config_arg(
            {**run_config, "run-name": "unapproved", "num-server-rounds": 1})))
        run_id = _submit(argv, coordinator)
        procs.wait_for_run(run_id, "privet", coordinator, timeout=300)

    run = state / "runs" / "deployed"
    rows = rows_of(run)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        status = {s["site"]: s for s in row["sites"]}
        assert status["site-1"]["status"] == status["site-2"]["status"] == "trained"
        assert status["site-3"]["status"] == "declined" and "does not allow model" in status["site-3"]["reason"]
        assert row["aggregated_sites"] == 2 and row["global_source"] == "sites-weighted"
    for site in ("site-1", "site-2"):
        ledger = json.loads((tmp_path / "sites" / site / "ledger" / "ledger.json").read_text())
        accountant = create_accountant(mechanism=ledger["accountant"])
        accountant.history = [tuple(e) for e in ledger["history"]]
        reported = next(s["epsilon"] for s in rows[-1]["sites"] if s["site"] == site)
        assert accountant.get_epsilon(delta=ledger["delta"]) == pytest.approx(reported)
        assert [r["round"] for r in ledger["rounds"] if r["kind"] == "train"] == [1, 2]
    assert not (tmp_path / "sites" / "site-3" / "ledger").exists()

    refused = rows_of(state / "runs" / "unapproved")[0]
    assert refused["aggregated_sites"] == 0
    for site in refused["sites"]:
        assert site["status"] == "rejected" and "not in this site's allowed-apps" in site["reason"], site
    assert not (tmp_path / "evil-code-ran").exists()


def _submit(argv: list[str], env: dict) -> int:
    done = subprocess.run([*argv, "--format", "json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return int(json.loads(done.stdout[done.stdout.find("{"):])["run-id"])


def _copy_app(target: Path) -> Path:
    """Privet's app files (what `flwr run` bundles from a checkout) in a directory of their own."""
    target.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", ".gitignore"):
        shutil.copy(ROOT / name, target / name)
    for package in ("common", "client", "server"):
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target
