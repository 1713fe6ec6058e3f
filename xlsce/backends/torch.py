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
from torch._subclasses.fake_tensor import FakeTensor

from .. import _linear, _math
from .._types import Residuals
from . import _compat, generic
from .generic import Generic, InPlace

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
        self.compiling = traced  # the traced instance is torch.compile's (Functional's is torch.func's)

    @staticmethod
    def _dtypes(xp):
        dtypes = [v for v in vars(torch).values() if isinstance(v, torch.dtype)]
        floats = {d for d in dtypes if d.is_floating_point}
        ints = {d for d in dtypes if not d.is_floating_point and not d.is_complex and d != torch.bool}
        # uint16/32/64 are "shell" dtypes that have no min, max or aminmax on the CPU: refused as targets
        ints -= {getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)}
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

    def class_shards(self, axis_name=None, process_group=None):
        """Vocabulary parallel over ``process_group`` (:class:`TorchShards`, in this backend's mode)."""
        if axis_name is not None:
            raise ValueError(
                "axis_name= is for JAX arrays inside shard_map; with torch.distributed pass process_group="
            )
        if torch.compiler.is_compiling() or _functorch_level() is not None:
            raise ValueError(
                "process_group= runs eagerly: not under torch.compile or torch.func's transforms (its all_reduce "
                "is in place); compile the model around the loss instead"
            )
        return TorchShards(self, process_group)  # per call: no reference to the group outlives it

    # ------------------------------------------------------------------ entry points: autograd

    def loss(self, cfg, logits, target, weight, where):
        if _autocast(logits):  # as torch's cross_entropy there, an autocast float32 op
            with torch.autocast(logits.device.type, enabled=False):
                return self._loss(cfg, *_float32(logits, target, weight), where)
        return self._loss(cfg, logits, target, weight, where)

    def _loss(self, cfg, logits, target, weight, where):
        if torch.is_grad_enabled() and (logits.requires_grad or target.requires_grad):
            fused = (  # the gradient from the forward's exponentials (CrossEntropyFunction)
                self.fuse
                and logits.requires_grad
                and not target.requires_grad
                and not cfg.return_lse
                and logits.numel() <= generic.SMALL_LOGITS
                and logits.dtype in (torch.float32, torch.float64)
            )
            apply = CrossEntropyFunction.apply if self.traced else _eager_apply(CrossEntropyFunction)
            out = apply(self, cfg, fused, logits, target, weight, where)
            return (out[0], out[1]) if cfg.return_lse else out[0]
        return super().loss(cfg, logits, target, weight, where)  # the forward alone, no autograd bookkeeping

    def value_and_grad(self, cfg, logits, target, weight, where, cotangent):
        with torch.no_grad():
            if _autocast(logits):  # the loss in float32, the gradient in the logits' dtype
                with torch.autocast(logits.device.type, enabled=False):
                    z, target, weight = _float32(logits, target, weight)
                    out, dz = super().value_and_grad(cfg, z, target, weight, where, cotangent)
                    return out, dz.to(logits.dtype)
            return super().value_and_grad(cfg, logits, target, weight, where, cotangent)

    def linear_loss_flat(self, cfg, chunk, hidden, classifier, bias, target, weight, where):
        if torch.is_grad_enabled() and (
            hidden.requires_grad or classifier.requires_grad or (bias is not None and bias.requires_grad)
        ):
            need = (hidden.requires_grad, classifier.requires_grad, bias is not None and bias.requires_grad)
            args = (self, cfg, chunk, need, hidden, classifier, bias, target, weight, where)
            apply = LinearCrossEntropyFunction.apply if self.traced else _eager_apply(LinearCrossEntropyFunction)
            out = apply(*args)
            lse = out[1] if cfg.return_lse else None
            return generic.linear_outputs(
                cfg, out[0], lse, out[1 + cfg.return_lse] if cfg.return_token_accuracy else None
            )
        with torch.no_grad():
            return super().linear_loss_flat(cfg, chunk, hidden, classifier, bias, target, weight, where)

    def linear_value_and_grads(self, cfg, chunk, hidden, classifier, bias, target, weight, where, *, need, cotangent):
        with torch.no_grad():
            args = (cfg, chunk, hidden, classifier, bias, target, weight, where)
            return super().linear_value_and_grads(*args, need=need, cotangent=cotangent)


