"""Device checks: xlsce on every accelerator present (torch CUDA, JAX GPU) and on the CPU.

Each test runs on the CPU (so that CI, which has no GPU, exercises this file) and on
each accelerator that this machine has; without one, those cases are skipped (an
accelerator is a device, not a backend: conftest's rule that CI must have every
backend does not apply).  Their ids contain ``cuda`` (torch) or ``gpu`` (JAX), so
``python -m pytest tests/test_devices.py -k "cuda or gpu"`` runs only them.

On each device, with class weights and ignored positions:

* ``cross_entropy`` value and gradient (torch autograd, ``jax.grad`` under ``jit``)
  against ``torch.nn.functional.cross_entropy`` / optax's formula on the same
  device, float32 and bfloat16, class axis 1 of an (N, K, L) tensor too;
* results and gradients on the input's device, in the input's dtype;
* ``torch.compile(fullgraph=True)`` forward and backward against eager;
* ``linear_cross_entropy`` (chunks not dividing N, label smoothing, z-loss,
  soft-cap, ``return_lse``) against the materialised ``cross_entropy(h @ W.T + b)``;
* ``value_and_grad`` (and ``linear_value_and_grad``) on device tensors.

bfloat16 is compared with the reference computed in float32 from the same
bfloat16 values (xlsce computes in float32 and rounds once), and loosely with the
framework's own bfloat16 loss.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig

# JAX would otherwise take 75 % of the GPU's memory at its first use, next to torch's.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import xp_assert_close  # noqa: E402
from problems import linear_problem, logits_problem  # noqa: E402

import xlsce  # noqa: E402

pytestmark = pytest.mark.slow

EPS = 0.1
IGNORE = -100


# --------------------------------------------------------------------------- devices


def _torch_cuda():
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _jax_gpu():
    """None where JAX has a GPU, else why not (JAX's own message, e.g. a plugin that failed to start)."""
    if importlib.util.find_spec("jax") is None:
        return "jax not installed"
    import jax

    try:
        return None if jax.devices("gpu") else "no JAX GPU device"
    except RuntimeError as e:  # no such platform, or its initialisation failed
        return f"no JAX GPU: {str(e)[:200]}"


def _no(why):
    return f"{why} (a device check, not a backend: CI has no GPU)"


HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_JAX = importlib.util.find_spec("jax") is not None
HAVE_OPTAX = importlib.util.find_spec("optax") is not None
TORCH_CUDA = _torch_cuda()
JAX_GPU_MISSING = _jax_gpu()

_need_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
_need_jax = pytest.mark.skipif(not HAVE_JAX, reason="jax not installed")
TORCH_DEVICES = [
    pytest.param("cpu", id="torch-cpu", marks=_need_torch),
    pytest.param(
        "cuda",
        id="torch-cuda",
        marks=[_need_torch, pytest.mark.skipif(not TORCH_CUDA, reason=_no("torch: no CUDA device"))],
    ),
]
JAX_DEVICES = [
    pytest.param("cpu", id="jax-cpu", marks=_need_jax),
    pytest.param(
        "gpu",
        id="jax-gpu",
        marks=[_need_jax, pytest.mark.skipif(JAX_GPU_MISSING is not None, reason=_no(JAX_GPU_MISSING))],
    ),
]
DTYPES = ["float32", "bfloat16"]

# Tolerances per dtype: (rtol, atol relative to the largest |reference| value).
TOL = {"float32": (1e-4, 1e-5), "bfloat16": (1e-2, 1e-2)}
NATIVE_BF16_TOL = (1e-1, 1e-1)  # against the framework's own bfloat16 loss: a sanity bound only
LINEAR_TOL = {"float32": (2e-4, 1e-4), "bfloat16": (5e-2, 2e-2)}


def _f64(a):
    """Any array (torch, JAX, NumPy; bfloat16 too) as a float64 NumPy array."""
    if hasattr(a, "detach"):
        return a.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(a).astype(np.float64)


def _close(actual, desired, tol, err_msg):
    a, d = _f64(actual), _f64(desired)
    rtol, atol_rel = tol
    scale = float(np.max(np.abs(d))) if d.size else 1.0
    xp_assert_close(a, d, rtol=rtol, atol=atol_rel * scale, err_msg=err_msg)


def _on_torch_device(x, device, dtype, what):
    assert x.device.type == device, f"{what} on {x.device}, expected {device}"
    assert x.dtype == dtype, f"{what} has dtype {x.dtype}, expected {dtype}"


def _on_jax_device(x, device, dtype, what):
    assert x.devices() == {device}, f"{what} on {x.devices()}, expected {device}"
    assert x.dtype == dtype, f"{what} has dtype {x.dtype}, expected {dtype}"


def _compile_backend(device):
    """inductor where its code generator can build (a C compiler; Python headers for triton), else aot_eager."""
    include = sysconfig.get_paths().get("include") or ""
    headers = os.path.exists(os.path.join(include, "Python.h"))
    if device == "cpu":
        ok = any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")) and headers
    else:
        ok = any(shutil.which(c) for c in (os.environ.get("CC") or "gcc", "cc", "clang")) and headers
    return "inductor" if ok else "aot_eager"


# --------------------------------------------------------------------------- problems


# logits_problem(shape, axis, seed=..., **PROBLEM): float32 logits (scale 2), int64 targets with ~10 % ignored
# (never all), float32 class weights, a float32 cotangent for reduction="none"
PROBLEM = dict(scale=2.0, ignore=IGNORE, ignored=0.1, weight=(0.5, 1.5), cotangent=True, dtype=np.float32)


def _torch_arrays(device, dtype, *arrays):
    import torch

    dt = getattr(torch, dtype)
    out = []
    for a in arrays:
        t = torch.from_numpy(a).to(device)
        out.append(t.to(dt) if t.is_floating_point() else t)
    return out


# Layouts for torch: (shape, class axis).  The (2048, 1000) logits exceed xlsce's block size
# (2**20 elements), so eager torch runs its blocked path; (8, 50, 16) is PyTorch's (N, C, d) layout.
TORCH_LAYOUTS = [
    pytest.param((2048, 1000), 1, id="NK"),
    pytest.param((8, 50, 16), 1, id="NKL-axis1"),
]


# --------------------------------------------------------------------------- (a, b) torch vs F.cross_entropy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", TORCH_LAYOUTS)
@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_cross_entropy_matches_F(device, shape, axis, dtype):
    import torch
    import torch.nn.functional as F

    p = logits_problem(shape, axis, seed=len(shape) + 10 * DTYPES.index(dtype), **PROBLEM)
    z, y, w, ct = _torch_arrays(device, dtype, p.x, p.t, p.weight, p.cotangent)
    dt = z.dtype
    for reduction in ("mean", "sum", "none"):
        cot = ct if reduction == "none" else torch.ones((), dtype=dt, device=device)
        kw = dict(label_smoothing=EPS, ignore_index=IGNORE, reduction=reduction)
        zr = z.detach().requires_grad_(True)
        loss, lse = xlsce.cross_entropy(zr, y, weight=w, axis=axis, return_lse=True, **kw)
        loss.backward(cot)
        _on_torch_device(loss, device, dt, f"loss ({reduction})")
        _on_torch_device(lse, device, dt, "lse")
        _on_torch_device(zr.grad, device, dt, f"gradient ({reduction})")
        assert tuple(lse.shape) == tuple(y.shape)

        # the reference: F.cross_entropy in float32 on the same device, from the same (rounded) values
        z32 = z.detach().float().requires_grad_(True)
        ref = F.cross_entropy(z32, y, weight=w.float(), **kw)
        ref.backward(cot.float())
        tol = TOL[dtype]
        _close(loss, ref, tol, f"loss ({reduction}, {device}, {dtype})")
        _close(zr.grad, z32.grad, tol, f"gradient ({reduction}, {device}, {dtype})")
        _close(lse, torch.logsumexp(z32.detach(), dim=axis), tol, "lse")
        if dtype == "bfloat16":  # and, loosely, PyTorch's own bfloat16 loss
            zb = z.detach().requires_grad_(True)
            native = F.cross_entropy(zb, y, weight=w, **kw)
            native.backward(cot)
            _close(loss, native, NATIVE_BF16_TOL, f"loss vs bfloat16 F.cross_entropy ({reduction}, {device})")
            _close(zr.grad, zb.grad, NATIVE_BF16_TOL, f"gradient vs bfloat16 F.cross_entropy ({reduction}, {device})")


# --------------------------------------------------------------------------- (a, b) JAX vs optax

JAX_LAYOUTS = [
    pytest.param((512, 1000), -1, id="NK"),
    pytest.param((8, 50, 16), 1, id="NKL-axis1"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", JAX_LAYOUTS)
@pytest.mark.parametrize("device", JAX_DEVICES)
def test_jax_cross_entropy_matches_optax(device, shape, axis, dtype):
    if not HAVE_OPTAX:
        pytest.skip("optax not installed")
    import jax
    import jax.numpy as jnp
    import optax

    dev = jax.devices(device)[0]
    zn, yn, wn, *_ = logits_problem(shape, axis, seed=20 + len(shape) + 10 * DTYPES.index(dtype), **PROBLEM)
    dt = jnp.dtype(dtype)
    z = jax.device_put(jnp.asarray(zn, dtype=dt), dev)
    y = jax.device_put(jnp.asarray(yn, dtype=jnp.int32), dev)
    w = jax.device_put(jnp.asarray(wn, dtype=dt), dev)

    def ours(z, y, w):
        return xlsce.cross_entropy(z, y, weight=w, label_smoothing=EPS, axis=axis)

    def optax_loss(z, y, w):
        """optax.smooth_labels + softmax_cross_entropy with class weights; PyTorch's weighted mean."""
        z = jnp.moveaxis(z.astype(jnp.float32), axis, -1)
        w = w.astype(jnp.float32)
        valid = y != IGNORE
        ys = jnp.where(valid, y, 0)
        labels = optax.smooth_labels(jax.nn.one_hot(ys, z.shape[-1], dtype=jnp.float32), EPS)
        per = optax.softmax_cross_entropy(z, labels * w)
        return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.sum(jnp.where(valid, w[ys], 0.0))

    loss = jax.jit(ours)(z, y, w)
    grad = jax.jit(jax.grad(ours))(z, y, w)
    lse = jax.jit(lambda z, y, w: xlsce.cross_entropy(z, y, weight=w, axis=axis, return_lse=True)[1])(z, y, w)
    _on_jax_device(loss, dev, dt, "loss")
    _on_jax_device(grad, dev, dt, "gradient")
    _on_jax_device(lse, dev, dt, "lse")
    assert grad.shape == z.shape and lse.shape == y.shape

    ref = jax.jit(optax_loss)(z, y, w)
    ref_grad = jax.jit(jax.grad(optax_loss))(z, y, w)
    _close(loss, ref, TOL[dtype], f"loss ({device}, {dtype})")
    _close(grad, ref_grad, TOL[dtype], f"gradient ({device}, {dtype})")
    _close(lse, jax.nn.logsumexp(z.astype(jnp.float32), axis=axis), TOL[dtype], "lse")

    # eagerly (no jit): the same results, on the same device
    eager_loss, eager_grad = ours(z, y, w), jax.grad(ours)(z, y, w)
    _on_jax_device(eager_loss, dev, dt, "eager loss")
    _on_jax_device(eager_grad, dev, dt, "eager gradient")
    _close(eager_loss, loss, TOL[dtype], f"eager loss vs jit ({device}, {dtype})")
    _close(eager_grad, grad, TOL[dtype], f"eager gradient vs jit ({device}, {dtype})")


# --------------------------------------------------------------------------- (c) torch.compile


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "device",
    [pytest.param(p.values[0], id=f"{p.id}-{_compile_backend(p.values[0])}", marks=p.marks) for p in TORCH_DEVICES],
)
def test_torch_compile_fullgraph_matches_eager(device, dtype):
    import torch

    torch._dynamo.reset()
    p = logits_problem((64, 50, 8), 1, seed=30 + DTYPES.index(dtype), **PROBLEM)
    z, y, w = _torch_arrays(device, dtype, p.x, p.t, p.weight)
    d = torch.linspace(-1.0, 1.0, y.numel(), device=device).reshape(y.shape).to(z.dtype)

    def step(z, y, w):
        loss, lse = xlsce.cross_entropy(
            z, y, weight=w, label_smoothing=EPS, axis=1, z_loss=1e-3, softcap=30.0, return_lse=True
        )
        return loss, lse

    # Eager first: it also builds xlsce's autograd.Function class, which dynamo cannot trace
    # (fullgraph=True fails with "Invalid call to __build_class__" when the first call is compiled).
    results = []
    compiled = torch.compile(step, fullgraph=True, backend=_compile_backend(device), dynamic=False)
    for fn in (step, compiled):
        zr = z.detach().requires_grad_(True)
        loss, lse = fn(zr, y, w)
        (loss + (d * lse).sum()).backward()
        for x, what in ((loss, "loss"), (lse, "lse"), (zr.grad, "gradient")):
            _on_torch_device(x, device, z.dtype, what)
        results.append((loss.detach(), lse.detach(), zr.grad))
    tol = (1e-5, 1e-5) if dtype == "float32" else TOL[dtype]
    for e, c, what in zip(results[0], results[1], ("loss", "lse", "gradient"), strict=True):
        _close(c, e, tol, f"compiled {what} vs eager ({device}, {dtype})")


# --------------------------------------------------------------------------- (d) linear_cross_entropy

LN, LH, LV, CHUNK = 300, 64, 1000, 128  # 128 does not divide 300: chunks of 128, 128, 44
LINEAR_KW = dict(label_smoothing=EPS, z_loss=1e-3, softcap=30.0)


# linear_problem(seed, **LINEAR_PROBLEM): float32 hidden, classifier (logits of scale 3) and bias, ~10 % ignored,
# float32 class weights, a float32 cotangent (for the lse)
LINEAR_PROBLEM = dict(
    n=LN, h=LH, v=LV, scale=3.0 / LH**0.5, ignored=0.1, pin_first=True, weight=(0.5, 1.5), where=False, cotangent=True,
    dtype=np.float32,
)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_linear_cross_entropy_matches_materialised(device, dtype):
    import torch

    p = linear_problem(40 + DTYPES.index(dtype), **LINEAR_PROBLEM)
    h, classifier, b, t, weight, d = _torch_arrays(
        device, dtype, p.hidden, p.classifier, p.bias, p.target, p.weight, p.cotangent
    )
    dt = h.dtype
    kw = dict(LINEAR_KW, weight=weight)

    def ours(h, c, b):
        return xlsce.linear_cross_entropy(h, c, t, bias=b, chunk_size=CHUNK, return_lse=True, **kw)

    def materialised(h, c, b):
        return xlsce.cross_entropy(h @ c.T + b, t, return_lse=True, **kw)

    tol = LINEAR_TOL[dtype]
    for with_lse in (False, True):  # gradients accumulated in the forward; recomputed for a differentiated lse
        got, want = [], []
        for fn, into in ((ours, got), (materialised, want)):
            xs = [x.detach().requires_grad_(True) for x in (h, classifier, b)]
            loss, lse = fn(*xs)
            objective = loss + (d * lse).sum() if with_lse else loss
            grads = torch.autograd.grad(objective, xs)
            into.extend([loss, lse, *grads])
        names = ("loss", "lse", "d hidden", "d classifier", "d bias")
        for a, e, what in zip(got, want, names, strict=True):
            _on_torch_device(a, device, dt, what)
            _close(a, e, tol, f"{what} (lse differentiated: {with_lse}, {device}, {dtype})")

    # linear_value_and_grad: the same gradients without autograd
    loss, grads = xlsce.linear_value_and_grad(h, classifier, t, bias=b, chunk_size=CHUNK, **kw)
    xs = [x.detach().requires_grad_(True) for x in (h, classifier, b)]
    want_loss, _ = materialised(*xs)
    want = torch.autograd.grad(want_loss, xs)
    _on_torch_device(loss, device, dt, "linear_value_and_grad loss")
    _close(loss, want_loss, tol, f"linear_value_and_grad loss ({device}, {dtype})")
    for a, e, what in zip(grads, want, ("d hidden", "d classifier", "d bias"), strict=True):
        _on_torch_device(a, device, dt, f"linear_value_and_grad {what}")
        _close(a, e, tol, f"linear_value_and_grad {what} ({device}, {dtype})")


@pytest.mark.parametrize("device", JAX_DEVICES)
def test_jax_linear_cross_entropy_matches_materialised(device):
    import jax
    import jax.numpy as jnp

    dev = jax.devices(device)[0]
    p = linear_problem(50, **LINEAR_PROBLEM)
    h, classifier, b, t, weight, d = (
        jax.device_put(jnp.asarray(a, dtype=jnp.int32 if a.dtype == np.int64 else jnp.float32), dev)
        for a in (p.hidden, p.classifier, p.bias, p.target, p.weight, p.cotangent)
    )
    kw = dict(LINEAR_KW, weight=weight)

    def ours(h, c, b):
        return xlsce.linear_cross_entropy(h, c, t, bias=b, chunk_size=CHUNK, return_lse=True, **kw)

    def materialised(h, c, b):
        return xlsce.cross_entropy(h @ c.T + b, t, return_lse=True, **kw)

    def grads(fn, with_lse):
        def objective(h, c, b):
            loss, lse = fn(h, c, b)
            return (loss + jnp.sum(d * lse) if with_lse else loss), (loss, lse)

        return jax.jit(jax.grad(objective, argnums=(0, 1, 2), has_aux=True))

    names = ("d hidden", "d classifier", "d bias", "loss", "lse")
    with jax.default_matmul_precision("float32"):  # no TF32 on the GPU: the two paths' products agree closely
        for with_lse in (False, True):
            got_g, (got_loss, got_lse) = grads(ours, with_lse)(h, classifier, b)
            want_g, (want_loss, want_lse) = grads(materialised, with_lse)(h, classifier, b)
            for a, e, what in zip((*got_g, got_loss, got_lse), (*want_g, want_loss, want_lse), names, strict=True):
                _on_jax_device(a, dev, jnp.float32, what)
                _close(a, e, LINEAR_TOL["float32"], f"{what} (lse differentiated: {with_lse}, {device})")


# --------------------------------------------------------------------------- (e) value_and_grad on device tensors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_value_and_grad_on_device(device, dtype):
    import torch
    import torch.nn.functional as F

    p = logits_problem((2048, 1000), 1, seed=60 + DTYPES.index(dtype), **PROBLEM)
    z, y, w, ct = _torch_arrays(device, dtype, p.x, p.t, p.weight, p.cotangent)
    for reduction, cot in (("mean", None), ("none", ct)):
        kw = dict(label_smoothing=EPS, ignore_index=IGNORE, reduction=reduction)
        loss, grad = xlsce.value_and_grad(z, y, weight=w, cotangent=cot, **kw)
        _on_torch_device(loss, device, z.dtype, f"value_and_grad loss ({reduction})")
        _on_torch_device(grad, device, z.dtype, f"value_and_grad gradient ({reduction})")
        assert not loss.requires_grad and not grad.requires_grad

        zr = z.detach().requires_grad_(True)  # the same analytic backward through autograd
        auto = xlsce.cross_entropy(zr, y, weight=w, **kw)
        auto.backward(torch.ones_like(auto) if cot is None else cot)
        same = (1e-6, 1e-6) if dtype == "float32" else (1e-2, 1e-3)  # bfloat16: one rounding apart at most
        _close(loss, auto, same, f"value_and_grad vs autograd loss ({reduction}, {device}, {dtype})")
        _close(grad, zr.grad, same, f"value_and_grad vs autograd gradient ({reduction}, {device}, {dtype})")

        z32 = z.detach().float().requires_grad_(True)
        ref = F.cross_entropy(z32, y, weight=w.float(), **kw)
        ref.backward(torch.ones_like(ref) if cot is None else cot.float())
        _close(loss, ref, TOL[dtype], f"value_and_grad loss vs F.cross_entropy ({reduction}, {device}, {dtype})")
        _close(grad, z32.grad, TOL[dtype], f"value_and_grad gradient vs F.cross_entropy ({reduction}, {device})")


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_module_moves_its_weight_to_the_device(device):
    import torch

    import xlsce.torch

    p = logits_problem((8, 50, 16), 1, seed=65, **PROBLEM)
    z, y, w = _torch_arrays("cpu", "float32", p.x, p.t, p.weight)
    ours = xlsce.torch.CrossEntropyLoss(weight=w, label_smoothing=EPS).to(device)
    ref = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=EPS).to(device)
    assert ours.weight.device.type == device
    zr = z.to(device).requires_grad_(True)
    loss = ours(zr, y.to(device))
    loss.backward()
    _on_torch_device(loss, device, torch.float32, "module loss")
    _on_torch_device(zr.grad, device, torch.float32, "module gradient")
    z32 = z.to(device).requires_grad_(True)
    want = ref(z32, y.to(device))
    want.backward()
    _close(loss, want, TOL["float32"], f"module loss ({device})")
    _close(zr.grad, z32.grad, TOL["float32"], f"module gradient ({device})")


# --------------------------------------------------------------------------- -inf logits in some blocks only
# Last in the file: it runs the blocked eager path where only some blocks take the general (masked)
# route, whose per-block results are joined across blocks of two kinds.


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_blocked_path_with_minus_inf_in_some_blocks(device):
    import torch

    zn, yn, wn, *_ = logits_problem((2048, 1000), 1, seed=70, **PROBLEM)
    zn[1500, [3, 7]] = -np.inf  # in the second block of rows only (blocks of 1048 rows at K = 1000)
    yn[1500] = 5
    want, want_grad = xlsce.value_and_grad(zn.astype(np.float64), yn, weight=wn.astype(np.float64), label_smoothing=EPS)
    z, y, w = _torch_arrays(device, "float32", zn, yn, wn)
    zr = z.detach().requires_grad_(True)
    loss = xlsce.cross_entropy(zr, y, weight=w, label_smoothing=EPS)
    loss.backward()
    _on_torch_device(loss, device, torch.float32, "loss")
    _on_torch_device(zr.grad, device, torch.float32, "gradient")
    _close(loss, want, TOL["float32"], f"loss ({device})")
    _close(zr.grad, want_grad, TOL["float32"], f"gradient ({device})")
    assert not torch.any(zr.grad[1500, [3, 7]]), "a -inf logit gets no gradient"
