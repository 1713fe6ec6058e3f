"""PyTorch module wrapper: ``xlsce.torch.CrossEntropyLoss``, a drop-in for ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

try:
    import torch
except ModuleNotFoundError as error:
    if error.name != "torch":  # torch is there but broken: its own error says more
        raise
    raise ModuleNotFoundError(
        'xlsce.torch needs PyTorch, which is not installed: pip install "xlsce[torch]"', name="torch"
    ) from error

import xlsce

from . import linear_cross_entropy as _linear_cross_entropy

if TYPE_CHECKING:
    from ._typing import Reduction, Smoothing

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "cross_entropy"]


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    smoothing="uniform",
    z_loss=0.0,
    softcap=None,
    where=None,
    return_lse=False,
    denominator=None,
    process_group=None,
):
    r"""Drop-in for :func:`torch.nn.functional.cross_entropy`: its signature and layout, plus xlsce's keywords.

    The classes are along dimension 1 (dimension 0 for an unbatched ``(C,)`` input), as in PyTorch:
    ``xlsce.cross_entropy(input, target, axis=1, ...)`` (see it for the formula
    :math:`\ell = -\sum_c w_c q_c \log\operatorname{softmax}(x)_c + \zeta\,\mathrm{lse}^2`, the smoothed
    target :math:`q` and the reductions).  The deliberate differences from PyTorch are those of
    :class:`CrossEntropyLoss`.

    Args:
      input: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits.
      target: class indices ``(N, d1, ..., dk)`` (``()`` unbatched), or probabilities of the input's shape.
      weight, ignore_index, reduction, label_smoothing: as in PyTorch.
      size_average, reduce: deprecated PyTorch arguments; must be None.
      smoothing, z_loss, softcap, where, return_lse, denominator: see :func:`xlsce.cross_entropy`.
      process_group: vocabulary parallelism over a ``torch.distributed`` group: ``input`` (and ``weight``)
        hold this rank's contiguous slice of the classes, in rank order; ``target`` the global class
        indices (see :func:`xlsce.cross_entropy` and docs/scaling-out.md).

    Example:
      >>> import torch
      >>> import torch.nn.functional as F
      >>> import xlsce.torch
      >>> x, y = torch.randn(2, 3, 3), torch.tensor([[0, 1, 2], [2, 1, 0]])  # (N, C, L) with C == L
      >>> bool(torch.isclose(xlsce.torch.cross_entropy(x, y, label_smoothing=0.1),
      ...                    F.cross_entropy(x, y, label_smoothing=0.1)))
      True

    References:
      ``torch.nn.functional.cross_entropy``
      (https://pytorch.org/docs/stable/generated/torch.nn.functional.cross_entropy.html).
    """
    if size_average is not None or reduce is not None:
        raise ValueError("size_average and reduce are deprecated in PyTorch and not supported; use reduction=")
    return xlsce.cross_entropy(
        input,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        smoothing=smoothing,
        z_loss=z_loss,
        softcap=softcap,
        where=where,
        return_lse=return_lse,
        denominator=denominator,
        process_group=process_group,
        axis=1 if getattr(input, "ndim", 2) > 1 else 0,
    )


class CrossEntropyLoss(torch.nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.CrossEntropyLoss`, plus ``smoothing``.

    Computes :math:`\ell = -\sum_c w_c q_c \log\operatorname{softmax}(x)_c` over the classes
    of dimension 1, with :math:`q = (1-\varepsilon)\,\mathrm{onehot}(y) + \varepsilon/C` (uniform)
    or :math:`1-\varepsilon` on the target and :math:`\varepsilon/(C-1)` elsewhere (exclusive),
    and PyTorch's reductions (the weighted mean divides by :math:`\sum_i w_{y_i}`).

    Same arguments, defaults and layout (classes along dimension 1, or an
    unbatched ``(C,)`` input) as PyTorch; computes :func:`xlsce.cross_entropy`
    with ``axis=1`` (``axis=0`` for unbatched input).  ``weight`` is registered
    as a buffer, so ``.to(device)`` moves it.

    Differences from PyTorch (all deliberate): a ``"mean"`` over no valid
    position is 0 (PyTorch: NaN); ``label_smoothing < 0`` raises (PyTorch treats
    it as 0); a ``-inf`` logit takes its class out of play instead of making the
    smoothed loss infinite; class indices out of range raise ``ValueError``;
    ``torch.jit.script`` raises a RuntimeError that names torch.compile and
    torch.export instead (both work, as do ``torch.func``'s transforms and ``torch.vmap``).
    Under ``torch.autocast`` the loss is float32, as PyTorch's (an autocast float32 op).

    Args:
      weight: optional ``(C,)`` tensor of class weights.
      size_average, reduce: deprecated PyTorch arguments; must be None.
      ignore_index: class index to ignore (index targets).
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      smoothing: ``"uniform"`` (PyTorch's) or ``"exclusive"`` (fairseq's).
      z_loss, softcap: see :func:`xlsce.cross_entropy`.
      process_group: vocabulary parallelism over a ``torch.distributed`` group (``weight``, if given, is
        then this rank's slice of the class weights); see :func:`xlsce.cross_entropy`.

    Example:
      >>> import torch
      >>> import xlsce.torch
      >>> loss_fn = xlsce.torch.CrossEntropyLoss(label_smoothing=0.1)
      >>> logits = torch.zeros(4, 3, requires_grad=True)
      >>> loss = loss_fn(logits, torch.tensor([0, 1, 2, 0]))
      >>> loss.backward()
      >>> round(loss.item(), 6)  # log 3
      1.098612

    References:
      ``torch.nn.CrossEntropyLoss`` (https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html);
      Szegedy et al., `Rethinking the Inception Architecture <https://arxiv.org/abs/1512.00567>`_, 2016.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: None = None,
        ignore_index: int = -100,
        reduce: None = None,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        *,
        smoothing: Smoothing = "uniform",
        z_loss: float = 0.0,
        softcap: float | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            raise ValueError("size_average and reduce are deprecated in PyTorch and not supported; use reduction=")
        self.register_buffer("weight", weight)
        self.weight: torch.Tensor | None  # a buffer (for checkers: a Module's attributes may be Modules)
        self.ignore_index = ignore_index
        self.reduction: Reduction = reduction
        self.label_smoothing = label_smoothing
        self.smoothing: Smoothing = smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.process_group = process_group

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, *, denominator: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            denominator=denominator,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            smoothing=self.smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        """Every setting that differs from its default (``weight`` summarised by its shape and dtype)."""
        parts = []
        if self.weight is not None:
            parts.append(f"weight=<{tuple(self.weight.shape)} {self.weight.dtype}>")
        for name, default in _DEFAULTS.items():
            value = getattr(self, name)
            if value != default or type(value) is not type(default):
                parts.append(f"{name}={value!r}")
        if self.process_group is not None:
            parts.append("process_group=<set>")
        return ", ".join(parts)

    def __prepare_scriptable__(self) -> None:
        # torch.jit.script calls this on the module and on every submodule before compiling them
        raise RuntimeError(
            "xlsce.torch.CrossEntropyLoss cannot be compiled by torch.jit.script: the loss is Python code "
            "(several array libraries, autograd.Functions, keyword-only arguments) that TorchScript cannot "
            "express.  Use torch.compile (fullgraph=True works) or torch.export.export instead (not "
            "torch.jit.trace: the eager loss reads values to choose its path, which a trace would freeze)."
        )


_DEFAULTS = {  # the settings that extra_repr shows where they differ from these
    "ignore_index": -100,
    "reduction": "mean",
    "label_smoothing": 0.0,
    "smoothing": "uniform",
    "z_loss": 0.0,
    "softcap": None,
}


class LinearCrossEntropyLoss(torch.nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.LinearCrossEntropyLoss`: a linear layer and the
    cross-entropy of its logits, computed by :func:`xlsce.linear_cross_entropy` in chunks of positions,
    so that the ``(N, C)`` logits never exist.

    Computes ``cross_entropy(input @ W.T + b, target)`` with PyTorch's definitions (class axis 1,
    the weighted mean over :math:`\sum_i w_{y_i}`), ``W`` the layer's weight viewed as
    ``(num_classes, *out_features, in_features)``: with ``out_features = (d_1, ..., d_K)`` the logits
    have shape ``(N, num_classes, d_1, ..., d_K)`` (a K-dimensional loss) and ``target`` has shape
    ``(N, d_1, ..., d_K)`` (class indices) or the logits' shape (probabilities).

    Same arguments, defaults and parameters as PyTorch's (``self.linear`` holds the weight and bias,
    ``weight`` is a buffer), plus xlsce's ``smoothing``, ``z_loss``, ``softcap`` and ``chunk_size``.
    Differences (deliberate): xlsce always chunks, with or without ``options`` and also with label
    smoothing, class weights, probability targets and ``out_features`` (PyTorch's chunked path takes
    none of these and falls back to the materialised logits, with a warning); ``options`` is accepted
    for PyTorch's signature, and its ``batch_chunk_size``, if set, is the chunk size; the differences of
    :class:`CrossEntropyLoss` (a mean over nothing is 0, ``label_smoothing < 0`` raises, out-of-range
    class indices raise ValueError) hold here too.

    Args:
      in_features, num_classes: the linear layer's sizes.
      out_features: ``(d_1, ..., d_K)`` for a K-dimensional loss (default ``()``).
      bias: whether the layer has a bias.
      device, dtype: of the layer's parameters.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      weight: optional ``(num_classes,)`` class weights.
      ignore_index: class index to ignore; None (the default) means -100, as in PyTorch.
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      options: a ``torch.nn.LinearCrossEntropyOptions`` or None (see above).
      smoothing, z_loss, softcap: see :func:`xlsce.cross_entropy`.
      chunk_size: rows per chunk (default: :func:`xlsce.linear_cross_entropy`'s rule).

    Example:
      >>> import torch
      >>> import xlsce.torch
      >>> loss_fn = xlsce.torch.LinearCrossEntropyLoss(8, 100, label_smoothing=0.1)
      >>> loss_fn
      LinearCrossEntropyLoss(
        in_features=8, num_classes=100, label_smoothing=0.1
        (linear): Linear(in_features=8, out_features=100, bias=False)
      )
      >>> loss = loss_fn(torch.randn(32, 8), torch.randint(0, 100, (32,)))
      >>> loss.backward()
      >>> loss_fn.linear.weight.grad.shape
      torch.Size([100, 8])

    References:
      ``torch.nn.LinearCrossEntropyLoss`` and ``torch.nn.functional.linear_cross_entropy`` (PyTorch 2.13);
      Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
      <https://arxiv.org/abs/2411.09009>`_, 2024.
    """

    def __init__(
        self,
        in_features,
        num_classes,
        *,
        out_features=(),
        bias=False,
        device=None,
        dtype=None,
        reduction="mean",
        weight=None,
        ignore_index=None,
        label_smoothing=0.0,
        options=None,
        smoothing="uniform",
        z_loss=0.0,
        softcap=None,
        chunk_size=None,
    ):
        super().__init__()
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},) (one per class), got {tuple(weight.shape)}")
        out_features = tuple(out_features)
        self.num_classes = num_classes
        self.out_features = out_features
        self.linear = torch.nn.Linear(
            in_features, num_classes * math.prod(out_features), bias=bias, device=device, dtype=dtype
        )
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.smoothing = smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, input, target):
        shape = (self.num_classes, *self.out_features)
        classifier = self.linear.weight.reshape((*shape, self.linear.in_features))
        bias = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        chunk_size = self.chunk_size
        if chunk_size is None and self.options is not None:
            chunk_size = getattr(self.options, "batch_chunk_size", None)
        return _linear_cross_entropy(
            input,
            classifier,
            target,
            bias=bias,
            weight=self.weight,
            ignore_index=-100 if self.ignore_index is None else self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            smoothing=self.smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=chunk_size,
        )

    def extra_repr(self) -> str:
        """``in_features`` and ``num_classes``, then every setting that differs from its default."""
        parts = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}"]
        settings = (
            ("out_features", self.out_features, ()),
            ("bias", self.linear.bias is not None, False),
            ("reduction", self.reduction, "mean"),
            ("ignore_index", self.ignore_index, None),
            ("label_smoothing", self.label_smoothing, 0.0),
            ("options", self.options, None),
            ("smoothing", self.smoothing, "uniform"),
            ("z_loss", self.z_loss, 0.0),
            ("softcap", self.softcap, None),
            ("chunk_size", self.chunk_size, None),
        )
        parts += [f"{name}={value!r}" for name, value, default in settings if value != default]
        if self.weight is not None:
            parts.append(f"weight=<tensor of shape {tuple(self.weight.shape)}>")
        return ", ".join(parts)
