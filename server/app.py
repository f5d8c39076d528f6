"""The Flower ServerApp: run the rounds, screen and aggregate the sites' adapters, checkpoint every round."""

from __future__ import annotations

import json
import logging
import time

import common.offline  # noqa: F401  (before flwr: no telemetry, update check or code install)

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from common import adapters, task
from common.config import RunConfig
from common.files import write_json_atomic
from common.metrics import classification_metrics, per_class_report
from common.model import build_model, pick_device, weights_sha256
from common.train import predict
from server.checkpoint import RunDir, default_run_name
from server.secure import SecureAggregation
from server.report import print_summary, round_row
from server.run_report import write_report
from server.strategy import EVAL_METRICS, TRAIN_METRICS, make_strategy, screen

log = logging.getLogger("flwr.privet")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) a federation as the run config says and leave everything in ``runs/<run-name>/``."""
    config = RunConfig.from_mapping(context.run_config)
    run = RunDir(config.runs_dir, config.run_name or default_run_name())
    last_round = run.start(config.resume, config.to_mapping())
    log.info("Privet run %s in %s (starting at round %d)", run.name, run.path, last_round + 1)

    names = task.label_names(config)
    device = pick_device()
    model = build_model(
        config.model, len(names), lora_r=config.lora_r, lora_alpha=config.lora_alpha,
        ffa=config.aggregation == "ffa-lora", seed=config.seed, device=device,
    )
    info = {"labels": list(names), "model": config.model, "max_length": config.max_length, "seed": config.seed,
            "model_sha256": _model_hash(config.model), "head": "standardised mean-pooling + linear"}
    central_file = run.path / "central_dp.json"
    strategy = make_strategy(config, json.loads(central_file.read_text()) if last_round and central_file.exists() else None)
    if last_round:
        set_peft_model_state_dict(model, load_file(run.adapter_dir(last_round) / "adapter_model.safetensors"))
        saved = run.load_optimizer(last_round)
        strategy.load_optimizer_state(saved)
        if saved:
            log.info("FedAdam moments restored from round %d", last_round)
    spec = adapters.expected_spec(model)
    arrays = adapters.to_record(adapters.trainable_state(model))
    test_set = task.central_test_set(config, limit=config.eval_examples or None)
    secure = None
    if config.secure_aggregation:
        secure = SecureAggregation(timeout=config.round_timeout, max_weight=config.max_examples_per_site or None,
                                   min_sites=max(3, config.min_sites))
    message_config = {
        "run-name": run.name,
        "runs-dir": str(run.path.parent),
        "frozen-a": adapters.frozen_fingerprint(model),
    }

    known: dict[int, str] = {}  # node id -> site id, learnt from replies, to name sites that fall silent
    for server_round in range(last_round + 1, config.num_server_rounds + 1):
        started = time.time()
        log.info("[Privet round %d/%d]", server_round, config.num_server_rounds)
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(message_config), grid)
        if secure is not None:
            outcome = secure.exchange(grid, messages)
            trained = outcome.screened(known)
            to_aggregate = [outcome.reply()] if outcome.arrays is not None else []
        else:
            replies = _exchange(grid, messages, config, known)
            trained = screen(replies, spec=spec, required_metrics=TRAIN_METRICS, global_arrays=arrays,
                             max_update_norm=config.max_update_norm, max_examples=config.max_examples_per_site)
            trained.rejected.update(replies.silent)
            to_aggregate = trained.accepted
        known.update(trained.sites)
        if to_aggregate and len(trained.accepted) >= config.min_sites:
            arrays, _ = strategy.aggregate_train(server_round, to_aggregate)
            adapters.load_state(model, adapters.from_record(arrays, spec))
        else:
            failure = outcome.failure if secure is not None and outcome.failure else "too few usable updates"
            log.warning(
                "round %d: %s (%d usable, min-sites=%d); the global adapter is unchanged",
                server_round, failure, len(trained.accepted), config.min_sites,
            )
        replies = _exchange(
            grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord(message_config), grid), config, known
        )
        evaluated = screen(replies, spec=None, required_metrics=EVAL_METRICS)
        evaluated.rejected.update(replies.silent)
        central = _evaluate(model, test_set, len(names), device) if test_set is not None else None
        row = round_row(server_round, trained, evaluated, central, time.time() - started)
        central_privacy = strategy.central_privacy()
        if central_privacy is not None:
            write_json_atomic(central_file, central_privacy.pop("state"))
            row["central_dp"] = central_privacy
        run.save_adapter(model, server_round, info, strategy.optimizer_state())
        run.append_metrics(row)
        run.finish_round(server_round)
        log.info(
            "round %d: accuracy %s, macro-F1 %s (%s) | ε %s",
            server_round, _fmt(row["accuracy"]), _fmt(row["macro_f1"]), row["global_source"],
            ", ".join(f"{s['site']} {_fmt(s['epsilon'])}" for s in row["sites"]),
        )

    final_dir = run.save_adapter(model, None, info)
    full_test = task.central_test_set(config)
    if full_test is not None:
        _, predictions = predict(model, full_test, device=device)
        report = per_class_report(full_test.labels.numpy(), predictions, names)
        final = classification_metrics(full_test.labels.numpy(), predictions, len(names))
        final["test_examples"] = len(full_test)
        write_json_atomic(run.path / "final_evaluation.json", {**final, "per_class": report})
        log.info("final adapter on the full test split (%d examples): %s", len(full_test), final)
    log.info("final adapter saved to %s", final_dir)
    print_summary(run.read_metrics(), run.path)
    log.info("run report: %s (and %s)", *write_report(run.path))


class _Replies(list):
    """Replies, plus the sites that were asked but did not answer in time (site -> reason)."""

    silent: dict[str, str]


def _exchange(grid: Grid, messages, config: RunConfig, known: dict[int, str]) -> _Replies:
    """Send and wait up to round-timeout; note every asked node that gave no reply."""
    messages = list(messages)
    replies = _Replies(grid.send_and_receive(messages, timeout=config.round_timeout))
    answered = {msg.metadata.src_node_id for msg in replies}
    reason = f"no reply within round-timeout={config.round_timeout:g}s"
    replies.silent = {
        known.get(msg.metadata.dst_node_id, f"node-{msg.metadata.dst_node_id}"): reason
        for msg in messages
        if msg.metadata.dst_node_id not in answered
    }
    for site in replies.silent:
        log.warning("%s: %s", site, reason)
    return replies


def _evaluate(model, test_set, num_labels: int, device) -> dict[str, float]:
    loss, predictions = predict(model, test_set, device=device)
    return {"loss": loss, **classification_metrics(test_set.labels.numpy(), predictions, num_labels)}


def _model_hash(model: str) -> str | None:
    try:
        return weights_sha256(model)
    except ValueError:
        return None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"

