"""Vocabulary parallelism on torch.distributed: ``process_group=`` on 2 and 4 gloo processes (issue 15 items 3, 6, 8).

Each rank holds a contiguous slice of the classes, in rank order (of the logits, the class weights, a
probability target, the classifier and bias of ``linear_cross_entropy``); the class indices are global.
Against ``torch.nn.functional.cross_entropy`` on the whole tensors in float64 (the exclusive convention as
PyTorch's uniform one at eps K/(K-1), the z-loss and the soft-cap added from their definitions in torch):
the loss (the same on every rank), each rank's slice of the gradient through autograd and from
``xlsce.value_and_grad``, the reported lse; ``xlsce.torch.CrossEntropyLoss`` and the functional in torch's
layout (classes along dimension 1); ``linear_cross_entropy`` (the hidden states' gradient summed over the
ranks); with 4 ranks, a 2 x 2 grid of data and vocabulary groups with the global mean from
``denominator=``.  Bad calls raise the same ValueError on every rank, before any collective.

Each launch is one set of processes on 127.0.0.1 (a free port, a timeout on ``init_process_group`` and on
the processes), each running every check and writing its report; each test reads one entry.
"""

from __future__ import annotations

import gloo
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


WORKER = r"""
import datetime, json, os, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F

rank, world, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
import xlsce
import xlsce.torch

WORLD = dist.group.WORLD
IGNORE = -100
gen = torch.Generator().manual_seed(0)  # the same problem on every rank
N, K = 12, 16
z = torch.randn(N, K, dtype=torch.float64, generator=gen) * 3
y = torch.randint(0, K, (N,), generator=gen)
y[::4] = IGNORE
w = torch.rand(K, dtype=torch.float64, generator=gen) + 0.5
where = torch.rand(N, generator=gen) > 0.25
probs = torch.softmax(torch.randn(N, K, dtype=torch.float64, generator=gen), dim=1)


def mine(x, dim, shards=world, index=rank):
    k = x.shape[dim] // shards
    return x.narrow(dim, index * k, k)


def err(got, want):
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return float("inf")
    return float(((got - want).abs() / want.abs().clamp(min=1e-3)).max()) if got.numel() else 0.0


def reference(z, t, *, label_smoothing=0.0, smoothing="uniform", weight=None, where=None, reduction="mean",
              z_loss=0.0, softcap=None):
    # F.cross_entropy, with the exclusive convention as the uniform one at eps K/(K-1) (docs/what-it-computes.md),
    # masked positions as ignore_index (class indices) or as zero rows (probabilities), the z-loss's mean over
    # the counted positions and the soft-cap added from their definitions
    k = z.shape[1]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    eps = label_smoothing * k / (k - 1) if smoothing == "exclusive" else label_smoothing
    soft = t.is_floating_point()
    valid = torch.ones(z.shape[0], dtype=torch.bool) if soft else t != IGNORE
    if where is not None:
        valid = valid & where
    if soft:
        ce = F.cross_entropy(z, t, weight=weight, label_smoothing=eps, reduction="none")
        ce = torch.where(valid, ce, 0.0)
        d = valid.sum()
    else:
        tt = torch.where(valid, t, IGNORE)
        ce = F.cross_entropy(z, tt, weight=weight, label_smoothing=eps, reduction="none", ignore_index=IGNORE)
        wy = (torch.ones(k, dtype=z.dtype) if weight is None else weight)[torch.where(valid, t, 0)]
        d = torch.where(valid, wy, 0.0).sum()
    zl = z_loss * torch.logsumexp(z, 1) ** 2
    if reduction == "none":
        return torch.where(valid, ce + zl, 0.0)
    if reduction == "sum":
        return (ce + torch.where(valid, zl, 0.0)).sum()
    return ce.sum() / d + torch.where(valid, zl, 0.0).sum() / valid.sum()


CASES = {
    "plain": {},
    "uniform": {"label_smoothing": 0.3},
    "exclusive": {"label_smoothing": 0.3, "smoothing": "exclusive"},
    "weights-where": {"label_smoothing": 0.2, "weight": True, "where": True},
    "exclusive-weights-zloss": {"label_smoothing": 0.1, "smoothing": "exclusive", "weight": True, "z_loss": 1e-2},
    "softcap-sum": {"label_smoothing": 0.1, "softcap": 4.0, "reduction": "sum"},
    "none-lse": {"label_smoothing": 0.25, "reduction": "none", "return_lse": True},
    "soft-targets": {"label_smoothing": 0.1, "soft": True},
    "soft-weights-where": {"label_smoothing": 0.2, "soft": True, "weight": True, "where": True},
}


def ce_case(options):
    options = dict(options)
    use_w, use_where, soft = options.pop("weight", False), options.pop("where", False), options.pop("soft", False)
    lse_out = options.pop("return_lse", False)
    t = probs if soft else y
    zr = z.clone().requires_grad_()
    want = reference(zr, t, weight=w if use_w else None, where=where if use_where else None, **options)
    want.sum().backward()
    zl = mine(z, 1).clone().requires_grad_()
    kw = dict(weight=mine(w, 0) if use_w else None, where=where if use_where else None, process_group=WORLD, **options)
    tl = mine(t, 1) if soft else t
    out = xlsce.cross_entropy(zl, tl, return_lse=lse_out, **kw)
    loss = out[0] if lse_out else out
    loss.sum().backward()
    value, grad = xlsce.value_and_grad(mine(z, 1), tl, **kw)
    r = {"value": err(loss, want), "grad": err(zl.grad, mine(zr.grad, 1)), "vg_value": err(value, want),
         "vg_grad": err(grad, mine(zr.grad, 1))}
    if lse_out:
        r["lse"] = err(out[1], torch.logsumexp(z, 1))
    return r


def minus_inf_case():
    # classes out of play: smoothing over the K' classes in play of the whole row (uniform eps / K')
    zz = z.clone()
    zz[0, 1] = zz[3, 5] = -torch.inf
    zz[5, : K // world] = -torch.inf  # one rank's whole slice of a row
    yy = y.clone()
    yy[0], yy[3], yy[5] = 0, 6, K - 1
    eps = 0.2
    fin = zz > -torch.inf
    kk = fin.sum(1, keepdim=True).double()
    lp = torch.where(fin, zz - torch.logsumexp(zz, 1, keepdim=True), 0.0)
    q = (1 - eps) * F.one_hot(yy.clamp(min=0), K).double() + eps / kk * fin
    per = torch.where(yy != IGNORE, -(q * lp).sum(1), 0.0)
    want = per.sum() / (yy != IGNORE).sum()
    got = xlsce.cross_entropy(mine(zz, 1), yy, label_smoothing=eps, process_group=WORLD)
    return {"value": err(got, want)}


def blocks_case():
    # logits of more than 2**20 elements per rank: the eager CPU path evaluates them by blocks of positions, each
    # block with its collectives (the same number on every rank); a -inf logit on one rank only
    g = torch.Generator().manual_seed(4)
    n, k = 1200, 1024 * world
    zz = torch.randn(n, k, dtype=torch.float64, generator=g) * 2
    zz[7, 3] = -torch.inf
    yy = torch.randint(0, k, (n,), generator=g)
    yy[::9] = IGNORE
    yy[7] = 5
    ww = torch.rand(k, dtype=torch.float64, generator=g) + 0.5
    zr = zz.clone().requires_grad_()
    # the reference from the formula: on row 7 the smoothing puts eps / (K - 1) on the K - 1 classes in play
    fin = zz > -torch.inf
    lp = torch.where(fin, torch.log_softmax(zr, 1), 0.0)
    q = 0.9 * F.one_hot(yy.clamp(min=0), k).double() + 0.1 / fin.sum(1, keepdim=True).double() * fin
    valid = yy != IGNORE
    per = -(ww * q * lp).sum(1)
    want = torch.where(valid, per, 0.0).sum() / torch.where(valid, ww[yy.clamp(min=0)], 0.0).sum()
    want.backward()
    zl = mine(zz, 1).clone().requires_grad_()
    got = xlsce.cross_entropy(zl, yy, label_smoothing=0.1, weight=mine(ww, 0), process_group=WORLD)
    got.backward()
    return {"value": err(got, want), "grad": err(zl.grad, mine(zr.grad, 1))}


def accuracy_case():
    # ties between the ranks' slices: the first maximum of the whole row (class 1) wins
    zz = z.clone()
    zz[:, 1] = zz[:, K - 1] = zz.max() + 1.0
    yy = y.clone()
    yy[::3] = 1
    want = (zz.argmax(1) == yy)[yy != IGNORE].double().mean()
    _, got = xlsce.cross_entropy(mine(zz, 1), yy, process_group=WORLD, return_token_accuracy=True)
    return {"value": err(got, want), "want": float(want)}


def module_case():
    # torch's layout: (N, C, L), the classes (dimension 1) split over the ranks, weight a buffer of this rank's slice
    z3 = torch.randn(4, K, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y3 = torch.randint(0, K, (4, 5), generator=torch.Generator().manual_seed(2))
    zr = z3.clone().requires_grad_()
    want = F.cross_entropy(zr, y3, weight=w, label_smoothing=0.1)
    want.backward()
    zl = mine(z3, 1).clone().requires_grad_()
    module = xlsce.torch.CrossEntropyLoss(weight=mine(w, 0), label_smoothing=0.1, process_group=WORLD)
    got = module(zl, y3)
    got.backward()
    functional = xlsce.torch.cross_entropy(mine(z3, 1), y3, mine(w, 0), label_smoothing=0.1, process_group=WORLD)
    return {"value": err(got, want), "grad": err(zl.grad, mine(zr.grad, 1)), "functional": err(functional, want),
            "repr": repr(module)}


def linear_case(options):
    g = torch.Generator().manual_seed(3)
    n, h, v = 10, 6, 16
    hid = torch.randn(n, h, dtype=torch.float64, generator=g)
    cls = torch.randn(v, h, dtype=torch.float64, generator=g) / 2
    bias = torch.randn(v, dtype=torch.float64, generator=g)
    yy = torch.randint(0, v, (n,), generator=g)
    yy[::3] = IGNORE
    options = dict(options)
    hr, cr, br = (x.clone().requires_grad_() for x in (hid, cls, bias))
    want = reference(hr @ cr.T + br, yy, **options)
    want.sum().backward()
    hl, cl, bl = hid.clone().requires_grad_(), mine(cls, 0).clone().requires_grad_(), mine(bias, 0).clone().requires_grad_()
    got = xlsce.linear_cross_entropy(hl, cl, yy, bias=bl, chunk_size=4, process_group=WORLD, **options)
    got.sum().backward()
    value, (dh, dw, db) = xlsce.linear_value_and_grad(hid, mine(cls, 0), yy, bias=mine(bias, 0), chunk_size=4,
                                                      process_group=WORLD, **options)
    return {"value": err(got, want), "dhidden": err(hl.grad, hr.grad), "dclassifier": err(cl.grad, mine(cr.grad, 0)),
            "dbias": err(bl.grad, mine(br.grad, 0)), "vg_value": err(value, want), "vg_dhidden": err(dh, hr.grad),
            "vg_dclassifier": err(dw, mine(cr.grad, 0)), "vg_dbias": err(db, mine(br.grad, 0))}


def grid_case():
    # 4 ranks as 2 data x 2 vocabulary: rank = 2 * data + vocab; the positions split over "data", the classes over
    # "vocab"; the global mean from denominator= (mean_denominator all-reduced over the data group)
    data, vocab = divmod(rank, 2)
    vocab_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    data_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    vg, dg = vocab_groups[data], data_groups[vocab]
    # (no z-loss: beside class weights, denominator= divides it by sum m_i w[y_i] too, where the mean takes
    # its mean over the counted positions; docs/scaling-out.md)
    kw = dict(label_smoothing=0.2, smoothing="exclusive")
    zr = z.clone().requires_grad_()
    want = reference(zr, y, weight=w, where=where, **kw)
    want.backward()
    rows = slice(data * N // 2, (data + 1) * N // 2)
    zl = mine(z[rows], 1, 2, vocab).clone().requires_grad_()
    d = xlsce.mean_denominator(y[rows], weight=w, where=where[rows])
    dist.all_reduce(d, group=dg)
    part = xlsce.cross_entropy(zl, y[rows], weight=mine(w, 0, 2, vocab), where=where[rows], denominator=d,
                               process_group=vg, **kw)
    total = part.detach().clone()
    dist.all_reduce(total, group=dg)
    part.backward()
    return {"value": err(total, want), "grad": err(zl.grad, mine(zr.grad[rows], 1, 2, vocab))}


def errors_case():
    out = {}
    def catch(name, fn):
        try:
            fn()
            out[name] = {"refused": None}
        except Exception as e:
            out[name] = {"refused": type(e).__name__, "message": str(e)}
    bad = y.clone()
    bad[1] = K + 2
    catch("out-of-range", lambda: xlsce.cross_entropy(mine(z, 1), bad, process_group=WORLD))
    catch("whole-weight", lambda: xlsce.cross_entropy(mine(z, 1), y, weight=w, process_group=WORLD))
    catch("axis_name", lambda: xlsce.cross_entropy(mine(z, 1), y, axis_name="v"))
    catch("compile", lambda: torch.compile(lambda a, b: xlsce.cross_entropy(a, b, process_group=WORLD), fullgraph=True)(mine(z, 1), y))
    # after the refusals the group still works (no rank is left waiting in a collective)
    catch("after", lambda: xlsce.cross_entropy(mine(z, 1), y, process_group=WORLD))
    return out


report = {}
for name, options in CASES.items():
    try:
        report[f"ce-{name}"] = ce_case(options)
    except Exception as e:
        report[f"ce-{name}"] = {"error": f"{type(e).__name__}: {e}"}
for key, fn in (
    ("minus-inf", minus_inf_case),
    ("accuracy", accuracy_case),
    ("blocks", blocks_case),
    ("module", module_case),
    ("linear", lambda: linear_case({"label_smoothing": 0.1})),
    ("linear-exclusive-zloss", lambda: linear_case({"label_smoothing": 0.2, "smoothing": "exclusive", "z_loss": 1e-3})),
    ("linear-none", lambda: linear_case({"reduction": "none", "label_smoothing": 0.1})),
    ("grid", grid_case if world == 4 else None),
    ("errors", errors_case),
):
    if fn is None:
        continue
    try:
        report[key] = fn()
    except Exception as e:
        report[key] = {"error": f"{type(e).__name__}: {e}"}
json.dump(report, open(path, "w"))
dist.destroy_process_group()
"""


