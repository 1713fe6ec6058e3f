"""The JAX backend: the analytic backward as ``jax.custom_vjp``, and the XLA-specific forms.

Imported only when a JAX array is seen, so that importing xlsce never imports jax.  The
``custom_vjp``/``custom_jvp`` functions are defined at module level, beside the functions they
differentiate; the backend object and the static :class:`~xlsce._types.Config` travel as
non-differentiable arguments.  JAX never reads values to choose a path (``eager`` is False, as
for traced code): XLA fuses the general formulas, and ``lax.cond`` chooses on the device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from .. import _linear, _math
from .._types import Residuals
from . import _compat, generic
from .generic import Generic


class Jax(Generic):
    name = "jax"

    @staticmethod
    def _dtypes(xp):
        # NumPy's dtype objects, which JAX arrays carry, whether or not jax_enable_x64 is set (yet)
        floats = {np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)}
        ints = {np.dtype(f"{u}int{b}") for u in ("", "u") for b in (8, 16, 32, 64)}
        return floats, ints, np.dtype(np.float32), np.dtype(np.float64)

    def require(self, ok, message):
        # values are read only where they live on the host (never a device synchronisation)
        if not self.traced and all(d.platform == "cpu" for d in ok.devices()) and not bool(ok):
            raise ValueError(message)

    def take_at(self, a, index, axis):
        if not _sharded(a, index):
            return super().take_at(a, index, axis)
        return jnp.sum(jnp.where(_classes(a, axis, index.dtype) == index, a, 0), axis=axis, keepdims=True)

    def take_classes(self, v, index):
        if not _sharded(v, index):
            return super().take_classes(v, index)
        spec = tuple(jax.typeof(index).sharding.spec)
        if v.ndim and set(_names(jax.typeof(v).sharding.spec)) & set(_names(spec)):
            v = jax.sharding.reshard(v, P())  # the class axis cannot be sharded on an axis that the positions use
        shape = (*index.shape, v.shape[0])
        sharding = _with_spec(index, (*spec, *jax.typeof(v).sharding.spec))
        classes = jax.lax.broadcasted_iota(index.dtype, shape, index.ndim, out_sharding=sharding)
        return jnp.sum(jnp.where(classes == index[..., None], v, 0), axis=-1)

    def isub_at(self, a, index, v, axis):
        if _sharded(a, index, v):
            return jnp.where(_classes(a, axis, index.dtype) == index, a - v, a)
        if math.prod(a.shape) > generic.SMALL_LOGITS:
            # large logits keep the select: with logits computed inside jit, XLA gives the scatter's
            # operand a buffer of its own instead of reusing the logits' (tests/test_core.py's memory test)
            return super().isub_at(a, index, v, axis)
        # a scatter of N updates: the elementwise gradient kernel then has three operations fewer per
        # element, which keeps XLA's CPU cost model from splitting a small kernel across threads, where
        # the hand-off costs more than the work (at 256x10 with weights and ignored positions: 38 us on
        # two threads, against 6 us on one plus 4 us of scatter; python -m benchmarks.profile --backend jax)
        at = _along_index(a.shape, index, axis)
        return a.at[at].add(-v, mode="drop", indices_are_sorted=True, unique_indices=True)

    def cond_finite(self, like, fast, general):
        """A ``lax.cond`` on the finiteness of ``fast()``'s values, so the general path costs nothing
        where it is not taken.  Small arrays (at most ``SMALL_LOGITS`` elements) take the general path:
        there the test and the cond cost more kernels (about six) than its few fused operations."""
        if math.prod(like.shape) <= generic.SMALL_LOGITS:
            return general()
        values = fast()
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values if v is not None]))
        return jax.lax.cond(ok, lambda: values, general)

    def row_sums(self, terms, axis):
        """One reduction of several operands: separate sums of terms that share an intermediate make
        XLA's CPU backend materialise one (N, K) buffer per term (even in an untaken lax.cond branch)."""
        return [jnp.expand_dims(s, axis) for s in _row_sums(axis, *terms)]

    def row_dot(self, a, v, axis):
        if (
            v is not None
            and axis == a.ndim - 1
            and v.ndim == a.ndim
            and math.prod(v.shape[:-1]) == 1
            and not _sharded(a, v)  # a product over a sharded axis needs an out_sharding: the sum does not
        ):
            return jnp.expand_dims(a @ jnp.reshape(v, (-1,)), axis)  # one pass, no temporary
        return super().row_dot(a, v, axis)

    def matmul(self, a, b, out=None):
        return _product(a, b)

    def addmm(self, acc, a, b):
        """acc + a @ b, ``rows`` rows of ``a`` at a time in a ``lax.fori_loop``, each slice's product at
        most ``CHUNK_BYTES``.  XLA on the CPU does not fuse a product into the addition that consumes it,
        so ``acc + a @ b`` would hold a temporary as large as ``acc`` (the (V, H) gradient of the
        classifier); slice by slice, each slice of the loop's carry is updated in place."""
        if acc is None:
            return super().addmm(acc, a, b)
        if _sharded(acc, a, b):  # each device's shard of acc is updated whole (no slices of a sharded axis)
            return acc + _product(a, b).astype(acc.dtype)
        dt, v = acc.dtype, a.shape[0]
        rows = max(1, _linear.CHUNK_BYTES // max(1, acc.shape[1] * jnp.dtype(dt).itemsize))
        if rows >= v:
            return acc + (a @ b).astype(dt)
        count, tail = divmod(v, rows)

        def body(i, acc):
            start = i * rows
            part = jax.lax.dynamic_slice_in_dim(a, start, rows, axis=0) @ b
            old = jax.lax.dynamic_slice_in_dim(acc, start, rows, axis=0)
            return jax.lax.dynamic_update_slice_in_dim(acc, old + part.astype(dt), start, axis=0)

        acc = jax.lax.fori_loop(0, count, body, acc)
        if tail:
            start = count * rows
            acc = acc.at[start:].add((a[start:] @ b).astype(dt))
        return acc

    def chunk_loop(self, cfg, chunk, need, hidden, classifier, bias, target, weight, where, g, g_lse=None):
        """The chunk loop as one ``lax.scan`` (the graph does not grow with the number of chunks).

        The chunks are strided: ``count = ceil(n / chunk)`` chunks of ``rows = ceil(n / count)`` rows
        (at most ``chunk``), chunk ``k`` holding rows ``k, k + count, k + 2 count, ...`` (the rows
        reshaped ``(rows, count)``, the scan over the second axis).  Rows sharded along the
        positions (GSPMD data parallelism: contiguous blocks, the devices dividing ``rows``) so give
        every chunk rows of every device: each device runs every chunk on its own rows, and the
        hidden states are never gathered.  Where ``count`` does not divide ``n``, the last rows are
        padded (masked with ``where``), which moves the blocks between devices."""
        n, width = hidden.shape
        count = -(-n // chunk)
        rows = -(-n // count) if count else chunk
        pad = count * rows - n
        dt = self.compute[hidden.dtype]

        def split(x):  # (n, ...) -> (count, rows, ...), chunk k = rows k::count
            if x is None:
                return None
            x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x
            return jnp.swapaxes(x.reshape(rows, count, *x.shape[1:]), 0, 1)

        def join(x):  # the inverse of split
            if x is None:
                return None
            x = jnp.swapaxes(x, 0, 1).reshape(rows * count, *x.shape[2:])
            return x[:n] if pad else x

        if pad and where is None:
            where = jnp.ones((n,), dtype=bool)  # the padded rows: False
        xs = (split(hidden), split(target), split(where), split(g) if cfg.reduction == "none" else None, split(g_lse))
        init = (
            jnp.zeros((), dt),  # zeros_like: the accumulators keep the parameters' sharding (Explicit meshes)
            jnp.zeros_like(classifier, dtype=dt) if need[1] else None,
            jnp.zeros_like(bias, dtype=dt) if need[2] else None,
        )

        def body(carry, x):
            total, dw, db = carry
            h, t, m, gk, gl = x
            gk = g if gk is None else gk
            loss, lse, dh, dw, db = _linear.chunk_step(
                self, cfg, h, classifier, bias, t, weight, m, gk, need, (dw, db), gl
            )
            if cfg.reduction == "none":
                return (total, dw, db), (loss, lse, dh)
            return (total + loss, dw, db), (None, lse, dh)

        (total, dw, db), (losses, lses, dhs) = jax.lax.scan(body, init, xs)
        out = join(losses) if cfg.reduction == "none" else total
        return out, join(lses), join(dhs), dw, db

    # ------------------------------------------------------------------ entry points: custom_vjp

    def loss(self, cfg, logits, target, weight, where):
        return _loss(self, cfg, logits, target, weight, where)

    def linear_loss_flat(self, cfg, chunk, hidden, classifier, bias, target, weight, where):
        return _linear_loss(self, cfg, chunk, hidden, classifier, bias, target, weight, where)


# One backend object per mode (traced or not), made at import.
_INSTANCES = {traced: Jax(jnp, _compat.device, traced=traced) for traced in (False, True)}


def backend(x):
    """The backend for a call whose first array is ``x``: traced (a tracer) or not."""
    return _INSTANCES[isinstance(x, jax.core.Tracer)]


def _names(spec):
    """The mesh axis names in a PartitionSpec."""
    return [n for p in spec if p is not None for n in (p if isinstance(p, tuple) else (p,))]


def _sharded(*arrays):
    """Whether an array's type names a mesh axis (Explicit sharding; read from the abstract value,
    never from the values).  Gathers and scatters there need an output sharding that XLA cannot
    infer (``ShardingTypeError``); the index operations then take gather-free forms, a select
    against the class indices and a row sum, which every sharding accepts and which cost a pass
    over the logits that the gather does not (python -m benchmarks.ab, docs/scaling-out.md)."""
    return any(a is not None and _names(jax.typeof(a).sharding.spec) for a in arrays if hasattr(a, "shape"))


def _product(a, b):
    """a @ b (2-d).  On an Explicit mesh the result keeps the sharding of ``a``'s rows and ``b``'s
    columns; a contraction over a sharded axis is then summed over its devices (an all-reduce of
    the result's size, as GSPMD does on Auto axes)."""
    if not _sharded(a, b):
        return a @ b
    rows, cols = jax.typeof(a).sharding.spec[0], jax.typeof(b).sharding.spec[-1]
    if set(_names((rows,))) & set(_names((cols,))):
        cols = None
    return jnp.matmul(a, b, out_sharding=P(rows, cols))


def _with_spec(like, spec):
    """The sharding of ``like``'s mesh with ``spec``."""
    return jax.sharding.NamedSharding(jax.typeof(like).sharding.mesh, P(*spec))


def _classes(a, axis, dtype):
    """The class index of every element of ``a`` (along ``axis``), sharded as ``a``: a select's
    operands must share their sharding on an Explicit mesh."""
    return jax.lax.broadcasted_iota(dtype, a.shape, axis, out_sharding=jax.typeof(a).sharding)


def _along_index(shape, index, axis):
    """The fancy index of an array of ``shape`` at ``index`` along ``axis`` (``index`` keepdims)."""
    aranges = tuple(
        None if i == axis else jnp.arange(s).reshape(tuple(s if j == i else 1 for j in range(len(shape))))
        for i, s in enumerate(shape)
    )
    return aranges[:axis] + (index,) + aranges[axis + 1 :]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _row_sums(axis, *terms):
    """One ``lax.reduce`` of several operands along ``axis``.  Its derivative is its own (JAX's rule for a
    reduction of several operands fails on the symbolic zero of a constant term, e.g. the mask of the
    classes in play, which differentiating xlsce's analytic backward, for a Hessian, meets)."""
    zero = jnp.zeros((), dtype=terms[0].dtype)
    return jax.lax.reduce(
        terms, (zero,) * len(terms), lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)), (axis,)
    )


@_row_sums.defjvp
def _row_sums_jvp(axis, primals, tangents):  # linear: the sums of the tangents, one reduction each (transposable)
    return _row_sums(axis, *primals), tuple(jnp.sum(t, axis=axis) for t in tangents)


# --------------------------------------------------------------------------- cross_entropy


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _loss(ops, cfg, logits, target, weight, where):
    return Generic.loss(ops, cfg, logits, target, weight, where)


def _loss_fwd(ops, cfg, logits, target, weight, where):
    if weight is not None and weight.perturbed:
        raise TypeError("weight must not be differentiated: xlsce provides no gradient for class weights")
    need_target = target.perturbed
    logits, target = logits.value, target.value
    weight = None if weight is None else weight.value
    where = None if where is None else where.value
    out, res = _math.forward(ops, cfg, logits, target, weight, where)
    if cfg.return_lse:
        out = (out, ops.reported_lse(cfg, res, logits))
    res = Residuals(*(r if r is None or isinstance(r, bool) else jnp.asarray(r) for r in res))
    return out, (logits, target, weight, res, need_target)


def _loss_bwd(ops, cfg, saved, g):
    logits, target, weight, res, need_target = saved
    g, g_lse = g if cfg.return_lse else (g, None)
    if isinstance(g, SymbolicZero):
        g = jnp.zeros(g.shape, g.dtype)
    if isinstance(g_lse, SymbolicZero):
        g_lse = None
    dlogits, dtarget = _math.backward(ops, cfg, logits, target, weight, res, g, need_target=need_target, g_lse=g_lse)
    if dtarget is not None:
        dtarget = dtarget.astype(target.dtype)
    return dlogits, dtarget, None, None


_loss.defvjp(_loss_fwd, _loss_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------- linear_cross_entropy


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _linear_loss(ops, cfg, chunk, hidden, classifier, bias, target, weight, where):
    return Generic.linear_loss_flat(ops, cfg, chunk, hidden, classifier, bias, target, weight, where)


def _linear_loss_fwd(ops, cfg, chunk, hidden, classifier, bias, target, weight, where):
    """Residuals ``(inputs, flags, grads)``: the inputs where the backward may recompute ("none", or
    a differentiated lse), the gradients accumulated in the forward for "sum"/"mean"."""
    if weight is not None and weight.perturbed:
        raise TypeError("weight must not be differentiated: xlsce provides no gradient for class weights")
    need = (hidden.perturbed, classifier.perturbed, bias is not None and bias.perturbed)
    hidden, classifier, target = hidden.value, classifier.value, target.value
    bias, weight, where = (None if x is None else x.value for x in (bias, weight, where))
    args = (ops, cfg, hidden, classifier, bias, target, weight, where)
    forward_need = (False,) * 3 if cfg.reduction == "none" else need
    out, lse, grads = _linear.value_and_grads(*args, chunk=chunk, need=forward_need)
    inputs = args[2:] if cfg.reduction == "none" or cfg.return_lse else None
    # `need` travels in the residuals' structure (None = not needed): residuals must be arrays.
    flags = tuple(jnp.zeros((0,)) if f else None for f in need)
    grads = None if cfg.reduction == "none" else grads
    return ((out, lse) if cfg.return_lse else out), (inputs, flags, grads)


def _linear_loss_bwd(ops, cfg, chunk, saved, g):
    inputs, flags, grads = saved
    g, g_lse = g if cfg.return_lse else (g, None)
    if isinstance(g_lse, SymbolicZero):
        g_lse = None
    if isinstance(g, SymbolicZero):
        g = None if grads is not None and g_lse is None else jnp.zeros(g.shape, g.dtype)
    if g is None:  # neither output is differentiated
        return (None,) * 6
    if grads is None or g_lse is not None:
        need = tuple(f is not None for f in flags)
        _, _, grads = _linear.value_and_grads(
            ops, cfg, *inputs, chunk=chunk, need=need, cotangent=g, cotangent_lse=g_lse
        )
    else:
        grads = tuple(None if x is None else (g * x).astype(x.dtype) for x in grads)
    return (*grads, None, None, None)


_linear_loss.defvjp(_linear_loss_fwd, _linear_loss_bwd, symbolic_zeros=True)
