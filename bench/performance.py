"""Privet's performance benchmark: P1–P6 and P8 (P7 where a GPU is present), side by side on this machine.

Prints a table with each target beside its figure and writes the figures as JSON.
Run: ``make bench`` or ``.venv/bin/python -m bench.performance [--only P1,P3] [--out bench/results.json]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import psutil
import torch

from client.site import site_label_names, site_terms, site_tensors
from common import adapters, task
from common.config import RunConfig
from common.model import build_model
from common.privacy import calibrate_noise, poisson_schedule
from common.train import DPSettings, TensorData, predict, train_round

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "P1": "≤ 1.1× (DP step ÷ plain step)",
    "P2": "≤ 1.15× (federation ÷ plain loop, rounds after the first)",
    "P3": "≤ 0.2% (bytes per site per round ÷ model)",
    "P4": "≥ 0.95 at ε=8 (federated ÷ centralized macro-F1)",
    "P5": "< 6 GB and flat in sites",
    "P6": "≤ 10 min (make demo after install)",
    "P7": "GPU vs CPU examples/s (GPU only)",
    "P8": "report (NER: federated ε=8 ÷ centralized non-private entity micro-F1)",
}


def sites_data(config: RunConfig, num_sites: int) -> list[tuple[TensorData, TensorData]]:
    """Each simulated site's training and validation tensors, exactly as the ClientApp builds them."""
    names = site_label_names(config, None)
    out = []
    for i in range(num_sites):
        terms = site_terms(config, {"partition-id": i, "simulated": True}, Path(tempfile.gettempdir()))
        out.append(site_tensors(terms, config, names, (i, num_sites)))
    return out


def pooled(parts: list[TensorData]) -> TensorData:
    """Several sites' examples as one data set (what centralized training would see)."""
    return TensorData(*(torch.cat([getattr(part, f) for part in parts]) for f in ("input_ids", "attention_mask", "labels")))


def scores(config: RunConfig, model, data: TensorData) -> dict[str, float]:
    """The task's exact scores of `model` on `data`."""
    run_task, names = task.get(config), task.label_names(config)
    return run_task.scores(run_task.counts(data.labels, predict(model, data), names).sum(axis=0), names)


def centralized(config: RunConfig, train: TensorData, val: TensorData, rates, epochs: int,
                batch_size: int | None = None) -> dict:
    """Plain (non-private) LoRA on pooled examples, the learning rate chosen on the validation examples."""
    run_task, names = task.get(config), task.label_names(config)
    best = None
    by_rate = {}
    for rate in rates:
        model = build_model(config.model, len(names), lora_r=config.lora_r, lora_alpha=config.lora_alpha, ffa=False,
                            seed=config.seed, head=run_task.head)
        train_round(model, train, loss_fn=run_task.loss, epochs=epochs, batch_size=batch_size or config.batch_size,
                    learning_rate=rate, dp=None)
        by_rate[f"{rate:g}"] = scores(config, model, val)[run_task.primary]
        if best is None or by_rate[f"{rate:g}"] > by_rate[f"{best[0]:g}"]:
            best = (rate, model)
    return {"learning_rate": best[0], "validation_by_learning_rate": by_rate, "model": best[1]}


def p1_dp_overhead(steps: int = 8) -> dict:
    """P1: time per DP-SGD step over time per plain step: default model, batch size and token length."""
    config = RunConfig()
    train, _ = sites_data(config, 1)[0]
    data = train.subset(range(min(len(train), steps * config.batch_size)))
    model = build_model(config.model, len(task.label_names(config)), lora_r=8, lora_alpha=16, ffa=False, seed=0)
    private = DPSettings(1.0, 1.0, config.batch_size / len(data))
    timings = {}
    for name, dp in (("warmup", None), ("plain", None), ("dp", private), ("plain2", None), ("dp2", private)):
        started = time.perf_counter()
        result = train_round(model, data, loss_fn=task.get(config).loss, epochs=1, batch_size=config.batch_size,
                             learning_rate=1e-3, dp=dp)
        timings[name] = (time.perf_counter() - started) / result.steps
    plain = min(timings["plain"], timings["plain2"])
    private = min(timings["dp"], timings["dp2"])
    return {"figure": private / plain, "plain_s_per_step": plain, "dp_s_per_step": private}


