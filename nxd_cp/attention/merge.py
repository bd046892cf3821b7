"""Merge of partial attention results computed over disjoint sets of keys.

A partial result for a set of query rows is ``(out, lse)``: ``out`` fp32 ``[B, H, S, D]`` is the
softmax-weighted average of the values over the keys seen so far and ``lse`` fp32 ``[B, H, S]``
the natural-log logsumexp of the scaled scores over those keys. A row that saw no key has
``out = 0`` and ``lse = EMPTY_LSE`` (the lowest finite fp32, ``kernels.EMPTY_LSE``); a
contribution that must leave a row unchanged has ``lse = -inf`` (``parts`` masks a
rank-dependent part that way). Merging two partial results of the same rows gives the result
over the union of their keys.

Pure elementwise ops with no branching on values and no NaN guard (``lse`` is finite on at
least one side), so the same code lowers to one small static XLA graph.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def merge_partial(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge two partial results of the same query rows.

    ``out`` fp32 ``[..., S, D]`` and ``lse`` fp32 ``[..., S]`` (finite: ``EMPTY_LSE`` where a
    row saw no key); ``out_b`` / ``lse_b`` the same shapes or broadcastable to them, ``lse_b``
    may be ``-inf`` (then the row keeps ``out`` and ``lse`` exactly). Returns the merged
    ``(out, lse)`` in fp32, using the stable form ``lerp(out, out_b, sigmoid(lse_b - lse))``
    and ``max(lse, lse_b) + log1p(exp(-|lse_b - lse|))``. Rows empty on both sides stay at
    ``out = 0``, ``lse = EMPTY_LSE`` (up to ``log 2``, far below any real lse).
    """
    diff = lse_b - lse
    merged_out = torch.lerp(out, out_b, torch.sigmoid(diff).unsqueeze(-1))
    merged_lse = torch.maximum(lse, lse_b) + torch.log1p(torch.exp(-diff.abs()))
    return merged_out, merged_lse
