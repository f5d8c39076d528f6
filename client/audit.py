"""An empirical privacy audit of a site's training in one run (Steinke, Nasr and Jagielski, "Privacy Auditing with
One (1) Training Run", NeurIPS 2023).

m of the site's training records become canaries with a wrong label, and each joins the training data on a secret
coin flip. The site's exact training path runs once, on a throwaway model and a copy of its ledger; the canaries
with the most extreme losses are then guessed in or out, and the right guesses give an ε that the training exceeds
at 95% confidence. A bound above the ε the ledger claims means the code did not keep its promise.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from client import accounting
from client.site import SiteTerms, check_policy, round_inputs, site_label_names, site_tensors, site_terms
from common import privacy
from common import task as tasks
from common.audit_bound import epsilon_lower_bound, max_epsilon_lower_bound
from common.config import RunConfig, parse_overrides
from common.files import write_json_atomic
from common.ledger import Ledger
from common.model import build_model, pick_device
from common.train import TensorData, features, train_round

AUDIT_FORMAT = "privet-audit/1"
AUDIT_FILE = "audit.json"
# The default audit size (README: the ceiling table); a smaller site gets all its records but a batch as canaries.
DEFAULT_CANARIES, DEFAULT_GUESSES = 1000, 100
# Not a valid run-name, so no real run in a copied ledger can lend the audit its calibration or its count.
AUDIT_RUN = "~audit"
VIOLATION = "VIOLATION"


class AuditError(ValueError):
    """The audit cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class AuditResult:
    """What one audit measured. `claimed_epsilon` is the ε of the audited run's own releases (None without DP)."""

    site: str
    data: str
    canaries: int
    canaries_included: int
    guesses: int
    right: int
    confidence: float
    delta: float
    epsilon_lower_bound: float
    epsilon_ceiling: float
    claimed_epsilon: float | None
    ledger_epsilon: float | None
    accountant: str
    verdict: str
    explanation: str
    training: dict
    wall_seconds: float

    def to_json(self) -> dict:
        return {"format": AUDIT_FORMAT, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "method": "Steinke, Nasr, Jagielski (NeurIPS 2023), one training run; membership score: canary loss",
                **asdict(self)}


def check_sizes(canaries: int, guesses: int, confidence: float) -> None:
    """Refuse sizes the method cannot use: r/2 guesses each way among m canaries, a confidence in (0, 1)."""
    if canaries < 2:
        raise AuditError(f"canaries={canaries}: need at least 2")
    if guesses < 2 or guesses % 2 or guesses > canaries:
        raise AuditError(f"guesses={guesses}: need an even number from 2 to canaries={canaries} (half in, half out)")
    if not 0 < confidence < 1:
        raise AuditError(f"confidence={confidence}: need a value in (0, 1), e.g. 0.95")


def split_canaries(data: TensorData, count: int, num_labels: int, rng: np.random.Generator):
    """Take `count` random records out of the training data as canaries, every label changed to a different random
    class; return the records left and the canaries.

    A canary must not train beside its own correctly labelled original, which would undo what it teaches. For token
    classification every labelled word gets a wrong tag; positions the loss skips stay skipped.
    """
    if num_labels < 2:
        raise AuditError("a canary needs a wrong label, and the label set has only one class")
    order = rng.permutation(len(data))
    canaries = data.subset(order[:count])
    labels = canaries.labels.clone()
    shift = torch.as_tensor(rng.integers(1, num_labels, size=tuple(labels.shape)), dtype=labels.dtype)
    labelled = labels != tasks.IGNORE
    labels[labelled] = (labels[labelled] + shift[labelled]) % num_labels
    return data.subset(np.sort(order[count:])), TensorData(canaries.input_ids, canaries.attention_mask, labels)


@torch.no_grad()
def canary_losses(model: torch.nn.Module, canaries: TensorData, task: tasks.Task, device, batch_size: int = 128):
    """Each canary's training loss under the model (the task's loss of that one record)."""
    model.eval()
    losses = []
    for start in range(0, len(canaries), batch_size):
        logits = model(canaries.input_ids[start:start + batch_size].to(device),
                       canaries.attention_mask[start:start + batch_size].to(device)).float().cpu()
        labels = canaries.labels[start:start + batch_size]
        losses.extend(task.loss(logits[i:i + 1], labels[i:i + 1]).item() for i in range(len(labels)))
    return np.array(losses)


