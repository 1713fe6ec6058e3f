"""Argument validation: every check runs before any computation.

Each failure is a ``TypeError`` (wrong kind of thing) or ``ValueError`` (right
kind, wrong value) whose message names the argument and what was expected.
Value checks on arrays (class indices in range) read values back only on the host
(eager NumPy, PyTorch on the CPU, eager JAX on the CPU, array-api-strict); on a GPU or
meta tensors PyTorch checks with a device-side assertion (no synchronisation, as
``F.cross_entropy`` on CUDA), and they are skipped under ``jax.jit``/``vmap``,
``torch.compile`` and for lazy arrays (Dask: checked in each chunk's task when computed,
``xlsce/backends/dask.py``).
"""

from __future__ import annotations

import math
import numbers

from . import backends
from ._types import Config

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


def _required(**arrays):
    """None where an array is required: a TypeError naming the argument."""
    for name, value in arrays.items():
        if value is None:
            raise TypeError(f"{name} must be an array of an array-API library, got NoneType")


def _is_array(x):
    try:
        backends.backend(x)
    except TypeError:
        return False
    return True


def same_library(first, *others):
    """``others`` with NumPy arrays (and Python numbers) taken into ``first``'s library, on its device.

    A NumPy target, weight or mask beside JAX or PyTorch logits is accepted, as optax and torch do
    (and ``jax.test_util.check_grads`` perturbs with NumPy).  Only these are converted, never ``first``
    (the logits, or ``hidden``), and never an array of a third library: that stays a TypeError."""
    kind = type(first)
    a, b, c = others  # unrolled: the common case costs a few comparisons
    if (a is None or type(a) is kind) and (b is None or type(b) is kind) and (c is None or type(c) is kind):
        return others
    numpy_first = kind.__module__ == "numpy"
    foreign = [
        o is not None and (type(o) in (bool, int, float) or (type(o).__module__ == "numpy" and not numpy_first))
        for o in others
    ]
    if not any(foreign) or first is None or not _is_array(first):  # validate() reports a missing array
        return others
    ops = backends.backend(first)
    return tuple(ops.asarray_like(o, first) if f else o for o, f in zip(others, foreign, strict=True))


def flat_classes(logits, target, axis):
    """A tuple of class axes, as optax's: ``(logits, target, -1, restore)`` with those axes moved last,
    in the order given, and flattened into one class axis of their product (a class index is then the
    flat index into ``logits.shape[axis]``, as ``ravel_multi_index`` gives; probability targets, of the
    logits' shape, move alike).  The positions keep the other axes in their order.  ``restore`` maps an
    array of the flattened logits' shape (a gradient) back to the logits' layout."""
    if not _is_array(logits) or logits.ndim < 1:
        return logits, target, axis, None  # validate() reports it
    ndim = logits.ndim
    if not axis or not all(_is_int(a) and -ndim <= a < ndim for a in axis) or len({a % ndim for a in axis}) < len(axis):
        raise ValueError(
            f"axis must be an int or a non-empty tuple of distinct ints in [{-ndim}, {ndim}) for logits of shape "
            f"{tuple(logits.shape)}, got {axis!r}"
        )
    axes = tuple(int(a) % ndim for a in axis)
    xp = backends.backend(logits).xp
    batch = tuple(i for i in range(ndim) if i not in axes)
    perm, shape = batch + axes, tuple(logits.shape[i] for i in batch + axes)
    flat = shape[: len(batch)] + (math.prod(shape[len(batch) :]),)

    def move(x):
        return xp.reshape(x if perm == tuple(range(ndim)) else xp.permute_dims(x, perm), flat)

    def restore(g):
        g = xp.reshape(g, shape)
        return g if perm == tuple(range(ndim)) else xp.permute_dims(g, tuple(perm.index(i) for i in range(ndim)))

    if target is not None and hasattr(target, "shape") and tuple(target.shape) == tuple(logits.shape):
        target = move(target)  # probabilities
    return move(logits), target, -1, restore


def _not_an_array(name, value):
    """The TypeError for an argument that is not an array xlsce takes."""
    if type(value).__module__.startswith("numpy.ma"):
        return TypeError(
            f"{name} is a NumPy masked array, whose mask xlsce would ignore: pass np.ma.getdata({name}) and "
            "mask the positions with where= (True where a position counts)"
        )
    return TypeError(f"{name} must be an array of an array-API library, got {type(value).__name__}")


