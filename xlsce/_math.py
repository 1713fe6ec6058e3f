"""The loss and its analytic gradient, written once against the array API.

Everything here takes the namespace ``xp`` of the inputs and uses only the
standard; nothing imports a framework.  The public layer (``xlsce/__init__.py``)
validates the arguments and builds a :class:`Config`; the backend adapters
(``xlsce/_adapters.py``) register :func:`backward` with torch autograd and
``jax.custom_vjp``.

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
PyTorch logits, is in ``xlsce/_torch_autograd.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import _adapters as _ops


class Config(NamedTuple):
    """Static (hashable) configuration of one loss call."""

    axis: int  # class axis, non-negative
    eps: float  # label smoothing
    exclusive: bool  # smoothing convention
    reduction: str  # "none" | "sum" | "mean"
    ignore_index: int | None  # None: nothing ignored by value
    soft: bool  # probability targets
    z_loss: float = 0.0
    softcap: float | None = None
    return_lse: bool = False  # also report the per-position log-sum-exp


class Residuals(NamedTuple):
    """What the backward needs besides the inputs: O(N), shaped like the loss with keepdims."""

    lse: object  # log-sum-exp (shift m + log s; 0 for a row of -inf only)
    coef: object  # sum_c w_c q_c + 2 zeta lse: the factor of softmax(z)
    a: object  # a * w[y] (index targets) or a (probability targets)
    b: object  # smoothing mass per class in play
    scale: object  # reduction factor per position (0 where ignored)
    y: object  # class index with ignored positions set to 0, keepdims (index targets)
    masked: bool  # whether -inf logits need masking (always True when traced)
    lse_out: object = None  # the log-sum-exp to report (-inf where every logit is -inf), if asked


def compute_dtype(xp, dtype):
    """float64 stays float64; every other floating dtype is computed in float32."""
    return xp.float64 if dtype == xp.float64 else xp.float32


def capped_logits(xp, cfg: Config, logits):
    """The logits in the compute dtype, soft-capped if asked."""
    z = logits
    dt = compute_dtype(xp, z.dtype)
    if z.dtype != dt:
        z = xp.astype(z, dt)
    if cfg.softcap is not None:  # s * tanh(z / s), keeping -inf (a class out of play) at -inf
        z = xp.where(z == -xp.inf, -xp.inf, cfg.softcap * xp.tanh(z / cfg.softcap))
    return z


def _shift_input(xp, cfg: Config, logits):
    """The logits as the shift (z - m, z - lse) reads them: eager without a soft-cap, as they are
    (``_ops.subtract`` converts half-precision logits into its compute-dtype result); otherwise
    :func:`capped_logits` (traced, the compiler fuses the conversion)."""
    if cfg.softcap is None and _ops.can_branch(logits):
        return logits
    return capped_logits(xp, cfg, logits)


def _along(xp, v, axis, ndim):
    """A (K,) vector reshaped to broadcast along ``axis`` of an ``ndim`` array."""
    return xp.reshape(v, tuple(-1 if i == axis else 1 for i in range(ndim)))


def _valid(xp, cfg: Config, target, where):
    """Boolean of the positions that count (the positions' shape), or None when all do."""
    valid = None
    if not cfg.soft and cfg.ignore_index is not None:
        info = xp.iinfo(target.dtype)
        if info.min <= cfg.ignore_index <= info.max:
            valid = target != cfg.ignore_index
    if where is not None:
        valid = where if valid is None else xp.logical_and(valid, where)
    return valid


def _coefficients(xp, cfg: Config, k_eff):
    """Smoothing coefficients (a, b) for the number of classes in play (a number or per row)."""
    eps = cfg.eps
    if isinstance(k_eff, float):  # every class in play
        b = eps / (k_eff - 1) if cfg.exclusive else eps / k_eff
        return (1.0 - eps - b if cfg.exclusive else 1.0 - eps), b
    if cfg.exclusive:
        several = k_eff > 1
        b = xp.where(several, eps / xp.where(several, k_eff - 1, 1.0), 0.0)
        a = xp.where(several, 1.0 - eps - b, 1.0)
    else:
        b = xp.where(k_eff > 0, eps / xp.where(k_eff > 0, k_eff, 1.0), 0.0)
        a = 1.0 - eps
    return a, b


def _times(xp, c, x, finite=False):
    """c * x with 0 wherever c == 0, also where x is infinite (0 * log 0 = 0); ``finite``: x is known finite."""
    if isinstance(c, float):
        return x if c == 1 else c * x if c != 0 else xp.zeros_like(x)
    return c * x if finite else c * xp.where(c == 0, 0.0, x)


def _minus_times(xp, acc, c, x, finite):
    """acc - c * x, in place on ``acc`` (a buffer of ours) where the library allows; as :func:`_times`."""
    if isinstance(c, float):
        return acc if c == 0 else _ops.isub(acc, x) if c == 1 else _ops.isub_product(acc, c, x)
    return _ops.isub_product(acc, c, x) if finite else acc - _times(xp, c, x)


def forward(xp, cfg: Config, logits, target, weight=None, where=None, g=None, grad_out=None):
    """Loss (reduced as ``cfg.reduction``) and the residuals for :func:`backward`.

    The per-position terms are independent, so eager NumPy and PyTorch evaluate
    them on blocks of positions that stay in cache (``_ops.by_blocks``); the
    reduction then needs only per-position values.

    With ``g``, the cotangent (eager NumPy and PyTorch only: the fused path of
    ``value_and_grad``), the gradient is computed in the same pass, from the
    exponentials the loss needs, and returned third: ``(loss, residuals, dlogits)``.
    The reduction's factor is known before the pass (the "mean" denominator
    comes from the targets), so nothing is recomputed.  ``grad_out`` (eager, with
    ``g``; a buffer of the logits' shape in their compute dtype) receives that
    gradient instead of a fresh buffer.
    """
    ax = cfg.axis
    dt = compute_dtype(xp, logits.dtype)
    wv = None if weight is None else xp.astype(weight, dt, copy=False)
    valid = _valid(xp, cfg, target, where)
    y = w_y = None
    if not cfg.soft:
        y = xp.expand_dims(target if valid is None else _ops.where0(xp, valid, target), axis=ax)
        if wv is not None:
            w_y = _ops.take_classes(xp, wv, y)  # the target's class weight, keepdims
    if valid is not None:
        valid = xp.expand_dims(valid, axis=ax)
    scale, d = _reduction_factor(xp, cfg, logits, valid, w_y, dt)

    if g is None:

        def terms(logits, target, y, w_y, out=None):
            return _position_terms(xp, cfg, logits, target, y, wv, w_y, out=out)

        blocks, out_dtype = (logits, target if cfg.soft else None, y, w_y), None
    else:
        g = _cotangent(xp, cfg, g, dt)
        gs = g * scale if isinstance(scale, float) or not isinstance(g, float) or g != 1 else scale

        def terms(logits, target, y, w_y, gs, out=None):
            return _position_terms(xp, cfg, logits, target, y, wv, w_y, gs, out)

        blocks, out_dtype = (logits, target if cfg.soft else None, y, w_y, gs), logits.dtype
    parts = _ops.by_blocks(
        xp, terms, blocks, blocked=ax != 0, out_dtype=out_dtype, first_is_block=g is not None, out=grad_out
    )
    dz, (loss, lse, coef, a_res, b, masked, lse_out) = (parts[0], parts[1:]) if g is not None else (None, parts)

    # Reduction.  Ignored positions are zeroed with `where` (never 0 * inf); eager with the row sums
    # checked finite (every logit finite, so every loss term), by a product: one cheap operation,
    # for "sum"/"mean" the product with the reduction's factor (0 where ignored), which also divides.
    res = Residuals(lse, coef, a_res, b, scale, y, masked, lse_out)
    finite = not masked and (cfg.eps > 0 or cfg.soft) and _ops.can_branch(loss)
    if valid is not None and finite and cfg.reduction != "none" and not isinstance(scale, float):
        return _result(xp, xp.sum(loss * scale), logits, res, dz)
    if valid is not None:
        loss = loss * xp.astype(valid, loss.dtype) if finite else xp.where(valid, loss, 0.0)
    if cfg.reduction == "none":
        out = xp.squeeze(loss, axis=ax)
    elif cfg.reduction == "sum" or (isinstance(d, float) and d == 1):
        out = xp.sum(loss)
    elif isinstance(d, float):  # the denominator known in Python
        if d == 0:  # a mean over nothing
            out = xp.zeros((), dtype=dt, device=_ops.device(loss))
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


def _reduction_factor(xp, cfg: Config, logits, valid, w_y, dt):
    """``(scale, d)``: the factor of each position's loss in the reduced loss, and the mean's
    denominator (1.0 for "none"/"sum"); from the targets alone, before any pass over the logits.
    ``w_y``: the target's class weight per position (index targets with class weights), else None."""
    vm = 1.0 if valid is None else xp.astype(valid, dt)
    if cfg.reduction != "mean":
        return vm, 1.0
    if valid is None and w_y is None:  # every position counts once
        n = math.prod(logits.shape[: cfg.axis]) * math.prod(logits.shape[cfg.axis + 1 :])
        return (1.0 / n, float(n)) if n else (0.0, 0.0)  # a mean over nothing is 0
    if w_y is None:
        d = xp.sum(vm)
    else:
        d = xp.sum(w_y if valid is None else vm * w_y)
    if _ops.can_branch(d):
        d = float(d)
    if isinstance(d, float):
        return (vm / d if d != 0 else 0.0), d
    nothing = d == 0
    return xp.where(nothing, 0.0, vm / xp.where(nothing, 1.0, d)), d


def _cotangent(xp, cfg: Config, g, dt):
    """The cotangent as a Python number (0-d, readable) or an array that broadcasts against the residuals."""
    g = _ops.number(g)  # a 0-d cotangent on the CPU: Python arithmetic, fewer array operations
    g = xp.astype(g, dt, copy=False) if hasattr(g, "dtype") else g
    if cfg.reduction == "none" and hasattr(g, "shape"):
        g = xp.expand_dims(g, axis=cfg.axis)
    return g


def _position_terms(xp, cfg: Config, logits, target, y, wv, w_y, gs=None, out=None):
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
    ax = cfg.axis
    dt = compute_dtype(xp, logits.dtype)
    eager = _ops.can_branch(logits)
    z = _shift_input(xp, cfg, logits)
    w = None if wv is None else _along(xp, wv, ax, z.ndim)
    if cfg.soft:
        t = xp.astype(target, dt, copy=False)
        wt = t if w is None else w * t

    # Eager, -inf logits are looked for (in the row maxima, then in the row sums that the smoothing
    # and soft targets need anyway); traced, their handling is always in the graph (fused there).
    # Eager with row sums to take (smoothing, soft targets), a -inf row maximum shows in them as NaN:
    # one check of the sums covers both.
    m = xp.max(z, axis=ax, keepdims=True)
    if m.dtype != dt:
        m = xp.astype(m, dt)  # the maximum of half-precision values is exact in float32
    row_sums = cfg.eps > 0 or cfg.soft
    masked = not eager or (not row_sums and not _ops.all_finite(xp, m))
    if masked:
        m = xp.where(m == -xp.inf, 0.0, m)  # a row of -inf only
    zs = _ops.subtract(xp, z, m, out)  # shifted logits: a buffer of ours, exponentiated in place below

    # Row sums of the shifted logits (sum_c w_c zs_c over the classes in play,
    # sum_c w_c t_c zs_c for soft targets), taken before zs is overwritten.
    smooth_sum = target_sum = None
    if not eager and (cfg.eps > 0 or cfg.soft):
        # Traced: the sums over all classes, of the logits themselves (a consumer of z of their own, so
        # that XLA fuses them into one pass; every variant with the shift inside these sums was slower on
        # XLA's CPU backend), then shifted by the row max.  The masked sums only where they come out non-finite,
        # i.e. where a logit is -inf (a lax.cond under jax.jit).  Unshifted, the smoothing sum
        # sum_c w_c z_c loses about K * 2**-24 * |z| in float32: relative 1e-6 to 1e-5 of the loss for
        # logits around 1e3 to 1e4, like optax's mean(z) (docs/what-it-computes.md).

        def plain():
            k = float(z.shape[ax])
            s_w = k * xp.ones_like(m) if w is None else xp.sum(w) * xp.ones_like(m)
            out = [k * xp.ones_like(m), s_w]
            if cfg.eps > 0:
                out.append(_ops.row_dot(xp, z, w, ax) - s_w * m)
            if cfg.soft:
                out.append(_ops.row_dot(xp, z, wt, ax) - xp.sum(wt, axis=ax, keepdims=True) * m)
            return tuple(out)

        def general():
            fin = z > -xp.inf
            zf = xp.where(fin, z - m, 0.0)
            terms = [xp.astype(fin, dt)] + ([] if w is None else [xp.where(fin, w, 0.0)])
            if cfg.eps > 0:
                terms.append(zf if w is None else w * zf)
            if cfg.soft:
                terms.append(_times(xp, wt, zf))
            sums = _ops.row_sums(xp, terms, ax)  # one pass (under JAX: a reduction of several operands)
            return (sums[0], *sums) if w is None else tuple(sums)

        sums = _ops.cond_finite(xp, z, plain, general)
        k_eff, s_w = sums[0], sums[1]
        smooth_sum = sums[2] if cfg.eps > 0 else None
        target_sum = sums[-1] if cfg.soft else None
    elif eager and not masked:
        sums = []
        if cfg.eps > 0:
            smooth_sum = _ops.row_dot(xp, zs, w, ax)
            sums.append(smooth_sum)
        if cfg.soft:
            target_sum = _ops.row_dot(xp, zs, wt, ax)
            sums.append(target_sum)
        masked = bool(sums) and not _ops.all_finite(xp, *sums)  # a -inf logit somewhere
        if masked:  # the shift again, with rows of -inf only shifted by 0
            m = xp.where(m == -xp.inf, 0.0, m)
            zs = _ops.subtract(xp, z, m, out)
    if not cfg.soft:
        # the target's shifted logit: eager from zs (before it is exponentiated), one operation fewer;
        # traced from z (a gather from zs made XLA keep zs as an (N, K) buffer of its own)
        z_y = _ops.take_at(xp, zs, y, ax) if eager else _ops.take_at(xp, z, y, ax) - m
    if masked and eager:
        fin = zs > -xp.inf
        if cfg.eps > 0:
            k_eff = xp.sum(xp.astype(fin, dt), axis=ax, keepdims=True)
            zf = xp.where(fin, zs, 0.0)
            smooth_sum = xp.sum(zf if w is None else w * zf, axis=ax, keepdims=True)
            s_w = k_eff if w is None else xp.sum(xp.where(fin, w, 0.0), axis=ax, keepdims=True)
        if cfg.soft:
            target_sum = xp.sum(_times(xp, wt, zs), axis=ax, keepdims=True)
    elif eager and cfg.eps > 0:
        k_eff = float(z.shape[ax])
        s_w = k_eff if w is None else xp.sum(w)

    zs = _ops.exp_(xp, zs)  # exp(z - m), in place where the library allows
    s = _ops.row_dot(xp, zs, None, ax)
    if masked:
        empty = s == 0  # every logit -inf: lse = -inf, kept out of the arithmetic
        log_s = xp.log(xp.where(empty, 1.0, s))
    else:
        log_s = xp.log(s)  # s >= 1: the row maximum contributes exp(0)
    # the fused gradient (gs) needs the log-sum-exp only for the z-loss or to report it: one operation fewer
    lse = m + log_s if gs is None or cfg.z_loss or cfg.return_lse else None

    # loss = sum_c w_c q_c (lse - z_c) = coef * log_s - sum_c w_c q_c zs_c, with coef = sum_c w_c q_c:
    # in shifted coordinates (exact for huge logits), 0 * (-inf) = 0 (a class out of play).
    if cfg.eps > 0:
        a, b = _coefficients(xp, cfg, k_eff)
        coef, smooth = b * s_w, (b, smooth_sum, not masked)
    else:
        a, b, coef, smooth = 1.0, 0.0, 0.0, None
    if cfg.soft:
        s_wt = xp.sum(wt, axis=ax, keepdims=True)
        a_res, target_term = a, (a, target_sum, not masked)
        coef = coef + a * s_wt
    else:
        a_res = a if w_y is None else a * w_y
        target_term = (a_res, z_y, not masked and row_sums)  # then every logit is finite
        coef = coef + a_res
    loss = log_s if isinstance(coef, float) and coef == 1 else coef * log_s  # log_s is finite and ours
    for c, x, finite in (target_term, smooth) if smooth else (target_term,):
        loss = _minus_times(xp, loss, c, x, finite)
    if cfg.z_loss:
        zl = cfg.z_loss * lse * lse
        loss = loss + (xp.where(empty, xp.inf, zl) if masked else zl)
        coef = coef + 2.0 * cfg.z_loss * lse
    lse_out = None
    if cfg.return_lse:
        lse_out = xp.where(empty, -xp.inf, lse) if masked else lse
    if gs is None:
        return loss, lse, coef, a_res, b, masked, lse_out
    # zs holds exp(z - m); softmax = zs / s (rows of -inf only: zs = 0, s taken as 1)
    alpha, beta, gamma = _scaled(gs, coef, b, a_res)
    e = (zs, xp.where(empty, 1.0, s) if masked else s)
    dz = _position_grad(xp, cfg, logits, target, y, w, None, alpha, beta, gamma, masked, e=e, z=z)
    return dz, loss, lse, coef, a_res, b, masked, lse_out


def reported_lse(xp, cfg: Config, res: Residuals):
    """The log-sum-exp reported by ``return_lse``, of the positions' shape (compute dtype)."""
    return xp.squeeze(res.lse_out, axis=cfg.axis)


def backward(xp, cfg: Config, logits, target, weight, res: Residuals, g, need_target=False, g_lse=None):
    """Gradient of the loss with respect to the logits (and the soft target).

    ``g`` is the cotangent of the reduced loss: a scalar for "sum"/"mean", an
    array of the loss's shape for "none"; ``g_lse`` (optional, the positions'
    shape) that of the reported log-sum-exp, whose gradient is
    ``g_lse * softmax(z)``.  Returns ``(dlogits, dtarget)``,
    ``dtarget`` being None unless ``need_target`` and the targets are soft.
    The gradient is the one buffer of the logits' shape that is allocated;
    it is filled block by block, in place.
    """
    ax = cfg.axis
    dt = compute_dtype(xp, logits.dtype)
    g = _cotangent(xp, cfg, g, dt)
    wv = None if weight is None else xp.astype(weight, dt, copy=False)
    if isinstance(res.scale, float):  # Python numbers multiplied first
        alpha, beta, gamma = (
            g * (res.scale * v) if isinstance(v, float) else g * res.scale * v for v in (res.coef, res.b, res.a)
        )
    else:
        alpha, beta, gamma = _scaled(g * res.scale, res.coef, res.b, res.a)
    if g_lse is not None:
        alpha = alpha + xp.expand_dims(xp.astype(g_lse, dt, copy=False), axis=ax)

    w = None if wv is None else _along(xp, wv, ax, logits.ndim)

    def grad(logits, target, y, lse, alpha, beta, gamma, out=None):
        return _position_grad(xp, cfg, logits, target, y, w, lse, alpha, beta, gamma, res.masked, out=out)

    blocks = (logits, target if cfg.soft else None, res.y, res.lse, alpha, beta, gamma)
    dz = _ops.by_blocks(xp, grad, blocks, blocked=ax != 0, out_dtype=logits.dtype)
    dtarget = None
    if need_target and cfg.soft:
        z = capped_logits(xp, cfg, logits)
        lp = xp.where(z > -xp.inf, z - res.lse, 0.0)
        dtarget = -gamma * (lp if wv is None else lp * _along(xp, wv, ax, z.ndim))
    return dz, dtarget


def _scaled(c, coef, b, a):
    """alpha, beta, gamma = c * (coef, b, a): the factors of softmax, of the smoothing mass and of the target."""
    return c * coef, c * b, c * a


def _position_grad(xp, cfg: Config, logits, target, y, w, lse, alpha, beta, gamma, masked, e=None, z=None, out=None):
    """alpha * softmax(z) - beta * w (on the classes in play) - gamma * (w * t or the one-hot), for a block.

    ``w`` is the class weights shaped to broadcast along the class axis, or None.
    ``out``, if given (eager; a buffer of the block's shape in the compute dtype), receives the result.

    ``e = (exp(z - m), s)``, if given, is the forward's buffer of exponentials (overwritten)
    and its row sums: alpha * softmax = exp(z - m) * (alpha / s) without a second
    exponential.
    """
    ax = cfg.axis
    dt = compute_dtype(xp, logits.dtype)
    z = _shift_input(xp, cfg, logits) if z is None else z
    if e is None:
        dz = _ops.exp_(xp, _ops.subtract(xp, z, lse, out))  # softmax, in a buffer of ours (compute dtype)
        dz = _ops.imul(dz, alpha)
    else:
        dz = _ops.imul_ratio(e[0], alpha, e[1])
    if cfg.eps > 0:
        wf = w
        if masked:
            fin = z > -xp.inf
            wf = xp.astype(fin, dt) if w is None else xp.where(fin, w, 0.0)
        dz = _ops.isub(dz, beta) if wf is None else _ops.isub_product(dz, beta, wf)
    if cfg.soft:
        t = xp.astype(target, dt, copy=False)
        dz = _ops.isub(dz, gamma * (t if w is None else w * t))
    else:
        dz = _ops.isub_at(xp, dz, y, gamma, ax)
    if cfg.softcap is not None:  # d(s tanh(x/s))/dx = 1 - tanh(x/s)^2, which is 0 at x = -inf
        u = xp.tanh(xp.astype(logits, dt) / cfg.softcap)
        dz = _ops.imul(dz, 1.0 - u * u)
    return dz
