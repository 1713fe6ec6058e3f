"""Reliability at the edges (issue 18): the same answer on every backend, eagerly and under ``jax.jit``.

Every expected value here comes from a hand derivation or a float64 reference written from the
documented formulas (docs/what-it-computes.md) in NumPy, never from xlsce's own output.  Each test
runs on every backend of the ``backend`` fixture; ``backend.jit`` is ``jax.jit`` on JAX (the traced
algorithm) and the identity elsewhere, and ``backend.vjp`` is the library's own autodiff (torch
autograd, ``jax.vjp``), which runs xlsce's recomputing backward.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import xp_assert_close

import xlsce

F32_ULP = 2.0**-24


def _grads(backend, f, z):
    """``[(name, gradient)]`` of the scalar ``f`` at ``z`` by every route the backend has: the library's
    autodiff (recomputing backward), and on JAX the same under ``jax.jit``."""
    out = []
    if backend.vjp is not None:
        out.append((backend.vjp_name, backend.vjp(f, z)[1]))
    if backend.name == "jax":
        import jax

        out.append(("jax.jit(jax.grad)", jax.jit(jax.grad(f))(z)))
    return out


def _value_and_grads(backend, z, y, **kw):
    """``[(name, loss, gradient)]``: ``value_and_grad`` (eager and jitted) and the autodiff routes."""
    rows = [("value_and_grad", *xlsce.value_and_grad(z, y, **kw))]
    if backend.name == "jax":
        import jax

        rows.append(("jit(value_and_grad)", *jax.jit(lambda z, y: xlsce.value_and_grad(z, y, **kw))(z, y)))
    for name, g in _grads(backend, lambda z: backend.xp.sum(xlsce.cross_entropy(z, y, **kw)), z):
        rows.append((name, xlsce.cross_entropy(z, y, **kw), g))
    return rows


def _np(a):
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else getattr(a, "_array", a))


# ----------------------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_huge_logits_gradient_is_exact(backend, dtype):
    """z = [1e8, 1e8, 0] (1e300 in float64), class 2: softmax [1/2, 1/2, 0] exactly, so the gradient is
    [0.5, 0.5, -1] by every route (the recomputing backward got [1, 1, -1] from exp(z - lse))."""
    big = 1e8 if dtype == "float32" else 1e300
    z = backend.asarray(np.array([[big, big, 0.0]], dtype=dtype))
    y = backend.asarray(np.array([2]))
    for name, _, g in _value_and_grads(backend, z, y):
        np.testing.assert_array_equal(_np(g), np.array([[0.5, 0.5, -1.0]], dtype=dtype), err_msg=name)


def test_huge_logits_gradient_is_exact_on_torch_recomputing_path():
    """The same on torch's recomputing backward (logits above 2**16 elements)."""
    torch = pytest.importorskip("torch")
    n = 2**16 // 3 + 1
    z = torch.tensor([[1e8, 1e8, 0.0]]).repeat(n, 1).requires_grad_(True)
    xlsce.cross_entropy(z, torch.full((n,), 2), reduction="sum").backward()
    np.testing.assert_array_equal(z.grad.numpy(), np.tile(np.float32([[0.5, 0.5, -1.0]]), (n, 1)))


def _reference(z, y, eps, zeta=0.0, w=None, valid=None, k_axis=-1):
    """float64 loss per position and its gradient per position (uniform smoothing), from the formulas."""
    z = np.moveaxis(np.asarray(z, dtype=np.float64), k_axis, -1)
    k = z.shape[-1]
    w = np.ones(k) if w is None else np.asarray(w, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=-1, keepdims=True)
    lse = m + np.log(s)
    q = np.full(z.shape, eps / k)
    np.put_along_axis(q, np.asarray(y)[..., None], np.take_along_axis(q, np.asarray(y)[..., None], -1) + 1 - eps, -1)
    wq = w * q
    loss = -(wq * ((z - m) - np.log(s))).sum(-1) + zeta * lse[..., 0] ** 2
    grad = (wq.sum(-1, keepdims=True) + 2 * zeta * lse) * (e / s) - wq
    return loss, grad, (e / s) * wq.sum(-1, keepdims=True) + wq


