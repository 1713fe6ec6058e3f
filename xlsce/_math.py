"""The loss and its analytic gradient, written once against the array API.

Every function here takes the backend ``ops`` of the call (``xlsce/backends``): its namespace
``ops.xp`` and the primitives (``ops.exp_``, ``ops.take_at``, ``ops.by_blocks``, ...) that a
framework may do faster; nothing here imports a framework or asks which one it is.  The mode is
a property of the backend: ``ops.eager`` (values may be read to skip work: eager NumPy, and
PyTorch on the CPU) chooses the eager algorithm, otherwise (``jax.jit``, ``torch.compile``, a
GPU, array-api-strict) the traced one.  The public layer (``xlsce/__init__.py``) validates the
arguments and builds a :class:`~xlsce._types.Config`; the backends register :func:`backward`
with torch autograd and ``jax.custom_vjp``.

Notation (one position i, classes c along ``cfg.axis``)::

    z      = logits (after the optional soft-cap s*tanh(x/s)), in float32/float64
    lse    = log sum_c exp(z_c)                     (shifted by the row max)
    lp_c   = z_c - lse                              (log-softmax)
    F      = {c : z_c > -inf}                       (classes in play), K' = |F|
    q      = a * t + b * 1_F                        (smoothed target)
    loss   = -sum_c w_c q_c lp_c + zeta * lse**2    (0 * log 0 = 0)
    dloss/dz = (sum_c w_c q_c + 2 zeta lse) * softmax(z) - w * q

where ``t`` is the one-hot of the class index or the given probabilities, and

    uniform:   a = 1 - eps,     b = eps / K'
    exclusive: b = eps / (K'-1), a = 1 - eps - b     (a = 1, b = 0 when K' = 1)

so that exclusive at eps is uniform at eps*K'/(K'-1).  With every logit
finite, K' = K and these are PyTorch's (uniform) and fairseq's (exclusive)
formulas.  Nothing of shape (N, K) is kept between forward and backward: the
residuals are a handful of per-position vectors (the one exception, small eager
PyTorch logits, is in ``xlsce/backends/torch.py``).

The per-position pass, :func:`_position_terms`, is four steps, each a function:

1. the shift by the row maximum and the row sums that the smoothing and soft targets need
   (:func:`_eager_shift` or :func:`_traced_shift`);
2. the sums over the classes in play where a logit is -inf (:func:`_masked_sums`);
3. the log-sum-exp, from the exponentials of the shifted logits;
4. the loss terms (:func:`_loss_terms`).

Values known in Python (``type(x) is float``: made by xlsce's own arithmetic, or a cotangent read
by ``ops.number``) stay Python numbers, which costs no array operation.
"""

from __future__ import annotations

import math

from ._types import Config, Residuals

__all__ = [
    "Config",
    "Residuals",
    "backward",
    "capped_logits",
    "divide",
    "forward",
    "mean_denominator",
    "reported_lse",
    "valid_positions",
]


def capped_logits(ops, cfg: Config, logits):
    """The logits in the compute dtype, soft-capped if asked."""
    xp = ops.xp
    z = logits
    dt = ops.compute[z.dtype]
    if z.dtype != dt:
        z = xp.astype(z, dt)
    if cfg.softcap is not None:  # s * tanh(z / s), keeping -inf (a class out of play) at -inf
        z = xp.where(z == -xp.inf, -xp.inf, cfg.softcap * xp.tanh(z / cfg.softcap))
    return z


def _shift_input(ops, cfg: Config, logits):
    """The logits as the shift (z - m, z - lse) reads them: eager without a soft-cap, as they are
    (``ops.subtract`` converts half-precision logits into its compute-dtype result); otherwise
    :func:`capped_logits` (traced, the compiler fuses the conversion)."""
    if cfg.softcap is None and ops.eager:
        return logits
    return capped_logits(ops, cfg, logits)


def _along(xp, v, axis, ndim):
    """A (K,) vector reshaped to broadcast along ``axis`` of an ``ndim`` array."""
    return xp.reshape(v, tuple(-1 if i == axis else 1 for i in range(ndim)))


def valid_positions(xp, cfg: Config, target, where):
    """Boolean of the positions that count (the positions' shape), or None when all do."""
    valid = None
    if not cfg.soft and cfg.ignore_index is not None:
        info = xp.iinfo(target.dtype)
        if info.min <= cfg.ignore_index <= info.max:
            valid = target != cfg.ignore_index
    if where is not None:
        valid = where if valid is None else xp.logical_and(valid, where)
    return valid


