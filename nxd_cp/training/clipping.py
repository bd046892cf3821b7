"""``clip_grad_norm``: the global gradient norm of a TP x CP (x DP) model, and clipping by it.

The norm is the one the *unmodified* model's gradients have (what
``torch.nn.utils.clip_grad_norm_`` returns on it), computed from the shards every rank holds:

* a TP-split parameter (column / row parallel, vocab-parallel embedding): each TP rank holds one
  chunk of the full gradient, so the chunks' ``sum |g|^p`` are summed over TP;
* a TP-replicated parameter (norms, a row layer's bias, SP norms after their reduction): every
  TP rank holds the same full gradient; it is counted once (weight ``1/tp`` on each rank, so
  the computation is the same on every rank, no rank-dependent branch);
* a replicated KV projection (``ReplicatedKVLinear``, ``nxd_cp_kv_replicas = n``): each KV head
  lives on ``n`` TP ranks; counted once (weight ``1/n``);
* a DTensor gradient (FSDP2, sharded over DP x CP): the local shards' sums are summed over the
  DTensor's mesh first;
* a pipelined model (``run_train``): each stage's sums are summed over the pipeline group; the
  last stage's copy of a weight tied to the first stage's embedding (``nxd_cp_tied_copy``)
  counts 0 there (the unmodified model has it once);
* over DP x CP nothing is summed: after the gradient reduction every DP x CP rank holds the same
  (TP-local) gradients. **Call it after the reduction** (``allreduce_*_gradients``, or use the
  optimizer of ``initialize_parallel_optimizer``, whose step reduces then clips).

The layout of a parameter is ``tensor_parallel.partition.partition_of`` when a module is given
(read from the layer types, so it survives ``.to(device)`` and FSDP2, which drops parameter
attributes), else NxD's parameter attributes (``tensor_model_parallel`` / ``partition_dim``,
``nxd_cp_kv_replicas``). Every rank then multiplies its gradients by the same coefficient
``min(1, max_norm / (norm + 1e-6))`` (torch's rule), without ``.item()`` (XLA-friendly).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Tuple, Union

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport
from nxd_cp.tensor_parallel.partition import Partition, partition_of
from nxd_cp.training.grads import PIPELINED

TIED_COPY = "nxd_cp_tied_copy"  # the last pipeline stage's copy of a tied embedding weight

ModelOrParams = Union[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]]
_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def _partition_from_attributes(p: torch.Tensor) -> Partition:
    if getattr(p, "nxd_cp_kv_replicas", None):
        return Partition(kv_replicas=p.nxd_cp_kv_replicas)
    if getattr(p, "tensor_model_parallel", False):
        return Partition(dim=p.partition_dim)
    return Partition()


def parameters_with_layout(model_or_params: ModelOrParams) -> List[Tuple[torch.Tensor, Partition]]:
    """Every parameter once (tied weights once) with its TP layout (module docstring)."""
    if isinstance(model_or_params, nn.Module):
        items = [(p, partition_of(m, n, p)) for _, m in model_or_params.named_modules()
                 for n, p in m.named_parameters(recurse=False)]
    elif isinstance(model_or_params, torch.optim.Optimizer):
        items = [(p, _partition_from_attributes(p))
                 for g in model_or_params.param_groups for p in g["params"]]
    else:
        items = []
        for p in model_or_params:
            if isinstance(p, dict):  # a param group
                items.extend((q, _partition_from_attributes(q)) for q in p["params"])
            else:
                items.append((p, _partition_from_attributes(p)))
    seen, out = set(), []
    for p, part in items:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((p, part))
    return out


def _weight(part: Partition, tp: int) -> float:
    """How many times a TP rank's copy counts: 1 for a split shard, 1/(copies) otherwise."""
    if part.kv_replicas is not None:
        return 1.0 / part.kv_replicas
    if part.dim is not None:
        return 1.0
    return 1.0 / tp


