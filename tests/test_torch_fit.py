"""PyTorch's habits (issue 17 items 1, 2, 3, 5; issue 18 item 10), each checked against torch's own loss.

torch.func.grad/jacrev/vjp and torch.vmap, meta tensors and torch.export, torch.jit.script's error,
autocast's dtype, a quiet first torch.compile, one compile for dynamic shapes, and the functional's
layout and the module's repr.
"""

import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import xlsce  # noqa: E402
import xlsce.torch as xt  # noqa: E402

ROOT = str(pathlib.Path(__file__).resolve().parents[1])


def _problem(n=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)


# --------------------------------------------------------------------------- torch.func and vmap


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_func_grad_jacrev_vjp_match_torch(reduction, eps):
    z, y = _problem()
    ours = lambda z: xlsce.cross_entropy(z, y, label_smoothing=eps, reduction=reduction)  # noqa: E731
    ref = lambda z: F.cross_entropy(z, y, label_smoothing=eps, reduction=reduction)  # noqa: E731
    torch.testing.assert_close(torch.func.grad(ours)(z), torch.func.grad(ref)(z))
    torch.testing.assert_close(torch.func.jacrev(ours)(z), torch.func.jacrev(ref)(z))
    (v1, f1), (v2, f2) = torch.func.vjp(ours, z), torch.func.vjp(ref, z)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(f1(torch.tensor(2.0, dtype=z.dtype)), f2(torch.tensor(2.0, dtype=z.dtype)))


def test_jacrev_of_per_position_loss_matches_torch():
    z, y = _problem()
    ours = torch.func.jacrev(lambda z: xlsce.cross_entropy(z, y, reduction="none", label_smoothing=0.2))(z)
    ref = torch.func.jacrev(lambda z: F.cross_entropy(z, y, reduction="none", label_smoothing=0.2))(z)
    torch.testing.assert_close(ours, ref)


def test_vmap_and_vmap_of_grad_match_torch():
    g = torch.Generator().manual_seed(1)
    zb, yb = torch.randn(3, 6, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (3, 6), generator=g)
    loss_fn, ref_fn = xt.CrossEntropyLoss(label_smoothing=0.1), torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(torch.vmap(loss_fn)(zb, yb), torch.vmap(ref_fn)(zb, yb))
    torch.testing.assert_close(
        torch.vmap(lambda z, y: xlsce.cross_entropy(z, y, label_smoothing=0.1))(zb, yb), torch.vmap(ref_fn)(zb, yb)
    )
    # per-example gradients
    ours = torch.vmap(torch.func.grad(loss_fn))(zb, yb)
    torch.testing.assert_close(ours, torch.vmap(torch.func.grad(ref_fn))(zb, yb))
    # value_and_grad's torch path under vmap: the gradient of each problem
    losses, grads = torch.vmap(lambda z, y: xlsce.value_and_grad(z, y, label_smoothing=0.1))(zb, yb)
    torch.testing.assert_close(losses, torch.vmap(ref_fn)(zb, yb))
    torch.testing.assert_close(grads, ours)


def test_vmap_over_targets_only_and_autograd_through_vmap():
    z, _ = _problem()
    z.requires_grad_(True)
    yb = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(2))
    ours = torch.vmap(lambda y: xlsce.cross_entropy(z, y, label_smoothing=0.1), in_dims=0)(yb)
    # torch's own loss fails here (an in-place update of z's unbatched gradient buffer): a loop is the reference
    ref = torch.stack([F.cross_entropy(z, y, label_smoothing=0.1) for y in yb])
    torch.testing.assert_close(ours, ref)
    (g1,) = torch.autograd.grad(ours.sum(), z)
    (g2,) = torch.autograd.grad(ref.sum(), z)
    torch.testing.assert_close(g1, g2)


def test_func_grad_with_weight_ignore_and_return_lse():
    z, y = _problem(8, 4)
    y[::3] = -100
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    ours = torch.func.grad(lambda z: xlsce.cross_entropy(z, y, weight=w, label_smoothing=0.1))(z)
    ref = torch.func.grad(lambda z: F.cross_entropy(z, y, weight=w, label_smoothing=0.1))(z)
    torch.testing.assert_close(ours, ref)

    def with_lse(z):
        loss, lse = xlsce.cross_entropy(z, y, return_lse=True)
        return loss + lse.sum()

    expected = torch.func.grad(lambda z: F.cross_entropy(z, y) + torch.logsumexp(z, 1).sum())(z)
    torch.testing.assert_close(torch.func.grad(with_lse)(z), expected)


