"""Merge of partial attention results computed over disjoint sets of keys.

A partial result for a set of query rows is ``(out, lse)``: ``out`` fp32 ``[B, H, S, D]`` is the
softmax-weighted average of the values over the keys seen so far and ``lse`` fp32 ``[B, H, S]``
the natural-log logsumexp of the scaled scores over those keys (``-inf`` where a row saw no
visible key; such rows have ``out = 0``). Merging two partial results of the same rows gives
the result over the union of their keys.

Pure elementwise ops with no branching on values, so the same code lowers to one static XLA
graph.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def merge_partial(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge two partial results of the same query rows.

    ``out``, ``out_b``: fp32 ``[B, H, S, D]``; ``lse``, ``lse_b``: fp32 ``[B, H, S]``.
    Returns the merged ``(out, lse)`` in fp32, using the stable form
    ``out - sigmoid(lse_b - lse) * (out - out_b)`` and
    ``max(lse, lse_b) + log1p(exp(-|lse_b - lse|))``. Rows where both ``lse`` are ``-inf``
    stay at ``out = 0``, ``lse = -inf``; no NaN or inf leaks into ``out``.
    """
    # -inf - -inf is NaN: rows empty on both sides get a difference of 0 (both outs are 0).
    diff = torch.where(lse_b == lse, torch.zeros_like(lse), lse_b - lse)
    merged_out = torch.lerp(out, out_b, torch.sigmoid(diff).unsqueeze(-1))
    merged_lse = torch.maximum(lse, lse_b) + torch.log1p(torch.exp(-diff.abs()))
    return merged_out, merged_lse


def merge_into(out_acc: Tensor, lse_acc: Tensor, out_b: Tensor, lse_b: Tensor,
               q_slice: slice) -> Tuple[Tensor, Tensor]:
    """Merge a partial result for the query rows ``q_slice`` into accumulators, in place.

    ``out_acc`` fp32 ``[B, H, S, D]`` and ``lse_acc`` fp32 ``[B, H, S]`` hold the running
    result of all ``S`` rows; ``out_b`` ``[B, H, S_b, D]`` and ``lse_b`` ``[B, H, S_b]`` are the
    partial result of rows ``q_slice`` (``S_b`` rows, e.g. the second half of a zigzag shard).
    Returns ``(out_acc, lse_acc)``, updated through slice assignment.
    """
    merged_out, merged_lse = merge_partial(out_acc[:, :, q_slice], lse_acc[:, :, q_slice],
                                           out_b, lse_b)
    out_acc[:, :, q_slice] = merged_out
    lse_acc[:, :, q_slice] = merged_lse
    return out_acc, lse_acc


def empty_accumulators(q: Tensor) -> Tuple[Tensor, Tensor]:
    """Accumulators of a merge over ``q`` ``[B, H, S, D]``: ``out`` zeros and ``lse`` -inf, fp32.

    ``out`` is laid out in ``[B, S, H, D]`` memory order (a transposed view): transformers
    turns the attention output into ``[B, S, H, D]`` with ``transpose(1, 2).contiguous()``,
    which is then free instead of a second copy of the output kept for backward.
    """
    b, h, s, d = q.shape
    out = q.new_zeros((b, s, h, d), dtype=torch.float32).transpose(1, 2)
    lse = q.new_full((b, h, s), float("-inf"), dtype=torch.float32)
    return out, lse
