"""Interleaved timing shared by the benchmarks: implementations alternate A B A B.

On a shared, noisy machine two separate timing loops measure two different moments;
alternating the implementations round by round exposes them to the same load, so their
ratio is a result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float = float("inf")):
    """Time each callable once per round, in the same order every round (A B A B ...),
    after one warm-up call each. Stops early (after at least 3 rounds) once ``budget_s``
    seconds have been spent.

    Returns ``{name: {"median_s", "min_s", "max_s", "runs_s"}}``.

    >>> out = interleaved({"a": lambda: None, "b": lambda: None}, rounds=3)
    >>> sorted(out), len(out["a"]["runs_s"])
    (['a', 'b'], 3)
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for fn in fns.values():
        fn()  # compile / warm up
    runs = {name: [] for name in fns}
    spent = 0.0
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            runs[name].append(dt)
            spent += dt
        if spent > budget_s and r >= 2:
            break
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
               "runs_s": ts}  # fmt: skip
        for name, ts in runs.items()
    }
