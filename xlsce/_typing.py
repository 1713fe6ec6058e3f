"""Names for the annotations: imported only under ``typing.TYPE_CHECKING``, so they cost nothing at runtime.

``Array`` is what xlsce needs of an array (NumPy's ``ndarray``, ``jax.Array``, ``torch.Tensor``, any
array-API array: ``shape``, ``ndim`` and ``dtype``); ``ArrayT``, a type variable bound to it, lets a
checker know that the loss comes back in the logits' type.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypedDict, TypeVar


class Array(Protocol):
    @property
    def shape(self) -> Any: ...
    @property
    def ndim(self) -> int: ...
    @property
    def dtype(self) -> Any: ...


ArrayT = TypeVar("ArrayT", bound=Array)
Reduction = Literal["none", "sum", "mean"]
Smoothing = Literal["uniform", "exclusive"]


class LinearKeywords(TypedDict, total=False):
    """The keywords of :func:`xlsce.linear_value_and_grad` beyond its own (those of linear_cross_entropy)."""

    label_smoothing: float | Array
    smoothing: Smoothing
    weight: Array | None
    ignore_index: int | None
    where: Array | None
    reduction: Reduction
    z_loss: float | Array
    softcap: float | None
    axis_name: str | tuple[str, ...] | None
    process_group: Any


class Keywords(LinearKeywords, total=False):
    """The keywords of :class:`xlsce.CrossEntropyLoss` (those of :func:`xlsce.cross_entropy` but return_lse)."""

    axis: int | tuple[int, ...]


class CallKeywords(Keywords, total=False):
    """The keywords of :func:`xlsce.cross_entropy` besides ``return_lse`` (its overloads' ``**keywords``)."""

    denominator: Array | float | None


class LinearCallKeywords(LinearKeywords, total=False):
    """The keywords of :func:`xlsce.linear_cross_entropy` besides ``return_lse``."""

    bias: Array | None
    chunk_size: int | None
    denominator: Array | float | None
