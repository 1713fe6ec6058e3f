"""z-loss (PaLM) and soft-capping (Gemma 2) in cross_entropy, checked against their definitions.

References, written here from the formulas and not from xlsce's code:

* a NumPy float64 evaluation of
  ``l_i = -sum_c w_c q_ic log softmax(s tanh(x_i/s))_c + zeta lse_i^2`` with the
  reductions of the docstring ("mean": the cross-entropy over sum_i m_i w[y_i], the z-loss
  over the counted positions, as Liger's reference does);
* the same formula written with torch ops (``log_softmax``, ``logsumexp``) and
  differentiated by torch autograd;
* central finite differences of xlsce's own loss (so the analytic backward is
  checked against the forward it belongs to).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import xp_assert_close
from problems import central_differences, logits_problem

import xlsce

N, K = 7, 5
PROBLEM = dict(scale=3.0, pin_first=False, weight=(0.5, 2.0))  # logits_problem((N, K), seed=..., **PROBLEM)


def ref_numpy(
    x, y, *, eps=0.0, exclusive=False, weight=None, ignore_index=-100, z_loss=0.0, softcap=None, reduction="mean"
):
    """Per-position loss from the definition, every logit finite."""
    k = x.shape[-1]
    z = x if softcap is None else softcap * np.tanh(x / softcap)
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    lp = z - lse[:, None]
    w = np.ones(k) if weight is None else weight
    m = y != ignore_index
    y0 = np.where(m, y, 0)
    t = np.eye(k)[y0]
    if exclusive:
        q = (1 - eps) * t + eps / (k - 1) * (1 - t)
    else:
        q = (1 - eps) * t + eps / k
    ce = np.where(m, -(w * q * lp).sum(-1), 0.0)
    zl = np.where(m, z_loss * lse**2, 0.0)
    if reduction == "none":
        return ce + zl
    if reduction == "sum":
        return (ce + zl).sum()
    d = (m * w[y0]).sum()  # the cross-entropy's mean over sum m w[y]; the z-loss's over the counted positions
    return 0.0 if d == 0 else ce.sum() / d + zl.sum() / m.sum()


def test_zloss_hand_value():
    # logits (0, 0): lse = log 2, CE = log 2; z-loss adds zeta * log(2)^2.
    x = np.zeros((1, 2))
    y = np.array([1])
    got = xlsce.cross_entropy(x, y, z_loss=0.5)
    np.testing.assert_allclose(got, np.log(2) + 0.5 * np.log(2) ** 2, rtol=1e-14)
    # dloss/dz = (1 + 2 zeta lse) softmax(z) - onehot = (1 + log 2)/2 - (0, 1)
    _, g = xlsce.value_and_grad(x, y, z_loss=0.5)
    c = (1 + 2 * 0.5 * np.log(2)) / 2
    np.testing.assert_allclose(g, [[c, c - 1]], rtol=1e-14)


def test_softcap_hand_value():
    # softcap s: z = s tanh(x/s); with x = (s * atanh(0.5), 0): z = (s/2, 0).
    s = 4.0
    x = np.array([[s * np.arctanh(0.5), 0.0]])
    y = np.array([0])
    got = xlsce.cross_entropy(x, y, softcap=s)
    np.testing.assert_allclose(got, np.log1p(np.exp(-s / 2)), rtol=1e-13)
    # chain rule: dz/dx = 1 - tanh(x/s)^2 = 3/4 on class 0, 1 on class 1
    _, g = xlsce.value_and_grad(x, y, softcap=s)
    p = 1 / (1 + np.exp(-s / 2))
    np.testing.assert_allclose(g, [[(p - 1) * 0.75, 1 - p]], rtol=1e-12)


def test_softcap_bounds_the_logits():
    # Any logit is mapped into (-s, s): the loss of a hopeless target is at most log(K) + 2s.
    x = np.array([[1e6, -1e6, 0.0]])
    got = float(xlsce.cross_entropy(x, np.array([1]), softcap=5.0))
    np.testing.assert_allclose(got, np.log(np.exp(5.0) + np.exp(-5.0) + 1.0) + 5.0, rtol=1e-12)
    assert got < np.log(3) + 10


CASES = [
    dict(z_loss=1e-2),
    dict(softcap=2.5),
    dict(z_loss=0.3, softcap=1.5),
    dict(z_loss=1e-2, softcap=3.0, eps=0.2),
    dict(z_loss=1e-2, softcap=3.0, eps=0.2, exclusive=True),
    dict(z_loss=0.1, softcap=2.0, eps=0.1, weight=True, ignore=True),
    dict(z_loss=0.1, softcap=2.0, eps=0.3, exclusive=True, weight=True, ignore=True),
]


def _kwargs(case, w, xp_w=None):
    kw = dict(
        label_smoothing=case.get("eps", 0.0),
        smoothing="exclusive" if case.get("exclusive") else "uniform",
        z_loss=case.get("z_loss", 0.0),
        softcap=case.get("softcap"),
    )
    if case.get("weight"):
        kw["weight"] = w if xp_w is None else xp_w
    return kw


def _ref_kwargs(case, w):
    return dict(
        eps=case.get("eps", 0.0),
        exclusive=case.get("exclusive", False),
        weight=w if case.get("weight") else None,
        z_loss=case.get("z_loss", 0.0),
        softcap=case.get("softcap"),
    )


def _targets(case, y):
    y = y.copy()
    if case.get("ignore"):
        y[[1, 4]] = -100
    return y


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_value_matches_definition(backend, case, reduction):
    x, y, w, *_ = logits_problem((N, K), seed=0, **PROBLEM)
    y = _targets(case, y)
    b = backend
    kw = _kwargs(case, w, b.asarray(w))
    got = xlsce.cross_entropy(b.asarray(x), b.asarray(y), reduction=reduction, **kw)
    xp_assert_close(got, ref_numpy(x, y, reduction=reduction, **_ref_kwargs(case, w)), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grad_matches_torch_autograd_of_naive_formula(case, reduction):
    torch = pytest.importorskip("torch")
    x, y, w, *_ = logits_problem((N, K), seed=1, **PROBLEM)
    y = _targets(case, y)
    rk = _ref_kwargs(case, w)

    def naive(xt):
        z = xt if rk["softcap"] is None else rk["softcap"] * torch.tanh(xt / rk["softcap"])
        lp = torch.log_softmax(z, dim=-1)
        lse = torch.logsumexp(z, dim=-1)
        m = torch.from_numpy(y != -100)
        y0 = torch.from_numpy(np.where(y != -100, y, 0))
        t = torch.nn.functional.one_hot(y0, K).double()
        eps = rk["eps"]
        q = (1 - eps) * t + (eps / (K - 1) * (1 - t) if rk["exclusive"] else eps / K)
        wt = torch.ones(K, dtype=torch.float64) if rk["weight"] is None else torch.from_numpy(w)
        ce = torch.where(m, -(wt * q * lp).sum(-1), 0.0)
        zl = torch.where(m, rk["z_loss"] * lse**2, 0.0)
        if reduction == "none":
            return ce + zl
        if reduction == "sum":
            return (ce + zl).sum()
        return ce.sum() / (m * wt[y0]).sum() + zl.sum() / m.sum()  # the z-loss per counted position

    cot = np.random.default_rng(2).normal(size=(N,) if reduction == "none" else ())
    xt = torch.tensor(x, requires_grad=True)
    (g_ref,) = torch.autograd.grad(naive(xt), xt, torch.tensor(cot))
    xt2 = torch.tensor(x, requires_grad=True)
    kw = _kwargs(case, torch.from_numpy(w))
    out = xlsce.cross_entropy(xt2, torch.from_numpy(y), reduction=reduction, **kw)
    (g,) = torch.autograd.grad(out, xt2, torch.tensor(cot))
    xp_assert_close(out, naive(torch.tensor(x)), rtol=1e-12, atol=1e-13)
    xp_assert_close(g, g_ref, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES[2:], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grad_matches_finite_differences(backend, case):
    x, y, w, *_ = logits_problem((N, K), seed=3, **PROBLEM)
    y = _targets(case, y)
    kw = _kwargs(case, w)
    cot = np.random.default_rng(4).normal(size=N)

    def f(v):
        return float(np.dot(xlsce.cross_entropy(v, y, reduction="none", **kw), cot))

    fd = central_differences(f, x, step=1e-6)
    b = backend
    bkw = _kwargs(case, w, b.asarray(w))
    _, g = xlsce.value_and_grad(b.asarray(x), b.asarray(y), reduction="none", cotangent=b.asarray(cot), **bkw)
    xp_assert_close(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_jax_grad_matches_naive_autodiff():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x, y, w, *_ = logits_problem((N, K), seed=5, **PROBLEM)
    zeta, s = 0.05, 2.0

    def naive(v):
        z = s * jnp.tanh(v / s)
        lse = jax.nn.logsumexp(z, axis=-1)
        lp = z - lse[:, None]
        q = 0.9 * jax.nn.one_hot(y, K) + 0.1 / K
        return jnp.mean(-(q * lp).sum(-1) + zeta * lse**2)

    def ours(v):
        return xlsce.cross_entropy(v, jnp.asarray(y), label_smoothing=0.1, z_loss=zeta, softcap=s)

    v_ref, g_ref = jax.value_and_grad(naive)(jnp.asarray(x))
    v, g = jax.jit(jax.value_and_grad(ours))(jnp.asarray(x))
    xp_assert_close(v, v_ref, rtol=1e-12)
    xp_assert_close(g, g_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_zloss_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="z_loss"):
        xlsce.cross_entropy(np.zeros((1, 2)), np.array([0]), z_loss=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_softcap_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="softcap"):
        xlsce.cross_entropy(np.zeros((1, 2)), np.array([0]), softcap=bad)
