"""xlsce on the GPU: forward+backward time and torch peak memory against the native losses.

Run ``python -m benchmarks.gpu`` (about 5 minutes on one H200; stops starting new
measurements after ``--budget`` seconds) or ``python -m benchmarks.gpu --quick`` (a
few cases, about a minute); ``--json PATH`` also writes the results (rewritten
after every measurement, so a run cut short keeps what it measured).  Without a
CUDA device for torch or a GPU for JAX it says so and exits 0.

Measured, per case (shape (N, K), dtype, variant; label smoothing 0.1, reduction
'mean'; the "masked" variant has class weights and 10 % ignored positions):

* PyTorch (CUDA): ``xlsce.cross_entropy`` eager, ``F.cross_entropy`` eager, and both
  under ``torch.compile`` (for a few cases only: compiling is slow);
* JAX (GPU): ``jax.jit(jax.value_and_grad(...))`` of xlsce, of optax's integer-label
  formula (optax-int) and of ``optax.smooth_labels`` + ``softmax_cross_entropy``.

The loss functions are those of :mod:`benchmarks.impls` (``_torch_loss``,
``_jax_loss``).  Time: the median of ``--runs`` (>= 10) timed runs after a warm-up
(:func:`benchmarks.timing.measure`), each call followed by
``torch.cuda.synchronize()`` / ``jax.block_until_ready`` inside the timed region.
torch peak memory: ``torch.cuda.max_memory_allocated()`` during one forward+backward
(its outputs held) minus ``torch.cuda.memory_allocated()`` before it.  Each
implementation's loss and |grad|_1 are checked against xlsce's on the same case.

The inputs follow :mod:`benchmarks.cases` (logits 2 N(0, 1), uniform targets,
weights U(0.5, 1.5)) but are drawn on the device: 2**31 normals take longer in NumPy
than the whole benchmark.

The fused linear loss: ``xlsce.linear_cross_entropy(h, W, y)`` against the
materialised ``xlsce.cross_entropy(h @ W.T, y)`` (and ``F.cross_entropy(h @ W.T, y)``)
at N = 16384, H = 4096, V = 131072 in bfloat16, gradients for h and W: time, and peak
memory (torch: as above; JAX: XLA's memory analysis, temp + output - alias).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import sys
import time
import traceback
import warnings

# JAX would otherwise take 75 % of the GPU's memory at its first use, next to torch's.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from .cases import EPS, IGNORE_INDEX, IGNORED_FRACTION, Case  # noqa: E402
from .impls import find_impl  # noqa: E402
from .report import CHECK_RTOL  # noqa: E402
from .timing import measure  # noqa: E402

SHAPES = ((256, 10), (65536, 1000), (4096, 32768), (16384, 131072))
BF16_SHAPES = SHAPES[1:]  # bfloat16 for the large ones
VARIANTS = ("plain", "masked")
# torch.compile: a compile per (shape, dtype, variant) and implementation, 10-30 s each
COMPILE_CASES = (
    Case(4096, 32768, "float32", "plain"),
    Case(4096, 32768, "float32", "masked"),
    Case(16384, 131072, "bfloat16", "plain"),
    Case(16384, 131072, "bfloat16", "masked"),
)
LINEAR = dict(n=16384, h=4096, v=131072, dtype="bfloat16")

QUICK_CASES = (
    Case(256, 10, "float32", "plain"),
    Case(4096, 32768, "float32", "masked"),
    Case(4096, 32768, "bfloat16", "masked"),
)
QUICK_COMPILE = (Case(4096, 32768, "bfloat16", "masked"),)
QUICK_LINEAR = dict(n=4096, h=1024, v=32768, dtype="bfloat16")

# --device cpu: every code path on tiny shapes, for testing this script without a GPU
CPU_CASES = (
    Case(64, 10, "float32", "plain"),
    Case(300, 1000, "float32", "masked"),
    Case(300, 1000, "bfloat16", "masked"),
)
CPU_COMPILE = (Case(300, 1000, "float32", "masked"),)
CPU_LINEAR = dict(n=300, h=64, v=1000, dtype="bfloat16")

TORCH_EAGER = ("xlsce", "F.cross_entropy")
TORCH_COMPILED = ("xlsce-compile", "F.cross_entropy-compile")
JAX_IMPLS = ("xlsce", "optax-int", "optax-smooth")


class OutOfTime(BaseException):
    """SIGTERM (e.g. from ``timeout``): stop measuring, print and write what there is."""


def log(msg):
    print(msg, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few cases, one torch.compile case, a smaller linear loss")
    p.add_argument("--json", metavar="PATH", help="write the results here (JSON, rewritten after each measurement)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per measurement, median reported (default 10)")
    p.add_argument("--min-time", type=float, default=0.02, help="seconds per timed run (short calls are looped)")
    p.add_argument("--budget", type=float, default=None, help="start no new measurement after this many seconds")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-linear", action="store_true", help="skip the fused linear loss")
    p.add_argument("--backend", action="append", choices=("torch", "jax"), help="repeatable; default both")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help=argparse.SUPPRESS)  # cpu: testing only
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.budget is None:
        args.budget = 120.0 if args.quick else 270.0
    return args


# --------------------------------------------------------------------------- devices


def find_devices(args):
    """{'torch': device or None, 'jax': device or None} and why each is missing."""
    found, why = {}, {}
    backends = args.backend or ("torch", "jax")
    if "torch" in backends:
        try:
            import torch

            if args.device == "cpu":
                found["torch"] = torch.device("cpu")
            elif torch.cuda.is_available():
                found["torch"] = torch.device("cuda", torch.cuda.current_device())
            else:
                why["torch"] = "torch.cuda.is_available() is False"
        except ImportError as e:
            why["torch"] = f"torch not importable: {e}"
    if "jax" in backends:
        try:
            import jax

            found["jax"] = jax.devices("cpu" if args.device == "cpu" else "gpu")[0]
        except ImportError as e:
            why["jax"] = f"jax not importable: {e}"
        except RuntimeError as e:
            why["jax"] = f"no JAX GPU: {str(e)[:300]}"
    return found, why


def versions(devices):
    out = {"python": platform.python_version()}
    for name in ("torch", "jax", "jaxlib", "optax", "numpy", "array_api_compat"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing library is just not listed
            pass
    if "torch" in devices and devices["torch"].type == "cuda":
        import torch

        out["torch_device"] = torch.cuda.get_device_name(devices["torch"])
        out["torch_cuda"] = torch.version.cuda
    if "jax" in devices:
        out["jax_device"] = str(getattr(devices["jax"], "device_kind", devices["jax"]))
    return out


# --------------------------------------------------------------------------- inputs (drawn on the device)


def torch_inputs(case, device, seed=0):
    """Logits (N, K) in the case's dtype, int64 targets, weights or None, on ``device`` (cases._draw's recipe)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn((case.n, case.k), generator=gen, device=device, dtype=torch.float32)
    z.mul_(2.0)
    dt = getattr(torch, case.dtype)
    if dt != torch.float32:
        z = z.to(dt)
    y = torch.randint(0, case.k, (case.n,), generator=gen, device=device)
    w = None
    if case.variant == "masked":
        y[torch.rand(case.n, generator=gen, device=device) < IGNORED_FRACTION] = IGNORE_INDEX
        y[0] = 0
        w = (0.5 + torch.rand(case.k, generator=gen, device=device)).to(dt)
    return z, y, w