def count_right(losses: np.ndarray, included: np.ndarray, guesses: int) -> int:
    """Guess "in" for the guesses/2 lowest losses and "out" for the guesses/2 highest; return how many are right."""
    order = np.argsort(losses, kind="stable")
    half = guesses // 2
    return int(included[order[:half]].sum() + (~included[order[len(order) - half:]]).sum())


def judge(bound: float, claimed: float | None, ceiling: float, guesses: int) -> tuple[str, str]:
    """The verdict and one sentence saying what it means."""
    if claimed is None:
        found = (f"the training leaks at least ε={bound:.2f} about a record" if bound > 0 else
                 "this audit proves no leak, which does not show there is none")
        return "no DP claim", f"dp=false promises nothing; {found}"
    if bound > claimed:
        return VIOLATION, (f"the training leaks at least ε={bound:.2f}, more than the ε={claimed:.2f} its ledger "
                           "claims: the code does not keep its privacy promise")
    if claimed >= ceiling:
        return "inconclusive at this size", (
            f"no violation seen, but the claimed ε={claimed:.2f} is at or above ε={ceiling:.2f}, the most this audit "
            f"can prove even with all {guesses} guesses right: only a larger audit could refute the claim")
    return "consistent", (f"the lower bound ε={bound:.2f} does not exceed the claimed ε={claimed:.2f}, which lies "
                          f"below ε={ceiling:.2f}, the most this audit can prove: a large enough leak would have shown")


