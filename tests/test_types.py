"""The types that a user's checker sees: a small user script, checked by pyright and mypy.

The script (``USER_SCRIPT``) asserts with ``assert_type`` what comes back on NumPy, JAX and PyTorch
(the logits' array type; a tuple with ``return_lse=True``), and marks each mistake a checker must
catch (``reduction="avg"``, a misspelt name, ``.backward()`` on a tuple...) with ``# type: ignore``:
both checkers run with unused ignores as errors, so a mistake that is not caught fails the test.
One ignore on a correct line (``CONTROL``) must be reported, which shows that the check is on.
xlsce is found as an installed package would be (``PYTHONPATH``; its ``py.typed`` says it is typed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USER_SCRIPT = """\
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
import torch
from typing_extensions import assert_type

import xlsce
import xlsce.keras
import xlsce.torch

F64 = npt.NDArray[np.float64]

# NumPy
z: F64 = np.zeros((4, 3))
y: npt.NDArray[np.int64] = np.array([0, 1, 2, 0])
assert_type(xlsce.cross_entropy(z, y), F64)
assert_type(xlsce.cross_entropy(z, y, label_smoothing=0.1, reduction="none", smoothing="exclusive"), F64)
loss, lse = xlsce.cross_entropy(z, y, return_lse=True)
assert_type(loss, F64)
assert_type(lse, F64)
flag = bool(len(y))
assert_type(xlsce.cross_entropy(z, y, return_lse=flag), F64 | tuple[F64, ...])
assert_type(xlsce.cross_entropy(z, y, return_token_accuracy=True), tuple[F64, F64])
assert_type(xlsce.cross_entropy(z, y, return_lse=True, return_token_accuracy=True), tuple[F64, F64, F64])
assert_type(xlsce.value_and_grad(z, y, label_smoothing=0.1, weight=np.ones(3)), tuple[F64, F64])
h: F64 = np.ones((4, 2))
w: F64 = np.ones((3, 2))
assert_type(xlsce.linear_cross_entropy(h, w, y, chunk_size=2), F64)
assert_type(xlsce.linear_cross_entropy(h, w, y, return_lse=True), tuple[F64, F64])
loss, (dh, dw, db) = xlsce.linear_value_and_grad(h, w, y, label_smoothing=0.1)
assert_type(dh, F64)
assert_type(db, F64 | None)
loss_fn = xlsce.CrossEntropyLoss(label_smoothing=0.1, reduction="sum", axis=-1)
assert_type(loss_fn(z, y), F64)
assert_type(loss_fn.value_and_grad(z, y), tuple[F64, F64])

# JAX
zj = jnp.zeros((4, 3))
yj = jnp.array([0, 1, 2, 0])
assert_type(xlsce.cross_entropy(zj, yj), jax.Array)
assert_type(xlsce.cross_entropy(zj, yj, return_lse=True), tuple[jax.Array, jax.Array])
assert_type(xlsce.value_and_grad(zj, yj, z_loss=1e-4, softcap=30.0), tuple[jax.Array, jax.Array])

# PyTorch
zt = torch.zeros(4, 3, requires_grad=True)
yt = torch.tensor([0, 1, 2, 0])
lt = xlsce.cross_entropy(zt, yt, axis=1, where=yt >= 0, ignore_index=None)
assert_type(lt, torch.Tensor)
lt.backward()
lt, lse_t = xlsce.cross_entropy(zt, yt, return_lse=True)
assert_type(lse_t, torch.Tensor)
module = xlsce.torch.CrossEntropyLoss(weight=torch.ones(3), label_smoothing=0.1, smoothing="exclusive")
assert_type(module.forward(zt, yt), torch.Tensor)

# Keras
keras_loss = xlsce.keras.SparseCrossEntropy(from_logits=True, ignore_class=-1, reduction="sum", label_smoothing=0.1)

