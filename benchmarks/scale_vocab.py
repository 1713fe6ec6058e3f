"""Vocabulary parallelism: per-device memory under JAX, time over torch.distributed, Megatron's smoothing (issue 15).

    python -m benchmarks.scale_vocab memory    [--rows 4096 --classes 65536 --hidden 1024 --vocab 65536]
    python -m benchmarks.scale_vocab torch     [--rows 4096 --classes 32768 --runs 7]
    python -m benchmarks.scale_vocab megatron  [--rows 512 --classes 32000]
    python -m benchmarks.scale_vocab quick     (all three, tiny: the CI smoke test)

``memory``: in a fresh process with 8 simulated JAX CPU devices (``XLA_FLAGS`` set before JAX is
imported), the compiled program of ``jax.jit(jax.value_and_grad(loss))`` for

* ``cross_entropy``: float32 logits ``rows x classes``, label smoothing 0.1, the gradient with respect
  to the logits; sharded: under ``jax.shard_map`` with ``axis_name="v"``, the logits split over the
  classes on the 8 devices (``P(None, "v")``), the target replicated; unsharded: the same loss on one
  device;
* ``linear_cross_entropy``: hidden ``rows x hidden`` (replicated), classifier ``vocab x hidden``
  (sharded: ``P("v", None)``), the gradients with respect to both.

Per device, ``memory_analysis()``'s argument + output + temp bytes (the programs are compiled from
abstract arrays: nothing of the full size is allocated), and the ratio sharded / unsharded.  The
compiled HLO text (``.as_text()``) of the sharded programs is scanned for collectives: each
all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute with its result shape.
``no_large_all_gather`` holds when no all-gather's result has more than ``devices x rows`` elements
(O(positions): neither the logits nor the hidden states are gathered).  The sharded losses and
gradients are also computed once at a small size and compared with the unsharded ones.

``torch``: the forward+backward of ``xlsce.cross_entropy`` (label smoothing 0.1) over float32
logits ``rows x classes``: 2 gloo ranks (``torch.distributed``, ``tcp://127.0.0.1:<free port>``,
timeouts on the rendezvous and on the processes), each holding half of the classes and passing
``process_group=dist.group.WORLD``, one torch thread each; against one process holding all the
logits, with 1 and with 2 torch threads, and one process holding all the logits with ``process_group=``
a gloo group of that one process (the sharded code path without communication).  Medians, on the wall
clock and in CPU time (the process's, all its threads: what the machine's other tenants do not change;
for 2 threads it is the sum over both), the two measured in turns after a warm-up (``benchmarks.timing``: the
ranks agree on the loop size, and a run's time is the slower rank's).  The ranks' loss is checked
against the one process's.

``megatron``: Megatron-LM's ``vocab_parallel_cross_entropy`` (``megatron/core/tensor_parallel/
cross_entropy.py``: ``_VocabParallelCrossEntropy.forward`` and ``.backward``) written in NumPy, its
label smoothing with the shard-local vocabulary size, on a fixed-seed probe (float32 logits
``rows x classes``, standard normal, label smoothing 0.1) split into 1, 2 and 8 shards, against
xlsce's exact loss (``smoothing="exclusive"``, the global K).  Per shard count: each rank's mean
loss, the exact one, the largest relative difference, and the gradient Megatron trains with (the
ranks' local gradients side by side, each rank's per-token loss averaged over the tokens) against
xlsce's: the relative L2 difference and the smoothing mass on each non-target class.

``benchmarks.scale`` calls :func:`run` (``quick=True`` for its smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
EPS = 0.1
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return env


def _run_json(cmd, env, timeout, what, tolerate_exit=False):
    """The last line of JSON that ``cmd`` prints.  ``tolerate_exit``: also when the process died after
    printing it (a torch.distributed process group destroyed late, at interpreter shutdown, can abort the
    process); its exit code is then recorded."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    printed = bool(lines) and lines[-1].startswith("{")
    if proc.returncode != 0 and not (tolerate_exit and printed):
        raise RuntimeError(f"benchmarks.scale_vocab {what} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    if tolerate_exit:
        out["exit_code"] = proc.returncode
    return out


# --------------------------------------------------------------------------- JAX: memory per device


def _collectives(hlo_text):
    """The collectives of a compiled HLO module: ``[{"op", "shapes", "elements"}]`` (elements: of the
    largest array in the op's result)."""
    import re

    import numpy as np

    out = []
    for line in hlo_text.splitlines():
        if "=" not in line:
            continue
        lhs_rhs = line.split("=", 1)[1]
        for op in COLLECTIVES:
            m = re.search(rf"\s{op}(-start)?\(", lhs_rhs)
            if m is None:
                continue
            result = lhs_rhs[: m.start()]
            shapes = re.findall(r"[a-z]+[0-9]*\[[\d,]*\]", result)
            dims = [[int(d) for d in s.split("[")[1][:-1].split(",") if d] for s in shapes]
            out.append({"op": op, "shapes": shapes, "elements": max((int(np.prod(d)) for d in dims), default=0)})
            break
    return out


def _stats(compiled):
    m = compiled.memory_analysis()
    parts = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    parts["total_bytes"] = parts["argument_bytes"] + parts["output_bytes"] + parts["temp_bytes"]
    return parts


def memory(rows=4096, classes=65536, hidden=1024, vocab=65536, check_rows=64, check_classes=256, check_hidden=16):
    """In this process (8 JAX devices must already be set up): per-device memory of the compiled
    value_and_grad, sharded over the vocabulary under shard_map and unsharded; the HLO's collectives."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import xlsce

    devices = jax.devices()
    assert len(devices) == DEVICES, f"{len(devices)} JAX devices, not {DEVICES}: set XLA_FLAGS before importing JAX"
    mesh = jax.make_mesh((DEVICES,), ("v",))
    one = jax.sharding.SingleDeviceSharding(devices[0])
    f32, i32 = jnp.float32, jnp.int32

    def ce(z, t):
        return xlsce.cross_entropy(z, t, label_smoothing=EPS)

    def ce_sharded(z, t):
        return jax.shard_map(
            lambda z, t: xlsce.cross_entropy(z, t, label_smoothing=EPS, axis_name="v"),
            mesh=mesh,
            in_specs=(P(None, "v"), P()),
            out_specs=P(),
        )(z, t)

    def lin(h, w, t):
        return xlsce.linear_cross_entropy(h, w, t, label_smoothing=EPS)

    def lin_sharded(h, w, t):
        return jax.shard_map(
            lambda h, w, t: xlsce.linear_cross_entropy(h, w, t, label_smoothing=EPS, axis_name="v"),
            mesh=mesh,
            in_specs=(P(), P("v", None), P()),
            out_specs=P(),
        )(h, w, t)

    def spec(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    cases = {
        "cross_entropy": {
            "shape": {"rows": rows, "classes": classes},
            "logits_bytes": rows * classes * 4,
            "unsharded": (jax.value_and_grad(ce), (spec((rows, classes), f32, one), spec((rows,), i32, one))),
            "sharded": (
                jax.value_and_grad(ce_sharded),
                (
                    spec((rows, classes), f32, NamedSharding(mesh, P(None, "v"))),
                    spec((rows,), i32, NamedSharding(mesh, P())),
                ),
            ),
        },
        "linear_cross_entropy": {
            "shape": {"rows": rows, "hidden": hidden, "vocab": vocab},
            "logits_bytes": rows * vocab * 4,
            "unsharded": (
                jax.value_and_grad(lin, argnums=(0, 1)),
                (spec((rows, hidden), f32, one), spec((vocab, hidden), f32, one), spec((rows,), i32, one)),
            ),
            "sharded": (
                jax.value_and_grad(lin_sharded, argnums=(0, 1)),
                (
                    spec((rows, hidden), f32, NamedSharding(mesh, P())),
                    spec((vocab, hidden), f32, NamedSharding(mesh, P("v", None))),
                    spec((rows,), i32, NamedSharding(mesh, P())),
                ),
            ),
        },
    }
    out = {"devices": DEVICES, "label_smoothing": EPS, "dtype": "float32"}
    for name, case in cases.items():
        rec = {"shape": case["shape"], "logits_bytes": case["logits_bytes"]}
        for kind in ("unsharded", "sharded"):
            fn, args = case[kind]
            compiled = jax.jit(fn).lower(*args).compile()
            rec[kind] = _stats(compiled)
            if kind == "sharded":
                coll = _collectives(compiled.as_text())
                gathers = [c["elements"] for c in coll if c["op"] == "all-gather"]
                rec["collectives"] = coll
                rec["largest_all_gather_elements"] = max(gathers, default=0)
                rec["no_large_all_gather"] = max(gathers, default=0) <= DEVICES * rows
        rec["ratio_per_device"] = rec["sharded"]["total_bytes"] / rec["unsharded"]["total_bytes"]
        rec["ratio_temp"] = rec["sharded"]["temp_bytes"] / max(1, rec["unsharded"]["temp_bytes"])
        out[name] = rec

    # the sharded programs compute the unsharded ones' values (small sizes; float32)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((check_rows, check_classes), dtype=np.float32) * 3
    t = rng.integers(0, check_classes, check_rows).astype(np.int32)
    h = rng.standard_normal((check_rows, check_hidden), dtype=np.float32)
    w = rng.standard_normal((check_classes, check_hidden), dtype=np.float32) / 4
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    got = jax.jit(jax.value_and_grad(ce_sharded))(put(z, P(None, "v")), put(t, P()))
    want = jax.jit(jax.value_and_grad(ce))(jnp.asarray(z), jnp.asarray(t))
    got_l = jax.jit(jax.value_and_grad(lin_sharded, argnums=(0, 1)))(put(h, P()), put(w, P("v", None)), put(t, P()))
    want_l = jax.jit(jax.value_and_grad(lin, argnums=(0, 1)))(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t))

    def rel(a, b):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    out["check"] = {
        "shape": [check_rows, check_classes, check_hidden],
        "cross_entropy_loss": rel(got[0], want[0]),
        "cross_entropy_grad": rel(got[1], want[1]),
        "linear_loss": rel(got_l[0], want_l[0]),
        "linear_dhidden": rel(got_l[1][0], want_l[1][0]),
        "linear_dclassifier": rel(got_l[1][1], want_l[1][1]),
    }
    out["check"]["ok"] = all(v <= 1e-5 for k, v in out["check"].items() if k != "shape")
    return out


def memory_in_subprocess(timeout=900, **sizes):
    """:func:`memory` in a fresh process with ``--xla_force_host_platform_device_count=8``."""
    cmd = [sys.executable, "-m", "benchmarks.scale_vocab", "memory", "--json"]
    for k, v in sizes.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}").strip()
    return _run_json(cmd, _env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), timeout, "memory")


# --------------------------------------------------------------------------- torch.distributed: time


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(rows, classes, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=gen) * 3
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[::10] = -100
    return logits, target


def torch_worker(rank, world, port, rows, classes, runs, min_time, threads):
    """One process of the torch measurement.  ``world == 1``: every class, no process group;
    ``world == -1``: every class, ``process_group=`` a gloo group of this one process (the cost of the
    sharded code path without communication)."""
    import torch

    import xlsce

    from .timing import _loop_size, _record, _run

    torch.set_num_threads(threads)
    logits, target = _problem(rows, classes)
    group = None
    if world != 1:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=max(world, 1),
            timeout=datetime.timedelta(seconds=120),
        )
        group = dist.group.WORLD
        size = classes // max(world, 1)
        logits = logits[:, rank * size : (rank + 1) * size].contiguous()
    x = logits.requires_grad_(True)

    def step():
        x.grad = None
        loss = xlsce.cross_entropy(x, target, label_smoothing=EPS, process_group=group)
        loss.backward()
        return loss

    def sync(loss):
        return loss

    loss = float(step())  # warm-up
    _, inner = _loop_size(step, sync, min_time)
    if group is not None:  # the ranks must run the same number of calls
        n = torch.tensor([inner])
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX, group=group)
        inner = int(n)
    times = {"wall": [], "cpu": []}
    for _ in range(runs):  # in turns: a run on the wall clock, a run in CPU time
        for name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
            if group is not None:
                torch.distributed.barrier(group=group)
            t = _run(step, sync, inner, clock)
            if group is not None:  # a run lasts as long as its slower rank
                tt = torch.tensor([t], dtype=torch.float64)
                torch.distributed.all_reduce(tt, op=torch.distributed.ReduceOp.MAX, group=group)
                t = float(tt)
            times[name].append(t)
    if group is not None:
        torch.distributed.destroy_process_group()
    out = {"rank": rank, "world": world, "threads": threads, "loss": loss, **_record(times["wall"], inner)}
    out["cpu"] = _record(times["cpu"], inner)
    return out


def torch_timing(rows=4096, classes=32768, runs=7, min_time=0.5, timeout=600):
    """2 gloo ranks (half of the classes each, 1 thread each) against one process (1 and 2 threads)."""
    base = [sys.executable, "-m", "benchmarks.scale_vocab", "torch-worker", "--json"]
    base += ["--rows", str(rows), "--classes", str(classes), "--runs", str(runs), "--min-time", str(min_time)]
    env = _env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    out = {"rows": rows, "classes": classes, "label_smoothing": EPS, "dtype": "float32", "runs": runs}
    for threads in (1, 2):
        cmd = [*base, "--world", "1", "--rank", "0", "--threads", str(threads)]
        out[f"one_process_{threads}_threads"] = _run_json(cmd, env, timeout, "torch-worker")
    cmd = [*base, "--world", "-1", "--rank", "0", "--port", str(_free_port()), "--threads", "1"]
    out["group_of_one"] = _run_json(cmd, env, timeout, "torch-worker", tolerate_exit=True)
    port = _free_port()
    procs = []
    for rank in range(2):
        cmd = [*base, "--world", "2", "--rank", str(rank), "--port", str(port), "--threads", "1"]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    ranks = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            lines = stdout.strip().splitlines()
            # a rank that printed its result and then died at exit (a process group destroyed late, at
            # interpreter shutdown, can abort the process) still measured; its exit code is recorded
            if not lines or not lines[-1].startswith("{"):
                raise RuntimeError(f"benchmarks.scale_vocab torch-worker (2 ranks) failed:\n{stderr[-3000:]}")
            ranks.append({**json.loads(lines[-1]), "exit_code": p.returncode})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out["two_ranks"] = ranks[0]
    out["rank_exit_codes"] = [r["exit_code"] for r in ranks]
    one = out["one_process_1_threads"]["loss"]
    out["loss_rel_diff"] = max(abs(r["loss"] - one) / abs(one) for r in ranks)
    two = out["two_ranks"]["median_s"]
    out["ratio_vs_1_thread"] = two / out["one_process_1_threads"]["median_s"]
    out["ratio_vs_2_threads"] = two / out["one_process_2_threads"]["median_s"]
    out["group_of_one_vs_1_thread"] = out["group_of_one"]["median_s"] / out["one_process_1_threads"]["median_s"]
    one_cpu = out["one_process_1_threads"]["cpu"]["median_s"]
    out["cpu_ratio_vs_1_thread"] = out["two_ranks"]["cpu"]["median_s"] / one_cpu
    out["cpu_group_of_one_vs_1_thread"] = out["group_of_one"]["cpu"]["median_s"] / one_cpu
    return out


# --------------------------------------------------------------------------- Megatron's smoothing


def megatron_vocab_parallel(logits, target, label_smoothing, tp):
    """Megatron-LM's ``_VocabParallelCrossEntropy`` (megatron/core/tensor_parallel/cross_entropy.py) in
    NumPy, the vocabulary split into ``tp`` shards: each rank's per-token loss, and the gradient with
    respect to the full logits that the ranks' local backward passes give together (``grad_output``
    the mean over the tokens, as a loss averaged over the tokens sends).  Step by step as there."""
    import numpy as np

    shards = np.split(logits.astype(np.float32), tp, axis=-1)  # vocab_parallel_logits.float()
    n = logits.shape[0]
    arange = np.arange(n)
    # calculate_logits_max, then all_reduce(MAX)
    logits_max = np.max([s.max(axis=-1) for s in shards], axis=0)
    local = []
    for rank, s in enumerate(shards):
        k = s.shape[-1]  # partition_vocab_size
        start, end = rank * k, (rank + 1) * k  # vocab_range_from_per_partition_vocab_size
        s = s - logits_max[:, None]
        target_mask = (target < start) | (target >= end)
        masked_target = target - start
        masked_target[target_mask] = 0
        predicted = s[arange, masked_target].copy()
        predicted[target_mask] = 0.0
        exp_logits = np.exp(s)
        local.append((k, target_mask, masked_target, predicted, exp_logits, exp_logits.sum(axis=-1)))
    # all_reduce(SUM) of predicted_logits and of sum_exp_logits
    predicted = np.sum([p for *_, p, _, _ in local], axis=0)
    sum_exp = np.sum([se for *_, se in local], axis=0)
    losses, grads = [], []
    grad_output = np.full(n, 1.0 / n, dtype=np.float32)
    for _k, target_mask, masked_target, _, exp_logits, _ in local:
        loss = np.log(sum_exp) - predicted  # calculate_cross_entropy_loss
        softmax = exp_logits / sum_exp[:, None]
        vocab_size = softmax.shape[-1]  # the shard's: exp_logits.size(-1)
        grad = softmax.copy()
        softmax_update = 1.0 - target_mask.astype(np.float32)
        if label_smoothing > 0:
            assert 1.0 > label_smoothing > 0.0
            smoothing = label_smoothing * vocab_size / (vocab_size - 1)
            mean_log_probs = np.log(softmax).mean(axis=-1)
            loss = (1.0 - smoothing) * loss - smoothing * mean_log_probs
            grad[arange, masked_target] -= (1.0 - smoothing) * softmax_update  # backward
            grad -= smoothing * (1 / vocab_size)
        else:
            grad[arange, masked_target] -= softmax_update
        grad *= grad_output[:, None]
        losses.append(loss)
        grads.append(grad)
    return losses, np.concatenate(grads, axis=-1)


def megatron(rows=512, classes=32000, shards=(1, 2, 8), seed=0, label_smoothing=EPS):
    """Megatron's shard-local smoothing against xlsce's exact loss on a fixed-seed probe."""
    import numpy as np

    import xlsce

    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, classes), dtype=np.float32)
    target = rng.integers(0, classes, rows)
    kw = {"label_smoothing": label_smoothing, "smoothing": "exclusive"}
    exact_tokens = np.asarray(xlsce.cross_entropy(logits, target, reduction="none", **kw), dtype=np.float64)
    exact, exact_grad = xlsce.value_and_grad(logits, target, **kw)
    exact, exact_grad = float(exact), np.asarray(exact_grad, dtype=np.float64)
    z64 = logits.astype(np.float64)
    softmax = np.exp(z64 - np.log(np.exp(z64).sum(-1, keepdims=True)))
    onehot = np.zeros((rows, classes), dtype=bool)
    onehot[np.arange(rows), target] = True
    out = {
        "rows": rows,
        "classes": classes,
        "label_smoothing": label_smoothing,
        "seed": seed,
        "exact_loss": exact,
        "exact_mass_per_other_class": label_smoothing / (classes - 1),
        "shards": {},
    }
    for tp in shards:
        per_rank, grad = megatron_vocab_parallel(logits, target, label_smoothing, tp)
        means = [float(np.mean(r, dtype=np.float64)) for r in per_rank]
        token_diff = max(float(np.max(np.abs(r - exact_tokens) / np.abs(exact_tokens))) for r in per_rank)
        grad = grad.astype(np.float64)
        # the smoothing mass Megatron's gradient puts on a non-target class: softmax - grad, per token
        mass = softmax / rows - grad
        mass_other = float(np.mean(mass[~onehot]) * rows)
        out["shards"][str(tp)] = {
            "local_vocab": classes // tp,
            "rank_mean_losses": means,
            "max_rel_diff_mean_loss": max(abs(m - exact) / abs(exact) for m in means),
            "max_rel_diff_token_loss": token_diff,
            "rank_spread": (max(means) - min(means)) / abs(exact),
            "grad_rel_l2_diff": float(np.linalg.norm(grad - exact_grad) / np.linalg.norm(exact_grad)),
            "mass_per_other_class": mass_other,
            "mass_ratio_vs_exact": mass_other / (label_smoothing / (classes - 1)),
            "target_mass_sum": float(np.mean(mass.sum(-1)) * rows),
        }
    return out


# --------------------------------------------------------------------------- all of it


def run(quick=False):
    """The vocabulary-parallel part of ``python -m benchmarks.scale``."""
    if quick:
        return {
            "memory": memory_in_subprocess(rows=64, classes=512, hidden=16, vocab=512, timeout=300),
            "torch": torch_timing(rows=64, classes=256, runs=3, min_time=0.01, timeout=120),
            "megatron": megatron(rows=64, classes=1024),
        }
    return {"memory": memory_in_subprocess(), "torch": torch_timing(), "megatron": megatron()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_vocab", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("memory", "torch", "megatron", "quick", "torch-worker"))
    p.add_argument("--rows", type=int)
    p.add_argument("--classes", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--runs", type=int)
    p.add_argument("--min-time", type=float)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one line of JSON only")
    a = p.parse_args(argv)
    names = ("rows", "classes", "hidden", "vocab", "runs", "min_time")
    sizes = {k: getattr(a, k) for k in names if getattr(a, k) is not None}
    if a.what == "memory":
        if "jax" not in sys.modules:  # the simulated devices: before JAX is imported
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
        out = memory(**{k: v for k, v in sizes.items() if k in ("rows", "classes", "hidden", "vocab")})
    elif a.what == "torch":
        out = torch_timing(**{k: v for k, v in sizes.items() if k in ("rows", "classes", "runs", "min_time")})
    elif a.what == "torch-worker":
        out = torch_worker(a.rank, a.world, a.port, a.rows, a.classes, a.runs, a.min_time, a.threads)
    elif a.what == "megatron":
        out = megatron(**{k: v for k, v in sizes.items() if k in ("rows", "classes")})
    else:
        out = run(quick=True)
    print(json.dumps(out) if a.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
