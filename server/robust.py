"""Robust aggregation of equally weighted site updates: centered clipping around a coordinate-wise median.

Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021) averages each update's deviation from a robust centre after clipping it
to a radius, so one site can move the aggregate by at most radius / n. Here the centre is the
coordinate-wise median of the round's updates (as deltas from the round's global adapter), and:

* each delta is first scaled to at most the median delta norm;
* an update that points away from most others (cosine ≤ 0 with more than half of the other updates)
  is left out, and the centre is the median of the other updates. Honest updates
  of a round share the direction their data agree on, so each keeps a positive cosine with the
  other honest ones, and a rogue can pass this check only by pushing along that shared direction.
  Without it a reversed update, clipped to a radius that DP noise sets, still cancels an honest
  site's signal, and two colluding ones pull the median itself;
* each deviation is clipped per coordinate to ``COORDINATE_FACTOR`` × that coordinate's median
  absolute deviation: an L2 radius alone lets a rogue pour its whole allowance into a few
  coordinates (one label's bias), where honest updates barely differ;
* and in L2 to the median of the deviations' norms.

Every statistic is a median over the round's sites, so while rogues are fewer than half of them
each radius is bracketed by honest values: one rogue among ``n`` moves the aggregate by at most
``1 / n`` of an honest site's own deviation from the centre (plus the median's own shift, within the
honest spread). Honest updates of one round share a direction, so they keep a positive cosine with
their median, and few honest coordinates exceed twice the median deviation: an honest federation's
aggregate stays near its mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Fewer updates than this and a median cannot tell a rogue from an honest site: there is no majority to trust.
MIN_ROBUST_SITES = 3
# Twice the median absolute deviation: wide enough that DP noise rarely trips it, narrow enough to bound a rogue.
COORDINATE_FACTOR = 2.0


@dataclass(frozen=True)
class RobustAggregate:
    """The aggregate adapter (float64) and how many updates pointed away from most others (left out)."""

    arrays: dict[str, np.ndarray]
    opposed: int


def centered_clip(updates: Sequence[Mapping[str, np.ndarray]], start: Mapping[str, np.ndarray]) -> RobustAggregate:
    """The robust aggregate of at least ``MIN_ROBUST_SITES`` adapters trained from the global adapter `start`."""
    if len(updates) < MIN_ROBUST_SITES:
        raise ValueError(f"centered clipping needs at least {MIN_ROBUST_SITES} updates, got {len(updates)}")
    keys = list(start)
    origin = np.concatenate([np.asarray(start[key], dtype=np.float64).ravel() for key in keys])
    deltas = np.stack([np.concatenate([np.asarray(u[key], dtype=np.float64).ravel() for key in keys])
                       for u in updates]) - origin
    # Honest DP-SGD updates of one round have similar norms; a larger one buys nothing but a larger say in the
    # medians below (an update scaled up is an extreme in every coordinate), so each is scaled to at most the median.
    sizes = np.linalg.norm(deltas, axis=1)
    deltas *= np.minimum(1.0, np.divide(np.median(sizes), sizes, out=np.ones_like(sizes), where=sizes > 0))[:, None]
    opposed = _opposed(deltas)
    # Left out, not counted as the centre: that would only dilute the others' share (and two colluding rogues on one
    # side would drag every coordinate's median).
    deltas = deltas[~opposed]
    centre = np.median(deltas, axis=0)
    deviations = deltas - centre
    radius = COORDINATE_FACTOR * np.median(np.abs(deviations), axis=0)
    deviations = np.clip(deviations, -radius, radius)
    norms = np.linalg.norm(deviations, axis=1)
    l2_radius = float(np.median(norms))
    scale = np.ones_like(norms)
    far = norms > l2_radius
    scale[far] = l2_radius / norms[far]
    flat = origin + centre + (deviations * scale[:, None]).mean(axis=0)
    arrays, offset = {}, 0
    for key in keys:
        shape = np.shape(start[key])
        size = int(np.prod(shape, dtype=np.int64))
        arrays[key] = flat[offset:offset + size].reshape(shape)
        offset += size
    return RobustAggregate(arrays, int(opposed.sum()))


def _opposed(deltas: np.ndarray) -> np.ndarray:
    """Which deltas have a cosine ≤ 0 with more than half of the others (a zero delta agrees with none); none when
    that is not a minority: in a round whose honest updates are mostly DP noise, they do not agree among themselves
    either, and the check would only throw honest updates away."""
    norms = np.linalg.norm(deltas, axis=1, keepdims=True)
    units = np.divide(deltas, norms, out=np.zeros_like(deltas), where=norms > 0)
    cosines = units @ units.T
    np.fill_diagonal(cosines, 1.0)
    opposed = (cosines <= 0).sum(axis=1) > (len(deltas) - 1) / 2
    return opposed if 2 * opposed.sum() < len(deltas) else np.zeros_like(opposed)
