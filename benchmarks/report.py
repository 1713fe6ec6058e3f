"""Ratios, targets, machine info, and the JSON / Markdown / PNG outputs."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess

from .cases import label as _case_text

# The targets: (backend, xlsce impl, anchor impls (best of), shapes or None for all, limit)
TIME_TARGETS = (
    ("torch", "xlsce", ("F.cross_entropy",), ((65536, 1000), (4096, 32768)), 0.8),
    ("torch", "xlsce", ("F.cross_entropy",), ((256, 10),), 1.0),
    ("jax", "xlsce", ("optax-smooth", "optax-int"), None, 1.0),
    ("numpy", "xlsce", ("handwritten",), None, 1.0),
)
MEMORY_TARGET = ("torch", "xlsce", (4096, 32768), 2.0)
CHECK_RTOL = {"float32": 1e-3, "bfloat16": 3e-2}


def _ms(s):
    return "—" if s is None else f"{s * 1e3:.3g}" if s < 1 else f"{s * 1e3:.0f}"


def _ok(rec):
    return "error" not in rec


def brief(rec):
    """One line of progress for a record."""
    if not _ok(rec):
        return "ERROR " + rec["error"]
    text = f"fwd {_ms(rec['fwd']['median_s'])} ms, fwd+bwd {_ms(rec['fwdbwd']['median_s'])} ms"
    mem = rec.get("memory")
    if mem:
        text += f", mem {mem['multiple']:.2f}x" if "multiple" in mem else f", mem error {mem.get('error')}"
    return text


def _case_key(rec):
    """The case of a record (or of a ratio row): shape, dtype, variant, hidden size (None)."""
    return (tuple(rec["shape"]), rec["dtype"], rec["variant"], rec.get("hidden"))


def case_label(rec):
    return _label(_case_key(rec))


def _label(key):
    return _case_text(*key)


def _groups(results):
    groups = {}
    for rec in results:
        groups.setdefault((_case_key(rec), rec["backend"]), []).append(rec)
    return groups


def _check(results):
    """Each implementation's loss and |grad|_1 against xlsce's on the same case and backend."""
    for (key, _), recs in _groups(results).items():
        ok = [r for r in recs if _ok(r) and r["role"] != "floor"]  # the floor computes no loss
        ref = min(ok, key=lambda r: (r["impl"] != "xlsce", r["role"] != "xlsce"), default=None)
        for r in ok:
            rel = max(abs(r[f] - ref[f]) / max(abs(ref[f]), 1e-30) for f in ("loss", "grad_l1"))
            r["check"] = {"against": ref["impl"], "max_rel_diff": rel, "ok": rel <= CHECK_RTOL[key[1]]}


def ratios(results):
    """xlsce implementation / best anchor on the same backend and case, for time and memory (and / the
    bandwidth floor where it was measured)."""
    rows = []
    for (key, backend), recs in _groups(results).items():
        anchors = [r for r in recs if r["role"] == "anchor" and _ok(r)]
        floor = next((r for r in recs if r["role"] == "floor" and _ok(r)), None)
        for x in (r for r in recs if r["role"] == "xlsce" and _ok(r)):
            row = {"backend": backend, "xlsce": x["impl"], "shape": list(key[0]), "dtype": key[1], "variant": key[2]}
            if key[3] is not None:
                row["hidden"] = key[3]
            for phase in ("fwd", "fwdbwd"):
                if anchors:
                    best = min(anchors, key=lambda r, p=phase: r[p]["median_s"])
                    row[phase] = x[phase]["median_s"] / best[phase]["median_s"]
                    row[f"{phase}_anchor"] = best["impl"]
                if floor:
                    row[f"{phase}_floor"] = x[phase]["median_s"] / floor[phase]["median_s"]
            mems = [r for r in anchors if "multiple" in r.get("memory", {})]
            if "multiple" in x.get("memory", {}) and mems:
                best = min(mems, key=lambda r: r["memory"]["peak_net_bytes"])
                row["memory"] = x["memory"]["peak_net_bytes"] / max(best["memory"]["peak_net_bytes"], 1)
                row["memory_anchor"] = best["impl"]
            rows.append(row)
    return rows


def targets(results):
    """The issue's targets, for the cases that were run."""
    out = []
    for (key, backend), recs in _groups(results).items():
        by = {r["impl"]: r for r in recs if _ok(r)}
        for tb, ximpl, anchors, shapes, limit in TIME_TARGETS:
            if tb != backend or ximpl not in by or (shapes is not None and key[0] not in shapes):
                continue
            have = [by[a] for a in anchors if a in by]
            if not have:
                continue
            best = min(have, key=lambda r: r["fwdbwd"]["median_s"])
            ratio = by[ximpl]["fwdbwd"]["median_s"] / best["fwdbwd"]["median_s"]
            out.append(
                {
                    "target": f"{backend} {ximpl} fwd+bwd / {best['impl']} <= {limit}",
                    "case": _label(key),
                    "value": ratio,
                    "limit": limit,
                    "met": ratio <= limit,
                }
            )
        mb, ximpl, shape, limit = MEMORY_TARGET
        if backend == mb and key[0] == shape and "multiple" in by.get(ximpl, {}).get("memory", {}):
            mult = by[ximpl]["memory"]["multiple"]
            native = by.get("F.cross_entropy", {}).get("memory", {}).get("multiple")
            out.append(
                {
                    "target": f"{backend} {ximpl} fwd+bwd peak memory net of inputs <= {limit} x logits"
                    + ("" if native is None else f" (F.cross_entropy: {native:.2f} x)"),
                    "case": _label(key),
                    "value": mult,
                    "limit": limit,
                    "met": mult <= limit,
                }
            )
    return out


