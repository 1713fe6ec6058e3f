"""A/B of xlsce against itself at a git revision, in one process: ``python -m benchmarks.ab REV``.

``python -m benchmarks --xlsce REV`` measures another copy of xlsce in a run of its
own; on this project's shared machine two runs differ by more than a change of 10 %
does.  Here the working tree's xlsce (B), xlsce at ``REV`` (A, imported as a package
of another name) and the backend's native anchor are timed in turns in one process,
on the same inputs, for many rounds; ``--clock cpu`` counts the process's CPU time
instead of the wall clock (for single-threaded NumPy: the other tenants' time is
then left out).  It prints each median time per call, B / A, and each copy's ratio
to the anchor.  Nothing is written.

    python -m benchmarks.ab e074278 --backend numpy --shape 256x10 --shape 65536x1000 --clock cpu

``--linear NxHxV`` times ``linear_cross_entropy``'s forward+backward (torch, float32, eps 0, the
gradients of hidden and classifier) instead, against torch's chunked ``F.linear_cross_entropy``
(``options=nn.LinearCrossEntropyOptions()``) as the anchor; ``--chunk-size`` sets xlsce's.

    python -m benchmarks.ab HEAD --linear 1024x512x32768 --rounds 5
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
import warnings

from .cases import EPS, Case, make_inputs, parse_shape
from .impls import find_impl, to_backend
from .runner import xlsce_source
from .timing import measure_interleaved

ANCHORS = {"numpy": "handwritten", "torch": "F.cross_entropy", "jax": "optax-int"}


def _xlsce_at(rev, tmp):
    """xlsce at git revision ``rev`` of this repository, imported as the package ``xlsce_ab``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = xlsce_source(rev, root, tmp)
    shutil.move(os.path.join(source["dir"], "xlsce"), os.path.join(tmp, "xlsce_ab"))  # relative imports only
    sys.path.insert(0, tmp)
    return importlib.import_module("xlsce_ab"), source["describe"]


def _bind(backend, mod, arrays):
    """(fn, sync) of one copy of xlsce: forward+backward as ``python -m benchmarks`` times it."""
    z, y, w = arrays
    if backend == "numpy":
        return (lambda: mod.value_and_grad(z, y, label_smoothing=EPS, weight=w)), (lambda out: out)
    if backend == "torch":
        import torch

        zr = z.detach().requires_grad_(True)

        def fwdbwd():
            out = mod.cross_entropy(zr, y, label_smoothing=EPS, weight=w)
            return out.detach(), torch.autograd.grad(out, zr)[0]

        return fwdbwd, (lambda out: out)
    import jax

    fg = jax.jit(jax.value_and_grad(lambda z, y, w: mod.cross_entropy(z, y, label_smoothing=EPS, weight=w)))
    return (lambda: fg(z, y, w)), jax.block_until_ready


def _bind_linear(mod, arrays, chunk_size):
    """(fn, sync): linear_cross_entropy's forward+backward, the gradients of hidden and classifier."""
    import torch

    hidden, classifier, target = arrays

    def fwdbwd():
        loss = mod.linear_cross_entropy(hidden, classifier, target, chunk_size=chunk_size)
        return loss.detach(), torch.autograd.grad(loss, (hidden, classifier))

    return fwdbwd, (lambda out: out)


def _torch_chunked(arrays):
    import torch

    hidden, classifier, target = arrays
    options = torch.nn.LinearCrossEntropyOptions()

    def fwdbwd():
        loss = torch.nn.functional.linear_cross_entropy(hidden, classifier, target, options=options)
        return loss.detach(), torch.autograd.grad(loss, (hidden, classifier))

    return fwdbwd, (lambda out: out)


def _linear_ab(old, new, shape, args, clock):
    import torch

    from .cases import linear_inputs

    n, h, v = shape
    hidden, classifier, target = (torch.from_numpy(a) for a in linear_inputs(n, h, v))
    arrays = (hidden.requires_grad_(), classifier.requires_grad_(), target)
    calls = {
        "A": _bind_linear(old, arrays, args.chunk_size),
        "B": _bind_linear(new, arrays, args.chunk_size),
        "anchor": _torch_chunked(arrays),
    }
    rec = measure_interleaved(calls, runs=args.rounds, min_time=args.min_time, clock=clock)
    t = {name: r["median_s"] for name, r in rec.items()}
    spread = {name: (min(r["runs_s"]), max(r["runs_s"])) for name, r in rec.items()}
    print(
        f"linear {n}x{h}x{v}  A {t['A']:8.4f} s  B {t['B']:8.4f} s  torch-chunked {t['anchor']:8.4f} s   "
        f"B/A {t['B'] / t['A']:.3f}   vs torch-chunked: A {t['A'] / t['anchor']:.3f}, B {t['B'] / t['anchor']:.3f}   "
        f"(min..max per run: " + ", ".join(f"{k} {lo:.3f}..{hi:.3f}" for k, (lo, hi) in spread.items()) + ")",
        flush=True,
    )


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.splitlines()[0])
    p.add_argument("rev", help="git revision of this repository (A); B is the working tree")
    p.add_argument("--backend", action="append", choices=("numpy", "torch", "jax"))
    p.add_argument("--shape", type=parse_shape, action="append")
    p.add_argument("--variant", action="append", choices=("plain", "masked"))
    p.add_argument("--rounds", type=int, default=15, help="timed runs of each, in turns (median)")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per timed run")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument(
        "--linear", type=lambda t: parse_shape(t, 3), action="append", help="NxHxV: time linear_cross_entropy instead"
    )
    p.add_argument("--chunk-size", type=int, default=None, help="--linear: xlsce's rows per chunk (default: its rule)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import xlsce

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory(prefix="xlsce-ab-") as tmp:
        old, describe = _xlsce_at(args.rev, tmp)
        print(
            f"A: xlsce at {describe}; B: {os.path.dirname(xlsce.__file__)}; {args.clock} clock, median of {args.rounds}"
        )
        for shape in args.linear or []:
            _linear_ab(old, xlsce, shape, args, clock)
        for backend in args.backend or ([] if args.linear else ["numpy", "torch"]):
            for shape in args.shape or [(256, 10)]:
                for variant in args.variant or ["plain", "masked"]:
                    case = Case(*shape, "float32", variant)
                    arrays = to_backend(backend, case, *make_inputs(case))
                    anchor = find_impl(f"{backend}:{ANCHORS[backend]}").bind(arrays)
                    calls = {"A": _bind(backend, old, arrays), "B": _bind(backend, xlsce, arrays)}
                    calls["anchor"] = (anchor.fwdbwd, anchor.sync)
                    rec = measure_interleaved(calls, runs=args.rounds, min_time=args.min_time, clock=clock)
                    t = {name: r["median_s"] for name, r in rec.items()}
                    print(
                        f"{backend:5s} {case.label:24s} A {t['A'] * 1e3:9.4f} ms  B {t['B'] * 1e3:9.4f} ms  "
                        f"{ANCHORS[backend]} {t['anchor'] * 1e3:9.4f} ms   B/A {t['B'] / t['A']:.3f}   "
                        f"vs anchor: A {t['A'] / t['anchor']:.2f}, B {t['B'] / t['anchor']:.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    sys.exit(main())
