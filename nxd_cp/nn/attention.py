"""``ContextParallelAttention``: CP attention as an ``nn.Module``, for hand-written models."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.attention.api import context_parallel_attention
from nxd_cp.config import ConfigLike, context_parallel_config_of


class ContextParallelAttention(nn.Module):
    """Exact attention of this rank's sequence shard against its CP group's whole sequence.

    The drop-in replacement for the ``softmax(q k^T * scale) v`` of a hand-written attention
    module once its sequence is split over CP (TransformerEngine's ``DotProductAttention`` with
    a CP group, in NxD terms). No parameters.

    config: ``comm_type``, ``load_balance`` (and ``a2a_size``), bound when the module is
        built: the dict returned by ``nxd_cp.neuronx_distributed_config``, a
        ``ContextParallelConfig`` or its dict; None (default): the active config at
        construction. Nothing is read per call: shard batches with the same config
        (``get_batch_on_this_context_parallel_rank(batch, config=...)``).
    causal: causal mask on global positions. window_size: sliding window (key j visible to
        query i iff j <= i and i - j < window_size; needs causal). softmax_scale: default
        1/sqrt(D). group: None for ``parallel_state``'s CP group, or a GroupSpec / ProcessGroup.

    forward(q, k, v, key_padding_mask=None): q ``[B, Hq, S_local, D]``, k/v
    ``[B, Hkv, S_local, D]`` with Hq % Hkv == 0 (GQA / MQA; K/V are exchanged with their Hkv
    heads, never repeated), this rank's tokens in the ``load_balance`` layout
    (``get_batch_on_this_context_parallel_rank`` / ``shard_sequence``), positional encoding
    already applied at global positions. key_padding_mask ``[B, S_local]`` (bool, or 0/1
    integers as HF attention masks), true for real tokens. seq_idx / position_ids
    ``[B, S_local]``: packed documents (``context_parallel_attention``). Returns
    ``[B, Hq, S_local, D]`` in q's dtype; query rows that see no key are zeros.
    """

    def __init__(self, config: ConfigLike = None, *, causal: bool = True,
                 window_size: Optional[int] = None, softmax_scale: Optional[float] = None,
                 group=None):
        super().__init__()
        self.config = (ps.get_context_parallel_config() if config is None
                       else context_parallel_config_of(config))
        if window_size is not None and (not isinstance(window_size, int) or window_size < 1):
            raise ValueError(f"window_size={window_size!r} must be None or an integer >= 1")
        if window_size is not None and not causal:
            raise ValueError(f"window_size={window_size} needs causal=True")
        self.causal, self.window_size = bool(causal), window_size
        self.softmax_scale, self.group = softmax_scale, group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
        return context_parallel_attention(
            q, k, v, causal=self.causal, comm_type=self.config.comm_type,
            load_balance=self.config.load_balance, window_size=self.window_size,
            softmax_scale=self.softmax_scale, group=self.group,
            key_padding_mask=key_padding_mask, seq_idx=seq_idx, position_ids=position_ids,
            a2a_size=self.config.a2a_size)

    def extra_repr(self) -> str:
        return f"config={self.config}, causal={self.causal}, window_size={self.window_size}"
