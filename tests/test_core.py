"""The worked example derived by hand, edge cases and bad input, on every backend."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import Backend, xp_assert_close
from problems import logits_problem

import xlsce

# ---------------------------------------------------------------- worked example, by hand
#
# logits log([1, 2, 5]) and log([3, 3, 2]): softmax is exactly [1, 2, 5]/8 and [3, 3, 2]/8.
# Targets 2 and 0.  With K = 3 and eps = 0.1:
#   uniform   q = 0.9 * onehot + 0.1/3           -> target 0.9333.., others 0.0333..
#   exclusive q = 0.9 on the target, 0.05 elsewhere
# loss_i = -sum_c q_c log p_c, mean over the 2 samples; gradient (p - q) / 2.

P = np.array([[1.0, 2.0, 5.0], [3.0, 3.0, 2.0]]) / 8
LOGITS = np.log(P * 8)
TARGET = np.array([2, 0])


def _hand(q):
    loss = (
        -(sum(q[0, c] * math.log(P[0, c]) for c in range(3)) + sum(q[1, c] * math.log(P[1, c]) for c in range(3))) / 2
    )
    return loss, (P - q) / 2


HAND = {
    ("uniform", 0.0): _hand(np.array([[0, 0, 1.0], [1.0, 0, 0]])),
    ("uniform", 0.1): _hand(np.array([[1, 1, 28.0], [28.0, 1, 1]]) / 30),
    ("exclusive", 0.1): _hand(np.array([[0.05, 0.05, 0.9], [0.9, 0.05, 0.05]])),
}


def test_hand_values_are_what_they_claim():
    # standard CE is (log(8/5) + log(8/3)) / 2: a check on the derivation itself
    assert HAND[("uniform", 0.0)][0] == pytest.approx((math.log(8 / 5) + math.log(8 / 3)) / 2, rel=1e-15)


@pytest.mark.parametrize(("smoothing", "eps"), list(HAND))
def test_worked_example(backend, smoothing, eps):
    loss, grad = xlsce.value_and_grad(
        backend.asarray(LOGITS), backend.asarray(TARGET), label_smoothing=eps, smoothing=smoothing
    )
    expected_loss, expected_grad = HAND[(smoothing, eps)]
    xp_assert_close(loss, expected_loss, rtol=1e-14)
    xp_assert_close(grad, expected_grad, atol=1e-15)
    xp_assert_close(
        xlsce.cross_entropy(backend.asarray(LOGITS), backend.asarray(TARGET), label_smoothing=eps, smoothing=smoothing),
        expected_loss,
        rtol=1e-14,
    )


@pytest.mark.slow
def test_main_job_runs():
    out = subprocess.run([sys.executable, "-m", "xlsce"], capture_output=True, text=True, check=True).stdout
    assert "largest disagreement" in out and "exclusive" in out


def test_import_does_not_import_frameworks():
    code = "import sys, xlsce; xlsce.CrossEntropyLoss(); assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- edge cases


def test_k_equals_one(backend):
    # one class: q = 1 whatever eps (uniform), the loss and gradient are 0
    z = backend.asarray(np.array([[3.0], [-2.0]]))
    y = backend.asarray(np.array([0, 0]))
    loss, grad = xlsce.value_and_grad(z, y, label_smoothing=0.3)
    xp_assert_close(loss, 0.0)
    xp_assert_close(grad, np.zeros((2, 1)))
    with pytest.raises(ValueError, match="exclusive"):
        xlsce.cross_entropy(z, y, smoothing="exclusive", label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(backend, reduction):
    z = backend.asarray(np.zeros((0, 4)))
    y = backend.asarray(np.zeros((0,), dtype=np.int64))
    loss, grad = xlsce.value_and_grad(z, y, label_smoothing=0.1, reduction=reduction)
    assert tuple(grad.shape) == (0, 4)
    if reduction == "none":
        assert tuple(loss.shape) == (0,)
    else:
        xp_assert_close(loss, 0.0)


@pytest.mark.parametrize("how", ["ignore_index", "where", "zero_weight"])
def test_mean_over_nothing_is_zero(backend, how):
    z = backend.asarray(np.random.default_rng(0).normal(size=(3, 4)))
    kw = {"label_smoothing": 0.2}
    if how == "ignore_index":
        y = backend.asarray(np.array([-100, -100, -100]))
    else:
        y = backend.asarray(np.array([0, 1, 0]))
        if how == "where":
            kw["where"] = backend.asarray(np.zeros(3, dtype=bool))
        else:
            kw["weight"] = backend.asarray(np.array([0.0, 0.0, 1.0, 1.0]))
    loss, grad = xlsce.value_and_grad(z, y, **kw)
    xp_assert_close(loss, 0.0)
    xp_assert_close(grad, np.zeros((3, 4)))


def test_where_is_ignore_index(backend):
    rng = np.random.default_rng(1)
    z = backend.asarray(rng.normal(size=(6, 5)))
    y = np.array([0, 1, 2, 3, 4, 0])
    mask = np.array([True, False, True, True, False, True])
    kw = {"label_smoothing": 0.1, "weight": backend.asarray(rng.uniform(0.5, 2, size=5))}
    by_where = xlsce.value_and_grad(z, backend.asarray(y), where=backend.asarray(mask), **kw)
    by_index = xlsce.value_and_grad(z, backend.asarray(np.where(mask, y, -100)), **kw)
    for a, b in zip(by_where, by_index, strict=True):
        xp_assert_close(a, b, rtol=1e-14)


@pytest.mark.parametrize("smoothing", ["uniform", "exclusive"])
def test_huge_logits_are_exact(backend, smoothing):
    # Shifting every logit by a constant changes nothing; a naive exp overflows at 1e4.
    base = np.array([[0.0, -1.0, -3.0, 2.0], [1.0, 0.5, 0.25, 0.0]])
    y = backend.asarray(np.array([1, 3]))
    ref = xlsce.value_and_grad(backend.asarray(base), y, label_smoothing=0.1, smoothing=smoothing)
    for shift in (1e4, -1e4, 1e6):
        out = xlsce.value_and_grad(backend.asarray(base + shift), y, label_smoothing=0.1, smoothing=smoothing)
        xp_assert_close(out[0], ref[0], rtol=1e-9)
        xp_assert_close(out[1], ref[1], atol=1e-10)


def test_huge_logits_by_hand(backend):
    # logits (1e4, -1e4, 0), target 1: lse = 1e4 (the other terms are < e^-10000), so -lp = (0, 2e4, 1e4)
    # uniform eps = 0.3: 0.7 * 2e4 + 0.1 * (0 + 2e4 + 1e4) = 17000
    for dtype in (np.float32, np.float64):
        z = backend.asarray(np.array([[1e4, -1e4, 0.0]], dtype=dtype))
        loss, grad = xlsce.value_and_grad(z, backend.asarray(np.array([1])), label_smoothing=0.3)
        xp_assert_close(loss, 17000.0, rtol=1e-7)
        # softmax is (1, 0, 0): gradient (1, 0, 0) - (0.1, 0.8, 0.1)
        xp_assert_close(grad, np.array([[0.9, -0.8, -0.1]]), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("offset, bound", [(0.0, 2e-7), (1e3, 2e-6), (1e4, 3e-5)])
def test_jax_float32_smoothing_sum_precision(offset, bound):
    # Under JAX the smoothing sum is taken over the unshifted logits (faster fusions on XLA's CPU backend),
    # so float32 loses about K * 2**-24 * |z| there: the documented bound, relative to the loss, against
    # float64.  Eager NumPy shifts by the row max first and stays at float32 rounding (~1e-7).
    jax = pytest.importorskip("jax")
    rng = np.random.default_rng(31)
    z = (offset + rng.normal(size=(32, 32768))).astype(np.float32)
    y = rng.integers(0, 32768, size=32)
    want = xlsce.cross_entropy(z.astype(np.float64), y, label_smoothing=0.1, reduction="none")
    got = jax.jit(lambda z, y: xlsce.cross_entropy(z, y, label_smoothing=0.1, reduction="none"))(z, y)
    assert np.max(np.abs(np.asarray(got, dtype=np.float64) - want) / want) <= bound
    eager = xlsce.cross_entropy(z, y, label_smoothing=0.1, reduction="none")
    assert np.max(np.abs(eager.astype(np.float64) - want) / want) <= 2e-7


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("inside", [False, True])
def test_jax_value_and_grad_keeps_no_logits_sized_residual(dtype, weighted, inside):
    # jit(value_and_grad) allocates, besides its arguments and the returned gradient, in units of the
    # float32 logits' size N*K*4: float32 logits passed in need no (N, K) temporary (the gradient has its
    # own buffer); logits computed inside the function (h @ W, as in a model) are one, which the gradient
    # may reuse; bfloat16 logits add one float32 buffer.  A second one would be an (N, K) residual kept
    # between the forward and the backward, which xlsce promises not to keep.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    n, k, h = 256, 4096, 64
    dt = jnp.dtype(dtype)
    z_or_h = jax.ShapeDtypeStruct((n, h) if inside else (n, k), dt)
    args = [z_or_h, jax.ShapeDtypeStruct((h, k), dt), jax.ShapeDtypeStruct((n,), jnp.int32)]
    args.append(jax.ShapeDtypeStruct((k,), dt) if weighted else None)

    def f(x, proj, y, w):
        return xlsce.cross_entropy(x @ proj if inside else x, y, label_smoothing=0.1, weight=w)

    mem = jax.jit(jax.value_and_grad(f)).lower(*args).compile().memory_analysis()
    if mem is None:
        pytest.skip("this jaxlib reports no memory analysis")
    most = (0.25 if dtype == "float32" else 1.25) + (1.0 if inside else 0.0)
    assert mem.temp_size_in_bytes <= most * n * k * 4, mem


@pytest.mark.parametrize(
    ("smoothing", "q_target", "q_other"),
    [("uniform", 0.95, 0.05), ("exclusive", 0.9, 0.1)],
)
def test_minus_inf_logit_is_out_of_play(backend, smoothing, q_target, q_other):
    # logits (0, -inf, 0), target 0, eps 0.1: two classes in play with p = (1/2, 0, 1/2).
    # uniform gives eps/2 to each class in play; exclusive gives eps/(2-1) to the other one.
    z = backend.asarray(np.array([[0.0, -np.inf, 0.0]]))
    y = backend.asarray(np.array([0]))
    loss, grad = xlsce.value_and_grad(z, y, label_smoothing=0.1, smoothing=smoothing)
    xp_assert_close(loss, math.log(2), rtol=1e-14)
    xp_assert_close(grad, np.array([[0.5 - q_target, 0.0, 0.5 - q_other]]), atol=1e-15)


def test_minus_inf_never_nan(backend):
    z = np.array(
        [
            [0.0, -np.inf, 1.0],  # target in play
            [-np.inf, 0.0, 1.0],  # target -inf: infinite loss
            [-np.inf, -np.inf, -np.inf],  # nothing in play, ignored
            [-np.inf, -np.inf, -np.inf],  # nothing in play, counted: infinite loss
            [2.0, -np.inf, -np.inf],  # only the target in play: loss 0
        ]
    )
    y = np.array([2, 0, -100, 1, 0])
    w = np.array([1.0, 2.0, 0.5])
    for smoothing in ("uniform", "exclusive"):
        for weight in (None, backend.asarray(w)):
            loss, grad = xlsce.value_and_grad(
                backend.asarray(z),
                backend.asarray(y),
                label_smoothing=0.2,
                smoothing=smoothing,
                weight=weight,
                reduction="none",
                z_loss=1e-3,
            )
            loss, grad = backend.to_numpy(loss), backend.to_numpy(grad)
            assert not np.isnan(loss).any() and not np.isnan(grad).any()
            assert np.isfinite(loss[[0, 2, 4]]).all() and loss[2] == 0
            assert loss[1] == np.inf and loss[3] == np.inf
            assert loss[4] == pytest.approx(1e-3 * 4.0)  # z-loss only: lse = 2
            # classes out of play get no gradient; a -inf *target* keeps the limit -a*w_y of its gradient
            out_of_play = np.isinf(z)
            out_of_play[[1, 3], [0, 1]] = False
            assert (grad[out_of_play] == 0).all()
            assert np.all(grad[[1, 3], [0, 1]] < 0)


@pytest.mark.slow
@pytest.mark.skip_xp_backend("array_api_strict", reason="the array API has no half-precision dtypes")
@pytest.mark.parametrize(
    "dtype",
    [
        "float16",
        pytest.param(
            "bfloat16", marks=pytest.mark.skip_xp_backend("numpy", "numpy_readonly", reason="NumPy has no bfloat16")
        ),
    ],
)
def test_half_precision(backend, dtype):
    rng = np.random.default_rng(2)
    x64 = rng.normal(scale=4, size=(64, 50))
    y = backend.asarray(rng.integers(0, 50, size=64))
    x = backend.astype(backend.asarray(x64), dtype)
    x_rounded = backend.to_numpy(backend.astype(x, "float32")).astype(np.float64)
    loss, grad = xlsce.value_and_grad(x, y, label_smoothing=0.1, reduction="sum")
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    ref_loss, ref_grad = xlsce.value_and_grad(
        backend.asarray(x_rounded), y, label_smoothing=0.1, reduction="sum"
    )  # the same logits in float64: only the output rounding differs
    rtol = 1e-2 if dtype == "bfloat16" else 1e-3
    xp_assert_close(backend.astype(loss, "float32"), ref_loss, rtol=rtol)
    xp_assert_close(backend.astype(grad, "float32"), ref_grad, atol=rtol)


@pytest.mark.skip_xp_backend("array_api_strict", reason="the array API has no float16")
def test_half_precision_mean_does_not_overflow_internally(backend):
    # 8192 positions of loss ~ 10: their sum (~8e4) exceeds float16's max 65504; it stays in float32 inside.
    x = np.zeros((8192, 8))
    x[:, 0] = 10.0
    y = backend.asarray(np.full(8192, 1))
    xh = backend.asarray(x.astype(np.float16))
    mean = xlsce.cross_entropy(xh, y)
    xp_assert_close(backend.astype(mean, "float32"), 10.0 + math.log1p(7 * math.exp(-10)), rtol=1e-3)


# ---------------------------------------------------------------- bad input


def _inputs(backend):
    x, t, *_ = logits_problem((4, 3), seed=3, pin_first=False)
    return backend.asarray(x), backend.asarray(t)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"label_smoothing": float("nan")}, ValueError, "label_smoothing"),
        ({"label_smoothing": "0.1"}, TypeError, "label_smoothing"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"smoothing": "fairseq"}, ValueError, "smoothing"),
        ({"axis": 2}, ValueError, "axis"),
        ({"axis": 1.0}, ValueError, "axis"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"z_loss": -1.0}, ValueError, "z_loss"),
        ({"softcap": 0.0}, ValueError, "softcap"),
    ],
)
def test_bad_settings(backend, kwargs, error, match):
    z, y = _inputs(backend)
    with pytest.raises(error, match=match):
        xlsce.cross_entropy(z, y, **kwargs)
    with pytest.raises(error, match=match):
        xlsce.value_and_grad(z, y, **kwargs)


@pytest.mark.parametrize(
    ("target", "ignore_index", "ok"),
    [
        ([0, -100, 2, -100], -100, True),  # the default ignore_index among the targets
        ([0, -100, -1, 2], -100, False),  # a negative index besides it
        ([0, -100, 3, 2], -100, False),  # an index too large besides it
        ([0, 3, 2, 3], 3, True),  # ignore_index at K (the largest value)
        ([0, 3, 4, 2], 3, False),
        ([-1, 3, 2, 3], 3, False),
        ([0, 1, -7, 2], -7, True),
    ],
)
def test_ignore_index_among_targets_range_check(backend, target, ignore_index, ok):
    """Class indices are checked with ignore_index's entries left out, on either side of [0, K)."""
    z, _ = _inputs(backend)
    y = backend.asarray(np.array(target))
    if ok:
        value = backend.to_numpy(xlsce.cross_entropy(z, y, ignore_index=ignore_index, reduction="none"))
        kept = np.array(target) != ignore_index
        assert np.all(value[~kept] == 0) and np.all(np.isfinite(value)) and np.all(value[kept] > 0)
    else:
        with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
            xlsce.cross_entropy(z, y, ignore_index=ignore_index)


