"""Command line and main loop of ``python -m benchmarks``."""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings

from . import report
from .cases import CACHE_ENV, SOURCE_ENV, default_cases, make_inputs, parse_shape, use_source
from .impls import IMPLS, available_backends, probe, to_backend
from .memory import cuda_memory, jax_memory, measure_subprocess
from .timing import measure_interleaved

# --device cuda measures these (substrings of backend:name, as --impl): no one-hot code, and the floor
CUDA_IMPLS = ("xlsce", "F.cross_entropy", "optax", "floor")
JAX_PLATFORM = {"cpu": "cpu", "cuda": "cuda"}  # JAX_PLATFORMS of the workers


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="xlsce vs each framework's own label-smoothing cross-entropy: time, memory, ratios.",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, no torch.compile: under a minute")
    p.add_argument("--out", help="output directory (default: docs/benchmarks, with --device cuda docs/benchmarks/cuda)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: torch and JAX on the GPU, with the GPU's cases (large shapes in float32 and bfloat16, "
        "(256, 10), the fused linear loss at 8192x4096x128256 bfloat16), --impl defaulting to "
        + ", ".join(CUDA_IMPLS)
        + ", memory from torch's CUDA allocator and a host-synchronisation check; exits 2 where no backend has a GPU",
    )
    p.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds (the measurement under way is dropped) and write what was measured; "
        "the compiled implementations run last, then, so that they are what is cut",
    )
    p.add_argument(
        "--linear",
        action="append",
        type=lambda t: parse_shape(t, 3),
        metavar="NxHxV",
        help="a case of the fused linear loss (hidden NxH, classifier VxH), repeatable; dtypes from --dtype "
        "(default bfloat16)",
    )
    p.add_argument(
        "--backend", action="append", choices=("numpy", "jax", "torch"), help="repeatable; default all installed"
    )
    p.add_argument("--shape", action="append", type=parse_shape, help="NxK, repeatable (default: the issue's shapes)")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16"), help="repeatable")
    p.add_argument(
        "--variant", action="append", choices=("plain", "masked"), help="masked: class weights + ignored positions"
    )
    p.add_argument(
        "--impl",
        action="append",
        help="keep implementations whose backend:name contains this, repeatable; 'floor' (the bandwidth floor: "
        "reading the logits once, writing a gradient once) runs only when named",
    )
    p.add_argument("--runs", type=int, help="timed runs per measurement (median; default 5, with --device cuda 10)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per timed run (loops short calls)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--memory-min-size", type=int, default=None, help="measure memory only from N*K elements")
    p.add_argument(
        "--memory-compiled", action="store_true", help="also measure torch.compile memory (recompiles per case)"
    )
    p.add_argument(
        "--xlsce",
        metavar="DIR_OR_REV",
        help="benchmark the xlsce package in DIR (containing xlsce/), or at git revision REV of this repository "
        "(exported to a temporary directory); default: the working tree",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="threads for torch and BLAS (OMP_NUM_THREADS); 1 also makes XLA single-threaded (default: all cores)",
    )
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--no-compile", action="store_true", help="skip torch.compile implementations")
    comp.add_argument("--compile", action="store_true", help="include torch.compile in --quick mode")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        if args.backend and "numpy" in args.backend:
            p.error("--device cuda: NumPy runs on the CPU only (choose --backend torch and/or jax)")
        args.backend = args.backend or [b for b in available_backends() if b != "numpy"]
        args.impl = args.impl or list(CUDA_IMPLS)
    if args.out is None:
        args.out = "docs/benchmarks/cuda" if cuda else "docs/benchmarks"
    if args.runs is None:
        args.runs = 10 if cuda else 5
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.min_time is None:
        args.min_time = 0.02 if args.quick or cuda else 0.1
    if args.memory_min_size is None:
        args.memory_min_size = 1 << 20
    return args


def _git(root, *args):
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=60)
    return proc.returncode, proc.stdout


