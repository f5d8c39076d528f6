"""Everything Opacus: DP-SGD wrapping, noise calibration, and the site's privacy ledger.

The ledger is the site's record of every private release it made from its data. ε is always
recomputed from the ledger's whole history, so it accumulates across rounds, runs and
restarts, never per round.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

_root_handlers = list(logging.getLogger().handlers)
from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import create_accountant  # noqa: E402

# Opacus calls logging.basicConfig() on import; that root handler would print every Flower log line twice.
for _handler in logging.getLogger().handlers[len(_root_handlers):]:
    logging.getLogger().removeHandler(_handler)

from common.files import write_json_atomic

log = logging.getLogger(f"flwr.privet.{__name__}")  # Flower's handler prints it, as in every Flower process

# Both are known and stated in every report; repeating them every round only buries real warnings.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

LEDGER_FORMAT = "privet-ledger/1"
NOISE_RNG_NOTE = (
    "DP noise comes from PyTorch's default (non-cryptographic) random number generator: "
    "Opacus' secure_mode needs torchcsprng, which is not installable for current PyTorch."
)


class PrivacyError(RuntimeError):
    """The privacy budget or the ledger forbids what was asked."""


# One history entry: (noise_multiplier, sample_rate, steps), as Opacus' accountants keep it.
Entry = tuple[float, float, int]


def poisson_schedule(num_examples: int, batch_size: int) -> tuple[float, int]:
    """Sample rate and steps per epoch of Opacus' Poisson loader for this data size and expected batch."""
    sample_rate = 1.0 / math.ceil(num_examples / batch_size)
    # Opacus' sampler runs int(1 / sample_rate) steps, which float rounding can make one less.
    return sample_rate, int(1 / sample_rate)


def compute_epsilon(history: list[Entry], delta: float, accountant: str = "prv") -> tuple[float, str]:
    """ε of the whole history at δ, and the accountant that gave it (PRV, or RDP where PRV cannot compute)."""
    return _epsilon(tuple(tuple(entry) for entry in history), delta, accountant)


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[Entry, ...], delta: float, accountant: str) -> tuple[float, str]:
    """Cached: a site checks its cap and then records the same history each round, and a PRV run takes ~0.3 s."""
    if not history:
        return 0.0, accountant
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            epsilon = float(acc.get_epsilon(delta=delta))
        if math.isfinite(epsilon):
            return epsilon, accountant
    except (ValueError, ArithmeticError, RuntimeError) as err:
        if accountant == "rdp":
            raise
        log.warning("PRV accountant could not compute ε (%s); falling back to RDP", err)
    if accountant == "rdp":
        return epsilon, "rdp"
    return _epsilon(history, delta, "rdp")


def merge_entry(history: list[Entry], entry: Entry) -> list[Entry]:
    """Append `entry`, folding it into the last entry when the noise and sample rate are the same."""
    sigma, rate, steps = entry
    if history and history[-1][0] == sigma and history[-1][1] == rate:
        return [*history[:-1], (sigma, rate, history[-1][2] + steps)]
    return [*history, (sigma, rate, steps)]


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: list[Entry] | None = None,
    accountant: str = "prv",
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (within `tolerance` in ε) that keeps prior + planned steps at or under `target_epsilon`."""
    return _calibrate(target_epsilon, delta, sample_rate, steps, tuple(tuple(e) for e in prior or ()), accountant, tolerance)


@functools.lru_cache(maxsize=64)
def _calibrate(target_epsilon, delta, sample_rate, steps, prior, accountant, tolerance) -> float:
    """Cached: simulated sites of equal size share one plan, and each PRV evaluation takes a while."""
    prior = [tuple(e) for e in prior]
    spent, _ = compute_epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"this site has already spent ε={spent:.3f}, at or above the target ε={target_epsilon}; "
            "no noise level can keep a further round within it"
        )

    def eps(sigma: float) -> float:
        return compute_epsilon(merge_entry(prior, (sigma, sample_rate, steps)), delta, accountant)[0]

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise PrivacyError(f"target ε={target_epsilon} at δ={delta} is unreachable for this plan")
    while True:
        mid = (low + high) / 2
        value = eps(mid)
        if value <= target_epsilon:
            high = mid
            if target_epsilon - value <= tolerance:
                return high
        else:
            low = mid
        if high - low < 1e-6:
            return high


def make_private(model, optimizer, loader, *, noise_multiplier: float, max_grad_norm: float):
    """Wrap model, optimizer and loader for DP-SGD with Poisson sampling; returns the three wrapped objects.

    Each call builds a fresh engine whose own accountant is ignored: the ledger accounts for the
    whole run. ``rand_on_empty`` keeps an empty Poisson batch from crashing the BERT forward pass.
    """
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    return engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        rand_on_empty=True,
        grad_sample_mode="hooks",
    )


def release(private_model) -> None:
    """Remove Opacus' hooks so the underlying model can be reused next round."""
    private_model._close()


