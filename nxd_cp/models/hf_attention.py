"""The ``"nxd_cp"`` attention implementation of transformers, through its public interfaces.

``AttentionInterface.register("nxd_cp", ...)`` makes every attention module of a model whose
config selects ``"nxd_cp"`` call ``cp_attention_forward`` instead of SDPA / eager; the modules'
own code (projections, RoPE at the batch's global ``position_ids``) is unchanged.

``AttentionMaskInterface.register("nxd_cp", ...)`` makes ``create_causal_mask`` /
``create_sliding_window_causal_mask`` hand the attention the 2-D key-padding mask of the
rank's tokens unchanged (``[B, S_local]`` bool, True = real token), instead of a 4-D mask of
local length, which would be wrong: the causal / sliding-window structure is between *global*
positions and is applied by ``context_parallel_attention`` from the layout and the config.

Packed rows: the model's ``**kwargs`` reach the attention function unchanged (transformers'
``TransformersKwargs`` path, which its flash-attention varlen kwargs use too), so the batch's
``seq_idx`` ``[B, S_local]`` (``get_batch_on_this_context_parallel_rank``) arrives here with the
layer's ``position_ids`` and is handed to ``context_parallel_attention``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from nxd_cp.attention.api import context_parallel_attention

ATTN_IMPLEMENTATION = "nxd_cp"
MODULE_ATTR = "nxd_cp_attention"  # CPAttentionConfig set on each attention module by transform


@dataclass(frozen=True)
class CPAttentionConfig:
    """What ``transform`` binds into one attention module: everything its CP attention call
    needs besides the tensors (nothing is read from a global config per call).

    comm_type, load_balance, a2a_size: the model's ``ContextParallelConfig`` (``"p2p"`` /
    ``"all_gather"`` / ``"a2a"`` / ``"a2a+p2p"``; ``"zigzag"`` / ``"contiguous"`` /
    ``"per_document"``; the all-to-all group size of ``"a2a+p2p"``).
    window_size: sliding window of this layer (key j visible to query i iff j <= i and
    i - j < window), or None for plain causal.
    """

    comm_type: str = "p2p"
    load_balance: str = "zigzag"
    window_size: Optional[int] = None
    a2a_size: Optional[int] = None


def cp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                         scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature on top of ``context_parallel_attention``.

    query ``[B, Hq_local, S_local, D]``, key/value ``[B, Hkv_local, S_local, D]`` (this rank's
    heads and tokens, RoPE applied), attention_mask ``[B, S_local]`` bool or None; kwargs
    ``seq_idx`` / ``position_ids`` ``[B, S_local]`` for packed documents.
    Returns ``([B, S_local, Hq_local, D], None)`` as transformers expects.
    """
    cfg = getattr(module, MODULE_ATTR, None)
    if cfg is None:
        raise RuntimeError(
            f"{type(module).__name__} selects attn_implementation={ATTN_IMPLEMENTATION!r} but was "
            "not transformed by nxd_cp.transform (a config object shared with an unmodified "
            "model? give each model its own config)")
    if dropout:
        raise NotImplementedError(f"attention dropout={dropout} is not supported under context "
                                  "parallelism; set config.attention_dropout=0")
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError("head_mask is not supported under context parallelism")
    if attention_mask is not None:  # 2-D: checked by the model's forward pre-hook
        attention_mask = attention_mask.to(torch.bool)
    device = query.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:
        # As transformers' attention under autocast: q, k, v in the region's compute dtype
        # (RoPE hands q / k back in fp32, v comes in bf16); the CP kernels choose their own
        # precision inside (fp32 partials and merges), autocast off.
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        out = context_parallel_attention(query, key, value, causal=True,
                                         comm_type=cfg.comm_type, load_balance=cfg.load_balance,
                                         window_size=cfg.window_size, softmax_scale=scaling,
                                         key_padding_mask=attention_mask,
                                         seq_idx=kwargs.get("seq_idx"),
                                         position_ids=kwargs.get("position_ids"),
                                         a2a_size=cfg.a2a_size)
    return out.transpose(1, 2).contiguous(), None


def passthrough_padding_mask(batch_size: int, cache_position: torch.Tensor, kv_length: int,
                             kv_offset: int = 0, mask_function=None,
                             attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """Mask "creation" for ``"nxd_cp"``: the 2-D padding mask (already bool) or None, as is."""
    return attention_mask


def register() -> None:
    """Register the implementation with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, cp_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, passthrough_padding_mask)
