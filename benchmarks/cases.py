"""The cases: shapes, dtypes, variants, and the inputs (built once, in NumPy, from a seed).

A case with ``h`` set is one of the fused linear loss: hidden states (N, H) and a
classifier (K, H) instead of logits (N, K); its label reads ``linear NxHxK``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

CACHE_ENV = "XLSCE_BENCH_CACHE"
SOURCE_ENV = "XLSCE_BENCH_SOURCE"  # directory holding the xlsce package to benchmark


def use_source():
    """Import xlsce from ``$XLSCE_BENCH_SOURCE`` (ahead of the working directory) and check that it did."""
    folder = os.environ.get(SOURCE_ENV)
    if folder:
        sys.path.insert(0, folder)
    import xlsce

    if folder and not os.path.abspath(xlsce.__file__).startswith(os.path.abspath(folder) + os.sep):
        raise RuntimeError(f"xlsce imported from {xlsce.__file__}, not from {folder}")
    return xlsce.__file__


EPS = 0.1  # label_smoothing of every case
IGNORE_INDEX = -100
IGNORED_FRACTION = 0.1  # share of positions set to IGNORE_INDEX in the "masked" variant

FULL_SHAPES = ((256, 10), (65536, 1000), (4096, 32768))
BF16_SHAPES = ((4096, 32768),)  # bfloat16 runs on torch and JAX only
# quick: both variants at (256, 10); the masked variant at (1024, 1000) in float32 and bfloat16
QUICK_CASES = (((256, 10), "float32", "plain"), ((256, 10), "float32", "masked"))
QUICK_CASES += (((1024, 1000), "float32", "masked"), ((1024, 1000), "bfloat16", "masked"))
VARIANTS = ("plain", "masked")  # masked: class weights and ignored positions
DTYPES = ("float32", "bfloat16")
# --device cuda: the large shapes first (a --budget cuts from the end), both dtypes, and the linear loss
CUDA_SHAPES = ((4096, 32768), (65536, 1000), (256, 10))
CUDA_BF16_SHAPES = ((4096, 32768), (65536, 1000))
CUDA_LINEAR = (8192, 4096, 128256)  # N, H, V in bfloat16: a Llama-3-sized vocabulary
QUICK_LINEAR = (4096, 1024, 32768)


@dataclass(frozen=True)
class Case:
    n: int
    k: int
    dtype: str  # "float32" | "bfloat16"
    variant: str  # "plain" | "masked"
    h: int | None = None  # hidden size: a case of the fused linear loss

    @property
    def shape(self):
        return (self.n, self.k)

    @property
    def label(self):
        return label(self.shape, self.dtype, self.variant, self.h)

    @property
    def logits_bytes(self):
        return self.n * self.k * (2 if self.dtype == "bfloat16" else 4)

    def to_json(self):
        out = {"shape": [self.n, self.k], "dtype": self.dtype, "variant": self.variant}
        return out if self.h is None else {**out, "hidden": self.h}

    @classmethod
    def from_json(cls, d):
        return cls(*d["shape"], d["dtype"], d["variant"], d.get("hidden"))


def label(shape, dtype, variant, h=None):
    n, k = shape
    return f"{n}x{k} {dtype} {variant}" if h is None else f"linear {n}x{h}x{k} {dtype}"


def parse_shape(text: str, parts: int = 2):
    """'4096x32768' -> (4096, 32768); with ``parts=3``, 'NxHxV' -> (N, H, V)."""
    try:
        dims = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != parts:
        raise ValueError(f"shape must look like {'4096x32768' if parts == 2 else '8192x4096x128256'}, got {text!r}")
    if min(dims) < 1:
        raise ValueError(f"shape must be positive, got {text!r}")
    return dims


def default_cases(quick: bool, shapes=None, dtypes=None, variants=None, device="cpu", linear=None):
    """The issue's cases (or the quick ones, or the GPU's), narrowed by the options given; then the
    fused linear loss's cases (``linear``: (N, H, V) triples; by default one on the GPU, none on the CPU)."""
    if shapes:
        triples = [(s, d, v) for s in shapes for d in (dtypes or ("float32",)) for v in (variants or VARIANTS)]
    elif quick:
        triples = QUICK_CASES
    else:
        full, bf16 = (CUDA_SHAPES, CUDA_BF16_SHAPES) if device == "cuda" else (FULL_SHAPES, BF16_SHAPES)
        pairs = [(s, "float32") for s in full] + [(s, "bfloat16") for s in bf16]
        pairs.sort(key=lambda p: full.index(p[0]))  # shape by shape
        triples = [(s, d, v) for s, d in pairs for v in VARIANTS]
    triples = [t for t in triples if (not dtypes or t[1] in dtypes) and (not variants or t[2] in variants)]
    if linear is None:
        linear = [QUICK_LINEAR if quick else CUDA_LINEAR] if device == "cuda" and not shapes else []
    cases = [Case(n, k, d, v) for (n, k), d, v in triples]
    return cases + [Case(n, v, d, "plain", h) for n, h, v in linear for d in (dtypes or ("bfloat16",))]


def make_inputs(case: Case, seed: int = 0):
    """NumPy inputs of a case: float32 logits (N, K), int64 targets (N,), float32 weights (K,) or None.

    The logits are float32 even for bfloat16 cases (each backend casts); they
    are drawn directly in float32, so no float64 temporary inflates the memory.
    Where ``$XLSCE_BENCH_CACHE`` names a directory, the inputs are saved there
    the first time and loaded afterwards (drawing 10^8 normals takes seconds,
    and every backend's process and every memory process needs them).
    A linear case's inputs are those of :func:`linear_inputs` instead.
    """
    cache = os.environ.get(CACHE_ENV)
    path = None
    names = ("logits", "target", "weight") if case.h is None else ("hidden", "classifier", "target")
    if cache:
        what = f"{case.n}x{case.k}-{case.variant}" if case.h is None else f"{case.n}x{case.h}x{case.k}-linear"
        path = os.path.join(cache, f"{what}-{seed}.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                return tuple(f[name] if name in f else None for name in names)
    arrays = _draw(case, seed) if case.h is None else linear_inputs(case.n, case.h, case.k, seed)
    if path:
        np.savez(path + ".tmp.npz", **{name: a for name, a in zip(names, arrays, strict=True) if a is not None})
        os.replace(path + ".tmp.npz", path)
    return arrays


def _draw(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((case.n, case.k), dtype=np.float32)
    logits *= 2.0
    target = rng.integers(0, case.k, size=case.n, dtype=np.int64)
    weight = None
    if case.variant == "masked":
        target[rng.random(case.n) < IGNORED_FRACTION] = IGNORE_INDEX
        target[0] = 0  # at least one position counts
        weight = rng.uniform(0.5, 1.5, size=case.k).astype(np.float32)
    return logits, target, weight


def linear_inputs(n: int, h: int, v: int, seed: int = 0):
    """Hidden states (N, H) ~ N(0, 1), a classifier (V, H) ~ N(0, 1/H), uniform int64 targets (N,)."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, h), dtype=np.float32)
    classifier = rng.standard_normal((v, h), dtype=np.float32)
    classifier *= np.float32(h**-0.5)
    target = rng.integers(0, v, size=n)
    return hidden, classifier, target
