"""Rogue sites that know the rules, on the bank demo: for each attack, the final accuracy with the attacker(s) and
without them (the same federation, the rogue sites absent).

Run: ``.venv/bin/python -m bench.rogue [--rounds 3] [--only scaled,reversed] [--repeats 1] [--plain]``.

The federation runs in this process, not through Flower's transport, so that the frozen encoder's features are
computed once for all runs: each site is the real ClientApp train function (policy checks, ledger, DP-SGD at the
run config's defaults), the server is the real screening and aggregation (``server.strategy``), and the final
adapter is scored on the bank test split, as ``privet simulate`` does. Site evaluations are skipped: they do not
touch the global adapter. ``--plain`` adds, per attack, the run with robust-aggregation=false (the plain mean).

Attacks (each rogue first trains honestly on its own data, then rewrites its reply):
  scaled    its update × 1000
  reversed  its update × −3.5: under the screen's 4× median bound
  targeted  its update plus one class's head bias raised by 3.5× its update's norm: every text leans to that class
  drifting  its update plus a fixed direction (a class's bias) that grows by half its update's norm each round
  colluding two of five sites send the same reversed update (the mean of their own, × −3.5)
  inflated  reversed, claiming num-examples=10000 (the default max-site-weight)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.supercore.task_identity import TaskIdentity

from bench.performance import ROOT
from client import app as site_app
from client.site import SIMULATION_ENV
from common import adapters
from common import task as tasks
from common.bounds import round_ceiling
from common.config import RunConfig
from common.metrics import classification_metrics
from common.model import HeadOnly, build_model
from common.train import FeatureData, features
from server.identity import SiteIdentities
from server.strategy import TRAIN_METRICS, Rules, make_strategy, screen

SCALE = 1000.0
REVERSE = 3.5  # under RELATIVE_NORM_BOUND (4): a rogue that read the README stays just inside the screen
TARGET_CLASS = 0
# attack -> (sites in the federation, rogue partitions)
ATTACKS = {"scaled": (4, (0,)), "reversed": (4, (0,)), "targeted": (4, (0,)), "drifting": (4, (0,)),
           "colluding": (5, (0, 1)), "inflated": (4, (0,))}


class LocalGrid:
    """The sites as a Flower Grid would reach them, in this process: node i is partition i - 1."""

    def __init__(self, run_config: dict, sites: int, rogues: tuple[int, ...], attack: str | None, absent: bool):
        self.run_config, self.sites, self.rogues, self.attack, self.absent = run_config, sites, rogues, attack, absent
        self.round = 0

    def get_node_ids(self):
        return list(range(1, self.sites + 1))

    def send_and_receive(self, messages, timeout=None):
        replies = {}
        for msg in messages:
            partition = msg.metadata.dst_node_id - 1
            if self.absent and partition in self.rogues:
                continue  # the honest-only federation: this site stays away
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, state=RecordDict(),
                              node_config={"partition-id": partition, "num-partitions": self.sites},
                              run_config=self.run_config)
            replies[partition] = site_app.train(msg, context)
        if not self.absent and self.attack:
            start = {key: value.numpy().astype(np.float64) for key, value in messages[0].content["arrays"].items()}
            self.round = int(messages[0].content["config"]["server-round"])
            attack(self.attack, self.round, start, [replies[p] for p in self.rogues if p in replies])
        return list(replies.values())


def _delta(reply: Message, start: dict) -> dict:
    return {key: value.numpy().astype(np.float64) - start[key] for key, value in reply.content["arrays"].items()}


def _norm(delta: dict) -> float:
    return float(np.sqrt(sum(np.sum(d * d) for d in delta.values())))


def _bias_key(keys) -> str:
    return next(key for key in keys if "classifier" in key and key.endswith("bias"))


def _send(reply: Message, start: dict, delta: dict) -> None:
    reply.content["arrays"] = ArrayRecord({key: Array((start[key] + d).astype(adapters.WIRE_DTYPE))
                                           for key, d in delta.items()})


def attack(kind: str, server_round: int, start: dict, rogue_replies: list[Message]) -> None:
    """Rewrite the rogue sites' replies in place."""
    rogue_replies = [r for r in rogue_replies if "arrays" in r.content.array_records]
    if not rogue_replies:
        return
    deltas = [_delta(r, start) for r in rogue_replies]
    for reply, delta in zip(rogue_replies, deltas):
        size = _norm(delta)
        bias = _bias_key(delta)
        if kind == "scaled":
            new = {k: SCALE * d for k, d in delta.items()}
        elif kind in ("reversed", "inflated"):
            new = {k: -REVERSE * d for k, d in delta.items()}
        elif kind == "colluding":
            new = {k: -REVERSE * np.mean([other[k] for other in deltas], axis=0) for k in delta}
        elif kind in ("targeted", "drifting"):
            push = REVERSE * size if kind == "targeted" else 0.5 * server_round * size
            new = dict(delta)
            new[bias] = delta[bias].copy()
            new[bias][TARGET_CLASS] += push
        else:
            raise ValueError(f"unknown attack {kind!r}; allowed: {', '.join(ATTACKS)}")
        _send(reply, start, new)
        if kind == "inflated":
            reply.content["metrics"]["num-examples"] = 10_000


