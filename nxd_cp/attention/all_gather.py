"""All-gather context parallelism (``comm_type="all_gather"``): gather K/V, attend, reduce-scatter.

Forward all-gathers the K/V shards of the CP group once (``Hkv`` heads only, K and V in one
buffer) and runs the same plan as the ring (``schedule.make_plan``), reading the shard of step
``i`` (source ``(r - i) mod cp``) from its gathered copy instead of waiting for a shift: the
copy is rotated once into step order with an index computed from the rank (device data on XLA).
The gathered copy is not saved: backward gathers again, computes dQ locally and dK/dV per
visited shard, rotates them back into rank order and reduce-scatters them (fp32) to their
owners. Supports every mask, both layouts.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from nxd_cp.attention.documents import PackedDocuments
from nxd_cp.attention.loop import ContextParallelAttention, KVStream
from nxd_cp.attention.parts import RankIndex
from nxd_cp.attention.schedule import BlockTask, make_plan
from nxd_cp.comm.base import Transport


def _step_order(rank: RankIndex, n: int, device) -> torch.Tensor:
    """Index of the shard visited at each step, ``(r - i) mod n``; the map is its own inverse,
    so it also puts per-step results back into rank order."""
    if rank.is_static:
        return torch.tensor([(rank.value - i) % n for i in range(n)], device=device)
    steps = torch.arange(n, dtype=torch.int32, device=device)
    return torch.remainder(rank.value - steps + n, n)


class GatherStream(KVStream):
    """The group's K/V gathered once ``[cp, 2, B, Hkv, S_local, D]`` (keep and docs likewise),
    read in step order."""

    def blocks(self):
        t, n = self.transport, self.transport.size
        order = _step_order(self.rank, n, self.kv.device)
        kv, keep, docs = (None if x is None
                          else t.all_gather(x.unsqueeze(0), 0).index_select(0, order)
                          for x in (self.kv, self.keep, self.docs))
        self._grads = []
        for step in range(n):
            yield step, kv[step], *(None if x is None else x[step] for x in (keep, docs))

    def push_grad(self, step, dkv):
        self._grads.append(dkv)

    def local_grad(self):
        n = self.transport.size
        order = _step_order(self.rank, n, self.kv.device)
        by_rank = torch.stack(self._grads).index_select(0, order)
        return self.transport.reduce_scatter(by_rank, 0).squeeze(0)


def all_gather_schedule(cp_rank: int, cp_size: int, seq_len: int, load_balance: str,
                        causal: bool, window: Optional[int]) -> List[BlockTask]:
    """Kernel calls of the local Q against the gathered K/V, all steps (tests, benchmarks)."""
    plan = make_plan(cp_size, seq_len, load_balance, causal, window)
    return [task for step in plan.tasks(cp_rank) for task in step]


def all_gather_attention(q, k, v, keep, *, transport: Transport, seq_len: int,
                         load_balance: str, causal: bool, window: Optional[int],
                         scale: float,
                         documents: Optional[PackedDocuments] = None) -> torch.Tensor:
    """All-gather CP attention of this rank's shard; shapes as ``loop.ContextParallelAttention``."""
    plan = make_plan(transport.size, seq_len, load_balance, causal, window)
    rank = RankIndex(transport.rank_value(q.device))
    if documents is not None:
        documents.summarize(plan, transport, rank)
    return ContextParallelAttention.apply(q, k, v, keep, plan, GatherStream, transport, rank,
                                          scale, documents)