def test_bad_arrays(backend):
    z, y = _inputs(backend)
    a = backend.asarray
    with pytest.raises(ValueError, match="target of class indices must have"):
        xlsce.cross_entropy(z, a(np.zeros(5, dtype=np.int64)))
    with pytest.raises(ValueError, match="target of class probabilities must have"):
        xlsce.cross_entropy(z, a(np.full((4, 2), 0.5)))
    with pytest.raises(TypeError, match="logits must have a real floating dtype"):
        xlsce.cross_entropy(a(np.zeros((4, 3), dtype=np.int64)), y)
    with pytest.raises(ValueError, match="at least one dimension"):
        xlsce.cross_entropy(a(np.float64(1.0)), y)
    with pytest.raises(TypeError, match="target must hold integer class indices or floating probabilities"):
        xlsce.cross_entropy(z, a(np.zeros(4, dtype=bool)))
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        xlsce.cross_entropy(z, a(np.array([0, 1, 3, 0])))
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        xlsce.cross_entropy(z, a(np.array([0, 1, -1, 0])))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        xlsce.cross_entropy(z, y, weight=a(np.ones(4)))
    with pytest.raises(TypeError, match="weight must have a real floating dtype"):
        xlsce.cross_entropy(z, y, weight=a(np.ones(3, dtype=np.int64)))
    with pytest.raises(TypeError, match="where must be a boolean"):
        xlsce.cross_entropy(z, y, where=a(np.ones(4)))
    with pytest.raises(ValueError, match="where must have the shape"):
        xlsce.cross_entropy(z, y, where=a(np.ones(3, dtype=bool)))
    with pytest.raises(ValueError, match="ignore_index is not supported with probability targets"):
        xlsce.cross_entropy(z, a(np.full((4, 3), 1 / 3)), ignore_index=0)
    with pytest.raises(TypeError, match="logits must be an array"):
        xlsce.cross_entropy([[0.0, 1.0]], y)
    with pytest.raises(ValueError, match="cotangent"):
        xlsce.value_and_grad(z, y, reduction="none", cotangent=a(np.ones(3)))


