"""The Dask backend: the NumPy backend run on each chunk of positions, lazily.

A call builds a Dask graph and computes nothing.  Each task runs xlsce's NumPy backend (the same
:mod:`xlsce._math` / :mod:`xlsce._linear`, in place and in cache-sized blocks) on one chunk of
positions with every class, through :func:`dask.array.blockwise`; the chunks' per-position losses
are summed by Dask, and the mean's denominator (:func:`xlsce._math.mean_denominator`, from the
targets alone) is a 0-d Dask array that the gradient's tasks receive as their cotangent's scale.
Memory stays bounded by the chunks: a graph over logits larger than memory streams through it
(``python -m benchmarks.scale_dask``).

* The class axis must be one chunk; logits (and soft targets, class weights, the classifier) chunked
  along it are rechunked to one chunk along it (``rechunk({axis: -1})``), which makes the chunks
  larger: chunk the positions instead.  Targets and masks are aligned with the logits' chunks.
* Every array of a call must be a Dask array (``dask.array.asarray`` a NumPy weight or classifier).
* What cannot be checked before compute: the values.  A class index outside ``[0, K)`` (neither
  ``ignore_index`` nor masked) raises xlsce's ``ValueError`` from the task that meets it, when the
  result is computed (Dask re-raises it from ``compute()``), never a NumPy IndexError; a negative
  array ``denominator`` is not refused.
* ``value_and_grad`` returns the loss and the gradient from the same tasks: compute them together
  (``dask.compute(loss, grad)``) for one pass over the logits.
"""

from __future__ import annotations

import functools
import math
import string

import dask.array as da
import numpy as np

from .. import _math
from . import _compat
from .generic import Generic
from .numpy import NumPy

_NUMPY = NumPy(_compat.array_namespace(np.empty(0)), _compat.device)  # the backend of every chunk


