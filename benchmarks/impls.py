"""The implementations compared: xlsce and the anchors, per backend.

Every implementation computes the same thing, label smoothing ``EPS`` with
reduction 'mean' (PyTorch's semantics: with class weights, the mean divides by
the summed weights of the counted targets; ignored positions do not count):

* ``fwd()`` returns the loss (logits not requiring grad);
* ``fwdbwd()`` returns ``(loss, d loss / d logits)``.

Anchors are what a user would otherwise write: the framework's own loss, optax,
a hand-written NumPy forward with its analytic gradient, and the one-hot code of
typical blog posts (log_softmax, one_hot, (1-eps) onehot + eps/K, sum).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .cases import EPS, IGNORE_INDEX, Case

BACKENDS = ("numpy", "jax", "torch")


def available_backends():
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


@dataclass
class Bound:
    """An implementation bound to one case's arrays."""

    fwd: Callable
    fwdbwd: Callable
    sync: Callable  # waits for a result (JAX dispatch is asynchronous)
    loss_value: Callable  # result of fwd -> Python float
    grad_l1: Callable  # gradient -> Python float (sum of |g|, accumulated in float64/float32)
    memory_analysis: Callable | None = None  # JAX: compiled fwdbwd's memory analysis
    compiled_text: Callable | None = None  # JAX: compiled fwdbwd's optimised HLO (benchmarks.profile)


@dataclass(frozen=True)
class Impl:
    backend: str
    name: str
    role: str  # "xlsce" | "anchor"
    description: str
    compiled: bool = False  # torch.compile: slow to build, skipped by --no-compile

    @property
    def key(self):
        return f"{self.backend}:{self.name}"

    def supports(self, case: Case):
        return not (self.backend == "numpy" and case.dtype != "float32")

    def bind(self, arrays) -> Bound:
        return _BINDERS[self.backend](self, arrays)


IMPLS = (
    Impl("numpy", "xlsce", "xlsce", "xlsce.value_and_grad / xlsce.cross_entropy"),
    Impl("numpy", "handwritten", "anchor", "hand-written NumPy forward + analytic gradient"),
    Impl("jax", "xlsce", "xlsce", "jax.jit(jax.value_and_grad(xlsce.cross_entropy))"),
    Impl("jax", "optax-smooth", "anchor", "optax.smooth_labels + optax.softmax_cross_entropy, jit"),
    Impl("jax", "optax-int", "anchor", "lse - (1-eps) z_y - eps mean(z) (integer labels), jit"),
    Impl("jax", "onehot", "anchor", "blog code: log_softmax, one_hot, (1-eps) onehot + eps/K, sum; jit"),
    Impl("torch", "xlsce", "xlsce", "xlsce.cross_entropy, eager autograd"),
    Impl("torch", "xlsce-compile", "xlsce", "torch.compile(xlsce.cross_entropy)", compiled=True),
    Impl("torch", "F.cross_entropy", "anchor", "torch.nn.functional.cross_entropy(label_smoothing=...), eager"),
    Impl("torch", "F.cross_entropy-compile", "anchor", "torch.compile(F.cross_entropy)", compiled=True),
    Impl("torch", "onehot", "anchor", "blog code: log_softmax, one_hot, (1-eps) onehot + eps/K, sum; eager"),
)


def find_impl(key: str) -> Impl:
    for impl in IMPLS:
        if impl.key == key:
            return impl
    raise KeyError(key)


def to_backend(backend: str, case: Case, logits, target, weight):
    """The case's NumPy inputs as (logits, target, weight) of ``backend`` in the case's dtype."""
    if backend == "numpy":
        return logits, target, weight
    if backend == "torch":
        import torch

        dt = getattr(torch, case.dtype)
        z = torch.from_numpy(logits)  # shares memory for float32
        if z.dtype != dt:
            z = z.to(dt)
        w = None if weight is None else torch.from_numpy(weight).to(dt)
        return z, torch.from_numpy(target), w
    if backend == "jax":
        import jax.numpy as jnp

        dt = getattr(jnp, case.dtype)
        z = jnp.asarray(logits).astype(dt)
        w = None if weight is None else jnp.asarray(weight).astype(dt)
        return z, jnp.asarray(target), w
    raise ValueError(backend)