@pytest.mark.parametrize("soft", [False, True])
def test_empty_class_axis_is_refused(backend, soft):
    """No classes: xlsce's ValueError naming the class axis, not a reduction's error from inside (issue 18)."""
    a = backend.asarray
    t = a(np.zeros((5, 0))) if soft else a(np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match=r"logits must have at least one class along axis 1 \(shape \(5, 0\)\)"):
        xlsce.cross_entropy(a(np.zeros((5, 0))), t, axis=1)
    with pytest.raises(ValueError, match="at least one class"):
        xlsce.value_and_grad(a(np.zeros((5, 0))), t, axis=-1)


def test_none_arrays_are_refused(backend):
    """None where an array is required: a TypeError that names the argument (not an AttributeError)."""
    z, y = _inputs(backend)
    with pytest.raises(TypeError, match="logits must be an array of an array-API library, got NoneType"):
        xlsce.cross_entropy(None, y)
    with pytest.raises(TypeError, match="target must be an array of an array-API library, got NoneType"):
        xlsce.value_and_grad(z, None)
    h, w = backend.asarray(np.zeros((4, 2))), backend.asarray(np.zeros((3, 2)))
    with pytest.raises(TypeError, match="hidden must be an array of an array-API library, got NoneType"):
        xlsce.linear_cross_entropy(None, w, y)
    with pytest.raises(TypeError, match="classifier must be an array of an array-API library, got NoneType"):
        xlsce.linear_cross_entropy(h, None, y)