def audit_site(
    config: RunConfig,
    terms: SiteTerms,
    partition: tuple[int, int] | None,
    *,
    canaries: int | None = None,
    guesses: int | None = None,
    confidence: float = 0.95,
    device: torch.device | str | None = None,
) -> AuditResult:
    """Audit one site: its training records and secret canaries, trained as the whole run would train it alone.

    The model is built afresh and the ledger is a copy in a temporary folder: the site's own model and ledger are
    never written. Rounds follow one another as if the site were the only one (each round's global adapter is the
    site's own), with the DP settings ``release_for_round`` decides from the run config, the policy and the ledger.
    `canaries` and `guesses` default to what fits the site (default_sizes).
    """
    started = time.monotonic()
    device = device or pick_device()
    task = tasks.get(config)
    # A site refuses these runs (dp=false, a model it does not allow), so it does not audit them either.
    check_policy(terms, config, 1)
    ledger = Ledger.read(terms.ledger_path, delta=terms.delta, accountant=config.accountant, site=terms.site_id)
    names = site_label_names(config, terms.policy)
    site_train, _ = site_tensors(terms, config, names, partition)
    keep = min(config.batch_size, config.head_batch_size)
    if len(site_train) < keep + 2:
        raise AuditError(f"the site has {len(site_train)} training records; an audit takes at least 2 canaries from "
                         f"them and keeps at least {keep} (a batch), so it needs at least {keep + 2}")
    canaries, guesses = default_sizes(len(site_train), keep, canaries, guesses)
    if len(site_train) - canaries < keep:
        raise AuditError(
            f"canaries={canaries} are taken from the site's {len(site_train)} training records and at least "
            f"{keep} (a batch) must stay; use at most {len(site_train) - keep} canaries"
        )
    check_sizes(canaries, guesses, confidence)
    # Which records become canaries, their wrong labels and the coin flips come from the OS entropy, never from the
    # run's public seed: guesses about flips anyone could predict would prove nothing.
    rest, canary_data = split_canaries(site_train, canaries, len(names), np.random.default_rng(secrets.randbits(128)))
    included = (torch.rand(canaries, generator=privacy.secret_generator()) < 0.5).numpy()
    chosen = torch.from_numpy(included)
    train = TensorData(torch.cat([rest.input_ids, canary_data.input_ids[chosen]]),
                       torch.cat([rest.attention_mask, canary_data.attention_mask[chosen]]),
                       torch.cat([rest.labels, canary_data.labels[chosen]]))
    model = build_model(
        config.model, len(names), lora_r=config.lora_r, lora_alpha=config.lora_alpha,
        ffa=config.aggregation == "ffa-lora", seed=config.seed, head=task.head, device=device,
    )
    rounds = min(config.num_server_rounds, terms.max_rounds)
    with tempfile.TemporaryDirectory(prefix="privet-audit-") as scratch:
        ledger.path = Path(scratch) / "ledger.json"
        for server_round in range(1, rounds + 1):
            release = accounting.release_for_round(
                ledger, terms=terms, config=config, run=AUDIT_RUN, server_round=server_round, examples=len(train),
            )
            now = accounting.phase(config, server_round)
            runner, data, decay = round_inputs(model, config, server_round, train,
                                               lambda: features(model, train, device=device))
            result = train_round(
                runner, data, loss_fn=task.loss, epochs=now.epochs, batch_size=now.batch_size,
                learning_rate=now.learning_rate, dp=release.dp, device=device, decay=decay,
                progress=f"audit round {server_round}/{rounds}",
                proximal_mu=config.proximal_mu if config.aggregation == "fedprox" else 0.0,
            )
            # The site's own check: it withholds an update whose training differs from what the ledger recorded.
            if release.entry is not None and result.ran != [release.entry]:
                raise privacy.PrivacyError(f"Opacus ran {result.ran} but the ledger recorded {release.entry}")
    right = count_right(canary_losses(model, canary_data, task, device), included, guesses)
    bound = epsilon_lower_bound(canaries, guesses, right, terms.delta, confidence)
    ceiling = max_epsilon_lower_bound(canaries, guesses, terms.delta, confidence)
    # The claim under test is what the audited run released (its count and training), not what the ledger held before.
    own = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in ledger.rounds if r["run"] == AUDIT_RUN]
    claimed = privacy.compute_epsilon(own, terms.delta, ledger.accountant)[0] if config.dp else None
    verdict, explanation = judge(bound, claimed, ceiling, guesses)
    return AuditResult(
        site=terms.site_id,
        data=str(terms.policy.data_path) if terms.policy else _simulated_source(config, partition),
        canaries=canaries,
        canaries_included=int(included.sum()),
        guesses=guesses,
        right=right,
        confidence=confidence,
        delta=terms.delta,
        epsilon_lower_bound=bound,
        epsilon_ceiling=ceiling,
        claimed_epsilon=claimed,
        ledger_epsilon=ledger.epsilon if math.isfinite(ledger.epsilon) else None,
        accountant=ledger.accountant,
        verdict=verdict,
        explanation=explanation,
        training={
            "model": config.model, "task": config.task, "dp": config.dp, "rounds": rounds,
            "lora_rounds": min(config.lora_rounds, rounds), "head_epochs": config.head_epochs,
            "head_batch_size": config.head_batch_size, "head_learning_rate": config.head_learning_rate,
            "local_epochs": config.local_epochs, "steps_per_round": release.steps, "batch_size": config.batch_size,
            "learning_rate": config.learning_rate, "max_grad_norm": config.max_grad_norm,
            "noise_multiplier": release.dp.noise_multiplier if release.dp else None,
            "sample_rate": release.dp.sample_rate if release.dp else None,
            "aggregation": config.aggregation, "lora_r": config.lora_r, "lora_alpha": config.lora_alpha,
            "seed": config.seed,
        },
        wall_seconds=round(time.monotonic() - started, 1),
    )


def default_sizes(records: int, keep: int, canaries: int | None, guesses: int | None) -> tuple[int, int]:
    """Canaries m and guesses r where not given: at most DEFAULT_CANARIES, leaving a batch (`keep`) of the site's
    records to train on; at most DEFAULT_GUESSES, and no more than m. Fixed from sizes alone, before any training."""
    if canaries is None:
        canaries = max(0, min(DEFAULT_CANARIES, records - keep))
    if guesses is None:
        guesses = min(DEFAULT_GUESSES, canaries - canaries % 2)
    return canaries, guesses


def _simulated_source(config: RunConfig, partition: tuple[int, int]) -> str:
    site, sites = partition
    return (f"dataset={config.dataset!r}, simulated site {site} of {sites} "
            f"(max-examples-per-site={config.max_examples_per_site})")


