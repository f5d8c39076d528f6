"""The site's privacy ledger: every private release it made from its data, saved atomically and locked.

ε is always recomputed from the ledger's whole history, so it accumulates across rounds, runs and
restarts, never per round. One process at a time may read, decide and write: ``Ledger.locked``
holds an exclusive lock from reading the file to the last save, so two runs at one site cannot
both start from the same history and drop each other's releases.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from common.files import write_json_atomic
from common.privacy import NOISE_RNG_NOTE, Entry, PrivacyError, canonical, compute_epsilon

LEDGER_FORMAT = "privet-ledger/1"
# What a release was: DP-SGD training, a DP evaluation, or the DP count a run's sampling rate comes from.
KINDS = ("train", "evaluate", "count")


@dataclass
class Ledger:
    """A site's accountant history and ε so far; change it only inside ``Ledger.locked``."""

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
    @contextlib.contextmanager
    def locked(cls, path: str | Path, *, delta: float, accountant: str = "prv", site: str = "") -> Iterator[Ledger]:
        """Open the ledger under an exclusive lock held until the block ends; every change inside is saved at once."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A separate lock file: the ledger itself is replaced by rename on every save, which a lock on it would miss.
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield cls.read(path, delta=delta, accountant=accountant, site=site)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @classmethod
    def read(cls, path: str | Path, *, delta: float | None = None, accountant: str = "prv", site: str = "") -> Ledger:
        """Load the ledger at `path` (or an empty one); refuse a δ that differs from the recorded one.

        Reading without the lock is for reports only: a decision to release must use ``locked``.
        """
        path = Path(path)
        if not path.exists():
            if delta is None:
                raise PrivacyError(f"no privacy ledger at {path}")
            return cls(path=path, delta=delta, accountant=accountant, site=site)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise PrivacyError(
                f"privacy ledger {path} is unreadable ({err}); restore it from backup — never delete it, "
                "or ε spent so far would be forgotten"
            ) from err
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise PrivacyError(f"privacy ledger {path} has format {found!r}, expected {LEDGER_FORMAT!r}")
        if delta is not None and data["delta"] != delta:
            raise PrivacyError(
                f"privacy ledger {path} accounts at δ={data['delta']}, but δ={delta} was asked; "
                "keep δ fixed for a site's data (set it in the site policy)"
            )
        # The ledger's accountant is fixed by its first release, so every later ε is computed the same way.
        return cls(
            path=path,
            delta=data["delta"],
            accountant=data["accountant"] if data["history"] else accountant,
            site=data.get("site") or site,
            history=[tuple(entry) for entry in data["history"]],
            epsilon=data["epsilon"] if data["epsilon"] is not None else math.inf,
            non_private_rounds=data.get("non_private_rounds", 0),
            rounds=data.get("rounds", []),
            calibrations=data.get("calibrations", {}),
        )

    def epsilon_with(self, *entries: Entry) -> float:
        """ε the site would have spent after the releases described by `entries`."""
        if self.non_private_rounds:
            return math.inf
        return compute_epsilon((*self.history, *entries), self.delta, self.accountant)[0]

    def has(self, run: str, server_round: int, kind: str) -> bool:
        """Whether this ledger already holds a `kind` release for that round of that run."""
        return any(r["run"] == run and r["round"] == server_round and r.get("kind", "train") == kind
                   for r in self.rounds)

    def record(self, run: str, server_round: int, kind: str, entry: Entry | None) -> float:
        """Add one release (None: a non-private training round), save atomically, and return ε so far."""
        if kind not in KINDS:
            raise ValueError(f"unknown release kind {kind!r}")
        if entry is None:
            self.non_private_rounds += 1
        else:
            self.history = list(canonical([*self.history, entry]))
            self.epsilon, self.accountant = compute_epsilon(self.history, self.delta, self.accountant)
        if self.non_private_rounds:
            self.epsilon = math.inf
        self.rounds.append(
            {
                "run": run,
                "round": server_round,
                "kind": kind,
                "noise_multiplier": None if entry is None else entry[0],
                "sample_rate": None if entry is None else entry[1],
                "steps": None if entry is None else entry[2],
                "epsilon": json_number(self.epsilon),
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
            "epsilon": json_number(self.epsilon),
            "non_private_rounds": self.non_private_rounds,
            "rounds": self.rounds,
            "calibrations": self.calibrations,
            "note": NOISE_RNG_NOTE,
        }
        write_json_atomic(self.path, data)


def json_number(value: float) -> float | None:
    """JSON has no infinity: a non-private ε is written as null."""
    return value if math.isfinite(value) else None