def jax_inputs(case, device, seed=0):
    import jax
    import jax.numpy as jnp

    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    dt = jnp.dtype(case.dtype)
    with jax.default_device(device):
        z = (2.0 * jax.random.normal(k1, (case.n, case.k), dtype=jnp.float32)).astype(dt)
        y = jax.random.randint(k2, (case.n,), 0, case.k, dtype=jnp.int32)
        w = None
        if case.variant == "masked":
            y = jnp.where(jax.random.uniform(k3, (case.n,)) < IGNORED_FRACTION, IGNORE_INDEX, y).at[0].set(0)
            w = (0.5 + jax.random.uniform(k4, (case.k,), dtype=jnp.float32)).astype(dt)
    put = [jax.device_put(a, device) if a is not None else None for a in (z, y, w)]
    return jax.block_until_ready(put)


# --------------------------------------------------------------------------- measuring


def torch_sync(device):
    import torch

    if device.type == "cuda":

        def sync(out):
            torch.cuda.synchronize(device)
            return out

        return sync
    return lambda out: out


def torch_peak(fn, device):
    """Peak bytes allocated during ``fn()`` (its outputs held) above what was allocated before; None on the CPU."""
    if device.type != "cuda":
        return None
    import torch

    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


class Runner:
    """Measurements one after the other, each guarded: an error is recorded, printed, and the run goes on."""

    def __init__(self, args, meta):
        self.args, self.meta = args, meta
        self.start = time.perf_counter()
        self.records, self.linear = [], []
        self.count = 0

    def elapsed(self):
        return time.perf_counter() - self.start

    def left(self):
        return self.args.budget - self.elapsed()

    def save(self):
        if not self.args.json:
            return
        doc = {
            "meta": dict(self.meta, elapsed_s=self.elapsed()),
            "cases": self.records,
            "linear": self.linear,
            "summary": summary(self.records),
            "linear_summary": linear_summary(self.linear),
        }
        tmp = self.args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, self.args.json)

    def skip(self, need_s, what):
        if self.left() < need_s:
            log(f"[{self.elapsed():5.0f}s] skipped (budget: {self.left():.0f} s left, ~{need_s:.0f} s needed): {what}")
            return True
        return False

    def time_it(self, fn, sync, first_s):
        """measure() after the first call (the warm-up; one more for calls under a second), with fewer
        runs (at least 3) where the budget would not allow --runs."""
        runs, warmup = self.args.runs, 1 if first_s < 1.0 else 0
        if first_s * (runs + warmup) > max(self.left(), 0.0):
            runs = max(3, min(runs, int(self.left() / max(first_s, 1e-9)) - warmup))
        return measure(fn, sync, runs=runs, min_time=self.args.min_time, warmup=warmup)

    def case(self, backend, impl_name, case, arrays, device, need_s=5.0):
        rec = {"backend": backend, "impl": impl_name, **case.to_json()}
        label = f"{backend}:{impl_name:24s} {case.n}x{case.k} {case.dtype} {case.variant}"
        if self.skip(need_s, label):
            return None
        self.count += 1
        t0 = time.perf_counter()
        try:
            impl = find_impl(f"{backend}:{impl_name}")
            bound = impl.bind(arrays)
            sync = torch_sync(device) if backend == "torch" else bound.sync
            loss, grad = sync(bound.fwdbwd())
            rec["first_call_s"] = time.perf_counter() - t0
            rec["loss"] = bound.loss_value(loss)
            rec["grad_l1"] = bound.grad_l1(grad)
            rec["device"] = str(grad.device) if backend == "torch" else str(device)
            rec["dtype_out"] = str(grad.dtype)
            del loss, grad
            rec["fwdbwd"] = self.time_it(bound.fwdbwd, sync, rec["first_call_s"])
            if backend == "torch":
                rec["peak_bytes"] = torch_peak(bound.fwdbwd, device)
                rec["logits_bytes"] = case.logits_bytes
            del bound
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the run
            rec["error"] = f"{type(e).__name__}: {e}"[:600]
            traceback.print_exc(limit=3)
            _recover(backend)
        rec["wall_s"] = time.perf_counter() - t0
        self.records.append(rec)
        log(f"[{self.elapsed():5.0f}s] {label} {_brief(rec)} ({rec['wall_s']:.1f}s)")
        self.save()
        return rec