def _reduce(x: torch.Tensor, spec, inf: bool) -> torch.Tensor:
    """Sum (or max) of the 0-d ``x`` over the group ``spec``."""
    t = get_transport(spec, x.device)
    if spec.size == 1:
        return x
    if inf:
        return t.all_gather(x.reshape(1), 0).max()
    return t.all_reduce(x)


def _mesh_spec(grad):
    """The parallel-state GroupSpec with the ranks of a DTensor gradient's (1-D) mesh (FSDP2
    over DP x CP: ``training.fsdp``)."""
    ranks = tuple(grad.device_mesh.mesh.flatten().tolist())
    for kind in ("data_context", "data", "context"):
        spec = ps.get_group_spec(kind)
        if spec.ranks == ranks:
            return spec
    raise ValueError(f"a DTensor gradient is sharded over ranks {list(ranks)}, which is not a "
                     "DP, CP or DP x CP group of parallel state: clip_grad_norm sums its shards "
                     "only over one of those (shard with nxd_cp.fully_shard)")


@torch.no_grad()
def global_grad_norm(model_or_params: ModelOrParams, norm_type: float = 2.0) -> torch.Tensor:
    """The unmodified model's gradient norm (0-d fp32 tensor), the same on every rank.

    A collective over TP (and, for DTensor gradients, over their mesh; for a pipelined model,
    over PP): every rank calls it.
    Parameters without a gradient are skipped (as torch does).
    """
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type={norm_type!r} must be > 0 (or inf)")
    inf = math.isinf(norm_type)
    tp_spec = ps.get_group_spec("tensor")
    params = parameters_with_layout(model_or_params)
    pipelined = any(getattr(p, PIPELINED, False) for p, _ in params)
    items = [(p.grad, part) for p, part in params
             if p.grad is not None and not getattr(p, TIED_COPY, False)]
    dtensor = _dtensor_type()
    device = items[0][0].device if items else torch.device("cpu")
    local = torch.zeros((), dtype=torch.float32, device=device)
    sharded = {}  # mesh spec ranks -> (spec, accumulated value)
    for g, part in items:
        is_dt = dtensor is not None and isinstance(g, dtensor)
        data = (g.to_local() if is_dt else g).detach().float()
        if inf:
            value = data.abs().max() if data.numel() else local.new_zeros(())
        else:
            value = data.abs().pow(norm_type).sum() * _weight(part, tp_spec.size)
        if is_dt:
            spec = _mesh_spec(g)
            acc = sharded.get(spec.ranks, (spec, local.new_zeros(())))[1]
            sharded[spec.ranks] = (spec, torch.maximum(acc, value) if inf else acc + value)
        else:
            local = torch.maximum(local, value) if inf else local + value
    for spec, value in sharded.values():
        value = _reduce(value, spec, inf)
        local = torch.maximum(local, value) if inf else local + value
    total = _reduce(local, tp_spec, inf)
    if pipelined:
        total = _reduce(total, ps.get_group_spec("pipeline"), inf)
    return total if inf else total.pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm(model_or_params: ModelOrParams, max_norm: float,
                   norm_type: float = 2.0) -> torch.Tensor:
    """Clip the gradients of a TP x CP (x DP, FSDP2) model by its global norm (NxD's name).

    ``model_or_params``: a module (layouts read from its layers), an optimizer or an iterable of
    parameters / param groups (layouts read from NxD's parameter attributes). Call after the
    gradient reduction. Returns the total norm (0-d fp32 tensor, the unmodified model's, the
    same on every rank); every gradient is multiplied by ``min(1, max_norm / (norm + 1e-6))``,
    one coefficient on every rank. A collective over TP.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} must be a number > 0")
    total = global_grad_norm(model_or_params, norm_type)
    coef = torch.clamp(float(max_norm) / (total + _EPS), max=1.0)
    dtensor = _dtensor_type()
    for p, _ in parameters_with_layout(model_or_params):
        g = p.grad
        if g is None:
            continue
        if dtensor is not None and isinstance(g, dtensor):
            g.to_local().mul_(coef.to(g.device))
        else:
            g.mul_(coef.to(g.device))
    return total
