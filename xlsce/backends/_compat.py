"""The one module that imports array-api-compat: which library arrays belong to, and their devices."""

from __future__ import annotations

import sys

from array_api_compat import (
    array_namespace,
    device,
    is_dask_namespace,
    is_jax_namespace,
    is_lazy_array,
    is_numpy_namespace,
    is_torch_namespace,
)

__all__ = [
    "all_torch",
    "array_namespace",
    "compiling",
    "device",
    "is_dask_namespace",
    "is_jax_namespace",
    "is_lazy_array",
    "is_numpy_namespace",
    "is_torch_namespace",
    "torch_namespace",
]


def torch_namespace():
    """array-api-compat's namespace for torch tensors (imports torch)."""
    import array_api_compat.torch

    return array_api_compat.torch


# torch.compile's Dynamo traces the first call of a compiled function, selection included: the two helpers
# below answer without array-api-compat's functools.lru_cache'd helpers (Dynamo warns about each one it
# traces), and without importing torch.


def compiling():
    """Whether torch.compile's Dynamo is tracing this call (False where torch is not imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def all_torch(arrays):
    """Whether every one of ``arrays`` is a torch tensor (False where torch is not imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and all(isinstance(a, torch.Tensor) for a in arrays)
