"""The plain array-API backend: what array-api-strict and every unknown library get.

A backend is a small object that holds the namespace ``xp`` of the inputs, knows the mode of
the call (``eager``: Python may read values to choose a path; ``traced``: values cannot be read;
``inplace``: xlsce's own buffers may be overwritten; ``blocks``: evaluate in cache-sized blocks)
and implements the handful of primitives that the maths (``xlsce/_math.py``, ``xlsce/_linear.py``)
calls.  Each primitive here is the standard's version; a framework's backend overrides the ones
it does faster, and ``tests/test_backends.py`` checks every override against these.

Requires the 2024.12 revision of the array API standard (:data:`API_VERSION`): ``take_along_axis``
and Python scalars in ``where`` and the arithmetic, both new in 2024.12, beside the 2023.12
inspection API (``__array_namespace_info__``).
"""

from __future__ import annotations

import math

from .. import _linear, _math

API_VERSION = "2024.12"

BLOCK_ELEMENTS = 1 << 20  # positions x classes per block of the eager CPU blocks: 4 MiB of float32, cache-sized

# Logits of at most this many elements (256 KiB of float32) are "small": their cost is the number of
# operations, not their size.  PyTorch keeps the forward's gradient for them and divides instead of
# multiplying (backends/torch.py); JAX subtracts the target's term with a scatter and takes the general
# path without a lax.cond (backends/jax.py).
SMALL_LOGITS = 1 << 16