class Dask(Generic):
    name = "dask"

    def __init__(self, xp, device):
        super().__init__(xp, device, traced=True, on_cpu=True)

    def take_classes(self, v, index):
        """``v[index]`` chunk by chunk (array-api-compat's Dask namespace lacks an index gather that takes a
        Dask array of any shape); an index out of range raises xlsce's ValueError when computed."""
        ind = _letters(index.ndim)
        return _blockwise(_take, ind, index, ind, v.rechunk(-1), "z", dtype=v.dtype)

    # ------------------------------------------------------------------ entry points

    def loss(self, cfg, logits, target, weight, where):
        args, pos, ind = self._inputs(cfg, logits, target, weight, where)
        if cfg.reduction != "none" and not cfg.return_lse:  # one task per chunk: its sum and its count
            return self._sum_and_count(cfg, _sum_block, args, pos, logits.dtype)
        meta = np.empty((0,) * len(pos), dtype=logits.dtype)
        fn = functools.partial(_loss_block, cfg=cfg._replace(reduction="none"))
        loss = _blockwise(fn, pos, *args, dtype=logits.dtype, meta=meta)
        if cfg.return_lse:
            loss, lse = (_entry(loss, pos, pos, i, meta) for i in (0, 1))
        out = self._reduce(cfg, loss, logits.dtype, target, weight, where)
        return (out, lse) if cfg.return_lse else out

    def value_and_grad(self, cfg, logits, target, weight, where, cotangent):
        args, pos, ind = self._inputs(cfg, logits, target, weight, where)
        g, d = self._scaled_cotangent(cfg, cotangent, target, weight, where, self.compute[logits.dtype])
        meta = np.empty((0,) * logits.ndim, dtype=logits.dtype)
        fn = functools.partial(_grad_block, cfg=cfg._replace(reduction="none"))
        both = _blockwise(fn, ind, *args, *_scalar_or(g, pos), dtype=logits.dtype, meta=meta)
        grad = _entry(both, ind, ind, 1, meta)
        loss = _entry(both, ind, pos, 0, np.empty((0,) * len(pos), dtype=logits.dtype))
        return self._reduce(cfg, loss, logits.dtype, target, weight, where, d), grad

    def linear_loss(self, cfg, chunk, hidden, classifier, bias, target, weight, where):
        args, pos = self._linear_inputs(hidden, classifier, bias, target, weight, where)
        if cfg.reduction != "none" and not cfg.return_lse:
            return self._sum_and_count(cfg, functools.partial(_linear_sum_block, chunk=chunk), args, pos, hidden.dtype)
        meta = np.empty((0,) * len(pos), dtype=hidden.dtype)
        fn = functools.partial(_linear_block, cfg=cfg._replace(reduction="none"), chunk=chunk)
        loss = _blockwise(fn, pos, *args, dtype=hidden.dtype, meta=meta)
        if cfg.return_lse:
            loss, lse = (_entry(loss, pos, pos, i, meta) for i in (0, 1))
        out = self._reduce(cfg, loss, hidden.dtype, target, weight, where)
        return (out, lse) if cfg.return_lse else out

    def linear_value_and_grads(self, cfg, chunk, hidden, classifier, bias, target, weight, where, *, need, cotangent):
        args, pos = self._linear_inputs(hidden, classifier, bias, target, weight, where)
        dt = self.compute[hidden.dtype]
        g, d = self._scaled_cotangent(cfg, cotangent, target, weight, where, dt)
        ind = pos + "h"
        meta = np.empty((0,) * hidden.ndim, dtype=hidden.dtype)
        fn = functools.partial(_linear_grad_block, cfg=cfg._replace(reduction="none"), chunk=chunk, need=need)
        every = _blockwise(fn, ind, *args, *_scalar_or(g, pos), meta=meta)
        loss = _entry(every, ind, pos, 0, np.empty((0,) * len(pos), dtype=hidden.dtype))
        dh = _entry(every, ind, ind, 1, meta) if need[0] else None
        v = classifier.shape[0]
        lead = {"adjust_chunks": {p: 1 for p in pos}, "lead": len(pos)}  # one product per chunk, then summed
        dw = db = None
        if need[1]:
            m = np.empty((0,) * (len(pos) + 2), dtype=classifier.dtype)
            parts = _entry(every, ind, pos + "vh", 2, m, new_axes={"v": v}, **lead)
            dw = da.sum(parts, axis=tuple(range(len(pos))), dtype=dt).astype(classifier.dtype)
        if need[2]:
            m = np.empty((0,) * (len(pos) + 1), dtype=bias.dtype)
            parts = _entry(every, ind, pos + "v", 3, m, new_axes={"v": v}, **lead)
            db = da.sum(parts, axis=tuple(range(len(pos))), dtype=dt).astype(bias.dtype)
        return self._reduce(cfg, loss, hidden.dtype, target, weight, where, d), (dh, dw, db)

    # ------------------------------------------------------------------ the graph's pieces

    def _inputs(self, cfg, logits, target, weight, where):
        """blockwise's ``(array, index)`` pairs for the chunk functions, the positions' and the logits'
        indices; the class axis in one chunk."""
        ax = cfg.axis
        ind = _letters(logits.ndim)
        pos = ind[:ax] + ind[ax + 1 :]
        logits = _one_chunk(logits, ax)
        target = _one_chunk(target, ax) if cfg.soft else target
        args = [logits, ind, target, ind if cfg.soft else pos]
        args += [None, None] if where is None else [where, pos]
        args += [None, None] if weight is None else [weight.rechunk(-1), ind[ax]]
        return args, pos, ind

    def _linear_inputs(self, hidden, classifier, bias, target, weight, where):
        """blockwise's pairs for the linear chunk functions (positions, ``h``: hidden, ``v``: classes)."""
        pos = _letters(hidden.ndim - 1)
        args = [_one_chunk(hidden, hidden.ndim - 1), pos + "h", classifier.rechunk(-1), "vh"]
        args += [None, None] if bias is None else [bias.rechunk(-1), "v"]
        args += [target, pos]
        args += [None, None] if where is None else [where, pos]
        args += [None, None] if weight is None else [weight.rechunk(-1), "v"]
        return args, pos

    def _denominator(self, cfg, target, weight, where):
        """The mean's denominator, a 0-d Dask array (or a Python number for probability targets without a
        mask), from the targets alone: the NumPy count of each chunk, summed."""
        if cfg.soft:
            if where is None:
                positions = tuple(target.shape[: cfg.axis]) + tuple(target.shape[cfg.axis + 1 :])
                return float(math.prod(positions))
            return da.sum(where.astype(np.int64))
        return _math.mean_denominator(self, cfg, target, weight, where)

    def _sum_and_count(self, cfg, block, args, pos, dtype):
        """The "sum" or "mean" loss from one task per chunk, which returns its sum and (for "mean") its
        denominator (float64: counts exact to 2**53), summed over the chunks."""
        mean = cfg.reduction == "mean"
        fn = functools.partial(block, cfg=cfg._replace(reduction="sum"), mean=mean, lead=len(pos))
        meta = np.empty((0,) * (len(pos) + 1), dtype=np.float64)
        parts = _blockwise(fn, pos + "S", *args, new_axes={"S": 2}, adjust_chunks={p: 1 for p in pos}, meta=meta)
        total = da.sum(parts, axis=tuple(range(len(pos))))
        out = _math.divide(self, total[0], total[1]) if mean else total[0]
        return out.astype(dtype)

    def _scaled_cotangent(self, cfg, cotangent, target, weight, where, dt):
        """``(g, d)``: the cotangent of each position's loss (``cotangent / D`` for "mean"; a Python number or
        0-d Dask array, or one per position for "none") and the mean's denominator ``D`` (None otherwise)."""
        g = 1.0 if cotangent is None else cotangent
        if cfg.reduction != "mean":
            return g, None
        d = self._denominator(cfg, target, weight, where)
        return _math.divide(self, g, d, dt), d

    def _reduce(self, cfg, loss, dtype, target, weight, where, d=None):
        """The chunks' per-position losses reduced as ``cfg.reduction``; ``d``: the mean's denominator
        (computed from the targets when not given)."""
        if cfg.reduction == "none":
            return loss
        total = da.sum(loss, dtype=self.compute[dtype])
        if cfg.reduction == "mean":
            total = _math.divide(self, total, self._denominator(cfg, target, weight, where) if d is None else d)
        return total.astype(dtype)


