"""Command line and main loop of ``python -m benchmarks``."""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings

from . import report
from .cases import CACHE_ENV, SOURCE_ENV, default_cases, make_inputs, parse_shape, use_source
from .impls import IMPLS, available_backends, to_backend
from .memory import jax_memory, measure_subprocess
from .timing import measure_interleaved


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="xlsce vs each framework's own label-smoothing cross-entropy: time, memory, ratios.",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, no torch.compile: under a minute")
    p.add_argument("--out", default="docs/benchmarks", help="output directory (default: docs/benchmarks)")
    p.add_argument(
        "--backend", action="append", choices=("numpy", "jax", "torch"), help="repeatable; default all installed"
    )
    p.add_argument("--shape", action="append", type=parse_shape, help="NxK, repeatable (default: the issue's shapes)")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16"), help="repeatable")
    p.add_argument(
        "--variant", action="append", choices=("plain", "masked"), help="masked: class weights + ignored positions"
    )
    p.add_argument("--impl", action="append", help="keep implementations whose backend:name contains this, repeatable")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median; >= 5 recommended)")
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
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.min_time is None:
        args.min_time = 0.02 if args.quick else 0.1
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
        out.append(impl)
    return out


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
    for impl in impls:
        bound = bounds.get(impl.key)
        if (
            bound is not None
            and not args.no_memory
            and case.n * case.k >= args.memory_min_size
            and (args.memory_compiled or not impl.compiled)
        ):
            try:
                recs[impl.key]["memory"] = (
                    jax_memory(bound, case) if impl.backend == "jax" else measure_subprocess(impl, case)
                )
            except Exception as e:  # noqa: BLE001
                recs[impl.key]["memory"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    bounds.clear()
    return [recs[impl.key] for impl in impls]


def _free(backend):
    gc.collect()
    if backend == "torch":
        import torch

        torch._dynamo.reset()
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
        arrays = to_backend(backend, case, *make_inputs(case))
        t0 = time.perf_counter()
        for impl, rec in zip(mine, run_case(mine, case, arrays, args), strict=True):
            done += 1
            log(
                f"[{done}/{total} {time.perf_counter() - start:6.0f}s] {impl.key:30s} {case.label:28s} "
                f"{report.brief(rec)}"
            )
            yield rec
        log(f"    ({case.label}: {len(mine)} implementations in {time.perf_counter() - t0:.1f}s)")
        del arrays
        _free(backend)


def _worker(argv):
    """``python -m benchmarks.runner --worker BACKEND OFFSET TOTAL START ARGS...``: JSON records on stdout."""
    backend, offset, total, start = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    args = parse_args(argv[4:])
    warnings.filterwarnings("ignore")
    log(f"{backend}: xlsce from {use_source()}")
    cases = default_cases(args.quick, args.shape, args.dtype, args.variant)
    tasks = [(c, i) for c in cases for i in select_impls(args) if i.backend == backend and i.supports(c)]
    start = time.perf_counter() - start
    for rec in run_backend(backend, tasks, args, offset, total, start):
        print(RECORD + json.dumps(rec), flush=True)


RECORD = "@record "


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cases = default_cases(args.quick, args.shape, args.dtype, args.variant)
    impls = select_impls(args)
    todo = [(c, i) for c in cases for i in impls if i.supports(c)]
    if not todo:
        log("nothing to run: no implementation matches the options")
        return 2
    backends = list(dict.fromkeys(i.backend for _, i in todo))
    log(
        f"{len(todo)} measurements: {len(cases)} cases x {len(impls)} implementations, "
        f"one process per backend ({', '.join(backends)}); output in {args.out}"
    )
    start = time.perf_counter()
    results = []
    offset = 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    cache = tempfile.TemporaryDirectory(prefix="xlsce-bench-")
    source = xlsce_source(args.xlsce, root, cache.name)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env[SOURCE_ENV] = source["dir"]
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
        if args.threads == 1:
            flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    load0 = os.getloadavg()
    log(f"xlsce: {source['describe']}")
    env.setdefault(CACHE_ENV, cache.name)
    for backend in backends:
        # One process per backend: thread pools of different frameworks never compete.
        n = sum(1 for _, i in todo if i.backend == backend)
        cmd = [sys.executable, "-m", "benchmarks.runner", "--worker", backend, str(offset), str(len(todo))]
        cmd += [str(time.perf_counter() - start), *argv]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        got = [json.loads(ln[len(RECORD) :]) for ln in proc.stdout.splitlines() if ln.startswith(RECORD)]
        if proc.returncode != 0:
            log(f"{backend} worker exited with status {proc.returncode} after {len(got)} of {n} measurements")
        results += got
        offset += n
    cache.cleanup()
    elapsed = time.perf_counter() - start
    order = {(c.label, i.key): j for j, (c, i) in enumerate(todo)}
    results.sort(key=lambda r: order.get((report.case_label(r), f"{r['backend']}:{r['impl']}"), len(order)))
    doc = report.build(results, args, argv, elapsed, load=(load0, os.getloadavg()), source=source)
    paths = report.write(doc, args.out)
    print(report.console(doc))
    log(f"done in {elapsed:.0f} s; wrote " + ", ".join(paths))
    return 0 if len(results) == len(todo) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2:])
    else:
        sys.exit(main())