_CHECKED = {}  # the settings already checked (with their types: True == 1), -> (eps, z_loss, softcap)


def _settings(label_smoothing, smoothing, reduction, z_loss, softcap, ignore_index, k, classes, cache=True):
    """Check the static settings shared by the losses; return (eps, z_loss, softcap) as floats.

    A small call spends most of its time in Python, so a combination of settings is checked once and
    remembered (settings that cannot be hashed, e.g. a traced array, are checked and refused each time).
    Not under torch.compile (``cache=False``): Dynamo would guard on the cache and recompile as it grows."""
    if not cache or hasattr(label_smoothing, "shape") or hasattr(z_loss, "shape"):  # an array: checked each call
        return _check_settings(label_smoothing, smoothing, reduction, z_loss, softcap, ignore_index, k, classes)
    key = (label_smoothing, type(label_smoothing), smoothing, reduction, z_loss, type(z_loss), softcap)
    key += (type(softcap), ignore_index, type(ignore_index), k == 1)
    try:
        return _CHECKED[key]
    except (KeyError, TypeError):
        checked = _check_settings(label_smoothing, smoothing, reduction, z_loss, softcap, ignore_index, k, classes)
    try:
        if len(_CHECKED) > 4096:  # a sweep of values: keep the memory bounded
            _CHECKED.clear()
        _CHECKED[key] = checked
    except TypeError:
        pass
    return checked


def _setting(name, value, *, low, high=None):
    """A Python float, or a 0-d floating array: read where its value is on the host (then a float, the
    fast path), else kept as an array whose range cannot be checked (traced: a smoothing schedule)."""
    if isinstance(value, (int, float)) or not hasattr(
        value, "shape"
    ):  # (hasattr on a Dynamo SymFloat breaks the graph)
        return _number(name, value, low=low, high=high)
    if tuple(value.shape) != () or not _is_array(value):
        raise TypeError(f"{name} must be a Python float or a 0-d array, got shape {tuple(value.shape)}")
    ops = backends.backend(value)
    if value.dtype not in ops.floats:
        raise TypeError(f"{name} must be a Python float or a 0-d floating array, got dtype {value.dtype}")
    if getattr(value, "requires_grad", False):  # torch: its gradient would be silently lost
        raise TypeError(f"{name} must not require grad: xlsce gives a gradient for it on JAX only")
    if ops.readable and "cpu" in str(ops.device(value)).lower():
        return _number(name, float(value), low=low, high=high)
    return value


def _array_settings(ops, x, eps, z_loss):
    """Settings given as (unread) arrays: of the logits' library, in their compute dtype."""
    out = []
    for name, v in (("label_smoothing", eps), ("z_loss", z_loss)):
        if type(v) is not float:
            try:
                backends.backend(x, v)
            except TypeError:
                raise TypeError(f"{name} must be a Python float or a 0-d array of the logits' library") from None
            dt = ops.compute[x.dtype]
            v = v if v.dtype == dt else ops.xp.astype(v, dt)
        out.append(v)
    return out


