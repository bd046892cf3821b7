"""Packed documents in CP attention: a query sees only the keys of its own document.

Input (validated by the api): ``seq_idx`` int ``[B, S_local]``, the document index of each of
this rank's tokens (non-decreasing along the full sequence; a document is a run of equal ids),
and, only for ``load_balance="per_document"`` with a sliding window, ``position_ids``
``[B, S_local]`` (positions inside the documents, or global ones: only differences inside a
document are read). Both are packed into one int32 tensor ``docs`` ``[N, B, S_local]`` (N = 1:
ids; 2: ids and positions) that travels with K/V through the ring and the all-gather, as the
key-padding mask does.

The masking rule is the plan's (causal / window on the layout's positions) AND same document.
Under ``per_document`` the plan is zigzag's on *slots* (``nxd_cp.sequence.layout``): inside one
document, slot ``a`` sees all of an earlier slot, none of a later one, and itself causally in
local order, so zigzag's static masks are exact there and only a window needs positions.

Block classes where the rank is a Python int (torch.distributed): one small all-gather per call
gives every rank the document-id range of every part of every rank (read on the host once per
call); a product whose Q and K/V parts share no document is skipped, one whose parts lie in a
single document (every row) needs no document term and runs as without packing (the CPU / CUDA
fused kernels where the plan allows), the others carry a ``DocumentMask`` (reference kernel).
Where the rank is device data (XLA) nothing is read on the host: every product carries the mask,
data in the same graph for every batch and every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from nxd_cp.attention.parts import RankIndex, Selection
from nxd_cp.attention.schedule import Plan
from nxd_cp.comm.base import Transport
from nxd_cp.sequence.layout import rank_chunks


@dataclass(frozen=True, eq=False)
class DocumentMask:
    """Document term of one (Q block, KV block) pair, composed with the block's other masks.

    q_ids ``[B, Sq]`` / k_ids ``[B, Sk]`` int32: document of each query / key (a key is visible
    only to the queries of its document). With ``window``: q_pos / k_pos int32 (positions) and
    the key is also visible only where ``q_pos - k_pos < window``.
    """
    q_ids: Tensor
    k_ids: Tensor
    q_pos: Optional[Tensor] = None
    k_pos: Optional[Tensor] = None
    window: Optional[int] = None

    def visible(self, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """bool ``[B, 1, 1, q1-q0, k1-k0]`` (broadcasts over KV heads and query groups)."""
        vis = self.q_ids[:, q0:q1, None] == self.k_ids[:, None, k0:k1]
        if self.window is not None:
            gap = self.q_pos[:, q0:q1, None] - self.k_pos[:, None, k0:k1]
            vis = vis & (gap < gap.new_full((), self.window))  # same dtype: no s64 on XLA
        return vis[:, None, None]


Ranges = List[Tuple[int, int]]  # per batch row: (lowest, highest) document id of a part


class PackedDocuments:
    """The document data of one CP attention call (shapes in the module docstring)."""

    def __init__(self, seq_idx: Tensor, per_document: bool,
                 position_ids: Optional[Tensor] = None, window: Optional[int] = None,
                 check_order: bool = True):
        self.per_document, self.check_order = per_document, check_order
        rows = [seq_idx.to(torch.int32)]
        if window is not None:
            rows.append(position_ids.expand_as(seq_idx).to(torch.int32))
        self.docs = torch.stack(rows)
        self.window = window
        self._ranges: Optional[List[List[Ranges]]] = None  # [rank][part] -> per-row ranges

    def summarize(self, plan: Plan, transport: Optional[Transport], rank: RankIndex) -> None:
        """Read every rank's per-part document ranges on the host (static rank only) and check
        that the ids are non-decreasing; ``ValueError`` otherwise (the same on every rank)."""
        if not rank.is_static:
            return
        ids = self.docs[0]
        local = []
        for p in range(plan.parts):
            part = Selection((p,)).take(ids, 1, plan)
            rising = (part[:, 1:] >= part[:, :-1]).all(dim=1).to(torch.int32)
            local.append(torch.stack([part.amin(1), part.amax(1), rising], dim=1))
        table = torch.stack(local).unsqueeze(0)  # [1, parts, B, 3]
        if transport is not None and transport.size > 1:
            table = transport.all_gather(table, 0)
        table = table.tolist()
        if self.check_order:  # off where the caller checked the ids in their own layout
            _check_order(table, plan, self.per_document)
        self._ranges = [[[(lo, hi) for lo, hi, _ in part] for part in r] for r in table]

    def _part_ranges(self, r: int, sel: Selection) -> Ranges:
        """Per-row ranges of rank ``r``'s static selection (one part, or the whole shard)."""
        parts = self._ranges[r]
        if sel.parts is not None:
            (part,) = sel.parts
            return parts[part]
        return [(min(lo for lo, _ in row), max(hi for _, hi in row)) for row in zip(*parts)]

    def classify(self, step: int, q_sel: Selection, k_sel: Selection, rank: RankIndex,
                 cp_size: int) -> Optional[bool]:
        """Whether a product needs the document term: None = no shared document (skip it),
        False = one document on both sides (no term), True = the term. Device-data rank: True."""
        if self._ranges is None:
            return True
        r = rank.value
        q = self._part_ranges(r, q_sel)
        k = self._part_ranges((r - step) % cp_size, k_sel)
        if all(qh < kl or kh < ql for (ql, qh), (kl, kh) in zip(q, k)):
            return None
        single = all(ql == qh == kl == kh for (ql, qh), (kl, kh) in zip(q, k))
        return True if self.window is not None or not single else False

    def mask(self, q_sel: Selection, k_sel: Selection, k_docs: Tensor,
             plan: Plan) -> DocumentMask:
        """The ``DocumentMask`` of a call reading ``q_sel`` / ``k_sel`` (parts stacked on the
        batch dim, as the call's q and k); ``k_docs`` ``[N, B, S_local]`` is the visiting
        shard's ``docs``."""
        q = q_sel.take(self.docs, 2, plan, batch=1)
        k = k_sel.take(k_docs, 2, plan, batch=1)
        if self.window is None:
            return DocumentMask(q[0], k[0])
        return DocumentMask(q[0], k[0], q[1], k[1], self.window)