def mean_denominator(ops, cfg: Config, target, weight, where):
    """The "mean" denominator, from the targets alone: ``D = sum_i m_i w[y_i]`` for class indices with
    class weights (in the weights' compute dtype), else the number of counted positions ``sum_i m_i``
    (an integer count, exact); a 0-d array.  The same count as :func:`_reduction_factor`'s."""
    xp = ops.xp
    valid = valid_positions(xp, cfg, target, where)
    if weight is not None and not cfg.soft:
        wv = xp.astype(weight, ops.compute[weight.dtype], copy=False)
        w_y = ops.take_classes(wv, target if valid is None else ops.where0(valid, target))
        return xp.sum(w_y if valid is None else xp.where(valid, w_y, 0.0))
    dev = ops.device(target)
    count = xp.__array_namespace_info__().default_dtypes(device=dev)["integral"]
    if valid is None:
        shape = target.shape[: cfg.axis] + target.shape[cfg.axis + 1 :] if cfg.soft else target.shape
        return xp.full((), math.prod(shape), dtype=count, device=dev)
    return xp.sum(xp.astype(valid, count))


def divide(ops, x, d, dtype=None):
    """``x / d`` for the explicit ``denominator=`` of a mean, 0 where ``d == 0`` (as a mean over nothing).
    ``d`` is a Python number or a 0-d array that is read only where that is cheap (``ops.number``: eager,
    on the host; never under tracing or on an accelerator); the result keeps ``x``'s dtype (``dtype`` for
    a Python number ``x`` over an array ``d``)."""
    xp = ops.xp
    d = ops.number(d)
    if not hasattr(d, "dtype"):
        return x * 0.0 if d == 0 else x / float(d)
    d = xp.astype(d, x.dtype if hasattr(x, "dtype") else dtype)
    nothing = d == 0
    return xp.where(nothing, 0.0, x / xp.where(nothing, 1.0, d))


def _coefficients(xp, cfg: Config, k_eff):
    """Smoothing coefficients (a, b) for the number of classes in play (a number or per row)."""
    eps = cfg.eps
    if type(k_eff) is float:  # every class in play
        b = eps / (k_eff - 1) if cfg.exclusive else eps / k_eff
        return (1.0 - eps - b if cfg.exclusive else 1.0 - eps), b
    if cfg.exclusive:
        several = k_eff > 1
        b = xp.where(several, eps / xp.where(several, k_eff - 1, 1.0), 0.0)
        a = xp.where(several, 1.0 - eps - b, 1.0)
    else:  # no class in play (a row of -inf only): no smoothing, q = t (an infinite loss where t has mass)
        b = xp.where(k_eff > 0, eps / xp.where(k_eff > 0, k_eff, 1.0), 0.0)
        a = xp.where(k_eff > 0, 1.0 - eps, xp.ones_like(k_eff))
    return a, b


def _times(xp, c, x, finite=False):
    """c * x with 0 wherever c == 0, also where x is infinite (0 * log 0 = 0); ``finite``: x is known finite."""
    if type(c) is float:
        return x if c == 1 else c * x if c != 0 else xp.zeros_like(x)
    return c * x if finite else c * xp.where(c == 0, 0.0, x)


def _minus_times(ops, acc, c, x, finite):
    """acc - c * x, in place on ``acc`` (a buffer of ours) where the backend allows; as :func:`_times`."""
    if type(c) is float:
        return acc if c == 0 else ops.isub(acc, x) if c == 1 else ops.isub_product(acc, c, x)
    if finite:
        return ops.isub_product(acc, c, x)
    # 0 where c == 0; where x is -inf (a class out of play that the target weighs, or a shift that
    # overflowed) -inf whatever the sign of c (the exclusive convention's coefficient of t, 1 - eps - b, is
    # negative for eps > (K'-1)/K'): the loss is then +inf, never -inf, nor inf - inf = NaN
    xp = ops.xp
    return acc - xp.where(c == 0, 0.0, xp.where(x == -xp.inf, -xp.inf, c * x))


