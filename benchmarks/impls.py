"""The implementations compared: xlsce and the anchors, per backend.

Every implementation computes the same thing, label smoothing ``EPS`` with
reduction 'mean' (PyTorch's semantics: with class weights, the mean divides by
the summed weights of the counted targets; ignored positions do not count):

* ``fwd()`` returns the loss (logits not requiring grad);
* ``fwdbwd()`` returns ``(loss, d loss / d logits)``.

Anchors are what a user would otherwise write: the framework's own loss, optax,
a hand-written NumPy forward with its analytic gradient, and the one-hot code of
typical blog posts (log_softmax, one_hot, (1-eps) onehot + eps/K, sum).

The fused linear loss's implementations (``linear``) take (hidden, classifier,
target) and return the gradients for hidden and classifier: ``xlsce-linear`` is
``xlsce.linear_cross_entropy``, the anchors ``...-materialised`` apply a loss to
``hidden @ classifier.T``.  The ``floor`` (selected only by ``--impl floor``) is
not a loss: its forward reads the logits once (a sum), its forward+backward
reads them once and writes a gradient once (a negation), the bandwidth floor.
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
    host_sync: Callable | None = None  # torch on CUDA: None, or why fwdbwd synchronised with the host


@dataclass(frozen=True)
class Impl:
    backend: str
    name: str
    role: str  # "xlsce" | "anchor" | "floor"
    description: str
    compiled: bool = False  # torch.compile: slow to build, skipped by --no-compile
    linear: bool = False  # the fused linear loss: the cases with a hidden size

    @property
    def key(self):
        return f"{self.backend}:{self.name}"

    def supports(self, case: Case):
        if self.backend == "numpy" and case.dtype != "float32":
            return False
        return self.linear == (case.h is not None) and (case.variant == "plain" or not self.linear)

    def bind(self, arrays) -> Bound:
        return (_bind_floor if self.role == "floor" else _BINDERS[self.backend])(self, arrays)


FLOOR = "bandwidth floor, not a loss: -z, one read and one write (fwd: sum(z), one read)"
IMPLS = (
    Impl("numpy", "xlsce", "xlsce", "xlsce.value_and_grad / xlsce.cross_entropy"),
    Impl("numpy", "handwritten", "anchor", "hand-written NumPy forward + analytic gradient"),
    Impl("numpy", "floor", "floor", FLOOR),
    Impl("jax", "xlsce", "xlsce", "jax.jit(jax.value_and_grad(xlsce.cross_entropy))"),
    Impl("jax", "optax-smooth", "anchor", "optax.smooth_labels + optax.softmax_cross_entropy, jit"),
    Impl("jax", "optax-int", "anchor", "lse - (1-eps) z_y - eps mean(z) (integer labels), jit"),
    Impl("jax", "onehot", "anchor", "blog code: log_softmax, one_hot, (1-eps) onehot + eps/K, sum; jit"),
    Impl("jax", "floor", "floor", FLOOR),
    Impl("torch", "xlsce", "xlsce", "xlsce.cross_entropy, eager autograd"),
    Impl("torch", "xlsce-compile", "xlsce", "torch.compile(xlsce.cross_entropy)", compiled=True),
    Impl("torch", "F.cross_entropy", "anchor", "torch.nn.functional.cross_entropy(label_smoothing=...), eager"),
    Impl("torch", "F.cross_entropy-compile", "anchor", "torch.compile(F.cross_entropy)", compiled=True),
    Impl("torch", "onehot", "anchor", "blog code: log_softmax, one_hot, (1-eps) onehot + eps/K, sum; eager"),
    Impl("torch", "floor", "floor", FLOOR),
    Impl("jax", "xlsce-linear", "xlsce", "jit(value_and_grad(xlsce.linear_cross_entropy))", linear=True),
    Impl("jax", "xlsce-materialised", "anchor", "jit(value_and_grad(xlsce.cross_entropy(h @ W.T)))", linear=True),
    Impl("torch", "xlsce-linear", "xlsce", "xlsce.linear_cross_entropy, eager autograd", linear=True),
    Impl("torch", "xlsce-materialised", "anchor", "xlsce.cross_entropy(h @ W.T), eager autograd", linear=True),
    Impl("torch", "F.cross_entropy-materialised", "anchor", "F.cross_entropy(h @ W.T), eager", linear=True),
)


def find_impl(key: str) -> Impl:
    for impl in IMPLS:
        if impl.key == key:
            return impl
    raise KeyError(key)


def to_backend(backend: str, case: Case, *arrays, device: str = "cpu"):
    """The case's NumPy inputs (:func:`cases.make_inputs`) as arrays of ``backend``, floating-point ones in
    the case's dtype, on ``device`` (torch; JAX's arrays go to its default device, see ``JAX_PLATFORMS``)."""
    if backend == "numpy":
        return arrays
    if backend == "torch":
        import torch

        def convert(a):
            t = torch.from_numpy(a)  # shares memory for float32 on the CPU
            return t.to(device, getattr(torch, case.dtype) if t.is_floating_point() else None)

    elif backend == "jax":
        import jax.numpy as jnp

        def convert(a):
            x = jnp.asarray(a)
            return x.astype(case.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    else:
        raise ValueError(backend)
    return tuple(None if a is None else convert(a) for a in arrays)


def probe(device: str, backends):
    """backend -> {"device": what it runs on} or {"error": why it cannot run on ``device``}."""
    out = {}
    for backend in backends:
        try:
            if backend == "torch":
                import torch

                if device == "cuda" and not torch.cuda.is_available():
                    raise RuntimeError(f"torch {torch.__version__}: torch.cuda.is_available() is False")
                name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
                out[backend] = {"device": f"{name} (CUDA {torch.version.cuda})" if device == "cuda" else name}
            elif backend == "jax":
                import jax

                d = jax.devices("gpu" if device == "cuda" else "cpu")[0]
                out[backend] = {"device": f"{d.platform}: {d.device_kind}"}
            elif device != "cpu":
                raise RuntimeError(f"{backend} runs on the CPU only")
            else:
                out[backend] = {"device": "cpu"}
        except Exception as e:  # noqa: BLE001 - reported, and the backend skipped
            out[backend] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    return out


def _l1(grads, norm):
    """Sum of |g| over a gradient or a tuple of them (the linear loss's)."""
    return sum(norm(g) for g in (grads if isinstance(grads, tuple) else (grads,)))


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

    elif name == "xlsce-linear":

        def loss(h, c, y):
            return xlsce.linear_cross_entropy(h, c, y, label_smoothing=EPS)

    elif name.endswith("-materialised"):
        base = _jax_loss(name.removesuffix("-materialised"))

        def loss(h, c, y):
            return base(h @ c.T, y, None)

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

    loss = _jax_loss(impl.name)
    f = jax.jit(loss)
    fg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1) if impl.linear else 0))
    l1 = jax.jit(lambda g: jnp.sum(jnp.abs(g.astype(jnp.float32))))

    def memory_analysis():
        return fg.lower(*arrays).compile().memory_analysis()

    return Bound(
        fwd=lambda: f(*arrays),
        fwdbwd=lambda: fg(*arrays),
        sync=jax.block_until_ready,
        loss_value=float,
        grad_l1=lambda g: _l1(g, lambda x: float(l1(x))),
        memory_analysis=memory_analysis,
        compiled_text=lambda: fg.lower(*arrays).compile().as_text(),
    )