def federation(run_config: dict, runs_dir: Path, sites: int, rogues: tuple[int, ...], attack_kind: str | None,
               absent: bool, test, plain: bool = False) -> dict:
    """One federation of `sites` sites over the run config's rounds; the final adapter's scores on the test split.

    `plain`: the server averages without robust aggregation (the sites' config stays as it is, so their cached
    features serve).
    """
    config = RunConfig.from_mapping(run_config)
    shutil.rmtree(runs_dir / config.run_name, ignore_errors=True)  # fresh ledgers, same paths (the feature cache)
    task = tasks.get(config)
    names = tasks.label_names(config)
    model = build_model(config.model, len(names), lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                        ffa=config.aggregation == "ffa-lora", seed=config.seed, head=task.head)
    spec = adapters.expected_spec(model)
    arrays = adapters.to_record(adapters.trainable_state(model))
    strategy = make_strategy(dataclasses.replace(config, robust_aggregation=config.robust_aggregation and not plain))
    identities = SiteIdentities()
    grid = LocalGrid(run_config, sites, rogues, attack_kind, absent)
    message_config = {"run-name": config.run_name, "runs-dir": str(runs_dir),
                      "frozen-a": adapters.frozen_fingerprint(model)}
    ceiling = config.max_update_norm or round_ceiling(config, spec)
    reference, per_round = None, []
    for server_round in range(1, config.num_server_rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(message_config), grid))
        replies = grid.send_and_receive(messages)
        rules = Rules(server_round=server_round, required_metrics=TRAIN_METRICS, max_weight=config.max_site_weight,
                      spec=spec, global_arrays=arrays, norm_ceiling=ceiling, reference_norm=reference)
        trained = screen(replies, rules, identities)
        reference = trained.median_norm() or reference
        if len(trained.accepted) >= config.min_sites:
            arrays, _ = strategy.aggregate_train(server_round, trained.accepted)
        per_round.append({"accepted": len(trained.accepted), "rejected": dict(trained.rejected),
                          "rule": strategy.last_rule})
    adapters.load_state(model, adapters.from_record(arrays, spec))
    with torch.no_grad():
        predictions = HeadOnly(model)(test.features).argmax(dim=-1)
    return {**classification_metrics(test.labels.numpy(), predictions.numpy(), len(names)), "rounds": per_round}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rogue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=RunConfig().num_server_rounds)
    parser.add_argument("--only", default=",".join(ATTACKS))
    parser.add_argument("--repeats", type=int, default=1, help="federations per figure (DP noise varies run to run)")
    parser.add_argument("--plain", action="store_true", help="also run each attack with robust-aggregation=false")
    parser.add_argument("--extra", default="", help="more run-config overrides, Flower's format")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "rogue.json")
    args = parser.parse_args(argv)
    from flwr.common.config import parse_config_args  # noqa: PLC0415

    os.environ[SIMULATION_ENV] = "1"
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    runs_dir = Path(tempfile.mkdtemp(prefix="privet-rogue-"))
    overrides = {**(parse_config_args([args.extra]) if args.extra.strip() else {}),
                 "num-server-rounds": args.rounds, "runs-dir": str(runs_dir), "run-name": "rogue"}
    base = get_fused_config_from_dir(ROOT, overrides)
    config = RunConfig.from_mapping(base)
    started = time.perf_counter()
    # The frozen encoder (head-only rounds never change it) sees the test split once for every run.
    model = build_model(config.model, len(tasks.label_names(config)), lora_r=config.lora_r,
                        lora_alpha=config.lora_alpha, ffa=config.aggregation == "ffa-lora", seed=config.seed,
                        head=tasks.get(config).head)
    if config.lora_rounds:
        raise SystemExit("bench.rogue scores on cached features: it needs lora-rounds=0 (the default recipe)")
    key = hashlib.sha256(repr((config.model, config.max_length, config.seed, config.dataset)).encode()).hexdigest()
    cache = runs_dir.parent / f"privet-rogue-test-features-{key[:16]}.pt"
    if cache.exists():  # the frozen encoder's view of the test split: a function of these four settings alone
        test = FeatureData(*torch.load(cache))
    else:
        test = features(model, tasks.central_test_set(config))
        torch.save((test.features, test.labels), cache)
    print(f"test split: {len(test)} examples, features in {time.perf_counter() - started:.0f}s", flush=True)

    def figure(sites, rogues, kind, absent, plain=False):
        runs = [federation(base, runs_dir, sites, rogues, kind, absent, test, plain) for _ in range(args.repeats)]
        return {"accuracy": float(np.mean([r["accuracy"] for r in runs])),
                "macro_f1": float(np.mean([r["macro_f1"] for r in runs])),
                "accuracy_each": [r["accuracy"] for r in runs], "rounds": runs[-1]["rounds"]}

    results, honest = {}, {}
    for kind in [a.strip() for a in args.only.split(",") if a.strip()]:
        sites, rogues = ATTACKS[kind]
        if (sites, rogues) not in honest:
            honest[(sites, rogues)] = figure(sites, rogues, None, absent=True)
            print(f"[honest-only, {sites - len(rogues)} of {sites} sites] {json.dumps(honest[(sites, rogues)])}",
                  flush=True)
        results[kind] = {"sites": sites, "rogues": len(rogues), "with": figure(sites, rogues, kind, absent=False),
                         "without": honest[(sites, rogues)]}
        if args.plain:
            results[kind]["with_plain_mean"] = figure(sites, rogues, kind, absent=False, plain=True)
        print(f"[{kind}] {json.dumps(results[kind]['with'])}", flush=True)
    shutil.rmtree(runs_dir, ignore_errors=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "repeats": args.repeats, "extra": args.extra,
                                    "results": results, "wall_s": time.perf_counter() - started}, indent=2))
    plain = " | with, plain mean" if args.plain else ""
    print(f"\n| attack | sites (rogue) | accuracy with the attacker | honest-only | gap{plain} |")
    print("|---|---|---|---|---|" + ("---|" if args.plain else ""))
    for kind, r in results.items():
        gap = r["with"]["accuracy"] - r["without"]["accuracy"]
        extra = f" | {r['with_plain_mean']['accuracy']:.3f}" if args.plain else ""
        print(f"| {kind} | {r['sites']} ({r['rogues']}) | {r['with']['accuracy']:.3f} | "
              f"{r['without']['accuracy']:.3f} | {gap:+.3f}{extra} |")
    print(f"\n{args.rounds} round(s), {args.repeats} federation(s) per figure; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
