"""A global mean under data parallelism: ``denominator=`` and ``xlsce.mean_denominator`` (issue 15 item 6).

A batch with uneven ignored positions is split into parts (the ranks' or devices' shards); the parts'
losses, each computed with the global denominator, must sum to the unsharded mean, and their
gradients must be the unsharded gradient's rows.  The reference is written here from the formulas
(PyTorch's weighted mean, ``docs/what-it-computes.md``), in float64 NumPy, not taken from xlsce.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import xlsce

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPLITS = {2: [0, 5, 13], 3: [0, 2, 7, 13], 4: [0, 1, 6, 9, 13]}  # uneven parts of 13 positions


def reference(logits, target, weight=None, where=None, eps=0.0, z_loss=0.0, ignore_index=-100):
    """(mean loss, gradient) of the uniform-smoothed, class-weighted cross-entropy (PyTorch's mean)."""
    n, k = logits.shape
    w = np.ones(k) if weight is None else weight
    m = target != ignore_index
    if where is not None:
        m &= where
    y = np.where(m, target, 0)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    lp = logits - lse[:, None]
    q = (1 - eps) * np.eye(k)[y] + eps / k
    per = -(w * q * lp).sum(1) + z_loss * lse**2
    d = (m * w[y]).sum()
    p = np.exp(lp)
    grad = ((w * q).sum(1) + 2 * z_loss * lse)[:, None] * p - w * q
    return (m * per).sum() / d, grad * (m / d)[:, None], d


def problem(weighted=False, masked=False, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(13, 5)) * 2
    target = rng.integers(0, 5, size=13)
    target[[0, 3, 4, 10, 11]] = -100  # uneven: the parts count 2/5, 1/1/3, ... positions
    weight = rng.uniform(0.5, 2.0, size=5) if weighted else None
    where = (np.arange(13) % 4 != 2) if masked else None
    return logits, target, weight, where


CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"weighted": True, "eps": 0.1}, id="weight-smoothing"),
    pytest.param({"masked": True, "eps": 0.2, "z_loss": 1e-2}, id="where-smoothing-zloss"),
]


