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

from nxd_cp.tensor_parallel.partition import Partition, gather_full, partitions


def _keep(rank0_only: bool) -> bool:
    return not rank0_only or not dist.is_initialized() or dist.get_rank() == 0


@torch.no_grad()
def full_state_dict(model: nn.Module, rank0_only: bool = True
                    ) -> Optional[Dict[str, torch.Tensor]]:
    """The full HF state dict (on global rank 0; None elsewhere unless ``rank0_only=False``).

    Tied weights map to one tensor, as in the unmodified model's state dict.
    """
    keep = _keep(rank0_only)
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
    return out if keep else None


@torch.no_grad()
def full_gradients(model: nn.Module, rank0_only: bool = True
                   ) -> Optional[Dict[str, Optional[torch.Tensor]]]:
    """name -> full gradient of every parameter (None where it has none), gathered over TP.

    Call after the CP reduction (``allreduce_context_parallel_gradients``) to get the gradient
    of the unmodified model; before it, each rank holds only its tokens' part.
    """
    keep = _keep(rank0_only)
    parts = partitions(model)
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        full = gather_full(parts[name], grad)
        if keep:
            out[name] = full if p.grad is not None else None
    return out if keep else None
