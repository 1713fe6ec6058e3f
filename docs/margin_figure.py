"""The figure of the "What it computes" page: label smoothing gives the loss a finite optimum.

One position, K classes, logits ``(m, 0, ..., 0)`` and target class 0: ``m`` is the
target logit's margin over the others.  Without smoothing the loss falls towards 0 as
``m`` grows and has no minimum; with smoothing it is minimal where ``softmax(z) = q``,
i.e. at the margin ``log(q_target / q_other)``:

* uniform:   m* = log((1 - eps + eps/K) / (eps/K))
* exclusive: m* = log((1 - eps) / (eps/(K-1)))

``python docs/margin_figure.py OUT.png`` draws it; ``docs/conf.py`` calls :func:`draw`
at every build.  The curves are computed with :func:`xlsce.cross_entropy` itself.
"""

from __future__ import annotations

import math
import sys

import numpy as np

import xlsce

K = 10
EPSILONS = (0.0, 0.05, 0.1, 0.2)
CONVENTIONS = ("uniform", "exclusive")


def optimal_margin(eps: float, k: int, smoothing: str = "uniform") -> float:
    """The margin at which the smoothed loss is minimal (``inf`` for ``eps = 0``)."""
    if eps == 0:
        return math.inf
    if smoothing == "uniform":
        return math.log((1 - eps + eps / k) / (eps / k))
    return math.log((1 - eps) / (eps / (k - 1)))


def loss_of_margin(margins, eps: float, k: int, smoothing: str = "uniform"):
    """xlsce's loss at logits ``(m, 0, ..., 0)`` with target 0, for each ``m`` in ``margins``."""
    margins = np.asarray(margins, dtype=np.float64)
    logits = np.zeros((margins.size, k))
    logits[:, 0] = margins
    target = np.zeros(margins.size, dtype=np.int64)
    return xlsce.cross_entropy(logits, target, label_smoothing=eps, smoothing=smoothing, reduction="none")


def draw(path) -> None:
    """Write the two-panel figure to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    m = np.linspace(-2.0, 12.0, 561)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(EPSILONS)))
    for eps, color in zip(EPSILONS, colors, strict=True):
        for smoothing, style in zip(CONVENTIONS, ("-", "--"), strict=True):
            if eps == 0 and smoothing == "exclusive":
                continue  # identical to uniform at eps = 0
            label = "ε = 0 (no smoothing)" if eps == 0 else f"ε = {eps}, {smoothing}"
            left.plot(m, loss_of_margin(m, eps, K, smoothing), style, color=color, label=label)
            m_star = optimal_margin(eps, K, smoothing)
            if math.isfinite(m_star):
                left.plot([m_star], loss_of_margin([m_star], eps, K, smoothing), "o", color=color, ms=5)
    left.set(
        xlabel="margin m = z_target − z_other",
        ylabel="loss",
        title=f"Loss at logits (m, 0, …, 0), K = {K}; dots: the optimum",
        ylim=(0.0, 3.0),
    )
    left.legend(fontsize=8)

    eps_grid = np.linspace(0.01, 0.5, 200)
    for smoothing, style in zip(CONVENTIONS, ("-", "--"), strict=True):
        right.plot(eps_grid, [optimal_margin(e, K, smoothing) for e in eps_grid], style, color="k", label=smoothing)
        # the numerical minimum of xlsce's loss on a fine grid, at a few eps: it sits on the formula's curve
        grid = np.linspace(0.0, 15.0, 15001)
        for eps in (0.05, 0.1, 0.2, 0.3, 0.4):
            right.plot([eps], [grid[np.argmin(loss_of_margin(grid, eps, K, smoothing))]], "o", color="tab:red", ms=4)
    right.set(
        xlabel="label smoothing ε",
        ylabel="optimal margin m*",
        title="uniform: log((1−ε+ε/K)/(ε/K)); exclusive: log((1−ε)(K−1)/ε)",
    )
    right.title.set_fontsize(9)
    right.legend(title=f"K = {K} (dots: numerical minimum)", fontsize=8, title_fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else "margin.png")
