"""Where the time goes: per-operation profile of xlsce against the anchor on one case.

``python -m benchmarks.profile --backend torch --shape 4096x32768 [--variant masked]``
prints torch.profiler's table (self CPU time per aten op) of the eager
forward+backward of xlsce and of ``F.cross_entropy``;
``--backend numpy`` prints cProfile's table (time per NumPy call) of
``xlsce.value_and_grad`` and of the hand-written NumPy reference;
``--backend jax`` prints XLA's own trace of ``jit(value_and_grad)`` for xlsce
and optax's integer formula: the median time of each compiled kernel per call,
and the threads XLA splits it across (``outer_dimension_partitions``).
``--floor`` (torch) splits each implementation's time per call into its ATen
operations, replayed bare from Python (the same calls on the same tensors,
nothing else), and the rest (the Python around them, autograd's bookkeeping):
the floor that fewer Python layers could reach, and the count of operations
that only a different formulation (or a native kernel) could lower.
``--ops`` instead times single passes over an (N, K) array (a reduction, a
broadcast subtract, exp, in-place exp, where, ...): the price list from which
a kernel's time can be estimated by counting its passes (``--backend jax``:
jit-compiled row reductions, alone and fused with the work that follows them).
Set ``$XLSCE_BENCH_SOURCE`` to profile another copy of xlsce.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import warnings

from .cases import Case, make_inputs, parse_shape, use_source
from .impls import find_impl, to_backend
from .timing import measure


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("torch", "numpy", "jax"), default="torch")
    p.add_argument("--shape", type=parse_shape, default=(4096, 32768))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--variant", choices=("plain", "masked"), default="plain")
    p.add_argument("--impl", action="append", help="implementations to profile (default: xlsce and the main anchor)")
    p.add_argument("--calls", type=int, default=3, help="profiled calls after one warm-up")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--ops", action="store_true", help="time single passes over (N, K) instead")
    p.add_argument(
        "--floor", action="store_true", help="torch: time per call = ATen operations replayed bare + the rest"
    )
    p.add_argument("--runs", type=int, default=9, help="--floor: timed runs per measurement (median)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    use_source()
    case = Case(*args.shape, args.dtype, args.variant)
    if args.ops:
        return price_list(args.backend, case)
    default = {"torch": ["xlsce", "F.cross_entropy"], "numpy": ["xlsce", "handwritten"], "jax": ["xlsce", "optax-int"]}
    arrays = to_backend(args.backend, case, *make_inputs(case))
    if args.floor:
        if args.backend != "torch":
            p.error("--floor is for --backend torch")
        names = args.impl or default["torch"]
        return _torch_floor(case, arrays, {n: find_impl(f"torch:{n}").bind(arrays).fwdbwd for n in names}, args.runs)
    for name in args.impl or default[args.backend]:
        bound = find_impl(f"{args.backend}:{name}").bind(arrays)
        bound.sync(bound.fwdbwd())  # warm-up
        print(f"\n=== {args.backend}:{name} forward+backward, {case.label}, {args.calls} calls ===")
        if args.backend == "jax":
            _jax_kernels(bound, args.calls, args.rows)
        elif args.backend == "torch":
            import torch

            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(args.calls):
                    bound.fwdbwd()
            print(
                prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows)
            )
        else:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.calls):
                bound.fwdbwd()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(args.rows)


def _jax_kernels(bound, calls, rows):
    """XLA's trace of ``calls`` calls (``jax.profiler``, as Perfetto JSON): median time per kernel."""
    import glob
    import gzip
    import json
    import re
    import tempfile

    import jax

    text = bound.compiled_text()
    threads = {}  # kernel -> threads XLA splits it across
    for line in text.splitlines():
        kernel = re.match(r"\s*%?([\w.-]+) = \S+ (fusion|dot)\(", line)
        if kernel:
            parts = re.search(r'outer_dimension_partitions":\["?(\d*)', line)
            threads[kernel[1]] = (parts[1] if parts else "") or "1"
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(calls):
                bound.sync(bound.fwdbwd())
        (path,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    kernels = collections.defaultdict(list)
    for e in events:
        name = e["name"]
        if name in threads or name == "ThunkExecutor::Execute" or re.fullmatch(r"(cond|copy)[.\d]*", name):
            kernels[name].append(e.get("dur", 0) / 1e3)
    print(f"{'kernel':40s} {'ms/call':>9s} {'threads':>8s}")
    for name, durations in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        per_call = sum(durations) / calls
        print(f"{name:40s} {per_call:9.3f} {threads.get(name, ''):>8s}")


def _torch_floor(case, arrays, fwdbwds, runs):
    """Per call: each implementation's forward+backward time (``fwdbwds``: name -> call), its ATen
    operations (recorded with a TorchDispatchMode over one call, then called again on the recorded
    tensors, in-place ones included, with no other Python), the difference, and the Python function
    calls it makes (cProfile)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from .timing import measure_interleaved

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    class Empty(torch.autograd.Function):
        """A custom gradient that does nothing: forward z.sum(), backward g * z (saved)."""

        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return z.sum()

        @staticmethod
        def backward(ctx, g):
            return ctx.saved_tensors[0] * g

    zr = arrays[0].detach().requires_grad_(True)

    def empty():
        out = Empty.apply(zr)
        return out.detach(), torch.autograd.grad(out, zr)[0]

    timed, counts, py_calls = {}, {}, {}
    for name, fwdbwd in {**fwdbwds, "(empty Function)": empty}.items():
        fwdbwd()  # warm-up: first-call imports and caches
        pr = cProfile.Profile()  # Python function calls per call (C functions and methods count too)
        pr.enable()
        for _ in range(10):
            fwdbwd()
        pr.disable()
        py_calls[name] = pstats.Stats(pr).total_calls / 10
        with Record() as rec:
            fwdbwd()
        calls = rec.calls
        counts[name] = collections.Counter(str(func) for func, _, _ in calls)

        calls = [(func._op, a, kw) for func, a, kw in calls]  # the C++ operator, without OpOverload's frame

        def replay(calls=calls):
            for op, a, kw in calls:
                op(*a, **kw)

        timed[name] = (fwdbwd, lambda out: out)
        timed[f"{name} ops"] = (replay, lambda out: out)
    res = measure_interleaved(timed, runs=runs, min_time=0.05)
    print(f"\n=== torch forward+backward, {case.label}: per call, median of {runs} runs, in turns ===")
    print(
        f"{'implementation':20s} {'call us':>8s} {'ATen ops':>9s} {'ops replayed us':>16s} {'rest us':>8s}"
        f" {'Python calls':>13s}"
    )
    for name, count in counts.items():
        call, ops = res[name]["median_s"] * 1e6, res[f"{name} ops"]["median_s"] * 1e6
        print(f"{name:20s} {call:8.0f} {sum(count.values()):9d} {ops:16.0f} {call - ops:8.0f} {py_calls[name]:13.0f}")
    print(
        "(empty Function): an autograd.Function whose forward is z.sum() and backward g * z, through the same"
        " torch.autograd.grad: its rest is what registering a custom gradient costs"
    )
    for name, count in counts.items():
        print(f"\n{name}'s ATen operations per call:")
        for op, n in count.most_common():
            print(f"  {n:3d}  {op}")


def price_list(backend, case):
    """Median time of single passes over the logits (N, K), in ms."""
    z, y, _ = to_backend(backend, case, *make_inputs(case))
    if backend == "torch":
        import torch

        m = z.amax(dim=1, keepdim=True)
        buf = z - m
        ops = {
            "amax (read)": lambda: z.amax(dim=1, keepdim=True),
            "sum (read)": lambda: z.sum(dim=1, keepdim=True),
            "z - m (read, write new)": lambda: z - m,
            "exp(z) (new)": lambda: torch.exp(z),
            "exp_ in place": lambda: buf.exp_(),
            "mul_ by (N,1) in place": lambda: buf.mul_(m),
            "sub_ (N,1) in place": lambda: buf.sub_(m),
            "z > -inf (bool new)": lambda: z > -torch.inf,
            "where(z > -inf, z, 0) (new)": lambda: torch.where(z > -torch.inf, z, 0.0),
            "arange == y (bool new)": lambda: torch.arange(z.shape[1]) == y[:, None],
            "index_put_ (N values)": lambda: buf.index_put_((torch.arange(z.shape[0]), y), m[:, 0], accumulate=True),
            "logsumexp (fused?)": lambda: torch.logsumexp(z, dim=1),
            "softmax (fused, new)": lambda: torch.softmax(z, dim=1),
            "log_softmax (fused, new)": lambda: torch.log_softmax(z, dim=1),
            "F.cross_entropy fwd": lambda: torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1),
        }
    else:
        import numpy as np

        m = z.max(axis=1, keepdims=True)
        buf = z - m
        w = np.linspace(0.5, 2.0, z.shape[1], dtype=z.dtype)  # class weights
        ops = {
            "max (read)": lambda: z.max(axis=1, keepdims=True),
            "sum (read)": lambda: z.sum(axis=1, keepdims=True),
            "sum, einsum's loop (read)": lambda: np.einsum("...k->...", z),
            "z - m (read, write new)": lambda: z - m,
            "exp(z) (new)": lambda: np.exp(z),
            "exp in place": lambda: np.exp(buf, out=buf),
            "*= (N,1) in place": lambda: np.multiply(buf, m, out=buf),
            "z > -inf (bool new)": lambda: z > -np.inf,
            "where(z > -inf, z, 0) (new)": lambda: np.where(z > -np.inf, z, 0.0),
            "arange == y (bool new)": lambda: np.arange(z.shape[1]) == y[:, None],
            "fancy-index -= (N values)": lambda: np.subtract.at(buf, (np.arange(z.shape[0]), y), 0.0),
            "weighted sum, einsum (read)": lambda: np.einsum("...k,k->...", z, w),
            "weighted sum, matvec z @ w": lambda: z @ w,
        }
    if backend == "jax":
        return _jax_price_list(case, z, y)
    print(f"single passes over {case.label} logits ({case.logits_bytes / 2**20:.0f} MiB), median ms:")
    for name, fn in ops.items():
        t = measure(fn, lambda out: out, runs=5, min_time=0.05)["median_s"]
        print(f"  {name:32s} {t * 1e3:9.3f}")
    if backend == "numpy":
        _numpy_sum_rounding(z)


def _numpy_sum_rounding(z):
    """The rounding of float32 row sums of exp(z - max) (a softmax's denominators), np.sum's pairwise
    loop against einsum's: largest error relative to the float64 sum of the same float32 values."""
    import numpy as np

    e = np.exp(z - z.max(axis=1, keepdims=True))
    exact = e.astype(np.float64).sum(axis=1)
    for name, got in (("np.sum", e.sum(axis=1)), ("einsum", np.einsum("...k->...", e))):
        print(f"  rounding of sum(exp(z - max)), {name:7s} {np.max(np.abs(got - exact) / exact):9.1e} (relative)")


def _jax_price_list(case, z, _):
    """jit-compiled kernels: row reductions alone and with the per-row work that follows them.

    XLA's CPU backend fuses a row reduction with what consumes its result; the
    price of that fusion, against the reduction alone, is what these lines show.
    """
    import jax
    import jax.numpy as jnp

    m = jnp.max(z, axis=1, keepdims=True)
    lse = jax.nn.logsumexp(z, axis=1, keepdims=True)
    ops = {
        "max (read)": lambda z: jnp.max(z, axis=1, keepdims=True),
        "sum (read)": lambda z: jnp.sum(z, axis=1, keepdims=True),
        "sum(exp(z - max)) (read)": lambda z: jnp.sum(jnp.exp(z - jnp.max(z, axis=1, keepdims=True)), axis=1),
        "log(sum(exp(z - max))) + max": lambda z: jnp.log(jnp.sum(jnp.exp(z - m), axis=1)) + m[:, 0],
        "  same, max computed inside": lambda z: (lambda mm: jnp.log(jnp.sum(jnp.exp(z - mm), axis=1)) + mm[:, 0])(
            jnp.max(z, axis=1, keepdims=True)
        ),
        "jax.nn.logsumexp": lambda z: jax.nn.logsumexp(z, axis=1),
        "sum(z - z[:, :1]) and sum(exp)": lambda z: (
            jnp.sum(z - z[:, :1], axis=1),
            jnp.sum(jnp.exp(z - jnp.max(z, axis=1, keepdims=True)), axis=1),
        ),
        "exp(z - lse) (write new)": lambda z: jnp.exp(z - lse),
        "z * 2 (write new)": lambda z: z * 2.0,
    }
    print(f"jit-compiled kernels over {case.label} logits ({case.logits_bytes / 2**20:.0f} MiB), median ms:")
    for name, fn in ops.items():
        f = jax.jit(fn)
        t = measure(lambda f=f: f(z), jax.block_until_ready, runs=5, min_time=0.05)["median_s"]
        print(f"  {name:34s} {t * 1e3:9.2f}")


if __name__ == "__main__":
    main()
