"""The static configuration of one loss call and the residuals between forward and backward."""

from __future__ import annotations

from typing import NamedTuple


class _Operand:
    """The placeholder of a setting given as an array: its value travels as an operand (JAX)."""

    def __repr__(self):
        return "OPERAND"


OPERAND = _Operand()


class Config(NamedTuple):
    """Static (hashable) configuration of one loss call.

    ``eps`` and ``z_loss`` are Python floats, or (given as arrays, e.g. traced) the 0-d array itself,
    or :data:`OPERAND` where a backend passes the array as an operand of its custom derivative and puts
    it back (``with_settings``) inside; :attr:`smoothed` and :attr:`has_z_loss` are then True."""

    axis: int  # class axis, non-negative
    eps: float  # label smoothing
    exclusive: bool  # smoothing convention
    reduction: str  # "none" | "sum" | "mean"
    ignore_index: int | None  # None: nothing ignored by value
    soft: bool  # probability targets
    z_loss: float = 0.0
    softcap: float | None = None
    return_lse: bool = False  # also report the per-position log-sum-exp
    return_token_accuracy: bool = False  # also report argmax == target (index targets)

    @property
    def smoothed(self):
        """Whether the smoothing terms are computed (static): eps > 0, or eps an array (any value)."""
        return type(self.eps) is not float or self.eps > 0

    @property
    def has_z_loss(self):
        """Whether the z-loss term is computed (static): z_loss != 0, or an array (any value)."""
        return type(self.z_loss) is not float or self.z_loss != 0

    def settings(self):
        """``(eps, z_loss)`` where an array is given (None where a float), or None: the operands."""
        eps = None if type(self.eps) is float else self.eps
        z = None if type(self.z_loss) is float else self.z_loss
        return None if eps is None and z is None else (eps, z)

    def static(self):
        """This configuration with its array settings replaced by :data:`OPERAND` (hashable)."""
        eps = self.eps if type(self.eps) is float else OPERAND
        z = self.z_loss if type(self.z_loss) is float else OPERAND
        return self._replace(eps=eps, z_loss=z)

    def with_settings(self, settings):
        """This configuration with the array settings ``settings`` (from :meth:`settings`) put back."""
        if settings is None:
            return self
        eps, z = settings
        return self._replace(eps=self.eps if eps is None else eps, z_loss=self.z_loss if z is None else z)


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
