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
import math
import sys

import array_api_compat

from . import _math

# Logits of at most this many elements (256 KiB of float32) are "small": their cost is the number of
# operations, not their size.  PyTorch keeps the forward's gradient for them (_torch_autograd); JAX
# subtracts the target's term with a scatter (isub_at) and takes the general path without a lax.cond
# (cond_finite).
SMALL_LOGITS = 1 << 16

# Per-call dispatch is kept thin (it is most of the time of a small loss): array-api-compat's answers
# depend on the arrays' types only, so they are looked up once per type (or tuple of types) and cached.
_KINDS = {}  # type -> "numpy" | "torch" | "jax" | "other"
_NAMESPACES = {}  # tuple of types -> namespace


def kind(x) -> str:
    """Which library ``x`` belongs to: "numpy", "torch", "jax" or "other" (array-api-compat's tests, by type)."""
    t = type(x)
    k = _KINDS.get(t)
    if k is None:
        if array_api_compat.is_torch_array(x):
            k = "torch"
        elif array_api_compat.is_numpy_array(x):
            k = "numpy"
        elif array_api_compat.is_jax_array(x):
            if type(x).__module__.startswith("numpy"):
                return "jax"  # a NumPy array of JAX's float0 dtype: decided by value, not cached
            k = "jax"
        else:
            k = "other"
        _KINDS[t] = k
    return k


def namespace(*arrays):
    """The array-API namespace shared by ``arrays`` (None entries are skipped)."""
    arrays = [a for a in arrays if a is not None]
    key = tuple(type(a) for a in arrays)
    xp = _NAMESPACES.get(key)
    if xp is None:
        xp = array_api_compat.array_namespace(*arrays)  # raises TypeError for mixed libraries
        if all(kind(a) == "numpy" for a in arrays):
            xp = _numpy_namespace(xp)
        _NAMESPACES[key] = xp
    return xp


@functools.cache
def _numpy_namespace(base):
    """array-api-compat's NumPy namespace (which is NumPy's own functions, mostly), with the calls
    that every loss makes bound to what they run underneath: ``np.sum(x, axis=, keepdims=)`` is
    ``np.add.reduce(x, axis=, keepdims=)`` behind Python layers that cost microseconds a call, as
    much as the reduction itself on a small problem.  Same results, same dtypes."""
    import types

    import numpy as np

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


_DTYPE_KINDS = {}  # (namespace, dtype, kind) -> bool


def isdtype(xp, dtype, category) -> bool:
    """``xp.isdtype(dtype, category)``, remembered per namespace and dtype (a dtype's kind never
    changes).  Not while torch.compile traces: dynamo cannot compare the keys (modules, NumPy dtypes)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.compiler.is_compiling():
        return bool(xp.isdtype(dtype, category))
    key = (xp, dtype, category)
    try:
        return _DTYPE_KINDS[key]
    except KeyError:
        result = _DTYPE_KINDS[key] = bool(xp.isdtype(dtype, category))
    except TypeError:  # an unhashable dtype object
        result = bool(xp.isdtype(dtype, category))
    return result


def is_torch(x) -> bool:
    return kind(x) == "torch"


def is_jax(x) -> bool:
    return kind(x) == "jax"


def is_numpy(x) -> bool:
    return kind(x) == "numpy"


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


# --------------------------------------------------------------------------- primitives
#
# Operations that the standard spells as several passes over the (N, K) data, done in one where the
# library allows: in place on buffers that xlsce itself allocated (never on inputs), a scatter at the
# target instead of a one-hot, a matrix-vector product instead of a product and a sum.  Each has the
# plain array-API fallback, which is what JAX (fused by XLA anyway) and array-api-strict run.


def can_branch(x) -> bool:
    """Whether Python may look at values of ``x`` to skip work (eager numpy and torch only)."""
    k = kind(x)
    if k == "numpy":
        return True
    if k == "torch":
        import torch

        return not torch.compiler.is_compiling()
    return False


def _inplace(x) -> bool:
    return kind(x) in ("numpy", "torch")


def on_cpu(x) -> bool:
    """Whether ``x`` lives in the host's memory (NumPy, or a CPU tensor)."""
    k = kind(x)
    return k == "numpy" or (k == "torch" and x.device.type == "cpu") or str(device(x)) == "cpu"


