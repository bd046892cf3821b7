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
  (``nxd_cp.tensor_parallel.sequence_parallel``): the first decoder layer's input (the embedding
  output) is split over TP along the sequence, norms and residuals run on ``S/(cp*tp)`` tokens,
  attention / MLP see the all-gathered ``[B, S/cp, H]``, the lm_head all-gathers the final norm's
  output (logits ``[B, S/cp, V]`` as without SP); call
  ``allreduce_sequence_parallel_gradients(model)`` after backward. Without SP the fallback's q/k/v
  and gate/up share one input all-reduce in backward;
* the config's ``activation_checkpoint_config``: those modules recompute in backward
  (``training.checkpointing``; module names and state-dict keys unchanged);
* a forward pre-hook (``models.inputs``) rejects what CP cannot run (KV cache, missing global
  ``position_ids``, a padding mask that is not 2-D, a local sequence SP cannot split, an active
  config that is not the model's) and turns ``use_cache`` off.

The config is bound where it is used: ``transform`` writes the comm type, layout and each
layer's window into the model's attention modules (``hf_attention.CPAttentionConfig``) and the
TP-layer family (NxD's or nxd_cp's) into its loss; nothing is read from a global config per call.
``model.nxd_cp_config`` records what was bound (``get_batch_on_this_context_parallel_rank(batch,
config=model)`` shards with it).

``transform`` runs in named phases: check the model and config, replace its modules by TP
modules (``tp_modules``), load this rank's weights, bind the attention, wire the TP
communication (``tp_wiring``), checkpoint activations, install the loss and the input checks.

Weights come from the model itself (full weights on every rank, as ``from_pretrained`` loads
them) or, for a model built on the meta device, from ``state_dict`` (a full HF state dict, or a
``hf_checkpoint.CheckpointReader``, which reads only this rank's part of each tensor).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.compat import transformers as hf_compat
from nxd_cp.config import ContextParallelConfig, context_parallel_config_of
from nxd_cp.models import hf_attention
from nxd_cp.models.inputs import check_inputs
from nxd_cp.models.pipelined import attach, keep_stage, present
from nxd_cp.models.registry import ArchitectureSpec, check_sizes
from nxd_cp.models.registry import architecture_of as arch_of
from nxd_cp.models.rope import wrap_length_dependent
from nxd_cp.models.tp_modules import parallel_modules
from nxd_cp.models.tp_wiring import wire_tensor_parallel
from nxd_cp.nn.registry import registered_modules, replace_registered_modules
from nxd_cp.tensor_parallel.factory import tensor_parallel_layers
from nxd_cp.tensor_parallel.partition import (Partition, copy_shard, get_path, materialize,
                                              partitions, set_path)
from nxd_cp.topology.agreement import check_group_agreement
from nxd_cp.training.checkpointing import checkpoint_modules, modules_to_checkpoint
from nxd_cp.training.loss import context_parallel_cross_entropy


def _causal_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None,
                    ignore_index=-100, shift_labels=None, vocab_parallel=False, use_nxd=None,
                    **kwargs):
    """transformers' loss_function signature; labels are already shifted (see data.py)."""
    target = shift_labels if shift_labels is not None else labels
    return context_parallel_cross_entropy(logits, target, ignore_index=ignore_index,
                                          vocab_parallel=vocab_parallel,
                                          num_items_in_batch=num_items_in_batch,
                                          use_nxd=use_nxd)


# --- phase 1: what is transformed, with which config ------------------------------------------
def _check_model(model: nn.Module) -> ArchitectureSpec:
    spec = arch_of(model)
    if getattr(model, "nxd_cp_config", None) is not None:
        raise ValueError("model is already transformed by nxd_cp.transform")
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call nxd_cp.neuronx_distributed_config(...) (or nxd_cp.parallel_"
                           "state.initialize_model_parallel(...)) before nxd_cp.transform(model)")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} does not support transformers' attention "
                         f"interface (_supports_attention_backend is False): nxd_cp.transform "
                         f"cannot route its attention to context-parallel attention")
    return spec


def _bound_config(config: Optional[Mapping]) -> Tuple[ContextParallelConfig, bool]:
    """(CP config, sequence_parallel) the model is built with: ``config`` (the dict
    ``neuronx_distributed_config`` returned), which must be the active one, or the active."""
    active_cp, active_sp = ps.get_context_parallel_config(), ps.sequence_parallel_enabled()
    if config is None:
        return active_cp, active_sp
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
              "pipeline_parallel_size": lay.pp, "sequence_parallel": active_sp,
              "context_parallel_config": active_cp}
    for key, value in given.items():
        if value != active[key]:
            raise ValueError(f"config[{key!r}]={value!r} differs from the active config's "
                             f"{active[key]!r}: batches are sharded with the active config by "
                             "default; call neuronx_distributed_config(...) with this config "
                             "first (it makes it the active one)")
    return given["context_parallel_config"], given["sequence_parallel"]


