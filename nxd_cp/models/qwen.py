"""Qwen2 and Qwen3, added through the public registration only (``nxd_cp.ArchitectureSpec`` +
``nxd_cp.register_architecture``), as a user adds a family: nothing else in nxd_cp knows them.

Both are laid out like Llama (separate q/k/v/o projections, gated MLP, GQA; k/v replicated
per TP rank when num_key_value_heads < tp). Differences handled by the spec:

* Qwen2: q/k/v projections carry biases (split or replicated with their weights). Sliding
  windows are per layer, decided exactly as transformers 4.57's modeling code does: layer ``i``
  uses ``config.sliding_window`` iff ``config.layer_types[i] == "sliding_attention"`` (the
  config derives ``layer_types`` from ``use_sliding_window`` / ``max_window_layers`` when it is
  not given, and sets ``sliding_window`` to None unless ``use_sliding_window``).
* Qwen3: the same, plus per-head RMSNorms ``self_attn.q_norm`` / ``k_norm`` over ``head_dim``
  (weights shared by all heads): ``per_head`` modules, whole on every TP rank, gradients
  summed over TP. ``head_dim`` comes from the config (not hidden_size / heads).
"""
from __future__ import annotations

from nxd_cp.models.registry import ArchitectureSpec, register_architecture


def _sizes(config):
    hq = config.num_attention_heads
    return {"num_attention_heads": hq,
            "num_key_value_heads": config.num_key_value_heads or hq,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // hq,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size}


def _layer_window(config, layer_idx):
    """``QwenXAttention.sliding_window`` of layer ``layer_idx`` (transformers 4.57)."""
    if config.layer_types[layer_idx] == "sliding_attention":
        return config.sliding_window
    return None


_LAYOUT = dict(
    base="model", embedding="embed_tokens", layers="layers", lm_head="lm_head",
    attention="self_attn", column=("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj"),
    row=("self_attn.o_proj", "mlp.down_proj"), kv=("self_attn.k_proj", "self_attn.v_proj"),
    sizes=_sizes, window=_layer_window)

QWEN2 = register_architecture(ArchitectureSpec(
    name="qwen2", class_names=("Qwen2ForCausalLM",), **_LAYOUT))

QWEN3 = register_architecture(ArchitectureSpec(
    name="qwen3", class_names=("Qwen3ForCausalLM",),
    per_head=("self_attn.q_norm", "self_attn.k_norm"), **_LAYOUT))
