"""Parity with optax (computed in JAX, float64), and the exclusive convention vs fairseq's formula.

optax has no reduction: its losses are per example, ``axis=-1`` by default.  The
references here are

* ``optax.smooth_labels`` + ``optax.softmax_cross_entropy``: the uniform convention,
  for one-hot and probability targets;
* ``optax.softmax_cross_entropy_with_integer_labels``: class indices, no smoothing;
* the ``where`` argument of both (a boolean per example: masked rows are 0 in optax,
  and 0 in xlsce's ``reduction="none"``), and optax's per-class ``where`` (classes
  out of play), which xlsce expresses with ``-inf`` logits.

Gradients of the references come from ``jax.vjp`` of the optax functions.  The
"exclusive" convention (1-ε on the target, ε/(K-1) elsewhere) has no optax
function; it is checked against fairseq's ``label_smoothed_nll_loss`` written out
by hand in NumPy, with the hand-derived gradient softmax(z) - q.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import xp_assert_close
from problems import logits_problem

import xlsce

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)

SHAPES = [(5, 4), (2, 3, 4)]  # logits; classes on the last axis unless the test says otherwise


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _reduce_ref(per_example, mask, reduction):
    """optax has no reduction: 'sum' and 'mean' (over the unmasked positions) of its per-example losses."""
    if reduction == "none":
        return per_example
    total = per_example.sum()
    return total if reduction == "sum" else total / mask.sum()


_REFERENCES = {}


def _once(request, name, compute):
    """``compute()`` once per test case (not once per backend): the reference does not depend on the backend."""
    params = request.node.callspec.params
    key = (request.node.originalname, name, tuple(sorted((k, repr(v)) for k, v in params.items() if k != "backend")))
    if key not in _REFERENCES:
        _REFERENCES[key] = compute()
    return _REFERENCES[key]


def _optax_value_and_grad(fn, x, reduction, mask, cotangent):
    """optax's loss (reduced as xlsce would) and its gradient from jax.vjp."""
    m = jnp.asarray(mask, dtype=jnp.float64)
    loss, vjp = jax.vjp(lambda z: _reduce_ref(fn(z), m, reduction), jnp.asarray(x))
    (grad,) = vjp(jnp.ones(()) if cotangent is None else jnp.asarray(cotangent))
    return np.asarray(loss), np.asarray(grad)


