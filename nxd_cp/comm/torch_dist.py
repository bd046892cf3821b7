"""torch.distributed transport: NCCL on CUDA, gloo on CPU.

Collectives work on dim 0 of contiguous buffers; other dims are moved to the front and back.
Every result is contiguous, as NCCL / gloo and the XLA transport give them: callers (NxD's
linear backward ``grad_output.view(...)``, which receives all-gather attention's dK/dV) may
``view`` them.
The ring shift is one ``batch_isend_irecv`` (send to the next rank, receive from the previous)
whose handles the caller waits on after computing, so communication overlaps compute.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from nxd_cp.comm.base import PendingTensor, Transport, record


class TorchDistTransport(Transport):
    """Collectives of ``group.process_group`` (a torch.distributed ProcessGroup)."""

    def __init__(self, group):
        super().__init__(group)
        if group.size > 1 and group.process_group is None:
            raise ValueError("TorchDistTransport needs GroupSpec.process_group for a group of "
                             f"size {group.size}")
        self.pg = group.process_group

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        n = self.size
        if n == 1:
            return x
        record("all_gather", x, n)
        front = x.movedim(dim, 0).contiguous()
        out = torch.empty((n * front.shape[0],) + front.shape[1:], dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, front, group=self.pg)
        return out.movedim(0, dim).contiguous()

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        n = self.size
        if n == 1:
            return x
        self._check_divisible(x, dim, "reduce_scatter")
        record("reduce_scatter", x, n)
        front = x.movedim(dim, 0).contiguous()
        out = torch.empty((front.shape[0] // n,) + front.shape[1:], dtype=x.dtype,
                          device=x.device)
        dist.reduce_scatter_tensor(out, front, op=dist.ReduceOp.SUM, group=self.pg)
        return out.movedim(0, dim).contiguous()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        record("all_reduce", x, self.size)
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.pg)
        return out

    def all_to_all(self, x: torch.Tensor, split_dim: int, concat_dim: int) -> torch.Tensor:
        n = self.size
        if n == 1:
            return x
        self._check_divisible(x, split_dim, "all_to_all")
        record("all_to_all", x, n)
        split_dim, concat_dim = split_dim % x.dim(), concat_dim % x.dim()
        # [n, ...chunk...]: chunk j (of split_dim) first, so dim 0 is what all_to_all_single cuts
        front = x.unflatten(split_dim, (n, x.shape[split_dim] // n)).movedim(split_dim, 0)
        front = front.contiguous()
        out = torch.empty_like(front)
        dist.all_to_all_single(out, front, group=self.pg)
        # out[i] came from group index i: put i just before concat_dim and merge the two
        out = out.movedim(0, concat_dim)
        return out.flatten(concat_dim, concat_dim + 1).contiguous()

    def ring_shift_start(self, x: torch.Tensor, direction: int = 1) -> PendingTensor:
        self._check_direction(direction)
        n = self.size
        if n == 1:
            return PendingTensor(x)
        record("ring_shift", x, n)
        send = x.contiguous()
        recv = torch.empty_like(send)
        ranks, r = self.group.ranks, self.rank
        ops = [dist.P2POp(dist.isend, send, ranks[(r + direction) % n], self.pg),
               dist.P2POp(dist.irecv, recv, ranks[(r - direction) % n], self.pg)]
        works = dist.batch_isend_irecv(ops)
        # Keep ``send`` alive until the handles complete.
        return _PendingShift(recv, works, send)


class _PendingShift(PendingTensor):
    def __init__(self, recv, works, send):
        super().__init__(recv, works)
        self._send = send

    def wait(self) -> torch.Tensor:
        out = super().wait()
        self._send = None
        return out
