"""Cross-backend agreement on hypothesis-generated problems, float64.

For each generated problem (rank, class axis, K, label smoothing and convention,
class weights, ignored positions, ``where`` mask, reduction, index or probability
targets, classes out of play with ``-inf`` logits, z-loss, soft-cap), xlsce runs on
every backend of conftest.BACKENDS (NumPy, NumPy with read-only inputs, array-api-strict,
JAX and PyTorch):

* the losses and the ``value_and_grad`` gradients agree between the backends
  (rtol 1e-10);
* on PyTorch, ``loss.backward()`` and on JAX, ``jax.vjp`` give the same gradient as
  ``value_and_grad`` (JAX runs under ``jax.jit``: one compilation per problem);
* the loss equals a dense NumPy transcription of the documented formula
  (q = a t + b 1_F, loss = -sum_c w_c q_c log softmax(z)_c + zeta lse^2, PyTorch's reductions).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, Backend, xp_assert_close

import xlsce

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("array_api_strict")
st = hypothesis.strategies


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 3))
    axis = draw(st.integers(-ndim, ndim - 1))
    kind = draw(st.sampled_from(["index", "prob"]))
    smoothing = draw(st.sampled_from(["uniform", "exclusive"]))
    k = draw(st.integers(2 if smoothing == "exclusive" else 1, 5))
    shape = [draw(st.integers(0, 3)) for _ in range(ndim)]
    shape[axis] = k
    shape = tuple(shape)
    ax = axis % ndim
    positions = tuple(s for i, s in enumerate(shape) if i != ax)
    eps = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    x = rng.normal(scale=draw(st.sampled_from([0.5, 3.0, 30.0])), size=shape)
    xl = np.moveaxis(x, ax, -1)  # a view with the classes last
    out_of_play = draw(st.booleans()) and k > 1
    if out_of_play:  # classes out of play (-inf logits), never all of a row
        off = rng.random(xl.shape) < 0.3
        off[..., 0] = False
        xl[off] = -np.inf

    kw = dict(
        label_smoothing=eps,
        smoothing=smoothing,
        reduction=draw(st.sampled_from(["none", "sum", "mean"])),
        axis=axis,
        weight=rng.uniform(0.1, 3.0, size=k) if draw(st.booleans()) else None,
        where=np.asarray(rng.random(positions) < 0.7) if draw(st.booleans()) else None,
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-2])),
        # (soft-capping maps -inf to -softcap, which would bring a class back in play: not combined here)
        softcap=None if out_of_play else draw(st.sampled_from([None, None, 5.0])),
    )
    if kind == "index":
        # a target class in play: pick among the finite logits of each position
        finite = np.isfinite(xl)
        y = (rng.random(xl.shape) * finite).argmax(axis=-1)
        ignore = draw(st.sampled_from(["none", "-100", "class"]))
        if ignore == "-100":
            y = np.where(rng.random(positions) < 0.3, -100, y)
            kw["ignore_index"] = -100
        elif ignore == "class":
            kw["ignore_index"] = int(rng.integers(0, k))
        else:
            kw["ignore_index"] = None
        t = np.asarray(y, dtype=np.int64)
    else:
        p = np.exp(rng.normal(size=xl.shape)) * (rng.random(xl.shape) < 0.8) * np.isfinite(xl)
        p[..., 0] += 0.1  # class 0 is always in play
        t = np.moveaxis(p / p.sum(axis=-1, keepdims=True), -1, ax)
        kw["ignore_index"] = draw(st.sampled_from([-100, None]))
    cotangent = rng.normal(size=positions) if kw["reduction"] == "none" else None
    return x, t, kw, cotangent


def dense_reference(x, t, kw):
    """The documented loss, written densely in NumPy from the formula (not from xlsce's code)."""
    ax = kw["axis"] % x.ndim
    z = np.moveaxis(x, ax, -1)
    if kw["softcap"] is not None:
        z = kw["softcap"] * np.tanh(z / kw["softcap"])
    fin = np.isfinite(z)
    m = np.max(np.where(fin, z, -np.inf), axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    lse = m + np.log(np.sum(np.where(fin, np.exp(z - m), 0.0), axis=-1, keepdims=True))
    lp = np.where(fin, z - lse, -np.inf)
    k_in = fin.sum(axis=-1, keepdims=True).astype(float)
    k = z.shape[-1]
    if np.issubdtype(t.dtype, np.integer):
        valid = np.ones(t.shape, bool) if kw["ignore_index"] is None else t != kw["ignore_index"]
        y = np.where(valid, t, 0)
        tt = np.eye(k)[y]
    else:
        valid = np.ones(t.shape[:ax] + t.shape[ax + 1 :], bool)
        tt = np.moveaxis(t, ax, -1)
    if kw["where"] is not None:
        valid = valid & kw["where"]
    eps = kw["label_smoothing"]
    if kw["smoothing"] == "uniform":
        a, b = 1.0 - eps, eps / np.maximum(k_in, 1)
    else:
        b = np.where(k_in > 1, eps / np.maximum(k_in - 1, 1), 0.0)
        a = np.where(k_in > 1, 1.0 - eps - b, 1.0)
    w = np.ones(k) if kw["weight"] is None else kw["weight"]
    wq = w * (a * tt + b * fin)
    with np.errstate(invalid="ignore"):
        loss = -np.sum(np.where(wq == 0, 0.0, wq * lp), axis=-1) + kw["z_loss"] * lse[..., 0] ** 2
    loss = np.where(valid, loss, 0.0)
    if kw["reduction"] == "none":
        return loss
    if kw["reduction"] == "sum":
        return loss.sum()
    d = (valid * w[y]).sum() if np.issubdtype(t.dtype, np.integer) else valid.sum()
    return loss.sum() / d if d != 0 else np.float64(0.0)


def _run(backend, x, t, kw, cotangent):
    """[(how, loss, grad)] of xlsce on one backend: value_and_grad, and the library's own autodiff where it has one.

    Under ``backend.jit``: on JAX one compilation per generated problem instead of one per primitive in eager
    mode (about 4x faster here); eager JAX is compared with PyTorch and optax over fixed grids in
    test_reference_torch.py and test_reference_optax.py.
    """
    arrays = {k: backend.asarray(v) for k, v in kw.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in kw.items() if not isinstance(v, np.ndarray)}

    @backend.jit
    def both(X, T, arrs, ct):
        kws = dict(static, **arrs)
        out = xlsce.value_and_grad(X, T, cotangent=ct, **kws)
        if backend.vjp is not None:
            out = (*out, *backend.vjp(lambda z: xlsce.cross_entropy(z, T, **kws), X, ct))
        return out

    ct = None if cotangent is None else backend.asarray(cotangent)
    out = both(backend.asarray(x), backend.asarray(t), arrays, ct)
    hows = ["value_and_grad", backend.vjp_name][: len(out) // 2]
    return [(f"{backend} {how}", out[2 * i], out[2 * i + 1]) for i, how in enumerate(hows)]


@pytest.mark.slow
@hypothesis.settings(
    max_examples=40, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow], print_blob=True
)
@hypothesis.given(problems())
def test_backends_agree(problem):
    x, t, kw, cotangent = problem
    results = [r for name in BACKENDS for r in _run(Backend(name), x, t, kw, cotangent)]
    _, ref_loss, ref_grad = results[0]  # numpy value_and_grad
    positions = tuple(s for i, s in enumerate(x.shape) if i != kw["axis"] % x.ndim)
    assert tuple(ref_loss.shape) == (positions if kw["reduction"] == "none" else ())
    assert np.all(np.isfinite(ref_loss)) and np.all(np.isfinite(ref_grad))
    for how, loss, grad in results:
        assert tuple(grad.shape) == x.shape, how
        xp_assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12, err_msg=f"loss: {how} vs numpy")
        xp_assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12, err_msg=f"gradient: {how} vs numpy")
    xp_assert_close(ref_loss, dense_reference(x, t, kw), rtol=1e-10, atol=1e-10, err_msg="loss vs the formula")
    # classes out of play get no gradient
    np.testing.assert_array_equal(ref_grad[np.isneginf(x)], 0.0)
