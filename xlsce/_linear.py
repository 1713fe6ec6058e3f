"""Fused linear + cross-entropy over chunks of positions, written once against the array API.

The loss is that of :func:`xlsce._math.forward` on the logits ``z = h W^T + b``
(class axis last), but the ``(N, V)`` logits never exist: the ``N`` positions
are cut into chunks of ``C`` rows and each chunk runs :func:`xlsce._math.forward`
and :func:`xlsce._math.backward` on its own logits, built transposed, ``(V, C)``
with the classes along axis 0::

    z_k^T = W h_k^T + b                     (matmul in the inputs' dtype)
    G_k^T = d loss / d z_k^T                (_math.backward, float32/float64)
    dh_k  = (G_k^T)^T W,    dW += G_k^T h_k,    db += sum over columns of G_k^T

Chunks are reduced with ``"sum"``; ``"mean"`` divides by the global denominator
``D = sum_i m_i w[y_i]`` computed from the targets before the loop (so the
result equals the materialised loss exactly, whatever the chunking).  For
``"sum"``/``"mean"`` the gradients for the cotangent 1 are accumulated during
the forward pass, as Liger-Kernel does, and the backward only scales them by
the cotangent (no recompute); for ``"none"`` the backward recomputes each
chunk's logits with its slice of the cotangent.

Default chunk size (:func:`default_chunk_size`): at most ``CHUNK_BYTES`` (64 MiB)
of logits in the compute dtype, ``C_max = max(1, CHUNK_BYTES // (V * itemsize))``,
then the positions are split into ``n = ceil(N / C_max)`` chunks of equal size
``C = ceil(N / n)`` (so padding in the JAX loop wastes fewer than ``n`` rows).

Eager loops (NumPy, PyTorch) compute each chunk's loss and gradient in one
pass and reuse the two (V, C) buffers from chunk to chunk (:func:`chunk_step`).

The loop is the backend's (``ops.chunk_loop``): :func:`eager_loop` is a Python loop (NumPy,
PyTorch, array-api-strict); the JAX backend runs a ``lax.scan`` over the same
:func:`chunk_step`, so the traced graph does not grow with the number of chunks (and
accumulates dW in row slices of at most CHUNK_BYTES, in place: its ``ops.addmm``).
"""

from __future__ import annotations

import math

from . import _math
from ._types import Config

CHUNK_BYTES = 64 * 2**20


