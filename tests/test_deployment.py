"""A real flower-superlink with TLS and SuperNode authentication on 127.0.0.1: who gets in, who does not, and a run.

Certificates and keys come from common/pki.py; processes are started and always stopped by tests/procs.py.
"""

import json
import shutil
import ssl
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import procs
pytestmark = pytest.mark.timeout(180)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A SuperLink (TLS, --enable-supernode-auth), the coordinator's Flower config, and keys for three sites."""
    root = tmp_path_factory.mktemp("deployment")
    with procs.Processes(root / "logs") as registry:
        certs = procs.make_pki(root / "pki")
        link = procs.start_superlink(registry, certs, workdir=root / "server",
                                     env=procs.flower_env(root / "server-home"))
        cli_env = procs.flower_env(root / "coordinator-home")
        connection = procs.write_flower_config(root / "coordinator-home", link)
        keys = {site: procs.make_site_keys(root / "keys", site) for site in ("site-1", "site-2", "site-3")}
        yield {"root": root, "procs": registry, "pki": certs, "link": link, "env": cli_env,
               "connection": connection, "keys": keys}


@pytest.fixture(scope="module")
def online_site(deployment):
    """site-1: public key registered with `flwr supernode register`, SuperNode started with its private key and the CA."""
    d = deployment
    private, public = d["keys"]["site-1"]
    node_id = procs.register_supernode(public, d["connection"], d["env"])
    assert procs.list_supernodes(d["connection"], d["env"]) == {node_id: "registered"}
    policy = d["root"] / "site-1" / "policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text('site-id = "site-1"\n')
    proc = procs.start_supernode(d["procs"], "supernode-site-1", d["link"],
                                 procs.flower_env(d["root"] / "site-1-home"), private_key=private,
                                 node_config={"policy": str(policy)}, cwd=d["root"] / "site-1")
    procs.wait_for_supernode(d["link"], node_id, timeout=60)
    return {"node_id": node_id, "proc": proc, "policy": policy}


def test_registered_site_with_ca_connects(deployment, online_site):
    """(a) The registered key plus the deployment CA: the SuperLink lists the node as online."""
    nodes = procs.list_supernodes(deployment["connection"], deployment["env"])
    assert nodes[online_site["node_id"]] == "online"
    assert online_site["proc"].alive()
    # Note what just happened: the Control API (register, list) answered on the very host:port that serves
    # the Fleet API. Flower 1.42 has one port for all APIs and no Control API login without its enterprise
    # plugin, which is why deploy/ keeps the SuperLink on loopback behind a path-filtering proxy.


def _nodes(d) -> dict[int, str]:
    return procs.node_statuses(d["link"].address, d["pki"].ca_cert)


def _rejected(proc: procs.Proc, timeout: float = 60.0) -> str:
    code = proc.wait(timeout)
    assert code != 0, proc.tail()
    return proc.output()


def test_unregistered_key_is_rejected(deployment, online_site):
    """(b) A SuperNode with a valid TLS setup but a key nobody registered is refused and exits."""
    d = deployment
    before = _nodes(d)
    private, _ = d["keys"]["site-2"]
    proc = procs.start_supernode(d["procs"], "supernode-site-2-unregistered", d["link"],
                                 procs.flower_env(d["root"] / "site-2-home"), private_key=private,
                                 max_retries=1, max_wait_time=20)
    output = _rejected(proc)
    assert "Failed to activate SuperNode" in output
    assert "No SuperNode found with the given public key" in d["link"].proc.output()
    assert _nodes(d) == before


def test_supernode_without_the_deployment_ca_cannot_connect(deployment, online_site, tmp_path):
    """(c) Even with the registered key: no CA (system trust only), another CA, or plain HTTP all fail."""
    d = deployment
    before = _nodes(d)
    private, _ = d["keys"]["site-1"]
    other = procs.make_pki(tmp_path / "other-ca")
    variants = {"system-cas": None, "other-ca": other.ca_cert}
    started = {
        name: procs.start_supernode(d["procs"], f"supernode-{name}", d["link"],
                                    procs.flower_env(tmp_path / name), private_key=private, ca_cert=ca,
                                    max_retries=1, max_wait_time=20)
        for name, ca in variants.items()
    }
    # Flower refuses an authentication key without TLS, so the plain-HTTP attempt goes without one.
    plain = d["procs"].start(
        "supernode-plain-http",
        [*procs.supernode_argv(d["link"].address, procs.free_port(), max_retries=1, max_wait_time=20),
         "--insecure"],
        procs.flower_env(tmp_path / "plain"), cwd=tmp_path / "plain")
    for name, proc in started.items():
        assert "CERTIFICATE_VERIFY_FAILED" in _rejected(proc), name
    assert "Failed to initialize the connection" in _rejected(plain)
    assert _nodes(d) == before


PROBE_SERVER = '''
import json, time
from pathlib import Path
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    deadline = time.monotonic() + 60
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.2)
    query = [Message(RecordDict({"q": MetricRecord({"x": 1.0})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = [r for r in grid.send_and_receive(query, timeout=60) if r.has_content()]
    out = Path(context.run_config["runs-dir"]) / context.run_config["run-name"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"policies": [r.content["a"]["policy"] for r in replies]}))
'''

