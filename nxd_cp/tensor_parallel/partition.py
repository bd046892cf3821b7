"""The per-parameter shard <-> full mapping of TP models, and module attribute paths.

Every parameter of a TP model is in one of three states (``Partition``), read from the layer
that owns it:

* TP-split on ``dim``: TP rank r holds chunk r of that dim of the full tensor (stride 1);
* KV-replicated (``kv_replicas = n``): TP rank r holds KV head ``r // n`` (rows
  ``[h*D, (h+1)*D)`` of the full K or V projection);
* replicated: the full tensor.

``shard_of`` cuts a rank's part from a full tensor, ``gather_full`` rebuilds the full tensor
from the TP group's parts (a collective over TP); the two are exact inverses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport
from nxd_cp.tensor_parallel.factory import (
    is_column_parallel,
    is_parallel_embedding,
    is_row_parallel,
)
from nxd_cp.tensor_parallel.kv_replication import ReplicatedKVLinear


def get_path(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


def _tp_rank_size() -> Tuple[int, int]:
    spec = ps.get_group_spec("tensor")
    return spec.rank, spec.size


@dataclass(frozen=True)
class Partition:
    """How one parameter is laid out over TP: split on ``dim``, one of ``kv_replicas``-fold
    replicated KV heads, or (both None) replicated."""

    dim: Optional[int] = None
    kv_replicas: Optional[int] = None


def partition_of(module: nn.Module, name: str, param: torch.Tensor) -> Partition:
    """The layout of ``module``'s own parameter ``name``.

    Read from the layer's type and configuration first, so it survives ``model.to(device)``
    (moving to XLA makes new Parameter objects, without NxD's attributes), then from NxD's
    ``tensor_model_parallel`` / ``partition_dim`` attributes for any other TP layer.
    """
    if isinstance(module, ReplicatedKVLinear):
        return Partition(kv_replicas=module.replicas)
    if is_column_parallel(module):
        if name == "weight" or param.shape[0] != module.output_size:  # bias split unless gathered
            return Partition(dim=0)
        return Partition()
    if is_row_parallel(module):
        return Partition(dim=1) if name == "weight" else Partition()
    if is_parallel_embedding(module):
        return Partition(dim=1 if module.shard_across_embedding else 0)
    if getattr(param, "tensor_model_parallel", False):
        return Partition(dim=param.partition_dim)
    return Partition()


def partitions(model: nn.Module) -> Dict[str, Partition]:
    """Parameter name (tied weights under every name) -> its ``Partition``."""
    out = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            out[f"{mname}.{pname}" if mname else pname] = partition_of(m, pname, p)
    return out


def shard_of(part: Partition, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's part (a view) of the full tensor ``full`` laid out as ``part``."""
    if part.kv_replicas is None and part.dim is None:
        return full  # replicated: no parallel state needed
    rank, tp = _tp_rank_size()
    if part.kv_replicas is not None:
        return full.chunk(tp // part.kv_replicas, dim=0)[rank // part.kv_replicas]
    if part.dim is not None:
        return full.chunk(tp, dim=part.dim)[rank]
    return full


@torch.no_grad()
def copy_shard(target: torch.Tensor, part: Partition, full: torch.Tensor, what: str) -> None:
    """Copy this TP rank's part of ``full`` (laid out as ``part``) into ``target``; a
    ``ValueError`` naming ``what`` when the part's shape is not the target's."""
    piece = shard_of(part, full)
    if piece.shape != target.shape:
        raise ValueError(f"{what} of shape {tuple(full.shape)} gives this rank a part of shape "
                         f"{tuple(piece.shape)}, but the tensor it loads into has shape "
                         f"{tuple(target.shape)}")
    target.copy_(piece)


def gather_full(part: Partition, local: torch.Tensor) -> torch.Tensor:
    """The full tensor from every TP rank's ``local`` (a parameter's value or gradient).

    A collective over the TP group: every TP rank must call it for the same parameters in the
    same order.
    """
    spec = ps.get_group_spec("tensor")
    t = get_transport(spec, local.device)
    if part.kv_replicas is not None:
        parts = t.all_gather(local.detach().contiguous(), 0).chunk(spec.size, dim=0)
        return torch.cat(parts[::part.kv_replicas], dim=0)
    if part.dim is not None:
        return t.all_gather(local.detach().contiguous(), part.dim)
    return local.detach().clone()


def materialize(module: nn.Module, device: torch.device) -> None:
    """``to_empty`` that keeps the attributes (partition_dim, ...) set on the parameters."""
    attrs = {name: dict(vars(p))
             for name, p in module.named_parameters(remove_duplicate=False)}
    module.to_empty(device=device)
    for name, p in module.named_parameters(remove_duplicate=False):
        for k, v in attrs[name].items():
            setattr(p, k, v)
