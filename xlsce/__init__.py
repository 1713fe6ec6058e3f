"""xlsce: one label-smoothing cross-entropy for NumPy, JAX, PyTorch and any array-API library.

The public API lives in this module: :func:`cross_entropy`, :func:`value_and_grad`,
:class:`CrossEntropyLoss`, :func:`linear_cross_entropy` and :func:`linear_value_and_grad`;
``xlsce.torch.CrossEntropyLoss`` is an ``nn.Module`` drop-in for ``torch.nn.CrossEntropyLoss``.

The modules, in the direction of their imports (no cycles; ``tests/test_backends.py``)::

    xlsce/__init__.py        the public API
    xlsce/_checks.py         validation: every argument, before any computation
    xlsce/backends/          one small backend per framework, chosen once per call by the arrays' types
        __init__.py          the choice (the one module that imports array-api-compat)
        generic.py           the array API standard: array-api-strict, CuPy, any library
        numpy.py             NumPy's in-place primitives and bound reductions
        torch.py             PyTorch's primitives and its autograd.Functions
        jax.py               JAX's primitives and its custom_vjp / custom_jvp
        dask.py              the NumPy backend on each chunk of a Dask array, lazily
    xlsce/_math.py           the loss and its analytic gradient, once, against the array API
    xlsce/_linear.py         the chunked linear + cross-entropy, once
    xlsce/_types.py          the static configuration and the residuals
    xlsce/_typing.py         the annotations' names (imported only by type checkers)
    xlsce/torch.py           the torch.nn.Module
    xlsce/keras.py           the keras.losses.Loss subclasses
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, overload

from . import _checks, _math

if TYPE_CHECKING:  # the annotations' names: nothing is imported at runtime
    from typing import Any, Literal

    from typing_extensions import Unpack

    from ._typing import Array, ArrayT, CallKeywords, Keywords, LinearCallKeywords, LinearKeywords, Reduction, Smoothing

__all__ = [
    "cross_entropy",
    "value_and_grad",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "linear_value_and_grad",
    "mean_denominator",
]
__version__ = "0.1.0"


# The overloads tell a checker what comes back: the loss in the logits' array type, and a tuple when
# more is asked for (return_lse, return_token_accuracy: loss, lse, accuracy in that order).  The other keywords are those of a TypedDict (xlsce/_typing.py), so
# that a keyword added to the function is added once there (tests/test_types.py checks both agree).
@overload
def cross_entropy(
    logits: ArrayT,
    target: Array,
    /,
    *,
    return_lse: Literal[False] = ...,
    return_token_accuracy: Literal[False] = ...,
    **keywords: Unpack[CallKeywords],
) -> ArrayT: ...
@overload
def cross_entropy(
    logits: ArrayT,
    target: Array,
    /,
    *,
    return_lse: Literal[True],
    return_token_accuracy: Literal[False] = ...,
    **keywords: Unpack[CallKeywords],
) -> tuple[ArrayT, ArrayT]: ...
@overload
def cross_entropy(
    logits: ArrayT,
    target: Array,
    /,
    *,
    return_lse: Literal[False] = ...,
    return_token_accuracy: Literal[True],
    **keywords: Unpack[CallKeywords],
) -> tuple[ArrayT, ArrayT]: ...
@overload
def cross_entropy(
    logits: ArrayT,
    target: Array,
    /,
    *,
    return_lse: Literal[True],
    return_token_accuracy: Literal[True],
    **keywords: Unpack[CallKeywords],
) -> tuple[ArrayT, ArrayT, ArrayT]: ...
@overload
def cross_entropy(
    logits: ArrayT,
    target: Array,
    /,
    *,
    return_lse: bool = ...,
    return_token_accuracy: bool = ...,
    **keywords: Unpack[CallKeywords],
) -> ArrayT | tuple[ArrayT, ...]: ...


def cross_entropy(
    logits: ArrayT,
    target: Array,
    /,
    *,
    label_smoothing: float | Array = 0.0,
    smoothing: Smoothing = "uniform",
    weight: Array | None = None,
    ignore_index: int | None = -100,
    where: Array | None = None,
    reduction: Reduction = "mean",
    axis: int | tuple[int, ...] = -1,
    z_loss: float | Array = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    return_token_accuracy: bool = False,
    denominator: Array | float | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    process_group: Any = None,
) -> ArrayT | tuple[ArrayT, ...]:
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
    which gives the loss's Hessian.  Forward mode works on JAX too (``jax.jvp``, ``jax.jacfwd``,
    ``jax.test_util.check_grads`` in both modes): the derivative is a ``custom_jvp`` whose tangent
    is linear, and reverse mode transposes it, recomputing the gradient from the logits and the
    O(N) residuals (no (N, K) residual is kept).  On PyTorch that backward gives first derivatives only:
    differentiating the gradient (``create_graph=True``, then grad again) raises a RuntimeError
    that says so, rather than returning a wrong Hessian.

    Args:
      logits: floating array of any array-API library, classes along ``axis``.
        float16/bfloat16 are computed in float32; the loss comes back in the
        logits' dtype.  A logit of ``-inf`` takes a class out of play: it gets
        no smoothing mass and no gradient.
      target: integer class indices with the logits' shape without ``axis``, or
        floating class probabilities with the logits' shape.
      label_smoothing: :math:`\varepsilon \in [0, 1]`, a Python float or a 0-d floating array
        of the logits' library (e.g. traced under ``jax.jit``: a smoothing schedule without
        retracing).  An array is read, and its range checked, where its value is on the host;
        elsewhere (traced, on a GPU) it is used unchecked.  On JAX the loss is differentiable
        with respect to it (``jax.grad``, ``jax.jvp``); on PyTorch it must not require grad.
      smoothing: ``"uniform"`` or ``"exclusive"`` (needs at least 2 classes).
      weight: optional array of shape ``(K,)``, a weight per class.
      ignore_index: class index whose positions are ignored (index targets only;
        ``None`` for none).
      where: optional boolean array of the positions' shape; False positions are
        ignored (the jit-friendly mask).
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      axis: the class axis (PyTorch's layout is ``axis=1``), or a tuple of axes, as optax's: they
        are moved last (in the order given) and flattened into one class axis of their product;
        a class index is then the flat index into ``logits.shape[axis]`` (``ravel_multi_index``),
        ``weight`` has that product's length, and probability targets have the logits' shape.
      z_loss: :math:`\zeta \ge 0`, weight of the :math:`\mathrm{lse}^2` term (PaLM); a float or
        a 0-d array, as ``label_smoothing``.
      softcap: optional :math:`s > 0`: logits are first mapped to
        :math:`s \tanh(z/s)` (Gemma 2).
      return_lse: also return the per-position log-sum-exp :math:`\mathrm{lse}_i`
        (of the capped logits; :math:`-\infty` where every logit is :math:`-\infty`),
        e.g. to log the z-loss :math:`\zeta\,\mathrm{lse}^2` as Liger's ``return_z_loss``
        or Cut Cross-Entropy's ``return_lse`` do.  It is differentiable: its gradient
        :math:`\mathrm{softmax}(z)` joins the loss's in the same analytic backward.
      denominator: the mean's denominator, for a global mean under data parallelism (Hugging Face's
        ``num_items_in_batch``): a Python number or a 0-d array of the logits' library (e.g. the
        all-reduced or ``lax.psum``-ed :func:`mean_denominator` of every rank's targets).  The loss is
        then :math:`\sum_i m_i \ell_i / D` (the gradient likewise), with every per-position term divided
        by it, z-loss included; 0 where :math:`D = 0`.  Only with ``reduction="mean"`` (a ValueError
        otherwise).  An array is never read back under tracing or off the host.
      return_token_accuracy: also return the token accuracy (Liger-Kernel's
        ``return_token_accuracy``): :math:`a_i = [\operatorname{argmax}_c z_c = y_i]` at the
        positions that count (0 at ignored or masked ones), over the (capped) logits; ties go to
        the first maximum, as ``argmax``.  For ``"sum"``/``"mean"`` the fraction
        :math:`\sum_i a_i / \#\{i \text{ counted}\}` (unweighted by ``weight``; 0 when nothing
        counts), a 0-d array; for ``"none"`` the 0/1 values :math:`a_i`.  Float32 (float64 for
        float64 logits); no gradient flows through it.  Class indices only: with probability
        targets it raises ValueError.  It costs one ``argmax`` over the logits.

      axis_name: vocabulary parallelism on JAX, inside ``shard_map`` (or ``pmap``): the mesh axis (or
        tuple of axes) over which the classes are split.  ``logits`` (and ``weight``) hold this device's
        contiguous slice of the classes, the slices in axis-index order and of equal size; ``target``
        holds global class indices (or this device's slice of the probabilities).  The row maximum, the
        log-sum-exp, the smoothing sums, the number of classes in play and the target's term are
        combined with ``lax.pmax``/``lax.psum``, so the smoothing uses the global K (not Megatron's
        shard-local one); the loss comes back whole on every device, the gradient stays local.
        See ``docs/scaling-out.md``.
      process_group: the same over a ``torch.distributed`` process group, the ranks' slices in rank
        order (``all_reduce``; the backward is local: Megatron's and flash-attn's layout).
    Returns:
      The loss: a scalar for ``"sum"``/``"mean"``, the positions' shape for ``"none"``;
      with ``return_lse=True`` the pair ``(loss, lse)``, ``lse`` of the positions' shape;
      with ``return_token_accuracy=True`` the accuracy after them: ``(loss, accuracy)`` or
      ``(loss, lse, accuracy)``.

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
    if type(axis) is tuple:  # several class axes (optax): moved last and flattened
        logits, target, axis, _ = _checks.flat_classes(logits, target, axis)
    target, weight, where = _checks.same_library(logits, target, weight, where)  # NumPy beside JAX/torch
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
        return_token_accuracy=return_token_accuracy,
        axis_name=axis_name,
        process_group=process_group,
    )
    if denominator is None:
        out = ops.loss(cfg, logits, target, weight, where)
    else:
        d = _checks.check_denominator(ops, denominator, cfg.reduction)
        out = _over(ops, ops.loss(cfg._replace(reduction="sum"), logits, target, weight, where), d)
    if not cfg.return_token_accuracy:
        return out
    accuracy = ops.token_accuracy(cfg, logits, target, where)
    return (*out, accuracy) if cfg.return_lse else (out, accuracy)


def value_and_grad(
    logits: ArrayT,
    target: Array,
    /,
    *,
    cotangent: Array | float | None = None,
    label_smoothing: float | Array = 0.0,
    smoothing: Smoothing = "uniform",
    weight: Array | None = None,
    ignore_index: int | None = -100,
    where: Array | None = None,
    reduction: Reduction = "mean",
    axis: int | tuple[int, ...] = -1,
    z_loss: float | Array = 0.0,
    softcap: float | None = None,
    denominator: Array | float | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    process_group: Any = None,
) -> tuple[ArrayT, ArrayT]:
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
      denominator: the mean's global denominator, as in :func:`cross_entropy`.
      axis_name, process_group: vocabulary parallelism, as in :func:`cross_entropy` (the gradient is
        this shard's slice).
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
    restore = None
    if type(axis) is tuple:  # several class axes: the gradient comes back in the logits' layout
        logits, target, axis, restore = _checks.flat_classes(logits, target, axis)
    target, weight, where = _checks.same_library(logits, target, weight, where)  # NumPy beside JAX/torch
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
        axis_name=axis_name,
        process_group=process_group,
    )
    positions = tuple(s for i, s in enumerate(logits.shape) if i != cfg.axis)
    cotangent = _checks.check_cotangent(cotangent, cfg.reduction, positions)
    if denominator is None:
        out, grad = ops.value_and_grad(cfg, logits, target, weight, where, cotangent)
    else:
        d = _checks.check_denominator(ops, denominator, cfg.reduction)
        g = _math.divide(ops, 1.0 if cotangent is None else cotangent, d, ops.compute[logits.dtype])
        out, grad = ops.value_and_grad(cfg._replace(reduction="sum"), logits, target, weight, where, g)
        out = _over(ops, out, d)
    return out, (grad if restore is None else restore(grad))


@overload
def linear_cross_entropy(
    hidden: ArrayT,
    classifier: Array,
    target: Array,
    /,
    *,
    return_lse: Literal[False] = ...,
    return_token_accuracy: Literal[False] = ...,
    **keywords: Unpack[LinearCallKeywords],
) -> ArrayT: ...
@overload
def linear_cross_entropy(
    hidden: ArrayT,
    classifier: Array,
    target: Array,
    /,
    *,
    return_lse: Literal[True],
    return_token_accuracy: Literal[False] = ...,
    **keywords: Unpack[LinearCallKeywords],
) -> tuple[ArrayT, ArrayT]: ...
@overload
def linear_cross_entropy(
    hidden: ArrayT,
    classifier: Array,
    target: Array,
    /,
    *,
    return_lse: Literal[False] = ...,
    return_token_accuracy: Literal[True],
    **keywords: Unpack[LinearCallKeywords],
) -> tuple[ArrayT, ArrayT]: ...
@overload
def linear_cross_entropy(
    hidden: ArrayT,
    classifier: Array,
    target: Array,
    /,
    *,
    return_lse: Literal[True],
    return_token_accuracy: Literal[True],
    **keywords: Unpack[LinearCallKeywords],
) -> tuple[ArrayT, ArrayT, ArrayT]: ...
@overload
def linear_cross_entropy(
    hidden: ArrayT,
    classifier: Array,
    target: Array,
    /,
    *,
    return_lse: bool = ...,
    return_token_accuracy: bool = ...,
    **keywords: Unpack[LinearCallKeywords],
) -> ArrayT | tuple[ArrayT, ...]: ...


def linear_cross_entropy(
    hidden: ArrayT,
    classifier: Array,
    target: Array,
    /,
    *,
    bias: Array | None = None,
    chunk_size: int | None = None,
    label_smoothing: float | Array = 0.0,
    smoothing: Smoothing = "uniform",
    weight: Array | None = None,
    ignore_index: int | None = -100,
    where: Array | None = None,
    reduction: Reduction = "mean",
    z_loss: float | Array = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    return_token_accuracy: bool = False,
    denominator: Array | float | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    process_group: Any = None,
) -> ArrayT | tuple[ArrayT, ...]:
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
      denominator: the mean's global denominator, as in :func:`cross_entropy`.
      axis_name, process_group: vocabulary parallelism, as in :func:`cross_entropy`: ``classifier``
        (and ``bias``, ``weight``) hold this shard's contiguous slice of the vocabulary, ``hidden`` and
        ``target`` (global indices) the whole of it.  The gradients of the classifier and bias stay
        local; that of ``hidden`` is summed over the shards (every shard gets the gradient of the
        replicated hidden states; under ``shard_map`` where ``hidden`` is typed invariant over the
        axis, as JAX's own transpose would).
      return_lse: also return the per-position log-sum-exp of the (capped) logits,
        collected chunk by chunk, as :func:`cross_entropy` does (for logging the
        z-loss ``z_loss * lse**2``).  It is differentiable; since the gradients
        for "sum"/"mean" are accumulated during the forward pass for the loss
        alone, a backward that receives a nonzero lse cotangent recomputes the
        chunks (one more pass; a detached or unused lse costs nothing).
      return_token_accuracy: also return the token accuracy, as :func:`cross_entropy` does
        (argmax of the (capped) logits == target at the counted positions, first maximum at
        ties; the fraction for "sum"/"mean", 0 when nothing counts; 0/1 per position for
        "none"; float32, float64 for float64 inputs; not differentiable), taken chunk by chunk
        from the logits the loss builds: no extra matrix product.

    Returns:
      The loss, in the dtype of ``hidden``: a scalar for ``"sum"``/``"mean"``,
      ``hidden.shape[:-1]`` for ``"none"``; with ``return_lse=True`` the pair
      ``(loss, lse)``, ``lse`` of shape ``hidden.shape[:-1]``; with
      ``return_token_accuracy=True`` the accuracy after them.

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
    target, weight, where = _checks.same_library(hidden, target, weight, where)  # NumPy beside JAX/torch
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
        return_token_accuracy=return_token_accuracy,
        axis_name=axis_name,
        process_group=process_group,
    )
    if denominator is None:
        return ops.linear_loss(cfg, chunk, hidden, classifier, bias, target, weight, where)
    d = _checks.check_denominator(ops, denominator, cfg.reduction)
    return _over(
        ops, ops.linear_loss(cfg._replace(reduction="sum"), chunk, hidden, classifier, bias, target, weight, where), d
    )


def linear_value_and_grad(
    hidden: ArrayT,
    classifier: Array,
    target: Array,
    /,
    *,
    cotangent: Array | float | None = None,
    bias: Array | None = None,
    chunk_size: int | None = None,
    denominator: Array | float | None = None,
    **keywords: Unpack[LinearKeywords],
) -> tuple[ArrayT, tuple[ArrayT, ArrayT, ArrayT | None]]:
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
    target, weight, where = _checks.same_library(hidden, target, weight, where)
    ops, cfg, chunk = _checks.validate_linear(
        hidden, classifier, bias, target, weight, where, chunk_size=chunk_size, **settings
    )
    positions = tuple(hidden.shape[:-1]) + tuple(classifier.shape[1:-1])  # hidden.shape[:-1] + classifier.shape[1:-1]
    cotangent = _checks.check_cotangent(cotangent, cfg.reduction, positions)
    need = (True, True, bias is not None)
    d = None
    if denominator is not None:
        d = _checks.check_denominator(ops, denominator, cfg.reduction)
        dt = ops.compute[hidden.dtype]
        g = _math.divide(ops, 1.0 if cotangent is None else cotangent, d, dt)
        cotangent = g if hasattr(g, "dtype") else ops.xp.full((), g, dtype=dt, device=ops.device(hidden))
        cfg = cfg._replace(reduction="sum")
    loss, grads = ops.linear_value_and_grads(
        cfg, chunk, hidden, classifier, bias, target, weight, where, need=need, cotangent=cotangent
    )
    return (loss if d is None else _over(ops, loss, d)), grads


def mean_denominator(
    target: Array,
    /,
    *,
    weight: Array | None = None,
    ignore_index: int | None = -100,
    where: Array | None = None,
    axis: int = -1,
) -> Array:
    r"""The denominator of ``reduction="mean"`` for these targets: the count that a rank all-reduces
    to get the global mean under data parallelism.

    .. math::

        D = \sum_i m_i\, w_{y_i} \quad\text{(class indices with class weights)},\qquad
        D = \sum_i m_i \quad\text{(otherwise)},

    with :math:`m_i = 0` at positions ignored by ``ignore_index`` or masked by ``where`` (the
    denominator of :func:`cross_entropy`'s mean, also that of :func:`linear_cross_entropy`).
    When each rank or device holds some of the positions (DDP, ``shard_map`` over the batch), the
    mean of the ranks' means is not the global mean (the ranks count different numbers of
    positions); summing, over the ranks, their losses computed with ``denominator=`` the global
    :math:`D` (this function's result, summed over the ranks: ``torch.distributed.all_reduce``,
    ``jax.lax.psum``) is.  As Hugging Face's ``num_items_in_batch``.

    Args:
      target: class indices (integer), or class probabilities (floating; ``axis`` is their class axis).
      weight, ignore_index, where: as in :func:`cross_entropy` (``ignore_index`` applies to class indices).
      axis: the class axis of probability targets (ignored for class indices).

    Returns:
      A 0-d array of the target's library: an integer count without class weights (exact), else
      the sum of the counted positions' class weights in the weights' compute dtype.

    Example:
      >>> import numpy as np
      >>> import xlsce
      >>> rng = np.random.default_rng(0)
      >>> logits, target = rng.normal(size=(6, 4)), np.array([0, 3, -100, 1, -100, -100])
      >>> parts = [slice(0, 2), slice(2, 6)]  # two ranks, 2 and 1 counted positions
      >>> d = sum(xlsce.mean_denominator(target[p]) for p in parts)  # the all-reduce
      >>> int(d)
      3
      >>> total = sum(xlsce.cross_entropy(logits[p], target[p], denominator=d) for p in parts)
      >>> bool(np.isclose(total, xlsce.cross_entropy(logits, target)))
      True
    """
    weight, where, _ = _checks.same_library(target, weight, where, None)  # NumPy beside JAX/torch targets
    ops, cfg = _checks.validate_denominator_targets(target, weight, where, ignore_index=ignore_index, axis=axis)
    return _math.mean_denominator(ops, cfg, target, weight, where)


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

    keywords: dict[str, Any]

    def __init__(self, **keywords: Unpack[Keywords]) -> None:
        unknown = set(keywords) - _KEYWORDS
        if unknown:
            raise TypeError(f"unknown keywords {sorted(unknown)}; expected some of {sorted(_KEYWORDS)}")
        self.keywords = dict(keywords)

    def __call__(self, logits: ArrayT, target: Array, /, *, denominator: Array | float | None = None) -> ArrayT:
        """The loss; ``denominator``: the global mean's denominator (see :func:`cross_entropy`)."""
        return cross_entropy(logits, target, denominator=denominator, **self.keywords)

    def value_and_grad(
        self,
        logits: ArrayT,
        target: Array,
        /,
        *,
        cotangent: Array | float | None = None,
        denominator: Array | float | None = None,
    ) -> tuple[ArrayT, ArrayT]:
        """:func:`value_and_grad` with this loss's keywords."""
        return value_and_grad(logits, target, cotangent=cotangent, denominator=denominator, **self.keywords)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.keywords.items())
        return f"xlsce.CrossEntropyLoss({args})"

    def _key(self):
        """The keywords by value; an array (weight, where) by identity, as it cannot be hashed."""
        return frozenset((k, v if _hashable(v) else ("id", id(v))) for k, v in self.keywords.items())

    def __eq__(self, other: object) -> bool:
        # by value, so that an equal configuration passed as a static argument (jax.jit) does not retrace
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _hashable(v):
    try:
        hash(v)
    except TypeError:
        return False
    return True


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
    "axis_name",
    "process_group",
}


def _over(ops, out, d):
    """The reduced loss (first of a tuple) divided by the explicit ``denominator=``."""
    if isinstance(out, tuple):
        return (_math.divide(ops, out[0], d), *out[1:])
    return _math.divide(ops, out, d)


if not TYPE_CHECKING:  # a checker sees no catch-all attribute, so that it flags a misspelt name

    def __getattr__(name):
        # `xlsce.torch` and `xlsce.keras` are imported on first use, so `import xlsce` imports neither.
        if name in ("torch", "keras"):
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'xlsce' has no attribute {name!r}")
