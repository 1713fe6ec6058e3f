"""The package's structure and its backends.

* The layout: no import cycles among xlsce's modules (module-level and in-function imports alike),
  no backend tests in the maths, frameworks imported only in their backend files.
* Conformance: every backend's primitives give what the plain array-API backend (``generic``) gives
  on the same inputs, and write into nothing but the buffer they are given to overwrite (NumPy's
  inputs are made read-only).
* No host reads off the CPU: a PyTorch call forced onto the accelerator path reads nothing back
  (``aten._local_scalar_dense``, counted by a ``TorchDispatchMode``), checks the class range with a
  device-side assertion, and runs on meta tensors.
"""

from __future__ import annotations

import ast
import pathlib
import re

import array_api_compat
import numpy as np
import pytest

import xlsce
from xlsce.backends import backend
from xlsce.backends.generic import Generic

PACKAGE = pathlib.Path(xlsce.__file__).parent
FRAMEWORKS = re.compile(r"^(torch|jax|jaxlib|dask|keras|cupy)(\.|$)")


def _modules():
    """{module name: path} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name, path, modules):
    """The package's modules that ``name`` imports (anywhere in the file), and every imported name."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, every = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            every.update(a.name for a in node.names)
            internal.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            every.add(base)
            every.update(f"{base}.{a.name}" for a in node.names)
            for a in node.names:
                sub = f"{base}.{a.name}"
                internal.add(sub if sub in modules else base)
    internal.discard(name)
    return {m for m in internal if m in modules}, every


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(edges):
    """Every elementary cycle's node set, by depth-first search (the graph is small)."""
    found = set()

    def visit(node, stack):
        for nxt in edges.get(node, ()):
            if nxt in stack:
                found.add(frozenset(stack[stack.index(nxt) :]))
            elif len(stack) < 20:
                visit(nxt, stack + [nxt])

    for start in edges:
        visit(start, [start])
    return found


def test_cycle_finder_finds_a_cycle():
    """The check can fail: a made-up graph with a cycle through an in-function import is caught."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    assert not _cycles({"a": {"b"}, "b": {"c"}})


def test_no_import_cycles():
    """Public API -> validation -> backends -> maths -> types, counting imports inside functions.
    The package's ``__init__`` re-exporting its public API is the one edge back allowed."""
    graph = _graph()
    edges = {m: {t for t in internal if t != "xlsce"} for m, (internal, _) in graph.items()}
    assert not _cycles(edges), sorted(sorted(c) for c in _cycles(edges))


def test_maths_ask_no_backend():
    """The maths take the backend as an argument and never test which one it is."""
    test = re.compile(r"\b(is_numpy|is_torch|is_jax|kind|can_branch|is_\w+_array|is_\w+_namespace)\s*\(")
    for name in ("_math.py", "_linear.py"):
        hits = [i for i, line in enumerate((PACKAGE / name).read_text().splitlines(), 1) if test.search(line)]
        assert not hits, f"{name}: backend tests at lines {hits}"


def test_frameworks_only_in_their_backend_files():
    """A framework is imported only by its own backend file (and the torch module; ``python -m xlsce``,
    the demo, runs on every installed library); array-api-compat by one module."""
    allowed = {
        "torch": {"xlsce.backends.torch", "xlsce.torch"},
        "jax": {"xlsce.backends.jax"},
        "dask": {"xlsce.backends.dask"},
        "keras": {"xlsce.keras"},
    }
    for module, (_, every) in _graph().items():
        for imported in every:
            if FRAMEWORKS.match(imported) and module != "xlsce.__main__":
                framework = imported.split(".")[0]
                assert module in allowed.get(framework, ()), f"{module} imports {imported}"
            if imported.startswith("array_api_compat"):
                assert module == "xlsce.backends._compat", f"{module} imports {imported}"


# --------------------------------------------------------------------------- conformance


def _libraries():
    out = [pytest.param("numpy", id="numpy")]
    for name in ("torch", "jax"):
        try:
            __import__(name)
        except ImportError:  # pragma: no cover - CI installs every backend
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name} not installed")))
        else:
            out.append(pytest.param(name, id=name))
    return out