def forward(ops, cfg: Config, logits, target, weight=None, where=None, g=None, grad_out=None):
    """Loss (reduced as ``cfg.reduction``) and the residuals for :func:`backward`.

    The per-position terms are independent, so eager NumPy and PyTorch evaluate
    them on blocks of positions that stay in cache (``ops.by_blocks``); the
    reduction then needs only per-position values.

    With ``g``, the cotangent (the fused path of ``value_and_grad``, on backends
    that write in place), the gradient is computed in the same pass, from the
    exponentials the loss needs, and returned third: ``(loss, residuals, dlogits)``.
    The reduction's factor is known before the pass (the "mean" denominator
    comes from the targets), so nothing is recomputed.  ``grad_out`` (with ``g``;
    a buffer of the logits' shape in their compute dtype) receives that
    gradient instead of a fresh buffer.
    """
    xp, ax = ops.xp, cfg.axis
    dt = ops.compute[logits.dtype]
    wv = None if weight is None else xp.astype(weight, dt, copy=False)
    valid = valid_positions(xp, cfg, target, where)
    y = w_y = None
    if not cfg.soft:
        y = xp.expand_dims(target if valid is None else ops.where0(valid, target), axis=ax)
        if wv is not None:
            w_y = ops.take_classes(wv, y)  # the target's class weight, keepdims
    if valid is not None:
        valid = xp.expand_dims(valid, axis=ax)
    scale, d = _reduction_factor(ops, cfg, logits, valid, w_y, dt)
    if cfg.reduction == "mean" and w_y is not None and cfg.has_z_loss:
        positions = tuple(logits.shape[:ax]) + tuple(logits.shape[ax + 1 :])
        cfg = cfg._replace(z_loss=z_loss_weight(ops, cfg, valid, d, dt, positions))
    soft_target = target if cfg.soft else None

    if g is None:

        def terms(logits, target, y, w_y, out=None):
            return _position_terms(ops, cfg, logits, target, y, wv, w_y, out=out)

        blocks, out_dtype = (logits, soft_target, y, w_y), None
    else:
        g = g if type(g) is float else _cotangent(ops, cfg, g, dt)
        gs = g * scale if type(scale) is float or type(g) is not float or g != 1 else scale

        def terms(logits, target, y, w_y, gs, out=None):
            return _position_terms(ops, cfg, logits, target, y, wv, w_y, gs, out)

        blocks, out_dtype = (logits, soft_target, y, w_y, gs), logits.dtype
    parts = ops.by_blocks(
        terms, blocks, blocked=ax != 0, out_dtype=out_dtype, first_is_block=g is not None, out=grad_out
    )
    dz, (loss, lse, lse_lo, coef, a_res, b, masked, lse_out) = (parts[0], parts[1:]) if g is not None else (None, parts)

    # Reduction.  Ignored positions are zeroed with `where` (never 0 * inf: a masked position never
    # reaches the result, whatever its logits hold); eager "sum"/"mean" with every logit finite first
    # by the product with the reduction's factor (0 where ignored), which also divides: one cheap
    # operation, kept where its result is finite (else a loss term overflowed, a z-loss lse**2 say,
    # and `where` decides).
    res = Residuals(lse, lse_lo, coef, a_res, b, scale, y, masked, lse_out)
    # the row sums checked finite (every logit finite), and no lse**2 that may overflow
    finite = not masked and (cfg.smoothed or cfg.soft) and ops.eager and not cfg.has_z_loss
    if valid is not None and finite and cfg.reduction != "none" and type(scale) is not float:
        out = xp.sum(loss * scale)
        if math.isfinite(ops.number(out)):
            return _result(xp, out, logits, res, dz)
    if valid is not None:
        loss = xp.where(valid, loss, 0.0)
    if cfg.reduction == "none":
        out = xp.squeeze(loss, axis=ax)
    elif cfg.reduction == "sum" or (type(d) is float and d == 1):
        out = xp.sum(loss)
    elif type(d) is float:  # the denominator known in Python
        if d == 0:  # a mean over nothing
            out = xp.zeros((), dtype=dt, device=ops.device(loss))
        elif d == math.prod(loss.shape):
            out = xp.mean(loss)  # every position counts once: one operation
        else:
            out = xp.sum(loss) / d
    else:
        nothing = d == 0
        out = xp.where(nothing, 0.0, xp.sum(loss) / xp.where(nothing, 1.0, d))
    return _result(xp, out, logits, res, dz)


def _result(xp, out, logits, res: Residuals, dz):
    """What :func:`forward` returns: the loss in the logits' dtype, the residuals, and the fused gradient."""
    if out.dtype != logits.dtype:
        out = xp.astype(out, logits.dtype)
    return (out, res) if dz is None else (out, res, dz)


