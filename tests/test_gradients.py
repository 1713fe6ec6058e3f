"""Gradients in float64: analytic vs jax.grad vs torch autograd vs central finite differences.

* ``xlsce.value_and_grad`` (NumPy, the analytic backward), ``jax.vjp``/``jax.grad`` and
  torch's ``loss.backward()`` of ``xlsce.cross_entropy``, and central differences of the
  NumPy loss, over both smoothing conventions, class weights, ignore_index, ``where``,
  every reduction ('none' with a random cotangent), z-loss, soft-cap and -inf logits;
* ``torch.autograd.gradcheck`` through ``xlsce.cross_entropy``;
* the gradient with respect to probability targets (torch ``target.requires_grad``,
  ``jax.grad(argnums=1)``) vs finite differences, and vs PyTorch's own
  ``F.cross_entropy`` target gradient for the uniform convention.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import xp_assert_close
from problems import central_differences, logits_problem

import xlsce

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)

H = 1e-5  # central-difference step; truncation ~H^2, round-off ~1e-16/H


def _scalar(loss, cotangent):
    return float(np.sum(np.asarray(loss) * (1.0 if cotangent is None else cotangent)))


CASES = {
    "uniform-mean": dict(kind="index", shape=(5, 4), axis=-1, eps=0.1),
    "uniform-eps1-sum": dict(kind="index", shape=(5, 4), axis=-1, eps=1.0, reduction="sum"),
    "exclusive-weight-ignore-mean": dict(
        kind="index", shape=(6, 4), axis=-1, eps=0.2, smoothing="exclusive", weight=True, ignore=-100
    ),
    "uniform-weight-where-sum": dict(
        kind="index", shape=(6, 3), axis=-1, eps=0.3, weight=True, where=True, reduction="sum"
    ),
    "exclusive-ignore_class-none": dict(
        kind="index", shape=(6, 4), axis=-1, eps=0.5, smoothing="exclusive", ignore=3, reduction="none"
    ),  # ignore_index K - 1: a class
    "exclusive-K2-weight-mean": dict(kind="index", shape=(5, 2), axis=-1, eps=0.3, smoothing="exclusive", weight=True),
    "uniform-axis1-kdim-weight-ignore-where-mean": dict(
        kind="index", shape=(2, 4, 3), axis=1, eps=0.15, weight=True, ignore=-100, where=True
    ),
    "zloss-uniform-weight-mean": dict(kind="index", shape=(5, 4), axis=-1, eps=0.1, weight=True, z_loss=0.1),
    "softcap-exclusive-none": dict(
        kind="index", shape=(5, 4), axis=-1, eps=0.2, smoothing="exclusive", softcap=2.0, reduction="none"
    ),
    "zloss-softcap-where-none": dict(
        kind="index", shape=(3, 2, 5), axis=-1, eps=0.1, z_loss=0.05, softcap=1.5, where=True, reduction="none"
    ),
    "minus_inf-uniform-weight-sum": dict(
        kind="index", shape=(6, 4), axis=-1, eps=0.3, weight=True, minus_inf=True, reduction="sum"
    ),
    "minus_inf-exclusive-none": dict(
        kind="index", shape=(6, 4), axis=-1, eps=0.3, smoothing="exclusive", minus_inf=True, reduction="none"
    ),
    "prob-uniform-weight-where-mean": dict(kind="prob", shape=(5, 4), axis=-1, eps=0.2, weight=True, where=True),
    "prob-exclusive-zloss-softcap-none": dict(
        kind="prob", shape=(2, 4, 3), axis=1, eps=0.1, smoothing="exclusive", z_loss=0.02, softcap=3.0, reduction="none"
    ),
}


def _case(name):
    c = dict(CASES[name])
    shape, axis = c.pop("shape"), c.pop("axis")
    reduction = c.setdefault("reduction", "mean")
    x, t, weight, where, ct, _ = logits_problem(
        shape,
        axis,
        seed=sum(map(ord, name)),
        scale=1.5,
        kind=c.pop("kind"),
        ignore=c.get("ignore"),
        where=c.pop("where", False),
        weight=(0.3, 2.5) if c.pop("weight", False) else None,
        minus_inf=c.pop("minus_inf", False),
        cotangent=reduction == "none",
    )
    kw = dict(axis=axis, label_smoothing=c.pop("eps"))
    if "ignore" in c:
        kw["ignore_index"] = c.pop("ignore")
    kw.update({k: v for k, v in (("where", where), ("weight", weight)) if v is not None}, **c)
    return x, t, kw, ct


def _as(module_asarray, kw):
    return {k: (module_asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_logit_gradients_agree(name, monkeypatch):
    x, t, kw, ct = _case(name)

    # central differences of the NumPy loss (the cotangent-weighted sum for 'none')
    fd = central_differences(lambda z: _scalar(xlsce.cross_entropy(z, t, **kw), ct), x, step=H)

    # analytic backward
    loss, analytic = xlsce.value_and_grad(x, t, cotangent=ct, **kw)

    # jax.grad through the custom_vjp
    kj = _as(jnp.asarray, kw)
    tj = jnp.asarray(t)
    ctj = None if ct is None else jnp.asarray(ct)

    def jax_run():
        zj = jnp.asarray(x)
        out = xlsce.cross_entropy(zj, tj, **kj)
        return out, jax.grad(lambda z: jnp.sum(xlsce.cross_entropy(z, tj, **kj) * (1.0 if ctj is None else ctj)))(zj)

    # small logits take the general path and subtract the target's term with a scatter; with
    # SMALL_LOGITS = 0 they go as large ones do: a lax.cond on finite logits, and a select
    from xlsce.backends import generic

    l_jax, g_jax = jax_run()
    monkeypatch.setattr(generic, "SMALL_LOGITS", 0)
    l_jax_large, g_jax_large = jax_run()
    monkeypatch.undo()

    # torch autograd through the autograd.Function: small logits keep the gradient computed in the
    # forward pass; with SMALL_LOGITS = 0 the backward recomputes it from O(N) residuals, as for large ones
    kt = _as(torch.from_numpy, kw)
    torch_runs = {}
    for small in (generic.SMALL_LOGITS, 0):
        monkeypatch.setattr(generic, "SMALL_LOGITS", small)
        xt = torch.tensor(x, requires_grad=True)
        lt = xlsce.cross_entropy(xt, torch.from_numpy(t), **kt)
        lt.backward(torch.ones((), dtype=lt.dtype) if ct is None else torch.from_numpy(ct))
        torch_runs["fused" if small else "two passes"] = (lt, xt.grad)

    assert np.all(np.isfinite(analytic))
    assert np.any(analytic != 0)
    xp_assert_close(analytic, fd, rtol=1e-6, atol=1e-8, err_msg="analytic vs finite differences")
    xp_assert_close(g_jax, analytic, rtol=1e-12, atol=1e-14, err_msg="jax.grad vs analytic")
    xp_assert_close(g_jax_large, analytic, rtol=1e-12, atol=1e-14, err_msg="jax.grad (large path) vs analytic")
    xp_assert_close(l_jax, loss, rtol=1e-12, atol=1e-14, err_msg="jax loss vs numpy loss")
    xp_assert_close(l_jax_large, loss, rtol=1e-12, atol=1e-14, err_msg="jax loss (large path) vs numpy loss")
    for path, (lt, grad) in torch_runs.items():
        xp_assert_close(grad, analytic, rtol=1e-12, atol=1e-14, err_msg=f"torch autograd ({path}) vs analytic")
        xp_assert_close(lt, loss, rtol=1e-12, atol=1e-14, err_msg=f"torch loss ({path}) vs numpy loss")
    # positions that do not count (ignored, masked) and classes out of play get exactly zero
    np.testing.assert_array_equal(analytic[np.isneginf(x)], 0.0)


def test_finite_differences_are_sensitive():
    """The finite-difference check can fail: a gradient off by 1e-5 in one entry is caught."""
    x, t, kw, ct = _case("uniform-mean")
    fd = central_differences(lambda z: _scalar(xlsce.cross_entropy(z, t, **kw), ct), x, step=H)
    _, analytic = xlsce.value_and_grad(x, t, cotangent=ct, **kw)
    wrong = analytic.copy()
    wrong[2, 1] += 1e-5
    with pytest.raises(AssertionError):
        xp_assert_close(wrong, fd, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- torch.autograd.gradcheck


@pytest.mark.parametrize(
    "name",
    [
        "exclusive-weight-ignore-mean",
        "uniform-weight-where-sum",
        "softcap-exclusive-none",
        "zloss-softcap-where-none",
        "uniform-axis1-kdim-weight-ignore-where-mean",
    ],
)
def test_torch_gradcheck_logits(name):
    x, t, kw, _ = _case(name)
    kt = _as(torch.from_numpy, kw)
    tt = torch.from_numpy(t)
    xt = torch.tensor(x, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: xlsce.cross_entropy(z, tt, **kt), (xt,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["prob-uniform-weight-where-mean", "prob-exclusive-zloss-softcap-none"])
def test_torch_gradcheck_logits_and_probability_targets(name):
    x, t, kw, _ = _case(name)
    kt = _as(torch.from_numpy, kw)
    xt = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, p: xlsce.cross_entropy(z, p, **kt), (xt, tt), eps=1e-6, atol=1e-7, rtol=1e-5
    )


# --------------------------------------------------------------------------- probability targets


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["prob-uniform-weight-where-mean", "prob-exclusive-zloss-softcap-none", "prob-uniform-sum-eps0"]
)
def test_target_gradients(name):
    if name == "prob-uniform-sum-eps0":
        x, t, *_ = logits_problem((4, 3), seed=5, scale=1.5, kind="prob")
        kw = dict(axis=-1, label_smoothing=0.0, reduction="sum")
        ct = None
    else:
        x, t, kw, ct = _case(name)

    fd = central_differences(lambda p: _scalar(xlsce.cross_entropy(x, p, **kw), ct), t, step=H)

    kj = _as(jnp.asarray, kw)
    ctj = 1.0 if ct is None else jnp.asarray(ct)
    g_logits, g_target = jax.grad(lambda z, p: jnp.sum(xlsce.cross_entropy(z, p, **kj) * ctj), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(t)
    )

    kt = _as(torch.from_numpy, kw)
    xt = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t, requires_grad=True)
    lt = xlsce.cross_entropy(xt, tt, **kt)
    lt.backward(torch.ones((), dtype=lt.dtype) if ct is None else torch.from_numpy(ct))

    assert np.any(fd != 0)
    xp_assert_close(g_target, fd, rtol=1e-6, atol=1e-8, err_msg="jax target gradient vs finite differences")
    xp_assert_close(tt.grad, fd, rtol=1e-6, atol=1e-8, err_msg="torch target gradient vs finite differences")
    xp_assert_close(tt.grad, g_target, rtol=1e-12, atol=1e-14, err_msg="torch vs jax target gradient")
    _, analytic = xlsce.value_and_grad(x, t, cotangent=ct, **kw)
    xp_assert_close(g_logits, analytic, rtol=1e-12, atol=1e-14, err_msg="jax logit gradient with argnums=(0, 1)")
    xp_assert_close(xt.grad, analytic, rtol=1e-12, atol=1e-14, err_msg="torch logit gradient with a target gradient")


@pytest.mark.parametrize("eps", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_target_gradient_matches_torch_functional(eps, reduction):
    """PyTorch's F.cross_entropy differentiates w.r.t. probability targets too: same gradient (uniform, axis=1)."""
    import torch.nn.functional as F

    x, t, w, _, ct, _ = logits_problem(
        (3, 4, 2), 1, seed=17, scale=1.5, kind="prob", weight=(0.5, 2.0), cotangent=reduction == "none"
    )
    ct = torch.from_numpy(ct) if reduction == "none" else torch.ones((), dtype=torch.float64)
    grads = []
    for fn in (
        lambda z, p: F.cross_entropy(z, p, weight=torch.from_numpy(w), label_smoothing=eps, reduction=reduction),
        lambda z, p: xlsce.cross_entropy(
            z, p, axis=1, weight=torch.from_numpy(w), label_smoothing=eps, reduction=reduction
        ),
    ):
        xt = torch.tensor(x, requires_grad=True)
        tt = torch.tensor(t, requires_grad=True)
        fn(xt, tt).backward(ct)
        grads.append((xt.grad, tt.grad))
    xp_assert_close(grads[1][0], grads[0][0], err_msg="logit gradient")
    xp_assert_close(grads[1][1], grads[0][1], err_msg="target gradient")