_LAUNCHED = {}  # world size -> the ranks' reports (one launch each per session)


def _reports(tmp_path_factory, world):
    if world not in _LAUNCHED:
        _LAUNCHED[world] = gloo.launch(WORKER, world, tmp_path_factory.mktemp(f"vocab_torch_{world}"))
    return _LAUNCHED[world]


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def reports(request, tmp_path_factory):
    return _reports(tmp_path_factory, request.param)


CE = ["plain", "uniform", "exclusive", "weights-where", "exclusive-weights-zloss", "softcap-sum", "none-lse"]
CE += ["soft-targets", "soft-weights-where"]


def _check(r, keys):
    assert "error" not in r, r.get("error")
    for key in keys:
        if key in r:
            assert r[key] < 1e-12, (key, r)


@pytest.mark.parametrize("name", CE)
def test_cross_entropy_over_ranks_equals_torch(reports, name):
    for r in reports:  # every rank: the whole loss, its own slice of the gradient
        _check(r[f"ce-{name}"], ("value", "grad", "vg_value", "vg_grad", "lse"))


def test_classes_out_of_play_use_the_global_count(reports):
    for r in reports:
        _check(r["minus-inf"], ("value",))


def test_eager_blocks_with_a_minus_inf_on_one_rank(reports):
    for r in reports:
        _check(r["blocks"], ("value", "grad"))