def _reduction_factor(ops, cfg: Config, logits, valid, w_y, dt):
    """``(scale, d)``: the factor of each position's loss in the reduced loss, and the mean's
    denominator (1.0 for "none"/"sum"); from the targets alone, before any pass over the logits.
    ``w_y``: the target's class weight per position (index targets with class weights), else None.
    The denominator is read as a Python number only where that is cheap (``ops.eager``)."""
    xp = ops.xp
    vm = 1.0 if valid is None else xp.astype(valid, dt)
    if cfg.reduction != "mean":
        return vm, 1.0
    positions = tuple(logits.shape[: cfg.axis]) + tuple(logits.shape[cfg.axis + 1 :])
    if valid is None and w_y is None and None not in positions:  # every position counts once
        n = math.prod(positions)
        return (1.0 / n, float(n)) if n else (0.0, 0.0)  # a mean over nothing is 0
    if valid is None and w_y is None:  # unknown (None) sizes, as lazy libraries report them: counted
        ones = xp.ones_like(xp.sum(logits, axis=cfg.axis, keepdims=True), dtype=dt)
        vm, d = ones, xp.sum(ones)
    elif w_y is None:
        d = xp.sum(vm)
    else:
        d = xp.sum(w_y if valid is None else vm * w_y)
    if ops.eager:
        d = float(d)
        return (vm / d if d != 0 else 0.0), d
    nothing = d == 0
    return xp.where(nothing, 0.0, vm / xp.where(nothing, 1.0, d)), d


def z_loss_weight(ops, cfg: Config, valid, d, dt, positions):
    """The z-loss weight under a class-weighted "mean": ``zeta * D / n``, so that the z-loss is its
    mean over the n counted positions (Liger, PaLM: a per-position term), not divided by the
    cross-entropy's ``D = sum_i m_i w[y_i]``.  0 when nothing counts (then D = 0: the mean is 0)."""
    xp = ops.xp
    n = float(math.prod(positions)) if valid is None else xp.sum(xp.astype(valid, dt))
    if type(n) is float:  # every position counts (d a number, or an array: traced, lazy)
        return cfg.z_loss * d / n if n else 0.0
    return xp.where(n > 0, cfg.z_loss * d / xp.where(n > 0, n, 1.0), 0.0)


def _cotangent(ops, cfg: Config, g, dt):
    """The cotangent as a Python number (0-d, readable) or an array that broadcasts against the residuals."""
    xp = ops.xp
    g = ops.number(g)  # a 0-d cotangent on the CPU: Python arithmetic, fewer array operations
    g = xp.astype(g, dt, copy=False) if hasattr(g, "dtype") else g
    if cfg.reduction == "none" and hasattr(g, "shape"):
        g = xp.expand_dims(g, axis=cfg.axis)
    return g


