"""TP layers, CP loss and CP gradient reduction on real gloo ranks, against plain torch.

One 4-rank TP2 x CP2 spawn. Layers are checked over the TP groups {0,1},{2,3} against nn.Linear /
nn.Embedding / F.cross_entropy with the same (seeded) weights and inputs: forward, input
gradient and the rank's shard of the weight gradient. The loss is checked over the CP groups
{0,2},{1,3} against F.cross_entropy on the full sequence, with unequal token counts per rank.
The column layer, embedding, vocab-parallel cross entropy and loss run a second time with the
ranks as device data (``NXD_CP_RANK_AS_TENSOR=1``: the form XLA lowers, one graph per TP group).
Each check is its own test (tests/cases.py).

Tolerances: layer outputs and gradients are fp32 sums of at most 16 terms split over 2 ranks,
so they agree to rounding (atol 1e-6 on values of order 1). Losses: relative 1e-6 (a mean of
~500 terms summed in a different order).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from cases import CaseRunner, case_result, wanted_cases

from nxd_cp.parallel_state import RANK_AS_TENSOR_ENV
from nxd_cp.testing import run_ranks

IN, OUT, VOCAB, HID = 16, 8, 12, 6


def _same(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _close(a, b, atol=1e-6):
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0)


def _column(fails):
    from nxd_cp import parallel_state as ps
    from nxd_cp.layers import ColumnParallelLinear
    from nxd_cp.tensor_parallel.partition import partition_of, shard_of

    tp, r = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    for gather in (False, True):
        torch.manual_seed(3)
        layer = ColumnParallelLinear(IN, OUT, bias=True, gather_output=gather,
                                     init_method=torch.nn.init.normal_)
        torch.manual_seed(3)
        w = torch.nn.init.normal_(torch.empty(OUT, IN))  # init_method sees the full weight
        b = _same(4, OUT)
        with torch.no_grad():
            layer.bias.copy_(shard_of(partition_of(layer, "bias", layer.bias), b))
        x = _same(5, 2, 3, IN).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, yr = layer(x), F.linear(xr, w.requires_grad_(), b)
        g = _same(6, 2, 3, OUT)
        y.backward(g if gather else g.chunk(tp, -1)[r])
        yr.backward(g)
        want_y = yr if gather else yr.chunk(tp, -1)[r]
        checks = {"out": (y, want_y), "x.grad": (x.grad, xr.grad),
                  "weight.grad": (layer.weight.grad, w.grad.chunk(tp, 0)[r]),
                  "weight": (layer.weight, w.chunk(tp, 0)[r])}
        for name, (got, want) in checks.items():
            if not _close(got.detach(), want.detach()):
                fails.append(f"column gather_output={gather} {name}")
    # NxD's keep_master_weight: the full weight the shard was cut from, kept on the layer
    torch.manual_seed(3)
    kept = ColumnParallelLinear(IN, OUT, gather_output=False, init_method=torch.nn.init.normal_,
                                keep_master_weight=True)
    if kept.master_weight is None or not torch.equal(kept.master_weight, w.detach()) or \
            not torch.equal(kept.weight.detach(), w.detach().chunk(tp, 0)[r]):
        fails.append("column keep_master_weight=True does not keep the full weight")
    if layer.master_weight is not None:
        fails.append("column keep_master_weight=False keeps a master weight")


def _row(fails):
    from nxd_cp import parallel_state as ps
    from nxd_cp.layers import RowParallelLinear

    tp, r = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    for parallel_in in (True, False):
        layer = RowParallelLinear(IN, OUT, bias=True, input_is_parallel=parallel_in)
        w, b = _same(7, OUT, IN).requires_grad_(), _same(8, OUT).requires_grad_()
        with torch.no_grad():
            layer.weight.copy_(w.chunk(tp, 1)[r])
            layer.bias.copy_(b)
        x = _same(9, 2, 3, IN)
        xl = (x.chunk(tp, -1)[r] if parallel_in else x).clone().requires_grad_()
        xr = x.clone().requires_grad_()
        y, yr = layer(xl), F.linear(xr, w, b)
        g = _same(10, 2, 3, OUT)
        y.backward(g)
        yr.backward(g)
        want_xg = xr.grad.chunk(tp, -1)[r] if parallel_in else xr.grad
        checks = {"out": (y, yr), "x.grad": (xl.grad, want_xg),
                  "weight.grad": (layer.weight.grad, w.grad.chunk(tp, 1)[r]),
                  "bias.grad": (layer.bias.grad, b.grad)}
        for name, (got, want) in checks.items():
            if not _close(got.detach(), want.detach()):
                fails.append(f"row input_is_parallel={parallel_in} {name}")
    torch.manual_seed(5)
    kept = RowParallelLinear(IN, OUT, input_is_parallel=True, init_method=torch.nn.init.normal_,
                             keep_master_weight=True)
    torch.manual_seed(5)
    full = torch.nn.init.normal_(torch.empty(OUT, IN))
    if kept.master_weight is None or not torch.equal(kept.master_weight, full) or \
            not torch.equal(kept.weight.detach(), full.chunk(tp, 1)[r]):
        fails.append("row keep_master_weight=True does not keep the full weight")


def _embedding(fails):
    from nxd_cp import parallel_state as ps
    from nxd_cp.layers import ParallelEmbedding

    tp, r = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    ids = torch.tensor([[0, 3, 11, 6, 3], [5, 7, 2, 9, 6]])  # both vocab halves, padding id 3
    for across in (False, True):
        ref = torch.nn.Embedding(VOCAB, HID, padding_idx=3)
        with torch.no_grad():
            ref.weight.copy_(_same(11, VOCAB, HID))
        layer = ParallelEmbedding(VOCAB, HID, padding_idx=3, shard_across_embedding=across)
        dim = 1 if across else 0
        with torch.no_grad():
            layer.weight.copy_(ref.weight.chunk(tp, dim)[r])
        g = _same(12, 2, 5, HID)
        y, yr = layer(ids), ref(ids)
        y.backward(g)
        yr.backward(g)
        if not _close(y.detach(), yr.detach()):
            fails.append(f"embedding across={across} out")
        if not _close(layer.weight.grad, ref.weight.grad.chunk(tp, dim)[r]):
            fails.append(f"embedding across={across} weight.grad (padding row must get none)")


def _replicated_kv(fails):
    """TP2. 1 KV head: both ranks hold it, each back-propagates its own query heads' part and
    the replicas' sums meet; 2 KV heads: one each (a slot per rank, nothing to sum)."""
    from nxd_cp import parallel_state as ps
    from nxd_cp.layers import ReplicatedKVLinear

    r, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_size()
    for kv_heads in (1, 2):
        layer = ReplicatedKVLinear(IN, num_kv_heads=kv_heads, head_dim=4, bias=True)
        w, b = _same(13, 4, IN).requires_grad_(), _same(14, 4).requires_grad_()
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        x = _same(15, 2, 3, IN)
        gs = [_same(16 + i, 2, 3, 4) for i in range(tp)]  # upstream grads of the TP ranks
        xl = x.clone().requires_grad_()
        layer(xl).backward(gs[r])
        replicas = tp // kv_heads  # the ranks holding this rank's head sum their w/b grads
        sum(F.linear(x, w, b) * gs[i] for i in range(tp)
            if i // replicas == r // replicas).sum().backward()
        xr = x.clone().requires_grad_()  # x's gradient is summed over every TP rank
        sum(F.linear(xr, w.detach(), b.detach()) * g for g in gs).sum().backward()
        for name, got, want in (("weight.grad", layer.weight.grad, w.grad),
                                ("bias.grad", layer.bias.grad, b.grad),
                                ("x.grad", xl.grad, xr.grad)):
            if not _close(got, want):
                fails.append(f"replicated kv ({kv_heads} heads) {name}")


def _vocab_parallel_ce(fails):
    from nxd_cp import parallel_state as ps
    from nxd_cp.layers import parallel_cross_entropy

    tp, r = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    logits = (_same(20, 7, VOCAB) * 3).requires_grad_()
    target = torch.tensor([0, 11, 5, 6, 1, 7, 3])
    local = logits.detach().chunk(tp, -1)[r].clone().requires_grad_()
    got = parallel_cross_entropy(local, target)
    want = F.cross_entropy(logits, target, reduction="none")
    got.sum().backward()
    want.sum().backward()
    if not _close(got.detach(), want.detach()):
        fails.append("parallel_cross_entropy loss")
    if not _close(local.grad, logits.grad.chunk(tp, -1)[r]):
        fails.append("parallel_cross_entropy grad")


def _errors(fails):
    from nxd_cp.layers import ColumnParallelLinear, ParallelEmbedding

    # SP of the linear layers: tests/test_sequence_parallel.py; the embedding has none.
    for make in (lambda: ParallelEmbedding(VOCAB, HID, sequence_parallel_enabled=True),):
        try:
            make()
            fails.append("sequence_parallel_enabled=True did not raise")
        except NotImplementedError as e:
            if "(sequence_parallel_enabled=True) needs NeuronX Distributed" not in str(e):
                fails.append(f"unclear message: {e}")
    try:
        ColumnParallelLinear(IN, 7)
        fails.append("output_size=7 over tp=2 did not raise")
    except ValueError as e:
        if "output_size=7 is not divisible by tensor_model_parallel_size=2" not in str(e):
            fails.append(f"unclear message: {e}")


def _cp_loss():
    """Token-weighted CP loss on shards of a full [B, S, V] vs F.cross_entropy."""
    from nxd_cp import parallel_state as ps
    from nxd_cp.comm import get_transport
    from nxd_cp.sequence.batch import shift_labels
    from nxd_cp.sequence.layout import shard_sequence
    from nxd_cp.training.loss import context_parallel_cross_entropy

    cp, c = ps.get_context_model_parallel_size(), ps.get_context_model_parallel_rank()
    tp, t = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    S = 16
    # Confident (large) logits on the first chunk only, so per-token losses depend on the
    # position and the CP ranks' means differ (which is where token weighting matters).
    scale = 1.0 + 3.0 * (torch.arange(S) < S // 4).float()
    logits = (_same(30, 2, S, VOCAB) * scale.view(1, S, 1)).requires_grad_()
    labels = torch.randint(0, VOCAB, (2, S), generator=torch.Generator().manual_seed(31))
    labels[1, 5:] = -100  # padding: zigzag CP rank 0 keeps 12 targets, rank 1 only 8
    shifted = shift_labels(labels)
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), shifted.reshape(-1), ignore_index=-100)
    ref.backward()
    out = {"ref": ref.item()}
    for vocab_parallel in (False, True):
        mine = shard_sequence(logits.detach(), 1, c, cp)
        if vocab_parallel:
            mine = mine.chunk(tp, -1)[t]
        mine = mine.clone().requires_grad_()
        my_labels = shard_sequence(shifted, 1, c, cp)
        loss = context_parallel_cross_entropy(mine, my_labels, vocab_parallel=vocab_parallel)
        loss.backward()
        want_grad = shard_sequence(logits.grad, 1, c, cp)
        if vocab_parallel:
            want_grad = want_grad.chunk(tp, -1)[t]
        out[f"loss vp={vocab_parallel}"] = loss.item()
        out[f"grad ok vp={vocab_parallel}"] = _close(mine.grad, want_grad)
    # NxD's rule for comparison: each rank's mean over its own tokens, averaged over CP.
    local_mean = F.cross_entropy(shard_sequence(logits.detach(), 1, c, cp).reshape(-1, VOCAB),
                                 shard_sequence(shifted, 1, c, cp).reshape(-1))
    transport = get_transport(ps.get_group_spec("context"), local_mean.device)
    out["nxd_style"] = (transport.all_reduce(local_mean) / cp).item()
    return out


