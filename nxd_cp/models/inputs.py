"""The input boundary of a transformed model: its forward pre-hook.

Checked once per forward, before any collective of the model runs: what CP cannot run (a KV
cache), what it needs (global ``position_ids`` when cp > 1, a 2-D padding mask, ``seq_idx``
shaped like the tokens, a local sequence that SP can split over TP), the values of this rank's
tokens (ids in ``[0, vocab_size)``, labels there or ``-100``, at least one row,
``num_items_in_batch >= 1``), and that the active config is still the one the model was built
with (the batch function shards with the active config by default), and, in training, that
activation checkpointing is on once and can run (``training.checkpointing.checkpointing_conflict``:
transformers' ``gradient_checkpointing_enable()``, before or after ``transform``, together with
nxd_cp's ``activation_checkpoint_config`` or on XLA; a checkpoint wrapper from NxD's
``initialize_parallel_model`` on top of either; host-side, the same on every rank, so every
rank raises the same ``RuntimeError`` before any collective).

A failure on one rank is a failure on every rank: ranks of one TP x CP block hold different
tokens (and could be handed different shapes), so before raising they agree (``agree``: two
all-gathers of three integers, over TP then CP) and every rank raises a ``ValueError`` naming
the ranks that failed (those ranks add their own message) instead of leaving the others blocked
in a collective. On XLA nothing is read from the device (values and agreement are off the
graph; the batch function checks the host batch before it moves). The attention validates the
shard length and layout itself. On XLA, int64 token ids, labels, positions and masks become
int32 here: one convert per input at the graph's entry, no s64 index arithmetic after it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport
from nxd_cp.sequence import validation as check
from nxd_cp.sequence.batch import check_padding_mask
from nxd_cp.sequence.layout import check_sequence_split
from nxd_cp.training.checkpointing import checkpointing_conflict

INTEGER_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask", "seq_idx")


def _int32_on_xla(args: Tuple, kwargs: Dict[str, Any]):
    def cast(x):
        if isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.device.type == "xla":
            return x.to(torch.int32)
        return x
    for key in INTEGER_INPUTS:
        if key in kwargs:
            kwargs[key] = cast(kwargs[key])
    return tuple(cast(a) for a in args[:1]) + tuple(args[1:]), kwargs


def _check_config(model: nn.Module) -> None:
    """``RuntimeError`` when the active config differs from the one bound at ``transform``."""
    bound = model.nxd_cp_config
    active = {"context_parallel_config": ps.get_context_parallel_config().to_dict(),
              "sequence_parallel": ps.sequence_parallel_enabled()}
    differ = [key for key, value in active.items() if bound[key] != value]
    if differ:
        built = ", ".join(f"{k}={bound[k]!r}" for k in differ)
        now = ", ".join(f"{k}={active[k]!r}" for k in differ)
        raise RuntimeError(
            f"the model was transformed with {built} but the active config has {now}: batches "
            "sharded with the active config would not match the model. Call "
            "neuronx_distributed_config(...) with the model's settings (or transform a new "
            "model)")


def _value_errors(model: nn.Module, seq: Any, kwargs: Dict[str, Any]) -> List[str]:
    """This rank's problems with its tokens (messages; none raised yet)."""
    vocab = getattr(model.config, "vocab_size", None)
    errors = []
    if isinstance(seq, torch.Tensor) and seq.dim() >= 1:
        errors.append(check.batch_size_error(seq.shape[0]))
    ids = kwargs.get("input_ids")
    if ids is not None:
        errors.append(check.token_ids_error(ids, vocab))
    if kwargs.get("labels") is not None:
        errors.append(check.labels_error(kwargs["labels"], vocab))
    errors.append(check.num_items_error(kwargs.get("num_items_in_batch")))
    return [e for e in errors if e]


def agree(errors: List[str], shape: Tuple[int, int], device: torch.device) -> None:
    """Raise on every rank of this TP x CP block if any rank of it has ``errors`` or another
    ``shape`` ``(B, S_local)``; the ranks that found a problem add their own message."""
    code = torch.tensor([1 if errors else 0, shape[0], shape[1]], dtype=torch.int64)
    table = code.unsqueeze(0)
    if device.type != "xla":
        for kind in ("tensor", "context"):  # [tp, 3], then [cp, tp, 3]: the whole block
            spec = ps.get_group_spec(kind)
            if spec.size > 1:
                t = get_transport(spec, device)
                table = t.all_gather(table.to(device).unsqueeze(0), 0).cpu()
    table = table.reshape(-1, 3)
    failed = [i for i, row in enumerate(table.tolist()) if row[0]]
    shapes = sorted({(b, s) for _, b, s in table.tolist()})
    if not failed and len(shapes) == 1:
        return
    where = "this TP x CP block (index = cp_rank * tp + tp_rank)"
    if failed:
        if errors:
            raise ValueError(f"{'; '.join(errors)} [on this rank; ranks {failed} of {where} "
                             "found invalid inputs]")
        raise ValueError(f"invalid model inputs on ranks {failed} of {where}: their error "
                         "names the value and where it is")
    raise ValueError(f"the ranks of {where} were given different local shapes [B, S_local]: "
                     f"{[tuple(r[1:]) for r in table.tolist()]}; every TP rank of a CP rank "
                     "must get the same batch, every CP rank its shard of the same sequence "
                     "(get_batch_on_this_context_parallel_rank)")


def check_inputs(model: nn.Module, args: Tuple, kwargs: Dict[str, Any]):
    """Forward pre-hook of a transformed model (module docstring); returns the inputs, with
    ``use_cache=False`` and int32 integers on XLA."""
    if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        raise ValueError("past_key_values / use_cache=True are not supported by a "
                         "context-parallel model (training only: no KV cache)")
    kwargs["use_cache"] = False
    _check_config(model)
    check_padding_mask(kwargs.get("attention_mask"))
    if args and "input_ids" not in kwargs:
        kwargs["input_ids"], args = args[0], tuple(args[1:])
    seq = kwargs.get("input_ids")
    seq = kwargs.get("inputs_embeds") if seq is None else seq
    if model.training:  # the same on every rank (module attributes, device type): no agreement
        conflict = checkpointing_conflict(model, isinstance(seq, torch.Tensor)
                                          and seq.device.type == "xla")
        if conflict:
            raise RuntimeError(conflict)
    if isinstance(seq, torch.Tensor) and seq.dim() >= 2:
        agree(_value_errors(model, seq, kwargs), tuple(seq.shape[:2]), seq.device)
    if model.nxd_cp_config["sequence_parallel"] and seq is not None:
        check_sequence_split(seq.shape[1], ps.get_tensor_model_parallel_size())
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
