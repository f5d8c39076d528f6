"""Audit the default model on the bundled bank data, once without DP and once at ε=8 (defaults otherwise).

Run: ``.venv/bin/python -m bench.audit [--only dp-false,eps-8] [--canaries 1000] [--guesses 100]``.
The audited site is simulated site 0 of 4 with its whole Dirichlet share of the bank training split
(``max-examples-per-site=0``: 3,045 records, about 2,740 of them for training), because the default cap of 1,000
records per site leaves too few to take 1,000 canaries from. Each setting prints m, r, v, the ε bound, the method's
ceiling, the claimed ε, the verdict and the wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from client import audit
from common.config import RunConfig

SETTINGS = {"dp-false": {"dp": False}, "eps-8": {"target-epsilon": 8.0}}
SITE, SITES = 0, 4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__)
    parser.add_argument("--only", default=",".join(SETTINGS), help=f"settings to run, of {', '.join(SETTINGS)}")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--guesses", type=int, default=100)
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    rows = []
    for name in chosen:
        config = RunConfig.from_mapping({"dataset": "bank", "max-examples-per-site": 0, **SETTINGS[name]})
        print(f"[{name}] auditing simulated site {SITE} of {SITES} ...", flush=True)
        with tempfile.TemporaryDirectory() as scratch:
            terms, partition = audit.audited_terms(config, None, SITE, SITES, Path(scratch))
            result = audit.audit_site(config, terms, partition, canaries=args.canaries, guesses=args.guesses)
        print(audit.format_result(result), flush=True)
        rows.append((name, result))
    print("\n| setting | m | r | v | ε lower bound (95%) | ceiling | claimed ε | verdict | wall time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        claimed = "—" if r.claimed_epsilon is None else f"{r.claimed_epsilon:.2f}"
        print(f"| {name} | {r.canaries} | {r.guesses} | {r.right} | {r.epsilon_lower_bound:.2f} | "
              f"{r.epsilon_ceiling:.2f} | {claimed} | {r.verdict} | {r.wall_seconds / 60:.1f} min |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
