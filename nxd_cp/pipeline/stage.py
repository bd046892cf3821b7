"""``CausalLMStage``: the forward of one pipeline stage of a transformed causal LM.

A Hugging Face ``*Model.forward`` runs embedding -> rotary -> every decoder layer -> final norm
in one call; under PP a rank runs only its stage, so the stage calls the same modules
explicitly (no mask building: the ``"nxd_cp"`` mask interface hands the attention the 2-D
padding mask unchanged, which is what is passed here):

* first stage: ``input_ids [mb, S_local]`` -> token embedding (-> embedding dropout);
* every stage: hidden ``[mb, S_local, H]`` (``[mb, S_local/tp, H]`` after the first decoder
  layer under SP) -> the rotary module at the batch's global ``position_ids`` -> its decoder
  layers, each given ``attention_mask`` ``[mb, S_local]``, ``position_ids``, ``seq_idx`` (packed
  rows) as the model's own forward gives them;
* last stage: -> final norm -> lm_head: logits ``[mb, S_local, V]`` (``V/tp`` vocab-parallel).

The modules are the transformed model's own (shared, not copied): the stage's parameters are
the model's. The explicit loop is also what a tracer (NxD's) can follow.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class CausalLMStage(nn.Module):
    """One stage: ``forward(x, position_ids, attention_mask=None, seq_idx=None)``.

    x: ``input_ids [mb, S_local]`` on the first stage, else the previous stage's hidden states.
    Returns hidden states, or logits on the last stage.
    """

    def __init__(self, layers: Sequence[nn.Module], rotary: nn.Module, *,
                 embedding: Optional[nn.Module] = None,
                 embedding_dropout: Optional[nn.Module] = None,
                 norm: Optional[nn.Module] = None, lm_head: Optional[nn.Module] = None):
        super().__init__()
        if (norm is None) != (lm_head is None):
            raise ValueError("CausalLMStage: the last stage has both the final norm and the "
                             "lm_head, other stages neither")
        self.embedding, self.embedding_dropout = embedding, embedding_dropout
        self.layers = nn.ModuleList(layers)
        self.rotary, self.norm, self.lm_head = rotary, norm, lm_head

    @property
    def is_first(self) -> bool:
        return self.embedding is not None

    @property
    def is_last(self) -> bool:
        return self.lm_head is not None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.embedding(x) if self.is_first else x
        if self.is_first and self.embedding_dropout is not None:
            hidden = self.embedding_dropout(hidden)
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids,
                  "position_embeddings": self.rotary(hidden, position_ids), "use_cache": False}
        if seq_idx is not None:
            kwargs["seq_idx"] = seq_idx
        for layer in self.layers:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # GPT-NeoX returns a tuple
        if self.is_last:
            hidden = self.lm_head(self.norm(hidden))
        return hidden
