"""Dask arrays (issue 15 item 7): lazy (nothing computed during the call), equal to NumPy, one pass over
each chunk, bounded memory, and xlsce's ValueError at compute time for a class index out of range."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import xlsce

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-12, "atol": 1e-12}


class Counting:
    """A scheduler that counts the computations it is asked for (and runs them synchronously)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, dsk, keys, **kw):
        self.calls += 1
        return dask.get(dsk, keys, **kw)


def _generated(values, chunks):
    """``values`` as a Dask array whose chunks are made by a counted function (``counts[0]``: chunks made)."""
    counts = [0]

    def make(block_info=None):
        counts[0] += 1
        loc = block_info[None]["array-location"]
        return values[tuple(slice(a, b) for a, b in loc)]

    chunks = da.core.normalize_chunks(chunks, values.shape)
    return da.map_blocks(make, chunks=chunks, dtype=values.dtype, meta=np.empty((0,) * values.ndim)), counts


def problem(shape=(50, 7), axis=-1, soft=False, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape) * 3
    ax = axis % len(shape)
    k = shape[ax]
    positions = shape[:ax] + shape[ax + 1 :]
    if soft:
        p = rng.uniform(size=shape)
        target = p / p.sum(axis=ax, keepdims=True)
    else:
        target = rng.integers(0, k, size=positions)
        target.flat[::6] = -100
    return logits, target, rng.uniform(0.5, 2.0, size=k), rng.uniform(size=positions) < 0.8


