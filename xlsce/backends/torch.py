"""The PyTorch backend: in-place primitives, and the analytic backward registered with autograd.

Imported only when a torch tensor is seen, so that importing xlsce never imports torch.  The
``torch.autograd.Function`` classes are defined at module level because ``torch.compile(fullgraph=True)``
can run an import in the traced function but not a ``class`` statement: a compiled call may be the
first xlsce call of a process.

The mode is chosen per call (:func:`select`): eager on the CPU (values may be read, blocks),
eager elsewhere (a GPU, meta tensors: nothing is read back, the class-range check is a
device-side assertion, as ``F.cross_entropy``'s on CUDA), or compiling (``torch.compile``:
traced, unchecked).
"""

from __future__ import annotations

import sys
import types

import torch

from .. import _linear, _math
from .._types import Residuals
from . import _compat, generic
from .generic import InPlace

_HALF = (torch.bfloat16, torch.float16)


def _namespace(base):
    """array-api-compat's torch namespace with the reductions that every loss makes called directly:
    its wrappers (axis=None handling, keepdims emulation) cost microseconds a call, as much as the
    reduction itself on a small problem."""

    def sum(x, /, *, axis=None, dtype=None, keepdims=False):  # noqa: A001 (the array API's name)
        if dtype is not None or (axis is None and keepdims):
            return base.sum(x, axis=axis, dtype=dtype, keepdims=keepdims)
        return x.sum() if axis is None else x.sum(axis, keepdim=keepdims)

    def mean(x, /, *, axis=None, keepdims=False):
        return x.mean() if axis is None and not keepdims else base.mean(x, axis=axis, keepdims=keepdims)

    def max(x, /, *, axis=None, keepdims=False):  # noqa: A001
        return base.max(x, axis=axis, keepdims=keepdims) if axis is None else x.amax(axis, keepdim=keepdims)

    def expand_dims(x, /, *, axis=0):
        return x.unsqueeze(axis)

    def squeeze(x, /, axis):
        return x.squeeze(axis)

    def astype(x, dtype, /, *, copy=True, device=None):
        if device is not None or (copy and x.dtype == dtype):
            return base.astype(x, dtype, copy=copy, device=device)
        return x.to(dtype)

    ns = types.ModuleType("xlsce._torch", base.__doc__)
    ns.__dict__.update(base.__dict__)
    ns.__dict__.update(sum=sum, mean=mean, max=max, expand_dims=expand_dims, squeeze=squeeze, astype=astype)
    return ns


