"""The ``backend`` fixture: numpy_readonly's inputs are read-only; a marker's skip carries its reason, its xfail is
strict, and a bad marker is an error.

test_skip_has_its_reason_and_xfail_is_strict runs pytest in a subprocess, on a small test file next to a copy of this directory's conftest.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import conftest
import numpy as np
import pytest

MARKED = """
import pytest


@pytest.mark.skip_xp_backend("numpy_readonly", "array_api_strict", "jax", "torch", reason="not this one")
@pytest.mark.xfail_xp_backend("numpy", reason="fails on purpose")
def test_fails_on_numpy(backend):
    assert backend.name != "numpy"


@pytest.mark.skip_xp_backend("numpy_readonly", "array_api_strict", "jax", "torch", reason="not this one")
@pytest.mark.xfail_xp_backend("numpy", reason="does not fail")
def test_passes_on_numpy(backend):
    pass
"""


def test_numpy_readonly_gives_read_only_copies():
    b = conftest.Backend("numpy_readonly")
    a = np.arange(6.0).reshape(2, 3)
    for got in (b.asarray(a), b.asarray(a, dtype=np.float32), b.astype(b.asarray(a), "float16"), b.asarray(2.0)):
        assert isinstance(got, np.ndarray) and not got.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            got[...] = 0
    assert a.flags.writeable and b.asarray(a) is not a  # the test's own array is left as it was
    np.testing.assert_array_equal(b.asarray(a), a)


def _pytest(tmp_path, source):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_marked.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rsxX", "--strict-markers", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )


def test_skip_has_its_reason_and_xfail_is_strict(tmp_path):
    proc = _pytest(tmp_path, MARKED)
    out = proc.stdout
    assert proc.returncode == 1, out  # the unexpected pass fails the run
    assert "[XPASS(strict)] numpy: does not fail" in out, out
    assert "XFAIL test_marked.py::test_fails_on_numpy[numpy] - numpy: fails on purpose" in out, out
    assert out.count("not this one") >= 2, out  # the skips, with their reason
    assert "1 failed" in out and "1 xfailed" in out, out


@pytest.mark.parametrize(
    "mark, message",
    [
        (pytest.mark.skip_xp_backend("numpy"), "needs a reason"),
        (pytest.mark.skip_xp_backend("nunpy", reason="a typo"), "unknown"),
        (pytest.mark.xfail_xp_backend(reason="which backend?"), "names no backend"),
        (pytest.mark.skip_xp_backend("numpy", reason="r", strict=True), "unexpected keywords"),
    ],
)
def test_bad_marker_is_an_error(mark, message):
    with pytest.raises(pytest.UsageError, match=message):
        conftest.pytest_collection_modifyitems([_Item(mark, fixturenames=("backend",))])


def test_marker_without_the_fixture_is_an_error():
    with pytest.raises(pytest.UsageError, match="needs the `backend` fixture"):
        conftest.pytest_collection_modifyitems([_Item(pytest.mark.skip_xp_backend("numpy", reason="r"))])


class _Item:
    """What pytest_collection_modifyitems reads of a test item."""

    def __init__(self, mark, fixturenames=()):
        self.mark, self.fixturenames, self.nodeid = mark.mark, fixturenames, "test_it"

    def iter_markers(self, name):
        return [self.mark] if self.mark.name == name else []
