"""A 2-round Privet federation over real processes: a TLS SuperLink with node authentication and three SuperNodes,
each with its own policy, data and ledger. One site's policy forbids the model; the run completes without it."""

import json
from pathlib import Path

import pytest
from opacus.accountants import create_accountant
from peft import PeftModel

from common.model import build_base_model, weights_sha256
from tests import procs
from tests.test_simulation import LABELS, write_site_data

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def write_site(root: Path, site: str, allowed_model: str, seed: int) -> Path:
    home = root / site
    home.mkdir(parents=True)
    write_site_data(home / "notes.csv", n=64, seed=seed)
    policy = home / "policy.toml"
    policy.write_text(
        f'site-id = "{site}"\ndata-path = "notes.csv"\ntext-column = "text"\nlabel-column = "product"\n'
        f'epsilon-cap = 3.0\ndelta = 1e-5\nledger-path = "ledger/ledger.json"\n'
        f'allowed-models = ["{allowed_model}"]\nmax-rounds = 5\n'
    )
    return policy


def test_two_round_federation_over_tls_with_authenticated_sites(tiny_model_dir, tmp_path):
    model_hash = weights_sha256(str(tiny_model_dir))
    policies = {
        "site-1": write_site(tmp_path / "sites", "site-1", model_hash, seed=1),
        "site-2": write_site(tmp_path / "sites", "site-2", model_hash, seed=2),
        "site-3": write_site(tmp_path / "sites", "site-3", "0" * 64, seed=3),  # forbids the requested model
    }
    with procs.Processes(tmp_path / "logs") as registry:
        pki = procs.make_pki(tmp_path / "pki")
        link = procs.start_superlink(registry, pki, workdir=tmp_path / "server", env=procs.flower_env(tmp_path / "link-home"))
        env = procs.flower_env(tmp_path / "coordinator-home")
        connection = procs.write_flower_config(tmp_path / "coordinator-home", link)
        for site, policy in policies.items():
            private_key, public_key = procs.make_site_keys(tmp_path / "keys", site)
            node_id = procs.register_supernode(public_key, connection, env)
            procs.start_supernode(registry, site, link, procs.flower_env(tmp_path / f"{site}-home"),
                                  private_key=private_key, node_config={"policy": str(policy)})
            procs.wait_for_supernode(link, node_id)
        run_config = {
            "run-name": "deployed", "num-server-rounds": 2, "model": str(tiny_model_dir), "dataset": "site-data.csv",
            "text-column": "text", "label-column": "product", "labels": ",".join(LABELS), "batch-size": 8,
            "max-length": 16, "max-examples-per-site": 0, "min-sites": 2, "target-epsilon": 3.0,
        }
        run_id = procs.start_run(ROOT, connection, env, run_config=run_config)
        info = procs.wait_for_run(run_id, connection, env, timeout=480)
        assert info["status"] == "finished:completed", procs.run_logs(run_id, connection, env)

    run = tmp_path / "server" / "runs" / "deployed"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        status = {s["site"]: s for s in row["sites"]}
        assert status["site-1"]["status"] == status["site-2"]["status"] == "trained"
        assert status["site-3"]["status"] == "declined"
        assert "does not allow model" in status["site-3"]["reason"]
        assert row["aggregated_sites"] == 2 and row["global_source"] == "sites-weighted"
    PeftModel.from_pretrained(build_base_model(str(tiny_model_dir), len(LABELS), seed=42), run / "final")
    for site in ("site-1", "site-2"):
        ledger = json.loads((tmp_path / "sites" / site / "ledger" / "ledger.json").read_text())
        accountant = create_accountant(mechanism=ledger["accountant"])
        accountant.history = [tuple(e) for e in ledger["history"]]
        assert accountant.get_epsilon(delta=ledger["delta"]) == pytest.approx(rows[-1]["sites"][int(site[-1]) - 1]["epsilon"])
        assert [r["round"] for r in ledger["rounds"]] == [1, 2]
    assert not (tmp_path / "sites" / "site-3" / "ledger").exists()