@pytest.mark.parametrize("soft", [False, True])
def test_exclusive_smoothing_near_one_keeps_the_targets_gradient_exact(backend, soft):
    """Exclusive, eps = 1, two classes: q = (0, 1), so the target's gradient is its softmax, 6.7e-6 here.
    With a = 1 - eps - b = -1 and b = 1 subtracted one after the other (p - 1 + 1) it lost all but two
    digits in float32 (6.735e-6 for 6.748e-6); subtracted as one term, it keeps a few ulps."""
    zn = np.array([[-8.314404, 3.591799]], dtype=np.float32)
    z64 = zn.astype(np.float64)
    want = np.exp(z64 - np.logaddexp.reduce(z64, axis=1, keepdims=True))[0, 0]  # p_0 - q_0, q_0 = 0
    z = backend.asarray(zn)
    t = backend.asarray(np.array([[1.0, 0.0]], dtype=np.float32) if soft else np.array([0]))
    kw = dict(label_smoothing=1.0, smoothing="exclusive")
    _, g = xlsce.value_and_grad(z, t, **kw)
    grads = [("value_and_grad", g), *_grads(backend, lambda z: xlsce.cross_entropy(z, t, **kw), z)]
    for name, g in grads:
        got = float(_np(g)[0, 0])
        assert abs(got - want) <= 8 * F32_ULP * want, (name, got, want)


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4])
def test_float32_gradient_precision_for_large_logits(backend, offset):
    """Logits offset + 3 N(0, 1), float32: every route's gradient is within a few ulps x K of the
    float64 gradient, relative to the size of its terms (softmax and target): the recomputing backward
    is as accurate as the fused one.  exp(z - lse) with the rounded lse was off by |lse| * 2**-24
    (4.7e-4 at 1e4)."""
    rng = np.random.default_rng(0)
    n, k = 16, 50
    z32 = (offset + 3 * rng.normal(size=(n, k))).astype(np.float32)
    y = rng.integers(0, k, size=n)
    _, g64, size = _reference(z32, y, 0.1)
    for name, _, g in _value_and_grads(backend, backend.asarray(z32), backend.asarray(y), label_smoothing=0.1):
        err = np.abs(_np(g).astype(np.float64) - g64 / n) / (size / n)
        assert err.max() <= 4 * k * F32_ULP, (name, err.max())


# ----------------------------------------------------------------------------------------- item 3


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("soft", [False, True])
def test_overflowing_shift_keeps_the_class_in_play(backend, soft):
    """[3e38, -3e38] (float32), class 0, eps = 0.5: the loss is 0.25 * 6e38 = 1.5e38 beyond rounding,
    and -3e38 - 3e38 overflows: +inf, never the 0 of a class taken out of play.  The gradient
    p - q = [1, 0] - [0.75, 0.25] is exact."""
    z = backend.asarray(np.array([[3e38, -3e38]], dtype=np.float32))
    t = backend.asarray(np.array([[1.0, 0.0]], dtype=np.float32) if soft else np.array([0]))
    f = backend.jit(lambda z, t: xlsce.cross_entropy(z, t, label_smoothing=0.5))
    assert np.isposinf(float(_np(f(z, t))))
    assert np.isposinf(float(_np(xlsce.cross_entropy(z, t, label_smoothing=0.5))))
    _, g = xlsce.value_and_grad(z, t, label_smoothing=0.5)
    np.testing.assert_array_equal(_np(g), np.float32([[0.25, -0.25]]))
    for name, g in _grads(backend, lambda z: xlsce.cross_entropy(z, t, label_smoothing=0.5), z):
        np.testing.assert_array_equal(_np(g), np.float32([[0.25, -0.25]]), err_msg=name)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("eps", [0.3, 0.9, 0.99])
@pytest.mark.parametrize("soft", [False, True])
def test_overflowing_shift_under_exclusive_smoothing_is_inf_never_nan(backend, soft, eps):
    """[3e38, -3e38] (float32), exclusive: q = (1 - eps, eps) on class 0 (or t = (0.5, 0.5): q = (0.5, 0.5)),
    so the loss is q_1 * 6e38 beyond float32's range: +inf.  For eps > 1/2 the coefficient of t,
    a = 1 - eps - eps/(K'-1) = 1 - 2 eps, is negative; the target's term and the smoothing's are then
    +inf and -inf separately, and their difference must not be NaN."""
    z = backend.asarray(np.array([[3e38, -3e38]], dtype=np.float32))
    t = backend.asarray(np.array([[0.5, 0.5]], dtype=np.float32) if soft else np.array([0]))
    kw = dict(label_smoothing=eps, smoothing="exclusive")
    assert np.isposinf(float(_np(xlsce.cross_entropy(z, t, **kw))))
    assert np.isposinf(float(_np(backend.jit(lambda z, t: xlsce.cross_entropy(z, t, **kw))(z, t))))


