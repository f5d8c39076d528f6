"""DP recipe study for P4: what closes the gap between federated DP and centralized non-private macro-F1.

Run: ``.venv/bin/python -m bench.dp_recipe --stage STAGE`` (stages below, in order; ``all`` runs them all).
Every figure is printed with its configuration and merged into ``bench/dp_recipe.json`` (git-ignored).
Scratch (cached encoder outputs, calibration cache, logs) lives in ``$DP_STUDY_DIR`` (default /tmp/dp-study).

Protocol (P4's): 4 simulated non-IID bank sites (Dirichlet α=1, ``max-examples-per-site=1000``, the
site's stable-hash 90/10 split: ~900 training examples each), 3 rounds, the full 3,000-example test split.

* Hyper-parameters are chosen on VALIDATION only: the four sites' 10% validation splits pooled (402
  examples). The bundled demo data is public, so tuning on it is tuning on a public proxy. Test
  figures are computed only for selected configurations and the centralized baselines.
* Privacy accounting is the product's (client/accounting.py), per site, δ=1e-5, PRV: the once-per-run
  count release (σ=20, entry (20, 1, 1)), one evaluation release per round ((σ_eval, 1, 1) each) and
  every DP-SGD step of every phase, all inside the one target ε (``calibrate_noise(prior=[count],
  also=[evaluations, other phases])``).
* Everything that trains goes through Opacus via ``common.privacy.make_private`` (DP-AdamW through
  ``common.train.train_round`` itself wherever the product's loop suffices).

The study's own pieces (the winner, head-only DP linear probing, is now the product's default recipe through
``common.model.HeadOnly`` and ``common.train.features``; the rest stayed here because it did not win):
  1. ``FeatureHead``/``encode_features``: the head trained on the frozen encoder's cached mean-pooled
     features (head-only / linear-probe phase). Per-example gradients of the head depend only on the
     example's own features, so DP-SGD on cached features is the same mechanism as on the frozen model
     (except for dropout, which the cached forward pass does not apply).
  2. ``build_lora``: LoRA restricted to some layers (PEFT ``layers_to_transform``), and ``TopLayers``: the
     same forward pass started from the cached input of the first adapted layer (exact: lower layers are
     frozen; only dropout in the frozen layers is skipped).
  3. ``study_train``: ``train_round`` with a choice of optimizer (AdamW or SGD with momentum) and a
     learning-rate schedule.
  4. ``ServerOpt``: FedAvg, server momentum or FedAdam over the (noisy) site average.
  5. ``plan_noise``: per-phase noise multipliers inside the whole-run budget.

Stages (``all`` runs them in this order, ~2.5 h on one shared core): features (cache encoder outputs),
probe (head-only DP linear probing: batch × epochs × lr, clipping, schedules, SGD-momentum, tail averaging,
centring, zero init, server momentum / FedAdam, ε 3 and 1, centralized), refine (4-repeat means around the
best), ssp (one-shot DP ridge head from sufficient statistics), extra (public-PCA subspace, evaluation noise,
logit adjustment), lora (linear probing then LoRA on the top layers: rounds split, rank, FFA or not, clipping,
lr, budget split, last layer only), baseline (+ baseline_tau: centralized non-private LoRA, lr and epochs
chosen on validation, test), confirm (selected recipes at ε 1/3/8 and no DP with test, federated and
centralized), walltime (the selected recipe on the product's model and tokens), frontier (the same data held
by 2 and 1 sites), report (every figure as a table). ``default`` (the earlier LoRA recipe on the full model at ε=8,
~20 min) runs only when named. Scratch: DP_STUDY_DIR; threads: DP_STUDY_THREADS (default 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

from client.accounting import COUNT_NOISE_MULTIPLIER
from client.site import site_tensors, site_terms
from common import privacy
from common import task as tasks
from common.config import RunConfig
from common.model import _seed_linear, _seed_lora_a, build_base_model, build_model
from common.train import DPSettings, TensorData, predict, train_round

torch.set_num_threads(int(os.environ.get("DP_STUDY_THREADS", "1")))

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path(os.environ.get("DP_STUDY_DIR", "/tmp/dp-study"))
OUT = Path(os.environ.get("DP_STUDY_OUT", ROOT / "bench" / "dp_recipe.json"))
CONFIG = RunConfig()  # the product's defaults: bank, 4 sites × 1000, 64 tokens, seed 42, δ=1e-5, PRV
SITES = 4
ROUNDS = 3
DELTA = CONFIG.delta
COUNT_ENTRY = (COUNT_NOISE_MULTIPLIER, 1.0, 1)
NAMES = tasks.label_names(CONFIG)
TASK = tasks.get(CONFIG)
TOP_START = 4  # the cached encoder input of layer 4 (0-based) serves LoRA on the last 2 of MiniLM's 6 layers


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# --------------------------------------------------------------------------------------------- results file


def record(key: str, value: dict) -> None:
    """Print one measured figure with its configuration and merge it into bench/dp_recipe.json."""
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results[key] = value
    OUT.write_text(json.dumps(results, indent=1, default=str))
    log("RESULT", key, json.dumps(value, default=str))


def recorded(key: str) -> dict | None:
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    return results.get(key)


# ------------------------------------------------------------------------------------------------------ data


def site_splits() -> list[tuple[TensorData, TensorData]]:
    """Each simulated site's training and validation tensors, exactly as the ClientApp builds them."""
    out = []
    for i in range(SITES):
        node = {"partition-id": i, "num-partitions": SITES, "simulated": True}
        terms = site_terms(CONFIG, node, SCRATCH / "runs")
        out.append(site_tensors(terms, CONFIG, NAMES, (i, SITES)))
    return out


def macro_f1(labels: torch.Tensor, predictions: torch.Tensor) -> float:
    """The task's own scores from summed per-example counts (exact: selection runs on the public proxy)."""
    summed = TASK.counts(labels, predictions, NAMES).sum(axis=0)
    return TASK.scores(summed, NAMES)["macro_f1"]


def cat(parts: list[TensorData]) -> TensorData:
    return TensorData(*(torch.cat([getattr(p, f) for p in parts]) for f in ("input_ids", "attention_mask", "labels")))


# ------------------------------------------------ 1. cached encoder outputs (head-only phase, top-layer LoRA)


@dataclass
class Cached:
    """One split's cached encoder outputs: mean-pooled (pre-layer-norm) features, and layer TOP_START's input."""

    pooled: torch.Tensor  # (N, hidden)
    hidden: torch.Tensor | None  # (N, tokens, hidden): input of layer TOP_START
    mask: torch.Tensor
    labels: torch.Tensor

    def features(self) -> TensorData:
        return TensorData(self.pooled, self.mask[:, :1], self.labels)

    def top(self) -> TensorData:
        return TensorData(self.hidden, self.mask, self.labels)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """MeanPoolClassifier's masked mean pooling (the standardisation is applied in the head)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def encode_features(model, data: TensorData, *, keep_hidden: bool, batch_size: int = 128) -> Cached:
    """The frozen encoder's (LoRA B = 0: the base model's) pooled features, and optionally layer TOP_START's input."""
    bert = model.base_model.model.encoder
    bert.eval()
    pooled, hidden = [], []
    for start in range(0, len(data), batch_size):
        ids = data.input_ids[start:start + batch_size]
        mask = data.attention_mask[start:start + batch_size]
        out = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        pooled.append(mean_pool(out.last_hidden_state, mask))
        if keep_hidden:
            hidden.append(out.hidden_states[TOP_START].clone())
    return Cached(torch.cat(pooled), torch.cat(hidden) if keep_hidden else None, data.attention_mask, data.labels)


def load_cache() -> dict[str, list[Cached] | Cached]:
    path = SCRATCH / "cache.pt"
    if not path.exists():
        stage_features()
    return torch.load(path, weights_only=False)