def _grads():
    from nxd_cp import parallel_state as ps
    from nxd_cp.training.grads import (
        allreduce_context_parallel_gradients,
        allreduce_data_context_parallel_gradients,
    )

    cp_ranks = ps.get_context_model_parallel_group(as_list=True)
    me = torch.distributed.get_rank()
    group = next(g for g in cp_ranks if me in g)
    module = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    ok = []
    for target in (module, opt, list(module.parameters())):
        for p in module.parameters():
            p.grad = torch.full_like(p, float(me + 1))
        allreduce_context_parallel_gradients(target)
        ok.append(all(torch.equal(p.grad, torch.full_like(p, float(sum(g + 1 for g in group))))
                      for p in module.parameters()))
    for p in module.parameters():
        p.grad = torch.full_like(p, float(me + 1))
    allreduce_data_context_parallel_gradients(module)  # dp == 1 here: the CP sum
    ok.append(all(torch.equal(p.grad, torch.full_like(p, float(sum(g + 1 for g in group))))
                  for p in module.parameters()))
    return ok


CHECKS = ("column", "row", "embedding", "replicated_kv", "vocab_parallel_ce", "errors")
# Again with the ranks as device data (XLA's form: one graph for every TP rank) on gloo.
TENSOR_CHECKS = ("column", "embedding", "replicated_kv", "vocab_parallel_ce")
LAYER_KEYS = list(CHECKS) + [f"{c}-rank_as_tensor" for c in TENSOR_CHECKS]