class _Arrays:
    """Arrays of one library made from NumPy (NumPy's read-only, to catch a write into an input)."""

    def __init__(self, name):
        self.name = name
        if name == "torch":
            import torch

            self.make = lambda a: torch.from_numpy(np.array(a))
        elif name == "jax":
            import jax.numpy as jnp

            self.make = jnp.asarray
        else:

            def make(a):
                a = np.array(a)
                a.flags.writeable = False
                return a

            self.make = make

    def own(self, a):
        """A buffer of xlsce's own (writable): what an in-place primitive may overwrite."""
        x = self.make(a)
        return x if self.name != "numpy" else np.array(x)


def _np(a):
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


@pytest.fixture(params=_libraries())
def lib(request):
    return _Arrays(request.param)


def _pair(lib, probe):
    ops = backend(probe)
    reference = Generic(ops.xp, array_api_compat.device)
    assert type(ops) is not Generic, "each framework has a backend of its own"
    return ops, reference


def test_backend_is_chosen_once_by_type(lib):
    x = lib.make(np.ones(3))
    ops = backend(x)
    assert backend(x, x) is ops or backend(x, x).name == ops.name
    assert ops.name == lib.name


def test_primitives_match_generic(lib):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 5))
    a[1, 2] = -np.inf
    b = rng.normal(size=(6, 1))
    v = rng.normal(size=(1, 5))
    w = rng.uniform(0.5, 2, size=5)
    y = rng.integers(0, 5, size=(6, 1))
    make, own = lib.make, lib.own
    ops, ref = _pair(lib, make(a))

    cases = {
        "exp_": lambda o: o.exp_(own(a)),
        "subtract": lambda o: o.subtract(make(a), make(b)),
        "subtract out=": lambda o: o.subtract(make(a), make(b), out=own(np.zeros_like(a)) if o.inplace else None),
        "imul": lambda o: o.imul(own(a), make(b)),
        "imul_ratio": lambda o: o.imul_ratio(own(a), 0.5, make(b)),
        "imul_ratio array": lambda o: o.imul_ratio(own(a), make(b), make(b) + 2.0),
        "isub": lambda o: o.isub(own(a), make(b)),
        "isub_product": lambda o: o.isub_product(own(a), 0.3, make(v)),
        "isub_product arrays": lambda o: o.isub_product(own(a), make(b), make(v)),
        "isub_product array, float": lambda o: o.isub_product(own(a), make(b), 0.3),
        "matmul": lambda o: o.matmul(make(np.nan_to_num(a).T), make(b)),
        "addmm": lambda o: o.addmm(own(np.ones((4, 4))), make(np.nan_to_num(a[:4, :3])), make(np.ones((3, 4)))),
        "addmm None": lambda o: o.addmm(None, make(np.nan_to_num(a[:4, :3])), make(np.ones((3, 4)))),
        "iadd": lambda o: o.iadd(own(a), make(b)),
        "take_at": lambda o: o.take_at(make(a), make(y), 1),
        "take_at axis 0": lambda o: o.take_at(make(a), make(y[:5].T), 0),
        "isub_at": lambda o: o.isub_at(own(a), make(y), 0.25, 1),
        "isub_at array": lambda o: o.isub_at(own(a), make(y), make(b), 1),
        "isub_at axis 0": lambda o: o.isub_at(own(a), make(y[:5].T), make(v), 0),
        "take_classes": lambda o: o.take_classes(make(w), make(y)),
        "where0": lambda o: o.where0(make(y[:, 0] > 1), make(y[:, 0])),
        "row_dot": lambda o: o.row_dot(make(a), None, 1),
        "row_dot weights": lambda o: o.row_dot(make(a), make(v), 1),
        "row_dot axis 0": lambda o: o.row_dot(make(a), make(b), 0),
        "row_sums": lambda o: o.row_sums([make(np.nan_to_num(a)), make(b * np.ones(5))], 1),
        "cond_finite": lambda o: o.cond_finite(make(a), lambda: (make(b), None), lambda: (make(b) + 1.0, None)),
    }
    for name, case in cases.items():
        got, want = case(ops), case(ref)
        if name == "cond_finite":  # a choice of path: both must give a value of the fast path's structure
            assert len(got) == len(want), name
            continue
        if isinstance(want, list):
            for g, r in zip(got, want, strict=True):
                np.testing.assert_allclose(_np(g), _np(r), rtol=1e-13, err_msg=name)
            continue
        assert tuple(got.shape) == tuple(want.shape), name
        assert got.dtype == want.dtype, name
        np.testing.assert_allclose(_np(got), _np(want), rtol=1e-13, err_msg=name)


