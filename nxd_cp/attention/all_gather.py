"""All-gather context parallelism (``comm_type="all_gather"``): gather K/V, attend, reduce-scatter.

Forward all-gathers the K/V shards of the CP group (``Hkv`` heads only, K and V in one buffer),
puts them in sequence order and attends the local Q to them with the static schedule of
``masks.plan_block`` (so a causal or sliding-window mask skips whole chunks). The gathered copy
is not saved: backward gathers again, computes dQ locally and dK/dV for the whole sequence,
and reduce-scatters dK/dV (fp32) back to their owners. Supports every mask, including sliding
windows of any size, and both layouts. Saved for backward: local q, k, v, out and the fp32 lse.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from nxd_cp.attention.kernels import block_attention_backward, block_attention_forward
from nxd_cp.attention.masks import BlockTask, chunks_from_ranges, plan_block
from nxd_cp.attention.merge import empty_accumulators, merge_into
from nxd_cp.comm.base import Transport
from nxd_cp.sharding import chunk_ranges, num_chunks, reorder_gathered, shard_sequence

SEQ_DIM_KV = 3  # packed K/V: [2, B, Hkv, S, D]


def all_gather_schedule(cp_rank: int, cp_size: int, seq_len: int, load_balance: str,
                        causal: bool, window: Optional[int]) -> List[BlockTask]:
    """Kernel calls of the local Q against the full, sequence-ordered K/V."""
    q_chunks = chunks_from_ranges(chunk_ranges(seq_len, cp_rank, cp_size, load_balance))
    c = seq_len // num_chunks(cp_size, load_balance)
    k_chunks = chunks_from_ranges([(i * c, (i + 1) * c)
                                   for i in range(num_chunks(cp_size, load_balance))])
    return plan_block(q_chunks, k_chunks, causal, window)


def _gather(kv: torch.Tensor, keep: Optional[torch.Tensor], transport: Transport,
            load_balance: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Full K/V [2, B, Hkv, S, D] and keep [B, S] in sequence order."""
    n = transport.size
    full_kv = reorder_gathered(transport.all_gather(kv, SEQ_DIM_KV), SEQ_DIM_KV, n, load_balance)
    full_keep = None
    if keep is not None:
        full_keep = reorder_gathered(transport.all_gather(keep, 1), 1, n, load_balance)
    return full_kv, full_keep


class AllGatherAttention(torch.autograd.Function):
    """q [B, Hq, S_local, D]; k, v [B, Hkv, S_local, D]; keep None or uint8 [B, S_local]."""

    @staticmethod
    def forward(ctx, q, k, v, keep, schedule, transport: Transport, scale: float,
                load_balance: str):
        full_kv, full_keep = _gather(torch.stack([k, v]), keep, transport, load_balance)
        out, lse = empty_accumulators(q)
        for task in schedule:
            o, l = block_attention_forward(
                q[:, :, task.q], full_kv[0][:, :, task.k], full_kv[1][:, :, task.k],
                scale=scale, mask=task.mask,
                kv_keep=None if full_keep is None else full_keep[:, task.k].bool())
            merge_into(out, lse, o, l, task.q)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *([] if keep is None else [keep]))
        ctx.schedule, ctx.transport, ctx.scale = schedule, transport, scale
        ctx.load_balance = load_balance
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        keep = rest[0] if rest else None
        transport, n = ctx.transport, ctx.transport.size
        full_kv, full_keep = _gather(torch.stack([k, v]), keep, transport, ctx.load_balance)
        dq = torch.zeros_like(q, dtype=torch.float32)
        dkv = torch.zeros_like(full_kv, dtype=torch.float32)
        for task in ctx.schedule:
            dq_t, dk_t, dv_t = block_attention_backward(
                dout[:, :, task.q], q[:, :, task.q], full_kv[0][:, :, task.k],
                full_kv[1][:, :, task.k], out[:, :, task.q], lse[:, :, task.q],
                scale=ctx.scale, mask=task.mask,
                kv_keep=None if full_keep is None else full_keep[:, task.k].bool())
            dq[:, :, task.q] += dq_t
            dkv[0][:, :, task.k] += dk_t
            dkv[1][:, :, task.k] += dv_t
        # Back to the gathered (rank-major) order, then each rank keeps the sum of its shard.
        dkv = torch.cat([shard_sequence(dkv, SEQ_DIM_KV, r, n, ctx.load_balance)
                         for r in range(n)], dim=SEQ_DIM_KV)
        dkv = transport.reduce_scatter(dkv, SEQ_DIM_KV)
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None,
                None)


def all_gather_attention(q, k, v, keep, *, transport: Transport, seq_len: int,
                         load_balance: str, causal: bool, window: Optional[int],
                         scale: float) -> torch.Tensor:
    """All-gather CP attention of this rank's shard; see ``AllGatherAttention`` for shapes."""
    schedule = all_gather_schedule(transport.rank, transport.size, seq_len, load_balance,
                                   causal, window)
    return AllGatherAttention.apply(q, k, v, keep, schedule, transport, scale, load_balance)
