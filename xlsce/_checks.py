"""Argument validation: every check runs before any computation.

Each failure is a ``TypeError`` (wrong kind of thing) or ``ValueError`` (right
kind, wrong value) whose message names the argument and what was expected.
Value checks on arrays (class indices in range) need concrete values: they run
on eager arrays and are skipped under ``jax.jit``/``vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers

from . import _adapters
from ._math import Config

REDUCTIONS = ("none", "sum", "mean")
SMOOTHINGS = ("uniform", "exclusive")


def _number(name, value, *, low=None, high=None):
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a Python float (a static setting), got {type(value).__name__}")
    value = float(value)
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _is_int(value):
    """An integer that is not a bool (Python's int without the ABC check, which costs a microsecond)."""
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, numbers.Integral))


def _is_array(x):
    try:
        _adapters.namespace(x)
    except TypeError:
        return False
    return True


def _settings(label_smoothing, smoothing, reduction, z_loss, softcap, ignore_index, k, classes):
    """Check the static settings shared by the losses; return (eps, z_loss, softcap) as floats."""
    eps = _number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    z_loss = _number("z_loss", z_loss, low=0.0)
    if softcap is not None:
        softcap = _number("softcap", softcap, low=0.0)
        if softcap == 0 or softcap == float("inf"):
            raise ValueError(f"softcap must be a positive finite float or None, got {softcap}")
    if ignore_index is not None and not _is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    if smoothing == "exclusive" and k == 1:
        raise ValueError(
            f'smoothing="exclusive" needs at least 2 classes (it puts eps/(K-1) on each other class); got {classes} = 1'
        )
    return eps, z_loss, softcap


def with_lse(cfg, return_lse):
    """``cfg`` asking for the reported log-sum-exp when ``return_lse`` (a bool) is True."""
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return cfg._replace(return_lse=True) if return_lse else cfg


