"""The backends: one small class per framework, chosen once per call by the arrays' types.

* :mod:`~xlsce.backends.generic`: the array API standard (array-api-strict, CuPy, any library);
* :mod:`~xlsce.backends.numpy`, :mod:`~xlsce.backends.torch`, :mod:`~xlsce.backends.jax`: the
  overrides of each framework, with its autodiff registration;
* :mod:`~xlsce.backends.dask`: the NumPy backend on each chunk of positions, lazily.

:func:`backend` is the one place that asks array-api-compat (through ``_compat``, the only module
that imports it) which library the arrays belong to; the answer depends on their types alone and
is cached (except under ``torch.compile``, whose Dynamo would guard on the cache and recompile whenever it
grows; torch tensors are recognised there without array-api-compat's cached helpers, which Dynamo warns about).  A framework's backend module, and so the framework, is imported the first time one of
its arrays is seen; it makes its backend objects (one per mode) when it is imported, which
``torch.compile`` runs untraced, so that a compiled call may be the first xlsce call of a process.
"""

from __future__ import annotations

from . import _compat
from .generic import API_VERSION, ClassShards, Generic

__all__ = ["API_VERSION", "ClassShards", "Generic", "backend"]

_SELECTORS = {}  # tuple of the arrays' types -> a function of the first array that returns the backend


def backend(*arrays):
    """The backend of ``arrays``, in the mode of this call.  The first must be an array; later None
    entries (no weight, no mask) are skipped.

    Raises TypeError for arrays of several libraries, or for something that is not an array.
    """
    if _compat.compiling():  # no cache: Dynamo would guard on its contents, and recompile whenever it grows
        present = [a for a in arrays if a is not None]
        return _selector(present)(present[0])
    key = tuple(map(type, arrays))
    try:
        select = _SELECTORS[key]
    except KeyError:
        present = [a for a in arrays if a is not None]
        select = _SELECTORS[key] = _selector(present)
        arrays = present
    return select(arrays[0])


def _selector(arrays):
    if any(isinstance(a, (bool, int, float, complex)) for a in arrays):  # array_namespace skips Python numbers
        raise TypeError("Python numbers are not arrays")
    if any(type(a).__module__.startswith("numpy.ma") for a in arrays):  # its mask would be ignored
        raise TypeError("NumPy masked arrays are not taken (their mask would be ignored)")
    if _compat.all_torch(arrays):  # first: torch.compile traces this, quietly without array_namespace
        from . import torch

        return torch.selector(arrays)
    xp, x = _compat.array_namespace(*arrays), arrays[0]
    if _compat.is_numpy_namespace(xp):
        from .numpy import NumPy

        ops = NumPy(xp, _compat.device)
        return lambda x: ops
    if _compat.is_torch_namespace(xp):
        from . import torch

        return torch.selector(arrays)  # DTensors get a backend of their own
    if _compat.is_jax_namespace(xp):
        from . import jax

        return jax.backend
    if _compat.is_dask_namespace(xp):
        from . import dask

        return dask.backend
    lazy = _compat.is_lazy_array(x)  # ndonnx: values exist only once computed
    ops = Generic(xp, _compat.device, traced=lazy, on_cpu="cpu" in str(_compat.device(x)).lower())
    return lambda x: ops