class Generic:
    """The array API standard, no shortcuts.  ``device`` maps an array to its device (array-api-compat's)."""

    name = "generic"
    eager = False  # Python may read values (cheaply: on the host) to choose a path
    inplace = False  # xlsce's own buffers may be written in place
    blocks = False  # eager CPU: evaluate the per-position terms on cache-sized blocks
    compiling = False  # a Python-level compiler traces the call (torch.compile): Python caches are not consulted

    def __init__(self, xp, device, *, traced=False, on_cpu=True):
        self.xp = xp
        self.device = device
        self.traced = traced  # values cannot be read (a tracer, torch.compile, a lazy array)
        self.on_cpu = on_cpu
        self.readable = not traced and on_cpu  # values may be read back for a check
        self.fuse = self.inplace and not traced  # value_and_grad's loss and gradient in one pass
        self.floats, self.ints, f32, f64 = self._dtypes(xp)
        # the dtype the maths runs in, per floating dtype: float64 stays, every other is computed in float32
        self.compute = {d: f64 if d == f64 else f32 for d in self.floats}

    @staticmethod
    def _dtypes(xp):
        """``(floats, ints, float32, float64)``: the real floating and the integer dtypes of ``xp`` (sets,
        for one lookup a call), as arrays carry them, half precision too where the library has it."""
        info = xp.__array_namespace_info__()
        floats = set(info.dtypes(kind="real floating").values())
        floats.update(xp.empty(0, dtype=getattr(xp, n)).dtype for n in ("float16", "bfloat16") if hasattr(xp, n))
        return floats, set(info.dtypes(kind="integral").values()), xp.float32, xp.float64

    def __repr__(self):
        return f"<xlsce {self.name} backend: eager={self.eager}, traced={self.traced}, on_cpu={self.on_cpu}>"

    # ------------------------------------------------------------------ dtypes and checks

    def check_weight(self, weight):
        """Refuse class weights that ask for a gradient (frameworks with autodiff override)."""

    def require(self, ok, message):
        """Raise ``ValueError(message)`` unless the boolean 0-d array ``ok`` holds, where its value can be
        read (eager, on the host); elsewhere unchecked (traced code, lazy arrays, an accelerator without
        device-side assertions)."""
        if self.readable and not bool(ok):
            raise ValueError(message)

    def asarray_like(self, x, like):
        """A NumPy array or Python number ``x`` as an array of this library on ``like``'s device (not an input)."""
        return self.xp.asarray(x, device=self.device(like))

    def min_max(self, x, *, lo=True, hi=True):
        """``(min(x), max(x))`` as Python numbers (readable only); a side not asked for is None."""
        xp = self.xp
        return (xp.min(x).item() if lo else None), (xp.max(x).item() if hi else None)

    def number(self, x):
        """A 0-d array read as a Python float where that is cheap (eager, on the host); else ``x``."""
        if self.eager and getattr(x, "ndim", None) == 0:
            return float(x)
        return x

    def all_finite(self, *arrays):
        """Whether every value of ``arrays`` is finite (eager only): one reduction each, one read.
        Sums that overflow count as not finite: the caller then takes its general path."""
        xp = self.xp
        total = None
        for a in arrays:
            total = xp.sum(a) if total is None else total + xp.sum(a)
        return math.isfinite(float(total))

    # ------------------------------------------------------------------ elementwise, on xlsce's own buffers

    def exp_(self, a):
        """exp(a), overwriting ``a`` where the backend allows (``a`` must be xlsce's own buffer)."""
        return self.xp.exp(a)

    def subtract(self, a, b, out=None):
        """a - b, written into ``out`` (a buffer of xlsce's, of the result's shape and dtype) where allowed."""
        return a - b

    def imul(self, a, b):
        """a * b, in place on xlsce's own buffer ``a`` where allowed."""
        return a * b

    def imul_ratio(self, a, num, den):
        """a * (num / den), in place on xlsce's own buffer ``a`` where allowed."""
        return a * (num / den)

    def isub(self, a, b):
        """a - b, in place on xlsce's own buffer ``a`` where allowed."""
        return a - b

    def isub_product(self, a, u, v):
        """a - u * v (u, v broadcast against ``a``), in place on xlsce's own buffer ``a`` where allowed."""
        return a - u * v

    def matmul(self, a, b, out=None):
        """a @ b, written into ``out`` (a buffer of xlsce's) where allowed."""
        return a @ b

    def addmm(self, acc, a, b):
        """acc + a @ b in the accumulator's dtype (``acc`` None: a @ b in the compute dtype)."""
        p = a @ b
        dt = self.compute[p.dtype] if acc is None else acc.dtype
        p = p if p.dtype == dt else self.xp.astype(p, dt)
        return p if acc is None else self.iadd(acc, p)

    def iadd(self, acc, x):
        """acc + x, in place on xlsce's own accumulator where allowed (``acc`` None: ``x``)."""
        return x if acc is None else acc + x

    # ------------------------------------------------------------------ indexing at the target

    def classes_along(self, n, axis, ndim, dtype):
        """The class indices 0..n-1 shaped to broadcast along ``axis`` of an ``ndim`` array."""
        xp = self.xp
        return xp.reshape(xp.arange(n, dtype=dtype), tuple(-1 if i == axis else 1 for i in range(ndim)))

    def take_at(self, a, index, axis):
        """``a`` at ``index`` along ``axis`` (one index in range per position, keepdims)."""
        return self.xp.take_along_axis(a, index, axis=axis)

    def isub_at(self, a, index, v, axis):
        """``a`` minus ``v`` at ``index`` along ``axis`` (one index per position, keepdims)."""
        xp = self.xp
        classes = self.classes_along(a.shape[axis], axis, a.ndim, index.dtype)
        return xp.where(classes == index, a - v, a)

    def take_classes(self, v, index):
        """``v[index]``: a per-class vector ``v`` (K,) at class indices in range, of any shape."""
        xp = self.xp
        return xp.reshape(xp.take(v, xp.reshape(index, (-1,)), axis=0), index.shape)

    def where0(self, cond, x):
        """``x`` where ``cond``, else 0 (an integer ``x``)."""
        return self.xp.where(cond, x, 0)

    # ------------------------------------------------------------------ row reductions
    #
    # Every reduction of the maths over the class axis goes through one of these (row_max, row_dot,
    # row_sums, class_total, row_argmax, take_at, take_classes), so that :class:`ClassShards` can
    # combine them over the shards of a vocabulary-parallel call.

    shards = 1  # the number of slices of the class axis (ClassShards: over devices or processes)

    def classes(self, n):
        """The number of classes of a class axis of local length ``n`` (a Python int)."""
        return n

    def row_max(self, a, axis):
        """max along ``axis`` (keepdims)."""
        return self.xp.max(a, axis=axis, keepdims=True)

    def row_argmax(self, a, axis):
        """The (first) argmax along ``axis``, the axis dropped."""
        return self.xp.argmax(a, axis=axis)

    def class_total(self, v):
        """The sum of a per-class vector (any shape that holds one value per class), 0-d."""
        return self.xp.sum(v)

    def across(self, x):
        """A sum over the classes of this shard (a tangent's) completed over every shard: ``x`` here."""
        return x

    def input_grad(self, grad, like, whole=False):
        """The gradient with respect to the input ``like`` (None passes) from this shard's part of it, ``whole``
        where every shard holds that input whole (the hidden states of linear_cross_entropy): ``grad`` here."""
        return grad

    def row_dot(self, a, v, axis):
        """sum_c v_c a_c along ``axis`` (keepdims); ``v`` None means ones, else it broadcasts against ``a``."""
        xp = self.xp
        return xp.sum(a if v is None else a * v, axis=axis, keepdims=True)

    def row_sums(self, terms, axis):
        """``[sum(t, axis, keepdims) for t in terms]`` (arrays of one shape and dtype)."""
        return [self.xp.sum(t, axis=axis, keepdims=True) for t in terms]

    def cond_finite(self, like, fast, general):
        """``fast()`` where all its values are finite, else ``general()``: the traced choice of path.
        Here always ``general()``, which is always right."""
        return general()

    def class_shards(self, axis_name=None, process_group=None):
        """The backend of a vocabulary-parallel call (:class:`ClassShards`); the frameworks that have one
        override this."""
        given = "axis_name" if axis_name is not None else "process_group"
        where = "JAX arrays (inside shard_map)" if given == "axis_name" else "torch tensors (torch.distributed)"
        raise ValueError(f"{given}= (vocabulary parallelism) is for {where}; got arrays of the {self.name} backend")

    # ------------------------------------------------------------------ the eager CPU blocks

    def by_blocks(self, fn, arrays, *, blocked=True, out_dtype=None, first_is_block=False, out=None):
        """``fn(*arrays)`` evaluated on blocks of positions along axis 0, results joined.

        Eager NumPy and PyTorch on the CPU only (``self.blocks``; elsewhere one call on the whole
        arrays; on a GPU, blocks would only add launches): every temporary of ``fn`` is then
        block-sized, stays in cache and is recycled by the allocator instead of costing fresh pages.
        ``arrays`` share axis 0 (None and Python numbers pass through); ``fn`` returns one array
        (written into a single output of dtype ``out_dtype``) or a tuple of per-position arrays,
        Python floats and bools (joined by concatenation, kept, or OR-ed).  With
        ``first_is_block``, ``fn`` returns a tuple whose first entry is written into the output of
        dtype ``out_dtype`` and the rest are joined.  Blocked, ``fn`` also receives ``out=``, a buffer
        of the block's shape in the compute dtype where it may compute its (first) result: the
        output's block where the output has that dtype (saving the copy), else one scratch block
        reused from block to block (a fresh block-sized buffer per block costs fresh pages whenever
        the allocator has returned the last one to the system).  ``out``, if given (with
        ``first_is_block``, of the first array's shape and of dtype ``out_dtype``), is that output.
        """
        if not (blocked and self.blocks) or math.prod(arrays[0].shape) <= BLOCK_ELEMENTS:  # one block
            r = fn(*arrays, out=out) if out is not None else fn(*arrays)
            first = r[0] if first_is_block else r
            if out_dtype is not None and first.dtype != out_dtype:
                first = self.xp.astype(first, out_dtype)
                r = (first, *r[1:]) if first_is_block else first
            return r
        return self._blocked(fn, arrays, out_dtype, first_is_block, out)

    def _blocked(self, fn, arrays, out_dtype, first_is_block, out):
        xp, x = self.xp, arrays[0]
        n = x.shape[0]
        rows = max(1, BLOCK_ELEMENTS // max(1, math.prod(x.shape[1:])))

        def block(a, i):
            return a[i : i + rows, ...] if hasattr(a, "shape") and a.ndim else a

        compute = self.compute[x.dtype]
        dev = self.device(x)
        if out_dtype is not None and out is None:
            out = xp.empty(x.shape, dtype=out_dtype, device=dev)
        into = out_dtype == compute  # fn computes in the output itself
        scratch = None if into else xp.empty((rows, *x.shape[1:]), dtype=compute, device=dev)
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
            return self._join(parts)
        return (out, *self._join(parts)) if first_is_block else out

    def _join(self, parts):
        """Per-block tuples joined: arrays concatenated, equal floats kept, bools OR-ed."""
        xp = self.xp
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
                    v if hasattr(v, "shape") and v.ndim else xp.full(s.shape, v, dtype=s.dtype, device=self.device(s))
                    for v, s in zip(values, shapes, strict=True)
                ]
                joined.append(xp.concat(values, axis=0))
        return tuple(joined)

    # ------------------------------------------------------------------ the chunk loop of linear_cross_entropy

    def chunk_loop(self, cfg, chunk, need, hidden, classifier, bias, target, weight, where, g, g_lse=None):
        """The loop over chunks of rows (:func:`xlsce._linear.eager_loop`, a Python loop)."""
        return _linear.eager_loop(self, cfg, chunk, need, hidden, classifier, bias, target, weight, where, g, g_lse)

    # ------------------------------------------------------------------ entry points (autodiff lives in the overrides)

    def loss(self, cfg, logits, target, weight, where):
        """The loss (and the reported log-sum-exp); the frameworks' backends make it differentiable."""
        out, res = _math.forward(self, cfg, logits, target, weight, where)
        return (out, self.reported_lse(cfg, res, logits)) if cfg.return_lse else out

    def token_accuracy(self, cfg, logits, target, where):
        """The reported token accuracy (``return_token_accuracy``): no gradient flows through an argmax."""
        return _math.token_accuracy(self, cfg, logits, target, where)

    def reported_lse(self, cfg, res, logits):
        lse = _math.reported_lse(self.xp, cfg, res)
        return lse if lse.dtype == logits.dtype else self.xp.astype(lse, logits.dtype)

    def value_and_grad(self, cfg, logits, target, weight, where, cotangent):
        """Loss and d loss / d logits from the analytic backward, without recording autodiff."""
        g = 1.0 if cotangent is None else cotangent
        if self.fuse:  # one pass computes both (the softmax from the forward's exponentials)
            out, _, dz = _math.forward(self, cfg, logits, target, weight, where, g=g)
            return out, dz
        out, res = _math.forward(self, cfg, logits, target, weight, where)
        if cotangent is None and cfg.reduction == "none":
            g = self.xp.ones_like(out)
        return out, _math.backward(self, cfg, logits, target, weight, res, g)[0]

    def linear_loss(self, cfg, chunk, hidden, classifier, bias, target, weight, where):
        """The loss (and the reported lse) of linear_cross_entropy, the positions flattened and restored."""
        xp, shape = self.xp, _positions(cfg, hidden, classifier)
        h, t, m = _flatten(xp, cfg, hidden, classifier, target, where)
        out = self.linear_loss_flat(cfg, chunk, h, classifier, bias, t, weight, m)
        if not (cfg.return_lse or cfg.return_token_accuracy):
            return xp.reshape(out, shape) if cfg.reduction == "none" else out
        out, *rest = out  # lse, accuracy: per position, or the accuracy 0-d
        if cfg.reduction == "none":
            out = xp.reshape(out, shape)
        if cfg.return_lse:
            rest[0] = xp.reshape(rest[0], shape)
        if cfg.return_token_accuracy and cfg.reduction == "none":
            rest[-1] = xp.reshape(rest[-1], shape)
        return (out, *rest)

    def linear_loss_flat(self, cfg, chunk, hidden, classifier, bias, target, weight, where):
        """The loss, or ``(loss, lse)``, ``(loss, accuracy)``, ``(loss, lse, accuracy)``, of flattened inputs
        (the frameworks' backends differentiate it)."""
        args = (self, cfg, hidden, classifier, bias, target, weight, where)
        out, lse, accuracy, _ = _linear.value_and_grads(*args, chunk=chunk, need=(False, False, False))
        return linear_outputs(cfg, out, lse, accuracy)

    def linear_value_and_grads(self, cfg, chunk, hidden, classifier, bias, target, weight, where, *, need, cotangent):
        """``(loss, (dhidden, dclassifier, dbias))`` for the cotangent (default 1), without autodiff."""
        xp, shape = self.xp, _positions(cfg, hidden, classifier)
        h, t, m = _flatten(xp, cfg, hidden, classifier, target, where)
        if cotangent is not None and cfg.reduction == "none":
            cotangent = xp.reshape(cotangent, (h.shape[0], *t.shape[2 if cfg.soft else 1 :]))
        args = (self, cfg, h, classifier, bias, t, weight, m)
        out, _, _, (dh, dw, db) = _linear.value_and_grads(*args, chunk=chunk, need=need, cotangent=cotangent)
        dh, dw, db = self.input_grad(dh, h, True), self.input_grad(dw, classifier), self.input_grad(db, bias)
        if cfg.reduction == "none":
            out = xp.reshape(out, shape)
        if dh is not None:
            dh = xp.reshape(dh, tuple(hidden.shape))
        return out, (dh, dw, db)