class TorchShards(generic.ClassShards, Torch):
    """Vocabulary parallel over the ``torch.distributed`` process group ``group``
    (:class:`~xlsce.backends.generic.ClassShards`), the ranks' slices in rank order: ``all_reduce``
    MAX/SUM of per-row partial results (the forward's only communication; the backward is local, as
    Megatron's and flash-attn's).  In the mode of the call's backend ``base`` (eager on the CPU, reading
    only values that are the same on every rank)."""

    def __init__(self, base, group):
        import torch.distributed as dist

        self.__dict__.update(base.__dict__)  # the mode, namespace and dtypes of the call's backend
        self.group, self._dist = group, dist
        self.name = "torch (vocabulary parallel over a process group)"

    @property
    def shards(self):
        return self._dist.get_world_size(self.group)

    def shard_index(self):
        return self._dist.get_rank(self.group)

    def all_max(self, x):
        self._dist.all_reduce(x, op=self._dist.ReduceOp.MAX, group=self.group)  # x: a fresh result of ours
        return x

    def all_sum(self, x):
        self._dist.all_reduce(x, op=self._dist.ReduceOp.SUM, group=self.group)
        return x


class Functional(Torch):
    """Under torch.func's transforms (``vmap``, ``grad``, ``jacrev``, ``vjp``): traced (nothing read back:
    ``.item()`` fails on a batched tensor) and out of place (an in-place update of an unbatched buffer by a
    batched value, e.g. the cotangents that ``jacrev`` vmaps over, is not possible)."""

    name = "torch (torch.func)"
    inplace = False

    def __init__(self, xp, device, *, on_cpu):
        super().__init__(xp, device, traced=True, on_cpu=on_cpu)
        self.compiling = False

    def exp_(self, a):
        return a.exp()

    def subtract(self, a, b, out=None):
        return a - b

    def matmul(self, a, b, out=None):
        return a @ b

    def addmm(self, acc, a, b):
        return Generic.addmm(self, acc, a, b)

    def imul(self, a, b):
        return a * b

    def imul_ratio(self, a, num, den):
        return a * (num / den)

    def isub(self, a, b):
        return a - b

    def iadd(self, acc, x):
        return x if acc is None else acc + x

    def isub_product(self, a, u, v):
        return a - u * v

    def isub_at(self, a, index, v, axis):
        index = index if index.dtype == torch.int64 else index.long()
        v = v if isinstance(v, torch.Tensor) else torch.full((), v, dtype=a.dtype, device=a.device)
        return a.scatter_add(axis, index, -(v.expand(index.shape)).to(a.dtype))


def _autocast(x):
    """Whether ``torch.autocast`` is on for ``x``'s device type (one cheap check when it is off anywhere)."""
    return torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type)


def _float32(*tensors):
    """Half-precision floating tensors (None passes) converted to float32, as autocast does for its float32 ops
    (float64 stays); the conversion is recorded by autograd, so gradients reach the half-precision inputs."""
    return tuple(t.float() if t is not None and t.dtype in _HALF else t for t in tensors)


# One backend object per mode, (on the CPU, compiling), made at import (which torch.compile runs untraced),
# and one per device kind for torch.func's transforms.
_INSTANCES = {
    (cpu, compiling): Torch(_namespace(_compat.torch_namespace()), _compat.device, traced=compiling, on_cpu=cpu)
    for cpu in (True, False)
    for compiling in (True, False)
}
_TRANSFORMED = {cpu: Functional(_INSTANCES[cpu, True].xp, _compat.device, on_cpu=cpu) for cpu in (True, False)}
_functorch_level = torch._C._functorch.maybe_current_level  # None outside torch.func's transforms


def backend(x):
    """The backend for a call whose first array is ``x``: eager on the CPU, eager elsewhere, compiling, or
    under a torch.func transform (any array of the call may be batched or wrapped: the level is asked)."""
    if torch.compiler.is_compiling():
        return _INSTANCES[x.is_cpu, True]
    if _functorch_level() is not None:
        return _TRANSFORMED[x.is_cpu]
    return _INSTANCES[x.is_cpu and not isinstance(x, FakeTensor), False]  # a fake tensor has no values to read


