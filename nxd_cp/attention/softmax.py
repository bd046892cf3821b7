"""The online-softmax math of one (Q tile, KV tile) pair, written once.

Shared by the pure-torch reference kernel (``kernels.TorchBlockKernel``, several KV tiles per
Q tile) and the XLA tile loop (``tile_loop.TileLoopKernel``, one KV tile: the whole block).

Layouts (GQA without repeating K/V): the pre-scaled queries of a tile ``qt``
``[B, Hkv, G, tq, D]`` (``G = Hq // Hkv`` query heads per KV head, ``group_heads``), keys and
values of a tile ``kt`` / ``vt`` ``[B, Hkv, tk, D]``, scores ``[B, Hkv, G, tq, tk]``. Every
per-row quantity (max, sum, lse) is ``[B, Hkv, G, tq]``.

A row that sees no key has scores ``-inf`` everywhere: it is shifted by ``EMPTY_LSE`` instead of
its max (``exp`` still gives 0), its sum stays 0 and ``finish`` returns ``out = 0``,
``lse = EMPTY_LSE``; the backward's ``exp(s - EMPTY_LSE)`` of its ``-inf`` scores is 0, so it
contributes no gradient. Written for a compact XLA lowering: ``einsum`` (one HLO dot each), no
f64 (a Python scalar operand of a comparison would lower to f64 / s64).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

EMPTY_LSE = torch.finfo(torch.float32).min  # lse of a row that sees no key
_NEG_INF = float("-inf")

# [B, Hkv, G, tq, D] x [B, Hkv, tk, D] products of the G query heads of each KV head.
SCORES = "bhgqd,bhkd->bhgqk"
PV = "bhgqk,bhkd->bhgqd"
KEY_GRAD = "bhgqk,bhgqd->bhkd"  # summed over the G query heads and the rows

# (row max used as shift, row sum of exp, unnormalised output [B, Hkv, G, tq, D])
SoftmaxState = Tuple[Tensor, Tensor, Tensor]


def group_heads(x: Tensor, hkv: int) -> Tensor:
    """``[B, Hq, S, ...]`` -> ``[B, Hkv, G, S, ...]`` (a view): the query heads of each KV head."""
    return x.unflatten(1, (hkv, x.shape[1] // hkv))


def masked_scores(qt: Tensor, kt: Tensor, visible: Optional[Tensor]) -> Tensor:
    """Scores fp32 ``[B, Hkv, G, tq, tk]`` of the pre-scaled ``qt`` ``[B, Hkv, G, tq, D]``
    against ``kt`` ``[B, Hkv, tk, D]``, invisible entries at ``-inf``."""
    s = torch.einsum(SCORES, qt, kt)
    return s if visible is None else torch.where(visible, s, _NEG_INF)


def softmax_update(state: Optional[SoftmaxState], s: Tensor, vt: Tensor) -> SoftmaxState:
    """The running softmax of a Q tile after one more scores tile ``s`` ``[B, Hkv, G, tq, tk]``
    over the values ``vt`` ``[B, Hkv, tk, D]``; ``state`` None for the first tile."""
    new_max = s.amax(-1) if state is None else torch.maximum(state[0], s.amax(-1))
    shift = new_max.clamp_min(EMPTY_LSE)  # rows that see no key: EMPTY_LSE, not -inf
    p = torch.exp(s - shift.unsqueeze(-1))
    pv = torch.einsum(PV, p, vt)
    if state is None:  # first tile: nothing to rescale (keeps the graph small)
        return shift, p.sum(-1), pv
    row_max, row_sum, acc = state
    rescale = torch.exp(row_max - shift)
    return shift, row_sum * rescale + p.sum(-1), acc * rescale.unsqueeze(-1) + pv


def softmax_finish(state: SoftmaxState) -> Tuple[Tensor, Tensor]:
    """``(out [B, Hkv, G, tq, D], lse [B, Hkv, G, tq])`` of a Q tile's final state."""
    row_max, row_sum, acc = state
    # A row that sees a key has row_sum >= 1 (its max term is exp(0)); empty rows have
    # row_sum = 0 and acc = 0: dividing by 1 gives out = 0, and lse = EMPTY_LSE.
    norm = row_sum.clamp_min(1.0)
    return acc / norm.unsqueeze(-1), row_max + torch.log(norm)


def tile_grads(qt: Tensor, kt: Tensor, vt: Tensor, dot: Tensor, lse_t: Tensor, delta_t: Tensor,
               visible: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """FlashAttention-2 backward of one tile: ``(dq, dk, dv)`` contributions.

    ``qt`` pre-scaled and ``dot`` (upstream gradient) ``[B, Hkv, G, tq, D]``; ``lse_t`` (the
    rows' merged lse) and ``delta_t`` (``rowsum(dout * out)``) ``[B, Hkv, G, tq, 1]``. Returns
    ``dq`` ``[B, Hkv, G, tq, D]`` (without the softmax scale) and ``dk`` / ``dv``
    ``[B, Hkv, tk, D]`` summed over the query heads and rows.
    """
    p = torch.exp(masked_scores(qt, kt, visible) - lse_t)
    ds = p * (torch.einsum(SCORES, dot, vt) - delta_t)
    # qt carries the scale: dk = scale * ds^T q, summed over the query heads.
    return torch.einsum(PV, ds, kt), torch.einsum(KEY_GRAD, ds, qt), torch.einsum(KEY_GRAD, p, dot)