def _xlsce_value_and_grads(backend, x, t, cotangent, **kw):
    """[(how, loss, grad)] from xlsce on ``backend``: value_and_grad, and native autodiff on torch and jax."""
    X, T = backend.asarray(x), backend.asarray(t)
    kw = {k: (backend.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    ct = None if cotangent is None else backend.asarray(cotangent)
    out = [("value_and_grad", *xlsce.value_and_grad(X, T, cotangent=ct, **kw))]
    if backend.vjp is not None:
        out.append((backend.vjp_name, *backend.vjp(lambda z: xlsce.cross_entropy(z, T, **kw), X, ct)))
    return out


def _check(backend, ref_loss, ref_grad, x, t, cotangent, **kw):
    assert np.all(np.isfinite(ref_loss)) and np.all(np.isfinite(ref_grad))
    for how, loss, grad in _xlsce_value_and_grads(backend, x, t, cotangent, **kw):
        assert tuple(loss.shape) == np.shape(ref_loss), how
        xp_assert_close(loss, ref_loss, err_msg=f"loss ({how})")
        xp_assert_close(grad, ref_grad, err_msg=f"gradient ({how})")


PROBLEM = dict(scale=2.0, pin_first=False)  # logits_problem(shape, axis, seed=..., kind=..., **PROBLEM)


def _labels(t, k, axis=-1):
    """optax's labels for xlsce's targets: class indices one-hot along ``axis``, probabilities as they are."""
    return np.moveaxis(np.eye(k)[t], -1, axis) if np.issubdtype(t.dtype, np.integer) else t


# --------------------------------------------------------------------------- uniform smoothing


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, alpha, kind, reduction",
    list(itertools.product(SHAPES, (0.1, 0.45, 1.0), ("index", "prob"), ("none", "mean"))),
)
def test_smooth_labels_softmax_cross_entropy(request, backend, shape, alpha, kind, reduction):
    """optax.smooth_labels(onehot or p, alpha) + softmax_cross_entropy == xlsce uniform smoothing."""
    x, t, *_, rng = logits_problem(shape, seed=len(shape) * 100 + int(alpha * 100), kind=kind, **PROBLEM)
    probs = _labels(t, shape[-1])
    positions = shape[:-1]
    ct = rng.normal(size=positions) if reduction == "none" else None

    def ref(z):
        return optax.softmax_cross_entropy(z, optax.smooth_labels(jnp.asarray(probs), alpha))

    ref_loss, ref_grad = _once(
        request, "ref_loss", lambda: _optax_value_and_grad(ref, x, reduction, np.ones(positions), ct)
    )
    _check(backend, ref_loss, ref_grad, x, t, ct, label_smoothing=alpha, reduction=reduction)


@pytest.mark.slow
@pytest.mark.parametrize("shape, axis", [((5, 4), -1), ((5, 4), 0), ((2, 3, 4), 1), ((2, 3, 4), 0)])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_smooth_labels_along_any_axis(request, backend, shape, axis, kind):
    x, t, *_, rng = logits_problem(shape, axis, seed=11 + axis, kind=kind, **PROBLEM)
    probs = _labels(t, shape[axis], axis)
    positions = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    ct = rng.normal(size=positions)

    def ref(z):
        labels = optax.smooth_labels(jnp.asarray(probs), 0.2, axis=axis)
        return optax.softmax_cross_entropy(z, labels, axis=axis)

    ref_loss, ref_grad = _once(
        request, "ref_loss", lambda: _optax_value_and_grad(ref, x, "none", np.ones(positions), ct)
    )
    _check(backend, ref_loss, ref_grad, x, t, ct, label_smoothing=0.2, reduction="none", axis=axis)


# --------------------------------------------------------------------------- integer labels


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES + [(4,), (5, 1)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_softmax_cross_entropy_with_integer_labels(request, backend, shape, reduction):
    x, y, *_, rng = logits_problem(shape, seed=sum(shape), **PROBLEM)
    positions = shape[:-1]
    ct = rng.normal(size=positions) if reduction == "none" else None

    def ref(z):
        return optax.softmax_cross_entropy_with_integer_labels(z, jnp.asarray(y))

    ref_loss, ref_grad = _once(
        request, "ref_loss", lambda: _optax_value_and_grad(ref, x, reduction, np.ones(positions), ct)
    )
    _check(backend, ref_loss, ref_grad, x, y, ct, reduction=reduction)


# --------------------------------------------------------------------------- where


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("fn", ["integer_labels", "smooth_labels"])
def test_where_masks_examples(request, backend, shape, reduction, fn):
    """optax's per-example ``where``: masked rows are 0 with zero gradient there; xlsce's are too."""
    x, y, *_, rng = logits_problem(shape, seed=5 * len(shape) + len(fn), **PROBLEM)
    onehot = _labels(y, shape[-1])
    positions = shape[:-1]
    mask = rng.random(positions) < 0.6
    mask.reshape(-1)[:2] = (True, False)  # at least one kept and one masked position
    ct = rng.normal(size=positions) if reduction == "none" else None
    alpha = 0.0 if fn == "integer_labels" else 0.3

    def ref(z):
        if fn == "integer_labels":
            return optax.softmax_cross_entropy_with_integer_labels(z, jnp.asarray(y), where=jnp.asarray(mask))
        labels = optax.smooth_labels(jnp.asarray(onehot), alpha)
        return optax.softmax_cross_entropy(z, labels, where=jnp.asarray(mask))

    # What optax does at masked rows: loss 0 and gradient 0.
    per_row, row_grad = _once(
        request, "per_row", lambda: _optax_value_and_grad(ref, x, "none", mask, np.ones(positions))
    )
    np.testing.assert_array_equal(per_row[~mask], 0.0)
    np.testing.assert_array_equal(row_grad[~mask], 0.0)
    assert np.all(per_row[mask] > 0)

    ref_loss, ref_grad = _once(request, "ref_loss", lambda: _optax_value_and_grad(ref, x, reduction, mask, ct))
    _check(backend, ref_loss, ref_grad, x, y, ct, label_smoothing=alpha, reduction=reduction, where=mask)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_class_where_is_minus_inf_logits(request, backend, kind, alpha):
    """optax's per-class ``where`` (in smooth_labels and softmax_cross_entropy) == xlsce with -inf logits there.

    Both spread the smoothing mass over the classes in play only, alpha / K'.
    """
    rng = np.random.default_rng(21)
    n, k = 5, 4
    x = rng.normal(size=(n, k))
    in_play = rng.random((n, k)) < 0.7
    in_play[:, 0] = True
    in_play[1] = True  # one row with every class in play
    in_play[2, 1:] = False  # one row with a single class in play
    assert (~in_play).sum() >= 3
    if kind == "index":
        y = np.array([rng.choice(np.flatnonzero(row)) for row in in_play])
        t, labels = y, np.eye(k)[y]
    else:
        p = np.where(in_play, np.exp(rng.normal(size=(n, k))), 0.0)
        t = labels = p / p.sum(axis=-1, keepdims=True)
    ct = rng.normal(size=n)

    def ref(z):
        where = jnp.asarray(in_play)
        smoothed = optax.smooth_labels(jnp.asarray(labels), alpha, where=where)
        return optax.softmax_cross_entropy(z, smoothed, where=where)

    ref_loss, ref_grad = _once(request, "ref_loss", lambda: _optax_value_and_grad(ref, x, "none", np.ones(n), ct))
    np.testing.assert_array_equal(ref_grad[~in_play], 0.0)
    _check(backend, ref_loss, ref_grad, np.where(in_play, x, -np.inf), t, ct, label_smoothing=alpha, reduction="none")


# --------------------------------------------------------------------------- exclusive convention


def _fairseq(x, y, eps, ignore_index=None):
    """fairseq's label_smoothed_nll_loss (criterions/label_smoothed_cross_entropy.py), reduce=False, in NumPy.

    lprobs = log_softmax; nll = -lprobs[y]; smooth = -sum_c lprobs_c; eps_i = eps / (V - 1);
    loss = (1 - eps - eps_i) * nll + eps_i * smooth, zeroed where y == ignore_index.
    Its gradient is softmax - q with q = 1 - eps on y and eps_i elsewhere (q sums to 1).
    """
    k = x.shape[-1]
    lp = _log_softmax(x, -1)
    valid = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    ys = np.where(valid, y, 0)
    nll = -np.take_along_axis(lp, ys[..., None], axis=-1)[..., 0]
    smooth = -lp.sum(axis=-1)
    eps_i = eps / (k - 1)
    loss = np.where(valid, (1.0 - eps - eps_i) * nll + eps_i * smooth, 0.0)
    q = np.full(x.shape, eps_i)
    np.put_along_axis(q, ys[..., None], 1.0 - eps, axis=-1)
    grad = np.where(valid[..., None], _softmax(x, -1) - q, 0.0)
    return loss, grad


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(5, 2), (5, 4), (2, 3, 4)])
@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
def test_exclusive_matches_fairseq(backend, shape, eps):
    x, y, *_, rng = logits_problem(shape, seed=shape[-1] + int(10 * eps), **PROBLEM)
    y.reshape(-1)[1] = -100
    loss, grad = _fairseq(x, y, eps, ignore_index=-100)
    ct = rng.normal(size=y.shape)
    _check(backend, loss, grad * ct[..., None], x, y, ct, label_smoothing=eps, smoothing="exclusive", reduction="none")
    # 'sum' as fairseq reduces (reduce=True sums over the tokens that count)
    _check(backend, loss.sum(), grad, x, y, None, label_smoothing=eps, smoothing="exclusive", reduction="sum")