class Torch(InPlace):
    name = "torch"

    def __init__(self, xp, device, *, traced, on_cpu):
        super().__init__(xp, device, traced=traced, on_cpu=on_cpu)

    @staticmethod
    def _dtypes(xp):
        dtypes = [v for v in vars(torch).values() if isinstance(v, torch.dtype)]
        floats = {d for d in dtypes if d.is_floating_point}
        ints = {d for d in dtypes if not d.is_floating_point and not d.is_complex and d != torch.bool}
        return floats, ints, torch.float32, torch.float64

    # ------------------------------------------------------------------ checks

    def check_weight(self, weight):
        if weight.requires_grad and torch.is_grad_enabled():
            raise TypeError("weight must not require grad: xlsce provides no gradient for class weights")

    def require(self, ok, message):
        if self.readable:
            if not ok.item():
                raise ValueError(message)
        elif not self.traced:  # a GPU or meta tensors: a device-side assertion, no synchronisation
            torch._assert_async(ok, message)

    def min_max(self, x, *, lo=True, hi=True):
        if lo and hi:
            lo, hi = x.aminmax()  # one pass instead of two
            return lo.item(), hi.item()
        return (x.min().item() if lo else None), (x.max().item() if hi else None)

    # ------------------------------------------------------------------ elementwise, on xlsce's own buffers

    def exp_(self, a):
        return a.exp_()

    def subtract(self, a, b, out=None):
        if a.dtype in _HALF and self.on_cpu and b.dtype != a.dtype:
            # on the CPU, PyTorch converts a mixed-precision operand into a temporary of its own before the
            # subtraction; converting into the result, then subtracting in place, is one buffer less
            return (a.to(b.dtype) if out is None else out.copy_(a)).sub_(b)
        return a - b if out is None else torch.sub(a, b, out=out)

    def matmul(self, a, b, out=None):
        return a @ b if out is None else torch.matmul(a, b, out=out)

    def addmm(self, acc, a, b):
        """acc + a @ b as one in-place GEMM: no (V, H) temporary per chunk."""
        if acc is None:
            p = a @ b
            return p if p.dtype in (torch.float32, torch.float64) else p.float()
        if acc.dtype == a.dtype:
            return acc.addmm_(a, b)
        return acc.add_(a @ b)

    def imul_ratio(self, a, num, den):
        # small a (where the cost is the number of operations) and a Python number num: a / (den / num),
        # two operations instead of three (num / den is a reciprocal and a product); large a keeps the
        # product, cheaper per element than a division
        if type(num) is float and num != 0 and a.numel() <= generic.SMALL_LOGITS:
            return a.div_(den if num == 1 else den / num)
        a *= num / den
        return a

    def isub_product(self, a, u, v):
        # without the temporary of the product
        if type(u) is float:
            return a.sub_(v, alpha=u)
        if type(v) is float:
            return a.sub_(u, alpha=v)
        return a.addcmul_(u, v, value=-1)

    # ------------------------------------------------------------------ indexing at the target

    def take_at(self, a, index, axis):
        return a.gather(axis, index if index.dtype == torch.int64 else index.long())  # compat's adds 3 operations

    def isub_at(self, a, index, v, axis):
        index = index if index.dtype == torch.int64 else index.long()
        if type(v) is float:
            return a.scatter_(axis, index, -v, reduce="add")  # a scalar: no tensor of it to make
        src = -(v if v.shape == index.shape else v.expand(index.shape)).to(a.dtype)
        return a.scatter_add_(axis, index, src)

    def take_classes(self, v, index):
        return v.take(index if index.dtype == torch.int64 else index.long())  # one gather, of index's shape

    def where0(self, cond, x):
        return x * cond  # one cheap operation; torch.where with a Python scalar costs several

    def row_dot(self, a, v, axis):
        if v is None:
            return a.sum(axis, keepdim=True)
        if axis == a.ndim - 1 and v.ndim == a.ndim and v.numel() == v.shape[-1]:
            return (a @ v.reshape(-1)).unsqueeze(axis)  # one BLAS pass, no temporary
        return (a * v).sum(axis, keepdim=True)

    # ------------------------------------------------------------------ entry points: autograd

    def loss(self, cfg, logits, target, weight, where):
        if torch.is_grad_enabled() and (logits.requires_grad or target.requires_grad):
            return CrossEntropyFunction.apply(self, cfg, logits, target, weight, where)
        return super().loss(cfg, logits, target, weight, where)  # the forward alone, no autograd bookkeeping

    def value_and_grad(self, cfg, logits, target, weight, where, cotangent):
        with torch.no_grad():
            return super().value_and_grad(cfg, logits, target, weight, where, cotangent)

    def linear_loss_flat(self, cfg, chunk, hidden, classifier, bias, target, weight, where):
        if torch.is_grad_enabled() and (
            hidden.requires_grad or classifier.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return LinearCrossEntropyFunction.apply(self, cfg, chunk, hidden, classifier, bias, target, weight, where)
        with torch.no_grad():
            return super().linear_loss_flat(cfg, chunk, hidden, classifier, bias, target, weight, where)

    def linear_value_and_grads(self, cfg, chunk, hidden, classifier, bias, target, weight, where, *, need, cotangent):
        with torch.no_grad():
            args = (cfg, chunk, hidden, classifier, bias, target, weight, where)
            return super().linear_value_and_grads(*args, need=need, cotangent=cotangent)


# One backend object per mode, (on the CPU, compiling), made at import (which torch.compile runs untraced).
_INSTANCES = {
    (cpu, compiling): Torch(_namespace(_compat.torch_namespace()), _compat.device, traced=compiling, on_cpu=cpu)
    for cpu in (True, False)
    for compiling in (True, False)
}


def backend(x):
    """The backend for a call whose first array is ``x``: eager on the CPU, eager elsewhere, or compiling."""
    return _INSTANCES[x.is_cpu, torch.compiler.is_compiling()]


# --------------------------------------------------------------------------- DTensor


def selector(arrays):
    """The backend function for a call on arrays of these types: :func:`backend`, or
    :func:`dtensor_backend` where they are DTensors (all of them: a mix is refused).  DTensor is
    looked for in ``sys.modules``: without ``torch.distributed.tensor`` imported there is none, and
    xlsce never imports it."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is None or not any(isinstance(a, dtensor) for a in arrays):
        return backend
    if not all(isinstance(a, dtensor) for a in arrays):
        kinds = ", ".join(type(a).__name__ for a in arrays)
        raise ValueError(
            f"the arrays of this call mix DTensor and plain tensors ({kinds}, in argument order): pass every "
            "array as a DTensor of one mesh, or, for logits sharded on the classes, logits.to_local() with plain "
            "tensors and process_group=..."
        )
    return dtensor_backend


class DTensorTorch(Torch):
    """DTensor arguments (``torch.distributed.tensor``): the operations go through DTensor's sharding
    propagation, in the mode that reads no value to choose a path (``eager`` False, as on a GPU), so
    that every reduction over sharded positions is global; the checks read their one boolean with
    ``full_tensor()`` where the shards are on the CPU.

    Shards of the positions (a batch dimension) and replicas work: the loss, the gradient with the
    input's placements.  Shards of the classes are refused (:func:`_refuse_class_shards`): the
    softmax's reductions over them would need collectives that DTensor has no strategy for (a
    scatter in the backward), and that ``process_group=`` (vocabulary parallel over local slices)
    does instead.  Partial placements are refused too."""

    def require(self, ok, message):
        if self.readable and not ok.full_tensor().item():
            raise ValueError(message)

    def loss(self, cfg, logits, target, weight, where):
        _refuse_class_shards(cfg, logits=logits, target=target if cfg.soft else None, weight=weight, where=where)
        return super().loss(cfg, logits, target, weight, where)

    def value_and_grad(self, cfg, logits, target, weight, where, cotangent):
        _refuse_class_shards(cfg, logits=logits, target=target if cfg.soft else None, weight=weight, where=where)
        return super().value_and_grad(cfg, logits, target, weight, where, cotangent)

    def linear_loss(self, cfg, chunk, hidden, classifier, bias, target, weight, where):
        _refuse_class_shards(None, hidden=hidden, classifier=classifier, bias=bias, weight=weight, where=where)
        return super().linear_loss(cfg, chunk, hidden, classifier, bias, target, weight, where)

    def linear_value_and_grads(self, cfg, chunk, hidden, classifier, bias, target, weight, where, *, need, cotangent):
        _refuse_class_shards(None, hidden=hidden, classifier=classifier, bias=bias, weight=weight, where=where)
        args = (cfg, chunk, hidden, classifier, bias, target, weight, where)
        return super().linear_value_and_grads(*args, need=need, cotangent=cotangent)


def _dtensor_instance(cpu, compiling):
    ops = DTensorTorch(_namespace(_compat.torch_namespace()), _compat.device, traced=compiling, on_cpu=False)
    ops.readable = cpu and not compiling  # the checks' boolean is read back on the host only
    return ops


_DTENSOR_INSTANCES = {
    (cpu, compiling): _dtensor_instance(cpu, compiling) for cpu in (True, False) for compiling in (True, False)
}


def dtensor_backend(x):
    """The backend for a call on DTensors, ``x`` the first."""
    return _DTENSOR_INSTANCES[x.device.type == "cpu", torch.compiler.is_compiling()]


def _refuse_class_shards(cfg, **arrays):
    """ValueError for a DTensor argument sharded along a dimension of the classes (or of the hidden
    width, which the classifier's product contracts), or holding partial sums.  ``cfg`` None: the
    arrays of linear_cross_entropy."""
    for name, x in arrays.items():
        if x is None:
            continue
        if name in ("logits", "target"):
            dims = {cfg.axis % x.ndim}
        elif name == "hidden":
            dims = {x.ndim - 1}
        elif name == "classifier":
            dims = {0, 1}
        elif name in ("bias", "weight"):
            dims = {0}
        else:
            dims = set()
        for i, p in enumerate(x.placements):
            if p.is_partial():
                raise ValueError(
                    f"{name} is a DTensor of partial sums ({p} on mesh dimension {i}): redistribute it "
                    "(Replicate or Shard of a batch dimension) before the loss"
                )
            if p.is_shard() and p.dim % x.ndim in dims:
                what = "hidden width" if name == "hidden" or (name == "classifier" and p.dim % 2) else "classes"
                raise ValueError(
                    f"{name} is a DTensor sharded on its {what} (dimension {p.dim % x.ndim}, {p} on mesh "
                    f"dimension {i}); xlsce shards DTensors only along the positions.  For vocabulary "
                    f"parallelism pass {name}.to_local() (each rank's contiguous slice of the classes, the "
                    f"other arrays as plain tensors) and process_group=mesh.get_group({i})"
                )


# --------------------------------------------------------------------------- autograd


class CrossEntropyFunction(torch.autograd.Function):
    """``_math.forward`` and ``_math.backward``; only O(N) residuals are saved besides the inputs.

    Small logits (at most ``SMALL_LOGITS`` elements, 256 KiB of float32; float32/float64, not compiling)
    are the exception: there the cost is the number of operations, not their size, so the
    forward pass computes the gradient for a unit cotangent from its own exponentials
    (``_math.forward(g=1)``, a few more operations) and keeps it, and the backward only
    scales it by the cotangent, instead of a second pass of about ten operations.
    """

    @staticmethod
    def forward(ctx, ops, cfg, logits, target, weight, where):
        ctx.ops, ctx.cfg = ops, cfg
        ctx.fused = (
            ops.fuse
            and logits.numel() <= generic.SMALL_LOGITS
            and logits.dtype in (torch.float32, torch.float64)
            and ctx.needs_input_grad[2]
            and not ctx.needs_input_grad[3]
            and not cfg.return_lse
        )
        if ctx.fused:
            out, _, dz = _math.forward(ops, cfg, logits, target, weight, where, g=1.0)
            ctx.save_for_backward(dz, logits)  # the logits only to tie a create_graph gradient to them
            return out
        out, res = _math.forward(ops, cfg, logits, target, weight, where)
        # Residuals are O(N) tensors or Python floats; save_for_backward takes tensors.
        ctx.floats = [None if isinstance(r, torch.Tensor) else r for r in res]
        tensors = [r if isinstance(r, torch.Tensor) else None for r in res]
        ctx.save_for_backward(logits, target, weight, *tensors)
        return (out, ops.reported_lse(cfg, res, logits)) if cfg.return_lse else out

    @staticmethod
    def backward(ctx, g, g_lse=None):
        if not torch.is_grad_enabled():  # the usual case: no create_graph
            return CrossEntropyFunction._backward(ctx, g, g_lse)
        return _first_order_backward(CrossEntropyFunction._backward, ctx, g, g_lse)

    @staticmethod
    def _backward(ctx, g, g_lse):
        if ctx.fused:  # the gradient for a unit cotangent, kept by the forward; linear in the cotangent
            dz = ctx.saved_tensors[0]
            if ctx.cfg.reduction == "none":
                g = g.unsqueeze(ctx.cfg.axis)
            return None, None, dz * g, None, None, None
        logits, target, weight, *tensors = ctx.saved_tensors
        res = Residuals(*(t if f is None else f for t, f in zip(tensors, ctx.floats, strict=True)))
        dlogits, dtarget = _math.backward(
            ctx.ops, ctx.cfg, logits, target, weight, res, g, need_target=ctx.needs_input_grad[3], g_lse=g_lse
        )
        if dtarget is not None:
            dtarget = dtarget.to(target.dtype)
        return None, None, dlogits, dtarget, None, None


def _first_order_backward(backward, ctx, g, g_lse):
    """``backward(ctx, g, g_lse)``; under ``create_graph=True`` the gradients are computed without
    recording and tied to the saved inputs by :class:`_FirstOrderOnly`, so that differentiating them
    raises a clear error (the analytic backward is first order only)."""
    if torch.compiler.is_compiling():
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
    def forward(ctx, ops, cfg, chunk, hidden, classifier, bias, target, weight, where):
        need = (ctx.needs_input_grad[3], ctx.needs_input_grad[4], bias is not None and ctx.needs_input_grad[5])
        ctx.ops, ctx.cfg, ctx.chunk, ctx.need = ops, cfg, chunk, need
        ctx.set_materialize_grads(False)
        args = (ops, cfg, hidden, classifier, bias, target, weight, where)
        inputs = (hidden, classifier, bias, target, weight, where)
        if cfg.reduction == "none":
            out, lse, _ = _linear.value_and_grads(*args, chunk=chunk, need=(False,) * 3)
            ctx.save_for_backward(*inputs)
        else:
            out, lse, grads = _linear.value_and_grads(*args, chunk=chunk, need=need)
            # the inputs too (references, no copy): to recompute for an lse cotangent, and to tie a
            # create_graph gradient to them
            ctx.save_for_backward(*grads, *inputs)
        return (out, lse) if cfg.return_lse else out

    @staticmethod
    def backward(ctx, g, g_lse=None):
        if not torch.is_grad_enabled():  # the usual case: no create_graph
            return LinearCrossEntropyFunction._backward(ctx, g, g_lse)
        return _first_order_backward(LinearCrossEntropyFunction._backward, ctx, g, g_lse)

    @staticmethod
    def _backward(ctx, g, g_lse):
        cfg, saved = ctx.cfg, ctx.saved_tensors
        if g is None and g_lse is None:
            return (None,) * 9
        if cfg.reduction == "none" or g_lse is not None:
            hidden, classifier, bias, target, weight, where = saved[-6:]
            if g is None:
                g = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
                g = g.expand(target.shape) if cfg.reduction == "none" else g
            args = (ctx.ops, cfg, hidden, classifier, bias, target, weight, where)
            _, _, grads = _linear.value_and_grads(
                *args, chunk=ctx.chunk, need=ctx.need, cotangent=g, cotangent_lse=g_lse
            )
        elif g is None:
            grads = (None, None, None)
        else:
            grads = tuple(None if x is None else (g * x).to(x.dtype) for x in saved[:3])
        return None, None, None, *grads, None, None, None
