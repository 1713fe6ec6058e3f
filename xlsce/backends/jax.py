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
from typing import NamedTuple

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

    def asarray_like(self, x, like):
        return jnp.asarray(x)  # a constant under tracing; a tracer has no device to ask

    def require(self, ok, message):
        # values are read only where they live on the host (never a device synchronisation)
        # (ok is traced also where the logits are not: arrays closed over by a jitted function)
        if isinstance(ok, jax.core.Tracer) or self.traced:
            return
        if all(d.platform == "cpu" for d in ok.devices()) and not bool(ok):
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

    def input_grad(self, grad, like, whole=False):
        """Inside ``shard_map``: ``grad`` summed over the mesh axes that it varies over and ``like`` does not (an
        input the same on each device of an axis, typed invariant there: the transpose of its implicit
        ``pvary``), as JAX's own differentiation would; ``whole`` is read from the types."""
        if grad is None:
            return None
        axes = _vma(grad) - _vma(like)
        return jax.lax.psum(grad, tuple(sorted(axes))) if axes else grad

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

        positions = (n, *target.shape[2:]) if cfg.soft else target.shape  # (N,), or (N, D): a K-dim classifier
        if pad and where is None:
            where = jnp.ones(positions, dtype=bool)  # the padded rows: False
        xs = (split(hidden), split(target), split(where), split(g) if cfg.reduction == "none" else None, split(g_lse))
        init = (
            jnp.zeros((), dt),  # zeros_like: the accumulators keep the parameters' sharding (Explicit meshes)
            jnp.zeros_like(classifier, dtype=dt) if need[1] else None,
            jnp.zeros_like(bias, dtype=dt) if need[2] else None,
        )
        # inside shard_map the carry's type names the mesh axes its value varies over: those of the inputs
        # (the loss's but the axis it is summed over, vocabulary parallel), so that the body keeps it
        inputs = (hidden, classifier, bias, target, weight, where, g, g_lse)
        summed = getattr(self, "axis_name", ())
        init = (_varying(init[0], inputs, summed if isinstance(summed, tuple) else (summed,)),) + tuple(
            None if x is None else _varying(x, inputs) for x in init[1:]
        )

        def body(carry, x):
            total, dw, db = carry
            h, t, m, gk, gl = x
            gk = g if gk is None else gk
            loss, lse, hits, dh, dw, db = _linear.chunk_step(
                self, cfg, h, classifier, bias, t, weight, m, gk, need, (dw, db), gl
            )
            if cfg.reduction == "none":
                return (total, dw, db), (loss, lse, hits, dh)
            return (total + loss, dw, db), (None, lse, hits, dh)

        (total, dw, db), (losses, lses, hits, dhs) = jax.lax.scan(body, init, xs)
        out = join(losses) if cfg.reduction == "none" else total
        return out, join(lses), join(hits), join(dhs), dw, db

    # ------------------------------------------------------------------ entry points: custom_jvp / custom_vjp

    def loss(self, cfg, logits, target, weight, where):
        return _loss(self, cfg.static(), logits, target, weight, where, cfg.settings())

    def linear_loss_flat(self, cfg, chunk, hidden, classifier, bias, target, weight, where):
        args = (hidden, classifier, bias, target, weight, where, cfg.settings())
        # inside shard_map (an array typed varying over a mesh axis) without symbolic zeros, which JAX's
        # shard_map does not implement for custom_vjp where it runs eagerly
        manual = any(_vma(a) for a in args[:6] if a is not None)
        return (_linear_loss_dense if manual else _linear_loss)(self, cfg.static(), chunk, *args)

    def class_shards(self, axis_name=None, process_group=None):
        if process_group is not None:
            raise ValueError("process_group= is for torch tensors; inside JAX's shard_map pass axis_name=")
        return _class_shards(axis_name)


