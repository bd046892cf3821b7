"""Every transport primitive and autograd wrapper on real gloo ranks, against what the math says.

One 4-rank TP2 x CP2 spawn checks both the CP groups {0,2},{1,3} and the TP groups {0,1},{2,3}.
Inputs are drawn from a generator seeded identically on every rank, so each rank can compute
every rank's input and hence the exact expected result. Collectives only move and add fp32
numbers, so results are compared exactly (sums of two terms are order-independent) or to 1e-6
where more than two terms are added.
"""
import threading

import pytest
import torch

from nxd_cp import parallel_state as ps
from nxd_cp.comm import autograd as cg
from nxd_cp.comm import count_bytes, get_transport
from nxd_cp.testing import run_ranks

SHAPE = (2, 6, 4)


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(n)]


def _check_group(kind):
    spec = ps.get_group_spec(kind)
    t = get_transport(spec, torch.device("cpu"))
    n, r = t.size, t.rank
    xs = _inputs(n, 1)
    gs = _inputs(n, 2)  # upstream gradients, different on every rank
    x = xs[r]
    fails = []

    def check(name, got, want, exact=True):
        if got.shape != want.shape:
            fails.append(f"{kind}/{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        elif not (torch.equal(got, want) if exact else torch.allclose(got, want, atol=1e-6)):
            fails.append(f"{kind}/{name}: max diff {(got - want).abs().max().item():.3g}")

    total = sum(xs)
    check("all_gather", t.all_gather(x, 1), torch.cat(xs, 1))
    check("reduce_scatter", t.reduce_scatter(x, 1), total.chunk(n, 1)[r], exact=False)
    check("all_reduce", t.all_reduce(x), total, exact=False)
    check("ring_shift+1", t.ring_shift_start(x, 1).wait(), xs[(r - 1) % n])
    check("ring_shift-1", t.ring_shift_start(x, -1).wait(), xs[(r + 1) % n])
    check("ring_shift_start", t.ring_shift_start(x, 1).wait(), xs[(r - 1) % n])

    # Autograd wrappers: gradient of sum(y * g_r) on every rank.
    def grad(fn, *args):
        xx = x.clone().requires_grad_(True)
        y = fn(xx, *args)
        g = gs[r] if y.shape == x.shape else torch.cat(gs, 1) if y.shape[1] > x.shape[1] \
            else gs[r].chunk(n, 1)[0]
        (y * g).sum().backward()
        return y, xx.grad

    y, gx = grad(cg.all_gather, 1, t)
    check("ag.fwd", y, torch.cat(xs, 1))
    # Rank j's loss is sum(cat(xs) * cat(gs)): d/dx_r summed over ranks = n * gs[r].
    check("ag.bwd", gx, n * gs[r], exact=False)
    y, gx = grad(cg.gather_from_group, 1, t)
    check("gather_from_group.bwd", gx, gs[r])  # replicated downstream: own chunk only
    xx = x.clone().requires_grad_(True)
    y = cg.reduce_scatter(xx, 1, t)
    (y * gs[r].chunk(n, 1)[r]).sum().backward()
    check("rs.bwd", xx.grad, torch.cat([gs[j].chunk(n, 1)[j] for j in range(n)], 1))
    xx = x.clone().requires_grad_(True)
    y = cg.scatter_to_group(xx, 1, t)
    check("scatter.fwd", y, x.chunk(n, 1)[r])
    (y * gs[r].chunk(n, 1)[r]).sum().backward()
    check("scatter.bwd", xx.grad, torch.cat([gs[j].chunk(n, 1)[j] for j in range(n)], 1))
    y, gx = grad(cg.copy_to_group, t)
    check("copy.bwd", gx, sum(gs), exact=False)
    y, gx = grad(cg.reduce_from_group, t)
    check("reduce.fwd", y, total, exact=False)
    check("reduce.bwd", gx, gs[r])

    with count_bytes() as tally:
        t.ring_shift_start(x, 1).wait()
        t.all_gather(x, 1)
        t.reduce_scatter(x, 1)
    nbytes = x.numel() * 4
    want = {"ring_shift": nbytes, "all_gather": (n - 1) * nbytes,
            "reduce_scatter": round(nbytes * (n - 1) / n)} if n > 1 else {}  # size 1 sends nothing
    if dict(tally.bytes) != want:
        fails.append(f"{kind}/tally {dict(tally.bytes)} != {want}")
    if n == 1:
        return fails
    # Backward on another thread, as autograd runs device backward on its worker threads: the
    # tally opened on this thread must still count it (a per-thread tally reads 0 here).
    xx = x.clone().requires_grad_(True)
    y = cg.all_gather(xx, 1, t)  # backward: one reduce-scatter of [2, 6n, 4]
    with count_bytes() as tally:
        worker = threading.Thread(target=lambda: (y * torch.cat(gs, 1)).sum().backward())
        worker.start()
        worker.join()
    if dict(tally.bytes) != {"reduce_scatter": round(n * nbytes * (n - 1) / n)}:
        fails.append(f"{kind}/backward on a worker thread counted {dict(tally.bytes)}")
    try:
        t.reduce_scatter(torch.randn(2, 3), 1)
        fails.append(f"{kind}/reduce_scatter of a non-divisible dim did not raise")
    except ValueError as e:
        if "not divisible by the group size" not in str(e):
            fails.append(f"{kind}/bad message {e}")
    return fails


def _scenario(rank, world):
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    return _check_group("context") + _check_group("tensor") + _check_group("data")


def test_primitives_and_autograd_tp2_cp2():
    for rank, fails in enumerate(run_ranks(_scenario, 4)):
        assert fails == [], f"rank {rank}: {fails}"


def test_group_spec_validation():
    from nxd_cp.topology.groups import GroupSpec
    with pytest.raises(ValueError, match="global_rank=5 is in none"):
        GroupSpec.explicit([[0, 2], [1, 3]], 5)
    with pytest.raises(ValueError, match="rank=2 is outside"):
        GroupSpec((0, 1), 2, ((0, 1),))
    with pytest.raises(TypeError, match="group must be a GroupSpec"):
        get_transport([0, 1], torch.device("cpu"))