def test_out_of_range_allowed_where_masked(backend):
    z, _ = _inputs(backend)
    a = backend.asarray
    y = a(np.array([0, 7, 2, -5]))
    loss = xlsce.cross_entropy(z, y, where=a(np.array([True, False, True, False])))
    ref = xlsce.cross_entropy(z, a(np.array([0, -100, 2, -100])))
    xp_assert_close(loss, ref, rtol=1e-15)


def test_mixed_libraries():
    torch = pytest.importorskip("torch")
    z = np.zeros((2, 3))
    with pytest.raises(TypeError, match="one array library"):
        xlsce.cross_entropy(z, torch.tensor([0, 1]))


def test_weight_requiring_grad_is_refused():
    torch = pytest.importorskip("torch")
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="weight must not require grad"):
        xlsce.cross_entropy(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]), weight=w)


def test_loss_object(backend):
    z, y = _inputs(backend)
    fn = xlsce.CrossEntropyLoss(label_smoothing=0.1, smoothing="exclusive")
    xp_assert_close(fn(z, y), xlsce.cross_entropy(z, y, label_smoothing=0.1, smoothing="exclusive"), rtol=1e-15)
    xp_assert_close(
        fn.value_and_grad(z, y)[1], xlsce.value_and_grad(z, y, label_smoothing=0.1, smoothing="exclusive")[1]
    )
    with pytest.raises(TypeError, match="unknown keywords"):
        xlsce.CrossEntropyLoss(label_smothing=0.1)


