"""Timing shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_time(fn: Callable[..., Any], repeats: int, *, setup: Callable[[], Any] | None = None,
                warmup: bool = True) -> float:
    """Median seconds of `fn()`, or of `fn(setup())` with setup untimed, over `repeats` runs,
    each waited for on the device; warmup: one untimed run first (the compile)."""

    def once() -> float:
        args = () if setup is None else (jax.block_until_ready(setup()),)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0

    if warmup:
        once()
    return statistics.median([once() for _ in range(repeats)])
