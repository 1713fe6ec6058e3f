"""The package as users and packagers meet it: metadata, the sdist, the entry point, the missing-torch
message, and a documentation site that loads nothing from the network."""

from __future__ import annotations

import ast
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