def _position_terms(ops, cfg: Config, logits, target, y, wv, w_y, gs=None, out=None):
    """Per-position loss (keepdims) and residual terms for a block of positions.

    With ``gs`` (the cotangent times the reduction's factor), the block's
    gradient comes first, computed from the exponentials of the pass (the
    buffer of the shifted logits becomes the gradient).  ``out``, if given
    (eager; the block's shape, compute dtype), is that buffer: the block of
    the returned gradient, or a scratch block reused from block to block.

    Passes over the data: max, shift (one buffer), the row sums the smoothing
    and soft targets need, exp in place, sum.  The handling of -inf logits
    costs extra passes only where they occur (eager) or may occur (traced,
    where the compiler fuses them).
    """
    xp, ax = ops.xp, cfg.axis
    z = _shift_input(ops, cfg, logits)
    w = None if wv is None else _along(xp, wv, ax, z.ndim)
    wt = None
    if cfg.soft:
        t = xp.astype(target, ops.compute[logits.dtype], copy=False)
        wt = t if w is None else w * t

    # 1-2. the shift, the row sums and the target's shifted logit; masked: a logit may be -inf
    shift = _eager_shift if ops.eager else _traced_shift
    m, zs, z_y, sums, masked = shift(ops, cfg, z, y, w, wt, out)

    # 3. the log-sum-exp, from exp(z - m) (in place where the backend allows)
    zs = ops.exp_(zs)
    s = ops.row_dot(zs, None, ax)
    empty = None
    if masked:
        empty = s == 0  # every logit -inf: lse = -inf, kept out of the arithmetic
        s = xp.where(empty, 1.0, s)  # then zs = 0 and the softmax zs / s is 0
    log_s = xp.log(s)  # s >= 1: the row maximum contributes exp(0)
    z_loss = cfg.has_z_loss
    lse = lse_lo = None
    if gs is None:  # the residuals: the log-sum-exp and its rounding error
        lse, lse_lo = _two_sum(m, log_s)
    elif z_loss or cfg.return_lse:
        lse = m + log_s

    # 4. the loss terms
    loss, coef, a_res, b = _loss_terms(ops, cfg, log_s, z_y, sums, wt, w_y, masked)
    if z_loss:
        zl = cfg.z_loss * lse * lse
        loss = loss + (xp.where(empty, xp.inf, zl) if masked else zl)
        coef = coef + 2.0 * cfg.z_loss * lse
    if not cfg.soft and not ops.eager:
        # unchecked class indices (jax.jit): out of range, the target's logit is NaN (JAX's gather), and
        # so is the loss; the NaN goes into the softmax's factor, so the row's gradient is NaN too
        coef = xp.where(xp.isnan(z_y), z_y, coef)
    lse_out = None
    if cfg.return_lse:
        lse_out = xp.where(empty, -xp.inf, lse) if masked else lse
    if gs is None:
        return loss, lse, lse_lo, coef, a_res, b, masked, lse_out
    # zs holds exp(z - m); softmax = zs / s
    alpha, beta, gamma = gs * coef, gs * b, gs * a_res  # the factors of softmax, the smoothing mass, the target
    dz = _position_grad(ops, cfg, logits, target, y, w, None, alpha, beta, gamma, masked, e=(zs, s), z=z)
    return dz, loss, lse, lse_lo, coef, a_res, b, masked, lse_out


def _two_sum(a, b):
    """``(hi, lo)`` with ``hi = fl(a + b)`` and ``hi + lo = a + b`` exactly (Knuth's TwoSum: six
    operations, on per-position values).  The backward's softmax ``exp(z - hi) * exp(-lo)`` is then as
    accurate as ``exp(z - m) / s``: ``z - hi`` is exact for the classes near the maximum, where
    ``exp(z - lse)`` with the rounded ``lse`` loses ``log s`` entirely for logits of 1e8 in float32
    (a softmax of [1, 1, 0] for [1e8, 1e8, 0]) and ``|lse| * 2**-24`` of the exponent elsewhere."""
    hi = a + b
    bb = hi - a
    return hi, (a - (hi - bb)) + (b - bb)


def _row_max(ops, z, axis):
    """The row maximum (keepdims) in the compute dtype (the maximum of half-precision values is exact)."""
    xp = ops.xp
    m = ops.row_max(z, axis)
    dt = ops.compute[z.dtype]
    return m if m.dtype == dt else xp.astype(m, dt)


def _eager_shift(ops, cfg: Config, z, y, w, wt, out):
    """The eager algorithm's shift: ``(m, z - m, z_y - m, sums, masked)``.

    -inf logits are looked for, and handled only where they occur: in the row maxima when no row
    sums are needed, else in the row sums that the smoothing and soft targets need anyway (a -inf
    row maximum shows in them as NaN: one check of the sums covers both).  ``sums`` is
    ``(K', sum_c w_c, sum_c w_c zs_c, sum_c w_c t_c zs_c)`` over the classes in play (None where not
    needed; ``zs = z - m``).
    """
    xp, ax = ops.xp, cfg.axis
    m = _row_max(ops, z, ax)
    row_sums = cfg.smoothed or cfg.soft
    masked = not row_sums and not ops.all_finite(m)
    if masked:
        m = xp.where(m == -xp.inf, 0.0, m)  # a row of -inf only
    zs = ops.subtract(z, m, out)  # shifted logits: a buffer of ours, exponentiated in place later
    smooth_sum = target_sum = None
    if row_sums and not masked:  # taken before zs is overwritten
        taken = []
        if cfg.smoothed:
            smooth_sum = ops.row_dot(zs, w, ax)
            taken.append(smooth_sum)
        if cfg.soft:
            target_sum = ops.row_dot(zs, wt, ax)
            taken.append(target_sum)
        masked = not ops.all_finite(*taken)  # a -inf logit somewhere
        if masked:  # the shift again, with rows of -inf only shifted by 0
            m = xp.where(m == -xp.inf, 0.0, m)
            zs = ops.subtract(z, m, out)
    z_y = None if cfg.soft else ops.take_at(zs, y, ax)  # from zs, before it is exponentiated
    if masked:
        sums = _masked_sums(ops, cfg, z, zs, w, wt)
    else:
        k = float(ops.classes(z.shape[ax]))
        s_w = (k if w is None else ops.class_total(w)) if cfg.smoothed else None
        sums = (k, s_w, smooth_sum, target_sum)
    return m, zs, z_y, sums, masked


