"""The site's side of secure aggregation (Flower's SecAgg+): only a masked, quantized update leaves the site.

Register :func:`secure_train_mod` on the ClientApp's train function::

    @app.train(mods=[secure_train_mod])
    def train(msg, context): ...

Plain train messages pass through untouched, so one ClientApp serves runs with and without
secure aggregation. A SecAgg+ message goes to Flower's ``secaggplus_mod``, which runs the
four protocol stages (setup, share keys, collect masked vectors, unmask) and keeps its keys in
``context.state``. Only in the third stage does it call the train function, through
:func:`_train_for_secagg`, which

* turns the legacy ``FitIns`` the SecAgg+ workflow sends into the ordinary Privet train
  message (``arrays`` with the adapter's key names, ``config``), so the site trains exactly as
  in a plain round: same policy checks, same DP-SGD, same privacy ledger;
* turns the reply into what SecAgg+ quantizes: the *delta* (new adapter − global adapter) in
  float64, with an optional L2 bound, each coordinate clipped to ±clipping range, and the
  fixed weight ``SITE_WEIGHT`` (1), never its example count: every site weighs the same, so a
  private count buys no influence. SecAgg+ itself multiplies the delta by weight/max-weight
  before quantizing and the server divides the sum by the summed weights, so the site must
  **not** pre-multiply; a server whose max weight is not ``SITE_WEIGHT`` gets a decline;
* sends a declining site (ε cap reached, policy refusal, bad data, any failure the train
  function turns into a ``decline``) through the protocol with weight 0 and a zero delta:
  it adds nothing to the sum, the round does not lose a share holder, and the reason reaches
  the server in the reply's plain-text metrics.

Clipping, bounding and quantizing an update that DP-SGD already produced is post-processing:
the site's ε is unchanged. Float64 matters: SecAgg+ multiplies by the weight ratio and
quantizes in the deltas' dtype, and near Q = 2^29 float32 values are 64 apart, so a float32
delta would lose six bits and the unbiasedness of stochastic rounding (the masked integers go
on the wire as int64 either way, so float64 costs nothing in transport).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.app.message import make_message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from common import secure_wire as wire

log = logging.getLogger("flwr.privet.site")



class SecureUpdateError(ValueError):
    """The train function's reply cannot become a SecAgg+ contribution."""


def secure_train_mod(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: run SecAgg+ for secure-aggregation messages, pass every other message through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda inner, ctx: _train_for_secagg(inner, ctx, call_next))


def _train_for_secagg(msg: Message, context: Context, train) -> Message:
    """Run the Privet train function on a SecAgg+ FitIns and reply with a FitRes carrying the clipped delta."""
    config = msg.content.config_records["fitins.config"]
    keys = [str(key) for key in config[wire.KEYS]]
    clipping_range = float(config[wire.CLIPPING_RANGE])
    max_weight = float(config[wire.MAX_WEIGHT])
    max_norm = float(config.get(wire.MAX_NORM, 0.0))
    legacy = compat.arrayrecord_to_parameters(msg.content.array_records["fitins.parameters"], keep_input=True)
    global_arrays = parameters_to_ndarrays(legacy)
    if len(global_arrays) != len(keys):
        raise SecureUpdateError(f"the server sent {len(global_arrays)} arrays but named {len(keys)}")
    if max_weight != wire.SITE_WEIGHT:
        # Refused before training: a round trained for an update that cannot be sent would spend ε for nothing.
        return _fitres_reply(msg, [np.zeros_like(a, dtype=np.float64) for a in global_arrays], 0,
                             {wire.DECLINE: _weight_refusal(max_weight)})
    request = RecordDict(
        {
            "arrays": ArrayRecord({key: Array(np.asarray(a)) for key, a in zip(keys, global_arrays)}),
            "config": ConfigRecord({k: v for k, v in config.items() if not k.startswith(wire.PREFIX)}),
        }
    )
    reply = train(make_message(msg.metadata, request), context)
    if reply.has_error():
        raise SecureUpdateError(f"the train function failed: {reply.error.reason}")
    content = reply.content
    site = _site_id(content)
    metrics: dict = {wire.SITE_ID: site} if site else {}
    if "decline" in content.config_records:
        reason = str(content["decline"].get("reason", "no reason given"))
        return _fitres_reply(msg, [np.zeros_like(a, dtype=np.float64) for a in global_arrays], 0,
                             {**metrics, wire.DECLINE: reason})
    try:
        delta, weight, extra = contribution(content, keys, global_arrays, clipping_range, max_weight, max_norm)
    except SecureUpdateError as err:
        # Like the server's screening in a plain round: a bad update is dropped with a reason, not summed.
        log.error("%s: update not sent to secure aggregation: %s", site or "site", err)
        return _fitres_reply(msg, [np.zeros_like(a, dtype=np.float64) for a in global_arrays], 0,
                             {**metrics, wire.DECLINE: f"update unusable for secure aggregation: {err}"})
    # How much was clipped or scaled says something about this site's update: it stays in the site's own log.
    if extra[wire.CLIPPED] or extra[wire.NORM_SCALE] < 1:
        log.warning(
            "%s: %d coordinate(s) of the update exceeded the secure-aggregation clipping range ±%g and were clipped; "
            "L2 scale %.3g", site or "site", extra[wire.CLIPPED], clipping_range, extra[wire.NORM_SCALE],
        )
    return _fitres_reply(msg, delta, weight, {**metrics, **_scalars(content)})