def _backward_ops(ops):
    """The backend for a backward: the forward's, or the torch.func one where the backward itself runs under
    a transform (``jacrev`` vmaps it over the cotangents, ``vmap(grad(f))``)."""
    if ops.traced or _functorch_level() is None:
        return ops
    return _TRANSFORMED[ops.on_cpu]


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

    def input_grad(self, grad, like, whole=False):
        # a gradient with its input's placements (the eager loop's concatenation of chunks comes back Replicate)
        if grad is None or like is None or tuple(grad.placements) == tuple(like.placements):
            return grad
        return grad.redistribute(like.device_mesh, like.placements)

    def class_shards(self, axis_name=None, process_group=None):
        raise ValueError(
            "process_group= takes each rank's slice of the classes as plain tensors: pass logits.to_local() "
            "(and the other arrays as plain tensors), not DTensors"
        )

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
#
# The Functions are in torch.func's form (``forward`` without ctx, ``setup_context``, ``generate_vmap_rule``),
# so that torch.func.grad/jacrev/vjp and torch.vmap run them.  What the backward needs is returned by the
# forward: the loss first, then tensors (marked non-differentiable), then one Python object (the Python
# numbers and flags of the residuals, and where the tensors go among them).

_TENSOR = object()  # a tensor's place in a layout


def _eager_apply(function):
    """``function.apply`` without its per-call ``inspect.signature`` binding (tens of microseconds, for
    Functions with a setup_context), where no transform is active and Dynamo does not trace (an eager
    backend): torch's own ``apply`` then calls the same ``_FunctionBase.apply``, every argument positional."""
    return _FUNCTION_BASE_APPLY.__get__(None, function)


_FUNCTION_BASE_APPLY = torch._C._FunctionBase.__dict__["apply"]


def _split(values):
    """``(tensors, layout)``: the tensors of ``values`` and ``values`` with ``_TENSOR`` in their place."""
    return (
        tuple(v for v in values if isinstance(v, torch.Tensor)),
        tuple(_TENSOR if isinstance(v, torch.Tensor) else v for v in values),
    )


def _join(tensors, layout):
    """The inverse of :func:`_split`."""
    it = iter(tensors)
    return [next(it) if v is _TENSOR else v for v in layout]