PROBE_CLIENT = '''
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context) -> Message:
    return Message(RecordDict({"a": ConfigRecord({"policy": str(context.node_config["policy"])})}), reply_to=msg)
'''

PROBE_PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "deployprobe"
version = "1.0.0"
description = "Checks a deployed SuperLink end to end"
license = "Apache-2.0"
dependencies = ["flwr==1.42.0"]

[tool.flwr.app]
publisher = "privet"

[tool.flwr.app.components]
serverapp = "deployprobe.server:app"
clientapp = "deployprobe.client:app"

[tool.flwr.app.config]
run-name = "unnamed"
runs-dir = "runs"
'''


def write_probe_app(app_dir: Path) -> Path:
    """Write a minimal Flower app: the ServerApp queries every node and writes runs/<run-name>/result.json."""
    package = app_dir / "deployprobe"
    package.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(textwrap.dedent(PROBE_PYPROJECT).lstrip())
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(PROBE_SERVER)
    (package / "client.py").write_text(PROBE_CLIENT)
    return app_dir


def test_flwr_run_on_the_deployed_superlink(deployment, online_site, tmp_path):
    """`flwr run APP CONNECTION` over TLS: the run finishes, the site got its --node-config policy path,
    and the ServerApp's relative runs/<run-name>/ lands in the SuperLink's working directory."""
    d = deployment
    app = write_probe_app(tmp_path / "app")
    run_id = procs.start_run(app, d["connection"], d["env"], run_config={"run-name": "probe"})
    info = procs.wait_for_run(run_id, d["connection"], d["env"], timeout=120, poll=1.0)
    assert info["status"] == "finished:completed", procs.run_logs(run_id, d["connection"], d["env"])
    result = json.loads((d["root"] / "server" / "runs" / "probe" / "result.json").read_text())
    assert str(online_site["policy"]) in result["policies"]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_proxy_publishes_only_fleet_and_control(deployment, tmp_path):
    """deploy/proxy/nginx.conf in front of the loopback SuperLink: the Fleet port serves nothing but the Fleet API,
    the Control port nothing but the Control API, and a site registers and connects through the proxy."""
    d = deployment
    fleet, control = procs.free_port(), procs.free_port()
    conf = (DEPLOY / "proxy" / "nginx.conf").read_text()
    conf = (conf.replace("/etc/privet/tls/", f"{d['pki'].dir}/").replace("/tmp/nginx", f"{tmp_path}/nginx")
            .replace("127.0.0.1:9091", d["link"].address)
            .replace("listen 9092", f"listen 127.0.0.1:{fleet}")
            .replace("listen 9093", f"listen 127.0.0.1:{control}"))
    assert str(fleet) in conf and str(control) in conf and d["link"].address in conf
    (tmp_path / "nginx.conf").write_text(conf)
    proxy = d["procs"].start("nginx", ["nginx", "-e", "stderr", "-c", tmp_path / "nginx.conf", "-g", "daemon off;"],
                             procs.flower_env(tmp_path / "nginx-home"), cwd=tmp_path)
    context = ssl.create_default_context(cafile=str(d["pki"].ca_cert))

    def status(port: int, path: str) -> int:
        request = urllib.request.Request(f"https://localhost:{port}{path}", data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    deadline = time.monotonic() + 20
    while True:
        try:
            status(fleet, "/")
            status(control, "/")
            break
        except (urllib.error.URLError, ConnectionError):
            assert proxy.alive() and time.monotonic() < deadline, proxy.tail()
            time.sleep(0.1)
    for path in ("/v1/control/list-nodes", "/v1/control/register-node", "/v1/runtime/acquire-task",
                 "/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/list-nodes",
                 "/v1/fleet/get-run?x=1", "/docs", "/health"):
        assert status(fleet, path) == 404, path
    for path in ("/v1/fleet/register-node", "/v1/runtime/acquire-task", "/docs"):
        assert status(control, path) == 404, path
    # These reach the SuperLink: an empty body is no valid protobuf request, but it is not the proxy's 404.
    assert status(fleet, "/v1/fleet/get-run") != 404
    assert status(control, "/v1/control/list-nodes") != 404

    home = tmp_path / "coordinator-home"
    connection = procs.write_flower_config(home, f"127.0.0.1:{control}", name="proxied",
                                           root_certificates=d["pki"].ca_cert)
    private, public = d["keys"]["site-3"]
    node_id = procs.register_supernode(public, connection, procs.flower_env(home))
    procs.start_supernode(d["procs"], "supernode-site-3-proxied", f"127.0.0.1:{fleet}",
                          procs.flower_env(tmp_path / "site-3"), private_key=private, ca_cert=d["pki"].ca_cert)
    procs.wait_for_supernode(d["link"], node_id, timeout=60)
    assert _nodes(d)[node_id] == "online"
    assert "/v1/fleet/activate-node" in proxy.output()