def _check_settings(label_smoothing, smoothing, reduction, z_loss, softcap, ignore_index, k, classes):
    eps = _setting("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    z_loss = _setting("z_loss", z_loss, low=0.0)
    if type(z_loss) is float and z_loss == float("inf"):
        raise ValueError("z_loss must be a finite float >= 0, got inf")
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


def _check_lse(return_lse):
    if return_lse is not False and return_lse is not True:
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return return_lse


def _check_accuracy(return_token_accuracy, soft):
    """``return_token_accuracy``: a bool, and only for class indices (a probability target has no class to hit)."""
    if return_token_accuracy is not False and return_token_accuracy is not True:
        raise TypeError(f"return_token_accuracy must be a bool, got {type(return_token_accuracy).__name__}")
    if return_token_accuracy and soft:
        raise ValueError(
            "return_token_accuracy needs integer class indices (argmax == target); got probability targets"
        )
    return return_token_accuracy


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
    return_lse=False,
    return_token_accuracy=False,
    axis_name=None,
    process_group=None,
):
    """Check every argument; return ``(ops, Config)``, ``ops`` the backend of the call (vocabulary
    parallel with ``axis_name``/``process_group``: the logits and weights are this shard's slice of the
    classes, the class indices global)."""
    if logits is None or target is None:
        _required(logits=logits, target=target)
    try:
        ops = backends.backend(logits, target, weight, where)
    except TypeError as e:
        named = (("logits", logits), ("target", target), ("weight", weight), ("where", where))
        for name, value in named:
            if value is not None and not _is_array(value):
                raise _not_an_array(name, value) from None
        libs = {name: type(v).__module__.split(".")[0] for name, v in named if v is not None}
        hint = ""
        if libs["logits"] == "numpy":
            hint = (
                " (NumPy arrays are taken into the logits' library, never the logits into another's;"
                " jax.test_util.check_grads evaluates at NumPy logits: give it NumPy targets)"
            )
        raise TypeError(f"logits, target, weight and where must come from one array library, got {libs}{hint}") from e

    if logits.dtype not in ops.floats:
        raise TypeError(f"logits must have a real floating dtype, got {logits.dtype}")
    ndim = logits.ndim
    if ndim < 1:
        raise ValueError("logits must have at least one dimension (the class axis), got a 0-d array")
    if not (type(axis) is int or _is_int(axis)) or not -ndim <= axis < ndim:
        raise ValueError(
            f"axis must be an int in [{-ndim}, {ndim}) for logits of shape {tuple(logits.shape)}, got {axis!r}"
        )
    axis = int(axis) % ndim
    k = logits.shape[axis]
    if k == 0:
        raise ValueError(f"logits must have at least one class along axis {axis} (shape {tuple(logits.shape)})")
    positions = tuple(logits.shape[:axis]) + tuple(logits.shape[axis + 1 :])
    ops = _class_shards(ops, axis_name, process_group)
    k_all = ops.classes(k)  # the classes of every shard

    eps, z_loss, softcap = _settings(
        label_smoothing, smoothing, reduction, z_loss, softcap, ignore_index, k_all, "K", cache=not ops.compiling
    )
    if type(eps) is not float or type(z_loss) is not float:
        eps, z_loss = _array_settings(ops, logits, eps, z_loss)

    if target.dtype in ops.ints:
        soft = False
        if tuple(target.shape) != positions:
            raise ValueError(
                f"target of class indices must have the logits' shape without the class axis {positions}, "
                f"got {tuple(target.shape)} (logits {tuple(logits.shape)}, axis={axis})"
            )
    elif target.dtype in ops.floats:
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
        _check_probabilities(ops, target)
    else:
        raise TypeError(f"target must hold integer class indices or floating probabilities, got dtype {target.dtype}")

    if weight is not None or where is not None:
        _check_weight_where(ops, weight, where, k, positions)

    if not soft:
        ignore_index = _check_indices(ops, target, k_all, ignore_index, where)

    cfg = Config(
        axis=axis,
        eps=eps,
        exclusive=smoothing == "exclusive",
        reduction=reduction,
        ignore_index=None if soft else (None if ignore_index is None else int(ignore_index)),
        soft=soft,
        z_loss=z_loss,
        softcap=softcap,
        return_lse=return_lse if return_lse is False else _check_lse(return_lse),
        return_token_accuracy=return_token_accuracy
        if return_token_accuracy is False
        else _check_accuracy(return_token_accuracy, soft),
    )
    return ops, cfg


def _class_shards(ops, axis_name, process_group):
    """The backend of the call: vocabulary parallel over ``axis_name`` (JAX) or ``process_group`` (torch)."""
    if axis_name is None and process_group is None:
        return ops
    if axis_name is not None and process_group is not None:
        raise ValueError("pass axis_name= (JAX) or process_group= (torch.distributed), not both")
    if axis_name is not None and not isinstance(axis_name, (str, tuple)):
        raise TypeError(
            f"axis_name must be a mesh axis name (a str) or a tuple of them, got {type(axis_name).__name__}"
        )
    return ops.class_shards(axis_name=axis_name, process_group=process_group)