# --- phase 2 and 3: TP modules and this rank's weights ----------------------------------------
def _rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """Recreate RoPE modules: their inv_freq is a non-persistent buffer (not in state dicts)."""
    for name, m in hf_compat.rotary_modules(model):
        fresh = hf_compat.rebuilt_rotary(m, device)
        if fresh is not None:
            set_path(model, name, fresh)


def _first_device(tensors) -> torch.device:
    for t in tensors:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


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
        if hasattr(full, "read"):  # hf_checkpoint.CheckpointReader: reads this rank's part only
            full.read(name, parts.get(name, Partition()), target, f"{full!r}[{name!r}]")
            continue
        copy_shard(target, parts.get(name, Partition()), full[name], f"state_dict[{name!r}]")
    if missing:
        source = repr(full) if hasattr(full, "read") else "state_dict"  # hf_checkpoint
        raise ValueError(f"{source} lacks {len(missing)} tensors of the model, e.g. "
                         f"{missing[:5]}")


def _replace_and_load(model: nn.Module, spec: ArchitectureSpec, new: Dict[str, nn.Module],
                      state_dict: Mapping[str, torch.Tensor], on_meta: bool, tied: bool) -> None:
    """Put the TP modules ``new`` in place and load this rank's part of ``state_dict``
    (``tied``: the model ties its lm_head to its embedding)."""
    devices = {path: next(get_path(model, path).parameters()).device for path in new}
    for path, module in new.items():
        set_path(model, path, module)
    if on_meta:
        device = getattr(state_dict, "device", None)  # hf_checkpoint.CheckpointReader's
        device = device if device is not None else _first_device(state_dict.values())
        materialize(model, device)
        _rebuild_rotary(model, device)
        load_prefixes: Tuple[str, ...] = ("",)
    else:
        for path, module in new.items():
            materialize(module, devices[path])
        load_prefixes = tuple(p + "." for p in new)
    emb_key, head_key = f"{spec.base}.{spec.embedding}.weight", f"{spec.lm_head}.weight"
    both = emb_key in new_keys(model) and head_key in new_keys(model)
    if tied and both:  # after materialize: to_empty gives each module its own tensor
        get_path(model, spec.lm_head).weight = get_path(
            model, f"{spec.base}.{spec.embedding}").weight
    if tied and not both and head_key not in state_dict and emb_key in state_dict:
        # the last pipeline stage's copy of a tied weight (checkpoints store it once)
        state_dict = (state_dict.with_alias(head_key, emb_key) if hasattr(  # hf_checkpoint
            state_dict, "with_alias") else {**state_dict, head_key: state_dict[emb_key]})
    _load(model, state_dict, load_prefixes, tied_keys=_tied_keys(model))


def new_keys(model: nn.Module):
    return dict(model.named_parameters(remove_duplicate=False))


# --- phase 5: activation checkpointing --------------------------------------------------------
def _checkpoint_activations(model: nn.Module, spec: ArchitectureSpec,
                            config: Optional[Mapping]) -> Any:
    """Apply the config's ``activation_checkpoint_config`` (NxD's forms: ``"full"`` = every
    decoder layer, or module class(es)); returns the value recorded in ``nxd_cp_config``."""
    value = None if config is None else config.get("activation_checkpoint_config")
    if value is None:
        return None
    layers = [m for m in get_path(model, f"{spec.base}.{spec.layers}") if present(m)]
    checkpoint_modules(modules_to_checkpoint(model, value, layers))
    return value if value == "full" else [c.__name__ for c in (
        value if isinstance(value, (list, tuple)) else [value])]


