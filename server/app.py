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

from common import adapters
from common import task as tasks
from common.bounds import round_ceiling
from common.config import RunConfig
from common.files import write_json_atomic
from common.model import build_model, check_max_length, pick_device, weights_sha256
from common.train import predict
from server.checkpoint import RunDir, default_run_name
from server.identity import SiteIdentities, read_registry
from server.preflight import check_run
from server.report import print_summary, round_row
from server.run_report import write_report
from server.robust import MIN_ROBUST_SITES
from server.secure import SecureAggregation
from server.strategy import TRAIN_METRICS, Rules, Screened, eval_metrics, make_strategy, screen

log = logging.getLogger("flwr.privet")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) a federation as the run config says and leave everything in ``runs/<run-name>/``."""
    config = RunConfig.from_mapping(context.run_config)
    check_run(config)
    run = RunDir(config.runs_dir, config.run_name or default_run_name())
    # The generated name is stored as the run's name, so `resume=true run-name=<it>` finds the same config.
    saved = {**config.to_mapping(), "run-name": run.name}
    # Everything is checked (directory, model, data) before the directory is written: a failed start leaves
    # nothing behind that would block the same command once its input is fixed.
    last_round = run.check(config.resume, saved)
    federation = Federation(config, run, grid, last_round)
    run.start(config.resume, saved)
    log.info("Privet run %s in %s (starting at round %d)", run.name, run.path, last_round + 1)
    for server_round in range(last_round + 1, config.num_server_rounds + 1):
        federation.round(server_round)
    federation.finish()


class Federation:
    """The global adapter and everything that lives across rounds: strategy, site identities, screening state."""

    def __init__(self, config: RunConfig, run: RunDir, grid: Grid, last_round: int):
        self.config, self.run, self.grid = config, run, grid
        self.task = tasks.get(config)
        self.names = tasks.label_names(config)
        self.device = pick_device()
        self.model = build_model(
            config.model, len(self.names), lora_r=config.lora_r, lora_alpha=config.lora_alpha,
            ffa=config.aggregation == "ffa-lora", seed=config.seed, head=self.task.head, device=self.device,
        )
        check_max_length(self.model, config.max_length)
        self.info = {"task": self.task.name, "labels": list(self.names), "model": config.model,
                     "max_length": config.max_length, "seed": config.seed, "model_sha256": _model_hash(config.model),
                     "head": self.task.head.__name__}
        self.central_file = run.path / "central_dp.json"
        resumed_dp = json.loads(self.central_file.read_text()) if last_round and self.central_file.exists() else None
        self.strategy = make_strategy(config, resumed_dp)
        if last_round:
            set_peft_model_state_dict(self.model, load_file(run.adapter_dir(last_round) / "adapter_model.safetensors"))
            saved = run.load_optimizer(last_round)
            self.strategy.load_optimizer_state(saved)
            if saved:
                log.info("FedAdam moments restored from round %d", last_round)
        self.spec = adapters.expected_spec(self.model)
        self.arrays = adapters.to_record(adapters.trainable_state(self.model))
        self.test_set = tasks.central_test_set(config, limit=config.eval_examples or None)
        if config.site_registry:
            self.identities = SiteIdentities(read_registry(config.site_registry))
        else:
            self.identities = SiteIdentities()
            log.info("no site-registry: each node is bound to the first site id it names (fine for simulation; "
                     "a deployment should bind sites to their registered keys)")
        # A sound bound on an honest DP-SGD update's size, whatever the site's data (README: screening).
        self.ceiling = config.max_update_norm or round_ceiling(config, self.spec)
        self.reference_norm: float | None = None
        self.secure = None
        if config.secure_aggregation:
            self.secure = SecureAggregation(timeout=config.round_timeout, min_sites=max(3, config.min_sites),
                                            identities=self.identities)
            log.info("secure aggregation: the server sees no single update, so no robust step runs; each site "
                     "weighs 1 and clips its delta to ±%g", self.secure.clipping_range)
        if config.min_sites < MIN_ROBUST_SITES:
            log.warning("min-sites=%d: a round may aggregate fewer than %d sites, and with two nobody can tell a "
                        "rogue site from an honest one (robustness needs an honest majority of at least %d)",
                        config.min_sites, MIN_ROBUST_SITES, MIN_ROBUST_SITES)
        self.message_config = {"run-name": run.name, "runs-dir": str(run.path.parent),
                               "frozen-a": adapters.frozen_fingerprint(self.model)}

    def round(self, server_round: int) -> None:
        """Train, screen, aggregate, evaluate and checkpoint one round."""
        config, started = self.config, time.time()
        log.info("[Privet round %d/%d]", server_round, config.num_server_rounds)
        self.identities.learn_nodes(self.grid.get_nodes() if self.identities.registry is not None else ())
        messages = self.strategy.configure_train(server_round, self.arrays, ConfigRecord(self.message_config),
                                                 self.grid)
        trained, to_aggregate, failure = self._train(server_round, messages)
        rule = "none: the global adapter is unchanged"
        if to_aggregate and len(trained.accepted) >= config.min_sites:
            if self.secure is not None:
                self.arrays, _ = self.strategy.aggregate_secure(server_round, to_aggregate[0], len(trained.accepted))
            else:
                self.arrays, _ = self.strategy.aggregate_train(server_round, to_aggregate)
            rule = self.strategy.last_rule
            adapters.load_state(self.model, adapters.from_record(self.arrays, self.spec))
        else:
            log.warning("round %d: %s (%d usable, min-sites=%d); the global adapter is unchanged",
                        server_round, failure or "too few usable updates", len(trained.accepted), config.min_sites)
        messages = self.strategy.configure_evaluate(server_round, self.arrays, ConfigRecord(self.message_config),
                                                    self.grid)
        replies, silent = self._exchange(messages)
        rules = Rules(server_round=server_round, required_metrics=eval_metrics(self.task),
                      max_weight=config.max_site_weight, score_keys=self.task.score_keys)
        evaluated = screen(replies, rules, self.identities)
        evaluated.rejected.update(silent)
        central = self._central_scores() if self.test_set is not None else None
        row = round_row(self.task, server_round, trained, evaluated, central, time.time() - started)
        row["aggregation"] = rule
        central_privacy = self.strategy.central_privacy()
        if central_privacy is not None:
            write_json_atomic(self.central_file, central_privacy.pop("state"))
            row["central_dp"] = central_privacy
        self.run.save_adapter(self.model, server_round, self.info, self.strategy.optimizer_state())
        self.run.append_metrics(row)
        self.run.finish_round(server_round)
        log.info("round %d: %s (%s) | ε %s", server_round,
                 ", ".join(f"{key} {_fmt(row[key])}" for key in self.task.score_keys), row["global_source"],
                 ", ".join(f"{s['site']} {_fmt(s['epsilon'])}" for s in row["sites"]))

    def _train(self, server_round: int, messages) -> tuple[Screened, list, str | None]:
        """Send the training messages; return the screened replies, what to aggregate, and why nothing was."""
        if self.secure is not None:
            outcome = self.secure.exchange(self.grid, messages)
            trained = outcome.screened(self.identities.bound)
            return trained, [outcome.reply()] if outcome.arrays is not None else [], outcome.failure
        replies, silent = self._exchange(messages)
        rules = Rules(server_round=server_round, required_metrics=TRAIN_METRICS,
                      max_weight=self.config.max_site_weight, spec=self.spec, global_arrays=self.arrays,
                      norm_ceiling=self.ceiling, reference_norm=self.reference_norm)
        trained = screen(replies, rules, self.identities)
        trained.rejected.update(silent)
        self.reference_norm = trained.median_norm() or self.reference_norm
        return trained, trained.accepted, None

    def _exchange(self, messages) -> tuple[list, dict[str, str]]:
        """Send and wait up to round-timeout; the replies, and each asked node that gave none (site -> reason)."""
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.round_timeout))
        answered = {msg.metadata.src_node_id for msg in replies}
        reason = f"no reply within round-timeout={self.config.round_timeout:g}s"
        silent = {self.identities.name(msg.metadata.dst_node_id): reason
                  for msg in messages if msg.metadata.dst_node_id not in answered}
        for site in silent:
            log.warning("%s: %s", site, reason)
        return replies, silent

    def _central_scores(self) -> dict[str, float]:
        """The global adapter's exact scores on the server's own test set (public data: no noise needed)."""
        predictions = predict(self.model, self.test_set, device=self.device)
        return self.task.scores(self.task.counts(self.test_set.labels, predictions, self.names).sum(axis=0),
                                self.names)

    def finish(self) -> None:
        """Save the final adapter, score it on the full test set, print the summary and write the report."""
        final_dir = self.run.save_adapter(self.model, None, self.info)
        full_test = tasks.central_test_set(self.config)
        if full_test is not None:
            final = self.task.report(full_test.labels, predict(self.model, full_test, device=self.device), self.names)
            final["test_examples"] = len(full_test)
            write_json_atomic(self.run.path / "final_evaluation.json", final)
            log.info("final adapter on the full test set (%d examples): %s", len(full_test),
                     ", ".join(f"{key} {final[key]:.4f}" for key in self.task.score_keys))
        log.info("final adapter saved to %s", final_dir)
        print_summary(self.run.read_metrics(), self.run.path, self.task.score_keys)
        log.info("run report: %s (and %s)", *write_report(self.run.path))


def _model_hash(model: str) -> str | None:
    try:
        return weights_sha256(model)
    except ValueError:
        return None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