def _traced_shift(ops, cfg: Config, z, y, w, wt, out):
    """The traced algorithm's shift: ``(m, z - m, z_y - m, sums, True)``, the handling of -inf logits
    always in the graph (fused there).  The row sums are those of the logits themselves, shifted after
    (a consumer of z of their own, so that XLA fuses them into one pass: every variant with the shift
    inside these sums was slower on XLA's CPU backend); the sums over the classes in play
    (:func:`_masked_sums`) only where those come out non-finite (``ops.cond_finite``: a ``lax.cond``
    under JAX).  Unshifted, the smoothing sum sum_c w_c z_c loses about K * 2**-24 * |z| in float32:
    relative 1e-6 to 1e-5 of the loss for logits around 1e3 to 1e4, like optax's mean(z)
    (docs/what-it-computes.md)."""
    xp, ax = ops.xp, cfg.axis
    m = _row_max(ops, z, ax)
    m = xp.where(m == -xp.inf, 0.0, m)  # a row of -inf only
    zs = ops.subtract(z, m, out)
    sums = (None, None, None, None)
    if cfg.smoothed or cfg.soft:

        def plain():  # every logit finite
            k = float(ops.classes(z.shape[ax]))
            k_eff = s_w = smooth = target = None
            if cfg.smoothed:
                k_eff = k * xp.ones_like(m)
                s_w = k_eff if w is None else ops.class_total(w) * xp.ones_like(m)
                smooth = ops.row_dot(z, w, ax) - s_w * m
            if cfg.soft:
                target = ops.row_dot(z, wt, ax) - ops.row_dot(wt, None, ax) * m
            return k_eff, s_w, smooth, target

        sums = ops.cond_finite(z, plain, lambda: _masked_sums(ops, cfg, z, z - m, w, wt))
    # the target's shifted logit from z (a gather from zs made XLA keep zs as an (N, K) buffer of its own)
    z_y = None if cfg.soft else ops.take_at(z, y, ax) - m
    return m, zs, z_y, sums, True


def _masked_sums(ops, cfg: Config, z, zs, w, wt):
    """``(K', sum_c w_c, sum_c w_c zs_c, sum_c w_c t_c zs_c)`` over the classes in play
    (``z > -inf``; ``zs = z - m``), in one pass (``ops.row_sums``; under JAX one reduction of several
    operands).  A class is out of play by its logit, never by its shifted logit: a finite logit whose
    shift overflows to -inf (``-3e38 - 3e38`` in float32) stays in play and makes the loss +inf, the
    rounded value of a loss beyond the dtype's range, not a silent 0.  The soft targets' sum keeps a
    -inf where a target puts mass on a class out of play (an infinite loss, as documented);
    0 * (-inf) = 0 elsewhere."""
    xp, ax = ops.xp, cfg.axis
    fin = z > -xp.inf
    terms = []
    if cfg.smoothed:
        zf = xp.where(fin, zs, 0.0)
        terms.append(xp.astype(fin, zs.dtype))
        if w is not None:
            terms.append(xp.where(fin, w, 0.0))
        terms.append(zf if w is None else _times(xp, w, zf))  # a zero weight times an overflowed -inf: 0
    if cfg.soft:
        terms.append(_times(xp, wt, zs))
    sums = ops.row_sums(terms, ax)
    k_eff = s_w = smooth = target = None
    if cfg.smoothed:
        k_eff, smooth = sums[0], sums[1 if w is None else 2]
        s_w = k_eff if w is None else sums[1]
    if cfg.soft:
        target = sums[-1]
    return k_eff, s_w, smooth, target