class CrossEntropyFunction(torch.autograd.Function):
    """``_math.forward`` and ``_math.backward``; only O(N) residuals are saved besides the inputs.

    Small logits (at most ``SMALL_LOGITS`` elements, 256 KiB of float32; float32/float64, eager) are the
    exception (``fused``, chosen by :meth:`Torch.loss`): there the cost is the number of operations, not
    their size, so the forward pass computes the gradient for a unit cotangent from its own exponentials
    (``_math.forward(g=1)``, a few more operations) and keeps it, and the backward only scales it by the
    cotangent, instead of a second pass of about ten operations.

    Outputs: the loss, the lse if ``cfg.return_lse``, the residual tensors, the residuals' layout.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(ops, cfg, fused, logits, target, weight, where):
        if fused:
            out, _, dz = _math.forward(ops, cfg, logits, target, weight, where, g=1.0)
            return out, dz, None  # the gradient for a unit cotangent; no layout
        out, res = _math.forward(ops, cfg, logits, target, weight, where)
        tensors, layout = _split(res)
        lse = (ops.reported_lse(cfg, res, logits),) if cfg.return_lse else ()
        return (out, *lse, *tensors, layout)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ops, cfg, fused, logits, target, weight, where = inputs
        ctx.ops, ctx.cfg, ctx.fused, ctx.layout = ops, cfg, fused, output[-1]
        saved = output[1 + cfg.return_lse : -1]
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zeros for the residuals' cotangents (nor the fused gradient's)
        # the logits too where fused: only to tie a create_graph gradient to them
        ctx.save_for_backward(*saved, logits, target, weight)

    @staticmethod
    def backward(ctx, g, *rest):
        g_lse = rest[0] if ctx.cfg.return_lse else None
        if not torch.is_grad_enabled():  # the usual case: no create_graph
            return CrossEntropyFunction._backward(ctx, g, g_lse)
        return _first_order_backward(CrossEntropyFunction._backward, ctx, g, g_lse)

    @staticmethod
    def _backward(ctx, g, g_lse):
        cfg = ctx.cfg
        *tensors, logits, target, weight = ctx.saved_tensors
        if g is None and g_lse is None:
            return (None,) * 7
        if g is None:  # only the lse is used
            g = logits.new_zeros(())
            if cfg.reduction == "none":
                g = g.expand(tuple(s for i, s in enumerate(logits.shape) if i != cfg.axis))
        if ctx.fused:  # the gradient for a unit cotangent, kept by the forward; linear in the cotangent
            if cfg.reduction == "none":
                g = g.unsqueeze(cfg.axis)
            return None, None, None, tensors[0] * g, None, None, None
        res = Residuals(*_join(tensors, ctx.layout))
        need_target = ctx.needs_input_grad[4]
        ops = _backward_ops(ctx.ops)
        dlogits, dtarget = _math.backward(
            ops, cfg, logits, target, weight, res, g, need_target=need_target, g_lse=g_lse
        )
        if dtarget is not None:
            dtarget = dtarget.to(target.dtype)
        return None, None, None, dlogits, dtarget, None, None


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

    generate_vmap_rule = True

    @staticmethod
    def forward(x, *inputs):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

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
    costs nothing; differentiating through it costs one more pass).  With
    ``cfg.return_token_accuracy`` the token accuracy follows, not differentiable.  ``need`` (which of
    hidden, classifier, bias need a gradient) is chosen by :meth:`Torch.linear_loss_flat`.

    Outputs: the loss, the lse if ``cfg.return_lse``, the accuracy if ``cfg.return_token_accuracy``, the accumulated gradients, their layout.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(ops, cfg, chunk, need, hidden, classifier, bias, target, weight, where):
        args = (ops, cfg, hidden, classifier, bias, target, weight, where)
        if cfg.reduction == "none":
            out, lse, accuracy, grads = _linear.value_and_grads(*args, chunk=chunk, need=(False,) * 3)
        else:
            out, lse, accuracy, grads = _linear.value_and_grads(*args, chunk=chunk, need=need)
        tensors, layout = _split(grads)
        extra = ((lse,) if cfg.return_lse else ()) + ((accuracy,) if cfg.return_token_accuracy else ())
        return (out, *extra, *tensors, layout)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ops, cfg, chunk, need, hidden, classifier, bias, target, weight, where = inputs
        ctx.ops, ctx.cfg, ctx.chunk, ctx.need, ctx.layout = ops, cfg, chunk, need, output[-1]
        grads = output[1 + cfg.return_lse : -1]  # the accuracy, if asked, and the gradients
        ctx.mark_non_differentiable(*grads)
        grads = grads[cfg.return_token_accuracy :]
        ctx.set_materialize_grads(False)
        # the inputs too (references, no copy): to recompute for an lse cotangent, and to tie a
        # create_graph gradient to them
        ctx.save_for_backward(*grads, hidden, classifier, bias, target, weight, where)

    @staticmethod
    def backward(ctx, g, *rest):  # rest: the lse's cotangent if cfg.return_lse, then the accuracy's (ignored)
        g_lse = rest[0] if ctx.cfg.return_lse else None
        if not torch.is_grad_enabled():  # the usual case: no create_graph
            return LinearCrossEntropyFunction._backward(ctx, g, g_lse)
        return _first_order_backward(LinearCrossEntropyFunction._backward, ctx, g, g_lse)

    @staticmethod
    def _backward(ctx, g, g_lse):
        cfg, saved = ctx.cfg, ctx.saved_tensors
        if g is None and g_lse is None:
            return (None,) * 10
        if cfg.reduction == "none" or g_lse is not None:
            hidden, classifier, bias, target, weight, where = saved[-6:]
            if g is None:
                g = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
                g = g.expand(target.shape) if cfg.reduction == "none" else g
            args = (_backward_ops(ctx.ops), cfg._replace(return_token_accuracy=False), hidden, classifier, bias)
            args += (target, weight, where)
            _, _, _, grads = _linear.value_and_grads(
                *args, chunk=ctx.chunk, need=ctx.need, cotangent=g, cotangent_lse=g_lse
            )
        elif g is None:
            grads = (None, None, None)
        else:
            grads = tuple(None if x is None else (g * x).to(x.dtype) for x in _join(saved[:-6], ctx.layout))
        # typed as the inputs: vocabulary parallel, the replicated hidden states' gradient summed over the
        # shards; DTensors, the inputs' placements
        inputs = saved[-6:-3]
        grads = tuple(ctx.ops.input_grad(g, x, i == 0) for i, (g, x) in enumerate(zip(grads, inputs, strict=True)))
        return None, None, None, None, *grads, None, None, None
