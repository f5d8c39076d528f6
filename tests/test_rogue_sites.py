"""One rogue site among honest ones, a different bad reply every round: each round's global adapter is exactly the
aggregate of the honest replies, and the rogue site is named with its reason (a simulated federation, tiny model)."""

import json

import numpy as np
import pytest
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from common import adapters
from common.model import build_model
from server.simulate import simulate
from tests.rogue_client import KINDS
from tests.test_simulation import LABELS, write_site_data

REASONS = {
    "scaled 1000x": "more than 4× the round's median",
    "NaN": "NaN or infinite",
    "wrong shape": "has shape (1, 1)",
    "wrong dtype": "dtype float64",
    "extra key": "unexpected key(s), first 'rogue.extra'",
    "missing key": "missing key(s)",
    "inflated count": "exceeds max-site-weight=10000",
    "impersonation": "but its reply names site-1",
    "non-finite metric": "metric epsilon is not a finite number",
    "replayed round": "the reply is for round 9, not round 10",
}


@pytest.fixture(scope="module")
def rogue_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rogue")
    data = write_site_data(tmp / "sites.csv", n=320)
    overrides = {
        "dataset": str(data), "text-column": "text", "label-column": "product", "model": str(tiny_model_dir),
        "num-server-rounds": len(KINDS), "runs-dir": str(tmp / "runs"), "run-name": "rogue", "batch-size": 8,
        "max-length": 16, "max-examples-per-site": 0, "target-epsilon": 8.0, "accountant": "rdp",
        "dirichlet-alpha": 100.0, "robust-aggregation": False,  # the plain mean shows exactly which replies went in
    }
    simulate(4, overrides, cpus_per_site=1, client_app="tests.rogue_client:app")
    return tmp / "runs", tiny_model_dir


def test_every_round_aggregates_exactly_the_honest_replies(rogue_run):
    runs, model_dir = rogue_run
    model = build_model(str(model_dir), len(LABELS), lora_r=8, lora_alpha=16, ffa=True, seed=42)
    for server_round in range(1, len(KINDS) + 1):
        sent = [np.load(path) for path in sorted((runs / "spy").glob(f"site-*-round{server_round}.npz"))]
        assert len(sent) == 3, server_round
        set_peft_model_state_dict(model, load_file(runs / "rogue" / f"round-{server_round}" / "adapter_model.safetensors"))
        for key, value in adapters.trainable_state(model).items():
            honest = sum(s[key].astype(np.float64) for s in sent) / len(sent)  # equal weights, whatever they claim
            torch.testing.assert_close(value, torch.from_numpy(honest).float(), atol=1e-6, rtol=1e-5,
                                       msg=f"round {server_round} ({KINDS[server_round - 1]}), {key}")


def test_the_rogue_site_is_named_with_its_reason_every_round(rogue_run):
    runs, _ = rogue_run
    rows = [json.loads(line) for line in (runs / "rogue" / "metrics.jsonl").read_text().splitlines()]
    for row, kind in zip(rows, KINDS):
        status = {s["site"]: s for s in row["sites"]}
        assert row["aggregated_sites"] == 3
        assert status["site-0"]["status"] == "rejected" and REASONS[kind] in status["site-0"]["reason"], kind
        assert all(status[f"site-{i}"]["status"] == "trained" for i in (1, 2, 3)), kind
        # Its evaluation (accuracy 1.5) never counts either.
        assert status["site-0"]["accuracy"] is None
