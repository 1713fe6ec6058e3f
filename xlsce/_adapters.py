"""Backend adapters: the only module that knows about array-api-compat and frameworks.

* :func:`namespace` finds the array namespace of the inputs (one library only).
* :func:`is_traced` tells whether values can be read (eager) or not (jit, compile).
* :func:`loss` evaluates :func:`xlsce._math.forward` and, on PyTorch and JAX,
  registers :func:`xlsce._math.backward` with the native autodiff
  (``torch.autograd.Function``, ``jax.custom_vjp``), so autograd and
  ``jax.grad`` run the same analytic gradient as :func:`xlsce.value_and_grad`.

Frameworks are imported lazily: importing xlsce imports neither torch nor jax.
"""

from __future__ import annotations

import functools

import array_api_compat

from . import _math


def namespace(*arrays):
    """The array-API namespace shared by ``arrays`` (None entries are skipped)."""
    arrays = [a for a in arrays if a is not None]
    return array_api_compat.array_namespace(*arrays)


def is_torch(x) -> bool:
    return array_api_compat.is_torch_array(x)


def is_jax(x) -> bool:
    return array_api_compat.is_jax_array(x)


def is_traced(x) -> bool:
    """True where array values cannot be read: jax tracers, torch.compile, lazy arrays."""
    if is_jax(x):  # array-api-compat calls every jax array lazy; only tracers are
        import jax

        return isinstance(x, jax.core.Tracer)
    if array_api_compat.is_lazy_array(x):
        return True
    if is_torch(x):
        import torch

        return torch.compiler.is_compiling()
    return False


def loss(xp, cfg: _math.Config, logits, target, weight, where):
    """The loss, differentiable with the backend's own machinery where it has one."""
    if is_torch(logits):
        return _torch_function().apply(cfg, logits, target, weight, where)
    if is_jax(logits):
        return _jax_function()(cfg, logits, target, weight, where)
    return _math.forward(xp, cfg, logits, target, weight, where)[0]


def value_and_grad(xp, cfg: _math.Config, logits, target, weight, where, cotangent):
    """Loss and d loss / d logits from the analytic backward, without recording autodiff."""
    if is_torch(logits):
        import torch

        with torch.no_grad():
            return _value_and_grad(xp, cfg, logits, target, weight, where, cotangent)
    return _value_and_grad(xp, cfg, logits, target, weight, where, cotangent)


def _value_and_grad(xp, cfg, logits, target, weight, where, cotangent):
    out, res = _math.forward(xp, cfg, logits, target, weight, where)
    g = 1.0 if cotangent is None else cotangent
    if cotangent is None and cfg.reduction == "none":
        g = xp.ones_like(out)
    return out, _math.backward(xp, cfg, logits, target, weight, res, g)[0]


# --------------------------------------------------------------------------- torch


@functools.cache
def _torch_function():
    import torch
    from array_api_compat import torch as xpt

    class CrossEntropyFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, cfg, logits, target, weight, where):
            out, res = _math.forward(xpt, cfg, logits, target, weight, where)
            ctx.cfg = cfg
            # Residuals are O(N) tensors or Python floats; save_for_backward takes tensors.
            ctx.floats = [None if isinstance(r, torch.Tensor) else r for r in res]
            tensors = [r if isinstance(r, torch.Tensor) else None for r in res]
            ctx.save_for_backward(logits, target, weight, *tensors)
            return out

        @staticmethod
        def backward(ctx, g):
            logits, target, weight, *tensors = ctx.saved_tensors
            res = _math.Residuals(*(t if f is None else f for t, f in zip(tensors, ctx.floats, strict=True)))
            dlogits, dtarget = _math.backward(
                xpt, ctx.cfg, logits, target, weight, res, g, need_target=ctx.needs_input_grad[2]
            )
            if dtarget is not None:
                dtarget = dtarget.to(target.dtype)
            return None, dlogits, dtarget, None, None

    return CrossEntropyFunction


def check_torch_weight(weight):
    """Gradients with respect to class weights are not provided: say so instead of returning 0."""
    import torch

    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise TypeError("weight must not require grad: xlsce provides no gradient for class weights")


# --------------------------------------------------------------------------- jax


@functools.cache
def _jax_function():
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero

    def primal(cfg, logits, target, weight, where):
        return _math.forward(jnp, cfg, logits, target, weight, where)[0]

    fn = jax.custom_vjp(primal, nondiff_argnums=(0,))

    def fwd(cfg, logits, target, weight, where):
        if weight is not None and weight.perturbed:
            raise TypeError("weight must not be differentiated: xlsce provides no gradient for class weights")
        need_target = target.perturbed
        logits, target = logits.value, target.value
        weight = None if weight is None else weight.value
        where = None if where is None else where.value
        out, res = _math.forward(jnp, cfg, logits, target, weight, where)
        res = _math.Residuals(*(r if r is None else jnp.asarray(r) for r in res))
        return out, (logits, target, weight, res, need_target)

    def bwd(cfg, saved, g):
        logits, target, weight, res, need_target = saved
        if isinstance(g, SymbolicZero):
            g = jnp.zeros(g.shape, g.dtype)
        dlogits, dtarget = _math.backward(jnp, cfg, logits, target, weight, res, g, need_target=need_target)
        if dtarget is not None:
            dtarget = dtarget.astype(target.dtype)
        return dlogits, dtarget, None, None

    fn.defvjp(fwd, bwd, symbolic_zeros=True)
    return fn