def local_document_mask(seq_idx: Tensor, static: bool) -> Optional[DocumentMask]:
    """The document term of a CP group of size 1 (the whole sequence, static positions); None
    when ``static`` (host reads allowed) and every row is one document."""
    ids = seq_idx.to(torch.int32)
    if static:
        if not bool((ids[:, 1:] >= ids[:, :-1]).all()):
            raise ValueError("seq_idx must be non-decreasing along the sequence (a document "
                             "is a run of equal ids)")
        if bool((ids == ids[:, :1]).all()):
            return None
    return DocumentMask(ids, ids)


def _check_order(table, plan: Plan, per_document: bool) -> None:
    """``table[rank][part][row] = (lo, hi, rising)``: ids non-decreasing inside every part and,
    for zigzag / contiguous, from one chunk of the full sequence to the next."""
    for r, parts in enumerate(table):
        for p, rows in enumerate(parts):
            for b, (_, _, rising) in enumerate(rows):
                if not rising:
                    raise ValueError(f"seq_idx must be non-decreasing along the sequence (a "
                                     f"document is a run of equal ids): row {b} of CP rank "
                                     f"{r}'s part {p} is not")
    if per_document:
        return
    chunks = {}
    for r, parts in enumerate(table):
        for p, g in enumerate(rank_chunks(r, plan.cp_size, plan.load_balance)):
            chunks[g] = parts[p]
    for g in range(1, len(chunks)):
        for b, (before, after) in enumerate(zip(chunks[g - 1], chunks[g])):
            if before[1] > after[0]:
                raise ValueError(f"seq_idx must be non-decreasing along the sequence: row {b} "
                                 f"has document {before[1]} at the end of chunk {g - 1} and "
                                 f"{after[0]} at the start of chunk {g}")
