"""xlsce.keras against Keras' own losses, on Keras' JAX, PyTorch and NumPy backends.

Keras fixes its backend when it is first imported (``KERAS_BACKEND``), so each backend runs in its
own process: this file run as a script, ``python tests/test_keras.py jax``, does every check of one
backend in one launch (and the module's doctests), and the tests below launch it.  The references:
``keras.losses.SparseCategoricalCrossentropy`` / ``CategoricalCrossentropy`` where Keras defines the
same loss, and otherwise a float64 NumPy loss written from the formulas (xlsce's extras).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
KERAS_BACKENDS = {"jax": "jax", "torch": "torch", "numpy": "numpy"}  # Keras backend -> the library it needs


def _launch(backend, *args):
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, __file__, backend, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def _need(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("CI"):
            raise RuntimeError(f"{missing} not installed, and CI must run every test")
        pytest.skip(f"{missing} not installed")


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(KERAS_BACKENDS))
def test_keras_backend(backend):
    _need("keras", KERAS_BACKENDS[backend])
    proc = _launch(backend)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert f"keras {backend}: all checks passed" in proc.stdout, proc.stdout[-3000:]


def test_xlsce_keras_without_keras_says_what_to_install():
    code = """
import sys


class NoKeras:  # as if keras were not installed: importing it finds nothing
    def find_spec(self, name, path=None, target=None):
        if name == "keras" or name.startswith("keras."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoKeras())
import xlsce
try:
    import xlsce.keras
except ImportError as error:
    print(type(error).__name__, error.name)
    print(error)
else:
    raise SystemExit("import xlsce.keras succeeded without keras")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind, message = proc.stdout.splitlines()[:2]
    assert kind == "ModuleNotFoundError keras"
    assert 'pip install "xlsce[keras]"' in message


# --------------------------------------------------------------------------- the checks of one backend
# (run in the subprocess; keras is imported only there)


def _reference(logits, target, *, eps=0.0, smoothing="uniform", weight=None, z_loss=0.0, softcap=None, axis=-1):
    """Per-position loss in float64 from the formulas: q = a t + b, l = -sum_c w_c q_c log_softmax(z)_c + zeta lse^2."""
    z = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    k = z.shape[-1]
    t = np.asarray(target)
    if t.dtype.kind in "iu":
        t = np.eye(k)[t]
    else:
        t = np.moveaxis(t.astype(np.float64), axis, -1)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    b = eps / k if smoothing == "uniform" else eps / (k - 1)
    q = (1 - eps) * t + b if smoothing == "uniform" else (1 - eps - b) * t + b
    w = np.ones(k) if weight is None else np.asarray(weight, np.float64)
    return -np.sum(w * q * (z - lse[..., None]), -1) + z_loss * lse**2


