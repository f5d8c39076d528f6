"""The Flower ClientApp a site runs: train the adapter locally with DP-SGD, or evaluate it with DP, and reply.

Only the adapter's trainable tensors and values inside the site's ε (or declared public by its
policy) leave the site. A site that will not or cannot take part replies with a ``decline``
record naming the reason, which never contains its data.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import common.offline  # noqa: F401  (before flwr: no telemetry, update check or code install)

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import accounting
from client.policy import Declined, PolicyError
from client.secure import secure_train_mod
from client.site import (checked_run_name, check_global, check_policy, round_inputs, shared_model, site_features,
                         site_label_names, site_tensors, site_terms)
from common import adapters, privacy
from common import task as tasks
from common.config import ConfigError, RunConfig
from common.data import DataError
from common.ledger import Ledger
from common.model import ModelError, check_max_length, pick_device
from common.train import predict, train_round

log = logging.getLogger("flwr.privet.site")

app = ClientApp()


class _Context:
    """What both handlers derive from a message before doing any work."""

    def __init__(self, msg: Message, context: Context):
        self.config = RunConfig.from_mapping(context.run_config)
        self.task = tasks.get(self.config)
        server = msg.content["config"]
        self.run_name = checked_run_name(str(server["run-name"]))
        self.server_round = int(server["server-round"])
        self.terms = site_terms(self.config, context.node_config, Path(str(server["runs-dir"])) / self.run_name)
        partition = None
        if self.terms.policy is None:
            partition = (int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
        self.partition = partition

    def prepare(self, msg: Message) -> None:
        """Check the site's policy and the server's model, then load the global adapter into the shared model.

        Everything here depends on public values and the server's own message only: no data is read yet.
        """
        check_policy(self.terms, self.config, self.server_round)
        config = self.config
        self.names = site_label_names(config, self.terms.policy)
        self.model, start = shared_model(
            config.model, config.task, len(self.names), config.lora_r, config.lora_alpha,
            config.aggregation == "ffa-lora", config.seed,
        )
        check_max_length(self.model, config.max_length)
        expected_a = str(msg.content["config"].get("frozen-a", ""))
        if expected_a and expected_a != adapters.frozen_fingerprint(self.model):
            raise Declined("this site's frozen LoRA A differs from the server's; check model, lora-r and seed")
        state = adapters.from_record(msg.content["arrays"], adapters.expected_spec(self.model))
        # A round trains the global of the rounds before it and evaluates the one it produced.
        is_train = msg.metadata.message_type == MessageType.TRAIN
        check_global(state, start, config, self.server_round - 1 if is_train else self.server_round)
        adapters.load_state(self.model, state)

    def data(self):
        return site_tensors(self.terms, self.config, self.names, self.partition)

    def features(self):
        return site_features(self.model, self.terms, self.config, self.names, self.partition)

    def ledger(self):
        return Ledger.locked(self.terms.ledger_path, delta=self.terms.delta, accountant=self.config.accountant,
                             site=self.terms.site_id)


def _reply(msg: Message, handler, context: Context) -> Message:
    """Run a handler; turn a refusal or failure into a ``decline`` reply that carries no site data."""
    site = "site"
    try:
        ctx = _Context(msg, context)
        site = ctx.terms.site_id
        ctx.prepare(msg)
        # Dropout and anything else drawn from PyTorch's global generators: secret, never the default or the run's seed.
        privacy.reseed_global_generators()
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
    train_data, _ = ctx.data()
    with ctx.ledger() as ledger:
        release = accounting.release_for_round(
            ledger, terms=terms, config=config, run=ctx.run_name, server_round=ctx.server_round,
            examples=len(train_data),
        )
    now = accounting.phase(config, ctx.server_round)
    runner, data, decay = round_inputs(ctx.model, config, ctx.server_round, train_data, ctx.features)
    result = train_round(
        runner,
        data,
        loss_fn=ctx.task.loss,
        epochs=now.epochs,
        batch_size=now.batch_size,
        learning_rate=now.learning_rate,
        dp=release.dp,
        device=pick_device(),
        progress=f"{terms.site_id} round {ctx.server_round}",
        proximal_mu=config.proximal_mu if config.aggregation == "fedprox" else 0.0,
        decay=decay,
    )
    if release.entry is not None and result.ran != [release.entry]:
        raise privacy.PrivacyError(
            f"Opacus ran {result.ran} but the ledger recorded {release.entry}; the update is withheld"
        )
    # The loss is unclipped and computed from the data: it stays in the site's own log.
    log.info("%s round %d: loss %.4f, ε so far %.3f", terms.site_id, ctx.server_round, result.loss, release.epsilon)
    metrics = {"num-examples": release.public_count, "steps": release.steps, "server-round": ctx.server_round}
    if config.dp:
        metrics["epsilon"] = release.epsilon
    return RecordDict(
        {
            "arrays": adapters.to_record(adapters.trainable_state(ctx.model)),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site-id": terms.site_id}),
        }
    )


def _evaluate(ctx: _Context) -> RecordDict:
    config, terms, task = ctx.config, ctx.terms, ctx.task
    if not terms.evaluate:
        raise Declined(f"site {terms.site_id} does not answer evaluation requests (its policy sets evaluate = false)")
    _, val_data = ctx.data()
    epsilon = None
    if config.dp:
        with ctx.ledger() as ledger:
            epsilon = accounting.charge_evaluation(
                ledger, terms=terms, config=config, run=ctx.run_name, server_round=ctx.server_round
            )
    predictions = predict(ctx.model, val_data, device=pick_device())
    # One row per example: a 1 (the count) and the task's additive counts; only their noisy sum leaves.
    rows = np.hstack([np.ones((len(val_data), 1)), task.counts(val_data.labels, predictions, ctx.names)])
    if config.dp:
        summed = privacy.gaussian_sum(rows, bound=math.sqrt(1 + task.count_bound**2),
                                      noise_multiplier=accounting.eval_noise(config, terms))
    else:
        summed = rows.sum(axis=0)
    metrics = {"num-examples": max(1, int(round(summed[0]))), "server-round": ctx.server_round,
               **task.scores(summed[1:], ctx.names)}
    if epsilon is not None:
        metrics["epsilon"] = epsilon
    return RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": terms.site_id})})


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter on this site's data under DP-SGD and return the new trainable tensors."""
    return _reply(msg, _train, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global adapter on this site's validation split, with DP noise charged to the site's ledger."""
    return _reply(msg, _evaluate, context)
