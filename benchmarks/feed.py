"""One CP rank in one process: a transport that hands the rank what it would receive.

``FeedTransport`` implements ``nxd_cp.comm.base.Transport`` without any communication, so the
library's own ring and all-gather streams run unchanged (same schedule, kernels,
merges, buffer packing and dK/dV accumulation) and only the wire is missing. It is built from
the packed K/V shards ``[2, B, Hkv, S_local, D]`` of *every* rank of the group:

* ring shift of K/V: returns the shard of the previous source rank, exactly the block the real
  ring delivers at that step;
* ring shift of dK/dV (backward): returns the tensor itself (same shape; the real one would be
  the partial dK/dV of a neighbour -- values that do not change the work);
* all-gather: all shards stacked in rank order (dim 0); reduce-scatter: this rank's chunk.

A K/V shift is told from a dK/dV shift by identity: the blocks this transport returned are
K/V, and so is the first tensor shifted after ``start_pass()`` (the rank's own packed K/V).
Call ``start_pass()`` before the forward and before the backward (``fed_rank_attention`` does).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from nxd_cp.attention.streams import stream_attention
from nxd_cp.comm.base import PendingTensor, Transport
from nxd_cp.sequence.layout import shard_sequence
from nxd_cp.topology.groups import GroupSpec


def kv_shards(k: torch.Tensor, v: torch.Tensor, cp_size: int,
              load_balance: str = "zigzag") -> List[torch.Tensor]:
    """Packed ``[2, B, Hkv, S/cp, D]`` shard of every rank from full-sequence ``k``, ``v``."""
    kv = torch.stack([k, v])
    return [shard_sequence(kv, 3, r, cp_size, load_balance).contiguous() for r in range(cp_size)]


class FeedTransport(Transport):
    """Rank ``rank`` of a group of ``len(shards)`` ranks, fed from ``shards`` (see module doc)."""

    def __init__(self, rank: int, shards: Sequence[torch.Tensor]):
        n = len(shards)
        super().__init__(GroupSpec(tuple(range(n)), rank, (tuple(range(n)),)))
        self.shards = list(shards)
        self._src_of: Dict[int, int] = {id(s): i for i, s in enumerate(self.shards)}
        self._expect_local = True

    def start_pass(self) -> None:
        """The next shifted tensor is this rank's own packed K/V (forward or backward start)."""
        self._expect_local = True

    def ring_shift_start(self, x: torch.Tensor, direction: int = 1) -> PendingTensor:
        self._check_direction(direction)
        if x.dim() != 5:
            raise NotImplementedError("FeedTransport feeds packed K/V only (no key-padding mask)")
        src = self._src_of.get(id(x))
        if src is None and self._expect_local:
            src = self.rank
        self._expect_local = False
        if src is None:  # dK/dV travelling with their block
            return PendingTensor(x)
        return PendingTensor(self.shards[(src - direction) % self.size])

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.dim() != 6 or dim != 0:
            raise NotImplementedError("FeedTransport feeds packed K/V only (no key-padding mask)")
        return torch.stack(self.shards)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self._check_divisible(x, dim, "reduce_scatter")
        c = x.shape[dim] // self.size
        return x.narrow(dim, self.rank * c, c).contiguous()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def all_to_all(self, x: torch.Tensor, split_dim: int, concat_dim: int) -> torch.Tensor:
        raise NotImplementedError("FeedTransport feeds the K/V streams (p2p, all_gather) only")


def fed_rank_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: int, rank: int,
                       comm: str = "p2p") -> Tuple[Callable, Tuple[torch.Tensor, ...]]:
    """CP rank ``rank``'s causal zigzag attention of full-sequence ``q`` ``[B, Hq, S, D]``,
    ``k``/``v`` ``[B, Hkv, S, D]``, the other ranks' K/V fed locally: returns ``(fn, inputs)``
    with ``fn(q_l, k_l, v_l) -> out`` ``[B, Hq, S/cp, D]`` (``comm``'s algorithm on a
    ``FeedTransport``, ``start_pass`` before forward and backward) and ``inputs`` the rank's
    shards ``(q_l, k_l, v_l)``."""
    seq_len, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
    feed = FeedTransport(rank, kv_shards(k, v, cp))

    def attention(qq, kk, vv):
        feed.start_pass()
        out = stream_attention(qq, kk, vv, None, comm_type=comm, transport=feed,
                               seq_len=seq_len, load_balance="zigzag", causal=True, window=None,
                               scale=scale)
        feed.start_pass()  # the backward's first shift is the local K/V again
        return out
    q_l = shard_sequence(q, 2, rank, cp).contiguous()
    return attention, (q_l, *feed.shards[rank])