def test_readings_match_generic(lib):
    x = lib.make(np.array([3, -1, 7, 2]))
    ops, ref = _pair(lib, x)
    if ops.readable:
        assert ops.min_max(x) == ref.min_max(x) == (-1, 7)
        assert ops.min_max(x, lo=False) == (None, 7)
    z = lib.make(np.array([[0.0, -np.inf], [1.0, 2.0]]))
    if ops.eager:
        assert ops.all_finite(z) is False and ops.all_finite(lib.make(np.ones(3))) is True
        assert ops.number(lib.make(np.array(2.5))) == 2.5


def test_blocks_match_one_call(lib, monkeypatch):
    """The eager CPU blocks give what one call on the whole arrays gives."""
    from xlsce.backends import generic

    rng = np.random.default_rng(1)
    a = lib.make(rng.normal(size=(10, 7)))
    ops = backend(a)

    def fn(x, out=None):
        s = ops.xp.sum(x, axis=1, keepdims=True)
        return s, 1.0, False

    whole = ops.by_blocks(fn, (a,))
    monkeypatch.setattr(generic, "BLOCK_ELEMENTS", 20)  # blocks of 2 rows
    blocked = ops.by_blocks(fn, (a,))
    np.testing.assert_allclose(_np(blocked[0]), _np(whole[0]))
    assert blocked[1:] == whole[1:]


def test_generic_states_its_api_version():
    """The generic backend says which revision of the standard it needs, and runs on array-api-strict
    at that revision (2024.12: ``take_along_axis``, a Python scalar in ``where``)."""
    array_api_strict = pytest.importorskip("array_api_strict")
    from xlsce.backends import API_VERSION

    assert API_VERSION == "2024.12"
    previous = array_api_strict.get_array_api_strict_flags()["api_version"]
    array_api_strict.set_array_api_strict_flags(api_version=API_VERSION)
    try:
        z = array_api_strict.asarray([[0.0, 1.0, -np.inf], [2.0, 0.0, 1.0]])
        y = array_api_strict.asarray([1, 0])
        loss, grad = xlsce.value_and_grad(z, y, label_smoothing=0.2, weight=array_api_strict.asarray([1.0, 2.0, 1.0]))
        want, want_grad = xlsce.value_and_grad(np.asarray(z._array), np.asarray(y._array), label_smoothing=0.2,
                                               weight=np.array([1.0, 2.0, 1.0]))
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grad._array), want_grad, rtol=1e-12)
    finally:
        array_api_strict.set_array_api_strict_flags(api_version=previous)


# --------------------------------------------------------------------------- no host reads off the CPU


torch = pytest.importorskip("torch")


@pytest.fixture
def accelerator_path(monkeypatch):
    """PyTorch's eager CPU calls take the path of an accelerator: the backend they get is the one
    for a tensor off the CPU (nothing read back, a device-side assertion, no blocks)."""
    from xlsce.backends import torch as torch_backend

    cpu = backend(torch.zeros(1))
    forced = torch_backend.Torch(cpu.xp, array_api_compat.device, traced=False, on_cpu=False)
    monkeypatch.setitem(torch_backend._INSTANCES, (True, False), forced)
    return forced