def xlsce_source(spec, root, tmp):
    """Where the benchmarked xlsce comes from: {'dir', 'describe', 'sha256'} (sha256 of its *.py files)."""
    if spec is None or os.path.isfile(os.path.join(spec, "xlsce", "__init__.py")):
        folder = os.path.abspath(spec or root)
        describe = f"directory {folder}"
        if spec is None:
            rc, head = _git(root, "rev-parse", "--short", "HEAD")
            dirty = _git(root, "diff", "--quiet", "HEAD", "--", "xlsce")[0] != 0
            if rc == 0:
                describe = f"working tree at {head.decode().strip()}" + (
                    " with uncommitted xlsce/ changes" if dirty else ""
                )
    else:
        rc, commit = _git(root, "rev-parse", "--short", spec)
        if rc != 0:
            raise SystemExit(f"--xlsce {spec!r} is neither a directory holding xlsce/ nor a git revision")
        folder = os.path.join(tmp, "xlsce-src")
        os.makedirs(folder)
        rc, tar = _git(root, "archive", "--format=tar", spec, "xlsce")
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(folder, filter="data")
        describe = f"git revision {spec} ({commit.decode().strip()})"
    digest = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(folder, "xlsce"))):
        if name.endswith(".py"):
            with open(os.path.join(folder, "xlsce", name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return {"dir": folder, "describe": describe, "sha256": digest.hexdigest()[:16]}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def select_impls(args):
    backends = args.backend or available_backends()
    skip_compile = args.no_compile or (args.quick and not args.compile)
    out = []
    for impl in IMPLS:
        if impl.backend not in backends or (impl.compiled and skip_compile):
            continue
        if args.impl and not any(s in impl.key for s in args.impl):
            continue
        if impl.role == "floor" and not args.impl:  # not a loss: only when asked for
            continue
        out.append(impl)
    return out


def plan(args):
    """The (case, implementation) pairs to measure, in the order of the report."""
    cases = default_cases(args.quick, args.shape, args.dtype, args.variant, args.device, args.linear)
    impls = select_impls(args)
    return [(c, i) for c in cases for i in impls if i.supports(c)]


def stage(args, task):
    """Tasks run stage by stage, each backend's in a process: with a --budget, the eager implementations,
    then the linear loss, then torch.compile (slow to build); without, everything in one stage."""
    case, impl = task
    return 0 if args.budget is None else 2 if impl.compiled else 1 if case.h else 0


def run_case(impls, case, arrays, args):
    """The records of ``impls`` on one case: each checked (first call: loss and gradient), then all
    timed in turns, forward+backward then forward (:func:`timing.measure_interleaved`), then memory."""
    recs, bounds = {}, {}
    for impl in impls:
        rec = {"backend": impl.backend, "impl": impl.name, "role": impl.role, "description": impl.description}
        rec.update(case.to_json())
        recs[impl.key] = rec
        try:
            bound = impl.bind(arrays)
            t0 = time.perf_counter()
            loss, grad = bound.sync(bound.fwdbwd())
            rec["first_call_s"] = time.perf_counter() - t0
            rec["loss"] = bound.loss_value(loss)
            rec["grad_l1"] = bound.grad_l1(grad)
            del loss, grad
            if bound.host_sync is not None:
                rec["host_sync"] = bound.host_sync()
            bounds[impl.key] = bound
        except Exception as e:  # one failing implementation must not stop the run
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
    for phase in ("fwdbwd", "fwd"):
        calls = {key: (getattr(bound, phase), bound.sync) for key, bound in bounds.items()}
        for key, timed in measure_interleaved(calls, runs=args.runs, min_time=args.min_time).items():
            if "error" in timed:
                recs[key]["error"] = timed["error"]
                del bounds[key]
            else:
                recs[key][phase] = timed
    cuda = args.device == "cuda"
    for impl in impls:
        bound = bounds.get(impl.key)
        if (
            bound is not None
            and not args.no_memory
            and case.n * case.k >= args.memory_min_size
            and (args.memory_compiled or not impl.compiled or cuda)  # on CUDA, measured in this process
        ):
            try:
                if impl.backend == "jax":
                    recs[impl.key]["memory"] = jax_memory(bound, case)
                elif cuda:
                    recs[impl.key]["memory"] = cuda_memory(bound, case)
                else:
                    recs[impl.key]["memory"] = measure_subprocess(impl, case)
            except Exception as e:  # noqa: BLE001
                recs[impl.key]["memory"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    bounds.clear()
    return [recs[impl.key] for impl in impls]


def _free(backend):
    gc.collect()
    if backend == "torch":
        import torch

        torch._dynamo.reset()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    elif backend == "jax":
        import jax

        jax.clear_caches()


def run_backend(backend, tasks, args, offset, total, start):
    """Run one backend's (case, impl) pairs in this process; yields the records."""
    done = offset
    by_case = {}
    for case, impl in tasks:
        by_case.setdefault(case, []).append(impl)
    for case, mine in by_case.items():
        arrays = to_backend(backend, case, *make_inputs(case), device=args.device)
        t0 = time.perf_counter()
        for impl, rec in zip(mine, run_case(mine, case, arrays, args), strict=True):
            done += 1
            yield rec  # printed before the progress line: once that is shown, the record is on its way
            log(
                f"[{done}/{total} {time.perf_counter() - start:6.0f}s] {impl.key:30s} {case.label:28s} "
                f"{report.brief(rec)}"
            )
        log(f"    ({case.label}: {len(mine)} implementations in {time.perf_counter() - t0:.1f}s)")
        del arrays
        _free(backend)


def _worker(argv):
    """``python -m benchmarks.runner --worker BACKEND STAGE OFFSET TOTAL START ARGS...``: JSON records on stdout."""
    backend, st, offset, total, start = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
    args = parse_args(argv[5:])
    warnings.filterwarnings("ignore")
    log(f"{backend}: xlsce from {use_source()}")
    tasks = [t for t in plan(args) if t[1].backend == backend and stage(args, t) == st]
    start = time.perf_counter() - start
    for rec in run_backend(backend, tasks, args, offset, total, start):
        print(RECORD + json.dumps(rec), flush=True)


RECORD = "@record "


class Stop:
    """Why the run stops early (None: it does not): ``stop(reason)`` (from the budget's timer or a signal
    handler) records it and kills the worker running, whose records up to then are still read."""

    def __init__(self, budget=None):
        self.reason, self.proc = None, None
        self.budget = None if budget is None else f"budget of {budget:g} s"  # the budget's reason

    def __call__(self, reason):
        self.reason = self.reason or reason
        if self.proc is not None:
            self.proc.kill()


def run_worker(cmd, env, cwd, on_record, stop, deadline=None):
    """Run one worker, passing each record to ``on_record`` as it comes, until it ends or ``stop`` kills
    it (at ``deadline``, perf_counter seconds, if given).  Returns its exit status."""
    stop.proc = proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
    timer = None if deadline is None else threading.Timer(max(deadline - time.perf_counter(), 0), stop, [stop.budget])
    if timer:
        timer.start()
    try:
        for line in proc.stdout:
            if line.startswith(RECORD) and line.endswith("\n"):  # a worker killed mid-line left no record
                on_record(json.loads(line[len(RECORD) :]))
    finally:
        if timer:
            timer.cancel()
        proc.wait()
        stop.proc = None
    return proc.returncode


def _probe(device, backends, env, cwd):
    """:func:`impls.probe` in a fresh process (so that this one holds no GPU); JAX_PLATFORMS unset, for JAX's
    own message on the platforms it found."""
    cmd = [sys.executable, "-m", "benchmarks.runner", "--probe", device, *backends]
    env = {k: v for k, v in env.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {b: {"error": f"probe failed: {why[:300]}"} for b in backends}
    return json.loads(lines[-1])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()  # the budget counts from here: the whole command takes about that long
    todo = plan(args)
    if not todo:
        log("nothing to run: no implementation matches the options")
        return 2
    backends = list(dict.fromkeys(i.backend for _, i in todo))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS=JAX_PLATFORM[args.device])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    devices = None
    if args.device != "cpu":
        devices = _probe(args.device, backends, env, root)
        for backend, found in devices.items():
            log(f"{backend}: " + (found.get("device") or f"skipped, cannot run on {args.device}: {found['error']}"))
        backends = [b for b in backends if "device" in devices[b]]
        if not backends:
            log(f"error: --device {args.device}: no backend can run there; nothing measured")
            return 2
        todo = [t for t in todo if t[1].backend in backends]
    stages = sorted({(stage(args, t), backends.index(t[1].backend)) for t in todo})
    log(
        f"{len(todo)} measurements: {len({c for c, _ in todo})} cases x {len({i for _, i in todo})} implementations, "
        f"{len(stages)} processes ({', '.join(backends)}) on {args.device}"
        + ("" if args.budget is None else f", budget {args.budget:.0f} s")
        + f"; output in {args.out}"
    )
    deadline = None if args.budget is None else start + args.budget
    cache = tempfile.TemporaryDirectory(prefix="xlsce-bench-")
    source = xlsce_source(args.xlsce, root, cache.name)
    env[SOURCE_ENV] = source["dir"]
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
        if args.threads == 1:
            flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    env.setdefault(CACHE_ENV, cache.name)
    log(f"xlsce: {source['describe']}")
    machine = report.machine_info()
    machine.update(xlsce_source=source["describe"], xlsce_sha256=source["sha256"], threads_option=args.threads)
    machine.update(loadavg_1_5_15_start=list(os.getloadavg()), device=args.device)
    if devices:
        machine["devices"] = devices
    results = []

    def doc(stopped):
        order = {(c.label, i.key): j for j, (c, i) in enumerate(todo)}
        results.sort(key=lambda r: order.get((report.case_label(r), f"{r['backend']}:{r['impl']}"), len(order)))
        done = {(report.case_label(r), f"{r['backend']}:{r['impl']}") for r in results}
        missing = [f"{i.key} {c.label}" for c, i in todo if (c.label, i.key) not in done]
        stopped = stopped if missing else None  # a stop after the last measurement cut nothing
        return report.build(results, args, argv, time.perf_counter() - start, machine, stopped, missing)

    def on_record(rec):
        results.append(rec)
        report.write(doc("in progress"), args.out, full=False)  # results.json per case: kept if the run is killed

    stop = Stop(args.budget)
    # SIGTERM (as from `timeout`) and Ctrl-C stop the worker; what it measured is kept and written
    handlers = {
        sig: signal.signal(sig, lambda n, f: stop("SIGTERM" if n == signal.SIGTERM else "interrupted"))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    offset = 0
    for st, b in stages:
        backend = backends[b]
        if deadline is not None and time.perf_counter() >= deadline:
            stop(stop.budget)
        if stop.reason:
            break
        # One process per backend (and stage): thread pools of different frameworks never compete.
        n = sum(1 for t in todo if t[1].backend == backend and stage(args, t) == st)
        cmd = [sys.executable, "-m", "benchmarks.runner", "--worker", backend, str(st), str(offset)]
        cmd += [str(len(todo)), str(time.perf_counter() - start), *argv]
        got = len(results)
        rc = run_worker(cmd, env, root, on_record, stop, deadline)
        if rc != 0 and not stop.reason:
            log(f"{backend} worker exited with status {rc} after {len(results) - got} of {n} measurements")
        offset += n
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    cache.cleanup()
    machine["loadavg_1_5_15_end"] = list(os.getloadavg())
    final = doc(stop.reason)
    stopped = final["stopped"]
    paths = report.write(final, args.out)
    print(report.console(final))
    if stopped:
        log(f"stopped ({stopped}): {len(final['not_measured'])} of {len(todo)} measurements not made")
    log(f"done in {final['elapsed_s']:.0f} s; wrote " + ", ".join(paths))
    if stopped in ("SIGTERM", "interrupted"):
        return 124 if stopped == "SIGTERM" else 130
    return 0 if stopped or not final["not_measured"] else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2:])
    elif sys.argv[1:2] == ["--probe"]:
        print(json.dumps(probe(sys.argv[2], sys.argv[3:])))
    else:
        sys.exit(main())
