"""Scaling out (issue 15): vocabulary parallelism and Dask, measured; a Markdown report and its JSON.

    python -m benchmarks.scale [--quick] [--out FILE]

Runs :func:`benchmarks.scale_vocab.run` (per-device memory of the vocabulary-sharded losses on 8
simulated JAX devices and the collectives of their compiled programs; 2 gloo ranks against one
process; Megatron's shard-local smoothing against the exact loss) and
:func:`benchmarks.scale_dask.run` (Dask against NumPy in memory; one pass over logits larger than
the machine's memory).  Prints the Markdown report; ``--out FILE`` also writes it to ``FILE`` and
the results to ``FILE`` with the suffix ``.json``.  ``--quick``: tiny sizes, well under a minute
(the smoke test).  The full run takes a few minutes on a 2-core machine, most of it the Dask stream.
See those modules' docstrings for what each number is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from . import scale_dask, scale_vocab
from .report import machine_info


def _mib(b):
    return f"{b / 2**20:,.1f}"


def _ms(s):
    return f"{s * 1e3:,.2f}"


def _load(avg):
    return "/".join(f"{x:.1f}" for x in avg) if avg else "?"


def _error(part):
    return isinstance(part, dict) and "error" in part


def markdown(doc):
    m = doc["machine"]
    lines = [
        "# Scaling out: measured",
        "",
        f"`{doc['command']}` on {m['processor']}, {m['cpus_usable']} usable cores, {m.get('mem_total_gib')} GiB, "
        f"{m['date_utc']} UTC (git {m.get('git_commit')}; numpy {m['numpy']}, jax {m['jax']}, torch {m['torch']}, "
        f"dask {m.get('dask')}); {doc['elapsed_s']:.0f} s; load average (1, 5, 15 min) "
        f"{_load(m.get('loadavg_start'))} at the start, {_load(m.get('loadavg_end'))} at the end.",
        "",
    ]
    vocab, dask_ = doc["vocab"], doc["dask"]

    mem = vocab.get("memory", {})
    lines += ["## JAX: memory per device, vocabulary sharded over 8 devices", ""]
    if _error(mem):
        lines += [f"error: {mem['error']}", ""]
    else:
        lines += [
            "`jax.jit(jax.value_and_grad(loss))` compiled for 8 simulated CPU devices; per device, "
            "`memory_analysis()`'s argument + output + temp bytes (MiB); sharded: `jax.shard_map` with "
            '`axis_name="v"` (logits `P(None, "v")`; classifier `P("v", None)`, hidden replicated); '
            "unsharded: the same loss on one device.  Float32, label smoothing 0.1.",
            "",
            "| loss | shape | unsharded arg / out / temp | sharded arg / out / temp | unsharded total | "
            "sharded total | sharded / unsharded | largest all-gather (elements) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in ("cross_entropy", "linear_cross_entropy"):
            r = mem[name]
            shape = " x ".join(str(v) for v in r["shape"].values())
            label = "N x K" if name == "cross_entropy" else "N x H x V"
            u, s = r["unsharded"], r["sharded"]
            parts = lambda x: " / ".join(_mib(x[k]) for k in ("argument_bytes", "output_bytes", "temp_bytes"))  # noqa: E731
            lines.append(
                f"| `{name}` | {label} = {shape} | {parts(u)} | {parts(s)} | {_mib(u['total_bytes'])} | "
                f"{_mib(s['total_bytes'])} | **{r['ratio_per_device']:.3f}** | {r['largest_all_gather_elements']} |"
            )
        lines += [""]
        for name in ("cross_entropy", "linear_cross_entropy"):
            r = mem[name]
            coll = ", ".join(f"{c['op']} {' '.join(c['shapes'])}" for c in r["collectives"]) or "none"
            ok = "no all-gather" if r["largest_all_gather_elements"] == 0 else "all-gathers"
            verdict = (
                "none larger than O(positions)" if r["no_large_all_gather"] else "**one larger than O(positions)**"
            )
            lines.append(f"- `{name}`, the sharded program's collectives: {coll} ({ok}: {verdict}).")
        c = mem["check"]
        lines += [
            f"- Sharded against unsharded at {' x '.join(map(str, c['shape']))} (N x K x H): largest relative "
            f"difference {max(v for k, v in c.items() if k not in ('shape', 'ok')):.1e} over the losses and "
            f"gradients ({'ok' if c['ok'] else '**MISMATCH**'}).",
            "",
        ]

    tt = vocab.get("torch", {})
    lines += ["## PyTorch: 2 gloo ranks against one process", ""]
    if _error(tt):
        lines += [f"error: {tt['error']}", ""]
    else:
        lines += [
            f"`xlsce.cross_entropy` forward+backward, float32 logits {tt['rows']} x {tt['classes']}, label "
            "smoothing 0.1; median ms per call after a warm-up (`benchmarks.timing`), "
            f"{tt['runs']} runs on the wall clock and {tt['runs']} in CPU time (the process's, all threads: for 2 "
            "threads the sum of both), in turns; for the ranks, each run's time is the slower rank's.",
            "",
            "| setting | median ms | min ms | 2 ranks / this | CPU median ms | 2 ranks / this, CPU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        two, two_cpu = tt["two_ranks"]["median_s"], tt["two_ranks"]["cpu"]["median_s"]
        for key, label in (
            ("one_process_1_threads", "one process, all classes, 1 thread"),
            ("one_process_2_threads", "one process, all classes, 2 threads"),
            ("group_of_one", "one process, all classes, 1 thread, `process_group=` a group of 1 (no communication)"),
            ("two_ranks", "2 gloo ranks, half the classes each, 1 thread each (`process_group=`)"),
        ):
            r = tt[key]
            cpu = r["cpu"]["median_s"]
            lines.append(
                f"| {label} | {_ms(r['median_s'])} | {_ms(r['min_s'])} | {two / r['median_s']:.2f} | {_ms(cpu)} | "
                f"{two_cpu / cpu:.2f} |"
            )
        lines += ["", f"The ranks' loss against the one process's: relative difference {tt['loss_rel_diff']:.1e}."]
        codes = [*tt.get("rank_exit_codes", []), tt["group_of_one"].get("exit_code", 0)]
        if any(codes):
            lines.append(
                f"Exit codes of the 2 ranks and of the group of one: {codes} (after printing their results: "
                "a process group destroyed at interpreter shutdown)."
            )
        lines += [""]

    mg = vocab.get("megatron", {})
    lines += ["## Megatron-LM's shard-local smoothing against the exact loss", ""]
    if _error(mg):
        lines += [f"error: {mg['error']}", ""]
    else:
        lines += [
            f"Fixed-seed probe (seed {mg['seed']}): float32 standard-normal logits {mg['rows']} x {mg['classes']}, "
            f"label smoothing {mg['label_smoothing']}; Megatron-LM's `vocab_parallel_cross_entropy` in NumPy "
            f"(`benchmarks.scale_vocab.megatron_vocab_parallel`) against xlsce's exact loss "
            f'(`smoothing="exclusive"`, global K), mean loss {mg["exact_loss"]:.6f}.  Smoothing mass per non-target '
            "class: what the gradient Megatron trains with (the ranks' local gradients side by side) puts there, "
            f"exact {mg['exact_mass_per_other_class']:.3e}.",
            "",
            "| shards | local vocab | ranks' mean loss (min .. max) | max rel. diff, mean loss | "
            "max rel. diff, per token | gradient rel. L2 diff | smoothing mass per non-target class | "
            "x exact | target mass summed |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for tp, r in mg["shards"].items():
            lo, hi = min(r["rank_mean_losses"]), max(r["rank_mean_losses"])
            lines.append(
                f"| {tp} | {r['local_vocab']} | {lo:.6f} .. {hi:.6f} | {r['max_rel_diff_mean_loss']:.1e} | "
                f"{r['max_rel_diff_token_loss']:.1e} | {r['grad_rel_l2_diff']:.1e} | {r['mass_per_other_class']:.3e} | "
                f"{r['mass_ratio_vs_exact']:.2f} | {r['target_mass_sum']:.4f} |"
            )
        lines += [""]

    sp = dask_.get("speed", {})
    lines += ["## Dask against NumPy, in memory", ""]
    if _error(sp):
        lines += [f"error: {sp['error']}", ""]
    else:
        lines += [
            f"Float32 logits {sp['rows']} x {sp['classes']}, chunks of {sp['chunk_rows']} rows, label smoothing "
            f"0.1; median ms per call ({sp['clock']} time), timed in turns.",
            "",
            "| call | NumPy | Dask, threads | Dask, sync | threads / NumPy | sync / NumPy |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for call in ("loss", "value_and_grad"):
            r = sp[call]
            med = r["median_s"]
            lines.append(
                f"| {call} | {_ms(med['numpy'])} | {_ms(med['dask-threads'])} | {_ms(med['dask-sync'])} | "
                f"{r['ratio_threads']:.2f} | {r['ratio_sync']:.2f} |"
            )
        lines += [""]

    st = dask_.get("stream", {})
    lines += ["## Dask: one pass over logits larger than memory", ""]
    if _error(st):
        lines += [f"error: {st['error']}", ""]
    else:
        lines += [
            "| logits (float32) | machine memory | chunks | wall s | GB/s | RSS before | peak RSS | loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| {st['rows']} x {st['classes']} = {st['logits_gib']:.1f} GiB | {st['machine_memory_gib']:.1f} GiB | "
            f"{st['chunk_rows']} rows | {st['wall_s']:.1f} | {st['gb_per_s']:.2f} | {st['rss_before_gib']:.2f} GiB | "
            f"{st['peak_rss_gib']:.2f} GiB | {st['loss']:.6f} |",
            "",
        ]
    return "\n".join(lines)


def _part(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (a failing part must not lose the others)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:3000]}


def build(quick=False, argv=()):
    t0 = time.perf_counter()
    machine = machine_info()
    try:
        import dask

        machine["dask"] = dask.__version__
    except ImportError:
        machine["dask"] = None
    machine["loadavg_start"] = os.getloadavg()  # the machine is shared: how busy it was
    vocab = _part(lambda: scale_vocab.run(quick=quick))
    dask_ = _part(lambda: scale_dask.run(quick=quick))
    machine["loadavg_end"] = os.getloadavg()
    return {
        "command": " ".join(["python -m benchmarks.scale", *argv]),
        "quick": quick,
        "machine": machine,
        "elapsed_s": time.perf_counter() - t0,
        "vocab": vocab if not _error(vocab) else {"memory": vocab, "torch": vocab, "megatron": vocab},
        "dask": dask_ if not _error(dask_) else {"speed": dask_, "stream": dask_},
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    p.add_argument("--out", help="write the Markdown report to OUT and the results to OUT with the suffix .json")
    a = p.parse_args(argv)
    doc = build(quick=a.quick, argv=argv)
    md = markdown(doc)
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(md + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    errors = [k for part in (doc["vocab"], doc["dask"]) for k, v in part.items() if _error(v)]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
