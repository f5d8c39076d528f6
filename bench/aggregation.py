"""Compare aggregations on the bank data: 4 non-IID sites, ε=8, macro-F1 per round and bytes per site per round.

Run: ``.venv/bin/python -m bench.aggregation [--rounds 3] [--only fedavg,ffa-lora,fedprox] [--extra "..."]``.
Each aggregation is a full simulated federation (``python -m privet simulate``) with the same seed and data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.performance import ROOT, p3_bytes, simulate_subprocess
from common.config import RunConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aggregation", description=__doc__)
    parser.add_argument("--rounds", type=int, default=RunConfig().num_server_rounds)
    parser.add_argument("--only", default="fedavg,ffa-lora,fedprox")
    parser.add_argument("--extra", default="", help="more run-config overrides for every run, Flower's format")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "aggregation.json")
    args = parser.parse_args(argv)
    # Only FFA-LoRA sends fewer tensors; every other aggregation sends what FedAvg sends.
    sent = {name: figures["bytes_per_round"] for name, figures in p3_bytes().items() if name != "figure"}
    results = {}
    for aggregation in [a.strip() for a in args.only.split(",") if a.strip()]:
        run_config = f"aggregation='{aggregation}' target-epsilon=8.0 num-server-rounds={args.rounds} {args.extra}"
        print(f"[{aggregation}] simulating 4 sites ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run = simulate_subprocess(4, run_config, Path(tmp))
        results[aggregation] = {
            "macro_f1_per_round": [row["macro_f1"] for row in run["rows"]],
            "final_macro_f1": run["final"]["macro_f1"],
            "final_accuracy": run["final"]["accuracy"],
            "bytes_per_site_per_round": sent.get(aggregation, sent["fedavg"]),
            "wall_s": run["wall_s"],
        }
        print(f"[{aggregation}] {json.dumps(results[aggregation])}", flush=True)
    args.out.write_text(json.dumps({"run_config": args.extra, "rounds": args.rounds, "results": results}, indent=2))
    rounds = max(len(r["macro_f1_per_round"]) for r in results.values())
    print("\n| aggregation | " + " | ".join(f"macro-F1 r{i + 1}" for i in range(rounds))
          + " | final macro-F1 (full test) | bytes/site/round |")
    print("|---" * (rounds + 3) + "|")
    for name, r in results.items():
        cells = " | ".join(f"{v:.3f}" for v in r["macro_f1_per_round"])
        print(f"| {name} | {cells} | {r['final_macro_f1']:.3f} | {r['bytes_per_site_per_round']:,} |")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
