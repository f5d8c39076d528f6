"""Everything Opacus: secret randomness, DP-SGD wrapping, the Gaussian mechanism for counts, ε and noise calibration.

A site's (ε, δ) holds against the server only if the server cannot predict the noise or the
Poisson batches. Every generator DP depends on is therefore seeded from the operating system's
entropy, never from the run config's ``seed``.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

_root_handlers = list(logging.getLogger().handlers)
from opacus import GradSampleModule  # noqa: E402
from opacus.accountants import RDPAccountant, create_accountant  # noqa: E402
from opacus.data_loader import DPDataLoader  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

# Opacus calls logging.basicConfig() on import; that root handler would print every Flower log line twice.
for _handler in logging.getLogger().handlers[len(_root_handlers):]:
    logging.getLogger().removeHandler(_handler)

log = logging.getLogger(f"flwr.privet.{__name__}")  # Flower's handler prints it, as in every Flower process

# Both are known and stated in every report; repeating them every round only buries real warnings.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

NOISE_RNG_NOTE = (
    "DP noise and Poisson batch sampling use PyTorch generators whose whole state (19,937 bits on the CPU; "
    "the 128-bit seed and offset on a GPU) is drawn from the operating system's entropy for every round, "
    "never from the run configuration. They are not cryptographic generators: Opacus' secure_mode needs "
    "torchcsprng, which is not installable for current PyTorch."
)

# One history entry: (noise_multiplier, sample_rate, steps), as Opacus' accountants keep it. A Gaussian
# release of a sensitivity-bounded count is (noise_multiplier, 1.0, 1).
Entry = tuple[float, float, int]


class PrivacyError(RuntimeError):
    """The privacy budget, the ledger or the DP machinery forbids what was asked."""


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose state comes from the OS entropy pool, so nobody outside the site can replay its draws."""
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type == "cpu":
        # manual_seed takes 64 bits; the Mersenne Twister's 624 state words take 19,937. Layout of PyTorch's
        # CPUGeneratorImplState: initial seed (u64), left (i32), seeded (i32), next (u64), then 624 u64 words.
        raw = generator.get_state().numpy().copy()
        words = np.frombuffer(secrets.token_bytes(624 * 4), dtype=np.uint32).astype(np.uint64)
        raw[0:8] = np.frombuffer(secrets.token_bytes(8), dtype=np.uint8)
        raw[8:12] = np.frombuffer(np.int32(1).tobytes(), dtype=np.uint8)  # left=1: twist before the first draw
        raw[16:24] = 0
        raw[24:24 + 624 * 8] = np.frombuffer(words.tobytes(), dtype=np.uint8)
        generator.set_state(torch.from_numpy(raw))
    else:
        # Philox: a 64-bit key and a 64-bit counter offset (a multiple of 4), both secret.
        generator.manual_seed(secrets.randbits(64))
        generator.set_offset(4 * secrets.randbits(60))
    return generator


def poisson_schedule(public_count: int, batch_size: int) -> tuple[float, int]:
    """Sample rate and steps per epoch of Poisson sampling for a site whose public example count is given."""
    sample_rate = 1.0 / max(1, math.ceil(public_count / batch_size))
    # Opacus' sampler runs int(1 / sample_rate) steps, which float rounding can make one less.
    return sample_rate, int(1 / sample_rate)


def compute_epsilon(history: Iterable[Entry], delta: float, accountant: str = "prv") -> tuple[float, str]:
    """ε of the whole history at δ, and the accountant that gave it (PRV, or RDP where PRV cannot compute)."""
    return _epsilon(canonical(history), delta, accountant)


def canonical(history: Iterable[Entry]) -> tuple[Entry, ...]:
    """The history with entries of equal noise and sample rate folded together, in first-seen order.

    Composition does not depend on order, so folding keeps ε exact and the ledger short.
    """
    folded: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        folded[(float(sigma), float(rate))] = folded.get((float(sigma), float(rate)), 0) + int(steps)
    return tuple((sigma, rate, steps) for (sigma, rate), steps in folded.items())