# --------------------------------------------------------------------------- torch


def _torch_loss(name):
    import torch
    import torch.nn.functional as F

    import xlsce

    if name == "xlsce-linear":

        def loss(h, c, y):
            return xlsce.linear_cross_entropy(h, c, y, label_smoothing=EPS)

    elif name.endswith("-materialised"):
        base = _torch_loss(name.removesuffix("-materialised"))

        def loss(h, c, y):
            return base(h @ c.T, y, None)

    elif name.startswith("xlsce"):

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


def _torch_sync(device):
    """Wait for the device (CUDA runs asynchronously; the CPU needs nothing)."""
    import torch

    if device.type != "cuda":
        return lambda out: out

    def sync(out):
        torch.cuda.synchronize(device)
        return out

    return sync


def _torch_host_sync(fn, device):
    """None if ``fn()`` runs without synchronising with the host (``torch.cuda.set_sync_debug_mode``), else why."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)


def _bind_torch(impl: Impl, arrays):
    import torch

    loss = _torch_loss(impl.name)
    n = 2 if impl.linear else 1  # differentiated: the logits, or the hidden states and the classifier
    wrt = [a.detach().requires_grad_(True) for a in arrays[:n]]

    def fwdbwd():
        out = loss(*wrt, *arrays[n:])
        grads = torch.autograd.grad(out, wrt)
        return out.detach(), grads if impl.linear else grads[0]

    device = arrays[0].device
    return Bound(
        fwd=lambda: loss(*arrays),
        fwdbwd=fwdbwd,
        sync=_torch_sync(device),
        loss_value=lambda v: float(v.float()),
        grad_l1=lambda g: _l1(g, lambda x: float(torch.linalg.vector_norm(x, ord=1, dtype=torch.float64))),
        host_sync=(lambda: _torch_host_sync(fwdbwd, device)) if device.type == "cuda" else None,
    )


def _bind_floor(impl: Impl, arrays):
    """The bandwidth floor on the logits: fwd reads them once, fwdbwd also writes a gradient once."""
    z = arrays[0]
    memory_analysis, sync = None, lambda out: out
    if impl.backend == "jax":
        import jax
        import jax.numpy as jnp

        neg, total, sync = jax.jit(jnp.negative), jax.jit(jnp.sum), jax.block_until_ready

        def memory_analysis():
            return neg.lower(z).compile().memory_analysis()

    elif impl.backend == "torch":
        import torch

        neg, total, sync = torch.neg, torch.sum, _torch_sync(z.device)
    else:
        neg, total = np.negative, np.sum
    return Bound(
        fwd=lambda: total(z),
        fwdbwd=lambda: (None, neg(z)),
        sync=sync,
        loss_value=lambda v: None,
        grad_l1=lambda g: None,
        memory_analysis=memory_analysis,
    )


_BINDERS = {"numpy": _bind_numpy, "jax": _bind_jax, "torch": _bind_torch}