def _recover(backend):
    gc.collect()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _brief(rec):
    if "error" in rec:
        return "ERROR " + rec["error"][:200]
    text = f"fwd+bwd {_ms(rec['fwdbwd']['median_s'])} ms (first {rec['first_call_s']:.2f} s)"
    if rec.get("peak_bytes") is not None:
        text += f", peak {rec['peak_bytes'] / 2**20:.0f} MiB ({rec['peak_bytes'] / rec['logits_bytes']:.2f}x logits)"
    return text


def _ms(s):
    return "-" if s is None else f"{s * 1e3:.3g}" if s < 1 else f"{s * 1e3:.0f}"


def _free(backend):
    gc.collect()
    if backend == "torch":
        import torch

        torch._dynamo.reset()
    else:
        import jax

        jax.clear_caches()


def need_for(case):
    """Seconds a measurement of ``case`` may take (a guess, for the budget)."""
    return 25.0 if case.n * case.k >= 1 << 30 else 8.0 if case.n * case.k >= 1 << 26 else 3.0


def run_torch(runner, cases, device, names):
    for case in cases:
        if runner.skip(need_for(case), f"torch {case.label}"):
            continue
        try:
            arrays = torch_inputs(case, device)
        except Exception as e:  # noqa: BLE001
            log(f"torch inputs for {case.label} failed: {type(e).__name__}: {e}")
            _recover("torch")
            continue
        for name in names:
            compiled = name.endswith("-compile")
            runner.case("torch", name, case, arrays, device, need_s=45.0 if compiled else need_for(case))
        del arrays
        _free("torch")


