"""``initialize_parallel_optimizer``: NxD's optimizer wrapper on the torch.distributed fallback,
with ZeRO-1 sharded over DP x CP.

``initialize_parallel_optimizer(nxd_config, optimizer_class, parameters, **defaults)`` (NxD's
name and signature) returns a ``ParallelOptimizer`` whose ``step()`` does what NxD's
``NxDOptimizer.step`` does, in this order:

1. reduce the gradients: sum over CP, mean over DP (``allreduce_data_context_parallel_gradients``,
   the one reduction of a step; never call it yourself as well: it raises when given this
   optimizer), plus the sequence-parallel sum over TP once when the config has
   ``sequence_parallel=True`` (by name for a transformed model, else by the
   ``sequence_parallel_enabled`` parameter attribute);
2. clip by the global norm when ``optimizer_config["grad_clipping"]`` (``max_grad_norm``):
   ``clip_grad_norm``, right under TP x CP; the norm before clipping is ``grad_norm``;
3. step: with ``optimizer_config["zero_one_enabled"]`` a
   ``torch.distributed.optim.ZeroRedundancyOptimizer`` over the DP x CP group (NxD's ZeRO-1
   sharding group): each of the dp * cp ranks holds the optimizer state of about 1/(dp * cp) of
   the parameters (whole parameters, balanced by size), steps them and broadcasts them; else the
   plain optimizer.

``parameters`` is what NxD takes (an iterable of parameters or of param groups) or, as an
extension, the transformed model itself (then its TP layouts are read from its layers, which
survive ``.to(device)``; with parameters they are read from NxD's parameter attributes).

With NxD in charge the call goes to NxD's ``initialize_parallel_optimizer`` (its ZeRO-1,
``NeuronZero1Optimizer``, needs XLA devices). On the fallback, parameters are their own master
weights: ``mixed_precision_config["use_master_weights"]`` with non-fp32 parameters is refused.

State dicts: without ZeRO-1 the plain optimizer's. With ZeRO-1 each rank's ``state_dict()`` is
its own shard (``{"zero1_shard": ..., "param_groups": ..., "sharding": {...}}``), saved per rank
by ``nxd_cp.training.checkpoint``; loading a shard of another dp * cp (or rank) is a
``ValueError`` naming both. ``consolidate_state_dict(to=0)`` gathers torch's full state dict.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from nxd_cp import parallel_state as ps
from nxd_cp.training.clipping import clip_grad_norm
from nxd_cp.training.grads import (allreduce_data_context_parallel_gradients,
                                   allreduce_sequence_parallel_gradients, is_pipelined)

_HYPER_SKIP = ("params",)


def _config_part(nxd_config: Mapping[str, Any], key: str) -> Dict[str, Any]:
    part = nxd_config.get(key) or {}
    if not isinstance(part, Mapping):
        raise ValueError(f"nxd_config[{key!r}]={part!r} must be a dict (pass the dict "
                         "neuronx_distributed_config returns)")
    return dict(part)


def _param_list(parameters) -> List[Union[torch.Tensor, dict]]:
    if isinstance(parameters, nn.Module):
        return list(parameters.parameters())
    params = list(parameters)
    if not params:
        raise ValueError("parameters is empty: the optimizer needs at least one parameter")
    return params


def _flat_params(params: List[Union[torch.Tensor, dict]]) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    for p in params:
        out.extend(p["params"] if isinstance(p, dict) else [p])
    return out


class ParallelOptimizer(torch.optim.Optimizer):
    """Reduce, clip, step (module docstring); ``optimizer`` is the plain optimizer or the
    ``ZeroRedundancyOptimizer``. Param groups, state and defaults are ``optimizer``'s (as NxD's
    wrapper), so LR schedulers and checkpoints take it."""

    nxd_cp_reduces_gradients = True  # grads.allreduce_* refuse it: its step reduces already

    def __init__(self, optimizer: torch.optim.Optimizer, nxd_config: Mapping[str, Any],
                 target: Union[nn.Module, List[torch.Tensor]]):
        # No super().__init__: the wrapped optimizer owns groups and state (as NxDOptimizer).
        self.optimizer = optimizer
        self.nxd_config = nxd_config
        self._target = target
        self._grad_norm: Optional[torch.Tensor] = None
        opt = _config_part(nxd_config, "optimizer_config")
        self.zero_one_enabled = bool(opt.get("zero_one_enabled", False))
        self.grad_clipping = bool(opt.get("grad_clipping", True))
        self.max_grad_norm = float(opt.get("max_grad_norm", 1.0))
        self.sequence_parallel = bool(nxd_config.get("sequence_parallel", False))

    def __repr__(self) -> str:
        return f"ParallelOptimizer({self.optimizer!r})"

    # --- the wrapped optimizer's groups and state -------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    @property
    def grad_norm(self) -> Optional[torch.Tensor]:
        """The global gradient norm before clipping, of the last ``step`` (None before one or
        without ``grad_clipping``)."""
        return self._grad_norm

    @property
    def local_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that holds this rank's state (ZeRO-1: its shard's)."""
        return self.optimizer.optim if self.zero_one_enabled else self.optimizer

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # --- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Step 1 (what ``step`` does first; public for gradient accumulation tests only)."""
        target = self._target
        if is_pipelined(target):  # a pipelined model's run_train reduced them (NxDPPModel's rule)
            return
        if self.sequence_parallel and not isinstance(target, nn.Module):
            allreduce_sequence_parallel_gradients(target)
        allreduce_data_context_parallel_gradients(target)

    def step(self, closure=None):
        """Reduce the gradients, clip them (``grad_clipping``), step. A collective over DP x CP
        and TP: every rank calls it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        if self.grad_clipping:
            self._grad_norm = clip_grad_norm(self._target, self.max_grad_norm)
        self.optimizer.step()
        return loss

    # --- state dicts ------------------------------------------------------------------------
    def _sharding(self) -> Dict[str, int]:
        return {"dp_cp": ps.get_data_context_parallel_size(),
                "rank": ps.get_data_context_parallel_rank()}

    def state_dict(self) -> Dict[str, Any]:
        """Without ZeRO-1 the plain optimizer's; with it this rank's shard (module docstring)."""
        if not self.zero_one_enabled:
            return self.optimizer.state_dict()
        groups = [{k: v for k, v in g.items() if k not in _HYPER_SKIP}
                  for g in self.optimizer.param_groups]
        return {"zero1_shard": self.optimizer.optim.state_dict(), "param_groups": groups,
                "sharding": self._sharding()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not self.zero_one_enabled:
            self.optimizer.load_state_dict(state_dict)
            return
        if "zero1_shard" not in state_dict:
            raise ValueError("state_dict is not a ZeRO-1 shard of nxd_cp's ParallelOptimizer "
                             "(no 'zero1_shard' key): save it with this optimizer's "
                             "state_dict() or nxd_cp.save_checkpoint")
        saved, here = dict(state_dict["sharding"]), self._sharding()
        if saved != here:
            raise ValueError(
                f"the ZeRO-1 optimizer state was sharded over dp*cp={saved['dp_cp']} ranks "
                f"(this shard: rank {saved['rank']}); this run shards over dp*cp="
                f"{here['dp_cp']} (rank {here['rank']}): a ZeRO-1 shard loads only under the "
                "same data x context parallel size. Resume with the same dp*cp, or start a "
                "new optimizer state")
        self.optimizer.optim.load_state_dict(state_dict["zero1_shard"])
        for group, hyper in zip(self.optimizer.param_groups, state_dict["param_groups"]):
            group.update(hyper)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """ZeRO-1: gather every shard on DP x CP rank ``to`` (a collective), after which
        ``self.optimizer.state_dict()`` there is torch's full optimizer state dict."""
        if self.zero_one_enabled:
            self.optimizer.consolidate_state_dict(to)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in this rank's optimizer state (ZeRO-1: its shard only; FSDP2:
    the local shards of DTensor state)."""
    local = optimizer.local_optimizer if isinstance(optimizer, ParallelOptimizer) else optimizer
    if isinstance(local, ZeroRedundancyOptimizer):
        local = local.optim
    return sum(_local(v).numel() * v.element_size() for s in local.state.values()
               for v in s.values() if isinstance(v, torch.Tensor))


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 state), else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def initialize_parallel_optimizer(nxd_config: Mapping[str, Any], optimizer_class: type,
                                  parameters: Union[nn.Module, Iterable], **defaults):
    """NxD's ``initialize_parallel_optimizer``: a ``ParallelOptimizer`` on the fallback (module
    docstring), NxD's ``NxDOptimizer`` when NxD is in charge.

    nxd_config: the dict ``neuronx_distributed_config`` returned; optimizer_class: a torch
    optimizer class (``nxd_cp.optim.AdamW``, ``torch.optim.SGD``, ...); parameters: an iterable
    of parameters or param groups, or the model; defaults: the optimizer's keyword arguments.
    """
    if not isinstance(nxd_config, Mapping):
        raise ValueError(f"nxd_config={type(nxd_config).__name__} must be the dict "
                         "neuronx_distributed_config returns")
    if ps.nxd_in_charge():
        trainer = importlib.import_module("neuronx_distributed.trainer")
        params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
        return trainer.initialize_parallel_optimizer(nxd_config, optimizer_class, params,
                                                     **defaults)
    params = _param_list(parameters)
    opt = _config_part(nxd_config, "optimizer_config")
    mixed = _config_part(nxd_config, "mixed_precision_config")
    odd = sorted({str(p.dtype) for p in _flat_params(params) if p.dtype != torch.float32})
    if mixed.get("use_master_weights") and odd:
        raise NotImplementedError(
            f"mixed_precision_config['use_master_weights']=True with {odd} parameters needs "
            "NeuronX Distributed's ZeRO-1 optimizer (fp32 master weights); on the "
            "torch.distributed fallback keep the parameters in fp32 or pass "
            "mixed_precision_config={'use_master_weights': False}")
    if opt.get("zero_one_enabled"):
        inner = ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class,
                                        process_group=ps.get_data_context_parallel_group(),
                                        **defaults)
    else:
        inner = optimizer_class(params, **defaults)
    target = parameters if isinstance(parameters, nn.Module) else _flat_params(params)
    return ParallelOptimizer(inner, nxd_config, target)
