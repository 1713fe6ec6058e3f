"""Median wall-clock time per call, after a warm-up, in this process.

:func:`measure_interleaved` times several implementations of one case in turns
(run 1 of each, then run 2 of each, ...), so that a slow spell of the shared
machine lands on all of them rather than on whichever was being timed.
"""

from __future__ import annotations

import gc
import math
import statistics
import time


def _loop_size(fn, sync, min_time):
    """One timed call, and the number of calls per run that makes a run last ``min_time`` seconds."""
    gc.collect()
    t0 = time.perf_counter()
    sync(fn())
    single = time.perf_counter() - t0
    return single, max(1, math.ceil(min_time / max(single, 1e-9)))


def _run(fn, sync, inner, clock=time.perf_counter):
    """Time per call over one run of ``inner`` calls (garbage collection off meanwhile)."""
    gc.disable()
    try:
        t0 = clock()
        for _ in range(inner):
            out = sync(fn())
        elapsed = clock() - t0
        del out
    finally:
        gc.enable()
    return elapsed / inner


def _record(times, inner):
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times, "inner": inner}


def measure(fn, sync, *, runs: int = 5, min_time: float = 0.05, warmup: int = 1):
    """Time ``sync(fn())``.

    After ``warmup`` calls (compilation, caches), one timed call sizes the inner
    loop so that a run lasts at least ``min_time`` seconds; then ``runs`` runs of
    that loop are timed (a call longer than ``min_time`` counts as the first run).
    Returns the median time per call and the per-run times.  Garbage collection
    is off while timing.
    """
    for _ in range(warmup):
        sync(fn())
    single, inner = _loop_size(fn, sync, min_time)
    times = [single] if inner == 1 else []  # a long call is already one run
    while len(times) < runs:
        times.append(_run(fn, sync, inner))
    return _record(times, inner)


def measure_interleaved(calls, *, runs: int = 5, min_time: float = 0.05, clock=time.perf_counter):
    """Time several ``(fn, sync)`` pairs (a dict name -> pair) in turns, after one warm-up call each.

    Each gets its own inner loop (sized as in :func:`measure`); then ``runs`` rounds
    time one run of each, in order.  Returns name -> the record of :func:`measure`,
    or ``{"error": ...}`` for a pair whose call raised (the others go on).  ``clock``:
    ``time.process_time`` counts the process's CPU time instead of the wall clock
    (time the machine's other tenants take is then left out; all threads count).
    """
    inner, times, errors = {}, {}, {}
    for name, (fn, sync) in calls.items():
        try:
            sync(fn())  # warm-up
            inner[name] = _loop_size(fn, sync, min_time)[1]
        except Exception as e:  # noqa: BLE001 (one failing implementation must not stop the others)
            errors[name] = f"{type(e).__name__}: {e}"[:500]
            continue
        times[name] = []
    for _ in range(runs):
        for name in list(times):
            fn, sync = calls[name]
            gc.collect()
            try:
                times[name].append(_run(fn, sync, inner[name], clock))
            except Exception as e:  # noqa: BLE001
                errors[name] = f"{type(e).__name__}: {e}"[:500]
                del times[name]
    out = {name: {"error": err} for name, err in errors.items()}
    for name, ts in times.items():
        out[name] = _record(ts, inner[name])
    return out