def run_jax(runner, cases, device):
    for case in cases:
        if runner.skip(need_for(case), f"jax {case.label}"):
            continue
        try:
            arrays = jax_inputs(case, device)
        except Exception as e:  # noqa: BLE001
            log(f"jax inputs for {case.label} failed: {type(e).__name__}: {e}")
            continue
        for name in JAX_IMPLS:
            runner.case("jax", name, case, arrays, device, need_s=need_for(case))
        del arrays
        _free("jax")


# --------------------------------------------------------------------------- the fused linear loss


def run_linear_torch(runner, shape, device):
    import torch
    import torch.nn.functional as F

    import xlsce

    n, hdim, v = shape["n"], shape["h"], shape["v"]
    gen = torch.Generator(device=device).manual_seed(1)
    dt = getattr(torch, shape["dtype"])
    h = torch.randn((n, hdim), generator=gen, device=device).to(dt).requires_grad_(True)
    w = (torch.randn((v, hdim), generator=gen, device=device) * hdim**-0.5).to(dt).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    sync = torch_sync(device)
    kinds = {
        "xlsce.linear_cross_entropy": lambda: xlsce.linear_cross_entropy(h, w, y, label_smoothing=EPS),
        "xlsce.cross_entropy(h @ W.T)": lambda: xlsce.cross_entropy(h @ w.T, y, label_smoothing=EPS),
        "F.cross_entropy(h @ W.T)": lambda: F.cross_entropy(h @ w.T, y, label_smoothing=EPS),
    }
    for name, loss_fn in kinds.items():

        def step(loss_fn=loss_fn):
            loss = loss_fn()
            return loss.detach(), torch.autograd.grad(loss, (h, w))

        linear_case(runner, "torch", name, shape, step, sync, lambda out: [float(out[0].float())], device)
    _recover("torch")


