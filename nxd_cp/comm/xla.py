"""XLA transport: ``xm.*`` collectives with the group's replica groups / source-target pairs.

On Trainium (torch-neuronx) these lower to Neuron collectives; with torch-xla on CPU they lower
to HLO, which the tests read (multi-device collectives do not execute on XLA:CPU,
pytorch/xla#9089). XLA is lazy, so ``ring_shift_start`` already returns the traced result: the
compiler schedules the collective-permute against the compute around it. torch-xla is optional:
it is imported (through ``nxd_cp.compat.torch_xla``) when a collective is traced, not when this
module is imported.
"""
from __future__ import annotations

from typing import List

import torch

from nxd_cp.comm.base import PendingTensor, Transport, rank_tensor, record
from nxd_cp.compat.torch_xla import xla_model as _xm
from nxd_cp.topology.layout import ring_pairs


class XlaTransport(Transport):
    """Collectives over ``group.all_groups`` (every group of the kind: XLA replica groups)."""

    def rank_value(self, device: torch.device) -> torch.Tensor:
        """The group index as device data: every rank lowers the same graph."""
        return rank_tensor(self.group.ranks, self.rank, device)

    @property
    def replica_groups(self) -> List[List[int]]:
        return [list(g) for g in self.group.all_groups]

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1:
            return x
        record("all_gather", x, self.size)
        return _xm().all_gather(x, dim=dim, groups=self.replica_groups, pin_layout=False)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1:
            return x
        self._check_divisible(x, dim, "reduce_scatter")
        record("reduce_scatter", x, self.size)
        xm = _xm()
        return xm.reduce_scatter(xm.REDUCE_SUM, x, scale=1.0, scatter_dim=dim,
                                 shard_count=self.size, groups=self.replica_groups,
                                 pin_layout=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        record("all_reduce", x, self.size)
        xm = _xm()
        return xm.all_reduce(xm.REDUCE_SUM, x, groups=self.replica_groups, pin_layout=False)

    def all_to_all(self, x: torch.Tensor, split_dim: int, concat_dim: int) -> torch.Tensor:
        if self.size == 1:
            return x
        self._check_divisible(x, split_dim, "all_to_all")
        record("all_to_all", x, self.size)
        return _xm().all_to_all(x, split_dim % x.dim(), concat_dim % x.dim(), self.size,
                                groups=self.replica_groups, pin_layout=False)

    def ring_shift_start(self, x: torch.Tensor, direction: int = 1) -> PendingTensor:
        self._check_direction(direction)
        if self.size == 1:
            return PendingTensor(x)
        record("ring_shift", x, self.size)
        pairs = ring_pairs(self.replica_groups, direction)
        return PendingTensor(_xm().collective_permute(x, pairs=pairs))

