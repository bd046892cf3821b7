"""The K/V streams of CP attention (ring and all-gather) and the entry point that runs them.

Both algorithms run the same block loop (``loop.py``) over the same plan (``schedule.make_plan``):
at step ``i`` CP rank ``r`` holds the K/V shard of rank ``(r - i) mod cp``. Only the real
``Hkv`` heads travel (K and V packed in one buffer ``kv`` ``[2, B, Hkv, S_local, D]``, the
key-padding mask ``keep`` ``[B, S_local]`` and the document data of packed rows
``docs`` ``[N, B, S_local]`` beside it). They differ in how the shards arrive:

Ring (``comm_type="p2p"``, ``RingStream``): K/V travel the CP ring, Q stays. The shift that
brings the next shard starts before the current block is computed, so the transfer overlaps
compute. With zigzag + causal every step after the first is two half-by-half products on every
rank: the second Q half against the first KV half, and Q half ``p`` against KV half ``p`` with
``p = 0`` if the source precedes this rank, else 1 — half a block per step, the same shapes on
every rank. Backward re-rotates K/V the same way, accumulates dQ locally and sends dK/dV (fp32)
around the ring with the K/V block they belong to, so they arrive at their owner after ``cp``
hops.

All-gather (``comm_type="all_gather"``, ``GatherStream``): forward all-gathers the K/V shards of
the CP group once and reads the shard of step ``i`` (source ``(r - i) mod cp``) from its
gathered copy instead of waiting for a shift: the copy is rotated once into step order with an
index computed from the rank (device data on XLA). The gathered copy is not saved: backward
gathers again, computes dQ locally and dK/dV per visited shard, rotates them back into rank
order and reduce-scatters them (fp32) to their owners.

Both support every mask and both layouts.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch
from torch import Tensor

from nxd_cp.attention.documents import PackedDocuments
from nxd_cp.attention.loop import ContextParallelAttentionFunction, KVStream
from nxd_cp.attention.parts import RankIndex
from nxd_cp.attention.schedule import make_plan
from nxd_cp.comm.base import Transport


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


def _step_order(rank: RankIndex, n: int, device) -> Tensor:
    """Index ``[n]`` of the shard visited at each step, ``(r - i) mod n``; the map is its own
    inverse, so it also puts per-step results back into rank order."""
    if rank.is_static:
        return torch.tensor([(rank.value - i) % n for i in range(n)], device=device)
    steps = torch.arange(n, dtype=torch.int32, device=device)
    return torch.remainder(rank.value - steps + n, n)


class GatherStream(KVStream):
    """The group's K/V gathered once ``[cp, 2, B, Hkv, S_local, D]`` (keep ``[cp, B, S_local]``
    and docs ``[cp, N, B, S_local]`` likewise), read in step order."""

    def blocks(self):
        t, n = self.transport, self.transport.size
        order = _step_order(self.rank, n, self.kv.device)
        # [1, ...] per rank -> [cp, ...] in rank order -> in step order
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
        # [cp, 2, B, Hkv, S_local, D] in step order -> rank order -> this rank's [2, B, ...]
        by_rank = torch.stack(self._grads).index_select(0, order)
        return self.transport.reduce_scatter(by_rank, 0).squeeze(0)


STREAMS: Dict[str, Type[KVStream]] = {"p2p": RingStream, "all_gather": GatherStream}


def stream_attention(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], *,
                     comm_type: str, transport: Transport, seq_len: int, load_balance: str,
                     causal: bool, window: Optional[int], scale: float,
                     documents: Optional[PackedDocuments] = None) -> Tensor:
    """CP attention of this rank's shard with the K/V stream of ``comm_type`` (``STREAMS``).

    q ``[B, Hq, S_local, D]``; k, v ``[B, Hkv, S_local, D]``; keep None or uint8
    ``[B, S_local]``; returns ``[B, Hq, S_local, D]`` in q's dtype. Inputs validated by the api.
    """
    plan = make_plan(transport.size, seq_len, load_balance, causal, window)
    rank = RankIndex(transport.rank_value(q.device))
    if documents is not None:
        documents.summarize(plan, transport, rank)
    return ContextParallelAttentionFunction.apply(q, k, v, keep, plan, STREAMS[comm_type],
                                                  transport, rank, scale, documents)