def run_linear_jax(runner, shape, device):
    import jax
    import jax.numpy as jnp

    import xlsce

    n, hdim, v = shape["n"], shape["h"], shape["v"]
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    dt = jnp.dtype(shape["dtype"])
    with jax.default_device(device):
        h = jax.random.normal(k1, (n, hdim), dtype=jnp.float32).astype(dt)
        w = (jax.random.normal(k2, (v, hdim), dtype=jnp.float32) * hdim**-0.5).astype(dt)
        y = jax.random.randint(k3, (n,), 0, v, dtype=jnp.int32)
    h, w, y = (jax.device_put(a, device) for a in (h, w, y))
    kinds = {
        "xlsce.linear_cross_entropy": lambda h, w, y: xlsce.linear_cross_entropy(h, w, y, label_smoothing=EPS),
        "xlsce.cross_entropy(h @ W.T)": lambda h, w, y: xlsce.cross_entropy(h @ w.T, y, label_smoothing=EPS),
    }
    for name, loss_fn in kinds.items():
        holder = {}

        def step(loss_fn=loss_fn, holder=holder):
            if "compiled" not in holder:
                lowered = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(h, w, y)
                holder["compiled"] = lowered.compile()
                ma = holder["compiled"].memory_analysis()
                if ma is not None:
                    holder["xla_bytes"] = int(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)
            return holder["compiled"](h, w, y)

        rec = linear_case(runner, "jax", name, shape, step, jax.block_until_ready, lambda out: [float(out[0])], device)
        if rec is not None and "xla_bytes" in holder:
            rec["xla_memory_bytes"] = holder["xla_bytes"]
            runner.save()


def linear_case(runner, backend, name, shape, step, sync, loss_of, device):
    rec = {"backend": backend, "impl": name, **shape}
    label = f"linear {backend}:{name:28s} N={shape['n']} H={shape['h']} V={shape['v']} {shape['dtype']}"
    if runner.skip(20.0, label):
        return None
    t0 = time.perf_counter()
    try:
        out = sync(step())
        rec["first_call_s"] = time.perf_counter() - t0
        rec["loss"] = loss_of(out)[0]
        grads = out[1]
        rec["grad_norms"] = [_norm(g) for g in grads]
        del out, grads
        rec["fwdbwd"] = runner.time_it(step, sync, rec["first_call_s"])
        if backend == "torch":
            rec["peak_bytes"] = torch_peak(step, device)
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"[:600]
        traceback.print_exc(limit=3)
        _recover(backend)
    rec["wall_s"] = time.perf_counter() - t0
    runner.linear.append(rec)
    text = "ERROR " + rec["error"][:200] if "error" in rec else f"fwd+bwd {_ms(rec['fwdbwd']['median_s'])} ms"
    if rec.get("peak_bytes") is not None:
        text += f", peak {rec['peak_bytes'] / 2**20:.0f} MiB"
    log(f"[{runner.elapsed():5.0f}s] {label} {text} ({rec['wall_s']:.1f}s)")
    runner.save()
    return rec


def _norm(g):
    if hasattr(g, "detach"):
        import torch

        return float(torch.linalg.vector_norm(g.detach().float()))
    import jax.numpy as jnp

    return float(jnp.linalg.norm(g.astype(jnp.float32)))


# --------------------------------------------------------------------------- summary


def summary(records):
    """Per (backend, shape, dtype, variant): xlsce (eager/jit, compiled) / best native, and the checks."""
    groups = {}
    for r in records:
        groups.setdefault((r["backend"], tuple(r["shape"]), r["dtype"], r["variant"]), []).append(r)
    rows = []
    for (backend, shape, dtype, variant), recs in groups.items():
        ok = {r["impl"]: r for r in recs if "error" not in r}
        native = {k: r for k, r in ok.items() if not k.startswith("xlsce")}
        best = min(native.items(), key=lambda kv: kv[1]["fwdbwd"]["median_s"], default=(None, None))
        row = {"backend": backend, "shape": list(shape), "dtype": dtype, "variant": variant, "best_native": best[0]}
        row["best_native_s"] = best[1]["fwdbwd"]["median_s"] if best[1] else None
        for name in ("xlsce", "xlsce-compile"):
            if name in ok:
                t = ok[name]["fwdbwd"]["median_s"]
                row[f"{name}_s"] = t
                row[f"{name}_ratio"] = t / row["best_native_s"] if row["best_native_s"] else None
        ref = ok.get("xlsce")
        if ref:
            rels = []
            for r in ok.values():
                rels.append(max(abs(r[f] - ref[f]) / max(abs(ref[f]), 1e-30) for f in ("loss", "grad_l1")))
            row["check_max_rel_diff"] = max(rels)
            row["check_ok"] = max(rels) <= CHECK_RTOL.get(dtype, 3e-2)
        if backend == "torch":
            for name in ("xlsce", "F.cross_entropy"):
                if name in ok and ok[name].get("peak_bytes") is not None:
                    row[f"{name}_peak_x"] = ok[name]["peak_bytes"] / ok[name]["logits_bytes"]
        row["errors"] = {r["impl"]: r["error"] for r in recs if "error" in r}
        rows.append(row)
    return rows