def exp_(xp, a):
    """exp(a), overwriting ``a`` where the library allows (``a`` must be xlsce's own buffer)."""
    if is_numpy(a):
        return xp.exp(a, out=a)
    if is_torch(a):
        return a.exp_()
    return xp.exp(a)


def subtract(xp, a, b, out=None):
    """a - b, written into ``out`` (a buffer of xlsce's, of the result's shape and dtype) where given."""
    if is_numpy(a):
        import numpy as np

        with np.errstate(invalid="ignore"):  # -inf - (-inf): a row of -inf only, detected by the caller
            return np.subtract(a, b, out=out)
    if not is_torch(a):
        return a - b
    import torch

    if a.dtype in (torch.bfloat16, torch.float16) and a.device.type == "cpu" and b.dtype != a.dtype:
        # on the CPU, PyTorch converts a mixed-precision operand into a temporary of its own before the
        # subtraction; converting into the result, then subtracting in place, is one buffer less
        return (a.to(b.dtype) if out is None else out.copy_(a)).sub_(b)
    return a - b if out is None else torch.sub(a, b, out=out)


def matmul(a, b, out=None):
    """a @ b, written into ``out`` (a buffer of xlsce's, of the result's shape and dtype) where given
    and the library allows: a product's output reused from one chunk to the next costs no fresh pages."""
    if out is not None and is_numpy(out):
        import numpy as np

        return np.matmul(a, b, out=out)
    if out is not None and is_torch(out):
        import torch

        return torch.matmul(a, b, out=out)
    return a @ b


def imul(a, b):
    """a * b, in place on xlsce's own buffer ``a`` where the library allows."""
    if _inplace(a):
        a *= b
        return a
    return a * b


def imul_ratio(a, num, den):
    """a * (num / den), in place on xlsce's own buffer ``a`` where the library allows.  Small PyTorch
    ``a`` (at most ``SMALL_LOGITS`` elements, where the cost is the number of operations) with a Python
    number ``num``: a / (den / num), two operations instead of three (``num / den`` is a reciprocal
    and a product there); large ``a`` keeps the product, cheaper per element than a division."""
    k = kind(a)  # once: this runs on every small call, where Python calls cost as much as the work
    if k == "torch" and isinstance(num, float) and num != 0 and a.numel() <= SMALL_LOGITS:
        return a.div_(den if num == 1 else den / num)
    if k in ("numpy", "torch"):
        a *= num / den
        return a
    return a * (num / den)


def isub(a, b):
    """a - b, in place on xlsce's own buffer ``a`` where the library allows."""
    if _inplace(a):
        a -= b
        return a
    return a - b


def isub_product(a, u, v):
    """a - u * v (u and v broadcast against ``a``), in place on xlsce's own buffer ``a`` where the
    library allows; PyTorch without the temporary of the product."""
    k = kind(a)
    if k == "torch":
        import torch

        if not isinstance(u, torch.Tensor):
            return a.sub_(v, alpha=u)
        if not isinstance(v, torch.Tensor):
            return a.sub_(u, alpha=v)
        return a.addcmul_(u, v, value=-1)
    if k == "numpy":
        a -= u * v
        return a
    return a - u * v


def isub_at(xp, a, index, v, axis):
    """``a`` minus ``v`` at ``index`` along ``axis`` (one index per position, keepdims)."""
    if is_numpy(a):
        a[_along_index(a, index, axis)] -= v
        return a
    if is_torch(a):
        import torch

        index = index if index.dtype == torch.int64 else index.long()
        if not isinstance(v, torch.Tensor):
            return a.scatter_(axis, index, -v, reduce="add")  # a scalar: no tensor of it to make
        src = -(v if v.shape == index.shape else v.expand(index.shape)).to(a.dtype)
        return a.scatter_add_(axis, index, src)
    if is_jax(a) and math.prod(a.shape) <= SMALL_LOGITS:
        # a scatter of N updates: the elementwise gradient kernel then has three operations fewer per
        # element, which keeps XLA's CPU cost model from splitting a small kernel across threads, where
        # the hand-off costs more than the work (at 256x10 with weights and ignored positions: 38 us on
        # two threads, against 6 us on one plus 4 us of scatter; python -m benchmarks.profile --backend jax).
        # Large logits keep the select: with logits computed inside jit, XLA gives the scatter's
        # operand a buffer of its own instead of reusing the logits' (tests/test_core.py's memory test).
        at = _along_index(a, index, axis)
        return a.at[at].add(-v, mode="drop", indices_are_sorted=True, unique_indices=True)
    classes = xp.arange(a.shape[axis], dtype=index.dtype, device=array_api_compat.device(a))
    classes = xp.reshape(classes, tuple(-1 if i == axis else 1 for i in range(a.ndim)))
    return xp.where(classes == index, a - v, a)