def audited_terms(config: RunConfig, policy: str | None, site: int, sites: int, scratch: Path):
    """The site's terms and data partition: from its policy, or those of simulated site `site` of `sites`."""
    if policy is not None:
        return site_terms(config, {"policy": policy}, scratch), None
    if not 0 <= site < sites:
        raise AuditError(f"--site {site} is not one of the {sites} simulated sites (0 to {sites - 1})")
    # A simulated site keeps its ledger under the run directory: here a scratch one, so it starts empty.
    return site_terms(config, {"simulated": True, "partition-id": site}, scratch), (site, sites)


def load_config(run_dir: Path | None, overrides: str) -> RunConfig:
    """The run config: a run directory's saved one (or the defaults), with Flower-format overrides on top."""
    base = {}
    if run_dir is not None:
        state = Path(run_dir) / "state.json"
        if not state.is_file():
            raise AuditError(f"{run_dir} is not a Privet run directory (no state.json)")
        base = json.loads(state.read_text(encoding="utf-8"))["config"]
    return RunConfig.from_mapping({**base, **parse_overrides(overrides)})


def write_audit(result: AuditResult, out_dir: str | Path) -> Path:
    """Write audit.json into `out_dir` (a run directory's report then shows it) and return its path."""
    path = Path(out_dir) / AUDIT_FILE
    write_json_atomic(path, result.to_json())
    return path


def format_result(result: AuditResult) -> str:
    """The audit as a few lines for a terminal."""
    claimed = "none (dp=false)" if result.claimed_epsilon is None else f"{result.claimed_epsilon:.3f}"
    return "\n".join([
        f"site {result.site}: {result.data}",
        f"canaries m={result.canaries} ({result.canaries_included} included), guesses r={result.guesses}, "
        f"right v={result.right}",
        f"ε lower bound {result.epsilon_lower_bound:.3f} at {result.confidence:.0%} confidence, δ={result.delta:g} "
        f"(the most m={result.canaries}, r={result.guesses} can show: {result.epsilon_ceiling:.3f}); "
        f"claimed ε {claimed}",
        f"verdict: {result.verdict}: {result.explanation}",
        f"wall time {result.wall_seconds:.1f} s",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``privet audit``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--policy", help="a site policy (policy.toml): audit that site's data, terms and ledger")
    source.add_argument("--site", type=int, default=0,
                        help="without --policy: audit simulated site SITE of --sites (default 0)")
    parser.add_argument("--sites", type=int, default=4, help="simulated sites the data set is split into (default 4)")
    parser.add_argument("--run-dir", type=Path,
                        help="take the run config from this run directory's state.json and write audit.json there")
    parser.add_argument("--run-config", default="",
                        help="overrides in Flower's format, e.g. \"dp=false num-server-rounds=5\"")
    parser.add_argument("--canaries", type=int, default=None,
                        help=f"canaries m, taken from the site's training records (default {DEFAULT_CANARIES}, or "
                        "fewer where the site has fewer records: all but a batch)")
    parser.add_argument("--guesses", type=int, default=None,
                        help=f"guesses r, half in and half out, fixed before the audit (default {DEFAULT_GUESSES}, "
                        "at most m)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the ε bound (default 0.95)")
    parser.add_argument("--out", type=Path,
                        help="directory for audit.json (default: --run-dir, else the current directory)")


def run(args: argparse.Namespace) -> int:
    """Audit, print the result and write audit.json; 0: no violation, 1: VIOLATION. A run that cannot be audited
    raises its user error (`privet audit` exits with 2)."""
    config = load_config(args.run_dir, args.run_config)
    # Sizes wrong whatever the site holds fail before its data loads; those that depend on it are checked there.
    check_sizes(DEFAULT_CANARIES if args.canaries is None else args.canaries,
                2 if args.guesses is None else args.guesses, args.confidence)
    with tempfile.TemporaryDirectory(prefix="privet-audit-") as scratch:
        terms, partition = audited_terms(config, args.policy, args.site, args.sites, Path(scratch))
        result = audit_site(config, terms, partition, canaries=args.canaries, guesses=args.guesses,
                            confidence=args.confidence)
    path = write_audit(result, output_dir(args))
    print(format_result(result))
    print(f"wrote {path}")
    return 1 if result.verdict == VIOLATION else 0


def output_dir(args: argparse.Namespace) -> Path:
    """Where audit.json goes: --out, else the run directory, else the current directory."""
    return Path(args.out or args.run_dir or Path.cwd())

