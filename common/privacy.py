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
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size  # noqa: E402
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

# Below this noise multiplier one release alone costs an ε in the thousands, beyond any cap, and the accountants'
# numerics take unbounded time or memory (RDP loops for hours at 1e-160; PRV allocated GBs at 1e-3): ε is ∞.
MIN_ACCOUNTED_NOISE = 0.01
# The PRV accountant discretises the privacy loss on a grid this many points wide at most (~0.5 GB, seconds);
# a history that needs a finer or wider grid (tiny noise, very many steps) is accounted by RDP, a looser upper bound.
MAX_PRV_POINTS = 2**21
# Opacus' PRV defaults, which the grid size above is computed for.
PRV_EPS_ERROR, PRV_DELTA_ERROR = 0.01, 1e-3


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


def reseed_global_generators() -> None:
    """Give PyTorch's global generators (dropout draws from them) a state from the OS entropy pool.

    A site calls this at the start of every request, after the model is built, so nothing drawn
    while it trains or evaluates follows PyTorch's fixed default seed or the run config's seed.
    """
    torch.default_generator.set_state(secret_generator("cpu").get_state())
    if torch.cuda.is_available():
        for index, generator in enumerate(torch.cuda.default_generators):
            generator.set_state(secret_generator(torch.device("cuda", index)).get_state())


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
    if any(not sigma >= MIN_ACCOUNTED_NOISE for sigma, _, _ in history):
        return math.inf, accountant
    if accountant == "prv" and not _prv_grid_points(history, delta) <= MAX_PRV_POINTS:
        return _epsilon(history, delta, "rdp")
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


def _prv_grid_points(history: tuple[Entry, ...], delta: float) -> float:
    """How many points Opacus' PRV accountant would discretise `history` on: its own domain rule, computed cheaply
    (with RDP) before anything is allocated."""
    delta_error = delta * PRV_DELTA_ERROR
    prvs = [PoissonSubsampledGaussianPRV(rate, sigma) for sigma, rate, _ in history]
    steps = [steps for _, _, steps in history]
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            half_width = compute_safe_domain_size(prvs, steps, PRV_EPS_ERROR, delta_error)
    except (ValueError, ArithmeticError):
        return math.inf
    mesh = PRV_EPS_ERROR / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


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


class BoundedDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer, with every record's contribution finite and bounded whatever model the server sent.

    Opacus scales each per-example gradient by C/(‖g‖+1e-6): a NaN or infinite gradient stays non-finite
    and no noise hides it. A server could then send a finite model that overflows one chosen record's
    logit only, and read membership from a NaN release. Here such a record's gradient counts as zero,
    a value that does not depend on it, before Opacus clips and sums.
    """

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        if len(samples[0]):
            finite = torch.stack([g.reshape(len(g), -1).isfinite().all(dim=1).to(samples[0].device)
                                  for g in samples]).all(dim=0)
            for p, g in zip(self.params, samples):
                keep = finite.to(g.device).view(-1, *[1] * (g.dim() - 1))
                p.grad_sample = torch.where(keep, g, torch.zeros_like(g))
        super().clip_and_accumulate()

    def noise_step(self) -> None:
        """The step of an empty Poisson batch: a zero gradient sum plus the same Gaussian noise, averaged over the
        public expected batch size, and counted by the accountant like any other step.

        This is exactly the sampled Gaussian mechanism the ledger accounts. Nothing is forwarded: Opacus'
        ``rand_on_empty`` would forward a random row instead, whose clipped gradient takes the place of a
        record's and doubles the sensitivity of every empty step.
        """
        self.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.step()


class _NoRecords:
    """Poisson sampling from a site with no records: each of the int(1/q) batches Opacus would draw is empty."""

    def __init__(self, dataset: torch.utils.data.TensorDataset, sample_rate: float):
        self.sample_rate = sample_rate
        self.batch = tuple(tensor[:0] for tensor in dataset.tensors)
        self.steps = int(1 / sample_rate)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


@dataclass(frozen=True)
class PrivateTraining:
    """The Opacus objects of one round, and an accountant fed by the optimizer itself, step by step."""

    module: GradSampleModule
    optimizer: BoundedDPOptimizer
    loader: DPDataLoader | _NoRecords
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
    dataset: torch.utils.data.TensorDataset,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    batch_size: int,
    device: torch.device | str,
) -> PrivateTraining:
    """Wrap model, optimizer and data for DP-SGD with Poisson sampling, both driven by secret generators.

    The gradient is averaged over the public expected `batch_size`, never over a count derived from the
    data. An empty Poisson batch comes out of the loader empty: the caller takes ``optimizer.noise_step()``
    for it. A site with no records at all (its label set left none) takes only such steps.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(f"Opacus cannot train this model privately: {errors[0]}")
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    module.forbid_grad_accumulation()
    dp_optimizer = BoundedDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",
        generator=secret_generator(device),
    )
    if len(dataset):
        loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=secret_generator("cpu"))
    else:
        loader = _NoRecords(dataset, sample_rate)
    observed = RDPAccountant()
    dp_optimizer.attach_step_hook(observed.get_optimizer_hook_fn(sample_rate=loader.sample_rate))
    return PrivateTraining(module, dp_optimizer, loader, observed)


def gaussian_sum(rows: np.ndarray, *, bound: float, noise_multiplier: float) -> np.ndarray:
    """The Gaussian mechanism on per-example rows: clip each row's L2 norm to `bound`, sum, add N(0, (σ·bound)²).

    Adding or removing one example changes the sum by at most `bound`, so the release is one history
    entry ``(noise_multiplier, 1.0, 1)``.
    """
    rows = np.asarray(rows, dtype=np.float64)
    rows = rows.reshape(rows.shape[0], int(np.prod(rows.shape[1:])))
    # A row with a NaN or infinity would pass clipping as it is: it counts as zero, whatever the model made of it.
    rows = np.where(np.isfinite(rows).all(axis=1, keepdims=True), rows, 0.0)
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
