"""Llama (2, 3, 3.1) and Mistral: separate q/k/v/o projections, gated MLP, GQA.

Per decoder layer: q_proj, gate_proj, up_proj split by output features (local heads
``[B, Hq/tp, S, D]``); k_proj, v_proj split likewise when Hkv % tp == 0, else one replicated KV
head per rank; o_proj, down_proj split by input features. RoPE (any ``rope_scaling``, e.g.
``llama3``) is the model's own, applied at the batch's global ``position_ids``. Mistral's
``sliding_window`` becomes the CP attention's window.
"""
from __future__ import annotations

from nxd_cp.models.registry import ArchitectureSpec, register_architecture


def sizes(config):
    """The ``ArchitectureSpec.sizes`` of Llama-like configs ."""
    hq = config.num_attention_heads
    return {"num_attention_heads": hq,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or hq,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // hq,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size}


# The layout shared by Llama and Mistral.
LLAMA_LAYOUT = dict(
    base="model", embedding="embed_tokens", layers="layers", lm_head="lm_head",
    attention="self_attn", column=("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj"),
    row=("self_attn.o_proj", "mlp.down_proj"), kv=("self_attn.k_proj", "self_attn.v_proj"),
    sizes=sizes)


def _mistral_window(config, layer_idx):
    return getattr(config, "sliding_window", None)  # every layer (MistralAttention)


LLAMA = register_architecture(ArchitectureSpec(
    name="llama", class_names=("LlamaForCausalLM",), **LLAMA_LAYOUT))

MISTRAL = register_architecture(ArchitectureSpec(
    name="mistral", class_names=("MistralForCausalLM",), window=_mistral_window,
    **LLAMA_LAYOUT))