def number(x):
    """A 0-d array whose value can be read cheaply (eager, on the CPU) as a Python float; else ``x``."""
    if isinstance(x, float):
        return x
    if getattr(x, "ndim", None) == 0 and can_branch(x) and on_cpu(x):
        return float(x)
    return x


def min_max(xp, x, *, lo=True, hi=True):
    """``(min(x), max(x))`` as Python numbers (eager only); a side not asked for (``lo``/``hi``
    False) is not computed and comes back None."""
    if is_torch(x) and lo and hi:
        lo, hi = x.aminmax()  # one pass instead of two
        return lo.item(), hi.item()
    if kind(x) in ("numpy", "torch"):  # the methods: fewer Python layers than np.min
        return (x.min().item() if lo else None), (x.max().item() if hi else None)
    return (xp.min(x).item() if lo else None), (xp.max(x).item() if hi else None)


def take_at(xp, a, index, axis):
    """``a`` at ``index`` along ``axis`` (one index in range per position, keepdims)."""
    if is_torch(a):  # the array-api-compat wrapper adds three operations for negative indices
        import torch

        return a.gather(axis, index if index.dtype == torch.int64 else index.long())
    if is_numpy(a):
        return a[_along_index(a, index, axis)]
    return xp.take_along_axis(a, index, axis=axis)


def take_classes(xp, v, index):
    """``v[index]``: a per-class vector ``v`` (K,) at class indices in range, of any shape."""
    k = kind(v)
    if k == "numpy":
        return v[index]
    if k == "torch":
        import torch

        return v.take(index if index.dtype == torch.int64 else index.long())  # one gather, of index's shape
    return xp.reshape(xp.take(v, xp.reshape(index, (-1,)), axis=0), index.shape)


def where0(xp, cond, x):
    """``x`` where ``cond``, else 0, for an integer ``x``: eager NumPy and PyTorch multiply by the mask
    (one cheap operation; their ``where`` with a Python scalar costs several)."""
    if kind(x) in ("numpy", "torch"):
        return x * cond
    return xp.where(cond, x, 0)


def _along_index(a, index, axis):
    """The fancy index of ``a`` at ``index`` along ``axis`` (``index`` keepdims; NumPy or JAX):
    ``take_along_axis``'s, without NumPy's checks, which cost more than the gather on small arrays."""
    aranges = _jax_aranges(a.shape, axis) if is_jax(a) else _numpy_aranges(a.shape, axis)
    return aranges[:axis] + (index,) + aranges[axis + 1 :]


def _aranges(arange, shape, axis):
    return tuple(
        None if i == axis else arange(s).reshape(tuple(s if j == i else 1 for j in range(len(shape))))
        for i, s in enumerate(shape)
    )


def _jax_aranges(shape, axis):
    import jax.numpy as jnp

    return _aranges(jnp.arange, shape, axis)


@functools.lru_cache(maxsize=64)
def _numpy_aranges(shape, axis):
    """NumPy's index arrays for :func:`_along_index`, made once per shape (read-only, never written)."""
    import numpy as np

    def arange(n):
        r = np.arange(n)
        r.flags.writeable = False
        return r

    return _aranges(arange, shape, axis)


def all_finite(xp, *arrays):
    """Whether every value of ``arrays`` is finite (eager only): one reduction each, one sync.

    Sums that overflow count as not finite: the caller then takes its general path.
    """
    total = None
    for a in arrays:
        total = xp.sum(a) if total is None else total + xp.sum(a)
    if is_numpy(total) or not hasattr(total, "device"):  # numpy sums are scalars
        import numpy as np

        with np.errstate(over="ignore", invalid="ignore"):
            return math.isfinite(float(total))
    return math.isfinite(float(total))


def device(x):
    return array_api_compat.device(x)


def cond_finite(xp, like, fast, general):
    """``fast()`` where all its values are finite, else ``general()``: traced code's choice of path.

    Under JAX (``like`` a JAX array) a ``lax.cond``, so the general path costs nothing where it is
    not taken; elsewhere (torch.compile, array-api-strict) the general path, which is always right.
    Small JAX arrays (at most ``SMALL_LOGITS`` elements) take the general path too: there the test
    and the cond cost more kernels (about six) than the general path's few fused operations.
    """
    if not is_jax(like) or math.prod(like.shape) <= SMALL_LOGITS:
        return general()
    import jax

    values = fast()
    ok = xp.all(xp.stack([xp.all(xp.isfinite(v)) for v in values]))
    return jax.lax.cond(ok, lambda: values, general)


