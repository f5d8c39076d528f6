"""A site's privacy decisions for one request, made under the ledger's lock: what to release and what it costs.

Everything a site sends is either inside its ε or declared public by its policy:

* the example count (FedAvg weight, and what the sampling rate and step count derive from): the
  policy's ``public-example-count``, or a Gaussian-noised count released once per run;
* the adapter (the head alone in head-only rounds, LoRA and the head in LoRA rounds): DP-SGD at one noise
  multiplier, calibrated once per plan over all the run's remaining releases;
* evaluation scores: sums of per-example counts with Gaussian noise, at most one per round.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from client.policy import Declined
from client.site import SiteTerms
from common import privacy
from common.config import RunConfig
from common.ledger import Ledger
from common.privacy import Entry
from common.train import DPSettings

log = logging.getLogger("flwr.privet.site")

# The count's noise: one release per run costs a few thousandths of ε at δ=1e-5, and a sampling
# rate off by a few percent costs nothing that matters.
COUNT_NOISE_MULTIPLIER = 20.0
# With eval-noise-multiplier=0, a run's evaluations alone may cost at most this share of the site's target ε.
EVAL_SHARE = 1 / 8
# A site runs at most this many DP-SGD steps in one round, so no run config can keep it training without end.
MAX_STEPS_PER_ROUND = 100_000


@dataclass(frozen=True)
class Phase:
    """How a round trains: only the head on cached features, or LoRA and the head, with this phase's settings."""

    head_only: bool
    epochs: int
    batch_size: int
    learning_rate: float


def phase(config: RunConfig, server_round: int) -> Phase:
    """The phase `server_round` of this run is in."""
    if config.is_lora_round(server_round):
        return Phase(False, config.local_epochs, config.batch_size, config.learning_rate)
    return Phase(True, config.head_epochs, config.head_batch_size, config.head_learning_rate)


@dataclass(frozen=True)
class RoundRelease:
    """What a training round may release: its DP-SGD settings (None without DP), the public count, the entry."""

    dp: DPSettings | None
    public_count: int
    steps: int
    entry: Entry | None
    epsilon: float


@dataclass(frozen=True)
class Plan:
    """What the noise of a run is calibrated for; a change in any field recalibrates the remaining budget.

    Both phases (head rounds, then LoRA rounds) run at one noise multiplier, each at its own sample rate.
    """

    target: float
    head_sample_rate: float
    head_steps: int  # DP-SGD steps per head round
    lora_sample_rate: float
    lora_steps: int  # DP-SGD steps per LoRA round
    eval_noise: float | None  # each round's evaluation release, None when the site does not evaluate
    accountant: str

    def schedule(self, head_rounds: int, lora_rounds: int) -> list[tuple[float, int]]:
        """(sample rate, steps) of that many more rounds of each phase."""
        return [(self.head_sample_rate, self.head_steps * head_rounds),
                (self.lora_sample_rate, self.lora_steps * lora_rounds)]

    def releases(self, sigma: float, head_rounds: int, lora_rounds: int) -> list[Entry]:
        """The entries that many more rounds at noise `sigma` would add to the ledger."""
        planned = [(sigma, rate, steps) for rate, steps in self.schedule(head_rounds, lora_rounds) if steps]
        if self.eval_noise is not None:
            planned.append((self.eval_noise, 1.0, head_rounds + lora_rounds))
        return planned


def eval_noise(config: RunConfig, terms: SiteTerms) -> float:
    """The noise multiplier of this run's evaluation releases: the run's, or the site's automatic choice.

    Automatic: the smallest noise at which the run's planned evaluations, taken alone, cost at most an eighth
    of the target ε, so evaluations never starve training, whatever the target (ε=1 included).
    """
    if config.eval_noise_multiplier > 0:
        return config.eval_noise_multiplier
    rounds = min(config.num_server_rounds, terms.max_rounds)
    target = min(config.target_epsilon, terms.epsilon_cap)
    return privacy.calibrate_noise(target * EVAL_SHARE, terms.delta, [(1.0, rounds)], accountant=config.accountant)


