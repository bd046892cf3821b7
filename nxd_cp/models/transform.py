"""``transform``: an unmodified transformers causal LM -> the same model with TP x CP.

What changes (and nothing else does):

* embedding -> vocab-parallel ``ParallelEmbedding``; lm_head -> vocab-parallel
  ``ColumnParallelLinear`` (gathering full-vocabulary logits ``[B, S_local, V]`` unless
  ``vocab_parallel_logits=True``); tied embeddings stay tied;
* per decoder layer, the projections of the ``ArchSpec`` -> column / row parallel linears (K/V
  replicated per TP rank when there are fewer KV heads than TP ranks);
* the config selects the ``"nxd_cp"`` attention implementation (``hf_attention``): attention
  over the CP group with the causal / sliding-window mask of the config;
* ``model.loss_function`` -> token-weighted CP cross entropy on *already shifted* labels;
* the config's ``sequence_parallel=True``: Megatron / NxD sequence parallelism inside TP
  (``nxd_cp.tensor_parallel.sequence_parallel``): the first decoder layer's input (the embedding output) is split
  over TP along the sequence, norms and residuals run on ``S/(cp*tp)`` tokens, attention / MLP
  see the all-gathered ``[B, S/cp, H]``, the lm_head all-gathers the final norm's output (logits
  ``[B, S/cp, V]`` as without SP); call ``allreduce_sequence_parallel_gradients(model)`` after
  backward. Without SP the fallback's q/k/v and gate/up share one input all-reduce in backward;
* a forward pre-hook rejects what CP cannot run (KV cache, missing global ``position_ids``, a
  padding mask that is not 2-D, a local sequence SP cannot split, an active config whose
  ``sequence_parallel`` is not the model's) and turns ``use_cache`` off.

Comm type and layout are not stored in the model: its attention reads them from the active CP
config at every call (``nxd_cp.config``), the same value ``get_batch_on_this_context_parallel_rank``
shards the batch with, so data and model cannot disagree on the layout.

Weights come from the model itself (full weights on every rank, as ``from_pretrained`` loads
them) or, for a model built on the meta device, from ``state_dict`` (a full HF state dict).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.topology.agreement import check_group_agreement
from nxd_cp.config import (context_parallel_config_of, get_context_parallel_config,
                           sequence_parallel_enabled)
from nxd_cp.sequence.batch import check_padding_mask
from nxd_cp.tensor_parallel.layers import (ColumnParallelLinear, ParallelEmbedding, ReplicatedKVLinear,
                           RowParallelLinear)
from nxd_cp.training.loss import context_parallel_cross_entropy
from nxd_cp.models import hf_attention
from nxd_cp.models.common import (ArchSpec, Partition, check_sizes, get_path, materialize,
                                  partitions, set_path, copy_shard)
from nxd_cp.models.rope import wrap_length_dependent
from nxd_cp.models.registry import architecture_of as arch_of
from nxd_cp.models.registry import supported_architectures  # noqa: F401
from nxd_cp.nn.registry import registered_modules, replace_registered_modules
from nxd_cp.tensor_parallel.head_shared import HeadShared
from nxd_cp.tensor_parallel import sequence_parallel as sp

_META = torch.device("meta")


def _causal_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None,
                    ignore_index=-100, shift_labels=None, vocab_parallel=False, **kwargs):
    """transformers' loss_function signature; labels are already shifted (see data.py)."""
    target = shift_labels if shift_labels is not None else labels
    return context_parallel_cross_entropy(logits, target, ignore_index=ignore_index,
                                          vocab_parallel=vocab_parallel,
                                          num_items_in_batch=num_items_in_batch)


_INTEGER_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask", "seq_idx")


def _int32_on_xla(args, kwargs):
    """int64 token ids, labels, positions and masks on an XLA device -> int32: one convert per
    input at the graph's entry, no s64 index arithmetic after it (int32 inputs: no s64 at
    all)."""
    def cast(x):
        if isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.device.type == "xla":
            return x.to(torch.int32)
        return x
    for key in _INTEGER_INPUTS:
        if key in kwargs:
            kwargs[key] = cast(kwargs[key])
    return tuple(cast(a) for a in args[:1]) + tuple(args[1:]), kwargs


