"""Full (unsharded) state dict and gradients of a transformed model.

``full_state_dict(model)`` is the inverse of ``transform``'s weight sharding: it gathers every
TP-split or KV-replicated parameter over the TP group and returns the Hugging Face state dict
of the unmodified architecture (same keys, shapes, dtypes and bits), so that
``model.save_pretrained(path, state_dict=full_state_dict(model))`` on rank 0 writes a checkpoint
the unmodified model loads. Both functions are collectives over TP: every rank must call them.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.models.pipelined import is_pipelined_model, merge_stages
from nxd_cp.models.registry import architecture_of
from nxd_cp.tensor_parallel.partition import Partition, gather_full, partitions


def _keep(model: nn.Module, rank0_only: bool) -> bool:
    """Whether this rank keeps what it gathers over TP: global rank 0 (every rank unless
    ``rank0_only``); for a pipelined model every stage of global rank 0's pipeline group."""
    if not rank0_only or not dist.is_initialized():
        return True
    if is_pipelined_model(model):
        return 0 in ps.get_group_spec("pipeline").ranks
    return dist.get_rank() == 0


def _over_stages(model: nn.Module, out: Optional[dict], rank0_only: bool) -> Optional[dict]:
    """``out`` of this stage -> the whole model's (pipelined models; others unchanged)."""
    if not is_pipelined_model(model):
        return out
    tied = model.nxd_cp_config["pipeline"]["tied_embeddings"]
    spec = architecture_of(model)
    keys = (f"{spec.base}.{spec.embedding}.weight", f"{spec.lm_head}.weight") if tied else ()
    return merge_stages(out, rank0_only, keys)


@torch.no_grad()
def full_state_dict(model: nn.Module, rank0_only: bool = True
                    ) -> Optional[Dict[str, torch.Tensor]]:
    """The full HF state dict (on global rank 0; None elsewhere unless ``rank0_only=False``).

    Tied weights map to one tensor, as in the unmodified model's state dict. A pipelined model's
    stages are gathered too (a collective over TP and PP).
    """
    keep = _keep(model, rank0_only)
    parts = partitions(model)
    out, by_id = {}, {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in by_id:  # tied: same tensor as an earlier key
            if keep:
                out[name] = out[by_id[id(value)]]
            continue
        by_id[id(value)] = name
        full = gather_full(parts.get(name, Partition()), value)
        if keep:
            out[name] = full
    return _over_stages(model, out if keep else None, rank0_only)


@torch.no_grad()
def full_gradients(model: nn.Module, rank0_only: bool = True
                   ) -> Optional[Dict[str, Optional[torch.Tensor]]]:
    """name -> full gradient of every parameter (None where it has none), gathered over TP.

    Call after the CP reduction (``allreduce_context_parallel_gradients``) to get the gradient
    of the unmodified model; before it, each rank holds only its tokens' part.
    """
    keep = _keep(model, rank0_only)
    parts = partitions(model)
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        full = gather_full(parts[name], grad)
        if keep:
            out[name] = full if p.grad is not None else None
    return _over_stages(model, out if keep else None, rank0_only)
