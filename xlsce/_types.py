"""The static configuration of one loss call and the residuals between forward and backward."""

from __future__ import annotations

from typing import NamedTuple


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

    lse: object  # log-sum-exp m + log s, rounded (m the shift; 0 for a row of -inf only)
    lse_lo: object  # its rounding error, (m + log s) - lse exactly: softmax = exp(z - lse) * exp(-lse_lo)
    coef: object  # sum_c w_c q_c + 2 zeta lse: the factor of softmax(z) (NaN where a class index is out of range)
    a: object  # a * w[y] (index targets) or a (probability targets)
    b: object  # smoothing mass per class in play
    scale: object  # reduction factor per position (0 where ignored)
    y: object  # class index with ignored positions set to 0, keepdims (index targets)
    masked: bool  # whether -inf logits need masking (always True when traced)
    lse_out: object = None  # the log-sum-exp to report (-inf where every logit is -inf), if asked
