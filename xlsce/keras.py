r"""Keras 3 losses: ``xlsce.keras.SparseCrossEntropy`` (class indices) and ``xlsce.keras.CrossEntropy``
(one-hot or probability targets), ``keras.losses.Loss`` subclasses computing :func:`xlsce.cross_entropy`.

They mirror ``keras.losses.SparseCategoricalCrossentropy`` and ``keras.losses.CategoricalCrossentropy``:
Keras' argument order ``loss(y_true, y_pred, sample_weight=None)``, ``from_logits``, ``axis``,
``label_smoothing``, ``ignore_class``, Keras' reductions (``"sum_over_batch_size"``, ``"sum"``,
``"mean"``, ``"mean_with_sample_weight"``, ``"none"``/None) and ``sample_weight``, which Keras' own
``Loss.__call__`` applies to the per-position losses that xlsce returns; ``get_config``/``from_config``
and ``model.save`` work (both classes are registered as ``xlsce>...``).  Besides Keras' arguments they
take xlsce's ``smoothing`` (``"uniform"``, Keras', or ``"exclusive"``), ``weight`` (a weight per class),
``z_loss`` and ``softcap`` (logits only).

They run on the Keras backends whose tensors xlsce computes on: JAX, PyTorch and NumPy (not TensorFlow).

Differences from Keras (deliberate):

* ``from_logits=False`` (Keras' default: ``y_pred`` are probabilities) computes the loss of
  :math:`\log \operatorname{clip}(p / \sum_c p_c,\ \epsilon,\ 1-\epsilon)` renormalised, where Keras
  takes the log of the clipped probabilities as they are; the two agree to :math:`\log(1 + K\epsilon)`
  (:math:`\epsilon` = ``keras.config.epsilon()``, 1e-7) and exactly where no probability is clipped.
* ``label_smoothing`` spreads :math:`\varepsilon` over ``y_pred.shape[axis]`` classes; Keras 3.15's
  ``CategoricalCrossentropy`` uses ``y_true.shape[-1]`` whatever ``axis`` is (the same for ``axis=-1``).
* ``weight`` weighs each class's term, :math:`-\sum_c w_c q_c \log\operatorname{softmax}(z)_c` (without
  smoothing: position :math:`i`'s loss times :math:`w_{y_i}`), and Keras' reduction then divides by the
  number of positions (``"sum_over_batch_size"``), as with Keras' ``class_weight``; PyTorch's weighted
  mean divides by :math:`\sum_i w_{y_i}` instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    import keras
except ModuleNotFoundError as error:
    if error.name != "keras":  # keras is there but broken: its own error says more
        raise
    raise ModuleNotFoundError(
        'xlsce.keras needs Keras 3, which is not installed: pip install "xlsce[keras]"', name="keras"
    ) from error

import numpy as np

from . import _checks, cross_entropy

if TYPE_CHECKING:
    from typing import Any, Literal

    KerasReduction = Literal["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"] | None

__all__ = ["SparseCrossEntropy", "CrossEntropy"]

_BACKENDS = ("jax", "torch", "numpy")
_LOGITS_ONLY = ("z_loss", "softcap")


class _XlsceLoss(keras.losses.Loss):
    """What the two losses share: settings, their check, the config, and the call to xlsce."""

    def __init__(
        self,
        *,
        from_logits: bool,
        label_smoothing: float,
        axis: int,
        ignore_class: int | None,
        smoothing: Literal["uniform", "exclusive"],
        weight: Any,
        z_loss: float,
        softcap: float | None,
        reduction: KerasReduction,
        name: str | None,
        dtype: Any,
    ) -> None:
        if keras.backend.backend() not in _BACKENDS:
            raise RuntimeError(
                f"xlsce.keras runs on the Keras backends {_BACKENDS}; this Keras runs on "
                f"{keras.backend.backend()!r} (set KERAS_BACKEND before importing keras)"
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)  # type: ignore[arg-type]  # Keras: str, None too
        if from_logits is not True and from_logits is not False:
            raise TypeError(f"from_logits must be a bool, got {type(from_logits).__name__}")
        if not _checks._is_int(axis):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        # the checks of xlsce.cross_entropy, now rather than at the first batch (k=2: the number of
        # classes is known only then, and the call checks it)
        _checks._check_settings(label_smoothing, smoothing, "none", z_loss, softcap, ignore_class, 2, "K")
        if not from_logits and (z_loss or softcap is not None):
            raise ValueError(
                "z_loss and softcap act on logits: they need from_logits=True (y_pred are probabilities here)"
            )
        if weight is not None:
            weight = np.asarray(keras.ops.convert_to_numpy(weight), dtype=np.float64)
            if weight.ndim != 1:
                raise ValueError(f"weight must have shape (K,) (one per class), got {weight.shape}")
            weight = weight.tolist()
        self.from_logits = from_logits
        self.label_smoothing = label_smoothing
        self.axis = axis
        self.ignore_class = ignore_class
        self.smoothing: Literal["uniform", "exclusive"] = smoothing
        self.weight = weight
        self.z_loss = z_loss
        self.softcap = softcap

    def _loss(self, y_pred: Any, target: Any) -> Any:
        ops = keras.ops
        if not self.from_logits:  # probabilities, as Keras reads them: normalised, clipped, then their log
            eps = keras.config.epsilon()
            y_pred = ops.log(ops.clip(y_pred / ops.sum(y_pred, axis=self.axis, keepdims=True), eps, 1.0 - eps))
        weight: Any = None if self.weight is None else ops.convert_to_tensor(self.weight, dtype=y_pred.dtype)
        return cross_entropy(
            y_pred,
            target,
            label_smoothing=self.label_smoothing,
            smoothing=self.smoothing,
            weight=weight,
            ignore_index=self.ignore_class,
            reduction="none",
            axis=self.axis,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            from_logits=self.from_logits,
            label_smoothing=self.label_smoothing,
            axis=self.axis,
            smoothing=self.smoothing,
            weight=self.weight,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )
        return config


@keras.saving.register_keras_serializable(package="xlsce")
class SparseCrossEntropy(_XlsceLoss):
    r"""Cross-entropy of class indices: ``keras.losses.SparseCategoricalCrossentropy`` plus xlsce's extras.

    For logits :math:`z` (along ``axis``; ``from_logits=False`` takes :math:`z = \log p`) and a class
    index :math:`y`, position :math:`i`'s loss is that of :func:`xlsce.cross_entropy`,

    .. math::

        \ell_i = -\sum_c w_c\, q_c \log \operatorname{softmax}(z_i)_c + \zeta\, \mathrm{lse}(z_i)^2,
        \qquad q = (1-\varepsilon)\,\mathrm{onehot}(y_i) + \varepsilon / K

    (``smoothing="uniform"``; ``"exclusive"`` puts :math:`\varepsilon/(K-1)` on the other classes),
    0 where :math:`y_i` = ``ignore_class``; Keras then applies ``sample_weight`` and the reduction.
    As in Keras, ignored positions are masked out of the mean: ``"sum_over_batch_size"`` divides by the
    number of the others.  Unlike Keras' sparse loss (before 2026) it smooths without a one-hot target.

    Args:
      from_logits: whether ``y_pred`` are logits (else probabilities, Keras' default).
      ignore_class: a class index whose positions are ignored, or None.
      reduction: Keras' reduction: ``"sum_over_batch_size"`` (default), ``"sum"``, ``"mean"``,
        ``"mean_with_sample_weight"``, ``"none"`` or None.
      axis: the class axis of ``y_pred``; ``y_true`` has ``y_pred``'s shape without it (or with it of
        size 1, as Keras accepts).
      name, dtype: as in ``keras.losses.Loss``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      smoothing: ``"uniform"`` or ``"exclusive"``.
      weight: optional sequence of :math:`K` class weights.
      z_loss, softcap: see :func:`xlsce.cross_entropy` (``from_logits=True`` only).

    Example:
      >>> import numpy as np
      >>> import xlsce.keras
      >>> loss_fn = xlsce.keras.SparseCrossEntropy(from_logits=True, label_smoothing=0.1)
      >>> round(float(loss_fn(np.array([0, 2]), np.zeros((2, 3)))), 5)  # log 3
      1.09861

    References:
      ``keras.losses.SparseCategoricalCrossentropy`` (keras/src/losses/losses.py).
    """

    def __init__(
        self,
        from_logits: bool = False,
        ignore_class: int | None = None,
        reduction: KerasReduction = "sum_over_batch_size",
        axis: int = -1,
        name: str = "sparse_cross_entropy",
        dtype: Any = None,
        *,
        label_smoothing: float = 0.0,
        smoothing: Literal["uniform", "exclusive"] = "uniform",
        weight: Any = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__(
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            ignore_class=ignore_class,
            smoothing=smoothing,
            weight=weight,
            z_loss=z_loss,
            softcap=softcap,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )

    def call(self, y_true: Any, y_pred: Any) -> Any:
        ops = keras.ops
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[self.axis] == 1:
            y_true = ops.squeeze(y_true, axis=self.axis)
        loss = self._loss(y_pred, ops.cast(y_true, "int32"))
        if self.ignore_class is not None:
            # as Keras' own sparse loss: the ignored positions are masked, so that the mean skips them
            _set_keras_mask(loss, ops.not_equal(y_true, ops.cast(self.ignore_class, y_true.dtype)))
        return loss

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(ignore_class=self.ignore_class)
        return config


@keras.saving.register_keras_serializable(package="xlsce")
class CrossEntropy(_XlsceLoss):
    r"""Cross-entropy of one-hot or probability targets: ``keras.losses.CategoricalCrossentropy`` plus
    xlsce's extras.

    For logits :math:`z` (along ``axis``; ``from_logits=False`` takes :math:`z = \log p`) and a target
    distribution :math:`t` of ``y_pred``'s shape, position :math:`i`'s loss is that of
    :func:`xlsce.cross_entropy`,

    .. math::

        \ell_i = -\sum_c w_c\, q_c \log \operatorname{softmax}(z_i)_c + \zeta\, \mathrm{lse}(z_i)^2,
        \qquad q = (1-\varepsilon)\, t_i + \varepsilon / K,

    with :math:`K` = ``y_pred.shape[axis]`` (``smoothing="exclusive"``:
    :math:`(1-\varepsilon)\,t + \varepsilon (1-t)/(K-1)`); Keras then applies ``sample_weight`` and
    the reduction.

    Args:
      from_logits: whether ``y_pred`` are logits (else probabilities, Keras' default).
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      axis: the class axis.
      reduction: Keras' reduction: ``"sum_over_batch_size"`` (default), ``"sum"``, ``"mean"``,
        ``"mean_with_sample_weight"``, ``"none"`` or None.
      name, dtype: as in ``keras.losses.Loss``.
      smoothing: ``"uniform"`` or ``"exclusive"``.
      weight: optional sequence of :math:`K` class weights.
      z_loss, softcap: see :func:`xlsce.cross_entropy` (``from_logits=True`` only).

    Example:
      >>> import numpy as np
      >>> import xlsce.keras
      >>> loss_fn = xlsce.keras.CrossEntropy(reduction="sum")
      >>> y_true = np.array([[0.0, 1.0], [1.0, 0.0]])
      >>> round(float(loss_fn(y_true, np.array([[0.5, 0.5], [0.5, 0.5]]))), 5)  # 2 log 2
      1.38629

    References:
      ``keras.losses.CategoricalCrossentropy`` (keras/src/losses/losses.py).
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: KerasReduction = "sum_over_batch_size",
        name: str = "cross_entropy",
        dtype: Any = None,
        *,
        smoothing: Literal["uniform", "exclusive"] = "uniform",
        weight: Any = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__(
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            ignore_class=None,
            smoothing=smoothing,
            weight=weight,
            z_loss=z_loss,
            softcap=softcap,
            reduction=reduction,
            name=name,
            dtype=dtype,
        )

    def call(self, y_true: Any, y_pred: Any) -> Any:
        if tuple(y_true.shape) != tuple(y_pred.shape):
            raise ValueError(
                f"y_true must have y_pred's shape {tuple(y_pred.shape)} (a distribution over axis {self.axis}), "
                f"got {tuple(y_true.shape)}; for class indices use xlsce.keras.SparseCrossEntropy"
            )
        return self._loss(y_pred, keras.ops.cast(y_true, y_pred.dtype))


def _set_keras_mask(x: Any, mask: Any) -> None:
    """Attach a Keras mask to a tensor, as Keras' own sparse loss does for ``ignore_class``."""
    try:
        from keras.src.backend import set_keras_mask
    except ImportError:  # Keras before 3.6 kept the mask as an attribute
        x._keras_mask = mask
    else:
        set_keras_mask(x, mask)
