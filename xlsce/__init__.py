"""xlsce: one label-smoothing cross-entropy for NumPy, JAX, PyTorch and any array-API library.

The public API lives in this module: :func:`cross_entropy`, :func:`value_and_grad`,
:class:`CrossEntropyLoss`, :func:`linear_cross_entropy` and :func:`linear_value_and_grad`;
``xlsce.torch.CrossEntropyLoss`` is an ``nn.Module`` drop-in for ``torch.nn.CrossEntropyLoss``.

The modules, in the direction of their imports (no cycles; ``tests/test_backends.py``)::

    xlsce/__init__.py        the public API
    xlsce/_checks.py         validation: every argument, before any computation
    xlsce/backends/          one small backend per framework, chosen once per call by the arrays' types
        __init__.py          the choice (the one module that imports array-api-compat)
        generic.py           the array API standard: array-api-strict, CuPy, Dask, any library
        numpy.py             NumPy's in-place primitives and bound reductions
        torch.py             PyTorch's primitives and its autograd.Functions
        jax.py               JAX's primitives and its custom_vjp / custom_jvp
    xlsce/_math.py           the loss and its analytic gradient, once, against the array API
    xlsce/_linear.py         the chunked linear + cross-entropy, once
    xlsce/_types.py          the static configuration and the residuals
    xlsce/torch.py           the torch.nn.Module
"""

from __future__ import annotations

import importlib

from . import _checks

__all__ = ["cross_entropy", "value_and_grad", "CrossEntropyLoss", "linear_cross_entropy", "linear_value_and_grad"]
__version__ = "0.1.0"


