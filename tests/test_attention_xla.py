"""CP attention traced on an XLA device (torch-xla on CPU): collectives, pairs, static graphs.

One process lowers CP rank r's forward + backward by giving the transport an explicit
``GroupSpec``; multi-device collectives do not execute on XLA:CPU (pytorch/xla#9089), so only
the HLO is read. What Trainium would run is that HLO: the right number of collective-permutes
(ring) or all-gather / reduce-scatter (all-gather), over the CP group, no host transfer, and the
same text when traced twice (no recompilation between steps). The cp=1 path executes for real.
"""
import re

import pytest
import torch

torch_xla = pytest.importorskip("torch_xla")

from xla_exec import normalise_hlo  # noqa: E402

from nxd_cp.attention import context_parallel_attention  # noqa: E402
from nxd_cp.attention.dispatch import register_kernel  # noqa: E402
from nxd_cp.attention.tile_loop import TileLoopKernel  # noqa: E402
from nxd_cp.comm.xla import XlaTransport  # noqa: E402
from nxd_cp.compat import torch_xla as xla_compat  # noqa: E402
from nxd_cp.topology.groups import GroupSpec  # noqa: E402
from nxd_cp.topology.layout import ParallelLayout, ring_pairs  # noqa: E402


def _reset_token():
    """Start a fresh chain of collectives so the HLO holds only what the next trace adds."""
    xla_compat.reset_collective_token(torch_xla.device())


def _lower(cp, rank, comm_type, window=None, groups=None):
    _reset_token()
    dev = torch_xla.device()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8 * 2, 16, generator=g).to(dev).requires_grad_()
    k = torch.randn(1, 2, 8 * 2, 16, generator=g).to(dev).requires_grad_()
    v = torch.randn(1, 2, 8 * 2, 16, generator=g).to(dev).requires_grad_()
    spec = GroupSpec.explicit(groups or [list(range(cp))], rank)
    out = context_parallel_attention(q, k, v, comm_type=comm_type, window_size=window,
                                     group=spec)
    out.backward(torch.ones_like(out))
    return xla_compat.tensors_hlo([out, q.grad, k.grad, v.grad])


def _lines(hlo, opcode):
    return [line for line in hlo.splitlines() if re.search(rf"= .* {opcode}\(", line)]


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_lowers_to_collective_permutes_of_the_cp_ring(cp):
    hlo = _lower(cp, 1, "p2p")
    perms = _lines(hlo, "collective-permute")
    # forward: cp-1 K/V shifts; backward: cp-1 K/V shifts + cp dK/dV shifts
    assert len(perms) == 3 * cp - 2
    pairs = "{" + ",".join("{%d,%d}" % (a, b) for a, b in ring_pairs([list(range(cp))])) + "}"
    assert all(f"source_target_pairs={pairs}" in line for line in perms)
    assert not _lines(hlo, "all-gather") and "outfeed" not in hlo and "send(" not in hlo
    assert hlo == _lower(cp, 1, "p2p")  # same graph every step


@pytest.mark.parametrize("cp", [2, 4])
def test_all_gather_lowers_to_gather_and_reduce_scatter(cp):
    hlo = _lower(cp, cp - 1, "all_gather", window=5)
    groups = "{{" + ",".join(str(r) for r in range(cp)) + "}}"
    gathers, scatters = _lines(hlo, "all-gather"), _lines(hlo, "reduce-scatter")
    assert len(gathers) == 2 and len(scatters) == 1  # gather fwd, re-gather + scatter bwd
    assert all(f"replica_groups={groups}" in line for line in gathers + scatters)
    assert not _lines(hlo, "collective-permute") and "outfeed" not in hlo
    assert hlo == _lower(cp, cp - 1, "all_gather", window=5)


def test_tp2_cp2_uses_the_strided_cp_groups():
    cp_groups = ParallelLayout(4, 2, 2).context_parallel_groups()
    perms = _lines(_lower(2, 0, "p2p", groups=cp_groups), "collective-permute")
    assert perms and all("source_target_pairs={{0,2},{2,0},{1,3},{3,1}}" in line
                         for line in perms)


def test_cp1_executes_on_xla_and_matches_cpu():
    dev = torch_xla.device()
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(2, h, 40, 16, generator=g) for h in (4, 2, 2, 4))
    results = []
    for device in (torch.device("cpu"), dev):
        qq, kk, vv = (t.to(device).detach().requires_grad_() for t in (q, k, v))
        out = context_parallel_attention(qq, kk, vv, window_size=7,
                                         group=GroupSpec.explicit([[0]], 0))
        out.backward(do.to(device))
        results.append([t.detach().cpu() for t in (out, qq.grad, kk.grad, vv.grad)])
    for cpu, xla in zip(*results):
        # Same fp32 math on two backends: summation order differs slightly.
        assert ((cpu - xla).norm() / cpu.norm()).item() < 1e-5