def row_sums(xp, terms, axis):
    """``[sum(t, axis, keepdims) for t in terms]`` (arrays of one shape and dtype).

    Under JAX one reduction of several operands: separate sums of terms that
    share an intermediate make XLA's CPU backend materialise one (N, K) buffer
    per term (reserved even in a ``lax.cond`` branch that is not taken).
    """
    if not is_jax(terms[0]):
        return [xp.sum(t, axis=axis, keepdims=True) for t in terms]
    return [xp.expand_dims(s, axis=axis) for s in _jax_row_sums(axis)(*terms)]


@functools.cache
def _jax_row_sums(axis):
    """One ``lax.reduce`` of several operands along ``axis``, with its derivative (JAX's own rule for a
    reduction of several operands fails on the symbolic zero of a term that is constant, e.g. the
    mask of the classes in play, which differentiating xlsce's analytic backward, for a Hessian, meets)."""
    import jax
    import jax.numpy as jnp

    @jax.custom_jvp
    def sums(*terms):
        zero = jnp.zeros((), dtype=terms[0].dtype)
        return jax.lax.reduce(
            terms, (zero,) * len(terms), lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)), (axis,)
        )

    @sums.defjvp
    def _(primals, tangents):  # linear: the sums of the tangents, one reduction each (transposable)
        return sums(*primals), tuple(jnp.sum(t, axis=axis) for t in tangents)

    return sums


def row_dot(xp, a, v, axis):
    """sum_c v_c a_c along ``axis`` (keepdims); ``v`` None means ones, or broadcasts against ``a``."""
    if v is None:
        if axis == a.ndim - 1 and a.shape[-1] <= 1024 and is_numpy(a) and a.dtype == "float32":
            # einsum's own loop, faster than np.sum's pairwise loop along a short last axis: 0.105 against
            # 0.255 ms on a 1048x1000 float32 block (python -m benchmarks.profile --backend numpy --ops
            # --shape 1048x1000).  It sums in lanes, so its rounding grows with the row's length: softmax
            # sums 2.1e-7 relative against np.sum's 1.0e-7 at 1024 classes, 4.8e-7 against 1.1e-7 at 8192
            # (same command, --shape 256x1024 / 256x8192), hence np.sum beyond 1024; float64 keeps np.sum's
            # pairwise accuracy (tests/test_docs.py locates the loss's minimum to 1e-6 with it)
            import numpy as np

            return np.einsum("...k->...", a)[..., None]
        if kind(a) == "torch":
            return a.sum(axis, keepdim=True)  # without array-api-compat's wrapper: microseconds a call
        return xp.sum(a, axis=axis, keepdims=True)
    if is_numpy(a):
        import numpy as np

        with np.errstate(invalid="ignore"):  # 0 * -inf: the caller detects the non-finite sum
            return _row_dot(xp, a, v, axis)
    return _row_dot(xp, a, v, axis)


def _row_dot(xp, a, v, axis):
    if axis == a.ndim - 1 and v.ndim == a.ndim and all(s == 1 for s in v.shape[:-1]) and (_inplace(a) or is_jax(a)):
        v = xp.reshape(v, (-1,))
        if is_numpy(a):
            # einsum's own loop: one pass, no temporary, and no BLAS call, whose thread start-up
            # cost more than the product on a cache-sized block on this project's busy 2-core machine
            import numpy as np

            return xp.expand_dims(np.einsum("...k,k->...", a, v), axis=axis)
        # one BLAS pass, no temporary (the operator: array-api-compat's matmul adds microseconds)
        return xp.expand_dims(a @ v, axis=axis)
    return xp.sum(a * v, axis=axis, keepdims=True)


BLOCK_ELEMENTS = 1 << 20  # positions x classes per block: 4 MiB of float32, cache-sized


