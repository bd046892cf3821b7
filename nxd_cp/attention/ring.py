"""Ring context parallelism (``comm_type="p2p"``): K/V travel the CP ring, Q stays.

At step ``i`` CP rank ``r`` holds the K/V shard of rank ``(r - i) mod cp`` and attends its Q to
it; the shift that brings the next shard is started before the current block is computed, so
the transfer overlaps compute. Only the real ``Hkv`` heads travel (K and V packed in one
buffer, the key-padding mask beside it). With zigzag + causal the static schedule
(``masks.plan_block``) skips the empty half-blocks: step 0 is one local causal block; from a
source ``s < r`` all of Q sees the first KV half; from ``s > r`` the second Q half sees all of KV
— half a block per step on every rank.

Backward re-rotates K/V the same way, accumulates dQ locally and sends dK/dV (fp32) around the
ring with the K/V block they belong to, so they arrive at their owner after ``cp`` hops. Saved
for backward: local q, k, v, out and the fp32 lse.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from nxd_cp.attention.kernels import block_attention_backward, block_attention_forward
from nxd_cp.attention.masks import BlockTask, chunks_from_ranges, plan_block
from nxd_cp.attention.merge import empty_accumulators, merge_into
from nxd_cp.comm.base import Transport
from nxd_cp.sharding import chunk_ranges


def ring_schedule(cp_rank: int, cp_size: int, seq_len: int, load_balance: str, causal: bool,
                  window: Optional[int]) -> List[List[BlockTask]]:
    """Kernel calls of each ring step for ``cp_rank``; ``seq_len`` is the global length."""
    q_chunks = chunks_from_ranges(chunk_ranges(seq_len, cp_rank, cp_size, load_balance))
    steps = []
    for step in range(cp_size):
        src = (cp_rank - step) % cp_size
        k_chunks = chunks_from_ranges(chunk_ranges(seq_len, src, cp_size, load_balance))
        steps.append(plan_block(q_chunks, k_chunks, causal, window))
    return steps


def _keep_slice(keep: Optional[torch.Tensor], sl: slice) -> Optional[torch.Tensor]:
    return None if keep is None else keep[:, sl].bool()


class RingAttention(torch.autograd.Function):
    """out = attention of the local Q against every rank's K/V, following ``schedule``.

    q [B, Hq, S_local, D]; k, v [B, Hkv, S_local, D]; keep None or uint8 [B, S_local]
    (1 = real key). Returns out [B, Hq, S_local, D] in q's dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, keep, schedule, transport: Transport, scale: float):
        n = transport.size
        out, lse = empty_accumulators(q)
        local_keep = keep
        kv = torch.stack([k, v])
        for step in range(n):
            if step + 1 < n:
                next_kv = transport.ring_shift_start(kv)
                next_keep = None if keep is None else transport.ring_shift_start(keep)
            for task in schedule[step]:
                o, l = block_attention_forward(
                    q[:, :, task.q], kv[0][:, :, task.k], kv[1][:, :, task.k], scale=scale,
                    mask=task.mask, kv_keep=_keep_slice(keep, task.k))
                merge_into(out, lse, o, l, task.q)
            if step + 1 < n:
                kv = next_kv.wait()
                keep = None if next_keep is None else next_keep.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *([] if local_keep is None else [local_keep]))
        ctx.schedule, ctx.transport, ctx.scale = schedule, transport, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        keep = rest[0] if rest else None
        schedule, transport, scale = ctx.schedule, ctx.transport, ctx.scale
        n = transport.size
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        dkv_in_flight = None
        for step in range(n):
            if step + 1 < n:
                next_kv = transport.ring_shift_start(kv)
                next_keep = None if keep is None else transport.ring_shift_start(keep)
            dkv = torch.zeros_like(kv, dtype=torch.float32)
            for task in schedule[step]:
                dq_t, dk_t, dv_t = block_attention_backward(
                    dout[:, :, task.q], q[:, :, task.q], kv[0][:, :, task.k],
                    kv[1][:, :, task.k], out[:, :, task.q], lse[:, :, task.q], scale=scale,
                    mask=task.mask, kv_keep=_keep_slice(keep, task.k))
                dq[:, :, task.q] += dq_t
                dkv[0][:, :, task.k] += dk_t
                dkv[1][:, :, task.k] += dv_t
            # The dK/dV of the block held now travel on with it: add what arrived, pass it on.
            if dkv_in_flight is not None:
                dkv = dkv + dkv_in_flight.wait()
            dkv_in_flight = transport.ring_shift_start(dkv)
            if step + 1 < n:
                kv = next_kv.wait()
                keep = None if next_keep is None else next_keep.wait()
        dkv = dkv_in_flight.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q, k, v, keep, *, transport: Transport, seq_len: int, load_balance: str,
                   causal: bool, window: Optional[int], scale: float) -> torch.Tensor:
    """Ring CP attention of this rank's shard; see ``RingAttention`` for shapes."""
    schedule = ring_schedule(transport.rank, transport.size, seq_len, load_balance, causal,
                             window)
    return RingAttention.apply(q, k, v, keep, schedule, transport, scale)
