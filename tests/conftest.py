"""Backend fixtures: every test that takes ``backend`` runs on numpy, numpy_readonly, array_api_strict, jax and torch.

``numpy_readonly`` is NumPy with read-only inputs (``flags.writeable = False``): a
library call that writes into an array it was given raises there.

A backend is skipped only where its library is not installed.  Under CI (``CI``
set), a missing backend is an error instead, so a green run proves all of them ran.

A test can leave out, or expect a failure on, some backends with a marker that the
``backend`` fixture reads (each needs a reason; an xfail is strict unless told)::

    @pytest.mark.skip_xp_backend("array_api_strict", reason="no float16 in the array API")
    @pytest.mark.xfail_xp_backend("numpy_readonly", reason="writes into its input", strict=True)
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

BACKENDS = ("numpy", "numpy_readonly", "array_api_strict", "jax", "torch")
LIBRARY = {"numpy_readonly": "numpy"}  # the library behind a backend, where its name is not that


class Backend:
    """One array library: make arrays from NumPy, read them back, and name the namespace.

    ``vjp`` is the library's own reverse-mode autodiff, ``vjp(f, x, cotangent) -> (f(x), the
    cotangent's product with f's Jacobian at x)`` (torch autograd, ``jax.vjp``), named ``vjp_name``;
    None for a library without one.  ``jit`` is ``jax.jit`` on JAX, the identity elsewhere.
    """

    def __init__(self, name):
        self.name = name
        self.library = LIBRARY.get(name, name)
        self.vjp = self.vjp_name = None
        self.jit = _identity
        if self.library == "numpy":
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
            self.vjp, self.vjp_name, self.jit = _jax_vjp, "jax.vjp", jax.jit
        elif name == "torch":
            import torch

            self.xp = torch
            self.vjp, self.vjp_name = _torch_vjp, "torch autograd"
        else:  # pragma: no cover
            raise ValueError(name)

    def asarray(self, a, dtype=None):
        """A NumPy array (or nested list) as this backend's array, keeping its dtype (numpy_readonly: a read-only copy)."""
        a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
        if self.name == "torch":
            import torch

            return torch.from_numpy(np.array(a))
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a)
        if self.name == "numpy_readonly":
            return _readonly(np.array(a))
        return self.xp.asarray(a)

    def astype(self, a, dtype):
        """This backend's array ``a`` cast to the dtype named ``dtype`` ("float32", "bfloat16", ...)."""
        if self.name == "torch":
            import torch

            return a.to(getattr(torch, dtype))
        if self.name == "array_api_strict":
            return self.xp.astype(a, getattr(self.xp, dtype))
        out = a.astype(getattr(self.xp, dtype))
        return _readonly(np.array(out)) if self.name == "numpy_readonly" else out  # np.array: a scalar has no flags

    def to_numpy(self, a):
        if self.name == "torch":
            return a.detach().cpu().numpy()
        if self.name == "array_api_strict":
            return np.asarray(a._array)
        return np.asarray(a)

    def __repr__(self):
        return self.name


def _identity(f):
    return f


def _readonly(a):
    a.flags.writeable = False
    return a


def _torch_vjp(f, x, cotangent=None):
    import torch

    xg = x.detach().clone().requires_grad_(True)
    out = f(xg)
    out.backward(torch.ones((), dtype=out.dtype) if cotangent is None else cotangent)
    return out, xg.grad


def _jax_vjp(f, x, cotangent=None):
    import jax

    out, vjp = jax.vjp(f, x)
    (grad,) = vjp(jax.numpy.ones((), out.dtype) if cotangent is None else cotangent)
    return out, grad


def _available(name):
    try:
        importlib.import_module(LIBRARY.get(name, name))
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


MARKERS = {
    "skip_xp_backend": "skip_xp_backend(*names, reason): skip on these backends of the `backend` fixture",
    "xfail_xp_backend": (
        "xfail_xp_backend(*names, reason, strict=True): expect a failure on these backends of the `backend` fixture"
    ),
}


def pytest_configure(config):
    for line in MARKERS.values():
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(items):
    """A backend marker on a test that does not take the ``backend`` fixture would be ignored: an error instead.
    Tests marked ``fuzz`` (the long differential run) are deselected unless ``-m`` names that marker."""
    config = getattr(items[0], "config", None) if items else None
    if config is not None and "fuzz" not in (config.option.markexpr or ""):
        fuzz = [item for item in items if item.get_closest_marker("fuzz")]
        if fuzz:
            config.hook.pytest_deselected(items=fuzz)
            items[:] = [item for item in items if not item.get_closest_marker("fuzz")]
    for item in items:
        for name in MARKERS:
            for marker in item.iter_markers(name):
                _check_marker(marker)
                if "backend" not in getattr(item, "fixturenames", ()):
                    raise pytest.UsageError(f"{item.nodeid}: {name} needs the `backend` fixture")


def _check_marker(marker):
    unknown = [n for n in marker.args if n not in BACKENDS]
    if not marker.args or unknown:
        raise pytest.UsageError(f"{marker.name} names no backend or an unknown one: {marker.args} (of {BACKENDS})")
    if not marker.kwargs.get("reason"):
        raise pytest.UsageError(f"{marker.name}{marker.args} needs a reason")
    if set(marker.kwargs) - {"reason", "strict"} or (marker.name == "skip_xp_backend" and "strict" in marker.kwargs):
        raise pytest.UsageError(f"{marker.name}: unexpected keywords {sorted(marker.kwargs)}")


@pytest.fixture(params=backend_params())
def backend(request):
    name = request.param
    for marker in request.node.iter_markers("skip_xp_backend"):
        if name in marker.args:
            pytest.skip(f"{name}: {marker.kwargs['reason']}")
    for marker in request.node.iter_markers("xfail_xp_backend"):
        if name in marker.args:
            reason = f"{name}: {marker.kwargs['reason']}"
            request.applymarker(pytest.mark.xfail(reason=reason, strict=marker.kwargs.get("strict", True)))
    return Backend(name)


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
