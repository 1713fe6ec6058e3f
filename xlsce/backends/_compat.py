"""The one module that imports array-api-compat: which library arrays belong to, and their devices."""

from __future__ import annotations

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
    "array_namespace",
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