# --------------------------------------------------------------------------- numpy


def numpy_handwritten(z, y, w, *, grad):
    """Forward and analytic gradient as a competent NumPy user writes them.

    loss_i = (1-eps) w_y (lse - z_y) + eps/K (lse sum_c w_c - sum_c w_c z_c), mean over
    sum_i m_i w_{y_i}; grad = c_i (coef_i softmax(z_i) - (1-eps) w_y 1_y - eps/K w),
    coef_i = (1-eps) w_{y_i} + eps/K sum w, c_i = m_i / D.  One (N, K) buffer holds
    exp(z - max), then the gradient, in place: 8 passes over (N, K).
    """
    n, k = z.shape
    rows = np.arange(n)
    m = z.max(axis=1, keepdims=True)
    e = np.subtract(z, m)
    np.exp(e, out=e)
    s = e.sum(axis=1, keepdims=True)
    lse = (m + np.log(s))[:, 0]
    if w is None:
        valid = None
        ys = y
        zy = z[rows, ys]
        per = lse - (1 - EPS) * zy - EPS * z.mean(axis=1)
        den = np.float32(n)
        loss = per.sum() / den
        wy, sw = np.float32(1.0), np.float32(k)
    else:
        valid = y != IGNORE_INDEX
        ys = np.where(valid, y, 0)
        zy = z[rows, ys]
        wy = np.where(valid, w[ys], 0).astype(z.dtype)
        sw = w.sum()
        per = (1 - EPS) * wy * (lse - zy) + (EPS / k) * (lse * sw - z @ w)
        den = wy.sum()
        loss = np.where(valid, per, 0).sum() / den
    if not grad:
        return loss
    c = np.full(n, 1 / den, dtype=z.dtype) if valid is None else (valid / den).astype(z.dtype)
    coef = (1 - EPS) * wy + (EPS / k) * sw
    e *= (c * coef)[:, None] / s
    e[rows, ys] -= c * (1 - EPS) * wy
    if w is None:
        e -= (c * (EPS / k))[:, None]
    else:
        e -= np.multiply.outer(c * (EPS / k), w)
    return loss, e


def _bind_numpy(impl: Impl, arrays):
    import xlsce

    z, y, w = arrays
    if impl.name == "xlsce":

        def fwd():
            return xlsce.cross_entropy(z, y, label_smoothing=EPS, weight=w)

        def fwdbwd():
            return xlsce.value_and_grad(z, y, label_smoothing=EPS, weight=w)

    else:

        def fwd():
            return numpy_handwritten(z, y, w, grad=False)

        def fwdbwd():
            return numpy_handwritten(z, y, w, grad=True)

    return Bound(
        fwd,
        fwdbwd,
        sync=lambda out: out,
        loss_value=float,
        grad_l1=lambda g: float(np.abs(g).sum(dtype=np.float64)),
    )


# --------------------------------------------------------------------------- jax