def p3_bytes() -> dict:
    """P3: bytes a site sends per round over the full model's fp32 bytes, for LoRA and FFA-LoRA."""
    config = RunConfig()
    out = {}
    for aggregation in ("fedavg", "ffa-lora"):
        model = build_model(config.model, 8, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                            ffa=aggregation == "ffa-lora", seed=0)
        sent = adapters.to_record(adapters.trainable_state(model)).count_bytes()
        full = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
        out[aggregation] = {"bytes_per_round": sent, "model_bytes": full, "ratio": sent / full}
    return {"figure": out[config.aggregation]["ratio"], **out}


def simulate_subprocess(sites: int, run_config: str, runs_dir: Path, sample_memory: bool = False,
                        client_app: str | None = None, env: dict | None = None) -> dict:
    """Run ``python -m privet simulate`` (or `client_app` in place of the ClientApp) and return its wall time, peak
    memory and metrics rows."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **(env or {})}
    overrides = f"{run_config} runs-dir='{runs_dir}' run-name='bench'"
    command = [sys.executable, "-m", "privet", "simulate", "--sites", str(sites), "--run-config", overrides]
    if client_app:
        command = [sys.executable, "-c", "import sys; from flwr.common.config import parse_config_args; "
                   "from server.simulate import simulate; "
                   "simulate(int(sys.argv[1]), parse_config_args([sys.argv[2]]), client_app=sys.argv[3])",
                   str(sites), overrides, client_app]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        if sample_memory:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
        time.sleep(0.5)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"simulation failed:\n{proc.stderr.read()[-3000:]}")
    rows = [json.loads(line) for line in (runs_dir / "bench" / "metrics.jsonl").read_text().splitlines()]
    final = runs_dir / "bench" / "final_evaluation.json"
    return {"wall_s": wall, "peak_rss_bytes": peak, "rows": rows,
            "final": json.loads(final.read_text()) if final.exists() else None}


def p2_federation_overhead(sites: int = 2, rounds: int = 3, examples: int = 512) -> dict:
    """P2: the simulated federation's round time over the same training and evaluation in a plain loop.

    Round 1 is left out on both sides: in the federation it includes start-up (Ray worker, imports,
    model build, tokenization, noise calibration), which the target excludes. Both sides train LoRA every round
    (``lora-rounds`` = all), the heavier recipe, so the figure is the framework's overhead over real work.
    """
    run_config = f"num-server-rounds={rounds} lora-rounds={rounds} max-examples-per-site={examples} eval-examples=200"
    with tempfile.TemporaryDirectory() as tmp:
        federated = simulate_subprocess(sites, run_config, Path(tmp))
    fed_rounds = [row["seconds"] for row in federated["rows"]]
    config = RunConfig(num_server_rounds=rounds, lora_rounds=rounds, max_examples_per_site=examples,
                       eval_examples=200)
    data = sites_data(config, sites)
    names = task.label_names(config)
    test = task.central_test_set(config, limit=200)
    model = build_model(config.model, len(names), lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                        ffa=config.aggregation == "ffa-lora", seed=config.seed)
    start_state = adapters.trainable_state(model)
    plain_rounds = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        states = []
        for train, _ in data:
            adapters.load_state(model, start_state)
            rate, steps = poisson_schedule(len(train), config.batch_size)
            sigma = calibrate_noise(config.target_epsilon, config.delta, [(rate, steps * rounds)])
            train_round(model, train, loss_fn=task.get(config).loss, epochs=1, batch_size=config.batch_size,
                        learning_rate=config.learning_rate, dp=DPSettings(sigma, config.max_grad_norm, rate))
            states.append((len(train), adapters.trainable_state(model)))
        total = sum(n for n, _ in states)
        start_state = {k: sum(n * s[k] for n, s in states) / total for k in start_state}
        adapters.load_state(model, start_state)
        for _, val in data:
            predict(model, val)
        predict(model, test)
        plain_rounds.append(time.perf_counter() - started)
    return {"figure": sum(fed_rounds[1:]) / sum(plain_rounds[1:]), "federated_round_s": fed_rounds,
            "plain_round_s": plain_rounds, "sites": sites, "rounds": rounds, "examples_per_site": examples,
            "startup_and_final_s": federated["wall_s"] - sum(fed_rounds)}


def p4_quality(epsilons=(1.0, 3.0, 8.0), sites: int = 4, rounds: int = 3, no_dp: bool = True,
               examples: int = 1000) -> dict:
    """P4: final macro-F1 of federated DP runs (and without DP) over centralized plain LoRA on the same data.

    The centralized baseline's learning rate is chosen on the sites' pooled validation splits, never on the test set.
    `examples` is ``max-examples-per-site`` (0: each site's whole share), to see what more data per site buys.
    """
    config = RunConfig(num_server_rounds=rounds, max_examples_per_site=examples)
    data = sites_data(config, sites)
    chosen = centralized(config, pooled([t for t, _ in data]), pooled([v for _, v in data]),
                         (config.learning_rate, config.learning_rate / 4, config.learning_rate / 16), rounds)
    central = scores(config, chosen.pop("model"), task.central_test_set(config))["macro_f1"]
    out = {"centralized_macro_f1": central, **chosen, "sites": sites, "rounds": rounds,
           "training_examples": sum(len(t) for t, _ in data), "runs": {}}
    runs = [(f"eps={e:g}", f"target-epsilon={e}") for e in epsilons] + ([("no-dp", "dp=false")] if no_dp else [])
    for label, run_config in runs:
        with tempfile.TemporaryDirectory() as tmp:
            result = simulate_subprocess(
                sites, f"{run_config} num-server-rounds={rounds} max-examples-per-site={examples}", Path(tmp))
        f1 = result["final"]["macro_f1"]
        out["runs"][label] = {"macro_f1": f1, "ratio": f1 / central, "wall_s": result["wall_s"]}
    out["figure"] = out["runs"].get("eps=8", {}).get("ratio")
    return out


def p5_memory(site_counts=(10, 50, 100)) -> dict:
    """P5: peak resident memory of the whole simulation (all processes) for growing numbers of sites."""
    out = {}
    for sites in site_counts:
        run_config = "num-server-rounds=1 max-examples-per-site=40 batch-size=16 eval-examples=100 min-sites=2"
        with tempfile.TemporaryDirectory() as tmp:
            result = simulate_subprocess(sites, run_config, Path(tmp), sample_memory=True)
        out[str(sites)] = {"peak_gb": result["peak_rss_bytes"] / 1e9, "wall_s": result["wall_s"]}
    return {"figure": max(v["peak_gb"] for v in out.values()), "by_sites": out,
            "note": "sum of RSS over the process tree; shared pages count once per process, so this overstates"}


def p6_demo() -> dict:
    """P6: wall time of the demo command (after install): ``privet simulate --sites 4`` with the defaults."""
    with tempfile.TemporaryDirectory() as tmp:
        result = simulate_subprocess(4, "", Path(tmp))
    return {"figure": result["wall_s"] / 60, "unit": "minutes", "final_macro_f1": result["final"]["macro_f1"],
            "final_accuracy": result["final"]["accuracy"]}


def p7_gpu(steps: int = 20) -> dict | None:
    """P7: DP-SGD training examples per second on the GPU and on the CPU, and the GPU's peak memory."""
    if not torch.cuda.is_available():
        return None
    config = RunConfig()
    train, _ = sites_data(config, 1)[0]
    data = train.subset(range(min(len(train), steps * config.batch_size)))
    out = {}
    for device in ("cuda", "cpu"):
        model = build_model(config.model, 8, lora_r=8, lora_alpha=16, ffa=False, seed=0, device=device)
        private = DPSettings(1.0, 1.0, config.batch_size / len(data))
        train_round(model, data.subset(range(config.batch_size)), loss_fn=task.get(config).loss, epochs=1,
                    batch_size=config.batch_size, learning_rate=1e-3, dp=private, device=device)
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = train_round(model, data, loss_fn=task.get(config).loss, epochs=1, batch_size=config.batch_size,
                             learning_rate=1e-3, dp=private, device=device)
        out[device] = result.examples / (time.perf_counter() - started)
    return {"figure": out["cuda"] / out["cpu"], "examples_per_s": out,
            "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9, "gpu": torch.cuda.get_device_name()}


def p8_ner(sites: int = 3, rounds: int = 3) -> dict:
    """P8: named entities, federated at ε=8 against the same sentences trained centrally without DP, on ner-demo's
    test split (entity micro-F1, seqeval strict IOB2); the centralized learning rate is chosen on validation.

    The centralized baseline trains at batch 32: at the run's batch 128 its 3 epochs are ~40 steps, after which
    plain LoRA still tags every word O (entity F1 0 at learning rates 0.005, 0.02 and 0.05).
    """
    run_config = f"task='token-classification' dataset='ner-demo' num-server-rounds={rounds}"
    config = RunConfig(task="token-classification", dataset="ner-demo", num_server_rounds=rounds)
    data = sites_data(config, sites)
    chosen = centralized(config, pooled([t for t, _ in data]), pooled([v for _, v in data]),
                         (config.learning_rate / 10, config.learning_rate / 4, config.learning_rate), rounds,
                         batch_size=32)
    central = scores(config, chosen.pop("model"), task.central_test_set(config))["entity_f1"]
    with tempfile.TemporaryDirectory() as tmp:
        result = simulate_subprocess(sites, run_config, Path(tmp))
    federated = result["final"]["entity_f1"]
    return {"figure": federated / central if central else None, "federated_entity_f1": federated,
            "centralized_entity_f1": central, **chosen, "federated_wall_s": result["wall_s"],
            "per_round_entity_f1": [row["entity_f1"] for row in result["rows"]],
            "epsilon_per_site": {s["site"]: s["epsilon"] for s in result["rows"][-1]["sites"]}}


BENCHES = {"P1": p1_dp_overhead, "P2": p2_federation_overhead, "P3": p3_bytes, "P4": p4_quality,
           "P5": p5_memory, "P6": p6_demo, "P7": p7_gpu, "P8": p8_ner}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.performance", description=__doc__)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset, e.g. P1,P3")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--p4-runs", default="1,3,8,no-dp", help="P4's federated runs: target ε values and/or no-dp")
    parser.add_argument("--p4-examples", type=int, default=1000,
                        help="P4's max-examples-per-site (0: each site's whole share of the bank data)")
    args = parser.parse_args(argv)
    wanted = [part.strip() for part in args.p4_runs.split(",") if part.strip()]
    BENCHES["P4"] = functools.partial(
        p4_quality, epsilons=tuple(float(e) for e in wanted if e != "no-dp"), no_dp="no-dp" in wanted,
        examples=args.p4_examples,
    )
    chosen = [name.strip().upper() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "cuda": torch.cuda.is_available()}}
    for name in chosen:
        started = time.perf_counter()
        print(f"[{name}] running ...", flush=True)
        results[name] = BENCHES[name]()
        if results[name] is not None:
            results[name]["bench_s"] = round(time.perf_counter() - started, 1)
        print(f"[{name}] {json.dumps(results[name], default=str)[:400]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print("\n| figure | measured | target |\n|---|---|---|")
    for name in chosen:
        value = results[name]
        shown = "n/a (no GPU)" if value is None else _show(name, value["figure"])
        print(f"| {name} | {shown} | {TARGETS[name]} |")
    print(f"\nwritten to {args.out}")
    return 0


def _show(name: str, figure) -> str:
    if figure is None:
        return "n/a"
    if name == "P3":
        return f"{figure:.3%}"
    if name == "P5":
        return f"{figure:.2f} GB peak"
    if name == "P6":
        return f"{figure:.1f} min"
    return f"{figure:.3f}"


if __name__ == "__main__":
    sys.exit(main())
