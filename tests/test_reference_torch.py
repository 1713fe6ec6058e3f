"""Parity with ``torch.nn.functional.cross_entropy`` (the reference), float64, values and gradients.

Every combination of class weight x ignore_index x label smoothing x reduction x
index/probability targets x input rank ((C,), (N, C), (N, C, d1), (N, C, d1, d2))
is computed once with PyTorch (``F.cross_entropy`` and its autograd gradient) and
compared with xlsce (``axis=1``, or ``axis=0`` unbatched) on every backend of the
``backend`` fixture: the analytic ``xlsce.value_and_grad`` everywhere, plus
``loss.backward()`` on torch and ``jax.vjp`` on JAX (reduction 'none').

Deliberate differences (documented in ``xlsce.cross_entropy``) are checked
against what PyTorch actually does: a 'mean' over no valid position is NaN in
PyTorch and 0 with a zero gradient in xlsce; a negative ε is silently treated
as 0 by PyTorch and is an error in xlsce.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from conftest import xp_assert_close
from problems import logits_problem

import xlsce

torch = pytest.importorskip("torch")
F = torch.nn.functional

K = 4
SHAPES = {  # logits shapes, classes along axis 1 (axis 0 for the unbatched input)
    "C": (K,),
    "NC": (5, K),
    "NCd": (2, K, 3),
    "NCdd": (2, K, 2, 3),
}
WEIGHTS = ("none", "random")
IGNORES = ("none_present", "some_ignored", "custom_value")
EPSILONS = (0.0, 0.1, 0.7, 1.0)
REDUCTIONS = ("none", "sum", "mean")
# The reductions whose gradient is also taken by the library's own autodiff (all, unless listed): jax.vjp with a
# random cotangent on the 'none' cases only, since each new jax call costs XLA compilations on this slow machine;
# jax.vjp == value_and_grad for every reduction is checked in test_cross_backend.py.
VJP_REDUCTIONS = {"jax": ("none",)}

# One test per (rank, weight, ignore, eps, target kind); the three reductions run inside it.
CASES = [
    pytest.param(rank, weight, ignore, eps, "index", id=f"{rank}-w_{weight}-{ignore}-eps{eps}-index")
    for rank, weight, ignore, eps in itertools.product(SHAPES, WEIGHTS, IGNORES, EPSILONS)
] + [
    # ignore_index does not apply to probability targets (PyTorch ignores it; xlsce rejects a non-negative one).
    pytest.param(rank, weight, "none_present", eps, "prob", id=f"{rank}-w_{weight}-eps{eps}-prob")
    for rank, weight, eps in itertools.product(SHAPES, WEIGHTS, EPSILONS)
]


IGNORED = {"none_present": None, "some_ignored": -100, "custom_value": 1}  # the value at the ignored positions


def _case(rank, weight, ignore, eps, reduction, kind):
    """NumPy inputs and keyword arguments for one case (deterministic per case)."""
    shape = SHAPES[rank]
    axis = 0 if len(shape) == 1 else 1
    x, t, w, _, cotangent, _ = logits_problem(
        shape,
        axis,
        seed=zlib.crc32(f"{rank}{weight}{ignore}{eps}{reduction}{kind}".encode()),
        scale=2.0,
        kind=kind,
        # ignore_index does not apply to probability targets; a valid class id used as ignore_index ("custom_value")
        # drops its positions; position 0 always counts, so 'mean' never divides by zero here
        ignore=IGNORED[ignore] if kind == "index" else None,
        weight=(0.2, 3.0) if weight == "random" else None,
        cotangent=reduction == "none",
    )
    kw = dict(label_smoothing=eps, reduction=reduction, weight=w, ignore_index=IGNORED[ignore] or -100)
    return x, t, kw, axis, cotangent


def _torch_reference(x, t, kw, cotangent):
    """PyTorch's loss and its autograd gradient w.r.t. the logits (the reference)."""
    xt = torch.tensor(x, requires_grad=True)
    weight = None if kw["weight"] is None else torch.tensor(kw["weight"])
    loss = F.cross_entropy(
        xt,
        torch.tensor(t),
        weight=weight,
        ignore_index=kw["ignore_index"],
        reduction=kw["reduction"],
        label_smoothing=kw["label_smoothing"],
    )
    g = torch.ones(()) if cotangent is None else torch.tensor(cotangent)
    loss.backward(g.to(loss.dtype))
    return loss.detach().numpy(), xt.grad.numpy()


