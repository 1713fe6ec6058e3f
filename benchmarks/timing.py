"""Median wall-clock time per call, after a warm-up, in this process."""

from __future__ import annotations

import gc
import math
import statistics
import time


def measure(fn, sync, *, runs: int = 5, min_time: float = 0.05, warmup: int = 1):
    """Time ``sync(fn())``.

    After ``warmup`` calls (compilation, caches), one timed call sizes the inner
    loop so that a run lasts at least ``min_time`` seconds; then ``runs`` runs of
    that loop are timed (a call longer than ``min_time`` counts as the first run).  Returns the median time per call and the per-run times.
    Garbage collection is off while timing.
    """
    for _ in range(warmup):
        sync(fn())
    gc.collect()
    t0 = time.perf_counter()
    sync(fn())
    single = time.perf_counter() - t0
    inner = max(1, math.ceil(min_time / max(single, 1e-9)))
    times = [single] if inner == 1 else []  # a long call is already one run
    gc.disable()
    try:
        while len(times) < runs:
            t0 = time.perf_counter()
            for _ in range(inner):
                out = sync(fn())
            times.append((time.perf_counter() - t0) / inner)
            del out
    finally:
        gc.enable()
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times, "inner": inner}