# mistakes that a checker catches
xlsce.cross_entropy(z, y, reduction="avg")  # type: ignore
xlsce.cross_entropy(z, y, smoothing="fairseq")  # type: ignore
xlsce.cross_entropy(z, y, label_smoothing="0.1")  # type: ignore
xlsce.cross_entropy(z, y, return_lse=True).backward()  # type: ignore
xlsce.cross_entropy(zt, yt, return_lse=True).backward()  # type: ignore
xlsce.cross_entropy([0.0, 1.0], y)  # type: ignore
xlsce.cross_entropy(z, y, axis=1, reducton="sum")  # type: ignore
xlsce.CrossEntropyLoss(reduction="avg")  # type: ignore
xlsce.CrossEntropyLoss(return_lse=True)  # type: ignore
xlsce.linear_value_and_grad(h, w, y, axis=0)  # type: ignore
xlsce.torch.CrossEntropyLoss(reduction="avg")  # type: ignore
xlsce.keras.CrossEntropy(reduction="avg")  # type: ignore
xlsce.cross_entropyy  # type: ignore
"""
CONTROL = "assert_type(xlsce.cross_entropy(z, y), F64)  # type: ignore\n"  # nothing to ignore: must be reported


def _tool(name):
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"{name} not installed, and CI must run every test")
        pytest.skip(f"{name} not installed")
    return path


def _script(tmp_path):
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT + CONTROL)
    return script, USER_SCRIPT.count("\n") + 1  # CONTROL's line


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_pyright_user_script(tmp_path):
    script, control = _script(tmp_path)
    (tmp_path / "pyrightconfig.json").write_text(
        json.dumps({"reportUnnecessaryTypeIgnoreComment": "error", "pythonVersion": "3.10"})
    )
    proc = subprocess.run(
        [_tool("pyright"), "--outputjson", "--pythonpath", sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(proc.stdout)
    errors = [(d["range"]["start"]["line"] + 1, d["message"]) for d in report["generalDiagnostics"]]
    errors = [e for e in errors if e[0] != control or "Unnecessary" not in e[1]]
    assert report["summary"]["errorCount"] == 1 + len(errors), report["summary"]  # the control, and only it
    assert errors == [], errors


@pytest.mark.slow
def test_mypy_user_script(tmp_path):
    script, control = _script(tmp_path)
    (tmp_path / "mypy.ini").write_text(
        "[mypy]\nwarn_unused_ignores = True\npython_version = 3.10\n[mypy-xlsce.*]\nignore_errors = True\n"
    )
    proc = subprocess.run(
        [_tool("mypy"), "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"), str(script)],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert lines == [f'user.py:{control}: error: Unused "type: ignore" comment  [unused-ignore]'], proc.stdout[-6000:]


@pytest.mark.slow
def test_public_api_fully_typed():
    """pyright --verifytypes: every public symbol of xlsce, xlsce.torch and xlsce.keras has a known type."""
    proc = subprocess.run(
        [_tool("pyright"), "--verifytypes", "xlsce", "--ignoreexternal", "--outputjson"],
        cwd=ROOT.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    import xlsce

    public = [f"xlsce.{name}" for name in xlsce.__all__]
    public += [f"xlsce.torch.{name}" for name in ("CrossEntropyLoss",)]
    public += [f"xlsce.keras.{name}" for name in ("SparseCrossEntropy", "CrossEntropy")]
    symbols = json.loads(proc.stdout)["typeCompleteness"]["symbols"]
    ours = [s for s in symbols if any(s["name"] == p or s["name"].startswith(p + ".") for p in public)]
    assert {s["name"] for s in ours} >= set(public)
    unknown = [
        (s["name"], [d["message"] for d in s["diagnostics"] if "docstring" not in d["message"]])
        for s in ours
        if not s["isTypeKnown"] or any("docstring" not in d["message"] for d in s["diagnostics"])
    ]
    assert unknown == [], unknown


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is Python 3.11's")
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_overloads_list_every_keyword(name):
    """A keyword added to the function must be added to each of its overloads (else a checker refuses it)."""
    import inspect
    import typing

    import xlsce
    from xlsce import _typing

    function = getattr(xlsce, name)
    overloads = typing.get_overloads(function)
    assert len(overloads) >= 3  # return_lse False, True, bool
    want = set(inspect.signature(function).parameters)
    spread = {"cross_entropy": _typing.CallKeywords, "linear_cross_entropy": _typing.LinearCallKeywords}[name]
    for overload in overloads:
        named = [p for p, v in inspect.signature(overload).parameters.items() if v.kind is not v.VAR_KEYWORD]
        assert set(named).isdisjoint(spread.__annotations__)
        assert set(named) | set(spread.__annotations__) == want


def test_keywords_typeddicts_match_the_runtime():
    """CrossEntropyLoss(**keywords) and linear_value_and_grad(**keywords) are typed by TypedDicts of the
    keywords that the runtime accepts (xlsce._KEYWORDS; the linear functions' have no axis)."""
    import xlsce
    from xlsce import _typing

    assert set(_typing.Keywords.__annotations__) | set(_typing.LinearKeywords.__annotations__) == xlsce._KEYWORDS
    assert set(_typing.LinearKeywords.__annotations__) == xlsce._KEYWORDS - {"axis"}


def test_annotations_import_nothing():
    code = "import sys, xlsce; print(sorted(m for m in ('xlsce._typing', 'typing_extensions') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_py_typed_ships():
    """PEP 561: the marker is there and is package data, so wheels carry it (and checkers trust the annotations)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    assert (ROOT / "xlsce" / "py.typed").is_file()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["xlsce"]
    assert {"pyright", "mypy"} <= {
        r.split(">")[0].split("=")[0] for r in meta["project"]["optional-dependencies"]["test"]
    }
