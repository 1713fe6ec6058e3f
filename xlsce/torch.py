"""PyTorch module wrapper: ``xlsce.torch.CrossEntropyLoss``, a drop-in for ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

try:
    import torch
except ModuleNotFoundError as error:
    if error.name != "torch":  # torch is there but broken: its own error says more
        raise
    raise ModuleNotFoundError(
        'xlsce.torch needs PyTorch, which is not installed: pip install "xlsce[torch]"', name="torch"
    ) from error

import xlsce

__all__ = ["CrossEntropyLoss", "cross_entropy"]


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
      smoothing, z_loss, softcap, where, return_lse: see :func:`xlsce.cross_entropy`.

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
    ):
        super().__init__()
        if size_average is not None or reduce is not None:
            raise ValueError("size_average and reduce are deprecated in PyTorch and not supported; use reduction=")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.smoothing = smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input, target):
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            smoothing=self.smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )

    def extra_repr(self):
        """Every setting that differs from its default (``weight`` summarised by its shape and dtype)."""
        parts = []
        if self.weight is not None:
            parts.append(f"weight=<{tuple(self.weight.shape)} {self.weight.dtype}>")
        for name, default in _DEFAULTS.items():
            value = getattr(self, name)
            if value != default or type(value) is not type(default):
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)

    def __prepare_scriptable__(self):
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
