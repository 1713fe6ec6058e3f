"""Parity with PyTorch 2.13's ``F.linear_cross_entropy`` / ``nn.LinearCrossEntropyLoss``, and the token accuracy
of ``linear_cross_entropy``.

The references are PyTorch's own: its materialised path (``options=None``: ``cross_entropy(linear(input,
W, b), target)``) and, where it applies (class indices, no label smoothing, a 2-D weight), its chunked path
(``options=nn.LinearCrossEntropyOptions()``); values and the gradients of input, weight and bias, float64.
The token accuracy is checked against a NumPy reference written from its definition (argmax == target at the
counted positions, the fraction of them for "sum"/"mean").
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import xlsce

torch = pytest.importorskip("torch")
F = torch.nn.functional
xt = pytest.importorskip("xlsce.torch")

if not hasattr(F, "linear_cross_entropy"):  # pragma: no cover
    pytest.skip("needs PyTorch >= 2.13 (F.linear_cross_entropy)", allow_module_level=True)

N, H, C = 23, 5, 13


def _problem(seed=0, out=(), soft=False, ignore=False):
    rng = np.random.default_rng(seed)
    hidden = torch.tensor(rng.normal(size=(N, H)), requires_grad=True)
    classifier = torch.tensor(rng.normal(size=(C, *out, H)), requires_grad=True)
    bias = torch.tensor(rng.normal(size=(C, *out)), requires_grad=True)
    if soft:
        p = rng.random(size=(N, C, *out))
        target = torch.tensor(p / p.sum(axis=1, keepdims=True))
    else:
        y = rng.integers(0, C, size=(N, *out))
        if ignore:
            y[rng.random(y.shape) < 0.25] = -100
        target = torch.tensor(y)
    weight = torch.tensor(rng.uniform(0.5, 2.0, size=C))
    return hidden, classifier, bias, target, weight


def _value_and_grads(fn, hidden, classifier, bias, reduction):
    inputs = (hidden, classifier) if bias is None else (hidden, classifier, bias)
    loss = fn()
    cot = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss.detach(), torch.autograd.grad(loss, inputs, cot)


def _compare(mine, theirs, rtol=1e-10, atol=1e-12):
    (l1, g1), (l2, g2) = mine, theirs
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=atol)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


CASES = {
    "plain": dict(),
    "bias": dict(bias=True),
    "weight-ignore": dict(weight=True, ignore=True, bias=True),
    "smoothing": dict(label_smoothing=0.2, bias=True),
    "smoothing-weight-ignore": dict(label_smoothing=0.1, weight=True, ignore=True),
}


def _chunked_applies(case, soft=False, out=()):
    return not case.get("label_smoothing") and not soft and not out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_against_torch(case, reduction):
    kw = CASES[case]
    hidden, classifier, bias, target, weight = _problem(1, ignore=kw.get("ignore", False))
    bias = bias if kw.get("bias") else None
    weight = weight if kw.get("weight") else None
    eps = kw.get("label_smoothing", 0.0)

    def mine():
        return xlsce.linear_cross_entropy(
            hidden, classifier, target, bias=bias, weight=weight, reduction=reduction, label_smoothing=eps, chunk_size=5
        )

    def theirs(options):
        return lambda: F.linear_cross_entropy(
            hidden,
            classifier,
            target,
            linear_bias=bias,
            weight=weight,
            reduction=reduction,
            label_smoothing=eps,
            options=options,
        )

    ours = _value_and_grads(mine, hidden, classifier, bias, reduction)
    _compare(ours, _value_and_grads(theirs(None), hidden, classifier, bias, reduction))
    if _chunked_applies(kw):
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4)
        _compare(ours, _value_and_grads(theirs(options), hidden, classifier, bias, reduction))
    else:  # PyTorch's chunked path refuses label smoothing: it falls back to the materialised one, with a warning
        with pytest.warns(UserWarning, match="options"):
            theirs(torch.nn.LinearCrossEntropyOptions())()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_probability_targets_against_torch(reduction, smoothing):
    hidden, classifier, bias, target, weight = _problem(2, soft=True)

    def mine():
        return xlsce.linear_cross_entropy(
            hidden, classifier, target, bias=bias, weight=weight, reduction=reduction, label_smoothing=smoothing,
            chunk_size=4,
        )  # fmt: skip

    def theirs():
        return F.linear_cross_entropy(
            hidden, classifier, target, linear_bias=bias, weight=weight, reduction=reduction, label_smoothing=smoothing
        )

    _compare(
        _value_and_grads(mine, hidden, classifier, bias, reduction),
        _value_and_grads(theirs, hidden, classifier, bias, reduction),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("out", [(3,), (2, 3)], ids=["K=1", "K=2"])
def test_k_dimensional_classifier_against_torch(reduction, soft, out):
    hidden, classifier, bias, target, weight = _problem(3, out=out, soft=soft, ignore=not soft)
    eps = 0.1

    def mine():
        return xlsce.linear_cross_entropy(
            hidden, classifier, target, bias=bias, weight=weight, reduction=reduction, label_smoothing=eps, chunk_size=6
        )

    def theirs():
        return F.linear_cross_entropy(
            hidden, classifier, target, linear_bias=bias, weight=weight, reduction=reduction, label_smoothing=eps
        )

    ours = _value_and_grads(mine, hidden, classifier, bias, reduction)
    assert ours[0].shape == ((N, *out) if reduction == "none" else ())
    _compare(ours, _value_and_grads(theirs, hidden, classifier, bias, reduction))


def test_k_dimensional_on_numpy_and_jax():
    """The K-dim layout on the other backends, against the materialised loss (class axis 1), float64."""
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(4)
    hidden, classifier = rng.normal(size=(7, 3)), rng.normal(size=(5, 2, 3))
    bias, target = rng.normal(size=(5, 2)), rng.integers(0, 5, size=(7, 2))
    logits = np.einsum("nh,cdh->ncd", hidden, classifier) + bias
    for xp_ in (np, jnp):
        args = [xp_.asarray(a) for a in (hidden, classifier, target)]
        for reduction in ("mean", "none"):
            got = xlsce.linear_cross_entropy(*args, bias=xp_.asarray(bias), reduction=reduction, chunk_size=3)
            want = xlsce.cross_entropy(logits, target, axis=1, reduction=reduction)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


def _module_pair(seed, **kw):
    torch.manual_seed(seed)
    theirs = torch.nn.LinearCrossEntropyLoss(H, C, dtype=torch.float64, **kw)
    mine = xt.LinearCrossEntropyLoss(H, C, dtype=torch.float64, chunk_size=4, **kw)
    mine.load_state_dict(theirs.state_dict())
    return mine, theirs


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(bias=True, reduction="sum"),
        dict(bias=True, label_smoothing=0.1, ignore_index=3, reduction="none"),
        dict(out_features=(2,), bias=True),
    ],
    ids=["plain", "bias-sum", "smoothing-ignore-none", "out_features"],
)
def test_module_against_torch(kw):
    out = kw.get("out_features", ())
    rng = np.random.default_rng(5)
    weight = torch.tensor(rng.uniform(0.5, 2, size=C))
    mine, theirs = _module_pair(0, weight=weight, **kw)
    x = torch.tensor(rng.normal(size=(N, H)), requires_grad=True)
    y = torch.tensor(rng.integers(0, C, size=(N, *out)))
    results = []
    for module in (mine, theirs):
        loss = module(x, y)
        params = [x, *module.parameters()]
        results.append((loss.detach(), torch.autograd.grad(loss.sum(), params)))
    _compare(*results)


def test_module_options_and_repr():
    m = xt.LinearCrossEntropyLoss(8, 100)
    assert m.extra_repr() == "in_features=8, num_classes=100"
    m = xt.LinearCrossEntropyLoss(
        8, 10, out_features=(2,), bias=True, reduction="sum", ignore_index=0, label_smoothing=0.1,
        smoothing="exclusive", z_loss=0.01, softcap=30.0, chunk_size=64, weight=torch.ones(10),
    )  # fmt: skip
    text = m.extra_repr()
    for part in (
        "out_features=(2,)",
        "bias=True",
        "reduction='sum'",
        "ignore_index=0",
        "label_smoothing=0.1",
        "smoothing='exclusive'",
        "z_loss=0.01",
        "softcap=30.0",
        "chunk_size=64",
        "weight=<tensor of shape (10,)>",
    ):
        assert part in text, (part, text)
    # options: the chunk size of torch's options is xlsce's; the loss is the same whatever the chunking
    mine, _ = _module_pair(1)
    x, y = torch.randn(N, H, dtype=torch.float64), torch.randint(0, C, (N,))
    mine.chunk_size = None
    mine.options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    assert "options=" in mine.extra_repr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = mine(x, y)
    mine.options = None
    torch.testing.assert_close(a, mine(x, y), rtol=1e-12, atol=0)


def test_module_weight_shape_refused():
    with pytest.raises(ValueError, match="weight"):
        xt.LinearCrossEntropyLoss(4, 6, weight=torch.ones(5))


# ----------------------------------------------------------------------------- token accuracy


def _accuracy_reference(logits, target, counted, reduction):
    hit = (np.argmax(logits, axis=1) == target) & counted
    if reduction == "none":
        return hit.astype(np.float64)
    return hit.sum() / counted.sum() if counted.sum() else 0.0


def _accuracy_problem(seed, out=()):
    rng = np.random.default_rng(seed)
    hidden, classifier = rng.normal(size=(N, H)), rng.normal(size=(C, *out, H))
    logits = np.einsum("nh,c...h->nc...", hidden, classifier)
    target = rng.integers(0, C, size=(N, *out))
    right = rng.random(target.shape) < 0.4
    target = np.where(right, np.argmax(logits, axis=1), target)  # some right, some wrong
    target[rng.random(target.shape) < 0.2] = -100
    where = rng.random(target.shape) < 0.85
    return hidden, classifier, logits, target, where


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("out", [(), (3,)], ids=["2-D", "K-dim"])
def test_linear_token_accuracy(backend, reduction, out):
    hidden, classifier, logits, target, where = _accuracy_problem(6, out)
    args = [backend.asarray(a) for a in (hidden, classifier, target)]
    loss, lse, acc = xlsce.linear_cross_entropy(
        *args, where=backend.asarray(where), reduction=reduction, chunk_size=5, return_lse=True,
        return_token_accuracy=True,
    )  # fmt: skip
    counted = (target != -100) & where
    np.testing.assert_allclose(
        backend.to_numpy(acc), _accuracy_reference(logits, target, counted, reduction), rtol=1e-12
    )
    np.testing.assert_allclose(
        backend.to_numpy(lse), np.log(np.exp(logits).sum(axis=1)), rtol=1e-12
    )  # lse comes before the accuracy
    want = xlsce.cross_entropy(logits, target, axis=1, where=where, reduction=reduction)
    np.testing.assert_allclose(backend.to_numpy(loss), want, rtol=1e-10)


def test_linear_token_accuracy_gradients_unchanged():
    hidden, classifier, _, target, _ = _accuracy_problem(7)
    h, w = torch.tensor(hidden, requires_grad=True), torch.tensor(classifier, requires_grad=True)
    y = torch.tensor(target)
    loss, acc = xlsce.linear_cross_entropy(h, w, y, chunk_size=5, return_token_accuracy=True)
    assert not acc.requires_grad and acc.dtype == torch.float64
    grads = torch.autograd.grad(loss, (h, w))
    want = torch.autograd.grad(xlsce.linear_cross_entropy(h, w, y, chunk_size=5), (h, w))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b)


def test_linear_token_accuracy_refuses_probabilities():
    hidden, classifier, bias, target, weight = _problem(8, soft=True)
    with pytest.raises(ValueError, match="return_token_accuracy"):
        xlsce.linear_cross_entropy(hidden, classifier, target, return_token_accuracy=True)


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_dimensional_jax_gradients(soft, reduction):
    """jax.grad of the K-dim chunked loss (one lax.scan) equals that of the materialised loss (class axis 1)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(9)
    h, w, b = rng.normal(size=(7, 3)), rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2))
    if soft:
        t = rng.random((7, 5, 2))
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = rng.integers(0, 5, size=(7, 2))
        t[1, 1] = -100
    t = jnp.asarray(t)
    kw = dict(reduction=reduction, label_smoothing=0.1)

    def chunked(h, w, b):
        return xlsce.linear_cross_entropy(h, w, t, bias=b, chunk_size=3, **kw).sum()

    def full(h, w, b):
        return xlsce.cross_entropy(jnp.einsum("nh,cdh->ncd", h, w) + b, t, axis=1, **kw).sum()

    got = jax.jit(jax.grad(chunked, argnums=(0, 1, 2)))(h, w, b)
    want = jax.grad(full, argnums=(0, 1, 2))(h, w, b)
    for a, c in zip(got, want, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-10)