class InPlace(Generic):
    """Libraries with mutable arrays (NumPy, PyTorch): xlsce's own buffers are updated in place."""

    inplace = True

    def __init__(self, xp, device, *, traced=False, on_cpu=True):
        super().__init__(xp, device, traced=traced, on_cpu=on_cpu)
        self.eager = not traced and on_cpu
        self.blocks = self.eager

    def imul(self, a, b):
        a *= b
        return a

    def imul_ratio(self, a, num, den):
        a *= num / den
        return a

    def isub(self, a, b):
        a -= b
        return a

    def iadd(self, acc, x):
        if acc is None:
            return x
        acc += x
        return acc


def linear_outputs(cfg, out, lse, accuracy):
    """What the loss returns: ``out``, then ``lse`` if ``cfg.return_lse``, then ``accuracy`` if
    ``cfg.return_token_accuracy``; a tuple whenever more than the loss is asked for."""
    extra = ((lse,) if cfg.return_lse else ()) + ((accuracy,) if cfg.return_token_accuracy else ())
    return (out, *extra) if extra else out


def _positions(cfg, hidden, classifier):
    """The positions of linear_cross_entropy: hidden.shape[:-1] + classifier.shape[1:-1]."""
    return tuple(hidden.shape[:-1]) + tuple(classifier.shape[1:-1])