# --- phase 4: the attention, bound to the config ---------------------------------------------
def _bind_attention(model: nn.Module, spec: ArchitectureSpec, cp_config: ContextParallelConfig
                    ) -> Any:
    """Give every attention module its ``CPAttentionConfig``; returns the window (one value, or
    a tuple per layer where layers differ)."""
    windows = []
    for i, layer in enumerate(get_path(model, f"{spec.base}.{spec.layers}")):
        windows.append(spec.window(model.config, i))  # per layer (Qwen2: config.layer_types)
        if not present(layer):  # another pipeline stage's
            continue
        bound = hf_attention.CPAttentionConfig(cp_config.comm_type, cp_config.load_balance,
                                               windows[-1], cp_config.a2a_size)
        setattr(get_path(layer, spec.attention), hf_attention.MODULE_ATTR, bound)
    hf_attention.register()
    model.set_attn_implementation(hf_attention.ATTN_IMPLEMENTATION)
    return windows[0] if len(set(windows)) == 1 else tuple(windows)


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

    config: the dict ``neuronx_distributed_config`` returned (it must be the active one), or
        None: the active config. Its ``context_parallel_config`` (comm type, layout) is bound
        into the model's attention now; its ``sequence_parallel`` (SP inside TP; ``S/cp`` must
        divide by tp) shapes the model. The model's forward raises ``RuntimeError`` if a later
        ``neuronx_distributed_config`` call made another config active.
        Its ``activation_checkpoint_config`` (NxD's: ``"full"`` = every decoder layer, or a
        module class / list of classes) makes those modules recompute their forward in backward
        on every device (``nxd_cp.training.checkpointing``: torch-xla's checkpoint on XLA,
        torch's non-reentrant one elsewhere).
    vocab_parallel_logits: keep logits split by vocabulary over TP (``[B, S_local, V/tp]``)
        instead of gathering them; the model's loss is then computed vocab-parallel.

    The transformed model takes the output of ``get_batch_on_this_context_parallel_rank``:
    ``input_ids`` / ``labels`` (already shifted) / ``position_ids`` (global) /
    ``attention_mask`` ``[B, S_local]`` / ``seq_idx`` (packed rows); ``.loss`` is the
    token-weighted loss of the full batch, identical on every CP rank; ``.logits`` are this
    rank's tokens' logits. Raises ``ValueError`` for an unsupported architecture or sizes that
    do not split.
    """
    spec = _check_model(model)
    cp_config, sequence_parallel = _bound_config(config)
    sizes = check_sizes(spec, model.config, ps.get_tensor_model_parallel_size())
    check_group_agreement("transform", {  # host-side, before any weight moves
        "architecture": spec.name, **cp_config.to_dict(),
        "sequence_parallel": sequence_parallel, "vocab_parallel_logits": vocab_parallel_logits,
        "model config (sha256)": hashlib.sha256(
            model.config.to_json_string().encode()).hexdigest()},
        ps.get_group_spec("context"))
    pipelined = ps.get_pipeline_model_parallel_size() > 1
    on_meta = any(p.is_meta for p in model.parameters())
    if state_dict is None:
        if on_meta:
            raise ValueError("model has parameters on the meta device: pass state_dict= (the "
                             "full Hugging Face state dict) to nxd_cp.transform")
        state_dict = model.state_dict()  # references to the full weights, no copy
    if on_meta and any(type(m) in registered_modules() for m in model.modules()):
        raise ValueError("nxd_cp.register_module replacements need the model's full weights: "
                         "build it off the meta device to transform it")
    tied = _is_tied(model, spec)
    stage = keep_stage(model, spec) if pipelined else None  # this rank's stage only
    # modules of classes registered with nxd_cp.register_module (before the spec's own)
    skip = tuple(p + "." for p in ([] if on_meta else replace_registered_modules(model)))
    layers = tensor_parallel_layers()  # NxD's or nxd_cp's, decided once for this model
    new = parallel_modules(model, spec, sizes, layers,
                           vocab_parallel_logits=vocab_parallel_logits,
                           sequence_parallel=sequence_parallel, skip=skip)
    _replace_and_load(model, spec, new, state_dict, on_meta, tied)
    del state_dict  # the full weights of other stages / TP ranks are freed with it
    wrap_length_dependent(model)  # dynamic / longrope: frequencies of the global sequence
    window = _bind_attention(model, spec, cp_config)
    sp_parameters = wire_tensor_parallel(model, spec, new, sequence_parallel)
    checkpointing = _checkpoint_activations(model, spec, config)
    model.loss_function = functools.partial(_causal_lm_loss, vocab_parallel=vocab_parallel_logits,
                                            use_nxd=layers.use_nxd)
    model.nxd_cp_config = {"architecture": spec.name, "window_size": window,
                           "context_parallel_config": cp_config.to_dict(),
                           "vocab_parallel_logits": vocab_parallel_logits,
                           "sequence_parallel": sequence_parallel,
                           "nxd_layers": layers.use_nxd,
                           "sequence_parallel_parameters": sp_parameters,
                           "activation_checkpoint": checkpointing, "pipeline": stage}
    model.register_forward_pre_hook(check_inputs, with_kwargs=True)
    if pipelined:
        active = ps.get_training_config()
        pipeline_config = (config.get("pipeline_config") if config is not None else
                           getattr(active, "pipeline_config", None))
        stage.update(attach(model, spec, pipeline_config, tied))
    return model


def _is_tied(model: nn.Module, spec: ArchitectureSpec) -> bool:
    return get_path(model, spec.lm_head).weight is get_path(
        model, f"{spec.base}.{spec.embedding}").weight
