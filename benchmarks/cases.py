"""The cases: shapes, dtypes, variants, and the inputs (built once, in NumPy, from a seed)."""

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


@dataclass(frozen=True)
class Case:
    n: int
    k: int
    dtype: str  # "float32" | "bfloat16"
    variant: str  # "plain" | "masked"

    @property
    def shape(self):
        return (self.n, self.k)

    @property
    def label(self):
        return f"{self.n}x{self.k} {self.dtype} {self.variant}"

    @property
    def logits_bytes(self):
        return self.n * self.k * (2 if self.dtype == "bfloat16" else 4)

    def to_json(self):
        return {"shape": [self.n, self.k], "dtype": self.dtype, "variant": self.variant}


def parse_shape(text: str):
    """'4096x32768' -> (4096, 32768)."""
    try:
        n, k = (int(s) for s in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 4096x32768, got {text!r}") from None
    if n < 1 or k < 1:
        raise ValueError(f"shape must be positive, got {text!r}")
    return n, k


def default_cases(quick: bool, shapes=None, dtypes=None, variants=None):
    """The issue's cases (or the quick ones), narrowed by the options given."""
    if shapes:
        triples = [(s, d, v) for s in shapes for d in (dtypes or ("float32",)) for v in (variants or VARIANTS)]
    elif quick:
        triples = QUICK_CASES
    else:
        pairs = [(s, "float32") for s in FULL_SHAPES] + [(s, "bfloat16") for s in BF16_SHAPES]
        triples = [(s, d, v) for s, d in pairs for v in VARIANTS]
    triples = [t for t in triples if (not dtypes or t[1] in dtypes) and (not variants or t[2] in variants)]
    return [Case(n, k, d, v) for (n, k), d, v in triples]


def make_inputs(case: Case, seed: int = 0):
    """NumPy inputs of a case: float32 logits (N, K), int64 targets (N,), float32 weights (K,) or None.

    The logits are float32 even for bfloat16 cases (each backend casts); they
    are drawn directly in float32, so no float64 temporary inflates the memory.
    Where ``$XLSCE_BENCH_CACHE`` names a directory, the inputs are saved there
    the first time and loaded afterwards (drawing 10^8 normals takes seconds,
    and every backend's process and every memory process needs them).
    """
    cache = os.environ.get(CACHE_ENV)
    path = None
    if cache:
        path = os.path.join(cache, f"{case.n}x{case.k}-{case.variant}-{seed}.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                return f["logits"], f["target"], (f["weight"] if "weight" in f else None)
    logits, target, weight = _draw(case, seed)
    if path:
        arrays = {"logits": logits, "target": target, **({} if weight is None else {"weight": weight})}
        np.savez(path + ".tmp.npz", **arrays)
        os.replace(path + ".tmp.npz", path)
    return logits, target, weight


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
