"""A real 2-site, 2-round federation through Flower's simulation engine, with the tiny model."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant
from peft import PeftModel

from common.model import build_base_model
from server.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]

LABELS = ["card", "loan", "mortgage"]
WORDS = {"card": "card fee charge fraud", "loan": "loan student debt interest", "mortgage": "mortgage payment late"}


def write_site_data(path, n=120, seed=0):
    rng = random.Random(seed)
    rows = ["text,product"]
    for _ in range(n):
        label = rng.choice(LABELS)
        words = WORDS[label].split() + "the my bank account was not".split()
        rows.append(" ".join(rng.choice(words) for _ in range(8)) + f",{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 2-site, 2-round run through `python -m privet simulate`, with everything it printed kept in a log."""
    tmp = tmp_path_factory.mktemp("sim")
    data = write_site_data(tmp / "sites.csv")
    overrides = (
        f"dataset='{data}' text-column='text' label-column='product' model='{tiny_model_dir}' num-server-rounds=2 "
        f"runs-dir='{tmp / 'runs'}' run-name='tiny' batch-size=8 max-length=16 max-examples-per-site=0 "
        "target-epsilon=4.0 learning-rate=0.02"
    )
    log = tmp / "simulation.log"
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "privet", "simulate", "--sites", "2", "--cpus-per-site", "1",
                        "--run-config", overrides], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True,
                       timeout=600)
    return tmp / "runs" / "tiny", tiny_model_dir


def test_metrics_log_has_one_row_per_round_with_every_site(finished_run):
    run, _ = finished_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
        assert {site["site"] for site in row["sites"]} == {"site-0", "site-1"}
        for site in row["sites"]:
            assert site["examples"] > 0 and "loss" not in site  # the training loss never leaves a site
            assert 0.0 <= site["accuracy"] <= 1.0 and 0.0 <= site["macro_f1"] <= 1.0
            assert 0 < site["epsilon"] <= 4.0


def test_round_and_final_adapters_load_with_peft(finished_run):
    run, model_dir = finished_run
    for name in ("round-1", "round-2", "final"):
        info = json.loads((run / name / "privet.json").read_text())
        assert info["labels"] == LABELS
        model = PeftModel.from_pretrained(build_base_model(str(model_dir), len(LABELS), seed=42), run / name)
        assert any("lora_B" in n for n, _ in model.named_parameters())


def test_each_site_ledger_recomputes_to_the_reported_epsilon(finished_run):
    run, _ = finished_run
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for site in last["sites"]:
        ledger = json.loads((run / "sites" / site["site"] / "ledger.json").read_text())
        accountant = create_accountant(mechanism=ledger["accountant"])
        accountant.history = [tuple(entry) for entry in ledger["history"]]
        recomputed = accountant.get_epsilon(delta=ledger["delta"])
        assert recomputed == pytest.approx(site["epsilon"], rel=1e-9)
        assert [(r["round"], r["kind"]) for r in ledger["rounds"]] == [
            (1, "count"), (1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]
        # Calibrated for the whole run, evaluations included: the last release lands at (not far under) the target.
        assert 4.0 - 0.05 <= recomputed <= 4.0


def test_no_text_or_per_example_label_in_anything_the_run_or_the_sites_wrote(finished_run):
    run, _ = finished_run
    rows = (run.parent.parent / "sites.csv").read_text().splitlines()[1:]
    texts = {line.rsplit(",", 1)[0] for line in rows}
    labels = [line.rsplit(",", 1)[1] for line in rows]
    written = [p for p in run.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert {"metrics.jsonl", "report.html", "report.md", "ledger.json"} <= {p.name for p in written}
    written.append(run.parent.parent / "simulation.log")
    everything = "\n".join(p.read_text(errors="ignore") for p in written)
    assert not [text for text in texts if text in everything]
    # A leak of labels would be a run of them in data order (as names or as indexes), in any common format.
    index = {name: i for i, name in enumerate(LABELS)}
    for start in range(0, len(labels) - 6, 6):
        window = labels[start:start + 6]
        for seq in (window, [str(index[name]) for name in window]):
            for sep in (",", ", ", " ", "\t", '", "', "', '"):
                assert sep.join(seq) not in everything


def test_round_completes_without_a_site_that_crashes_every_other_round(tiny_model_dir, tmp_path):
    data = write_site_data(tmp_path / "sites.csv")
    overrides = {
        "dataset": str(data), "text-column": "text", "label-column": "product", "model": str(tiny_model_dir),
        "num-server-rounds": 3, "runs-dir": str(tmp_path / "runs"), "run-name": "flaky", "batch-size": 8,
        "max-length": 16, "max-examples-per-site": 0, "min-sites": 2,
    }
    simulate(3, overrides, cpus_per_site=1, client_app="tests.flaky_client:app")
    rows = [json.loads(line) for line in (tmp_path / "runs" / "flaky" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert [row["aggregated_sites"] for row in rows] == [3, 2, 3]
    crashed = {s["site"]: s for s in rows[1]["sites"]}
    failed = [s for s in crashed.values() if s["status"] == "rejected"]
    assert len(failed) == 1 and failed[0]["reason"]


def test_central_dp_accounts_site_level_epsilon_and_keeps_the_run_going(tiny_model_dir, tmp_path):
    data = write_site_data(tmp_path / "sites.csv")
    overrides = {
        "dataset": str(data), "text-column": "text", "label-column": "product", "model": str(tiny_model_dir),
        "num-server-rounds": 2, "runs-dir": str(tmp_path / "runs"), "run-name": "central", "batch-size": 8,
        "max-length": 16, "max-examples-per-site": 0, "central-dp": True, "central-noise-multiplier": 2.0,
    }
    simulate(2, overrides, cpus_per_site=1)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "central" / "metrics.jsonl").read_text().splitlines()]
    epsilons = [row["central_dp"]["epsilon"] for row in rows]
    assert [row["central_dp"]["releases"] for row in rows] == [1, 2]
    assert 0 < epsilons[0] < epsilons[1]
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    accountant = RdpAccountant(PrivacyConfig(1e-5, 2, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION))
    accountant.load_state_dict(json.loads((tmp_path / "runs" / "central" / "central_dp.json").read_text()))
    assert accountant.get_privacy_spent().epsilon == pytest.approx(epsilons[-1])


def test_secure_aggregation_runs_through_the_privet_apps(tiny_model_dir, tmp_path):
    data = write_site_data(tmp_path / "sites.csv", n=180)
    overrides = {
        "dataset": str(data), "text-column": "text", "label-column": "product", "model": str(tiny_model_dir),
        "num-server-rounds": 2, "runs-dir": str(tmp_path / "runs"), "run-name": "secure", "batch-size": 8,
        "max-length": 16, "max-examples-per-site": 0, "min-sites": 3, "secure-aggregation": True,
    }
    simulate(3, overrides, cpus_per_site=1)
    run = tmp_path / "runs" / "secure"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["aggregated_sites"] for row in rows] == [3, 3]
    for row in rows:
        trained = [s for s in row["sites"] if s["status"] == "trained"]
        assert len(trained) == 3 and all(0 < s["epsilon"] <= 8.0 for s in trained)
    from safetensors.torch import load_file

    first, final = load_file(run / "round-1" / "adapter_model.safetensors"), load_file(run / "final" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], final[k]) for k in first)  # round 2's secure aggregate moved the adapter
