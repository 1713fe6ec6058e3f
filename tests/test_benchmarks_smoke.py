"""Smoke test of the benchmark instrument (``python -m benchmarks --quick``) on tiny shapes.

It checks that the outputs exist and are well-formed, and that every
implementation computed the same loss and gradient as xlsce; no timing is
asserted (performance claims come from the benchmark runs themselves).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = [b for b in ("numpy", "jax", "torch") if importlib.util.find_spec(b) is not None]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import matplotlib  # noqa: F401  (a test dependency: the chart is part of the output)

    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--min-time", "0.002"]
    cmd += ["--shape", "64x10", "--shape", "200x300", "--variant", "masked", "--memory-min-size", "50000"]
    # xlsce and one anchor per backend keep the test short
    for impl in ("xlsce", "handwritten", "optax-int", "F.cross_entropy"):
        cmd += ["--impl", impl]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_outputs_exist(run):
    out, proc = run
    for name in ("results.json", "results.md", "ratios.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "ratios.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "[1/" in proc.stderr  # progress is shown


def test_json_is_well_formed(run):
    out, _ = run
    doc = json.loads((out / "results.json").read_text())
    for key in ("cpu_count", "date_utc", "numpy"):
        assert doc["machine"][key]
    impls = {(r["backend"], r["impl"]) for r in doc["results"]}
    for backend in BACKENDS:
        assert (backend, "xlsce") in impls
        assert any(b == backend and i != "xlsce" for b, i in impls), f"no anchor on {backend}"
    assert {tuple(r["shape"]) for r in doc["results"]} == {(64, 10), (200, 300)}
    for r in doc["results"]:
        assert "error" not in r, r
        for phase in ("fwd", "fwdbwd"):
            m = r[phase]
            assert len(m["runs_s"]) >= 5 and all(t > 0 for t in m["runs_s"])
            assert min(m["runs_s"]) <= m["median_s"] <= max(m["runs_s"])
        # every implementation computes xlsce's loss and gradient
        assert r["check"]["ok"], r
        assert math.isfinite(r["loss"]) and r["grad_l1"] > 0
        if r["shape"] == [200, 300]:
            mem = r["memory"]
            assert "error" not in mem, mem
            assert mem["logits_bytes"] == 200 * 300 * 4
            assert mem["peak_net_bytes"] >= 0 and mem["multiple"] == mem["peak_net_bytes"] / mem["logits_bytes"]
        else:
            assert "memory" not in r
    # one ratio row per xlsce implementation and case, against the fastest anchor
    assert len(doc["ratios"]) == sum(r["role"] == "xlsce" for r in doc["results"])
    for row in doc["ratios"]:
        assert row["fwd"] > 0 and row["fwdbwd"] > 0 and row["fwdbwd_anchor"] != "xlsce"
    assert doc["targets"], "the issue's targets are evaluated on the cases run"


def test_markdown_tables(run):
    out, _ = run
    md = (out / "results.md").read_text()
    assert "## Ratios" in md and "## Absolute results" in md and "ratios.png" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| 200x300 float32 masked |")]
    assert len(rows) >= 2 * len(BACKENDS)  # at least xlsce and one anchor per backend
    assert "MISMATCH" not in md and "| error:" not in md


@pytest.mark.skipif("jax" not in BACKENDS, reason="jax not installed")
def test_jax_kernel_profile():
    # python -m benchmarks.profile --backend jax: XLA's trace, one line per compiled kernel of each
    # implementation, with its time per call and the threads it is split across
    cmd = [sys.executable, "-m", "benchmarks.profile", "--backend", "jax", "--shape", "64x10", "--calls", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = proc.stdout.split("=== jax:")[1:]
    assert [s.split()[0] for s in sections] == ["xlsce", "optax-int"]
    for section in sections:
        rows = [ln.split() for ln in section.splitlines() if ln and ln.split()[-1].isdigit()]
        assert rows, section  # kernels with a thread count
        assert all(float(r[-2]) >= 0 for r in rows)


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch not installed")
def test_torch_floor_profile():
    # python -m benchmarks.profile --backend torch --floor: each implementation's time per call against
    # its ATen operations, recorded over one forward+backward (the backward's too) and replayed bare
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.profile",
        "--backend",
        "torch",
        "--floor",
        "--shape",
        "16x4",
        "--runs",
        "2",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("implementation"))
    table = {ln[:20].strip(): ln[20:].split() for ln in lines[header + 1 : header + 4]}
    assert list(table) == ["xlsce", "F.cross_entropy", "(empty Function)"], proc.stdout
    assert all(int(row[1]) > 0 and float(row[2]) > 0 and float(row[4]) > 0 for row in table.values()), proc.stdout
    listing = proc.stdout.split("F.cross_entropy's ATen operations per call:")[1]
    assert "aten._log_softmax_backward_data" in listing  # the backward's operations are recorded
    assert "aten.exp_" in proc.stdout.split("xlsce's ATen operations per call:")[1].split("\n\n")[0]


def test_ab_runs_both_copies_in_one_process():
    # python -m benchmarks.ab REV: xlsce at a git revision (imported under another name) against the
    # working tree's and the native anchor, in turns; at HEAD both copies are the same code
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")  # pragma: no cover
    cmd = [sys.executable, "-m", "benchmarks.ab", "HEAD", "--shape", "16x4", "--rounds", "2", "--min-time", "0.001"]
    for backend in BACKENDS:
        cmd += ["--backend", backend]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "B/A" in line]
    assert len(lines) == 2 * len(BACKENDS), proc.stdout
    assert "git revision HEAD" in proc.stdout
