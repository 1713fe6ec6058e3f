"""The package as users and packagers meet it: metadata, the sdist, the entry point, the missing-torch
message, and a documentation site that loads nothing from the network."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

import xlsce

ROOT = Path(__file__).resolve().parent.parent


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _run(*args, **kwargs):
    # cwd=ROOT: `python -c` and `python -m` put the working directory first on sys.path, so the
    # subprocess imports this checkout's xlsce, as the tests do.
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def _need(*modules):
    """Skip without these modules, except under CI, which must run everything."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("CI"):
            raise RuntimeError(f"{missing} not installed, and CI must run every test")
        pytest.skip(f"{missing} not installed")


# --------------------------------------------------------------------------- metadata


def test_version_has_one_source():
    meta = _pyproject()
    assert "version" not in meta["project"]
    assert "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "xlsce.__version__"}
    # setuptools reads a literal assignment without importing xlsce (so without NumPy, torch or JAX)
    tree = ast.parse((ROOT / "xlsce" / "__init__.py").read_text(encoding="utf-8"))
    literals = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert literals == [xlsce.__version__]
    assert "release = xlsce.__version__" in (ROOT / "docs" / "conf.py").read_text(encoding="utf-8")


def test_license():
    meta = _pyproject()["project"]
    assert meta["license"] == "BSD-3-Clause"
    assert meta["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the xlsce developers" in text
    # PEP 639: the licence expression replaces the licence classifier (setuptools rejects both at once)
    assert not any(c.startswith("License ::") for c in meta["classifiers"])


def test_urls_and_classifiers():
    meta = _pyproject()["project"]
    assert set(meta["urls"]) == {"Homepage", "Documentation", "Source", "Issues"}
    versions = [
        c.rsplit(" :: ", 1)[1] for c in meta["classifiers"] if c.startswith("Programming Language :: Python :: 3.")
    ]
    assert versions == ["3.10", "3.11", "3.12", "3.13"]
    assert meta["requires-python"] == ">=3.10"


def test_sdist_carries_what_the_tests_need(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building needs setuptools >= 77 (pyproject's build-system)")
    code = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    proc = _run("-c", code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as archive:
        top = name.removesuffix(".tar.gz")
        shipped = {m.name.removeprefix(top + "/") for m in archive.getmembers()}
    needed = {"LICENSE", "README.md", "pyproject.toml", "docs/api.rst", "docs/conf.py", "docs/margin_figure.py"}
    for folder, pattern in (("tests", "*.py"), ("xlsce", "*.py"), ("benchmarks", "*.py"), ("docs", "*.md")):
        needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob(pattern)}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "benchmarks").glob("*") if p.is_file()}
    assert "tests/conftest.py" in needed
    assert needed - shipped == set()


# --------------------------------------------------------------------------- entry points and imports


def test_xlsce_torch_without_torch_says_what_to_install():
    code = """
import sys


class NoTorch:  # as if torch were not installed: importing it finds nothing
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoTorch())
import numpy as np
import xlsce  # needs no torch
assert float(xlsce.cross_entropy(np.zeros((1, 2)), np.array([0]))) > 0
try:
    import xlsce.torch
except ImportError as error:
    print(type(error).__name__, error.name)
    print(error)
else:
    raise SystemExit("import xlsce.torch succeeded without torch")
"""
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind, message = proc.stdout.splitlines()[0], proc.stdout.splitlines()[1]
    assert kind == "ModuleNotFoundError torch"
    assert 'pip install "xlsce[torch]"' in message


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_main_help(flag):
    proc = _run("-m", "xlsce", flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m xlsce")
    assert "worked example" in proc.stdout
    assert "largest disagreement" not in proc.stdout  # the help only: the demo did not run


def test_main_rejects_unknown_arguments():
    proc = _run("-m", "xlsce", "--no-such-option")
    assert proc.returncode == 2
    assert "unrecognized arguments" in proc.stderr


# --------------------------------------------------------------------------- the documentation site


def test_getting_started_names_the_public_api():
    text = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    assert "six names" in text and len(xlsce.__all__) == 6
    assert [n for n in xlsce.__all__ if f"xlsce.{n}`" not in text] == []


class _Assets(HTMLParser):
    """The scripts and stylesheets a page loads."""

    def __init__(self):
        super().__init__()
        self.scripts, self.stylesheets = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.scripts.append(attrs["src"])
        elif tag == "link" and "stylesheet" in (attrs.get("rel") or "").split():
            self.stylesheets.append(attrs["href"])


def _remote(url):
    return url.startswith(("http:", "https:", "//")) or ":" in url.split("/", 1)[0]


@pytest.mark.slow
def test_site_loads_nothing_from_the_network(tmp_path):
    _need("sphinx", "furo", "myst_parser", "mathjax")
    out = tmp_path / "html"
    proc = _run("-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(out))
    assert proc.returncode == 0, proc.stderr[-5000:]
    pages = sorted(out.rglob("*.html"))
    assert len(pages) >= 8
    mathjax_pages = 0
    for page in pages:
        assets = _Assets()
        assets.feed(page.read_text(encoding="utf-8"))
        remote = [u for u in assets.scripts + assets.stylesheets if _remote(u)]
        assert remote == [], f"{page.relative_to(out)} loads {remote}"
        for url in assets.scripts + assets.stylesheets:
            target = (page.parent / url.split("?", 1)[0]).resolve()
            assert target.is_file(), f"{page.relative_to(out)}: {url} is not in the site"
        mathjax_pages += any(u.endswith("_static/mathjax/tex-mml-chtml.js") for u in assets.scripts)
    assert mathjax_pages >= 3  # what-it-computes, api, migrating, ... have formulas
    # the fonts MathJax's CommonHTML output loads, relative to its script
    assert list((out / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
