"""Backend fixtures: every test that takes ``backend`` runs on numpy, array_api_strict, jax and torch.

A backend is skipped only where its library is not installed.  Under CI (``CI``
set), a missing backend is an error instead, so a green run proves all four ran.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

BACKENDS = ("numpy", "array_api_strict", "jax", "torch")


class Backend:
    """One array library: make arrays from NumPy, read them back, and name the namespace."""

    def __init__(self, name):
        self.name = name
        if name == "numpy":
            self.xp = np
        elif name == "array_api_strict":
            import array_api_strict

            array_api_strict.set_array_api_strict_flags(api_version="2025.12")
            self.xp = array_api_strict
        elif name == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)
            import jax.numpy as jnp

            self.xp = jnp
        elif name == "torch":
            import torch

            self.xp = torch
        else:  # pragma: no cover
            raise ValueError(name)

    def asarray(self, a, dtype=None):
        """A NumPy array (or nested list) as this backend's array, keeping its dtype."""
        a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
        if self.name == "torch":
            import torch

            return torch.from_numpy(np.array(a))
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a)
        return self.xp.asarray(a)

    def to_numpy(self, a):
        if self.name == "torch":
            return a.detach().cpu().numpy()
        if self.name == "array_api_strict":
            return np.asarray(a._array)
        return np.asarray(a)

    def __repr__(self):
        return self.name


def _available(name):
    module = "jax" if name == "jax" else name
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def backend_params(names=BACKENDS):
    params = []
    for name in names:
        marks = []
        if not _available(name):
            if os.environ.get("CI"):
                raise RuntimeError(f"backend {name} is not installed, and CI must run every backend")
            marks.append(pytest.mark.skip(reason=f"{name} not installed"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def backend(request):
    return Backend(request.param)


@pytest.fixture(scope="session", autouse=True)
def _jax_x64():
    """float64 everywhere in the tests, also for tests that import jax directly."""
    if _available("jax"):
        import jax

        jax.config.update("jax_enable_x64", True)


def xp_assert_close(actual, desired, *, rtol=1e-10, atol=1e-12, err_msg=""):
    """Compare two arrays (of any backends, converted to NumPy) elementwise."""
    np.testing.assert_allclose(_np(actual), _np(desired), rtol=rtol, atol=atol, err_msg=err_msg)


def _np(a):
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if type(a).__module__.startswith("array_api_strict"):
        return np.asarray(a._array)
    return np.asarray(a)
