"""Test problems shared by the test modules, and one central-difference helper.

* ``logits_problem``: logits, targets (class indices or probabilities), ``where``, class
  weights and a cotangent for ``cross_entropy``;
* ``linear_problem``: hidden states, classifier, bias, targets, class weights, ``where``
  and a cotangent for ``linear_cross_entropy``;
* ``central_differences``: the gradient of a scalar function of a NumPy array.

Each generator draws from ``np.random.default_rng(seed)`` in the fixed order its docstring
gives, so that a seed names one problem; it returns the generator too, for the further
draws a test makes.  Everything is NumPy; tests convert with their backend.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

EVERY_THIRD = slice(1, None, 3)  # the ignored positions, counted in the flattened positions: 1, 4, 7, ...

N, H, V = 24, 4, 9  # linear_problem's default sizes: positions, hidden size, classes


class Problem(NamedTuple):
    x: np.ndarray  # logits
    t: np.ndarray  # class indices (positions' shape) or probabilities (the logits' shape)
    weight: np.ndarray | None  # (K,)
    where: np.ndarray | None  # positions' shape, bool
    cotangent: np.ndarray | None  # positions' shape
    rng: np.random.Generator  # the generator, after the draws above


class LinearProblem(NamedTuple):
    hidden: np.ndarray  # (n, h)
    classifier: np.ndarray  # (v, h)
    bias: np.ndarray  # (v,)
    target: np.ndarray  # (n,) class indices
    weight: np.ndarray | None  # (v,)
    where: np.ndarray | None  # (n,) bool
    cotangent: np.ndarray | None  # (n,)
    rng: np.random.Generator


def positions_of(shape, axis):
    """The shape of the positions: ``shape`` without its class axis."""
    ax = axis % len(shape)
    return tuple(s for i, s in enumerate(shape) if i != ax)


def _class_indices(rng, k, positions, ignore, ignored, pin_first):
    t = rng.integers(0, k, size=positions)
    flat = t.reshape(-1)  # a view: writes go to t
    if ignore is not None:
        if isinstance(ignored, float):
            ignored = rng.random(flat.size) < ignored
        flat[list(ignored) if isinstance(ignored, tuple) else ignored] = ignore
    if pin_first:
        flat[0] = 0  # position 0 counts, so a 'mean' never divides by zero
    return t


def logits_problem(
    shape,
    axis=-1,
    *,
    seed,
    scale=1.0,
    kind="index",
    ignore=None,
    ignored=EVERY_THIRD,
    pin_first=True,
    minus_inf=False,
    where=False,
    weight=None,
    cotangent=False,
    dtype=np.float64,
):
    """A random cross_entropy problem with the classes along ``axis`` of ``shape``.

    Drawn in this order:

    1. the logits, ``normal(scale=scale)``;
    2. the targets: ``kind="index"``: class indices ``integers(0, K)``; where ``ignore`` is not
       None, the positions ``ignored`` (a slice or a tuple of indices into the flattened positions,
       or a rate: that fraction drawn at random, ``random() < ignored``) are set to ``ignore``; then, with
       ``pin_first``, position 0 is set to class 0.  ``kind="prob"``: probabilities
       ``exp(normal())`` normalised along ``axis``;
    3. with ``where``: a mask ``random() < 0.7`` with its first position kept and its last masked;
    4. with ``weight = (low, high)``: class weights ``uniform(low, high)``;
    5. with ``cotangent``: a cotangent over the positions, ``normal()``.

    ``minus_inf`` (index targets) puts class 1 out of play (a -inf logit) wherever it is not the
    target.  The floating arrays are cast to ``dtype``.
    """
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    k = shape[ax]
    positions = positions_of(shape, axis)
    x = rng.normal(scale=scale, size=shape)
    if kind == "index":
        t = _class_indices(rng, k, positions, ignore, ignored, pin_first)
        if minus_inf:
            xl = np.moveaxis(x, ax, -1)  # a view with the classes last
            xl[..., 1:2][t[..., None] != 1] = -np.inf
    elif kind == "prob":
        p = np.exp(rng.normal(size=shape))
        t = (p / p.sum(axis=ax, keepdims=True)).astype(dtype)
    else:  # pragma: no cover
        raise ValueError(kind)
    m = None
    if where:
        m = rng.random(positions) < 0.7
        m.reshape(-1)[0] = True
        m.reshape(-1)[-1] = False
    w = None if weight is None else rng.uniform(*weight, size=k).astype(dtype)
    ct = rng.normal(size=positions).astype(dtype) if cotangent else None
    return Problem(x.astype(dtype), t, w, m, ct, rng)


def linear_problem(
    seed,
    n=N,
    h=H,
    v=V,
    *,
    scale=1.0,
    ignore=-100,
    ignored=(2, 3, 11),
    pin_first=False,
    weight=(0.5, 2.0),
    where=True,
    cotangent=False,
    dtype=np.float64,
):
    """A random linear_cross_entropy problem: ``n`` positions, hidden size ``h``, ``v`` classes.

    Drawn in this order: ``hidden`` ``normal()``, ``classifier`` ``normal(scale=scale)``, ``bias``
    ``normal()``; the targets as in ``logits_problem`` (``ignore``, ``ignored``, ``pin_first``);
    with ``weight = (low, high)``: class weights ``uniform(low, high)``; with ``where``: a mask
    ``uniform() > 0.2``; with ``cotangent``: ``normal()`` over the positions.  The floating arrays
    are cast to ``dtype``.
    """
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, h)).astype(dtype)
    classifier = rng.normal(scale=scale, size=(v, h)).astype(dtype)
    bias = rng.normal(size=v).astype(dtype)
    target = _class_indices(rng, v, (n,), ignore, ignored, pin_first)
    w = None if weight is None else rng.uniform(*weight, size=v).astype(dtype)
    m = rng.uniform(size=n) > 0.2 if where else None
    ct = rng.normal(size=n).astype(dtype) if cotangent else None
    return LinearProblem(hidden, classifier, bias, target, w, m, ct, rng)


def central_differences(f, x, *, step):
    """d f / d x elementwise, ``(f(x + step e_i) - f(x - step e_i)) / (2 step)``, for a scalar ``f``.

    ``x`` is a NumPy array, left unchanged; entries that are not finite (-inf logits: classes out
    of play) are not moved, and their difference is 0.
    """
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        if not np.isfinite(x[i]):
            continue
        plus, minus = x.copy(), x.copy()
        plus[i] += step
        minus[i] -= step
        grad[i] = (f(plus) - f(minus)) / (2 * step)
    return grad
