"""Vocabulary parallelism on JAX: ``axis_name=`` inside ``shard_map`` on 8 simulated devices (issue 15 items 2, 6, 8).

Each device holds a contiguous slice of the classes (of the logits, the class weights, a probability
target, the classifier and bias of ``linear_cross_entropy``); the class indices are global.  Against a
float64 reference written from the documented formulas (docs/what-it-computes.md: the smoothing over the
global K' classes in play, both conventions, class weights with PyTorch's denominators, the z-loss's
per-position mean, the soft-cap), eager and under ``jax.jit``: the loss (the same on every device), its
gradient (each device's slice, through ``jax.grad`` of the shard-mapped function and from
``xlsce.value_and_grad`` inside it), the reported lse and token accuracy; a 2-d mesh with the positions
over a "data" axis gets the global mean from ``denominator=``; the compiled programs gather nothing
larger than the positions.

Everything runs in ONE subprocess, since ``--xla_force_host_platform_device_count`` must be set
before JAX is imported; each test reads one entry of its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, re, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

jax.config.update("jax_enable_x64", True)
import xlsce

IGNORE = -100


def reference(z, t, *, label_smoothing=0.0, smoothing="uniform", weight=None, where=None, reduction="mean",
              z_loss=0.0, softcap=None, soft=False):
    # from the formulas of docs/what-it-computes.md, not from xlsce's code
    k = z.shape[-1]
    if softcap is not None:
        z = jnp.where(z == -jnp.inf, -jnp.inf, softcap * jnp.tanh(z / softcap))
    fin = z > -jnp.inf
    kk = jnp.sum(fin, -1, keepdims=True).astype(z.dtype)  # K', the classes in play
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    lp = jnp.where(fin, z - lse, 0.0)
    w = jnp.ones(k, z.dtype) if weight is None else weight
    if soft:
        valid = jnp.ones(z.shape[:-1], bool)
        onehot = t
    else:
        valid = t != IGNORE
        onehot = jax.nn.one_hot(jnp.where(valid, t, 0), k, dtype=z.dtype)
    if where is not None:
        valid = valid & where
    eps = label_smoothing
    if smoothing == "uniform":
        a, b = 1 - eps, eps / kk
    else:
        b = eps / (kk - 1)
        a = 1 - eps - b
    q = a * onehot + b * fin
    ce = -jnp.sum(w * q * lp, -1)
    zl = z_loss * lse[..., 0] ** 2
    if reduction == "none":
        return jnp.where(valid, ce + zl, 0.0)
    if reduction == "sum":
        return jnp.sum(jnp.where(valid, ce + zl, 0.0))
    d = jnp.sum(jnp.where(valid, jnp.sum(onehot * w, -1), 0.0)) if not soft else jnp.sum(valid)
    n = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / d + jnp.sum(jnp.where(valid, zl, 0.0)) / n


def err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    both_inf = np.isinf(got) & np.isinf(want) & (np.sign(got) == np.sign(want))
    diff = np.where(both_inf, 0.0, np.abs(got - want))
    return float(np.max(diff / np.maximum(np.abs(np.where(both_inf, 1.0, want)), 1e-3), initial=0.0))


def largest_gather(compiled):
    big = 0
    for line in compiled.as_text().splitlines():
        if " all-gather(" in line or " all-gather-start(" in line:
            out = line.split("=", 1)[1].split("all-gather", 1)[0]
            for dims in re.findall(r"[a-z0-9]+\[([\d,]*)\]", out):
                big = max(big, int(np.prod([int(d) for d in dims.split(",") if d])))
    return big


MESH = jax.make_mesh((8,), ("v",))
MESH2 = jax.make_mesh((2, 4), ("data", "v"))
N, K = 24, 64


def problem(seed=0, n=N, k=K):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 3
    y = rng.integers(0, k, n)
    y[::5] = IGNORE
    w = rng.uniform(0.5, 2.0, k)
    where = rng.random(n) > 0.2
    soft = rng.dirichlet(np.ones(k), n)
    return z, y, w, where, soft


def put(mesh, x, *spec):
    return jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(*spec)))


def ce_case(options, mode, seed=0, minus_inf=None):
    options = dict(options)
    use_w, use_where, soft = options.pop("weight", False), options.pop("where", False), options.pop("soft", False)
    z, y, w, where, probs = problem(seed)
    if minus_inf == "classes":  # classes out of play, one whole shard of a row
        z[0, 3] = z[1, 10] = -np.inf
        z[2, 8:16] = -np.inf
        y[1], y[2] = 0, 20  # targets in play
    t = probs if soft else y
    lse_out = options.get("return_lse", False)
    reduction = options.get("reduction", "mean")
    kw = {k: v for k, v in options.items()}

    def ref(z):
        out = reference(z, jnp.asarray(t), weight=jnp.asarray(w) if use_w else None,
                        where=jnp.asarray(where) if use_where else None, soft=soft,
                        **{k: v for k, v in kw.items() if k != "return_lse"})
        return out

    want = ref(jnp.asarray(z))
    want_g = jax.grad(lambda z: jnp.sum(ref(z)))(jnp.asarray(z))
    want_lse = jax.nn.logsumexp(jnp.asarray(z) if "softcap" not in kw else
                                kw["softcap"] * jnp.tanh(jnp.asarray(z) / kw["softcap"]), axis=-1)

    zs = put(MESH, z, None, "v")
    ts = put(MESH, t, None, "v") if soft else put(MESH, t)
    ws, ms = put(MESH, w, "v"), put(MESH, where)
    tspec = P(None, "v") if soft else P()
    out_spec = P()

    def f(z, t, w, m):
        return xlsce.cross_entropy(z, t, weight=w if use_w else None, where=m if use_where else None,
                                   axis_name="v", **kw)

    outs = (out_spec, out_spec) if lse_out else out_spec
    g = jax.shard_map(f, mesh=MESH, in_specs=(P(None, "v"), tspec, P("v"), P()), out_specs=outs)
    g = jax.jit(g) if mode == "jit" else g

    def total(z):
        o = g(z, ts, ws, ms)
        return jnp.sum(o[0] if lse_out else o)

    with jax.set_mesh(MESH):
        out = g(zs, ts, ws, ms)
        grad = jax.grad(total)(zs)
        vkw = {k: v for k, v in kw.items() if k != "return_lse"}

        def vg(z, t, w, m):
            return xlsce.value_and_grad(z, t, weight=w if use_w else None, where=m if use_where else None,
                                        axis_name="v", **vkw)

        h = jax.shard_map(vg, mesh=MESH, in_specs=(P(None, "v"), tspec, P("v"), P()),
                          out_specs=(out_spec, P(None, "v")))
        h = jax.jit(h) if mode == "jit" else h
        value2, grad2 = h(zs, ts, ws, ms)
        gather = largest_gather(jax.jit(jax.grad(total)).lower(zs).compile()) if mode == "jit" else 0
    r = {"value": err(out[0] if lse_out else out, want), "grad": err(grad, want_g),
         "vg_value": err(value2, want), "vg_grad": err(grad2, want_g), "gather": gather, "positions": N}
    if lse_out:
        r["lse"] = err(out[1], want_lse)
    return r


def accuracy_case(mode):
    z, y, w, where, _ = problem(3)
    z[:, 40] = z[:, 9] = z.max() + 1.0  # ties between two shards: the first maximum (class 9) wins
    y[::3] = 9
    want = np.mean((np.argmax(z, -1) == y)[y != IGNORE])
    f = jax.shard_map(lambda z, t: xlsce.cross_entropy(z, t, axis_name="v", return_token_accuracy=True)[1],
                      mesh=MESH, in_specs=(P(None, "v"), P()), out_specs=P())
    f = jax.jit(f) if mode == "jit" else f
    with jax.set_mesh(MESH):
        got = f(put(MESH, z, None, "v"), put(MESH, y))
    return {"value": abs(float(got) - float(want)), "want": float(want)}


def out_of_range_case():
    z, y, _, _, _ = problem(4)
    y[1] = K + 3
    f = jax.jit(jax.shard_map(lambda z, t: xlsce.cross_entropy(z, t, axis_name="v", reduction="none"),
                              mesh=MESH, in_specs=(P(None, "v"), P()), out_specs=P()))
    with jax.set_mesh(MESH):
        got = np.asarray(f(put(MESH, z, None, "v"), put(MESH, y)))
    return {"bad_nan": bool(np.isnan(got[1])), "others_finite": bool(np.all(np.isfinite(np.delete(got, 1))))}


def data_parallel_weighted_case(mode):
    z, y, w, where, _ = problem(6)
    kw = dict(label_smoothing=0.1)
    want, want_g = jax.value_and_grad(
        lambda z: reference(z, jnp.asarray(y), weight=jnp.asarray(w), where=jnp.asarray(where), **kw)
    )(jnp.asarray(z))
    wfull = jnp.asarray(w)

    def f(z, t, w, m):
        d = jax.lax.psum(xlsce.mean_denominator(t, weight=wfull, where=m), "data")  # sum m_i w[y_i]
        return jax.lax.psum(xlsce.cross_entropy(z, t, weight=w, where=m, denominator=d, axis_name="v", **kw), "data")

    g = jax.shard_map(f, mesh=MESH2, in_specs=(P("data", "v"), P("data"), P("v"), P("data")), out_specs=P())
    g = jax.jit(g) if mode == "jit" else g
    zs = put(MESH2, z, "data", "v")
    ys, ws, ms = put(MESH2, y, "data"), put(MESH2, w, "v"), put(MESH2, where, "data")
    with jax.set_mesh(MESH2):
        value = g(zs, ys, ws, ms)
        grad = jax.grad(lambda z: g(z, ys, ws, ms))(zs)
    return {"value": err(value, want), "grad": err(grad, want_g)}


def linear_case(mode, options, mesh_kind="1d", n=40, h=8, v=64, chunk=16):
    rng = np.random.default_rng(7)
    hid = rng.normal(size=(n, h))
    cls = rng.normal(size=(v, h)) / 2
    bias = rng.normal(size=v)
    y = rng.integers(0, v, n)
    y[::6] = IGNORE
    w = rng.uniform(0.5, 2.0, v)
    options = dict(options)
    acc = options.pop("return_token_accuracy", False)

    def ref(hh, cc, bb):
        return jnp.sum(reference(hh @ cc.T + bb, jnp.asarray(y), weight=jnp.asarray(w), **options))

    want, want_g = jax.value_and_grad(ref, argnums=(0, 1, 2))(jnp.asarray(hid), jnp.asarray(cls), jnp.asarray(bias))
    mesh = MESH if mesh_kind == "1d" else MESH2
    rows = P() if mesh_kind == "1d" else P("data")
    hs, cs, bs = put(mesh, hid, *rows), put(mesh, cls, "v"), put(mesh, bias, "v")
    ys, ws = put(mesh, y, *rows), put(mesh, w, "v")

    def f(hh, cc, bb, t, ww):
        if mesh_kind == "1d":
            out = xlsce.linear_cross_entropy(hh, cc, t, bias=bb, weight=ww, chunk_size=chunk, axis_name="v",
                                             return_token_accuracy=acc, **options)
            return out
        d = jax.lax.psum(xlsce.mean_denominator(t, weight=jnp.asarray(w)), "data")
        part = xlsce.linear_cross_entropy(hh, cc, t, bias=bb, weight=ww, chunk_size=chunk, axis_name="v",
                                          denominator=d, **options)
        return jax.lax.psum(part, "data")

    outs = (P(), P()) if acc else P()
    g = jax.shard_map(f, mesh=mesh, in_specs=(P(*rows, None), P("v", None), P("v"), rows, P("v")), out_specs=outs)
    g = jax.jit(g) if mode == "jit" else g

    def loss(hh, cc, bb):
        o = g(hh, cc, bb, ys, ws)
        return jnp.sum(o[0] if acc else o)

    with jax.set_mesh(mesh):
        value = loss(hs, cs, bs)
        grads = jax.grad(loss, argnums=(0, 1, 2))(hs, cs, bs)
        r = {"value": err(value, want)}
        for name, a, b in zip(("dhidden", "dclassifier", "dbias"), grads, want_g):
            r[name] = err(a, b)
        if acc:
            logits = hid @ cls.T + bias
            want_acc = np.mean((np.argmax(logits, -1) == y)[y != IGNORE])
            r["accuracy"] = abs(float(g(hs, cs, bs, ys, ws)[1]) - float(want_acc))
        if mode == "jit":
            r["gather"] = largest_gather(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(hs, cs, bs).compile())
            r["positions"] = n
    return r


def data_only_linear_case(mode, n=48, h=8, v=24, chunk=4):
    # shard_map over the positions only (no axis_name): the classifier replicated, the global mean from
    # denominator=; the scan's carries inside shard_map (issue: "carry input and carry output must have equal types")
    rng = np.random.default_rng(9)
    hid, cls = rng.normal(size=(n, h)), rng.normal(size=(v, h)) / 2
    y = rng.integers(0, v, n)
    y[::7] = IGNORE
    kw = dict(label_smoothing=0.1)
    want, want_g = jax.value_and_grad(lambda hh, cc: reference(hh @ cc.T, jnp.asarray(y), **kw), argnums=(0, 1))(
        jnp.asarray(hid), jnp.asarray(cls))

    def f(hh, cc, t):
        d = jax.lax.psum(xlsce.mean_denominator(t), "v")
        return jax.lax.psum(xlsce.linear_cross_entropy(hh, cc, t, chunk_size=chunk, denominator=d, **kw), "v")

    g = jax.shard_map(f, mesh=MESH, in_specs=(P("v", None), P(), P("v")), out_specs=P())
    g = jax.jit(g) if mode == "jit" else g
    hs, cs, ys = put(MESH, hid, "v"), put(MESH, cls), put(MESH, y, "v")
    with jax.set_mesh(MESH):
        value = g(hs, cs, ys)
        grad = jax.grad(lambda hh, cc: g(hh, cc, ys), argnums=(0, 1))
        dh, dw = grad(hs, cs)
        gather = largest_gather(jax.jit(grad).lower(hs, cs).compile()) if mode == "jit" else 0
    r = {"value": err(value, want), "dhidden": err(dh, want_g[0]), "dclassifier": err(dw, want_g[1])}
    return {**r, "gather": gather, "positions": n}


def pmap_case():
    # pmap: the loss whole on every device; jax.grad inside pmap differentiates the sum of the devices' (equal)
    # losses, as for any lax.psum under pmap: axis_size times the gradient of the loss
    z, y, w, _, _ = problem(8, k=32)
    shards = jnp.asarray(z.reshape(N, 8, 4).transpose(1, 0, 2))
    kw = dict(label_smoothing=0.2, smoothing="exclusive")
    want, want_g = jax.value_and_grad(lambda z: reference(z, jnp.asarray(y), **kw))(jnp.asarray(z))
    f = jax.pmap(lambda z, t: xlsce.cross_entropy(z, t, axis_name="v", **kw), axis_name="v", in_axes=(0, None))
    g = jax.pmap(jax.grad(lambda z, t: xlsce.cross_entropy(z, t, axis_name="v", **kw)), axis_name="v", in_axes=(0, None))
    value = f(shards, jnp.asarray(y))
    grad = np.asarray(g(shards, jnp.asarray(y))).transpose(1, 0, 2).reshape(N, 32)
    return {"value": err(value, jnp.full((8,), want)), "grad_over_axis_size": err(grad / 8, want_g)}


def errors_case():
    out = {}
    def catch(name, fn):
        try:
            fn()
            out[name] = {"refused": None}
        except Exception as e:
            out[name] = {"refused": type(e).__name__, "message": str(e)}
    z = np.zeros((4, 8)); y = np.zeros(4, dtype=int)
    catch("numpy-axis_name", lambda: xlsce.cross_entropy(z, y, axis_name="v"))
    catch("jax-process_group", lambda: xlsce.cross_entropy(jnp.asarray(z), jnp.asarray(y), process_group=object()))
    catch("both", lambda: xlsce.cross_entropy(jnp.asarray(z), jnp.asarray(y), axis_name="v", process_group=object()))
    f = jax.shard_map(lambda z, t, w: xlsce.cross_entropy(z, t, weight=w, axis_name="v"),
                      mesh=MESH, in_specs=(P(None, "v"), P(), P()), out_specs=P())
    with jax.set_mesh(MESH):
        catch("whole-weight", lambda: f(put(MESH, np.zeros((4, 64)), None, "v"), put(MESH, np.zeros(4, int)),
                                        put(MESH, np.ones(64))))
    return out


CASES = {
    "plain": {},
    "uniform": {"label_smoothing": 0.3},
    "exclusive": {"label_smoothing": 0.3, "smoothing": "exclusive"},
    "weights-where": {"label_smoothing": 0.2, "weight": True, "where": True},
    "exclusive-weights-zloss": {"label_smoothing": 0.1, "smoothing": "exclusive", "weight": True, "z_loss": 1e-2},
    "softcap-sum": {"label_smoothing": 0.1, "softcap": 4.0, "reduction": "sum"},
    "none-lse": {"label_smoothing": 0.25, "reduction": "none", "return_lse": True},
    "soft-targets": {"label_smoothing": 0.1, "soft": True},
    "soft-exclusive-weights": {"label_smoothing": 0.2, "smoothing": "exclusive", "soft": True, "weight": True},
}
MINUS_INF = {"uniform", "exclusive", "weights-where"}

EAGER = {"exclusive-weights-zloss", "none-lse", "soft-exclusive-weights", "uniform-minus-inf", "linear", "linear-2d",
         "linear-data-only", "accuracy", "data-parallel"}  # op by op over 8 devices is slow: the jitted runs cover every case

report = {}
for mode in ("eager", "jit"):
    for name, options in CASES.items():
        for suffix in ("", "-minus-inf") if name in MINUS_INF else ("",):
            if mode == "eager" and name + suffix not in EAGER:
                continue
            key = f"ce-{name}{suffix}-{mode}"
            try:
                report[key] = ce_case(options, mode, minus_inf="classes" if suffix else None)
            except Exception as e:
                report[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    for key, fn in (
        (f"accuracy-{mode}", lambda: accuracy_case(mode)),
        (f"data-parallel-{mode}", lambda: data_parallel_weighted_case(mode)),
        (f"linear-{mode}", lambda: linear_case(mode, {"label_smoothing": 0.1})),
        (f"linear-exclusive-zloss-{mode}", lambda: linear_case(mode, {"label_smoothing": 0.2, "smoothing": "exclusive", "z_loss": 1e-3})),
        (f"linear-none-{mode}", lambda: linear_case(mode, {"reduction": "none", "label_smoothing": 0.1})),
        (f"linear-accuracy-{mode}", lambda: linear_case(mode, {"return_token_accuracy": True})),
        (f"linear-2d-{mode}", lambda: linear_case(mode, {"label_smoothing": 0.1}, mesh_kind="2d")),
        (f"linear-data-only-{mode}", lambda: data_only_linear_case(mode)),
    ):
        if mode == "eager" and key[: -len("-eager")] not in EAGER:
            continue
        try:
            report[key] = fn()
        except Exception as e:
            report[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
report["out-of-range-jit"] = out_of_range_case()
report["pmap"] = pmap_case()
report["errors"] = errors_case()
json.dump(report, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab_jax") / "report.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(path) as f:
        return json.load(f)


CE = [
    "plain",
    "uniform",
    "exclusive",
    "weights-where",
    "exclusive-weights-zloss",
    "softcap-sum",
    "none-lse",
    "soft-targets",
    "soft-exclusive-weights",
    "uniform-minus-inf",
    "exclusive-minus-inf",
    "weights-where-minus-inf",
]
MODES = ("eager", "jit")
EAGER = {"exclusive-weights-zloss", "none-lse", "soft-exclusive-weights", "uniform-minus-inf"}
EAGER |= {"linear", "linear-2d", "linear-data-only"}  # as the subprocess's EAGER


def _modes(names):
    """(name, mode) pairs: every case jitted, those of EAGER also eagerly (the subprocess runs the same)."""
    return [(n, m) for n in names for m in MODES if m == "jit" or n in EAGER]


@pytest.mark.parametrize("name, mode", _modes(CE))
def test_cross_entropy_over_class_shards_equals_the_reference(report, name, mode):
    r = report[f"ce-{name}-{mode}"]
    assert "error" not in r, r.get("error")
    for key in ("value", "grad", "vg_value", "vg_grad", "lse"):
        if key in r:
            assert r[key] < 1e-12, (key, r)
    if mode == "jit":
        assert r["gather"] <= r["positions"], r  # no logits-sized all-gather


@pytest.mark.parametrize("mode", MODES)
def test_token_accuracy_takes_the_first_maximum_across_shards(report, mode):
    r = report[f"accuracy-{mode}"]
    assert "error" not in r, r.get("error")
    assert r["want"] > 0.2 and r["value"] < 1e-12, r


def test_out_of_range_class_under_jit_is_nan_on_its_row_only(report):
    r = report["out-of-range-jit"]
    assert r == {"bad_nan": True, "others_finite": True}


@pytest.mark.parametrize("mode", MODES)
def test_data_and_class_shards_give_the_global_mean_with_denominator(report, mode):
    r = report[f"data-parallel-{mode}"]
    assert "error" not in r, r.get("error")
    assert r["value"] < 1e-12 and r["grad"] < 1e-12, r


@pytest.mark.parametrize(
    "name, mode",
    _modes(["linear", "linear-exclusive-zloss", "linear-none", "linear-accuracy", "linear-2d", "linear-data-only"]),
)
def test_linear_cross_entropy_over_vocabulary_shards(report, name, mode):
    r = report[f"{name}-{mode}"]
    assert "error" not in r, r.get("error")
    for key in ("value", "dhidden", "dclassifier", "dbias", "accuracy"):
        if key in r:
            assert r[key] < 1e-12, (key, r)
    if mode == "jit":
        assert r["gather"] <= r["positions"], r  # neither the hidden states nor the classifier gathered


def test_pmap_gives_the_loss_and_jax_psum_gradient_convention(report):
    r = report["pmap"]
    assert r["value"] < 1e-12 and r["grad_over_axis_size"] < 1e-12, r


@pytest.mark.parametrize(
    "name, words",
    [
        ("numpy-axis_name", "axis_name"),
        ("jax-process_group", "process_group"),
        ("both", "not both"),
        ("whole-weight", "weight must have shape (8,)"),
    ],
)
def test_misplaced_sharding_arguments_are_refused(report, name, words):
    r = report["errors"][name]
    assert r["refused"] == "ValueError", r
    assert words in r["message"], r