def by_blocks(xp, fn, arrays, *, blocked=True, out_dtype=None, first_is_block=False, out=None):
    """``fn(*arrays)`` evaluated on blocks of positions along axis 0, results joined.

    Eager NumPy and PyTorch on the CPU only (elsewhere one call on the whole
    arrays; on a GPU, blocks would only add launches and synchronisations): every
    temporary of ``fn`` is then block-sized, stays in cache and is recycled by the
    allocator instead of costing fresh pages.  ``arrays`` share axis 0 (None and
    Python numbers pass through); ``fn`` returns one array (written into a single
    output of dtype ``out_dtype``) or a tuple of per-position arrays, Python
    floats and bools (joined by concatenation, kept, or OR-ed).  With
    ``first_is_block``, ``fn`` returns a tuple whose first entry is written into
    the output of dtype ``out_dtype`` and the rest are joined.
    Blocked, ``fn`` also receives ``out=``, a buffer of the block's shape in the
    compute dtype of the first array where it may compute its (first) result:
    the output's block where the output has that dtype (saving the copy), else
    one scratch block reused from block to block (a fresh block-sized buffer
    per block costs fresh pages whenever the allocator has returned the last
    one to the system).  ``out``, if given (with ``first_is_block``, eager NumPy
    or PyTorch, of the first array's shape and of dtype ``out_dtype``), is that
    output: a buffer of the caller's, reused instead of a fresh one.
    """
    x = arrays[0]
    n = x.shape[0] if x.ndim else 0
    rows = max(1, BLOCK_ELEMENTS // max(1, math.prod(x.shape[1:])))

    def cast(out):
        return out if out_dtype is None or out.dtype == out_dtype else xp.astype(out, out_dtype)

    if n <= rows or not (blocked and _inplace(x) and can_branch(x) and on_cpu(x)):
        r = fn(*arrays, out=out) if out is not None else fn(*arrays)
        return (cast(r[0]), *r[1:]) if first_is_block else cast(r)

    def block(a, i):
        return a[i : i + rows, ...] if hasattr(a, "shape") and a.ndim else a

    compute = _math.compute_dtype(xp, x.dtype)
    if out_dtype is not None and out is None:
        out = xp.empty(x.shape, dtype=out_dtype, device=array_api_compat.device(x))
    into = out_dtype == compute  # fn computes in the output itself
    scratch = None if into else xp.empty((rows, *x.shape[1:]), dtype=compute, device=array_api_compat.device(x))
    parts = []
    for i in range(0, n, rows):
        view = out[i : i + rows, ...] if into else scratch[: min(rows, n - i), ...]
        r = fn(*(block(a, i) for a in arrays), out=view)
        if out_dtype is None:
            parts.append(r)
            continue
        first = r[0] if first_is_block else r
        if not (into and first is view):
            out[i : i + rows, ...] = first
        parts.append(r[1:] if first_is_block else None)
    if out_dtype is None:
        return _join(xp, parts)
    return (out, *_join(xp, parts)) if first_is_block else out


def _join(xp, parts):
    """Per-block tuples joined: arrays concatenated, equal floats kept, bools OR-ed."""
    joined = []
    for values in zip(*parts, strict=True):
        if all(v is None for v in values):
            joined.append(None)
        elif all(isinstance(v, bool) for v in values):
            joined.append(any(values))
        elif all(isinstance(v, float) for v in values) and len(set(values)) == 1:
            joined.append(values[0])
        else:
            shapes = [next(p for p in part if hasattr(p, "shape") and p.ndim) for part in parts]
            values = [
                v if hasattr(v, "shape") and v.ndim else xp.full(s.shape, v, dtype=s.dtype, device=device(s))
                for v, s in zip(values, shapes, strict=True)
            ]
            joined.append(xp.concat(values, axis=0))
    return tuple(joined)


def loss(xp, cfg: _math.Config, logits, target, weight, where):
    """The loss (and the reported log-sum-exp), differentiable with the backend's own machinery."""
    if is_torch(logits):
        import torch

        if torch.is_grad_enabled() and (logits.requires_grad or target.requires_grad):
            # a module, imported here: torch.compile runs an import, not a class statement
            from . import _torch_autograd

            return _torch_autograd.CrossEntropyFunction.apply(cfg, logits, target, weight, where)
        # nothing to differentiate: the forward alone, without autograd.Function's bookkeeping
    elif is_jax(logits):
        return _jax_function()(cfg, logits, target, weight, where)
    out, res = _math.forward(xp, cfg, logits, target, weight, where)
    return (out, _reported_lse(xp, cfg, res, logits)) if cfg.return_lse else out


def _reported_lse(xp, cfg, res, logits):
    lse = _math.reported_lse(xp, cfg, res)
    return lse if lse.dtype == logits.dtype else xp.astype(lse, logits.dtype)


def value_and_grad(xp, cfg: _math.Config, logits, target, weight, where, cotangent):
    """Loss and d loss / d logits from the analytic backward, without recording autodiff."""
    if is_torch(logits):
        import torch

        with torch.no_grad():
            return _value_and_grad(xp, cfg, logits, target, weight, where, cotangent)
    return _value_and_grad(xp, cfg, logits, target, weight, where, cotangent)


def _value_and_grad(xp, cfg, logits, target, weight, where, cotangent):
    g = 1.0 if cotangent is None else cotangent
    if can_branch(logits):  # eager: one pass computes both (softmax from the forward's exponentials)
        out, _, dz = _math.forward(xp, cfg, logits, target, weight, where, g=g)
        return out, dz
    out, res = _math.forward(xp, cfg, logits, target, weight, where)
    if cotangent is None and cfg.reduction == "none":
        g = xp.ones_like(out)
    return out, _math.backward(xp, cfg, logits, target, weight, res, g)[0]


# --------------------------------------------------------------------------- torch


def check_torch_weight(weight):
    """Gradients with respect to class weights are not provided: say so instead of returning 0."""
    import torch

    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise TypeError("weight must not require grad: xlsce provides no gradient for class weights")


# --------------------------------------------------------------------------- jax


@functools.cache  # built on first use: the JAX functions import their framework
def _jax_function():
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero

    def primal(cfg, logits, target, weight, where):
        out, res = _math.forward(jnp, cfg, logits, target, weight, where)
        return (out, _reported_lse(jnp, cfg, res, logits)) if cfg.return_lse else out

    fn = jax.custom_vjp(primal, nondiff_argnums=(0,))

    def fwd(cfg, logits, target, weight, where):
        if weight is not None and weight.perturbed:
            raise TypeError("weight must not be differentiated: xlsce provides no gradient for class weights")
        need_target = target.perturbed
        logits, target = logits.value, target.value
        weight = None if weight is None else weight.value
        where = None if where is None else where.value
        out, res = _math.forward(jnp, cfg, logits, target, weight, where)
        if cfg.return_lse:
            out = (out, _reported_lse(jnp, cfg, res, logits))
        res = _math.Residuals(*(r if r is None or isinstance(r, bool) else jnp.asarray(r) for r in res))
        return out, (logits, target, weight, res, need_target)

    def bwd(cfg, saved, g):
        logits, target, weight, res, need_target = saved
        g, g_lse = g if cfg.return_lse else (g, None)
        if isinstance(g, SymbolicZero):
            g = jnp.zeros(g.shape, g.dtype)
        if isinstance(g_lse, SymbolicZero):
            g_lse = None
        dlogits, dtarget = _math.backward(
            jnp, cfg, logits, target, weight, res, g, need_target=need_target, g_lse=g_lse
        )
        if dtarget is not None:
            dtarget = dtarget.astype(target.dtype)
        return dlogits, dtarget, None, None

    fn.defvjp(fwd, bwd, symbolic_zeros=True)
    return fn


# --------------------------------------------------------------------------- linear cross-entropy
# Adapters for xlsce.linear_cross_entropy (the chunked math is in xlsce/_linear.py).


def linear_value_and_grads(xp, cfg, chunk, hidden, classifier, bias, target, weight, where, *, need, cotangent=None):
    """Flatten the positions, run the chunk loop of the inputs' library, restore the shapes.

    Returns ``(loss, (dhidden, dclassifier, dbias))`` for the cotangent (default 1);
    gradients not in ``need`` are None.  No autodiff is recorded.
    """
    from . import _linear

    shape = tuple(target.shape)
    h, t, m = _flatten(xp, hidden, target, where)
    if cotangent is not None and cfg.reduction == "none":
        cotangent = xp.reshape(cotangent, (t.shape[0],))
    loop = _jax_scan_loop if is_jax(hidden) else _torch_loop if is_torch(hidden) else _linear.eager_loop
    args = (xp, cfg, h, classifier, bias, t, weight, m)
    if is_torch(hidden):
        import torch

        with torch.no_grad():
            out, _, (dh, dw, db) = _linear.value_and_grads(
                *args, chunk=chunk, need=need, cotangent=cotangent, loop=loop
            )
    else:
        out, _, (dh, dw, db) = _linear.value_and_grads(*args, chunk=chunk, need=need, cotangent=cotangent, loop=loop)
    if cfg.reduction == "none":
        out = xp.reshape(out, shape)
    if dh is not None:
        dh = xp.reshape(dh, tuple(hidden.shape))
    return out, (dh, dw, db)


def linear_loss(xp, cfg, chunk, hidden, classifier, bias, target, weight, where):
    """The loss (and the reported lse) of linear_cross_entropy, differentiable with torch autograd and jax.grad."""
    from . import _linear

    shape = tuple(target.shape)
    h, t, m = _flatten(xp, hidden, target, where)
    args = (cfg, chunk, h, classifier, bias, t, weight, m)
    if is_torch(hidden):
        import torch

        tensors = (hidden, classifier, bias)
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
            from . import _torch_autograd

            out = _torch_autograd.LinearCrossEntropyFunction.apply(*args)
        else:
            with torch.no_grad():
                out = _linear_primal(xp, _torch_loop, *args)
    elif is_jax(hidden):
        out = _jax_linear_function()(*args)
    else:
        out = _linear_primal(xp, _linear.eager_loop, *args)
    out, lse = out if cfg.return_lse else (out, None)
    if cfg.reduction == "none":
        out = xp.reshape(out, shape)
    return (out, xp.reshape(lse, shape)) if cfg.return_lse else out


def _linear_primal(xp, loop, cfg, chunk, hidden, classifier, bias, target, weight, where):
    """The loss, or ``(loss, lse)`` with ``cfg.return_lse``, of flattened inputs; no gradient."""
    from . import _linear

    args = (xp, cfg, hidden, classifier, bias, target, weight, where)
    out, lse, _ = _linear.value_and_grads(*args, chunk=chunk, need=(False, False, False), loop=loop)
    return (out, lse) if cfg.return_lse else out


def _flatten(xp, hidden, target, where):
    """hidden (..., H) -> (N, H); target and where (...) -> (N,)."""
    n = 1
    for s in target.shape:
        n *= s
    h = xp.reshape(hidden, (n, hidden.shape[-1]))
    t = xp.reshape(target, (n,))
    m = None if where is None else xp.reshape(where, (n,))
    return h, t, m


def _torch_addmm(acc, a, b):
    """acc + a @ b as one in-place GEMM: no (V, H) temporary per chunk (acc None: a @ b)."""
    import torch

    if acc is None:
        p = a @ b
        return p if p.dtype in (torch.float32, torch.float64) else p.float()
    if acc.dtype == a.dtype:
        return acc.addmm_(a, b)
    return acc.add_(a @ b)


def _torch_loop(*args):
    from . import _linear

    return _linear.eager_loop(*args, addmm=_torch_addmm)


def _jax_addmm(acc, a, b, rows):
    """acc + a @ b for JAX (``acc`` the scan's carry), ``rows`` rows of ``a`` at a time in a ``lax.fori_loop``.

    XLA on the CPU does not fuse a product into the addition that consumes it, so
    ``acc + a @ b`` would hold a temporary as large as ``acc`` (the (V, H) gradient
    of the classifier).  Slice by slice, the temporary is one (rows, H) product and
    each slice is updated in place (``dynamic_update_slice`` on the loop's carry).
    """
    import jax

    dt, v = acc.dtype, a.shape[0]
    if rows >= v:
        return acc + (a @ b).astype(dt)
    count, tail = divmod(v, rows)

    def body(i, acc):
        start = i * rows
        part = jax.lax.dynamic_slice_in_dim(a, start, rows, axis=0) @ b
        old = jax.lax.dynamic_slice_in_dim(acc, start, rows, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(acc, old + part.astype(dt), start, axis=0)

    acc = jax.lax.fori_loop(0, count, body, acc)
    if tail:
        start = count * rows
        acc = acc.at[start:].add((a[start:] @ b).astype(dt))
    return acc


def _jax_scan_loop(xp, cfg, chunk, need, hidden, classifier, bias, target, weight, where, g, g_lse=None):
    """The chunk loop as one ``lax.scan``: the last chunk is padded and masked with ``where``."""
    import jax
    import jax.numpy as jnp

    from . import _linear

    n, width = hidden.shape
    count = -(-n // chunk)
    pad = count * chunk - n
    dt = _math.compute_dtype(jnp, hidden.dtype)
    valid = jnp.ones((n,), dtype=bool) if where is None else where
    xs = (
        jnp.pad(hidden, ((0, pad), (0, 0))).reshape(count, chunk, width),
        jnp.pad(target, (0, pad)).reshape(count, chunk),
        jnp.pad(valid, (0, pad)).reshape(count, chunk),
        jnp.pad(g, (0, pad)).reshape(count, chunk) if cfg.reduction == "none" else None,
        None if g_lse is None else jnp.pad(g_lse, (0, pad)).reshape(count, chunk),
    )
    v = classifier.shape[0]
    # dW is accumulated a slice of rows at a time, each slice's product at most CHUNK_BYTES
    rows = max(1, _linear.CHUNK_BYTES // max(1, width * jnp.dtype(dt).itemsize))
    addmm = functools.partial(_jax_addmm, rows=rows)
    init = (
        jnp.zeros((), dt),
        jnp.zeros((v, width), dt) if need[1] else None,
        jnp.zeros((v,), dt) if need[2] else None,
    )

    def body(carry, x):
        total, dw, db = carry
        h, t, m, gk, gl = x
        gk = g if gk is None else gk
        step = _linear.chunk_step(jnp, cfg, h, classifier, bias, t, weight, m, gk, need, (dw, db), addmm, gl)
        loss, lse, dh, dw, db = step
        if cfg.reduction == "none":
            return (total, dw, db), (loss, lse, dh)
        return (total + loss, dw, db), (None, lse, dh)

    (total, dw, db), (losses, lses, dhs) = jax.lax.scan(body, init, xs)
    out = losses.reshape(count * chunk)[:n] if cfg.reduction == "none" else total
    lse = None if lses is None else lses.reshape(count * chunk)[:n]
    dh = None if dhs is None else dhs.reshape(count * chunk, width)[:n]
    return out, lse, dh, dw, db


@functools.cache  # built on first use: the JAX functions import their framework
def _jax_linear_function():
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero

    from . import _linear

    def primal(cfg, chunk, hidden, classifier, bias, target, weight, where):
        return _linear_primal(jnp, _jax_scan_loop, cfg, chunk, hidden, classifier, bias, target, weight, where)

    fn = jax.custom_vjp(primal, nondiff_argnums=(0, 1))

    def fwd(cfg, chunk, hidden, classifier, bias, target, weight, where):
        """Residuals ``(inputs, flags, grads)``: the inputs where the backward may recompute ("none", or
        a differentiated lse), the gradients accumulated in the forward for "sum"/"mean"."""
        if weight is not None and weight.perturbed:
            raise TypeError("weight must not be differentiated: xlsce provides no gradient for class weights")
        need = (hidden.perturbed, classifier.perturbed, bias is not None and bias.perturbed)
        hidden, classifier, target = hidden.value, classifier.value, target.value
        bias, weight, where = (None if x is None else x.value for x in (bias, weight, where))
        args = (jnp, cfg, hidden, classifier, bias, target, weight, where)
        forward_need = (False,) * 3 if cfg.reduction == "none" else need
        out, lse, grads = _linear.value_and_grads(*args, chunk=chunk, need=forward_need, loop=_jax_scan_loop)
        inputs = args[2:] if cfg.reduction == "none" or cfg.return_lse else None
        # `need` travels in the residuals' structure (None = not needed): residuals must be arrays.
        flags = tuple(jnp.zeros((0,)) if f else None for f in need)
        grads = None if cfg.reduction == "none" else grads
        return ((out, lse) if cfg.return_lse else out), (inputs, flags, grads)

    def bwd(cfg, chunk, saved, g):
        inputs, flags, grads = saved
        g, g_lse = g if cfg.return_lse else (g, None)
        if isinstance(g_lse, SymbolicZero):
            g_lse = None
        if isinstance(g, SymbolicZero):
            g = None if grads is not None and g_lse is None else jnp.zeros(g.shape, g.dtype)
        if g is None:  # neither output is differentiated
            return (None,) * 6
        if grads is None or g_lse is not None:
            need = tuple(f is not None for f in flags)
            args = (jnp, cfg, *inputs)
            _, _, grads = _linear.value_and_grads(
                *args, chunk=chunk, need=need, cotangent=g, cotangent_lse=g_lse, loop=_jax_scan_loop
            )
        else:
            grads = tuple(None if x is None else (g * x).astype(x.dtype) for x in grads)
        return (*grads, None, None, None)

    fn.defvjp(fwd, bwd, symbolic_zeros=True)
    return fn