# --- One graph for every rank -----------------------------------------------------------------
# The CP rank reaches the graph as device data (Transport.rank_value), so the lowered module of
# every rank must be the same text once instruction names and source metadata are normalised.
# A Python-int rank would bake rank-dependent shapes (zigzag) and positions into the graph: the
# negative control below lowers that form and must see different graphs.

def _lower_case(cp, rank, comm, layout="zigzag", window=None, padded=False, causal=True,
                groups=None, s_local=16):
    _reset_token()
    dev = torch_xla.device()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, s_local, 16, generator=g).to(dev).requires_grad_()
    k, v = (torch.randn(1, 2, s_local, 16, generator=g).to(dev).requires_grad_()
            for _ in range(2))
    keep = (torch.rand(1, s_local, generator=g) > 0.3).to(dev) if padded else None
    spec = GroupSpec.explicit(groups or [list(range(cp))], rank)
    out = context_parallel_attention(q, k, v, causal=causal, comm_type=comm, window_size=window,
                                     load_balance=layout, group=spec, key_padding_mask=keep)
    out.backward(torch.ones_like(out))
    return xla_compat.tensors_hlo([out, q.grad, k.grad, v.grad])


CASES = [dict(), dict(layout="contiguous"), dict(window=5), dict(padded=True),
         dict(causal=False)]


@pytest.mark.parametrize("comm", ["p2p", "all_gather"])
def test_every_cp_rank_lowers_the_same_graph_without_f64(comm):
    for case in CASES:
        graphs = [_lower_case(4, r, comm, **case) for r in range(4)]
        assert len({normalise_hlo(h) for h in graphs}) == 1, (comm, case)
        # Trainium has no f64 compute; s64 would be index arithmetic in 64 bits.
        assert not re.search(r"\b[fs]64\[", graphs[0]), (comm, case)


@pytest.mark.parametrize("comm", ["p2p", "all_gather"])
def test_tile_loops_lower_the_same_graph_on_every_rank(comm):
    """With blocks larger than the XLA block (here 4: every block loops over Q tiles inside the
    graph) the graph is still one for every rank, without f64 or s64 (the loops count in s32)."""
    previous = register_kernel("xla", TileLoopKernel(4))
    try:
        for case in CASES:
            graphs = [_lower_case(4, r, comm, **case) for r in range(4)]
            assert len({normalise_hlo(h) for h in graphs}) == 1, (comm, case)
            assert " while(" in graphs[0], (comm, case)
            assert not re.search(r"\b[fs]64\[", graphs[0]), (comm, case)
    finally:
        register_kernel("xla", previous)


def test_tp2_cp2_ranks_lower_the_same_graph():
    cp_groups = ParallelLayout(4, 2, 2).context_parallel_groups()
    for comm in ("p2p", "all_gather"):
        graphs = {normalise_hlo(_lower_case(2, r, comm, window=5, padded=True, groups=cp_groups))
                  for r in range(4)}
        assert len(graphs) == 1, comm


def test_python_int_rank_gives_rank_dependent_graphs(monkeypatch):
    """Negative control: the rank as a Python int (the torch.distributed form) on XLA."""
    monkeypatch.setattr(XlaTransport, "rank_value", lambda self, device: self.rank)
    graphs = {normalise_hlo(_lower_case(4, r, "p2p")) for r in range(4)}
    assert len(graphs) > 1


def _instructions(hlo):
    return sum(1 for line in hlo.splitlines() if re.match(r"\s+(ROOT )?%\S+ = ", line))


def test_graph_size_does_not_grow_with_the_sequence():
    """Structural bound (lowering only): one layer's attention fwd+bwd at cp=8. Up to
    S_local=4096 every half-block product is one tile (XLA block 2048); above it every product
    is one loop over Q tiles inside the graph, so the graph is the same size at 8K, 16K and 32K
    tokens per rank; it grows linearly in cp."""
    small = _instructions(_lower_case(8, 3, "p2p", s_local=256))
    cp4 = _instructions(_lower_case(4, 3, "p2p", s_local=256))
    at_4k = _instructions(_lower_case(8, 3, "p2p", s_local=4096))
    looped = [_instructions(_lower_case(8, 3, "p2p", s_local=s)) for s in (8192, 16384, 32768)]
    per_step = (small - cp4) / 4
    # Measured (torch-xla 2.9): 2,045 (256) / 2,212 (4K) / 3,241 (8K-32K) instructions, 267
    # per ring step; issue 14's targets ~3,500 and 375; with torch-xla's own scan 4,083 at
    # 8K-32K; 7de2d56: 4,002 at 4K and growing quadratically beyond; 75,439 at 4K before.
    assert at_4k <= 2400 and abs(at_4k - small) <= 400, (at_4k, small)
    assert len(set(looped)) == 1 and looped[0] <= 3500, looped
    assert per_step <= 300, per_step