def _checks(backend):  # pragma: no cover - runs in the subprocess
    import doctest

    import keras

    import xlsce.keras as xk

    assert keras.backend.backend() == backend
    ops = keras.ops
    rng = np.random.default_rng(0)
    n, k = 12, 5
    logits = rng.normal(size=(n, k)).astype(np.float32) * 2
    labels = rng.integers(0, k, size=n)
    onehot = np.eye(k, dtype=np.float32)[labels]
    soft = rng.dirichlet(np.ones(k), size=n).astype(np.float32)
    probs = np.asarray(ops.convert_to_numpy(ops.softmax(logits)))
    sample_weight = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
    reductions = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None]
    done = []

    def close(ours, theirs, what, rtol=1e-5, atol=1e-6):
        np.testing.assert_allclose(ops.convert_to_numpy(ours), np.asarray(theirs), rtol=rtol, atol=atol, err_msg=what)
        done.append(what)

    # 1. index targets against SparseCategoricalCrossentropy: logits and probabilities, every reduction,
    #    with and without sample_weight, with ignore_class (Keras masks those positions out of the mean)
    with_ignored = labels.copy()
    with_ignored[[1, 4, 5]] = -1
    for from_logits, y_pred in ((True, logits), (False, probs)):
        for reduction in reductions:
            for sw in (None, sample_weight):
                for y_true, ignore in ((labels, None), (with_ignored, -1)):
                    ours = xk.SparseCrossEntropy(from_logits=from_logits, ignore_class=ignore, reduction=reduction)
                    theirs = keras.losses.SparseCategoricalCrossentropy(
                        from_logits=from_logits, ignore_class=ignore, reduction=reduction
                    )
                    what = f"sparse from_logits={from_logits} reduction={reduction} sw={sw is not None} ignore={ignore}"
                    close(ours(y_true, y_pred, sample_weight=sw), theirs(y_true, y_pred, sample_weight=sw), what)
    # y_true of shape (n, 1), as Keras accepts; a 3-D batch with the classes last
    close(
        xk.SparseCrossEntropy(from_logits=True)(labels[:, None], logits),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels[:, None], logits),
        "sparse y_true (n, 1)",
    )
    z3, y3 = logits.reshape(3, 4, k), labels.reshape(3, 4)
    close(
        xk.SparseCrossEntropy(from_logits=True, reduction=None)(y3, z3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(y3, z3),
        "sparse 3-D",
    )

    # 2. one-hot and soft targets against CategoricalCrossentropy, with label smoothing (axis=-1: Keras
    #    smooths over shape[-1] = K there), logits and probabilities, every reduction
    for from_logits, y_pred in ((True, logits), (False, probs)):
        for eps in (0.0, 0.1, 0.35):
            for reduction in reductions:
                for y_true in (onehot, soft):
                    ours = xk.CrossEntropy(from_logits=from_logits, label_smoothing=eps, reduction=reduction)
                    theirs = keras.losses.CategoricalCrossentropy(
                        from_logits=from_logits, label_smoothing=eps, reduction=reduction
                    )
                    what = f"categorical from_logits={from_logits} eps={eps} reduction={reduction}"
                    close(
                        ours(y_true, y_pred, sample_weight=sample_weight),
                        theirs(y_true, y_pred, sample_weight=sample_weight),
                        what,
                    )
    # label smoothing of index targets = CategoricalCrossentropy's of their one-hot
    for eps in (0.1, 0.6):
        close(
            xk.SparseCrossEntropy(from_logits=True, label_smoothing=eps)(labels, logits),
            keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps)(onehot, logits),
            f"sparse smoothing {eps} = categorical of the one-hot",
        )
    # a class axis other than the last: Keras' loss without smoothing; with smoothing the formula over
    # K = shape[axis] (Keras 3.15 uses y_true.shape[-1] whatever the axis: a documented difference)
    zt, st = np.swapaxes(logits.reshape(3, 4, k), 1, 2), np.swapaxes(soft.reshape(3, 4, k), 1, 2)
    close(
        xk.CrossEntropy(from_logits=True, axis=1, reduction=None)(st, zt),
        keras.losses.CategoricalCrossentropy(from_logits=True, axis=1, reduction=None)(st, zt),
        "categorical axis=1",
    )
    close(
        xk.CrossEntropy(from_logits=True, axis=1, label_smoothing=0.2, reduction=None)(st, zt),
        _reference(zt, st, eps=0.2, axis=1),
        "categorical axis=1 smoothed over shape[axis]",
    )
    close(
        xk.SparseCrossEntropy(from_logits=True, axis=1, label_smoothing=0.2, reduction=None)(labels.reshape(3, 4), zt),
        _reference(zt, labels.reshape(3, 4), eps=0.2, axis=1),
        "sparse axis=1",
    )

    # 3. xlsce's extras (no Keras loss has them): the float64 formula, per position
    weight = [0.5, 1.0, 2.0, 1.5, 0.25]
    extras = [
        {"smoothing": "exclusive", "label_smoothing": 0.2},
        {"weight": weight, "label_smoothing": 0.1},
        {"z_loss": 1e-2},
        {"softcap": 3.0, "label_smoothing": 0.1},
    ]
    for extra in extras:
        ref = dict(extra, eps=extra.get("label_smoothing", 0.0))
        ref.pop("label_smoothing", None)
        close(
            xk.SparseCrossEntropy(from_logits=True, reduction=None, **extra)(labels, logits),
            _reference(logits, labels, **ref),
            f"sparse {extra}",
            rtol=2e-5,
        )
        close(
            xk.CrossEntropy(from_logits=True, reduction="sum", **extra)(soft, logits),
            _reference(logits, soft, **ref).sum(),
            f"categorical {extra}",
            rtol=2e-5,
        )
    # class weights with Keras' reduction: the mean over the positions of w_{y_i} l_i
    close(
        xk.SparseCrossEntropy(from_logits=True, weight=weight)(labels, logits),
        _reference(logits, labels, weight=weight).mean(),
        "weight with sum_over_batch_size",
    )

    # 4. configuration: get_config/from_config and Keras' serialization give the same loss
    for loss in (
        xk.SparseCrossEntropy(True, -1, "sum", label_smoothing=0.1, smoothing="exclusive", weight=np.array(weight)),
        xk.CrossEntropy(True, 0.2, -1, None, name="ce", z_loss=1e-3, softcap=5.0),
        xk.CrossEntropy(),
    ):
        config = loss.get_config()
        again = type(loss).from_config(config)
        assert again.get_config() == config, (config, again.get_config())
        revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
        assert type(revived) is type(loss) and revived.get_config() == config
        y = with_ignored if isinstance(loss, xk.SparseCrossEntropy) else soft
        y_pred = logits if loss.from_logits else probs
        close(again(y, y_pred), loss(y, y_pred), f"from_config {config['name']}")
        close(revived(y, y_pred), loss(y, y_pred), f"deserialized {config['name']}")

    # 5. bad settings fail when the loss is made, naming the argument
    for make, word in (
        (lambda: xk.SparseCrossEntropy(reduction="avg"), "reduction"),
        (lambda: xk.SparseCrossEntropy(label_smoothing=1.5), "label_smoothing"),
        (lambda: xk.CrossEntropy(smoothing="fairseq"), "smoothing"),
        (lambda: xk.CrossEntropy(z_loss=1e-4), "from_logits"),
        (lambda: xk.SparseCrossEntropy(softcap=30.0), "from_logits"),
        (lambda: xk.SparseCrossEntropy(from_logits=1), "from_logits"),
        (lambda: xk.SparseCrossEntropy(ignore_class=1.5), "ignore_index"),
        (lambda: xk.CrossEntropy(weight=np.ones((2, 2))), "weight"),
    ):
        try:
            make()
        except (TypeError, ValueError) as error:
            assert word in str(error), (word, error)
            done.append(f"refuses {word}")
        else:
            raise AssertionError(f"accepted a bad {word}")
    real_backend = keras.backend.backend
    keras.backend.backend = lambda: "tensorflow"  # whose tensors xlsce does not compute on
    try:
        xk.SparseCrossEntropy()
    except RuntimeError as error:
        assert "KERAS_BACKEND" in str(error) and "tensorflow" in str(error), error
        done.append("refuses the tensorflow backend")
    else:
        raise AssertionError("accepted the tensorflow backend")
    finally:
        keras.backend.backend = real_backend
    try:
        xk.CrossEntropy(from_logits=True)(labels, logits)
    except ValueError as error:
        assert "SparseCrossEntropy" in str(error)
    else:
        raise AssertionError("CrossEntropy accepted index targets")

    # 6. model.compile/fit: one epoch gives the weights that Keras' own loss gives (so the gradient
    #    through xlsce's analytic backward, under the backend's trainer, is Keras')
    if backend != "numpy":  # the NumPy backend does not train
        x = rng.normal(size=(32, 6)).astype(np.float32)
        y = rng.integers(0, k, size=32)
        y[::7] = -1
        trained = []
        for loss in (
            xk.SparseCrossEntropy(from_logits=True, ignore_class=-1),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1),
            xk.CrossEntropy(from_logits=True, label_smoothing=0.1),
            keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        ):
            keras.utils.set_random_seed(1)
            model = keras.Sequential(
                [keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(k)]
            )
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
            target = y if "Sparse" in type(loss).__name__ else np.eye(k, dtype=np.float32)[np.abs(y)]
            history = model.fit(x, target, batch_size=8, epochs=2, shuffle=False, verbose=0)
            trained.append((history.history["loss"], [np.asarray(w) for w in model.get_weights()]))
        for (ours, theirs), what in ((trained[:2], "sparse"), (trained[2:], "categorical")):
            close(ours[0], theirs[0], f"fit {what}: the epochs' losses", rtol=1e-4)
            for a, b in zip(ours[1], theirs[1], strict=True):
                close(a, b, f"fit {what}: the trained weights", rtol=1e-4, atol=1e-5)

    failures, tried = doctest.testmod(xk, optionflags=doctest.ELLIPSIS)
    assert tried and not failures, "doctests of xlsce.keras"
    print(f"{len(done)} checks, {tried} doctest examples")
    print(f"keras {backend}: all checks passed")


if __name__ == "__main__":  # pragma: no cover
    _checks(sys.argv[1])
