"""PyTorch DTensor arguments on 2 gloo processes (issue 15 item 4).

DTensors sharded along the positions (a batch or sequence dimension) and replicated ones give the
loss and the gradient of the whole problem, the gradient with the input's placements; against
``torch.nn.functional.cross_entropy`` on the full tensors in float64.  DTensors sharded on the
classes (logits, class weights, the classifier of ``linear_cross_entropy``), a mix of DTensor
and plain tensors, and partial sums are refused with a ValueError that names the argument and
points to ``process_group=`` (never a corrupt gradient, as the issue found before).

One launch: 2 processes on 127.0.0.1 (a free port, a timeout on ``init_process_group`` and on the
processes), each running every check and writing its report; each test reads one entry.
"""

from __future__ import annotations

import gloo
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD = 2

WORKER = r"""
import datetime, json, os, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F

rank, port, path = int(sys.argv[1]), sys.argv[3], sys.argv[4]  # argv[2]: the world size, 2
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import xlsce
import xlsce.torch

mesh = init_device_mesh("cpu", (2,))
EPS, IGNORE = 0.1, -100
gen = torch.Generator().manual_seed(0)  # the same problem on both ranks
N, K = 12, 7
z = torch.randn(N, K, dtype=torch.float64, generator=gen) * 2
y = torch.randint(0, K, (N,), generator=gen)
y[::4] = IGNORE
w = torch.rand(K, dtype=torch.float64, generator=gen) + 0.5
where = torch.rand(N, generator=gen) > 0.25
soft = torch.softmax(torch.randn(N, K, dtype=torch.float64, generator=gen), dim=1)


def put(x, *placements):
    return distribute_tensor(x, mesh, list(placements))


def full(x):
    return x.full_tensor() if isinstance(x, DTensor) else x


def err(got, want):
    got = full(got)
    return float(((got - want).abs() / want.abs().clamp_min(1e-3)).max())


def reference(z, y, **kw):  # F.cross_entropy on the full tensors; returns the loss and d loss / d z
    z = z.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(z, y, **kw)
    (loss if loss.ndim == 0 else loss.sum()).backward()
    return loss.detach(), z.grad


def ce_case(pz, py, pw, *, where_on=False, soft_target=False, reduction="mean", lse=False):
    kw = dict(label_smoothing=EPS, reduction=reduction)
    target = soft if soft_target else y
    if not soft_target:
        kw.update(weight=w, ignore_index=IGNORE)
    yr = target if not where_on else torch.where(where, y, IGNORE)  # where= as ignored positions
    want, want_g = reference(z, yr, **kw)
    zd = put(z, pz).requires_grad_(True)
    args = dict(kw)
    if not soft_target:
        args["weight"] = put(w, pw)
    if where_on:
        args["where"] = put(where, py)
    out = xlsce.cross_entropy(zd, put(target, py), return_lse=lse, **args)
    loss = out[0] if lse else out
    (loss if loss.ndim == 0 else loss.sum()).backward()
    r = {"value": err(loss, want), "grad": err(zd.grad, want_g),
         "grad_placements": str(zd.grad.placements), "want_placements": str(zd.placements)}
    if lse:
        r["lse"] = err(out[1], torch.logsumexp(z, dim=1))
    return r


def module_case():  # CrossEntropyLoss: classes along dimension 1, the sequence (dimension 2) sharded
    z3 = z.reshape(2, 6, K).transpose(1, 2).contiguous()  # (B, K, S)
    y3 = y.reshape(2, 6)
    mod = xlsce.torch.CrossEntropyLoss(weight=w, label_smoothing=EPS)
    want, want_g = reference(z3, y3, weight=w, label_smoothing=EPS)
    zd = put(z3, Shard(2)).requires_grad_(True)
    mod_d = xlsce.torch.CrossEntropyLoss(weight=put(w, Replicate()), label_smoothing=EPS)
    loss = mod_d(zd, put(y3, Shard(1)))
    loss.backward()
    return {"value": err(loss, want), "grad": err(zd.grad, want_g),
            "grad_placements": str(zd.grad.placements), "want_placements": str(zd.placements)}


def value_and_grad_case():
    want, want_g = reference(z, y, weight=w, ignore_index=IGNORE, label_smoothing=EPS)
    zd = put(z, Shard(0))
    loss, g = xlsce.value_and_grad(zd, put(y, Shard(0)), weight=put(w, Replicate()), label_smoothing=EPS)
    return {"value": err(loss, want), "grad": err(g, want_g),
            "grad_placements": str(g.placements), "want_placements": str(zd.placements)}


def linear_case():
    h = torch.randn(N, 5, dtype=torch.float64, generator=gen)
    cls = torch.randn(K, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(K, dtype=torch.float64, generator=gen)
    leaves = [x.clone().requires_grad_(True) for x in (h, cls, b)]
    want = F.cross_entropy(leaves[0] @ leaves[1].T + leaves[2], y, weight=w, label_smoothing=EPS)
    want.backward()
    ds = [put(h, Shard(0)), put(cls, Replicate()), put(b, Replicate())]
    ds = [d.requires_grad_(True) for d in ds]
    loss = xlsce.linear_cross_entropy(
        ds[0], ds[1], put(y, Shard(0)), bias=ds[2], weight=put(w, Replicate()), label_smoothing=EPS, chunk_size=4
    )
    loss.backward()
    return {"value": err(loss, want.detach()), "grad": max(err(d.grad, l.grad) for d, l in zip(ds, leaves)),
            "grad_placements": str([d.grad.placements for d in ds]), "want_placements": str([d.placements for d in ds])}


def refused(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return {"refused": type(e).__name__, "message": str(e)}
    return {"refused": None, "message": ""}


def class_sharded_logits():
    zd = put(z, Shard(1)).requires_grad_(True)
    xlsce.cross_entropy(zd, put(y, Replicate()), label_smoothing=EPS).backward()


def class_sharded_logits_plain_target():
    zd = put(z, Shard(1)).requires_grad_(True)
    xlsce.cross_entropy(zd, y, label_smoothing=EPS).backward()


def class_sharded_logits_ignored():  # the case that gave a corrupt gradient
    zd = put(z, Shard(1)).requires_grad_(True)
    xlsce.cross_entropy(zd, put(y, Replicate()), ignore_index=IGNORE).backward()


def class_sharded_weight():
    xlsce.cross_entropy(put(z, Shard(0)), put(y, Shard(0)), weight=put(w, Shard(0)))


def vocab_sharded_classifier():
    h = torch.randn(N, 4, dtype=torch.float64, generator=gen)
    cls = torch.randn(K + 1, 4, dtype=torch.float64, generator=gen)
    xlsce.linear_cross_entropy(put(h, Replicate()), put(cls, Shard(0)), put(y, Replicate()))


def partial_logits():
    zd = DTensor.from_local(z / 2, mesh, [Partial()])
    xlsce.cross_entropy(zd, put(y, Replicate()))


CASES = {
    "replicated": lambda: ce_case(Replicate(), Replicate(), Replicate()),
    "batch-sharded": lambda: ce_case(Shard(0), Shard(0), Replicate()),
    "batch-sharded-replicated-target": lambda: ce_case(Shard(0), Replicate(), Replicate()),
    "batch-sharded-where": lambda: ce_case(Shard(0), Shard(0), Replicate(), where_on=True),
    "batch-sharded-none": lambda: ce_case(Shard(0), Shard(0), Replicate(), reduction="none"),
    "batch-sharded-lse": lambda: ce_case(Shard(0), Shard(0), Replicate(), lse=True),
    "batch-sharded-sum": lambda: ce_case(Shard(0), Shard(0), Replicate(), reduction="sum"),
    "batch-sharded-soft": lambda: ce_case(Shard(0), Shard(0), Replicate(), soft_target=True),
    "module-sequence-sharded": module_case,
    "value_and_grad": value_and_grad_case,
    "linear-batch-sharded": linear_case,
    "refuse-class-sharded": lambda: refused(class_sharded_logits),
    "refuse-class-sharded-plain-target": lambda: refused(class_sharded_logits_plain_target),
    "refuse-class-sharded-ignored": lambda: refused(class_sharded_logits_ignored),
    "refuse-class-sharded-weight": lambda: refused(class_sharded_weight),
    "refuse-vocab-sharded-classifier": lambda: refused(vocab_sharded_classifier),
    "refuse-partial": lambda: refused(partial_logits),
}
report = {}
for name, case in CASES.items():
    try:
        report[name] = case()
    except Exception as e:
        report[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
with open(path, "w") as f:
    json.dump(report, f)
dist.barrier()
dist.destroy_process_group()
"""