def cross_entropy(
    logits,
    target,
    /,
    *,
    label_smoothing=0.0,
    smoothing="uniform",
    weight=None,
    ignore_index=-100,
    where=None,
    reduction="mean",
    axis=-1,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    r"""Softmax cross-entropy with label smoothing, class weights and masking.

    For one position with logits :math:`z \in \mathbb{R}^K` (along ``axis``),
    target distribution :math:`t` (the one-hot of a class index :math:`y`, or
    given probabilities) and class weights :math:`w` (ones by default),

    .. math::

        \ell = -\sum_c w_c\, q_c \log \operatorname{softmax}(z)_c
               + \zeta\, (\log \textstyle\sum_c e^{z_c})^2,
        \qquad q = a\, t + b\, \mathbf{1}_F,

    where :math:`F` is the set of classes in play (finite logits, :math:`K' = |F|`),
    :math:`\zeta` is ``z_loss`` and, for :math:`\varepsilon` = ``label_smoothing``,

    * ``smoothing="uniform"``: :math:`a = 1-\varepsilon,\ b = \varepsilon/K'`, i.e.
      :math:`q = (1-\varepsilon)\,t + \varepsilon/K'` (PyTorch, optax, Keras);
    * ``smoothing="exclusive"``: :math:`b = \varepsilon/(K'-1),\ a = 1-\varepsilon-b`, i.e.
      :math:`1-\varepsilon` on the target and :math:`\varepsilon/(K'-1)` on every other class
      in play (fairseq, Megatron, T5X); with a single class in play, :math:`q = t`.
      Exclusive at :math:`\varepsilon` equals uniform at :math:`\varepsilon K'/(K'-1)`; for
      probability targets it is :math:`(1-\varepsilon)\,t + \varepsilon (1-t)/(K'-1)`.

    With every logit finite (the usual case) :math:`K' = K`.

    Reductions follow PyTorch: ``"none"`` returns :math:`\ell_i m_i` (shape of the
    positions), ``"sum"`` :math:`\sum_i m_i \ell_i`, and ``"mean"`` divides that sum by
    :math:`\sum_i m_i w_{y_i}` for class indices and by :math:`\sum_i m_i` for
    probabilities, with :math:`m_i = 0` at ignored or masked positions.  A mean
    over nothing (every position ignored, or a zero denominator) is 0 with a zero
    gradient, where PyTorch returns NaN.

    The gradient is :math:`\partial\ell/\partial z = (\sum_c w_c q_c + 2\zeta\,\mathrm{lse})\,
    \operatorname{softmax}(z) - w \odot q`; on PyTorch and JAX autograd runs that
    analytic backward and keeps only O(N) values besides the logits (on PyTorch, eager logits of
    at most 2**16 elements keep their gradient from the forward pass instead: fewer operations).
    Second derivatives: on JAX (``jax.hessian``, grad of grad, Hessian-vector products) the
    analytic backward is differentiated together with the forward's residuals (the log-sum-exp),
    which gives the loss's Hessian.  On PyTorch that backward gives first derivatives only:
    differentiating the gradient (``create_graph=True``, then grad again) raises a RuntimeError
    that says so, rather than returning a wrong Hessian.

    Args:
      logits: floating array of any array-API library, classes along ``axis``.
        float16/bfloat16 are computed in float32; the loss comes back in the
        logits' dtype.  A logit of ``-inf`` takes a class out of play: it gets
        no smoothing mass and no gradient.
      target: integer class indices with the logits' shape without ``axis``, or
        floating class probabilities with the logits' shape.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, a Python float.
      smoothing: ``"uniform"`` or ``"exclusive"`` (needs at least 2 classes).
      weight: optional array of shape ``(K,)``, a weight per class.
      ignore_index: class index whose positions are ignored (index targets only;
        ``None`` for none).
      where: optional boolean array of the positions' shape; False positions are
        ignored (the jit-friendly mask).
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      axis: the class axis (PyTorch's layout is ``axis=1``).
      z_loss: :math:`\zeta \ge 0`, weight of the :math:`\mathrm{lse}^2` term (PaLM).
      softcap: optional :math:`s > 0`: logits are first mapped to
        :math:`s \tanh(z/s)` (Gemma 2).
      return_lse: also return the per-position log-sum-exp :math:`\mathrm{lse}_i`
        (of the capped logits; :math:`-\infty` where every logit is :math:`-\infty`),
        e.g. to log the z-loss :math:`\zeta\,\mathrm{lse}^2` as Liger's ``return_z_loss``
        or Cut Cross-Entropy's ``return_lse`` do.  It is differentiable: its gradient
        :math:`\mathrm{softmax}(z)` joins the loss's in the same analytic backward.

    Returns:
      The loss: a scalar for ``"sum"``/``"mean"``, the positions' shape for ``"none"``;
      with ``return_lse=True`` the pair ``(loss, lse)``, ``lse`` of the positions' shape.

    Raises:
      TypeError, ValueError: on bad input, before any computation.  Class indices
        out of range are detected on eager arrays only (not under ``jax.jit`` or
        ``torch.compile``).

    Example:
      >>> import numpy as np
      >>> import xlsce
      >>> logits = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
      >>> target = np.array([0, 2])
      >>> float(xlsce.cross_entropy(logits, target))  # log(1 + e^-1 + e^-2)
      0.40760596444...
      >>> float(xlsce.cross_entropy(logits, target, label_smoothing=0.3))
      0.70760596444...

    References:
      Szegedy et al., `Rethinking the Inception Architecture for Computer Vision
      <https://arxiv.org/abs/1512.00567>`_, 2016 (label smoothing);
      Müller et al., `When Does Label Smoothing Help? <https://arxiv.org/abs/1906.02629>`_, 2019;
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022 (z-loss);
      Gemma Team, `Gemma 2 <https://arxiv.org/abs/2408.00118>`_, 2024 (soft-capping).
    """
    ops, cfg = _checks.validate(
        logits,
        target,
        weight,
        where,
        label_smoothing=label_smoothing,
        smoothing=smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        axis=axis,
        z_loss=z_loss,
        softcap=softcap,
        return_lse=return_lse,
    )
    return ops.loss(cfg, logits, target, weight, where)


def value_and_grad(
    logits,
    target,
    /,
    *,
    cotangent=None,
    label_smoothing=0.0,
    smoothing="uniform",
    weight=None,
    ignore_index=-100,
    where=None,
    reduction="mean",
    axis=-1,
    z_loss=0.0,
    softcap=None,
):
    r"""The loss of :func:`cross_entropy` and its gradient with respect to the logits.

    The gradient comes from the analytic backward, in the inputs' own library,
    so NumPy and array-api-strict users get gradients too:

    .. math::

        \frac{\partial \ell_i}{\partial z_i}
          = \Big(\sum_c w_c q_{ic} + 2\zeta\,\mathrm{lse}_i\Big)\operatorname{softmax}(z_i) - w \odot q_i,

    times the reduction's factor (:math:`m_i`, or :math:`m_i / D` for ``"mean"``)
    and the cotangent.

    Args:
      logits, target: as in :func:`cross_entropy`.
      cotangent: the cotangent of the reduced loss (default 1; for
        ``reduction="none"`` an array of the loss's shape, default ones), so
        that the result is the vector-Jacobian product.
      **keywords: the keywords of :func:`cross_entropy`.

    Returns:
      ``(loss, grad)`` with ``grad`` of the logits' shape and dtype.

    Example:
      >>> import numpy as np
      >>> import xlsce
      >>> logits = np.array([[2.0, 1.0, 0.0]])
      >>> loss, grad = xlsce.value_and_grad(logits, np.array([0]), label_smoothing=0.3)
      >>> np.round(grad, 4)  # softmax(z) - (0.8, 0.1, 0.1)
      array([[-0.1348,  0.1447, -0.01  ]])

    References:
      Goodfellow, Bengio and Courville, `Deep Learning <https://www.deeplearningbook.org/>`_,
      section 6.2.2.3 (the softmax cross-entropy gradient); PyTorch's
      ``nll_loss``/``log_softmax`` backward in ``aten/src/ATen/native/LossNLL.cpp``.
    """
    ops, cfg = _checks.validate(
        logits,
        target,
        weight,
        where,
        label_smoothing=label_smoothing,
        smoothing=smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        axis=axis,
        z_loss=z_loss,
        softcap=softcap,
    )
    positions = tuple(s for i, s in enumerate(logits.shape) if i != cfg.axis)
    cotangent = _checks.check_cotangent(cotangent, cfg.reduction, positions)
    return ops.value_and_grad(cfg, logits, target, weight, where, cotangent)


def linear_cross_entropy(
    hidden,
    classifier,
    target,
    /,
    *,
    bias=None,
    chunk_size=None,
    label_smoothing=0.0,
    smoothing="uniform",
    weight=None,
    ignore_index=-100,
    where=None,
    reduction="mean",
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    r"""Cross-entropy of a linear classifier, without ever building the full logits.

    The value and gradients are those of

    .. math::

        \operatorname{cross\_entropy}(h W^\top + b,\ y,\ \text{axis}=-1,\ \dots),

    for ``hidden`` :math:`h` of shape ``(..., H)``, ``classifier`` :math:`W` of shape
    ``(V, H)`` and ``bias`` :math:`b` of shape ``(V,)``, but the positions are processed
    in chunks of ``chunk_size`` rows, so that at most ``chunk_size x V`` logits exist at
    a time.  For ``"sum"``/``"mean"`` the gradients
    :math:`\partial_h = G W,\ \partial_W = G^\top h,\ \partial_b = \sum_i G_i` (with
    :math:`G` the gradient for the logits, see :func:`cross_entropy`) are accumulated
    chunk by chunk during the forward pass and only scaled by the cotangent in the
    backward; for ``"none"`` the backward recomputes each chunk.  Gradients flow
    through torch autograd and ``jax.grad``; on JAX the chunks run in one
    ``lax.scan``, so the compiled graph does not grow with the number of chunks.
    :func:`linear_value_and_grad` gives the same gradients on every library.  Second
    derivatives are as for :func:`cross_entropy`: the Hessian on JAX, a RuntimeError that
    says so on PyTorch.

    The matrix products run in the inputs' dtype; the softmax math in float32
    (float64 for float64 inputs), as in :func:`cross_entropy`.

    Args:
      hidden: floating array of shape ``(..., H)``.
      classifier: array of shape ``(V, H)`` and the dtype of ``hidden``.
      target: integer class indices of shape ``hidden.shape[:-1]`` (probability
        targets are not supported: they would be as large as the logits).
      bias: optional array of shape ``(V,)`` and the dtype of ``hidden``.
      chunk_size: rows per chunk.  Default: at most 64 MiB of float32 logits per
        chunk, ``C_max = max(1, 2**26 // (4 V))`` (``8 V`` for float64), with the
        positions split into ``ceil(N / C_max)`` chunks of equal size.
      label_smoothing, smoothing, weight, ignore_index, where, reduction, z_loss, softcap: as in
        :func:`cross_entropy` (the class axis is the last one).
      return_lse: also return the per-position log-sum-exp of the (capped) logits,
        collected chunk by chunk, as :func:`cross_entropy` does (for logging the
        z-loss ``z_loss * lse**2``).  It is differentiable; since the gradients
        for "sum"/"mean" are accumulated during the forward pass for the loss
        alone, a backward that receives a nonzero lse cotangent recomputes the
        chunks (one more pass; a detached or unused lse costs nothing).

    Returns:
      The loss, in the dtype of ``hidden``: a scalar for ``"sum"``/``"mean"``,
      ``hidden.shape[:-1]`` for ``"none"``; with ``return_lse=True`` the pair
      ``(loss, lse)``, ``lse`` of shape ``hidden.shape[:-1]``.

    Example:
      >>> import numpy as np
      >>> import xlsce
      >>> rng = np.random.default_rng(0)
      >>> hidden, classifier = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
      >>> target = np.array([0, 6, 2, 2, 1])
      >>> loss = xlsce.linear_cross_entropy(hidden, classifier, target, chunk_size=2, label_smoothing=0.1)
      >>> bool(np.isclose(loss, xlsce.cross_entropy(hidden @ classifier.T, target, label_smoothing=0.1)))
      True

    References:
      Hsu et al., `Liger Kernel: Efficient Triton Kernels for LLM Training
      <https://arxiv.org/abs/2410.10989>`_, 2024 (fused linear cross-entropy);
      Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
      <https://arxiv.org/abs/2411.09009>`_, 2024 (Cut Cross-Entropy).
    """
    ops, cfg, chunk = _checks.validate_linear(
        hidden,
        classifier,
        bias,
        target,
        weight,
        where,
        chunk_size=chunk_size,
        label_smoothing=label_smoothing,
        smoothing=smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        z_loss=z_loss,
        softcap=softcap,
        return_lse=return_lse,
    )
    return ops.linear_loss(cfg, chunk, hidden, classifier, bias, target, weight, where)


def linear_value_and_grad(hidden, classifier, target, /, *, cotangent=None, bias=None, chunk_size=None, **keywords):
    r"""The loss of :func:`linear_cross_entropy` and its gradients, on any array library.

    Returns ``(loss, (dhidden, dclassifier, dbias))``, the vector-Jacobian product
    for ``cotangent`` (default 1; for ``reduction="none"`` an array of
    ``hidden.shape[:-1]``, default ones), computed chunk by chunk from the analytic
    gradient without recording autodiff; ``dbias`` is None without ``bias``.

    Example:
      >>> import numpy as np
      >>> import xlsce
      >>> hidden, classifier = np.ones((2, 3)), np.zeros((4, 3))
      >>> loss, (dh, dw, db) = xlsce.linear_value_and_grad(hidden, classifier, np.array([0, 1]), bias=np.zeros(4))
      >>> round(float(loss), 6), db  # log 4; softmax(0) - onehot, averaged
      (1.386294, array([-0.25, -0.25,  0.25,  0.25]))
    """
    unknown = set(keywords) - (_KEYWORDS - {"axis"})
    if unknown:
        raise TypeError(f"unknown keywords {sorted(unknown)}")
    weight, where = keywords.pop("weight", None), keywords.pop("where", None)
    settings = {"label_smoothing": 0.0, "smoothing": "uniform", "ignore_index": -100, "reduction": "mean"}
    settings.update(keywords)
    ops, cfg, chunk = _checks.validate_linear(
        hidden, classifier, bias, target, weight, where, chunk_size=chunk_size, **settings
    )
    cotangent = _checks.check_cotangent(cotangent, cfg.reduction, tuple(target.shape))
    need = (True, True, bias is not None)
    return ops.linear_value_and_grads(
        cfg, chunk, hidden, classifier, bias, target, weight, where, need=need, cotangent=cotangent
    )


class CrossEntropyLoss:
    r"""A configured :func:`cross_entropy`: ``loss_fn(logits, target)`` on any backend.

    Computes :math:`\ell = -\sum_c w_c q_c \log\operatorname{softmax}(z)_c + \zeta\,\mathrm{lse}^2`
    with the smoothed target :math:`q` of :func:`cross_entropy`, reduced as configured.
    The keywords are those of :func:`cross_entropy` and are validated when the
    loss is called.  For a ``torch.nn.Module`` see ``xlsce.torch.CrossEntropyLoss``.

    Example:
      >>> import numpy as np
      >>> import xlsce
      >>> loss_fn = xlsce.CrossEntropyLoss(label_smoothing=0.1, smoothing="exclusive")
      >>> round(float(loss_fn(np.array([[0.0, 0.0]]), np.array([1]))), 6)  # log 2
      0.693147

    References:
      Modelled on ``torch.nn.CrossEntropyLoss`` and optax's loss functions
      (``optax/losses/_classification.py``).
    """

    def __init__(self, **keywords):
        unknown = set(keywords) - _KEYWORDS
        if unknown:
            raise TypeError(f"unknown keywords {sorted(unknown)}; expected some of {sorted(_KEYWORDS)}")
        self.keywords = keywords

    def __call__(self, logits, target, /):
        return cross_entropy(logits, target, **self.keywords)

    def value_and_grad(self, logits, target, /, *, cotangent=None):
        """:func:`value_and_grad` with this loss's keywords."""
        return value_and_grad(logits, target, cotangent=cotangent, **self.keywords)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.keywords.items())
        return f"xlsce.CrossEntropyLoss({args})"


_KEYWORDS = {
    "label_smoothing",
    "smoothing",
    "weight",
    "ignore_index",
    "where",
    "reduction",
    "axis",
    "z_loss",
    "softcap",
}


def __getattr__(name):
    # `xlsce.torch` is imported on first use, so `import xlsce` never imports torch.
    if name == "torch":
        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'xlsce' has no attribute {name!r}")