def _loss_terms(ops, cfg: Config, log_s, z_y, sums, wt, w_y, masked):
    """``(loss, coef, a_res, b)``: loss = sum_c w_c q_c (lse - z_c) = coef * log_s - sum_c w_c q_c zs_c,
    with coef = sum_c w_c q_c: in shifted coordinates (exact for huge logits), 0 * (-inf) = 0 (a class
    out of play)."""
    xp = ops.xp
    k_eff, s_w, smooth_sum, target_sum = sums
    row_sums = cfg.smoothed or cfg.soft
    if cfg.smoothed:
        a, b = _coefficients(xp, cfg, k_eff)
        coef, smooth = b * s_w, (b, smooth_sum, not masked)
    else:
        a, b, coef, smooth = 1.0, 0.0, 0.0, None
    if cfg.soft:
        a_res, target_term = a, (a, target_sum, not masked)
        coef = coef + a * ops.row_dot(wt, None, cfg.axis)
    else:
        a_res = a if w_y is None else a * w_y
        target_term = (a_res, z_y, not masked and row_sums)  # then every logit is finite
        coef = coef + a_res
    loss = log_s if type(coef) is float and coef == 1 else coef * log_s  # log_s is finite and ours
    for c, x, finite in (target_term, smooth) if smooth else (target_term,):
        loss = _minus_times(ops, loss, c, x, finite)
    return loss, coef, a_res, b


def reported_lse(xp, cfg: Config, res: Residuals):
    """The log-sum-exp reported by ``return_lse``, of the positions' shape (compute dtype)."""
    return xp.squeeze(res.lse_out, axis=cfg.axis)


def backward(ops, cfg: Config, logits, target, weight, res: Residuals, g, need_target=False, g_lse=None):
    """Gradient of the loss with respect to the logits (and the soft target).

    ``g`` is the cotangent of the reduced loss: a scalar for "sum"/"mean", an
    array of the loss's shape for "none"; ``g_lse`` (optional, the positions'
    shape) that of the reported log-sum-exp, whose gradient is
    ``g_lse * softmax(z)``.  Returns ``(dlogits, dtarget)``,
    ``dtarget`` being None unless ``need_target`` and the targets are soft.
    The gradient is the one buffer of the logits' shape that is allocated;
    it is filled block by block, in place.
    """
    xp, ax = ops.xp, cfg.axis
    dt = ops.compute[logits.dtype]
    g = _cotangent(ops, cfg, g, dt)
    wv = None if weight is None else xp.astype(weight, dt, copy=False)
    if type(res.scale) is float:  # Python numbers multiplied first
        alpha, beta, gamma = (
            g * (res.scale * v) if type(v) is float else g * res.scale * v for v in (res.coef, res.b, res.a)
        )
    else:
        c = g * res.scale
        alpha, beta, gamma = c * res.coef, c * res.b, c * res.a
    if g_lse is not None:
        alpha = alpha + xp.expand_dims(xp.astype(g_lse, dt, copy=False), axis=ax)

    w = None if wv is None else _along(xp, wv, ax, logits.ndim)

    # softmax = exp(z - lse) * exp(-lse_lo): the rounding error of lse goes into the factor alpha
    alpha = alpha * xp.exp(-res.lse_lo)

    def grad(logits, target, y, lse, alpha, beta, gamma, out=None):
        return _position_grad(ops, cfg, logits, target, y, w, lse, alpha, beta, gamma, res.masked, out=out)

    blocks = (logits, target if cfg.soft else None, res.y, res.lse, alpha, beta, gamma)
    dz = ops.by_blocks(grad, blocks, blocked=ax != 0, out_dtype=logits.dtype)
    dtarget = None
    if need_target and cfg.soft:
        z = capped_logits(ops, cfg, logits)
        lp = xp.where(z > -xp.inf, (z - res.lse) - res.lse_lo, 0.0)
        dtarget = -gamma * (lp if wv is None else lp * _along(xp, wv, ax, z.ndim))
    return dz, dtarget


