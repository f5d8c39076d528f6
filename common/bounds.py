"""How far honest training can move the adapter, from public values only.

The server sets aside a site update larger than one round's ceiling (README: screening). A site
declines a global adapter farther from the public start (the adapter every party builds from the
run's seed) than the rounds before it could have moved it: no aggregation of honest updates makes
such a model, and a crafted one is how a server would try to make one record's gradient extreme.
Both bounds follow from the run config and the adapter's shapes; neither reads any data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from common import secure_wire
from common.config import RunConfig
from common.train import BETAS


def adam_step_bound(betas: tuple[float, float]) -> float:
    """The most one Adam step (bias-corrected, any ε) moves a coordinate, in units of its learning rate.

    |m̂/√v̂| ≤ (1-β1)/√(1-β2) · (Σ_k (β1²/β2)^k)^½ by Cauchy–Schwarz, and √(1-β2^t)/(1-β1^t) ≤ 1 for the betas used
    here; gradients that grow by β2/β1 every step come arbitrarily close. Kingma & Ba's (1-β1)/√(1-β2) (section
    2.1) is the size of a typical step, not the worst case: a step can move more than twice as far.
    """
    beta1, beta2 = betas
    return (1 - beta1) / math.sqrt(1 - beta2) / math.sqrt(1 - beta1**2 / beta2)


ADAM_STEP_BOUND = adam_step_bound(BETAS)
# Flower's FedAdam (its default betas, which server/strategy.py keeps): the server's own Adam step.
FEDADAM_BETAS = (0.9, 0.99)
# A Gaussian vector of dimension d has norm above σ·(√d + t) with probability below exp(-t²/2): 2e-22 at t = 10.
GAUSSIAN_TAIL = 10.0
# Float rounding and SecAgg+'s quantization move an aggregate by far less than this share of the bound.
SLACK = 1.01


def _dimension(spec: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in spec.values())


def update_ceiling(learning_rate: float, steps: int, spec: Mapping[str, tuple[int, ...]]) -> float:
    """The largest L2 norm one round of `steps` AdamW steps can give an honest update of these tensors."""
    return ADAM_STEP_BOUND * learning_rate * steps * math.sqrt(_dimension(spec))


def round_ceiling(config: RunConfig, spec: Mapping[str, tuple[int, ...]]) -> float:
    """The largest honest update of any round of this run: the most steps a site may take (`max-site-weight`
    records) in a LoRA round or a head-only round, whichever moves more."""
    lora_steps = config.local_epochs * -(-config.max_site_weight // config.batch_size)
    head_steps = config.head_epochs * -(-config.max_site_weight // config.head_batch_size)
    return max(update_ceiling(config.learning_rate, lora_steps, spec),
               update_ceiling(config.head_learning_rate, head_steps, spec))


def global_distance_bound(config: RunConfig, spec: Mapping[str, tuple[int, ...]], aggregations: int) -> float:
    """How far (L2) from the public start a global adapter can be after `aggregations` rounds of honest updates.

    Every aggregator keeps each coordinate within the honest updates' range (a weighted mean, a trimmed
    mean, a median, Krum's pick), so the ceiling of one update bounds the aggregate too; under secure
    aggregation a site whose count exceeds max-site-weight is still clipped to the SecAgg+ range.
    FedAdam's step is its own Adam bound; central DP clips and adds Gaussian noise, bounded at its tail.
    """
    root = math.sqrt(_dimension(spec))
    per_round = round_ceiling(config, spec)
    if config.secure_aggregation:
        per_round = max(per_round, secure_wire.DEFAULT_CLIPPING_RANGE * root)
    if config.aggregation == "fedadam":
        per_round = adam_step_bound(FEDADAM_BETAS) * config.server_learning_rate * root
    if config.central_dp:
        noise = config.central_noise_multiplier * config.central_clipping_norm / config.min_sites
        per_round = min(per_round, config.central_clipping_norm) + noise * (root + GAUSSIAN_TAIL)
    return SLACK * per_round * aggregations