def machine_info():
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        **{name: version(name) for name in ("numpy", "torch", "jax", "jaxlib", "optax", "array-api-compat")},
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def build(results, args, argv, elapsed, machine, stopped=None, not_measured=()):
    """The document written: ``stopped`` says why a run ended early (None: it did not), ``not_measured``
    lists the measurements it did not make ("backend:impl case")."""
    _check(results)
    return {
        "machine": machine,
        "command": "python -m benchmarks " + " ".join(argv),
        "settings": {
            "quick": args.quick,
            "device": args.device,
            "budget_s": args.budget,
            "runs": args.runs,
            "min_time_s": args.min_time,
            "memory": not args.no_memory,
            "memory_min_size": args.memory_min_size,
            "label_smoothing": 0.1,
            "reduction": "mean",
        },
        "elapsed_s": elapsed,
        "stopped": stopped,
        "not_measured": list(not_measured),
        "results": results,
        "ratios": ratios(results),
        "targets": targets(results),
    }


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def markdown(doc):
    m = doc["machine"]
    cuda = doc["settings"]["device"] == "cuda"
    memory_method = (
        "PyTorch from its CUDA allocator (`torch.cuda.max_memory_allocated`), JAX from XLA's memory analysis."
        if cuda
        else "PyTorch/NumPy measured in a fresh process per case (RSS high-water mark), JAX from XLA's memory analysis."
    )
    lines = [
        "# xlsce benchmarks",
        "",
        f"Generated by `{doc['command']}` on {m.get('date_utc')} UTC in {doc['elapsed_s']:.0f} s "
        f"(repository at {m.get('git_commit')}); xlsce benchmarked: {m.get('xlsce_source')} "
        f"(sources sha256 {m.get('xlsce_sha256')}).",
        "",
        f"Machine: {m.get('platform')}, {m.get('cpu_count')} CPUs ({m.get('cpus_usable')} usable), "
        f"{m.get('mem_total_gib')} GiB; Python {m.get('python')}, NumPy {m.get('numpy')}, "
        f"PyTorch {m.get('torch')} ({m.get('torch_threads')} threads), JAX {m.get('jax')}, optax {m.get('optax')}."
        + "".join(f" {b}: {d.get('device') or d.get('error')}." for b, d in (m.get("devices") or {}).items()),
        "",
        "label_smoothing=0.1, reduction='mean'; *masked* = class weights and 10% ignored positions. "
        "Times: median of "
        f"{doc['settings']['runs']} runs after a warm-up, per call, the implementations of a case timed in turns. Memory: peak net of the inputs during one "
        "forward+backward (so it includes the returned gradient), as a multiple of the logits' size; "
        f"{memory_method} See `benchmarks/__init__.py` for the method.",
        "",
    ]
    if doc.get("stopped"):
        missing = doc["not_measured"]
        lines += [
            f"**Partial results** (stopped: {doc['stopped']}): {len(missing)} measurements not made"
            + "".join(f"{', ' if i else ': '}`{x}`" for i, x in enumerate(missing[:20]))
            + (", ..." if len(missing) > 20 else "")
            + ".",
            "",
        ]
    loads = [m.get("loadavg_1_5_15_start"), m.get("loadavg_1_5_15_end")]
    if all(loads):
        busy = max(loads[0][1], loads[1][0]) > 0.75 * (m.get("cpus_usable") or 1)
        lines += [
            f"Load average (1, 5, 15 min) at the start {loads[0]}, at the end {loads[1]}"
            + (
                ": **the machine was busy with other work during the run, so the times are noisy**; "
                "`results.json` also keeps each run's time and the minimum."
                if busy
                else "."
            ),
            "",
        ]
    if doc["targets"]:
        lines += ["## Targets (issue 3)", "", "| target | case | value | met |", "|---|---|---:|:---:|"]
        for t in doc["targets"]:
            lines.append(f"| {t['target']} | {t['case']} | {t['value']:.2f} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    lines += [
        "## Ratios: xlsce / best anchor on the same backend",
        "",
        "Below 1 means xlsce is faster (or lighter).",
        "",
        "| case | backend | xlsce | fwd | (anchor) | fwd+bwd | (anchor) | memory | (anchor) |",
        "|---|---|---|---:|---|---:|---|---:|---|",
    ]
    for r in doc["ratios"]:
        lines.append(
            f"| {case_label(r)} | {r['backend']} | {r['xlsce']} | "
            f"{_fmt(r.get('fwd'))} | {r.get('fwd_anchor', '—')} | {_fmt(r.get('fwdbwd'))} | "
            f"{r.get('fwdbwd_anchor', '—')} | {_fmt(r.get('memory'))} | {r.get('memory_anchor', '—')} |"
        )
    floors = [r for r in doc["ratios"] if "fwdbwd_floor" in r]
    if floors:
        lines += [
            "",
            "## Against the bandwidth floor",
            "",
            "xlsce's time / the floor's: reading the logits once (fwd) and also writing a gradient once (fwd+bwd).",
            "",
            "| case | backend | xlsce | fwd | fwd+bwd |",
            "|---|---|---|---:|---:|",
        ]
        for r in floors:
            lines.append(
                f"| {case_label(r)} | {r['backend']} | {r['xlsce']} | {_fmt(r.get('fwd_floor'))} | "
                f"{_fmt(r['fwdbwd_floor'])} |"
            )
    synced = {}
    for r in doc["results"]:
        if "host_sync" in r:
            synced.setdefault(f"{r['backend']}:{r['impl']}", []).append(r["host_sync"])
    if synced:
        lines += [
            "",
            "## Host synchronisations (CUDA)",
            "",
            'One forward+backward under `torch.cuda.set_sync_debug_mode("error")`, per case:',
            "",
        ]
        for key, found in synced.items():
            bad = [x for x in found if x]
            text = "none" if not bad else f"in {len(bad)} of {len(found)} cases (`{bad[0]}`)"
            lines.append(f"- `{key}`: {text}")
    lines += [
        "",
        "## Absolute results",
        "",
        "Times in ms per call. Memory: peak MiB net of the inputs, and the multiple of the logits' size. "
        "Check: loss and |grad|_1 against xlsce on the same backend (max relative difference).",
        "",
        "| case | backend | implementation | fwd ms | fwd+bwd ms | memory MiB | x logits | check |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in doc["results"]:
        label = _label(_case_key(r))
        if not _ok(r):
            lines.append(f"| {label} | {r['backend']} | {r['impl']} | error: {r['error'][:80]} | | | | |")
            continue
        mem = r.get("memory") or {}
        mib = mem.get("peak_net_bytes")
        chk = r.get("check", {})
        chk_s = f"{'ok' if chk.get('ok') else '**MISMATCH**'} {chk.get('max_rel_diff', 0):.1e}" if chk else "—"
        lines.append(
            f"| {label} | {r['backend']} | {r['impl']} | {_ms(r['fwd']['median_s'])} | "
            f"{_ms(r['fwdbwd']['median_s'])} | {_fmt(None if mib is None else mib / 2**20, '.1f')} | "
            f"{_fmt(mem.get('multiple'))} | {chk_s} |"
        )
    lines += ["", "Implementations:", ""]
    seen = {}
    for r in doc["results"]:
        seen.setdefault(f"{r['backend']}:{r['impl']}", r["description"])
    lines += [f"- `{k}`: {v}" for k, v in seen.items()]
    lines += ["", "![ratios](ratios.png)", ""]
    return "\n".join(lines)


def chart(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["ratios"]
    cases = list(dict.fromkeys(case_label(r) for r in rows))
    series = list(dict.fromkeys(f"{r['backend']}:{r['xlsce']}" for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(cases) + 4), 5), sharey=True)
    width = 0.8 / max(len(series), 1)
    for ax, phase, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        for j, s in enumerate(series):
            xs, ys = [], []
            for i, c in enumerate(cases):
                for r in rows:
                    if f"{r['backend']}:{r['xlsce']}" == s and case_label(r) == c:
                        if r.get(phase) is not None:
                            xs.append(i + (j - (len(series) - 1) / 2) * width)
                            ys.append(r[phase])
            ax.bar(xs, ys, width, label=s)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{title}: xlsce / best anchor (lower is better)")
    axes[0].set_ylabel("time ratio")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(doc, out, full=True):
    """results.json, and unless ``full`` is false results.md and ratios.png (when matplotlib is there)."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, name) for name in ("results.json", "results.md", "ratios.png")]
    with open(paths[0] + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(paths[0] + ".tmp", paths[0])
    if not full:
        return paths[:1]
    with open(paths[1], "w") as f:
        f.write(markdown(doc))
    try:
        chart(doc, paths[2])
    except ImportError:  # matplotlib: the tables are written anyway
        return paths[:2]
    return paths


def console(doc):
    """The targets and ratio tables, for the terminal."""
    md = markdown(doc)
    return md.split("## Absolute results")[0].rstrip()