@pytest.mark.parametrize("eps", [0.3, 0.9])
def test_probability_mass_on_a_class_out_of_play_is_plus_inf_in_both_conventions(backend, eps):
    """t puts 0.5 on a -inf class: +inf (docs/what-it-computes.md), also where the exclusive
    convention's coefficient of t (1 - 2 eps with two classes in play) is negative (was -inf)."""
    z = backend.asarray(np.array([[0.5, 1.0, -np.inf]]))
    t = backend.asarray(np.array([[0.5, 0.0, 0.5]]))
    for smoothing in ("uniform", "exclusive"):
        kw = dict(label_smoothing=eps, smoothing=smoothing)
        assert np.isposinf(float(_np(xlsce.cross_entropy(z, t, **kw)))), smoothing
        f = backend.jit(lambda z, t, kw=kw: xlsce.cross_entropy(z, t, **kw))
        assert np.isposinf(float(_np(f(z, t)))), smoothing


def test_overflowing_shift_index_target_without_smoothing(backend):
    """[3e38, -3e38], class 1, no smoothing: lse - z_1 = 6e38 overflows: +inf on every backend."""
    z = backend.asarray(np.array([[3e38, -3e38]], dtype=np.float32))
    y = backend.asarray(np.array([1]))
    with np.errstate(over="ignore"):
        assert np.isposinf(float(_np(backend.jit(xlsce.cross_entropy)(z, y))))


# ----------------------------------------------------------------------------------------- items 4, 5


@pytest.mark.parametrize("bad", [[1.0, -1.0, 1.0], [1.0, np.nan, 1.0], [np.inf, 1.0, 1.0]])
def test_bad_class_weights_are_refused(backend, bad):
    """weight = [1, -1, 1] cancelled the mean's denominator to 0 (a silent 0): a ValueError naming weight."""
    z = backend.asarray(np.zeros((2, 3)))
    y = backend.asarray(np.array([0, 1]))
    w = backend.asarray(np.array(bad))
    with pytest.raises(ValueError, match="weight must hold finite, non-negative class weights"):
        xlsce.cross_entropy(z, y, weight=w)
    h, c = backend.asarray(np.ones((2, 2))), backend.asarray(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="weight must hold finite, non-negative"):
        xlsce.linear_cross_entropy(h, c, y, weight=w)


def test_zero_class_weights_are_accepted(backend):
    z = backend.asarray(np.zeros((2, 3)))
    w = backend.asarray(np.array([1.0, 0.0, 1.0]))
    assert float(_np(xlsce.cross_entropy(z, backend.asarray(np.array([0, 1])), weight=w))) == pytest.approx(math.log(3))


@pytest.mark.parametrize("bad", [[1.5, -0.5, 0.0], [np.nan, 0.0, 1.0], [np.inf, 0.0, 0.0]])
def test_bad_probability_targets_are_refused(backend, bad):
    z = backend.asarray(np.zeros((2, 3)))
    t = backend.asarray(np.array([[1.0, 0.0, 0.0], bad]))
    with pytest.raises(ValueError, match="target of class probabilities must be finite and >= 0"):
        xlsce.cross_entropy(z, t)
    with pytest.raises(ValueError, match="target of class probabilities must be finite and >= 0"):
        xlsce.value_and_grad(z, t)


def test_probability_targets_need_not_sum_to_one(backend):
    """[0.5, 0.5, 0.5] at z = 0: -sum t log(1/3) = 1.5 log 3 (documented: no normalisation)."""
    z = backend.asarray(np.zeros((1, 3)))
    t = backend.asarray(np.full((1, 3), 0.5))
    assert float(_np(xlsce.cross_entropy(z, t))) == pytest.approx(1.5 * math.log(3))