def _check_inputs(model: nn.Module, args, kwargs):
    """Forward pre-hook: what a CP forward needs, checked before any collective runs (the
    attention validates the shard length and layout itself)."""
    if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        raise ValueError("past_key_values / use_cache=True are not supported by a "
                         "context-parallel model (training only: no KV cache)")
    kwargs["use_cache"] = False
    seq_par = model.nxd_cp_config["sequence_parallel"]
    if seq_par != sequence_parallel_enabled():
        raise RuntimeError(f"the model was transformed with sequence_parallel={seq_par} but the "
                           f"active config has sequence_parallel={not seq_par}: call "
                           "neuronx_distributed_config(...) with the model's setting")
    check_padding_mask(kwargs.get("attention_mask"))
    seq = kwargs.get("input_ids", args[0] if args else None)
    seq = kwargs.get("inputs_embeds") if seq is None else seq
    if seq_par and seq is not None:
        sp.check_sequence_split(seq.shape[1], ps.get_tensor_model_parallel_size())
    seq_idx = kwargs.get("seq_idx")  # packed documents: reaches the attention through kwargs
    if seq_idx is not None and seq is not None and (
            not isinstance(seq_idx, torch.Tensor) or tuple(seq_idx.shape) != tuple(seq.shape[:2])):
        got = tuple(seq_idx.shape) if isinstance(seq_idx, torch.Tensor) else type(seq_idx)
        raise ValueError(f"seq_idx must be [batch, seq] = {tuple(seq.shape[:2])} like the input "
                         f"tokens (get_batch_on_this_context_parallel_rank shards it), got {got}")
    if ps.get_context_model_parallel_size() > 1 and kwargs.get("position_ids") is None:
        raise ValueError("position_ids is required with context_parallel_size > 1: RoPE needs "
                         "the global positions of this rank's tokens (get_batch_on_this_"
                         "context_parallel_rank adds them)")
    return _int32_on_xla(args, kwargs)


def _parallel_modules(model: nn.Module, spec: ArchSpec, sizes: Dict[str, int],
                      vocab_parallel_logits: bool, skip=(), seq_par: bool = False
                      ) -> Dict[str, nn.Module]:
    """path -> new TP module (on the meta device) for every module that gets split; paths
    under ``skip`` (replaced through ``register_module``) are left alone."""
    tp = ps.get_tensor_model_parallel_size()
    new = {}

    def column(path, gather_output=False, kind="column", in_attention=False):
        if path.startswith(skip):
            return
        lin = get_path(model, path)
        new[path] = ColumnParallelLinear(lin.in_features, lin.out_features,
                                         bias=lin.bias is not None, gather_output=gather_output,
                                         dtype=lin.weight.dtype, device=_META,
                                         **sp.layer_options(kind, in_attention, seq_par))

    def row(path):
        if path.startswith(skip):
            return
        lin = get_path(model, path)
        new[path] = RowParallelLinear(lin.in_features, lin.out_features,
                                      bias=lin.bias is not None, input_is_parallel=True,
                                      dtype=lin.weight.dtype, device=_META,
                                      **sp.layer_options("row", False, seq_par))

    emb_path = f"{spec.base}.{spec.embedding}"
    emb = get_path(model, emb_path)
    new[emb_path] = ParallelEmbedding(emb.num_embeddings, emb.embedding_dim,
                                      padding_idx=emb.padding_idx, dtype=emb.weight.dtype,
                                      device=_META)
    hkv = sizes["num_key_value_heads"]
    for i in range(len(get_path(model, f"{spec.base}.{spec.layers}"))):
        prefix = f"{spec.base}.{spec.layers}.{i}."
        for p in spec.column:
            column(prefix + p, in_attention=p.startswith(spec.attention + "."))
        for p in spec.row:
            row(prefix + p)
        for p in spec.per_head:
            if not (prefix + p).startswith(skip):
                new[prefix + p] = HeadShared(get_path(model, prefix + p))
        for p in spec.kv:
            if hkv % tp == 0 or (prefix + p).startswith(skip):
                column(prefix + p, in_attention=p.startswith(spec.attention + "."))
            else:
                lin = get_path(model, prefix + p)
                new[prefix + p] = ReplicatedKVLinear(lin.in_features, hkv, sizes["head_dim"],
                                                     bias=lin.bias is not None,
                                                     dtype=lin.weight.dtype, device=_META)
    column(spec.lm_head, gather_output=not vocab_parallel_logits, kind="lm_head")
    return new


