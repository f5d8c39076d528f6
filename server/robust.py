"""Robust aggregation of equally weighted site updates: centered clipping around a coordinate-wise median.

Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021) averages each update's deviation from a robust centre after clipping it
to a radius, so one site can move the aggregate by at most radius / n. Here the centre is the
coordinate-wise median of the round's updates, and each deviation is clipped twice:

* per coordinate, to ``COORDINATE_FACTOR`` × that coordinate's median absolute deviation: an L2
  radius alone lets a rogue pour its whole allowance into a few coordinates (one label's bias row),
  where honest updates barely differ;
* in L2, to the median of the deviations' norms.

Every statistic is a median over the round's sites, so while rogues are fewer than half of them
each radius is bracketed by honest values: with ``n`` sites of which ``f`` are rogue, the aggregate
moves from the honest-only centre by at most ``f / n`` of an honest site's own deviation (plus the
median's shift, itself within the honest spread). Honest DP-SGD updates of one round spread by
their noise, so an honest federation loses little: few honest coordinates exceed twice the median
deviation, and the L2 clip pulls the farthest half toward the median, not away from the mean's
direction. Every step is translation-invariant, so it runs on the adapters themselves, not deltas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Fewer updates than this and a median cannot tell a rogue from an honest site: there is no majority to trust.
MIN_ROBUST_SITES = 3
# Twice the median absolute deviation: wide enough that DP noise rarely trips it, narrow enough to bound a rogue.
COORDINATE_FACTOR = 2.0


def centered_clip(updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The robust aggregate (float64) of at least ``MIN_ROBUST_SITES`` adapters with the same keys and shapes."""
    if len(updates) < MIN_ROBUST_SITES:
        raise ValueError(f"centered clipping needs at least {MIN_ROBUST_SITES} updates, got {len(updates)}")
    keys = list(updates[0])
    shapes = {key: np.shape(updates[0][key]) for key in keys}
    stacked = np.stack([np.concatenate([np.asarray(u[key], dtype=np.float64).ravel() for key in keys])
                        for u in updates])
    centre = np.median(stacked, axis=0)
    deviations = stacked - centre
    radius = COORDINATE_FACTOR * np.median(np.abs(deviations), axis=0)
    deviations = np.clip(deviations, -radius, radius)
    norms = np.linalg.norm(deviations, axis=1)
    l2_radius = float(np.median(norms))
    scale = np.minimum(1.0, l2_radius / np.maximum(norms, np.finfo(np.float64).tiny))
    flat = centre + (deviations * scale[:, None]).mean(axis=0)
    result, start = {}, 0
    for key in keys:
        size = int(np.prod(shapes[key], dtype=np.int64))
        result[key] = flat[start:start + size].reshape(shapes[key])
        start += size
    return result