# ----------------------------------------------------------------------------------------- item 6


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("mask", ["ignore_index", "where"])
def test_masked_positions_never_leak(backend, reduction, mask):
    """float32 logits of 3e38 with z_loss = 0.01 at masked positions: lse**2 overflows there, and the
    result is exactly 0 (the counted row alone otherwise), never the NaN of inf * 0; gradient 0 there."""
    zn = np.full((3, 4), 3e38, dtype=np.float32)
    zn[0] = [1.0, 2.0, 0.0, -1.0]
    yn = np.array([1, 2, 3])
    keep = np.array([True, False, False])
    kw = {"z_loss": 0.01, "reduction": reduction, "label_smoothing": 0.1}
    if mask == "ignore_index":
        yn = np.where(keep, yn, -100)
    else:
        kw["where"] = backend.asarray(keep)
    loss64, grad64, _ = _reference(zn[:1], yn[:1], 0.1, zeta=0.01)
    z, y = backend.asarray(zn), backend.asarray(yn)
    for name, loss, g in _value_and_grads(backend, z, y, **kw):
        loss, g = _np(loss), _np(g)
        want = np.array([loss64[0], 0.0, 0.0]) if reduction == "none" else loss64[0]
        np.testing.assert_allclose(loss, want, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(g[0], grad64[0], rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_array_equal(g[1:], 0.0, err_msg=name)
    every = backend.asarray(np.zeros(3, dtype=bool)) if mask == "where" else None
    yall = backend.asarray(np.full(3, -100)) if mask == "ignore_index" else y
    kw = {**kw, "where": every} if mask == "where" else kw
    out = backend.jit(lambda z, y: xlsce.cross_entropy(z, y, **kw))(
        backend.asarray(np.full((3, 4), 3e38, np.float32)), yall
    )
    np.testing.assert_array_equal(_np(out), 0.0)


# ----------------------------------------------------------------------------------------- item 7


@pytest.mark.parametrize("smoothing", ["uniform", "exclusive"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_row_of_only_minus_inf_is_infinite(backend, smoothing, eps):
    """A counted row with every logit -inf has no class in play: no smoothing there (q = t), and the
    loss is +inf wherever the target has mass, for every eps (eps = 1 gave 0), on every backend."""
    zn = np.array([[-np.inf, -np.inf, -np.inf], [1.0, 0.0, -1.0]])
    kw = {"label_smoothing": eps, "smoothing": smoothing, "reduction": "none"}
    z = backend.asarray(zn)
    loss64, _, _ = _reference(zn[1:], np.array([0]), eps * 3 / 2 if smoothing == "exclusive" else eps)
    for t in (np.array([0, 0]), np.array([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]])):
        for f in (xlsce.cross_entropy, backend.jit(lambda z, t: xlsce.cross_entropy(z, t, **kw))):
            out = _np(f(z, backend.asarray(t), **kw) if f is xlsce.cross_entropy else f(z, backend.asarray(t)))
            assert np.isposinf(out[0]), (t, out)
            np.testing.assert_allclose(out[1], loss64[0], rtol=1e-12)
    # no mass at all on the empty row (an all-zero probability row): 0
    t = backend.asarray(np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert _np(xlsce.cross_entropy(z, t, **kw))[0] == 0.0
    assert _np(backend.jit(lambda z, t: xlsce.cross_entropy(z, t, **kw))(z, t))[0] == 0.0


# ----------------------------------------------------------------------------------------- item 8


def _weighted_z_loss_reference(zn, yn, w, keep, eps, zeta):
    """Mean of the weighted cross-entropy over sum m w[y], plus the z-loss's mean over the n counted
    positions (Liger's CrossEntropyWithZLoss: z_loss.sum() / target_mask.sum()), and its gradient."""
    loss, _, _ = _reference(zn, yn, eps, w=w)
    lse_loss, _, _ = _reference(zn, yn, 0.0)  # -log p_y, for lse = loss + z_y
    lse = lse_loss + zn[np.arange(len(yn)), yn]
    d, n = (keep * w[yn]).sum(), keep.sum()
    value = (keep * loss).sum() / d + zeta * (keep * lse**2).sum() / n
    p = np.exp(zn - lse[:, None])
    q = np.full(zn.shape, eps / zn.shape[1])
    q[np.arange(len(yn)), yn] += 1 - eps
    ce_grad = (w * q).sum(1, keepdims=True) * p - w * q
    grad = keep[:, None] * (ce_grad / d + 2 * zeta * lse[:, None] * p / n)
    return value, grad


@pytest.mark.parametrize("masked", [True, False])
def test_z_loss_under_a_weighted_mean_is_per_position(backend, masked):
    rng = np.random.default_rng(5)
    n, k = 6, 5
    zn, yn = rng.normal(size=(n, k)) * 3, rng.integers(0, k, size=n)
    w = np.array([0.5, 2.0, 1.0, 3.0, 0.25])
    keep = np.array([True, True, False, True, True, True]) if masked else np.ones(n, dtype=bool)
    want, gwant = _weighted_z_loss_reference(zn, yn, w, keep, 0.1, 0.05)
    kw = {"weight": backend.asarray(w), "label_smoothing": 0.1, "z_loss": 0.05}
    if masked:  # unmasked: every position counts, a count known in Python beside a traced denominator
        kw["where"] = backend.asarray(keep)
    z, y = backend.asarray(zn), backend.asarray(yn)
    for name, loss, g in _value_and_grads(backend, z, y, **kw):
        xp_assert_close(loss, want, rtol=1e-12, err_msg=name)
        xp_assert_close(g, gwant, rtol=1e-10, atol=1e-14, err_msg=name)
    # linear_cross_entropy: logits h W^T, gradients G W and G^T h, chunked
    h, c = rng.normal(size=(n, 3)), rng.normal(size=(k, 3))
    zl = h @ c.T
    want, gz = _weighted_z_loss_reference(zl, yn, w, keep, 0.1, 0.05)
    hb, cb = backend.asarray(h), backend.asarray(c)
    xp_assert_close(xlsce.linear_cross_entropy(hb, cb, y, chunk_size=2, **kw), want, rtol=1e-12)
    loss, (dh, dc, _) = xlsce.linear_value_and_grad(hb, cb, y, chunk_size=4, **kw)
    xp_assert_close(loss, want, rtol=1e-12)
    xp_assert_close(dh, gz @ c, rtol=1e-10, atol=1e-14)
    xp_assert_close(dc, gz.T @ h, rtol=1e-10, atol=1e-14)
    if backend.name == "jax":
        import jax

        f = jax.jit(lambda h: xlsce.linear_cross_entropy(h, cb, y, chunk_size=4, **kw))
        xp_assert_close(f(hb), want, rtol=1e-12)
        xp_assert_close(jax.grad(f)(hb), gz @ c, rtol=1e-10, atol=1e-14)


def test_z_loss_without_weights_is_unchanged(backend):
    """Without class weights both conventions divide by the number of counted positions."""
    rng = np.random.default_rng(6)
    zn, yn = rng.normal(size=(4, 3)), np.array([0, 2, 1, -100])
    keep = yn != -100
    want, _ = _weighted_z_loss_reference(zn, np.where(keep, yn, 0), np.ones(3), keep, 0.0, 0.1)
    xp_assert_close(xlsce.cross_entropy(backend.asarray(zn), backend.asarray(yn), z_loss=0.1), want, rtol=1e-12)


# ----------------------------------------------------------------------------------------- item 11


@pytest.mark.parametrize("rows", [2, 2**16])
def test_out_of_range_class_under_jit_gives_nan_gradient(rows):
    """Unchecked under jax.jit: the bad row's loss is NaN (documented), and so is its gradient now;
    the other rows keep softmax - onehot."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    y = jnp.zeros(rows, dtype=jnp.int32).at[1].set(7)
    z = jnp.zeros((rows, 3))
    loss, g = jax.jit(jax.value_and_grad(lambda z: xlsce.cross_entropy(z, y, reduction="sum")))(z)
    assert np.isnan(float(loss))
    g = np.asarray(g)
    assert np.isnan(g[1]).all()
    np.testing.assert_allclose(g[0], [1 / 3 - 1, 1 / 3, 1 / 3], rtol=1e-12)


# ----------------------------------------------------------------------------------------- item 12


def test_uint8_targets_and_an_ignore_index_they_cannot_hold(backend):
    """The documented rule: an ignore_index outside the target dtype's range matches no target (nothing
    is ignored, no wrap-around: uint8 156 is class 156, not -100); one inside it ignores as usual."""
    rng = np.random.default_rng(7)
    zn = rng.normal(size=(3, 256))
    y8 = np.array([156, 3, 255], dtype=np.uint8)
    z = backend.asarray(zn)
    lp = zn - np.log(np.exp(zn).sum(1, keepdims=True))
    per = -lp[np.arange(3), y8.astype(np.int64)]
    xp_assert_close(xlsce.cross_entropy(z, backend.asarray(y8), reduction="none"), per, rtol=1e-12)
    xp_assert_close(xlsce.cross_entropy(z, backend.asarray(y8), ignore_index=255), per[:2].mean(), rtol=1e-12)


def test_cotangent_is_validated(backend):
    z = backend.asarray(np.zeros((4, 3)))
    y = backend.asarray(np.array([0, 1, 2, 0]))
    h, c = backend.asarray(np.ones((4, 2))), backend.asarray(np.zeros((3, 2)))
    for call in (
        lambda **kw: xlsce.value_and_grad(z, y, **kw),
        lambda **kw: xlsce.linear_value_and_grad(h, c, y, **kw),
    ):
        with pytest.raises(
            ValueError, match=r"cotangent must be a number or 0-d .* for reduction='mean', got shape \(4,\)"
        ):
            call(cotangent=backend.asarray(np.ones(4)))
        with pytest.raises(TypeError, match="cotangent must be a real number or an array, got str"):
            call(cotangent="1")
        with pytest.raises(ValueError, match=r"cotangent must be of the per-position loss's shape \(4,\)"):
            call(cotangent=backend.asarray(np.ones(3)), reduction="none")
        with pytest.raises(ValueError, match="cotangent must be an array of the per-position loss's shape"):
            call(cotangent=2.0, reduction="none")


def test_python_number_cotangents(backend):
    """cotangent=2.0 (and 2) doubles the gradient, in value_and_grad and linear_value_and_grad alike."""
    rng = np.random.default_rng(8)
    h, c, yn = rng.normal(size=(4, 2)), rng.normal(size=(3, 2)), np.array([0, 1, 2, 0])
    hb, cb, y = backend.asarray(h), backend.asarray(c), backend.asarray(yn)
    _, g1 = xlsce.value_and_grad(backend.asarray(h @ c.T), y)
    _, g2 = xlsce.value_and_grad(backend.asarray(h @ c.T), y, cotangent=2)
    xp_assert_close(g2, 2 * _np(g1))
    _, (dh1, dc1, _) = xlsce.linear_value_and_grad(hb, cb, y)
    _, (dh2, dc2, _) = xlsce.linear_value_and_grad(hb, cb, y, cotangent=2.0)
    xp_assert_close(dh2, 2 * _np(dh1))
    xp_assert_close(dc2, 2 * _np(dc1))


def test_numpy_masked_arrays_are_refused():
    z = np.ma.array(np.zeros((2, 3)), mask=[[0, 1, 0], [0, 0, 0]])
    with pytest.raises(TypeError, match="logits is a NumPy masked array, whose mask xlsce would ignore"):
        xlsce.cross_entropy(z, np.array([0, 1]))
    with pytest.raises(TypeError, match="target is a NumPy masked array"):
        xlsce.value_and_grad(np.zeros((2, 3)), np.ma.array([0, 1], mask=[1, 0]))
    with pytest.raises(TypeError, match="hidden is a NumPy masked array"):
        xlsce.linear_cross_entropy(np.ma.array(np.ones((2, 2))), np.zeros((3, 2)), np.array([0, 1]))


def test_infinite_z_loss_is_refused(backend):
    z, y = backend.asarray(np.zeros((2, 3))), backend.asarray(np.array([0, 1]))
    with pytest.raises(ValueError, match="z_loss must be a finite float >= 0, got inf"):
        xlsce.cross_entropy(z, y, z_loss=math.inf)
    with pytest.raises(ValueError, match="z_loss must be a finite float"):
        xlsce.linear_cross_entropy(
            backend.asarray(np.ones((2, 2))), backend.asarray(np.zeros((3, 2))), y, z_loss=math.inf
        )


def test_softcap_gradient_keeps_relative_accuracy(backend):
    """z = [60, 0, 1], softcap 5, class 1 (float32): the cap saturates at class 0, whose gradient is
    p_0 * sech^2(12) = 1.47e-10 (float64 by hand), where 1 - tanh^2 gave 0.0."""
    zn = np.array([[60.0, 0.0, 1.0]])
    c = 5 * np.tanh(zn / 5)
    p = np.exp(c - c.max()) / np.exp(c - c.max()).sum()
    want = (p - np.eye(3)[[1]]) / np.cosh(zn / 5) ** 2
    z, y = backend.asarray(zn.astype(np.float32)), backend.asarray(np.array([1]))
    for name, _, g in _value_and_grads(backend, z, y, softcap=5.0):
        np.testing.assert_allclose(_np(g), want, rtol=2e-6, err_msg=name)
    assert 1e-10 < want[0, 0] < 2e-10
