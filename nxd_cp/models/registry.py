"""Public architecture registration: ``ArchitectureSpec`` and ``register_architecture``.

An ``ArchitectureSpec`` tells ``nxd_cp.transform`` where things are in one Hugging Face
causal-LM family; ``transform`` does the rest generically (TP layers, CP attention, loss, weight
sharding). The built-in families (Llama, Mistral, GPT-NeoX, Qwen2, Qwen3) are registered through
``register_architecture`` exactly as a user registers a new one, so adding a family never needs
an edit to nxd_cp.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

FUSED_QKV_LAYOUTS = (None, "per_head")
SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
             "vocab_size")


def _no_window(config, layer_idx: int) -> Optional[int]:
    return None


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where things are in one transformers causal-LM family (paths are attribute paths).

    name: a short family name (``"qwen2"``). class_names: the ``*ForCausalLM`` class names it
        covers (matched along the model class's MRO, so subclasses are covered too).
    base: the decoder model inside the causal LM (``"model"``, ``"gpt_neox"``).
    embedding, layers: attributes of ``base`` (token embedding -> vocab-parallel
        ``ParallelEmbedding``; the ``nn.ModuleList`` of decoder layers).
    lm_head: attribute of the causal LM (-> vocab-parallel ``ColumnParallelLinear``).
    attention: the attention module inside a decoder layer; it must call transformers'
        attention interface (``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``), which
        ``transform`` points at CP attention.
    column: linears inside a decoder layer split by output features (q, gate, up; a fused QKV):
        their outputs are this rank's heads ``[B, S_local, H/tp * D]`` / intermediate features.
    row: linears split by input features (o, down), all-reduced over TP.
    kv: separate K and V projections: split like ``column`` when Hkv % tp == 0, else one KV head
        per TP rank (``nxd_cp.layers.ReplicatedKVLinear``) when tp % Hkv == 0. Empty for a fused
        QKV projection.
    fused_qkv_layout: None (no fused QKV) or ``"per_head"``: the fused projection (in ``column``)
        lays its output features out per head, ``[h0: q k v | h1: q k v | ...]`` (GPT-NeoX), so a
        contiguous split gives each rank whole heads. A ``[all q | all k | all v]`` layout cannot
        be split contiguously and is not supported: split it into q/k/v modules instead.
    per_head: modules inside a decoder layer applied to each local head with parameters shared
        by all heads (Qwen3's ``self_attn.q_norm`` / ``k_norm``). They stay whole on every TP
        rank; each rank's gradient covers only its heads, so it is summed over TP in backward.
    sizes: config -> {"num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "vocab_size"} (checked to split over TP).
    window: (config, layer_idx) -> sliding window of that layer (key j visible to query i iff
        j <= i and i - j < window), or None for plain causal attention.
    final_norm, rotary: attributes of ``base``: the norm after the last decoder layer and the
        rotary-embedding module (``rotary(hidden, position_ids) -> (cos, sin)``); read only by
        pipeline parallelism, which calls each stage's modules itself.
    embedding_dropout: attribute of ``base`` applied to the token embeddings, or None.

    RoPE and masks need no entry: the family's own rotary code runs at the batch's
    ``position_ids`` (global positions under CP, from ``get_batch_on_this_context_parallel_rank``)
    and the 2-D key-padding mask reaches the attention through transformers' mask interface.
    Families must therefore support transformers' attention backends
    (``_supports_attention_backend``), checked by ``transform``.
    """

    name: str
    class_names: Tuple[str, ...]
    base: str
    embedding: str
    layers: str
    lm_head: str
    attention: str
    column: Tuple[str, ...]
    row: Tuple[str, ...]
    kv: Tuple[str, ...]
    sizes: Callable[[object], Dict[str, int]]
    window: Callable[[object, int], Optional[int]] = field(default=_no_window)
    fused_qkv_layout: Optional[str] = None
    per_head: Tuple[str, ...] = ()
    final_norm: str = "norm"
    rotary: str = "rotary_emb"
    embedding_dropout: Optional[str] = None


_REGISTRY: Dict[str, ArchitectureSpec] = {}  # class name -> spec, in registration order