class JaxShards(generic.ClassShards, Jax):
    """Vocabulary parallel inside ``shard_map``/``pmap`` over the mesh axis ``axis_name``
    (:class:`~xlsce.backends.generic.ClassShards`): ``lax.pmax``/``lax.psum``, the shard
    ``lax.axis_index``.  Traced always (the values inside ``shard_map`` are tracers)."""

    def __init__(self, axis_name):
        super().__init__(jnp, _compat.device, traced=True)
        self.axis_name = axis_name
        self.name = f"jax (vocabulary parallel over {axis_name!r})"

    @property
    def shards(self):
        return jax.lax.axis_size(self.axis_name)

    def shard_index(self):
        return jax.lax.axis_index(self.axis_name)

    def all_max(self, x):
        return jax.lax.pmax(x, self.axis_name)

    def all_sum(self, x):
        return jax.lax.psum(x, self.axis_name)

    def input_grad(self, grad, like, whole=False):
        return Jax.input_grad(self, grad, like, whole)

    def row_sums(self, terms, axis):
        return list(self.all_sum(tuple(Jax.row_sums(self, terms, axis))))  # one psum of the tuple

    def cond_finite(self, like, fast, general):
        return general()  # the branches' collectives would run under a lax.cond: one path, fused by XLA


@functools.cache
def _class_shards(axis_name):
    """One backend per mesh axis (a nondiff argument of the custom derivatives: hashed by identity)."""
    return JaxShards(axis_name)


# One backend object per mode (traced or not), made at import.
_INSTANCES = {traced: Jax(jnp, _compat.device, traced=traced) for traced in (False, True)}


def backend(x):
    """The backend for a call whose first array is ``x``: traced (a tracer) or not."""
    return _INSTANCES[isinstance(x, jax.core.Tracer)]


