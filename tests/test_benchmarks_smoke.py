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
import signal
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


# --device, --budget, --linear, --impl floor: the options a GPU run uses, on the CPU


def _bench(args, out, **kw):
    cmd = [sys.executable, "-m", "benchmarks", "--out", str(out), "--min-time", "0.001", *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _gpu_present():
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    try:
        import jax

        return bool(jax.devices("gpu"))
    except (ImportError, RuntimeError):
        return False


@pytest.mark.skipif("torch" not in BACKENDS or "jax" not in BACKENDS, reason="needs torch and jax")
def test_staged_run_with_linear_loss_and_floor(tmp_path):
    # with a --budget, each backend's eager cases, then its linear loss, run in processes of their own
    args = ["--backend", "torch", "--backend", "jax", "--shape", "64x10", "--variant", "masked", "--dtype", "float32"]
    args += ["--linear", "32x8x50", "--impl", "xlsce", "--impl", "floor", "--impl", "materialised", "--no-compile"]
    args += ["--budget", "600", "--runs", "2", "--memory-min-size", "1000"]
    proc = _bench(args, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "4 processes" in err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["stopped"] is None and doc["not_measured"] == [] and doc["settings"]["budget_s"] == 600
    impls = {(r["backend"], r["impl"], r.get("hidden")) for r in doc["results"]}
    assert impls == {
        *((b, i, None) for b in ("torch", "jax") for i in ("xlsce", "floor")),
        *(("jax", i, 8) for i in ("xlsce-linear", "xlsce-materialised")),
        *(("torch", i, 8) for i in ("xlsce-linear", "xlsce-materialised", "F.cross_entropy-materialised")),
    }
    for r in doc["results"]:
        assert "error" not in r, r
        if r["impl"] == "floor":
            assert "check" not in r and r["loss"] is None
        else:
            assert r["check"]["ok"], r
        if r.get("hidden"):
            assert r["check"]["against"] == "xlsce-linear" and "multiple" in r["memory"]
    linear = [row for row in doc["ratios"] if row.get("hidden")]
    assert {row["backend"] for row in linear} == {"torch", "jax"} and all(row["fwdbwd"] > 0 for row in linear)
    floors = [row for row in doc["ratios"] if "fwdbwd_floor" in row]
    assert {row["backend"] for row in floors} == {"torch", "jax"}
    md = (tmp_path / "results.md").read_text()
    assert "## Against the bandwidth floor" in md and "| linear 32x8x50 float32 | torch | xlsce-linear |" in md
    assert "Partial results" not in md


def test_budget_spent_writes_partial_results(tmp_path):
    proc = _bench(["--backend", BACKENDS[0], "--shape", "64x10", "--impl", "xlsce", "--budget", "0"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["stopped"] == "budget of 0 s" and doc["results"] == []
    assert doc["not_measured"] == [f"{BACKENDS[0]}:xlsce 64x10 float32 {v}" for v in ("plain", "masked")]
    md = (tmp_path / "results.md").read_text()
    assert "**Partial results** (stopped: budget of 0 s): 2 measurements not made" in md


def test_sigterm_keeps_what_was_measured(tmp_path):
    # as a `timeout` would stop it: the measured case is written, the rest listed as not measured
    args = ["--backend", BACKENDS[0], "--shape", "64x10", "--shape", "2000x3000", "--impl", "xlsce", "--no-memory"]
    proc = _bench(args, tmp_path)
    for line in proc.stderr:
        if line.startswith("[1/"):  # the first record is on its way
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 124, err[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["stopped"] == "SIGTERM"
    assert [r["shape"] for r in doc["results"]][:1] == [[64, 10]]
    assert len(doc["results"]) + len(doc["not_measured"]) == 4 and doc["not_measured"]


@pytest.mark.skipif(_gpu_present(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_fails_clearly(tmp_path):
    proc = _bench(["--device", "cuda"], tmp_path / "out")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "error: --device cuda: no backend can run there" in err
    for backend in BACKENDS:
        if backend != "numpy":
            assert f"{backend}: skipped, cannot run on cuda" in err
    assert not (tmp_path / "out").exists()


def test_scale_quick(tmp_path):
    # python -m benchmarks.scale --quick: vocabulary parallelism (JAX memory per device on 8 simulated
    # devices, 2 gloo ranks, Megatron's smoothing) and Dask, tiny; the Markdown report and its JSON
    out = tmp_path / "scale.md"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--quick", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "scale.json").read_text())
    assert doc["quick"] and doc["machine"]["cpu_count"]
    mem = doc["vocab"]["memory"]
    assert mem["devices"] == 8 and mem["check"]["ok"], mem.get("check", mem)
    for name in ("cross_entropy", "linear_cross_entropy"):
        r = mem[name]
        assert 0 < r["sharded"]["total_bytes"] < r["unsharded"]["total_bytes"]
        assert r["ratio_per_device"] == r["sharded"]["total_bytes"] / r["unsharded"]["total_bytes"]
        assert r["no_large_all_gather"] and any(c["op"] == "all-reduce" for c in r["collectives"])
    torch_ = doc["vocab"]["torch"]
    assert torch_["loss_rel_diff"] < 1e-5
    for key in ("one_process_1_threads", "one_process_2_threads", "group_of_one", "two_ranks"):
        assert len(torch_[key]["runs_s"]) == 3 and torch_[key]["median_s"] > 0
    shards = doc["vocab"]["megatron"]["shards"]
    assert shards["1"]["max_rel_diff_mean_loss"] < 1e-5 and abs(shards["1"]["mass_ratio_vs_exact"] - 1) < 1e-5
    assert shards["8"]["max_rel_diff_token_loss"] > 1e-4 and shards["8"]["mass_ratio_vs_exact"] > 7
    assert math.isfinite(doc["dask"]["stream"]["loss"]) and doc["dask"]["speed"]["loss"]["ratio_threads"] > 0
    md = out.read_text()
    for heading in ("## JAX: memory per device", "## PyTorch: 2 gloo ranks", "## Megatron-LM", "## Dask"):
        assert heading in md, heading
    assert "error:" not in md and "MISMATCH" not in md