def _rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """Recreate RoPE modules: their inv_freq is a non-persistent buffer (not in state dicts)."""
    for name, m in list(model.named_modules()):
        if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "rope_init_fn"):
            set_path(model, name, type(m)(config=m.config, device=device))


def _first_device(tensors) -> torch.device:
    for t in tensors:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _sequence_parallel(config) -> bool:
    """The model's ``sequence_parallel``: the active config's, after checking that ``config``
    (the dict ``neuronx_distributed_config`` returned, or None) is the active one."""
    if config is None:
        return sequence_parallel_enabled()
    if not isinstance(config, Mapping) or "context_parallel_size" not in config:
        raise ValueError(f"config={config!r} is invalid: it must be None (the active config) or "
                         "the dict returned by nxd_cp.neuronx_distributed_config(...); comm type, "
                         "layout and sequence_parallel are set there")
    lay = ps.get_layout()
    given = {"tensor_parallel_size": config.get("tensor_parallel_size", 1),
             "context_parallel_size": config["context_parallel_size"],
             "pipeline_parallel_size": config.get("pipeline_parallel_size", 1),
             "sequence_parallel": bool(config.get("sequence_parallel", False)),
             "context_parallel_config": context_parallel_config_of(config)}
    active = {"tensor_parallel_size": lay.tp, "context_parallel_size": lay.cp,
              "pipeline_parallel_size": lay.pp, "sequence_parallel": sequence_parallel_enabled(),
              "context_parallel_config": get_context_parallel_config()}
    for key, value in given.items():
        if value != active[key]:
            raise ValueError(f"config[{key!r}]={value!r} differs from the active config's "
                             f"{active[key]!r}: the batches and the attention use the active "
                             "config; call neuronx_distributed_config(...) with this config first "
                             "(it makes it the active one)")
    return given["sequence_parallel"]


