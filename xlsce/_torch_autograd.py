"""PyTorch adapters: the analytic backward registered with ``torch.autograd.Function``.

Imported only where a torch tensor is seen (``_adapters.loss``, ``_adapters.linear_loss``), so
importing xlsce never imports torch.  The classes are defined at module level because
``torch.compile(fullgraph=True)`` can run an import in the traced function but not a ``class``
statement: a compiled call may be the first xlsce call of a process.
"""

from __future__ import annotations

import torch
from array_api_compat import torch as xpt

from . import _adapters, _linear, _math
from ._adapters import _reported_lse, _torch_loop


class CrossEntropyFunction(torch.autograd.Function):
    """``_math.forward`` and ``_math.backward``; only O(N) residuals are saved besides the inputs.

    Small logits (at most ``_adapters.SMALL_LOGITS`` elements, 256 KiB of float32; eager, float32/float64)
    are the exception: there the cost is the number of operations, not their size, so the
    forward pass computes the gradient for a unit cotangent from its own exponentials
    (``_math.forward(g=1)``, a few more operations) and keeps it, and the backward only
    scales it by the cotangent, instead of a second pass of about ten operations.
    """

    @staticmethod
    def forward(ctx, cfg, logits, target, weight, where):
        ctx.cfg = cfg
        ctx.fused = (
            logits.numel() <= _adapters.SMALL_LOGITS
            and logits.dtype in (torch.float32, torch.float64)
            and ctx.needs_input_grad[1]
            and not ctx.needs_input_grad[2]
            and not cfg.return_lse
            and not torch.compiler.is_compiling()
        )
        if ctx.fused:
            out, _, dz = _math.forward(xpt, cfg, logits, target, weight, where, g=1.0)
            ctx.save_for_backward(dz, logits)  # the logits only to tie a create_graph gradient to them
            return out
        out, res = _math.forward(xpt, cfg, logits, target, weight, where)
        # Residuals are O(N) tensors or Python floats; save_for_backward takes tensors.
        ctx.floats = [None if isinstance(r, torch.Tensor) else r for r in res]
        tensors = [r if isinstance(r, torch.Tensor) else None for r in res]
        ctx.save_for_backward(logits, target, weight, *tensors)
        return (out, _reported_lse(xpt, cfg, res, logits)) if cfg.return_lse else out

    @staticmethod
    def backward(ctx, g, g_lse=None):
        return _first_order_backward(CrossEntropyFunction._backward, ctx, g, g_lse)

    @staticmethod
    def _backward(ctx, g, g_lse):
        if ctx.fused:  # the gradient for a unit cotangent, kept by the forward; linear in the cotangent
            dz = ctx.saved_tensors[0]
            if ctx.cfg.reduction == "none":
                g = g.unsqueeze(ctx.cfg.axis)
            return None, dz * g, None, None, None
        logits, target, weight, *tensors = ctx.saved_tensors
        res = _math.Residuals(*(t if f is None else f for t, f in zip(tensors, ctx.floats, strict=True)))
        dlogits, dtarget = _math.backward(
            xpt, ctx.cfg, logits, target, weight, res, g, need_target=ctx.needs_input_grad[2], g_lse=g_lse
        )
        if dtarget is not None:
            dtarget = dtarget.to(target.dtype)
        return None, dlogits, dtarget, None, None


def _first_order_backward(backward, ctx, g, g_lse):
    """``backward(ctx, g, g_lse)``; under ``create_graph=True`` the gradients are computed without
    recording and tied to the saved inputs by :class:`_FirstOrderOnly`, so that differentiating them
    raises a clear error (the analytic backward is first order only)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return backward(ctx, g, g_lse)
    with torch.no_grad():
        grads = backward(ctx, g, g_lse)
    inputs = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
    inputs = inputs or [t for t in (g, g_lse) if t is not None]
    return tuple(_FirstOrderOnly.apply(x, *inputs) if isinstance(x, torch.Tensor) else x for x in grads)


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on a gradient, tied to the inputs it depends on, whose derivative raises."""

    @staticmethod
    def forward(ctx, x, *inputs):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "xlsce.cross_entropy provides first derivatives only: its gradient cannot be differentiated "
            "again (second derivatives, e.g. a Hessian-vector product through create_graph=True)"
        )


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Sum/mean: gradients accumulated in the forward, scaled in the backward.  None: recomputed.

    With ``cfg.return_lse`` the outputs are ``(loss, lse)``; a backward that
    receives a cotangent for the lse recomputes the chunks (logging the lse
    costs nothing; differentiating through it costs one more pass).
    """

    @staticmethod
    def forward(ctx, cfg, chunk, hidden, classifier, bias, target, weight, where):
        need = (ctx.needs_input_grad[2], ctx.needs_input_grad[3], bias is not None and ctx.needs_input_grad[4])
        ctx.cfg, ctx.chunk, ctx.need = cfg, chunk, need
        ctx.set_materialize_grads(False)
        args = (xpt, cfg, hidden, classifier, bias, target, weight, where)
        inputs = (hidden, classifier, bias, target, weight, where)
        if cfg.reduction == "none":
            out, lse, _ = _linear.value_and_grads(*args, chunk=chunk, need=(False,) * 3, loop=_torch_loop)
            ctx.save_for_backward(*inputs)
        else:
            out, lse, grads = _linear.value_and_grads(*args, chunk=chunk, need=need, loop=_torch_loop)
            # the inputs too (references, no copy): to recompute for an lse cotangent, and to tie a
            # create_graph gradient to them
            ctx.save_for_backward(*grads, *inputs)
        return (out, lse) if cfg.return_lse else out

    @staticmethod
    def backward(ctx, g, g_lse=None):
        return _first_order_backward(LinearCrossEntropyFunction._backward, ctx, g, g_lse)

    @staticmethod
    def _backward(ctx, g, g_lse):
        cfg, saved = ctx.cfg, ctx.saved_tensors
        if g is None and g_lse is None:
            return (None,) * 8
        if cfg.reduction == "none" or g_lse is not None:
            hidden, classifier, bias, target, weight, where = saved[-6:]
            if g is None:
                g = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
                g = g.expand(target.shape) if cfg.reduction == "none" else g
            args = (xpt, cfg, hidden, classifier, bias, target, weight, where)
            _, _, grads = _linear.value_and_grads(
                *args, chunk=ctx.chunk, need=ctx.need, cotangent=g, cotangent_lse=g_lse, loop=_torch_loop
            )
        elif g is None:
            grads = (None, None, None)
        else:
            grads = tuple(None if x is None else (g * x).to(x.dtype) for x in saved[:3])
        return None, None, *grads, None, None, None