OPTIONS = {
    "plain": {},
    "weight-where-smoothing": {"weight": True, "where": True, "label_smoothing": 0.1},
    "exclusive-zloss-softcap": {"smoothing": "exclusive", "label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0},
}


def _split(opts, weight, where, wrap=None):
    kw = {k: v for k, v in opts.items() if k not in ("weight", "where")}
    if opts.get("weight"):
        kw["weight"] = weight if wrap is None else da.from_array(weight)
    if opts.get("where"):
        kw["where"] = where if wrap is None else da.from_array(where, chunks=wrap)
    return kw


LAYOUTS = [
    pytest.param((50, 7), -1, (16, 7), id="rows"),
    pytest.param((50, 7), -1, (16, 3), id="class-axis-chunked"),
    pytest.param((6, 7, 9), 1, (4, 7, 5), id="3d-axis1"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize(("shape", "axis", "chunks"), LAYOUTS)
def test_equal_to_numpy_and_lazy(reduction, name, shape, axis, chunks):
    logits, target, weight, where = problem(shape, axis)
    ax = axis % len(shape)
    pos_chunks = chunks[:ax] + chunks[ax + 1 :]
    counter = Counting()
    with dask.config.set(scheduler=counter):
        z, zc = _generated(logits, chunks)
        t = da.from_array(target, chunks=pos_chunks)
        kw = _split(OPTIONS[name], weight, where, pos_chunks)
        nkw = _split(OPTIONS[name], weight, where)
        common = {"reduction": reduction, "axis": axis}
        loss = xlsce.cross_entropy(z, t, **common, **kw)
        loss_lse = xlsce.cross_entropy(z, t, return_lse=True, **common, **kw)
        cot = None
        if reduction == "none":
            cot = np.random.default_rng(1).normal(size=target.shape)
        dcot = None if cot is None else da.from_array(cot, chunks=pos_chunks)
        vg = xlsce.value_and_grad(z, t, cotangent=dcot, **common, **kw)
        assert counter.calls == 0 and zc[0] == 0  # nothing computed during the calls
        assert isinstance(loss, da.Array) and isinstance(vg[1], da.Array)
        want = xlsce.cross_entropy(logits, target, **common, **nkw)
        want_lse = xlsce.cross_entropy(logits, target, return_lse=True, **common, **nkw)[1]
        want_vg = xlsce.value_and_grad(logits, target, cotangent=cot, **common, **nkw)
        np.testing.assert_allclose(loss.compute(), want, **TOL)
        np.testing.assert_allclose(loss_lse[0].compute(), want, **TOL)
        np.testing.assert_allclose(loss_lse[1].compute(), want_lse, **TOL)
        zc[0] = 0
        got_loss, got_grad = dask.compute(*vg)
        assert zc[0] == z.npartitions  # the loss and its gradient in one pass: each chunk made once
        np.testing.assert_allclose(got_loss, want_vg[0], **TOL)
        np.testing.assert_allclose(got_grad, want_vg[1], **TOL)
        assert got_grad.shape == logits.shape and got_grad.dtype == logits.dtype


def test_against_the_formula_and_probability_targets():
    """An independent reference (log-softmax by hand) and soft targets, in float32 too."""
    logits, target, _, _ = problem((40, 6))
    z, t = da.from_array(logits, chunks=(9, 6)), da.from_array(target, chunks=9)
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    m = target != -100
    want = -(lp[np.arange(40), np.where(m, target, 0)] * m).sum() / m.sum()
    np.testing.assert_allclose(xlsce.cross_entropy(z, t).compute(), want, rtol=1e-12)
    soft, probs, _, where = problem((40, 6), soft=True)
    sz, sp, sw = da.from_array(soft, chunks=(9, 6)), da.from_array(probs, chunks=(9, 3)), da.from_array(where, chunks=9)
    for red in ("mean", "sum", "none"):
        kw = {"reduction": red, "label_smoothing": 0.1}
        np.testing.assert_allclose(
            xlsce.cross_entropy(sz, sp, where=sw, **kw).compute(),
            xlsce.cross_entropy(soft, probs, where=where, **kw),
            **TOL,
        )
        got = dask.compute(*xlsce.value_and_grad(sz, sp, **kw))
        for g, w in zip(got, xlsce.value_and_grad(soft, probs, **kw), strict=True):
            np.testing.assert_allclose(g, w, **TOL)
    z32 = da.from_array(logits.astype(np.float32), chunks=(9, 6))
    out = xlsce.cross_entropy(z32, t)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.compute(), want, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_equal_to_numpy_and_lazy(reduction):
    rng = np.random.default_rng(3)
    hidden, classifier, bias = rng.normal(size=(6, 9, 4)), rng.normal(size=(7, 4)), rng.normal(size=7)
    _, target, weight, where = problem((6, 7, 9), axis=1)
    nkw = {
        "bias": bias,
        "weight": weight,
        "where": where,
        "label_smoothing": 0.1,
        "reduction": reduction,
        "chunk_size": 5,
    }
    counter = Counting()
    with dask.config.set(scheduler=counter):
        h, hc = _generated(hidden, (4, 5, 4))
        W = da.from_array(classifier, chunks=(3, 4))
        kw = dict(
            nkw, bias=da.from_array(bias), weight=da.from_array(weight), where=da.from_array(where, chunks=(4, 5))
        )
        t = da.from_array(target, chunks=(4, 5))
        loss = xlsce.linear_cross_entropy(h, W, t, **kw)
        loss_lse = xlsce.linear_cross_entropy(h, W, t, return_lse=True, **kw)
        vg = xlsce.linear_value_and_grad(h, W, t, **kw)
        assert counter.calls == 0 and hc[0] == 0
        np.testing.assert_allclose(loss.compute(), xlsce.linear_cross_entropy(hidden, classifier, target, **nkw), **TOL)
        want_lse = xlsce.linear_cross_entropy(hidden, classifier, target, return_lse=True, **nkw)
        for g, w in zip(dask.compute(*loss_lse), want_lse, strict=True):
            np.testing.assert_allclose(g, w, **TOL)
        want_loss, want_grads = xlsce.linear_value_and_grad(hidden, classifier, target, **nkw)
        hc[0] = 0
        got_loss, got_grads = dask.compute(vg[0], vg[1])
        assert hc[0] == 4  # each chunk of hidden made once for the loss and the three gradients
        np.testing.assert_allclose(got_loss, want_loss, **TOL)
        for g, w in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, **TOL)


def test_denominator_from_dask_parts():
    logits, target, weight, _ = problem((50, 7))
    w = da.from_array(weight)
    parts = [slice(0, 13), slice(13, 50)]
    shards = [(da.from_array(logits[p], chunks=(8, 7)), da.from_array(target[p], chunks=8)) for p in parts]
    d = xlsce.mean_denominator(shards[0][1], weight=w) + xlsce.mean_denominator(shards[1][1], weight=w)
    assert isinstance(d, da.Array) and d.ndim == 0
    losses = [xlsce.cross_entropy(z, t, weight=w, denominator=d) for z, t in shards]
    grads = [xlsce.value_and_grad(z, t, weight=w, denominator=d)[1] for z, t in shards]
    want_loss, want_grad = xlsce.value_and_grad(logits, target, weight=weight)
    total, *got = dask.compute(sum(losses), *grads)
    np.testing.assert_allclose(total, want_loss, **TOL)
    np.testing.assert_allclose(np.concatenate(got), want_grad, **TOL)


def test_class_out_of_range_raises_at_compute():
    logits, target, weight, _ = problem((50, 7))
    target[31] = 7
    z, t, w = da.from_array(logits, chunks=(16, 7)), da.from_array(target, chunks=16), da.from_array(weight)
    hidden, classifier = np.ones((50, 3)), np.ones((7, 3))
    lazy = [  # nothing raised while building the graphs
        xlsce.cross_entropy(z, t),
        xlsce.cross_entropy(z, t, reduction="none", weight=w),
        xlsce.value_and_grad(z, t)[1],
        xlsce.linear_cross_entropy(da.from_array(hidden, chunks=(16, 3)), da.from_array(classifier), t),
        xlsce.linear_value_and_grad(da.from_array(hidden, chunks=(16, 3)), da.from_array(classifier), t)[1][1],
        xlsce.mean_denominator(t, weight=w),
    ]
    for x in lazy:
        with pytest.raises(ValueError, match=r"target holds class indices outside \[0, 7\).*Dask"):
            dask.compute(x, scheduler="sync")
    t[31] = -100  # ignored: fine
    assert np.isfinite(xlsce.cross_entropy(z, da.from_array(np.where(target == 7, -100, target), chunks=16)).compute())


def test_numpy_weight_beside_dask_logits_is_taken_into_dask():
    """As for JAX and torch logits (a NumPy target, weight or mask is taken into the logits' library),
    lazily, with NumPy's result; Dask logits beside a NumPy target of another library stay refused."""
    logits, target, weight, _ = problem((50, 7))
    out = xlsce.cross_entropy(da.from_array(logits), da.from_array(target), weight=weight)
    assert isinstance(out, da.Array)
    np.testing.assert_allclose(out.compute(), xlsce.cross_entropy(logits, target, weight=weight), rtol=1e-12)
    with pytest.raises(TypeError, match="one array library"):
        xlsce.cross_entropy(logits, da.from_array(target))


def test_bounded_memory_and_benchmark_smoke():
    """A stream of 256 MiB of float32 logits in 2 MiB chunks stays far below the logits' size (RSS of a
    fresh process), through ``benchmarks.scale_dask`` (its CI-sized run)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.scale_dask", "stream", "--json"]
    cmd += ["--rows", "65536", "--classes", "1024", "--chunk-rows", "512"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["logits_bytes"] == 2**28 and np.isfinite(out["loss"])
    assert (out["peak_rss_gib"] - out["rss_before_gib"]) * 2**30 < 0.25 * out["logits_bytes"]