def _vma(x):
    """The manual mesh axes (``shard_map``) that ``x``'s value varies over: empty outside ``shard_map``."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; `vma` before
    return set(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _varying(x, like, drop=()):
    """``x`` typed as varying over the manual mesh axes (``shard_map``) that the arrays ``like`` vary over,
    but ``drop``; outside ``shard_map``, ``x``."""
    axes = set().union(*(_vma(a) for a in like if hasattr(a, "shape")))
    axes -= set(drop) | _vma(x)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


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


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _loss(ops, cfg, logits, target, weight, where, settings):
    """The loss, differentiated by :func:`_loss_jvp` in forward and in reverse mode.  ``settings``:
    the label smoothing and z-loss given as arrays (``cfg`` holds ``OPERAND`` there), or None."""
    return Generic.loss(ops, cfg.with_settings(settings), logits, target, weight, where)


def _zero(t):
    return t is None or isinstance(t, SymbolicZero)


@functools.partial(_loss.defjvp, symbolic_zeros=True)
def _loss_jvp(ops, cfg, primals, tangents):
    """The tangent of the loss is linear in the tangents of the logits and of a soft target,
    ``sum_c dloss/dz_c * t_c``; it is computed by :func:`_tangent` under ``jax.checkpoint``, so that
    reverse mode (which transposes it) saves only the logits and the forward's O(N) residuals, and
    recomputes the analytic gradient from them, as a ``custom_vjp`` would.  The loss is affine in the
    label smoothing and in the z-loss weight, so their tangents (where they are arrays) are
    ``t * (loss(1) - loss(0))``: two more forward passes, only where they are differentiated."""
    logits, target, weight, where, settings = primals
    t_logits, t_target, t_weight, _, t_settings = tangents
    if not _zero(t_weight):
        raise TypeError("weight must not be differentiated: xlsce provides no gradient for class weights")
    c = cfg.with_settings(settings)
    out, res = _math.forward(ops, c, logits, target, weight, where)
    if cfg.return_lse:
        out = (out, ops.reported_lse(c, res, logits))
    t_logits = None if _zero(t_logits) else t_logits
    t_target = None if _zero(t_target) or not cfg.soft else t_target
    shape = out[0].shape if cfg.return_lse else out.shape
    if t_logits is None and t_target is None:
        t_out = jnp.zeros(shape, logits.dtype)
        t_lse = None if not cfg.return_lse else jnp.zeros(out[1].shape, out[1].dtype)
    else:
        # the residuals' Python numbers and flags stay static (closed over); the arrays are operands
        static = tuple(r if r is None or type(r) in (bool, float) else None for r in res)
        arrays = tuple(None if r is None or type(r) in (bool, float) else r for r in res)
        linear = jax.checkpoint(functools.partial(_tangent, ops, cfg, static))
        t_out, t_lse = linear(logits, target, weight, arrays, settings, t_logits, t_target)
    if settings is not None:
        for name, value, t in zip(("eps", "z_loss"), settings, t_settings, strict=True):
            if value is not None and not _zero(t):  # the loss is affine in it: the slope is loss(1) - loss(0)
                one, zero = (
                    _math.forward(ops, c._replace(**{name: v}), logits, target, weight, where)[0] for v in (1.0, 0.0)
                )
                t_out = t_out + (t * (one - zero)).astype(t_out.dtype)
    return out, ((t_out, t_lse) if cfg.return_lse else t_out)


def _tangent(ops, cfg, static, logits, target, weight, arrays, settings, t_logits, t_target):
    """``(sum_c dloss/dz_c t_c + sum_c dloss/dq_c tq_c, sum_c softmax_c t_c)`` reduced as the loss (the
    second only with ``return_lse``): from the analytic backward at a unit cotangent.  The residuals
    are ``static`` (Python values) where ``arrays`` holds None, else the arrays."""
    res = Residuals(*(a if a is not None else v for a, v in zip(arrays, static, strict=True)))
    c = cfg.with_settings(settings)
    dz, dtarget = _math.backward(ops, c, logits, target, weight, res, 1.0, need_target=t_target is not None)
    axes = (cfg.axis,) if cfg.reduction == "none" else None
    dt = ops.compute[logits.dtype]  # the sums in the compute dtype (half-precision logits: float32)

    def dot(a, b):  # over this shard's classes, then every shard's (vocabulary parallel)
        return ops.across(jnp.sum(a.astype(dt) * b.astype(dt), axis=axes))

    t_out = 0.0
    if t_logits is not None:
        t_out = dot(dz, t_logits)
    if t_target is not None:
        t_out = t_out + dot(dtarget, t_target)
    dtype = logits.dtype
    t_lse = None
    if cfg.return_lse:
        t_lse = jnp.zeros(tuple(s for i, s in enumerate(logits.shape) if i != cfg.axis), dtype)
        if t_logits is not None:
            ones = jnp.ones(t_lse.shape, dtype)
            softmax, _ = _math.backward(ops, c, logits, target, weight, res, 0.0, g_lse=ones)
            t_lse = ops.across(jnp.sum(softmax * t_logits, axis=cfg.axis)).astype(dtype)
    return jnp.asarray(t_out).astype(dtype), t_lse


# --------------------------------------------------------------------------- linear_cross_entropy


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _linear_loss(ops, cfg, chunk, hidden, classifier, bias, target, weight, where, settings):
    cfg = cfg.with_settings(settings)
    return Generic.linear_loss_flat(ops, cfg, chunk, hidden, classifier, bias, target, weight, where)


def _linear_loss_fwd(ops, cfg, chunk, hidden, classifier, bias, target, weight, where, settings):
    """Residuals ``(inputs, flags, grads)``: the inputs where the backward may recompute ("none", or
    a differentiated lse), the gradients accumulated in the forward for "sum"/"mean"."""
    if weight is not None and weight.perturbed:
        raise TypeError("weight must not be differentiated: xlsce provides no gradient for class weights")
    if settings is not None and any(x is not None and x.perturbed for x in settings):
        raise TypeError(
            "label_smoothing and z_loss must not be differentiated in linear_cross_entropy (no gradient for them)"
        )
    if settings is not None:
        cfg = cfg.with_settings(tuple(None if x is None else x.value for x in settings))
    need = (hidden.perturbed, classifier.perturbed, bias is not None and bias.perturbed)
    hidden, classifier, target = hidden.value, classifier.value, target.value
    bias, weight, where = (None if x is None else x.value for x in (bias, weight, where))
    args = (ops, cfg, hidden, classifier, bias, target, weight, where)
    forward_need = (False,) * 3 if cfg.reduction == "none" else need
    out, lse, accuracy, grads = _linear.value_and_grads(*args, chunk=chunk, need=forward_need)
    inputs = args[2:] if cfg.reduction == "none" or cfg.return_lse else None
    # `need` travels in the residuals' structure (None = not needed): residuals must be arrays.  Each is an
    # empty slice of its input, which carries the input's type inside shard_map (the mesh axes it varies over)
    flags = tuple(x.reshape(-1)[:0] if f else None for f, x in zip(need, (hidden, classifier, bias), strict=True))
    grads = None if cfg.reduction == "none" else grads
    settings = None if settings is None else cfg.settings()
    return generic.linear_outputs(cfg, out, lse, accuracy), (inputs, flags, grads, settings)


def _linear_loss_bwd(ops, cfg, chunk, saved, g):
    inputs, flags, grads, settings = saved
    cfg = cfg.with_settings(settings)
    # the cotangents: the loss's, the lse's if cfg.return_lse, the accuracy's (not differentiable: ignored)
    g, g_lse = (g[0], g[1] if cfg.return_lse else None) if cfg.return_lse or cfg.return_token_accuracy else (g, None)
    if isinstance(g_lse, SymbolicZero):
        g_lse = None
    if isinstance(g, SymbolicZero):
        g = None if grads is not None and g_lse is None else jnp.zeros(g.shape, g.dtype)
    if g is None:  # neither output is differentiated
        return (None,) * 7
    if grads is None or g_lse is not None:
        need = tuple(f is not None for f in flags)
        _, _, _, grads = _linear.value_and_grads(
            ops,
            cfg._replace(return_token_accuracy=False),
            *inputs,
            chunk=chunk,
            need=need,
            cotangent=g,
            cotangent_lse=g_lse,
        )
    else:
        grads = tuple(None if x is None else (g * x).astype(x.dtype) for x in grads)
    grads = tuple(ops.input_grad(x, f) for x, f in zip(grads, flags, strict=True))  # typed as the inputs
    return (*grads, None, None, None, None)


_linear_loss.defvjp(_linear_loss_fwd, _linear_loss_bwd, symbolic_zeros=True)


class _Primal(NamedTuple):
    """An input of :func:`_linear_loss_dense` as :func:`_linear_loss_fwd` reads a symbolic-zeros primal."""

    value: object
    perturbed: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _linear_loss_dense(ops, cfg, chunk, hidden, classifier, bias, target, weight, where, settings):
    """:func:`_linear_loss` without symbolic zeros (inside ``shard_map``): the gradients of hidden,
    classifier and bias are all computed; weight, target, mask and settings get none."""
    cfg = cfg.with_settings(settings)
    return Generic.linear_loss_flat(ops, cfg, chunk, hidden, classifier, bias, target, weight, where)


def _linear_loss_dense_fwd(ops, cfg, chunk, hidden, classifier, bias, target, weight, where, settings):
    def wrap(x, perturbed):
        return None if x is None else _Primal(x, perturbed)

    args = [wrap(x, i < 3) for i, x in enumerate((hidden, classifier, bias, target, weight, where))]
    settings = None if settings is None else tuple(wrap(x, False) for x in settings)
    return _linear_loss_fwd(ops, cfg, chunk, *args, settings)


_linear_loss_dense.defvjp(_linear_loss_dense_fwd, _linear_loss_bwd)