def _flatten(xp, cfg, hidden, classifier, target, where):
    """hidden (..., H) -> (N, H); target and where (..., d_1, ..., d_K) -> (N,), or (N, D) for a K-dim
    classifier; a probability target (..., V, d_1, ..., d_K) -> (N, V), or (N, V, D)."""
    n = math.prod(hidden.shape[:-1])
    out = (math.prod(classifier.shape[1:-1]),) if classifier.ndim > 2 else ()
    h = xp.reshape(hidden, (n, hidden.shape[-1]))
    t = xp.reshape(target, (n, classifier.shape[0], *out) if cfg.soft else (n, *out))
    m = None if where is None else xp.reshape(where, (n, *out))
    return h, t, m


class ClassShards:
    """Vocabulary parallelism: the class axis of the logits (and the class weights) is this shard's
    contiguous slice, ``shard_index()`` of ``shards`` equal slices in order; class indices are global.

    A mixin before a framework's backend, which gives the collectives: ``all_max(x)`` and ``all_sum(x)``
    of per-row partial results (``lax.pmax``/``lax.psum``, ``all_reduce``), ``shard_index()``.  Each
    reduction of the maths over the class axis (the row maximum, the log-sum-exp's sum, the smoothing
    sums and the number of classes in play, the target's logit and class weight, the argmax) is the
    framework's over the slice, then combined: the loss is that of the whole class axis on every shard,
    with the global K (K' with -inf logits) in both smoothing conventions; the gradient with respect to
    the slice stays local.

    Every shard takes the same path and runs the same collectives: the values that an eager backend
    reads to choose a path are the combined ones (the row maximum, the row sums), and the checks of each
    shard's slice (``require``, ``min_max``) are combined before they are read, so that a bad slice
    raises the same ValueError on every shard instead of leaving the others in a collective.
    """

    def require(self, ok, message):
        if self.readable:  # read: combined first (off the host, a device-side assertion of each shard's own)
            xp = self.xp
            bad = self.all_max(xp.astype(xp.logical_not(ok), xp.int32))
            ok = bad == 0
        super().require(ok, message)

    def min_max(self, x, *, lo=True, hi=True):
        xp = self.xp
        low, high = (xp.astype(f(x), xp.float64) for f in (xp.min, xp.max))  # float64: -x never wraps
        both = self.all_max(xp.stack([-low, high]))
        return (-float(both[0]) if lo else None), (float(both[1]) if hi else None)

    def classes(self, n):
        return n * self.shards

    def row_max(self, a, axis):
        return self.all_max(super().row_max(a, axis))

    def row_dot(self, a, v, axis):
        return self.all_sum(super().row_dot(a, v, axis))

    def row_sums(self, terms, axis):
        sums = super().row_sums(terms, axis)
        if len(sums) < 2:
            return [self.all_sum(s) for s in sums]
        joined = self.all_sum(self.xp.concat(sums, axis=axis))  # one collective for the terms
        return [_part(joined, axis, i) for i in range(len(sums))]

    def class_total(self, v):
        return self.all_sum(super().class_total(v))

    def across(self, x):
        return self.all_sum(x)

    def input_grad(self, grad, like, whole=False):
        return self.all_sum(grad) if whole and grad is not None else grad

    def _local(self, index, n):
        """``(local, inside)``: the class indices as indices into this shard's ``n`` classes (0 outside it)
        and whether they fall in it."""
        local = index - self.shard_index() * n
        inside = (local >= 0) & (local < n)
        return self.xp.where(inside, local, 0), inside

    def take_at(self, a, index, axis):
        # the shard that holds the class gives its value, the others 0; a class on no shard (out of range,
        # unchecked under tracing) gives NaN, as a gather out of range does under jax.jit
        xp = self.xp
        local, inside = self._local(index, a.shape[axis])
        mine = xp.where(inside, super().take_at(a, local, axis), 0.0)
        both = self.all_sum(xp.concat([mine, xp.astype(inside, a.dtype)], axis=axis))
        value, count = _part(both, axis, 0), _part(both, axis, 1)
        return xp.where(count == 1, value, xp.nan)

    def take_classes(self, v, index):
        xp = self.xp
        local, inside = self._local(index, v.shape[0])
        return self.all_sum(xp.where(inside, super().take_classes(v, local), 0.0))

    def isub_at(self, a, index, v, axis):
        local, inside = self._local(index, a.shape[axis])
        return super().isub_at(a, local, self.xp.astype(inside, a.dtype) * v, axis)

    def row_argmax(self, a, axis):
        # the first maximum of the whole row: the smallest global index among the shards' first maxima
        # that attain the row's maximum
        xp = self.xp
        best = xp.argmax(a, axis=axis, keepdims=True)
        top = self.xp.max(a, axis=axis, keepdims=True)
        n = a.shape[axis]
        mine = xp.where(top == self.all_max(top), best + self.shard_index() * n, n * self.shards)
        return xp.squeeze(-self.all_max(-mine), axis=axis)


def _part(x, axis, i):
    """Entry ``i`` of ``axis`` of ``x`` (keepdims)."""
    return x[(slice(None),) * axis + (slice(i, i + 1),)]