def _letters(n):
    return string.ascii_lowercase[:n]


def _one_chunk(x, axis):
    return x.rechunk({axis: -1}) if len(x.chunks[axis]) > 1 else x


def _scalar_or(g, pos):
    """The cotangent as blockwise arguments: a Python number or 0-d array (broadcast), or one per position."""
    if not hasattr(g, "ndim"):
        return (float(g), None)
    return (g, "" if g.ndim == 0 else pos)


# --------------------------------------------------------------------------- the chunk functions (NumPy)


def _check_classes(cfg, k, target, where):
    """The class-range check of ``xlsce._checks``, run on each chunk (its values exist only there)."""
    bad = (target < 0) | (target >= k)
    if cfg.ignore_index is not None:
        bad &= target != cfg.ignore_index
    if where is not None:
        bad &= where
    if bad.any():
        raise ValueError(
            f"target holds class indices outside [0, {k}) that are neither ignore_index ({cfg.ignore_index}) "
            f"nor masked by where (e.g. {target[bad].flat[0]}; found in a Dask chunk when the result was computed)"
        )


def _take(index, v):
    if index.size and (index.min() < 0 or index.max() >= v.shape[0]):
        bad = index[(index < 0) | (index >= v.shape[0])].flat[0]
        raise ValueError(
            f"target holds class indices outside [0, {v.shape[0]}) that are neither ignore_index nor masked by "
            f"where (e.g. {bad}; found in a Dask chunk when the result was computed)"
        )
    return v[index]


