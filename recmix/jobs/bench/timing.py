"""Interleaved timing of benchmark cases with `torch.utils.benchmark.Timer` (baselines measured in the same run)."""

from __future__ import annotations

import statistics
import timeit
from typing import Callable, Literal

from torch.utils.benchmark import Timer


def time_cases(
    cases: dict[str, Callable[[], object]],
    *,
    rounds: int,
    min_run_time: float,
    num_threads: int,
    reduce: Literal["min", "median"] = "min",
    timer: Callable[[], float] = timeit.default_timer,
) -> dict[str, float]:
    """Seconds per call of every case.

    Each round runs `Timer.blocked_autorange` once per case, the order rotated every round, so machine drift and
    cache warmth hit all cases alike (a case sharing weights with the one before it would otherwise always find
    them warm). A case's figure is the min (the least disturbed round, as timeit does) or median of its round
    medians. Timer synchronizes CUDA around each block when a GPU is present.
    """
    timers = {k: Timer(stmt="fn()", globals={"fn": fn}, num_threads=num_threads, timer=timer, label=k) for k, fn in cases.items()}
    per_round: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            per_round[k].append(timers[k].blocked_autorange(min_run_time=min_run_time).median)
    pick = min if reduce == "min" else statistics.median
    return {k: pick(v) for k, v in per_round.items()}
