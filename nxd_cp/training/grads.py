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

Sequence parallelism (SP) inside TP adds one more reduction: parameters used on
sequence-sharded activations (norms, the bias of a sequence-parallel row layer) carry
``sequence_parallel_enabled`` and get only their tokens' share of the gradient, summed over TP
by ``allreduce_sequence_parallel_gradients`` (NxD's name) once per step, unless NxD's optimizer
with ``sequence_parallel=True`` in its config does it.
"""
from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from typing import Iterable, List, Union

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from nxd_cp import parallel_state as ps
from nxd_cp.comm import get_transport
from nxd_cp.compat import nxd as nxd_compat
from nxd_cp.compat import torch as torch_compat

logger = logging.getLogger(__name__)
_WARNED = []

ModelOrParams = Union[nn.Module, torch.optim.Optimizer, Iterable[torch.Tensor]]


def _check_not_nxd_optimizer(model_or_params: ModelOrParams, name: str) -> None:
    """RuntimeError for an NxD optimizer (its step reduces already); a one-time warning when
    NxD is in charge (its optimizer would reduce the same gradients again)."""
    if nxd_compat.is_nxd_optimizer(model_or_params):
        raise RuntimeError(
            f"{name}(optimizer) got NxD's optimizer: NxDOptimizer.step() already reduces the "
            "gradients over DP x CP (net sum over CP, mean over DP); reducing here too would make "
            "them context_parallel_size times too large. Call nothing before optimizer.step().")
    if getattr(model_or_params, "nxd_cp_reduces_gradients", False):  # training.zero1
        raise RuntimeError(
            f"{name}(optimizer) got nxd_cp's ParallelOptimizer (initialize_parallel_optimizer): "
            "its step() already reduces the gradients over DP x CP (net sum over CP, mean over "
            "DP); reducing here too would make them context_parallel_size times too large. "
            "Call nothing before optimizer.step().")
    if isinstance(model_or_params, nn.Module) and any(
            isinstance(m, FSDPModule) for m in model_or_params.modules()):
        raise RuntimeError(
            f"{name}(model) got a model sharded with FSDP2 (nxd_cp.fully_shard): FSDP "
            "reduce-scatters the gradients over DP x CP in backward (sum over CP, mean over "
            "DP) and they are sharded DTensors; reducing here too would count them twice. "
            "Call nothing between backward() and optimizer.step().")
    if is_pipelined(model_or_params):
        raise RuntimeError(_pipelined_message(name))
    if ps.nxd_in_charge() and not _WARNED:
        _WARNED.append(True)
        logger.warning("nxd_cp.%s: NeuronX Distributed is in charge; if you step with NxD's "
                       "initialize_parallel_optimizer, do not call this as well (NxD's step "
                       "already reduces over DP x CP)", name)


PIPELINED = "nxd_cp_pipelined"  # set on every parameter of a pipelined model's stage


def _pipelined_message(name: str) -> str:
    return (f"{name} got a pipelined model (or its parameters / optimizer): model.run_train() "
            "already reduced the step's gradients over DP x CP (net sum over CP, mean over DP), "
            "as NxD's NxDPPModel does; reducing here too would count them twice. Call nothing "
            "between run_train() and optimizer.step().")


def _parameters(model_or_params: ModelOrParams):
    if isinstance(model_or_params, nn.Module):
        return list(model_or_params.parameters())
    if isinstance(model_or_params, torch.optim.Optimizer):
        return [p for g in model_or_params.param_groups for p in g["params"]]
    return None  # an iterable: looked at once, by _grads


def is_pipelined(model_or_params: ModelOrParams) -> bool:
    params = _parameters(model_or_params)
    if params is None and isinstance(model_or_params, (list, tuple)):
        params = model_or_params
    return any(getattr(p, PIPELINED, False) for p in params or ())


@torch.no_grad()
def reduce_step_gradients(model: nn.Module) -> None:
    """The whole gradient reduction of a step of a transformed model, for the owner of the
    step (a pipelined model's ``run_train``): SP once, then sum over CP and mean over DP."""
    reduce_sequence_parallel_once(model)
    _all_reduce_grads(_grads(model, owner=True), "data_context",
                      1.0 / ps.get_data_parallel_size())
    _mark_sequence_parallel_reduced(model)


def _grads(model_or_params: ModelOrParams, keep=None, owner: bool = False
           ) -> List[torch.Tensor]:
    """The ``.grad`` tensors of a module, an optimizer's param groups or an iterable of params
    (those whose parameter passes ``keep``, when given); tied weights appear once. Parameters of
    a pipelined model are refused unless ``owner`` (its ``run_train`` reduces them)."""
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
        if not owner and getattr(p, PIPELINED, False):
            raise RuntimeError(_pipelined_message("gradient reduction"))
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
    A model from ``transform`` with ``sequence_parallel=True`` also gets its SP reduction here
    (``allreduce_sequence_parallel_gradients``), exactly once per backward: one call is the
    whole gradient reduction of a step.
    """
    _check_not_nxd_optimizer(model_or_params, "allreduce_context_parallel_gradients")
    reduce_sequence_parallel_once(model_or_params)
    _all_reduce_grads(_grads(model_or_params), "context", 1.0)
    _mark_sequence_parallel_reduced(model_or_params)


@torch.no_grad()
def allreduce_data_context_parallel_gradients(model_or_params: ModelOrParams,
                                              average_over_dp: bool = True) -> None:
    """Sum the gradients over CP and average them over DP, in one all-reduce over DP x CP.

    With ``average_over_dp=False`` the gradients are summed over DP as well (for a loss that is
    already divided by the DP-global token count). A model with ``sequence_parallel=True`` gets
    its SP reduction too, once (as ``allreduce_context_parallel_gradients``).
    """
    _check_not_nxd_optimizer(model_or_params, "allreduce_data_context_parallel_gradients")
    dp = ps.get_data_parallel_size()
    scale = 1.0 / dp if average_over_dp else 1.0
    reduce_sequence_parallel_once(model_or_params)
    _all_reduce_grads(_grads(model_or_params), "data_context", scale)
    _mark_sequence_parallel_reduced(model_or_params)


def _sequence_parallel_grads(model_or_params: ModelOrParams) -> List[torch.Tensor]:
    cfg = getattr(model_or_params, "nxd_cp_config", None)
    if isinstance(model_or_params, nn.Module) and cfg is not None:
        # By name: attributes do not survive .to("xla") (new Parameter objects).
        names = set(cfg.get("sequence_parallel_parameters", ()))
        return _grads([p for n, p in model_or_params.named_parameters() if n in names],
                      owner=True)
    return _grads(model_or_params, owner=True,
                  keep=lambda p: getattr(p, "sequence_parallel_enabled", False))


def _check_not_reduced_by_nxd(model_or_params: ModelOrParams) -> None:
    """``RuntimeError`` for NxD's optimizer (or nxd_cp's ``ParallelOptimizer``) when its step
    reduces these gradients already."""
    if is_pipelined(model_or_params):
        raise RuntimeError(_pipelined_message("allreduce_sequence_parallel_gradients"))
    if getattr(model_or_params, "nxd_cp_reduces_gradients", False):  # training.zero1
        raise RuntimeError(
            "allreduce_sequence_parallel_gradients(optimizer) got nxd_cp's ParallelOptimizer "
            "(initialize_parallel_optimizer): its step() already does the gradient reduction "
            "of the step, the sequence-parallel one included. Call nothing before "
            "optimizer.step().")
    if (nxd_compat.is_nxd_optimizer(model_or_params)
            and nxd_compat.nxd_optimizer_config(model_or_params).get("sequence_parallel")):
        raise RuntimeError(
            "allreduce_sequence_parallel_gradients(optimizer) got NxD's optimizer with "
            "sequence_parallel=True in its config: NxDOptimizer.step() already all-reduces the "
            "sequence-parallel parameters' gradients over TP; reducing here too would make them "
            "tensor_model_parallel_size times too large. Call nothing before optimizer.step().")


@torch.no_grad()
def allreduce_sequence_parallel_gradients(model_or_params: ModelOrParams) -> None:
    """Sum over TP, in place, the gradients of the sequence-parallel parameters (NxD's name).

    ``model_or_params``: a model from ``nxd_cp.transform`` with ``sequence_parallel=True`` in
    the config (its parameters are found by name), or a module / optimizer / iterable whose
    parameters carry ``sequence_parallel_enabled = True``. One all-reduce per (dtype, device); a
    no-op at tp == 1 or when no parameter is sequence-parallel. Not with NxD's optimizer when its
    config has ``sequence_parallel=True`` (its step reduces them: ``RuntimeError``). With
    ``sequence_parallel=False`` in NxD's config its step does not reduce them: call this. Move
    the model to XLA with NxD's ``move_model_to_device`` (it keeps the attribute; a plain
    ``.to("xla")`` makes new Parameters without it, so NxD's step would skip them).
    """
    _check_not_reduced_by_nxd(model_or_params)
    if _is_transformed(model_or_params):
        reduce_sequence_parallel_once(model_or_params)
        return
    grads = _sequence_parallel_grads(model_or_params)
    if grads and ps.get_tensor_model_parallel_size() > 1:
        _all_reduce_grads(grads, "tensor", 1.0)


# A transformed model remembers which of its SP gradient tensors it has reduced, by identity
# (weak reference) and in-place version: a new backward makes new gradients or bumps their
# version, so "reduced" never outlives the gradients it was true of.
_SP_MARKS = "_nxd_cp_sequence_parallel_reduced"


def _is_transformed(model_or_params: ModelOrParams) -> bool:
    return isinstance(model_or_params, nn.Module) and isinstance(
        getattr(model_or_params, "nxd_cp_config", None), dict)


def _sp_grads_of(model: nn.Module) -> List[torch.Tensor]:
    if not model.nxd_cp_config.get("sequence_parallel") or (
            ps.get_tensor_model_parallel_size() == 1):
        return []
    return _sequence_parallel_grads(model)


def _is_marked(model: nn.Module, grads: List[torch.Tensor]) -> bool:
    marks = model.__dict__.get(_SP_MARKS)
    if not marks or len(marks) != len(grads):
        return False
    return all(ref() is g and version == torch_compat.tensor_version(g)
               for (ref, version), g in zip(marks, grads))


def _mark_sequence_parallel_reduced(model_or_params: ModelOrParams) -> None:
    """After an in-place reduction of a transformed model's gradients: record the SP ones as
    reduced (their versions changed)."""
    if _is_transformed(model_or_params):
        grads = _sp_grads_of(model_or_params)
        model_or_params.__dict__[_SP_MARKS] = [
            (weakref.ref(g), torch_compat.tensor_version(g)) for g in grads]


def reduce_sequence_parallel_once(model_or_params: ModelOrParams) -> None:
    """The SP reduction of a transformed model, unless done since its last backward."""
    if not _is_transformed(model_or_params):
        return
    grads = _sp_grads_of(model_or_params)
    if grads and not _is_marked(model_or_params, grads):
        _all_reduce_grads(grads, "tensor", 1.0)
        _mark_sequence_parallel_reduced(model_or_params)