@pytest.mark.parametrize("n", [4, 300])  # the small path (gradient kept) and the two-pass backward
def test_torch_second_order_raises(n):
    # the analytic backward is first order only: differentiating the gradient must fail loudly, with
    # xlsce's own message, not return the Hessian of a backward whose log-sum-exp is held constant;
    # create_graph=True itself still gives the first derivative
    z = torch.randn(n, 300, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 300, (n,))
    loss = xlsce.cross_entropy(z, y, label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    (plain,) = torch.autograd.grad(xlsce.cross_entropy(z, y, label_smoothing=0.1), z)
    xp_assert_close(grad.detach(), plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad((grad**2).sum(), z)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_jax_second_derivatives(name, monkeypatch):
    # jax.hessian (forward over reverse) and grad of grad (reverse over reverse) through the
    # custom_vjp differentiate the analytic backward together with the forward's residuals (the
    # log-sum-exp), so they are the loss's Hessian: checked against central differences of the
    # analytic gradient (NumPy), on both of JAX's paths (small logits; SMALL_LOGITS = 0: lax.cond)
    from xlsce.backends import generic

    x, t, kw, ct = _case(name)
    fd = np.stack(
        [
            central_differences(
                lambda z, i=i: float(xlsce.value_and_grad(z, t, cotangent=ct, **kw)[1].reshape(-1)[i]), x, step=H
            )
            for i in range(x.size)
        ]
    ).reshape(x.shape + x.shape)
    kj, tj = _as(jnp.asarray, kw), jnp.asarray(t)
    ctj = 1.0 if ct is None else jnp.asarray(ct)

    def f(z):
        return jnp.sum(xlsce.cross_entropy(z, tj, **kj) * ctj)

    v = np.random.default_rng(0).normal(size=x.shape)
    v[np.isneginf(x)] = 0.0
    for small in (generic.SMALL_LOGITS, 0):
        monkeypatch.setattr(generic, "SMALL_LOGITS", small)
        hess = np.asarray(jax.jit(jax.hessian(f))(jnp.asarray(x)))
        hvp = np.asarray(jax.grad(lambda z: jnp.vdot(jax.grad(f)(z), v))(jnp.asarray(x)))
        assert np.all(np.isfinite(hess)) and np.any(hess != 0)
        xp_assert_close(hess, fd, rtol=1e-5, atol=1e-7, err_msg=f"jax.hessian vs differences (SMALL_LOGITS={small})")
        expected = np.tensordot(fd, v, axes=x.ndim)
        xp_assert_close(
            hvp, expected, rtol=1e-5, atol=1e-7, err_msg=f"grad of grad vs differences (SMALL_LOGITS={small})"
        )
