"""Sphinx configuration of the xlsce documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
At ``builder-inited`` this file (1) draws the label-smoothing figure with
``docs/margin_figure.py`` and (2) writes the include file of the Benchmarks page
from ``docs/benchmarks/results.md`` (or a placeholder when the benchmarks were not run yet; the page
shows ``docs/benchmarks/ratios.png`` itself).
Both go to ``docs/_generated/`` (not tracked).  (3) At ``build-finished`` it copies MathJax from the
``django-static-mathjax`` package (the ``docs`` extra) into the site's ``_static/``, so that the formulas
render offline: the built pages load no script or stylesheet from the network (tests/test_package.py).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the xlsce package of this checkout
sys.path.insert(0, str(HERE))  # margin_figure.py

import xlsce  # noqa: E402

# xlsce.keras imports keras, which fixes its backend then; the API reference needs only its docstrings
os.environ.setdefault("KERAS_BACKEND", "numpy")

project = "xlsce"
author = "the xlsce developers"
copyright = "the xlsce developers"
release = xlsce.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# benchmarks/ and _generated/ hold files that pages include; they are not pages themselves.
exclude_patterns = ["_build", "_generated", "benchmarks"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# The benchmark tables are written by `python -m benchmarks`, not by hand: do not fail on their heading levels.
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# MathJax 3.2.2 served with the site, not from a CDN (see _copy_mathjax below).
mathjax_path = "mathjax/tex-mml-chtml.js"

html_theme = "furo"
html_title = f"xlsce {release}"
pygments_style = "default"


def _rebase(markdown: str, prefix: str) -> str:
    """``markdown`` moved one heading level down, its relative link and image targets prefixed with ``prefix``.

    The Benchmarks page shows ``docs/benchmarks/results.md`` under its own "Results" heading, and the
    included text's paths must resolve from ``docs/`` (MyST resolves them relative to the including page).
    """
    link = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
    directive = re.compile(r"^(\s*(?:```|:::)\{(?:figure|image)\}\s+)(\S+)")

    def rebase(target: str) -> str:
        absolute = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/", target)
        return target if absolute else prefix + target

    out, fence = [], None
    for line in markdown.splitlines():
        stripped = line.lstrip()
        opening = re.match(r"^(`{3,}|~{3,})", stripped)
        if fence is None and opening and not re.match(r"^(`{3,}|~{3,})\{(figure|image)\}", stripped):
            fence = opening.group(1)
        elif fence is not None and stripped.startswith(fence):
            fence = None
        elif fence is None:
            if re.match(r"^#{1,5} ", line):
                line = "#" + line
            line = link.sub(lambda m: m.group(1) + rebase(m.group(2)) + m.group(3), line)
            line = directive.sub(lambda m: m.group(1) + rebase(m.group(2)), line)
        out.append(line)
    return "\n".join(out) + "\n"


def _results_for_the_page(markdown: str) -> str:
    """``results.md`` as the Benchmarks page shows it, under its own "Results" heading.

    The page has its own title and shows the chart (``ratios.png``) at its top, so the file's title and
    its chart are left out; a heading's note of the issue that set the targets ("Targets (issue 3)") is
    development history, not part of the results.
    """
    lines = markdown.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    lines = [line for line in lines if not re.match(r"^!\[[^\]]*\]\(ratios\.png\)\s*$", line)]
    lines = [re.sub(r"^(#{2,6} .*?) \(issue \d+\)$", r"\1", line) for line in lines]
    return "\n".join(lines).strip() + "\n"


def _benchmark_include(gen: Path) -> None:
    """Write ``_generated/benchmark_results.md``: the results of ``python -m benchmarks`` or a placeholder."""
    bench = HERE / "benchmarks"
    results, raw = bench / "results.md", bench / "results.json"
    text = results.read_text(encoding="utf-8") if results.exists() else ""
    parts = []
    if text:
        parts.append(_rebase(_results_for_the_page(text), "benchmarks/"))
    else:
        parts.append(
            ":::{note}\nNo benchmark results in this checkout yet: `docs/benchmarks/results.md` is written by\n"
            "`python -m benchmarks` (see below).  Run it and rebuild the documentation to see the table here.\n:::\n"
        )
    if raw.exists():
        parts.append("The raw numbers: {download}`results.json <benchmarks/results.json>`.\n")
    _write_if_changed(gen / "benchmark_results.md", "\n".join(parts))


def _write_if_changed(path: Path, text: str) -> None:
    # Rewriting an unchanged file would make Sphinx re-read the page on every build.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _generate(app) -> None:
    import margin_figure

    gen = HERE / "_generated"
    gen.mkdir(exist_ok=True)
    margin_figure.draw(gen / "margin.png")
    _benchmark_include(gen)


def _mathjax_dir() -> Path:
    """MathJax's browser build (``es5/``), as installed by the ``django-static-mathjax`` package."""
    try:
        import mathjax  # the django-static-mathjax distribution (Django itself is not needed)
    except ImportError as error:
        raise RuntimeError(
            'the documentation serves MathJax itself: pip install -e ".[docs]" (django-static-mathjax)'
        ) from error
    return Path(mathjax.__file__).resolve().parent / "static" / "mathjax" / "es5"


# The other combined builds of MathJax (SVG output, MathML only, ...) and latest.js (which asks the network for
# the newest release): the site loads tex-mml-chtml.js, which loads the rest of es5/ on demand.
_MATHJAX_UNUSED = re.compile(r"^(?:tex-(?!mml-chtml\.js$).*|mml-.*|node-main|latest)\.js$")


def _copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    import shutil

    source, target = _mathjax_dir(), Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(
        source,
        target,
        dirs_exist_ok=True,
        ignore=lambda folder, names: [n for n in names if Path(folder) == source and _MATHJAX_UNUSED.match(n)],
    )
    shutil.copy2(source.parent / "LICENSE", target / "LICENSE")  # MathJax's Apache-2.0 licence


def setup(app):
    app.connect("builder-inited", _generate)
    # An HTML build without MathJax fails at its start, not after it.
    app.connect("builder-inited", lambda app: app.builder.format != "html" or _mathjax_dir())
    app.connect("build-finished", _copy_mathjax)
