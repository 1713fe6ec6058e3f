"""Function transformations: jax.jit / vmap / grad, torch.compile, and the torch nn.Module drop-in.

* JAX: ``jax.jit``, ``jax.vmap`` over a batch of problems, ``jax.grad`` of the jitted
  loss and ``jax.jit(jax.grad(...))`` equal the eager results (float64).
* PyTorch: ``torch.compile(fullgraph=True)`` traces forward and backward without a
  graph break (fullgraph=True raises on one) and equals eager.
* ``xlsce.torch.CrossEntropyLoss`` equals ``torch.nn.CrossEntropyLoss`` for the same
  arguments, including a weight buffer moved with ``.double()``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import xp_assert_close
from problems import logits_problem

import xlsce

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)
F = torch.nn.functional


SHAPE = (6, 5)
PROBLEM = dict(scale=2.0, ignore=-100, where=True, weight=(0.5, 2.0))  # logits_problem(SHAPE, seed=..., **PROBLEM)


# --------------------------------------------------------------------------- jax

JAX_CASES = {
    "uniform-mean": dict(label_smoothing=0.1),
    "exclusive-sum": dict(label_smoothing=0.3, smoothing="exclusive", reduction="sum"),
    "none-zloss-softcap": dict(label_smoothing=0.2, reduction="none", z_loss=0.01, softcap=4.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(JAX_CASES))
def test_jax_jit_equals_eager(name):
    x, y, w, where, *_ = logits_problem(SHAPE, seed=1, **PROBLEM)
    kw = JAX_CASES[name]
    X, Y, W, M = map(jnp.asarray, (x, y, w, where))

    def f(z, t, weight, mask):
        return xlsce.cross_entropy(z, t, weight=weight, where=mask, **kw)

    eager = f(X, Y, W, M)
    jitted = jax.jit(f)(X, Y, W, M)
    xp_assert_close(jitted, eager, rtol=1e-13, atol=1e-15)
    # jit of value_and_grad (the analytic backward traced by jax)
    e_loss, e_grad = xlsce.value_and_grad(X, Y, weight=W, where=M, **kw)
    j_loss, j_grad = jax.jit(lambda *a: xlsce.value_and_grad(*a[:2], weight=a[2], where=a[3], **kw))(X, Y, W, M)
    xp_assert_close(j_loss, e_loss, rtol=1e-13, atol=1e-15)
    xp_assert_close(j_grad, e_grad, rtol=1e-13, atol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(JAX_CASES))
def test_jax_grad_of_jit_and_jit_of_grad(name):
    x, y, w, where, _, rng = logits_problem(SHAPE, seed=2, **PROBLEM)
    kw = JAX_CASES[name]
    X, Y, W, M = map(jnp.asarray, (x, y, w, where))
    ct = jnp.asarray(rng.normal(size=y.shape)) if kw.get("reduction") == "none" else 1.0

    def f(z):
        return jnp.sum(ct * xlsce.cross_entropy(z, Y, weight=W, where=M, **kw))

    _, reference = xlsce.value_and_grad(
        x, y, weight=w, where=where, cotangent=np.asarray(ct) if kw.get("reduction") == "none" else None, **kw
    )
    eager = jax.grad(f)(X)
    xp_assert_close(eager, reference, rtol=1e-12, atol=1e-14, err_msg="jax.grad (eager) vs numpy analytic")
    xp_assert_close(jax.grad(jax.jit(f))(X), eager, rtol=1e-13, atol=1e-15, err_msg="jax.grad(jax.jit(f))")
    xp_assert_close(jax.jit(jax.grad(f))(X), eager, rtol=1e-13, atol=1e-15, err_msg="jax.jit(jax.grad(f))")
    xp_assert_close(jax.jit(jax.grad(jax.jit(f)))(X), eager, rtol=1e-13, atol=1e-15)


def test_jax_jit_retraces_nothing_on_new_values():
    """A jitted loss is traced once per shape: new target/mask values reuse the compiled function."""
    traces = []

    @jax.jit
    def f(z, t, mask):
        traces.append(1)
        return xlsce.cross_entropy(z, t, where=mask, label_smoothing=0.1)

    for seed in range(3):
        x, y, _, where, *_ = logits_problem(SHAPE, seed=seed, **dict(PROBLEM, ignore=None))
        got = f(jnp.asarray(x), jnp.asarray(y), jnp.asarray(where))
        xp_assert_close(got, xlsce.cross_entropy(x, y, where=where, label_smoothing=0.1), rtol=1e-13, atol=1e-15)
    assert len(traces) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_jax_vmap_over_problems(kind, reduction):
    """vmap over a batch of B problems (logits (B, N, K)) equals B eager calls; so does vmap of grad."""
    rng = np.random.default_rng(3)
    b, n, k = 4, 5, 3
    x = rng.normal(size=(b, n, k))
    if kind == "index":
        t = rng.integers(0, k, size=(b, n))
        t[:, 1] = -100
        t[2, :] = -100  # one problem with every position ignored: its mean is 0
    else:
        t = rng.dirichlet(np.ones(k), size=(b, n))
    where = rng.random((b, n)) < 0.8
    w = rng.uniform(0.5, 2.0, size=k)
    kw = dict(label_smoothing=0.2, smoothing="exclusive", reduction=reduction)
    X, T, M, W = map(jnp.asarray, (x, t, where, w))

    def f(z, tt, mask):  # weight is shared (closed over), the rest is batched
        return xlsce.cross_entropy(z, tt, where=mask, weight=W, **kw)

    batched = jax.vmap(f)(X, T, M)
    eager = np.stack([np.asarray(xlsce.cross_entropy(x[i], t[i], where=where[i], weight=w, **kw)) for i in range(b)])
    xp_assert_close(batched, eager, rtol=1e-13, atol=1e-15)
    xp_assert_close(jax.jit(jax.vmap(f))(X, T, M), eager, rtol=1e-13, atol=1e-15)

    grads = jax.vmap(jax.grad(lambda z, tt, mask: jnp.sum(f(z, tt, mask))))(X, T, M)
    expected = np.stack([xlsce.value_and_grad(x[i], t[i], where=where[i], weight=w, **kw)[1] for i in range(b)])
    xp_assert_close(grads, expected, rtol=1e-12, atol=1e-14)
    if kind == "index":
        np.testing.assert_array_equal(np.asarray(grads)[2], 0.0)


@pytest.mark.slow
def test_jax_vmap_with_in_axes_over_the_class_weights():
    """vmap over several weight vectors for one problem: each equals the eager call with that weight."""
    x, y, *_, rng = logits_problem(SHAPE, seed=4, **PROBLEM)
    ws = rng.uniform(0.2, 3.0, size=(3, x.shape[-1]))
    got = jax.vmap(lambda w: xlsce.cross_entropy(jnp.asarray(x), jnp.asarray(y), weight=w, label_smoothing=0.1))(
        jnp.asarray(ws)
    )
    expected = [float(xlsce.cross_entropy(x, y, weight=w, label_smoothing=0.1)) for w in ws]
    xp_assert_close(got, np.array(expected), rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- torch.compile

COMPILE_CASES = [
    # (backend, kind, keywords): inductor codegen for one, aot_eager (traces forward and backward, no codegen) for
    # the other
    pytest.param(
        "inductor", "index", dict(label_smoothing=0.1, ignore_index=-100, reduction="mean"), id="inductor-index"
    ),
    pytest.param(
        "aot_eager",
        "prob",
        dict(label_smoothing=0.2, smoothing="exclusive", reduction="none", z_loss=0.01),
        id="aot_eager-prob-where-none",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend, kind, kw", COMPILE_CASES)
def test_torch_compile_fullgraph_forward_backward(compile_backend, kind, kw):
    torch._dynamo.reset()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3, 2))
    if kind == "index":
        t = torch.tensor([[0, 1], [2, -100], [1, 1], [0, 2]])
        where = None
    else:
        p = rng.dirichlet(np.ones(3), size=(4, 2))
        t = torch.from_numpy(np.moveaxis(p, -1, 1).copy())
        where = torch.from_numpy(rng.random((4, 2)) < 0.7)
    w = torch.from_numpy(rng.uniform(0.5, 2.0, size=3))
    ct = torch.from_numpy(rng.normal(size=(4, 2))) if kw["reduction"] == "none" else torch.ones((), dtype=torch.float64)

    def f(z, target, weight, mask):
        return xlsce.cross_entropy(z, target, weight=weight, where=mask, axis=1, **kw)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=compile_backend)):  # fullgraph=True: a graph break raises
        xt = torch.tensor(x, requires_grad=True)
        loss = fn(xt, t, w, where)
        loss.backward(ct)
        results.append((loss.detach(), xt.grad))
    (e_loss, e_grad), (c_loss, c_grad) = results
    xp_assert_close(c_loss, e_loss, rtol=1e-12, atol=1e-14, err_msg="compiled loss")
    xp_assert_close(c_grad, e_grad, rtol=1e-12, atol=1e-14, err_msg="compiled gradient")
    if kind == "index":  # and eager equals PyTorch itself
        ref = F.cross_entropy(torch.tensor(x), t, weight=w, label_smoothing=0.1)
        xp_assert_close(e_loss, ref)


@pytest.mark.slow
def test_torch_compile_fullgraph_after_other_libraries():
    # xlsce caches what it learns of types and dtypes per process; dynamo cannot compare some of those
    # keys (modules, NumPy dtypes), so the cache must stay out of a fullgraph trace whatever it holds
    torch._dynamo.reset()
    for dtype in (np.float16, np.float32, np.float64):
        for index in (np.int8, np.int32, np.int64):
            xlsce.cross_entropy(np.zeros((2, 3), dtype), np.array([0, 1], index), where=np.array([True, False]))
        xlsce.cross_entropy(np.zeros((2, 3), dtype), np.full((2, 3), 1 / 3, dtype), weight=np.ones(3, dtype))
    xlsce.cross_entropy(jax.numpy.zeros((2, 3)), jax.numpy.array([0, 1]))
    xlsce.cross_entropy(torch.zeros((2, 3), dtype=torch.float32), torch.tensor([0, 1], dtype=torch.int32))
    f = torch.compile(lambda z, y: xlsce.cross_entropy(z, y, label_smoothing=0.1), fullgraph=True, backend="aot_eager")
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 4])
    loss = f(z, y)
    loss.backward()
    xp_assert_close(loss.detach(), F.cross_entropy(z.detach(), y, label_smoothing=0.1))


FIRST_CALL_COMPILED = """
import torch, xlsce
z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
h = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 5, (8,))
ce = torch.compile(lambda z: xlsce.cross_entropy(z, y, label_smoothing=0.1), fullgraph=True, backend="aot_eager")
lin = torch.compile(lambda h, w: xlsce.linear_cross_entropy(h, w, y, chunk_size=3), fullgraph=True, backend="aot_eager")
ce(z).backward()
lin(h, w).backward()
torch.testing.assert_close(z.grad, torch.autograd.grad(torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1), z)[0])
print("ok")
"""


@pytest.mark.slow
def test_torch_compile_fullgraph_as_the_first_call_of_a_process():
    # The autograd.Function classes must exist before dynamo traces the call: a class statement in the traced
    # region is unsupported under fullgraph=True.  A fresh process, since any earlier call in this one built them.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FIRST_CALL_COMPILED], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# --------------------------------------------------------------------------- nn.Module drop-in

MODULE_CASES = [
    dict(),
    dict(label_smoothing=0.1),
    dict(weight=True, label_smoothing=0.2, reduction="sum"),
    dict(weight=True, ignore_index=1, label_smoothing=0.3),
    dict(weight=True, reduction="none", label_smoothing=0.05),
]


@pytest.mark.parametrize("shape", [(4,), (5, 4), (3, 4, 2)], ids=["unbatched", "NC", "NCd"])
@pytest.mark.parametrize("args", MODULE_CASES, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()) or "defaults")
def test_module_is_a_drop_in_for_torch_cross_entropy_loss(shape, args):
    gen = torch.Generator().manual_seed(len(shape) * 10 + len(args))
    args = dict(args)
    if args.pop("weight", False):  # a float32 weight buffer, moved to float64 by .double()
        args["weight"] = torch.rand(shape[0] if len(shape) == 1 else shape[1], generator=gen) + 0.5
    ours = xlsce.torch.CrossEntropyLoss(**args).double()
    ref = torch.nn.CrossEntropyLoss(**args).double()
    if "weight" in args:
        assert ours.weight.dtype == torch.float64 == ref.weight.dtype
        assert set(ours.state_dict()) == set(ref.state_dict()) == {"weight"}
    assert isinstance(ours, torch.nn.Module)

    k = shape[0] if len(shape) == 1 else shape[1]
    positions = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = torch.randint(0, k, positions, generator=gen)
    target.view(-1)[0] = 0 if positions else 2  # never all positions ignored (PyTorch would give NaN)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = []
    for module in (ref, ours):
        xt = x.clone().requires_grad_(True)
        loss = module(xt, target)
        loss.backward(torch.ones_like(loss))
        grads.append((loss.detach(), xt.grad))
    xp_assert_close(grads[1][0], grads[0][0], err_msg="loss")
    xp_assert_close(grads[1][1], grads[0][1], err_msg="gradient")


def test_module_probability_targets_and_defaults():
    """Probability targets through the module, and the constructor defaults of torch.nn.CrossEntropyLoss."""
    ours, ref = xlsce.torch.CrossEntropyLoss(label_smoothing=0.1), torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    assert (ours.ignore_index, ours.reduction, ours.weight) == (ref.ignore_index, ref.reduction, ref.weight)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    p = torch.softmax(torch.randn(3, 4, 2, generator=gen, dtype=torch.float64), dim=1)
    xp_assert_close(ours(x, p), ref(x, p))


def test_configured_loss_is_jittable():
    """A configured loss (xlsce.CrossEntropyLoss) is a plain callable that jax.jit accepts."""
    x, y, *_ = logits_problem(SHAPE, seed=6, **PROBLEM)
    loss_fn = xlsce.CrossEntropyLoss(label_smoothing=0.1, smoothing="exclusive")
    jitted = jax.jit(loss_fn)
    xp_assert_close(jitted(jnp.asarray(x), jnp.asarray(y)), loss_fn(x, y), rtol=1e-13, atol=1e-15)
