"""Gradient reduction of a context-parallel model: sum over CP, average over DP.

Why a *sum* over CP: ``nxd_cp.training.loss.context_parallel_cross_entropy`` already divides by the
token count of the whole CP group in forward, and its all-reduce has an identity backward. Each
CP rank's parameter gradient is therefore the contribution of its own tokens to the gradient of
the full-batch loss (the K/V gradients of its tokens computed by other ranks come back through
the CP attention's backward), and the full gradient is the sum of these parts.

Why an *average* over DP: each DP replica computes the loss of its own batch, and data
parallelism trains on the mean of the replicas' losses, as plain DDP does.

Which to call -- exactly one reduction per step:

* with NxD's optimizer (``neuronx_distributed.trainer.initialize_parallel_optimizer``):
  **nothing**. ``NxDOptimizer.step`` averages the gradients over CP, then sums them over NxD's
  DP x CP group and divides by dp: net sum over CP, mean over DP, which is what this loss needs.
  Reducing here as well would make them cp times too large, so these functions raise a
  ``RuntimeError`` when given an NxD optimizer (and log a warning once when NxD is in charge);
* a plain torch optimizer, no DP (``dp == 1``): ``allreduce_context_parallel_gradients(model)``;
* a plain torch optimizer with DP x CP: ``allreduce_data_context_parallel_gradients(model)`` --
  one all-reduce over the DP x CP group and a division by dp (the same as
  ``allreduce_context_parallel_gradients`` then a DP average, in one collective). Do not wrap
  the model in DDP as well.

NxD's own ``grads.allreduce_context_parallel_gradients(optimizer)`` *averages* over CP (its step
follows it with the DP x CP sum); this module's function of that name *sums* over CP.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterable, List, Union

import torch
from torch import nn

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport

logger = logging.getLogger(__name__)
_WARNED = []

ModelOrParams = Union[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]]


def _check_not_nxd_optimizer(model_or_params: ModelOrParams, name: str) -> None:
    """RuntimeError for an NxD optimizer (its step reduces already); a one-time warning when
    NxD is in charge (its optimizer would reduce the same gradients again)."""
    if any(c.__name__ == "NxDOptimizer" for c in type(model_or_params).__mro__):
        raise RuntimeError(
            f"{name}(optimizer) got NxD's optimizer: NxDOptimizer.step() already reduces the "
            "gradients over DP x CP (net sum over CP, mean over DP); reducing here too would make "
            "them context_parallel_size times too large. Call nothing before optimizer.step().")
    if ps.nxd_in_charge() and not _WARNED:
        _WARNED.append(True)
        logger.warning("nxd_cp.%s: NeuronX Distributed is in charge; if you step with NxD's "
                       "initialize_parallel_optimizer, do not call this as well (NxD's step "
                       "already reduces over DP x CP)", name)


def _grads(model_or_params: ModelOrParams, keep=None) -> List[torch.Tensor]:
    """The ``.grad`` tensors of a module, an optimizer's param groups or an iterable of params
    (those whose parameter passes ``keep``, when given); tied weights appear once."""
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
        if p.grad is not None and (keep is None or keep(p)):
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
    """Sum the gradients over the CP group, in place (NxD's name; NxD's averages instead).
    Not with NxD's optimizer, which reduces already (module docstring).

    ``model_or_params``: a module, an optimizer or an iterable of parameters. Call after
    ``loss.backward()`` with the loss of ``context_parallel_cross_entropy`` (or of a model
    from ``nxd_cp.transform``), before clipping and ``optimizer.step()``. No-op when cp == 1.
    """
    _check_not_nxd_optimizer(model_or_params, "allreduce_context_parallel_gradients")
    _all_reduce_grads(_grads(model_or_params), "context", 1.0)


@torch.no_grad()
def allreduce_data_context_parallel_gradients(model_or_params: ModelOrParams,
                                              average_over_dp: bool = True) -> None:
    """Sum the gradients over CP and average them over DP, in one all-reduce over DP x CP.

    With ``average_over_dp=False`` the gradients are summed over DP as well (for a loss that is
    already divided by the DP-global token count).
    """
    _check_not_nxd_optimizer(model_or_params, "allreduce_data_context_parallel_gradients")
    dp = ps.get_data_parallel_size()
    scale = 1.0 / dp if average_over_dp else 1.0
    _all_reduce_grads(_grads(model_or_params), "data_context", scale)