@functools.lru_cache(maxsize=512)
def _epsilon(history: tuple[Entry, ...], delta: float, accountant: str) -> tuple[float, str]:
    """Cached: a site checks its cap and then records the same history each round, and a PRV run takes ~0.3 s."""
    if not history:
        return 0.0, accountant
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")  # PRV's log(1 - q) at q = 1 (a count release) is harmless
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


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    schedule: Iterable[tuple[float, int]],
    *,
    prior: Iterable[Entry] = (),
    also: Iterable[Entry] = (),
    accountant: str = "prv",
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (within `tolerance` in ε) for DP-SGD run as `schedule`: (sample rate, steps) pairs,
    all at that one noise multiplier.

    Whatever the ledger already holds (`prior`) and the other releases planned beside the training
    (`also`, e.g. evaluations) count towards `target_epsilon`.
    """
    phases = tuple((float(rate), int(steps)) for rate, steps in schedule if steps > 0)
    return _calibrate(target_epsilon, delta, phases, canonical(prior), canonical(also), accountant, tolerance)


@functools.lru_cache(maxsize=64)
def _calibrate(target_epsilon, delta, phases, prior, also, accountant, tolerance) -> float:
    """Cached: simulated sites of equal size share one plan, and each PRV evaluation takes a while."""
    fixed = prior + also
    spent, _ = compute_epsilon(fixed, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"ε={spent:.3f} is already spent or planned outside training (earlier releases and planned "
            f"evaluations), at or above the target ε={target_epsilon}; no noise level can fit training in"
        )

    def eps(sigma: float) -> float:
        return compute_epsilon((*fixed, *((sigma, rate, steps) for rate, steps in phases)), delta, accountant)[0]

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


@dataclass(frozen=True)
class PrivateTraining:
    """The Opacus objects of one round, and an accountant fed by the optimizer itself, step by step."""

    module: GradSampleModule
    optimizer: DPOptimizer
    loader: DPDataLoader
    observed: RDPAccountant

    def ran(self) -> list[Entry]:
        """What Opacus really ran: (noise multiplier, sample rate, steps) as its optimizer reported them."""
        return [tuple(entry) for entry in self.observed.history]

    def close(self) -> None:
        """Remove Opacus' hooks so the model can be reused next round."""
        self.module._close()


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: torch.utils.data.Dataset,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    batch_size: int,
    device: torch.device | str,
) -> PrivateTraining:
    """Wrap model, optimizer and data for DP-SGD with Poisson sampling, both driven by secret generators.

    The gradient is averaged over the public expected `batch_size`, never over a count derived from the
    data. ``rand_on_empty`` keeps an empty Poisson batch from crashing the BERT forward pass (its one
    random example is independent of the data).
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"Opacus cannot train this model privately: {errors[0]}")
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    module.forbid_grad_accumulation()
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",
        generator=secret_generator(device),
    )
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=secret_generator("cpu"), rand_on_empty=True)
    observed = RDPAccountant()
    dp_optimizer.attach_step_hook(observed.get_optimizer_hook_fn(sample_rate=loader.sample_rate))
    return PrivateTraining(module, dp_optimizer, loader, observed)


def gaussian_sum(rows: np.ndarray, *, bound: float, noise_multiplier: float) -> np.ndarray:
    """The Gaussian mechanism on per-example rows: clip each row's L2 norm to `bound`, sum, add N(0, (σ·bound)²).

    Adding or removing one example changes the sum by at most `bound`, so the release is one history
    entry ``(noise_multiplier, 1.0, 1)``.
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    clipped = rows * np.minimum(1.0, bound / np.maximum(norms, 1e-12))
    total = torch.as_tensor(clipped.sum(axis=0), dtype=torch.float64)
    noise = torch.normal(0.0, noise_multiplier * bound, total.shape, generator=secret_generator("cpu"),
                         dtype=torch.float64)
    return (total + noise).numpy()


def noisy_count(count: int, noise_multiplier: float) -> int:
    """A count released with the Gaussian mechanism (sensitivity 1), rounded and at least 1."""
    released = gaussian_sum(np.ones((count, 1)), bound=1.0, noise_multiplier=noise_multiplier)[0]
    return max(1, int(round(released)))
