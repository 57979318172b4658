"""AUC (rank statistic with tied scores averaged), clipped logloss, and a paired bootstrap over users."""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC; ties get their average rank. NaN if only one class is present."""
    y = np.asarray(y) > 0.5
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)                      # 1-based rank of the last member of each tie group
    avg_rank = upper - (counts - 1) / 2.0
    rank_sum = avg_rank[inv][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def paired_bootstrap(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, users: np.ndarray, n: int = 200, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) resampling whole users (rows of one user are correlated); mean, 95% interval, P(<=0).

    `p_a`, `p_b` are (N,) or (S, N): S seeds' predictions on the same N rows. With seeds, every resample of users
    scores all of them and the statistic is the mean over seeds of the difference (the claim the tables make: mean
    test AUC of a minus mean test AUC of b); the interval is that of the test users' sampling, not of the seeds.
    `per_seed` holds each seed's own [delta, lo95, hi95], from the same resamples."""
    p_a, p_b = np.atleast_2d(p_a), np.atleast_2d(p_b)
    assert p_a.shape == p_b.shape and p_a.shape[1] == len(y) == len(users), (p_a.shape, p_b.shape, len(y), len(users))
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(users, return_inverse=True)
    rows_of = np.argsort(inv, kind="stable")
    starts = np.searchsorted(inv[rows_of], np.arange(len(uniq)))
    lens = np.append(starts[1:], len(inv)) - starts

    def diffs(idx) -> np.ndarray:
        return np.array([auc(y[idx], a[idx]) - auc(y[idx], b[idx]) for a, b in zip(p_a, p_b)])

    d_NS = np.empty((n, len(p_a)))
    for i in range(n):
        pick = rng.integers(0, len(uniq), len(uniq))
        L = lens[pick]
        # rows of every picked user, concatenated without a per-user loop
        idx = rows_of[np.repeat(starts[pick] - (np.cumsum(L) - L), L) + np.arange(L.sum())]
        d_NS[i] = diffs(idx)
    full_S, d = diffs(np.arange(len(y))), d_NS.mean(1)
    lo_S, hi_S = np.quantile(d_NS, 0.025, axis=0), np.quantile(d_NS, 0.975, axis=0)
    return {"delta": float(full_S.mean()), "lo95": float(np.quantile(d, 0.025)),
            "hi95": float(np.quantile(d, 0.975)), "p_le_0": float((d <= 0).mean()),
            "per_seed": [[float(x), float(lo), float(hi)] for x, lo, hi in zip(full_S, lo_S, hi_S)]}
