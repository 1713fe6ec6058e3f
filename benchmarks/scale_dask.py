"""Dask: xlsce on Dask arrays against NumPy in memory, and a run over logits larger than memory (issue 15).

    python -m benchmarks.scale_dask speed  [--rows 32768 --classes 2048 --chunk-rows 4096 --dtype float32 --clock cpu]
    python -m benchmarks.scale_dask stream [--rows 240000 --classes 32768 --chunk-rows 512]
    python -m benchmarks.scale_dask quick  (both, tiny: the CI smoke test)

``speed``: the median time (``benchmarks.timing.measure``, after a warm-up) of xlsce's loss and of its
``value_and_grad`` on NumPy arrays, and on the same arrays wrapped as Dask arrays
(``da.from_array``, chunks of ``--chunk-rows`` rows and every class), computed with Dask's threaded
scheduler (its default) and with its synchronous one (one thread, as NumPy runs); the ratios are
Dask's time over NumPy's.  The implementations are timed in turns (``measure_interleaved``), by
default in CPU time (``--clock cpu``: the process's, all threads; ``--clock wall``: the wall clock).

``stream``: in a fresh process, logits generated lazily chunk by chunk (``da.random.default_rng(seed)``,
float32, ``rows x classes``: 31.5 GB (29.3 GiB) at the defaults, more than this machine's 23.5 GiB) and class-index
targets (every 10th position ignored); the loss, computed once with the threaded scheduler; its wall
time, the process's peak RSS (VmHWM in /proc/self/status) and its RSS before the computation.

``benchmarks.scale`` calls :func:`run` (``quick=True`` for its smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def speed(
    rows=32768, classes=2048, chunk_rows=4096, dtype="float32", runs=5, min_time=0.2, label_smoothing=0.1, clock="cpu"
):
    """Median seconds per call of the loss and of value_and_grad, NumPy against Dask (two schedulers).
    ``clock="cpu"``: the process's CPU time (``time.process_time``, all threads), which leaves out the time
    that the shared machine's other tenants take; ``"wall"``: the wall clock."""
    import dask
    import dask.array as da
    import numpy as np

    import xlsce

    from .timing import measure_interleaved

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((rows, classes), dtype=np.float32) * 4).astype(dtype)
    target = rng.integers(0, classes, size=rows)
    target[::10] = -100
    dl, dtg = da.from_array(logits, chunks=(chunk_rows, classes)), da.from_array(target, chunks=chunk_rows)
    kw = {"label_smoothing": label_smoothing}

    def numpy_loss():
        return xlsce.cross_entropy(logits, target, **kw)

    def numpy_vg():
        return xlsce.value_and_grad(logits, target, **kw)

    def dask_loss(scheduler):
        return lambda: xlsce.cross_entropy(dl, dtg, **kw).compute(scheduler=scheduler)

    def dask_vg(scheduler):
        return lambda: dask.compute(*xlsce.value_and_grad(dl, dtg, **kw), scheduler=scheduler)

    loss = np.asarray(numpy_loss())
    assert abs(float(dask_loss("sync")()) - float(loss)) <= 1e-5 * abs(float(loss))
    out = {"rows": rows, "classes": classes, "chunk_rows": chunk_rows, "dtype": dtype, "clock": clock}
    for name, fns in (("loss", (numpy_loss, dask_loss)), ("value_and_grad", (numpy_vg, dask_vg))):
        impls = {"numpy": fns[0], "dask-threads": fns[1]("threads"), "dask-sync": fns[1]("sync")}
        timer = time.process_time if clock == "cpu" else time.perf_counter
        res = measure_interleaved({k: (f, _same) for k, f in impls.items()}, runs=runs, min_time=min_time, clock=timer)
        med = {k: v["median_s"] for k, v in res.items()}
        out[name] = {
            "median_s": med,
            "ratio_threads": med["dask-threads"] / med["numpy"],
            "ratio_sync": med["dask-sync"] / med["numpy"],
        }
    return out


def stream(rows=240_000, classes=32768, chunk_rows=512, seed=0, label_smoothing=0.1):
    """In this process: the loss over lazily generated float32 logits; wall time and peak RSS."""
    import dask.array as da
    import numpy as np

    import xlsce

    rng = da.random.default_rng(seed)
    logits = rng.random((rows, classes), dtype=np.float32, chunks=(chunk_rows, classes)) * 8
    target = rng.integers(0, classes, size=rows, chunks=chunk_rows)
    target = da.where(da.arange(rows, chunks=chunk_rows) % 10 == 0, -100, target)
    loss = xlsce.cross_entropy(logits, target, label_smoothing=label_smoothing)
    before = _rss()
    t0 = time.perf_counter()
    value = float(loss.compute(scheduler="threads"))
    wall = time.perf_counter() - t0
    peak = _rss("VmHWM:")
    return {
        "rows": rows,
        "classes": classes,
        "chunk_rows": chunk_rows,
        "logits_bytes": rows * classes * 4,
        "logits_gib": rows * classes * 4 / 2**30,
        "wall_s": wall,
        "gb_per_s": rows * classes * 4 / wall / 1e9,
        "rss_before_gib": before / 2**30,
        "peak_rss_gib": peak / 2**30,
        "loss": value,
        "machine_memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
    }


def _same(r):
    return r


def _rss(field="VmRSS:"):
    """This process's resident set (``VmHWM:``: its peak) in bytes, from /proc/self/status.  The peak of
    the process's own memory since it started: ``getrusage``'s ru_maxrss would not do in a child process,
    since Linux carries the parent's peak over into it across fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def stream_in_subprocess(rows=240_000, classes=32768, chunk_rows=512, seed=0, timeout=3600):
    """:func:`stream` in a fresh process (so that its peak RSS is the run's alone)."""
    cmd = [sys.executable, "-m", "benchmarks.scale_dask", "stream", "--json"]
    cmd += ["--rows", str(rows), "--classes", str(classes), "--chunk-rows", str(chunk_rows), "--seed", str(seed)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.scale_dask stream failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick=False):
    """The Dask part of ``python -m benchmarks.scale``: ``{"speed": ..., "stream": ...}``."""
    if quick:
        return {
            "speed": speed(rows=512, classes=64, chunk_rows=128, runs=3, min_time=0.01),
            "stream": stream_in_subprocess(rows=4096, classes=256, chunk_rows=512, timeout=300),
        }
    return {"speed": speed(), "stream": stream_in_subprocess()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_dask", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("speed", "stream", "quick"))
    p.add_argument("--rows", type=int)
    p.add_argument("--classes", type=int)
    p.add_argument("--chunk-rows", type=int)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one line of JSON only")
    a = p.parse_args(argv)
    sizes = {k: v for k, v in (("rows", a.rows), ("classes", a.classes), ("chunk_rows", a.chunk_rows)) if v}
    if a.what == "speed":
        out = speed(dtype=a.dtype, clock=a.clock, **sizes)
    elif a.what == "stream":
        out = stream(seed=a.seed, **sizes)
    else:
        out = run(quick=True)
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
