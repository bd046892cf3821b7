"""The block loop of CP attention, shared by ring and all-gather.

Both algorithms visit the K/V shards of the CP group in ring order: at step ``i`` this rank
(CP rank ``r``) holds the shard of ``(r - i) mod cp`` and runs the plan's products of that step
(``schedule.Plan``). They differ only in how the shards arrive and how their dK/dV go home — a
``KVStream``: the ring shifts them around (``ring.RingStream``), all-gather gathers them once
and reads its copy (``all_gather.GatherStream``).

Shapes: q ``[B, Hq, S_local, D]``; k, v ``[B, Hkv, S_local, D]`` packed as kv
``[2, B, Hkv, S_local, D]`` (only the real Hkv heads travel); keep None or uint8
``[B, S_local]`` (1 = real key), travelling with its K/V; packed documents (``documents.py``):
docs None or int32 ``[N, B, S_local]`` (document ids, positions), travelling the same way.
Saved for backward: local q, k, v, out (input dtype) and the fp32 lse; the visiting K/V are
fetched again in backward.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from nxd_cp.attention.dispatch import block_attention_backward, block_attention_forward
from nxd_cp.attention.documents import PackedDocuments
from nxd_cp.attention.parts import Part, PartAccumulator, RankIndex, merge_part, take
from nxd_cp.attention.schedule import ALL
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


def _keep(keep: Optional[Tensor], part, plan: Plan) -> Optional[Tensor]:
    return None if keep is None else take(keep, 1, part, plan).bool()


def _calls(rank: RankIndex, plan: Plan, products, documents: Optional[PackedDocuments] = None,
           step: int = 0) -> List[Tuple[List[Tuple[Part, Part]], Any, bool]]:
    """Kernel calls of one step: ``([(q part, kv part), ...], mask, document term?)``.

    With the rank as device data, unmasked products of equal shapes (the two half-by-half
    products of a zigzag causal step) run as one call, stacked on the batch dim: one kernel in
    the graph per step instead of two. With a Python-int rank every product is its own call,
    and with packed documents one that shares no document with its K/V part is skipped.
    """
    resolved = [r for r in (rank.resolve(p, plan) for p in products) if r is not None]
    if rank.is_static:
        calls = []
        for qp, kp, mask in resolved:
            term = (False if documents is None
                    else documents.classify(step, qp, kp, rank, plan.cp_size))
            if term is not None:
                calls.append(([(qp, kp)], mask, term))
        return calls
    calls, stackable = [], {}
    for qp, kp, mask in resolved:
        whole = (isinstance(qp, int) and qp == ALL, isinstance(kp, int) and kp == ALL)
        if mask is None:
            stackable.setdefault(whole, []).append((qp, kp))
        else:
            calls.append(([(qp, kp)], mask, documents is not None))
    return [(pairs, None, documents is not None) for pairs in stackable.values()] + calls


def _stack(parts: List[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _unstack(x: Tensor, n: int) -> Tuple[Tensor, ...]:
    return (x,) if n == 1 else x.chunk(n, dim=0)


def forward_blocks(q: Tensor, plan: Plan, stream: KVStream, scale: float,
                   documents: Optional[PackedDocuments] = None) -> Tuple[Tensor, Tensor]:
    """out fp32 ``[B, Hq, S_local, D]`` and lse fp32 ``[B, Hq, S_local]``."""
    b, h, _, d = q.shape
    c = plan.part_len
    out = PartAccumulator(plan, 2, lambda: q.new_zeros((b, h, c, d), dtype=torch.float32))
    lse = PartAccumulator(plan, 2, lambda: q.new_full((b, h, c), float("-inf"),
                                                      dtype=torch.float32))
    for step, kv, keep, docs in stream.blocks():
        for pairs, mask, term in _calls(stream.rank, plan, plan.steps[step], documents, step):
            o, l = block_attention_forward(
                _stack([take(q, 2, qp, plan) for qp, _ in pairs]),
                _stack([take(kv[0], 2, kp, plan) for _, kp in pairs]),
                _stack([take(kv[1], 2, kp, plan) for _, kp in pairs]), scale=scale, mask=mask,
                kv_keep=None if keep is None else _stack([_keep(keep, kp, plan)
                                                          for _, kp in pairs]),
                documents=documents.mask(pairs, docs, plan) if term else None)
            for (qp, _), o_i, l_i in zip(pairs, _unstack(o, len(pairs)), _unstack(l, len(pairs))):
                merge_part(out, lse, o_i, l_i, qp)
    return out.value(), lse.value()


def backward_blocks(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor, plan: Plan,
                    stream: KVStream, scale: float,
                    documents: Optional[PackedDocuments] = None) -> Tuple[Tensor, Tensor]:
    """fp32 dq ``[B, Hq, S_local, D]`` and dkv ``[2, B, Hkv, S_local, D]`` of the local shard."""
    b, hq, _, d = q.shape
    hkv, c = stream.kv.shape[2], plan.part_len
    dq = PartAccumulator(plan, 2, lambda: q.new_zeros((b, hq, c, d), dtype=torch.float32))
    for step, kv, keep, docs in stream.blocks():
        dk, dv = (PartAccumulator(plan, 2, lambda: q.new_zeros((b, hkv, c, d),
                                                               dtype=torch.float32))
                  for _ in range(2))
        for pairs, mask, term in _calls(stream.rank, plan, plan.steps[step], documents, step):
            qs = [qp for qp, _ in pairs]
            ks = [kp for _, kp in pairs]
            grads = block_attention_backward(
                _stack([take(dout, 2, p, plan) for p in qs]),
                _stack([take(q, 2, p, plan) for p in qs]),
                _stack([take(kv[0], 2, p, plan) for p in ks]),
                _stack([take(kv[1], 2, p, plan) for p in ks]),
                _stack([take(out, 2, p, plan) for p in qs]),
                _stack([take(lse, 2, p, plan) for p in qs]), scale=scale, mask=mask,
                kv_keep=None if keep is None else _stack([_keep(keep, p, plan) for p in ks]),
                documents=documents.mask(pairs, docs, plan) if term else None)
            dq_s, dk_s, dv_s = (_unstack(g, len(pairs)) for g in grads)
            for i, (qp, kp) in enumerate(pairs):
                dq.add(qp, dq_s[i])
                dk.add(kp, dk_s[i])
                dv.add(kp, dv_s[i])
        stream.push_grad(step, torch.stack([dk.value(), dv.value()]))
    return dq.value(), stream.local_grad()


class ContextParallelAttention(torch.autograd.Function):
    """out ``[B, Hq, S_local, D]`` in q's dtype: the local Q against every rank's K/V."""

    @staticmethod
    def forward(ctx, q, k, v, keep, plan: Plan, stream_cls, transport: Transport,
                rank: RankIndex, scale: float, documents: Optional[PackedDocuments] = None):
        docs = None if documents is None else documents.docs
        stream = stream_cls(transport, rank, torch.stack([k, v]), keep, docs)
        out32, lse = forward_blocks(q, plan, stream, scale, documents)
        # Kept in the input dtype and in [B, S, H, D] memory order: transformers turns the
        # output into [B, S, H, D] with transpose(1, 2).contiguous(), which is then free
        # instead of a second copy of the output kept for backward.
        b, h, s, d = q.shape
        out = q.new_empty((b, s, h, d)).transpose(1, 2).copy_(out32)
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