def _loss_block(logits, target, where, weight, *, cfg):
    if not cfg.soft:
        _check_classes(cfg, logits.shape[cfg.axis], target, where)
    return _NUMPY.loss(cfg, logits, target, weight, where)


def _sum_block(logits, target, where, weight, *, cfg, mean, lead):
    if not cfg.soft:
        _check_classes(cfg, logits.shape[cfg.axis], target, where)
    total = _NUMPY.loss(cfg, logits, target, weight, where)
    return _sum_count(total, cfg, target, weight, where, mean, lead)


def _sum_count(total, cfg, target, weight, where, mean, lead):
    count = _math.mean_denominator(_NUMPY, cfg, target, weight, where) if mean else 0.0
    return np.array([total, count], dtype=np.float64).reshape((1,) * lead + (2,))


def _grad_block(logits, target, where, weight, g, *, cfg):
    if not cfg.soft:
        _check_classes(cfg, logits.shape[cfg.axis], target, where)
    if np.ndim(g) == 0:  # the cotangent's scale of every position
        shape = logits.shape[: cfg.axis] + logits.shape[cfg.axis + 1 :]
        g = np.full(shape, g, dtype=_NUMPY.compute[logits.dtype])
    return _NUMPY.value_and_grad(cfg, logits, target, weight, where, g)


def _linear_block(hidden, classifier, bias, target, where, weight, *, cfg, chunk):
    _check_classes(cfg, classifier.shape[0], target, where)
    return _NUMPY.linear_loss(cfg, chunk, hidden, classifier, bias, target, weight, where)


def _linear_sum_block(hidden, classifier, bias, target, where, weight, *, cfg, chunk, mean, lead):
    _check_classes(cfg, classifier.shape[0], target, where)
    total = _NUMPY.linear_loss(cfg, chunk, hidden, classifier, bias, target, weight, where)
    return _sum_count(total, cfg, target, weight, where, mean, lead)


def _linear_grad_block(hidden, classifier, bias, target, where, weight, g, *, cfg, chunk, need):
    _check_classes(cfg, classifier.shape[0], target, where)
    if np.ndim(g) == 0:
        g = np.full(target.shape, g, dtype=_NUMPY.compute[hidden.dtype])
    loss, (dh, dw, db) = _NUMPY.linear_value_and_grads(
        cfg, chunk, hidden, classifier, bias, target, weight, where, need=need, cotangent=g
    )
    return loss, dh, dw, db


def _blockwise(fn, out, *args, **kw):
    """``da.blockwise`` whose function receives each input's one chunk along the axes not in ``out`` (all of
    one chunk here) as it is: ``concatenate=True`` would copy it (``concatenate3`` of a single chunk)."""
    return da.blockwise(functools.partial(_unwrapped, fn), out, *args, concatenate=False, **kw)


def _unwrapped(fn, *args):
    return fn(*(_single(a) for a in args))


def _single(a):
    while type(a) is list:  # blockwise's nested lists along contracted axes, of one chunk each
        (a,) = a
    return a


def _entry(chunks, ind, out, i, meta, lead=0, **kw):
    """Entry ``i`` of the tuple-valued chunks of ``chunks`` (index ``ind``) as an array of index ``out``
    (axes of ``ind`` not in ``out``: one chunk each), with ``lead`` leading axes of length 1."""
    fn = functools.partial(_get, i=i, lead=lead)
    return _blockwise(fn, out, chunks, ind, meta=meta, dtype=meta.dtype, **kw)


def _get(r, *, i, lead):
    x = r[i]
    return x[(None,) * lead] if lead else x


_INSTANCE = Dask(_compat.array_namespace(da.empty(0)), _compat.device)


def backend(x):
    return _INSTANCE