@dataclass
class Ledger:
    """A site's privacy ledger: the accountant history and ε so far, saved atomically as JSON."""

    path: Path
    delta: float
    accountant: str = "prv"
    site: str = ""
    history: list[Entry] = field(default_factory=list)
    epsilon: float = 0.0
    non_private_rounds: int = 0
    rounds: list[dict] = field(default_factory=list)
    calibrations: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, *, delta: float, accountant: str = "prv", site: str = "") -> Ledger:
        """Load the ledger at `path`, or start an empty one; refuse a δ that differs from the recorded one."""
        path = Path(path)
        if not path.exists():
            return cls(path=path, delta=delta, accountant=accountant, site=site)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise PrivacyError(
                f"privacy ledger {path} is unreadable ({err}); restore it from backup — never delete it, "
                "or ε spent so far would be forgotten"
            ) from err
        if data.get("format") != LEDGER_FORMAT:
            raise PrivacyError(f"privacy ledger {path} has format {data.get('format')!r}, expected {LEDGER_FORMAT!r}")
        if data["delta"] != delta:
            raise PrivacyError(
                f"privacy ledger {path} accounts at δ={data['delta']}, but δ={delta} was asked; "
                "keep δ fixed for a site's data (set it in the site policy)"
            )
        ledger = cls(
            path=path,
            delta=data["delta"],
            accountant=data["accountant"],
            site=data.get("site", site),
            history=[tuple(entry) for entry in data["history"]],
            epsilon=data["epsilon"] if data["epsilon"] is not None else math.inf,
            non_private_rounds=data.get("non_private_rounds", 0),
            rounds=data.get("rounds", []),
            calibrations=data.get("calibrations", {}),
        )
        if accountant != ledger.accountant and ledger.history:
            log.info("ledger %s keeps its accountant %s", path, ledger.accountant)
        return ledger

    def epsilon_with(self, entry: Entry) -> float:
        """ε the site would have spent after one more release described by `entry`."""
        if self.non_private_rounds:
            return math.inf
        return compute_epsilon(merge_entry(self.history, entry), self.delta, self.accountant)[0]

    def record_round(self, run: str, server_round: int, entry: Entry | None) -> float:
        """Add one round's release (None for a non-private round), save atomically, and return ε so far."""
        if entry is None:
            self.non_private_rounds += 1
            self.epsilon = math.inf
        else:
            self.history = merge_entry(self.history, entry)
            self.epsilon, self.accountant = compute_epsilon(self.history, self.delta, self.accountant)
            if self.non_private_rounds:
                self.epsilon = math.inf
        self.rounds.append(
            {
                "run": run,
                "round": server_round,
                "noise_multiplier": None if entry is None else entry[0],
                "sample_rate": None if entry is None else entry[1],
                "steps": None if entry is None else entry[2],
                "epsilon": _json_number(self.epsilon),
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        self.save()
        return self.epsilon

    def save(self) -> None:
        """Write the ledger atomically (temp file, fsync, rename), so a crash never leaves half a ledger."""
        data = {
            "format": LEDGER_FORMAT,
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "history": [list(entry) for entry in self.history],
            "epsilon": _json_number(self.epsilon),
            "non_private_rounds": self.non_private_rounds,
            "rounds": self.rounds,
            "calibrations": self.calibrations,
            "note": NOISE_RNG_NOTE,
        }
        write_json_atomic(self.path, data)


def _json_number(value: float) -> float | None:
    """JSON has no infinity: a non-private ε is written as null."""
    return value if math.isfinite(value) else None