def stage_features() -> None:
    """Cache every split's encoder outputs once: sites' train and validation, and the test split."""
    path = SCRATCH / "cache.pt"
    if path.exists():
        log("features: cached at", path)
        return
    started = time.perf_counter()
    sites = site_splits()
    test = tasks.central_test_set(CONFIG)
    log("data:", [(len(t), len(v)) for t, v in sites], "test", len(test), f"{time.perf_counter() - started:.1f}s")
    model = build_model(CONFIG.model, len(NAMES), lora_r=8, lora_alpha=16, ffa=True, seed=CONFIG.seed)
    t0 = time.perf_counter()
    cache = {"train": [], "val": []}
    for train, val in sites:
        cache["train"].append(encode_features(model, train, keep_hidden=True))
        cache["val"].append(encode_features(model, val, keep_hidden=True))
    cache["test"] = encode_features(model, test, keep_hidden=True)
    elapsed = time.perf_counter() - t0
    n = sum(len(t) + len(v) for t, v in sites) + len(test)
    # Check: the product's model on raw tokens and the cached paths give the same logits.
    model.eval()
    probe = test.subset(range(16))
    with torch.no_grad():
        full = model(probe.input_ids, probe.attention_mask)
        head = FeatureHead.from_model(model)
        via_features = head(cache["test"].pooled[:16], None)
        top = TopLayers(model, TOP_START)
        via_top = top(cache["test"].hidden[:16], probe.attention_mask)
    record("features", {"examples": n, "forward_s": round(elapsed, 1), "s_per_128": round(elapsed / n * 128, 3),
                        "max_abs_diff_features": float((full - via_features).abs().max()),
                        "max_abs_diff_top_layers": float((full - via_top).abs().max())})
    SCRATCH.mkdir(parents=True, exist_ok=True)
    torch.save(cache, path)


# ------------------------------------------------------------------------------- 2. models on cached inputs


