"""Peak memory of one forward+backward, in a fresh process per case.

``python -m benchmarks.memory '{"impl": "torch:xlsce", "shape": [N, K], "dtype": ..., "variant": ...}'``
prints one JSON line.  The method is described in :mod:`benchmarks`: build the
inputs, call once (warm-up), reset the peak-RSS counter, call again holding the
outputs, and report VmHWM - VmRSS(before).  NumPy also gets the tracemalloc peak.
Run by hand it keeps the caller's environment; ``python -m benchmarks`` starts it
with ``MALLOC_ENV`` (glibc reads those variables when the process starts).
On CUDA (``--device cuda``), torch's memory is :func:`cuda_memory`, in the process
that times it; JAX's is XLA's memory analysis (:func:`jax_memory`) on every device.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import warnings

from .cases import Case, make_inputs, use_source
from .impls import find_impl, to_backend

# glibc: every allocation of at least 128 KiB is its own mapping, unmapped when freed, so that RSS
# follows the live buffers (the default thresholds adapt to what is freed, and whether freed memory
# stayed in the heap for the measured call to reuse varied from process to process).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def status_kib(field):
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_here(spec):
    """Run one case in this process and return its memory record."""
    warnings.filterwarnings("ignore")
    use_source()
    impl = find_impl(spec["impl"])
    case = Case.from_json(spec)
    arrays = to_backend(impl.backend, case, *make_inputs(case))
    bound = impl.bind(arrays)
    out = bound.sync(bound.fwdbwd())  # warm-up: compilation, lazy initialisation
    del out
    gc.collect()
    tracing = impl.backend == "numpy"
    if tracing:
        import tracemalloc

        tracemalloc.start()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss0 = status_kib("VmRSS")
    reset = reset_peak()
    if tracing:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
    out = bound.sync(bound.fwdbwd())
    if tracing:
        traced = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    if reset:
        peak_kib, method = status_kib("VmHWM") - rss0, "VmHWM after clear_refs minus VmRSS before the call"
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0
        method = "ru_maxrss delta (includes the warm-up call)"
    del out
    rec = {
        "method": method,
        "peak_net_bytes": peak_kib * 1024,
        "logits_bytes": case.logits_bytes,
        "multiple": peak_kib * 1024 / case.logits_bytes,
    }
    if tracing:
        rec["tracemalloc_peak_bytes"] = traced
        rec["tracemalloc_multiple"] = traced / case.logits_bytes
    return rec


def measure_subprocess(impl, case: Case, timeout=600):
    """Run :func:`measure_here` in a fresh interpreter; the record, or {'error': ...}."""
    spec = {"impl": impl.key, **case.to_json()}
    env = dict(os.environ, **MALLOC_ENV)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=root,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def cuda_memory(bound, case: Case):
    """Net memory of a torch forward+backward on CUDA: the allocator's peak during one call (outputs held)."""
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = bound.sync(bound.fwdbwd())
    net = torch.cuda.max_memory_allocated() - before
    del out
    return {
        "method": "torch.cuda.max_memory_allocated during one call minus memory_allocated before",
        "peak_net_bytes": int(net),
        "logits_bytes": case.logits_bytes,
        "multiple": net / case.logits_bytes,
    }


def jax_memory(bound, case: Case):
    """Net memory of a compiled JAX forward+backward from XLA's memory analysis."""
    ma = bound.memory_analysis()
    if ma is None:
        return {"error": "memory_analysis() not available"}
    temp, out, alias = ma.temp_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes
    net = temp + out - alias
    return {
        "method": "XLA memory_analysis: temp + output - alias bytes",
        "peak_net_bytes": int(net),
        "temp_bytes": int(temp),
        "output_bytes": int(out),
        "argument_bytes": int(ma.argument_size_in_bytes),
        "logits_bytes": case.logits_bytes,
        "multiple": net / case.logits_bytes,
    }


if __name__ == "__main__":
    print(json.dumps(measure_here(json.loads(sys.argv[1]))))