def table(records, linear):
    lines = [
        "xlsce / best native loss, forward+backward (median ms); torch peak memory as a multiple of the logits",
        f"{'backend':7s} {'shape':>13s} {'dtype':8s} {'variant':7s} {'xlsce':>9s} {'compiled':>9s} "
        f"{'best native':>29s} {'ratio':>6s} {'cratio':>6s} {'mem x/F':>11s} check",
    ]
    for row in summary(records):
        shape = "x".join(str(s) for s in row["shape"])
        best = f"{row['best_native'] or '-'} {_ms(row['best_native_s'])}"
        ratio = row.get("xlsce_ratio")
        cratio = row.get("xlsce-compile_ratio")
        mem = ""
        if row["backend"] == "torch" and "xlsce_peak_x" in row:
            mem = f"{row['xlsce_peak_x']:.2f}/{row.get('F.cross_entropy_peak_x', float('nan')):.2f}"
        check = "-" if "check_ok" not in row else "ok" if row["check_ok"] else f"DIFF {row['check_max_rel_diff']:.1e}"
        if row["errors"]:
            check += " errors: " + ", ".join(row["errors"])
        lines.append(
            f"{row['backend']:7s} {shape:>13s} {row['dtype']:8s} {row['variant']:7s} "
            f"{_ms(row.get('xlsce_s')):>9s} {_ms(row.get('xlsce-compile_s')):>9s} {best:>29s} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>6s} {'-' if cratio is None else f'{cratio:.2f}':>6s} "
            f"{mem:>11s} {check}"
        )
    if linear:
        lines.append("")
        lines.append(
            "fused linear loss (gradients for h and W): median ms, peak MiB (torch: allocated; JAX: XLA's analysis), "
            "and linear_cross_entropy / this"
        )
        ratios = {(r["backend"], r["against"]): r for r in linear_summary(linear)}
        for r in linear:
            if "error" in r:
                lines.append(f"{r['backend']:7s} {r['impl']:30s} ERROR {r['error'][:150]}")
                continue
            mem = _memory(r)
            text = (
                f"{r['backend']:7s} {r['impl']:30s} {_ms(r['fwdbwd']['median_s']):>9s} ms "
                f"{'-' if mem is None else f'{mem / 2**20:.0f}':>8s} MiB  loss {r['loss']:.5f}"
            )
            q = ratios.get((r["backend"], r["impl"]))
            if q:
                mem_ratio = "-" if q["memory_ratio"] is None else f"{q['memory_ratio']:.3f}"
                text += f"   time x{q['time_ratio']:.2f}, memory x{mem_ratio}, {'agree' if q['agree'] else 'DIFFER'}"
            lines.append(text)
    return "\n".join(lines)


def _memory(rec):
    return rec.get("peak_bytes") if rec.get("peak_bytes") is not None else rec.get("xla_memory_bytes")


