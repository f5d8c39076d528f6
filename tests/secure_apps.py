"""Test-only Flower apps for secure aggregation: one ClientApp and one ServerApp, so one Ray start serves all tests.

The ClientApp is built like Privet's (message API, ``@app.train(mods=[secure_train_mod])``) and
has two training paths. The numpy path "trains" by adding a fixed, seeded delta to a tiny
adapter, so every site's update is known, and `SCENARIOS` makes chosen sites fail at a chosen
SecAgg+ stage of a chosen round. The privet path (config ``test-path=privet``) is the real
Privet train function (tiny BERT, DP-SGD, privacy ledger) plus a test-only spy that writes each
site's update to disk before SecAgg+ masks it.

The ServerApp runs, per round of `SCENARIOS`, a plain message-API round and a secure round on
the same global adapter, then one secure round with the real model, and leaves everything in
`RESULTS` (the ServerApp runs in the test's process).
"""

from __future__ import annotations

import importlib
import time
import zlib
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg

from client.secure import secure_train_mod
from server.secure import SecureAggregation

SHAPES = {"layer.lora_A.weight": (4, 16), "layer.lora_B.weight": (16, 4), "classifier.weight": (3, 16)}
# Scenario per round: (name, {partition: stage at which that site raises}, {partitions that decline}).
SCENARIOS = [
    ("all", {}, set()),
    ("drop-while-training", {3: "collect_masked_vectors"}, set()),
    ("drop-at-unmask", {1: "unmask"}, set()),
    ("drop-before-sharing-keys", {2: "share_keys"}, set()),
    ("decline", {}, {0}),
    ("two-drop", {2: "collect_masked_vectors", 3: "collect_masked_vectors"}, set()),
    ("all-decline", {}, {0, 1, 2, 3}),
    ("inflated-weight", {}, set()),
    ("unclipped", {}, set()),
]
# Rounds in which one rogue site runs SecAgg+ with a max weight of its own, a quarter of the server's: its masked
# vector then carries weight 4 where every other site's carries 1.
ROGUE_WEIGHT = {"inflated-weight": (2, 0.25)}
# Rounds in which one rogue site's own code skips SecAgg+'s clip: it adds 2Q to every quantized coordinate, which is
# 2 × (2 × clipping range) beyond anything a clipped delta can be.
UNCLIPPED = {"unclipped": 1}
RESULTS: dict = {}


def examples(partition: int) -> int:
    return 10 * (partition + 1)


def fake_delta(partition: int, server_round: int, key: str) -> np.ndarray:
    rng = np.random.default_rng([partition, server_round, zlib.crc32(key.encode())])
    return rng.normal(0.0, 0.05, SHAPES[key])


def _drop_mod(msg: Message, context: Context, call_next) -> Message:
    """Raise at the SecAgg+ stage `SCENARIOS` names for this site and round; inflate a rogue's weight."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        cfg = msg.content.config_records[RECORD_KEY_CONFIGS]
        stage = cfg[Key.STAGE]
        name, drops, _ = SCENARIOS[int(msg.metadata.group_id) - 1]
        partition = int(context.node_config["partition-id"])
        if drops.get(partition) == stage:
            raise RuntimeError(f"simulated site failure at stage {stage}")
        rogue, max_weight = ROGUE_WEIGHT.get(name, (None, None))
        if partition == rogue and stage == "setup":
            cfg[Key.MAX_WEIGHT] = max_weight
        if UNCLIPPED.get(name) == partition and stage == "collect_masked_vectors":
            return _unclipped(msg, context, call_next)
    return call_next(msg, context)


def _unclipped(msg: Message, context: Context, call_next) -> Message:
    # The module, not the function of the same name its package exports.
    flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    quantize = flower_mod.quantize

    def beyond(parameters, clipping_range, target_range):
        return [q + 2 * target_range for q in quantize(parameters, clipping_range, target_range)]

    flower_mod.quantize = beyond
    try:
        return call_next(msg, context)
    finally:
        flower_mod.quantize = quantize


def _spy_mod(msg: Message, context: Context, call_next) -> Message:
    """Test-only: write the site's update to disk before SecAgg+ masks it, so the test can check the sum."""
    reply = call_next(msg, context)
    spy = msg.content["config"].get("test-spy-dir") if "config" in msg.content.config_records else None
    if spy and not reply.has_error() and "arrays" in reply.content.array_records:
        site = reply.content["site"]["site-id"]
        server_round = int(msg.content["config"]["server-round"])
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        np.savez(Path(str(spy)) / f"{site}-round{server_round}.npz",
                 examples=int(reply.content["metrics"]["num-examples"]), **arrays)
    return reply


