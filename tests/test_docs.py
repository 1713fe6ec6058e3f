"""The documentation's claims, tested.

* Every ```python block of the pages in ``docs/`` runs as written (each in a fresh namespace);
  the blocks assert the equalities the pages state.
* The optimal-margin formula of "What it computes" (and of ``docs/margin_figure.py``) is the
  numerical minimum of the loss, found by golden-section search on a hand-written loss and on xlsce's.
* The API reference covers every public name, and each public docstring carries a runnable example.

The Sphinx build itself (warnings as errors) runs in ``.ci/run``.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest

import xlsce

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md")) + [DOCS.parent / "README.md"]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def _blocks():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 2  # the first line of code
            yield pytest.param(page, line, match.group(1), id=f"{page.name}:{line}")


BLOCKS = list(_blocks())


def test_pages_have_examples():
    """The parser finds the examples (so the parametrized test below cannot pass by running nothing)."""
    per_page = {p.name: 0 for p in PAGES}
    for block in BLOCKS:
        per_page[block.values[0].name] += 1
    assert per_page["getting-started.md"] == 4  # NumPy, JAX, PyTorch, Keras
    assert per_page["what-it-computes.md"] >= 8
    assert per_page["migrating.md"] >= 6  # PyTorch (2), optax, Keras, fairseq, Megatron
    assert per_page["large-vocabularies.md"] == 3
    assert per_page["README.md"] == 4  # NumPy, JAX, PyTorch, linear_cross_entropy
    assert sum(per_page.values()) == len(BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize(("page", "line", "code"), BLOCKS)
def test_code_block_runs(page, line, code):
    # The line offset makes tracebacks point at the page's own line numbers.
    compiled = compile("\n" * (line - 1) + code, str(page), "exec")
    exec(compiled, {"__name__": f"docs_{page.stem.replace('-', '_')}"})


# --------------------------------------------------------------------------- the optimal margin


def _margin_module():
    spec = importlib.util.spec_from_file_location("margin_figure", DOCS / "margin_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _golden_min(f, lo, hi, tol=1e-10):
    """Minimiser of a unimodal function on [lo, hi]."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return (a + b) / 2


def _loss_by_hand(m, eps, k, smoothing):
    """-sum_c q_c log softmax(m, 0, ..., 0)_c with target 0, from the definition of q."""
    if smoothing == "uniform":
        q_t, q_o = 1 - eps + eps / k, eps / k
    else:
        q_t, q_o = 1 - eps, eps / (k - 1)
    lse = math.log(math.exp(m) + (k - 1))
    return -(q_t * (m - lse) + (k - 1) * q_o * (-lse))


@pytest.mark.parametrize("smoothing", ["uniform", "exclusive"])
@pytest.mark.parametrize("k", [2, 10, 1000])
@pytest.mark.parametrize("eps", [0.01, 0.05, 0.1, 0.2, 0.45])
def test_optimal_margin_is_the_minimum(eps, k, smoothing):
    mf = _margin_module()
    m_star = mf.optimal_margin(eps, k, smoothing)
    # the stated closed forms
    if smoothing == "uniform":
        assert m_star == pytest.approx(math.log((1 - eps + eps / k) / (eps / k)), rel=1e-15)
    else:
        assert m_star == pytest.approx(math.log((1 - eps) * (k - 1) / eps), rel=1e-15)
    # the minimum of the loss written from the definition
    by_hand = _golden_min(lambda m: _loss_by_hand(m, eps, k, smoothing), -10.0, 40.0)
    assert by_hand == pytest.approx(m_star, abs=1e-6)
    # the minimum of xlsce's loss, and its gradient there
    by_xlsce = _golden_min(lambda m: float(mf.loss_of_margin([m], eps, k, smoothing)[0]), -10.0, 40.0)
    assert by_xlsce == pytest.approx(m_star, abs=1e-6)
    z = np.zeros((1, k))
    z[0, 0] = m_star
    _, grad = xlsce.value_and_grad(z, np.array([0]), label_smoothing=eps, smoothing=smoothing)
    assert np.abs(grad).max() < 1e-12


def test_no_finite_optimum_without_smoothing():
    mf = _margin_module()
    assert mf.optimal_margin(0.0, 10) == math.inf
    losses = mf.loss_of_margin(np.linspace(0.0, 30.0, 31), 0.0, 10)
    assert np.all(np.diff(losses) < 0)  # strictly decreasing: no minimum


# --------------------------------------------------------------------------- API reference


def _public_objects():
    import xlsce.torch

    return [pytest.param(f"xlsce.{n}", getattr(xlsce, n), id=f"xlsce.{n}") for n in xlsce.__all__] + [
        pytest.param(f"xlsce.torch.{n}", getattr(xlsce.torch, n), id=f"xlsce.torch.{n}") for n in xlsce.torch.__all__
    ]


def test_api_page_documents_every_public_name():
    api = (DOCS / "api.rst").read_text(encoding="utf-8")
    # automodule with :members: documents each name in the module's __all__; names listed by hand also count
    for module in ("xlsce", "xlsce.torch"):
        assert re.search(rf"^\.\. automodule:: {re.escape(module)}\n(   :.*\n)*   :members:", api, re.MULTILINE) or all(
            p.values[0] in api for p in _public_objects() if p.values[0].rsplit(".", 1)[0] == module
        )


@pytest.mark.parametrize(("name", "obj"), _public_objects())
def test_public_docstring_has_an_example(name, obj):
    doc = obj.__doc__ or ""
    assert "Example" in doc and ">>>" in doc, f"{name}: the docstring needs an Example section with a doctest"