def transform(model: nn.Module, config: Optional[Mapping] = None, *,
              state_dict: Optional[Mapping[str, torch.Tensor]] = None,
              vocab_parallel_logits: bool = False) -> nn.Module:
    """Turn ``model`` (a registered ``*ForCausalLM``: Llama, Mistral, GPT-NeoX, Qwen2, Qwen3 or
    one added with ``nxd_cp.register_architecture``) into its TP x CP version.

    Call after ``nxd_cp.neuronx_distributed_config(...)`` (or
    ``parallel_state.initialize_model_parallel(tp, pp=1, cp)``: default config) on every rank,
    with the same full weights on every rank (or a meta-device model and ``state_dict``, the
    full HF state dict). Modifies and returns ``model`` (and its config object: do not share it
    with an unmodified model).

    config: the dict ``neuronx_distributed_config`` returned, or None: the active config. Its
        ``context_parallel_config`` (comm type, layout) is read by the model's attention at
        every call; its ``sequence_parallel`` (SP inside TP, see above; ``S/cp`` must divide
        by tp) shapes the model. A dict that is not the active config is a ``ValueError``.
    vocab_parallel_logits: keep logits split by vocabulary over TP (``[B, S_local, V/tp]``)
        instead of gathering them; the model's loss is then computed vocab-parallel.

    The transformed model takes the output of ``get_batch_on_this_context_parallel_rank``:
    ``input_ids`` / ``labels`` (already shifted) / ``position_ids`` (global) /
    ``attention_mask`` ``[B, S_local]`` / ``seq_idx`` (packed rows); ``.loss`` is the
    token-weighted loss of the full
    batch, identical on every CP rank; ``.logits`` are this rank's tokens' logits.
    Raises ``ValueError`` for an unsupported architecture or sizes that do not split.
    """
    spec = arch_of(model)
    if getattr(model, "nxd_cp_config", None) is not None:
        raise ValueError("model is already transformed by nxd_cp.transform")
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call nxd_cp.neuronx_distributed_config(...) (or nxd_cp.parallel_"
                           "state.initialize_model_parallel(...)) before nxd_cp.transform(model)")
    sequence_parallel = _sequence_parallel(config)
    if ps.get_pipeline_model_parallel_size() != 1:
        raise ValueError(f"pipeline_model_parallel_size={ps.get_pipeline_model_parallel_size()}"
                         " is not supported by nxd_cp.transform (use 1)")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} does not support transformers' attention "
                         f"interface (_supports_attention_backend is False): nxd_cp.transform "
                         f"cannot route its attention to context-parallel attention")
    config = model.config
    sizes = check_sizes(spec, config, ps.get_tensor_model_parallel_size())
    check_group_agreement("transform", {  # host-side, before any weight moves
        "architecture": spec.name, **get_context_parallel_config().to_dict(),
        "sequence_parallel": sequence_parallel, "vocab_parallel_logits": vocab_parallel_logits,
        "model config (sha256)": hashlib.sha256(config.to_json_string().encode()).hexdigest()},
        ps.get_group_spec("context"))
    on_meta = any(p.is_meta for p in model.parameters())
    if state_dict is None:
        if on_meta:
            raise ValueError("model has parameters on the meta device: pass state_dict= (the "
                             "full Hugging Face state dict) to nxd_cp.transform")
        state_dict = model.state_dict()  # references to the full weights, no copy
    if on_meta and any(type(m) in registered_modules() for m in model.modules()):
        raise ValueError("nxd_cp.register_module replacements need the model's full weights: "
                         "build it off the meta device to transform it")
    # modules of classes registered with nxd_cp.register_module (before the spec's own)
    skip = tuple(p + "." for p in ([] if on_meta else replace_registered_modules(model)))

    lm_head = get_path(model, spec.lm_head)
    embedding = get_path(model, f"{spec.base}.{spec.embedding}")
    tied = lm_head.weight is embedding.weight
    new = _parallel_modules(model, spec, sizes, vocab_parallel_logits, skip, sequence_parallel)
    devices = {path: next(get_path(model, path).parameters()).device for path in new}
    for path, module in new.items():
        set_path(model, path, module)

    if on_meta:
        device = _first_device(state_dict.values())
        materialize(model, device)
        _rebuild_rotary(model, device)
        load_prefixes = ("",)
    else:
        for path, module in new.items():
            materialize(module, devices[path])
        load_prefixes = tuple(p + "." for p in new)
    if tied:  # after materialize: to_empty gives each module its own tensor
        get_path(model, spec.lm_head).weight = get_path(
            model, f"{spec.base}.{spec.embedding}").weight
    _load(model, state_dict, load_prefixes, tied_keys=_tied_keys(model))
    wrap_length_dependent(model)  # dynamic / longrope: frequencies of the global sequence

    windows = []
    for i, layer in enumerate(get_path(model, f"{spec.base}.{spec.layers}")):
        windows.append(spec.window(config, i))  # per layer (Qwen2: config.layer_types)
        attn_cfg = hf_attention.CPAttentionConfig(windows[-1])
        setattr(get_path(layer, spec.attention), hf_attention.MODULE_ATTR, attn_cfg)
    window = windows[0] if len(set(windows)) == 1 else tuple(windows)
    hf_attention.register()
    model.set_attn_implementation(hf_attention.ATTN_IMPLEMENTATION)
    model.loss_function = functools.partial(_causal_lm_loss,
                                            vocab_parallel=vocab_parallel_logits)
    model.nxd_cp_config = {"architecture": spec.name, "window_size": window,
                           "vocab_parallel_logits": vocab_parallel_logits,
                           "sequence_parallel": sequence_parallel,
                           "sequence_parallel_parameters": sp.wire_model(
                               model, spec, new, sequence_parallel)}
    model.register_forward_pre_hook(_check_inputs, with_kwargs=True)
    return model


def _tied_keys(model: nn.Module):
    """Names of parameters that are the same tensor as an earlier name (tied weights)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


@torch.no_grad()
def _load(model: nn.Module, full: Mapping[str, torch.Tensor], prefixes, tied_keys) -> None:
    """Copy this rank's part of ``full`` into every parameter / persistent buffer of ``model``
    whose name starts with one of ``prefixes``."""
    parts = partitions(model)
    missing = []
    for name, target in model.state_dict(keep_vars=True).items():
        if not name.startswith(prefixes):
            continue
        if name not in full:
            if name not in tied_keys:
                missing.append(name)
            continue
        copy_shard(target, parts.get(name, Partition()), full[name], f"state_dict[{name!r}]")
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} tensors of the model, e.g. "
                         f"{missing[:5]}")
