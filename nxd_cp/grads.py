"""Gradient reduction of a context-parallel model: sum over CP, average over DP.

Why a *sum* over CP: ``nxd_cp.loss.context_parallel_cross_entropy`` already divides by the
token count of the whole CP group in forward, and its all-reduce has an identity backward. Each
CP rank's parameter gradient is therefore the contribution of its own tokens to the gradient of
the full-batch loss (the K/V gradients of its tokens computed by other ranks come back through
the CP attention's backward), and the full gradient is the sum of these parts.

Why an *average* over DP: each DP replica computes the loss of its own batch, and data
parallelism trains on the mean of the replicas' losses, as plain DDP does.

Which to call:

* no DP (``dp == 1``): ``allreduce_context_parallel_gradients(model)``;
* DP x CP: ``allreduce_data_context_parallel_gradients(model)`` -- one all-reduce over the DP x CP
  group (``parallel_state.get_data_context_parallel_group()``) and a division by ``dp``. It is
  the same as ``allreduce_context_parallel_gradients`` followed by a DP average (what DDP or
  NxD's optimizer wrapper does over the DP group), in one collective instead of two.

NxD's ``allreduce_context_parallel_gradients(optimizer)`` divides by cp before summing, because
its loss is the per-rank mean; do not combine NxD's loss with this module's reduction, or this
module's loss with NxD's reduction.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, List, Union

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport

ModelOrParams = Union[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]]


def _grads(model_or_params: ModelOrParams) -> List[torch.Tensor]:
    """The ``.grad`` tensors of a module, an optimizer's param groups or an iterable of params."""
    if isinstance(model_or_params, nn.Module):
        params = model_or_params.parameters()
    elif isinstance(model_or_params, torch.optim.Optimizer):
        params = (p for g in model_or_params.param_groups for p in g["params"])
    else:
        params = model_or_params
    seen, grads = set(), []
    for p in params:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.grad is not None:
            grads.append(p.grad)
    return grads


def _all_reduce_grads(grads: List[torch.Tensor], kind: str, scale: float) -> None:
    """Sum ``grads`` in place over the group ``kind``, then multiply by ``scale``.

    Gradients are flattened into one buffer per (dtype, device): one collective per step.
    """
    spec = ps.get_group_spec(kind)
    if spec.size == 1 and scale == 1.0:
        return
    buckets = defaultdict(list)
    for g in grads:
        buckets[(g.dtype, g.device)].append(g)
    for (_, device), bucket in buckets.items():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        flat = get_transport(spec, device).all_reduce(flat)
        if scale != 1.0:
            flat = flat * scale
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


@torch.no_grad()
def allreduce_context_parallel_gradients(model_or_params: ModelOrParams) -> None:
    """Sum the gradients over the CP group, in place (NxD's name; NxD averages instead).

    ``model_or_params``: a module, an optimizer or an iterable of parameters. Call after
    ``loss.backward()`` with the loss of ``context_parallel_cross_entropy`` (or of a model
    from ``nxd_cp.transform``), before clipping and ``optimizer.step()``. No-op when cp == 1.
    """
    _all_reduce_grads(_grads(model_or_params), "context", 1.0)


@torch.no_grad()
def allreduce_data_context_parallel_gradients(model_or_params: ModelOrParams,
                                              average_over_dp: bool = True) -> None:
    """Sum the gradients over CP and average them over DP, in one all-reduce over DP x CP.

    With ``average_over_dp=False`` the gradients are summed over DP as well (for a loss that is
    already divided by the DP-global token count).
    """
    dp = ps.get_data_parallel_size()
    scale = 1.0 / dp if average_over_dp else 1.0
    _all_reduce_grads(_grads(model_or_params), "data_context", scale)
