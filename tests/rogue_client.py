"""A ClientApp with one rogue site (partition 0) that sends a different kind of bad reply every round, while the
honest sites record exactly what they sent, so a test can recompute the aggregate of the honest replies alone."""

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from client import app as real

# Round r's bad reply is KINDS[r - 1]; round 1's binds the rogue node to its own site id, so round 8 can impersonate.
KINDS = ("scaled 1000x", "NaN", "wrong shape", "wrong dtype", "extra key", "missing key", "inflated count",
         "impersonation", "non-finite metric", "replayed round")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    if int(context.node_config["partition-id"]) != 0:
        arrays = {key: value.numpy() for key, value in reply.content["arrays"].items()}
        spy = Path(str(msg.content["config"]["runs-dir"])) / "spy"
        spy.mkdir(exist_ok=True)
        site = reply.content["site"]["site-id"]
        np.savez(spy / f"{site}-round{server_round}.npz", examples=reply.content["metrics"]["num-examples"], **arrays)
        return reply
    _misbehave(reply, msg, KINDS[server_round - 1])
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = real.evaluate(msg, context)
    if int(context.node_config["partition-id"]) == 0 and "metrics" in reply.content.metric_records:
        reply.content["metrics"]["accuracy"] = 1.5  # an out-of-range score, every round
    return reply


def _misbehave(reply: Message, msg: Message, kind: str) -> None:
    content = reply.content
    arrays = {key: value.numpy() for key, value in content["arrays"].items()}
    first = sorted(arrays)[0]
    metrics = content["metrics"]
    if kind == "scaled 1000x":
        start = {key: value.numpy() for key, value in msg.content["arrays"].items()}
        arrays = {key: start[key] + 1000 * (value - start[key]) for key, value in arrays.items()}
    elif kind == "NaN":
        arrays[first] = arrays[first].copy()
        arrays[first].flat[0] = np.nan
    elif kind == "wrong shape":
        arrays[first] = np.zeros((1, 1), np.float32)
    elif kind == "wrong dtype":
        arrays = {key: value.astype(np.float64) for key, value in arrays.items()}
    elif kind == "extra key":
        arrays["rogue.extra"] = np.zeros(3, np.float32)
    elif kind == "missing key":
        arrays.pop(first)
    elif kind == "inflated count":
        metrics["num-examples"] = 10**9
    elif kind == "impersonation":
        content["site"] = ConfigRecord({"site-id": "site-1"})
    elif kind == "non-finite metric":
        metrics["epsilon"] = float("inf")
    elif kind == "replayed round":
        metrics["server-round"] = metrics["server-round"] - 1
    content["arrays"] = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})
    content["metrics"] = MetricRecord(dict(metrics))
