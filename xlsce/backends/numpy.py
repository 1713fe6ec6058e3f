"""The NumPy backend: eager, in place, on the CPU; the calls of every loss bound to what runs underneath.

On a small problem the Python layers around a NumPy call cost as much as the call, so the
primitives here go straight to the ufuncs and fancy indexing, and the namespace's reductions
are bound to ``np.add.reduce`` and friends (same results, same dtypes).
"""

from __future__ import annotations

import functools
import math
import types

import numpy as np

from .generic import InPlace


def _namespace(base):
    """array-api-compat's NumPy namespace (mostly NumPy's own functions), with the calls that every
    loss makes bound to what they run underneath: ``np.sum(x, axis=, keepdims=)`` is
    ``np.add.reduce(x, axis=, keepdims=)`` behind Python layers that cost microseconds a call."""

    def sum(x, /, *, axis=None, dtype=None, keepdims=False):  # noqa: A001 (the array API's name)
        return np.add.reduce(x, axis=axis, dtype=dtype, keepdims=keepdims)

    def max(x, /, *, axis=None, keepdims=False):  # noqa: A001
        return np.maximum.reduce(x, axis=axis, keepdims=keepdims)

    def min(x, /, *, axis=None, keepdims=False):  # noqa: A001
        return np.minimum.reduce(x, axis=axis, keepdims=keepdims)

    def expand_dims(x, /, *, axis=0):
        if not isinstance(axis, int) or not -x.ndim - 1 <= axis <= x.ndim:
            return base.expand_dims(x, axis=axis)  # its error
        axis %= x.ndim + 1
        return x.reshape(x.shape[:axis] + (1,) + x.shape[axis:])

    ns = types.ModuleType("xlsce._numpy", base.__doc__)
    ns.__dict__.update(base.__dict__)
    ns.__dict__.update(sum=sum, max=max, min=min, expand_dims=expand_dims)
    return ns


class NumPy(InPlace):
    name = "numpy"

    def __init__(self, xp, device):
        super().__init__(_namespace(xp), device)

    def min_max(self, x, *, lo=True, hi=True):
        return (x.min().item() if lo else None), (x.max().item() if hi else None)  # fewer layers than np.min

    def number(self, x):
        return float(x) if getattr(x, "ndim", None) == 0 else x

    def all_finite(self, *arrays):
        with np.errstate(over="ignore", invalid="ignore"):
            return super().all_finite(*arrays)

    def exp_(self, a):
        return np.exp(a, out=a)

    def subtract(self, a, b, out=None):
        # -inf - (-inf): a row of -inf only, detected by the caller; overflow: -inf, a class still in play
        with np.errstate(invalid="ignore", over="ignore"):
            return np.subtract(a, b, out=out)

    def matmul(self, a, b, out=None):
        return np.matmul(a, b, out=out)

    def isub_product(self, a, u, v):
        a -= u * v
        return a

    def take_at(self, a, index, axis):
        return a[_along_index(a.shape, index, axis)]

    def isub_at(self, a, index, v, axis):
        a[_along_index(a.shape, index, axis)] -= v
        return a

    def take_classes(self, v, index):
        return v[index]

    def where0(self, cond, x):
        return x * cond  # one cheap operation; np.where with a Python scalar costs several

    def row_dot(self, a, v, axis):
        last = axis == a.ndim - 1
        if v is None:
            if last and a.shape[-1] <= 1024 and a.dtype == np.float32:
                # einsum's own loop, faster than np.sum's pairwise loop along a short last axis: 0.105 against
                # 0.255 ms on a 1048x1000 float32 block (python -m benchmarks.profile --backend numpy --ops
                # --shape 1048x1000).  It sums in lanes, so its rounding grows with the row's length: softmax
                # sums 2.1e-7 relative against np.sum's 1.0e-7 at 1024 classes, 4.8e-7 against 1.1e-7 at 8192
                # (same command, --shape 256x1024 / 256x8192), hence np.sum beyond 1024; float64 keeps np.sum's
                # pairwise accuracy (tests/test_docs.py locates the loss's minimum to 1e-6 with it)
                return np.einsum("...k->...", a)[..., None]
            return np.add.reduce(a, axis=axis, keepdims=True)
        with np.errstate(invalid="ignore"):  # 0 * -inf: the caller detects the non-finite sum
            if last and v.ndim == a.ndim and math.prod(v.shape[:-1]) == 1:
                # einsum's own loop: one pass, no temporary, and no BLAS call, whose thread start-up
                # cost more than the product on a cache-sized block on this project's busy 2-core machine
                return np.einsum("...k,k->...", a, v.reshape(-1))[..., None]
            return np.add.reduce(a * v, axis=axis, keepdims=True)


def _along_index(shape, index, axis):
    """The fancy index of an array of ``shape`` at ``index`` along ``axis`` (``index`` keepdims):
    ``take_along_axis``'s, without NumPy's checks, which cost more than the gather on small arrays."""
    aranges = _aranges(tuple(shape), axis)
    return aranges[:axis] + (index,) + aranges[axis + 1 :]


@functools.lru_cache(maxsize=64)
def _aranges(shape, axis):
    """NumPy's index arrays for :func:`_along_index`, made once per shape (read-only, never written)."""

    def arange(i, s):
        r = np.arange(s).reshape(tuple(s if j == i else 1 for j in range(len(shape))))
        r.flags.writeable = False
        return r

    return tuple(None if i == axis else arange(i, s) for i, s in enumerate(shape))
