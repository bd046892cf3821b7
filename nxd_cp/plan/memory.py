"""Per-rank memory of a training step under TP x CP x PP (x DP): pure functions, bytes.

Every figure is for one rank (one NeuronCore) and is in **bytes**. ``hf_config`` is a Hugging
Face ``config.json`` read as a dict (or a ``PretrainedConfig``); ``model_dims`` reads the sizes.
The activation formulas are those of docs/choosing.md, corrected by measurement
(tests/test_plan.py: ``count_saved_bytes`` around the forward of a transformed tiny model on
gloo ranks, bf16), and count what autograd saves for backward:

* per decoder layer and token: two RMSNorms (fp32 copy ``4h``, normalised ``e·h``, output
  ``e·h``, fp32 ``rsqrt`` 4), attention (local q, k, v, out ``e`` each, fp32 log-sum-exp per
  query head), MLP (gate, up, silu(gate), product: ``4·e·f/tp``); Qwen3's q/k norms add
  ``(4 + e)·D + 4`` per local q and k head. Measured: the attention output and the o_proj input
  share one storage (choosing.md counted them twice), and cp = 1 saves the same as cp > 1.
* once per stage: the rotary cos/sin (``2·D·e``), the embedding's indices (int64 at tp = 1;
  int32 and a mask at tp > 1), the final norm, the loss (gathered: fp32 log-softmax ``4V``;
  vocab-parallel: two fp32 ``[V/tp]``).
* checkpointing: each layer keeps its input only (``e·h``, ``/tp`` under SP); the layer being
  recomputed in backward is a transient (``recompute_bytes``), not saved in forward.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

from nxd_cp.pipeline.split import stage_layers

SHARDINGS = ("none", "zero1", "fsdp")
GIB = 1024 ** 3


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def model_dims(hf_config: Any) -> Dict[str, Any]:
    """The sizes the formulas use, from an HF config (dict or object): ``h`` hidden size,
    ``L`` layers, ``hq``/``hkv`` query/KV heads, ``d`` head dim, ``f`` MLP size, ``V``
    vocabulary, ``tied`` embeddings, ``qk_norm`` (Qwen3), ``qkv_bias`` (Qwen2), ``arch``."""
    arch = _get(hf_config, "model_type")
    if arch not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"hf_config model_type={arch!r} is not one the planner models: "
                         "llama, mistral, qwen2, qwen3 (gated MLP, RMSNorm decoders)")
    h = int(_get(hf_config, "hidden_size"))
    hq = int(_get(hf_config, "num_attention_heads"))
    d = _get(hf_config, "head_dim") or h // hq
    return {"arch": arch, "h": h, "L": int(_get(hf_config, "num_hidden_layers")), "hq": hq,
            "hkv": int(_get(hf_config, "num_key_value_heads") or hq), "d": int(d),
            "f": int(_get(hf_config, "intermediate_size")), "V": int(_get(hf_config, "vocab_size")),
            "tied": bool(_get(hf_config, "tie_word_embeddings", False)),
            "qk_norm": arch == "qwen3", "qkv_bias": arch == "qwen2"}


def _check(name: str, value: int, rule: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}")


def _stages(m: Dict[str, Any], pp: int, stage: Optional[int]):
    _check("pp", pp, "must be an integer >= 1", isinstance(pp, int) and pp >= 1)
    return range(pp) if stage is None else [stage]


def parameter_count(hf_config: Any, tp: int = 1, pp: int = 1, stage: Optional[int] = None) -> int:
    """Parameters (elements) one rank holds: its TP shard of its stage's layers, plus the
    embedding (first stage), the final norm and lm_head (last stage; a tied lm_head is a copy
    there when pp > 1). KV projections are replicated when ``tp > hkv`` (one head per rank).
    ``stage=None``: the largest stage."""
    m = model_dims(hf_config)
    _check("tp", tp, "must be an integer >= 1", isinstance(tp, int) and tp >= 1)
    h, d, f, V = m["h"], m["d"], m["f"], m["V"]
    hq, hkv = m["hq"] // tp, max(1, m["hkv"] // tp)
    layer = h * hq * d * 2 + 2 * h * hkv * d + 3 * h * f // tp + 2 * h
    if m["qkv_bias"]:
        layer += hq * d + 2 * hkv * d
    if m["qk_norm"]:
        layer += 2 * d
    best = 0
    for s in _stages(m, pp, stage):
        start, stop = stage_layers(m["L"], pp, s)
        n = (stop - start) * layer
        if s == 0:
            n += V * h // tp
        if s == pp - 1:
            n += h + (0 if m["tied"] and pp == 1 else V * h // tp)
        best = max(best, n)
    return best


def _shard(count: int, sharding: str, dp_cp: int, sharded: bool) -> float:
    _check("sharding", sharding, f"must be one of {SHARDINGS}", sharding in SHARDINGS)
    _check("dp_cp", dp_cp, "must be an integer >= 1", isinstance(dp_cp, int) and dp_cp >= 1)
    return count / dp_cp if sharded else count


def parameter_bytes(hf_config: Any, tp: int = 1, pp: int = 1, stage: Optional[int] = None,
                    dtype_bytes: int = 2, sharding: str = "none", dp_cp: int = 1) -> float:
    """Bytes of this rank's parameters: ``parameter_count · dtype_bytes``, divided by
    ``dp_cp`` (= dp·cp, the ZeRO/FSDP group) under ``sharding="fsdp"``."""
    n = parameter_count(hf_config, tp, pp, stage) * dtype_bytes
    return _shard(n, sharding, dp_cp, sharding == "fsdp")


def gradient_bytes(hf_config: Any, tp: int = 1, pp: int = 1, stage: Optional[int] = None,
                   dtype_bytes: int = 2, sharding: str = "none", dp_cp: int = 1) -> float:
    """Bytes of this rank's gradients (``dtype_bytes`` per parameter: 2 bf16, 4 fp32),
    divided by ``dp_cp`` under FSDP (ZeRO-1 keeps whole gradients)."""
    n = parameter_count(hf_config, tp, pp, stage) * dtype_bytes
    return _shard(n, sharding, dp_cp, sharding == "fsdp")


def optimizer_bytes(hf_config: Any, tp: int = 1, pp: int = 1, stage: Optional[int] = None,
                    bytes_per_parameter: int = 4, sharding: str = "none", dp_cp: int = 1,
                    per_tensor_bytes: int = 0) -> float:
    """Bytes of this rank's optimizer state: ``bytes_per_parameter`` (AdamW's two moments:
    4 in bf16, 8 in fp32; 12 with fp32 master weights), divided by ``dp_cp`` under ZeRO-1 or
    FSDP (ZeRO-1: the average rank; it balances whole parameters, so a rank may hold up to one
    parameter's state more). ``per_tensor_bytes``: a fixed cost per parameter tensor (torch's
    AdamW keeps a 4-byte ``step`` per parameter; negligible at scale, counted for the tiny
    validation models)."""
    n = parameter_count(hf_config, tp, pp, stage) * bytes_per_parameter
    n = _shard(n, sharding, dp_cp, sharding in ("zero1", "fsdp"))
    # ZeRO-1 gives each rank whole parameters (their state, ``step`` included): 1/dp_cp of
    # them on average; FSDP2 gives every rank a shard of every parameter (a step each).
    tensors = _tensor_count(hf_config, pp, stage) / (dp_cp if sharding == "zero1" else 1)
    return n + per_tensor_bytes * tensors


def _tensor_count(hf_config: Any, pp: int, stage: Optional[int]) -> int:
    m = model_dims(hf_config)
    per_layer = 9 + (3 if m["qkv_bias"] else 0) + (2 if m["qk_norm"] else 0)
    best = 0
    for s in _stages(m, pp, stage):
        start, stop = stage_layers(m["L"], pp, s)
        n = (stop - start) * per_layer + (s == 0)
        if s == pp - 1:
            n += 1 + (0 if m["tied"] and pp == 1 else 1)
        best = max(best, n)
    return best


def layer_bytes_per_token(hf_config: Any, tp: int = 1, dtype_bytes: int = 2,
                          sequence_parallel: bool = False, comm_type: str = "p2p",
                          cp: int = 1, a2a_size: Optional[int] = None) -> float:
    """Bytes one decoder layer saves for backward per token of this rank (no checkpointing).
    ``comm_type`` "a2a" (group ``g = cp``) / "a2a+p2p" (``g = a2a_size``) save, measured: K/V
    with their heads repeated to ``lcm(hkv/tp, g)`` before the all-to-all, the o_proj input in
    a storage of its own (``e·hq·D/tp``) and two int32 index tensors of ``g`` per token."""
    m = model_dims(hf_config)
    e, h, d, f = dtype_bytes, m["h"], m["d"], m["f"]
    hq, hkv = m["hq"] / tp, max(1, m["hkv"] // tp)
    norms = 2 * (4 * h + 2 * e * h + 4)
    attn = e * (2 * hq * d + 2 * hkv * d) + 4 * hq
    if m["qk_norm"]:
        attn += (hq + hkv) * ((4 + e) * d + 4)
    if comm_type in ("a2a", "a2a+p2p"):
        g = cp if comm_type == "a2a" else int(a2a_size or 1)
        rep = math.lcm(hkv, g)
        attn += 2 * (rep - hkv) * d * e + e * hq * d + 2 * 4 * g
    mlp = 4 * e * f / tp
    if sequence_parallel:
        return norms / tp + attn + mlp
    return norms + attn + mlp


def _head_bytes_per_token(m: Dict[str, Any], tp: int, e: int, sp: bool, vocab_parallel: bool,
                          first: bool, last: bool, ckpt: bool) -> float:
    """Per-stage bytes per token outside the decoder layers (module docstring)."""
    h, V = m["h"], m["V"]
    # rotary cos / sin (saved inside the layers only: recomputed with checkpointing); with SP
    # and checkpointing the first layer's input is a view of the whole embedding output
    out = (e * h * (1 - 1 / tp) if first and sp else 0) if ckpt else 2 * m["d"] * e
    if first:
        out += 8 if tp == 1 else 4 + e                    # embedding indices (+ vocab mask)
    if last:
        out += ((4 * h + e * h + 4) / tp + e * h) if sp else (4 * h + 2 * e * h + 4)
        out += (8 * V / tp + 13) if vocab_parallel and tp > 1 else (4 * V + 12)
    return out


def in_flight_microbatches(pp: int, num_microbatches: int, stage: int = 0,
                           schedule: str = "1F1B") -> int:
    """Microbatches whose activations stage ``stage`` holds at once: ``min(m, pp - stage)``
    under 1F1B, all ``m`` under GPipe (nxd_cp.pipeline's schedules)."""
    _check("num_microbatches", num_microbatches, "must be an integer >= 1",
           isinstance(num_microbatches, int) and num_microbatches >= 1)
    return num_microbatches if schedule == "GPipe" else min(num_microbatches, pp - stage)


def activation_bytes(hf_config: Any, tp: int = 1, cp: int = 1, seq_len: int = 4096,
                     micro_batch: int = 1, dtype_bytes: int = 2,
                     sequence_parallel: bool = False, checkpointing: bool = False,
                     vocab_parallel_logits: bool = False, pp: int = 1,
                     num_microbatches: int = 1, comm_type: str = "p2p",
                     stage: Optional[int] = None, a2a_size: Optional[int] = None) -> float:
    """Bytes saved for backward on one rank at the end of its forward: ``micro_batch`` rows of
    ``seq_len / cp`` tokens per microbatch, times the microbatches its stage holds at once
    (1F1B). ``stage=None``: the largest stage. Raises ``ValueError`` when ``seq_len`` is not
    divisible by ``2·cp`` (zigzag) or by ``tp`` under SP."""
    m = model_dims(hf_config)
    _check("seq_len", seq_len, f"must be divisible by 2*cp={2 * cp} (zigzag)",
           seq_len % (2 * cp) == 0 or cp == 1)
    n = micro_batch * seq_len // cp
    _check("seq_len", seq_len, f"/ cp must be divisible by tp={tp} (sequence parallel)",
           not sequence_parallel or (seq_len // cp) % tp == 0)
    e, sp = dtype_bytes, sequence_parallel
    layer = layer_bytes_per_token(hf_config, tp, e, sp, comm_type, cp, a2a_size)
    kept = (e * m["h"] / tp if sp else e * m["h"]) if checkpointing else layer
    best = 0.0
    for s in _stages(m, pp, stage):
        start, stop = stage_layers(m["L"], pp, s)
        per_token = (stop - start) * kept + _head_bytes_per_token(
            m, tp, e, sp, vocab_parallel_logits, s == 0, s == pp - 1, checkpointing)
        best = max(best, per_token * n * in_flight_microbatches(pp, num_microbatches, s))
    return best


def recompute_bytes(hf_config: Any, tp: int = 1, cp: int = 1, seq_len: int = 4096,
                    micro_batch: int = 1, dtype_bytes: int = 2,
                    sequence_parallel: bool = False, checkpointing: bool = True) -> float:
    """Transient bytes in backward with checkpointing: one layer's activations, recomputed
    (0 without checkpointing)."""
    if not checkpointing:
        return 0.0
    n = micro_batch * seq_len // cp
    return layer_bytes_per_token(hf_config, tp, dtype_bytes, sequence_parallel) * n


def logits_bytes(hf_config: Any, tp: int = 1, cp: int = 1, seq_len: int = 4096,
                 micro_batch: int = 1, dtype_bytes: int = 2,
                 vocab_parallel_logits: bool = False) -> float:
    """The model's logits output (held by the caller until backward, not saved by autograd)
    plus their fp32 gradient in backward: ``(e + 4) · V`` (``/tp`` vocab-parallel) per token."""
    V = model_dims(hf_config)["V"] / (tp if vocab_parallel_logits else 1)
    return (dtype_bytes + 4) * V * micro_batch * seq_len // cp


__all__ = ["model_dims", "parameter_count", "parameter_bytes", "gradient_bytes",
           "optimizer_bytes", "layer_bytes_per_token", "activation_bytes",
           "in_flight_microbatches", "recompute_bytes", "logits_bytes"]