def _check_spec(spec) -> None:
    if not isinstance(spec, ArchitectureSpec):
        raise ValueError(f"register_architecture(spec): spec must be an "
                         f"nxd_cp.ArchitectureSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"ArchitectureSpec.name={spec.name!r} must be a non-empty string")
    if (not isinstance(spec.class_names, tuple) or not spec.class_names
            or not all(isinstance(c, str) and c for c in spec.class_names)):
        raise ValueError(f"ArchitectureSpec.class_names={spec.class_names!r} must be a "
                         f"non-empty tuple of class names")
    for key in ("base", "embedding", "layers", "lm_head", "attention", "final_norm", "rotary"):
        if not isinstance(getattr(spec, key), str) or not getattr(spec, key):
            raise ValueError(f"ArchitectureSpec.{key}={getattr(spec, key)!r} must be a "
                             f"non-empty attribute path")
    for key in ("column", "row", "kv", "per_head"):
        value = getattr(spec, key)
        if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
            raise ValueError(f"ArchitectureSpec.{key}={value!r} must be a tuple of attribute "
                             f"paths inside a decoder layer")
    if spec.fused_qkv_layout not in FUSED_QKV_LAYOUTS:
        raise ValueError(f"ArchitectureSpec.fused_qkv_layout={spec.fused_qkv_layout!r} must be "
                         f"one of {FUSED_QKV_LAYOUTS}: only a per-head interleaved fused QKV "
                         f"projection splits into whole heads by a contiguous TP split")
    if spec.fused_qkv_layout is None and not spec.kv:
        raise ValueError(f"ArchitectureSpec {spec.name!r}: kv is empty, so the K/V projections "
                         f"must be fused: set fused_qkv_layout='per_head'")
    for key, nargs in (("sizes", 1), ("window", 2)):
        fn = getattr(spec, key)
        if not callable(fn):
            raise ValueError(f"ArchitectureSpec.{key} must be callable, got {fn!r}")
        try:
            inspect.signature(fn).bind(*range(nargs))
        except TypeError as e:
            args = "(config)" if nargs == 1 else "(config, layer_idx)"
            raise ValueError(f"ArchitectureSpec.{key} must take {args}: {e}") from None
        except ValueError:  # builtins without a signature: accepted as they are
            pass


def register_architecture(spec: ArchitectureSpec, override: bool = False) -> ArchitectureSpec:
    """Make ``nxd_cp.transform`` support the ``*ForCausalLM`` classes of ``spec``; returns spec.

    Raises ``ValueError`` for an invalid spec, or when one of its class names is registered by
    another spec and ``override`` is False.
    """
    _check_spec(spec)
    if not override:
        for cls in spec.class_names:
            other = _REGISTRY.get(cls)
            if other is not None and other != spec:
                raise ValueError(f"{cls} is already registered by architecture "
                                 f"{other.name!r}; pass override=True to replace it")
    for cls in spec.class_names:
        _REGISTRY[cls] = spec
    return spec


def supported_architectures() -> List[str]:
    """The registered ``*ForCausalLM`` class names, in registration order."""
    return list(_REGISTRY)


def registered_architectures() -> Dict[str, ArchitectureSpec]:
    """class name -> ``ArchitectureSpec`` (a copy of the registry)."""
    return dict(_REGISTRY)


def architecture_of(model: nn.Module) -> ArchitectureSpec:
    """The spec registered for ``model``'s class (or a base class), else ``ValueError``."""
    for cls in type(model).__mro__:
        if cls.__name__ in _REGISTRY:
            return _REGISTRY[cls.__name__]
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: nxd_cp.transform supports "
        f"{', '.join(_REGISTRY)}. To add a family, describe it with "
        f"nxd_cp.ArchitectureSpec(name=..., class_names=({type(model).__name__!r},), base=..., "
        f"embedding=..., layers=..., lm_head=..., attention=..., column=..., row=..., kv=..., "
        f"sizes=...) and call nxd_cp.register_architecture(spec) before transform "
        f"(see docs/models.md, 'Adding a family')")


def check_sizes(spec: ArchitectureSpec, config, tp: int) -> Dict[str, int]:
    """``spec.sizes(config)``; ``ValueError`` naming the rule when it does not split over tp."""
    s = spec.sizes(config)
    missing = [k for k in SIZE_KEYS if k not in s]
    if missing:
        raise ValueError(f"ArchitectureSpec {spec.name!r}: sizes(config) lacks {missing}")
    hq, hkv = s["num_attention_heads"], s["num_key_value_heads"]
    if hq % tp:
        raise ValueError(f"num_attention_heads={hq} is not divisible by "
                         f"tensor_model_parallel_size={tp}")
    if hq % hkv:
        raise ValueError(f"num_attention_heads={hq} is not divisible by "
                         f"num_key_value_heads={hkv}")
    if hkv % tp and tp % hkv:
        raise ValueError(f"num_key_value_heads={hkv} must be divisible by "
                         f"tensor_model_parallel_size={tp} (KV heads split) or divide it (KV "
                         f"heads replicated)")
    if hkv % tp and spec.fused_qkv_layout is not None:
        raise ValueError(f"num_key_value_heads={hkv} < tensor_model_parallel_size={tp} needs "
                         f"separate K/V projections to replicate; {spec.name!r} fuses them")
    for name in ("intermediate_size", "vocab_size"):
        if s[name] % tp:
            raise ValueError(f"{name}={s[name]} is not divisible by "
                             f"tensor_model_parallel_size={tp}")
    return s