def _fails_of(check):
    fails = []
    check(fails)
    return fails


def tp2cp2(rank, world, wanted=None):
    from nxd_cp import parallel_state as ps

    checks = {"column": _column, "row": _row, "embedding": _embedding,
              "replicated_kv": _replicated_kv, "vocab_parallel_ce": _vocab_parallel_ce,
              "errors": _errors}
    runner = CaseRunner(wanted)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    for name in CHECKS:
        runner.run(name, _fails_of, checks[name])
    runner.run("using_nxd", ps.nxd_in_charge)
    runner.run("loss", _cp_loss)
    runner.run("grads", _grads)
    # Again with the ranks as device data (XLA's form: one graph for every TP rank) on gloo:
    # read when the groups are built.
    ps.destroy_model_parallel()
    os.environ[RANK_AS_TENSOR_ENV] = "1"
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    assert ps.get_group_spec("tensor").rank_as_tensor
    for name in TENSOR_CHECKS:
        runner.run(f"{name}-rank_as_tensor", _fails_of, checks[name])
    runner.run("loss-rank_as_tensor", _cp_loss)
    del os.environ[RANK_AS_TENSOR_ENV]
    return runner.results


@pytest.fixture(scope="module")
def results(request):
    return run_ranks(tp2cp2, 4, wanted_cases(request, "results"), timeout=180)


