"""Ring context parallelism (``comm_type="p2p"``): K/V travel the CP ring, Q stays.

At step ``i`` CP rank ``r`` holds the K/V shard of rank ``(r - i) mod cp`` and runs the plan's
products of that step (``schedule.make_plan``); the shift that brings the next shard starts
before the current block is computed, so the transfer overlaps compute. Only the real ``Hkv``
heads travel (K and V packed in one buffer, the key-padding mask and the document ids of packed
rows beside it). With zigzag +
causal every step after the first is two half-by-half products on every rank: the second Q half
against the first KV half, and Q half ``p`` against KV half ``p`` with ``p = 0`` if the source
precedes this rank, else 1 — half a block per step, the same shapes on every rank.

Backward re-rotates K/V the same way, accumulates dQ locally and sends dK/dV (fp32) around the
ring with the K/V block they belong to, so they arrive at their owner after ``cp`` hops.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from nxd_cp.attention.documents import PackedDocuments
from nxd_cp.attention.loop import ContextParallelAttention, KVStream
from nxd_cp.attention.schedule import BlockTask, make_plan
from nxd_cp.comm.base import Transport
from nxd_cp.attention.parts import RankIndex


class RingStream(KVStream):
    """K/V (keep, docs) shifted one rank along the ring per step; dK/dV travel along with them."""

    def blocks(self):
        n, kv, keep, docs = self.transport.size, self.kv, self.keep, self.docs
        self._dkv_in_flight = None
        for step in range(n):
            if step + 1 < n:
                next_kv = self.transport.ring_shift_start(kv)
                next_keep, next_docs = (None if x is None else self.transport.ring_shift_start(x)
                                        for x in (keep, docs))
            yield step, kv, keep, docs
            if step + 1 < n:
                kv = next_kv.wait()
                keep, docs = (None if x is None else x.wait() for x in (next_keep, next_docs))

    def push_grad(self, step, dkv):
        # The dK/dV of the block held now travel on with it: add what arrived, pass it on.
        if self._dkv_in_flight is not None:
            dkv = dkv + self._dkv_in_flight.wait()
        self._dkv_in_flight = self.transport.ring_shift_start(dkv)

    def local_grad(self):
        return self._dkv_in_flight.wait()


def ring_schedule(cp_rank: int, cp_size: int, seq_len: int, load_balance: str, causal: bool,
                  window: Optional[int]) -> List[List[BlockTask]]:
    """Kernel calls of each ring step for ``cp_rank`` (tests, benchmarks)."""
    return make_plan(cp_size, seq_len, load_balance, causal, window).tasks(cp_rank)


def ring_attention(q, k, v, keep, *, transport: Transport, seq_len: int, load_balance: str,
                   causal: bool, window: Optional[int], scale: float,
                   documents: Optional[PackedDocuments] = None) -> torch.Tensor:
    """Ring CP attention of this rank's shard; shapes as ``loop.ContextParallelAttention``."""
    plan = make_plan(transport.size, seq_len, load_balance, causal, window)
    rank = RankIndex(transport.rank_value(q.device))
    if documents is not None:
        documents.summarize(plan, transport, rank)
    return ContextParallelAttention.apply(q, k, v, keep, plan, RingStream, transport, rank, scale,
                                          documents)
