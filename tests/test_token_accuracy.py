"""return_token_accuracy: argmax == target over the counted positions, on every backend.

The reference is written here from the definition (Liger-Kernel's ``return_token_accuracy``):
per position ``hit_i = [argmax_c z_ic == y_i]`` (the first maximum, as ``np.argmax``), 0 where the
position does not count (``ignore_index``, ``where=False``); ``"none"`` returns ``hit``, ``"sum"``
and ``"mean"`` the fraction ``sum_i hit_i / #counted`` (unweighted; 0 when nothing counts).
"""

from __future__ import annotations

import numpy as np
import pytest

import xlsce


def reference(logits, target, *, axis=-1, ignore_index=-100, where=None, reduction="mean", softcap=None):
    z = np.moveaxis(np.asarray(logits, dtype=np.float64), axis, -1)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    counted = target != ignore_index
    if where is not None:
        counted &= where
    hit = (np.argmax(z, axis=-1) == target) & counted
    if reduction == "none":
        return hit.astype(np.float64)
    n = counted.sum()
    return hit.sum() / n if n else 0.0


def _problem(seed=0, n=37, k=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k))
    target = rng.integers(0, k, size=n)
    # a third of the positions made right: their target gets the largest logit
    right = rng.random(n) < 0.35
    logits[right, target[right]] = logits[right].max(axis=1) + 1.0
    target[rng.random(n) < 0.2] = -100
    where = rng.random(n) < 0.8
    return logits, target, where


CASES = {
    "plain": dict(),
    "ignore": dict(ignore=True),
    "where": dict(ignore=True, where=True),
    "smoothing-weight-zloss": dict(ignore=True, label_smoothing=0.1, weight=True, z_loss=0.01),
    "softcap": dict(ignore=True, softcap=1.5),
}


def _args(backend, case, reduction, seed=0):
    logits, target, where = _problem(seed)
    if not case.get("ignore"):
        target = np.where(target == -100, 0, target)
    kw = {k: v for k, v in case.items() if k not in ("ignore", "where", "weight")}
    ref_kw = {"softcap": case.get("softcap"), "reduction": reduction}
    if case.get("where"):
        kw["where"] = backend.asarray(where)
        ref_kw["where"] = where
    if case.get("weight"):
        kw["weight"] = backend.asarray(np.linspace(0.5, 2.0, logits.shape[1]))
    return logits, target, kw, ref_kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_cross_entropy_accuracy(backend, case, reduction):
    logits, target, kw, ref_kw = _args(backend, CASES[case], reduction)
    z, y = backend.asarray(logits), backend.asarray(target)
    loss, acc = xlsce.cross_entropy(z, y, reduction=reduction, return_token_accuracy=True, **kw)
    expected = reference(logits, target, **ref_kw)
    np.testing.assert_allclose(backend.to_numpy(acc), expected, rtol=1e-12, atol=0)
    assert tuple(acc.shape) == (() if reduction != "none" else target.shape)
    assert str(acc.dtype).endswith("float64")
    # the loss is the loss without the flag
    np.testing.assert_allclose(
        backend.to_numpy(loss), backend.to_numpy(xlsce.cross_entropy(z, y, reduction=reduction, **kw)), rtol=1e-12
    )


def test_outputs_order_with_lse(backend):
    logits, target, _ = _problem(1)
    z, y = backend.asarray(logits), backend.asarray(target)
    loss, lse, acc = xlsce.cross_entropy(z, y, return_lse=True, return_token_accuracy=True)
    np.testing.assert_allclose(backend.to_numpy(lse), np.log(np.exp(logits).sum(axis=1)), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(acc), reference(logits, target), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(loss), backend.to_numpy(xlsce.cross_entropy(z, y)), rtol=1e-12)


def test_class_axis_and_batch_dims(backend):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 5, 4))  # classes along axis 1, positions (3, 4)
    target = rng.integers(0, 5, size=(3, 4))
    z, y = backend.asarray(logits), backend.asarray(target)
    _, acc = xlsce.cross_entropy(z, y, axis=1, reduction="none", return_token_accuracy=True)
    np.testing.assert_array_equal(backend.to_numpy(acc), reference(logits, target, axis=1, reduction="none"))


def test_ties_take_the_first_maximum(backend):
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 5.0]])
    target = np.array([2, 0, 1])  # a tie lost (argmax 1), a tie won (first of four), a tie won (first of two)
    _, acc = xlsce.cross_entropy(
        backend.asarray(logits), backend.asarray(target), reduction="none", return_token_accuracy=True
    )
    np.testing.assert_array_equal(backend.to_numpy(acc), [0.0, 1.0, 1.0])


def test_nothing_counts_gives_zero(backend):
    logits = np.zeros((3, 4))
    target = np.full(3, -100)
    for reduction in ("mean", "sum"):
        _, acc = xlsce.cross_entropy(
            backend.asarray(logits), backend.asarray(target), reduction=reduction, return_token_accuracy=True
        )
        assert float(backend.to_numpy(acc)) == 0.0


def test_float32_logits_give_float32_accuracy(backend):
    logits, target, _ = _problem(3)
    z = backend.astype(backend.asarray(logits), "float32")
    _, acc = xlsce.cross_entropy(z, backend.asarray(target), return_token_accuracy=True)
    assert str(acc.dtype).endswith("float32")
    np.testing.assert_allclose(backend.to_numpy(acc), reference(logits.astype(np.float32), target), rtol=1e-6)


def test_no_gradient_through_accuracy():
    torch = pytest.importorskip("torch")
    logits, target, _ = _problem(4)
    z = torch.tensor(logits, requires_grad=True)
    loss, acc = xlsce.cross_entropy(z, torch.tensor(target), return_token_accuracy=True)
    assert not acc.requires_grad
    (grad,) = torch.autograd.grad(loss, z)
    (expected,) = torch.autograd.grad(xlsce.cross_entropy(z, torch.tensor(target)), z)
    torch.testing.assert_close(grad, expected)


def test_jax_jit_and_grad():
    jax = pytest.importorskip("jax")
    logits, target, where = _problem(5)
    z, y, m = jax.numpy.asarray(logits), jax.numpy.asarray(target), jax.numpy.asarray(where)

    def f(z):
        loss, acc = xlsce.cross_entropy(z, y, where=m, return_token_accuracy=True)
        return loss, acc

    (loss, acc), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(z)
    np.testing.assert_allclose(acc, reference(logits, target, where=where), rtol=1e-12)
    np.testing.assert_allclose(grad, jax.grad(lambda z: xlsce.cross_entropy(z, y, where=m))(z), rtol=1e-12)


def test_probability_targets_refused(backend):
    logits, _, _ = _problem(6)
    probs = np.full(logits.shape, 1.0 / logits.shape[1])
    with pytest.raises(ValueError, match="return_token_accuracy"):
        xlsce.cross_entropy(backend.asarray(logits), backend.asarray(probs), return_token_accuracy=True)


def test_not_a_bool_refused(backend):
    logits, target, _ = _problem(7)
    with pytest.raises(TypeError, match="return_token_accuracy"):
        xlsce.cross_entropy(backend.asarray(logits), backend.asarray(target), return_token_accuracy=1)
