"""FSDP2 models in ``save_checkpoint`` / ``load_checkpoint``: torch's sharded state dicts in DCP.

A model sharded with ``nxd_cp.fully_shard`` holds DTensor shards that differ on every rank of
its DP x CP group, and so does its optimizer's state. Its checkpoint is torch's: the state
dicts of ``torch.distributed.checkpoint.state_dict.get_state_dict`` (sharded, keys by parameter
name) written with ``torch.distributed.checkpoint.save`` (DCP) into a folder per TP (PP) shard::

    <tag>/fsdp/tp_rank_XX_pp_rank_XX/    .metadata + one .distcp file per DP x CP rank

Each DCP save / load is a collective over the DP x CP group (the ranks sharing that TP shard,
the FSDP mesh), given as DCP's ``process_group``. ``metadata.json`` records ``fsdp_dp_cp``, the
dp * cp the shards were split over. DCP reshards on load, so the state loads exactly under
another dp * cp (same tp, pp). An FSDP2 checkpoint does not load into a model that is not
sharded with FSDP2, nor the reverse (``ValueError`` naming both).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from nxd_cp import parallel_state as ps

FSDP_DIR = "fsdp"


def is_fsdp_model(model) -> bool:
    """True for a model sharded with FSDP2 (``nxd_cp.fully_shard``)."""
    return model is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def is_fsdp_optimizer(optimizer) -> bool:
    """True for an optimizer over DTensor (FSDP2) parameters."""
    return optimizer is not None and any(isinstance(p, DTensor) for g in optimizer.param_groups
                                         for p in g["params"])


def uses_fsdp(model, optimizer) -> bool:
    """Whether the FSDP2 path applies; ``ValueError`` for an FSDP2 optimizer without its model
    (torch's state dict names the optimizer state by the model's parameter names)."""
    if is_fsdp_model(model):
        return True
    if is_fsdp_optimizer(optimizer):
        raise ValueError(
            "the optimizer's parameters are FSDP2 DTensors (nxd_cp.fully_shard) but model= was "
            f"{'not given' if model is None else 'not sharded with FSDP2'}: pass the FSDP2 model "
            "too (its state dict names the optimizer state)")
    return False


def fsdp_folder() -> str:
    """This rank's DCP folder inside a checkpoint: one per TP (PP) shard."""
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    return os.path.join(FSDP_DIR, f"tp_rank_{tp:02d}_pp_rank_{pp:02d}")


def _state(model, optimizer, options: Optional[StateDictOptions] = None) -> Dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, [] if optimizer is None else optimizer,
                                        options=options)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    return state


def save_fsdp(ckpt: str, model, optimizer) -> int:
    """Write the sharded model (and optimizer) state under ``ckpt``; a collective over the DP x
    CP group. Returns the dp * cp the shards are split over (for ``metadata.json``)."""
    folder = os.path.join(ckpt, fsdp_folder())
    try:
        dcp.save(_state(model, optimizer), checkpoint_id=folder,
                 process_group=ps.get_data_context_parallel_group())
    except CheckpointException as e:  # a BaseException: make it an error like the others
        raise RuntimeError(f"writing the FSDP2 state to {folder!r} failed: {e}") from e
    return ps.get_data_context_parallel_size()


def check_fsdp(saved_dp_cp: Optional[int], fsdp: bool, ckpt: str) -> None:
    """``ValueError`` when the checkpoint's format (FSDP2 or not) is not the model's."""
    if fsdp and not saved_dp_cp:
        raise ValueError(
            f"checkpoint {ckpt!r} holds unsharded (per TP shard) model / optimizer state; this "
            "model is sharded with FSDP2 (nxd_cp.fully_shard): load the checkpoint into the "
            "model before fully_shard, or save it from an FSDP2 model")
    if not fsdp and saved_dp_cp:
        raise ValueError(
            f"checkpoint {ckpt!r} holds FSDP2 state sharded over dp*cp={saved_dp_cp} ranks; "
            "this model is not sharded with FSDP2: call nxd_cp.fully_shard(model) (any dp*cp) "
            "before loading it")


def load_fsdp(ckpt: str, model, optimizer, strict: bool = True) -> None:
    """Read the sharded state under ``ckpt`` into the FSDP2 model (and optimizer), resharded by
    DCP when this run's dp * cp is another; a collective over the DP x CP group."""
    state = _state(model, optimizer)
    folder = os.path.join(ckpt, fsdp_folder())
    try:
        dcp.load(state, checkpoint_id=folder,
                 planner=DefaultLoadPlanner(allow_partial_load=not strict),
                 process_group=ps.get_data_context_parallel_group())
    except CheckpointException as e:  # every rank of the group raises it (DCP gathers errors)
        raise RuntimeError(f"reading the FSDP2 state from {folder!r} failed: {e}") from e
    set_state_dict(model, [] if optimizer is None else optimizer,
                   model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                   options=StateDictOptions(strict=strict))