@pytest.mark.parametrize("eps", [0.1, 0.6])
def test_exclusive_soft_targets_by_hand(backend, eps):
    """Soft exclusive convention: q = (1-eps) t + eps (1-t)/(K-1); loss = -sum q log p; grad = p sum(q) - q."""
    x, t, *_, rng = logits_problem((2, 3, 4), seed=3, kind="prob", **PROBLEM)
    k = x.shape[-1]
    q = (1.0 - eps) * t + eps * (1.0 - t) / (k - 1)
    loss = -(q * _log_softmax(x, -1)).sum(axis=-1)
    grad = _softmax(x, -1) * q.sum(axis=-1, keepdims=True) - q
    ct = rng.normal(size=loss.shape)
    _check(backend, loss, grad * ct[..., None], x, t, ct, label_smoothing=eps, smoothing="exclusive", reduction="none")


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_exclusive_equals_uniform_at_rescaled_eps(backend, k, kind, reduction):
    """exclusive(eps) == uniform(eps * K / (K - 1)), with weights and a where mask too."""
    x, t, *_, rng = logits_problem((5, k), seed=k, kind=kind, **PROBLEM)
    X, T = backend.asarray(x), backend.asarray(t)
    where = rng.random(5) < 0.7
    where[0] = True
    kw = dict(weight=backend.asarray(rng.uniform(0.5, 2.0, size=k)), where=backend.asarray(where), reduction=reduction)
    ct = backend.asarray(rng.normal(size=5)) if reduction == "none" else None
    for eps in (0.05, 0.3, (k - 1) / k):
        excl = xlsce.value_and_grad(X, T, cotangent=ct, label_smoothing=eps, smoothing="exclusive", **kw)
        unif = xlsce.value_and_grad(X, T, cotangent=ct, label_smoothing=min(eps * k / (k - 1), 1.0), **kw)
        xp_assert_close(excl[0], unif[0], err_msg=f"loss eps={eps}")
        xp_assert_close(excl[1], unif[1], err_msg=f"gradient eps={eps}")