class FeatureHead(nn.Module):
    """MeanPoolClassifier's head on cached pooled features: the parameter-free layer norm, then the Linear."""

    def __init__(self, hidden: int, num_labels: int, seed: int):
        super().__init__()
        self.classifier = nn.Linear(hidden, num_labels)
        _seed_linear(self.classifier, seed)  # the product's head start (build_base_model)

    @classmethod
    def from_model(cls, model) -> FeatureHead:
        head = cls(head_module(model).in_features, len(NAMES), CONFIG.seed)
        head.load_state_dict(head_state_of(model))
        return head

    def forward(self, pooled: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.classifier(F.layer_norm(pooled, pooled.shape[-1:]))


_CENTERS: dict[str, torch.Tensor] = {}


def public_features() -> torch.Tensor:
    """Standardised pooled features of 1,024 texts of the bundled hospital set: public, and not bank data."""
    path = SCRATCH / "public_hospital.pt"
    if not path.exists():
        from common import data as site_data

        texts = list(site_data.load_bundled("hospital").train.texts)[:1024]
        ids, mask = site_data.tokenize(texts, tasks.tokenizer(CONFIG.model), CONFIG.max_length)
        model = build_model(CONFIG.model, len(NAMES), lora_r=8, lora_alpha=16, ffa=True, seed=CONFIG.seed)
        pooled = encode_features(model, TensorData(ids, mask, torch.zeros(len(ids), dtype=torch.long)),
                                 keep_hidden=False).pooled
        torch.save(F.layer_norm(pooled, pooled.shape[-1:]), path)
    return torch.load(path)


def center_vector(kind: str, cache=None) -> torch.Tensor | None:
    """A fixed vector subtracted from the standardised pooled features before the head (see Phase.center)."""
    if not kind:
        return None
    if kind not in _CENTERS:
        if kind == "hospital":
            _CENTERS[kind] = public_features().mean(0)
        elif kind == "oracle":
            x = torch.cat([c.pooled for c in cache["train"]])
            _CENTERS[kind] = F.layer_norm(x, x.shape[-1:]).mean(0)
        else:
            raise ValueError(kind)
    return _CENTERS[kind]


def projection(kind: str, cache=None) -> torch.Tensor | None:
    """(hidden, K): the top-K principal directions of public (or, as an ablation, the sites' own) features."""
    if not kind:
        return None
    source, k = kind.rsplit("-", 1)
    if source == "hospital":
        x = public_features()
    elif source == "oracle":
        x = torch.cat([c.pooled for c in cache["train"]])
        x = F.layer_norm(x, x.shape[-1:])
    else:
        raise ValueError(kind)
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[: int(k)].T.contiguous()


def attach_center(linear: nn.Linear, center: torch.Tensor | None, proj: torch.Tensor | None = None) -> None:
    """Map the head's input x to (x - center) @ proj (a forward pre-hook: Opacus sees the mapped activations)."""
    if center is None and proj is None:
        return
    c = 0.0 if center is None else center
    linear.register_forward_pre_hook(lambda _module, args: (((args[0] - c) @ proj) if proj is not None
                                                            else args[0] - c, *args[1:]))


def fold_head(state: dict, center, proj) -> dict:
    """The head on the full standardised features equal to a centred / projected head (for the LoRA hand-over)."""
    w, b = state["classifier.weight"], state["classifier.bias"]
    if proj is not None:
        w = w @ proj.T
    if center is not None:
        b = b - w @ center
    return {"classifier.weight": w.contiguous(), "classifier.bias": b.contiguous()}


def head_module(model) -> nn.Linear:
    """The trainable copy of the classifier inside a PEFT model (modules_to_save)."""
    wrapper = model.base_model.model.classifier
    return wrapper.modules_to_save["default"] if hasattr(wrapper, "modules_to_save") else wrapper


def head_state_of(model) -> dict[str, torch.Tensor]:
    lin = head_module(model)
    return {"classifier.weight": lin.weight.detach().clone(), "classifier.bias": lin.bias.detach().clone()}


def build_lora(r: int, alpha: int, layers: list[int] | None, ffa: bool, seed: int = CONFIG.seed):
    """build_model with LoRA restricted to `layers` (None: all, the product's), A seeded and frozen as FFA-LoRA."""
    if layers is None:
        return build_model(CONFIG.model, len(NAMES), lora_r=r, lora_alpha=alpha, ffa=ffa, seed=seed)
    base = build_base_model(CONFIG.model, len(NAMES), seed=seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["query", "value"],
                     modules_to_save=["classifier"], layers_to_transform=list(layers), layers_pattern="layer")
    model = get_peft_model(base, cfg)
    _seed_lora_a(model, seed)
    if ffa:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model


class TopLayers(nn.Module):
    """The PEFT model's forward pass from the cached input of layer `start` on (lower layers are frozen)."""

    def __init__(self, model, start: int):
        super().__init__()
        inner = model.base_model.model
        self.config = inner.encoder.config
        self.layers = inner.encoder.encoder.layer[start:]
        self.classifier = inner.classifier

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        pooled = mean_pool(hidden, attention_mask)
        return self.classifier(F.layer_norm(pooled, pooled.shape[-1:]))


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ------------------------------------------------------------- 3. training loop with optimizer and schedule


def study_train(module: nn.Module, data: TensorData, *, epochs: int, batch_size: int, lr: float,
                dp: DPSettings | None, optimizer: str = "adamw", momentum: float = 0.9,
                schedule: str = "const", seed: int = 0, avg: str = "none", span: tuple[int, int] = (0, 1)) -> int:
    """``train_round`` plus an optimizer choice and a learning-rate schedule; returns the steps run.

    AdamW at a constant rate IS ``train_round`` (called as is). Otherwise the loop below mirrors it:
    the same Opacus wrapping (``privacy.make_private``: Poisson sampling, clipping, noise averaged over
    the public expected batch) and the same per-step order.
    """
    if optimizer == "adamw" and schedule == "const" and avg == "none":
        return train_round(module, data, loss_fn=TASK.loss, epochs=epochs, batch_size=batch_size,
                           learning_rate=lr, dp=dp).steps
    torch.manual_seed(seed)  # only the non-DP shuffling; DP sampling and noise use secret generators
    dataset = torch.utils.data.TensorDataset(data.input_ids, data.attention_mask, data.labels)
    params = [p for p in module.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif optimizer == "sgdm":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    else:
        raise ValueError(optimizer)
    module.train()
    private = None
    if dp is None:
        runner, loader = module, torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    else:
        private = privacy.make_private(module, opt, dataset, noise_multiplier=dp.noise_multiplier,
                                       max_grad_norm=dp.max_grad_norm, sample_rate=dp.sample_rate,
                                       batch_size=batch_size, device="cpu")
        runner, opt, loader = private.module, private.optimizer, private.loader
    total = epochs * len(loader)
    step = 0
    tail = [torch.zeros_like(p) for p in params] if avg == "tail" else None
    tail_n = 0
    try:
        for _ in range(epochs):
            for x, mask, labels in loader:
                # span = (this round's index within the phase, the phase's rounds): "run-linear" decays over all of them
                rate = lr * _schedule(schedule, step + span[0] * total, total * span[1]) if schedule == "run-linear" \
                    else lr * _schedule(schedule, step, total)
                for group in opt.param_groups:
                    group["lr"] = rate
                if private is not None and not len(labels):
                    opt.noise_step()  # an empty Poisson batch: noise only, as train_round takes it
                else:
                    loss = TASK.loss(runner(x, mask), labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                step += 1
                if tail is not None and step > total // 2:  # Polyak-Ruppert tail average: post-processing
                    tail_n += 1
                    with torch.no_grad():
                        for acc, p in zip(tail, params):
                            acc.add_(p.detach() - acc, alpha=1.0 / tail_n)
    finally:
        if private is not None:
            private.close()
    if tail is not None and tail_n:
        with torch.no_grad():
            for acc, p in zip(tail, params):
                p.copy_(acc)
    module.eval()
    return step


def _schedule(kind: str, step: int, total: int) -> float:
    if kind == "const":
        return 1.0
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
    if kind in ("linear", "run-linear"):
        return 1.0 - step / max(1, total)
    raise ValueError(kind)


# -------------------------------------------------------------------------------- 4. server-side optimizer


class ServerOpt:
    """FedAvg (avg), server momentum (momentum: m = β·m + Δ, w += η·m) or FedAdam on the site average's Δ."""

    def __init__(self, kind: str = "avg", lr: float = 1.0, beta: float = 0.9, tau: float = 1e-3):
        self.kind, self.lr, self.beta, self.tau = kind, lr, beta, tau
        self.m: dict | None = None
        self.v: dict | None = None

    def step(self, current: dict[str, torch.Tensor], average: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        delta = {k: average[k] - current[k] for k in current}
        if self.kind == "avg":
            return {k: current[k] + self.lr * delta[k] for k in current}
        if self.m is None:
            self.m = {k: torch.zeros_like(v) for k, v in current.items()}
            self.v = {k: torch.full_like(v, self.tau**2) for k, v in current.items()}
        if self.kind == "momentum":
            self.m = {k: self.beta * self.m[k] + delta[k] for k in current}
            return {k: current[k] + self.lr * self.m[k] for k in current}
        if self.kind == "fedadam":
            self.m = {k: 0.9 * self.m[k] + 0.1 * delta[k] for k in current}
            self.v = {k: 0.99 * self.v[k] + 0.01 * delta[k] ** 2 for k in current}
            return {k: current[k] + self.lr * self.m[k] / (self.v[k].sqrt() + self.tau) for k in current}
        raise ValueError(self.kind)


# ------------------------------------------------------------------------------------ 5. privacy planning


_CAL_PATH = SCRATCH / "calibrations.json"
_cal: dict[str, float] = {}


def calibrate(target: float, rate: float, steps: int, prior=(), also=()) -> float:
    """``privacy.calibrate_noise`` (PRV), cached on disk: a PRV bisection takes 2-50 s."""
    global _cal
    if not _cal and _CAL_PATH.exists():
        _cal = json.loads(_CAL_PATH.read_text())
    key = json.dumps([target, DELTA, rate, steps, list(map(list, privacy.canonical(prior))),
                      list(map(list, privacy.canonical(also)))])
    if key not in _cal:
        _cal[key] = privacy.calibrate_noise(target, DELTA, rate, steps, prior=prior, also=also, accountant="prv")
        SCRATCH.mkdir(parents=True, exist_ok=True)
        _CAL_PATH.write_text(json.dumps(_cal))
    return _cal[key]


def epsilon_of(history) -> float:
    return privacy.compute_epsilon(history, DELTA, "prv")[0]


@dataclass(frozen=True)
class Phase:
    """One training phase of a recipe: which parameters train, for how many rounds, and how."""

    kind: str  # "head" (head only, frozen encoder) or "lora" (LoRA B, optionally A, and the head)
    rounds: int
    epochs: int = 1  # local epochs per round
    batch: int = 128
    lr: float = 0.02
    clip: float = 1.0
    optimizer: str = "adamw"
    schedule: str = "const"
    # LoRA only
    r: int = 8
    alpha: int = 16
    layers: tuple[int, ...] | None = None  # None: all layers (the product's)
    ffa: bool = True
    # Head phase only: post-processing and data-independent choices (no privacy cost)
    avg: str = "none"  # "tail": the site returns the mean of its iterates over the second half of its local steps
    center: str = ""  # "hospital": subtract a public mean feature vector (bundled hospital set) after the layer norm;
    #                   "oracle": the sites' own training mean, NOT private, an ablation only (never selectable)
    init: str = "seeded"  # "zero": the head starts at 0 instead of PyTorch's seeded uniform init
    proj: str = ""  # "hospital-K": train the head in the top-K principal subspace of public (hospital) features;
    #                 "oracle-K": of the sites' own features, NOT private, an ablation only


@dataclass(frozen=True)
class Recipe:
    phases: tuple[Phase, ...]
    server: str = "avg"
    server_lr: float = 1.0
    head_share: float = 0.5  # with two phases: the first phase is calibrated to this share of ε (see plan_noise)
    eval_noise: float = 5.0  # per-round evaluation release (the product's eval-noise-multiplier)

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def plan_noise(recipe: Recipe, target: float | None, count: int, *, federated: bool = True) -> tuple[list, float]:
    """Each phase's (σ, q, steps) for one site, all inside ``target``, and the site's resulting ε.

    Federated: the product's count release and one evaluation per round are charged too.
    One phase: ``calibrate_noise(prior=[count], also=[evaluations])``, as client/accounting.py does.
    Two phases: phase 1 is calibrated to ``head_share × target`` (with the count and its share of
    evaluations), then phase 2 to the whole target with phase 1's entries in ``also``.
    """
    prior = [COUNT_ENTRY] if federated else []
    evals = [(recipe.eval_noise, 1.0, ROUNDS)] if federated else []
    planned = []
    for phase in recipe.phases:
        rate, per_epoch = privacy.poisson_schedule(count, phase.batch)
        planned.append((rate, per_epoch * phase.epochs * phase.rounds))
    if target is None:
        return [(None, rate, steps) for rate, steps in planned], float("inf")
    if len(planned) == 1:
        sigmas = [calibrate(target, *planned[0], prior=prior, also=evals)]
    elif len(planned) == 2:
        (q1, s1), (q2, s2) = planned
        r1 = recipe.phases[0].rounds
        evals1 = [(recipe.eval_noise, 1.0, r1)] if federated else []
        sigma1 = calibrate(target * recipe.head_share, q1, s1, prior=prior, also=evals1)
        sigma2 = calibrate(target, q2, s2, prior=prior, also=[*evals, (sigma1, q1, s1)])
        sigmas = [sigma1, sigma2]
    else:
        raise ValueError("at most two phases")
    entries = [(s, q, n) for s, (q, n) in zip(sigmas, planned)]
    return entries, epsilon_of([*prior, *evals, *entries])


# ------------------------------------------------------------------------------------------- the federation


def run_recipe(recipe: Recipe, target: float | None, cache: dict, *, federated: bool = True,
               test: bool = False, full_model: bool = False, sites_raw=None, tag: str = "") -> dict:
    """One run: FedAvg rounds over the 4 sites (or one site holding the pooled data when not federated).

    Head phases train ``FeatureHead`` on cached pooled features; LoRA phases train the top layers on
    cached layer inputs (``TopLayers``), or the whole PEFT model on tokens with ``full_model``.
    Validation macro-F1 (pooled sites' validation splits) after every round; test only with ``test``.
    """
    started = time.perf_counter()
    lora_phase = next((p for p in recipe.phases if p.kind == "lora"), None)
    if lora_phase is not None:
        if not full_model:
            assert lora_phase.layers is not None and min(lora_phase.layers) >= TOP_START, "cached path: top layers only"
        model = build_lora(lora_phase.r, lora_phase.alpha, None if lora_phase.layers is None else list(lora_phase.layers),
                           lora_phase.ffa)
        lora_module = model if full_model else TopLayers(model, TOP_START)
    else:
        # Head only: on tokens (full_model) the product's frozen model computes the features.
        model = build_lora(8, 16, None, True) if full_model else None
        lora_module = None
    first = recipe.phases[0]
    proj = projection(first.proj, cache)
    head = FeatureHead(384 if proj is None else proj.shape[1], len(NAMES), CONFIG.seed)
    if first.init == "zero":
        with torch.no_grad():
            head.classifier.weight.zero_()
            head.classifier.bias.zero_()
    center = center_vector(first.center, cache)
    attach_center(head.classifier, center, proj)
    if federated:
        train_feats = [c for c in cache["train"]]
    else:
        needs_hidden = lora_phase is not None and not full_model
        train_feats = [Cached(torch.cat([c.pooled for c in cache["train"]]),
                              torch.cat([c.hidden for c in cache["train"]]) if needs_hidden else None,
                              torch.cat([c.mask for c in cache["train"]]), torch.cat([c.labels for c in cache["train"]]))]
    if full_model:
        raw_train = [t for t, _ in sites_raw] if federated else [cat([t for t, _ in sites_raw])]
    counts = [len(c.labels) for c in train_feats]
    plans = [plan_noise(recipe, target, n, federated=federated) for n in counts]
    # The global state: the head (FeatureHead names) and, once a LoRA phase starts, the LoRA module's trainables.
    global_head = trainable_state(head)
    server = ServerOpt(recipe.server, recipe.server_lr)
    history = []
    round_no = 0
    val_pooled = cat_cached(cache["val"]) if lora_phase is not None else Cached(
        torch.cat([c.pooled for c in cache["val"]]), None, torch.cat([c.mask for c in cache["val"]]),
        torch.cat([c.labels for c in cache["val"]]))
    for p_index, phase in enumerate(recipe.phases):
        if phase.kind == "lora":
            # Hand the head over to the PEFT model's trainable head copy.
            folded = fold_head(global_head, center, proj)
            with torch.no_grad():
                head_module(model).weight.copy_(folded["classifier.weight"])
                head_module(model).bias.copy_(folded["classifier.bias"])
            global_state = trainable_state(lora_module)
            server = ServerOpt(recipe.server, recipe.server_lr)
        for _ in range(phase.rounds):
            round_no += 1
            span = (round_no - 1 - sum(p.rounds for p in recipe.phases[:p_index]), phase.rounds)
            states = []
            for s, feats in enumerate(train_feats):
                sigma, rate, steps = plans[s][0][p_index]
                dp = None if sigma is None else DPSettings(sigma, phase.clip, rate)
                if phase.kind == "head":
                    head.load_state_dict(global_head)
                    if full_model:  # the product would compute features with a forward pass each round
                        feats_now = encode_features(model, raw_train[s], keep_hidden=False).features()
                    else:
                        feats_now = feats.features()
                    study_train(head, feats_now, epochs=phase.epochs, batch_size=phase.batch, lr=phase.lr, dp=dp,
                                optimizer=phase.optimizer, schedule=phase.schedule, avg=phase.avg, span=span)
                    states.append(trainable_state(head))
                else:
                    load_trainable(lora_module, global_state)
                    data = raw_train[s] if full_model else feats.top()
                    study_train(lora_module, data, epochs=phase.epochs, batch_size=phase.batch, lr=phase.lr, dp=dp,
                                optimizer=phase.optimizer, schedule=phase.schedule, avg=phase.avg, span=span)
                    states.append(trainable_state(lora_module))
            weights = np.array(counts, dtype=float) / sum(counts)
            average = {k: sum(w * st[k] for w, st in zip(weights, states)) for k in states[0]}
            if phase.kind == "head":
                global_head = server.step(global_head, average)
                head.load_state_dict(global_head)
                val_f1 = macro_f1(val_pooled.labels, predict(head, val_pooled.features()))
            else:
                global_state = server.step(global_state, average)
                load_trainable(lora_module, global_state)
                val_f1 = evaluate_lora(lora_module, model, val_pooled, full_model, sites_raw, "val")
            history.append(round(val_f1, 4))
    out = {"val_f1_by_round": history, "val_f1": history[-1],
           "epsilon": [round(p[1], 3) for p in plans], "sigmas": [[round(e[0], 4) if e[0] else None for e in p[0]]
                                                                   for p in plans][:2],
           "wall_s": round(time.perf_counter() - started, 1)}
    # Logit adjustment (post-processing): bias -= τ·log π̂, π̂ from the sites' class histograms released with the
    # count's Gaussian noise (a histogram has L2 sensitivity 1, so it costs exactly the count's entry).
    prior = class_prior([c.labels for c in train_feats], noisy=target is not None)
    if recipe.phases[-1].kind == "head":
        bias, run_val = head.classifier.bias, lambda: macro_f1(val_pooled.labels, predict(head, val_pooled.features()))
        run_test = lambda: macro_f1(cache["test"].labels, predict(head, cache["test"].features()))
    else:
        bias = head_module(model).bias
        run_val = lambda: evaluate_lora(lora_module, model, val_pooled, full_model, sites_raw, "val")
        run_test = lambda: evaluate_lora(lora_module, model, cache["test"], full_model, sites_raw, "test")
    out["val_f1_by_tau"], out["test_f1_by_tau"] = {}, {}
    for tau in TAUS:
        with torch.no_grad():
            bias.sub_(tau * prior.log())
        out["val_f1_by_tau"][tau] = round(out["val_f1"] if tau == 0 else run_val(), 4)
        if test:
            out["test_f1_by_tau"][tau] = round(run_test(), 4)
        with torch.no_grad():
            bias.add_(tau * prior.log())
    if test:
        out["test_f1"] = out["test_f1_by_tau"][0.0]
    return out


TAUS = (0.0, 0.5, 1.0)


def class_prior(labels: list[torch.Tensor], noisy: bool) -> torch.Tensor:
    """The federation's class shares from each site's class histogram (+ N(0, 20²) per bin under DP), summed."""
    total = torch.zeros(len(NAMES), dtype=torch.float64)
    for y in labels:
        hist = torch.bincount(y, minlength=len(NAMES)).double()
        if noisy:
            hist = hist + torch.normal(0.0, COUNT_NOISE_MULTIPLIER, hist.shape, generator=privacy.secret_generator("cpu"),
                                       dtype=torch.float64)
        total += hist
    total = total.clamp(min=1.0)
    return (total / total.sum()).float()


def cat_cached(parts: list[Cached]) -> Cached:
    return Cached(torch.cat([c.pooled for c in parts]),
                  None if parts[0].hidden is None else torch.cat([c.hidden for c in parts]),
                  torch.cat([c.mask for c in parts]), torch.cat([c.labels for c in parts]))


_RAW: dict = {}


def evaluate_lora(lora_module, model, cached: Cached, full_model: bool, sites_raw, which: str) -> float:
    if not full_model:
        return macro_f1(cached.labels, predict(lora_module, cached.top()))
    if which not in _RAW:
        _RAW[which] = cat([v for _, v in sites_raw]) if which == "val" else tasks.central_test_set(CONFIG)
    return macro_f1(_RAW[which].labels, predict(model, _RAW[which]))


# ------------------------------------------------------------------------------------------------ stages

EPSILONS = (1.0, 3.0, 8.0, None)  # None: no DP


def eval_noise_for(target: float | None) -> float:
    """The per-round evaluation's noise: the product's 5.0, except at ε=1, where three σ=5 evaluations alone
    spend ε=1.34 > 1 (calibration refuses); σ=20 there (three of them plus the count: ε=0.35 alone)."""
    return 20.0 if target is not None and target < 2 else 5.0


def key_of(prefix: str, recipe: Recipe, target, federated: bool) -> str:
    parts = []
    for ph in recipe.phases:
        bits = f"{ph.kind}x{ph.rounds}:E{ph.epochs},B{ph.batch},lr{ph.lr:g},C{ph.clip:g},{ph.optimizer},{ph.schedule}"
        bits += (f",avg-{ph.avg}" if ph.avg != "none" else "") + (f",center-{ph.center}" if ph.center else "")
        bits += (",init-zero" if ph.init == "zero" else "") + (f",proj-{ph.proj}" if ph.proj else "")
        if ph.kind == "lora":
            bits += f",r{ph.r},a{ph.alpha},L{'all' if ph.layers is None else '-'.join(map(str, ph.layers))},{'ffa' if ph.ffa else 'AB'}"
        parts.append(bits)
    extra = f"|server={recipe.server}:{recipe.server_lr:g}" if recipe.server != "avg" else ""
    if len(recipe.phases) > 1:
        extra += f"|share={recipe.head_share:g}"
    if recipe.eval_noise != eval_noise_for(target):
        extra += f"|evalnoise={recipe.eval_noise:g}"
    eps = "nodp" if target is None else f"eps{target:g}"
    return f"{prefix}/{'fed' if federated else 'central'}/{eps}/" + "+".join(parts) + extra


def trial(prefix: str, recipe: Recipe, target, cache, *, federated=True, reps=1, test=False, full_model=False,
          sites_raw=None, force=False, eval_noise: float | None = None) -> dict:
    """Run a recipe `reps` times (DP noise differs every time) and record mean validation macro-F1."""
    recipe = dataclasses.replace(recipe, eval_noise=eval_noise or eval_noise_for(target))
    key = key_of(prefix, recipe, target, federated) + (f"|reps{reps}" if reps > 1 else "") + ("|test" if test else "")
    done = recorded(key)
    if done is not None and not force:
        return done
    runs = [run_recipe(recipe, target, cache, federated=federated, test=test, full_model=full_model,
                       sites_raw=sites_raw) for _ in range(reps)]
    vals = [r["val_f1"] for r in runs]
    out = {"val_f1": round(float(np.mean(vals)), 4), "val_f1_sd": round(float(np.std(vals)), 4) if reps > 1 else None,
           "val_f1_runs": vals, "val_f1_by_round": runs[0]["val_f1_by_round"], "epsilon_per_site": runs[0]["epsilon"],
           "sigmas_site0_site1": runs[0]["sigmas"], "wall_s_per_run": runs[0]["wall_s"],
           "recipe": recipe.describe(), "target_epsilon": target, "federated": federated}
    by_tau = {tau: round(float(np.mean([r["val_f1_by_tau"][tau] for r in runs])), 4) for tau in TAUS}
    tau_best = max(by_tau, key=by_tau.get)
    out.update(val_f1_by_tau=by_tau, tau_selected_on_val=tau_best, val_f1_tau=by_tau[tau_best])
    if test:
        tests = [r["test_f1"] for r in runs]
        out["test_f1"] = round(float(np.mean(tests)), 4)
        out["test_f1_runs"] = [round(t, 4) for t in tests]
        out["test_f1_tau"] = round(float(np.mean([r["test_f1_by_tau"][tau_best] for r in runs])), 4)
    record(key, out)
    return out


def head(rounds=3, **kw) -> Phase:
    return Phase("head", rounds, **kw)


def best_of(results: list[tuple[object, dict]]):
    return max(results, key=lambda item: item[1]["val_f1"])


@torch.no_grad()
def head_grad_norms(cache) -> dict:
    """Per-example gradient norms of the head at its start (pooled training features of all sites)."""
    feats = cat_cached(cache["train"])
    hd = FeatureHead(384, len(NAMES), CONFIG.seed)
    x = F.layer_norm(feats.pooled, feats.pooled.shape[-1:])
    p = torch.softmax(hd.classifier(x), dim=-1)
    err = p - F.one_hot(feats.labels, len(NAMES)).float()
    norms = err.norm(dim=1) * (x.norm(dim=1) ** 2 + 1).sqrt()
    q = torch.quantile(norms, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))
    return {"min": float(q[0]), "p10": float(q[1]), "median": float(q[2]), "p90": float(q[3]), "max": float(q[4])}


def stage_probe() -> None:
    """Head-only (DP linear probing) for all rounds, federated and centralized: broad and cheap."""
    cache = load_cache()
    record("probe/head_grad_norms_at_start", head_grad_norms(cache))
    # Non-private references: logistic regression on the same features (centralized and federated).
    for epochs, lr in [(3, 0.003), (10, 0.003), (30, 0.001), (30, 0.003), (10, 0.01)]:
        trial("probe", Recipe((head(1, epochs=epochs, batch=128, lr=lr),)), None, cache, federated=False)
        trial("probe", Recipe((head(3, epochs=max(1, epochs // 3), batch=128, lr=lr),)), None, cache)
    # 1. ε=8, federated, DP-AdamW: batch × local epochs × learning rate.
    grid = []
    for batch in (128, 256, 512):
        for epochs in (1, 5, 20):
            for lr in (0.003, 0.01, 0.03, 0.1):
                ph = head(epochs=epochs, batch=batch, lr=lr)
                grid.append((ph, trial("probe", Recipe((ph,)), 8.0, cache, reps=2)))
    best, res = best_of(grid)
    log("probe: best ε=8 DP-AdamW", best, res["val_f1"])
    # 2. clipping bound (all per-example norms are far above 1: Adam should not care), schedules, SGD with
    #    momentum, and free post-processing / data-independent choices: tail averaging, public centring, zero init.
    for clip in (0.1, 10.0):
        trial("probe", Recipe((dataclasses.replace(best, clip=clip),)), 8.0, cache, reps=2)
    improvements = []
    for schedule in ("cosine", "linear"):
        for mult in (1.0, 3.0):
            ph = dataclasses.replace(best, schedule=schedule, lr=best.lr * mult)
            improvements.append((ph, trial("probe", Recipe((ph,)), 8.0, cache, reps=2)))
    for lr in (0.3, 1.0, 3.0):
        ph = dataclasses.replace(best, optimizer="sgdm", lr=lr, schedule="linear")
        improvements.append((ph, trial("probe", Recipe((ph,)), 8.0, cache, reps=2)))
    for mult in (1.0, 3.0):
        ph = dataclasses.replace(best, avg="tail", lr=best.lr * mult)
        improvements.append((ph, trial("probe", Recipe((ph,)), 8.0, cache, reps=2)))
    for center in ("hospital", "oracle"):
        ph = dataclasses.replace(best, center=center)
        res = trial("probe", Recipe((ph,)), 8.0, cache, reps=2)
        if center != "oracle":
            improvements.append((ph, res))
    ph = dataclasses.replace(best, init="zero")
    improvements.append((ph, trial("probe", Recipe((ph,)), 8.0, cache, reps=2)))
    grid += improvements
    best, res = best_of(grid)
    log("probe: best single change", best, res["val_f1"])
    # Combine the changes that helped (each judged against the base on validation).
    base_f1 = res_base = max(r["val_f1"] for _, r in grid[:36])
    helped = [ph for ph, r in improvements if r["val_f1"] > base_f1 + 0.005]
    combo = best
    for ph in helped:
        for knob in ("schedule", "avg", "center", "init"):
            if getattr(ph, knob) != getattr(Phase("head", 3), knob) and getattr(combo, knob) == getattr(Phase("head", 3), knob):
                combo = dataclasses.replace(combo, **{knob: getattr(ph, knob)})
    if combo != best:
        for mult in (0.5, 1.0, 2.0):
            ph = dataclasses.replace(combo, lr=combo.lr * mult)
            grid.append((ph, trial("probe", Recipe((ph,)), 8.0, cache, reps=2)))
        for epochs in (10, 40):
            ph = dataclasses.replace(combo, epochs=epochs)
            grid.append((ph, trial("probe", Recipe((ph,)), 8.0, cache, reps=2)))
    best, res = best_of(grid)
    log("probe: best ε=8 head-only", best, res["val_f1"], "(base", res_base, ")")
    # 3. server-side optimizer on the noisy average.
    for server, slr in (("momentum", 1.0), ("momentum", 0.5), ("fedadam", 0.03), ("fedadam", 0.1)):
        trial("probe", Recipe((best,), server=server, server_lr=slr), 8.0, cache, reps=2)
    # 4. ε=3 and ε=1: does the best local schedule move? (few steps at a low noise vs many at a high one)
    for target in (3.0, 1.0):
        sub = []
        for epochs in (1, 5, 20):
            for lr_mult in (0.3, 1.0, 3.0):
                ph = dataclasses.replace(best, epochs=epochs, lr=best.lr * lr_mult)
                sub.append((ph, trial("probe", Recipe((ph,)), target, cache, reps=2)))
        b, r = best_of(sub)
        log(f"probe: best ε={target:g} head-only", b, r["val_f1"])
    # 5. centralized DP linear probing over the pooled 3,600 (no count or evaluation releases to pay).
    for target in (8.0, 3.0, 1.0):
        sub = []
        for batch in (256, 1024):
            for epochs in (20, 60):
                for lr in (0.01, 0.03):
                    ph = head(1, epochs=epochs, batch=batch, lr=lr)
                    sub.append((ph, trial("probe", Recipe((ph,)), target, cache, federated=False)))
        b, r = best_of(sub)
        log(f"probe: best centralized ε={target:g} head-only", b, r["val_f1"])




def HEAD_ONLY_AVG(v: dict) -> bool:
    return len(v["recipe"]["phases"]) == 1 and v["recipe"]["phases"][0]["kind"] == "head" and v["recipe"]["server"] == "avg"


def stage_refine() -> None:
    """Around the best head-only recipe: learning rate, local epochs, batch and a run-long schedule, 4 repeats each
    (the DP noise alone moves a single run's validation macro-F1 by ~0.02-0.03)."""
    cache = load_cache()
    _, res = best_recorded("probe", 8.0, kind=HEAD_ONLY_AVG)
    base = phase_from(res["recipe"]["phases"][0])
    log("refine: from", base, res["val_f1"])
    grid = [(base, trial("refine", Recipe((base,)), 8.0, cache, reps=4))]
    for lr in (0.02, 0.05, 0.1):
        ph = dataclasses.replace(base, lr=lr)
        grid.append((ph, trial("refine", Recipe((ph,)), 8.0, cache, reps=4)))
    for sched, lr in (("run-linear", base.lr), ("run-linear", 2 * base.lr)):
        ph = dataclasses.replace(base, schedule=sched, lr=lr)
        grid.append((ph, trial("refine", Recipe((ph,)), 8.0, cache, reps=4)))
    best, res = best_of(grid)
    for epochs in (10, 40):
        ph = dataclasses.replace(best, epochs=epochs)
        grid.append((ph, trial("refine", Recipe((ph,)), 8.0, cache, reps=4)))
    best, res = best_of(grid)
    for batch in (128, 512):
        ph = dataclasses.replace(best, batch=batch)
        grid.append((ph, trial("refine", Recipe((ph,)), 8.0, cache, reps=4)))
    ph = dataclasses.replace(best, optimizer="sgdm", lr=0.1)
    grid.append((ph, trial("refine", Recipe((ph,)), 8.0, cache, reps=4)))
    best, res = best_of(grid)
    log("refine: best ε=8 head-only", best, res["val_f1"])
    for target in (3.0, 1.0):
        sub = []
        for epochs in (best.epochs // 2, best.epochs):
            for mult in (0.5, 1.0, 2.0):
                ph = dataclasses.replace(best, epochs=max(1, epochs), lr=best.lr * mult)
                sub.append((ph, trial("refine", Recipe((ph,)), target, cache, reps=3)))
        b, r = best_of(sub)
        log(f"refine: best ε={target:g} head-only", b, r["val_f1"])


# ------------------------------------------ 6. one-shot DP ridge head from sufficient statistics (SSP)


def ssp_rows(pooled: torch.Tensor) -> torch.Tensor:
    """x = [layer_norm(pooled)/√d, 1]/√2: every row has L2 norm 1 (the layer norm fixes ‖·‖ = √d)."""
    z = F.layer_norm(pooled.double(), pooled.shape[-1:]) / math.sqrt(pooled.shape[-1])
    return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1) / math.sqrt(2)


def ssp_release(pooled: torch.Tensor, labels: torch.Tensor, sigma: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One site's Gaussian release of Σ x xᵀ and Σ x yᵀ (y one-hot). One example changes them by a pair of
    matrices of squared Frobenius norm ‖x‖⁴ + ‖x‖²‖y‖² = 2, so the release is the Gaussian mechanism with
    sensitivity √2: one ledger entry (σ, 1.0, 1). The noise on Σ x xᵀ is symmetrised (post-processing)."""
    x = ssp_rows(pooled)
    y = F.one_hot(labels, len(NAMES)).double()
    a, b = x.T @ x, x.T @ y
    if sigma is not None:
        g = privacy.secret_generator("cpu")
        scale = sigma * math.sqrt(2)
        noise = torch.normal(0.0, scale, a.shape, generator=g, dtype=torch.float64)
        a = a + (noise + noise.T) / 2
        b = b + torch.normal(0.0, scale, b.shape, generator=g, dtype=torch.float64)
    return a, b


def ssp_solve(a: torch.Tensor, b: torch.Tensor, lam: float, balanced: bool) -> torch.Tensor:
    """Ridge solution W = (A + λI)⁻¹ B; `balanced` divides each class column by its (noisy) count, the last row
    of B (the bias feature's sum, ×√2), so small classes weigh as much as large ones: macro-F1's view."""
    if balanced:
        counts = (b[-1] * math.sqrt(2)).clamp(min=5.0)  # the bias row of B holds n_k/√2
        b = b / counts * counts.mean()
    eye = torch.eye(len(a), dtype=a.dtype)
    return torch.linalg.solve(a + lam * eye, b)


def ssp_predict(w: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    return (ssp_rows(pooled) @ w).argmax(dim=1)


def ssp_to_head(w: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """The ridge solution as MeanPoolClassifier's Linear head on layer_norm(pooled): logits ×`scale`."""
    d = w.shape[0] - 1
    weight = (w[:d] / (math.sqrt(2) * math.sqrt(d))).T * scale
    bias = w[d] / math.sqrt(2) * scale
    return {"classifier.weight": weight.float().contiguous(), "classifier.bias": bias.float().contiguous()}


def ssp_sigma(target: float | None, federated: bool, eval_noise: float, share: float = 1.0) -> float | None:
    """The release's noise: all of the target (or `share` of it) after the count and evaluations, PRV."""
    if target is None:
        return None
    prior = [COUNT_ENTRY] if federated else []
    evals = [(eval_noise, 1.0, ROUNDS)] if federated else []
    return calibrate(target * share, 1.0, 1, prior=prior, also=evals)


def ssp_run(cache, target, *, federated: bool, lam: float, balanced: bool, split: str = "val") -> float:
    sigma = ssp_sigma(target, federated, eval_noise_for(target))
    parts = cache["train"] if federated else [cat_cached(cache["train"])]
    a = b = 0
    for c in parts:
        ai, bi = ssp_release(c.pooled, c.labels, sigma)
        a, b = a + ai, b + bi
    w = ssp_solve(a, b, lam, balanced)
    data = cat_cached(cache["val"]) if split == "val" else cache["test"]
    return macro_f1(data.labels, ssp_predict(w, data.pooled))


def stage_ssp() -> None:
    """DP ridge head from sufficient statistics, one release per site, summed by the server (exact FedAvg)."""
    cache = load_cache()
    for target in EPSILONS:
        for federated in (True, False):
            rows = []
            for lam in (0.3, 1, 3, 10, 30, 100, 300, 1000, 3000):
                for balanced in (False, True):
                    key = (f"ssp/{'fed' if federated else 'central'}/{'nodp' if target is None else f'eps{target:g}'}/"
                           f"lam{lam:g},{'balanced' if balanced else 'plain'}|reps4")
                    if recorded(key) is None:
                        vals = [ssp_run(cache, target, federated=federated, lam=lam, balanced=balanced)
                                for _ in range(4 if target is not None else 1)]
                        record(key, {"val_f1": round(float(np.mean(vals)), 4), "val_f1_sd": round(float(np.std(vals)), 4),
                                     "sigma": ssp_sigma(target, federated, eval_noise_for(target)), "lam": lam,
                                     "balanced": balanced, "target_epsilon": target, "federated": federated})
                    rows.append((key, recorded(key)))
            key, best = max(rows, key=lambda kv: kv[1]["val_f1"])
            log("ssp best", key, best["val_f1"])


def stage_extra() -> None:
    """Around the refined head-only recipe: a public low-dimensional subspace for the head (noise norm grows with
    √d), cheaper evaluations at ε=3 (budget split), and logit adjustment (recorded by every run: val_f1_by_tau)."""
    cache = load_cache()
    _, res = best_recorded("refine", 8.0, kind=HEAD_ONLY_AVG)
    base = phase_from(res["recipe"]["phases"][0])
    log("extra: from", base, res["val_f1"])
    for target in (8.0, 3.0):
        trial("extra", Recipe((base,)), target, cache, reps=4)
        for proj in ("hospital-32", "hospital-64", "hospital-128", "oracle-64"):
            trial("extra", Recipe((dataclasses.replace(base, proj=proj),)), target, cache, reps=4)
    for noise in (10.0, 20.0):
        trial("extra", Recipe((base,)), 3.0, cache, reps=4, eval_noise=noise)


def best_recorded(prefix, target=8.0, federated=True, kind=None) -> tuple[str, dict]:
    """The best recorded trial under `prefix` (one or several) at `target` (validation macro-F1); oracle ablations
    (not private) are never selectable."""
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    eps = "nodp" if target is None else f"eps{target:g}"
    wants = tuple(f"{p}/{'fed' if federated else 'central'}/{eps}/" for p in ((prefix,) if isinstance(prefix, str) else prefix))
    rows = [(k, v) for k, v in results.items() if k.startswith(wants) and "|test" not in k and "oracle" not in k
            and (kind is None or kind(v))]
    return max(rows, key=lambda kv: kv[1]["val_f1"])


def phase_from(d: dict) -> Phase:
    d = dict(d)
    if d.get("layers") is not None:
        d["layers"] = tuple(d["layers"])
    return Phase(**d)


def recipe_from(d: dict) -> Recipe:
    d = dict(d)
    d["phases"] = tuple(phase_from(p) for p in d["phases"])
    return Recipe(**d)


def lora_grad_norms(cache, lora: Phase, head_state: dict) -> dict:
    """Per-example gradient norms of the LoRA phase's trainables (B and head) at its start, 256 site-0 examples."""
    from opacus import GradSampleModule

    model = build_lora(lora.r, lora.alpha, list(lora.layers), lora.ffa)
    with torch.no_grad():
        head_module(model).weight.copy_(head_state["classifier.weight"])
        head_module(model).bias.copy_(head_state["classifier.bias"])
    top = TopLayers(model, TOP_START)
    gsm = GradSampleModule(top, batch_first=True, loss_reduction="mean")
    data = cache["train"][0].top().subset(range(256))
    top.train()
    loss = TASK.loss(gsm(data.input_ids, data.attention_mask), data.labels)
    loss.backward()
    per = {"lora": torch.zeros(256), "head": torch.zeros(256)}
    for name, p in gsm.named_parameters():
        if p.requires_grad and p.grad_sample is not None:
            part = "head" if "classifier" in name else "lora"
            per[part] += p.grad_sample.reshape(256, -1).pow(2).sum(1)  # Opacus' grad_sample: per-example gradients
    gsm._close()
    out = {}
    for part, sq in [*per.items(), ("total", per["lora"] + per["head"])]:
        q = torch.quantile(sq.sqrt(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))
        out[part] = {name: round(float(v), 4) for name, v in zip(("p10", "p25", "median", "p75", "p90"), q)}
        out[part]["share_above_1"] = round(float((sq.sqrt() > 1).float().mean()), 3)
    return out


def stage_lora() -> None:
    """Linear probing first, then LoRA on the top layers (cached inputs): rounds split, rank, FFA, clip, lr, ε split."""
    cache = load_cache()
    hkey, hres = best_recorded("refine", 8.0, kind=HEAD_ONLY_AVG)
    best_head = phase_from(hres["recipe"]["phases"][0])
    log("lora: head phase from probe:", best_head, hres["val_f1"])
    top2 = (4, 5)
    base_lora = Phase("lora", 1, epochs=1, batch=128, lr=0.01, clip=1.0, r=8, alpha=16, layers=top2, ffa=True)

    # Gradient norms at the LoRA phase's start, with a head trained by two DP rounds.
    grid = []
    for h in (2, 1):
        lora = dataclasses.replace(base_lora, rounds=3 - h)
        rec = Recipe((dataclasses.replace(best_head, rounds=h), lora), head_share=0.5)
        grid.append((rec, trial("lora", rec, 8.0, cache)))
    rec0, res0 = best_of(grid)
    h = rec0.phases[0].rounds
    # A head trained non-privately-ish only matters for the norms' scale: use a 2-round DP head from a fresh run.
    head_state = _trained_head(cache, dataclasses.replace(best_head, rounds=h), 8.0)
    if recorded("lora/grad_norms_at_lora_start|v2") is None:
        record("lora/grad_norms_at_lora_start|v2", lora_grad_norms(cache, rec0.phases[1], head_state))
    # Without the head phase: LoRA (top 2 layers) for all 3 rounds, the product's way but fewer layers.
    rec = Recipe((dataclasses.replace(base_lora, rounds=3, lr=0.02),))
    grid.append((rec, trial("lora", rec, 8.0, cache)))
    # Rank, FFA, clip, lr and the budget split around the best two-phase recipe.
    def around(**changes):
        rec = dataclasses.replace(rec0, phases=(rec0.phases[0], dataclasses.replace(rec0.phases[1], **changes)))
        grid.append((rec, trial("lora", rec, 8.0, cache)))
    for lr in (0.003, 0.03):
        around(lr=lr)
    for clip in (0.1, 0.3):
        around(clip=clip)
    for r in (2, 4):
        around(r=r, alpha=2 * r)
    around(ffa=False)
    around(layers=(5,))
    for share in (0.8,):
        rec = dataclasses.replace(rec0, head_share=share)
        grid.append((rec, trial("lora", rec, 8.0, cache)))
    best, res = best_of(grid)
    log("lora: best", best, res["val_f1"])


def _trained_head(cache, phase: Phase, target: float) -> dict:
    """A head trained by `phase` (federated, DP): only used to measure the LoRA phase's gradient norms."""
    hd = FeatureHead(384, len(NAMES), CONFIG.seed)
    state = trainable_state(hd)
    plans = [plan_noise(Recipe((phase,)), target, len(c.labels)) for c in cache["train"]]
    for _ in range(phase.rounds):
        states = []
        for s, c in enumerate(cache["train"]):
            hd.load_state_dict(state)
            sigma, rate, _ = plans[s][0][0]
            study_train(hd, c.features(), epochs=phase.epochs, batch_size=phase.batch, lr=phase.lr,
                        dp=DPSettings(sigma, phase.clip, rate), optimizer=phase.optimizer, schedule=phase.schedule)
            states.append(trainable_state(hd))
        state = {k: sum(st[k] for st in states) / len(states) for k in state}
    return state


def stage_baseline() -> None:
    """Centralized non-private LoRA (P4's denominator: the product's model, LoRA r=8 on all layers, A and B
    trained, the 3,600 pooled training examples), learning rate AND epochs chosen on validation."""
    if recorded("baseline/central/nodp/lora-all-r8|selected") is not None:
        return
    sites = site_splits()
    pooled, val = cat([t for t, _ in sites]), cat([v for _, v in sites])
    candidates = []
    for lr in (0.02, 0.005, 0.002):
        key = f"baseline/central/nodp/lora-all-r8/lr{lr:g}"
        if recorded(key) is not None:
            res = recorded(key)
            candidates += [(lr, e + 1, f, res.get("state_path")) for e, f in enumerate(res["val_f1_by_epoch"])]
            continue
        torch.manual_seed(0)
        model = build_model(CONFIG.model, len(NAMES), lora_r=8, lora_alpha=16, ffa=False, seed=CONFIG.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # train_round's optimizer, kept across epochs
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
            pooled.input_ids, pooled.attention_mask, pooled.labels), batch_size=128, shuffle=True)
        by_epoch, started = [], time.perf_counter()
        for epoch in range(1, 4):
            model.train()
            for ids, mask, labels in loader:
                loss = TASK.loss(model(ids, mask), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            f1 = macro_f1(val.labels, predict(model, val))
            by_epoch.append(round(f1, 4))
            path = SCRATCH / f"baseline_lr{lr:g}_e{epoch}.pt"
            torch.save(trainable_state(model), path)
            candidates.append((lr, epoch, f1, str(path)))
            log(f"baseline lr={lr:g} epoch {epoch}: val macro-F1 {f1:.4f} ({time.perf_counter() - started:.0f}s)")
            if epoch == 1 and f1 < 0.15:  # diverged: the next epochs cannot be chosen either
                break
        record(key, {"val_f1_by_epoch": by_epoch, "wall_s": round(time.perf_counter() - started, 1),
                     "steps_per_epoch": len(loader)})
    lr, epoch, f1, path = max(candidates, key=lambda c: c[2])
    model = build_model(CONFIG.model, len(NAMES), lora_r=8, lora_alpha=16, ffa=False, seed=CONFIG.seed)
    load_trainable(model, torch.load(path))
    test = tasks.central_test_set(CONFIG)
    record("baseline/central/nodp/lora-all-r8|selected", {
        "learning_rate": lr, "epochs": epoch, "val_f1": round(f1, 4),
        "test_f1": round(macro_f1(test.labels, predict(model, test)), 4)})


def stage_baseline_tau() -> None:
    """The selected non-private centralized LoRA baseline with logit adjustment too (τ chosen on validation, the
    exact class prior of the pooled training data), so that the recipe's τ does not flatter the ratio."""
    sel = recorded("baseline/central/nodp/lora-all-r8|selected")
    if sel is None or recorded("baseline/central/nodp/lora-all-r8|selected|tau") is not None:
        return
    sites = site_splits()
    val, test = cat([v for _, v in sites]), tasks.central_test_set(CONFIG)
    prior = class_prior([t.labels for t, _ in sites], noisy=False)
    model = build_model(CONFIG.model, len(NAMES), lora_r=8, lora_alpha=16, ffa=False, seed=CONFIG.seed)
    load_trainable(model, torch.load(SCRATCH / f"baseline_lr{sel['learning_rate']:g}_e{sel['epochs']}.pt"))
    model.eval()
    with torch.no_grad():
        logits = {name: torch.cat([model(d.input_ids[i:i + 128], d.attention_mask[i:i + 128])
                                   for i in range(0, len(d), 128)]) for name, d in (("val", val), ("test", test))}
    by_tau = {tau: round(macro_f1(val.labels, (logits["val"] - tau * prior.log()).argmax(1)), 4) for tau in TAUS}
    tau = max(by_tau, key=by_tau.get)
    record("baseline/central/nodp/lora-all-r8|selected|tau", {
        "val_f1_by_tau": by_tau, "tau_selected_on_val": tau, "val_f1_tau": by_tau[tau],
        "test_f1_tau": round(macro_f1(test.labels, (logits["test"] - tau * prior.log()).argmax(1)), 4)})


# The product's recipe before this study (now `lora-rounds=3`).
DEFAULT_RECIPE = Recipe((Phase("lora", 3, epochs=1, batch=128, lr=0.02, clip=1.0, r=8, alpha=16, layers=None,
                               ffa=True),))


def stage_default() -> None:
    """The product's earlier recipe (LoRA r=8 on all layers, FFA, DP-AdamW lr 0.02, batch 128, 3 rounds) at ε=8."""
    cache = load_cache()
    trial("default", DEFAULT_RECIPE, 8.0, cache, test=True, full_model=True, sites_raw=site_splits())


def selected_head_only(target) -> tuple[Recipe, float | None]:
    """The head-only recipe chosen on validation for `target`: the refine stage's best at ε 8/3/1 (4- and 3-repeat
    means), the probe's best without DP; evaluations cheaper at ε=3 (extra stage: +0.02 on validation)."""
    if target is None:
        _, res = best_recorded("probe", None, kind=HEAD_ONLY_AVG)
        return recipe_from(res["recipe"]), None
    _, res = best_recorded("refine", target, kind=HEAD_ONLY_AVG)
    return recipe_from(res["recipe"]), (10.0 if target == 3.0 else None)


def stage_confirm() -> None:
    """Selected recipes with test figures: federated and centralized head-only (DP linear probing) at ε 1/3/8 and
    without DP (5 repeats for the federation, 3 centralized), and the best two-phase (LP then LoRA) recipe at ε=8."""
    cache = load_cache()
    for target in EPSILONS:
        rec, eval_noise = selected_head_only(target)
        trial("confirm", rec, target, cache, test=True, reps=5, eval_noise=eval_noise)
        _, cres = best_recorded("probe", target, federated=False, kind=HEAD_ONLY_AVG)
        trial("confirm", recipe_from(cres["recipe"]), target, cache, test=True, reps=3, federated=False)
    two = [(k, v) for k, v in json.loads(OUT.read_text()).items() if k.startswith("lora/fed/eps8/") and "recipe" in v
           and len(v["recipe"]["phases"]) == 2]
    if two:
        _, best = max(two, key=lambda kv: kv[1].get("val_f1_tau", kv[1]["val_f1"]))
        trial("confirm", recipe_from(best["recipe"]), 8.0, cache, test=True, reps=2)
    # The product's way with fewer layers: LoRA on the top 2 layers for all 3 rounds (no linear probing).
    trial("confirm", Recipe((Phase("lora", 3, epochs=1, batch=128, lr=0.02, clip=1.0, r=8, alpha=16, layers=(4, 5),
                                   ffa=True),)), 8.0, cache, test=True, reps=2)


def selected_recipes() -> list[Recipe]:
    return [selected_head_only(8.0)[0]]


def stage_walltime() -> None:
    """The selected recipe the way a 4-site, 3-round simulated run would compute it with the product's model on
    tokens (no study cache): model build, tokenized site data, PRV calibration, each site's forward pass over its
    training split (once per run: the encoder is frozen, so a site keeps its features), DP head training, per-round
    evaluation (each site's validation split, the server's 600 held-back test examples) and the final 3,000-example
    test evaluation. Flower/Ray overhead is not included (P2: ~9 s start-up, ×1.08 per round)."""
    started = time.perf_counter()
    timings = {}
    model = build_model(CONFIG.model, len(NAMES), lora_r=CONFIG.lora_r, lora_alpha=CONFIG.lora_alpha, ffa=True,
                        seed=CONFIG.seed)
    sites = site_splits()
    server_test = tasks.central_test_set(CONFIG, limit=CONFIG.eval_examples)
    test = tasks.central_test_set(CONFIG)
    timings["build_and_tokenize_s"] = time.perf_counter() - started
    rec, _ = selected_head_only(8.0)
    phase = rec.phases[0]
    t = time.perf_counter()
    plans = [plan_noise(dataclasses.replace(rec, eval_noise=5.0), 8.0, len(tr)) for tr, _ in sites]
    timings["calibration_s"] = time.perf_counter() - t
    head = FeatureHead(384, len(NAMES), CONFIG.seed)
    state = trainable_state(head)
    timings["site_forward_s"] = timings["head_training_s"] = timings["evaluation_s"] = 0.0
    features = []
    for r in range(phase.rounds):
        states = []
        for s, (tr, _) in enumerate(sites):
            t = time.perf_counter()
            if r == 0:
                features.append(encode_features(model, tr, keep_hidden=False).features())
            timings["site_forward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            head.load_state_dict(state)
            sigma, rate, _ = plans[s][0][0]
            study_train(head, features[s], epochs=phase.epochs, batch_size=phase.batch, lr=phase.lr,
                        dp=DPSettings(sigma, phase.clip, rate), optimizer=phase.optimizer, schedule=phase.schedule,
                        span=(r, phase.rounds))
            states.append(trainable_state(head))
            timings["head_training_s"] += time.perf_counter() - t
        state = {k: sum(st[k] for st in states) / len(states) for k in state}
        t = time.perf_counter()
        with torch.no_grad():
            head_module(model).weight.copy_(state["classifier.weight"])
            head_module(model).bias.copy_(state["classifier.bias"])
        for _, val in sites:
            predict(model, val)
        round_f1 = macro_f1(server_test.labels, predict(model, server_test))
        timings["evaluation_s"] += time.perf_counter() - t
        log(f"walltime: round {r + 1} server-side macro-F1 on 600 test examples {round_f1:.4f}")
    t = time.perf_counter()
    final = macro_f1(test.labels, predict(model, test))
    timings["final_test_s"] = time.perf_counter() - t
    timings = {k: round(v, 1) for k, v in timings.items()}
    record(f"walltime/threads{torch.get_num_threads()}", {
        **timings, "total_s": round(time.perf_counter() - started, 1), "final_test_f1": round(final, 4),
        "recipe": rec.describe(), "load_average": os.getloadavg()})


def stage_frontier() -> None:
    """What more data per site buys: the same 3,600 training examples held by 4 sites (~900), 2 sites (~1,800:
    sites 0+1 and 2+3 merged) and 1 site (3,600), each a federation with the product's count and evaluation
    releases, the selected head-only recipe (not re-tuned), ε 1/3/8, 3 repeats, validation and test."""
    cache = load_cache()
    two = {**cache, "train": [cat_cached(cache["train"][0:2]), cat_cached(cache["train"][2:4])]}
    one = {**cache, "train": [cat_cached(cache["train"])]}
    for target in (8.0, 3.0, 1.0):
        rec, eval_noise = selected_head_only(target)
        for name, c in (("2x1800", two), ("1x3600", one)):
            trial(f"frontier-{name}", rec, target, c, test=True, reps=3, eval_noise=eval_noise)


def stage_report() -> None:
    """Print every recorded figure as one table: key, validation macro-F1 (τ=0 and with the τ chosen on
    validation), test where measured, per-site ε, σ."""
    results = json.loads(OUT.read_text())
    print("| key | val F1 | val F1 (τ*) | τ* | test F1 | test F1 (τ*) | ε/site | σ (site 0) | s/run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, v in results.items():
        if not isinstance(v, dict) or "val_f1" not in v:
            print(f"| {key} | {json.dumps(v)[:200]} |")
            continue
        eps = v.get("epsilon_per_site")
        print(f"| {key} | {v['val_f1']}{'±' + str(v['val_f1_sd']) if v.get('val_f1_sd') else ''} | "
              f"{v.get('val_f1_tau', '')} | {v.get('tau_selected_on_val', '')} | {v.get('test_f1', '')} | "
              f"{v.get('test_f1_tau', '')} | {eps[0] if eps else ''} | "
              f"{v.get('sigmas_site0_site1', [[None]])[0] if v.get('sigmas_site0_site1') else v.get('sigma', '')} | "
              f"{v.get('wall_s_per_run', '')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dp_recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="all")
    args = parser.parse_args(argv)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    stages = {"features": stage_features, "probe": stage_probe, "refine": stage_refine, "ssp": stage_ssp,
              "extra": stage_extra, "lora": stage_lora, "baseline": stage_baseline,
              "baseline_tau": stage_baseline_tau, "confirm": stage_confirm,
              "walltime": stage_walltime, "frontier": stage_frontier, "report": stage_report, "default": stage_default}
    # `all`: the study in order (~2.5 h on 1 shared core); `default` (the earlier LoRA recipe on the full model, ~20 min)
    # only when named.
    chosen = [n for n in stages if n != "default"] if args.stage == "all" else args.stage.split(",")
    for name in chosen:
        log(f"== stage {name}")
        stages[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