def default_chunk_size(n: int, v: int, itemsize: int) -> int:
    """Rows per chunk: at most CHUNK_BYTES of (rows, v) logits, chunks of equal size."""
    c_max = max(1, CHUNK_BYTES // max(1, v * itemsize))
    if n <= c_max:
        return max(1, n)
    count = -(-n // c_max)
    return -(-n // count)


def chunk_config(cfg: Config) -> Config:
    """Chunks are reduced with "sum" (the mean's denominator is global) or not at all; their logits
    are transposed, (V, rows), the classes along axis 0."""
    return cfg._replace(axis=0, reduction="none" if cfg.reduction == "none" else "sum")


def denominator(ops, cfg, target, weight, where, dt):
    """The 'mean' denominator D = sum_i m_i w[y_i] (0-d array of dtype dt); the number of counted positions
    for probability targets (as PyTorch's mean over them)."""
    xp = ops.xp
    valid = _math.valid_positions(xp, cfg, target, where)
    dev = ops.device(target)
    if weight is None or cfg.soft:
        if valid is None:
            if not ops.eager:  # counted: a size read as a number would fix it (torch.compile(dynamic=True))
                ones = xp.ones_like(target, dtype=dt)
                return xp.sum(ones[:, 0, ...] if cfg.soft else ones)  # soft: (N, V[, D])
            n = math.prod(target.shape) // (target.shape[1] if cfg.soft else 1)
            return xp.asarray(float(n), dtype=dt, device=dev)
        return xp.sum(xp.astype(valid, dt))
    y = target if valid is None else xp.where(valid, target, 0)
    w_y = ops.take_classes(xp.astype(weight, dt), y)  # y (N,) or (N, D)
    if valid is not None:
        w_y = xp.where(valid, w_y, 0.0)
    return xp.sum(w_y)


def chunk_step(ops, cfg, h, classifier, bias, target, weight, where, g, need, acc=(None, None), g_lse=None, work=None):
    """Loss of one chunk of rows and, for ``need = (dh, dW, db)``, its gradients for cotangent ``g``.

    ``cfg`` is a :func:`chunk_config` (reduction "sum" or "none", axis 0).
    ``acc = (dW, db)`` are the accumulators of the previous chunks (None at the
    first; updated in place where the backend allows; ``ops.addmm``).  ``g_lse`` (the chunk's rows, optional) is the cotangent of
    the reported log-sum-exp.  Returns ``(loss, lse, hits, dh, dW, db)``: the loss,
    the lse (None unless ``cfg.return_lse``), the token hits (``_math.token_hits`` of the
    chunk's logits, None unless ``cfg.return_token_accuracy``) and the accumulators in the compute
    dtype, dh in the inputs' dtype; entries not needed are None.

    The logits are built transposed, ``W h_k^T`` of shape (V, rows) with the
    classes along axis 0: on the CPU that product is the faster one, on
    PyTorch's BLAS and on XLA (``python -m benchmarks.linear --products``),
    and the loss's reductions along axis 0 run over contiguous rows.

    ``work`` (backends that write in place, not traced: ``ops.fuse``) is a dict in which the chunk's
    logits and gradient buffers are kept for the next chunk of the same size,
    which writes into them: the loop allocates them once.  Eager, the gradient
    is computed in the forward's pass (``_math.forward`` with the cotangent,
    from its exponentials) unless the lse has a cotangent.
    """
    xp = ops.xp
    in_dt = h.dtype
    dt = ops.compute[in_dt]
    rows = h.shape[0]
    work = work if work is not None and ops.fuse else None  # not traced, not compiled
    z = _keep(work, "z", ops.matmul(classifier, h.T, out=_reuse(work, "z", rows, in_dt)))
    if bias is not None:
        b = xp.reshape(bias, (-1, 1))
        z = z + b if work is None else ops.iadd(z, b)
    if z.dtype != dt:
        z = xp.astype(z, dt)
    d = target.shape[-1] if target.ndim == (3 if cfg.soft else 2) else 1  # a K-dim classifier's d_1 * ... * d_K
    if d > 1 or cfg.soft:  # the logits' columns in order (k, r): position r of the chunk, output k
        z = xp.reshape(z, (z.shape[0] // d, d * rows))  # (V * D, rows) -> (V, D * rows), classes along axis 0
        target = _columns(xp, target, cfg.soft)
        where, g_lse = _columns(xp, where), _columns(xp, g_lse)
        g = _columns(xp, g) if cfg.reduction == "none" else g
    hits = _math.token_hits(ops, cfg, z, target, where) if cfg.return_token_accuracy else None
    dw, db = acc
    if work is not None and any(need) and g_lse is None:  # one pass: the loss and its gradient
        # without smoothing, probability targets or a soft-cap, the pass reads the logits only to shift them
        # (_math._eager_shift): the gradient can overwrite them, one (V, C) buffer less
        in_place = cfg.eps == 0 and not cfg.soft and cfg.softcap is None
        out = z if in_place else _reuse(work, "dz", d * rows, dt)
        loss, res, dz = _math.forward(ops, cfg, z, target, weight, where, g=g, grad_out=out)
        dz = dz if in_place else _keep(work, "dz", dz)
    else:
        loss, res = _math.forward(ops, cfg, z, target, weight, where)
    lse = _math.reported_lse(xp, cfg, res) if cfg.return_lse else None
    if d > 1:  # per position back to (rows, D)
        loss = _rows(xp, loss, rows) if cfg.reduction == "none" else loss
        lse, hits = _rows(xp, lse, rows), _rows(xp, hits, rows)
    if not any(need):
        return loss, lse, hits, None, dw, db
    if work is None or g_lse is not None:
        dz, _ = _math.backward(ops, cfg, z, target, weight, res, g, g_lse=g_lse)
    del z, res
    if d > 1:
        dz = xp.reshape(dz, (dz.shape[0] * d, rows))
    if need[2]:
        db = ops.iadd(db, xp.sum(dz, axis=1))
    if dz.dtype != in_dt:
        dz = xp.astype(dz, in_dt)
    dh = ops.matmul(dz.T, classifier) if need[0] else None
    if need[1]:
        dw = ops.addmm(dw, dz, h)
    return loss, lse, hits, dh, dw, db


def _columns(xp, x, soft=False):
    """A chunk's per-position array, (rows,) or (rows, D), in the order of the logits' columns, k * rows + r:
    (D * rows,); a probability target (rows, V) or (rows, V, D) as (V, D * rows).  None and numbers pass."""
    if x is None or not hasattr(x, "ndim"):
        return x
    if soft:
        v = x.shape[1]
        return xp.permute_dims(x, (1, 0)) if x.ndim == 2 else xp.reshape(xp.permute_dims(x, (1, 2, 0)), (v, -1))
    return x if x.ndim == 1 else xp.reshape(xp.permute_dims(x, (1, 0)), (-1,))


def _rows(xp, x, rows):
    """A per-column array (D * rows,) back to the chunk's positions (rows, D); None passes."""
    return None if x is None else xp.permute_dims(xp.reshape(x, (-1, rows)), (1, 0))


def _reuse(work, name, rows, dtype):
    """The (V, C) buffer ``work[name]`` if it is there, has ``rows`` columns and ``dtype``; else None.

    A buffer is reused only by chunks of its own size (a slice of columns would not be contiguous).
    """
    buf = None if work is None else work.get(name)
    if buf is None or buf.shape[1] != rows or buf.dtype != dtype:
        return None
    return buf


def _keep(work, name, buf):
    """``buf``, kept in ``work`` (if given) for the next chunks unless one is kept already: the first
    chunk's buffers, whose size every later chunk but the last (a smaller one) has."""
    if work is not None:
        work.setdefault(name, buf)
    return buf


def eager_loop(ops, cfg, chunk, need, hidden, classifier, bias, target, weight, where, g, g_lse=None):
    """Python loop over chunks.  Returns ``(total or per-position loss, lse or None, hits or None, dh, dW, db)``."""
    xp = ops.xp
    n, width = hidden.shape
    v = classifier.shape[0]
    dt = ops.compute[hidden.dtype]
    dev = ops.device(hidden)
    losses, lses, hits, dhs, dw, db, total = [], [], [], [], None, None, None
    work = {}  # the chunks' logits and gradient buffers, allocated by the first chunk
    # a count of chunks, not range(0, n, chunk): with a symbolic n (torch.compile(dynamic=True)) the count is
    # what the graph depends on (1 wherever chunk == n), not n itself; slices clamp at n
    for i in range(-(-n // chunk)):
        stop = (i + 1) * chunk
        s = slice(i * chunk, stop if ops.compiling else min(stop, n))  # array-api-strict: stops within n
        gs = g[s, ...] if cfg.reduction == "none" else g
        m = None if where is None else where[s, ...]
        gl = None if g_lse is None else g_lse[s, ...]
        loss, lse, hit, dh, dw, db = chunk_step(
            ops, cfg, hidden[s, :], classifier, bias, target[s, ...], weight, m, gs, need, (dw, db), gl, work
        )
        if cfg.reduction == "none":
            losses.append(loss)
        else:
            total = ops.iadd(total, loss)
        if lse is not None:
            lses.append(lse)
        if hit is not None:
            hits.append(hit)
        if dh is not None:
            dhs.append(dh)
    empty = xp.zeros((0,), dtype=dt, device=dev)
    if cfg.reduction == "none":
        out = xp.concat(losses, axis=0) if losses else empty
    else:
        out = xp.zeros((), dtype=dt, device=dev) if total is None else total
    lse = (xp.concat(lses, axis=0) if lses else empty) if cfg.return_lse else None
    hits = (xp.concat(hits, axis=0) if hits else empty) if cfg.return_token_accuracy else None
    if need[0]:
        dh = xp.concat(dhs, axis=0) if dhs else xp.zeros((0, width), dtype=hidden.dtype, device=dev)
    else:
        dh = None
    if need[1] and dw is None:
        dw = xp.zeros((v, width), dtype=dt, device=dev)
    if need[2] and db is None:
        db = xp.zeros((v,), dtype=dt, device=dev)
    return out, lse, hits, dh, dw, db


def value_and_grads(
    ops,
    cfg,
    hidden,
    classifier,
    bias,
    target,
    weight,
    where,
    *,
    chunk,
    need,
    cotangent=None,
    cotangent_lse=None,
):
    """Loss of the flattened problem, its lse and the gradients ``(dh, dW, db)`` for the cotangents.

    ``hidden`` is (N, H), ``classifier`` (V, H), ``bias`` (V,) or None, ``target``
    and ``where`` (N,).  ``cotangent`` defaults to 1 (ones for "none");
    ``cotangent_lse`` (N,), that of the reported lse, to none.  Returns
    ``(loss, lse, accuracy, grads)``: ``lse`` (N,) is None unless ``cfg.return_lse``, ``accuracy``
    (as ``_math.accuracy_fraction`` reports it) None unless ``cfg.return_token_accuracy``;
    gradients not in ``need`` are None, the others come back in their input's dtype.
    """
    xp = ops.xp
    dt = ops.compute[hidden.dtype]
    dev = ops.device(hidden)
    ccfg = chunk_config(cfg)
    w_shape, b_shape = tuple(classifier.shape), None if bias is None else tuple(bias.shape)
    if classifier.ndim > 2:  # (V, d_1, ..., d_K, H) as (V * D, H), row c * D + k; the bias alike
        classifier = xp.reshape(classifier, (-1, classifier.shape[-1]))
        bias = None if bias is None else xp.reshape(bias, (-1,))
    if cfg.reduction == "none":
        positions = (target.shape[0], *target.shape[2:]) if cfg.soft else target.shape
        g = xp.ones(positions, dtype=dt, device=dev) if cotangent is None else xp.astype(cotangent, dt)
    else:
        g = 1.0 if cotangent is None else cotangent if type(cotangent) is float else xp.astype(cotangent, dt)
        if cfg.reduction == "mean":
            d = denominator(ops, cfg, target, weight, where, dt)
            if weight is not None and cfg.z_loss:  # the z-loss's mean over the counted positions
                valid = _math.valid_positions(xp, cfg, target, where)
                zeta = _math.z_loss_weight(ops, cfg, valid, d, dt, tuple(target.shape))
                ccfg = ccfg._replace(z_loss=zeta)
            empty = d == 0
            d = xp.where(empty, 1.0, d)
            g = xp.where(empty, 0.0, g / d)
    g_lse = None if cotangent_lse is None else xp.astype(cotangent_lse, dt)
    out, lse, hits, dh, dw, db = ops.chunk_loop(
        ccfg, chunk, need, hidden, classifier, bias, target, weight, where, g, g_lse
    )
    accuracy = None if hits is None else _math.accuracy_fraction(ops, cfg, hits, target, where)
    if cfg.reduction == "mean":
        out = xp.where(empty, 0.0, out / d)
    if out.dtype != hidden.dtype:
        out = xp.astype(out, hidden.dtype)
    if lse is not None and lse.dtype != hidden.dtype:
        lse = xp.astype(lse, hidden.dtype)
    if dw is not None and dw.dtype != classifier.dtype:
        dw = xp.astype(dw, classifier.dtype)
    if db is not None and db.dtype != bias.dtype:
        db = xp.astype(db, bias.dtype)
    if dw is not None and tuple(dw.shape) != w_shape:
        dw = xp.reshape(dw, w_shape)
    if db is not None and tuple(db.shape) != b_shape:
        db = xp.reshape(db, b_shape)
    return out, lse, accuracy, (dh, dw, db)