def _kw(b, weight, where, eps, z_loss):
    kw = {"label_smoothing": eps, "z_loss": z_loss}
    if weight is not None:
        kw["weight"] = b.asarray(weight)
    return kw


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("as_array", [True, False], ids=["array", "number"])
def test_parts_sum_to_the_unsharded_mean(backend, parts, case, as_array):
    b = backend
    eps, z_loss = case.get("eps", 0.0), case.get("z_loss", 0.0)
    logits, target, weight, where = problem(case.get("weighted", False), case.get("masked", False))
    want, want_grad, want_d = reference(logits, target, weight, where, eps, z_loss)
    kw = _kw(b, weight, where, eps, z_loss)
    cuts = SPLITS[parts]
    shards = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        m = None if where is None else b.asarray(where[lo:hi])
        shards.append((b.asarray(logits[lo:hi]), b.asarray(target[lo:hi]), m))
    counts = [xlsce.mean_denominator(t, weight=kw.get("weight"), where=m) for _, t, m in shards]
    assert all(getattr(c, "ndim", None) == 0 for c in counts)
    d = counts[0]
    for c in counts[1:]:
        d = d + c  # the all-reduce
    np.testing.assert_allclose(float(b.to_numpy(d)), want_d, rtol=1e-12)
    if not as_array:
        d = float(b.to_numpy(d))
    total, grads = 0.0, []
    for z, t, m in shards:
        loss = xlsce.cross_entropy(z, t, where=m, denominator=d, **kw)
        loss2, grad = xlsce.value_and_grad(z, t, where=m, denominator=d, **kw)
        np.testing.assert_allclose(b.to_numpy(loss2), b.to_numpy(loss), rtol=1e-13, atol=1e-15)
        total += float(b.to_numpy(loss))
        grads.append(b.to_numpy(grad))
        if b.vjp is not None:  # autograd through the loss with the denominator
            _, g = b.vjp(lambda x, t=t, m=m: xlsce.cross_entropy(x, t, where=m, denominator=d, **kw), z)
            np.testing.assert_allclose(b.to_numpy(g), grads[-1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(total, want, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate(grads), want_grad, rtol=1e-11, atol=1e-15)
    # the mean of the parts' own means is not the global mean: the test can fail
    own = np.mean([float(b.to_numpy(xlsce.cross_entropy(z, t, where=m, **kw))) for z, t, m in shards])
    assert abs(own - want) > 1e-3


def test_unsharded_denominator_is_the_mean(backend):
    b = backend
    logits, target, weight, _ = problem(weighted=True)
    w = b.asarray(weight)
    z, t = b.asarray(logits), b.asarray(target)
    d = xlsce.mean_denominator(t, weight=w)
    want = reference(logits, target, weight, eps=0.1)[0]
    got = xlsce.CrossEntropyLoss(weight=w, label_smoothing=0.1)(z, t, denominator=d)
    np.testing.assert_allclose(float(b.to_numpy(got)), want, rtol=1e-12)
    loss, _ = xlsce.CrossEntropyLoss(weight=w, label_smoothing=0.1).value_and_grad(z, t, denominator=d)
    np.testing.assert_allclose(float(b.to_numpy(loss)), want, rtol=1e-12)


def test_mean_denominator_takes_numpy_weights_and_masks(backend):
    """A NumPy weight and mask beside the targets of another library are taken into it, as cross_entropy does."""
    b = backend
    _, target, weight, _ = problem(weighted=True)
    where = np.arange(target.shape[0]) % 3 != 0
    valid = (target != -100) & where
    want = float(np.sum(np.where(valid, weight[np.where(valid, target, 0)], 0.0)))
    got = xlsce.mean_denominator(b.asarray(target), weight=weight, where=where)
    np.testing.assert_allclose(float(b.to_numpy(got)), want, rtol=1e-12)


def test_mean_denominator_probability_targets(backend):
    b = backend
    probs = np.full((3, 4, 2), 0.25)  # class axis 1
    where = np.array([[True, False], [True, True], [False, False]])
    assert int(b.to_numpy(xlsce.mean_denominator(b.asarray(probs), axis=1))) == 6
    assert int(b.to_numpy(xlsce.mean_denominator(b.asarray(probs), axis=1, where=b.asarray(where)))) == 3


@pytest.mark.parametrize("parts", [2, 4])
def test_linear_parts_sum_to_the_unsharded_mean(backend, parts):
    b = backend
    rng = np.random.default_rng(1)
    hidden, classifier, bias = rng.normal(size=(13, 3)), rng.normal(size=(5, 3)), rng.normal(size=5)
    _, target, weight, _ = problem(weighted=True)
    logits = hidden @ classifier.T + bias
    want, want_grad, want_d = reference(logits, target, weight, eps=0.1)
    w, W, c = b.asarray(weight), b.asarray(classifier), b.asarray(bias)
    cuts = SPLITS[parts]
    shards = [(b.asarray(hidden[lo:hi]), b.asarray(target[lo:hi])) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]
    d = sum(float(b.to_numpy(xlsce.mean_denominator(t, weight=w))) for _, t in shards)
    np.testing.assert_allclose(d, want_d, rtol=1e-12)
    total, dhs, dw, db = 0.0, [], 0.0, 0.0
    for h, t in shards:
        kw = {"bias": c, "weight": w, "label_smoothing": 0.1, "chunk_size": 2, "denominator": d}
        loss = xlsce.linear_cross_entropy(h, W, t, **kw)
        loss2, (gh, gw, gb) = xlsce.linear_value_and_grad(h, W, t, **kw)
        np.testing.assert_allclose(b.to_numpy(loss2), b.to_numpy(loss), rtol=1e-13)
        total += float(b.to_numpy(loss))
        dhs.append(b.to_numpy(gh))
        dw, db = dw + b.to_numpy(gw), db + b.to_numpy(gb)
    np.testing.assert_allclose(total, want, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate(dhs), want_grad @ classifier, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(dw, want_grad.T @ hidden, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(db, want_grad.sum(0), rtol=1e-11, atol=1e-15)


def test_zero_denominator_is_zero(backend):
    b = backend
    z, t = b.asarray(np.ones((2, 3))), b.asarray(np.array([0, 1]))
    for d in (0, xlsce.mean_denominator(b.asarray(np.array([-100, -100])))):
        loss, grad = xlsce.value_and_grad(z, t, denominator=d)
        assert float(b.to_numpy(loss)) == 0.0
        assert not np.any(b.to_numpy(grad))


def test_refused():
    z, t = np.zeros((2, 3)), np.array([0, 1])
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="denominator.*reduction"):
            xlsce.cross_entropy(z, t, reduction=reduction, denominator=2.0)
    with pytest.raises(ValueError, match="denominator"):
        xlsce.cross_entropy(z, t, denominator=-1.0)
    with pytest.raises(ValueError, match="denominator"):
        xlsce.cross_entropy(z, t, denominator=np.array(-1.0))
    for bad in ([2.0], np.ones(2), True, "2"):
        with pytest.raises(TypeError, match="denominator"):
            xlsce.cross_entropy(z, t, denominator=bad)
    with pytest.raises(ValueError, match="denominator.*reduction"):
        xlsce.linear_value_and_grad(np.ones((2, 3)), np.ones((4, 3)), t, reduction="sum", denominator=2)


def test_torch_module_and_meta():
    torch = pytest.importorskip("torch")
    import xlsce.torch

    logits, target, weight, _ = problem(weighted=True)
    want = reference(logits, target, weight)[0]
    w = torch.tensor(weight)
    d = xlsce.mean_denominator(torch.tensor(target), weight=w)
    x = torch.tensor(logits, requires_grad=True)
    loss = xlsce.torch.CrossEntropyLoss(weight=w)(x, torch.tensor(target), denominator=d)
    loss.backward()
    np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), reference(logits, target, weight)[1], rtol=1e-11, atol=1e-15)
    # a denominator on the meta device is never read (no .item(), which would raise there)
    zm = torch.empty(4, 3, device="meta", requires_grad=True)
    tm = torch.empty(4, dtype=torch.long, device="meta")
    out = xlsce.cross_entropy(zm, tm, denominator=xlsce.mean_denominator(tm))
    assert out.device.type == "meta" and out.shape == ()
    out.backward()


def test_jax_jit_traced_denominator():
    jax = pytest.importorskip("jax")
    logits, target, weight, where = problem(masked=True)
    want, want_grad, d = reference(logits, target, where=where, eps=0.1)
    t, m = jax.numpy.asarray(target), jax.numpy.asarray(where)
    f = jax.jit(jax.value_and_grad(lambda z, d: xlsce.cross_entropy(z, t, where=m, label_smoothing=0.1, denominator=d)))
    loss, grad = f(jax.numpy.asarray(logits), jax.numpy.asarray(d))
    np.testing.assert_allclose(float(loss), want, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-11, atol=1e-15)


SHARD_MAP = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, json
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P
    import xlsce

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8 * 5, 7)) * 2
    target = rng.integers(0, 7, size=40)
    target[rng.random(40) < 0.4] = -100
    target[:5] = -100  # device 0 counts nothing: very uneven
    weight = rng.uniform(0.5, 2.0, size=7)
    mesh = jax.make_mesh((8,), ("data",))

    def local(z, t, w):
        d = jax.lax.psum(xlsce.mean_denominator(t, weight=w), "data")
        return jax.lax.psum(xlsce.cross_entropy(z, t, weight=w, label_smoothing=0.1, denominator=d), "data")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=P())
    put = lambda a, spec: jax.device_put(jnp.asarray(a), jax.sharding.NamedSharding(mesh, spec))
    args = put(logits, P("data")), put(target, P("data")), put(weight, P())
    loss, grad = jax.jit(jax.value_and_grad(sharded))(*args)
    print(json.dumps({"loss": float(loss), "grad": np.asarray(grad).tolist(), "logits": logits.tolist(),
                      "target": target.tolist(), "weight": weight.tolist(), "devices": len(jax.devices())}))
    """
)


def test_jax_shard_map_over_the_batch_8_devices():
    pytest.importorskip("jax")
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", SHARD_MAP], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    logits, target, weight = np.array(out["logits"]), np.array(out["target"]), np.array(out["weight"])
    want, want_grad, _ = reference(logits, target, weight, eps=0.1)
    np.testing.assert_allclose(out["loss"], want, rtol=1e-12)
    np.testing.assert_allclose(np.array(out["grad"]), want_grad, rtol=1e-11, atol=1e-15)