# ---------------------------------------------------------------- blocked evaluation (eager numpy / torch)


@pytest.mark.skip_xp_backend("array_api_strict", reason="the reference: array_api_strict never evaluates by blocks")
@pytest.mark.skip_xp_backend("jax", reason="JAX never evaluates by blocks")
@pytest.mark.parametrize(
    "kwargs",
    [
        {"label_smoothing": 0.1},
        {"label_smoothing": 0.3, "smoothing": "exclusive", "weighted": True, "reduction": "none"},
        {"label_smoothing": 0.2, "soft": True, "weighted": True},
        {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 5.0, "reduction": "sum"},
        {"label_smoothing": 0.1, "minus_inf": True, "weighted": True},
        {"label_smoothing": 0.1, "smoothing": "exclusive", "minus_inf": True, "soft": True},
        {"label_smoothing": 0.1, "minus_inf": True, "kdim": True, "reduction": "none"},
    ],
)
def test_blocked_equals_whole(monkeypatch, backend, kwargs):
    """Eager NumPy and torch evaluate blocks of positions; array_api_strict never does. Same numbers."""
    import xlsce.backends.generic

    monkeypatch.setattr(xlsce.backends.generic, "BLOCK_ELEMENTS", 20)  # blocks of 3 rows of 7 classes
    kwargs = dict(kwargs)
    soft, weighted, minus_inf, kdim = (kwargs.pop(k, False) for k in ("soft", "weighted", "minus_inf", "kdim"))
    rng = np.random.default_rng(5)
    shape, axis = ((10, 7, 2), 1) if kdim else ((10, 7), -1)
    z = rng.normal(scale=3, size=shape)
    if minus_inf:
        z[4, 2] = -np.inf  # in one block only
        z[9, 5] = -np.inf
    positions = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    if soft:
        t = rng.dirichlet(np.ones(7), size=positions)
        t = np.moveaxis(t, -1, axis)
        if minus_inf:
            t = np.where(np.isinf(z), 0.0, t)
    else:
        t = rng.integers(0, 7, size=positions)
        t[(0,) * len(positions)] = -100
        if minus_inf:
            t[(4,) + (0,) * (len(positions) - 1)] = 0
    if weighted:
        kwargs["weight"] = rng.uniform(0.5, 2.0, size=7)
    cot = rng.normal(size=positions) if kwargs.get("reduction") == "none" else None
    results = {}
    for b in (Backend("array_api_strict"), backend):
        a = b.asarray
        kw = {k: (a(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
        results[b.name] = xlsce.value_and_grad(a(z), a(t), axis=axis, cotangent=None if cot is None else a(cot), **kw)
    for got, want in zip(results[backend.name], results["array_api_strict"], strict=True):
        xp_assert_close(got, want, rtol=1e-12, atol=1e-14)
    # torch autograd's two-pass backward, by blocks too (SMALL_LOGITS = 0: not the gradient kept from the forward)
    if backend.vjp is not None:
        monkeypatch.setattr(xlsce.backends.generic, "SMALL_LOGITS", 0)
        loss, grad = backend.vjp(
            lambda zt: xlsce.cross_entropy(zt, a(t), axis=axis, **kw), a(z), None if cot is None else a(cot)
        )
        xp_assert_close(loss, results["array_api_strict"][0], rtol=1e-12, atol=1e-14)
        xp_assert_close(grad, results["array_api_strict"][1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("weighted", [False, True])
def test_blocked_half_precision_value_and_grad(monkeypatch, weighted):
    # bfloat16 logits, computed in float32 block by block: the fused value_and_grad writes each block's
    # gradient into a bfloat16 output (a copy, not in place), and equals autograd's and the unblocked result.
    torch = pytest.importorskip("torch")
    import xlsce.backends.generic

    rng = np.random.default_rng(32)
    z = torch.from_numpy(rng.normal(scale=3, size=(10, 7))).to(torch.bfloat16)
    y = torch.from_numpy(rng.integers(0, 7, size=10))
    y[3] = -100
    kw = dict(label_smoothing=0.1, weight=torch.from_numpy(rng.uniform(0.5, 2, size=7)).float() if weighted else None)
    whole = xlsce.value_and_grad(z, y, **kw)
    monkeypatch.setattr(xlsce.backends.generic, "BLOCK_ELEMENTS", 20)  # blocks of 2 rows of 7 classes
    blocked = xlsce.value_and_grad(z, y, **kw)
    zr = z.clone().requires_grad_()
    loss = xlsce.cross_entropy(zr, y, **kw)
    loss.backward()
    assert blocked[1].dtype == torch.bfloat16 and blocked[0].dtype == torch.bfloat16
    for got, want in ((blocked[0], whole[0]), (blocked[1], whole[1]), (blocked[1], zr.grad)):
        xp_assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("weighted", [False, True])
def test_blocked_numpy_float16(monkeypatch, weighted):
    # float16 NumPy logits, computed in float32 in a scratch block reused from block to block: the blocked
    # loss and gradient equal the unblocked ones (both rounded to float16 once, from the same float32 values)
    import xlsce.backends.generic

    rng = np.random.default_rng(33)
    z = rng.normal(scale=3, size=(10, 7)).astype(np.float16)
    y = rng.integers(0, 7, size=10)
    y[3] = -100
    kw = dict(label_smoothing=0.1, weight=rng.uniform(0.5, 2, size=7).astype(np.float32) if weighted else None)
    whole = (xlsce.cross_entropy(z, y, **kw), *xlsce.value_and_grad(z, y, **kw))
    monkeypatch.setattr(xlsce.backends.generic, "BLOCK_ELEMENTS", 20)  # blocks of 2 rows of 7 classes
    blocked = (xlsce.cross_entropy(z, y, **kw), *xlsce.value_and_grad(z, y, **kw))
    for got, want in zip(blocked, whole, strict=True):
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, want)


def test_softcap_keeps_minus_inf_out_of_play(backend):
    # softcap maps 0 to 0, so (0, -inf, 0) must give exactly the uncapped result: log 2 and (0.5-0.95, 0, 0.5-0.05)
    z = backend.asarray(np.array([[0.0, -np.inf, 0.0]]))
    loss, grad = xlsce.value_and_grad(z, backend.asarray(np.array([0])), label_smoothing=0.1, softcap=3.0)
    xp_assert_close(loss, math.log(2), rtol=1e-14)
    xp_assert_close(grad, np.array([[-0.45, 0.0, 0.45]]), atol=1e-15)


# ---------------------------------------------------------------- return_lse (z-loss reporting)


def _np_lse(z):
    with np.errstate(all="ignore"):
        m = np.max(z, axis=-1, keepdims=True)
        m = np.where(np.isinf(m), 0.0, m)
        return (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_return_lse_values(backend, softcap):
    rng = np.random.default_rng(7)
    z = rng.normal(scale=3, size=(5, 6))
    z[1, 2] = -np.inf
    z[3, :] = -np.inf  # nothing in play: lse = -inf
    y = np.array([0, 1, 2, -100, 5])
    loss, lse = xlsce.cross_entropy(
        backend.asarray(z), backend.asarray(y), label_smoothing=0.1, z_loss=1e-3, softcap=softcap, return_lse=True
    )
    capped = z if softcap is None else np.where(np.isinf(z), -np.inf, softcap * np.tanh(z / softcap))
    xp_assert_close(lse, _np_lse(capped), rtol=1e-13)
    xp_assert_close(
        loss,
        xlsce.cross_entropy(backend.asarray(z), backend.asarray(y), label_smoothing=0.1, z_loss=1e-3, softcap=softcap),
    )
    with pytest.raises(TypeError, match="return_lse"):
        xlsce.cross_entropy(backend.asarray(z), backend.asarray(y), return_lse=1)


@pytest.mark.slow
def test_return_lse_gradients_torch_and_jax():
    # d/dz [loss + sum_i lse_i^2] against torch's own cross_entropy + torch.logsumexp, and jax.nn.logsumexp + optax
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    rng = np.random.default_rng(8)
    z, y = rng.normal(size=(6, 5)), np.array([0, 1, 2, 3, 4, 0])
    zt, zr = torch.tensor(z, requires_grad=True), torch.tensor(z, requires_grad=True)
    loss, lse = xlsce.cross_entropy(zt, torch.from_numpy(y), label_smoothing=0.2, return_lse=True, axis=1)
    (loss + (lse**2).sum()).backward()
    ref = torch.nn.functional.cross_entropy(zr, torch.from_numpy(y), label_smoothing=0.2)
    (ref + (torch.logsumexp(zr, 1) ** 2).sum()).backward()
    xp_assert_close(zt.grad, zr.grad, atol=1e-14)

    def ours(z):
        loss, lse = xlsce.cross_entropy(z, jnp.asarray(y), label_smoothing=0.2, return_lse=True)
        return loss + (lse**2).sum()

    def reference(z):
        q = optax.smooth_labels(jax.nn.one_hot(jnp.asarray(y), 5), 0.2)
        return optax.softmax_cross_entropy(z, q).mean() + (jax.nn.logsumexp(z, axis=1) ** 2).sum()

    want = jax.grad(reference)(jnp.asarray(z))
    xp_assert_close(jax.grad(ours)(jnp.asarray(z)), want, atol=1e-14)
    xp_assert_close(jax.jit(jax.grad(ours))(jnp.asarray(z)), want, atol=1e-14)


@pytest.mark.parametrize(("z", "t"), [([[0.5, 1.0, -np.inf]], [[0.5, 0.0, 0.5]]), ([[0.5, -np.inf]], [[0.5, 0.5]])])
def test_probability_mass_on_a_class_out_of_play_is_infinite(backend, z, t):
    """A probability target with mass on a -inf logit: -t log 0 = +inf on every backend, eager and traced
    (the traced sums used to drop that mass: a finite 0.724 or 0.0 on JAX and array-api-strict; issue 18)."""
    a = backend.asarray
    assert np.isposinf(float(xlsce.cross_entropy(a(z), a(t))))
    assert np.isposinf(float(backend.jit(xlsce.cross_entropy)(a(z), a(t))))  # jax.jit on JAX
