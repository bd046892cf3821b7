"""Which (Q chunk, KV chunk) pairs are full, partial or empty, and the kernel calls that follow.

Everything here is static Python on chunk ranges (no tensors): the schedule of a CP step is the
same every training step, so XLA traces one graph and the ring skips empty blocks without a
data-dependent branch.

A *chunk* is a run of a rank's local tokens whose global positions are contiguous. Mask rule
(transformers' sliding-window semantics): key ``kp`` is visible to query ``qp`` iff
``(not causal or kp <= qp) and (window is None or qp - kp < window)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from nxd_cp.attention.kernels import BlockMask, Visibility, visibility

EMPTY, FULL, PARTIAL = Visibility.EMPTY, Visibility.FULL, Visibility.PARTIAL


@dataclass(frozen=True)
class Chunk:
    """Local rows ``[local_start, local_start + length)`` holding global positions
    ``[global_start, global_start + length)``."""

    local_start: int
    global_start: int
    length: int

    @property
    def local(self) -> slice:
        return slice(self.local_start, self.local_start + self.length)


@dataclass(frozen=True)
class BlockTask:
    """One kernel call: Q rows ``q`` against KV rows ``k`` with ``mask`` (None = all visible)."""

    q: slice
    k: slice
    mask: Optional[BlockMask]
    score_pairs: int  # visible (query, key) pairs: the attention work of the call


def chunks_from_ranges(ranges: Sequence[Tuple[int, int]], offset: int = 0) -> List[Chunk]:
    """Chunks laid out back to back from local row ``offset``, one per global ``[start, end)``."""
    chunks, local = [], offset
    for start, end in ranges:
        chunks.append(Chunk(local, start, end - start))
        local += end - start
    return chunks


def visible_pairs(q: Chunk, k: Chunk, causal: bool, window: Optional[int]) -> int:
    """Number of visible (query, key) pairs between two chunks, in closed form per query."""
    total = 0
    k_end = k.global_start + k.length
    for qp in range(q.global_start, q.global_start + q.length):
        hi = min(k_end, qp + 1) if causal else k_end
        lo = max(k.global_start, qp - window + 1) if window is not None else k.global_start
        total += max(0, hi - lo)
    return total


def classify(q: Chunk, k: Chunk, causal: bool, window: Optional[int]) -> Visibility:
    """EMPTY, FULL or PARTIAL for every query of ``q`` against every key of ``k`` (the same
    static rule the kernel applies to its tiles)."""
    mask = BlockMask(0, 0, causal=True, window=window) if causal else None
    return visibility(mask, q.global_start, q.global_start + q.length,
                      k.global_start, k.global_start + k.length)


def plan_block(q_chunks: Sequence[Chunk], k_chunks: Sequence[Chunk], causal: bool,
               window: Optional[int]) -> List[BlockTask]:
    """The kernel calls that compute Q (``q_chunks``) against one KV block (``k_chunks``).

    Fully visible pairs are coalesced: for each Q chunk, runs of adjacent full KV chunks become
    one slice, and adjacent Q chunks with the same runs share one call without a mask. Each
    partial pair is its own masked call. When Q and KV are the same chunks under a plain causal
    mask (the diagonal step), one causal call covers them all: local order is increasing in
    global position, so the local lower triangle is the global causal mask.
    """
    if (causal and window is None and len(q_chunks) > 0
            and [(c.global_start, c.length) for c in q_chunks]
            == [(c.global_start, c.length) for c in k_chunks]):
        q_sl = slice(q_chunks[0].local_start, q_chunks[-1].local.stop)
        k_sl = slice(k_chunks[0].local_start, k_chunks[-1].local.stop)
        n = q_sl.stop - q_sl.start
        return [BlockTask(q_sl, k_sl, BlockMask(0, 0, causal=True), n * (n + 1) // 2)]

    tasks: List[BlockTask] = []
    runs_per_q = []
    for qc in q_chunks:
        runs: List[Tuple[int, int]] = []  # (first, last) indices into k_chunks
        for j, kc in enumerate(k_chunks):
            kind = classify(qc, kc, causal, window)
            if kind == FULL:
                if runs and runs[-1][1] == j - 1:
                    runs[-1] = (runs[-1][0], j)
                else:
                    runs.append((j, j))
            elif kind == PARTIAL:
                tasks.append(BlockTask(qc.local, kc.local,
                                       BlockMask(qc.global_start, kc.global_start, causal, window),
                                       visible_pairs(qc, kc, causal, window)))
        runs_per_q.append(runs)

    i = 0
    while i < len(q_chunks):
        j = i
        while (j + 1 < len(q_chunks) and runs_per_q[j + 1] == runs_per_q[i]
               and q_chunks[j + 1].local_start == q_chunks[j].local.stop):
            j += 1
        q_sl = slice(q_chunks[i].local_start, q_chunks[j].local.stop)
        for first, last in runs_per_q[i]:
            k_sl = slice(k_chunks[first].local_start, k_chunks[last].local.stop)
            tasks.append(BlockTask(q_sl, k_sl, None, (q_sl.stop - q_sl.start)
                                   * (k_sl.stop - k_sl.start)))
        i = j + 1
    return tasks


def score_pairs(tasks: Sequence[BlockTask]) -> int:
    """Attention work of a list of calls, in visible (query, key) pairs."""
    return sum(t.score_pairs for t in tasks)
