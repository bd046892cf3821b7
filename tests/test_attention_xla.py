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

from nxd_cp.attention import context_parallel_attention  # noqa: E402
from nxd_cp.comm.base import GroupSpec  # noqa: E402
from nxd_cp.layout import ParallelLayout, ring_pairs  # noqa: E402


def _reset_token():
    """Start a fresh chain of collectives so the HLO holds only what the next trace adds."""
    torch_xla._XLAC._set_all_reduce_token(str(torch_xla.device()), None)


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
    return torch_xla._XLAC._get_xla_tensors_hlo([out, q.grad, k.grad, v.grad])


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
