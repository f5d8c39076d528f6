"""The Flower ClientApp a site runs: train the adapter locally with DP-SGD, or evaluate it, and reply.

Only the adapter's trainable tensors and aggregate metrics leave the site. A site that will
not or cannot take part replies with a ``decline`` record naming the reason, which never
contains its data.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import common.offline  # noqa: F401  (before flwr: no telemetry, update check or code install)

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.policy import Declined, PolicyError
from client.secure import secure_train_mod
from client.site import check_policy, shared_model, site_terms, site_tensors
from common import adapters, privacy
from common.task import label_names
from common.config import ConfigError, RunConfig
from common.data import DataError
from common.metrics import classification_metrics
from common.model import ModelError, pick_device
from common.train import DPSettings, predict, train_round

log = logging.getLogger("flwr.privet.site")

app = ClientApp()


class _Context:
    """What both handlers derive from a message before doing any work."""

    def __init__(self, msg: Message, context: Context):
        self.config = RunConfig.from_mapping(context.run_config)
        server = msg.content["config"]
        self.run_name = str(server["run-name"])
        self.server_round = int(server["server-round"])
        self.terms = site_terms(self.config, context.node_config, Path(str(server["runs-dir"])) / self.run_name)
        partition = None
        if self.terms.policy is None:
            partition = (int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
        self.partition = partition

    def prepare(self, msg: Message) -> None:
        """Check the site's policy, then load the global adapter into this process' shared model."""
        check_policy(self.terms, self.config, self.server_round)
        config = self.config
        self.model = shared_model(
            config.model, len(label_names(config)), config.lora_r, config.lora_alpha,
            config.aggregation == "ffa-lora", config.seed,
        )
        expected_a = str(msg.content["config"].get("frozen-a", ""))
        if expected_a and expected_a != adapters.frozen_fingerprint(self.model):
            raise Declined("this site's frozen LoRA A differs from the server's; check model, lora-r and seed")
        adapters.load_state(self.model, adapters.from_record(msg.content["arrays"], adapters.expected_spec(self.model)))


def _reply(msg: Message, handler, context: Context) -> Message:
    """Run a handler; turn a refusal or failure into a ``decline`` reply that carries no site data."""
    site = "site"
    try:
        ctx = _Context(msg, context)
        site = ctx.terms.site_id
        ctx.prepare(msg)
        return Message(handler(ctx), reply_to=msg)
    except (Declined, PolicyError, ConfigError, ModelError, privacy.PrivacyError, adapters.UpdateError) as err:
        reason = str(err)
        log.warning("%s declines: %s", site, reason)
    except DataError as err:
        # The data error names files and rows: it stays in the site's log, not in the reply.
        log.error("%s cannot use its data: %s", site, err)
        reason = f"{site} cannot use its data (details in the site's log)"
    except Exception:
        log.exception("%s failed", site)
        reason = f"{site} failed with an internal error (details in the site's log)"
    content = RecordDict({"decline": ConfigRecord({"reason": reason}), "site": ConfigRecord({"site-id": site})})
    return Message(content, reply_to=msg)


def _train(ctx: _Context) -> RecordDict:
    config, terms = ctx.config, ctx.terms
    train_data, _ = site_tensors(terms, config, ctx.partition)
    ledger = privacy.Ledger.open(terms.ledger_path, delta=terms.delta, accountant=config.accountant, site=terms.site_id)
    sample_rate, steps_per_epoch = privacy.poisson_schedule(len(train_data), config.batch_size)
    steps = config.local_epochs * steps_per_epoch
    dp = None
    entry = None
    if config.dp:
        dp = DPSettings(_noise_for_run(ctx, ledger, sample_rate, steps), config.max_grad_norm)
        entry = (dp.noise_multiplier, sample_rate, steps)
        next_epsilon = ledger.epsilon_with(entry)
        if next_epsilon > terms.epsilon_cap:
            raise Declined(
                f"{terms.site_id} has spent ε={ledger.epsilon:.3f}; this round would reach ε={next_epsilon:.3f}, "
                f"over its cap of {terms.epsilon_cap}"
            )
    # The round is on the ledger before any gradient is computed: a crash can over-count ε, never under-count.
    epsilon = ledger.record_round(ctx.run_name, ctx.server_round, entry)
    result = train_round(
        ctx.model,
        train_data,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        dp=dp,
        seed=config.seed + ctx.server_round * 1_000 + zlib.crc32(terms.site_id.encode()) % 1_000,
        device=pick_device(),
        expected_steps=steps if dp else None,
        progress=f"{terms.site_id} round {ctx.server_round}",
        proximal_mu=config.proximal_mu if config.aggregation == "fedprox" else 0.0,
    )
    metrics = {"num-examples": result.examples, "loss": result.loss, "steps": result.steps}
    if config.dp:
        metrics["epsilon"] = epsilon
    log.info("%s round %d: loss %.4f, ε so far %.3f", terms.site_id, ctx.server_round, result.loss, epsilon)
    return RecordDict(
        {
            "arrays": adapters.to_record(adapters.trainable_state(ctx.model)),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site-id": terms.site_id}),
        }
    )


def _noise_for_run(ctx: _Context, ledger: privacy.Ledger, sample_rate: float, steps: int) -> float:
    """The noise multiplier for this run, calibrated once for all its planned rounds and kept in the ledger."""
    saved = ledger.calibrations.get(ctx.run_name)
    if saved and saved["sample_rate"] == sample_rate and saved["steps_per_round"] == steps:
        return saved["noise_multiplier"]
    terms, config = ctx.terms, ctx.config
    rounds_left = min(config.num_server_rounds, terms.max_rounds) - ctx.server_round + 1
    target = min(config.target_epsilon, terms.epsilon_cap)
    sigma = privacy.calibrate_noise(
        target, terms.delta, sample_rate, rounds_left * steps, prior=ledger.history, accountant=config.accountant
    )
    ledger.calibrations[ctx.run_name] = {
        "noise_multiplier": sigma,
        "sample_rate": sample_rate,
        "steps_per_round": steps,
        "planned_rounds": rounds_left,
        "target_epsilon": target,
    }
    log.info("%s: noise multiplier %.4f for ε=%s over %d rounds", terms.site_id, sigma, target, rounds_left)
    return sigma


def _evaluate(ctx: _Context) -> RecordDict:
    _, val_data = site_tensors(ctx.terms, ctx.config, ctx.partition)
    loss, predictions = predict(ctx.model, val_data, device=pick_device())
    scores = classification_metrics(val_data.labels.numpy(), predictions, len(label_names(ctx.config)))
    return RecordDict(
        {
            "metrics": MetricRecord({"num-examples": len(val_data), "loss": loss, **scores}),
            "site": ConfigRecord({"site-id": ctx.terms.site_id}),
        }
    )


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter on this site's data under DP-SGD and return the new trainable tensors."""
    return _reply(msg, _train, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global adapter on this site's validation split."""
    return _reply(msg, _evaluate, context)
