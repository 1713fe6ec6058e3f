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
residuals are a handful of per-position vectors.
"""

from __future__ import annotations

from typing import NamedTuple

from array_api_compat import device as _device


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


class Residuals(NamedTuple):
    """What the backward needs besides the inputs: O(N), shaped like the loss with keepdims."""

    lse: object  # log-sum-exp, with -inf rows replaced by 0
    coef: object  # sum_c w_c q_c + 2 zeta lse: the factor of softmax(z)
    a: object  # a * w[y] (index targets) or a (probability targets)
    b: object  # smoothing mass per class in play
    scale: object  # reduction factor per position (0 where ignored)
    y: object  # class index with ignored positions set to 0, keepdims (index targets)


def compute_dtype(xp, dtype):
    """float64 stays float64; every other floating dtype is computed in float32."""
    return xp.float64 if dtype == xp.float64 else xp.float32


def capped_logits(xp, cfg: Config, logits):
    """The logits in the compute dtype, soft-capped if asked."""
    z = logits
    dt = compute_dtype(xp, z.dtype)
    if z.dtype != dt:
        z = xp.astype(z, dt)
    if cfg.softcap is not None:
        z = cfg.softcap * xp.tanh(z / cfg.softcap)
    return z


def _along(xp, v, axis, ndim):
    """A (K,) vector reshaped to broadcast along ``axis`` of an ``ndim`` array."""
    return xp.reshape(v, tuple(-1 if i == axis else 1 for i in range(ndim)))


def _valid(xp, cfg: Config, target, where):
    """Boolean of the positions that count (keepdims), or None when all do."""
    valid = None
    if not cfg.soft and cfg.ignore_index is not None:
        info = xp.iinfo(target.dtype)
        if info.min <= cfg.ignore_index <= info.max:
            valid = target != cfg.ignore_index
    if where is not None:
        valid = where if valid is None else xp.logical_and(valid, where)
    if valid is not None:
        valid = xp.expand_dims(valid, axis=cfg.axis)
    return valid


def _coefficients(xp, cfg: Config, k_eff):
    """Smoothing coefficients (a, b) for the number of classes in play."""
    eps = cfg.eps
    if cfg.exclusive:
        several = k_eff > 1
        b = xp.where(several, eps / xp.where(several, k_eff - 1, 1.0), 0.0)
        a = xp.where(several, 1.0 - eps - b, 1.0)
    else:
        b = xp.where(k_eff > 0, eps / xp.where(k_eff > 0, k_eff, 1.0), 0.0)
        a = 1.0 - eps
    return a, b


def _times(xp, c, x):
    """c * x with 0 wherever c == 0, also where x is infinite (0 * log 0 = 0)."""
    if isinstance(c, float):
        return c * x if c != 0 else xp.zeros_like(x)
    return c * xp.where(c == 0, 0.0, x)


def forward(xp, cfg: Config, logits, target, weight=None, where=None):
    """Loss (reduced as ``cfg.reduction``) and the residuals for :func:`backward`."""
    ax = cfg.axis
    z = capped_logits(xp, cfg, logits)
    dt = z.dtype
    w = None if weight is None else _along(xp, xp.astype(weight, dt), ax, z.ndim)
    valid = _valid(xp, cfg, target, where)

    # log-sum-exp shifted by the row max; a row of -inf only keeps lse = -inf.
    m = xp.max(z, axis=ax, keepdims=True)
    m = xp.where(m == -xp.inf, 0.0, m)
    zs = z - m
    s = xp.sum(xp.exp(zs), axis=ax, keepdims=True)
    empty = s == 0  # every logit -inf: lse = -inf, kept out of the arithmetic
    log_s = xp.log(xp.where(empty, 1.0, s))
    lse_safe = m + log_s

    # Smoothing: sums over the classes in play.
    if cfg.eps > 0:
        fin = z > -xp.inf
        k_eff = xp.sum(xp.astype(fin, dt), axis=ax, keepdims=True)
        zf = xp.where(fin, zs, 0.0)
        if w is None:
            s_wz, s_w = xp.sum(zf, axis=ax, keepdims=True), k_eff
        else:
            s_wz = xp.sum(w * zf, axis=ax, keepdims=True)
            s_w = xp.sum(xp.where(fin, w, 0.0), axis=ax, keepdims=True)
        a, b = _coefficients(xp, cfg, k_eff)
        # sum_{c in F} w_c lp_c, in shifted coordinates (exact for huge logits)
        smooth = _times(xp, b, s_wz - log_s * s_w)
        coef = b * s_w
    else:
        a, b, smooth, coef = 1.0, 0.0, 0.0, 0.0

    if cfg.soft:
        t = xp.astype(target, dt)
        wt = t if w is None else w * t
        lp = zs - log_s
        term = xp.sum(_times(xp, wt, lp), axis=ax, keepdims=True)
        target_part = a * term
        coef = coef + a * xp.sum(wt, axis=ax, keepdims=True)
        a_res, y = a, None
    else:
        y = target if valid is None else xp.where(xp.squeeze(valid, axis=ax), target, 0)
        y = xp.expand_dims(y, axis=ax)
        z_y = xp.take_along_axis(zs, y, axis=ax)
        lp_y = xp.where(z_y == -xp.inf, -xp.inf, z_y - log_s)
        if w is None:
            a_w = a
        else:
            w_y = xp.reshape(xp.take(xp.astype(weight, dt), xp.reshape(y, (-1,)), axis=0), y.shape)
            a_w = a * w_y
        target_part = _times(xp, a_w, lp_y)
        coef = coef + a_w
        a_res = a_w

    loss = -(target_part + smooth)
    if cfg.z_loss:
        loss = loss + xp.where(empty, xp.inf, cfg.z_loss * lse_safe * lse_safe)
        coef = coef + 2.0 * cfg.z_loss * lse_safe

    # Reduction.  Ignored positions are zeroed with `where` (never 0 * inf).
    one = xp.ones_like(lse_safe)
    vm = one if valid is None else xp.astype(valid, dt)
    if valid is not None:
        loss = xp.where(valid, loss, 0.0)
    if cfg.reduction == "none":
        scale = vm
        out = xp.squeeze(loss, axis=ax)
    elif cfg.reduction == "sum":
        scale = vm
        out = xp.sum(loss)
    else:
        if cfg.soft or w is None:
            d = xp.sum(vm)
        else:
            d = xp.sum(vm * w_y)
        empty = d == 0
        d = xp.where(empty, 1.0, d)
        out = xp.where(empty, 0.0, xp.sum(loss) / d)
        scale = xp.where(empty, 0.0, vm / d)
    if out.dtype != logits.dtype:
        out = xp.astype(out, logits.dtype)
    return out, Residuals(lse_safe, coef, a_res, b, scale, y)


def backward(xp, cfg: Config, logits, target, weight, res: Residuals, g, need_target=False):
    """Gradient of the loss with respect to the logits (and the soft target).

    ``g`` is the cotangent of the reduced loss: a scalar for "sum"/"mean", an
    array of the loss's shape for "none".  Returns ``(dlogits, dtarget)``,
    ``dtarget`` being None unless ``need_target`` and the targets are soft.
    """
    ax = cfg.axis
    z = capped_logits(xp, cfg, logits)
    dt = z.dtype
    g = xp.astype(g, dt) if hasattr(g, "dtype") else g
    if cfg.reduction == "none" and hasattr(g, "shape"):
        g = xp.expand_dims(g, axis=ax)
    c = g * res.scale  # per position
    p = xp.exp(z - res.lse)
    dz = (c * res.coef) * p
    w = None if weight is None else _along(xp, xp.astype(weight, dt), ax, z.ndim)
    if cfg.soft:
        t = xp.astype(target, dt)
        wt = t if w is None else w * t
        dz = dz - (c * res.a) * wt
    else:
        k = z.shape[ax]
        classes = _along(xp, xp.arange(k, dtype=res.y.dtype, device=_device(z)), ax, z.ndim)
        dz = dz - xp.where(classes == res.y, c * res.a, 0.0)
    if cfg.eps > 0:
        fin = z > -xp.inf
        wf = xp.astype(fin, dt) if w is None else xp.where(fin, w, 0.0)
        dz = dz - (c * res.b) * wf
    if cfg.softcap is not None:
        u = z / cfg.softcap
        dz = dz * (1.0 - u * u)
    if dz.dtype != logits.dtype:
        dz = xp.astype(dz, logits.dtype)
    dtarget = None
    if need_target and cfg.soft:
        lp = xp.where(z > -xp.inf, z - res.lse, 0.0)
        dq = -(c * res.a) * lp
        dtarget = dq if w is None else dq * w
    return dz, dtarget