def contribution(
    content: RecordDict,
    keys: list[str],
    global_arrays: list[np.ndarray],
    clipping_range: float,
    max_weight: float,
    max_norm: float = 0.0,
) -> tuple[list[np.ndarray], int, dict]:
    """The clipped float64 delta, the fixed weight, and notes for the site's own log, from a Privet train reply."""
    if max_weight != wire.SITE_WEIGHT:
        # Any other max weight would scale this site's share of the sum away from everyone else's equal one.
        raise SecureUpdateError(_weight_refusal(max_weight))
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        raise SecureUpdateError("the reply has no 'arrays' or no 'metrics' record")
    record = content["arrays"]
    if list(record.keys()) != keys:
        raise SecureUpdateError("the reply's adapter keys differ from the global adapter's")
    delta = []
    for key, old in zip(keys, global_arrays):
        new = record[key].numpy()
        if new.shape != old.shape:
            raise SecureUpdateError(f"{key!r} has shape {new.shape}, expected {old.shape}")
        diff = new.astype(np.float64) - old.astype(np.float64)
        if not np.all(np.isfinite(diff)):
            raise SecureUpdateError(f"{key!r} holds NaN or infinite values")
        delta.append(diff)
    examples = content["metrics"].get("num-examples")
    if isinstance(examples, list) or examples is None or not float(examples).is_integer() or examples < 1:
        raise SecureUpdateError("num-examples must be a positive whole number")
    scale = 1.0
    if max_norm > 0:
        norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta))
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        delta = [d * scale for d in delta]
    clipped = int(sum(int(np.count_nonzero(np.abs(d) > clipping_range)) for d in delta))
    delta = [np.clip(d, -clipping_range, clipping_range) for d in delta]
    return delta, wire.SITE_WEIGHT, {wire.CLIPPED: clipped, wire.WEIGHT: wire.SITE_WEIGHT, wire.NORM_SCALE: scale}


def _fitres_reply(msg: Message, delta: list[np.ndarray], weight: int, metrics: dict) -> Message:
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(delta), int(weight), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _weight_refusal(max_weight: float) -> str:
    return f"the server set max weight {max_weight:g}, but every site weighs {wire.SITE_WEIGHT}"


def _site_id(content: RecordDict) -> str:
    if "site" in content.config_records:
        return str(content["site"].get("site-id", ""))
    if "decline" in content.config_records:
        return str(content["decline"].get("site-id", ""))
    return ""


def _scalars(content: RecordDict) -> dict:
    """The reply's metrics that a legacy FitRes can carry (scalars only)."""
    return {k: v for k, v in content["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
