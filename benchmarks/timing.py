"""Timing shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, which puts this folder on
the import path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeat: int, warm_up: bool = False) -> float:
    """Fastest wall time of ``repeat`` calls (after one untimed call when ``warm_up``), in seconds."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