client_app = ClientApp()


@client_app.train(mods=[_drop_mod, secure_train_mod, _spy_mod])
def train(msg: Message, context: Context) -> Message:
    if msg.content["config"].get("test-path") == "privet":
        from client import app as real  # noqa: PLC0415 (imported in the site's process only)

        return real.train(msg, context)
    return numpy_train(msg, context)


def numpy_train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    site = f"site-{partition}"
    if partition in SCENARIOS[server_round - 1][2]:
        decline = ConfigRecord({"reason": f"{site} has spent its ε", "site-id": site})
        return Message(RecordDict({"decline": decline}), reply_to=msg)
    arrays = msg.content["arrays"]
    new = {
        key: (arrays[key].numpy() + fake_delta(partition, server_round, key)).astype(np.float32) for key in SHAPES
    }
    metrics = MetricRecord({"num-examples": examples(partition), "steps": 3})
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}), "metrics": metrics,
         "site": ConfigRecord({"site-id": site})}
    )
    return Message(content, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    numpy_rounds(grid)
    privet_round(grid, context)


def numpy_rounds(grid: Grid) -> None:
    rng = np.random.default_rng(0)
    arrays = ArrayRecord({k: Array(rng.normal(0, 0.5, s).astype(np.float32)) for k, s in SHAPES.items()})
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=4, min_available_nodes=4)
    secure = SecureAggregation(timeout=120)
    adam = FedAdam(fraction_train=1.0, min_train_nodes=4, min_available_nodes=4, eta=0.1)
    rounds = []
    for server_round, (name, _, _) in enumerate(SCENARIOS, 1):
        started = time.perf_counter()
        plain = list(grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid)))
        plain_seconds = time.perf_counter() - started
        updates = {
            str(msg.content["site"]["site-id"]): (
                {k: msg.content["arrays"][k].numpy() for k in SHAPES}, int(msg.content["metrics"]["num-examples"])
            )
            for msg in plain
            if not msg.has_error() and "decline" not in msg.content
        }
        outcome = secure.exchange(grid, strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))
        record = {
            "name": name,
            "global": {k: arrays[k].numpy().copy() for k in SHAPES},
            "updates": updates,
            "outcome": outcome,
            "screened": outcome.screened(),
            "plain_seconds": plain_seconds,
        }
        if outcome.arrays is not None:
            # The aggregate handed to message-API strategies, as server/app.py does.
            fedavg, _ = strategy.aggregate_train(server_round, [outcome.reply()])
            adam.configure_train(server_round, arrays, ConfigRecord({}), grid)
            fedadam, _ = adam.aggregate_train(server_round, [outcome.reply()])
            record["fedavg"] = {k: fedavg[k].numpy() for k in SHAPES}
            record["fedadam"] = {k: fedadam[k].numpy() for k in SHAPES}
            arrays = outcome.arrays
        rounds.append(record)
    RESULTS["numpy"] = rounds


def privet_round(grid: Grid, context: Context) -> None:
    from common import adapters  # noqa: PLC0415
    from common.config import RunConfig  # noqa: PLC0415
    from common.model import build_model  # noqa: PLC0415
    from common.task import label_names  # noqa: PLC0415

    config = RunConfig.from_mapping(context.run_config)
    model = build_model(config.model, len(label_names(config)), lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                        ffa=config.aggregation == "ffa-lora", seed=config.seed)
    arrays = adapters.to_record(adapters.trainable_state(model))
    spy = Path(config.runs_dir) / "spy"
    spy.mkdir(parents=True, exist_ok=True)
    message_config = {"run-name": config.run_name, "runs-dir": config.runs_dir,
                      "frozen-a": adapters.frozen_fingerprint(model), "test-spy-dir": str(spy),
                      "test-path": "privet"}
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=4, min_available_nodes=4)
    secure = SecureAggregation(timeout=300)
    rounds = []
    for server_round in range(1, config.num_server_rounds + 1):
        before = {k: arrays[k].numpy().copy() for k in arrays}
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(message_config), grid)
        outcome = secure.exchange(grid, messages)
        rounds.append({"global": before, "outcome": outcome})
        if outcome.arrays is not None:
            arrays, _ = strategy.aggregate_train(server_round, [outcome.reply()])
    RESULTS["privet"] = rounds