def _check_weight_where(ops, weight, where, k, positions):
    """The class weights: (k,) floating, no gradient asked; the mask: boolean of the positions' shape."""
    if weight is not None:
        if weight.dtype not in ops.floats:
            raise TypeError(f"weight must have a real floating dtype, got {weight.dtype}")
        if tuple(weight.shape) != (k,):
            what = "one per class" if ops.shards == 1 else "one per class of this shard's slice"
            raise ValueError(f"weight must have shape ({k},) ({what}), got {tuple(weight.shape)}")
        ops.check_weight(weight)
        xp = ops.xp
        ops.require(
            xp.all((weight >= 0) & (weight < xp.inf)),
            "weight must hold finite, non-negative class weights (a negative weight can cancel the mean's "
            "denominator, a NaN or inf one makes every loss NaN)",
        )
    if where is not None:
        if where.dtype != ops.xp.bool:
            raise TypeError(f"where must be a boolean array, got dtype {where.dtype}")
        if tuple(where.shape) != positions:
            raise ValueError(f"where must have the shape of the target positions {positions}, got {tuple(where.shape)}")


def _check_probabilities(ops, target):
    """Probability targets must be finite and non-negative (they need not sum to 1): read on the host
    (eager min and max, one pass on PyTorch), a device-side assertion off the CPU, unchecked traced."""
    if ops.eager:
        if math.prod(target.shape):
            lo, hi = ops.min_max(target)
            if not (lo >= 0 and hi < math.inf):  # NaN fails both
                raise ValueError(f"target of class probabilities must be finite and >= 0, got values in [{lo}, {hi}]")
    elif not ops.traced:
        xp = ops.xp
        ops.require(xp.all((target >= 0) & (target < xp.inf)), "target of class probabilities must be finite and >= 0")


def check_cotangent(cotangent, reduction, positions):
    """The cotangent of value_and_grad: a real number or 0-d array for "sum"/"mean", an array of the
    per-position loss's shape for "none".  Returns it, Python numbers as floats."""
    if cotangent is None:
        return None
    if isinstance(cotangent, numbers.Real) and not isinstance(cotangent, bool):
        if reduction == "none":
            raise ValueError(
                f"cotangent must be an array of the per-position loss's shape {positions} for reduction='none', "
                f"got the number {cotangent!r}"
            )
        return float(cotangent)
    if not _is_array(cotangent) or isinstance(cotangent, bool):
        raise TypeError(f"cotangent must be a real number or an array, got {type(cotangent).__name__}")
    want = positions if reduction == "none" else ()
    if tuple(cotangent.shape) != want:
        what = (
            f"of the per-position loss's shape {want}"
            if reduction == "none"
            else "a number or 0-d (the loss is a scalar)"
        )
        raise ValueError(f"cotangent must be {what} for reduction={reduction!r}, got shape {tuple(cotangent.shape)}")
    return cotangent