def _position_grad(ops, cfg: Config, logits, target, y, w, lse, alpha, beta, gamma, masked, e=None, z=None, out=None):
    """alpha * softmax(z) - beta * w (on the classes in play) - gamma * (w * t or the one-hot), for a block.

    ``w`` is the class weights shaped to broadcast along the class axis, or None.
    ``out``, if given (a buffer of the block's shape in the compute dtype), receives the result.

    Without ``e``: alpha * softmax = exp(z - lse) * alpha, ``alpha`` carrying the factor
    ``exp(-lse_lo)`` of the rounding error of ``lse`` (:func:`_two_sum`, :func:`backward`).
    ``e = (exp(z - m), s)``, if given, is the forward's buffer of exponentials (overwritten)
    and its row sums: alpha * softmax = exp(z - m) * (alpha / s) without a second
    exponential.
    """
    xp, ax = ops.xp, cfg.axis
    dt = ops.compute[logits.dtype]
    z = _shift_input(ops, cfg, logits) if z is None else z
    if e is None:
        dz = ops.exp_(ops.subtract(z, lse, out))  # softmax / exp(-lse_lo), in a buffer of ours (compute dtype)
        dz = ops.imul(dz, alpha)
    else:
        dz = ops.imul_ratio(e[0], alpha, e[1])
    # minus q (times w and the cotangent), q = a t + b 1_F.  Exclusive, a = 1 - eps - b is negative for
    # eps > (K'-1)/K' (possible for K' >= 2 only where eps > 1/2): subtracting b, then a t, cancels where q
    # is small (the target's q is 1 - eps: eps near 1), losing the softmax's digits there (p - b + b); there
    # the two are subtracted as one term, made elementwise (one more buffer of the block's shape)
    combined = cfg.smoothed and cfg.exclusive and (type(cfg.eps) is not float or cfg.eps > 0.5)
    if cfg.smoothed:
        wf = w
        if masked:
            fin = z > -xp.inf
            wf = xp.astype(fin, dt) if w is None else xp.where(fin, w, 0.0)
        if combined:
            smooth = beta if wf is None else beta * wf
        else:
            dz = ops.isub(dz, beta) if wf is None else ops.isub_product(dz, beta, wf)
    if cfg.soft:
        t = xp.astype(target, dt, copy=False)
        term = gamma * (t if w is None else w * t)
        dz = ops.isub(dz, smooth + term if combined else term)
    elif combined:  # b w everywhere, b w + a w at the target: one buffer of the block's shape
        dz = ops.isub(dz, ops.isub_at(xp.zeros_like(dz) + smooth, y, -gamma, ax))
    else:
        dz = ops.isub_at(dz, y, gamma, ax)
    if cfg.softcap is not None:
        # d(c tanh(x/c))/dx = 1 - tanh(x/c)^2 = 4 e / (1 + e)^2 with e = exp(-2 |x/c|): no cancellation
        # where the cap saturates (1 - tanh^2 is 0 in float32 from |x/c| ~ 9 on), and 0 at x = -inf
        e2 = xp.exp(-2.0 * xp.abs(xp.astype(logits, dt) / cfg.softcap))
        dz = ops.imul(dz, 4.0 * e2 / ((1.0 + e2) * (1.0 + e2)))
    return dz


def token_hits(ops, cfg: Config, logits, target, where):
    """Per position, 1.0 where the argmax of the (capped) logits along ``cfg.axis`` is the target and the
    position counts, else 0.0 (compute dtype, the positions' shape): Liger-Kernel's token accuracy.

    Ties go to the first maximum (``argmax``'s rule on every backend).  No gradient flows through it."""
    xp = ops.xp
    dt = ops.compute[logits.dtype]
    z = logits if cfg.softcap is None else capped_logits(ops, cfg, logits)
    best = ops.row_argmax(z, cfg.axis)
    hit = xp.astype(target, best.dtype) == best  # the target in argmax's dtype: no wrap-around of a large index
    valid = valid_positions(xp, cfg, target, where)
    if valid is not None:
        hit = xp.logical_and(hit, valid)
    return xp.astype(hit, dt)


def accuracy_fraction(ops, cfg: Config, hits, target, where):
    """``hits`` as :func:`cross_entropy` reports them: as they are for "none", else the fraction of the counted
    positions (``target``/``where``: which count) that are hits, a 0-d array, 0 when none counts."""
    xp = ops.xp
    if cfg.reduction == "none":
        return hits
    total = xp.sum(hits)
    valid = valid_positions(xp, cfg, target, where)
    if valid is None and None not in target.shape:
        n = math.prod(target.shape)
        return total / n if n else total  # no position: the sum of nothing, 0
    n = xp.sum(xp.ones_like(hits) if valid is None else xp.astype(valid, hits.dtype))
    nothing = n == 0
    return xp.where(nothing, 0.0, total / xp.where(nothing, 1.0, n))


def token_accuracy(ops, cfg: Config, logits, target, where):
    """The reported token accuracy of :func:`xlsce.cross_entropy` (``return_token_accuracy``)."""
    return accuracy_fraction(ops, cfg, token_hits(ops, cfg, logits, target, where), target, where)
