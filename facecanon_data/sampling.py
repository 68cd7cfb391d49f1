"""Farthest-point sampling (FPS) over feature vectors, and bounded deterministic subsets of point clouds.

Why by hand: scipy/sklearn have no exact greedy max-min selection with an initial set and an
eligibility mask; the algorithm is a dozen lines. O(N*k) time, O(N) extra memory: one running
"distance to the picked set" per candidate, updated after each pick.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def farthest_point_sampling(features: np.ndarray, k: int, eligible: np.ndarray | None = None,
                            already: np.ndarray | None = None) -> np.ndarray:
    """Greedy exact max-min selection.

    Args:
        features: (N, D) float feature vectors.
        k: number of new picks.
        eligible: (N,) bool; only these may be picked (e.g. frames with a detected face).
        already: indices already selected (they count as picked but are not returned; picks are
            disjoint from them). Without any, the first pick is the eligible point farthest from the
            eligible mean, so the result does not depend on input order beyond ties.

    Returns:
        (m,) int64 indices in pick order, m = min(k, #eligible not already picked). Each pick maximizes
        the distance to everything picked before it; ties go to the lowest index. When fewer eligible
        points than requested remain, all of them are returned (with a warning).
    """
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    ok = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool).copy()
    if not np.isfinite(x[ok]).all():
        raise ValueError("features of eligible points must be finite")
    already = np.asarray([] if already is None else already, dtype=np.int64)
    ok[already] = False
    available = int(ok.sum())
    if available <= k:
        if available < k:
            log.warning("only %d eligible points for %d requested picks: taking all", available, k)
        # Still return them in max-min order, so a prefix is a good subset.
        k = available
    if k == 0:
        return np.zeros(0, np.int64)
    min_d = np.full(n, np.inf)
    for i in already:
        min_d = np.minimum(min_d, np.linalg.norm(x - x[i], axis=1))
    picks = np.empty(k, np.int64)
    for j in range(k):
        if j == 0 and len(already) == 0:
            score = np.linalg.norm(x - x[ok].mean(0), axis=1)
        else:
            score = min_d
        score = np.where(ok, score, -1.0)
        p = int(np.argmax(score))  # first maximum = lowest index among ties
        picks[j] = p
        ok[p] = False
        min_d = np.minimum(min_d, np.linalg.norm(x - x[p], axis=1))
    return picks


def bounded_subset(count: int, limit: int, seed: int = 0) -> np.ndarray:
    """(m,) int64 sorted indices of at most ``limit`` of ``count`` items, m = min(count, limit): all of
    them when they fit (``limit`` <= 0 means no limit), else a seeded uniform draw without replacement,
    the same for the same arguments on every machine (dense clouds bounded for tracking and the store)."""
    if limit <= 0 or count <= limit:
        return np.arange(count, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False)).astype(np.int64)