def _check_indices(ops, target, k, ignore_index, where):
    """Raise if a class index is outside [0, k) and neither ignore_index nor masked by where.

    Eager on the host, the range is read first (min and max); elsewhere the check is
    ``ops.require``: read back on the host, a device-side assertion on a GPU, nothing traced.
    Returns ``ignore_index``, or None when no target holds it (the loss then needs no mask for it).
    """
    xp = ops.xp
    if ops.eager and math.prod(target.shape):  # min and max first
        lo, hi = ops.min_max(target)
        if 0 <= lo and hi < k:
            return ignore_index if ignore_index is not None and lo <= ignore_index <= hi else None
        if where is None and ignore_index is not None and lo <= ignore_index <= hi:  # e.g. -100 among classes
            # the other targets, ignored ones set to 0: only the side that failed is looked at again
            kept = ops.where0(target != ignore_index, target)
            klo, khi = ops.min_max(kept, lo=lo < 0, hi=hi >= k)
            if (klo is None or klo >= 0) and (khi is None or khi < k):
                return ignore_index
    if ops.traced:
        return ignore_index  # no values under jax.jit/vmap, torch.compile, or for lazy arrays
    info = xp.iinfo(target.dtype)
    bad = target < 0 if k > info.max else (target < 0) | (target >= k)  # no class index of the dtype is >= k
    if ignore_index is not None:
        if info.min <= ignore_index <= info.max:
            bad = bad & (target != ignore_index)
    if where is not None:
        bad = bad & where
    ops.require(
        xp.logical_not(xp.any(bad)),
        f"target holds class indices outside [0, {k}) that are neither ignore_index ({ignore_index}) nor masked by where",
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
    return_lse=False,
    return_token_accuracy=False,
    axis_name=None,
    process_group=None,
):
    """Check the arguments of ``linear_cross_entropy``; return ``(ops, Config, chunk)``.

    ``hidden`` is (..., H), ``classifier`` (V, H) or (V, d_1, ..., d_K, H), ``bias`` (V, d_1, ..., d_K),
    ``weight`` (V,); the positions are ``hidden.shape[:-1] + (d_1, ..., d_K)``: ``target`` has their shape
    (class indices) or ``hidden.shape[:-1] + (V, d_1, ..., d_K)`` (probabilities), ``where`` their shape.
    """
    from . import _linear

    _required(hidden=hidden, classifier=classifier, target=target)
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
            raise _not_an_array(name, value)
    try:
        ops = backends.backend(hidden, classifier, bias, target, weight, where)
    except TypeError as e:
        libs = {name: type(v).__module__.split(".")[0] for name, v in named if v is not None}
        raise TypeError(
            f"hidden, classifier, bias, target, weight and where must come from one array library, got {libs}"
        ) from e

    xp = ops.xp
    if hidden.dtype not in ops.floats:
        raise TypeError(f"hidden must have a real floating dtype, got {hidden.dtype}")
    if hidden.ndim < 1:
        raise ValueError("hidden must have shape (..., H) with at least one dimension, got a 0-d array")
    width = hidden.shape[-1]
    if classifier.ndim < 2 or classifier.shape[-1] != width:
        raise ValueError(
            f"classifier must have shape (V, {width}) or (V, d_1, ..., d_K, {width}) (V classes, H = hidden.shape[-1]), "
            f"got {tuple(classifier.shape)}"
        )
    out_dims = tuple(classifier.shape[1:-1])
    positions = tuple(hidden.shape[:-1]) + out_dims
    if classifier.dtype != hidden.dtype:
        raise TypeError(f"classifier must have the dtype of hidden ({hidden.dtype}), got {classifier.dtype}")
    k = classifier.shape[0]
    if k < 1:
        raise ValueError("classifier must have at least one class (row), got shape " + str(tuple(classifier.shape)))
    if bias is not None:
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        if tuple(bias.shape) != (k, *out_dims):
            raise ValueError(f"bias must have shape {(k, *out_dims)} (classifier.shape[:-1]), got {tuple(bias.shape)}")

    soft = target.dtype in ops.floats
    if soft:
        logits_shape = tuple(hidden.shape[:-1]) + (k, *out_dims)
        if tuple(target.shape) != logits_shape:
            raise ValueError(
                f"target of class probabilities must have the logits' shape {logits_shape} "
                f"(hidden.shape[:-1] + classifier.shape[:-1]), got {tuple(target.shape)}"
            )
        if ignore_index is not None and ignore_index >= 0:
            raise ValueError(
                "ignore_index is not supported with probability targets (use where= to mask positions); "
                f"got ignore_index={ignore_index}"
            )
    elif target.dtype not in ops.ints:
        raise TypeError(f"target must hold integer class indices or floating probabilities, got dtype {target.dtype}")
    elif tuple(target.shape) != positions:
        raise ValueError(
            f"target of class indices must have the positions' shape {positions} "
            f"(hidden.shape[:-1] + classifier.shape[1:-1]), got {tuple(target.shape)} (hidden {tuple(hidden.shape)})"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    ops = _class_shards(ops, axis_name, process_group)
    eps, z_loss, softcap = _settings(
        label_smoothing,
        smoothing,
        reduction,
        z_loss,
        softcap,
        ignore_index,
        ops.classes(k),
        "V",
        cache=not ops.compiling,
    )
    if type(eps) is not float or type(z_loss) is not float:
        eps, z_loss = _array_settings(ops, hidden, eps, z_loss)

    _check_weight_where(ops, weight, where, k, positions)

    if not soft:
        ignore_index = _check_indices(ops, target, ops.classes(k), ignore_index, where)

    n = math.prod(hidden.shape[:-1])  # rows of hidden: a chunk's logits are (rows, V * d_1 * ... * d_K)
    if chunk_size is None:
        itemsize = 8 if ops.compute[hidden.dtype] == xp.float64 else 4
        chunk = _linear.default_chunk_size(n, k * math.prod(out_dims), itemsize)
    else:
        chunk = max(1, min(int(chunk_size), n))
    cfg = Config(
        axis=1,
        eps=eps,
        exclusive=smoothing == "exclusive",
        reduction=reduction,
        ignore_index=None if soft or ignore_index is None else int(ignore_index),
        soft=soft,
        z_loss=z_loss,
        softcap=softcap,
        return_lse=_check_lse(return_lse),
        return_token_accuracy=_check_accuracy(return_token_accuracy, soft),
    )
    return ops, cfg, chunk


def check_denominator(ops, denominator, reduction):
    """The ``denominator=`` of a global mean: a Python number >= 0 or a 0-d real array of the inputs' library
    (read, for a check, only where values live on the host); only with ``reduction="mean"``."""
    if reduction != "mean":
        raise ValueError(
            f'denominator= replaces the denominator of reduction="mean" (the loss is the sum of the per-position '
            f"terms over it); got reduction={reduction!r}"
        )
    if isinstance(denominator, numbers.Real) and not isinstance(denominator, bool):
        return _number("denominator", denominator, low=0.0)
    try:
        library = type(backends.backend(denominator))  # the shards' backend is its library's, specialised
        same = library is type(ops) or (isinstance(ops, backends.ClassShards) and isinstance(ops, library))
    except TypeError:
        same = False
    if not same or getattr(denominator, "ndim", None) != 0:
        raise TypeError(
            "denominator must be a Python number or a 0-d array of the logits' library (e.g. a count that was "
            f"all-reduced over the data-parallel ranks), got {type(denominator).__name__} "
            f"of shape {tuple(getattr(denominator, 'shape', ()))}"
        )
    if denominator.dtype not in ops.floats and denominator.dtype not in ops.ints:
        raise TypeError(f"denominator must have a real (integer or floating) dtype, got {denominator.dtype}")
    ops.require(denominator >= 0, "denominator must be >= 0")
    return denominator


def validate_denominator_targets(target, weight, where, *, ignore_index, axis):
    """The arguments of ``mean_denominator``; return ``(ops, Config)``."""
    _required(target=target)
    try:
        ops = backends.backend(target, weight, where)
    except TypeError as e:
        for name, value in (("target", target), ("weight", weight), ("where", where)):
            if value is not None and not _is_array(value):
                raise TypeError(
                    f"{name} must be an array of an array-API library, got {type(value).__name__}"
                ) from None
        raise TypeError("target, weight and where must come from one array library") from e
    soft = target.dtype in ops.floats
    if not soft and target.dtype not in ops.ints:
        raise TypeError(f"target must hold integer class indices or floating probabilities, got dtype {target.dtype}")
    if ignore_index is not None and not _is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    positions = tuple(target.shape)
    if soft:
        ndim = target.ndim
        if ndim < 1 or not _is_int(axis) or not -ndim <= axis < ndim:
            raise ValueError(f"axis must be an int in [{-ndim}, {ndim}) for probability targets of shape {positions}")
        axis = int(axis) % ndim
        positions = positions[:axis] + positions[axis + 1 :]
    if weight is not None:
        if weight.dtype not in ops.floats:
            raise TypeError(f"weight must have a real floating dtype, got {weight.dtype}")
        if weight.ndim != 1:
            raise ValueError(f"weight must have shape (K,) (one per class), got {tuple(weight.shape)}")
    if where is not None:
        _check_weight_where(ops, None, where, None, positions)
    if not soft and weight is not None:
        _check_indices(ops, target, weight.shape[0], ignore_index, where)
    cfg = Config(
        axis=axis if soft else 0,
        eps=0.0,
        exclusive=False,
        reduction="mean",
        ignore_index=None if soft or ignore_index is None else int(ignore_index),
        soft=soft,
    )
    return ops, cfg