def test_linear_cross_entropy_under_func_grad_and_vmap():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (7,), generator=g)
    ours = torch.func.grad(lambda h, w: xlsce.linear_cross_entropy(h, w, y, chunk_size=3), argnums=(0, 1))(h, w)
    ref = torch.func.grad(lambda h, w: F.cross_entropy(h @ w.T, y), argnums=(0, 1))(h, w)
    torch.testing.assert_close(ours, ref)
    hb = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        torch.vmap(lambda h: xlsce.linear_cross_entropy(h, w, y))(hb),
        torch.vmap(lambda h: F.cross_entropy(h @ w.T, y))(hb),
    )


def test_second_derivative_still_raises_under_func():
    z, y = _problem()
    # torch's loss has a Hessian; xlsce's analytic backward is first order only, and says so
    torch.func.hessian(lambda z: F.cross_entropy(z, y))(z)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.func.jacrev(torch.func.grad(lambda z: xlsce.cross_entropy(z, y)))(z)
    z.requires_grad_(True)
    (g,) = torch.autograd.grad(xlsce.cross_entropy(z, y), z, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        g.sum().backward()


# --------------------------------------------------------------------------- meta, fake, export, script


def test_meta_and_fake_tensors_shape_inference():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for reduction, shape in (("mean", ()), ("none", (8, 3))):
        z = torch.empty(8, 5, 3, device="meta", requires_grad=True)
        y = torch.empty(8, 3, device="meta", dtype=torch.long)
        ours, ref = xt.cross_entropy(z, y, reduction=reduction), F.cross_entropy(z, y, reduction=reduction)
        assert ours.device.type == "meta" and ours.shape == ref.shape == shape
    with FakeTensorMode():
        z = torch.empty(8, 5, requires_grad=True)
        y = torch.zeros(8, dtype=torch.long)
        ours = xt.CrossEntropyLoss(label_smoothing=0.1)(z, y)
        ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(z, y)
        assert ours.shape == ref.shape == () and ours.dtype == ref.dtype
        ours.backward()
        assert z.grad.shape == (8, 5)


class _Model(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.linear = torch.nn.Linear(4, 5)
        self.loss = loss

    def forward(self, x, y):
        return self.loss(self.linear(x), y)


def test_torch_export_like_torch():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 5, (6,))
    for loss in (torch.nn.CrossEntropyLoss(label_smoothing=0.1), xt.CrossEntropyLoss(label_smoothing=0.1)):
        model = _Model(loss)
        exported = torch.export.export(model, (x, y))
        torch.testing.assert_close(exported.module()(x, y), model(x, y))
    torch.testing.assert_close(model(x, y), F.cross_entropy(model.linear(x), y, label_smoothing=0.1))


def test_jit_script_fails_with_a_clear_error():
    torch.jit.script(torch.nn.CrossEntropyLoss())  # torch's own scripts
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.compile.*torch.export"):
        torch.jit.script(xt.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="torch.compile"):  # as a submodule too
        torch.jit.script(_Model(xt.CrossEntropyLoss()))


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtype_and_values_match_torch(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    with torch.autocast("cpu", dtype=dtype):
        assert torch.is_autocast_enabled("cpu")
        z = lin(x)
        assert z.dtype == dtype
        ours = xt.CrossEntropyLoss(label_smoothing=0.1)(z, y)
        ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(z, y)
        assert ours.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref)
        (g1,) = torch.autograd.grad(ours, lin.weight, retain_graph=True)
        (g2,) = torch.autograd.grad(ref, lin.weight)
        torch.testing.assert_close(g1, g2)
        loss, grad = xlsce.value_and_grad(z, y, label_smoothing=0.1, axis=1)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(loss, ref)
    # outside autocast, half-precision logits give a loss in their dtype, as torch's
    assert xlsce.cross_entropy(z.detach(), y).dtype == F.cross_entropy(z.detach(), y).dtype == dtype


# --------------------------------------------------------------------------- torch.compile


_QUIET = """
import warnings
warnings.simplefilter("always")
import torch, xlsce.torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
loss_fn = LOSS(label_smoothing=0.1, weight=torch.rand(5) + 0.5)
step = torch.compile(lambda x, y: loss_fn(model(x), y), fullgraph=True)
x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
with warnings.catch_warnings(record=True) as caught:
    loss = step(x, y)
    loss.backward()
ref = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1, weight=loss_fn.weight)
assert torch.allclose(loss, ref), (loss, ref)
print("WARNINGS", sorted(str(w.message)[:200] for w in caught))
"""


def _first_compile(loss):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TORCH_LOGS", None)
    code = _QUIET.replace("LOSS", loss)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]  # fullgraph=True: a graph break would have raised
    return run.stdout, run.stderr


