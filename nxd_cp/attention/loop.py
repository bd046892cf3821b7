"""The block loop of CP attention, shared by ring and all-gather, and its autograd Function.

Both algorithms visit the K/V shards of the CP group in ring order: at step ``i`` this rank
(CP rank ``r``) holds the shard of ``(r - i) mod cp`` and runs the plan's products of that step
(``schedule.Plan``). They differ only in how the shards arrive and how their dK/dV go home — a
``KVStream`` (this module's interface; the implementations are ``streams.py``'s): the ring
shifts them around (``RingStream``), all-gather gathers them once and reads its copy
(``GatherStream``).

Shapes: q ``[B, Hq, S_local, D]``; k, v ``[B, Hkv, S_local, D]`` packed as kv
``[2, B, Hkv, S_local, D]`` (only the real Hkv heads travel); keep None or uint8
``[B, S_local]`` (1 = real key), travelling with its K/V; packed documents (``documents.py``):
docs None or int32 ``[N, B, S_local]`` (document ids, positions), travelling the same way.
Saved for backward: local q, k, v, out (input dtype) and the fp32 lse; the visiting K/V are
fetched again in backward.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from nxd_cp.attention.dispatch import block_attention_backward, block_attention_forward
from nxd_cp.attention.documents import DocumentMask, PackedDocuments
from nxd_cp.attention.parts import Call, PartMerge, PartSum, RankIndex, Selection
from nxd_cp.attention.schedule import Plan
from nxd_cp.comm.base import Transport


class KVStream:
    """How the visiting K/V shards arrive (``blocks``) and how their gradients go home."""

    def __init__(self, transport: Transport, rank: RankIndex, kv: Tensor,
                 keep: Optional[Tensor], docs: Optional[Tensor] = None):
        self.transport, self.rank, self.kv, self.keep = transport, rank, kv, keep
        self.docs = docs

    def blocks(self) -> Iterator[Tuple[int, Tensor, Optional[Tensor], Optional[Tensor]]]:
        """Yield ``(step, kv, keep, docs)`` for every step, in ring order."""
        raise NotImplementedError

    def push_grad(self, step: int, dkv: Tensor) -> None:
        """Hand over the fp32 dK/dV ``[2, B, Hkv, S_local, D]`` of the shard held at ``step``."""
        raise NotImplementedError

    def local_grad(self) -> Tensor:
        """The dK/dV of this rank's own shard, summed over every rank's queries."""
        raise NotImplementedError


def _keys(sel: Selection, kv: Tensor, keep: Optional[Tensor], plan: Plan):
    """k, v ``[P*B, Hkv, c, D]`` and keep (bool ``[P*B, c]`` or None) of a call."""
    kv = sel.take(kv, 3, plan, batch=1)
    return kv[0], kv[1], None if keep is None else sel.take(keep, 1, plan).bool()


def _calls(stream: KVStream, plan: Plan, step: int, docs: Optional[Tensor],
           documents: Optional[PackedDocuments]
           ) -> List[Tuple[Selection, Selection, object, Optional[DocumentMask]]]:
    """The plan's calls of ``step`` (``RankIndex.calls``) with their document term: with packed
    documents a call whose parts share no document is skipped (Python-int rank only)."""
    calls: List[Call] = stream.rank.calls(plan, plan.steps[step])
    if documents is None:
        return [(qs, ks, mask, None) for qs, ks, mask in calls]
    out = []
    for qs, ks, mask in calls:
        term = documents.classify(step, qs, ks, stream.rank, plan.cp_size)
        if term is not None:
            out.append((qs, ks, mask, documents.mask(qs, ks, docs, plan) if term else None))
    return out


def forward_blocks(q: Tensor, plan: Plan, stream: KVStream, scale: float,
                   documents: Optional[PackedDocuments] = None) -> Tuple[Tensor, Tensor]:
    """out fp32 ``[B, Hq, S_local, D]`` and lse fp32 ``[B, Hq, S_local]``."""
    acc = PartMerge(plan, q)
    for step, kv, keep, docs in stream.blocks():
        for qs, ks, mask, doc_mask in _calls(stream, plan, step, docs, documents):
            k, v, kv_keep = _keys(ks, kv, keep, plan)
            out, lse = block_attention_forward(qs.take(q, 2, plan), k, v, scale=scale,
                                               mask=mask, kv_keep=kv_keep, documents=doc_mask)
            acc.merge(qs, out, lse)
    return acc.value()


def backward_blocks(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor, plan: Plan,
                    stream: KVStream, scale: float,
                    documents: Optional[PackedDocuments] = None) -> Tuple[Tensor, Tensor]:
    """fp32 dq ``[B, Hq, S_local, D]`` and dkv ``[2, B, Hkv, S_local, D]`` of the local shard."""
    b, hq, _, d = q.shape
    hkv = stream.kv.shape[2]
    dq = PartSum(plan, 2, 0, lambda n: q.new_zeros((b, hq, n, d), dtype=torch.float32))
    for step, kv, keep, docs in stream.blocks():
        dkv = PartSum(plan, 3, 1, lambda n: q.new_zeros((2, b, hkv, n, d), dtype=torch.float32))
        for qs, ks, mask, doc_mask in _calls(stream, plan, step, docs, documents):
            k, v, kv_keep = _keys(ks, kv, keep, plan)
            dq_c, dk_c, dv_c = block_attention_backward(
                qs.take(dout, 2, plan), qs.take(q, 2, plan), k, v, qs.take(out, 2, plan),
                qs.take(lse, 2, plan), scale=scale, mask=mask, kv_keep=kv_keep,
                documents=doc_mask)
            dq.add(qs, dq_c)
            dkv.add(ks, torch.stack([dk_c, dv_c]))
        stream.push_grad(step, dkv.value())
    return dq.value(), stream.local_grad()


class ContextParallelAttentionFunction(torch.autograd.Function):
    """out ``[B, Hq, S_local, D]`` in q's dtype: the local Q against every rank's K/V, the
    shards brought by ``stream_cls`` (a ``KVStream``)."""

    @staticmethod
    def forward(ctx, q, k, v, keep, plan: Plan, stream_cls, transport: Transport,
                rank: RankIndex, scale: float, documents: Optional[PackedDocuments] = None):
        docs = None if documents is None else documents.docs
        # K and V packed: kv [2, B, Hkv, S_local, D]
        stream = stream_cls(transport, rank, torch.stack([k, v]), keep, docs)
        out32, lse = forward_blocks(q, plan, stream, scale, documents)
        # Kept in the input dtype and in [B, S, H, D] memory order: transformers turns the
        # output into [B, S, H, D] with transpose(1, 2).contiguous(), which is then free
        # instead of a second copy of the output kept for backward.
        b, h, s, d = q.shape
        out = q.new_empty((b, s, h, d)).transpose(1, 2).copy_(out32)  # [B, H, S, D] view
        ctx.save_for_backward(q, k, v, out, lse, *([] if keep is None else [keep]))
        ctx.args = (plan, stream_cls, transport, rank, scale, documents)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        plan, stream_cls, transport, rank, scale, documents = ctx.args
        docs = None if documents is None else documents.docs
        stream = stream_cls(transport, rank, torch.stack([k, v]), rest[0] if rest else None,
                            docs)
        dq, dkv = backward_blocks(dout, q, out, lse, plan, stream, scale, documents)
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)) + (None,) * 7