def validate(
    logits,
    target,
    weight,
    where,
    *,
    label_smoothing,
    smoothing,
    ignore_index,
    reduction,
    axis,
    z_loss=0.0,
    softcap=None,
):
    """Check every argument; return ``(xp, Config)``."""
    named = (("logits", logits), ("target", target), ("weight", weight), ("where", where))
    try:
        if any(isinstance(v, (int, float, complex)) for _, v in named):  # array_namespace skips Python numbers
            raise TypeError
        xp = _adapters.namespace(logits, target, weight, where)
    except TypeError as e:
        for name, value in named:
            if value is not None and not _is_array(value):
                raise TypeError(
                    f"{name} must be an array of an array-API library, got {type(value).__name__}"
                ) from None
        libs = {name: type(v).__module__.split(".")[0] for name, v in named if v is not None}
        raise TypeError(f"logits, target, weight and where must come from one array library, got {libs}") from e

    if not _adapters.isdtype(xp, logits.dtype, "real floating"):
        raise TypeError(f"logits must have a real floating dtype, got {logits.dtype}")
    ndim = logits.ndim
    if ndim < 1:
        raise ValueError("logits must have at least one dimension (the class axis), got a 0-d array")
    if not _is_int(axis) or not -ndim <= axis < ndim:
        raise ValueError(
            f"axis must be an int in [{-ndim}, {ndim}) for logits of shape {tuple(logits.shape)}, got {axis!r}"
        )
    axis = int(axis) % ndim
    k = logits.shape[axis]
    positions = tuple(s for i, s in enumerate(logits.shape) if i != axis)

    eps, z_loss, softcap = _settings(label_smoothing, smoothing, reduction, z_loss, softcap, ignore_index, k, "K")

    if _adapters.isdtype(xp, target.dtype, "integral"):
        soft = False
        if tuple(target.shape) != positions:
            raise ValueError(
                f"target of class indices must have the logits' shape without the class axis {positions}, "
                f"got {tuple(target.shape)} (logits {tuple(logits.shape)}, axis={axis})"
            )
    elif _adapters.isdtype(xp, target.dtype, "real floating"):
        soft = True
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(
                f"target of class probabilities must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        if ignore_index is not None and ignore_index >= 0:
            raise ValueError(
                "ignore_index is not supported with probability targets (use where= to mask positions); "
                f"got ignore_index={ignore_index}"
            )
    else:
        raise TypeError(f"target must hold integer class indices or floating probabilities, got dtype {target.dtype}")

    _check_weight_where(xp, weight, where, k, positions)

    if not soft:
        ignore_index = _check_indices(xp, target, k, ignore_index, where)

    cfg = Config(
        axis=axis,
        eps=eps,
        exclusive=smoothing == "exclusive",
        reduction=reduction,
        ignore_index=None if soft else (None if ignore_index is None else int(ignore_index)),
        soft=soft,
        z_loss=z_loss,
        softcap=softcap,
    )
    return xp, cfg


def _check_weight_where(xp, weight, where, k, positions):
    """The class weights: (k,) floating, no gradient asked; the mask: boolean of the positions' shape."""
    if weight is not None:
        if not _adapters.isdtype(xp, weight.dtype, "real floating"):
            raise TypeError(f"weight must have a real floating dtype, got {weight.dtype}")
        if tuple(weight.shape) != (k,):
            raise ValueError(f"weight must have shape ({k},) (one per class), got {tuple(weight.shape)}")
        if _adapters.is_torch(weight):
            _adapters.check_torch_weight(weight)
    if where is not None:
        if where.dtype != xp.bool:
            raise TypeError(f"where must be a boolean array, got dtype {where.dtype}")
        if tuple(where.shape) != positions:
            raise ValueError(f"where must have the shape of the target positions {positions}, got {tuple(where.shape)}")


def _check_indices(xp, target, k, ignore_index, where):
    """Raise if a class index is outside [0, k) and neither ignore_index nor masked by where (eager arrays).

    Returns ``ignore_index``, or None when no target holds it (the loss then needs no mask for it).
    """
    if _adapters.can_branch(target) and math.prod(target.shape):  # eager numpy/torch: min and max first
        lo, hi = _adapters.min_max(xp, target)
        if 0 <= lo and hi < k:
            return ignore_index if ignore_index is not None and lo <= ignore_index <= hi else None
        if where is None and ignore_index is not None and lo <= ignore_index <= hi:  # e.g. -100 among classes
            # the other targets, ignored ones set to 0: only the side that failed is looked at again
            kept = _adapters.where0(xp, target != ignore_index, target)
            klo, khi = _adapters.min_max(xp, kept, lo=lo < 0, hi=hi >= k)
            if (klo is None or klo >= 0) and (khi is None or khi < k):
                return ignore_index
    if any(_adapters.is_traced(a) for a in (target, where) if a is not None):
        return ignore_index  # no values under jax.jit/vmap or torch.compile
    bad = (target < 0) | (target >= k)
    if ignore_index is not None:
        info = xp.iinfo(target.dtype)
        if info.min <= ignore_index <= info.max:
            bad = bad & (target != ignore_index)
    if where is not None:
        bad = bad & where
    if not _adapters.is_traced(bad) and bool(xp.any(bad)):  # a closed-over target inside jit traces too
        raise ValueError(
            f"target holds class indices outside [0, {k}) that are neither ignore_index ({ignore_index}) nor masked by where"
        )
    return ignore_index


def validate_linear(
    hidden,
    classifier,
    bias,
    target,
    weight,
    where,
    *,
    chunk_size,
    label_smoothing,
    smoothing,
    ignore_index,
    reduction,
    z_loss=0.0,
    softcap=None,
):
    """Check the arguments of ``linear_cross_entropy``; return ``(xp, Config, chunk)``.

    ``hidden`` is (..., H), ``classifier`` (V, H), ``bias`` and ``weight`` (V,),
    ``target`` and ``where`` (...): the positions are ``hidden.shape[:-1]``.
    """
    from . import _linear, _math

    named = (
        ("hidden", hidden),
        ("classifier", classifier),
        ("bias", bias),
        ("target", target),
        ("weight", weight),
        ("where", where),
    )
    for name, value in named:
        if value is not None and not _is_array(value):
            raise TypeError(f"{name} must be an array of an array-API library, got {type(value).__name__}")
    try:
        xp = _adapters.namespace(*(v for _, v in named))
    except TypeError as e:
        libs = {name: type(v).__module__.split(".")[0] for name, v in named if v is not None}
        raise TypeError(
            f"hidden, classifier, bias, target, weight and where must come from one array library, got {libs}"
        ) from e

    if not _adapters.isdtype(xp, hidden.dtype, "real floating"):
        raise TypeError(f"hidden must have a real floating dtype, got {hidden.dtype}")
    if hidden.ndim < 1:
        raise ValueError("hidden must have shape (..., H) with at least one dimension, got a 0-d array")
    width = hidden.shape[-1]
    positions = tuple(hidden.shape[:-1])
    if classifier.ndim != 2 or classifier.shape[1] != width:
        raise ValueError(
            f"classifier must have shape (V, {width}) (V classes, H = hidden.shape[-1]), got {tuple(classifier.shape)}"
        )
    if classifier.dtype != hidden.dtype:
        raise TypeError(f"classifier must have the dtype of hidden ({hidden.dtype}), got {classifier.dtype}")
    k = classifier.shape[0]
    if k < 1:
        raise ValueError("classifier must have at least one class (row), got shape " + str(tuple(classifier.shape)))
    if bias is not None:
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        if tuple(bias.shape) != (k,):
            raise ValueError(f"bias must have shape ({k},) (one per class), got {tuple(bias.shape)}")

    if _adapters.isdtype(xp, target.dtype, "real floating"):
        raise ValueError(
            "linear_cross_entropy takes class indices only: probability targets have the shape of the (N, V) "
            "logits that it avoids building; use cross_entropy(hidden @ classifier.T, target) instead"
        )
    if not _adapters.isdtype(xp, target.dtype, "integral"):
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if tuple(target.shape) != positions:
        raise ValueError(
            f"target must have the shape of hidden without its last axis {positions}, got {tuple(target.shape)} "
            f"(hidden {tuple(hidden.shape)})"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    eps, z_loss, softcap = _settings(label_smoothing, smoothing, reduction, z_loss, softcap, ignore_index, k, "V")

    _check_weight_where(xp, weight, where, k, positions)

    ignore_index = _check_indices(xp, target, k, ignore_index, where)

    n = math.prod(positions)
    if chunk_size is None:
        itemsize = 8 if _math.compute_dtype(xp, hidden.dtype) == xp.float64 else 4
        chunk = _linear.default_chunk_size(n, k, itemsize)
    else:
        chunk = max(1, min(int(chunk_size), n))
    cfg = Config(
        axis=1,
        eps=eps,
        exclusive=smoothing == "exclusive",
        reduction=reduction,
        ignore_index=None if ignore_index is None else int(ignore_index),
        soft=False,
        z_loss=z_loss,
        softcap=softcap,
    )
    return xp, cfg, chunk