def _jax_loss(name):
    import jax
    import jax.numpy as jnp

    import xlsce

    def masked_mean(per, y, w):
        valid = y != IGNORE_INDEX
        wy = jnp.where(valid, w[jnp.where(valid, y, 0)], 0)
        return jnp.sum(jnp.where(valid, per, 0)) / jnp.sum(wy)

    if name == "xlsce":

        def loss(z, y, w):
            return xlsce.cross_entropy(z, y, label_smoothing=EPS, weight=w)

    elif name == "optax-smooth":
        import optax

        def loss(z, y, w):
            labels = optax.smooth_labels(jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype), EPS)
            if w is None:
                return jnp.mean(optax.softmax_cross_entropy(z, labels))
            return masked_mean(optax.softmax_cross_entropy(z, labels * w), y, w)

    elif name == "optax-int":

        def loss(z, y, w):
            k = z.shape[-1]
            lse = jax.nn.logsumexp(z, axis=-1)
            if w is None:
                zy = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
                return jnp.mean(lse - (1 - EPS) * zy - EPS * jnp.mean(z, axis=-1))
            ys = jnp.where(y != IGNORE_INDEX, y, 0)
            zy = jnp.take_along_axis(z, ys[:, None], axis=-1)[:, 0]
            per = (1 - EPS) * w[ys] * (lse - zy) + (EPS / k) * (lse * jnp.sum(w) - z @ w)
            return masked_mean(per, y, w)

    elif name == "onehot":

        def loss(z, y, w):
            k = z.shape[-1]
            lp = jax.nn.log_softmax(z, axis=-1)
            q = (1 - EPS) * jax.nn.one_hot(y, k, dtype=z.dtype) + EPS / k
            if w is None:
                return jnp.mean(-jnp.sum(q * lp, axis=-1))
            return masked_mean(-jnp.sum(q * lp * w, axis=-1), y, w)

    else:
        raise ValueError(name)
    return loss


def _bind_jax(impl: Impl, arrays):
    import jax
    import jax.numpy as jnp

    z, y, w = arrays
    loss = _jax_loss(impl.name)
    f = jax.jit(loss)
    fg = jax.jit(jax.value_and_grad(loss))
    l1 = jax.jit(lambda g: jnp.sum(jnp.abs(g.astype(jnp.float32))))

    def memory_analysis():
        return fg.lower(z, y, w).compile().memory_analysis()

    return Bound(
        fwd=lambda: f(z, y, w),
        fwdbwd=lambda: fg(z, y, w),
        sync=jax.block_until_ready,
        loss_value=float,
        grad_l1=lambda g: float(l1(g)),
        memory_analysis=memory_analysis,
        compiled_text=lambda: fg.lower(z, y, w).compile().as_text(),
    )


# --------------------------------------------------------------------------- torch


def _torch_loss(name):
    import torch
    import torch.nn.functional as F

    import xlsce

    if name.startswith("xlsce"):

        def loss(z, y, w):
            return xlsce.cross_entropy(z, y, label_smoothing=EPS, weight=w)

    elif name.startswith("F.cross_entropy"):

        def loss(z, y, w):
            return F.cross_entropy(z, y, weight=w, ignore_index=IGNORE_INDEX, label_smoothing=EPS)

    elif name == "onehot":

        def loss(z, y, w):
            k = z.shape[-1]
            lp = F.log_softmax(z, dim=-1)
            if w is None:
                q = (1 - EPS) * F.one_hot(y, k).to(lp.dtype) + EPS / k
                return (-(q * lp).sum(dim=-1)).mean()
            valid = y != IGNORE_INDEX
            ys = y.clamp_min(0)
            q = (1 - EPS) * F.one_hot(ys, k).to(lp.dtype) + EPS / k
            per = -(q * lp * w).sum(dim=-1)
            return (per * valid).sum() / (w[ys] * valid).sum()

    else:
        raise ValueError(name)
    if name.endswith("-compile"):
        loss = torch.compile(loss, dynamic=False)
    return loss


def _bind_torch(impl: Impl, arrays):
    import torch

    z, y, w = arrays
    loss = _torch_loss(impl.name)
    zr = z.detach().requires_grad_(True)

    def fwdbwd():
        out = loss(zr, y, w)
        (g,) = torch.autograd.grad(out, zr)
        return out.detach(), g

    return Bound(
        fwd=lambda: loss(z, y, w),
        fwdbwd=fwdbwd,
        sync=lambda out: out,
        loss_value=lambda v: float(v.float()),
        grad_l1=lambda g: float(torch.linalg.vector_norm(g, ord=1, dtype=torch.float64)),
    )


_BINDERS = {"numpy": _bind_numpy, "jax": _bind_jax, "torch": _bind_torch}
