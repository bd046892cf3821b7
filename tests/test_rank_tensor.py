"""``comm.base.rank_tensor``: one upload per (group, rank, device), whatever form the key takes.

The rank tensor is device data every step graph reads (a graph input on XLA): a new upload per
call would be a new tensor per layer and step. Checked by identity (the same tensor object) and
on a lowered TP2 x CP2 step traced twice: two tensors in all (the TP and the CP group's).
"""
import os

import pytest
import torch

from nxd_cp.comm.base import _rank_tensor, rank_tensor

pytestmark = [pytest.mark.unit]


def test_one_tensor_per_group_rank_and_device():
    a = rank_tensor((0, 2), 1, torch.device("cpu"))
    assert rank_tensor([0, 2], 1, "cpu") is a  # list ranks, device as a string
    assert rank_tensor((0, 2), torch.tensor(1).item(), torch.device("cpu")) is a
    assert rank_tensor((1, 3), 1, "cpu") is not a  # another group: another graph input
    assert a.dtype == torch.int32 and a.tolist() == [1]


def test_a_step_traced_twice_uploads_two_rank_tensors():
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    torch_xla = pytest.importorskip("torch_xla")
    from test_xla_exec_models import training_step

    from nxd_cp import parallel_state as ps

    dev = torch_xla.device()
    assert rank_tensor((0, 1), 1, dev) is rank_tensor((0, 1), 1, str(dev))
    _rank_tensor.cache_clear()
    for _ in range(2):
        with ps.explicit_rank(4, 1, 2, 2):
            training_step(1, cases=[("llama", "p2p")])
    info = _rank_tensor.cache_info()
    assert info.misses == 2 and info.hits >= 4, info  # TP and CP group; reused after
