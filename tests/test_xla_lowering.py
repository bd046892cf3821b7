"""The XLA transport lowers to the right HLO collectives (torch-xla on CPU, one device).

Multi-device XLA collectives cannot execute on XLA:CPU (pytorch/xla#9089), so these tests read
the HLO text of each traced collective: its opcode, ``replica_groups`` and
``source_target_pairs`` for rank 0 of TP2 x CP2 (CP groups {0,2},{1,3}; TP groups {0,1},{2,3}).
"""
import re
import subprocess
import sys

import pytest
import torch

torch_xla = pytest.importorskip("torch_xla")

from nxd_cp.comm import autograd as cg  # noqa: E402
from nxd_cp.comm import get_transport  # noqa: E402
from nxd_cp.compat import torch_xla as xla_compat  # noqa: E402
from nxd_cp.topology.groups import GroupSpec  # noqa: E402
from nxd_cp.topology.layout import ParallelLayout  # noqa: E402

LAYOUT = ParallelLayout(4, tensor_model_parallel_size=2, context_parallel_size=2)


def hlo(*tensors) -> str:
    return xla_compat.tensors_hlo(list(tensors))


def ops(text: str, opcode: str):
    """The attribute text of every ``opcode`` instruction in the HLO."""
    return [line for line in text.splitlines() if re.search(rf"= .* {opcode}\(", line)]


def transport(kind: str, rank: int = 0):
    groups = (LAYOUT.context_parallel_groups() if kind == "context"
              else LAYOUT.tensor_parallel_groups())
    return get_transport(GroupSpec.explicit(groups, rank), torch_xla.device())


@pytest.mark.parametrize("kind,groups", [("context", "{{0,2},{1,3}}"),
                                         ("tensor", "{{0,1},{2,3}}")])
def test_primitives_lower_with_replica_groups(kind, groups):
    t = transport(kind)
    dev = torch_xla.device()
    x = torch.randn(2, 4, 6, device=dev)
    # Collectives are chained through a token, so earlier ones of the process can appear too:
    # the last instruction of an opcode is the one just traced.
    ag = ops(hlo(t.all_gather(x, 1)), "all-gather")
    assert ag and f"replica_groups={groups}" in ag[-1] and "dimensions={1}" in ag[-1]
    rs = ops(hlo(t.reduce_scatter(x, 2)), "reduce-scatter")
    assert rs and f"replica_groups={groups}" in rs[-1] and "dimensions={2}" in rs[-1]
    ar = ops(hlo(t.all_reduce(x)), "all-reduce")
    assert ar and f"replica_groups={groups}" in ar[-1]


def test_ring_shift_pairs_both_directions():
    t = transport("context", rank=2)
    x = torch.randn(3, 5, device=torch_xla.device())
    fwd = ops(hlo(t.ring_shift_start(x, 1).wait()), "collective-permute")
    assert fwd and "source_target_pairs={{0,2},{2,0},{1,3},{3,1}}" in fwd[-1]
    cp4 = get_transport(GroupSpec.explicit([[0, 1, 2, 3]], 1), torch_xla.device())
    back = ops(hlo(cp4.ring_shift_start(x, -1).wait()), "collective-permute")
    assert back and "source_target_pairs={{0,3},{1,0},{2,1},{3,2}}" in back[-1]


def test_autograd_wrappers_lower_to_their_backward_collectives():
    t = transport("context")
    x = torch.randn(2, 4, device=torch_xla.device(), requires_grad=True)
    y = cg.all_gather(x, 1, t)
    (y * y).sum().backward()
    bwd = hlo(x.grad)
    assert any("replica_groups={{0,2},{1,3}}" in a for a in ops(bwd, "reduce-scatter"))


def test_rank_is_device_data_on_xla():
    """The CP rank reaches XLA graphs as an int32 [1] tensor (a graph input), never a constant."""
    for rank in (0, 1):
        t = transport("context", rank=2 * rank)
        value = t.rank_value(torch_xla.device())
        assert value.dtype == torch.int32 and tuple(value.shape) == (1,)
        assert value.device.type == "xla" and value.cpu().tolist() == [rank]
        assert "parameter(0)" in hlo(value + 0)


def test_own_chunk_of_gather_from_group_is_rank_independent():
    """The TP gather_output backward keeps its own chunk by a device-data index: same graph on
    every rank (the Python-int form would slice [0:2] on one rank and [2:4] on the other)."""
    graphs = set()
    for rank in (0, 1):
        t = transport("tensor", rank=rank)
        x = torch.randn(2, 4, device=torch_xla.device(), requires_grad=True)
        (cg.gather_from_group(x, 1, t) * 2.0).sum().backward()
        text = hlo(x.grad)
        graphs.add(re.sub(r"%[\w.\-]+", "%x", re.sub(r", metadata=\{[^}]*\}", "", text)))
        assert not re.search(r"\b[fs]64\[", text)
    assert len(graphs) == 1


def test_compat_names_the_torch_xla_version_when_a_private_name_is_missing(monkeypatch):
    monkeypatch.delattr(torch_xla._XLAC, "_get_xla_tensors_hlo")
    with pytest.raises(RuntimeError, match=r"torch_xla\._XLAC\._get_xla_tensors_hlo is not "
                                           r"available in torch-xla \S+ \(nxd_cp\.compat"):
        xla_compat.tensors_hlo([])
    assert xla_compat.SUPPORTED == ("2.9",)


def test_importing_nxd_cp_does_not_import_torch_xla():
    code = ("import sys, nxd_cp, nxd_cp.comm.xla, nxd_cp.comm.xla_loop, nxd_cp.compat.torch_xla; "
            "assert 'torch_xla' not in sys.modules, 'torch_xla imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
