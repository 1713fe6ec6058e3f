"""PyTorch module wrapper: ``xlsce.torch.CrossEntropyLoss``, a drop-in for ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    import torch
except ModuleNotFoundError as error:
    if error.name != "torch":  # torch is there but broken: its own error says more
        raise
    raise ModuleNotFoundError(
        'xlsce.torch needs PyTorch, which is not installed: pip install "xlsce[torch]"', name="torch"
    ) from error

from . import cross_entropy

if TYPE_CHECKING:
    from ._typing import Reduction, Smoothing

__all__ = ["CrossEntropyLoss"]


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
    smoothed loss infinite; class indices out of range raise ``ValueError``.

    Args:
      weight: optional ``(C,)`` tensor of class weights.
      size_average, reduce: deprecated PyTorch arguments; must be None.
      ignore_index: class index to ignore (index targets).
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      smoothing: ``"uniform"`` (PyTorch's) or ``"exclusive"`` (fairseq's).
      z_loss, softcap: see :func:`xlsce.cross_entropy`.

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

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, *, denominator: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            denominator=denominator,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            smoothing=self.smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            axis=1 if input.ndim > 1 else 0,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, smoothing={self.smoothing!r}"
        )