def test_first_compile_is_quiet_and_whole():
    """A fresh process's first compile of model + loss warns exactly as with torch's own loss (torch
    2.13's compile itself warns that torch.jit.script_method is deprecated), and nothing on stderr."""
    ours, ours_err = _first_compile("xlsce.torch.CrossEntropyLoss")
    ref, ref_err = _first_compile("torch.nn.CrossEntropyLoss")
    assert "lru_cache" not in ours + ours_err
    assert ours == ref, (ours, ref)
    assert ours_err == ref_err == "", ours_err[-3000:]


def test_no_graph_break():
    z, y = _problem()
    explanation = torch._dynamo.explain(lambda z, y: xt.cross_entropy(z, y, label_smoothing=0.1))(z, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _count_compiles(fn, calls):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, dynamic=True)
    for args in calls:
        compiled(*args)
    return counter.frame_count


def test_dynamic_shapes_compile_once():
    torch.manual_seed(0)
    sizes = (8, 16, 24, 40)
    ce = [(torch.randn(n, 10, requires_grad=True), torch.randint(0, 10, (n,))) for n in sizes]
    ref = _count_compiles(lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1), ce)
    assert ref == 1
    assert _count_compiles(lambda z, y: xlsce.cross_entropy(z, y, label_smoothing=0.1), ce) == ref
    lin = [
        (torch.randn(n, 6, requires_grad=True), torch.randn(10, 6, requires_grad=True), torch.randint(0, 10, (n,)))
        for n in sizes
    ]
    assert _count_compiles(lambda h, w, y: xlsce.linear_cross_entropy(h, w, y, label_smoothing=0.1), lin) == 1


def test_eager_calls_between_compiled_calls_do_not_recompile():
    import numpy as np
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    f = torch.compile(lambda z, y: xlsce.cross_entropy(z, y, z_loss=1e-3), backend=counter)
    z, y = _problem()
    f(z, y)
    xlsce.cross_entropy(np.ones((2, 3)), np.array([0, 1]), label_smoothing=0.3)  # grows xlsce's caches
    xlsce.cross_entropy(z.float(), y, label_smoothing=0.2)
    f(z, y)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- the functional and the module


def test_functional_is_torch_layout_on_square_input():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)  # (N, C, L) with C == L
    y = torch.randint(0, 4, (3, 4), generator=g)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    for kwargs in ({}, {"label_smoothing": 0.2}, {"weight": w, "reduction": "sum"}, {"reduction": "none"}):
        torch.testing.assert_close(xt.cross_entropy(x, y, **kwargs), F.cross_entropy(x, y, **kwargs))
    # positional arguments in F.cross_entropy's order
    torch.testing.assert_close(
        xt.cross_entropy(x, y, w, None, 1, None, "mean", 0.1), F.cross_entropy(x, y, w, None, 1, None, "mean", 0.1)
    )
    # unbatched (C,) input, and probabilities
    torch.testing.assert_close(xt.cross_entropy(x[0, :, 0], y[0, 0]), F.cross_entropy(x[0, :, 0], y[0, 0]))
    p = torch.softmax(torch.randn(3, 4, 4, generator=g, dtype=torch.float64), 1)
    torch.testing.assert_close(xt.cross_entropy(x, p, label_smoothing=0.1), F.cross_entropy(x, p, label_smoothing=0.1))
    # xlsce's keywords
    loss, lse = xt.cross_entropy(x, y, return_lse=True)
    torch.testing.assert_close(lse, torch.logsumexp(x, 1))
    torch.testing.assert_close(xt.cross_entropy(x, y, z_loss=0.1), F.cross_entropy(x, y) + 0.1 * (lse**2).mean())
    with pytest.raises(ValueError, match="size_average"):
        xt.cross_entropy(x, y, size_average=True)


def test_extra_repr_shows_every_non_default_setting():
    assert repr(xt.CrossEntropyLoss()) == "CrossEntropyLoss()"
    loss = xt.CrossEntropyLoss(
        weight=torch.ones(3), ignore_index=0, reduction="sum", label_smoothing=0.1, smoothing="exclusive",
        z_loss=1e-4, softcap=30.0,
    )  # fmt: skip
    text = repr(loss)
    for part in ("weight=<(3,) torch.float32>", "ignore_index=0", "reduction='sum'", "label_smoothing=0.1",
                 "smoothing='exclusive'", "z_loss=0.0001", "softcap=30.0"):  # fmt: skip
        assert part in text, text
    assert repr(xt.CrossEntropyLoss(label_smoothing=0.1)) == "CrossEntropyLoss(label_smoothing=0.1)"