def release_for_round(
    ledger: Ledger, *, terms: SiteTerms, config: RunConfig, run: str, server_round: int, examples: int
) -> RoundRelease:
    """Decide and record this round's release on the (locked) ledger before any gradient is computed.

    A crash after this point can over-count ε, never under-count it.
    """
    now = phase(config, server_round)
    if not config.dp:
        steps = now.epochs * privacy.poisson_schedule(examples, now.batch_size)[1]
        epsilon = ledger.record(run, server_round, "train", None)
        return RoundRelease(None, examples, steps, None, epsilon)
    count = _public_count(ledger, terms=terms, run=run, server_round=server_round, examples=examples)
    if not terms.delta < 1.0 / count:
        raise Declined(
            f"{terms.site_id}: δ={terms.delta:g} is not below 1/N for its N≈{count} training records, so one "
            f"record's leak would fit inside δ; set delta below {1.0 / count:.1e}"
        )
    if not now.head_only and count < config.batch_size:
        # Checked on the public count: a check on the exact one would answer the server's batch-size probes for free.
        raise Declined(
            f"{terms.site_id}: its public example count {count} is below batch-size {config.batch_size}; "
            "lower batch-size (LoRA rounds need a full expected batch)"
        )
    head_rate, head_per_epoch = privacy.poisson_schedule(count, config.head_batch_size)
    lora_rate, lora_per_epoch = privacy.poisson_schedule(count, config.batch_size)
    steps_now = now.epochs * (head_per_epoch if now.head_only else lora_per_epoch)
    if steps_now > MAX_STEPS_PER_ROUND:
        epochs_key, batch_key = ("head-epochs", "head-batch-size") if now.head_only else ("local-epochs", "batch-size")
        raise Declined(
            f"{terms.site_id}: this round would take {steps_now} DP-SGD steps for its public example count {count}, "
            f"more than the {MAX_STEPS_PER_ROUND} a site runs in a round; lower {epochs_key} or raise {batch_key}"
        )
    plan = Plan(
        target=min(config.target_epsilon, terms.epsilon_cap),
        head_sample_rate=head_rate,
        head_steps=config.head_epochs * head_per_epoch,
        lora_sample_rate=lora_rate,
        lora_steps=config.local_epochs * lora_per_epoch,
        eval_noise=eval_noise(config, terms) if terms.evaluate else None,
        accountant=ledger.accountant,
    )
    last = min(config.num_server_rounds, terms.max_rounds)
    left = range(server_round, max(last, server_round) + 1)  # this round and the planned ones after it
    head_left = sum(1 for r in left if not config.is_lora_round(r))
    sigma = _noise_for_plan(ledger, run, plan, head_left, len(left) - head_left, terms.site_id)
    sample_rate, steps = (head_rate, plan.head_steps) if now.head_only else (lora_rate, plan.lora_steps)
    entry = (sigma, sample_rate, steps)
    epsilon = _charge(ledger, terms, run, server_round, "train", entry)
    return RoundRelease(DPSettings(sigma, config.max_grad_norm, sample_rate), count, steps, entry, epsilon)


def charge_evaluation(ledger: Ledger, *, terms: SiteTerms, config: RunConfig, run: str, server_round: int) -> float:
    """Record one evaluation release for this round, or refuse a second one or one past the cap; return ε so far.

    The release's noise is `eval_noise(config, terms)`, the one the run's plan counted in.
    """
    if ledger.has(run, server_round, "evaluate"):
        raise Declined(
            f"{terms.site_id} already answered an evaluation for round {server_round} of run {run}; "
            "a site answers one per round"
        )
    return _charge(ledger, terms, run, server_round, "evaluate", (eval_noise(config, terms), 1.0, 1))


def _charge(ledger: Ledger, terms: SiteTerms, run: str, server_round: int, kind: str, entry: Entry) -> float:
    """Record `entry` in the ledger unless it would take the site past its cap; return ε so far."""
    after = ledger.epsilon_with(entry)
    if after > terms.epsilon_cap:
        doing = "this round's training" if kind == "train" else "evaluating"
        raise Declined(
            f"{terms.site_id} has spent ε={ledger.epsilon:.3f}; {doing} would reach ε={after:.3f}, "
            f"over its cap of {terms.epsilon_cap}"
        )
    epsilon = ledger.record(run, server_round, kind, entry)
    log.info("%s: %s release %s (noise multiplier, sample rate, steps) recorded; ε so far %.4f",
             terms.site_id, kind, entry, epsilon)
    return epsilon


def _public_count(ledger: Ledger, *, terms: SiteTerms, run: str, server_round: int, examples: int) -> int:
    """The policy's declared count, or this run's DP count (released, and charged, once per run)."""
    if terms.public_count is not None:
        return terms.public_count
    saved = ledger.calibrations.setdefault(run, {})
    if "public_count" in saved:
        return int(saved["public_count"])
    entry = (COUNT_NOISE_MULTIPLIER, 1.0, 1)
    after = ledger.epsilon_with(entry)
    if after > terms.epsilon_cap:
        raise Declined(
            f"{terms.site_id} has spent ε={ledger.epsilon:.3f}; releasing its example count would reach "
            f"ε={after:.3f}, over its cap of {terms.epsilon_cap}"
        )
    saved["public_count"] = privacy.noisy_count(examples, COUNT_NOISE_MULTIPLIER)
    epsilon = ledger.record(run, server_round, "count", entry)
    log.info("%s: example count released once for run %s, release %s; ε so far %.4f", terms.site_id, run, entry, epsilon)
    return int(saved["public_count"])


def _noise_for_plan(ledger: Ledger, run: str, plan: Plan, head_left: int, lora_left: int, site: str) -> float:
    """The run's noise multiplier: the saved one while the plan is unchanged and still fits, else recalibrated."""
    saved = ledger.calibrations.setdefault(run, {})
    sigma = saved.get("noise_multiplier")
    if sigma is not None and saved.get("plan") == asdict(plan):
        if ledger.epsilon_with(*plan.releases(sigma, head_left, lora_left)) <= plan.target + 1e-9:
            return sigma
        log.info("%s: the budget left no longer fits the saved plan; recalibrating", site)
    rounds = head_left + lora_left
    evaluations = [] if plan.eval_noise is None else [(plan.eval_noise, 1.0, rounds)]
    sigma = privacy.calibrate_noise(
        plan.target, ledger.delta, plan.schedule(head_left, lora_left),
        prior=ledger.history, also=evaluations, accountant=plan.accountant,
    )
    saved.update(noise_multiplier=sigma, plan=asdict(plan), planned_rounds=rounds)
    log.info("%s: noise multiplier %r for ε=%s over %d round(s): %d head-only (sample rate %r, %d steps each), "
             "%d LoRA (sample rate %r, %d steps each)", site, sigma, plan.target, rounds, head_left,
             plan.head_sample_rate, plan.head_steps, lora_left, plan.lora_sample_rate, plan.lora_steps)
    return sigma