def _xlsce_results(backend, x, t, kw, axis, cotangent):
    """[(how, loss, dloss/dlogits)] from xlsce on ``backend``: analytic, and native autodiff where there is one."""
    X, T = backend.asarray(x), backend.asarray(t)
    kws = dict(kw, axis=axis, weight=None if kw["weight"] is None else backend.asarray(kw["weight"]))
    ct = None if cotangent is None else backend.asarray(cotangent)
    loss, grad = xlsce.value_and_grad(X, T, cotangent=ct, **kws)
    out = [("value_and_grad", loss, grad)]
    if backend.vjp is not None and kw["reduction"] in VJP_REDUCTIONS.get(backend.name, REDUCTIONS):
        out.append((backend.vjp_name, *backend.vjp(lambda z: xlsce.cross_entropy(z, T, **kws), X, ct)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rank, weight, ignore, eps, kind", CASES)
def test_matches_torch(backend, rank, weight, ignore, eps, kind):
    for reduction in REDUCTIONS:
        x, t, kw, axis, cotangent = _case(rank, weight, ignore, eps, reduction, kind)
        ref_loss, ref_grad = _torch_reference(x, t, kw, cotangent)
        assert np.all(np.isfinite(ref_loss)) and np.all(np.isfinite(ref_grad))
        for how, loss, grad in _xlsce_results(backend, x, t, kw, axis, cotangent):
            assert tuple(loss.shape) == ref_loss.shape, how
            assert tuple(grad.shape) == x.shape, how
            xp_assert_close(loss, ref_loss, err_msg=f"loss ({how}, reduction={reduction})")
            xp_assert_close(grad, ref_grad, err_msg=f"gradient ({how}, reduction={reduction})")


def test_cases_cover_the_grid():
    """The grid really holds every combination (guards against a silently shrunken parametrization)."""
    n_index = len(SHAPES) * len(WEIGHTS) * len(IGNORES) * len(EPSILONS)
    n_prob = len(SHAPES) * len(WEIGHTS) * len(EPSILONS)
    assert len(CASES) == n_index + n_prob == 128
    assert len(REDUCTIONS) == 3


# --------------------------------------------------------------------------- deliberate differences


NOTHING_CASES = [
    (how, weight, eps)
    for how, weight, eps in itertools.product(
        ("all_ignored", "custom_ignore_all", "zero_class_weights", "empty_batch"), (False, True), (0.0, 0.3)
    )
    if weight or how != "zero_class_weights"  # a zero denominator from class weights needs weights
]


@pytest.mark.slow
@pytest.mark.parametrize("how, weight, eps", NOTHING_CASES)
def test_mean_over_nothing_is_zero_where_torch_gives_nan(backend, how, weight, eps):
    rng = np.random.default_rng(7)
    n = 0 if how == "empty_batch" else 3
    x = rng.normal(size=(n, K, 2))
    w = rng.uniform(0.5, 2.0, size=K) if weight else None
    ignore_index = -100
    if how == "all_ignored":
        t = np.full((n, 2), -100, dtype=np.int64)
    elif how == "custom_ignore_all":
        t = np.full((n, 2), 2, dtype=np.int64)
        ignore_index = 2
    elif how == "zero_class_weights":  # every valid target's class weighs 0: the denominator sum_i w[y_i] is 0
        t = np.array([[0, -100], [1, 1], [-100, 0]], dtype=np.int64)
        w = np.array([0.0, 0.0, 1.5, 2.0])
    else:
        t = np.zeros((0, 2), dtype=np.int64)

    xt = torch.tensor(x, requires_grad=True)
    ref = F.cross_entropy(
        xt,
        torch.tensor(t),
        weight=None if w is None else torch.tensor(w),
        ignore_index=ignore_index,
        label_smoothing=eps,
    )
    assert torch.isnan(ref), "PyTorch gives NaN for a mean over nothing"

    kw = dict(label_smoothing=eps, ignore_index=ignore_index, weight=w, reduction="mean")
    for how_, loss, grad in _xlsce_results(backend, x, t, kw, 1, None):
        assert tuple(loss.shape) == ()
        xp_assert_close(loss, np.zeros(()), rtol=0, atol=0, err_msg=f"loss ({how_})")
        xp_assert_close(grad, np.zeros_like(x), rtol=0, atol=0, err_msg=f"gradient ({how_})")


def test_negative_label_smoothing_raises_where_torch_ignores_it(backend):
    rng = np.random.default_rng(3)
    x, t = rng.normal(size=(3, K)), np.array([0, 1, 3])
    # PyTorch silently treats a negative epsilon as 0 ...
    torch.testing.assert_close(
        F.cross_entropy(torch.tensor(x), torch.tensor(t), label_smoothing=-0.1),
        F.cross_entropy(torch.tensor(x), torch.tensor(t)),
    )
    # ... xlsce refuses it, naming the argument.
    with pytest.raises(ValueError, match="label_smoothing"):
        xlsce.cross_entropy(backend.asarray(x), backend.asarray(t), axis=1, label_smoothing=-0.1)