COMPUTED = [
    "replicated",
    "batch-sharded",
    "batch-sharded-replicated-target",
    "batch-sharded-where",
    "batch-sharded-none",
    "batch-sharded-lse",
    "batch-sharded-sum",
    "batch-sharded-soft",
    "module-sequence-sharded",
    "value_and_grad",
    "linear-batch-sharded",
]
REFUSED = {  # case -> the argument the message must name
    "refuse-class-sharded": "logits",
    "refuse-class-sharded-plain-target": "logits",
    "refuse-class-sharded-ignored": "logits",
    "refuse-class-sharded-weight": "weight",
    "refuse-vocab-sharded-classifier": "classifier",
    "refuse-partial": "logits",
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return gloo.launch(WORKER, WORLD, tmp_path_factory.mktemp("dtensor"))


@pytest.mark.parametrize("name", COMPUTED)
def test_positions_sharded_or_replicated_equal_the_whole_problem(reports, name):
    for report in reports:  # every rank
        r = report[name]
        assert "error" not in r, r.get("error")
        assert r["value"] < 1e-12 and r["grad"] < 1e-12, r
        assert r["grad_placements"] == r["want_placements"], r
        assert r.get("lse", 0.0) < 1e-12, r


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_class_shards_are_refused_with_a_pointer_to_process_group(reports, name):
    for report in reports:
        r = report[name]
        assert "error" not in r, r.get("error")
        assert r["refused"] == "ValueError", r
        assert REFUSED[name] in r["message"], r
        if name != "refuse-partial":
            assert "process_group=" in r["message"], r