def linear_summary(linear):
    """Per backend: linear_cross_entropy against each materialised loss (time, memory, agreement)."""
    rows = []
    ok = [r for r in linear if "error" not in r]
    for fused in (r for r in ok if r["impl"] == "xlsce.linear_cross_entropy"):
        for other in (r for r in ok if r["backend"] == fused["backend"] and r is not fused):
            m1, m2 = _memory(fused), _memory(other)
            rel = [abs(fused["loss"] - other["loss"]) / max(abs(other["loss"]), 1e-30)]
            rel += [
                abs(a - b) / max(abs(b), 1e-30) for a, b in zip(fused["grad_norms"], other["grad_norms"], strict=True)
            ]
            rows.append(
                {
                    "backend": fused["backend"],
                    "against": other["impl"],
                    "time_ratio": fused["fwdbwd"]["median_s"] / other["fwdbwd"]["median_s"],
                    "memory_ratio": m1 / m2 if m1 is not None and m2 else None,
                    "max_rel_diff": max(rel),
                    "agree": max(rel) <= CHECK_RTOL.get(fused["dtype"], 3e-2),
                }
            )
    return rows


# --------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    devices, why = find_devices(args)
    for backend, reason in why.items():
        log(f"{backend}: skipped ({reason})")
    if not devices:
        log("no GPU: neither torch CUDA nor a JAX GPU is available; nothing to measure")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": {"no_gpu": why}, "cases": [], "linear": []}, f, indent=1)
        return 0
    if args.device == "cpu":
        cases, compile_cases, linear = CPU_CASES, CPU_COMPILE, CPU_LINEAR
    elif args.quick:
        cases, compile_cases, linear = QUICK_CASES, QUICK_COMPILE, QUICK_LINEAR
    else:
        cases = [Case(n, k, "float32", v) for n, k in SHAPES for v in VARIANTS]
        cases += [Case(n, k, "bfloat16", v) for n, k in BF16_SHAPES for v in VARIANTS]
        cases.sort(key=lambda c: (c.n * c.k, c.dtype != "float32", c.variant != "plain"))
        compile_cases, linear = COMPILE_CASES, LINEAR
    if args.no_compile:
        compile_cases = ()
    meta = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "versions": versions(devices),
        "devices": {k: str(v) for k, v in devices.items()},
        "skipped_backends": why,
        "eps": EPS,
        "runs": args.runs,
        "budget_s": args.budget,
    }
    log(f"devices: {meta['devices']}; {meta['versions']}")
    runner = Runner(args, meta)

    def on_term(signum, frame):
        raise OutOfTime()

    signal.signal(signal.SIGTERM, on_term)
    status = 0
    try:
        # In order of priority: the budget cuts from the end.
        if "torch" in devices:
            log(f"--- torch eager on {devices['torch']}: {len(cases)} cases")
            run_torch(runner, cases, devices["torch"], TORCH_EAGER)
            _recover("torch")
        if "jax" in devices:
            log(f"--- jax jit on {devices['jax']}: {len(cases)} cases")
            run_jax(runner, cases, devices["jax"])
        if not args.no_linear:
            log(f"--- fused linear loss {linear}")
            if "torch" in devices:
                run_linear_torch(runner, linear, devices["torch"])
            if "jax" in devices:
                run_linear_jax(runner, linear, devices["jax"])
        if "torch" in devices and compile_cases:
            log(f"--- torch.compile on {devices['torch']}: {len(compile_cases)} cases")
            run_torch(runner, compile_cases, devices["torch"], TORCH_COMPILED)
    except OutOfTime:
        log(f"[{runner.elapsed():5.0f}s] terminated (SIGTERM): results so far")
        status = 124
    except KeyboardInterrupt:
        log(f"[{runner.elapsed():5.0f}s] interrupted: results so far")
        status = 130
    # the compiled rows join their eager rows in the table
    log("")
    log(table(runner.records, runner.linear))
    runner.save()
    errors = sum("error" in r for r in runner.records + runner.linear)
    log(
        f"\n{runner.count} case measurements, {len(runner.linear)} linear, {errors} errors, {runner.elapsed():.0f} s"
        + (f"; wrote {args.json}" if args.json else "")
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
