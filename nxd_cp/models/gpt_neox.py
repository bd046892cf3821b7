"""GPT-NeoX (Pythia): fused query_key_value, parallel residual, partial rotary.

``query_key_value`` is one linear whose output features are laid out per head:
``[head 0: q (D), k (D), v (D) | head 1: q, k, v | ...]`` (the module views its output as
``[B, S, H, 3*D]`` and chunks the last dim in three). Splitting the output features into tp
contiguous chunks therefore gives each rank whole heads with their own q, k and v, so the fused
projection is an ordinary column-parallel linear. ``dense`` and ``dense_4h_to_h`` are
row-parallel. Partial rotary (``rotary_pct``) and the parallel residual are the model's own
code, unchanged. There is no GQA (Hkv = Hq).
"""
from __future__ import annotations

from nxd_cp.models.registry import ArchitectureSpec, register_architecture


def _sizes(config):
    hq = config.num_attention_heads
    return {"num_attention_heads": hq, "num_key_value_heads": hq,
            "head_dim": config.hidden_size // hq,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size}


GPT_NEOX = register_architecture(ArchitectureSpec(
    name="gpt_neox", class_names=("GPTNeoXForCausalLM",), base="gpt_neox", embedding="embed_in",
    layers="layers", lm_head="embed_out", attention="attention",
    column=("attention.query_key_value", "mlp.dense_h_to_4h"),
    row=("attention.dense", "mlp.dense_4h_to_h"), kv=(), fused_qkv_layout="per_head",
    sizes=_sizes, final_norm="final_layer_norm", embedding_dropout="emb_dropout"))