@pytest.mark.parametrize("case", ["using_nxd"])
def test_fallback_in_charge(results, case):
    for rank, using_nxd in enumerate(case_result(results, case)):
        assert not using_nxd, rank


@pytest.mark.parametrize("case", LAYER_KEYS)
def test_fallback_layers_match_torch(results, case):
    for rank, fails in enumerate(case_result(results, case)):
        assert not fails, f"rank {rank}: {fails}"


@pytest.mark.parametrize("case", ["loss", "loss-rank_as_tensor"])  # Python-int / device ranks
def test_context_parallel_cross_entropy_is_token_weighted(results, case):
    per_rank = case_result(results, case)
    for rank, loss in enumerate(per_rank):
        for vp in (False, True):
            # A mean of 20 fp32 terms summed in another order: 1e-6 relative.
            assert abs(loss[f"loss vp={vp}"] - loss["ref"]) <= 1e-6 * abs(loss["ref"]), \
                (rank, case)
            assert loss[f"grad ok vp={vp}"], f"rank {rank} {case}: logits gradient, vp={vp}"


@pytest.mark.parametrize("case", ["loss"])
def test_token_weighting_is_not_nxds_mean_of_means(results, case):
    # The data has unequal token counts per CP rank, so NxD's mean of per-rank means is a
    # different number: the token weighting is what makes the loss above match.
    loss = case_result(results, case)[0]
    assert abs(loss["nxd_style"] - loss["ref"]) > 1e-2 * abs(loss["ref"])


@pytest.mark.parametrize("case", ["grads"])
def test_gradient_reduction_sums_over_cp(results, case):
    for rank, ok in enumerate(case_result(results, case)):
        assert all(ok), f"rank {rank}: {ok}"