def test_token_accuracy_takes_the_first_maximum_across_ranks(reports):
    for r in reports:
        _check(r["accuracy"], ("value",))
        assert r["accuracy"]["want"] > 0.2, r["accuracy"]


def test_module_and_functional_in_torch_layout(reports):
    for r in reports:
        _check(r["module"], ("value", "grad", "functional"))
        assert "process_group=<set>" in r["module"]["repr"]


@pytest.mark.parametrize("name", ["linear", "linear-exclusive-zloss", "linear-none"])
def test_linear_cross_entropy_over_ranks(reports, name):
    keys = ("value", "dhidden", "dclassifier", "dbias", "vg_value", "vg_dhidden", "vg_dclassifier", "vg_dbias")
    for r in reports:
        _check(r[name], keys)


def test_data_and_vocabulary_groups_give_the_global_mean(tmp_path_factory):
    for r in _reports(tmp_path_factory, 4):  # a 2 x 2 grid of the 4 ranks
        _check(r["grid"], ("value", "grad"))


@pytest.mark.parametrize(
    "name, words",
    [
        ("out-of-range", "outside [0, 16)"),
        ("whole-weight", "this shard's slice"),
        ("axis_name", "process_group="),
        ("compile", "process_group= runs eagerly"),
    ],
)
def test_bad_calls_are_refused_on_every_rank(reports, name, words):
    for r in reports:
        e = r["errors"][name]
        assert e["refused"] in ("ValueError", "TorchRuntimeError", "Unsupported"), e
        assert words in e["message"], e
    for r in reports:
        assert r["errors"]["after"]["refused"] is None, r["errors"]["after"]