def _count_reads(fn):
    """How many values ``fn`` reads back to the host (``aten._local_scalar_dense``: ``.item()``,
    ``float(t)``, ``bool(t)``), and the names of the operations it ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count() as mode:
        fn()
    return sum("_local_scalar_dense" in op for op in mode.ops), mode.ops


def _training_step(reduction="mean", **kw):
    rng = np.random.default_rng(3)
    z = torch.tensor(rng.normal(size=(64, 7)), requires_grad=True)
    y = torch.tensor(rng.integers(0, 7, size=64))
    y[::5] = -100

    def step():
        loss = xlsce.cross_entropy(z, y, reduction=reduction, **kw)
        (loss.sum() if reduction == "none" else loss).backward()

    return step


OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.1, "weight": torch.linspace(0.5, 2.0, 7, dtype=torch.float64)},
    {"label_smoothing": 0.2, "smoothing": "exclusive", "z_loss": 1e-3, "softcap": 5.0},
]


def test_host_reads_are_counted_on_the_cpu_path():
    """The counter can fail: the eager CPU path reads (the class range, the mean's denominator)."""
    reads, _ = _count_reads(_training_step(weight=torch.ones(7, dtype=torch.float64)))
    assert reads > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smoothing", "weighted", "exclusive-zloss-softcap"])
def test_no_host_reads_off_the_cpu(accelerator_path, reduction, options):
    reads, ops = _count_reads(_training_step(reduction, **options))
    assert reads == 0, [op for op in ops if "_local_scalar_dense" in op]
    assert any("_assert_async" in op for op in ops), "the class range is checked on the device"


def test_no_host_reads_off_the_cpu_value_and_grad_and_linear(accelerator_path):
    rng = np.random.default_rng(4)
    z = torch.tensor(rng.normal(size=(16, 5)))
    y = torch.tensor(rng.integers(0, 5, size=16))
    y[3] = -100
    h = torch.tensor(rng.normal(size=(16, 3)), requires_grad=True)
    w = torch.tensor(rng.normal(size=(5, 3)), requires_grad=True)

    def calls():
        xlsce.value_and_grad(z, y, label_smoothing=0.1, weight=torch.ones(5, dtype=torch.float64))
        xlsce.linear_cross_entropy(h, w, y, chunk_size=4, label_smoothing=0.1).backward()
        xlsce.linear_value_and_grad(h.detach(), w.detach(), y, chunk_size=4, label_smoothing=0.1)

    reads, ops = _count_reads(calls)
    assert reads == 0, [op for op in ops if "_local_scalar_dense" in op]


def test_off_the_cpu_results_equal_the_cpu_path(monkeypatch):
    """The accelerator path (no reads, the traced algorithm) gives the CPU path's loss and gradient."""
    from xlsce.backends import torch as torch_backend

    results = []
    for forced in (False, True):
        if forced:
            probe = torch.zeros(1)
            cpu = backend(probe)
            monkeypatch.setitem(
                torch_backend._INSTANCES,
                (True, False),
                torch_backend.Torch(cpu.xp, array_api_compat.device, traced=False, on_cpu=False),
            )
        rng = np.random.default_rng(5)
        z = torch.tensor(rng.normal(size=(40, 9)), requires_grad=True)
        z.data[0, 3] = -float("inf")
        y = torch.tensor(rng.integers(0, 9, size=40))
        y[::7] = -100
        loss = xlsce.cross_entropy(z, y, label_smoothing=0.1, weight=torch.linspace(1, 2, 9, dtype=torch.float64))
        loss.backward()
        results.append((loss.detach().numpy(), z.grad.numpy()))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-12)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-12, atol=1e-15)


def test_bad_class_index_off_the_cpu_is_a_device_assertion(accelerator_path):
    z = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="outside \\[0, 4\\)"):
        xlsce.cross_entropy(z, torch.tensor([0, 4, 1]))


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smoothing", "weighted", "exclusive-zloss-softcap"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_meta_tensors(options, reduction):
    """Forward and backward run on meta tensors (shape inference, torch.export), shapes right."""
    options = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    z = torch.empty(8, 7, 3, device="meta", dtype=torch.float32, requires_grad=True)
    y = torch.empty(8, 3, device="meta", dtype=torch.long)
    loss = xlsce.cross_entropy(z, y, axis=1, reduction=reduction, **options)
    assert loss.device.type == "meta" and tuple(loss.shape) == (() if reduction == "mean" else (8, 3))
    (loss.sum() if reduction == "none" else loss).backward()
    assert z.grad.device.type == "meta" and tuple(z.grad.shape) == (8, 7, 3)
    loss, grad = xlsce.value_and_grad(z.detach(), y, axis=1, reduction=reduction, **options)
    assert tuple(grad.shape) == (8, 7, 3) and grad.dtype == torch.float32


def test_meta_tensors_linear():
    h = torch.empty(10, 4, device="meta", requires_grad=True)
    w = torch.empty(6, 4, device="meta", requires_grad=True)
    y = torch.empty(10, device="meta", dtype=torch.long)
    loss = xlsce.linear_cross_entropy(h, w, y, chunk_size=3, label_smoothing=0.1)
    loss.backward()
    assert tuple(h.grad.shape) == (10, 4) and tuple(w.grad.shape) == (6, 4)
